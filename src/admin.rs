//! The admin listener: `/health`, `/ready`, `/metrics`, and the `/v1` API to read, reset and
//! check buckets. Mutating calls (`DELETE`, `POST`) need `Authorization: Bearer <admin.token>`
//! when a token is set. Bad input gets a 4xx with a JSON error, never a 500. Bound to loopback
//! unless configured otherwise.

use crate::config::model::{Fallback, StoreKindConfig};
use crate::keys;
use crate::limiter::breaker::BreakerState;
use crate::limiter::decider::Verdict;
use crate::limiter::plan::{self, bucket_key, Decision, RetryAfter};
use crate::limiter::slot::Readiness;
use crate::limiter::{ceil_secs, BucketRequest, Limit};
use crate::normalize;
use crate::state::Shared;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 64 * 1024;

pub struct AdminApp {
    shared: Arc<Shared>,
}

fn json_response(status: StatusCode, value: Value) -> Response<Vec<u8>> {
    respond(status, "application/json", value.to_string().into_bytes())
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Vec<u8>> {
    json_response(status, json!({"error": code, "message": message.into()}))
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let len = body.len();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

fn ms(ns: u64) -> u64 {
    ns.div_ceil(1_000_000)
}

/// Percent-decoded values of every `name=` parameter (names compared decoded), in order.
fn query_all(query: Option<&str>, name: &str) -> Vec<String> {
    let Some(query) = query else {
        return Vec::new();
    };
    query
        .split('&')
        .filter_map(|pair| keys::query_value(pair, name))
        .map(|decoded| String::from_utf8_lossy(&decoded).into_owned())
        .collect()
}

/// The body of a `/v1/check` call.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    route: String,
    #[serde(default)]
    key: HashMap<String, String>,
    cost: Option<u64>,
}

impl AdminApp {
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminApp { shared }
    }

    /// Ready when the config is loaded and every connection a decision uses is open (or,
    /// when it is not, the breaker's fallback `local`/`allow` keeps the gateway deciding:
    /// "degraded"). While the store is still connecting at start-up: 503 "starting".
    fn ready(&self) -> Response<Vec<u8>> {
        let config = self.shared.config();
        let slot = self.shared.store();
        let store = match slot.config.kind {
            StoreKindConfig::Memory => "memory",
            StoreKindConfig::Redis => "redis",
        };
        let readiness = slot.readiness();
        // Connected is not enough: while the breaker is not closed, decisions are the
        // fallback's.
        let breaker = self.shared.decider.breaker_state();
        let healthy = slot.healthy() && breaker == BreakerState::Closed;
        let covered = matches!(config.breaker.fallback, Fallback::Local | Fallback::Allow);
        let (status, state) = match (readiness, healthy, covered) {
            (Readiness::Connecting, _, _) => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
            (_, true, _) => (StatusCode::OK, "ready"),
            (_, false, true) => (StatusCode::OK, "degraded"),
            (_, false, false) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        let mut body = json!({
            "status": state,
            "store": store,
            "store_healthy": healthy,
            "store_connect": readiness.name(),
            "breaker": breaker.name(),
            "config_generation": self.shared.generation(),
        });
        if !healthy {
            body["reason"] = Value::from(match readiness {
                Readiness::Connecting => format!(
                    "store {store} is connecting (waits at most store.redis.startup_wait_ms = {} ms)",
                    slot.config.redis.startup_wait.as_millis()
                ),
                Readiness::Degraded => format!(
                    "store {store} did not connect on every deciding thread within the start-up wait; fallback: {:?}",
                    config.breaker.fallback
                ),
                Readiness::Ready => format!(
                    "store {store} is not answering (breaker {}); fallback: {:?}",
                    breaker.name(),
                    config.breaker.fallback
                ),
            });
        }
        json_response(status, body)
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let config = self.shared.config();
        let Some(token) = config.admin.token.as_deref() else {
            return true;
        };
        let mut values = session
            .req_header()
            .headers
            .get_all(http::header::AUTHORIZATION)
            .iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        bearer_token(value.as_bytes())
            .is_some_and(|given| constant_time_eq(given, token.as_bytes()))
    }

    async fn limit_endpoint(
        &self,
        method: &Method,
        route_name: &str,
        limit_name: &str,
        query: Option<&str>,
    ) -> Response<Vec<u8>> {
        let config = self.shared.config();
        let Some(route) = config.router.by_name(route_name) else {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_route",
                format!("no route {route_name:?}"),
            );
        };
        let Some(limit) = route.limits.iter().find(|l| &*l.name == limit_name) else {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_limit",
                format!("route {route_name:?} has no limit {limit_name:?}"),
            );
        };
        let given = query_all(query, "key");
        let parts: Vec<String> = limit
            .key
            .parts
            .iter()
            .map(|p| {
                p.alternatives
                    .iter()
                    .map(|a| a.spec())
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        let value = match keys::value_from_parts(&limit.key, &given, config.client_ip.ipv6_prefix) {
            Ok(value) => value,
            Err(why) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_key",
                    format!(
                        "limit {limit_name:?} has {} key part(s) {parts:?}: give ?key=VALUE once per part, in order (got {}): {why}",
                        parts.len(),
                        given.len()
                    ),
                )
            }
        };
        let policy = limit.policy_for(&value);
        let key = bucket_key(&route.name, &limit.name, &value);
        let slot = self.shared.store();
        let timeout = slot.config.redis.timeout.max(Duration::from_millis(200));
        if method == Method::DELETE {
            let reset = bounded(timeout, slot.store.reset(&key)).await;
            self.shared.decider.forget(&key).await;
            return match reset {
                Ok(()) => json_response(
                    StatusCode::OK,
                    json!({"route": route_name, "limit": limit_name, "key": value, "reset": true}),
                ),
                Err(resp) => *resp,
            };
        }
        let request = BucketRequest {
            key,
            interval_ns: policy.rate.interval_ns(),
            burst: policy.burst,
            cost: 0,
        };
        match bounded(timeout, slot.store.peek(&request)).await {
            Ok(o) => json_response(
                StatusCode::OK,
                json!({
                    "route": route_name,
                    "limit": limit_name,
                    "key": value,
                    "tokens": o.remaining,
                    "capacity": policy.burst,
                    "rate": Limit::rate_text(&policy),
                    "reset_after_ms": ms(o.reset_ns),
                    "reset_after_s": ceil_secs(o.reset_ns),
                    "next_token_ms": ms(o.next_token_ns),
                }),
            ),
            Err(resp) => *resp,
        }
    }

    async fn check(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        return error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "body_too_large",
                            format!("at most {MAX_BODY} bytes"),
                        );
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_body", e.to_string()),
            }
        }
        let req: CheckRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    format!(
                    "expected {{\"route\": NAME, \"key\": {{PART: VALUE, ...}}, \"cost\": N}}: {e}"
                ),
                )
            }
        };
        let config = self.shared.config();
        let Some(route) = config.router.by_name(&req.route) else {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_route",
                format!("no route {:?}", req.route),
            );
        };
        // Header names are case-insensitive; the specs are stored lower-case.
        let given: HashMap<String, String> = req
            .key
            .into_iter()
            .map(|(k, v)| match k.strip_prefix("header:") {
                Some(h) => (format!("header:{}", h.to_ascii_lowercase()), v),
                None => (k, v),
            })
            .collect();
        let plan = plan::plan_from_sources(
            &route.name,
            &route.limits,
            &given,
            req.cost,
            config.client_ip.ipv6_prefix,
        );
        let slot = self.shared.store();
        let verdict = self
            .shared
            .decider
            .decide_plan(&slot, &config.breaker, plan)
            .await;
        let (decision, decided_by) = match verdict {
            Verdict::Decided { decision, by } => (decision, by.label()),
            Verdict::AllowFallback => (Decision::unlimited(), "allow_fallback"),
            Verdict::DenyFallback { retry_after_ns } => (
                Decision {
                    allowed: false,
                    retry_after_ns,
                    ..Decision::default()
                },
                "deny_fallback",
            ),
        };
        let limits: Vec<Value> = decision
            .statuses
            .iter()
            .map(|s| {
                json!({
                    "name": &*s.name,
                    "allowed": s.outcome.allowed,
                    "remaining": s.outcome.remaining,
                    "capacity": s.policy.burst,
                    "reset_after_ms": ms(s.outcome.reset_ns),
                    "retry_after_ms": ms(s.outcome.retry_ns),
                })
            })
            .collect();
        json_response(
            StatusCode::OK,
            json!({
                "route": &*route.name,
                "allowed": decision.allowed,
                "violated-policies": decision.violated.iter().map(|n| &**n).collect::<Vec<_>>(),
                // null: the cost exceeds a limit's capacity and can never pass.
                "retry_after_ms": match decision.retry_after() {
                    RetryAfter::Never => Value::Null,
                    RetryAfter::Admitted => Value::from(0),
                    RetryAfter::After(ns) => Value::from(ms(ns)),
                },
                "decided_by": decided_by,
                "limits": limits,
            }),
        )
    }
}

/// A store call bounded by `timeout`; a failure is a 503 with the reason.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, crate::limiter::StoreError>>,
) -> Result<T, Box<Response<Vec<u8>>>> {
    let reason = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "store call timed out".to_string(),
    };
    Err(Box::new(error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        reason,
    )))
}

/// The token of an `Authorization: Bearer TOKEN` value; the scheme is case-insensitive
/// (RFC 9110 11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let text = value.trim_ascii();
    let split = text.iter().position(|b| *b == b' ' || *b == b'\t')?;
    let (scheme, rest) = text.split_at(split);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = normalize::method(&req.method).unwrap_or_else(|| req.method.clone());
        // Anything but a read needs the token, whatever the path: no spelling of an endpoint
        // reaches it unchecked.
        let mutating = !matches!(method, Method::GET | Method::HEAD);
        if mutating && !self.authorized(session) {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this call needs Authorization: Bearer <admin token>",
            );
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
        let req = session.req_header();
        let query = req.uri.query().map(str::to_string);
        // One normal path decides the endpoint: `//v1/check`, `/v1/./check` and `/v1/%63heck`
        // are `/v1/check`; an escaped `/` stays inside its segment.
        let path = match normalize::path(req.uri.path(), normalize::EscapedSlashes::Keep) {
            Ok(p) => p.into_owned(),
            Err(e) => return error(StatusCode::BAD_REQUEST, e.code(), e.to_string()),
        };
        let decoded: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(|s| String::from_utf8_lossy(&normalize::decode_component(s)).into_owned())
            .collect();
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["health"]) => json_response(StatusCode::OK, json!({"status": "ok"})),
            ("GET", ["ready"]) => self.ready(),
            ("GET", ["metrics"]) => {
                self.shared.refresh_gauges();
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.shared.metrics.render(),
                )
            }
            ("GET" | "DELETE", ["v1", "limits", route, limit]) => {
                self.limit_endpoint(&method, route, limit, query.as_deref())
                    .await
            }
            ("POST", ["v1", "check"]) => self.check(session).await,
            (_, ["health" | "ready" | "metrics"] | ["v1", "check"] | ["v1", "limits", _, _]) => {
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                )
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint {path}"),
            ),
        }
    }
}
