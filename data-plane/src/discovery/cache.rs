//! The on-disk copy of the last applied configuration (static stability): a node that starts
//! while no control plane answers serves from it.
//!
//! The file is the SHA-256 of the payload (32 bytes), then the payload: an encoded
//! `DiscoveryResponse` holding the version, its content hash and the snapshot. It is written
//! to a temporary file in the same folder, synced, then renamed over the old one, so a crash
//! leaves either the old copy or the new one, never a torn file; the checksum catches the rest.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};
use sluice_proto::pb;

/// Writes an encoded `DiscoveryResponse` (a snapshot and its version) to `path` atomically.
pub fn store(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.write_all(&Sha256::digest(payload))?;
    temp.write_all(payload)?;
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
        store(&path, &response.encode_to_vec()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(response));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(error.contains("checksum does not match"), "{error}");
    }
}
