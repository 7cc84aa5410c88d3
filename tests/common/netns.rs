//! Network-namespace harness for the integration tests that run the daemon (`tests/gateway.rs`,
//! `tests/authority.rs`).
//!
//! Everything happens inside network namespaces a test creates itself; the root namespace's
//! routes, rules and interfaces are never touched. Addresses come only from 198.18.0.0/15,
//! 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32.
//!
//! - [`Lab`] owns a test's namespaces and temporary directory and removes them on drop
//!   (also when the test panics); names carry the process id and a per-test counter, so
//!   tests running in parallel threads (or processes) never collide.
//! - [`Daemon`] is a `vipgate gateway` started with `ip netns exec`; drop kills it (SIGKILL)
//!   and, when the test is failing, prints its log.
//! - [`in_ns`] runs a closure on a fresh thread that entered a namespace (`setns`). Sockets
//!   keep the namespace they were created in, so the usual pattern is: create the socket in
//!   [`in_ns`], hand it back, and use it from the test thread.
//! - [`Topo`] is the standard topology: clients on a LAN bridge, the gateway, a server and a
//!   third party on two WAN links.
//!
//! Every socket has timeouts and every wait is bounded, so a broken path fails the test
//! instead of hanging it.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The `vipgate` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vipgate");
/// Default timeout of socket operations that are expected to succeed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a negative check (nothing must arrive) waits.
pub const QUIET: Duration = Duration::from_millis(1200);
/// How long a daemon gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Runs `cmd` (stdin closed, output captured), killing it and panicking after `limit`.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{desc} did not finish within {limit:?}");
            }
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    };
    Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

/// Runs `program args...` (bounded to 10 s) and returns its output, whatever the status.
pub fn output(program: &str, args: &[&str]) -> Output {
    run_within(Command::new(program).args(args), Duration::from_secs(10))
}

/// Runs `program args...` and panics, with its stderr, unless it succeeds; returns stdout.
pub fn must(program: &str, args: &[&str]) -> String {
    let o = output(program, args);
    assert!(
        o.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stderr).trim()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `ip -n NS args...`, which must succeed; returns stdout.
pub fn ip(ns: &str, args: &[&str]) -> String {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    must("ip", &a)
}

/// Runs the `ip` commands in `script` (one per line, without the leading `ip`) in namespace
/// `ns` with `ip -batch`; panics, naming the failing line, unless all succeed.
pub fn ip_batch(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run ip");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "ip -n {ns} -batch failed: {}\nscript:\n{script}",
        String::from_utf8_lossy(&o.stderr).trim()
    );
}

/// `ip netns exec NS sysctl -qw settings...`.
pub fn sysctl(ns: &str, settings: &[&str]) {
    let mut a = vec!["netns", "exec", ns, "sysctl", "-qw"];
    a.extend_from_slice(settings);
    must("ip", &a);
}

/// `ip netns exec NS program args...`, bounded by `limit`; returns the output whatever the
/// status.
pub fn exec_in(ns: &str, program: &str, args: &[&str], limit: Duration) -> Output {
    run_within(Command::new("ip").args(["netns", "exec", ns, program]).args(args), limit)
}

// ---------------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------------

/// A test's namespaces and temporary directory, removed on drop.
pub struct Lab {
    id: String,
    namespaces: Vec<String>,
    dir: PathBuf,
    daemons: usize,
}

impl Lab {
    /// A new, empty lab with a unique id (process id and a per-process counter).
    pub fn new() -> Lab {
        let id = format!("{}-{}", std::process::id(), NEXT_LAB.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(format!("vipgate-it-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Lab { id, namespaces: Vec::new(), dir, daemons: 0 }
    }

    /// The lab's temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates namespace `vg<role>-<id>` with `lo` up, reverse-path filtering off and IPv6
    /// duplicate address detection off (addresses are usable at once). Panics when the
    /// namespace cannot be created: these tests never skip.
    pub fn netns(&mut self, role: &str) -> String {
        let name = format!("vg{role}-{}", self.id);
        if Path::new("/var/run/netns").join(&name).exists() {
            // Left by an earlier run whose process id was the same: not ours any more.
            let _ = output("ip", &["netns", "del", &name]);
        }
        let o = output("ip", &["netns", "add", &name]);
        assert!(
            o.status.success(),
            "cannot create network namespace {name} (these tests need root): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        self.namespaces.push(name.clone());
        ip(&name, &["link", "set", "lo", "up"]);
        sysctl(
            &name,
            &[
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        );
        name
    }

    /// Creates a namespace for a gateway: like [`Lab::netns`], with IPv4 and IPv6 forwarding.
    pub fn gateway_netns(&mut self, role: &str) -> String {
        let name = self.netns(role);
        sysctl(&name, &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        name
    }

    /// A veth pair created directly in the two namespaces: `a_if` in `a`, `b_if` in `b`.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        ip(a, &["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b]);
    }

    /// A fresh directory for one daemon's state and control socket.
    fn daemon_dir(&mut self, ns: &str) -> PathBuf {
        self.daemons += 1;
        let d = self.dir.join(format!("d{}-{}", self.daemons, ns.split('-').next().unwrap_or(ns)));
        fs::create_dir_all(&d).unwrap();
        d
    }
}

impl Default for Lab {
    fn default() -> Lab {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            // Safety net: anything still running in our namespaces was started by this test.
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: plain kill(2) of a process id that lives in our namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Moves the calling thread into namespace `ns`.
pub fn enter(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    // SAFETY: setns(2) on a namespace file descriptor we hold open; it only affects this
    // thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns({ns}): {}", io::Error::last_os_error());
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result (a panic in `f`
/// is a panic here).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
    })
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Starts `f` on a fresh thread inside namespace `ns`.
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
}

// ---------------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------------

/// `SocketAddr` of `ip` and `port`.
pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// A UDP socket bound to `addr` in namespace `ns`, with read and write timeouts.
pub fn udp(ns: &str, addr: SocketAddr) -> UdpSocket {
    let s = in_ns(ns, || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind UDP {addr} in {ns}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// A TCP listener on `addr` in namespace `ns`.
pub fn listen(ns: &str, addr: SocketAddr) -> TcpListener {
    in_ns(ns, || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("listen {addr} in {ns}: {e}"))
}

/// A TCP connection from namespace `ns` to `to`, given up after `within`; the stream has
/// read and write timeouts.
pub fn connect(ns: &str, to: SocketAddr, within: Duration) -> io::Result<TcpStream> {
    let s = in_ns(ns, || TcpStream::connect_timeout(&to, within))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Accepts one connection within `within` (`TimedOut` otherwise); the stream has timeouts.
pub fn accept(l: &TcpListener, within: Duration) -> io::Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + within;
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok((s, a));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection arrived"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `recv_from`, again when a signal interrupted it (a socket with a timeout returns `EINTR`
/// even for a handler installed with `SA_RESTART`; CI once saw one).
pub fn recv_from(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    loop {
        match sock.recv_from(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// True for the errors a read timeout produces.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// A raw ICMP (or ICMPv6) socket in namespace `ns`, to watch what a host receives.
///
/// It is wrapped in a `UdpSocket` only to borrow its `recv_from` and timeout methods, which
/// are plain `recvfrom(2)`/`setsockopt(2)` calls that work on any datagram socket.
pub fn raw_icmp(ns: &str, v6: bool) -> UdpSocket {
    let fd = in_ns(ns, || {
        let (domain, proto) = if v6 {
            (libc::AF_INET6, libc::IPPROTO_ICMPV6)
        } else {
            (libc::AF_INET, libc::IPPROTO_ICMP)
        };
        // SAFETY: socket(2) with constant arguments.
        unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) }
    });
    assert!(fd >= 0, "raw ICMP socket in {ns}: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh socket nobody else owns; the UdpSocket closes it on drop.
    let s = unsafe { UdpSocket::from_raw_fd(fd) };
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    s
}

/// The ICMP (or ICMPv6) messages queued on raw socket `raw`, each with the source it came
/// from and the message from its ICMP header on (the IPv4 header removed), drained until the
/// socket has been quiet for 200 ms (at most 3 s).
pub fn icmp_messages(raw: &UdpSocket, v6: bool) -> Vec<(IpAddr, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let (n, from) = match recv_from(raw, &mut buf) {
            Ok(x) => x,
            Err(e) if is_timeout(&e) => break,
            Err(e) => panic!("raw socket: {e}"),
        };
        let p = &buf[..n];
        if v6 {
            // ICMPv6 raw sockets deliver the ICMPv6 message only; the source is `from`.
            out.push((from.ip(), p.to_vec()));
        } else if n >= 20 && p[0] >> 4 == 4 {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            out.push((src, p.get(ihl..).unwrap_or_default().to_vec()));
        }
    }
    out
}

/// Sources of the ICMP echo requests queued on raw socket `raw` (see [`icmp_messages`]).
pub fn echo_request_sources(raw: &UdpSocket, v6: bool) -> Vec<IpAddr> {
    let echo_request = if v6 { 128 } else { 8 };
    icmp_messages(raw, v6)
        .into_iter()
        .filter(|(_, m)| m.first() == Some(&echo_request))
        .map(|(src, _)| src)
        .collect()
}

/// True when `haystack` contains the bytes of address `a`.
pub fn mentions(haystack: &[u8], a: IpAddr) -> bool {
    let needle = match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    haystack.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// Sets an integer socket option.
pub fn set_int_opt(fd: &impl AsRawFd, level: i32, name: i32, value: i32) {
    // SAFETY: setsockopt(2) with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt({level}, {name}): {}", io::Error::last_os_error());
}

/// Reads an integer socket option.
pub fn get_int_opt(fd: &impl AsRawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt(2) into a live c_int with its size.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), level, name, (&mut v as *mut i32).cast(), &mut len)
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// A `vipgate gateway` running in a namespace. Drop kills it (SIGKILL) if it still runs and,
/// when the test is failing, prints its log.
pub struct Daemon {
    child: Option<Child>,
    /// Its process id, kept after it was reaped.
    pid: i32,
    status: Option<ExitStatus>,
    /// Namespace it runs in.
    pub ns: String,
    /// Its control socket.
    pub control: PathBuf,
    /// Its stderr/stdout.
    pub log: PathBuf,
    /// Its state directory.
    pub state: PathBuf,
    /// The arguments it was started with (without state directory and control socket).
    pub args: Vec<String>,
}

impl Daemon {
    /// Starts `vipgate gateway ARGS --state-dir .. --control-socket ..` in `ns` without
    /// waiting for it.
    pub fn spawn(lab: &mut Lab, ns: &str, args: &[&str]) -> Daemon {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Daemon::spawn_on(lab, ns, args, None)
    }

    /// Starts `vipgate gateway` in `ns` with `args`, on state directory `state` (a fresh one
    /// when `None`), with a fresh control socket and log, without waiting for it.
    fn spawn_on(lab: &mut Lab, ns: &str, args: Vec<String>, state: Option<PathBuf>) -> Daemon {
        Daemon::spawn_as(lab, ns, "gateway", args, state)
    }

    /// Starts `vipgate authority` (the authority without a data plane) in `ns` and waits until
    /// it is ready.
    pub fn start_authority(lab: &mut Lab, ns: &str, args: &[&str]) -> Daemon {
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut d = Daemon::spawn_as(lab, ns, "authority", args, None);
        d.wait_ready();
        d
    }

    fn spawn_as(
        lab: &mut Lab,
        ns: &str,
        sub: &str,
        args: Vec<String>,
        state: Option<PathBuf>,
    ) -> Daemon {
        let dir = lab.daemon_dir(ns);
        let control = dir.join("ctl.sock");
        let state = state.unwrap_or_else(|| dir.join("state"));
        let log = dir.join("daemon.log");
        let f = File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN, sub])
            .args(&args)
            .arg("--state-dir")
            .arg(&state)
            .arg("--control-socket")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start vipgate {sub} in {ns}: {e}"));
        let pid = child.id() as i32;
        Daemon {
            child: Some(child),
            pid,
            status: None,
            ns: ns.to_string(),
            control,
            log,
            state,
            args,
        }
    }

    /// Starts another `vipgate gateway` in the same namespace with the same arguments and
    /// the same state directory (a restart, or a second instance while this one runs), with
    /// its own control socket and log, without waiting for it.
    pub fn spawn_again(&self, lab: &mut Lab) -> Daemon {
        Daemon::spawn_on(lab, &self.ns, self.args.clone(), Some(self.state.clone()))
    }

    /// Like [`Daemon::spawn_again`], with `extra` arguments after the first daemon's.
    pub fn spawn_again_with(&self, lab: &mut Lab, extra: &[&str]) -> Daemon {
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|a| a.to_string()));
        Daemon::spawn_on(lab, &self.ns, args, Some(self.state.clone()))
    }

    /// Like [`Daemon::spawn_again`], then waits until the new daemon is ready.
    pub fn restart(&self, lab: &mut Lab) -> Daemon {
        let mut d = self.spawn_again(lab);
        d.wait_ready();
        d
    }

    /// Starts `vipgate gateway ARGS` in `ns` expecting it to refuse: a non-zero exit within
    /// 5 s. Returns its output.
    pub fn refused(lab: &mut Lab, ns: &str, args: &[&str]) -> String {
        let mut d = Daemon::spawn(lab, ns, args);
        let status = d.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
            panic!("vipgate gateway {args:?} did not refuse:\n{}", d.log_text())
        });
        assert!(!status.success(), "vipgate gateway {args:?} exited 0:\n{}", d.log_text());
        d.log_text()
    }

    /// Starts the daemon and waits until it is ready (its log says `ready` and its control
    /// socket answers); panics with its log if it exits or is not ready within 10 s.
    pub fn start(lab: &mut Lab, ns: &str, args: &[&str]) -> Daemon {
        let mut d = Daemon::spawn(lab, ns, args);
        d.wait_ready();
        d
    }

    /// Waits until the daemon is ready (bounded by [`READY_TIMEOUT`]).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(s) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "vipgate gateway in {} exited ({s}) before ready:\n{}",
                    self.ns,
                    self.log_text()
                );
            }
            if self.log_text().lines().any(|l| l.trim_end().ends_with(" ready")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "vipgate gateway in {} not ready within {READY_TIMEOUT:?}:\n{}",
                self.ns,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.stats();
    }

    /// The process id of the daemon (`ip netns exec` execs it in place).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Panics unless the daemon's process is really gone: reaped, and no process of its id
    /// is left (a `kill -9` that did not kill would leave one).
    pub fn assert_gone(&self) {
        assert!(self.child.is_none(), "the daemon (pid {}) has not exited", self.pid);
        let cmdline = fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        assert!(
            !contains(&cmdline, b"vipgate"),
            "a vipgate process of pid {} still exists: {}",
            self.pid,
            String::from_utf8_lossy(&cmdline)
        );
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn query(&self, what: &str) -> serde_json::Value {
        let o = run_within(
            Command::new(BIN).arg(what).arg("--control-socket").arg(&self.control).arg("--json"),
            Duration::from_secs(10),
        );
        assert!(
            o.status.success(),
            "`vipgate {what}` failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&o.stderr).trim(),
            self.log_text()
        );
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("`vipgate {what} --json` printed no JSON ({e})"))
    }

    /// `vipgate stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        self.query("stats")
    }

    /// `vipgate leases --json`.
    pub fn leases(&self) -> Vec<serde_json::Value> {
        match self.query("leases") {
            serde_json::Value::Array(v) => v,
            other => panic!("`vipgate leases --json` is not an array: {other}"),
        }
    }

    /// A top-level counter of `vipgate stats --json`.
    pub fn counter(&self, name: &str) -> u64 {
        let s = self.stats();
        s[name].as_u64().unwrap_or_else(|| panic!("stats have no counter {name:?}: {s}"))
    }

    /// A drop counter of `vipgate stats --json`.
    pub fn drops(&self, reason: &str) -> u64 {
        let s = self.stats();
        s["drops"][reason].as_u64().unwrap_or_else(|| panic!("stats have no drop {reason:?}: {s}"))
    }

    /// The virtual address of the lease of `real` towards `partner`.
    pub fn virtual_of(&self, real: IpAddr, partner: IpAddr) -> IpAddr {
        let leases = self.leases();
        leases
            .iter()
            .find(|l| {
                l["real"].as_str() == Some(&real.to_string())
                    && l["partner"].as_str() == Some(&partner.to_string())
            })
            .and_then(|l| l["virtual"].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("no lease of {real} towards {partner}: {leases:?}"))
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        assert!(self.child.is_some(), "signal {signal} to a daemon already reaped");
        // SAFETY: kill(2) of the daemon we started and have not reaped yet.
        let r = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(r, 0, "kill: {}", io::Error::last_os_error());
    }

    /// Waits for the daemon to exit (bounded); `None` if it still runs after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(s) = child.try_wait().expect("wait for daemon") {
                self.status = Some(s);
                self.child = None;
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits up to 5 s for the exit status (panics if it does not exit).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(Duration::from_secs(5)) {
            Some(s) => s,
            None => {
                panic!("vipgate gateway did not exit within 5 s of SIGTERM:\n{}", self.log_text())
            }
        }
    }

    /// SIGKILL (a crash) and reaps it.
    pub fn crash(&mut self) {
        self.signal(libc::SIGKILL);
        assert!(self.wait_exit(Duration::from_secs(5)).is_some(), "SIGKILL did not end the daemon");
        self.assert_gone();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- log of vipgate gateway in {} -----\n{}", self.ns, self.log_text());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The standard topology
// ---------------------------------------------------------------------------------------------

/// The served IPv4 prefix.
pub const LAN4: &str = "192.0.2.0/24";
/// The served IPv6 prefix.
pub const LAN6: &str = "2001:db8:1::/64";
/// The IPv4 pool.
pub const POOL4: &str = "198.18.0.0/24";
/// The IPv6 pool.
pub const POOL6: &str = "2001:db8:ff::/64";
/// The server.
pub const SRV4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The server.
pub const SRV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// The third party.
pub const TP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The third party.
pub const TP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);

/// Client `i`'s real address.
pub fn client_addr(i: usize, v6: bool) -> IpAddr {
    let host = 10 + i as u16;
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, host))
    } else {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, host as u8))
    }
}

/// True when `a` lies in prefix `net` (`"a.b.c.d/len"` or IPv6).
pub fn within(a: IpAddr, net: &str) -> bool {
    let (base, len) = net.split_once('/').expect("prefix");
    let len: u32 = len.parse().unwrap();
    match (a, base.parse::<IpAddr>().unwrap()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// True when `a` is a virtual address of the standard pools.
pub fn in_pool(a: IpAddr) -> bool {
    within(a, POOL4) || within(a, POOL6)
}

/// True when `a` is a real LAN address.
pub fn in_lan(a: IpAddr) -> bool {
    within(a, LAN4) || within(a, LAN6)
}

/// The standard topology:
///
/// ```text
///  cli0 eth0 192.0.2.10 ─┐                    ┌─ wan0 198.51.100.1 ── eth0 198.51.100.2 srv
///  cli1 eth0 192.0.2.11 ─┼─ br0 192.0.2.1  gw │    2001:db8:2::1          2001:db8:2::2
///   ...  2001:db8:1::N  ─┘   2001:db8:1::1    └─ wan1 203.0.113.1  ── eth0 203.0.113.2  tp
///                                                  2001:db8:3::1          2001:db8:3::2
/// ```
///
/// Clients route everything via the gateway; the server and the third party route only the
/// pools (198.18.0.0/24, 2001:db8:ff::/64) via the gateway, never the LAN, so a packet that
/// left untranslated could never be answered.
pub struct Topo {
    /// Namespace `gw`.
    pub gw: String,
    /// Namespace of each client.
    pub clients: Vec<String>,
    /// Namespace `srv`.
    pub srv: String,
    /// Namespace `tp` (third party).
    pub tp: String,
    /// The lab (dropped last: declared last).
    pub lab: Lab,
}

impl Topo {
    /// Builds the topology with `clients` client namespaces. The WAN links are created
    /// before the LAN bridge, so the ICMP errors the gateway box itself originates towards a
    /// virtual address (e.g. "fragmentation needed" for the 1280-byte server link) come from
    /// its first WAN address, 198.51.100.1 (Linux picks the first suitable address in device
    /// order, as the TUN has none).
    pub fn new(clients: usize) -> Topo {
        Topo::build(clients, false)
    }

    /// Like [`Topo::new`], but the LAN bridge is created first, so the gateway's own ICMP
    /// errors come from its LAN address 192.0.2.1 / 2001:db8:1::1, inside the served prefix.
    pub fn lan_first(clients: usize) -> Topo {
        Topo::build(clients, true)
    }

    fn build(clients: usize, lan_first: bool) -> Topo {
        let mut lab = Lab::new();
        let gw = lab.gateway_netns("gw");
        let srv = lab.netns("srv");
        let tp = lab.netns("tp");
        let clients: Vec<String> = (0..clients).map(|i| lab.netns(&format!("c{i}"))).collect();

        if !lan_first {
            lab.veth(&gw, "wan0", &srv, "eth0");
            lab.veth(&gw, "wan1", &tp, "eth0");
        }
        ip(&gw, &["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        let mut g = String::new();
        for (i, c) in clients.iter().enumerate() {
            lab.veth(&gw, &format!("lan{i}"), c, "eth0");
            g += &format!("link set lan{i} master br0\nlink set lan{i} up\n");
        }
        if lan_first {
            lab.veth(&gw, "wan0", &srv, "eth0");
            lab.veth(&gw, "wan1", &tp, "eth0");
        }
        g += "addr add 192.0.2.1/24 dev br0\n\
              addr add 2001:db8:1::1/64 dev br0 nodad\n\
              link set br0 up\n\
              addr add 198.51.100.1/24 dev wan0\n\
              addr add 2001:db8:2::1/64 dev wan0 nodad\n\
              link set wan0 up\n\
              addr add 203.0.113.1/24 dev wan1\n\
              addr add 2001:db8:3::1/64 dev wan1 nodad\n\
              link set wan1 up\n";
        ip_batch(&gw, &g);
        for (i, c) in clients.iter().enumerate() {
            ip_batch(
                c,
                &format!(
                    "addr add {}/24 dev eth0\n\
                     addr add {}/64 dev eth0 nodad\n\
                     link set eth0 up\n\
                     route add default via 192.0.2.1\n\
                     route add default via 2001:db8:1::1\n",
                    client_addr(i, false),
                    client_addr(i, true)
                ),
            );
        }
        for (ns, n4, n6) in [(&srv, "198.51.100", "2001:db8:2"), (&tp, "203.0.113", "2001:db8:3")] {
            ip_batch(
                ns,
                &format!(
                    "addr add {n4}.2/24 dev eth0\n\
                     addr add {n6}::2/64 dev eth0 nodad\n\
                     link set eth0 up\n\
                     route add {POOL4} via {n4}.1\n\
                     route add {POOL6} via {n6}::1\n"
                ),
            );
        }
        Topo { gw, clients, srv, tp, lab }
    }

    /// Sets the MTU of the gateway–server link (both ends).
    pub fn set_server_link_mtu(&self, mtu: u32) {
        let m = mtu.to_string();
        ip(&self.gw, &["link", "set", "wan0", "mtu", &m]);
        ip(&self.srv, &["link", "set", "eth0", "mtu", &m]);
    }

    /// Sets the MTU of client `i`'s link to the gateway (both ends, and the bridge).
    pub fn set_client_link_mtu(&self, i: usize, mtu: u32) {
        let m = mtu.to_string();
        ip(&self.gw, &["link", "set", &format!("lan{i}"), "mtu", &m]);
        ip(&self.gw, &["link", "set", "br0", "mtu", &m]);
        ip(&self.clients[i], &["link", "set", "eth0", "mtu", &m]);
    }

    /// Starts the gateway with the standard LAN and pools plus `extra` flags.
    pub fn gateway(&mut self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--lan", LAN4, "--lan", LAN6, "--pool", POOL4, "--pool", POOL6];
        args.extend_from_slice(extra);
        let gw = self.gw.clone();
        Daemon::start(&mut self.lab, &gw, &args)
    }

    /// Starts the gateway with exactly `args` (plus state directory and control socket).
    pub fn gateway_with(&mut self, args: &[&str]) -> Daemon {
        let gw = self.gw.clone();
        Daemon::start(&mut self.lab, &gw, args)
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips through the gateway
// ---------------------------------------------------------------------------------------------

/// Client sends on `client` to `server`'s address, the server answers whoever it saw; returns
/// the source the server saw. Panics if either direction fails.
pub fn udp_roundtrip(client: &UdpSocket, server: &UdpSocket) -> SocketAddr {
    let to = server.local_addr().unwrap();
    client.send_to(b"hello", to).unwrap_or_else(|e| panic!("UDP send to {to}: {e}"));
    let mut buf = [0u8; 64];
    let (n, seen) = recv_from(server, &mut buf)
        .unwrap_or_else(|e| panic!("UDP to {to}: nothing arrived at the server ({e})"));
    assert_eq!(&buf[..n], b"hello");
    server.send_to(b"welcome", seen).unwrap();
    let (n, from) = recv_from(client, &mut buf)
        .unwrap_or_else(|e| panic!("UDP reply from {to} to {seen} never came back ({e})"));
    assert_eq!((&buf[..n], from), (&b"welcome"[..], to), "reply from the wrong address");
    seen
}

/// A TCP connection from namespace `ns` to `to` (which `listener` serves, maybe through a
/// virtual address), with data both ways; returns the peer address the listener saw.
pub fn tcp_roundtrip(ns: &str, listener: &TcpListener, to: SocketAddr) -> SocketAddr {
    let mut c = connect(ns, to, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("TCP connect from {ns} to {to}: {e}"));
    let (mut s, peer) =
        accept(listener, IO_TIMEOUT).unwrap_or_else(|e| panic!("TCP to {to}: no accept ({e})"));
    let mut b = [0u8; 5];
    c.write_all(b"hello").unwrap();
    s.read_exact(&mut b).unwrap_or_else(|e| panic!("TCP data to {to}: {e}"));
    assert_eq!(&b, b"hello");
    s.write_all(b"world").unwrap();
    c.read_exact(&mut b).unwrap_or_else(|e| panic!("TCP data back from {to}: {e}"));
    assert_eq!(&b, b"world");
    peer
}

// ---------------------------------------------------------------------------------------------
// Captures
// ---------------------------------------------------------------------------------------------

/// A `tcpdump` writing a capture file, running in a namespace; killed on drop.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i IFACE -w FILE FILTER...` in `ns` and waits (bounded) until it listens.
    pub fn start(ns: &str, iface: &str, file: &Path, filter: &[&str]) -> Capture {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-Z", "root", "-i", iface, "-U", "-n"])
            // Immediate mode: packets reach the file at once, not when a ring block fills.
            .args(["--immediate-mode", "-s", "0", "-w"])
            .arg(file)
            .args(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run tcpdump (is it installed?): {e}"));
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufRead::lines(io::BufReader::new(err)).map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut cap = Capture { child, file: file.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => return cap,
                Ok(l) => said.push(l),
                Err(_) => {
                    let status = cap.child.try_wait().ok().flatten();
                    panic!("tcpdump in {ns} is not listening after 5 s ({status:?}): {said:?}")
                }
            }
        }
    }

    /// Stops it with SIGINT (it flushes the file) and returns the capture's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        // SAFETY: kill(2) of the tcpdump we started (`ip netns exec` execs it in place) and
        // have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "tcpdump did not stop within 5 s of SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        }
        fs::read(&self.file).unwrap_or_else(|e| panic!("{}: {e}", self.file.display()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// True when `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// An empty capture file: the pcap file header alone.
pub const EMPTY_PCAP: usize = 24;
