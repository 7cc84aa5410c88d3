//! Unit tests of the translator: byte-literal packets (from the Python oracle in
//! `tests/vectors/`) for every translation case, the policies, bad input, and expiry on
//! explicit simulated time.

use super::vectors::*;
use super::*;
use std::net::IpAddr;
use std::time::{Duration, Instant};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn nets(s: &[&str]) -> Vec<IpNet> {
    s.iter().map(|x| x.parse().unwrap()).collect()
}

/// One-address pools, so the virtual address is known: 198.18.0.1 and 2001:db8:ff::1.
fn single() -> Config {
    let mut c = Config::new(
        nets(&["192.0.2.0/24", "2001:db8:1::/48"]),
        nets(&["198.18.0.1/32", "2001:db8:ff::1/128"]),
    );
    c.icmp_source_v6 = Some("2001:db8:1::fffe".parse().unwrap());
    c
}

/// /24 and /64 pools.
fn wide() -> Config {
    Config::new(
        nets(&["192.0.2.0/24", "2001:db8:1::/48"]),
        nets(&["198.18.0.0/24", "2001:db8:ff::/64"]),
    )
}

struct Harness {
    t: Translator,
    t0: Instant,
}

impl Harness {
    fn new(c: Config) -> Harness {
        let t0 = Instant::now();
        Harness { t: Translator::new(c, [42; 32], t0).unwrap(), t0 }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    /// Translates a copy of `input` at time `secs`; returns the verdict kind and the bytes.
    fn run(&mut self, input: &[u8], secs: f64) -> (Result<Direction, DropReason>, Vec<u8>) {
        let mut b = input.to_vec();
        let now = self.at(secs);
        let v = match self.t.translate(&mut b, now) {
            Verdict::Forward(d) => Ok(d),
            Verdict::Drop(r) => Err(r),
            Verdict::Reply(r, reply) => {
                let reply = reply.to_vec();
                return (Err(r), reply);
            }
            Verdict::Hold => panic!("held: use translate() directly in durability tests"),
            Verdict::Pass => panic!("passed: use translate() directly"),
        };
        (v, b)
    }

    fn expect(&mut self, input: &[u8], dir: Direction, output: &[u8], secs: f64) {
        let (v, b) = self.run(input, secs);
        assert_eq!(v, Ok(dir));
        assert_eq!(b, output, "translated bytes differ from the oracle's");
    }

    /// Translates and asserts the packet was forwarded.
    fn ok(&mut self, input: &[u8], secs: f64) -> Vec<u8> {
        let (v, b) = self.run(input, secs);
        assert!(v.is_ok(), "expected a forward, got {v:?}");
        b
    }

    fn tick(&mut self, secs: f64) {
        let now = self.at(secs);
        self.t.handle_timeout(now);
    }

    /// A UDP packet from `src`:`sport` to `dst`:`dport` (checksums left 0: the translator
    /// does not verify them on data packets).
    fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
        let (s, d) = (ip(src), ip(dst));
        let mut b = match (s, d) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut b = vec![0u8; 28];
                crate::wire::ipv4::emit_header(&mut b, s, d, 17, 8, 64);
                b
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut b = vec![0u8; 48];
                crate::wire::ipv6::emit_header(&mut b, s, d, 17, 8, 64);
                b
            }
            _ => unreachable!(),
        };
        let l4 = b.len() - 8;
        b[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
        b[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
        b[l4 + 4..l4 + 6].copy_from_slice(&8u16.to_be_bytes());
        b
    }

    fn src_of(b: &[u8]) -> IpAddr {
        crate::wire::parse(b).unwrap().src
    }
}

// ---- translation, byte for byte against the oracle ----

#[test]
fn tcp_v4_both_ways() {
    let mut h = Harness::new(single());
    h.expect(&TCP4_SYN_OUT, Direction::Outbound, &TCP4_SYN_OUT_X, 0.0);
    h.expect(&TCP4_SYNACK_IN, Direction::Inbound, &TCP4_SYNACK_IN_X, 0.1);
    assert_eq!(h.t.counters().outbound, 1);
    assert_eq!(h.t.counters().inbound, 1);
}

#[test]
fn udp_v4_with_options_and_zero_checksum() {
    let mut h = Harness::new(single());
    h.expect(&UDP4_OUT, Direction::Outbound, &UDP4_OUT_X, 0.0);
    h.expect(&UDP4_NOCSUM_OUT, Direction::Outbound, &UDP4_NOCSUM_OUT_X, 0.0);
}

#[test]
fn icmp_echo_v4_both_ways() {
    let mut h = Harness::new(single());
    h.expect(&ECHO4_OUT, Direction::Outbound, &ECHO4_OUT_X, 0.0);
    h.expect(&ECHO4_REPLY_IN, Direction::Inbound, &ECHO4_REPLY_IN_X, 0.0);
}

#[test]
fn icmp_error_v4_inbound_full_and_short_quote() {
    let mut h = Harness::new(single());
    h.expect(&UDP4_OUT, Direction::Outbound, &UDP4_OUT_X, 0.0);
    h.expect(&FRAGNEEDED4_IN, Direction::Inbound, &FRAGNEEDED4_IN_X, 0.0);
    h.expect(&PORTUNREACH4_SHORT_IN, Direction::Inbound, &PORTUNREACH4_SHORT_IN_X, 0.0);
    assert_eq!(h.t.counters().icmp_errors_translated, 2);
}

#[test]
fn icmp_error_v4_outbound() {
    let mut h = Harness::new(single());
    h.expect(&TCP4_SYN_OUT, Direction::Outbound, &TCP4_SYN_OUT_X, 0.0);
    h.expect(&UNREACH4_OUT, Direction::Outbound, &UNREACH4_OUT_X, 0.0);
}

#[test]
fn icmp_error_checks() {
    let mut h = Harness::new(single());
    // No lease yet: the embedded packet matches nothing (RFC 5508 REQ-4).
    assert_eq!(h.run(&FRAGNEEDED4_IN, 0.0).0, Err(DropReason::IcmpErrorNoLease));
    h.ok(&UDP4_OUT, 0.0);
    // A corrupted ICMP checksum (RFC 5508 REQ-3).
    let mut bad = FRAGNEEDED4_IN;
    bad[22] ^= 0x01;
    assert_eq!(h.run(&bad, 0.0).0, Err(DropReason::IcmpBadChecksum));
    // Embedded source that is not the outer destination.
    let (_, fixed) = h.run(&FRAGNEEDED4_IN, 0.0);
    assert_eq!(fixed, FRAGNEEDED4_IN_X);
    // Truncated embedded header: the quote ends inside the embedded IP header.
    let mut short = FRAGNEEDED4_IN[..20 + 8 + 12].to_vec();
    let n = short.len() as u16;
    short[2..4].copy_from_slice(&n.to_be_bytes());
    let mut hdr = ipv4_fix(short);
    icmp4_fix(&mut hdr);
    assert_eq!(h.run(&hdr, 0.0).0, Err(DropReason::IcmpErrorMalformed));
    assert_eq!(h.t.counters().dropped(DropReason::IcmpErrorMalformed), 1);
}

fn ipv4_fix(mut b: Vec<u8>) -> Vec<u8> {
    crate::wire::ipv4::Packet::new_unchecked(&mut b[..]).fill_checksum();
    b
}

fn icmp4_fix(b: &mut [u8]) {
    b[22] = 0;
    b[23] = 0;
    let c = crate::wire::checksum::checksum(&b[20..], 0);
    b[22..24].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn icmp_errors_never_touch_state() {
    let mut h = Harness::new(single());
    h.ok(&UDP4_OUT, 0.0);
    let before = h.t.lease_of(ip("192.0.2.10"), ip("203.0.113.5")).unwrap();
    h.ok(&FRAGNEEDED4_IN, 200.0);
    let (_, flows, _) = h.t.table_sizes();
    assert_eq!(flows, 1);
    // The UDP flow still ends 300 s after its last packet, not after the error.
    h.tick(300.5);
    assert!(h.t.lease(before.id).is_none(), "an ICMP error refreshed the flow");
}

#[test]
fn ipv4_fragments() {
    let mut h = Harness::new(single());
    // Out of order: the last fragment first (RFC 4787 REQ-14) makes the lease.
    h.expect(&FRAG4_LAST_OUT, Direction::Outbound, &FRAG4_LAST_OUT_X, 0.0);
    h.expect(&FRAG4_FIRST_OUT, Direction::Outbound, &FRAG4_FIRST_OUT_X, 0.0);
}

#[test]
fn ipv6_tcp_udp_echo_and_packet_too_big() {
    let mut h = Harness::new(single());
    h.expect(&TCP6_SYN_OUT, Direction::Outbound, &TCP6_SYN_OUT_X, 0.0);
    h.expect(&UDP6_OUT, Direction::Outbound, &UDP6_OUT_X, 0.0);
    h.expect(&ECHO6_OUT, Direction::Outbound, &ECHO6_OUT_X, 0.0);
    h.expect(&ECHO6_REPLY_IN, Direction::Inbound, &ECHO6_REPLY_IN_X, 0.0);
    h.expect(&PTB6_IN, Direction::Inbound, &PTB6_IN_X, 0.0);
    h.expect(&FRAG6_LATER_OUT, Direction::Outbound, &FRAG6_LATER_OUT_X, 0.0);
}

#[test]
fn pool_exhaustion_replies_3_13_and_keeps_existing_leases() {
    let mut c = single();
    c.mapping = Mapping::PerHost;
    let mut h = Harness::new(c);
    h.expect(&UDP4_OUT, Direction::Outbound, &UDP4_OUT_X, 0.0);
    let (v, reply) = h.run(&UDP4_OUT_B, 0.0);
    assert_eq!(v, Err(DropReason::PoolExhausted));
    assert_eq!(reply, PROHIBITED4_REPLY);
    assert_eq!(h.t.counters().dropped(DropReason::PoolExhausted), 1);
    assert_eq!(h.t.counters().replies, 1);
    // Never evict: the first host still goes out under its address.
    h.expect(&UDP4_OUT, Direction::Outbound, &UDP4_OUT_X, 1.0);
}

#[test]
fn replies_are_rate_limited_and_never_about_icmp_errors() {
    let mut c = single();
    c.mapping = Mapping::PerHost;
    c.icmp_rate = 3;
    let mut h = Harness::new(c);
    h.ok(&UDP4_OUT, 0.0);
    let replies = (0..10).filter(|_| !h.run(&UDP4_OUT_B, 0.5).1.is_empty()).count();
    // The verdict carries the reply only while tokens last; the rest are counted.
    assert_eq!(h.t.counters().replies, 3);
    assert_eq!(h.t.counters().replies_rate_limited, 7);
    assert_eq!(replies, 10, "every refused packet still comes back (reply or original)");
    let _ = h.run(&UDP4_OUT_B, 2.0);
    assert_eq!(h.t.counters().replies, 4, "tokens refill after a second");
}

#[test]
fn ipv6_exhaustion_replies_admin_prohibited() {
    let mut c = single();
    c.mapping = Mapping::PerHost;
    let mut h = Harness::new(c);
    h.ok(&UDP6_OUT, 0.0);
    let other = Harness::udp("2001:db8:1::11", "2001:db8:2::5", 1, 2);
    let (v, reply) = h.run(&other, 0.0);
    assert_eq!(v, Err(DropReason::PoolExhausted));
    let d = crate::wire::parse(&reply).unwrap();
    assert_eq!(d.dst, ip("2001:db8:1::11"));
    assert_eq!(d.src, ip("2001:db8:1::fffe"));
    assert_eq!((reply[40], reply[41]), (1, 1), "ICMPv6 destination unreachable, code 1");
    let sum = crate::wire::checksum::sum(
        &reply[40..],
        crate::wire::checksum::pseudo_header_v6(
            reply[8..24].try_into().unwrap(),
            reply[24..40].try_into().unwrap(),
            58,
            (reply.len() - 40) as u32,
        ),
    );
    assert_eq!(crate::wire::checksum::fold(sum), 0xffff);
    assert_eq!(&reply[48..], &other[..]);
}

// ---- policies ----

#[test]
fn partner_filtering_and_any() {
    let mut h = Harness::new(single());
    h.ok(&UDP4_OUT, 0.0);
    let third = Harness::udp("198.51.100.77", "198.18.0.1", 9, 5000);
    assert_eq!(h.run(&third, 0.0).0, Err(DropReason::Filtered));
    let mut w = Harness::new(wide());
    let unleased = Harness::udp("203.0.113.5", "198.18.0.200", 9, 5000);
    assert_eq!(w.run(&unleased, 0.0).0, Err(DropReason::NoLease));

    let mut c = single();
    c.filtering = Filtering::Any;
    let mut h = Harness::new(c);
    h.ok(&UDP4_OUT, 0.0);
    let (v, b) = h.run(&third, 0.0);
    assert_eq!(v, Ok(Direction::Inbound));
    assert_eq!(crate::wire::parse(&b).unwrap().dst, ip("192.0.2.10"));
    // The newcomer has its own lease, so the host's answer leaves from the same address.
    let answer = Harness::udp("192.0.2.10", "198.51.100.77", 5000, 9);
    let (v, b) = h.run(&answer, 0.0);
    assert_eq!(v, Ok(Direction::Outbound));
    assert_eq!(Harness::src_of(&b), ip("198.18.0.1"));
    let l = h.t.lease_for(ip("198.18.0.1"), ip("198.51.100.77")).unwrap();
    assert_eq!(l.real, ip("192.0.2.10"));
}

#[test]
fn per_partner_gives_distinct_addresses_per_host_the_same() {
    for mapping in [Mapping::PerPartner, Mapping::PerHost] {
        let mut c = wide();
        c.mapping = mapping;
        let mut h = Harness::new(c);
        let partners = ["203.0.113.5", "198.51.100.7", "203.0.113.99", "198.51.100.8"];
        let seen: Vec<IpAddr> = partners
            .iter()
            .map(|p| Harness::src_of(&h.run(&Harness::udp("192.0.2.10", p, 1000, 53), 0.0).1))
            .collect();
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        match mapping {
            Mapping::PerPartner => assert_eq!(distinct.len(), partners.len(), "{seen:?}"),
            Mapping::PerHost => assert_eq!(distinct.len(), 1, "{seen:?}"),
        }
        assert!(seen.iter().all(|v| h.t.pool().contains(*v)));
        // Every partner is recorded (the ones allowed back in and allowed to inquire).
        for (p, v) in partners.iter().zip(&seen) {
            assert_eq!(h.t.lease_for(*v, ip(p)).unwrap().real, ip("192.0.2.10"));
        }
    }
}

#[test]
fn per_partner_shares_an_address_between_hosts_with_different_partners() {
    // One address, two hosts, two partners: both fit (demultiplexed by sender).
    let mut h = Harness::new(single());
    let a = h.run(&Harness::udp("192.0.2.10", "203.0.113.5", 1, 2), 0.0);
    let b = h.run(&Harness::udp("192.0.2.11", "198.51.100.7", 1, 2), 0.0);
    assert_eq!((a.0, b.0), (Ok(Direction::Outbound), Ok(Direction::Outbound)));
    let back_a = h.run(&Harness::udp("203.0.113.5", "198.18.0.1", 2, 1), 0.0);
    let back_b = h.run(&Harness::udp("198.51.100.7", "198.18.0.1", 2, 1), 0.0);
    assert_eq!(crate::wire::parse(&back_a.1).unwrap().dst, ip("192.0.2.10"));
    assert_eq!(crate::wire::parse(&back_b.1).unwrap().dst, ip("192.0.2.11"));
    // A third host to a partner that already sees 198.18.0.1: no address left for it.
    let c = h.run(&Harness::udp("192.0.2.12", "203.0.113.5", 1, 2), 0.0);
    assert_eq!(c.0, Err(DropReason::PoolExhausted));
}

#[test]
fn hairpin_uses_the_senders_virtual_address() {
    let mut c = wide();
    c.filtering = Filtering::Any;
    let mut h = Harness::new(c);
    let (_, b) = h.run(&Harness::udp("192.0.2.20", "203.0.113.5", 7000, 53), 0.0);
    let vb = Harness::src_of(&b);
    let (v, out) = h.run(&Harness::udp("192.0.2.10", &vb.to_string(), 1234, 7000), 0.0);
    assert_eq!(v, Ok(Direction::Hairpin));
    let d = crate::wire::parse(&out).unwrap();
    assert_eq!(d.dst, ip("192.0.2.20"));
    assert!(h.t.pool().contains(d.src), "the peer sees a virtual source, not {}", d.src);
    // B's answer to A's virtual address hairpins back to A under B's same address.
    let (v, back) = h.run(&Harness::udp("192.0.2.20", &d.src.to_string(), 7000, 1234), 0.0);
    assert_eq!(v, Ok(Direction::Hairpin));
    let d2 = crate::wire::parse(&back).unwrap();
    assert_eq!((d2.src, d2.dst), (vb, ip("192.0.2.10")));
    assert_eq!(h.t.counters().hairpinned, 2);
}

#[test]
fn explicit_rent_is_honoured_by_the_data_plane() {
    let mut h = Harness::new(wide());
    let now = h.at(0.0);
    let l = h.t.rent(ip("192.0.2.10"), ip("203.0.113.5"), Duration::from_secs(600), now).unwrap();
    assert_eq!(l.origin, Origin::Explicit);
    let (_, b) = h.run(&Harness::udp("192.0.2.10", "203.0.113.5", 1, 2), 1.0);
    assert_eq!(Harness::src_of(&b), l.virtual_addr);
    // Renting again for the same partner returns the same lease.
    let again =
        h.t.rent(ip("192.0.2.10"), ip("203.0.113.5"), Duration::from_secs(60), now).unwrap();
    assert_eq!((again.id, again.virtual_addr), (l.id, l.virtual_addr));
    assert_eq!(again.expires, l.expires, "a shorter second rent does not cut the lease");
    assert_eq!(
        h.t.rent(ip("198.51.100.1"), ip("203.0.113.5"), Duration::from_secs(1), now),
        Err(LeaseError::NotServed)
    );
    assert_eq!(
        h.t.rent(ip("192.0.2.10"), ip("198.18.0.9"), Duration::from_secs(1), now),
        Err(LeaseError::BadPartner)
    );
    assert_eq!(
        h.t.rent(ip("192.0.2.10"), ip("2001:db8:2::1"), Duration::from_secs(1), now),
        Err(LeaseError::NoPool)
    );
}

#[test]
fn lan_to_lan_and_foreign_packets_pass_untouched() {
    let mut h = Harness::new(wide());
    for (src, dst) in
        [("192.0.2.10", "192.0.2.11"), ("203.0.113.1", "203.0.113.2"), ("192.0.2.10", "224.0.0.5")]
    {
        let sent = Harness::udp(src, dst, 1, 2);
        let mut b = sent.clone();
        assert_eq!(h.t.translate(&mut b, h.at(0.0)), Verdict::Pass, "{src} -> {dst}");
        assert_eq!(b, sent, "{src} -> {dst} was changed");
    }
    assert_eq!(h.t.counters().passed, 3);
    assert_eq!(h.t.counters().dropped_total(), 0, "passing is not dropping");
    assert_eq!(h.t.table_sizes().0, 0);
}

// ---- bad input ----

#[test]
fn malformed_packets_are_counted_drops() {
    let mut h = Harness::new(single());
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![], DropReason::Truncated),
        (TCP4_SYN_OUT[..30].to_vec(), DropReason::Truncated),
        (
            {
                let mut b = TCP4_SYN_OUT.to_vec();
                b[0] = 0x44;
                b
            },
            DropReason::BadHeaderLength,
        ),
        (
            {
                let mut b = TCP4_SYN_OUT.to_vec();
                b[0] = 0x75;
                b
            },
            DropReason::BadVersion,
        ),
        (
            {
                let mut b = TCP4_SYN_OUT.to_vec();
                b[3] = 0xff;
                b
            },
            DropReason::Truncated,
        ),
        (
            {
                let mut b = TCP4_SYN_OUT.to_vec();
                b[32] = 0x30;
                b
            },
            DropReason::BadTransportHeader,
        ),
        (
            {
                let mut b = TCP4_SYN_OUT.to_vec();
                b[32] = 0xf0;
                b
            },
            DropReason::BadTransportHeader,
        ),
        (
            {
                let mut b = TCP4_SYN_OUT.to_vec();
                b[9] = 132;
                b
            },
            DropReason::UnsupportedProtocol,
        ),
        (
            {
                let mut b = ECHO4_OUT.to_vec();
                b[20] = 13;
                b
            },
            DropReason::IcmpUnsupported,
        ),
        (
            {
                let mut b = UDP4_OUT.to_vec();
                b[29] = 0xff;
                b
            },
            DropReason::BadTransportHeader,
        ),
        (TCP6_SYN_OUT[..60].to_vec(), DropReason::Truncated),
        (long_v6_chain(), DropReason::ExtensionChainTooLong),
    ];
    for (i, (b, reason)) in cases.iter().enumerate() {
        assert_eq!(h.run(b, 0.0).0, Err(*reason), "case {i}");
    }
    let total: u64 = cases.len() as u64;
    assert_eq!(h.t.counters().dropped_total(), total);
    assert_eq!(h.t.table_sizes().0, 0, "no bad packet made a lease");
}

fn long_v6_chain() -> Vec<u8> {
    let n = 12;
    let mut b = vec![0u8; 40 + n * 8 + 8];
    b[0] = 0x60;
    let pl = (b.len() - 40) as u16;
    b[4..6].copy_from_slice(&pl.to_be_bytes());
    b[6] = crate::wire::ipv6::next_header::DEST_OPTS;
    b[8..24].copy_from_slice(&"2001:db8:1::10".parse::<std::net::Ipv6Addr>().unwrap().octets());
    b[24..40].copy_from_slice(&"2001:db8:2::5".parse::<std::net::Ipv6Addr>().unwrap().octets());
    for i in 0..n {
        b[40 + i * 8] = crate::wire::ipv6::next_header::DEST_OPTS;
    }
    b
}

#[test]
fn every_truncation_of_every_vector_is_safe() {
    let all: [&[u8]; 12] = [
        &TCP4_SYN_OUT,
        &UDP4_OUT,
        &ECHO4_OUT,
        &FRAGNEEDED4_IN,
        &UNREACH4_OUT,
        &FRAG4_FIRST_OUT,
        &TCP6_SYN_OUT,
        &UDP6_OUT,
        &ECHO6_OUT,
        &PTB6_IN,
        &FRAG6_LATER_OUT,
        &PORTUNREACH4_SHORT_IN,
    ];
    let mut h = Harness::new(single());
    h.ok(&UDP4_OUT, 0.0);
    h.ok(&UDP6_OUT, 0.0);
    for p in all {
        for n in 0..p.len() {
            let _ = h.run(&p[..n], 0.0);
        }
    }
    // Still forwarding afterwards.
    h.expect(&UDP4_OUT, Direction::Outbound, &UDP4_OUT_X, 1.0);
}

// ---- expiry on simulated time ----

#[test]
fn udp_flow_keeps_an_implicit_lease_for_300_s() {
    let mut h = Harness::new(single());
    h.ok(&UDP4_OUT, 0.0);
    let l = h.t.lease_of(ip("192.0.2.10"), ip("203.0.113.5")).unwrap();
    assert_eq!(l.origin, Origin::Implicit);
    assert_eq!(l.expires, None, "an implicit lease with flows has no end yet");
    h.ok(&UDP4_OUT, 100.0); // refresh
    h.tick(399.0);
    assert!(h.t.lease(l.id).is_some());
    assert!(h.t.poll_timeout().unwrap() <= h.at(400.0));
    h.tick(400.0);
    assert!(h.t.lease(l.id).is_none());
    let events: Vec<_> = std::iter::from_fn(|| h.t.poll_event()).collect();
    let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![1, 2, 3], "sequence numbers count events");
    assert!(matches!(events[0].1, LeaseEvent::Created(_)));
    assert!(matches!(events[1].1, LeaseEvent::Ended(_, EndReason::Idle)));
    match &events[2].1 {
        LeaseEvent::Quarantined { virtual_addr, partner, real, until } => {
            assert_eq!(
                (*virtual_addr, *partner, *real),
                (ip("198.18.0.1"), Some(ip("203.0.113.5")), ip("192.0.2.10"))
            );
            assert_eq!(*until, h.at(400.0 + 120.0));
        }
        e => panic!("expected the quarantine event, got {e:?}"),
    }
    assert_eq!(h.t.table_sizes(), (0, 0, 1), "the address went into quarantine");
}

#[test]
fn tcp_timers_established_transitory_and_rst() {
    let mut h = Harness::new(single());
    let id = |h: &Harness| h.t.lease_of(ip("192.0.2.10"), ip("203.0.113.5")).map(|l| l.id);
    // An unanswered SYN: transitory, 240 s.
    h.ok(&TCP4_SYN_OUT, 0.0);
    h.tick(239.0);
    assert!(id(&h).is_some());
    h.tick(240.0);
    assert!(id(&h).is_none(), "an unanswered SYN outlived 240 s");
    // Answered: established, 7440 s.
    h.ok(&TCP4_SYN_OUT, 1000.0);
    h.ok(&TCP4_SYNACK_IN, 1000.0);
    h.tick(1000.0 + 7439.0);
    assert!(id(&h).is_some(), "an established flow died before 7440 s");
    h.tick(1000.0 + 7440.0);
    assert!(id(&h).is_none());
    // RST drops an established flow to 240 s (RFC 7857 §3.2).
    h.ok(&TCP4_SYN_OUT, 10_000.0);
    h.ok(&TCP4_SYNACK_IN, 10_000.0);
    let mut rst = TCP4_SYNACK_IN;
    rst[33] = 0x04;
    // (flags changed: fix the TCP checksum by the word delta)
    let old = u16::from_be_bytes([rst[36], rst[37]]);
    let c = crate::wire::Delta::word(0x5012, 0x5004).apply(old);
    rst[36..38].copy_from_slice(&c.to_be_bytes());
    // First the wheel moves the flow from its SYN's slot (10,240 s) to its established one.
    h.tick(10_250.0);
    assert!(id(&h).is_some());
    h.ok(&rst, 10_300.0);
    h.tick(10_300.0 + 239.0);
    assert!(id(&h).is_some());
    h.tick(10_300.0 + 240.0);
    assert!(id(&h).is_none(), "RST did not shorten the flow to 240 s");
}

#[test]
fn icmp_query_timer_is_60_s() {
    let mut h = Harness::new(single());
    h.ok(&ECHO4_OUT, 0.0);
    h.tick(59.9);
    assert_eq!(h.t.table_sizes().0, 1);
    h.tick(60.0);
    assert_eq!(h.t.table_sizes().0, 0);
}

#[test]
fn explicit_lease_lives_until_its_ttl_and_renew_extends_it() {
    let mut h = Harness::new(wide());
    let l =
        h.t.rent(ip("192.0.2.10"), ip("203.0.113.5"), Duration::from_secs(30), h.at(0.0)).unwrap();
    // Idle, it still lives (no flows needed).
    h.tick(29.0);
    assert!(h.t.lease(l.id).is_some());
    let r = h.t.renew(l.id, Duration::from_secs(100), h.at(29.0)).unwrap();
    assert_eq!(r.expires, Some(h.at(129.0)));
    h.tick(128.0);
    assert!(h.t.lease(l.id).is_some());
    // A flow does not extend an explicit lease past its TTL.
    h.ok(&Harness::udp("192.0.2.10", "203.0.113.5", 1, 2), 128.0);
    h.tick(129.0);
    assert!(h.t.lease(l.id).is_none());
    assert_eq!(h.t.table_sizes().1, 0, "its flows ended with it");
    let ended =
        std::iter::from_fn(|| h.t.poll_event()).find(|(_, e)| matches!(e, LeaseEvent::Ended(..)));
    assert!(matches!(ended, Some((_, LeaseEvent::Ended(_, EndReason::Expired)))));
}

#[test]
fn quarantine_holds_an_address_from_other_hosts_for_120_s() {
    let mut h = Harness::new(single());
    let l =
        h.t.rent(ip("192.0.2.10"), ip("203.0.113.5"), Duration::from_secs(10), h.at(0.0)).unwrap();
    h.t.release(l.id, h.at(1.0)).unwrap();
    // Another host, same partner: the only address is quarantined against it.
    let other = Harness::udp("192.0.2.11", "203.0.113.5", 1, 2);
    assert_eq!(h.run(&other, 2.0).0, Err(DropReason::PoolExhausted));
    h.tick(120.9);
    assert_eq!(h.run(&other, 120.9).0, Err(DropReason::PoolExhausted));
    h.tick(121.0);
    let (v, b) = h.run(&other, 121.0);
    assert_eq!(v, Ok(Direction::Outbound));
    assert_eq!(Harness::src_of(&b), ip("198.18.0.1"));
}

#[test]
fn quarantine_lets_the_same_host_back_and_other_partners_through() {
    let mut h = Harness::new(wide());
    let l =
        h.t.rent(ip("192.0.2.10"), ip("203.0.113.5"), Duration::from_secs(10), h.at(0.0)).unwrap();
    h.t.release(l.id, h.at(1.0)).unwrap();
    // The same host gets its old address back for that partner.
    let (_, b) = h.run(&Harness::udp("192.0.2.10", "203.0.113.5", 1, 2), 5.0);
    assert_eq!(Harness::src_of(&b), l.virtual_addr);
}

#[test]
fn per_host_quarantine_holds_the_whole_address() {
    let mut c = single();
    c.mapping = Mapping::PerHost;
    let mut h = Harness::new(c);
    h.ok(&Harness::udp("192.0.2.10", "203.0.113.5", 1, 2), 0.0);
    h.tick(300.0);
    assert_eq!(h.t.table_sizes().0, 0);
    let other = Harness::udp("192.0.2.11", "198.51.100.9", 1, 2);
    assert_eq!(h.run(&other, 301.0).0, Err(DropReason::PoolExhausted));
    h.tick(420.0);
    assert_eq!(h.run(&other, 420.0).0, Ok(Direction::Outbound));
}

#[test]
fn lease_idle_extends_an_implicit_lease_past_its_flows() {
    let mut c = single();
    c.timeouts.lease_idle = Duration::from_secs(50);
    let mut h = Harness::new(c);
    h.ok(&ECHO4_OUT, 0.0);
    h.tick(60.0);
    let (leases, flows, _) = h.t.table_sizes();
    assert_eq!((leases, flows), (1, 0));
    // A reverse connection from the partner inside the idle time still gets in.
    let back = Harness::udp("203.0.113.5", "198.18.0.1", 9, 9);
    assert_eq!(h.run(&back, 100.0).0, Ok(Direction::Inbound));
    h.tick(100.0 + 300.0 + 49.0);
    assert_eq!(h.t.table_sizes().0, 1);
    h.tick(100.0 + 300.0 + 50.0);
    assert_eq!(h.t.table_sizes().0, 0);
}

#[test]
fn restore_puts_back_the_same_address() {
    let mut h = Harness::new(wide());
    let v = ip("198.18.0.77");
    let exp = h.at(500.0);
    let l =
        h.t.restore(ip("192.0.2.10"), v, ip("203.0.113.5"), Origin::Explicit, Some(exp), h.at(0.0))
            .unwrap();
    assert_eq!(l.virtual_addr, v);
    let back = Harness::udp("203.0.113.5", "198.18.0.77", 80, 5000);
    let (d, b) = h.run(&back, 1.0);
    assert_eq!(d, Ok(Direction::Inbound));
    assert_eq!(crate::wire::parse(&b).unwrap().dst, ip("192.0.2.10"));
    let dup =
        h.t.restore(ip("192.0.2.11"), v, ip("203.0.113.5"), Origin::Explicit, Some(exp), h.at(0.0));
    assert_eq!(dup, Err(LeaseError::Conflict));
    let outside = h.t.restore(
        ip("192.0.2.12"),
        ip("198.19.0.1"),
        ip("203.0.113.5"),
        Origin::Explicit,
        None,
        h.at(0.0),
    );
    assert_eq!(outside, Err(LeaseError::Conflict));
}

#[test]
fn tables_refuse_when_full() {
    let mut c = wide();
    c.max_leases = 2;
    c.max_flows = 3;
    let mut h = Harness::new(c);
    assert!(h.run(&Harness::udp("192.0.2.10", "203.0.113.5", 1, 2), 0.0).0.is_ok());
    assert!(h.run(&Harness::udp("192.0.2.10", "203.0.113.6", 1, 2), 0.0).0.is_ok());
    let (v, reply) = h.run(&Harness::udp("192.0.2.10", "203.0.113.7", 1, 2), 0.0);
    assert_eq!(v, Err(DropReason::LeaseTableFull));
    assert!(!reply.is_empty(), "the host is told (3/13)");
    assert!(h.run(&Harness::udp("192.0.2.10", "203.0.113.6", 1, 3), 0.0).0.is_ok());
    assert_eq!(
        h.run(&Harness::udp("192.0.2.10", "203.0.113.6", 1, 4), 0.0).0,
        Err(DropReason::FlowTableFull)
    );
    // Existing flows still pass.
    assert!(h.run(&Harness::udp("192.0.2.10", "203.0.113.5", 1, 2), 0.0).0.is_ok());
}

#[test]
fn config_refusals() {
    let mut c = wide();
    c.pools = nets(&["192.0.2.128/25"]);
    assert!(matches!(c.validate(), Err(ConfigError::PoolOverlapsLan { .. })));
    let mut c = wide();
    c.timeouts.udp = Duration::from_secs(60);
    assert!(matches!(c.validate(), Err(ConfigError::TimeoutBelowFloor { name: "udp", .. })));
    let c = Config::new(vec![], nets(&["198.18.0.0/24"]));
    assert_eq!(c.validate(), Err(ConfigError::NoLan));
}

#[test]
fn poll_timeout_tracks_the_next_deadline() {
    let mut h = Harness::new(single());
    assert_eq!(h.t.poll_timeout(), None);
    h.ok(&ECHO4_OUT, 10.0);
    assert_eq!(h.t.poll_timeout(), Some(h.at(70.0)));
    h.tick(70.0);
    // Now only the quarantine entry is pending.
    assert_eq!(h.t.poll_timeout(), Some(h.at(190.0)));
    h.tick(190.0);
    assert_eq!(h.t.poll_timeout(), None);
}

// ---- durability ----

#[test]
fn packets_of_a_new_lease_wait_until_it_is_durable() {
    let mut c = single();
    c.hold_until_durable = true;
    let mut h = Harness::new(c);
    let mut b = UDP4_OUT.to_vec();
    assert_eq!(h.t.translate(&mut b, h.at(0.0)), Verdict::Hold);
    assert_eq!(b, UDP4_OUT, "a held packet is untouched");
    // The lease exists (and is logged), its life goes to the store with it (one commit), and
    // no flow is made before both are durable.
    let (_, e) = h.t.poll_event().unwrap();
    assert!(matches!(e, LeaseEvent::Created(_)));
    let (seq, e) = h.t.poll_event().unwrap();
    assert!(matches!(e, LeaseEvent::Lives { .. }), "{e:?}");
    assert_eq!(h.t.durable_needed(), Some(seq));
    assert_eq!(h.t.table_sizes().1, 0);
    let mut again = UDP4_OUT.to_vec();
    assert_eq!(h.t.translate(&mut again, h.at(0.1)), Verdict::Hold, "still not durable");
    h.t.set_durable(seq);
    assert_eq!(h.t.durable_needed(), None);
    h.expect(&UDP4_OUT, Direction::Outbound, &UDP4_OUT_X, 0.2);
    // An inbound packet of a new pair on the now durable lease needs nothing more.
    h.expect(&FRAGNEEDED4_IN, Direction::Inbound, &FRAGNEEDED4_IN_X, 0.3);
    assert_eq!(h.t.counters().held, 2);
    assert_eq!(h.t.poll_event(), None, "no new lease for the inbound error");
}

#[test]
fn rent_is_pending_until_durable_and_restored_leases_are_not() {
    let mut c = wide();
    c.hold_until_durable = true;
    let mut h = Harness::new(c);
    let l =
        h.t.rent(ip("192.0.2.10"), ip("203.0.113.5"), Duration::from_secs(60), h.at(0.0)).unwrap();
    assert_eq!(h.t.durable_needed(), Some(l.seq));
    let mut b = Harness::udp("192.0.2.10", "203.0.113.5", 1, 2);
    assert_eq!(h.t.translate(&mut b, h.at(0.0)), Verdict::Hold);
    h.t.set_durable(l.seq);
    assert_eq!(h.run(&b, 0.0).0, Ok(Direction::Outbound));
}

#[test]
fn with_durability_no_lease_event_is_ever_dropped() {
    let mut c = wide();
    c.hold_until_durable = true;
    c.event_capacity = 4;
    let mut h = Harness::new(c);
    for k in 0..10u8 {
        let partner = IpAddr::from([203, 0, 113, k + 1]);
        h.t.rent(ip("192.0.2.10"), partner, Duration::from_secs(60), h.at(0.0)).unwrap();
    }
    let seqs: Vec<u64> = std::iter::from_fn(|| h.t.poll_event()).map(|(s, _)| s).collect();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<u64>>(),
        "every rent is stored, none acknowledged unstored"
    );
    assert_eq!(h.t.counters().events_lost, 0);
    // Without durability the queue stays bounded and says what it dropped.
    let mut c = wide();
    c.event_capacity = 4;
    let mut h = Harness::new(c);
    for k in 0..10u8 {
        let partner = IpAddr::from([203, 0, 113, k + 1]);
        h.t.rent(ip("192.0.2.10"), partner, Duration::from_secs(60), h.at(0.0)).unwrap();
    }
    assert_eq!(std::iter::from_fn(|| h.t.poll_event()).count(), 4);
    assert_eq!(h.t.counters().events_lost, 6);
}

#[test]
fn chains_of_a_host_and_of_an_address_survive_removal_anywhere() {
    let mut c = wide();
    c.mapping = Mapping::PerHost;
    let mut h = Harness::new(c);
    let real = ip("192.0.2.10");
    let ids: Vec<Lease> = (1..=50u8)
        .map(|k| {
            h.t.rent(real, IpAddr::from([203, 0, 113, k]), Duration::from_secs(60), h.at(0.0))
                .unwrap()
        })
        .collect();
    let v = ids[0].virtual_addr;
    assert!(ids.iter().all(|l| l.virtual_addr == v), "per-host: one address for every partner");
    assert_eq!(h.t.leases_on(real, v).len(), 50);
    // Newest is the chain's head, oldest its tail: remove those and one in the middle.
    for k in [49usize, 0, 25] {
        h.t.release(ids[k].id, h.at(1.0)).unwrap();
    }
    let left: Vec<IpAddr> = h.t.leases_on(real, v).iter().map(|l| l.partner).collect();
    assert_eq!(left.len(), 47);
    for k in [49usize, 0, 25] {
        assert!(!left.contains(&ids[k].partner));
    }
    // The host keeps its address for a new partner; another host cannot share it.
    let l = h.t.rent(real, ip("198.51.100.9"), Duration::from_secs(60), h.at(2.0)).unwrap();
    assert_eq!(l.virtual_addr, v);
    let other =
        h.t.rent(ip("192.0.2.11"), ip("198.51.100.9"), Duration::from_secs(60), h.at(2.0)).unwrap();
    assert_ne!(other.virtual_addr, v);
    for l in h.t.leases_on(real, v) {
        h.t.release(l.id, h.at(3.0)).unwrap();
    }
    assert!(h.t.leases_on(real, v).is_empty());
    assert_eq!(h.t.table_sizes().0, 1);
}

/// The branch-free unicast test agrees with the standard library's address classes.
#[test]
fn unicast_agrees_with_the_standard_address_classes() {
    let std_unicast = |a: IpAddr| match a {
        IpAddr::V4(v) => {
            !(v.is_unspecified() || v.is_loopback() || v.is_multicast() || v.is_broadcast())
        }
        IpAddr::V6(v) => !(v.is_unspecified() || v.is_loopback() || v.is_multicast()),
    };
    let addrs = [
        "0.0.0.0",
        "0.0.0.1",
        "127.0.0.1",
        "127.255.255.255",
        "128.0.0.1",
        "126.255.255.255",
        "223.255.255.255",
        "224.0.0.1",
        "239.255.255.255",
        "240.0.0.1",
        "255.255.255.254",
        "255.255.255.255",
        "198.51.100.7",
        "::",
        "::1",
        "::2",
        "::ffff:127.0.0.1",
        "fe80::1",
        "feff::1",
        "ff00::",
        "ff02::1",
        "2001:db8::1",
        "::ffff:224.0.0.1",
    ];
    for s in addrs {
        let a: IpAddr = s.parse().unwrap();
        assert_eq!(is_unicast(a), std_unicast(a), "{s}");
    }
}

/// `Way::of`, through the bits the fast path uses, for every combination.
#[test]
fn ways_of_every_combination() {
    use super::translate::Way;
    for (src_lan, dst_lan, dst_pool, want) in [
        (true, true, false, Way::Pass),
        (true, true, true, Way::Pass),
        (true, false, false, Way::Out),
        (true, false, true, Way::Hairpin),
        (false, false, true, Way::In),
        (false, true, true, Way::In),
        (false, false, false, Way::Pass),
        (false, true, false, Way::Pass),
    ] {
        assert_eq!(Way::of(src_lan, dst_lan, dst_pool), want, "{src_lan} {dst_lan} {dst_pool}");
    }
}

/// A flow key takes the host's port from the source going out and from the destination
/// coming in, but an echo's identifier both ways.
#[test]
fn flow_keys_by_direction() {
    use super::translate::FlowKey;
    use crate::wire::protocol;
    for proto in [protocol::TCP, protocol::UDP] {
        let out = FlowKey::from_ports(proto, 40000, 443, 0x10, true);
        let inb = FlowKey::from_ports(proto, 443, 40000, 0x10, false);
        assert_eq!((out.host_port, out.partner_port), (40000, 443));
        assert_eq!((inb.host_port, inb.partner_port), (40000, 443));
    }
    for proto in [protocol::ICMP, protocol::ICMPV6] {
        for outbound in [true, false] {
            let k = FlowKey::from_ports(proto, 7, 0, 0, outbound);
            assert_eq!((k.host_port, k.partner_port), (7, 0));
        }
    }
}

/// A forwarded packet has one more hop left than it came with (the kernel takes two, one on
/// the way into the TUN and one on the way out), saturating at 255, on the fast path (echo,
/// IPv6 UDP, once their flows exist) and the general path (a new flow; an IPv4 option), with
/// the IPv4 header checksum right (the oracle computes it from scratch). What is refused or
/// passed keeps its TTL, and so does the ICMP error the translator builds.
#[test]
fn forwarded_packets_get_their_hop_back() {
    let mut h = Harness::new(single());
    for _ in 0..2 {
        h.expect(&ECHO4_TTL255_OUT, Direction::Outbound, &ECHO4_TTL255_OUT_X, 0.0);
        h.expect(&UDP4_TTL255_OUT, Direction::Outbound, &UDP4_TTL255_OUT_X, 0.0);
        h.expect(&UDP6_HOP255_OUT, Direction::Outbound, &UDP6_HOP255_OUT_X, 0.0);
    }
    assert_eq!(TCP4_SYN_OUT[8] + 1, TCP4_SYN_OUT_X[8]);
    assert_eq!(UDP6_OUT[7] + 1, UDP6_OUT_X[7]);
    // The embedded packet of a translated error keeps its TTL.
    assert_eq!(FRAGNEEDED4_IN_X[28 + 8], FRAGNEEDED4_IN[28 + 8]);
    h.expect(&UDP4_OUT, Direction::Outbound, &UDP4_OUT_X, 0.0);
    h.expect(&FRAGNEEDED4_IN, Direction::Inbound, &FRAGNEEDED4_IN_X, 0.0);
    // Lan to lan passes untouched.
    let mut b = Harness::udp("192.0.2.10", "192.0.2.20", 1, 2);
    let before = b.clone();
    assert!(matches!(h.t.translate(&mut b, h.at(0.0)), Verdict::Pass));
    assert_eq!(b, before);
    // The pool is taken: the refused packet is untouched, the reply keeps its own TTL.
    let (v, reply) = h.run(&UDP4_OUT_B, 0.0);
    assert_eq!(v, Err(DropReason::PoolExhausted));
    assert_eq!(reply, PROHIBITED4_REPLY);
}

/// Packets of established flows with plain headers, of every kind the oracle has (IPv4 and
/// IPv6; TCP with options, UDP with and without a checksum, echo; out and in; its IPv6 TCP
/// packet has a hop-by-hop header, so it is the general path's), take the fast path and come
/// out as the oracle says; a packet of a flow the translator does not know, it leaves alone
/// for the general path. (The property tests hold the fast path to the general path's
/// results; this one holds it to being taken.)
#[test]
fn established_plain_packets_take_the_fast_path() {
    let cases: [(&[u8], &[u8], bool); 8] = [
        (&TCP4_SYN_OUT, &TCP4_SYN_OUT_X, true),
        (&TCP4_SYNACK_IN, &TCP4_SYNACK_IN_X, false),
        (&UDP4_NOCSUM_OUT, &UDP4_NOCSUM_OUT_X, true),
        (&ECHO4_OUT, &ECHO4_OUT_X, true),
        (&ECHO4_REPLY_IN, &ECHO4_REPLY_IN_X, false),
        (&UDP6_OUT, &UDP6_OUT_X, true),
        (&ECHO6_OUT, &ECHO6_OUT_X, true),
        (&ECHO6_REPLY_IN, &ECHO6_REPLY_IN_X, false),
    ];
    let mut h = Harness::new(single());
    let mut stranger = Harness::new(single());
    let now = h.t.packet_ms(h.at(1.0));
    for (input, _, _) in cases {
        h.ok(input, 0.0);
    }
    assert!(h.t.fast_key(&TCP6_SYN_OUT).is_none(), "an extension header is not plain");
    for (input, want, outbound) in cases {
        let f = h.t.fast_key(input).unwrap_or_else(|| panic!("no fast key: {input:02x?}"));
        let mut b = input.to_vec();
        assert_eq!(h.t.forward_fast(&mut b, &f, now), Some(outbound), "{input:02x?}");
        assert_eq!(b, want, "{input:02x?}");
        if outbound {
            let f = stranger.t.fast_key(input).expect("plain headers");
            let mut b = input.to_vec();
            assert_eq!(stranger.t.forward_fast(&mut b, &f, now), None);
            assert_eq!(b, input, "a declined packet is left as it was");
        }
    }
}

#[test]
fn new_timers_count_from_each_flows_last_packet() {
    let mut h = Harness::new(single());
    h.ok(&UDP4_OUT, 10.0);
    let longer = Timeouts { udp: Duration::from_secs(600), ..Timeouts::default() };
    h.t.set_timeouts(longer, h.at(100.0)).unwrap();
    h.tick(400.0);
    assert_eq!(h.t.table_sizes().1, 1, "the flow ended by the old 300 s");
    let shorter = Timeouts { udp: Duration::from_secs(400), ..Timeouts::default() };
    h.t.set_timeouts(shorter, h.at(405.0)).unwrap();
    h.tick(409.0);
    assert_eq!(h.t.table_sizes().1, 1, "the flow ended before 10 s + 400 s");
    h.tick(411.0);
    assert_eq!(h.t.table_sizes().1, 0, "the flow outlived 10 s + 400 s");
    let below = Timeouts { udp: Duration::from_secs(60), ..Timeouts::default() };
    assert!(h.t.set_timeouts(below, h.at(420.0)).is_err(), "a timer below the RFC floor");
}

// ---- fair shares ----

#[test]
fn one_host_at_its_lease_share_is_refused_and_another_still_gets_out() {
    let mut c = wide();
    c.max_leases_per_host = 2;
    let mut h = Harness::new(c);
    for k in 1..=2u8 {
        h.ok(&Harness::udp("192.0.2.10", &format!("203.0.113.{k}"), 1000, 53), 0.0);
    }
    let (v, _) = h.run(&Harness::udp("192.0.2.10", "203.0.113.3", 1000, 53), 0.0);
    assert_eq!(v, Err(DropReason::HostLeaseLimit), "a third lease for the same host");
    assert_eq!(h.t.counters().dropped(DropReason::HostLeaseLimit), 1);
    let r = h.t.rent(ip("192.0.2.10"), ip("203.0.113.4"), Duration::from_secs(60), h.at(0.0));
    assert_eq!(r.map(|_| ()), Err(LeaseError::HostLimit));
    h.ok(&Harness::udp("192.0.2.11", "203.0.113.3", 1000, 53), 0.0);
    // When one of its leases ends (its flow idle), the host may have another.
    h.tick(301.0);
    h.ok(&Harness::udp("192.0.2.10", "203.0.113.3", 1000, 53), 302.0);
}

#[test]
fn one_host_at_its_flow_share_is_refused_and_another_still_gets_out() {
    let mut c = wide();
    c.max_flows_per_host = 2;
    let mut h = Harness::new(c);
    h.ok(&Harness::udp("192.0.2.10", "203.0.113.1", 1000, 53), 0.0);
    h.ok(&Harness::udp("192.0.2.10", "203.0.113.2", 1001, 53), 0.0);
    let (v, _) = h.run(&Harness::udp("192.0.2.10", "203.0.113.1", 1002, 53), 0.0);
    assert_eq!(v, Err(DropReason::HostFlowLimit));
    h.ok(&Harness::udp("192.0.2.11", "203.0.113.1", 1002, 53), 0.0);
    // Its existing flows go on.
    h.ok(&Harness::udp("192.0.2.10", "203.0.113.1", 1000, 53), 1.0);
}

/// `real` rents and releases at once for `count` partners at time 0; returns how many rents
/// were refused (each with `refusal`).
fn churn(h: &mut Harness, real: &str, count: u8, refusal: LeaseError) -> usize {
    let mut refused = 0;
    for k in 1..=count {
        let partner = IpAddr::from([203, 0, 113, k]);
        match h.t.rent(ip(real), partner, Duration::from_secs(60), h.at(0.0)) {
            Ok(l) => {
                h.t.release(l.id, h.at(0.0)).unwrap();
            }
            Err(e) => {
                assert_eq!(e, refusal);
                refused += 1;
            }
        }
    }
    refused
}

#[test]
fn rent_and_release_churn_never_lets_an_address_out_of_quarantine_early() {
    let mut c = wide();
    c.max_leases = 4;
    let mut h = Harness::new(c);
    let ttl = Duration::from_secs(60);
    let refused = churn(&mut h, "192.0.2.10", 40, LeaseError::TableFull);
    h.tick(1.0);
    assert_eq!(h.t.counters().quarantine_evicted, 0, "an address left quarantine early");
    assert!(refused > 0, "the churn never filled the room");
    // Once the quarantine is over, there is room again.
    h.tick(121.0);
    assert!(h.t.rent(ip("192.0.2.10"), ip("203.0.113.99"), ttl, h.at(121.0)).is_ok());
}

#[test]
fn one_host_churning_leases_fills_only_its_own_part_of_the_quarantine() {
    let mut c = wide();
    c.max_leases_per_host = 4;
    let mut h = Harness::new(c);
    let ttl = Duration::from_secs(60);
    let refused = churn(&mut h, "192.0.2.10", 40, LeaseError::HostLimit);
    assert_eq!(refused, 32, "8 of 40 rents fit twice the host's share of 4");
    // Another host rents and churns as before.
    for k in 1..=8u8 {
        let partner = IpAddr::from([203, 0, 113, 100 + k]);
        let l = h.t.rent(ip("192.0.2.11"), partner, ttl, h.at(0.0)).unwrap();
        h.t.release(l.id, h.at(0.0)).unwrap();
    }
    // Once its quarantine is over, the first host rents again.
    h.tick(121.0);
    assert!(h.t.rent(ip("192.0.2.10"), ip("203.0.113.99"), ttl, h.at(121.0)).is_ok());
}
