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

use super::translate::{patch_plain, FlowKey, Way};
use super::{is_unicast_wide, Translator};
use crate::wire::{self, Wide};

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
    /// Host → partner (else partner → the host's virtual address).
    pub outbound: bool,
    /// The flow key's hash, in the index of `outbound`'s direction.
    pub hash: u64,
}

impl Translator {
    /// Reads a packet for the fast path: `None` unless it has plain headers and goes out from
    /// a served host to a unicast partner, or in to a pool address from outside. Lan-to-lan
    /// packets, hairpins and anything else are the general path's.
    ///
    /// Like [`wire::parse_plain`], it decides without a branch on the family or the
    /// direction: each choice is computed both ways and picked.
    #[inline]
    pub(super) fn fast_key(&self, pkt: &[u8]) -> Option<Fast> {
        let p = wire::parse_plain(pkt)?;
        let (out, inbound, _) = Way::bits(
            self.lan.contains_wide(&p.src, p.v4),
            self.lan.contains_wide(&p.dst, p.v4),
            self.pool.prefixes().contains_wide(&p.dst, p.v4),
        );
        // Out to a destination that is not unicast passes (the general path says so).
        let outbound = out & is_unicast_wide(p.dst, p.v4);
        if !(outbound | inbound) {
            return None;
        }
        let host = Wide::select(outbound, p.src, p.dst);
        let partner = Wide::select(outbound, p.dst, p.src);
        let key = FlowKey::from_ports(p.protocol, p.src_port, p.dst_port, p.flags, outbound);
        let hash = self.flows.hash(host, partner, key.proto, key.host_port, key.partner_port);
        Some(Fast { host, partner, key, v4: p.v4, outbound, hash })
    }

    /// Translates the packet `f` was read from when its flow exists: refreshes the flow,
    /// rewrites the host's address and the checksums, and says whether it went out (else
    /// in). `None`, with nothing changed, when there is no such flow.
    #[inline]
    pub(super) fn forward_fast(&mut self, pkt: &mut [u8], f: &Fast, now: u64) -> Option<bool> {
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
        if now < self.slow_until {
            return None;
        }
        let life = self.life_shift();
        let (real, virt, delta) =
            self.flows.touch_if(fi, k.flags, f.outbound, now, &self.flow_timeouts, life)?;
        // Out, the source becomes the virtual address; in, the destination the real one.
        let new = Wide::select(f.outbound, virt, real);
        patch_plain(pkt, f.v4, f.outbound, new, k.proto, delta.negate_if(!f.outbound));
        Some(f.outbound)
    }
}
