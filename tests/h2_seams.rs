//! HTTP/2 at the seams, with a raw frame-level client (tests/py/h2_client.py, the Python `h2`
//! package): a key header padded with spaces or tabs is the same key (an HTTP/1.1 upstream
//! reads it trimmed), and an empty DATA frame never reaches an HTTP/1.1 upstream as a second
//! end of a chunked body (which would make the upstream read the next bytes as a request from
//! another client).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Gateway, Upstream};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLIENT: &str = include_str!("py/h2_client.py");

fn client(dir: &std::path::Path, port: u16, mode: &str) -> Vec<String> {
    let script = dir.join("h2_client.py");
    std::fs::write(&script, CLIENT).expect("write client");
    let out = Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .arg(mode)
        .output()
        .expect("run python3 (needs the `h2` package)");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

const YAML: &str = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
server: { h2c: true }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - name: keyed
    match: { path_prefix: "/k/" }
    upstream: app
    limits: [ { name: per-key, key: ["header:x-api-key"], rate: "1/h", burst: 2, on_missing_key: deny } ]
  - { name: free, match: { path_prefix: "/free/" }, upstream: app }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_padded_key_header_is_the_same_key() {
    let up = Upstream::start();
    let gw = Gateway::start(YAML, up.addr).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = gw.proxy.port();
    let statuses = tokio::task::spawn_blocking(move || client(dir.path(), port, "padded"))
        .await
        .unwrap();
    assert_eq!(
        statuses,
        ["200", "200", "429", "429", "429", "429", "429", "429"],
        "burst 2 for one key, however it is padded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_data_frame_ends_the_upstream_body_once() {
    // A raw HTTP/1.1 upstream that records every byte it receives.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let sink = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let sink = sink.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
                let mut answered = false;
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                        Err(_) if !answered => {
                            answered = true;
                            let _ =
                                stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                        }
                        Err(_) => break,
                    }
                }
            });
        }
    });
    let gw = Gateway::start(YAML, addr).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = gw.proxy.port();
    let status = tokio::task::spawn_blocking(move || client(dir.path(), port, "emptydata"))
        .await
        .unwrap();
    assert_eq!(status, ["200"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let bytes = received.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("POST /free/x HTTP/1.1\r\n"), "{text:?}");
    let (_, body) = text.split_once("\r\n\r\n").expect("a header block");
    assert_eq!(
        body, "3\r\nabc\r\n0\r\n\r\n",
        "one chunk, one end, nothing after it"
    );
}
