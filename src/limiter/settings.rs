//! The limiter's settings, as validated from the config: which store, how to reach Redis, and
//! the breaker with its fallback. `config::model` builds them; the limiter only reads them.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKindConfig {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    Standalone,
    Cluster,
    Sentinel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub mode: RedisMode,
    pub urls: Vec<String>,
    pub service_name: Option<String>,
    pub timeout: Duration,
    pub key_prefix: String,
    /// How long a batch waits for more decisions after its first (0: send at once).
    pub batch_window: Duration,
    /// How long start-up (and a reload that changes the store) waits for every connection a
    /// decision will use before the listener takes traffic anyway, degraded.
    pub startup_wait: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub kind: StoreKindConfig,
    pub redis: RedisConfig,
    pub max_buckets: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open: Duration,
    pub fallback: Fallback,
    pub fallback_instances: u32,
}
