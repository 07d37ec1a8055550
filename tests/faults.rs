//! Fault tests with real processes: Redis killed, paused (SIGSTOP), slowed by a relay,
//! restarted empty, and flapping, while clients keep sending. The API must stay up (no 5xx
//! from the limiter, no request waiting much past `timeout_ms`) and still be limited.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::RedisProcess;
use common::{client, proc_stats, wait_until, Gateway, Relay, Upstream};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Per-decision budget in these tests.
const TIMEOUT_MS: u64 = 50;
/// What a request may take beyond the budget (debug build, 2 shared cores, loaded machine).
const MARGIN_MS: u64 = 400;

fn yaml(redis: SocketAddr, fallback: &str) -> String {
    format!(
        r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
store: {{ kind: redis, redis: {{ urls: ["redis://{redis}"], timeout_ms: {TIMEOUT_MS} }} }}
breaker: {{ failure_threshold: 3, open_ms: 300, fallback: {fallback}, fallback_instances: 1 }}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
  - {{ name: r, upstream: app, limits: [ {{ name: per-client, key: ["header:x-client"], rate: "20/s", burst: 5 }} ] }}
"#
    )
}

#[derive(Default)]
struct Record {
    /// (client, status, latency)
    results: Vec<(usize, u16, Duration)>,
}

/// Clients each sending with their own key until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: &Gateway, clients: usize, key_prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Record::default()));
        let tasks = (0..clients)
            .map(|i| {
                let (stop, record) = (stop.clone(), record.clone());
                let url = gw.url("/");
                let key = format!("{key_prefix}-{i}");
                tokio::spawn(async move {
                    let c = reqwest::Client::builder()
                        .timeout(Duration::from_secs(5))
                        .build()
                        .unwrap();
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        let status = match c.get(&url).header("x-client", &key).send().await {
                            Ok(r) => r.status().as_u16(),
                            Err(_) => 0,
                        };
                        record
                            .lock()
                            .unwrap()
                            .results
                            .push((i, status, started.elapsed()));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            record,
            tasks,
        }
    }

    async fn finish(self) -> Vec<(usize, u16, Duration)> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        std::mem::take(&mut self.record.lock().unwrap().results)
    }
}

/// No 5xx and no failed request; nothing slower than the budget plus a margin.
fn assert_available(results: &[(usize, u16, Duration)]) {
    assert!(results.len() > 50, "load ran: {} requests", results.len());
    let bad: Vec<_> = results
        .iter()
        .filter(|(_, s, _)| *s != 200 && *s != 429)
        .collect();
    assert!(bad.is_empty(), "failed requests: {bad:?}");
    let slowest = results.iter().map(|(_, _, d)| *d).max().unwrap();
    assert!(
        slowest < Duration::from_millis(TIMEOUT_MS + MARGIN_MS),
        "a request took {slowest:?}"
    );
}

async fn breaker_state(gw: &Gateway) -> Option<f64> {
    gw.metric("tollgate_breaker_state ").await
}

async fn wait_breaker(gw: &Gateway, state: f64, what: &str) {
    wait_until(what, Duration::from_secs(15), || async move {
        breaker_state(gw).await == Some(state)
    })
    .await;
}

async fn counter(gw: &Gateway, decision: &str) -> f64 {
    gw.metric(&format!(
        r#"tollgate_requests_total{{decision="{decision}",route="r"}}"#
    ))
    .await
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_redis_under_load_keeps_serving_and_limiting() {
    let mut redis = RedisProcess::standalone();
    let up = Upstream::start();
    let addr: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let gw = Gateway::start(&yaml(addr, "local"), up.addr).await;
    let started = Instant::now();
    let load = Load::start(&gw, 4, "kill");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    wait_breaker(&gw, 1.0, "the breaker to open").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let results = load.finish().await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_available(&results);
    for client in 0..4 {
        let sent = results.iter().filter(|(c, _, _)| *c == client).count();
        let admitted = results
            .iter()
            .filter(|(c, s, _)| *c == client && *s == 200)
            .count();
        // At most one burst from Redis, one from the fresh local bucket, and the rate
        // (20/s) in between: the limit held through the outage.
        let bound = (2.0 * 5.0 + 20.0 * elapsed + 2.0) as usize;
        assert!(
            admitted <= bound && admitted < sent,
            "client {client}: {admitted} of {sent} admitted, bound {bound}"
        );
    }
    assert!(
        counter(&gw, "fallback_limited").await > 0.0,
        "fallback still limits"
    );
    let errors = gw
        .metric(r#"tollgate_store_errors_total{kind="connection"}"#)
        .await
        .unwrap_or(0.0)
        + gw.metric(r#"tollgate_store_errors_total{kind="timeout"}"#)
            .await
            .unwrap_or(0.0);
    assert!(errors >= 3.0, "failures counted: {errors}");
    let ready: serde_json::Value = reqwest::get(gw.admin_url("/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "degraded");
    // Each transition is logged once: at most one reopening per open_ms (300 ms) of outage,
    // not one line per failed request.
    let opened = gw.log().matches("breaker opened").count();
    let fallback_decisions =
        counter(&gw, "fallback_allowed").await + counter(&gw, "fallback_limited").await;
    assert!(
        (1..=8).contains(&opened) && fallback_decisions > 10.0 * opened as f64,
        "{opened} 'breaker opened' lines for {fallback_decisions} fallback decisions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_then_sigcont_recovers() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let addr: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let gw = Gateway::start(&yaml(addr, "local"), up.addr).await;
    let load = Load::start(&gw, 4, "stop");
    tokio::time::sleep(Duration::from_millis(400)).await;
    redis.signal("STOP");
    wait_breaker(&gw, 1.0, "the breaker to open on a hung Redis").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.signal("CONT");
    wait_breaker(&gw, 0.0, "the breaker to close after SIGCONT").await;
    let results = load.finish().await;
    assert_available(&results);
    assert!(counter(&gw, "fallback_allowed").await > 0.0);
    // Decisions come from Redis again.
    let c = client();
    for _ in 0..3 {
        c.get(gw.url("/"))
            .header("x-client", "after-cont")
            .send()
            .await
            .unwrap();
    }
    assert_eq!(
        redis
            .cli(&["EXISTS", "tollgate:r:per-client:{after-cont}"])
            .as_deref(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_opens_the_breaker_and_fast_redis_closes_it() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let relay = Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let gw = Gateway::start(&yaml(relay.addr, "local"), up.addr).await;
    let load = Load::start(&gw, 3, "slow");
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.set_delay(TIMEOUT_MS * 3);
    wait_breaker(&gw, 1.0, "the breaker to open on a slow Redis").await;
    assert!(
        gw.metric(r#"tollgate_store_errors_total{kind="timeout"}"#)
            .await
            .unwrap()
            >= 3.0
    );
    relay.set_delay(0);
    wait_breaker(&gw, 0.0, "the breaker to close when Redis is fast again").await;
    let results = load.finish().await;
    assert_available(&results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_reloads_the_script() {
    let mut redis = RedisProcess::standalone();
    let up = Upstream::start();
    let addr: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let gw = Gateway::start(&yaml(addr, "local"), up.addr).await;
    let c = client();
    c.get(gw.url("/"))
        .header("x-client", "before")
        .send()
        .await
        .unwrap();
    redis.restart();
    assert_eq!(
        redis
            .cli(&["SCRIPT", "EXISTS", &sha1_of_script()])
            .as_deref(),
        Some("0"),
        "the new server has no script"
    );
    let mut n = 0;
    wait_until(
        "decisions from the restarted Redis",
        Duration::from_secs(15),
        || {
            n += 1;
            let key = format!("after-{n}");
            let req = c.get(gw.url("/")).header("x-client", key.clone());
            let redis = &redis;
            async move {
                let ok = matches!(req.send().await, Ok(r) if r.status() == 200);
                ok && redis
                    .cli(&["EXISTS", &format!("tollgate:r:per-client:{{{key}}}")])
                    .as_deref()
                    == Some("1")
            }
        },
    )
    .await;
    assert_eq!(
        redis
            .cli(&["SCRIPT", "EXISTS", &sha1_of_script()])
            .as_deref(),
        Some("1"),
        "the script was loaded again"
    );
}

fn sha1_of_script() -> String {
    use fred::types::scripts::Script;
    Script::from_lua(tollgate::limiter::redis::TOKEN_BUCKET_LUA)
        .sha1()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_redis_leaks_nothing() {
    let mut redis = RedisProcess::standalone();
    let up = Upstream::start();
    let addr: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let gw = Gateway::start(&yaml(addr, "local"), up.addr).await;
    let pid = gw.child.id();
    // Warm up, then take the baseline.
    let warm = Load::start(&gw, 3, "warm");
    tokio::time::sleep(Duration::from_millis(500)).await;
    warm.finish().await;
    let (fds0, threads0, rss0) = proc_stats(pid);
    let tasks0 = gw
        .metric(r#"tollgate_runtime_alive_tasks{runtime="proxy"}"#)
        .await
        .unwrap_or(0.0);

    let load = Load::start(&gw, 3, "flap");
    for _ in 0..6 {
        redis.kill();
        tokio::time::sleep(Duration::from_millis(250)).await;
        redis.restart();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_breaker(&gw, 0.0, "the breaker to settle closed").await;
    let results = load.finish().await;
    assert_available(&results);
    assert!(gw.child.id() == pid && std::fs::metadata(format!("/proc/{pid}")).is_ok());

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (fds1, threads1, rss1) = proc_stats(pid);
    assert!(fds1 <= fds0 + 8, "fds {fds0} -> {fds1}");
    assert!(threads1 <= threads0 + 2, "threads {threads0} -> {threads1}");
    assert!(rss1 < rss0 + 50 * 1024, "rss {rss0} kB -> {rss1} kB");
    let tasks1 = gw
        .metric(r#"tollgate_runtime_alive_tasks{runtime="proxy"}"#)
        .await
        .unwrap_or(0.0);
    assert!(tasks1 <= tasks0 + 8.0, "proxy tasks {tasks0} -> {tasks1}");
    let store_tasks = gw
        .metric(r#"tollgate_runtime_alive_tasks{runtime="store"}"#)
        .await
        .unwrap_or(0.0);
    assert!(store_tasks <= 12.0, "store runtime tasks: {store_tasks}");
    let clients: usize = redis
        .cli(&["CLIENT", "LIST"])
        .unwrap()
        .lines()
        .filter(|l| !l.contains("cmd=client"))
        .count();
    // One connection of the store's own, plus one per proxy thread (one per core here).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(
        clients <= threads + 1,
        "connections from the gateway to Redis: {clients} (threads: {threads})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_fallbacks() {
    let mut redis = RedisProcess::standalone();
    let up = Upstream::start();
    let addr: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let allow = Gateway::start(&yaml(addr, "allow"), up.addr).await;
    let deny = Gateway::start(&yaml(addr, "deny"), up.addr).await;
    redis.kill();
    let c = client();
    for _ in 0..8 {
        let r = c
            .get(allow.url("/"))
            .header("x-client", "a")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "fallback allow fails open");
        assert!(r.headers().get("ratelimit").is_none());
        let r = c
            .get(deny.url("/"))
            .header("x-client", "d")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "fallback deny refuses");
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1);
    }
    assert_eq!(counter(&allow, "fallback_allowed").await, 8.0);
    assert_eq!(counter(&deny, "fallback_limited").await, 8.0);
    // Readiness: `allow` keeps the gateway ready (degraded); `deny` does not.
    let ready = |gw: &Gateway| {
        let url = gw.admin_url("/ready");
        async move {
            let r = reqwest::get(url).await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (status, body) = ready(&allow).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("degraded")));
    wait_until(
        "deny gateway to notice Redis is gone",
        Duration::from_secs(5),
        || {
            let url = deny.admin_url("/ready");
            async move { matches!(reqwest::get(url).await, Ok(r) if r.status() == 503) }
        },
    )
    .await;
    let (_, body) = ready(&deny).await;
    assert!(
        body["reason"].as_str().unwrap().contains("not answering"),
        "{body}"
    );
}

/// A reply delayed in transit past the default `timeout_ms` (20): Redis charged the request,
/// the gateway had answered it from the fallback. The charge is refunded and counted in
/// `tollgate_redis_late_refunds_total`, and another instance on the same Redis (not behind the
/// delay) then finds the bucket whole: exactly the burst, not the burst minus the late ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_replies_are_refunded_and_counted() {
    let (_redis, relay, _up, slow, direct) = slow_and_direct("1/h", 5).await;
    relay.set_reply_delay(60);
    let c = client();
    for _ in 0..3 {
        let s = c
            .get(slow.url("/"))
            .header("x-client", "late")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s, 200);
    }
    relay.set_reply_delay(0);
    let late = || async {
        slow.metric("tollgate_redis_late_refunds_total")
            .await
            .unwrap_or(0.0)
    };
    // Each of the 3 was charged and refunded late, or (both of a lane's two calls in flight
    // still waiting for their delayed replies) never sent before its deadline: never charged.
    let waited = Instant::now();
    while late().await < 1.0 && waited.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted = late().await;
    assert!(
        (1.0..=3.0).contains(&counted),
        "{counted} late refunds counted"
    );
    assert_eq!(
        direct
            .metric("tollgate_redis_late_refunds_total")
            .await
            .unwrap_or(-1.0),
        0.0
    );
    // The refunds land (their own replies come through the relay too): the bucket is whole.
    let waited = Instant::now();
    loop {
        let peek: serde_json::Value = c
            .get(direct.admin_url("/v1/limits/r/per-client?key=late"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if peek["tokens"] == 5 {
            break;
        }
        assert!(waited.elapsed() < Duration::from_secs(5), "{peek}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut admitted = 0;
    for _ in 0..8 {
        let s = c
            .get(direct.url("/"))
            .header("x-client", "late")
            .send()
            .await
            .unwrap()
            .status();
        if s == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "the bucket is whole again after the refunds");
}

/// A late refund gives back only what its charge still holds (hostile review). L, through a
/// gateway whose replies come back 700 ms late, is charged at once (2/s, burst 1: its token
/// refills 500 ms later) but answered by the fallback. The bucket refills past L; another
/// instance admits B1; then L's reply lands and is refunded. Time had already paid L off: had
/// its token been given back, B2 (within 500 ms of B1) would pass too, two tokens in 500 ms
/// where the limit allows one. Default `timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_refund_never_gives_back_a_token_time_already_returned() {
    let (_redis, relay, _up, slow, direct) = slow_and_direct("2/s", 1).await;
    let c = client();
    let send = |gw: &Gateway| c.get(gw.url("/")).header("x-client", "paid").send();
    relay.set_reply_delay(700);
    // L: answered by the fallback (200), charged in Redis.
    assert_eq!(send(&slow).await.unwrap().status(), 200);
    let full = || async {
        let peek: serde_json::Value = c
            .get(direct.admin_url("/v1/limits/r/per-client?key=paid"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        peek["tokens"] == 1
    };
    // L's charge seen in Redis, then paid off by time.
    let waited = Instant::now();
    while full().await {
        assert!(waited.elapsed() < Duration::from_secs(2), "L never charged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while !full().await {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(send(&direct).await.unwrap().status(), 200, "B1");
    let late = || async {
        slow.metric("tollgate_redis_late_refunds_total")
            .await
            .unwrap_or(0.0)
    };
    while late().await < 1.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "L's reply never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The refund call goes out right after the count: let it land.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        send(&direct).await.unwrap().status(),
        429,
        "B2 within 500 ms of B1: L's paid-off token was given back"
    );
}

/// Redis, a relay in front of it, an upstream, and two gateways with one limit per
/// `x-client` (`rate`, `burst`, default `timeout_ms`): `slow` through the relay, `direct` not.
async fn slow_and_direct(
    rate: &str,
    burst: u32,
) -> (RedisProcess, Relay, Upstream, Gateway, Gateway) {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let relay = Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let yaml = |redis: SocketAddr| {
        format!(
            r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
store: {{ kind: redis, redis: {{ urls: ["redis://{redis}"] }} }}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
  - {{ name: r, upstream: app, limits: [ {{ name: per-client, key: ["header:x-client"], rate: "{rate}", burst: {burst} }} ] }}
"#
        )
    };
    let slow = Gateway::start(&yaml(relay.addr), up.addr).await;
    let direct = Gateway::start(
        &yaml(format!("127.0.0.1:{}", redis.port).parse().unwrap()),
        up.addr,
    )
    .await;
    (redis, relay, up, slow, direct)
}
