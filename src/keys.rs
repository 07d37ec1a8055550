//! Key derivation: which bucket a request falls into. Parses key specs (`ip`, `header:NAME`,
//! `query:NAME`, `path`, `path_param:NAME`, `method`, `host`, `literal:TEXT`, alternatives joined
//! by `|`), resolves the client IP (X-Forwarded-For only from trusted proxies), and normalises
//! client-controlled values so none is ever used raw in a bucket key.

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};

/// Longest part value kept as written; longer ones are hashed.
pub const MAX_PLAIN_LEN: usize = 64;
/// Separates the parts of a composite key value.
pub const PART_SEPARATOR: char = '|';
/// What a missing part counts as under `on_missing_key: anonymous`: `#` starts no plain value
/// and this is no hash, so no client value is written this way.
pub const ANONYMOUS_MARK: &str = "#anonymous";
/// Separates a part's source from its value when the part has alternatives: `ip=1.2.3.4`.
pub const TAG_SEPARATOR: char = '=';

/// Where one part of a key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Ip,
    Header(http::HeaderName),
    Query(String),
    Path,
    PathParam(String),
    Method,
    Host,
    Literal(String),
}

impl KeySource {
    /// The spec as written in config, canonical (header names lower-case): `header:x-api-key`.
    pub fn spec(&self) -> String {
        match self {
            KeySource::Ip => "ip".into(),
            KeySource::Header(h) => format!("header:{}", h.as_str()),
            KeySource::Query(q) => format!("query:{q}"),
            KeySource::Path => "path".into(),
            KeySource::PathParam(p) => format!("path_param:{p}"),
            KeySource::Method => "method".into(),
            KeySource::Host => "host".into(),
            KeySource::Literal(t) => format!("literal:{t}"),
        }
    }
}

/// One part of a key: the first present of its alternatives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPart {
    pub alternatives: Vec<KeySource>,
}

/// A whole key: its parts in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub parts: Vec<KeyPart>,
}

impl KeySpec {
    /// Names of the `path_param:` sources used anywhere in this key.
    pub fn path_params(&self) -> impl Iterator<Item = &str> {
        self.parts
            .iter()
            .flat_map(|p| p.alternatives.iter())
            .filter_map(|s| match s {
                KeySource::PathParam(name) => Some(name.as_str()),
                _ => None,
            })
    }
}

/// Parses one key part such as `header:x-api-key|ip`.
pub fn parse_part(text: &str) -> Result<KeyPart, String> {
    let mut alternatives = Vec::new();
    for alt in text.split('|') {
        alternatives.push(parse_source(alt.trim())?);
    }
    Ok(KeyPart { alternatives })
}

fn parse_source(text: &str) -> Result<KeySource, String> {
    let (kind, arg) = match text.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (text, None),
    };
    let need_arg = |what: &str| -> Result<String, String> {
        match arg {
            Some(a) if !a.is_empty() => Ok(a.to_string()),
            _ => Err(format!("{kind:?} needs a {what}: {kind}:{what}")),
        }
    };
    let no_arg = |source: KeySource| -> Result<KeySource, String> {
        match arg {
            None => Ok(source),
            Some(_) => Err(format!("{kind:?} takes no argument, got {text:?}")),
        }
    };
    match kind {
        "ip" => no_arg(KeySource::Ip),
        "path" => no_arg(KeySource::Path),
        "method" => no_arg(KeySource::Method),
        "host" => no_arg(KeySource::Host),
        "header" => {
            let name = need_arg("NAME")?;
            http::HeaderName::from_bytes(name.as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("{name:?} is not a valid header name"))
        }
        "query" => {
            let name = need_arg("NAME")?;
            if name.contains(['=', '&']) {
                return Err(format!(
                    "query parameter name {name:?} may not hold '=' or '&'"
                ));
            }
            Ok(KeySource::Query(name))
        }
        "path_param" => need_arg("NAME").map(KeySource::PathParam),
        "literal" => need_arg("TEXT").map(KeySource::Literal),
        "" => Err("empty key part".to_string()),
        other => Err(format!(
            "unknown key part {other:?}; expected ip, header:NAME, query:NAME, path, \
             path_param:NAME, method, host or literal:TEXT"
        )),
    }
}

/// What key derivation sees of a request.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// As [`crate::normalize::host`] writes it.
    pub host: Option<&'a str>,
    /// In normal form ([`crate::normalize::path`]).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub client_ip: IpAddr,
    /// Whether the direct peer is a trusted proxy (its `cost_header` is believed).
    pub peer_trusted: bool,
    pub path_params: Option<&'a regex::Captures<'a>>,
}

/// How deriving a key from a request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Derived {
    /// Every part was found (or counted as anonymous); the value is in `out`.
    Present,
    /// A part was missing and the limit does not count missing parts as anonymous.
    Missing,
    /// The source a part is taken from appears more than once with different values (two
    /// `X-Api-Key` headers, `?user=a&user=b`): the request is refused rather than keyed on one
    /// of them while the upstream may read another.
    Ambiguous(KeySource),
}

/// What a source yields for one request.
enum Found {
    Absent,
    Appended,
    Ambiguous,
}

/// Appends the key value of `spec` for `req` to `out`. A part with several alternatives is
/// written `SOURCE=value` (`header:x-api-key=abc`, `ip=1.2.3.4`), so no value of one source can
/// name another source's bucket; a part counted as anonymous is written [`ANONYMOUS_MARK`],
/// which no client value can spell (values holding `#` are hashed).
pub fn derive(
    spec: &KeySpec,
    req: &RequestView<'_>,
    ipv6_prefix: u8,
    anonymous: bool,
    out: &mut String,
) -> Derived {
    for (i, part) in spec.parts.iter().enumerate() {
        if i > 0 {
            out.push(PART_SEPARATOR);
        }
        let tagged = part.alternatives.len() > 1;
        let mut found = false;
        for source in &part.alternatives {
            let mark = out.len();
            if tagged {
                out.push_str(&source.spec());
                out.push(TAG_SEPARATOR);
            }
            match append_source(source, req, ipv6_prefix, out) {
                Found::Appended => {
                    found = true;
                    break;
                }
                Found::Absent => out.truncate(mark),
                Found::Ambiguous => return Derived::Ambiguous(source.clone()),
            }
        }
        if !found {
            if anonymous {
                out.push_str(ANONYMOUS_MARK);
            } else {
                return Derived::Missing;
            }
        }
    }
    Derived::Present
}

/// A header or query parameter that may be sent more than once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Single<T> {
    /// Not sent (or, for a header, sent empty).
    Absent,
    /// Sent once, or repeated with the same value.
    One(T),
    /// Repeated with different values.
    Conflicting,
}

/// The one value of header `name`.
pub fn single_header<'h>(
    headers: &'h http::HeaderMap,
    name: &http::HeaderName,
) -> Single<&'h [u8]> {
    // Spaces and tabs around a value are not part of it (RFC 9110 5.5): HTTP/1.1 parsers drop
    // them, HTTP/2 hands them over, and an upstream reads `" k"` as `k`.
    let mut values = headers
        .get_all(name)
        .iter()
        .map(|v| v.as_bytes().trim_ascii());
    let Some(first) = values.next() else {
        return Single::Absent;
    };
    if values.any(|other| other != first) {
        return Single::Conflicting;
    }
    if first.is_empty() {
        Single::Absent
    } else {
        Single::One(first)
    }
}

fn append_source(
    source: &KeySource,
    req: &RequestView<'_>,
    ipv6_prefix: u8,
    out: &mut String,
) -> Found {
    let mut append = |value: &[u8]| {
        append_normalized(value, out);
        Found::Appended
    };
    match source {
        KeySource::Ip => {
            append_ip(req.client_ip, ipv6_prefix, out);
            Found::Appended
        }
        KeySource::Header(name) => match single_header(req.headers, name) {
            Single::One(v) => append(v),
            Single::Absent => Found::Absent,
            Single::Conflicting => Found::Ambiguous,
        },
        KeySource::Query(name) => match req.query.map(|q| query_single(q, name)) {
            Some(Single::One(v)) if !v.is_empty() => append(&v),
            Some(Single::Conflicting) => Found::Ambiguous,
            _ => Found::Absent,
        },
        KeySource::Path => append(req.path.as_bytes()),
        KeySource::PathParam(name) => match req.path_params.and_then(|c| c.name(name)) {
            Some(m) if !m.as_str().is_empty() => {
                append(&crate::normalize::decode_component(m.as_str()))
            }
            _ => Found::Absent,
        },
        KeySource::Method => append(req.method.as_bytes()),
        KeySource::Host => match req.host {
            Some(h) if !h.is_empty() => append(h.as_bytes()),
            _ => Found::Absent,
        },
        KeySource::Literal(text) => append(text.as_bytes()),
    }
}

/// IPv4 as written; IPv6 grouped by its first `ipv6_prefix` bits, as `net/len`.
pub fn append_ip(ip: IpAddr, ipv6_prefix: u8, out: &mut String) {
    match ip {
        IpAddr::V4(v4) => push_ipv4(v4, out),
        IpAddr::V6(v6) if ipv6_prefix >= 128 => {
            let _ = write!(out, "{v6}");
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if ipv6_prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(ipv6_prefix))
            };
            let _ = write!(out, "{}/{}", Ipv6Addr::from(bits & mask), ipv6_prefix);
        }
    }
}

/// Appends an IPv4 address in dotted decimal, as `Display` writes it (without the formatting
/// machinery: every request keyed by `ip` and every proxied request's X-Forwarded-For does this).
pub fn push_ipv4(ip: std::net::Ipv4Addr, out: &mut String) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// Appends an address as `Display` writes it (IPv4 without the formatting machinery).
pub fn push_ip(ip: IpAddr, out: &mut String) {
    match ip {
        IpAddr::V4(v4) => push_ipv4(v4, out),
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Whether a value may appear in a bucket key as written: short printable ASCII without
/// spaces and without the characters that carry meaning in keys (`{`, `}`, `|`, `#`).
pub fn is_plain(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_PLAIN_LEN
        && value
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && !matches!(b, b'{' | b'}' | b'|' | b'#'))
}

/// Appends `value` as written when plain, else `#` and 32 hex digits of its SHA-256.
pub fn append_normalized(value: &[u8], out: &mut String) {
    if is_plain(value) {
        // Plain values are ASCII by construction.
        out.extend(value.iter().map(|&b| b as char));
    } else {
        out.push('#');
        let digest = Sha256::digest(value);
        for byte in &digest[..16] {
            let _ = write!(out, "{byte:02x}");
        }
    }
}

/// Appends a value given as text for `source` (admin `/v1/check`): an IP address for an `ip`
/// source is grouped like a client's; anything else is normalised as usual.
fn append_given_source(source: &KeySource, raw: &str, ipv6_prefix: u8, out: &mut String) {
    if *source == KeySource::Ip {
        if let Ok(ip) = raw.trim().parse::<IpAddr>() {
            append_ip(canonical(ip), ipv6_prefix, out);
            return;
        }
    }
    append_normalized(raw.as_bytes(), out);
}

/// As [`append_given_source`], for a value an operator names a bucket by (config overrides,
/// admin `?key=`): a value for an `ip` source that is no IP address names no bucket.
fn append_named_source(
    source: &KeySource,
    raw: &str,
    ipv6_prefix: u8,
    out: &mut String,
) -> Result<(), String> {
    // The value as a request's would be written: a request's method, host and path are
    // normalised before keys are derived, so a name for them is normalised the same way.
    let normal: Cow<'_, str> = match source {
        KeySource::Ip if raw.trim().parse::<IpAddr>().is_err() => {
            return Err(format!(
                "{raw:?} is not an IP address, so no client's ip part can be it"
            ))
        }
        KeySource::Method => Cow::Owned(raw.to_ascii_uppercase()),
        KeySource::Host => Cow::Owned(
            crate::normalize::host(raw)
                .map_err(|e| format!("{raw:?} is not a host a request can have: {e}"))?,
        ),
        KeySource::Path => crate::normalize::path(raw, crate::normalize::EscapedSlashes::Keep)
            .map_err(|e| format!("{raw:?} is not a path a request can have: {e}"))?,
        _ => Cow::Borrowed(raw),
    };
    append_given_source(source, &normal, ipv6_prefix, out);
    Ok(())
}

/// The source an alternative's written spec names (`header:X-Api-Key` and `header:x-api-key`
/// are one source).
fn source_named<'p>(part: &'p KeyPart, spec: &str) -> Option<&'p KeySource> {
    let canonical = match spec.split_once(':') {
        Some(("header", name)) => format!("header:{}", name.to_ascii_lowercase()),
        _ => spec.to_string(),
    };
    part.alternatives.iter().find(|a| a.spec() == canonical)
}

/// Appends one part's value written as text: `#anonymous` is the anonymous bucket; a part with
/// alternatives needs `SOURCE=VALUE`; a part with one source takes `VALUE` or `SOURCE=VALUE`.
pub fn append_given(
    part: &KeyPart,
    raw: &str,
    ipv6_prefix: u8,
    out: &mut String,
) -> Result<(), String> {
    if raw == ANONYMOUS_MARK {
        out.push_str(ANONYMOUS_MARK);
        return Ok(());
    }
    let tagged = raw
        .split_once(TAG_SEPARATOR)
        .and_then(|(spec, value)| source_named(part, spec).map(|s| (s, value)));
    match (part.alternatives.as_slice(), tagged) {
        ([only], None) => append_named_source(only, raw, ipv6_prefix, out),
        ([only], Some((_, value))) => append_named_source(only, value, ipv6_prefix, out),
        (_, Some((source, value))) if !value.is_empty() => {
            out.push_str(&source.spec());
            out.push(TAG_SEPARATOR);
            append_named_source(source, value, ipv6_prefix, out)
        }
        (alternatives, _) => {
            let specs: Vec<String> = alternatives.iter().map(KeySource::spec).collect();
            Err(format!(
                "key part {:?} has alternatives: write which one the value is for, as \
                 SOURCE=VALUE with SOURCE one of {specs:?} (got {raw:?})",
                specs.join("|")
            ))
        }
    }
}

/// The key value of `spec` from values given per part, in order (admin `?key=A&key=B`,
/// config overrides `"A|B"`).
pub fn value_from_parts<S: AsRef<str>>(
    spec: &KeySpec,
    given: &[S],
    ipv6_prefix: u8,
) -> Result<String, String> {
    if given.len() != spec.parts.len() {
        return Err(format!(
            "the key has {} part(s), got {} value(s)",
            spec.parts.len(),
            given.len()
        ));
    }
    let mut out = String::new();
    for (i, (part, raw)) in spec.parts.iter().zip(given).enumerate() {
        if i > 0 {
            out.push(PART_SEPARATOR);
        }
        append_given(part, raw.as_ref(), ipv6_prefix, &mut out)?;
    }
    Ok(out)
}

/// The key value of `spec` from values given by source (`{"ip": "1.2.3.4", "header:x-k": "v"}`,
/// admin `/v1/check`): each part takes its first alternative present, tagged as [`derive`]
/// tags it. Returns false when a part is missing (and `anonymous` is false).
pub fn derive_from_sources(
    spec: &KeySpec,
    given: &std::collections::HashMap<String, String>,
    ipv6_prefix: u8,
    anonymous: bool,
    out: &mut String,
) -> bool {
    let lookup = |source: &KeySource| given.get(&source.spec()).map(String::as_str);
    let append = |source: &KeySource, raw: &str, out: &mut String| {
        append_given_source(source, raw, ipv6_prefix, out);
        Ok(())
    };
    derive_given(spec, lookup, anonymous, out, append).unwrap_or(false)
}

/// The key value of `spec` from values named per source (the rate-limit service: descriptor
/// entries mapped by `as:`), written exactly as a request's would be (header values trimmed;
/// method, host and path normalised; an `ip` value must be an address), so a descriptor and a
/// request with the same value count against one bucket. `Ok(false)`: a part is missing.
pub fn derive_from_named(
    spec: &KeySpec,
    given: &[(&KeySource, &str)],
    ipv6_prefix: u8,
    anonymous: bool,
    out: &mut String,
) -> Result<bool, String> {
    let lookup = |source: &KeySource| given.iter().find(|(s, _)| *s == source).map(|(_, v)| *v);
    let append = |source: &KeySource, raw: &str, out: &mut String| {
        append_named_source(source, raw, ipv6_prefix, out)
    };
    derive_given(spec, lookup, anonymous, out, append)
}

/// Each part's first alternative with a value (`lookup`; a literal always has one; header
/// values trimmed as a request's are), tagged when the part has alternatives, written by
/// `append`. `Ok(false)`: a part has no value and `anonymous` is false.
fn derive_given<'v>(
    spec: &KeySpec,
    lookup: impl Fn(&KeySource) -> Option<&'v str>,
    anonymous: bool,
    out: &mut String,
    append: impl Fn(&KeySource, &str, &mut String) -> Result<(), String>,
) -> Result<bool, String> {
    for (i, part) in spec.parts.iter().enumerate() {
        if i > 0 {
            out.push(PART_SEPARATOR);
        }
        let found = part.alternatives.iter().find_map(|source| {
            let raw = match source {
                KeySource::Literal(text) => text.as_str(),
                KeySource::Header(_) => lookup(source)?.trim_matches([' ', '\t']),
                other => lookup(other)?,
            };
            (!raw.is_empty()).then_some((source, raw))
        });
        match found {
            Some((source, raw)) => {
                if part.alternatives.len() > 1 {
                    out.push_str(&source.spec());
                    out.push(TAG_SEPARATOR);
                }
                append(source, raw, out)?;
            }
            None if anonymous => out.push_str(ANONYMOUS_MARK),
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// The one percent-decoded value of query parameter `name` (names are compared decoded:
/// `us%65r` is `user`).
pub fn query_single(query: &str, name: &str) -> Single<Vec<u8>> {
    let mut found: Option<Vec<u8>> = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k.as_bytes()) != name.as_bytes() {
            continue;
        }
        let value = percent_decode(v.as_bytes());
        match &found {
            Some(first) if *first != value => return Single::Conflicting,
            Some(_) => {}
            None => found = Some(value),
        }
    }
    found.map_or(Single::Absent, Single::One)
}

/// The percent-decoded value of the first query parameter `name`, if present.
pub fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k.as_bytes()) == name.as_bytes()).then(|| percent_decode(v.as_bytes()))
    })
}

fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (
                    input.get(i + 1).and_then(|&c| hex(c)),
                    input.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The client's address: the direct peer, unless the peer is a trusted proxy, in which case
/// X-Forwarded-For is read right to left and the first untrusted address is the client. If every
/// hop is trusted the leftmost is taken; an unparsable hop stops the walk at the last good one.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[IpNet],
) -> IpAddr {
    client_ip_and_trust(peer, || forwarded_for, trusted).ip
}

/// The client's address, and whether the direct peer is a trusted proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp {
    /// As [`client_ip`] finds it.
    pub ip: IpAddr,
    /// The direct peer (canonical) is in the trusted list: its X-Forwarded-For was read, and a
    /// limit's `cost_header` is believed.
    pub peer_trusted: bool,
}

/// As [`client_ip`], also telling whether the direct peer is trusted (found on the way: the
/// trusted list is searched once for the peer). The X-Forwarded-For values are looked up
/// (`forwarded_for` called) only when the peer is trusted.
pub fn client_ip_and_trust<'a, I>(
    peer: IpAddr,
    forwarded_for: impl FnOnce() -> I,
    trusted: &[IpNet],
) -> ClientIp
where
    I: DoubleEndedIterator<Item = &'a [u8]>,
{
    let peer = canonical(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return ClientIp {
            ip: peer,
            peer_trusted: false,
        };
    }
    let found = |ip| ClientIp {
        ip,
        peer_trusted: true,
    };
    let mut client = peer;
    for header in forwarded_for().rev() {
        // Hop by hop from the right, each decoded on its own: a hop that is not UTF-8 is one
        // unparsable hop (the walk stops there), not a reason to discard the good ones.
        for hop in header.rsplit(|b| *b == b',') {
            match std::str::from_utf8(hop)
                .ok()
                .and_then(|h| parse_hop(h.trim()))
            {
                Some(ip) => {
                    client = canonical(ip);
                    if !is_trusted(&client) {
                        return found(client);
                    }
                }
                None => return found(client),
            }
        }
    }
    found(client)
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) count as the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// A hop that is not UTF-8 is unparsable like any other: the walk stops at the last good
    /// address to its right (the hop the trusted proxy appended), never at the proxy itself.
    #[test]
    fn a_non_utf8_hop_stops_the_walk_at_the_last_good_address() {
        let trusted = nets(&["127.0.0.1/32"]);
        let peer = ip("127.0.0.1");
        let one = |value: &'static [u8]| client_ip(peer, [value].into_iter(), &trusted);
        assert_eq!(one(b"\xff, 203.0.113.9"), ip("203.0.113.9"));
        assert_eq!(one(b"\xff"), peer, "nothing good to its right: the peer");
        assert_eq!(
            one(b"198.51.100.7, \xe9t\xe9, 203.0.113.9"),
            ip("203.0.113.9")
        );
        // Several headers: a bad byte in an earlier (leftmost) one does not hide later ones.
        let two: [&[u8]; 2] = [b"\xff\xfe", b"203.0.113.9"];
        assert_eq!(
            client_ip(peer, two.into_iter(), &trusted),
            ip("203.0.113.9")
        );
        // A trusted hop to the right of the bad one: the walk goes on to it and stops at the bad.
        let chain: [&[u8]; 1] = [b"198.51.100.7, \xff, 127.0.0.1"];
        assert_eq!(
            client_ip(peer, chain.into_iter(), &trusted),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.0.255",
            "127.0.0.1",
            "192.168.100.9",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let ip = ip(text);
            let mut out = String::new();
            push_ip(ip, &mut out);
            assert_eq!(out, ip.to_string());
        }
        for n in (0..=u32::MAX).step_by(9_973_331) {
            let v4 = std::net::Ipv4Addr::from(n);
            let mut out = String::new();
            push_ipv4(v4, &mut out);
            assert_eq!(out, v4.to_string());
        }
    }

    #[test]
    fn parses_parts_and_alternatives() {
        let part = parse_part("header:x-api-key|header:x-user-id|ip").expect("parse");
        assert_eq!(part.alternatives.len(), 3);
        assert_eq!(part.alternatives[2], KeySource::Ip);
        assert!(parse_part("cookie:session").is_err());
        assert!(parse_part("header:").is_err());
        assert!(parse_part("ip:x").is_err());
        assert!(parse_part("header:bad name").is_err());
    }

    #[test]
    fn untrusted_peer_ignores_forwarded_for() {
        let got = client_ip(ip("203.0.113.9"), [&b"1.1.1.1"[..]].into_iter(), &[]);
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn trusted_peer_takes_rightmost_untrusted() {
        let trusted = nets(&["10.0.0.0/8"]);
        let xff: [&[u8]; 2] = [b"6.6.6.6, 1.2.3.4", b"10.1.1.1"];
        assert_eq!(
            client_ip(ip("10.0.0.1"), xff.into_iter(), &trusted),
            ip("1.2.3.4"),
            "the spoofed leftmost entry is never used"
        );
        let all_trusted: [&[u8]; 1] = [b"10.9.9.9, 10.1.1.1"];
        assert_eq!(
            client_ip(ip("10.0.0.1"), all_trusted.into_iter(), &trusted),
            ip("10.9.9.9")
        );
        let garbage: [&[u8]; 1] = [b"1.2.3.4, nonsense"];
        assert_eq!(
            client_ip(ip("10.0.0.1"), garbage.into_iter(), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn ipv6_is_grouped_by_prefix_and_mapped_v4_is_v4() {
        let mut out = String::new();
        append_ip(ip("2001:db8:1:2:3:4:5:6"), 64, &mut out);
        assert_eq!(out, "2001:db8:1:2::/64");
        assert_eq!(canonical(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
    }

    #[test]
    fn odd_values_are_hashed() {
        let mut out = String::new();
        append_normalized(b"plain-key_1.x", &mut out);
        assert_eq!(out, "plain-key_1.x");
        for odd in [
            &b"has space"[..],
            b"{tag}",
            b"a|b",
            &[0xff, 0x00],
            &[b'a'; 65],
        ] {
            let mut out = String::new();
            append_normalized(odd, &mut out);
            assert!(out.starts_with('#') && out.len() == 33, "{out}");
        }
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value("a=1&user=bob%20smith&b", "user"),
            Some(b"bob smith".to_vec())
        );
        assert_eq!(query_value("a=1", "user"), None);
        assert_eq!(query_value("a=%zz", "a"), Some(b"%zz".to_vec()));
    }
}
