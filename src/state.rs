//! Shared gateway state: the config generation in force (swapped atomically with arc-swap;
//! requests keep the generation they started with), the bucket store, the metrics, and the
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
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// The certificate resolvers of the running TLS listeners.
    pub tls: crate::tls::TlsListeners,
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
            metrics,
            in_flight: AtomicUsize::new(0),
            tls: crate::tls::TlsListeners::default(),
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
