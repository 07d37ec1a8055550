//! Shared gateway state: the config generation in force (swapped atomically with arc-swap;
//! requests keep the generation they started with), the bucket store, the metrics, and the
//! count of requests in flight that graceful shutdown waits for.

use crate::config::{self, Config, ConfigError};
use crate::limiter::memory::MemoryStore;
use crate::limiter::Store;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Shared {
    config: ArcSwap<Config>,
    generation: AtomicU64,
    pub store: Arc<dyn Store>,
    /// The memory store when it is the store in use (for its size gauge).
    pub memory: Option<Arc<MemoryStore>>,
    pub metrics: Arc<Metrics>,
    in_flight: AtomicUsize,
    /// The file the config came from, for reloads (none for the embedded demo).
    pub config_path: Option<PathBuf>,
}

impl Shared {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        memory: Option<Arc<MemoryStore>>,
        metrics: Arc<Metrics>,
        config_path: Option<PathBuf>,
    ) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(config),
            generation: AtomicU64::new(1),
            store,
            memory,
            metrics,
            in_flight: AtomicUsize::new(0),
            config_path,
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

    /// Makes `config` the one in force for new requests.
    pub fn install(&self, config: Config) -> u64 {
        self.config.store(Arc::new(config));
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.config_generation.set(generation as i64);
        self.touch_metrics();
        generation
    }

    /// Re-reads the config file; an invalid file leaves the running config in force.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        let Some(path) = &self.config_path else {
            return Ok(self.generation());
        };
        match config::load(path) {
            Ok(config) => {
                let generation = self.install(config);
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(generation, file = %path.display(), "config reloaded");
                Ok(generation)
            }
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                for line in e.lines() {
                    tracing::error!("config reload rejected, previous config kept: {line}");
                }
                Err(e)
            }
        }
    }

    fn touch_metrics(&self) {
        let config = self.config();
        let store_label = self.store.kind().label();
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
        if let Some(memory) = &self.memory {
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
