//! Deterministic synthetic traffic for the translator benchmarks.
//!
//! [`Trace::generate`] draws, from a seeded SplitMix64 generator (no dependency, same trace on
//! every run and every machine):
//! - host/partner *pairs* (one lease each): hosts in the LAN prefixes, partners in the
//!   documentation ranges, IPv4 and IPv6;
//! - one to four *flows* per pair: TCP, UDP or ICMP echo, with their ports (echo identifier);
//! - a schedule of *events*: which flow, which way (outbound from the host, or the partner's
//!   reply inbound to the host's virtual address), the IP packet size (64 to 1500 bytes), and
//!   whether the packet is the first one of a pair nobody has seen yet (about 3 %).
//!
//! The schedule only becomes bytes in [`materialize`], because an inbound reply is addressed
//! to the virtual address the translator picked for the pair: `materialize` walks the events
//! in order on a translator, builds each packet with etherparse's `PacketBuilder` (valid
//! checksums), and translates it right away, so the first packet of a pair creates the lease
//! that its replies are then addressed to. The translator's choices are deterministic (seeded
//! with [`SEED`]), so a fresh translator prepared the same way ([`open_pairs`] with the same
//! [`opening_packets`]) picks the same virtual addresses and accepts the same packets.

use etherparse::PacketBuilder;
use std::collections::HashSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::time::Instant;
use vipgate::nat::{Config, Direction, Translator, Verdict};

/// Seed of the translator's allocation randomness (the trace has its own, [`Params::seed`]).
pub const SEED: [u8; 32] = [7; 32];

/// Served prefixes (benchmark ranges, RFC 2544 and RFC 3849).
pub const LAN: [&str; 2] = ["198.18.0.0/16", "2001:db8:1::/48"];
/// Pool prefixes.
pub const POOL: [&str; 2] = ["198.19.0.0/16", "2001:db8:ffff::/48"];

/// How big and how mixed the trace is.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Seed of the trace generator.
    pub seed: u64,
    /// Packets in the schedule.
    pub packets: usize,
    /// Pairs that exist before the schedule starts.
    pub old_pairs: usize,
    /// Chance, per mille, that a packet is the first one of a new pair.
    pub new_pair_per_mille: u64,
    /// At most this many new pairs (keeps the trace inside the tables it is sized for).
    pub max_new_pairs: usize,
    /// Share of pairs that are IPv6, in percent.
    pub v6_percent: u64,
}

impl Params {
    /// The benchmark's trace: 120,000 packets, 15,000 pairs known up front plus about
    /// 3,500 opened by the trace (18,474 pairs, 46,199 flows in all).
    pub const STANDARD: Params = Params {
        seed: 0x5eed_7ace,
        packets: 120_000,
        old_pairs: 15_000,
        new_pair_per_mille: 30,
        max_new_pairs: 4_500,
        v6_percent: 30,
    };
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to draw a trace.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is far below anything measurable here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The transport of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP or ICMPv6 echo (request outbound, reply inbound).
    Echo,
}

/// A host and the partner it talks to: one lease in the translator.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    /// The host's real address (in [`LAN`]).
    pub host: IpAddr,
    /// The partner's address.
    pub partner: IpAddr,
    /// Its flows: `Trace::flows[first_flow..first_flow + flow_count]`.
    pub first_flow: u32,
    /// Number of flows.
    pub flow_count: u32,
}

/// One flow of a pair.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    /// Index into `Trace::pairs`.
    pub pair: u32,
    /// Transport.
    pub proto: Proto,
    /// Host-side port (echo identifier for [`Proto::Echo`]).
    pub host_port: u16,
    /// Partner-side port (0 for echo).
    pub partner_port: u16,
}

/// One packet of the schedule.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// Index into `Trace::flows`.
    pub flow: u32,
    /// Host → partner (else the partner's reply to the host's virtual address).
    pub outbound: bool,
    /// IP packet size in bytes, 64..=1500.
    pub size: u16,
    /// The first packet of a pair that did not exist before (always outbound).
    pub opens_pair: bool,
}

/// A generated trace: pairs, flows and the packet schedule.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Every pair: `pairs[..old_pairs]` exist before the schedule, the rest are opened by it
    /// (in order).
    pub pairs: Vec<Pair>,
    /// Every flow, grouped by pair.
    pub flows: Vec<Flow>,
    /// The packet schedule.
    pub events: Vec<Event>,
    /// Number of pairs that exist before the schedule starts.
    pub old_pairs: usize,
    /// Random bytes the packets' payloads are cut from.
    payload: Vec<u8>,
}

/// IPv4 partners: 762 addresses in the three documentation /24s.
fn partner_v4(rng: &mut SplitMix64) -> IpAddr {
    let nets: [[u8; 3]; 3] = [[203, 0, 113], [192, 0, 2], [198, 51, 100]];
    let [a, b, c] = nets[rng.below(3) as usize];
    IpAddr::V4(Ipv4Addr::new(a, b, c, rng.between(1, 254) as u8))
}

/// IPv6 partners: 1,024 addresses in 2001:db8:2::/48.
fn partner_v6(rng: &mut SplitMix64) -> IpAddr {
    let k = rng.between(1, 1024) as u16;
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, k % 16, 0, 0, 0, k))
}

/// IPv4 hosts: 32,767 addresses in 198.18.0.0/17.
fn host_v4(rng: &mut SplitMix64) -> IpAddr {
    let k = rng.between(1, (1 << 15) - 1) as u32;
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) | k))
}

/// IPv6 hosts: 8,192 addresses in 2001:db8:1::/48, spread over 32 subnets.
fn host_v6(rng: &mut SplitMix64) -> IpAddr {
    let k = rng.between(1, 8192) as u16;
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, k % 32, 0, 0, 0, k))
}

/// A packet size: 45 % small (64-128), 15 % medium (129-1399), 40 % full-size (1400-1500).
fn packet_size(rng: &mut SplitMix64) -> u16 {
    let (lo, hi) = match rng.below(100) {
        0..45 => (64, 128),
        45..60 => (129, 1399),
        _ => (1400, 1500),
    };
    rng.between(lo, hi) as u16
}

impl Trace {
    /// Draws a trace; the same `params` always give the same trace.
    pub fn generate(params: Params) -> Trace {
        let mut rng = SplitMix64::new(params.seed);
        let payload = (0..1500).map(|_| rng.next_u64() as u8).collect();
        let mut t = Trace {
            pairs: Vec::new(),
            flows: Vec::new(),
            events: Vec::with_capacity(params.packets),
            old_pairs: params.old_pairs,
            payload,
        };
        let mut seen = HashSet::new();
        for _ in 0..params.old_pairs {
            t.add_pair(&mut rng, &mut seen, params.v6_percent);
        }
        let mut new_pairs = 0;
        for _ in 0..params.packets {
            let size = packet_size(&mut rng);
            if new_pairs < params.max_new_pairs && rng.chance(params.new_pair_per_mille) {
                new_pairs += 1;
                let p = t.add_pair(&mut rng, &mut seen, params.v6_percent);
                let flow = t.pairs[p].first_flow;
                t.events.push(Event { flow, outbound: true, size, opens_pair: true });
            } else {
                // Any flow of a pair that exists by now (flows are appended pair by pair).
                let flow = rng.below(t.flows.len() as u64) as u32;
                let outbound = rng.chance(500);
                t.events.push(Event { flow, outbound, size, opens_pair: false });
            }
        }
        t
    }

    /// Adds a pair not seen before, with one to four flows; returns its index.
    fn add_pair(
        &mut self,
        rng: &mut SplitMix64,
        seen: &mut HashSet<(IpAddr, IpAddr)>,
        v6_percent: u64,
    ) -> usize {
        let (host, partner) = loop {
            let pair = if rng.below(100) < v6_percent {
                (host_v6(rng), partner_v6(rng))
            } else {
                (host_v4(rng), partner_v4(rng))
            };
            if seen.insert(pair) {
                break pair;
            }
        };
        let index = self.pairs.len();
        let first_flow = self.flows.len();
        let count = rng.between(1, 4) as usize;
        while self.flows.len() < first_flow + count {
            let (proto, host_port, partner_port) = match rng.below(100) {
                0..60 => {
                    const PORTS: [u16; 5] = [443, 443, 80, 8443, 993];
                    let p = PORTS[rng.below(5) as usize];
                    (Proto::Tcp, rng.between(1024, 65535) as u16, p)
                }
                60..90 => {
                    const PORTS: [u16; 5] = [443, 53, 123, 3478, 51820];
                    let p = PORTS[rng.below(5) as usize];
                    (Proto::Udp, rng.between(1024, 65535) as u16, p)
                }
                _ => (Proto::Echo, rng.next_u64() as u16, 0),
            };
            let taken = self.flows[first_flow..].iter().any(|f| {
                f.proto == proto && f.host_port == host_port && f.partner_port == partner_port
            });
            if !taken {
                self.flows.push(Flow { pair: index as u32, proto, host_port, partner_port });
            }
        }
        self.pairs.push(Pair {
            host,
            partner,
            first_flow: first_flow as u32,
            flow_count: count as u32,
        });
        index
    }

    /// A one-line description: pairs, flows, hosts, protocol and family mix, sizes.
    pub fn summary(&self) -> String {
        let hosts: HashSet<IpAddr> = self.pairs.iter().map(|p| p.host).collect();
        let partners: HashSet<IpAddr> = self.pairs.iter().map(|p| p.partner).collect();
        let v6_pairs = self.pairs.iter().filter(|p| p.host.is_ipv6()).count();
        let count = |proto| {
            self.events.iter().filter(|e| self.flows[e.flow as usize].proto == proto).count()
        };
        let pct = |n: usize| 100.0 * n as f64 / self.events.len() as f64;
        let v6_packets = self
            .events
            .iter()
            .filter(|e| self.pairs[self.flows[e.flow as usize].pair as usize].host.is_ipv6())
            .count();
        let outbound = self.events.iter().filter(|e| e.outbound).count();
        let opening = self.events.iter().filter(|e| e.opens_pair).count();
        let bytes: usize = self.events.iter().map(|e| usize::from(e.size)).sum();
        let min = self.events.iter().map(|e| e.size).min().unwrap_or(0);
        let max = self.events.iter().map(|e| e.size).max().unwrap_or(0);
        format!(
            "trace: {} packets ({:.1} % outbound, {:.1} % first packet of a new pair), \
             {} pairs ({} known up front, {} IPv6), {} flows, {} distinct hosts, {} distinct partners; \
             TCP {:.1} % / UDP {:.1} % / ICMP echo {:.1} % of packets, IPv6 {:.1} %; \
             sizes {}..={} bytes, mean {:.0}",
            self.events.len(),
            pct(outbound),
            pct(opening),
            self.pairs.len(),
            self.old_pairs,
            v6_pairs,
            self.flows.len(),
            hosts.len(),
            partners.len(),
            pct(count(Proto::Tcp)),
            pct(count(Proto::Udp)),
            pct(count(Proto::Echo)),
            pct(v6_packets),
            min,
            max,
            bytes as f64 / self.events.len() as f64,
        )
    }

    /// Appends one packet of `flow` to `out`: outbound, or with `inbound_to` the partner's
    /// reply to that address (the pair's virtual address); `opening` makes a TCP packet a SYN.
    /// Returns the length of its headers (IP and transport).
    fn build(
        &self,
        out: &mut Vec<u8>,
        flow: &Flow,
        inbound_to: Option<IpAddr>,
        size: u16,
        seq: u32,
        opening: bool,
    ) -> usize {
        let pair = &self.pairs[flow.pair as usize];
        let (src, dst, sport, dport) = match inbound_to {
            None => (pair.host, pair.partner, flow.host_port, flow.partner_port),
            Some(virt) => (pair.partner, virt, flow.partner_port, flow.host_port),
        };
        let (ip, v4) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                (PacketBuilder::ipv4(s.octets(), d.octets(), 64), true)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                (PacketBuilder::ipv6(s.octets(), d.octets(), 64), false)
            }
            _ => unreachable!("a pair has one family"),
        };
        let ip_len = if v4 { 20 } else { 40 };
        let l4_len = if flow.proto == Proto::Tcp { 20 } else { 8 };
        let payload = &self.payload[..usize::from(size) - ip_len - l4_len];
        let before = out.len();
        let ident = flow.host_port;
        let written = match (flow.proto, inbound_to.is_some(), v4) {
            (Proto::Tcp, _, _) => {
                let tcp = ip.tcp(sport, dport, seq, 64_240);
                if opening {
                    tcp.syn().write(out, payload)
                } else {
                    tcp.ack(seq.wrapping_mul(31)).psh().write(out, payload)
                }
            }
            (Proto::Udp, _, _) => ip.udp(sport, dport).write(out, payload),
            (Proto::Echo, false, true) => {
                ip.icmpv4_echo_request(ident, seq as u16).write(out, payload)
            }
            (Proto::Echo, true, true) => {
                ip.icmpv4_echo_reply(ident, seq as u16).write(out, payload)
            }
            (Proto::Echo, false, false) => {
                ip.icmpv6_echo_request(ident, seq as u16).write(out, payload)
            }
            (Proto::Echo, true, false) => {
                ip.icmpv6_echo_reply(ident, seq as u16).write(out, payload)
            }
        };
        written.expect("etherparse builds the packet");
        assert_eq!(out.len() - before, usize::from(size), "packet size");
        ip_len + l4_len
    }
}

/// A translator for the trace: both families served, tables sized `max_leases`/`max_flows`,
/// everything else the defaults.
pub fn config(max_leases: usize, max_flows: usize) -> Config {
    let mut c = Config::new(
        LAN.iter().map(|s| s.parse().expect("prefix")).collect(),
        POOL.iter().map(|s| s.parse().expect("prefix")).collect(),
    );
    c.max_leases = max_leases;
    c.max_flows = max_flows;
    c
}

/// A fresh translator for the trace (see [`config`]), its clock starting at `now`.
pub fn translator(max_leases: usize, max_flows: usize, now: Instant) -> Translator {
    Translator::new(config(max_leases, max_flows), SEED, now).expect("valid configuration")
}

/// A translator for the trace as the gateway runs it, with durable leases (the fast path
/// keeps every lease's stored life covered, see `nat::life`), whose store commits at once:
/// every event is durable as soon as it is made.
pub fn durable_translator(max_leases: usize, max_flows: usize, now: Instant) -> Translator {
    let mut c = config(max_leases, max_flows);
    c.hold_until_durable = true;
    let mut t = Translator::new(c, SEED, now).expect("valid configuration");
    t.set_durable(u64::MAX / 2);
    t
}

/// Translates `packet` (in a copy) and panics unless it is forwarded in direction `want`.
fn expect_forward(t: &mut Translator, packet: &[u8], now: Instant, want: Direction, what: &str) {
    let mut copy = [0u8; 2048];
    let buf = &mut copy[..packet.len()];
    buf.copy_from_slice(packet);
    match t.translate(buf, now) {
        Verdict::Forward(dir) if dir == want => {}
        other => panic!("{what}: expected Forward({want:?}), got {other:?}"),
    }
}

/// One small outbound packet (a SYN for TCP) for every flow of `pairs`: translated by
/// [`open_pairs`], they lease the pairs and open their flows before a replay.
pub fn opening_packets(trace: &Trace, pairs: Range<usize>) -> Packets {
    let mut p = Packets::default();
    for pair in &trace.pairs[pairs] {
        let first = pair.first_flow as usize;
        for (k, flow) in trace.flows[first..first + pair.flow_count as usize].iter().enumerate() {
            p.push(|out| trace.build(out, flow, None, 64, k as u32, true));
            p.outbound += 1;
        }
    }
    p.aligned()
}

/// Translates packets made by [`opening_packets`], panicking unless each is forwarded.
pub fn open_pairs(t: &mut Translator, opening: &Packets, now: Instant) {
    for packet in opening.iter() {
        expect_forward(t, packet.bytes, now, Direction::Outbound, "opening a pair");
    }
}

/// The trace as packets in one buffer, each starting on a cache line (64 bytes), as packet
/// buffers do (a TUN read's, a NIC ring's).
#[derive(Debug, Default)]
pub struct Packets {
    bytes: Vec<u8>,
    spans: Vec<Span>,
    /// Packets host → partner.
    pub outbound: u64,
    /// Packets partner → host.
    pub inbound: u64,
    /// Packets that are the first of their pair (they create a lease when replayed on a
    /// translator that has not seen the pair).
    pub opening: u64,
}

/// Where a packet is in [`Packets::bytes`].
#[derive(Debug, Clone, Copy)]
struct Span {
    at: u32,
    len: u16,
    /// Length of its headers (IP and transport): all of the packet the translator reads.
    head: u8,
}

/// One packet of a trace.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    /// The whole packet.
    pub bytes: &'a [u8],
    /// Length of its headers (IP and transport): the translator reads nothing after them.
    pub head: usize,
}

/// Cache line size: where each packet starts.
const LINE: usize = 64;

impl Packets {
    /// Number of packets.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Total bytes of the packets (without the padding between them).
    pub fn bytes(&self) -> usize {
        self.spans.iter().map(|s| usize::from(s.len)).sum()
    }

    fn packet(&self, s: &Span) -> Packet<'_> {
        let at = s.at as usize;
        Packet { bytes: &self.bytes[at..at + usize::from(s.len)], head: usize::from(s.head) }
    }

    /// The packets, in trace order.
    pub fn iter(&self) -> impl Iterator<Item = Packet<'_>> + '_ {
        self.spans.iter().map(|s| self.packet(s))
    }

    /// Packet `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<Packet<'_>> {
        self.spans.get(i).map(|s| self.packet(s))
    }

    /// Appends the packet `build` writes (returning its header length), at the next multiple
    /// of [`LINE`] from the start of the buffer.
    fn push(&mut self, build: impl FnOnce(&mut Vec<u8>) -> usize) {
        self.bytes.resize(self.bytes.len().next_multiple_of(LINE), 0);
        let at = self.bytes.len();
        let head = build(&mut self.bytes);
        let len = self.bytes.len() - at;
        self.spans.push(Span {
            at: u32::try_from(at).expect("trace under 4 GB"),
            len: u16::try_from(len).expect("packet under 64 KB"),
            head: u8::try_from(head).expect("headers under 256 bytes"),
        });
    }

    /// The same packets in a buffer whose start is on a cache line (the allocator only
    /// promises 16 bytes), so every packet is.
    fn aligned(self) -> Packets {
        let mut bytes = Vec::<u8>::with_capacity(self.bytes.len() + LINE);
        // The capacity is reserved, so the buffer never moves and the offset holds.
        let pad = bytes.as_ptr().align_offset(LINE);
        bytes.resize(pad, 0);
        bytes.extend_from_slice(&self.bytes);
        let spans = self.spans.iter().map(|s| Span { at: s.at + pad as u32, ..*s }).collect();
        Packets { bytes, spans, ..self }
    }

    /// The first `n` packets (for a cache-resident replay).
    pub fn prefix(&self, n: usize) -> Packets {
        let spans = &self.spans[..n.min(self.spans.len())];
        let start = spans.first().map_or(0, |s| s.at);
        let end = spans.last().map_or(0, |s| s.at as usize + usize::from(s.len));
        Packets {
            bytes: self.bytes[start as usize..end].to_vec(),
            spans: spans.iter().map(|s| Span { at: s.at - start, ..*s }).collect(),
            outbound: 0,
            inbound: 0,
            opening: 0,
        }
        .aligned()
    }
}

// ---------------------------------------------------------------------------------------------
// Replay loops (the benchmark's timed code; `examples/replay_count.rs` counts their
// instructions).

/// Puts packet `p` into `scratch` (its headers, or all of it with `full`) and returns the
/// packet-sized buffer.
#[inline]
pub fn load<'a>(scratch: &'a mut [u8; 2048], p: Packet<'_>, full: bool) -> &'a mut [u8] {
    let n = if full { p.bytes.len() } else { p.head };
    scratch[..n].copy_from_slice(&p.bytes[..n]);
    &mut scratch[..p.bytes.len()]
}

/// Loads each packet into `scratch` and translates it there.
pub fn replay(t: &mut Translator, packets: &Packets, now: Instant, scratch: &mut [u8; 2048]) {
    replay_copying(t, packets, now, scratch, false)
}

/// [`replay`], copying whole packets with `full`.
#[inline(never)]
pub fn replay_copying(
    t: &mut Translator,
    packets: &Packets,
    now: Instant,
    scratch: &mut [u8; 2048],
    full: bool,
) {
    for p in packets.iter() {
        let buf = load(scratch, p, full);
        let _ = black_box(t.translate(buf, now));
    }
}

/// Packets per `translate_batch` call (about what one TUN readiness event brings).
pub const BATCH: usize = 32;

/// The buffers of a batch: one per packet, as a TUN read of several packets fills them.
pub type Ring = [[u8; 2048]; BATCH];

/// Loads the packets `BATCH` at a time into `ring` (the same header copy as [`load`]) and
/// translates each batch with `translate_batch`.
///
/// While it loads a batch it prefetches the headers of the next one from the trace, as a
/// NIC driver prefetches the descriptors and buffers of its ring: the 89 MB trace lives in
/// DRAM, where a packet that arrived from a device would be in the cache.
#[inline(never)]
pub fn replay_batched(t: &mut Translator, packets: &Packets, now: Instant, ring: &mut Ring) {
    let mut it = packets.iter().enumerate();
    loop {
        let mut bufs: [&mut [u8]; BATCH] = std::array::from_fn(|_| &mut [][..]);
        let mut n = 0;
        for ((buf, scratch), (i, p)) in bufs.iter_mut().zip(ring.iter_mut()).zip(&mut it) {
            if let Some(ahead) = packets.get(i + BATCH) {
                prefetch_head(ahead);
            }
            *buf = load(scratch, p, false);
            n += 1;
        }
        if n == 0 {
            break;
        }
        t.translate_batch(&mut bufs[..n], now, |_, v| {
            let _ = black_box(v);
        });
    }
}

/// Prefetches the lines of a packet's headers.
#[inline]
fn prefetch_head(p: Packet<'_>) {
    for line in p.bytes[..p.head].chunks(LINE) {
        safe_arch::prefetch_t0(&line[0]);
    }
}

/// Builds the schedule's packets, translating each one on `t` as it goes (see the module
/// documentation); `t` must already hold the pairs the schedule does not open itself.
pub fn materialize(trace: &Trace, t: &mut Translator, now: Instant) -> Packets {
    let mut p = Packets {
        bytes: Vec::with_capacity(
            trace.events.iter().map(|e| usize::from(e.size).next_multiple_of(LINE)).sum(),
        ),
        spans: Vec::with_capacity(trace.events.len()),
        ..Packets::default()
    };
    for (seq, e) in trace.events.iter().enumerate() {
        let flow = &trace.flows[e.flow as usize];
        let pair = &trace.pairs[flow.pair as usize];
        let to = if e.outbound {
            None
        } else {
            let lease = t.lease_of(pair.host, pair.partner).expect("a reply's pair is leased");
            Some(lease.virtual_addr)
        };
        p.push(|out| trace.build(out, flow, to, e.size, seq as u32, e.opens_pair));
        let (want, counter) = if e.outbound {
            (Direction::Outbound, &mut p.outbound)
        } else {
            (Direction::Inbound, &mut p.inbound)
        };
        *counter += 1;
        p.opening += u64::from(e.opens_pair);
        let last = p.get(p.len() - 1).expect("just pushed");
        expect_forward(t, last.bytes, now, want, "materializing the trace");
    }
    p.aligned()
}
