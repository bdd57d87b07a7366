//! The LRU snapshot cache: user images keyed by user id, bounded by a count
//! and by a total weight, plain Rust (the Python edge is `python.rs`).
//!
//! Every operation is O(1): a hash map from user id to a slot of a slab, and
//! an intrusive doubly linked list threaded through the slab's slots in
//! recency order (front = least recently used, back = most recently used).
//! Freed slots go on a free list and are reused, so a full cache allocates
//! nothing per put.
//!
//! Values are never dropped inside the cache: whatever leaves it (replaced,
//! evicted, popped, cleared) is handed back to the caller. The Python edge
//! relies on this, because dropping a Python object can run arbitrary code.

pub mod python;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Marks "no slot" in the links of the recency list.
const NIL: usize = usize::MAX;

/// A hasher for u64 keys: the key without its low `BLOCK_BITS` bits goes
/// through one folded 128-bit multiply, so every one of those key bits
/// reaches both the bucket index (low bits) and the control byte (top 7
/// bits) that the std hash map uses; the low bits are kept as they are.
/// Neighbouring ids (often loaded or evicted together) thus share a cache
/// line of buckets, as they do in a Python dict, while strided or clustered
/// ids still spread over the whole table. The low bits also go into the
/// control byte, so neighbours in one block stay distinguishable there.
/// Good enough for ids that are not chosen by an adversary against it.
#[derive(Default, Clone, Copy)]
pub struct UserIdHasher {
    hash: u64,
}

const BLOCK_BITS: u32 = 3;
const BLOCK_MASK: u64 = (1 << BLOCK_BITS) - 1;

impl Hasher for UserIdHasher {
    #[inline]
    fn write_u64(&mut self, key: u64) {
        let key = key ^ self.hash;
        let product = u128::from(key >> BLOCK_BITS) * 0x9E37_79B9_7F4A_7C15_u128;
        let mixed = (product as u64) ^ ((product >> 64) as u64);
        let low = key & BLOCK_MASK;
        self.hash = ((mixed & !BLOCK_MASK) | low) ^ (low << (64 - 7));
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; this keeps the Hasher contract anyway.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

type SlotIndex = HashMap<u64, usize, BuildHasherDefault<UserIdHasher>>;

/// One slot of the slab: an entry while `value` is Some, else on the free list
/// (linked through `next`).
struct Slot<V> {
    key: u64,
    weight: u64,
    prev: usize,
    next: usize,
    value: Option<V>,
}

/// The entries in recency order: a slab of slots threaded by a doubly linked
/// list, with a free list of vacated slots. Knows nothing of keys' lookup.
struct RecencyList<V> {
    slots: Vec<Slot<V>>,
    free: usize,
    front: usize,
    back: usize,
}

impl<V> RecencyList<V> {
    fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: NIL,
            front: NIL,
            back: NIL,
        }
    }

    /// Stores an entry in a free (or new) slot, linked at the back.
    fn push_back(&mut self, key: u64, value: V, weight: u64) -> usize {
        let entry = Slot {
            key,
            weight,
            prev: NIL,
            next: NIL,
            value: Some(value),
        };
        let slot = if self.free != NIL {
            let slot = self.free;
            self.free = self.slots[slot].next;
            self.slots[slot] = entry;
            slot
        } else {
            self.slots.push(entry);
            self.slots.len() - 1
        };
        self.link_back(slot);
        slot
    }

    /// Replaces the value and weight of a slot, moves it to the back, and
    /// returns the old weight and value.
    fn replace(&mut self, slot: usize, value: V, weight: u64) -> (u64, V) {
        let entry = &mut self.slots[slot];
        let old_weight = std::mem::replace(&mut entry.weight, weight);
        let old_value = entry
            .value
            .replace(value)
            .expect("a linked slot holds a value");
        self.move_to_back(slot);
        (old_weight, old_value)
    }

    /// Unlinks and frees a slot; returns its key, weight and value.
    fn remove(&mut self, slot: usize) -> (u64, u64, V) {
        self.unlink(slot);
        let free = self.free;
        let entry = &mut self.slots[slot];
        entry.next = free;
        self.free = slot;
        let value = entry.value.take().expect("a linked slot holds a value");
        (entry.key, entry.weight, value)
    }

    #[inline]
    fn move_to_back(&mut self, slot: usize) {
        if slot != self.back {
            self.unlink(slot);
            self.link_back(slot);
        }
    }

    #[inline]
    fn value(&self, slot: usize) -> Option<&V> {
        self.slots[slot].value.as_ref()
    }

    /// Takes every value out, front first, and empties the list.
    fn clear(&mut self) -> Vec<V> {
        let mut values = Vec::new();
        let mut slot = self.front;
        while slot != NIL {
            let entry = &mut self.slots[slot];
            slot = entry.next;
            values.extend(entry.value.take());
        }
        *self = Self::new();
        values
    }

    /// Links an unlinked slot after the current back.
    #[inline]
    fn link_back(&mut self, slot: usize) {
        let back = self.back;
        let entry = &mut self.slots[slot];
        entry.prev = back;
        entry.next = NIL;
        match back {
            NIL => self.front = slot,
            back => self.slots[back].next = slot,
        }
        self.back = slot;
    }

    #[inline]
    fn unlink(&mut self, slot: usize) {
        let Slot { prev, next, .. } = self.slots[slot];
        match prev {
            NIL => self.front = next,
            prev => self.slots[prev].next = next,
        }
        match next {
            NIL => self.back = prev,
            next => self.slots[next].prev = prev,
        }
    }
}

/// Why `LruCache::new` refused its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundError {
    ZeroEntries,
    ZeroWeight,
}

impl std::fmt::Display for BoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ZeroEntries => "max_entries must be at least 1",
            Self::ZeroWeight => "max_weight must be at least 1",
        })
    }
}

impl std::error::Error for BoundError {}

/// What a `put` displaced: entries evicted (least recently used first) and the
/// value it replaced under the same key, if any (not an eviction).
pub struct PutOutcome<V> {
    pub evicted: Evicted<V>,
    pub replaced: Option<V>,
}

/// The entries one `put` evicted, least recently used first. The first is
/// held inline, so the usual put (evicting none or one) allocates nothing.
pub struct Evicted<V> {
    first: Option<(u64, V)>,
    rest: Vec<(u64, V)>,
}

impl<V> Evicted<V> {
    fn new() -> Self {
        Self {
            first: None,
            rest: Vec::new(),
        }
    }

    fn push(&mut self, key: u64, value: V) {
        if self.first.is_none() {
            self.first = Some((key, value));
        } else {
            self.rest.push((key, value));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }
}

impl<V> IntoIterator for Evicted<V> {
    type Item = (u64, V);
    type IntoIter = std::iter::Chain<std::option::IntoIter<(u64, V)>, std::vec::IntoIter<(u64, V)>>;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.rest)
    }
}

/// A least-recently-used map from u64 keys to values of type `V`, bounded by
/// `max_entries` entries and by `max_weight` total weight, with hit, miss and
/// eviction counters.
pub struct LruCache<V> {
    index: SlotIndex,
    list: RecencyList<V>,
    max_entries: usize,
    max_weight: u64,
    weight: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

impl<V> LruCache<V> {
    /// An empty cache; both bounds must be at least 1.
    pub fn new(max_entries: usize, max_weight: u64) -> Result<Self, BoundError> {
        if max_entries == 0 {
            return Err(BoundError::ZeroEntries);
        }
        if max_weight == 0 {
            return Err(BoundError::ZeroWeight);
        }
        Ok(Self {
            index: SlotIndex::default(),
            list: RecencyList::new(),
            max_entries,
            max_weight,
            weight: 0,
            hits: 0,
            misses: 0,
            evictions: 0,
        })
    }

    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    pub fn max_weight(&self) -> u64 {
        self.max_weight
    }

    /// The sum of the weights of the entries held.
    pub fn weight(&self) -> u64 {
        self.weight
    }

    pub fn hits(&self) -> u64 {
        self.hits
    }

    pub fn misses(&self) -> u64 {
        self.misses
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, key: u64) -> bool {
        self.index.contains_key(&key)
    }

    /// The value, made most recently used; counts a hit or a miss.
    #[inline]
    pub fn get(&mut self, key: u64) -> Option<&V> {
        match self.index.get(&key) {
            Some(&slot) => {
                self.hits += 1;
                self.list.move_to_back(slot);
                self.list.value(slot)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// The value, without touching recency or the counters.
    #[inline]
    pub fn peek(&self, key: u64) -> Option<&V> {
        let &slot = self.index.get(&key)?;
        self.list.value(slot)
    }

    /// Stores (or replaces) `value` as most recently used, then evicts least
    /// recently used entries until both bounds hold. A value heavier than
    /// `max_weight` is not kept: after any previous value under `key` (evicted
    /// first), it comes back at once as evicted itself.
    pub fn put(&mut self, key: u64, value: V, weight: u64) -> PutOutcome<V> {
        let mut evicted = Evicted::new();
        if weight > self.max_weight {
            if let Some(slot) = self.index.remove(&key) {
                let previous = self.remove_slot(slot);
                evicted.push(key, previous);
                self.evictions += 1;
            }
            evicted.push(key, value);
            self.evictions += 1;
            return PutOutcome {
                evicted,
                replaced: None,
            };
        }
        let replaced = match self.index.entry(key) {
            Entry::Occupied(entry) => {
                let (old_weight, old_value) = self.list.replace(*entry.get(), value, weight);
                self.weight -= old_weight;
                Some(old_value)
            }
            Entry::Vacant(entry) => {
                entry.insert(self.list.push_back(key, value, weight));
                None
            }
        };
        // The entry just stored is at the back and not yet in `self.weight`:
        // evicting from the front until the others fit in the room it leaves
        // never reaches it (alone, it fits both bounds), and cannot overflow.
        let room = self.max_weight - weight;
        while self.index.len() > self.max_entries || self.weight > room {
            let slot = self.list.front;
            let (evicted_key, evicted_weight, evicted_value) = self.list.remove(slot);
            self.index.remove(&evicted_key);
            self.weight -= evicted_weight;
            self.evictions += 1;
            evicted.push(evicted_key, evicted_value);
        }
        self.weight += weight;
        PutOutcome { evicted, replaced }
    }

    /// Removes and returns the value (not an eviction).
    pub fn pop(&mut self, key: u64) -> Option<V> {
        let slot = self.index.remove(&key)?;
        Some(self.remove_slot(slot))
    }

    /// Removes every entry (not counted as evictions) and returns their values,
    /// least recently used first; the counters are kept.
    pub fn clear(&mut self) -> Vec<V> {
        self.index.clear();
        self.weight = 0;
        self.list.clear()
    }

    /// Every (key, value), least recently used first, without touching recency.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u64, &V)> + '_ {
        LruIter {
            list: &self.list,
            slot: self.list.front,
            remaining: self.len(),
        }
    }

    /// Takes a slot already removed from the index out of the list.
    fn remove_slot(&mut self, slot: usize) -> V {
        let (_, weight, value) = self.list.remove(slot);
        self.weight -= weight;
        value
    }
}

struct LruIter<'a, V> {
    list: &'a RecencyList<V>,
    slot: usize,
    remaining: usize,
}

impl<'a, V> Iterator for LruIter<'a, V> {
    type Item = (u64, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        if self.slot == NIL {
            return None;
        }
        let entry = &self.list.slots[self.slot];
        self.slot = entry.next;
        self.remaining -= 1;
        Some((entry.key, entry.value.as_ref()?))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<V> ExactSizeIterator for LruIter<'_, V> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<V>(cache: &LruCache<V>) -> Vec<u64> {
        cache.iter().map(|(key, _)| key).collect()
    }

    fn evicted_keys<V>(outcome: PutOutcome<V>) -> Vec<u64> {
        outcome.evicted.into_iter().map(|(key, _)| key).collect()
    }

    fn evicted<V>(outcome: PutOutcome<V>) -> Vec<(u64, V)> {
        outcome.evicted.into_iter().collect()
    }

    #[test]
    fn rejects_zero_bounds() {
        assert_eq!(
            LruCache::<u8>::new(0, 10).err(),
            Some(BoundError::ZeroEntries)
        );
        assert_eq!(
            LruCache::<u8>::new(1, 0).err(),
            Some(BoundError::ZeroWeight)
        );
    }

    #[test]
    fn count_bound_evicts_least_recently_used_first() {
        let mut cache = LruCache::new(3, 1000).unwrap();
        for key in 1..=3 {
            assert!(cache.put(key, key * 10, 1).evicted.is_empty());
        }
        let outcome = cache.put(4, 40, 1);
        assert_eq!(evicted(outcome), vec![(1, 10)]);
        assert_eq!(keys(&cache), vec![2, 3, 4]);
        assert_eq!(cache.evictions(), 1);
    }

    #[test]
    fn weight_bound_evicts_as_many_as_needed_in_order() {
        let mut cache = LruCache::new(100, 10).unwrap();
        cache.put(1, "a", 3);
        cache.put(2, "b", 3);
        cache.put(3, "c", 3);
        let outcome = cache.put(4, "d", 7);
        assert_eq!(evicted_keys(outcome), vec![1, 2]);
        assert_eq!(cache.weight(), 10);
        assert_eq!(keys(&cache), vec![3, 4]);
        assert_eq!(cache.evictions(), 2);
    }

    #[test]
    fn get_refreshes_recency_and_counts_peek_does_not() {
        let mut cache = LruCache::new(2, 100).unwrap();
        cache.put(1, 'a', 1);
        cache.put(2, 'b', 1);
        assert_eq!(cache.peek(1), Some(&'a'));
        assert_eq!(keys(&cache), vec![1, 2]);
        assert_eq!(cache.get(1), Some(&'a'));
        assert_eq!(keys(&cache), vec![2, 1]);
        assert_eq!(cache.get(9), None);
        assert_eq!((cache.hits(), cache.misses()), (1, 1));
        assert_eq!(evicted_keys(cache.put(3, 'c', 1)), vec![2]);
    }

    #[test]
    fn replace_updates_value_weight_and_recency_without_evicting_itself() {
        let mut cache = LruCache::new(3, 10).unwrap();
        cache.put(1, 100, 2);
        cache.put(2, 200, 2);
        cache.put(3, 300, 2);
        let outcome = cache.put(1, 111, 9);
        assert_eq!(outcome.replaced, Some(100));
        assert_eq!(evicted_keys(outcome), vec![2, 3]);
        assert_eq!(cache.weight(), 9);
        assert_eq!(cache.peek(1), Some(&111));
        assert_eq!(cache.evictions(), 2);
        let outcome = cache.put(1, 112, 1);
        assert!(outcome.evicted.is_empty());
        assert_eq!(outcome.replaced, Some(111));
        assert_eq!(cache.weight(), 1);
    }

    #[test]
    fn oversize_value_is_returned_at_once_after_the_previous_one() {
        let mut cache = LruCache::new(3, 10).unwrap();
        cache.put(1, 'a', 4);
        cache.put(2, 'b', 4);
        let outcome = cache.put(1, 'z', 11);
        assert!(outcome.replaced.is_none());
        assert_eq!(evicted(outcome), vec![(1, 'a'), (1, 'z')]);
        assert_eq!(keys(&cache), vec![2]);
        assert_eq!(cache.weight(), 4);
        assert_eq!(cache.evictions(), 2);
        assert_eq!(evicted(cache.put(7, 'y', u64::MAX)), vec![(7, 'y')]);
        assert_eq!(cache.evictions(), 3);
    }

    #[test]
    fn exact_fit_and_huge_bounds_do_not_overflow() {
        let mut cache = LruCache::new(usize::MAX, u64::MAX).unwrap();
        cache.put(1, (), u64::MAX - 1);
        assert!(cache.put(2, (), 1).evicted.is_empty());
        assert_eq!(cache.weight(), u64::MAX);
        assert_eq!(evicted_keys(cache.put(3, (), u64::MAX)), vec![1, 2]);
        assert_eq!(cache.weight(), u64::MAX);
    }

    #[test]
    fn pop_and_clear_are_not_evictions_and_slots_are_reused() {
        let mut cache = LruCache::new(4, 100).unwrap();
        for key in 0..4 {
            cache.put(key, key, 5);
        }
        assert_eq!(cache.pop(1), Some(1));
        assert_eq!(cache.pop(1), None);
        assert_eq!(cache.weight(), 15);
        cache.put(9, 9, 5);
        assert_eq!(cache.list.slots.len(), 4, "the popped slot is reused");
        assert_eq!(keys(&cache), vec![0, 2, 3, 9]);
        cache.get(0);
        assert_eq!(cache.clear(), vec![2, 3, 9, 0]);
        assert!(cache.is_empty());
        assert_eq!((cache.weight(), cache.evictions(), cache.hits()), (0, 0, 1));
        cache.put(5, 5, 1);
        assert_eq!(keys(&cache), vec![5]);
    }

    #[test]
    fn hasher_keeps_neighbours_together_and_spreads_the_rest() {
        use std::collections::HashSet;
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<UserIdHasher>::default();
        let hash = |key: u64| build.hash_one(key);
        for base in [0u64, 8, 1 << 40, u64::MAX - 7] {
            let positions: Vec<u64> = (base..=base + 7).map(|key| hash(key) & 1023).collect();
            assert!(
                positions.windows(2).all(|pair| pair[1] == pair[0] + 1),
                "{positions:?}"
            );
            let control: HashSet<u64> = (base..=base + 7).map(|key| hash(key) >> 57).collect();
            assert_eq!(control.len(), 8, "neighbours need distinct control bytes");
        }
        // 1024 keys over 1024 blocks of 8 buckets: random placement fills ~63%.
        for stride in [8u64, 24, 1024, 1 << 32, 0x9E37_79B9] {
            let blocks: HashSet<u64> = (0..1024u64)
                .map(|i| (hash(i * stride) & 8191) >> 3)
                .collect();
            assert!(
                blocks.len() > 550,
                "stride {stride}: {} blocks",
                blocks.len()
            );
            let control: HashSet<u64> = (0..1024u64).map(|i| hash(i * stride) >> 57).collect();
            assert!(
                control.len() > 100,
                "stride {stride}: {} control bytes",
                control.len()
            );
        }
        let blocks: HashSet<u64> = (0..1024u64).map(|key| (hash(key) & 8191) >> 3).collect();
        assert!(
            blocks.len() > 110,
            "128 blocks of sequential keys land in {}",
            blocks.len()
        );
    }

    /// A reference model: a Vec in recency order, searched linearly.
    #[derive(Default)]
    struct Model {
        entries: Vec<(u64, u32, u64)>,
        evictions: u64,
    }

    impl Model {
        fn put(&mut self, max: (usize, u64), key: u64, value: u32, weight: u64) -> Vec<(u64, u32)> {
            let mut out = Vec::new();
            if let Some(at) = self.entries.iter().position(|e| e.0 == key) {
                let old = self.entries.remove(at);
                if weight > max.1 {
                    out.push((key, old.1));
                }
            }
            if weight > max.1 {
                out.push((key, value));
                self.evictions += out.len() as u64;
                return out;
            }
            self.entries.push((key, value, weight));
            while self.entries.len() > max.0
                || self.entries.iter().map(|e| e.2).sum::<u64>() > max.1
            {
                let old = self.entries.remove(0);
                out.push((old.0, old.1));
            }
            self.evictions += out.len() as u64;
            out
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Get(u64),
        Peek(u64),
        Put(u64, u32, u64),
        Pop(u64),
        Clear,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..12u64).prop_map(Op::Get),
            2 => (0..12u64).prop_map(Op::Peek),
            8 => (0..12u64, any::<u32>(), 0..14u64).prop_map(|(k, v, w)| Op::Put(k, v, w)),
            2 => (0..12u64).prop_map(Op::Pop),
            1 => Just(Op::Clear),
        ]
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_reference_model(
            max_entries in 1..6usize,
            max_weight in 1..20u64,
            ops in proptest::collection::vec(op(), 0..80),
        ) {
            let mut cache = LruCache::new(max_entries, max_weight).unwrap();
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Get(key) => {
                        let at = model.entries.iter().position(|e| e.0 == key);
                        let expected = at.map(|at| {
                            let entry = model.entries.remove(at);
                            model.entries.push(entry);
                            entry.1
                        });
                        proptest::prop_assert_eq!(cache.get(key).copied(), expected);
                    }
                    Op::Peek(key) => {
                        let expected = model.entries.iter().find(|e| e.0 == key).map(|e| e.1);
                        proptest::prop_assert_eq!(cache.peek(key).copied(), expected);
                    }
                    Op::Put(key, value, weight) => {
                        let expected = model.put((max_entries, max_weight), key, value, weight);
                        proptest::prop_assert_eq!(evicted(cache.put(key, value, weight)), expected);
                    }
                    Op::Pop(key) => {
                        let at = model.entries.iter().position(|e| e.0 == key);
                        let expected = at.map(|at| model.entries.remove(at).1);
                        proptest::prop_assert_eq!(cache.pop(key), expected);
                    }
                    Op::Clear => {
                        let expected: Vec<u32> = model.entries.drain(..).map(|e| e.1).collect();
                        proptest::prop_assert_eq!(cache.clear(), expected);
                    }
                }
                let items: Vec<(u64, u32)> = cache.iter().map(|(k, v)| (k, *v)).collect();
                let expected: Vec<(u64, u32)> = model.entries.iter().map(|e| (e.0, e.1)).collect();
                proptest::prop_assert_eq!(items, expected);
                proptest::prop_assert_eq!(
                    cache.weight(),
                    model.entries.iter().map(|e| e.2).sum::<u64>()
                );
                proptest::prop_assert_eq!(cache.evictions(), model.evictions);
                for key in 0..12 {
                    proptest::prop_assert_eq!(
                        cache.contains(key),
                        model.entries.iter().any(|e| e.0 == key)
                    );
                }
            }
        }
    }
}
