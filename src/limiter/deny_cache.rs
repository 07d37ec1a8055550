//! The deny cache: a bucket that denied a request of cost `c` will usually not admit cost `c`
//! again before its retry time, so for a short while a request for that bucket with at least
//! that cost is denied here, without a Redis call. Tokens can come back early without this
//! gateway seeing it (an admin reset through another instance, a Cluster refund, Redis flushed
//! or restarted empty), so a denial is served from memory for at most [`MAX_AGE`] (and never
//! past its retry time): an answer from the cache is never wrong for longer than that. A local
//! reset or a config change forgets at once. A window bucket's retry time is when its window
//! can admit the cost again (the boundary, or a sliding window's previous count weighing
//! less), so its denial is remembered no longer than that. Bounded and sharded like the
//! memory store.

use super::clock::Clock;
use super::{BucketOutcome, BucketRequest};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 16;

/// The longest a denial is answered from memory before Redis is asked again.
pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Entry {
    /// Served from the cache until this time (the retry time, at most [`MAX_AGE`] away).
    until_ns: u64,
    /// The bucket cannot admit `cost` before this time (as Redis said).
    retry_at_ns: u64,
    cost: u64,
    cached_at_ns: u64,
    /// Every bucket's outcome in the denied decision (for the 429's headers).
    snapshot: Arc<Vec<(String, BucketOutcome)>>,
}

pub struct DenyCache {
    shards: Box<[Mutex<HashMap<String, Entry>>]>,
    per_shard_cap: usize,
    clock: Arc<dyn Clock>,
    hits: AtomicU64,
}

fn shard_of(key: &str) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl DenyCache {
    pub fn new(capacity: usize, clock: Arc<dyn Clock>) -> Self {
        DenyCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard_cap: (capacity / SHARDS).max(1),
            clock,
            hits: AtomicU64::new(0),
        }
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests answered from the cache since start.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// The outcomes of a decision that is certainly denied, if one of its buckets is known to
    /// deny this cost now.
    pub fn check(&self, requests: &[BucketRequest]) -> Option<Vec<BucketOutcome>> {
        let now = self.clock.now_ns();
        let hit = requests.iter().find_map(|r| {
            let shard = self.lock(shard_of(&r.key));
            shard
                .get(&r.key)
                .filter(|e| e.until_ns > now && r.cost >= e.cost)
                .cloned()
        })?;
        // Every bucket of this request must be in the remembered decision: a bucket that was
        // not cannot be reported without asking Redis.
        if !requests
            .iter()
            .all(|r| hit.snapshot.iter().any(|(k, _)| *k == r.key))
        {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        let elapsed = now.saturating_sub(hit.cached_at_ns);
        let outcomes = requests
            .iter()
            .filter_map(|r| hit.snapshot.iter().find(|(k, _)| *k == r.key))
            .map(|(_, o)| BucketOutcome {
                allowed: o.allowed,
                remaining: o.remaining,
                reset_ns: o.reset_ns.saturating_sub(elapsed),
                retry_ns: if o.allowed {
                    0
                } else {
                    hit.retry_at_ns.saturating_sub(now).max(1)
                },
                next_token_ns: o.next_token_ns.saturating_sub(elapsed).max(1),
            })
            .collect();
        Some(outcomes)
    }

    /// Remembers the denying buckets of a denied decision.
    pub fn remember(&self, requests: &[BucketRequest], outcomes: &[BucketOutcome]) {
        if outcomes.iter().all(|o| o.allowed) {
            return;
        }
        let now = self.clock.now_ns();
        let snapshot: Arc<Vec<(String, BucketOutcome)>> = Arc::new(
            requests
                .iter()
                .zip(outcomes)
                .map(|(r, o)| (r.key.clone(), *o))
                .collect(),
        );
        for (r, o) in requests.iter().zip(outcomes) {
            if o.allowed || o.retry_ns == 0 {
                continue;
            }
            let mut shard = self.lock(shard_of(&r.key));
            if shard.len() >= self.per_shard_cap {
                shard.retain(|_, e| e.until_ns > now);
                if shard.len() >= self.per_shard_cap {
                    continue;
                }
            }
            shard.insert(
                r.key.clone(),
                Entry {
                    until_ns: now.saturating_add(o.retry_ns.min(MAX_AGE.as_nanos() as u64)),
                    retry_at_ns: now.saturating_add(o.retry_ns),
                    cost: r.cost,
                    cached_at_ns: now,
                    snapshot: snapshot.clone(),
                },
            );
        }
    }

    /// Forgets a bucket (admin reset).
    pub fn forget(&self, key: &str) {
        self.lock(shard_of(key)).remove(key);
    }

    /// Forgets everything (config change, store change).
    pub fn clear(&self) {
        for i in 0..SHARDS {
            self.lock(i).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::clock::ManualClock;

    fn req(key: &str, cost: u64) -> BucketRequest {
        BucketRequest {
            key: key.into(),
            algorithm: crate::limiter::Algorithm::TokenBucket,
            interval_ns: 1_000,
            burst: 5,
            cost,
        }
    }

    fn denied(retry_ns: u64) -> BucketOutcome {
        BucketOutcome {
            allowed: false,
            remaining: 0,
            reset_ns: 5_000,
            retry_ns,
            next_token_ns: 1_000,
        }
    }

    #[test]
    fn a_denial_is_served_until_the_bucket_could_admit() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let cache = DenyCache::new(1000, clock.clone());
        let ok = BucketOutcome {
            allowed: true,
            remaining: 3,
            ..BucketOutcome::default()
        };
        cache.remember(&[req("a", 2), req("b", 2)], &[ok, denied(10_000)]);
        let hit = cache.check(&[req("a", 2), req("b", 2)]).expect("cached");
        assert!(hit[0].allowed && !hit[1].allowed);
        assert_eq!(hit[1].retry_ns, 10_000);
        assert!(
            cache.check(&[req("b", 1)]).is_none(),
            "a smaller cost may fit"
        );
        assert!(cache.check(&[req("a", 2)]).is_none(), "a did not deny");
        clock.advance_ns(10_000);
        assert!(cache.check(&[req("b", 2)]).is_none(), "expired");
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn a_long_denial_is_served_for_at_most_max_age_with_its_real_retry() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let cache = DenyCache::new(1000, clock.clone());
        let hour = 3_600_000_000_000;
        cache.remember(&[req("a", 1)], &[denied(hour)]);
        let hit = cache.check(&[req("a", 1)]).expect("cached");
        assert_eq!(
            hit[0].retry_ns, hour,
            "the real retry time, not the cache's age"
        );
        clock.advance_ns(MAX_AGE.as_nanos() as u64 - 1);
        assert!(cache.check(&[req("a", 1)]).is_some());
        clock.advance_ns(1);
        assert!(
            cache.check(&[req("a", 1)]).is_none(),
            "after MAX_AGE Redis is asked again"
        );
    }

    #[test]
    fn a_request_with_a_bucket_outside_the_remembered_decision_asks_redis() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let cache = DenyCache::new(1000, clock);
        cache.remember(
            &[req("other", 1), req("b", 1)],
            &[
                BucketOutcome {
                    allowed: true,
                    remaining: 3,
                    ..BucketOutcome::default()
                },
                denied(1_000_000),
            ],
        );
        assert!(
            cache.check(&[req("a", 1), req("b", 1)]).is_none(),
            "a's real state is unknown here"
        );
        assert!(cache.check(&[req("other", 1), req("b", 1)]).is_some());
    }

    #[test]
    fn a_window_denial_is_served_only_until_the_window_admits() {
        use crate::limiter::{window, Algorithm};
        const SEC: u64 = 1_000_000_000;
        // A fixed window of 10 per second, spent; 300 ms before the boundary.
        let now = 1_000 * SEC + 700_000_000;
        let clock = Arc::new(ManualClock::new(now));
        let cache = DenyCache::new(1000, clock.clone());
        let spent = window::State {
            window: 1_000,
            current: 10,
            previous: 0,
        };
        let denied = window::evaluate(spent, now, SEC, 10, 1, false).outcome;
        assert!(!denied.allowed);
        assert_eq!(denied.retry_ns, 300_000_000);
        let r = BucketRequest {
            key: "w".into(),
            algorithm: Algorithm::FixedWindow,
            interval_ns: SEC,
            burst: 10,
            cost: 1,
        };
        cache.remember(std::slice::from_ref(&r), &[denied]);
        clock.advance_ns(299_999_999);
        assert!(cache.check(std::slice::from_ref(&r)).is_some());
        clock.advance_ns(1);
        assert!(
            cache.check(std::slice::from_ref(&r)).is_none(),
            "the window turned over: the store is asked"
        );
    }

    #[test]
    fn forget_and_clear_invalidate() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let cache = DenyCache::new(1000, clock);
        cache.remember(&[req("a", 1)], &[denied(1_000_000)]);
        cache.remember(&[req("b", 1)], &[denied(1_000_000)]);
        cache.forget("a");
        assert!(cache.check(&[req("a", 1)]).is_none());
        assert!(cache.check(&[req("b", 1)]).is_some());
        cache.clear();
        assert!(cache.check(&[req("b", 1)]).is_none());
    }
}
