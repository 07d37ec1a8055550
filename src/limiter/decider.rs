//! The decider: one owner for turning a planned request into a verdict. It answers from the
//! deny cache when a bucket is known to deny, otherwise asks the store in the slot behind the
//! circuit breaker with one deadline (now + `timeout_ms`, passed to the store, which answers by
//! then), and uses the configured fallback when the store fails, times out or the breaker is
//! open. The memory store cannot fail and is called directly.

use super::breaker::{Admission, Breaker, BreakerState};
use super::deny_cache::DenyCache;
use super::memory::MemoryStore;
use super::plan::{Decision, Plan};
use super::settings::{BreakerConfig, Fallback};
use super::slot::StoreSlot;
use super::{BucketOutcome, BucketRequest, Store, StoreError, StoreKind};
use crate::metrics::Metrics;
use prometheus::Histogram;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Who decided a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// No bucket was asked: no limit applied, or a missing key denied.
    NoBucket,
    /// A store: the memory store, Redis, or the local fallback buckets.
    Store(StoreKind),
}

impl DecidedBy {
    /// As reported by `/v1/check` (`decided_by`).
    pub fn label(self) -> &'static str {
        match self {
            DecidedBy::NoBucket => "none",
            DecidedBy::Store(kind) => kind.label(),
        }
    }
}

/// What a planned request comes to.
#[derive(Debug)]
pub enum Verdict {
    /// Decided by a store or the local fallback.
    Decided { decision: Decision, by: DecidedBy },
    /// `fallback: allow`: admitted without a decision.
    AllowFallback,
    /// `fallback: deny`: refused (503) until this many nanoseconds pass.
    DenyFallback { retry_after_ns: u64 },
}

/// How the buckets of one request were decided.
enum Guarded {
    /// By the store, or from the deny cache (one outcome per bucket).
    Store(Vec<BucketOutcome>),
    /// By the local fallback buckets, each at rate/N and burst/N (a window: quota/N).
    Local(Vec<BucketOutcome>),
    Allow,
    Deny {
        retry_after_ns: u64,
    },
}

/// The breaker, the deny cache and the local fallback buckets, shared by every request.
pub struct Decider {
    pub breaker: Arc<Breaker>,
    pub local: Arc<MemoryStore>,
    /// Denials remembered for a short while (Redis store only).
    pub deny_cache: DenyCache,
    metrics: Arc<Metrics>,
    /// `tollgate_decision_duration_seconds` by [`StoreKind`], resolved once.
    durations: [Histogram; 3],
}

/// The request as the local fallback sees it: a token bucket at rate/N and burst/N, a window
/// with quota/N per the same window (at least 1).
pub fn per_instance(r: &BucketRequest, instances: u32) -> BucketRequest {
    let n = u64::from(instances.max(1));
    BucketRequest {
        key: r.key.clone(),
        algorithm: r.algorithm,
        interval_ns: if r.algorithm.is_window() {
            r.interval_ns
        } else {
            r.interval_ns.saturating_mul(n)
        },
        burst: (r.burst / n).max(1),
        cost: r.cost,
    }
}

fn kind_index(kind: StoreKind) -> usize {
    match kind {
        StoreKind::Memory => 0,
        StoreKind::Redis => 1,
        StoreKind::LocalFallback => 2,
    }
}

impl Decider {
    pub fn new(
        breaker: Arc<Breaker>,
        local: Arc<MemoryStore>,
        deny_cache: DenyCache,
        metrics: Arc<Metrics>,
    ) -> Self {
        let durations = [
            StoreKind::Memory,
            StoreKind::Redis,
            StoreKind::LocalFallback,
        ]
        .map(|k| metrics.decision_duration(k.label()));
        Decider {
            breaker,
            local,
            deny_cache,
            metrics,
            durations,
        }
    }

    /// Forgets a bucket everywhere the gateway keeps state of its own (admin reset).
    pub async fn forget(&self, key: &str) {
        self.deny_cache.forget(key);
        let _ = self.local.reset(key).await;
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    fn observe(&self, kind: StoreKind, started: Instant) {
        self.durations[kind_index(kind)].observe(started.elapsed().as_secs_f64());
    }

    fn count_error(&self, e: &StoreError) {
        self.metrics
            .store_errors
            .with_label_values(&[e.kind_label()])
            .inc();
    }

    /// Decides a planned request: its buckets on the store in `slot` (or the fallback), and
    /// the outcome as one verdict. Under the local fallback the plan's policies become each
    /// instance's share, as the fallback enforced them.
    pub async fn decide_plan(
        &self,
        slot: &StoreSlot,
        breaker_cfg: &BreakerConfig,
        mut plan: Plan,
    ) -> Verdict {
        if plan.requests.is_empty() || !plan.missing_denied.is_empty() || !plan.blocked.is_empty() {
            return Verdict::Decided {
                decision: Decision::from_outcomes(plan, Vec::new()),
                by: DecidedBy::NoBucket,
            };
        }
        match self.decide(slot, breaker_cfg, &plan.requests).await {
            Guarded::Store(outcomes) => Verdict::Decided {
                decision: Decision::from_outcomes(plan, outcomes),
                by: DecidedBy::Store(slot.store.kind()),
            },
            Guarded::Local(outcomes) => {
                plan.per_instance(breaker_cfg.fallback_instances);
                Verdict::Decided {
                    decision: Decision::from_outcomes(plan, outcomes),
                    by: DecidedBy::Store(StoreKind::LocalFallback),
                }
            }
            Guarded::Allow => Verdict::AllowFallback,
            Guarded::Deny { retry_after_ns } => Verdict::DenyFallback { retry_after_ns },
        }
    }

    /// Decides `requests` on the store in `slot`, or on the fallback.
    async fn decide(
        &self,
        slot: &StoreSlot,
        breaker_cfg: &BreakerConfig,
        requests: &[BucketRequest],
    ) -> Guarded {
        let started = Instant::now();
        if let (None, Some(memory)) = (&slot.redis, &slot.memory) {
            // The memory store decides at once: called directly, no future to box or deadline.
            if let Ok(outcomes) = memory.decide_now(requests) {
                self.observe(memory.kind(), started);
                return Guarded::Store(outcomes);
            }
        }
        let deadline = tokio::time::Instant::now() + slot.config.redis.timeout;
        if slot.redis.is_none() {
            // The memory store cannot fail.
            if let Ok(outcomes) = slot.store.decide(requests, deadline).await {
                self.observe(slot.store.kind(), started);
                return Guarded::Store(outcomes);
            }
        }
        if let Some(outcomes) = self.deny_cache.check(requests) {
            self.metrics.deny_cache_hits.inc();
            return Guarded::Store(outcomes);
        }
        let admission = self.breaker.admit();
        if admission != Admission::Skip {
            let probe = (admission == Admission::Probe).then(|| self.breaker.probe());
            // The store answers by the deadline (a timeout is an error like any other).
            let result = slot.store.decide(requests, deadline).await;
            self.observe(slot.store.kind(), started);
            match result {
                Ok(outcomes) => {
                    match probe {
                        Some(p) => p.finish(true),
                        None => self.breaker.on_success(false),
                    }
                    self.deny_cache.remember(requests, &outcomes);
                    return Guarded::Store(outcomes);
                }
                Err(e) => {
                    self.count_error(&e);
                    tracing::debug!(error = %e, "store decision failed; using the fallback");
                    match probe {
                        Some(p) => p.finish(false),
                        None => self.breaker.on_call_failure(e.call(), false),
                    }
                }
            }
        }
        self.fallback(breaker_cfg, requests).await
    }

    async fn fallback(&self, cfg: &BreakerConfig, requests: &[BucketRequest]) -> Guarded {
        match cfg.fallback {
            Fallback::Local => {
                let started = Instant::now();
                let scaled: Vec<BucketRequest> = requests
                    .iter()
                    .map(|r| per_instance(r, cfg.fallback_instances))
                    .collect();
                let far = tokio::time::Instant::now() + Duration::from_secs(1);
                let outcomes = self.local.decide(&scaled, far).await.unwrap_or_default();
                self.observe(StoreKind::LocalFallback, started);
                Guarded::Local(outcomes)
            }
            Fallback::Allow => Guarded::Allow,
            Fallback::Deny => Guarded::Deny {
                retry_after_ns: self
                    .breaker
                    .remaining_open_ns()
                    .max(Duration::from_secs(1).as_nanos() as u64),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Algorithm;

    #[test]
    fn the_fallback_share_keeps_a_window_and_splits_its_quota() {
        let window = BucketRequest {
            key: "k".into(),
            algorithm: Algorithm::SlidingWindow,
            interval_ns: 60_000_000_000,
            burst: 100,
            cost: 1,
        };
        let share = per_instance(&window, 3);
        assert_eq!(share.interval_ns, 60_000_000_000, "the same window");
        assert_eq!(share.burst, 33);
        let token = BucketRequest {
            algorithm: Algorithm::TokenBucket,
            interval_ns: 600_000_000,
            ..window
        };
        let share = per_instance(&token, 3);
        assert_eq!(share.interval_ns, 1_800_000_000, "a third of the rate");
        assert_eq!(share.burst, 33);
    }
}
