//! No way around a limit: every spelling of one request meets the same route, the same bucket
//! and the same upstream resource; the admin token guards every spelling of every mutating
//! endpoint; one key source cannot name another's bucket; repeated key sources are refused;
//! a client cannot lower its own cost. Requests are written on raw TCP, byte for byte, since
//! HTTP client libraries normalise paths themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Gateway, Upstream};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One response read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Sends `head` (request line and headers, without the blank line) plus `body` on a fresh
/// connection with `Connection: close`, and reads the whole reply.
fn raw(addr: SocketAddr, head: &str, body: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let request = format!("{head}\r\nConnection: close\r\n\r\n{body}");
    stream.write_all(request.as_bytes()).expect("write");
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    // The upstream and the gateway both answer with Content-Length or chunked; the JSON body
    // of a chunked reply sits between its size lines.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.lines()
            .filter(|l| l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("")
    } else {
        body.to_string()
    };
    Reply {
        status,
        head: head.to_string(),
        body,
    }
}

fn get(addr: SocketAddr, target: &str, extra: &str) -> Reply {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!("\r\n{extra}")
    };
    raw(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: a{extra}"),
        "",
    )
}

const ROUTES: &str = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}", token: "s3cret" }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - name: report
    match: { path: "/static/report.txt" }
    upstream: app
    limits: [ { name: per-ip, key: ["ip"], rate: "2/h", burst: 2 } ]
  - name: login
    match: { path_prefix: "/login", methods: ["POST"] }
    upstream: app
    limits: [ { name: per-ip, key: ["ip"], rate: "1/h", burst: 1 } ]
  - name: hosted
    match: { host: "api.example.com", path: "/hosted" }
    upstream: app
    limits: [ { name: per-ip, key: ["ip"], rate: "1/h", burst: 1 } ]
  - name: users
    match: { path_regex: "^/users/(?P<id>[^/]+)$" }
    upstream: app
    limits: [ { name: per-user, key: ["path_param:id"], rate: "1/h", burst: 1 } ]
  - { name: open, upstream: app }
"#;

/// Paths, hosts and methods: every spelling meets the limit, and the upstream is sent the
/// normal form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_resource_meets_its_limit() {
    let up = Upstream::start();
    let gw = Gateway::start(ROUTES, up.addr).await;
    let p = gw.proxy;
    tokio::task::spawn_blocking(move || {
        // The plain spelling drains the bucket (burst 2)...
        for _ in 0..2 {
            assert_eq!(get(p, "/static/report.txt", "").status, 200);
        }
        // ...and no other spelling gets past it to the unlimited catch-all.
        for spelling in [
            "/static/report.txt",
            "/static//report.txt",
            "//static/report.txt",
            "/static/./report.txt",
            "/static/%72eport.txt",
            "/static/x/../report.txt",
            "/%73tatic/report%2etxt",
            "/static/%2E/report.txt",
            "/a/../static/report.txt?x=1",
        ] {
            let reply = get(p, spelling, "");
            assert_eq!(reply.status, 429, "{spelling}: {reply:?}");
        }
        // An absolute-form target is the same resource.
        let absolute = get(p, "http://a/static/./report.txt", "");
        assert_eq!(absolute.status, 429, "{absolute:?}");
        // HTTP/1.0 without a Host meets the same limit.
        let old_http = raw(p, "GET /static//report.txt HTTP/1.0", "");
        assert_eq!(old_http.status, 429, "{old_http:?}");

        // A target that is neither origin- nor absolute-form never reaches the upstream.
        for (line, extra) in [
            ("GET static/report.txt HTTP/1.1", "\r\nHost: a"),
            ("GET ./static/report.txt HTTP/1.1", "\r\nHost: a"),
            ("GET ../static/report.txt HTTP/1.1", "\r\nHost: a"),
            ("GET static%2freport.txt HTTP/1.1", "\r\nHost: a"),
            ("GET x:/static/report.txt HTTP/1.1", "\r\nHost: a"),
            ("GET * HTTP/1.1", "\r\nHost: a"),
            ("GET static/report.txt HTTP/1.0", ""),
        ] {
            let reply = raw(p, &format!("{line}{extra}"), "");
            assert_eq!(reply.status, 400, "{line}: {reply:?}");
        }

        // The upstream sees the normal form the limiter saw, query kept as sent.
        let echo = get(p, "/other//x/./y/../%7a?q=%41&b", "").json();
        assert_eq!(echo["path"], "/other/x/z", "{echo}");
        assert_eq!(echo["query"], "q=%41&b", "{echo}");

        // A lower-case method does not skip a methods: ["POST"] route, and the upstream
        // sees the method the limiter saw.
        let first = raw(
            p,
            "POST /login HTTP/1.1\r\nHost: a\r\nContent-Length: 0",
            "",
        );
        assert_eq!(first.status, 200, "{first:?}");
        for method in ["post", "Post", "POST"] {
            let reply = raw(
                p,
                &format!("{method} /login HTTP/1.1\r\nHost: a\r\nContent-Length: 0"),
                "",
            );
            assert_eq!(reply.status, 429, "{method}: {reply:?}");
        }
        let echo = raw(p, "get /x HTTP/1.1\r\nHost: a", "").json();
        assert_eq!(echo["method"], "GET", "{echo}");

        // Host: case, port and a trailing dot do not miss a host-scoped route.
        assert_eq!(get(p, "/hosted", "").status, 200, "Host: a is not the host");
        let host = |h: &str| raw(p, &format!("GET /hosted HTTP/1.1\r\nHost: {h}"), "");
        assert_eq!(host("api.example.com").status, 200);
        for spelling in [
            "api.example.com.",
            "API.Example.COM",
            "api.example.com:8080",
            "api.example.com.:80",
        ] {
            let reply = host(spelling);
            assert_eq!(reply.status, 429, "Host: {spelling}: {reply:?}");
        }

        // A Host an upstream could read otherwise is refused, not sent to a catch-all route.
        for spelling in [
            "api.example.com:abc",
            "api.example.com:80:80",
            "API.example.com:x",
            "api.example.com..",
            "api.example.com/x",
            "api.example.com;x",
            "",
        ] {
            let reply = host(spelling);
            assert_eq!(reply.status, 400, "Host: {spelling}: {reply:?}");
            assert_eq!(reply.json()["error"], "bad_host", "{spelling}");
        }
        let no_host = raw(p, "GET /hosted HTTP/1.1\r\nX-Other: 1", "");
        assert_eq!(no_host.status, 400, "HTTP/1.1 without Host: {no_host:?}");

        // path_param values are decoded: b%6fb is bob.
        assert_eq!(get(p, "/users/bob", "").status, 200);
        let reply = get(p, "/users/b%6fb", "");
        assert_eq!(reply.status, 429, "{reply:?}");
        assert_eq!(get(p, "/users/b%6Fb", "").status, 429);
    })
    .await
    .unwrap();
}

/// An encoded `/` or `\`: 400 by default; `keep` leaves it inside its segment, `decode` makes
/// it a separator before the path is resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_slashes_follow_the_configured_policy() {
    let up = Upstream::start();
    let gw = Gateway::start(ROUTES, up.addr).await;
    let p = gw.proxy;
    tokio::task::spawn_blocking(move || {
        for spelling in [
            "/static%2Freport.txt",
            "/static%2freport.txt",
            "/static%5Creport.txt",
            "/x/..%2Fstatic/report.txt",
            "/bad%zz",
            "/bad%4",
        ] {
            let reply = get(p, spelling, "");
            assert_eq!(reply.status, 400, "{spelling}: {reply:?}");
            assert!(
                reply
                    .head
                    .to_ascii_lowercase()
                    .contains("content-type: application/problem+json"),
                "{reply:?}"
            );
            let body = reply.json();
            assert!(
                body["error"] == "escaped_slash" || body["error"] == "bad_percent_encoding",
                "{body}"
            );
        }
    })
    .await
    .unwrap();
    drop(gw);

    for (policy, spelling, want_path, want_status) in [
        ("keep", "/static%2freport.txt", "/static%2Freport.txt", 200),
        ("decode", "/static%2freport.txt", "/static/report.txt", 200),
        (
            "decode",
            "/x/..%2Fstatic%5Creport.txt",
            "/static/report.txt",
            200,
        ),
    ] {
        let yaml = ROUTES.replace(
            "upstreams:",
            &format!("server: {{ escaped_slashes: {policy} }}\nupstreams:"),
        );
        let gw = Gateway::start(&yaml, up.addr).await;
        let p = gw.proxy;
        let spelling = spelling.to_string();
        let (reply, routed) = tokio::task::spawn_blocking(move || {
            let reply = get(p, &spelling, "");
            let routed = common_route_of(p, &spelling);
            (reply, routed)
        })
        .await
        .unwrap();
        assert_eq!(reply.status, want_status, "{policy} {reply:?}");
        assert_eq!(reply.json()["path"], want_path, "{policy}");
        let want_route = if policy == "decode" { "report" } else { "open" };
        assert_eq!(routed, want_route, "{policy}");
    }
}

/// Which route took a request: the report route answers 429 once its bucket (burst 2) is
/// drained, the open route never does.
fn common_route_of(p: SocketAddr, target: &str) -> &'static str {
    let statuses: Vec<u16> = (0..3).map(|_| get(p, target, "").status).collect();
    if statuses.contains(&429) {
        "report"
    } else {
        "open"
    }
}

/// The admin API: one normal path decides both the endpoint and whether the token is needed,
/// and the `Bearer` scheme is case-insensitive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_every_spelling() {
    let up = Upstream::start();
    let gw = Gateway::start(ROUTES, up.addr).await;
    let a = gw.admin;
    let p = gw.proxy;
    tokio::task::spawn_blocking(move || {
        let tokens = || -> u64 {
            let reply = get(a, "/v1/limits/report/per-ip?key=127.0.0.1", "");
            assert_eq!(reply.status, 200, "{reply:?}");
            reply.json()["tokens"].as_u64().expect("tokens")
        };
        assert_eq!(tokens(), 2);
        let check = r#"{"route": "report", "key": {"ip": "127.0.0.1"}}"#;
        let post = |path: &str, auth: &str| {
            let auth = if auth.is_empty() {
                String::new()
            } else {
                format!("\r\nAuthorization: {auth}")
            };
            raw(
                a,
                &format!(
                    "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}{auth}",
                    check.len()
                ),
                check,
            )
        };
        for path in [
            "/v1/check",
            "//v1/check",
            "/v1//check",
            "/./v1/check",
            "/v1/%63heck",
            "/x/../v1/check",
            "/v1/check/",
        ] {
            for auth in ["", "Bearer wrong", "Basic czNjcmV0", "Bearer", "s3cret"] {
                let reply = post(path, auth);
                assert_eq!(reply.status, 401, "POST {path} [{auth}]: {reply:?}");
            }
        }
        assert_eq!(tokens(), 2, "no unauthorised check drained the bucket");

        // Drain the bucket through the proxy, then try to reset it without the token.
        for _ in 0..2 {
            assert_eq!(get(p, "/static/report.txt", "").status, 200);
        }
        assert_eq!(tokens(), 0);
        for path in [
            "/v1/limits/report/per-ip?key=127.0.0.1",
            "//v1/limits/report/per-ip?key=127.0.0.1",
            "/v1//limits/report/per-ip?key=127.0.0.1",
            "/v1/limits/./report/per-ip?key=127.0.0.1",
            "/v1/limits/%72eport/per-ip?key=127.0.0.1",
        ] {
            for method in ["DELETE", "delete"] {
                let reply = raw(a, &format!("{method} {path} HTTP/1.1\r\nHost: a"), "");
                assert_eq!(reply.status, 401, "{method} {path}: {reply:?}");
            }
        }
        assert_eq!(tokens(), 0, "no unauthorised reset");

        // The scheme is case-insensitive; the token is not.
        for auth in ["bearer s3cret", "BEARER s3cret", "Bearer   s3cret"] {
            let reply = post("//v1/check", auth);
            assert_eq!(reply.status, 200, "[{auth}]: {reply:?}");
        }
        assert_eq!(post("/v1/check", "Bearer S3CRET").status, 401);
        let reset = raw(
            a,
            "DELETE //v1/limits/report/per-ip?key=127.0.0.1 HTTP/1.1\r\nHost: a\r\nAuthorization: bearer s3cret",
            "",
        );
        assert_eq!(reset.status, 200, "{reset:?}");
        assert_eq!(tokens(), 2);

        // A request Pingora cannot parse is logged without its credentials.
        // (Pingora closes such a connection without an answer.)
        for auth in [
            "Authorization: Bearer s3cret",
            "Authorization:\tBearer s3cret",
            "Authorization : Bearer s3cret",
        ] {
            let mut bad = TcpStream::connect(a).expect("connect");
            bad.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let request = format!(
                "DELETE /v1/limits/report/per-ip?key=127.0.0.1 HTTP/1.1\r\nHost: a\r\n{auth}\r\nX Bad: 1\r\n\r\n"
            );
            bad.write_all(request.as_bytes()).expect("write");
            let _ = bad.read_to_end(&mut Vec::new());
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = gw.log();
    assert!(!log.contains("s3cret"), "the token is in the log:\n{log}");
    assert!(
        log.contains("Authorization: [redacted]"),
        "the unparsable request was logged, redacted:\n{log}"
    );
}

const KEYS: &str = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - name: either
    match: { path: "/either" }
    upstream: app
    limits: [ { name: l, key: ["header:x-api-key|ip"], rate: "3/h", burst: 3 } ]
  - name: anon
    match: { path: "/anon" }
    upstream: app
    limits: [ { name: l, key: ["header:x-user"], rate: "1/h", burst: 1, on_missing_key: anonymous } ]
  - name: dup
    match: { path: "/dup" }
    upstream: app
    limits: [ { name: l, key: ["header:x-api-key", "query:user"], rate: "100/h", burst: 100 } ]
  - name: tagged
    match: { path: "/tagged" }
    upstream: app
    limits: [ { name: l, key: ["ip"], rate: "1/h", burst: 1, overrides: { "ip=127.0.0.1": { burst: 4 } } } ]
  - name: cost
    match: { path: "/cost" }
    upstream: app
    limits: [ { name: l, key: ["ip"], rate: "2/h", burst: 2, cost_header: X-Cost } ]
"#;

/// Which alternative matched is part of the bucket: a header that spells the client's IP, or
/// the anonymous bucket's name, has its own bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_source_cannot_name_another_sources_bucket() {
    let up = Upstream::start();
    let gw = Gateway::start(KEYS, up.addr).await;
    let p = gw.proxy;
    let a = gw.admin;
    tokio::task::spawn_blocking(move || {
        // An attacker sends the victim's IP (this client's own, 127.0.0.1) as an API key.
        for _ in 0..3 {
            assert_eq!(get(p, "/either", "X-Api-Key: 127.0.0.1").status, 200);
        }
        assert_eq!(get(p, "/either", "X-Api-Key: 127.0.0.1").status, 429);
        let reply = get(p, "/either", "");
        assert_eq!(reply.status, 200, "the IP's own bucket is full: {reply:?}");
        // Also spelled as the tag itself.
        assert_eq!(get(p, "/either", "X-Api-Key: ip=127.0.0.1").status, 200);

        // The admin API names a bucket of a part with alternatives by its source.
        let read = |key: &str| get(a, &format!("/v1/limits/either/l?key={key}"), "");
        assert_eq!(read("ip=127.0.0.1").json()["tokens"], 2);
        assert_eq!(read("header:x-api-key=127.0.0.1").json()["tokens"], 0);
        let untagged = read("127.0.0.1");
        assert_eq!(untagged.status, 400, "{untagged:?}");
        // A value for an ip source that is no IP names no bucket.
        let not_ip = read("ip=not-an-ip");
        assert_eq!(not_ip.status, 400, "{not_ip:?}");

        // An override may name its single source too: `ip=127.0.0.1` is this client.
        for _ in 0..4 {
            assert_eq!(get(p, "/tagged", "").status, 200);
        }
        assert_eq!(get(p, "/tagged", "").status, 429);

        // A header value "anonymous" is not the anonymous bucket.
        assert_eq!(get(p, "/anon", "X-User: anonymous").status, 200);
        assert_eq!(get(p, "/anon", "X-User: #anonymous").status, 200);
        let reply = get(p, "/anon", "");
        assert_eq!(reply.status, 200, "anonymous has its own bucket: {reply:?}");
        assert_eq!(get(p, "/anon", "").status, 429);
    })
    .await
    .unwrap();
}

/// A key header or parameter repeated with different values is refused (the upstream might
/// read the other one); identical repeats are one value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_key_sources_with_different_values_are_refused() {
    let up = Upstream::start();
    let gw = Gateway::start(KEYS, up.addr).await;
    let p = gw.proxy;
    let hits_before = up.hits();
    tokio::task::spawn_blocking(move || {
        for (target, headers) in [
            ("/dup?user=u", "X-Api-Key: a\r\nX-Api-Key: b"),
            ("/dup?user=u", "X-Api-Key: a\r\nx-api-key: "),
            ("/dup?user=a&user=b", "X-Api-Key: a"),
            ("/dup?user=a&us%65r=b", "X-Api-Key: a"),
            ("/dup?user=a&user=", "X-Api-Key: a"),
        ] {
            let reply = get(p, target, headers);
            assert_eq!(reply.status, 400, "{target} [{headers}]: {reply:?}");
            assert_eq!(reply.json()["error"], "ambiguous_key");
        }
        for (target, headers) in [
            ("/dup?user=u", "X-Api-Key: a\r\nX-Api-Key: a"),
            ("/dup?user=u&user=u", "X-Api-Key: a"),
            ("/dup?user=u&us%65r=u", "X-Api-Key: a"),
        ] {
            let reply = get(p, target, headers);
            assert_eq!(reply.status, 200, "{target} [{headers}]: {reply:?}");
        }
    })
    .await
    .unwrap();
    assert_eq!(
        up.hits() - hits_before,
        3,
        "no refused request went upstream"
    );
}

/// `cost_header` is believed only from a trusted proxy unless the limit opts in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_lower_its_own_cost() {
    let up = Upstream::start();
    let gw = Gateway::start(KEYS, up.addr).await;
    let p = gw.proxy;
    tokio::task::spawn_blocking(move || {
        // Burst 2 at cost 1: a client claiming cost 0 still pays 1.
        for _ in 0..2 {
            assert_eq!(get(p, "/cost", "X-Cost: 0").status, 200);
        }
        let reply = get(p, "/cost", "X-Cost: 0");
        assert_eq!(reply.status, 429, "{reply:?}");
    })
    .await
    .unwrap();
    drop(gw);

    // From a trusted proxy the header is believed.
    let trusted = KEYS.replace(
        "upstreams:",
        "client_ip: { trusted_proxies: [\"127.0.0.1/32\"] }\nupstreams:",
    );
    let gw = Gateway::start(&trusted, up.addr).await;
    let p = gw.proxy;
    tokio::task::spawn_blocking(move || {
        for _ in 0..5 {
            assert_eq!(get(p, "/cost", "X-Cost: 0").status, 200);
        }
        assert_eq!(get(p, "/cost", "X-Cost: 2").status, 200);
        assert_eq!(get(p, "/cost", "X-Cost: 1").status, 429);
        // A proxy that appends its value behind the client's: two values are refused.
        let appended = get(p, "/cost", "X-Cost: 0\r\nX-Cost: 5");
        assert_eq!(appended.status, 400, "{appended:?}");
        assert_eq!(appended.json()["error"], "ambiguous_key");
    })
    .await
    .unwrap();
}
