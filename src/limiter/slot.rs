//! The store slot: the store a config asks for (memory or Redis), whether every connection a
//! decision will use is open yet, and the threads that decide. A Redis store is connected once,
//! on every deciding thread, before it takes decisions: at start-up before the proxy listener
//! opens, and on a reload before it is swapped in.

use super::clock::MonotonicClock;
use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::settings::{StoreConfig, StoreKindConfig};
use super::{Store, StoreError};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;

/// One thread that decides requests (a proxy worker), and its runtime.
pub type DecisionThread = (ThreadId, tokio::runtime::Handle);

/// The threads that decide: the proxy's workers, found once at start-up, and those of the
/// rate-limit service's runtime (`rls`), registered before; a Redis store opens one
/// connection (and one batcher, its *lane*) for each.
#[derive(Default)]
pub struct DecisionThreads {
    all: OnceLock<Vec<DecisionThread>>,
    others: std::sync::Mutex<Vec<DecisionThread>>,
}

impl DecisionThreads {
    /// Records the proxy's threads, with the others registered so far (the first call wins).
    pub fn set(&self, proxy: Vec<DecisionThread>) {
        let mut all = proxy;
        if let Ok(others) = self.others.lock() {
            all.extend(others.iter().cloned());
        }
        let _ = self.all.set(all);
    }

    /// Registers threads other than the proxy's that decide (before the proxy starts).
    pub fn add_others(&self, threads: Vec<DecisionThread>) {
        if let Ok(mut others) = self.others.lock() {
            others.extend(threads);
        }
    }

    /// The threads, or none before the proxy started.
    pub fn get(&self) -> &[DecisionThread] {
        self.all.get().map_or(&[], Vec::as_slice)
    }
}

/// Whether a store can take decisions yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Connections are being opened.
    Connecting,
    /// Every connection a decision will use is open and the script is loaded.
    Ready,
    /// The start-up wait passed without every connection open: decisions that cannot reach
    /// Redis go to the breaker's fallback; connections keep retrying in the background.
    Degraded,
}

impl Readiness {
    fn from_u8(v: u8) -> Readiness {
        match v {
            0 => Readiness::Connecting,
            1 => Readiness::Ready,
            _ => Readiness::Degraded,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Readiness::Connecting => 0,
            Readiness::Ready => 1,
            Readiness::Degraded => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Readiness::Connecting => "connecting",
            Readiness::Ready => "ready",
            Readiness::Degraded => "degraded",
        }
    }
}

/// The store in use, and the config it was built from.
pub struct StoreSlot {
    pub store: Arc<dyn Store>,
    /// Set when the store is the memory store (for its size gauge).
    pub memory: Option<Arc<MemoryStore>>,
    /// Set when the store is Redis (for connect, readiness, close).
    pub redis: Option<Arc<RedisStore>>,
    pub config: StoreConfig,
    readiness: AtomicU8,
}

impl StoreSlot {
    /// The Redis URLs as they may be logged (no passwords).
    fn logged_urls(&self) -> Vec<String> {
        self.config
            .redis
            .urls
            .iter()
            .map(|u| crate::redact::url_without_password(u).into_owned())
            .collect()
    }

    /// Builds the store a config asks for; a Redis store is not connected yet, and counts the
    /// requests it refunds late into `late_refunds`.
    pub fn build(
        config: &StoreConfig,
        late_refunds: &Arc<AtomicU64>,
    ) -> Result<StoreSlot, StoreError> {
        match config.kind {
            StoreKindConfig::Memory => {
                let memory = Arc::new(MemoryStore::new(
                    usize::try_from(config.max_buckets).unwrap_or(usize::MAX),
                    Arc::new(MonotonicClock::new()),
                ));
                Ok(StoreSlot {
                    store: memory.clone(),
                    memory: Some(memory),
                    redis: None,
                    config: config.clone(),
                    readiness: AtomicU8::new(Readiness::Ready.to_u8()),
                })
            }
            StoreKindConfig::Redis => {
                let redis = Arc::new(
                    RedisStore::new(&config.redis)?.count_late_refunds_in(late_refunds.clone()),
                );
                Ok(StoreSlot {
                    store: redis.clone(),
                    memory: None,
                    redis: Some(redis),
                    config: config.clone(),
                    readiness: AtomicU8::new(Readiness::Connecting.to_u8()),
                })
            }
        }
    }

    /// Opens every connection a decision will use (the store's own, and one per deciding
    /// thread) and loads the script, waiting at most `store.redis.startup_wait`. A no-op for
    /// the memory store. Past the wait the store is marked degraded and keeps connecting in
    /// the background; the error says why.
    pub async fn connect(&self, threads: &[DecisionThread]) -> Result<(), StoreError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let wait = self.config.redis.startup_wait;
        match redis.connect(threads, wait).await {
            Ok(()) => {
                self.set_readiness(Readiness::Ready);
                tracing::info!(
                    urls = ?self.logged_urls(),
                    connections = threads.len() + 1,
                    "connected to Redis on every deciding thread, script loaded"
                );
                Ok(())
            }
            Err(e) => {
                self.set_readiness(Readiness::Degraded);
                tracing::warn!(
                    error = %e,
                    urls = ?self.logged_urls(),
                    wait_ms = wait.as_millis() as u64,
                    "Redis not ready within the start-up wait: serving degraded (decisions that \
                     cannot reach Redis use the breaker's fallback); reconnecting in the background"
                );
                Err(e)
            }
        }
    }

    fn set_readiness(&self, r: Readiness) {
        self.readiness.store(r.to_u8(), Ordering::Release);
    }

    /// Whether connecting finished, and how. A degraded start whose connections have all come
    /// up since is ready.
    pub fn readiness(&self) -> Readiness {
        let r = Readiness::from_u8(self.readiness.load(Ordering::Acquire));
        if r == Readiness::Degraded && self.redis.as_ref().is_some_and(|s| s.is_connected()) {
            self.set_readiness(Readiness::Ready);
            return Readiness::Ready;
        }
        r
    }

    /// Whether the store can answer every decision now: connected on every deciding thread.
    pub fn healthy(&self) -> bool {
        match &self.redis {
            None => true,
            Some(r) => self.readiness() != Readiness::Connecting && r.is_connected(),
        }
    }

    /// Closes a store that is no longer in use.
    pub async fn close(&self) {
        if let Some(redis) = &self.redis {
            redis.close().await;
        }
    }
}
