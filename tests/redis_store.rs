//! The Redis store and its Lua script against real `redis-server` processes started here:
//! token-bucket semantics, TTLs, NOSCRIPT recovery, and cross-slot decisions on a real Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::{RedisCluster, RedisProcess};
use std::time::Duration;
use tollgate::config::model::{RedisConfig, RedisMode};
use tollgate::limiter::redis::RedisStore;
use tollgate::limiter::{BucketRequest, Store};

const MS: u64 = 1_000_000;

/// The deadline of a decision (the gateway's default `timeout_ms` is 20; a test on a busy
/// machine gets more, since these tests are about the script, not the deadline).
fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(500)
}

fn store_for(mode: RedisMode, urls: Vec<String>, batch_window: Duration) -> RedisStore {
    RedisStore::new(&RedisConfig {
        mode,
        urls,
        service_name: None,
        timeout: Duration::from_millis(500),
        key_prefix: "t:".into(),
        batch_window,
        startup_wait: Duration::from_secs(5),
    })
    .unwrap()
}

async fn connected(mode: RedisMode, urls: Vec<String>) -> RedisStore {
    connected_with_window(mode, urls, Duration::ZERO).await
}

async fn connected_with_window(
    mode: RedisMode,
    urls: Vec<String>,
    batch_window: Duration,
) -> RedisStore {
    let store = store_for(mode, urls, batch_window);
    // The threads that decide get a lane each, as the proxy's workers do.
    store
        .connect(&deciding_threads().await, Duration::from_secs(5))
        .await
        .unwrap();
    store
}

/// This test's own thread and its runtime's workers (tasks spawned by a multi-thread test
/// run on the workers; a current-thread test decides on its own thread).
async fn deciding_threads() -> Vec<(std::thread::ThreadId, tokio::runtime::Handle)> {
    let handle = tokio::runtime::Handle::current();
    let mut found = vec![(std::thread::current().id(), handle.clone())];
    for _ in 0..200 {
        let id = tokio::spawn(async { std::thread::current().id() })
            .await
            .unwrap();
        if !found.iter().any(|(t, _)| *t == id) {
            found.push((id, handle.clone()));
        }
    }
    found
}

fn bucket(key: &str, interval_ms: u64, burst: u64, cost: u64) -> BucketRequest {
    BucketRequest {
        key: key.to_string(),
        algorithm: tollgate::limiter::Algorithm::TokenBucket,
        interval_ns: interval_ms * MS,
        burst,
        cost,
    }
}

#[tokio::test]
async fn burst_cost_and_all_or_nothing() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    // Burst caps a fresh bucket.
    let fresh = store.peek(&bucket("r:a:{k}", 60_000, 5, 1)).await.unwrap();
    assert_eq!((fresh.allowed, fresh.remaining), (true, 5));
    // Cost > 1 takes several tokens.
    let o = store
        .decide(&[bucket("r:a:{k}", 60_000, 5, 3)], soon())
        .await
        .unwrap();
    assert!(o[0].allowed);
    assert_eq!(o[0].remaining, 2);
    let o = store
        .decide(&[bucket("r:a:{k}", 60_000, 5, 3)], soon())
        .await
        .unwrap();
    assert!(!o[0].allowed, "3 tokens do not fit in 2");
    assert_eq!(o[0].remaining, 2);
    assert!(o[0].retry_ns > 59_000 * MS && o[0].retry_ns <= 60_000 * MS);
    // All-or-nothing: b denies, so a is not charged.
    store
        .decide(&[bucket("r:b:{k}", 60_000, 1, 1)], soon())
        .await
        .unwrap();
    let o = store
        .decide(
            &[
                bucket("r:a:{k}", 60_000, 5, 1),
                bucket("r:b:{k}", 60_000, 1, 1),
            ],
            soon(),
        )
        .await
        .unwrap();
    assert!(o[0].allowed && !o[1].allowed);
    let a = store.peek(&bucket("r:a:{k}", 60_000, 5, 1)).await.unwrap();
    assert_eq!(a.remaining, 2, "the denied decision charged nothing");
    // A changed burst starts a fresh bucket.
    let changed = store.peek(&bucket("r:a:{k}", 60_000, 9, 1)).await.unwrap();
    assert_eq!(changed.remaining, 9);
    // Reset deletes.
    store.reset("r:a:{k}").await.unwrap();
    assert_eq!(
        store
            .peek(&bucket("r:a:{k}", 60_000, 5, 1))
            .await
            .unwrap()
            .remaining,
        5
    );
}

#[tokio::test]
async fn refills_over_redis_time_and_sets_ttl_to_refill_time() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    // 50 ms per token, burst 4: empty it.
    let o = store
        .decide(&[bucket("r:l:{t}", 50, 4, 4)], soon())
        .await
        .unwrap();
    assert!(o[0].allowed);
    assert_eq!(o[0].remaining, 0);
    let pttl: i64 = redis.cli(&["PTTL", "t:r:l:{t}"]).unwrap().parse().unwrap();
    assert!(
        (150..=200).contains(&pttl),
        "TTL is the refill time, got {pttl} ms"
    );
    tokio::time::sleep(Duration::from_millis(130)).await;
    let later = store.peek(&bucket("r:l:{t}", 50, 4, 1)).await.unwrap();
    assert!(
        (2..=3).contains(&later.remaining),
        "two or three tokens back after 130 ms, got {}",
        later.remaining
    );
    // Idle past the refill time: the key is gone and the bucket is full.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(redis.cli(&["EXISTS", "t:r:l:{t}"]).as_deref(), Some("0"));
    let full = store.peek(&bucket("r:l:{t}", 50, 4, 1)).await.unwrap();
    assert_eq!(full.remaining, 4, "never more than burst");
}

#[tokio::test]
async fn noscript_after_script_flush_reloads_transparently() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    store
        .decide(&[bucket("r:l:{n}", 60_000, 3, 1)], soon())
        .await
        .unwrap();
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).as_deref(), Some("OK"));
    let o = store
        .decide(&[bucket("r:l:{n}", 60_000, 3, 1)], soon())
        .await
        .unwrap();
    assert!(o[0].allowed);
    assert_eq!(o[0].remaining, 1, "state kept, script reloaded");
}

#[tokio::test]
async fn cluster_gives_tokens_back_when_another_slot_denies() {
    let cluster = RedisCluster::start();
    let store = connected(RedisMode::Cluster, cluster.urls()).await;
    let a = bucket("r:a:{alpha}", 60_000, 5, 1);
    let b = bucket("r:b:{beta}", 60_000, 1, 1);
    assert_ne!(
        fred::util::redis_keyslot(b"t:r:a:{alpha}"),
        fred::util::redis_keyslot(b"t:r:b:{beta}"),
        "the two buckets live in different slots"
    );
    let first = store.decide(&[a.clone(), b.clone()], soon()).await.unwrap();
    assert!(first.iter().all(|o| o.allowed));
    for _ in 0..3 {
        let denied = store.decide(&[a.clone(), b.clone()], soon()).await.unwrap();
        assert!(denied[0].allowed && !denied[1].allowed);
    }
    let after = store.peek(&a).await.unwrap();
    assert_eq!(
        after.remaining, 4,
        "a was charged once, the denied decisions gave back"
    );

    // Many keys across every node: each admits exactly its burst.
    for i in 0..30 {
        let k = bucket(&format!("r:c:{{key-{i}}}"), 60_000, 3, 1);
        let mut admitted = 0;
        for _ in 0..5 {
            if store
                .decide(std::slice::from_ref(&k), soon())
                .await
                .unwrap()[0]
                .allowed
            {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "key-{i}");
    }
    let per_node = cluster.keys_per_node();
    assert!(
        per_node.iter().all(|&n| n > 0),
        "keys on every master: {per_node:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decisions_share_calls_and_stay_exact() {
    let redis = RedisProcess::standalone();
    let store = std::sync::Arc::new(connected(RedisMode::Standalone, vec![redis.url()]).await);
    let before = redis.evalsha_calls();
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                // Two limits: one hot shared bucket (burst 50) and one per task.
                let shared = bucket("r:hot:{all}", 60_000, 50, 1);
                let own = bucket(&format!("r:own:{{{i}}}"), 60_000, 1, 1);
                store.decide(&[shared, own], soon()).await.unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let o = t.await.unwrap();
        assert_eq!(
            o[0].allowed && o[1].allowed,
            o[0].allowed,
            "per-task bucket never denies"
        );
        if o[0].allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 50, "exactly the burst of the shared bucket");
    let used = redis.evalsha_calls() - before;
    assert!(
        used < 400,
        "{used} script calls for 400 concurrent decisions"
    );
    // Denied decisions charged nothing: the per-task buckets of denied tasks are still full.
    let mut untouched = 0;
    for i in 0..400 {
        let own = store
            .peek(&bucket(&format!("r:own:{{{i}}}"), 60_000, 1, 1))
            .await
            .unwrap();
        if own.remaining == 1 {
            untouched += 1;
        }
    }
    assert_eq!(untouched, 350);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_window_gathers_decisions_that_arrive_apart() {
    let redis = RedisProcess::standalone();
    let store = std::sync::Arc::new(
        connected_with_window(
            RedisMode::Standalone,
            vec![redis.url()],
            Duration::from_millis(100),
        )
        .await,
    );
    let before = redis.evalsha_calls();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .decide(&[bucket(&format!("r:w:{{{i}}}"), 60_000, 1, 1)], soon())
                .await
                .unwrap()
        }));
        // Requests 5 ms apart: without a window each would be a call of its own.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        assert!(t.await.unwrap()[0].allowed);
    }
    let used = redis.evalsha_calls() - before;
    assert!(used <= 4, "{used} calls for 10 decisions inside one window");
}

/// Time per token of a rate as the gateway computes it.
fn interval_of(rate: &str) -> u64 {
    tollgate::limiter::Rate::parse(rate).unwrap().interval_ns()
}

fn bucket_ns(key: &str, interval_ns: u64, burst: u64, cost: u64) -> BucketRequest {
    BucketRequest {
        key: key.to_string(),
        algorithm: tollgate::limiter::Algorithm::TokenBucket,
        interval_ns,
        burst,
        cost,
    }
}

/// The memory store and the Redis store driven through the same decisions must agree to the
/// token, at fast (600000/s), odd (7/s) and slow (3/m) rates, with bursts and costs.
///
/// Both stores decide at their own clock, so each decision carries a "clock" bucket (3/m,
/// never full): its reply reveals the exact Redis TIME the script used, and the memory store's
/// manual clock is moved to that instant before it decides the same request.
#[tokio::test]
async fn memory_and_redis_stores_agree_to_the_token() {
    use std::sync::Arc;
    use tollgate::limiter::clock::ManualClock;
    use tollgate::limiter::memory::MemoryStore;

    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    let start: u64 = 1_000_000_000_000;
    let clock = Arc::new(ManualClock::new(start));
    let memory = MemoryStore::new(10_000, clock.clone());

    let clock_interval = interval_of("3/m");
    let clock_bucket = |cost| bucket_ns("eq:clock:{c}", clock_interval, 1000, cost);
    let fast = |cost| bucket_ns("eq:fast:{c}", interval_of("600000/s"), 1000, cost);
    let odd = |cost| bucket_ns("eq:odd:{c}", interval_of("7/s"), 3, cost);
    let slow = |cost| bucket_ns("eq:slow:{c}", interval_of("3/m"), 2, cost);
    // At the precision bound: refill times just under 2^53 ns (about 104 days).
    let finest = |cost| {
        bucket_ns(
            "eq:finest:{c}",
            interval_of("1000000/s"),
            9_007_199_254_740,
            cost,
        )
    };
    let daily = |cost| bucket_ns("eq:daily:{c}", interval_of("1/d"), 104, cost);

    let mut clock_tat: Option<u64> = None;
    let mut now = start;
    let (mut admitted_steps, mut denied_steps) = (0, 0);
    for step in 0..50u64 {
        let round = (step / 5) as usize;
        let tested: Vec<BucketRequest> = match step % 5 {
            0 => vec![fast([300, 700, 1, 1000, 999][round % 5])],
            1 => vec![odd(1 + step % 3)],
            2 => vec![slow(1)],
            3 => vec![odd(1), fast(250), slow(1)],
            _ => vec![
                finest([9_007_199_254_000, 1, 740, 5_000_000, 1][round % 5]),
                daily([100, 5, 1, 3, 104][round % 5]),
            ],
        };
        let mut requests = vec![clock_bucket(1)];
        requests.extend(tested);
        let from_redis = store.decide(&requests, soon()).await.unwrap();
        let admitted = from_redis.iter().all(|o| o.allowed);
        // The script's time, from the clock bucket's debt (reported uncharged on a denial).
        if let Some(tat) = clock_tat {
            let charged = if admitted { clock_interval } else { 0 };
            let script_now = (tat + charged)
                .checked_sub(from_redis[0].reset_ns)
                .unwrap_or_else(|| panic!("step {step}: reset beyond the stored tat"));
            assert!(
                script_now >= now,
                "step {step}: Redis time went back by {} ns",
                now - script_now
            );
            assert_eq!(
                (script_now - start) % 1000,
                0,
                "step {step}: Redis TIME has whole microseconds, reset_ns {} is not exact",
                from_redis[0].reset_ns
            );
            clock.advance_ns(script_now - now);
            now = script_now;
        }
        let from_memory = memory.decide(&requests, soon()).await.unwrap();
        assert_eq!(
            from_redis, from_memory,
            "step {step}: {requests:?} decided differently (left Redis, right memory)"
        );
        if admitted {
            clock_tat = Some(now + from_redis[0].reset_ns);
            admitted_steps += 1;
        } else {
            denied_steps += 1;
        }
        if step % 5 == 4 {
            // Let the odd bucket refill partly between rounds (time passing, not a sync).
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    assert!(
        admitted_steps >= 10 && denied_steps >= 10,
        "the sequence exercised both: {admitted_steps} admitted, {denied_steps} denied"
    );
    // A read that charges nothing (cost 0), at one Redis TIME: the same state in both.
    let read = [
        clock_bucket(0),
        fast(0),
        odd(0),
        slow(0),
        finest(0),
        daily(0),
    ];
    let from_redis = store.decide(&read, soon()).await.unwrap();
    let script_now = clock_tat.unwrap() - from_redis[0].reset_ns;
    clock.advance_ns(script_now - now);
    assert_eq!(from_redis, memory.decide(&read, soon()).await.unwrap());
}

/// Redis Cluster: when another slot denies, a bucket that admitted is given back and reported
/// as it really is (uncharged), like the other stores.
#[tokio::test]
async fn cluster_reports_admitting_buckets_uncharged() {
    let cluster = RedisCluster::start();
    let store = connected(RedisMode::Cluster, cluster.urls()).await;
    let a = bucket("r:a:{alpha}", 60_000, 5, 1);
    let b = bucket("r:b:{beta}", 60_000, 1, 1);
    store.decide(&[a.clone(), b.clone()], soon()).await.unwrap();
    let denied = store.decide(&[a.clone(), b.clone()], soon()).await.unwrap();
    assert!(denied[0].allowed && !denied[1].allowed);
    let real = store.peek(&a).await.unwrap();
    assert_eq!(denied[0].remaining, real.remaining);
    assert_eq!(real.remaining, 4);
    // A peek a moment later: the same debt, minus the time in between.
    assert!(
        denied[0].reset_ns >= real.reset_ns && denied[0].reset_ns - real.reset_ns < 1_000 * MS,
        "reported reset {} ns, real {} ns",
        denied[0].reset_ns,
        real.reset_ns
    );
    assert!(
        denied[0].next_token_ns >= real.next_token_ns
            && denied[0].next_token_ns - real.next_token_ns < 1_000 * MS
    );
}

/// A cost the bucket can never hold is denied without arithmetic that could overflow, charges
/// nothing, and is never given a retry time.
#[tokio::test]
async fn costs_beyond_the_burst_never_fit_and_never_overflow() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    store
        .decide(&[bucket("r:x:{k}", 60_000, 5, 2)], soon())
        .await
        .unwrap();
    for cost in [6, 1_000_000_000_000_000, u64::MAX] {
        let o = store
            .decide(&[bucket("r:x:{k}", 60_000, 5, cost)], soon())
            .await
            .unwrap();
        assert!(!o[0].allowed, "cost {cost}");
        assert_eq!(
            o[0].retry_ns, 0,
            "cost {cost}: no retry time for the impossible"
        );
        assert_eq!(o[0].remaining, 3, "cost {cost}");
    }
    let o = store
        .decide(&[bucket("r:x:{k}", 60_000, 5, 3)], soon())
        .await
        .unwrap();
    assert!(o[0].allowed, "the impossible costs took nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_batches_distinct_keys_per_node_and_stays_exact() {
    let cluster = RedisCluster::start();
    let store = std::sync::Arc::new(connected(RedisMode::Cluster, cluster.urls()).await);
    let calls = |c: &RedisCluster| c.nodes.iter().map(|n| n.evalsha_calls()).sum::<u64>();
    let before = calls(&cluster);
    // 300 concurrent requests, each with its own key (300 slots, spread over 3 nodes) and one
    // shared bucket of burst 100: per-slot calls would be about one per request.
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let own = bucket(&format!("r:own:{{user-{i}}}"), 60_000, 1, 1);
                let shared = bucket("r:all:{everyone}", 60_000, 100, 1);
                store.decide(&[own, shared], soon()).await.unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        if t.await.unwrap().iter().all(|o| o.allowed) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 100, "exactly the shared burst");
    let used = calls(&cluster) - before;
    assert!(
        used < 150,
        "{used} script calls (refunds included) for 300 decisions"
    );
    // The 200 denied requests charged nothing: their own buckets are full.
    let mut untouched = 0;
    for i in 0..300 {
        let own = store
            .peek(&bucket(&format!("r:own:{{user-{i}}}"), 60_000, 1, 1))
            .await
            .unwrap();
        if own.remaining == 1 {
            untouched += 1;
        }
    }
    assert_eq!(untouched, 200);
}

#[tokio::test]
async fn a_refund_tried_twice_is_applied_once() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    let b = bucket("r:x:{refund}", 60_000, 10, 5);
    let charged_us = redis_time_us(&redis).to_string();
    assert!(
        store
            .decide(std::slice::from_ref(&b), soon())
            .await
            .unwrap()[0]
            .allowed
    );
    // The debt right after the charge: 5 tokens of 60 s.
    let debt = (5 * 60_000 * MS).to_string();
    // The same refund (id 77, 2 tokens) sent twice, as a retry after a timeout would: its first
    // try may have run after all.
    let interval = (60_000 * MS).to_string();
    for _ in 0..2 {
        let out = redis.cli(&[
            "EVAL",
            tollgate::limiter::redis::TOKEN_BUCKET_LUA,
            "1",
            "t:r:x:{refund}",
            "refund",
            "1",
            "0",
            // One policy: interval, burst, token bucket.
            "1",
            &interval,
            "10",
            "0",
            // One request of one bucket: refund id 77, the charge's time and the debt after
            // it, then the bucket: the first policy at cost 2.
            "1",
            "77",
            &charged_us,
            &debt,
            "1*2",
        ]);
        assert!(out.is_some(), "the refund call ran");
    }
    let left = store
        .peek(&bucket("r:x:{refund}", 60_000, 10, 1))
        .await
        .unwrap();
    assert_eq!(
        left.remaining, 7,
        "5 left after the charge, 2 given back once"
    );
}

/// Redis `TIME` in microseconds.
fn redis_time_us(redis: &RedisProcess) -> u64 {
    let time = redis.cli(&["TIME"]).unwrap();
    let mut parts = time.lines();
    let secs: u64 = parts.next().unwrap().trim().parse().unwrap();
    let micros: u64 = parts.next().unwrap().trim().parse().unwrap();
    secs * 1_000_000 + micros
}

/// A late refund gives back only what its charge still holds. Charge A on a fresh bucket
/// (300 ms per token, burst 2); the bucket refills past it; B and C empty it; then A's refund
/// arrives (a reply that came back late, or a retried refund). Time has already paid A off:
/// giving its token back would let a fourth request through within 300 ms of B and C, one more
/// than the burst. A refund of a charge still held is given back in full.
#[tokio::test]
async fn a_refund_gives_back_only_what_the_charge_still_holds() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    let b = bucket("r:x:{paid}", 300, 2, 1);
    let refund = |charged_us: u64, debt_ns: u64, id: &str| {
        script_refund(&redis, "t:r:x:{paid}", 300, 2, id, (charged_us, debt_ns))
    };
    let a_at = redis_time_us(&redis);
    assert!(
        store
            .decide(std::slice::from_ref(&b), soon())
            .await
            .unwrap()[0]
            .allowed
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..2 {
        assert!(
            store
                .decide(std::slice::from_ref(&b), soon())
                .await
                .unwrap()[0]
                .allowed
        );
    }
    // A's tat was a_at + 300 ms, some 400 ms ago.
    refund(a_at, 300 * MS, "11");
    let left = store.peek(&bucket("r:x:{paid}", 300, 2, 1)).await.unwrap();
    assert_eq!(left.remaining, 0, "A's token was not given back: {left:?}");
    // D charged now (by the script directly: its reply carries the exact TIME of the charge
    // and the debt it read) and refunded at once: the whole token comes back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let d = script_decide(&redis, "t:r:x:{paid}", 300, 2);
    refund(d.0, d.1, "12");
    let left = store.peek(&bucket("r:x:{paid}", 300, 2, 1)).await.unwrap();
    assert_eq!(left.remaining, 2, "D's token was given back: {left:?}");
}

/// Runs the script on one token bucket (`interval_ms` per token, `burst`) in `mode`, with
/// `extra` arguments after the request's count and deadline/id; returns the reply's numbers.
fn run_script(
    redis: &RedisProcess,
    key: &str,
    mode: &str,
    interval_ms: u64,
    burst: u64,
    extra: &[String],
) -> Vec<u64> {
    let interval = (interval_ms * MS).to_string();
    let burst = burst.to_string();
    let mut args: Vec<&str> = vec![
        "EVAL",
        tollgate::limiter::redis::TOKEN_BUCKET_LUA,
        "1",
        key,
        mode,
        "1",
        "0",
        "1",
        &interval,
        &burst,
        "0",
        "1",
    ];
    args.extend(extra.iter().map(String::as_str));
    let out = redis.cli(&args).unwrap_or_default();
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// A decision at cost 1 by the script: (its Redis time in us, the debt after it in ns).
fn script_decide(redis: &RedisProcess, key: &str, interval_ms: u64, burst: u64) -> (u64, u64) {
    let r = run_script(
        redis,
        key,
        "decide",
        interval_ms,
        burst,
        &["0".into(), "1".into()],
    );
    assert_eq!(r[2], 1, "admitted: {r:?}");
    (r[0] * 1_000_000 + r[1], r[3] + interval_ms * MS)
}

/// The script's refund (id `id`) of a cost-1 charge made at `at` us, leaving `debt` ns.
fn script_refund(
    redis: &RedisProcess,
    key: &str,
    interval_ms: u64,
    burst: u64,
    id: &str,
    (at, debt): (u64, u64),
) {
    let r = run_script(
        redis,
        key,
        "refund",
        interval_ms,
        burst,
        &[id.into(), at.to_string(), debt.to_string(), "1".into()],
    );
    assert!(r.len() >= 2, "the refund call ran: {r:?}");
}

/// Late refunds of two charges on one token bucket (hostile review): L and M are charged and
/// refunded late, other requests are charged in between. Each refund is bounded by what its
/// charge still holds, and M's by what L's refund already gave back (M's recorded debt counted
/// L's whole charge). Checked against a model bucket that only ever saw the requests that were
/// kept, at the script's exact `TIME`s: the real bucket may owe more (a refund may give back
/// less than exact), never less.
#[tokio::test]
async fn chained_late_refunds_never_give_back_more_than_the_charges_hold() {
    let redis = RedisProcess::standalone();
    let key = "t:r:x:{chain}";
    const I: u64 = 500;
    let sleep = |ms| tokio::time::sleep(Duration::from_millis(ms));
    let decide = || script_decide(&redis, key, I, 3);
    let refund = |id: &str, charge| script_refund(&redis, key, I, 3, id, charge);
    let b1 = decide();
    sleep(10).await;
    let l = decide();
    sleep(240).await;
    let m = decide();
    sleep(360).await;
    refund("21", l);
    sleep(200).await;
    let x = decide();
    sleep(30).await;
    refund("22", m);
    let peek = run_script(&redis, key, "peek", I, 3, &["0".into(), "1".into()]);
    let now_us = peek[0] * 1_000_000 + peek[1];
    let real = peek[3];
    // The model: only B1 and X, GCRA at their exact times (ns).
    let mut tat = 0u64;
    for (at_us, _) in [b1, x] {
        tat = tat.max(at_us * 1000) + I * MS;
    }
    let model = tat.saturating_sub(now_us * 1000);
    assert!(
        real >= model,
        "the bucket owes {real} ns, less than the {model} ns the kept requests alone leave"
    );
}

/// The other side of the ledger: refunds of charges made after A (each charge and its refund
/// together never lower what A still holds) do not count against A's refund, even when there
/// are more of them than the ledger keeps one by one (16). A's late refund then gives back what
/// time has left of A: the bucket ends as if none of the 21 requests had been charged.
#[tokio::test]
async fn refunds_of_later_charges_do_not_shrink_an_earlier_refund() {
    let redis = RedisProcess::standalone();
    let key = "t:r:x:{later}";
    const I: u64 = 1000;
    let decide = || script_decide(&redis, key, I, 30);
    let refund = |id: String, charge| script_refund(&redis, key, I, 30, &id, charge);
    let a = decide();
    for i in 0..20 {
        let c = decide();
        refund(format!("{}", 100 + i), c);
    }
    refund("99".into(), a);
    let peek = run_script(&redis, key, "peek", I, 30, &["0".into(), "1".into()]);
    assert!(
        peek[3] < MS,
        "{} ns still owed after every charge was refunded",
        peek[3]
    );
    let ledger = redis
        .cli(&["GET", &format!("{key}#rf")])
        .unwrap_or_default();
    assert_eq!(
        ledger.trim().split(';').count(),
        17,
        "16 entries and the dropped: {ledger}"
    );
    // A ledger key of another type (written by something else) reads as empty and is
    // replaced: the refund still applies.
    let other = "t:r:x:{other}";
    redis.cli(&["HSET", &format!("{other}#rf"), "a", "b"]);
    let c = script_decide(&redis, other, I, 30);
    script_refund(&redis, other, I, 30, "7", c);
    let peek = run_script(&redis, other, "peek", I, 30, &["0".into(), "1".into()]);
    assert!(peek[3] < MS, "{} ns still owed after the refund", peek[3]);
}

/// The script skips a request whose deadline (Redis `TIME` in microseconds) has passed and
/// decides one whose deadline is ahead, for deadlines of the usual 16 digits (compared as
/// text) and of other lengths (converted): the reply is the status alone (2) for a skipped
/// request, the status and the bucket's debt for a decided one.
#[tokio::test]
async fn the_script_skips_requests_past_their_deadline_and_only_those() {
    let redis = RedisProcess::standalone();
    let time = redis.cli(&["TIME"]).unwrap();
    let mut parts = time.lines();
    let secs: u64 = parts.next().unwrap().trim().parse().unwrap();
    let micros: u64 = parts.next().unwrap().trim().parse().unwrap();
    let now_us = secs * 1_000_000 + micros;
    let interval = (60_000 * MS).to_string();
    let run = |deadline: String| -> Vec<String> {
        let out = redis
            .cli(&[
                "EVAL",
                tollgate::limiter::redis::TOKEN_BUCKET_LUA,
                "1",
                "t:r:x:{deadline}",
                "decide",
                "1",
                "0",
                "1",
                &interval,
                "10",
                "0",
                "1",
                &deadline,
                "1",
            ])
            .unwrap();
        out.lines().map(|l| l.trim().to_string()).skip(2).collect()
    };
    // An hour ago, an hour ahead (16 digits); far ahead with 17 digits; a 1-digit past one;
    // 0: no deadline.
    assert_eq!(run((now_us - 3_600_000_000).to_string()), ["2"], "past");
    assert_eq!(run("5".to_string()), ["2"], "past, short");
    let ahead = run((now_us + 3_600_000_000).to_string());
    assert_eq!(
        ahead.first().map(String::as_str),
        Some("1"),
        "ahead: {ahead:?}"
    );
    assert_eq!(ahead.len(), 2, "the status and one debt: {ahead:?}");
    assert_eq!(
        run("99999999999999999".to_string())[0],
        "1",
        "17 digits, ahead"
    );
    assert_eq!(run("0".to_string())[0], "1", "no deadline");
}
