//! End-to-end tests of `vipgate rendezvous` and `vipgate peer`: real daemons in network
//! namespaces, a real `vipgate gateway` in front of two of the clients, coturn's
//! `turnutils_stunclient` as the STUN client, tcpdump captures as the witness.
//!
//! Needs root, `ip`, `tcpdump` and `turnutils_stunclient` (`scripts/test.sh` installs them);
//! fails, never skips, without them.
//!
//! Topology (one "Internet" bridge, one LAN bridge inside the gateway's namespace):
//! ```text
//!   a 198.18.0.10 ─┐                         ┌─ srv 203.0.113.10 (rendezvous, STUN)
//!                  ├─ lan0 [gw 198.18.0.1 | 203.0.113.1] ─ br0 (inet) ─┤
//!   b 198.18.0.11 ─┘   vipgate gateway, pool 198.51.100.0/24          └─ c 203.0.113.20
//! ```

mod common;

use common::netns::*;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = "203.0.113.10";
const POOL: &str = "198.51.100.0/24";
const A: &str = "198.18.0.10";
const B: &str = "198.18.0.11";
const C: &str = "203.0.113.20";

/// A background process whose output goes to a file; killed on drop (its output is printed
/// when the test is failing).
struct Bg {
    child: Child,
    out: PathBuf,
    what: String,
}

impl Bg {
    fn spawn(ns: &str, args: &[&str], out: PathBuf, what: &str) -> Bg {
        let f = File::create(&out).expect("output file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().expect("dup")))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Bg { child, out, what: what.to_string() }
    }

    fn text(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits (at most 10 s) until the output has a line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.text().contains(needle) {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("{} exited ({s}) before printing {needle:?}:\n{}", self.what, self.text());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print {needle:?} within 10 s:\n{}",
                self.what,
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit.
    fn stop(&mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.what, self.text());
        }
    }
}

/// The namespaces, the gateway and the rendezvous server.
struct World {
    lab: Lab,
    inet: String,
    gw_ns: String,
    srv: String,
    a: String,
    b: String,
    c: String,
    gateway: Daemon,
    server: Bg,
    ca: PathBuf,
    password: PathBuf,
}

impl World {
    fn new() -> World {
        World::with(&[], &["--no-authority"])
    }

    /// `server_args` go to `vipgate rendezvous`, `gateway_args` to `vipgate gateway`.
    fn with(server_args: &[&str], gateway_args: &[&str]) -> World {
        let mut lab = Lab::new();
        let inet = lab.netns("inet");
        let gw_ns = lab.gateway_netns("gw");
        let srv = lab.netns("srv");
        let a = lab.netns("a");
        let b = lab.netns("b");
        let c = lab.netns("c");
        ip_batch(&inet, "link add br0 type bridge\nlink set br0 up");
        ip_batch(
            &gw_ns,
            "link add lan0 type bridge\nlink set lan0 up\naddr add 198.18.0.1/24 dev lan0",
        );
        for (ns, addr) in [(&gw_ns, "203.0.113.1"), (&srv, SERVER), (&c, C)] {
            let port = format!("p{}", &ns[2..5]);
            lab.veth(ns, "wan0", &inet, &port);
            ip_batch(&inet, &format!("link set {port} master br0 up"));
            ip_batch(ns, &format!("addr add {addr}/24 dev wan0\nlink set wan0 up"));
        }
        for ns in [&srv, &c] {
            ip(ns, &["route", "add", POOL, "via", "203.0.113.1"]);
        }
        for (ns, addr) in [(&a, A), (&b, B)] {
            let port = format!("p{}", &ns[2..3]);
            lab.veth(ns, "eth0", &gw_ns, &port);
            ip_batch(&gw_ns, &format!("link set {port} master lan0 up"));
            ip_batch(
                ns,
                &format!("addr add {addr}/24 dev eth0\nlink set eth0 up\nroute add default via 198.18.0.1"),
            );
        }
        let mut args = vec!["--lan", "198.18.0.0/24", "--pool", POOL];
        args.extend_from_slice(gateway_args);
        let gateway = Daemon::start(&mut lab, &gw_ns, &args);
        let state = lab.dir().join("rendezvous");
        let state_s = state.to_string_lossy().to_string();
        let mut sargs = vec![BIN, "rendezvous", "--state-dir", &state_s, "--gateway-pool", POOL];
        sargs.extend_from_slice(server_args);
        let mut server = Bg::spawn(&srv, &sargs, lab.dir().join("rendezvous.log"), "rendezvous");
        server.wait_for(" ready");
        let password = lab.dir().join("password");
        fs::write(&password, "correct horse battery\n").expect("password file");
        World {
            ca: state.join("tls/cert.pem"),
            lab,
            inet,
            gw_ns,
            srv,
            a,
            b,
            c,
            gateway,
            server,
            password,
        }
    }

    fn peer_args(&self, user: &str, rest: &[&str]) -> Vec<String> {
        let mut v: Vec<String> =
            [BIN, "peer", "--server", SERVER, "--ca"].iter().map(|s| s.to_string()).collect();
        v.push(self.ca.to_string_lossy().into());
        v.extend(["--user".into(), user.into(), "--password-file".into()]);
        v.push(self.password.to_string_lossy().into());
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    }

    /// `vipgate peer` in `ns`, to completion.
    fn peer(&self, ns: &str, user: &str, rest: &[&str]) -> Output {
        let args = self.peer_args(user, rest);
        run_within(
            Command::new("ip").args(["netns", "exec", ns]).args(&args),
            Duration::from_secs(30),
        )
    }

    /// Like [`World::peer`], and it must succeed; returns stdout.
    fn peer_ok(&self, ns: &str, user: &str, rest: &[&str]) -> String {
        let o = self.peer(ns, user, rest);
        assert!(
            o.status.success(),
            "vipgate peer {rest:?} as {user} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `vipgate peer ... listen|online` in the background, once it says it is up.
    fn background(&self, ns: &str, user: &str, cmd: &str) -> Bg {
        let args = self.peer_args(user, &[cmd]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.lab.dir().join(format!("{user}-{cmd}.out"));
        let mut bg = Bg::spawn(ns, &refs, out, &format!("peer {cmd} as {user}"));
        bg.wait_for(if cmd == "listen" { "listening user=" } else { "online user=" });
        bg
    }

    /// Registers `user` from `ns`.
    fn register(&self, ns: &str, user: &str) {
        let out = self.peer_ok(ns, user, &["register"]);
        assert_eq!(out.trim(), format!("registered {user}"));
    }

    /// Makes `x` (in `xns`) and `y` (in `yns`) mutual buddies.
    fn befriend(&self, xns: &str, x: &str, yns: &str, y: &str) {
        assert_eq!(self.peer_ok(xns, x, &["buddy", "add", y]).trim(), format!("{y}: requested"));
        assert_eq!(self.peer_ok(yns, y, &["buddy", "accept", x]).trim(), format!("{x}: mutual"));
    }
}

/// The `peer=IP:PORT` of a `connect`'s output line `path=KIND peer=IP:PORT`.
fn path_of(out: &str) -> (String, SocketAddr) {
    let line = out
        .lines()
        .find(|l| l.starts_with("path="))
        .unwrap_or_else(|| panic!("no path line in {out:?}"));
    let mut kind = String::new();
    let mut peer = None;
    for w in line.split_whitespace() {
        if let Some(k) = w.strip_prefix("path=") {
            kind = k.to_string();
        }
        if let Some(p) = w.strip_prefix("peer=") {
            peer = p.parse().ok();
        }
    }
    (kind, peer.unwrap_or_else(|| panic!("no peer in {line:?}")))
}

fn pool_contains(ip: IpAddr) -> bool {
    POOL.parse::<ipnet::IpNet>().unwrap().contains(&ip)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn same_network_goes_local_different_goes_global_and_the_message_never_crosses_the_server() {
    let w = World::new();
    for (ns, u) in [(&w.a, "alice"), (&w.b, "bob"), (&w.c, "carol")] {
        w.register(ns, u);
    }
    w.befriend(&w.a, "alice", &w.b, "bob");
    w.befriend(&w.a, "alice", &w.c, "carol");
    let mut bob = w.background(&w.b, "bob", "listen");
    let mut carol = w.background(&w.c, "carol", "listen");

    // Witnesses: everything the server's interface sees, and positive controls on the paths
    // the messages take (the LAN bridge for the local path, the Internet bridge for the
    // global one), which prove the capture would show a message that crossed it.
    let pcap = |name: &str| w.lab.dir().join(format!("{name}.pcap"));
    let at_server = Capture::start(&w.srv, "wan0", &pcap("server"), &[]);
    let udp_at_server =
        Capture::start(&w.srv, "wan0", &pcap("server-udp"), &["udp", "and", "not", "port", "3478"]);
    let on_lan = Capture::start(&w.gw_ns, "lan0", &pcap("lan"), &[]);
    let on_inet = Capture::start(&w.inet, "br0", &pcap("inet"), &[]);

    // Inside pair, both behind the gateway with different virtual addresses from one pool.
    let out = w.peer_ok(&w.a, "alice", &["connect", "bob", "--message", "local-secret-4711"]);
    let (kind, peer) = path_of(&out);
    assert_eq!(kind, "local", "{out}");
    assert_eq!(peer.ip(), B.parse::<IpAddr>().unwrap(), "the LAN address of bob: {out}");
    bob.wait_for("from=alice path=local message=local-secret-4711");

    // Inside to outside: different networks, global endpoints.
    let out = w.peer_ok(&w.a, "alice", &["connect", "carol", "--message", "global-secret-0815"]);
    let (kind, peer) = path_of(&out);
    assert_eq!(kind, "global", "{out}");
    assert_eq!(peer.ip(), C.parse::<IpAddr>().unwrap(), "{out}");
    carol.wait_for("from=alice path=global message=global-secret-0815");

    // Outside to inside: carol reaches alice at a virtual address (not the one STUN gave
    // the server: per-partner mapping gives alice another one for carol).
    let mut alice = w.background(&w.a, "alice", "listen");
    let out = w.peer_ok(&w.c, "carol", &["connect", "alice", "--message", "reverse-secret-1234"]);
    let (kind, peer) = path_of(&out);
    assert_eq!(kind, "global", "{out}");
    assert!(pool_contains(peer.ip()), "carol must see alice's virtual address, saw {peer}");
    alice.wait_for("from=carol path=global message=reverse-secret-1234");
    let leases = w.gateway.leases();
    let for_carol = leases
        .iter()
        .find(|l| l["real"] == A && l["partner"] == C)
        .unwrap_or_else(|| panic!("no lease alice->carol in {leases:?}"));
    assert_eq!(for_carol["virtual"].as_str(), Some(peer.ip().to_string().as_str()), "{leases:?}");

    let server_saw = at_server.finish();
    let lan_saw = on_lan.finish();
    let inet_saw = on_inet.finish();
    for secret in ["local-secret-4711", "global-secret-0815", "reverse-secret-1234"] {
        assert!(
            !contains(&server_saw, secret.as_bytes()),
            "{secret} crossed the server's interface"
        );
    }
    assert!(
        contains(&lan_saw, b"local-secret-4711"),
        "positive control: the LAN capture misses the local message"
    );
    assert!(
        contains(&inet_saw, b"global-secret-0815"),
        "positive control: the Internet capture misses the global message"
    );
    assert!(contains(&inet_saw, b"reverse-secret-1234"), "positive control: the reverse message");
    // The server's UDP traffic is STUN only.
    assert_eq!(udp_at_server.finish().len(), EMPTY_PCAP, "UDP at the server that is not STUN");
    drop((bob, carol, alice));
}

#[test]
fn a_non_buddy_cannot_ask_or_relay_and_learns_nothing_from_the_refusal() {
    let w = World::new();
    for (ns, u) in [(&w.a, "alice"), (&w.b, "bob"), (&w.c, "carol")] {
        w.register(ns, u);
    }
    // bob asked carol, carol never accepted: not mutual.
    assert_eq!(w.peer_ok(&w.b, "bob", &["buddy", "add", "carol"]).trim(), "carol: requested");
    let _carol = w.background(&w.c, "carol", "listen");
    let refusal = |who: &str| {
        let o = w.peer(&w.b, "bob", &["connect", who, "--message", "x"]);
        assert_eq!(o.status.code(), Some(3), "connect to {who}: {o:?}");
        assert!(o.stdout.is_empty(), "nothing on stdout: {o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let pending = refusal("carol");
    let stranger = refusal("alice"); // exists, offline, no relation
    let nobody = refusal("nobody-at-all"); // no such account
    assert!(pending.contains("not_permitted"), "{pending}");
    assert_eq!(pending, stranger, "the refusal must not tell a pending request from a stranger");
    assert_eq!(pending, nobody, "the refusal must not tell whether an account exists");

    // The relay itself, asked directly (not through `connect`): an offer to a non-buddy.
    let ca = w.ca.clone();
    let pw = fs::read_to_string(&w.password).unwrap().trim().to_string();
    let refused = in_ns(&w.b, move || {
        let srv: SocketAddr = format!("{SERVER}:7444").parse().unwrap();
        let mut s = vipgate::peer::Session::connect(srv, &ca, IO_TIMEOUT).expect("connect");
        s.login("bob", &pw, false).expect("login");
        let offer = serde_json::json!({"op": "offer", "user": "carol", "kind": "global",
            "endpoint": "203.0.113.99:4000", "token": "0123456789abcdef0123456789abcdef"});
        let e = s.call(offer).expect_err("offer to a non-buddy");
        let addr = s.call(serde_json::json!({"op": "address_of", "user": "carol"}));
        (e.to_string(), addr.expect_err("reveal mode is off").to_string())
    });
    assert!(refused.0.contains("not_permitted"), "{}", refused.0);
    assert!(refused.1.contains("disabled"), "{}", refused.1);
    // carol heard nothing of it.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!_carol.text().contains("offer"), "{}", _carol.text());
}

#[test]
fn presence_events_arrive_when_a_buddy_logs_in_and_out() {
    let w = World::new();
    w.register(&w.a, "alice");
    w.register(&w.c, "carol");
    w.register(&w.b, "bob");
    w.befriend(&w.a, "alice", &w.c, "carol");
    let mut alice = w.background(&w.a, "alice", "online");
    let mut carol = w.background(&w.c, "carol", "listen");
    alice.wait_for("presence user=carol online=true");
    carol.stop();
    alice.wait_for("presence user=carol online=false");
    // bob is no buddy: his coming and going is not announced to alice.
    let mut bob = w.background(&w.b, "bob", "online");
    bob.stop();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!alice.text().contains("user=bob"), "{}", alice.text());
    // Becoming buddies while both are online shows each other's presence at once.
    let mut bob = w.background(&w.b, "bob", "online");
    w.befriend(&w.b, "bob", &w.a, "alice");
    alice.wait_for("buddy_request user=bob");
    alice.wait_for("presence user=bob online=true");
    bob.wait_for("presence user=alice online=true");
    let list = w.peer_ok(&w.a, "alice", &["buddy", "list"]);
    assert!(list.contains("bob mutual online"), "{list}");
    assert!(list.contains("carol mutual offline"), "{list}");
}

fn stunclient(ns: &str) -> String {
    let o = exec_in(ns, "turnutils_stunclient", &[SERVER], Duration::from_secs(10));
    assert!(o.status.success(), "turnutils_stunclient failed: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The address of turnutils_stunclient's `UDP reflexive addr: A:P` line.
fn reflexive(out: &str) -> IpAddr {
    let line = out
        .lines()
        .find(|l| l.contains("UDP reflexive addr:"))
        .unwrap_or_else(|| panic!("no reflexive address in {out:?}"));
    let addr = line.rsplit("addr: ").next().unwrap().trim();
    addr.parse::<SocketAddr>().unwrap_or_else(|e| panic!("{addr:?}: {e}")).ip()
}

#[test]
fn turnutils_stunclient_sees_the_real_address_directly_and_the_virtual_one_through_the_gateway() {
    let w = World::new();
    assert_eq!(reflexive(&stunclient(&w.c)), C.parse::<IpAddr>().unwrap());
    let inside = reflexive(&stunclient(&w.a));
    assert!(
        pool_contains(inside),
        "through the gateway STUN must report a virtual address, got {inside}"
    );
    let leases = w.gateway.leases();
    assert!(
        leases.iter().any(|l| l["real"] == A
            && l["partner"] == SERVER
            && l["virtual"] == inside.to_string()),
        "{inside} is alice's lease toward the server: {leases:?}"
    );

    // STUN over TCP, with our own client (turnutils_stunclient is UDP only).
    let got = in_ns(&w.c, || {
        let mut t =
            TcpStream::connect_timeout(&format!("{SERVER}:3478").parse().unwrap(), IO_TIMEOUT)
                .expect("STUN over TCP");
        t.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let tid = [7u8; 12];
        let mut req = [0u8; 64];
        let n = vipgate::stun::binding_request(&tid, &mut req);
        // Two requests in one write: framing must split them.
        let mut two = req[..n].to_vec();
        two.extend_from_slice(&req[..n]);
        t.write_all(&two).unwrap();
        let mut addrs = Vec::new();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while addrs.len() < 2 {
            let k = t.read(&mut chunk).expect("STUN response over TCP");
            assert!(k > 0, "closed");
            buf.extend_from_slice(&chunk[..k]);
            while let Ok(Some(len)) = vipgate::stun::message_len(&buf) {
                if buf.len() < len {
                    break;
                }
                addrs.push(
                    vipgate::stun::parse_binding_response(&buf[..len], &tid).expect("response"),
                );
                buf.drain(..len);
            }
        }
        addrs
    });
    assert!(got.iter().all(|a| a.ip() == C.parse::<IpAddr>().unwrap()), "{got:?}");
}

#[test]
fn garbage_on_every_port_never_takes_the_server_down() {
    let w = World::new();
    w.register(&w.c, "carol");
    in_ns(&w.c, || {
        let srv_udp: SocketAddr = format!("{SERVER}:3478").parse().unwrap();
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut x: u32 = 0x9e37_79b9;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut valid = [0u8; 64];
        let n = vipgate::stun::binding_request(&[1; 12], &mut valid);
        for i in 0..3000 {
            let mut d: Vec<u8> = if i % 2 == 0 {
                (0..(next() % 600) as usize).map(|_| next() as u8).collect()
            } else {
                valid[..n].to_vec()
            };
            if i % 2 == 1 {
                let at = next() as usize % d.len();
                d[at] ^= 1 << (next() % 8); // one flipped bit
            }
            let _ = u.send_to(&d, srv_udp);
        }
        // Garbage on the TLS port: not TLS at all, then an endless line, then a half-open
        // handshake left hanging.
        let tls: SocketAddr = format!("{SERVER}:7444").parse().unwrap();
        for junk in
            [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0x16, 3, 1, 0xff, 0xff, 0, 0][..], &[0u8; 4096][..]]
        {
            if let Ok(mut t) = TcpStream::connect_timeout(&tls, IO_TIMEOUT) {
                let _ = t.write_all(junk);
                let _ = t.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = t.read(&mut [0u8; 64]);
            }
        }
        // Garbage on the STUN TCP port.
        if let Ok(mut t) = TcpStream::connect_timeout(&srv_udp, IO_TIMEOUT) {
            let _ = t.write_all(b"\xff\xff garbage that is not STUN");
            let _ = t.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = t.read(&mut [0u8; 64]);
        }
    });
    // Inside TLS, lines that are not requests get bad_request and the session goes on.
    let ca = w.ca.clone();
    let replies = in_ns(&w.c, move || {
        let srv: SocketAddr = format!("{SERVER}:7444").parse().unwrap();
        let mut s = vipgate::peer::Session::connect(srv, &ca, IO_TIMEOUT).expect("connect");
        let mut codes = Vec::new();
        for bad in [
            serde_json::json!({"op": "nonsense"}),
            serde_json::json!({"op": "offer", "user": "x", "kind": "local", "endpoint": "1.2.3.4:5", "token": "t", "message": "payload"}),
            serde_json::json!({"op": "same_network", "user": "carol"}),
        ] {
            codes.push(s.call(bad).expect_err("refused").to_string());
        }
        codes
    });
    // A line over the limit gets `too_long` before the server closes.
    let ca = w.ca.clone();
    let too_long = in_ns(&w.c, move || {
        let srv: SocketAddr = format!("{SERVER}:7444").parse().unwrap();
        let mut l =
            vipgate::tls::LineClient::connect(&vipgate::peer::SERVICE, srv, &ca, IO_TIMEOUT)
                .expect("connect");
        let mut line = vec![b'x'; vipgate::authority::MAX_LINE + 10];
        line.push(b'\n');
        let _ = l.send(&line);
        let reply = l.read_line(None).expect("a reply before the close").unwrap_or_default();
        let after = l.read_line(None);
        (String::from_utf8_lossy(&reply).into_owned(), after.is_err())
    });
    assert!(too_long.0.contains("too_long"), "{too_long:?}");
    assert!(too_long.1, "then the connection is closed");
    assert!(replies[0].contains("bad_request"), "{replies:?}");
    assert!(
        replies[1].contains("bad_request"),
        "an offer carrying anything else is refused: {replies:?}"
    );
    assert!(replies[2].contains("not_logged_in"), "{replies:?}");
    // Still serving: STUN and a login. The flood's source is over its UDP STUN rate for a
    // moment (turnutils_stunclient does not retransmit): its bucket, burst 2 x --stun-rate,
    // refills in 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(reflexive(&stunclient(&w.c)), C.parse::<IpAddr>().unwrap());
    w.peer_ok(&w.c, "carol", &["buddy", "list"]);
    let log = w.server.text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_listener_with_an_authority_offers_a_virtual_address_rented_for_the_buddy() {
    let w = World::with(&[], &[]);
    for (ns, u) in [(&w.a, "alice"), (&w.c, "carol")] {
        w.register(ns, u);
    }
    w.befriend(&w.a, "alice", &w.c, "carol");
    let gw_ca = w.gateway.state.join("tls/cert.pem");
    let gw_ca_s = gw_ca.to_string_lossy().to_string();
    let args = w.peer_args(
        "alice",
        &["--authority", "198.18.0.1:7443", "--authority-ca", &gw_ca_s, "listen"],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut alice =
        Bg::spawn(&w.a, &refs, w.lab.dir().join("alice-auth.out"), "alice listen --authority");
    alice.wait_for("listening user=alice");
    let out = w.peer_ok(&w.c, "carol", &["connect", "alice", "--message", "rented-path"]);
    let (kind, peer) = path_of(&out);
    assert_eq!(kind, "global", "{out}");
    alice.wait_for("from=carol path=global message=rented-path");
    let leases = w.gateway.leases();
    let rented = leases
        .iter()
        .find(|l| l["real"] == A && l["partner"] == C)
        .unwrap_or_else(|| panic!("no lease alice->carol: {leases:?}"));
    assert_eq!(rented["origin"], "explicit", "{leases:?}");
    assert_eq!(rented["virtual"].as_str(), Some(peer.ip().to_string().as_str()), "{leases:?}");
}

#[test]
fn no_direct_path_is_a_clear_failure_and_a_wrong_password_is_refused() {
    let w = World::new();
    for (ns, u) in [(&w.a, "alice"), (&w.c, "carol")] {
        w.register(ns, u);
    }
    w.befriend(&w.a, "alice", &w.c, "carol");
    // carol's host drops UDP between ephemeral ports (STUN to and from port 3478 still
    // works): a firewall no hole punching gets through.
    ip_batch(
        &w.c,
        "rule add priority 100 ipproto udp dport 3478 lookup main\n\
         rule add priority 101 ipproto udp sport 3478 lookup main\n\
         rule add priority 102 ipproto udp dport 1024-65534 prohibit",
    );
    let _carol = w.background(&w.c, "carol", "listen");
    let started = Instant::now();
    let o = w.peer(&w.a, "alice", &["--timeout", "3", "connect", "carol", "--message", "lost"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(err.contains("no direct path to carol opened within 3s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "bounded by --timeout");
    assert!(o.stdout.is_empty(), "no path line on failure: {o:?}");

    fs::write(w.lab.dir().join("wrong"), "not the password\n").unwrap();
    let wrong = w.lab.dir().join("wrong").to_string_lossy().to_string();
    let mut args = w.peer_args("alice", &["buddy", "list"]);
    let at = args.iter().position(|a| a == "--password-file").unwrap() + 1;
    args[at] = wrong;
    let o = run_within(
        Command::new("ip").args(["netns", "exec", &w.a]).args(&args),
        Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("login_failed"), "{o:?}");
}

#[test]
fn a_quiet_session_stays_online_past_the_login_timeout() {
    let w = World::new();
    w.register(&w.a, "alice");
    w.register(&w.c, "carol");
    w.befriend(&w.a, "alice", &w.c, "carol");
    let mut alice = w.background(&w.a, "alice", "online");
    let _carol = w.background(&w.c, "carol", "listen");
    alice.wait_for("presence user=carol online=true");
    // Past the server's 30 s login timeout and the client's 30 s ping interval.
    std::thread::sleep(Duration::from_secs(40));
    assert!(alice.child.try_wait().unwrap().is_none(), "alice's session ended: {}", alice.text());
    assert!(!alice.text().contains("online=false"), "{}", alice.text());
    let list = w.peer_ok(&w.a, "alice", &["buddy", "list"]);
    assert!(list.contains("carol mutual online"), "{list}");
}

#[test]
fn sighup_changes_the_log_level_and_never_kills_the_server() {
    let mut lab = Lab::new();
    let ns = lab.netns("rdv");
    let state = lab.dir().join("rdv-state");
    let file = lab.dir().join("rendezvous.toml");
    fs::write(&file, "log-level = \"info\"\n").unwrap();
    let (state_s, file_s) =
        (state.to_string_lossy().to_string(), file.to_string_lossy().to_string());
    let args = [
        BIN,
        "rendezvous",
        "--state-dir",
        &state_s,
        "--config",
        &file_s,
        "--listen",
        "127.0.0.1:7444",
        "--stun-listen",
        "127.0.0.1:3478",
    ];
    let mut server = Bg::spawn(&ns, &args, lab.dir().join("rdv.log"), "rendezvous");
    server.wait_for(" ready");
    let hup = |s: &Bg| {
        // SAFETY: kill(2) of our own child, still running.
        assert_eq!(unsafe { libc::kill(s.child.id() as i32, libc::SIGHUP) }, 0);
    };
    fs::write(&file, "log-level = \"debug\"\n").unwrap();
    hup(&server);
    server.wait_for("SIGHUP: log level INFO -> DEBUG");
    // A file that no longer parses: refused, naming its line; the server goes on.
    fs::write(&file, "\nlog-level = 3\n").unwrap();
    hup(&server);
    server.wait_for("configuration refused");
    assert!(server.text().contains("line 2"), "{}", server.text());
    std::thread::sleep(Duration::from_millis(200));
    assert!(server.child.try_wait().unwrap().is_none(), "a SIGHUP ended the server");
    let up = in_ns(&ns, || std::net::TcpStream::connect("127.0.0.1:7444").is_ok());
    assert!(up, "the TLS port no longer accepts after the SIGHUPs:\n{}", server.text());
    server.stop();
}
