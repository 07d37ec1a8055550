//! Gateway processes sharing real Redis servers: exact shared limits across instances (also
//! with skewed clocks), a real Cluster, Sentinel failover, and switching stores on reload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::{RedisCluster, RedisProcess, RedisSentinels};
use common::{client, header, wait_until, Gateway, Upstream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn redis_yaml(store: &str, routes: &str) -> String {
    format!(
        r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
store: {store}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
{routes}
"#
    )
}

fn standalone(url: &str) -> String {
    format!(r#"{{ kind: redis, redis: {{ mode: standalone, urls: ["{url}"], timeout_ms: 500 }} }}"#)
}

const PER_USER: &str = r#"  - { name: r, upstream: app, limits: [ { name: per-user, key: ["header:x-user"], rate: "1/h", burst: BURST } ] }"#;

fn per_user(burst: u32) -> String {
    PER_USER.replace("BURST", &burst.to_string())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_alternating_admit_exactly_the_burst() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let yaml = redis_yaml(&standalone(&redis.url()), &per_user(7));
    let a = Gateway::start(&yaml, up.addr).await;
    let b = Gateway::start(&yaml, up.addr).await;
    let mut admitted = 0;
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        match status(gw, "alice").await {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_across_two_instances_never_exceed_the_burst() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let yaml = redis_yaml(&standalone(&redis.url()), &per_user(60));
    let a = Arc::new(Gateway::start(&yaml, up.addr).await);
    let b = Arc::new(Gateway::start(&yaml, up.addr).await);
    let admitted = Arc::new(AtomicUsize::new(0));
    let denied = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (a, b) = (a.clone(), b.clone());
        let (admitted, denied) = (admitted.clone(), denied.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for i in 0..20 {
                let gw = if (t + i) % 2 == 0 { &a } else { &b };
                let s = c
                    .get(gw.url("/"))
                    .header("x-user", "hot")
                    .send()
                    .await
                    .unwrap()
                    .status();
                match s.as_u16() {
                    200 => admitted.fetch_add(1, Ordering::SeqCst),
                    429 => denied.fetch_add(1, Ordering::SeqCst),
                    other => panic!("unexpected status {other}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 60, "exactly the burst");
    assert_eq!(denied.load(Ordering::SeqCst), 16 * 20 - 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_gateway_clocks_do_not_matter() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let yaml = redis_yaml(&standalone(&redis.url()), &per_user(4));
    let a = Gateway::start(&yaml, up.addr).await;
    // Two hours ahead: with a gateway clock, every bucket would look refilled to it.
    let b = Gateway::start_with(&yaml, up.addr, &["faketime", "-f", "+2h"]).await;
    let mut admitted = 0;
    let mut dates = (None, None);
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let resp = client()
            .get(gw.url("/"))
            .header("x-user", "skew")
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            admitted += 1;
        } else {
            assert_eq!(resp.status(), 429);
            let date = header(&resp, "date");
            if i % 2 == 0 {
                dates.0 = Some(date);
            } else {
                dates.1 = Some(date);
            }
        }
    }
    assert_eq!(admitted, 4, "exactly the burst across both instances");
    // The skew is real: the gateways' own Date headers are two hours apart.
    let parse = |d: &Option<String>| {
        let d = d.as_deref().unwrap();
        // "Mon, 23 Nov 2026 06:40:22 GMT": hour field.
        d.split(' ').nth(4).unwrap()[..2].parse::<i32>().unwrap()
    };
    let diff = (parse(&dates.1) - parse(&dates.0)).rem_euclid(24);
    assert_eq!(diff, 2, "dates {:?}", dates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_limits_are_exact_and_cross_slot_denials_give_back() {
    let cluster = RedisCluster::start();
    let up = Upstream::start();
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let store = format!(
        "{{ kind: redis, redis: {{ mode: cluster, urls: [{}], timeout_ms: 500 }} }}",
        urls.join(", ")
    );
    let routes = r#"  - name: r
    upstream: app
    limits:
      - { name: a, key: ["header:x-a"], rate: "1/h", burst: 3 }
      - { name: b, key: ["header:x-b"], rate: "1/h", burst: 1 }"#;
    let gw = Gateway::start(&redis_yaml(&store, routes), up.addr).await;
    let send = |a: &str, b: &str| {
        let req = client().get(gw.url("/")).header("x-a", a).header("x-b", b);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Keys spread over all masters: each admits exactly its burst of 1 on b.
    for i in 0..24 {
        let b = format!("spread-{i}");
        assert_eq!(send(&format!("a-{i}"), &b).await, 200);
        assert_eq!(send(&format!("a-{i}"), &b).await, 429, "log: {}", gw.log());
    }
    let per_node = cluster.keys_per_node();
    assert!(per_node.iter().all(|&n| n > 0), "{per_node:?}");
    // a has 3, b1 has 1. A denial by b (another slot) must give a's token back.
    assert_eq!(send("A", "b1").await, 200);
    assert_eq!(send("A", "b1").await, 429);
    assert_eq!(send("A", "b1").await, 429);
    assert_eq!(send("A", "b2").await, 200);
    assert_eq!(send("A", "b3").await, 200);
    assert_eq!(send("A", "b4").await, 429, "a is spent: 3 admitted in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed() {
    let mut sentinels = RedisSentinels::start();
    let up = Upstream::start();
    let urls: Vec<String> = sentinels
        .sentinel_urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect();
    let store = format!(
        "{{ kind: redis, redis: {{ mode: sentinel, service_name: {}, urls: [{}], timeout_ms: 200 }} }}",
        sentinels.service,
        urls.join(", ")
    );
    let gw = Gateway::start(&redis_yaml(&store, &per_user(3)), up.addr).await;
    let admitted = |user: String| {
        let gw = &gw;
        async move {
            let mut n = 0;
            for _ in 0..5 {
                if status(gw, &user).await == 200 {
                    n += 1;
                }
            }
            n
        }
    };
    assert_eq!(admitted("before".into()).await, 3);
    let old_master = sentinels.master.port;
    sentinels.master.kill();
    wait_until(
        "the sentinels to promote the replica",
        Duration::from_secs(30),
        || {
            let port = sentinels.current_master_port();
            async move { port.is_some_and(|p| p != old_master) }
        },
    )
    .await;
    assert_eq!(
        sentinels.current_master_port(),
        Some(sentinels.replica.port)
    );
    // The gateway reconnects through the sentinels; decisions come from Redis again when a
    // request's bucket shows up on the new master (meanwhile the local fallback decides).
    let mut probe = 0;
    let replica_port = sentinels.replica.port;
    wait_until(
        "decisions from the new master",
        Duration::from_secs(30),
        || {
            probe += 1;
            let user = format!("probe-{probe}");
            let req = client().get(gw.url("/")).header("x-user", user.clone());
            async move {
                let _ = req.send().await;
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", &replica_port.to_string(), "EXISTS"])
                    .arg(format!("tollgate:r:per-user:{{{user}}}"))
                    .output();
                matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "1")
            }
        },
    )
    .await;
    assert_eq!(
        admitted("after".into()).await,
        3,
        "limits hold on the new master"
    );
    assert!(sentinels
        .replica
        .cli(&["EXISTS", "tollgate:r:per-user:{after}"])
        .is_some_and(|v| v == "1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_store_without_failing_requests() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let memory_yaml = redis_yaml("{ kind: memory }", &per_user(1000));
    let gw = Arc::new(Gateway::start(&memory_yaml, up.addr).await);
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (gw, failures, sent, stop) = (gw.clone(), failures.clone(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                let r = c.get(gw.url("/")).header("x-user", "load").send().await;
                sent.fetch_add(1, Ordering::SeqCst);
                if !matches!(r, Ok(resp) if resp.status() == 200) {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Rewrite the file with the proxy/admin ports it already uses, now on Redis.
    let text = std::fs::read_to_string(&gw.config_path)
        .unwrap()
        .replace("{ kind: memory }", &standalone(&redis.url()));
    // The file watcher picks the change up.
    std::fs::write(&gw.config_path, text).unwrap();
    wait_until("buckets in Redis", Duration::from_secs(10), || {
        let exists = redis.cli(&["EXISTS", "tollgate:r:per-user:{load}"]);
        async move { exists.as_deref() == Some("1") }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert!(sent.load(Ordering::SeqCst) > 20);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no request failed during the switch"
    );
    assert_eq!(gw.metric("tollgate_config_generation").await, Some(2.0));
    let ready: serde_json::Value = reqwest::get(gw.admin_url("/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["store"], "redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_come_from_the_url() {
    let redis = RedisProcess::standalone();
    assert_eq!(
        redis
            .cli(&["ACL", "SETUSER", "gate", "on", ">s3cret", "~*", "&*", "+@all"])
            .as_deref(),
        Some("OK")
    );
    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "default", "off"]).as_deref(),
        Some("OK")
    );
    let up = Upstream::start();
    let url = format!("redis://gate:s3cret@127.0.0.1:{}", redis.port);
    let gw = Gateway::start(&redis_yaml(&standalone(&url), &per_user(2)), up.addr).await;
    let statuses = [
        status(&gw, "u").await,
        status(&gw, "u").await,
        status(&gw, "u").await,
    ];
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_speak_tls() {
    let (redis, ca) = RedisProcess::tls();
    let up = Upstream::start();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let ca = ca.to_string_lossy().into_owned();
    let gw = Gateway::start_full(
        &redis_yaml(&standalone(&url), &per_user(2)),
        up.addr,
        &[],
        &[("SSL_CERT_FILE", ca.as_str())],
    )
    .await;
    let statuses = [
        status(&gw, "t").await,
        status(&gw, "t").await,
        status(&gw, "t").await,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(
        redis.cli(&["EXISTS", "tollgate:r:per-user:{t}"]).as_deref(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_cached_until_the_bucket_could_admit() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let gw = Gateway::start(
        &redis_yaml(&standalone(&redis.url()), &per_user(2)),
        up.addr,
    )
    .await;
    assert_eq!(status(&gw, "flood").await, 200);
    assert_eq!(status(&gw, "flood").await, 200);
    let before = redis.evalsha_calls();
    let mut headers_ok = true;
    for _ in 0..40 {
        let r = client()
            .get(gw.url("/"))
            .header("x-user", "flood")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        headers_ok &= header(&r, "retry-after")
            .parse::<u64>()
            .is_ok_and(|s| s > 3000);
    }
    assert!(headers_ok, "cached denials keep their Retry-After");
    let calls = redis.evalsha_calls() - before;
    assert!(calls <= 2, "{calls} Redis calls for 40 denials");
    assert!(gw.metric("tollgate_deny_cache_hits_total").await.unwrap() >= 38.0);
    // An admin reset adds tokens early: the cached denial is dropped.
    let reset = client()
        .delete(gw.admin_url("/v1/limits/r/per-user?key=flood"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(status(&gw, "flood").await, 200);
    // Another user is unaffected by the cache.
    assert_eq!(status(&gw, "other").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_values_are_never_spliced_raw_into_redis_keys() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let gw = Gateway::start(
        &redis_yaml(&standalone(&redis.url()), &per_user(2)),
        up.addr,
    )
    .await;
    let long = "x".repeat(200);
    let values: [&[u8]; 4] = [
        b"alice",
        b"evil} {tollgate:other",
        long.as_bytes(),
        "caf\u{e9} au lait".as_bytes(),
    ];
    for v in values {
        let r = client()
            .get(gw.url("/"))
            .header(
                "x-user",
                reqwest::header::HeaderValue::from_bytes(v).unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let keys = redis.cli(&["KEYS", "*"]).unwrap();
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(keys.contains(&"tollgate:r:per-user:{alice}"));
    for key in &keys {
        let value = key
            .strip_prefix("tollgate:r:per-user:{")
            .and_then(|k| k.strip_suffix('}'))
            .unwrap_or_else(|| panic!("unexpected key layout: {key}"));
        let plain = value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"{}|#".contains(&b));
        let hashed = value.len() == 33
            && value.starts_with('#')
            && value[1..].bytes().all(|b| b.is_ascii_hexdigit());
        assert!(plain || hashed, "{key}");
    }
    assert_eq!(keys.iter().filter(|k| k.contains('#')).count(), 3);
}

/// `/v1/check` calls that arrive together are decided in shared script calls (through the
/// proxy threads' lanes), not one `EVALSHA` each, and exactly: every check Redis decided took
/// its token, as the bucket read back from Redis shows. Default `timeout_ms` (20); a batch
/// window of 2 ms, so that how many share a call does not hang on how fast Redis answers
/// (without lanes each check is one call whatever the window).
///
/// On a starved machine (CI runs this file's tests side by side on 2 cores) some decisions
/// miss the 20 ms and five misses open the breaker, after which checks are decided locally.
/// That is the designed behaviour, not what this test is about: a round where Redis decided
/// fewer than 3 in 4 is not counted for batching (its bucket must still be exact), the breaker
/// is let close, and the round is tried again, up to 20 rounds for 5 counted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admin_checks_share_script_calls() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let store = format!(
        r#"{{ kind: redis, redis: {{ mode: standalone, urls: ["{}"], batch_window_us: 2000 }} }}"#,
        redis.url()
    );
    let gw = Gateway::start(&redis_yaml(&store, &per_user(1000)), up.addr).await;
    let c = client();
    let check = |user: String| {
        let c = c.clone();
        let url = gw.admin_url("/v1/check");
        async move {
            let body: serde_json::Value = c
                .post(url)
                .json(&serde_json::json!({"route": "r", "key": {"header:x-user": user}}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body
        }
    };
    // Every connection open and warm.
    check("warm-up".into()).await;
    let mut by_redis = Vec::new();
    let (mut counted_rounds, mut counted_checks, mut counted_scripts) = (0, 0u64, 0u64);
    for round in 0..20 {
        if counted_rounds == 5 {
            break;
        }
        // The breaker closed (a lone check is Redis's) before the round starts.
        let probe = Instant::now();
        while check(format!("probe{round}")).await["decided_by"] != "redis" {
            assert!(
                probe.elapsed() < Duration::from_secs(10),
                "Redis never decided again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let user = format!("u{round}");
        let before = redis.evalsha_calls();
        let answers = futures::future::join_all((0..40).map(|_| check(user.clone()))).await;
        let scripts = redis.evalsha_calls() - before;
        let mut decided = 0u64;
        for a in &answers {
            assert_eq!(a["allowed"], true, "{a}");
            if a["decided_by"] == "redis" {
                decided += 1;
            }
        }
        if decided * 4 >= 40 * 3 {
            counted_rounds += 1;
            counted_checks += decided;
            counted_scripts += scripts;
        }
        by_redis.push((user, decided));
    }
    assert_eq!(
        counted_rounds, 5,
        "Redis decided 3 in 4 of 40 concurrent checks in only {counted_rounds} of 20 rounds: {by_redis:?}"
    );
    assert!(
        counted_scripts * 2 < counted_checks,
        "{counted_scripts} script calls for {counted_checks} concurrent checks decided by Redis: not batched"
    );
    // Exact, counted round or not: a check Redis decided took one token, and a charge that
    // came back after its decision had been given up is refunded (asynchronously, hence the
    // wait).
    for (user, n) in by_redis {
        let waited = Instant::now();
        loop {
            let peek: serde_json::Value = c
                .get(gw.admin_url(&format!("/v1/limits/r/per-user?key={user}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if peek["tokens"] == 1000 - n {
                break;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(3),
                "{user}: {n} decided by Redis, {peek}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The database number of the URL (`redis://HOST:PORT/3`) is where the buckets are kept, by
/// the lanes' own connections as by the store's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_comes_from_the_url() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let url = format!("redis://127.0.0.1:{}/3", redis.port);
    let gw = Gateway::start(&redis_yaml(&standalone(&url), &per_user(2)), up.addr).await;
    let statuses = [
        status(&gw, "d").await,
        status(&gw, "d").await,
        status(&gw, "d").await,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    let key = "tollgate:r:per-user:{d}";
    assert_eq!(redis.cli(&["-n", "3", "EXISTS", key]).as_deref(), Some("1"));
    assert_eq!(redis.cli(&["-n", "0", "EXISTS", key]).as_deref(), Some("0"));
}

/// A Redis store that never connected (its server refuses every `AUTH`), swapped away by a
/// reload: once the old store is closed, nothing keeps connecting to that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_swapped_away_stops_connecting() {
    let closer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closer.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for conn in closer.incoming() {
                accepted.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut conn) = conn {
                    use std::io::{Read, Write};
                    let mut buf = [0u8; 512];
                    let _ = conn.read(&mut buf);
                    let _ = conn.write_all(b"-WRONGPASS invalid username-password pair\r\n");
                }
            }
        });
    }
    let up = Upstream::start();
    let store = format!(
        r#"{{ kind: redis, redis: {{ mode: standalone, urls: ["redis://:nope@127.0.0.1:{port}"], startup_wait_ms: 300 }} }}"#
    );
    let gw = Gateway::spawn_now(&redis_yaml(&store, &per_user(5)), up.addr);
    wait_until("the gateway's admin", Duration::from_secs(20), || async {
        gw.metric("tollgate_config_generation ").await == Some(1.0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        accepted.load(Ordering::Relaxed) > 0,
        "nothing tried to connect"
    );
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, text.replace(&store, "{ kind: memory }")).unwrap();
    wait_until("the reload", Duration::from_secs(10), || async {
        gw.metric("tollgate_config_generation ").await == Some(2.0)
    })
    .await;
    // The old store is closed after its grace period (5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let then = accepted.load(Ordering::Relaxed);
    // Longer than the longest pause between attempts (2 s), twice over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = accepted.load(Ordering::Relaxed);
    assert_eq!(
        now,
        then,
        "connections to the swapped-away store's server went on:\n{}",
        gw.log()
    );
}

/// `redis://[::1]:PORT`: the lanes' own connections reach an IPv6 address (the brackets are
/// the URL's, not the host's), and decide from Redis, not the fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_redis_url_is_reached() {
    let redis = RedisProcess::standalone_dual_stack();
    let up = Upstream::start();
    let url = format!("redis://[::1]:{}", redis.port);
    let gw = Gateway::start(&redis_yaml(&standalone(&url), &per_user(2)), up.addr).await;
    let statuses = [
        status(&gw, "v6").await,
        status(&gw, "v6").await,
        status(&gw, "v6").await,
    ];
    assert_eq!(statuses, [200, 200, 429], "{}", gw.log());
    assert_eq!(
        redis
            .cli(&["EXISTS", "tollgate:r:per-user:{v6}"])
            .as_deref(),
        Some("1")
    );
    assert!(
        !gw.log().contains("lane connection to Redis failed"),
        "{}",
        gw.log()
    );
}

/// One connection killed under load costs the calls it had in flight, not a run of failures
/// that opens the breaker: a lane whose connection had been working opens a new one at once,
/// and the decisions that arrive meanwhile wait for it. Default `timeout_ms` (20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lane_connection_does_not_open_the_breaker() {
    kill_connections_under_load().await;
}

/// Through a TCP proxy that closes every connection at once (restarting) while 16 clients keep
/// sending with a 2 ms batch window: the calls in flight carry many decisions between them. A
/// failed call counts once toward `failure_threshold` (5), not once per decision it carried,
/// so losing the connections with 5 or more decisions in flight does not open the breaker.
/// Default `timeout_ms` (20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_counts_each_failed_call_once() {
    let redis = RedisProcess::standalone();
    let relay = common::Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let up = Upstream::start();
    let store = format!(
        r#"{{ kind: redis, redis: {{ mode: standalone, urls: ["redis://{}"], batch_window_us: 2000 }} }}"#,
        relay.addr
    );
    let gw = Gateway::start(&redis_yaml(&store, &per_user(2000)), up.addr).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..16)
        .map(|i| {
            let stop = stop.clone();
            let url = gw.url("/");
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    let _ = c.get(&url).header("x-user", format!("k{i}")).send().await;
                }
            })
        })
        .collect();
    let errors = |kind: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(&format!(r#"tollgate_store_errors_total{{kind="{kind}"}}"#))
                .await
                .unwrap_or(0.0)
        }
    };
    // Cut until one cut failed 5 decisions or more at once with no timeout meanwhile (a cut
    // can find few in flight; on a starved machine decisions also time out, and those count
    // one by one, as they should). Each cut after the connections have served a second (a
    // fresh one that breaks is retried with backoff) and the breaker is closed.
    let mut judged = None;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        wait_until("the breaker closed", Duration::from_secs(5), || async {
            gw.metric("tollgate_breaker_state").await == Some(0.0)
        })
        .await;
        let (failed, timeouts) = (errors("connection").await, errors("timeout").await);
        let opened = gw.log().matches("breaker opened").count();
        // Calls held 3 ms on their way to Redis: some are surely in flight at the cut.
        relay.set_request_delay(3);
        tokio::time::sleep(Duration::from_millis(50)).await;
        relay.cut();
        relay.set_request_delay(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let failed = errors("connection").await - failed;
        if errors("timeout").await > timeouts || failed < 5.0 {
            continue;
        }
        judged = Some((failed, gw.log().matches("breaker opened").count() - opened));
        break;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    let Some((failed, opened)) = judged else {
        panic!("no cut found 5 decisions in flight without a timeout");
    };
    assert_eq!(
        opened,
        0,
        "the breaker opened on one cut that failed {failed} decisions:\n{}",
        gw.log()
    );
}

async fn kill_connections_under_load() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let store = format!(
        r#"{{ kind: redis, redis: {{ mode: standalone, urls: ["{}"] }} }}"#,
        redis.url()
    );
    let gw = Gateway::start(&redis_yaml(&store, &per_user(2000)), up.addr).await;
    // Connections settled for longer than a second (a fresh one that breaks is retried later).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let stop = stop.clone();
            let sent = sent.clone();
            let url = gw.url("/");
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    let _ = c.get(&url).header("x-user", format!("k{i}")).send().await;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The store's own connection and one per lane (2 proxy threads).
    let killed = redis
        .cli(&["CLIENT", "KILL", "TYPE", "normal"])
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(killed >= 3, "{killed} connections killed");
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    assert!(sent.load(Ordering::Relaxed) > 50, "too little load");
    let log = gw.log();
    assert!(
        !log.contains("breaker opened"),
        "the breaker opened:\n{log}"
    );
}

/// A Redis that takes the connection but refuses the client (`maxclients` reached): a lane
/// counts its connection open only once Redis answers `PING`, so it backs off instead of
/// reconnecting and logging in a tight loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_is_retried_with_backoff() {
    let redis = RedisProcess::standalone();
    assert_eq!(
        redis.cli(&["CONFIG", "SET", "maxclients", "1"]).as_deref(),
        Some("OK")
    );
    let up = Upstream::start();
    let store = format!(
        r#"{{ kind: redis, redis: {{ mode: standalone, urls: ["{}"], startup_wait_ms: 300 }} }}"#,
        redis.url()
    );
    let gw = Gateway::spawn_now(&redis_yaml(&store, &per_user(5)), up.addr);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = gw.log();
    let churn = log.matches("lane connection to Redis open again").count()
        + log.matches("lane connection to Redis lost").count();
    assert!(churn <= 4, "{churn} reconnect lines in 4 s:\n{log}");
    // Decisions still get answers (the fallback's) meanwhile.
    let answered = client()
        .get(gw.url("/"))
        .header("x-user", "m")
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(answered, 200, "{log}");
}

/// A server that answers the connect handshake with a line that never ends (not Redis, or
/// broken): the lane gives up on it after a few KiB instead of reading megabytes, and retries
/// later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_reply_without_end_is_cut_short() {
    let flood = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = flood.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in flood.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                use std::io::Write;
                let chunk = vec![b'a'; 64 * 1024];
                let _ = conn.write_all(b"+");
                let until = std::time::Instant::now() + Duration::from_secs(3);
                while std::time::Instant::now() < until && conn.write_all(&chunk).is_ok() {}
            });
        }
    });
    let up = Upstream::start();
    let store = format!(
        r#"{{ kind: redis, redis: {{ mode: standalone, urls: ["redis://127.0.0.1:{port}"], startup_wait_ms: 300 }} }}"#
    );
    let gw = Gateway::spawn_now(&redis_yaml(&store, &per_user(5)), up.addr);
    wait_until(
        "the lane to give up on the handshake",
        Duration::from_secs(10),
        || async { gw.log().contains("no reply to PING within 4096 bytes") },
    )
    .await;
}
