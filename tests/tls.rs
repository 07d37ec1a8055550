//! TLS listeners (issue 11): TLS 1.2/1.3 and `min_version`, certificates chosen by SNI, ALPN h2,
//! certificate rotation without restart (and a bad pair keeping the old one), `tollgate validate`
//! messages for bad pairs, and HTTP/2 over TLS where every stream is limited on its own.
//! Real clients on loopback (curl, openssl s_client, h2load); certificates made per test with
//! the `openssl` CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_until, Gateway, Upstream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The rotation bound the README promises: the files are polled every second.
const ROTATION_BOUND: Duration = Duration::from_secs(3);

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = run(Command::new("openssl").current_dir(dir).args(args));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and leaf certificates signed by it, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, `a.crt`/`a.key` for a.test and *.a.test, `b.crt`/`b.key` for b.test and *.b.test,
    /// and `other.key`, a key that matches neither.
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        openssl(
            pki.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=Tollgate Test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        );
        pki.leaf("a", "a.test", &["a.test", "*.a.test"]);
        pki.leaf("b", "b.test", &["b.test", "*.b.test"]);
        openssl(
            pki.path(),
            &[
                "genpkey",
                "-algorithm",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-out",
                "other.key",
            ],
        );
        pki
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    fn file_str(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }

    /// Writes `{stem}.crt` and `{stem}.key`: subject CN `cn`, DNS names `names`.
    fn leaf(&self, stem: &str, cn: &str, names: &[&str]) {
        let ext = format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
            names
                .iter()
                .map(|n| format!("DNS:{n}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        std::fs::write(self.file(&format!("{stem}.ext")), ext).unwrap();
        let (key, csr, crt, extf) = (
            format!("{stem}.key"),
            format!("{stem}.csr"),
            format!("{stem}.crt"),
            format!("{stem}.ext"),
        );
        openssl(
            self.path(),
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            self.path(),
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extf,
            ],
        );
    }

    /// A `listen` entry: TLS on `address` with these pairs (file stems) and min version.
    fn listen(&self, address: &str, stems: &[&str], min_version: &str) -> String {
        let certs = stems
            .iter()
            .map(|s| {
                format!(
                    "{{ cert: \"{}\", key: \"{}\" }}",
                    self.file_str(&format!("{s}.crt")),
                    self.file_str(&format!("{s}.key"))
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{{ address: \"{address}\", tls: {{ certs: [ {certs} ], min_version: \"{min_version}\" }} }}"
        )
    }
}

/// A config with the given `listen` entries, an unlimited route `/free` and a route `/limited`
/// with a burst of 5 per client IP (and no refill to speak of).
fn config(listen: &[String]) -> String {
    format!(
        r#"
listen: [ {} ]
admin: {{ listen: "{{ADMIN}}" }}
upstreams: {{ app: {{ targets: ["{{UPSTREAM}}"] }} }}
routes:
  - {{ name: free, match: {{ path_prefix: "/free" }}, upstream: app }}
  - {{ name: limited, match: {{ path_prefix: "/limited" }}, upstream: app, limits: [ {{ name: l, key: ["ip"], rate: "1/h", burst: 5 }} ] }}
"#,
        listen.join(", ")
    )
}

/// What `openssl s_client` saw: the server certificate's subject CN, the ALPN protocol, the
/// TLS version; `None` when the handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Handshake {
    cn: String,
    alpn: Option<String>,
    version: String,
}

fn s_client(port: u16, sni: Option<&str>, extra: &[&str]) -> Option<Handshake> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    match sni {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    cmd.args(extra);
    let out = run(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    let cn = line("subject=")?
        .split(',')
        .find_map(|part| part.trim().strip_prefix("CN = ").map(str::to_string))?;
    let version = line("Protocol  :").or_else(|| {
        // OpenSSL 3.2+: "New, TLSv1.3, Cipher is ..."
        text.lines()
            .find(|l| l.starts_with("New, "))
            .and_then(|l| l.split(", ").nth(1))
            .map(str::to_string)
    })?;
    if version.contains("NONE") || text.contains("Cipher is (NONE)") {
        return None;
    }
    Some(Handshake {
        cn,
        alpn: line("ALPN protocol:"),
        version,
    })
}

/// curl over TLS to `name` (resolved to 127.0.0.1:`port`), verifying against the test CA:
/// (exit code, "STATUS HTTP_VERSION", body).
fn curl(pki: &Pki, name: &str, port: u16, path: &str, extra: &[&str]) -> (i32, String, String) {
    let body = pki.file(&format!("body-{}", free_port()));
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(pki.file("ca.crt"))
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(["-o"])
        .arg(&body)
        .args(["-w", "%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("https://{name}:{port}{path}")));
    let text = std::fs::read_to_string(&body).unwrap_or_default();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        text,
    )
}

async fn start(listen: &[String], up: &Upstream) -> Gateway {
    Gateway::start(&config(listen), up.addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_tls13_with_curl_verifying_the_chain() {
    let pki = Pki::new();
    let up = Upstream::start();
    let plain = format!("127.0.0.1:{}", free_port());
    let gw = start(
        &[pki.listen("{PROXY}", &["a"], "1.2"), format!("\"{plain}\"")],
        &up,
    )
    .await;
    let port = gw.proxy.port();
    let (code, out, body) = curl(&pki, "a.test", port, "/free/x", &["--tlsv1.3"]);
    assert_eq!((code, out.as_str()), (0, "200 2"), "TLS 1.3, h2 by ALPN");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/free/x");
    assert_eq!(
        echo["host"],
        format!("a.test:{port}"),
        "Host from :authority"
    );
    let (code, out, _) = curl(
        &pki,
        "a.test",
        port,
        "/free/y",
        &["--tlsv1.2", "--tls-max", "1.2", "--http1.1"],
    );
    assert_eq!((code, out.as_str()), (0, "200 1.1"), "TLS 1.2, HTTP/1.1");
    assert_eq!(
        s_client(port, Some("a.test"), &["-tls1_2"]).map(|h| h.version),
        Some("TLSv1.2".to_string())
    );
    assert_eq!(
        s_client(port, Some("a.test"), &["-tls1_3"]).map(|h| h.version),
        Some("TLSv1.3".to_string())
    );
    // The plain listener next to it still speaks plain HTTP/1.1.
    let resp = reqwest::get(format!("http://{plain}/free/z"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A name the certificate does not cover fails curl's verification.
    let (code, _, _) = curl(&pki, "c.test", port, "/free/x", &[]);
    assert_eq!(code, 60, "curl refuses a certificate for another name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_13_refuses_a_tls12_handshake() {
    let pki = Pki::new();
    let up = Upstream::start();
    let gw = start(&[pki.listen("{PROXY}", &["a"], "1.3")], &up).await;
    let port = gw.proxy.port();
    let (code, _, _) = curl(
        &pki,
        "a.test",
        port,
        "/free/x",
        &["--tlsv1.2", "--tls-max", "1.2"],
    );
    assert_eq!(code, 35, "curl capped at TLS 1.2 gets a handshake failure");
    assert_eq!(s_client(port, Some("a.test"), &["-tls1_2"]), None);
    let (code, out, _) = curl(&pki, "a.test", port, "/free/x", &["--tlsv1.3"]);
    assert_eq!((code, out.as_str()), (0, "200 2"));
    assert_eq!(
        s_client(port, Some("a.test"), &[]).map(|h| h.version),
        Some("TLSv1.3".to_string())
    );
    // A hand-made ClientHello that lists TLS 1.3 suites but can only speak 1.2 gets its
    // handshake; its request is refused on the negotiated version.
    let script = pki.file("tls12_with_13_suites.py");
    std::fs::write(&script, include_str!("py/tls12_with_13_suites.py")).unwrap();
    let out = run(Command::new("python3").arg(&script).args([
        &port.to_string(),
        "a.test",
        "1301,c02b",
        "/free/x",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains("server Finished decrypted"),
        "the 1.2 handshake completed (the case under test): {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains(" 200 "),
        "no answer from the route: {stdout}"
    );
    assert_eq!(
        up.hits(),
        1,
        "only the TLS 1.3 request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_certificate_and_alpn_offers_h2() {
    let pki = Pki::new();
    let up = Upstream::start();
    let gw = start(&[pki.listen("{PROXY}", &["a", "b"], "1.2")], &up).await;
    let port = gw.proxy.port();
    let seen = |sni: Option<&str>, alpn: &str| {
        let h = s_client(port, sni, &["-alpn", alpn])
            .unwrap_or_else(|| panic!("handshake with SNI {sni:?} failed"));
        (h.cn, h.alpn.unwrap_or_default())
    };
    assert_eq!(seen(Some("a.test"), "h2"), ("a.test".into(), "h2".into()));
    assert_eq!(seen(Some("b.test"), "h2"), ("b.test".into(), "h2".into()));
    assert_eq!(
        seen(Some("api.b.test"), "h2,http/1.1"),
        ("b.test".into(), "h2".into()),
        "wildcard *.b.test"
    );
    assert_eq!(
        seen(Some("b.test"), "http/1.1"),
        ("b.test".into(), "http/1.1".into())
    );
    assert_eq!(
        seen(Some("unknown.test"), "h2"),
        ("a.test".into(), "h2".into()),
        "no match: the first certificate"
    );
    assert_eq!(
        seen(None, "h2"),
        ("a.test".into(), "h2".into()),
        "no SNI: the first certificate"
    );
    // Verified end to end on both names.
    for name in ["a.test", "b.test", "www.b.test"] {
        let (code, out, _) = curl(&pki, name, port, "/free/", &[]);
        assert_eq!((code, out.as_str()), (0, "200 2"), "{name}");
    }
}

async fn wait_cn(port: u16, sni: &str, want: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if s_client(port, Some(sni), &[]).is_some_and(|h| h.cn == want) {
            return start.elapsed();
        }
        if start.elapsed() > bound {
            panic!("{sni} did not serve CN {want} within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metric(gw: &Gateway, result: &str) -> f64 {
    gw.metric(&format!(
        "tollgate_tls_cert_reloads_total{{result=\"{result}\"}}"
    ))
    .await
    .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_serve_new_handshakes_and_a_bad_pair_keeps_the_old() {
    let pki = Pki::new();
    let up = Upstream::start();
    // The served pair lives in live.crt/live.key, rewritten as certbot would.
    std::fs::copy(pki.file("a.crt"), pki.file("live.crt")).unwrap();
    std::fs::copy(pki.file("a.key"), pki.file("live.key")).unwrap();
    let gw = start(&[pki.listen("{PROXY}", &["live"], "1.2")], &up).await;
    let port = gw.proxy.port();
    assert_eq!(s_client(port, Some("a.test"), &[]).unwrap().cn, "a.test");
    assert_eq!(metric(&gw, "ok").await, 0.0);
    assert_eq!(metric(&gw, "error").await, 0.0);

    // 1. Rewritten in place: the new pair serves within the bound.
    pki.leaf("rot1", "rotated-1.a.test", &["a.test"]);
    std::fs::write(
        pki.file("live.key"),
        std::fs::read(pki.file("rot1.key")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        pki.file("live.crt"),
        std::fs::read(pki.file("rot1.crt")).unwrap(),
    )
    .unwrap();
    let took = wait_cn(port, "a.test", "rotated-1.a.test", ROTATION_BOUND).await;
    eprintln!("in-place rotation served after {took:?}");
    let (code, out, _) = curl(&pki, "a.test", port, "/free/", &[]);
    assert_eq!((code, out.as_str()), (0, "200 2"));
    let ok_after_first = metric(&gw, "ok").await;
    assert!(ok_after_first >= 1.0, "ok counted: {ok_after_first}");

    // 2. A key that does not match: refused, counted, the rotated pair keeps serving.
    let errors = metric(&gw, "error").await;
    // Written whole (temp file, then rename): one change, one error.
    std::fs::copy(pki.file("other.key"), pki.file("bad.key.tmp")).unwrap();
    std::fs::rename(pki.file("bad.key.tmp"), pki.file("live.key")).unwrap();
    wait_until("the bad pair to be counted", ROTATION_BOUND, || async {
        metric(&gw, "error").await > errors
    })
    .await;
    assert_eq!(metric(&gw, "error").await, errors + 1.0, "counted once");
    assert_eq!(
        s_client(port, Some("a.test"), &[]).unwrap().cn,
        "rotated-1.a.test"
    );
    let (code, out, _) = curl(&pki, "a.test", port, "/free/", &[]);
    assert_eq!((code, out.as_str()), (0, "200 2"), "still served");
    assert!(
        gw.log().contains("does not match the certificate"),
        "logged: {}",
        gw.log()
    );

    // 3. Not PEM at all: refused and counted as well.
    let errors = metric(&gw, "error").await;
    std::fs::write(pki.file("live.crt"), "this is not a certificate\n").unwrap();
    wait_until("the non-PEM file to be counted", ROTATION_BOUND, || async {
        metric(&gw, "error").await > errors
    })
    .await;
    assert_eq!(
        s_client(port, Some("a.test"), &[]).unwrap().cn,
        "rotated-1.a.test"
    );

    // 4. A good pair written elsewhere and renamed over the old files (cert-manager style).
    pki.leaf("rot2", "rotated-2.a.test", &["a.test"]);
    std::fs::rename(pki.file("rot2.key"), pki.file("live.key")).unwrap();
    std::fs::rename(pki.file("rot2.crt"), pki.file("live.crt")).unwrap();
    let took = wait_cn(port, "a.test", "rotated-2.a.test", ROTATION_BOUND).await;
    eprintln!("rename rotation served after {took:?}");
    assert!(metric(&gw, "ok").await > ok_after_first);
    assert_eq!(
        up.hits(),
        2,
        "the gateway never restarted or dropped requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_reload_rereads_the_certificates() {
    let pki = Pki::new();
    let up = Upstream::start();
    std::fs::copy(pki.file("a.crt"), pki.file("live.crt")).unwrap();
    std::fs::copy(pki.file("a.key"), pki.file("live.key")).unwrap();
    let gw = start(&[pki.listen("{PROXY}", &["live"], "1.2")], &up).await;
    let port = gw.proxy.port();
    pki.leaf("rot", "reloaded.a.test", &["a.test"]);
    std::fs::rename(pki.file("rot.key"), pki.file("live.key")).unwrap();
    std::fs::rename(pki.file("rot.crt"), pki.file("live.crt")).unwrap();
    // SIGHUP reloads the config, which reads the pair again (the poller may be first: either
    // way the new pair serves, and is counted once).
    gw.signal("HUP");
    wait_cn(port, "a.test", "reloaded.a.test", ROTATION_BOUND).await;
    wait_until("config generation 2", Duration::from_secs(5), || async {
        gw.metric("tollgate_config_generation ").await == Some(2.0)
    })
    .await;
    assert_eq!(metric(&gw, "ok").await, 1.0);
    assert_eq!(metric(&gw, "error").await, 0.0);
}

#[test]
fn validate_names_the_field_and_the_file() {
    let pki = Pki::new();
    std::fs::write(pki.file("garbage.crt"), "not PEM\n").unwrap();
    let pair = |cert: &str, key: &str| {
        format!(
            "{{ cert: \"{}\", key: \"{}\" }}",
            pki.file_str(cert),
            pki.file_str(key)
        )
    };
    let text = format!(
        "listen:\n  - \"127.0.0.1:{}\"\n  - {{ address: \"127.0.0.1:{}\", tls: {{ certs: [ {}, {}, {}, {} ], min_version: \"1.1\" }} }}\n  - {{ address: \"127.0.0.1:{}\", tls: {{ certs: [] }} }}\nroutes: []\n",
        free_port(),
        free_port(),
        pair("a.crt", "other.key"),
        pair("missing.crt", "b.key"),
        pair("garbage.crt", "b.key"),
        pair("b.crt", "missing.key"),
        free_port(),
    );
    let file = pki.file("bad.yaml");
    std::fs::write(&file, text).unwrap();
    let out = run(Command::new(common::bin()).arg("validate").arg(&file));
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let f = file.display().to_string();
    let expect = [
        "listen[1].tls.min_version: expected \"1.2\" or \"1.3\", got \"1.1\"".to_string(),
        format!(
            "listen[1].tls.certs[0].key: the key in {} does not match the certificate in {}",
            pki.file_str("other.key"),
            pki.file_str("a.crt")
        ),
        format!(
            "listen[1].tls.certs[1].cert: cannot read {}: No such file or directory",
            pki.file_str("missing.crt")
        ),
        format!(
            "listen[1].tls.certs[2].cert: no PEM CERTIFICATE block in {}",
            pki.file_str("garbage.crt")
        ),
        format!(
            "listen[1].tls.certs[3].key: cannot read {}: No such file or directory",
            pki.file_str("missing.key")
        ),
        "listen[2].tls.certs: needs at least one {cert, key} pair".to_string(),
    ];
    for e in &expect {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{f}: line ")) && l.contains(e.as_str())),
            "missing {e:?} in:\n{stdout}"
        );
    }
    assert_eq!(stdout.lines().count(), expect.len(), "{stdout}");
    // The gateway refuses to start on it, with the same messages.
    let out = run(Command::new(common::bin()).arg("--config").arg(&file));
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen[1].tls.certs[0].key"),
        "start refused with the field named: {stderr}"
    );
}

/// h2load's summary: (2xx, 4xx, succeeded, failed, errored).
fn h2load(port: u16, path: &str, n: u32, m: u32) -> (u32, u32, u32, u32, u32) {
    let out = run(Command::new("h2load")
        .args(["-n", &n.to_string(), "-c", "1", "-m", &m.to_string()])
        .arg(format!("https://127.0.0.1:{port}{path}")));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in h2load output:\n{text}"))
            .to_string()
    };
    let count = |line: &str, word: &str| -> u32 {
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        words
            .windows(2)
            .find(|w| w[1] == word)
            .and_then(|w| w[0].parse().ok())
            .unwrap_or_else(|| panic!("no count before {word:?} in {line:?}"))
    };
    let statuses = line("status codes:");
    let requests = line("requests:");
    assert!(
        text.contains("Application protocol: h2"),
        "h2 negotiated:\n{text}"
    );
    (
        count(&statuses, "2xx"),
        count(&statuses, "4xx"),
        count(&requests, "succeeded"),
        count(&requests, "failed"),
        count(&requests, "errored"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_limits_each_stream_on_one_connection() {
    let pki = Pki::new();
    let up = Upstream::start();
    let gw = start(&[pki.listen("{PROXY}", &["a"], "1.2")], &up).await;
    let port = gw.proxy.port();
    let (code, out, _) = curl(&pki, "a.test", port, "/free/", &["--http2"]);
    assert_eq!((code, out.as_str()), (0, "200 2"));
    // One connection, 20 requests, up to 10 streams at once, on a route with a burst of 5.
    let (ok, limited, succeeded, failed, errored) = h2load(port, "/limited/x", 20, 10);
    assert_eq!((ok, limited), (5, 15), "exactly the burst passes");
    assert_eq!((succeeded, failed, errored), (5, 15, 0), "no stream errors");
    // The 4xx are the limiter's 429s.
    assert_eq!(
        gw.metric(r#"tollgate_requests_total{decision="limited",route="limited"}"#)
            .await,
        Some(15.0)
    );
    assert_eq!(
        gw.metric(r#"tollgate_requests_total{decision="allowed",route="limited"}"#)
            .await,
        Some(5.0)
    );
    // And over curl's h2 the next one is a 429 too, with the limiter's headers.
    let headers = pki.file("h2-429-headers");
    let headers_arg = headers.display().to_string();
    let (code, out, _) = curl(
        &pki,
        "a.test",
        port,
        "/limited/y",
        &["--http2", "-D", &headers_arg],
    );
    assert_eq!((code, out.as_str()), (0, "429 2"));
    let headers = std::fs::read_to_string(&headers)
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.starts_with("http/2 429"), "{headers}");
    assert!(headers.contains("\nretry-after: "), "{headers}");
    assert_eq!(up.hits(), 1 + 5);
}

/// A FIFO at a certificate path (or anything whose open blocks) is refused at once, not
/// waited on: opening it would stall `validate`, start-up, rotation and every later reload.
#[test]
fn a_fifo_at_a_cert_path_is_refused_not_waited_on() {
    let pki = Pki::new();
    let fifo = pki.file("fifo.crt");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let text = format!(
        "listen:\n  - {{ address: \"127.0.0.1:{}\", tls: {{ certs: [ {{ cert: \"{}\", key: \"{}\" }} ] }} }}\nroutes: []\n",
        free_port(),
        pki.file_str("fifo.crt"),
        pki.file_str("b.key"),
    );
    let file = pki.file("fifo.yaml");
    std::fs::write(&file, text).unwrap();
    let mut child = Command::new(common::bin())
        .arg("validate")
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn validate");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tollgate validate hung on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("listen[0].tls.certs[0].cert: ")
            && stdout.contains("is not a regular file"),
        "{stdout}"
    );
}
