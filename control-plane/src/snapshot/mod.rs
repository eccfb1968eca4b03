//! The snapshot compiler: a group's registry state as the discovery protocol's snapshot, and
//! the delta between two versions of it, read from the change log. Both are shaped (API keys
//! packed, lists sorted) by [`sluice_proto::snapshot`].

use bytes::Bytes;
use sha2::{Digest, Sha256};
use sluice_proto::pb::{self, ConfigSet, Resource};
use sluice_proto::snapshot;
use sqlx::Row;
use uuid::Uuid;

use crate::registry::rows::{self, kind_from_name};
use crate::registry::{Registry, RegistryError};

/// A group's whole configuration at one version.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSnapshot {
    pub version: u64,
    /// [`snapshot::content_hash`] of `snapshot`: the same state always gives the same bytes
    /// and hash.
    pub content_hash: String,
    /// Canonical: every list sorted by id.
    pub snapshot: pb::Snapshot,
    /// `snapshot` encoded, once for every node it is sent to, in parts.
    pub encoded: Bytes,
}

impl Registry {
    /// The current snapshot of `group`.
    pub async fn snapshot(&self, group: &str) -> Result<GroupSnapshot, RegistryError> {
        let (version, resources) = self.state(Some(group)).await?;
        let snapshot = snapshot::from_config(resources);
        // Canonical already, so its encoding is what the content hash is taken over.
        let encoded = Bytes::from(prost::Message::encode_to_vec(&snapshot));
        Ok(GroupSnapshot {
            version,
            content_hash: hex::encode(Sha256::digest(&encoded)),
            snapshot,
            encoded,
        })
    }

    /// What changed in `group` from version `from` to version `to`: each resource changed in
    /// between, whole as it is at `to`, or its ref when it no longer exists.
    /// Fails (so the caller sends a snapshot instead) when `from` is past retention or `to` is
    /// beyond the newest version.
    pub async fn delta(&self, group: &str, from: u64, to: u64) -> Result<pb::Delta, RegistryError> {
        let (mut tx, head) = self.read_snapshot().await?;
        if to > head {
            return Err(RegistryError::VersionNotFound(to));
        }
        crate::versions::check_restorable(&mut tx, from.min(to), head).await?;
        let rows = sqlx::query(
            "SELECT DISTINCT ON (resource_id) kind, resource_id, after FROM changes \
             WHERE version > $1 AND version <= $2 AND grp = $3 \
             ORDER BY resource_id, version DESC, seq DESC",
        )
        .bind(i64::try_from(from).unwrap_or(i64::MAX))
        .bind(i64::try_from(to).unwrap_or(i64::MAX))
        .bind(group)
        .fetch_all(&mut *tx)
        .await
        .map_err(RegistryError::from_db)?;
        tx.commit().await.map_err(RegistryError::from_db)?;
        let mut upserted: Vec<Resource> = Vec::new();
        let mut removed = Vec::new();
        for row in rows {
            let kind_text: String = row.get("kind");
            let kind = kind_from_name(&kind_text).ok_or_else(|| {
                RegistryError::Corrupt(format!("change log has an unknown kind {kind_text:?}"))
            })?;
            match row.get::<Option<Vec<u8>>, _>("after") {
                Some(body) => upserted.push(rows::decode(kind, &body)?),
                None => removed.push(pb::ResourceRef {
                    kind: kind as i32,
                    id: row.get::<Uuid, _>("resource_id").to_string(),
                }),
            }
        }
        let upserted: ConfigSet = upserted.into_iter().collect();
        Ok(snapshot::delta(from, upserted, removed))
    }
}
