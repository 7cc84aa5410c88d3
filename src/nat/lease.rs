//! The lease (correspondence) table: *(real, virtual, partner)* triples, their indexes, the
//! quarantine of released addresses, and the choice of a virtual address for a new lease.
//!
//! Leases live in a [`Slab`]; four hash indexes hold only slab indices and compare against the
//! slab (hashbrown's `HashTable`), so an index costs a few bytes per lease:
//! - `out`: *(real, partner)* → lease, unique: the outbound lookup.
//! - `inb`: *(virtual, partner)* → lease, unique: the inbound demultiplexer.
//! - `by_real`, `by_virtual`: every lease of a host / of a virtual address: a unique-key
//!   index to the head of a doubly-linked chain through the lease entries (a multi-map with
//!   equal keys would make open addressing walk every equal hash: O(n) per lease for a host
//!   with many partners). Used by the `per-host` binding, the `any`-filtering lookup and the
//!   allocation's preferences.

use super::pool::Pool;
use super::slab::Slab;
use super::wheel::{Links, Timed, Wheel};
use super::{DropReason, Mapping, Origin};
use crate::wire::{addr_delta, Delta};
use foldhash::fast::FixedState;
use hashbrown::HashTable;
use rand_chacha::ChaCha12Rng;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;

/// Marks the end of an intrusive list.
pub const NIL: u32 = u32::MAX;

/// One lease as the table stores it.
#[derive(Debug, Clone)]
pub struct LeaseEntry {
    /// The host's real address.
    pub real: IpAddr,
    /// The rented virtual address.
    pub virt: IpAddr,
    /// The partner the lease is for.
    pub partner: IpAddr,
    /// Explicit (rented) or implicit (made by the gateway on a first packet).
    pub origin: Origin,
    /// Checksum delta of rewriting `real` into `virt` (negate it for the way back).
    pub delta: Delta,
    /// Creation time (ms since the translator's epoch).
    pub created: u64,
    /// When the lease ends ([`NEVER`] while an implicit lease has flows).
    pub expires: u64,
    wheel: Links,
    /// Live flows.
    pub flows: u32,
    /// First flow of the lease's intrusive flow list.
    pub flow_head: u32,
    /// Sequence number of the event that created it (0: restored, durable).
    pub seq: u64,
    /// An implicit lease's life as the store has it, durably (ms): a restart gives the lease
    /// at least this long ([`super::life`]).
    pub life: u64,
    /// The newest life handed to the store, and the sequence number of its event.
    pub life_pending: (u64, u64),
    /// It ends no earlier than this (ms): the life a restart restored it with.
    pub floor: u64,
    /// Links of the chain of leases of the same host.
    same_real: Link,
    /// Links of the chain of leases on the same virtual address.
    same_virtual: Link,
}

/// Intrusive doubly-linked chain links.
#[derive(Debug, Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

impl Default for Link {
    fn default() -> Link {
        Link { prev: NIL, next: NIL }
    }
}

/// Which chain: leases of one host, or leases on one virtual address.
#[derive(Debug, Clone, Copy)]
enum Chain {
    Real,
    Virtual,
}

impl Chain {
    fn key(self, l: &LeaseEntry) -> IpAddr {
        match self {
            Chain::Real => l.real,
            Chain::Virtual => l.virt,
        }
    }

    fn link(self, l: &mut LeaseEntry) -> &mut Link {
        match self {
            Chain::Real => &mut l.same_real,
            Chain::Virtual => &mut l.same_virtual,
        }
    }

    fn next(self, l: &LeaseEntry) -> u32 {
        match self {
            Chain::Real => l.same_real.next,
            Chain::Virtual => l.same_virtual.next,
        }
    }
}

impl Default for LeaseEntry {
    fn default() -> LeaseEntry {
        let none = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
        LeaseEntry {
            real: none,
            virt: none,
            partner: none,
            origin: Origin::Implicit,
            delta: Delta::default(),
            created: 0,
            expires: 0,
            wheel: Links::default(),
            flows: 0,
            flow_head: NIL,
            seq: 0,
            life: 0,
            life_pending: (0, 0),
            floor: 0,
            same_real: Link::default(),
            same_virtual: Link::default(),
        }
    }
}

impl Timed for LeaseEntry {
    fn links(&mut self) -> &mut Links {
        &mut self.wheel
    }
    fn deadline(&self) -> u64 {
        self.expires
    }
}

/// The lease table.
pub struct LeaseTable {
    pub(crate) slab: Slab<LeaseEntry>,
    out: HashTable<u32>,
    inb: HashTable<u32>,
    by_real: HashTable<u32>,
    by_virtual: HashTable<u32>,
    hasher: FixedState,
    wheel: Wheel,
    pub(crate) quarantine: Quarantine,
}

fn h2(hasher: &FixedState, a: IpAddr, b: IpAddr) -> u64 {
    hasher.hash_one((a, b))
}

fn h1(hasher: &FixedState, a: IpAddr) -> u64 {
    hasher.hash_one(a)
}

impl LeaseTable {
    /// A table for at most `cap` leases, its memory reserved up front. Indexes get twice the
    /// room, so churn at full capacity rehashes in place instead of allocating.
    pub fn new(cap: usize, hash_seed: u64) -> LeaseTable {
        LeaseTable {
            slab: Slab::with_capacity(cap),
            out: HashTable::with_capacity(2 * cap),
            inb: HashTable::with_capacity(2 * cap),
            by_real: HashTable::with_capacity(2 * cap),
            by_virtual: HashTable::with_capacity(2 * cap),
            hasher: FixedState::with_seed(hash_seed),
            wheel: Wheel::new(),
            quarantine: Quarantine::new(2 * cap, hash_seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    /// The lease for outbound packets from `real` to `partner`.
    #[inline]
    pub fn find_out(&self, real: IpAddr, partner: IpAddr) -> Option<u32> {
        let slab = &self.slab;
        self.out
            .find(h2(&self.hasher, real, partner), |&i| {
                slab.get(i).is_some_and(|l| l.real == real && l.partner == partner)
            })
            .copied()
    }

    /// The lease for inbound packets from `partner` to `virt`.
    #[inline]
    pub fn find_in(&self, virt: IpAddr, partner: IpAddr) -> Option<u32> {
        let slab = &self.slab;
        self.inb
            .find(h2(&self.hasher, virt, partner), |&i| {
                slab.get(i).is_some_and(|l| l.virt == virt && l.partner == partner)
            })
            .copied()
    }

    /// Every lease on virtual address `virt`.
    pub fn on_virtual(&self, virt: IpAddr) -> impl Iterator<Item = u32> + '_ {
        self.chain(Chain::Virtual, virt)
    }

    /// Every lease of host `real`.
    pub fn of_host(&self, real: IpAddr) -> impl Iterator<Item = u32> + '_ {
        self.chain(Chain::Real, real)
    }

    fn heads(&self, c: Chain) -> &HashTable<u32> {
        match c {
            Chain::Real => &self.by_real,
            Chain::Virtual => &self.by_virtual,
        }
    }

    fn chain(&self, c: Chain, key: IpAddr) -> impl Iterator<Item = u32> + '_ {
        let slab = &self.slab;
        let head = self
            .heads(c)
            .find(h1(&self.hasher, key), |&j| slab.peek(j).is_some_and(|l| c.key(l) == key))
            .copied();
        std::iter::successors(head, move |&i| {
            let n = slab.get(i).map_or(NIL, |l| c.next(l));
            (n != NIL).then_some(n)
        })
    }

    /// Puts lease `i` at the head of its chain `c`.
    fn chain_insert(&mut self, c: Chain, i: u32) {
        let Some(key) = self.slab.get(i).map(|l| c.key(l)) else { return };
        let h = h1(&self.hasher, key);
        let slab = &self.slab;
        let heads = match c {
            Chain::Real => &mut self.by_real,
            Chain::Virtual => &mut self.by_virtual,
        };
        let old = heads.find(h, |&j| slab.peek(j).is_some_and(|l| c.key(l) == key)).copied();
        match old {
            Some(old) => {
                if let Some(e) = heads.find_mut(h, |&j| j == old) {
                    *e = i;
                }
                if let Some(l) = self.slab.get_mut(i) {
                    *c.link(l) = Link { prev: NIL, next: old };
                }
                if let Some(l) = self.slab.get_mut(old) {
                    c.link(l).prev = i;
                }
            }
            None => {
                let hs = &self.hasher;
                heads.insert_unique(h, i, |&j| slab.peek(j).map_or(0, |l| h1(hs, c.key(l))));
            }
        }
    }

    /// Takes lease `i` out of its chain `c`.
    fn chain_remove(&mut self, c: Chain, i: u32) {
        let Some(l) = self.slab.get_mut(i) else { return };
        let (key, Link { prev, next }) = (c.key(l), *c.link(l));
        *c.link(l) = Link::default();
        if let Some(p) = self.slab.get_mut(prev) {
            c.link(p).next = next;
        } else {
            let h = h1(&self.hasher, key);
            let heads = match c {
                Chain::Real => &mut self.by_real,
                Chain::Virtual => &mut self.by_virtual,
            };
            if next != NIL {
                if let Some(e) = heads.find_mut(h, |&j| j == i) {
                    *e = next;
                }
            } else if let Ok(e) = heads.find_entry(h, |&j| j == i) {
                e.remove();
            }
        }
        if let Some(n) = self.slab.get_mut(next) {
            c.link(n).prev = prev;
        }
    }

    /// The single host using `virt`, if exactly one does.
    pub fn sole_host(&self, virt: IpAddr) -> Option<IpAddr> {
        let mut host = None;
        for i in self.on_virtual(virt) {
            let r = self.slab.get(i)?.real;
            match host {
                None => host = Some(r),
                Some(h) if h != r => return None,
                Some(_) => {}
            }
        }
        host
    }

    /// The lease entry at `i`.
    #[inline]
    pub fn get(&self, i: u32) -> Option<&LeaseEntry> {
        self.slab.get(i)
    }

    /// The lease entry at `i`, mutable.
    #[inline]
    pub fn get_mut(&mut self, i: u32) -> Option<&mut LeaseEntry> {
        self.slab.get_mut(i)
    }

    /// Sets lease `i`'s end and moves it on the wheel.
    pub fn set_expires(&mut self, i: u32, expires: u64) {
        if let Some(l) = self.slab.get_mut(i) {
            l.expires = expires;
            self.wheel.schedule(&mut self.slab, i, expires);
        }
    }

    /// Pushes the leases ended by `now` to `due` (still in the table).
    pub fn expire(&mut self, now: u64, due: &mut Vec<u32>) {
        self.wheel.expire(&mut self.slab, now, due);
    }

    /// The earliest moment a lease may end.
    pub fn next_deadline(&self) -> Option<u64> {
        self.wheel.next_deadline()
    }

    /// Number of leases.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Inserts a lease; the caller has checked that `(real, partner)` and `(virt, partner)`
    /// are free.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &mut self,
        real: IpAddr,
        virt: IpAddr,
        partner: IpAddr,
        origin: Origin,
        now: u64,
        expires: u64,
    ) -> Result<u32, DropReason> {
        let entry = LeaseEntry {
            real,
            virt,
            partner,
            origin,
            delta: addr_delta(real, virt),
            created: now,
            expires,
            ..LeaseEntry::default()
        };
        let (i, _) = self.slab.insert(entry).map_err(|_| DropReason::LeaseTableFull)?;
        self.wheel.schedule(&mut self.slab, i, expires);
        let (slab, hs) = (&self.slab, &self.hasher);
        let key2 = |f: fn(&LeaseEntry) -> (IpAddr, IpAddr)| {
            move |&j: &u32| {
                slab.get(j).map_or(0, |l| {
                    let (a, b) = f(l);
                    h2(hs, a, b)
                })
            }
        };
        self.out.insert_unique(h2(hs, real, partner), i, key2(|l| (l.real, l.partner)));
        self.inb.insert_unique(h2(hs, virt, partner), i, key2(|l| (l.virt, l.partner)));
        self.chain_insert(Chain::Real, i);
        self.chain_insert(Chain::Virtual, i);
        Ok(i)
    }

    /// Removes lease `i` from the slab and every index, and quarantines its address; returns
    /// the quarantine entry made (virtual, partner or none, real, until).
    pub fn remove(
        &mut self,
        i: u32,
        now: u64,
        quarantine_ms: u64,
        mapping: Mapping,
    ) -> Option<(IpAddr, Option<IpAddr>, IpAddr, u64)> {
        self.wheel.cancel(&mut self.slab, i);
        self.chain_remove(Chain::Real, i);
        self.chain_remove(Chain::Virtual, i);
        let l = self.slab.get(i)?.clone();
        let hs = &self.hasher;
        for (table, h) in
            [(&mut self.out, h2(hs, l.real, l.partner)), (&mut self.inb, h2(hs, l.virt, l.partner))]
        {
            if let Ok(e) = table.find_entry(h, |&j| j == i) {
                e.remove();
            }
        }
        self.slab.remove(i);
        if quarantine_ms == 0 {
            return None;
        }
        let until = now.saturating_add(quarantine_ms);
        let partner = match mapping {
            Mapping::PerPartner => Some(l.partner),
            Mapping::PerHost if self.of_host(l.real).next().is_none() => None,
            Mapping::PerHost => return None,
        };
        self.quarantine.add(l.virt, partner, l.real, until);
        Some((l.virt, partner, l.real, until))
    }

    /// Picks a virtual address for a new lease of `real` towards `partner`.
    ///
    /// `per-host`: the host's current address, else the address it had before (if still
    /// free), else a random address no lease and no quarantine holds. `per-partner`: the
    /// address the host had for this partner before (if still free), else a random address,
    /// preferring one nobody uses, then one this host does not use yet, and never one that
    /// `partner` already sees for another lease or that is quarantined against it.
    pub fn allocate(
        &self,
        pool: &Pool,
        mapping: Mapping,
        real: IpAddr,
        partner: IpAddr,
        rng: &mut ChaCha12Rng,
        now: u64,
    ) -> Result<IpAddr, DropReason> {
        let v4 = real.is_ipv4();
        match mapping {
            Mapping::PerHost => {
                if let Some(i) = self.of_host(real).next() {
                    return self.get(i).map(|l| l.virt).ok_or(DropReason::PoolExhausted);
                }
                let free = |v: IpAddr| {
                    self.on_virtual(v).next().is_none()
                        && !self.quarantine.blocks(v, None, real, now)
                };
                if let Some(v) = self.quarantine.previous(real, None, now) {
                    if free(v) {
                        return Ok(v);
                    }
                }
                pool.candidates(v4, rng).find(|&v| free(v)).ok_or(DropReason::PoolExhausted)
            }
            Mapping::PerPartner => {
                let usable = |v: IpAddr| {
                    self.find_in(v, partner).is_none()
                        && !self.quarantine.blocks(v, Some(partner), real, now)
                };
                if let Some(v) = self.quarantine.previous(real, Some(partner), now) {
                    if usable(v) {
                        return Ok(v);
                    }
                }
                let mut not_mine = None;
                let mut shared = None;
                for (tried, v) in pool.candidates(v4, rng).enumerate() {
                    // When the random probes found no unused address, the pool is (nearly) all in
                    // use: take the best usable one they found instead of scanning the pool on
                    // every new lease; only a partner that sees every address scans (and is
                    // refused).
                    if tried >= super::pool::RANDOM_PROBES as usize
                        && (not_mine.is_some() || shared.is_some())
                    {
                        break;
                    }
                    if !usable(v) {
                        continue;
                    }
                    let mut users = self.on_virtual(v).peekable();
                    if users.peek().is_none() && !self.quarantine.held(v, real, now) {
                        return Ok(v);
                    }
                    let mine = users.any(|i| self.get(i).is_some_and(|l| l.real == real));
                    if !mine {
                        not_mine.get_or_insert(v);
                    } else {
                        shared.get_or_insert(v);
                    }
                }
                not_mine.or(shared).ok_or(DropReason::PoolExhausted)
            }
        }
    }

    /// Bytes reserved by the table and its indexes (the quarantine not included: it grows
    /// with ended leases, see [`Quarantine::allocation_size`]).
    pub fn allocation_size(&self) -> usize {
        self.slab.allocation_size()
            + self.out.allocation_size()
            + self.inb.allocation_size()
            + self.by_real.allocation_size()
            + self.by_virtual.allocation_size()
    }
}

/// Addresses recently released, held back from other hosts (RFC 6888 REQ-8).
///
/// Keyed by *(virtual, partner)* under `per-partner` (the partner must not see the address
/// move to another host) and by *(virtual, none)* under `per-host` (nobody may). The host that
/// held the address may take it back at once.
pub struct Quarantine {
    by_virtual: HashMap<(IpAddr, Option<IpAddr>), (IpAddr, u64), FixedState>,
    /// Entries per host that had the address: its share of the room.
    per_real: HashMap<IpAddr, u32, FixedState>,
    by_host: HashMap<(IpAddr, Option<IpAddr>), IpAddr, FixedState>,
    fifo: VecDeque<(u64, IpAddr, Option<IpAddr>)>,
    cap: usize,
    /// Entries dropped before their time because the quarantine was full.
    pub evicted: u64,
}

impl Quarantine {
    /// A quarantine of at most `cap` entries (twice the lease table's: the translator makes
    /// no lease while live leases and quarantined addresses together fill it, so an entry is
    /// never let go before its time). Its memory grows with use (entries are added when
    /// leases end, never on the packet path), so an idle quarantine costs little.
    fn new(cap: usize, seed: u64) -> Quarantine {
        let cap = cap.max(16);
        let initial = cap.min(1024);
        Quarantine {
            by_virtual: HashMap::with_capacity_and_hasher(initial, FixedState::with_seed(seed)),
            by_host: HashMap::with_capacity_and_hasher(initial, FixedState::with_seed(seed ^ 1)),
            per_real: HashMap::with_capacity_and_hasher(initial, FixedState::with_seed(seed ^ 2)),
            fifo: VecDeque::with_capacity(initial),
            cap,
            evicted: 0,
        }
    }

    /// Holds `virt` away from hosts other than `real` (for `partner`, or for everyone when
    /// `None`) until `until`.
    pub fn add(&mut self, virt: IpAddr, partner: Option<IpAddr>, real: IpAddr, until: u64) {
        // Entries superseded by a later one on the same key stay in the queue until their
        // time; past twice the room, drop them at once (they hold nothing back).
        if self.fifo.len() >= 2 * self.cap {
            let live = &self.by_virtual;
            self.fifo.retain(|&(u, v, p)| live.get(&(v, p)).is_some_and(|&(_, w)| w == u));
        }
        // Only when the translator's room check was bypassed (restored entries): the oldest
        // goes, counted.
        while self.by_virtual.len() >= self.cap {
            let Some((u, v, p)) = self.fifo.pop_front() else { break };
            if self.by_virtual.get(&(v, p)).is_some_and(|&(_, w)| w == u) {
                self.evicted += 1;
            }
            self.expire_entry(u, v, p);
        }
        if let Some((before, _)) = self.by_virtual.insert((virt, partner), (real, until)) {
            self.forget(before);
        }
        *self.per_real.entry(real).or_default() += 1;
        self.by_host.insert((real, partner), virt);
        self.fifo.push_back((until, virt, partner));
    }

    /// True when `virt` is quarantined against `partner` (or against everyone) for a host
    /// other than `real`.
    pub fn blocks(&self, virt: IpAddr, partner: Option<IpAddr>, real: IpAddr, now: u64) -> bool {
        let hit =
            |k| matches!(self.by_virtual.get(&k), Some(&(r, until)) if r != real && until > now);
        hit((virt, None)) || (partner.is_some() && hit((virt, partner)))
    }

    /// True when any quarantine entry of another host exists on `virt` for the whole
    /// address (used to prefer fresh addresses).
    pub fn held(&self, virt: IpAddr, real: IpAddr, now: u64) -> bool {
        self.blocks(virt, None, real, now)
    }

    /// The address `real` had for `partner` (or as its per-host address) before.
    pub fn previous(&self, real: IpAddr, partner: Option<IpAddr>, now: u64) -> Option<IpAddr> {
        let v = *self.by_host.get(&(real, partner))?;
        match self.by_virtual.get(&(v, partner)) {
            Some(&(r, until)) if r == real && until > now => Some(v),
            _ => None,
        }
    }

    /// Ends every entry whose time has come; returns the next deadline.
    pub fn expire(&mut self, now: u64) -> Option<u64> {
        while let Some(&(until, v, p)) = self.fifo.front() {
            if until > now {
                return Some(until);
            }
            self.expire_entry(until, v, p);
            self.fifo.pop_front();
        }
        None
    }

    fn expire_entry(&mut self, until: u64, v: IpAddr, p: Option<IpAddr>) {
        // The same key may have been quarantined again later: only the newest entry counts.
        if let Some(&(real, u)) = self.by_virtual.get(&(v, p)) {
            if u == until {
                self.by_virtual.remove(&(v, p));
                self.forget(real);
                if self.by_host.get(&(real, p)) == Some(&v) {
                    self.by_host.remove(&(real, p));
                }
            }
        }
    }

    /// One entry of `real` fewer.
    fn forget(&mut self, real: IpAddr) {
        if let Some(n) = self.per_real.get_mut(&real) {
            *n -= 1;
            if *n == 0 {
                self.per_real.remove(&real);
            }
        }
    }

    /// How many quarantined addresses `real` had.
    pub fn held_by(&self, real: IpAddr) -> u32 {
        self.per_real.get(&real).copied().unwrap_or(0)
    }

    /// The earliest pending deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        self.fifo.front().map(|e| e.0)
    }

    /// Number of quarantined entries.
    pub fn len(&self) -> usize {
        self.by_virtual.len()
    }

    /// The most entries it holds.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}
