//! Config reload: owns read → validate → build → swap. Listens for changes (the file watcher in
//! [`crate::config::watch`] and SIGHUP), reads and validates the file off the async runtimes
//! (`spawn_blocking`: parsing can be slow, and it must never hold up a runtime that decides
//! requests or drives a store's connections), builds and connects a new store when the `store`
//! section changed, then swaps config (and store) in [`Shared`]. Every change is either applied
//! or counted in `tollgate_config_reloads_total{result="error"}`; a bad file keeps the running
//! config in force.

use crate::config::{self, ConfigError, Problem};
use crate::limiter::slot::StoreSlot;
use crate::state::Shared;
use pingora::server::ShutdownWatch;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the replaced store is kept open for decisions in flight on it.
pub const OLD_STORE_GRACE: Duration = Duration::from_secs(5);

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// SIGHUP: always reload.
    Signal,
    /// The file watcher: reload only if the text changed.
    FileChanged,
}

/// What a read of the config file found (computed on the blocking pool).
enum Read {
    /// The file is gone (mid-rename, or deleted) and a watch event asked: wait for the next.
    Absent(ConfigError),
    Failed(ConfigError),
    Text {
        text: String,
        digest: u64,
    },
}

/// Reloads one config file into one [`Shared`].
pub struct Reloader {
    shared: Arc<Shared>,
    /// The file the config came from (none for the embedded demo: nothing to reload).
    path: Option<PathBuf>,
    /// Digest of the config text last loaded or rejected (a watch event that changed nothing
    /// does not reload, and a bad file is reported once, not once per event).
    last_digest: Mutex<Option<u64>>,
}

impl Reloader {
    /// Remembers the digest of the file as it is now (the text the running config came from).
    /// Blocking (reads the file): call it at start-up, not on a runtime.
    pub fn new(shared: Arc<Shared>, path: Option<PathBuf>) -> Reloader {
        let digest = path
            .as_deref()
            .and_then(|p| config::read(p).ok())
            .map(|t| config::digest(&t));
        Reloader {
            shared,
            path,
            last_digest: Mutex::new(digest),
        }
    }

    /// Watches the file and SIGHUP and reloads until shutdown. Only cancel-safe receives are
    /// raced in the `select!`; a reload runs to its end before the next event is taken.
    pub async fn serve(self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut watcher = match &self.path {
            Some(path) => match config::watch::watch(path) {
                Ok(w) => {
                    tracing::info!(file = %path.display(), "watching the config file");
                    Some(w)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch the config file; SIGHUP still reloads");
                    None
                }
            },
            None => None,
        };
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler; reload on SIGHUP is off");
            if let Some(mut w) = watcher {
                loop {
                    tokio::select! {
                        _ = w.changed() => {
                            let _ = self.reload(ReloadTrigger::FileChanged).await;
                        }
                        _ = shutdown.changed() => return,
                    }
                }
            }
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading config");
                    let _ = self.reload(ReloadTrigger::Signal).await;
                }
                _ = async {
                    match watcher.as_mut() {
                        Some(w) => w.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = self.reload(ReloadTrigger::FileChanged).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Re-reads the config file; an invalid file leaves the running config in force. When the
    /// `store` section changed, the new store is built and connected first, then swapped in
    /// with the config; requests in flight finish on the old one, which is closed afterwards.
    pub async fn reload(&self, trigger: ReloadTrigger) -> Result<u64, ConfigError> {
        let Some(path) = self.path.clone() else {
            return Ok(self.shared.generation());
        };
        let file = path.clone();
        let read = blocking(&path, move || read(&file, trigger)).await;
        let (text, digest) = match read {
            Ok(Read::Text { text, digest }) => (text, digest),
            Ok(Read::Absent(e)) => {
                tracing::debug!(error = %e, "config file absent; waiting for it to reappear");
                return Ok(self.shared.generation());
            }
            Ok(Read::Failed(e)) | Err(e) => return Err(self.rejected(e)),
        };
        {
            let mut last = self.last_digest.lock().unwrap_or_else(|p| p.into_inner());
            if trigger == ReloadTrigger::FileChanged && *last == Some(digest) {
                return Ok(self.shared.generation());
            }
            *last = Some(digest);
        }
        let file = path.clone();
        let parsed = blocking(&path, move || config::load_text(&text, &file)).await;
        let config = match parsed.and_then(|r| r) {
            Ok(config) => config,
            Err(e) => return Err(self.rejected(e)),
        };
        if config.store != self.shared.store().config {
            // Build the slot, connect it, swap it in, close the old one later.
            let slot = match StoreSlot::build(
                &config.store,
                &self.shared.metrics.redis_late_refunds,
            ) {
                Ok(slot) => slot,
                Err(e) => {
                    tracing::error!(error = %e, "config reload rejected: cannot build the new store");
                    return Err(self.rejected(ConfigError::Invalid {
                        file: path.display().to_string(),
                        problems: vec![Problem::at("store", e.to_string())],
                    }));
                }
            };
            // Every connection a decision will use is open before the swap; a store that
            // cannot connect within `startup_wait_ms` is not swapped in.
            if let Err(e) = slot.connect(self.shared.threads.get()).await {
                slot.close().await;
                return Err(self.rejected(ConfigError::Invalid {
                    file: path.display().to_string(),
                    problems: vec![Problem::at(
                        "store",
                        format!(
                            "the new store did not connect within store.redis.startup_wait_ms \
                             ({e}); the running store is kept"
                        ),
                    )],
                }));
            }
            let old = self.shared.swap_store(slot);
            tracing::info!("store replaced after a config change");
            tokio::spawn(async move {
                // Let decisions in flight on the old store finish.
                tokio::time::sleep(OLD_STORE_GRACE).await;
                old.close().await;
            });
        }
        let running = self.shared.config();
        if running.listen.len() != config.listen.len()
            || running
                .listen
                .iter()
                .zip(&config.listen)
                .any(|(a, b)| !a.same_shape(b))
        {
            tracing::warn!(
                "the listen section changed: listeners (addresses, TLS files, min_version) \
                 change only on restart; the running ones are kept"
            );
        }
        if running.admin.listen != config.admin.listen {
            tracing::warn!(
                old = %running.admin.listen, new = %config.admin.listen,
                "admin.listen changed: the admin listener moves only on restart"
            );
        }
        let rls_listen = |c: &config::Config| c.rls.as_ref().map(|r| r.listen);
        match (rls_listen(&running), rls_listen(&config)) {
            (Some(_), None) => tracing::warn!(
                "rls was removed: the rate-limit service's port stays open until restart, \
                 answers UNAVAILABLE to every call and reports NOT_SERVING"
            ),
            (None, Some(_)) => {
                tracing::warn!("rls was added: the rate-limit service starts only on restart")
            }
            (Some(a), Some(b)) if a != b => tracing::warn!(
                old = %a, new = %b,
                "rls.listen changed: the listener moves only on restart; the domains are reloaded"
            ),
            _ => {}
        }
        // Certificate files re-read by this config's validation are swapped in.
        for resolver in self.shared.tls.all() {
            if let Some(tls) = config
                .listen
                .iter()
                .find(|l| l.address == resolver.address)
                .and_then(|l| l.tls.as_ref())
            {
                resolver.take_from_config(tls, &self.shared.metrics);
            }
        }
        let generation = self.shared.install(config);
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .inc();
        tracing::info!(generation, file = %path.display(), "config reloaded");
        Ok(generation)
    }

    fn rejected(&self, e: ConfigError) -> ConfigError {
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&["error"])
            .inc();
        for line in e.lines() {
            tracing::error!("config reload rejected, previous config kept: {line}");
        }
        e
    }
}

/// Reads the file (blocking).
fn read(path: &Path, trigger: ReloadTrigger) -> Read {
    match config::read(path) {
        Ok(text) => {
            let digest = config::digest(&text);
            Read::Text { text, digest }
        }
        Err(e) if trigger == ReloadTrigger::FileChanged && !path.exists() => Read::Absent(e),
        Err(e) => Read::Failed(e),
    }
}

/// Runs `work` on the blocking pool; a panic in it is a rejected reload, not a dead reloader.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ConfigError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ConfigError::Invalid {
            file: path.display().to_string(),
            problems: vec![Problem::at("", format!("reading the config failed: {e}"))],
        })
}
