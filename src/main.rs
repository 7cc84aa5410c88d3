//! The `vipgate` command: the gateway daemon and its clients.
//!
//! Exit statuses of every subcommand (see [`EXIT_STATUS_HELP`]): 0 success, 1 failure
//! (unreachable, TLS, timeout, any other refusal, and a daemon's run-time failures), 2 usage
//! (clap's errors and the values checked while parsing: addresses, times, lifetimes, a
//! malformed prefix), 3 `not_permitted`, 4 `no_address`, 78 (EX_CONFIG) a daemon
//! (`gateway`, `authority`, `rendezvous`) refusing to start: a value that parses but cannot
//! work (a prefix with host bits set, a pool fully excluded, …), a config file that cannot be
//! read or has a bad line, or a box that cannot run the gateway (privileges, forwarding, the
//! routing band taken; the checks of `vipgate gateway --check`). Every failure is one line on
//! stderr: `vipgate: <one sentence>`.

use clap::{Args, Parser, Subcommand};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};
use vipgate::authority::{self, AuthorityClient, ErrorCode, Outcome};
use vipgate::config::{
    GatewaySettings, DEFAULT_CONTROL_SOCKET, DEFAULT_ROUTE_TABLE, DEFAULT_RULE_PRIORITY,
};
use vipgate::control::{self, Request};

/// Exit status of a failure that is not one of the others.
const EXIT_FAILURE: u8 = 1;
/// Exit status of a `not_permitted` refusal.
const EXIT_NOT_PERMITTED: u8 = 3;
/// Exit status of a `no_address` refusal.
const EXIT_NO_ADDRESS: u8 = 4;
/// Exit status of a daemon that refuses to start for its configuration or the box
/// (EX_CONFIG of sysexits.h; systemd's `RestartPreventExitStatus=78` stops retrying it).
const EXIT_CONFIG: u8 = 78;

/// The exit statuses, shown under the help of the authority's clients.
const EXIT_STATUS_HELP: &str = "\
Exit status: 0 done; 1 failed (authority unreachable, TLS or certificate failure, timeout, \
--ca file unreadable, or refused with not_served, rate_limited, bad_request or internal); \
2 usage error (bad flag, address or time); 3 not permitted; 4 no virtual address available. \
Every failure prints one sentence on stderr starting with \"vipgate: \".";

/// Rent virtual IP addresses to hosts behind a Linux gateway, keep the way back open for
/// the partners they talk to, and account for who is behind each address.
#[derive(Parser)]
#[command(name = "vipgate", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: create the TUN device, steer the served prefixes and the pool into it,
    /// and translate real <-> virtual addresses until SIGINT/SIGTERM.
    ///
    /// Only --lan and --pool are required; every flag is also a key of the --config TOML file
    /// (same name without the dashes in front), and flags override the file.
    ///
    /// Exit status: 78 when it refuses to start (configuration, config file or box; one
    /// sentence on stderr), 1 when it fails later, 2 for a bad flag, 0 after SIGINT/SIGTERM.
    Gateway {
        /// TOML file with any of the settings below (e.g. `pool = ["198.18.0.0/24"]`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Check the configuration and the box (privileges, /dev/net/tun, forwarding,
        /// rp_filter, routing table and rule band free, the nftables ruleset), print what was
        /// checked and any warnings, and exit: 0 if the gateway can start (warnings
        /// included), 78 with the reason if not. Changes nothing: no TUN, no route, no state
        /// directory, no socket.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        settings: Box<GatewaySettings>,
    },
    /// Run the rental authority alone: the lease table, its SQLite store, the TLS port and the
    /// control socket, with no TUN device and no routing (for gateways that will share it).
    ///
    /// Takes the gateway's settings (the TUN and routing ones are ignored); --lan says who may
    /// rent, --pool what is rented. Needs no privilege beyond its port.
    Authority {
        /// TOML file with any of the gateway's settings.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<GatewaySettings>,
    },
    /// Run the rendezvous server of seed 003: accounts, buddies and presence over TLS (port
    /// 7444), the one-bit "same network?" answer, the relay of endpoint offers between mutual
    /// buddies, and a STUN binding service on UDP and TCP (port 3478). Until SIGINT/SIGTERM.
    ///
    /// Two clients count as one network when their registered global addresses (the source
    /// address of their login connections) are equal after masking (--mask-v4, --mask-v6), or
    /// both lie in one --gateway-pool. The server never tells a client its buddy's address
    /// unless --reveal-addresses is given.
    Rendezvous {
        #[command(flatten)]
        settings: Box<vipgate::rendezvous::Settings>,
        /// Log level: error, warn, info, debug or trace [default: the --config file's
        /// `log-level`, else info].
        #[arg(long, value_name = "LEVEL")]
        log_level: Option<log::LevelFilter>,
        /// TOML file with `log-level = "debug"` (say), the setting a SIGHUP reads again
        /// (`systemctl reload`); --log-level, when given, wins over it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// A client of the rendezvous server: register, manage buddies, show presence, and open
    /// a direct UDP path to a buddy (same network: LAN addresses; otherwise global ones from
    /// STUN) to deliver a message that never passes through the server.
    ///
    /// Exit status: 0 done; 1 failed (server unreachable, TLS, timeout, no direct path);
    /// 2 usage; 3 refused as not permitted (not a mutual buddy who is online).
    Peer {
        #[command(flatten)]
        args: Box<vipgate::peer::PeerArgs>,
    },
    /// Show the leases of the running gateway, or with --history its lease history.
    ///
    /// Reads the gateway's control socket (a Unix socket of mode 0600, so normally as root):
    /// the correspondence table is never served on a network port.
    Leases {
        /// Control socket of the gateway.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        /// Show the lease history (newest first, ended leases included) instead of the
        /// current leases.
        #[arg(long)]
        history: bool,
        /// With --history: only the leases of this virtual address.
        #[arg(long = "virtual", value_name = "IP", requires = "history", value_parser = parse_ip)]
        virtual_addr: Option<IpAddr>,
        /// With --history: only the leases that were live at this moment (RFC 3339, e.g.
        /// 2026-11-22T01:00:00Z).
        #[arg(long, value_name = "TIME", requires = "history", value_parser = parse_time)]
        at: Option<SystemTime>,
        /// With --history: at most this many rows [default: the gateway's, 1000].
        #[arg(long, value_name = "N", requires = "history",
              value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the counters of the running gateway.
    Stats {
        /// Control socket of the gateway.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove what a stopped or crashed gateway left in the kernel: its fail-closed guard
    /// (hosts of the LAN refused, the pool unreachable) and any other rule of its band and
    /// route of its table. Refuses while a gateway runs on that band.
    ///
    /// A gateway stopped with the default --on-stop closed keeps its guard, so that no host
    /// ever goes out under its real address; run this when the box should route the LAN
    /// without vipgate. Give the --route-table and --rule-priority the gateway had, e.g.
    /// `vipgate cleanup` (the defaults) or `vipgate cleanup --route-table 100 --rule-priority
    /// 30000`.
    Cleanup {
        /// Routing table of the gateway's routes.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_ROUTE_TABLE)]
        route_table: u32,
        /// First of the gateway's rule priorities (it uses six from there).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_RULE_PRIORITY)]
        rule_priority: u32,
    },
    /// End leases of the running gateway now (the operator's revoke), and print them.
    ///
    /// Every lease on --virtual, or only those of --real or towards --partner. Their
    /// addresses go into quarantine as on release. Over the control socket only.
    Revoke {
        /// Control socket of the gateway.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        /// The virtual address.
        #[arg(long = "virtual", value_name = "IP")]
        virtual_addr: std::net::IpAddr,
        /// Only the leases of this host (real address).
        #[arg(long, value_name = "IP")]
        real: Option<std::net::IpAddr>,
        /// Only the lease towards this partner.
        #[arg(long, value_name = "IP")]
        partner: Option<std::net::IpAddr>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rent a virtual address for talking to a partner, and print it.
    ///
    /// Asks the gateway's rental authority for a virtual address under which this host will
    /// talk to --partner; the authority records (this host's real address, the virtual
    /// address, the partner) and the gateway then sends this host's packets to that partner
    /// from the virtual address. Who may rent: a host on a LAN prefix the gateway serves. The
    /// authority knows you by the source address of the connection, your real address (there
    /// is no login), so a host cannot rent for another, and from outside the served prefixes
    /// the answer is `not_served`. Prints the virtual address alone on one line.
    #[command(after_help = EXIT_STATUS_HELP)]
    Rent {
        /// Real address of the partner this host will talk to.
        #[arg(long, value_name = "IP", value_parser = parse_ip)]
        partner: IpAddr,
        /// Lifetime of the lease in seconds, 1 to 604800 [default: the authority's, 3600].
        #[arg(long, value_name = "SECS", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        #[command(flatten)]
        auth: AuthorityArgs,
    },
    /// Extend one of this host's leases, and print its virtual address.
    ///
    /// Sets the lifetime of the lease of --virtual to --ttl seconds from now. Who may renew:
    /// only the host that rented the address, from the real address it rented from (the
    /// authority knows you by the connection's source address). Anything else, including an
    /// address that is not leased at all, gets the same `not_permitted` refusal. Prints the
    /// virtual address alone on one line.
    #[command(after_help = EXIT_STATUS_HELP)]
    Renew {
        /// The leased virtual address.
        #[arg(long = "virtual", value_name = "IP", value_parser = parse_ip)]
        virtual_addr: IpAddr,
        /// New lifetime in seconds from now, 1 to 604800 [default: the authority's, 3600].
        #[arg(long, value_name = "SECS", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        #[command(flatten)]
        auth: AuthorityArgs,
    },
    /// End one of this host's leases now; prints nothing.
    ///
    /// The address is then quarantined for a while before it is handed to another host. Who
    /// may release: only the host that rented the address, from the real address it rented
    /// from (the authority knows you by the connection's source address). Anything else,
    /// including an address that is not leased at all, gets the same `not_permitted`
    /// refusal. Prints nothing on success (with --json, the reply).
    #[command(after_help = EXIT_STATUS_HELP)]
    Release {
        /// The leased virtual address.
        #[arg(long = "virtual", value_name = "IP", value_parser = parse_ip)]
        virtual_addr: IpAddr,
        #[command(flatten)]
        auth: AuthorityArgs,
    },
    /// Ask who is behind a virtual address you saw, and print that host's real address.
    ///
    /// Who may inquire: only the partner the lease records, asking from that very address
    /// (the authority knows you by the connection's source address), and only about a time
    /// when the lease existed. The host itself, its other partners and everybody else are
    /// refused, and every refusal is identical (`not_permitted`, exit status 3): it reveals
    /// nothing, not even whether the address is leased. Inquiries are rate-limited per source
    /// address. Prints the real address alone on one line.
    #[command(after_help = EXIT_STATUS_HELP)]
    Inquire {
        /// The virtual address you saw.
        #[arg(long = "virtual", value_name = "IP", value_parser = parse_ip)]
        virtual_addr: IpAddr,
        /// When you saw it (RFC 3339, e.g. 2026-11-22T01:00:00Z) [default: now].
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<SystemTime>,
        #[command(flatten)]
        auth: AuthorityArgs,
    },
}

/// How to reach and authenticate the rental authority, and how to print its answer.
#[derive(Args)]
struct AuthorityArgs {
    /// The gateway's rental authority: IP:PORT, [IPv6]:PORT, or a bare IP address (port 7443).
    #[arg(long, value_name = "ADDR", value_parser = parse_authority)]
    authority: SocketAddr,
    /// The authority's certificate (PEM) to pin, or the CA that issued it. Copy it from the
    /// gateway, which writes it to /var/lib/vipgate/tls/cert.pem (<state-dir>/tls/cert.pem)
    /// unless given its own.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// Seconds to wait for the connection (TCP and TLS), then again for the reply.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_timeout)]
    timeout: Duration,
    /// Print the authority's reply as one line of JSON on stdout, refusals included (the exit
    /// status is the same as without --json).
    #[arg(long)]
    json: bool,
}

/// A failed command: its exit status and the one sentence for stderr.
#[derive(Debug)]
struct Failure {
    status: u8,
    sentence: String,
}

impl Failure {
    fn new(status: u8, sentence: impl Into<String>) -> Failure {
        Failure { status, sentence: sentence.into() }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::new(EXIT_FAILURE, format!("{e:#}"))
    }
}

impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Failure {
        Failure::new(EXIT_FAILURE, format!("cannot handle JSON: {e}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("vipgate: {}", one_line(&f.sentence));
            ExitCode::from(f.status)
        }
    }
}

/// The settings of a daemon: flags over the --config file, checked; starts the logger. A
/// config file that cannot be read or parsed, or settings that cannot work, exit 78.
fn daemon_config(
    config: Option<PathBuf>,
    settings: GatewaySettings,
) -> Result<vipgate::config::GatewayConfig, Failure> {
    let refused = |e: anyhow::Error| Failure::new(EXIT_CONFIG, format!("{e:#}"));
    let cfg = read_config(config.as_deref(), &settings).map_err(refused)?;
    // Every level passes the logger; the global maximum filters, so a reload can change it.
    env_logger::Builder::new().filter_level(log::LevelFilter::Trace).format_target(false).init();
    log::set_max_level(cfg.log_level);
    Ok(cfg)
}

/// The configuration: `settings` (the flags) over the `--config` file, checked.
fn read_config(
    config: Option<&Path>,
    settings: &GatewaySettings,
) -> anyhow::Result<vipgate::config::GatewayConfig> {
    let file = match config {
        Some(p) => GatewaySettings::from_file(p)?,
        None => GatewaySettings::default(),
    };
    settings.clone().over(file).resolve()
}

/// What a SIGHUP reads again: the `--config` file under the same flags (none without one).
fn reload_source(
    config: Option<PathBuf>,
    settings: GatewaySettings,
) -> Option<vipgate::gateway::reload::Source> {
    let path = config?;
    Some(Box::new(move || read_config(Some(&path), &settings)))
}

/// A daemon's failure: 78 when it refused to start ([`vipgate::config::Refusal`]), else 1.
fn daemon_failure(e: anyhow::Error) -> Failure {
    let refused = e.chain().any(|c| c.is::<vipgate::config::Refusal>());
    Failure::new(if refused { EXIT_CONFIG } else { EXIT_FAILURE }, format!("{e:#}"))
}

/// `vipgate gateway --check`: the start's checks, printed, changing nothing.
fn check(cfg: &vipgate::config::GatewayConfig) -> Result<(), Failure> {
    let found = vipgate::gateway::routing::preflight(cfg, vipgate::gateway::routing::Mode::Check)
        .map_err(daemon_failure)?;
    let show = vipgate::config::show_nets;
    println!(
        "configuration: serving {} from pool {}; TUN {}, routing table {}, rule priorities {}..{}",
        show(&cfg.nat.lan),
        show(&cfg.nat.pools),
        cfg.tun,
        cfg.route_table,
        cfg.rule_priority,
        cfg.rule_priority + vipgate::gateway::routing::RULE_BAND - 1
    );
    for c in &found.checked {
        println!("ok: {c}");
    }
    for w in &found.warnings {
        println!("warning: {w}");
    }
    println!(
        "vipgate gateway can start ({} warning(s)); nothing was changed",
        found.warnings.len()
    );
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Gateway { config, check: true, settings } => {
            check(&daemon_config(config, *settings)?)
        }
        Command::Gateway { config, check: false, settings } => {
            let cfg = daemon_config(config.clone(), (*settings).clone())?;
            let reload = reload_source(config, *settings);
            vipgate::gateway::run(cfg, reload).map_err(daemon_failure)
        }
        Command::Authority { config, settings } => {
            let cfg = daemon_config(config.clone(), (*settings).clone())?;
            let reload = reload_source(config, *settings);
            // Without its TLS port it refuses to start (`--no-authority`): a configuration error.
            let no_port = cfg.authority.is_none();
            vipgate::gateway::run_authority(cfg, reload).map_err(|e| match daemon_failure(e) {
                f if no_port => Failure::new(EXIT_CONFIG, f.sentence),
                f => f,
            })
        }
        Command::Rendezvous { settings, log_level, config } => {
            vipgate::config::refuse_host_bits("--gateway-pool", &settings.gateway_pool)
                .map_err(|e| Failure::new(EXIT_CONFIG, format!("{e:#}")))?;
            let max = vipgate::rendezvous::MAX_LISTENERS;
            if settings.listen.len() > max || settings.stun_listen.len() > max {
                return Err(Failure::new(
                    EXIT_CONFIG,
                    format!("at most {max} --listen and {max} --stun-listen addresses"),
                ));
            }
            let level = move || -> anyhow::Result<log::LevelFilter> {
                match (log_level, &config) {
                    (Some(l), _) => Ok(l),
                    (None, Some(p)) => vipgate::rendezvous::read_log_level(p),
                    (None, None) => Ok(log::LevelFilter::Info),
                }
            };
            let start = level().map_err(|e| Failure::new(EXIT_CONFIG, format!("{e:#}")))?;
            // Every level passes the logger; the global maximum filters (a SIGHUP changes it).
            env_logger::Builder::new()
                .filter_level(log::LevelFilter::Trace)
                .filter_module("rustls", log::LevelFilter::Warn)
                .format_target(false)
                .init();
            log::set_max_level(start);
            Ok(vipgate::rendezvous::run(*settings, Box::new(level))?)
        }
        Command::Peer { args } => {
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
                .format_target(false)
                .init();
            vipgate::peer::run(*args).map_err(|e| {
                let refused = e.downcast_ref::<vipgate::peer::Refused>();
                let status = match refused {
                    Some(r) if r.code == "not_permitted" => EXIT_NOT_PERMITTED,
                    _ => EXIT_FAILURE,
                };
                Failure::new(status, format!("{e:#}"))
            })
        }
        Command::Leases { control_socket, history: false, json, .. } => {
            leases(&control_socket, json)
        }
        Command::Leases { control_socket, history: true, virtual_addr, at, limit, json } => {
            history(&control_socket, virtual_addr, at, limit, json)
        }
        Command::Stats { control_socket, json } => stats(&control_socket, json),
        Command::Cleanup { route_table, rule_priority } => {
            let deleted = vipgate::gateway::cleanup(route_table, rule_priority)?;
            let last = rule_priority + vipgate::gateway::routing::RULE_BAND - 1;
            println!(
                "removed {deleted} rule(s) at priorities {rule_priority}..{last} and the routes \
                 of table {route_table}"
            );
            Ok(())
        }
        Command::Revoke { control_socket, virtual_addr, real, partner, json } => {
            let v =
                control_query(&control_socket, &Request::Revoke { virtual_addr, real, partner })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v["revoked"])?);
                return Ok(());
            }
            let leases: Vec<control::LeaseRecord> = serde_json::from_value(v["revoked"].clone())?;
            for l in &leases {
                println!("revoked {} -> {} (partner {})", l.real, l.virtual_addr, l.partner);
            }
            println!("{} lease(s) revoked", leases.len());
            Ok(())
        }
        Command::Rent { partner, ttl, auth } => {
            ask_authority(&auth, authority::Command::Rent { partner, ttl })
        }
        Command::Renew { virtual_addr, ttl, auth } => {
            ask_authority(&auth, authority::Command::Renew { virtual_addr, ttl })
        }
        Command::Release { virtual_addr, auth } => {
            ask_authority(&auth, authority::Command::Release { virtual_addr })
        }
        Command::Inquire { virtual_addr, at, auth } => {
            ask_authority(&auth, authority::Command::Inquire { virtual_addr, at })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The control socket's clients
// ---------------------------------------------------------------------------------------------

/// Sends `req` to the gateway's control socket; a failure is one sentence, exit status 1.
fn control_query(socket: &Path, req: &Request) -> Result<serde_json::Value, Failure> {
    control::query(socket, req).map_err(|e| {
        let hint = match io_root(&e).map(io::Error::kind) {
            Some(io::ErrorKind::PermissionDenied) => " (the control socket is root's: use sudo)",
            _ => "",
        };
        Failure::new(EXIT_FAILURE, format!("{}{hint}", sentence(&e)))
    })
}

/// `vipgate leases`: the current leases.
fn leases(control_socket: &Path, json: bool) -> Result<(), Failure> {
    let v = control_query(control_socket, &Request::Leases)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v["leases"])?);
        return Ok(());
    }
    let leases: Vec<control::LeaseRecord> = serde_json::from_value(v["leases"].clone())?;
    println!(
        "{:<40} {:<40} {:<40} {:<9} {:>5}  EXPIRES",
        "REAL", "VIRTUAL", "PARTNER", "ORIGIN", "FLOWS"
    );
    for l in &leases {
        println!(
            "{:<40} {:<40} {:<40} {:<9} {:>5}  {}",
            l.real.to_string(),
            l.virtual_addr.to_string(),
            l.partner.to_string(),
            l.origin,
            l.flows,
            l.expires.as_deref().unwrap_or("while flows live")
        );
    }
    println!("{} lease(s)", leases.len());
    Ok(())
}

/// `vipgate leases --history`: the lease history, newest first.
fn history(
    control_socket: &Path,
    virtual_addr: Option<IpAddr>,
    at: Option<SystemTime>,
    limit: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let req = Request::History {
        virtual_addr,
        // Normalised to UTC ("...Z") so that any RFC 3339 parser on the gateway accepts it.
        at: at.map(|t| authority::format_rfc3339(t, true)),
        limit: limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let v = control_query(control_socket, &req)?;
    let Some(rows) = v.get("history") else {
        return Err(Failure::new(
            EXIT_FAILURE,
            format!(
                "the gateway at {} sent a reply without a history; is it an older version?",
                control_socket.display()
            ),
        ));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    let records: Vec<control::HistoryRecord> = serde_json::from_value(rows.clone())?;
    println!(
        "{:<40} {:<40} {:<40} {:<9} {:<20} {:<20} REASON",
        "REAL", "VIRTUAL", "PARTNER", "ORIGIN", "START", "END"
    );
    for r in &records {
        println!(
            "{:<40} {:<40} {:<40} {:<9} {:<20} {:<20} {}",
            r.real.to_string(),
            r.virtual_addr.to_string(),
            r.partner.to_string(),
            r.origin,
            r.start,
            r.end.as_deref().unwrap_or("-"),
            r.end_reason.as_deref().unwrap_or("-")
        );
    }
    println!("{} record(s)", records.len());
    Ok(())
}

/// `vipgate stats`: the counters.
fn stats(control_socket: &Path, json: bool) -> Result<(), Failure> {
    let v = control_query(control_socket, &Request::Stats)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s: control::Stats = serde_json::from_value(v)?;
    let rows = [
        ("uptime (s)", s.uptime_secs),
        ("leases", s.leases as u64),
        ("flows", s.flows as u64),
        ("quarantined addresses", s.quarantined as u64),
        ("packets out (host -> partner)", s.translator.outbound),
        ("packets in (partner -> host)", s.translator.inbound),
        ("packets hairpinned", s.translator.hairpinned),
        ("ICMP errors translated", s.translator.icmp_errors_translated),
        ("ICMP errors sent", s.translator.replies),
        ("ICMP errors rate-limited", s.translator.replies_rate_limited),
        ("TUN packets read", s.tun_rx),
        ("TUN packets written", s.tun_tx),
        ("TUN write errors", s.tun_write_errors),
        ("TUN bytes read", s.tun_rx_bytes),
        ("TUN super-packets read", s.tun_super_packets),
        ("TUN bytes read in super-packets", s.tun_super_packet_bytes),
        ("TUN offload errors", s.tun_offload_errors),
        ("TUN segments made in software", s.tun_segmented_in_software),
        ("passed on unchanged", s.translator.passed),
        ("leases created", s.translator.leases_created),
        ("leases ended", s.translator.leases_ended),
    ];
    for (k, v) in rows {
        println!("{k:<32} {v}");
    }
    if s.tun_rx_per_queue.len() > 1 {
        let q: Vec<String> = s.tun_rx_per_queue.iter().map(u64::to_string).collect();
        println!("{:<32} {}", "TUN packets read per queue", q.join(" "));
    }
    for (k, v) in s.drops.iter().filter(|(_, v)| **v > 0) {
        println!("{:<32} {v}", format!("dropped: {k}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The rental authority's clients
// ---------------------------------------------------------------------------------------------

/// `rent`, `renew`, `release`, `inquire`: one request to the authority, its answer printed.
fn ask_authority(args: &AuthorityArgs, command: authority::Command) -> Result<(), Failure> {
    // Read the --ca file first, so that a missing or bad file is reported as such.
    vipgate::tls::read_certs(&args.ca).map_err(|e| {
        let sentence = match io_root(&e) {
            Some(io) => format!("cannot read the --ca file {}: {}", args.ca.display(), reason(io)),
            None => e.to_string(),
        };
        Failure::new(EXIT_FAILURE, sentence)
    })?;
    let mut client = AuthorityClient::connect(args.authority, &args.ca, args.timeout)
        .map_err(|e| connect_failure(&e, args.authority, args.timeout))?;
    let reply = client.call(&command).map_err(|e| Failure::new(EXIT_FAILURE, sentence(&e)))?;
    drop(client);
    if args.json {
        println!("{}", serde_json::to_string(&reply)?);
    }
    match (&command, &reply.outcome) {
        (
            authority::Command::Rent { .. } | authority::Command::Renew { .. },
            Outcome::Leased { virtual_addr, .. },
        ) => {
            if !args.json {
                println!("{virtual_addr}");
            }
            Ok(())
        }
        (authority::Command::Release { .. }, Outcome::Released) => Ok(()),
        (authority::Command::Inquire { .. }, Outcome::Real { real }) => {
            if !args.json {
                println!("{real}");
            }
            Ok(())
        }
        (_, Outcome::Error { code, message }) => Err(refusal(&command, *code, message)),
        _ => Err(Failure::new(
            EXIT_FAILURE,
            format!(
                "the authority at {} answered `{}` with an unexpected reply ({})",
                args.authority,
                command.name(),
                printable(&reply.to_string())
            ),
        )),
    }
}

/// The failure for an error reply of the authority.
fn refusal(command: &authority::Command, code: ErrorCode, message: &str) -> Failure {
    let message = printable(message);
    match code {
        ErrorCode::NotPermitted => {
            let why = match command {
                authority::Command::Inquire { .. } => "only the partner recorded for this \
                    virtual address may ask who is behind it, from its own address and about \
                    a time when the lease existed"
                    .to_string(),
                authority::Command::Renew { .. } | authority::Command::Release { .. } => format!(
                    "only the host that rented this virtual address may {} it, from the \
                     address it rented from (an address that is not leased is refused the \
                     same way)",
                    command.name()
                ),
                authority::Command::Rent { .. } => message,
            };
            Failure::new(EXIT_NOT_PERMITTED, format!("not permitted: {why}"))
        }
        ErrorCode::NoAddress => Failure::new(
            EXIT_NO_ADDRESS,
            "no address available: the gateway's pool has no free virtual address; release a \
             lease or try again later",
        ),
        ErrorCode::NotServed => Failure::new(EXIT_FAILURE, format!("not served: {message}")),
        ErrorCode::RateLimited => Failure::new(EXIT_FAILURE, format!("rate limited: {message}")),
        ErrorCode::Internal => {
            Failure::new(EXIT_FAILURE, format!("the authority failed: {message}"))
        }
        ErrorCode::BadRequest | ErrorCode::TooLong => Failure::new(
            EXIT_FAILURE,
            format!(
                "the authority rejected the request ({code}): {message}; are vipgate versions \
                 of client and gateway compatible?"
            ),
        ),
    }
}

/// The failure for a connection or TLS handshake that did not succeed.
fn connect_failure(e: &anyhow::Error, addr: SocketAddr, timeout: Duration) -> Failure {
    let sentence = match io_root(e) {
        Some(io) if is_timeout(io) => {
            format!("cannot reach the authority at {addr}: no answer within {timeout:?}")
        }
        Some(io) => format!("cannot reach the authority at {addr}: {}", reason(io)),
        // The client's handshake errors are single, actionable sentences already.
        None => sentence(e),
    };
    Failure::new(EXIT_FAILURE, sentence)
}

// ---------------------------------------------------------------------------------------------
// Value parsers (their errors are usage errors: exit status 2)
// ---------------------------------------------------------------------------------------------

/// An IPv4 or IPv6 address.
fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| "expected an IPv4 or IPv6 address, e.g. 198.51.100.2".to_string())
}

/// `IP:PORT`, `[IPv6]:PORT`, `IP` or `[IPv6]` (then port [`authority::DEFAULT_PORT`]).
fn parse_authority(s: &str) -> Result<SocketAddr, String> {
    vipgate::tls::parse_endpoint(s, authority::DEFAULT_PORT, "the authority")
}

/// An RFC 3339 time such as `2026-11-22T01:00:00Z` (any offset, any fraction).
fn parse_time(s: &str) -> Result<SystemTime, String> {
    authority::parse_rfc3339(s)
        .ok_or_else(|| "expected an RFC 3339 time such as 2026-11-22T01:00:00Z".to_string())
}

/// A lease lifetime: whole seconds from 1 to [`authority::MAX_TTL`].
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let max = authority::MAX_TTL.as_secs();
    match s.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(format!("expected whole seconds from 1 to {max}")),
    }
}

/// A timeout: seconds, fractions allowed, more than 0 and at most an hour.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 3600.0 => Ok(Duration::from_secs_f64(secs)),
        _ => Err("expected seconds above 0 and at most 3600, e.g. 5 or 0.5".to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Error sentences
// ---------------------------------------------------------------------------------------------

/// The I/O error at the root of `e`'s chain, if any.
fn io_root(e: &anyhow::Error) -> Option<&io::Error> {
    e.chain().filter_map(|c| c.downcast_ref::<io::Error>()).last()
}

/// Whether `e` is a timeout.
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// The reason of an I/O error in lower case, without the "(os error N)" suffix, e.g.
/// "connection refused", "no such file or directory".
fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("{:?}", e.kind()),
    }
}

/// `e` as one sentence: its own message, then only the reason of an underlying I/O error (or
/// the whole chain when there is none).
fn sentence(e: &anyhow::Error) -> String {
    let reason = match io_root(e) {
        Some(io) if is_timeout(io) => "timed out".to_string(),
        Some(io) => reason(io),
        None => return format!("{e:#}"),
    };
    // "cannot reach X (is it running?)" + reason: the reason goes before the parenthesis.
    let message = e.to_string();
    match message.rfind(" (").filter(|_| message.ends_with(')')) {
        Some(i) => format!("{}: {reason}{}", &message[..i], &message[i..]),
        None => format!("{message}: {reason}"),
    }
}

/// Text from elsewhere (the authority's messages) made safe for a terminal line: control
/// characters become spaces, and it is cut at 300 characters.
fn printable(s: &str) -> String {
    let mut out: String =
        s.chars().take(300).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.chars().count() > 300 {
        out.push('…');
    }
    out
}

/// `s` on one line (a failure is one line on stderr).
fn one_line(s: &str) -> String {
    s.split(['\r', '\n']).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_addresses() {
        let p = |s: &str| parse_authority(s).map(|a| a.to_string());
        assert_eq!(p("198.51.100.1:8443").unwrap(), "198.51.100.1:8443");
        assert_eq!(p("198.51.100.1").unwrap(), "198.51.100.1:7443");
        assert_eq!(p("[2001:db8::1]:8443").unwrap(), "[2001:db8::1]:8443");
        assert_eq!(p("2001:db8::1").unwrap(), "[2001:db8::1]:7443");
        assert_eq!(p("[2001:db8::1]").unwrap(), "[2001:db8::1]:7443");
        assert!(p("198.51.100.1:0").unwrap_err().contains("port 0"));
        assert!(p("gateway.example").unwrap_err().contains("IP:PORT"));
        assert!(p("198.51.100.300").is_err());
        assert!(p("[198.51.100.1]").is_ok());
    }

    #[test]
    fn values() {
        assert_eq!(parse_ttl("3600").unwrap(), Duration::from_secs(3600));
        assert!(parse_ttl("0").is_err() && parse_ttl("604801").is_err() && parse_ttl("x").is_err());
        assert_eq!(parse_timeout("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_timeout("0").is_err() && parse_timeout("NaN").is_err());
        assert!(parse_time("2026-11-22T01:00:00+01:00").is_ok());
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn sentences() {
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::NotFound)).context("cannot X");
        assert_eq!(sentence(&e), "cannot X: entity not found");
        let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::ECONNREFUSED))
            .context("cannot connect");
        assert_eq!(sentence(&e), "cannot connect: connection refused");
        let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOENT))
            .context("cannot reach /x (is it running?)");
        assert_eq!(sentence(&e), "cannot reach /x: no such file or directory (is it running?)");
        assert_eq!(printable("a\nb\u{1b}[31m"), "a b [31m");
        assert_eq!(one_line("a\n  b\n"), "a b");
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
