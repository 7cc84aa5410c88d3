//! The `vipgate` binary's client commands (`rent`, `renew`, `release`, `inquire`,
//! `leases --history`): exit statuses, what they print, what they send. They run the real
//! binary against stubs on 127.0.0.1 and in a temporary directory; no privileges or network
//! namespaces needed.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::{ServerConnection, StreamOwned};
use vipgate::authority::{self, parse_request, Reply, Request};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("vipgate-cli-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a run of the binary gave.
struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts a failure with `status` and exactly one line on stderr, `vipgate: ...`
    /// containing every one of `needles`.
    fn fails(&self, status: i32, needles: &[&str]) {
        assert_eq!(self.status, status, "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert_eq!(self.stderr.lines().count(), 1, "one line on stderr: {:?}", self.stderr);
        assert!(self.stderr.starts_with("vipgate: "), "{:?}", self.stderr);
        for n in needles {
            assert!(self.stderr.contains(n), "{n:?} not in {:?}", self.stderr);
        }
    }

    /// Asserts a usage error: status 2 and clap's message containing every one of `needles`.
    fn usage_error(&self, needles: &[&str]) {
        assert_eq!(self.status, 2, "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert!(self.stdout.is_empty(), "{:?}", self.stdout);
        for n in needles {
            assert!(self.stderr.contains(n), "{n:?} not in {:?}", self.stderr);
        }
    }
}

/// Runs `vipgate args...`.
fn vipgate(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_vipgate"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run vipgate");
    Run {
        status: out.status.code().expect("exited normally"),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    }
}

/// A generated authority certificate (and key) in a temporary state directory.
fn certificate(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let (_, cert) = vipgate::tls::server_config(dir.path(), None, None).expect("certificate");
    (dir, cert)
}

/// A port on 127.0.0.1 nobody listens on (bound, noted, released).
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A TLS authority stub on 127.0.0.1 serving one connection: each request line is answered
/// with `answer(request)` (no reply at all for `None`). The thread returns the request lines
/// it received.
struct Stub {
    addr: SocketAddr,
    cert: PathBuf,
    _state: TempDir,
    handle: JoinHandle<Vec<String>>,
}

impl Stub {
    fn start(answer: impl Fn(Request) -> Option<Reply> + Send + 'static) -> Stub {
        let state = TempDir::new("stub");
        let (config, cert) =
            vipgate::tls::server_config(state.path(), None, None).expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let handle = thread::spawn(move || {
            let mut seen = Vec::new();
            // Wait at most 10 s for the client, so that a test failing before it connects
            // does not hang on join.
            let deadline = Instant::now() + Duration::from_secs(10);
            let sock = loop {
                match listener.accept() {
                    Ok((sock, _)) => break sock,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return seen,
                }
            };
            sock.set_nonblocking(false).expect("blocking");
            sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let conn = ServerConnection::new(config).expect("server connection");
            let mut reader = BufReader::new(StreamOwned::new(conn, sock));
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return seen,
                    Ok(_) => {}
                }
                seen.push(String::from_utf8_lossy(&line).trim_end().to_string());
                let reply = match parse_request(&line) {
                    Ok(req) => answer(req),
                    Err(reply) => Some(reply),
                };
                if let Some(reply) = reply {
                    let tls = reader.get_mut();
                    if tls.write_all(&reply.to_line()).and_then(|()| tls.flush()).is_err() {
                        return seen;
                    }
                }
            }
        });
        Stub { addr, cert, _state: state, handle }
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }

    fn ca(&self) -> &str {
        self.cert.to_str().expect("UTF-8 path")
    }

    /// The request lines the stub received.
    /// `vipgate CMD --authority <stub> --ca <its certificate> ARGS...`.
    fn run(&self, cmd: &str, args: &[&str]) -> Run {
        let addr = self.addr();
        let mut all = vec![cmd, "--authority", &addr, "--ca", self.ca()];
        all.extend_from_slice(args);
        vipgate(&all)
    }

    fn requests(self) -> Vec<String> {
        self.handle.join().expect("stub thread")
    }
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("address")
}

fn expires() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_312_800) // 2026-11-22T02:00:00Z
}

// ---------------------------------------------------------------------------------------------
// Usage errors: exit status 2, nothing sent
// ---------------------------------------------------------------------------------------------

#[test]
fn usage_errors_exit_2() {
    let ca = "/nonexistent/cert.pem";
    vipgate(&["rent", "--authority", "127.0.0.1:9", "--ca", ca]).usage_error(&["--partner"]);
    vipgate(&["rent", "--authority", "127.0.0.1:9", "--ca", ca, "--partner", "198.51.100.300"])
        .usage_error(&["--partner", "198.51.100.300", "IPv4 or IPv6"]);
    vipgate(&["rent", "--authority", "gateway.example", "--ca", ca, "--partner", "198.51.100.2"])
        .usage_error(&["--authority", "IP:PORT"]);
    vipgate(&["rent", "--authority", "127.0.0.1:0", "--ca", ca, "--partner", "198.51.100.2"])
        .usage_error(&["port 0"]);
    vipgate(&[
        "rent",
        "--authority",
        "127.0.0.1:9",
        "--ca",
        ca,
        "--partner",
        "198.51.100.2",
        "--ttl",
        "0",
    ])
    .usage_error(&["--ttl", "1 to 604800"]);
    vipgate(&["renew", "--authority", "127.0.0.1:9", "--ca", ca, "--virtual", "nope"])
        .usage_error(&["--virtual"]);
    vipgate(&["release", "--authority", "127.0.0.1:9", "--ca", ca]).usage_error(&["--virtual"]);
    vipgate(&[
        "inquire",
        "--authority",
        "127.0.0.1:9",
        "--ca",
        ca,
        "--virtual",
        "198.18.0.7",
        "--at",
        "yesterday",
    ])
    .usage_error(&["--at", "RFC 3339"]);
    vipgate(&[
        "rent",
        "--authority",
        "127.0.0.1:9",
        "--ca",
        ca,
        "--partner",
        "198.51.100.2",
        "--timeout",
        "0",
    ])
    .usage_error(&["--timeout"]);
    vipgate(&["leases", "--history", "--at", "2026-13-01T00:00:00Z"])
        .usage_error(&["--at", "RFC 3339"]);
    vipgate(&["leases", "--history", "--limit", "0"]).usage_error(&["--limit"]);
    vipgate(&["leases", "--virtual", "198.18.0.7"]).usage_error(&["--history"]);
}

#[test]
fn help_says_who_may_do_what() {
    let help = |cmd: &str| {
        let run = vipgate(&[cmd, "--help"]);
        assert_eq!(run.status, 0, "{}", run.stderr);
        // Whatever the wrapping width, one space between words.
        run.stdout.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let rent = help("rent");
    assert!(rent.contains("source address of the") && rent.contains("served"), "{rent}");
    assert!(rent.contains("/var/lib/vipgate/tls/cert.pem"), "{rent}");
    assert!(rent.contains("Exit status"), "{rent}");
    let inquire = help("inquire");
    assert!(inquire.contains("only the partner the lease records"), "{inquire}");
    assert!(inquire.contains("every refusal is identical"), "{inquire}");
    assert!(help("renew").contains("only the host that rented"));
    assert!(help("release").contains("only the host that rented"));
    assert!(help("leases").contains("--history"));
}

// ---------------------------------------------------------------------------------------------
// Local failures: exit status 1, one sentence
// ---------------------------------------------------------------------------------------------

#[test]
fn unreachable_authority_exits_1_naming_it() {
    let (_dir, cert) = certificate("unreachable");
    let addr = closed_port().to_string();
    let run = vipgate(&[
        "rent",
        "--authority",
        &addr,
        "--ca",
        cert.to_str().unwrap(),
        "--partner",
        "198.51.100.2",
    ]);
    run.fails(1, &[&format!("cannot reach the authority at {addr}: connection refused")]);
    assert!(run.stdout.is_empty());
    // --json changes nothing when there is no reply to print.
    let run = vipgate(&[
        "inquire",
        "--authority",
        &addr,
        "--ca",
        cert.to_str().unwrap(),
        "--virtual",
        "198.18.0.7",
        "--json",
    ]);
    run.fails(1, &[&format!("cannot reach the authority at {addr}")]);
    assert!(run.stdout.is_empty());
}

#[test]
fn a_bare_ip_means_port_7443() {
    let (_dir, cert) = certificate("bare");
    let run = vipgate(&[
        "release",
        "--authority",
        "127.0.0.1",
        "--ca",
        cert.to_str().unwrap(),
        "--virtual",
        "198.18.0.7",
        "--timeout",
        "2",
    ]);
    run.fails(1, &["127.0.0.1:7443"]);
}

#[test]
fn a_missing_ca_file_exits_1_naming_it() {
    let dir = TempDir::new("noca");
    let missing = dir.path().join("cert.pem");
    let run = vipgate(&[
        "rent",
        "--authority",
        &closed_port().to_string(),
        "--ca",
        missing.to_str().unwrap(),
        "--partner",
        "198.51.100.2",
    ]);
    run.fails(1, &["--ca", missing.to_str().unwrap(), "no such file"]);
    let not_pem = dir.path().join("junk.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let run = vipgate(&[
        "rent",
        "--authority",
        &closed_port().to_string(),
        "--ca",
        not_pem.to_str().unwrap(),
        "--partner",
        "198.51.100.2",
    ]);
    run.fails(1, &[not_pem.to_str().unwrap(), "no certificate"]);
}

#[test]
fn another_certificate_is_refused() {
    let stub = Stub::start(|req| Some(Reply::released(req.id)));
    let (_dir, other) = certificate("other");
    let run = vipgate(&[
        "release",
        "--authority",
        &stub.addr(),
        "--ca",
        other.to_str().unwrap(),
        "--virtual",
        "198.18.0.7",
    ]);
    run.fails(1, &["certificate", "--ca", other.to_str().unwrap()]);
    assert!(stub.requests().is_empty(), "nothing is sent to an unauthenticated server");
}

#[test]
fn no_reply_times_out() {
    let stub = Stub::start(|_| None);
    let started = Instant::now();
    let run = stub.run("renew", &["--virtual", "198.18.0.7", "--timeout", "0.5"]);
    run.fails(1, &["timed out after 500ms", &stub.addr()]);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(stub.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Against an authority stub
// ---------------------------------------------------------------------------------------------

#[test]
fn rent_prints_only_the_virtual_address() {
    let stub = Stub::start(|req| Some(Reply::leased(req.id, ip("198.18.0.7"), expires())));
    let run = stub.run("rent", &["--partner", "198.51.100.2", "--ttl", "600"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(run.stdout, "198.18.0.7\n");
    assert_eq!(run.stderr, "");
    let sent = stub.requests();
    assert_eq!(sent, [r#"{"id":1,"cmd":"rent","partner":"198.51.100.2","ttl":600}"#]);
}

#[test]
fn renew_prints_the_virtual_address_and_release_nothing() {
    let stub = Stub::start(|req| Some(Reply::leased(req.id, ip("2001:db8:ff::7"), expires())));
    let run = stub.run("renew", &["--virtual", "2001:db8:ff::7"]);
    assert_eq!((run.status, run.stdout.as_str()), (0, "2001:db8:ff::7\n"), "{}", run.stderr);
    assert_eq!(stub.requests(), [r#"{"id":1,"cmd":"renew","virtual":"2001:db8:ff::7"}"#]);

    let stub = Stub::start(|req| Some(Reply::released(req.id)));
    let run = stub.run("release", &["--virtual", "198.18.0.7"]);
    assert_eq!((run.status, run.stdout.as_str(), run.stderr.as_str()), (0, "", ""));
    assert_eq!(stub.requests(), [r#"{"id":1,"cmd":"release","virtual":"198.18.0.7"}"#]);
}

#[test]
fn inquire_prints_the_real_address() {
    let stub = Stub::start(|req| Some(Reply::real(req.id, ip("192.0.2.10"))));
    let run =
        stub.run("inquire", &["--virtual", "198.18.0.7", "--at", "2026-11-22T02:00:00+01:00"]);
    assert_eq!((run.status, run.stdout.as_str()), (0, "192.0.2.10\n"), "{}", run.stderr);
    assert_eq!(
        stub.requests(),
        [r#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7","at":"2026-11-22T01:00:00Z"}"#]
    );
}

#[test]
fn a_refused_inquiry_exits_3() {
    let stub = Stub::start(|req| Some(Reply::not_permitted(req.id)));
    let run = stub.run("inquire", &["--virtual", "198.18.0.8"]);
    run.fails(
        3,
        &["vipgate: not permitted: only the partner recorded for this virtual address may ask \
           who is behind it"],
    );
    assert!(run.stdout.is_empty());
    stub.requests();

    let stub = Stub::start(|req| Some(Reply::not_permitted(req.id)));
    let run = stub.run("release", &["--virtual", "198.18.0.8"]);
    run.fails(3, &["not permitted: only the host that rented this virtual address may release"]);
    stub.requests();
}

#[test]
fn an_exhausted_pool_exits_4() {
    let stub = Stub::start(|req| Some(Reply::no_address(req.id)));
    let run = stub.run("rent", &["--partner", "198.51.100.2"]);
    run.fails(4, &["no address available"]);
    assert!(run.stdout.is_empty());
    stub.requests();
}

#[test]
fn other_refusals_exit_1_with_the_authoritys_reason() {
    let stub = Stub::start(|req| Some(Reply::not_served(req.id, ip("203.0.113.9"))));
    let run = stub.run("rent", &["--partner", "198.51.100.2"]);
    run.fails(1, &["not served: your address 203.0.113.9 is not in a LAN prefix"]);
    stub.requests();

    let stub = Stub::start(|req| Some(Reply::rate_limited(req.id)));
    let run = stub.run("inquire", &["--virtual", "198.18.0.7"]);
    run.fails(1, &["rate limited"]);
    stub.requests();

    let stub = Stub::start(|req| {
        Some(Reply::error(req.id, authority::ErrorCode::Internal, "disk full\n\u{1b}[31mred"))
    });
    let run = stub.run("rent", &["--partner", "198.51.100.2"]);
    run.fails(1, &["the authority failed: disk full"]);
    assert!(!run.stderr.contains('\u{1b}'), "control characters are not echoed");
    stub.requests();
}

#[test]
fn json_prints_the_reply_object_on_one_line() {
    let stub = Stub::start(|req| Some(Reply::leased(req.id, ip("198.18.0.7"), expires())));
    let run = stub.run("rent", &["--partner", "198.51.100.2", "--json"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 1, "{:?}", run.stdout);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(v["ok"], true);
    assert_eq!(v["virtual"], "198.18.0.7");
    assert_eq!(v["expires"], "2026-11-22T02:00:00Z");
    stub.requests();

    // A refusal too, with its exit status.
    let stub = Stub::start(|req| Some(Reply::not_permitted(req.id)));
    let run = stub.run("inquire", &["--virtual", "198.18.0.8", "--json"]);
    assert_eq!(run.status, 3, "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"], "not_permitted");
    assert_eq!(v["message"], authority::NOT_PERMITTED_MESSAGE);
    run.fails(3, &["not permitted"]);
    stub.requests();
}

// ---------------------------------------------------------------------------------------------
// leases --history over the control socket
// ---------------------------------------------------------------------------------------------

/// A control-socket stub at `path` answering one request with `reply`; returns the request.
fn control_stub(path: &Path, reply: &'static str) -> JoinHandle<String> {
    let listener = UnixListener::bind(path).expect("bind control socket");
    thread::spawn(move || {
        let (sock, _) = listener.accept().expect("accept");
        sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut reader = BufReader::new(sock);
        let mut line = String::new();
        reader.read_line(&mut line).expect("request");
        reader.get_mut().write_all(reply.as_bytes()).expect("reply");
        reader.get_mut().write_all(b"\n").expect("reply");
        line.trim_end().to_string()
    })
}

const HISTORY: &str = r#"{"history":[{"real":"192.0.2.10","virtual":"198.18.0.7","partner":"198.51.100.2","origin":"explicit","start":"2026-11-22T01:00:00Z","end":null,"end_reason":null},{"real":"192.0.2.11","virtual":"198.18.0.7","partner":"198.51.100.3","origin":"implicit","start":"2026-11-22T00:00:00Z","end":"2026-11-22T00:30:00Z","end_reason":"idle"}]}"#;

#[test]
fn history_without_a_gateway_exits_1() {
    let dir = TempDir::new("nosock");
    let socket = dir.path().join("control.sock");
    let run = vipgate(&["leases", "--history", "--control-socket", socket.to_str().unwrap()]);
    run.fails(1, &[&format!("cannot reach the gateway at {}", socket.display())]);
}

#[test]
fn history_prints_a_table() {
    let dir = TempDir::new("history");
    let socket = dir.path().join("control.sock");
    let server = control_stub(&socket, HISTORY);
    let run = vipgate(&[
        "leases",
        "--history",
        "--control-socket",
        socket.to_str().unwrap(),
        "--virtual",
        "198.18.0.7",
        "--at",
        "2026-11-22T01:15:00+01:00",
        "--limit",
        "5",
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let request: serde_json::Value = serde_json::from_str(&server.join().unwrap()).unwrap();
    assert_eq!(
        request,
        serde_json::json!({"cmd":"history","virtual":"198.18.0.7","at":"2026-11-22T00:15:00Z",
                           "limit":5})
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", run.stdout);
    for col in ["REAL", "VIRTUAL", "PARTNER", "ORIGIN", "START", "END", "REASON"] {
        assert!(lines[0].contains(col), "{}", lines[0]);
    }
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row,
        ["192.0.2.10", "198.18.0.7", "198.51.100.2", "explicit", "2026-11-22T01:00:00Z", "-", "-"]
    );
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(row[5..], ["2026-11-22T00:30:00Z", "idle"]);
    assert_eq!(lines[3], "2 record(s)");
}

#[test]
fn history_json() {
    let dir = TempDir::new("history-json");
    let socket = dir.path().join("control.sock");
    let server = control_stub(&socket, HISTORY);
    let run =
        vipgate(&["leases", "--history", "--json", "--control-socket", socket.to_str().unwrap()]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(server.join().unwrap(), r#"{"cmd":"history"}"#);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(2));
    assert_eq!(v[1]["end_reason"], "idle");
}

#[test]
fn history_refused_by_the_gateway_exits_1() {
    let dir = TempDir::new("history-refused");
    let socket = dir.path().join("control.sock");
    let server = control_stub(&socket, r#"{"error":"this gateway keeps no history yet"}"#);
    let run = vipgate(&["leases", "--history", "--control-socket", socket.to_str().unwrap()]);
    run.fails(1, &["the gateway refused: this gateway keeps no history yet"]);
    server.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Daemons refusing to start: exit status 78 (EX_CONFIG), one sentence naming flag and value
// ---------------------------------------------------------------------------------------------

/// `vipgate gateway` (and `--check`, and `authority`) with `args`, on a state directory and
/// control socket in `dir` (neither of which a refused start may create).
fn daemon(sub: &str, dir: &TempDir, args: &[&str]) -> Run {
    let state = dir.path().join("state");
    let socket = dir.path().join("ctl.sock");
    let mut all = vec![sub, "--state-dir", state.to_str().unwrap()];
    all.extend(["--control-socket", socket.to_str().unwrap()]);
    all.extend_from_slice(args);
    let run = vipgate(&all);
    assert!(!state.exists() && !socket.exists(), "a refused start created its state");
    run
}

#[test]
fn configuration_errors_exit_78_naming_flag_and_value() {
    let dir = TempDir::new("refuse");
    let lan = ["--lan", "192.0.2.0/24"];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--pool", "198.18.1.7/24"],
            "--pool 198.18.1.7/24 has host bits set: did you mean 198.18.1.0/24?",
        ),
        (
            &["--pool", "198.18.1.0/24", "--exclude", "198.18.1.9/29"],
            "--exclude 198.18.1.9/29 has host bits set: did you mean 198.18.1.8/29?",
        ),
        (
            &["--pool", "198.18.1.0/24", "--exclude", "198.18.0.0/23"],
            "--pool 198.18.1.0/24 is entirely covered by --exclude",
        ),
        (
            &["--pool", "198.18.1.0/24", "--exclude", "203.0.113.0/28"],
            "--exclude 203.0.113.0/28 is outside every --pool",
        ),
        (
            &["--pool", "198.18.1.0/24", "--lan", "192.0.2.0/24", "--lan", "2001:db8:1::/64"],
            "--lan 2001:db8:1::/64 is IPv6 but no --pool is",
        ),
    ];
    for (args, sentence) in cases {
        let mut all = if args.contains(&"--lan") { vec![] } else { lan.to_vec() };
        all.extend_from_slice(args);
        for sub in [&["gateway"][..], &["gateway", "--check"], &["authority"]] {
            let mut a = sub[1..].to_vec();
            a.extend_from_slice(&all);
            daemon(sub[0], &dir, &a).fails(78, &[sentence]);
        }
    }
    // A host prefix of one address is no host-bits error: this one is refused for its family.
    let host_lan = ["--lan", "192.0.2.7/32", "--pool", "2001:db8:ff::/64"];
    daemon("gateway", &dir, &host_lan).fails(78, &["--lan 192.0.2.7/32 is IPv4 but no --pool"]);
    daemon("gateway", &dir, &["--pool", "198.18.0.0/24"]).fails(78, &["--lan is required"]);
    daemon(
        "gateway",
        &dir,
        &["--lan", "192.0.2.0/24", "--pool", "198.18.0.0/24", "--queues", "99"],
    )
    .fails(78, &["--queues 99: give 1 to 16"]);
    // The authority without its port would serve nothing.
    daemon(
        "authority",
        &dir,
        &["--lan", "192.0.2.0/24", "--pool", "198.18.0.0/24", "--no-authority"],
    )
    .fails(78, &["drop --no-authority"]);
    let r = vipgate(&[
        "rendezvous",
        "--gateway-pool",
        "198.18.0.9/24",
        "--state-dir",
        "/nonexistent/x",
    ]);
    r.fails(78, &["--gateway-pool 198.18.0.9/24 has host bits set: did you mean 198.18.0.0/24?"]);
}

#[test]
fn a_bad_config_file_exits_78_with_its_line_and_a_bad_flag_stays_2() {
    let dir = TempDir::new("file");
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "lan = [\"192.0.2.0/24\"]\npool = [\"198.18.0.0/24\"]\nleas-idle = 3\n")
        .unwrap();
    let f = file.to_str().unwrap();
    daemon("gateway", &dir, &["--config", f]).fails(78, &["line 3", "leas-idle"]);
    daemon("gateway", &dir, &["--check", "--config", f]).fails(78, &["line 3"]);
    std::fs::write(&file, "lan = [\"192.0.2.0/24\"]\npool = [\"198.18.0.5/24\"]\n").unwrap();
    daemon("gateway", &dir, &["--config", f])
        .fails(78, &["--pool 198.18.0.5/24 has host bits set: did you mean 198.18.0.0/24?"]);
    let missing = dir.path().join("missing.toml");
    daemon("gateway", &dir, &["--config", missing.to_str().unwrap()])
        .fails(78, &["cannot read config file", "missing.toml"]);
    // What clap rejects is a usage error.
    daemon("gateway", &dir, &["--lan", "192.0.2.0/33", "--pool", "198.18.0.0/24"])
        .usage_error(&["--lan"]);
    daemon("gateway", &dir, &["--check", "--rule-priority", "x"]).usage_error(&["--rule-priority"]);
}

#[test]
fn gateway_help_tells_the_check_and_the_six_priorities() {
    let r = vipgate(&["gateway", "--help"]);
    assert_eq!(r.status, 0);
    let text = r.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(text.contains("--check") && text.contains("Changes nothing"), "{text}");
    assert!(text.contains("78"), "{text}");
    assert!(text.contains("this and the next 5 (six in all)"), "{text}");
}
