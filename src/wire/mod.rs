//! Zero-copy views over IP packets, and the Internet checksum.
//!
//! One file per protocol (`ipv4`, `ipv6`, `transport` for TCP/UDP/ICMP), each with a
//! `Packet<T: AsRef<[u8]>>`-style view whose accessors never panic once `new_checked`
//! returned `Ok`. On top of them, [`parse`] validates a whole datagram in one pass and returns
//! a small [`Datagram`] descriptor (addresses, offsets, ports, fragment position) that the
//! translator works from without parsing again. [`parse_embedded`] does the same for the
//! truncated packet quoted inside an ICMP error.
//!
//! Nothing here allocates, and nothing here knows about leases or devices.

pub mod checksum;
pub mod ipv4;
pub mod ipv6;
pub mod transport;
pub mod vnet;

pub use checksum::Delta;
pub use transport::{icmpv4, icmpv6, protocol, tcp_flags, IcmpPacket, TcpPacket, UdpPacket};

use std::net::IpAddr;

/// Why bytes are not a packet we can translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than a header or length field requires.
    #[error("packet truncated")]
    Truncated,
    /// The IP version nibble is neither 4 nor 6 (or not the one expected).
    #[error("bad IP version")]
    BadVersion,
    /// IHL below 5, or a total length smaller than the header.
    #[error("bad IP header or total length")]
    BadHeaderLength,
    /// TCP data offset out of range, or a UDP length field that disagrees with the datagram.
    #[error("bad transport header")]
    BadTransportHeader,
    /// An IPv6 extension header in the wrong place or repeated.
    #[error("bad IPv6 extension header")]
    BadExtensionHeader,
    /// More IPv6 extension headers than we walk.
    #[error("IPv6 extension header chain too long")]
    ExtensionChainTooLong,
    /// An IPv6 routing header with segments left: the destination is not final.
    #[error("IPv6 routing header with segments left")]
    RoutingHeader,
}

/// Shorthand for results of this module.
pub type Result<T> = core::result::Result<T, Error>;

/// The position of a datagram in a fragmented original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: it carries the transport header.
    First,
    /// A later fragment: no transport header, only payload bytes.
    Later,
}

/// The transport-layer facts the translator needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP, with its ports and flags byte.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Flags byte (FIN, SYN, RST, ACK, ...).
        flags: u8,
    },
    /// UDP, with its ports.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP or ICMPv6 echo request or reply.
    Echo {
        /// Echo identifier.
        ident: u16,
        /// True for a reply.
        reply: bool,
    },
    /// An ICMP or ICMPv6 error carrying an embedded packet after its 8-byte header.
    IcmpError {
        /// Message type.
        msg_type: u8,
        /// Message code.
        code: u8,
    },
    /// An ICMP message type the translator does not forward (RFC 5508 REQ-11).
    IcmpOther,
    /// A later fragment: the transport header is in the first fragment.
    Fragment,
    /// A protocol the translator does not handle.
    Other,
}

/// A validated datagram: everything the translator reads, with byte offsets for what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The upper-layer protocol number (after IPv6 extension headers).
    pub protocol: u8,
    /// Byte offset of the upper-layer header (of the payload, for a later fragment).
    pub l4: usize,
    /// Length of the datagram: the IP length field, or the bytes quoted for an embedded packet.
    pub len: usize,
    /// Position in a fragmented original.
    pub fragment: Fragment,
    /// What the transport header says.
    pub transport: Transport,
    /// The transport checksum is partial (pseudo-header sum only, to be finished by the
    /// device: TUN offloads). Never set by the parser; see [`vnet::Checksum`].
    pub partial_checksum: bool,
}

impl Datagram {
    /// True for IPv4.
    pub fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }

    /// Byte offset of the source address field.
    pub fn src_offset(&self) -> usize {
        addr_offsets(self.is_v4()).0
    }

    /// Byte offset of the destination address field.
    pub fn dst_offset(&self) -> usize {
        addr_offsets(self.is_v4()).1
    }

    /// Byte offset of the transport checksum that covers the addresses (TCP, UDP, ICMPv6),
    /// when this datagram carries the transport header. ICMPv4 has no pseudo-header.
    pub fn pseudo_checksum_offset(&self) -> Option<usize> {
        if self.fragment == Fragment::Later {
            return None;
        }
        pseudo_checksum_at(self.protocol, self.l4)
    }
}

/// Byte offsets of the source and destination address fields of an IPv4 (`v4`) or IPv6
/// header.
#[inline(always)]
pub fn addr_offsets(v4: bool) -> (usize, usize) {
    (pick(v4, ipv4::SRC_OFFSET, ipv6::SRC_OFFSET), pick(v4, ipv4::DST_OFFSET, ipv6::DST_OFFSET))
}

/// Gives a forwarded packet back the hop the kernel took from it once too often: adds 1 to
/// the TTL of an IPv4 (`v4`) header or the hop limit of an IPv6 one, saturating at 255, and
/// returns the IPv4 header checksum's delta for it (RFC 1624; IPv6 has no header checksum,
/// and no transport checksum covers either field), which the caller applies.
///
/// A translated packet crosses the kernel's forwarding twice, into the TUN device and out of
/// it, and each crossing takes 1 off (RFC 791 §3.2, RFC 8200 §3): adding 1 back makes the
/// gateway one hop, as a kernel NAT is. A packet the box itself sent into the TUN was never
/// decremented, so it leaves with the TTL it was sent with (as through a kernel NAT), and
/// 255 stays 255. Without a branch, for the fast path: the field is at the family's offset.
#[inline(always)]
pub fn restore_hop(pkt: &mut [u8], v4: bool) -> Delta {
    let at = pick(v4, ipv4::TTL_OFFSET, ipv6::HOP_LIMIT_OFFSET);
    let old = pkt[at];
    let new = old.saturating_add(1);
    pkt[at] = new;
    Delta::word(u16::from(old) << 8, u16::from(new) << 8)
}

/// `a` if `c`, else `b`, chosen without a branch (the hot path's conditions are the packet's
/// family, protocol and direction, which mixed traffic draws at random: a branch on them is
/// a misprediction every other packet).
#[inline(always)]
pub fn pick<T>(c: bool, a: T, b: T) -> T {
    std::hint::select_unpredictable(c, a, b)
}

/// Byte offset, from the start of its header, of the checksum of a TCP, UDP, ICMP or ICMPv6
/// header (`protocol` one of these).
#[inline(always)]
pub fn checksum_offset(protocol: u8) -> usize {
    let tcp = pick(protocol == protocol::TCP, TcpPacket::<&[u8]>::CHECKSUM_OFFSET, 0);
    let udp = pick(protocol == protocol::UDP, UdpPacket::<&[u8]>::CHECKSUM_OFFSET, 0);
    let icmp = pick(
        protocol == protocol::ICMP || protocol == protocol::ICMPV6,
        IcmpPacket::<&[u8]>::CHECKSUM_OFFSET,
        0,
    );
    tcp | udp | icmp
}

/// Whether a `protocol` checksum covers the addresses (a pseudo-header): TCP, UDP and
/// ICMPv6 do, ICMPv4 does not.
#[inline(always)]
pub fn covers_addresses(protocol: u8) -> bool {
    matches!(protocol, protocol::TCP | protocol::UDP | protocol::ICMPV6)
}

/// Byte offset of the checksum of a `protocol` header at `l4` when it covers the addresses
/// (TCP, UDP, ICMPv6; ICMPv4 has no pseudo-header).
#[inline]
pub fn pseudo_checksum_at(protocol: u8, l4: usize) -> Option<usize> {
    covers_addresses(protocol).then(|| l4 + checksum_offset(protocol))
}

/// Validates a whole datagram (IPv4 or IPv6) and describes it.
///
/// Strict: every length field must agree with the bytes, the transport header must be complete
/// in an unfragmented datagram or a first fragment. Bytes after the IP length are ignored.
#[inline]
pub fn parse(buf: &[u8]) -> Result<Datagram> {
    match parse_plain(buf) {
        Some(p) => Ok(p.datagram()),
        None => parse_inner(buf, false),
    }
}

/// An address as the hot path holds it: IPv6 as is, IPv4 mapped (`::ffff:a.b.c.d`). The
/// family always comes from the packet at hand, so the mapping is never ambiguous.
///
/// The 16 bytes, in network order, are held as two native-endian words: the compiler keeps
/// an address in two registers and compares, hashes and copies it whole (a `[u8; 16]` it
/// splits into bytes), and what holds it stays 8-byte aligned (a `u128` would be 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Wide([u64; 2]);

impl Wide {
    /// `::`.
    pub const ZERO: Wide = Wide([0, 0]);
    /// An address with one bit set (which one depends on the byte order; only for masks).
    pub const ONE: Wide = Wide([1, 0]);

    /// An address from its 16 bytes.
    #[inline(always)]
    pub fn from_octets(b: [u8; 16]) -> Wide {
        let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = b;
        Wide([
            u64::from_ne_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
        ])
    }

    /// The IPv4 address `a` (network order), mapped.
    #[inline(always)]
    pub fn from_v4(a: [u8; 4]) -> Wide {
        Wide([0, u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]])])
    }

    /// The 16 bytes.
    #[inline(always)]
    pub fn octets(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.0[0].to_ne_bytes());
        b[8..].copy_from_slice(&self.0[1].to_ne_bytes());
        b
    }

    /// The last 4 bytes: the IPv4 address of a mapped one.
    #[inline(always)]
    pub fn v4_octets(self) -> [u8; 4] {
        let [.., a, b, c, d] = self.0[1].to_ne_bytes();
        [a, b, c, d]
    }

    /// `a` if `c`, else `b`, chosen without a branch (see [`pick`]).
    #[inline(always)]
    pub fn select(c: bool, a: Wide, b: Wide) -> Wide {
        Wide([pick(c, a.0[0], b.0[0]), pick(c, a.0[1], b.0[1])])
    }

    /// The two words (for hashing).
    #[inline(always)]
    pub fn words(self) -> [u64; 2] {
        self.0
    }
}

/// `a` as a [`Wide`] address.
#[inline]
pub fn wide(a: IpAddr) -> Wide {
    match a {
        IpAddr::V4(v4) => Wide::from_v4(v4.octets()),
        IpAddr::V6(v6) => Wide::from_octets(v6.octets()),
    }
}

/// The address `a` (as [`wide`] holds it) in the given family.
#[inline]
pub fn narrow(a: Wide, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::from(a.v4_octets())
    } else {
        IpAddr::from(a.octets())
    }
}

/// A packet with plain headers, as [`parse_plain`] reads it: an IPv4 header without options
/// or an IPv6 header without extension headers, not a fragment, carrying TCP, UDP or an ICMP
/// or ICMPv6 echo. What the translator's fast path works from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plain {
    /// IPv4 (else IPv6).
    pub v4: bool,
    /// Source address.
    pub src: Wide,
    /// Destination address.
    pub dst: Wide,
    /// TCP, UDP, ICMP or ICMPv6.
    pub protocol: u8,
    /// The IP length field, as a datagram length.
    pub len: u16,
    /// TCP or UDP source port; an echo's identifier.
    pub src_port: u16,
    /// TCP or UDP destination port; 0 for an echo.
    pub dst_port: u16,
    /// TCP flags (0 for UDP and echo).
    pub flags: u8,
    /// An echo reply (else a request, or not an echo).
    pub echo_reply: bool,
}

impl Plain {
    /// Byte offset of the transport header.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        plain_l4(self.v4)
    }

    /// The transport header as [`parse`] describes it.
    pub fn transport(&self) -> Transport {
        match self.protocol {
            protocol::TCP => Transport::Tcp {
                src_port: self.src_port,
                dst_port: self.dst_port,
                flags: self.flags,
            },
            protocol::UDP => Transport::Udp { src_port: self.src_port, dst_port: self.dst_port },
            _ => Transport::Echo { ident: self.src_port, reply: self.echo_reply },
        }
    }

    /// The same packet as [`parse`] describes it.
    #[inline]
    pub fn datagram(&self) -> Datagram {
        Datagram {
            src: narrow(self.src, self.v4),
            dst: narrow(self.dst, self.v4),
            protocol: self.protocol,
            l4: self.l4(),
            len: usize::from(self.len),
            fragment: Fragment::Whole,
            transport: self.transport(),
            partial_checksum: false,
        }
    }
}

/// Byte offset of the transport header of a packet with plain headers (see [`Plain`]).
#[inline(always)]
pub fn plain_l4(v4: bool) -> usize {
    pick(v4, ipv4::MIN_HEADER_LEN, ipv6::HEADER_LEN)
}

/// Bytes [`parse_plain`] reads: the IPv6 header and a TCP header without options fit.
const PLAIN_WINDOW: usize = 64;

/// [`parse`] of the common case (see [`Plain`]). `None` for anything else, which the full
/// parse then handles; where this answers, it answers exactly as the full parse would (a
/// property test holds the two together).
///
/// It reads every field at the offsets of both families, makes every check (the IP length
/// fields, the fragment fields, the TCP data offset, the UDP length, the ICMP type) and
/// combines them into one test, then picks the family's and protocol's values without a
/// branch: on mixed traffic, a branch on the family or the protocol would mispredict about
/// every other packet, each time costing more than all of this. Packets shorter than its
/// window are read from a zero-padded copy (the length checks keep the padding out).
#[inline]
pub fn parse_plain(buf: &[u8]) -> Option<Plain> {
    let mut padded = [0u8; PLAIN_WINDOW];
    let h: &[u8; PLAIN_WINDOW] = match buf.first_chunk() {
        Some(h) => h,
        None => {
            padded[..buf.len()].copy_from_slice(buf);
            &padded
        }
    };
    let v4 = h[0] == 0x45;
    let v6 = h[0] >> 4 == 6;
    let l4 = plain_l4(v4);
    let protocol = pick(v4, h[9], h[6]);
    let len = pick(v4, 0, ipv6::HEADER_LEN) + usize::from(read_u16(h, pick(v4, 2, 4)));
    // An IPv4 fragment has the MF flag or an offset.
    let whole = !v4 | (h[6] & 0x3f | h[7] == 0);
    let v4_addr = |at: usize| Wide::from_v4([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let v6_addr = |at: usize| Wide::from_octets(h[at..at + 16].try_into().unwrap_or([0; 16]));
    let src = Wide::select(v4, v4_addr(ipv4::SRC_OFFSET), v6_addr(ipv6::SRC_OFFSET));
    let dst = Wide::select(v4, v4_addr(ipv4::DST_OFFSET), v6_addr(ipv6::DST_OFFSET));

    // The transport header, read as each protocol would have it; `seg` is what the IP length
    // leaves for it (wrapped around, so huge, when the length does not cover the IP header).
    let t: &[u8; 20] = h[l4..l4 + 20].try_into().ok()?;
    let seg = len.wrapping_sub(l4);
    let tcp = protocol == protocol::TCP;
    let udp = protocol == protocol::UDP;
    let (echo_request, echo_reply) = (
        pick(v4, icmpv4::ECHO_REQUEST, icmpv6::ECHO_REQUEST),
        pick(v4, icmpv4::ECHO_REPLY, icmpv6::ECHO_REPLY),
    );
    let icmp = protocol == pick(v4, protocol::ICMP, protocol::ICMPV6);
    let icmp_type = t[0];
    let echo = icmp & ((icmp_type == echo_request) | (icmp_type == echo_reply));
    let data_offset = usize::from(t[12] >> 4) * 4;
    // Bytes 4 and 5: UDP's length, an echo's identifier.
    let word2 = read_u16(t, 4);
    let udp_len = usize::from(word2);
    let tcp_ok = tcp
        & (seg >= TcpPacket::<&[u8]>::MIN_HEADER_LEN)
        & (data_offset >= TcpPacket::<&[u8]>::MIN_HEADER_LEN)
        & (data_offset <= seg);
    let udp_ok = udp
        & (seg >= UdpPacket::<&[u8]>::HEADER_LEN)
        & (udp_len >= UdpPacket::<&[u8]>::HEADER_LEN)
        & (udp_len <= seg);
    let echo_ok = echo & (seg >= IcmpPacket::<&[u8]>::HEADER_LEN);
    let ok = (v4 | v6)
        & whole
        & (len >= l4)
        & (len <= buf.len())
        & (len <= usize::from(u16::MAX))
        & (tcp_ok | udp_ok | echo_ok);
    if !ok {
        return None;
    }
    Some(Plain {
        v4,
        src,
        dst,
        protocol,
        len: len as u16,
        src_port: pick(echo, word2, read_u16(t, 0)),
        dst_port: pick(echo, 0, read_u16(t, 2)),
        flags: pick(tcp, t[13], 0),
        echo_reply: echo & (icmp_type == echo_reply),
    })
}

/// Describes the packet quoted inside an ICMP error: the IP header must be complete, the rest
/// may be cut short (RFC 792 quotes the header and 8 bytes; RFC 4443 as much as fits).
pub fn parse_embedded(buf: &[u8]) -> Result<Datagram> {
    parse_inner(buf, true)
}

fn parse_inner(buf: &[u8], embedded: bool) -> Result<Datagram> {
    let first = *buf.first().ok_or(Error::Truncated)?;
    match first >> 4 {
        4 => parse_v4(buf, embedded),
        6 => parse_v6(buf, embedded),
        _ => Err(Error::BadVersion),
    }
}

fn parse_v4(buf: &[u8], embedded: bool) -> Result<Datagram> {
    let p = ipv4::Packet::new_unchecked(buf);
    let (hl, len) = if embedded {
        if buf.len() < ipv4::MIN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        let hl = p.header_len();
        if hl < ipv4::MIN_HEADER_LEN || usize::from(p.total_len()) < hl {
            return Err(Error::BadHeaderLength);
        }
        if hl > buf.len() {
            return Err(Error::Truncated);
        }
        (hl, buf.len().min(usize::from(p.total_len())))
    } else {
        p.check_len()?;
        (p.header_len(), usize::from(p.total_len()))
    };
    let fragment = match (p.frag_offset(), p.more_frags()) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    };
    let src = IpAddr::V4(p.src_addr());
    let dst = IpAddr::V4(p.dst_addr());
    finish(buf, src, dst, p.protocol(), hl, len, fragment, embedded)
}

fn parse_v6(buf: &[u8], embedded: bool) -> Result<Datagram> {
    let p = ipv6::Packet::new_unchecked(buf);
    let len = if embedded {
        if buf.len() < ipv6::HEADER_LEN {
            return Err(Error::Truncated);
        }
        buf.len().min(p.total_len())
    } else {
        p.check_len()?;
        p.total_len()
    };
    let up = ipv6::walk_extensions(&buf[..len], p.next_header(), ipv6::HEADER_LEN)?;
    if up.routing_pending {
        return Err(Error::RoutingHeader);
    }
    let fragment = match (up.frag_offset, up.more_frags) {
        (None, _) | (Some(0), false) => Fragment::Whole,
        (Some(0), true) => Fragment::First,
        _ => Fragment::Later,
    };
    let src = IpAddr::V6(p.src_addr());
    let dst = IpAddr::V6(p.dst_addr());
    finish(buf, src, dst, up.protocol, up.offset, len, fragment, embedded)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    buf: &[u8],
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    l4: usize,
    len: usize,
    fragment: Fragment,
    embedded: bool,
) -> Result<Datagram> {
    let transport = if fragment == Fragment::Later {
        Transport::Fragment
    } else {
        transport(&buf[l4..len], protocol, src.is_ipv4(), fragment, embedded)?
    };
    Ok(Datagram { src, dst, protocol, l4, len, fragment, transport, partial_checksum: false })
}

#[inline]
fn transport(
    seg: &[u8],
    proto: u8,
    v4: bool,
    fragment: Fragment,
    embedded: bool,
) -> Result<Transport> {
    // An embedded packet only needs its ports / identifier (the first 8 bytes, RFC 792).
    match proto {
        protocol::TCP if embedded => {
            let h = seg.get(..8).ok_or(Error::Truncated)?;
            Ok(Transport::Tcp {
                src_port: u16::from_be_bytes([h[0], h[1]]),
                dst_port: u16::from_be_bytes([h[2], h[3]]),
                flags: seg.get(13).copied().unwrap_or(0),
            })
        }
        protocol::TCP => {
            let t = TcpPacket::new_checked(seg)?;
            Ok(Transport::Tcp { src_port: t.src_port(), dst_port: t.dst_port(), flags: t.flags() })
        }
        protocol::UDP => {
            let u = UdpPacket::new_checked(seg)?;
            if !embedded && fragment == Fragment::Whole {
                let l = usize::from(u.len_field());
                if l < UdpPacket::<&[u8]>::HEADER_LEN || l > seg.len() {
                    return Err(Error::BadTransportHeader);
                }
            }
            Ok(Transport::Udp { src_port: u.src_port(), dst_port: u.dst_port() })
        }
        protocol::ICMP if v4 => Ok(icmp(IcmpPacket::new_checked(seg)?, true)),
        protocol::ICMPV6 if !v4 => Ok(icmp(IcmpPacket::new_checked(seg)?, false)),
        _ => Ok(Transport::Other),
    }
}

#[inline]
fn icmp(i: IcmpPacket<&[u8]>, v4: bool) -> Transport {
    let t = i.msg_type();
    let (echo_req, echo_rep) = if v4 {
        (icmpv4::ECHO_REQUEST, icmpv4::ECHO_REPLY)
    } else {
        (icmpv6::ECHO_REQUEST, icmpv6::ECHO_REPLY)
    };
    let is_error = if v4 {
        matches!(t, icmpv4::DEST_UNREACHABLE | icmpv4::TIME_EXCEEDED | icmpv4::PARAMETER_PROBLEM)
    } else {
        matches!(
            t,
            icmpv6::DEST_UNREACHABLE
                | icmpv6::PACKET_TOO_BIG
                | icmpv6::TIME_EXCEEDED
                | icmpv6::PARAMETER_PROBLEM
        )
    };
    if t == echo_req || t == echo_rep {
        Transport::Echo { ident: i.echo_ident(), reply: t == echo_rep }
    } else if is_error {
        Transport::IcmpError { msg_type: t, code: i.code() }
    } else {
        Transport::IcmpOther
    }
}

/// The checksum delta of replacing address `old` by `new` (same family).
pub fn addr_delta(old: IpAddr, new: IpAddr) -> Delta {
    match (old, new) {
        (IpAddr::V4(o), IpAddr::V4(n)) => Delta::new(&o.octets(), &n.octets()),
        (IpAddr::V6(o), IpAddr::V6(n)) => Delta::new(&o.octets(), &n.octets()),
        _ => Delta::default(),
    }
}

/// Writes `a` at `at` in `buf` (4 or 16 bytes).
pub fn write_addr(buf: &mut [u8], at: usize, a: IpAddr) {
    match a {
        IpAddr::V4(v4) => buf[at..at + 4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => buf[at..at + 16].copy_from_slice(&v6.octets()),
    }
}

/// Reads a 16-bit big-endian field.
pub fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

/// Writes a 16-bit big-endian field.
pub fn write_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    // IPv4 192.0.2.10 -> 203.0.113.5, TCP 40000 -> 443, SYN, no options, checksums not set.
    static TCP4: [u8; 40] = [
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 10, 203, 0, 113, 5, 0x9c, 0x40,
        0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];

    /// A `Wide` keeps its 16 bytes in order; IPv4 addresses are mapped; `select` and `pick`
    /// choose as `if` would.
    #[test]
    fn wide_addresses() {
        let v6: IpAddr = "2001:db8::102:304".parse().unwrap();
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let b: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(Wide::from_octets(b).octets(), b);
        assert_eq!(narrow(wide(v6), false), v6);
        assert_eq!(narrow(wide(v4), true), v4);
        let mapped: IpAddr = "::ffff:192.0.2.10".parse().unwrap();
        assert_eq!(narrow(wide(v4), false), mapped);
        assert_eq!(wide(v4).v4_octets(), [192, 0, 2, 10]);
        assert_eq!(Wide::select(true, wide(v4), wide(v6)), wide(v4));
        assert_eq!(Wide::select(false, wide(v4), wide(v6)), wide(v6));
        assert_eq!((pick(true, 3, 5), pick(false, 3, 5)), (3, 5));
        assert_eq!(addr_offsets(true), (ipv4::SRC_OFFSET, ipv4::DST_OFFSET));
        assert_eq!(addr_offsets(false), (ipv6::SRC_OFFSET, ipv6::DST_OFFSET));
        for (p, at) in [(protocol::TCP, 16), (protocol::UDP, 6), (protocol::ICMPV6, 2)] {
            assert_eq!(pseudo_checksum_at(p, 40), Some(40 + at));
        }
        assert_eq!(pseudo_checksum_at(protocol::ICMP, 20), None);
        assert_eq!(checksum_offset(protocol::ICMP), 2);
    }

    #[test]
    fn parses_tcp_v4() {
        let d = parse(&TCP4).unwrap();
        assert_eq!(d.src, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)));
        assert_eq!(d.dst, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)));
        assert_eq!(d.l4, 20);
        assert_eq!(d.len, 40);
        assert_eq!(d.fragment, Fragment::Whole);
        assert_eq!(d.transport, Transport::Tcp { src_port: 40000, dst_port: 443, flags: 0x02 });
        assert_eq!(d.pseudo_checksum_offset(), Some(36));
    }

    #[test]
    fn later_fragment_has_no_transport() {
        let mut b = TCP4;
        b[6] = 0x00;
        b[7] = 0x03; // offset 24 bytes
        let d = parse(&b).unwrap();
        assert_eq!(d.fragment, Fragment::Later);
        assert_eq!(d.transport, Transport::Fragment);
        assert_eq!(d.pseudo_checksum_offset(), None);
    }

    #[test]
    fn first_fragment_needs_whole_transport_header() {
        let mut b = TCP4;
        b[6] = 0x20; // MF
        let d = parse(&b).unwrap();
        assert_eq!(d.fragment, Fragment::First);
        // A tiny first fragment (RFC 1858) that cuts the TCP header.
        b[3] = 30;
        assert_eq!(parse(&b[..30]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn embedded_may_be_truncated() {
        assert!(parse(&TCP4[..28]).is_err());
        let d = parse_embedded(&TCP4[..28]).unwrap();
        assert_eq!(d.len, 28);
        assert_eq!(d.transport, Transport::Tcp { src_port: 40000, dst_port: 443, flags: 0 });
        assert_eq!(parse_embedded(&TCP4[..24]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn unknown_protocol_is_other() {
        let mut b = TCP4;
        b[9] = 47; // GRE
        assert_eq!(parse(&b).unwrap().transport, Transport::Other);
    }

    #[test]
    fn bad_udp_length() {
        let mut b = TCP4;
        b[9] = 17;
        b[24] = 0;
        b[25] = 100; // UDP length 100 > 20 bytes of payload
        assert_eq!(parse(&b).unwrap_err(), Error::BadTransportHeader);
    }

    #[test]
    fn empty_and_bad_version() {
        assert_eq!(parse(&[]).unwrap_err(), Error::Truncated);
        assert_eq!(parse(&[0x50; 40]).unwrap_err(), Error::BadVersion);
    }

    /// Plain packets of every kind the plain parse takes: IPv4 and IPv6, TCP (with options),
    /// UDP, ICMP and ICMPv6 echo, with payload.
    fn plain_packet(v6: bool, kind: u8, payload: usize) -> Vec<u8> {
        let (proto, l4len): (u8, usize) = match kind % 3 {
            0 => (protocol::TCP, 32),
            1 => (protocol::UDP, 8),
            _ => (if v6 { protocol::ICMPV6 } else { protocol::ICMP }, 8),
        };
        let l3 = if v6 { ipv6::HEADER_LEN } else { ipv4::MIN_HEADER_LEN };
        let len = l3 + l4len + payload;
        let mut b = vec![0x11u8; len];
        if v6 {
            b[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, proto, 64]);
            write_u16(&mut b, 4, (len - l3) as u16);
        } else {
            b[..12].copy_from_slice(&[0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0]);
            write_u16(&mut b, 2, len as u16);
        }
        let t = &mut b[l3..];
        t[..4].copy_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        match proto {
            protocol::TCP => t[12] = 0x80,
            protocol::UDP => write_u16(t, 4, (l4len + payload) as u16),
            _ => t[0] = if v6 { icmpv6::ECHO_REQUEST } else { icmpv4::ECHO_REQUEST },
        }
        b
    }

    #[test]
    fn plain_parse_takes_the_common_packets() {
        for v6 in [false, true] {
            for kind in 0..3 {
                let b = plain_packet(v6, kind, 10);
                let p = parse_plain(&b).expect("a plain packet");
                assert_eq!(Ok(p.datagram()), parse_inner(&b, false));
            }
        }
        // Options, fragments and extension headers are for the full parse.
        let mut b = plain_packet(false, 0, 12);
        b[0] = 0x46;
        assert_eq!(parse_plain(&b), None);
        let mut b = plain_packet(false, 1, 12);
        b[6] = 0x20; // MF
        assert_eq!(parse_plain(&b), None);
        let mut b = plain_packet(true, 1, 12);
        b[6] = 0; // hop-by-hop
        assert_eq!(parse_plain(&b), None);
    }

    proptest::proptest! {
        /// Wherever the plain parse answers, the full parse gives the same datagram: plain
        /// packets whose length fields (IP, UDP, TCP data offset) are moved around the bounds
        /// the parsers check, with a few other bytes (version, fragment fields, protocol, ICMP
        /// type...) overwritten and their end cut anywhere.
        #[test]
        fn plain_parse_agrees_with_the_full_parse(
            v6: bool,
            kind in 0u8..3,
            payload in 0usize..40,
            ip_len in -12i32..4,
            l4_len in -4i32..4,
            icmp_type in proptest::sample::select(vec![0u8, 3, 8, 11, 128, 129, 1, 135]),
            doff in 0u8..16,
            bytes in proptest::collection::vec((0usize..80, proptest::prelude::any::<u8>()), 0..3),
            cut in 0usize..300,
        ) {
            let mut b = plain_packet(v6, kind, payload);
            let (ip_at, l3) = if v6 { (4, ipv6::HEADER_LEN) } else { (2, ipv4::MIN_HEADER_LEN) };
            let nudge = |b: &mut Vec<u8>, at: usize, by: i32| {
                let v = i32::from(read_u16(b, at)) + by;
                write_u16(b, at, v.clamp(0, 0xffff) as u16);
            };
            nudge(&mut b, ip_at, ip_len);
            match kind % 3 {
                0 => b[l3 + 12] = doff << 4,
                1 => nudge(&mut b, l3 + 4, l4_len),
                _ => b[l3] = icmp_type,
            }
            for (at, v) in bytes {
                if let Some(x) = b.get_mut(at) {
                    *x = v;
                }
            }
            b.truncate(cut.max(1));
            if let Some(p) = parse_plain(&b) {
                proptest::prop_assert_eq!(Ok(p.datagram()), parse_inner(&b, false));
            }
        }
    }
}
