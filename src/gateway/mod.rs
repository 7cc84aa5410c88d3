//! `vipgate gateway`: the TUN device, the routing that steers traffic into it, and the
//! single-threaded mio loop that drives the translator.
//!
//! The loop drains the TUN until `WouldBlock` in batches of at most [`BATCH`] packets per
//! turn, translates each packet in place in one reused buffer and writes it back (no
//! allocation and no syscall per packet beyond the read and the write), runs expiry at the
//! translator's next deadline, logs lease creation and deletion (the RFC 6888 §4 mapping log),
//! and serves the local control socket and the optional metrics endpoint between batches.

pub mod claim;
pub mod durable;
pub mod firewall;
pub mod queue;
pub mod reload;
pub mod rental;
pub mod routing;
#[allow(unsafe_code)] // the ioctls and writev of the TUN device, nowhere else
pub mod tun;

use crate::authority::RateLimiter;
use crate::config::{GatewayConfig, OnStop};
use crate::control::{self, LeaseRecord, Request, Stats};
use crate::nat::{DropReason, LeaseEvent, Origin, Translator, Verdict};
use crate::store::Done;
use crate::wire::vnet::{self, Checksum, VnetHdr};
use anyhow::{Context, Result};
use durable::Durable;
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use queue::Queues;
use rental::Rental;
use routing::Routing;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};
use tun::{Sent, TunDevice};

/// Most packets handled per turn of the loop before other sources get their turn.
pub const BATCH: usize = 64;
/// The largest frame a TUN read returns: a 64 KB (super-)packet and its virtio-net header.
const FRAME_MAX: usize = 65536 + vnet::HDR_LEN;
/// With queue threads, the main loop wakes at least this often (their new flows may bring
/// the next expiry closer than the loop knows).
const MAX_SLEEP_WITH_QUEUES: Duration = Duration::from_secs(1);

/// The translator, shared with the queue threads (`--queues`).
type SharedNat = Arc<Mutex<Translator>>;

/// The translator, whatever a panicked holder left (a panic in it is a bug; the lease table
/// stays consistent because every change completes before the lock is released).
fn lock(nat: &Mutex<Translator>) -> MutexGuard<'_, Translator> {
    nat.lock().unwrap_or_else(PoisonError::into_inner)
}
const TUN: Token = Token(0);
const CONTROL: Token = Token(1);
const METRICS: Token = Token(2);
const SIGNALS: Token = Token(3);
const WAKER: Token = Token(4);
/// How often ended history past its retention is deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
const FIRST_CONN: usize = 16;
/// Connections of the control socket at once.
const MAX_CONNS: usize = 64;
/// Connections of the metrics port at once (slots apart from the control socket's).
const MAX_METRICS_CONNS: usize = 32;
/// Metrics connections one source (an IPv4 address or IPv6 /64) holds at once.
const MAX_METRICS_CONNS_PER_SOURCE: usize = 8;
const _: () = assert!(FIRST_CONN + MAX_CONNS + MAX_METRICS_CONNS <= rental::LISTENER_TOKENS);
const CONN_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONN_INPUT: usize = 8192;
/// How often dropped-packet counts are summarised in the log (bounds log volume).
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Runs the gateway until SIGINT or SIGTERM; on the way out closes what it installed (or
/// removes it, as `--on-stop` says). SIGHUP reads the configuration again from `reload`.
pub fn run(cfg: GatewayConfig, reload: Option<reload::Source>) -> Result<()> {
    run_with(cfg, reload, true)
}

/// Runs the rental authority alone (`vipgate authority`): the lease table, its store, the
/// TLS port and the control socket, with no TUN device and no routing, for gateways that
/// will share it. Leases rented here are durable and inquirable like the gateway's.
pub fn run_authority(cfg: GatewayConfig, reload: Option<reload::Source>) -> Result<()> {
    if cfg.authority.is_none() {
        anyhow::bail!(
            "`vipgate authority` without its TLS port would serve nothing: drop --no-authority"
        );
    }
    run_with(cfg, reload, false)
}

/// The claim on the routing table and rule band of `table` and `priority`, for `holder`.
fn claim_band(table: u32, priority: u32, holder: &str) -> Result<claim::Claim> {
    let band = claim::Band { table, priority, len: routing::RULE_BAND };
    claim::Claim::take(&band, holder)
}

/// `vipgate cleanup`: removes every rule of the band and every route of the table, the guard
/// of a gateway that stopped closed and the leftovers of a crashed one. Refuses while a
/// gateway holds them. Returns the rules deleted.
pub fn cleanup(table: u32, priority: u32) -> Result<usize> {
    let holder = format!("vipgate cleanup pid {}", std::process::id());
    let _claim = claim_band(table, priority, &holder)?;
    let routing = Routing { tun: String::new(), table, priority, lan: vec![], pools: vec![] };
    routing.remove()
}

fn run_with(cfg: GatewayConfig, reload: Option<reload::Source>, data_plane: bool) -> Result<()> {
    // Before anything changes: the box can run it, and the routing band is ours alone.
    let claim = if data_plane {
        for w in routing::preflight(&cfg, routing::Mode::Start)?.warnings {
            warn!("{w}");
        }
        let holder = format!("vipgate gateway pid {}, TUN {}", std::process::id(), cfg.tun);
        Some(claim_band(cfg.route_table, cfg.rule_priority, &holder)?)
    } else {
        None
    };
    crate::limits::raise_descriptors(rental::MAX_CONNS + MAX_CONNS + MAX_METRICS_CONNS).log();
    crate::store::private_dir(&cfg.state_dir, "state directory", true)
        .with_context(|| format!("cannot create state directory {}", cfg.state_dir.display()))?;
    let control = bind_control(&cfg.control_socket, &cfg.state_dir)?;
    let metrics = bind_metrics(cfg.metrics_listen)?;
    let routing = Routing {
        tun: cfg.tun.clone(),
        table: cfg.route_table,
        priority: cfg.rule_priority,
        lan: cfg.nat.lan.clone(),
        pools: cfg.nat.pools.clone(),
    };
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let start = Instant::now();
    let mut nat =
        Translator::new(cfg.nat.clone(), seed, start).map_err(|e| anyhow::anyhow!("{e}"))?;
    let poll = Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
    // The lease database first: a locked or damaged one stops us before anything changes.
    let durable = Durable::open(&cfg.state_dir, Arc::clone(&waker), &mut nat)?;
    let rental = match &cfg.authority {
        None => None,
        Some(a) => {
            let (cert, key) = match &a.cert {
                Some((c, k)) => (Some(c.as_path()), Some(k.as_path())),
                None => (None, None),
            };
            let (tls, cert_path) = crate::tls::server_config(&cfg.state_dir, cert, key)?;
            let r = Rental::bind(
                &a.listen,
                tls,
                cfg.nat.lan.clone(),
                a.inquiry_rate,
                a.conns_per_source,
                a.rent_rate,
                poll.registry(),
            )?;
            let fp = crate::tls::read_certs(&cert_path)
                .ok()
                .and_then(|c| c.first().map(|c| crate::tls::fingerprint(c)))
                .unwrap_or_default();
            let addrs: Vec<String> = r.local_addrs().iter().map(|a| a.to_string()).collect();
            info!(
                "authority on {} (TLS 1.3); clients pin {} (SHA-256 {fp})",
                addrs.join(", "),
                cert_path.display()
            );
            Some(r)
        }
    };

    let mut extra_queues = Vec::new();
    let (tun, _cleanup) = if data_plane {
        let leftovers = routing.remove_leftovers()?;
        if leftovers > 0 {
            warn!(
                "removed {leftovers} policy rules left by a previous run (priorities {}..{})",
                cfg.rule_priority,
                cfg.rule_priority + routing::RULE_BAND - 1
            );
        }
        let mut tuns = if cfg.queues > 1 {
            TunDevice::open_queues(&cfg.tun, cfg.offload, cfg.queues)?
        } else {
            vec![TunDevice::open(&cfg.tun, cfg.offload)?]
        };
        let tun = tuns.remove(0);
        extra_queues = tuns;
        let cleanup = Cleanup {
            routing: Some((routing.clone(), cfg.on_stop)),
            socket: cfg.control_socket.clone(),
            _claim: claim,
        };
        routing.install()?;
        (Some(tun), cleanup)
    } else {
        (None, Cleanup { routing: None, socket: cfg.control_socket.clone(), _claim: None })
    };

    let show = crate::config::show_nets;
    match &tun {
        Some(t) => info!(
            "vipgate gateway {}: TUN {} (offloads: {}; queues: {}), serving {} from pool {}",
            env!("CARGO_PKG_VERSION"),
            t.name(),
            t.describe_offloads(),
            cfg.queues,
            show(&cfg.nat.lan),
            show(&cfg.nat.pools)
        ),
        None => info!(
            "vipgate authority {}: renting to {} from pool {} (no data plane here)",
            env!("CARGO_PKG_VERSION"),
            show(&cfg.nat.lan),
            show(&cfg.nat.pools)
        ),
    }
    info!(
        "mapping {}, filtering {}; up to {} leases and {} flows",
        cfg.nat.mapping, cfg.nat.filtering, cfg.nat.max_leases, cfg.nat.max_flows
    );
    info!(
        "control socket {}; metrics {}; routing table {}, rule priorities {}..{}",
        cfg.control_socket.display(),
        cfg.metrics_listen.map_or("off".to_string(), |a| format!("http://{a}/metrics")),
        cfg.route_table,
        cfg.rule_priority,
        cfg.rule_priority + routing::RULE_BAND - 1
    );

    let nat: SharedNat = Arc::new(Mutex::new(nat));
    let queues = if extra_queues.is_empty() {
        None
    } else {
        let q = Queues::start(extra_queues, &nat, &waker).context("cannot start queue threads")?;
        Some(q)
    };
    let mut gw = Gateway {
        nat,
        queues,
        tun,
        buf: vec![0u8; FRAME_MAX].into_boxed_slice(),
        scratch: vec![0u8; FRAME_MAX].into_boxed_slice(),
        stats: Stats::default(),
        start,
        conns: Vec::new(),
        last_drops: [0; DropReason::COUNT],
        durable: Some(durable),
        rental,
        cfg: cfg.clone(),
        reload,
    };
    let result = gw.run(poll, control, metrics);
    if let Some(q) = gw.queues.take() {
        q.stop();
    }
    if let Some(d) = gw.durable.take() {
        d.close();
    }
    result?;
    match (data_plane, cfg.on_stop) {
        (false, _) => info!("stopped"),
        (true, OnStop::Open) => {
            info!("stopped; removing TUN {}, its routes and rules (--on-stop open)", cfg.tun)
        }
        (true, OnStop::Closed) => info!(
            "stopped; the guard stays: hosts of {} are refused and {} is unreachable until the \
             next start or `vipgate cleanup --route-table {} --rule-priority {}`",
            show(&cfg.nat.lan),
            show(&cfg.nat.pools),
            cfg.route_table,
            cfg.rule_priority
        ),
    }
    Ok(())
}

/// However the gateway ends: closes or removes the routing (as `--on-stop` says), removes the
/// control socket, then gives up the claim on the band.
struct Cleanup {
    routing: Option<(Routing, OnStop)>,
    socket: PathBuf,
    _claim: Option<claim::Claim>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let done = match &self.routing {
            None => Ok(0),
            Some((r, OnStop::Closed)) => r.close(),
            Some((r, OnStop::Open)) => r.remove(),
        };
        if let Err(e) = done {
            warn!("cleanup: {e:#}");
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The metrics endpoint's listener on `at`, if any.
fn bind_metrics(at: Option<std::net::SocketAddr>) -> Result<Option<TcpListener>> {
    at.map(|a| TcpListener::bind(a).with_context(|| format!("cannot listen for metrics on {a}")))
        .transpose()
}

/// Moves the metrics endpoint to `to` (off when `None`): the new listener first, so a
/// failure leaves the running one.
fn rebind_metrics(
    poll: &Poll,
    metrics: &mut Option<TcpListener>,
    to: Option<std::net::SocketAddr>,
) -> Result<()> {
    let mut new = bind_metrics(to)?;
    if let Some(l) = new.as_mut() {
        poll.registry().register(l, METRICS, Interest::READABLE)?;
    }
    if let Some(mut old) = metrics.take() {
        let _ = poll.registry().deregister(&mut old);
    }
    *metrics = new;
    Ok(())
}

fn bind_control(path: &Path, state_dir: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Narrowed only when it is vipgate's own: the state directory, or one named after
        // vipgate (the default /run/vipgate); never a shared one such as /run or /tmp.
        let ours = dir == state_dir
            || dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vipgate"));
        crate::store::private_dir(dir, "control socket directory", ours)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "another gateway answers on {}: stop it or give this one another --control-socket",
            path.display()
        );
    }
    // Bound with mode 0600 from the start; a stale socket is replaced.
    let l = control::bind_private(path)?;
    l.set_nonblocking(true)?;
    Ok(UnixListener::from_std(l))
}

enum ConnStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl ConnStream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            ConnStream::Unix(s) => s,
            ConnStream::Tcp(s) => s,
        }
    }
}

impl Read for ConnStream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            ConnStream::Unix(s) => s.read(b),
            ConnStream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for ConnStream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            ConnStream::Unix(s) => s.write(b),
            ConnStream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A control or metrics connection: one request in, one reply out, then closed.
struct Conn {
    stream: ConnStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
    done: bool,
    /// A history query this connection waits for.
    waiting: Option<u64>,
    /// The client closed its sending side: nothing more to read, the reply is still owed.
    eof: bool,
    /// The source a metrics connection counts against (none for the control socket).
    source: Option<IpAddr>,
}

struct Gateway {
    nat: SharedNat,
    /// The TUN's other queues, each with its own thread (`--queues`).
    queues: Option<Queues>,
    tun: Option<TunDevice>,
    /// One frame as read from the TUN (virtio-net header, then the packet).
    buf: Box<[u8]>,
    /// One segment, when a super-packet must be cut in software.
    scratch: Box<[u8]>,
    stats: Stats,
    start: Instant,
    conns: Vec<Option<Conn>>,
    last_drops: [u64; DropReason::COUNT],
    durable: Option<Durable>,
    rental: Option<Rental>,
    /// The configuration in force.
    cfg: GatewayConfig,
    /// Where a SIGHUP reads the configuration again.
    reload: Option<reload::Source>,
}

impl Gateway {
    fn run(
        &mut self,
        poll: Poll,
        control: UnixListener,
        metrics: Option<TcpListener>,
    ) -> Result<()> {
        let mut poll = poll;
        let mut control = control;
        let mut metrics = metrics;
        let mut events = Events::with_capacity(256);
        if let Some(tun) = &self.tun {
            let fd = tun.as_raw_fd();
            poll.registry().register(&mut SourceFd(&fd), TUN, Interest::READABLE)?;
        }
        poll.registry().register(&mut control, CONTROL, Interest::READABLE)?;
        if let Some(m) = metrics.as_mut() {
            poll.registry().register(m, METRICS, Interest::READABLE)?;
        }
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        info!("ready");

        let mut tun_pending = self.tun.is_some();
        let mut next_report = Instant::now() + REPORT_EVERY;
        let mut next_purge = Instant::now();
        let mut rental_deadline = None;
        loop {
            let now = Instant::now();
            let timeout = if tun_pending {
                Some(Duration::ZERO)
            } else {
                let mut next = next_report;
                if let Some(t) = lock(&self.nat).poll_timeout() {
                    next = next.min(t);
                }
                if self.queues.is_some() {
                    next = next.min(now + MAX_SLEEP_WITH_QUEUES);
                }
                if let Some(t) = self.conns.iter().flatten().map(|c| c.deadline).min() {
                    next = next.min(t);
                }
                if let Some(t) = rental_deadline {
                    next = next.min(t);
                }
                if let Some(t) = self.durable.as_ref().and_then(|d| d.give_up_at()) {
                    next = next.min(t);
                }
                Some(next.saturating_duration_since(now))
            };
            match poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("poll failed"),
            }
            let mut stop = false;
            for ev in events.iter() {
                match ev.token() {
                    TUN => tun_pending = true,
                    CONTROL => self.accept(&mut poll, |_| {
                        let (s, _) = control.accept()?;
                        Ok(ConnStream::Unix(s))
                    }),
                    METRICS => {
                        if let Some(m) = metrics.as_mut() {
                            self.accept(&mut poll, |_| {
                                let (s, _) = m.accept()?;
                                Ok(ConnStream::Tcp(s))
                            });
                        }
                    }
                    SIGNALS => {
                        for sig in signals.pending() {
                            if sig == signal_hook::consts::SIGHUP {
                                self.reload(&poll, &mut metrics);
                            } else {
                                info!("signal {sig}: shutting down");
                                stop = true;
                            }
                        }
                    }
                    WAKER => self.store_results(&poll, Instant::now()),
                    t if Rental::owns(t) => {
                        if let (Some(r), Some(d)) = (self.rental.as_mut(), self.durable.as_mut()) {
                            r.ready(t, poll.registry(), &mut lock(&self.nat), d);
                        }
                    }
                    Token(t) => self.serve(&mut poll, t - FIRST_CONN),
                }
            }
            let now = Instant::now();
            if tun_pending {
                tun_pending = self.drain_tun(now);
            }
            {
                let mut nat = lock(&self.nat);
                if nat.poll_timeout().is_some_and(|t| t <= now) {
                    nat.handle_timeout(now);
                }
            }
            if let (Some(r), Some(d)) = (self.rental.as_mut(), self.durable.as_mut()) {
                // Paused connections may go on; what they rent is logged and stored below,
                // in this same turn.
                r.resume(poll.registry(), &mut lock(&self.nat), d);
                rental_deadline = r.expire(now, poll.registry());
            }
            self.give_up_on_store(&poll, now);
            self.log_lease_events(now);
            self.expire_conns(&mut poll, now);
            if let Some(d) = self.durable.as_mut() {
                d.flush();
            }
            if now >= next_report {
                self.report_drops();
                next_report = now + REPORT_EVERY;
            }
            if now >= next_purge {
                if let Some(d) = self.durable.as_mut() {
                    d.purge(SystemTime::now() - self.cfg.history_retention);
                }
                next_purge = now + PURGE_EVERY;
            }
            if stop {
                return Ok(());
            }
        }
    }

    /// SIGHUP: reads the configuration again and applies what can change at run time
    /// ([`reload`]); a configuration that is refused changes nothing.
    fn reload(&mut self, poll: &Poll, metrics: &mut Option<TcpListener>) {
        let Some(source) = &self.reload else {
            info!("SIGHUP: started without --config, so there is nothing to read again");
            return;
        };
        let new = match source() {
            Ok(c) => c,
            Err(e) => {
                log::error!("SIGHUP: configuration refused, the running one stays: {e:#}");
                return;
            }
        };
        let mut run = reload::running(&self.cfg, &new);
        if run.metrics_listen != self.cfg.metrics_listen {
            if let Err(e) = rebind_metrics(poll, metrics, run.metrics_listen) {
                log::error!("SIGHUP: {e:#}; metrics stay on the running address");
                run.metrics_listen = self.cfg.metrics_listen;
            }
        }
        let now = Instant::now();
        if run.nat.timeouts != self.cfg.nat.timeouts {
            if let Err(e) = lock(&self.nat).set_timeouts(run.nat.timeouts, now) {
                log::error!("SIGHUP: timers refused ({e}); the running ones stay");
                run.nat.timeouts = self.cfg.nat.timeouts;
            }
        }
        if run.nat.exclude != self.cfg.nat.exclude {
            if let Err(e) = lock(&self.nat).set_exclude(run.nat.exclude.clone()) {
                log::error!("SIGHUP: exclude refused ({e}); the running one stays");
                run.nat.exclude = self.cfg.nat.exclude.clone();
            }
        }
        if let (Some(r), Some(a)) = (self.rental.as_mut(), run.authority.as_ref()) {
            r.set_inquiry_rate(a.inquiry_rate);
            r.set_rent_rate(a.rent_rate);
        }
        let d = reload::diff(&self.cfg, &new);
        let kept = reload::diff(&run, &new);
        let level = run.log_level;
        self.cfg = run;
        crate::config::change_log_level(level, |_| {
            if kept.applied.is_empty() {
                info!("SIGHUP: configuration read again: {}", d.describe());
            } else {
                info!(
                    "SIGHUP: configuration read again: {} (not applied: {})",
                    d.describe(),
                    kept.applied.join(", ")
                );
            }
        });
    }

    /// Reads, translates and writes back up to [`BATCH`] packets. True when packets may be
    /// left (the batch filled up before `WouldBlock`).
    fn drain_tun(&mut self, now: Instant) -> bool {
        let Some(tun) = &self.tun else { return false };
        let mut refused = false;
        let mut more = true;
        for _ in 0..BATCH {
            let n = match tun.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("TUN read failed: {e}");
                    more = false;
                    break;
                }
            };
            self.stats.tun_rx += 1;
            self.stats.tun_rx_bytes += n.saturating_sub(tun.header_len()) as u64;
            let io = Io { tun, stats: &mut self.stats, scratch: &mut self.scratch };
            let durable = &mut self.durable;
            let hold = |f: &[u8]| durable.as_mut().is_some_and(|d| d.hold(f));
            refused |= dispatch(&self.nat, io, &mut self.buf[..n], now, hold);
        }
        if refused {
            if let Some(tun) = self.tun.as_mut() {
                turn_offloads_off(tun);
            }
        }
        more
    }

    /// Takes the store writer's results: commits release the packets and replies that waited
    /// for them; answers go to whoever asked.
    fn store_results(&mut self, poll: &Poll, now: Instant) {
        loop {
            let Some(done) = self.durable.as_ref().and_then(|d| d.try_done()) else { return };
            match done {
                Done::Committed { seq } => {
                    if self.durable.as_mut().is_some_and(|d| d.committed()) {
                        lock(&self.nat).set_refuse_leases(false);
                        info!("the lease store writes again: leases are made and stored as before");
                    }
                    lock(&self.nat).set_durable(seq);
                    self.release_held(now);
                    if let Some(r) = self.rental.as_mut() {
                        r.committed(seq, poll.registry());
                    }
                }
                Done::Failed { seq, error } => {
                    let first = self.durable.as_mut().is_some_and(|d| {
                        let first = d.give_up_at().is_none() && !d.stuck();
                        d.failed(now);
                        first
                    });
                    if first {
                        log::error!(
                            "lease changes from #{seq} on could not be stored ({error}); the store \
                             retries them, their replies and packets wait (at most {} s)",
                            durable::STORE_PATIENCE.as_secs()
                        );
                    }
                }
                Done::WhoWas { token, real } => {
                    if let Some(r) = self.rental.as_mut() {
                        r.answered(token, real, poll.registry());
                    }
                }
                Done::History { token, rows } => {
                    let records: Vec<_> = rows.iter().map(durable::history_record).collect();
                    let mut line = serde_json::to_vec(&serde_json::json!({ "history": records }))
                        .unwrap_or_default();
                    line.push(b'\n');
                    self.answer_control(poll, token, line);
                }
                Done::QueryFailed { token, error } => {
                    if let Some(r) = self.rental.as_mut() {
                        r.query_failed(token, poll.registry());
                    }
                    self.answer_control(
                        poll,
                        token,
                        error_line(&format!("history query failed: {error}")),
                    );
                }
            }
        }
    }

    /// The store has failed for [`durable::STORE_PATIENCE`]: what waits for it is answered
    /// `internal`, the leases not durable are undone, their packets dropped (module docs of
    /// [`durable`]).
    fn give_up_on_store(&mut self, poll: &Poll, now: Instant) {
        let Some(d) = self.durable.as_mut() else { return };
        if !d.give_up_due(now) {
            return;
        }
        let dropped = d.drop_held();
        let mut nat = lock(&self.nat);
        nat.set_refuse_leases(true);
        let undone = nat.abandon_undurable(now);
        drop(nat);
        let answered = self.rental.as_mut().map_or(0, |r| r.store_failed(poll.registry()));
        if let Some(d) = self.durable.as_mut() {
            d.store_refused += answered as u64;
        }
        log::error!(
            "the lease store has not written for {} s: {answered} request(s) answered internal, \
             {undone} lease(s) not stored undone, {dropped} held packet(s) dropped; until it \
             writes again, rents are answered internal and no lease is made",
            durable::STORE_PATIENCE.as_secs()
        );
    }

    /// Translates again the packets held until their leases were durable.
    fn release_held(&mut self, now: Instant) {
        let Some(held) = self.durable.as_mut().map(|d| d.take_held()) else { return };
        let Some(tun) = &self.tun else { return };
        let mut refused = false;
        for mut frame in held {
            let io = Io { tun, stats: &mut self.stats, scratch: &mut self.scratch };
            let durable = &mut self.durable;
            let hold = |f: &[u8]| durable.as_mut().is_some_and(|d| d.hold(f));
            refused |= dispatch(&self.nat, io, &mut frame, now, hold);
        }
        if refused {
            if let Some(tun) = self.tun.as_mut() {
                turn_offloads_off(tun);
            }
        }
    }

    /// Gives a control connection waiting for `token` its reply.
    fn answer_control(&mut self, poll: &Poll, token: u64, line: Vec<u8>) {
        for (slot, c) in self.conns.iter_mut().enumerate() {
            if let Some(c) = c.as_mut().filter(|c| c.waiting == Some(token)) {
                c.waiting = None;
                c.output = line;
                let t = Token(FIRST_CONN + slot);
                let r = poll.registry();
                if r.reregister(c.stream.source(), t, Interest::WRITABLE).is_err() {
                    let _ = r.register(c.stream.source(), t, Interest::WRITABLE);
                    // half-closed
                }
                return;
            }
        }
    }

    fn log_lease_events(&mut self, now: Instant) {
        loop {
            let next = lock(&self.nat).poll_event();
            let Some((seq, e)) = next else { break };
            if let Some(d) = self.durable.as_mut() {
                d.record(seq, &e, now);
            }
            let (what, l, why) = match &e {
                LeaseEvent::Created(l) => ("created", l, None),
                LeaseEvent::Updated(l) => ("updated", l, None),
                LeaseEvent::Ended(l, r) => ("ended", l, Some(*r)),
                LeaseEvent::Quarantined { .. } | LeaseEvent::Lives { .. } => continue,
            };
            let origin = if l.origin == Origin::Explicit { "explicit" } else { "implicit" };
            let expires = l.expires.map(|t| control::rfc3339(t, now)).unwrap_or_else(|| "-".into());
            match why {
                None => info!(
                    "lease {what}: real={} virtual={} partner={} origin={origin} expires={expires}",
                    l.real, l.virtual_addr, l.partner
                ),
                Some(r) => info!(
                    "lease {what}: real={} virtual={} partner={} origin={origin} reason={r:?}",
                    l.real, l.virtual_addr, l.partner
                ),
            }
        }
    }

    /// Logs what was dropped since the last report, once per [`REPORT_EVERY`] at most.
    fn report_drops(&mut self) {
        let c = lock(&self.nat).counters().clone();
        let mut parts = Vec::new();
        for r in DropReason::ALL {
            let d = c.dropped(r) - self.last_drops[r as usize];
            if d > 0 {
                parts.push(format!("{}={d}", r.as_str()));
            }
            self.last_drops[r as usize] = c.dropped(r);
        }
        if !parts.is_empty() {
            info!("dropped in the last {}s: {}", REPORT_EVERY.as_secs(), parts.join(" "));
        }
    }

    fn accept(&mut self, poll: &mut Poll, mut accept: impl FnMut(()) -> io::Result<ConnStream>) {
        loop {
            let mut stream = match accept(()) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("accept failed: {e}");
                    return;
                }
            };
            // The control socket and the metrics port have slots of their own: the network
            // can never take the local socket's.
            let metrics = matches!(stream, ConnStream::Tcp(_));
            let slots =
                if metrics { MAX_CONNS..MAX_CONNS + MAX_METRICS_CONNS } else { 0..MAX_CONNS };
            if self.conns.len() < slots.end {
                self.conns.resize_with(slots.end, || None);
            }
            // One source (an IPv4 address or IPv6 /64) holds a few metrics slots at most.
            let source = match &stream {
                ConnStream::Tcp(t) => t.peer_addr().ok().map(|a| RateLimiter::source_key(a.ip())),
                ConnStream::Unix(_) => None,
            };
            let held = source.map_or(0, |k| {
                self.conns[slots.clone()].iter().flatten().filter(|c| c.source == Some(k)).count()
            });
            if held >= MAX_METRICS_CONNS_PER_SOURCE {
                debug!("too many metrics connections from one source; closing a new one");
                continue;
            }
            let Some(slot) = slots.clone().find(|&i| self.conns[i].is_none()) else {
                let what = if metrics { "metrics" } else { "control" };
                debug!("too many {what} connections; closing a new one");
                continue;
            };
            let token = Token(FIRST_CONN + slot);
            if poll.registry().register(stream.source(), token, Interest::READABLE).is_err() {
                continue;
            }
            self.conns[slot] = Some(Conn {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                written: 0,
                deadline: Instant::now() + CONN_TIMEOUT,
                done: false,
                waiting: None,
                eof: false,
                source,
            });
        }
    }

    fn serve(&mut self, poll: &mut Poll, slot: usize) {
        let Some(Some(mut c)) = self.conns.get_mut(slot).map(Option::take) else { return };
        let keep = self.progress(&mut c);
        if keep {
            let interest =
                if c.output.is_empty() { Interest::READABLE } else { Interest::WRITABLE };
            if c.eof && c.output.is_empty() {
                // Half-closed and waiting for the store: a closed side is always readable, so
                // no events until answer_control registers it again for the reply.
                let _ = poll.registry().deregister(c.stream.source());
            } else {
                let token = Token(FIRST_CONN + slot);
                let _ = poll.registry().reregister(c.stream.source(), token, interest);
            }
            self.conns[slot] = Some(c);
        } else {
            let _ = poll.registry().deregister(c.stream.source());
        }
    }

    /// Moves a connection forward; false when it is finished or broken.
    fn progress(&mut self, c: &mut Conn) -> bool {
        if c.output.is_empty() {
            let mut chunk = [0u8; 1024];
            while !c.eof {
                match c.stream.read(&mut chunk) {
                    // A client may half-close after its request: it is still answered.
                    Ok(0) => c.eof = true,
                    Ok(n) => c.input.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
                if c.input.len() > MAX_CONN_INPUT {
                    break;
                }
            }
            if c.waiting.is_some() {
                return true;
            }
            match self.respond(c) {
                Some(out) => c.output = out,
                None => return c.waiting.is_some() || (!c.eof && c.input.len() <= MAX_CONN_INPUT),
            }
        }
        while c.written < c.output.len() {
            match c.stream.write(&c.output[c.written..]) {
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        c.done = true;
        false
    }

    /// The reply to a complete request, or `None` while the request is incomplete.
    fn respond(&mut self, c: &mut Conn) -> Option<Vec<u8>> {
        let now = Instant::now();
        match c.stream {
            ConnStream::Unix(_) => {
                let end = c.input.iter().position(|&b| b == b'\n');
                let line = match end {
                    Some(i) => &c.input[..i],
                    None if c.input.len() > control::MAX_REQUEST => {
                        return Some(error_line("request line too long"))
                    }
                    None => return None,
                };
                let reply = match control::parse_request(line) {
                    Ok(Request::Leases) => {
                        let v: Vec<LeaseRecord> =
                            lock(&self.nat).leases().map(|l| LeaseRecord::of(&l, now)).collect();
                        serde_json::to_vec(&serde_json::json!({ "leases": v }))
                    }
                    Ok(Request::Stats) => serde_json::to_vec(&self.stats_now(now)),
                    Ok(Request::Revoke { virtual_addr, real, partner }) => {
                        let mut revoked = Vec::new();
                        let mut nat = lock(&self.nat);
                        for l in nat.leases_at(virtual_addr) {
                            if real.is_some_and(|r| r != l.real)
                                || partner.is_some_and(|p| p != l.partner)
                            {
                                continue;
                            }
                            if let Ok(l) = nat.release(l.id, now) {
                                info!(
                                    "revoked by the operator: real={} virtual={} partner={}",
                                    l.real, l.virtual_addr, l.partner
                                );
                                revoked.push(LeaseRecord::of(&l, now));
                            }
                        }
                        serde_json::to_vec(&serde_json::json!({ "revoked": revoked }))
                    }
                    Ok(Request::History { virtual_addr, at, limit }) => {
                        let at = match at.as_deref().map(crate::authority::parse_rfc3339) {
                            None => None,
                            Some(Some(t)) => Some(t),
                            Some(None) => return Some(error_line("bad time: use RFC 3339")),
                        };
                        let Some(d) = self.durable.as_mut() else {
                            return Some(error_line("this daemon keeps no lease history"));
                        };
                        c.waiting = Some(d.history(virtual_addr, at, limit.unwrap_or(1000)));
                        return None;
                    }
                    Err(e) => return Some(error_line(&format!("bad request: {e}"))),
                };
                let mut out = reply.unwrap_or_else(|e| error_line(&e.to_string()));
                out.push(b'\n');
                Some(out)
            }
            ConnStream::Tcp(_) => {
                let head_end = c.input.windows(4).position(|w| w == b"\r\n\r\n");
                if head_end.is_none() && c.input.len() <= MAX_CONN_INPUT {
                    return None;
                }
                let get = c.input.starts_with(b"GET /metrics ") || c.input.starts_with(b"GET / ");
                let (status, body) = if get {
                    ("200 OK", self.stats_now(now).prometheus())
                } else {
                    ("404 Not Found", "only GET /metrics is served here\n".to_string())
                };
                Some(
                    format!(
                        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes(),
                )
            }
        }
    }

    fn stats_now(&self, now: Instant) -> Stats {
        let mut s = Stats {
            uptime_secs: now.saturating_duration_since(self.start).as_secs(),
            tun_rx_per_queue: vec![self.stats.tun_rx],
            store_failures: self.durable.as_ref().map_or(0, |d| d.commit_failures),
            held_unstored: self.durable.as_ref().map_or(0, |d| d.held_unstored),
            store_refused: self.durable.as_ref().map_or(0, |d| d.store_refused)
                + self.rental.as_ref().map_or(0, |r| r.stats.store_refused),
            authority_connections: self.rental.as_ref().map_or(0, |r| r.stats.connections),
            authority_refused_connections: self
                .rental
                .as_ref()
                .map_or(0, |r| r.stats.refused_connections),
            authority_broken_connections: self
                .rental
                .as_ref()
                .map_or(0, |r| r.stats.broken_connections),
            authority_requests: self.rental.as_ref().map_or(0, |r| r.stats.requests),
            inquiries_refused: self.rental.as_ref().map_or(0, |r| r.stats.inquiries_refused),
            inquiries_rate_limited: self.rental.as_ref().map_or(0, |r| r.stats.rate_limited),
            rents_rate_limited: self.rental.as_ref().map_or(0, |r| r.stats.rents_rate_limited),
            ..Stats::from_translator(&lock(&self.nat))
        };
        queue::add_tun_counters(&mut s, &self.stats);
        if let Some(q) = &self.queues {
            q.add_counters(&mut s);
        }
        s
    }

    fn expire_conns(&mut self, poll: &mut Poll, now: Instant) {
        for slot in self.conns.iter_mut() {
            if slot.as_ref().is_some_and(|c| c.deadline <= now || c.done) {
                if let Some(mut c) = slot.take() {
                    let _ = poll.registry().deregister(c.stream.source());
                }
            }
        }
    }
}

/// The TUN side of [`dispatch`].
struct Io<'a> {
    tun: &'a TunDevice,
    stats: &'a mut Stats,
    scratch: &'a mut [u8],
}

/// Translates one frame read from the TUN and writes back what must go out: the frame, the
/// translator's ICMP error, or the frame as it came when it is not about any lease. A frame
/// whose lease is not durable yet goes to `hold` (false: no room, counted as dropped). With
/// offloads, the virtio-net header says how to treat the transport checksum, and goes back
/// out with the packet unchanged (a super-packet stays one). The translator is locked only
/// while it translates: the write, and the kernel's forwarding work inside it, run unlocked
/// (that is what lets queue threads run side by side). True when the kernel refused a
/// super-packet (it went out cut in software) and offloads should be turned off.
fn dispatch(
    nat: &Mutex<Translator>,
    io: Io,
    frame: &mut [u8],
    now: Instant,
    hold: impl FnOnce(&[u8]) -> bool,
) -> bool {
    let h = io.tun.header_len();
    if frame.len() < h {
        io.stats.tun_offload_errors += 1;
        return false;
    }
    let (head, packet) = frame.split_at_mut(h);
    let mut hdr = VnetHdr::default();
    let csum = if h == 0 {
        Checksum::Full
    } else {
        hdr = VnetHdr::read(head);
        match vnet::prepare(&mut hdr, packet) {
            Ok(c) => {
                // `prepare` may have finished the checksum itself and cleared the flag.
                hdr.write(head);
                c
            }
            Err(e) => {
                io.stats.tun_offload_errors += 1;
                debug!("TUN frame dropped: {e} ({hdr:?})");
                return false;
            }
        }
    };
    if hdr.is_gso() {
        io.stats.tun_super_packets += 1;
        io.stats.tun_super_packet_bytes += packet.len() as u64;
    }
    // The translator's ICMP error lives in its own buffer: it is copied into the scratch
    // buffer (used otherwise only to cut a super-packet) so that this write runs unlocked too.
    let reply_len = match lock(nat).translate_with(packet, csum, now) {
        Verdict::Forward(_) | Verdict::Pass => None,
        Verdict::Reply(_, r) => {
            io.scratch[..r.len()].copy_from_slice(r);
            Some(r.len())
        }
        Verdict::Hold => {
            if !hold(frame) {
                io.stats.held_dropped += 1;
            }
            return false;
        }
        Verdict::Drop(_) => return false,
    };
    let sent = match reply_len {
        None => io.tun.send_frame(frame, io.scratch),
        Some(n) => io.tun.send_packet(&io.scratch[..n]).map(|_| Sent::Whole),
    };
    match sent {
        Ok(Sent::Whole) => {
            io.stats.tun_tx += 1;
            false
        }
        Ok(Sent::Segmented { written, failed }) => {
            io.stats.tun_segmented_in_software += written as u64;
            io.stats.tun_write_errors += failed as u64;
            true
        }
        Err(_) => {
            io.stats.tun_write_errors += 1;
            false
        }
    }
}

/// The kernel refused a super-packet on write (it was sent cut in software): from now on, no
/// more super-packets either way.
fn turn_offloads_off(tun: &mut TunDevice) {
    match tun.set_offloads(0) {
        Ok(()) => warn!(
            "TUN {}: the kernel refused a super-packet on write; segmentation offloads are off \
             from now on (start with --offload off to skip this)",
            tun.name()
        ),
        Err(e) => warn!(
            "TUN {}: the kernel refused a super-packet on write, and turning offloads off failed \
             too ({e}): super-packets are cut in software",
            tun.name()
        ),
    }
}

/// A free slot of a connection table of at most `max` entries (growing it when needed).
pub(crate) fn free_slot<T>(conns: &mut Vec<Option<T>>, max: usize) -> Option<usize> {
    match conns.iter().position(Option::is_none) {
        Some(i) => Some(i),
        None if conns.len() < max => {
            conns.push(None);
            Some(conns.len() - 1)
        }
        None => None,
    }
}

fn error_line(msg: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(&serde_json::json!({ "error": msg })).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Binds `a` with `bind`; an unspecified IPv6 address (`[::]:PORT`, dual stack) falls back to
/// `0.0.0.0:PORT` on a box without IPv6. `what` names the setting in errors.
pub(crate) fn bind_dual<T>(
    a: std::net::SocketAddr,
    what: &str,
    bind: impl Fn(std::net::SocketAddr) -> io::Result<T>,
) -> Result<T> {
    match bind(a) {
        Ok(s) => Ok(s),
        Err(e) if a.ip().is_unspecified() && a.is_ipv6() => {
            let v4 = std::net::SocketAddr::from(([0, 0, 0, 0], a.port()));
            debug!("cannot bind {a} ({e}); using {v4}");
            bind(v4).with_context(|| format!("cannot listen on {v4} ({what})"))
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {a} ({what})")),
    }
}
