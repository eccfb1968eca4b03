//! The on-disk copy of the last applied configuration (static stability): a node that starts
//! while no control plane answers serves from it.
//!
//! The file is the SHA-256 of the payload (32 bytes), then the payload: an encoded
//! `DiscoveryResponse` holding the version, its content hash and the snapshot. It is written
//! to a temporary file in the same folder, synced, then renamed over the old one, so a crash
//! leaves either the old copy or the new one, never a torn file; the checksum catches the rest.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};
use sluice_proto::pb;
use tokio::sync::watch;

use super::wire::{Payload, Received};
use crate::config::Holdings;

/// A configuration to keep: what it is and its version.
#[derive(Debug)]
struct Pending {
    version: u64,
    content_hash: String,
    holdings: Holdings,
}

/// Keeps the on-disk copy up to date in the background, newest first: applying a config
/// never waits for the disk (a million keys is a 75 MB write), and a slow write is
/// overtaken, never followed, by the copies queued behind it.
#[derive(Debug)]
pub struct Writer {
    latest: watch::Sender<Option<Arc<Pending>>>,
}

impl Writer {
    /// Starts the writer for `path`.
    pub fn spawn(path: PathBuf) -> Self {
        let (latest, mut queued) = watch::channel(None::<Arc<Pending>>);
        tokio::spawn(async move {
            while queued.changed().await.is_ok() {
                let Some(copy) = queued.borrow_and_update().clone() else {
                    continue;
                };
                let path = path.clone();
                let written = tokio::task::spawn_blocking(move || {
                    store_snapshot(&path, copy.version, &copy.content_hash, &copy.holdings)
                })
                .await;
                match written {
                    Ok(Ok(())) => {}
                    // Serving goes on; only a restart without a control plane would miss it.
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot write the configuration cache")
                    }
                    Err(e) => tracing::warn!(error = %e, "writing the configuration cache failed"),
                }
            }
        });
        Writer { latest }
    }

    /// Queues `holdings` (a cheap, shared clone) as the copy to keep.
    pub fn save(&self, version: u64, content_hash: &str, holdings: Holdings) {
        self.latest.send_replace(Some(Arc::new(Pending {
            version,
            content_hash: content_hash.to_owned(),
            holdings,
        })));
    }
}

/// Writes `holdings` as the snapshot of `version`, with its content hash, as the copy at
/// `path`. The snapshot is written as it is encoded, never whole in memory.
pub fn store_snapshot(
    path: &Path,
    version: u64,
    content_hash: &str,
    holdings: &Holdings,
) -> std::io::Result<()> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut snapshot_len = 0;
    holdings.write_snapshot(|bytes| snapshot_len += bytes.len());
    // A `DiscoveryResponse` whose payload is the snapshot: prost writes fields in number order,
    // so the header fields then field 10 are the bytes it would have written.
    let mut header = pb::DiscoveryResponse {
        version,
        content_hash: content_hash.to_owned(),
        nonce: String::new(),
        payload: None,
    }
    .encode_to_vec();
    encode_key(10, WireType::LengthDelimited, &mut header);
    encode_varint(snapshot_len as u64, &mut header);
    store(path, |write| {
        write(&header);
        holdings.write_snapshot(write);
    })
}

/// Writes a payload (an encoded `DiscoveryResponse`, written in parts by `payload`) to `path`
/// atomically, after its checksum.
fn store(path: &Path, payload: impl FnOnce(&mut dyn FnMut(&[u8]))) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(&leftover_prefix(path))
        .suffix(PARTIAL)
        .tempfile_in(dir)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, temp.as_file_mut());
    // The checksum comes first but is known last: a placeholder, then the real one.
    out.write_all(&[0; 32])?;
    let mut checksum = Sha256::new();
    let mut failed = None;
    payload(&mut |part: &[u8]| {
        checksum.update(part);
        if failed.is_none() {
            failed = out.write_all(part).err();
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    out.flush()?;
    drop(out);
    let file = temp.as_file_mut();
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&checksum.finalize())?;
    file.sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    // The rename itself must survive a crash too.
    std::fs::File::open(dir)?.sync_all()
}

/// A copy being written is `.<file name>.<random>.partial` beside the file.
const PARTIAL: &str = ".partial";

fn leftover_prefix(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    format!(".{}.", name.unwrap_or_default())
}

/// A copy unfinished for this long was left by a node that died writing it (writing takes
/// seconds); a younger one may be another node's, on a shared volume, still being written.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes copies of `path` that nodes killed mid-write left behind, which would otherwise
/// fill the cache volume (a few of them, a snapshot's size each, and the pod is evicted).
pub fn remove_leftovers(path: &Path) {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = leftover_prefix(path);
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(&prefix) && name.ends_with(PARTIAL)) {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age >= LEFTOVER_AGE);
        if stale {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed an unfinished cache copy")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove an unfinished cache copy")
                }
            }
        }
    }
}

/// Why a cached copy could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} is damaged: {1}")]
    Damaged(PathBuf, &'static str),
}

/// A snapshot read back from disk, still encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    pub version: u64,
    pub content_hash: String,
    pub snapshot: Bytes,
}

/// Reads the copy at `path`: `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<Cached>, CacheError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::Read(path.to_owned(), e)),
    };
    let damaged = |why| CacheError::Damaged(path.to_owned(), why);
    if bytes.len() < 32 {
        return Err(damaged("shorter than its checksum"));
    }
    let (checksum, payload) = (bytes.slice(..32), bytes.slice(32..));
    if Sha256::digest(&payload).as_slice() != checksum {
        return Err(damaged("its checksum does not match"));
    }
    let response = Received::decode(payload).map_err(|_| damaged("it does not decode"))?;
    let Some(Payload::Snapshot(snapshot)) = response.payload else {
        return Err(damaged("it holds no snapshot"));
    };
    Ok(Some(Cached {
        version: response.version,
        content_hash: response.content_hash,
        snapshot,
    }))
}

#[cfg(test)]
mod tests {
    use sluice_proto::declarative::{self, Format};
    use sluice_proto::snapshot;

    use super::*;

    fn holdings() -> (pb::Snapshot, Holdings) {
        let config = declarative::load(
            r#"
format_version: 1
consumers:
  - name: acme
    credentials:
      - name: main
        api_key: { key_sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" }
"#,
            Format::Yaml,
        )
        .unwrap();
        let snapshot = snapshot::from_config(config);
        let holdings = Holdings::from_snapshot(&snapshot).unwrap();
        (snapshot, holdings)
    }

    #[test]
    fn a_stored_copy_loads_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.cache");
        assert!(load(&path).unwrap().is_none());
        let (_, held) = holdings();
        store_snapshot(&path, 7, "abc", &held).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().version, 7);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(error.contains("checksum does not match"), "{error}");
    }

    #[test]
    fn nodes_sharing_one_file_never_mix_their_copies() {
        // Replicas on a shared volume (the chart's cache claim) write the group's one file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("default.pb");
        let (_, held) = holdings();
        let held = Arc::new(held);
        let writers: Vec<_> = (1..=4u64)
            .map(|node| {
                let (path, held) = (path.clone(), held.clone());
                std::thread::spawn(move || {
                    for round in 0..25 {
                        store_snapshot(&path, node * 100 + round, "hash", &held).unwrap();
                    }
                })
            })
            .collect();
        // Read while they write: always one writer's whole copy.
        while !writers.iter().all(|w| w.is_finished()) {
            if let Some(cached) = load(&path).unwrap() {
                assert!((100..500).contains(&cached.version), "{}", cached.version);
            }
        }
        for writer in writers {
            writer.join().unwrap();
        }
        let last = load(&path).unwrap().unwrap().version;
        assert_eq!(last % 100, 24, "a node's last copy is the file: {last}");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn copies_left_unfinished_long_ago_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("default.pb");
        let (_, held) = holdings();
        store_snapshot(&path, 1, "hash", &held).unwrap();
        let file = |name: &str, age: u64| {
            let at = dir.path().join(name);
            let file = std::fs::File::create(&at).unwrap();
            let modified = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
            file.set_modified(modified).unwrap();
            at
        };
        let dead = file(".default.pb.a1b2c3.partial", 3600);
        let writing = file(".default.pb.d4e5f6.partial", 5);
        let other_group = file(".staging.pb.a1b2c3.partial", 3600);
        let unrelated = file("notes.txt", 3600);
        remove_leftovers(&path);
        assert!(!dead.exists());
        for kept in [&writing, &other_group, &unrelated, &path] {
            assert!(kept.exists(), "{}", kept.display());
        }
    }

    #[test]
    fn a_stored_snapshot_loads_as_the_response_the_control_plane_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.cache");
        let (snapshot, held) = holdings();
        store_snapshot(&path, 9, "hash", &held).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let sent = pb::DiscoveryResponse {
            version: 9,
            content_hash: "hash".into(),
            nonce: String::new(),
            payload: Some(pb::discovery_response::Payload::Snapshot(snapshot.clone())),
        };
        assert_eq!(bytes[32..], sent.encode_to_vec());
        assert_eq!(
            load(&path).unwrap(),
            Some(Cached {
                version: 9,
                content_hash: "hash".into(),
                snapshot: Bytes::from(snapshot.encode_to_vec()),
            })
        );
    }
}
