//! Property tests of the translator and of the checksum arithmetic, against independent
//! implementations.
//!
//! Packets are generated from random specifications and built with etherparse's
//! `PacketBuilder` (an implementation independent of `vipgate::wire`, so every checksum in a
//! generated packet is right by construction). The translator's output is then compared with
//! (a) a full recomputation of every checksum (etherparse's calculators and a naive RFC 1071
//! sum in `tests/common/packets.rs`) and (b) whenever possible, byte for byte with the packet
//! etherparse builds for the expected addresses.
//!
//! | property | what must hold |
//! |---|---|
//! | `wire_parse_agrees_with_etherparse` | `wire::parse` accepts every generated packet and agrees on addresses, protocol, transport offset, ports |
//! | `round_trip_*` | outbound: `Forward(Outbound)`, source a pool address, destination unchanged, every checksum = full recomputation, IPv4 UDP checksum 0 stays 0; bytes = etherparse's build with the virtual source. Inbound (src/dst and ports swapped, nothing else touched): `Forward(Inbound)`, and swapping back restores the original bytes exactly. Echo: the etherparse-built reply comes back addressed to the host, equal to etherparse's build for the host. Both mappings; bytes after the IP length are left alone |
//! | `round_trip_with_ip_options_and_extension_headers` | the same with IPv4 options / IPv6 hop-by-hop and destination options always present |
//! | `fragments_*` | a first fragment gets exactly the transport checksum of the whole datagram under the virtual source; later fragments are rewritten by address only (payload untouched, IPv4 header checksum valid), both ways |
//! | `hairpin_*` | host A → host B's virtual address under `Filtering::Any`: `Forward(Hairpin)`, A's virtual source, B's real destination, checksums recomputed; the answer restores the original bytes; under `Filtering::Partner`: `Drop(Filtered)` |
//! | `hairpin_*` (cont.) | an ICMP error from B about the hairpinned packet reaches A about the packet A sent |
//! | `icmp_error_*` | an ICMP/ICMPv6 error quoting a translated packet comes back to the host with the quote restored (embedded source, IPv4 header checksum, transport checksum) and a valid outer checksum; the same from the host about a packet it got; a corrupted checksum is `Drop(IcmpBadChecksum)`; a quote matching no lease is `Drop(IcmpErrorNoLease)`. One byte is exempt: when a quote ends inside the transport checksum, its first byte cannot be translated exactly (the carry from the missing byte is unknown) |
//! | `arbitrary_bytes_never_panic`, `garbage_and_mutants_*` | random, biased and mutated packets never panic; whatever is forwarded has its addresses in the right spaces, keeps valid checksums valid and leaves the fixed IP header alone except addresses and checksum; replies are valid ICMP errors to the sender; the translator keeps translating afterwards |
//! | `many_flows_keep_consistent_virtual_addresses` | many packets between four hosts and four partners, small pools: a pair keeps its virtual address, no two hosts share one towards a partner (per-host: at all), the lease API agrees, answers come back byte for byte |
//! | `refusals_are_replied_to_the_real_sender` | tiny tables, hosts sending to partners and to each other's virtual addresses: every `Reply` is a valid 3/13 (1/1) to the real sender quoting what it sent |
//! | `fast_path_and_batches_translate_as_the_general_path` | the general path (`translate_without_fast_path`), `translate` (its fast path where it applies) and `translate_batch` in batches of random sizes, over packets that open flows later packets of the same batch use, their answers, garbage and mutants: the same verdicts, bytes, counters, table sizes and leases |
//! | `forwarded_packets_have_one_more_hop_left` | TTLs at the edges (1, 2, 254, 255) and anywhere, every kind, both families, out and in, on the general path, the fast path and with a partial checksum (a super-packet): a forwarded packet's TTL / hop limit is its input's + 1 (255 stays 255), its IPv4 header checksum verifies, its bytes are etherparse's build with that TTL; round trips above see + 2 |
//! | `checksum_matches_naive`, `delta_matches_full_recomputation` | `wire::checksum` against a naive RFC 1071 sum; `Delta` (RFC 1624 eq. 3, `apply_udp`, `negate`, `add`, `word`) against full recomputation |
//! | `regression_*` | the smallest failing cases found so far, as plain tests |
//!
//! Run with `cargo test --test properties`; `PROPTEST_CASES` does not override the per-property
//! counts below (they are chosen so the file runs in a few seconds in debug mode).

mod common;

use common::packets::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;
use vipgate::nat::{Direction, DropReason, Filtering, Mapping};
use vipgate::wire::vnet::Checksum;
use vipgate::wire::{self, checksum, Delta, Transport};

fn cases(n: u32) -> ProptestConfig {
    // No regression files: failures found so far are pinned as plain tests at the end.
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// Fails with the first difference and both packets in hex.
fn same_bytes(got: &[u8], want: &[u8], what: &str) -> Result<(), TestCaseError> {
    match first_difference(got, want) {
        None => Ok(()),
        Some(d) => Err(TestCaseError::fail(format!(
            "{what}: {d}\n got: {}\nwant: {}",
            hex(got),
            hex(want)
        ))),
    }
}

fn expected_checked(spec: &Spec) -> Result<Checked, String> {
    match spec.kind {
        Kind::Udp { no_checksum: true, .. } if !spec.is_v6() => Ok(Checked::UdpNoChecksum),
        _ => Ok(Checked::AllValid),
    }
}

// =============================================================================================
// 0. The generators and wire::parse agree
// =============================================================================================

proptest! {
    #![proptest_config(cases(256))]

    /// Every generated packet is valid for etherparse, and `wire::parse` reads the same facts.
    #[test]
    fn wire_parse_agrees_with_etherparse(spec in spec(Shape::ALL)) {
        let p = spec.packet();
        prop_assert_eq!(check_checksums(&p), expected_checked(&spec));
        let d = wire::parse(&p).map_err(|e| TestCaseError::fail(format!("{e:?} for {}", hex(&p))))?;
        prop_assert_eq!(d.src, spec.host);
        prop_assert_eq!(d.dst, spec.partner);
        prop_assert_eq!(d.l4, spec.l4());
        prop_assert_eq!(d.len, p.len());
        prop_assert_eq!(d.fragment, wire::Fragment::Whole);
        match &spec.kind {
            Kind::Tcp(t) => prop_assert_eq!(
                d.transport,
                Transport::Tcp { src_port: t.src_port, dst_port: t.dst_port, flags: t.flags as u8 }
            ),
            Kind::Udp { src_port, dst_port, .. } => prop_assert_eq!(
                d.transport,
                Transport::Udp { src_port: *src_port, dst_port: *dst_port }
            ),
            Kind::Echo { ident, reply, .. } => prop_assert_eq!(
                d.transport,
                Transport::Echo { ident: *ident, reply: *reply }
            ),
        }
    }
}

// =============================================================================================
// 1, 2. Round trip
// =============================================================================================

/// The configuration with the given mapping.
fn config_mapping(per_host: bool) -> vipgate::nat::Config {
    let mut c = config();
    c.mapping = if per_host { Mapping::PerHost } else { Mapping::PerPartner };
    c
}

/// Outbound, checksums, exact bytes; then the inbound answer and the byte-level round trip.
fn round_trip(spec: &Spec, per_host: bool, trailer: &[u8]) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let mut t = translator_with(config_mapping(per_host), now);
    let original = spec.packet();
    let l4 = spec.l4();
    // Bytes after the IP length (link padding) are ignored and left alone.
    let mut buf = [&original[..], trailer].concat();
    prop_assert_eq!(run(&mut t, &mut buf, now), Outcome::Forward(Direction::Outbound));
    prop_assert_eq!(&buf[original.len()..], trailer, "bytes after the IP length touched");
    let out = buf[..original.len()].to_vec();
    let virt = src_addr(&out);
    prop_assert!(in_pool(virt), "source {} is not a pool address", virt);
    prop_assert_eq!(dst_addr(&out), spec.partner);
    prop_assert_eq!(t.lease_of(spec.host, spec.partner).map(|l| l.virtual_addr), Some(virt));
    // (a) every checksum equals a full recomputation; (b) IPv4 UDP "no checksum" stays 0.
    prop_assert_eq!(check_checksums(&out), expected_checked(spec), "outbound {}", hex(&out));
    if let Kind::Udp { no_checksum: true, .. } = spec.kind {
        if !spec.is_v6() {
            prop_assert_eq!(be16(&out, l4 + 6), 0);
        }
    }
    prop_assert_eq!(ttl(&out), forwarded_ttl(spec.ttl), "outbound TTL / hop limit");
    same_bytes(&out, &forwarded(&spec.build(virt, spec.partner)), "outbound vs etherparse build")?;

    // (c) the inbound answer.
    match spec.kind {
        Kind::Tcp(_) | Kind::Udp { .. } => {
            let mut q = out.clone();
            swap_addrs(&mut q);
            swap_ports(&mut q, l4);
            prop_assert_eq!(run(&mut t, &mut q, now), Outcome::Forward(Direction::Inbound));
            prop_assert_eq!(src_addr(&q), spec.partner);
            prop_assert_eq!(dst_addr(&q), spec.host);
            prop_assert_eq!(check_checksums(&q), expected_checked(spec), "inbound {}", hex(&q));
            swap_addrs(&mut q);
            swap_ports(&mut q, l4);
            // Each way gave the packet its hop back: two more than the original.
            let want = forwarded(&forwarded(&original));
            same_bytes(&q, &want, "outbound then inbound (swapped back) vs original, TTL + 2")?;
        }
        Kind::Echo { .. } => {
            let r = spec.reply();
            let mut q = r.build(spec.partner, virt);
            prop_assert_eq!(run(&mut t, &mut q, now), Outcome::Forward(Direction::Inbound));
            prop_assert_eq!(dst_addr(&q), spec.host);
            prop_assert_eq!(check_checksums(&q), Ok(Checked::AllValid), "inbound {}", hex(&q));
            let want = forwarded(&r.build(spec.partner, spec.host));
            same_bytes(&q, &want, "echo reply vs etherparse build")?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(512))]

    /// TCP, UDP (IPv4 with and without checksum), ICMP echo and ICMPv6 echo, IPv4 and IPv6,
    /// sometimes with IPv4 options or IPv6 extension headers.
    #[test]
    fn round_trip_all_kinds(
        spec in spec(Shape::ALL),
        per_host in any::<bool>(),
        trailer in prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..8)],
    ) {
        round_trip(&spec, per_host, &trailer)?;
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// IPv4 options (IHL > 5) and IPv6 hop-by-hop / destination options always present.
    #[test]
    fn round_trip_with_ip_options_and_extension_headers(
        spec in spec(Shape { extras: 2, max_payload: 600, ..Shape::ALL }),
        per_host in any::<bool>(),
    ) {
        round_trip(&spec, per_host, &[])?;
    }
}

// =============================================================================================
// 3. Fragments
// =============================================================================================

fn transport_header_len(spec: &Spec) -> usize {
    match &spec.kind {
        Kind::Tcp(t) => 20 + t.options.len(),
        _ => 8,
    }
}

fn fragments(
    spec: &Spec,
    first_sel: Index,
    later_sel: Index,
    later_more: bool,
    id: u32,
) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let mut t = translator(now);
    let full = spec.packet();
    let l4 = spec.l4();
    let tlen = full.len() - l4;
    // First fragment: the whole transport header and then some, a multiple of 8 bytes.
    let lo = transport_header_len(spec).div_ceil(8);
    let hi = (tlen - 1) / 8;
    prop_assume!(lo <= hi);
    let k = 8 * (lo + first_sel.index(hi - lo + 1));
    let mut first = fragment(&full, l4, 0, k, true, id);
    let before = first.clone();
    prop_assert_eq!(run(&mut t, &mut first, now), Outcome::Forward(Direction::Outbound));
    let virt = src_addr(&first);
    prop_assert!(in_pool(virt), "source {} is not a pool address", virt);
    prop_assert_eq!(dst_addr(&first), spec.partner);
    if !spec.is_v6() {
        prop_assert!(ipv4_header_valid(&first), "IPv4 header checksum of {}", hex(&first));
    }
    // The transport checksum must be the whole datagram's, computed for the virtual source.
    let whole_virt = spec.build(virt, spec.partner);
    let at = first.len() - k + spec.pseudo_checksum_at().unwrap();
    let full_at = l4 + spec.pseudo_checksum_at().unwrap();
    prop_assert_eq!(
        be16(&first, at),
        be16(&whole_virt, full_at),
        "first fragment checksum (before translation {:#06x})",
        be16(&before, at)
    );
    let want = forwarded(&fragment(&whole_virt, l4, 0, k, true, id));
    same_bytes(&first, &want, "translated first fragment")?;

    // A later fragment of the same datagram: address only.
    let slots = (tlen - k).div_ceil(8); // offsets k, k+8, ... below tlen
    let off = k + 8 * later_sel.index(slots);
    let (len, more) = if later_more && tlen - off >= 16 {
        (8 * ((tlen - off) / 16), true)
    } else {
        (tlen - off, false)
    };
    let mut later = fragment(&full, l4, off, len, more, id);
    let payload = later[later.len() - len..].to_vec();
    prop_assert_eq!(run(&mut t, &mut later, now), Outcome::Forward(Direction::Outbound));
    prop_assert_eq!(&later[later.len() - len..], &payload[..], "later fragment payload touched");
    if !spec.is_v6() {
        prop_assert!(ipv4_header_valid(&later), "IPv4 header checksum of {}", hex(&later));
    }
    same_bytes(
        &later,
        &forwarded(&fragment(&whole_virt, l4, off, len, more, id)),
        "translated later fragment",
    )?;

    // And inbound: fragments of the answer, first and later.
    let r = spec.reply();
    let answer_virt = r.build(spec.partner, virt);
    let answer_host = r.build(spec.partner, spec.host);
    let mut rf = fragment(&answer_virt, l4, 0, k, true, !id);
    prop_assert_eq!(run(&mut t, &mut rf, now), Outcome::Forward(Direction::Inbound));
    let want = forwarded(&fragment(&answer_host, l4, 0, k, true, !id));
    same_bytes(&rf, &want, "inbound first fragment")?;
    let mut rl = fragment(&answer_virt, l4, off, len, more, !id);
    prop_assert_eq!(run(&mut t, &mut rl, now), Outcome::Forward(Direction::Inbound));
    let want = forwarded(&fragment(&answer_host, l4, off, len, more, !id));
    same_bytes(&rl, &want, "inbound later fragment")?;
    Ok(())
}

proptest! {
    #![proptest_config(cases(384))]

    /// IPv4 (with or without options) and IPv6 (fragment header) fragments of TCP and UDP.
    #[test]
    fn fragments_first_carries_whole_datagram_checksum_later_address_only(
        spec in spec(Shape { echo: false, extras: 0, min_payload: 24, ..Shape::ALL }),
        with_options in any::<bool>(),
        options in ip_options(),
        first_sel in any::<Index>(),
        later_sel in any::<Index>(),
        later_more in any::<bool>(),
        id in any::<u32>(),
    ) {
        let mut spec = spec;
        if with_options && !spec.is_v6() {
            spec.ip_options = options;
        }
        fragments(&spec, first_sel, later_sel, later_more, id)?;
    }
}

// =============================================================================================
// 4. Hairpin
// =============================================================================================

fn hairpin(a: &Spec, b_host: IpAddr, per_host: bool) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let mut cfg = config_mapping(per_host);
    cfg.filtering = Filtering::Any;
    let mut t = translator_with(cfg, now);
    // B talks to the partner first, so it holds a virtual address.
    let mut pb = a.build(b_host, a.partner);
    prop_assert_eq!(run(&mut t, &mut pb, now), Outcome::Forward(Direction::Outbound));
    let vb = src_addr(&pb);
    // A sends to B's virtual address.
    let original = a.build(a.host, vb);
    let mut p = original.clone();
    prop_assert_eq!(run(&mut t, &mut p, now), Outcome::Forward(Direction::Hairpin));
    let va = src_addr(&p);
    prop_assert!(in_pool(va) && va != vb, "A's source {} (B's virtual {})", va, vb);
    prop_assert_eq!(t.lease_of(a.host, vb).map(|l| l.virtual_addr), Some(va));
    prop_assert_eq!(dst_addr(&p), b_host);
    prop_assert_eq!(check_checksums(&p), expected_checked(a), "hairpinned {}", hex(&p));
    // A hairpin is one hop too: its two legs give back one, not two.
    same_bytes(&p, &forwarded(&a.build(va, b_host)), "hairpinned vs etherparse build")?;
    // B answers A's virtual address.
    match a.kind {
        Kind::Tcp(_) | Kind::Udp { .. } => {
            let l4 = a.l4();
            let mut q = p.clone();
            swap_addrs(&mut q);
            swap_ports(&mut q, l4);
            prop_assert_eq!(run(&mut t, &mut q, now), Outcome::Forward(Direction::Hairpin));
            prop_assert_eq!(check_checksums(&q), expected_checked(a), "answer {}", hex(&q));
            swap_addrs(&mut q);
            swap_ports(&mut q, l4);
            let want = forwarded(&forwarded(&original));
            same_bytes(&q, &want, "hairpin there and back (swapped back) vs original, TTL + 2")?;
        }
        Kind::Echo { .. } => {
            let r = a.reply();
            let mut q = r.build(b_host, va);
            prop_assert_eq!(run(&mut t, &mut q, now), Outcome::Forward(Direction::Hairpin));
            prop_assert_eq!(check_checksums(&q), Ok(Checked::AllValid), "answer {}", hex(&q));
            let want = forwarded(&r.build(vb, a.host));
            same_bytes(&q, &want, "hairpinned echo reply vs etherparse build")?;
        }
    }
    // B reports an error about what it got (as much as fits): A gets it about what it sent.
    let v6 = a.is_v6();
    let q = p.len().min(if v6 { 1280 - 48 } else { 576 - 28 });
    let (ty, code, rest) = if v6 { ICMPV6_ERRORS[0] } else { ICMPV4_ERRORS[0] };
    let mut e = icmp_error(b_host, va, ty, code, rest, &p[..q]);
    prop_assert_eq!(run(&mut t, &mut e, now), Outcome::Forward(Direction::Hairpin));
    prop_assert_eq!(check_checksums(&e), Ok(Checked::AllValid), "hairpinned error {}", hex(&e));
    same_bytes(
        &e,
        &forwarded(&icmp_error(vb, a.host, ty, code, rest, &forwarded(&original)[..q])),
        "hairpinned ICMP error (its quote as sent, TTL included)",
    )?;

    // Under partner filtering A is not B's partner.
    let mut t = translator_with(config_mapping(per_host), now);
    let mut pb = a.build(b_host, a.partner);
    prop_assert_eq!(run(&mut t, &mut pb, now), Outcome::Forward(Direction::Outbound));
    let mut p = a.build(a.host, src_addr(&pb));
    prop_assert_eq!(run(&mut t, &mut p, now), Outcome::Drop(DropReason::Filtered));
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn hairpin_rewrites_both_addresses(
        a in spec(Shape { max_payload: 600, ..Shape::ALL }),
        b4 in host_v4(),
        b6 in host_v6(),
        per_host in any::<bool>(),
    ) {
        let b = if a.is_v6() { b6 } else { b4 };
        prop_assume!(b != a.host);
        hairpin(&a, b, per_host)?;
    }
}

// =============================================================================================
// 5. ICMP errors
// =============================================================================================

/// Another partner address of the same family.
fn stranger(partner: IpAddr) -> IpAddr {
    match partner {
        IpAddr::V4(v) => {
            let mut o = v.octets();
            o[3] ^= 0x80;
            IpAddr::V4(Ipv4Addr::from(o))
        }
        IpAddr::V6(v) => {
            let mut s = v.segments();
            s[7] ^= 0x8000;
            IpAddr::V6(Ipv6Addr::from(s))
        }
    }
}

#[derive(Debug, Clone)]
struct ErrorCase {
    which: usize,
    quote_sel: Index,
    full_quote: bool,
    router: Option<(IpAddr, IpAddr)>,
    corrupt_at: Index,
    corrupt_mask: u8,
    per_host: bool,
}

fn error_case() -> impl Strategy<Value = ErrorCase> {
    (
        0usize..4,
        any::<Index>(),
        any::<bool>(),
        prop::option::of((partner_v4(), partner_v6())),
        any::<Index>(),
        1u8..=255,
        any::<bool>(),
    )
        .prop_map(
            |(which, quote_sel, full_quote, router, corrupt_at, corrupt_mask, per_host)| {
                ErrorCase {
                    which,
                    quote_sel,
                    full_quote,
                    router,
                    corrupt_at,
                    corrupt_mask,
                    per_host,
                }
            },
        )
}

/// How much of `p` (transport at `l4`) an error quotes: IPv4 at least the header and 8 bytes
/// (RFC 792), at most what fits in 576 bytes; IPv6 as much as fits in 1280 (RFC 4443).
fn quote_len(p: &[u8], l4: usize, v6: bool, c: &ErrorCase) -> usize {
    let max = p.len().min(if v6 { 1280 - 48 } else { 576 - 28 });
    let min = l4 + 8;
    match (c.full_quote, v6) {
        (true, false) => min,
        (true, true) => max,
        _ => min + c.quote_sel.index(max - min + 1),
    }
}

/// The quote a translated error must carry: the first `q` bytes of `want`, except when the
/// quote ends in the middle of the transport checksum. Then its first byte cannot be
/// translated exactly (the carry from the missing low byte is unknown), so whatever the
/// translator left in that one byte (last of `got`) is accepted.
fn expected_quote(spec: &Spec, want: &[u8], got: &[u8], q: usize) -> Vec<u8> {
    let mut v = want[..q].to_vec();
    if spec.pseudo_checksum_at().is_some_and(|at| spec.l4() + at + 1 == q) {
        v[q - 1] = got[got.len() - 1];
    }
    v
}

fn icmp_errors(spec: &Spec, c: &ErrorCase) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let mut t = translator_with(config_mapping(c.per_host), now);
    let v6 = spec.is_v6();
    let l4 = spec.l4();
    let outer_l4 = if v6 { 40 } else { 20 };
    let (ty, code, rest) = if v6 { ICMPV6_ERRORS[c.which] } else { ICMPV4_ERRORS[c.which] };
    let from = match c.router {
        Some((r4, r6)) => {
            if v6 {
                r6
            } else {
                r4
            }
        }
        None => spec.partner,
    };

    let original = spec.packet();
    let mut sent = original.clone();
    prop_assert_eq!(run(&mut t, &mut sent, now), Outcome::Forward(Direction::Outbound));
    let virt = src_addr(&sent);

    // The error about the translated packet, addressed to the virtual address.
    let q = quote_len(&sent, l4, v6, c);
    let error = icmp_error(from, virt, ty, code, rest, &sent[..q]);
    let mut e = error.clone();
    prop_assert_eq!(run(&mut t, &mut e, now), Outcome::Forward(Direction::Inbound));
    prop_assert_eq!(dst_addr(&e), spec.host);
    prop_assert_eq!(src_addr(&e), from);
    let emb = &e[outer_l4 + 8..];
    prop_assert_eq!(src_addr(emb), spec.host, "embedded source");
    prop_assert_eq!(dst_addr(emb), spec.partner, "embedded destination");
    if !v6 {
        prop_assert!(ipv4_header_valid(emb), "embedded IPv4 header checksum: {}", hex(emb));
    }
    if let Some(at) = spec.pseudo_checksum_at() {
        if l4 + at + 2 <= q {
            prop_assert_eq!(
                be16(emb, l4 + at),
                be16(&original, l4 + at),
                "embedded transport checksum (as quoted: {:#06x})",
                be16(&sent, l4 + at)
            );
        }
    }
    prop_assert_eq!(check_checksums(&e), Ok(Checked::AllValid), "outer checksum of {}", hex(&e));
    same_bytes(
        &e,
        &forwarded(&icmp_error(
            from,
            spec.host,
            ty,
            code,
            rest,
            // The quote is of the packet as it left, with its hop back.
            &expected_quote(spec, &forwarded(&original), &e, q),
        )),
        "translated error",
    )?;

    // A corrupted checksum (any byte of the message but its type).
    let mut bad = error.clone();
    let i = outer_l4 + 1 + c.corrupt_at.index(bad.len() - outer_l4 - 1);
    bad[i] ^= c.corrupt_mask;
    prop_assert_eq!(
        run(&mut t, &mut bad, now),
        Outcome::Drop(DropReason::IcmpBadChecksum),
        "byte {} ^ {:#04x}",
        i,
        c.corrupt_mask
    );

    // A quote of a packet to a partner this virtual address has no lease for.
    let mut other = sent[..q].to_vec();
    set_addr(&mut other, true, stranger(spec.partner));
    let mut e2 = icmp_error(from, virt, ty, code, rest, &other);
    prop_assert_eq!(run(&mut t, &mut e2, now), Outcome::Drop(DropReason::IcmpErrorNoLease));
    // And the valid error in a translator that holds no lease at all.
    let mut fresh = translator(now);
    let mut e3 = error.clone();
    prop_assert_eq!(run(&mut fresh, &mut e3, now), Outcome::Drop(DropReason::IcmpErrorNoLease));

    // The other way: the host reports an error about a packet it got from the partner.
    let r = spec.reply();
    let answer = r.build(spec.partner, virt);
    let mut got = answer.clone();
    prop_assert_eq!(run(&mut t, &mut got, now), Outcome::Forward(Direction::Inbound));
    let q2 = quote_len(&got, l4, v6, c);
    let mut eo = icmp_error(spec.host, spec.partner, ty, code, rest, &got[..q2]);
    prop_assert_eq!(run(&mut t, &mut eo, now), Outcome::Forward(Direction::Outbound));
    prop_assert_eq!(check_checksums(&eo), Ok(Checked::AllValid), "outbound error {}", hex(&eo));
    let want = expected_quote(spec, &forwarded(&answer), &eo, q2);
    let want = forwarded(&icmp_error(virt, spec.partner, ty, code, rest, &want));
    same_bytes(&eo, &want, "outbound error")?;
    Ok(())
}

proptest! {
    #![proptest_config(cases(384))]

    /// Port unreachable (and a few other errors) about UDP, as the brief asks.
    #[test]
    fn icmp_error_about_udp(
        spec in spec(Shape { tcp: false, echo: false, ..Shape::ALL }),
        c in error_case(),
    ) {
        icmp_errors(&spec, &c)?;
    }

    /// The same about TCP and echo (quotes of TCP reach its checksum only beyond 18 bytes).
    #[test]
    fn icmp_error_about_tcp_and_echo(
        spec in spec(Shape { udp: false, ..Shape::ALL }),
        c in error_case(),
    ) {
        icmp_errors(&spec, &c)?;
    }
}

// =============================================================================================
// 6. Robustness
// =============================================================================================

/// Which addresses a garbage packet carries (filled in once the leases exist).
#[derive(Debug, Clone, Copy)]
enum Addrs {
    Random,
    HostPartner,
    PartnerVirtual,
    StrangerVirtual,
    HostVirtual,
    HostOtherPool,
}

/// The addresses of one family in a robustness run.
#[derive(Debug, Clone)]
struct Ctx {
    spec: Spec,
    translated: Vec<u8>,
    virt: IpAddr,
    stranger: IpAddr,
    other_pool: IpAddr,
}

impl Ctx {
    fn pick(&self, a: Addrs) -> Option<(IpAddr, IpAddr)> {
        let (h, p, v) = (self.spec.host, self.spec.partner, self.virt);
        match a {
            Addrs::Random => None,
            Addrs::HostPartner => Some((h, p)),
            Addrs::PartnerVirtual => Some((p, v)),
            Addrs::StrangerVirtual => Some((self.stranger, v)),
            Addrs::HostVirtual => Some((h, v)),
            Addrs::HostOtherPool => Some((h, self.other_pool)),
        }
    }

    /// Addresses the packet quoted at `b[i..]` by an ICMP error as sent by the partner to the
    /// virtual address (`inbound`) or by the host to the partner.
    fn aim_quoted(&self, b: &mut [u8], i: usize, inbound: bool) {
        let (s, d) = if inbound {
            (self.virt, self.spec.partner)
        } else {
            (self.spec.partner, self.spec.host)
        };
        set_addr(&mut b[i..], false, s);
        set_addr(&mut b[i..], true, d);
    }

    /// Addresses the outer header as `a` says.
    fn aim(&self, b: &mut [u8], a: Addrs) {
        if let Some((s, d)) = self.pick(a) {
            set_addr(b, false, s);
            set_addr(b, true, d);
        }
    }
}

/// An ICMP error shape for garbage: valid outer checksum, a header-ish embedded packet.
#[derive(Debug, Clone)]
struct IcmpShape {
    ty: u8,
    code: u8,
    inbound: bool,
    inner_ihl: u8,
    inner_len: Option<u16>,
    inner_proto: u8,
    inner_frag: u16,
}

#[derive(Debug, Clone)]
struct Garbage {
    /// 0: raw bytes; 4 or 6: biased towards that IP version.
    family: u8,
    bytes: Vec<u8>,
    addrs: Addrs,
    ihl: u8,
    fix_len: bool,
    frag: u16,
    proto: u8,
    /// IPv6 extension chain: (type, length byte).
    chain: Vec<(u8, u8)>,
    icmp: Option<IcmpShape>,
    fix_checksums: bool,
}

fn addrs() -> impl Strategy<Value = Addrs> {
    prop::sample::select(vec![
        Addrs::Random,
        Addrs::HostPartner,
        Addrs::PartnerVirtual,
        Addrs::StrangerVirtual,
        Addrs::HostVirtual,
        Addrs::HostOtherPool,
    ])
}

fn garbage() -> impl Strategy<Value = Garbage> {
    let proto = prop_oneof![
        4 => prop::sample::select(vec![1u8, 6, 17, 58, 0, 43, 44, 60, 59, 51, 50]),
        1 => any::<u8>(),
    ];
    let icmp = (
        prop::sample::select(vec![
            (3u8, 3u8),
            (11, 0),
            (3, 4),
            (1, 4),
            (2, 0),
            (3, 0),
            (12, 0),
            (4, 0),
        ]),
        any::<bool>(),
        prop_oneof![3 => Just(5u8), 1 => 0u8..16],
        prop::option::of(any::<u16>()),
        prop::sample::select(vec![6u8, 17, 1, 58, 47]),
        prop_oneof![3 => Just(0u16), 1 => any::<u16>()],
    )
        .prop_map(|((ty, code), inbound, inner_ihl, inner_len, inner_proto, inner_frag)| {
            IcmpShape { ty, code, inbound, inner_ihl, inner_len, inner_proto, inner_frag }
        });
    (
        prop::sample::select(vec![0u8, 4, 4, 6, 6]),
        prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 0..1600),
            3 => prop::collection::vec(any::<u8>(), 0..160),
        ],
        addrs(),
        prop_oneof![3 => Just(5u8), 1 => 0u8..16],
        prop::bool::weighted(0.8),
        prop_oneof![2 => Just(0u16), 1 => Just(0x2000u16), 1 => any::<u16>()],
        proto,
        prop::collection::vec((prop::sample::select(vec![0u8, 43, 44, 60, 51]), 0u8..3), 0..4),
        prop::option::weighted(0.4, icmp),
        prop::bool::weighted(0.7),
    )
        .prop_map(
            |(family, bytes, addrs, ihl, fix_len, frag, proto, chain, icmp, fix_checksums)| {
                Garbage {
                    family,
                    bytes,
                    addrs,
                    ihl,
                    fix_len,
                    frag,
                    proto,
                    chain,
                    icmp,
                    fix_checksums,
                }
            },
        )
}

fn materialize(g: &Garbage, c4: &Ctx, c6: &Ctx) -> Vec<u8> {
    let mut b = g.bytes.clone();
    match g.family {
        4 if !b.is_empty() => {
            b[0] = 0x40 | (g.ihl & 0x0f);
            if b.len() < 20 {
                return b;
            }
            let len = b.len();
            if g.fix_len {
                b[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            }
            b[6..8].copy_from_slice(&g.frag.to_be_bytes());
            let proto = if g.icmp.is_some() { 1 } else { g.proto };
            b[9] = proto;
            let hl = usize::from(g.ihl & 0x0f) * 4;
            let mut a = g.addrs;
            if let Some(e) = &g.icmp {
                if hl >= 20 && hl + 8 + 20 <= len {
                    a = if e.inbound { Addrs::PartnerVirtual } else { Addrs::HostPartner };
                    b[hl] = e.ty;
                    b[hl + 1] = e.code;
                    let i = hl + 8;
                    b[i] = 0x40 | (e.inner_ihl & 0x0f);
                    let il = e.inner_len.unwrap_or((len - i) as u16);
                    b[i + 2..i + 4].copy_from_slice(&il.to_be_bytes());
                    b[i + 6..i + 8].copy_from_slice(&e.inner_frag.to_be_bytes());
                    b[i + 9] = e.inner_proto;
                    c4.aim_quoted(&mut b, i, e.inbound);
                }
            }
            c4.aim(&mut b, a);
        }
        6 if !b.is_empty() => {
            b[0] = 0x60 | (b[0] & 0x0f);
            if b.len() < 40 {
                return b;
            }
            let len = b.len();
            if g.fix_len {
                b[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            }
            let (mut next_at, mut off) = (6, 40);
            for &(ty, l) in &g.chain {
                if off + 8 > len {
                    break;
                }
                b[next_at] = ty;
                next_at = off;
                if ty == 44 {
                    b[off + 1] = 0;
                    off += 8;
                } else {
                    b[off + 1] = l;
                    off += (usize::from(l) + 1) * 8;
                }
            }
            b[next_at] = if g.icmp.is_some() { 58 } else { g.proto };
            let mut a = g.addrs;
            if let Some(e) = &g.icmp {
                if off + 8 + 40 <= len {
                    a = if e.inbound { Addrs::PartnerVirtual } else { Addrs::HostPartner };
                    b[off] = e.ty;
                    b[off + 1] = e.code;
                    let i = off + 8;
                    b[i] = 0x60 | (b[i] & 0x0f);
                    let il = e.inner_len.unwrap_or((len - i - 40) as u16);
                    b[i + 4..i + 6].copy_from_slice(&il.to_be_bytes());
                    b[i + 6] = e.inner_proto;
                    c6.aim_quoted(&mut b, i, e.inbound);
                }
            }
            c6.aim(&mut b, a);
        }
        _ => return b,
    }
    if g.fix_checksums {
        fix_checksums(&mut b);
    }
    b
}

/// Where the transport of a (possibly garbage) unfragmented packet is, by a simple walk:
/// (transport offset, end, protocol). IPv6: hop-by-hop, routing, destination options and a
/// fragment header with offset 0 and no MF are walked, at most 8.
fn locate_transport(b: &[u8]) -> Option<(usize, usize, u8)> {
    match b.first()? >> 4 {
        4 if b.len() >= 20 => {
            let hl = usize::from(b[0] & 0x0f) * 4;
            let total = usize::from(be16(b, 2));
            let frag = be16(b, 6) & 0x3fff;
            (hl >= 20 && hl <= total && total <= b.len() && frag == 0).then_some((hl, total, b[9]))
        }
        6 if b.len() >= 40 => {
            let total = 40 + usize::from(be16(b, 4));
            if total > b.len() {
                return None;
            }
            let (mut nh, mut off) = (b[6], 40);
            for _ in 0..8 {
                match nh {
                    0 | 43 | 60 => {
                        if off + 8 > total {
                            return None;
                        }
                        nh = b[off];
                        off += (usize::from(b[off + 1]) + 1) * 8;
                    }
                    44 => {
                        if off + 8 > total || be16(b, off + 2) & 0xfff9 != 0 {
                            return None;
                        }
                        nh = b[off];
                        off += 8;
                    }
                    p => return (off <= total).then_some((off, total, p)),
                }
            }
            None
        }
        _ => None,
    }
}

/// The pseudo-header sum for the transport of `b` (0 for ICMPv4).
fn pseudo(b: &[u8], proto: u8, len: usize) -> u32 {
    if proto == 1 {
        0
    } else if b[0] >> 4 == 4 {
        pseudo_v4(&b[12..16], &b[16..20], proto, len as u16)
    } else {
        pseudo_v6(&b[8..24], &b[24..40], proto, len as u32)
    }
}

/// The checksum field offset within the transport and the length it covers, when the
/// transport is one whose checksum we can judge.
fn transport_checksum(b: &[u8], l4: usize, end: usize, proto: u8) -> Option<(usize, usize)> {
    let v4 = b[0] >> 4 == 4;
    let seg = end - l4;
    match proto {
        6 if seg >= 20 => Some((16, seg)),
        17 if seg >= 8 => {
            let ulen = usize::from(be16(b, l4 + 4));
            (ulen >= 8 && ulen <= seg).then_some((6, ulen))
        }
        1 if v4 && seg >= 8 => Some((2, seg)),
        58 if !v4 && seg >= 8 => Some((2, seg)),
        _ => None,
    }
}

/// Best effort: makes the transport checksum (UDP length first) and the IPv4 header
/// checksum right, so that garbage gets past checksum verification.
fn fix_checksums(b: &mut [u8]) {
    if let Some((l4, end, proto)) = locate_transport(b) {
        if proto == 17 && end - l4 >= 8 {
            let seg = (end - l4) as u16;
            b[l4 + 4..l4 + 6].copy_from_slice(&seg.to_be_bytes());
        }
        if let Some((at, len)) = transport_checksum(b, l4, end, proto) {
            let init = pseudo(b, proto, len);
            let mut c = recompute(&b[l4..l4 + len], at, init);
            if proto == 17 && c == 0 {
                c = 0xffff;
            }
            b[l4 + at..l4 + at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    if b.len() >= 20 && b[0] >> 4 == 4 {
        let hl = usize::from(b[0] & 0x0f) * 4;
        if hl >= 20 && hl <= b.len() {
            b[10..12].fill(0);
            let c = naive_checksum(&b[..hl], 0);
            b[10..12].copy_from_slice(&c.to_be_bytes());
        }
    }
}

/// Whether the transport checksum of `b` is valid, when there is one to judge (UDP checksum
/// 0 is not judged).
fn transport_valid(b: &[u8]) -> Option<bool> {
    let (l4, end, proto) = locate_transport(b)?;
    let (at, len) = transport_checksum(b, l4, end, proto)?;
    if proto == 17 && be16(b, l4 + at) == 0 {
        return None;
    }
    Some(naive_sum(&b[l4..l4 + len], pseudo(b, proto, len)) == 0xffff)
}

/// Where the quoted packet of an unfragmented ICMP/ICMPv6 error starts, when there is a
/// whole quoted IP header of the same version.
fn embedded_at(b: &[u8]) -> Option<usize> {
    let (l4, end, proto) = locate_transport(b)?;
    let v4 = b[0] >> 4 == 4;
    let error = match proto {
        1 if v4 => matches!(b.get(l4)?, 3 | 11 | 12),
        58 if !v4 => matches!(b.get(l4)?, 1..=4),
        _ => false,
    };
    let i = l4 + 8;
    let need = if v4 { 20 } else { 40 };
    (error && i + need <= end && b[i] >> 4 == b[0] >> 4).then_some(i)
}

/// What must hold of any packet the translator handled, whatever it was.
fn check_outcome(before: &[u8], after: &[u8], o: &Outcome) -> Result<(), TestCaseError> {
    match o {
        Outcome::Forward(dir) => {
            let (s0, d0, s1, d1) =
                (src_addr(before), dst_addr(before), src_addr(after), dst_addr(after));
            let ok = match dir {
                // An ICMP error raised outside the LAN (a router, the gateway's WAN address)
                // about a packet delivered to a host keeps its outer source; the host's real
                // address in the quote becomes the virtual one.
                Direction::Outbound if !in_lan(s0) => embedded_at(after).is_some_and(|i| {
                    s1 == s0
                        && d1 == d0
                        && in_lan(dst_addr(&before[i..]))
                        && in_pool(dst_addr(&after[i..]))
                }),
                Direction::Outbound => in_lan(s0) && in_pool(s1) && d1 == d0,
                Direction::Inbound => in_pool(d0) && in_lan(d1) && s1 == s0,
                Direction::Hairpin => in_lan(s0) && in_pool(d0) && in_pool(s1) && in_lan(d1),
            };
            prop_assert!(
                ok,
                "{:?}: {} -> {} became {} -> {}\nbefore {}",
                dir,
                s0,
                d0,
                s1,
                d1,
                hex(before)
            );
            // Within the fixed IP header only the addresses, the IPv4 checksum and the TTL
            // (one more than it came with, 255 staying 255) change.
            let v4 = before[0] >> 4 == 4;
            let fixed = if v4 { 20 } else { 40 };
            let at = ttl_offset(before);
            prop_assert_eq!(
                after[at],
                forwarded_ttl(before[at]),
                "{:?}: TTL / hop limit\nbefore {}\nafter  {}",
                dir,
                hex(before),
                hex(after)
            );
            let writable =
                |i: usize| i == at || if v4 { (10..20).contains(&i) } else { (8..40).contains(&i) };
            for i in 0..fixed {
                if before[i] != after[i] && !writable(i) {
                    return Err(TestCaseError::fail(format!(
                        "{dir:?} changed header byte {i}\nbefore {}\nafter  {}",
                        hex(before),
                        hex(after)
                    )));
                }
            }
            if v4 && ipv4_header_valid(before) {
                prop_assert!(
                    ipv4_header_valid(after),
                    "IPv4 header checksum broken\nbefore {}\nafter  {}",
                    hex(before),
                    hex(after)
                );
            }
            if let Some(i) = embedded_at(before) {
                // An ICMP error: its quote was translated the other way.
                let (e0, e1) = (&before[i..], &after[i..]);
                let ok = match dir {
                    Direction::Inbound => {
                        in_pool(src_addr(e0))
                            && in_lan(src_addr(e1))
                            && dst_addr(e1) == dst_addr(e0)
                    }
                    Direction::Outbound => {
                        in_lan(dst_addr(e0))
                            && in_pool(dst_addr(e1))
                            && src_addr(e1) == src_addr(e0)
                    }
                    Direction::Hairpin => true,
                };
                prop_assert!(
                    ok,
                    "{:?} ICMP error, quote {} -> {} became {} -> {}",
                    dir,
                    src_addr(e0),
                    dst_addr(e0),
                    src_addr(e1),
                    dst_addr(e1)
                );
                if v4 && e0.len() >= 20 && ipv4_header_valid(e0) {
                    prop_assert!(
                        ipv4_header_valid(e1),
                        "embedded IPv4 header checksum broken\nbefore {}\nafter  {}",
                        hex(before),
                        hex(after)
                    );
                }
            }
            if transport_valid(before) == Some(true) {
                prop_assert_eq!(
                    transport_valid(after),
                    Some(true),
                    "transport checksum broken\nbefore {}\nafter  {}",
                    hex(before),
                    hex(after)
                );
            }
        }
        Outcome::Reply(reason, reply) => check_reply(before, *reason, reply)?,
        Outcome::Drop(_) => {}
        Outcome::Pass => prop_assert_eq!(hex(before), hex(after), "a passed packet was changed"),
    }
    Ok(())
}

/// A `Reply` must be the ICMP error "administratively prohibited" (3/13, ICMPv6 1/1) from the
/// configured source to the offending packet's sender, quoting that packet as it was sent,
/// within 576 (IPv4) or 1280 (IPv6) bytes, with every checksum right.
fn check_reply(sent: &[u8], reason: DropReason, reply: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(reason.wants_reply(), "reply for {:?}", reason);
    prop_assert_eq!(check_checksums(reply), Ok(Checked::AllValid), "reply {}", hex(reply));
    let v4 = reply[0] >> 4 == 4;
    prop_assert_eq!(v4, sent[0] >> 4 == 4);
    let (head, max, source, ty_code): (usize, usize, IpAddr, [u8; 2]) = if v4 {
        (28, 576, IpAddr::V4(Ipv4Addr::new(192, 0, 0, 8)), [3, 13])
    } else {
        (48, 1280, "2001:db8:1::fffe".parse().unwrap(), [1, 1])
    };
    prop_assert!(reply.len() <= max, "reply of {} bytes", reply.len());
    prop_assert_eq!(&reply[head - 8..head - 6], &ty_code[..]);
    prop_assert_eq!(src_addr(reply), source);
    prop_assert_eq!(
        dst_addr(reply),
        src_addr(sent),
        "{:?} reply sent to {} about a packet from {}:\nsent  {}\nreply {}",
        reason,
        dst_addr(reply),
        src_addr(sent),
        hex(sent),
        hex(reply)
    );
    let quoted = &reply[head..];
    prop_assert!(
        quoted.len() <= sent.len() && quoted == &sent[..quoted.len()],
        "the reply quotes something else than the packet sent:\nsent  {}\nreply {}",
        hex(sent),
        hex(reply)
    );
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Set(Index, u8),
    Flip(Index, u8),
    Truncate(Index),
}

#[derive(Debug, Clone)]
struct Mutant {
    v6: bool,
    /// 0: the host's packet, 1: the partner's answer, 2: an error about the host's packet,
    /// 3: the host's error about the answer.
    base: u8,
    ops: Vec<Op>,
    fix: bool,
}

fn mutant() -> impl Strategy<Value = Mutant> {
    let op = prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Op::Set(i, b)),
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Op::Flip(i, b)),
        1 => any::<Index>().prop_map(Op::Truncate),
    ];
    (any::<bool>(), 0u8..4, prop::collection::vec(op, 1..6), any::<bool>())
        .prop_map(|(v6, base, ops, fix)| Mutant { v6, base, ops, fix })
}

fn mutate(m: &Mutant, c: &Ctx, answer_got: &[u8]) -> Vec<u8> {
    let s = &c.spec;
    let mut b = match m.base {
        0 => s.packet(),
        1 => s.reply().build(s.partner, c.virt),
        2 => icmp_error(s.partner, c.virt, if m.v6 { 1 } else { 3 }, 4, [0; 4], &c.translated),
        _ => icmp_error(s.host, s.partner, if m.v6 { 1 } else { 3 }, 3, [0; 4], answer_got),
    };
    for op in &m.ops {
        if b.is_empty() {
            break;
        }
        match op {
            Op::Set(i, v) => {
                let i = i.index(b.len());
                b[i] = *v;
            }
            Op::Flip(i, bit) => {
                let i = i.index(b.len());
                b[i] ^= 1 << bit;
            }
            Op::Truncate(i) => {
                let n = i.index(b.len() + 1);
                b.truncate(n);
            }
        }
    }
    if m.fix {
        // Make the outer length agree with the bytes (a truncated ICMP error becomes a
        // valid error with a short quote), then the checksums.
        match b.first().map(|v| v >> 4) {
            Some(4) if b.len() >= 20 => {
                let n = b.len() as u16;
                b[2..4].copy_from_slice(&n.to_be_bytes());
            }
            Some(6) if b.len() >= 40 => {
                let n = (b.len() - 40) as u16;
                b[4..6].copy_from_slice(&n.to_be_bytes());
            }
            _ => {}
        }
        fix_checksums(&mut b);
    }
    b
}

/// The configuration of the robustness properties: optionally `any` filtering, and tables
/// so small (3 leases, 6 flows) that refusals (ICMP errors, also over IPv6) are common.
fn robustness_config(per_host: bool, filtering_any: bool, small: bool) -> vipgate::nat::Config {
    let mut cfg = config_mapping(per_host);
    if filtering_any {
        cfg.filtering = Filtering::Any;
    }
    if small {
        cfg.max_leases = 3;
        cfg.max_flows = 6;
        cfg.icmp_source_v6 = Some("2001:db8:1::fffe".parse().unwrap());
    }
    cfg
}

fn robustness(
    s4: &Spec,
    s6: &Spec,
    filtering_any: bool,
    per_host: bool,
    small: bool,
    garbage: &[Garbage],
    mutants: &[Mutant],
) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let mut t = translator_with(robustness_config(per_host, filtering_any, small), now);
    let mut ctx = Vec::new();
    let mut answers = Vec::new();
    for (s, other_pool) in [
        (s4, IpAddr::V4(Ipv4Addr::new(198, 18, 200, 7))),
        (s6, "2001:db8:ff::7777".parse().unwrap()),
    ] {
        let mut p = s.packet();
        prop_assert_eq!(run(&mut t, &mut p, now), Outcome::Forward(Direction::Outbound));
        let virt = src_addr(&p);
        let mut a = s.reply().build(s.partner, virt);
        prop_assert_eq!(run(&mut t, &mut a, now), Outcome::Forward(Direction::Inbound));
        answers.push(a);
        ctx.push(Ctx {
            spec: s.clone(),
            translated: p,
            virt,
            stranger: stranger(s.partner),
            other_pool,
        });
    }
    for g in garbage {
        let before = materialize(g, &ctx[0], &ctx[1]);
        let mut after = before.clone();
        let o = run(&mut t, &mut after, now);
        check_outcome(&before, &after, &o)?;
    }
    for m in mutants {
        let i = usize::from(m.v6);
        let before = mutate(m, &ctx[i], &answers[i]);
        let mut after = before.clone();
        let o = run(&mut t, &mut after, now);
        check_outcome(&before, &after, &o)?;
    }
    // Still translating, with the same leases.
    for c in &ctx {
        let mut p = c.spec.packet();
        prop_assert_eq!(run(&mut t, &mut p, now), Outcome::Forward(Direction::Outbound));
        same_bytes(&p, &c.translated, "the first packet again, after the garbage")?;
        if !small {
            let mut s = c.spec.clone();
            s.partner = stranger(s.partner);
            let mut p = s.packet();
            prop_assert_eq!(run(&mut t, &mut p, now), Outcome::Forward(Direction::Outbound));
            prop_assert!(in_pool(src_addr(&p)));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(1000))]

    /// Any bytes at all, to a translator without and with a lease: no panic, and whatever
    /// comes out satisfies [`check_outcome`].
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1600)) {
        let now = Instant::now();
        let mut t = translator(now);
        let mut b = bytes.clone();
        let o = run(&mut t, &mut b, now);
        check_outcome(&bytes, &b, &o)?;
        let mut p = Spec {
            host: "192.0.2.9".parse().unwrap(),
            partner: "203.0.113.9".parse().unwrap(),
            kind: Kind::Udp { src_port: 1, dst_port: 2, no_checksum: false },
            payload: vec![7; 5],
            ttl: 64,
            ident: 1,
            dont_fragment: false,
            tos: 0,
            flow_label: 0,
            ip_options: vec![],
            hop_by_hop: None,
            dest_opts: None,
        }
        .packet();
        prop_assert_eq!(run(&mut t, &mut p, now), Outcome::Forward(Direction::Outbound));
        let mut b = bytes.clone();
        let o = run(&mut t, &mut b, now);
        check_outcome(&bytes, &b, &o)?;
    }
}

proptest! {
    #![proptest_config(cases(300))]

    /// Runs of biased garbage (IPv4/IPv6 headers with our addresses, extension chains, ICMP
    /// errors with valid checksums around header-ish quotes) and mutated valid packets.
    #[test]
    fn garbage_and_mutants_never_panic_and_leave_the_translator_working(
        s4 in spec(Shape { v6: false, max_payload: 200, ..Shape::ALL }),
        s6 in spec(Shape { v4: false, max_payload: 200, ..Shape::ALL }),
        filtering_any in any::<bool>(),
        per_host in any::<bool>(),
        small in prop::bool::weighted(0.25),
        garbage in prop::collection::vec(garbage(), 0..12),
        mutants in prop::collection::vec(mutant(), 0..12),
    ) {
        robustness(&s4, &s6, filtering_any, per_host, small, &garbage, &mutants)?;
    }
}

// =============================================================================================
// 8. Many flows through one translator; refusals
// =============================================================================================

/// Host `i` (of four) of a family.
fn small_host(v6: bool, i: usize) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1 + i as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1 + i as u8))
    }
}

/// Partner `i` (of four) of a family.
fn small_partner(v6: bool, i: usize) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1 + i as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1 + i as u8))
    }
}

#[derive(Debug, Clone)]
struct Step {
    host: usize,
    target: usize,
    spec: Spec,
    answer: bool,
}

fn steps(max: usize) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            0usize..4,
            0usize..8,
            spec(Shape { max_payload: 64, extras: 0, ..Shape::ALL }),
            any::<bool>(),
        )
            .prop_map(|(host, target, spec, answer)| Step { host, target, spec, answer }),
        1..max,
    )
}

/// Four hosts and four partners per family, many packets through one translator with small
/// pools: a pair
/// always gets the same virtual address, no two hosts share one towards the same partner
/// (under `per-host` no two hosts share one at all, and a host keeps one), the lease API
/// agrees, and every answer finds its way back byte for byte.
fn sessions(per_host: bool, steps: &[Step]) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let mut cfg = config_mapping(per_host);
    // Small pools (6 and 7 usable addresses) so that addresses must be shared.
    cfg.pools = vec!["198.18.0.0/29".parse().unwrap(), "2001:db8:ff::/125".parse().unwrap()];
    let mut t = translator_with(cfg, now);
    let mut seen: Vec<(IpAddr, IpAddr, IpAddr)> = Vec::new(); // (host, partner, virtual)
    for s in steps {
        let v6 = s.spec.is_v6();
        let mut spec = s.spec.clone();
        spec.host = small_host(v6, s.host);
        spec.partner = small_partner(v6, s.target % 4);
        let original = spec.packet();
        let mut p = original.clone();
        prop_assert_eq!(run(&mut t, &mut p, now), Outcome::Forward(Direction::Outbound));
        let virt = src_addr(&p);
        prop_assert!(in_pool(virt));
        for &(h, q, v) in &seen {
            if h == spec.host && q == spec.partner {
                prop_assert_eq!(v, virt, "{} -> {} changed virtual address", h, q);
            }
            if h != spec.host && q == spec.partner {
                prop_assert_ne!(
                    v,
                    virt,
                    "{} and {} share a virtual address towards {}",
                    h,
                    spec.host,
                    q
                );
            }
            if per_host && h == spec.host {
                prop_assert_eq!(v, virt, "per-host: {} has two virtual addresses", h);
            }
            if per_host && h != spec.host {
                prop_assert_ne!(
                    v,
                    virt,
                    "per-host: {} and {} share a virtual address",
                    h,
                    spec.host
                );
            }
        }
        seen.push((spec.host, spec.partner, virt));
        prop_assert_eq!(t.lease_of(spec.host, spec.partner).map(|l| l.virtual_addr), Some(virt));
        prop_assert_eq!(t.lease_for(virt, spec.partner).map(|l| l.real), Some(spec.host));
        if s.answer {
            match spec.kind {
                Kind::Tcp(_) | Kind::Udp { .. } => {
                    let mut q = p.clone();
                    swap_addrs(&mut q);
                    swap_ports(&mut q, spec.l4());
                    prop_assert_eq!(run(&mut t, &mut q, now), Outcome::Forward(Direction::Inbound));
                    swap_addrs(&mut q);
                    swap_ports(&mut q, spec.l4());
                    let want = forwarded(&forwarded(&original));
                    same_bytes(&q, &want, "answer (swapped back) vs original, TTL + 2")?;
                }
                Kind::Echo { .. } => {
                    let r = spec.reply();
                    let mut q = r.build(spec.partner, virt);
                    prop_assert_eq!(run(&mut t, &mut q, now), Outcome::Forward(Direction::Inbound));
                    same_bytes(&q, &forwarded(&r.build(spec.partner, spec.host)), "echo reply")?;
                }
            }
        }
    }
    Ok(())
}

/// Tiny tables, hosts sending to partners and to each other's virtual addresses: whatever
/// is refused with a reply gets [`check_reply`]'s reply (to the real sender, quoting what it
/// sent); whatever is forwarded satisfies [`check_outcome`].
fn refusals(
    max_leases: usize,
    max_flows: usize,
    filtering_any: bool,
    per_host: bool,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let mut cfg = config_mapping(per_host);
    cfg.max_leases = max_leases;
    cfg.max_flows = max_flows;
    cfg.icmp_rate = 10_000;
    cfg.icmp_source_v6 = Some("2001:db8:1::fffe".parse().unwrap());
    if filtering_any {
        cfg.filtering = Filtering::Any;
    }
    let mut t = translator_with(cfg, now);
    let mut virt_of: Vec<(IpAddr, IpAddr)> = Vec::new(); // (host, a virtual address it got)
    for s in steps {
        let v6 = s.spec.is_v6();
        let host = small_host(v6, s.host);
        let dst = if s.target < 4 {
            small_partner(v6, s.target)
        } else {
            let other = small_host(v6, s.target - 4);
            virt_of
                .iter()
                .rev()
                .find(|(h, _)| *h == other)
                .map_or(small_partner(v6, 0), |&(_, v)| v)
        };
        let sent = s.spec.build(host, dst);
        let mut p = sent.clone();
        let o = run(&mut t, &mut p, now);
        check_outcome(&sent, &p, &o)?;
        if let Outcome::Forward(Direction::Outbound | Direction::Hairpin) = o {
            virt_of.push((host, src_addr(&p)));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn many_flows_keep_consistent_virtual_addresses(
        per_host in any::<bool>(),
        steps in steps(40),
    ) {
        sessions(per_host, &steps)?;
    }

    #[test]
    fn refusals_are_replied_to_the_real_sender(
        max_leases in 1usize..=3,
        max_flows in 1usize..=4,
        filtering_any in any::<bool>(),
        per_host in any::<bool>(),
        steps in steps(24),
    ) {
        refusals(max_leases, max_flows, filtering_any, per_host, &steps)?;
    }
}

// =============================================================================================
// 7. Checksum arithmetic
// =============================================================================================

/// Bytes, sometimes from a small alphabet that makes carries and all-ones words likely.
fn biased_bytes(lo: usize, hi: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), lo..hi),
        prop::collection::vec(
            prop::sample::select(vec![0u8, 0xff, 0x01, 0xfe, 0x80, 0x7f]),
            lo..hi
        ),
        prop::collection::vec(prop::sample::select(vec![0u8, 0xff]), lo..hi),
    ]
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn checksum_matches_naive(
        data in biased_bytes(0, 2000),
        initial in prop_oneof![Just(0u32), 0u32..0x4_0000, any::<u32>()],
    ) {
        prop_assert_eq!(checksum::checksum(&data, u64::from(initial)), naive_checksum(&data, initial));
        prop_assert_eq!(checksum::fold(checksum::sum(&data, u64::from(initial))), naive_sum(&data, initial));
    }

    /// RFC 1624 eq. 3 must give exactly what a full recomputation gives. The one exception:
    /// when the new data is all zero, the full computation gives 0xffff (~+0) and eq. 3 gives
    /// 0x0000 (~-0); RFC 1624 §3 explains both mean zero and real headers never sum to +0.
    #[test]
    fn delta_matches_full_recomputation(
        data in biased_bytes(16, 512),
        width in prop::sample::select(vec![2usize, 4, 16]),
        off_sel in any::<Index>(),
        new in prop_oneof![any::<[u8; 16]>(), Just([0u8; 16]), Just([0xff; 16])],
        second in prop::option::of((any::<Index>(), any::<[u8; 2]>())),
    ) {
        let len = data.len() & !1;
        let data = &data[..len];
        let off = 2 * off_sel.index((len - width) / 2 + 1);
        let old = &data[off..off + width];
        let new = &new[..width];
        let before = naive_checksum(data, 0);
        let mut after = data.to_vec();
        after[off..off + width].copy_from_slice(new);
        let full = naive_checksum(&after, 0);
        let d = Delta::new(old, new);
        let inc = d.apply(before);
        let all_zero = after.iter().all(|&b| b == 0);
        if all_zero {
            prop_assert_eq!(full, 0xffff);
            prop_assert!(inc == 0 || inc == 0xffff, "incremental {:#06x}", inc);
        } else {
            prop_assert_eq!(inc, full, "before {:#06x} old {} new {} at {}", before, hex(old), hex(new), off);
        }
        if width == 2 {
            prop_assert_eq!(Delta::word(be16(old, 0), be16(new, 0)), d);
        }
        // UDP: 0 means "none" and stays; a computed 0 is sent as 0xffff.
        prop_assert_eq!(d.apply_udp(0), 0);
        if !all_zero {
            let sent_before = if before == 0 { 0xffff } else { before };
            let want = if full == 0 { 0xffff } else { full };
            prop_assert_eq!(d.apply_udp(sent_before), want);
        }
        // The inverse restores exactly (a full computation never yields 0xffff here).
        if before != 0xffff {
            prop_assert_eq!(d.negate().apply(inc), before);
        }
        // Two rewrites: deltas add.
        if let Some((i, w)) = second {
            let off2 = 2 * i.index(len / 2);
            if off2 + 2 <= off || off2 >= off + width {
                let d2 = Delta::new(&after[off2..off2 + 2], &w);
                let mut after2 = after.clone();
                after2[off2..off2 + 2].copy_from_slice(&w);
                if !after2.iter().all(|&b| b == 0) {
                    prop_assert_eq!((d + d2).apply(before), naive_checksum(&after2, 0));
                }
            }
        }
    }
}

// =============================================================================================
// Regressions: the smallest failing cases found by the properties above, pinned.
// =============================================================================================

/// Found by `garbage_and_mutants_*` and `refusals_are_replied_to_the_real_sender`: a hairpin
/// whose inbound leg is refused (here the lease table is full when host B's packet to host
/// A's virtual address needs a lease for B towards A) is answered with an ICMP 3/13 addressed
/// to B's freshly rewritten *virtual* source, quoting the half-translated packet, instead of
/// to B's real address quoting what B sent.
#[test]
fn regression_refused_hairpin_is_replied_to_the_real_sender() {
    let now = Instant::now();
    let mut cfg = config();
    cfg.filtering = Filtering::Any;
    cfg.max_leases = 2;
    let mut t = translator_with(cfg, now);
    let udp = |host: &str, partner: &str| Spec {
        host: host.parse().unwrap(),
        partner: partner.parse().unwrap(),
        kind: Kind::Udp { src_port: 1000, dst_port: 53, no_checksum: false },
        payload: vec![],
        ttl: 64,
        ident: 0,
        dont_fragment: false,
        tos: 0,
        flow_label: 0,
        ip_options: vec![],
        hop_by_hop: None,
        dest_opts: None,
    };
    // A (192.0.2.1) -> 203.0.113.1: lease 1 of 2.
    let mut a = udp("192.0.2.1", "203.0.113.1").packet();
    assert_eq!(run(&mut t, &mut a, now), Outcome::Forward(Direction::Outbound));
    let va = src_addr(&a);
    // B (192.0.2.2) -> A's virtual address: the outbound leg takes lease 2 of 2, the inbound
    // leg needs a third.
    let sent = udp("192.0.2.2", "203.0.113.1").build("192.0.2.2".parse().unwrap(), va);
    let mut b = sent.clone();
    match run(&mut t, &mut b, now) {
        Outcome::Reply(reason, reply) => {
            assert_eq!(reason, DropReason::LeaseTableFull);
            if let Err(e) = check_reply(&sent, reason, &reply) {
                panic!("{e}");
            }
        }
        other => panic!("expected Reply(LeaseTableFull, ..), got {other:?}"),
    }
}

// =============================================================================================
// 7. Batches
// =============================================================================================

/// The same packets through the general path, through `translate` one at a time (the fast
/// path where it applies) and through `translate_batch` in batches of the given sizes: the
/// same verdicts, bytes, counters and leases. The packets open flows
/// that later packets of the same batch use, answer them, and mix in garbage and mutants.
#[allow(clippy::too_many_arguments)]
fn batch_agrees(
    s4: &Spec,
    s6: &Spec,
    specs: &[Spec],
    small: bool,
    filtering_any: bool,
    garbage: &[Garbage],
    mutants: &[Mutant],
    sizes: &[usize],
) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let cfg = robustness_config(false, filtering_any, small);
    let mut general = translator_with(cfg.clone(), now);
    let mut one = translator_with(cfg.clone(), now);
    let mut batched = translator_with(cfg, now);
    let mut ctx = Vec::new();
    let mut answers = Vec::new();
    for (s, other_pool) in [
        (s4, IpAddr::V4(Ipv4Addr::new(198, 18, 200, 7))),
        (s6, "2001:db8:ff::7777".parse().unwrap()),
    ] {
        let mut p = s.packet();
        let want = run_general(&mut general, &mut p.clone(), now);
        prop_assert_eq!(&run(&mut one, &mut p.clone(), now), &want);
        prop_assert_eq!(run(&mut batched, &mut p, now), want);
        let virt = src_addr(&p);
        answers.push(s.reply().build(s.partner, virt));
        ctx.push(Ctx {
            spec: s.clone(),
            translated: p,
            virt,
            stranger: stranger(s.partner),
            other_pool,
        });
    }
    let mut packets = Vec::new();
    let n = specs.len().max(garbage.len()).max(mutants.len());
    for i in 0..n {
        if let Some(s) = specs.get(i) {
            packets.push(s.packet());
        }
        if let Some(g) = garbage.get(i) {
            packets.push(materialize(g, &ctx[0], &ctx[1]));
        }
        packets.push(answers[i % 2].clone());
        if let Some(m) = mutants.get(i) {
            let c = usize::from(m.v6);
            packets.push(mutate(m, &ctx[c], &answers[c]));
        }
        if let Some(s) = specs.get(i) {
            packets.push(s.packet());
            packets.push(s.reply().build(s.partner, ctx[usize::from(s.is_v6())].virt));
        }
    }

    // The general path is the reference; the fast path one at a time must match it exactly.
    let mut want = packets.clone();
    let want_outcomes: Vec<Outcome> =
        want.iter_mut().map(|p| run_general(&mut general, p, now)).collect();
    let mut single = packets.clone();
    for (i, p) in single.iter_mut().enumerate() {
        prop_assert_eq!(&run(&mut one, p, now), &want_outcomes[i], "packet {} one at a time", i);
        same_bytes(p, &want[i], "fast path vs general path")?;
    }
    let mut got = packets.clone();
    let mut got_outcomes: Vec<Option<Outcome>> = vec![None; got.len()];
    let mut start = 0;
    let mut sizes = sizes.iter().cycle();
    while start < got.len() {
        let end = (start + sizes.next().copied().unwrap_or(1)).min(got.len());
        let mut bufs: Vec<&mut [u8]> = got[start..end].iter_mut().map(|p| &mut p[..]).collect();
        batched.translate_batch(&mut bufs, now, |i, v| got_outcomes[start + i] = Some(outcome(v)));
        start = end;
    }
    for (i, (w, g)) in want_outcomes.iter().zip(&got_outcomes).enumerate() {
        prop_assert_eq!(Some(w), g.as_ref(), "packet {}", i);
        same_bytes(&got[i], &want[i], "batched vs one at a time")?;
    }
    prop_assert_eq!(general.counters(), one.counters());
    prop_assert_eq!(general.counters(), batched.counters());
    prop_assert_eq!(general.table_sizes(), one.table_sizes());
    prop_assert_eq!(general.table_sizes(), batched.table_sizes());
    let leases = |t: &vipgate::nat::Translator| t.leases().collect::<Vec<_>>();
    prop_assert_eq!(leases(&general), leases(&one));
    prop_assert_eq!(leases(&general), leases(&batched));
    // The flows' timers agree too: past the transitory TCP and ICMP timeouts, not the UDP one.
    let later = now + std::time::Duration::from_secs(250);
    for t in [&mut general, &mut one, &mut batched] {
        t.handle_timeout(later);
    }
    prop_assert_eq!(general.counters(), one.counters());
    prop_assert_eq!(general.counters(), batched.counters());
    prop_assert_eq!(general.table_sizes(), one.table_sizes());
    prop_assert_eq!(general.table_sizes(), batched.table_sizes());
    Ok(())
}

proptest! {
    #![proptest_config(cases(300))]

    /// The fast path, one at a time and in batches of any sizes, is the general path.
    #[test]
    fn fast_path_and_batches_translate_as_the_general_path(
        s4 in spec(Shape { v6: false, max_payload: 200, ..Shape::ALL }),
        s6 in spec(Shape { v4: false, max_payload: 200, ..Shape::ALL }),
        specs in prop::collection::vec(spec(Shape { max_payload: 100, ..Shape::ALL }), 0..24),
        small in prop::bool::weighted(0.25),
        filtering_any in any::<bool>(),
        garbage in prop::collection::vec(garbage(), 0..8),
        mutants in prop::collection::vec(mutant(), 0..8),
        sizes in prop::collection::vec(1usize..40, 1..4),
    ) {
        batch_agrees(&s4, &s6, &specs, small, filtering_any, &garbage, &mutants, &sizes)?;
    }
}

// =============================================================================================
// 8. One hop, one TTL
// =============================================================================================

/// TTLs at the edges (1 and 2 expire at a gateway that takes two; 255 cannot grow) and
/// anywhere.
fn edge_ttls() -> impl Strategy<Value = u8> {
    prop_oneof![
        1 => Just(1u8),
        1 => Just(2u8),
        1 => Just(254u8),
        2 => Just(255u8),
        3 => 1u8..=255,
    ]
}

/// `after`, forwarded from `before`, has one more hop left and a valid IPv4 header checksum.
fn one_more_hop(before: &[u8], after: &[u8], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(ttl(after), forwarded_ttl(ttl(before)), "{}: TTL / hop limit", what);
    if after[0] >> 4 == 4 {
        prop_assert!(ipv4_header_valid(after), "{}: IPv4 header checksum {}", what, hex(after));
    }
    Ok(())
}

/// A packet out (a new flow: the general path; again: the fast path where its headers are
/// plain), its answer in (both paths), and the same packet with a partial transport checksum
/// as a super-packet carries it: every one forwarded with one more hop left.
fn forwarded_hops(spec: &Spec) -> Result<(), TestCaseError> {
    let now = Instant::now();
    let mut t = translator(now);
    let original = spec.packet();
    let mut out = original.clone();
    prop_assert_eq!(run_general(&mut t, &mut out, now), Outcome::Forward(Direction::Outbound));
    one_more_hop(&original, &out, "outbound, general path")?;
    let virt = src_addr(&out);
    same_bytes(&out, &forwarded(&spec.build(virt, spec.partner)), "outbound")?;
    let mut fast = original.clone();
    prop_assert_eq!(run(&mut t, &mut fast, now), Outcome::Forward(Direction::Outbound));
    same_bytes(&fast, &out, "outbound, fast path vs general path")?;

    let r = spec.reply();
    let answer = r.build(spec.partner, virt);
    let want = forwarded(&r.build(spec.partner, spec.host));
    for general in [true, false] {
        let mut q = answer.clone();
        let o = if general { run_general(&mut t, &mut q, now) } else { run(&mut t, &mut q, now) };
        prop_assert_eq!(o, Outcome::Forward(Direction::Inbound));
        one_more_hop(&answer, &q, "inbound")?;
        same_bytes(&q, &want, "inbound")?;
    }

    // With a partial checksum (the pseudo-header's sum, as the kernel hands a super-packet
    // over): the general path, which gives the hop back just the same.
    if let (true, Some(at)) = (spec.is_tcp_or_udp(), spec.pseudo_checksum_at()) {
        let at = spec.l4() + at;
        let len = original.len() - spec.l4();
        let proto = if let Kind::Tcp(_) = spec.kind { 6 } else { 17 };
        let o = &original;
        let pseudo = if spec.is_v6() {
            pseudo_v6(&o[8..24], &o[24..40], proto, len as u32)
        } else {
            pseudo_v4(&o[12..16], &o[16..20], proto, len as u16)
        };
        let mut p = original.clone();
        p[at..at + 2].copy_from_slice(&naive_sum(&[], pseudo).to_be_bytes());
        let before = p.clone();
        let o = outcome(t.translate_with(&mut p, Checksum::Partial { at }, now));
        prop_assert_eq!(o, Outcome::Forward(Direction::Outbound));
        one_more_hop(&before, &p, "outbound, partial checksum")?;
        prop_assert_eq!(src_addr(&p), virt);
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    /// A hop through the translator is one hop: the kernel takes two (into the TUN and out),
    /// the translator gives one back, and checksums stay right.
    #[test]
    fn forwarded_packets_have_one_more_hop_left(
        spec in spec(Shape::ALL),
        ttl in edge_ttls(),
    ) {
        forwarded_hops(&Spec { ttl, ..spec })?;
    }
}
