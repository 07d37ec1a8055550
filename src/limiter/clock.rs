//! Injected time for the memory store (and later the breaker), so tests move time instead of
//! sleeping. Monotonic nanoseconds; the Redis store takes its time from Redis instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub trait Clock: Send + Sync {
    /// Monotonic nanoseconds since an arbitrary start.
    fn now_ns(&self) -> u64;
}

/// The process's monotonic clock, counting from the Unix time at which it was made (so the
/// memory store's windows turn over at wall-clock boundaries, as Redis's do), and moving
/// monotonically from there.
#[derive(Debug)]
pub struct MonotonicClock {
    start: Instant,
    /// Nanoseconds since the Unix epoch at `start`.
    epoch_ns: u64,
}

impl MonotonicClock {
    pub fn new() -> Self {
        let epoch_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0));
        MonotonicClock {
            start: Instant::now(),
            epoch_ns,
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        // At least a second, so that "never touched" (tat = 0) is always in the past.
        (self.start.elapsed().as_nanos() as u64)
            .saturating_add(self.epoch_ns)
            .max(1_000_000_000)
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        ManualClock {
            now: AtomicU64::new(start_ns),
        }
    }

    pub fn advance_ns(&self, ns: u64) {
        self.now.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}
