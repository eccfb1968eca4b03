//! [`LocalLimiter`]: GCRA budgets in the node's memory. Exact for one node, no I/O, built once per
//! node so budgets survive config swaps.
//!
//! - Sharding: entries live in up to 64 shards, each a `Mutex<HashMap>`, chosen by the budget
//!   key's hash, so checks of different budgets rarely meet on a lock and there is no global
//!   lock. A check locks the shards of its budgets in ascending order (so two checks can never
//!   wait on each other in a cycle), decides, counts, and unlocks.
//! - Hashing: each budget key is hashed once per check with the standard keyed SipHash (budget
//!   keys hold client addresses, so the hash must not be predictable from outside); the rate is
//!   folded in with a cheap mix, and the maps use that hash as is.
//! - No allocation on the common path (one shard, one rate).
//! - Memory: at most `max_keys` entries (one per budget and rate), about 90 bytes each.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::gcra;
use super::{Budget, BudgetKey, Decision, Rate, Subject};

#[cfg(test)]
mod tests;

/// The most shards a limiter has. 64 keeps contention negligible on the nodes we run (a handful
/// of cores) while each shard stays large enough for sweeps to be worth their cost.
const MAX_SHARDS: usize = 64;

/// Node-wide GCRA budgets, counted in memory.
pub struct LocalLimiter {
    /// Instant 0 of the limiter's microsecond clock.
    epoch: Instant,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
    max_keys: usize,
}

impl fmt::Debug for LocalLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("shards", &self.shards.len())
            .field("max_keys", &self.max_keys)
            .field("len", &self.len())
            .finish()
    }
}

impl LocalLimiter {
    /// A limiter holding at most `max_keys` entries (one per budget key and rate; at least 1).
    pub fn new(max_keys: usize) -> Self {
        // The shard count is a power of two no larger than max_keys, so that every shard can
        // hold at least one entry and together they hold at most max_keys.
        let max_keys = max_keys.max(1);
        let shard_count = if max_keys >= MAX_SHARDS {
            MAX_SHARDS
        } else {
            1 << max_keys.ilog2()
        };
        Self::with_shards(max_keys, shard_count)
    }

    fn with_shards(max_keys: usize, shard_count: usize) -> Self {
        debug_assert!(shard_count.is_power_of_two() && shard_count <= max_keys);
        let per_shard = max_keys / shard_count;
        LocalLimiter {
            epoch: Instant::now(),
            hasher: RandomState::new(),
            shards: (0..shard_count)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
            max_keys,
        }
    }

    /// Checks one request against every rate of every budget, and counts it against all of them
    /// only if all allow it.
    pub fn check(&self, budgets: &[Budget<'_>]) -> Decision {
        self.check_at(budgets, Instant::now())
    }

    /// [`check`](Self::check) at a given instant (for tests; instants before the limiter was
    /// made count as the moment it was made).
    pub fn check_at(&self, budgets: &[Budget<'_>], now: Instant) -> Decision {
        let mut rates_left: usize = budgets.iter().map(|budget| budget.rates.len()).sum();
        if rates_left == 0 {
            return Decision::unlimited();
        }
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX);

        // The first few budgets' hashes are kept for the second pass (a request has one or two
        // budgets; any beyond are hashed again rather than allocating).
        let mut hashes = [0; REMEMBERED_HASHES];
        let mut wanted_shards: u64 = 0;
        for (position, budget) in budgets.iter().enumerate() {
            let hash = self.budget_hash(budget.key);
            if let Some(slot) = hashes.get_mut(position) {
                *slot = hash;
            }
            wanted_shards |= 1 << self.shard_of(hash);
        }
        let mut held = self.lock_shards(wanted_shards);

        // Count as we go, keeping what each write replaced, so that a refusal from a later rate
        // can undo the earlier ones (the last rate needs no undo: nothing comes after it).
        // Counting in place rather than deciding first also makes a budget listed twice count
        // twice.
        let mut decision = Decision::unlimited();
        let mut undo: Vec<(usize, EntryKey, Option<u64>)> = Vec::new();
        for (position, budget) in budgets.iter().enumerate() {
            let hash = match hashes.get(position) {
                Some(&hash) => hash,
                None => self.budget_hash(budget.key),
            };
            let index = self.shard_of(hash);
            let shard = held.shard(index);
            for rate in budget.rates {
                rates_left -= 1;
                let key = EntryKey::new(hash, budget.key, rate);
                let (stored, step) = match shard.entries.get_mut(&key) {
                    Some(tat) => {
                        let step = gcra::step(rate, *tat, now);
                        let stored = *tat;
                        decision = decision.merge(step.decision);
                        // After a refusal the remaining rates are only looked at, for the
                        // Retry-After of the whole request.
                        if let (true, Some(tat_after)) = (decision.allowed, step.tat_after) {
                            *tat = tat_after;
                        }
                        (Some(stored), step)
                    }
                    None => {
                        let step = gcra::step(rate, 0, now);
                        decision = decision.merge(step.decision);
                        if let (true, Some(tat_after)) = (decision.allowed, step.tat_after) {
                            shard.insert(key.clone(), tat_after, now);
                        }
                        (None, step)
                    }
                };
                if decision.allowed && step.tat_after.is_some() && rates_left > 0 {
                    undo.push((index, key, stored));
                }
            }
        }
        if !decision.allowed {
            for (index, key, stored) in undo.into_iter().rev() {
                held.shard(index).restore(&key, stored);
            }
        }
        decision
    }

    /// Gives back what an allowed [`check`](Self::check) counted, for a request that other
    /// budgets (in Redis) then refused: one emission interval off each rate's budget, so that
    /// requests counted since keep their share.
    pub fn refund(&self, budgets: &[Budget<'_>]) {
        for budget in budgets {
            let hash = self.budget_hash(budget.key);
            let mut shard = lock(&self.shards[self.shard_of(hash)]);
            for rate in budget.rates {
                if let Some(tat) = shard
                    .entries
                    .get_mut(&EntryKey::new(hash, budget.key, rate))
                {
                    *tat = tat.saturating_sub(rate.emission_us());
                }
            }
        }
    }

    /// The number of entries held (budget keys times their rates), for metrics.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shard of a budget. The high half of its hash picks the shard: the maps inside use
    /// the low bits for buckets and the top seven for tags, which must stay varied within a
    /// shard.
    fn shard_of(&self, budget_hash: u64) -> usize {
        (budget_hash >> 32) as usize & (self.shards.len() - 1)
    }

    /// The keyed hash of a budget key, written as one 34-byte block: one SipHash write is
    /// several times cheaper than the derived `Hash`'s field-by-field writes.
    fn budget_hash(&self, key: &BudgetKey) -> u64 {
        let mut block = [0u8; 34];
        block[..16].copy_from_slice(&key.scope);
        match key.subject {
            Subject::Whole => block[16] = 0,
            Subject::Consumer(id) => {
                block[16] = 1;
                block[17..33].copy_from_slice(&id);
            }
            Subject::Ip(IpAddr::V4(ip)) => {
                block[16] = 2;
                block[17..21].copy_from_slice(&ip.octets());
            }
            Subject::Ip(IpAddr::V6(ip)) => {
                block[16] = 3;
                block[17..33].copy_from_slice(&ip.octets());
            }
        }
        let mut hasher = self.hasher.build_hasher();
        hasher.write(&block);
        hasher.finish()
    }

    /// Locks the shards in `wanted` (a bit per shard), each once and in ascending order, so that
    /// two checks can never wait on each other in a cycle.
    fn lock_shards(&self, mut wanted: u64) -> Held<'_> {
        if wanted.count_ones() == 1 {
            let index = wanted.trailing_zeros() as usize;
            return Held::One(index, lock(&self.shards[index]));
        }
        let mut guards = Vec::with_capacity(wanted.count_ones() as usize);
        while wanted != 0 {
            let index = wanted.trailing_zeros() as usize;
            guards.push((index, lock(&self.shards[index])));
            wanted &= wanted - 1;
        }
        Held::Many(guards)
    }
}

/// How many budgets of one check keep their hash between the check's two passes.
const REMEMBERED_HASHES: usize = 4;

/// The shards a check holds: nearly always one (a check's budgets usually share a shard or are
/// a single budget), so that case allocates nothing.
enum Held<'a> {
    One(usize, MutexGuard<'a, Shard>),
    Many(Vec<(usize, MutexGuard<'a, Shard>)>),
}

impl Held<'_> {
    /// The shard `index`, which [`LocalLimiter::lock_shards`] locked.
    fn shard(&mut self, index: usize) -> &mut Shard {
        match self {
            Held::One(held, guard) => {
                debug_assert_eq!(*held, index);
                guard
            }
            Held::Many(guards) => {
                let position = guards
                    .binary_search_by_key(&index, |&(held, _)| held)
                    .expect("every budget's shard is locked before it is checked");
                &mut guards[position].1
            }
        }
    }
}

/// A shard's mutex guards a map of plain numbers, consistent after any panic, so a poisoned lock
/// is taken as is rather than taking the node down with it.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One budget key and rate. The rate is identified by its limit and period, not its position in
/// the config, so a budget keeps its state across config swaps that reorder rates or change the
/// burst.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntryKey {
    hash: u64,
    budget: BudgetKey,
    limit: u64,
    period_us: u64,
}

impl EntryKey {
    fn new(budget_hash: u64, budget: &BudgetKey, rate: &Rate) -> Self {
        let period_us = rate.period_us();
        // Folding the rate in is a bijection of the keyed budget hash (xor, then an
        // xorshift-multiply mix), so entries collide only when budget hashes do: the rate comes
        // from config, not from clients.
        let mut hash = budget_hash
            ^ rate.limit.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ period_us.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        hash ^= hash >> 29;
        hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        hash ^= hash >> 32;
        EntryKey {
            hash,
            budget: budget.clone(),
            limit: rate.limit,
            period_us,
        }
    }
}

impl Hash for EntryKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Passes an [`EntryKey`]'s precomputed hash through, so a lookup hashes nothing.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `EntryKey`; fold anything else in rather than lose it.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// Each entry maps a budget key and rate to its TAT, in microseconds since the limiter's epoch.
struct Shard {
    entries: HashMap<EntryKey, u64, BuildHasherDefault<Prehashed>>,
    capacity: usize,
}

impl Shard {
    fn new(capacity: usize) -> Self {
        Shard {
            entries: HashMap::default(),
            capacity,
        }
    }

    /// Adds an entry for a key not held, making room first if the shard is full.
    fn insert(&mut self, key: EntryKey, tat: u64, now: u64) {
        if self.entries.len() >= self.capacity {
            self.make_room(now);
        }
        self.entries.insert(key, tat);
    }

    /// Undoes a count. An entry evicted since is left out: it was forgiven, and
    /// putting it back could overfill the shard.
    fn restore(&mut self, key: &EntryKey, stored: Option<u64>) {
        match stored {
            Some(tat) => {
                if let Some(entry) = self.entries.get_mut(key) {
                    *entry = tat;
                }
            }
            None => {
                self.entries.remove(key);
            }
        }
    }

    /// Frees at least an eighth of the shard, so that the next inserts are cheap and the cost of
    /// a sweep (one pass over the shard, about 15k entries per shard at a million keys) is paid
    /// once per many inserts rather than on each.
    ///
    /// Entries whose TAT is past carry no information (an absent entry means the same: a whole
    /// budget) and go first. If live entries must go too, those that become whole soonest go:
    /// forgetting an entry forgives its subject the debt it has left, and these have the least
    /// left, while subjects sending hard (far TATs) stay limited. The alternatives are worse: not
    /// counting new keys would let anyone past by arriving from new addresses, and refusing them
    /// would lock out newcomers while an attacker holds the table.
    fn make_room(&mut self, now: u64) {
        self.entries.retain(|_, tat| *tat > now);
        let headroom = (self.capacity / 8).max(1);
        let excess = (self.entries.len() + headroom).saturating_sub(self.capacity);
        if excess == 0 {
            return;
        }
        let mut tats: Vec<u64> = self.entries.values().copied().collect();
        let (_, &mut cutoff, _) = tats.select_nth_unstable(excess - 1);
        let below_cutoff = tats.iter().filter(|&&tat| tat < cutoff).count();
        let mut ties_to_evict = excess - below_cutoff;
        self.entries.retain(|_, tat| {
            if *tat < cutoff {
                false
            } else if *tat == cutoff && ties_to_evict > 0 {
                ties_to_evict -= 1;
                false
            } else {
                true
            }
        });
    }
}
