//! Real Redis processes for tests: a standalone server, a 3-master Cluster, and a
//! master + replica + sentinels, each on free loopback ports in a temp dir, stopped on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use super::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` (or sentinel) process.
pub struct RedisProcess {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    program: &'static str,
    args: Vec<String>,
    /// The CA to trust, for a TLS-only server.
    tls: Option<std::path::PathBuf>,
}

fn cli(port: u16, args: &[&str]) -> Option<String> {
    cli_tls(port, None, args)
}

fn cli_tls(port: u16, ca: Option<&std::path::Path>, args: &[&str]) -> Option<String> {
    let mut command = Command::new("redis-cli");
    if let Some(ca) = ca {
        command.arg("--tls").arg("--cacert").arg(ca);
    }
    let out = command
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl RedisProcess {
    fn spawn(port: u16, dir: tempfile::TempDir, args: Vec<String>) -> RedisProcess {
        Self::spawn_program("redis-server", port, dir, args)
    }

    fn spawn_program(
        program: &'static str,
        port: u16,
        dir: tempfile::TempDir,
        args: Vec<String>,
    ) -> RedisProcess {
        let mut p = RedisProcess {
            port,
            child: None,
            dir,
            program,
            args,
            tls: None,
        };
        p.launch();
        p
    }

    fn launch(&mut self) {
        let child = Command::new(self.program)
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} is not runnable: {e}", self.program));
        self.child = Some(child);
        self.wait_ping();
    }

    fn wait_ping(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if cli_tls(self.port, self.tls.as_deref(), &["PING"]).as_deref() == Some("PONG") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis on port {} did not answer PING", self.port);
    }

    /// A standalone server listening on IPv6 loopback (`::1`) as well.
    pub fn standalone_dual_stack() -> RedisProcess {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut args = base_args(port);
        if let Some(bind) = args.iter_mut().find(|a| *a == "127.0.0.1") {
            *bind = "127.0.0.1 ::1".to_string();
        }
        RedisProcess::spawn(port, dir, args)
    }

    /// A standalone server with persistence off.
    pub fn standalone() -> RedisProcess {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        RedisProcess::spawn(port, dir, base_args(port))
    }

    /// A standalone server that speaks only TLS, with a certificate for 127.0.0.1 signed by a
    /// fresh CA; returns the server and the CA file to trust.
    pub fn tls() -> (RedisProcess, std::path::PathBuf) {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl is on PATH");
            assert!(status.success(), "openssl {args:?}");
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        let ca = dir.path().join("ca.crt");
        let args: Vec<String> = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut p = RedisProcess {
            port,
            child: None,
            dir,
            program: "redis-server",
            args,
            tls: Some(ca.clone()),
        };
        p.launch();
        (p, ca)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs a redis-cli command against this server.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        cli_tls(self.port, self.tls.as_deref(), args)
    }

    /// `EVALSHA` calls this server has run (from `INFO commandstats`).
    pub fn evalsha_calls(&self) -> u64 {
        self.cli(&["INFO", "commandstats"])
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same server again (empty: persistence is off).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A paused server must be resumed to die cleanly.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

fn base_args(port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A free loopback port for a Cluster node: the node also listens on port + 10000 (its bus), so
/// both must be free and the port at most 55535; the kernel's ephemeral range goes above that.
fn cluster_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((seed.wrapping_add(n.wrapping_mul(104_729))) % 25_000) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// A real 3-master Redis Cluster on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisProcess>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisProcess> = (0..3)
            .map(|_| {
                let port = cluster_port();
                let dir = tempfile::tempdir().unwrap();
                let mut args = base_args(port);
                args.extend(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ]
                    .iter()
                    .map(|s| s.to_string()),
                );
                RedisProcess::spawn(port, dir, args)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create");
        assert!(status.success(), "cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster never reached state ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// Keys held by each node.
    pub fn keys_per_node(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| {
                n.cli(&["DBSIZE"])
                    .and_then(|s| s.parse::<usize>().ok())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Keys held by the whole cluster.
    pub fn total_keys(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                n.cli(&["DBSIZE"])
                    .and_then(|s| s.parse::<usize>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// A master, a replica and three sentinels watching them, on loopback.
pub struct RedisSentinels {
    pub master: RedisProcess,
    pub replica: RedisProcess,
    pub sentinels: Vec<RedisProcess>,
    pub service: String,
}

impl RedisSentinels {
    pub fn start() -> RedisSentinels {
        let master = RedisProcess::standalone();
        let replica_port = free_port();
        let mut args = base_args(replica_port);
        args.extend(
            ["--replicaof", "127.0.0.1", &master.port.to_string()]
                .iter()
                .map(|s| s.to_string()),
        );
        let replica = RedisProcess::spawn(replica_port, tempfile::tempdir().unwrap(), args);
        let service = "tollgate-test".to_string();
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let dir = tempfile::tempdir().unwrap();
                let conf = format!(
                    "port {port}\nbind 127.0.0.1\nsentinel resolve-hostnames no\n\
                     sentinel monitor {service} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {service} 1000\n\
                     sentinel failover-timeout {service} 5000\n\
                     sentinel parallel-syncs {service} 1\n",
                    master.port
                );
                let path = dir.path().join("sentinel.conf");
                std::fs::write(&path, conf).unwrap();
                // Debian's redis-sentinel package (a real sentinel process).
                RedisProcess::spawn_program(
                    "redis-sentinel",
                    port,
                    dir,
                    vec![path.to_string_lossy().into_owned()],
                )
            })
            .collect();
        let s = RedisSentinels {
            master,
            replica,
            sentinels,
            service,
        };
        s.wait_replica_synced();
        s
    }

    fn wait_replica_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .replica
                .cli(&["INFO", "replication"])
                .is_some_and(|i| i.contains("master_link_status:up"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("replica never synced");
    }

    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(|s| s.url()).collect()
    }

    /// The port the sentinels name as master now.
    pub fn current_master_port(&self) -> Option<u16> {
        let out = self.sentinels[0].cli(&["SENTINEL", "get-master-addr-by-name", &self.service])?;
        out.lines().nth(1)?.trim().parse().ok()
    }
}
