//! The gateway's configuration: command-line flags and a TOML file with the same keys.
//!
//! One struct, [`GatewaySettings`], is both the clap flag set and the file schema: every flag
//! `--some-key` is the file key `some-key` and vice versa. Flags override the file; what
//! neither gives takes the embedded default. [`GatewaySettings::resolve`] checks everything
//! and turns it into a [`GatewayConfig`], or says in one sentence what is wrong.

use crate::nat::{self, Filtering, Mapping, Timeouts};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ipnet::IpNet;
use serde::Deserialize;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default TUN device name.
pub const DEFAULT_TUN: &str = "vip0";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vipgate";
/// Default control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/vipgate/control.sock";
/// Default routing table of the gateway's routes.
pub const DEFAULT_ROUTE_TABLE: u32 = 7443;
/// Connections the rental authority holds at once.
pub const AUTHORITY_CONNS: usize = 4096;
/// Default of `--authority-conns-per-source`.
pub const DEFAULT_AUTHORITY_CONNS_PER_SOURCE: usize = 64;
/// Default priority of the first of the gateway's policy rules.
pub const DEFAULT_RULE_PRIORITY: u32 = 7443;

/// Refuses the first prefix of `nets` with host bits set (`198.18.1.7/24`), naming `flag`.
pub fn refuse_host_bits(flag: &str, nets: &[IpNet]) -> Result<()> {
    match nets.iter().find(|n| n.trunc() != **n) {
        Some(n) => bail!("{flag} {n} has host bits set: did you mean {}?", n.trunc()),
        None => Ok(()),
    }
}

/// Sets the log level to `new` (a reload), logging `said` at the old level or the new one,
/// whichever says more, so an operator sees the change either way.
pub fn change_log_level(new: log::LevelFilter, said: impl FnOnce(log::LevelFilter)) {
    let old = log::max_level();
    log::set_max_level(new.max(old));
    said(old);
    log::set_max_level(new);
}

/// Prefixes as the log shows them: `192.0.2.0/24, 2001:db8:1::/64`.
pub fn show_nets(nets: &[IpNet]) -> String {
    nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

/// A start refused for its configuration or for the box it would run on (`vipgate
/// gateway` and `authority` exit with status 78, EX_CONFIG, for it: systemd's
/// `RestartPreventExitStatus=78` then does not retry what cannot work).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// `--mapping` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingArg {
    /// A different virtual address per partner (partners cannot correlate a host).
    PerPartner,
    /// One virtual address per host for all partners (what hole punching needs).
    PerHost,
}

/// `--on-stop` values: what a stopping gateway leaves in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStop {
    /// Keep the guard: traffic from the LAN is refused and traffic to the pool unreachable
    /// until the next start or `vipgate cleanup` (a host never goes out under its real
    /// address).
    #[default]
    Closed,
    /// Remove every rule and route: the LAN is routed as if vipgate had never run.
    Open,
}

/// `--filtering` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilteringArg {
    /// Only a lease's partners may send to its virtual address.
    Partner,
    /// Anyone may (a new sender gets its own lease to the host).
    Any,
}

/// Whether to ask the kernel for offloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffloadMode {
    /// Use them when the kernel offers them; plain packets otherwise.
    #[default]
    Auto,
    /// Require them: refuse to start without.
    On,
    /// Plain packets only (no virtio-net header).
    Off,
}

/// Reads a TOML file into `T`; errors name the file and the line.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
        let msg = e.message().trim_end().to_string();
        match line {
            Some(l) => anyhow::anyhow!("{}: line {l}: {msg}", path.display()),
            None => anyhow::anyhow!("{}: {msg}", path.display()),
        }
    })
}

/// Every setting of `vipgate gateway`, as flags and as TOML keys.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GatewaySettings {
    /// Real (served) prefix: hosts in it go out under virtual addresses. Repeatable.
    /// Required (flag or file).
    #[arg(long = "lan", value_name = "PREFIX")]
    #[serde(default)]
    pub lan: Vec<IpNet>,

    /// Pool prefix the virtual addresses come from (IPv4 and/or IPv6). Repeatable. Required.
    #[arg(long = "pool", value_name = "PREFIX")]
    #[serde(default)]
    pub pool: Vec<IpNet>,

    /// Pool addresses never handed out. Repeatable.
    #[arg(long = "exclude", value_name = "PREFIX")]
    #[serde(default)]
    pub exclude: Vec<IpNet>,

    /// TUN device to create [default: vip0].
    #[arg(long, value_name = "NAME")]
    pub tun: Option<String>,

    /// TUN segmentation and checksum offloads (IFF_VNET_HDR, TSO, USO): one read or write
    /// then moves a 64 KB TCP super-packet. `auto` uses them when the kernel offers them and
    /// turns them off by itself if the kernel refuses a super-packet on write; `on` refuses
    /// to start without them [default: auto].
    #[arg(long, value_enum)]
    pub offload: Option<OffloadMode>,

    /// Queues of the TUN device, each read and written by its own thread (the kernel keeps a
    /// flow on one queue). More than 1 helps many flows at once on a box with cores to spare;
    /// one flow always runs on one queue [default: 1, at most 16].
    #[arg(long, value_name = "N")]
    pub queues: Option<usize>,

    /// How a host's virtual address is chosen [default: per-partner].
    #[arg(long, value_enum)]
    pub mapping: Option<MappingArg>,

    /// Who may send to a virtual address [default: partner].
    #[arg(long, value_enum)]
    pub filtering: Option<FilteringArg>,

    /// Seconds an implicit lease outlives its last flow [default: 0].
    #[arg(long, value_name = "SECS")]
    pub lease_idle: Option<u64>,

    /// Seconds a released address is held back from other hosts (RFC 6888 REQ-8)
    /// [default: 120].
    #[arg(long, value_name = "SECS")]
    pub quarantine: Option<u64>,

    /// UDP idle timeout in seconds, at least 120 (RFC 4787 REQ-5) [default: 300].
    #[arg(long, value_name = "SECS")]
    pub udp_timeout: Option<u64>,

    /// Established TCP idle timeout in seconds, at least 7440 (RFC 5382 REQ-5)
    /// [default: 7440].
    #[arg(long, value_name = "SECS")]
    pub tcp_established_timeout: Option<u64>,

    /// Opening/closing TCP idle timeout in seconds, at least 240 [default: 240].
    #[arg(long, value_name = "SECS")]
    pub tcp_transitory_timeout: Option<u64>,

    /// ICMP echo idle timeout in seconds, at least 60 (RFC 5508 REQ-2) [default: 60].
    #[arg(long, value_name = "SECS")]
    pub icmp_timeout: Option<u64>,

    /// Most leases at once; more are refused with ICMP 3/13, never evicted [default: 65536].
    #[arg(long, value_name = "N")]
    pub max_leases: Option<usize>,

    /// Most flows at once [default: 1048576].
    #[arg(long, value_name = "N")]
    pub max_flows: Option<usize>,

    /// Most leases one host holds at once (RFC 6888 REQ-4): more are refused with ICMP 3/13
    /// and counted, so one host cannot take what all need [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_leases_per_host: Option<usize>,

    /// Most flows one host holds at once [default: 65536].
    #[arg(long, value_name = "N")]
    pub max_flows_per_host: Option<usize>,

    /// Source address of the ICMP errors the gateway sends [default: 192.0.0.8, RFC 7600].
    #[arg(long, value_name = "ADDR")]
    pub icmp_source_v4: Option<Ipv4Addr>,

    /// Source address of the ICMPv6 errors the gateway sends [default: the first address
    /// of the first IPv6 pool, which is never handed out].
    #[arg(long, value_name = "ADDR")]
    pub icmp_source_v6: Option<Ipv6Addr>,

    /// Directory of the gateway's durable state [default: /var/lib/vipgate].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Unix socket for `vipgate leases` and `vipgate stats` (mode 0600)
    /// [default: /run/vipgate/control.sock].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Serve Prometheus metrics over HTTP on this address, e.g. 127.0.0.1:9477
    /// [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Routing table for the gateway's routes [default: 7443].
    #[arg(long, value_name = "N")]
    pub route_table: Option<u32>,

    /// Priority of the first of the gateway's policy rules; it uses this and the next 5
    /// (six in all) [default: 7443].
    #[arg(long, value_name = "N")]
    pub rule_priority: Option<u32>,

    /// What stopping leaves behind: `closed` keeps the fail-closed guard (hosts of the LAN
    /// are refused, the pool is unreachable) until the next start or `vipgate cleanup`;
    /// `open` removes every rule and route [default: closed].
    #[arg(long, value_enum)]
    pub on_stop: Option<OnStop>,

    /// error, warn, info, debug or trace [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Address (IP:PORT) the rental authority listens on over TLS; repeatable
    /// [default: [::]:7443, every address of the box, IPv4 included].
    #[arg(long = "authority-listen", value_name = "ADDR")]
    #[serde(default)]
    pub authority_listen: Vec<SocketAddr>,

    /// Do not run the rental authority (no TLS port; leases are still durable).
    #[arg(long)]
    #[serde(default)]
    pub no_authority: bool,

    /// The authority's TLS certificate (PEM) [default: one generated once into
    /// <state-dir>/tls/cert.pem; clients pin it with --ca].
    #[arg(long, value_name = "FILE")]
    pub authority_cert: Option<PathBuf>,

    /// The private key of --authority-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub authority_key: Option<PathBuf>,

    /// Inquiries answered per second per source address (IPv6: per /64) [default: 20].
    #[arg(long, value_name = "N")]
    pub inquiry_rate: Option<u32>,

    /// Rents, renews and releases answered per second per host of the LAN (burst: twice
    /// that); more are answered `rate_limited`, so one host's churn cannot crowd the others
    /// [default: 100].
    #[arg(long, value_name = "N")]
    pub rent_rate: Option<u32>,

    /// Authority connections one source holds at once (a host of the LAN is its own source;
    /// outside, an IPv4 address or an IPv6 /64): one source flooding the port never takes the
    /// slots a host of the LAN needs to rent [default: 64, at most 4096].
    #[arg(long, value_name = "N")]
    pub authority_conns_per_source: Option<usize>,

    /// Seconds the lease history is kept after a lease ended [default: 2592000, 30 days].
    #[arg(long, value_name = "SECS")]
    pub history_retention: Option<u64>,
}

/// The checked gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The translator's configuration.
    pub nat: nat::Config,
    /// TUN device name.
    pub tun: String,
    /// TUN offloads.
    pub offload: OffloadMode,
    /// TUN queues (threads).
    pub queues: usize,
    /// State directory.
    pub state_dir: PathBuf,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Metrics listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// Routing table.
    pub route_table: u32,
    /// First rule priority.
    pub rule_priority: u32,
    /// What stopping leaves behind.
    pub on_stop: OnStop,
    /// Log level.
    pub log_level: log::LevelFilter,
    /// The rental authority, unless turned off.
    pub authority: Option<AuthorityConfig>,
    /// How long ended leases stay in the history.
    pub history_retention: Duration,
}

/// The rental authority's settings.
#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    /// Listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Certificate and key files, when not generated.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Inquiries per second per source.
    pub inquiry_rate: u32,
    /// Connections per source.
    pub conns_per_source: usize,
    /// Rents, renews and releases per second per host.
    pub rent_rate: u32,
}

impl GatewaySettings {
    /// Reads a TOML file of settings; errors name the file and the line.
    pub fn from_file(path: &Path) -> Result<GatewaySettings> {
        read_toml(path)
    }

    /// `self` (flags) over `file`: a flag given wins; repeatable flags replace the file's list.
    pub fn over(self, file: GatewaySettings) -> GatewaySettings {
        fn list<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
            if a.is_empty() {
                b
            } else {
                a
            }
        }
        GatewaySettings {
            lan: list(self.lan, file.lan),
            pool: list(self.pool, file.pool),
            exclude: list(self.exclude, file.exclude),
            tun: self.tun.or(file.tun),
            offload: self.offload.or(file.offload),
            queues: self.queues.or(file.queues),
            mapping: self.mapping.or(file.mapping),
            filtering: self.filtering.or(file.filtering),
            lease_idle: self.lease_idle.or(file.lease_idle),
            quarantine: self.quarantine.or(file.quarantine),
            udp_timeout: self.udp_timeout.or(file.udp_timeout),
            tcp_established_timeout: self.tcp_established_timeout.or(file.tcp_established_timeout),
            tcp_transitory_timeout: self.tcp_transitory_timeout.or(file.tcp_transitory_timeout),
            icmp_timeout: self.icmp_timeout.or(file.icmp_timeout),
            max_leases: self.max_leases.or(file.max_leases),
            max_flows: self.max_flows.or(file.max_flows),
            max_leases_per_host: self.max_leases_per_host.or(file.max_leases_per_host),
            max_flows_per_host: self.max_flows_per_host.or(file.max_flows_per_host),
            icmp_source_v4: self.icmp_source_v4.or(file.icmp_source_v4),
            icmp_source_v6: self.icmp_source_v6.or(file.icmp_source_v6),
            state_dir: self.state_dir.or(file.state_dir),
            control_socket: self.control_socket.or(file.control_socket),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            route_table: self.route_table.or(file.route_table),
            rule_priority: self.rule_priority.or(file.rule_priority),
            on_stop: self.on_stop.or(file.on_stop),
            log_level: self.log_level.or(file.log_level),
            authority_listen: list(self.authority_listen, file.authority_listen),
            no_authority: self.no_authority || file.no_authority,
            authority_cert: self.authority_cert.or(file.authority_cert),
            authority_key: self.authority_key.or(file.authority_key),
            inquiry_rate: self.inquiry_rate.or(file.inquiry_rate),
            rent_rate: self.rent_rate.or(file.rent_rate),
            authority_conns_per_source: self
                .authority_conns_per_source
                .or(file.authority_conns_per_source),
            history_retention: self.history_retention.or(file.history_retention),
        }
    }

    /// Checks the settings and fills in defaults.
    pub fn resolve(self) -> Result<GatewayConfig> {
        if self.lan.is_empty() || self.pool.is_empty() {
            let missing = match (self.lan.is_empty(), self.pool.is_empty()) {
                (true, true) => "--lan and --pool are",
                (true, false) => "--lan is",
                _ => "--pool is",
            };
            bail!(
                "{missing} required: say which real prefixes to serve and which pool to rent \
                 from, e.g. `vipgate gateway --lan 192.0.2.0/24 --pool 198.18.0.0/24`"
            );
        }
        for (flag, nets) in
            [("--lan", &self.lan), ("--pool", &self.pool), ("--exclude", &self.exclude)]
        {
            refuse_host_bits(flag, nets)?;
        }
        let mut nat = nat::Config::new(self.lan.clone(), self.pool.clone());
        nat.exclude = self.exclude.clone();
        nat.mapping = match self.mapping.unwrap_or(MappingArg::PerPartner) {
            MappingArg::PerPartner => Mapping::PerPartner,
            MappingArg::PerHost => Mapping::PerHost,
        };
        nat.filtering = match self.filtering.unwrap_or(FilteringArg::Partner) {
            FilteringArg::Partner => Filtering::Partner,
            FilteringArg::Any => Filtering::Any,
        };
        let d = Timeouts::default();
        let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
        nat.timeouts = Timeouts {
            udp: secs(self.udp_timeout, d.udp),
            tcp_established: secs(self.tcp_established_timeout, d.tcp_established),
            tcp_transitory: secs(self.tcp_transitory_timeout, d.tcp_transitory),
            icmp_query: secs(self.icmp_timeout, d.icmp_query),
            lease_idle: secs(self.lease_idle, d.lease_idle),
            quarantine: secs(self.quarantine, d.quarantine),
        };
        if let Some(n) = self.max_leases {
            nat.max_leases = n;
        }
        if let Some(n) = self.max_flows {
            nat.max_flows = n;
        }
        if let Some(n) = self.max_leases_per_host {
            nat.max_leases_per_host = n;
        }
        if let Some(n) = self.max_flows_per_host {
            nat.max_flows_per_host = n;
        }
        if let Some(a) = self.icmp_source_v4 {
            nat.icmp_source_v4 = a;
        }
        nat.icmp_source_v6 = self.icmp_source_v6.or_else(|| {
            self.pool.iter().find_map(|p| match p {
                IpNet::V6(n) => Some(n.network()),
                IpNet::V4(_) => None,
            })
        });
        if let Some(v6) = nat
            .icmp_source_v6
            .filter(|a| self.pool.iter().any(|p| p.contains(&std::net::IpAddr::V6(*a))))
        {
            // The pool's first address is never handed out; keep it that way if it was given
            // (an address outside every pool needs no exclusion).
            nat.exclude.push(IpNet::from(std::net::IpAddr::V6(v6)));
        }
        nat.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let queues = self.queues.unwrap_or(1);
        if !(1..=16).contains(&queues) {
            bail!("--queues {queues}: give 1 to 16");
        }
        let tun = self.tun.unwrap_or_else(|| DEFAULT_TUN.to_string());
        if tun.is_empty() || tun.len() > 15 || tun.contains(['/', ' ']) {
            bail!(
                "--tun {tun:?} is not a valid interface name (1 to 15 characters, no '/' or space)"
            );
        }
        let l = self.log_level.as_deref().unwrap_or("info");
        let log_level = l.parse().map_err(|_| {
            anyhow::anyhow!("--log-level {l:?}: use error, warn, info, debug or trace")
        })?;
        let cert = match (self.authority_cert, self.authority_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("--authority-cert and --authority-key go together: give both, or neither to use a generated certificate"),
        };
        let conns_per_source = match self.authority_conns_per_source {
            None => DEFAULT_AUTHORITY_CONNS_PER_SOURCE,
            Some(n @ 1..=AUTHORITY_CONNS) => n,
            Some(n) => bail!(
                "--authority-conns-per-source {n} is out of range: give 1 to {AUTHORITY_CONNS}"
            ),
        };
        let authority = (!self.no_authority).then(|| AuthorityConfig {
            listen: if self.authority_listen.is_empty() {
                vec![SocketAddr::from((
                    std::net::Ipv6Addr::UNSPECIFIED,
                    crate::authority::DEFAULT_PORT,
                ))]
            } else {
                self.authority_listen
            },
            cert,
            inquiry_rate: self.inquiry_rate.unwrap_or(20).max(1),
            conns_per_source,
            rent_rate: self.rent_rate.unwrap_or(100).max(1),
        });
        nat.hold_until_durable = true;
        Ok(GatewayConfig {
            authority,
            history_retention: Duration::from_secs(
                self.history_retention.unwrap_or(30 * 24 * 3600),
            ),
            nat,
            tun,
            offload: self.offload.unwrap_or_default(),
            queues,
            state_dir: self.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            control_socket: self.control_socket.unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            metrics_listen: self.metrics_listen,
            route_table: self.route_table.unwrap_or(DEFAULT_ROUTE_TABLE),
            rule_priority: self.rule_priority.unwrap_or(DEFAULT_RULE_PRIORITY),
            on_stop: self.on_stop.unwrap_or_default(),
            log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<GatewaySettings> {
        let dir = std::env::temp_dir().join(format!("vipgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{}.toml", text.len()));
        std::fs::write(&p, text).unwrap();
        GatewaySettings::from_file(&p)
    }

    #[test]
    fn offloads_default_to_auto() {
        let c = GatewaySettings {
            lan: vec!["192.0.2.0/24".parse().unwrap()],
            pool: vec!["198.18.0.0/24".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(c.resolve().unwrap().offload, OffloadMode::Auto);
    }

    #[test]
    fn file_keys_are_flag_names() {
        let s = file(
            "lan = [\"192.0.2.0/24\"]\npool = [\"198.18.0.0/24\", \"2001:db8:ff::/64\"]\n\
             mapping = \"per-host\"\nfiltering = \"any\"\nlease-idle = 30\ntun = \"vg1\"\n\
             metrics-listen = \"127.0.0.1:9477\"\noffload = \"off\"\n",
        )
        .unwrap();
        let c = s.resolve().unwrap();
        assert_eq!(c.tun, "vg1");
        assert_eq!(c.offload, OffloadMode::Off);
        assert_eq!(c.nat.mapping, Mapping::PerHost);
        assert_eq!(c.nat.filtering, Filtering::Any);
        assert_eq!(c.nat.timeouts.lease_idle, Duration::from_secs(30));
        assert_eq!(c.nat.icmp_source_v6, Some("2001:db8:ff::".parse().unwrap()));
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9477".parse().unwrap()));
    }

    #[test]
    fn unknown_key_names_its_line() {
        let e = file("lan = [\"192.0.2.0/24\"]\n\npools = [\"198.18.0.0/24\"]\n").unwrap_err();
        let m = format!("{e:#}");
        assert!(m.contains("line 3") && m.contains("pools"), "{m}");
    }

    #[test]
    fn bad_prefix_names_its_line() {
        let e = file("lan = [\"192.0.2.0/24\"]\npool = [\"198.18.0.0/33\"]\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
    }

    #[test]
    fn flags_override_file() {
        let f =
            GatewaySettings { tun: Some("a".into()), lease_idle: Some(5), ..Default::default() };
        let flags = GatewaySettings { tun: Some("b".into()), ..Default::default() };
        let m = flags.over(f);
        assert_eq!((m.tun.as_deref(), m.lease_idle), (Some("b"), Some(5)));
    }

    fn settings(lan: &[&str], pool: &[&str], exclude: &[&str]) -> GatewaySettings {
        let nets = |v: &[&str]| v.iter().map(|n| n.parse().unwrap()).collect();
        GatewaySettings {
            lan: nets(lan),
            pool: nets(pool),
            exclude: nets(exclude),
            ..Default::default()
        }
    }

    fn refusal(s: GatewaySettings) -> String {
        format!("{:#}", s.resolve().unwrap_err())
    }

    #[test]
    fn host_bits_are_refused_with_the_prefix_meant() {
        let e = refusal(settings(&["192.0.2.0/24"], &["198.18.1.7/24"], &[]));
        assert_eq!(e, "--pool 198.18.1.7/24 has host bits set: did you mean 198.18.1.0/24?");
        let e = refusal(settings(&["192.0.2.9/24"], &["198.18.1.0/24"], &[]));
        assert_eq!(e, "--lan 192.0.2.9/24 has host bits set: did you mean 192.0.2.0/24?");
        let e = refusal(settings(&["192.0.2.0/24"], &["198.18.1.0/24"], &["198.18.1.5/30"]));
        assert_eq!(e, "--exclude 198.18.1.5/30 has host bits set: did you mean 198.18.1.4/30?");
        let e = refusal(settings(&["2001:db8:1::1/64"], &["2001:db8:ff::/64"], &[]));
        assert!(e.contains("did you mean 2001:db8:1::/64?"), "{e}");
        // A host route is a prefix without host bits.
        assert!(settings(&["192.0.2.0/24"], &["198.18.1.0/24"], &["198.18.1.5/32"])
            .resolve()
            .is_ok());
    }

    #[test]
    fn a_pool_fully_excluded_is_refused() {
        let e = refusal(settings(&["192.0.2.0/24"], &["198.18.1.0/24"], &["198.18.0.0/23"]));
        assert_eq!(
            e,
            "--pool 198.18.1.0/24 is entirely covered by --exclude: none of its addresses could \
             ever be handed out; narrow the exclusions or drop the pool"
        );
        // Two halves cover it too.
        let e = refusal(settings(
            &["192.0.2.0/24"],
            &["198.18.1.0/24"],
            &["198.18.1.0/25", "198.18.1.128/25"],
        ));
        assert!(e.starts_with("--pool 198.18.1.0/24 is entirely covered"), "{e}");
        // A /30 whose two usable addresses are excluded (network and broadcast never are).
        let e = refusal(settings(
            &["192.0.2.0/24"],
            &["198.18.1.0/30"],
            &["198.18.1.1/32", "198.18.1.2/32"],
        ));
        assert!(e.starts_with("--pool 198.18.1.0/30 is entirely covered"), "{e}");
        // One address left is enough.
        assert!(settings(&["192.0.2.0/24"], &["198.18.1.0/30"], &["198.18.1.1/32"])
            .resolve()
            .is_ok());
    }

    #[test]
    fn an_exclude_outside_every_pool_is_refused() {
        let e = refusal(settings(&["192.0.2.0/24"], &["198.18.1.0/24"], &["198.18.2.0/28"]));
        assert_eq!(
            e,
            "--exclude 198.18.2.0/28 is outside every --pool, so it excludes nothing: fix the \
             prefix or drop it"
        );
        // An --icmp-source-v6 outside the pools needs no exclusion and is not refused.
        let mut s = settings(&["2001:db8:1::/64"], &["2001:db8:ff::/64"], &[]);
        s.icmp_source_v6 = Some("2001:db8:2::1".parse().unwrap());
        assert!(s.resolve().is_ok());
    }

    #[test]
    fn a_lan_family_without_a_pool_is_refused() {
        let e = refusal(settings(&["192.0.2.0/24", "2001:db8:1::/64"], &["198.18.0.0/24"], &[]));
        assert_eq!(
            e,
            "--lan 2001:db8:1::/64 is IPv6 but no --pool is: its hosts could never get a virtual \
             address; add an IPv6 pool (e.g. --pool 2001:db8:ff::/64) or drop the prefix"
        );
        let e = refusal(settings(&["192.0.2.0/24"], &["2001:db8:ff::/64"], &[]));
        assert!(e.starts_with("--lan 192.0.2.0/24 is IPv4 but no --pool is"), "{e}");
    }

    #[test]
    fn required_and_invalid() {
        let e = GatewaySettings::default().resolve().unwrap_err().to_string();
        assert!(e.contains("--lan and --pool are required") && e.contains("e.g."), "{e}");
        let s = GatewaySettings {
            lan: vec!["192.0.2.0/24".parse().unwrap()],
            pool: vec!["192.0.2.0/25".parse().unwrap()],
            ..Default::default()
        };
        assert!(s.resolve().unwrap_err().to_string().contains("overlaps"));
        let s = GatewaySettings {
            lan: vec!["192.0.2.0/24".parse().unwrap()],
            pool: vec!["198.18.0.0/24".parse().unwrap()],
            udp_timeout: Some(30),
            ..Default::default()
        };
        assert!(s.resolve().unwrap_err().to_string().contains("udp timeout below"));
    }
}
