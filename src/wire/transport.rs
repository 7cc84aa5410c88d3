//! TCP (RFC 9293), UDP (RFC 768) and ICMP/ICMPv6 (RFC 792, RFC 4443) header views.
//!
//! The translator only needs ports, identifiers, flags and checksum positions, so these views
//! are thin: each checks its minimum length once, then offers getters and the byte offset of
//! its checksum field.

use super::{Error, Result};

/// IP protocol numbers the translator understands.
pub mod protocol {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
}

/// A TCP header view.
#[derive(Debug, Clone)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Byte offset of the checksum field.
    pub const CHECKSUM_OFFSET: usize = 16;
    /// Length of a header without options.
    pub const MIN_HEADER_LEN: usize = 20;

    /// Wraps a segment and checks that the data offset is sane and fits.
    pub fn new_checked(buffer: T) -> Result<TcpPacket<T>> {
        let p = TcpPacket { buffer };
        let b = p.buffer.as_ref();
        if b.len() < Self::MIN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        let hl = p.header_len();
        if hl < Self::MIN_HEADER_LEN || hl > b.len() {
            return Err(Error::BadTransportHeader);
        }
        Ok(p)
    }
    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }
    /// Header length from the data offset field.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[12] >> 4) * 4
    }
    /// The flags byte.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[13]
    }
    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), Self::CHECKSUM_OFFSET)
    }
}

/// A UDP header view.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Byte offset of the checksum field.
    pub const CHECKSUM_OFFSET: usize = 6;
    /// Header length.
    pub const HEADER_LEN: usize = 8;

    /// Wraps a datagram and checks its header fits.
    pub fn new_checked(buffer: T) -> Result<UdpPacket<T>> {
        if buffer.as_ref().len() < Self::HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(UdpPacket { buffer })
    }
    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }
    /// The length field.
    pub fn len_field(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }
    /// The checksum field (0: none, IPv4 only).
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), Self::CHECKSUM_OFFSET)
    }
}

/// An ICMP or ICMPv6 header view: both share type, code, checksum and a 4-byte rest.
#[derive(Debug, Clone)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

/// ICMP (IPv4) message types we handle.
pub mod icmpv4 {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Source quench (deprecated, still an error by form).
    pub const SOURCE_QUENCH: u8 = 4;
    /// Redirect.
    pub const REDIRECT: u8 = 5;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// Destination unreachable code: fragmentation needed and DF set.
    pub const CODE_FRAG_NEEDED: u8 = 4;
    /// Destination unreachable code: communication administratively prohibited.
    pub const CODE_ADMIN_PROHIBITED: u8 = 13;
}

/// ICMPv6 message types we handle.
pub mod icmpv6 {
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 1;
    /// Packet too big.
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 3;
    /// Parameter problem.
    pub const PARAMETER_PROBLEM: u8 = 4;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Destination unreachable code: administratively prohibited.
    pub const CODE_ADMIN_PROHIBITED: u8 = 1;
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    /// Byte offset of the checksum field.
    pub const CHECKSUM_OFFSET: usize = 2;
    /// Header length (type, code, checksum, rest of header).
    pub const HEADER_LEN: usize = 8;

    /// Wraps a message and checks its header fits.
    pub fn new_checked(buffer: T) -> Result<IcmpPacket<T>> {
        if buffer.as_ref().len() < Self::HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(IcmpPacket { buffer })
    }
    /// Message type.
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[0]
    }
    /// Message code.
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[1]
    }
    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), Self::CHECKSUM_OFFSET)
    }
    /// Echo identifier (bytes 4..6).
    pub fn echo_ident(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }
    /// The embedded ("invoking") packet of an error message.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[Self::HEADER_LEN..]
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    // TCP 40000 -> 80, data offset 6 (one MSS option), SYN, checksum 0xabcd.
    static TCP_BYTES: [u8; 24] = [
        0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x60, 0x02, 0xff, 0xff, 0xab, 0xcd, 0, 0,
        0x02, 0x04, 0x05, 0xb4,
    ];
    // UDP 53 -> 5353, length 12, checksum 0.
    static UDP_BYTES: [u8; 12] = [0x00, 0x35, 0x14, 0xe9, 0x00, 0x0c, 0x00, 0x00, 1, 2, 3, 4];
    // ICMP echo request id 0x4242 seq 1, checksum 0x1234.
    static ICMP_BYTES: [u8; 8] = [8, 0, 0x12, 0x34, 0x42, 0x42, 0x00, 0x01];

    #[test]
    fn tcp_fields() {
        let t = TcpPacket::new_checked(&TCP_BYTES[..]).unwrap();
        assert_eq!((t.src_port(), t.dst_port()), (40000, 80));
        assert_eq!(t.header_len(), 24);
        assert_eq!(t.flags(), tcp_flags::SYN);
        assert_eq!(t.checksum(), 0xabcd);
    }

    #[test]
    fn tcp_bad_data_offset() {
        let mut b = TCP_BYTES;
        b[12] = 0x40; // 16 bytes < 20
        assert_eq!(TcpPacket::new_checked(&b[..]).unwrap_err(), Error::BadTransportHeader);
        b[12] = 0x70; // 28 bytes > 24 available
        assert_eq!(TcpPacket::new_checked(&b[..]).unwrap_err(), Error::BadTransportHeader);
        assert_eq!(TcpPacket::new_checked(&TCP_BYTES[..19]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn udp_fields() {
        let u = UdpPacket::new_checked(&UDP_BYTES[..]).unwrap();
        assert_eq!((u.src_port(), u.dst_port(), u.len_field(), u.checksum()), (53, 5353, 12, 0));
        assert_eq!(UdpPacket::new_checked(&UDP_BYTES[..7]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn icmp_fields() {
        let i = IcmpPacket::new_checked(&ICMP_BYTES[..]).unwrap();
        assert_eq!((i.msg_type(), i.code(), i.checksum(), i.echo_ident()), (8, 0, 0x1234, 0x4242));
        assert!(i.payload().is_empty());
        assert_eq!(IcmpPacket::new_checked(&ICMP_BYTES[..7]).unwrap_err(), Error::Truncated);
    }
}
