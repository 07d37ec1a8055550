//! Planning: from a matched route and a request to the bucket requests a store decides, and
//! from the store's outcomes to one [`Decision`] for the request. A cost above a limit's burst
//! is found here ([`CapacityExceeded`]): such a request can never pass ([`RetryAfter::Never`]).

use super::overrides::{self, Action, OverrideTable, Source};
use super::{Algorithm, BucketOutcome, BucketRequest, CostHeaderFrom, Limit, OnMissingKey, Policy};
use crate::keys::{self, Derived, RequestView};
use std::collections::HashMap;
use std::sync::Arc;

/// The buckets one request touches.
#[derive(Debug, Default)]
pub struct Plan {
    pub requests: Vec<BucketRequest>,
    /// For each request: the limit's name and the policy in force (after overrides).
    pub limits: Vec<(Arc<str>, Policy)>,
    /// Limits that deny because their key is missing (`on_missing_key: deny`).
    pub missing_denied: Vec<(Arc<str>, Policy)>,
    /// Requests (by index) whose cost exceeds their limit's burst (the policy in force, after
    /// overrides, before any fallback share): they can never pass.
    pub exceeds_capacity: Vec<(usize, CapacityExceeded)>,
    /// A key source repeated with different values: the request is refused (400) and nothing
    /// is decided.
    pub ambiguous: Option<keys::KeySource>,
    /// Limits whose policy is not the limit's own, and where it came from (also limits a
    /// runtime override makes unlimited or blocks), in route order. Kept short: nothing is
    /// recorded for a limit's own policy.
    pub sources: Vec<(Arc<str>, Source)>,
    /// Limits whose key a runtime override blocks: they deny, and can never pass.
    pub blocked: Vec<(Arc<str>, Policy)>,
}

/// A request that costs more than a limit's bucket can ever hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityExceeded {
    pub limit: Arc<str>,
    pub cost: u64,
    pub capacity: u64,
}

/// The bucket's identity: `route:limit:{value}`. Braces make the value the Redis Cluster hash
/// tag; the value is normalised, never raw client input.
pub fn bucket_key(route: &str, limit: &str, value: &str) -> String {
    let mut key = String::with_capacity(route.len() + limit.len() + value.len() + 4);
    key.push_str(route);
    key.push(':');
    key.push_str(limit);
    key.push_str(":{");
    key.push_str(value);
    key.push('}');
    key
}

impl Plan {
    /// The policies as the local fallback enforces them: each instance's share of N.
    pub fn per_instance(&mut self, instances: u32) {
        for ((_, policy), r) in self.limits.iter_mut().zip(&self.requests) {
            *policy = r.algorithm.per_instance(policy, instances);
        }
    }

    /// Adds one limit whose key value is known (`None`: its key is missing), under its YAML
    /// overrides only.
    pub fn add(&mut self, route: &str, limit: &Limit, value: Option<String>, cost: u64) {
        self.add_under(&OverrideTable::EMPTY, route, limit, value, cost);
    }

    /// As [`Plan::add`], with the runtime `overrides` first (see [`overrides::resolve`]).
    pub fn add_under(
        &mut self,
        overrides: &OverrideTable,
        route: &str,
        limit: &Limit,
        value: Option<String>,
        cost: u64,
    ) {
        let Some(value) = value else {
            if limit.on_missing_key == OnMissingKey::Deny {
                self.missing_denied.push((limit.name.clone(), limit.policy));
            }
            return;
        };
        if let Some(policy) = self.policy_for(overrides, route, limit, &value) {
            self.add_with_policy(route, limit, &value, cost, policy);
        }
    }

    /// The policy `value` is decided under: runtime override, then YAML override, then the
    /// limit (the source recorded when not the limit); none for `unlimited`, and for `block`,
    /// which is recorded as blocked.
    fn policy_for(
        &mut self,
        overrides: &OverrideTable,
        route: &str,
        limit: &Limit,
        value: &str,
    ) -> Option<Policy> {
        let (action, source) = overrides::resolve(overrides, route, limit, value);
        if source != Source::Limit {
            self.sources.push((limit.name.clone(), source));
        }
        match action {
            Action::Policy(p) => Some(p),
            Action::Unlimited => None,
            Action::Block => {
                self.blocked
                    .push((limit.name.clone(), limit.policy_for(value)));
                None
            }
        }
    }

    /// As [`Plan::add_under`] for a key value that is present, written in place: `key` holds
    /// `route:limit:{` then the value (from `value_at`), so the bucket key is made without
    /// copying the value into a second string.
    fn add_keyed(
        &mut self,
        overrides: &OverrideTable,
        route: &str,
        limit: &Limit,
        mut key: String,
        value_at: usize,
        cost: u64,
    ) {
        let value = key.get(value_at..).unwrap_or_default();
        let Some(policy) = self.policy_for(overrides, route, limit, value) else {
            return;
        };
        key.push('}');
        self.push_bucket(limit, key, cost, policy);
    }

    /// Adds one bucket of `limit` for key `value` under `policy`, already chosen (the
    /// rate-limit service resolves a descriptor's overrides once, when it matches it).
    pub fn add_with_policy(
        &mut self,
        route: &str,
        limit: &Limit,
        value: &str,
        cost: u64,
        policy: Policy,
    ) {
        self.push_bucket(limit, bucket_key(route, &limit.name, value), cost, policy);
    }

    /// Adds the bucket `key` of `limit` under `policy`.
    fn push_bucket(&mut self, limit: &Limit, key: String, cost: u64, policy: Policy) {
        if cost > policy.burst {
            self.exceeds_capacity.push((
                self.requests.len(),
                CapacityExceeded {
                    limit: limit.name.clone(),
                    cost,
                    capacity: policy.burst,
                },
            ));
        }
        self.requests
            .push(BucketRequest::new(key, limit.algorithm, &policy, cost));
        self.limits.push((limit.name.clone(), policy));
    }
}

/// A cost header's value: a whole number; one too large for 64 bits is the largest cost (it
/// can never pass), not an unreadable value that falls back to the limit's own cost.
fn cost_value(text: &str) -> Option<u64> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    match digits.parse::<u64>() {
        Ok(cost) => Some(cost),
        Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            Some(u64::MAX)
        }
        Err(_) => None,
    }
}

/// Derives every limit's key and cost for this request, for the route named `route`.
/// Runtime `overrides` come first (see [`overrides::resolve`]).
pub fn plan(
    route: &str,
    limits: &[Limit],
    req: &RequestView<'_>,
    ipv6_prefix: u8,
    overrides: &OverrideTable,
) -> Plan {
    // Sized once: one bucket per limit at most.
    let mut plan = Plan {
        requests: Vec::with_capacity(limits.len()),
        limits: Vec::with_capacity(limits.len()),
        ..Plan::default()
    };
    for limit in limits {
        // The bucket key `route:limit:{value}`, the value derived in place.
        let value_at = route.len() + limit.name.len() + 3;
        let mut key = String::with_capacity(value_at + 32);
        key.push_str(route);
        key.push(':');
        key.push_str(&limit.name);
        key.push_str(":{");
        let anonymous = limit.on_missing_key == OnMissingKey::Anonymous;
        let present = match keys::derive(&limit.key, req, ipv6_prefix, anonymous, &mut key) {
            Derived::Present => true,
            Derived::Missing => false,
            Derived::Ambiguous(source) => {
                plan.ambiguous = Some(source);
                return plan;
            }
        };
        let cost_believed = limit.cost_header_from == CostHeaderFrom::Any || req.peer_trusted;
        let cost_text = match limit.cost_header.as_ref().filter(|_| cost_believed) {
            None => None,
            // A proxy that appends rather than replaces leaves the client's copy first: two
            // different values are refused like a repeated key header.
            Some(h) => match keys::single_header(req.headers, h) {
                keys::Single::One(v) => Some(v),
                keys::Single::Absent => None,
                keys::Single::Conflicting => {
                    plan.ambiguous = Some(keys::KeySource::Header(h.clone()));
                    return plan;
                }
            },
        };
        let cost = cost_text
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| cost_value(v.trim()))
            .unwrap_or(limit.cost);
        if present {
            plan.add_keyed(overrides, route, limit, key, value_at, cost);
        } else {
            plan.add_under(overrides, route, limit, None, cost);
        }
    }
    plan
}

/// Plans a decision from key values given by source (the admin `/v1/check` call).
pub fn plan_from_sources(
    route: &str,
    limits: &[Limit],
    given: &HashMap<String, String>,
    cost: Option<u64>,
    ipv6_prefix: u8,
    overrides: &OverrideTable,
) -> Plan {
    let mut plan = Plan::default();
    for limit in limits {
        let mut value = String::new();
        let anonymous = limit.on_missing_key == OnMissingKey::Anonymous;
        let present =
            keys::derive_from_sources(&limit.key, given, ipv6_prefix, anonymous, &mut value);
        plan.add_under(
            overrides,
            route,
            limit,
            present.then_some(value),
            cost.unwrap_or(limit.cost),
        );
    }
    plan
}

/// One limit's part in a decision.
#[derive(Debug, Clone)]
pub struct LimitStatus {
    pub name: Arc<str>,
    /// How the limit counts (with `policy`: the headers' quota and window).
    pub algorithm: Algorithm,
    pub policy: Policy,
    pub outcome: BucketOutcome,
}

/// The verdict on one request.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub allowed: bool,
    /// Every limit that was decided, in route order.
    pub statuses: Vec<LimitStatus>,
    /// Names of the limits that denied.
    pub violated: Vec<Arc<str>>,
    /// When the request could be admitted (the longest wait among violated limits); 0 when
    /// it never can (see `exceeds_capacity`).
    pub retry_after_ns: u64,
    /// Limits whose bucket can never hold this request's cost: no wait makes it pass.
    pub exceeds_capacity: Vec<CapacityExceeded>,
    /// Limits that block this request's key (a runtime override): no wait makes it pass.
    pub blocked: Vec<Arc<str>>,
}

/// When a request could pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// It was admitted.
    Admitted,
    /// Not before this many nanoseconds.
    After(u64),
    /// Never: its cost exceeds a limit's capacity, or a limit blocks its key.
    Never,
}

impl Decision {
    /// A request no limit applies to.
    pub fn unlimited() -> Decision {
        Decision {
            allowed: true,
            ..Decision::default()
        }
    }

    /// Combines a plan with the store's outcomes (one per bucket request, same order).
    ///
    /// A request whose cost exceeds a limit's capacity is denied by that limit whatever the
    /// store (or the deny cache) said, with no retry time.
    pub fn from_outcomes(plan: Plan, outcomes: Vec<BucketOutcome>) -> Decision {
        let mut decision = Decision {
            statuses: Vec::with_capacity(plan.limits.len()),
            ..Decision::unlimited()
        };
        let algorithms = plan.requests.iter().map(|r| r.algorithm);
        for (i, (((name, policy), mut outcome), algorithm)) in plan
            .limits
            .into_iter()
            .zip(outcomes)
            .zip(algorithms)
            .enumerate()
        {
            if plan.exceeds_capacity.iter().any(|(at, _)| *at == i) {
                outcome.allowed = false;
                outcome.retry_ns = 0;
            }
            if !outcome.allowed {
                decision.violated.push(name.clone());
                decision.retry_after_ns = decision.retry_after_ns.max(outcome.retry_ns);
            }
            decision.statuses.push(LimitStatus {
                name,
                algorithm,
                policy,
                outcome,
            });
        }
        for (name, policy) in plan.missing_denied {
            decision.retry_after_ns = decision.retry_after_ns.max(policy.rate.interval_ns());
            decision.violated.push(name);
        }
        for (_, e) in &plan.exceeds_capacity {
            if !decision.violated.contains(&e.limit) {
                decision.violated.push(e.limit.clone());
            }
        }
        for (name, _) in plan.blocked {
            decision.violated.push(name.clone());
            decision.blocked.push(name);
        }
        decision.allowed = decision.violated.is_empty();
        decision.exceeds_capacity = plan.exceeds_capacity.into_iter().map(|(_, e)| e).collect();
        if !decision.exceeds_capacity.is_empty() || !decision.blocked.is_empty() {
            decision.retry_after_ns = 0;
        }
        decision
    }

    /// When this request could pass.
    pub fn retry_after(&self) -> RetryAfter {
        if self.allowed {
            RetryAfter::Admitted
        } else if !self.exceeds_capacity.is_empty() || !self.blocked.is_empty() {
            RetryAfter::Never
        } else {
            RetryAfter::After(self.retry_after_ns)
        }
    }

    /// The status that headers describe: the lowest remaining, among the violated ones when
    /// the request was denied.
    pub fn most_restrictive(&self) -> Option<&LimitStatus> {
        self.statuses
            .iter()
            .filter(|s| self.allowed || !s.outcome.allowed)
            .min_by(|a, b| {
                a.outcome
                    .remaining
                    .cmp(&b.outcome.remaining)
                    .then(b.outcome.reset_ns.cmp(&a.outcome.reset_ns))
            })
    }
}

#[cfg(test)]
mod cost_tests {
    use super::cost_value;

    #[test]
    fn a_cost_beyond_64_bits_is_the_largest_cost_not_the_default() {
        assert_eq!(cost_value("3"), Some(3));
        assert_eq!(cost_value("18446744073709551615"), Some(u64::MAX));
        assert_eq!(cost_value("18446744073709551616"), Some(u64::MAX));
        assert_eq!(cost_value("99999999999999999999999"), Some(u64::MAX));
        assert_eq!(cost_value("+5"), Some(5));
        assert_eq!(cost_value("+18446744073709551616"), Some(u64::MAX));
        assert_eq!(cost_value("-1"), None);
        assert_eq!(cost_value("1e3"), None);
        assert_eq!(cost_value(""), None);
    }
}
