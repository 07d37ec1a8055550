//! The Envoy rate-limit service (issue 12) on the real binary: `ShouldRateLimit` over gRPC from
//! a tonic client (envoy-types) and from Python (`envoy_data_plane`, Envoy's protos generated
//! independently; tests/py/rls_client.py): exact counting under concurrency, one bucket shared
//! with proxied requests, `hits_addend`, all-or-nothing, descriptor trees, shadow mode,
//! INVALID_ARGUMENT, response headers, grpc.health.v1, a graceful stop under load, and what
//! `tollgate validate` says about bad `rls` configs. Memory store throughout. Rates are per hour
//! so that no token comes back while a test counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{client, free_port, header, Gateway, Upstream};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const CONFIG: &str = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
upstreams:
  app: { targets: ["{UPSTREAM}"] }
routes:
  - name: api
    match: { path_prefix: /api }
    upstream: app
    limits:
      - { name: per_key, key: [header:x-api-key], rate: 5/h }
  - name: byip
    match: { path_prefix: /ip }
    upstream: app
    limits:
      - { name: per_ip, key: [ip], rate: 100/h }
  - name: tenants
    match: { path_prefix: /t }
    upstream: app
    limits:
      - { name: per_tenant_user, key: [header:x-tenant, header:x-user], rate: 3/h }
rls:
  listen: "{RLS}"
  domains:
    - domain: edge
      descriptors:
        - key: remote_address
          rate_limit: { unit: hour, requests_per_unit: 4 }
        - key: path
          rate_limit: { unit: hour, requests_per_unit: 10 }
        - key: burst20
          rate_limit: { rate: 20/h }
        - key: many
          rate_limit: { rate: 1000/s, burst: 1000 }
        - key: api_key
          share: { route: api, limit: per_key }
        - key: client
          as: ip
          share: { route: byip, limit: per_ip }
        - key: database
          value: users
          name: db_users
          rate_limit: { rate: 2/h }
          shadow_mode: true
          descriptors:
            - key: op
              unlimited: true
        - key: database
          rate_limit: { unit: hour, requests_per_unit: 3 }
          descriptors:
            - key: op
              value: write
              rate_limit: { unit: day, requests_per_unit: 2 }
        - key: plain
          descriptors:
            - key: leaf
              rate_limit: { unit: minute, requests_per_unit: 7 }
        - key: tenant
          as: header:x-tenant
          descriptors:
            - key: user
              as: header:x-user
              share: { route: tenants, limit: per_tenant_user }
    - domain: other
      descriptors:
        - key: remote_address
          rate_limit: { unit: hour, requests_per_unit: 1 }
"#;

async fn gateway() -> (Upstream, Gateway) {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    (up, gw)
}

/// A connection to the gateway's rate-limit service.
async fn channel(gw: &Gateway) -> Channel {
    Channel::from_shared(format!("http://{}", gw.rls))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to rls {}: {e}\n{}", gw.rls, gw.log()))
}

async fn rls(gw: &Gateway) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::new(channel(gw).await)
}

fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

fn desc_hits(entries: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(UInt64Value { value: hits }),
        ..desc(entries)
    }
}

fn req(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend: hits,
    }
}

async fn call(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r)
        .await
        .unwrap_or_else(|e| panic!("ShouldRateLimit failed: {e:?}"))
        .into_inner()
}

/// One descriptor, cost 1, in domain `edge`.
async fn one(c: &mut RateLimitServiceClient<Channel>, key: &str, value: &str) -> RateLimitResponse {
    call(c, req("edge", vec![desc(&[(key, value)])], 0)).await
}

fn code(c: Code) -> i32 {
    c as i32
}

/// Asserts a status: code, current_limit (name, requests_per_unit, unit), limit_remaining.
#[track_caller]
fn assert_status(s: &DescriptorStatus, c: Code, limit: (&str, u32, Unit), remaining: u32) {
    assert_eq!(s.code, code(c), "{s:?}");
    let l = s.current_limit.as_ref().unwrap_or_else(|| panic!("{s:?}"));
    assert_eq!(
        (l.name.as_str(), l.requests_per_unit, l.unit),
        (limit.0, limit.1, limit.2 as i32),
        "{s:?}"
    );
    assert_eq!(s.limit_remaining, remaining, "{s:?}");
}

/// An OK status without a limit (nothing applies).
#[track_caller]
fn assert_no_limit(s: &DescriptorStatus) {
    assert_eq!(s.code, code(Code::Ok), "{s:?}");
    assert_eq!(s.current_limit, None, "{s:?}");
    assert_eq!(s.limit_remaining, 0, "{s:?}");
}

fn added_header(r: &RateLimitResponse, name: &str) -> Option<String> {
    let found: Vec<&str> = r
        .response_headers_to_add
        .iter()
        .filter(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
        .collect();
    assert!(found.len() <= 1, "{name} added twice: {r:?}");
    found.first().map(|v| v.to_string())
}

fn secs(d: &Option<envoy_types::pb::google::protobuf::Duration>) -> f64 {
    let d = d.as_ref().expect("duration_until_reset");
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

async fn rls_metric(gw: &Gateway, domain: &str, decision: &str) -> f64 {
    gw.metric(&format!(
        "tollgate_rls_requests_total{{decision=\"{decision}\",domain=\"{domain}\"}}"
    ))
    .await
    .unwrap_or(0.0)
}

// 1. Exact counting under concurrency.

#[tokio::test]
async fn concurrent_calls_admit_exactly_the_burst() {
    let (_up, gw) = gateway().await;
    // Two connections, 60 calls (3 x burst 20) in flight at once on them.
    let a = rls(&gw).await;
    let b = rls(&gw).await;
    let calls = (0..60).map(|i| {
        let mut c = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            // A descriptor that matches nothing first: statuses come in descriptor order.
            call(
                &mut c,
                req(
                    "edge",
                    vec![desc(&[("nothing", "x")]), desc(&[("burst20", "10.1.1.1")])],
                    0,
                ),
            )
            .await
        }
    });
    let answers = futures::future::join_all(calls).await;
    let mut remaining_ok = Vec::new();
    let mut over = 0;
    for r in &answers {
        assert_eq!(r.statuses.len(), 2, "{r:?}");
        assert_no_limit(&r.statuses[0]);
        let s = &r.statuses[1];
        if r.overall_code == code(Code::Ok) {
            assert_status(s, Code::Ok, ("burst20", 20, Unit::Hour), s.limit_remaining);
            remaining_ok.push(s.limit_remaining);
        } else {
            assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
            assert_status(s, Code::OverLimit, ("burst20", 20, Unit::Hour), 0);
            // Over: the wait until one token is back (3 minutes a token), give or take the
            // time the test has run.
            let wait = secs(&s.duration_until_reset);
            assert!((170.0..=180.0).contains(&wait), "{wait}: {s:?}");
            over += 1;
        }
    }
    assert_eq!(
        remaining_ok.len(),
        20,
        "exactly the burst admitted\n{}",
        gw.log()
    );
    assert_eq!(over, 40);
    // Every admitted call saw its own count: 19, 18, ..., 0, each once.
    remaining_ok.sort_unstable();
    assert_eq!(remaining_ok, (0..20).collect::<Vec<u32>>());
    assert_eq!(rls_metric(&gw, "edge", "allowed").await, 20.0);
    assert_eq!(rls_metric(&gw, "edge", "limited").await, 40.0);

    // Sequential calls on two limits: statuses in order, each remaining counting down, overall
    // OVER_LIMIT when one of them is over.
    let mut c = a.clone();
    for i in 0..5u32 {
        let r = call(
            &mut c,
            req(
                "edge",
                vec![
                    desc(&[("path", "/a")]),
                    desc(&[("remote_address", "10.0.0.1")]),
                ],
                0,
            ),
        )
        .await;
        if i < 4 {
            assert_eq!(r.overall_code, code(Code::Ok), "call {i}: {r:?}");
            assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 9 - i);
            assert_status(
                &r.statuses[1],
                Code::Ok,
                ("remote_address", 4, Unit::Hour),
                3 - i,
            );
            // Allowed: the time until the bucket is full again (15 minutes a token).
            let full = secs(&r.statuses[1].duration_until_reset);
            let expect = 900.0 * f64::from(i + 1);
            assert!(full <= expect && full > expect - 5.0, "{full}: {r:?}");
        } else {
            assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
            // path was not charged by the refused call: it still holds 6.
            assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 6);
            assert_status(
                &r.statuses[1],
                Code::OverLimit,
                ("remote_address", 4, Unit::Hour),
                0,
            );
        }
    }
}

// 2. One bucket shared between the service and proxied requests.

#[tokio::test]
async fn shared_limit_is_one_bucket_with_proxied_requests() {
    let (up, gw) = gateway().await;
    let mut c = rls(&gw).await;
    let http = client();
    // Sequential, alternating: service, request, service with the value padded, request with
    // the header padded, ... 12 in all; the burst is 5.
    let mut admitted = 0;
    let mut http_admitted = 0;
    for i in 0..12u32 {
        let (allowed, remaining) = match i % 4 {
            0 | 2 => {
                let value = if i % 4 == 0 { "k1" } else { "  k1\t" };
                let r = one(&mut c, "api_key", value).await;
                let s = &r.statuses[0];
                let ok = r.overall_code == code(Code::Ok);
                let c = if ok { Code::Ok } else { Code::OverLimit };
                assert_status(s, c, ("per_key", 5, Unit::Hour), s.limit_remaining);
                (ok, s.limit_remaining)
            }
            _ => {
                let value = if i % 4 == 1 { "k1" } else { "   k1 " };
                let resp = http
                    .get(gw.url("/api/x"))
                    .header("x-api-key", value)
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status() == 200 || resp.status() == 429, "{resp:?}");
                let ok = resp.status() == 200;
                if ok {
                    http_admitted += 1;
                }
                let remaining: u32 = header(&resp, "x-ratelimit-remaining").parse().unwrap();
                (ok, remaining)
            }
        };
        let expected_ok = i < 5;
        assert_eq!(allowed, expected_ok, "step {i}\n{}", gw.log());
        let expected_remaining = if expected_ok { 4 - i } else { 0 };
        assert_eq!(remaining, expected_remaining, "step {i}");
        if allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);
    assert_eq!(
        up.hits(),
        http_admitted,
        "only admitted requests reached the upstream"
    );
    // Another key is another bucket, from both sides.
    let r = one(&mut c, "api_key", "k2").await;
    assert_status(&r.statuses[0], Code::Ok, ("per_key", 5, Unit::Hour), 4);
    let resp = http
        .get(gw.url("/api/x"))
        .header("x-api-key", "k2")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-ratelimit-remaining"), "3");

    // Concurrently: 10 service calls and 10 requests on a fresh key; 5 admitted in all.
    let rls_calls = (0..10).map(|_| {
        let mut c = c.clone();
        async move {
            let r = one(&mut c, "api_key", "k3").await;
            u32::from(r.overall_code == code(Code::Ok))
        }
    });
    let http_calls = (0..10).map(|_| {
        let http = http.clone();
        let url = gw.url("/api/y");
        async move {
            let resp = http
                .get(url)
                .header("x-api-key", "k3")
                .send()
                .await
                .unwrap();
            u32::from(resp.status() == 200)
        }
    });
    let (a, b) = futures::join!(
        futures::future::join_all(rls_calls),
        futures::future::join_all(http_calls)
    );
    let total: u32 = a.iter().chain(b.iter()).sum();
    assert_eq!(total, 5, "rls {a:?} http {b:?}");

    // A value that is not plain (spaces, `|`, `{`, non-ASCII) names the same bucket both ways.
    let odd = "a key|{ü}";
    let r = one(&mut c, "api_key", odd).await;
    assert_status(&r.statuses[0], Code::Ok, ("per_key", 5, Unit::Hour), 4);
    let resp = http
        .get(gw.url("/api/x"))
        .header(
            "x-api-key",
            reqwest::header::HeaderValue::from_bytes(odd.as_bytes()).unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-ratelimit-remaining"), "3");
    // An empty (or blank) value is a missing key: the limit does not apply, as to a request
    // without the header.
    for blank in ["", "  "] {
        let r = one(&mut c, "api_key", blank).await;
        assert_no_limit(&r.statuses[0]);
    }
    // `as: ip`: the client address, written as the proxy writes a client's.
    let r = one(&mut c, "client", "127.0.0.1").await;
    assert_status(&r.statuses[0], Code::Ok, ("per_ip", 100, Unit::Hour), 99);
    let resp = http.get(gw.url("/ip")).send().await.unwrap();
    assert_eq!(header(&resp, "x-ratelimit-remaining"), "98");
    let r = one(&mut c, "client", " 127.0.0.1").await;
    assert_status(&r.statuses[0], Code::Ok, ("per_ip", 100, Unit::Hour), 97);

    // A multi-part shared key filled by `as:` entries: tenant/user, 3 an hour.
    for i in 0..2u32 {
        let r = call(
            &mut c,
            req(
                "edge",
                vec![desc(&[("tenant", "acme"), ("user", "bob")])],
                0,
            ),
        )
        .await;
        assert_status(
            &r.statuses[0],
            Code::Ok,
            ("per_tenant_user", 3, Unit::Hour),
            2 - i,
        );
    }
    let t = |user: &'static str| {
        http.get(gw.url("/t"))
            .header("x-tenant", "acme")
            .header("x-user", user)
            .send()
    };
    assert_eq!(t("bob").await.unwrap().status(), 200);
    assert_eq!(t("bob").await.unwrap().status(), 429);
    assert_eq!(t("eve").await.unwrap().status(), 200);
    let r = call(
        &mut c,
        req(
            "edge",
            vec![desc(&[("tenant", "acme"), ("user", "bob")])],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
}

// 3. hits_addend.

#[tokio::test]
async fn hits_addend_request_and_descriptor_level() {
    let (_up, gw) = gateway().await;
    let mut c = rls(&gw).await;
    let path = |r: &RateLimitResponse| r.statuses[0].limit_remaining;
    // Request level: 0 means 1; 3 costs 3.
    let r = call(&mut c, req("edge", vec![desc(&[("path", "a")])], 0)).await;
    assert_eq!(path(&r), 9);
    let r = call(&mut c, req("edge", vec![desc(&[("path", "a")])], 3)).await;
    assert_eq!(path(&r), 6);
    // Descriptor level overrides the request's: 2, not 3.
    let r = call(&mut c, req("edge", vec![desc_hits(&[("path", "a")], 2)], 3)).await;
    assert_eq!(path(&r), 4);
    // Descriptor level 0 means 1 (not the request's 5).
    let r = call(&mut c, req("edge", vec![desc_hits(&[("path", "a")], 0)], 5)).await;
    assert_eq!(path(&r), 3);
    // More than what is left: refused, nothing taken; exactly what is left: admitted.
    let r = call(&mut c, req("edge", vec![desc(&[("path", "a")])], 4)).await;
    assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
    assert_status(&r.statuses[0], Code::OverLimit, ("path", 10, Unit::Hour), 3);
    let r = call(&mut c, req("edge", vec![desc_hits(&[("path", "a")], 3)], 0)).await;
    assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 0);

    // A cost above the burst never fits: OVER_LIMIT, no Retry-After (no wait makes it pass),
    // nothing charged.
    let r = call(&mut c, req("edge", vec![desc(&[("path", "b")])], 11)).await;
    assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
    assert_status(
        &r.statuses[0],
        Code::OverLimit,
        ("path", 10, Unit::Hour),
        10,
    );
    assert_eq!(added_header(&r, "retry-after"), None, "{r:?}");
    let r = call(
        &mut c,
        req("edge", vec![desc_hits(&[("path", "b")], 11)], 1),
    )
    .await;
    assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
    let r = call(&mut c, req("edge", vec![desc(&[("path", "b")])], 0)).await;
    assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 9);

    // Two descriptors naming one bucket in one call: their costs add (2 + 3), both report it.
    let r = call(
        &mut c,
        req(
            "edge",
            vec![
                desc_hits(&[("path", "c")], 2),
                desc_hits(&[("path", "c")], 3),
            ],
            0,
        ),
    )
    .await;
    assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 5);
    assert_status(&r.statuses[1], Code::Ok, ("path", 10, Unit::Hour), 5);
    // ...and a merged cost above what is left refuses both.
    let r = call(
        &mut c,
        req(
            "edge",
            vec![
                desc_hits(&[("path", "c")], 3),
                desc_hits(&[("path", "c")], 3),
            ],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
    let r = call(&mut c, req("edge", vec![desc(&[("path", "c")])], 0)).await;
    assert_eq!(path(&r), 4);
}

// 4. All-or-nothing.

#[tokio::test]
async fn a_refused_call_charges_no_bucket() {
    let (_up, gw) = gateway().await;
    let mut c = rls(&gw).await;
    for _ in 0..4 {
        let r = one(&mut c, "remote_address", "9.9.9.9").await;
        assert_eq!(r.overall_code, code(Code::Ok));
    }
    let r = call(
        &mut c,
        req(
            "edge",
            vec![
                desc(&[("path", "/x")]),
                desc(&[("api_key", "kk")]),
                desc(&[("remote_address", "9.9.9.9")]),
            ],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
    assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 10);
    assert_status(&r.statuses[1], Code::Ok, ("per_key", 5, Unit::Hour), 5);
    assert_status(
        &r.statuses[2],
        Code::OverLimit,
        ("remote_address", 4, Unit::Hour),
        0,
    );
    // Neither the own limit nor the shared one was charged.
    let r = one(&mut c, "path", "/x").await;
    assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 9);
    let resp = client()
        .get(gw.url("/api"))
        .header("x-api-key", "kk")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-ratelimit-remaining"), "4");
}

// 5. Descriptor trees, unknowns, shadow mode.

#[tokio::test]
async fn descriptor_tree_precedence_unknowns_and_shadow_mode() {
    let (_up, gw) = gateway().await;
    let mut c = rls(&gw).await;
    // Value-less `database`: any value, one bucket per value, 3 an hour.
    for i in 0..3u32 {
        let r = one(&mut c, "database", "orders").await;
        assert_status(&r.statuses[0], Code::Ok, ("database", 3, Unit::Hour), 2 - i);
    }
    let r = one(&mut c, "database", "orders").await;
    assert_eq!(r.overall_code, code(Code::OverLimit));
    let r = one(&mut c, "database", "carts").await;
    assert_status(&r.statuses[0], Code::Ok, ("database", 3, Unit::Hour), 2);
    // A fixed value wins over the value-less node: `users` is db_users (shadow, 2 an hour).
    for i in 0..2u32 {
        let r = one(&mut c, "database", "users").await;
        assert_eq!(r.overall_code, code(Code::Ok));
        assert_status(&r.statuses[0], Code::Ok, ("db_users", 2, Unit::Hour), 1 - i);
    }
    // Shadow mode: over, yet OK, and counted shadow_limited.
    assert_eq!(rls_metric(&gw, "edge", "shadow_limited").await, 0.0);
    let r = one(&mut c, "database", "users").await;
    assert_eq!(r.overall_code, code(Code::Ok), "{r:?}");
    assert_status(&r.statuses[0], Code::Ok, ("db_users", 2, Unit::Hour), 0);
    assert_eq!(added_header(&r, "retry-after"), None, "{r:?}");
    assert_eq!(rls_metric(&gw, "edge", "shadow_limited").await, 1.0);
    // A shadow over-limit does not make a call with an enforced descriptor over.
    let r = call(
        &mut c,
        req(
            "edge",
            vec![desc(&[("database", "users")]), desc(&[("path", "p")])],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, code(Code::Ok), "{r:?}");
    assert_status(&r.statuses[1], Code::Ok, ("path", 10, Unit::Hour), 9);
    assert_eq!(rls_metric(&gw, "edge", "shadow_limited").await, 2.0);

    // Nested: the node the last entry reaches decides.
    let r = call(
        &mut c,
        req(
            "edge",
            vec![desc(&[("database", "users"), ("op", "read")])],
            0,
        ),
    )
    .await;
    assert_no_limit(&r.statuses[0]); // unlimited
    for i in 0..2u32 {
        let r = call(
            &mut c,
            req(
                "edge",
                vec![desc(&[("database", "orders"), ("op", "write")])],
                0,
            ),
        )
        .await;
        // Its own limit, not the exhausted `database` one.
        assert_eq!(r.overall_code, code(Code::Ok), "{r:?}");
        assert_status(
            &r.statuses[0],
            Code::Ok,
            ("database.op_write", 2, Unit::Day),
            1 - i,
        );
    }
    let r = call(
        &mut c,
        req(
            "edge",
            vec![desc(&[("database", "orders"), ("op", "write")])],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
    // No node for op=read under the value-less database; a node without a limit; an unknown
    // key; entries past a leaf.
    for d in [
        desc(&[("database", "orders"), ("op", "read")]),
        desc(&[("plain", "x")]),
        desc(&[("unknown", "x")]),
        desc(&[("path", "/a"), ("more", "x")]),
    ] {
        let r = call(&mut c, req("edge", vec![d.clone()], 0)).await;
        assert_eq!(r.overall_code, code(Code::Ok), "{d:?}: {r:?}");
        assert_eq!(r.statuses.len(), 1);
        assert_no_limit(&r.statuses[0]);
        assert!(r.response_headers_to_add.is_empty(), "{r:?}");
    }
    let r = call(
        &mut c,
        req("edge", vec![desc(&[("plain", "x"), ("leaf", "y")])], 0),
    )
    .await;
    assert_status(&r.statuses[0], Code::Ok, ("plain.leaf", 7, Unit::Minute), 6);

    // Unknown domain: every descriptor OK without a limit; counted no_route with domain "".
    let r = call(
        &mut c,
        req(
            "nope",
            vec![desc(&[("remote_address", "1.1.1.1")]), desc(&[("x", "y")])],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, code(Code::Ok));
    assert_eq!(r.statuses.len(), 2);
    r.statuses.iter().for_each(assert_no_limit);
    assert_eq!(rls_metric(&gw, "", "no_route").await, 1.0);
    // Domains are separate: `other` has remote_address at 1 an hour.
    let r = call(
        &mut c,
        req("other", vec![desc(&[("remote_address", "1.1.1.1")])], 0),
    )
    .await;
    assert_status(
        &r.statuses[0],
        Code::Ok,
        ("remote_address", 1, Unit::Hour),
        0,
    );
    let r = one(&mut c, "remote_address", "1.1.1.1").await;
    assert_status(
        &r.statuses[0],
        Code::Ok,
        ("remote_address", 4, Unit::Hour),
        3,
    );
}

// 6. INVALID_ARGUMENT.

#[tokio::test]
async fn malformed_calls_are_invalid_argument_and_the_service_goes_on() {
    let (_up, gw) = gateway().await;
    let mut c = rls(&gw).await;
    let long = "v".repeat(5000);
    let many: Vec<RateLimitDescriptor> = (0..65).map(|_| desc(&[("x", "y")])).collect();
    let wide: Vec<(&str, &str)> = (0..33).map(|_| ("x", "y")).collect();
    let cases: Vec<(&str, RateLimitRequest, &str)> = vec![
        (
            "empty domain",
            req("", vec![desc(&[("path", "/")])], 0),
            "domain must not be empty",
        ),
        (
            "no descriptors",
            req("edge", vec![], 0),
            "descriptors must not be empty",
        ),
        (
            "no descriptors, unknown domain",
            req("zzz", vec![], 0),
            "descriptors must not be empty",
        ),
        (
            "descriptor without entries",
            req("edge", vec![desc(&[("path", "/")]), desc(&[])], 0),
            "descriptors[1] has no entries",
        ),
        (
            "empty key",
            req("edge", vec![desc(&[("path", "/"), ("", "v")])], 0),
            "descriptors[0].entries[1].key must not be empty",
        ),
        (
            "too many descriptors",
            req("edge", many, 0),
            "65 descriptors; at most 64",
        ),
        (
            "too many entries",
            req("edge", vec![desc(&wide)], 0),
            "descriptors[0] has 33 entries; at most 32",
        ),
    ];
    for (what, r, message) in cases {
        let err = c
            .should_rate_limit(r)
            .await
            .expect_err(&format!("{what}: accepted"));
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().starts_with(message),
            "{what}: {:?} does not start with {message:?}",
            err.message()
        );
    }
    // Counted bad_request, under the domain only when it is configured.
    assert_eq!(rls_metric(&gw, "edge", "bad_request").await, 5.0);
    assert_eq!(rls_metric(&gw, "", "bad_request").await, 2.0);
    // Nothing was charged by the refused calls, and the limits just inside are accepted.
    let r = one(&mut c, "path", "/").await;
    assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 9);
    let at_most: Vec<RateLimitDescriptor> = (0..64).map(|_| desc(&[("x", "y")])).collect();
    let r = call(&mut c, req("edge", at_most, 0)).await;
    assert_eq!(r.statuses.len(), 64);
    let wide: Vec<(&str, &str)> = (0..32).map(|_| ("x", "y")).collect();
    let r = call(&mut c, req("edge", vec![desc(&wide)], 0)).await;
    assert_no_limit(&r.statuses[0]);
    // A value (which a client may choose through a header) never makes a call invalid: Envoy
    // would fail open for every descriptor of it. A long one is hashed into its own bucket.
    for left in [9, 8] {
        let r = call(&mut c, req("edge", vec![desc(&[("path", &long)])], 0)).await;
        assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), left);
    }
    // A value an `as: ip` source cannot read refuses its descriptor (never a fresh bucket per
    // spelling), and so the call; nothing else in it is charged.
    let r = call(
        &mut c,
        req(
            "edge",
            vec![desc(&[("client", "not-an-ip")]), desc(&[("path", "/")])],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32, "{r:?}");
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32, "{r:?}");
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.name.as_str()),
        Some("per_ip")
    );
    let r = one(&mut c, "path", "/").await;
    assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 8);
    let r = one(&mut c, "client", " 10.9.8.7 ").await;
    assert_status(&r.statuses[0], Code::Ok, ("per_ip", 100, Unit::Hour), 99);
    // The proxy still answers too.
    let resp = client().get(gw.url("/ip")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

// 7. Response headers.

#[tokio::test]
async fn response_headers_are_the_proxys_and_retry_after_when_over() {
    let (_up, gw) = gateway().await;
    let mut c = rls(&gw).await;
    let r = one(&mut c, "remote_address", "5.5.5.5").await;
    let h = |r: &RateLimitResponse, n: &str| added_header(r, n);
    assert_eq!(h(&r, "x-ratelimit-limit").as_deref(), Some("4"), "{r:?}");
    assert_eq!(h(&r, "x-ratelimit-remaining").as_deref(), Some("3"));
    assert_eq!(h(&r, "x-ratelimit-reset").as_deref(), Some("900"));
    assert_eq!(
        h(&r, "ratelimit-policy").as_deref(),
        Some(r#""remote_address";q=4;w=3600"#)
    );
    assert_eq!(
        h(&r, "ratelimit").as_deref(),
        Some(r#""remote_address";r=3;t=900"#)
    );
    assert_eq!(h(&r, "retry-after"), None);
    assert_eq!(r.response_headers_to_add.len(), 5, "{r:?}");
    for _ in 0..3 {
        one(&mut c, "remote_address", "5.5.5.5").await;
    }
    let r = one(&mut c, "remote_address", "5.5.5.5").await;
    assert_eq!(r.overall_code, code(Code::OverLimit));
    assert_eq!(h(&r, "x-ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(h(&r, "retry-after").as_deref(), Some("900"), "{r:?}");
    assert_eq!(
        h(&r, "ratelimit").as_deref(),
        Some(r#""remote_address";r=0;t=900"#)
    );
    assert_eq!(r.response_headers_to_add.len(), 6, "{r:?}");
    // Two limits: the policy lists both, the legacy headers name the most restrictive.
    let r = call(
        &mut c,
        req(
            "edge",
            vec![desc(&[("path", "/h")]), desc(&[("api_key", "hk")])],
            0,
        ),
    )
    .await;
    assert_eq!(
        h(&r, "ratelimit-policy").as_deref(),
        Some(r#""path";q=10;w=3600, "per_key";q=5;w=3600"#),
        "{r:?}"
    );
    assert_eq!(h(&r, "x-ratelimit-limit").as_deref(), Some("5"));
    assert_eq!(h(&r, "x-ratelimit-remaining").as_deref(), Some("4"));
    // A proxied request with that key reads the same bucket and writes the same header.
    let resp = client()
        .get(gw.url("/api"))
        .header("x-api-key", "hk")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "ratelimit"), r#""per_key";r=3;t=720"#);
    // Only shadow or no limits: no headers.
    let r = one(&mut c, "database", "users").await;
    assert!(r.response_headers_to_add.is_empty(), "{r:?}");
}

#[tokio::test]
async fn rls_headers_setting_selects_the_header_families() {
    let up = Upstream::start();
    let config = CONFIG.replace(
        "  listen: \"{RLS}\"\n",
        "  listen: \"{RLS}\"\n  headers: { legacy: false, ietf: true }\n",
    );
    let gw = Gateway::start(&config, up.addr).await;
    let mut c = rls(&gw).await;
    let r = one(&mut c, "remote_address", "5.5.5.5").await;
    let keys: Vec<&str> = r
        .response_headers_to_add
        .iter()
        .map(|h| h.key.as_str())
        .collect();
    assert_eq!(keys, ["RateLimit-Policy", "RateLimit"], "{r:?}");
}

// 8. Health and a graceful stop.

#[tokio::test]
async fn health_is_serving_when_ready() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let (_up, gw) = gateway().await;
    let mut h = HealthClient::new(channel(&gw).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.to_string(),
    };
    // Health follows readiness every 200 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        loop {
            let status = h.check(check(service)).await.map(|r| r.into_inner().status);
            if status.as_ref().ok() == Some(&(ServingStatus::Serving as i32)) {
                break;
            }
            assert!(Instant::now() < deadline, "{service:?}: {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let err = h.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn health_is_not_serving_while_the_store_cannot_decide_and_fallback_deny_refuses() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let up = Upstream::start();
    // Redis on a port nobody listens on; fallback deny: /ready is 503, nothing is admitted.
    let config = CONFIG.replace(
        "upstreams:",
        &format!(
            "store: {{ kind: redis, redis: {{ urls: [\"redis://127.0.0.1:{}\"] }} }}\n\
             breaker: {{ fallback: deny }}\nupstreams:",
            free_port()
        ),
    );
    let gw = Gateway::spawn_now(&config, up.addr);
    let rls_addr = gw.rls;
    common::wait_until("the rls listener", Duration::from_secs(20), || async move {
        tokio::net::TcpStream::connect(rls_addr).await.is_ok()
    })
    .await;
    let mut h = HealthClient::new(channel(&gw).await);
    // Starting, then unavailable: NOT_SERVING throughout (give it past the start-up wait).
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut looks = 0;
    while Instant::now() < deadline {
        let s = h
            .check(HealthCheckRequest {
                service: "envoy.service.ratelimit.v3.RateLimitService".into(),
            })
            .await
            .map(|r| r.into_inner().status);
        // Before the first readiness tick the reporter may still answer its default.
        if looks > 0 || s.as_ref().ok() != Some(&(ServingStatus::Serving as i32)) {
            assert_eq!(
                s.as_ref().ok(),
                Some(&(ServingStatus::NotServing as i32)),
                "{s:?}"
            );
        }
        looks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = client().get(gw.admin_url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    // fallback deny: OVER_LIMIT with Retry-After; counted fallback_limited.
    let mut c = rls(&gw).await;
    let r = one(&mut c, "remote_address", "1.2.3.4").await;
    assert_eq!(r.overall_code, code(Code::OverLimit), "{r:?}");
    assert_eq!(r.statuses[0].code, code(Code::OverLimit), "{r:?}");
    let retry: u64 = added_header(&r, "retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1, "{r:?}");
    assert_eq!(rls_metric(&gw, "edge", "fallback_limited").await, 1.0);
    // A descriptor without a limit is still OK.
    let r = one(&mut c, "unknown", "x").await;
    assert_eq!(r.overall_code, code(Code::Ok), "{r:?}");
}

/// Whether a failed call was never taken by the gateway: a connection that could not be made
/// (the listener is closed), a call the client still held when its connection closed (hyper
/// hands it back unsent: canceled, "connection closed"), or a stream above the last one the
/// server's GOAWAY says it processed (h2: a remote GOAWAY error; RFC 9113 6.8: not processed).
/// All are safe to retry. Anything else (a reset or a broken pipe) cut a call the gateway had
/// been sent.
fn never_reached_the_gateway(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_canceled() {
                return true;
            }
        }
        if let Some(h) = e.downcast_ref::<h2::Error>() {
            if h.is_go_away() && h.is_remote() {
                return true;
            }
        }
        source = e.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_finishes_calls_in_flight_and_exits_zero() {
    let (_up, mut gw) = gateway().await;
    // 200 concurrent callers over 20 connections, each calling in a loop until a call fails.
    let mut channels = Vec::new();
    for _ in 0..20 {
        channels.push(rls(&gw).await);
    }
    // Connections that are not calling must not hold the stop up: one that has made a call
    // and is idle, one that never said anything.
    let mut idle = rls(&gw).await;
    one(&mut idle, "many", "idle").await;
    let silent = tokio::net::TcpStream::connect(gw.rls).await.unwrap();
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..200usize {
        let mut c = channels[i % 20].clone();
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let value = format!("10.0.{}.{}", i / 250, i % 250);
                let r = c
                    .should_rate_limit(req("edge", vec![desc(&[("many", &value)])], 0))
                    .await;
                match r {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert_eq!(r.statuses.len(), 1, "{r:?}");
                        assert!(r.statuses[0].current_limit.is_some(), "{r:?}");
                        ok += 1;
                    }
                    Err(e) => return (ok, Some(e)),
                }
                if Instant::now() > deadline {
                    return (ok, None);
                }
            }
        }));
    }
    // Let the load build, then stop the gateway in the middle of it.
    while started.load(std::sync::atomic::Ordering::SeqCst) < 2000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.signal("TERM");
    let stopped_at = Instant::now();
    let mut total_ok = 0;
    let mut broken = Vec::new();
    for t in tasks {
        let (ok, err) = t.await.unwrap();
        total_ok += ok;
        match err {
            None => broken.push("still answering 15 s after SIGTERM".to_string()),
            Some(e) if never_reached_the_gateway(&e) => {}
            Some(e) => broken.push(format!("{e:?}")),
        }
    }
    assert!(total_ok >= 2000 - 200, "{total_ok}");
    let status = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        // Well before the drain timeout (10 s): nothing is left to wait for.
        assert!(
            stopped_at.elapsed() < Duration::from_secs(5),
            "still running\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    drop((idle, silent));
    assert!(
        broken.is_empty(),
        "{} calls broken mid-call, e.g. {:?}\n{}",
        broken.len(),
        &broken[..broken.len().min(5)],
        gw.log()
    );
    assert_eq!(status.code(), Some(0), "{}", gw.log());
}

// 9. `tollgate validate` on bad rls configs.

fn validate(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(common::bin())
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap_or(-1),
        text.replace(&format!("{}: ", path.display()), ""),
    )
}

const VALIDATE_HEAD: &str = r#"
listen: ["127.0.0.1:18080"]
admin: { listen: "127.0.0.1:19901" }
upstreams:
  app: { targets: ["127.0.0.1:18999"] }
routes:
  - name: api
    match: { path_prefix: / }
    upstream: app
    limits:
      - { name: per_key, key: [header:x-api-key], rate: 5/m }
      - { name: pair, key: [header:x-tenant, header:x-user], rate: 5/m }
"#;

#[test]
fn validate_names_the_field_of_each_bad_rls_setting() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown share route",
            r#"rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - { key: k, share: { route: nope, limit: per_key } }
"#,
            &[
                "rls.domains[0].descriptors[0].share.route",
                "no route named \"nope\"",
            ],
        ),
        (
            "unknown share limit",
            r#"rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - { key: k, share: { route: api, limit: nope } }
"#,
            &[
                "rls.domains[0].descriptors[0].share.limit",
                "route \"api\" has no limit \"nope\"",
            ],
        ),
        (
            "both rate_limit and share",
            r#"rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - key: k
          rate_limit: { unit: minute, requests_per_unit: 3 }
          share: { route: api, limit: per_key }
"#,
            &[
                "rls.domains[0].descriptors[0]",
                "takes one of rate_limit, share and unlimited",
            ],
        ),
        (
            "bad unit",
            r#"rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - key: a
          descriptors:
            - { key: b, rate_limit: { unit: fortnight, requests_per_unit: 3 } }
"#,
            &[
                "rls.domains[0].descriptors[0].descriptors[0].rate_limit.unit",
                "fortnight",
            ],
        ),
        (
            "duplicate domain",
            r#"rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors: [ { key: a, unlimited: true } ]
    - domain: edge
      descriptors: [ { key: b, unlimited: true } ]
"#,
            &["rls.domains[1].domain", "listed twice"],
        ),
        (
            "rls.listen is the admin listener",
            r#"rls:
  listen: "127.0.0.1:19901"
  domains:
    - domain: edge
      descriptors: [ { key: a, unlimited: true } ]
"#,
            &[
                "rls.listen",
                "127.0.0.1:19901 is also a proxy or admin listener",
            ],
        ),
        (
            "rls.listen is a proxy listener",
            r#"rls:
  listen: "127.0.0.1:18080"
  domains:
    - domain: edge
      descriptors: [ { key: a, unlimited: true } ]
"#,
            &[
                "rls.listen",
                "127.0.0.1:18080 is also a proxy or admin listener",
            ],
        ),
        (
            "a multi-part shared key without as:",
            r#"rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - { key: tenant_user, share: { route: api, limit: pair } }
"#,
            &[
                "rls.domains[0].descriptors[0].share",
                "part 0 of the key of api.pair (header:x-tenant)",
                "as: header:x-tenant",
            ],
        ),
        (
            "a multi-part shared key with one part named",
            r#"rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - key: tenant
          as: header:x-tenant
          descriptors:
            - { key: user, share: { route: api, limit: pair } }
"#,
            &[
                "rls.domains[0].descriptors[0].descriptors[0].share",
                "part 1 of the key of api.pair (header:x-user)",
            ],
        ),
    ];
    for (what, rls, expected) in cases {
        let (code, out) = validate(&format!("{VALIDATE_HEAD}{rls}"));
        assert_eq!(code, 1, "{what}: {out}");
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{what}: one problem\n{out}");
        // `line N column M: ` first when the field can be located in the file.
        let line = match lines[0].strip_prefix("line ") {
            Some(rest) => rest.split_once(": ").map_or(rest, |(_, b)| b),
            None => lines[0],
        };
        let field = expected[0];
        assert!(
            line.starts_with(&format!("{field}: ")),
            "{what}: does not name {field}: {out}"
        );
        for part in &expected[1..] {
            assert!(line.contains(part), "{what}: {part:?} missing: {out}");
        }
    }
    // And a good one passes.
    let (code, out) = validate(&format!(
        "{VALIDATE_HEAD}{}",
        r#"rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - key: tenant
          as: header:x-tenant
          descriptors:
            - { key: user, as: header:x-user, share: { route: api, limit: pair } }
"#
    ));
    assert_eq!(code, 0, "{out}");
}

// The independent client: Python, envoy_data_plane.

/// Runs tests/py/rls_client.py against the gateway's service; one JSON value per call.
fn python_calls(gw: &Gateway, calls: &Value) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("rls_client.py");
    std::fs::write(&script, include_str!("py/rls_client.py")).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(gw.rls.to_string())
        .arg(calls.to_string())
        .output()
        .expect("run python3 rls client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn python_envoy_client_sees_exact_counts() {
    let (_up, gw) = gateway().await;
    // 60 calls at once on a burst-20 own limit, and 15 on the shared per_key (burst 5) with the
    // descriptor's own hits_addend of 1 overriding the request's 3.
    let calls = serde_json::json!([
        {"domain": "edge", "repeat": 60,
         "descriptors": [{"entries": [["burst20", "py"]]}]},
        {"domain": "edge", "repeat": 15, "hits_addend": 3,
         "descriptors": [{"entries": [["api_key", "py-key"]], "hits_addend": 1}]},
        {"domain": "edge", "descriptors": [{"entries": []}]},
        {"domain": "nope", "descriptors": [{"entries": [["a", "b"]]}]},
    ]);
    let results = python_calls(&gw, &calls);
    assert_eq!(results.len(), 77);
    let count = |range: std::ops::Range<usize>, code: &str| {
        results[range]
            .iter()
            .filter(|r| r["response"]["overallCode"] == code)
            .count()
    };
    assert_eq!(count(0..60, "OK"), 20, "{results:?}");
    assert_eq!(count(0..60, "OVER_LIMIT"), 40);
    let mut remaining: Vec<u64> = results[0..60]
        .iter()
        .filter(|r| r["response"]["overallCode"] == "OK")
        .map(|r| {
            let s = &r["response"]["statuses"][0];
            assert_eq!(s["code"], "OK");
            assert_eq!(
                s["currentLimit"],
                serde_json::json!({"name": "burst20", "requestsPerUnit": 20, "unit": "HOUR"})
            );
            s["limitRemaining"].as_u64().unwrap()
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..20).collect::<Vec<u64>>());
    for r in results[0..60]
        .iter()
        .filter(|r| r["response"]["overallCode"] == "OVER_LIMIT")
    {
        let headers = r["response"]["responseHeadersToAdd"].as_array().unwrap();
        assert!(
            headers
                .iter()
                .any(|h| h["key"] == "Retry-After" && h["value"] == "180"),
            "{r}"
        );
    }
    assert_eq!(count(60..75, "OK"), 5, "{results:?}");
    assert_eq!(count(60..75, "OVER_LIMIT"), 10);
    assert_eq!(
        results[75]["error"]["code"], "INVALID_ARGUMENT",
        "{}",
        results[75]
    );
    assert_eq!(
        results[75]["error"]["details"],
        "descriptors[0] has no entries"
    );
    assert_eq!(results[76]["response"]["overallCode"], "OK");
    assert_eq!(results[76]["response"]["statuses"][0]["code"], "OK");
    assert!(results[76]["response"]["statuses"][0]
        .get("currentLimit")
        .is_none_or(Value::is_null));
    // The shared bucket is spent for proxied requests with that key too.
    let resp = client()
        .get(gw.url("/api"))
        .header("x-api-key", "py-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(rls_metric(&gw, "edge", "allowed").await, 25.0);
    assert_eq!(rls_metric(&gw, "edge", "limited").await, 50.0);
}

// 10. Hostile-review fixes: bounded connections, messages and reloads.

/// Silent connections beyond `rls.max_connections` are closed at once, the ones under it
/// within the first-bytes timeout; the proxy and a client that speaks are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_capped_and_timed_out() {
    use std::io::Read;
    let up = Upstream::start();
    let gw = Gateway::start(
        &CONFIG.replace(
            "  listen: \"{RLS}\"",
            "  listen: \"{RLS}\"\n  max_connections: 20",
        ),
        up.addr,
    )
    .await;
    let silent: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(gw.rls).unwrap())
        .collect();
    // Past the cap: closed by the gateway at once (EOF or reset on read).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed = |socks: &[std::net::TcpStream]| {
        socks
            .iter()
            .filter(|s| {
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                let mut b = [0u8; 1];
                match (&mut &**s).read(&mut b) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                }
            })
            .count()
    };
    assert_eq!(closed(&silent), 20, "{}", gw.log());
    let resp = client().get(gw.url("/ip")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // The first-bytes timeout (10 s) frees the rest; a speaking client is then served.
    common::wait_until("silent connections closed", Duration::from_secs(15), || {
        let n = closed(&silent);
        async move { n == 40 }
    })
    .await;
    let mut c = rls(&gw).await;
    let r = one(&mut c, "path", "/capped").await;
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
}

/// A message over the size cap is refused without buffering it, and the service goes on.
#[tokio::test]
async fn an_oversized_message_is_refused_and_the_service_goes_on() {
    let (_up, gw) = gateway().await;
    let mut c = rls(&gw).await;
    let huge: Vec<RateLimitDescriptor> = (0..8)
        .map(|_| desc(&[("path", &"v".repeat(16 * 1024))]))
        .collect();
    let err = c
        .should_rate_limit(req("edge", huge, 0))
        .await
        .expect_err("a 128 KiB message is over the cap");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    let r = one(&mut c, "path", "/after").await;
    assert_status(&r.statuses[0], Code::Ok, ("path", 10, Unit::Hour), 9);
}

/// A reload that removes `rls` does not leave a port that says OK to everything: calls get
/// UNAVAILABLE (so Envoy applies its failure mode) and health says NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_rls_by_reload_makes_the_port_unavailable_not_permissive() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let (_up, gw) = gateway().await;
    let mut c = rls(&gw).await;
    let r = one(&mut c, "path", "/x").await;
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let cut = text.find("\nrls:").unwrap();
    std::fs::write(&gw.config_path, &text[..cut]).unwrap();
    gw.signal("HUP");
    common::wait_until("reload applied", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            matches!(c.should_rate_limit(req("edge", vec![desc(&[("path", "/x")])], 0)).await,
                Err(e) if e.code() == tonic::Code::Unavailable)
        }
    })
    .await;
    let mut h = HealthClient::new(channel(&gw).await);
    common::wait_until("NOT_SERVING", Duration::from_secs(5), || {
        let mut h = h.clone();
        async move {
            h.check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok_and(|r| r.into_inner().status == 2)
        }
    })
    .await;
    let _ = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(gw.log().contains("rls was removed"), "{}", gw.log());
}

/// Only calls keep a connection's place under `rls.max_connections`: a client that answers
/// the server's pings but makes no call is closed after `idle_timeout_ms`, and the place goes
/// to a client that calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_makes_no_call_loses_its_place() {
    let up = Upstream::start();
    let gw = Gateway::start(
        &CONFIG.replace(
            "  listen: \"{RLS}\"",
            "  listen: \"{RLS}\"\n  max_connections: 1\n  idle_timeout_ms: 35000",
        ),
        up.addr,
    )
    .await;
    // The first client calls once, then only answers pings (hyper does so by itself).
    let mut first = rls(&gw).await;
    let r = one(&mut first, "path", "/first").await;
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    // Meanwhile the only place is taken: a second client is closed at once.
    let second = Channel::from_shared(format!("http://{}", gw.rls))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let refused = match second.connect().await {
        Err(_) => true,
        Ok(ch) => RateLimitServiceClient::new(ch)
            .should_rate_limit(req("edge", vec![desc(&[("path", "/second")])], 0))
            .await
            .is_err(),
    };
    assert!(refused, "a second connection got a place past the cap");
    // Past the idle timeout (and past the server's first ping at 30 s) the place is free.
    tokio::time::sleep(Duration::from_secs(37)).await;
    let mut second = rls(&gw).await;
    let r = one(&mut second, "path", "/second").await;
    assert_eq!(r.statuses[0].code, Code::Ok as i32, "{}", gw.log());
    drop(first);
}
