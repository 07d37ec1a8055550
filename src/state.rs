//! Shared gateway state: the config generation in force (swapped atomically with arc-swap;
//! requests keep the generation they started with), the bucket store, the runtime overrides,
//! the metrics, and the
//! count of requests in flight that graceful shutdown waits for. Only state: reading,
//! validating and swapping in a new config is [`crate::reload`]'s job.

use crate::config::Config;
use crate::limiter::breaker::Breaker;
use crate::limiter::clock::MonotonicClock;
use crate::limiter::decider::Decider;
use crate::limiter::deny_cache::DenyCache;
use crate::limiter::memory::MemoryStore;
use crate::limiter::slot::{DecisionThreads, StoreSlot};
use crate::limiter::StoreKind;
use crate::metrics::Metrics;
use crate::override_store::OverrideStore;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Most denials the deny cache remembers at once.
pub const DENY_CACHE_CAPACITY: usize = 100_000;

pub struct Shared {
    config: ArcSwap<Config>,
    generation: AtomicU64,
    store: ArcSwap<StoreSlot>,
    /// The breaker and local fallback around the store.
    pub decider: Decider,
    /// The proxy's worker threads (a Redis store opens a connection on each).
    pub threads: DecisionThreads,
    pub metrics: Arc<Metrics>,
    in_flight: AtomicUsize,
    /// Whether the proxy's listeners are open (set once, at start-up): `/ready` is 503
    /// "starting" until then.
    listening: AtomicBool,
    /// The proxy's ports, known once Pingora is about to bind them: until the watcher sees them
    /// listening, [`Shared::listening`] asks the kernel itself.
    listen_ports: std::sync::OnceLock<Vec<u16>>,
    /// The certificate resolvers of the running TLS listeners.
    pub tls: crate::tls::TlsListeners,
    /// The runtime overrides (admin API), as this instance holds them.
    pub overrides: OverrideStore,
}

impl Shared {
    pub fn new(config: Config, store: StoreSlot, metrics: Arc<Metrics>) -> Arc<Shared> {
        let clock = Arc::new(MonotonicClock::new());
        let breaker = Arc::new(Breaker::new(
            &config.breaker,
            clock.clone(),
            metrics.breaker_state.clone(),
        ));
        let local = Arc::new(MemoryStore::with_kind(
            usize::try_from(config.store.max_buckets).unwrap_or(usize::MAX),
            clock.clone(),
            StoreKind::LocalFallback,
        ));
        let deny_cache = DenyCache::new(DENY_CACHE_CAPACITY, clock);
        let decider = Decider::new(breaker, local, deny_cache, metrics.clone());
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(config),
            generation: AtomicU64::new(1),
            store: ArcSwap::from_pointee(store),
            decider,
            threads: DecisionThreads::default(),
            metrics: metrics.clone(),
            in_flight: AtomicUsize::new(0),
            listening: AtomicBool::new(false),
            listen_ports: std::sync::OnceLock::new(),
            tls: crate::tls::TlsListeners::default(),
            overrides: OverrideStore::new(metrics.overrides_held.clone()),
        });
        shared.metrics.config_generation.set(1);
        shared.touch_metrics();
        shared
    }

    /// The config generation in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The store in use now.
    pub fn store(&self) -> Arc<StoreSlot> {
        self.store.load_full()
    }

    /// Makes `config` the one in force for new requests.
    pub fn install(&self, config: Config) -> u64 {
        self.decider.breaker.configure(&config.breaker);
        // Limits may have changed: a remembered denial may no longer hold.
        self.decider.deny_cache.clear();
        self.config.store(Arc::new(config));
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.config_generation.set(generation as i64);
        self.touch_metrics();
        generation
    }

    /// Puts `slot` in use for new decisions; returns the one it replaces (requests in flight
    /// finish on it; the caller closes it later).
    pub fn swap_store(&self, slot: StoreSlot) -> Arc<StoreSlot> {
        self.store.swap(Arc::new(slot))
    }

    fn touch_metrics(&self) {
        let config = self.config();
        let store_label = self.store().store.kind().label();
        for route in config.router.routes() {
            self.metrics.touch_route(&route.name, store_label);
        }
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.metrics.in_flight.inc();
        InFlight {
            shared: self.clone(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Marks the proxy's listeners as open.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }

    /// Records the proxy's ports as Pingora is about to bind them (set once).
    pub fn set_listen_ports(&self, ports: Vec<u16>) {
        let _ = self.listen_ports.set(ports);
    }

    /// Whether the proxy's listeners are open. Between the bind and the watcher's next look
    /// (it polls every few milliseconds) the kernel is asked here, so a client that could
    /// already connect is never told "starting".
    pub fn listening(&self) -> bool {
        if self.listening.load(Ordering::SeqCst) {
            return true;
        }
        let open = self
            .listen_ports
            .get()
            .is_some_and(|ports| listening_on(ports));
        if open {
            self.set_listening();
        }
        open
    }

    /// Refreshes gauges that are read rather than counted.
    pub fn refresh_gauges(&self) {
        if let Some(memory) = &self.store().memory {
            let m = &self.metrics.memory_buckets;
            m.with_label_values(&["held"]).set(memory.len() as i64);
            m.with_label_values(&["capacity"])
                .set(memory.capacity() as i64);
            m.with_label_values(&["evicted_total"])
                .set(memory.evictions() as i64);
        }
    }
}

/// A request in flight; dropping it ends the request.
pub struct InFlight {
    shared: Arc<Shared>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.shared.metrics.in_flight.dec();
    }
}

/// Whether every port in `ports` has a listening TCP socket of this process, read from the
/// kernel's socket tables (no probe connection): a socket counts when its inode is one of this
/// process's descriptors, so a port another process holds (ours then never opened) does not.
/// Port 0 (the kernel picks one) cannot be checked and is left out. Where the tables cannot
/// be read, true.
pub fn listening_on(ports: &[u16]) -> bool {
    let mut tables = String::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            tables.push_str(&text);
        }
    }
    if tables.is_empty() {
        return true;
    }
    let ours = own_socket_inodes();
    // Lines: `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`,
    // addresses as HEXIP:HEXPORT, LISTEN is 0A.
    let listening: Vec<u16> = tables
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().take(10).collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            if *state != "0A" {
                return None;
            }
            if let Some(ours) = &ours {
                if !ours.contains(&inode.parse::<u64>().ok()?) {
                    return None;
                }
            }
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect();
    ports.iter().all(|p| *p == 0 || listening.contains(p))
}

/// The inodes of this process's sockets (`/proc/self/fd/N -> socket:[INODE]`), or none where
/// the descriptors cannot be listed.
fn own_socket_inodes() -> Option<std::collections::HashSet<u64>> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        entries
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_str()?;
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::listening_on;

    #[test]
    fn a_bound_listener_is_seen_and_a_closed_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening_on(&[port]));
        drop(listener);
        assert!(!listening_on(&[port]));
        // An unbound port among bound ones: not every listener is open.
        let other = std::net::TcpListener::bind("[::1]:0").unwrap();
        let other_port = other.local_addr().unwrap().port();
        assert!(listening_on(&[other_port]));
        assert!(!listening_on(&[other_port, port]));
    }

    /// A port another process listens on is not this process's listener (a `listen` whose
    /// port is taken never opened, whatever the kernel's table shows for that port).
    #[test]
    fn another_process_listening_on_the_port_is_not_ours() {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket, sys, time\n\
                 s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n\
                 print(s.getsockname()[1], flush=True); sys.stdin.read()",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let seen = listening_on(&[port]);
        drop(child.stdin.take());
        let _ = child.wait();
        assert!(!seen, "port {port} is another process's listener");
    }
}
