//! Runtime overrides through the real binary: the admin API (PUT/GET/DELETE/list, pagination,
//! 400/401/404), precedence (runtime, YAML, limit), `unlimited` and `block`, exact counting
//! after a raise under concurrency, and with Redis: a change on one instance reaching another
//! within the bound (measured), surviving a gateway restart, and a write that bypassed the
//! version counter picked up by the periodic resync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::RedisProcess;
use common::{client, client_from, header, Gateway, Upstream};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "s3cret";

fn yaml(store: &str) -> String {
    format!(
        r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}", token: "{TOKEN}" }}
store: {store}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
  - name: api
    match: {{ path_prefix: "/api" }}
    upstream: app
    limits:
      - {{ name: per-user, key: ["header:x-user"], rate: "1/h", burst: 2, on_missing_key: skip,
          overrides: {{ gold: {{ burst: 5 }} }} }}
      - {{ name: per-ip, key: ["ip"], rate: "1/h", burst: 1000 }}
  - name: other
    match: {{ path_prefix: "/other" }}
    upstream: app
    limits:
      - {{ name: per-user, key: ["header:x-user"], rate: "1/h", burst: 2, cost: 2 }}
"#
    )
}

fn memory() -> String {
    yaml("{ kind: memory }")
}

/// Default Redis settings (timeout_ms 20) on a test-owned server.
fn redis_yaml(url: &str) -> String {
    yaml(&format!(
        r#"{{ kind: redis, redis: {{ mode: standalone, urls: ["{url}"] }} }}"#
    ))
}

async fn call(
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = client().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn put(gw: &Gateway, path: &str, body: Value) -> (StatusCode, Value) {
    call(
        reqwest::Method::PUT,
        gw.admin_url(path),
        Some(body),
        Some(TOKEN),
    )
    .await
}

async fn get(gw: &Gateway, path: &str) -> (StatusCode, Value) {
    call(reqwest::Method::GET, gw.admin_url(path), None, Some(TOKEN)).await
}

async fn delete(gw: &Gateway, path: &str) -> (StatusCode, Value) {
    call(
        reqwest::Method::DELETE,
        gw.admin_url(path),
        None,
        Some(TOKEN),
    )
    .await
}

async fn user(gw: &Gateway, path: &str, user: &str) -> reqwest::Response {
    client()
        .get(gw.url(path))
        .header("x-user", user)
        .send()
        .await
        .unwrap()
}

async fn admitted(gw: &Gateway, who: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        match user(gw, "/api/x", who).await.status().as_u16() {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_with_auth_and_every_refusal() {
    let up = Upstream::start();
    let gw = Gateway::start(&memory(), up.addr).await;
    let one = "/v1/overrides/api/per-user?key=alice";

    // Mutations need the token, and so do override reads (they list singled-out keys, and
    // an entry's `by` holds nothing derived from the token).
    for path in [
        "/v1/overrides",
        "//v1/overrides/api",
        "/v1/%6Fverrides/api/per-user",
        one,
    ] {
        let (s, _) = call(reqwest::Method::GET, gw.admin_url(path), None, None).await;
        assert_eq!(s, 401, "GET {path} without the token");
    }
    let body = json!({"rate": "10/m", "burst": 7});
    let (s, _) = call(
        reqwest::Method::PUT,
        gw.admin_url(one),
        Some(body.clone()),
        None,
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = call(
        reqwest::Method::PUT,
        gw.admin_url(one),
        Some(body.clone()),
        Some("nope"),
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = call(reqwest::Method::DELETE, gw.admin_url(one), None, None).await;
    assert_eq!(s, 401);

    // Unknown route or limit: 404 naming which.
    let (s, b) = put(&gw, "/v1/overrides/nope/per-user?key=a", body.clone()).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_route"))
    );
    let (s, b) = put(&gw, "/v1/overrides/api/nope?key=a", body.clone()).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_limit"))
    );
    let (s, b) = get(&gw, "/v1/overrides/api/nope?key=a").await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_limit"))
    );

    // Bad bodies: 400 naming the field.
    for (bad, field) in [
        (json!({"rate": "ten/s", "burst": 1}), "rate"),
        (json!({"rate": 10, "burst": 1}), "rate"),
        (json!({"rate": "2000000/s"}), "rate"),
        (json!({"rate": "1/s", "burst": 0}), "burst"),
        (json!({"rate": "1/s", "burst": -1}), "burst"),
        (json!({"rate": "1/d", "burst": 1000}), "burst"),
        (json!({"rate": "1/s", "brust": 3}), "brust"),
        (json!({"unlimited": true, "block": true}), "block"),
        (json!({"rate": "1/s", "unlimited": true}), "unlimited"),
        (json!({"unlimited": false}), "unlimited"),
        (json!({"block": "yes"}), "block"),
        (json!({}), ""),
        (json!([1]), ""),
    ] {
        let (s, b) = put(&gw, one, bad.clone()).await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert_eq!(b["field"], field, "{bad}: {b}");
        assert!(!b["message"].as_str().unwrap().is_empty());
    }
    let (s, b) = call(reqwest::Method::PUT, gw.admin_url(one), None, Some(TOKEN)).await;
    assert_eq!(s, 400, "{b}");
    // A burst below the limit's fixed cost would let nothing through.
    let (s, b) = put(
        &gw,
        "/v1/overrides/other/per-user?key=a",
        json!({"burst": 1}),
    )
    .await;
    assert_eq!(
        (s, &b["field"]),
        (StatusCode::BAD_REQUEST, &json!("burst")),
        "{b}"
    );
    assert!(b["message"].as_str().unwrap().contains("cost 2"), "{b}");
    // The key must name one value per key part.
    let (s, b) = put(&gw, "/v1/overrides/api/per-user", body.clone()).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_key"))
    );
    let (s, b) = put(&gw, "/v1/overrides/api/per-user?key=a&key=b", body.clone()).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_key"))
    );
    assert_eq!(gw.metric("tollgate_overrides ").await, Some(0.0));

    // Set, read, replace, delete.
    let (s, b) = get(&gw, one).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_override"))
    );
    let (s, b) = put(&gw, one, body.clone()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["before"], Value::Null);
    assert_eq!(b["override"]["rate"], "10/m");
    assert_eq!(b["override"]["burst"], 7);
    let (s, b) = get(&gw, one).await;
    assert_eq!(s, 200);
    assert_eq!(
        (&b["route"], &b["limit"], &b["key"], &b["rate"], &b["burst"]),
        (
            &json!("api"),
            &json!("per-user"),
            &json!("alice"),
            &json!("10/m"),
            &json!(7)
        )
    );
    assert!(b["by"].as_str().unwrap().starts_with("token@"));
    assert!(b["at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let (_, lim) = get(&gw, "/v1/limits/api/per-user?key=alice").await;
    assert_eq!(lim["source"], "runtime_override");
    assert_eq!(lim["capacity"], 7);
    assert_eq!(lim["rate"], "10/m");
    let (s, b) = put(&gw, one, json!({"burst": 3})).await;
    assert_eq!(s, 200);
    assert_eq!(b["before"], json!({"rate": "10/m", "burst": 7}));
    assert_eq!(
        b["override"]["rate"], "1/h",
        "burst alone keeps the limit's rate, as in YAML"
    );
    assert_eq!(gw.metric("tollgate_overrides ").await, Some(1.0));
    let (s, b) = delete(&gw, one).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["deleted"], true);
    assert_eq!(b["source"], "limit");
    let (s, _) = get(&gw, one).await;
    assert_eq!(s, 404);
    let (s, b) = delete(&gw, one).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_override"))
    );
    let (_, lim) = get(&gw, "/v1/limits/api/per-user?key=alice").await;
    assert_eq!(lim["source"], "limit");
    assert_eq!(lim["capacity"], 2);

    // Counted, held, and audited (who, what, before/after; never the token itself).
    assert_eq!(
        gw.metric("tollgate_override_changes_total{action=\"set\"}")
            .await,
        Some(2.0)
    );
    assert_eq!(
        gw.metric("tollgate_override_changes_total{action=\"delete\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(gw.metric("tollgate_overrides ").await, Some(0.0));
    let log = gw.log();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("runtime override changed"))
        .collect();
    assert_eq!(audit.len(), 3, "{log}");
    assert!(audit[1].contains("who=token@"), "{}", audit[1]);
    assert!(audit[1].contains("set"), "{}", audit[1]);
    assert!(
        audit[1].contains("10/m") && audit[1].contains("\"burst\":3"),
        "{}",
        audit[1]
    );
    assert!(
        audit[2].contains("delete") && audit[2].contains("after=null"),
        "{}",
        audit[2]
    );
    assert!(!log.contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_normalised_like_requests_and_names_their_bucket() {
    let up = Upstream::start();
    let gw = Gateway::start(&memory(), up.addr).await;
    // An IPv4-mapped IPv6 address is the IPv4 address requests from it are keyed by.
    let (s, b) = put(
        &gw,
        "/v1/overrides/api/per-ip?key=%3A%3Affff%3A127.0.0.9",
        json!({"block": true}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["key"], "127.0.0.9");
    let from9 = client_from("127.0.0.9");
    let r = from9.get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let other = client_from("127.0.0.10");
    assert_eq!(
        other.get(gw.url("/api/x")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_paginates_in_order_and_filters_by_route_and_limit() {
    let up = Upstream::start();
    let gw = Gateway::start(&memory(), up.addr).await;
    for i in 0..23 {
        let (s, _) = put(
            &gw,
            &format!("/v1/overrides/api/per-user?key=u{i:02}"),
            json!({"burst": 10}),
        )
        .await;
        assert_eq!(s, 200);
    }
    for i in 0..3 {
        put(
            &gw,
            &format!("/v1/overrides/other/per-user?key=o{i}"),
            json!({"unlimited": true}),
        )
        .await;
    }
    // All 26, 10 to a page.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/overrides?limit=10&cursor={c}"),
            None => "/v1/overrides?limit=10".to_string(),
        };
        let (s, b) = get(&gw, &path).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["held"], 26);
        pages += 1;
        for o in b["overrides"].as_array().unwrap() {
            seen.push(format!(
                "{}/{}",
                o["route"].as_str().unwrap(),
                o["key"].as_str().unwrap()
            ));
        }
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<String> = (0..23).map(|i| format!("api/u{i:02}")).collect();
    expected.extend((0..3).map(|i| format!("other/o{i}")));
    assert_eq!(seen, expected, "every override once, in order");

    let (_, b) = get(&gw, "/v1/overrides/other").await;
    assert_eq!(b["overrides"].as_array().unwrap().len(), 3);
    assert_eq!(b["overrides"][0]["unlimited"], true);
    let (_, b) = get(&gw, "/v1/overrides/api/per-user?limit=5").await;
    assert_eq!(b["overrides"].as_array().unwrap().len(), 5);
    assert!(b["next_cursor"].is_string());
    let (_, b) = get(&gw, "/v1/overrides/api/per-ip").await;
    assert_eq!(b["overrides"], json!([]));
    assert_eq!(b["next_cursor"], Value::Null);
    for bad in ["limit=0", "limit=1001", "limit=x", "cursor=zz", "cursor=00"] {
        let (s, b) = get(&gw, &format!("/v1/overrides?{bad}")).await;
        assert_eq!(s, 400, "{bad}: {b}");
    }
    let (s, _) = call(
        reqwest::Method::POST,
        gw.admin_url("/v1/overrides"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_override_beats_yaml_override_beats_the_limit() {
    let up = Upstream::start();
    let gw = Gateway::start(&memory(), up.addr).await;
    let source = |k: &'static str| {
        let gw = &gw;
        async move {
            get(gw, &format!("/v1/limits/api/per-user?key={k}")).await.1["source"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(source("silver").await, "limit");
    assert_eq!(source("gold").await, "yaml_override");
    let (_, check) = call(
        reqwest::Method::POST,
        gw.admin_url("/v1/check"),
        Some(
            json!({"route": "api", "key": {"header:x-user": "gold", "ip": "127.0.0.2"}, "cost": 0}),
        ),
        Some(TOKEN),
    )
    .await;
    assert_eq!(check["limits"][0]["source"], "yaml_override", "{check}");
    assert_eq!(check["limits"][1]["source"], "limit", "{check}");
    assert_eq!(admitted(&gw, "silver", 4).await, 2);
    assert_eq!(admitted(&gw, "gold", 7).await, 5);

    // A runtime override of the YAML-overridden key wins; the bucket starts full under it.
    put(
        &gw,
        "/v1/overrides/api/per-user?key=gold",
        json!({"burst": 3}),
    )
    .await;
    assert_eq!(source("gold").await, "runtime_override");
    assert_eq!(admitted(&gw, "gold", 6).await, 3);
    // Deleting it falls back to the YAML override (bucket full again).
    delete(&gw, "/v1/overrides/api/per-user?key=gold").await;
    assert_eq!(source("gold").await, "yaml_override");
    assert_eq!(admitted(&gw, "gold", 7).await, 5);
    // Another route's limit of the same name is a different override.
    put(
        &gw,
        "/v1/overrides/other/per-user?key=silver",
        json!({"burst": 9}),
    )
    .await;
    assert_eq!(source("silver").await, "limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_skips_the_limit_and_block_always_denies_without_retry_after() {
    let up = Upstream::start();
    let gw = Gateway::start(&memory(), up.addr).await;
    put(
        &gw,
        "/v1/overrides/api/per-user?key=vip",
        json!({"unlimited": true}),
    )
    .await;
    assert_eq!(admitted(&gw, "vip", 30).await, 30, "burst 2 does not apply");
    let (_, lim) = get(&gw, "/v1/limits/api/per-user?key=vip").await;
    assert_eq!(lim["source"], "runtime_override");
    assert_eq!(lim["unlimited"], true);
    // The other limits of the route still apply to it: per-ip counted all 30.
    let (_, ip) = get(&gw, "/v1/limits/api/per-ip?key=127.0.0.1").await;
    assert_eq!(ip["tokens"], 970);

    let hits = up.hits();
    put(
        &gw,
        "/v1/overrides/api/per-user?key=mallory",
        json!({"block": true}),
    )
    .await;
    for _ in 0..3 {
        let r = user(&gw, "/api/x", "mallory").await;
        assert_eq!(r.status(), 429);
        assert_eq!(header(&r, "retry-after"), "", "no wait lifts a block");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["violated-policies"], json!(["per-user"]));
        assert_eq!(body["retry_after_ms"], Value::Null);
        assert!(body["detail"].as_str().unwrap().contains("blocks this key"));
    }
    assert_eq!(
        up.hits(),
        hits,
        "a blocked request never reaches the upstream"
    );
    let (_, lim) = get(&gw, "/v1/limits/api/per-user?key=mallory").await;
    assert_eq!(lim["block"], true);
    // /v1/check agrees.
    let (_, check) = call(
        reqwest::Method::POST,
        gw.admin_url("/v1/check"),
        Some(json!({"route": "api", "key": {"header:x-user": "mallory", "ip": "127.0.0.1"}})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(check["allowed"], false);
    assert_eq!(check["retry_after_ms"], Value::Null);
    assert_eq!(
        check["limits"],
        json!([{"name": "per-user", "source": "runtime_override", "allowed": false, "block": true}]),
        "the blocked limit denies before any bucket is decided"
    );
    let (_, check) = call(
        reqwest::Method::POST,
        gw.admin_url("/v1/check"),
        Some(
            json!({"route": "api", "key": {"header:x-user": "vip", "ip": "127.0.0.1"}, "cost": 0}),
        ),
        Some(TOKEN),
    )
    .await;
    assert_eq!(check["allowed"], true);
    let limits = check["limits"].as_array().unwrap();
    assert_eq!(limits.len(), 2, "{check}");
    assert_eq!(
        (&limits[0]["name"], &limits[0]["source"]),
        (&json!("per-ip"), &json!("limit"))
    );
    assert_eq!(
        limits[1],
        json!({"name": "per-user", "source": "runtime_override", "unlimited": true})
    );
    // Others are unaffected; lifting the block lets mallory in again.
    assert_eq!(admitted(&gw, "bob", 1).await, 1);
    delete(&gw, "/v1/overrides/api/per-user?key=mallory").await;
    assert_eq!(admitted(&gw, "mallory", 3).await, 2);
}

/// Sends `n` requests for `who` from `tasks` concurrent clients spread over `gateways`;
/// returns how many were admitted.
async fn concurrent(gateways: &[Arc<Gateway>], who: &str, n: usize, tasks: usize) -> usize {
    let ok = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut joins = Vec::new();
    for t in 0..tasks {
        let (ok, next) = (ok.clone(), next.clone());
        let gateways = gateways.to_vec();
        let who = who.to_string();
        joins.push(tokio::spawn(async move {
            let c = client();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let gw = &gateways[t % gateways.len()];
                let s = c
                    .get(gw.url("/api/x"))
                    .header("x-user", &who)
                    .send()
                    .await
                    .unwrap()
                    .status();
                match s.as_u16() {
                    200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    429 => {}
                    other => panic!("unexpected status {other}"),
                }
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    ok.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raising_a_limit_counts_exactly_under_concurrency_memory() {
    let up = Upstream::start();
    let gw = Arc::new(Gateway::start(&memory(), up.addr).await);
    assert_eq!(
        concurrent(std::slice::from_ref(&gw), "carol", 10, 4).await,
        2
    );
    put(
        &gw,
        "/v1/overrides/api/per-user?key=carol",
        json!({"rate": "1/h", "burst": 150}),
    )
    .await;
    assert_eq!(
        concurrent(std::slice::from_ref(&gw), "carol", 300, 24).await,
        150
    );
}

/// Polls `cond` every 5 ms; returns how long it took to hold (panics after 10 s).
async fn time_until<F, Fut>(what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !cond().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_a_change_on_one_instance_reaches_another_within_the_bound() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let yaml = redis_yaml(&redis.url());
    let a = Arc::new(Gateway::start(&yaml, up.addr).await);
    let b = Arc::new(Gateway::start(&yaml, up.addr).await);
    // Block and unblock on A five times; each time B enforces the change within 1 s.
    let mut worst = Duration::ZERO;
    let mut times = Vec::new();
    for round in 0..5 {
        let who = format!("p{round}");
        assert_eq!(user(&b, "/api/x", &who).await.status(), 200);
        let (s, body) = put(
            &a,
            &format!("/v1/overrides/api/per-user?key={who}"),
            json!({"block": true}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        // On A itself, at once.
        let r = user(&a, "/api/x", &who).await;
        assert_eq!(r.status(), 429);
        assert!(r.text().await.unwrap().contains("blocks this key"));
        // Told from the burst running out by the 429's detail.
        let took = time_until("B enforces the block", || {
            let (b, who) = (b.clone(), who.clone());
            async move {
                let r = user(&b, "/api/x", &who).await;
                r.status() == 429 && r.text().await.unwrap().contains("blocks this key")
            }
        })
        .await;
        times.push(took);
        worst = worst.max(took);
        delete(&a, &format!("/v1/overrides/api/per-user?key={who}")).await;
        // B denied while it had no block yet (burst 2) and may remember that: the delete
        // reset the bucket, and the moved version clears B's deny cache.
        let took = time_until("B lifts the block", || {
            let (b, who) = (b.clone(), who.clone());
            async move { user(&b, "/api/x", &who).await.status() == 200 }
        })
        .await;
        times.push(took);
        worst = worst.max(took);
    }
    eprintln!("propagation A -> B: {times:?}, worst {worst:?}");
    assert!(worst < Duration::from_secs(1), "worst {worst:?}");
    // The count of held overrides follows on B too.
    put(
        &a,
        "/v1/overrides/api/per-user?key=z",
        json!({"unlimited": true}),
    )
    .await;
    time_until("B's gauge", || {
        let b = b.clone();
        async move { b.metric("tollgate_overrides ").await == Some(1.0) }
    })
    .await;
    let (_, listed) = get(&b, "/v1/overrides").await;
    assert_eq!(listed["overrides"][0]["key"], "z");
}

/// Requests admitted by the store and by the local fallback, and store timeouts, summed over
/// `gateways`.
async fn decisions(gateways: &[Arc<Gateway>]) -> (usize, usize, usize) {
    let mut sum = (0, 0, 0);
    for gw in gateways {
        let m = |p: &'static str| {
            let gw = gw.clone();
            async move { gw.metric(p).await.unwrap_or(0.0) as usize }
        };
        sum.0 += m("tollgate_requests_total{decision=\"allowed\",route=\"api\"}").await;
        sum.1 += m("tollgate_requests_total{decision=\"fallback_allowed\",route=\"api\"}").await;
        sum.2 += m("tollgate_store_errors_total{kind=\"timeout\"}").await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_raising_a_limit_counts_exactly_across_two_instances() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let yaml = redis_yaml(&redis.url());
    let a = Arc::new(Gateway::start(&yaml, up.addr).await);
    let b = Arc::new(Gateway::start(&yaml, up.addr).await);
    let both = [a.clone(), b.clone()];
    // Spend the bucket (burst 2); counted by the store, not by statuses, which may include a
    // fallback decision when a call exceeds the default timeout_ms of 20.
    let mut sent = 0;
    while get(&a, "/v1/limits/api/per-user?key=dave").await.1["tokens"] != 0 {
        user(&a, "/api/x", "dave").await;
        sent += 1;
        assert!(sent < 100, "the bucket never empties");
    }
    put(
        &a,
        "/v1/overrides/api/per-user?key=dave",
        json!({"rate": "1/h", "burst": 150}),
    )
    .await;
    time_until("B applies the raise", || {
        let b = b.clone();
        async move { get(&b, "/v1/limits/api/per-user?key=dave").await.1["capacity"] == 150 }
    })
    .await;
    let before = decisions(&both).await;
    let ok = concurrent(&both, "dave", 300, 8).await;
    let during = decisions(&both).await;
    // With the default timeout_ms (20) on a small machine some decisions time out and go to
    // the breaker's local fallback (its own buckets; the breaker may open for a while). Then
    // drain what Redis has left, one request at a time.
    let mut drained = 0;
    let draining = Instant::now();
    loop {
        let tokens = get(&a, "/v1/limits/api/per-user?key=dave").await.1["tokens"].clone();
        if tokens == 0 {
            break;
        }
        assert!(
            draining.elapsed() < Duration::from_secs(10),
            "the bucket never empties: {tokens}"
        );
        if user(&a, "/api/x", "dave").await.status() == 200 {
            drained += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = decisions(&both).await;
    let (by_store, by_fallback, timeouts) =
        (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    eprintln!(
        "admitted {ok} of 300 concurrently ({} by Redis, {} by the local fallback, {} store timeouts at the default timeout_ms 20); {drained} more to drain; {by_store} admitted by Redis in all",
        during.0 - before.0,
        during.1 - before.1,
        during.2 - before.2,
    );
    assert_eq!(ok + drained, by_store + by_fallback);
    // Redis admits exactly the new burst: every token, never one more (a decision that timed
    // out may have been charged and refunded too late to be reused: at most one per timeout).
    assert!(by_store <= 150, "{by_store}");
    assert!(by_store + timeouts >= 150, "{by_store} + {timeouts}");
    if timeouts == 0 {
        assert_eq!((ok, by_store), (150, 150));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_overrides_survive_a_restart_and_apply_from_the_first_request() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let yaml = redis_yaml(&redis.url());
    let a = Gateway::start(&yaml, up.addr).await;
    put(
        &a,
        "/v1/overrides/api/per-user?key=eve",
        json!({"block": true}),
    )
    .await;
    put(
        &a,
        "/v1/overrides/api/per-user?key=vip",
        json!({"burst": 4}),
    )
    .await;
    drop(a);
    // Traffic from the moment the proxy listener opens.
    let b = Gateway::start_hot(&yaml, up.addr).await;
    assert_eq!(user(&b, "/api/x", "eve").await.status(), 429);
    // (Counting requests here could mix Redis and the local fallback: right after start a
    // decision may exceed the default timeout_ms of 20. The policy in force is what matters.)
    let (_, lim) = get(&b, "/v1/limits/api/per-user?key=vip").await;
    assert_eq!(
        (&lim["source"], &lim["capacity"]),
        (&json!("runtime_override"), &json!(4))
    );
    assert!(b.log().contains("runtime overrides loaded from Redis"));
    let (_, listed) = get(&b, "/v1/overrides").await;
    assert_eq!(listed["held"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_write_that_missed_the_version_is_picked_up_by_the_resync() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let yaml = redis_yaml(&redis.url());
    let gw = Arc::new(Gateway::start(&yaml, up.addr).await);
    // Written behind the gateway's back, without bumping the version counter.
    redis
        .cli(&[
            "HSET",
            "tollgate:{overrides}:table",
            r#"["api","per-user","frank"]"#,
            r#"{"block":true,"by":"test","at_ms":1}"#,
        ])
        .unwrap();
    assert_eq!(user(&gw, "/api/x", "frank").await.status(), 200);
    // (Told from the burst running out by the 429's detail.)
    let took = time_until("the resync finds it", || {
        let gw = gw.clone();
        async move {
            let r = user(&gw, "/api/x", "frank").await;
            r.status() == 429 && r.text().await.unwrap().contains("blocks this key")
        }
    })
    .await;
    eprintln!("picked up by the resync after {took:?}");
    // 5 s resync + a 250 ms tick + a round trip, with room for a loaded machine.
    assert!(took < Duration::from_secs(6), "{took:?}");
    // It was not the version poll: nothing moved the version.
    assert!(took > Duration::from_millis(300), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_holds_the_table_in_one_slot_and_shares_it() {
    let cluster = common::redis::RedisCluster::start();
    let up = Upstream::start();
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let yaml = yaml(&format!(
        "{{ kind: redis, redis: {{ mode: cluster, urls: [{}] }} }}",
        urls.join(", ")
    ));
    let a = Arc::new(Gateway::start(&yaml, up.addr).await);
    let b = Arc::new(Gateway::start(&yaml, up.addr).await);
    for who in ["c1", "c2", "c3", "c4"] {
        let (s, body) = put(
            &a,
            &format!("/v1/overrides/api/per-user?key={who}"),
            json!({"block": true}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let took = time_until("B sees all four", || {
        let b = b.clone();
        async move { get(&b, "/v1/overrides").await.1["held"] == 4 }
    })
    .await;
    eprintln!("cluster: B held all four after {took:?}");
    assert!(took < Duration::from_secs(1));
    let r = user(&b, "/api/x", "c3").await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("blocks this key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_a_block_still_denies_and_unlimited_still_admits() {
    let mut redis = RedisProcess::standalone();
    let up = Upstream::start();
    let gw = Gateway::start(&redis_yaml(&redis.url()), up.addr).await;
    put(
        &gw,
        "/v1/overrides/api/per-user?key=gone",
        json!({"block": true}),
    )
    .await;
    put(
        &gw,
        "/v1/overrides/api/per-user?key=vip",
        json!({"unlimited": true}),
    )
    .await;
    redis.kill();
    for _ in 0..5 {
        let r = user(&gw, "/api/x", "gone").await;
        assert_eq!(r.status(), 429);
        assert_eq!(header(&r, "retry-after"), "");
        assert!(r.text().await.unwrap().contains("blocks this key"));
    }
    // per-user does not apply to vip; per-ip goes to the breaker's local fallback.
    assert_eq!(admitted(&gw, "vip", 4).await, 4);
    // The table held stays in force while Redis is away; writes fail with 503.
    let (s, b) = put(
        &gw,
        "/v1/overrides/api/per-user?key=x",
        json!({"block": true}),
    )
    .await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(get(&gw, "/v1/overrides").await.1["held"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_outliving_its_route_is_listed_and_can_be_deleted() {
    let up = Upstream::start();
    let gw = Gateway::start(&memory(), up.addr).await;
    put(
        &gw,
        "/v1/overrides/other/per-user?key=o1",
        json!({"burst": 9}),
    )
    .await;
    put(
        &gw,
        "/v1/overrides/api/per-user?key=kept",
        json!({"block": true}),
    )
    .await;
    // Reload without the route `other`.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let at = text.find("  - name: other").unwrap();
    std::fs::write(&gw.config_path, &text[..at]).unwrap();
    gw.signal("HUP");
    time_until("the reload", || async {
        get(&gw, "/ready").await.1["config_generation"] == 2
    })
    .await;
    // A reload keeps the runtime overrides.
    assert_eq!(user(&gw, "/api/x", "kept").await.status(), 429);
    let (_, listed) = get(&gw, "/v1/overrides").await;
    assert_eq!(listed["overrides"][1]["route"], "other");
    let (s, _) = get(&gw, "/v1/overrides/other/per-user?key=o1").await;
    assert_eq!(s, 404, "the route is gone");
    let (s, b) = delete(&gw, "/v1/overrides/other/per-user?key=o1").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["deleted"], true);
    assert_eq!(b["source"], Value::Null);
    let (s, b) = delete(&gw, "/v1/overrides/other/per-user?key=o1").await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_route"))
    );
    assert_eq!(get(&gw, "/v1/overrides").await.1["held"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_audit_names_the_peer() {
    let up = Upstream::start();
    let yaml = memory().replace(&format!(", token: \"{TOKEN}\""), "");
    let gw = Gateway::start(&yaml, up.addr).await;
    let (s, b) = call(
        reqwest::Method::PUT,
        gw.admin_url("/v1/overrides/api/per-user?key=pat"),
        Some(json!({"block": true})),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(
        b["override"]["by"]
            .as_str()
            .unwrap()
            .starts_with("peer:127.0.0.1:"),
        "{b}"
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("runtime override changed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("who=peer:127.0.0.1:"), "{line}");
    assert!(
        line.contains("before=null") && line.contains("block"),
        "{line}"
    );
    assert_eq!(
        gw.metric("tollgate_override_changes_total{action=\"block\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_at_most_ten_thousand_overrides_are_held() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let gw = Arc::new(Gateway::start(&redis_yaml(&redis.url()), up.addr).await);
    // 10,000 entries written straight into the hash, then the version moved.
    let fill = r#"for i = 1, 10000 do
  redis.call('HSET', KEYS[1], cjson.encode({'api', 'per-user', 'f' .. i}), '{"rate":"1/h","burst":3,"by":"t","at_ms":1}')
end
return redis.call('INCR', KEYS[2])"#;
    redis
        .cli(&[
            "EVAL",
            fill,
            "2",
            "tollgate:{overrides}:table",
            "tollgate:{overrides}:version",
        ])
        .unwrap();
    let took = time_until("all loaded", || {
        let gw = gw.clone();
        async move { gw.metric("tollgate_overrides ").await == Some(10_000.0) }
    })
    .await;
    eprintln!("10,000 overrides loaded within {took:?}");
    let (s, b) = put(
        &gw,
        "/v1/overrides/api/per-user?key=one-more",
        json!({"burst": 4}),
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::CONFLICT, Some("too_many_overrides"))
    );
    // Replacing one that is held is fine, and so is adding one after a delete.
    let (s, _) = put(
        &gw,
        "/v1/overrides/api/per-user?key=f7",
        json!({"burst": 4}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, lim) = get(&gw, "/v1/limits/api/per-user?key=f7").await;
    assert_eq!(lim["capacity"], 4);
    let (s, _) = delete(&gw, "/v1/overrides/api/per-user?key=f8").await;
    assert_eq!(s, 200);
    let (s, _) = put(
        &gw,
        "/v1/overrides/api/per-user?key=one-more",
        json!({"burst": 4}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, page) = get(&gw, "/v1/overrides?limit=1000").await;
    assert_eq!(page["overrides"].as_array().unwrap().len(), 1000);
    assert_eq!(page["held"], 10_000);
}

/// Lowering a limit keeps the bucket's state (an exhausted client stays exhausted, as every
/// instance reads the bucket); raising it starts the bucket full. Read through the admin peek,
/// which asks Redis (a decision could come from the local fallback on a loaded machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_keeps_the_bucket_and_raising_refills_it() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let a = Gateway::start(&redis_yaml(&redis.url()), up.addr).await;
    let b = Gateway::start(&redis_yaml(&redis.url()), up.addr).await;
    let peek = |gw: &Gateway| {
        let url = "/v1/limits/api/per-user?key=gold";
        let gw_url = gw.admin_url(url);
        async move {
            let (s, v) = call(reqwest::Method::GET, gw_url, None, Some(TOKEN)).await;
            assert_eq!(s, 200, "{v}");
            (
                v["tokens"].as_u64().unwrap(),
                v["capacity"].as_u64().unwrap(),
            )
        }
    };
    // gold has the YAML burst 5: use it all up.
    for _ in 0..20 {
        if peek(&a).await.0 == 0 {
            break;
        }
        user(&a, "/api/x", "gold").await;
    }
    assert_eq!(peek(&a).await, (0, 5));
    let (s, body) = put(
        &a,
        "/v1/overrides/api/per-user?key=gold",
        json!({"rate": "1/h", "burst": 3}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    // The bucket was not emptied: the script starts a bucket whose policy changed full under
    // the new one, so the exhausted key gets at most the new burst, never the old one again.
    let (tokens, capacity) = peek(&a).await;
    assert!(tokens <= 3 && capacity == 3, "{tokens}/{capacity}");
    common::wait_until("B reads the override", Duration::from_secs(2), || async {
        peek(&b).await.1 == 3
    })
    .await;
    let mut more = 0;
    for gw in [&a, &b, &a, &b, &a, &b] {
        if user(gw, "/api/x", "gold").await.status() == 200 {
            more += 1;
        }
    }
    assert!(more <= 3, "{more} admitted after lowering to burst 3");
    // Raising starts the bucket full under the new policy.
    let (s, body) = put(
        &a,
        "/v1/overrides/api/per-user?key=gold",
        json!({"rate": "1/h", "burst": 8}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(peek(&a).await, (8, 8));
}

/// A write the store does not confirm is a 503 that says the change may have been made, with
/// an audit line saying so; reading it back tells which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_write_says_so_and_is_audited() {
    let redis = RedisProcess::standalone();
    let up = Upstream::start();
    let gw = Gateway::start(&redis_yaml(&redis.url()), up.addr).await;
    redis.signal("STOP");
    let (s, body) = put(
        &gw,
        "/v1/overrides/api/per-user?key=paused",
        json!({"block": true}),
    )
    .await;
    redis.signal("CONT");
    assert_eq!(s, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("may or may not have been made")),
        "{body}"
    );
    assert!(
        gw.log().contains("runtime override change not confirmed"),
        "{}",
        gw.log()
    );
    // Read back: whatever Redis holds, every instance converges on it.
    common::wait_until("read back", Duration::from_secs(10), || async {
        get(&gw, "/v1/overrides/api/per-user?key=paused").await.0 != 503
    })
    .await;
}
