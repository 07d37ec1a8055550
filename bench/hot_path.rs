//! Criterion micro-benchmarks of the hot path: key derivation, route matching (10k routes,
//! indexed vs. a linear scan), and the memory store (token bucket, fixed and sliding window).
//!
//! `cargo bench --bench hot_path`

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tollgate::keys::{self, KeySpec, RequestView};
use tollgate::limiter::clock::MonotonicClock;
use tollgate::limiter::memory::MemoryStore;
use tollgate::limiter::{Algorithm, BucketRequest, Store};
use tollgate::routes::{HeaderFlags, PathMatch, Route, RouteMatch, Router};
use tollgate::upstream::Upstream;

fn spec(parts: &[&str]) -> KeySpec {
    KeySpec {
        parts: parts
            .iter()
            .map(|p| keys::parse_part(p).expect("key part"))
            .collect(),
    }
}

fn key_derivation(c: &mut Criterion) {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-api-key", "k-1234567890".parse().expect("header"));
    headers.insert("user-agent", "bench".parse().expect("header"));
    let ip: IpAddr = "203.0.113.9".parse().expect("ip");
    let view = RequestView {
        method: "GET",
        host: Some("api.example.com"),
        path: "/api/v1/orders",
        query: Some("user=alice&page=2"),
        headers: &headers,
        client_ip: ip,
        peer_trusted: false,
        path_params: None,
    };
    let ip_only = spec(&["ip"]);
    let composite = spec(&["header:x-api-key|ip", "query:user", "method"]);
    let mut out = String::with_capacity(128);
    c.bench_function("keys/ip", |b| {
        b.iter(|| {
            out.clear();
            keys::derive(&ip_only, black_box(&view), 64, false, &mut out)
        })
    });
    c.bench_function("keys/composite_header_query_method", |b| {
        b.iter(|| {
            out.clear();
            keys::derive(&composite, black_box(&view), 64, false, &mut out)
        })
    });
    let xff: [&[u8]; 1] = [b"198.51.100.7, 10.0.0.2"];
    let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
    c.bench_function("keys/client_ip_behind_trusted_proxies", |b| {
        b.iter(|| {
            keys::client_ip(
                black_box("10.0.0.1".parse().expect("ip")),
                xff.into_iter(),
                &trusted,
            )
        })
    });
}

fn route(i: usize, path: PathMatch) -> Arc<Route> {
    Arc::new(Route {
        name: Arc::from(format!("route-{i}").as_str()),
        matcher: RouteMatch {
            host: None,
            path,
            methods: None,
        },
        upstream: Arc::new(Upstream::new(
            "u".into(),
            Vec::new(),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )),
        shadow: false,
        limits: Vec::new(),
        headers: HeaderFlags {
            legacy: true,
            ietf: true,
        },
        stats: Default::default(),
    })
}

fn route_matching(c: &mut Criterion) {
    let routes: Vec<Arc<Route>> = (0..10_000)
        .map(|i| {
            if i % 2 == 0 {
                route(i, PathMatch::Prefix(format!("/svc-{i}/")))
            } else {
                route(i, PathMatch::Exact(format!("/exact/{i}")))
            }
        })
        .collect();
    let router = Router::new(routes.clone());
    let method = http::Method::GET;
    c.bench_function("routes/10k_indexed_last_prefix", |b| {
        b.iter(|| router.find(&method, None, black_box("/svc-9998/orders/42")))
    });
    c.bench_function("routes/10k_indexed_exact", |b| {
        b.iter(|| router.find(&method, None, black_box("/exact/9999")))
    });
    c.bench_function("routes/10k_linear_scan_last_prefix", |b| {
        b.iter(|| {
            routes.iter().find(|r| {
                r.matcher
                    .matches(&method, None, black_box("/svc-9998/orders/42"))
            })
        })
    });
}

fn memory_bucket(c: &mut Criterion) {
    // The memory store answers at once; the deadline is only part of the interface.
    let far = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
    let store = MemoryStore::new(1_000_000, Arc::new(MonotonicClock::new()));
    let one = [BucketRequest {
        key: "bench:per-ip:{203.0.113.9}".into(),
        algorithm: Algorithm::TokenBucket,
        interval_ns: 1_000,
        burst: 1_000_000_000,
        cost: 1,
    }];
    c.bench_function("memory/decide_one_bucket", |b| {
        b.iter(|| futures::executor::block_on(store.decide(black_box(&one), far)))
    });
    let three: Vec<BucketRequest> = ["a", "b", "c"]
        .iter()
        .map(|k| BucketRequest {
            key: format!("bench:{k}:{{v}}"),
            algorithm: Algorithm::TokenBucket,
            interval_ns: 1_000,
            burst: 1_000_000_000,
            cost: 1,
        })
        .collect();
    c.bench_function("memory/decide_three_buckets", |b| {
        b.iter(|| futures::executor::block_on(store.decide(black_box(&three), far)))
    });
    for (name, algorithm) in [
        ("memory/decide_one_fixed_window", Algorithm::FixedWindow),
        ("memory/decide_one_sliding_window", Algorithm::SlidingWindow),
    ] {
        let one = [BucketRequest {
            key: format!("bench:{}:{{203.0.113.9}}", algorithm.name()),
            algorithm,
            interval_ns: 60_000_000_000,
            burst: 1_000_000_000,
            cost: 1,
        }];
        c.bench_function(name, |b| {
            b.iter(|| futures::executor::block_on(store.decide(black_box(&one), far)))
        });
    }
}

criterion_group!(benches, key_derivation, route_matching, memory_bucket);
criterion_main!(benches);
