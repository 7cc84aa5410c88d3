//! IPv4 header view (RFC 791), options included.

use super::{checksum, Error, Result};
use std::net::Ipv4Addr;

mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

/// Byte offset of the source address.
pub const SRC_OFFSET: usize = field::SRC.start;
/// Byte offset of the destination address.
pub const DST_OFFSET: usize = field::DST.start;
/// Byte offset of the time to live (the high byte of the header's fifth 16-bit word).
pub const TTL_OFFSET: usize = field::TTL;
/// Byte offset of the header checksum.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;
/// Length of a header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// A read/write view over an IPv4 datagram.
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

    /// Wraps a buffer and checks that the header and total length are consistent with it.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let p = Packet::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks version, IHL, and that the total length fits the buffer.
    ///
    /// Bytes after `total_len` (link padding) are allowed and ignored.
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 4 {
            return Err(Error::BadVersion);
        }
        let hl = self.header_len();
        if hl < MIN_HEADER_LEN {
            return Err(Error::BadHeaderLength);
        }
        let total = usize::from(self.total_len());
        if total < hl {
            return Err(Error::BadHeaderLength);
        }
        if total > b.len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The version field (4).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }
    /// Header length in bytes (IHL × 4), options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }
    /// Total length of the datagram in bytes.
    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH.start)
    }
    /// Identification.
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT.start)
    }
    /// Don't-fragment flag.
    pub fn dont_frag(&self) -> bool {
        self.buffer.as_ref()[field::FLG_OFF.start] & 0x40 != 0
    }
    /// More-fragments flag.
    pub fn more_frags(&self) -> bool {
        self.buffer.as_ref()[field::FLG_OFF.start] & 0x20 != 0
    }
    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (be16(self.buffer.as_ref(), field::FLG_OFF.start) & 0x1fff) << 3
    }
    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }
    /// The payload's protocol number.
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }
    /// The header checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM.start)
    }
    /// Source address.
    pub fn src_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(addr(self.buffer.as_ref(), field::SRC.start))
    }
    /// Destination address.
    pub fn dst_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(addr(self.buffer.as_ref(), field::DST.start))
    }
    /// True when the header checksum is correct.
    pub fn verify_checksum(&self) -> bool {
        let b = self.buffer.as_ref();
        checksum::fold(checksum::sum(&b[..self.header_len()], 0)) == 0xffff
    }
    /// The payload (after options, up to the total length).
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        &b[self.header_len()..usize::from(self.total_len())]
    }
    /// Consumes the view.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source address (the checksum is not updated).
    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }
    /// Sets the destination address (the checksum is not updated).
    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
    /// Sets the header checksum field.
    pub fn set_checksum(&mut self, c: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
    /// Recomputes the header checksum in full.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = self.header_len();
        let c = checksum::checksum(&self.buffer.as_ref()[..hl], 0);
        self.set_checksum(c);
    }
    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), usize::from(self.total_len()));
        &mut self.buffer.as_mut()[hl..tl]
    }
}

/// Writes a 20-byte header without options into `buf` and fills its checksum.
///
/// Used for the packets the gateway itself originates (ICMP errors).
pub fn emit_header(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    ttl: u8,
) {
    let total = (MIN_HEADER_LEN + payload_len) as u16;
    let h = &mut buf[..MIN_HEADER_LEN];
    h.fill(0);
    h[field::VER_IHL] = 0x45;
    h[field::LENGTH].copy_from_slice(&total.to_be_bytes());
    h[field::TTL] = ttl;
    h[field::PROTOCOL] = protocol;
    h[field::SRC].copy_from_slice(&src.octets());
    h[field::DST].copy_from_slice(&dst.octets());
    let c = checksum::checksum(h, 0);
    h[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    // IPv4, IHL 6 (one 4-byte option: NOP NOP NOP EOL), total 28, UDP, 192.0.2.1 -> 198.51.100.2,
    // DF set, followed by an 8-byte UDP header (ports 1000 -> 2000, length 8, checksum 0).
    static PACKET_BYTES: [u8; 32] = [
        0x46, 0x00, 0x00, 0x20, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0x00, 0x02,
        0x01, 0xc6, 0x33, 0x64, 0x02, 0x01, 0x01, 0x01, 0x00, 0x03, 0xe8, 0x07, 0xd0, 0x00, 0x08,
        0x00, 0x00,
    ];

    fn packet() -> Packet<Vec<u8>> {
        let mut p = Packet::new_checked(PACKET_BYTES.to_vec()).unwrap();
        p.fill_checksum();
        p
    }

    #[test]
    fn fields() {
        let p = packet();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.total_len(), 32);
        assert_eq!(p.ident(), 0x1234);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert_eq!(p.frag_offset(), 0);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), 17);
        assert_eq!(p.src_addr(), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(198, 51, 100, 2));
        assert_eq!(p.payload().len(), 8);
        assert!(p.verify_checksum());
    }

    #[test]
    fn setters_and_checksum() {
        let mut p = packet();
        p.set_src_addr(Ipv4Addr::new(198, 18, 0, 1));
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.src_addr(), Ipv4Addr::new(198, 18, 0, 1));
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(Packet::new_checked(&PACKET_BYTES[..19]).unwrap_err(), Error::Truncated);
        let mut b = PACKET_BYTES;
        b[0] = 0x44;
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::BadHeaderLength);
        let mut b = PACKET_BYTES;
        b[0] = 0x65;
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::BadVersion);
        let mut b = PACKET_BYTES;
        b[3] = 0x40; // total length 64 > 32
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Truncated);
        let mut b = PACKET_BYTES;
        b[3] = 0x10; // total length 16 < header 24
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::BadHeaderLength);
    }

    #[test]
    fn emit_makes_valid_header() {
        let mut buf = [0u8; 28];
        emit_header(&mut buf, Ipv4Addr::new(192, 0, 0, 8), Ipv4Addr::new(192, 0, 2, 5), 1, 8, 64);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(p.total_len(), 28);
        assert_eq!(p.protocol(), 1);
    }
}
