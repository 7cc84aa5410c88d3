//! The `vipgate` command: the gateway daemon and its clients.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vipgate::config::{GatewaySettings, DEFAULT_CONTROL_SOCKET};
use vipgate::control::{self, Request};

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
    Gateway {
        /// TOML file with any of the settings below (e.g. `pool = ["198.18.0.0/24"]`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<GatewaySettings>,
    },
    /// Show the leases of the running gateway.
    Leases {
        /// Control socket of the gateway.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Gateway { config, settings } => {
            let file = match &config {
                Some(p) => GatewaySettings::from_file(p)?,
                None => GatewaySettings::default(),
            };
            let cfg = (*settings).over(file).resolve()?;
            env_logger::Builder::new().filter_level(cfg.log_level).format_target(false).init();
            vipgate::gateway::run(cfg)
        }
        Command::Leases { control_socket, json } => {
            let v = control::query(&control_socket, &Request::Leases)?;
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
        Command::Stats { control_socket, json } => {
            let v = control::query(&control_socket, &Request::Stats)?;
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
                ("packets out (host -> partner)", s.outbound),
                ("packets in (partner -> host)", s.inbound),
                ("packets hairpinned", s.hairpinned),
                ("ICMP errors translated", s.icmp_errors_translated),
                ("ICMP errors sent", s.replies),
                ("ICMP errors rate-limited", s.replies_rate_limited),
                ("TUN packets read", s.tun_rx),
                ("TUN packets written", s.tun_tx),
                ("TUN write errors", s.tun_write_errors),
                ("passed on unchanged", s.passed_through),
                ("leases created", s.leases_created),
                ("leases ended", s.leases_ended),
            ];
            for (k, v) in rows {
                println!("{k:<32} {v}");
            }
            for (k, v) in s.drops.iter().filter(|(_, v)| **v > 0) {
                println!("{:<32} {v}", format!("dropped: {k}"));
            }
            Ok(())
        }
    }
}
