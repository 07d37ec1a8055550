//! Guarded decisions: the store in use, behind the circuit breaker, with the configured
//! fallback when the store fails, times out or the breaker is open. The memory store cannot
//! fail and is called directly.

use super::breaker::{Admission, Breaker, BreakerState};
use super::deny_cache::DenyCache;
use super::memory::MemoryStore;
use super::plan::{Decision, Plan};
use super::{BucketOutcome, BucketRequest, Store, StoreError, StoreKind};
use crate::config::model::{BreakerConfig, Fallback};
use crate::metrics::Metrics;
use crate::state::StoreSlot;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Who decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The store in use (memory or Redis).
    Store,
    /// The local fallback buckets (`fallback: local`), each at rate/N and burst/N.
    LocalFallback,
    /// `fallback: allow`: admitted without a decision.
    AllowFallback,
    /// `fallback: deny`: refused (503) until this many nanoseconds pass.
    DenyFallback { retry_after_ns: u64 },
}

/// What a planned request comes to.
#[derive(Debug)]
pub enum Verdict {
    /// Decided by a store or the local fallback; `by` is the store label (`none` when no bucket
    /// was asked: no limit applied, or a missing key denied).
    Decided {
        decision: Decision,
        by: &'static str,
    },
    /// `fallback: allow`: admitted without a decision.
    AllowFallback,
    /// `fallback: deny`: refused (503) until this many nanoseconds pass.
    DenyFallback { retry_after_ns: u64 },
}

#[derive(Debug)]
pub struct Guarded {
    /// One per bucket request (empty for allow/deny fallbacks).
    pub outcomes: Vec<BucketOutcome>,
    pub via: Via,
}

/// The breaker and the local fallback buckets, shared by every request.
pub struct Decider {
    pub breaker: Arc<Breaker>,
    pub local: Arc<MemoryStore>,
    /// Denials remembered until their buckets could admit (Redis store only).
    pub deny_cache: DenyCache,
    metrics: Arc<Metrics>,
}

/// The request as the local fallback sees it: rate/N and burst/N (at least 1).
pub fn per_instance(r: &BucketRequest, instances: u32) -> BucketRequest {
    let n = u64::from(instances.max(1));
    BucketRequest {
        key: r.key.clone(),
        interval_ns: r.interval_ns.saturating_mul(n),
        burst: (r.burst / n).max(1),
        cost: r.cost,
    }
}

impl Decider {
    pub fn new(
        breaker: Arc<Breaker>,
        local: Arc<MemoryStore>,
        deny_cache: DenyCache,
        metrics: Arc<Metrics>,
    ) -> Self {
        Decider {
            breaker,
            local,
            deny_cache,
            metrics,
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
        if let Some(h) = self.metrics.decision_duration_for(kind.label()) {
            h.observe(started.elapsed().as_secs_f64());
        }
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
        if plan.requests.is_empty() || !plan.missing_denied.is_empty() {
            return Verdict::Decided {
                decision: Decision::from_outcomes(plan, Vec::new()),
                by: "none",
            };
        }
        let guarded = self.decide(slot, breaker_cfg, &plan.requests).await;
        match guarded.via {
            Via::Store => Verdict::Decided {
                decision: Decision::from_outcomes(plan, guarded.outcomes),
                by: slot.store.kind().label(),
            },
            Via::LocalFallback => {
                plan.per_instance(breaker_cfg.fallback_instances);
                Verdict::Decided {
                    decision: Decision::from_outcomes(plan, guarded.outcomes),
                    by: StoreKind::LocalFallback.label(),
                }
            }
            Via::AllowFallback => Verdict::AllowFallback,
            Via::DenyFallback { retry_after_ns } => Verdict::DenyFallback { retry_after_ns },
        }
    }

    /// Decides `requests` on the store in `slot`, or on the fallback.
    pub async fn decide(
        &self,
        slot: &StoreSlot,
        breaker_cfg: &BreakerConfig,
        requests: &[BucketRequest],
    ) -> Guarded {
        let started = Instant::now();
        if slot.redis.is_none() {
            // The memory store cannot fail.
            if let Ok(outcomes) = slot.store.decide(requests).await {
                self.observe(slot.store.kind(), started);
                return Guarded {
                    outcomes,
                    via: Via::Store,
                };
            }
        }
        if let Some(outcomes) = self.deny_cache.check(requests) {
            self.metrics.deny_cache_hits.inc();
            return Guarded {
                outcomes,
                via: Via::Store,
            };
        }
        let admission = self.breaker.admit();
        if admission != Admission::Skip {
            let probe = (admission == Admission::Probe).then(|| self.breaker.probe());
            let deadline = slot.config.redis.timeout;
            let result = match tokio::time::timeout(deadline, slot.store.decide(requests)).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Timeout),
            };
            self.observe(slot.store.kind(), started);
            match result {
                Ok(outcomes) => {
                    match probe {
                        Some(p) => p.finish(true),
                        None => self.breaker.on_success(false),
                    }
                    self.deny_cache.remember(requests, &outcomes);
                    return Guarded {
                        outcomes,
                        via: Via::Store,
                    };
                }
                Err(e) => {
                    self.count_error(&e);
                    tracing::debug!(error = %e, "store decision failed; using the fallback");
                    match probe {
                        Some(p) => p.finish(false),
                        None => self.breaker.on_failure(false),
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
                let outcomes = self.local.decide(&scaled).await.unwrap_or_default();
                self.observe(StoreKind::LocalFallback, started);
                Guarded {
                    outcomes,
                    via: Via::LocalFallback,
                }
            }
            Fallback::Allow => Guarded {
                outcomes: Vec::new(),
                via: Via::AllowFallback,
            },
            Fallback::Deny => Guarded {
                outcomes: Vec::new(),
                via: Via::DenyFallback {
                    retry_after_ns: self
                        .breaker
                        .remaining_open_ns()
                        .max(Duration::from_secs(1).as_nanos() as u64),
                },
            },
        }
    }
}
