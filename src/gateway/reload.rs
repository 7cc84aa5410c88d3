//! What a SIGHUP changes: the running configuration against the one read again from the
//! `--config` file (under the same command-line flags, which still win). Some settings change
//! at run time (the log level, the idle timers within their RFC floors, the inquiry and rent
//! rates, the history retention, `exclude`, the metrics address); the others are named as
//! needing a restart and keep their running values. A file that no longer parses changes
//! nothing.

use crate::config::GatewayConfig;
use anyhow::Result;

/// Reads the configuration again (the file under the flags), checked as at start.
pub type Source = Box<dyn Fn() -> Result<GatewayConfig>>;

/// How two configurations differ.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// What changes now, one `key old -> new` each.
    pub applied: Vec<String>,
    /// Keys that differ but take a restart.
    pub restart: Vec<&'static str>,
}

impl Diff {
    /// The one log line saying what a reload did.
    pub fn describe(&self) -> String {
        let mut s = if self.applied.is_empty() {
            "nothing changed".to_string()
        } else {
            self.applied.join(", ")
        };
        if !self.restart.is_empty() {
            s += &format!("; needs a restart (kept as running): {}", self.restart.join(", "));
        }
        s
    }
}

fn secs(d: std::time::Duration) -> String {
    format!("{}s", d.as_secs())
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    if v.is_empty() {
        return "[]".to_string();
    }
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// What differs from `old` to `new`.
pub fn diff(old: &GatewayConfig, new: &GatewayConfig) -> Diff {
    let mut d = Diff::default();
    let mut applied = |key: &str, a: String, b: String| {
        if a != b {
            d.applied.push(format!("{key} {a} -> {b}"));
        }
    };
    let (t, u) = (&old.nat.timeouts, &new.nat.timeouts);
    applied("log-level", old.log_level.to_string(), new.log_level.to_string());
    applied("udp-timeout", secs(t.udp), secs(u.udp));
    applied("tcp-established-timeout", secs(t.tcp_established), secs(u.tcp_established));
    applied("tcp-transitory-timeout", secs(t.tcp_transitory), secs(u.tcp_transitory));
    applied("icmp-timeout", secs(t.icmp_query), secs(u.icmp_query));
    applied("lease-idle", secs(t.lease_idle), secs(u.lease_idle));
    applied("quarantine", secs(t.quarantine), secs(u.quarantine));
    applied("exclude", list(&old.nat.exclude), list(&new.nat.exclude));
    applied("history-retention", secs(old.history_retention), secs(new.history_retention));
    let rate = |c: &GatewayConfig| c.authority.as_ref().map_or(0, |a| a.inquiry_rate);
    if old.authority.is_some() && new.authority.is_some() {
        applied("inquiry-rate", rate(old).to_string(), rate(new).to_string());
        let rents = |c: &GatewayConfig| c.authority.as_ref().map_or(0, |a| a.rent_rate);
        applied("rent-rate", rents(old).to_string(), rents(new).to_string());
    }
    let metrics = |c: &GatewayConfig| c.metrics_listen.map_or("off".to_string(), |a| a.to_string());
    applied("metrics-listen", metrics(old), metrics(new));

    let (a, b) = (&old.nat, &new.nat);
    let restart = [
        ("lan", a.lan != b.lan),
        ("pool", a.pools != b.pools),
        ("mapping", a.mapping != b.mapping),
        ("filtering", a.filtering != b.filtering),
        ("max-leases", a.max_leases != b.max_leases),
        ("max-flows", a.max_flows != b.max_flows),
        ("max-leases-per-host", a.max_leases_per_host != b.max_leases_per_host),
        ("max-flows-per-host", a.max_flows_per_host != b.max_flows_per_host),
        ("icmp-source-v4", a.icmp_source_v4 != b.icmp_source_v4),
        ("icmp-source-v6", a.icmp_source_v6 != b.icmp_source_v6),
        ("tun", old.tun != new.tun),
        ("offload", old.offload != new.offload),
        ("queues", old.queues != new.queues),
        ("state-dir", old.state_dir != new.state_dir),
        ("control-socket", old.control_socket != new.control_socket),
        ("route-table", old.route_table != new.route_table),
        ("rule-priority", old.rule_priority != new.rule_priority),
        ("on-stop", old.on_stop != new.on_stop),
        ("no-authority", old.authority.is_some() != new.authority.is_some()),
        (
            "authority-listen",
            old.authority.as_ref().map(|x| &x.listen) != new.authority.as_ref().map(|x| &x.listen)
                && old.authority.is_some() == new.authority.is_some(),
        ),
        (
            "authority-conns-per-source",
            old.authority.as_ref().map(|x| x.conns_per_source)
                != new.authority.as_ref().map(|x| x.conns_per_source)
                && old.authority.is_some() == new.authority.is_some(),
        ),
        (
            "authority-cert",
            old.authority.as_ref().map(|x| &x.cert) != new.authority.as_ref().map(|x| &x.cert)
                && old.authority.is_some() == new.authority.is_some(),
        ),
    ];
    d.restart = restart.iter().filter(|(_, differs)| *differs).map(|(k, _)| *k).collect();
    d
}

/// `new` with the settings that take a restart put back to `old`'s: what runs after a
/// reload.
pub fn running(old: &GatewayConfig, new: &GatewayConfig) -> GatewayConfig {
    let mut r = old.clone();
    r.log_level = new.log_level;
    r.nat.timeouts = new.nat.timeouts;
    r.nat.exclude = new.nat.exclude.clone();
    r.history_retention = new.history_retention;
    r.metrics_listen = new.metrics_listen;
    if let (Some(a), Some(b)) = (r.authority.as_mut(), new.authority.as_ref()) {
        a.inquiry_rate = b.inquiry_rate;
        a.rent_rate = b.rent_rate;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewaySettings;

    fn cfg(toml: &str) -> GatewayConfig {
        let s: GatewaySettings = toml::from_str(toml).unwrap();
        s.resolve().unwrap()
    }

    #[test]
    fn a_reload_applies_what_can_change_and_names_what_needs_a_restart() {
        let base = "lan = [\"192.0.2.0/24\"]\npool = [\"198.18.0.0/24\"]\n";
        let old = cfg(base);
        assert_eq!(diff(&old, &cfg(base)), Diff::default());
        assert_eq!(diff(&old, &cfg(base)).describe(), "nothing changed");
        let new = cfg(&format!(
            "{base}log-level = \"debug\"\nudp-timeout = 600\ninquiry-rate = 5\n\
             exclude = [\"198.18.0.0/28\"]\nmetrics-listen = \"127.0.0.1:9477\"\n\
             mapping = \"per-host\"\ntun = \"vip9\"\n"
        ));
        let d = diff(&old, &new);
        assert_eq!(
            d.applied,
            [
                "log-level INFO -> DEBUG",
                "udp-timeout 300s -> 600s",
                "exclude [] -> 198.18.0.0/28",
                "inquiry-rate 20 -> 5",
                "metrics-listen off -> 127.0.0.1:9477",
            ]
        );
        assert_eq!(d.restart, ["mapping", "tun"]);
        assert!(d.describe().ends_with("needs a restart (kept as running): mapping, tun"));
        let r = running(&old, &new);
        assert_eq!((r.tun.as_str(), r.nat.mapping), ("vip0", old.nat.mapping));
        assert_eq!(r.nat.timeouts.udp.as_secs(), 600);
        assert_eq!(r.authority.unwrap().inquiry_rate, 5);
        assert_eq!(diff(&running(&old, &new), &new).applied, Vec::<String>::new());
    }
}
