//! Load generator for the rental authority (`scripts/authority-bench.sh` runs it).
//!
//! Opens `--conns` TLS 1.3 connections to the authority (pinning `--ca`), each from its own
//! source address (`--source`, repeatable; connection `i` binds source `i % n` before it
//! connects, since the authority knows a client by that address), finishes every handshake,
//! then lets each connection PIPELINE requests: up to `--window` requests are outstanding at
//! any time; the window is refilled after every read. A connection stops after its share of
//! `--count` requests or at `--duration` seconds, whichever comes first, and waits for the
//! replies still outstanding.
//!
//! - `--mode rent`: every request rents a fresh `(source, partner)` pair, so every reply is a
//!   new lease made durable by the authority before it answers. Partners are the addresses
//!   `--partner-first + k`; the connections that share a source get disjoint blocks of `k`
//!   (`--partner-count` addresses in all). With `--leases-out FILE` the leases granted are
//!   written there, one `real virtual partner` line each.
//! - `--mode inquire`: reads such a file (`--leases`) and, from each partner address found
//!   in it (those are the connections' sources), inquires the virtual addresses rented for
//!   that partner, round robin; a reply naming another real address counts as an error
//!   `wrong_real`.
//!
//! Prints the requests, the errors by code, the elapsed time, the rate, and the latency from
//! the moment a request was written to the moment its reply was read (p50, p99, max), as
//! text and as one `RESULT key=value ...` line for scripts.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Rent,
    Inquire,
}

/// Pipelined load on the vipgate rental authority over TLS.
#[derive(Parser)]
struct Args {
    /// rent or inquire.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The authority, IP:PORT.
    #[arg(long)]
    authority: SocketAddr,
    /// The authority's certificate (PEM) to pin.
    #[arg(long)]
    ca: PathBuf,
    /// Source addresses to bind (rent mode; repeatable). Connection i uses source i % n.
    #[arg(long = "source")]
    sources: Vec<IpAddr>,
    /// Connections (one thread each).
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Requests outstanding per connection.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Requests in all (split evenly between the connections).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Stop sending after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Rent mode: the first partner address.
    #[arg(long, default_value = "198.18.128.0")]
    partner_first: IpAddr,
    /// Rent mode: how many partner addresses from --partner-first on may be used.
    #[arg(long, default_value_t = 32_768)]
    partner_count: u32,
    /// Rent mode: lifetime of the leases in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u32,
    /// Rent mode: write the leases granted to this file (`real virtual partner` lines).
    #[arg(long)]
    leases_out: Option<PathBuf>,
    /// Inquire mode: the leases to inquire about (a --leases-out file).
    #[arg(long)]
    leases: Option<PathBuf>,
    /// Seconds per step of the printed timeline (replies/s per step).
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Give up on a connection whose reply takes longer than this many seconds.
    #[arg(long, default_value_t = 10.0)]
    reply_timeout: f64,
}

/// What one connection does.
struct Plan {
    source: IpAddr,
    quota: u64,
    /// Rent: partner addresses `partner_first + base + j`.
    partner_base: u32,
    /// Inquire: (virtual, real) pairs to ask about, round robin.
    targets: Vec<(IpAddr, IpAddr)>,
}

#[derive(Default)]
struct Outcome {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u32>,
    leases: Vec<(IpAddr, IpAddr, IpAddr)>,
    failure: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.conns == 0 || args.window == 0 {
        bail!("--conns and --window must be at least 1");
    }
    let plans = plans(&args)?;
    let config = vipgate::tls::client_config(&args.ca)?;
    let barrier = Arc::new(Barrier::new(plans.len() + 1));
    let done = Arc::new(AtomicU64::new(0));
    let args = Arc::new(args);
    let mut threads = Vec::new();
    for (i, plan) in plans.into_iter().enumerate() {
        let (config, barrier, args, done) =
            (config.clone(), barrier.clone(), args.clone(), done.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("conn{i}"))
                .spawn(move || run_conn(&args, config, plan, &barrier, &done))?,
        );
    }
    // Every handshake is done when the barrier opens: the clock covers requests only.
    barrier.wait();
    let start = Instant::now();
    // Replies per interval, to show a rate that changes during the run.
    let mut timeline = Vec::new();
    let mut last = 0;
    let every = Duration::from_secs_f64(args.interval);
    while !threads.iter().all(|t| t.is_finished()) {
        let next = start + every * (timeline.len() as u32 + 1);
        while Instant::now() < next && !threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let now = done.load(Ordering::Relaxed);
        timeline.push(now - last);
        last = now;
    }
    let outcomes: Vec<Outcome> =
        threads.into_iter().map(|t| t.join().unwrap_or_else(|_| panic_outcome())).collect();
    let elapsed = start.elapsed().as_secs_f64();
    report(&args, &outcomes, elapsed, &timeline)
}

fn panic_outcome() -> Outcome {
    Outcome { failure: Some("thread panicked".into()), ..Outcome::default() }
}

fn plans(args: &Args) -> Result<Vec<Plan>> {
    let n = args.conns as u64;
    let quota = |i: u64| args.count / n + u64::from(i < args.count % n);
    match args.mode {
        Mode::Rent => {
            if args.sources.is_empty() {
                bail!("rent mode needs at least one --source inside the gateway's --lan");
            }
            let per_source = args.conns.div_ceil(args.sources.len()) as u64;
            let block = u64::from(args.partner_count) / per_source;
            if quota(0) > block {
                bail!(
                    "{} requests per connection, but only {block} partners per connection \
                     ({} partners, {per_source} connections per source): every rent must be \
                     a new pair, so raise --partner-count or give more --source addresses",
                    quota(0),
                    args.partner_count
                );
            }
            Ok((0..args.conns)
                .map(|i| Plan {
                    source: args.sources[i % args.sources.len()],
                    quota: quota(i as u64),
                    partner_base: ((i / args.sources.len()) as u64 * block) as u32,
                    targets: Vec::new(),
                })
                .collect())
        }
        Mode::Inquire => {
            let path = args.leases.as_ref().context("inquire mode needs --leases FILE")?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let mut by_partner: BTreeMap<IpAddr, Vec<(IpAddr, IpAddr)>> = BTreeMap::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let [real, virt, partner] = f[..] else {
                    bail!("{}: not a `real virtual partner` line: {line}", path.display())
                };
                by_partner
                    .entry(partner.parse()?)
                    .or_default()
                    .push((virt.parse()?, real.parse()?));
            }
            if by_partner.is_empty() {
                bail!("{} holds no lease", path.display());
            }
            let partners: Vec<_> = by_partner.into_iter().collect();
            Ok((0..args.conns)
                .map(|i| {
                    let (partner, targets) = &partners[i % partners.len()];
                    Plan {
                        source: *partner,
                        quota: quota(i as u64),
                        partner_base: 0,
                        targets: targets.clone(),
                    }
                })
                .collect())
        }
    }
}

/// A TCP connection from `source` to `dest` (std cannot bind before connecting).
fn connect_from(source: IpAddr, dest: SocketAddr) -> io::Result<TcpStream> {
    fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: as above.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
    let family = if dest.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the descriptor is owned by the TcpStream below or closed.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (src, src_len) = sockaddr(SocketAddr::new(source, 0));
    // SAFETY: the address is valid for `src_len` bytes.
    if unsafe { libc::bind(fd, &src as *const _ as *const libc::sockaddr, src_len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (dst, dst_len) = sockaddr(dest);
    // SAFETY: as above.
    if unsafe { libc::connect(fd, &dst as *const _ as *const libc::sockaddr, dst_len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn run_conn(
    args: &Args,
    config: Arc<rustls::ClientConfig>,
    plan: Plan,
    barrier: &Barrier,
    done: &AtomicU64,
) -> Outcome {
    let mut out = Outcome::default();
    let setup = (|| -> Result<(TcpStream, ClientConnection)> {
        let mut sock = connect_from(plan.source, args.authority)
            .with_context(|| format!("cannot connect from {}", plan.source))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs_f64(args.reply_timeout)))?;
        let mut tls =
            ClientConnection::new(config, ServerName::IpAddress(args.authority.ip().into()))?;
        while tls.is_handshaking() {
            tls.complete_io(&mut sock).context("TLS handshake")?;
        }
        Ok((sock, tls))
    })();
    barrier.wait();
    let (mut sock, mut tls) = match setup {
        Ok(x) => x,
        Err(e) => {
            out.failure = Some(format!("{e:#}"));
            return out;
        }
    };
    if let Err(e) = pump(args, &plan, &mut sock, &mut tls, &mut out, done) {
        out.failure = Some(format!("{e:#}"));
    }
    out
}

/// The pipelined request/reply loop of one connection.
fn pump(
    args: &Args,
    plan: &Plan,
    sock: &mut TcpStream,
    tls: &mut ClientConnection,
    out: &mut Outcome,
    done: &AtomicU64,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    // Outstanding requests: when sent, and the partner index (rent) or target index.
    let mut inflight: VecDeque<(Instant, u32)> = VecDeque::with_capacity(args.window);
    let mut batch = String::with_capacity(args.window * 80);
    let mut input: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut plain = vec![0u8; 1 << 16];
    out.latencies_us.reserve(plan.quota.min(1 << 24) as usize);
    loop {
        let now = Instant::now();
        batch.clear();
        while inflight.len() < args.window && out.sent < plan.quota && now < deadline {
            let k = out.sent;
            match args.mode {
                Mode::Rent => {
                    let index = plan.partner_base + k as u32;
                    let partner = nth_partner(args.partner_first, index);
                    let _ = writeln!(
                        batch,
                        r#"{{"id":{k},"cmd":"rent","partner":"{partner}","ttl":{}}}"#,
                        args.ttl
                    );
                    inflight.push_back((now, index));
                }
                Mode::Inquire => {
                    let t = (k % plan.targets.len() as u64) as u32;
                    let (virt, _) = plan.targets[t as usize];
                    let _ = writeln!(batch, r#"{{"id":{k},"cmd":"inquire","virtual":"{virt}"}}"#);
                    inflight.push_back((now, t));
                }
            }
            out.sent += 1;
        }
        if !batch.is_empty() {
            // One write: the requests of a refill travel in as few TLS records as possible.
            tls.writer().write_all(batch.as_bytes())?;
            while tls.wants_write() {
                tls.write_tls(sock)?;
            }
        }
        if inflight.is_empty() {
            return Ok(());
        }
        match tls.read_tls(sock) {
            Ok(0) => {
                bail!("the authority closed the connection ({} replies missing)", inflight.len())
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                bail!("no reply within {} s ({} outstanding)", args.reply_timeout, inflight.len())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        tls.process_new_packets().context("TLS")?;
        loop {
            match tls.reader().read(&mut plain) {
                Ok(0) => break,
                Ok(n) => input.extend_from_slice(&plain[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        let now = Instant::now();
        let before = out.latencies_us.len();
        let mut used = 0;
        while let Some(nl) = input[used..].iter().position(|&b| b == b'\n') {
            let line = &input[used..used + nl];
            used += nl + 1;
            let Some((sent, index)) = inflight.pop_front() else {
                bail!("a reply nobody asked for: {}", String::from_utf8_lossy(line));
            };
            out.latencies_us
                .push(now.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
            classify(args, plan, line, index, out);
        }
        input.drain(..used);
        done.fetch_add((out.latencies_us.len() - before) as u64, Ordering::Relaxed);
    }
}

/// The partner address `index` places after `first`.
fn nth_partner(first: IpAddr, index: u32) -> IpAddr {
    match first {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(index))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(u128::from(index)))),
    }
}

/// The string value of `"key":"..."` in a reply line (the authority writes no spaces).
fn field<'a>(line: &'a [u8], key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = line.windows(pat.len()).position(|w| w == pat.as_bytes())? + pat.len();
    let len = line[start..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&line[start..start + len]).ok()
}

fn classify(args: &Args, plan: &Plan, line: &[u8], index: u32, out: &mut Outcome) {
    let ok = line.windows(9).any(|w| w == b"\"ok\":true");
    if !ok {
        let code = field(line, "error").unwrap_or("unparsable").to_string();
        *out.errors.entry(code).or_default() += 1;
        return;
    }
    match args.mode {
        Mode::Rent => {
            if args.leases_out.is_some() {
                let virt = field(line, "virtual").and_then(|v| v.parse().ok());
                let partner = nth_partner(args.partner_first, index);
                match virt {
                    Some(v) => out.leases.push((plan.source, v, partner)),
                    None => {
                        *out.errors.entry("no_virtual_in_reply".into()).or_default() += 1;
                        return;
                    }
                }
            }
            out.ok += 1;
        }
        Mode::Inquire => {
            let expected = plan.targets[index as usize].1;
            if field(line, "real").and_then(|r| r.parse::<IpAddr>().ok()) == Some(expected) {
                out.ok += 1;
            } else {
                *out.errors.entry("wrong_real".into()).or_default() += 1;
            }
        }
    }
}

/// CPU seconds (user, system) this process used so far, handshakes included.
fn own_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

fn report(args: &Args, outcomes: &[Outcome], elapsed: f64, timeline: &[u64]) -> Result<()> {
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut sent, mut ok) = (0, 0);
    let mut lat: Vec<u32> = Vec::new();
    let mut failures: HashMap<String, u64> = HashMap::new();
    for o in outcomes {
        sent += o.sent;
        ok += o.ok;
        for (k, v) in &o.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        lat.extend_from_slice(&o.latencies_us);
        if let Some(f) = &o.failure {
            *failures.entry(f.clone()).or_default() += 1;
        }
    }
    lat.sort_unstable();
    let (cpu_user, cpu_sys) = own_cpu();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1]
    };
    let replies = lat.len() as u64;
    let rate = replies as f64 / elapsed;
    let mode = match args.mode {
        Mode::Rent => "rent",
        Mode::Inquire => "inquire",
    };
    let errs = if errors.is_empty() {
        "none".to_string()
    } else {
        errors.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(",")
    };
    println!(
        "{mode}: {} connections, window {}: {sent} requests, {replies} replies ({ok} ok), \
         errors {errs}, {elapsed:.3} s, {rate:.0} replies/s, latency p50 {} us, p99 {} us, \
         max {} us; client CPU {cpu_user:.2} s user + {cpu_sys:.2} s system",
        args.conns,
        args.window,
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or(0)
    );
    let steps: Vec<String> =
        timeline.iter().map(|n| format!("{:.0}", *n as f64 / args.interval)).collect();
    println!("replies/s per {} s: {}", args.interval, steps.join(" "));
    for (f, n) in &failures {
        println!("{n} connection(s) failed: {f}");
    }
    println!(
        "RESULT mode={mode} conns={} window={} sent={sent} replies={replies} ok={ok} \
         errors={errs} failed_conns={} elapsed={elapsed:.3} rate={rate:.0} p50_us={} \
         p99_us={} max_us={} client_cpu_s={:.2}",
        args.conns,
        args.window,
        failures.values().sum::<u64>(),
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or(0),
        cpu_user + cpu_sys
    );
    if let Some(path) = &args.leases_out {
        let mut text = String::new();
        for o in outcomes {
            for (real, virt, partner) in &o.leases {
                let _ = writeln!(text, "{real} {virt} {partner}");
            }
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !failures.is_empty() {
        bail!("{} connection(s) failed", failures.values().sum::<u64>());
    }
    Ok(())
}
