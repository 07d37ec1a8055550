//! The admin listener: `/health`, `/ready`, `/metrics`, and the `/v1` API to read, reset and
//! check buckets and to manage runtime overrides (`/v1/overrides`, kept by
//! [`crate::override_store`]; every change is an audit log line and counted). Mutating calls
//! (anything but `GET`/`HEAD`) need `Authorization: Bearer <admin.token>` when a token is set.
//! Bad input gets a 4xx with a JSON error, never a 500. Bound to loopback unless configured
//! otherwise.

use crate::config::model::{Fallback, StoreKindConfig};
use crate::keys;
use crate::limiter::breaker::BreakerState;
use crate::limiter::decider::Verdict;
use crate::limiter::overrides::{self, Action, Entry, Source};
use crate::limiter::plan::{self, bucket_key, Decision, RetryAfter};
use crate::limiter::slot::Readiness;
use crate::limiter::{ceil_secs, BucketRequest, Limit, Policy, Rate};
use crate::normalize;
use crate::override_store::ChangeError;
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

/// Ready when the config is loaded and every connection a decision uses is open (or,
/// when it is not, the breaker's fallback `local`/`allow` keeps the gateway deciding:
/// "degraded"). While the store is still connecting at start-up, or the proxy's listeners are
/// not open yet: 503 "starting".
pub fn ready_report(shared: &Shared) -> (StatusCode, Value) {
    let config = shared.config();
    let slot = shared.store();
    let store = match slot.config.kind {
        StoreKindConfig::Memory => "memory",
        StoreKindConfig::Redis => "redis",
    };
    let readiness = slot.readiness();
    // Connected is not enough: while the breaker is not closed, decisions are the
    // fallback's.
    let breaker = shared.decider.breaker_state();
    let healthy = slot.healthy() && breaker == BreakerState::Closed;
    let covered = matches!(config.breaker.fallback, Fallback::Local | Fallback::Allow);
    let listening = shared.listening();
    let (status, state) = match (readiness, healthy, covered) {
        _ if !listening => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
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
        "config_generation": shared.generation(),
    });
    if !listening && readiness != Readiness::Connecting {
        body["reason"] = Value::from("the proxy's listeners are opening");
    } else if !healthy {
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
    (status, body)
}

impl AdminApp {
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminApp { shared }
    }

    fn ready(&self) -> Response<Vec<u8>> {
        let (status, body) = ready_report(&self.shared);
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
        let (route, limit) = match find_limit(&config, route_name, limit_name) {
            Ok(found) => found,
            Err(resp) => return *resp,
        };
        let value = match key_value(&config, limit, query) {
            Ok(value) => value,
            Err(resp) => return *resp,
        };
        let (action, source) = overrides::resolve(
            &self.shared.overrides.snapshot(),
            &route.name,
            limit,
            &value,
        );
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
        let policy = match action {
            Action::Policy(p) => p,
            Action::Unlimited | Action::Block => {
                let mut body = json!({
                    "route": route_name,
                    "limit": limit_name,
                    "key": value,
                    "source": source.label(),
                });
                if let (Some(map), Value::Object(a)) =
                    (body.as_object_mut(), overrides::action_json(&action))
                {
                    map.extend(a);
                }
                return json_response(StatusCode::OK, body);
            }
        };
        let request = BucketRequest::new(key, limit.algorithm, &policy, 0);
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
                    "source": source.label(),
                    "algorithm": limit.algorithm.name(),
                    "reset_after_ms": ms(o.reset_ns),
                    "reset_after_s": ceil_secs(o.reset_ns),
                    "next_token_ms": ms(o.next_token_ns),
                }),
            ),
            Err(resp) => *resp,
        }
    }

    async fn check(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let body = match read_body(session).await {
            Ok(body) => body,
            Err(resp) => return *resp,
        };
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
            &self.shared.overrides.snapshot(),
        );
        let sources = plan.sources.clone();
        let unlimited: Vec<Arc<str>> = plan
            .sources
            .iter()
            .filter(|(name, _)| {
                !plan.limits.iter().any(|(n, _)| n == name)
                    && !plan.blocked.iter().any(|(n, _)| n == name)
            })
            .map(|(name, _)| name.clone())
            .collect();
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
        let source_of = |name: &str| {
            sources
                .iter()
                .find(|(n, _)| &**n == name)
                .map_or("limit", |(_, s)| s.label())
        };
        let mut limits: Vec<Value> = decision
            .statuses
            .iter()
            .map(|s| {
                json!({
                    "name": &*s.name,
                    "source": source_of(&s.name),
                    "allowed": s.outcome.allowed,
                    "remaining": s.outcome.remaining,
                    "capacity": s.policy.burst,
                    "algorithm": s.algorithm.name(),
                    "reset_after_ms": ms(s.outcome.reset_ns),
                    "retry_after_ms": ms(s.outcome.retry_ns),
                })
            })
            .collect();
        // Limits a runtime override takes off this key, and limits that block it.
        for name in &unlimited {
            limits.push(json!({"name": &**name, "source": source_of(name), "unlimited": true}));
        }
        for name in &decision.blocked {
            limits.push(json!({"name": &**name, "source": source_of(name), "allowed": false, "block": true}));
        }
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

/// The route and limit named in a path; 404 naming the one that does not exist.
fn find_limit<'a>(
    config: &'a crate::config::Config,
    route_name: &str,
    limit_name: &str,
) -> Result<(&'a crate::routes::Route, &'a Limit), Box<Response<Vec<u8>>>> {
    let Some(route) = config.router.by_name(route_name) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!("no route {route_name:?}"),
        )));
    };
    let Some(limit) = route.limits.iter().find(|l| &*l.name == limit_name) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "unknown_limit",
            format!("route {route_name:?} has no limit {limit_name:?}"),
        )));
    };
    Ok((route, limit))
}

/// The normalised key value given as `?key=VALUE` once per key part, in order: the value a
/// request's bucket is named by ([`keys::value_from_parts`], as YAML `overrides` keys).
fn key_value(
    config: &crate::config::Config,
    limit: &Limit,
    query: Option<&str>,
) -> Result<String, Box<Response<Vec<u8>>>> {
    let given = query_all(query, "key");
    keys::value_from_parts(&limit.key, &given, config.client_ip.ipv6_prefix).map_err(|why| {
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
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_key",
            format!(
                "limit {:?} has {} key part(s) {parts:?}: give ?key=VALUE once per part, in order (got {}): {why}",
                &*limit.name,
                parts.len(),
                given.len()
            ),
        ))
    })
}

/// Reads a request body of at most [`MAX_BODY`] bytes.
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Box<Response<Vec<u8>>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(Box::new(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("at most {MAX_BODY} bytes"),
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    e.to_string(),
                )))
            }
        }
    }
}

/// A 400 naming the body field at fault.
fn bad_field(field: &str, message: impl Into<String>) -> Box<Response<Vec<u8>>> {
    Box::new(json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": "bad_override", "field": field, "message": message.into()}),
    ))
}

/// The action of a `PUT /v1/overrides/...` body: `{"rate": "N/u", "burst": N}` (either may be
/// left out, as in YAML `overrides`: no burst is the rate's count, no rate the limit's own),
/// `{"unlimited": true}` or `{"block": true}`.
fn parse_override(body: &[u8], limit: &Limit) -> Result<Action, Box<Response<Vec<u8>>>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        bad_field(
            "",
            format!(
                "expected {{\"rate\": \"N/s|m|h|d\", \"burst\": N}}, {{\"unlimited\": true}} or {{\"block\": true}}: {e}"
            ),
        )
    })?;
    let Value::Object(map) = value else {
        return Err(bad_field("", "expected a JSON object"));
    };
    for name in map.keys() {
        if !matches!(name.as_str(), "rate" | "burst" | "unlimited" | "block") {
            return Err(bad_field(
                name,
                "unknown field; expected rate, burst, unlimited or block",
            ));
        }
    }
    for flag in ["unlimited", "block"] {
        if let Some(v) = map.get(flag) {
            if v != &Value::Bool(true) {
                return Err(bad_field(
                    flag,
                    format!("must be true (delete the override to lift it), got {v}"),
                ));
            }
        }
    }
    let policy_given = map.contains_key("rate") || map.contains_key("burst");
    let given: Vec<&str> = [
        ("rate/burst", policy_given),
        ("unlimited", map.contains_key("unlimited")),
        ("block", map.contains_key("block")),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| *n)
    .collect();
    match given.as_slice() {
        [] => {
            return Err(bad_field(
                "",
                "give rate and/or burst, unlimited: true or block: true",
            ))
        }
        ["unlimited"] => return Ok(Action::Unlimited),
        ["block"] => return Ok(Action::Block),
        ["rate/burst"] => {}
        more => {
            return Err(bad_field(
                more.get(1).copied().unwrap_or(""),
                format!("give only one of rate/burst, unlimited or block (got {more:?})"),
            ))
        }
    }
    let rate = match map.get("rate") {
        None => limit.policy.rate,
        Some(Value::String(text)) => Rate::parse(text).map_err(|e| bad_field("rate", e))?,
        Some(other) => {
            return Err(bad_field(
                "rate",
                format!("expected a string like \"10/s\", got {other}"),
            ))
        }
    };
    let burst = match map.get("burst") {
        None => rate.count,
        // A window's quota is its rate's count: a burst would say something else.
        Some(_) if limit.algorithm != crate::limiter::Algorithm::TokenBucket => {
            return Err(bad_field(
                "burst",
                format!(
                    "a {} limit's quota is its rate's count; give only rate",
                    limit.algorithm.name()
                ),
            ))
        }
        Some(v) => match v.as_u64() {
            Some(0) | None => {
                return Err(bad_field(
                    "burst",
                    format!("must be a whole number at least 1, got {v}"),
                ))
            }
            Some(b) => b,
        },
    };
    let policy = Policy { rate, burst };
    limit.algorithm.check_precision(&policy).map_err(|e| {
        let field = if limit.algorithm == crate::limiter::Algorithm::TokenBucket {
            "burst"
        } else {
            "rate"
        };
        bad_field(field, e)
    })?;
    if burst < limit.cost {
        return Err(bad_field(
            "burst",
            format!(
                "burst {burst} is below the limit's cost {}: no request of this key could ever pass (to deny it, use block)",
                limit.cost
            ),
        ));
    }
    Ok(Action::Policy(policy))
}

/// Whether going from `old` to `new` lets more through: a policy at least as large in burst
/// and rate (and not the same), or an unblock.
fn raises(old: &Action, new: &Action) -> bool {
    match (old, new) {
        (Action::Policy(o), Action::Policy(n)) => {
            o != n && n.burst >= o.burst && n.rate.interval_ns() <= o.rate.interval_ns()
        }
        (Action::Block, Action::Policy(_)) => true,
        _ => false,
    }
}

/// The `change` label of an action, for `tollgate_override_changes_total`.
fn action_label(action: Option<&Action>) -> &'static str {
    match action {
        None => "delete",
        Some(Action::Policy(_)) => "set",
        Some(Action::Unlimited) => "unlimited",
        Some(Action::Block) => "block",
    }
}

/// Most runtime overrides held: every instance reloads the whole table every few seconds (one
/// `HGETALL` in a script, which Redis runs while decisions wait), so it is kept small.
pub const MAX_OVERRIDES: usize = 10_000;

/// Most overrides one list page holds, and the default.
pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn entry_json(route: &str, limit: &str, key: &str, entry: &Entry) -> Value {
    let mut v = json!({"route": route, "limit": limit, "key": key});
    if let (Some(map), Value::Object(e)) = (v.as_object_mut(), entry.to_json()) {
        map.extend(e);
    }
    v
}

impl AdminApp {
    /// Who made a change, for the audit line and the entry's `by`: the peer address, marked
    /// `token@` when the call carried the admin token. There is one token, so nothing derived
    /// from it would name a person, and a hash of it in a readable entry could be cracked
    /// offline.
    fn caller(&self, session: &ServerSession) -> String {
        let peer = session
            .client_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        match self.shared.config().admin.token {
            Some(_) => format!("token@{peer}"),
            None => format!("peer:{peer}"),
        }
    }

    /// A change the store did not confirm: it may or may not have been made. Logged as an
    /// audit line saying so, and answered 503 telling the caller to read it back.
    #[allow(clippy::too_many_arguments)]
    fn unconfirmed(
        &self,
        who: &str,
        label: &str,
        route: &str,
        limit: &str,
        key: &str,
        after: &Value,
        reason: &str,
    ) -> Response<Vec<u8>> {
        tracing::warn!(
            target: "tollgate::audit",
            who = %who,
            action = label,
            route = %route,
            limit = %limit,
            key = %key,
            after = %after,
            outcome = "unconfirmed",
            reason = %reason,
            "runtime override change not confirmed by the store"
        );
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!(
                "{reason}: the store did not confirm the change, which may or may not have been \
                 made; read it back with GET before trying again"
            ),
        )
    }

    /// `GET`/`PUT`/`DELETE /v1/overrides/{route}/{limit}?key=VALUE`; `GET` without `?key=`
    /// lists that limit's overrides.
    async fn override_endpoint(
        &self,
        session: &mut ServerSession,
        method: &Method,
        route_name: &str,
        limit_name: &str,
        query: Option<&str>,
    ) -> Response<Vec<u8>> {
        let config = self.shared.config();
        let (route, limit) = match find_limit(&config, route_name, limit_name) {
            Ok(found) => found,
            Err(resp) => {
                // An override whose route or limit the config no longer has can still be
                // deleted, by its key value as listed.
                let given = query_all(query, "key");
                if let (&Method::DELETE, [value]) = (method, given.as_slice()) {
                    let held = self.shared.overrides.snapshot();
                    if held.get(route_name, limit_name, value).is_some() {
                        return self
                            .commit(session, route_name, limit_name, None, value.clone(), None)
                            .await;
                    }
                }
                return *resp;
            }
        };
        if method == Method::GET
            && query_all(query, "key").is_empty()
            && !limit.key.parts.is_empty()
        {
            return self.list(Some(route_name), Some(limit_name), query);
        }
        let value = match key_value(&config, limit, query) {
            Ok(value) => value,
            Err(resp) => return *resp,
        };
        if method == Method::GET {
            let table = self.shared.overrides.snapshot();
            return match table.get(&route.name, &limit.name, &value) {
                Some(e) => json_response(
                    StatusCode::OK,
                    entry_json(&route.name, &limit.name, &value, e),
                ),
                None => {
                    let (_, source) = overrides::resolve(&table, &route.name, limit, &value);
                    error(
                        StatusCode::NOT_FOUND,
                        "no_override",
                        format!(
                            "no runtime override for key {value:?} of {route_name}/{limit_name} (the policy in force comes from {})",
                            source.label()
                        ),
                    )
                }
            };
        }
        let after = if method == Method::PUT {
            let body = match read_body(session).await {
                Ok(body) => body,
                Err(resp) => return *resp,
            };
            match parse_override(&body, limit) {
                Ok(action) => Some(Entry {
                    action,
                    by: self.caller(session),
                    at_ms: now_ms(),
                }),
                Err(resp) => return *resp,
            }
        } else {
            None
        };
        self.commit(session, route_name, limit_name, Some(limit), value, after)
            .await
    }

    /// Writes one change, resets the key's bucket, counts it and logs the audit line.
    /// `limit` is `None` for an override whose limit the config no longer has.
    async fn commit(
        &self,
        session: &ServerSession,
        route_name: &str,
        limit_name: &str,
        limit: Option<&Limit>,
        value: String,
        after: Option<Entry>,
    ) -> Response<Vec<u8>> {
        let who = self.caller(session);
        let slot = self.shared.store();
        // A change is rare and must not half-happen for a tight decision timeout: the write
        // and the reload after it each get up to a second.
        let timeout = slot.config.redis.timeout.max(Duration::from_secs(2));
        let held = self.shared.overrides.snapshot();
        let id = (
            route_name.to_string(),
            limit_name.to_string(),
            value.clone(),
        );
        let shown = |e: &Option<Entry>| {
            e.as_ref()
                .map_or(Value::Null, |e| overrides::action_json(&e.action))
        };
        let label = action_label(after.as_ref().map(|e| &e.action));
        let change = self
            .shared
            .overrides
            .change(&slot, id, after.clone(), MAX_OVERRIDES);
        let before = match tokio::time::timeout(timeout, change).await {
            Ok(Ok(before)) => before,
            Ok(Err(ChangeError::Full { held, cap })) => {
                return error(
                    StatusCode::CONFLICT,
                    "too_many_overrides",
                    format!(
                        "{held} runtime overrides are held, the most there may be ({cap}): delete some first"
                    ),
                )
            }
            Ok(Err(ChangeError::Store(e))) => return self.unconfirmed(&who, label, route_name, limit_name, &value, &shown(&after), &e.to_string()),
            Err(_) => return self.unconfirmed(&who, label, route_name, limit_name, &value, &shown(&after), "store call timed out"),
        };
        self.shared.overrides.reload_after_change(&slot).await;
        if after.is_none() && before.is_none() {
            return error(
                StatusCode::NOT_FOUND,
                "no_override",
                format!("no runtime override for key {value:?} of {route_name}/{limit_name}"),
            );
        }
        // A raise (or an unblock) starts the bucket full under the new policy; a lowering
        // keeps its state, read under the new policy (a reset would hand an exhausted client
        // a fresh burst, at the old policy on instances that have not yet seen the change).
        let key = bucket_key(route_name, limit_name, &value);
        let raised = limit.is_some_and(|limit| {
            let old = overrides::resolve(&held, route_name, limit, &value).0;
            let new =
                overrides::resolve(&self.shared.overrides.snapshot(), route_name, limit, &value).0;
            raises(&old, &new)
        });
        if raised {
            if bounded(timeout, slot.store.reset(&key)).await.is_err() {
                tracing::warn!(bucket = %key, "resetting the bucket after an override change failed");
            }
            self.shared.decider.forget(&key).await;
        } else {
            self.shared.decider.deny_cache.forget(&key);
        }
        self.shared
            .metrics
            .override_changes
            .with_label_values(&[label])
            .inc();
        tracing::info!(
            target: "tollgate::audit",
            who = %who,
            action = label,
            route = %route_name,
            limit = %limit_name,
            key = %value,
            before = %shown(&before),
            after = %shown(&after),
            "runtime override changed"
        );
        let mut body = json!({
            "route": route_name,
            "limit": limit_name,
            "key": value,
            "before": shown(&before),
        });
        match &after {
            Some(e) => {
                body["override"] = e.to_json();
                body["source"] = Value::from(Source::RuntimeOverride.label());
            }
            None => {
                body["deleted"] = Value::Bool(true);
                let table = self.shared.overrides.snapshot();
                body["source"] = limit.map_or(Value::Null, |limit| {
                    Value::from(
                        overrides::resolve(&table, route_name, limit, &value)
                            .1
                            .label(),
                    )
                });
            }
        }
        json_response(StatusCode::OK, body)
    }

    /// `GET /v1/overrides[/{route}[/{limit}]]?limit=N&cursor=C`: overrides in (route, limit,
    /// key) order, `limit` (default 100, at most 1000) to a page; `next_cursor` continues.
    fn list(
        &self,
        route: Option<&str>,
        limit: Option<&str>,
        query: Option<&str>,
    ) -> Response<Vec<u8>> {
        let page = match query_all(query, "limit").first() {
            None => DEFAULT_PAGE,
            Some(n) => match n.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_limit",
                        format!("limit is the page size: 1 to {MAX_PAGE}, got {n:?}"),
                    )
                }
            },
        };
        let after = match query_all(query, "cursor").first() {
            None => None,
            Some(c) => match unhex(c)
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|f| overrides::parse_field(&f))
            {
                Some(id) => Some(id),
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_cursor",
                        "cursor is the next_cursor of a previous page",
                    )
                }
            },
        };
        let table = self.shared.overrides.snapshot();
        let mut items = Vec::new();
        let mut next = Value::Null;
        for (r, l, v, e) in table.iter(route, limit) {
            if let Some((ar, al, av)) = &after {
                if (r, l, v) <= (ar.as_str(), al.as_str(), av.as_str()) {
                    continue;
                }
            }
            if items.len() == page {
                if let Some(Value::Object(last)) = items.last() {
                    let field = overrides::field(
                        last.get("route").and_then(Value::as_str).unwrap_or(""),
                        last.get("limit").and_then(Value::as_str).unwrap_or(""),
                        last.get("key").and_then(Value::as_str).unwrap_or(""),
                    );
                    next = Value::from(hex(field.as_bytes()));
                }
                break;
            }
            items.push(entry_json(r, l, v, e));
        }
        json_response(
            StatusCode::OK,
            json!({"overrides": items, "held": table.len(), "next_cursor": next}),
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

/// 401 with `WWW-Authenticate: Bearer`.
fn unauthorized(message: &str) -> Response<Vec<u8>> {
    let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    resp
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
            return unauthorized("this call needs Authorization: Bearer <admin token>");
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
        // Runtime overrides list the keys an operator singled out (customers, abusers): read
        // only with the token too.
        if !mutating
            && decoded.first().map(String::as_str) == Some("v1")
            && decoded.get(1).map(String::as_str) == Some("overrides")
            && !self.authorized(session)
        {
            return unauthorized(
                "runtime overrides are read with Authorization: Bearer <admin token>",
            );
        }
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
            ("GET", ["v1", "overrides"]) => self.list(None, None, query.as_deref()),
            ("GET", ["v1", "overrides", route]) => self.list(Some(route), None, query.as_deref()),
            ("GET" | "PUT" | "DELETE", ["v1", "overrides", route, limit]) => {
                self.override_endpoint(session, &method, route, limit, query.as_deref())
                    .await
            }
            (
                _,
                ["health" | "ready" | "metrics"]
                | ["v1", "check"]
                | ["v1", "limits", _, _]
                | ["v1", "overrides"]
                | ["v1", "overrides", _]
                | ["v1", "overrides", _, _],
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path}"),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint {path}"),
            ),
        }
    }
}
