//! Watching the config file with `notify`. The parent directory is watched (not the file), so
//! editors that write a temp file and rename it, in-place writes, and Kubernetes ConfigMaps
//! (a `..data` symlink swapped atomically) are all seen. Access events (including our own
//! reads) are ignored; bursts of events are debounced into one reload.
//!
//! The debounce runs in its own task, which hands each settled change to a channel of one
//! slot: [`ConfigWatcher::changed`] only receives on that channel, so it is cancel-safe (a
//! `select!` that drops it loses nothing), and a change signalled while the previous one is
//! still pending merges into it (the reload reads the file as it is then).

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Quiet time after the last event before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

pub struct ConfigWatcher {
    _watcher: RecommendedWatcher,
    changes: mpsc::Receiver<()>,
    debounce: tokio::task::JoinHandle<()>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.debounce.abort();
    }
}

fn relevant(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(_) | EventKind::Other | EventKind::Any
    )
}

/// Starts watching the directory that holds `file`. Must be called on a Tokio runtime (the
/// debounce task is spawned on it).
pub fn watch(file: &Path) -> Result<ConfigWatcher, notify::Error> {
    let dir: PathBuf = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name: OsString = file.file_name().map(OsString::from).unwrap_or_default();
    let (tx, events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if !relevant(&event.kind) {
            return;
        }
        let ours = event.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                // The file itself, or Kubernetes' `..data` / `..2024_..` entries.
                n == name.as_os_str() || n.to_string_lossy().starts_with("..")
            })
        });
        if ours {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let (settled, changes) = mpsc::channel(1);
    let debounce = tokio::spawn(debounce(events, settled));
    Ok(ConfigWatcher {
        _watcher: watcher,
        changes,
        debounce,
    })
}

/// Waits for an event, then for [`DEBOUNCE`] of quiet, then signals one change. Owns the raw
/// event receiver, so nothing it has taken can be dropped by a caller's `select!`.
async fn debounce(mut events: mpsc::UnboundedReceiver<()>, settled: mpsc::Sender<()>) {
    while events.recv().await.is_some() {
        // More events within DEBOUNCE restart the wait; quiet (or a closed channel) ends it.
        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
        match settled.try_send(()) {
            // Full: a change is already pending; the reload will read the latest text.
            Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
            Err(mpsc::error::TrySendError::Closed(())) => return,
        }
    }
}

impl ConfigWatcher {
    /// Waits for a settled change. Cancel-safe.
    pub async fn changed(&mut self) {
        if self.changes.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}
