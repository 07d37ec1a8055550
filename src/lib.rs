//! Tollgate: a reverse-proxy gateway on Cloudflare's Pingora that enforces rate limits inline.
//!
//! # Layout
//! - [`config`]: YAML wire structs, the validated model, errors that name file, field and line.
//! - [`normalize`]: the one spelling of a request's path, host and method (RFC 3986 6.2.2).
//! - [`routes`]: the route table (host, method, path), first match wins.
//! - [`keys`]: key derivation from the request, client IP behind trusted proxies, normalisation.
//! - [`limiter`]: limits, the `Store` trait, the store slot and its connections, the decider
//!   (deny cache, breaker, one deadline, fallback), token-bucket and window arithmetic, memory
//!   and Redis stores, runtime overrides' table, planning.
//! - [`upstream`]: upstream groups, round robin, timeouts, TLS (CA, SNI, verify) and HTTP/2 to targets.
//! - [`redact`]: log output without credentials (Pingora logs raw request bytes it cannot parse).
//! - [`proxy`]: the Pingora `ProxyHttp` phases and the responses the gateway writes itself.
//! - [`rls`]: the Envoy rate-limit service (`envoy.service.ratelimit.v3` over gRPC): descriptors
//!   to buckets, one decision per call, health, connection bounds, graceful stop.
//! - [`admin`]: health, readiness, metrics and the `/v1` API (buckets, checks, runtime
//!   overrides) on the admin listener.
//! - [`override_store`]: where runtime overrides live (in process, or a Redis hash every
//!   instance polls) and how every instance gets them.
//! - [`metrics`]: every Prometheus family, registered once.
//! - [`state`]: the config generation in force, the store, in-flight requests.
//! - [`reload`]: read, validate (off the async runtimes), build and swap a new config.
//! - [`tls`]: TLS listeners: certificate pairs, SNI, min version, rotation without restart.
//! - [`server`]: assembling Pingora services, signals, graceful drain.
//! - [`demo`]: the embedded default and its built-in upstream.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod config;
pub mod demo;
pub mod keys;
pub mod limiter;
pub mod metrics;
pub mod normalize;
pub mod override_store;
pub mod proxy;
pub mod redact;
pub mod reload;
pub mod rls;
pub mod routes;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
