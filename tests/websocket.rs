//! WebSocket through the gateway (issue 11.5), with the Python `websockets` package as both the
//! client and the upstream echo server (tests/py, written into a temp dir and run with python3):
//! an upgrade is limited like any request (a denied one gets the 429 problem and no upgrade),
//! an allowed one carries frames both ways until either side closes, and an idle one lives as
//! long as the upstream's `read_timeout_ms` allows (pings keep it open).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, Gateway};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ECHO_SERVER: &str = include_str!("py/ws_echo_server.py");
const CLIENT: &str = include_str!("py/ws_client.py");

/// The Python scripts in a temp dir, and the echo upstream running from it (killed on drop).
struct Py {
    dir: tempfile::TempDir,
    server: Child,
    addr: SocketAddr,
}

impl Py {
    fn start() -> Py {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ws_echo_server.py"), ECHO_SERVER).expect("write server");
        std::fs::write(dir.path().join("ws_client.py"), CLIENT).expect("write client");
        let port = free_port();
        let mut server = Command::new("python3")
            .arg(dir.path().join("ws_echo_server.py"))
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (the tests need python3 with the `websockets` package)");
        let mut line = String::new();
        let stdout = server.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("echo server output");
        assert!(
            line.starts_with("ready"),
            "the WebSocket echo server did not start (is `pip install websockets` done?): {line:?}"
        );
        Py {
            dir,
            server,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    fn client_path(&self) -> PathBuf {
        self.dir.path().join("ws_client.py")
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Runs the client script; returns its result line, panicking (with its output) on failure.
fn run_client(script: &Path, gw: &Gateway, args: &[&str]) -> String {
    let url = format!("ws://{}/ws", gw.proxy);
    let out = Command::new("python3")
        .arg(script)
        .arg(&url)
        .args(args)
        .output()
        .expect("run python3 client");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "client {args:?} failed: {stdout}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    stdout
}

fn config(read_timeout_ms: u64, burst: u64) -> String {
    format!(
        r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "{{ADMIN}}" }}
store: {{ kind: memory }}
upstreams:
  ws: {{ targets: ["{{UPSTREAM}}"], connect_timeout_ms: 500, read_timeout_ms: {read_timeout_ms} }}
routes:
  - name: ws
    match: {{ path_prefix: "/ws" }}
    upstream: ws
    limits: [ {{ name: per-ip, key: ["ip"], rate: "1/m", burst: {burst} }} ]
"#
    )
}

fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" ERROR ")).collect()
}

#[tokio::test]
async fn websocket_frames_flow_both_ways_until_either_side_closes() {
    let py = Py::start();
    let gw = Gateway::start(&config(5000, 100), py.addr).await;
    // Text, binary, a 4 MiB message, 2000 messages in order, then a close from the client.
    assert_eq!(run_client(&py.client_path(), &gw, &["echo"]), "ok");
    // A close from the upstream (code 4001, reason "bye") reaches the client.
    assert_eq!(run_client(&py.client_path(), &gw, &["server-close"]), "ok");
    // Both were counted as allowed requests answered 101.
    assert_eq!(
        gw.metric(r#"tollgate_requests_total{decision="allowed",route="ws"}"#)
            .await,
        Some(2.0)
    );
    let log = gw.log();
    assert!(error_lines(&log).is_empty(), "ERROR lines:\n{log}");
}

#[tokio::test]
async fn websocket_upgrades_are_rate_limited_like_requests() {
    let py = Py::start();
    let gw = Gateway::start(&config(5000, 2), py.addr).await;
    // Burst 2: two handshakes pass, the third is refused with 429.
    assert_eq!(
        run_client(&py.client_path(), &gw, &["statuses", "3"]),
        "101 101 429"
    );
    // A refused upgrade is the normal 429 problem, with no upgrade: the connection stays HTTP.
    let mut stream = TcpStream::connect(gw.proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.proxy
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 429"), "{status:?}");
    let mut headers = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        headers.push(line);
    }
    assert!(
        !headers.iter().any(|h| h.starts_with("upgrade:")),
        "a refused upgrade must not upgrade: {headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|h| h == "content-type: application/problem+json"),
        "{headers:?}"
    );
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(
        gw.metric(r#"tollgate_requests_total{decision="limited",route="ws"}"#)
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn an_idle_websocket_lives_as_long_as_the_read_timeout_allows() {
    let py = Py::start();
    let gw = Gateway::start(&config(1000, 100), py.addr).await;
    // Client pings every 300 ms: the upstream's pongs are upstream data, so a 2.5 s pause on a
    // route with read_timeout_ms 1000 does not close the connection.
    assert_eq!(
        run_client(&py.client_path(), &gw, &["idle-ping", "2.5", "0.3"]),
        "alive after"
    );
    // No pings: after read_timeout_ms without a byte from the upstream the gateway closes both
    // connections (no close frame: the client sees 1006), as NGINX's proxy_read_timeout does.
    let started = Instant::now();
    assert_eq!(
        run_client(&py.client_path(), &gw, &["idle", "2.5"]),
        "closed none"
    );
    assert!(started.elapsed() >= Duration::from_millis(2500));
    // An idle close is logged at INFO, not as Pingora's `ERROR Fail to proxy`, and is not an
    // upstream error.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("upgraded connection closed") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gw.log();
    assert!(log.contains("upgraded connection closed"), "{log}");
    assert!(error_lines(&log).is_empty(), "ERROR lines:\n{log}");
    assert_eq!(
        gw.metric(r#"tollgate_upstream_responses_total{class="error",route="ws"}"#)
            .await
            .unwrap_or(0.0),
        0.0
    );
}
