//! The smaller holes of issue 14 (point 5), each through the real daemon: `vipgate authority`
//! (the authority without a data plane) in a network namespace of its own, reached from a
//! client namespace over a veth pair, with real TLS 1.3 clients (`openssl s_client` and
//! rustls) and the real control socket.
//!
//! Needs root (network namespaces), `ip` and `openssl`; fails, never skips, without them.
//! Addresses: 192.0.2.1 (the authority) and 192.0.2.10 (the client), pool 198.18.0.0/24.
//! Nothing outside the namespaces and the temporary directory of each test is touched.

mod common;

use common::netns::*;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The authority's address and port.
const AUTH: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const PORT: u16 = 7443;
/// The authority protocol's ALPN.
const ALPN: &str = "vipgate-authority/1";

/// The authority alone in namespace `auth`, and a client namespace `cli` on its LAN.
struct Setup {
    daemon: Daemon,
    cli: String,
    _lab: Lab,
}

impl Setup {
    fn new() -> Setup {
        let mut lab = Lab::new();
        let (auth, cli) = (lab.netns("auth"), lab.netns("cli"));
        lab.veth(&auth, "lan0", &cli, "eth0");
        ip(&auth, &["addr", "add", "192.0.2.1/24", "dev", "lan0"]);
        ip(&cli, &["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
        ip(&auth, &["link", "set", "lan0", "up"]);
        ip(&cli, &["link", "set", "eth0", "up"]);
        let daemon = Daemon::start_authority(&mut lab, &auth, &["--lan", LAN4, "--pool", POOL4]);
        Setup { daemon, cli, _lab: lab }
    }

    /// The certificate the daemon generated, which clients pin.
    fn ca(&self) -> PathBuf {
        self.daemon.state.join("tls/cert.pem")
    }

    /// `openssl s_client` from the client namespace, offering `alpn` (none when `None`),
    /// sending `input` then waiting a moment for replies; returns (stdout, stderr).
    fn s_client(&self, alpn: Option<&str>, input: &str) -> (String, String) {
        let ca = self.ca();
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            self.cli.clone(),
            "openssl".into(),
            "s_client".into(),
            "-connect".into(),
            format!("{AUTH}:{PORT}"),
            "-CAfile".into(),
            ca.display().to_string(),
            "-verify_return_error".into(),
            "-tls1_3".into(),
            "-quiet".into(),
        ];
        if let Some(a) = alpn {
            args.extend(["-alpn".into(), a.to_string()]);
        }
        let mut child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_client (the openssl package) must be installed");
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(input.as_bytes());
        // Replies come within the second; then end the session.
        std::thread::sleep(Duration::from_millis(1500));
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("s_client output");
        (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }
}

/// A client that offers no ALPN is refused in the handshake exactly like one that offers
/// another protocol (`no_application_protocol`), and gets no reply; one that offers ours is
/// served. `openssl s_client` also verifies the generated certificate against itself.
#[test]
fn clients_that_offer_no_alpn_are_refused_like_a_wrong_alpn() {
    let s = Setup::new();
    let inquiry = "{\"id\":1,\"cmd\":\"inquire\",\"virtual\":\"198.18.0.7\"}\n";
    let (out, err) = s.s_client(Some(ALPN), inquiry);
    assert!(out.contains(r#""id":1,"ok":false,"error":"not_permitted""#), "{out}\n{err}");

    for alpn in [None, Some("h2")] {
        let (out, err) = s.s_client(alpn, inquiry);
        assert!(out.is_empty(), "offering {alpn:?}, got a reply: {out}");
        assert!(err.contains("no application protocol"), "offering {alpn:?}: {err}");
    }
}

/// A request that gives a key twice is a bad request, not the last value's request.
#[test]
fn a_request_with_a_key_twice_is_a_bad_request() {
    let s = Setup::new();
    let lines = "{\"id\":1,\"cmd\":\"bogus\",\"cmd\":\"inquire\",\"virtual\":\"198.18.0.7\"}\n\
                 {\"id\":2,\"cmd\":\"inquire\",\"virtual\":\"198.18.0.7\"}\n";
    let (out, err) = s.s_client(Some(ALPN), lines);
    let replies: Vec<&str> = out.lines().collect();
    assert_eq!(replies.len(), 2, "{out}\n{err}");
    assert!(replies[0].contains(r#""error":"bad_request""#), "{}", replies[0]);
    assert!(replies[0].contains("duplicate key `cmd`"), "{}", replies[0]);
    assert!(replies[1].contains(r#""id":2,"ok":false,"error":"not_permitted""#), "{}", replies[1]);
}

/// A client whose handshake ends just before the handshake deadline (10 s) still has the
/// whole first-request time: its request 2 s after the old deadline is answered.
#[test]
fn a_late_handshake_leaves_time_for_the_first_request() {
    let s = Setup::new();
    let ca = s.ca();
    let mut sock = connect(&s.cli, sa(AUTH, PORT), IO_TIMEOUT).expect("TCP connect");
    let opened = Instant::now();
    let reply = {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Silent until 9 s after the accept, then the handshake.
        std::thread::sleep(Duration::from_secs(9).saturating_sub(opened.elapsed()));
        let config = vipgate::tls::client_config(&ca).expect("client config");
        let mut tls = ClientConnection::new(config, ServerName::IpAddress(AUTH.into())).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut sock).expect("handshake");
        }
        // Past the handshake deadline of the accept, well within the first request's.
        std::thread::sleep(Duration::from_secs(12).saturating_sub(opened.elapsed()));
        let line = b"{\"id\":3,\"cmd\":\"inquire\",\"virtual\":\"198.18.0.7\"}\n";
        tls.writer().write_all(line).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.contains(&b'\n') {
            if tls.wants_write() {
                tls.write_tls(&mut sock).expect("send");
                continue;
            }
            match tls.read_tls(&mut sock) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            tls.process_new_packets().expect("TLS");
            if let Ok(n) = tls.reader().read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    assert!(
        reply.contains(r#""id":3,"ok":false,"error":"not_permitted""#),
        "the first request 12 s after the accept got {reply:?} (log:\n{})",
        s.daemon.log_text()
    );
}

/// A control client that sends its request and half-closes still gets its reply, for an
/// answer from the table (`stats`) and one that waits for the store (`history`).
#[test]
fn a_half_closed_control_client_gets_its_reply() {
    let s = Setup::new();
    for (request, key) in
        [("{\"cmd\":\"stats\"}\n", "\"leases\""), ("{\"cmd\":\"history\"}\n", "history")]
    {
        let mut c = UnixStream::connect(&s.daemon.control).expect("control socket");
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        let _ = c.read_to_string(&mut reply);
        assert!(reply.contains(key) && reply.ends_with('\n'), "{request:?} got {reply:?}");
    }
    // The daemon is still well (no busy loop on the half-closed connections either).
    assert!(s.daemon.stats().get("leases").is_some());
}

/// A `vipgate authority` started by hand on directories of the test's choosing; killed
/// on drop.
struct Own(std::process::Child);

impl Drop for Own {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `vipgate authority --state-dir STATE --control-socket CONTROL EXTRA..` in `ns`,
/// logging to `log`; returns it and its log once it is ready.
fn start_own(ns: &str, state: &Path, control: &Path, extra: &[&str], log: &Path) -> (Own, String) {
    let f = fs::File::create(log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, BIN, "authority", "--lan", LAN4, "--pool", POOL4])
        .arg("--state-dir")
        .arg(state)
        .arg("--control-socket")
        .arg(control)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .expect("start vipgate authority");
    let own = Own(child);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.trim_end().ends_with(" ready")) {
            return (own, text);
        }
        assert!(Instant::now() < deadline, "not ready:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The SHA-256 fingerprint of the first certificate in `path`, as vipgate logs it.
fn fingerprint(path: &Path) -> String {
    let certs = vipgate::tls::read_certs(path).expect("read certificate");
    vipgate::tls::fingerprint(&certs[0])
}

/// A self-signed ECDSA P-256 certificate for `cn` valid from `from` to `until` days from
/// now (negative: in the past), written as PEM to `cert` and `key` (mode 0600).
fn self_signed(cn: &str, from: i64, until: i64, cert: &Path, key: &Path) {
    let day = |n: i64| time::OffsetDateTime::now_utc() + time::Duration::days(n);
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(vec![]).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.not_before = day(from);
    params.not_after = day(until);
    let c = params.self_signed(&k).expect("certificate");
    fs::write(cert, c.pem()).unwrap();
    fs::write(key, k.serialize_pem()).unwrap();
    fs::set_permissions(key, fs::Permissions::from_mode(0o600)).unwrap();
}

/// A generated certificate that has come within 30 days of its end is replaced at the start:
/// the log names the old and new fingerprints and says the new file must be copied to the
/// clients; the new one lasts a year.
#[test]
fn a_generated_certificate_near_its_end_is_renewed_at_the_start() {
    let mut lab = Lab::new();
    let ns = lab.netns("renew");
    let state = lab.dir().join("state");
    let tls = state.join("tls");
    fs::create_dir_all(&tls).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    // What an earlier start generated 350 days ago: it ends in 15 days.
    self_signed("vipgate authority", -350, 15, &tls.join("cert.pem"), &tls.join("key.pem"));
    let old = fingerprint(&tls.join("cert.pem"));

    let control = lab.dir().join("ctl.sock");
    let (_d, log) = start_own(&ns, &state, &control, &[], &lab.dir().join("d.log"));
    let new = fingerprint(&tls.join("cert.pem"));
    assert_ne!(new, old);
    assert!(log.contains("replaced the TLS certificate"), "{log}");
    assert!(log.contains("within 30 days"), "{log}");
    assert!(log.contains(&format!("old SHA-256 {old}")) && log.contains(&new), "{log}");
    assert!(log.contains("copy the new"), "{log}");
    let der = vipgate::tls::read_certs(&tls.join("cert.pem")).unwrap();
    let (_, ends) = vipgate::tls::validity(der[0].as_ref()).unwrap();
    let left = ends.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(364 * 86_400), "the new one lasts a year: {left:?}");
}

/// A certificate given with `--authority-cert` that ends within 30 days is warned about and
/// never touched; the daemon serves with it.
#[test]
fn a_given_certificate_near_its_end_is_only_warned_about() {
    let mut lab = Lab::new();
    let ns = lab.netns("given");
    let (cert, key) = (lab.dir().join("given.pem"), lab.dir().join("given.key"));
    self_signed("operator", -300, 10, &cert, &key);
    let before = fs::read(&cert).unwrap();
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let args = ["--authority-cert", c, "--authority-key", k];
    let state = lab.dir().join("state");
    let control = lab.dir().join("ctl.sock");
    let (_d, log) = start_own(&ns, &state, &control, &args, &lab.dir().join("d.log"));
    assert!(log.contains(&format!("the TLS certificate {c} ends on")), "{log}");
    assert!(log.contains("never replaces a certificate it was given"), "{log}");
    assert_eq!(fs::read(&cert).unwrap(), before, "the given certificate was changed");
    assert!(!state.join("tls").exists(), "a certificate was generated beside the given one");
}

/// Existing state and socket directories of mode 0755 are narrowed to 0700 at the start
/// (logged) when they are vipgate's own (the state directory, a socket directory named after
/// vipgate); the control socket is 0600; a socket directory that is not vipgate's is left.
#[test]
fn open_state_and_socket_directories_are_narrowed_and_the_socket_is_private() {
    let mut lab = Lab::new();
    let ns = lab.netns("dirs");
    let mode = |p: &PathBuf| fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o777;
    let open = |p: &PathBuf| {
        fs::create_dir_all(p).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    };
    for (run, narrowed) in [("vipgate-run", true), ("shared", false)] {
        let state = lab.dir().join(format!("{run}-state"));
        let run_dir = lab.dir().join(run);
        open(&state);
        open(&run_dir);
        let control = run_dir.join("ctl.sock");
        let log = lab.dir().join(format!("{run}.log"));
        let (_own, text) = start_own(&ns, &state, &control, &[], &log);
        assert_eq!(mode(&state), 0o700, "{text}");
        assert!(text.contains(&format!("state directory {} had mode 0755", state.display())));
        let sock = fs::symlink_metadata(&control).expect("stat socket");
        assert!(sock.file_type().is_socket());
        assert_eq!(sock.permissions().mode() & 0o777, 0o600);
        let (want, said) = if narrowed { (0o700, true) } else { (0o755, false) };
        assert_eq!(mode(&run_dir), want, "{run}: {text}");
        assert_eq!(text.contains("control socket directory"), said, "{text}");
        // Only the socket beside it: the private directory it was bound in is gone.
        let names: Vec<_> =
            fs::read_dir(&run_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["ctl.sock"], "{run}");
    }
}
