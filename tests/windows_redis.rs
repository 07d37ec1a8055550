//! The window algorithms through real `redis-server` processes started here: the script's
//! answers against the memory store and a reference model at the script's own Redis `TIME`,
//! the Cluster path giving a window's count back when another slot denies, exact shared
//! counting across two gateway processes on one Redis for every algorithm, refunds back to
//! the window charged, the local fallback's share of a window, and the admin API's reads and
//! checks of window buckets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::{RedisCluster, RedisProcess};
use common::{client, header, Gateway, Upstream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tollgate::config::model::{RedisConfig, RedisMode};
use tollgate::limiter::clock::ManualClock;
use tollgate::limiter::memory::MemoryStore;
use tollgate::limiter::redis::RedisStore;
use tollgate::limiter::{Algorithm, BucketRequest, Store};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const DAY: u64 = 86_400 * SEC;

fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(500)
}

async fn connected(mode: RedisMode, urls: Vec<String>) -> RedisStore {
    let store = RedisStore::new(&RedisConfig {
        mode,
        urls,
        service_name: None,
        timeout: Duration::from_millis(500),
        key_prefix: "t:".into(),
        batch_window: Duration::ZERO,
        startup_wait: Duration::from_secs(5),
    })
    .unwrap();
    let handle = tokio::runtime::Handle::current();
    store
        .connect(
            &[(std::thread::current().id(), handle)],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    store
}

fn bucket(key: &str, algorithm: Algorithm, window: u64, quota: u64, cost: u64) -> BucketRequest {
    BucketRequest {
        key: key.into(),
        algorithm,
        interval_ns: window,
        burst: quota,
        cost,
    }
}

/// Redis `TIME` in nanoseconds.
fn redis_time(redis: &RedisProcess) -> u64 {
    let out = redis.cli(&["TIME"]).unwrap();
    let mut parts = out.split_whitespace().map(|p| p.parse::<u64>().unwrap());
    let (s, us) = (parts.next().unwrap(), parts.next().unwrap());
    s * SEC + us * 1000
}

/// A window bucket by its definition (see tests/window_properties.rs).
struct Model {
    sliding: bool,
    window: u64,
    quota: u64,
    log: Vec<(u64, u64)>,
}

impl Model {
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
        let prev = sum(start - self.window, start);
        let w_ms = self.window / MS;
        let left_ms = w_ms - (t - start) / MS;
        cur + (prev * left_ms).div_ceil(w_ms)
    }

    fn fits(&self, t: u64, cost: u64) -> bool {
        cost <= self.quota && self.used(t) + cost <= self.quota
    }
}

/// Real time, one-second windows: the script decides fixed and sliding windows (with a token
/// bucket in the same requests) exactly as the memory store does at the script's Redis `TIME`
/// (every outcome field equal), and admits exactly what the model admits. The script's time
/// comes from a clock bucket in every request: a fixed window of one day, charged once, whose
/// `reset_ns` is the time left in the UTC day.
#[tokio::test]
async fn script_agrees_with_the_memory_store_and_the_model() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    let clock_bucket = |cost| bucket("w:clock:{c}", Algorithm::FixedWindow, DAY, 1 << 40, cost);
    let before = redis_time(&redis);
    let first = store.decide(&[clock_bucket(1)], soon()).await.unwrap();
    let start = before / DAY * DAY + (DAY - first[0].reset_ns);
    let clock = Arc::new(ManualClock::new(start));
    let memory = MemoryStore::new(10_000, clock.clone());
    memory.decide(&[clock_bucket(1)], soon()).await.unwrap();
    let mut now = start;

    let w = SEC;
    let quota = 4;
    let mut fixed = Model {
        sliding: false,
        window: w,
        quota,
        log: Vec::new(),
    };
    let mut sliding = Model {
        sliding: true,
        window: w,
        quota,
        log: Vec::new(),
    };
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut admitted, mut denied, mut boundaries) = (0, 0, 0);
    for step in 0..120 {
        let cf = rand(quota + 2);
        let cs = rand(quota + 2);
        let mut requests = vec![
            clock_bucket(0),
            bucket("w:fixed:{f}", Algorithm::FixedWindow, w, quota, cf),
            bucket("w:sliding:{s}", Algorithm::SlidingWindow, w, quota, cs),
        ];
        if step % 3 == 0 {
            requests.push(bucket(
                "w:token:{t}",
                Algorithm::TokenBucket,
                w / quota,
                quota,
                rand(3),
            ));
        }
        let t0 = redis_time(&redis);
        let from_redis = store.decide(&requests, soon()).await.unwrap();
        let t1 = redis_time(&redis);
        let in_day = DAY - from_redis[0].reset_ns;
        let script_now = [t0 / DAY, t1 / DAY]
            .into_iter()
            .map(|d| d * DAY + in_day)
            .find(|t| *t >= t0 && *t <= t1)
            .unwrap_or_else(|| panic!("step {step}: no day puts {in_day} in [{t0}, {t1}]"));
        assert!(script_now >= now, "step {step}: Redis time went back");
        if script_now / w != now / w {
            boundaries += 1;
        }
        clock.advance_ns(script_now - now);
        now = script_now;
        let from_memory = memory.decide(&requests, soon()).await.unwrap();
        assert_eq!(
            from_redis, from_memory,
            "step {step}: {requests:?} decided differently (left Redis, right memory)"
        );
        let all = from_redis.iter().all(|o| o.allowed);
        let window_fits = fixed.fits(now, cf) && sliding.fits(now, cs);
        assert_eq!(from_redis[1].allowed, fixed.fits(now, cf), "step {step}");
        assert_eq!(from_redis[2].allowed, sliding.fits(now, cs), "step {step}");
        if requests.len() == 3 {
            assert_eq!(all, window_fits, "step {step}");
        }
        if all {
            admitted += 1;
            if cf > 0 {
                fixed.log.push((now, cf));
            }
            if cs > 0 {
                sliding.log.push((now, cs));
            }
        } else {
            denied += 1;
        }
        tokio::time::sleep(Duration::from_millis(rand(120))).await;
    }
    assert!(
        admitted >= 20 && denied >= 20 && boundaries >= 3,
        "the sequence exercised both outcomes across windows: {admitted} admitted, {denied} \
         denied, {boundaries} boundaries"
    );
    // The stored keys expire once they count nothing: a sliding window's after two windows.
    let ttl: i64 = redis
        .cli(&["PTTL", "t:w:sliding:{s}"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(ttl <= 2000, "sliding window key TTL {ttl} ms");
}

/// In a Cluster, a request whose window bucket's slot admits while another slot denies gets
/// the window's count back: the window is charged once, not once per denied try.
#[tokio::test]
async fn cluster_gives_a_window_back_when_another_slot_denies() {
    let cluster = RedisCluster::start();
    let store = connected(RedisMode::Cluster, cluster.urls()).await;
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let name = algorithm.name();
        let a = bucket(&format!("r:{name}:{{alpha}}"), algorithm, DAY, 5, 1);
        let b = bucket(
            &format!("r:{name}:{{beta}}"),
            Algorithm::TokenBucket,
            DAY,
            1,
            1,
        );
        assert_ne!(
            fred::util::redis_keyslot(format!("t:{}", a.key).as_bytes()),
            fred::util::redis_keyslot(format!("t:{}", b.key).as_bytes()),
        );
        let first = store.decide(&[a.clone(), b.clone()], soon()).await.unwrap();
        assert!(first.iter().all(|o| o.allowed), "{name}");
        for _ in 0..3 {
            let denied = store.decide(&[a.clone(), b.clone()], soon()).await.unwrap();
            assert!(denied[0].allowed && !denied[1].allowed, "{name}");
            assert_eq!(denied[0].remaining, 4, "{name}: reported uncharged");
        }
        let after = store.peek(&a).await.unwrap();
        assert_eq!(
            after.remaining, 4,
            "{name}: charged once, the denied decisions gave back"
        );
    }
}

fn gateway_yaml(url: &str) -> String {
    let route = |name: &str, algorithm: &str| {
        format!(
            r#"  - {{ name: {name}, upstream: app, match: {{ path_prefix: "/{name}" }}, limits: [ {{ name: per-user, key: ["header:x-user"], rate: "40/d", algorithm: {algorithm} }} ] }}"#
        )
    };
    format!(
        r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
store: {{ kind: redis, redis: {{ mode: standalone, urls: ["{url}"] }} }}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
{}
{}
{}
"#,
        route("fixed", "fixed_window"),
        route("sliding", "sliding_window"),
        route("token", "token_bucket"),
    )
}

/// Two gateways on one Redis, 16 concurrent clients alternating between them: each algorithm
/// admits exactly its quota (40 a day), and the window routes say so in their headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_each_algorithm_exactly() {
    let redis = RedisProcess::standalone();
    // Not across a UTC midnight (a new daily window): wait it out if it is near.
    let in_day = redis_time(&redis) % DAY;
    if DAY - in_day < 60 * SEC {
        tokio::time::sleep(Duration::from_nanos(DAY - in_day + SEC)).await;
    }
    let up = Upstream::start();
    let yaml = gateway_yaml(&redis.url());
    let a = Arc::new(Gateway::start(&yaml, up.addr).await);
    let b = Arc::new(Gateway::start(&yaml, up.addr).await);
    let late_refunds = || async {
        let mut sum = 0;
        for gw in [&a, &b] {
            sum += gw
                .metric("tollgate_redis_late_refunds_total")
                .await
                .unwrap_or(0.0) as usize;
        }
        sum
    };
    for route in ["fixed", "sliding", "token"] {
        let late_before = late_refunds().await;
        let admitted = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for t in 0..16 {
            let (a, b, admitted) = (a.clone(), b.clone(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                let c = client();
                for i in 0..8 {
                    let gw = if (t + i) % 2 == 0 { &a } else { &b };
                    let s = c
                        .get(gw.url(&format!("/{route}")))
                        .header("x-user", "hot")
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16();
                    match s {
                        200 => {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                        429 => {}
                        other => panic!("{route}: unexpected status {other}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // A decision past the default 20 ms deadline goes to the local fallback (and is not
        // charged in Redis): what Redis decided is exact. A reply that charged a request after
        // its deadline is refunded, but the requests Redis decided while that charge stood
        // saw one token fewer: on a starved machine Redis may admit up to that many fewer,
        // never more.
        let mut by_fallback = 0;
        for gw in [&a, &b] {
            let prefix = format!(
                "tollgate_requests_total{{decision=\"fallback_allowed\",route=\"{route}\"}}"
            );
            by_fallback += gw.metric(&prefix).await.unwrap_or(0.0) as usize;
        }
        let admitted = admitted.load(Ordering::SeqCst);
        let by_redis = admitted - by_fallback;
        // A late reply lands (and is counted) up to a second after its request was answered.
        let waited = std::time::Instant::now();
        let mut late;
        loop {
            late = late_refunds().await - late_before;
            if by_redis + late >= 40 || waited.elapsed() > Duration::from_secs(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "{route}: {admitted} admitted, {by_fallback} of them by the local fallback; \
             {late} late refunds"
        );
        assert!(
            by_redis <= 40,
            "{route}: {by_redis} admitted by Redis: over the quota"
        );
        assert!(
            by_redis + late >= 40,
            "{route}: {by_redis} admitted by Redis, {late} late refunds: under the quota"
        );
        // The quota is spent: a 429 (a fallback answer is retried).
        let mut resp = None;
        for _ in 0..20 {
            let r = client()
                .get(a.url(&format!("/{route}")))
                .header("x-user", "hot")
                .send()
                .await
                .unwrap();
            if r.status().as_u16() == 429 && !header(&r, "ratelimit-policy").is_empty() {
                resp = Some(r);
                break;
            }
        }
        let resp = resp.unwrap_or_else(|| panic!("{route}: no 429 with headers"));
        let policy = header(&resp, "ratelimit-policy");
        let state = header(&resp, "ratelimit");
        if route == "token" {
            assert_eq!(policy, "\"per-user\";q=40;w=86400", "{route}");
        } else {
            assert_eq!(policy, "\"per-user\";q=40;w=86400", "{route}");
            let to_midnight = (DAY - redis_time(&redis) % DAY).div_ceil(SEC);
            let t: u64 = state
                .rsplit("t=")
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{route}: {state}"));
            // Fixed: the window resets at midnight. Sliding: one more fits once the day's
            // count weighs one less tomorrow (ceil(40 * left / day) <= 39: 36 min into it).
            let expected = if route == "fixed" {
                to_midnight
            } else {
                to_midnight + 86_400 / 40
            };
            assert!(
                t.abs_diff(expected) <= 2,
                "{route}: {state}, expected t about {expected}"
            );
            assert!(state.starts_with("\"per-user\";r=0;"), "{route}: {state}");
        }
    }
}

/// The admin API names a window's algorithm, reads it without charging and decides with it
/// (`/v1/check`), on the memory store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reads_and_checks_window_buckets() {
    let up = Upstream::start();
    let yaml = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - { name: r, upstream: app, limits: [ { name: l, key: ["header:x-user"], rate: "3/d", algorithm: sliding_window } ] }
"#;
    let gw = Gateway::start(yaml, up.addr).await;
    let c = client();
    for expected in [200, 200, 200, 429] {
        let s = c
            .get(gw.url("/"))
            .header("x-user", "bob")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s.as_u16(), expected);
    }
    let peek: serde_json::Value = c
        .get(gw.admin_url("/v1/limits/r/l?key=bob"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(peek["algorithm"], "sliding_window", "{peek}");
    assert_eq!(peek["tokens"], 0, "{peek}");
    assert_eq!(peek["capacity"], 3, "{peek}");
    let check: serde_json::Value = c
        .post(gw.admin_url("/v1/check"))
        .json(&serde_json::json!({"route": "r", "key": {"header:x-user": "ann"}, "cost": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(check["allowed"], true, "{check}");
    assert_eq!(check["limits"][0]["algorithm"], "sliding_window", "{check}");
    assert_eq!(check["limits"][0]["remaining"], 0, "{check}");
    let never: serde_json::Value = c
        .post(gw.admin_url("/v1/check"))
        .json(&serde_json::json!({"route": "r", "key": {"header:x-user": "cy"}, "cost": 4}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(never["allowed"], false, "{never}");
    assert_eq!(
        never["retry_after_ms"],
        serde_json::Value::Null,
        "a cost above the quota never passes: {never}"
    );
}

/// With Redis gone, the local fallback enforces each instance's share of a window: quota/N
/// per the same window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_enforces_a_share_of_the_window() {
    let mut redis = RedisProcess::standalone();
    let up = Upstream::start();
    let yaml = format!(
        r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
store: {{ kind: redis, redis: {{ mode: standalone, urls: ["{}"] }} }}
breaker: {{ fallback: local, fallback_instances: 2 }}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
  - {{ name: r, upstream: app, limits: [ {{ name: l, key: ["header:x-user"], rate: "10/d", algorithm: fixed_window }} ] }}
"#,
        redis.url()
    );
    let gw = Gateway::start(&yaml, up.addr).await;
    redis.kill();
    let c = client();
    let mut admitted = 0;
    let mut policy = String::new();
    for _ in 0..12 {
        let resp = c
            .get(gw.url("/"))
            .header("x-user", "dee")
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => admitted += 1,
            429 => policy = header(&resp, "ratelimit-policy"),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 5, "half of 10 per day window");
    assert_eq!(policy, "\"l\";q=5;w=86400");
    assert!(
        gw.metric("tollgate_requests_total{decision=\"fallback_allowed\",route=\"r\"}")
            .await
            .unwrap_or(0.0)
            >= 5.0
    );
}

/// A window's refund goes back to the window its charge was made in, once: a refund for the
/// current window lowers its count, one for a window that no longer counts changes nothing,
/// and a retried refund (same id) is applied once.
#[tokio::test]
async fn a_window_refund_goes_back_to_the_window_it_was_charged_in() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    for (algorithm, alg) in [
        (Algorithm::FixedWindow, "2"),
        (Algorithm::SlidingWindow, "1"),
    ] {
        let key = format!("r:refund:{{{}}}", algorithm.name());
        let b = bucket(&key, algorithm, DAY, 10, 3);
        assert!(
            store
                .decide(std::slice::from_ref(&b), soon())
                .await
                .unwrap()[0]
                .allowed,
            "{alg}"
        );
        let now_s = redis_time(&redis) / SEC;
        let refund = |id: &str, charged_s: u64, cost: &str| {
            let out = redis.cli(&[
                "EVAL",
                tollgate::limiter::redis::TOKEN_BUCKET_LUA,
                "1",
                &format!("t:{key}"),
                "refund",
                "1",
                "0",
                // One policy: interval (the window), quota, algorithm.
                "1",
                &DAY.to_string(),
                "10",
                alg,
                // One request of one bucket: its refund id, the charge's time (us) and debt
                // (0: a window), then the bucket: the first policy at this cost.
                "1",
                id,
                &(charged_s * 1_000_000).to_string(),
                "0",
                &format!("1*{cost}"),
            ]);
            assert!(out.is_some(), "the refund call ran");
        };
        let remaining = |b: BucketRequest| {
            let store = &store;
            async move { store.peek(&b).await.unwrap().remaining }
        };
        // Two days ago and yesterday: windows that hold none of this charge.
        refund("11", now_s - 2 * 86_400, "2");
        refund("12", now_s - 86_400, "2");
        assert_eq!(remaining(b.clone()).await, 7, "{alg}: nothing given back");
        // Today, twice with one id: applied once.
        refund("13", now_s, "2");
        refund("13", now_s, "2");
        assert_eq!(remaining(b.clone()).await, 9, "{alg}: 2 given back once");
    }
}

/// A window stored ahead of Redis's clock (its clock stepped back, as after a failover to a node
/// whose clock is behind) keeps its counts: spending it and moving its index forward must not
/// give a fresh quota.
#[tokio::test]
async fn a_window_stored_ahead_of_the_clock_keeps_its_counts() {
    let redis = RedisProcess::standalone();
    let store = connected(RedisMode::Standalone, vec![redis.url()]).await;
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let key = format!("r:ahead:{{{}}}", algorithm.name());
        let b = bucket(&key, algorithm, DAY, 3, 1);
        for _ in 0..3 {
            let out = store
                .decide(std::slice::from_ref(&b), soon())
                .await
                .unwrap();
            assert!(out[0].allowed);
        }
        // Move the stored window index one window ahead, as a clock step back would see it.
        let stored = redis.cli(&["GET", &format!("t:{key}")]).unwrap();
        let (index, rest) = stored.trim().split_once(':').unwrap();
        let ahead = format!("{}:{rest}", index.parse::<u64>().unwrap() + 1);
        redis
            .cli(&["SET", &format!("t:{key}"), &ahead, "KEEPTTL"])
            .unwrap();
        let out = store
            .decide(std::slice::from_ref(&b), soon())
            .await
            .unwrap();
        assert!(
            !out[0].allowed,
            "{}: a window ahead of the clock was read as empty ({ahead})",
            algorithm.name()
        );
    }
}
