//! What the gateway checks and changes in the kernel: preflight checks that refuse to start
//! with one clear sentence, and the policy rules and routes that steer traffic into the TUN.
//!
//! Everything the gateway installs lives in its own routing table and its own band of six
//! rule priorities (both configurable), for each address family it serves:
//!
//! | priority | rule                          | why                                          |
//! |----------|-------------------------------|----------------------------------------------|
//! | P        | `iif TUN lookup main`         | packets the daemon wrote back route normally |
//! | P+1      | `to POOL lookup T`            | traffic to virtual addresses (the box's own  |
//! |          |                               | ICMP errors included) goes into the TUN      |
//! | P+2      | `iif lo ipproto icmp lookup T`| the box's own ICMP passes the translator, so |
//! |          | (IPv6: `ipv6-icmp`, to global | an error it raises about a translated packet |
//! |          | unicast 2000::/3 only)        | never shows a host's real address outside    |
//! | P+3      | `iif lo lookup main`          | the box's other traffic bypasses the TUN     |
//! | P+4      | `from LAN lookup T`           | hosts' traffic goes into the TUN             |
//! | P+5      | `from LAN prohibit`,          | fail closed: reached only when table T has   |
//! |          | `to POOL unreachable`         | no route (the daemon died and its TUN went)  |
//!
//! Table T holds one route per family: `default dev TUN`. The box's own ICMP that is not about
//! a lease comes back out of the translator unchanged (`Verdict::Pass`). Tear-down
//! by default (`--on-stop closed`) keeps the guard and P+3, so the LAN stays closed (the box
//! itself stays reachable) until the next start or `vipgate cleanup`; `--on-stop open` deletes
//! exactly the rules in the band and flushes table T. Start-up clears what a stopped or
//! crashed run left behind except its guard, which it replaces once its own rules are in
//! place, so the LAN is never open untranslated, not even during a restart. Only the holder
//! of the band's [`super::claim::Claim`] changes any of it. Nothing else is touched, but
//! one sysctl of the namespace:
//!
//! | sysctl (the gateway's namespace)                | why                                      |
//! |-------------------------------------------------|------------------------------------------|
//! | `net.ipv4.icmp_errors_use_inbound_ifaddr=1`     | the box's own ICMP errors (time exceeded |
//! |                                                 | for a probe to a virtual address) come   |
//! |                                                 | from the address of the interface the    |
//! |                                                 | packet came in by (the WAN side), not    |
//! |                                                 | from whatever address the TUN, which has |
//! |                                                 | none, borrows (often the LAN's); IPv6    |
//! |                                                 | does this already (RFC 4443 §2.2 source  |
//! |                                                 | from the input interface, Linux ≥ 4.19)  |
//!
//! It stays set when the gateway stops (it only chooses which of the box's addresses its ICMP
//! errors come from).

use super::firewall;
use crate::config::{GatewayConfig, Refusal};
use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use std::net::IpAddr;
use std::process::Command;

/// Number of rule priorities the gateway uses, from the configured first one.
pub const RULE_BAND: u32 = 6;
/// Offset in the band of the rule that lets the box's own traffic bypass the TUN.
const LOCAL: u32 = 3;
/// Offset in the band of the fail-closed guard rules.
const GUARD: u32 = 5;

/// Runs `ip` with `args`; the error carries its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out =
        Command::new("ip").args(args).output().context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The address families a set of prefixes spans: "-4", "-6".
pub fn families(nets: &[IpNet]) -> Vec<&'static str> {
    let mut f = Vec::new();
    if nets.iter().any(|n| matches!(n, IpNet::V4(_))) {
        f.push("-4");
    }
    if nets.iter().any(|n| matches!(n, IpNet::V6(_))) {
        f.push("-6");
    }
    f
}

fn read_sys(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// What [`preflight`] found: one line per thing it checked, and the warnings (things that
/// do not stop the gateway but will hurt it, such as a firewall rule that rewrites the pool).
#[derive(Debug, Default)]
pub struct Preflight {
    /// What was checked and found right, one short line each.
    pub checked: Vec<String>,
    /// One sentence each.
    pub warnings: Vec<String>,
}

/// Who runs [`preflight`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The real start: it claims the routing table and rule band itself right after (and
    /// refuses a band another gateway holds then), so preflight leaves them alone.
    Start,
    /// `vipgate gateway --check`: also reads the kernel's rules, routes and links to tell
    /// whether the table, the band and the TUN name are free.
    Check,
}

/// Checks that the box can run the gateway as configured, changing nothing: privileges,
/// `/dev/net/tun`, forwarding, reverse-path filtering, the pool against the box's addresses,
/// in [`Mode::Check`] the routing table, rule band and TUN name (free, or holding only what a
/// stopped or crashed gateway left), and the nftables ruleset ([`super::firewall`]). Both
/// the real start and `vipgate gateway --check` run it. A refusal is a [`Refusal`] (exit
/// status 78) of one sentence saying what to do.
pub fn preflight(cfg: &GatewayConfig, mode: Mode) -> Result<Preflight> {
    let mut found = Preflight::default();
    let refused = |e: anyhow::Error| anyhow::Error::new(Refusal(format!("{e:#}")));
    check_box(cfg, &mut found).map_err(refused)?;
    if mode == Mode::Check {
        check_band(cfg, &mut found).map_err(refused)?;
    }
    let lan_ifaces = lan_interfaces(&cfg.nat.lan, &cfg.tun);
    let gw = firewall::Gateway {
        tun: &cfg.tun,
        lan: &cfg.nat.lan,
        pools: &cfg.nat.pools,
        lan_ifaces: &lan_ifaces,
    };
    match firewall::inspect(&gw) {
        Ok(None) => found.checked.push("firewall: nft is not installed, not checked".into()),
        Ok(Some(warnings)) => {
            found
                .checked
                .push(format!("firewall: the nftables ruleset, {} warning(s)", warnings.len()));
            found.warnings.extend(warnings);
        }
        Err(e) => found.warnings.push(format!("the firewall was not checked: {e:#}")),
    }
    Ok(found)
}

fn check_box(cfg: &GatewayConfig, found: &mut Preflight) -> Result<()> {
    let (lan, pools) = (&cfg.nat.lan, &cfg.nat.pools);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_NET_ADMIN: u64 = 1 << 12;
    if cap_eff & CAP_NET_ADMIN == 0 {
        bail!("vipgate gateway needs CAP_NET_ADMIN to create the TUN device and its routes: run it as root");
    }
    found.checked.push("privileges: CAP_NET_ADMIN".into());
    if !std::path::Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing: load the tun module (`modprobe tun`) or give the container the device");
    }
    found.checked.push("/dev/net/tun is there".into());
    let mut all = lan.to_vec();
    all.extend_from_slice(pools);
    for fam in families(pools) {
        let (path, name) = if fam == "-4" {
            ("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward")
        } else {
            ("/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding")
        };
        if read_sys(path).as_deref() != Some("1") {
            bail!(
                "IP forwarding is off for {}: enable it with `sysctl -w {name}=1`",
                if fam == "-4" { "IPv4" } else { "IPv6" }
            );
        }
        found.checked.push(format!("forwarding: {name}=1"));
    }
    if families(pools).contains(&"-4") {
        if read_sys("/proc/sys/net/ipv4/conf/all/rp_filter").as_deref() == Some("1") {
            bail!(
                "strict reverse-path filtering (net.ipv4.conf.all.rp_filter=1) would drop the \
                 translated packets coming back from the TUN: set it to 2 (loose) or 0"
            );
        }
        found.checked.push("reverse-path filtering: not strict".into());
    }
    for local in local_addresses()? {
        if let Some(p) = pools.iter().find(|p| p.contains(&local)) {
            bail!("pool {p} contains {local}, an address of this box: choose a pool of addresses nobody uses");
        }
    }
    found.checked.push("pool: no address of this box in it".into());
    Ok(())
}

/// The routing table must hold no route and the rule band only rules a stopped or crashed
/// gateway left (its own kinds: lookups of the table, `lookup main` from an interface, the
/// guard's `prohibit` and `unreachable`), with its TUN gone; anything else belongs to
/// someone running, whose routing the start would cut.
fn check_band(cfg: &GatewayConfig, found: &mut Preflight) -> Result<()> {
    let (t, p, tun) = (cfg.route_table, cfg.rule_priority, cfg.tun.as_str());
    let last = p + RULE_BAND - 1;
    let table = t.to_string();
    let mut ours = 0;
    if std::path::Path::new("/sys/class/net").join(tun).exists() {
        bail!(
            "the TUN device {tun} exists already: another gateway runs with it; stop that one \
             or choose another --tun (and --route-table, --rule-priority)"
        );
    }
    for fam in ["-4", "-6"] {
        let routes = ip(&[fam, "route", "show", "table", &table]).unwrap_or_default();
        if let Some(r) = routes.lines().next() {
            bail!(
                "routing table {t} is in use (`{}`): another gateway runs with it; stop that \
                 one or choose another --route-table",
                r.trim()
            );
        }
        let json = ip(&["-j", fam, "rule", "show"])?;
        let rules: serde_json::Value =
            serde_json::from_str(&json).context("cannot parse `ip -j rule show`")?;
        for r in rules.as_array().into_iter().flatten() {
            let Some(prio) = r["priority"].as_u64().filter(|n| (p..=last).contains(&(*n as u32)))
            else {
                continue;
            };
            let action = r["action"].as_str().unwrap_or("");
            let lookup = r["table"].as_str().unwrap_or("");
            let vipgate_kind = lookup == table
                || (lookup == "main" && r.get("iif").is_some())
                || matches!(action, "prohibit" | "unreachable");
            if !vipgate_kind {
                bail!(
                    "rule priority {prio} (in the band {p}..{last} of --rule-priority) holds a \
                     rule that is not this gateway's (`{}`), which the start would delete: \
                     choose another --rule-priority",
                    describe_rule(r)
                );
            }
            ours += 1;
        }
    }
    found.checked.push(if ours == 0 {
        format!("routing: table {t} and rule priorities {p}..{last} are free")
    } else {
        format!(
            "routing: table {t} is free; rule priorities {p}..{last} hold {ours} rule(s) a \
             stopped or crashed gateway left, which the start replaces"
        )
    });
    Ok(())
}

/// A rule of `ip -j rule show` as `ip rule` shows it, e.g. `from 203.0.113.0/24 lookup 100`.
fn describe_rule(r: &serde_json::Value) -> String {
    let mut out = Vec::new();
    for (key, len) in [("src", "srclen"), ("dst", "dstlen")] {
        if let Some(a) = r[key].as_str().filter(|a| *a != "all") {
            let dir = if key == "src" { "from" } else { "to" };
            match r[len].as_u64() {
                Some(l) => out.push(format!("{dir} {a}/{l}")),
                None => out.push(format!("{dir} {a}")),
            }
        }
    }
    for key in ["iif", "oif", "fwmark", "ipproto"] {
        if let Some(v) = r.get(key) {
            out.push(format!("{key} {}", v.as_str().map_or(v.to_string(), str::to_string)));
        }
    }
    match (r["table"].as_str(), r["action"].as_str()) {
        (Some(t), _) => out.push(format!("lookup {t}")),
        (None, Some(a)) => out.push(a.to_string()),
        _ => {}
    }
    if out.is_empty() {
        "from all".into()
    } else {
        out.join(" ")
    }
}

/// The interfaces the kernel routes the served prefixes to (`ip route get` of an address in
/// each, `lo` and the TUN left out).
fn lan_interfaces(lan: &[IpNet], tun: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for net in lan {
        let last = net.hosts().last().unwrap_or(net.network());
        for a in [last, net.hosts().next().unwrap_or(net.network())] {
            let Ok(json) = ip(&["-j", "route", "get", &a.to_string()]) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
            let dev = v[0]["dev"].as_str().unwrap_or("");
            if !dev.is_empty() && dev != "lo" && dev != tun {
                if !out.iter().any(|d| d == dev) {
                    out.push(dev.to_string());
                }
                break;
            }
        }
    }
    out
}

/// Every address configured on the box's interfaces.
pub fn local_addresses() -> Result<Vec<IpAddr>> {
    let json = ip(&["-j", "addr", "show"])?;
    let v: serde_json::Value =
        serde_json::from_str(&json).context("cannot parse `ip -j addr show`")?;
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                out.push(ip);
            }
        }
    }
    Ok(out)
}

/// The routing state the gateway owns.
#[derive(Debug, Clone)]
pub struct Routing {
    /// TUN device name.
    pub tun: String,
    /// Table number.
    pub table: u32,
    /// First rule priority.
    pub priority: u32,
    /// Served prefixes.
    pub lan: Vec<IpNet>,
    /// Pool prefixes.
    pub pools: Vec<IpNet>,
}

impl Routing {
    fn all_families(&self) -> Vec<&'static str> {
        let mut all = self.lan.clone();
        all.extend_from_slice(&self.pools);
        families(&all)
    }

    /// Brings the TUN up, disables reverse-path filtering on it, and installs the rules and
    /// routes. On failure, what it installed stays for the caller to remove
    /// ([`Routing::close`] or [`Routing::remove`], as the gateway's `--on-stop` says).
    pub fn install(&self) -> Result<()> {
        self.try_install()?;
        self.replace_guard()
    }

    /// The fail-closed guard, last in the band: traffic from the LAN is prohibited and
    /// traffic to the pool unreachable whenever table T has no route, i.e. when the TUN is
    /// gone because the daemon died. A crashed gateway never lets a host out under its real
    /// address; the guard stays until the next start has its rules in place, then is
    /// replaced (or removed at a clean shutdown).
    fn replace_guard(&self) -> Result<()> {
        let prio = (self.priority + GUARD).to_string();
        for fam in ["-4", "-6"] {
            while ip(&[fam, "rule", "del", "priority", &prio]).is_ok() {}
        }
        for lan in &self.lan {
            ip(&[
                fam_of(lan),
                "rule",
                "add",
                "priority",
                &prio,
                "from",
                &lan.to_string(),
                "prohibit",
            ])?;
        }
        for pool in &self.pools {
            ip(&[
                fam_of(pool),
                "rule",
                "add",
                "priority",
                &prio,
                "to",
                &pool.to_string(),
                "unreachable",
            ])?;
        }
        Ok(())
    }

    /// Clears what a previous run left, except its fail-closed guard (so the LAN stays closed
    /// until [`Routing::install`] has the new rules in place). Returns the rules deleted.
    pub fn remove_leftovers(&self) -> Result<usize> {
        self.remove_band(&[GUARD])
    }

    /// What a gateway stopping closed does: deletes the rules that lead into the TUN and
    /// flushes table T, keeping the guard and the rule that lets the box's own traffic bypass
    /// it (so the box stays reachable from the LAN while its hosts are refused). This is the
    /// state a crash leaves too, once the kernel removed the dead TUN's routes.
    pub fn close(&self) -> Result<usize> {
        self.remove_band(&[LOCAL, GUARD])
    }

    fn try_install(&self) -> Result<()> {
        let (tun, t, p) = (self.tun.as_str(), self.table.to_string(), self.priority);
        if self.all_families().contains(&"-6") {
            // No link-local address or router solicitations on the TUN.
            let _ = ip(&["link", "set", "dev", tun, "addrgenmode", "none"]);
        }
        ip(&["link", "set", "dev", tun, "up"])?;
        // Packets written back carry partners' sources (reverse-path filtering would drop
        // them) and, for translated ICMP errors the box raised itself, the box's own address
        // (a "martian" unless accept_local is on).
        for (knob, value) in [("rp_filter", "0"), ("accept_local", "1")] {
            let path = format!("/proc/sys/net/ipv4/conf/{tun}/{knob}");
            if std::path::Path::new(&path).exists() {
                std::fs::write(&path, value).with_context(|| format!("cannot write {path}"))?;
            }
        }
        if self.all_families().contains(&"-4") {
            icmp_errors_from_inbound_interface()?;
        }
        for fam in self.all_families() {
            let rule = |k: u32, selector: &[&str], table: &str| -> Result<String> {
                let prio = (p + k).to_string();
                let mut args = vec![fam, "rule", "add", "priority", prio.as_str()];
                args.extend_from_slice(selector);
                args.extend(["lookup", table]);
                ip(&args)
            };
            ip(&[fam, "route", "replace", "default", "dev", tun, "table", &t])?;
            rule(0, &["iif", tun], "main")?;
            for pool in self.pools.iter().filter(|n| fam_of(n) == fam) {
                rule(1, &["to", &pool.to_string()], &t)?;
            }
            if fam == "-4" {
                rule(2, &["iif", "lo", "ipproto", "icmp"], &t)?;
            } else {
                // Global unicast only: the box's router advertisements and neighbour
                // discovery stay out of the TUN.
                rule(2, &["iif", "lo", "ipproto", "ipv6-icmp", "to", "2000::/3"], &t)?;
            }
            rule(3, &["iif", "lo"], "main")?;
            for lan in self.lan.iter().filter(|n| fam_of(n) == fam) {
                rule(4, &["from", &lan.to_string()], &t)?;
            }
        }
        Ok(())
    }

    /// Deletes every rule in the gateway's priority band and flushes its table, for both
    /// families. Returns how many rules it deleted.
    pub fn remove(&self) -> Result<usize> {
        self.remove_band(&[])
    }

    /// Deletes the rules of the band except those at the offsets in `keep`, and flushes
    /// table T.
    fn remove_band(&self, keep: &[u32]) -> Result<usize> {
        let t = self.table.to_string();
        let mut deleted = 0;
        for fam in ["-4", "-6"] {
            for k in (0..RULE_BAND).filter(|k| !keep.contains(k)) {
                let prio = (self.priority + k).to_string();
                // `ip rule del priority N` deletes one rule at a time.
                while ip(&[fam, "rule", "del", "priority", &prio]).is_ok() {
                    deleted += 1;
                }
            }
            // Flushing an empty or unknown table is not an error worth reporting.
            let _ = ip(&[fam, "route", "flush", "table", &t]);
        }
        Ok(deleted)
    }

    /// True when no rule of the band and no route of the table is left.
    pub fn is_clean(&self) -> Result<bool> {
        for fam in ["-4", "-6"] {
            let rules = ip(&[fam, "rule", "show"])?;
            let band = self.priority..self.priority + RULE_BAND;
            if rules.lines().any(|l| {
                l.split(':')
                    .next()
                    .and_then(|n| n.trim().parse::<u32>().ok())
                    .is_some_and(|n| band.contains(&n))
            }) {
                return Ok(false);
            }
            let routes =
                ip(&[fam, "route", "show", "table", &self.table.to_string()]).unwrap_or_default();
            if !routes.trim().is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Makes the box's own ICMPv4 errors come from the address of the interface the offending
/// packet came in by (`net.ipv4.icmp_errors_use_inbound_ifaddr=1`, a per-namespace sysctl).
///
/// Without it Linux takes the source from the route back to the sender; for a probe to a
/// virtual address that route is the TUN (rule P+1), which has no address, so the error
/// borrows one of the box's others, often its LAN address: "time exceeded" in a traceroute
/// through the gateway would name the LAN side. With it, the error names the WAN address
/// the probe arrived at, as a kernel NAT's does. ICMPv6 needs no setting: Linux already
/// takes the source from the input interface when the route has no preferred source.
fn icmp_errors_from_inbound_interface() -> Result<()> {
    let path = "/proc/sys/net/ipv4/icmp_errors_use_inbound_ifaddr";
    std::fs::write(path, "1").with_context(|| format!("cannot write {path}"))
}

fn fam_of(n: &IpNet) -> &'static str {
    match n {
        IpNet::V4(_) => "-4",
        IpNet::V6(_) => "-6",
    }
}
