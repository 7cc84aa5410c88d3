//! The packet path: `translate(packet, now) -> Verdict`.
//!
//! Direction comes from the addresses: a source in a served prefix goes out (source
//! real → virtual), a destination in a pool comes in (destination virtual → real), both at once
//! is a hairpin (RFC 4787 REQ-9: the other host sees our virtual address as source). Every
//! rewrite updates the IPv4 header checksum and the transport checksum incrementally with the
//! lease's precomputed delta (RFC 1624); ICMP errors get their embedded packet translated the
//! other way (RFC 5508 REQ-3..5) and their ICMP checksum recomputed after verification.

use super::fast::Fast;
use super::{Direction, DropReason, Filtering, Origin, Translator, Verdict, NEVER};
use crate::wire::vnet::Checksum;
use crate::wire::{
    self, addr_delta, checksum, ipv4, narrow, pick, protocol, read_u16, wide, write_addr,
    write_u16, Datagram, Delta, Fragment, Transport, Wide,
};
use std::net::IpAddr;
use std::time::Instant;

/// Offset of an ICMP error's embedded packet from the start of the ICMP header.
const ICMP_EMBEDDED: usize = 8;

/// Packets between the stages of [`Translator::translate_batch`]: enough translations to
/// cover a load from memory. On the benchmark's DRAM-sized replay 8 beat 4, 6, 12 and 16
/// (and processing the batch in groups, each stage over the whole group, by 5 to 10 %).
const STAGE_GAP: usize = 8;

/// Packets a batch keeps between its first stage and its last (more than `2 × STAGE_GAP`;
/// a power of two, so the position in the ring is a mask).
const RING: usize = 4 * STAGE_GAP;

impl Translator {
    /// Translates one packet in place.
    ///
    /// `Forward`: the buffer now holds the rewritten packet (same length). `Drop`: counted.
    /// `Reply`: counted as a drop, and the returned bytes are an ICMP error for the sender.
    pub fn translate<'a>(&'a mut self, packet: &mut [u8], now: Instant) -> Verdict<'a> {
        self.translate_with(packet, Checksum::Full, now)
    }

    /// Translates one packet whose transport checksum may be partial (read from a TUN device
    /// with offloads, see [`crate::wire::vnet`]): a partial checksum gets the pseudo-header
    /// update only ([`Delta::apply_partial`]), which is all a super-packet needs. A partial
    /// checksum anywhere but at the packet's TCP or UDP checksum is a `BadOffload` drop.
    pub fn translate_with<'a>(
        &'a mut self,
        packet: &mut [u8],
        csum: Checksum,
        now: Instant,
    ) -> Verdict<'a> {
        let now_ms = self.packet_ms(now);
        let fast = match csum {
            Checksum::Full => {
                self.fast_key(packet).and_then(|f| self.forward_fast(packet, &f, now_ms))
            }
            Checksum::Partial { .. } => None,
        };
        self.verdict_of(packet, fast, csum, now_ms)
    }

    /// The verdict on a packet the fast path forwarded (`fast` says whether it went out,
    /// else in), counted without a branch on the direction; or, when it did not (`None`),
    /// the general path's.
    #[inline(always)]
    fn verdict_of<'a>(
        &'a mut self,
        packet: &mut [u8],
        fast: Option<bool>,
        csum: Checksum,
        now_ms: u64,
    ) -> Verdict<'a> {
        match fast {
            Some(outbound) => {
                self.counters.outbound += u64::from(outbound);
                self.counters.inbound += u64::from(!outbound);
                Verdict::Forward(if outbound { Direction::Outbound } else { Direction::Inbound })
            }
            None => {
                let routed = self.route_full(packet, csum, now_ms);
                self.conclude(packet, routed, now_ms)
            }
        }
    }

    /// [`Translator::translate`] without the fast path: every packet parsed in full and
    /// routed by the general code. The fast path must be indistinguishable from it; the
    /// property tests hold the two together, and the benchmark can measure both.
    pub fn translate_without_fast_path<'a>(
        &'a mut self,
        packet: &mut [u8],
        now: Instant,
    ) -> Verdict<'a> {
        let now_ms = self.packet_ms(now);
        let routed = self.route_full(packet, Checksum::Full, now_ms);
        self.conclude(packet, routed, now_ms)
    }

    /// The general path: parse in full, then route. Kept out of line, so the fast path's
    /// callers stay small.
    #[inline(never)]
    fn route_full(
        &mut self,
        packet: &mut [u8],
        csum: Checksum,
        now: u64,
    ) -> Result<Direction, Stop> {
        match wire::parse(packet) {
            Ok(d) => self.route(packet, d, csum, now),
            Err(e) => Err(e.into()),
        }
    }

    /// Counts a packet's outcome and makes its verdict. A forwarded packet gets back the hop
    /// the kernel takes from it once too often ([`wire::restore_hop`], as the fast path's
    /// [`patch_plain`] does); others are left as they are.
    #[inline]
    fn conclude<'a>(
        &'a mut self,
        packet: &mut [u8],
        routed: Result<Direction, Stop>,
        now_ms: u64,
    ) -> Verdict<'a> {
        match routed {
            Ok(dir) => {
                restore_hop(packet);
                match dir {
                    Direction::Outbound => self.counters.outbound += 1,
                    Direction::Inbound => self.counters.inbound += 1,
                    Direction::Hairpin => self.counters.hairpinned += 1,
                }
                Verdict::Forward(dir)
            }
            Err(Stop::Hold) => {
                self.counters.held += 1;
                Verdict::Hold
            }
            Err(Stop::Pass) => {
                self.counters.passed += 1;
                Verdict::Pass
            }
            Err(Stop::Drop(reason)) => {
                self.counters.drops[reason as usize] += 1;
                if reason.wants_reply() {
                    if let Some(n) = self.build_reply(packet, now_ms) {
                        return Verdict::Reply(reason, &self.reply_buf[..n]);
                    }
                }
                Verdict::Drop(reason)
            }
        }
    }

    /// Translates `packets` in order, exactly as [`Translator::translate`] on each one would,
    /// handing each verdict to `verdict` with the packet's position in the batch.
    ///
    /// On a flow table bigger than the cache a translation mostly waits for two dependent
    /// loads (the index slot, then the flow). A batch starts them early: the slot
    /// `2 × STAGE_GAP` packets ahead, the flow it names `STAGE_GAP` ahead. Those stages only
    /// read and prefetch, so a guess made stale by an earlier packet of the batch (a flow it
    /// created) costs a cache miss, never a wrong answer.
    pub fn translate_batch(
        &mut self,
        packets: &mut [&mut [u8]],
        now: Instant,
        mut verdict: impl FnMut(usize, Verdict<'_>),
    ) {
        let mut staged: [Option<Fast>; RING] = [None; RING];
        let now_ms = self.packet_ms(now);
        let n = packets.len();
        for i in 0..n + 2 * STAGE_GAP {
            if let Some(p) = packets.get(i) {
                let f = self.fast_key(p);
                if let Some(f) = &f {
                    self.flows.prefetch_slot(f.hash, f.outbound);
                }
                staged[i % RING] = f;
            }
            if let Some(j) = i.checked_sub(STAGE_GAP).filter(|&j| j < n) {
                if let Some(f) = &staged[j % RING] {
                    self.flows.prefetch_flow(f.hash, f.outbound);
                }
            }
            let Some(j) = i.checked_sub(2 * STAGE_GAP) else { continue };
            let Some(p) = packets.get_mut(j) else { continue };
            // The key stage 1 read is still the packet's (only its own translation writes to
            // it) and depends on no table, so it is reused.
            let fast = staged[j % RING].as_ref().and_then(|f| self.forward_fast(p, f, now_ms));
            verdict(j, self.verdict_of(p, fast, Checksum::Full, now_ms));
        }
    }

    /// Translates a parsed packet.
    fn route(
        &mut self,
        pkt: &mut [u8],
        mut d: Datagram,
        csum: Checksum,
        now: u64,
    ) -> Result<Direction, Stop> {
        if let Checksum::Partial { at } = csum {
            if !matches!(d.protocol, protocol::TCP | protocol::UDP)
                || d.pseudo_checksum_offset() != Some(at)
            {
                return Err(DropReason::BadOffload.into());
            }
            d.partial_checksum = true;
        }
        if let Transport::IcmpError { .. } = d.transport {
            return self.route_error(pkt, &d);
        }
        let way =
            Way::of(self.lan.contains(d.src), self.lan.contains(d.dst), self.pool.contains(d.dst));
        match way {
            Way::Out => {
                self.outbound(pkt, &d, now)?;
                Ok(Direction::Outbound)
            }
            Way::In => {
                self.inbound(pkt, &d, now)?;
                Ok(Direction::Inbound)
            }
            Way::Hairpin => {
                // If the second leg refuses, the sender must get its packet back as it sent it
                // (an ICMP error quotes it, and goes to its real address).
                let saved = &mut self.hairpin_scratch[..d.len];
                saved.copy_from_slice(&pkt[..d.len]);
                let virt = self.outbound(pkt, &d, now)?;
                if let Err(e) = self.inbound(pkt, &Datagram { src: virt, ..d }, now) {
                    pkt[..d.len].copy_from_slice(&self.hairpin_scratch[..d.len]);
                    return Err(e);
                }
                Ok(Direction::Hairpin)
            }
            Way::Pass => Err(Stop::Pass),
        }
    }

    /// ICMP errors go where their embedded packet says, whoever sent them (a host, a router
    /// on either side, or the gateway box itself): about a packet that left under a virtual
    /// address → back to the host; about a packet delivered to a host → out under the
    /// virtual address its partner knows; both → a hairpin. Never creates or refreshes state
    /// (RFC 5508 REQ-6).
    fn route_error(&mut self, pkt: &mut [u8], d: &Datagram) -> Result<Direction, Stop> {
        let e = self.embedded(pkt, d)?;
        if e.src != d.dst {
            // An error goes back to the sender of the packet it quotes.
            return Err(DropReason::IcmpErrorMalformed.into());
        }
        match (self.pool.contains(e.src), self.lan.contains(e.dst)) {
            (true, false) => {
                self.inbound_error(pkt, d, &e)?;
                Ok(Direction::Inbound)
            }
            (false, true) => {
                self.outbound_error(pkt, d, &e)?;
                Ok(Direction::Outbound)
            }
            (true, true) => {
                self.hairpin_scratch[..d.len].copy_from_slice(&pkt[..d.len]);
                let virt = self.outbound_error(pkt, d, &e)?;
                let d2 = Datagram { src: virt, ..*d };
                let second = wire::parse_embedded(&pkt[d.l4 + ICMP_EMBEDDED..d.len])
                    .map_err(|_| Stop::Drop(DropReason::IcmpErrorMalformed))
                    .and_then(|e2| self.inbound_error(pkt, &d2, &e2));
                if let Err(stop) = second {
                    pkt[..d.len].copy_from_slice(&self.hairpin_scratch[..d.len]);
                    return Err(stop);
                }
                Ok(Direction::Hairpin)
            }
            (false, false) => Err(Stop::Pass),
        }
    }

    /// Host → partner. Returns the virtual source written.
    fn outbound(&mut self, pkt: &mut [u8], d: &Datagram, now: u64) -> Result<IpAddr, Stop> {
        translatable(d)?;
        if !super::is_unicast(d.dst) {
            return Err(Stop::Pass);
        }
        let Some(k) = FlowKey::of(d, true) else {
            // A later fragment: no ports, so the lease alone (RFC 4787 REQ-14: it may come
            // first and make the lease).
            let li = self.lease_out(d.src, d.dst, false, now)?;
            self.hold_unless_durable(li)?;
            let l = self.leases.get(li).ok_or(DropReason::NoLease)?;
            let (virt, delta) = (l.virt, l.delta);
            rewrite(pkt, d, d.src_offset(), wide(virt), delta);
            return Ok(virt);
        };
        let fi = self.flow_of(d, k, true, now)?;
        self.cover_flow(fi, k.flags, true, now)?;
        let (_, virt, delta) = self.touch_flow(fi, k.flags, true, now)?;
        rewrite(pkt, d, d.src_offset(), virt, delta);
        Ok(narrow(virt, d.is_v4()))
    }

    /// Partner → host.
    fn inbound(&mut self, pkt: &mut [u8], d: &Datagram, now: u64) -> Result<(), Stop> {
        translatable(d)?;
        let Some(k) = FlowKey::of(d, false) else {
            let li = self.lease_in(d.dst, d.src, false, now)?;
            self.hold_unless_durable(li)?;
            let l = self.leases.get(li).ok_or(DropReason::NoLease)?;
            let (real, delta) = (l.real, l.delta.negate());
            rewrite(pkt, d, d.dst_offset(), wide(real), delta);
            return Ok(());
        };
        let fi = self.flow_of(d, k, false, now)?;
        self.cover_flow(fi, k.flags, false, now)?;
        let (real, _, delta) = self.touch_flow(fi, k.flags, false, now)?;
        rewrite(pkt, d, d.dst_offset(), real, delta.negate());
        Ok(())
    }

    /// The flow of `d` (key `k`), made with its lease when there is none.
    fn flow_of(&mut self, d: &Datagram, k: FlowKey, outbound: bool, now: u64) -> Result<u32, Stop> {
        let (addr, partner) = ends(d, outbound);
        let (a, p) = (wide(addr), wide(partner));
        let h = self.flows.hash(a, p, k.proto, k.host_port, k.partner_port);
        if let Some(fi) = self.flows.find(outbound, h, a, p, k.proto, k.host_port, k.partner_port) {
            return Ok(fi);
        }
        let li = if outbound {
            self.lease_out(addr, partner, true, now)?
        } else {
            self.lease_in(addr, partner, true, now)?
        };
        // The life the new flow needs goes to the store with a new lease, in one commit.
        let covered = self.cover(li, self.flow_timeouts.first(k.proto, k.flags, outbound), now);
        self.hold_unless_durable(li)?;
        covered?;
        Ok(self.new_flow(li, k, now)?)
    }

    /// Flows are only made for durable leases: until its lease is, a packet waits.
    fn hold_unless_durable(&self, li: u32) -> Result<(), Stop> {
        if self.is_durable(li) {
            Ok(())
        } else {
            Err(Stop::Hold)
        }
    }

    /// The lease for `real` → `partner`, made implicitly when there is none.
    fn lease_out(
        &mut self,
        real: IpAddr,
        partner: IpAddr,
        with_flow: bool,
        now: u64,
    ) -> Result<u32, DropReason> {
        match self.leases.find_out(real, partner) {
            Some(i) => Ok(i),
            None => {
                let expires = self.implicit_expiry(with_flow, now);
                self.create_lease(real, partner, None, Origin::Implicit, now, expires)
            }
        }
    }

    /// The lease `sender` reaches through `virt`, subject to filtering.
    fn lease_in(
        &mut self,
        virt: IpAddr,
        sender: IpAddr,
        with_flow: bool,
        now: u64,
    ) -> Result<u32, DropReason> {
        match self.leases.find_in(virt, sender) {
            Some(i) => Ok(i),
            None => self.admit(virt, sender, with_flow, now),
        }
    }

    /// A sender that is not a partner of `virt`: refused under `partner` filtering; under
    /// `any`, given a lease of its own to the host behind `virt` (when exactly one host is).
    fn admit(
        &mut self,
        virt: IpAddr,
        sender: IpAddr,
        with_flow: bool,
        now: u64,
    ) -> Result<u32, DropReason> {
        let held = self.leases.on_virtual(virt).next().is_some();
        let refused = if held { DropReason::Filtered } else { DropReason::NoLease };
        if self.config.filtering == Filtering::Partner {
            return Err(refused);
        }
        let host = self.leases.sole_host(virt).ok_or(refused)?;
        if self.leases.find_out(host, sender).is_some() {
            // The host already reaches this sender under another virtual address; letting
            // this one in would give the two directions different addresses.
            return Err(DropReason::Filtered);
        }
        let expires = self.implicit_expiry(with_flow, now);
        self.create_lease(host, sender, Some(virt), Origin::Implicit, now, expires)
    }

    /// The expiry of a new implicit lease: none while the flow about to be made lives, else
    /// the idle time (a later fragment that arrived first has no flow yet).
    fn implicit_expiry(&self, with_flow: bool, now: u64) -> u64 {
        if with_flow {
            NEVER
        } else {
            now.saturating_add(self.lease_idle_ms)
        }
    }

    /// Makes a flow of lease `li`.
    fn new_flow(&mut self, li: u32, k: FlowKey, now: u64) -> Result<u32, DropReason> {
        let lease = self.leases.get_mut(li).ok_or(DropReason::NoLease)?;
        let real = lease.real;
        let made = self
            .hosts
            .may_flow(real)
            .and_then(|()| self.flows.insert(li, lease, k.proto, k.host_port, k.partner_port));
        match made {
            Ok(fi) => {
                if lease.origin == Origin::Implicit {
                    lease.expires = NEVER;
                }
                self.hosts.add(real, 0, 1);
                self.counters.flows_created += 1;
                Ok(fi)
            }
            Err(e) => {
                // A lease made for this packet must not outlive it without a flow.
                self.idle_lease(li, now);
                Err(e)
            }
        }
    }

    /// Refreshes flow `fi` with a packet's TCP flags; returns its real and virtual addresses
    /// and the checksum delta between them.
    #[inline]
    fn touch_flow(
        &mut self,
        fi: u32,
        flags: u8,
        outbound: bool,
        now: u64,
    ) -> Result<(Wide, Wide, Delta), DropReason> {
        self.flows.touch(fi, flags, outbound, now, &self.flow_timeouts).ok_or(DropReason::NoLease)
    }

    /// An ICMP error from a host about a packet it got from a partner: the embedded packet's
    /// destination (the host) becomes the virtual address the partner knows. Never creates
    /// or refreshes state (RFC 5508 REQ-6).
    ///
    /// The outer source is rewritten too when it is a served address (the host, a router in
    /// the LAN, or the gateway's own LAN address): nothing of the LAN shows outside. Another
    /// source (the gateway's WAN address) is left: it is a router on the path.
    fn outbound_error(
        &mut self,
        pkt: &mut [u8],
        d: &Datagram,
        e: &Datagram,
    ) -> Result<IpAddr, Stop> {
        let li = self.leases.find_out(e.dst, e.src).ok_or(DropReason::IcmpErrorNoLease)?;
        self.hold_unless_durable(li)?;
        let l = self.leases.get(li).ok_or(DropReason::IcmpErrorNoLease)?;
        let (virt, delta) = (l.virt, l.delta);
        let base = d.l4 + ICMP_EMBEDDED;
        rewrite_embedded(pkt, base, e, e.dst_offset(), virt, delta);
        if self.lan.contains(d.src) {
            let outer = if d.src == e.dst { delta } else { addr_delta(d.src, virt) };
            rewrite_ip_only(pkt, d, d.src_offset(), virt, outer);
        }
        fill_icmp_checksum(pkt, d);
        self.counters.icmp_errors_translated += 1;
        Ok(virt)
    }

    /// An ICMP error (from the partner or any router on the way) about a packet a host sent
    /// under a virtual address: the embedded source and the outer destination go back to the
    /// host's real address. No filtering on the outer source: the embedded packet must match a
    /// lease (RFC 5508 REQ-4).
    fn inbound_error(&mut self, pkt: &mut [u8], d: &Datagram, e: &Datagram) -> Result<(), Stop> {
        let li = self.leases.find_in(e.src, e.dst).ok_or(DropReason::IcmpErrorNoLease)?;
        self.hold_unless_durable(li)?;
        let l = self.leases.get(li).ok_or(DropReason::IcmpErrorNoLease)?;
        let (real, delta) = (l.real, l.delta.negate());
        let base = d.l4 + ICMP_EMBEDDED;
        rewrite_embedded(pkt, base, e, e.src_offset(), real, delta);
        rewrite_ip_only(pkt, d, d.dst_offset(), real, delta);
        fill_icmp_checksum(pkt, d);
        self.counters.icmp_errors_translated += 1;
        Ok(())
    }

    /// Checks an ICMP error and parses its embedded packet.
    fn embedded(&self, pkt: &[u8], d: &Datagram) -> Result<Datagram, DropReason> {
        if d.fragment != Fragment::Whole {
            return Err(DropReason::IcmpErrorMalformed);
        }
        if icmp_sum(pkt, d) != 0xffff {
            return Err(DropReason::IcmpBadChecksum);
        }
        let inner = pkt.get(d.l4 + ICMP_EMBEDDED..d.len).ok_or(DropReason::IcmpErrorMalformed)?;
        let e = wire::parse_embedded(inner).map_err(|_| DropReason::IcmpErrorMalformed)?;
        if e.is_v4() != d.is_v4() || matches!(e.transport, Transport::IcmpError { .. }) {
            return Err(DropReason::IcmpErrorMalformed);
        }
        Ok(e)
    }
}

/// Refuses what the translator does not forward: ICMP types other than echo and the errors
/// (RFC 5508 REQ-11), protocols other than TCP, UDP and ICMP.
#[inline]
fn translatable(d: &Datagram) -> Result<(), DropReason> {
    match d.transport {
        Transport::IcmpOther => Err(DropReason::IcmpUnsupported),
        Transport::Other => Err(DropReason::UnsupportedProtocol),
        _ => Ok(()),
    }
}

/// Why a packet was not translated: a counted drop, a wait for durability, or none of our
/// business.
pub(super) enum Stop {
    Drop(DropReason),
    Hold,
    Pass,
}

impl From<DropReason> for Stop {
    fn from(r: DropReason) -> Stop {
        Stop::Drop(r)
    }
}

impl From<crate::wire::Error> for Stop {
    fn from(e: crate::wire::Error) -> Stop {
        Stop::Drop(e.into())
    }
}

/// Which way a packet goes, from where its addresses lie (the table in
/// docs/architecture.md); ICMP errors go by the packet they quote instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Way {
    /// From a served host to elsewhere.
    Out,
    /// From elsewhere to a pool address.
    In,
    /// From a served host to a pool address (RFC 4787 REQ-9).
    Hairpin,
    /// None of ours (lan to lan, or neither end served): untouched.
    Pass,
}

impl Way {
    /// The way of a packet whose source is or is not served, and whose destination is or is
    /// not served and is or is not in the pool.
    #[inline]
    pub(super) fn of(src_in_lan: bool, dst_in_lan: bool, dst_in_pool: bool) -> Way {
        match Way::bits(src_in_lan, dst_in_lan, dst_in_pool) {
            (true, _, _) => Way::Out,
            (_, true, _) => Way::In,
            (_, _, true) => Way::Hairpin,
            _ => Way::Pass,
        }
    }

    /// [`Way::of`] as three bits, out, in and hairpin (none: pass), computed without a
    /// branch for the fast path.
    #[inline(always)]
    pub(super) fn bits(
        src_in_lan: bool,
        dst_in_lan: bool,
        dst_in_pool: bool,
    ) -> (bool, bool, bool) {
        let from_host = src_in_lan & !dst_in_lan;
        (from_host & !dst_in_pool, !src_in_lan & dst_in_pool, from_host & dst_in_pool)
    }
}

/// What identifies a flow within its lease.
#[derive(Debug, Clone, Copy)]
pub(super) struct FlowKey {
    pub proto: u8,
    pub host_port: u16,
    pub partner_port: u16,
    pub flags: u8,
}

impl FlowKey {
    #[inline]
    fn of(d: &Datagram, outbound: bool) -> Option<FlowKey> {
        FlowKey::new(d.protocol, d.transport, outbound)
    }

    /// The key of a `proto` packet with this transport header going `outbound` (or in):
    /// the ports (the echo identifier as the host's) and the TCP flags. `None` for what has
    /// no flow (a later fragment, an ICMP error or other message, another protocol).
    #[inline(always)]
    pub(super) fn new(proto: u8, t: Transport, outbound: bool) -> Option<FlowKey> {
        let (src, dst, flags) = match t {
            Transport::Tcp { src_port, dst_port, flags } => (src_port, dst_port, flags),
            Transport::Udp { src_port, dst_port } => (src_port, dst_port, 0),
            Transport::Echo { ident, .. } => (ident, 0, 0),
            _ => return None,
        };
        Some(FlowKey::from_ports(proto, src, dst, flags, outbound))
    }

    /// The key of a TCP, UDP or echo packet with these ports (an echo: its identifier and 0)
    /// and flags: the host's port is the source port outbound and the destination port
    /// inbound, but an echo's identifier is the host's both ways. Without a branch.
    #[inline(always)]
    pub(super) fn from_ports(proto: u8, src: u16, dst: u16, flags: u8, outbound: bool) -> FlowKey {
        let as_sent = outbound | (proto == protocol::ICMP) | (proto == protocol::ICMPV6);
        FlowKey {
            proto,
            host_port: pick(as_sent, src, dst),
            partner_port: pick(as_sent, dst, src),
            flags,
        }
    }
}

/// Writes `new` at address field `at` and updates the IPv4 header checksum and the transport
/// checksum (when this datagram carries one that covers the addresses).
fn rewrite(pkt: &mut [u8], d: &Datagram, at: usize, new: Wide, delta: Delta) {
    let sum = d.pseudo_checksum_offset();
    patch(pkt, d.is_v4(), at, new, sum, d.protocol, d.partial_checksum, delta);
}

/// [`rewrite`] from the parts of a datagram it needs: `sum` is the offset of the transport
/// checksum that covers the address (if any), `partial` says it holds a partial sum.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn patch(
    pkt: &mut [u8],
    v4: bool,
    at: usize,
    new: Wide,
    sum: Option<usize>,
    proto: u8,
    partial: bool,
    delta: Delta,
) {
    if v4 {
        pkt[at..at + 4].copy_from_slice(&new.v4_octets());
        let c = read_u16(pkt, ipv4::CHECKSUM_OFFSET);
        write_u16(pkt, ipv4::CHECKSUM_OFFSET, delta.apply(c));
    } else {
        pkt[at..at + 16].copy_from_slice(&new.octets());
    }
    if let Some(c) = sum {
        if partial {
            write_u16(pkt, c, delta.apply_partial(read_u16(pkt, c)));
        } else {
            update_l4_checksum(pkt, c, proto, delta);
        }
    }
}

/// Byte offset of the 16 bytes [`patch_plain`] rewrites in an IPv4 header: they hold both
/// addresses.
const V4_ADDRESSES: usize = 4;

/// [`patch`] for a packet of the fast path (plain headers, a whole checksum, a `proto` of
/// TCP, UDP, ICMP or ICMPv6): rewrites its source address (`outbound`) or its destination
/// address with `new`, adds 1 to its TTL or hop limit ([`wire::restore_hop`]), then updates
/// its IPv4 header checksum (by `delta` and the TTL's change) and its transport checksum if
/// that covers the addresses (by `delta`). Without a branch on the family, the direction or the
/// protocol (see [`wire::pick`]): the address is written as a 16-byte window, IPv6's address
/// or the IPv4 header's two, whose other bytes are written back as they were; so are the
/// checksums that do not change.
#[inline(always)]
pub(super) fn patch_plain(
    pkt: &mut [u8],
    v4: bool,
    outbound: bool,
    new: Wide,
    proto: u8,
    delta: Delta,
) {
    let (src_at, dst_at) = wire::addr_offsets(v4);
    let at = pick(outbound, src_at, dst_at);
    let window_at = pick(v4, V4_ADDRESSES, at);
    let shift = pick(v4, (at - V4_ADDRESSES) * 8, 0);
    let v4_value = u128::from(u32::from_le_bytes(new.v4_octets())) << shift;
    let mask = pick(v4, 0xffff_ffff << shift, u128::MAX);
    let value = pick(v4, v4_value, u128::from_le_bytes(new.octets()));
    if let Some(w) = pkt.get_mut(window_at..window_at + 16) {
        let old = u128::from_le_bytes(w.try_into().unwrap_or_default());
        w.copy_from_slice(&((old & !mask) | (value & mask)).to_le_bytes());
    }
    // The hop the kernel takes twice is given back (see [`wire::restore_hop`]); the header
    // checksum takes both changes in one update.
    let hop = wire::restore_hop(pkt, v4);
    let c = read_u16(pkt, ipv4::CHECKSUM_OFFSET);
    write_u16(pkt, ipv4::CHECKSUM_OFFSET, pick(v4, (delta + hop).apply(c), c));
    let sum_at = wire::plain_l4(v4) + wire::checksum_offset(proto);
    let c = read_u16(pkt, sum_at);
    let updated = pick(proto == protocol::UDP, delta.apply_udp(c), delta.apply(c));
    write_u16(pkt, sum_at, pick(wire::covers_addresses(proto), updated, c));
}

/// [`wire::restore_hop`] on a packet the general path forwarded (of either family, any
/// headers), with its IPv4 header checksum updated. The embedded packet of an ICMP error is
/// not touched: it says what the packet was when the error was raised.
fn restore_hop(pkt: &mut [u8]) {
    let v4 = pkt[0] >> 4 == 4;
    let delta = wire::restore_hop(pkt, v4);
    if v4 {
        let c = read_u16(pkt, ipv4::CHECKSUM_OFFSET);
        write_u16(pkt, ipv4::CHECKSUM_OFFSET, delta.apply(c));
    }
}

/// The host's address in `d` (real outbound, virtual inbound) and the partner's.
#[inline]
fn ends(d: &Datagram, outbound: bool) -> (IpAddr, IpAddr) {
    if outbound {
        (d.src, d.dst)
    } else {
        (d.dst, d.src)
    }
}

/// Writes `new` at address field `at` and updates the IPv4 header checksum only.
#[inline]
fn rewrite_ip_only(pkt: &mut [u8], d: &Datagram, at: usize, new: IpAddr, delta: Delta) {
    write_addr(pkt, at, new);
    if d.is_v4() {
        let c = read_u16(pkt, ipv4::CHECKSUM_OFFSET);
        write_u16(pkt, ipv4::CHECKSUM_OFFSET, delta.apply(c));
    }
}

#[inline]
fn update_l4_checksum(pkt: &mut [u8], at: usize, proto: u8, delta: Delta) {
    let old = read_u16(pkt, at);
    let new = if proto == protocol::UDP { delta.apply_udp(old) } else { delta.apply(old) };
    write_u16(pkt, at, new);
}

/// Rewrites an address of the packet embedded at `base`: its IPv4 header checksum and, when
/// quoted, its transport checksum follow.
fn rewrite_embedded(
    pkt: &mut [u8],
    base: usize,
    e: &Datagram,
    at: usize,
    new: IpAddr,
    delta: Delta,
) {
    write_addr(pkt, base + at, new);
    if e.is_v4() {
        let c = read_u16(pkt, base + ipv4::CHECKSUM_OFFSET);
        write_u16(pkt, base + ipv4::CHECKSUM_OFFSET, delta.apply(c));
    }
    if let Some(c) = e.pseudo_checksum_offset() {
        if c + 2 <= e.len {
            update_l4_checksum(pkt, base + c, e.protocol, delta);
        }
    }
}

/// The folded one's-complement sum over an ICMP message (with the ICMPv6 pseudo-header, from
/// the addresses now in the packet): 0xffff when the checksum is right.
fn icmp_sum(pkt: &[u8], d: &Datagram) -> u16 {
    let msg = &pkt[d.l4..d.len];
    checksum::fold(checksum::sum(msg, icmp_pseudo(pkt, d, msg.len())))
}

fn icmp_pseudo(pkt: &[u8], d: &Datagram, len: usize) -> u64 {
    if d.is_v4() {
        return 0;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&pkt[wire::ipv6::SRC_OFFSET..wire::ipv6::SRC_OFFSET + 16]);
    dst.copy_from_slice(&pkt[wire::ipv6::DST_OFFSET..wire::ipv6::DST_OFFSET + 16]);
    checksum::pseudo_header_v6(&src, &dst, protocol::ICMPV6, len as u32)
}

/// Recomputes the ICMP checksum of a (verified, then rewritten) error message.
fn fill_icmp_checksum(pkt: &mut [u8], d: &Datagram) {
    let at = d.l4 + wire::IcmpPacket::<&[u8]>::CHECKSUM_OFFSET;
    write_u16(pkt, at, 0);
    let len = d.len - d.l4;
    let c = checksum::checksum(&pkt[d.l4..d.len], icmp_pseudo(pkt, d, len));
    write_u16(pkt, at, c);
}
