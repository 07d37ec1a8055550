//! The in-process store: buckets in a sharded map, bounded in size. Token buckets use
//! [`gcra`], fixed and sliding windows [`window`] (windows aligned to the clock).
//!
//! Bound: at most `max_buckets` buckets in all (split evenly over [`SHARDS`] shards). A bucket
//! that has refilled completely carries no information and is dropped first; when a shard is
//! still full, the buckets closest to full are evicted (the least state lost). Each bucket costs
//! about 100 bytes plus its key, so the default of 1,000,000 buckets stays under ~200 MB.

use super::clock::Clock;
use super::gcra;
use super::window;
use super::{Algorithm, BucketOutcome, BucketRequest, Store, StoreError, StoreKind};
use async_trait::async_trait;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Number of independently locked shards.
pub const SHARDS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Token bucket: the theoretical arrival time. Windows: the window index of the last write.
    tat: u64,
    /// Windows: the counts of that window and of the one before it.
    current: u64,
    previous: u64,
    interval_ns: u64,
    burst: u64,
    algorithm: Algorithm,
}

impl Bucket {
    /// The bucket `r` leaves after the charge evaluated as `e`.
    fn charged(r: &BucketRequest, e: &Evaluated) -> Bucket {
        Bucket {
            tat: e.tat,
            current: e.current,
            previous: e.previous,
            interval_ns: r.interval_ns,
            burst: r.burst,
            algorithm: r.algorithm,
        }
    }

    /// From when the bucket holds no information (full again, or its windows are over).
    fn expires_at(&self) -> u64 {
        match self.algorithm {
            Algorithm::TokenBucket => self.tat,
            Algorithm::FixedWindow | Algorithm::SlidingWindow => window::expires_at(
                self.window_state(),
                self.interval_ns,
                self.algorithm == Algorithm::SlidingWindow,
            ),
        }
    }

    fn window_state(&self) -> window::State {
        window::State {
            window: self.tat,
            current: self.current,
            previous: self.previous,
        }
    }
}

/// One bucket's evaluation, whatever its algorithm.
#[derive(Debug, Clone, Copy)]
struct Evaluated {
    outcome: BucketOutcome,
    /// What to store if the decision admits.
    tat: u64,
    current: u64,
    previous: u64,
}

/// Evaluates `r` against its stored bucket (`None`: never seen, or its policy changed).
fn evaluate(stored: Option<&Bucket>, r: &BucketRequest, now: u64, cost: u64) -> Evaluated {
    match r.algorithm {
        Algorithm::TokenBucket => {
            let e = gcra::evaluate(
                stored.map_or(0, |b| b.tat),
                now,
                r.interval_ns,
                r.burst,
                cost,
            );
            Evaluated {
                outcome: e.outcome,
                tat: e.new_tat,
                current: 0,
                previous: 0,
            }
        }
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            let state = stored.map_or_else(window::State::default, Bucket::window_state);
            let sliding = r.algorithm == Algorithm::SlidingWindow;
            let e = window::evaluate(state, now, r.interval_ns, r.burst, cost, sliding);
            Evaluated {
                outcome: e.outcome,
                tat: e.new_state.window,
                current: e.new_state.current,
                previous: e.new_state.previous,
            }
        }
    }
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<String, Bucket>,
}

/// Sharded, bounded in-memory token buckets.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    per_shard_cap: usize,
    clock: Arc<dyn Clock>,
    evictions: AtomicU64,
    kind: StoreKind,
}

impl MemoryStore {
    pub fn new(max_buckets: usize, clock: Arc<dyn Clock>) -> Self {
        Self::with_kind(max_buckets, clock, StoreKind::Memory)
    }

    /// A memory store that reports itself as `kind` (the breaker's local fallback).
    pub fn with_kind(max_buckets: usize, clock: Arc<dyn Clock>, kind: StoreKind) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        MemoryStore {
            shards,
            per_shard_cap: (max_buckets / SHARDS).max(1),
            clock,
            evictions: AtomicU64::new(0),
            kind,
        }
    }

    /// Buckets currently held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).buckets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most buckets this store will ever hold.
    pub fn capacity(&self) -> usize {
        self.per_shard_cap * SHARDS
    }

    /// Buckets evicted while still holding state, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn shard_of(key: &str) -> usize {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() as usize) % SHARDS
    }

    fn stored<'s>(shard: &'s Shard, r: &BucketRequest) -> Option<&'s Bucket> {
        match shard.buckets.get(&r.key) {
            // A bucket whose rate, burst or algorithm changed starts over.
            Some(b)
                if b.interval_ns == r.interval_ns
                    && b.burst == r.burst
                    && b.algorithm == r.algorithm =>
            {
                Some(b)
            }
            _ => None,
        }
    }

    /// Decides every bucket of one request now (the memory store never waits, so no deadline):
    /// all or nothing, as [`Store::decide`].
    pub fn decide_now(&self, requests: &[BucketRequest]) -> Result<Vec<BucketOutcome>, StoreError> {
        match requests {
            [one] => Ok(vec![self.decide_one(one)]),
            _ => self.decide_many(requests),
        }
    }

    /// One bucket (a route with one limit, the common case): one lock, one map lookup when the
    /// bucket exists, nothing allocated but the key of a new bucket.
    fn decide_one(&self, r: &BucketRequest) -> BucketOutcome {
        let mut shard = lock(&self.shards[Self::shard_of(&r.key)]);
        let now = self.clock.now_ns();
        let same_policy = |b: &Bucket| {
            b.interval_ns == r.interval_ns && b.burst == r.burst && b.algorithm == r.algorithm
        };
        let bucket_of = |e: &Evaluated| Bucket::charged(r, e);
        if let Some(existing) = shard.buckets.get_mut(&r.key) {
            let stored = same_policy(existing).then_some(&*existing);
            let e = evaluate(stored, r, now, r.cost);
            if !e.outcome.allowed {
                return denied_outcome(r, e.outcome);
            }
            if r.cost != 0 {
                *existing = bucket_of(&e);
            }
            return e.outcome;
        }
        let e = evaluate(None, r, now, r.cost);
        if !e.outcome.allowed {
            return denied_outcome(r, e.outcome);
        }
        if r.cost != 0 {
            self.make_room(&mut shard, now);
            shard.buckets.insert(r.key.clone(), bucket_of(&e));
        }
        e.outcome
    }

    fn decide_many(&self, requests: &[BucketRequest]) -> Result<Vec<BucketOutcome>, StoreError> {
        let shard_ids: Vec<usize> = requests.iter().map(|r| Self::shard_of(&r.key)).collect();
        let mut order: Vec<usize> = shard_ids.clone();
        order.sort_unstable();
        order.dedup();
        // Lock every shard involved, in index order, so the decision is atomic and deadlock-free.
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            order.iter().map(|&i| (i, lock(&self.shards[i]))).collect();
        let now = self.clock.now_ns();
        let mut evaluations = Vec::with_capacity(requests.len());
        for (r, &sid) in requests.iter().zip(&shard_ids) {
            let shard = guards
                .iter()
                .find(|(i, _)| *i == sid)
                .map(|(_, g)| &**g)
                .ok_or_else(|| StoreError::Script("shard not locked".into()))?;
            evaluations.push(evaluate(Self::stored(shard, r), r, now, r.cost));
        }
        if !evaluations.iter().all(|e| e.outcome.allowed) {
            // Denied: nothing is charged, and the buckets that admitted say what they hold.
            let mut outcomes = Vec::with_capacity(requests.len());
            for ((r, &sid), e) in requests.iter().zip(&shard_ids).zip(evaluations) {
                outcomes.push(match r.algorithm {
                    Algorithm::TokenBucket => {
                        gcra::uncharged(e.outcome, r.interval_ns, r.burst, r.cost)
                    }
                    _ if !e.outcome.allowed => e.outcome,
                    _ => {
                        let shard = guards
                            .iter()
                            .find(|(i, _)| *i == sid)
                            .map(|(_, g)| &**g)
                            .ok_or_else(|| StoreError::Script("shard not locked".into()))?;
                        evaluate(Self::stored(shard, r), r, now, 0).outcome
                    }
                });
            }
            return Ok(outcomes);
        }
        for ((r, &sid), e) in requests.iter().zip(&shard_ids).zip(&evaluations) {
            if r.cost == 0 {
                continue;
            }
            if let Some((_, shard)) = guards.iter_mut().find(|(i, _)| *i == sid) {
                let bucket = Bucket::charged(r, e);
                if let Some(existing) = shard.buckets.get_mut(&r.key) {
                    *existing = bucket;
                } else {
                    self.make_room(shard, now);
                    shard.buckets.insert(r.key.clone(), bucket);
                }
            }
        }
        Ok(evaluations.into_iter().map(|e| e.outcome).collect())
    }

    fn make_room(&self, shard: &mut Shard, now: u64) {
        if shard.buckets.len() < self.per_shard_cap {
            return;
        }
        shard.buckets.retain(|_, b| b.expires_at() > now);
        let low_water = self.per_shard_cap - self.per_shard_cap / 10 - 1;
        if shard.buckets.len() <= low_water {
            return;
        }
        let mut by_tat: Vec<(u64, String)> = shard
            .buckets
            .iter()
            .map(|(k, b)| (b.expires_at(), k.clone()))
            .collect();
        by_tat.sort_unstable_by_key(|(tat, _)| *tat);
        let excess = shard.buckets.len() - low_water;
        for (_, key) in by_tat.into_iter().take(excess) {
            shard.buckets.remove(&key);
        }
        self.evictions.fetch_add(excess as u64, Ordering::Relaxed);
    }
}

/// What a denied request's bucket reports: a token bucket as it holds uncharged, a window's
/// own (denied) outcome.
fn denied_outcome(r: &BucketRequest, outcome: BucketOutcome) -> BucketOutcome {
    match r.algorithm {
        Algorithm::TokenBucket => gcra::uncharged(outcome, r.interval_ns, r.burst, r.cost),
        Algorithm::FixedWindow | Algorithm::SlidingWindow => outcome,
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard cannot leave a bucket half-written (each is one Copy value).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> StoreKind {
        self.kind
    }

    async fn decide(
        &self,
        requests: &[BucketRequest],
        _deadline: tokio::time::Instant,
    ) -> Result<Vec<BucketOutcome>, StoreError> {
        self.decide_now(requests)
    }

    async fn peek(&self, request: &BucketRequest) -> Result<BucketOutcome, StoreError> {
        let shard = lock(&self.shards[Self::shard_of(&request.key)]);
        let now = self.clock.now_ns();
        Ok(evaluate(Self::stored(&shard, request), request, now, 0).outcome)
    }

    async fn reset(&self, key: &str) -> Result<(), StoreError> {
        lock(&self.shards[Self::shard_of(key)]).buckets.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::clock::ManualClock;

    fn req(key: &str, burst: u64, cost: u64) -> BucketRequest {
        BucketRequest {
            key: key.to_string(),
            algorithm: Algorithm::TokenBucket,
            interval_ns: 100_000_000,
            burst,
            cost,
        }
    }

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_secs(60)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn all_or_nothing_across_buckets() {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let store = MemoryStore::new(1000, clock);
        block_on(async {
            // b has room for 1, a for 3: the second decision is denied by b and charges a nothing.
            let first = store
                .decide(&[req("a", 3, 1), req("b", 1, 1)], far())
                .await
                .expect("decide");
            assert!(first.iter().all(|o| o.allowed));
            let second = store
                .decide(&[req("a", 3, 1), req("b", 1, 1)], far())
                .await
                .expect("decide");
            assert!(second[0].allowed && !second[1].allowed);
            assert_eq!(second[0].remaining, 2, "a reports what it holds, uncharged");
            let a = store.peek(&req("a", 3, 1)).await.expect("peek");
            assert_eq!(second[0], a, "the same state a peek reads");
            assert_eq!(a.remaining, 2, "a was charged once, not twice");
        });
    }

    #[test]
    fn changed_policy_starts_a_fresh_bucket_and_reset_forgets() {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let store = MemoryStore::new(1000, clock);
        block_on(async {
            store
                .decide(&[req("k", 2, 2)], far())
                .await
                .expect("decide");
            assert_eq!(
                store.peek(&req("k", 2, 0)).await.expect("peek").remaining,
                0
            );
            assert_eq!(
                store.peek(&req("k", 5, 0)).await.expect("peek").remaining,
                5
            );
            store.reset("k").await.expect("reset");
            assert_eq!(
                store.peek(&req("k", 2, 0)).await.expect("peek").remaining,
                2
            );
        });
    }

    #[test]
    fn flood_of_distinct_keys_stays_bounded() {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let store = MemoryStore::new(10_000, clock.clone());
        block_on(async {
            for i in 0..100_000u32 {
                store
                    .decide(&[req(&format!("flood:{i}"), 10, 1)], far())
                    .await
                    .expect("decide");
                if i % 1000 == 0 {
                    clock.advance_ns(1_000);
                }
            }
        });
        assert!(
            store.len() <= store.capacity(),
            "{} buckets held, bound is {}",
            store.len(),
            store.capacity()
        );
        assert!(store.len() > store.capacity() / 2, "eviction is not a wipe");
        assert!(store.evictions() > 0);
    }

    #[test]
    fn full_buckets_are_dropped_before_live_ones() {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let store = MemoryStore::new(SHARDS * 4, clock.clone());
        block_on(async {
            for i in 0..(SHARDS * 4) {
                store
                    .decide(&[req(&format!("old:{i}"), 10, 1)], far())
                    .await
                    .expect("decide");
            }
            // Long enough for every old bucket to be full again.
            clock.advance_ns(10_000_000_000);
            let before = store.evictions();
            for i in 0..16 {
                store
                    .decide(&[req(&format!("new:{i}"), 10, 1)], far())
                    .await
                    .expect("decide");
            }
            assert_eq!(
                store.evictions(),
                before,
                "only refilled buckets were dropped"
            );
        });
    }
}
