//! Rate limiting: the limit model (rate, burst, cost), the [`Store`] trait that decides a set of
//! buckets atomically, and the planning step that turns a matched route and a request into
//! bucket requests and then into a [`Decision`].
//!
//! Parts: [`settings`] (store, Redis and breaker settings), [`slot`] (the store in use, its
//! connections and readiness), [`decider`] (deny cache, breaker, one deadline, fallback → one
//! typed verdict), [`gcra`] (the token-bucket arithmetic, shared by every store), [`window`]
//! (the fixed- and sliding-window arithmetic, likewise shared), [`memory`]
//! (the sharded, bounded in-process store), [`redis`] (the Redis store, its lanes and script),
//! [`lane_conn`] (a lane's own pipelined connection to a standalone Redis), [`resp`] (the
//! Redis wire protocol it speaks),
//! [`breaker`], [`deny_cache`], [`clock`] (injected time), [`plan`] (route + request → decision),
//! [`overrides`] (the runtime overrides table and which policy applies to a key).

pub mod breaker;
pub mod clock;
pub mod decider;
pub mod deny_cache;
pub mod gcra;
pub mod lane_conn;
pub mod memory;
pub mod overrides;
pub mod plan;
pub mod redis;
pub mod resp;
pub mod settings;
pub mod slot;
pub mod window;

use crate::keys::KeySpec;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use plan::{CapacityExceeded, Decision, LimitStatus, RetryAfter};

/// `N` tokens per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub period: Duration,
}

impl Rate {
    /// Parses `N/s`, `N/m`, `N/h` or `N/d`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("expected N/s, N/m, N/h or N/d with N >= 1, got {text:?}");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        let secs = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(bad());
        }
        let rate = Rate {
            count,
            period: Duration::from_secs(secs),
        };
        // period / count < 1 µs, in exact integers.
        if u128::from(count) * u128::from(gcra::MIN_INTERVAL_NS) > rate.period.as_nanos() {
            return Err(format!(
                "{text:?} is faster than 1 token per microsecond (1000000/s), the finest rate \
                 both stores hold exactly"
            ));
        }
        Ok(rate)
    }

    /// Time for one token to drip back in, in whole nanoseconds: `period / count` rounded up,
    /// so a bucket never refills faster than configured (`7/s` is 142,857,143 ns a token). Every
    /// store uses this same integer, so they agree to the token.
    pub fn interval_ns(&self) -> u64 {
        let period = u64::try_from(self.period.as_nanos()).unwrap_or(u64::MAX);
        period.div_ceil(self.count.max(1)).max(1)
    }
}

/// How fast a bucket refills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub rate: Rate,
    pub burst: u64,
}

impl Policy {
    /// The share of one of `instances` gateways: rate/N and burst/N (at least 1).
    pub fn per_instance(&self, instances: u32) -> Policy {
        let n = instances.max(1);
        Policy {
            rate: Rate {
                count: self.rate.count,
                period: self.rate.period.saturating_mul(n),
            },
            burst: (self.burst / u64::from(n)).max(1),
        }
    }

    /// Time to refill an empty bucket, in nanoseconds (`interval_ns * burst`, saturating).
    pub fn refill_ns(&self) -> u64 {
        self.rate.interval_ns().saturating_mul(self.burst)
    }

    /// Whether both stores can hold this policy exactly: refill time at most
    /// [`gcra::MAX_REFILL_NS`] (the rate's lower bound is checked by [`Rate::parse`]).
    pub fn check_precision(&self) -> Result<(), String> {
        if self.refill_ns() > gcra::MAX_REFILL_NS {
            return Err(format!(
                "burst {} at this rate takes {} days to refill; at most {} days (2^53 ns) can be \
                 held exactly: lower the burst or raise the rate",
                self.burst,
                self.refill_ns() / 86_400_000_000_000,
                gcra::MAX_REFILL_NS / 86_400_000_000_000
            ));
        }
        Ok(())
    }

    /// Time to refill an empty bucket, in whole seconds rounded up (the IETF `w` parameter).
    pub fn window_secs(&self) -> u64 {
        ceil_secs(self.rate.interval_ns().saturating_mul(self.burst))
    }
}

/// Nanoseconds to whole seconds, rounded up.
pub fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// What a limit does when its key cannot be derived from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissingKey {
    /// The limit does not apply to this request.
    Skip,
    /// The request is denied with 429.
    Deny,
    /// The missing part counts as the literal value `anonymous`.
    Anonymous,
}

/// Whose `cost_header` a limit believes: a client could otherwise lower its own cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CostHeaderFrom {
    /// Only a request whose direct peer is in `client_ip.trusted_proxies` (the default).
    #[default]
    TrustedProxies,
    /// Any client (`cost_header_from: any`): an explicit opt-in.
    Any,
}

/// How a limit counts: a token bucket (GCRA, the default) or a counter per window of the
/// rate's period. With a window algorithm the quota is the rate's count (`100/m`: 100 per
/// minute window) and there is no separate burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Algorithm {
    /// A bucket of `burst` tokens refilling at the rate ([`gcra`]).
    #[default]
    TokenBucket,
    /// Cloudflare's sliding-window counter: the current window's count plus the previous
    /// window's, weighted by how much of it still overlaps the sliding window ([`window`]).
    SlidingWindow,
    /// A counter per aligned window of the period, reset at the boundary ([`window`]).
    FixedWindow,
}

impl Algorithm {
    /// As written in the config (`algorithm:`) and reported by the admin API.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
        }
    }

    /// Parses a config value.
    pub fn parse(text: &str) -> Result<Algorithm, String> {
        match text {
            "token_bucket" => Ok(Algorithm::TokenBucket),
            "sliding_window" => Ok(Algorithm::SlidingWindow),
            "fixed_window" => Ok(Algorithm::FixedWindow),
            other => Err(format!(
                "expected token_bucket, sliding_window or fixed_window, got {other:?}"
            )),
        }
    }

    pub fn is_window(self) -> bool {
        self != Algorithm::TokenBucket
    }

    /// The IETF `w` of a policy counted this way: the refill time of a token bucket, the
    /// window (the rate's period) of a window algorithm.
    pub fn window_secs(self, policy: &Policy) -> u64 {
        if self.is_window() {
            policy.rate.period.as_secs().max(1)
        } else {
            policy.window_secs()
        }
    }

    /// The share of one of `instances` gateways (the local fallback): a token bucket's rate/N
    /// and burst/N; a window's quota/N per the same window (at least 1).
    pub fn per_instance(self, policy: &Policy, instances: u32) -> Policy {
        if !self.is_window() {
            return policy.per_instance(instances);
        }
        let quota = (policy.burst / u64::from(instances.max(1))).max(1);
        Policy {
            rate: Rate {
                count: quota,
                period: policy.rate.period,
            },
            burst: quota,
        }
    }

    /// Whether both stores hold a policy counted this way exactly (see [`window`] for the
    /// windows' bound).
    pub fn check_precision(self, policy: &Policy) -> Result<(), String> {
        match self {
            Algorithm::TokenBucket => policy.check_precision(),
            Algorithm::FixedWindow => Ok(()),
            Algorithm::SlidingWindow => window::check_precision(policy.burst, policy.rate.period),
        }
    }
}

/// One limit of a route, validated.
#[derive(Debug)]
pub struct Limit {
    pub name: Arc<str>,
    pub key: KeySpec,
    /// How the limit counts; every override counts the same way. A window algorithm's policy
    /// has `burst` = the rate's count (the quota).
    pub algorithm: Algorithm,
    pub policy: Policy,
    pub cost: u64,
    pub cost_header: Option<http::HeaderName>,
    /// Whose `cost_header` is believed.
    pub cost_header_from: CostHeaderFrom,
    pub on_missing_key: OnMissingKey,
    /// By key value, as [`crate::keys::value_from_parts`] writes it.
    pub overrides: HashMap<String, Policy>,
}

impl Limit {
    /// The policy for a key value: its YAML override, or the limit's own (runtime overrides
    /// come first: see [`overrides::resolve`]).
    pub fn policy_for(&self, value: &str) -> Policy {
        self.overrides.get(value).copied().unwrap_or(self.policy)
    }

    /// `N/s`, `N/m`, `N/h` or `N/d`, as written.
    pub fn rate_text(policy: &Policy) -> String {
        let unit = match policy.rate.period.as_secs() {
            1 => "s",
            60 => "m",
            3600 => "h",
            86_400 => "d",
            other => return format!("{}/{}s", policy.rate.count, other),
        };
        format!("{}/{}", policy.rate.count, unit)
    }
}

/// One bucket to decide: its identity, its parameters and what this request costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketRequest {
    /// `route:limit:value` with a normalised value; unique per bucket.
    pub key: String,
    /// How the bucket counts.
    pub algorithm: Algorithm,
    /// Token bucket: nanoseconds per token ([`Rate::interval_ns`]). Windows: the window's
    /// length in nanoseconds (the rate's period, whole seconds).
    pub interval_ns: u64,
    /// Token bucket: the burst. Windows: the quota per window.
    pub burst: u64,
    pub cost: u64,
}

impl BucketRequest {
    /// The request for `key` under `policy` counted by `algorithm`.
    pub fn new(key: String, algorithm: Algorithm, policy: &Policy, cost: u64) -> BucketRequest {
        let interval_ns = if algorithm.is_window() {
            u64::try_from(policy.rate.period.as_nanos()).unwrap_or(u64::MAX)
        } else {
            policy.rate.interval_ns()
        };
        BucketRequest {
            key,
            algorithm,
            interval_ns,
            burst: policy.burst,
            cost,
        }
    }
}

/// A bucket's state after a decision (or a peek). When a decision is denied, nothing is
/// charged, and the buckets that would have admitted report their state as it really is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BucketOutcome {
    /// This bucket alone would admit the request.
    pub allowed: bool,
    /// Whole tokens left after the decision.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset_ns: u64,
    /// Time until the bucket could admit this request's cost: 0 when allowed, and 0 when the
    /// cost exceeds the burst (no wait makes it fit; see [`plan::CapacityExceeded`]).
    pub retry_ns: u64,
    /// Time until the bucket gains its next whole token (0 when full). Windows: until it can
    /// admit one more than `remaining` (the window turns over, or the previous window's weight
    /// drops by one request).
    pub next_token_ns: u64,
}

/// Which store made a decision, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis,
    LocalFallback,
}

impl StoreKind {
    pub fn label(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
            StoreKind::LocalFallback => "local_fallback",
        }
    }
}

/// Why a store could not decide.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store call timed out")]
    Timeout,
    #[error("store connection failed: {0}")]
    Connection(String),
    #[error("store script failed: {0}")]
    Script(String),
    /// The failure of one store call that decided several requests together (a batch):
    /// `call` names the call, so that the breaker counts it once, not once per request.
    #[error("{source}")]
    OfCall { call: u64, source: Box<StoreError> },
}

/// Names each failed store call (see [`StoreError::OfCall`]).
static NEXT_FAILED_CALL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl StoreError {
    /// The `kind` label of `tollgate_store_errors_total`.
    pub fn kind_label(&self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::Connection(_) => "connection",
            StoreError::Script(_) => "script",
            StoreError::OfCall { source, .. } => source.kind_label(),
        }
    }

    /// This error as the failure of one call shared by every request it carried.
    pub fn of_one_call(self) -> StoreError {
        match self {
            StoreError::OfCall { .. } => self,
            source => StoreError::OfCall {
                call: NEXT_FAILED_CALL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                source: Box::new(source),
            },
        }
    }

    /// The failed call this error belongs to, when it decided several requests.
    pub fn call(&self) -> Option<u64> {
        match self {
            StoreError::OfCall { call, .. } => Some(*call),
            _ => None,
        }
    }
}

/// Where buckets live. A decision covers every bucket of one request and is all-or-nothing:
/// either every bucket admits and all are charged, or none is charged.
#[async_trait]
pub trait Store: Send + Sync {
    fn kind(&self) -> StoreKind;
    /// Decides every bucket of one request, answering by `deadline` (past it: `Timeout`).
    async fn decide(
        &self,
        requests: &[BucketRequest],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<BucketOutcome>, StoreError>;
    /// The bucket's state without charging it.
    async fn peek(&self, request: &BucketRequest) -> Result<BucketOutcome, StoreError>;
    /// Forgets the bucket: it is full again.
    async fn reset(&self, key: &str) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!(
            Rate::parse("10/s").map(|r| r.interval_ns()),
            Ok(100_000_000)
        );
        assert_eq!(
            Rate::parse("60/m").map(|r| r.interval_ns()),
            Ok(1_000_000_000)
        );
        assert_eq!(
            Rate::parse("2/h").map(|r| r.period),
            Ok(Duration::from_secs(3600))
        );
        assert_eq!(
            Rate::parse("1/d").map(|r| r.period),
            Ok(Duration::from_secs(86_400))
        );
        for bad in [
            "ten/s",
            "10",
            "10/w",
            "0/s",
            "-1/s",
            "",
            "1000001/s",
            "1000000000/s",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad} should not parse");
        }
        // The finest rate held exactly: one token per microsecond.
        assert_eq!(Rate::parse("1000000/s").map(|r| r.interval_ns()), Ok(1_000));
        assert_eq!(
            Rate::parse("60000000/m").map(|r| r.interval_ns()),
            Ok(1_000)
        );
        // Intervals round up: never faster than configured.
        assert_eq!(Rate::parse("7/s").map(|r| r.interval_ns()), Ok(142_857_143));
        assert_eq!(Rate::parse("600000/s").map(|r| r.interval_ns()), Ok(1_667));
    }

    #[test]
    fn refill_time_must_fit_in_2_pow_53_ns() {
        let day = Rate::parse("1/d").unwrap_or_else(|e| panic!("{e}"));
        assert!(Policy {
            rate: day,
            burst: 104
        }
        .check_precision()
        .is_ok());
        let err = Policy {
            rate: day,
            burst: 105,
        }
        .check_precision();
        assert!(err.as_ref().is_err_and(|e| e.contains("105")), "{err:?}");
        let fast = Rate::parse("1000000/s").unwrap_or_else(|e| panic!("{e}"));
        assert!(Policy {
            rate: fast,
            burst: u64::MAX
        }
        .check_precision()
        .is_err());
    }

    #[test]
    fn window_is_time_to_refill_rounded_up() {
        let policy = Policy {
            rate: Rate::parse("10/s").unwrap_or_else(|e| panic!("{e}")),
            burst: 20,
        };
        assert_eq!(policy.window_secs(), 2);
        let policy = Policy {
            rate: Rate::parse("3/s").unwrap_or_else(|e| panic!("{e}")),
            burst: 4,
        };
        assert_eq!(policy.window_secs(), 2);
    }
}
