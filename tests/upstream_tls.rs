//! Upstream transports and HTTP/2 (issue 11): HTTPS upstreams (`upstreams.NAME.tls`: `ca`,
//! `sni`, `verify`) against a real Python `http.server` wrapped in TLS with certificates made
//! by the `openssl` CLI in the test; an h2c upstream (`http2: true`) served by hyper's HTTP/2
//! server; and `server.h2c` on the listener, driven by `curl --http2-prior-knowledge` and
//! `h2load` (many streams of one connection against a limited route).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, Gateway};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Test PKI in `dir`: `ca.pem` (the upstream's CA), `other.pem` (an unrelated CA), `srv.pem` /
/// `srv.key` (signed by `ca.pem`, valid for `upstream.test` and 127.0.0.1) and `old.pem` /
/// `old.key` (signed by `ca.pem`, same names, expired in 2020).
fn make_pki(dir: &Path) {
    let ca_ext = [
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ];
    for (name, cn) in [("ca", "Tollgate Test CA"), ("other", "Unrelated CA")] {
        let key = format!("{name}.key");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        let mut args = vec![
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem,
            "-days", "30", "-subj", &subj,
        ];
        args.extend_from_slice(&ca_ext);
        run(dir, "openssl", &args);
    }
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:upstream.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for name in ["srv", "old"] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        run(
            dir,
            "openssl",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/CN=upstream.test",
            ],
        );
        let sign = [
            "openssl",
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ];
        if name == "old" {
            // Signed "in 2020" for two days: expired long ago.
            let mut args = vec!["2020-01-01 00:00:00"];
            args.extend_from_slice(&sign);
            run(dir, "faketime", &args);
        } else {
            run(dir, sign[0], &sign[1..]);
        }
    }
}

const HTTPS_SERVER: &str = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"path": self.path, "host": self.headers.get("host"), "tls": True}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

/// A Python HTTPS server on loopback with `cert`/`key`; returns once it listens.
fn https_upstream(dir: &Path, cert: &str, key: &str) -> (Proc, SocketAddr) {
    let script = dir.join("https_server.py");
    std::fs::write(&script, HTTPS_SERVER).unwrap();
    let port = free_port();
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .arg(dir.join(cert))
        .arg(dir.join(key))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python3 https server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read ready line");
    assert_eq!(line.trim(), "ready", "https upstream did not start");
    (Proc(child), format!("127.0.0.1:{port}").parse().unwrap())
}

fn pki() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let path = dir.path().to_path_buf();
    (dir, path)
}

async fn get(gw: &Gateway, path: &str) -> (u16, String) {
    let resp = common::client()
        .get(gw.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

fn routes_yaml(pki: &Path, upstreams: &[(&str, &str)]) -> String {
    let mut yaml =
        String::from("listen: [\"{PROXY}\"]\nadmin: { listen: \"{ADMIN}\" }\nupstreams:\n");
    for (name, tls) in upstreams {
        yaml.push_str(&format!(
            "  {name}: {{ targets: [\"{{UPSTREAM}}\"], tls: {} }}\n",
            tls.replace("PKI", &pki.display().to_string())
        ));
    }
    yaml.push_str("routes:\n");
    for (name, _) in upstreams {
        yaml.push_str(&format!(
            "  - {{ name: {name}, match: {{ path_prefix: /{name}/ }}, upstream: {name} }}\n"
        ));
    }
    yaml
}

#[tokio::test]
async fn https_upstream_is_verified_against_ca_and_sni() {
    let (_keep, dir) = pki();
    let (_srv, addr) = https_upstream(&dir, "srv.pem", "srv.key");
    let yaml = routes_yaml(
        &dir,
        &[
            // The target's host (127.0.0.1, an IP SAN of the certificate) as the name.
            ("byip", "{ ca: PKI/ca.pem }"),
            ("named", "{ ca: PKI/ca.pem, sni: upstream.test }"),
        ],
    );
    let gw = Gateway::start(&yaml, addr).await;
    for route in ["byip", "named", "byip"] {
        let (status, body) = get(&gw, &format!("/{route}/x")).await;
        assert_eq!(status, 200, "{route}: {body}\n{}", gw.log());
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["tls"], true);
        assert_eq!(echo["path"], format!("/{route}/x"));
    }
}

#[tokio::test]
async fn failed_verification_is_a_502_with_a_log_line_naming_upstream_and_reason() {
    let (_keep, dir) = pki();
    let (_srv, addr) = https_upstream(&dir, "srv.pem", "srv.key");
    let (_old_srv, old_addr) = https_upstream(&dir, "old.pem", "old.key");
    let mut yaml = routes_yaml(
        &dir,
        &[
            ("good", "{ ca: PKI/ca.pem }"),
            // Same address as `good`: must not ride on `good`'s verified pooled connection.
            ("wrongca", "{ ca: PKI/other.pem }"),
            ("wrongsni", "{ ca: PKI/ca.pem, sni: elsewhere.test }"),
            // The system roots do not know the test CA.
            ("sysroots", "{}"),
            ("expired", "{ ca: PKI/ca.pem, sni: upstream.test }"),
        ],
    );
    yaml = yaml.replace(
        "expired: { targets: [\"{UPSTREAM}\"]",
        &format!("expired: {{ targets: [\"{old_addr}\"]"),
    );
    let gw = Gateway::start(&yaml, addr).await;
    let (status, body) = get(&gw, "/good/x").await;
    assert_eq!(status, 200, "{body}");
    for (route, reason) in [
        ("wrongca", "UnknownIssuer"),
        ("wrongsni", "not valid for name \"elsewhere.test\""),
        ("sysroots", "UnknownIssuer"),
        ("expired", "certificate expired"),
    ] {
        let (status, body) = get(&gw, &format!("/{route}/x")).await;
        assert_eq!(status, 502, "{route} was not refused: {body}");
        assert!(!body.contains("\"tls\""), "{route}: upstream body leaked");
        let log = gw.log();
        let line = log
            .lines()
            .find(|l| {
                l.contains("upstream TLS handshake failed")
                    && l.contains(&format!("upstream=\"{route}\""))
            })
            .unwrap_or_else(|| panic!("no TLS failure line for {route}:\n{log}"));
        assert!(
            line.contains(reason),
            "{route}: reason {reason:?} missing: {line}"
        );
    }
    // `good` still works after the failures.
    assert_eq!(get(&gw, "/good/y").await.0, 200);
}

#[tokio::test]
async fn verify_false_accepts_an_unverifiable_certificate() {
    let (_keep, dir) = pki();
    let (_srv, addr) = https_upstream(&dir, "old.pem", "old.key");
    let yaml = routes_yaml(
        &dir,
        &[
            ("noverify", "{ verify: false }"),
            ("strict", "{ ca: PKI/other.pem }"),
        ],
    );
    let gw = Gateway::start(&yaml, addr).await;
    let (status, body) = get(&gw, "/noverify/x").await;
    assert_eq!(status, 200, "{body}\n{}", gw.log());
    assert!(body.contains("\"tls\": true"));
    assert_eq!(get(&gw, "/strict/x").await.0, 502);
    // And the unverified connection is not reused for the verified upstream either way.
    assert_eq!(get(&gw, "/noverify/y").await.0, 200);
}

fn validate(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(common::bin())
        .arg("validate")
        .arg(&path)
        .output()
        .expect("run tollgate validate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn bad_ca_files_and_sni_are_validation_errors_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    let config = |tls: &str| {
        format!(
            "upstreams: {{ app: {{ targets: [\"127.0.0.1:9\"], tls: {tls} }} }}\nroutes: [ {{ name: r, upstream: app }} ]\n"
        )
    };
    for (tls, file, says) in [
        (
            format!("{{ ca: {} }}", missing.display()),
            Some(&missing),
            "cannot read",
        ),
        (
            format!("{{ ca: {} }}", garbage.display()),
            Some(&garbage),
            "no PEM CERTIFICATE",
        ),
        (
            format!("{{ ca: {} }}", broken.display()),
            Some(&broken),
            "not valid X.509",
        ),
        ("{ sni: \"\" }".to_string(), None, "upstreams.app.tls.sni"),
        (
            "{ verfy: false }".to_string(),
            None,
            "unknown field `verfy`",
        ),
    ] {
        let (ok, out) = validate(&config(&tls));
        assert!(!ok, "{tls} validated: {out}");
        assert!(out.contains(says), "{tls}: {out}");
        if let Some(file) = file {
            assert!(out.contains("upstreams.app.tls.ca"), "{tls}: {out}");
            assert!(out.contains(&file.display().to_string()), "{tls}: {out}");
        }
    }
    let (ok, out) = validate(&config("{ verify: false, sni: upstream.test }"));
    assert!(ok, "{out}");
}

/// A real HTTP/2-only (h2c prior knowledge) server on loopback that echoes the HTTP version
/// and path it saw.
fn h2c_upstream() -> SocketAddr {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = serde_json::json!({
                                "version": format!("{:?}", req.version()),
                                "path": req.uri().path(),
                            })
                            .to_string();
                            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                                body,
                            ))))
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

#[tokio::test]
async fn http2_upstream_speaks_h2c_prior_knowledge() {
    let addr = h2c_upstream();
    let yaml = "listen: [\"{PROXY}\"]\nadmin: { listen: \"{ADMIN}\" }\nupstreams:\n  h2: { targets: [\"{UPSTREAM}\"], http2: true }\n  h1: { targets: [\"{UPSTREAM}\"] }\nroutes:\n  - { name: h2, match: { path_prefix: /h2/ }, upstream: h2 }\n  - { name: h1, match: { path_prefix: /h1/ }, upstream: h1 }\n";
    let gw = Gateway::start(yaml, addr).await;
    for _ in 0..3 {
        let (status, body) = get(&gw, "/h2/x").await;
        assert_eq!(status, 200, "{body}\n{}", gw.log());
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["version"], "HTTP/2.0");
        assert_eq!(echo["path"], "/h2/x");
    }
    // Without `http2`, HTTP/1.1 to an h2-only server fails: the flag is what made it work.
    assert_eq!(get(&gw, "/h1/x").await.0, 502);
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .args(args)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const H2C_LIMITED: &str = "listen: [\"{PROXY}\"]\nadmin: { listen: \"{ADMIN}\" }\nserver: { h2c: H2C }\nupstreams: { app: { targets: [\"{UPSTREAM}\"] } }\nroutes:\n  - name: limited\n    match: { path_prefix: /limited }\n    upstream: app\n    limits: [ { name: per-ip, key: [ip], rate: 1/m, burst: 5 } ]\n  - { name: open, match: { path_prefix: / }, upstream: app }\n";

#[tokio::test]
async fn h2c_listener_takes_prior_knowledge_and_http1_alike() {
    let up = common::Upstream::start();
    let gw = Gateway::start(&H2C_LIMITED.replace("H2C", "true"), up.addr).await;
    let url = gw.url("/open/x");
    assert_eq!(curl(&["--http2-prior-knowledge", &url]), "2 200");
    assert_eq!(curl(&["--http1.1", &url]), "1.1 200");
    // A path the gateway rewrites to its normal form keeps the HTTP/2 request's authority, so
    // the upstream still gets a Host.
    let out = Command::new("curl")
        .args(["-s", "--http2-prior-knowledge"])
        .arg(gw.url("/open//a/../x"))
        .output()
        .expect("run curl");
    let echo: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(echo["path"], "/open/x");
    assert_eq!(echo["host"], gw.proxy.to_string());
    // Off (the default), the listener speaks HTTP/1.1 only.
    let off = Gateway::start(&H2C_LIMITED.replace("H2C", "false"), up.addr).await;
    let url = off.url("/open/x");
    assert_ne!(curl(&["--http2-prior-knowledge", &url]), "2 200");
    assert_eq!(curl(&["--http1.1", &url]), "1.1 200");
}

#[tokio::test]
async fn many_streams_of_one_h2c_connection_hit_the_limit_without_tearing_it_down() {
    let up = common::Upstream::start();
    let gw = Gateway::start(&H2C_LIMITED.replace("H2C", "true"), up.addr).await;
    let out = Command::new("h2load")
        .args(["-n", "20", "-c", "1", "-m", "10"])
        .arg(gw.url("/limited/x"))
        .output()
        .expect("run h2load (nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(
            "requests: 20 total, 20 started, 20 done, 5 succeeded, 15 failed, 0 errored, 0 timeout"
        ),
        "{text}\n{}",
        gw.log()
    );
    assert!(
        text.contains("status codes: 5 2xx, 0 3xx, 15 4xx, 0 5xx"),
        "{text}"
    );
    assert_eq!(up.hits(), 5);
    // The refusals did not tear the connection down (h2load counts a reset or GOAWAY as
    // "errored"), and the gateway logged no error for it.
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}
