//! Deployment files checked with the real tools: `promtool check config` on the scrape config,
//! `promtool check metrics` on a live /metrics, the compose/Grafana files for consistency, and a
//! real Prometheus scraping a live gateway under traffic, evaluating every dashboard query.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{client, free_port, wait_until, Gateway, Upstream};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn tool(name: &str) -> Command {
    assert!(
        Command::new("which")
            .arg(name)
            .output()
            .unwrap()
            .status
            .success(),
        "{name} is not installed (Debian package `prometheus`; .ci/run installs it)"
    );
    Command::new(name)
}

const CONFIG: &str = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
upstreams: { app: { targets: ["{UPSTREAM}"] } }
routes:
  - { name: api, match: { path_prefix: "/api" }, upstream: app, limits: [ { name: per-key, key: ["header:x-k"], rate: "10/s", burst: 5 } ] }
  - { name: open, upstream: app }
"#;

/// Some allowed, some limited, on two routes.
async fn traffic(gw: &Gateway, round: usize) {
    let c = client();
    for i in 0..30 {
        let _ = c
            .get(gw.url("/api/x"))
            .header("x-k", format!("k{}", (i + round) % 3))
            .send()
            .await;
        let _ = c.get(gw.url("/open")).send().await;
    }
}

#[test]
fn promtool_accepts_the_scrape_config() {
    let out = tool("promtool")
        .args(["check", "config"])
        .arg(repo("config/prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_live_metrics() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    traffic(&gw, 0).await;
    let text = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut child = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_prometheus_and_grafana_files_agree() {
    let compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo("docker-compose.yml")).unwrap())
            .unwrap();
    let services = compose["services"].as_mapping().unwrap();
    for name in ["gateway", "redis", "upstream", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "service {name}");
    }
    // Every bind mount points at something in the repository.
    for (_, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let spec = volume.as_str().unwrap();
            let source = spec.split(':').next().unwrap();
            assert!(repo(source).exists(), "{spec}: {source} is missing");
        }
    }
    // The gateway runs config/compose.yaml from the mounted config/ dir, and it validates.
    let command: Vec<&str> = compose["services"]["gateway"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command, ["--config", "/etc/tollgate/compose.yaml"]);
    let gateway = tollgate::config::load(&repo("config/compose.yaml")).unwrap();
    // Prometheus scrapes the admin port of the gateway service.
    let prom: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo("config/prometheus.yml")).unwrap())
            .unwrap();
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap();
    assert_eq!(target, format!("gateway:{}", gateway.admin.listen.port()));
    assert!(
        gateway.admin.listen.ip().is_unspecified(),
        "reachable in the compose network"
    );
    // Grafana's datasource is the one the dashboard names, and the dashboard path matches.
    let ds: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo(
            "config/grafana/provisioning/datasources/prometheus.yml",
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        ds["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let uid = ds["datasources"][0]["uid"].as_str().unwrap();
    let dashboard = dashboard();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(panel["datasource"]["uid"], uid, "panel {}", panel["title"]);
        assert!(!panel["targets"].as_array().unwrap().is_empty());
    }
    let provider: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo("config/grafana/provisioning/dashboards/tollgate.yml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        provider["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );
}

fn dashboard() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo("config/grafana/dashboards/tollgate.json")).unwrap(),
    )
    .unwrap()
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(admin: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             scrape_configs:\n  - job_name: tollgate\n    static_configs: [ {{ targets: [\"{admin}\"] }} ]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = tool("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let prom = start_prometheus(gw.admin);
    let ready = format!("{}/-/ready", prom.url);
    wait_until("prometheus ready", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { matches!(reqwest::get(&ready).await, Ok(r) if r.status() == 200) }
    })
    .await;
    // Prometheus's first scrape comes a few seconds after it is ready.
    let c = client();
    let up_query = format!("{}/api/v1/query", prom.url);
    wait_until("the first scrape", Duration::from_secs(30), || {
        let req = c
            .get(&up_query)
            .query(&[("query", "up{job=\"tollgate\"} == 1")]);
        async move {
            match req.send().await {
                Ok(r) => r.json::<Value>().await.is_ok_and(|v| {
                    v["data"]["result"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                }),
                Err(_) => false,
            }
        }
    })
    .await;
    // Traffic across several scrapes, and a reload.
    for round in 0..6 {
        traffic(&gw, round).await;
        if round == 2 {
            gw.signal("HUP");
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let exprs: Vec<String> = dashboard()["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
        })
        .collect();
    assert!(exprs.len() >= 10);
    for expr in &exprs {
        let mut last = Value::Null;
        let mut has_data = false;
        for _ in 0..20 {
            last = c
                .get(format!("{}/api/v1/query", prom.url))
                .query(&[("query", expr.as_str())])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(last["status"], "success", "{expr}: {last}");
            let result = last["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            has_data = result.iter().any(|series| {
                series["value"][1]
                    .as_str()
                    .is_some_and(|v| v.parse::<f64>().is_ok_and(|x| !x.is_nan()))
            });
            if has_data {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !has_data {
            let raw: Value = c
                .get(format!("{}/api/v1/query", prom.url))
                .query(&[("query", "tollgate_requests_total[30s]")])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            panic!("no data for {expr}: {last}\nraw: {raw}");
        }
    }
}
