//! TUN offloads: a GSO super-packet rewritten once must give, once segmented, exactly the
//! segments of the original rewritten one by one.
//!
//! | test | what must hold |
//! |---|---|
//! | `super_packet_rewritten_then_segmented_equals_segments_rewritten` | in-process, for random TCP/UDP super-packets (IPv4/IPv6, outbound and inbound, options, FIN/PSH/CWR, sequence wrap): `translate_with(Partial)` then `vnet::segment` = `vnet::segment` then `translate` of each segment, byte for byte; every segment's checksums equal etherparse's full recomputation |
//! | `the_kernel_segments_a_rewritten_super_packet_like_the_segments_rewritten_one_by_one` | the same with the real kernel as segmenter: the super-packet is written to a TUN with offloads in a namespace, forwarded to a TUN without them, and the kernel's segments are read back; also, `vnet::segment` (with the forwarding hop's TTL) makes exactly the kernel's segments |
//! | `a_super_packet_the_kernel_refuses_is_written_as_the_kernels_segments` | a frame the kernel refuses (`EINVAL`) is cut by `TunDevice::send_frame` and its segments arrive as the kernel would have made them |
//! | `partial_checksums_of_plain_packets` | a non-GSO packet with a partial TCP/UDP checksum is translated partially and finishes to a valid checksum; a partial checksum anywhere else is finished in software by `prepare`, or is a `BadOffload` drop when given to the translator as partial |
//!
//! Address plan as in `tests/common/packets.rs`.

mod common;

use common::netns::{in_ns, ip, sysctl, Lab};
use common::packets::{check_checksums, translator, Checked};
use etherparse::{PacketBuilder, TcpOptionElement};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use vipgate::config::OffloadMode;
use vipgate::gateway::tun::{Sent, TunDevice};
use vipgate::nat::{DropReason, Translator, Verdict};
use vipgate::wire::checksum::{fold, sum};
use vipgate::wire::vnet::{self, Checksum, VnetHdr};

/// A random super-packet.
#[derive(Debug, Clone)]
struct Spec {
    v6: bool,
    udp: bool,
    /// Partner → host's virtual address (else host → partner).
    inbound: bool,
    host: u8,
    partner: u8,
    mss: u16,
    payload_len: usize,
    seq: u32,
    ip_id: u16,
    fin: bool,
    psh: bool,
    cwr: bool,
    timestamps: bool,
    fill: u8,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        (any::<bool>(), any::<bool>(), any::<bool>(), 1u8..200, 1u8..200),
        (536u16..=1400, 2usize..=30, 0usize..536, any::<u32>(), any::<u16>()),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<u8>()),
    )
        .prop_map(|((v6, udp, inbound, host, partner), (mss, segs, extra, seq, ip_id), f)| {
            let payload_len = (segs - 1) * usize::from(mss) + 1 + extra.min(usize::from(mss) - 1);
            Spec {
                v6,
                udp,
                inbound,
                host,
                partner,
                mss,
                payload_len,
                seq,
                ip_id,
                fin: f.0,
                psh: f.1,
                cwr: f.2,
                timestamps: f.3,
                fill: f.4,
            }
        })
}

impl Spec {
    /// A fixed host → partner super-packet (PSH, no options) for the plain tests.
    fn outbound(v6: bool, udp: bool, mss: u16, payload_len: usize) -> Spec {
        Spec {
            v6,
            udp,
            inbound: false,
            host: 9,
            partner: 10,
            mss,
            payload_len,
            seq: 77,
            ip_id: 5,
            fin: false,
            psh: true,
            cwr: false,
            timestamps: false,
            fill: 3,
        }
    }

    fn host(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::from(self.host)))
        } else {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, self.host))
        }
    }

    fn partner(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, u16::from(self.partner)))
        } else {
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, self.partner))
        }
    }

    /// The super-packet from `src` to `dst` with full checksums (etherparse builds it),
    /// then its transport checksum turned partial the way a sending kernel leaves it.
    fn super_packet(&self, src: IpAddr, dst: IpAddr, outbound: bool) -> (VnetHdr, Vec<u8>) {
        let payload: Vec<u8> =
            (0..self.payload_len).map(|i| (i as u8).wrapping_mul(7) ^ self.fill).collect();
        let b = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!(),
        };
        let mut p = Vec::new();
        let (sport, dport) = if outbound { (40000, 443) } else { (443, 40000) };
        if self.udp {
            b.udp(sport, dport).write(&mut p, &payload).unwrap();
        } else {
            let mut t = b.tcp(sport, dport, self.seq, 501).ack(7);
            if self.psh {
                t = t.psh();
            }
            if self.fin {
                t = t.fin();
            }
            if self.cwr {
                t = t.cwr();
            }
            if self.timestamps {
                t = t
                    .options(&[
                        TcpOptionElement::Noop,
                        TcpOptionElement::Noop,
                        TcpOptionElement::Timestamp(0x0102_0304, 0x0506_0708),
                    ])
                    .unwrap();
            }
            t.write(&mut p, &payload).unwrap();
        }
        let l4 = if self.v6 { 40 } else { 20 };
        if !self.v6 {
            p[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
            p[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&p[..20], 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let csum_offset: u16 = if self.udp { 6 } else { 16 };
        let at = l4 + usize::from(csum_offset);
        // The pseudo-header sum alone, not complemented (Linux CHECKSUM_PARTIAL).
        let len = (p.len() - l4) as u64;
        let proto = if self.udp { 17u64 } else { 6 };
        let (s, d) = if self.v6 { (&p[8..24], &p[24..40]) } else { (&p[12..16], &p[16..20]) };
        let partial = fold(sum(s, 0) + sum(d, 0) + proto + len);
        p[at..at + 2].copy_from_slice(&partial.to_be_bytes());
        let gso_type = match (self.udp, self.v6) {
            (true, _) => vnet::GSO_UDP_L4,
            (false, false) => vnet::GSO_TCPV4,
            (false, true) => vnet::GSO_TCPV6,
        } | if self.cwr && !self.udp { vnet::GSO_ECN } else { 0 };
        let thlen = if self.udp { 8 } else { usize::from(p[l4 + 12] >> 4) * 4 };
        let hdr = VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type,
            hdr_len: (l4 + thlen) as u16,
            gso_size: self.mss,
            csum_start: l4 as u16,
            csum_offset,
        };
        (hdr, p)
    }

    fn segments(&self) -> usize {
        self.payload_len.div_ceil(usize::from(self.mss))
    }
}

/// A translator that holds the lease of `s`'s pair, and the super-packet of `s` addressed as
/// it reaches the translator (outbound: from the host; inbound: to the lease's virtual
/// address).
fn setup(s: &Spec, now: Instant) -> (Translator, VnetHdr, Vec<u8>) {
    let mut t = translator(now);
    let (hdr, first) = s.super_packet(s.host(), s.partner(), true);
    // The host speaks first: its lease (and flow) exist before any super-packet.
    let mut probe = first.clone();
    let c = Checksum::Partial { at: usize::from(hdr.csum_start + hdr.csum_offset) };
    assert!(matches!(t.translate_with(&mut probe, c, now), Verdict::Forward(_)));
    if s.inbound {
        let virt = common::packets::src_addr(&probe);
        let (hdr, p) = s.super_packet(s.partner(), virt, false);
        return (t, hdr, p);
    }
    (t, hdr, first)
}

fn partial(hdr: &VnetHdr) -> Checksum {
    Checksum::Partial { at: usize::from(hdr.csum_start + hdr.csum_offset) }
}

fn fail(what: &str, i: usize, got: &[u8], want: &[u8]) -> TestCaseError {
    let d = common::packets::first_difference(got, want).unwrap_or_default();
    TestCaseError::fail(format!(
        "{what}: segment {i} differs: {d}\n got: {}\nwant: {}",
        common::packets::hex(got),
        common::packets::hex(want)
    ))
}

fn segment_all(hdr: &VnetHdr, p: &[u8]) -> Vec<Vec<u8>> {
    let mut scratch = vec![0u8; 65536];
    let mut out = Vec::new();
    vnet::segment(hdr, p, &mut scratch, |s| out.push(s.to_vec())).expect("segmentable");
    out
}

fn rewrite_each(t: &mut Translator, segs: &[Vec<u8>], now: Instant) -> Vec<Vec<u8>> {
    segs.iter()
        .map(|s| {
            let mut s = s.clone();
            match t.translate(&mut s, now) {
                Verdict::Forward(_) => s,
                v => panic!("a segment was not forwarded: {v:?}"),
            }
        })
        .collect()
}

fn compare(what: &str, got: &[Vec<u8>], want: &[Vec<u8>]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: segment count", what);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g != w {
            return Err(fail(what, i, g, w));
        }
        prop_assert_eq!(check_checksums(g), Ok(Checked::AllValid), "{} segment {}", what, i);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn super_packet_rewritten_then_segmented_equals_segments_rewritten(s in spec()) {
        let now = Instant::now();
        let (mut t, hdr, p) = setup(&s, now);
        let mut rewritten = p.clone();
        let v = t.translate_with(&mut rewritten, partial(&hdr), now);
        prop_assert!(matches!(v, Verdict::Forward(_)), "{:?}", v);
        let a = segment_all(&hdr, &rewritten);
        prop_assert_eq!(a.len(), s.segments());
        let b = rewrite_each(&mut t, &segment_all(&hdr, &p), now);
        compare("model", &a, &b)?;
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel as the segmenter
// ---------------------------------------------------------------------------------------------

/// Two TUN devices in a namespace: super-packets written to `offload` (virtio-net header,
/// TSO/USO) are forwarded by the kernel to `plain` (no offloads), which gets them cut into
/// segments with full checksums.
struct KernelSegmenter {
    _lab: Lab,
    offload: TunDevice,
    plain: TunDevice,
}

impl KernelSegmenter {
    fn new() -> KernelSegmenter {
        let mut lab = Lab::new();
        let ns = lab.gateway_netns("off");
        sysctl(&ns, &["net.ipv6.conf.default.addr_gen_mode=1"]);
        let (offload, plain) = in_ns(&ns, || {
            let a = TunDevice::open("vgoff-in", OffloadMode::On).expect("TUN with offloads");
            let b = TunDevice::open("vgoff-out", OffloadMode::Off).expect("plain TUN");
            (a, b)
        });
        assert!(
            offload.segments_offloaded(),
            "the kernel gave no TSO: {}",
            offload.describe_offloads()
        );
        for dev in ["vgoff-in", "vgoff-out"] {
            ip(&ns, &["link", "set", dev, "up"]);
        }
        for net in [
            "203.0.113.0/24",
            "192.0.2.0/24",
            "198.18.0.0/16",
            "2001:db8:1::/48",
            "2001:db8:2::/48",
            "2001:db8:ff::/48",
        ] {
            ip(&ns, &["route", "add", net, "dev", "vgoff-out"]);
        }
        sysctl(&ns, &["net.ipv4.conf.vgoff-in.accept_local=1"]);
        KernelSegmenter { _lab: lab, offload, plain }
    }

    /// Writes the super-packet and returns the segments the kernel made of it.
    fn segment(&self, hdr: &VnetHdr, p: &[u8], want: usize) -> Vec<Vec<u8>> {
        let mut frame = vec![0u8; vnet::HDR_LEN];
        hdr.write(&mut frame);
        frame.extend_from_slice(p);
        self.offload.send(&frame).expect("the kernel takes the super-packet");
        self.read(p, want)
    }

    /// Reads the next `want` packets to the destination of `p` from the plain TUN.
    fn read(&self, p: &[u8], want: usize) -> Vec<Vec<u8>> {
        let dst = &p[if p[0] >> 4 == 4 { 16..20 } else { 24..40 }];
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(3);
        while out.len() < want && Instant::now() < deadline {
            match self.plain.recv(&mut buf) {
                Ok(n) => {
                    let seg = &buf[..n];
                    let d = &seg[if seg[0] >> 4 == 4 { 16..20 } else { 24..40 }];
                    if d == dst {
                        out.push(seg.to_vec());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.plain.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
                Err(e) => panic!("reading the plain TUN: {e}"),
            }
        }
        out
    }
}

/// The forwarding hop: TTL / hop limit one less (and the IPv4 header checksum with it).
fn forwarded(mut seg: Vec<u8>) -> Vec<u8> {
    if seg[0] >> 4 == 4 {
        seg[8] -= 1;
        seg[10..12].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&seg[..20], 0));
        seg[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        seg[7] -= 1;
    }
    seg
}

#[test]
fn the_kernel_segments_a_rewritten_super_packet_like_the_segments_rewritten_one_by_one() {
    let k = KernelSegmenter::new();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&spec(), |s| {
            let now = Instant::now();
            let (mut t, hdr, p) = setup(&s, now);
            let mut rewritten = p.clone();
            let v = t.translate_with(&mut rewritten, partial(&hdr), now);
            prop_assert!(matches!(v, Verdict::Forward(_)), "{:?}", v);
            let a = k.segment(&hdr, &rewritten, s.segments());
            let originals = k.segment(&hdr, &p, s.segments());
            prop_assert_eq!(originals.len(), s.segments(), "the kernel's segments of the original");
            let b = rewrite_each(&mut t, &originals, now);
            compare("kernel", &a, &b)?;
            let model: Vec<Vec<u8>> =
                segment_all(&hdr, &rewritten).into_iter().map(forwarded).collect();
            compare("vnet::segment vs the kernel", &model, &a)?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn partial_checksums_of_plain_packets() {
    let now = Instant::now();
    for (v6, udp) in [(false, false), (false, true), (true, false), (true, true)] {
        let s = Spec::outbound(v6, udp, 1400, 300);
        let (mut t, mut hdr, mut p) = setup(&s, now);
        hdr.gso_type = vnet::GSO_NONE;
        assert_eq!(vnet::prepare(&mut hdr, &mut p), Ok(partial(&hdr)));
        assert!(matches!(t.translate_with(&mut p, partial(&hdr), now), Verdict::Forward(_)));
        vnet::finish_checksum(&mut hdr, &mut p).unwrap();
        assert_eq!(hdr.flags & vnet::F_NEEDS_CSUM, 0);
        assert_eq!(check_checksums(&p), Ok(Checked::AllValid), "v6 {v6} udp {udp}");

        // The checksum flagged somewhere else: `prepare` finishes it (a valid packet results).
        let (_, mut hdr, mut p) = setup(&s, now);
        hdr.gso_type = vnet::GSO_NONE;
        hdr.csum_offset = 2;
        let at = usize::from(hdr.csum_start) + 2;
        let orig = p.clone();
        assert_eq!(vnet::prepare(&mut hdr, &mut p), Ok(Checksum::Full));
        assert_eq!(hdr.flags & vnet::F_NEEDS_CSUM, 0);
        assert_ne!(p[at..at + 2], orig[at..at + 2], "a checksum was written at the offset");

        // ...and the translator refuses it as partial.
        let (mut t, hdr, mut p) = setup(&s, now);
        let wrong = Checksum::Partial { at: usize::from(hdr.csum_start) + 2 };
        let before = p.clone();
        assert!(matches!(
            t.translate_with(&mut p, wrong, now),
            Verdict::Drop(DropReason::BadOffload)
        ));
        assert_eq!(p, before, "a refused packet is left alone");
    }
}

#[test]
fn a_super_packet_the_kernel_refuses_is_written_as_the_kernels_segments() {
    let k = KernelSegmenter::new();
    let s = Spec { timestamps: true, ..Spec::outbound(false, false, 1000, 4500) };
    let (hdr, p) = s.super_packet(s.host(), s.partner(), true);
    // A header length past the packet: the kernel refuses the frame (tun_get_user), while
    // the headers themselves are fine to cut.
    let bad = VnetHdr { hdr_len: u16::MAX, ..hdr };
    let mut frame = vec![0u8; vnet::HDR_LEN];
    bad.write(&mut frame);
    frame.extend_from_slice(&p);
    let refused = k.offload.send(&frame).expect_err("the kernel should refuse this frame");
    assert_eq!(refused.raw_os_error(), Some(libc::EINVAL), "{refused}");

    let mut scratch = vec![0u8; 65536];
    let sent = k.offload.send_frame(&frame, &mut scratch).expect("written in segments");
    assert_eq!(sent, Sent::Segmented { written: 5, failed: 0 });
    let got = k.read(&p, 5);
    let want: Vec<Vec<u8>> = segment_all(&hdr, &p).into_iter().map(forwarded).collect();
    compare("segments written in software", &got, &want).unwrap_or_else(|e| panic!("{e}"));
}
