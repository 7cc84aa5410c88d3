//! The offload paths of the gateway (`--offload on`), one core, no I/O:
//!
//! - `offload/translate_super_packet_{v4,v6}`: `Translator::translate_with` on a 64 KB TCP
//!   super-packet (44 segments of 1448 bytes) with a partial checksum: the rewrite the
//!   gateway does once per read with offloads. Throughput is counted in segments, so it
//!   compares directly with
//! - `offload/translate_44_segments_{v4,v6}`: the same bytes as 44 ordinary packets
//!   (full checksums), translated one by one, as without offloads;
//! - `offload/prepare`: reading the virtio-net header and deciding the checksum mode;
//! - `offload/segment_in_software_v4`: `vnet::segment` of the super-packet, the fallback
//!   when the kernel refuses a super-packet on write (throughput in bytes);
//! - `offload/finish_checksum_1500`: finishing a partial checksum of a 1500-byte packet in
//!   software (a partial checksum that is not at the TCP/UDP checksum).
//!
//! As in `benches/translate.rs`, the translator rewrites in place, so the headers are copied
//! back from a pristine copy before each translation (here the first 128 bytes, which hold
//! them all).
//!
//! Run: `cargo bench --bench offload`.

use criterion::{black_box, Criterion, Throughput};
use etherparse::PacketBuilder;
use std::time::{Duration, Instant};
use vipgate::nat::{Config, Translator, Verdict};
use vipgate::wire::checksum::{fold, sum};
use vipgate::wire::vnet::{self, Checksum, VnetHdr};

const MSS: usize = 1448;
const SEGMENTS: usize = 44;
const HEAD: usize = 128;

/// A TCP super-packet from 192.0.2.7 (2001:db8:1::7) to 203.0.113.9 (2001:db8:2::9), its
/// checksum partial, and its virtio-net header.
fn super_packet(v6: bool, payload: usize) -> (VnetHdr, Vec<u8>) {
    let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let b = if v6 {
        let s: std::net::Ipv6Addr = "2001:db8:1::7".parse().unwrap();
        let d: std::net::Ipv6Addr = "2001:db8:2::9".parse().unwrap();
        PacketBuilder::ipv6(s.octets(), d.octets(), 64)
    } else {
        PacketBuilder::ipv4([192, 0, 2, 7], [203, 0, 113, 9], 64)
    };
    let mut p = Vec::new();
    b.tcp(40000, 443, 1, 500).ack(1).write(&mut p, &data).unwrap();
    let l4 = if v6 { 40 } else { 20 };
    let (s, d) = if v6 { (&p[8..24], &p[24..40]) } else { (&p[12..16], &p[16..20]) };
    let partial = fold(sum(s, 0) + sum(d, 0) + 6 + (p.len() - l4) as u64);
    p[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHdr {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: if v6 { vnet::GSO_TCPV6 } else { vnet::GSO_TCPV4 },
        hdr_len: (l4 + 20) as u16,
        gso_size: MSS as u16,
        csum_start: l4 as u16,
        csum_offset: 16,
    };
    (hdr, p)
}

fn translator(now: Instant) -> Translator {
    let lan = vec!["192.0.2.0/24".parse().unwrap(), "2001:db8:1::/48".parse().unwrap()];
    let pools = vec!["198.18.0.0/16".parse().unwrap(), "2001:db8:ff::/48".parse().unwrap()];
    Translator::new(Config::new(lan, pools), [7; 32], now).unwrap()
}

fn forwarded(v: Verdict) {
    assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let now = Instant::now();
    let mut g = c.benchmark_group("offload");
    g.sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));

    for v6 in [false, true] {
        let fam = if v6 { "v6" } else { "v4" };
        let mut t = translator(now);
        let (hdr, pristine) = super_packet(v6, MSS * SEGMENTS);
        let at = usize::from(hdr.csum_start + hdr.csum_offset);
        let mut buf = pristine.clone();
        forwarded(t.translate_with(&mut buf, Checksum::Partial { at }, now));
        g.throughput(Throughput::Elements(SEGMENTS as u64));
        g.bench_function(format!("translate_super_packet_{fam}"), |b| {
            b.iter(|| {
                buf[..HEAD].copy_from_slice(&pristine[..HEAD]);
                forwarded(t.translate_with(&mut buf, Checksum::Partial { at }, now));
            })
        });

        let mut scratch = vec![0u8; 65536];
        let mut segs: Vec<Vec<u8>> = Vec::new();
        vnet::segment(&hdr, &pristine, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(segs.len(), SEGMENTS);
        let mut bufs = segs.clone();
        g.bench_function(format!("translate_44_segments_{fam}"), |b| {
            b.iter(|| {
                for (buf, seg) in bufs.iter_mut().zip(&segs) {
                    buf[..HEAD].copy_from_slice(&seg[..HEAD]);
                    forwarded(t.translate(buf, now));
                }
            })
        });
    }

    let (hdr, pristine) = super_packet(false, MSS * SEGMENTS);
    let mut frame = vec![0u8; vnet::HDR_LEN];
    hdr.write(&mut frame);
    frame.extend_from_slice(&pristine);
    g.throughput(Throughput::Elements(1));
    g.bench_function("prepare", |b| {
        b.iter(|| {
            let mut h = VnetHdr::read(black_box(&frame));
            black_box(vnet::prepare(&mut h, &mut frame[vnet::HDR_LEN..]).unwrap());
        })
    });

    let mut scratch = vec![0u8; 65536];
    g.throughput(Throughput::Bytes(pristine.len() as u64));
    g.bench_function("segment_in_software_v4", |b| {
        b.iter(|| {
            let mut n = 0usize;
            vnet::segment(&hdr, black_box(&pristine), &mut scratch, |s| n += s.len()).unwrap();
            black_box(n)
        })
    });

    let (_, small) = super_packet(false, 1460);
    let mut buf = small.clone();
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("finish_checksum_1500", |b| {
        b.iter(|| {
            buf[36..38].copy_from_slice(&small[36..38]);
            let mut h = VnetHdr {
                flags: vnet::F_NEEDS_CSUM,
                csum_start: 20,
                csum_offset: 16,
                ..VnetHdr::default()
            };
            vnet::finish_checksum(&mut h, black_box(&mut buf)).unwrap();
        })
    });
    g.finish();
    c.final_summary();
}
