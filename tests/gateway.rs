//! End-to-end tests of `vipgate gateway`: the real binary in network namespaces, real
//! traffic from Rust sockets, `ping` and raw ICMP sockets.
//!
//! Needs root (network namespaces, TUN devices), `ip` and `ping`; fails, never skips,
//! without them. Addresses only from the documentation and benchmarking ranges; nothing
//! outside the namespaces each test creates (and removes) is touched. See
//! `tests/common/netns.rs` for the harness and the topology.

mod common;

use common::netns::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn server(v6: bool) -> IpAddr {
    if v6 {
        SRV6.into()
    } else {
        SRV4.into()
    }
}

/// Panics unless `a`, what a partner saw, is a virtual address (never a real one).
fn assert_virtual(a: IpAddr, what: &str) {
    assert!(in_pool(a) && !in_lan(a), "{what}: saw {a}, expected a virtual address from the pool");
}

/// `ping -c 2` from `ns` to `dst`.
fn ping(ns: &str, dst: IpAddr, count: &str) -> std::process::Output {
    let fam = if dst.is_ipv6() { "-6" } else { "-4" };
    exec_in(
        ns,
        "ping",
        &[fam, "-n", "-c", count, "-i", "0.2", "-W", "2", &dst.to_string()],
        Duration::from_secs(10),
    )
}

/// The lines of `ip rule show` (both families) in the gateway's priority band 7443..7448.
fn band_rules(ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    for fam in ["-4", "-6"] {
        for l in ip(ns, &[fam, "rule", "show"]).lines() {
            let prio = l.split(':').next().and_then(|p| p.trim().parse::<u32>().ok());
            if prio.is_some_and(|p| (7443..=7448).contains(&p)) {
                out.push(format!("{fam} {l}"));
            }
        }
    }
    out
}

/// Routes in table 7443 (both families).
fn table_routes(ns: &str) -> String {
    let mut out = String::new();
    for fam in ["-4", "-6"] {
        let o = output("ip", &["-n", ns, fam, "route", "show", "table", "7443"]);
        out += &String::from_utf8_lossy(&o.stdout);
    }
    out
}

fn tun_exists(ns: &str) -> bool {
    output("ip", &["-n", ns, "link", "show", "vip0"]).status.success()
}

/// Panics unless nothing of the gateway is left in `ns`.
fn assert_clean(ns: &str) {
    let rules = band_rules(ns);
    assert!(rules.is_empty(), "rules left at priorities 7443..7448: {rules:#?}");
    let routes = table_routes(ns);
    assert!(routes.trim().is_empty(), "routes left in table 7443: {routes}");
    assert!(!tun_exists(ns), "TUN device vip0 still exists in {ns}");
}

// ---------------------------------------------------------------------------------------------
// 1 and 6: TCP, UDP and ICMP echo out, replies back
// ---------------------------------------------------------------------------------------------

fn outbound(v6: bool) {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let (me, srv) = (client_addr(0, v6), server(v6));

    let c = udp(&cli, sa(me, 0));
    let s = udp(&topo.srv, sa(srv, 7000));
    let seen = udp_roundtrip(&c, &s);
    assert_virtual(seen.ip(), "UDP: the server");

    let l = listen(&topo.srv, sa(srv, 7001));
    let peer = tcp_roundtrip(&cli, &l, sa(srv, 7001));
    assert_virtual(peer.ip(), "TCP: the server");

    let raw = raw_icmp(&topo.srv, v6);
    let o = ping(&cli, srv, "2");
    assert!(
        o.status.success(),
        "ping {srv} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let sources = echo_request_sources(&raw, v6);
    assert!(sources.len() >= 2, "the server saw {} echo requests, expected 2", sources.len());
    for a in sources {
        assert_virtual(a, "ICMP echo: the server");
    }

    let st = gw.stats();
    assert!(st["outbound"].as_u64().unwrap() >= 5 && st["inbound"].as_u64().unwrap() >= 5, "{st}");
}

#[test]
fn v4_tcp_udp_and_ping_go_out_under_a_virtual_address() {
    outbound(false);
}

#[test]
fn v6_tcp_udp_and_ping_go_out_under_a_virtual_address() {
    outbound(true);
}

// ---------------------------------------------------------------------------------------------
// 2 and 6: the partner connects back to the virtual address it saw
// ---------------------------------------------------------------------------------------------

fn reverse(v6: bool) {
    let mut topo = Topo::new(1);
    let _gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    let (me, srv) = (client_addr(0, v6), server(v6));

    let c = udp(&cli, sa(me, 4000));
    let s = udp(&topo.srv, sa(srv, 7000));
    let v = udp_roundtrip(&c, &s).ip();
    assert_virtual(v, "the server");

    // A new TCP connection from the server to the virtual address reaches the client.
    let l = listen(&cli, sa(me, 5000));
    let peer = tcp_roundtrip(&topo.srv, &l, sa(v, 5000));
    assert_eq!(peer.ip(), srv, "the client should see the server's real address");

    // And a new UDP flow from another server port.
    let c2 = udp(&cli, sa(me, 4001));
    let s2 = udp(&topo.srv, sa(srv, 0));
    s2.send_to(b"knock", sa(v, 4001)).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = c2
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("server's new UDP flow to {v}:4001 never arrived ({e})"));
    assert_eq!((&buf[..n], from.ip()), (&b"knock"[..], srv));
    c2.send_to(b"who", from).unwrap();
    let (n, back) =
        s2.recv_from(&mut buf).unwrap_or_else(|e| panic!("no answer to the server ({e})"));
    assert_eq!((&buf[..n], back), (&b"who"[..], sa(v, 4001)));
}

#[test]
fn v4_partner_connects_back_to_the_virtual_address() {
    reverse(false);
}

#[test]
fn v6_partner_connects_back_to_the_virtual_address() {
    reverse(true);
}

// ---------------------------------------------------------------------------------------------
// 3: filtering
// ---------------------------------------------------------------------------------------------

#[test]
fn filtering_partner_shuts_out_third_parties_and_any_lets_them_in() {
    let mut topo = Topo::new(1);
    let cli = topo.clients[0].clone();
    let me = client_addr(0, false);
    let c = udp(&cli, sa(me, 4000));
    let c_in = udp(&cli, sa(me, 4001));
    let c_tcp = listen(&cli, sa(me, 5000));
    let s = udp(&topo.srv, sa(SRV4.into(), 7000));
    let t = udp(&topo.tp, sa(TP4.into(), 0));
    let mut buf = [0u8; 64];

    let mut gw = topo.gateway(&[]);
    let v = udp_roundtrip(&c, &s).ip();
    assert_virtual(v, "the server");
    t.send_to(b"intruder", sa(v, 4001)).unwrap();
    let r = connect(&topo.tp, sa(v, 5000), QUIET);
    assert!(
        r.is_err(),
        "--filtering partner: the third party's TCP connection to {v} went through"
    );
    c_in.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    match c_in.recv_from(&mut buf) {
        Err(e) if is_timeout(&e) => {}
        other => panic!("--filtering partner: third-party UDP reached the client: {other:?}"),
    }
    assert!(accept(&c_tcp, Duration::from_millis(50)).is_err(), "TCP reached the client");
    assert!(gw.drops("filtered") >= 2, "stats: {}", gw.stats());
    assert!(gw.stop().success(), "exit status:\n{}", gw.log_text());

    let _gw = topo.gateway(&["--filtering", "any"]);
    let v = udp_roundtrip(&c, &s).ip();
    assert_virtual(v, "the server");
    t.send_to(b"friend", sa(v, 4001)).unwrap();
    c_in.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (n, from) = c_in
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("--filtering any: third-party UDP to {v} never arrived ({e})"));
    assert_eq!((&buf[..n], from.ip()), (&b"friend"[..], IpAddr::from(TP4)));
    let peer = tcp_roundtrip(&topo.tp, &c_tcp, sa(v, 5000));
    assert_eq!(peer.ip(), IpAddr::from(TP4));
}

// ---------------------------------------------------------------------------------------------
// 4: mapping policy
// ---------------------------------------------------------------------------------------------

#[test]
fn mapping_per_partner_hides_the_host_and_per_host_shares_one_address() {
    let mut topo = Topo::new(1);
    let cli = topo.clients[0].clone();
    let me = client_addr(0, false);
    let c = udp(&cli, sa(me, 4000));
    let s = udp(&topo.srv, sa(SRV4.into(), 7000));
    let t = udp(&topo.tp, sa(TP4.into(), 7000));

    let mut gw = topo.gateway(&[]);
    let (a, b) = (udp_roundtrip(&c, &s).ip(), udp_roundtrip(&c, &t).ip());
    assert_virtual(a, "the server");
    assert_virtual(b, "the third party");
    assert_ne!(a, b, "--mapping per-partner: both partners saw the same virtual address");
    assert_eq!(gw.virtual_of(me, SRV4.into()), a);
    assert_eq!(gw.virtual_of(me, TP4.into()), b);
    assert!(gw.stop().success());

    let _gw = topo.gateway(&["--mapping", "per-host"]);
    let (a, b) = (udp_roundtrip(&c, &s).ip(), udp_roundtrip(&c, &t).ip());
    assert_virtual(a, "the server");
    assert_eq!(a, b, "--mapping per-host: the partners saw different virtual addresses");
}

// ---------------------------------------------------------------------------------------------
// 5 and 6: ICMP errors come back translated
// ---------------------------------------------------------------------------------------------

/// A connected UDP socket in `ns` sending to a closed port of `srv` gets ECONNREFUSED from
/// the translated port unreachable.
fn assert_port_unreachable(ns: &str, me: IpAddr, srv: IpAddr) {
    let c = udp(ns, sa(me, 0));
    c.connect(sa(srv, 7999)).unwrap();
    c.send(b"anyone?").unwrap();
    let mut buf = [0u8; 64];
    let e = c.recv(&mut buf).expect_err("a closed port answered");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "expected ECONNREFUSED from the translated port unreachable, got {e}"
    );
}

/// Sends 1400-byte datagrams with DF on connected socket `c` until it has learned path MTU
/// 1280 (bounded: 3 s); returns the last path MTU the socket reported.
fn probe_pmtu(c: &UdpSocket, v6: bool) -> i32 {
    let (level, discover, dont_fragment, mtu_opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO, libc::IP_MTU)
    };
    set_int_opt(c, level, discover, dont_fragment);
    let big = vec![0x5au8; 1400];
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut mtu = 0;
    while Instant::now() < deadline {
        match c.send(&big) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
            Err(e) => panic!("send 1400 bytes: {e}"),
        }
        for _ in 0..15 {
            std::thread::sleep(Duration::from_millis(20));
            mtu = get_int_opt(c, level, mtu_opt).unwrap();
            if mtu == 1280 {
                return mtu;
            }
        }
    }
    mtu
}

/// From `ns`, 1400-byte datagrams with DF to `srv` (behind a 1280-byte link) teach the client
/// path MTU 1280; then a 1400-byte send fails with EMSGSIZE and `ip route get` shows it.
fn assert_learns_pmtu(ns: &str, me: IpAddr, srv: IpAddr, gw: &Daemon) {
    let c = udp(ns, sa(me, 0));
    c.connect(sa(srv, 7000)).unwrap();
    let mtu = probe_pmtu(&c, srv.is_ipv6());
    assert_eq!(mtu, 1280, "the client never learned the path MTU to {srv} (stats: {})", gw.stats());
    let e = c.send(&[0x5au8; 1400]).expect_err("1400 bytes with DF after learning MTU 1280");
    assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE), "{e}");
    let route = ip(ns, &["route", "get", &srv.to_string()]);
    assert!(route.contains("mtu 1280"), "ip route get {srv}: {route}");
}

fn port_unreachable(v6: bool) {
    let mut topo = Topo::new(1);
    let gw = topo.gateway(&[]);
    assert_port_unreachable(&topo.clients[0], client_addr(0, v6), server(v6));
    assert!(gw.counter("icmp_errors_translated") >= 1, "stats: {}", gw.stats());
}

#[test]
fn v4_port_unreachable_comes_back_as_econnrefused() {
    port_unreachable(false);
}

#[test]
fn v6_port_unreachable_comes_back_as_econnrefused() {
    port_unreachable(true);
}

/// The gateway–server link has MTU 1280, so the gateway box itself sends "fragmentation
/// needed" / "packet too big" to the virtual address; with [`Topo::new`] it sends them from
/// its WAN address 198.51.100.1 / 2001:db8:2::1.
fn pmtu_from_the_gateways_wan_address(v6: bool) {
    let mut topo = Topo::new(1);
    topo.set_server_link_mtu(1280);
    let gw = topo.gateway(&[]);
    assert_learns_pmtu(&topo.clients[0], client_addr(0, v6), server(v6), &gw);
    assert!(gw.counter("icmp_errors_translated") >= 1, "stats: {}", gw.stats());
}

#[test]
fn v4_fragmentation_needed_from_the_gateways_wan_address_reaches_the_client() {
    pmtu_from_the_gateways_wan_address(false);
}

#[test]
fn v6_packet_too_big_from_the_gateways_wan_address_reaches_the_client() {
    pmtu_from_the_gateways_wan_address(true);
}

/// The same path-MTU check when the gateway box sends "fragmentation needed" / "packet too
/// big" from its LAN address (inside the served prefix).
fn pmtu_from_the_gateways_lan_address(v6: bool) {
    let mut topo = Topo::lan_first(1);
    topo.set_server_link_mtu(1280);
    let gw = topo.gateway(&[]);
    assert_learns_pmtu(&topo.clients[0], client_addr(0, v6), server(v6), &gw);
}

#[test]
fn v4_fragmentation_needed_from_the_gateways_lan_address_reaches_the_client() {
    pmtu_from_the_gateways_lan_address(false);
}

#[test]
fn v6_packet_too_big_from_the_gateways_lan_address_reaches_the_client() {
    pmtu_from_the_gateways_lan_address(true);
}

/// Path MTU when the small link is behind a router beyond the gateway:
/// cli — gw — rtr — srv, the rtr–srv link at 1280 bytes.
fn pmtu_from_a_router_beyond_the_gateway(v6: bool) {
    let mut lab = Lab::new();
    let cli = lab.netns("c0");
    let gw = lab.gateway_netns("gw");
    let rtr = lab.netns("rtr");
    sysctl(&rtr, &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
    let srv = lab.netns("srv");
    lab.veth(&gw, "lan0", &cli, "eth0");
    lab.veth(&gw, "wan0", &rtr, "eth0");
    lab.veth(&rtr, "eth1", &srv, "eth0");
    ip_batch(
        &cli,
        "addr add 192.0.2.10/24 dev eth0\naddr add 2001:db8:1::a/64 dev eth0 nodad\n\
         link set eth0 up\nroute add default via 192.0.2.1\nroute add default via 2001:db8:1::1\n",
    );
    ip_batch(
        &gw,
        "addr add 192.0.2.1/24 dev lan0\naddr add 2001:db8:1::1/64 dev lan0 nodad\n\
         link set lan0 up\n\
         addr add 198.51.100.1/24 dev wan0\naddr add 2001:db8:2::1/64 dev wan0 nodad\n\
         link set wan0 up\n\
         route add default via 198.51.100.3\nroute add default via 2001:db8:2::3\n",
    );
    ip_batch(
        &rtr,
        "addr add 198.51.100.3/24 dev eth0\naddr add 2001:db8:2::3/64 dev eth0 nodad\n\
         link set eth0 up\n\
         addr add 203.0.113.1/24 dev eth1\naddr add 2001:db8:3::1/64 dev eth1 nodad\n\
         link set eth1 mtu 1280 up\n\
         route add 198.18.0.0/24 via 198.51.100.1\nroute add 2001:db8:ff::/64 via 2001:db8:2::1\n",
    );
    ip_batch(
        &srv,
        "addr add 203.0.113.2/24 dev eth0\naddr add 2001:db8:3::2/64 dev eth0 nodad\n\
         link set eth0 mtu 1280 up\n\
         route add 198.18.0.0/24 via 203.0.113.1\nroute add 2001:db8:ff::/64 via 2001:db8:3::1\n",
    );
    let d = Daemon::start(
        &mut lab,
        &gw,
        &["--lan", LAN4, "--lan", LAN6, "--pool", POOL4, "--pool", POOL6],
    );
    let far: IpAddr = if v6 { TP6.into() } else { TP4.into() };
    assert_learns_pmtu(&cli, client_addr(0, v6), far, &d);
    assert!(d.counter("icmp_errors_translated") >= 1, "stats: {}", d.stats());
}

#[test]
fn v4_fragmentation_needed_from_a_router_beyond_the_gateway_reaches_the_client() {
    pmtu_from_a_router_beyond_the_gateway(false);
}

#[test]
fn v6_packet_too_big_from_a_router_beyond_the_gateway_reaches_the_client() {
    pmtu_from_a_router_beyond_the_gateway(true);
}

/// The other direction: the client's link has MTU 1280 and the server sends 1400 bytes with
/// DF to the virtual address. The gateway's "fragmentation needed" / "packet too big" must
/// reach the server about the packet the server sent (to the virtual address), so the server
/// learns the path MTU, and must not reveal the client's real address.
fn pmtu_towards_the_host(v6: bool) {
    let mut topo = Topo::new(1);
    topo.set_client_link_mtu(0, 1280);
    let gw = topo.gateway(&[]);
    let (me, srv) = (client_addr(0, v6), server(v6));
    let c = udp(&topo.clients[0], sa(me, 4000));
    let s = udp(&topo.srv, sa(srv, 7000));
    let v = udp_roundtrip(&c, &s).ip();

    let raw = raw_icmp(&topo.srv, v6);
    let s2 = udp(&topo.srv, sa(srv, 0));
    s2.connect(sa(v, 4000)).unwrap();
    let mtu = probe_pmtu(&s2, v6);
    let errors = icmp_messages(&raw, v6);
    let show = |(src, m): &(IpAddr, Vec<u8>)| {
        format!("from {src}: {:02x?}..", &m[..m.len().min(if v6 { 48 } else { 28 })])
    };
    let leaks: Vec<_> = errors.iter().filter(|(_, m)| mentions(m, me)).map(show).collect();
    assert!(
        leaks.is_empty(),
        "ICMP errors reaching the server reveal the client's real address {me}: {leaks:?}"
    );
    assert_eq!(
        mtu,
        1280,
        "the server never learned the path MTU to {v}; ICMP it got: {:?}; stats: {}",
        errors.iter().map(show).collect::<Vec<_>>(),
        gw.stats()
    );
}

#[test]
fn v4_fragmentation_needed_towards_the_host_reaches_the_server_translated() {
    pmtu_towards_the_host(false);
}

#[test]
fn v6_packet_too_big_towards_the_host_reaches_the_server_translated() {
    pmtu_towards_the_host(true);
}

// ---------------------------------------------------------------------------------------------
// 7: hairpinning
// ---------------------------------------------------------------------------------------------

fn hairpin(v6: bool) {
    let mut topo = Topo::new(2);
    let gw = topo.gateway(&["--filtering", "any"]);
    let (a_ns, b_ns) = (topo.clients[0].clone(), topo.clients[1].clone());
    let (a, b, srv) = (client_addr(0, v6), client_addr(1, v6), server(v6));

    // B talks to the server first and so has a virtual address.
    let b_udp = udp(&b_ns, sa(b, 4000));
    let s = udp(&topo.srv, sa(srv, 7000));
    let seen = udp_roundtrip(&b_udp, &s);
    let vb = gw.virtual_of(b, srv);
    assert_eq!(seen.ip(), vb, "leases disagree with what the server saw");

    // A reaches B through V_B and B sees A under a virtual address.
    let a_udp = udp(&a_ns, sa(a, 0));
    a_udp.send_to(b"hairpin", sa(vb, 4000)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = b_udp
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("A's UDP to V_B {vb} never reached B ({e})"));
    assert_eq!(&buf[..n], b"hairpin");
    assert_virtual(from.ip(), "B");
    b_udp.send_to(b"back", from).unwrap();
    let (n, back) =
        a_udp.recv_from(&mut buf).unwrap_or_else(|e| panic!("B's answer never reached A ({e})"));
    assert_eq!((&buf[..n], back), (&b"back"[..], sa(vb, 4000)));

    let l = listen(&b_ns, sa(b, 5000));
    let peer = tcp_roundtrip(&a_ns, &l, sa(vb, 5000));
    assert_virtual(peer.ip(), "B (TCP)");
    assert!(gw.counter("hairpinned") >= 4, "stats: {}", gw.stats());
}

#[test]
fn v4_hairpin_between_two_clients_through_a_virtual_address() {
    hairpin(false);
}

#[test]
fn v6_hairpin_between_two_clients_through_a_virtual_address() {
    hairpin(true);
}

// ---------------------------------------------------------------------------------------------
// 8: two gateways in series
// ---------------------------------------------------------------------------------------------

#[test]
fn cascade_of_two_gateways_and_the_way_back_through_both() {
    let mut lab = Lab::new();
    let cli = lab.netns("c0");
    let gw1 = lab.gateway_netns("gwa");
    let gw2 = lab.gateway_netns("gwb");
    let srv = lab.netns("srv");
    lab.veth(&gw1, "lan0", &cli, "eth0");
    lab.veth(&gw1, "wan0", &gw2, "lan0");
    lab.veth(&gw2, "wan0", &srv, "eth0");
    ip_batch(
        &cli,
        "addr add 192.0.2.10/24 dev eth0\nlink set eth0 up\nroute add default via 192.0.2.1\n",
    );
    ip_batch(
        &gw1,
        "addr add 192.0.2.1/24 dev lan0\nlink set lan0 up\n\
         addr add 203.0.113.1/24 dev wan0\nlink set wan0 up\n\
         route add default via 203.0.113.2\n",
    );
    ip_batch(
        &gw2,
        "addr add 203.0.113.2/24 dev lan0\nlink set lan0 up\n\
         addr add 198.51.100.1/24 dev wan0\nlink set wan0 up\n\
         route add 198.18.1.0/24 via 203.0.113.1\n",
    );
    ip_batch(
        &srv,
        "addr add 198.51.100.2/24 dev eth0\nlink set eth0 up\n\
         route add 198.19.0.0/24 via 198.51.100.1\n",
    );
    let d1 = Daemon::start(&mut lab, &gw1, &["--lan", LAN4, "--pool", "198.18.1.0/24"]);
    let d2 = Daemon::start(&mut lab, &gw2, &["--lan", "198.18.1.0/24", "--pool", "198.19.0.0/24"]);

    let me = client_addr(0, false);
    let c = udp(&cli, sa(me, 4000));
    let s = udp(&srv, sa(SRV4.into(), 7000));
    let v2 = udp_roundtrip(&c, &s).ip();
    assert!(within(v2, "198.19.0.0/24"), "the server saw {v2}, expected gw2's pool 198.19.0.0/24");
    let v1 = d1.virtual_of(me, SRV4.into());
    assert!(within(v1, "198.18.1.0/24"), "gw1 lease {v1}");
    assert_eq!(d2.virtual_of(v1, SRV4.into()), v2, "gw2's lease should map gw1's virtual {v1}");

    let l = listen(&cli, sa(me, 5000));
    let peer = tcp_roundtrip(&srv, &l, sa(v2, 5000));
    assert_eq!(peer.ip(), IpAddr::from(SRV4), "the client should see the server's real address");
}

// ---------------------------------------------------------------------------------------------
// 9: pool exhaustion
// ---------------------------------------------------------------------------------------------

#[test]
fn exhausted_pool_answers_3_13_and_existing_leases_keep_working() {
    let mut topo = Topo::new(3);
    let pool = "198.18.0.4/31";
    let gw = topo.gateway_with(&["--lan", LAN4, "--pool", pool, "--mapping", "per-host"]);
    let s = udp(&topo.srv, sa(SRV4.into(), 7000));
    let socks: Vec<UdpSocket> =
        (0..3).map(|i| udp(&topo.clients[i], sa(client_addr(i, false), 0))).collect();

    let v0 = udp_roundtrip(&socks[0], &s).ip();
    let v1 = udp_roundtrip(&socks[1], &s).ip();
    assert!(within(v0, pool) && within(v1, pool) && v0 != v1, "virtual addresses {v0} {v1}");

    // The third client gets "communication administratively prohibited".
    let c = &socks[2];
    c.connect(sa(SRV4.into(), 7000)).unwrap();
    c.send(b"me too").unwrap();
    let mut buf = [0u8; 64];
    let e = c.recv(&mut buf).expect_err("the third client got an answer from an exhausted pool");
    assert!(!is_timeout(&e), "the third client got no ICMP error, just silence ({e})");
    assert_eq!(e.raw_os_error(), Some(libc::EHOSTUNREACH), "{e}");
    let o = ping(&topo.clients[2], SRV4.into(), "1");
    let text = String::from_utf8_lossy(&o.stdout).to_lowercase();
    assert!(!o.status.success(), "ping through an exhausted pool succeeded: {text}");
    assert!(text.contains("filtered") || text.contains("prohibited"), "ping said: {text}");
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    assert!(s.recv_from(&mut buf).is_err(), "a packet of the third client reached the server");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();

    let st = gw.stats();
    assert!(st["drops"]["pool_exhausted"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["replies"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(st["leases"].as_u64().unwrap(), 2, "{st}");

    assert_eq!(udp_roundtrip(&socks[0], &s).ip(), v0);
    assert_eq!(udp_roundtrip(&socks[1], &s).ip(), v1);
}

// ---------------------------------------------------------------------------------------------
// 10: shutdown and restart after a crash
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_with_on_stop_open_removes_everything_and_a_restart_clears_a_crashed_run() {
    let mut lab = Lab::new();
    let ns = lab.gateway_netns("gw");
    let args =
        ["--lan", LAN4, "--lan", LAN6, "--pool", POOL4, "--pool", POOL6, "--on-stop", "open"];

    let mut d = Daemon::start(&mut lab, &ns, &args);
    let rules = band_rules(&ns);
    assert_eq!(rules.len(), 14, "expected 7 rules per family (5 + the 2 guard rules): {rules:#?}");
    assert!(table_routes(&ns).contains("vip0"), "table 7443: {}", table_routes(&ns));
    assert!(tun_exists(&ns));
    let t = Instant::now();
    let status = d.stop();
    assert!(status.success(), "exit status {status}:\n{}", d.log_text());
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?} to stop", t.elapsed());
    assert_clean(&ns);

    // kill -9 leaves the rules behind; the next start removes them first.
    let mut d = Daemon::start(&mut lab, &ns, &args);
    d.crash();
    assert_eq!(band_rules(&ns).len(), 14, "expected the crashed run's rules to be left");
    let mut d = Daemon::start(&mut lab, &ns, &args);
    assert!(d.log_text().contains("left by a previous run"), "log:\n{}", d.log_text());
    let rules = band_rules(&ns);
    assert_eq!(rules.len(), 14, "leftovers not replaced: {rules:#?}");
    let status = d.stop();
    assert!(status.success(), "exit status {status}:\n{}", d.log_text());
    assert_clean(&ns);
}

// ---------------------------------------------------------------------------------------------
// Start-up refusals
// ---------------------------------------------------------------------------------------------

#[test]
fn refuses_to_start_with_one_clear_sentence() {
    let mut lab = Lab::new();
    let off = lab.netns("off");
    sysctl(&off, &["net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"]);
    let on = lab.gateway_netns("on");
    ip(&on, &["addr", "add", "198.18.0.1/32", "dev", "lo"]);

    let m = Daemon::refused(&mut lab, &off, &["--lan", LAN4, "--pool", POOL4]);
    assert!(m.contains("forwarding") && m.contains("IPv4"), "{m}");
    sysctl(&off, &["net.ipv4.ip_forward=1"]);
    let m = Daemon::refused(&mut lab, &off, &["--lan", LAN6, "--pool", POOL6]);
    assert!(m.contains("forwarding") && m.contains("IPv6"), "{m}");

    let m = Daemon::refused(&mut lab, &on, &["--lan", LAN4, "--pool", POOL4]);
    assert!(m.contains("pool") && m.contains(POOL4) && m.contains("198.18.0.1"), "{m}");

    let m = Daemon::refused(&mut lab, &on, &["--lan", LAN4]);
    assert!(m.contains("--pool is required") && m.contains("e.g."), "{m}");

    for ns in [&off, &on] {
        assert_clean(ns);
    }
}

#[test]
fn unknown_key_in_the_config_file_is_refused_naming_its_line() {
    let mut lab = Lab::new();
    let ns = lab.gateway_netns("gw");
    let file = lab.dir().join("bad.toml");
    // `pools` (a typo of `pool`) is on line 3.
    std::fs::write(&file, "lan = [\"192.0.2.0/24\"]\n\npools = [\"198.18.0.0/24\"]\n").unwrap();
    let m = Daemon::refused(&mut lab, &ns, &["--config", file.to_str().unwrap()]);
    assert!(m.contains("pools") && m.contains("unknown"), "{m}");
    assert!(m.contains("line 3"), "the unknown key `pools` is on line 3: {m}");
    assert_clean(&ns);
}

// ---------------------------------------------------------------------------------------------
// Metrics: Prometheus text over HTTP on --metrics-listen
// ---------------------------------------------------------------------------------------------

/// `GET path` from namespace `ns` to `addr`; the whole response.
fn http_get(ns: &str, addr: SocketAddr, path: &str) -> String {
    let path = path.to_string();
    in_ns(ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("cannot reach the metrics endpoint {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: gw\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start).map(|v| v.trim().parse::<u64>().unwrap()))
        .unwrap_or_else(|| panic!("no `{line_start}` in:\n{text}"))
}

#[test]
fn idle_connections_to_the_metrics_port_never_starve_the_control_socket_nor_other_sources() {
    let mut topo = Topo::new(2);
    let gw = topo.gateway(&["--metrics-listen", "192.0.2.1:9477"]);
    let cli = topo.clients[0].clone();
    let at: SocketAddr = "192.0.2.1:9477".parse().unwrap();
    // 80 idle connections, more than both tables hold, kept open while `vipgate stats` runs.
    let idle: Vec<std::net::TcpStream> = in_ns(&cli, || {
        (0..80).filter_map(|_| std::net::TcpStream::connect_timeout(&at, IO_TIMEOUT).ok()).collect()
    });
    assert!(idle.len() >= 32, "only {} connections to the metrics port", idle.len());
    let mut ok = 0;
    for _ in 0..10 {
        let o = run_within(
            std::process::Command::new(BIN)
                .args(["stats", "--json", "--control-socket"])
                .arg(&gw.control),
            Duration::from_secs(10),
        );
        ok += usize::from(o.status.success());
    }
    assert_eq!(ok, 10, "`vipgate stats` failed {} of 10 times:\n{}", 10 - ok, gw.log_text());
    // Another source still gets its metrics: one source holds a few slots only.
    let other = http_get(&topo.clients[1], at, "/metrics");
    assert!(other.starts_with("HTTP/1.0 200 OK"), "{other}");
    drop(idle);
}

#[test]
fn metrics_are_served_in_prometheus_text_format() {
    let mut topo = Topo::new(1);
    let _gw = topo.gateway(&["--metrics-listen", "192.0.2.1:9477"]);
    let cli = topo.clients[0].clone();
    let at: SocketAddr = "192.0.2.1:9477".parse().unwrap();
    let before = http_get(&cli, at, "/metrics");
    assert!(before.starts_with("HTTP/1.0 200 OK"), "{before}");
    assert!(before.contains("Content-Type: text/plain; version=0.0.4"), "{before}");
    assert!(before.contains("# TYPE vipgate_packets_forwarded_total counter"), "{before}");
    for held in ["packets_held_total", "packets_held_dropped_total", "packets_held_unstored_total"]
    {
        assert!(before.contains(&format!("# TYPE vipgate_{held} counter")), "no {held}:\n{before}");
    }
    let out0 = metric(&before, "vipgate_packets_forwarded_total{direction=\"outbound\"}");

    let c = udp(&cli, sa(client_addr(0, false), 4100));
    let s = udp(&topo.srv, sa(server(false), 7100));
    udp_roundtrip(&c, &s);

    let after = http_get(&cli, at, "/metrics");
    assert!(metric(&after, "vipgate_packets_forwarded_total{direction=\"outbound\"}") > out0);
    assert!(metric(&after, "vipgate_packets_forwarded_total{direction=\"inbound\"}") >= 1);
    assert!(metric(&after, "vipgate_leases") >= 1, "{after}");
    let other = http_get(&cli, at, "/secret");
    assert!(other.starts_with("HTTP/1.0 404"), "{other}");
}

// ---------------------------------------------------------------------------------------------
// TUN offloads: bulk TCP both ways as 64 KB super-packets, every segment's checksum verified
// ---------------------------------------------------------------------------------------------

/// The `Tcp: InCsumErrors` counter of namespace `ns` (TCP segments dropped for a bad checksum).
fn tcp_checksum_errors(ns: &str) -> u64 {
    let o = exec_in(ns, "cat", &["/proc/net/snmp"], Duration::from_secs(5));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or_default(), tcp.next().unwrap_or_default());
    let i = names.split_whitespace().position(|n| n == "InCsumErrors").expect("InCsumErrors");
    values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).expect("a counter value")
}

fn ethtool(ns: &str, args: &[&str]) {
    let o = exec_in(ns, "ethtool", args, Duration::from_secs(5));
    assert!(
        o.status.success(),
        "ethtool {args:?} in {ns} failed (test.sh installs ethtool): {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Bytes `i..` of the pattern the bulk transfers send (not periodic in any segment size).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn bulk_through_offloads(v6: bool) {
    const LEN: usize = 8 << 20;
    let mut topo = Topo::new(1);
    // The gateway's links compute checksums in software (no TX checksum offload, hence no
    // TSO either): every segment leaving the gateway box gets its final checksum from the
    // partial sum the gateway wrote, and the receivers (RX checksum offload off) verify each.
    ethtool(&topo.gw, &["-K", "wan0", "tx", "off"]);
    ethtool(&topo.gw, &["-K", "lan0", "tx", "off"]);
    ethtool(&topo.srv, &["-K", "eth0", "rx", "off"]);
    ethtool(&topo.clients[0], &["-K", "eth0", "rx", "off"]);
    let gw = topo.gateway(&["--offload", "on"]);
    assert!(
        gw.log_text().contains("tso4,tso6"),
        "the gateway should report TSO offloads: {}",
        gw.log_text()
    );
    let cli = topo.clients[0].clone();
    let srv = server(v6);

    let l = listen(&topo.srv, sa(srv, 7100));
    let mut c = connect(&cli, sa(srv, 7100), IO_TIMEOUT).expect("TCP connect through the gateway");
    let (mut s, peer) = accept(&l, IO_TIMEOUT).expect("accept");
    assert_virtual(peer.ip(), "bulk TCP: the server");
    for sock in [&c, &s] {
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        sock.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    let up = pattern(LEN, 0x1234_5678);
    let down = pattern(LEN, 0x9abc_def1);
    let started = Instant::now();
    let (got_up, got_down) = std::thread::scope(|sc| {
        let server = sc.spawn(|| {
            let mut got = vec![0u8; LEN];
            s.read_exact(&mut got).expect("the server reads everything the client sent");
            s.write_all(&down).expect("the server sends its answer");
            got
        });
        c.write_all(&up).expect("the client sends");
        let mut got = vec![0u8; LEN];
        c.read_exact(&mut got).expect("the client reads everything the server sent");
        (server.join().unwrap(), got)
    });
    assert!(got_up == up, "client → server: the data arrived changed");
    assert!(got_down == down, "server → client: the data arrived changed");
    eprintln!("16 MiB through the gateway with offloads in {:?}", started.elapsed());

    assert_eq!(tcp_checksum_errors(&topo.srv), 0, "the server dropped segments: bad checksums");
    assert_eq!(tcp_checksum_errors(&cli), 0, "the client dropped segments: bad checksums");
    let supers = gw.counter("tun_super_packets");
    assert!(supers >= 20, "the gateway read only {supers} super-packets: offloads not in use");
    assert_eq!(gw.counter("tun_offload_errors"), 0);
    assert_eq!(gw.counter("tun_write_errors"), 0);
}

#[test]
fn v4_bulk_tcp_through_offloads_arrives_intact_with_every_checksum_verified() {
    bulk_through_offloads(false);
}

#[test]
fn v6_bulk_tcp_through_offloads_arrives_intact_with_every_checksum_verified() {
    bulk_through_offloads(true);
}

// ---------------------------------------------------------------------------------------------
// Two TUN queues, each with its own thread, one lease table
// ---------------------------------------------------------------------------------------------

#[test]
fn two_queues_share_one_lease_table_and_both_carry_traffic() {
    let mut topo = Topo::new(1);
    let partners: Vec<IpAddr> =
        (10..18).map(|i| IpAddr::from([198, 51, 100, i])).collect::<Vec<_>>();
    for p in &partners {
        ip(&topo.srv, &["addr", "add", &format!("{p}/24"), "dev", "eth0"]);
    }
    let gw = topo.gateway(&["--queues", "2", "--offload", "on"]);
    assert!(gw.log_text().contains("queues: 2"), "{}", gw.log_text());
    let cli = topo.clients[0].clone();
    let me = client_addr(0, false);

    // Eight partners (eight new leases, each first packet on whichever queue the kernel
    // picks), four connections to each, 256 KiB each way on every connection.
    let mut seen = std::collections::BTreeMap::new();
    for (i, p) in partners.iter().enumerate() {
        let port = 7200 + i as u16;
        let l = listen(&topo.srv, sa(*p, port));
        for _ in 0..4 {
            let mut c = connect(&cli, sa(*p, port), IO_TIMEOUT).expect("connect");
            let (mut s, peer) = accept(&l, IO_TIMEOUT).expect("accept");
            assert_virtual(peer.ip(), "two queues: the server");
            let virt = *seen.entry(*p).or_insert(peer.ip());
            assert_eq!(peer.ip(), virt, "one pair, one virtual address, whichever queue");
            let data = pattern(256 << 10, port as u32);
            std::thread::scope(|sc| {
                let echo = sc.spawn(|| {
                    let mut got = vec![0u8; data.len()];
                    s.read_exact(&mut got).expect("server reads");
                    s.write_all(&got).expect("server echoes");
                });
                c.write_all(&data).expect("client sends");
                let mut back = vec![0u8; data.len()];
                c.read_exact(&mut back).expect("client reads the echo");
                assert!(back == data, "the echo differs");
                echo.join().unwrap();
            });
        }
    }
    // Each partner connects back to the virtual address it saw (new inbound flows); a host
    // route makes the server's namespace use that partner address as source.
    for (i, (p, virt)) in seen.iter().enumerate() {
        let via = ["route", "replace", &format!("{virt}/32"), "via", "198.51.100.1"];
        ip(&topo.srv, &[&via[..], &["src", &p.to_string()]].concat());
        let l = listen(&cli, sa(me, 7300 + i as u16));
        let back = connect(&topo.srv, sa(*virt, 7300 + i as u16), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{p} connecting back to {virt}: {e}"));
        let (_, from) = accept(&l, IO_TIMEOUT).expect("the partner's connection back");
        assert_eq!(from.ip(), *p);
        drop(back);
    }

    // Twenty-four more partners by UDP: each first datagram makes a lease and waits until
    // it is stored, on whichever queue it came (all on queue 0: chance 2^-24), then arrives.
    let udp_partners: Vec<IpAddr> = (20..44).map(|i| IpAddr::from([198, 51, 100, i])).collect();
    let c = udp(&cli, sa(me, 0));
    for (i, p) in udp_partners.iter().enumerate() {
        ip(&topo.srv, &["addr", "add", &format!("{p}/24"), "dev", "eth0"]);
        let s = udp(&topo.srv, sa(*p, 7400 + i as u16));
        assert_virtual(udp_roundtrip(&c, &s).ip(), "two queues, UDP: the server");
    }

    let leases = gw.leases();
    let want = partners.len() + udp_partners.len();
    assert_eq!(leases.len(), want, "one lease per partner: {leases:?}");
    let st = gw.stats();
    assert_eq!(st["held_dropped"].as_u64(), Some(0), "{st}");
    let per_queue: Vec<u64> =
        st["tun_rx_per_queue"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(per_queue.len(), 2, "{st}");
    assert!(per_queue.iter().all(|&n| n > 0), "both queues should carry traffic: {per_queue:?}");
    assert_eq!(per_queue.iter().sum::<u64>(), st["tun_rx"].as_u64().unwrap());
    assert_eq!(st["tun_write_errors"].as_u64(), Some(0), "{st}");
    assert_eq!(gw.counter("tun_offload_errors"), 0);
}
