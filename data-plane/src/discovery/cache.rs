//! The on-disk copy of the last applied configuration (static stability): a node that starts
//! while no control plane answers serves from it.
//!
//! The file is the SHA-256 of the payload (32 bytes), then the payload: an encoded
//! `DiscoveryResponse` holding the version, its content hash and the snapshot. It is written
//! to a temporary file in the same folder, synced, then renamed over the old one, so a crash
//! leaves either the old copy or the new one, never a torn file; the checksum catches the rest.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use sha2::{Digest, Sha256};
use sluice_proto::pb;
use tokio::sync::watch;

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
                    let encoded = copy.holdings.encode_snapshot();
                    store_snapshot(&path, copy.version, &copy.content_hash, &encoded)
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

/// Writes an encoded snapshot, with its version and content hash, as the copy at `path`.
pub fn store_snapshot(
    path: &Path,
    version: u64,
    content_hash: &str,
    encoded_snapshot: &[u8],
) -> std::io::Result<()> {
    use prost::encoding::{WireType, encode_key, encode_varint};
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
    encode_varint(encoded_snapshot.len() as u64, &mut header);
    store(path, &[&header, encoded_snapshot])
}

/// Writes a payload (an encoded `DiscoveryResponse`, given in parts) to `path` atomically.
fn store(path: &Path, payload: &[&[u8]]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    let mut checksum = Sha256::new();
    for part in payload {
        checksum.update(part);
    }
    temp.write_all(&checksum.finalize())?;
    for part in payload {
        temp.write_all(part)?;
    }
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    // The rename itself must survive a crash too.
    std::fs::File::open(dir)?.sync_all()
}

/// Why a cached copy could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} is damaged: {1}")]
    Damaged(PathBuf, &'static str),
}

/// Reads the copy at `path`: `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<pb::DiscoveryResponse>, CacheError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::Read(path.to_owned(), e)),
    };
    let damaged = |why| CacheError::Damaged(path.to_owned(), why);
    if bytes.len() < 32 {
        return Err(damaged("shorter than its checksum"));
    }
    let (checksum, payload) = bytes.split_at(32);
    if Sha256::digest(payload).as_slice() != checksum {
        return Err(damaged("its checksum does not match"));
    }
    let response =
        pb::DiscoveryResponse::decode(payload).map_err(|_| damaged("it does not decode"))?;
    if !matches!(
        response.payload,
        Some(pb::discovery_response::Payload::Snapshot(_))
    ) {
        return Err(damaged("it holds no snapshot"));
    }
    Ok(Some(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_copy_loads_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.cache");
        assert!(load(&path).unwrap().is_none());
        let response = pb::DiscoveryResponse {
            version: 7,
            content_hash: "abc".into(),
            nonce: String::new(),
            payload: Some(pb::discovery_response::Payload::Snapshot(
                pb::Snapshot::default(),
            )),
        };
        store(&path, &[&response.encode_to_vec()]).unwrap();
        assert_eq!(load(&path).unwrap(), Some(response));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(error.contains("checksum does not match"), "{error}");
    }

    #[test]
    fn a_snapshot_stored_from_its_encoding_loads_as_the_whole_response() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.cache");
        let snapshot = pb::Snapshot {
            resources: Some(pb::ConfigSet::default()),
            api_keys: vec![pb::ApiKeyEntry {
                id: vec![1; 16],
                consumer_id: vec![2; 16],
                key_sha256: vec![3; 32],
                expires_at: None,
                revoked: true,
            }],
        };
        store_snapshot(&path, 9, "hash", &snapshot.encode_to_vec()).unwrap();
        let response = load(&path).unwrap().unwrap();
        assert_eq!(
            response,
            pb::DiscoveryResponse {
                version: 9,
                content_hash: "hash".into(),
                nonce: String::new(),
                payload: Some(pb::discovery_response::Payload::Snapshot(snapshot)),
            }
        );
    }
}
