//! API keys as a node holds them: found by the SHA-256 of the key in a few cache misses
//! (every request on a key-auth route makes this lookup), removed by credential id (deltas
//! name what they remove by id) and listed in id order (the canonical snapshot's order).
//!
//! A key's hash is uniformly distributed, so the table needs no hashing of its own: its first
//! 8 bits pick one of 256 shards, and the next 32 bits (its fingerprint) its home slot in the
//! shard, the fingerprint scaled to the shard's homes (a key whose fingerprint is 3/4 of the
//! way up has its home 3/4 of the way into the shard). A shard has a fifteenth more homes than
//! keys; each key sits, in hash order, at its home or, when earlier keys fill it, right after
//! them. So a lookup reads the slots from the key's home on until it meets the key or a gap:
//! one or two keys on average, in the home's cache line and the next, which the CPU fetches
//! together. On a million keys that is one miss to memory, where a side array of fingerprints
//! searched first (the table before) cost two, and a binary search over sorted chunks a score.
//!
//! Like [`ChunkedMap`], a clone is O(1) and a change copies what it touches: the shard list
//! (6 KB) and each shard a delta changes, once per delta ([`KeyTable::update`]): about 4,000
//! keys of a million, 300 KB.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use prost_types::Timestamp;
use sluice_proto::snapshot::PackedKey;

use super::chunked::{self, ChunkedMap};

/// Bits of a key's hash that pick its shard. 256 shards: at a million keys each is about
/// 300 KB, above the size where the allocator rounds blocks up to a size class (up to a
/// quarter more) and below the size where copying one for a delta would show.
const SHARD_BITS: u32 = 8;
const SHARDS: usize = 1 << SHARD_BITS;

/// An API-key credential as the node keeps it: fixed-size fields, no heap allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiKey {
    /// The credential's id.
    pub id: [u8; 16],
    pub consumer_id: [u8; 16],
    pub key_sha256: [u8; 32],
    pub revoked: bool,
    /// `expires_at`, spelled out: an `Option<Timestamp>` would take 24 bytes.
    has_expiry: bool,
    expires_nanos: i32,
    expires_seconds: i64,
}

impl ApiKey {
    pub fn new(key: PackedKey, expires_at: Option<Timestamp>, revoked: bool) -> Self {
        let expiry = expires_at.unwrap_or_default();
        ApiKey {
            id: key.id,
            consumer_id: key.consumer_id,
            key_sha256: key.key_sha256,
            revoked,
            has_expiry: expires_at.is_some(),
            expires_nanos: expiry.nanos,
            expires_seconds: expiry.seconds,
        }
    }

    pub fn expires_at(&self) -> Option<Timestamp> {
        self.has_expiry.then_some(Timestamp {
            seconds: self.expires_seconds,
            nanos: self.expires_nanos,
        })
    }

    /// Where the key sorts in its shard: by hash, then by id for two keys of one hash (which
    /// the validator refuses, but a table must still hold them apart).
    fn order(&self) -> ([u8; 32], [u8; 16]) {
        (self.key_sha256, self.id)
    }
}

/// The first 8 bytes of a key's hash: its shard and fingerprint.
type Prefix = [u8; 8];

fn prefix(sha256: &[u8; 32]) -> Prefix {
    let mut prefix = [0; 8];
    prefix.copy_from_slice(&sha256[..8]);
    prefix
}

fn shard_of(prefix: &Prefix) -> usize {
    (u64::from_be_bytes(*prefix) >> (64 - SHARD_BITS)) as usize
}

/// The 32 bits after the shard's.
fn fingerprint(prefix: &Prefix) -> u32 {
    (u64::from_be_bytes(*prefix) >> (64 - SHARD_BITS - 32)) as u32
}

fn fingerprint_of(key: &ApiKey) -> u32 {
    fingerprint(&prefix(&key.key_sha256))
}

// A free slot costs no more than a held one: `None` is spelled with a value `revoked` cannot
// take.
const _: () = assert!(size_of::<Option<ApiKey>>() == size_of::<ApiKey>());

/// One shard's keys in their slots, in [`ApiKey::order`] with gaps (see the module's
/// comment). A slice behind an `Arc`, never changed in place: a change makes a new one (it
/// would copy the shard anyway, for the configurations still holding the old one).
#[derive(Debug, Clone)]
struct Shard {
    slots: Arc<[Option<ApiKey>]>,
    /// How many slots are homes: the fingerprints' range is scaled to this. The slots past
    /// the homes hold the keys pushed out of the last ones.
    homes: usize,
}

impl Shard {
    fn empty() -> Shard {
        Shard {
            slots: Arc::new([]),
            homes: 0,
        }
    }

    /// The slot where keys of fingerprint `fp` start to be looked for.
    fn home(homes: usize, fp: u32) -> usize {
        ((u64::from(fp) * homes as u64) >> 32) as usize
    }

    /// The keys from `fp`'s home to the next gap, in order: every key of fingerprint `fp` is
    /// among them, after the keys of lower fingerprints pushed there.
    fn run_from(&self, fp: u32) -> impl Iterator<Item = &ApiKey> {
        let from = Shard::home(self.homes, fp);
        self.slots
            .get(from..)
            .unwrap_or_default()
            .iter()
            .map_while(Option::as_ref)
    }

    fn by_id(&self, prefix: &Prefix, id: &[u8; 16]) -> Option<&ApiKey> {
        let fp = fingerprint(prefix);
        self.run_from(fp)
            .take_while(|key| fingerprint_of(key) <= fp)
            .find(|key| key.id == *id)
    }

    fn keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.slots.iter().flatten()
    }

    /// The shard of `keys`, sorted by [`ApiKey::order`]: a fifteenth more homes than keys,
    /// each key at its home or right after the key before it. Made in one block of exactly
    /// its size (the block is the node's largest use of memory; a list grown to size and then
    /// copied left its freed blocks strewn over the heap, tens of MB on a million keys).
    fn of(keys: &[ApiKey]) -> Shard {
        debug_assert!(keys.is_sorted_by_key(ApiKey::order));
        if keys.is_empty() {
            return Shard::empty();
        }
        let homes = keys.len() + keys.len() / 15 + 1;
        let placed = || {
            keys.iter().scan(0, move |free, key| {
                let at = Shard::home(homes, fingerprint_of(key)).max(*free);
                *free = at + 1;
                Some((at, key))
            })
        };
        let past_last = placed().last().map_or(0, |(at, _)| at + 1);
        let mut placed = placed().peekable();
        let slots = (0..homes.max(past_last))
            .map(|slot| placed.next_if(|(at, _)| *at == slot).map(|(_, key)| *key))
            .collect();
        Shard { slots, homes }
    }
}

/// API keys by hash, with their ids in order beside.
#[derive(Debug, Clone)]
pub struct KeyTable {
    /// [`SHARDS`] shards; the empty ones share their allocations.
    shards: Arc<Vec<Shard>>,
    /// Each key's hash prefix by its id: where to find it to remove it, and the id order.
    by_id: ChunkedMap<[u8; 16], Prefix>,
}

impl Default for KeyTable {
    fn default() -> Self {
        KeyTable {
            shards: Arc::new(vec![Shard::empty(); SHARDS]),
            by_id: ChunkedMap::default(),
        }
    }
}

impl KeyTable {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The key whose hash is `sha256`.
    pub fn get(&self, sha256: &[u8; 32]) -> Option<&ApiKey> {
        let prefix = prefix(sha256);
        self.shards[shard_of(&prefix)]
            .run_from(fingerprint(&prefix))
            .find(|key| key.key_sha256 >= *sha256)
            .filter(|key| key.key_sha256 == *sha256)
    }

    /// The key held under credential id `id`.
    pub fn by_id(&self, id: &[u8; 16]) -> Option<&ApiKey> {
        let prefix = self.by_id.get(id)?;
        self.shards[shard_of(prefix)].by_id(prefix, id)
    }

    /// Removes the keys held under the `removed` ids, then adds `added`, each replacing what
    /// was held under its id (of two with one id, the last is kept). Each shard touched is
    /// copied once, whatever the number of keys changed in it.
    pub fn update(&mut self, removed: &[[u8; 16]], added: &[ApiKey]) {
        let mut latest = HashSet::new();
        let added: Vec<&ApiKey> = added
            .iter()
            .rev()
            .filter(|key| latest.insert(key.id))
            .collect();
        // By shard touched: the ids leaving it, the keys joining it.
        let mut touched: BTreeMap<usize, (HashSet<[u8; 16]>, Vec<ApiKey>)> = BTreeMap::new();
        for id in removed.iter().chain(added.iter().map(|key| &key.id)) {
            if let Some(prefix) = self.by_id.remove(id) {
                touched.entry(shard_of(&prefix)).or_default().0.insert(*id);
            }
        }
        for key in added {
            let prefix = prefix(&key.key_sha256);
            self.by_id.insert(key.id, prefix);
            touched.entry(shard_of(&prefix)).or_default().1.push(*key);
        }
        if touched.is_empty() {
            return;
        }
        let shards = Arc::make_mut(&mut self.shards);
        for (s, (leaving, joining)) in touched {
            let mut keys: Vec<ApiKey> = shards[s]
                .keys()
                .filter(|key| !leaving.contains(&key.id))
                .copied()
                .chain(joining)
                .collect();
            keys.sort_unstable_by_key(ApiKey::order);
            shards[s] = Shard::of(&keys);
        }
    }

    /// Every key, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &ApiKey> {
        self.by_id
            .iter()
            .filter_map(|(id, prefix)| self.shards[shard_of(prefix)].by_id(prefix, id))
    }
}

/// Builds a table from keys pushed in id order (as a snapshot lists them): gathered in one
/// list, sorted by hash once, and cut into shards of exactly their size. (Gathering into one
/// growing list per shard would leave the node's heap strewn with the lists' freed blocks
/// between the shards', which a million keys turn into tens of MB the node never gives back;
/// the one large list is its own mapping, returned whole when it is dropped.)
#[derive(Debug, Default)]
pub struct Builder {
    keys: Vec<ApiKey>,
    by_id: chunked::Builder<[u8; 16], Prefix>,
}

impl Builder {
    /// The last id pushed.
    pub fn last(&self) -> Option<&[u8; 16]> {
        self.by_id.last()
    }

    /// Adds a key whose id is above every id pushed before.
    ///
    /// # Panics
    /// When it is not.
    pub fn push(&mut self, key: ApiKey) {
        self.by_id.push(key.id, prefix(&key.key_sha256));
        self.keys.push(key);
    }

    pub fn build(mut self) -> KeyTable {
        self.keys.sort_unstable_by_key(ApiKey::order);
        let empty = Shard::empty();
        let mut shards = Vec::with_capacity(SHARDS);
        let mut rest = &self.keys[..];
        for s in 0..SHARDS {
            let len = rest
                .iter()
                .take_while(|key| shard_of(&prefix(&key.key_sha256)) == s)
                .count();
            let (keys, after) = rest.split_at(len);
            rest = after;
            shards.push(if keys.is_empty() {
                empty.clone()
            } else {
                Shard::of(keys)
            });
        }
        KeyTable {
            shards: Arc::new(shards),
            by_id: self.by_id.build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    fn key(rng: &mut StdRng, id: u128) -> ApiKey {
        let mut sha = [0; 32];
        rng.fill(&mut sha[..]);
        ApiKey::new(
            PackedKey {
                id: id.to_be_bytes(),
                consumer_id: (id / 10).to_be_bytes(),
                key_sha256: sha,
            },
            None,
            false,
        )
    }

    /// Random inserts and removals against a model, on a table built from a snapshot, with
    /// keys crowded into a few shards (so shards grow and searches run long) and keys sharing
    /// a fingerprint or a whole hash; every earlier clone must stay as it was.
    #[test]
    fn behaves_as_maps_by_id_and_by_hash_and_clones_stay_unchanged() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut builder = Builder::default();
        let mut model: BTreeMap<[u8; 16], ApiKey> = BTreeMap::new();
        for id in 0..5000u128 {
            let k = key(&mut rng, id);
            builder.push(k);
            model.insert(k.id, k);
        }
        let mut table = builder.build();
        let mut kept = Vec::new();
        for step in 0..5_000u128 {
            // A batch as a delta makes one: ids removed, keys added (some twice).
            let mut removed = Vec::new();
            let mut added = Vec::new();
            for _ in 0..rng.gen_range(1..6) {
                let id = rng.gen_range(0..8000u128);
                if rng.gen_bool(0.4) {
                    removed.push(id.to_be_bytes());
                    continue;
                }
                let mut k = key(&mut rng, id);
                match rng.gen_range(0..4) {
                    // Crowd shard 0.
                    0 => k.key_sha256[0] = 0,
                    // Share a fingerprint with a held key, or its whole hash.
                    1 | 2 => {
                        if let Some(other) = model.values().nth(rng.gen_range(0..model.len())) {
                            let n = if rng.gen_bool(0.5) { 8 } else { 32 };
                            k.key_sha256[..n].copy_from_slice(&other.key_sha256[..n]);
                        }
                    }
                    _ => {}
                }
                added.push(k);
            }
            table.update(&removed, &added);
            for id in &removed {
                model.remove(id);
            }
            for k in &added {
                model.insert(k.id, *k);
            }
            for id in removed.iter().chain(added.iter().map(|k| &k.id)) {
                assert_eq!(table.by_id(id), model.get(id), "step {step}");
            }
            if step % 1000 == 0 {
                kept.push((table.clone(), model.clone()));
            }
        }
        assert_eq!(table.len(), model.len());
        assert!(table.iter().eq(model.values()));
        for held in model.values() {
            let found = table.get(&held.key_sha256).expect("a held key is found");
            assert_eq!(found.key_sha256, held.key_sha256);
        }
        for _ in 0..1000 {
            let mut sha = [0; 32];
            rng.fill(&mut sha[..]);
            assert_eq!(table.get(&sha), None);
        }
        for shard in table.shards.iter() {
            assert_placed(shard);
        }
        for (old, expected) in kept {
            assert!(old.iter().eq(expected.values()));
        }
    }

    /// Every key sits at its home or right after the key before it, the keys are in order,
    /// and the slots end at the last home or the last key, whichever is later.
    fn assert_placed(shard: &Shard) {
        let keys: Vec<&ApiKey> = shard.keys().collect();
        assert!(keys.is_sorted_by_key(|key| key.order()));
        let mut free = 0;
        for (at, slot) in shard.slots.iter().enumerate() {
            let Some(key) = slot else { continue };
            assert_eq!(at, Shard::home(shard.homes, fingerprint_of(key)).max(free));
            free = at + 1;
        }
        assert_eq!(shard.slots.len(), shard.homes.max(free));
    }

    #[test]
    fn keys_sit_at_their_home_or_after_the_keys_filling_it() {
        let mut rng = StdRng::seed_from_u64(5);
        // A shard (one first byte) of keys whose fingerprints crowd the top of the range: they
        // run past the last home and the shard grows slots for them.
        let mut keys: Vec<ApiKey> = (0..40u128)
            .map(|id| {
                let mut k = key(&mut rng, id);
                k.key_sha256[0] = 7;
                k.key_sha256[1..5].copy_from_slice(&(u32::MAX - id as u32 % 3).to_be_bytes());
                k
            })
            .collect();
        keys.sort_unstable_by_key(ApiKey::order);
        let crowded = Shard::of(&keys);
        assert_placed(&crowded);
        assert_eq!(crowded.homes, 40 + 40 / 15 + 1);
        assert_eq!(crowded.slots.len(), crowded.homes - 1 + 40);
        for k in &keys {
            let prefix = prefix(&k.key_sha256);
            assert_eq!(crowded.by_id(&prefix, &k.id), Some(k));
        }
        // Keys spread evenly sit at their homes, with gaps between.
        let spread: Vec<ApiKey> = (0..8u32)
            .map(|i| {
                let mut k = key(&mut rng, i.into());
                k.key_sha256[0] = 7;
                k.key_sha256[1..5].copy_from_slice(&(i * (u32::MAX / 8)).to_be_bytes());
                k
            })
            .collect();
        let shard = Shard::of(&spread);
        assert_placed(&shard);
        assert_eq!(shard.slots.len(), shard.homes);
        assert!(shard.slots.iter().any(Option::is_none));
        assert_eq!(shard.keys().count(), 8);
        assert_eq!(Shard::of(&[]).slots.len(), 0);
    }
}
