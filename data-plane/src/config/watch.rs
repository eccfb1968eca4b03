//! Standalone mode's reload: the declarative file is checked for changes on an interval and
//! recompiled when its content changes. A file that fails to load is logged and counted; the
//! running configuration stays.
//!
//! Polling the content (not watching inotify events) also catches the ways files really change
//! in deployments: editors that write a new file and rename it, and Kubernetes ConfigMaps that
//! swap a symlink.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{CompiledConfig, ConfigStore};
use crate::telemetry::Metrics;

/// Reloads `path` into `store` whenever its bytes change, every `interval`, until the task is
/// dropped.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
) {
    let mut last = digest(&path);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = digest(&path);
        if now == last {
            continue;
        }
        last = now;
        let (path, store, metrics) = (path.clone(), store.clone(), metrics.clone());
        // Compiling a large file is CPU work: keep it off the runtime's request threads.
        let outcome = super::worker::run(move || {
            let previous = store.current();
            let result = CompiledConfig::from_file(&path, previous.as_deref(), &metrics, &store.jwks);
            match result {
                Ok(config) => {
                    tracing::info!(path = %path.display(), content_hash = %config.content_hash, "configuration reloaded");
                    store.apply(config);
                    metrics.config_swaps.inc();
                }
                Err(e) => {
                    tracing::error!(error = %e, "configuration not reloaded; the previous one keeps serving");
                    metrics.config_rejections.inc();
                }
            }
        })
        .await;
        if let Err(e) = outcome {
            tracing::error!(error = %e, "configuration reload task failed");
        }
    }
}

/// The file's SHA-256, or `None` while it cannot be read (mid-rename, say).
fn digest(path: &PathBuf) -> Option<[u8; 32]> {
    std::fs::read(path)
        .ok()
        .map(|bytes| Sha256::digest(bytes).into())
}
