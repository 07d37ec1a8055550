//! Request normalisation: the one spelling of a request's path, host and method that routing,
//! key derivation, the admin API and the upstream all see. Paths follow RFC 3986 6.2.2
//! (percent-encoded unreserved characters decoded, other escapes upper-cased, dot segments
//! resolved) with merged slashes; an encoded `/` or `\` follows [`EscapedSlashes`]. Hosts lose
//! case, port and a trailing dot; methods are compared and forwarded upper-case.

use std::borrow::Cow;

/// What to do with `%2F` (`/`) and `%5C` (`\`) in a path, and a raw `\`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Answer 400: the safe default, since upstreams disagree on whether `%2F` separates
    /// segments (Envoy's `REJECT_REQUEST`).
    #[default]
    Reject,
    /// Keep them escaped (upper-case) as part of a segment: neither routing nor the upstream
    /// treats them as separators (Envoy's `KEEP_UNCHANGED`, for APIs whose identifiers hold `/`).
    Keep,
    /// Decode both to `/` before merging slashes and resolving dot segments (Envoy's
    /// `UNESCAPE_AND_FORWARD`).
    Decode,
}

impl EscapedSlashes {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "reject" => Some(EscapedSlashes::Reject),
            "keep" => Some(EscapedSlashes::Keep),
            "decode" => Some(EscapedSlashes::Decode),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EscapedSlashes::Reject => "reject",
            EscapedSlashes::Keep => "keep",
            EscapedSlashes::Decode => "decode",
        }
    }
}

/// Why a path has no normal form: the request is answered 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has a '%' that is not followed by two hex digits")]
    BadPercentEncoding,
    #[error("the path has an encoded '/' or '\\' (server.escaped_slashes: reject)")]
    EscapedSlash,
    #[error("the path does not start with '/'")]
    NotAbsolute,
}

impl PathError {
    /// A stable code for problem bodies and logs.
    pub fn code(self) -> &'static str {
        match self {
            PathError::BadPercentEncoding => "bad_percent_encoding",
            PathError::EscapedSlash => "escaped_slash",
            PathError::NotAbsolute => "bad_path",
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A byte a path may hold as it is (RFC 3986 `pchar` and `/`, plus `%` of an escape).
fn allowed_raw(b: u8) -> bool {
    unreserved(b) || b"!$&'()*+,;=:@/%".contains(&b)
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Whether `path` is already in normal form, judged cheaply: no escapes, only bytes a path may
/// hold as they are, no empty segment and no segment starting with a dot.
fn plainly_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.first() == Some(&b'/')
        && bytes.iter().all(|&b| b != b'%' && allowed_raw(b))
        && !bytes
            .windows(2)
            .any(|w| w[0] == b'/' && (w[1] == b'/' || w[1] == b'.'))
}

/// The normal form of an origin-form path (no query). `*` (OPTIONS) is kept as it is.
pub fn path(raw: &str, slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    if raw == "*" || plainly_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    if raw.is_empty() {
        return Ok(Cow::Borrowed("/"));
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Escapes: unreserved decoded, the rest upper-cased; slashes by policy.
    let bytes = raw.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) else {
                    return Err(PathError::BadPercentEncoding);
                };
                let value = h * 16 + l;
                if unreserved(value) {
                    decoded.push(value);
                } else if value == b'/' || value == b'\\' {
                    match slashes {
                        EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                        EscapedSlashes::Decode => decoded.push(b'/'),
                        EscapedSlashes::Keep => decoded.extend_from_slice(&[
                            b'%',
                            HEX_UPPER[h as usize],
                            HEX_UPPER[l as usize],
                        ]),
                    }
                } else {
                    decoded.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[h as usize],
                        HEX_UPPER[l as usize],
                    ]);
                }
                i += 3;
            }
            b'\\' => {
                match slashes {
                    EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                    EscapedSlashes::Decode => decoded.push(b'/'),
                    EscapedSlashes::Keep => decoded.extend_from_slice(b"%5C"),
                }
                i += 1;
            }
            b if allowed_raw(b) => {
                decoded.push(b);
                i += 1;
            }
            // Anything else (non-ASCII, `"`, `{`, ...) has one spelling: escaped, upper-case.
            b => {
                decoded.extend_from_slice(&[
                    b'%',
                    HEX_UPPER[(b >> 4) as usize],
                    HEX_UPPER[(b & 15) as usize],
                ]);
                i += 1;
            }
        }
    }
    // 2. Segments: empty ones merged, `.` dropped, `..` removes its parent (never above root).
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split(|&b| b == b'/').skip(1) {
        match segment {
            b"" => trailing_slash = true,
            b"." => trailing_slash = true,
            b".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        // Every byte is ASCII: raw bytes are allowed ASCII or escaped, escapes decode only to
        // unreserved ASCII.
        out.extend(segment.iter().map(|&b| b as char));
    }
    if segments.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Percent-decodes a value taken from a normalised path (`path_param:`), bytes as they are.
pub fn decode_component(value: &str) -> Cow<'_, [u8]> {
    if !value.contains('%') {
        return Cow::Borrowed(value.as_bytes());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(out)
}

/// Why a Host (or a target's authority) has no normal form: answered 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HostError(pub &'static str);

/// The request's host: lower-case, without port and without a trailing dot. Only what RFC 3986
/// allows a Host to be is accepted: a name of letters, digits, `-`, `_` and `.` with no empty
/// label, an IPv4 address, or a bracketed IPv6 address, each with an optional numeric port.
/// Anything else (`api.example.com:abc`, `a..b`, `a/b`, an empty Host) is refused, since an
/// upstream may read it differently (NGINX cuts a Host at its first `:`).
pub fn host(raw: &str) -> Result<String, HostError> {
    let port_ok = |port: &str| port.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or(HostError("an IPv6 Host needs its closing ']'"))?;
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        if !port_ok || inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(HostError(
                "the Host is not [IPv6] with an optional numeric port",
            ));
        }
        return Ok(inside.to_ascii_lowercase());
    }
    let bytes = raw.as_bytes();
    let name = match bytes.iter().position(|&b| b == b':') {
        Some(colon) if port_ok(&raw[colon + 1..]) => &bytes[..colon],
        Some(_) => return Err(HostError("the Host's port is not a number")),
        None => bytes,
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(HostError("the Host is empty"));
    }
    // Every label non-empty, of letters, digits, '-' and '_' (one pass over the bytes).
    let mut label_len = 0usize;
    for &b in name {
        let ok = if b == b'.' {
            let had = label_len > 0;
            label_len = 0;
            had
        } else {
            label_len += 1;
            b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
        };
        if !ok {
            return Err(HostError(
                "the Host holds an empty label or a character other than letters, digits, '-', '_' and '.'",
            ));
        }
    }
    if label_len == 0 {
        return Err(HostError(
            "the Host holds an empty label or a character other than letters, digits, '-', '_' and '.'",
        ));
    }
    // `name` is a prefix of `raw`, all ASCII by the check above.
    Ok(raw[..name.len()].to_ascii_lowercase())
}

/// The upper-case spelling of a method when it is written otherwise (`post` -> `POST`).
pub fn method(method: &http::Method) -> Option<http::Method> {
    let text = method.as_str();
    if !text.bytes().any(|b| b.is_ascii_lowercase()) {
        return None;
    }
    http::Method::from_bytes(text.to_ascii_uppercase().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        path(p, EscapedSlashes::Reject).map(Cow::into_owned)
    }

    #[test]
    fn spellings_of_one_path_agree() {
        for spelling in [
            "/static/report.txt",
            "/static//report.txt",
            "//static/report.txt",
            "/static/./report.txt",
            "/static/%72eport.txt",
            "/static/x/../report.txt",
            "/static/x/y/../../report.txt",
            "/./static/report.txt",
            "/../static/report.txt",
            "/%73tatic/report%2Etxt",
            "/static/%2e/report.txt",
            "/static/x/%2E%2E/report.txt",
        ] {
            assert_eq!(
                norm(spelling).as_deref(),
                Ok("/static/report.txt"),
                "{spelling}"
            );
        }
    }

    #[test]
    fn trailing_slashes_and_root() {
        assert_eq!(norm("/a/").as_deref(), Ok("/a/"));
        assert_eq!(norm("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(norm("/a/.").as_deref(), Ok("/a/"));
        assert_eq!(norm("/..").as_deref(), Ok("/"));
        assert_eq!(norm("//").as_deref(), Ok("/"));
        assert_eq!(norm("").as_deref(), Ok("/"));
        assert_eq!(norm("*").as_deref(), Ok("*"));
        assert_eq!(norm("/.well-known/x").as_deref(), Ok("/.well-known/x"));
        assert_eq!(norm("/a..b/...").as_deref(), Ok("/a..b/..."));
    }

    #[test]
    fn reserved_escapes_are_upper_cased_not_decoded() {
        assert_eq!(norm("/a%3fb%c3%a9").as_deref(), Ok("/a%3Fb%C3%A9"));
        assert_eq!(norm("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(norm("/a%00").as_deref(), Ok("/a%00"));
    }

    #[test]
    fn raw_bytes_outside_a_path_are_escaped() {
        assert_eq!(norm("/caf\u{e9}").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(norm("/caf%c3%a9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(norm("/a\"b{c}").as_deref(), Ok("/a%22b%7Bc%7D"));
        assert_eq!(
            norm("/a:b@c!$&'()*+,;=").as_deref(),
            Ok("/a:b@c!$&'()*+,;=")
        );
    }

    #[test]
    fn bad_escapes_are_errors() {
        assert_eq!(norm("/a%"), Err(PathError::BadPercentEncoding));
        assert_eq!(norm("/a%4"), Err(PathError::BadPercentEncoding));
        assert_eq!(norm("/a%zz"), Err(PathError::BadPercentEncoding));
        assert_eq!(norm("a/b"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn escaped_slash_policy() {
        for p in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a\\b"] {
            assert_eq!(norm(p), Err(PathError::EscapedSlash), "{p}");
        }
        let keep = |p| path(p, EscapedSlashes::Keep).map(Cow::into_owned);
        assert_eq!(keep("/a%2fb").as_deref(), Ok("/a%2Fb"));
        assert_eq!(keep("/a\\b").as_deref(), Ok("/a%5Cb"));
        assert_eq!(keep("/x/..%2f").as_deref(), Ok("/x/..%2F"));
        let decode = |p| path(p, EscapedSlashes::Decode).map(Cow::into_owned);
        assert_eq!(decode("/a%2F%2Fb").as_deref(), Ok("/a/b"));
        assert_eq!(decode("/x/..%2Fy").as_deref(), Ok("/y"));
        assert_eq!(decode("/a%5c..%5cb").as_deref(), Ok("/b"));
    }

    #[test]
    fn normal_form_is_a_fixed_point() {
        for p in ["/a/b", "/a%3Fb", "/a/", "/", "/a%2Fb"] {
            let once = path(p, EscapedSlashes::Keep).map(Cow::into_owned);
            let twice = once
                .as_deref()
                .map(|o| path(o, EscapedSlashes::Keep).map(Cow::into_owned));
            assert_eq!(twice, once.as_deref().map(|o| Ok(o.to_string())), "{p}");
        }
    }

    #[test]
    fn hosts_lose_case_port_and_trailing_dot() {
        let ok = |h: &str| host(h).unwrap_or_else(|e| panic!("{h}: {e}"));
        assert_eq!(ok("API.Example.com:8080"), "api.example.com");
        assert_eq!(ok("api.example.com."), "api.example.com");
        assert_eq!(ok("api.example.com.:443"), "api.example.com");
        assert_eq!(ok("api.example.com:"), "api.example.com");
        assert_eq!(ok("[::1]:80"), "::1");
        assert_eq!(ok("[2001:DB8::1]"), "2001:db8::1");
        assert_eq!(ok("localhost"), "localhost");
        assert_eq!(ok("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(ok("my_host"), "my_host");
    }

    #[test]
    fn hosts_an_upstream_could_read_otherwise_are_refused() {
        for bad in [
            "",
            ".",
            "api.example.com:abc",
            "api.example.com:80:80",
            "API.example.com:x",
            "api.example.com..",
            "a..b",
            ".a",
            "api.example.com/x",
            "a?b",
            "a#b",
            "a;b",
            "a,b",
            "a b",
            "[::1",
            "[::1]x",
            "[not-v6]",
            "[::1]:x",
        ] {
            assert!(host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn methods_are_upper_cased() {
        let post: http::Method = "post".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(method(&post), Some(http::Method::POST));
        assert_eq!(method(&http::Method::GET), None);
        let custom: http::Method = "Purge".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(method(&custom).as_ref().map(|m| m.as_str()), Some("PURGE"));
    }

    #[test]
    fn path_param_values_are_decoded() {
        assert_eq!(&*decode_component("b%6Fb"), b"bob");
        assert_eq!(&*decode_component("a%20b"), b"a b");
        assert_eq!(&*decode_component("plain"), b"plain");
        assert_eq!(&*decode_component("50%"), b"50%");
    }
}
