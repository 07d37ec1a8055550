//! Server assembly and lifecycle: builds the store, metrics and shared state, wires the Pingora
//! services (proxy, admin, optional demo upstream, the supervisor that runs the reloader), and runs them until
//! SIGTERM/SIGINT, then drains in-flight requests and the rate-limit service's connections
//! (bounded by `server.drain_timeout_ms`).

use crate::admin::AdminApp;
use crate::config::Config;
use crate::demo::DemoUpstream;
use crate::limiter::slot::{DecisionThread, StoreSlot};
use crate::limiter::StoreError;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::reload::Reloader;
use crate::state::Shared;
use crate::tls::CertResolver;
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{
    ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot set up the store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Metrics(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Rls(#[from] crate::rls::service::RlsStartError),
}

/// What to run.
pub struct RunOptions {
    pub config: Config,
    /// Where the config came from (reloaded on SIGHUP); none for the embedded demo.
    pub config_path: Option<PathBuf>,
    /// Also serve the built-in demo upstream on this address.
    pub demo_upstream: Option<SocketAddr>,
}

/// Builds the shared state for a config: store, metrics.
pub fn build_shared(config: Config) -> Result<Arc<Shared>, ServerError> {
    let metrics = Arc::new(Metrics::new().map_err(ServerError::Metrics)?);
    let store = StoreSlot::build(&config.store, &metrics.redis_late_refunds)?;
    Ok(Shared::new(config, store, metrics))
}

/// What Pingora's panic says when a service's listener cannot be opened: it retries a port in
/// use for 30 s, then panics on that service's own thread, and the process would go on without
/// the listener (the proxy without its admin port, or the reverse), never ready.
const LISTENER_PANIC: &str = "Failed to build listeners";

/// Ends the process (exit code 1) when a listener cannot be opened, as NGINX and Envoy do, so a
/// supervisor sees the failure instead of a process that can never serve. Any other panic keeps
/// the default behaviour.
fn exit_when_a_listener_cannot_open() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with(LISTENER_PANIC) {
            tracing::error!(%message, "a listener could not be opened; stopping");
            std::process::exit(1);
        }
    }));
}

/// Runs the gateway until SIGTERM/SIGINT. Returns after the drain.
pub fn run(opts: RunOptions) -> Result<(), ServerError> {
    let listen = opts.config.listen.clone();
    let admin_listen = opts.config.admin.listen;
    let settings = opts.config.server;
    let shared = build_shared(opts.config)?;
    let reloader = Reloader::new(shared.clone(), opts.config_path);

    let threads = match settings.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let conf = ServerConf {
        threads,
        // One runtime per thread, no stealing: measured 9-26% less CPU per request.
        work_stealing: false,
        // Pingora sleeps the whole grace period; the drain watcher below exits as soon as the
        // last in-flight request is done, so this is only the upper bound.
        grace_period_seconds: Some(settings.drain_timeout.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    exit_when_a_listener_cannot_open();

    // Listeners whose `min_version` is 1.3: the resolver refuses ClientHellos without a 1.3
    // suite, and the proxy refuses any request that arrives over a 1.2 session anyway.
    let tls13_only: Vec<std::net::SocketAddr> = listen
        .iter()
        .filter(|l| {
            l.tls
                .as_ref()
                .is_some_and(|t| t.min_version == crate::tls::MinVersion::Tls13)
        })
        .map(|l| l.address)
        .collect();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Gateway::new(shared.clone()).with_tls13_only(tls13_only),
    );
    if settings.h2c {
        // Plain listeners also take HTTP/2 with prior knowledge: Pingora peeks at the first
        // bytes of each connection and speaks HTTP/2 when they are the h2 preface, HTTP/1.1
        // otherwise. Every stream is a request through the same phases (and limits).
        if let Some(app) = proxy.app_logic_mut() {
            let mut options = pingora::apps::HttpServerOptions::default();
            options.h2c = true;
            app.server_options = Some(options);
        }
    }
    let mut resolvers = Vec::new();
    for l in &listen {
        match &l.tls {
            None => proxy.add_tcp(&l.address.to_string()),
            Some(tls) => {
                let resolver = Arc::new(CertResolver::new(l.address, tls));
                resolvers.push(resolver.clone());
                // The paths are unused: the resolver gives every certificate.
                let mut settings = TlsSettings::intermediate("", "")
                    .map_err(|e| ServerError::Tls(e.to_string()))?;
                settings.set_cert_resolver(resolver);
                // ALPN: h2, then http/1.1.
                settings.enable_h2();
                proxy.add_tls_with_settings(&l.address.to_string(), None, settings);
            }
        }
    }
    shared.tls.set(resolvers);
    let listen_ports: Vec<u16> = listen.iter().map(|l| l.address.port()).collect();
    let listen: Vec<String> = listen
        .iter()
        .map(|l| match l.tls {
            Some(_) => format!("https://{}", l.address),
            None => format!("http://{}", l.address),
        })
        .collect();
    let proxy = WarmStart {
        inner: proxy,
        shared: shared.clone(),
        threads,
        ports: listen_ports,
        admin_port: admin_listen.port(),
    };
    let mut admin = Service::new("tollgate admin".to_string(), AdminApp::new(shared.clone()));
    admin.add_tcp(&admin_listen.to_string());
    server.add_service(proxy);
    server.add_service(admin);
    if let Some(addr) = opts.demo_upstream {
        let mut demo = Service::new("tollgate demo upstream".to_string(), DemoUpstream);
        demo.add_tcp(&addr.to_string());
        server.add_service(demo);
    }
    server.add_service(background_service(
        "store connection and config reload",
        Supervisor {
            shared: shared.clone(),
            reloader: std::sync::Mutex::new(Some(reloader)),
        },
    ));

    let rls_listen = shared.config().rls.as_ref().map(|r| r.listen);
    let mut rls_thread = None;
    if let Some(address) = rls_listen {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        rls_thread = Some(crate::rls::service::start(
            shared.clone(),
            address,
            threads,
            stopped,
        )?);
        let mut phases = server.watch_execution_phase();
        std::thread::spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::GracefulTerminate | ExecutionPhase::ShutdownStarted) => {
                    let _ = stop.send(true);
                    return;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        });
    }
    spawn_drain_watcher(&server, shared.clone(), settings.drain_timeout, rls_thread);
    tracing::info!(?listen, admin = %admin_listen, "tollgate starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(TermSignals),
    });
    tracing::info!("tollgate stopped");
    Ok(())
}

/// The proxy service, started only once the store is ready to decide: it finds the proxy's
/// worker threads, opens the store's connection on each (bounded by
/// `store.redis.startup_wait_ms`), loads the runtime overrides held in Redis (within what is
/// left of that wait), and only then opens the listeners. Until then `/ready` answers 503
/// "starting"; past the wait the proxy starts degraded and says so.
struct WarmStart<S> {
    inner: S,
    shared: Arc<Shared>,
    threads: usize,
    /// The TCP ports of the proxy's listeners.
    ports: Vec<u16>,
    /// The admin listener's port: the proxy's listeners open only once it is bound.
    admin_port: u16,
}

#[async_trait]
impl<S: pingora::services::Service> pingora::services::Service for WarmStart<S> {
    async fn start_service(
        &mut self,
        fds: Option<pingora::server::ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let threads = discover_threads(self.threads).await;
        if threads.len() < self.threads {
            tracing::warn!(
                found = threads.len(),
                expected = self.threads,
                "not every proxy thread answered; the others decide over the store's own connection"
            );
        }
        self.shared.threads.set(threads);
        let slot = self.shared.store();
        // Logged by the slot either way; degraded start when it did not connect in time. A
        // reload that swaps the store meanwhile connected its own: stop waiting for this one.
        let replaced = async {
            while Arc::ptr_eq(&slot, &self.shared.store()) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = slot.connect(self.shared.threads.get()) => {}
            _ = replaced => tracing::info!("the store was replaced by a reload during start-up"),
        }
        // Runtime overrides held in Redis apply from the first request, when Redis answers
        // within what is left of the start-up wait; else the poll loads them later.
        let slot = self.shared.store();
        if slot.redis.is_some() {
            let left = slot
                .config
                .redis
                .startup_wait
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(100));
            match tokio::time::timeout(left, self.shared.overrides.sync(&slot)).await {
                Ok(Ok(_)) => tracing::info!(
                    held = self.shared.overrides.snapshot().len(),
                    "runtime overrides loaded from Redis"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "runtime overrides not loaded at start-up; the poll retries (YAML policies apply until then)"),
                Err(_) => tracing::warn!("runtime overrides not loaded within the start-up wait; the poll retries (YAML policies apply until then)"),
            }
        }
        // Nothing is served before the admin listener is up: were its port taken, the process
        // would exit after Pingora's retries (`exit_when_a_listener_cannot_open`), cutting
        // whatever the proxy had taken meanwhile. NGINX likewise binds everything first.
        if self.admin_port != 0 {
            let started = tokio::time::Instant::now();
            let mut said = false;
            while !crate::state::listening_on(&[self.admin_port]) {
                if !said && started.elapsed() > Duration::from_secs(2) {
                    tracing::warn!(
                        port = self.admin_port,
                        "waiting for the admin listener before opening the proxy's"
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // `/ready` says "ready" only once the listeners accept: Pingora binds them inside
        // `start_service`, which runs until shutdown, so watch for them from the side.
        let shared = self.shared.clone();
        let ports = self.ports.clone();
        shared.set_listen_ports(ports.clone());
        // No give-up: a listener that never opens (its port taken; Pingora retries the bind
        // every second) keeps `/ready` at 503, so a load balancer sends it nothing.
        pingora_runtime::current_handle().spawn(async move {
            let started = tokio::time::Instant::now();
            while !crate::state::listening_on(&ports) {
                let pause = if started.elapsed() < Duration::from_secs(1) {
                    5
                } else {
                    100
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            shared.set_listening();
        });
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }
}

/// The worker threads of the runtime this runs on (Pingora's no-steal runtime: one
/// current-thread runtime per thread), found by spawning probes on random workers until each
/// answered.
async fn discover_threads(expected: usize) -> Vec<DecisionThread> {
    let mut found: Vec<DecisionThread> = Vec::with_capacity(expected);
    for _ in 0..expected.max(1) * 64 {
        if found.len() >= expected {
            break;
        }
        let probe = pingora_runtime::current_handle().spawn(async {
            (
                std::thread::current().id(),
                tokio::runtime::Handle::current(),
            )
        });
        if let Ok((id, handle)) = probe.await {
            if !found.iter().any(|(seen, _)| *seen == id) {
                found.push((id, handle));
            }
        }
    }
    found
}

/// SIGTERM and SIGINT both stop gracefully (stop accepting, drain, exit 0).
struct TermSignals;

#[async_trait]
impl ShutdownSignalWatch for TermSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; waiting forever");
            std::future::pending::<()>().await;
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Once Pingora has stopped accepting, exit as soon as no request is in flight and the
/// rate-limit service (`rls`, its thread) has closed its connections (or when the drain timeout
/// passes, whichever is first), instead of sleeping the whole grace period. The service's own
/// graceful stop is what finishes a call whose stream was opened but not yet handled: its
/// connections close only once every call they took is answered, so exiting on the in-flight
/// count alone would reset those calls.
fn spawn_drain_watcher(
    server: &Server,
    shared: Arc<Shared>,
    timeout: Duration,
    rls: Option<std::thread::JoinHandle<()>>,
) {
    let mut phases = server.watch_execution_phase();
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::GracefulTerminate) => {
                let start = Instant::now();
                let rls_done = || rls.as_ref().is_none_or(|t| t.is_finished());
                // Idle twice in a row, 50 ms apart: a request whose header was still being read
                // at the first look is counted by the second.
                let mut idle_looks = 0;
                while idle_looks < 2 && start.elapsed() < timeout {
                    std::thread::sleep(Duration::from_millis(50));
                    idle_looks = if shared.in_flight() == 0 && rls_done() {
                        idle_looks + 1
                    } else {
                        0
                    };
                }
                let left = shared.in_flight();
                if left > 0 {
                    tracing::warn!(left, "drain timeout passed with requests in flight");
                } else if !rls_done() {
                    tracing::warn!(
                        "drain timeout passed with rate-limit service connections still open"
                    );
                } else {
                    tracing::info!(elapsed_ms = start.elapsed().as_millis() as u64, "drained");
                }
                // Responses are written before a request leaves the in-flight count.
                std::process::exit(0);
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    });
}

/// Connects the store (its connection tasks live on this service's runtime), starts the
/// reloader ([`crate::reload`]) on the same runtime (a new store is connected there too), the
/// certificate poll and the runtime-override poll ([`crate::override_store::poll`]), and
/// samples the runtime's task count.
struct Supervisor {
    shared: Arc<Shared>,
    /// Taken when the service starts.
    reloader: std::sync::Mutex<Option<Reloader>>,
}

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let reloader = self
            .reloader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(reloader) = reloader {
            tokio::spawn(reloader.serve(shutdown.clone()));
        }
        tokio::spawn(crate::tls::poll(self.shared.clone(), shutdown.clone()));
        tokio::spawn(crate::override_store::poll(
            self.shared.clone(),
            shutdown.clone(),
        ));
        let mut sample = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = sample.tick() => {
                    self.shared
                        .metrics
                        .runtime_tasks
                        .with_label_values(&["store"])
                        .set(tokio::runtime::Handle::current().metrics().num_alive_tasks() as i64);
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
