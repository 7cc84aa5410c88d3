//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624, equation 3).
//!
//! Full sums are used where a packet is built or verified (ICMP errors we check, replies we
//! emit); the translator itself only ever uses [`Delta`]: the one's-complement difference
//! between the old and the new bytes of a rewritten field, computed once and applied to every
//! checksum that covers the field (IPv4 header, TCP/UDP/ICMPv6 pseudo-header, the outer ICMP
//! checksum over an embedded packet).

/// One's-complement sum of `data` as 16-bit big-endian words, added to `initial`.
///
/// An odd trailing byte is padded with zero (RFC 1071). The result is not folded.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        // Two 32-bit halves of a 64-bit word; a u64 accumulator cannot overflow for any
        // packet this crate handles (2^32 words would be needed).
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        acc += u64::from(u32::from_be_bytes([c[4], c[5], c[6], c[7]]));
    }
    let rest = chunks.remainder();
    let mut words = rest.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Folds a wide one's-complement sum into 16 bits (end-around carry).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The one's-complement sum of two 16-bit words: one end-around carry is always enough
/// (0xffff + 0xffff = 0x1fffe folds to 0xffff), so no loop.
#[inline(always)]
fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The checksum field value for `data` (plus an `initial` partial sum such as a pseudo-header).
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    !fold(sum(data, initial))
}

/// The partial sum of the IPv4 pseudo-header (RFC 793 §3.1, RFC 768).
pub fn pseudo_header_v4(src: &[u8; 4], dst: &[u8; 4], protocol: u8, length: u16) -> u64 {
    sum(src, 0) + sum(dst, 0) + u64::from(protocol) + u64::from(length)
}

/// The partial sum of the IPv6 pseudo-header (RFC 8200 §8.1).
pub fn pseudo_header_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, length: u32) -> u64 {
    sum(src, 0) + sum(dst, 0) + u64::from(length) + u64::from(next_header)
}

/// The one's-complement difference between two versions of a field (`!old + new`, folded).
///
/// Applying a delta to a checksum is RFC 1624 equation 3: `HC' = ~(~HC + ~m + m')`. A delta
/// can be computed once (for example per lease, for an address rewrite) and applied to every
/// checksum that covers the field. Deltas add: the delta of two rewrites is their sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delta(u16);

impl Delta {
    /// The delta of replacing `old` by `new`; both must have the same (even) length and start
    /// on a 16-bit boundary of the checksummed data.
    pub fn new(old: &[u8], new: &[u8]) -> Delta {
        debug_assert_eq!(old.len(), new.len());
        // !old summed word by word == (0xffff * words) - old_sum, in one's complement:
        // fold(sum(!old)) == !fold(sum(old)) for a non-empty field.
        let old_sum = fold(sum(old, 0));
        let new_sum = fold(sum(new, 0));
        Delta(add(!old_sum, new_sum))
    }

    /// The delta of replacing one 16-bit word.
    #[inline(always)]
    pub fn word(old: u16, new: u16) -> Delta {
        Delta(add(!old, new))
    }

    /// The delta that undoes this one.
    #[must_use]
    #[inline]
    pub fn negate(self) -> Delta {
        Delta(!self.0)
    }

    /// This delta, or the one that undoes it when `c`, chosen without a branch.
    #[must_use]
    #[inline(always)]
    pub fn negate_if(self, c: bool) -> Delta {
        Delta(self.0 ^ u16::from(c).wrapping_neg())
    }

    /// Applies the delta to a checksum field value (RFC 1624 equation 3).
    #[inline]
    pub fn apply(self, checksum: u16) -> u16 {
        !add(!checksum, self.0)
    }

    /// Applies the delta to a UDP checksum: 0 means "no checksum" (IPv4) and stays 0, and a
    /// computed 0 is sent as 0xffff (RFC 768).
    #[inline]
    pub fn apply_udp(self, checksum: u16) -> u16 {
        if checksum == 0 {
            return 0;
        }
        match self.apply(checksum) {
            0 => 0xffff,
            c => c,
        }
    }

    /// Applies the delta to a partial (pseudo-header only) checksum, as a sender that leaves
    /// the rest to offload hardware stores it: the field holds the sum itself, not its
    /// complement (Linux `inet_proto_csum_replace4` for CHECKSUM_PARTIAL).
    pub fn apply_partial(self, partial: u16) -> u16 {
        add(partial, self.0)
    }

    /// True when the rewrite does not change any checksum.
    pub fn is_zero(self) -> bool {
        self.0 == 0 || self.0 == 0xffff
    }
}

impl std::ops::Add for Delta {
    type Output = Delta;

    /// The delta of both rewrites together.
    fn add(self, other: Delta) -> Delta {
        Delta(add(self.0, other.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1071 §3 example: words 0x0001 0xf203 0xf4f5 0xf6f7 sum to 0xddf2.
    static RFC1071_BYTES: [u8; 8] = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];

    // An IPv4 header (20 bytes) with a correct checksum 0xb861 (the classic Wikipedia example).
    static IPV4_HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn rfc1071_example() {
        assert_eq!(fold(sum(&RFC1071_BYTES, 0)), 0xddf2);
        assert_eq!(checksum(&RFC1071_BYTES, 0), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(fold(sum(&[0x12, 0x34, 0x56], 0)), 0x1234 + 0x5600);
    }

    #[test]
    fn valid_header_sums_to_ones() {
        assert_eq!(fold(sum(&IPV4_HEADER, 0)), 0xffff);
        let mut h = IPV4_HEADER;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h, 0), 0xb861);
    }

    #[test]
    fn incremental_equals_full_for_address_rewrite() {
        let mut h = IPV4_HEADER;
        let old_sum = u16::from_be_bytes([h[10], h[11]]);
        let new_src = [198, 18, 7, 9];
        let delta = Delta::new(&h[12..16], &new_src);
        h[12..16].copy_from_slice(&new_src);
        let incremental = delta.apply(old_sum);
        h[10] = 0;
        h[11] = 0;
        assert_eq!(incremental, checksum(&h, 0));
    }

    #[test]
    fn delta_negate_restores() {
        let d = Delta::new(&[1, 2, 3, 4], &[198, 51, 100, 7]);
        for c in [0u16, 1, 0x1234, 0xfffe, 0xffff] {
            let there = d.apply(c);
            let back = d.negate().apply(there);
            // 0x0000 and 0xffff are the same value in one's complement.
            let canon = |x: u16| if x == 0xffff { 0 } else { x };
            assert_eq!(canon(back), canon(c), "checksum {c:#x}");
        }
    }

    #[test]
    fn udp_zero_stays_zero_and_computed_zero_is_ffff() {
        let d = Delta::new(&[0, 1], &[0, 2]);
        assert_eq!(d.apply_udp(0), 0);
        // Find a checksum whose update is 0 and check the RFC 768 substitution.
        let c = (0..=0xffffu16).find(|c| *c != 0 && d.apply(*c) == 0).unwrap();
        assert_eq!(d.apply_udp(c), 0xffff);
    }

    #[test]
    fn word_delta_matches_slice_delta() {
        assert_eq!(Delta::word(0x1234, 0xabcd), Delta::new(&[0x12, 0x34], &[0xab, 0xcd]));
    }

    #[test]
    fn partial_checksum_follows_sum() {
        let src = [192, 0, 2, 1];
        let new_src = [198, 18, 0, 5];
        let dst = [203, 0, 113, 9];
        let partial = fold(pseudo_header_v4(&src, &dst, 6, 40));
        let expected = fold(pseudo_header_v4(&new_src, &dst, 6, 40));
        assert_eq!(Delta::new(&src, &new_src).apply_partial(partial), expected);
    }
}
