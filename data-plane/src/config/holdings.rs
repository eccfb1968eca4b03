//! What a node holds of its configuration, resource by resource, in structurally shared maps
//! ([`ChunkedMap`], [`HashedMap`], [`KeyTable`]): a clone is O(1), and a delta changes only
//! the entries it names, so a one-consumer delta on a million API keys copies a few chunks
//! rather than the config. What a request looks up (a key by its hash, a consumer, a
//! subscription) is held in hashed maps, found in a few cache misses; the rest in sorted ones.
//!
//! Each resource is held as its encoding (a `Resource` message, a few hundred bytes) and
//! decoded when it is needed, which is seldom: to check a delta against it, or to compile the
//! router when an API changes. API keys, most of a large config, are held packed in 80 bytes
//! each. So a node holds about what the snapshot weighs, not the three times more it would
//! take decoded.
//!
//! The maps are ordered as a canonical snapshot is (kind, then id), so the node can re-encode
//! what it holds byte for byte as the control plane encoded it, and check the content hash a
//! delta was sent with ([`Holdings::content_hash`]).

use std::collections::HashSet;

use compact_str::CompactString;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::Timestamp;
use sha2::{Digest, Sha256};
use sluice_proto::pb::{self, ConfigSet, Resource, ResourceKind};
use sluice_proto::snapshot::{ApiKeyRules, PackedKey, api_key_error};
use sluice_proto::validate::{self, Locate};
use sluice_proto::{ConfigErrors, FieldError};
use uuid::Uuid;

use super::chunked::ChunkedMap;
use super::hashed::HashedMap;
pub use super::keys::ApiKey;
use super::keys::{self, KeyTable};

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

/// The kinds a caller's standing rests on ([`crate::auth::standing`]): a delta that changes
/// none of them (nor any API key) leaves every open stream's caller as it was.
const STANDING: [ResourceKind; 4] = [
    ResourceKind::Api,
    ResourceKind::Consumer,
    ResourceKind::Credential,
    ResourceKind::Subscription,
];

/// A resource's encoding as a `Resource` message. The oneof's field numbers are the
/// `ConfigSet`'s, so it is also the resource's encoding as an element of a `ConfigSet`.
type Encoded = Box<[u8]>;

/// The resources of one configuration.
#[derive(Debug, Clone, Default)]
pub struct Holdings {
    /// Every resource but consumers and packed API keys, by (kind number, id); in this order
    /// they encode as the canonical `ConfigSet` (ids are canonical UUIDs, which sort as their
    /// text does).
    resources: ChunkedMap<(i32, Uuid), Encoded>,
    /// Consumers, by id: every authenticated request reads one. Sorted by id when listed.
    consumers: HashedMap<[u8; 16], HeldConsumer>,
    /// Packed API-key credentials, by hash and by credential id.
    api_keys: KeyTable,
    /// The lookups a request makes, kept as the maps change: see [`Indexes`].
    indexes: Indexes,
    /// How many of `resources` are of each kind (by kind number), kept as they change so
    /// counting costs nothing.
    counts: [usize; 10],
}

/// What a request looks credentials and subscriptions up by. Ids in the values, so the
/// resources are held once.
#[derive(Debug, Clone, Default)]
struct Indexes {
    /// What a request needs of a subscription, by (consumer id, API id): a consumer has one
    /// subscription per API. Held here rather than decoded from the resource on each request.
    subscriptions: HashedMap<([u8; 16], [u8; 16]), HeldSubscription>,
    /// JWT and client-certificate credential ids by the SHA-256 of what identifies them
    /// ([`CredentialIdentity::digest`]).
    identities: HashedMap<[u8; 32], [u8; 16]>,
}

/// What names a credential other than an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialIdentity<'a> {
    /// A JWT's issuer and the value of its issuer's consumer claim.
    Jwt { issuer: &'a str, subject: &'a str },
    /// A client certificate's SHA-256, lowercase hex.
    CertificateFingerprint(&'a str),
    /// A client certificate's subject distinguished name (RFC 4514, as `x509-parser` prints it),
    /// and the SHA-256 of the CA its chain must lead to ("": any the route trusts).
    CertificateSubject { subject: &'a str, ca: &'a str },
}

impl CredentialIdentity<'_> {
    /// What the credential is held under ([`Holdings::credential_by_digest`]).
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        // A tag and separators that cannot occur inside the parts keep the kinds apart.
        match self {
            CredentialIdentity::Jwt { issuer, subject } => {
                hasher.update(b"jwt\0");
                hasher.update(issuer.as_bytes());
                hasher.update(b"\0");
                hasher.update(subject.as_bytes());
            }
            CredentialIdentity::CertificateFingerprint(fingerprint) => {
                hasher.update(b"mtls-sha256\0");
                hasher.update(fingerprint.to_ascii_lowercase().as_bytes());
            }
            CredentialIdentity::CertificateSubject { subject, ca } => {
                hasher.update(b"mtls-subject\0");
                hasher.update(subject.as_bytes());
                if !ca.is_empty() {
                    hasher.update(b"\0");
                    hasher.update(ca.to_ascii_lowercase().as_bytes());
                }
            }
        }
        hasher.finalize().into()
    }

    /// What identifies `credential`, when it is a JWT or client-certificate credential.
    fn of(credential: &pb::Credential) -> Option<CredentialIdentity<'_>> {
        use pb::credential::Kind;
        match &credential.kind {
            Some(Kind::Jwt(jwt)) => Some(CredentialIdentity::Jwt {
                issuer: &jwt.issuer,
                subject: &jwt.subject,
            }),
            Some(Kind::Mtls(mtls)) if !mtls.fingerprint_sha256.is_empty() => Some(
                CredentialIdentity::CertificateFingerprint(&mtls.fingerprint_sha256),
            ),
            Some(Kind::Mtls(mtls)) => Some(CredentialIdentity::CertificateSubject {
                subject: &mtls.subject,
                ca: &mtls.ca_sha256,
            }),
            Some(Kind::ApiKey(_)) | None => None,
        }
    }
}

/// A held consumer's encoding (a `Resource`), decoded for the fields a request reads: prost
/// skips the rest (labels, description, ...) without allocating for them.
#[derive(Clone, PartialEq, Message)]
struct ConsumerResourceView {
    /// `Resource.kind.consumer`.
    #[prost(message, optional, tag = "3")]
    consumer: Option<ConsumerView>,
}

/// The fields of a `Consumer` a request reads; the tags are `Consumer`'s.
#[derive(Clone, PartialEq, Message)]
struct ConsumerView {
    #[prost(message, optional, tag = "1")]
    meta: Option<MetaNameView>,
    #[prost(string, tag = "2")]
    custom_id: String,
    #[prost(bool, tag = "3")]
    disabled: bool,
    #[prost(string, repeated, tag = "4")]
    policy_ids: Vec<String>,
}

/// A held consumer: its encoding, which snapshots and the content hash list, and the fields a
/// request reads, decoded once when it is held. Every authenticated request reads a consumer;
/// decoding it there cost a read of the encoding (a cache miss on a large configuration) and
/// an allocation per field. 80 bytes with its id in the consumers' table. The name and custom
/// id are kept together, in place when they fit in 24 bytes (a name and a short custom id do)
/// and in one small allocation otherwise: read from an allocation, they cost every request one
/// more cache miss on a large configuration, after the consumer's own.
#[derive(Debug, Clone)]
pub struct HeldConsumer {
    encoded: Encoded,
    /// The name, then the custom id.
    names: CompactString,
    name_len: u32,
    pub disabled: bool,
    policy_ids: Box<[Box<str>]>,
}

impl HeldConsumer {
    /// The consumer held as `encoded`, a `Resource`. A resource that is no consumer, or does
    /// not decode, holds no fields (the validator refuses a configuration with one).
    fn of(encoded: Encoded) -> Self {
        let view = ConsumerResourceView::decode(&encoded[..])
            .ok()
            .and_then(|resource| resource.consumer)
            .unwrap_or_default();
        let name = view.meta.map(|meta| meta.name).unwrap_or_default();
        // A protobuf message is under 2 GiB, so the length fits.
        let name_len = name.len() as u32;
        let mut names = CompactString::with_capacity(name.len() + view.custom_id.len());
        names.push_str(&name);
        names.push_str(&view.custom_id);
        HeldConsumer {
            encoded,
            names,
            name_len,
            disabled: view.disabled,
            policy_ids: view.policy_ids.into_iter().map(String::into).collect(),
        }
    }

    pub fn name(&self) -> &str {
        &self.names[..self.name_len as usize]
    }

    /// `""` when the consumer has none.
    pub fn custom_id(&self) -> &str {
        &self.names[self.name_len as usize..]
    }

    pub fn policy_ids(&self) -> &[Box<str>] {
        &self.policy_ids
    }
}

/// `Meta.name`, with `Meta`'s tag.
#[derive(Clone, PartialEq, Message)]
struct MetaNameView {
    #[prost(string, tag = "3")]
    name: String,
}

/// A subscription as a request checks it: 56 bytes, nothing to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSubscription {
    pub id: [u8; 16],
    pub plan_id: [u8; 16],
    /// Not active: suspended, or in a status this node does not know (one a newer control
    /// plane added), which admits nobody until the node learns what it means.
    pub suspended: bool,
    /// `expires_at` as (seconds, nanos); `None`: it never expires.
    expires: Option<(i64, i32)>,
}

impl HeldSubscription {
    fn of(id: [u8; 16], subscription: &pb::Subscription) -> Option<Self> {
        Some(HeldSubscription {
            id,
            plan_id: uuid_bytes(&subscription.plan_id)?,
            suspended: !matches!(
                pb::subscription::Status::try_from(subscription.status),
                Ok(pb::subscription::Status::Active | pb::subscription::Status::Unspecified)
            ),
            expires: subscription.expires_at.map(|t| (t.seconds, t.nanos)),
        })
    }

    pub fn expires_at(&self) -> Option<Timestamp> {
        self.expires
            .map(|(seconds, nanos)| Timestamp { seconds, nanos })
    }
}

/// The index entries one held resource makes.
enum IndexEntry {
    Subscription {
        consumer_api: ([u8; 16], [u8; 16]),
        held: HeldSubscription,
    },
    Identity {
        digest: [u8; 32],
    },
}

impl IndexEntry {
    fn of(resource: &Resource, id: [u8; 16]) -> Option<IndexEntry> {
        match &resource.kind {
            Some(pb::resource::Kind::Subscription(s)) => Some(IndexEntry::Subscription {
                consumer_api: (uuid_bytes(&s.consumer_id)?, uuid_bytes(&s.api_id)?),
                held: HeldSubscription::of(id, s)?,
            }),
            Some(pb::resource::Kind::Credential(c)) => Some(IndexEntry::Identity {
                digest: CredentialIdentity::of(c)?.digest(),
            }),
            _ => None,
        }
    }
}

fn uuid_bytes(id: &str) -> Option<[u8; 16]> {
    Uuid::parse_str(id).ok().map(Uuid::into_bytes)
}

impl Indexes {
    /// The indexes of a whole snapshot's resources (API keys aside), built at once rather
    /// than inserted one at a time.
    fn from_entries(entries: Vec<(IndexEntry, [u8; 16])>) -> Self {
        let mut subscriptions = Vec::new();
        let mut identities = Vec::new();
        for (entry, id) in entries {
            match entry {
                IndexEntry::Subscription { consumer_api, held } => {
                    subscriptions.push((consumer_api, held))
                }
                IndexEntry::Identity { digest } => identities.push((digest, id)),
            }
        }
        // Two resources with one key were reported by the validator; one is kept.
        Indexes {
            subscriptions: HashedMap::from_entries(subscriptions),
            identities: HashedMap::from_entries(identities),
        }
    }

    fn add(&mut self, entry: IndexEntry, id: [u8; 16]) {
        match entry {
            IndexEntry::Subscription { consumer_api, held } => {
                self.subscriptions.insert(consumer_api, held);
            }
            IndexEntry::Identity { digest } => {
                self.identities.insert(digest, id);
            }
        }
    }

    /// Removes the entry `id` made, unless another resource has taken its place since.
    fn drop(&mut self, entry: IndexEntry, id: [u8; 16]) {
        match entry {
            IndexEntry::Subscription { consumer_api, .. } => {
                if self.subscriptions.get(&consumer_api).map(|held| held.id) == Some(id) {
                    self.subscriptions.remove(&consumer_api);
                }
            }
            IndexEntry::Identity { digest } => {
                if self.identities.get(&digest) == Some(&id) {
                    self.identities.remove(&digest);
                }
            }
        }
    }
}

/// What a delta changed, for deciding what to recompile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// An API, upstream, plan, policy, broker or certificate was added, changed or removed.
    pub structural: bool,
    /// An API, consumer, credential (an API key among them) or subscription was.
    pub standing: bool,
}

impl Holdings {
    /// Takes in an encoded snapshot, whole ([`SnapshotReader`]).
    pub fn from_encoded(snapshot: &[u8]) -> Result<Self, ConfigErrors> {
        let mut reader = SnapshotReader::default();
        reader.feed(snapshot)?;
        reader.finish()
    }

    /// Takes in a decoded snapshot (a standalone file's, and tests').
    pub fn from_snapshot(snapshot: &pb::Snapshot) -> Result<Self, ConfigErrors> {
        Self::from_encoded(&snapshot.encode_to_vec())
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
        // API keys change in one batch at the end, each shard of the table copied once.
        let mut keys_leaving = Vec::new();
        let mut keys_joining = Vec::new();
        for removed in &delta.removed {
            let kind = ResourceKind::try_from(removed.kind).unwrap_or(ResourceKind::Unspecified);
            changed.structural |= STRUCTURAL.contains(&kind);
            changed.standing |= STANDING.contains(&kind);
            // An id that is no UUID names nothing held.
            if let Ok(id) = Uuid::parse_str(&removed.id) {
                next.remove(kind, id);
                if kind == ResourceKind::Credential {
                    keys_leaving.push(id.into_bytes());
                }
            }
        }
        let upserted = delta.upserted.clone().unwrap_or_default();
        let upserted_counts = KindCounts::of(&upserted);
        let resources = upserted.into_resources();
        let mut errors = Vec::new();
        for resource in &resources {
            changed.structural |= STRUCTURAL.contains(&resource.kind());
            changed.standing |= STANDING.contains(&resource.kind());
            // A malformed id is named by the check below.
            if let Ok(id) = Uuid::parse_str(resource.id()) {
                next.remove(resource.kind(), id);
                next.insert(resource, id);
                if resource.kind() == ResourceKind::Credential {
                    keys_leaving.push(id.into_bytes());
                }
            }
        }
        for (i, entry) in delta.upserted_api_keys.iter().enumerate() {
            let at = format!("upserted_api_keys[{i}]");
            match packed(entry) {
                Ok(key) => {
                    if next.consumers.get(&key.consumer_id).is_none() {
                        errors.push(api_key_error(
                            format!("{at}.consumer_id"),
                            format!(
                                "no consumer has the id {}",
                                Uuid::from_bytes(key.consumer_id)
                            ),
                            Some(Uuid::from_bytes(key.id)),
                        ));
                    }
                    next.remove(ResourceKind::Credential, Uuid::from_bytes(key.id));
                    keys_joining.push(ApiKey::new(key, entry.expires_at, entry.revoked));
                }
                Err(reason) => errors.push(api_key_error(at, reason, None)),
            }
        }
        changed.standing |= !keys_joining.is_empty();
        next.api_keys.update(&keys_leaving, &keys_joining);
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
                    && !context.contains(&key)
                    && let Some(found) = self.get(kind, id)
                {
                    context.insert(key);
                    set.push(found);
                }
            }
        }
        validate::config_set_judging(&set, &counts, |r| ours.contains(&(r.kind, r.id.as_str())))
    }

    fn insert(&mut self, resource: &Resource, id: Uuid) {
        if let Some(entry) = IndexEntry::of(resource, id.into_bytes()) {
            self.indexes.add(entry, id.into_bytes());
        }
        let kind = resource.kind();
        let held = encoded(resource);
        let replaced = if kind == ResourceKind::Consumer {
            self.consumers
                .insert(id.into_bytes(), HeldConsumer::of(held))
                .map(|old| old.encoded)
        } else {
            self.resources.insert((kind as i32, id), held)
        };
        if replaced.is_none() {
            self.counts[kind as usize] += 1;
        }
    }

    /// Removes the resource held under `id` as `kind` (not a packed API key: those leave in
    /// one batch, see [`Self::apply`]).
    fn remove(&mut self, kind: ResourceKind, id: Uuid) {
        let old = if kind == ResourceKind::Consumer {
            self.consumers.remove(id.as_bytes()).map(|old| old.encoded)
        } else {
            self.resources.remove(&(kind as i32, id))
        };
        if let Some(old) = old {
            self.counts[kind as usize] -= 1;
            if let Some(entry) = IndexEntry::of(&decoded(&old), id.into_bytes()) {
                self.indexes.drop(entry, id.into_bytes());
            }
        }
    }

    /// The encoding held under `id` as `kind`.
    fn held(&self, kind: ResourceKind, id: Uuid) -> Option<&Encoded> {
        if kind == ResourceKind::Consumer {
            self.consumers.get(id.as_bytes()).map(|held| &held.encoded)
        } else {
            self.resources.get(&(kind as i32, id))
        }
    }

    /// The consumers' encodings, by id.
    fn consumers_in_order(&self) -> Vec<&Encoded> {
        let mut consumers: Vec<(&[u8; 16], &HeldConsumer)> = self.consumers.iter().collect();
        consumers.sort_unstable_by_key(|(id, _)| **id);
        consumers
            .into_iter()
            .map(|(_, held)| &held.encoded)
            .collect()
    }

    /// Every resource's encoding but the packed API keys', in the canonical order: by kind
    /// number, then by id.
    fn encodings(&self) -> impl Iterator<Item = &Encoded> {
        let consumer = ResourceKind::Consumer as i32;
        let before = self
            .resources
            .iter()
            .take_while(move |((kind, _), _)| *kind < consumer);
        let after = self.resources.iter_from(&(consumer + 1, Uuid::nil()));
        before
            .map(|(_, bytes)| bytes)
            .chain(self.consumers_in_order())
            .chain(after.map(|(_, bytes)| bytes))
    }

    /// The API-key credential whose key hashes to `key_sha256`.
    pub fn api_key(&self, key_sha256: &[u8; 32]) -> Option<&ApiKey> {
        self.api_keys.get(key_sha256)
    }

    /// The JWT or client-certificate credential `identity` names.
    pub fn credential(&self, identity: &CredentialIdentity<'_>) -> Option<pb::Credential> {
        self.credential_by_digest(&identity.digest())
    }

    /// The JWT or client-certificate credential whose identity has `digest`
    /// ([`CredentialIdentity::digest`]).
    pub fn credential_by_digest(&self, digest: &[u8; 32]) -> Option<pb::Credential> {
        self.credential_by_id(self.indexes.identities.get(digest)?)
    }

    /// The credential held under `id` (a JWT or client-certificate one: API keys are held by
    /// their hash, [`Holdings::api_key`]).
    pub fn credential_by_id(&self, id: &[u8; 16]) -> Option<pb::Credential> {
        match self
            .held(ResourceKind::Credential, Uuid::from_bytes(*id))
            .map(|bytes| decoded(bytes).kind)
        {
            Some(Some(pb::resource::Kind::Credential(credential))) => Some(credential),
            _ => None,
        }
    }

    /// What a request reads of a consumer.
    pub fn consumer(&self, id: &[u8; 16]) -> Option<&HeldConsumer> {
        self.consumers.get(id)
    }

    /// The consumer's subscription to the API, whatever its status.
    pub fn subscription(&self, consumer: &[u8; 16], api: &[u8; 16]) -> Option<HeldSubscription> {
        self.indexes.subscriptions.get(&(*consumer, *api)).copied()
    }

    pub fn plans(&self) -> impl Iterator<Item = pb::Plan> {
        self.of_kind(ResourceKind::Plan)
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Plan(plan)) => Some(plan),
                _ => None,
            })
    }

    pub fn policies(&self) -> impl Iterator<Item = pb::Policy> {
        self.of_kind(ResourceKind::Policy)
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Policy(policy)) => Some(policy),
                _ => None,
            })
    }

    /// The resource held under `id` as `kind`, decoded.
    fn get(&self, kind: ResourceKind, id: &str) -> Option<Resource> {
        let id = Uuid::parse_str(id).ok()?;
        self.held(kind, id).map(|bytes| decoded(bytes))
    }

    /// The resources of one kind (not consumers), by id, decoded.
    fn of_kind(&self, kind: ResourceKind) -> impl Iterator<Item = Resource> {
        debug_assert_ne!(kind, ResourceKind::Consumer, "consumers are held apart");
        self.resources
            .iter_from(&(kind as i32, Uuid::nil()))
            .take_while(move |((k, _), _)| *k == kind as i32)
            .map(|(_, bytes)| decoded(bytes))
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

    pub fn apis(&self) -> impl Iterator<Item = pb::Api> {
        self.of_kind(ResourceKind::Api)
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Api(api)) => Some(api),
                _ => None,
            })
    }

    pub fn upstreams(&self) -> impl Iterator<Item = pb::Upstream> {
        self.of_kind(ResourceKind::Upstream)
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Upstream(upstream)) => Some(upstream),
                _ => None,
            })
    }

    pub fn brokers(&self) -> impl Iterator<Item = pb::Broker> {
        self.of_kind(ResourceKind::Broker)
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Broker(broker)) => Some(broker),
                _ => None,
            })
    }

    pub fn certificates(&self) -> impl Iterator<Item = pb::Certificate> {
        self.of_kind(ResourceKind::Certificate)
            .filter_map(|r| match r.kind {
                Some(pb::resource::Kind::Certificate(certificate)) => Some(certificate),
                _ => None,
            })
    }

    /// Every resource but the packed API keys, decoded, as one config set (canonical order).
    pub fn config_set(&self) -> ConfigSet {
        self.encodings().map(|bytes| decoded(bytes)).collect()
    }

    /// Writes the canonical encoding of the snapshot these holdings are, piece by piece: the
    /// same bytes as `snapshot::from_config` of the same resources, encoded.
    pub fn write_snapshot(&self, mut write: impl FnMut(&[u8])) {
        // Listed once: the listing sorts the consumers.
        let held: Vec<&Encoded> = self.encodings().collect();
        let set_len: usize = held.iter().map(|bytes| bytes.len()).sum();
        let mut scratch = Vec::with_capacity(128);
        // Field 1: the ConfigSet, whose elements are the held encodings.
        encode_key(1, WireType::LengthDelimited, &mut scratch);
        encode_varint(set_len as u64, &mut scratch);
        write(&scratch);
        for bytes in held {
            write(bytes);
        }
        // Field 2: the packed keys, one reused entry so no key allocates.
        let mut entry = pb::ApiKeyEntry::default();
        for key in self.api_keys.iter() {
            entry.id.clear();
            entry.id.extend_from_slice(&key.id);
            entry.consumer_id.clear();
            entry.consumer_id.extend_from_slice(&key.consumer_id);
            entry.key_sha256.clear();
            entry.key_sha256.extend_from_slice(&key.key_sha256);
            entry.expires_at = key.expires_at();
            entry.revoked = key.revoked;
            scratch.clear();
            encode_key(2, WireType::LengthDelimited, &mut scratch);
            encode_varint(entry.encoded_len() as u64, &mut scratch);
            entry.encode(&mut scratch).expect("a Vec grows as needed");
            write(&scratch);
        }
    }

    /// [`Self::write_snapshot`] into one buffer.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_snapshot(|bytes| out.extend_from_slice(bytes));
        out
    }

    /// Lowercase hex SHA-256 of the snapshot encoding, hashed as it is written: equal to
    /// [`sluice_proto::snapshot::content_hash`] of the same configuration.
    pub fn content_hash(&self) -> String {
        let mut hasher = Sha256::new();
        self.write_snapshot(|bytes| hasher.update(bytes));
        hex::encode(hasher.finalize())
    }
}

fn encoded(resource: &Resource) -> Encoded {
    resource.encode_to_vec().into_boxed_slice()
}

fn decoded(bytes: &[u8]) -> Resource {
    Resource::decode(bytes).expect("held resources are encoded by this node")
}

/// Takes in an encoded snapshot as it arrives, piece by piece, checking it as
/// `snapshot::validate` checks one: the resources (the first field, a few percent of a large
/// snapshot) once they are all in, then each API key as it comes, packed at once. So a
/// snapshot of a million keys is never held whole, encoded or decoded.
#[derive(Debug, Default)]
pub struct SnapshotReader {
    /// The start of a field whose end has not arrived yet.
    pending: Vec<u8>,
    /// Set once the resources are in.
    taken: Option<Taken>,
    /// How many API keys have come.
    keys: usize,
}

#[derive(Debug)]
struct Taken {
    holdings: Holdings,
    errors: Vec<FieldError>,
    rules: ApiKeyRules,
    api_keys: keys::Builder,
}

impl SnapshotReader {
    /// Takes in the next bytes of the snapshot. An error here (bytes that are no snapshot)
    /// ends the reading; what is wrong with the resources and keys is told by [`Self::finish`].
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ConfigErrors> {
        let undecodable =
            |e: String| ConfigErrors::single("", format!("the snapshot does not decode: {e}"));
        if !self.pending.is_empty() {
            // Complete the pending field from the front of `bytes`: byte by byte while its
            // header is cut short, then all it lacks.
            let mut pending = std::mem::take(&mut self.pending);
            while let Next::Incomplete { field_len } = next_field(&pending).map_err(undecodable)? {
                if bytes.is_empty() {
                    self.pending = pending;
                    return Ok(());
                }
                let wanted = field_len.map_or(1, |len| len - pending.len());
                let (front, rest) = bytes.split_at(wanted.min(bytes.len()));
                pending.extend_from_slice(front);
                bytes = rest;
            }
            self.read_fields(&pending).map_err(undecodable)?;
        }
        let read = self.read_fields(bytes).map_err(undecodable)?;
        let rest = &bytes[read..];
        if let Ok(Next::Incomplete {
            field_len: Some(len),
        }) = next_field(rest)
        {
            // One allocation for a large field (the resources), not a doubling series. The
            // length comes from the sender: a length no allocation can hold is not reserved
            // (the buffer then grows only with the bytes that come), rather than aborting.
            let _ = self.pending.try_reserve_exact(len);
        }
        self.pending.extend_from_slice(rest);
        Ok(())
    }

    /// The holdings, once every byte is in; or everything found wrong.
    pub fn finish(mut self) -> Result<Holdings, ConfigErrors> {
        if !self.pending.is_empty() {
            return Err(ConfigErrors::single(
                "",
                format!(
                    "the snapshot does not decode: it ends inside a field ({} bytes of it came)",
                    self.pending.len()
                ),
            ));
        }
        let Taken {
            mut holdings,
            errors,
            rules,
            api_keys,
        } = match self.taken.take() {
            Some(taken) => taken,
            None => take_resources(ConfigSet::default()),
        };
        holdings.api_keys = api_keys.build();
        rules.finish(errors)?;
        Ok(holdings)
    }

    /// Reads the complete fields at the start of `bytes`; returns how many bytes they took.
    fn read_fields(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let mut read = 0;
        while let Next::Field { number, body } = next_field(&bytes[read..])? {
            let (start, end) = (read + body.start, read + body.end);
            self.read_field(number, &bytes[start..end])?;
            read = end;
        }
        Ok(read)
    }

    fn read_field(&mut self, number: u32, bytes: &[u8]) -> Result<(), String> {
        match number {
            1 if self.taken.is_some() => {
                Err("`resources` must come once, before `api_keys`".to_owned())
            }
            1 => {
                let set = ConfigSet::decode(bytes).map_err(|e| format!("resources: {e}"))?;
                self.taken = Some(take_resources(set));
                Ok(())
            }
            2 => {
                let index = self.keys;
                self.keys += 1;
                let taken = self
                    .taken
                    .get_or_insert_with(|| take_resources(ConfigSet::default()));
                let entry = pb::ApiKeyEntry::decode(bytes)
                    .map_err(|e| format!("api_keys[{index}]: {e}"))?;
                if let Some(key) = taken.rules.check(index, &entry)
                    // One out of order was named by the rules; the snapshot will be refused.
                    && taken.api_keys.last().is_none_or(|last| *last < key.id)
                {
                    taken
                        .api_keys
                        .push(ApiKey::new(key, entry.expires_at, entry.revoked));
                }
                Ok(())
            }
            // A field a newer control plane may add: not for this node.
            _ => Ok(()),
        }
    }
}

/// Checks the resources and holds them; the API keys are checked against them as they come.
fn take_resources(set: ConfigSet) -> Taken {
    let errors = match validate::config_set(&set) {
        Ok(()) => Vec::new(),
        Err(ConfigErrors(errors)) => errors,
    };
    let rules = ApiKeyRules::new(&set);
    let mut holdings = Holdings::default();
    let mut resources = Vec::with_capacity(set.len());
    let mut consumers = Vec::new();
    let mut indexes = Vec::new();
    // One at a time: each decoded resource is freed as its encoding is kept.
    for resource in set {
        // A malformed id was reported by the validator.
        if let Ok(id) = Uuid::parse_str(resource.id()) {
            holdings.counts[resource.kind() as usize] += 1;
            if let Some(entry) = IndexEntry::of(&resource, id.into_bytes()) {
                indexes.push((entry, id.into_bytes()));
            }
            if resource.kind() == ResourceKind::Consumer {
                consumers.push((id.into_bytes(), HeldConsumer::of(encoded(&resource))));
            } else {
                resources.push(((resource.kind() as i32, id), encoded(&resource)));
            }
        }
    }
    holdings.indexes = Indexes::from_entries(indexes);
    // Two consumers with one id were reported by the validator too.
    holdings.consumers = HashedMap::from_entries(consumers);
    resources.sort_unstable_by_key(|(key, _)| *key);
    // Two resources with one id were reported by the validator too.
    resources.dedup_by(|a, b| a.0 == b.0);
    holdings.resources = ChunkedMap::from_sorted(resources);
    Taken {
        holdings,
        errors,
        rules,
        api_keys: keys::Builder::default(),
    }
}

/// The next field of an encoded message, if all of it is in `bytes`.
enum Next {
    /// Field `number`, a length-delimited one, whose contents are `bytes[body]`; other wire
    /// types come back with an empty body.
    Field {
        number: u32,
        body: std::ops::Range<usize>,
    },
    /// The field is cut short; `field_len` is its whole length (header included) once its
    /// header is in.
    Incomplete { field_len: Option<usize> },
}

fn next_field(bytes: &[u8]) -> Result<Next, String> {
    let incomplete = Ok(Next::Incomplete { field_len: None });
    let Some((key, key_len)) = varint(bytes)? else {
        return incomplete;
    };
    let number =
        u32::try_from(key >> 3).map_err(|_| format!("field number {} is too large", key >> 3))?;
    let (header, body_len) = match key & 7 {
        // Varint.
        0 => match varint(&bytes[key_len..])? {
            Some((_, len)) => (key_len + len, 0),
            None => return incomplete,
        },
        // 64-bit, 32-bit.
        1 => (key_len + 8, 0),
        5 => (key_len + 4, 0),
        // Length-delimited.
        2 => match varint(&bytes[key_len..])? {
            Some((len, len_len)) => (
                key_len + len_len,
                usize::try_from(len).map_err(|_| format!("field {number} is too long"))?,
            ),
            None => return incomplete,
        },
        wire => {
            return Err(format!(
                "field {number} has wire type {wire}, which no field here has"
            ));
        }
    };
    let end = header.saturating_add(body_len);
    if bytes.len() < end {
        return Ok(Next::Incomplete {
            field_len: Some(end),
        });
    }
    Ok(Next::Field {
        number,
        body: if key & 7 == 2 { header..end } else { end..end },
    })
}

/// The varint at the start of `bytes` and its length; `None` when it is cut short.
fn varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, String> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 10 {
        Err("a varint runs past ten bytes".to_owned())
    } else {
        Ok(None)
    }
}

fn packed(entry: &pb::ApiKeyEntry) -> Result<PackedKey, String> {
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
    Ok(PackedKey {
        id,
        consumer_id,
        key_sha256,
    })
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
        Holdings::from_snapshot(&snapshot::from_config(config.clone())).unwrap()
    }

    #[test]
    fn a_snapshot_read_in_pieces_is_the_snapshot_read_whole() {
        let encoded = snapshot::from_config(load(DOC)).encode_to_vec();
        let whole = Holdings::from_encoded(&encoded).unwrap();
        assert_eq!(whole.encode_snapshot(), encoded);
        for piece in [1, 2, 3, 7, 64, encoded.len()] {
            let mut reader = SnapshotReader::default();
            for chunk in encoded.chunks(piece) {
                reader.feed(chunk).unwrap();
            }
            assert_eq!(
                reader.finish().unwrap().encode_snapshot(),
                encoded,
                "pieces of {piece}"
            );
        }
        let mut cut = SnapshotReader::default();
        cut.feed(&encoded[..encoded.len() - 1]).unwrap();
        let error = cut.finish().unwrap_err().to_string();
        assert!(error.contains("ends inside a field"), "{error}");
        let mut twice = SnapshotReader::default();
        twice.feed(&encoded).unwrap();
        let error = twice.feed(&encoded).unwrap_err().to_string();
        assert!(error.contains("`resources` must come once"), "{error}");
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
    fn requests_find_keys_credentials_and_subscriptions_as_deltas_change_them() {
        use sha2::{Digest, Sha256};
        let before = load(DOC);
        let held = holdings(&before);
        let acme_key: [u8; 32] =
            hex::decode("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
                .unwrap()
                .try_into()
                .unwrap();
        let key = held.api_key(&acme_key).unwrap();
        let acme = key.consumer_id;
        assert!(held.api_key(&Sha256::digest(b"nobody").into()).is_none());
        let jwt = CredentialIdentity::Jwt {
            issuer: "https://id.example.com",
            subject: "acme",
        };
        assert_eq!(
            uuid_bytes(&held.credential(&jwt).unwrap().consumer_id),
            Some(acme)
        );
        let orders = uuid_bytes(before.apis[0].meta.as_ref().unwrap().id.as_str()).unwrap();
        assert!(held.subscription(&acme, &orders).is_some());

        // The JWT subject changes and the subscription goes: the old entries go with them.
        let after = load(
            &DOC.replace("subject: \"acme\"", "subject: \"acme-2\"")
                .replace(
                    "subscriptions:\n  - consumer: acme\n    api: orders\n    plan: gold\n",
                    "",
                )
                .replace("2cf24dba", "3cf24dba"),
        );
        let (next, _) = held.apply(&delta_between(&before, &after)).unwrap();
        assert!(next.credential(&jwt).is_none());
        let moved = CredentialIdentity::Jwt {
            issuer: "https://id.example.com",
            subject: "acme-2",
        };
        assert!(next.credential(&moved).is_some());
        assert!(next.subscription(&acme, &orders).is_none());
        assert!(
            next.api_key(&acme_key).is_none(),
            "the old key no longer opens"
        );
        let mut new_key = acme_key;
        new_key[0] = 0x3c;
        assert!(next.api_key(&new_key).is_some());
        // The holdings the delta applied to still answer as they did.
        assert!(held.credential(&jwt).is_some() && held.subscription(&acme, &orders).is_some());
    }

    #[test]
    fn only_active_subscriptions_admit_and_a_status_the_node_does_not_know_admits_nobody() {
        use pb::subscription::Status;
        let suspended = |status: i32| {
            let subscription = pb::Subscription {
                plan_id: "00000000-0000-0000-0000-000000000001".into(),
                status,
                ..Default::default()
            };
            HeldSubscription::of([1; 16], &subscription)
                .unwrap()
                .suspended
        };
        assert!(!suspended(Status::Active as i32));
        assert!(!suspended(Status::Unspecified as i32));
        assert!(suspended(Status::Suspended as i32));
        assert!(suspended(7), "a status added by a newer control plane");
    }

    #[test]
    fn a_held_consumer_reads_the_fields_of_the_consumer() {
        let mut config = load(DOC);
        config.consumers[0].policy_ids = vec!["p-1".into(), "p-2".into()];
        config.consumers[0].disabled = true;
        config.consumers[0].custom_id = "CUST-9".into();
        let consumer = config.consumers[0].clone();
        let encoded = Resource::from(consumer.clone()).encode_to_vec();
        let held = HeldConsumer::of(encoded.clone().into());
        assert_eq!(held.name(), consumer.meta.unwrap().name);
        assert!(
            !held.names.is_heap_allocated(),
            "short names are kept in place"
        );
        assert_eq!(
            (held.custom_id(), held.disabled, held.policy_ids()),
            ("CUST-9", true, &["p-1".into(), "p-2".into()][..])
        );
        assert_eq!(
            &held.encoded[..],
            &encoded[..],
            "the encoding is kept as it came"
        );
        // And as the holdings keep it (without the policies, which this document lacks).
        config.consumers[0].policy_ids.clear();
        let held = holdings(&config);
        let id = uuid_bytes(&config.consumers[0].meta.as_ref().unwrap().id).unwrap();
        let consumer = held.consumer(&id).unwrap();
        assert_eq!((consumer.custom_id(), consumer.disabled), ("CUST-9", true));
        // Names too long to be kept in place are kept whole, in their own allocation.
        let long_id = "9f0c1d52-6a1e-4c4e-8d0b-1b2f3a4c5d6e";
        config.consumers[0].custom_id = long_id.into();
        let held = HeldConsumer::of(
            Resource::from(config.consumers[0].clone())
                .encode_to_vec()
                .into(),
        );
        assert!(held.names.is_heap_allocated());
        let name = config.consumers[0].meta.as_ref().unwrap().name.as_str();
        assert_eq!((held.name(), held.custom_id()), (name, long_id));
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
