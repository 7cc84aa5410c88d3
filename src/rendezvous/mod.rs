//! `vipgate rendezvous`: the server of seed 003. Accounts, buddies and presence over a TLS
//! JSON-lines service; the one-bit same-network answer; the relay of endpoint offers between
//! mutual buddies; a STUN binding service on UDP and TCP so clients learn their global
//! address. One mio loop; the accounts in SQLite under `--state-dir`; password hashing
//! (argon2id) on a worker thread so a login never stalls the loop.
//!
//! - [`protocol`]: the wire format (also `docs/rendezvous.md`).
//! - [`hub`]: the logic, without I/O.
//! - [`store`]: the accounts database.
//! - [`fair`]: per-source shares of the connection tables and of the password-check queue.

pub mod fair;
pub mod hub;
pub mod protocol;
pub mod store;

use crate::authority::{Frame, LineFramer, RateLimiter};
use crate::stun;
use crate::tls::Round;
use anyhow::{bail, Context, Result};
use clap::Args;
use hub::{ConnId, Hub, Locality, Outcome};
use ipnet::IpNet;
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::{ServerConfig, ServerConnection};
use serde_json::Value;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vipgate/rendezvous";
/// SOFTWARE attribute of STUN responses.
pub const SOFTWARE: &str = concat!("vipgate ", env!("CARGO_PKG_VERSION"));
/// Time to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection that has not logged in may stay silent.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a logged-in connection may stay silent (clients ping every 30 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Time a STUN-over-TCP connection may stay silent.
pub const STUN_TCP_TIMEOUT: Duration = Duration::from_secs(30);
/// Most TLS connections at once.
pub const MAX_CONNS: usize = 4096;
// Connection ids keep the slot in their low 16 bits.
const _: () = assert!(MAX_CONNS <= 0x1_0000);
/// Most STUN-over-TCP connections at once.
pub const MAX_STUN_CONNS: usize = 1024;
/// Most listen addresses of each kind.
pub const MAX_LISTENERS: usize = 8;
/// Most password checks queued for the worker; past it, logins get `busy`.
pub const MAX_HASH_JOBS: usize = 64;
/// Largest argon2 work area a stored hash may ask for, in 1 KiB blocks (64 MiB); a hash
/// asking for more fails to verify instead of growing the worker's memory.
const MAX_HASH_BLOCKS: usize = 64 * 1024;
/// Most bytes queued for a client that does not read; past it, it is disconnected.
const MAX_QUEUED: usize = 1 << 20;
/// Largest STUN message accepted over TCP.
const MAX_STUN_TCP: usize = 2048;
/// Most STUN datagrams served per readiness event of one socket (the others wait a turn).
const STUN_BATCH: usize = 256;

const SIGNALS: Token = Token(0);
const WAKER: Token = Token(1);
const TLS_LISTEN: usize = 10;
const STUN_UDP: usize = 30;
const STUN_TCP_LISTEN: usize = 50;
const STUN_CONN: usize = 1_000;
const TLS_CONN: usize = 10_000;

/// Flags of `vipgate rendezvous`.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// TLS address of the rendezvous service. Repeatable; [::]:PORT serves IPv4 too.
    #[arg(long, value_name = "ADDR:PORT", default_value = "[::]:7444")]
    pub listen: Vec<SocketAddr>,
    /// STUN binding service address, served on UDP and TCP. Repeatable.
    #[arg(long, value_name = "ADDR:PORT", default_value = "[::]:3478")]
    pub stun_listen: Vec<SocketAddr>,
    /// Directory of the accounts database and the generated TLS certificate.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// TLS certificate (PEM chain) instead of the generated <state-dir>/tls/cert.pem.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Two IPv4 addresses are one network when their first N bits agree (32: only equal).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u8).range(0..=32))]
    pub mask_v4: u8,
    /// Two IPv6 addresses are one network when their first N bits agree.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u8).range(0..=128))]
    pub mask_v6: u8,
    /// A gateway's address pool (e.g. a vipgate --pool): any two addresses inside it are one
    /// network. Repeatable.
    #[arg(long, value_name = "PREFIX")]
    pub gateway_pool: Vec<IpNet>,
    /// Let mutual buddies ask for each other's registered address (`address_of`). Off by
    /// default: it hands a buddy your address, which the one-bit answer never does.
    #[arg(long)]
    pub reveal_addresses: bool,
    /// Login and register attempts allowed per second from one address (burst: twice that).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub login_rate: u32,
    /// Most TLS connections from one source (an IPv4 address, an IPv6 /64) at once.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=MAX_CONNS as i64))]
    pub max_conns_per_source: u32,
    /// Most STUN-over-TCP connections from one source at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=MAX_STUN_CONNS as i64))]
    pub max_stun_conns_per_source: u32,
    /// Most password checks (logins, registrations) of one source queued or running at once;
    /// past it that source's logins get `busy` while other sources still get theirs.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=MAX_HASH_JOBS as i64))]
    pub hash_jobs_per_source: u32,
    /// UDP STUN requests answered per second per source (burst: twice that); the rest are
    /// dropped, so the service cannot be used to amplify traffic at a forged source.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub stun_rate: u32,
}

/// Where a SIGHUP reads the log level again.
pub type LevelSource = Box<dyn Fn() -> Result<log::LevelFilter>>;

/// Runs the server until SIGINT or SIGTERM; a SIGHUP sets the log level `level` says.
pub fn run(settings: Settings, level: LevelSource) -> Result<()> {
    crate::limits::raise_descriptors(MAX_CONNS + MAX_STUN_CONNS).log();
    let server = Server::bind(settings)?;
    server.run(level)
}

/// The `log-level` of a rendezvous `--config` file (info when it has none); errors name the
/// file and the line.
pub fn read_log_level(path: &std::path::Path) -> Result<log::LevelFilter> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "kebab-case", deny_unknown_fields)]
    struct File {
        log_level: Option<String>,
    }
    let f: File = crate::config::read_toml(path)?;
    match f.log_level {
        None => Ok(log::LevelFilter::Info),
        Some(l) => l.parse().map_err(|_| {
            anyhow::anyhow!(
                "{}: log-level {l:?} is not one of error, warn, info, debug, trace",
                path.display()
            )
        }),
    }
}

struct TlsConn {
    /// Unique for the server's lifetime: `serial << 16 | slot`, so a late answer of the hash
    /// worker or a queued line never reaches the next connection in the same slot.
    id: ConnId,
    opened: Instant,
    sock: TcpStream,
    tls: ServerConnection,
    framer: LineFramer,
    peer: IpAddr,
    deadline: Instant,
    /// Registered for WRITABLE too (TLS records wait for the socket).
    writable: bool,
    /// A password check is out: later lines wait.
    busy: bool,
    /// Reading stopped at the buffer limit (256 KiB of lines): resume once the lines are
    /// handled (the edge-triggered socket will not signal the bytes already waiting).
    paused: bool,
    closing: bool,
}

struct StunConn {
    sock: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    out: Vec<u8>,
    deadline: Instant,
}

/// A password to check or hash ([`Outcome::Verify`] or [`Outcome::Hash`]) for a connection.
struct Job {
    conn: ConnId,
    /// The connection's source: its share of the queue is freed when the job is done.
    source: IpAddr,
    work: Outcome,
}

enum Done {
    Verified { source: IpAddr, conn: ConnId, id: Value, user: String, listen: bool, ok: bool },
    Hashed { source: IpAddr, conn: ConnId, id: Value, user: String, phc: Result<String, String> },
}

/// Counters of the server's own I/O.
#[derive(Debug, Default)]
struct Stats {
    stun_udp: u64,
    stun_tcp: u64,
    stun_dropped: u64,
    tls_broken: u64,
    refused_conns: u64,
    /// Connections refused because their source held its share of the table.
    refused_source: u64,
    /// UDP STUN requests dropped by the per-source rate limit.
    stun_limited: u64,
    /// Password checks answered `busy` because their source held its share of the queue.
    busy_source: u64,
}

/// A bound, ready server: tests and `run` use it.
pub struct Server {
    poll: Poll,
    config: Arc<ServerConfig>,
    listeners: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
    stun_listeners: Vec<TcpListener>,
    conns: Vec<Option<TlsConn>>,
    stun_conns: Vec<Option<StunConn>>,
    hub: Hub,
    jobs: mpsc::SyncSender<Job>,
    done: mpsc::Receiver<Done>,
    /// Password checks waiting for the worker, by source; the worker has one at a time.
    queue: fair::FairQueue<Job>,
    /// The worker is checking one.
    hashing: bool,
    serial: usize,
    /// Slots read from this turn: their TLS may owe records (handshake, alerts).
    read: Vec<usize>,
    /// Slots whose reading paused and whose lines are all handled: read again next turn.
    resume: Vec<usize>,
    limiter: RateLimiter,
    tls_sources: fair::SourceCount,
    stun_sources: fair::SourceCount,
    stun_limiter: RateLimiter,
    stats: Stats,
}

impl Server {
    /// Opens the database, loads or generates the certificate, binds every address.
    pub fn bind(s: Settings) -> Result<Server> {
        if s.listen.len() > MAX_LISTENERS || s.stun_listen.len() > MAX_LISTENERS {
            bail!("at most {MAX_LISTENERS} --listen and {MAX_LISTENERS} --stun-listen addresses");
        }
        crate::store::private_dir(&s.state_dir, "state directory", true)
            .with_context(|| format!("cannot create {}", s.state_dir.display()))?;
        let accounts = store::Accounts::open(&s.state_dir.join(store::DB_FILE))?;
        let (config, cert) = crate::tls::server_config_for(
            &crate::tls::RENDEZVOUS,
            &s.state_dir,
            s.cert.as_deref(),
            s.key.as_deref(),
        )?;
        let poll = Poll::new().context("cannot create the event loop")?;
        let reg = poll.registry();
        let mut listeners = Vec::new();
        for (k, a) in s.listen.iter().enumerate() {
            let mut l = crate::gateway::bind_dual(*a, "--listen", TcpListener::bind)?;
            reg.register(&mut l, Token(TLS_LISTEN + k), Interest::READABLE)?;
            listeners.push(l);
        }
        let mut udp = Vec::new();
        let mut stun_listeners = Vec::new();
        for (k, a) in s.stun_listen.iter().enumerate() {
            let mut u = crate::gateway::bind_dual(*a, "--stun-listen, UDP", UdpSocket::bind)?;
            reg.register(&mut u, Token(STUN_UDP + k), Interest::READABLE)?;
            udp.push(u);
            let mut l = crate::gateway::bind_dual(*a, "--stun-listen, TCP", TcpListener::bind)?;
            reg.register(&mut l, Token(STUN_TCP_LISTEN + k), Interest::READABLE)?;
            stun_listeners.push(l);
        }
        let waker = Arc::new(Waker::new(reg, WAKER)?);
        // One job at a time goes to the worker; the fair queue holds the others.
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(1);
        let (done_tx, done) = mpsc::channel::<Done>();
        std::thread::Builder::new()
            .name("password-hash".into())
            .spawn(move || hash_worker(job_rx, done_tx, waker))
            .context("cannot start the password-hash thread")?;
        let mut first = [0u8; 4];
        getrandom::getrandom(&mut first).context("no randomness from the kernel")?;
        let locality =
            Locality { mask_v4: s.mask_v4, mask_v6: s.mask_v6, pools: s.gateway_pool.clone() };
        let hub =
            Hub::new(accounts, locality, s.reveal_addresses, u64::from(u32::from_ne_bytes(first)));
        let addrs = |v: &[TcpListener]| -> Vec<String> {
            v.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect()
        };
        info!(
            "rendezvous on {} (TLS, certificate {}), STUN on {} (UDP and TCP); same network: \
             IPv4 /{}, IPv6 /{}, gateway pools [{}]; reveal mode {}; per source: {} TLS and {} \
             STUN/TCP connections, {} password checks, {} STUN/UDP answers/s",
            addrs(&listeners).join(", "),
            cert.display(),
            addrs(&stun_listeners).join(", "),
            s.mask_v4,
            s.mask_v6,
            s.gateway_pool.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
            if s.reveal_addresses { "ON" } else { "off" },
            s.max_conns_per_source,
            s.max_stun_conns_per_source,
            s.hash_jobs_per_source,
            s.stun_rate
        );
        Ok(Server {
            poll,
            config,
            listeners,
            udp,
            stun_listeners,
            conns: Vec::new(),
            stun_conns: Vec::new(),
            hub,
            jobs,
            done,
            queue: fair::FairQueue::new(MAX_HASH_JOBS, s.hash_jobs_per_source as usize),
            hashing: false,
            serial: 0,
            read: Vec::new(),
            resume: Vec::new(),
            limiter: RateLimiter::new(s.login_rate.max(1), s.login_rate.max(1) * 2, 65_536),
            tls_sources: fair::SourceCount::new(s.max_conns_per_source as usize),
            stun_sources: fair::SourceCount::new(s.max_stun_conns_per_source as usize),
            stun_limiter: RateLimiter::new(
                s.stun_rate.max(1),
                s.stun_rate.max(1).saturating_mul(2),
                65_536,
            ),
            stats: Stats::default(),
        })
    }

    /// Serves until SIGINT or SIGTERM; a SIGHUP sets the log level `level` says.
    pub fn run(mut self, level: LevelSource) -> Result<()> {
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])?;
        self.poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        info!("ready");
        let mut events = Events::with_capacity(256);
        let mut next_report = Instant::now() + Duration::from_secs(60);
        loop {
            let now = Instant::now();
            let next = self.expire(now).min(next_report);
            let wait = if self.resume.is_empty() {
                next.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("the event loop failed");
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => {
                        for sig in signals.pending() {
                            if sig != signal_hook::consts::SIGHUP {
                                info!("signal {sig}: shutting down");
                                return Ok(());
                            }
                            match level() {
                                Ok(l) => {
                                    crate::config::change_log_level(l, |old| {
                                        info!(
                                            "SIGHUP: log level {old} -> {l}; the other settings \
                                             are flags and need a restart"
                                        )
                                    });
                                }
                                Err(e) => log::error!(
                                    "SIGHUP: configuration refused, the running one stays: {e:#}"
                                ),
                            }
                        }
                    }
                    WAKER => self.finished_jobs(),
                    Token(t) if t >= TLS_CONN => self.tls_ready(t - TLS_CONN),
                    Token(t) if t >= STUN_CONN => self.stun_conn_ready(t - STUN_CONN),
                    Token(t) if t >= STUN_TCP_LISTEN => self.accept_stun(t - STUN_TCP_LISTEN),
                    Token(t) if t >= STUN_UDP => self.serve_udp(t - STUN_UDP),
                    Token(t) if t >= TLS_LISTEN => self.accept_tls(t - TLS_LISTEN),
                    _ => {}
                }
            }
            self.resume_reading();
            self.flush_outbox();
            if Instant::now() >= next_report {
                next_report = Instant::now() + Duration::from_secs(60);
                let s = &self.stats;
                let h = &self.hub.stats;
                info!(
                    "{} connection(s), {} online; logins {} (refused {}), registrations {}, \
                     same-network answers {}, relayed {}, not permitted {}; STUN udp {} tcp {} \
                     dropped {} rate-limited {}; TLS broken {}, refused connections {} (source \
                     over its share {}), busy password checks of a source over its share {}",
                    self.hub.connections(),
                    self.hub.online_users(),
                    h.logins,
                    h.failed_logins,
                    h.registrations,
                    h.same_network,
                    h.relayed,
                    h.not_permitted,
                    s.stun_udp,
                    s.stun_tcp,
                    s.stun_dropped,
                    s.stun_limited,
                    s.tls_broken,
                    s.refused_conns,
                    s.refused_source,
                    s.busy_source
                );
            }
        }
    }

    // --- STUN ---------------------------------------------------------------------------

    fn serve_udp(&mut self, k: usize) {
        let Some(sock) = self.udp.get(k) else { return };
        let mut buf = [0u8; 1500];
        let mut out = [0u8; stun::MAX_RESPONSE];
        let now = Instant::now();
        for _ in 0..STUN_BATCH {
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors surface as ECONNREFUSED and the like on the next call: ignore.
                Err(_) => continue,
            };
            // The answer is bigger than the request: a source (which may be forged) gets
            // at most --stun-rate answers a second.
            if !self.stun_limiter.allow(from.ip().to_canonical(), now) {
                self.stats.stun_limited += 1;
                continue;
            }
            match stun::serve(&buf[..n], from, SOFTWARE, &mut out) {
                Some(len) => {
                    self.stats.stun_udp += 1;
                    let _ = sock.send_to(&out[..len], from);
                }
                None => self.stats.stun_dropped += 1,
            }
        }
        // More may be queued: edge-triggered readiness will not fire again for them.
        let _ = self.poll.registry().reregister(
            &mut self.udp[k],
            Token(STUN_UDP + k),
            Interest::READABLE,
        );
    }

    fn accept_stun(&mut self, k: usize) {
        loop {
            let Some(l) = self.stun_listeners.get(k) else { return };
            let (mut sock, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            // One source (an address, an IPv6 /64) cannot take every slot.
            if !self.stun_sources.admit(peer.ip()) {
                self.stats.refused_source += 1;
                continue;
            }
            let Some(slot) = crate::gateway::free_slot(&mut self.stun_conns, MAX_STUN_CONNS) else {
                self.stun_sources.release(peer.ip());
                self.stats.refused_conns += 1;
                continue;
            };
            if self
                .poll
                .registry()
                .register(&mut sock, Token(STUN_CONN + slot), Interest::READABLE)
                .is_err()
            {
                self.stun_sources.release(peer.ip());
                continue;
            }
            let deadline = Instant::now() + STUN_TCP_TIMEOUT;
            self.stun_conns[slot] =
                Some(StunConn { sock, peer, buf: Vec::new(), out: Vec::new(), deadline });
        }
    }

    fn stun_conn_ready(&mut self, slot: usize) {
        let Some(Some(mut c)) = self.stun_conns.get_mut(slot).map(Option::take) else { return };
        let alive = self.stun_progress(&mut c);
        let reg = self.poll.registry();
        if alive {
            let interest = if c.out.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let _ = reg.reregister(&mut c.sock, Token(STUN_CONN + slot), interest);
            self.stun_conns[slot] = Some(c);
        } else {
            let _ = reg.deregister(&mut c.sock);
            self.stun_sources.release(c.peer.ip());
        }
    }

    /// Reads, answers every complete message, writes. False when the connection is over.
    fn stun_progress(&mut self, c: &mut StunConn) -> bool {
        let mut chunk = [0u8; 2048];
        loop {
            match c.sock.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            if c.buf.len() > 2 * MAX_STUN_TCP {
                break;
            }
        }
        let mut out = [0u8; stun::MAX_RESPONSE];
        loop {
            let len = match stun::message_len(&c.buf) {
                Ok(Some(len)) if len <= MAX_STUN_TCP => len,
                Ok(None) => break,
                // Not STUN, or absurdly long: this stream cannot be resynchronised.
                _ => {
                    self.stats.stun_dropped += 1;
                    return false;
                }
            };
            if c.buf.len() < len {
                break;
            }
            c.deadline = Instant::now() + STUN_TCP_TIMEOUT;
            match stun::serve(&c.buf[..len], c.peer, SOFTWARE, &mut out) {
                Some(n) => {
                    self.stats.stun_tcp += 1;
                    c.out.extend_from_slice(&out[..n]);
                }
                None => self.stats.stun_dropped += 1,
            }
            c.buf.drain(..len);
            if c.out.len() > MAX_STUN_TCP * 8 {
                return false; // a client that sends and never reads
            }
        }
        while !c.out.is_empty() {
            match c.sock.write(&c.out) {
                Ok(0) => return false,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    // --- TLS ------------------------------------------------------------------------------

    fn accept_tls(&mut self, k: usize) {
        loop {
            let Some(l) = self.listeners.get(k) else { return };
            let (mut sock, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("accept failed: {e}");
                    return;
                }
            };
            let peer = crate::authority::peer_ip(peer);
            // One source (an address, an IPv6 /64) cannot take every slot.
            if !self.tls_sources.admit(peer) {
                self.stats.refused_source += 1;
                continue;
            }
            let Some(slot) = crate::gateway::free_slot(&mut self.conns, MAX_CONNS) else {
                self.tls_sources.release(peer);
                self.stats.refused_conns += 1;
                continue;
            };
            let registered = ServerConnection::new(self.config.clone()).ok().filter(|_| {
                self.poll
                    .registry()
                    .register(&mut sock, Token(TLS_CONN + slot), Interest::READABLE)
                    .is_ok()
            });
            let Some(mut tls) = registered else {
                self.tls_sources.release(peer);
                continue;
            };
            tls.set_buffer_limit(Some(MAX_QUEUED));
            let _ = sock.set_nodelay(true);
            let now = Instant::now();
            self.serial += 1;
            let id = (self.serial << 16) | slot;
            self.hub.connected(id, peer);
            self.conns[slot] = Some(TlsConn {
                id,
                opened: now,
                sock,
                tls,
                framer: LineFramer::new(),
                peer,
                deadline: now + HANDSHAKE_TIMEOUT,
                writable: false,
                busy: false,
                paused: false,
                closing: false,
            });
        }
    }

    fn tls_ready(&mut self, slot: usize) {
        let Some(Some(mut c)) = self.conns.get_mut(slot).map(Option::take) else { return };
        let alive = self.tls_read(&mut c);
        if !c.tls.is_handshaking() && !self.hub.logged_in(c.id) {
            // Handshake done: the login is due LOGIN_TIMEOUT after the connection opened,
            // whatever else (pings) the client sends meanwhile.
            c.deadline = c.opened + LOGIN_TIMEOUT;
        }
        self.conns[slot] = Some(c);
        self.read.push(slot);
        if !alive {
            self.close(slot);
            return;
        }
        self.handle_lines(slot);
    }

    /// Reads and decrypts what arrived into the framer. False when the connection is over.
    fn tls_read(&mut self, c: &mut TlsConn) -> bool {
        // A client that floods lines while a password check is out waits on TCP; reading
        // resumes once the lines buffered are handled ([`Server::resume_reading`]).
        c.paused = false;
        loop {
            if c.framer.buffered() > crate::authority::MAX_LINE * 4 {
                c.paused = true;
                break;
            }
            match crate::tls::read_round(&mut c.tls, &mut c.sock, &mut c.framer) {
                Round::More => {}
                Round::Drained => break,
                Round::Eof => {
                    c.closing = true;
                    break;
                }
                Round::Broken => {
                    self.stats.tls_broken += 1;
                    return false;
                }
            }
        }
        true
    }

    /// Handles the complete lines of connection `slot` until one needs the hash worker.
    fn handle_lines(&mut self, slot: usize) {
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else { return };
            if c.busy {
                return;
            }
            let Some(frame) = c.framer.next_frame() else {
                if c.closing {
                    // The replies (a too_long, the answers to the last lines) go out first.
                    self.flush_outbox();
                    self.close(slot);
                } else if c.paused {
                    // More is waiting in the socket, and no readiness event will say so.
                    self.resume.push(slot);
                }
                return;
            };
            let now = Instant::now();
            let (id, peer) = (c.id, c.peer);
            if self.hub.logged_in(id) {
                c.deadline = now + IDLE_TIMEOUT;
            }
            let line = match frame {
                Frame::Line(line) => line,
                Frame::TooLong => {
                    let reply = protocol::error(&Value::Null, protocol::Code::TooLong);
                    self.hub.outbox.push((id, reply));
                    c.closing = true;
                    continue;
                }
            };
            let req = match protocol::parse(&line) {
                Ok(r) => r,
                Err(reply) => {
                    self.hub.outbox.push((id, reply));
                    continue;
                }
            };
            let guarded =
                matches!(req.op, protocol::Op::Login { .. } | protocol::Op::Register { .. });
            if guarded && !self.limiter.allow(peer, now) {
                self.hub.outbox.push((id, protocol::error(&req.id, protocol::Code::RateLimited)));
                continue;
            }
            let work = self.hub.request(id, req, now);
            let rid = match &work {
                Outcome::Done => continue,
                Outcome::Verify { id, .. } | Outcome::Hash { id, .. } => id.clone(),
            };
            let job = Job { conn: id, source: peer, work };
            if let Err((_, why)) = self.queue.push(peer, job) {
                if why == fair::Refusal::SourceShare {
                    self.stats.busy_source += 1;
                }
                self.hub.outbox.push((id, protocol::error(&rid, protocol::Code::Busy)));
                continue;
            }
            if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                c.busy = true;
            }
            self.dispatch();
        }
    }

    /// Hands the worker the next password check, in turn by source, when it is idle.
    fn dispatch(&mut self) {
        if self.hashing {
            return;
        }
        let Some((_, job)) = self.queue.pop() else { return };
        match self.jobs.try_send(job) {
            Ok(()) => self.hashing = true,
            Err(mpsc::TrySendError::Full(job) | mpsc::TrySendError::Disconnected(job)) => {
                // Only if the worker is gone: say so to the client instead of hanging it.
                log::error!("the password-hash thread is gone: logins cannot be checked");
                self.queue.finished(job.source);
                let rid = match &job.work {
                    Outcome::Verify { id, .. } | Outcome::Hash { id, .. } => id.clone(),
                    Outcome::Done => Value::Null,
                };
                self.hub.outbox.push((job.conn, protocol::error(&rid, protocol::Code::Internal)));
                if let Some(c) = self.conn_mut(job.conn) {
                    c.busy = false;
                }
            }
        }
    }

    /// Reads again from the connections whose reading paused at the buffer limit and whose
    /// buffered lines are handled now, then handles what arrived.
    fn resume_reading(&mut self) {
        let mut slots = std::mem::take(&mut self.resume);
        slots.sort_unstable();
        slots.dedup();
        for &slot in &slots {
            let Some(Some(mut c)) = self.conns.get_mut(slot).map(Option::take) else { continue };
            if !c.paused || c.busy {
                self.conns[slot] = Some(c);
                continue;
            }
            let alive = self.tls_read(&mut c);
            self.conns[slot] = Some(c);
            self.read.push(slot);
            if !alive {
                self.close(slot);
                continue;
            }
            self.handle_lines(slot);
        }
    }

    /// The open connection with id `id`, if it is still open.
    fn conn_mut(&mut self, id: ConnId) -> Option<&mut TlsConn> {
        self.conns.get_mut(id & 0xffff).and_then(Option::as_mut).filter(|c| c.id == id)
    }

    fn finished_jobs(&mut self) {
        while let Ok(done) = self.done.try_recv() {
            self.hashing = false;
            let (conn, source) = match done {
                Done::Verified { source, conn, id, user, listen, ok } => {
                    self.hub.logged_in_checked(conn, &id, &user, listen, ok);
                    (conn, source)
                }
                Done::Hashed { source, conn, id, user, phc } => {
                    self.hub.registered(conn, &id, &user, phc);
                    (conn, source)
                }
            };
            self.queue.finished(source);
            self.dispatch();
            let logged_in = self.hub.logged_in(conn);
            if let Some(c) = self.conn_mut(conn) {
                c.busy = false;
                if logged_in {
                    c.deadline = Instant::now() + IDLE_TIMEOUT;
                }
                self.handle_lines(conn & 0xffff);
            }
        }
    }

    /// Sends every queued line and the TLS records waiting, and sets each connection's
    /// interest to match.
    fn flush_outbox(&mut self) {
        let mut lines = std::mem::take(&mut self.hub.outbox);
        let mut touched = std::mem::take(&mut self.read);
        let mut overflowed = Vec::new();
        for (id, line) in lines.drain(..) {
            let Some(c) = self.conn_mut(id) else { continue }; // closed meanwhile
            if c.tls.writer().write_all(&line).is_err() {
                overflowed.push(id & 0xffff);
            }
            touched.push(id & 0xffff);
        }
        self.hub.outbox = lines; // keeps its capacity
        for slot in overflowed {
            warn!("connection {slot} does not read what it is sent: closing it");
            self.close(slot);
        }
        touched.sort_unstable();
        touched.dedup();
        for &slot in &touched {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else { continue };
            let Ok(drained) = crate::tls::write_round(&mut c.tls, &mut c.sock) else {
                self.close(slot);
                continue;
            };
            // Interest changes only when the socket filled up or drained.
            if drained == c.writable {
                c.writable = !drained;
                let interest = if drained {
                    Interest::READABLE
                } else {
                    Interest::READABLE | Interest::WRITABLE
                };
                let token = Token(TLS_CONN + slot);
                if self.poll.registry().reregister(&mut c.sock, token, interest).is_err() {
                    self.close(slot);
                }
            }
        }
        touched.clear();
        self.read = touched;
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
            c.tls.send_close_notify();
            let _ = c.tls.write_tls(&mut c.sock);
            let _ = self.poll.registry().deregister(&mut c.sock);
            self.tls_sources.release(c.peer);
            self.hub.closed(c.id);
        }
    }

    /// Closes what is past its deadline; returns the next deadline.
    fn expire(&mut self, now: Instant) -> Instant {
        self.hub.expire(now);
        let mut next = now + Duration::from_secs(60);
        for slot in 0..self.conns.len() {
            match self.conns[slot].as_ref() {
                Some(c) if c.deadline <= now && !c.busy => {
                    debug!("connection {slot} from {} timed out", c.peer);
                    self.close(slot);
                }
                Some(c) => next = next.min(c.deadline.max(now + Duration::from_millis(10))),
                None => {}
            }
        }
        let reg = self.poll.registry();
        for slot in self.stun_conns.iter_mut() {
            if slot.as_ref().is_some_and(|c| c.deadline <= now) {
                if let Some(mut c) = slot.take() {
                    let _ = reg.deregister(&mut c.sock);
                    self.stun_sources.release(c.peer.ip());
                }
            } else if let Some(c) = slot.as_ref() {
                next = next.min(c.deadline);
            }
        }
        next
    }

    /// The TLS addresses bound.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("tls", &self.local_addrs()).finish_non_exhaustive()
    }
}

/// The password-hash thread: argon2id with the crate's defaults (19 MiB, 2 passes, 1 lane:
/// OWASP's recommended minimum), one job at a time, in one work area allocated once and
/// reused for every check (a fresh 19 MiB per check is kept by the allocator: RSS grew to
/// ~200 MB after a dozen logins).
fn hash_worker(jobs: mpsc::Receiver<Job>, done: mpsc::Sender<Done>, waker: Arc<Waker>) {
    use argon2::password_hash::{rand_core::OsRng, SaltString};
    let mut hasher = PasswordHasher::new();
    // A login for an account that does not exist is checked against this, so it costs the
    // same time as a real one and does not tell which names exist.
    let dummy =
        hasher.hash(b"no such account", &SaltString::generate(&mut OsRng)).unwrap_or_default();
    while let Ok(job) = jobs.recv() {
        let (conn, source) = (job.conn, job.source);
        let result = match job.work {
            Outcome::Done => continue,
            Outcome::Verify { id, user, password, phc, listen } => {
                let stored = phc.as_deref().unwrap_or(&dummy);
                let ok = hasher.verify(password.as_bytes(), stored) && phc.is_some();
                Done::Verified { source, conn, id, user, listen, ok }
            }
            Outcome::Hash { id, user, password } => {
                let salt = SaltString::generate(&mut OsRng);
                let phc = hasher.hash(password.as_bytes(), &salt).map_err(|e| e.to_string());
                Done::Hashed { source, conn, id, user, phc }
            }
        };
        if done.send(result).is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

/// argon2id hashing and verification in one reused work area.
struct PasswordHasher {
    memory: Vec<argon2::Block>,
}

impl PasswordHasher {
    fn new() -> PasswordHasher {
        let blocks = argon2::Params::default().block_count();
        PasswordHasher { memory: vec![argon2::Block::new(); blocks] }
    }

    /// The work area for `params`: grown (once, up to [`MAX_HASH_BLOCKS`]) when a stored
    /// hash asks for more than the defaults, never shrunk.
    fn memory(&mut self, params: &argon2::Params) -> Option<&mut [argon2::Block]> {
        let n = params.block_count();
        if n > MAX_HASH_BLOCKS {
            warn!("a stored password hash asks for {n} KiB of memory: refused");
            return None;
        }
        if self.memory.len() < n {
            self.memory.resize(n, argon2::Block::new());
        }
        Some(&mut self.memory[..n])
    }

    /// The PHC string of `password` under `salt`, with the default parameters.
    fn hash(
        &mut self,
        password: &[u8],
        salt: &argon2::password_hash::SaltString,
    ) -> Result<String, argon2::password_hash::Error> {
        use argon2::password_hash::{Output, ParamsString, PasswordHash};
        let params = argon2::Params::default();
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            params.clone(),
        );
        let salt = salt.as_salt();
        let mut raw = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut raw)?;
        let memory =
            self.memory(&params).ok_or(argon2::password_hash::Error::ParamValueInvalid(
                argon2::password_hash::errors::InvalidValue::TooLong,
            ))?;
        let out_len = params.output_len().unwrap_or(argon2::Params::DEFAULT_OUTPUT_LEN);
        let hash = Output::init_with(out_len, |out| {
            Ok(argon.hash_password_into_with_memory(password, salt_bytes, out, &mut *memory)?)
        })?;
        let phc = PasswordHash {
            algorithm: argon2::Algorithm::Argon2id.ident(),
            version: Some(argon2::Version::V0x13.into()),
            params: ParamsString::try_from(&params)?,
            salt: Some(salt),
            hash: Some(hash),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches the PHC string `stored` (an argon2 hash); compared in
    /// constant time.
    fn verify(&mut self, password: &[u8], stored: &str) -> bool {
        use argon2::password_hash::{Output, PasswordHash};
        let Ok(h) = PasswordHash::new(stored) else { return false };
        let (Some(salt), Some(expected)) = (h.salt, h.hash) else { return false };
        let Ok(algorithm) = argon2::Algorithm::try_from(h.algorithm) else { return false };
        let version = match h.version.map(argon2::Version::try_from) {
            None => argon2::Version::default(),
            Some(Ok(v)) => v,
            Some(Err(_)) => return false,
        };
        let Ok(params) = argon2::Params::try_from(&h) else { return false };
        let argon = argon2::Argon2::new(algorithm, version, params.clone());
        let mut raw = [0u8; 64];
        let Ok(salt_bytes) = salt.decode_b64(&mut raw) else { return false };
        let Some(memory) = self.memory(&params) else { return false };
        let computed = Output::init_with(expected.len(), |out| {
            Ok(argon.hash_password_into_with_memory(password, salt_bytes, out, &mut *memory)?)
        });
        computed.is_ok_and(|c| c == expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{rand_core::OsRng, PasswordVerifier, SaltString};

    #[test]
    fn the_reused_work_area_hashes_and_verifies_like_the_crate() {
        let mut h = PasswordHasher::new();
        let salt = SaltString::generate(&mut OsRng);
        let phc = h.hash(b"correct horse battery", &salt).expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        // The crate's own verifier accepts it ...
        let parsed = argon2::password_hash::PasswordHash::new(&phc).unwrap();
        assert!(argon2::Argon2::default()
            .verify_password(b"correct horse battery", &parsed)
            .is_ok());
        // ... and ours accepts a hash the crate made, in the same work area, again and again.
        let theirs = {
            use argon2::password_hash::PasswordHasher as _;
            argon2::Argon2::default()
                .hash_password(b"another password", &SaltString::generate(&mut OsRng))
                .unwrap()
                .to_string()
        };
        for _ in 0..2 {
            assert!(h.verify(b"correct horse battery", &phc));
            assert!(!h.verify(b"correct horse batterz", &phc));
            assert!(h.verify(b"another password", &theirs));
        }
        assert!(!h.verify(b"x", "not a hash"));
        assert_eq!(h.memory.len(), argon2::Params::default().block_count(), "never regrown");
        // A stored hash asking for more memory than the cap is refused, not served.
        let greedy = "$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHRzYWx0$\
                      AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(!h.verify(b"x", greedy));
        assert_eq!(h.memory.len(), argon2::Params::default().block_count());
    }
}
