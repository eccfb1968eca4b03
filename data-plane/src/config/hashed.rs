//! A hash map for the lookups a request makes by id (a consumer, a subscription by consumer
//! and API), shared between configurations like [`ChunkedMap`]: its entries sit in 256 hash
//! tables, each behind an `Arc`, so a clone is O(1) and a change copies one table (a 256th of
//! the map). A lookup hashes once and reads the table's control bytes and the entry: two or
//! three cache misses, where a sorted map of 100,000 entries misses on most steps of its
//! binary search.
//!
//! It has no order. What must be listed in order (resources in a snapshot) is sorted when
//! listed.
//!
//! [`ChunkedMap`]: super::chunked::ChunkedMap

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};

const SHARDS: usize = 256;

/// One of the map's tables, shared until a change copies it.
type Table<K, V> = Arc<HashTable<(K, V)>>;

#[derive(Debug, Clone)]
pub struct HashedMap<K, V> {
    shards: Arc<Vec<Table<K, V>>>,
    hasher: DefaultHashBuilder,
    len: usize,
}

impl<K, V> Default for HashedMap<K, V> {
    fn default() -> Self {
        let empty = Arc::new(HashTable::new());
        HashedMap {
            shards: Arc::new(vec![empty; SHARDS]),
            hasher: DefaultHashBuilder::default(),
            len: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> HashedMap<K, V> {
    /// The map of `entries`; of two with one key, the first is kept.
    pub fn from_entries(entries: impl IntoIterator<Item = (K, V)>) -> Self {
        let hasher = DefaultHashBuilder::default();
        // One list ordered by shard, cut into tables of exactly their size: lists per shard
        // growing side by side would leave their freed blocks strewn between the tables.
        let mut hashed: Vec<(u64, K, V)> = entries
            .into_iter()
            .map(|(key, value)| (hasher.hash_one(&key), key, value))
            .collect();
        // Stable: the first of two entries with one key stays first.
        hashed.sort_by_key(|(hash, _, _)| shard_of(*hash));
        let mut len = 0;
        let mut shards = Vec::with_capacity(SHARDS);
        let mut entries = hashed.into_iter().peekable();
        for s in 0..SHARDS {
            let mut run = Vec::new();
            while let Some(entry) = entries.next_if(|(hash, _, _)| shard_of(*hash) == s) {
                run.push(entry);
            }
            let mut table = HashTable::with_capacity(run.len());
            for (hash, key, value) in run {
                if let hashbrown::hash_table::Entry::Vacant(vacant) =
                    table.entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k))
                {
                    vacant.insert((key, value));
                    len += 1;
                }
            }
            shards.push(Arc::new(table));
        }
        HashedMap {
            shards: Arc::new(shards),
            hasher,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let hash = self.hasher.hash_one(key);
        self.shards[shard_of(hash)]
            .find(hash, |(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let hash = self.hasher.hash_one(&key);
        let hasher = &self.hasher;
        let table = Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[shard_of(hash)]);
        match table.entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k)) {
            hashbrown::hash_table::Entry::Occupied(mut held) => {
                Some(std::mem::replace(&mut held.get_mut().1, value))
            }
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert((key, value));
                self.len += 1;
                None
            }
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let hash = self.hasher.hash_one(key);
        let shard = shard_of(hash);
        // Copy the table only when it holds the key.
        self.shards[shard].find(hash, |(k, _)| k == key)?;
        let table = Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[shard]);
        let ((_, value), _) = table.find_entry(hash, |(k, _)| k == key).ok()?.remove();
        self.len -= 1;
        Some(value)
    }

    /// Every entry, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards
            .iter()
            .flat_map(|table| table.iter().map(|(k, v)| (k, v)))
    }
}

/// The shard a hash picks: bits the tables do not use themselves (they place an entry by the
/// low bits and tag it with the top seven), so entries of one shard spread over its table.
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn behaves_as_a_hashmap_and_clones_stay_unchanged() {
        let mut rng = StdRng::seed_from_u64(5);
        let start: Vec<(u32, u32)> = (0..3000).map(|k| (k * 2, k)).chain([(0, 99)]).collect();
        let mut map = HashedMap::from_entries(start.clone());
        let mut model: HashMap<u32, u32> = start.into_iter().rev().collect();
        assert_eq!(
            map.get(&0),
            Some(&0),
            "of two entries with one key, the first is kept"
        );
        let mut kept = Vec::new();
        for step in 0..20_000u32 {
            let key = rng.gen_range(0..8000);
            if rng.gen_bool(0.6) {
                assert_eq!(map.insert(key, step), model.insert(key, step));
            } else {
                assert_eq!(map.remove(&key), model.remove(&key));
            }
            assert_eq!(map.get(&key), model.get(&key));
            if step % 2000 == 0 {
                kept.push((map.clone(), model.clone()));
            }
        }
        assert_eq!(map.len(), model.len());
        let listed: HashMap<u32, u32> = map.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(listed, model);
        for (old, expected) in kept {
            assert_eq!(old.len(), expected.len());
            assert!(expected.iter().all(|(k, v)| old.get(k) == Some(v)));
        }
    }
}
