//! Packet generators, builders and independent checkers for the property tests.
//!
//! Everything here is deliberately independent of `vipgate::wire`: packets are built with
//! etherparse's `PacketBuilder` (which computes every checksum itself), checksums are
//! verified with etherparse's own calculators or with the naive RFC 1071 implementation
//! below, and the few things built by hand (IP options, fragments) are plain byte pushing.
//!
//! Address plan (documentation and benchmarking ranges only):
//! hosts (served) 192.0.2.0/24 and 2001:db8:1::/48; pools 198.18.0.0/16 and 2001:db8:ff::/48;
//! partners 203.0.113.0/24, 198.51.100.0/24 and 2001:db8:2::/48.
#![allow(dead_code)]

use etherparse::{
    IpDscp, IpEcn, IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6FlowLabel,
    Ipv6Header, Ipv6RawExtHeader, NetSlice, PacketBuilder, SlicedPacket, TcpHeader, TransportSlice,
};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;
use vipgate::nat::{Config, Direction, DropReason, Translator, Verdict};

// ---------------------------------------------------------------------------------------------
// Translator set-up and an owned verdict
// ---------------------------------------------------------------------------------------------

/// The seed every test translator is built with.
pub const SEED: [u8; 32] = [0x5a; 32];

/// The configuration of the address plan above, everything else default.
pub fn config() -> Config {
    Config::new(
        vec!["192.0.2.0/24".parse().unwrap(), "2001:db8:1::/48".parse().unwrap()],
        vec!["198.18.0.0/16".parse().unwrap(), "2001:db8:ff::/48".parse().unwrap()],
    )
}

/// A translator over [`config`] (or the given one).
pub fn translator_with(config: Config, now: Instant) -> Translator {
    Translator::new(config, SEED, now).expect("test configuration is valid")
}

/// A translator over [`config`].
pub fn translator(now: Instant) -> Translator {
    translator_with(config(), now)
}

/// A [`Verdict`] that does not borrow the translator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `Verdict::Forward`.
    Forward(Direction),
    /// `Verdict::Drop`.
    Drop(DropReason),
    /// `Verdict::Reply`, with a copy of the reply.
    Reply(DropReason, Vec<u8>),
    /// `Verdict::Pass`: not about any lease, left untouched.
    Pass,
}

/// Translates `pkt` in place and returns the verdict as an [`Outcome`].
pub fn run(t: &mut Translator, pkt: &mut [u8], now: Instant) -> Outcome {
    outcome(t.translate(pkt, now))
}

/// [`run`] through the general path only ([`Translator::translate_without_fast_path`]).
pub fn run_general(t: &mut Translator, pkt: &mut [u8], now: Instant) -> Outcome {
    outcome(t.translate_without_fast_path(pkt, now))
}

/// A verdict as an [`Outcome`].
pub fn outcome(v: Verdict<'_>) -> Outcome {
    match v {
        Verdict::Forward(d) => Outcome::Forward(d),
        Verdict::Drop(r) => Outcome::Drop(r),
        Verdict::Reply(r, b) => Outcome::Reply(r, b.to_vec()),
        Verdict::Hold => panic!("Hold without Config::hold_until_durable"),
        Verdict::Pass => Outcome::Pass,
    }
}

// ---------------------------------------------------------------------------------------------
// Address predicates (by octets, not through the crate)
// ---------------------------------------------------------------------------------------------

/// In 198.18.0.0/16 or 2001:db8:ff::/48.
pub fn in_pool(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.octets()[..2] == [198, 18],
        IpAddr::V6(v) => v.segments()[..3] == [0x2001, 0xdb8, 0xff],
    }
}

/// In 192.0.2.0/24 or 2001:db8:1::/48.
pub fn in_lan(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.octets()[..3] == [192, 0, 2],
        IpAddr::V6(v) => v.segments()[..3] == [0x2001, 0xdb8, 1],
    }
}

/// Source address of an IPv4/IPv6 packet (by version nibble).
pub fn src_addr(p: &[u8]) -> IpAddr {
    if p[0] >> 4 == 4 {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&p[12..16]).unwrap()))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap()))
    }
}

/// Destination address of an IPv4/IPv6 packet (by version nibble).
pub fn dst_addr(p: &[u8]) -> IpAddr {
    if p[0] >> 4 == 4 {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&p[16..20]).unwrap()))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap()))
    }
}

/// Writes `a` into the source (`dst == false`) or destination field.
pub fn set_addr(p: &mut [u8], dst: bool, a: IpAddr) {
    match a {
        IpAddr::V4(v) => {
            let at = if dst { 16 } else { 12 };
            p[at..at + 4].copy_from_slice(&v.octets());
        }
        IpAddr::V6(v) => {
            let at = if dst { 24 } else { 8 };
            p[at..at + 16].copy_from_slice(&v.octets());
        }
    }
}

/// Swaps the source and destination address bytes (fixes nothing else: the one's-complement
/// sums that cover both are order-independent).
pub fn swap_addrs(p: &mut [u8]) {
    let (a, n) = if p[0] >> 4 == 4 { (12, 4) } else { (8, 16) };
    for i in 0..n {
        p.swap(a + i, a + n + i);
    }
}

/// Swaps the two 16-bit port fields of the TCP/UDP header at `l4`.
pub fn swap_ports(p: &mut [u8], l4: usize) {
    p.swap(l4, l4 + 2);
    p.swap(l4 + 1, l4 + 3);
}

pub fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

// ---------------------------------------------------------------------------------------------
// RFC 1071, the obvious way
// ---------------------------------------------------------------------------------------------

/// One's-complement sum of 16-bit big-endian words (odd byte padded with zero), folded after
/// every addition, starting from `initial` (folded first).
pub fn naive_sum(data: &[u8], initial: u32) -> u16 {
    let mut acc: u32 = initial;
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    let mut i = 0;
    while i < data.len() {
        let hi = u32::from(data[i]);
        let lo = if i + 1 < data.len() { u32::from(data[i + 1]) } else { 0 };
        acc += (hi << 8) | lo;
        if acc > 0xffff {
            acc -= 0xffff; // end-around carry
        }
        i += 2;
    }
    acc as u16
}

/// The checksum field value for `data`: the complement of [`naive_sum`].
pub fn naive_checksum(data: &[u8], initial: u32) -> u16 {
    !naive_sum(data, initial)
}

/// The partial sum of an IPv6 pseudo-header.
pub fn pseudo_v6(src: &[u8], dst: &[u8], next: u8, len: u32) -> u32 {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(src);
    b.extend_from_slice(dst);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, next]);
    u32::from(naive_sum(&b, 0))
}

/// The partial sum of an IPv4 pseudo-header.
pub fn pseudo_v4(src: &[u8], dst: &[u8], proto: u8, len: u16) -> u32 {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(src);
    b.extend_from_slice(dst);
    b.extend_from_slice(&[0, proto]);
    b.extend_from_slice(&len.to_be_bytes());
    u32::from(naive_sum(&b, 0))
}

/// Recomputes the checksum of `msg` with its field at `at` taken as zero.
pub fn recompute(msg: &[u8], at: usize, initial: u32) -> u16 {
    let mut m = msg.to_vec();
    m[at] = 0;
    m[at + 1] = 0;
    naive_checksum(&m, initial)
}

/// True when an IPv4 header (IHL from its first byte) sums to 0xffff.
pub fn ipv4_header_valid(h: &[u8]) -> bool {
    let hl = usize::from(h[0] & 0x0f) * 4;
    hl >= 20 && h.len() >= hl && naive_sum(&h[..hl], 0) == 0xffff
}

/// Byte offset of the TTL (IPv4) or hop limit (IPv6) of a packet.
pub fn ttl_offset(p: &[u8]) -> usize {
    if p[0] >> 4 == 4 {
        8
    } else {
        7
    }
}

/// The TTL (IPv4) or hop limit (IPv6) of a packet.
pub fn ttl(p: &[u8]) -> u8 {
    p[ttl_offset(p)]
}

/// The TTL a packet forwarded by the translator leaves with: one more than it came with, so
/// that the kernel's two decrements (into the TUN, out of it) make one hop; 255 stays 255.
pub fn forwarded_ttl(ttl: u8) -> u8 {
    ttl.saturating_add(1)
}

/// `p` with its TTL or hop limit set to `ttl`, the IPv4 header checksum computed again from
/// scratch (an embedded packet is not touched).
pub fn with_ttl(p: &[u8], ttl: u8) -> Vec<u8> {
    let mut p = p.to_vec();
    let at = ttl_offset(&p);
    p[at] = ttl;
    if p[0] >> 4 == 4 {
        let c = recompute(&p[..usize::from(p[0] & 0x0f) * 4], 10, 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// `p` as the translator must forward it apart from its address rewrite: its TTL or hop
/// limit [`forwarded_ttl`], its IPv4 header checksum right.
pub fn forwarded(p: &[u8]) -> Vec<u8> {
    with_ttl(p, forwarded_ttl(ttl(p)))
}

// ---------------------------------------------------------------------------------------------
// Packet specifications
// ---------------------------------------------------------------------------------------------

/// TCP header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSpec {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    /// FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20, ECE 0x40, CWR 0x80, NS 0x100.
    pub flags: u16,
    pub window: u16,
    pub urgent: u16,
    /// Raw options, a multiple of 4 bytes, at most 40.
    pub options: Vec<u8>,
}

/// The transport of a generated packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Tcp(TcpSpec),
    /// `no_checksum`: IPv4 only, the checksum field is 0 ("not computed").
    Udp {
        src_port: u16,
        dst_port: u16,
        no_checksum: bool,
    },
    /// ICMP or ICMPv6 echo.
    Echo {
        ident: u16,
        seq: u16,
        reply: bool,
    },
}

/// A packet between `host` and `partner`, buildable with any addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub host: IpAddr,
    pub partner: IpAddr,
    pub kind: Kind,
    pub payload: Vec<u8>,
    pub ttl: u8,
    pub ident: u16,
    pub dont_fragment: bool,
    pub tos: u8,
    pub flow_label: u32,
    /// IPv4 options (multiple of 4 bytes, at most 40).
    pub ip_options: Vec<u8>,
    /// IPv6 hop-by-hop options payload (6 + 8n bytes).
    pub hop_by_hop: Option<Vec<u8>>,
    /// IPv6 destination options payload (6 + 8n bytes).
    pub dest_opts: Option<Vec<u8>>,
}

impl Spec {
    pub fn is_v6(&self) -> bool {
        self.host.is_ipv6()
    }

    /// Offset of the transport header in a built packet.
    pub fn l4(&self) -> usize {
        if self.is_v6() {
            40 + self.hop_by_hop.as_ref().map_or(0, |h| h.len() + 2)
                + self.dest_opts.as_ref().map_or(0, |h| h.len() + 2)
        } else {
            20 + self.ip_options.len()
        }
    }

    pub fn is_tcp_or_udp(&self) -> bool {
        matches!(self.kind, Kind::Tcp(_) | Kind::Udp { .. })
    }

    /// Offset (from the transport header) of the transport checksum, when it covers the
    /// addresses (TCP, UDP, ICMPv6).
    pub fn pseudo_checksum_at(&self) -> Option<usize> {
        match self.kind {
            Kind::Tcp(_) => Some(16),
            Kind::Udp { .. } => Some(6),
            Kind::Echo { .. } if self.is_v6() => Some(2),
            Kind::Echo { .. } => None,
        }
    }

    /// The answer's specification: ports swapped, echo request ↔ reply.
    pub fn reply(&self) -> Spec {
        let mut r = self.clone();
        r.kind = match &self.kind {
            Kind::Tcp(t) => {
                Kind::Tcp(TcpSpec { src_port: t.dst_port, dst_port: t.src_port, ..t.clone() })
            }
            Kind::Udp { src_port, dst_port, no_checksum } => {
                Kind::Udp { src_port: *dst_port, dst_port: *src_port, no_checksum: *no_checksum }
            }
            Kind::Echo { ident, seq, reply } => {
                Kind::Echo { ident: *ident, seq: *seq, reply: !reply }
            }
        };
        r
    }

    /// The packet from `host` to `partner`.
    pub fn packet(&self) -> Vec<u8> {
        self.build(self.host, self.partner)
    }

    /// The packet with the given addresses, every checksum computed by etherparse.
    pub fn build(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let ip = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h =
                    Ipv4Header::new(0, self.ttl, IpNumber::UDP, s.octets(), d.octets()).unwrap();
                h.identification = self.ident;
                h.dont_fragment = self.dont_fragment;
                h.dscp = IpDscp::try_new(self.tos >> 2).unwrap();
                h.ecn = IpEcn::try_new(self.tos & 3).unwrap();
                h.options = Ipv4Options::try_from(&self.ip_options[..]).unwrap();
                IpHeaders::Ipv4(h, Default::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::try_new(self.flow_label & 0xf_ffff).unwrap(),
                    payload_length: 0,
                    next_header: IpNumber::UDP,
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                };
                let ext = |p: &Option<Vec<u8>>| {
                    p.as_ref().map(|p| Ipv6RawExtHeader::new_raw(IpNumber::UDP, p).unwrap())
                };
                let exts = Ipv6Extensions {
                    hop_by_hop_options: ext(&self.hop_by_hop),
                    destination_options: ext(&self.dest_opts),
                    ..Default::default()
                };
                IpHeaders::Ipv6(h, exts)
            }
            _ => panic!("mixed address families"),
        };
        let b = PacketBuilder::ip(ip);
        let mut out = Vec::new();
        match &self.kind {
            Kind::Tcp(t) => {
                let mut h = TcpHeader::new(t.src_port, t.dst_port, t.seq, t.window);
                h.fin = t.flags & 0x01 != 0;
                h.syn = t.flags & 0x02 != 0;
                h.rst = t.flags & 0x04 != 0;
                h.psh = t.flags & 0x08 != 0;
                h.ack = t.flags & 0x10 != 0;
                h.urg = t.flags & 0x20 != 0;
                h.ece = t.flags & 0x40 != 0;
                h.cwr = t.flags & 0x80 != 0;
                h.ns = t.flags & 0x100 != 0;
                h.acknowledgment_number = t.ack;
                h.urgent_pointer = t.urgent;
                h.set_options_raw(&t.options).unwrap();
                b.tcp_header(h).write(&mut out, &self.payload).unwrap();
            }
            Kind::Udp { src_port, dst_port, no_checksum } => {
                b.udp(*src_port, *dst_port).write(&mut out, &self.payload).unwrap();
                if *no_checksum && src.is_ipv4() {
                    let c = self.l4() + 6;
                    out[c..c + 2].fill(0);
                }
            }
            Kind::Echo { ident, seq, reply } => {
                match (src.is_ipv4(), reply) {
                    (true, false) => {
                        b.icmpv4_echo_request(*ident, *seq).write(&mut out, &self.payload)
                    }
                    (true, true) => {
                        b.icmpv4_echo_reply(*ident, *seq).write(&mut out, &self.payload)
                    }
                    (false, false) => {
                        b.icmpv6_echo_request(*ident, *seq).write(&mut out, &self.payload)
                    }
                    (false, true) => {
                        b.icmpv6_echo_reply(*ident, *seq).write(&mut out, &self.payload)
                    }
                }
                .unwrap();
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

pub fn host_v4() -> impl Strategy<Value = IpAddr> {
    (1u8..=254).prop_map(|x| IpAddr::V4(Ipv4Addr::new(192, 0, 2, x)))
}

pub fn host_v6() -> impl Strategy<Value = IpAddr> {
    any::<[u16; 5]>()
        .prop_map(|w| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, w[0], w[1], w[2], w[3], w[4])))
}

pub fn partner_v4() -> impl Strategy<Value = IpAddr> {
    (any::<bool>(), 1u8..=254).prop_map(|(a, x)| {
        IpAddr::V4(if a { Ipv4Addr::new(203, 0, 113, x) } else { Ipv4Addr::new(198, 51, 100, x) })
    })
}

pub fn partner_v6() -> impl Strategy<Value = IpAddr> {
    any::<[u16; 5]>()
        .prop_map(|w| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, w[0], w[1], w[2], w[3], w[4])))
}

/// Valid TCP option sequences (MSS, SACK-permitted, window scale, timestamps, NOP), padded
/// with EOL to a multiple of 4 bytes, at most 40.
pub fn tcp_options() -> impl Strategy<Value = Vec<u8>> {
    let elem = prop_oneof![
        Just(vec![1u8]),
        any::<u16>().prop_map(|m| vec![2, 4, (m >> 8) as u8, m as u8]),
        Just(vec![4u8, 2]),
        (0u8..15).prop_map(|s| vec![3, 3, s]),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| {
            let mut v = vec![8, 10];
            v.extend_from_slice(&a.to_be_bytes());
            v.extend_from_slice(&b.to_be_bytes());
            v
        }),
    ];
    prop_oneof![Just(Vec::new()), prop::collection::vec(elem, 1..8).prop_map(pad_options)]
}

/// IPv4 options: NOP, router alert, an empty-slot timestamp; EOL padded; at least 4 bytes.
pub fn ip_options() -> impl Strategy<Value = Vec<u8>> {
    let elem = prop_oneof![
        Just(vec![1u8]),
        Just(vec![148u8, 4, 0, 0]),
        Just(vec![68u8, 8, 5, 0, 0, 0, 0, 0]),
        Just(vec![0u8]),
    ];
    prop::collection::vec(elem, 1..10).prop_map(pad_options)
}

fn pad_options(elems: Vec<Vec<u8>>) -> Vec<u8> {
    let mut o = Vec::new();
    for e in elems {
        if o.len() + e.len() <= 40 {
            o.extend_from_slice(&e);
        }
    }
    while o.len() % 4 != 0 || o.is_empty() {
        o.push(0);
    }
    o
}

/// An IPv6 options-header payload: one option (PadN, or an experimental "skip" option with
/// random data) filling 6, 14 or 22 bytes.
pub fn v6_option_payload() -> impl Strategy<Value = Vec<u8>> {
    (0usize..3, prop::sample::select(vec![0x01u8, 0x1e, 0x3e]), any::<[u8; 20]>()).prop_map(
        |(n, ty, data)| {
            let len = 6 + 8 * n;
            let mut v = vec![ty, (len - 2) as u8];
            if ty == 0x01 {
                v.resize(len, 0);
            } else {
                v.extend_from_slice(&data[..len - 2]);
            }
            v
        },
    )
}

/// Which kinds of packet a strategy produces.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub v4: bool,
    pub v6: bool,
    pub tcp: bool,
    pub udp: bool,
    pub echo: bool,
    /// IPv4 options / IPv6 extension headers: 0 never, 1 sometimes, 2 always.
    pub extras: u8,
    pub min_payload: usize,
    pub max_payload: usize,
}

impl Shape {
    /// Every supported kind, both families, payload 0..=1400, sometimes with options.
    pub const ALL: Shape = Shape {
        v4: true,
        v6: true,
        tcp: true,
        udp: true,
        echo: true,
        extras: 1,
        min_payload: 0,
        max_payload: 1400,
    };
}

fn kind(shape: Shape) -> BoxedStrategy<Kind> {
    let tcp = (any::<(u16, u16, u32, u32)>(), 0u16..0x200, any::<(u16, u16)>(), tcp_options())
        .prop_map(|((src_port, dst_port, seq, ack), flags, (window, urgent), options)| {
            Kind::Tcp(TcpSpec { src_port, dst_port, seq, ack, flags, window, urgent, options })
        });
    let udp = (any::<u16>(), any::<u16>(), prop::bool::weighted(0.3)).prop_map(
        |(src_port, dst_port, no_checksum)| Kind::Udp { src_port, dst_port, no_checksum },
    );
    let echo = any::<(u16, u16)>().prop_map(|(ident, seq)| Kind::Echo { ident, seq, reply: false });
    let mut v: Vec<BoxedStrategy<Kind>> = Vec::new();
    if shape.tcp {
        v.push(tcp.boxed());
    }
    if shape.udp {
        v.push(udp.boxed());
    }
    if shape.echo {
        v.push(echo.boxed());
    }
    prop::strategy::Union::new(v).boxed()
}

/// Packets host → partner of the given shape.
pub fn spec(shape: Shape) -> BoxedStrategy<Spec> {
    let family = match (shape.v4, shape.v6) {
        (true, true) => any::<bool>().boxed(),
        (false, true) => Just(true).boxed(),
        _ => Just(false).boxed(),
    };
    let extras = match shape.extras {
        0 => Just(0u8).boxed(),
        1 => prop_oneof![2 => Just(0u8), 1 => 1u8..=3].boxed(),
        _ => (1u8..=3).boxed(),
    };
    (
        family,
        (host_v4(), host_v6(), partner_v4(), partner_v6()),
        kind(shape),
        prop::collection::vec(any::<u8>(), shape.min_payload..=shape.max_payload),
        (1u8..=255, any::<u16>(), any::<bool>(), any::<u8>(), any::<u32>()),
        (extras, ip_options(), v6_option_payload(), v6_option_payload()),
    )
        .prop_map(|(v6, (h4, h6, p4, p6), mut kind, payload, misc, (extras, ipo, hbh, dst))| {
            let (ttl, ident, dont_fragment, tos, flow_label) = misc;
            if v6 {
                if let Kind::Udp { no_checksum, .. } = &mut kind {
                    *no_checksum = false;
                }
            }
            Spec {
                host: if v6 { h6 } else { h4 },
                partner: if v6 { p6 } else { p4 },
                kind,
                payload,
                ttl,
                ident,
                dont_fragment,
                tos,
                flow_label,
                ip_options: if !v6 && extras != 0 { ipo } else { Vec::new() },
                hop_by_hop: (v6 && extras & 1 != 0).then_some(hbh),
                dest_opts: (v6 && extras & 2 != 0).then_some(dst),
            }
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Independent checksum verification
// ---------------------------------------------------------------------------------------------

/// What [`check_checksums`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Every checksum equals a full recomputation.
    AllValid,
    /// Same, and the packet is IPv4 UDP with checksum 0 ("none"), which was left alone.
    UdpNoChecksum,
}

/// Parses `pkt` with etherparse and compares every checksum field with a full recomputation:
/// the IPv4 header checksum (`Ipv4Header::calc_header_checksum`), TCP and UDP
/// (`calc_checksum_ipv4_raw` / `calc_checksum_ipv6_raw`), ICMP and ICMPv6 (the naive RFC 1071
/// sum above, plus etherparse's ICMPv6 verifier). Fragments: the IPv4 header only.
pub fn check_checksums(pkt: &[u8]) -> Result<Checked, String> {
    let s = SlicedPacket::from_ip(pkt).map_err(|e| format!("etherparse cannot parse: {e:?}"))?;
    let (src, dst, fragmented) = match &s.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let want = h.to_header().calc_header_checksum();
            if h.header_checksum() != want {
                return Err(format!(
                    "IPv4 header checksum {:#06x}, full recomputation {want:#06x}",
                    h.header_checksum()
                ));
            }
            (h.source().to_vec(), h.destination().to_vec(), ip.payload().fragmented)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (h.source().to_vec(), h.destination().to_vec(), ip.payload().fragmented)
        }
        _ => return Err("not an IP packet".into()),
    };
    if fragmented {
        return Ok(Checked::AllValid);
    }
    let v4 = src.len() == 4;
    let s4 = |a: &[u8]| <[u8; 4]>::try_from(a).unwrap();
    let s16 = |a: &[u8]| <[u8; 16]>::try_from(a).unwrap();
    match &s.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            let want = if v4 {
                h.calc_checksum_ipv4_raw(s4(&src), s4(&dst), t.payload())
            } else {
                h.calc_checksum_ipv6_raw(s16(&src), s16(&dst), t.payload())
            }
            .unwrap();
            if t.checksum() != want {
                return Err(format!(
                    "TCP checksum {:#06x}, full recomputation {want:#06x}",
                    t.checksum()
                ));
            }
            Ok(Checked::AllValid)
        }
        Some(TransportSlice::Udp(u)) => {
            if v4 && u.checksum() == 0 {
                return Ok(Checked::UdpNoChecksum);
            }
            let h = u.to_header();
            let want = if v4 {
                h.calc_checksum_ipv4_raw(s4(&src), s4(&dst), u.payload())
            } else {
                h.calc_checksum_ipv6_raw(s16(&src), s16(&dst), u.payload())
            }
            .unwrap();
            if u.checksum() != want {
                return Err(format!(
                    "UDP checksum {:#06x}, full recomputation {want:#06x}",
                    u.checksum()
                ));
            }
            Ok(Checked::AllValid)
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let want = recompute(i.slice(), 2, 0);
            if i.checksum() != want {
                return Err(format!(
                    "ICMP checksum {:#06x}, full recomputation {want:#06x}",
                    i.checksum()
                ));
            }
            Ok(Checked::AllValid)
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let msg = i.slice();
            let want = recompute(msg, 2, pseudo_v6(&src, &dst, 58, msg.len() as u32));
            if i.checksum() != want || !i.is_checksum_valid(s16(&src), s16(&dst)) {
                return Err(format!(
                    "ICMPv6 checksum {:#06x}, full recomputation {want:#06x}",
                    i.checksum()
                ));
            }
            Ok(Checked::AllValid)
        }
        other => Err(format!("unexpected transport {other:?}")),
    }
}

/// Describes the first difference between two byte strings, for assertion messages.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    let window = |b: &[u8]| {
        let lo = i.saturating_sub(4);
        let hi = (i + 6).min(b.len());
        b.get(lo..hi).map(hex).unwrap_or_default()
    };
    Some(format!(
        "lengths {} vs {}; first difference at byte {i}: got [{}] want [{}] (from byte {})",
        got.len(),
        want.len(),
        window(got),
        window(want),
        i.saturating_sub(4)
    ))
}

/// Lowercase hex with spaces.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Fragments and ICMP errors
// ---------------------------------------------------------------------------------------------

/// A fragment of `full` (an unfragmented IPv4 packet, or an IPv6 packet without extension
/// headers, transport at `l4`): the transport bytes `off..off + len` (`off` a multiple of 8),
/// with MF = `more`. IPv4: the header is copied and its length, flags and checksum fixed;
/// IPv6: a fragment header (identification `id`) is inserted.
pub fn fragment(full: &[u8], l4: usize, off: usize, len: usize, more: bool, id: u32) -> Vec<u8> {
    assert_eq!(off % 8, 0);
    let data = &full[l4 + off..l4 + off + len];
    let mut out;
    if full[0] >> 4 == 4 {
        out = full[..l4].to_vec();
        let total = (l4 + len) as u16;
        out[2..4].copy_from_slice(&total.to_be_bytes());
        let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
        out[6..8].copy_from_slice(&fo.to_be_bytes());
        out[10..12].fill(0);
        let c = naive_checksum(&out, 0);
        out[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(ipv4_header_valid(&out));
    } else {
        assert_eq!(l4, 40, "IPv6 fragments are built from packets without extension headers");
        out = full[..40].to_vec();
        let proto = out[6];
        out[6] = 44;
        out[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        let fo = (off as u16) | u16::from(more);
        out.extend_from_slice(&[proto, 0]);
        out.extend_from_slice(&fo.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// An ICMP (IPv4) or ICMPv6 error from `src` to `dst` quoting `quote`, built by etherparse.
pub fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 61)
            .icmpv4_raw(ty, code, rest)
            .write(&mut out, quote)
            .unwrap(),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 61)
            .icmpv6_raw(ty, code, rest)
            .write(&mut out, quote)
            .unwrap(),
        _ => panic!("mixed address families"),
    }
    out
}

/// Error messages to try: (type, code, rest of header) per family.
pub const ICMPV4_ERRORS: [(u8, u8, [u8; 4]); 4] = [
    (3, 3, [0; 4]),          // port unreachable
    (3, 1, [0; 4]),          // host unreachable
    (3, 4, [0, 0, 5, 0xdc]), // fragmentation needed, MTU 1500
    (11, 0, [0; 4]),         // TTL exceeded in transit
];

/// See [`ICMPV4_ERRORS`].
pub const ICMPV6_ERRORS: [(u8, u8, [u8; 4]); 4] = [
    (1, 4, [0; 4]),          // port unreachable
    (1, 3, [0; 4]),          // address unreachable
    (2, 0, [0, 0, 5, 0x00]), // packet too big, MTU 1280
    (3, 0, [0; 4]),          // hop limit exceeded
];
