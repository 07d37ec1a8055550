//! Upstream failures and upstream connection reuse (issue 11.6, 11.7): a dead target (502), one
//! that closes without answering (502) and a slow one (504) are answered with RFC 9457 problem+json bodies and `Connection: close`; and
//! sequential traffic through pooled upstream connections (an upstream that closes idle
//! keep-alive connections, pauses around its idle time, two worker threads) succeeds with no
//! ERROR line in the gateway's log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, Gateway, Upstream};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const KEEPALIVE_UPSTREAM: &str = include_str!("py/keepalive_upstream.py");

/// One request on a fresh connection, read to EOF: (status, lower-case headers, body).
fn raw_get(proxy: SocketAddr, path: &str) -> (u16, Vec<String>, Vec<u8>) {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {status:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        headers.push(line);
    }
    // `Connection: close`: the body ends where the connection does.
    let mut body = Vec::new();
    reader.read_to_end(&mut body).unwrap();
    (code, headers, body)
}

fn header<'h>(headers: &'h [String], name: &str) -> Option<&'h str> {
    headers.iter().find_map(|h| {
        h.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

fn assert_problem(proxy: SocketAddr, path: &str, status: u16, error: &str, title: &str) {
    let (code, headers, body) = raw_get(proxy, path);
    assert_eq!(code, status, "{path}: {headers:?}");
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/problem+json"),
        "{headers:?}"
    );
    assert_eq!(
        header(&headers, "content-length"),
        Some(body.len().to_string().as_str()),
        "{headers:?}"
    );
    assert_eq!(header(&headers, "connection"), Some("close"), "{headers:?}");
    let body: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body:?}"));
    assert_eq!(body["type"], "about:blank");
    assert_eq!(body["title"], title);
    assert_eq!(body["status"], status);
    assert_eq!(body["error"], error);
}

#[tokio::test]
async fn upstream_failures_are_problem_json() {
    let up = Upstream::start();
    let dead = free_port();
    // Accepts, reads the request, and closes without answering.
    let closer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closer_addr = closer.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in closer.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
        }
    });
    let gw = Gateway::start(
        &format!(
            r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
store: {{ kind: memory }}
upstreams:
  app: {{ targets: ["{{UPSTREAM}}"], read_timeout_ms: 300 }}
  dead: {{ targets: ["127.0.0.1:{dead}"], connect_timeout_ms: 300 }}
  closer: {{ targets: ["{closer_addr}"] }}
routes:
  - {{ name: closer, match: {{ path: "/closer" }}, upstream: closer }}
  - {{ name: slow, match: {{ path: "/slow" }}, upstream: app }}
  - {{ name: dead, match: {{ path: "/dead" }}, upstream: dead }}
"#
        ),
        up.addr,
    )
    .await;
    let proxy = gw.proxy;
    tokio::task::spawn_blocking(move || {
        assert_problem(proxy, "/dead", 502, "upstream_unreachable", "Bad Gateway");
        assert_problem(proxy, "/closer", 502, "upstream_error", "Bad Gateway");
        assert_problem(
            proxy,
            "/slow?ms=3000",
            504,
            "upstream_timeout",
            "Gateway Timeout",
        );
    })
    .await
    .unwrap();
}

/// The Python upstream that closes idle keep-alive connections (killed on drop).
struct KeepAliveUpstream {
    _dir: tempfile::TempDir,
    child: Child,
    addr: SocketAddr,
}

impl KeepAliveUpstream {
    fn start(idle_secs: f64) -> KeepAliveUpstream {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("keepalive_upstream.py");
        std::fs::write(&script, KEEPALIVE_UPSTREAM).expect("write script");
        let port = free_port();
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(idle_secs.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("upstream output");
        assert_eq!(
            line.trim(),
            "ready",
            "the keep-alive upstream did not start"
        );
        KeepAliveUpstream {
            _dir: dir,
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }
}

impl Drop for KeepAliveUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn reused_upstream_connections_log_no_errors() {
    // Closes a keep-alive connection after 150 ms without a request.
    let up = KeepAliveUpstream::start(0.15);
    // Two worker threads: a pooled connection released on one is picked up on the other, where
    // Pingora 0.9.1 sometimes logs `ERROR failed to acquire reusable stream` (and connects anew).
    let gw = Gateway::start(
        r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
server: { threads: 2 }
store: { kind: memory }
upstreams:
  app: { targets: ["{UPSTREAM}"], connect_timeout_ms: 500, read_timeout_ms: 2000 }
routes:
  - { name: open, match: { path_prefix: "/" }, upstream: app }
"#,
        up.addr,
    )
    .await;
    // A new client connection per request (as curl in a loop), so requests land on both threads.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let pauses_ms = [0u64, 0, 0, 0, 0, 0, 0, 0, 100, 150, 200];
    for i in 0..240 {
        let resp = client
            .get(gw.url(&format!("/r{i}")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", gw.log()));
        assert_eq!(resp.status(), 200, "request {i}");
        let pause = pauses_ms[i % pauses_ms.len()];
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
    let log = gw.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        errors.is_empty(),
        "ERROR lines in the gateway log:\n{}",
        errors.join("\n")
    );
}
