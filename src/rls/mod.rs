//! The Envoy rate-limit service (`envoy.service.ratelimit.v3`): what one `ShouldRateLimit` call
//! comes to. Its descriptors are walked down the domain's tree (`config::rls`), each matched
//! limit becomes a bucket request named as a proxied request's would be (a shared limit's key
//! value is derived by the same rules, and its runtime override applies, so both count against
//! one bucket under one policy), and every enforced
//! bucket of the call is decided together, all-or-nothing, by the decider (deny cache, breaker,
//! fallback) in one store call; `shadow_mode` limits are decided in a second call that never
//! refuses. The answer is one status per descriptor, in order, and the rate-limit headers the
//! proxy writes, for Envoy to add. The gRPC server, health and shutdown are in [`service`]; the
//! connection cap and idle timeouts in [`conn`].

pub mod conn;
pub mod service;

use crate::config::rls::{Domain, Target};
use crate::keys;
use crate::limiter::decider::{DecidedBy, Verdict};
use crate::limiter::overrides::{self, Action, OverrideTable};
use crate::limiter::plan::{bucket_key, Plan};
use crate::limiter::{ceil_secs, Decision, Limit, Policy, StoreKind};
use crate::metrics::RequestDecision;
use crate::proxy::response;
use crate::state::Shared;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use std::collections::HashMap;

/// Most descriptors one call may carry.
pub const MAX_DESCRIPTORS: usize = 64;
/// Most entries one descriptor may carry.
pub const MAX_ENTRIES: usize = 32;

/// A call that cannot be answered as sent (gRPC `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

/// A call's answer and how it is counted.
#[derive(Debug)]
pub struct Answer {
    pub response: RateLimitResponse,
    pub counted_as: RequestDecision,
    /// The `domain` label: the domain's name when configured, else empty.
    pub domain_label: String,
}

/// Which of a call's two decisions a bucket is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Enforced,
    Shadow,
}

/// What one descriptor came to before deciding.
#[derive(Debug, Clone)]
enum Matched {
    /// No limit applies (unknown domain, no node, a node without a limit, `unlimited`).
    NoLimit,
    /// Bucket `index` of the plan for `mode`.
    Bucket { mode: Mode, index: usize },
    /// Over the limit without asking the store: the value cannot be read for the shared
    /// limit's key source (an `ip` part given no address). Refused rather than counted in a
    /// bucket of its own, so that respelling an address never buys a fresh bucket.
    Refused {
        name: std::sync::Arc<str>,
        policy: Policy,
    },
    /// A shared limit whose key a runtime override blocks: the side `mode` is denied.
    Blocked { mode: Mode },
}

/// The buckets of one decision, each once: descriptors naming the same bucket share it, their
/// costs added (so one call never reads a bucket twice).
#[derive(Default)]
struct Buckets<'c> {
    entries: Vec<BucketEntry<'c>>,
    by_key: HashMap<String, usize>,
    /// Shared limits whose key a runtime override blocks: the whole side is denied, nothing
    /// is charged (as for a proxied request).
    blocked: Vec<(std::sync::Arc<str>, Policy)>,
}

struct BucketEntry<'c> {
    route: &'c str,
    limit: &'c Limit,
    value: String,
    cost: u64,
    policy: Policy,
}

impl<'c> Buckets<'c> {
    /// `policy`: the one in force for this key (runtime override, YAML override or limit).
    fn add(
        &mut self,
        route: &'c str,
        limit: &'c Limit,
        value: String,
        cost: u64,
        policy: Policy,
    ) -> usize {
        let key = bucket_key(route, &limit.name, &value);
        if let Some(&index) = self.by_key.get(&key) {
            let entry = &mut self.entries[index];
            entry.cost = entry.cost.saturating_add(cost);
            return index;
        }
        let index = self.entries.len();
        self.by_key.insert(key, index);
        self.entries.push(BucketEntry {
            route,
            policy,
            limit,
            value,
            cost,
        });
        index
    }

    /// The plan of these buckets, each under the policy chosen when its descriptor matched.
    fn plan(&self) -> Plan {
        let mut plan = Plan::default();
        for e in &self.entries {
            plan.add_with_policy(e.route, e.limit, &e.value, e.cost, e.policy);
        }
        plan.blocked.extend(self.blocked.iter().cloned());
        plan
    }
}

/// Checks the shape of a call: a domain, 1 to [`MAX_DESCRIPTORS`] descriptors of 1 to
/// [`MAX_ENTRIES`] entries, non-empty keys. Only the shape, which Envoy's config decides: a
/// value (which a client may choose, through a header) never makes the call invalid, since
/// an invalid call lets Envoy fail open for every descriptor in it. Long values are hashed
/// like any key value; the message size is capped by the server.
pub fn validate(req: &RateLimitRequest) -> Result<(), InvalidRequest> {
    let bad = |m: String| Err(InvalidRequest(m));
    if req.domain.is_empty() {
        return bad("domain must not be empty".into());
    }
    if req.descriptors.is_empty() {
        return bad("descriptors must not be empty".into());
    }
    if req.descriptors.len() > MAX_DESCRIPTORS {
        return bad(format!(
            "{} descriptors; at most {MAX_DESCRIPTORS}",
            req.descriptors.len()
        ));
    }
    for (i, d) in req.descriptors.iter().enumerate() {
        if d.entries.is_empty() {
            return bad(format!("descriptors[{i}] has no entries"));
        }
        if d.entries.len() > MAX_ENTRIES {
            return bad(format!(
                "descriptors[{i}] has {} entries; at most {MAX_ENTRIES}",
                d.entries.len()
            ));
        }
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.is_empty() {
                return bad(format!(
                    "descriptors[{i}].entries[{j}].key must not be empty"
                ));
            }
        }
    }
    Ok(())
}

/// A cost from `hits_addend`: 0 (unset) means 1.
fn hits(addend: u64) -> u64 {
    addend.max(1)
}

/// The key value of an own limit: every entry's value, normalised like a request's key parts.
fn own_value(entries: &[(&str, &str)]) -> String {
    let mut value = String::new();
    for (i, (_, v)) in entries.iter().enumerate() {
        if i > 0 {
            value.push(keys::PART_SEPARATOR);
        }
        keys::append_normalized(v.as_bytes(), &mut value);
    }
    value
}

/// Walks one descriptor down the domain and adds its bucket, if any.
fn match_descriptor<'c>(
    domain: &'c Domain,
    entries: &[(&str, &str)],
    cost: u64,
    ipv6_prefix: u8,
    overrides: &OverrideTable,
    enforced: &mut Buckets<'c>,
    shadow: &mut Buckets<'c>,
) -> Matched {
    let Some(path) = domain.find(entries.iter().copied()) else {
        return Matched::NoLimit;
    };
    let Some(leaf) = path.last() else {
        return Matched::NoLimit;
    };
    match &leaf.target {
        None | Some(Target::Unlimited) => Matched::NoLimit,
        Some(Target::Own { limit, shadow: s }) => {
            let (mode, buckets) = if *s {
                (Mode::Shadow, shadow)
            } else {
                (Mode::Enforced, enforced)
            };
            let index = buckets.add(
                &domain.bucket_route,
                limit,
                own_value(entries),
                cost,
                limit.policy,
            );
            Matched::Bucket { mode, index }
        }
        Some(Target::Shared { route, limit }) => {
            let Some(limit) = route.limits.get(*limit) else {
                return Matched::NoLimit;
            };
            // Values named by `as:` on the way; none named: the last entry's value fills the
            // limit's one key part (validation allows that only for a one-source key).
            let mut given: Vec<(&keys::KeySource, &str)> = path
                .iter()
                .zip(entries)
                .filter_map(|(node, (_, v))| node.as_source.as_ref().map(|s| (s, *v)))
                .collect();
            if given.is_empty() {
                if let (Some(source), Some((_, v))) = (
                    limit.key.parts.first().and_then(|p| p.alternatives.first()),
                    entries.last(),
                ) {
                    given.push((source, v));
                }
            }
            let anonymous = limit.on_missing_key == crate::limiter::OnMissingKey::Anonymous;
            let mut value = String::new();
            match keys::derive_from_named(&limit.key, &given, ipv6_prefix, anonymous, &mut value) {
                Ok(true) => {}
                Ok(false) => return Matched::NoLimit,
                Err(e) => {
                    tracing::debug!(route = %route.name, limit = %limit.name, error = %e,
                        "rate-limit service: descriptor value refused");
                    if route.shadow {
                        return Matched::NoLimit;
                    }
                    return Matched::Refused {
                        name: limit.name.clone(),
                        policy: limit.policy,
                    };
                }
            }
            let (mode, buckets) = if route.shadow {
                (Mode::Shadow, shadow)
            } else {
                (Mode::Enforced, enforced)
            };
            // A shared limit takes the route's runtime overrides, as its proxied requests do.
            let policy = match overrides::resolve(overrides, &route.name, limit, &value).0 {
                Action::Policy(p) => p,
                Action::Unlimited => return Matched::NoLimit,
                Action::Block => {
                    buckets
                        .blocked
                        .push((limit.name.clone(), limit.policy_for(&value)));
                    return Matched::Blocked { mode };
                }
            };
            let index = buckets.add(&route.name, limit, value, cost, policy);
            Matched::Bucket { mode, index }
        }
    }
}

/// The `current_limit` of a status: the configured policy (not a fallback share).
fn current_limit(name: &str, policy: &Policy) -> RateLimit {
    let unit = match policy.rate.period.as_secs() {
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86_400 => Unit::Day,
        _ => Unit::Unknown,
    };
    RateLimit {
        name: name.to_string(),
        requests_per_unit: u32::try_from(policy.rate.count).unwrap_or(u32::MAX),
        unit: unit as i32,
    }
}

fn duration(ns: u64) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

/// One side's verdict, as statuses read it.
enum Outcome {
    /// Per bucket, in plan order.
    Decided {
        decision: Decision,
        fallback: bool,
    },
    AllowFallback,
    DenyFallback {
        retry_after_ns: u64,
    },
    /// No bucket on this side.
    Empty,
}

impl Outcome {
    fn from_verdict(verdict: Verdict) -> Outcome {
        match verdict {
            Verdict::Decided { decision, by } => Outcome::Decided {
                decision,
                fallback: by == DecidedBy::Store(StoreKind::LocalFallback),
            },
            Verdict::AllowFallback => Outcome::AllowFallback,
            Verdict::DenyFallback { retry_after_ns } => Outcome::DenyFallback { retry_after_ns },
        }
    }

    fn denied(&self) -> bool {
        match self {
            Outcome::Decided { decision, .. } => !decision.allowed,
            Outcome::DenyFallback { .. } => true,
            Outcome::AllowFallback | Outcome::Empty => false,
        }
    }

    fn fallback(&self) -> bool {
        match self {
            Outcome::Decided { fallback, .. } => *fallback,
            Outcome::AllowFallback | Outcome::DenyFallback { .. } => true,
            Outcome::Empty => false,
        }
    }
}

async fn decide_side(shared: &Shared, buckets: &Buckets<'_>) -> Outcome {
    if buckets.entries.is_empty() && buckets.blocked.is_empty() {
        return Outcome::Empty;
    }
    let config = shared.config();
    let slot = shared.store();
    let verdict = shared
        .decider
        .decide_plan(&slot, &config.breaker, buckets.plan())
        .await;
    Outcome::from_verdict(verdict)
}

/// The status of a descriptor whose bucket is `index` of a side that came to `outcome`.
fn status(
    entry: &BucketEntry<'_>,
    outcome: &Outcome,
    index: usize,
    mode: Mode,
) -> DescriptorStatus {
    let limit = Some(current_limit(&entry.limit.name, &entry.policy));
    let (over, remaining, wait_ns) = match outcome {
        Outcome::Decided { decision, .. } => match decision.statuses.get(index) {
            Some(s) if !s.outcome.allowed => {
                let wait = if s.outcome.retry_ns > 0 {
                    s.outcome.retry_ns
                } else {
                    s.outcome.reset_ns
                };
                (true, s.outcome.remaining, wait)
            }
            Some(s) => (false, s.outcome.remaining, s.outcome.reset_ns),
            None => (false, 0, 0),
        },
        Outcome::DenyFallback { retry_after_ns } => (true, 0, *retry_after_ns),
        Outcome::AllowFallback | Outcome::Empty => (false, 0, 0),
    };
    let code = if over && mode == Mode::Enforced {
        Code::OverLimit
    } else {
        Code::Ok
    };
    DescriptorStatus {
        code: code as i32,
        current_limit: limit,
        limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(duration(wait_ns)),
        quota: None,
    }
}

/// Answers one call.
pub async fn should_rate_limit(
    shared: &Shared,
    req: &RateLimitRequest,
) -> Result<Answer, InvalidRequest> {
    validate(req)?;
    let config = shared.config();
    let domain = config.rls.as_ref().and_then(|r| r.domains.get(&req.domain));
    let Some(domain) = domain else {
        // As envoyproxy/ratelimit: an unknown domain limits nothing.
        return Ok(Answer {
            response: RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses: req
                    .descriptors
                    .iter()
                    .map(|_| DescriptorStatus {
                        code: Code::Ok as i32,
                        ..DescriptorStatus::default()
                    })
                    .collect(),
                ..RateLimitResponse::default()
            },
            counted_as: RequestDecision::NoRoute,
            domain_label: String::new(),
        });
    };
    let ipv6_prefix = config.client_ip.ipv6_prefix;
    let request_cost = hits(u64::from(req.hits_addend));
    let table = shared.overrides.snapshot();
    let mut enforced = Buckets::default();
    let mut shadow = Buckets::default();
    let mut matched = Vec::with_capacity(req.descriptors.len());
    for d in &req.descriptors {
        let entries: Vec<(&str, &str)> = d
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        let cost = d.hits_addend.map_or(request_cost, |h| hits(h.value));
        matched.push(match_descriptor(
            domain,
            &entries,
            cost,
            ipv6_prefix,
            &table,
            &mut enforced,
            &mut shadow,
        ));
    }
    // A refused descriptor refuses the call: the other enforced buckets are not charged
    // (all-or-nothing), so they are not asked.
    let refused = matched.iter().any(|m| matches!(m, Matched::Refused { .. }));
    let (enforced_outcome, shadow_outcome) = futures::join!(
        async {
            if refused {
                Outcome::Empty
            } else {
                decide_side(shared, &enforced).await
            }
        },
        decide_side(shared, &shadow)
    );
    let mut statuses = Vec::with_capacity(matched.len());
    for m in &matched {
        statuses.push(match m {
            Matched::NoLimit => DescriptorStatus {
                code: Code::Ok as i32,
                ..DescriptorStatus::default()
            },
            Matched::Refused { name, policy } => DescriptorStatus {
                code: Code::OverLimit as i32,
                current_limit: Some(current_limit(name, policy)),
                ..DescriptorStatus::default()
            },
            // No wait lifts a block: no reset time is given.
            &Matched::Blocked { mode } => DescriptorStatus {
                code: if mode == Mode::Enforced {
                    Code::OverLimit
                } else {
                    Code::Ok
                } as i32,
                ..DescriptorStatus::default()
            },
            &Matched::Bucket { mode, index } => {
                let (buckets, outcome) = match mode {
                    Mode::Enforced => (&enforced, &enforced_outcome),
                    Mode::Shadow => (&shadow, &shadow_outcome),
                };
                match buckets.entries.get(index) {
                    Some(entry) => status(entry, outcome, index, mode),
                    None => DescriptorStatus::default(),
                }
            }
        });
    }
    let over = refused || enforced_outcome.denied();
    let counted_as = match (over, enforced_outcome.fallback(), shadow_outcome.denied()) {
        (true, true, _) => RequestDecision::FallbackLimited,
        (true, false, _) => RequestDecision::Limited,
        (false, _, true) => RequestDecision::ShadowLimited,
        (false, true, false) => RequestDecision::FallbackAllowed,
        (false, false, false) => RequestDecision::Allowed,
    };
    let headers = match config.rls.as_ref() {
        Some(rls) => response_headers(&enforced_outcome, rls.headers),
        None => Vec::new(),
    };
    Ok(Answer {
        response: RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add: headers,
            ..RateLimitResponse::default()
        },
        counted_as,
        domain_label: domain.name.to_string(),
    })
}

/// The headers the proxy would write for the enforced decision, and `Retry-After` on a refusal.
fn response_headers(outcome: &Outcome, flags: crate::routes::HeaderFlags) -> Vec<HeaderValue> {
    let mut out = Vec::new();
    let mut push = |key: &'static str, value: http::HeaderValue| {
        out.push(HeaderValue {
            key: key.to_string(),
            value: value.to_str().unwrap_or_default().to_string(),
            ..HeaderValue::default()
        });
        Ok::<(), std::convert::Infallible>(())
    };
    let _ = match outcome {
        Outcome::Decided { decision, .. } => {
            response::each_rate_limit_header(decision, flags, &mut push).and_then(|()| {
                match response::retry_after_secs(decision).filter(|_| !decision.allowed) {
                    Some(secs) => push("Retry-After", secs.into()),
                    None => Ok(()),
                }
            })
        }
        Outcome::DenyFallback { retry_after_ns } => {
            push("Retry-After", ceil_secs(*retry_after_ns).max(1).into())
        }
        Outcome::AllowFallback | Outcome::Empty => Ok(()),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;

    fn request(descriptors: Vec<Vec<(&str, &str)>>) -> RateLimitRequest {
        RateLimitRequest {
            domain: "edge".into(),
            descriptors: descriptors
                .into_iter()
                .map(|entries| RateLimitDescriptor {
                    entries: entries
                        .into_iter()
                        .map(|(k, v)| Entry {
                            key: k.into(),
                            value: v.into(),
                        })
                        .collect(),
                    ..RateLimitDescriptor::default()
                })
                .collect(),
            hits_addend: 0,
        }
    }

    #[test]
    fn malformed_calls_are_refused_with_a_reason() {
        assert_eq!(validate(&request(vec![vec![("k", "v")]])), Ok(()));
        // A value is never a reason to refuse the call (Envoy would fail open for all of it).
        let long = "x".repeat(1 << 20);
        assert_eq!(validate(&request(vec![vec![("k", long.as_str())]])), Ok(()));
        let mut no_domain = request(vec![vec![("k", "v")]]);
        no_domain.domain.clear();
        let cases = [
            (no_domain, "domain must not be empty"),
            (request(vec![]), "descriptors must not be empty"),
            (request(vec![vec![]]), "descriptors[0] has no entries"),
            (
                request(vec![vec![("", "v")]]),
                "entries[0].key must not be empty",
            ),
            (
                request(vec![vec![("k", "v")]; MAX_DESCRIPTORS + 1]),
                "at most 64",
            ),
            (
                request(vec![vec![("k", "v"); MAX_ENTRIES + 1]]),
                "at most 32",
            ),
        ];
        for (req, want) in cases {
            let got = validate(&req);
            assert!(
                got.as_ref().is_err_and(|e| e.0.contains(want)),
                "{want}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn shared_limits_take_the_routes_runtime_overrides() {
        let yaml = r#"
listen: ["127.0.0.1:1"]
admin: { listen: "127.0.0.1:2" }
upstreams: { app: { targets: ["127.0.0.1:9"] } }
routes:
  - name: api
    match: { path_prefix: "/" }
    upstream: app
    limits:
      - { name: per_key, key: ["header:x-api-key"], rate: "1/h", burst: 2 }
rls:
  listen: "127.0.0.1:3"
  domains:
    - domain: edge
      descriptors:
        - key: api_key
          share: { route: api, limit: per_key }
        - key: plan
          rate_limit: { unit: hour, requests_per_unit: 1 }
"#;
        let config = crate::config::load_text(yaml, std::path::Path::new("t.yaml")).unwrap();
        let shared = crate::server::build_shared(config).unwrap();
        let slot = shared.store();
        let rate = crate::limiter::Rate::parse("1/h").unwrap();
        for (key, action) in [
            ("blocked", Action::Block),
            ("free", Action::Unlimited),
            ("more", Action::Policy(Policy { rate, burst: 5 })),
        ] {
            let entry = crate::limiter::overrides::Entry {
                action,
                by: "test".into(),
                at_ms: 0,
            };
            let id = ("api".into(), "per_key".into(), key.into());
            shared
                .overrides
                .change(&slot, id, Some(entry), usize::MAX)
                .await
                .unwrap();
        }
        let over = Code::OverLimit as i32;
        let ok = Code::Ok as i32;
        let call = |descriptors: Vec<Vec<(&'static str, &'static str)>>| {
            let shared = shared.clone();
            async move {
                should_rate_limit(&shared, &request(descriptors))
                    .await
                    .unwrap()
                    .response
            }
        };
        // Blocked: the call is over the limit, with no reset time, and the call's other
        // bucket is not charged (all-or-nothing, as for a proxied request).
        let r = call(vec![vec![("api_key", "blocked")], vec![("plan", "p")]]).await;
        assert_eq!(r.overall_code, over);
        assert_eq!(r.statuses[0].code, over);
        assert_eq!(r.statuses[0].duration_until_reset, None);
        assert!(!r
            .response_headers_to_add
            .iter()
            .any(|h| h.key == "Retry-After"));
        assert_eq!(call(vec![vec![("plan", "p")]]).await.overall_code, ok);
        // Unlimited: the shared limit does not apply.
        for _ in 0..5 {
            assert_eq!(call(vec![vec![("api_key", "free")]]).await.overall_code, ok);
        }
        // A policy: burst 5 instead of 2, the same bucket a proxied request uses.
        for _ in 0..5 {
            let r = call(vec![vec![("api_key", "more")]]).await;
            assert_eq!(r.overall_code, ok);
            assert_eq!(
                r.statuses[0]
                    .current_limit
                    .as_ref()
                    .map(|l| l.requests_per_unit),
                Some(1)
            );
        }
        assert_eq!(
            call(vec![vec![("api_key", "more")]]).await.overall_code,
            over
        );
        assert_eq!(
            call(vec![vec![("api_key", "other")]]).await.overall_code,
            ok
        );
    }

    #[test]
    fn an_own_fixed_window_counts_per_window_and_says_so() {
        let yaml = "upstreams: { app: { targets: [\"127.0.0.1:9\"] } }\nroutes: [ { name: r, upstream: app } ]\nrls:\n  listen: \"127.0.0.1:18081\"\n  domains:\n    - domain: edge\n      descriptors:\n        - {key: k, rate_limit: {unit: minute, requests_per_unit: 3, algorithm: fixed_window}}\n";
        let config = crate::config::parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let shared = crate::server::build_shared(config).unwrap_or_else(|e| panic!("{e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let codes: Vec<i32> = (0..4)
            .map(|_| {
                runtime
                    .block_on(should_rate_limit(&shared, &request(vec![vec![("k", "v")]])))
                    .unwrap_or_else(|e| panic!("{e:?}"))
                    .response
                    .overall_code
            })
            .collect();
        let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
        assert_eq!(codes, [ok, ok, ok, over]);
        let answer = runtime
            .block_on(should_rate_limit(&shared, &request(vec![vec![("k", "v")]])))
            .unwrap_or_else(|e| panic!("{e:?}"));
        let header = |name: &str| {
            answer
                .response
                .response_headers_to_add
                .iter()
                .find(|h| h.key == name)
                .map(|h| h.value.clone())
        };
        assert_eq!(
            header("RateLimit-Policy").as_deref(),
            Some("\"k\";q=3;w=60")
        );
        let status = &answer.response.statuses[0];
        let wait = status
            .duration_until_reset
            .as_ref()
            .map_or(0, |d| d.seconds);
        assert!((0..=60).contains(&wait), "until the minute turns: {wait}");
    }

    #[test]
    fn own_values_are_normalised_like_key_parts() {
        assert_eq!(own_value(&[("a", "1.2.3.4"), ("b", "x")]), "1.2.3.4|x");
        // A value that could spell a separator or a hash tag is hashed, never written raw.
        let odd = own_value(&[("a", "x|y}{")]);
        assert!(odd.starts_with('#') && !odd.contains('|'), "{odd}");
        assert_eq!(hits(0), 1);
        assert_eq!(hits(7), 7);
    }
}
