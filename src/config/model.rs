//! The validated config model: what the gateway runs on. Built from the wire structs by
//! [`build`], which reports every problem it finds, each with its field path.

use super::error::Problem;
use super::raw::*;
use crate::keys::{self, KeyPart, KeySpec};
pub use crate::limiter::settings::{
    BreakerConfig, Fallback, RedisConfig, RedisMode, StoreConfig, StoreKindConfig,
};
use crate::limiter::{Algorithm, CostHeaderFrom, Limit, OnMissingKey, Policy, Rate};
use crate::routes::{HeaderFlags, HostMatch, PathMatch, Route, RouteMatch, Router};
use crate::tls::{CertPaths, MinVersion, TlsListen};
use crate::upstream::{Target, Upstream, UpstreamTls};
use ipnet::IpNet;
use regex::Regex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
pub const DEFAULT_MAX_BUCKETS: u64 = 1_000_000;

/// A loaded, validated config: one generation of what the gateway runs.
#[derive(Debug)]
pub struct Config {
    pub listen: Vec<Listen>,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub breaker: BreakerConfig,
    pub client_ip: ClientIpConfig,
    pub server: ServerSettings,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub router: Router,
    /// The Envoy rate-limit service (`rls`), when configured.
    pub rls: Option<super::rls::RlsConfig>,
    /// Level of the per-request access-log line (`None`: off).
    pub access_log: Option<tracing::Level>,
}

/// One listener of the proxy: plain HTTP, or TLS with its certificate pairs (read and checked
/// when the config is built).
#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: Option<TlsListen>,
}

impl Listen {
    /// Same address, TLS files and version: what only a restart changes.
    pub fn same_shape(&self, other: &Listen) -> bool {
        self.address == other.address
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some(a), Some(b)) => a.same_shape(b),
                _ => false,
            }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIpConfig {
    pub trusted_proxies: Vec<IpNet>,
    pub ipv6_prefix: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    /// Worker threads of the proxy (0 = one per core).
    pub threads: usize,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// What a path's `%2F`, `%5C` and `\` mean.
    pub escaped_slashes: crate::normalize::EscapedSlashes,
    /// Plain listeners also accept HTTP/2 with prior knowledge (read once at start).
    pub h2c: bool,
}

/// Collects problems while building.
#[derive(Default)]
struct Check {
    problems: Vec<Problem>,
}

impl Check {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::at(path, message));
    }
}

/// Names of routes, limits and upstreams appear in bucket keys and metric labels.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) const NAME_RULE: &str = "must be 1-64 characters of A-Z, a-z, 0-9, '-', '_' or '.'";

fn socket_addr(check: &mut Check, path: &str, text: &str) -> Option<SocketAddr> {
    match text.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Some(addr),
        Ok(None) => {
            check.err(path, format!("{text:?} resolves to no address"));
            None
        }
        Err(e) => {
            check.err(path, format!("expected HOST:PORT, got {text:?} ({e})"));
            None
        }
    }
}

fn positive_ms(check: &mut Check, path: &str, value: Option<u64>, default: u64) -> Duration {
    match value {
        Some(0) => {
            check.err(path, "must be greater than 0");
            Duration::from_millis(default)
        }
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_millis(default),
    }
}

/// Validates a parsed file into a [`Config`], or returns every problem found.
/// Whether two listening sockets would fight over one port: the same port (not 0, which the
/// kernel picks) on the same address, or where one is a wildcard that covers the other (`0.0.0.0`
/// covers IPv4; `[::]` covers both families, the kernel's default being dual-stack). An
/// IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`, `[::ffff:0.0.0.0]`) is the IPv4 address it
/// maps; IPv6 addresses with different interface scopes (`fe80::1%1`, `fe80::1%2`) are apart.
pub fn sockets_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    if let (SocketAddr::V6(x), SocketAddr::V6(y)) = (a, b) {
        if x.scope_id() != 0 && y.scope_id() != 0 && x.scope_id() != y.scope_id() {
            return false;
        }
    }
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    // `wild` covers `other`: an IPv4 wildcard covers IPv4 addresses, `[::]` every address.
    let covers = |wild: std::net::IpAddr, other: std::net::IpAddr| {
        wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    ia == ib || covers(ia, ib) || covers(ib, ia)
}

pub fn build(raw: RawConfig) -> Result<Config, Vec<Problem>> {
    let mut check = Check::default();

    let raw_listen = raw
        .listen
        .unwrap_or_else(|| vec![RawListen::Plain(DEFAULT_LISTEN.to_string())]);
    if raw_listen.is_empty() {
        check.err("listen", "needs at least one address");
    }
    let listen: Vec<Listen> = raw_listen
        .into_iter()
        .enumerate()
        .filter_map(|(i, l)| build_listen(&mut check, i, l))
        .collect();
    for (i, l) in listen.iter().enumerate() {
        if let Some(earlier) = listen[..i]
            .iter()
            .find(|e| sockets_collide(e.address, l.address))
        {
            let message = if earlier.address == l.address {
                format!("{} is listed twice", l.address)
            } else {
                format!(
                    "{} takes the same port as {}: only one can be bound",
                    l.address, earlier.address
                )
            };
            check.err(format!("listen[{i}]"), message);
        }
    }

    let raw_admin = raw.admin.unwrap_or_default();
    let admin_listen = socket_addr(
        &mut check,
        "admin.listen",
        raw_admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
    );
    if let Some(a) = admin_listen {
        if let Some(l) = listen.iter().find(|l| sockets_collide(l.address, a)) {
            check.err(
                "admin.listen",
                format!(
                    "{a} takes the port of the proxy listener {}: only one can be bound",
                    l.address
                ),
            );
        }
    }
    if let Some(token) = &raw_admin.token {
        if token.trim().is_empty() {
            check.err(
                "admin.token",
                "must not be empty (omit it or use null for no token)",
            );
        }
    }

    let store = build_store(&mut check, raw.store.unwrap_or_default());
    let breaker = build_breaker(&mut check, raw.breaker.unwrap_or_default());
    let client_ip = build_client_ip(&mut check, raw.client_ip.unwrap_or_default());

    let raw_server = raw.server.unwrap_or_default();
    let server = ServerSettings {
        threads: raw_server.threads.unwrap_or(0),
        drain_timeout: Duration::from_millis(raw_server.drain_timeout_ms.unwrap_or(10_000)),
        escaped_slashes: match raw_server.escaped_slashes.as_deref() {
            None => crate::normalize::EscapedSlashes::default(),
            Some(text) => crate::normalize::EscapedSlashes::parse(text).unwrap_or_else(|| {
                check.err(
                    "server.escaped_slashes",
                    format!("expected reject, keep or decode, got {text:?}"),
                );
                crate::normalize::EscapedSlashes::default()
            }),
        },
        h2c: raw_server.h2c.unwrap_or(false),
    };

    let mut upstreams = BTreeMap::new();
    for (name, up) in raw.upstreams {
        let path = format!("upstreams.{name}");
        if !valid_name(&name) {
            check.err(&path, format!("upstream name {NAME_RULE}"));
        }
        if up.targets.is_empty() {
            check.err(format!("{path}.targets"), "needs at least one HOST:PORT");
        }
        let targets: Vec<Target> = up
            .targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| match Target::parse(t) {
                Ok(target) => Some(target),
                Err(msg) => {
                    check.err(format!("{path}.targets[{i}]"), msg);
                    None
                }
            })
            .collect();
        let connect = positive_ms(
            &mut check,
            &format!("{path}.connect_timeout_ms"),
            up.connect_timeout_ms,
            1000,
        );
        let read = positive_ms(
            &mut check,
            &format!("{path}.read_timeout_ms"),
            up.read_timeout_ms,
            30_000,
        );
        let tls = up.tls.map(|t| build_upstream_tls(&mut check, &path, t));
        upstreams.insert(
            name.clone(),
            Arc::new(Upstream::new(name, targets, connect, read).with_transport(tls, up.http2)),
        );
    }

    let rls_headers = raw.rls.as_ref().and_then(|r| r.headers);
    let default_headers = header_flags(
        raw.headers,
        HeaderFlags {
            legacy: true,
            ietf: true,
        },
    );
    let mut seen_routes = HashSet::new();
    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let path = format!("routes[{i}]");
        if !seen_routes.insert(r.name.clone()) {
            check.err(
                format!("{path}.name"),
                format!("duplicate route name {:?}", r.name),
            );
        }
        if let Some(route) = build_route(
            &mut check,
            &path,
            r,
            &upstreams,
            default_headers,
            client_ip.ipv6_prefix,
        ) {
            routes.push(Arc::new(route));
        }
    }

    let rls = raw.rls.and_then(|r| {
        let address = socket_addr(&mut check, "rls.listen", &r.listen);
        if let Some(a) = address {
            if admin_listen.is_some_and(|admin| sockets_collide(admin, a))
                || listen.iter().any(|l| sockets_collide(l.address, a))
            {
                check.err(
                    "rls.listen",
                    format!("{a} is also a proxy or admin listener"),
                );
            }
        }
        let mut problems = Vec::new();
        let built = super::rls::build(
            r,
            address,
            header_flags(rls_headers, default_headers),
            &routes,
            &mut problems,
        );
        for (path, message) in problems {
            check.err(path, message);
        }
        built
    });

    if !check.problems.is_empty() {
        return Err(check.problems);
    }
    let Some(admin_listen) = admin_listen else {
        return Err(vec![Problem::at("admin.listen", "invalid address")]);
    };
    Ok(Config {
        listen,
        admin: AdminConfig {
            listen: admin_listen,
            token: raw_admin.token,
        },
        store,
        breaker,
        client_ip,
        server,
        upstreams,
        router: Router::new(routes),
        rls,
        access_log: match raw.access_log.unwrap_or_default() {
            RawAccessLog::Off => None,
            RawAccessLog::Error => Some(tracing::Level::ERROR),
            RawAccessLog::Warn => Some(tracing::Level::WARN),
            RawAccessLog::Info => Some(tracing::Level::INFO),
            RawAccessLog::Debug => Some(tracing::Level::DEBUG),
            RawAccessLog::Trace => Some(tracing::Level::TRACE),
        },
    })
}

/// `upstreams.NAME.tls`: the CA file is read and parsed now, so a bad one is a load error
/// naming the file and the field, not a failure at the first request.
fn build_upstream_tls(check: &mut Check, path: &str, raw: RawUpstreamTls) -> UpstreamTls {
    let verify = raw.verify.unwrap_or(true);
    if let Some(sni) = &raw.sni {
        let valid = !sni.is_empty()
            && sni.len() <= 253
            && sni
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
        if !valid {
            check.err(
                format!("{path}.tls.sni"),
                format!("expected a host name, got {sni:?}"),
            );
        }
    }
    let ca = match &raw.ca {
        None => None,
        Some(file) => match crate::upstream::load_ca(file) {
            Ok(ca) => Some(ca),
            Err(msg) => {
                check.err(format!("{path}.tls.ca"), msg);
                None
            }
        },
    };
    UpstreamTls {
        sni: raw.sni,
        group_key: UpstreamTls::ca_group_key(ca.as_ref()),
        ca,
        ca_path: raw.ca,
        verify,
    }
}

fn build_listen(check: &mut Check, i: usize, raw: RawListen) -> Option<Listen> {
    let (text, tls, address_path) = match raw {
        RawListen::Plain(text) => (text, None, format!("listen[{i}]")),
        RawListen::Full(full) => (full.address, full.tls, format!("listen[{i}].address")),
    };
    let address = socket_addr(check, &address_path, &text);
    let tls = tls.and_then(|t| build_tls(check, &format!("listen[{i}].tls"), t));
    Some(Listen {
        address: address?,
        tls,
    })
}

fn build_tls(check: &mut Check, path: &str, raw: RawTls) -> Option<TlsListen> {
    let min_version = match raw.min_version {
        None => MinVersion::Tls12,
        Some(v) => {
            let text = match v {
                RawVersion::Text(t) => t,
                RawVersion::Number(n) => n.to_string(),
            };
            match text.as_str() {
                "1.2" => MinVersion::Tls12,
                "1.3" => MinVersion::Tls13,
                _ => {
                    check.err(
                        format!("{path}.min_version"),
                        format!("expected \"1.2\" or \"1.3\", got {text:?}"),
                    );
                    MinVersion::Tls12
                }
            }
        }
    };
    if raw.certs.is_empty() {
        check.err(
            format!("{path}.certs"),
            "needs at least one {cert, key} pair",
        );
        return None;
    }
    let mut certs = Vec::new();
    let mut failed = false;
    for (j, pair) in raw.certs.into_iter().enumerate() {
        let paths = CertPaths {
            cert: pair.cert.into(),
            key: pair.key.into(),
        };
        match crate::tls::load_pair(&paths) {
            Ok(loaded) => certs.push(loaded),
            Err(e) => {
                failed = true;
                check.err(format!("{path}.certs[{j}].{}", e.field()), e.message());
            }
        }
    }
    if failed {
        return None;
    }
    Some(TlsListen { certs, min_version })
}

fn header_flags(raw: Option<RawHeaders>, base: HeaderFlags) -> HeaderFlags {
    match raw {
        None => base,
        Some(h) => HeaderFlags {
            legacy: h.legacy.unwrap_or(base.legacy),
            ietf: h.ietf.unwrap_or(base.ietf),
        },
    }
}

fn build_store(check: &mut Check, raw: RawStore) -> StoreConfig {
    let raw_redis = raw.redis.unwrap_or_default();
    let mode = match raw_redis.mode {
        RawRedisMode::Standalone => RedisMode::Standalone,
        RawRedisMode::Cluster => RedisMode::Cluster,
        RawRedisMode::Sentinel => RedisMode::Sentinel,
    };
    let urls = raw_redis
        .urls
        .unwrap_or_else(|| vec!["redis://127.0.0.1:6379".to_string()]);
    if urls.is_empty() {
        check.err("store.redis.urls", "needs at least one URL");
    }
    for (i, url) in urls.iter().enumerate() {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            check.err(
                format!("store.redis.urls[{i}]"),
                format!("expected redis://HOST:PORT or rediss://HOST:PORT, got {url:?}"),
            );
        }
    }
    if mode == RedisMode::Sentinel && raw_redis.service_name.is_none() {
        check.err(
            "store.redis.service_name",
            "sentinel mode needs the service (master) name",
        );
    }
    let key_prefix = raw_redis
        .key_prefix
        .unwrap_or_else(|| "tollgate:".to_string());
    if key_prefix.contains(['{', '}']) || key_prefix.chars().any(|c| c.is_whitespace()) {
        check.err(
            "store.redis.key_prefix",
            "must not contain braces or whitespace (braces are the cluster hash tag)",
        );
    }
    let timeout = positive_ms(check, "store.redis.timeout_ms", raw_redis.timeout_ms, 20);
    let batch_window = Duration::from_micros(raw_redis.batch_window_us.unwrap_or(0));
    if batch_window * 2 > timeout {
        check.err(
            "store.redis.batch_window_us",
            format!(
                "must be under half of timeout_ms ({} us), or decisions time out waiting",
                timeout.as_micros() / 2
            ),
        );
    }
    let startup_wait = Duration::from_millis(raw_redis.startup_wait_ms.unwrap_or(5000));
    let max_buckets = raw
        .memory
        .and_then(|m| m.max_buckets)
        .unwrap_or(DEFAULT_MAX_BUCKETS);
    if max_buckets == 0 {
        check.err("store.memory.max_buckets", "must be greater than 0");
    }
    StoreConfig {
        kind: match raw.kind {
            RawStoreKind::Memory => StoreKindConfig::Memory,
            RawStoreKind::Redis => StoreKindConfig::Redis,
        },
        redis: RedisConfig {
            mode,
            urls,
            service_name: raw_redis.service_name,
            timeout,
            key_prefix,
            batch_window,
            startup_wait,
        },
        max_buckets,
    }
}

fn build_breaker(check: &mut Check, raw: RawBreaker) -> BreakerConfig {
    let failure_threshold = raw.failure_threshold.unwrap_or(5);
    if failure_threshold == 0 {
        check.err("breaker.failure_threshold", "must be at least 1");
    }
    let fallback_instances = raw.fallback_instances.unwrap_or(1);
    if fallback_instances == 0 {
        check.err("breaker.fallback_instances", "must be at least 1");
    }
    BreakerConfig {
        failure_threshold,
        open: positive_ms(check, "breaker.open_ms", raw.open_ms, 2000),
        fallback: match raw.fallback {
            RawFallback::Local => Fallback::Local,
            RawFallback::Allow => Fallback::Allow,
            RawFallback::Deny => Fallback::Deny,
        },
        fallback_instances,
    }
}

fn build_client_ip(check: &mut Check, raw: RawClientIp) -> ClientIpConfig {
    let mut trusted = Vec::new();
    for (i, text) in raw.trusted_proxies.iter().enumerate() {
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            // Peers are compared as IPv4 when IPv4-mapped (`keys::canonical`), so a mapped
            // range (`::ffff:10.0.0.0/104`) is held as the IPv4 range it maps.
            Ok(IpNet::V6(v6)) if v6.prefix_len() >= 96 && v6.addr().to_ipv4_mapped().is_some() => {
                match (v6.addr().to_ipv4_mapped(), v6.prefix_len() - 96) {
                    (Some(v4), len) => match ipnet::Ipv4Net::new(v4, len) {
                        Ok(net) => trusted.push(IpNet::V4(net.trunc())),
                        Err(_) => trusted.push(IpNet::V6(v6)),
                    },
                    (None, _) => trusted.push(IpNet::V6(v6)),
                }
            }
            Ok(net) => trusted.push(net),
            Err(_) => check.err(
                format!("client_ip.trusted_proxies[{i}]"),
                format!("expected an address or CIDR such as 10.0.0.0/8, got {text:?}"),
            ),
        }
    }
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(64);
    if ipv6_prefix == 0 || ipv6_prefix > 128 {
        check.err("client_ip.ipv6_prefix", "must be between 1 and 128");
    }
    ClientIpConfig {
        trusted_proxies: trusted,
        ipv6_prefix,
    }
}

fn build_route(
    check: &mut Check,
    path: &str,
    r: RawRoute,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    default_headers: HeaderFlags,
    ipv6_prefix: u8,
) -> Option<Route> {
    let before = check.problems.len();
    if !valid_name(&r.name) {
        check.err(format!("{path}.name"), format!("route name {NAME_RULE}"));
    }
    let matcher = build_match(check, &format!("{path}.match"), &r.matcher);
    let upstream = upstreams.get(&r.upstream).cloned();
    if upstream.is_none() {
        let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
        check.err(
            format!("{path}.upstream"),
            format!("unknown upstream {:?} (defined: {known:?})", r.upstream),
        );
    }
    let capture_names: HashSet<String> = match &matcher.path {
        PathMatch::Regex(re) => re.capture_names().flatten().map(str::to_string).collect(),
        _ => HashSet::new(),
    };
    let mut seen = HashSet::new();
    let mut limits = Vec::new();
    for (j, l) in r.limits.into_iter().enumerate() {
        let lpath = format!("{path}.limits[{j}]");
        if !seen.insert(l.name.clone()) {
            check.err(
                format!("{lpath}.name"),
                format!("duplicate limit name {:?}", l.name),
            );
        }
        if let Some(limit) = build_limit(check, &lpath, l, &capture_names, ipv6_prefix) {
            limits.push(limit);
        }
    }
    if check.problems.len() > before {
        return None;
    }
    Some(Route {
        name: Arc::from(r.name.as_str()),
        matcher,
        upstream: upstream?,
        shadow: r.shadow,
        limits,
        headers: header_flags(r.headers, default_headers),
        stats: Default::default(),
    })
}

/// A route's path as requests are matched: in normal form (escapes of `/` kept as written, so
/// they match under `server.escaped_slashes: keep`).
fn normal_config_path(check: &mut Check, field: &str, written: &str) -> String {
    if !written.starts_with('/') {
        return written.to_string();
    }
    match crate::normalize::path(written, crate::normalize::EscapedSlashes::Keep) {
        Ok(normal) => normal.into_owned(),
        Err(e) => {
            check.err(field, format!("{written:?}: {e}"));
            written.to_string()
        }
    }
}

fn build_match(check: &mut Check, path: &str, m: &RawMatch) -> RouteMatch {
    let given = [&m.path, &m.path_prefix, &m.path_regex]
        .iter()
        .filter(|p| p.is_some())
        .count();
    if given > 1 {
        check.err(path, "give at most one of path, path_prefix and path_regex");
    }
    let path_match = if let Some(p) = &m.path {
        if !p.starts_with('/') {
            check.err(
                format!("{path}.path"),
                format!("must start with '/', got {p:?}"),
            );
        }
        PathMatch::Exact(normal_config_path(check, &format!("{path}.path"), p))
    } else if let Some(p) = &m.path_prefix {
        if !p.starts_with('/') {
            check.err(
                format!("{path}.path_prefix"),
                format!("must start with '/', got {p:?}"),
            );
        }
        PathMatch::Prefix(normal_config_path(check, &format!("{path}.path_prefix"), p))
    } else if let Some(re) = &m.path_regex {
        match Regex::new(re) {
            Ok(compiled) => PathMatch::Regex(compiled),
            Err(e) => {
                let first_line = e.to_string().lines().last().unwrap_or("").to_string();
                check.err(
                    format!("{path}.path_regex"),
                    format!("invalid regex {re:?}: {}", first_line.trim()),
                );
                PathMatch::Any
            }
        }
    } else {
        PathMatch::Any
    };
    let methods = m.methods.as_ref().map(|ms| {
        ms.iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let upper = text.to_ascii_uppercase();
                match http::Method::from_bytes(upper.as_bytes()) {
                    Ok(method) if !upper.is_empty() => Some(method),
                    _ => {
                        check.err(
                            format!("{path}.methods[{i}]"),
                            format!("{text:?} is not an HTTP method"),
                        );
                        None
                    }
                }
            })
            .collect()
    });
    let host = match &m.host {
        Some(h) if h.trim().is_empty() => {
            check.err(format!("{path}.host"), "must not be empty");
            None
        }
        Some(h) => Some(HostMatch::parse(h)),
        None => None,
    };
    RouteMatch {
        host,
        path: path_match,
        methods,
    }
}

fn build_policy(
    check: &mut Check,
    path: &str,
    rate_text: &str,
    burst: Option<u64>,
    algorithm: Algorithm,
) -> Option<Policy> {
    let rate = match Rate::parse(rate_text) {
        Ok(rate) => rate,
        Err(msg) => {
            check.err(format!("{path}.rate"), msg);
            return None;
        }
    };
    if algorithm.is_window() {
        if burst.is_some() {
            window_burst(check, path, algorithm);
            return None;
        }
        let policy = Policy {
            rate,
            burst: rate.count,
        };
        return match algorithm.check_precision(&policy) {
            Ok(()) => Some(policy),
            Err(msg) => {
                check.err(format!("{path}.rate"), msg);
                None
            }
        };
    }
    let burst = burst.unwrap_or(rate.count);
    if burst == 0 {
        check.err(format!("{path}.burst"), "must be at least 1");
        return None;
    }
    precise(check, path, Policy { rate, burst })
}

/// `burst` given with a window algorithm, whose quota is the rate's count.
fn window_burst(check: &mut Check, path: &str, algorithm: Algorithm) {
    check.err(
        format!("{path}.burst"),
        format!(
            "does not apply with algorithm {}: the quota is the rate's count per window \
             (rate: 100/m is 100 per minute window); remove burst or use token_bucket",
            algorithm.name()
        ),
    );
}

/// The policy, if both stores can hold it exactly (refill time at most 2^53 ns).
fn precise(check: &mut Check, path: &str, policy: Policy) -> Option<Policy> {
    match policy.check_precision() {
        Ok(()) => Some(policy),
        Err(msg) => {
            check.err(format!("{path}.burst"), msg);
            None
        }
    }
}

fn build_limit(
    check: &mut Check,
    path: &str,
    l: RawLimit,
    capture_names: &HashSet<String>,
    ipv6_prefix: u8,
) -> Option<Limit> {
    let before = check.problems.len();
    if !valid_name(&l.name) {
        check.err(format!("{path}.name"), format!("limit name {NAME_RULE}"));
    }
    if l.key.is_empty() {
        check.err(format!("{path}.key"), "needs at least one part");
    }
    let mut parts: Vec<KeyPart> = Vec::new();
    for (k, text) in l.key.iter().enumerate() {
        match keys::parse_part(text) {
            Ok(part) => parts.push(part),
            Err(msg) => check.err(format!("{path}.key[{k}]"), msg),
        }
    }
    let key = KeySpec { parts };
    for name in key.path_params() {
        if !capture_names.contains(name) {
            check.err(
                format!("{path}.key"),
                format!(
                    "path_param:{name} needs a named group (?P<{name}>...) in the route's match.path_regex"
                ),
            );
        }
    }
    let algorithm = match l.algorithm.as_deref().map(Algorithm::parse) {
        None => Algorithm::TokenBucket,
        Some(Ok(algorithm)) => algorithm,
        Some(Err(msg)) => {
            check.err(format!("{path}.algorithm"), msg);
            Algorithm::TokenBucket
        }
    };
    let policy = build_policy(check, path, &l.rate, l.burst, algorithm);
    let cost = l.cost.unwrap_or(1);
    let cost_header = match &l.cost_header {
        Some(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                check.err(
                    format!("{path}.cost_header"),
                    format!("{h:?} is not a valid header name"),
                );
                None
            }
        },
        None => None,
    };
    let cost_header_from = match l.cost_header_from.as_deref() {
        None | Some("trusted_proxies") => CostHeaderFrom::TrustedProxies,
        Some("any") => CostHeaderFrom::Any,
        Some(other) => {
            check.err(
                format!("{path}.cost_header_from"),
                format!("expected trusted_proxies or any, got {other:?}"),
            );
            CostHeaderFrom::TrustedProxies
        }
    };
    if l.cost_header_from.is_some() && cost_header.is_none() {
        check.err(
            format!("{path}.cost_header_from"),
            "only applies with cost_header",
        );
    }
    let mut overrides = HashMap::new();
    let mut seen: HashMap<String, &String> = HashMap::new();
    for (value, o) in &l.overrides {
        let opath = format!("{path}.overrides.{value}");
        let base = policy.unwrap_or(Policy {
            rate: Rate {
                count: 1,
                period: Duration::from_secs(1),
            },
            burst: 1,
        });
        let overridden = match &o.rate {
            Some(rate) => build_policy(check, &opath, rate, o.burst, algorithm),
            None => match o.burst {
                Some(_) if algorithm.is_window() => {
                    window_burst(check, &opath, algorithm);
                    None
                }
                Some(0) => {
                    check.err(format!("{opath}.burst"), "must be at least 1");
                    None
                }
                Some(burst) => precise(
                    check,
                    &opath,
                    Policy {
                        rate: base.rate,
                        burst,
                    },
                ),
                None => {
                    check.err(&opath, "give rate, burst or both");
                    None
                }
            },
        };
        let parts: Vec<&str> = value.split(keys::PART_SEPARATOR).collect();
        match keys::value_from_parts(&key, &parts, ipv6_prefix) {
            Ok(normal) => {
                if let Some(p) = overridden {
                    if let Some(first) = seen.insert(normal.clone(), value) {
                        check.err(
                            &opath,
                            format!("names the same bucket as the override {first:?} ({normal})"),
                        );
                    }
                    overrides.insert(normal, p);
                }
            }
            Err(msg) => check.err(&opath, msg),
        }
    }
    if let Some(p) = policy {
        let largest = overrides.values().map(|o| o.burst).fold(p.burst, u64::max);
        if cost > largest {
            check.err(
                format!("{path}.cost"),
                format!(
                    "cost {cost} exceeds the {} {largest}: no request could ever pass this limit",
                    if algorithm.is_window() {
                        "quota"
                    } else {
                        "burst"
                    }
                ),
            );
        }
    }
    if check.problems.len() > before {
        return None;
    }
    Some(Limit {
        name: Arc::from(l.name.as_str()),
        key,
        algorithm,
        policy: policy?,
        cost,
        cost_header,
        cost_header_from,
        on_missing_key: match l.on_missing_key {
            RawOnMissingKey::Skip => OnMissingKey::Skip,
            RawOnMissingKey::Deny => OnMissingKey::Deny,
            RawOnMissingKey::Anonymous => OnMissingKey::Anonymous,
        },
        overrides,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigError};
    use crate::limiter::Algorithm;

    /// The problems `tollgate validate` reports for one limit line, as "path: message".
    fn problems(limit: &str) -> Vec<String> {
        problems_of(&format!(
            "upstreams: {{ app: {{ targets: [\"127.0.0.1:9\"] }} }}\nroutes:\n  - name: r\n    upstream: app\n    limits:\n      - {limit}\n"
        ))
    }

    /// The problems `tollgate validate` reports for a whole file, as "path: message".
    fn problems_of(yaml: &str) -> Vec<String> {
        match parse(yaml, "t.yaml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems
                .iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    /// The problems of a config with these top-level `listen`, `admin` and `rls` lines.
    fn listener_problems(lines: &str) -> Vec<String> {
        problems_of(&format!("{lines}\nupstreams: {{ app: {{ targets: [\"127.0.0.1:9\"] }} }}\nroutes:\n  - name: r\n    upstream: app\n"))
    }

    #[test]
    fn listeners_that_would_fight_over_a_port_are_refused() {
        let admin_on_proxy = listener_problems(
            "listen: [\"127.0.0.1:8080\"]\nadmin: { listen: \"127.0.0.1:8080\" }",
        );
        assert_eq!(admin_on_proxy.len(), 1, "{admin_on_proxy:?}");
        assert!(
            admin_on_proxy[0].starts_with(
                "admin.listen: 127.0.0.1:8080 takes the port of the proxy listener 127.0.0.1:8080"
            ),
            "{admin_on_proxy:?}"
        );
        // A wildcard covers every address of its family; `[::]` covers both.
        for (proxy, admin) in [
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("[::]:8080", "127.0.0.1:8080"),
            ("[::1]:8080", "[::]:8080"),
            ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080"),
            ("[::ffff:0.0.0.0]:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "[::ffff:127.0.0.1]:8080"),
        ] {
            let found = listener_problems(&format!(
                "listen: [\"{proxy}\"]\nadmin: {{ listen: \"{admin}\" }}"
            ));
            assert!(
                found.iter().any(|p| p.starts_with("admin.listen:")),
                "{proxy} / {admin}: {found:?}"
            );
        }
        let two_proxies = listener_problems("listen: [\"0.0.0.0:8080\", \"127.0.0.1:8080\"]");
        assert!(
            two_proxies.iter().any(|p| p
                == "listen[1]: 127.0.0.1:8080 takes the same port as 0.0.0.0:8080: only one can be bound"),
            "{two_proxies:?}"
        );
        let rls = listener_problems(
            "listen: [\"127.0.0.1:8080\"]\nadmin: { listen: \"0.0.0.0:9901\" }\nrls: { listen: \"127.0.0.1:9901\", domains: [] }",
        );
        assert!(rls.iter().any(|p| p.starts_with("rls.listen:")), "{rls:?}");
        // What does not collide: other ports, the two families' own addresses, port 0 twice.
        for lines in [
            "listen: [\"127.0.0.1:8080\"]\nadmin: { listen: \"127.0.0.1:9901\" }",
            "listen: [\"127.0.0.1:8080\", \"[::1]:8080\"]\nadmin: { listen: \"127.0.0.1:9901\" }",
            "listen: [\"0.0.0.0:8080\", \"[::1]:8080\"]\nadmin: { listen: \"127.0.0.1:9901\" }",
            "listen: [\"127.0.0.1:0\"]\nadmin: { listen: \"127.0.0.1:0\" }",
            "listen: [\"[fe80::1%1]:8080\"]\nadmin: { listen: \"[fe80::1%2]:8080\" }",
        ] {
            assert_eq!(listener_problems(lines), Vec::<String>::new(), "{lines}");
        }
    }

    #[test]
    fn overrides_are_normalised_like_requests() {
        let yaml = "upstreams: { app: { targets: [\"127.0.0.1:9\"] } }\nroutes:\n  - name: r\n    upstream: app\n    limits:\n      - { name: m, key: [method], rate: 1/s, overrides: { get: { burst: 7 } } }\n      - { name: h, key: [host], rate: 1/s, overrides: { \"API.example.com.\": { burst: 7 } } }\n      - { name: p, key: [path], rate: 1/s, overrides: { \"/a/../b\": { burst: 7 } } }\n";
        let config = parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let route = &config.router.routes()[0];
        let find = |name: &str, value: &str| {
            route
                .limits
                .iter()
                .find(|l| &*l.name == name)
                .map(|l| l.policy_for(value).burst)
        };
        assert_eq!(find("m", "GET"), Some(7));
        assert_eq!(find("h", "api.example.com"), Some(7));
        assert_eq!(find("p", "/b"), Some(7));
    }

    #[test]
    fn a_present_but_empty_upstream_tls_is_tls_with_defaults() {
        let yaml = "upstreams:\n  a:\n    targets: [\"127.0.0.1:9\"]\n    tls:\n      # sni: x\n  b: { targets: [\"127.0.0.1:9\"], tls: ~ }\n  c: { targets: [\"127.0.0.1:9\"] }\nroutes: [ { name: r, upstream: a } ]\n";
        let config = parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let tls = |name: &str| config.upstreams.get(name).map(|u| u.tls.is_some());
        assert_eq!(tls("a"), Some(true));
        assert_eq!(tls("b"), Some(true));
        assert_eq!(tls("c"), Some(false));
        assert!(config
            .upstreams
            .get("a")
            .and_then(|u| u.tls.as_ref())
            .is_some_and(|t| t.verify));
    }

    #[test]
    fn ipv4_mapped_trusted_proxies_hold_their_ipv4_range() {
        let yaml = "client_ip: { trusted_proxies: [\"::ffff:10.0.0.0/104\", \"::ffff:192.0.2.7\"] }\nupstreams: { app: { targets: [\"127.0.0.1:9\"] } }\nroutes: [ { name: r, upstream: app } ]\n";
        let config = parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let nets: Vec<String> = config
            .client_ip
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32"]);
    }

    #[test]
    fn algorithms_are_validated_by_field() {
        assert_eq!(
            problems(r#"{ name: l, key: ["ip"], rate: "100/m", algorithm: sliding_window }"#),
            Vec::<String>::new()
        );
        let unknown = problems(r#"{ name: l, key: ["ip"], rate: "1/s", algorithm: leaky }"#);
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert!(
            unknown[0].starts_with("routes[0].limits[0].algorithm: "),
            "{unknown:?}"
        );
        for algorithm in ["fixed_window", "sliding_window"] {
            let burst = problems(&format!(
                r#"{{ name: l, key: ["ip"], rate: "1/s", burst: 5, algorithm: {algorithm} }}"#
            ));
            assert_eq!(burst.len(), 1, "{burst:?}");
            assert!(
                burst[0].starts_with("routes[0].limits[0].burst: ") && burst[0].contains(algorithm),
                "{burst:?}"
            );
            let over = problems(&format!(
                r#"{{ name: l, key: ["ip"], rate: "1/s", algorithm: {algorithm}, overrides: {{ "1.2.3.4": {{ burst: 5 }}, "1.2.3.5": {{ rate: "9/s" }} }} }}"#
            ));
            assert_eq!(over.len(), 1, "{over:?}");
            assert!(
                over[0].starts_with("routes[0].limits[0].overrides.1.2.3.4.burst: "),
                "{over:?}"
            );
            let cost = problems(&format!(
                r#"{{ name: l, key: ["ip"], rate: "3/s", cost: 4, algorithm: {algorithm} }}"#
            ));
            assert!(
                cost.len() == 1 && cost[0].contains("exceeds the quota 3"),
                "{cost:?}"
            );
        }
        // Sliding windows: quota × window in ms at most 2^53.
        let fine =
            problems(r#"{ name: l, key: ["ip"], rate: "200000000/d", algorithm: sliding_window }"#);
        assert!(
            fine.len() == 1 && fine[0].starts_with("routes[0].limits[0].rate: "),
            "{fine:?}"
        );
        assert_eq!(
            problems(r#"{ name: l, key: ["ip"], rate: "200000000/d", algorithm: fixed_window }"#),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_window_limit_has_its_quota_as_capacity() {
        let yaml = "upstreams: { app: { targets: [\"127.0.0.1:9\"] } }\nroutes:\n  - name: r\n    upstream: app\n    limits:\n      - { name: l, key: [ip], rate: 100/m, algorithm: fixed_window, overrides: { \"1.2.3.4\": { rate: 5/s } } }\n";
        let config = parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let limit = &config.router.routes()[0].limits[0];
        assert_eq!(limit.algorithm, Algorithm::FixedWindow);
        assert_eq!(limit.policy.burst, 100);
        assert_eq!(limit.policy_for("1.2.3.4").burst, 5);
        assert_eq!(limit.algorithm.window_secs(&limit.policy), 60);
        assert_eq!(limit.algorithm.window_secs(&limit.policy_for("1.2.3.4")), 1);
    }

    #[test]
    fn overrides_of_parts_with_alternatives_name_their_source() {
        let tagged = r#"{ name: l, key: ["header:x-k|ip", "method"], rate: "1/s", overrides: { "header:X-K=gold|GET": { burst: 5 }, "ip=10.0.0.1|POST": { burst: 5 } } }"#;
        assert_eq!(problems(tagged), Vec::<String>::new());
        let untagged = problems(
            r#"{ name: l, key: ["header:x-k|ip"], rate: "1/s", overrides: { "gold": { burst: 5 } } }"#,
        );
        assert_eq!(untagged.len(), 1, "{untagged:?}");
        assert!(
            untagged[0].starts_with("routes[0].limits[0].overrides.gold: ")
                && untagged[0].contains("SOURCE=VALUE"),
            "{untagged:?}"
        );
        let same_bucket = problems(
            r#"{ name: l, key: ["ip"], rate: "1/s", overrides: { "ip=1.2.3.4": { burst: 5 }, "::ffff:1.2.3.4": { burst: 6 } } }"#,
        );
        assert_eq!(same_bucket.len(), 1, "{same_bucket:?}");
        assert!(same_bucket[0].contains("same bucket"), "{same_bucket:?}");
        let not_ip = problems(
            r#"{ name: l, key: ["ip"], rate: "1/s", overrides: { "1.2.3.4/32": { burst: 5 } } }"#,
        );
        assert_eq!(not_ip.len(), 1, "{not_ip:?}");
        let wrong_count = problems(
            r#"{ name: l, key: ["ip", "method"], rate: "1/s", overrides: { "1.2.3.4": { burst: 5 } } }"#,
        );
        assert_eq!(wrong_count.len(), 1, "{wrong_count:?}");
        let cost_from =
            problems(r#"{ name: l, key: ["ip"], rate: "1/s", cost_header_from: anyone }"#);
        assert_eq!(cost_from.len(), 2, "{cost_from:?}");
        let slashes = parse(
            "server: { escaped_slashes: maybe }\nupstreams: { app: { targets: [\"127.0.0.1:9\"] } }\nroutes: [ { name: r, upstream: app } ]\n",
            "t.yaml",
        );
        assert!(
            matches!(&slashes, Err(ConfigError::Invalid { problems, .. }) if problems[0].path == "server.escaped_slashes"),
            "{slashes:?}"
        );
    }

    #[test]
    fn rates_and_bursts_both_stores_cannot_hold_exactly_are_rejected() {
        let fine = r#"{ name: l, key: ["ip"], rate: "1000000/s", burst: 5 }"#;
        assert_eq!(problems(fine), Vec::<String>::new());
        let too_fast = problems(r#"{ name: l, key: ["ip"], rate: "1000001/s" }"#);
        assert_eq!(too_fast.len(), 1, "{too_fast:?}");
        assert!(
            too_fast[0].starts_with("routes[0].limits[0].rate: ")
                && too_fast[0].contains("1 token per microsecond"),
            "{too_fast:?}"
        );
        let too_long = problems(r#"{ name: l, key: ["ip"], rate: "1/d", burst: 105 }"#);
        assert_eq!(too_long.len(), 1, "{too_long:?}");
        assert!(
            too_long[0].starts_with("routes[0].limits[0].burst: ") && too_long[0].contains("104"),
            "{too_long:?}"
        );
        let override_too_long = problems(
            r#"{ name: l, key: ["ip"], rate: "1/d", burst: 5, overrides: { "1.2.3.4": { burst: 200 } } }"#,
        );
        assert_eq!(override_too_long.len(), 1, "{override_too_long:?}");
        assert!(
            override_too_long[0].starts_with("routes[0].limits[0].overrides.1.2.3.4.burst: "),
            "{override_too_long:?}"
        );
        let override_rate = problems(
            r#"{ name: l, key: ["ip"], rate: "1/s", overrides: { "10.0.0.1": { rate: "2000000/s" } } }"#,
        );
        assert_eq!(override_rate.len(), 1, "{override_rate:?}");
        assert!(override_rate[0].starts_with("routes[0].limits[0].overrides.10.0.0.1.rate: "));
    }

    #[test]
    fn a_fixed_cost_no_bucket_can_hold_is_rejected() {
        let never = problems(r#"{ name: l, key: ["ip"], rate: "1/s", burst: 3, cost: 4 }"#);
        assert_eq!(
            never,
            vec!["routes[0].limits[0].cost: cost 4 exceeds the burst 3: no request could ever pass this limit"]
        );
        let for_some = r#"{ name: l, key: ["ip"], rate: "1/s", burst: 3, cost: 4, overrides: { "10.0.0.1": { burst: 4 } } }"#;
        assert_eq!(problems(for_some), Vec::<String>::new());
    }
}
