//! A small ghz-like load driver for rate-limit decisions, used by `bench/run.sh` (scenarios
//! `rls`, `rlsr`, `chk`, `chkr`). It keeps `--concurrency` calls in flight (closed loop: each
//! worker sends its next call when the last one is answered) for `--duration` seconds, against
//! either
//!
//! - `--rls ADDR`: the gateway's Envoy rate-limit service, `ShouldRateLimit` over gRPC (h2c),
//!   spread over `--connections` HTTP/2 connections (default 1, as ghz; the workers share them
//!   round-robin, so each connection carries concurrency / connections streams), or
//! - `--check URL`: the admin API's `POST /v1/check` over HTTP/1.1 keep-alive, one connection
//!   per worker.
//!
//! Each call carries `--descriptors K` descriptors; descriptor `i` is the single entry
//! `(d<i>, v<r>)` with `r` drawn uniformly from `--keys M` values. The `/v1/check` body is the
//! same decision for a route whose limit `i` is keyed by `header:x-d<i>`:
//! `{"route": ROUTE, "key": {"header:x-d0": "v<r>", ...}}`.
//!
//! It prints one line, `JSON {...}`: `requests` (decisions answered: `ok` + `over_limit`),
//! `duration_us`, `decisions_per_s`, `p50_us`/`p99_us`/`p999_us`/`max_us` (latency of the
//! answered calls), `ok`, `over_limit`, `errors` (gRPC errors, HTTP statuses other than 200,
//! transport errors and calls over `--timeout-ms`), and `driver_cpu_us` (this process's CPU
//! time over the run, Linux only). It exits non-zero when it cannot connect or no call was
//! answered.
//!
//! ```sh
//! cargo run --release --example rls_load -- --rls 127.0.0.1:8081 --concurrency 32 --duration 10 \
//!     --descriptors 3 --keys 10000
//! cargo run --release --example rls_load -- --check http://127.0.0.1:9901/v1/check --route api
//! ```

use clap::Parser;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug, Clone)]
#[command(about = "ghz-like load for Tollgate's rate-limit decisions (gRPC RLS or /v1/check)")]
struct Args {
    /// The rate-limit service's address (HOST:PORT), called over gRPC.
    #[arg(long, conflicts_with = "check", required_unless_present = "check")]
    rls: Option<String>,
    /// The admin API's check URL (http://HOST:PORT/v1/check), called over HTTP/1.1.
    #[arg(long)]
    check: Option<String>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections the gRPC calls share (--rls only; /v1/check uses one per worker).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Descriptors per call (limits per /v1/check).
    #[arg(long, default_value_t = 1)]
    descriptors: usize,
    /// Distinct values per descriptor.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// The RLS domain.
    #[arg(long, default_value = "bench")]
    domain: String,
    /// The route /v1/check decides for.
    #[arg(long, default_value = "bench")]
    route: String,
    /// A call not answered within this is an error.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Worker threads of the driver's runtime (1: a single-thread runtime, like `wrk -t1`).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    over_limit: u64,
    errors: u64,
    /// Latency of each answered call, microseconds.
    latencies_us: Vec<u64>,
}

enum Outcome {
    Ok,
    OverLimit,
    Error,
}

/// xorshift64*: enough to spread keys, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn seed(worker: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    nanos ^ ((worker as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn rls_request(args: &Args, rng: &mut Rng) -> RateLimitRequest {
    RateLimitRequest {
        domain: args.domain.clone(),
        descriptors: (0..args.descriptors)
            .map(|i| RateLimitDescriptor {
                entries: vec![Entry {
                    key: format!("d{i}"),
                    value: format!("v{}", rng.below(args.keys)),
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

fn check_body(args: &Args, rng: &mut Rng) -> String {
    let key: serde_json::Map<String, serde_json::Value> = (0..args.descriptors)
        .map(|i| {
            (
                format!("header:x-d{i}"),
                format!("v{}", rng.below(args.keys)).into(),
            )
        })
        .collect();
    serde_json::json!({"route": args.route, "key": key}).to_string()
}

/// The parts of a `/v1/check` answer the driver reads.
#[derive(serde::Deserialize)]
struct CheckAnswer {
    allowed: bool,
}

async fn rls_call(client: &mut RateLimitServiceClient<Channel>, req: RateLimitRequest) -> Outcome {
    match client.should_rate_limit(req).await {
        Ok(resp) => match Code::try_from(resp.into_inner().overall_code) {
            Ok(Code::Ok) => Outcome::Ok,
            Ok(Code::OverLimit) => Outcome::OverLimit,
            _ => Outcome::Error,
        },
        Err(_) => Outcome::Error,
    }
}

async fn check_call(client: &reqwest::Client, url: &str, body: String) -> Outcome {
    let resp = match client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => return Outcome::Error,
    };
    if resp.status() != reqwest::StatusCode::OK {
        // Read the body anyway so the connection stays reusable.
        let _ = resp.bytes().await;
        return Outcome::Error;
    }
    match resp.bytes().await {
        Ok(b) => match serde_json::from_slice::<CheckAnswer>(&b) {
            Ok(a) if a.allowed => Outcome::Ok,
            Ok(_) => Outcome::OverLimit,
            Err(_) => Outcome::Error,
        },
        Err(_) => Outcome::Error,
    }
}

/// The client a worker calls with.
#[derive(Clone)]
enum Client {
    Rls(RateLimitServiceClient<Channel>),
    Check(reqwest::Client, String),
}

async fn worker(args: Args, mut client: Client, index: usize, until: Instant) -> Tally {
    let mut rng = Rng::new(seed(index));
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut tally = Tally {
        latencies_us: Vec::with_capacity(1 << 16),
        ..Tally::default()
    };
    while Instant::now() < until {
        let started = Instant::now();
        let outcome = match &mut client {
            Client::Rls(c) => {
                let req = rls_request(&args, &mut rng);
                tokio::time::timeout(timeout, rls_call(c, req)).await
            }
            Client::Check(c, url) => {
                let body = check_body(&args, &mut rng);
                tokio::time::timeout(timeout, check_call(c, url, body)).await
            }
        };
        let took = started.elapsed().as_micros() as u64;
        match outcome {
            Ok(Outcome::Ok) => tally.ok += 1,
            Ok(Outcome::OverLimit) => tally.over_limit += 1,
            Ok(Outcome::Error) | Err(_) => {
                tally.errors += 1;
                // An error that comes back at once (connection refused) would spin.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        }
        tally.latencies_us.push(took);
    }
    tally
}

/// User + system CPU of this process, microseconds (Linux `/proc/self/stat`).
fn cpu_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the `(comm)`, which may hold spaces: utime is field 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // CLK_TCK is 100 on every Linux this runs on.
    Some(ticks * 10_000)
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64) * q) as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn connect(args: &Args) -> Result<Vec<Client>, String> {
    let workers = args.concurrency.max(1);
    if let Some(addr) = &args.rls {
        let uri = if addr.contains("://") {
            addr.clone()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| format!("bad --rls {addr}: {e}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let mut channels = Vec::new();
        for _ in 0..args.connections.clamp(1, workers) {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("cannot connect to {uri}: {e}"))?;
            channels.push(RateLimitServiceClient::new(channel));
        }
        Ok((0..workers)
            .map(|w| Client::Rls(channels[w % channels.len()].clone()))
            .collect())
    } else if let Some(url) = &args.check {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(workers)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok((0..workers)
            .map(|_| Client::Check(client.clone(), url.clone()))
            .collect())
    } else {
        Err("give --rls ADDR or --check URL".into())
    }
}

async fn run(args: Args) -> Result<String, String> {
    let clients = connect(&args).await?;
    let cpu0 = cpu_us();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.duration.max(0.0));
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(worker(args.clone(), c, i, until)))
        .collect();
    let mut total = Tally::default();
    for h in handles {
        let t = h.await.map_err(|e| format!("a worker failed: {e}"))?;
        total.ok += t.ok;
        total.over_limit += t.over_limit;
        total.errors += t.errors;
        total.latencies_us.extend(t.latencies_us);
    }
    let elapsed = started.elapsed();
    let driver_cpu = match (cpu0, cpu_us()) {
        (Some(a), Some(b)) => serde_json::Value::from(b.saturating_sub(a)),
        _ => serde_json::Value::Null,
    };
    total.latencies_us.sort_unstable();
    let lat = &total.latencies_us;
    let answered = total.ok + total.over_limit;
    if answered == 0 {
        return Err(format!(
            "no call was answered ({} errors in {:.1} s)",
            total.errors,
            elapsed.as_secs_f64()
        ));
    }
    let line = serde_json::json!({
        "mode": if args.rls.is_some() { "rls" } else { "check" },
        "concurrency": args.concurrency,
        "connections": if args.rls.is_some() { args.connections.clamp(1, args.concurrency.max(1)) } else { args.concurrency.max(1) },
        "descriptors": args.descriptors,
        "keys": args.keys,
        "requests": answered,
        "duration_us": elapsed.as_micros() as u64,
        "decisions_per_s": answered as f64 / elapsed.as_secs_f64(),
        "p50_us": percentile(lat, 0.50),
        "p99_us": percentile(lat, 0.99),
        "p999_us": percentile(lat, 0.999),
        "max_us": lat.last().copied().unwrap_or(0),
        "ok": total.ok,
        "over_limit": total.over_limit,
        "errors": total.errors,
        "driver_cpu_us": driver_cpu,
    });
    Ok(format!("JSON {line}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.descriptors == 0 || args.keys == 0 {
        eprintln!("rls_load: --descriptors and --keys must be at least 1");
        return ExitCode::from(2);
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rls_load: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rls_load: {e}");
            ExitCode::FAILURE
        }
    }
}
