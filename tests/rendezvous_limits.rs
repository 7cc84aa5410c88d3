//! The rendezvous server's limits, end to end (issue 14, points 3, 4 and 5): a real
//! `vipgate rendezvous` in a network namespace, real TLS clients and STUN clients in
//! namespaces of their own, one per source address.
//!
//! - Memory: RSS (`/proc/PID/status`) after many password checks stays within 64 MB of the
//!   RSS after the first.
//! - Fair shares: a source with thousands of idle connections holds its share of the TLS and
//!   STUN-over-TCP tables, not every slot; sources that flood the password-check queue get
//!   `busy` beyond their share while another source's logins are all served.
//! - UDP STUN answers one source at most `--stun-rate` a second (burst: twice that).
//! - A client pipelining requests behind a login gets every answer.
//!
//! Needs root and `ip`; fails, never skips, without them. Every flood is bounded in count
//! and in time.
//!
//! ```text
//!   f1 203.0.113.20 ─┐
//!   f2 203.0.113.21 ─┼─ br0 [srv 203.0.113.10: vipgate rendezvous, TLS 7444, STUN 3478]
//!   g  203.0.113.30 ─┘
//! ```

mod common;

use common::netns::*;
use serde_json::{json, Value};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vipgate::peer::Session;

const SERVER: &str = "203.0.113.10";
const F1: &str = "203.0.113.20";
const F2: &str = "203.0.113.21";
const G: &str = "203.0.113.30";
const PASSWORD: &str = "correct horse battery";
/// A password check takes ~1 s in a debug build (argon2id, 19 MiB, 2 passes): waits for
/// one are this long.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

fn tls_addr() -> SocketAddr {
    format!("{SERVER}:7444").parse().unwrap()
}

fn stun_addr() -> SocketAddr {
    format!("{SERVER}:3478").parse().unwrap()
}

/// The namespaces and the server; the server is killed and the namespaces removed on drop.
struct World {
    lab: Lab,
    f1: String,
    f2: String,
    g: String,
    server: Child,
    log: PathBuf,
    ca: PathBuf,
}

impl World {
    fn new(server_args: &[&str]) -> World {
        let mut lab = Lab::new();
        let srv = lab.netns("srv");
        ip_batch(
            &srv,
            &format!("link add br0 type bridge\nlink set br0 up\naddr add {SERVER}/24 dev br0"),
        );
        let mut sources = Vec::new();
        for (k, (role, addr)) in [("f1", F1), ("f2", F2), ("g", G)].into_iter().enumerate() {
            let ns = lab.netns(role);
            let port = format!("p{k}");
            lab.veth(&ns, "eth0", &srv, &port);
            ip_batch(&srv, &format!("link set {port} master br0 up"));
            ip_batch(&ns, &format!("addr add {addr}/24 dev eth0\nlink set eth0 up"));
            sources.push(ns);
        }
        let state = lab.dir().join("rendezvous");
        let log = lab.dir().join("rendezvous.log");
        let f = File::create(&log).expect("log file");
        let (tls, stun) = (tls_addr().to_string(), stun_addr().to_string());
        let child = Command::new("ip")
            .args(["netns", "exec", &srv, BIN, "rendezvous", "--state-dir"])
            .arg(&state)
            .args(["--listen", &tls, "--stun-listen", &stun])
            .args(server_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().expect("dup")))
            .stderr(Stdio::from(f))
            .spawn()
            .expect("cannot start vipgate rendezvous");
        let g = sources.pop().unwrap();
        let f2 = sources.pop().unwrap();
        let f1 = sources.pop().unwrap();
        let mut w = World { lab, f1, f2, g, server: child, log, ca: state.join("tls/cert.pem") };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !w.log_text().contains(" ready") {
            if let Ok(Some(s)) = w.server.try_wait() {
                panic!("the server exited ({s}):\n{}", w.log_text());
            }
            assert!(Instant::now() < deadline, "the server is not ready:\n{}", w.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        w
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's resident set, in bytes.
    fn rss(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.server.id()))
            .expect("the server's /proc status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"));
        kb * 1024
    }

    /// A TLS session from namespace `ns`, every read waiting at most `timeout`.
    fn session(&self, ns: &str, timeout: Duration) -> Session {
        let ca = self.ca.clone();
        in_ns(ns, move || Session::connect(tls_addr(), &ca, timeout))
            .unwrap_or_else(|e| panic!("cannot connect from {ns}: {e:#}"))
    }

    /// Creates account `user` from namespace `ns`.
    fn register(&self, ns: &str, user: &str) {
        let mut s = self.session(ns, CHECK_TIMEOUT);
        s.call(json!({"op": "register", "user": user, "password": PASSWORD}))
            .unwrap_or_else(|e| panic!("register {user}: {e:#}"));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        if std::thread::panicking() {
            eprintln!("--- rendezvous ---\n{}", self.log_text());
        }
        let _ = &self.lab;
    }
}

/// The error code of a refused call (`busy`, `login_failed`, ...), or "ok".
fn code(r: &anyhow::Result<Value>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => match e.downcast_ref::<vipgate::peer::Refused>() {
            Some(refused) => refused.code.clone(),
            None => format!("{e:#}"),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Point 4: memory
// ---------------------------------------------------------------------------------------------

/// Password checks after the first. A check costs ~0.45 s in the debug build the tests run
/// (argon2id unoptimised; tens of ms in release), so 1,000 would take 7 to 8 minutes: 200
/// take ~90 s and show the same thing (the old server had kept three work areas, +57 MB,
/// after 20 checks and stayed there; this one has not grown after the first).
/// `VIPGATE_PASSWORD_CHECKS=1000 cargo test --release --test rendezvous_limits rss` runs the
/// issue's 1,000 in about a minute.
fn checks() -> usize {
    std::env::var("VIPGATE_PASSWORD_CHECKS").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

#[test]
fn rss_after_many_password_checks_stays_within_64_mb_of_the_first() {
    let w = World::new(&["--login-rate", "100000"]);
    w.register(&w.g, "alice");
    let mut s = w.session(&w.g, CHECK_TIMEOUT);
    let mut checked = 0;
    // Wrong passwords: every one is a full check, and the session stays logged out (a new
    // session every 10 checks: the server closes one not logged in after 30 s).
    let mut login = |password: &str| {
        if checked % 10 == 9 {
            s = w.session(&w.g, CHECK_TIMEOUT);
        }
        checked += 1;
        code(&s.call(json!({"op": "login", "user": "alice", "password": password})))
    };
    assert_eq!(login("not the password"), "login_failed");
    let first = w.rss();
    let started = Instant::now();
    let checks = checks();
    for k in 1..=checks {
        assert_eq!(login("not the password"), "login_failed");
        if k % 50 == 0 {
            eprintln!("RSS after {} checks: {} MB", k + 1, w.rss() >> 20);
        }
        assert!(started.elapsed() < Duration::from_secs(1200), "password checks too slow");
    }
    let checked = checks + 1;
    let after = w.rss();
    eprintln!(
        "RSS after the first check {} MB, after {checked} checks {} MB ({:?} per check)",
        first >> 20,
        after >> 20,
        started.elapsed() / checked as u32
    );
    assert!(
        after <= first + (64 << 20),
        "RSS grew from {} MB to {} MB over {checked} password checks",
        first >> 20,
        after >> 20
    );
    // Stricter, and what the fix promises: no check allocates a work area of its own, so the
    // growth stays below one (19 MiB). The old server, a fresh area per check, plateaued
    // here at +57 MB, inside the 64 MB of the issue but three work areas kept.
    assert!(
        after < first + (19 << 20),
        "RSS grew by {} MB over {checked} password checks: a work area per check?",
        (after.saturating_sub(first)) >> 20
    );
    assert_eq!(login(PASSWORD), "ok", "the right password still logs in");
}

// ---------------------------------------------------------------------------------------------
// Point 3: fair shares
// ---------------------------------------------------------------------------------------------

/// Flooding connections per flooding source: 80 in all, more than the 64-job queue.
const FLOOD_CONNS: usize = 40;
/// Logins of the good source under the flood.
const GOOD_LOGINS: usize = 4;

#[test]
fn sources_flooding_the_password_checks_get_busy_and_another_source_still_logs_in() {
    let w = World::new(&["--login-rate", "100000"]);
    w.register(&w.g, "alice");
    let stop = Arc::new(AtomicBool::new(false));
    let (busy, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut flood = Vec::new();
    for ns in [&w.f1, &w.f2] {
        for _ in 0..FLOOD_CONNS {
            let (ns, ca) = (ns.clone(), w.ca.clone());
            let (stop, busy, failed) = (stop.clone(), busy.clone(), failed.clone());
            flood.push(spawn_in_ns(&ns, move || {
                let Ok(mut s) = Session::connect(tls_addr(), &ca, CHECK_TIMEOUT) else { return };
                // Bounded: until the test says stop, or 120 s, or 10,000 requests.
                let started = Instant::now();
                for _ in 0..10_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(120)
                    {
                        return;
                    }
                    let r = s.call(json!({"op": "login", "user": "alice", "password": "wrong!!!"}));
                    match code(&r).as_str() {
                        "busy" => {
                            busy.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        "login_failed" => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return,
                    }
                }
            }));
        }
    }
    // The queue is full of the flood before the good source comes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while busy.load(Ordering::Relaxed) < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut served = 0;
    let mut answers = Vec::new();
    for _ in 0..GOOD_LOGINS {
        let mut s = w.session(&w.g, CHECK_TIMEOUT);
        let t = Instant::now();
        let c = code(&s.call(json!({"op": "login", "user": "alice", "password": PASSWORD})));
        if c == "ok" {
            served += 1;
        }
        answers.push(format!("{c} in {:?}", t.elapsed()));
    }
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        let _ = t.join();
    }
    let (busy, failed) = (busy.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "good source: {served} of {GOOD_LOGINS} logins served ({answers:?}); flood: {failed} \
         checks, {busy} busy"
    );
    assert!(busy >= 100, "the flood never filled its share: {busy} busy, {failed} checked");
    assert_eq!(served, GOOD_LOGINS, "logins of the good source under the flood: {answers:?}");
}

/// Waits (bounded) until `cond` holds; false at the deadline.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many of `conns` the server still holds open (the others it closed).
fn still_open(conns: &mut [TcpStream]) -> usize {
    let mut open = 0;
    for c in conns.iter_mut() {
        c.set_nonblocking(true).unwrap();
        let r = c.read(&mut [0u8; 1]);
        open += usize::from(matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }
    open
}

/// One STUN binding over TCP from `ns`: the reflexive address.
fn stun_over_tcp(ns: &str) -> std::io::Result<SocketAddr> {
    in_ns(ns, || {
        let mut t = TcpStream::connect_timeout(&stun_addr(), IO_TIMEOUT)?;
        t.set_read_timeout(Some(IO_TIMEOUT))?;
        let tid = [7u8; 12];
        let mut req = [0u8; 64];
        let n = vipgate::stun::binding_request(&tid, &mut req);
        t.write_all(&req[..n])?;
        let mut buf = vec![0u8; 20];
        t.read_exact(&mut buf)?;
        let len = vipgate::stun::message_len(&buf).ok().flatten().unwrap_or(20);
        buf.resize(len, 0);
        t.read_exact(&mut buf[20..])?;
        vipgate::stun::parse_binding_response(&buf, &tid)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))
    })
}

#[test]
fn one_source_with_thousands_of_idle_connections_holds_its_share_not_every_slot() {
    let w = World::new(&[]);
    w.register(&w.g, "alice");
    // As many idle connections as each table holds, and 100 more, from one address; no TLS
    // handshake on them (the server closes those 10 s after accepting them).
    let tls_n = vipgate::rendezvous::MAX_CONNS + 100;
    let stun_n = vipgate::rendezvous::MAX_STUN_CONNS + 100;
    let started = Instant::now();
    // STUN first: its idle timeout (30 s) is longer than the TLS handshake's (10 s).
    let (mut stun_idle, mut tls_idle, tls_started) = in_ns(&w.f1, move || {
        let open = |to: SocketAddr, n: usize| -> Vec<TcpStream> {
            (0..n).filter_map(|_| TcpStream::connect_timeout(&to, IO_TIMEOUT).ok()).collect()
        };
        let stun = open(stun_addr(), stun_n);
        let tls_started = Instant::now();
        // Four at a time: the table must be full before the first ones time out.
        let tls = std::thread::scope(|sc| {
            let parts: Vec<_> = (0..4).map(|_| sc.spawn(|| open(tls_addr(), tls_n / 4))).collect();
            parts.into_iter().flat_map(|p| p.join().unwrap()).collect::<Vec<_>>()
        });
        eprintln!(
            "STUN/TCP flood {:?}, TLS flood {:?}",
            tls_started - started,
            tls_started.elapsed()
        );
        (stun, tls, tls_started)
    });
    eprintln!(
        "opened {} idle TLS and {} idle STUN/TCP connections in {:?}",
        tls_idle.len(),
        stun_idle.len(),
        started.elapsed()
    );
    assert_eq!((tls_idle.len(), stun_idle.len()), (tls_n, stun_n), "the flood itself failed");
    // Another source still logs in and still learns its address over STUN/TCP.
    let mut s = w.session(&w.g, CHECK_TIMEOUT);
    let address = s.login("alice", PASSWORD, false).expect("a login beside the flood");
    assert_eq!(address, G);
    let reflexive = stun_over_tcp(&w.g).expect("STUN over TCP beside the flood");
    assert_eq!(reflexive.ip().to_string(), G);
    // The flooder holds exactly its share of each table; the server closed the rest. (On a
    // machine so loaded that the flood took longer than the handshake timeout, some of the
    // share may have timed out meanwhile: then at most the share.)
    let tls_share = 256;
    let stun_share = 64;
    let in_time = tls_started.elapsed() < Duration::from_secs(9);
    assert!(
        eventually(Duration::from_secs(3), || {
            let held = still_open(&mut tls_idle);
            held == tls_share || (!in_time && held <= tls_share)
        }),
        "idle TLS connections the server keeps from one source: {} (share {tls_share})",
        still_open(&mut tls_idle)
    );
    assert!(
        eventually(Duration::from_secs(3), || still_open(&mut stun_idle) == stun_share),
        "idle STUN/TCP connections the server keeps from one source: {} (share {stun_share})",
        still_open(&mut stun_idle)
    );
}

// ---------------------------------------------------------------------------------------------
// Point 5: UDP STUN rate, pipelining behind a login
// ---------------------------------------------------------------------------------------------

#[test]
fn udp_stun_answers_a_source_at_most_its_rate_and_others_still_get_theirs() {
    let w = World::new(&["--stun-rate", "10"]);
    let answered = in_ns(&w.f1, || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut req = [0u8; 64];
        let n = vipgate::stun::binding_request(&[3; 12], &mut req);
        let started = Instant::now();
        let mut answers = 0;
        let mut buf = [0u8; 1500];
        // 200 requests in 1 s, as fast as a flood would send them.
        for i in 0..200 {
            let _ = u.send_to(&req[..n], stun_addr());
            if i % 20 == 19 {
                std::thread::sleep(Duration::from_millis(100));
            }
            while u.recv_from(&mut buf).is_ok_and(|(len, _)| len > 0) {
                answers += 1;
                u.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            }
        }
        u.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        while u.recv_from(&mut buf).is_ok() {
            answers += 1;
        }
        (answers, started.elapsed())
    });
    let (answers, took) = answered;
    eprintln!("one source sent 200 STUN requests in {took:?}: {answers} answered");
    // Burst 20, then 10 a second.
    let most = 20 + (took.as_secs_f64() * 10.0).ceil() as usize + 2;
    assert!(answers <= most, "{answers} answers to one source in {took:?} (at most {most})");
    assert!(answers >= 20, "the burst is answered: {answers}");
    // Another source is answered at once.
    let other = in_ns(&w.g, || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let tid = [4u8; 12];
        let mut req = [0u8; 64];
        let n = vipgate::stun::binding_request(&tid, &mut req);
        u.send_to(&req[..n], stun_addr()).unwrap();
        let mut buf = [0u8; 1500];
        let (len, _) = u.recv_from(&mut buf).expect("an answer to another source");
        vipgate::stun::parse_binding_response(&buf[..len], &tid).expect("a binding response")
    });
    assert_eq!(other.ip().to_string(), G);
}

/// Pings pipelined behind the login, each padded with JSON whitespace to ~1.4 KB: ~420 KB,
/// more than the 256 KiB the server buffers while the password check runs. The answers are
/// small (~6 KB) so they never fill the socket: a writable event would read on by chance.
const PIPELINED: u64 = 300;

#[test]
fn a_client_pipelining_behind_a_login_gets_every_answer() {
    let w = World::new(&[]);
    w.register(&w.g, "alice");
    let ca = w.ca.clone();
    let (ids, took) = in_ns(&w.g, move || {
        let mut l = vipgate::tls::LineClient::connect(
            &vipgate::peer::SERVICE,
            tls_addr(),
            &ca,
            Duration::from_secs(20),
        )
        .expect("connect");
        let mut burst = serde_json::to_vec(
            &json!({"op": "login", "id": 0, "user": "alice", "password": PASSWORD}),
        )
        .unwrap();
        burst.push(b'\n');
        for id in 1..=PIPELINED {
            let pad = " ".repeat(1400);
            burst.extend_from_slice(format!("{{\"op\":\"ping\",{pad}\"id\":{id}}}\n").as_bytes());
        }
        assert!(burst.len() > 256 * 1024, "{} bytes", burst.len());
        let started = Instant::now();
        l.send(&burst).expect("send the burst");
        let mut ids = Vec::new();
        // Every answer, or the read times out (20 s) and says how far it got.
        while ids.len() as u64 <= PIPELINED {
            match l.read_line(None) {
                Ok(Some(line)) => {
                    let v: Value = serde_json::from_slice(&line).expect("a JSON line");
                    if v.get("event").is_none() {
                        assert_eq!(v["ok"], json!(true), "{v}");
                        ids.push(v["id"].as_u64().expect("an id"));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("after {} answers: {e:#}", ids.len());
                    break;
                }
            }
        }
        (ids, started.elapsed())
    });
    eprintln!("{} answers to {} pipelined requests in {took:?}", ids.len(), PIPELINED + 1);
    assert_eq!(ids.len() as u64, PIPELINED + 1, "answers to the login and the pipelined pings");
    assert!(ids.iter().copied().eq(0..=PIPELINED), "answers in request order");
}
