//! End-to-end tests of the rental authority inside `vipgate gateway`: the real daemon in
//! network namespaces, real TLS 1.3 (the client pins `<state-dir>/tls/cert.pem`), real SQLite,
//! real traffic.
//!
//! Needs root (network namespaces, TUN devices), `ip`, `ping` and `tcpdump`; fails, never
//! skips, without them. Addresses only from the documentation and benchmarking ranges; nothing
//! outside the namespaces each test creates (and removes) is touched. The topology is
//! [`Topo`] of `tests/common/netns.rs`: the gateway answers on 192.0.2.1 / 2001:db8:1::1 (LAN),
//! 198.51.100.1 / 2001:db8:2::1 (towards the server) and 203.0.113.1 / 2001:db8:3::1 (towards
//! the third party).

mod common;

use common::netns::*;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use vipgate::authority::{AuthorityClient, Command, ErrorCode, Id, Outcome, Reply, Request};

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// The authority's port.
const PORT: u16 = 7443;
/// The gateway's LAN addresses.
const GW_LAN4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const GW_LAN6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1));
/// The gateway's addresses on the server's link.
const GW_WAN4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
const GW_WAN6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1));
/// The gateway's addresses on the third party's link.
const GW_TP4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
const GW_TP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1));

/// Everything of the one refusal after its id: `{"id":…,` + this.
const REFUSAL_TAIL: &str =
    r#""ok":false,"error":"not_permitted","message":"the request is not permitted"}"#;

fn srv4() -> IpAddr {
    SRV4.into()
}

fn srv6() -> IpAddr {
    SRV6.into()
}

fn tp4() -> IpAddr {
    TP4.into()
}

// ---------------------------------------------------------------------------------------------
// The library client
// ---------------------------------------------------------------------------------------------

/// The certificate the daemon generated, which clients pin.
fn ca(gw: &Daemon) -> PathBuf {
    gw.state.join("tls").join("cert.pem")
}

/// A TLS connection from namespace `ns` to the authority at `at`:7443 (library client).
fn authority(ns: &str, gw: &Daemon, at: IpAddr) -> AuthorityClient {
    let (ca, to) = (ca(gw), sa(at, PORT));
    let mut tries = 0;
    loop {
        tries += 1;
        match in_ns(ns, || AuthorityClient::connect(to, &ca, IO_TIMEOUT)) {
            Ok(c) => return c,
            // A handshake read interrupted by a signal (EINTR: sockets with a timeout get it
            // when the process is stopped or frozen for a moment) is not the daemon's doing.
            Err(e) if tries < 3 && format!("{e:#}").contains("Interrupted system call") => {}
            Err(e) => panic!(
                "connecting from {ns} to the authority at {to}: {e:#}\ndaemon log:\n{}",
                gw.log_text()
            ),
        }
    }
}

fn call(c: &mut AuthorityClient, cmd: &Command) -> Reply {
    c.call(cmd).unwrap_or_else(|e| panic!("`{}` to {}: no reply ({e:#})", cmd.name(), c.addr()))
}

/// Rents a lease towards `partner`; returns the virtual address and the expiry.
fn rent(c: &mut AuthorityClient, partner: IpAddr, ttl: Option<u64>) -> (IpAddr, SystemTime) {
    let r = call(c, &Command::Rent { partner, ttl: ttl.map(Duration::from_secs) });
    match r.outcome {
        Outcome::Leased { virtual_addr, expires } => (virtual_addr, expires),
        _ => panic!("rent towards {partner} via {}: {r}", c.addr()),
    }
}

fn inquire(c: &mut AuthorityClient, virtual_addr: IpAddr, at: Option<SystemTime>) -> Reply {
    call(c, &Command::Inquire { virtual_addr, at })
}

#[track_caller]
fn assert_real(r: &Reply, real: IpAddr, what: &str) {
    assert_eq!(
        r.outcome,
        Outcome::Real { real },
        "{what}: expected the real address {real}, got {r}"
    );
}

#[track_caller]
fn assert_refused(r: &Reply, what: &str) {
    assert_eq!(
        r.outcome,
        Outcome::Error {
            code: ErrorCode::NotPermitted,
            message: "the request is not permitted".to_string()
        },
        "{what}: expected the one refusal, got {r}"
    );
}

/// The `(real, virtual, partner, origin)` of every lease `vipgate leases --json` lists.
fn lease_set(gw: &Daemon) -> BTreeSet<(String, String, String, String)> {
    gw.leases()
        .iter()
        .map(|l| {
            let f = |k: &str| {
                l[k].as_str().unwrap_or_else(|| panic!("lease without {k:?}: {l}")).to_string()
            };
            (f("real"), f("virtual"), f("partner"), f("origin"))
        })
        .collect()
}

fn has_lease(gw: &Daemon, real: IpAddr, virt: IpAddr, partner: IpAddr, origin: &str) -> bool {
    lease_set(gw).contains(&(
        real.to_string(),
        virt.to_string(),
        partner.to_string(),
        origin.to_string(),
    ))
}

/// A pool address no lease uses.
fn unleased_pool_address(gw: &Daemon) -> IpAddr {
    let used: BTreeSet<String> = lease_set(gw).into_iter().map(|l| l.1).collect();
    (1..=254u8)
        .rev()
        .map(|h| IpAddr::V4(Ipv4Addr::new(198, 18, 0, h)))
        .find(|a| !used.contains(&a.to_string()))
        .expect("a free pool address")
}

// ---------------------------------------------------------------------------------------------
// A raw line client over TLS (for exact reply bytes and for malformed requests)
// ---------------------------------------------------------------------------------------------

/// True for the errors a peer's close (with or without close_notify) produces.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// One TLS connection to the authority that sends and reads raw lines.
struct Lines {
    tls: StreamOwned<ClientConnection, TcpStream>,
    pending: Vec<u8>,
    addr: SocketAddr,
}

impl Lines {
    /// Connects from namespace `ns` to `at`:7443 and completes the TLS 1.3 handshake, pinning
    /// the daemon's certificate (bounded by the socket timeouts).
    fn connect(ns: &str, gw: &Daemon, at: IpAddr) -> Lines {
        let addr = sa(at, PORT);
        let sock = connect(ns, addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("TCP connect from {ns} to the authority at {addr}: {e}"));
        let config = vipgate::tls::client_config(&ca(gw)).expect("client TLS config");
        let conn = ClientConnection::new(config, ServerName::IpAddress(at.into())).unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        let deadline = Instant::now() + IO_TIMEOUT;
        while tls.conn.is_handshaking() {
            match tls.conn.complete_io(&mut tls.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted && Instant::now() < deadline => {}
                Err(e) => panic!("TLS handshake from {ns} with {addr}: {e}"),
            }
        }
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"vipgate-authority/1"[..]), "ALPN");
        Lines { tls, pending: Vec::new(), addr }
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    /// The next line (without its `\n`), `None` when the authority closed the connection;
    /// panics when nothing arrives within [`IO_TIMEOUT`].
    fn line(&mut self) -> Option<String> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut buf = [0u8; 8192];
        loop {
            if let Some(p) = self.pending.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.pending.drain(..=p).collect();
                return Some(String::from_utf8(l[..p].to_vec()).expect("a UTF-8 reply line"));
            }
            assert!(
                Instant::now() < deadline,
                "no reply line from {} within {IO_TIMEOUT:?}",
                self.addr
            );
            match self.tls.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if is_closed(&e) => return None,
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading from {}: {e}", self.addr),
            }
        }
    }

    /// Sends `line` (a `\n` is appended) and returns the reply line.
    fn ask(&mut self, line: &[u8]) -> String {
        let mut l = line.to_vec();
        l.push(b'\n');
        self.send(&l).unwrap_or_else(|e| panic!("sending to {}: {e}", self.addr));
        self.line()
            .unwrap_or_else(|| panic!("{} closed the connection instead of replying", self.addr))
    }

    /// Sends `request` and returns the raw reply line.
    fn request(&mut self, id: Id, command: Command) -> String {
        let line = Request { id, command }.to_line();
        self.ask(&line[..line.len() - 1])
    }
}

/// `{"id":<id>,` + [`REFUSAL_TAIL`]: the exact bytes of the one refusal.
fn refusal_line(id: &Id) -> String {
    format!("{{\"id\":{},{REFUSAL_TAIL}", serde_json::to_string(id).unwrap())
}

/// A reply line parsed, with its error code.
fn code_of(line: &str) -> Option<ErrorCode> {
    Reply::parse(line.as_bytes())
        .unwrap_or_else(|e| panic!("unreadable reply {line:?}: {e}"))
        .error_code()
}

/// Reads from `s` until the peer closes it (EOF or reset) or `within` passes; returns whether
/// it was closed.
fn wait_closed(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(250)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if is_closed(&e) => return true,
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// `recv_from`, retried when a signal interrupts it (the timeout still bounds each try).
fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    loop {
        match sock.recv_from(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// `ping -c 2` from `ns` to `dst`, which must succeed.
fn ping_ok(ns: &str, dst: IpAddr) {
    let o = exec_in(
        ns,
        "ping",
        &["-n", "-c", "2", "-i", "0.2", "-W", "2", &dst.to_string()],
        Duration::from_secs(10),
    );
    assert!(
        o.status.success(),
        "ping {dst} from {ns} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// 1: an explicit rent, then traffic under exactly that address
// ---------------------------------------------------------------------------------------------

#[test]
fn traffic_after_an_explicit_rent_leaves_under_exactly_the_rented_address() {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let me = client_addr(0, false);

    let mut a = authority(&cli, &gw, GW_LAN4);
    let before = SystemTime::now();
    let (v, expires) = rent(&mut a, srv4(), Some(600));
    assert!(in_pool(v) && !in_lan(v), "rented {v}, expected an address of the pool {POOL4}");
    let ttl = expires.duration_since(before).map(|d| d.as_secs()).unwrap_or(0);
    assert!((595..=605).contains(&ttl), "rented for 600 s, but it expires in {ttl} s");
    assert!(has_lease(&gw, me, v, srv4(), "explicit"), "leases: {:?}", lease_set(&gw));

    let c = udp(&cli, sa(me, 0));
    let s = udp(&topo.srv, sa(srv4(), 7000));
    assert_eq!(udp_roundtrip(&c, &s).ip(), v, "UDP: the server saw another address");
    let l = listen(&topo.srv, sa(srv4(), 7001));
    assert_eq!(tcp_roundtrip(&cli, &l, sa(srv4(), 7001)).ip(), v, "TCP: the server saw another");

    let leases = lease_set(&gw);
    assert_eq!(leases.len(), 1, "the traffic should have used the rented lease: {leases:?}");
}

// ---------------------------------------------------------------------------------------------
// 2: only the recorded partner learns who is behind a virtual address
// ---------------------------------------------------------------------------------------------

#[test]
fn only_the_recorded_partner_learns_the_real_address_and_every_refusal_is_the_same() {
    let mut topo = Topo::new(2);
    let gw = topo.gateway(&[]);
    let (c0, c1) = (topo.clients[0].clone(), topo.clients[1].clone());
    let (me0, me1) = (client_addr(0, false), client_addr(1, false));

    // An explicit lease of client 0 and an implicit one of client 1, both towards the server.
    let mut a0 = authority(&c0, &gw, GW_LAN4);
    let (v0, _) = rent(&mut a0, srv4(), None);
    let u1 = udp(&c1, sa(me1, 0));
    let s = udp(&topo.srv, sa(srv4(), 7000));
    let v1 = udp_roundtrip(&u1, &s).ip();
    assert!(in_pool(v1) && v1 != v0, "client 1 went out as {v1} (client 0 rented {v0})");
    assert!(has_lease(&gw, me1, v1, srv4(), "implicit"), "leases: {:?}", lease_set(&gw));
    let free = unleased_pool_address(&gw);

    // The partner, from its own address, learns both.
    let mut p = authority(&topo.srv, &gw, GW_WAN4);
    assert_real(&inquire(&mut p, v0, None), me0, "the partner about the rented lease");
    assert_real(&inquire(&mut p, v1, None), me1, "the partner about the implicit lease");

    // Every refusal: exactly the same bytes apart from the id.
    let inq = |v: IpAddr, at: Option<SystemTime>| Command::Inquire { virtual_addr: v, at };
    let hour = Duration::from_secs(3600);
    // The askers: the third party, the partner, client 0 and client 1.
    let mut conns = [
        Lines::connect(&topo.tp, &gw, GW_TP4),
        Lines::connect(&topo.srv, &gw, GW_WAN4),
        Lines::connect(&c0, &gw, GW_LAN4),
        Lines::connect(&c1, &gw, GW_LAN4),
    ];
    let (tp, ps, host0, host1) = (0, 1, 2, 3);
    let cases: Vec<(&str, usize, Id, Command)> = vec![
        ("the third party about the rented lease", tp, Id::from(1), inq(v0, None)),
        ("the third party about the implicit lease", tp, Id::from("q-2"), inq(v1, None)),
        ("the third party about an unleased pool address", tp, Id::from(3), inq(free, None)),
        ("the third party about a LAN address", tp, Id::from(4), inq(me0, None)),
        ("the partner about an unleased pool address", ps, Id::from(5), inq(free, None)),
        (
            "the partner about the rented lease an hour from now",
            ps,
            Id::from("six"),
            inq(v0, Some(SystemTime::now() + hour)),
        ),
        (
            "the partner about the implicit lease an hour ago",
            ps,
            Id::from(7),
            inq(v1, Some(SystemTime::now() - hour)),
        ),
        ("the host about its own lease", host0, Id::from(8), inq(v0, None)),
        ("another host about client 0's lease", host1, Id::from(9), inq(v0, None)),
        (
            "another host releasing client 0's lease",
            host1,
            Id::from(10),
            Command::Release { virtual_addr: v0 },
        ),
        (
            "another host renewing client 0's lease",
            host1,
            Id::from(11),
            Command::Renew { virtual_addr: v0, ttl: None },
        ),
        (
            "a host releasing an unleased address",
            host0,
            Id::from(12),
            Command::Release { virtual_addr: free },
        ),
    ];
    for (what, k, id, cmd) in cases {
        let line = conns[k].request(id.clone(), cmd);
        assert_eq!(line, refusal_line(&id), "{what}: not the one refusal");
    }

    // The refusals changed nothing: both leases are still there and still answered.
    assert!(has_lease(&gw, me0, v0, srv4(), "explicit"), "leases: {:?}", lease_set(&gw));
    assert_real(&inquire(&mut p, v0, None), me0, "the partner, after the refusals");
    assert_real(&inquire(&mut p, v1, None), me1, "the partner, after the refusals");
}

// ---------------------------------------------------------------------------------------------
// 3: `at` is answered from the history under the same rule
// ---------------------------------------------------------------------------------------------

#[test]
fn inquiries_about_the_past_are_answered_from_the_history() {
    let mut topo = Topo::new(2);
    let gw = topo.gateway(&[]);
    let (c0, c1) = (topo.clients[0].clone(), topo.clients[1].clone());
    let (me0, me1) = (client_addr(0, false), client_addr(1, false));

    let before = SystemTime::now() - Duration::from_secs(2);
    std::thread::sleep(Duration::from_millis(50));
    let mut a0 = authority(&c0, &gw, GW_LAN4);
    let mut a1 = authority(&c1, &gw, GW_LAN4);
    let (released, _) = rent(&mut a0, srv4(), None);
    let (expiring, _) = rent(&mut a1, srv4(), Some(2));
    std::thread::sleep(Duration::from_millis(300));
    let live = SystemTime::now();
    std::thread::sleep(Duration::from_millis(300));

    let mut p = authority(&topo.srv, &gw, GW_WAN4);
    assert_real(&inquire(&mut p, released, Some(live)), me0, "while both are live, at=live");
    assert_eq!(
        call(&mut a0, &Command::Release { virtual_addr: released }).outcome,
        Outcome::Released
    );

    // Wait (bounded) for the 2-second lease to expire.
    let deadline = Instant::now() + Duration::from_secs(8);
    while lease_set(&gw).iter().any(|l| l.1 == expiring.to_string()) {
        assert!(Instant::now() < deadline, "the 2 s lease never expired: {:?}", lease_set(&gw));
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = SystemTime::now();

    // Now: both refused. At a moment they were live: both answered, from the history.
    assert_refused(&inquire(&mut p, released, None), "the released lease, now");
    assert_refused(&inquire(&mut p, expiring, None), "the expired lease, now");
    assert_real(&inquire(&mut p, released, Some(live)), me0, "the released lease at a live moment");
    assert_real(&inquire(&mut p, expiring, Some(live)), me1, "the expired lease at a live moment");
    // Before they existed, after they ended, and by anyone else: refused.
    assert_refused(&inquire(&mut p, released, Some(before)), "the released lease, before it");
    assert_refused(&inquire(&mut p, expiring, Some(before)), "the expired lease, before it");
    assert_refused(&inquire(&mut p, released, Some(after)), "the released lease, after it ended");
    assert_refused(&inquire(&mut p, expiring, Some(after)), "the expired lease, after it ended");
    let mut t = authority(&topo.tp, &gw, GW_TP4);
    assert_refused(&inquire(&mut t, released, Some(live)), "the third party, at a live moment");
    assert_refused(&inquire(&mut t, expiring, Some(live)), "the third party, at a live moment");
    let mut h = authority(&c0, &gw, GW_LAN4);
    assert_refused(&inquire(&mut h, released, Some(live)), "the host itself, at a live moment");

    // The same refusal bytes for a past-time refusal as for any other.
    let mut raw = Lines::connect(&topo.srv, &gw, GW_WAN4);
    let id = Id::from(42);
    let cmd = Command::Inquire { virtual_addr: released, at: Some(before) };
    assert_eq!(raw.request(id.clone(), cmd), refusal_line(&id));
    let cmd = Command::Inquire { virtual_addr: expiring, at: Some(live) };
    let ok = raw.request(Id::from(43), cmd);
    assert_eq!(ok, format!(r#"{{"id":43,"ok":true,"real":"{me1}"}}"#));
}

// ---------------------------------------------------------------------------------------------
// 4: the answer travels encrypted
// ---------------------------------------------------------------------------------------------

/// One TCP segment of a capture.
struct Segment {
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

/// The TCP segments of a pcap file (Ethernet, Linux cooked v1/v2 or raw IP link types; IPv4
/// and IPv6 without extension headers), parsed just enough to find ports and payloads.
fn tcp_segments(pcap: &[u8]) -> Vec<Segment> {
    assert!(pcap.len() >= 24, "the capture file has no pcap header ({} bytes)", pcap.len());
    let magic = u32::from_le_bytes(pcap[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => panic!("not a pcap file (magic {m:#x})"),
    };
    let u32_at = |b: &[u8], o: usize| {
        let a: [u8; 4] = b[o..o + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let be16 = |b: &[u8], o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let linktype = u32_at(pcap, 20);
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= pcap.len() {
        let incl = u32_at(pcap, off + 8) as usize;
        let Some(frame) = pcap.get(off + 16..off + 16 + incl) else { break };
        off += 16 + incl;
        let (ethertype, l3) = match linktype {
            1 if frame.len() >= 14 => (be16(frame, 12), &frame[14..]),
            113 if frame.len() >= 16 => (be16(frame, 14), &frame[16..]),
            276 if frame.len() >= 20 => (be16(frame, 0), &frame[20..]),
            101 | 12 | 14 if !frame.is_empty() => {
                (if frame[0] >> 4 == 6 { 0x86dd } else { 0x0800 }, frame)
            }
            _ => continue,
        };
        let (src, dst, l4) = match ethertype {
            0x0800 if l3.len() >= 20 && l3[9] == 6 => {
                let ihl = usize::from(l3[0] & 0x0f) * 4;
                let total = usize::from(be16(l3, 2)).min(l3.len());
                let ip4 =
                    |o: usize| IpAddr::V4(Ipv4Addr::new(l3[o], l3[o + 1], l3[o + 2], l3[o + 3]));
                (ip4(12), ip4(16), l3.get(ihl..total).unwrap_or_default())
            }
            0x86dd if l3.len() >= 40 && l3[6] == 6 => {
                let total = (40 + usize::from(be16(l3, 4))).min(l3.len());
                let ip6 = |o: usize| {
                    let a: [u8; 16] = l3[o..o + 16].try_into().unwrap();
                    IpAddr::V6(Ipv6Addr::from(a))
                };
                (ip6(8), ip6(24), &l3[40..total])
            }
            _ => continue,
        };
        if l4.len() < 20 {
            continue;
        }
        let data_off = usize::from(l4[12] >> 4) * 4;
        out.push(Segment {
            src: SocketAddr::new(src, be16(l4, 0)),
            dst: SocketAddr::new(dst, be16(l4, 2)),
            payload: l4.get(data_off..).unwrap_or_default().to_vec(),
        });
    }
    out
}

#[test]
fn the_answer_never_crosses_the_wire_in_clear() {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let me = client_addr(0, false);
    let mut a = authority(&cli, &gw, GW_LAN4);
    let (v, _) = rent(&mut a, srv4(), None);

    let file = topo.lab.dir().join("authority.pcap");
    let cap = Capture::start(&topo.srv, "eth0", &file, &["tcp", "port", "7443"]);
    {
        let mut p = authority(&topo.srv, &gw, GW_WAN4);
        assert_real(&inquire(&mut p, v, None), me, "the partner");
        assert_real(&inquire(&mut p, v, Some(SystemTime::now())), me, "the partner, with at");
    } // close_notify
    std::thread::sleep(Duration::from_millis(300));
    let bytes = cap.finish();

    // The check can fail: the capture holds the exchange, both ways, with payload.
    let segs = tcp_segments(&bytes);
    let to_authority: usize =
        segs.iter().filter(|s| s.dst.port() == PORT).map(|s| s.payload.len()).sum();
    let from_authority: usize =
        segs.iter().filter(|s| s.src.port() == PORT).map(|s| s.payload.len()).sum();
    assert!(
        segs.len() >= 6 && to_authority > 0 && from_authority > 0,
        "the capture on the server's link misses the exchange: {} segments, {to_authority} \
         bytes to port 7443, {from_authority} bytes from it ({} bytes of pcap)",
        segs.len(),
        bytes.len()
    );
    assert!(
        segs.iter().all(|s| s.src.ip() == srv4() || s.src.ip() == GW_WAN4),
        "unexpected addresses in the capture"
    );
    // What a TLS record looks like: every payload from the authority is TLS records
    // (content type 0x14..0x17, version 0x0303).
    for s in segs.iter().filter(|s| s.src.port() == PORT && !s.payload.is_empty()) {
        assert!(
            (0x14..=0x17).contains(&s.payload[0]) && s.payload[1..3] == [3, 3],
            "a payload from the authority is not TLS: {:02x?}",
            &s.payload[..s.payload.len().min(16)]
        );
    }

    // The real address is in none of it: not as text, not as the four bytes.
    let text = me.to_string();
    let IpAddr::V4(me4) = me else { unreachable!() };
    for s in &segs {
        assert!(
            !contains(&s.payload, text.as_bytes()) && !contains(&s.payload, &me4.octets()),
            "{} appears in clear in a segment {} -> {}",
            text,
            s.src,
            s.dst
        );
    }
    assert!(!contains(&bytes, text.as_bytes()), "the text {text} appears in the capture file");
    assert!(!contains(&bytes, &me4.octets()), "the bytes of {me} appear in the capture file");
}

// ---------------------------------------------------------------------------------------------
// 5: kill -9, restart, every lease and quarantine back; locked and damaged databases
// ---------------------------------------------------------------------------------------------

/// Sends a datagram from `sock` to `to` every 10 ms until `stop` (at most 30 s).
fn keep_sending(
    sock: UdpSocket,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let _ = sock.send_to(b"tick", to);
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Receives on `sock` until `stop` (at most 30 s), recording each datagram's source and when.
fn keep_receiving(
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Instant, IpAddr)>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((_, from)) = recv(&sock, &mut buf) {
                seen.lock().unwrap().push((Instant::now(), from.ip()));
            }
        }
    })
}

#[test]
fn after_kill_9_every_lease_and_quarantine_is_back_and_the_way_back_still_works() {
    let mut topo = Topo::new(3);
    let mut gw = topo.gateway(&[]);
    let (c0, c1, c2) = (topo.clients[0].clone(), topo.clients[1].clone(), topo.clients[2].clone());
    let (me0, me1, me2) = (client_addr(0, false), client_addr(1, false), client_addr(2, false));

    // Client 0 rents towards the server, and rents and releases one towards the third party
    // (a quarantined address).
    let mut a0 = authority(&c0, &gw, GW_LAN4);
    let (v0, _) = rent(&mut a0, srv4(), None);
    let (gone, _) = rent(&mut a0, tp4(), None);
    assert_eq!(call(&mut a0, &Command::Release { virtual_addr: gone }).outcome, Outcome::Released);
    drop(a0);
    // Client 1 gets an implicit lease by sending.
    let u1 = udp(&c1, sa(me1, 4001));
    let s = udp(&topo.srv, sa(srv4(), 7000));
    let v1 = udp_roundtrip(&u1, &s).ip();
    let quarantined = gw.stats()["quarantined"].as_u64().unwrap();
    assert!(quarantined >= 1, "the released address is not quarantined: {}", gw.stats());

    // Client 0's traffic keeps flowing through the crash.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let flow_rx = udp(&topo.srv, sa(srv4(), 7002));
    let receiver = keep_receiving(flow_rx, stop.clone(), seen.clone());
    let sender = keep_sending(udp(&c0, sa(me0, 4000)), sa(srv4(), 7002), stop.clone());
    let flowing = Instant::now() + Duration::from_secs(3);
    while !seen.lock().unwrap().iter().any(|&(_, a)| a == v0) {
        assert!(Instant::now() < flowing, "client 0's flow never reached the server");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut expected = lease_set(&gw);
    assert_eq!(expected.len(), 2, "leases before the crash: {expected:?}");

    // Client 2's first packet makes an implicit lease; the moment the server has it, kill -9.
    let u2 = udp(&c2, sa(me2, 4002));
    let s2 = udp(&topo.srv, sa(srv4(), 7001));
    u2.send_to(b"first", sa(srv4(), 7001)).unwrap();
    let mut buf = [0u8; 64];
    let (_, seen2) = recv(&s2, &mut buf).expect("client 2's first packet never arrived");
    gw.crash();
    let v2 = seen2.ip();
    assert!(in_pool(v2), "client 2 went out as {v2}");
    expected.insert((me2.to_string(), v2.to_string(), srv4().to_string(), "implicit".into()));

    let gw2 = gw.restart(&mut topo.lab);
    let restarted = Instant::now();
    let log = gw2.log_text();
    let restored = format!("3 lease(s) and {quarantined} quarantined address(es) restored");
    assert!(log.contains(&restored), "expected {restored:?} in the log:\n{log}");
    assert_eq!(lease_set(&gw2), expected, "leases after the restart");
    assert_eq!(gw2.stats()["quarantined"].as_u64(), Some(quarantined), "{}", gw2.stats());

    // The flow resumes under the same virtual address.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.lock().unwrap().iter().any(|&(t, a)| t > restarted && a == v0) {
        assert!(Instant::now() < deadline, "client 0's flow did not resume as {v0}");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    receiver.join().unwrap();
    // Once the new daemon is up, client 0 is seen only as v0. (While no daemon runs, see
    // `a_crashed_gateway_never_lets_a_host_out_under_its_real_address`.)
    let settled = restarted + Duration::from_millis(200);
    let after: Vec<IpAddr> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|&&(t, a)| t > settled && a != v0)
        .map(|&(_, a)| a)
        .collect();
    assert!(after.is_empty(), "after the restart the server saw client 0 as {after:?}, not {v0}");

    // New connections from the server to addresses leased before the crash reach the hosts.
    let l0 = listen(&c0, sa(me0, 5000));
    let peer = tcp_roundtrip(&topo.srv, &l0, sa(v0, 5000));
    assert_eq!(peer.ip(), srv4(), "client 0 should see the server's real address");
    let knock = udp(&topo.srv, sa(srv4(), 0));
    for (v, sock, port) in [(v1, &u1, 4001), (v2, &u2, 4002)] {
        knock.send_to(b"knock", sa(v, port)).unwrap();
        let (n, from) = recv(sock, &mut buf)
            .unwrap_or_else(|e| panic!("the server's new UDP flow to {v}:{port} was lost ({e})"));
        assert_eq!((&buf[..n], from.ip()), (&b"knock"[..], srv4()));
    }

    // And the partner's inquiries are answered as before.
    let mut p = authority(&topo.srv, &gw2, GW_WAN4);
    assert_real(&inquire(&mut p, v0, None), me0, "after the restart, the rented lease");
    assert_real(&inquire(&mut p, v1, None), me1, "after the restart, the implicit lease");
    assert_real(&inquire(&mut p, v2, None), me2, "after the restart, the lease made at the crash");
    // The quarantined address is not handed to the third party for another host.
    let mut a1 = authority(&c1, &gw2, GW_LAN4);
    let (other, _) = rent(&mut a1, tp4(), None);
    assert_ne!(other, gone, "a quarantined address went to another host after the restart");
}

/// Between a crash (kill -9) and the restart, the gateway's policy rules are left behind but
/// its TUN device (and so the route of its table) is gone: a host's packets must not then be
/// forwarded under its real address, which the partner must never see.
#[test]
fn a_crashed_gateway_never_lets_a_host_out_under_its_real_address() {
    let mut topo = Topo::new(1);
    let mut gw = topo.gateway(&[]);
    let me = client_addr(0, false);
    let c = udp(&topo.clients[0], sa(me, 0));
    let s = udp(&topo.srv, sa(srv4(), 7000));
    let v = udp_roundtrip(&c, &s).ip();

    gw.crash();
    for _ in 0..10 {
        let _ = c.send_to(b"down?", sa(srv4(), 7000));
        std::thread::sleep(Duration::from_millis(30));
    }
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 64];
    let mut seen = Vec::new();
    while let Ok((_, from)) = recv(&s, &mut buf) {
        seen.push(from.ip());
    }
    let leaked: Vec<IpAddr> = seen.iter().copied().filter(|&a| in_lan(a)).collect();
    assert!(
        leaked.is_empty(),
        "with the daemon killed, {} of {} datagrams reached the server from the client's real \
         address {me} (the rules of priorities 7443..7448 fall through to the main table once \
         the TUN and the route of table 7443 are gone)",
        leaked.len(),
        seen.len()
    );

    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _gw = gw.restart(&mut topo.lab);
    assert_eq!(udp_roundtrip(&c, &s).ip(), v, "after the restart");
}

/// Spawns another daemon on `gw`'s state directory and expects it to refuse within 5 s.
fn refused_start(gw: &Daemon, lab: &mut Lab) -> String {
    let mut d = gw.spawn_again(lab);
    let status = d
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the daemon did not refuse to start:\n{}", d.log_text()));
    let log = d.log_text();
    assert!(!status.success(), "the daemon exited 0:\n{log}");
    assert!(!log.contains(" ready"), "the daemon got ready:\n{log}");
    log
}

#[test]
fn a_locked_or_damaged_lease_database_stops_the_daemon_with_a_clear_error() {
    let mut topo = Topo::new(1);
    let mut gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let mut a = authority(&cli, &gw, GW_LAN4);
    for h in 2..12u8 {
        rent(&mut a, IpAddr::V4(Ipv4Addr::new(203, 0, 113, h)), None);
    }
    drop(a);
    let leases = lease_set(&gw);
    assert_eq!(leases.len(), 10);

    // A second daemon on the same state directory while the first runs (on a band of its
    // own: the first one's band would refuse it before its state directory is looked at).
    let band = ["--tun", "vip1", "--route-table", "7600", "--rule-priority", "7600"];
    let mut d = gw.spawn_again_with(&mut topo.lab, &[&band[..], &["--no-authority"]].concat());
    let status = d.wait_exit(Duration::from_secs(5)).expect("the second daemon did not refuse");
    assert!(!status.success());
    let log = d.log_text();
    assert!(log.contains("locked by another process"), "log of the second daemon:\n{log}");
    assert_eq!(lease_set(&gw), leases, "the first daemon lost leases");

    let status = gw.stop();
    assert!(status.success(), "exit status {status}:\n{}", gw.log_text());
    let db = gw.state.join("leases.db");
    let pristine = std::fs::read(&db).unwrap();
    assert!(pristine.len() >= 3 * 4096, "leases.db is only {} bytes", pristine.len());
    let wal = gw.state.join("leases.db-wal");
    let wal_bytes = std::fs::read(&wal).ok();

    // Damage: garbage over the header; then garbage over every page but the first.
    let page = match u16::from_be_bytes([pristine[16], pristine[17]]) {
        1 => 65536,
        n => usize::from(n),
    };
    let garbage = |n: usize, seed: u8| -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(151).wrapping_add(seed) ^ 0x5a).collect()
    };
    let mut header = pristine.clone();
    header[..100].copy_from_slice(&garbage(100, 7));
    let mut middle = pristine.clone();
    let rest = middle.len() - page;
    middle[page..].copy_from_slice(&garbage(rest, 13));
    for (what, damaged) in [("header", header), ("pages after the first", middle)] {
        std::fs::write(&db, &damaged).unwrap();
        let log = refused_start(&gw, &mut topo.lab);
        assert!(
            log.contains("is damaged") && log.contains("move it away"),
            "garbage over the {what}: log of the refusing daemon:\n{log}"
        );
        assert!(
            !log.contains("restored"),
            "garbage over the {what}: it restored something:\n{log}"
        );
        assert!(std::fs::read(&db).unwrap() == damaged, "the refusing daemon modified leases.db");
    }

    // The pristine database starts again, with every lease.
    std::fs::write(&db, &pristine).unwrap();
    if let Some(w) = wal_bytes {
        std::fs::write(&wal, w).unwrap();
    }
    let mut gw2 = gw.restart(&mut topo.lab);
    assert!(gw2.log_text().contains("10 lease(s)"), "log:\n{}", gw2.log_text());
    assert_eq!(lease_set(&gw2), leases);

    // Fewer --max-leases than stored leases: refused in one sentence (exit 78), nothing
    // dropped; the database is untouched and the next start with room has every lease.
    assert!(gw2.stop().success(), "log:\n{}", gw2.log_text());
    let before = std::fs::read(&db).unwrap();
    let mut small = gw2.spawn_again_with(&mut topo.lab, &["--max-leases", "5"]);
    let status = small.wait_exit(Duration::from_secs(5)).expect("a small --max-leases started");
    let log = small.log_text();
    assert_eq!(status.code(), Some(78), "log:\n{log}");
    assert!(
        log.contains("10 current leases, more than --max-leases 5"),
        "the refusal names the flag, the count and the value:\n{log}"
    );
    assert!(!log.contains("not restored") && !log.contains(" ready"), "log:\n{log}");
    assert!(std::fs::read(&db).unwrap() == before, "the refusing daemon modified leases.db");
    let gw3 = gw2.restart(&mut topo.lab);
    assert_eq!(lease_set(&gw3), leases);
}

// ---------------------------------------------------------------------------------------------
// 6: hostile clients
// ---------------------------------------------------------------------------------------------

/// The gateway still forwards (a UDP round trip under `v`) and a good client's inquiry is
/// answered.
fn still_serving(topo: &Topo, gw: &Daemon, c: &UdpSocket, s: &UdpSocket, v: IpAddr) {
    assert_eq!(udp_roundtrip(c, s).ip(), v, "forwarding changed");
    let mut p = authority(&topo.srv, gw, GW_WAN4);
    assert_real(&inquire(&mut p, v, None), client_addr(0, false), "a good client");
}

#[test]
fn garbage_bad_json_overlong_lines_and_silence_get_an_error_or_a_close() {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let c = udp(&cli, sa(client_addr(0, false), 0));
    let s = udp(&topo.srv, sa(srv4(), 7000));
    let v = udp_roundtrip(&c, &s).ip();
    let tp = topo.tp.clone();

    // A connection that never sends anything.
    let silent_since = Instant::now();
    let mut silent = connect(&tp, sa(GW_TP4, PORT), IO_TIMEOUT).expect("TCP connect");

    // Plain text instead of TLS: closed.
    let mut plain = connect(&tp, sa(GW_TP4, PORT), IO_TIMEOUT).expect("TCP connect");
    plain.write_all(b"hello\r\n").unwrap();
    assert!(wait_closed(&mut plain, IO_TIMEOUT), "plain text instead of TLS: still open");
    still_serving(&topo, &gw, &c, &s, v);

    // Valid TLS, then lines that are not requests: bad_request, and the connection goes on.
    let mut l = Lines::connect(&tp, &gw, GW_TP4);
    for bad in [
        &b"hello"[..],
        b"{\"id\":5,\"cmd\":\"list\"}",
        b"{\"id\":6,\"cmd\":\"inquire\",\"virtual\":",
        b"[1,2,3]",
        b"\xff\xfe\x00garbage",
        b"{\"id\":7,\"cmd\":\"inquire\",\"virtual\":\"198.18.0.300\"}",
        b"{\"id\":8,\"cmd\":\"inquire\",\"virtual\":\"198.18.0.7\",\"at\":\"yesterday\"}",
        b"{\"id\":9,\"cmd\":\"rent\",\"partenr\":\"198.51.100.2\"}",
    ] {
        let reply = l.ask(bad);
        assert_eq!(
            code_of(&reply),
            Some(ErrorCode::BadRequest),
            "{:?} got {reply}",
            String::from_utf8_lossy(bad)
        );
    }
    let id = Id::from(10);
    let line = l.request(id.clone(), Command::Inquire { virtual_addr: v, at: None });
    assert_eq!(line, refusal_line(&id), "after bad lines, a well-formed inquiry");

    // A line over 64 KiB: too_long, then closed.
    let mut l = Lines::connect(&tp, &gw, GW_TP4);
    let mut long = br#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7","padding":""#.to_vec();
    long.resize(70_000, b'x');
    long.extend_from_slice(b"\"}\n");
    let sent = l.send(&long);
    let reply =
        l.line().unwrap_or_else(|| panic!("a 70000-byte line: closed without a reply ({sent:?})"));
    assert_eq!(code_of(&reply), Some(ErrorCode::TooLong), "a 70000-byte line got {reply}");
    assert!(reply.starts_with(r#"{"id":null,"#), "{reply}");
    let _ = l.send(b"{\"id\":2,\"cmd\":\"inquire\",\"virtual\":\"198.18.0.7\"}\n");
    assert!(l.line().is_none(), "the connection stayed open after too_long");
    still_serving(&topo, &gw, &c, &s, v);

    // The silent connection was open all along, and the daemon served everyone meanwhile;
    // it is closed at the handshake deadline (10 s).
    silent.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 16];
    let early = loop {
        match silent.read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other,
        }
    };
    match early {
        Err(e) if is_timeout(&e) => {}
        other => panic!("the silent connection was closed early ({other:?})"),
    }
    let left = Duration::from_secs(13).saturating_sub(silent_since.elapsed());
    assert!(wait_closed(&mut silent, left), "a silent connection stayed open over 13 s");
    assert!(
        silent_since.elapsed() >= Duration::from_secs(8),
        "the silent connection was closed after {:?}, before its handshake deadline",
        silent_since.elapsed()
    );
    still_serving(&topo, &gw, &c, &s, v);
}

#[test]
fn a_thousand_connections_at_once_do_not_stop_forwarding_or_good_clients() {
    const N: usize = 1000;
    const THREADS: usize = 8;
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let c = udp(&cli, sa(client_addr(0, false), 0));
    let s = udp(&topo.srv, sa(srv4(), 7000));
    let v = udp_roundtrip(&c, &s).ip();
    let started = Instant::now();

    // 1,000 connections from the third party's namespace, opened together.
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            spawn_in_ns(&topo.tp, || {
                (0..N / THREADS)
                    .map(|_| TcpStream::connect_timeout(&sa(GW_TP4, PORT), IO_TIMEOUT))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<io::Result<TcpStream>> =
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert_eq!(results.len(), N);
    let timed_out = results.iter().filter(|r| r.as_ref().is_err_and(is_timeout)).count();
    assert_eq!(
        timed_out, 0,
        "{timed_out} of {N} connects hung instead of being accepted or refused"
    );
    let mut open: Vec<TcpStream> = results.into_iter().filter_map(Result::ok).collect();
    let refused = N - open.len();

    // While they are all open: forwarding, ping and a good client.
    still_serving(&topo, &gw, &c, &s, v);
    ping_ok(&cli, srv4());

    // Each of them sends garbage and is closed.
    for sock in &mut open {
        let _ = sock.write_all(b"hello\r\n");
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut still_open = 0;
    for sock in &mut open {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        if !wait_closed(sock, left) {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open,
        0,
        "{still_open} of {} garbage connections were never closed",
        open.len()
    );
    drop(open);
    still_serving(&topo, &gw, &c, &s, v);
    eprintln!(
        "{N} connections: {} accepted, {refused} refused, handled in {:?}",
        N - refused,
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 7: rate limiting
// ---------------------------------------------------------------------------------------------

#[test]
fn inquiries_over_the_rate_are_refused_per_source_and_answered_again_later() {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&["--inquiry-rate", "5"]);
    let me = client_addr(0, false);
    let mut a = authority(&topo.clients[0], &gw, GW_LAN4);
    let (v, _) = rent(&mut a, srv4(), None);

    // A burst of 50 inquiries, all on one connection, sent at once.
    let mut p = Lines::connect(&topo.srv, &gw, GW_WAN4);
    let mut burst = Vec::new();
    for i in 0..50u64 {
        burst.extend(
            Request { id: Id::from(i), command: Command::Inquire { virtual_addr: v, at: None } }
                .to_line(),
        );
    }
    p.send(&burst).unwrap();
    let (mut answered, mut limited) = (0, 0);
    for i in 0..50u64 {
        let line = p.line().unwrap_or_else(|| panic!("closed after {i} replies"));
        let r = Reply::parse(line.as_bytes()).unwrap();
        assert_eq!(r.id, Id::from(i), "replies out of order: {line}");
        match r.outcome {
            Outcome::Real { real } => {
                assert_eq!(real, me);
                answered += 1;
            }
            Outcome::Error { code: ErrorCode::RateLimited, .. } => limited += 1,
            _ => panic!("unexpected reply in the burst: {line}"),
        }
    }
    assert!(
        (5..=20).contains(&answered) && limited >= 30,
        "--inquiry-rate 5: {answered} answered, {limited} rate_limited of 50"
    );

    // Another source is not limited by the partner's burst.
    let mut t = authority(&topo.tp, &gw, GW_TP4);
    assert_refused(&inquire(&mut t, v, None), "the third party during the partner's limit");

    // A moment later the partner is answered again.
    std::thread::sleep(Duration::from_millis(1500));
    let line = p.request(Id::from(99), Command::Inquire { virtual_addr: v, at: None });
    assert_eq!(line, format!(r#"{{"id":99,"ok":true,"real":"{me}"}}"#), "after 1.5 s");
}

// ---------------------------------------------------------------------------------------------
// 8: any address of the box, IPv4 and IPv6, with the pinned certificate
// ---------------------------------------------------------------------------------------------

#[test]
fn the_authority_answers_on_every_address_of_the_box_with_the_pinned_certificate() {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let (me4, me6) = (client_addr(0, false), client_addr(0, true));

    // The generated key is private; the certificate is what clients pin.
    let key = gw.state.join("tls").join("key.pem");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{} has mode {:o}", key.display(), mode & 0o777);

    // Rent over IPv4 and over IPv6 from the LAN side.
    let mut a4 = authority(&cli, &gw, GW_LAN4);
    let (v4, _) = rent(&mut a4, srv4(), None);
    let mut a6 = authority(&cli, &gw, GW_LAN6);
    let (v6, _) = rent(&mut a6, srv6(), None);
    assert!(v6.is_ipv6() && in_pool(v6), "IPv6 lease {v6}");
    // The client reaches the box's other addresses too (answers: it is not the partner).
    for at in [GW_WAN4, GW_WAN6, GW_TP4, GW_TP6] {
        let mut a = authority(&cli, &gw, at);
        assert_refused(&inquire(&mut a, v4, None), &format!("the host via {at}"));
    }

    // The partner, over each family, via the gateway's address on its link.
    let mut p4 = authority(&topo.srv, &gw, GW_WAN4);
    assert_real(&inquire(&mut p4, v4, None), me4, "the partner via 198.51.100.1");
    let mut p6 = authority(&topo.srv, &gw, GW_WAN6);
    assert_real(&inquire(&mut p6, v6, None), me6, "the partner via 2001:db8:2::1");
    // The source address is what counts: the IPv4 lease's partner is 198.51.100.2, not the
    // server's IPv6 address, and vice versa.
    assert_refused(&inquire(&mut p6, v4, None), "the server's IPv6 address about the IPv4 lease");
    assert_refused(&inquire(&mut p4, v6, None), "the server's IPv4 address about the IPv6 lease");

    // Traffic uses the leases.
    let c = udp(&cli, sa(me6, 0));
    let s = udp(&topo.srv, sa(srv6(), 7000));
    assert_eq!(udp_roundtrip(&c, &s).ip(), v6);

    // A client pinning another certificate (same name, another key) refuses the box.
    let other = topo.lab.dir().join("other.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["vipgate-authority".to_string()]).unwrap();
    std::fs::write(&other, cert.cert.pem()).unwrap();
    for (ns, at) in [(&topo.srv, GW_WAN4), (&cli, GW_LAN6)] {
        let to = sa(at, PORT);
        let r = in_ns(ns, || AuthorityClient::connect(to, &other, IO_TIMEOUT));
        let e = r.expect_err("a client pinning another certificate accepted the authority");
        assert!(format!("{e:#}").contains("certificate"), "{e:#}");
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's revoke, over the control socket only
// ---------------------------------------------------------------------------------------------

#[test]
fn the_operator_revokes_a_lease_over_the_control_socket() {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let me = client_addr(0, false);
    let mut host = authority(&cli, &gw, GW_LAN4);
    let (v, _) = rent(&mut host, srv4(), Some(600));
    let mut partner = authority(&topo.srv, &gw, GW_WAN4);
    assert_real(&inquire(&mut partner, v, None), me, "before the revoke");
    let live = SystemTime::now();

    let out = output(
        BIN,
        &[
            "revoke",
            "--control-socket",
            gw.control.to_str().unwrap(),
            "--virtual",
            &v.to_string(),
            "--json",
        ],
    );
    assert!(out.status.success(), "revoke failed: {}", String::from_utf8_lossy(&out.stderr));
    let revoked: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0]["real"], me.to_string());

    assert!(!has_lease(&gw, me, v, srv4(), "explicit"), "still leased: {:?}", lease_set(&gw));
    assert_refused(&inquire(&mut partner, v, None), "after the revoke");
    // The history keeps it: asked about a moment it was live, the partner is still answered.
    assert_real(&inquire(&mut partner, v, Some(live)), me, "about a moment before the revoke");
}

// ---------------------------------------------------------------------------------------------
// `vipgate authority`: the authority alone, no TUN, no routing
// ---------------------------------------------------------------------------------------------

#[test]
fn the_authority_runs_alone_without_a_data_plane() {
    let mut lab = Lab::new();
    let (auth, cli, srv) = (lab.netns("auth"), lab.netns("cli"), lab.netns("srv"));
    lab.veth(&auth, "lan0", &cli, "eth0");
    lab.veth(&auth, "wan0", &srv, "eth0");
    ip(&auth, &["addr", "add", "192.0.2.1/24", "dev", "lan0"]);
    ip(&auth, &["addr", "add", "198.51.100.1/24", "dev", "wan0"]);
    ip(&cli, &["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    ip(&srv, &["addr", "add", "198.51.100.2/24", "dev", "eth0"]);
    for (ns, dev) in [(&auth, "lan0"), (&auth, "wan0"), (&cli, "eth0"), (&srv, "eth0")] {
        ip(ns, &["link", "set", dev, "up"]);
    }
    let d = Daemon::start_authority(&mut lab, &auth, &["--lan", LAN4, "--pool", POOL4]);
    assert!(d.log_text().contains("no data plane"), "{}", d.log_text());
    assert!(!ip(&auth, &["link", "show"]).contains("vip0"), "the authority alone made a TUN");
    assert!(!ip(&auth, &["rule", "show"]).contains("7443"), "the authority alone added rules");

    let me: IpAddr = "192.0.2.10".parse().unwrap();
    let mut host = authority(&cli, &d, GW_LAN4);
    let (v, _) = rent(&mut host, srv4(), Some(600));
    assert!(in_pool(v), "rented {v}");
    let mut partner = authority(&srv, &d, GW_WAN4);
    assert_real(&inquire(&mut partner, v, None), me, "the partner asking the lone authority");
    assert!(has_lease(&d, me, v, srv4(), "explicit"), "{:?}", lease_set(&d));
}

// ---------------------------------------------------------------------------------------------
// A client that never reads its replies only fills its own TCP window
// ---------------------------------------------------------------------------------------------

#[test]
fn a_client_that_never_reads_does_not_hold_up_the_others() {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&["--inquiry-rate", "1000000"]);
    let cli = topo.clients[0].clone();
    let me = client_addr(0, false);
    let mut host = authority(&cli, &gw, GW_LAN4);
    let (v, _) = rent(&mut host, srv4(), Some(600));

    // The partner pipes inquiries without ever reading: at most 5 s or 200,000 lines, until
    // its writes block because the authority stopped reading it.
    let mut flood = Lines::connect(&topo.srv, &gw, GW_WAN4);
    flood.tls.sock.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let line = format!("{{\"id\":1,\"cmd\":\"inquire\",\"virtual\":\"{v}\"}}\n").repeat(100);
    let (start, mut sent, mut blocked) = (Instant::now(), 0usize, false);
    while start.elapsed() < Duration::from_secs(5) && sent < 200_000 {
        match flood.send(line.as_bytes()) {
            Ok(()) => sent += 100,
            Err(_) => {
                blocked = true;
                break;
            }
        }
    }
    assert!(blocked, "the authority kept reading a client that never reads ({sent} requests)");

    // Meanwhile everyone else is served.
    let mut partner = authority(&topo.srv, &gw, GW_WAN4);
    assert_real(&inquire(&mut partner, v, None), me, "a good client beside the flood");
    let c = udp(&cli, sa(me, 4300));
    let s = udp(&topo.srv, sa(srv4(), 7300));
    assert_eq!(udp_roundtrip(&c, &s).ip(), v, "forwarding beside the flood");
}

#[test]
fn one_source_flooding_the_authority_never_keeps_a_host_of_the_lan_from_renting() {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    // The flood's sockets live in this process: room for them.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let room = lim.maximum.unwrap_or(65_536).min(65_536);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit { current: Some(room), maximum: lim.maximum },
    )
    .unwrap();
    let at = sa(GW_WAN4, PORT);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (srv, stop) = (topo.srv.clone(), stop.clone());
        std::thread::spawn(move || {
            enter(&srv);
            let (mut held, mut opened) = (Vec::new(), 0u32);
            let deadline = Instant::now() + Duration::from_secs(20);
            // 5,000 idle connections from one source, kept open, bounded in count and time.
            while opened < 5_000 && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                if let Ok(s) = TcpStream::connect_timeout(&at, Duration::from_millis(300)) {
                    held.push(s);
                    opened += 1;
                }
            }
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let cli = topo.clients[0].clone();
    let mut failed = Vec::new();
    for k in 0..8u8 {
        let partner = IpAddr::from([203, 0, 113, 10 + k]);
        let ca = ca(&gw);
        let r = in_ns(&cli, || {
            let mut c = AuthorityClient::connect(sa(GW_LAN4, PORT), &ca, IO_TIMEOUT)?;
            c.call(&Command::Rent { partner, ttl: Some(Duration::from_secs(60)) })
        });
        match r {
            Ok(r) if matches!(r.outcome, Outcome::Leased { .. }) => {}
            Ok(r) => failed.push(r.to_string()),
            Err(e) => failed.push(format!("{e:#}")),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    let opened = flood.join().unwrap();
    assert!(opened >= 1_000, "the flood opened only {opened} connections");
    assert!(failed.is_empty(), "{} of 8 rents failed under the flood: {failed:?}", failed.len());
    assert!(gw.counter("authority_refused_connections") > 0, "{}", gw.stats());
}

#[test]
fn one_host_churning_rents_is_rate_limited_and_another_host_is_not() {
    let mut topo = Topo::new(2);
    let gw = topo.gateway(&["--rent-rate", "10"]);
    let churn = |ns: &str, count: u8| {
        let mut c = authority(ns, &gw, GW_LAN4);
        let (mut ok, mut limited) = (0, 0);
        for k in 0..count {
            let partner = IpAddr::from([203, 0, 113, 10 + k]);
            let r = call(&mut c, &Command::Rent { partner, ttl: Some(Duration::from_secs(60)) });
            match r.outcome {
                Outcome::Leased { virtual_addr, .. } => {
                    ok += 1;
                    let _ = call(&mut c, &Command::Release { virtual_addr });
                }
                Outcome::Error { code: ErrorCode::RateLimited, .. } => limited += 1,
                _ => panic!("rent from {ns}: {r}"),
            }
        }
        (ok, limited)
    };
    // 60 rents and their releases at once: the burst (20) and a little more go through.
    let (ok, limited) = churn(&topo.clients[0], 60);
    assert!(limited > 0 && ok >= 5, "{ok} ok, {limited} rate-limited");
    assert!(gw.counter("rents_rate_limited") >= limited, "{}", gw.stats());
    // Another host is not held back by the first one's churn.
    let (ok2, limited2) = churn(&topo.clients[1], 5);
    assert_eq!((ok2, limited2), (5, 0));
}
