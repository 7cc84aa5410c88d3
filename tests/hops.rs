//! One router hop, one TTL: a packet through `vipgate gateway` loses exactly 1 of its TTL /
//! hop limit, as through any router, although it crosses the kernel's forwarding twice (into
//! the TUN device and out of it); and the box's own ICMP errors towards the WAN come from its
//! WAN-side address, as a kernel router's do.
//!
//! The control is the kernel itself: the same topology, with the server given a route back
//! to the LAN, forwards between the client and the server before the gateway starts; the
//! same packets then go through the gateway, and what arrives must be the same.
//!
//! | test | what must hold |
//! |---|---|
//! | `*_udp_loses_one_hop_each_way` | UDP with TTL / hop limit 2, 64 and 255, out and in, the first packet of a flow (general path) and the next (fast path; offloads off, so checksums are whole): received with the sent value − 1, as the kernel's own forwarding delivers it (TTL 2 reaches the server) |
//! | `*_tcp_super_packets_lose_one_hop_each_way` | a TCP stream both ways with TUN offloads (super-packets): every data segment arrives with the sent TTL − 1, as without the gateway |
//! | `*_time_exceeded_comes_from_the_wan_address` | a TTL-1 probe from the server or the third party to a virtual address gets "time exceeded" from the gateway's address on the link it came in by, as without the gateway, never from its LAN address |
//!
//! Needs root, `ip` and `tcpdump`; fails, never skips, without them. Addresses only from the
//! documentation and benchmarking ranges, inside namespaces each test creates and removes.

mod common;

use common::netns::*;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

fn server(v6: bool) -> IpAddr {
    if v6 {
        SRV6.into()
    } else {
        SRV4.into()
    }
}

/// The gateway's address on the link to the server (`wan0`) and to the third party (`wan1`).
fn wan_addr(v6: bool, third_party: bool) -> IpAddr {
    match (v6, third_party) {
        (false, false) => Ipv4Addr::new(198, 51, 100, 1).into(),
        (false, true) => Ipv4Addr::new(203, 0, 113, 1).into(),
        (true, false) => Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1).into(),
        (true, true) => Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1).into(),
    }
}

/// The standard topology with its LAN bridge created first (so that the box's own ICMP
/// errors, sent into the TUN, would take the LAN address if nothing chose better), and the
/// server and third party given routes back to the LAN: the kernel alone can forward between
/// them and the client (the control) until the gateway starts.
fn topo() -> Topo {
    let topo = Topo::lan_first(1);
    for (ns, n4, n6) in
        [(&topo.srv, "198.51.100", "2001:db8:2"), (&topo.tp, "203.0.113", "2001:db8:3")]
    {
        ip_batch(ns, &format!("route add {LAN4} via {n4}.1\nroute add {LAN6} via {n6}::1\n"));
    }
    topo
}

/// Sets the TTL (IPv4) or unicast hop limit (IPv6) of what `fd` sends.
fn set_ttl(fd: &impl AsRawFd, v6: bool, ttl: u8) {
    if v6 {
        set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, i32::from(ttl));
    } else {
        set_int_opt(fd, libc::IPPROTO_IP, libc::IP_TTL, i32::from(ttl));
    }
}

/// A UDP socket in `ns` that reports the TTL / hop limit of what it receives.
fn udp_ttl(ns: &str, addr: SocketAddr) -> UdpSocket {
    let s = udp(ns, addr);
    if addr.is_ipv6() {
        set_int_opt(&s, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1);
    } else {
        set_int_opt(&s, libc::IPPROTO_IP, libc::IP_RECVTTL, 1);
    }
    s
}

/// Receives one datagram with its sender and its TTL / hop limit (from the control message
/// `IP_RECVTTL` / `IPV6_RECVHOPLIMIT` asked for), within the socket's read timeout.
fn recv_ttl(s: &UdpSocket) -> io::Result<(Vec<u8>, SocketAddr, u8)> {
    let mut data = [0u8; 2048];
    let mut cmsg = [0u64; 16];
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: an all-zero msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: recvmsg(2) into buffers that live through the call, their sizes given.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ttl = None;
    // SAFETY: walking the control messages the kernel wrote into `cmsg`, with the libc
    // macros, each read within the length it reports.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level, ty) == (libc::IPPROTO_IP, libc::IP_TTL)
                || (level, ty) == (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
            {
                ttl = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>()) as u8);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = match i32::from(from.ss_family) {
        // SAFETY: the kernel wrote a sockaddr of the family it names.
        libc::AF_INET => unsafe {
            let a = *(&from as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            SocketAddr::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            )
        },
        // SAFETY: as above.
        _ => unsafe {
            let a = *(&from as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
            SocketAddr::new(Ipv6Addr::from(a.sin6_addr.s6_addr).into(), u16::from_be(a.sin6_port))
        },
    };
    let ttl = ttl.expect("no TTL / hop limit control message");
    Ok((data[..n as usize].to_vec(), from, ttl))
}

/// What arrived, for each sent TTL: (sent, [received by the server: first and second packet
/// of a new flow], [received by the client: the same, answers from a new server port]).
type Hops = Vec<(u8, [u8; 2], [u8; 2])>;

/// For each TTL in `ttls`: a new client socket sends two datagrams with that TTL to the
/// server, and the server answers each from a new socket with that TTL, to whatever address
/// it saw (the client's, or its virtual one). Returns what arrived.
fn udp_hops(topo: &Topo, v6: bool, ttls: &[u8]) -> Hops {
    let cli = &topo.clients[0];
    let s = udp_ttl(&topo.srv, sa(server(v6), 7000));
    let mut out = Vec::new();
    for &ttl in ttls {
        let c = udp_ttl(cli, sa(client_addr(0, v6), 0));
        set_ttl(&c, v6, ttl);
        let mut up = [0; 2];
        let mut seen = None;
        for (i, got) in up.iter_mut().enumerate() {
            c.send_to(&[ttl, i as u8], sa(server(v6), 7000)).unwrap();
            let (d, from, t) = recv_ttl(&s).unwrap_or_else(|e| {
                panic!("UDP with TTL {ttl} (packet {i}) did not reach the server: {e}")
            });
            assert_eq!(d, [ttl, i as u8], "another datagram arrived");
            (*got, seen) = (t, Some(from));
        }
        let back = udp(&topo.srv, sa(server(v6), 0));
        set_ttl(&back, v6, ttl);
        let mut down = [0; 2];
        for (i, got) in down.iter_mut().enumerate() {
            back.send_to(&[ttl, i as u8, 1], seen.unwrap()).unwrap();
            let (d, _, t) = recv_ttl(&c).unwrap_or_else(|e| {
                panic!("UDP with TTL {ttl} (packet {i}) did not reach the client: {e}")
            });
            assert_eq!(d, [ttl, i as u8, 1], "another datagram arrived");
            *got = t;
        }
        out.push((ttl, up, down));
    }
    out
}

fn udp_loses_one_hop(v6: bool) {
    let mut topo = topo();
    let ttls = [2, 64, 255];
    let control = udp_hops(&topo, v6, &ttls);
    // Without offloads every checksum is whole, so the second packet of a flow takes the
    // fast path (with offloads the kernel hands UDP over with a partial checksum, which the
    // general path takes: the TCP test below has that).
    let gw = topo.gateway(&["--offload", "off"]);
    let through = udp_hops(&topo, v6, &ttls);
    for (ttl, up, down) in &control {
        assert_eq!((*up, *down), ([ttl - 1; 2], [ttl - 1; 2]), "the kernel's own forwarding");
    }
    assert_eq!(through, control, "(sent, [at the server], [at the client]) through vipgate");
    // They were translated, on both paths.
    assert!(gw.counter("outbound") >= 6 && gw.counter("inbound") >= 6, "{}", gw.stats());
}

#[test]
fn v4_udp_loses_one_hop_each_way() {
    udp_loses_one_hop(false);
}

#[test]
fn v6_udp_loses_one_hop_each_way() {
    udp_loses_one_hop(true);
}

// ---------------------------------------------------------------------------------------------
// TCP with TUN offloads: super-packets
// ---------------------------------------------------------------------------------------------

/// The TTL / hop limit of every TCP packet with data in a pcap capture of Ethernet frames.
fn data_segment_ttls(pcap: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = EMPTY_PCAP;
    while at + 16 <= pcap.len() {
        let caplen = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let f = &pcap[at + 16..(at + 16 + caplen).min(pcap.len())];
        at += 16 + caplen;
        let Some(p) = f.get(14..) else { continue };
        let (ttl, payload) = match p.first().map(|b| b >> 4) {
            Some(4) if p.len() >= 40 && p[9] == 6 => {
                let ihl = usize::from(p[0] & 15) * 4;
                let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
                let doff = usize::from(p[ihl + 12] >> 4) * 4;
                (p[8], total.saturating_sub(ihl + doff))
            }
            Some(6) if p.len() >= 60 && p[6] == 6 => {
                let len = usize::from(u16::from_be_bytes([p[4], p[5]]));
                (p[7], len.saturating_sub(usize::from(p[52] >> 4) * 4))
            }
            _ => continue,
        };
        if payload > 0 {
            out.push(ttl);
        }
    }
    out
}

/// A TCP connection from the client to the server, 2 MB each way, each end sending with
/// TTL `ttl` (set after the handshake); returns the TTLs of the data segments that arrived
/// at the server and at the client, as captured on their links.
fn tcp_hops(topo: &Topo, v6: bool, ttl: u8, port: u16) -> (Vec<u8>, Vec<u8>) {
    const LEN: usize = 2 << 20;
    let cli = &topo.clients[0];
    let dir = topo.lab.dir().to_path_buf();
    // What each end received: to the server's port at the server, from it at the client.
    let p = port.to_string();
    let caps = [
        (&topo.srv, "srv", ["-s", "128", "tcp", "dst", "port", &p]),
        (cli, "cli", ["-s", "128", "tcp", "src", "port", &p]),
    ]
    .map(|(ns, name, f)| Capture::start(ns, "eth0", &dir.join(format!("{name}{port}.pcap")), &f));
    let l = listen(&topo.srv, sa(server(v6), port));
    let mut c = connect(cli, sa(server(v6), port), IO_TIMEOUT).expect("TCP connect");
    let (mut s, _) = accept(&l, IO_TIMEOUT).expect("accept");
    for sock in [&c, &s] {
        set_ttl(sock, v6, ttl);
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        sock.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    let data = vec![0x5a; LEN];
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| {
            let mut got = vec![0u8; LEN];
            s.read_exact(&mut got).expect("the server reads everything");
            s.write_all(&data).expect("the server sends");
        });
        c.write_all(&data).expect("the client sends");
        let mut got = vec![0u8; LEN];
        c.read_exact(&mut got).expect("the client reads everything");
        srv.join().unwrap();
    });
    drop((c, l));
    std::thread::sleep(Duration::from_millis(300));
    let [at_srv, at_cli] = caps.map(|c| data_segment_ttls(&c.finish()));
    (at_srv, at_cli)
}

fn tcp_super_packets_lose_one_hop(v6: bool) {
    let mut topo = topo();
    let ttl = 30;
    let control = tcp_hops(&topo, v6, ttl, 7100);
    let gw = topo.gateway(&["--offload", "on"]);
    let through = tcp_hops(&topo, v6, ttl, 7101);
    for (what, ttls) in [
        ("control, at the server", &control.0),
        ("control, at the client", &control.1),
        ("through vipgate, at the server", &through.0),
        ("through vipgate, at the client", &through.1),
    ] {
        assert!(ttls.len() >= 10, "{what}: only {} data segments captured", ttls.len());
        let wrong: Vec<&u8> = ttls.iter().filter(|&&t| t != ttl - 1).collect();
        assert!(
            wrong.is_empty(),
            "{what}: sent with {ttl}, {} arrived with {wrong:?}",
            wrong.len()
        );
    }
    let supers = gw.counter("tun_super_packets");
    assert!(supers >= 2, "the gateway read only {supers} super-packets: offloads not in use");
}

#[test]
fn v4_tcp_super_packets_lose_one_hop_each_way() {
    tcp_super_packets_lose_one_hop(false);
}

#[test]
fn v6_tcp_super_packets_lose_one_hop_each_way() {
    tcp_super_packets_lose_one_hop(true);
}

// ---------------------------------------------------------------------------------------------
// The box's own ICMP errors: from the WAN side
// ---------------------------------------------------------------------------------------------

/// Sends a UDP datagram with TTL 1 from `ns` (address `from`) to `to` and returns the sources
/// of the "time exceeded" messages that came back.
fn time_exceeded_sources(ns: &str, from: IpAddr, to: IpAddr) -> Vec<IpAddr> {
    let v6 = to.is_ipv6();
    let raw = raw_icmp(ns, v6);
    let s = udp(ns, sa(from, 0));
    set_ttl(&s, v6, 1);
    s.send_to(b"probe", sa(to, 33434)).unwrap();
    let time_exceeded = if v6 { 3 } else { 11 };
    icmp_messages(&raw, v6)
        .into_iter()
        .filter(|(_, m)| m.first() == Some(&time_exceeded) && mentions(m, to))
        .map(|(src, _)| src)
        .collect()
}

fn time_exceeded_from_the_wan(v6: bool) {
    let mut topo = topo();
    let (srv, tp) = (topo.srv.clone(), topo.tp.clone());
    let tp_addr: IpAddr = if v6 { TP6.into() } else { TP4.into() };
    // The control: a TTL-1 probe the kernel's forwarding drops, towards the client.
    let real = client_addr(0, v6);
    for (ns, from, third) in [(&srv, server(v6), false), (&tp, tp_addr, true)] {
        let got = time_exceeded_sources(ns, from, real);
        assert_eq!(got, [wan_addr(v6, third)], "control: time exceeded for a probe from {from}");
    }
    let gw = topo.gateway(&[]);
    let c = udp(&topo.clients[0], sa(real, 0));
    let s = udp(&topo.srv, sa(server(v6), 7000));
    let virt = udp_roundtrip(&c, &s).ip();
    assert!(in_pool(virt), "the server saw {virt}");
    for (ns, from, third) in [(&srv, server(v6), false), (&tp, tp_addr, true)] {
        let got = time_exceeded_sources(ns, from, virt);
        assert_eq!(
            got,
            [wan_addr(v6, third)],
            "time exceeded for a probe from {from} to the virtual address {virt} (LAN addresses: \
             192.0.2.1, 2001:db8:1::1)"
        );
    }
    drop(gw);
}

#[test]
fn v4_time_exceeded_comes_from_the_wan_address() {
    time_exceeded_from_the_wan(false);
}

#[test]
fn v6_time_exceeded_comes_from_the_wan_address() {
    time_exceeded_from_the_wan(true);
}
