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
