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

use super::translate::patch;
use super::{is_unicast, Direction, Translator};
use crate::wire::{self, ipv4, ipv6, narrow, Plain, Transport, Wide};

/// What the fast path learns of a packet before it looks its flow up: the first stage of a
/// batch computes it, the last one uses it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fast {
    plain: Plain,
    /// Host → partner (else partner → the host's virtual address).
    pub outbound: bool,
    /// The flow key's hash, in the index of `outbound`'s direction.
    pub hash: u64,
}

/// The flow key of a plain packet: the host's end (real address outbound, virtual inbound),
/// the partner's, their ports (the echo identifier as the host's), and the TCP flags.
struct Key {
    host: Wide,
    partner: Wide,
    host_port: u16,
    partner_port: u16,
    flags: u8,
}

impl Key {
    #[inline(always)]
    fn of(p: &Plain, outbound: bool) -> Key {
        let (host, partner) = if outbound { (p.src, p.dst) } else { (p.dst, p.src) };
        let (src, dst, flags) = match p.transport {
            Transport::Tcp { src_port, dst_port, flags } => (src_port, dst_port, flags),
            Transport::Udp { src_port, dst_port } => (src_port, dst_port, 0),
            Transport::Echo { ident, .. } => {
                return Key { host, partner, host_port: ident, partner_port: 0, flags: 0 }
            }
            // `parse_plain` gives nothing else.
            _ => (0, 0, 0),
        };
        let (host_port, partner_port) = if outbound { (src, dst) } else { (dst, src) };
        Key { host, partner, host_port, partner_port, flags }
    }
}

impl Translator {
    /// Reads a packet for the fast path: `None` unless it has plain headers and goes out from
    /// a served host to a unicast partner, or in to a pool address from outside. Lan-to-lan
    /// packets, hairpins and anything else are the general path's.
    #[inline]
    pub(super) fn fast_key(&self, pkt: &[u8]) -> Option<Fast> {
        let p = wire::parse_plain(pkt)?;
        let to_pool = self.pool.prefixes().contains_wide(&p.dst, p.v4);
        let outbound = if self.lan.contains_wide(&p.src, p.v4) {
            if to_pool || self.lan.contains_wide(&p.dst, p.v4) || !is_unicast(narrow(p.dst, p.v4)) {
                return None;
            }
            true
        } else if to_pool {
            false
        } else {
            return None;
        };
        let k = Key::of(&p, outbound);
        let hash = self.flows.hash(k.host, k.partner, p.protocol, k.host_port, k.partner_port);
        Some(Fast { plain: p, outbound, hash })
    }

    /// Translates the packet `f` was read from when its flow exists: refreshes the flow,
    /// rewrites the host's address and the checksums, and returns the direction (the caller
    /// counts it). `None`, with nothing changed, when there is no such flow.
    #[inline]
    pub(super) fn forward_fast(&mut self, pkt: &mut [u8], f: &Fast, now: u64) -> Option<Direction> {
        let p = &f.plain;
        let k = Key::of(p, f.outbound);
        let fi = self.flows.find(
            f.outbound,
            f.hash,
            k.host,
            k.partner,
            p.protocol,
            k.host_port,
            k.partner_port,
        )?;
        let (real, virt, delta) =
            self.flows.touch(fi, k.flags, f.outbound, now, &self.flow_timeouts)?;
        let sum = wire::pseudo_checksum_at(p.protocol, p.l4());
        let (src_at, dst_at) = if p.v4 {
            (ipv4::SRC_OFFSET, ipv4::DST_OFFSET)
        } else {
            (ipv6::SRC_OFFSET, ipv6::DST_OFFSET)
        };
        if f.outbound {
            patch(pkt, p.v4, src_at, virt, sum, p.protocol, false, delta);
            Some(Direction::Outbound)
        } else {
            patch(pkt, p.v4, dst_at, real, sum, p.protocol, false, delta.negate());
            Some(Direction::Inbound)
        }
    }
}
