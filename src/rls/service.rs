//! The rate-limit service's gRPC server: `RateLimitService/ShouldRateLimit` on tonic with
//! Envoy's generated types (`envoy-types`), the standard `grpc.health.v1` service following the
//! gateway's readiness, counting per domain, and a graceful stop: on SIGTERM the listener
//! closes, health turns NOT_SERVING, and every connection is closed the HTTP/2 way (GOAWAY;
//! the calls it took are answered first). The drain waits for that (the thread [`start`]
//! returns ends with the last connection), so no call the service was sent is cut off. It runs
//! on a runtime of its own, so a burst of RLS calls never queues behind proxied requests on
//! the proxy's threads. Its port opens at start-up, but a call is decided only once the store
//! has connected (or its start-up wait passed), as the proxy's listeners open only then; health
//! answers NOT_SERVING meanwhile. Connections are capped and timed out ([`super::conn`]).

use super::should_rate_limit;
use crate::limiter::slot::Readiness;
use crate::metrics::RequestDecision;
use crate::state::Shared;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

/// The gRPC service name health reports on, beside the whole server (`""`).
pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";
/// How often health follows readiness.
const HEALTH_EVERY: Duration = Duration::from_millis(200);
/// Largest `ShouldRateLimit` message (a real one is well under 1 KiB). The decoder reserves
/// a message's declared length as soon as its 5-byte prefix arrives, so this bounds what a
/// half-sent call holds: memory at most `rls.max_connections` x [`MAX_STREAMS`] x this.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Most calls in flight on one connection (Envoy opens another connection past it).
pub const MAX_STREAMS: u32 = 32;
/// HTTP/2 flow-control windows: what one stream and one connection may have unread.
const STREAM_WINDOW: u32 = 16 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// When the running config has no `rls` (it was removed by a reload).
const DEFAULT_MAX_CONNECTIONS: usize = crate::config::rls::DEFAULT_MAX_CONNECTIONS;
const DEFAULT_IDLE: Duration = Duration::from_millis(crate::config::rls::DEFAULT_IDLE_TIMEOUT_MS);
/// How often a call at start-up looks whether the store has connected.
const STARTUP_POLL: Duration = Duration::from_millis(10);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum RlsStartError {
    #[error("cannot listen on {address} (rls.listen): {source}")]
    Bind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the rate-limit service's runtime: {0}")]
    Runtime(std::io::Error),
}

/// `ShouldRateLimit`, answered from the shared state.
pub struct RlsService {
    shared: Arc<Shared>,
    /// Set once the store has finished connecting at start-up.
    started: AtomicBool,
}

impl RlsService {
    /// Holds a call until the store has finished connecting at start-up, as the proxy opens its
    /// listeners only then: a call decided earlier would go to the fallback (a fresh local
    /// burst), and its timeouts would open the breaker for every decision. Health answers
    /// meanwhile (NOT_SERVING). Once started, a store a reload brings is connected before it
    /// is swapped in.
    async fn wait_started(&self) {
        if self.started.load(Ordering::Acquire) {
            return;
        }
        store_connected(&self.shared).await;
        self.started.store(true, Ordering::Release);
    }

    fn count(&self, domain: &str, decision: RequestDecision) {
        self.shared
            .metrics
            .rls_requests
            .with_label_values(&[domain, decision.label()])
            .inc();
    }
}

#[tonic::async_trait]
impl RateLimitService for RlsService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let _in_flight = self.shared.enter();
        // A call keeps its connection's place under the cap (pings do not).
        if let Some(clock) = request.extensions().get::<super::conn::CallClock>() {
            clock.mark();
        }
        self.wait_started().await;
        if self.shared.config().rls.is_none() {
            // Removed by a reload: the port stays open until restart, but no domain is
            // served, and OK for everything would silently limit nothing.
            return Err(Status::unavailable(
                "the rate-limit service is not in the config in force (rls was removed by a \
                 reload); restart to close this port",
            ));
        }
        let req = request.into_inner();
        match should_rate_limit(&self.shared, &req).await {
            Ok(answer) => {
                self.count(&answer.domain_label, answer.counted_as);
                Ok(Response::new(answer.response))
            }
            Err(e) => {
                // Only a configured domain is a label value: cardinality stays bounded.
                let config = self.shared.config();
                let domain = config
                    .rls
                    .as_ref()
                    .filter(|r| r.domains.contains_key(&req.domain))
                    .map_or("", |_| req.domain.as_str());
                self.count(domain, RequestDecision::BadRequest);
                tracing::debug!(error = %e, "invalid ShouldRateLimit call");
                Err(Status::invalid_argument(e.0))
            }
        }
    }
}

/// Binds `rls.listen` now (a taken port is a start-up error) and serves on a runtime of
/// `threads` workers until `stop` says so; the thread returned ends once the server has closed
/// its last connection.
pub fn start(
    shared: Arc<Shared>,
    address: std::net::SocketAddr,
    threads: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>, RlsStartError> {
    let listener = std::net::TcpListener::bind(address)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| RlsStartError::Bind { address, source })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("tollgate-rls")
        .enable_all()
        .build()
        .map_err(RlsStartError::Runtime)?;
    // Its workers decide over Redis through lanes of their own (batched calls), as the proxy's
    // threads do; the store connects them when the proxy starts.
    shared
        .threads
        .add_others(worker_threads(&runtime, threads.max(1)));
    let handle = std::thread::Builder::new()
        .name("tollgate-rls".into())
        .spawn(move || runtime.block_on(serve(shared, listener, stop)))
        .map_err(RlsStartError::Runtime)?;
    Ok(handle)
}

/// The worker threads of `runtime` (up to `expected`), found with probes that each hold a
/// worker for a moment so that the others take the next ones.
fn worker_threads(
    runtime: &tokio::runtime::Runtime,
    expected: usize,
) -> Vec<crate::limiter::slot::DecisionThread> {
    let mut found: Vec<crate::limiter::slot::DecisionThread> = Vec::with_capacity(expected);
    for _ in 0..8 {
        if found.len() >= expected {
            break;
        }
        let probes: Vec<_> = (0..expected)
            .map(|_| {
                runtime.spawn(async {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    (
                        std::thread::current().id(),
                        tokio::runtime::Handle::current(),
                    )
                })
            })
            .collect();
        for probe in probes {
            if let Ok((id, handle)) = runtime.block_on(probe) {
                if !found.iter().any(|(seen, _)| *seen == id) {
                    found.push((id, handle));
                }
            }
        }
    }
    found
}

async fn serve(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let address = listener.local_addr().ok();
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the rate-limit service cannot use its listener");
            return;
        }
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    // The reporter starts with "" SERVING: NOT_SERVING until readiness says otherwise, set
    // before the first call can be taken.
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(follow_readiness(shared.clone(), reporter, stopping.clone()));
    let service = RateLimitServiceServer::new(RlsService {
        shared: shared.clone(),
        started: AtomicBool::new(false),
    })
    .max_decoding_message_size(MAX_MESSAGE);
    tracing::info!(
        ?address,
        "rate-limit service (envoy.service.ratelimit.v3) listening"
    );
    let (max_connections, idle) = shared
        .config()
        .rls
        .as_ref()
        .map_or((DEFAULT_MAX_CONNECTIONS, DEFAULT_IDLE), |r| {
            (r.max_connections, r.idle_timeout)
        });
    let incoming = super::conn::incoming(listener, max_connections, idle, stop.clone());
    let shutdown = async move {
        super::conn::stopped(&mut stop).await;
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("rate-limit service: draining calls in flight");
    };
    // Bounded per connection: streams, flow-control windows (what a client can make the
    // server buffer), header lists and messages.
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(super::conn::PING_EVERY))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the rate-limit service stopped");
    }
}

/// Resolves once the store in use has finished connecting: connected, or degraded when its
/// start-up wait (`store.redis.startup_wait_ms`) passed first. At once for the memory store.
async fn store_connected(shared: &Shared) {
    while shared.store().readiness() == Readiness::Connecting {
        tokio::time::sleep(STARTUP_POLL).await;
    }
}

/// Keeps `grpc.health.v1` in step with `/ready`: SERVING while it answers 200 (ready or
/// degraded with a fallback that decides), NOT_SERVING while starting, unavailable or stopping.
async fn follow_readiness(
    shared: Arc<Shared>,
    reporter: tonic_health::server::HealthReporter,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    // Set to NOT_SERVING before the first call could be taken.
    let mut last = ServingStatus::NotServing;
    loop {
        tick.tick().await;
        let ready = crate::admin::ready_report(&shared).0 == http::StatusCode::OK
            && shared.config().rls.is_some()
            && !stopping.load(std::sync::atomic::Ordering::SeqCst);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        // Watchers hear of changes only.
        if status != last {
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SERVICE_NAME, status).await;
            last = status;
        }
    }
}
