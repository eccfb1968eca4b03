//! A sorted map for the large, rarely changing maps a node holds (a million API keys): its
//! entries sit in sorted chunks of a few hundred, each chunk and the list of chunks behind an
//! `Arc`. A clone is O(1); an insert or a removal copies the list of chunk pointers and the
//! one chunk it touches, so a one-key change on a million keys copies about 50 KB, and the
//! old map stays as it was for whoever still holds it.
//!
//! Why not `imbl::OrdMap`: its B-tree leaves are fixed 16-slot arrays, and a map filled in key
//! order (as a snapshot arrives) leaves every leaf half empty, so a million keys take twice
//! their size. Here a map built from a snapshot is packed full ([`ChunkedMap::from_sorted`]),
//! and a chunk grows by exactly what is inserted into it.

use std::sync::Arc;

/// Entries per chunk when a map is built; a chunk that grows to twice this is split in two.
const CHUNK: usize = 512;

/// Entries in key order; shared between maps until one of them changes it.
type Chunk<K, V> = Arc<Vec<(K, V)>>;

#[derive(Debug, Clone)]
pub struct ChunkedMap<K, V> {
    /// Non-empty chunks, each sorted, every key of one below every key of the next.
    chunks: Arc<Vec<Chunk<K, V>>>,
    /// The last key of each chunk, side by side: finding a key's chunk searches these, not
    /// the chunks themselves, whose last entries lie in as many places in memory as there are
    /// chunks (a lookup on a million keys would otherwise miss the cache a score of times).
    fences: Arc<Vec<K>>,
    len: usize,
}

impl<K, V> Default for ChunkedMap<K, V> {
    fn default() -> Self {
        ChunkedMap {
            chunks: Arc::default(),
            fences: Arc::default(),
            len: 0,
        }
    }
}

/// Builds a map from entries pushed in key order, packing full chunks as it goes, so the
/// entries are never all in one `Vec` beside their chunks.
#[derive(Debug)]
pub struct Builder<K, V> {
    chunks: Vec<Chunk<K, V>>,
    filling: Vec<(K, V)>,
    len: usize,
}

impl<K, V> Default for Builder<K, V> {
    fn default() -> Self {
        Builder {
            chunks: Vec::new(),
            filling: Vec::new(),
            len: 0,
        }
    }
}

impl<K: Ord + Clone, V: Clone> Builder<K, V> {
    /// The last key pushed.
    pub fn last(&self) -> Option<&K> {
        self.filling
            .last()
            .or_else(|| self.chunks.last().and_then(|chunk| chunk.last()))
            .map(|(key, _)| key)
    }

    /// Adds an entry after those already pushed.
    ///
    /// # Panics
    /// When `key` is not above the last key pushed.
    pub fn push(&mut self, key: K, value: V) {
        assert!(
            self.last().is_none_or(|last| *last < key),
            "ChunkedMap entries are pushed in key order, each key once"
        );
        if self.filling.capacity() == 0 {
            self.filling.reserve_exact(CHUNK);
        }
        self.filling.push((key, value));
        self.len += 1;
        if self.filling.len() == CHUNK {
            self.chunks
                .push(Arc::new(std::mem::take(&mut self.filling)));
        }
    }

    pub fn build(mut self) -> ChunkedMap<K, V> {
        if !self.filling.is_empty() {
            self.filling.shrink_to_fit();
            self.chunks.push(Arc::new(self.filling));
        }
        self.chunks.shrink_to_fit();
        let fences = self
            .chunks
            .iter()
            .filter_map(|chunk| chunk.last().map(|(key, _)| key.clone()))
            .collect();
        ChunkedMap {
            chunks: Arc::new(self.chunks),
            fences: Arc::new(fences),
            len: self.len,
        }
    }
}

impl<K: Ord + Clone, V: Clone> ChunkedMap<K, V> {
    /// The map of `entries`, which must come sorted by key with no key twice.
    ///
    /// # Panics
    /// When they do not: callers sort and check them first, for their own error messages.
    pub fn from_sorted(entries: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut builder = Builder::default();
        for (key, value) in entries {
            builder.push(key, value);
        }
        builder.build()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk `key` belongs in: the first whose last key is not below it, else the last.
    fn chunk_for(&self, key: &K) -> usize {
        let after = self.fences.partition_point(|last| last < key);
        after.min(self.chunks.len().saturating_sub(1))
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let chunk = self.chunks.get(self.chunk_for(key))?;
        let at = chunk.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
        Some(&chunk[at].1)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.chunks.is_empty() {
            Arc::make_mut(&mut self.fences).push(key.clone());
            Arc::make_mut(&mut self.chunks).push(Arc::new(vec![(key, value)]));
            self.len = 1;
            return None;
        }
        let c = self.chunk_for(&key);
        let chunks = Arc::make_mut(&mut self.chunks);
        let chunk = Arc::make_mut(&mut chunks[c]);
        match chunk.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(at) => Some(std::mem::replace(&mut chunk[at].1, value)),
            Err(at) => {
                let fences = Arc::make_mut(&mut self.fences);
                if at == chunk.len() {
                    // A new last key (the last chunk takes whatever sorts after all).
                    fences[c] = key.clone();
                }
                // Grow by one, not by doubling: most chunks are never touched again.
                chunk.reserve_exact(1);
                chunk.insert(at, (key, value));
                self.len += 1;
                if chunk.len() >= 2 * CHUNK {
                    let upper = chunk.split_off(CHUNK);
                    chunk.shrink_to_fit();
                    let lower_last = chunk.last().map(|(k, _)| k.clone());
                    chunks.insert(c + 1, Arc::new(upper));
                    if let Some(lower_last) = lower_last {
                        fences.insert(c, lower_last);
                    }
                }
                None
            }
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let c = self.chunk_for(key);
        let at = self
            .chunks
            .get(c)?
            .binary_search_by(|(k, _)| k.cmp(key))
            .ok()?;
        let chunks = Arc::make_mut(&mut self.chunks);
        let chunk = Arc::make_mut(&mut chunks[c]);
        let (_, value) = chunk.remove(at);
        let fences = Arc::make_mut(&mut self.fences);
        match chunk.last() {
            None => {
                chunks.remove(c);
                fences.remove(c);
            }
            Some((last, _)) if at == chunk.len() => fences[c] = last.clone(),
            Some(_) => {}
        }
        self.len -= 1;
        Some(value)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.chunks
            .iter()
            .flat_map(|chunk| chunk.iter().map(|(k, v)| (k, v)))
    }

    /// The entries from the first key not below `from`, in key order.
    pub fn iter_from<'a>(
        &'a self,
        from: &K,
    ) -> impl Iterator<Item = (&'a K, &'a V)> + use<'a, K, V> {
        let c = self.chunk_for(from);
        let (first, rest) = match self.chunks.get(c) {
            Some(chunk) => {
                // Into the first chunk by binary search, not by stepping over its entries.
                let skip = chunk.partition_point(|(k, _)| k < from);
                (&chunk[skip..], &self.chunks[c + 1..])
            }
            None => (&[][..], &self.chunks[..0]),
        };
        first
            .iter()
            .chain(rest.iter().flat_map(|chunk| chunk.iter()))
            .map(|(k, v)| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    /// Random inserts and removals, checked against `BTreeMap` after each step, across chunk
    /// splits and emptied chunks; every earlier clone must stay as it was.
    #[test]
    fn behaves_as_a_btreemap_and_clones_stay_unchanged() {
        let mut rng = StdRng::seed_from_u64(7);
        let start: Vec<(u32, u32)> = (0..3000).map(|k| (k * 2, k)).collect();
        let mut map = ChunkedMap::from_sorted(start.clone());
        let mut model: BTreeMap<u32, u32> = start.into_iter().collect();
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
        assert!(map.iter().map(|(k, v)| (*k, *v)).eq(model.clone()));
        let from = 4001;
        assert!(
            map.iter_from(&from)
                .map(|(k, v)| (*k, *v))
                .eq(model.range(from..).map(|(k, v)| (*k, *v)))
        );
        assert!(
            map.chunks
                .iter()
                .all(|chunk| !chunk.is_empty() && chunk.len() < 2 * CHUNK)
        );
        let lasts: Vec<u32> = map.chunks.iter().map(|c| c.last().unwrap().0).collect();
        assert_eq!(*map.fences, lasts, "the fences are the chunks' last keys");
        for from in [0, 1, 3999, 4001, 7999, 9000] {
            assert!(
                map.iter_from(&from)
                    .map(|(k, v)| (*k, *v))
                    .eq(model.range(from..).map(|(k, v)| (*k, *v))),
                "iter_from({from})"
            );
        }
        for (old, expected) in kept {
            assert!(old.iter().map(|(k, v)| (*k, *v)).eq(expected));
        }
    }

    #[test]
    fn an_emptied_map_takes_new_entries() {
        let mut map = ChunkedMap::from_sorted(vec![(1, 'a'), (2, 'b')]);
        assert_eq!(map.remove(&1), Some('a'));
        assert_eq!(map.remove(&2), Some('b'));
        assert!(map.is_empty());
        assert_eq!(map.iter_from(&0).count(), 0);
        assert_eq!(map.insert(5, 'c'), None);
        assert_eq!(map.get(&5), Some(&'c'));
        assert_eq!(map.len(), 1);
    }
}
