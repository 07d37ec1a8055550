//! Property tests of the limit algorithms in the memory store, driven by an injected clock and
//! checked against a reference model written here from the definitions (a log of admitted
//! requests, not the store's counters):
//!
//! - fixed window: a request is admitted exactly when the requests admitted in its aligned
//!   window plus its cost fit the quota;
//! - sliding window: exactly when the current window's admitted requests, plus the previous
//!   window's weighted by the share of it still inside the sliding window (in whole
//!   milliseconds), plus its cost fit the quota;
//! - every request's buckets are decided all-or-nothing, whatever their algorithms (a token
//!   bucket rides along, decided by `gcra`);
//! - `remaining` is what the model says; `retry_ns`, `next_token_ns` and `reset_ns` are exact
//!   (the model admits the cost / one more / a full quota at that time and not a nanosecond
//!   before), and a cost above the quota is never admitted and has no retry time;
//! - bounds: no aligned window ever holds more than the quota, no span of one window length
//!   more than 2 × quota (fixed) or 2 × quota − 1 (sliding). The largest counts seen in any
//!   span of one window are printed (`--nocapture`).
//!
//! 256 cases per property, or `PROPTEST_CASES`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tollgate::limiter::clock::ManualClock;
use tollgate::limiter::memory::MemoryStore;
use tollgate::limiter::{gcra, Algorithm, BucketOutcome, BucketRequest, Store};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A window bucket by its definition: every admitted request, with its time and cost.
#[derive(Debug, Clone)]
struct Model {
    sliding: bool,
    window: u64,
    quota: u64,
    log: Vec<(u64, u64)>,
}

impl Model {
    /// What counts against the quota at `t`: (current window's sum, previous window's sum
    /// weighted and rounded up).
    fn used(&self, t: u64) -> u64 {
        let start = t / self.window * self.window;
        let sum = |from: u64, to: u64| -> u64 {
            self.log
                .iter()
                .filter(|(at, _)| *at >= from && *at < to)
                .map(|(_, c)| c)
                .sum()
        };
        let cur = sum(start, t + 1);
        if !self.sliding {
            return cur;
        }
        let prev = sum(start.saturating_sub(self.window), start);
        let w_ms = u128::from(self.window / MS);
        let left_ms = w_ms - u128::from((t - start) / MS);
        cur + u64::try_from((u128::from(prev) * left_ms).div_ceil(w_ms)).unwrap()
    }

    fn fits(&self, t: u64, cost: u64) -> bool {
        cost <= self.quota && self.used(t) + cost <= self.quota
    }

    fn remaining(&self, t: u64) -> u64 {
        self.quota.saturating_sub(self.used(t))
    }

    /// The most admitted in any span `(t - W, t]` (each span's end at an arrival).
    fn densest_span(&self) -> u64 {
        self.log
            .iter()
            .map(|(end, _)| {
                self.log
                    .iter()
                    .filter(|(at, _)| at <= end && *at + self.window > *end)
                    .map(|(_, c)| c)
                    .sum()
            })
            .max()
            .unwrap_or(0)
    }

    fn densest_aligned(&self) -> u64 {
        let mut by_window = std::collections::HashMap::new();
        for (at, c) in &self.log {
            *by_window.entry(at / self.window).or_insert(0) += c;
        }
        by_window.values().copied().max().unwrap_or(0)
    }
}

/// `at` is the earliest time from `now` at which `ok` holds (and it holds from then on).
fn earliest(now: u64, wait: u64, ok: impl Fn(u64) -> bool) -> Result<(), String> {
    if !ok(now + wait) {
        return Err(format!("not yet at now + {wait}"));
    }
    if wait > 0 && ok(now + wait - 1) {
        return Err(format!("already at now + {wait} - 1 ns"));
    }
    Ok(())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(60)
}

/// Checks one window outcome against the model at `now`, the model *before* the decision.
fn check_outcome(
    m: &Model,
    now: u64,
    cost: u64,
    o: &BucketOutcome,
    charged: bool,
) -> Result<(), String> {
    let fits = m.fits(now, cost);
    if o.allowed != fits {
        return Err(format!("allowed {} but the model says {fits}", o.allowed));
    }
    // The state the outcome describes: after the charge when the whole request was admitted.
    let mut after = m.clone();
    if charged && cost > 0 {
        after.log.push((now, cost));
    }
    if o.remaining != after.remaining(now) {
        return Err(format!(
            "remaining {} but the model says {}",
            o.remaining,
            after.remaining(now)
        ));
    }
    if !o.allowed {
        if cost > m.quota {
            if o.retry_ns != 0 {
                return Err("a cost above the quota has a retry time".into());
            }
        } else {
            earliest(now, o.retry_ns, |t| m.fits(t, cost)).map_err(|e| format!("retry: {e}"))?;
        }
    } else if o.retry_ns != 0 {
        return Err("admitted with a retry time".into());
    }
    let r = after.remaining(now);
    if r < after.quota {
        earliest(now, o.next_token_ns, |t| after.remaining(t) > r)
            .map_err(|e| format!("next_token: {e}"))?;
    } else if o.next_token_ns != 0 {
        return Err("full with a next-token time".into());
    }
    earliest(now, o.reset_ns, |t| after.remaining(t) == after.quota)
        .map_err(|e| format!("reset: {e}"))?;
    Ok(())
}

static MAX_SLIDING_SPAN: AtomicU64 = AtomicU64::new(0);
static MAX_FIXED_SPAN: AtomicU64 = AtomicU64::new(0);

/// One step: a jump of the clock, which buckets the request touches, and their costs.
type Step = (u8, u64, u8, u64, u64, u64);

fn run(quota: u64, window_secs: u64, start_offset: u64, steps: Vec<Step>) -> Result<(), String> {
    let w = window_secs * SEC;
    let start = 1_700_000_000 * SEC + start_offset % (2 * w);
    let clock = Arc::new(ManualClock::new(start));
    let store = MemoryStore::new(10_000, clock.clone());
    let mut fixed = Model {
        sliding: false,
        window: w,
        quota,
        log: Vec::new(),
    };
    let mut sliding = Model {
        sliding: true,
        ..fixed.clone()
    };
    let token_interval = w / quota;
    let mut tat = 0u64;
    let mut now = start;
    for (i, (jump, amount, mask, cf, cs, ct)) in steps.into_iter().enumerate() {
        let advance = match jump % 4 {
            0 => 0,
            1 => amount % (w / 7 + 1),
            2 => amount % (3 * w),
            // Around the next boundary, within ±1 ms.
            _ => (w - now % w + amount % (2 * MS)).saturating_sub(MS),
        };
        clock.advance_ns(advance);
        now += advance;
        let mask = if mask % 8 == 0 { 1 } else { mask % 8 };
        let (cf, cs, ct) = (cf % (quota + 3), cs % (quota + 3), ct % (quota + 3));
        let mut requests = Vec::new();
        let mut which = Vec::new();
        if mask & 1 != 0 {
            requests.push(BucketRequest {
                key: "p:fixed:{k}".into(),
                algorithm: Algorithm::FixedWindow,
                interval_ns: w,
                burst: quota,
                cost: cf,
            });
            which.push(0);
        }
        if mask & 2 != 0 {
            requests.push(BucketRequest {
                key: "p:sliding:{k}".into(),
                algorithm: Algorithm::SlidingWindow,
                interval_ns: w,
                burst: quota,
                cost: cs,
            });
            which.push(1);
        }
        if mask & 4 != 0 {
            requests.push(BucketRequest {
                key: "p:token:{k}".into(),
                algorithm: Algorithm::TokenBucket,
                interval_ns: token_interval,
                burst: quota,
                cost: ct,
            });
            which.push(2);
        }
        let outcomes = block_on(store.decide(&requests, far())).unwrap();
        let token = gcra::evaluate(tat, now, token_interval, quota, ct);
        let all = which.iter().all(|&b| match b {
            0 => fixed.fits(now, cf),
            1 => sliding.fits(now, cs),
            _ => token.outcome.allowed,
        });
        if outcomes.iter().all(|o| o.allowed) != all {
            return Err(format!("step {i}: all-or-nothing differs from the model"));
        }
        for (o, &b) in outcomes.iter().zip(&which) {
            let r = match b {
                0 => check_outcome(&fixed, now, cf, o, all),
                1 => check_outcome(&sliding, now, cs, o, all),
                _ => {
                    if o.allowed != token.outcome.allowed {
                        Err("token bucket allowed differs".into())
                    } else if all && o.remaining != token.outcome.remaining {
                        Err("token bucket remaining differs".into())
                    } else {
                        Ok(())
                    }
                }
            };
            r.map_err(|e| format!("step {i} (+{advance} ns), bucket {b}: {e}"))?;
        }
        if all {
            for &b in &which {
                match b {
                    0 if cf > 0 => fixed.log.push((now, cf)),
                    1 if cs > 0 => sliding.log.push((now, cs)),
                    2 if ct > 0 => tat = token.new_tat,
                    _ => {}
                }
            }
        }
    }
    for (m, max, bound) in [
        (&fixed, &MAX_FIXED_SPAN, 2 * quota),
        (&sliding, &MAX_SLIDING_SPAN, 2 * quota - 1),
    ] {
        if m.densest_aligned() > quota {
            return Err(format!("an aligned window holds {}", m.densest_aligned()));
        }
        let span = m.densest_span();
        if span > bound {
            return Err(format!("a span of one window holds {span} > {bound}"));
        }
        // Over-admission seen, in hundredths of the quota above it.
        let excess = (span.saturating_sub(quota)) * 100 / quota;
        max.fetch_max(excess, Ordering::Relaxed);
    }
    Ok(())
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            any::<u8>(),
            any::<u64>(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        ),
        1..80,
    )
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn windows_admit_exactly_what_their_definition_allows(
        quota in 1u64..=12,
        window_secs in prop::sample::select(vec![1u64, 2, 60]),
        offset in any::<u64>(),
        steps in steps(),
    ) {
        run(quota, window_secs, offset, steps).map_err(TestCaseError::fail)?;
    }
}

/// Bursts at a window edge, many times over: the spans' worst cases are reached.
#[test]
fn worst_case_bursts_at_the_edge() {
    for quota in [1u64, 5, 10] {
        // Fill the end of one window, then ask every millisecond across the boundary.
        let mut steps: Vec<Step> = vec![(3, 0, 1 | 2, quota, quota, 0)];
        steps.extend((0..1500).map(|_| (1u8, MS, 1u8 | 2, 1, 1, 0)));
        run(quota, 1, 0, steps).unwrap();
    }
    eprintln!(
        "over-admission in a span of one window: fixed up to +{}% of the quota, sliding up \
         to +{}%",
        MAX_FIXED_SPAN.load(Ordering::Relaxed),
        MAX_SLIDING_SPAN.load(Ordering::Relaxed)
    );
}
