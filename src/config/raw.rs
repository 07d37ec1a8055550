//! Wire structs: the YAML exactly as an operator writes it. Unknown keys are rejected here;
//! meaning (rates, addresses, key parts, references) is checked in [`super::model`].

use serde::Deserialize;
use std::collections::BTreeMap;

/// For a field whose presence turns something on: present but null is the default value, not
/// absent.
fn null_is_default<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(Option::<T>::deserialize(d)?.unwrap_or_default()))
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<Vec<RawListen>>,
    pub admin: Option<RawAdmin>,
    pub store: Option<RawStore>,
    pub breaker: Option<RawBreaker>,
    pub client_ip: Option<RawClientIp>,
    pub headers: Option<RawHeaders>,
    pub server: Option<RawServer>,
    pub access_log: Option<RawAccessLog>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    pub routes: Vec<RawRoute>,
    /// The Envoy rate-limit service (`envoy.service.ratelimit.v3`); off when absent.
    pub rls: Option<RawRls>,
}

/// `rls`: the gRPC listener and its domains.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRls {
    pub listen: String,
    /// Which rate-limit headers `response_headers_to_add` carries (default: the top-level
    /// `headers`).
    pub headers: Option<RawHeaders>,
    /// Most connections at once (default 4096).
    pub max_connections: Option<usize>,
    /// A connection that sends nothing (not even a ping acknowledgement) this long is closed
    /// (default 75000).
    pub idle_timeout_ms: Option<u64>,
    #[serde(default)]
    pub domains: Vec<RawRlsDomain>,
}

/// One domain, as in envoyproxy/ratelimit's config files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRlsDomain {
    pub domain: String,
    #[serde(default)]
    pub descriptors: Vec<RawDescriptor>,
}

/// A descriptor node: `key`, optional `value`, what applies when a request's descriptor ends
/// here, and nested nodes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDescriptor {
    pub key: String,
    pub value: Option<String>,
    /// A limit of its own (envoyproxy/ratelimit's `rate_limit`).
    pub rate_limit: Option<RawRlsRate>,
    /// A limit of a proxy route, shared: `{route: NAME, limit: NAME}`.
    pub share: Option<RawShare>,
    /// Which key source of the shared limit this entry's value stands for (`header:x-api-key`).
    #[serde(rename = "as")]
    pub as_source: Option<String>,
    #[serde(default)]
    pub unlimited: bool,
    #[serde(default)]
    pub shadow_mode: bool,
    /// The limit's name in statuses, headers and keys (default: the descriptor path).
    pub name: Option<String>,
    #[serde(default)]
    pub descriptors: Vec<RawDescriptor>,
    /// envoyproxy/ratelimit's; refused with a reason (not an unknown-field error).
    pub detailed_metric: Option<serde_yaml_ng::Value>,
}

/// `rate_limit`: envoyproxy/ratelimit's `{unit, requests_per_unit}` or Tollgate's
/// `{rate, burst}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRlsRate {
    pub unit: Option<String>,
    pub requests_per_unit: Option<u64>,
    pub rate: Option<String>,
    pub burst: Option<u64>,
    /// envoyproxy/ratelimit's `rate_limit.name`: the limit's name, as the descriptor's `name`.
    pub name: Option<String>,
    /// envoyproxy/ratelimit's; refused with a reason.
    pub replaces: Option<serde_yaml_ng::Value>,
    /// envoyproxy/ratelimit's; refused with a reason.
    pub unlimited: Option<serde_yaml_ng::Value>,
    /// `token_bucket` (default), `sliding_window` or `fixed_window`.
    pub algorithm: Option<String>,
}

/// `share`: which proxy limit a descriptor counts against.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShare {
    pub route: String,
    pub limit: String,
}

/// One `listen` entry: `"HOST:PORT"` (plain HTTP) or `{address, tls}`.
#[derive(Debug)]
pub enum RawListen {
    Plain(String),
    Full(RawListenFull),
}

impl<'de> Deserialize<'de> for RawListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawListen;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"HOST:PORT\" or {address: \"HOST:PORT\", tls: {...}}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawListen, E> {
                Ok(RawListen::Plain(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawListen, A::Error> {
                RawListenFull::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawListen::Full)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenFull {
    pub address: String,
    /// A present `tls:` with nothing under it is TLS (and then an error: it needs `certs`).
    #[serde(default, deserialize_with = "null_is_default")]
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub certs: Vec<RawCertPair>,
    pub min_version: Option<RawVersion>,
}

/// `"1.2"` or `1.2` (YAML reads an unquoted version as a number).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawVersion {
    Text(String),
    Number(f64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertPair {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawStoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(default)]
    pub kind: RawStoreKind,
    pub redis: Option<RawRedis>,
    pub memory: Option<RawMemory>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawRedisMode {
    #[default]
    Standalone,
    Cluster,
    Sentinel,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    #[serde(default)]
    pub mode: RawRedisMode,
    pub urls: Option<Vec<String>>,
    pub service_name: Option<String>,
    pub timeout_ms: Option<u64>,
    pub key_prefix: Option<String>,
    pub batch_window_us: Option<u64>,
    pub startup_wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMemory {
    pub max_buckets: Option<u64>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawFallback {
    #[default]
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub failure_threshold: Option<u32>,
    pub open_ms: Option<u64>,
    #[serde(default)]
    pub fallback: RawFallback,
    pub fallback_instances: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawClientIp {
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub ipv6_prefix: Option<u8>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RawHeaders {
    pub legacy: Option<bool>,
    pub ietf: Option<bool>,
}

/// Process settings: `threads` and `drain_timeout_ms` are read once at start; `escaped_slashes`
/// applies to requests from the generation that sets it.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub threads: Option<usize>,
    pub drain_timeout_ms: Option<u64>,
    pub escaped_slashes: Option<String>,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listeners; read once at start.
    pub h2c: Option<bool>,
}

/// The level of the one-line-per-request access log.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RawAccessLog {
    Off,
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub targets: Vec<String>,
    pub connect_timeout_ms: Option<u64>,
    pub read_timeout_ms: Option<u64>,
    /// Speak TLS to the targets. A present `tls:` with nothing under it (`tls: ~`, or keys all
    /// commented out) is TLS with the defaults, never plain text.
    #[serde(default, deserialize_with = "null_is_default")]
    pub tls: Option<RawUpstreamTls>,
    /// Speak HTTP/2 to the targets (h2c prior knowledge in plain text, ALPN `h2` over TLS).
    #[serde(default)]
    pub http2: bool,
}

/// `upstreams.NAME.tls`: how the gateway checks the targets' certificates.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    /// Server name sent (SNI) and checked against the certificate; default: the target's host.
    pub sni: Option<String>,
    /// PEM file of the CA certificates to trust instead of the system roots.
    pub ca: Option<String>,
    /// Check the certificate chain and name (default true).
    pub verify: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub upstream: String,
    #[serde(default)]
    pub shadow: bool,
    #[serde(default)]
    pub limits: Vec<RawLimit>,
    pub headers: Option<RawHeaders>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub methods: Option<Vec<String>>,
    pub host: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawOnMissingKey {
    #[default]
    Skip,
    Deny,
    Anonymous,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub name: String,
    pub key: Vec<String>,
    pub rate: String,
    pub burst: Option<u64>,
    /// `token_bucket` (default), `sliding_window` or `fixed_window`.
    pub algorithm: Option<String>,
    pub cost: Option<u64>,
    pub cost_header: Option<String>,
    pub cost_header_from: Option<String>,
    #[serde(default)]
    pub on_missing_key: RawOnMissingKey,
    #[serde(default)]
    pub overrides: BTreeMap<String, RawOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    pub rate: Option<String>,
    pub burst: Option<u64>,
}
