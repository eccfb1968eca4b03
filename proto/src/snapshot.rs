//! A group's configuration as data planes receive it: the discovery [`pb::Snapshot`] and
//! [`pb::Delta`].
//!
//! API keys are most of a large registry (a million keys beside twenty thousand routes), and a
//! data plane needs only four facts about each: the key's SHA-256, its consumer, its expiry and
//! whether it is revoked. So snapshots carry API-key credentials as packed
//! [`pb::ApiKeyEntry`] rows (16-byte ids, the 32-byte hash, about 75 bytes a key) instead of
//! whole [`pb::Credential`] resources (about 180). Every other resource travels whole.
//!
//! The same functions build the snapshot of a standalone file, so a data plane fed by a file and
//! one fed by the control plane report the same [`content_hash`] for the same configuration.

use std::collections::{HashMap, HashSet};

use prost::Message;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{ConfigErrors, FieldError};
use crate::pb::{self, ConfigSet, ResourceKind};
use crate::validate;

/// The snapshot of `config`, canonical: API-key credentials packed, every list sorted by id.
pub fn from_config(mut config: ConfigSet) -> pb::Snapshot {
    let api_keys = take_api_keys(&mut config);
    let mut snapshot = pb::Snapshot {
        resources: Some(config),
        api_keys,
    };
    canonicalize(&mut snapshot);
    snapshot
}

/// The delta to `upserted` and `removed` from `base_version`, canonical like a snapshot.
pub fn delta(
    base_version: u64,
    mut upserted: ConfigSet,
    removed: Vec<pb::ResourceRef>,
) -> pb::Delta {
    let mut upserted_api_keys = take_api_keys(&mut upserted);
    upserted_api_keys.sort_by(|a, b| a.id.cmp(&b.id));
    crate::hash::canonicalize(&mut upserted);
    pb::Delta {
        base_version,
        upserted: Some(upserted),
        removed,
        upserted_api_keys,
    }
}

/// Sorts every list by id, so the same configuration always encodes to the same bytes.
pub fn canonicalize(snapshot: &mut pb::Snapshot) {
    crate::hash::canonicalize(snapshot.resources.get_or_insert_default());
    snapshot.api_keys.sort_by(|a, b| a.id.cmp(&b.id));
}

/// Lowercase hex SHA-256 of the canonical encoding of `snapshot`: the hash a node reports for
/// the configuration it runs.
pub fn content_hash(snapshot: &pb::Snapshot) -> String {
    let digest = if is_canonical(snapshot) {
        Sha256::digest(snapshot.encode_to_vec())
    } else {
        // Snapshots from `from_config` are canonical already; copying a million keys to sort
        // them again is what this check avoids.
        let mut canonical = snapshot.clone();
        canonicalize(&mut canonical);
        Sha256::digest(canonical.encode_to_vec())
    };
    hex::encode(digest)
}

fn is_canonical(snapshot: &pb::Snapshot) -> bool {
    snapshot
        .resources
        .as_ref()
        .is_none_or(crate::hash::is_canonical)
        && snapshot.api_keys.windows(2).all(|w| w[0].id <= w[1].id)
}

/// The packed form of an API-key credential; `None` for other credentials, and for one whose
/// ids or hash are malformed (it then stays whole, for the validator to name what is wrong).
pub fn api_key_entry(credential: &pb::Credential) -> Option<pb::ApiKeyEntry> {
    let Some(pb::credential::Kind::ApiKey(key)) = &credential.kind else {
        return None;
    };
    let id = Uuid::parse_str(&credential.meta.as_ref()?.id).ok()?;
    let consumer_id = Uuid::parse_str(&credential.consumer_id).ok()?;
    let mut key_sha256 = [0u8; 32];
    hex::decode_to_slice(&key.key_sha256, &mut key_sha256).ok()?;
    Some(pb::ApiKeyEntry {
        id: id.as_bytes().to_vec(),
        consumer_id: consumer_id.as_bytes().to_vec(),
        key_sha256: key_sha256.to_vec(),
        expires_at: credential.expires_at,
        revoked: credential.revoked,
    })
}

/// Moves every well-formed API-key credential out of `config` into packed rows.
fn take_api_keys(config: &mut ConfigSet) -> Vec<pb::ApiKeyEntry> {
    let mut api_keys = Vec::new();
    config
        .credentials
        .retain(|credential| match api_key_entry(credential) {
            Some(entry) => {
                api_keys.push(entry);
                false
            }
            None => true,
        });
    api_keys
}

/// Checks a snapshot before a node applies it: the shared rules on `resources`, then every
/// packed API key by [`ApiKeyRules`].
pub fn validate(snapshot: &pb::Snapshot) -> Result<(), ConfigErrors> {
    let empty = ConfigSet::default();
    let resources = snapshot.resources.as_ref().unwrap_or(&empty);
    let errors = match validate::config_set(resources) {
        Ok(()) => Vec::new(),
        Err(ConfigErrors(errors)) => errors,
    };
    let mut rules = ApiKeyRules::new(resources);
    for (i, entry) in snapshot.api_keys.iter().enumerate() {
        rules.check(i, entry);
    }
    rules.finish(errors)
}

/// The facts of a well-formed packed API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedKey {
    pub id: [u8; 16],
    pub consumer_id: [u8; 16],
    pub key_sha256: [u8; 32],
}

/// The rules for a snapshot's packed API keys, checked one entry at a time so that a node can
/// check a million of them as it decodes them, without holding them all decoded: well-formed
/// ids and hash, an id no resource has, entries in ascending id order (so each id once, and
/// the order the content hash is taken in), a consumer in the snapshot, and a key no other
/// credential has.
#[derive(Debug)]
pub struct ApiKeyRules {
    resource_ids: HashSet<Uuid>,
    consumers: HashSet<Uuid>,
    /// The hashes of the API keys among the resources' own credentials, with their paths.
    resource_keys: HashMap<[u8; 32], String>,
    previous_id: Option<(Uuid, usize)>,
    /// The first 128 bits of each entry's key, with its index: sorted at the end to find a
    /// key used twice. Two SHA-256s agreeing in 128 bits are taken for one key; by chance that
    /// happens about once in 10^26 snapshots of a million keys.
    keys: Vec<([u8; 16], u32)>,
    /// By entry index, so the errors found at the end sort in with the others.
    errors: Vec<(usize, FieldError)>,
}

impl ApiKeyRules {
    pub fn new(resources: &ConfigSet) -> Self {
        let mut resource_ids = HashSet::new();
        validate::for_each_meta(resources, |_, _, meta| {
            if let Ok(id) = Uuid::parse_str(&meta.id) {
                resource_ids.insert(id);
            }
        });
        let consumers = resources
            .consumers
            .iter()
            .filter_map(|c| Uuid::parse_str(&c.meta.as_ref()?.id).ok())
            .collect();
        let resource_keys = resources
            .credentials
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match &c.kind {
                Some(pb::credential::Kind::ApiKey(key)) => {
                    let mut hash = [0u8; 32];
                    hex::decode_to_slice(&key.key_sha256, &mut hash).ok()?;
                    Some((hash, format!("credentials[{i}]")))
                }
                _ => None,
            })
            .collect();
        ApiKeyRules {
            resource_ids,
            consumers,
            resource_keys,
            previous_id: None,
            keys: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Checks the entry at `index` (entries are checked in order); returns its facts when it
    /// is well-formed. What is wrong is kept for [`Self::finish`].
    pub fn check(&mut self, index: usize, entry: &pb::ApiKeyEntry) -> Option<PackedKey> {
        let base = format!("api_keys[{index}]");
        let errors_before = self.errors.len();
        let mut fail = |field: &str, reason: String, id: Option<Uuid>| {
            self.errors
                .push((index, api_key_error(format!("{base}.{field}"), reason, id)));
        };
        let id = match uuid_bytes(&entry.id) {
            Ok(id) => Some(id),
            Err(reason) => {
                fail("id", reason, None);
                None
            }
        };
        if let Some(id) = id {
            if self.resource_ids.contains(&id) {
                fail(
                    "id",
                    format!("{id} is also the id of a resource in `resources`"),
                    Some(id),
                );
            }
            match self.previous_id {
                Some((previous, at)) if previous == id => fail(
                    "id",
                    format!("{id} is also the id of api_keys[{at}]"),
                    Some(id),
                ),
                Some((previous, at)) if previous > id => fail(
                    "id",
                    format!(
                        "{id} comes before the id of api_keys[{at}] ({previous}); entries are sorted by id"
                    ),
                    Some(id),
                ),
                _ => {}
            }
            self.previous_id = Some((id, index));
        }
        let consumer = match uuid_bytes(&entry.consumer_id) {
            Ok(consumer) if !self.consumers.contains(&consumer) => {
                fail(
                    "consumer_id",
                    format!("no consumer has the id {consumer} in this snapshot"),
                    id,
                );
                None
            }
            Ok(consumer) => Some(consumer),
            Err(reason) => {
                fail("consumer_id", reason, id);
                None
            }
        };
        let key: Option<[u8; 32]> = match entry.key_sha256.as_slice().try_into() {
            Ok(key) => {
                if let Some(other) = self.resource_keys.get(&key) {
                    fail("key_sha256", format!("the same key as {other}"), id);
                }
                let mut prefix = [0u8; 16];
                prefix.copy_from_slice(&entry.key_sha256[..16]);
                self.keys
                    .push((prefix, u32::try_from(index).unwrap_or(u32::MAX)));
                Some(key)
            }
            Err(_) => {
                fail(
                    "key_sha256",
                    format!(
                        "must be 32 bytes (a SHA-256), not {}",
                        entry.key_sha256.len()
                    ),
                    id,
                );
                None
            }
        };
        match (id, consumer, key) {
            (Some(id), Some(consumer), Some(key_sha256)) if self.errors.len() == errors_before => {
                Some(PackedKey {
                    id: *id.as_bytes(),
                    consumer_id: *consumer.as_bytes(),
                    key_sha256,
                })
            }
            _ => None,
        }
    }

    /// Adds what was found wrong with the API keys to `errors` (the resources' own).
    pub fn finish(mut self, mut errors: Vec<FieldError>) -> Result<(), ConfigErrors> {
        self.keys.sort_unstable();
        for pair in self.keys.windows(2) {
            let ((key, first), (other, at)) = (pair[0], pair[1]);
            if key == other {
                let at = at as usize;
                self.errors.push((
                    at,
                    api_key_error(
                        format!("api_keys[{at}].key_sha256"),
                        format!("the same key as api_keys[{first}]"),
                        None,
                    ),
                ));
            }
        }
        self.errors.sort_by_key(|(index, _)| *index);
        errors.extend(self.errors.into_iter().map(|(_, error)| error));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// An error at `path` about a packed API key, naming the credential when its id is known.
pub fn api_key_error(path: String, reason: String, id: Option<Uuid>) -> FieldError {
    FieldError {
        path,
        reason,
        resource: id.map(|id| pb::ResourceRef {
            kind: ResourceKind::Credential as i32,
            id: id.to_string(),
        }),
    }
}

fn uuid_bytes(bytes: &[u8]) -> Result<Uuid, String> {
    match Uuid::from_slice(bytes) {
        Ok(id) if id.is_nil() => Err("must not be the nil UUID".into()),
        Ok(id) => Ok(id),
        Err(_) => Err(format!(
            "must be the 16 bytes of a UUID, not {} bytes",
            bytes.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declarative::{self, Format};

    const DOC: &str = r#"
format_version: 1
consumers:
  - name: acme
    credentials:
      - name: main
        api_key: { key_sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" }
      - name: second
        api_key: { key_sha256: "486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7" }
        revoked: true
      - name: token
        jwt: { issuer: "https://id.example.com", subject: "acme" }
"#;

    fn config() -> ConfigSet {
        declarative::load(DOC, Format::Yaml).unwrap()
    }

    #[test]
    fn api_keys_are_packed_and_other_credentials_stay_whole() {
        let config = config();
        let snapshot = from_config(config.clone());
        let resources = snapshot.resources.as_ref().unwrap();
        assert_eq!(
            resources.credentials.len(),
            1,
            "the JWT credential stays whole"
        );
        assert!(matches!(
            resources.credentials[0].kind,
            Some(pb::credential::Kind::Jwt(_))
        ));
        assert_eq!(snapshot.api_keys.len(), 2);
        let consumer = config.consumers[0].meta.as_ref().unwrap().id.clone();
        for entry in &snapshot.api_keys {
            assert_eq!(
                Uuid::from_slice(&entry.consumer_id).unwrap().to_string(),
                consumer
            );
            assert_eq!(entry.key_sha256.len(), 32);
        }
        assert!(snapshot.api_keys.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(snapshot.api_keys.iter().filter(|e| e.revoked).count(), 1);
        validate(&snapshot).unwrap();
    }

    #[test]
    fn the_hash_ignores_order_and_sees_every_key() {
        let mut config = config();
        let hash = content_hash(&from_config(config.clone()));
        config.credentials.reverse();
        assert_eq!(content_hash(&from_config(config.clone())), hash);
        let key = config
            .credentials
            .iter_mut()
            .find_map(|c| match &mut c.kind {
                Some(pb::credential::Kind::ApiKey(key)) => Some(key),
                _ => None,
            });
        key.unwrap().key_sha256 = "0".repeat(64);
        assert_ne!(content_hash(&from_config(config)), hash);
    }

    #[test]
    fn a_packed_snapshot_is_much_smaller_than_whole_credentials() {
        let config = config();
        let whole = config.encoded_len();
        let packed = from_config(config).encoded_len();
        assert!(
            packed * 10 < whole * 8,
            "{packed} bytes packed vs {whole} whole"
        );
    }

    #[test]
    fn a_malformed_key_stays_whole_and_is_reported() {
        let mut config = config();
        if let Some(pb::credential::Kind::ApiKey(key)) = &mut config.credentials[0].kind {
            key.key_sha256 = "not hex".into();
        }
        let snapshot = from_config(config);
        assert_eq!(snapshot.api_keys.len(), 1);
        let errors = validate(&snapshot).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.path.ends_with(".api_key.key_sha256")),
            "{errors}"
        );
    }

    #[test]
    fn bad_packed_rows_are_named() {
        let mut snapshot = from_config(config());
        let good = snapshot.api_keys[0].clone();
        let consumer_id = good.consumer_id.clone();
        snapshot.api_keys.push(pb::ApiKeyEntry {
            id: vec![1; 15],
            consumer_id: Uuid::new_v4().as_bytes().to_vec(),
            key_sha256: vec![7; 31],
            ..Default::default()
        });
        snapshot.api_keys.push(pb::ApiKeyEntry {
            consumer_id,
            ..good.clone()
        });
        let consumer = snapshot.resources.as_ref().unwrap().consumers[0].clone();
        let consumer_uuid = consumer.meta.as_ref().unwrap().id.clone();
        snapshot.api_keys.push(pb::ApiKeyEntry {
            id: Uuid::parse_str(&consumer_uuid).unwrap().as_bytes().to_vec(),
            consumer_id: Uuid::nil().as_bytes().to_vec(),
            key_sha256: vec![9; 32],
            ..Default::default()
        });
        let errors = validate(&snapshot).unwrap_err();
        let mut paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        // api_keys[4]'s id may also be out of order, by chance of the UUIDs: one path.
        paths.dedup();
        assert_eq!(
            paths,
            [
                "api_keys[2].id",
                "api_keys[2].consumer_id",
                "api_keys[2].key_sha256",
                "api_keys[3].id",
                "api_keys[3].key_sha256",
                "api_keys[4].id",
                "api_keys[4].consumer_id",
            ],
            "{errors}"
        );
        for expected in [
            "no consumer has the id",
            "entries are sorted by id",
            "the same key as api_keys[0]",
        ] {
            assert!(
                errors.to_string().contains(expected),
                "{expected}: {errors}"
            );
        }
    }

    #[test]
    fn a_delta_packs_its_upserted_keys() {
        let config = config();
        let removed = vec![pb::ResourceRef {
            kind: ResourceKind::Plan as i32,
            id: Uuid::new_v4().to_string(),
        }];
        let delta = delta(4, config, removed);
        assert_eq!(delta.base_version, 4);
        assert_eq!(delta.upserted_api_keys.len(), 2);
        assert_eq!(delta.upserted.as_ref().unwrap().credentials.len(), 1);
        assert_eq!(delta.removed.len(), 1);
    }
}
