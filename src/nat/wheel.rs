//! A hashed timing wheel over slab entries, with intrusive links: O(1) to schedule, move or
//! cancel, no allocation ever, and no stale entries (unlike a lazy heap, where every
//! shortened deadline leaves a dead entry behind until the old one falls due).
//!
//! Deadlines are in ms; the wheel turns in ticks of [`TICK_MS`] and has [`SLOTS`] slots, so
//! an entry due further out than one turn sits in its slot and is looked at once per turn
//! until due. A refreshed entry is left where it is (the refresh only stores the new deadline
//! in the entry): when its slot comes up and it is not due yet, it is moved to the slot of its
//! deadline. Only a deadline that moves *earlier* relinks at once.

use super::lease::NIL;
use super::slab::Slab;

/// Milliseconds per tick.
pub const TICK_MS: u64 = 1000;
/// Slots per turn (a power of two): one turn is 68 minutes.
pub const SLOTS: usize = 4096;
const WORDS: usize = SLOTS / 64;

/// The wheel links an entry carries.
#[derive(Debug, Clone, Copy)]
pub struct Links {
    prev: u32,
    next: u32,
    /// The tick whose slot holds the entry, or `u32::MAX` when unscheduled (ticks are
    /// seconds since the translator started: u32 lasts 136 years).
    tick: u32,
}

impl Default for Links {
    fn default() -> Links {
        Links { prev: NIL, next: NIL, tick: u32::MAX }
    }
}

/// An entry the wheel can schedule: it owns its links and its deadline.
pub trait Timed {
    /// The entry's wheel links.
    fn links(&mut self) -> &mut Links;
    /// The entry's current deadline in ms (`u64::MAX`: none).
    fn deadline(&self) -> u64;
}

/// The entries a wheel schedules, addressed by `u32` index: a [`Slab`] of [`Timed`]
/// entries, or a table that keeps links and deadlines in separate arrays (the flow table
/// keeps its links out of the line a packet reads).
pub trait Entries {
    /// Entry `i`'s wheel links, if it is occupied.
    fn links(&mut self, i: u32) -> Option<&mut Links>;
    /// Entry `i`'s deadline in ms (`u64::MAX`: none).
    fn deadline(&self, i: u32) -> u64;
}

impl<T: Timed> Entries for Slab<T> {
    #[inline]
    fn links(&mut self, i: u32) -> Option<&mut Links> {
        self.get_mut(i).map(Timed::links)
    }
    fn deadline(&self, i: u32) -> u64 {
        self.get(i).map_or(u64::MAX, Timed::deadline)
    }
}

/// The wheel.
pub struct Wheel {
    heads: Box<[u32]>,
    occupied: [u64; WORDS],
    /// The next tick to process.
    cursor: u64,
}

fn tick_of(deadline: u64) -> u64 {
    deadline.div_ceil(TICK_MS).min(u64::from(u32::MAX - 1))
}

impl Wheel {
    /// An empty wheel.
    pub fn new() -> Wheel {
        Wheel { heads: vec![NIL; SLOTS].into_boxed_slice(), occupied: [0; WORDS], cursor: 0 }
    }

    fn slot(tick: u64) -> usize {
        (tick as usize) & (SLOTS - 1)
    }

    /// Schedules entry `i` for `deadline` (moving it if it was scheduled).
    pub fn schedule(&mut self, slab: &mut impl Entries, i: u32, deadline: u64) {
        self.cancel(slab, i);
        if deadline == u64::MAX {
            return;
        }
        // Never behind the cursor: a past deadline fires at the next turn of the handle.
        let tick = tick_of(deadline).max(self.cursor);
        let s = Self::slot(tick);
        let head = self.heads[s];
        if let Some(l) = slab.links(i) {
            *l = Links { prev: NIL, next: head, tick: tick as u32 };
        }
        if let Some(h) = slab.links(head) {
            h.prev = i;
        }
        self.heads[s] = i;
        self.occupied[s / 64] |= 1 << (s % 64);
    }

    /// Moves entry `i` earlier if `deadline` falls in an earlier tick than its slot's (the
    /// only case a refresh needs to touch the wheel); schedules it if it was not.
    #[inline]
    pub fn advance(&mut self, slab: &mut impl Entries, i: u32, deadline: u64) {
        let Some(l) = slab.links(i) else { return };
        if tick_of(deadline) < u64::from(l.tick) {
            self.schedule(slab, i, deadline);
        }
    }

    /// Takes entry `i` off the wheel.
    pub fn cancel(&mut self, slab: &mut impl Entries, i: u32) {
        let Some(e) = slab.links(i) else { return };
        let l = *e;
        if l.tick == u32::MAX {
            return;
        }
        *e = Links::default();
        if let Some(p) = slab.links(l.prev) {
            p.next = l.next;
        } else {
            let s = Self::slot(u64::from(l.tick));
            self.heads[s] = l.next;
            if l.next == NIL {
                self.occupied[s / 64] &= !(1 << (s % 64));
            }
        }
        if let Some(n) = slab.links(l.next) {
            n.prev = l.prev;
        }
    }

    /// Visits every slot up to `now`; entries due by then are taken off the wheel and pushed
    /// to `due`; the others move to the slot of their deadline.
    pub fn expire(&mut self, slab: &mut impl Entries, now: u64, due: &mut Vec<u32>) {
        let now_tick = now / TICK_MS;
        if now_tick < self.cursor {
            return;
        }
        let last = now_tick.min(self.cursor + SLOTS as u64 - 1);
        for tick in self.cursor..=last {
            let s = Self::slot(tick);
            // Detach the slot's list first: entries relinked below may land in it again.
            let mut i = std::mem::replace(&mut self.heads[s], NIL);
            self.occupied[s / 64] &= !(1 << (s % 64));
            while let Some(l) = slab.links(i) {
                let next = l.next;
                *l = Links::default();
                let d = slab.deadline(i);
                if d <= now {
                    due.push(i);
                } else if d != u64::MAX {
                    // Its tick is past `now_tick`: it lands after this sweep.
                    self.schedule(slab, i, d);
                }
                i = next;
            }
        }
        self.cursor = now_tick + 1;
    }

    /// The start of the earliest tick that holds an entry (possibly earlier than that entry's
    /// deadline, never later).
    pub fn next_deadline(&self) -> Option<u64> {
        let start = Self::slot(self.cursor);
        for k in 0..=WORDS {
            let w = (start / 64 + k) % WORDS;
            let mut bits = self.occupied[w];
            if k == 0 {
                bits &= !0u64 << (start % 64);
            } else if k == WORDS {
                bits &= !(!0u64 << (start % 64));
            }
            if bits != 0 {
                let s = w * 64 + bits.trailing_zeros() as usize;
                let ahead = (s + SLOTS - start) % SLOTS;
                return Some((self.cursor + ahead as u64) * TICK_MS);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Item {
        links: Links,
        deadline: u64,
    }

    impl Timed for Item {
        fn links(&mut self) -> &mut Links {
            &mut self.links
        }
        fn deadline(&self) -> u64 {
            self.deadline
        }
    }

    fn add(w: &mut Wheel, s: &mut Slab<Item>, deadline: u64) -> u32 {
        let (i, _) = s.insert(Item { deadline, ..Item::default() }).ok().unwrap();
        w.schedule(s, i, deadline);
        i
    }

    #[test]
    fn fires_in_deadline_order_and_exactly_at_the_tick() {
        let mut w = Wheel::new();
        let mut s = Slab::with_capacity(16);
        let a = add(&mut w, &mut s, 5_000);
        let b = add(&mut w, &mut s, 2_500);
        assert_eq!(w.next_deadline(), Some(3_000));
        let mut due = Vec::new();
        w.expire(&mut s, 2_999, &mut due);
        assert!(due.is_empty());
        w.expire(&mut s, 3_000, &mut due);
        assert_eq!(due, vec![b]);
        assert_eq!(w.next_deadline(), Some(5_000));
        w.expire(&mut s, 10_000, &mut due);
        assert_eq!(due, vec![b, a]);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn refreshed_entries_move_when_their_slot_comes_up() {
        let mut w = Wheel::new();
        let mut s = Slab::with_capacity(4);
        let a = add(&mut w, &mut s, 60_000);
        s.get_mut(a).unwrap().deadline = 120_000; // refresh: only the deadline is stored
        let mut due = Vec::new();
        w.expire(&mut s, 60_000, &mut due);
        assert!(due.is_empty());
        assert_eq!(w.next_deadline(), Some(120_000));
        w.expire(&mut s, 120_000, &mut due);
        assert_eq!(due, vec![a]);
    }

    #[test]
    fn advance_moves_earlier_and_cancel_removes() {
        let mut w = Wheel::new();
        let mut s = Slab::with_capacity(4);
        let a = add(&mut w, &mut s, 7_440_000);
        let b = add(&mut w, &mut s, 7_440_000);
        s.get_mut(a).unwrap().deadline = 240_000;
        w.advance(&mut s, a, 240_000);
        assert_eq!(w.next_deadline(), Some(240_000));
        w.cancel(&mut s, a);
        w.cancel(&mut s, a);
        let mut due = Vec::new();
        w.expire(&mut s, 300_000, &mut due);
        assert!(due.is_empty());
        // b is beyond one turn: visited, kept, and due at its time.
        w.expire(&mut s, 7_440_000, &mut due);
        assert_eq!(due, vec![b]);
    }

    #[test]
    fn long_sleep_visits_every_slot_once() {
        let mut w = Wheel::new();
        let mut s = Slab::with_capacity(64);
        let ids: Vec<u32> = (1..=40).map(|k| add(&mut w, &mut s, k * 997_000)).collect();
        let mut due = Vec::new();
        w.expire(&mut s, 100_000_000, &mut due);
        due.sort();
        assert_eq!(due, ids);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn past_deadline_fires_next() {
        let mut w = Wheel::new();
        let mut s = Slab::with_capacity(4);
        let mut due = Vec::new();
        w.expire(&mut s, 50_000, &mut due);
        let a = add(&mut w, &mut s, 10_000);
        assert_eq!(w.next_deadline(), Some(51_000));
        w.expire(&mut s, 51_000, &mut due);
        assert_eq!(due, vec![a]);
    }
}
