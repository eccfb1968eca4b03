//! Standalone mode's reload: the declarative file is checked for changes on an interval and
//! recompiled when its content changes. A file that fails to load is logged and counted; the
//! running configuration stays.
//!
//! Polling the content (not watching inotify events) also catches the ways files really change
//! in deployments: editors that write a new file and rename it, and Kubernetes ConfigMaps that
//! swap a symlink.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{CompiledConfig, ConfigStore, LoadError};
use crate::telemetry::Metrics;

/// Reloads `path` into `store` whenever its bytes change, every `interval`, until the task is
/// dropped. `applied`: the SHA-256 of the bytes the running configuration was compiled from.
///
/// A change is applied once the file has held still for one `interval` (the same bytes read
/// twice in a row), and from the very bytes that were compared: a file written in place (by
/// a shell redirection, or a bind-mounted file) is not applied while half written, which is often still a valid
/// configuration that lacks the rest of its routes.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    applied: [u8; 32],
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
) {
    let mut settling = Settling::new(applied);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Reading and hashing a large file is blocking work: off the request threads.
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read(&path))
        };
        let Ok((content, read)) = read.await else {
            continue;
        };
        if !settling.is_due(content) {
            continue;
        }
        // A file that cannot be read (gone, not UTF-8) is refused as a bad one is: once,
        // until it changes.
        let text = match read {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded; the previous one keeps serving");
                metrics.config_rejections.inc();
                continue;
            }
        };
        let (path, store, metrics) = (path.clone(), store.clone(), metrics.clone());
        // Compiling a large file is CPU work: keep it off the runtime's request threads.
        let outcome = super::worker::run(move || {
            let previous = store.current();
            let result = CompiledConfig::from_text(
                &path,
                &text,
                previous.as_deref(),
                &metrics,
                &store.jwks,
            );
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

/// Which of the file's contents, read one poll after another, is to be applied.
#[derive(Debug)]
struct Settling {
    /// The content running (or refused: it is not compiled again until it changes).
    applied: [u8; 32],
    /// The content read at the poll before.
    seen: [u8; 32],
}

impl Settling {
    fn new(applied: [u8; 32]) -> Self {
        Settling {
            applied,
            seen: applied,
        }
    }

    /// Whether `now`, the content just read, is to be applied: it is not the running one,
    /// and it was already there at the poll before.
    fn is_due(&mut self, now: [u8; 32]) -> bool {
        let still = std::mem::replace(&mut self.seen, now) == now;
        if !still || now == self.applied {
            return false;
        }
        self.applied = now;
        true
    }
}

/// The SHA-256 of a declarative file's bytes.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The file's text, and what identifies its content: the SHA-256 of its bytes, or of why it
/// cannot be read (so that the same failure is reported once, as a content is applied once).
fn read(path: &Path) -> ([u8; 32], Result<String, LoadError>) {
    match std::fs::read(path) {
        Ok(bytes) => {
            let content = digest(&bytes);
            let text = String::from_utf8(bytes).map_err(|e| LoadError::Read {
                path: path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            });
            (content, text)
        }
        Err(source) => (
            digest(format!("unreadable: {:?}", source.kind()).as_bytes()),
            Err(LoadError::Read {
                path: path.to_owned(),
                source,
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_applied_once_it_has_held_still_for_a_poll() {
        let [a, b, c, d] = [b"a", b"b", b"c", b"d"].map(|bytes| digest(bytes));
        let mut settling = Settling::new(a);
        assert!(!settling.is_due(a), "the running content");
        // Being written: a new content at every poll is never applied.
        assert!(!settling.is_due(b));
        assert!(!settling.is_due(c));
        assert!(settling.is_due(c), "the same two polls in a row");
        assert!(!settling.is_due(c), "once");
        // Back to an earlier content: a change like any other.
        assert!(!settling.is_due(a));
        assert!(settling.is_due(a));
        // Changed between the start's read and the first poll: still applied.
        let mut started = Settling::new(a);
        assert!(!started.is_due(d));
        assert!(started.is_due(d));
    }
}
