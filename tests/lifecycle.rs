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

/// `tollgate demo` refuses an `--upstream` on the proxy's or the admin's port (spelled the
/// same or through a wildcard): the proxy would share the upstream's socket and forward to
/// itself.
#[test]
fn demo_refuses_an_upstream_on_a_listeners_port() {
    let proxy = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let wildcard_admin = admin.replace("127.0.0.1", "0.0.0.0");
    for (listen, admin, upstream) in [
        (&proxy, &admin, &proxy),
        (&proxy, &admin, &admin),
        (&proxy, &wildcard_admin, &admin),
    ] {
        let out = Command::new(common::bin())
            .args([
                "demo",
                "--listen",
                listen,
                "--admin",
                admin,
                "--upstream",
                upstream,
            ])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{listen} {admin} {upstream}: {stderr}"
        );
        assert!(
            stderr.contains("takes the port of the listener"),
            "{stderr}"
        );
    }
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

/// `/ready` answers 200 only once the proxy's listener accepts: a load balancer that sends
/// traffic the moment the gateway says ready must never be refused. (The memory store is
/// ready at once, so `/ready` used to say so before Pingora had bound the proxy's port.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_said_only_once_the_proxy_accepts() {
    let up = Upstream::start();
    for attempt in 0..10 {
        let gw = Gateway::spawn_now(
            r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes: [ { name: r, upstream: app } ]
"#,
            up.addr,
        );
        let ready = gw.admin_url("/ready");
        let c = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = c.get(&ready).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "never ready:\n{}", gw.log());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            tokio::net::TcpStream::connect(gw.proxy).await.is_ok(),
            "attempt {attempt}: /ready said 200 while the proxy port refused connections"
        );
    }
}

/// A proxy port another process holds: Pingora retries the bind every second and `/ready`
/// stays 503 "starting" all the while (no give-up into "ready"); once the port is free the
/// listener opens and `/ready` says 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_a_taken_proxy_port() {
    let up = Upstream::start();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let gw = Gateway::spawn_now(
        &format!(
            r#"
listen: ["127.0.0.1:{port}"]
admin: {{ listen: "{{ADMIN}}" }}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes: [ {{ name: r, upstream: app }} ]
"#
        ),
        up.addr,
    );
    let ready = gw.admin_url("/ready");
    let c = reqwest::Client::new();
    let status = || async {
        c.get(&ready)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    // The admin listener answers; the proxy's port is someone else's for 2.5 s.
    let mut answered = 0;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        match status().await {
            0 => {}
            code => {
                assert_eq!(
                    code,
                    503,
                    "ready while the proxy port is another's:\n{}",
                    gw.log()
                );
                answered += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answered > 10,
        "the admin listener answered {answered} times"
    );
    drop(holder);
    wait_until(
        "ready once the port is free",
        Duration::from_secs(10),
        || async { status().await == 200 },
    )
    .await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// An admin port another process never gives up: the proxy never opens (nothing is taken that
/// the exit would cut), and after Pingora's 30 s of retries the gateway exits with code 1 and
/// says why, instead of running on without its admin listener (never ready, no `/metrics`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_never_opens_ends_the_process() {
    let up = Upstream::start();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let mut gw = Gateway::spawn_now(
        &format!(
            r#"
listen: ["{{PROXY}}"]
admin: {{ listen: "127.0.0.1:{port}" }}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes: [ {{ name: r, upstream: app }} ]
"#
        ),
        up.addr,
    );
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = gw.child.try_wait().expect("wait") {
            break status;
        }
        // Nothing is served meanwhile: the proxy's listener waits for the admin's.
        assert!(
            std::net::TcpStream::connect(gw.proxy).is_err(),
            "the proxy accepts while the admin port is another's:\n{}",
            gw.log()
        );
        assert!(
            Instant::now() < until,
            "still running after 60 s with its admin port taken:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = gw.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("a listener could not be opened; stopping")
            && log.contains(&format!("127.0.0.1:{port}")),
        "{log}"
    );
    drop(holder);
}
