//! The connection table of one worker: a preallocated pool of entries found through an
//! open-addressing index (see the module doc of `conntrack` for the layout, eviction and costs).

use super::{CtEntry, CtState, CtTimeouts, EVICT_SCAN, FlowDir, FlowKey, LOOKUP_GROUP, MAX_PROBE};

/// Table configuration.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CtConfig {
    /// Most connections held; clamped to `1..=ConnTrack::MAX_CAPACITY`.
    pub capacity: usize,
    pub timeouts: CtTimeouts,
    /// Seed of the index hash; choose it at random per node.
    pub hash_seed: u64,
}

impl CtConfig {
    /// Default timeouts, seed 0.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            timeouts: CtTimeouts::default(),
            hash_seed: 0,
        }
    }
}

impl Default for CtConfig {
    /// 65,536 connections.
    fn default() -> Self {
        Self::with_capacity(1 << 16)
    }
}

/// Why an insert failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum CtError {
    /// No room: a probe window could not be freed.
    Full,
    /// One of the two keys belongs to a live connection already.
    Exists,
}

/// Names one entry; see the module doc on handles.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CtHandle {
    idx: u32,
    generation: u32,
}

impl CtHandle {
    /// The `n`th handle of entries a [`super::CtView`] holds itself: past every pool index, so
    /// no table resolves it.
    pub(super) fn scratch(n: u32) -> Self {
        Self {
            idx: u32::MAX - n,
            generation: u32::MAX,
        }
    }

    /// Whether this names an entry of a view rather than of a table.
    pub(super) fn is_scratch(self) -> bool {
        self.generation == u32::MAX && self.idx > u32::MAX - 16
    }
}

/// Counters of one table.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct CtStats {
    /// Live and not yet removed entries.
    pub entries: u64,
    /// Inserts that returned an error.
    pub insert_failures: u64,
    /// Live entries removed to make room.
    pub evictions: u64,
    /// Expired entries removed (by a sweep, a lookup, or to make room).
    pub expired: u64,
}

#[derive(Clone, Copy)]
struct IndexSlot {
    /// Low 32 bits of the key's hash; the home slot is `hash & mask`.
    hash: u32,
    /// `pool index << 1 | direction`, or [`EMPTY`].
    entry: u32,
}

const EMPTY: u32 = u32::MAX;
const EMPTY_SLOT: IndexSlot = IndexSlot {
    hash: 0,
    entry: EMPTY,
};

/// Aligned to two cache lines so that an entry never straddles more lines than it needs (the
/// adjacent-line prefetcher fetches the pair).
#[repr(C, align(128))]
struct PoolSlot<V> {
    generation: u32,
    entry: Option<CtEntry<V>>,
}

/// The connection table of one worker.
pub struct ConnTrack<V: Copy> {
    index: Box<[IndexSlot]>,
    mask: usize,
    pool: Box<[PoolSlot<V>]>,
    /// Stack of free pool indices; `free[..free_len]` are free.
    free: Box<[u32]>,
    free_len: usize,
    /// Sweep hand over the pool, for [`ConnTrack::expire`] and eviction.
    hand: usize,
    timeouts: CtTimeouts,
    seed: u64,
    stats: CtStats,
}

impl<V: Copy> std::fmt::Debug for ConnTrack<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTrack")
            .field("capacity", &self.pool.len())
            .field("index_slots", &self.index.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<V: Copy> ConnTrack<V> {
    /// The largest capacity (2^24 connections).
    pub const MAX_CAPACITY: usize = 1 << 24;

    /// Allocates the whole table: the pool of `capacity` entries and the index.
    pub fn new(config: CtConfig) -> Self {
        let capacity = config.capacity.clamp(1, Self::MAX_CAPACITY);
        let index_len = (4 * capacity).next_power_of_two().max(2 * MAX_PROBE);
        let pool: Box<[PoolSlot<V>]> = (0..capacity)
            .map(|_| PoolSlot {
                generation: 0,
                entry: None,
            })
            .collect();
        // Pop order: 0, 1, 2, ...
        let free: Box<[u32]> = (0..capacity as u32).rev().collect();
        Self {
            index: vec![EMPTY_SLOT; index_len].into_boxed_slice(),
            mask: index_len - 1,
            pool,
            free,
            free_len: capacity,
            hand: 0,
            timeouts: config.timeouts,
            seed: config.hash_seed,
            stats: CtStats::default(),
        }
    }

    /// Entries held (expired ones included until removed).
    pub fn len(&self) -> usize {
        self.pool.len() - self.free_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The fixed capacity.
    pub fn capacity(&self) -> usize {
        self.pool.len()
    }

    pub fn timeouts(&self) -> &CtTimeouts {
        &self.timeouts
    }

    pub fn stats(&self) -> CtStats {
        CtStats {
            entries: self.len() as u64,
            ..self.stats
        }
    }

    /// Bytes held by the table; constant for its lifetime.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val::<[IndexSlot]>(&self.index)
            + std::mem::size_of_val::<[PoolSlot<V>]>(&self.pool)
            + std::mem::size_of_val::<[u32]>(&self.free)
    }

    #[inline]
    fn hash(&self, key: &FlowKey) -> u32 {
        key.hash64_seeded(self.seed) as u32
    }

    /// Finds a key: its index position, pool index and direction.
    #[inline]
    fn find(&self, key: &FlowKey, hash: u32) -> Option<(usize, usize, FlowDir)> {
        let mut pos = hash as usize & self.mask;
        for _ in 0..MAX_PROBE {
            let slot = self.index[pos];
            if slot.entry == EMPTY {
                return None;
            }
            if slot.hash == hash {
                let idx = (slot.entry >> 1) as usize;
                let dir = if slot.entry & 1 == 0 {
                    FlowDir::Original
                } else {
                    FlowDir::Reply
                };
                if let Some(e) = self.pool.get(idx).and_then(|p| p.entry.as_ref())
                    && e.keys[dir as usize] == *key
                {
                    return Some((pos, idx, dir));
                }
            }
            pos = (pos + 1) & self.mask;
        }
        None
    }

    /// Looks a key up. Expired entries are misses (and are removed).
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: u64) -> Option<(CtHandle, FlowDir)> {
        let hash = self.hash(key);
        self.lookup_hashed(key, hash, now)
    }

    #[inline]
    fn lookup_hashed(&mut self, key: &FlowKey, hash: u32, now: u64) -> Option<(CtHandle, FlowDir)> {
        let (_, idx, dir) = self.find(key, hash)?;
        let slot = &self.pool[idx];
        let expired = slot.entry.as_ref().is_none_or(|e| e.is_expired(now));
        if expired {
            self.remove_idx(idx);
            self.stats.expired += 1;
            return None;
        }
        Some((
            CtHandle {
                idx: idx as u32,
                generation: slot.generation,
            },
            dir,
        ))
    }

    /// [`Self::lookup`] without changing anything: an expired entry is a miss but stays where it is
    /// (for [`super::CtView`], a trace's read-only view; the table's own lookups remove it).
    #[inline]
    pub fn peek(&self, key: &FlowKey, now: u64) -> Option<(CtHandle, FlowDir)> {
        let (_, idx, dir) = self.find(key, self.hash(key))?;
        let slot = &self.pool[idx];
        slot.entry.as_ref().filter(|e| !e.is_expired(now))?;
        Some((
            CtHandle {
                idx: idx as u32,
                generation: slot.generation,
            },
            dir,
        ))
    }

    /// [`Self::lookup`] for a batch: `out[i]` gets the answer for `keys[i]` (up to the shorter of
    /// the two). Same answers as one `lookup` per key in order, but faster on tables larger than the
    /// caches: it works in groups of [`LOOKUP_GROUP`] keys and first loads every key's home index
    /// slot, then every candidate entry, so that the cache misses of a group overlap instead of
    /// following one another.
    pub fn lookup_batch(
        &mut self,
        keys: &[FlowKey],
        now: u64,
        out: &mut [Option<(CtHandle, FlowDir)>],
    ) {
        let last_pool = self.pool.len() - 1;
        for (keys, out) in keys.chunks(LOOKUP_GROUP).zip(out.chunks_mut(LOOKUP_GROUP)) {
            let mut hashes = [0u32; LOOKUP_GROUP];
            let mut firsts = [EMPTY; LOOKUP_GROUP];
            // Stage 1: independent loads of the home index slot and the next one; keep the entry
            // of the first whose hash matches (most keys sit in one of the two).
            for ((k, h), f) in keys.iter().zip(&mut hashes).zip(&mut firsts) {
                *h = self.hash(k);
                let home = *h as usize & self.mask;
                let a = self.index[home];
                let b = self.index[(home + 1) & self.mask];
                *f = if a.hash == *h { a.entry } else { b.entry };
            }
            // Stage 2: independent loads of the entries those slots name (clamped, branch-free).
            let mut touch = 0u64;
            for f in &firsts {
                let idx = ((f >> 1) as usize).min(last_pool);
                touch ^= self.pool[idx].generation as u64;
            }
            std::hint::black_box(touch);
            // Stage 3: the real lookups, now mostly from cache.
            for ((k, h), o) in keys.iter().zip(&hashes).zip(out.iter_mut()) {
                *o = self.lookup_hashed(k, *h, now);
            }
        }
    }

    /// The entry of a handle; `None` once it has been removed.
    #[inline]
    pub fn get(&self, h: CtHandle) -> Option<&CtEntry<V>> {
        self.pool
            .get(h.idx as usize)
            .filter(|p| p.generation == h.generation)
            .and_then(|p| p.entry.as_ref())
    }

    #[inline]
    pub fn get_mut(&mut self, h: CtHandle) -> Option<&mut CtEntry<V>> {
        self.pool
            .get_mut(h.idx as usize)
            .filter(|p| p.generation == h.generation)
            .and_then(|p| p.entry.as_mut())
    }

    /// [`CtEntry::on_packet`] with this table's timeouts; `None` for a stale handle.
    #[inline]
    pub fn on_packet(
        &mut self,
        h: CtHandle,
        dir: FlowDir,
        tcp_flags: Option<u8>,
        bytes: u32,
        now: u64,
    ) -> Option<CtState> {
        let timeouts = self.timeouts;
        let e = self.get_mut(h)?;
        Some(e.on_packet(dir, tcp_flags, bytes, now, &timeouts))
    }

    /// Removes the entry of a handle (both keys); a stale handle does nothing.
    pub fn remove(&mut self, h: CtHandle) {
        if self.get(h).is_some() {
            self.remove_idx(h.idx as usize);
        }
    }

    /// Inserts a connection under its original and reply keys (the same key twice is indexed once, as
    /// original). Expired entries holding either key are replaced; live ones give
    /// [`CtError::Exists`]. A full pool evicts one entry (see the module doc).
    pub fn insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        value: V,
        now: u64,
    ) -> Result<CtHandle, CtError> {
        let r = self.try_insert(orig, reply, value, now);
        if r.is_err() {
            self.stats.insert_failures += 1;
        }
        r
    }

    fn try_insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        value: V,
        now: u64,
    ) -> Result<CtHandle, CtError> {
        let ho = self.hash(&orig);
        let hr = self.hash(&reply);
        for (key, hash) in [(&orig, ho), (&reply, hr)] {
            if let Some((_, idx, _)) = self.find(key, hash) {
                if self.pool[idx]
                    .entry
                    .as_ref()
                    .is_some_and(|e| !e.is_expired(now))
                {
                    return Err(CtError::Exists);
                }
                self.remove_idx(idx);
                self.stats.expired += 1;
            }
        }
        if self.free_len == 0 {
            self.evict_for_pool(ho, now);
        }
        let Some(idx) = self.pop_free() else {
            return Err(CtError::Full);
        };
        let pos_o = match self.reserve(ho, now, usize::MAX) {
            Ok(pos) => pos,
            Err(e) => {
                self.free[self.free_len] = idx as u32;
                self.free_len += 1;
                return Err(e);
            }
        };
        // Occupy the pool slot first so the window evictions below can see it and skip it.
        self.pool[idx].entry = Some(CtEntry::new(orig, reply, value, now, &self.timeouts));
        self.index[pos_o] = IndexSlot {
            hash: ho,
            entry: (idx as u32) << 1,
        };
        if reply != orig {
            match self.reserve(hr, now, idx) {
                Ok(pos_r) => {
                    self.index[pos_r] = IndexSlot {
                        hash: hr,
                        entry: (idx as u32) << 1 | 1,
                    };
                }
                Err(e) => {
                    self.remove_idx(idx);
                    return Err(e);
                }
            }
        }
        Ok(CtHandle {
            idx: idx as u32,
            generation: self.pool[idx].generation,
        })
    }

    /// Removes up to `budget` pool slots' worth of expired entries, continuing where the last sweep
    /// stopped. Returns how many it removed.
    pub fn expire(&mut self, now: u64, budget: usize) -> usize {
        self.expire_each(now, budget, |_| {})
    }

    /// [`ConnTrack::expire`], showing each expired entry to `f` just before removing it.
    pub fn expire_each(
        &mut self,
        now: u64,
        budget: usize,
        mut f: impl FnMut(&CtEntry<V>),
    ) -> usize {
        let n = self.pool.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            let idx = self.hand;
            self.hand = if idx + 1 == n { 0 } else { idx + 1 };
            if let Some(e) = self.pool[idx].entry.as_ref().filter(|e| e.is_expired(now)) {
                f(e);
                self.remove_idx(idx);
                self.stats.expired += 1;
                removed += 1;
            }
        }
        removed
    }

    fn pop_free(&mut self) -> Option<usize> {
        if self.free_len == 0 {
            return None;
        }
        self.free_len -= 1;
        Some(self.free[self.free_len] as usize)
    }

    /// A free index slot within [`MAX_PROBE`] of `hash`'s home, evicting an entry of the window
    /// (never `keep`) if all are taken.
    fn reserve(&mut self, hash: u32, now: u64, keep: usize) -> Result<usize, CtError> {
        for _ in 0..MAX_PROBE {
            let home = hash as usize & self.mask;
            let mut pos = home;
            for _ in 0..MAX_PROBE {
                if self.index[pos].entry == EMPTY {
                    return Ok(pos);
                }
                pos = (pos + 1) & self.mask;
            }
            // The window is full of live keys: evict the best victim of the window and retry
            // (backward shifts may pull a key from past the window into the hole).
            let mut best: Option<usize> = None;
            let mut pos = home;
            for _ in 0..MAX_PROBE {
                let idx = (self.index[pos].entry >> 1) as usize;
                if idx != keep {
                    best = self.better_victim(best, idx, now);
                }
                pos = (pos + 1) & self.mask;
            }
            let victim = best.ok_or(CtError::Full)?;
            self.evict(victim, now);
        }
        Err(CtError::Full)
    }

    /// Frees one pool slot: the best victim among the entries of `hash`'s probe window and the
    /// next [`EVICT_SCAN`] pool slots under the hand.
    fn evict_for_pool(&mut self, hash: u32, now: u64) {
        let mut best = None;
        let mut pos = hash as usize & self.mask;
        for _ in 0..MAX_PROBE {
            let slot = self.index[pos];
            if slot.entry == EMPTY {
                break;
            }
            best = self.better_victim(best, (slot.entry >> 1) as usize, now);
            pos = (pos + 1) & self.mask;
        }
        let n = self.pool.len();
        for _ in 0..EVICT_SCAN.min(n) {
            let idx = self.hand;
            self.hand = if idx + 1 == n { 0 } else { idx + 1 };
            best = self.better_victim(best, idx, now);
        }
        if let Some(victim) = best {
            self.evict(victim, now);
        }
    }

    /// Of two candidates, prefers an expired one, then the older last packet.
    fn better_victim(&self, best: Option<usize>, idx: usize, now: u64) -> Option<usize> {
        let Some(cand) = self.pool.get(idx).and_then(|p| p.entry.as_ref()) else {
            return best;
        };
        let Some(b) = best else {
            return Some(idx);
        };
        let Some(cur) = self.pool[b].entry.as_ref() else {
            return Some(idx);
        };
        let rank = |e: &CtEntry<V>| (!e.is_expired(now), e.last_seen);
        if rank(cand) < rank(cur) {
            Some(idx)
        } else {
            best
        }
    }

    fn evict(&mut self, idx: usize, now: u64) {
        let expired = self.pool[idx]
            .entry
            .as_ref()
            .is_some_and(|e| e.is_expired(now));
        if expired {
            self.stats.expired += 1;
        } else {
            self.stats.evictions += 1;
        }
        self.remove_idx(idx);
    }

    /// Removes the entry in pool slot `idx` and both its index slots.
    fn remove_idx(&mut self, idx: usize) {
        let Some(entry) = self.pool[idx].entry.take() else {
            return;
        };
        for dir in [FlowDir::Original, FlowDir::Reply] {
            let key = entry.keys[dir as usize];
            if dir == FlowDir::Reply && key == entry.keys[0] {
                break;
            }
            let code = (idx as u32) << 1 | dir as u32;
            let mut pos = self.hash(&key) as usize & self.mask;
            for _ in 0..MAX_PROBE {
                if self.index[pos].entry == code {
                    self.delete_at(pos);
                    break;
                }
                pos = (pos + 1) & self.mask;
            }
        }
        let slot = &mut self.pool[idx];
        slot.generation = slot.generation.wrapping_add(1);
        self.free[self.free_len] = idx as u32;
        self.free_len += 1;
    }

    /// Backward-shift deletion: empties `pos` and moves later keys of its cluster back, so that no
    /// key has an empty slot between its home and itself.
    fn delete_at(&mut self, pos: usize) {
        let mask = self.mask;
        let mut hole = pos;
        let mut j = (pos + 1) & mask;
        // The index is at most half full, so the cluster ends.
        while self.index[j].entry != EMPTY {
            let home = self.index[j].hash as usize & mask;
            // Move j into the hole if the hole lies between j's home and j.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.index[hole] = self.index[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.index[hole] = EMPTY_SLOT;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::{IndexSlot, PoolSlot};
    use proptest::prelude::*;

    #[test]
    fn nat_keys_and_duplicates() {
        let mut ct = table(16);
        let client_to_vip = tcp(1);
        let backend_to_client = FlowKey {
            src: [10, 244, 2, 5],
            src_port: 8080,
            dst: client_to_vip.src,
            dst_port: client_to_vip.src_port,
            proto: proto::TCP,
        };
        let h = ct.insert(client_to_vip, backend_to_client, 42, 0).unwrap();
        assert_eq!(ct.lookup(&client_to_vip, 0), Some((h, O)));
        assert_eq!(ct.lookup(&backend_to_client, 0), Some((h, R)));
        assert_eq!(ct.lookup(&client_to_vip.reversed(), 0), None);
        assert_eq!(*ct.get(h).unwrap().value(), 42);
        assert_eq!(ct.get(h).unwrap().key(R), &backend_to_client);
        assert_eq!(ct.insert(client_to_vip, tcp(9), 1, 0), Err(CtError::Exists));
        assert_eq!(
            ct.insert(tcp(9), backend_to_client, 1, 0),
            Err(CtError::Exists)
        );
        assert_eq!(ct.stats().insert_failures, 2);
        // The same key both ways is indexed once.
        let k = tcp(5);
        let h5 = ct.insert(k, k, 1, 0).unwrap();
        assert_eq!(ct.lookup(&k, 0), Some((h5, O)));
        ct.remove(h5);
        assert_eq!(ct.lookup(&k, 0), None);
        assert_eq!(ct.len(), 1);
    }
    #[test]
    fn stale_handles_do_not_alias() {
        let mut ct = table(1);
        let h1 = ct.insert(udp(1), udp(1).reversed(), 1, 0).unwrap();
        ct.remove(h1);
        let h2 = ct.insert(udp(2), udp(2).reversed(), 2, 0).unwrap();
        assert_eq!(h1.idx, h2.idx, "the slot is reused");
        assert!(ct.get(h1).is_none());
        assert!(ct.get_mut(h1).is_none());
        assert_eq!(ct.on_packet(h1, O, None, 1, 0), None);
        ct.remove(h1);
        assert_eq!(*ct.get(h2).unwrap().value(), 2);
    }
    #[test]
    fn expire_sweeps_with_budget() {
        let mut ct = table(100);
        for i in 0..100 {
            ct.insert(udp(i), udp(i).reversed(), i, u64::from(i) * S)
                .unwrap();
        }
        // At t = 80 s, entries inserted before 50 s are expired (30 s timeout).
        let now = 80 * S;
        assert_eq!(ct.expire(now, 10), 10);
        assert_eq!(ct.len(), 90);
        assert_eq!(
            ct.expire(now, 1000),
            41,
            "51 expired in all; budget caps at one pass"
        );
        assert_eq!(ct.len(), 49);
        assert_eq!(ct.stats().expired, 51);
        assert_eq!(ct.expire(now, 100), 0);
        assert!(ct.lookup(&udp(51), now).is_some());
        assert!(ct.lookup(&udp(50), now).is_none());
    }
    #[test]
    fn lookup_drops_expired_entries() {
        let mut ct = table(4);
        let k = udp(1);
        ct.insert(k, k.reversed(), 0, 0).unwrap();
        assert!(ct.lookup(&k, 30 * S - 1).is_some());
        assert!(ct.lookup(&k.reversed(), 30 * S).is_none());
        assert_eq!(ct.len(), 0);
        // An expired entry's keys can be inserted again.
        let mut ct = table(4);
        ct.insert(k, k.reversed(), 0, 0).unwrap();
        assert!(ct.insert(k, k.reversed(), 1, 30 * S).is_ok());
        assert_eq!(ct.len(), 1);
    }
    #[test]
    fn full_table_evicts_expired_first_then_oldest() {
        let mut ct = table(16);
        // 16 entries: UDP ones expire at 30 s, TCP ones (after a SYN) at 120 s.
        let mut handles = Vec::new();
        for i in 0..16 {
            let k = if i % 4 == 0 { udp(i) } else { tcp(i) };
            let h = ct.insert(k, k.reversed(), i, u64::from(i)).unwrap();
            ct.on_packet(
                h,
                O,
                (k.proto == proto::TCP).then_some(SYN),
                1,
                u64::from(i),
            );
            handles.push((k, h));
        }
        assert_eq!(ct.len(), 16);
        let now = 60 * S;
        for j in 0..4 {
            ct.insert(tcp(100 + j), tcp(100 + j).reversed(), 0, now)
                .unwrap();
            assert_eq!(ct.len(), 16);
        }
        // The four UDP entries (expired) went; every TCP entry survives.
        for (k, h) in &handles {
            assert_eq!(ct.get(*h).is_some(), k.proto == proto::TCP, "{k:?}");
        }
        assert_eq!(ct.stats().evictions, 0);
        assert_eq!(ct.stats().expired, 4);
        // No expired entry left: the oldest live one goes (tcp(1), last packet at t = 1).
        ct.insert(tcp(200), tcp(200).reversed(), 0, now).unwrap();
        assert!(ct.get(handles[1].1).is_none());
        assert!(ct.get(handles[2].1).is_some());
        assert_eq!(ct.stats().evictions, 1);
        assert_eq!(ct.len(), 16);
    }
    #[test]
    fn pool_slot_is_two_cache_lines() {
        assert_eq!(std::mem::size_of::<PoolSlot<u32>>(), 128);
        assert_eq!(std::mem::size_of::<PoolSlot<[u64; 3]>>(), 128);
        assert_eq!(std::mem::align_of::<PoolSlot<u32>>(), 128);
        assert_eq!(std::mem::size_of::<IndexSlot>(), 8);
        let ct = table(1 << 10);
        assert_eq!(ct.memory_bytes(), (1 << 10) * (128 + 4) + (1 << 12) * 8);
    }
    #[test]
    fn capacity_one_and_clamping() {
        let mut ct = table(0);
        assert_eq!(ct.capacity(), 1);
        ct.insert(udp(1), udp(1).reversed(), 0, 0).unwrap();
        ct.insert(udp(2), udp(2).reversed(), 0, 0).unwrap();
        assert_eq!(ct.len(), 1);
        assert!(ct.lookup(&udp(2), 0).is_some());
        assert!(ct.lookup(&udp(1), 0).is_none());
    }
    #[test]
    fn batch_lookup_matches_single() {
        let mut ct = table(300);
        for i in 0..300 {
            let k = if i % 3 == 0 { udp(i) } else { tcp(i) };
            ct.insert(k, k.reversed(), i, u64::from(i) * S).unwrap();
        }
        // Hits both ways, misses, and expired entries (UDP ones inserted before 50 s).
        let keys: Vec<FlowKey> = (0..350)
            .flat_map(|i| {
                let k = if i % 3 == 0 { udp(i) } else { tcp(i) };
                [k, k.reversed()]
            })
            .collect();
        let now = 80 * S;
        let mut single = table(300);
        for i in 0..300 {
            let k = if i % 3 == 0 { udp(i) } else { tcp(i) };
            single.insert(k, k.reversed(), i, u64::from(i) * S).unwrap();
        }
        let want: Vec<_> = keys.iter().map(|k| single.lookup(k, now)).collect();
        let mut got = vec![None; keys.len() + 5];
        ct.lookup_batch(&keys, now, &mut got);
        assert_eq!(&got[..keys.len()], &want[..]);
        assert!(got[keys.len()..].iter().all(Option::is_none));
        assert_eq!(ct.len(), single.len());
        assert!(want.iter().filter(|w| w.is_some()).count() > 300);
        assert!(want.iter().filter(|w| w.is_none()).count() > 100);
        // A short output slice answers only its prefix.
        let mut short = [None; 3];
        ct.lookup_batch(&keys[2..], now, &mut short);
        assert_eq!(&short[..], &want[2..5]);
    }
    #[derive(Clone, Copy, Debug)]
    enum Op {
        Insert(u16),
        Lookup(u16),
        Remove(u16),
        Expire(u8),
        Tick(u8),
    }
    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u16..400).prop_map(Op::Insert),
            3 => (0u16..400).prop_map(Op::Lookup),
            1 => (0u16..400).prop_map(Op::Remove),
            1 => any::<u8>().prop_map(Op::Expire),
            1 => any::<u8>().prop_map(Op::Tick),
        ]
    }
    fn reply_of(i: u16) -> FlowKey {
        // A NAT-style reply key, unrelated to the reversed original.
        FlowKey {
            src: (0x0a00_0000 + u32::from(i)).to_be_bytes(),
            dst: [11, 0, 0, 0],
            src_port: i,
            dst_port: 53,
            proto: proto::UDP,
        }
    }
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Model check against a HashMap: every live entry is found under both keys with the
        /// right direction; capacity is never exceeded; memory never changes.
        #[test]
        fn model(cap in 1usize..64, ops in proptest::collection::vec(op(), 1..400)) {
            let mut ct = table(cap);
            let mem = ct.memory_bytes();
            let mut model: std::collections::HashMap<u16, (CtHandle, u64)> = Default::default();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Insert(i) => {
                        let k = udp(u32::from(i));
                        let live = model.get(&i).is_some_and(|&(_, exp)| now < exp);
                        let r = ct.insert(k, reply_of(i), u32::from(i), now);
                        if live {
                            prop_assert_eq!(r, Err(CtError::Exists));
                        } else {
                            let h = r.unwrap();
                            model.insert(i, (h, now + 30 * S));
                        }
                    }
                    Op::Lookup(i) => {
                        let got = ct.lookup(&udp(u32::from(i)), now);
                        let got_r = ct.lookup(&reply_of(i), now);
                        match model.get(&i) {
                            Some(&(h, exp)) if now < exp && ct.get(h).is_some() => {
                                prop_assert_eq!(got, Some((h, FlowDir::Original)));
                                prop_assert_eq!(got_r, Some((h, FlowDir::Reply)));
                                prop_assert_eq!(*ct.get(h).unwrap().value(), u32::from(i));
                            }
                            _ => {
                                prop_assert_eq!(got, None);
                                prop_assert_eq!(got_r, None);
                            }
                        }
                    }
                    Op::Remove(i) => {
                        if let Some((h, _)) = model.remove(&i) {
                            ct.remove(h);
                            prop_assert!(ct.get(h).is_none());
                        }
                    }
                    Op::Expire(b) => { ct.expire(now, usize::from(b)); }
                    Op::Tick(t) => now += u64::from(t) * S / 4,
                }
                // Entries evicted to make room are gone from the table; forget them.
                model.retain(|_, (h, _)| ct.get(*h).is_some());
                prop_assert!(ct.len() <= cap);
                prop_assert!(model.len() <= ct.len());
                prop_assert_eq!(ct.memory_bytes(), mem);
            }
        }

        /// Expiry happens exactly at `last packet + timeout(state)`.
        #[test]
        fn expiry_boundary(kind in 0usize..7, t0 in 0u64..1_000_000_000_000) {
            let mut ct = table(8);
            let k = if kind < 5 { tcp(1) } else { udp(1) };
            let h = ct.insert(k, k.reversed(), 0, 0).unwrap();
            let script: &[(FlowDir, u8)] = match kind {
                0 => &[(O, SYN)],
                1 => &[(O, SYN), (R, SYN | ACK)],
                2 => &[(O, SYN), (R, SYN | ACK), (O, ACK)],
                3 => &[(O, SYN), (R, SYN | ACK), (O, ACK), (O, FIN | ACK), (R, ACK)],
                4 => &[(O, SYN), (R, RST)],
                5 => &[(O, 0)],
                _ => &[(O, 0), (R, 0)],
            };
            let mut state = CtState::Invalid;
            for &(d, f) in script {
                let flags = (k.proto == proto::TCP).then_some(f);
                state = ct.on_packet(h, d, flags, 1, t0).unwrap();
            }
            let timeout = CtTimeouts::default().of(state);
            let want = [120, 60, 432_000, 60, 10, 30, 120][kind] * S;
            prop_assert_eq!(timeout, want);
            prop_assert!(ct.lookup(&k, t0 + timeout - 1).is_some());
            prop_assert!(ct.lookup(&k.reversed(), t0 + timeout - 1).is_some());
            prop_assert!(ct.lookup(&k, t0 + timeout).is_none());
            prop_assert_eq!(ct.len(), 0);
        }

        /// A full table with any expired entry evicts an expired one, never a live one (for tables
        /// of at most EVICT_SCAN entries the sweep sees them all; larger ones look at a window).
        #[test]
        fn full_table_evicts_expired_first(
            ages in proptest::collection::vec(0u64..60, 1..=EVICT_SCAN),
            extra in 1usize..8,
        ) {
            let cap = ages.len();
            let mut ct = table(cap);
            let now = 60 * S;
            let mut handles = Vec::new();
            for (i, &age) in ages.iter().enumerate() {
                let k = udp(i as u32);
                // Inserted `age` seconds ago: expired iff age >= 30.
                let h = ct.insert(k, k.reversed(), 0, now - age * S).unwrap();
                handles.push((h, age >= 30));
            }
            let expired = handles.iter().filter(|(_, e)| *e).count();
            for j in 1..=extra {
                let k = tcp(1000 + j as u32);
                ct.insert(k, k.reversed(), 0, now).unwrap();
                prop_assert_eq!(ct.len(), cap);
                // The first `expired` inserts take expired entries; only later ones evict.
                prop_assert_eq!(ct.stats().evictions as usize, j.saturating_sub(expired));
                if j <= expired {
                    prop_assert!(handles.iter().all(|(h, e)| *e || ct.get(*h).is_some()));
                }
            }
            prop_assert_eq!(ct.stats().expired as usize, expired.min(extra));
        }

        /// Filling far past capacity with distinct flows keeps the table at capacity, finds the
        /// newest flow, and never fails an insert.
        #[test]
        fn churn_never_exceeds_capacity(cap in 1usize..300, n in 1u32..2000, seed in any::<u64>()) {
            let mut ct: ConnTrack<u32> = ConnTrack::new(CtConfig { hash_seed: seed, ..CtConfig::with_capacity(cap) });
            let mem = ct.memory_bytes();
            for i in 0..n {
                let k = tcp(i);
                let h = ct.insert(k, k.reversed(), i, u64::from(i)).unwrap();
                prop_assert_eq!(ct.lookup(&k, u64::from(i)), Some((h, O)));
                prop_assert!(ct.len() <= cap);
            }
            prop_assert_eq!(ct.len(), cap.min(n as usize));
            prop_assert_eq!(ct.stats().insert_failures, 0);
            prop_assert_eq!(ct.stats().evictions, u64::from(n).saturating_sub(cap as u64));
            prop_assert_eq!(ct.memory_bytes(), mem);
        }
    }
}
