//! The virtio-net header a TUN device opened with `IFF_VNET_HDR` puts before every packet,
//! and the two things a reader of such packets may have to do itself: complete a partial
//! checksum, and cut a GSO super-packet into the segments the kernel would have made.
//!
//! With `TUNSETOFFLOAD` the kernel may hand over (and accept back) a TCP or UDP "super-packet"
//! of up to 64 KB whose transport checksum is *partial*: the field holds only the
//! pseudo-header sum, not complemented, and `csum_start`/`csum_offset` say where the device
//! must finish it (`VIRTIO_NET_HDR_F_NEEDS_CSUM`). A gateway that rewrites addresses updates
//! such a field with [`Delta::apply_partial`](super::Delta::apply_partial), never with the
//! RFC 1624 rule for a finished checksum.
//!
//! [`segment`] is the software fallback for a kernel that refuses a super-packet on write,
//! and the model the tests compare the kernel's own segmentation with: it follows Linux
//! `tcp_gso_segment`/`__udp_gso_segment` (IPv4 ID +1 per segment, sequence numbers advance,
//! FIN and PSH only on the last TCP segment, CWR only on the first, every checksum full).

use super::checksum::{checksum, fold, sum};
use super::{protocol, read_u16, write_u16};

/// Length of the header (`struct virtio_net_hdr`, no `num_buffers`).
pub const HDR_LEN: usize = 10;
/// The device must finish the checksum at `csum_start + csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// The checksum was verified (read) / need not be (write).
pub const F_DATA_VALID: u8 = 2;
/// Not a super-packet.
pub const GSO_NONE: u8 = 0;
/// A TCP over IPv4 super-packet.
pub const GSO_TCPV4: u8 = 1;
/// An IPv4 UDP packet to fragment (UFO; never enabled by us).
pub const GSO_UDP: u8 = 3;
/// A TCP over IPv6 super-packet.
pub const GSO_TCPV6: u8 = 4;
/// A UDP super-packet cut into datagrams of `gso_size` payload bytes (USO).
pub const GSO_UDP_L4: u8 = 5;
/// Flag on `gso_type`: the TCP stream uses ECN (CWR only on the first segment).
pub const GSO_ECN: u8 = 0x80;
/// Most segments [`segment`] makes of one super-packet (64 KB in 1-byte segments would be
/// more; the kernel never sends a `gso_size` that small).
pub const MAX_SEGMENTS: usize = 256;

/// `struct virtio_net_hdr` in host byte order (a TUN device uses the host's, little-endian
/// here, unless `TUNSETVNETBE` said otherwise; we never do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (a hint; we compute our own).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed bytes start.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field is.
    pub csum_offset: u16,
}

/// How the transport checksum of a packet is to be updated when its addresses change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// A finished checksum: RFC 1624.
    Full,
    /// A partial checksum (pseudo-header sum only) in the field at this byte offset.
    Partial {
        /// Offset of the checksum field in the IP packet.
        at: usize,
    },
}

/// Why an offloaded packet cannot be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// `csum_start`/`csum_offset` point outside the packet.
    #[error("checksum offsets outside the packet")]
    ChecksumOutside,
    /// A GSO type we do not handle (UFO, or an unknown value).
    #[error("unsupported GSO type")]
    UnsupportedGso,
    /// The super-packet's headers are not what its GSO type says.
    #[error("malformed super-packet")]
    Malformed,
    /// More segments than [`MAX_SEGMENTS`], or `gso_size` 0.
    #[error("bad segment size")]
    BadSegmentSize,
}

impl VnetHdr {
    /// Reads the header from the first [`HDR_LEN`] bytes of `b`.
    pub fn read(b: &[u8]) -> VnetHdr {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    /// Writes the header into the first [`HDR_LEN`] bytes of `b`.
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// True when the packet is a super-packet.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }

    /// True when the transport checksum is partial.
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }

    /// The checksum field's offset, when the checksum is partial.
    fn csum_at(&self, len: usize) -> Result<Option<usize>, OffloadError> {
        if !self.needs_csum() {
            return Ok(None);
        }
        let at = usize::from(self.csum_start) + usize::from(self.csum_offset);
        if at + 2 > len {
            return Err(OffloadError::ChecksumOutside);
        }
        Ok(Some(at))
    }
}

/// Decides how the translator must treat the transport checksum of `packet` as read with
/// `hdr`. A partial checksum of a plain TCP or UDP header (the kernel's every case) stays
/// partial; any other partial checksum of a single packet is finished here, in software, and
/// the header says so. A super-packet must be TCP or UDP (USO) with a partial checksum at its
/// transport header.
pub fn prepare(hdr: &mut VnetHdr, packet: &mut [u8]) -> Result<Checksum, OffloadError> {
    let Some(at) = hdr.csum_at(packet.len())? else {
        return if hdr.is_gso() { Err(OffloadError::Malformed) } else { Ok(Checksum::Full) };
    };
    if hdr.is_gso() {
        let gso = hdr.gso_type & !GSO_ECN;
        if !matches!(gso, GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4) {
            return Err(OffloadError::UnsupportedGso);
        }
        return Ok(Checksum::Partial { at });
    }
    if plain_transport_checksum(packet) == Some(at) {
        return Ok(Checksum::Partial { at });
    }
    finish_checksum(hdr, packet)?;
    Ok(Checksum::Full)
}

/// The checksum offset of a TCP or UDP header right after an IPv4 header or a bare IPv6
/// header (no extension headers), if that is what `packet` is.
fn plain_transport_checksum(packet: &[u8]) -> Option<usize> {
    let (proto, l4) = match packet.first()? >> 4 {
        4 => (*packet.get(9)?, usize::from(packet[0] & 0x0f) * 4),
        6 => (*packet.get(6)?, 40),
        _ => return None,
    };
    match proto {
        protocol::TCP => Some(l4 + 16),
        protocol::UDP => Some(l4 + 6),
        _ => None,
    }
}

/// Finishes a partial checksum in software (Linux `skb_checksum_help`): sums from
/// `csum_start` to the end of the packet, stores the complement, and clears `F_NEEDS_CSUM`.
/// A UDP checksum that comes out 0 is sent as 0xffff.
pub fn finish_checksum(hdr: &mut VnetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    let Some(at) = hdr.csum_at(packet.len())? else { return Ok(()) };
    let start = usize::from(hdr.csum_start);
    let mut c = checksum(&packet[start..], 0);
    if c == 0 && hdr.csum_offset == 6 {
        c = 0xffff;
    }
    write_u16(packet, at, c);
    hdr.flags &= !F_NEEDS_CSUM;
    Ok(())
}

/// Cuts the super-packet `packet` (read with `hdr`, partial checksum) into segments with
/// full checksums, the way the kernel would, and hands each to `emit`. `scratch` must hold one
/// segment (`headers + gso_size` bytes). Returns the number of segments; a packet that is not
/// a super-packet is `UnsupportedGso`.
pub fn segment(
    hdr: &VnetHdr,
    packet: &[u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let gso = hdr.gso_type & !GSO_ECN;
    let v4 = match (gso, packet.first().map(|b| b >> 4)) {
        (GSO_TCPV4, Some(4)) | (GSO_UDP_L4, Some(4)) => true,
        (GSO_TCPV6, Some(6)) | (GSO_UDP_L4, Some(6)) => false,
        (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4, _) => return Err(OffloadError::Malformed),
        _ => return Err(OffloadError::UnsupportedGso),
    };
    let tcp = gso != GSO_UDP_L4;
    let l4 = usize::from(hdr.csum_start);
    let proto = if tcp { protocol::TCP } else { protocol::UDP };
    if l4 < if v4 { 20 } else { 40 } || l4 + if tcp { 20 } else { 8 } > packet.len() {
        return Err(OffloadError::Malformed);
    }
    let l4_len = if tcp { usize::from(packet[l4 + 12] >> 4) * 4 } else { 8 };
    let headers = l4 + l4_len;
    let ip_ok = if v4 {
        packet[9] == proto && usize::from(read_u16(packet, 2)) == packet.len()
    } else {
        usize::from(read_u16(packet, 4)) + 40 == packet.len()
    };
    if !ip_ok
        || l4_len < if tcp { 20 } else { 8 }
        || headers > packet.len()
        || hdr.csum_offset != csum_offset(tcp)
    {
        return Err(OffloadError::Malformed);
    }
    let mss = usize::from(hdr.gso_size);
    let payload = &packet[headers..];
    if payload.is_empty() {
        return Err(OffloadError::Malformed);
    }
    if mss == 0 || payload.len().div_ceil(mss) > MAX_SEGMENTS || headers + mss > scratch.len() {
        return Err(OffloadError::BadSegmentSize);
    }
    let segments = payload.len().div_ceil(mss);
    let partial = read_u16(packet, l4 + usize::from(csum_offset(tcp)));
    let super_len = (packet.len() - l4) as u16;
    let id = if v4 { read_u16(packet, 4) } else { 0 };
    let seq = if tcp { u32::from_be_bytes(packet[l4 + 4..l4 + 8].try_into().unwrap()) } else { 0 };
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let len = headers + chunk.len();
        let seg = &mut scratch[..len];
        seg[..headers].copy_from_slice(&packet[..headers]);
        seg[headers..].copy_from_slice(chunk);
        let l4_total = len - l4;
        if v4 {
            write_u16(seg, 2, len as u16);
            write_u16(seg, 4, id.wrapping_add(i as u16));
            write_u16(seg, 10, 0);
            let c = checksum(&seg[..l4], 0);
            write_u16(seg, 10, c);
        } else {
            write_u16(seg, 4, (len - 40) as u16);
        }
        if tcp {
            let s = seq.wrapping_add((i * mss) as u32);
            seg[l4 + 4..l4 + 8].copy_from_slice(&s.to_be_bytes());
            if i + 1 < segments {
                seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                seg[l4 + 13] &= !TCP_CWR;
            }
        } else {
            write_u16(seg, l4 + 4, l4_total as u16);
        }
        // As the kernel does: the partial sum stays the pseudo-header's, with the segment's
        // length for the super-packet's (so a wrong partial sum gives wrong segments).
        let at = l4 + usize::from(csum_offset(tcp));
        let pseudo = fold(u64::from(partial) + u64::from(!super_len) + l4_total as u64);
        write_u16(seg, at, 0);
        let mut c = !fold(sum(&seg[l4..], u64::from(pseudo)));
        if c == 0 && !tcp {
            c = 0xffff;
        }
        write_u16(seg, at, c);
        emit(seg);
    }
    Ok(segments)
}

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

fn csum_offset(tcp: bool) -> u16 {
    if tcp {
        16
    } else {
        6
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A TCP/IPv4 packet of `payload` bytes from 192.0.2.1 to 203.0.113.1, partial checksum.
    fn tcp4(payload: usize) -> Vec<u8> {
        let len = 40 + payload;
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = protocol::TCP;
        p[12..16].copy_from_slice(&[192, 0, 2, 1]);
        p[16..20].copy_from_slice(&[203, 0, 113, 1]);
        let c = checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x18;
        let pseudo = sum(&p[12..20], 0) + u64::from(protocol::TCP) + (20 + payload) as u64;
        p[36..38].copy_from_slice(&fold(pseudo).to_be_bytes());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    fn partial_hdr(gso_type: u8, gso_size: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: 40,
            gso_size,
            csum_start: 20,
            csum_offset: 16,
        }
    }

    #[test]
    fn header_round_trip_is_little_endian() {
        let h = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        let mut b = [0u8; HDR_LEN];
        h.write(&mut b);
        assert_eq!(b, [1, 0x84, 2, 1, 4, 3, 6, 5, 8, 7]);
        assert_eq!(VnetHdr::read(&b), h);
        assert!(h.is_gso() && h.needs_csum());
        assert!(!VnetHdr { gso_type: GSO_ECN, ..h }.is_gso());
    }

    #[test]
    fn prepare_keeps_tcp_partial_and_refuses_what_it_cannot_handle() {
        let mut p = tcp4(100);
        let mut h = partial_hdr(GSO_NONE, 0);
        assert_eq!(prepare(&mut h, &mut p), Ok(Checksum::Partial { at: 36 }));
        let mut h = partial_hdr(GSO_TCPV4, 50);
        assert_eq!(prepare(&mut h, &mut p), Ok(Checksum::Partial { at: 36 }));
        let mut h = partial_hdr(GSO_UDP, 50);
        assert_eq!(prepare(&mut h, &mut p), Err(OffloadError::UnsupportedGso));
        let mut h = VnetHdr { csum_start: 200, ..partial_hdr(GSO_NONE, 0) };
        assert_eq!(prepare(&mut h, &mut p), Err(OffloadError::ChecksumOutside));
        let mut h = VnetHdr { flags: 0, ..partial_hdr(GSO_TCPV4, 50) };
        assert_eq!(prepare(&mut h, &mut p), Err(OffloadError::Malformed));
        let mut h = VnetHdr::default();
        assert_eq!(prepare(&mut h, &mut p), Ok(Checksum::Full));
    }

    #[test]
    fn finish_checksum_equals_a_full_computation() {
        let mut p = tcp4(333);
        let mut h = partial_hdr(GSO_NONE, 0);
        finish_checksum(&mut h, &mut p).unwrap();
        assert!(!h.needs_csum());
        let pseudo = sum(&p[12..20], 0) + u64::from(protocol::TCP) + 353;
        assert_eq!(fold(sum(&p[20..], pseudo)), 0xffff, "the finished checksum verifies");
    }

    #[test]
    fn segments_carry_sequence_ids_lengths_and_flags_like_the_kernel() {
        let mut p = tcp4(250);
        p[8] = 65;
        p[10..12].fill(0);
        let c = checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        p[24..28].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
        p[33] = 0x80 | 0x18 | 0x01; // CWR PSH ACK FIN
        let h = partial_hdr(GSO_TCPV4 | GSO_ECN, 100);
        let mut scratch = [0u8; 2048];
        let mut segs = Vec::new();
        assert_eq!(segment(&h, &p, &mut scratch, |s| segs.push(s.to_vec())), Ok(3));
        let lens: Vec<usize> = segs.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [140, 140, 90]);
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(read_u16(s, 2) as usize, s.len());
            assert_eq!(read_u16(s, 4), 0xfffeu16.wrapping_add(i as u16));
            assert_eq!(checksum(&s[..20], 0), 0, "IPv4 header checksum");
            // The TTL the translator gave the super-packet is every segment's.
            assert_eq!(s[8], p[8], "TTL of segment {i}");
            let seq = u32::from_be_bytes(s[24..28].try_into().unwrap());
            assert_eq!(seq, 0xffff_ff00u32.wrapping_add(100 * i as u32));
            let pseudo = sum(&s[12..20], 0) + u64::from(protocol::TCP) + (s.len() - 20) as u64;
            assert_eq!(fold(sum(&s[20..], pseudo)), 0xffff, "TCP checksum of segment {i}");
        }
        assert_eq!([segs[0][33], segs[1][33], segs[2][33]], [0x90, 0x10, 0x19]);
    }

    #[test]
    fn segment_refuses_bad_sizes_and_shapes() {
        let p = tcp4(250);
        let mut scratch = [0u8; 2048];
        let mut n = 0;
        let mut cut =
            |h: VnetHdr, p: &[u8], scratch: &mut [u8]| segment(&h, p, scratch, |_| n += 1);
        assert_eq!(
            cut(partial_hdr(GSO_TCPV4, 0), &p, &mut scratch),
            Err(OffloadError::BadSegmentSize)
        );
        assert_eq!(cut(partial_hdr(GSO_TCPV4, 1), &p, &mut scratch), Ok(250));
        assert_eq!(
            cut(partial_hdr(GSO_TCPV4, 4000), &p, &mut scratch),
            Err(OffloadError::BadSegmentSize)
        );
        assert_eq!(
            cut(partial_hdr(GSO_TCPV6, 100), &p, &mut scratch),
            Err(OffloadError::Malformed)
        );
        assert_eq!(
            cut(partial_hdr(GSO_UDP, 100), &p, &mut scratch),
            Err(OffloadError::UnsupportedGso)
        );
        assert_eq!(
            cut(partial_hdr(GSO_TCPV4, 100), &p[..39], &mut scratch),
            Err(OffloadError::Malformed)
        );
        assert_eq!(
            cut(partial_hdr(GSO_TCPV4, 100), &tcp4(0), &mut scratch),
            Err(OffloadError::Malformed)
        );
    }

    proptest! {
        /// Any header with any bytes: `prepare` and `segment` answer, never panic, and every
        /// segment fits the scratch buffer.
        #[test]
        fn arbitrary_frames_never_panic(
            hdr in proptest::array::uniform10(any::<u8>()),
            bytes in proptest::collection::vec(any::<u8>(), 0..1600),
            scratch_len in 0usize..1700,
        ) {
            let mut h = VnetHdr::read(&hdr);
            let mut p = bytes.clone();
            let _ = prepare(&mut h, &mut p);
            let mut scratch = vec![0u8; scratch_len];
            let _ = segment(&VnetHdr::read(&hdr), &bytes, &mut scratch, |s| assert!(s.len() <= scratch_len));
        }

        /// Mutations of a valid super-packet and its header never panic either.
        #[test]
        fn mutated_super_packets_never_panic(
            payload in 1usize..3000,
            flips in proptest::collection::vec((0usize..3050, any::<u8>()), 0..6),
            gso_size in 0u16..2000,
            csum_start in 0u16..80,
        ) {
            let mut p = tcp4(payload);
            for (at, v) in flips {
                if let Some(b) = p.get_mut(at) {
                    *b ^= v;
                }
            }
            let h = VnetHdr { gso_size, csum_start, ..partial_hdr(GSO_TCPV4, 0) };
            let mut scratch = vec![0u8; 4096];
            let _ = segment(&h, &p, &mut scratch, |_| {});
            let _ = prepare(&mut h.clone(), &mut p);
        }
    }
}
