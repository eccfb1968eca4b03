//! What a node holds of its configuration, resource by resource, in structurally shared maps
//! ([`imbl::OrdMap`]): a clone is O(1), and a delta changes only the entries it names, so a
//! one-consumer delta on a million API keys copies a few tree nodes rather than the config.
//!
//! The maps are ordered as a canonical snapshot is (kind, then id), so the node can re-encode
//! what it holds byte for byte as the control plane encoded it, and check the content hash a
//! delta was sent with ([`Holdings::encode_snapshot`]).

use std::collections::HashSet;
use std::ops::Bound;

use imbl::OrdMap;
use prost::Message;
use sha2::{Digest, Sha256};
use sluice_proto::pb::{self, ConfigSet, Resource, ResourceKind};
use sluice_proto::validate::{self, Locate};
use sluice_proto::{ConfigErrors, FieldError};
use uuid::Uuid;

/// An API-key credential as the node keeps it: fixed-size fields, no heap allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub consumer_id: [u8; 16],
    pub key_sha256: [u8; 32],
    pub expires_at: Option<prost_types::Timestamp>,
    pub revoked: bool,
}

/// Kinds whose change recompiles the router, upstreams and certificates, and is checked
/// against the whole configuration. The others (consumers, credentials, subscriptions: the
/// large maps) are checked one resource at a time and leave the compiled parts as they are.
const STRUCTURAL: [ResourceKind; 6] = [
    ResourceKind::Api,
    ResourceKind::Upstream,
    ResourceKind::Plan,
    ResourceKind::Policy,
    ResourceKind::Broker,
    ResourceKind::Certificate,
];

/// The resources of one configuration.
#[derive(Debug, Clone, Default)]
pub struct Holdings {
    /// Every resource but packed API keys, by (kind number, id). The kind numbers are the
    /// `ConfigSet` field numbers, so in this order the resources encode as the canonical
    /// `ConfigSet`.
    resources: OrdMap<(i32, String), Resource>,
    /// Packed API-key credentials, by credential id.
    api_keys: OrdMap<[u8; 16], ApiKey>,
    /// How many of `resources` are of each kind (by kind number), kept as they change so
    /// counting costs nothing.
    counts: [usize; 10],
}

/// What a delta changed, for deciding what to recompile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// An API, upstream, plan, policy, broker or certificate was added, changed or removed.
    pub structural: bool,
}

impl Holdings {
    /// Takes in a validated snapshot.
    pub fn from_snapshot(snapshot: pb::Snapshot) -> Result<Self, ConfigErrors> {
        let mut holdings = Holdings::default();
        for resource in snapshot.resources.unwrap_or_default().into_resources() {
            holdings.insert(resource);
        }
        let mut errors = Vec::new();
        for (i, entry) in snapshot.api_keys.into_iter().enumerate() {
            match packed(&entry) {
                Ok((id, key)) => {
                    holdings.api_keys.insert(id, key);
                }
                Err(reason) => errors.push(api_key_error(format!("api_keys[{i}]"), reason, None)),
            }
        }
        if errors.is_empty() {
            Ok(holdings)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// These holdings with `delta` applied, checked: the upserted resources one by one
    /// against what they refer to, or the whole configuration when an API, upstream, plan,
    /// policy, broker or certificate changed. Rules that span many resources (a name or key
    /// used once per group) are not re-checked here for the large maps: the control plane
    /// checked the whole version it sent, and the node proves it holds exactly that version
    /// by its content hash once the delta is applied.
    pub fn apply(&self, delta: &pb::Delta) -> Result<(Holdings, Changed), ConfigErrors> {
        let mut next = self.clone();
        let mut changed = Changed::default();
        for removed in &delta.removed {
            let kind = ResourceKind::try_from(removed.kind).unwrap_or(ResourceKind::Unspecified);
            changed.structural |= STRUCTURAL.contains(&kind);
            next.remove(kind, &removed.id);
        }
        let upserted = delta.upserted.clone().unwrap_or_default();
        let upserted_counts = KindCounts::of(&upserted);
        let resources = upserted.into_resources();
        for resource in &resources {
            changed.structural |= STRUCTURAL.contains(&resource.kind());
            next.remove(resource.kind(), resource.id());
            next.insert(resource.clone());
        }
        let mut errors = Vec::new();
        for (i, entry) in delta.upserted_api_keys.iter().enumerate() {
            let at = format!("upserted_api_keys[{i}]");
            match packed(entry) {
                Ok((id, key)) => {
                    let consumer = Uuid::from_bytes(key.consumer_id).to_string();
                    if next.get(ResourceKind::Consumer, &consumer).is_none() {
                        errors.push(api_key_error(
                            format!("{at}.consumer_id"),
                            format!("no consumer has the id {consumer}"),
                            Some(Uuid::from_bytes(id)),
                        ));
                    }
                    next.remove(ResourceKind::Credential, &Uuid::from_bytes(id).to_string());
                    next.api_keys.insert(id, key);
                }
                Err(reason) => errors.push(api_key_error(at, reason, None)),
            }
        }
        let checked = if changed.structural {
            validate::config_set(&next.config_set())
        } else {
            next.check_upserted(resources, upserted_counts)
        };
        if let Err(ConfigErrors(more)) = checked {
            errors.extend(more);
        }
        if errors.is_empty() {
            Ok((next, changed))
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks upserted resources with the resources they refer to as context.
    fn check_upserted(
        &self,
        upserted: Vec<Resource>,
        counts: KindCounts,
    ) -> Result<(), ConfigErrors> {
        let mut set: ConfigSet = upserted.iter().cloned().collect();
        // Sets, not scans: a delta may upsert a hundred thousand subscriptions.
        let ours: HashSet<(i32, &str)> =
            upserted.iter().map(|r| (r.kind() as i32, r.id())).collect();
        let mut context: HashSet<(i32, &str)> = HashSet::new();
        for resource in &upserted {
            for (kind, id) in resource.references() {
                let key = (kind as i32, id);
                if !ours.contains(&key)
                    && let Some(found) = self.get(kind, id)
                    && context.insert(key)
                {
                    set.push(found.clone());
                }
            }
        }
        validate::config_set_judging(&set, &counts, |r| ours.contains(&(r.kind, r.id.as_str())))
    }

    fn insert(&mut self, resource: Resource) {
        let kind = resource.kind() as usize;
        let key = (kind as i32, resource.id().to_owned());
        if self.resources.insert(key, resource).is_none() {
            self.counts[kind] += 1;
        }
    }

    /// Removes whatever is held under `id` as `kind`; a credential may be held packed.
    fn remove(&mut self, kind: ResourceKind, id: &str) {
        if self
            .resources
            .remove(&(kind as i32, id.to_owned()))
            .is_some()
        {
            self.counts[kind as usize] -= 1;
        }
        if kind == ResourceKind::Credential
            && let Ok(id) = Uuid::parse_str(id)
        {
            self.api_keys.remove(id.as_bytes());
        }
    }

    fn get(&self, kind: ResourceKind, id: &str) -> Option<&Resource> {
        self.resources.get(&(kind as i32, id.to_owned()))
    }

    /// The resources of one kind, by id.
    fn of_kind(&self, kind: ResourceKind) -> impl Iterator<Item = &Resource> {
        let start = (kind as i32, String::new());
        let end = (kind as i32 + 1, String::new());
        self.resources
            .range((Bound::Included(start), Bound::Excluded(end)))
            .map(|(_, resource)| resource)
    }

    /// How many resources of `kind` are held (API keys included among credentials).
    pub fn count(&self, kind: ResourceKind) -> usize {
        let whole = self.counts[kind as usize];
        if kind == ResourceKind::Credential {
            whole + self.api_keys.len()
        } else {
            whole
        }
    }

    pub fn apis(&self) -> impl Iterator<Item = &pb::Api> {
        self.of_kind(ResourceKind::Api)
            .filter_map(|r| match &r.kind {
                Some(pb::resource::Kind::Api(api)) => Some(api),
                _ => None,
            })
    }

    pub fn upstreams(&self) -> impl Iterator<Item = &pb::Upstream> {
        self.of_kind(ResourceKind::Upstream)
            .filter_map(|r| match &r.kind {
                Some(pb::resource::Kind::Upstream(upstream)) => Some(upstream),
                _ => None,
            })
    }

    pub fn certificates(&self) -> impl Iterator<Item = &pb::Certificate> {
        self.of_kind(ResourceKind::Certificate)
            .filter_map(|r| match &r.kind {
                Some(pb::resource::Kind::Certificate(certificate)) => Some(certificate),
                _ => None,
            })
    }

    /// Every resource but the packed API keys, as one config set (canonical order).
    pub fn config_set(&self) -> ConfigSet {
        self.resources.values().cloned().collect()
    }

    /// The canonical encoding of the snapshot these holdings are: the same bytes as
    /// `snapshot::from_config` of the same resources, encoded.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let set_len: usize = self.resources.values().map(Message::encoded_len).sum();
        let mut out = Vec::with_capacity(set_len + self.api_keys.len() * 80 + 16);
        // Field 1: the ConfigSet, whose element encodings are exactly those of `Resource`.
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(set_len as u64, &mut out);
        for resource in self.resources.values() {
            resource.encode(&mut out).expect("a Vec grows as needed");
        }
        // Field 2: the packed keys, one reused entry so no key allocates.
        let mut entry = pb::ApiKeyEntry::default();
        for (id, key) in &self.api_keys {
            entry.id.clear();
            entry.id.extend_from_slice(id);
            entry.consumer_id.clear();
            entry.consumer_id.extend_from_slice(&key.consumer_id);
            entry.key_sha256.clear();
            entry.key_sha256.extend_from_slice(&key.key_sha256);
            entry.expires_at = key.expires_at;
            entry.revoked = key.revoked;
            encode_key(2, WireType::LengthDelimited, &mut out);
            encode_varint(entry.encoded_len() as u64, &mut out);
            entry.encode(&mut out).expect("a Vec grows as needed");
        }
        out
    }

    /// Lowercase hex SHA-256 of [`Self::encode_snapshot`]: equal to
    /// [`sluice_proto::snapshot::content_hash`] of the same configuration.
    pub fn content_hash(&self) -> String {
        hex::encode(Sha256::digest(self.encode_snapshot()))
    }
}

fn packed(entry: &pb::ApiKeyEntry) -> Result<([u8; 16], ApiKey), String> {
    let id: [u8; 16] = entry
        .id
        .as_slice()
        .try_into()
        .map_err(|_| format!("id must be 16 bytes, not {}", entry.id.len()))?;
    let consumer_id: [u8; 16] = entry.consumer_id.as_slice().try_into().map_err(|_| {
        format!(
            "consumer_id must be 16 bytes, not {}",
            entry.consumer_id.len()
        )
    })?;
    let key_sha256: [u8; 32] = entry.key_sha256.as_slice().try_into().map_err(|_| {
        format!(
            "key_sha256 must be 32 bytes (a SHA-256), not {}",
            entry.key_sha256.len()
        )
    })?;
    Ok((
        id,
        ApiKey {
            consumer_id,
            key_sha256,
            expires_at: entry.expires_at,
            revoked: entry.revoked,
        },
    ))
}

fn api_key_error(path: String, reason: String, id: Option<Uuid>) -> FieldError {
    FieldError {
        path,
        reason,
        resource: id.map(|id| pb::ResourceRef {
            kind: ResourceKind::Credential as i32,
            id: id.to_string(),
        }),
    }
}

/// How many resources of each kind a delta upserted: the first that many of each list in the
/// set being checked are the delta's (`upserted.consumers[0]`), the rest are context.
#[derive(Debug, Clone, Copy, Default)]
struct KindCounts([usize; 10]);

impl KindCounts {
    fn of(set: &ConfigSet) -> Self {
        let mut counts = [0; 10];
        for (kind, len) in [
            (ResourceKind::Api, set.apis.len()),
            (ResourceKind::Upstream, set.upstreams.len()),
            (ResourceKind::Consumer, set.consumers.len()),
            (ResourceKind::Credential, set.credentials.len()),
            (ResourceKind::Plan, set.plans.len()),
            (ResourceKind::Subscription, set.subscriptions.len()),
            (ResourceKind::Policy, set.policies.len()),
            (ResourceKind::Broker, set.brokers.len()),
            (ResourceKind::Certificate, set.certificates.len()),
        ] {
            counts[kind as usize] = len;
        }
        KindCounts(counts)
    }
}

impl Locate for KindCounts {
    fn locate(&self, kind: ResourceKind, index: usize) -> String {
        let list = validate::list_name(kind);
        if index < self.0[kind as usize] {
            format!("upserted.{list}[{index}]")
        } else {
            format!("{list}[{index}] (context)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::declarative::{self, Format};
    use sluice_proto::snapshot;

    /// The delta from `before` to `after`, as the control plane builds one: for tests.
    fn delta_between(before: &ConfigSet, after: &ConfigSet) -> pb::Delta {
        let old: Vec<Resource> = before.clone().into_resources();
        let new: Vec<Resource> = after.clone().into_resources();
        let upserted: ConfigSet = new.iter().filter(|r| !old.contains(r)).cloned().collect();
        let removed = old
            .iter()
            .filter(|r| !new.iter().any(|n| n.kind() == r.kind() && n.id() == r.id()))
            .map(|r| pb::ResourceRef {
                kind: r.kind() as i32,
                id: r.id().to_owned(),
            })
            .collect();
        snapshot::delta(1, upserted, removed)
    }

    const DOC: &str = r#"
format_version: 1
upstreams:
  - name: backend
    targets: [{ url: "http://127.0.0.1:9" }]
apis:
  - name: orders
    routes:
      - name: list
        path: /orders
        proxy: { upstream: backend }
plans:
  - name: gold
consumers:
  - name: acme
    credentials:
      - name: main
        api_key: { key_sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" }
        expires_at: "2030-01-01T00:00:00Z"
      - name: token
        jwt: { issuer: "https://id.example.com", subject: "acme" }
  - name: globex
    credentials:
      - name: globex-main
        api_key: { key_sha256: "486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7" }
        revoked: true
subscriptions:
  - consumer: acme
    api: orders
    plan: gold
"#;

    fn load(doc: &str) -> ConfigSet {
        declarative::load(doc, Format::Yaml).unwrap()
    }

    fn holdings(config: &ConfigSet) -> Holdings {
        Holdings::from_snapshot(snapshot::from_config(config.clone())).unwrap()
    }

    #[test]
    fn held_resources_encode_as_the_canonical_snapshot() {
        let config = load(DOC);
        let canonical = snapshot::from_config(config.clone());
        let held = holdings(&config);
        assert_eq!(held.encode_snapshot(), canonical.encode_to_vec());
        assert_eq!(held.content_hash(), snapshot::content_hash(&canonical));
        assert_eq!(held.count(ResourceKind::Credential), 3);
        assert_eq!(held.api_keys.len(), 2);
    }

    #[test]
    fn a_delta_gives_the_same_holdings_as_the_new_snapshot() {
        let before = load(DOC);
        let after = load(
            &DOC.replace("name: globex", "name: globex-inc")
                .replace("revoked: true", "revoked: false")
                .replace("subject: \"acme\"", "subject: \"acme-2\""),
        );
        let delta = delta_between(&before, &after);
        let (next, changed) = holdings(&before).apply(&delta).unwrap();
        assert!(
            !changed.structural,
            "only consumers and credentials changed"
        );
        assert_eq!(
            next.content_hash(),
            snapshot::content_hash(&snapshot::from_config(after))
        );
    }

    #[test]
    fn removals_and_structural_changes_apply_and_are_flagged() {
        let before = load(DOC);
        let after = load(
            &DOC.replace(
                "subscriptions:\n  - consumer: acme\n    api: orders\n    plan: gold\n",
                "",
            )
            .replace(
                "upstreams:\n",
                "upstreams:\n  - name: extra\n    targets: [{ url: \"http://127.0.0.1:10\" }]\n",
            ),
        );
        let delta = delta_between(&before, &after);
        assert!(!delta.removed.is_empty(), "the subscription is removed");
        let (next, changed) = holdings(&before).apply(&delta).unwrap();
        assert!(changed.structural, "an upstream was added");
        assert_eq!(
            next.content_hash(),
            snapshot::content_hash(&snapshot::from_config(after))
        );
        assert_eq!(next.count(ResourceKind::Subscription), 0);
        assert_eq!(next.count(ResourceKind::Upstream), 2);
    }

    #[test]
    fn a_delta_with_a_dangling_reference_is_refused_by_path() {
        let before = load(DOC);
        let held = holdings(&before);
        let mut credential = before
            .credentials
            .iter()
            .find(|c| matches!(c.kind, Some(pb::credential::Kind::Jwt(_))))
            .unwrap()
            .clone();
        credential.consumer_id = Uuid::new_v4().to_string();
        let mut packed_key = snapshot::from_config(before).api_keys[0].clone();
        packed_key.consumer_id = Uuid::new_v4().as_bytes().to_vec();
        let delta = pb::Delta {
            base_version: 1,
            upserted: Some(ConfigSet {
                credentials: vec![credential],
                ..Default::default()
            }),
            removed: Vec::new(),
            upserted_api_keys: vec![packed_key, pb::ApiKeyEntry::default()],
        };
        let errors = held.apply(&delta).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "upserted_api_keys[0].consumer_id",
                "upserted_api_keys[1]",
                "upserted.credentials[0].consumer"
            ],
            "{errors}"
        );
    }

    #[test]
    fn applying_a_delta_leaves_the_old_holdings_as_they_were() {
        let before = load(DOC);
        let held = holdings(&before);
        let hash = held.content_hash();
        let after = load(&DOC.replace("revoked: true", "revoked: false"));
        let (next, _) = held.apply(&delta_between(&before, &after)).unwrap();
        assert_eq!(held.content_hash(), hash);
        assert_ne!(next.content_hash(), hash);
    }
}
