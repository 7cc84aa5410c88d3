//! The fast path: a packet of an established flow with plain headers (see
//! [`wire::Plain`]: no IP options, no IPv6 extension headers, not a fragment; TCP, UDP or an
//! echo), going out from a served host or in to a pool address. It reads the few header
//! fields it needs straight from the bytes, finds the flow, refreshes it and rewrites the
//! packet, without the general path's descriptor of the whole datagram.
//!
//! Anything else, and any packet whose flow does not exist yet, takes the general path
//! ([`Translator::translate_without_fast_path`]), which the fast path must never be told apart
//! from: it answers `None` having changed nothing, and where it answers it does exactly what
//! the general path would (the property tests run both side by side on the same traffic).

use super::translate::{patch, FlowKey, Way};
use super::{is_unicast, Direction, Translator};
use crate::wire::{self, narrow, Wide};

/// What the fast path learns of a packet before it looks its flow up (the first stage of a
/// batch computes it, the last one uses it): the flow key, once, and its hash.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fast {
    /// The host's end: its real address outbound, its virtual one inbound.
    host: Wide,
    /// The partner's address.
    partner: Wide,
    /// Protocol, ports and TCP flags.
    key: FlowKey,
    /// IPv4 (else IPv6).
    v4: bool,
    /// Offset of the transport checksum that covers the addresses, if there is one.
    sum: Option<usize>,
    /// Host → partner (else partner → the host's virtual address).
    pub outbound: bool,
    /// The flow key's hash, in the index of `outbound`'s direction.
    pub hash: u64,
}

impl Translator {
    /// Reads a packet for the fast path: `None` unless it has plain headers and goes out from
    /// a served host to a unicast partner, or in to a pool address from outside. Lan-to-lan
    /// packets, hairpins and anything else are the general path's.
    #[inline]
    pub(super) fn fast_key(&self, pkt: &[u8]) -> Option<Fast> {
        let p = wire::parse_plain(pkt)?;
        let way = Way::of(
            self.lan.contains_wide(&p.src, p.v4),
            self.lan.contains_wide(&p.dst, p.v4),
            self.pool.prefixes().contains_wide(&p.dst, p.v4),
        );
        let outbound = match way {
            // A destination that is not unicast passes (the general path says so).
            Way::Out => is_unicast(narrow(p.dst, p.v4)).then_some(true)?,
            Way::In => false,
            Way::Hairpin | Way::Pass => return None,
        };
        let (host, partner) = if outbound { (p.src, p.dst) } else { (p.dst, p.src) };
        let key = FlowKey::new(p.protocol, p.transport, outbound)?;
        let hash = self.flows.hash(host, partner, key.proto, key.host_port, key.partner_port);
        let sum = wire::pseudo_checksum_at(p.protocol, p.l4());
        Some(Fast { host, partner, key, v4: p.v4, sum, outbound, hash })
    }

    #[doc(hidden)]
    pub(super) fn fast_find(&self, f: &Fast) -> Option<u32> {
        let k = &f.key;
        self.flows.find(f.outbound, f.hash, f.host, f.partner, k.proto, k.host_port, k.partner_port)
    }

    /// Translates the packet `f` was read from when its flow exists: refreshes the flow,
    /// rewrites the host's address and the checksums, and returns the direction (the caller
    /// counts it). `None`, with nothing changed, when there is no such flow.
    #[inline]
    pub(super) fn forward_fast(&mut self, pkt: &mut [u8], f: &Fast, now: u64) -> Option<Direction> {
        let k = &f.key;
        let fi = self.flows.find(
            f.outbound,
            f.hash,
            f.host,
            f.partner,
            k.proto,
            k.host_port,
            k.partner_port,
        )?;
        let (real, virt, delta) =
            self.flows.touch(fi, k.flags, f.outbound, now, &self.flow_timeouts)?;
        let (src_at, dst_at) = wire::addr_offsets(f.v4);
        if f.outbound {
            patch(pkt, f.v4, src_at, virt, f.sum, k.proto, false, delta);
            Some(Direction::Outbound)
        } else {
            patch(pkt, f.v4, dst_at, real, f.sum, k.proto, false, delta.negate());
            Some(Direction::Inbound)
        }
    }
}
