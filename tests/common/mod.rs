//! Test helpers: free loopback ports, a real HTTP upstream on loopback, and the real
//! `tollgate` binary run as a child process with a config written to a temp dir.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod redis;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago and that no other call in this test process has
/// returned.
///
/// Not the kernel's `bind(:0)`: a port it hands out and the test releases (to write it into a
/// config) can be handed out again, to the next gateway of a test running in parallel, or to
/// the same gateway's admin listener, before the first one binds it; the loser then runs without
/// its listener (a test that failed in CI this way). Ports come instead from 10000-19999, below
/// the kernel's ephemeral range (32768 and up, so no outgoing connection takes one) and below
/// the Cluster nodes' ports (see `redis::cluster_port`), walked from a start that differs per
/// process, each checked free before it is returned and never returned twice by one process.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % COUNT) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT);
}

/// Waits for `cond` with a deadline; panics with `what` if it never holds.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn serve(std_listener: StdListener, counter: Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let counter = counter.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let query = req.uri().query().unwrap_or("").to_string();
                    if req.uri().path().ends_with("/slow") {
                        let ms: u64 = query
                            .strip_prefix("ms=")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(1000);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    // Bytes that are not UTF-8 show as U+FFFD.
                    let xff = req
                        .headers()
                        .get("x-forwarded-for")
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    let host = req
                        .headers()
                        .get("host")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let body = serde_json::json!({
                        "method": req.method().as_str(),
                        "path": req.uri().path(),
                        "query": query,
                        "host": host,
                        "xff": xff,
                    })
                    .to_string();
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A real HTTP/1.1 server on loopback. `GET /slow?ms=N` answers after N ms; everything else
/// answers 200 at once with a JSON echo of the method, path, query, Host and X-Forwarded-For it
/// received.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Upstream {
    /// Starts the server on its own thread and runtime (so it works from sync and async tests).
    pub fn start() -> Upstream {
        let std_listener = StdListener::bind("127.0.0.1:0").expect("bind upstream");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(serve(std_listener, counter));
        });
        Upstream { addr, hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The gateway binary under test: this build's, or `TOLLGATE_BIN` when set (to run a test
/// against another build, e.g. to see a new test fail on an older release).
pub fn bin() -> PathBuf {
    std::env::var_os("TOLLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tollgate")))
}

/// Writes `yaml` to a temp dir with `{PROXY}`, `{ADMIN}`, `{RLS}` and `{UPSTREAM}` replaced by
/// free proxy, admin and rate-limit-service ports and `upstream`.
fn write_config(yaml: &str, upstream: SocketAddr) -> (Addrs, tempfile::TempDir, PathBuf) {
    let addrs = Addrs {
        proxy: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        admin: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        rls: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    };
    let text = yaml
        .replace("{PROXY}", &addrs.proxy.to_string())
        .replace("{ADMIN}", &addrs.admin.to_string())
        .replace("{RLS}", &addrs.rls.to_string())
        .replace("{UPSTREAM}", &upstream.to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("gateway.yaml");
    std::fs::write(&config_path, text).expect("write config");
    (addrs, dir, config_path)
}

/// The addresses a gateway's config was given.
struct Addrs {
    proxy: SocketAddr,
    admin: SocketAddr,
    /// `{RLS}` (`rls.listen`); unused unless the config has it.
    rls: SocketAddr,
}

/// The gateway binary running a config; killed on drop if still running.
pub struct Gateway {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The address `{RLS}` stood for (the rate-limit service's, when the config has one).
    pub rls: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Gateway {
    /// Starts the gateway on `yaml`, in which `{PROXY}`, `{ADMIN}`, `{RLS}` and `{UPSTREAM}` are
    /// replaced by free proxy, admin and RLS ports and the given upstream address. Waits for
    /// `/ready`.
    pub async fn start(yaml: &str, upstream: SocketAddr) -> Gateway {
        Gateway::start_with(yaml, upstream, &[]).await
    }

    /// As [`Gateway::start`], with the binary run under `wrapper` (e.g. `faketime -f +2h`).
    pub async fn start_with(yaml: &str, upstream: SocketAddr, wrapper: &[&str]) -> Gateway {
        Gateway::start_full(yaml, upstream, wrapper, &[]).await
    }

    /// As [`Gateway::start_with`], with extra environment variables.
    pub async fn start_full(
        yaml: &str,
        upstream: SocketAddr,
        wrapper: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let (addrs, dir, config_path) = write_config(yaml, upstream);
        Gateway::launch(addrs, dir, config_path, wrapper, env).await
    }

    /// Runs the gateway on `yaml` and returns at once, waiting for nothing.
    pub fn spawn_now(yaml: &str, upstream: SocketAddr) -> Gateway {
        let (addrs, dir, config_path) = write_config(yaml, upstream);
        Gateway::spawn(addrs, dir, config_path, &[], &[])
    }

    /// As [`Gateway::start`], but returns as soon as the proxy port accepts a connection,
    /// without waiting for `/ready`: traffic arrives the moment the listener opens, as a load
    /// balancer's would.
    pub async fn start_hot(yaml: &str, upstream: SocketAddr) -> Gateway {
        let (addrs, dir, config_path) = write_config(yaml, upstream);
        let proxy = addrs.proxy;
        let gw = Gateway::spawn(addrs, dir, config_path, &[], &[]);
        wait_until(
            "the proxy listener",
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(proxy).await.is_ok() },
        )
        .await;
        gw
    }

    /// Runs the binary on `config_path` (under `wrapper`, with `env`), logging into `dir`,
    /// and waits for `/ready`.
    async fn launch(
        addrs: Addrs,
        dir: tempfile::TempDir,
        config_path: PathBuf,
        wrapper: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let gw = Gateway::spawn(addrs, dir, config_path, wrapper, env);
        gw.wait_ready().await;
        gw
    }

    /// Runs the binary on `config_path` (under `wrapper`, with `env`), logging into `dir`.
    fn spawn(
        addrs: Addrs,
        dir: tempfile::TempDir,
        config_path: PathBuf,
        wrapper: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        // Its own process group, so that a wrapper (faketime) and the gateway die together.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env_remove("TOLLGATE_ADMIN_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate");
        Gateway {
            child,
            proxy: addrs.proxy,
            admin: addrs.admin,
            rls: addrs.rls,
            dir,
            config_path,
        }
    }

    /// Starts the gateway on an existing config file (its addresses already filled in).
    pub async fn start_at(config_path: &std::path::Path) -> Gateway {
        let text = std::fs::read_to_string(config_path).expect("read config");
        let find = |key: &str| -> SocketAddr {
            let at = text.find(key).expect("address in config") + key.len();
            let rest = &text[at..];
            let start = rest.find('"').expect("quote") + 1;
            let end = rest[start..].find('"').expect("quote") + start;
            rest[start..end].parse().expect("socket address")
        };
        let addrs = Addrs {
            proxy: find("listen:"),
            admin: find("admin:"),
            rls: "127.0.0.1:0".parse().unwrap(),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        Gateway::launch(addrs, dir, config_path.to_path_buf(), &[], &[]).await
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let url = format!("http://{}/ready", self.admin);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let admin_ok = match client.get(&url).send().await {
                Ok(r) if r.status() == 200 => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|v| v["store_healthy"] == true),
                _ => false,
            };
            if admin_ok && tokio::net::TcpStream::connect(self.proxy).await.is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for gateway /ready (proxy {}, admin {}); its log:\n{}",
                    self.proxy,
                    self.admin,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("gateway.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends a signal to the gateway (its whole process group, wrapper included).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Value of a metric series whose line starts with `prefix` (name and labels), if exported.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let text = reqwest::get(self.admin_url("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // The whole group: a wrapper such as faketime may have forked the gateway.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a gateway (as [`Gateway::start`]) whose `yaml` may also hold `{RLS}`, replaced by a
/// free loopback address for `rls.listen`; returns it and that address once the rate-limit
/// service accepts connections.
pub async fn start_rls_gateway(yaml: &str, upstream: SocketAddr) -> (Gateway, SocketAddr) {
    let rls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = Gateway::start(&yaml.replace("{RLS}", &rls.to_string()), upstream).await;
    wait_until(
        "the rate-limit service's listener",
        Duration::from_secs(20),
        || async move { tokio::net::TcpStream::connect(rls).await.is_ok() },
    )
    .await;
    (gw, rls)
}

/// A client that connects from a given loopback source address (127.0.0.x are all local).
pub fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<std::net::IpAddr>().ok())
        .build()
        .expect("client")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A TCP relay on loopback that can add latency to every chunk it forwards (a slow Redis), or
/// only to what comes back (a reply delayed in transit, after Redis has acted on the call).
pub struct Relay {
    pub addr: SocketAddr,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    reply_delay_ms: Arc<std::sync::atomic::AtomicU64>,
    request_delay_ms: Arc<std::sync::atomic::AtomicU64>,
    cut: Arc<tokio::sync::Notify>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let std_listener = StdListener::bind("127.0.0.1:0").expect("bind relay");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reply_delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let request_delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (delay, reply_delay) = (delay_ms.clone(), reply_delay_ms.clone());
        let request_delay = request_delay_ms.clone();
        let cut = Arc::new(tokio::sync::Notify::new());
        let cut_all = cut.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    let (delay, reply_delay) = (delay.clone(), reply_delay.clone());
                    let request_delay = request_delay.clone();
                    let cut = cut_all.clone();
                    tokio::spawn(async move {
                        let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::select! {
                            _ = pump(ri, wo, vec![delay.clone(), request_delay]) => {}
                            _ = pump(ro, wi, vec![delay, reply_delay]) => {}
                            _ = cut.notified() => {}
                        }
                    });
                }
            });
        });
        Relay {
            addr,
            delay_ms,
            reply_delay_ms,
            request_delay_ms,
            cut,
        }
    }

    /// Closes every connection relayed so far (both ends), with whatever they had in flight
    /// (a proxy between the gateway and Redis restarting).
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }

    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Delays only what goes to the target.
    pub fn set_request_delay(&self, ms: u64) {
        self.request_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Delays only what the target sends back.
    pub fn set_reply_delay(&self, ms: u64) {
        self.reply_delay_ms.store(ms, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delays: Vec<Arc<std::sync::atomic::AtomicU64>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let ms: u64 = delays.iter().map(|d| d.load(Ordering::SeqCst)).sum();
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Numbers from /proc for a process: open fds, threads, resident memory in kB.
pub fn proc_stats(pid: u32) -> (usize, usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (fds, field("Threads:"), field("VmRSS:"))
}
