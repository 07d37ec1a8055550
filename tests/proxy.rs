//! The gateway binary in front of a real loopback upstream: allowed and limited responses,
//! contract headers, per-key isolation, all-or-nothing, shadow mode, upstream failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{client, client_from, header, wait_until, Gateway, Upstream};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const HEAD: &str = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
upstreams:
  app: { targets: ["{UPSTREAM}"], connect_timeout_ms: 500, read_timeout_ms: 2000 }
"#;

async fn gateway(routes: &str, upstream: &Upstream) -> Gateway {
    Gateway::start(&format!("{HEAD}{routes}"), upstream.addr).await
}

#[tokio::test]
async fn allows_then_limits_with_contract_headers() {
    let up = Upstream::start();
    let gw = gateway(
        r#"
routes:
  - name: login
    match: { path_prefix: "/login" }
    upstream: app
    limits:
      - { name: per-ip, key: ["ip"], rate: "2/m", burst: 2 }
"#,
        &up,
    )
    .await;
    let c = client();
    let first = c.get(gw.url("/login")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit"), "2");
    assert_eq!(header(&first, "x-ratelimit-remaining"), "1");
    assert_eq!(header(&first, "x-ratelimit-reset"), "30");
    assert_eq!(header(&first, "ratelimit-policy"), r#""per-ip";q=2;w=60"#);
    assert_eq!(header(&first, "ratelimit"), r#""per-ip";r=1;t=30"#);
    let second = c.get(gw.url("/login")).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-ratelimit-remaining"), "0");
    assert_eq!(header(&second, "x-ratelimit-reset"), "60");

    let denied = c.get(gw.url("/login")).send().await.unwrap();
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "content-type"), "application/problem+json");
    assert_eq!(header(&denied, "retry-after"), "30");
    assert_eq!(header(&denied, "x-ratelimit-remaining"), "0");
    assert_eq!(header(&denied, "ratelimit"), r#""per-ip";r=0;t=30"#);
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["title"], "Too Many Requests");
    assert_eq!(body["status"], 429);
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["violated-policies"], serde_json::json!(["per-ip"]));
    assert_eq!(body["route"], "login");
    let retry_ms = body["retry_after_ms"].as_u64().unwrap();
    assert!((29_000..=30_000).contains(&retry_ms), "{retry_ms}");
    assert_eq!(
        up.hits(),
        2,
        "the denied request never reached the upstream"
    );

    assert_eq!(
        gw.metric(r#"tollgate_requests_total{decision="allowed",route="login"}"#)
            .await,
        Some(2.0)
    );
    assert_eq!(
        gw.metric(r#"tollgate_requests_total{decision="limited",route="login"}"#)
            .await,
        Some(1.0)
    );
}

/// Sends one request on an open connection and reads the whole response; returns the status.
fn raw_get(reader: &mut BufReader<TcpStream>, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    reader.get_mut().write_all(request.as_bytes()).unwrap();
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        assert!(!lower.starts_with("connection: close"), "connection closed");
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    status
}

#[tokio::test]
async fn a_429_keeps_the_connection_alive() {
    let up = Upstream::start();
    let gw = gateway(
        r#"
routes:
  - name: r
    upstream: app
    limits:
      - { name: one, key: ["ip"], rate: "1/m", burst: 1 }
"#,
        &up,
    )
    .await;
    let proxy = gw.proxy;
    let statuses = tokio::task::spawn_blocking(move || {
        let stream = TcpStream::connect(proxy).unwrap();
        let mut reader = BufReader::new(stream);
        (0..4)
            .map(|_| raw_get(&mut reader, "/x"))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(statuses, [200, 429, 429, 429]);
}

#[tokio::test]
async fn each_key_part_isolates_buckets() {
    let up = Upstream::start();
    let gw = gateway(
        r#"
routes:
  - { name: ip, match: { path: "/ip" }, upstream: app, limits: [ { name: l, key: ["ip"], rate: "1/m", burst: 1 } ] }
  - { name: header, match: { path: "/header" }, upstream: app, limits: [ { name: l, key: ["header:x-api-key"], rate: "1/m", burst: 1 } ] }
  - { name: query, match: { path: "/query" }, upstream: app, limits: [ { name: l, key: ["query:user"], rate: "1/m", burst: 1 } ] }
  - { name: path, match: { path_prefix: "/path/" }, upstream: app, limits: [ { name: l, key: ["path"], rate: "1/m", burst: 1 } ] }
  - { name: param, match: { path_regex: "^/users/(?P<id>[^/]+)/orders$" }, upstream: app, limits: [ { name: l, key: ["path_param:id"], rate: "1/m", burst: 1 } ] }
  - { name: method, match: { path: "/method" }, upstream: app, limits: [ { name: l, key: ["method"], rate: "1/m", burst: 1 } ] }
  - { name: host, match: { path: "/host" }, upstream: app, limits: [ { name: l, key: ["host"], rate: "1/m", burst: 1 } ] }
  - { name: composite, match: { path: "/composite" }, upstream: app, limits: [ { name: l, key: ["header:x-tenant", "ip"], rate: "1/m", burst: 1 } ] }
  - { name: alt, match: { path: "/alt" }, upstream: app, limits: [ { name: l, key: ["header:x-api-key|ip"], rate: "1/m", burst: 1 } ] }
  - { name: literal, match: { path: "/literal" }, upstream: app, limits: [ { name: l, key: ["literal:everyone"], rate: "1/m", burst: 1 } ] }
"#,
        &up,
    )
    .await;
    let one = client_from("127.0.0.1");
    let two = client_from("127.0.0.2");
    let get = |c: &reqwest::Client, path: &str| c.get(gw.url(path));

    // (name, request with value A, request with value B): A twice is limited, B is not.
    let cases: Vec<(&str, reqwest::RequestBuilder, reqwest::RequestBuilder)> = vec![
        ("ip", get(&one, "/ip"), get(&two, "/ip")),
        (
            "header",
            get(&one, "/header").header("x-api-key", "alice"),
            get(&one, "/header").header("x-api-key", "bob"),
        ),
        (
            "query",
            get(&one, "/query?user=alice"),
            get(&one, "/query?user=bob"),
        ),
        ("path", get(&one, "/path/a"), get(&one, "/path/b")),
        (
            "path_param",
            get(&one, "/users/1/orders"),
            get(&one, "/users/2/orders"),
        ),
        ("method", get(&one, "/method"), one.post(gw.url("/method"))),
        (
            "host",
            get(&one, "/host").header("host", "a.example"),
            get(&one, "/host").header("host", "b.example"),
        ),
        (
            "composite",
            get(&one, "/composite").header("x-tenant", "t1"),
            get(&two, "/composite").header("x-tenant", "t1"),
        ),
        (
            "alternatives",
            get(&one, "/alt").header("x-api-key", "k1"),
            get(&one, "/alt"),
        ),
    ];
    for (name, a, b) in cases {
        let a2 = a.try_clone().unwrap();
        assert_eq!(a.send().await.unwrap().status(), 200, "{name}: first A");
        assert_eq!(a2.send().await.unwrap().status(), 429, "{name}: second A");
        assert_eq!(
            b.send().await.unwrap().status(),
            200,
            "{name}: B has its own bucket"
        );
    }
    // A literal key is one bucket for everyone.
    assert_eq!(get(&one, "/literal").send().await.unwrap().status(), 200);
    assert_eq!(get(&two, "/literal").send().await.unwrap().status(), 429);
}

#[tokio::test]
async fn forwarded_for_is_trusted_only_from_trusted_proxies() {
    let up = Upstream::start();
    let gw = Gateway::start(
        r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
client_ip: { trusted_proxies: ["127.0.0.1/32"] }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - { name: r, upstream: app, limits: [ { name: per-ip, key: ["ip"], rate: "1/m", burst: 1 } ] }
"#,
        up.addr,
    )
    .await;
    let trusted = client_from("127.0.0.1");
    let untrusted = client_from("127.0.0.2");
    let status = |c: &reqwest::Client, xff: &str| {
        let req = c.get(gw.url("/")).header("x-forwarded-for", xff);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // From a trusted proxy the rightmost untrusted hop is the client.
    assert_eq!(status(&trusted, "9.9.9.9").await, 200);
    assert_eq!(status(&trusted, "9.9.9.9").await, 429);
    assert_eq!(status(&trusted, "8.8.8.8").await, 200);
    // A client cannot escape its bucket by prepending a fake hop: 8.8.8.8 is still rightmost.
    assert_eq!(status(&trusted, "1.2.3.4, 8.8.8.8").await, 429);
    // Trusted hops are skipped.
    assert_eq!(status(&trusted, "7.7.7.7, 127.0.0.1").await, 200);
    assert_eq!(status(&trusted, "7.7.7.7").await, 429);
    // From an untrusted peer the header is ignored: the peer address is the key.
    assert_eq!(status(&untrusted, "5.5.5.5").await, 200);
    assert_eq!(status(&untrusted, "6.6.6.6").await, 429);

    // The upstream sees the hop appended.
    let body: serde_json::Value = client()
        .get(gw.url("/"))
        .header("x-forwarded-for", "3.3.3.3")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["xff"], "3.3.3.3, 127.0.0.1");

    // A hop that is not UTF-8 is one unparsable hop: the client is the good hop to its right,
    // not the trusted proxy; the upstream gets the chain as received, the peer appended.
    let raw = |xff: &'static [u8]| {
        trusted
            .get(gw.url("/"))
            .header(
                "x-forwarded-for",
                reqwest::header::HeaderValue::from_bytes(xff).unwrap(),
            )
            .send()
    };
    let first = raw(b"\xff, 4.4.4.4").await.unwrap();
    assert_eq!(first.status(), 200);
    let body: serde_json::Value = first.json().await.unwrap();
    assert_eq!(body["xff"], "\u{fffd}, 4.4.4.4, 127.0.0.1");
    assert_eq!(
        raw(b"\xff, 4.4.4.4").await.unwrap().status(),
        429,
        "keyed on 4.4.4.4"
    );
    assert_eq!(
        trusted.get(gw.url("/")).send().await.unwrap().status(),
        200,
        "the proxy's own bucket was not charged"
    );
}

#[tokio::test]
async fn several_limits_are_all_or_nothing() {
    let up = Upstream::start();
    let gw = gateway(
        r#"
routes:
  - name: r
    upstream: app
    limits:
      - { name: global, key: ["literal:all"], rate: "3/m", burst: 3 }
      - { name: per-user, key: ["header:x-user"], rate: "1/m", burst: 1 }
"#,
        &up,
    )
    .await;
    let c = client();
    let as_user = |u: &str| c.get(gw.url("/")).header("x-user", u).send();
    assert_eq!(as_user("u1").await.unwrap().status(), 200);
    let denied = as_user("u1").await.unwrap();
    assert_eq!(denied.status(), 429);
    assert_eq!(
        header(&denied, "ratelimit-policy"),
        r#""global";q=3;w=60, "per-user";q=1;w=60"#
    );
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(body["violated-policies"], serde_json::json!(["per-user"]));
    // Had the denial charged `global`, u3 would be refused.
    assert_eq!(as_user("u2").await.unwrap().status(), 200);
    assert_eq!(as_user("u3").await.unwrap().status(), 200);
    let exhausted = as_user("u4").await.unwrap();
    assert_eq!(exhausted.status(), 429);
    let body: serde_json::Value = exhausted.json().await.unwrap();
    assert_eq!(body["violated-policies"], serde_json::json!(["global"]));
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn shadow_mode_counts_but_never_blocks() {
    let up = Upstream::start();
    let gw = gateway(
        r#"
routes:
  - name: shadowed
    upstream: app
    shadow: true
    limits:
      - { name: l, key: ["ip"], rate: "1/m", burst: 1 }
"#,
        &up,
    )
    .await;
    for _ in 0..5 {
        let resp = client().get(gw.url("/")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("ratelimit").is_none());
    }
    assert_eq!(up.hits(), 5);
    assert_eq!(
        gw.metric(r#"tollgate_requests_total{decision="shadow_limited",route="shadowed"}"#)
            .await,
        Some(4.0)
    );
}

#[tokio::test]
async fn overrides_missing_keys_and_cost() {
    let up = Upstream::start();
    let gw = gateway(
        r#"
routes:
  - name: keyed
    match: { path: "/keyed" }
    upstream: app
    limits:
      - name: per-key
        key: ["header:x-api-key"]
        rate: "1/m"
        burst: 1
        on_missing_key: deny
        overrides: { "premium": { burst: 3 } }
  - name: skip
    match: { path: "/skip" }
    upstream: app
    limits: [ { name: l, key: ["header:x-api-key"], rate: "1/m", burst: 1 } ]
  - name: anon
    match: { path: "/anon" }
    upstream: app
    limits: [ { name: l, key: ["header:x-api-key"], rate: "1/m", burst: 1, on_missing_key: anonymous } ]
  - name: cost
    match: { path: "/cost" }
    upstream: app
    limits: [ { name: l, key: ["ip"], rate: "5/m", burst: 5, cost_header: "X-Cost", cost_header_from: any } ]
"#,
        &up,
    )
    .await;
    let c = client();
    let st = |req: reqwest::RequestBuilder| async move { req.send().await.unwrap().status() };
    for _ in 0..3 {
        assert_eq!(
            st(c.get(gw.url("/keyed")).header("x-api-key", "premium")).await,
            200
        );
    }
    assert_eq!(
        st(c.get(gw.url("/keyed")).header("x-api-key", "premium")).await,
        429
    );
    assert_eq!(
        st(c.get(gw.url("/keyed")).header("x-api-key", "basic")).await,
        200
    );
    assert_eq!(
        st(c.get(gw.url("/keyed")).header("x-api-key", "basic")).await,
        429
    );
    let missing = c.get(gw.url("/keyed")).send().await.unwrap();
    assert_eq!(missing.status(), 429, "on_missing_key: deny");
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["violated-policies"], serde_json::json!(["per-key"]));

    for _ in 0..3 {
        assert_eq!(
            st(c.get(gw.url("/skip"))).await,
            200,
            "on_missing_key: skip"
        );
    }
    assert_eq!(st(c.get(gw.url("/anon"))).await, 200);
    assert_eq!(
        st(c.get(gw.url("/anon"))).await,
        429,
        "anonymous share a bucket"
    );

    let heavy = c
        .get(gw.url("/cost"))
        .header("x-cost", "4")
        .send()
        .await
        .unwrap();
    assert_eq!(heavy.status(), 200);
    assert_eq!(header(&heavy, "x-ratelimit-remaining"), "1");
    assert_eq!(st(c.get(gw.url("/cost")).header("x-cost", "2")).await, 429);
    assert_eq!(st(c.get(gw.url("/cost"))).await, 200, "default cost 1 fits");
}

#[tokio::test]
async fn no_route_unreachable_and_slow_upstreams() {
    let up = Upstream::start();
    let dead = common::free_port();
    let gw = Gateway::start(
        &format!(
            r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
upstreams:
  app: {{ targets: ["{{UPSTREAM}}"], read_timeout_ms: 300 }}
  dead: {{ targets: ["127.0.0.1:{dead}"], connect_timeout_ms: 300 }}
  mixed: {{ targets: ["127.0.0.1:{dead}", "{{UPSTREAM}}"] }}
routes:
  - {{ name: slow, match: {{ path: "/slow" }}, upstream: app }}
  - {{ name: dead, match: {{ path: "/dead" }}, upstream: dead }}
  - {{ name: mixed, match: {{ path: "/mixed" }}, upstream: mixed }}
  - {{ name: ok, match: {{ path: "/ok", methods: ["GET"] }}, upstream: app }}
"#
        ),
        up.addr,
    )
    .await;
    let c = client();
    let nf = c.get(gw.url("/nowhere")).send().await.unwrap();
    assert_eq!(nf.status(), 404);
    assert_eq!(header(&nf, "content-type"), "application/problem+json");
    assert_eq!(c.post(gw.url("/ok")).send().await.unwrap().status(), 404);
    assert_eq!(c.get(gw.url("/ok")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/dead")).send().await.unwrap().status(), 502);
    assert_eq!(
        c.get(gw.url("/slow?ms=3000"))
            .send()
            .await
            .unwrap()
            .status(),
        504
    );
    for _ in 0..4 {
        assert_eq!(
            c.get(gw.url("/mixed")).send().await.unwrap().status(),
            200,
            "a dead target is skipped for the next one"
        );
    }
    assert_eq!(
        gw.metric(r#"tollgate_requests_total{decision="no_route",route=""}"#)
            .await,
        Some(2.0)
    );
    assert!(
        gw.metric(r#"tollgate_upstream_responses_total{class="error",route="dead"}"#)
            .await
            >= Some(1.0)
    );
}

#[tokio::test]
async fn a_flood_of_distinct_keys_keeps_memory_bounded() {
    let up = Upstream::start();
    let gw = Gateway::start(
        r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
store: { kind: memory, memory: { max_buckets: 640 } }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - { name: r, upstream: app, limits: [ { name: l, key: ["header:x-k"], rate: "1/h", burst: 5 } ] }
"#,
        up.addr,
    )
    .await;
    let c = client();
    for i in 0..2000 {
        let resp = c
            .get(gw.url("/"))
            .header("x-k", format!("key-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let held = gw
        .metric(r#"tollgate_memory_buckets{state="held"}"#)
        .await
        .unwrap();
    assert!(held <= 640.0, "{held} buckets held, bound 640");
    assert!(held >= 320.0, "{held}: eviction should not wipe the store");
    assert!(
        gw.metric(r#"tollgate_memory_buckets{state="evicted_total"}"#)
            .await
            .unwrap()
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_bring_the_gateway_down() {
    let up = Upstream::start();
    let gw = Gateway::start(
        r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
client_ip: { trusted_proxies: ["127.0.0.1/32"] }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - name: users
    match: { path_regex: "^/users/(?P<id>[^/]+)/orders$" }
    upstream: app
    limits:
      - { name: per-user, key: ["path_param:id", "header:x-k|ip", "query:q"], rate: "10/s", cost_header: X-Cost, on_missing_key: anonymous }
  - { name: rest, upstream: app, limits: [ { name: l, key: ["host", "ip"], rate: "100/s" } ] }
"#,
        up.addr,
    )
    .await;
    let long_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-K: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let payloads: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n".to_vec(),
        b"GET /users/%ff%00%fe/orders?q=%zz%00 HTTP/1.1\r\nHost: a\r\nX-K: \x80\x81\r\n\r\n"
            .to_vec(),
        b"GET /users/x/orders HTTP/1.1\r\nHost: a\r\nX-Cost: 99999999999999999999999\r\n\r\n"
            .to_vec(),
        b"GET /users/x/orders HTTP/1.1\r\nHost: a\r\nX-Cost: -5\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: ::::, 999.1.1.1, \xff\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n".to_vec(),
        b"GET http://evil.example/ HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        long_header.into_bytes(),
        vec![0u8; 4096],
    ];
    let proxy = gw.proxy;
    tokio::task::spawn_blocking(move || {
        for payload in payloads {
            if let Ok(mut s) = TcpStream::connect(proxy) {
                let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(500)));
                let _ = s.write_all(&payload);
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        }
    })
    .await
    .unwrap();
    // Still serving, and the log has no panic.
    let ok = client()
        .get(gw.url("/users/7/orders?q=1"))
        .header("x-k", "fine")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        client()
            .get(gw.admin_url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let log = gw.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// Two limits on one route: `cheap` (burst 5, cost from `X-Cost`) and `tight` (burst 2), both
/// per ip. Run against the memory store and a real Redis (default settings).
fn arithmetic_routes(store: &str) -> String {
    format!(
        r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
{store}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
  - name: costly
    match: {{ path: "/costly" }}
    upstream: app
    limits:
      - {{ name: cheap, key: ["ip"], rate: "5/h", burst: 5, cost_header: X-Cost, cost_header_from: any }}
      - {{ name: roomy, key: ["ip"], rate: "1/h", burst: 100 }}
  - name: pair
    match: {{ path: "/pair" }}
    upstream: app
    limits:
      - {{ name: loose, key: ["ip"], rate: "10/m", burst: 10 }}
      - {{ name: tight, key: ["ip"], rate: "1/m", burst: 2 }}
  - {{ name: warm, match: {{ path: "/warm" }}, upstream: app, limits: [ {{ name: w, key: ["ip"], rate: "1000/s" }} ] }}
"#
    )
}

/// The token count the admin API reads for a limit of this test's client (127.0.0.1).
async fn tokens(gw: &Gateway, route: &str, limit: &str) -> u64 {
    let url = gw.admin_url(&format!("/v1/limits/{route}/{limit}?key=127.0.0.1"));
    let body: serde_json::Value = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tokens in {body}"))
}

/// The `r` and `t` of one limit in a `RateLimit` header value.
fn ietf_r_t(value: &str, limit: &str) -> (u64, u64) {
    let item = value
        .split(", ")
        .find(|i| i.starts_with(&format!("\"{limit}\";")))
        .unwrap_or_else(|| panic!("{limit} not in {value:?}"));
    let field = |name: &str| -> u64 {
        item.split(';')
            .find_map(|p| p.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {item:?}"))
    };
    (field("r="), field("t="))
}

async fn impossible_costs_and_real_remaining(
    gw: &Gateway,
    up: &Upstream,
    c: &reqwest::Client,
    hits_before: usize,
) {
    // Costs no bucket of burst 5 can ever hold: one past the burst, 1e15, u64::MAX.
    for cost in ["6", "1000000000000000", "18446744073709551615"] {
        let resp = c
            .get(gw.url("/costly"))
            .header("x-cost", cost)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429, "cost {cost}");
        assert!(
            resp.headers().get("retry-after").is_none(),
            "cost {cost}: no wait makes it fit, got Retry-After {:?}",
            resp.headers().get("retry-after")
        );
        let (r, _) = ietf_r_t(&header(&resp, "ratelimit"), "cheap");
        assert_eq!(r, 5, "cost {cost}: nothing was taken");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["violated-policies"], serde_json::json!(["cheap"]));
        assert!(
            body["retry_after_ms"].is_null(),
            "cost {cost}: retry_after_ms {}",
            body["retry_after_ms"]
        );
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("exceeds") && detail.contains("capacity") && detail.contains("cheap"),
            "cost {cost}: detail {detail:?}"
        );
    }
    // Nothing was charged by the impossible requests: the full burst still passes.
    let all = c
        .get(gw.url("/costly"))
        .header("x-cost", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(all.status(), 200);
    assert_eq!(tokens(gw, "costly", "roomy").await, 99);
    // Now a cost of 1 is possible but must wait: it gets a Retry-After again.
    let wait = c
        .get(gw.url("/costly"))
        .header("x-cost", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(wait.status(), 429);
    let retry: u64 = header(&wait, "retry-after").parse().unwrap();
    assert!((700..=720).contains(&retry), "one token of 5/h: {retry}");

    // Two limits, the tight one denies: the loose one reports what it really holds.
    for _ in 0..2 {
        assert_eq!(c.get(gw.url("/pair")).send().await.unwrap().status(), 200);
    }
    let denied = c.get(gw.url("/pair")).send().await.unwrap();
    assert_eq!(denied.status(), 429);
    let state = header(&denied, "ratelimit");
    let (loose_r, loose_t) = ietf_r_t(&state, "loose");
    let (tight_r, tight_t) = ietf_r_t(&state, "tight");
    assert_eq!(
        loose_r,
        tokens(gw, "pair", "loose").await,
        "r of the limit that admitted is its real remaining ({state})"
    );
    assert_eq!(loose_r, 8);
    assert_eq!(loose_t, 6, "next token of the uncharged bucket ({state})");
    assert_eq!(tight_r, 0);
    let retry: u64 = header(&denied, "retry-after").parse().unwrap();
    assert!(
        retry >= tight_t,
        "Retry-After {retry} earlier than t={tight_t}"
    );
    assert_eq!(
        up.hits() - hits_before,
        3,
        "denied requests never reached the upstream"
    );
}

#[tokio::test]
async fn impossible_costs_and_real_remaining_on_the_memory_store() {
    let up = Upstream::start();
    let gw = Gateway::start(&arithmetic_routes(""), up.addr).await;
    impossible_costs_and_real_remaining(&gw, &up, &client(), 0).await;
}

#[tokio::test]
async fn impossible_costs_and_real_remaining_on_redis() {
    let redis = common::redis::RedisProcess::standalone();
    let up = Upstream::start();
    let store = format!(
        r#"store: {{ kind: redis, redis: {{ mode: standalone, urls: ["{}"] }} }}"#,
        redis.url()
    );
    let gw = Gateway::start(&arithmetic_routes(&store), up.addr).await;
    // Each gateway thread opens its Redis connection on its first request; until this
    // client's thread has one, its decisions may come from the local fallback. Warm it up.
    let c = client();
    wait_until(
        "a Redis decision on this client's connection",
        Duration::from_secs(10),
        || async {
            c.get(gw.url("/warm")).send().await.unwrap();
            gw.metric(r#"tollgate_requests_total{decision="allowed",route="warm"}"#)
                .await
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    let warm = up.hits();
    impossible_costs_and_real_remaining(&gw, &up, &c, warm).await;
    // The Redis path went through the deny cache too: ask again, still no Retry-After.
    for _ in 0..3 {
        let resp = c
            .get(gw.url("/costly"))
            .header("x-cost", "1000000000000000")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        assert!(resp.headers().get("retry-after").is_none());
    }
    assert!(
        gw.metric("tollgate_deny_cache_hits_total").await >= Some(3.0),
        "the last requests were answered by the deny cache"
    );
    // Redis decided every request, unless some decision missed the default 20 ms (a starved
    // CI machine): then the fallback decided it, and after five such misses the breaker
    // sends the next ones there too.
    let mut by_fallback = 0.0;
    for route in ["costly", "pair"] {
        for decision in ["fallback_allowed", "fallback_limited"] {
            let key =
                format!(r#"tollgate_requests_total{{decision="{decision}",route="{route}"}}"#);
            by_fallback += gw.metric(&key).await.unwrap_or(0.0);
        }
    }
    let mut errors = 0.0;
    for kind in ["timeout", "connection", "script"] {
        errors += gw
            .metric(&format!(r#"tollgate_store_errors_total{{kind="{kind}"}}"#))
            .await
            .unwrap_or(0.0);
    }
    assert!(
        by_fallback == 0.0 || errors > 0.0,
        "{by_fallback} decisions by the fallback without a store error"
    );
}
