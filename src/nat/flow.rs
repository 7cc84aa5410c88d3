//! Flows: one per *(lease, protocol, host port, partner port)* (the echo identifier stands in
//! for ports), each with its own idle timer floor:
//! UDP 300 s (RFC 4787 REQ-5), TCP established 7440 s and transitory 240 s (RFC 5382 REQ-5,
//! RFC 7857 §3.1-3.2), ICMP query 60 s (RFC 5508 REQ-2).
//!
//! The flow is what a packet looks up: two indexes find it from the packet's own fields,
//! outbound by *(real, partner, protocol, ports)* and inbound by *(virtual, partner,
//! protocol, ports)*, and its first cache line holds everything the rewrite needs (the three
//! addresses, the ports, the checksum delta, the deadline). The lease is only consulted when
//! a flow is made. A flow's lifetime keeps an implicit lease alive; the flows of a lease are
//! linked in an intrusive list so ending a lease ends its flows without a scan.

use super::lease::{LeaseEntry, NIL};
use super::slab::Slab;
use super::wheel::{Entries, Links, Wheel};
use super::{DropReason, Timeouts};

/// The flow timers in milliseconds, computed once from [`Timeouts`].
#[derive(Debug, Clone, Copy)]
pub struct FlowTimeouts {
    udp: u64,
    tcp_established: u64,
    tcp_transitory: u64,
    icmp_query: u64,
}

impl From<&Timeouts> for FlowTimeouts {
    fn from(t: &Timeouts) -> FlowTimeouts {
        FlowTimeouts {
            udp: t.udp.as_millis() as u64,
            tcp_established: t.tcp_established.as_millis() as u64,
            tcp_transitory: t.tcp_transitory.as_millis() as u64,
            icmp_query: t.icmp_query.as_millis() as u64,
        }
    }
}
impl FlowTimeouts {
    /// The idle timeout a new flow of `proto` gets from its first packet, in ms.
    pub fn first(&self, proto: u8, flags: u8, outbound: bool) -> u64 {
        FlowEntry { proto, ..FlowEntry::default() }.next(flags, outbound, self).1
    }
}

use super::index::Index;
use super::prefetch::prefetch;
use crate::wire::Delta;
use crate::wire::{protocol, tcp_flags};
use rand_chacha::ChaCha12Rng;
use rand_core::{RngCore, SeedableRng};

use crate::wire::{pick, wide, Wide};

/// TCP state bits kept per flow (enough for RFC 7857 §3's timer choice).
pub mod tcp_state {
    /// A segment went out (host → partner).
    pub const OUT_SEEN: u8 = 0x01;
    /// A segment came in (partner → host).
    pub const IN_SEEN: u8 = 0x02;
    /// The host sent FIN.
    pub const OUT_FIN: u8 = 0x04;
    /// The partner sent FIN.
    pub const IN_FIN: u8 = 0x08;
    /// Either side sent RST.
    pub const RST: u8 = 0x10;
}

/// One flow's packet line: everything a packet of the flow reads or writes, in one aligned
/// 64-byte cache line (the lookup compares the key, the rewrite takes the addresses and the
/// delta, the refresh writes the deadline and the TCP state). The rest of the flow, which
/// only creation, removal and expiry touch, is a [`FlowLinks`] at the same index.
#[derive(Debug, Clone, Default)]
#[repr(C, align(64))]
pub struct FlowEntry {
    /// The host's real address.
    pub real: Wide,
    /// The virtual address.
    pub virt: Wide,
    /// The partner's address.
    pub partner: Wide,
    /// Idle deadline (ms since the translator's epoch); `NEVER` until the first packet
    /// schedules it.
    pub expires: u64,
    /// Port (or echo identifier) on the host's side.
    pub host_port: u16,
    /// Port on the partner's side (0 for echo).
    pub partner_port: u16,
    /// Checksum delta of rewriting `real` into `virt` (negate for the way back).
    pub delta: Delta,
    /// IP protocol (TCP, UDP, ICMP, ICMPv6).
    pub proto: u8,
    /// TCP state bits ([`tcp_state`]); 0 for other protocols.
    pub tcp: u8,
}

const _: () = assert!(std::mem::size_of::<FlowEntry>() == 64);

/// The rest of a flow: its lease, its place in the lease's list of flows, its wheel links.
#[derive(Debug, Clone, Copy)]
struct FlowLinks {
    /// Owning lease (slab index).
    lease: u32,
    prev: u32,
    next: u32,
    wheel: Links,
}

/// The flows: packet lines in a slab, their links in a parallel array (index `i` of one is
/// index `i` of the other), so a packet touches one line and the wheel the other.
struct Store {
    lines: Slab<FlowEntry>,
    links: Vec<FlowLinks>,
}

impl Store {
    /// Flow `i`'s links, if it is occupied.
    #[inline]
    fn links_of(&mut self, i: u32) -> Option<&mut FlowLinks> {
        self.lines.get(i)?;
        self.links.get_mut(i as usize)
    }
}

impl Entries for Store {
    #[inline]
    fn links(&mut self, i: u32) -> Option<&mut Links> {
        self.links_of(i).map(|l| &mut l.wheel)
    }
    fn deadline(&self, i: u32) -> u64 {
        self.lines.get(i).map_or(u64::MAX, |f| f.expires)
    }
}

impl FlowEntry {
    /// The TCP state after a segment with `flags` going `outbound` (else in) and the idle
    /// timeout that then applies, in ms, without changing the flow.
    ///
    /// Without a branch on the protocol or the direction (mixed traffic draws both at random):
    /// the TCP state is worked out for every flow and kept only for a TCP one, and the
    /// timeout is picked among the protocols'.
    #[inline]
    pub fn next(&self, flags: u8, outbound: bool, t: &FlowTimeouts) -> (u8, u64) {
        use tcp_state::*;
        let s = self.tcp;
        let closed = (s & RST != 0) | (s & (OUT_FIN | IN_FIN) == OUT_FIN | IN_FIN);
        // A SYN on a closed 4-tuple: a new connection reuses it.
        let mut s = pick(closed & (flags & tcp_flags::SYN != 0), 0, s);
        s |= pick(outbound, OUT_SEEN, IN_SEEN);
        s |= pick(flags & tcp_flags::FIN != 0, pick(outbound, OUT_FIN, IN_FIN), 0);
        s |= pick(flags & tcp_flags::RST != 0, RST, 0);
        let tcp = self.proto == protocol::TCP;
        let s = pick(tcp, s, self.tcp);
        (s, self.timeout_in(s, t))
    }

    /// The idle timeout of this flow in TCP state `s`, in ms.
    #[inline(always)]
    pub fn timeout_in(&self, s: u8, t: &FlowTimeouts) -> u64 {
        use tcp_state::*;
        let established = (s & (OUT_SEEN | IN_SEEN) == OUT_SEEN | IN_SEEN)
            & (s & RST == 0)
            & (s & (OUT_FIN | IN_FIN) != OUT_FIN | IN_FIN);
        let tcp_timeout = pick(established, t.tcp_established, t.tcp_transitory);
        let other = pick(self.proto == protocol::UDP, t.udp, t.icmp_query);
        pick(self.proto == protocol::TCP, tcp_timeout, other)
    }

    /// When the flow's last packet came (ms): the deadline it set less the timeout it set.
    #[inline(always)]
    pub fn last(&self, t: &FlowTimeouts) -> u64 {
        self.expires.wrapping_sub(self.timeout_in(self.tcp, t))
    }

    /// Updates the TCP state with a segment's flags; returns the idle timeout that now
    /// applies, in ms.
    #[cfg(test)]
    pub fn touch(&mut self, flags: u8, outbound: bool, t: &FlowTimeouts) -> u64 {
        let (s, timeout) = self.next(flags, outbound, t);
        self.tcp = s;
        timeout
    }
}

/// The 128-bit product of `a` and `b`, its halves xored: the mixing step of foldhash and
/// wyhash (every output bit depends on every input bit).
#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

/// The seeded hash of a flow key (two addresses, protocol and ports): five words, three
/// folded multiplies, about 20 instructions. Seeded from the translator's randomness, so
/// nobody outside can aim keys at one probe run.
#[derive(Debug, Clone, Copy)]
struct FlowHasher([u64; 6]);

impl FlowHasher {
    fn new(seed: u64) -> FlowHasher {
        let mut words = ChaCha12Rng::seed_from_u64(seed);
        FlowHasher(std::array::from_fn(|_| words.next_u64()))
    }

    #[inline(always)]
    fn hash(&self, addr: Wide, partner: Wide, proto: u8, hp: u16, pp: u16) -> u64 {
        let s = &self.0;
        let ([a0, a1], [p0, p1]) = (addr.words(), partner.words());
        let ports = (u64::from(proto) << 32) | (u64::from(hp) << 16) | u64::from(pp);
        let x = folded_multiply(a0 ^ s[0], p0 ^ s[1]);
        let y = folded_multiply(a1 ^ s[2], p1 ^ s[3]);
        folded_multiply(x ^ s[4], y ^ ports ^ s[5])
    }
}

/// The flow table.
pub struct FlowTable {
    store: Store,
    /// The inbound index, then the outbound one (`indexes[outbound as usize]`).
    indexes: [Index; 2],
    hasher: FlowHasher,
    wheel: Wheel,
}

impl FlowTable {
    /// A table for at most `cap` flows, its memory reserved up front (the indexes never
    /// grow nor rehash).
    pub fn new(cap: usize, hash_seed: u64) -> FlowTable {
        FlowTable {
            store: Store { lines: Slab::with_capacity(cap), links: Vec::with_capacity(cap) },
            indexes: [Index::with_capacity(cap), Index::with_capacity(cap)],
            hasher: FlowHasher::new(hash_seed),
            wheel: Wheel::new(),
        }
    }

    /// The flow of a packet: outbound `addr` is the host's real address (`real` →
    /// `partner`), inbound the virtual one (`partner` → `virt`); `h` is the key's
    /// [`FlowTable::hash`].
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn find(
        &self,
        outbound: bool,
        h: u64,
        addr: Wide,
        partner: Wide,
        proto: u8,
        hp: u16,
        pp: u16,
    ) -> Option<u32> {
        let lines = &self.store.lines;
        let eq = |i: u32| {
            lines.peek(i).is_some_and(|f| {
                Wide::select(outbound, f.real, f.virt) == addr
                    && f.partner == partner
                    && f.host_port == hp
                    && f.partner_port == pp
                    && f.proto == proto
            })
        };
        self.index(outbound).find(h, eq)
    }

    /// The index of a direction's keys.
    #[inline(always)]
    fn index(&self, outbound: bool) -> &Index {
        &self.indexes[usize::from(outbound)]
    }

    /// The hash both indexes file a flow key under.
    #[inline]
    pub fn hash(&self, addr: Wide, partner: Wide, proto: u8, hp: u16, pp: u16) -> u64 {
        self.hasher.hash(addr, partner, proto, hp, pp)
    }

    /// Prefetch, stage 1: the slot where a lookup of `hash` starts, in the outbound index
    /// or the inbound one.
    #[inline]
    pub fn prefetch_slot(&self, hash: u64, outbound: bool) {
        prefetch(self.index(outbound).home(hash));
    }

    /// Prefetch, stage 2 (once the slot is in the cache): the packet line of the flow the
    /// slot most likely names.
    #[inline]
    pub fn prefetch_flow(&self, hash: u64, outbound: bool) {
        let guess = self.index(outbound).guess(hash);
        if let Some(f) = guess.and_then(|i| self.store.lines.peek(i)) {
            prefetch(f);
        }
    }

    /// Refreshes flow `i` (an index [`FlowTable::find`] just returned) with a packet: its
    /// TCP flags and direction, its idle deadline from `now`. Returns the real and virtual
    /// addresses and the delta between them.
    ///
    /// Only the packet line is read and written, unless the deadline moves earlier (a TCP
    /// flow closing, or a flow's first packet): a flow sits in the wheel slot of a deadline
    /// no later than its own (or the next one to come up), so a later deadline never needs
    /// the wheel, which moves the flow when its slot comes up.
    #[inline]
    pub fn touch(
        &mut self,
        i: u32,
        flags: u8,
        outbound: bool,
        now: u64,
        t: &FlowTimeouts,
    ) -> Option<(Wide, Wide, Delta)> {
        self.touch_if(i, flags, outbound, now, t, None)
    }

    /// [`FlowTable::touch`] for the fast path, which may only refresh a flow whose lease's
    /// stored life covers the refresh (see [`super::life`]): unless `life_shift` is `None`
    /// (no life is kept), the flow's last packet must have come in the current checkpoint
    /// period (`now >> life_shift`, the first packet of a period takes the general path)
    /// and this packet must not change its timeout (a TCP handshake completing, or a
    /// connection closing). `None`, with nothing changed, otherwise.
    #[inline]
    pub fn touch_if(
        &mut self,
        i: u32,
        flags: u8,
        outbound: bool,
        now: u64,
        t: &FlowTimeouts,
        life_shift: Option<u32>,
    ) -> Option<(Wide, Wide, Delta)> {
        // No occupancy check: the indexes only name occupied slots.
        let f = self.store.lines.peek_mut(i)?;
        let (s, timeout) = f.next(flags, outbound, t);
        if let Some(shift) = life_shift {
            let before = f.timeout_in(f.tcp, t);
            if (f.last(t) >> shift != now >> shift) | (timeout != before) {
                return None;
            }
        }
        f.tcp = s;
        let expires = now.saturating_add(timeout);
        let earlier = expires < f.expires;
        f.expires = expires;
        let out = (f.real, f.virt, f.delta);
        if earlier {
            self.wheel.advance(&mut self.store, i, expires);
        }
        Some(out)
    }

    /// Gives every flow the timeout of `new` for its state, counted from its last packet as
    /// before (the flow's deadline under `old` less the timeout `old` gave it).
    pub fn retime(&mut self, old: &FlowTimeouts, new: &FlowTimeouts) {
        let live: Vec<u32> = self.store.lines.iter().map(|(i, _)| i).collect();
        for i in live {
            let Some(f) = self.store.lines.get_mut(i) else { continue };
            if f.expires == super::NEVER {
                continue;
            }
            let expires = f.last(old).saturating_add(f.timeout_in(f.tcp, new));
            let earlier = expires < f.expires;
            f.expires = expires;
            if earlier {
                self.wheel.advance(&mut self.store, i, expires);
            }
        }
    }

    /// Flow `i`'s last packet time, idle deadline and current timeout, in ms.
    pub fn timing(&self, i: u32, t: &FlowTimeouts) -> Option<(u64, u64, u64)> {
        let f = self.store.lines.get(i)?;
        Some((f.last(t), f.expires, f.timeout_in(f.tcp, t)))
    }

    /// The idle timeout a packet with `flags` going `outbound` would give flow `i`, and the
    /// one it has now, in ms.
    pub fn timeout_after(
        &self,
        i: u32,
        flags: u8,
        outbound: bool,
        t: &FlowTimeouts,
    ) -> Option<(u64, u64)> {
        let f = self.store.lines.get(i)?;
        Some((f.next(flags, outbound, t).1, f.timeout_in(f.tcp, t)))
    }

    /// Flow `i`'s lease and idle deadline.
    pub fn owner(&self, i: u32) -> Option<(u32, u64)> {
        let f = self.store.lines.get(i)?;
        Some((self.store.links.get(i as usize)?.lease, f.expires))
    }

    /// Pushes the flows idle by `now` to `due` (still in the table).
    pub fn expire(&mut self, now: u64, due: &mut Vec<u32>) {
        self.wheel.expire(&mut self.store, now, due);
    }

    /// The earliest moment a flow may be due.
    pub fn next_deadline(&self) -> Option<u64> {
        self.wheel.next_deadline()
    }

    /// Creates a flow of `lease` (slab index `lease_idx`) and links it into the lease's list.
    pub fn insert(
        &mut self,
        lease_idx: u32,
        lease: &mut LeaseEntry,
        proto: u8,
        host_port: u16,
        partner_port: u16,
    ) -> Result<u32, DropReason> {
        let entry = FlowEntry {
            real: wide(lease.real),
            virt: wide(lease.virt),
            partner: wide(lease.partner),
            expires: super::NEVER,
            host_port,
            partner_port,
            delta: lease.delta,
            proto,
            tcp: 0,
        };
        let links = FlowLinks {
            lease: lease_idx,
            prev: NIL,
            next: lease.flow_head,
            wheel: Links::default(),
        };
        let (i, _) = self.store.lines.insert(entry).map_err(|_| DropReason::FlowTableFull)?;
        // The slab hands out new slots in order, so a new one is the next link slot.
        match self.store.links.get_mut(i as usize) {
            Some(l) => *l = links,
            None => self.store.links.push(links),
        }
        if let Some(head) = self.store.links_of(lease.flow_head) {
            head.prev = i;
        }
        lease.flow_head = i;
        lease.flows += 1;
        let Some(f) = self.store.lines.get(i) else { return Err(DropReason::FlowTableFull) };
        let ho = self.hasher.hash(f.real, f.partner, proto, host_port, partner_port);
        let hi = self.hasher.hash(f.virt, f.partner, proto, host_port, partner_port);
        // Both indexes have a free slot for every free slab slot, so neither refuses.
        let [inb, out] = &mut self.indexes;
        out.insert(ho, i);
        inb.insert(hi, i);
        Ok(i)
    }

    /// Removes flow `i`, unlinking it from `lease` (which must be its owner).
    pub fn remove(&mut self, i: u32, lease: &mut LeaseEntry) -> Option<FlowEntry> {
        self.wheel.cancel(&mut self.store, i);
        let f = self.store.lines.get(i)?.clone();
        let l = *self.store.links_of(i)?;
        let ho = self.hasher.hash(f.real, f.partner, f.proto, f.host_port, f.partner_port);
        let hi = self.hasher.hash(f.virt, f.partner, f.proto, f.host_port, f.partner_port);
        let [inb, out] = &mut self.indexes;
        out.remove(ho, i);
        inb.remove(hi, i);
        if let Some(p) = self.store.links_of(l.prev) {
            p.next = l.next;
        } else {
            lease.flow_head = l.next;
        }
        if let Some(n) = self.store.links_of(l.next) {
            n.prev = l.prev;
        }
        lease.flows = lease.flows.saturating_sub(1);
        self.store.lines.remove(i)
    }

    /// The next flow in its lease's list.
    pub fn next_of(&self, i: u32) -> u32 {
        self.store.lines.get(i).and(self.store.links.get(i as usize)).map_or(NIL, |l| l.next)
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.store.lines.len()
    }

    /// Bytes reserved by the table.
    pub fn allocation_size(&self) -> usize {
        self.store.lines.allocation_size()
            + self.store.links.capacity() * std::mem::size_of::<FlowLinks>()
            + self.indexes.iter().map(Index::allocation_size).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::tcp_state::*;
    use super::*;

    fn flow(proto: u8) -> FlowEntry {
        FlowEntry { proto, ..FlowEntry::default() }
    }

    #[test]
    fn tcp_timeouts_follow_the_handshake_and_close() {
        let t = FlowTimeouts::from(&Timeouts::default());
        let (est, trans) = (7_440_000, 240_000);
        let mut f = flow(protocol::TCP);
        assert_eq!(f.touch(tcp_flags::SYN, true, &t), trans);
        assert_eq!(f.touch(tcp_flags::SYN | tcp_flags::ACK, false, &t), est);
        assert_eq!(f.touch(tcp_flags::ACK, true, &t), est);
        assert_eq!(f.touch(tcp_flags::FIN | tcp_flags::ACK, true, &t), est, "half close");
        assert_eq!(f.touch(tcp_flags::FIN | tcp_flags::ACK, false, &t), trans);
        // A new SYN on the same 4-tuple starts over.
        assert_eq!(f.touch(tcp_flags::SYN, true, &t), trans);
        assert_eq!(f.tcp, OUT_SEEN);
        assert_eq!(f.touch(tcp_flags::SYN | tcp_flags::ACK, false, &t), est);
        assert_eq!(f.touch(tcp_flags::RST, false, &t), trans, "RFC 7857 §3.2");
    }

    #[test]
    fn udp_and_icmp_timeouts() {
        let t = FlowTimeouts::from(&Timeouts::default());
        assert_eq!(flow(protocol::UDP).touch(0, true, &t), 300_000);
        assert_eq!(flow(protocol::ICMP).touch(0, true, &t), 60_000);
        assert_eq!(flow(protocol::ICMPV6).touch(0, false, &t), 60_000);
    }
}
