//! A hash index from a flow key to the flow's slab index: open addressing with linear probing
//! over one array of 8-byte slots, each the upper 32 bits of the key's hash (the tag) and the
//! slab index. A key's first slot depends on its hash alone, so a batch can prefetch it before
//! it looks ([`Index::home`]); the tag lets a lookup skip slots without touching their flows.
//!
//! Removal shifts the following entries back (no tombstones), so a table that churns at full
//! capacity never needs rehashing and never allocates after [`Index::with_capacity`].

/// An empty slot (no flow has slab index `u32::MAX`: a slab holds fewer).
const EMPTY: u64 = u64::MAX;

/// Slots per entry the index can hold: 1.75, so a full index is at most 57 % occupied and
/// probes stay short (a lookup that misses reads about 3 slots at that load), while the two
/// indexes of a flow cost 28 bytes.
const SLOTS_PER_ENTRY_X4: usize = 7;

#[inline]
fn tag_of(hash: u64) -> u32 {
    (hash >> 32) as u32
}

/// The index of a flow table: at most `cap` entries, `cap` fixed up front.
pub struct Index {
    slots: Box<[u64]>,
}

impl Index {
    /// An index for at most `cap` entries, all its memory reserved now.
    pub fn with_capacity(cap: usize) -> Index {
        // One more slot than entries, so a probe always ends at an empty one.
        let n = (cap * SLOTS_PER_ENTRY_X4 / 4).max(cap + 1);
        Index { slots: vec![EMPTY; n].into_boxed_slice() }
    }

    /// The first slot of a key with this hash: the tag scaled onto the table (Lemire's
    /// multiply-shift), so the table need not be a power of two.
    #[inline]
    fn home_of_tag(&self, tag: u32) -> usize {
        ((u64::from(tag) * self.slots.len() as u64) >> 32) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    /// The slot a lookup of `hash` reads first (to prefetch).
    #[inline]
    pub fn home(&self, hash: u64) -> &u64 {
        &self.slots[self.home_of_tag(tag_of(hash))]
    }

    /// The first entry at the home slot of `hash` whose tag matches, looking no further than
    /// that slot's neighbours: a guess for prefetching, not an answer.
    #[inline]
    pub fn guess(&self, hash: u64) -> Option<u32> {
        let tag = tag_of(hash);
        let mut i = self.home_of_tag(tag);
        for _ in 0..4 {
            let s = *self.slots.get(i)?;
            if s == EMPTY {
                return None;
            }
            if (s >> 32) as u32 == tag {
                return Some(s as u32);
            }
            i = self.next(i);
        }
        None
    }

    /// The entry of `hash` for which `eq` says yes.
    #[inline]
    pub fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let tag = tag_of(hash);
        let mut i = self.home_of_tag(tag);
        // Bounded by the table size, though an empty slot always ends the probe first.
        for _ in 0..self.slots.len() {
            let s = self.slots[i];
            if s == EMPTY {
                return None;
            }
            if (s >> 32) as u32 == tag && eq(s as u32) {
                return Some(s as u32);
            }
            i = self.next(i);
        }
        None
    }

    /// Adds entry `value` under `hash` (the caller knows it is not there yet). False when the
    /// table is full, which the flow slab's capacity rules out.
    pub fn insert(&mut self, hash: u64, value: u32) -> bool {
        let tag = tag_of(hash);
        let mut i = self.home_of_tag(tag);
        for _ in 0..self.slots.len() {
            if self.slots[i] == EMPTY {
                self.slots[i] = (u64::from(tag) << 32) | u64::from(value);
                return true;
            }
            i = self.next(i);
        }
        false
    }

    /// Removes entry `value` stored under `hash`; the entries after it that probed past its
    /// slot move back so every lookup still finds them before an empty slot.
    pub fn remove(&mut self, hash: u64, value: u32) -> bool {
        let want = (u64::from(tag_of(hash)) << 32) | u64::from(value);
        let Some(mut hole) = self.position(want) else { return false };
        let n = self.slots.len();
        let mut j = hole;
        // Bounded by the table size, though an empty slot always ends the run first.
        for _ in 0..n {
            j = self.next(j);
            let s = self.slots[j];
            if s == EMPTY {
                break;
            }
            let home = self.home_of_tag((s >> 32) as u32);
            // Cyclic distances back from `j`: the entry may fill the hole unless its home
            // lies after the hole (then a lookup starts past the hole and must not miss it).
            if (j + n - home) % n >= (j + n - hole) % n {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        true
    }

    /// The slot holding exactly `slot_value`.
    fn position(&self, slot_value: u64) -> Option<usize> {
        let mut i = self.home_of_tag((slot_value >> 32) as u32);
        for _ in 0..self.slots.len() {
            match self.slots[i] {
                EMPTY => return None,
                s if s == slot_value => return Some(i),
                _ => i = self.next(i),
            }
        }
        None
    }

    /// Bytes reserved.
    pub fn allocation_size(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Against a `HashMap`, with few distinct hashes and a small table so collisions,
        /// wrap-around and backward shifts all happen.
        #[test]
        fn behaves_as_a_map(ops in prop::collection::vec((any::<bool>(), 0u32..40, 0u64..6), 0..400)) {
            let cap = 24;
            let mut ix = Index::with_capacity(cap);
            let mut model: HashMap<u32, u64> = HashMap::new();
            let hash_of = |h: u64| h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for (add, v, h) in ops {
                let h = hash_of(h);
                if add {
                    if model.contains_key(&v) || model.len() == cap {
                        continue;
                    }
                    prop_assert!(ix.insert(h, v));
                    model.insert(v, h);
                } else if let Some(h) = model.remove(&v) {
                    prop_assert!(ix.remove(h, v));
                }
                for (&v, &h) in &model {
                    prop_assert_eq!(ix.find(h, |x| x == v), Some(v));
                }
            }
        }
    }

    #[test]
    fn removing_an_absent_entry_is_refused() {
        let mut ix = Index::with_capacity(4);
        assert!(!ix.remove(7, 1));
        assert!(ix.insert(7, 1));
        assert!(!ix.remove(7, 2));
        assert!(ix.remove(7, 1));
        assert_eq!(ix.find(7, |_| true), None);
    }

    #[test]
    fn an_empty_index_finds_nothing() {
        let ix = Index::with_capacity(0);
        assert_eq!(ix.find(0, |_| true), None);
        assert_eq!(ix.guess(0), None);
    }
}
