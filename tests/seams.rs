//! Exactness at the seams, with the DEFAULT Redis budget (`timeout_ms: 20`): a freshly started
//! instance under concurrent load, a reload that switches the store, a reset or a flush that
//! another instance did not see, and a Redis stall that must not charge a request twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::{RedisCluster, RedisProcess};
use common::{client, wait_until, Gateway, Upstream};
use std::time::{Duration, Instant};

/// These tests measure decisions against a 20 ms budget: they run one at a time, so that the
/// gateways of one test do not starve another's of CPU on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Redis-store gateway with every default (timeout 20 ms, fallback local), one route whose
/// limit is keyed on `x-user`.
fn yaml(store: &str, fallback: &str, burst: u32) -> String {
    format!(
        r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
store: {store}
breaker: {{ fallback: {fallback} }}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
  - {{ name: r, upstream: app, limits: [ {{ name: per-user, key: ["header:x-user"], rate: "1/h", burst: {burst} }} ] }}
"#
    )
}

/// The `store` of a gateway on `cluster`, every other setting at its default.
fn cluster_store(cluster: &RedisCluster) -> String {
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "{{ kind: redis, redis: {{ mode: cluster, urls: [{}] }} }}",
        urls.join(", ")
    )
}

fn standalone(url: &str) -> String {
    format!(r#"{{ kind: redis, redis: {{ urls: ["{url}"] }} }}"#)
}

async fn status(gw: &Gateway, user: &str) -> u16 {
    client()
        .get(gw.url("/"))
        .header("x-user", user)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `n` requests for `user` at once; their statuses.
async fn burst_of(gw: &Gateway, user: &str, n: usize) -> Vec<u16> {
    let c = client();
    let calls = (0..n).map(|_| {
        let c = c.clone();
        let url = gw.url("/");
        let user = user.to_string();
        async move {
            c.get(url)
                .header("x-user", user)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    futures::future::join_all(calls).await
}

fn count(statuses: &[u16], code: u16) -> usize {
    statuses.iter().filter(|&&s| s == code).count()
}

async fn metric(gw: &Gateway, prefix: &str) -> f64 {
    gw.metric(prefix).await.unwrap_or(0.0)
}

/// Nothing was decided by a fallback, no store call timed out, and the breaker is closed.
async fn assert_decided_by_redis(gw: &Gateway) {
    if let Err(e) = decided_by_redis(gw).await {
        panic!("{e}");
    }
}

/// As [`assert_decided_by_redis`], as a result.
async fn decided_by_redis(gw: &Gateway) -> Result<(), String> {
    let fallback = metric(
        gw,
        r#"tollgate_requests_total{decision="fallback_allowed",route="r"}"#,
    )
    .await
        + metric(
            gw,
            r#"tollgate_requests_total{decision="fallback_limited",route="r"}"#,
        )
        .await;
    let timeouts = metric(gw, r#"tollgate_store_errors_total{kind="timeout"}"#).await;
    let breaker = metric(gw, "tollgate_breaker_state").await;
    if (fallback, timeouts, breaker) == (0.0, 0.0, 0.0) {
        return Ok(());
    }
    Err(format!(
        "(fallback decisions, store timeouts, breaker state) = {:?}; log:\n{}",
        (fallback, timeouts, breaker),
        gw.log()
    ))
}

/// Runs a fresh-start scenario up to three times (fresh Redis and gateways each time) and
/// passes on the first exact run. Before the fix every run failed the same way (each proxy
/// thread's first decision waited ~55 ms for its connection, past the 20 ms budget); a second
/// try only forgives one decision that missed 20 ms because 2 shared cores were busy.
async fn best_of_three<F, Fut>(mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut failures = Vec::new();
    for _ in 0..3 {
        match attempt().await {
            Ok(()) => return,
            Err(e) => failures.push(e),
        }
    }
    panic!("every attempt failed:\n{}", failures.join("\n---\n"));
}

fn check(ok: bool, what: String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_instance_under_concurrent_load_admits_exactly_what_redis_allows() {
    let _serial = SERIAL.lock().await;
    best_of_three(|| async {
        let redis = RedisProcess::standalone();
        let up = Upstream::start();
        let config = yaml(&standalone(&redis.url()), "local", 3);
        let a = Gateway::start(&config, up.addr).await;
        // alice drains her bucket through A.
        for expected in [200, 200, 200, 429] {
            assert_eq!(status(&a, "alice").await, expected);
        }
        // B starts fresh and at once takes concurrent traffic: none of it may be decided by
        // the fallback (which would hand alice a new burst), and bob gets exactly his burst.
        let b = Gateway::start_hot(&config, up.addr).await;
        let (alice, bob) = tokio::join!(burst_of(&b, "alice", 12), burst_of(&b, "bob", 12));
        check(
            count(&alice, 200) == 0,
            format!("alice through B: {alice:?}"),
        )?;
        check(count(&bob, 200) == 3, format!("bob through B: {bob:?}"))?;
        decided_by_redis(&b).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_instance_with_fallback_deny_never_refuses_with_503() {
    let _serial = SERIAL.lock().await;
    best_of_three(|| async {
        let redis = RedisProcess::standalone();
        let up = Upstream::start();
        let gw = Gateway::start_hot(&yaml(&standalone(&redis.url()), "deny", 100), up.addr).await;
        let statuses = burst_of(&gw, "carol", 16).await;
        check(count(&statuses, 200) == 16, format!("{statuses:?}"))?;
        decided_by_redis(&gw).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_cluster_instance_admits_exactly_the_burst() {
    let _serial = SERIAL.lock().await;
    best_of_three(|| async {
        let cluster = RedisCluster::start();
        let up = Upstream::start();
        let store = cluster_store(&cluster);
        let gw = Gateway::start_hot(&yaml(&store, "local", 5), up.addr).await;
        let statuses = burst_of(&gw, "dave", 12).await;
        check(count(&statuses, 200) == 5, format!("{statuses:?}"))?;
        decided_by_redis(&gw).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_switches_to_redis_connects_before_the_swap() {
    let _serial = SERIAL.lock().await;
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let memory = yaml("{ kind: memory }", "local", 4);
    let gw = Gateway::start(&memory, up.addr).await;
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let switched = text.replace("{ kind: memory }", &standalone(&redis.url()));
    std::fs::write(&gw.config_path, switched).unwrap();
    wait_until("the reload", Duration::from_secs(10), || async {
        metric(&gw, "tollgate_config_generation").await >= 2.0
    })
    .await;
    // The first decision after the swap is Redis's, not the fallback's.
    let check = client()
        .post(gw.admin_url("/v1/check"))
        .json(&serde_json::json!({"route": "r", "key": {"header:x-user": "erin"}}))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(check["decided_by"], "redis", "{check}");
    let statuses = burst_of(&gw, "frank", 12).await;
    assert_eq!(count(&statuses, 200), 4, "{statuses:?}");
    assert_decided_by_redis(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_at_start_up_starts_degraded_after_the_wait_and_says_so() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start();
    let dead = common::free_port();
    let store = format!(
        r#"{{ kind: redis, redis: {{ urls: ["redis://127.0.0.1:{dead}"], startup_wait_ms: 300 }} }}"#
    );
    let config = yaml(&store, "local", 2);
    let dir = tempfile::tempdir().unwrap();
    let proxy = format!("127.0.0.1:{}", common::free_port());
    let admin = format!("127.0.0.1:{}", common::free_port());
    let path = dir.path().join("gateway.yaml");
    std::fs::write(
        &path,
        config
            .replace("{PROXY}", &proxy)
            .replace("{ADMIN}", &admin)
            .replace("{UPSTREAM}", &up.addr.to_string()),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(&path)
        .stderr(log)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let ready_url = format!("http://{admin}/ready");
    let mut body = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(&ready_url).await {
            body = r.json().await.unwrap_or_default();
            if body["status"] == "degraded" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(body["store_connect"], "degraded", "{body}");
    // Degraded, the proxy serves, decided by the local fallback.
    wait_until("the proxy listener", Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(&proxy).await.is_ok()
    })
    .await;
    let r = client()
        .get(format!("http://{proxy}/"))
        .header("x-user", "gina")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(text.contains("start-up wait"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_the_start_up_wait_ends_the_wait() {
    let _serial = SERIAL.lock().await;
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let dead = common::free_port();
    let store = |url: &str| {
        format!(r#"{{ kind: redis, redis: {{ urls: ["{url}"], startup_wait_ms: 20000 }} }}"#)
    };
    let gw = Gateway::spawn_now(
        &yaml(&store(&format!("redis://127.0.0.1:{dead}")), "local", 2),
        up.addr,
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let fixed = text.replace(&format!("redis://127.0.0.1:{dead}"), &redis.url());
    std::fs::write(&gw.config_path, fixed).unwrap();
    // The reload connects the working store; start-up stops waiting for the dead one long
    // before its 20 s wait.
    let started = Instant::now();
    wait_until("the proxy listener", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(gw.proxy).await.is_ok()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let ready: serde_json::Value = reqwest::get(gw.admin_url("/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(status(&gw, "mia").await, 200);
}

/// Polls `user` through `gw` until a 200; how long it took.
async fn time_to_admit(gw: &Gateway, user: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if status(gw, user).await == 200 {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{user} still denied after {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_through_another_instance_or_a_flush_takes_effect_within_a_second() {
    let _serial = SERIAL.lock().await;
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let config = yaml(&standalone(&redis.url()), "local", 2);
    let a = Gateway::start(&config, up.addr).await;
    let b = Gateway::start(&config, up.addr).await;
    // Every proxy thread has decided through Redis at least once.
    for _ in 0..20 {
        status(&a, "warm-up").await;
    }
    for user in ["hank", "ivy"] {
        for expected in [200, 200, 429, 429] {
            assert_eq!(status(&a, user).await, expected);
        }
    }
    // hank is reset through B; A had his denial cached (retry in about an hour).
    let reset = client()
        .delete(b.admin_url("/v1/limits/r/per-user?key=hank"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    let took = time_to_admit(&a, "hank", Duration::from_secs(5)).await;
    assert!(
        took <= Duration::from_millis(1300),
        "A admitted hank after {took:?}"
    );
    // Redis loses everything (restart empty, FLUSHALL): ivy's bucket is full again.
    assert_eq!(redis.cli(&["FLUSHALL"]).as_deref(), Some("OK"));
    let took = time_to_admit(&a, "ivy", Duration::from_secs(5)).await;
    assert!(
        took <= Duration::from_millis(1300),
        "A admitted ivy after {took:?}"
    );
    // And a flood of one denied key still costs Redis almost nothing.
    // (Drained until Redis denies: on a starved machine a decision may miss its 20 ms and be
    // admitted by the local fallback instead, which is not what this part measures.)
    let mut drained = false;
    for _ in 0..20 {
        if status(&a, "jack").await == 429 {
            drained = true;
            break;
        }
    }
    assert!(drained);
    let before = redis.evalsha_calls();
    let statuses = burst_of(&a, "jack", 200).await;
    assert_eq!(count(&statuses, 429), 200);
    let calls = redis.evalsha_calls() - before;
    assert!(calls <= 10, "{calls} Redis calls for 200 denials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_fallback_answered_during_a_stall_is_not_charged_again_later() {
    let _serial = SERIAL.lock().await;
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let gw = Gateway::start(&yaml(&standalone(&redis.url()), "local", 5), up.addr).await;
    // Every proxy thread has decided through Redis at least once.
    for _ in 0..20 {
        status(&gw, "warm-up").await;
    }
    assert_eq!(status(&gw, "kim").await, 200);
    let fallback_before = metric(
        &gw,
        r#"tollgate_requests_total{decision="fallback_allowed",route="r"}"#,
    )
    .await;
    redis.signal("STOP");
    // Three requests during the stall: each waits its 20 ms, then the local fallback admits it.
    for _ in 0..3 {
        assert_eq!(status(&gw, "kim").await, 200);
    }
    redis.signal("CONT");
    // The three queued decisions reach Redis now, long after their deadline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peek = client()
        .get(gw.admin_url("/v1/limits/r/per-user?key=kim"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(
        peek["tokens"], 4,
        "only the request Redis decided is charged in Redis: {peek}"
    );
    assert_eq!(
        metric(
            &gw,
            r#"tollgate_requests_total{decision="fallback_allowed",route="r"}"#
        )
        .await
            - fallback_before,
        3.0
    );
}

/// Moves `slot` from the node that serves it to another, keys included, as a resharding does.
fn migrate_slot(cluster: &RedisCluster, slot: u16) {
    let slot = slot.to_string();
    let serves = |n: &RedisProcess| {
        n.cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot]).is_some()
            && n.cli(&["CLUSTER", "NODES"]).is_some_and(|nodes| {
                nodes
                    .lines()
                    .find(|l| l.contains("myself"))
                    .is_some_and(|me| {
                        me.split_whitespace().skip(8).any(|range| {
                            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                            let s: u16 = slot.parse().unwrap();
                            lo.parse::<u16>().is_ok_and(|lo| lo <= s)
                                && hi.parse::<u16>().is_ok_and(|hi| s <= hi)
                        })
                    })
            })
    };
    let src = cluster.nodes.iter().find(|n| serves(n)).expect("owner");
    let dst = cluster.nodes.iter().find(|n| n.port != src.port).unwrap();
    let id = |n: &RedisProcess| n.cli(&["CLUSTER", "MYID"]).unwrap();
    let (src_id, dst_id) = (id(src), id(dst));
    dst.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id])
        .unwrap();
    src.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id])
        .unwrap();
    // Requests meanwhile are redirected (ASK) while the slot is half moved.
    std::thread::sleep(Duration::from_millis(300));
    let keys = src
        .cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
        .unwrap();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        src.cli(&[
            "MIGRATE",
            "127.0.0.1",
            &dst.port.to_string(),
            key,
            "0",
            "5000",
        ])
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    for n in &cluster.nodes {
        n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id])
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_resharding_under_load_is_survived() {
    let _serial = SERIAL.lock().await;
    let cluster = std::sync::Arc::new(RedisCluster::start());
    let up = Upstream::start();
    let store = cluster_store(&cluster);
    let gw = Gateway::start(&yaml(&store, "local", 2000), up.addr).await;
    let load = async {
        for _ in 0..100 {
            burst_of(&gw, "lena", 4).await;
        }
    };
    let slot = {
        // The bucket's slot (its hash tag is the key value).
        let out = cluster.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", "tollgate:r:per-user:{lena}"])
            .unwrap();
        out.parse::<u16>().unwrap()
    };
    let moving = cluster.clone();
    let migrate = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::spawn_blocking(move || migrate_slot(&moving, slot))
            .await
            .unwrap();
    };
    tokio::join!(load, migrate);
    // Within a few seconds, decisions come from Redis again: the breaker closes and requests
    // are counted as decided by Redis, not the fallback.
    let allowed = r#"tollgate_requests_total{decision="allowed",route="r"}"#;
    let before = metric(&gw, allowed).await;
    wait_until(
        "Redis to decide again after the resharding",
        Duration::from_secs(15),
        || async {
            status(&gw, "lena").await;
            metric(&gw, allowed).await > before
                && metric(&gw, "tollgate_breaker_state").await == 0.0
        },
    )
    .await;
}
