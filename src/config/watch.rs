//! Watching the config file with `notify`. The parent directory is watched (not the file), so
//! editors that write a temp file and rename it, in-place writes, and Kubernetes ConfigMaps
//! (a `..data` symlink swapped atomically) are all seen. Access events (including our own
//! reads) are ignored; bursts of events are debounced into one reload.

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Quiet time after the last event before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

pub struct ConfigWatcher {
    _watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
}

fn relevant(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(_) | EventKind::Other | EventKind::Any
    )
}

/// Starts watching the directory that holds `file`.
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
    Ok(ConfigWatcher {
        _watcher: watcher,
        events,
    })
}

impl ConfigWatcher {
    /// Waits for a change, then for [`DEBOUNCE`] of quiet.
    pub async fn changed(&mut self) {
        if self.events.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
        loop {
            match tokio::time::timeout(DEBOUNCE, self.events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    }
}
