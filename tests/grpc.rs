//! gRPC through the gateway (issue 11): a Python grpcio client calls a Python grpcio server
//! behind Tollgate, h2c both ways (`server.h2c: true`, `upstreams.NAME.http2: true`). Unary and
//! server-streaming calls pass with their messages and trailing metadata intact; a call the
//! gateway refuses gets a gRPC status (trailers-only response) instead of an HTTP error:
//! RESOURCE_EXHAUSTED with the rate-limit metadata, UNIMPLEMENTED for no route, UNAVAILABLE
//! when the upstream cannot be reached. The scripts (tests/grpc/*.py, raw-bytes generic
//! handlers, no code generation) are written into a temp dir by the test. Needs `grpcio`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, Gateway};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const SERVER_PY: &str = include_str!("grpc/server.py");
const CLIENT_PY: &str = include_str!("grpc/client.py");

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python gRPC server on a free loopback port (h2c; TLS with `tls` = (cert, key));
/// returns once it serves.
fn grpc_server(dir: &Path, tls: Option<(&str, &str)>) -> (Proc, SocketAddr) {
    let script = dir.join("server.py");
    std::fs::write(&script, SERVER_PY).unwrap();
    let port = free_port();
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .args(tls.iter().flat_map(|(c, k)| [dir.join(c), dir.join(k)]))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python3 grpc server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready line");
    assert_eq!(
        line.trim(),
        format!("ready {port}"),
        "grpc server did not start"
    );
    (Proc(child), format!("127.0.0.1:{port}").parse().unwrap())
}

/// Runs the client's `calls` over one channel to the gateway; one JSON result per call.
fn calls(dir: &Path, gw: &Gateway, calls: &[&str]) -> Vec<Value> {
    let script = dir.join("client.py");
    std::fs::write(&script, CLIENT_PY).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(gw.proxy.to_string())
        .args(calls)
        .output()
        .expect("run python3 grpc client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(results.len(), calls.len(), "{results:?}");
    results
}

/// The value of metadata `key` in `which` ("initial" or "trailing").
fn md<'a>(result: &'a Value, which: &str, key: &str) -> Option<&'a str> {
    result[which]
        .as_array()?
        .iter()
        .find(|pair| pair[0] == key)
        .and_then(|pair| pair[1].as_str())
}

const CONFIG: &str = r#"listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
server: { h2c: true }
upstreams:
  grpc: { targets: ["{UPSTREAM}"], http2: true }
  down: { targets: ["127.0.0.1:DOWN"], http2: true, connect_timeout_ms: 500 }
routes:
  - name: unary
    match: { path: /test.Echo/Unary }
    upstream: grpc
    limits: [ { name: per-call, key: [ip], rate: 1/m, burst: 2 } ]
  - { name: echo, match: { path_prefix: /test.Echo/ }, upstream: grpc }
  - { name: down, match: { path_prefix: /down.Svc/ }, upstream: down }
"#;

async fn setup() -> (tempfile::TempDir, Proc, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = grpc_server(dir.path(), None);
    let config = CONFIG.replace("DOWN", &free_port().to_string());
    let gw = Gateway::start(&config, addr).await;
    (dir, server, gw)
}

#[tokio::test]
async fn unary_allowed_then_denied_with_resource_exhausted_and_rate_limit_metadata() {
    let (dir, _server, gw) = setup().await;
    let r = calls(
        dir.path(),
        &gw,
        &[
            "unary:a",
            "unary:b",
            "unary:c",
            "unary:d",
            "raw:/other.Svc/Nope",
        ],
    );
    for (i, ok) in r[..2].iter().enumerate() {
        assert_eq!(ok["code"], "OK", "{ok}\n{}", gw.log());
        assert_eq!(ok["responses"][0], format!("echo:{}", ["a", "b"][i]));
        assert_eq!(md(ok, "trailing", "x-trailer"), Some("unary-done"), "{ok}");
        assert_eq!(md(ok, "initial", "x-ratelimit-limit"), Some("2"), "{ok}");
        let remaining = (1 - i).to_string();
        assert_eq!(
            md(ok, "initial", "x-ratelimit-remaining"),
            Some(remaining.as_str())
        );
    }
    for denied in &r[2..4] {
        assert_eq!(
            denied["code"],
            "RESOURCE_EXHAUSTED",
            "{denied}\n{}",
            gw.log()
        );
        let details = denied["details"].as_str().unwrap();
        assert!(
            details.starts_with("rate limited (per-call); retry after "),
            "{denied}"
        );
        // Trailers-only: the metadata arrives with the status.
        assert_eq!(
            md(denied, "trailing", "x-ratelimit-limit"),
            Some("2"),
            "{denied}"
        );
        assert_eq!(md(denied, "trailing", "x-ratelimit-remaining"), Some("0"));
        assert_eq!(
            md(denied, "trailing", "ratelimit-policy"),
            Some("\"per-call\";q=2;w=120")
        );
        assert!(md(denied, "trailing", "ratelimit").is_some(), "{denied}");
        assert!(md(denied, "trailing", "retry-after").is_some(), "{denied}");
    }
    // No route: the gateway's UNIMPLEMENTED (the server's own would say "Method not found!").
    assert_eq!(r[4]["code"], "UNIMPLEMENTED", "{}", r[4]);
    assert_eq!(r[4]["details"], "no route for this call");
}

#[tokio::test]
async fn server_streaming_and_trailing_metadata_pass_intact() {
    let (dir, _server, gw) = setup().await;
    let r = calls(dir.path(), &gw, &["stream:5", "stream:0", "unary:x"]);
    assert_eq!(r[0]["code"], "OK", "{}\n{}", r[0], gw.log());
    assert_eq!(
        r[0]["responses"],
        serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"])
    );
    assert_eq!(md(&r[0], "trailing", "x-trailer"), Some("stream-done"));
    assert_eq!(md(&r[0], "trailing", "x-count"), Some("5"));
    assert_eq!(r[1]["code"], "OK", "{}", r[1]);
    assert_eq!(r[1]["responses"], serde_json::json!([]));
    assert_eq!(md(&r[1], "trailing", "x-count"), Some("0"));
    assert_eq!(r[2]["responses"][0], "echo:x");
    assert_eq!(md(&r[2], "trailing", "x-trailer"), Some("unary-done"));
}

#[tokio::test]
async fn unreachable_upstream_is_unavailable() {
    let (dir, _server, gw) = setup().await;
    let r = calls(dir.path(), &gw, &["raw:/down.Svc/Call", "unary:still-fine"]);
    assert_eq!(r[0]["code"], "UNAVAILABLE", "{}\n{}", r[0], gw.log());
    assert!(
        r[0]["details"]
            .as_str()
            .unwrap()
            .starts_with("gateway: upstream failed"),
        "{}",
        r[0]
    );
    assert_eq!(r[1]["code"], "OK", "{}", r[1]);
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn grpc_to_a_tls_upstream_negotiates_h2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=gRPC Test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=grpc.test",
        ],
    );
    std::fs::write(d.join("ext.cnf"), "subjectAltName=DNS:grpc.test\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let (_server, addr) = grpc_server(d, Some(("srv.pem", "srv.key")));
    let config = format!(
        "listen: [\"{{PROXY}}\"]\nadmin: {{ listen: \"{{ADMIN}}\" }}\nserver: {{ h2c: true }}\nupstreams:\n  grpcs: {{ targets: [\"{{UPSTREAM}}\"], http2: true, tls: {{ ca: {}, sni: grpc.test }} }}\nroutes:\n  - {{ name: echo, match: {{ path_prefix: /test.Echo/ }}, upstream: grpcs }}\n",
        d.join("ca.pem").display()
    );
    let gw = Gateway::start(&config, addr).await;
    let r = calls(d, &gw, &["unary:tls", "stream:2"]);
    assert_eq!(r[0]["code"], "OK", "{}\n{}", r[0], gw.log());
    assert_eq!(r[0]["responses"][0], "echo:tls");
    assert_eq!(md(&r[0], "trailing", "x-trailer"), Some("unary-done"));
    assert_eq!(r[1]["responses"], serde_json::json!(["item-0", "item-1"]));
    assert_eq!(md(&r[1], "trailing", "x-count"), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_outage_with_fallback_deny_is_unavailable() {
    let mut redis = common::redis::RedisProcess::standalone();
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = grpc_server(dir.path(), None);
    let config = format!(
        r#"listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
server: {{ h2c: true }}
store: {{ kind: redis, redis: {{ urls: ["{}"] }} }}
breaker: {{ failure_threshold: 3, open_ms: 300, fallback: deny, fallback_instances: 1 }}
upstreams: {{ grpc: {{ targets: ["{{UPSTREAM}}"], http2: true }} }}
routes:
  - {{ name: echo, match: {{ path_prefix: /test.Echo/ }}, upstream: grpc, limits: [ {{ name: per-ip, key: [ip], rate: 10/s, burst: 10 }} ] }}
"#,
        redis.url()
    );
    let gw = Gateway::start(&config, addr).await;
    assert_eq!(calls(dir.path(), &gw, &["unary:up"])[0]["code"], "OK");
    redis.kill();
    let r = calls(
        dir.path(),
        &gw,
        &["unary:a", "unary:b", "unary:c", "unary:d"],
    );
    for denied in &r {
        assert_eq!(denied["code"], "UNAVAILABLE", "{denied}\n{}", gw.log());
        assert_eq!(denied["details"], "the rate limiter is unavailable");
        assert!(md(denied, "trailing", "retry-after").is_some(), "{denied}");
    }
}
