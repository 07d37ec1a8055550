//! Process lifecycle: graceful SIGTERM with a request in flight, and `tollgate demo`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{client, free_port, wait_until, Gateway, Upstream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_then_exits_zero() {
    let up = Upstream::start();
    let mut gw = Gateway::start(
        r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
server: { drain_timeout_ms: 10000 }
upstreams: { app: { targets: ["{UPSTREAM}"], read_timeout_ms: 5000 } }
routes: [ { name: r, upstream: app } ]
"#,
        up.addr,
    )
    .await;
    let url = gw.url("/slow?ms=1500");
    let in_flight = tokio::spawn(async move { client().get(url).send().await });
    wait_until(
        "the slow request to reach the upstream",
        Duration::from_secs(5),
        || {
            let hits = up.hits();
            async move { hits >= 1 }
        },
    )
    .await;
    let signalled = Instant::now();
    gw.signal("TERM");

    // New connections are refused while the old request drains.
    let proxy = gw.proxy;
    wait_until(
        "the listener to close",
        Duration::from_secs(2),
        || async move { tokio::net::TcpStream::connect(proxy).await.is_err() },
    )
    .await;
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "still running while a request is in flight"
    );

    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(resp.status(), 200);
    let code = tokio::task::block_in_place(|| wait_exit(&mut gw.child, Duration::from_secs(5)));
    assert_eq!(code, Some(0), "exit status; log:\n{}", gw.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exits once drained, not after the whole drain timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_gateway_exits_promptly_on_sigint() {
    let up = Upstream::start();
    let mut gw = Gateway::start(
        r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes: [ { name: r, upstream: app } ]
"#,
        up.addr,
    )
    .await;
    gw.signal("INT");
    let code = tokio::task::block_in_place(|| wait_exit(&mut gw.child, Duration::from_secs(5)));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_embedded_default_and_prints_curl_commands() {
    let proxy = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let upstream = format!("127.0.0.1:{}", free_port());
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(common::bin())
        .args([
            "demo",
            "--listen",
            &proxy,
            "--admin",
            &admin,
            "--upstream",
            &upstream,
        ])
        .stdout(out.reopen().unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = format!("http://{admin}/ready");
    wait_until("demo /ready", Duration::from_secs(20), || {
        let ready = ready.clone();
        async move { matches!(reqwest::get(&ready).await, Ok(r) if r.status() == 200) }
    })
    .await;
    let printed = std::fs::read_to_string(out.path()).unwrap();
    assert!(
        printed.contains(&format!("curl -i http://{proxy}/api/hello")),
        "{printed}"
    );

    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let resp = c
            .get(format!("http://{proxy}/api/hello"))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 200 {
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["path"], "/api/hello", "answered by the demo upstream");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429]);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let code = tokio::task::block_in_place(|| wait_exit(&mut child, Duration::from_secs(5)));
    assert_eq!(code, Some(0));
}
