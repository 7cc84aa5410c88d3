//! IPv6 header view (RFC 8200) and the extension-header chain walk.

use super::{Error, Result};
use std::net::Ipv6Addr;

mod field {
    use core::ops::Range;
    pub const VER: usize = 0;
    pub const PAYLOAD_LEN: Range<usize> = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Range<usize> = 8..24;
    pub const DST: Range<usize> = 24..40;
}

/// Byte offset of the source address.
pub const SRC_OFFSET: usize = field::SRC.start;
/// Byte offset of the destination address.
pub const DST_OFFSET: usize = field::DST.start;
/// Byte offset of the hop limit.
pub const HOP_LIMIT_OFFSET: usize = field::HOP_LIMIT;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;
/// The most extension headers we walk before giving up on a packet.
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// Extension header protocol numbers we walk through.
pub mod next_header {
    /// Hop-by-hop options.
    pub const HOP_BY_HOP: u8 = 0;
    /// Routing header.
    pub const ROUTING: u8 = 43;
    /// Fragment header.
    pub const FRAGMENT: u8 = 44;
    /// Destination options.
    pub const DEST_OPTS: u8 = 60;
    /// No next header.
    pub const NONE: u8 = 59;
}

/// A read/write view over an IPv6 packet.
///
/// After [`Packet::new_checked`] returned `Ok`, no accessor panics.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer and checks the version and that the payload length fits.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let p = Packet::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the version and the payload length against the buffer.
    ///
    /// A payload length of 0 (jumbogram, RFC 2675) is refused: it never crosses a TUN.
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 6 {
            return Err(Error::BadVersion);
        }
        if HEADER_LEN + usize::from(self.payload_len()) > b.len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The version field (6).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER] >> 4
    }
    /// Payload length (everything after the fixed header).
    pub fn payload_len(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[field::PAYLOAD_LEN.start], b[field::PAYLOAD_LEN.start + 1]])
    }
    /// The first next-header value.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NEXT_HEADER]
    }
    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }
    /// Source address.
    pub fn src_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(addr(self.buffer.as_ref(), field::SRC.start))
    }
    /// Destination address.
    pub fn dst_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(addr(self.buffer.as_ref(), field::DST.start))
    }
    /// Total length of the packet (fixed header plus payload).
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }
    /// Walks the extension-header chain; see [`walk_extensions`].
    pub fn upper_layer(&self) -> Result<UpperLayer> {
        let b = self.buffer.as_ref();
        walk_extensions(&b[..self.total_len()], self.next_header(), HEADER_LEN)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source address.
    pub fn set_src_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }
    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
}

/// Where the upper-layer header of an IPv6 packet starts, and what the chain said on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperLayer {
    /// The upper-layer protocol number (after all extension headers).
    pub protocol: u8,
    /// Byte offset of the upper-layer header in the packet.
    pub offset: usize,
    /// The fragment header's offset field in bytes, when there is a fragment header.
    pub frag_offset: Option<u16>,
    /// The fragment header's M flag.
    pub more_frags: bool,
    /// A routing header with segments left > 0 was found: the destination address is not the
    /// final one, so the upper-layer pseudo-header uses another address.
    pub routing_pending: bool,
}

/// Walks hop-by-hop, routing, fragment and destination-options headers (RFC 8200 §4) from
/// `offset` with first protocol `next`, up to [`MAX_EXTENSION_HEADERS`] of them.
///
/// `packet` must end where the IPv6 payload ends.
pub fn walk_extensions(packet: &[u8], mut next: u8, mut offset: usize) -> Result<UpperLayer> {
    let mut frag_offset = None;
    let mut more_frags = false;
    let mut routing_pending = false;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        match next {
            next_header::HOP_BY_HOP | next_header::ROUTING | next_header::DEST_OPTS => {
                let h = packet.get(offset..offset + 8).ok_or(Error::Truncated)?;
                let len = (usize::from(h[1]) + 1) * 8;
                if packet.len() < offset + len {
                    return Err(Error::Truncated);
                }
                if next == next_header::HOP_BY_HOP && offset != HEADER_LEN {
                    // RFC 8200 §4.1: hop-by-hop only right after the fixed header.
                    return Err(Error::BadExtensionHeader);
                }
                if next == next_header::ROUTING && h[3] > 0 {
                    routing_pending = true;
                }
                next = h[0];
                offset += len;
            }
            next_header::FRAGMENT => {
                let h = packet.get(offset..offset + 8).ok_or(Error::Truncated)?;
                if frag_offset.is_some() {
                    return Err(Error::BadExtensionHeader);
                }
                let off_m = u16::from_be_bytes([h[2], h[3]]);
                frag_offset = Some(off_m & 0xfff8);
                more_frags = off_m & 1 != 0;
                next = h[0];
                offset += 8;
            }
            protocol => {
                return Ok(UpperLayer {
                    protocol,
                    offset,
                    frag_offset,
                    more_frags,
                    routing_pending,
                });
            }
        }
    }
    Err(Error::ExtensionChainTooLong)
}

/// Writes a fixed header without extensions into `buf`.
pub fn emit_header(
    buf: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    payload_len: usize,
    hop_limit: u8,
) {
    let h = &mut buf[..HEADER_LEN];
    h.fill(0);
    h[field::VER] = 0x60;
    h[field::PAYLOAD_LEN].copy_from_slice(&(payload_len as u16).to_be_bytes());
    h[field::NEXT_HEADER] = next_header;
    h[field::HOP_LIMIT] = hop_limit;
    h[field::SRC].copy_from_slice(&src.octets());
    h[field::DST].copy_from_slice(&dst.octets());
}

fn addr(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    // IPv6 2001:db8::1 -> 2001:db8:1::2, payload 8+8+8: hop-by-hop (8 bytes, PadN),
    // fragment header (offset 0, M=1, id 0x01020304), UDP header 1000 -> 2000 len 8.
    static PACKET_BYTES: [u8; 64] = [
        0x60, 0x00, 0x00, 0x00, 0x00, 0x18, 0x00, 0x40, // ver, payload 24, next HBH, hop 64
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // src
        0x20, 0x01, 0x0d, 0xb8, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // dst
        0x2c, 0x00, 0x01, 0x04, 0x00, 0x00, 0x00, 0x00, // HBH: next=44, len 0, PadN(4)
        0x11, 0x00, 0x00, 0x01, 0x01, 0x02, 0x03, 0x04, // frag: next=UDP, off 0, M=1
        0x03, 0xe8, 0x07, 0xd0, 0x00, 0x08, 0x00, 0x00, // UDP
    ];

    #[test]
    fn fields_and_chain() {
        let p = Packet::new_checked(&PACKET_BYTES[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.payload_len(), 24);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src_addr(), "2001:db8::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "2001:db8:1::2".parse::<Ipv6Addr>().unwrap());
        let up = p.upper_layer().unwrap();
        assert_eq!(
            up,
            UpperLayer {
                protocol: 17,
                offset: 56,
                frag_offset: Some(0),
                more_frags: true,
                routing_pending: false
            }
        );
    }

    #[test]
    fn non_first_fragment_offset() {
        let mut b = PACKET_BYTES;
        b[50] = 0x00;
        b[51] = 0xb8; // offset 23*8 = 184, M=0
        let up = Packet::new_checked(&b[..]).unwrap().upper_layer().unwrap();
        assert_eq!(up.frag_offset, Some(184));
        assert!(!up.more_frags);
    }

    #[test]
    fn routing_header_with_segments_left() {
        // Fixed header, then routing header type 0 with segments left 1 and one address.
        let mut b = [0u8; 40 + 24 + 8];
        b[0] = 0x60;
        b[5] = 32;
        b[6] = next_header::ROUTING;
        b[40] = 17; // next: UDP
        b[41] = 2; // (2+1)*8 = 24 bytes
        b[43] = 1; // segments left
        let up = Packet::new_checked(&b[..]).unwrap().upper_layer().unwrap();
        assert!(up.routing_pending);
        assert_eq!(up.offset, 64);
    }

    #[test]
    fn rejects_truncated_and_long_chains() {
        assert_eq!(Packet::new_checked(&PACKET_BYTES[..39]).unwrap_err(), Error::Truncated);
        let mut b = PACKET_BYTES;
        b[5] = 0x40; // payload length 64 > 24 available
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Truncated);
        // Nine destination-options headers in a row.
        let mut b = [0u8; 40 + 9 * 8 + 8];
        b[0] = 0x60;
        let pl = (b.len() - 40) as u16;
        b[4..6].copy_from_slice(&pl.to_be_bytes());
        b[6] = next_header::DEST_OPTS;
        for i in 0..9 {
            b[40 + i * 8] = next_header::DEST_OPTS;
        }
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.upper_layer().unwrap_err(), Error::ExtensionChainTooLong);
        // An extension header that runs past the payload.
        let mut b = PACKET_BYTES;
        b[41] = 9; // HBH claims 80 bytes
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.upper_layer().unwrap_err(), Error::Truncated);
    }

    #[test]
    fn hop_by_hop_must_come_first() {
        let mut b = PACKET_BYTES;
        b[6] = next_header::DEST_OPTS;
        b[40] = next_header::HOP_BY_HOP;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.upper_layer().unwrap_err(), Error::BadExtensionHeader);
    }
}
