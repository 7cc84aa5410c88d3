//! Prefix sets (the served LAN, the pools) and the pool's address space.
//!
//! Membership tests run for every packet, so a [`PrefixSet`] keeps each prefix as a
//! (network, mask) pair over the hot path's 16-byte addresses. A [`Pool`] adds what
//! allocation needs: the addresses it may hand out (RFC-reserved ones and operator
//! exclusions removed) and a random walk over them driven by a caller-seeded generator.

use crate::wire::{wide, Wide};
use ipnet::IpNet;
use rand_core::RngCore;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A set of IPv4 and IPv6 prefixes with a fast `contains`.
#[derive(Debug, Clone, Default)]
pub struct PrefixSet {
    /// The prefixes as (network, mask) over [`Wide`] addresses (IPv4 ones mapped), in rows of
    /// one IPv4 and one IPv6 prefix; the family with fewer has rows that match nothing, so a
    /// lookup runs the same number of rounds for either family.
    rows: Vec<[(Wide, Wide); 2]>,
}

/// A (network, mask) that matches no address: a bit set in the network, not in the mask.
const NOTHING: (Wide, Wide) = (Wide::ONE, Wide::ZERO);

impl PrefixSet {
    /// Builds the set (host bits of each prefix are ignored).
    pub fn new(nets: &[IpNet]) -> PrefixSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for n in nets {
            match n.trunc() {
                IpNet::V4(p) => {
                    // The mapped prefix (`::ffff:0:0/96`) is all set in a mapped address.
                    let mut mask = [0xff; 16];
                    mask[12..].copy_from_slice(&p.netmask().octets());
                    v4.push((Wide::from_v4(p.network().octets()), Wide::from_octets(mask)));
                }
                IpNet::V6(p) => v6.push((
                    Wide::from_octets(p.network().octets()),
                    Wide::from_octets(p.netmask().octets()),
                )),
            }
        }
        let rows = (0..v4.len().max(v6.len()))
            .map(|i| [*v4.get(i).unwrap_or(&NOTHING), *v6.get(i).unwrap_or(&NOTHING)])
            .collect();
        PrefixSet { rows }
    }

    /// True when `a` lies in one of the prefixes.
    #[inline]
    pub fn contains(&self, a: IpAddr) -> bool {
        self.contains_wide(&wide(a), a.is_ipv4())
    }

    /// [`PrefixSet::contains`] for an address as the fast path holds it.
    ///
    /// Every row is tested, whatever the family and whether one already matched: the loop
    /// runs as many times for every packet, so it costs no misprediction on mixed traffic.
    #[inline]
    pub fn contains_wide(&self, a: &Wide, v4: bool) -> bool {
        let [a0, a1] = a.words();
        let family = usize::from(!v4);
        self.rows.iter().fold(false, |hit, row| {
            let ([n0, n1], [m0, m1]) = (row[family].0.words(), row[family].1.words());
            hit | ((a0 & m0 == n0) & (a1 & m1 == n1))
        })
    }

    /// True when the set has a prefix of `a`'s family.
    pub fn has_family_of(&self, a: IpAddr) -> bool {
        self.rows.iter().any(|row| row[usize::from(a.is_ipv6())] != NOTHING)
    }
}

/// One prefix of a pool as a contiguous integer range.
#[derive(Debug, Clone, Copy)]
struct Range {
    start: u128,
    size: u128,
    prefix_len: u8,
}

/// The virtual addresses a translator may rent out.
#[derive(Debug, Clone)]
pub struct Pool {
    prefixes: PrefixSet,
    exclude: PrefixSet,
    v4: Vec<Range>,
    v6: Vec<Range>,
    total_v4: u128,
    total_v6: u128,
}

/// Random probes tried before a linear scan of the pool.
pub const RANDOM_PROBES: u32 = 16;
/// The most addresses a linear scan visits for one allocation (bounds the work a full pool
/// costs per new lease).
pub const SCAN_LIMIT: u128 = 1 << 16;

impl Pool {
    /// Builds a pool from prefixes and exclusions.
    pub fn new(prefixes: &[IpNet], exclude: &[IpNet]) -> Pool {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for p in prefixes {
            let p = p.trunc();
            match p {
                IpNet::V4(n) => v4.push(Range {
                    start: u128::from(u32::from(n.network())),
                    size: 1u128 << (32 - n.prefix_len()),
                    prefix_len: n.prefix_len(),
                }),
                IpNet::V6(n) => v6.push(Range {
                    start: u128::from(n.network()),
                    size: if n.prefix_len() == 0 {
                        u128::MAX
                    } else {
                        1u128 << (128 - n.prefix_len())
                    },
                    prefix_len: n.prefix_len(),
                }),
            }
        }
        let total_v4 = v4.iter().map(|r| r.size).sum();
        let total_v6 = v6.iter().fold(0u128, |a, r| a.saturating_add(r.size));
        Pool {
            prefixes: PrefixSet::new(prefixes),
            exclude: PrefixSet::new(exclude),
            v4,
            v6,
            total_v4,
            total_v6,
        }
    }

    /// True when `a` lies in a pool prefix (whether or not it may be handed out).
    #[inline]
    pub fn contains(&self, a: IpAddr) -> bool {
        self.prefixes.contains(a)
    }

    /// The pool prefixes.
    pub fn prefixes(&self) -> &PrefixSet {
        &self.prefixes
    }

    /// From now on, never hands out addresses in `exclude` (leases that have one keep it).
    pub fn set_exclude(&mut self, exclude: &[IpNet]) {
        self.exclude = PrefixSet::new(exclude);
    }

    /// True when `a` may be rented out: in a prefix, not excluded, and not the network or
    /// broadcast address of an IPv4 prefix shorter than /31, nor the subnet-router anycast
    /// address of an IPv6 prefix shorter than /127 (RFC 4291 §2.6.1).
    pub fn is_allocatable(&self, a: IpAddr) -> bool {
        if self.exclude.contains(a) {
            return false;
        }
        let (ranges, x) = match a {
            IpAddr::V4(v4) => (&self.v4, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (&self.v6, u128::from(v6)),
        };
        let limit = if a.is_ipv4() { 31 } else { 127 };
        ranges.iter().any(|r| {
            let off = x.wrapping_sub(r.start);
            if off >= r.size && r.size != u128::MAX {
                return false;
            }
            if r.prefix_len >= limit {
                return true;
            }
            let broadcast = a.is_ipv4() && off == r.size - 1;
            off != 0 && !broadcast
        })
    }

    /// How many addresses of the family of `v4` the prefixes span (before exclusions).
    pub fn span(&self, v4: bool) -> u128 {
        if v4 {
            self.total_v4
        } else {
            self.total_v6
        }
    }

    /// Candidate addresses for one allocation, in the order to try them: a few random ones,
    /// then a linear scan from a random point, bounded by [`SCAN_LIMIT`]. Only allocatable
    /// addresses are yielded.
    pub fn candidates<'a, R: RngCore>(&'a self, v4: bool, rng: &'a mut R) -> Candidates<'a, R> {
        let total = self.span(v4);
        let scan = total.min(SCAN_LIMIT);
        Candidates {
            pool: self,
            v4,
            rng,
            total,
            probes: RANDOM_PROBES,
            scan_left: scan,
            cursor: None,
        }
    }

    fn nth(&self, v4: bool, mut i: u128) -> IpAddr {
        let ranges = if v4 { &self.v4 } else { &self.v6 };
        for r in ranges {
            if i < r.size {
                let x = r.start + i;
                return if v4 {
                    IpAddr::V4(Ipv4Addr::from(x as u32))
                } else {
                    IpAddr::V6(Ipv6Addr::from(x))
                };
            }
            i -= r.size;
        }
        unreachable!("index within the pool span")
    }
}

/// Iterator over allocation candidates; see [`Pool::candidates`].
pub struct Candidates<'a, R: RngCore> {
    pool: &'a Pool,
    v4: bool,
    rng: &'a mut R,
    total: u128,
    probes: u32,
    scan_left: u128,
    cursor: Option<u128>,
}

impl<R: RngCore> Candidates<'_, R> {
    fn random_index(&mut self) -> u128 {
        let r = (u128::from(self.rng.next_u64()) << 64) | u128::from(self.rng.next_u64());
        if self.total == u128::MAX {
            r
        } else {
            r % self.total
        }
    }
}

impl<R: RngCore> Iterator for Candidates<'_, R> {
    type Item = IpAddr;

    fn next(&mut self) -> Option<IpAddr> {
        if self.total == 0 {
            return None;
        }
        while self.probes > 0 {
            self.probes -= 1;
            let i = self.random_index();
            let a = self.pool.nth(self.v4, i);
            if self.pool.is_allocatable(a) {
                return Some(a);
            }
        }
        while self.scan_left > 0 {
            self.scan_left -= 1;
            let i = match self.cursor {
                None => self.random_index(),
                Some(c) => {
                    if c + 1 >= self.total {
                        0
                    } else {
                        c + 1
                    }
                }
            };
            self.cursor = Some(i);
            let a = self.pool.nth(self.v4, i);
            if self.pool.is_allocatable(a) {
                return Some(a);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha12Rng;
    use rand_core::SeedableRng;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    #[test]
    fn prefix_set_contains() {
        let s = PrefixSet::new(&nets(&["192.0.2.0/24", "2001:db8:1::/48"]));
        assert!(s.contains("192.0.2.77".parse().unwrap()));
        assert!(!s.contains("192.0.3.1".parse().unwrap()));
        assert!(s.contains("2001:db8:1:ffff::1".parse().unwrap()));
        assert!(!s.contains("2001:db8:2::1".parse().unwrap()));
    }

    /// Rows pad the family with fewer prefixes with entries that match nothing; a mapped IPv6
    /// address is not taken for an IPv4 one, nor the other way round.
    #[test]
    fn prefix_set_families_stay_apart() {
        let s = PrefixSet::new(&nets(&["192.0.2.0/24", "198.51.100.128/25", "0.0.0.0/0"][..2]));
        let a = |x: &str| x.parse::<IpAddr>().unwrap();
        assert!(s.contains(a("198.51.100.200")) && !s.contains(a("198.51.100.1")));
        assert!(s.has_family_of(a("192.0.2.1")) && !s.has_family_of(a("2001:db8::1")));
        for v6 in ["::", "::ffff:192.0.2.1", "2001:db8::1"] {
            assert!(!s.contains(a(v6)), "{v6}");
        }
        let all = PrefixSet::new(&nets(&["::/0", "2001:db8::/32", "192.0.2.0/24"]));
        assert!(all.contains(a("::ffff:198.51.100.1")) && all.contains(a("::")));
        assert!(!all.contains(a("198.51.100.1")), "an IPv4 address is not in ::/0");
        assert!(all.has_family_of(a("192.0.2.9")));
        assert!(PrefixSet::new(&[]).rows.is_empty());
    }

    #[test]
    fn v4_network_and_broadcast_excluded_below_31() {
        let p = Pool::new(&nets(&["198.18.0.0/30", "198.18.1.0/31", "198.18.2.1/32"]), &[]);
        let ok = |s: &str| p.is_allocatable(s.parse().unwrap());
        assert!(!ok("198.18.0.0"));
        assert!(ok("198.18.0.1"));
        assert!(ok("198.18.0.2"));
        assert!(!ok("198.18.0.3"));
        assert!(ok("198.18.1.0"));
        assert!(ok("198.18.1.1"));
        assert!(ok("198.18.2.1"));
        assert!(!ok("198.18.3.1"));
    }

    #[test]
    fn v6_subnet_router_anycast_and_exclusions() {
        let p = Pool::new(&nets(&["2001:db8:5::/120"]), &nets(&["2001:db8:5::10/126"]));
        assert!(!p.is_allocatable("2001:db8:5::".parse().unwrap()));
        assert!(p.is_allocatable("2001:db8:5::1".parse().unwrap()));
        assert!(!p.is_allocatable("2001:db8:5::12".parse().unwrap()));
        assert!(p.is_allocatable("2001:db8:5::ff".parse().unwrap()));
    }

    #[test]
    fn candidates_cover_a_small_pool_and_stay_inside() {
        let p = Pool::new(&nets(&["198.18.0.0/29"]), &nets(&["198.18.0.3/32"]));
        let mut rng = ChaCha12Rng::seed_from_u64(7);
        let mut seen: Vec<IpAddr> = p.candidates(true, &mut rng).collect();
        assert!(seen.iter().all(|a| p.is_allocatable(*a)));
        seen.sort();
        seen.dedup();
        // .1 .2 .4 .5 .6 (network .0, broadcast .7 and excluded .3 never appear)
        assert_eq!(seen.len(), 5);
        assert_eq!(p.candidates(false, &mut rng).next(), None);
    }

    #[test]
    fn candidates_are_seeded() {
        let p = Pool::new(&nets(&["198.18.0.0/16"]), &[]);
        let a: Vec<_> = p.candidates(true, &mut ChaCha12Rng::seed_from_u64(1)).take(4).collect();
        let b: Vec<_> = p.candidates(true, &mut ChaCha12Rng::seed_from_u64(1)).take(4).collect();
        let c: Vec<_> = p.candidates(true, &mut ChaCha12Rng::seed_from_u64(2)).take(4).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn huge_v6_pool() {
        let p = Pool::new(&nets(&["2001:db8::/32"]), &[]);
        let mut rng = ChaCha12Rng::seed_from_u64(3);
        let a = p.candidates(false, &mut rng).next().unwrap();
        assert!(p.contains(a));
    }
}
