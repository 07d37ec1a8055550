//! The circuit breaker around the Redis store: closed → open after `failure_threshold`
//! consecutive failures; open for `open_ms`, during which Redis is not called; then half-open,
//! where one probe decides (success closes, failure reopens) while other requests keep using the
//! fallback. Each transition is logged once and exported as `tollgate_breaker_state`.

use super::clock::Clock;
use super::settings::BreakerConfig;
use prometheus::IntGauge;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The value of `tollgate_breaker_state`.
    pub fn gauge_value(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What a request may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Call the store (breaker closed).
    Call,
    /// Call the store as the half-open probe; report the result with [`Probe::finish`].
    Probe,
    /// Do not call the store: use the fallback.
    Skip,
}

struct Inner {
    state: BreakerState,
    failures: u32,
    /// The last few failed calls counted (a call's failure reaches the breaker once per
    /// request it carried; it counts once).
    counted_calls: [u64; 8],
    next_counted: usize,
    opened_at_ns: u64,
    probe_in_flight: bool,
}

pub struct Breaker {
    threshold: AtomicU32,
    open_ns: AtomicU64,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    gauge: IntGauge,
}

impl Breaker {
    pub fn new(cfg: &BreakerConfig, clock: Arc<dyn Clock>, gauge: IntGauge) -> Breaker {
        gauge.set(0);
        Breaker {
            threshold: AtomicU32::new(cfg.failure_threshold.max(1)),
            open_ns: AtomicU64::new(cfg.open.as_nanos() as u64),
            clock,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                counted_calls: [0; 8],
                next_counted: 0,
                opened_at_ns: 0,
                probe_in_flight: false,
            }),
            gauge,
        }
    }

    /// Applies a reloaded config's threshold and open time.
    pub fn configure(&self, cfg: &BreakerConfig) {
        self.threshold
            .store(cfg.failure_threshold.max(1), Ordering::Relaxed);
        self.open_ns
            .store(cfg.open.as_nanos() as u64, Ordering::Relaxed);
    }

    fn open_ns(&self) -> u64 {
        self.open_ns.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        if inner.state == to {
            return;
        }
        let from = inner.state;
        inner.state = to;
        self.gauge.set(to.gauge_value());
        match to {
            BreakerState::Open => tracing::warn!(
                from = from.name(),
                failures = inner.failures,
                open_ms = self.open_ns() / 1_000_000,
                "breaker opened: Redis is not called, decisions use the fallback"
            ),
            BreakerState::HalfOpen => tracing::info!("breaker half-open: probing Redis"),
            BreakerState::Closed => {
                tracing::info!(from = from.name(), "breaker closed: Redis decides again")
            }
        }
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Whether this request may call the store.
    pub fn admit(&self) -> Admission {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => Admission::Call,
            BreakerState::Open => {
                if self.clock.now_ns().saturating_sub(inner.opened_at_ns) >= self.open_ns() {
                    self.transition(&mut inner, BreakerState::HalfOpen);
                    inner.probe_in_flight = true;
                    Admission::Probe
                } else {
                    Admission::Skip
                }
            }
            BreakerState::HalfOpen => {
                if inner.probe_in_flight {
                    Admission::Skip
                } else {
                    inner.probe_in_flight = true;
                    Admission::Probe
                }
            }
        }
    }

    /// Time left until the breaker lets a probe through (0 unless open).
    pub fn remaining_open_ns(&self) -> u64 {
        let inner = self.lock();
        match inner.state {
            BreakerState::Open => {
                (inner.opened_at_ns + self.open_ns()).saturating_sub(self.clock.now_ns())
            }
            _ => 0,
        }
    }

    /// A store call (or the probe) succeeded.
    pub fn on_success(&self, probe: bool) {
        let mut inner = self.lock();
        inner.failures = 0;
        if probe {
            inner.probe_in_flight = false;
        }
        if inner.state != BreakerState::Closed && (probe || inner.state == BreakerState::HalfOpen) {
            self.transition(&mut inner, BreakerState::Closed);
        }
    }

    /// A store call (or the probe) failed: timeout, connection or script error.
    pub fn on_failure(&self, probe: bool) {
        self.on_call_failure(None, probe);
    }

    /// A request's store decision failed; `call` names the failed call when it carried
    /// several requests ([`crate::limiter::StoreError::call`]): each call counts once toward
    /// `failure_threshold`, however many requests it carried.
    pub fn on_call_failure(&self, call: Option<u64>, probe: bool) {
        let mut inner = self.lock();
        let counted = call.is_some_and(|c| inner.counted_calls.contains(&c));
        if let (Some(c), false) = (call, counted) {
            let at = inner.next_counted;
            inner.counted_calls[at] = c;
            inner.next_counted = (at + 1) % inner.counted_calls.len();
        }
        if !counted || probe {
            inner.failures = inner.failures.saturating_add(1);
        }
        if probe {
            inner.probe_in_flight = false;
        }
        let reopen = match inner.state {
            BreakerState::Closed => inner.failures >= self.threshold.load(Ordering::Relaxed),
            BreakerState::HalfOpen => probe,
            BreakerState::Open => false,
        };
        if reopen {
            inner.opened_at_ns = self.clock.now_ns();
            self.transition(&mut inner, BreakerState::Open);
        }
    }

    /// Starts a probe whose result must be reported; dropping it unreported counts as a failure
    /// (a cancelled request must not leave the breaker waiting for a probe forever).
    pub fn probe(self: &Arc<Self>) -> Probe {
        Probe {
            breaker: self.clone(),
            done: false,
        }
    }
}

pub struct Probe {
    breaker: Arc<Breaker>,
    done: bool,
}

impl Probe {
    pub fn finish(mut self, ok: bool) {
        self.done = true;
        if ok {
            self.breaker.on_success(true);
        } else {
            self.breaker.on_failure(true);
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.on_failure(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::clock::ManualClock;
    use crate::limiter::settings::Fallback;
    use std::time::Duration;

    fn breaker(clock: Arc<ManualClock>) -> (Arc<Breaker>, IntGauge) {
        let gauge = IntGauge::new("b", "b").unwrap_or_else(|e| panic!("{e}"));
        let cfg = BreakerConfig {
            failure_threshold: 3,
            open: Duration::from_millis(100),
            fallback: Fallback::Local,
            fallback_instances: 1,
        };
        (Arc::new(Breaker::new(&cfg, clock, gauge.clone())), gauge)
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let (b, gauge) = breaker(clock.clone());
        b.on_failure(false);
        b.on_failure(false);
        b.on_success(false);
        b.on_failure(false);
        b.on_failure(false);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "failures must be consecutive"
        );
        b.on_failure(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(gauge.get(), 1);
        assert_eq!(b.admit(), Admission::Skip);
        clock.advance_ns(100_000_000);
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(gauge.get(), 2);
        assert_eq!(b.admit(), Admission::Skip, "one probe at a time");
        b.probe().finish(false);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens");
        clock.advance_ns(100_000_000);
        assert_eq!(b.admit(), Admission::Probe);
        b.probe().finish(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(gauge.get(), 0);
        assert_eq!(b.admit(), Admission::Call);
    }

    #[test]
    fn a_failed_call_counts_once_however_many_requests_it_carried() {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let (b, _) = breaker(clock);
        // Two calls fail with 20 requests each, interleaved: two failures, not 40.
        for _ in 0..20 {
            b.on_call_failure(Some(7), false);
            b.on_call_failure(Some(8), false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // A third failed call reaches the threshold (3).
        b.on_call_failure(Some(9), false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn an_abandoned_probe_counts_as_failed() {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let (b, _) = breaker(clock.clone());
        for _ in 0..3 {
            b.on_failure(false);
        }
        clock.advance_ns(200_000_000);
        assert_eq!(b.admit(), Admission::Probe);
        drop(b.probe());
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance_ns(200_000_000);
        assert_eq!(
            b.admit(),
            Admission::Probe,
            "not stuck waiting for the lost probe"
        );
    }
}
