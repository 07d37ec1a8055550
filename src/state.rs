//! Shared gateway state: the config generation in force (swapped atomically with arc-swap;
//! requests keep the generation they started with), the bucket store, the metrics, and the
//! count of requests in flight that graceful shutdown waits for.

use crate::config::{self, Config, ConfigError};
use crate::limiter::breaker::Breaker;
use crate::limiter::clock::MonotonicClock;
use crate::limiter::decider::Decider;
use crate::limiter::deny_cache::DenyCache;
use crate::limiter::memory::MemoryStore;
use crate::limiter::slot::{DecisionThreads, StoreSlot};
use crate::limiter::StoreKind;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// The file the config came from, for reloads (none for the embedded demo).
    pub config_path: Option<PathBuf>,
    /// Digest of the config text last loaded or rejected (a watch event that changed nothing
    /// does not reload, and a bad file is reported once, not once per event).
    last_digest: std::sync::Mutex<Option<u64>>,
}

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// SIGHUP: always reload.
    Signal,
    /// The file watcher: reload only if the text changed.
    FileChanged,
}

impl Shared {
    pub fn new(
        config: Config,
        store: StoreSlot,
        metrics: Arc<Metrics>,
        config_path: Option<PathBuf>,
    ) -> Arc<Shared> {
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
            last_digest: std::sync::Mutex::new(
                config_path
                    .as_deref()
                    .and_then(|p| config::read(p).ok())
                    .map(|t| config::digest(&t)),
            ),
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

    /// Re-reads the config file; an invalid file leaves the running config in force. When the
    /// `store` section changed, the new store is built and connected first, then swapped in
    /// with the config; requests in flight finish on the old one, which is closed afterwards.
    pub async fn reload(&self, trigger: ReloadTrigger) -> Result<u64, ConfigError> {
        let Some(path) = &self.config_path else {
            return Ok(self.generation());
        };
        let text = match config::read(path) {
            Ok(text) => text,
            Err(e) if trigger == ReloadTrigger::FileChanged && !path.exists() => {
                // Mid-rename, or deleted: keep serving and wait for the next event.
                tracing::debug!(error = %e, "config file absent; waiting for it to reappear");
                return Ok(self.generation());
            }
            Err(e) => return Err(self.rejected(e)),
        };
        let digest = config::digest(&text);
        {
            let mut last = self.last_digest.lock().unwrap_or_else(|p| p.into_inner());
            if trigger == ReloadTrigger::FileChanged && *last == Some(digest) {
                return Ok(self.generation());
            }
            *last = Some(digest);
        }
        let config = match config::load_text(&text, path) {
            Ok(config) => config,
            Err(e) => return Err(self.rejected(e)),
        };
        if config.store != self.store().config {
            match StoreSlot::build(&config.store) {
                Ok(slot) => {
                    // Every connection a decision will use is open before the swap; a store
                    // that cannot connect within the start-up wait is not swapped in.
                    if let Err(e) = slot.connect(self.threads.get()).await {
                        slot.close().await;
                        self.metrics
                            .config_reloads
                            .with_label_values(&["error"])
                            .inc();
                        tracing::error!(error = %e, "config reload rejected: the new store did not connect within store.redis.startup_wait_ms; previous config and store kept");
                        return Err(ConfigError::Invalid {
                            file: path.display().to_string(),
                            problems: vec![config::Problem::at(
                                "store",
                                format!("the new store did not connect: {e}"),
                            )],
                        });
                    }
                    let old = self.store.swap(Arc::new(slot));
                    tracing::info!("store replaced after a config change");
                    tokio::spawn(async move {
                        // Let decisions in flight on the old store finish.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        old.close().await;
                    });
                }
                Err(e) => {
                    self.metrics
                        .config_reloads
                        .with_label_values(&["error"])
                        .inc();
                    tracing::error!(error = %e, "config reload rejected: cannot build the new store");
                    return Err(ConfigError::Invalid {
                        file: path.display().to_string(),
                        problems: vec![config::Problem::at("store", e.to_string())],
                    });
                }
            }
        }
        let generation = self.install(config);
        self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        tracing::info!(generation, file = %path.display(), "config reloaded");
        Ok(generation)
    }

    fn rejected(&self, e: ConfigError) -> ConfigError {
        self.metrics
            .config_reloads
            .with_label_values(&["error"])
            .inc();
        for line in e.lines() {
            tracing::error!("config reload rejected, previous config kept: {line}");
        }
        e
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
