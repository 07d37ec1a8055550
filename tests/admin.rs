//! The admin listener: `/v1` limits API (read, reset, check), bearer-token auth, bad input
//! answered with 4xx JSON, and every contract metric exported with its labels after traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{client, Gateway, Upstream};
use reqwest::StatusCode;
use serde_json::{json, Value};

const CONFIG: &str = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}", token: "s3cret" }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - name: api
    match: { path_prefix: "/api" }
    upstream: app
    limits:
      - { name: per-ip, key: ["ip"], rate: "1/h", burst: 5 }
      - { name: per-tenant-user, key: ["header:x-tenant", "header:x-user"], rate: "1/h", burst: 2, on_missing_key: skip }
  - name: open
    match: { path_prefix: "/open" }
    upstream: app
"#;

async fn get_json(url: String) -> (StatusCode, Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_and_reset_buckets_with_auth() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let c = client();
    for _ in 0..2 {
        c.get(gw.url("/api/x")).send().await.unwrap();
    }
    let (status, body) = get_json(gw.admin_url("/v1/limits/api/per-ip?key=127.0.0.1")).await;
    assert_eq!(status, 200);
    assert_eq!(body["tokens"], 3);
    assert_eq!(body["capacity"], 5);
    assert_eq!(body["rate"], "1/h");
    assert!(body["reset_after_ms"].as_u64().unwrap() > 1_400_000);
    // Reading did not charge.
    let (_, again) = get_json(gw.admin_url("/v1/limits/api/per-ip?key=127.0.0.1")).await;
    assert_eq!(again["tokens"], 3);

    // A composite key: parts in order.
    for _ in 0..2 {
        c.get(gw.url("/api/x"))
            .header("x-tenant", "acme")
            .header("x-user", "bob")
            .send()
            .await
            .unwrap();
    }
    let (_, composite) =
        get_json(gw.admin_url("/v1/limits/api/per-tenant-user?key=acme&key=bob")).await;
    assert_eq!(composite["tokens"], 0);
    assert_eq!(composite["key"], "acme|bob");

    // Reset needs the token.
    let url = gw.admin_url("/v1/limits/api/per-ip?key=127.0.0.1");
    let denied = c.delete(&url).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(denied.headers()["www-authenticate"], "Bearer");
    let wrong = c.delete(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = c.delete(&url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let (_, after) = get_json(url.clone()).await;
    assert_eq!(after["tokens"], 5, "the bucket is full again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_decides_for_callers_not_behind_the_proxy() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let c = client();
    let check = |body: Value| {
        c.post(gw.admin_url("/v1/check"))
            .bearer_auth("s3cret")
            .json(&body)
            .send()
    };
    let first: Value = check(json!({"route": "api", "key": {"ip": "203.0.113.7"}, "cost": 3}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["allowed"], true);
    assert_eq!(first["decided_by"], "memory");
    assert_eq!(first["limits"][0]["remaining"], 2);
    let second: Value = check(json!({"route": "api", "key": {"ip": "203.0.113.7"}, "cost": 3}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["allowed"], false);
    assert_eq!(second["violated-policies"], json!(["per-ip"]));
    assert!(second["retry_after_ms"].as_u64().unwrap() > 0);
    // A cost above the capacity can never pass: no retry time is promised.
    let never: Value =
        check(json!({"route": "api", "key": {"ip": "203.0.113.8"}, "cost": 1000000}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(never["allowed"], false, "{never}");
    assert!(never["retry_after_ms"].is_null(), "{never}");
    // The same bucket the proxy uses for that client.
    let (_, read) = get_json(gw.admin_url("/v1/limits/api/per-ip?key=203.0.113.7")).await;
    assert_eq!(read["tokens"], 2);
    // Header names are case-insensitive; both parts present → that limit applies too.
    let both: Value = check(json!({"route": "api", "key": {"ip": "198.51.100.1", "header:X-Tenant": "t", "header:x-user": "u"}}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(both["limits"].as_array().unwrap().len(), 2, "{both}");
    let unauth = c
        .post(gw.admin_url("/v1/check"))
        .json(&json!({"route": "api"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_requests_get_4xx_json_never_500() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let c = client();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            c.get(gw.admin_url("/v1/limits/nope/per-ip?key=1.2.3.4")),
            404,
            "unknown_route",
        ),
        (
            c.get(gw.admin_url("/v1/limits/api/nope?key=1.2.3.4")),
            404,
            "unknown_limit",
        ),
        (c.get(gw.admin_url("/v1/limits/api/per-ip")), 400, "bad_key"),
        (
            c.get(gw.admin_url("/v1/limits/api/per-tenant-user?key=a")),
            400,
            "bad_key",
        ),
        (
            c.post(gw.admin_url("/v1/check"))
                .bearer_auth("s3cret")
                .body("{not json"),
            400,
            "bad_json",
        ),
        (
            c.post(gw.admin_url("/v1/check"))
                .bearer_auth("s3cret")
                .body(r#"{"route":"api","extra":1}"#),
            400,
            "bad_json",
        ),
        (
            c.post(gw.admin_url("/v1/check"))
                .bearer_auth("s3cret")
                .body(r#"{"route":"nope"}"#),
            404,
            "unknown_route",
        ),
        (
            c.post(gw.admin_url("/v1/check"))
                .bearer_auth("s3cret")
                .body(vec![b'x'; 100_000]),
            413,
            "body_too_large",
        ),
        (
            c.put(gw.admin_url("/v1/check")).bearer_auth("s3cret"),
            405,
            "method_not_allowed",
        ),
        (
            c.post(gw.admin_url("/health")).bearer_auth("s3cret"),
            405,
            "method_not_allowed",
        ),
        // Anything but a read needs the token, whatever the endpoint.
        (c.put(gw.admin_url("/v1/check")), 401, "unauthorized"),
        (c.post(gw.admin_url("/health")), 401, "unauthorized"),
        (c.get(gw.admin_url("/v2/anything")), 404, "not_found"),
        (
            // No client's ip part can be these bytes.
            c.get(gw.admin_url("/v1/limits/api/per-ip?key=%ff%fe")),
            400,
            "bad_key",
        ),
    ];
    for (req, want, code) in cases {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, want, "{body}");
        if !code.is_empty() {
            assert_eq!(body["error"], code, "{body}");
        }
    }
    // The gateway is still healthy.
    let (status, _) = get_json(gw.admin_url("/health")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_token_overrides_the_config() {
    let up = Upstream::start();
    let gw = Gateway::start_full(
        CONFIG,
        up.addr,
        &[],
        &[("TOLLGATE_ADMIN_TOKEN", "from-env")],
    )
    .await;
    let url = gw.admin_url("/v1/limits/api/per-ip?key=1.2.3.4");
    let c = client();
    assert_eq!(
        c.delete(&url)
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.delete(&url)
            .bearer_auth("from-env")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Every metric name of CONTRACT.md, with the labels it must carry.
const CONTRACT_METRICS: &[(&str, &[&str])] = &[
    ("tollgate_requests_total", &["route", "decision"]),
    (
        "tollgate_decision_duration_seconds_bucket",
        &["store", "le"],
    ),
    ("tollgate_store_errors_total", &["kind"]),
    ("tollgate_breaker_state", &[]),
    ("tollgate_config_reloads_total", &["result"]),
    ("tollgate_config_generation", &[]),
    ("tollgate_upstream_responses_total", &["route", "class"]),
    (
        "tollgate_upstream_duration_seconds_bucket",
        &["route", "le"],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_contract_metric_is_exported_with_its_labels() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let c = client();
    for _ in 0..7 {
        c.get(gw.url("/api/x")).send().await.unwrap();
    }
    c.get(gw.url("/open")).send().await.unwrap();
    c.get(gw.url("/nowhere")).send().await.unwrap();
    common::wait_until(
        "the access log lines",
        std::time::Duration::from_secs(5),
        || {
            let n = gw.log().matches("tollgate::access").count();
            async move { n >= 9 }
        },
    )
    .await;
    let text = c
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, labels) in CONTRACT_METRICS {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from /metrics"));
        for label in *labels {
            assert!(
                line.contains(&format!("{label}=\"")),
                "{name} lacks label {label}: {line}"
            );
        }
    }
    let has = |series: &str| {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(
        has(r#"tollgate_requests_total{decision="allowed",route="api"}"#),
        Some(5.0)
    );
    assert_eq!(
        has(r#"tollgate_requests_total{decision="limited",route="api"}"#),
        Some(2.0)
    );
    assert_eq!(
        has(r#"tollgate_requests_total{decision="allowed",route="open"}"#),
        Some(1.0)
    );
    assert_eq!(
        has(r#"tollgate_requests_total{decision="no_route",route=""}"#),
        Some(1.0)
    );
    assert_eq!(
        has(r#"tollgate_upstream_responses_total{class="2xx",route="api"}"#),
        Some(5.0)
    );
    assert_eq!(
        has(r#"tollgate_decision_duration_seconds_count{store="memory"}"#),
        Some(7.0)
    );
    assert_eq!(has("tollgate_breaker_state"), Some(0.0));
    assert_eq!(has("tollgate_config_generation"), Some(1.0));
    assert_eq!(
        has(r#"tollgate_config_reloads_total{result="error"}"#),
        Some(0.0)
    );
    assert_eq!(
        has(r#"tollgate_store_errors_total{kind="timeout"}"#),
        Some(0.0)
    );
    // Low cardinality: no client address or key value appears as a label value.
    assert!(
        !text.contains("127.0.0.1"),
        "a key value leaked into labels"
    );
    // Decision latency buckets resolve tens of microseconds.
    assert!(text.contains(r#"le="0.00001""#) && text.contains(r#"le="0.000025""#));
    // The access log has one line per request with route, decision, status and duration.
    let log = gw.log();
    // Text fields are quoted by the log formatter.
    let field = |line: &str, name: &str, value: &str| {
        line.contains(&format!("{name}=\"{value}\"")) || line.contains(&format!("{name}={value} "))
    };
    let line = log
        .lines()
        .find(|l| l.contains("tollgate::access") && field(l, "decision", "limited"))
        .unwrap_or_else(|| panic!("no access line for a limited request:\n{log}"));
    assert!(
        field(line, "route", "api") && line.contains("status=429"),
        "{line}"
    );
    assert!(line.contains("duration_us="), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_include_pingoras_own_lines() {
    let up = Upstream::start();
    let gw = Gateway::start_full(CONFIG, up.addr, &[], &[("TOLLGATE_LOG_FORMAT", "json")]).await;
    client().get(gw.url("/open")).send().await.unwrap();
    // The access line is written after the response.
    common::wait_until(
        "the access log line",
        std::time::Duration::from_secs(5),
        || {
            let found = gw.log().contains("tollgate::access");
            async move { found }
        },
    )
    .await;
    let log = gw.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|v| v["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("pingora"))),
        "Pingora's log lines come through tracing"
    );
    assert!(lines
        .iter()
        .any(|v| v["target"] == "tollgate::access" && v["fields"]["route"] == "open"));
}
