//! The box's nftables ruleset, read (never changed) to warn about rules that would defeat
//! the gateway: a NAT rule that rewrites the source of translated packets (the partner would
//! see the box's address, not the virtual one), and a forward chain that drops the legs of
//! the TUN (a box that allows LAN -> WAN drops the second leg, TUN -> WAN, of every packet).
//!
//! [`analyse`] is sans-IO: it takes the parsed `nft -j list ruleset` and the gateway's TUN
//! name, LAN and pools, and returns one sentence per problem. [`inspect`] runs `nft` and
//! feeds it.
//!
//! How it decides. Each base chain is walked rule by rule with the packets of the gateway:
//! for every served family, the first packet of a new connection on each leg,
//!
//! | leg          | in      | out     | source         | destination    |
//! |--------------|---------|---------|----------------|----------------|
//! | LAN -> TUN   | LAN     | the TUN | a LAN address  | a partner      |
//! | TUN -> WAN   | the TUN | WAN     | a pool address | a partner      |
//! | WAN -> TUN   | WAN     | the TUN | a partner      | a pool address |
//! | TUN -> LAN   | the TUN | LAN     | a partner      | a LAN address  |
//!
//! (conntrack state `new`; the LAN and WAN interfaces' names are not known here, only that
//! they are neither the TUN nor `lo`). A match is recognised when it tests `iifname`,
//! `oifname` (`iif`, `oif`), `ip`/`ip6` `saddr`/`daddr` against addresses, prefixes, ranges,
//! anonymous or named sets, `ct state`, `meta nfproto` / `meta protocol`, or the protocol and
//! ports (`meta l4proto`, `ip protocol`, `tcp dport`, …, which only narrow what a rule takes).
//! Anything else (marks, `fib`, `skuid`, `xt` matches, …) makes the rule *unrecognised*,
//! and unrecognised rules are skipped: the analysis warns only about what it can show.
//!
//! - NAT: in a `nat` base chain on `postrouting`, a `masquerade` or `snat` (or an `xt`
//!   MASQUERADE/SNAT target) whose matches can hold for the TUN -> WAN packet (none is false
//!   for it; a protocol, port or destination test still leaves part of the pool's traffic
//!   rewritten) is reported, unless an earlier `accept` or `return` surely takes that packet
//!   (e.g. `ip saddr 198.18.0.0/24 return`). The fix is a source test that excludes the pool:
//!   `ip saddr != 198.18.0.0/24 masquerade`.
//! - Forward: in a `filter` base chain on `forward`, a leg is dropped when it reaches the
//!   policy `drop` or a `drop`/`reject` rule whose matches all hold, before any `accept` that
//!   can hold for it for all its traffic (interface names may be the unknown LAN or WAN one;
//!   a protocol, port or partner-address test means only part of the traffic passes, which
//!   does not count). `ct state established,related accept` does not let the first packet of
//!   a connection through, so it does not count either. A `jump`, `goto` or verdict map the
//!   leg may reach ends the walk without a warning (what the other chain does is not
//!   followed).

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde_json::Value;
use std::net::IpAddr;

/// What the analysis knows of the gateway.
#[derive(Debug, Clone, Copy)]
pub struct Gateway<'a> {
    /// The TUN device's name.
    pub tun: &'a str,
    /// The served prefixes.
    pub lan: &'a [IpNet],
    /// The pool prefixes.
    pub pools: &'a [IpNet],
    /// The interfaces the LAN is reached on (from the kernel's routes); empty when not known,
    /// and then any interface name but the TUN's and `lo` may be the LAN's or the WAN's.
    pub lan_ifaces: &'a [String],
}

/// Runs `nft -j list ruleset` (read-only) and analyses it. `Ok(None)` when nft is not
/// installed; an error when it is but cannot be read (e.g. without CAP_NET_ADMIN).
pub fn inspect(gw: &Gateway) -> Result<Option<Vec<String>>> {
    let out = match std::process::Command::new("nft").args(["-j", "list", "ruleset"]).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("cannot run `nft -j list ruleset`"),
    };
    if !out.status.success() {
        bail!("`nft -j list ruleset` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Some(Vec::new()));
    }
    let v: Value = serde_json::from_str(&text).context("cannot parse `nft -j list ruleset`")?;
    Ok(Some(analyse(&v, gw)))
}

/// One sentence per rule or chain of `ruleset` (the JSON of `nft -j list ruleset`) that
/// would rewrite translated traffic or drop a leg of the TUN (see the module's text).
pub fn analyse(ruleset: &Value, gw: &Gateway) -> Vec<String> {
    let objects: Vec<&Value> = ruleset["nftables"].as_array().into_iter().flatten().collect();
    let mut out = Vec::new();
    for c in objects.iter().filter_map(|o| o.get("chain")) {
        let chain = Chain {
            family: c["family"].as_str().unwrap_or(""),
            table: c["table"].as_str().unwrap_or(""),
            name: c["name"].as_str().unwrap_or(""),
        };
        let kind = (c["type"].as_str(), c["hook"].as_str());
        let rules: Vec<&Value> = objects
            .iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| {
                r["family"] == chain.family && r["table"] == chain.table && r["chain"] == chain.name
            })
            .collect();
        let cx = Walk { gw, objects: &objects, chain };
        match kind {
            (Some("nat"), Some("postrouting")) => out.extend(cx.nat_warnings(&rules)),
            (Some("filter"), Some("forward")) => {
                let drop_policy = c["policy"].as_str() == Some("drop");
                out.extend(cx.forward_warning(&rules, drop_policy));
            }
            _ => {}
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct Chain<'a> {
    family: &'a str,
    table: &'a str,
    name: &'a str,
}

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.family, self.table, self.name)
    }
}

/// An interface of a leg: the TUN, the LAN's, or a WAN's (never `lo` or the TUN; a WAN
/// interface is none of the LAN's).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Iface {
    Tun,
    Lan,
    Wan,
}

/// An address of a leg: somewhere in a prefix, or any partner.
#[derive(Debug, Clone, Copy)]
enum Addr {
    In(IpNet),
    Partner,
}

/// The first packet of a connection on one leg.
#[derive(Debug, Clone, Copy)]
struct Packet {
    v4: bool,
    iif: Iface,
    oif: Iface,
    src: Addr,
    dst: Addr,
}

/// What a match (or a rule's matches together) says about a packet, from surest to least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Truth {
    /// Holds.
    Yes,
    /// Holds if the LAN's or WAN's interface has that name.
    Maybe,
    /// Holds for part of the traffic only (a protocol, port or partner address test).
    Part,
    /// Not recognised.
    Unknown,
    /// Does not hold.
    No,
}

impl Truth {
    fn not(self) -> Truth {
        match self {
            Truth::Yes => Truth::No,
            Truth::No => Truth::Yes,
            t => t,
        }
    }
}

/// A rule's matches evaluated for a packet, and what it does.
struct Verdict<'a> {
    truth: Truth,
    action: Action<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action<'a> {
    Accept,
    Drop,
    Return,
    /// `jump`, `goto`, a verdict map, `queue`: somewhere this analysis does not follow.
    Elsewhere,
    /// `masquerade` or `snat`, named.
    Rewrite(&'a str),
    None,
}

struct Walk<'a> {
    gw: &'a Gateway<'a>,
    objects: &'a [&'a Value],
    chain: Chain<'a>,
}

impl Walk<'_> {
    /// Whether the chain sees packets of this family at all.
    fn sees(&self, v4: bool) -> bool {
        match self.chain.family {
            "inet" => true,
            "ip" => v4,
            "ip6" => !v4,
            _ => false,
        }
    }

    fn nat_warnings(&self, rules: &[&Value]) -> Vec<String> {
        let mut out = Vec::new();
        for pool in self.gw.pools {
            let v4 = pool.addr().is_ipv4();
            if !self.sees(v4) {
                continue;
            }
            let p = Packet {
                v4,
                iif: Iface::Tun,
                oif: Iface::Wan,
                src: Addr::In(*pool),
                dst: Addr::Partner,
            };
            for r in rules {
                let v = self.rule(r, &p);
                match v.action {
                    Action::Rewrite(what) if v.truth <= Truth::Part => {
                        let ip = if v4 { "ip" } else { "ip6" };
                        out.push(format!(
                            "nftables rule {} of chain `{}` ({what}) rewrites the source of \
                             translated packets from pool {pool} to the box's own address, so \
                             partners see the box and never the virtual address: exempt the \
                             pool, e.g. `{ip} saddr != {pool} {what}` (see the README, \
                             \"Living with the box's firewall\")",
                            r["handle"], self.chain
                        ));
                        break;
                    }
                    Action::Accept | Action::Return | Action::Drop if v.truth <= Truth::Maybe => {
                        break
                    }
                    Action::Elsewhere if v.truth <= Truth::Part => break,
                    _ => {}
                }
            }
        }
        out
    }

    fn forward_warning(&self, rules: &[&Value], drop_policy: bool) -> Option<String> {
        let mut dropped: Vec<&str> = Vec::new();
        let mut by_rule = None;
        let (tun, lan, pools) = (self.gw.tun, self.gw.lan, self.gw.pools);
        for l in lan {
            let v4 = l.addr().is_ipv4();
            if !self.sees(v4) {
                continue;
            }
            for pool in pools.iter().filter(|p| p.addr().is_ipv4() == v4) {
                let (t, lan_if, wan_if) = (Iface::Tun, Iface::Lan, Iface::Wan);
                let (lan, pool) = (Addr::In(*l), Addr::In(*pool));
                let legs = [
                    ("LAN -> TUN", lan_if, t, lan, Addr::Partner),
                    ("TUN -> WAN", t, wan_if, pool, Addr::Partner),
                    ("WAN -> TUN", wan_if, t, Addr::Partner, pool),
                    ("TUN -> LAN", t, lan_if, Addr::Partner, lan),
                ];
                for (name, iif, oif, src, dst) in legs {
                    let p = Packet { v4, iif, oif, src, dst };
                    match self.walk_forward(rules, &p, drop_policy) {
                        Some(None) if !dropped.contains(&name) => dropped.push(name),
                        Some(Some(h)) if !dropped.contains(&name) => {
                            dropped.push(name);
                            by_rule = Some(h);
                        }
                        _ => {}
                    }
                }
            }
        }
        if dropped.is_empty() {
            return None;
        }
        let legs = dropped.join(", ").replace("TUN", tun);
        let how = match by_rule {
            Some(h) => format!("rule {h}"),
            None => "policy drop".to_string(),
        };
        Some(format!(
            "nftables chain `{}` drops ({how}) the gateway's forwarded legs {legs}: accept \
             `iifname \"{tun}\"` and `oifname \"{tun}\"` there (see the README, \"Living with \
             the box's firewall\")",
            self.chain
        ))
    }

    /// `Some(None)`: the policy drops the packet; `Some(Some(handle))`: that rule drops it;
    /// `None`: it is accepted, or goes somewhere not followed.
    fn walk_forward(&self, rules: &[&Value], p: &Packet, drop_policy: bool) -> Option<Option<u64>> {
        for r in rules {
            let v = self.rule(r, p);
            match v.action {
                Action::Accept if v.truth <= Truth::Maybe => return None,
                Action::Drop if v.truth == Truth::Yes => return Some(r["handle"].as_u64()),
                Action::Return if v.truth == Truth::Yes => break,
                Action::Elsewhere if v.truth <= Truth::Part => return None,
                _ => {}
            }
        }
        drop_policy.then_some(None)
    }

    /// A rule's matches, together, for `p`, and its verdict.
    fn rule<'r>(&self, rule: &'r Value, p: &Packet) -> Verdict<'r> {
        let mut truth = Truth::Yes;
        let mut action = Action::None;
        for e in rule["expr"].as_array().into_iter().flatten() {
            let Some((key, body)) = e.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let a = match key.as_str() {
                "match" => {
                    truth = truth.max(self.matches(body, p));
                    continue;
                }
                "accept" => Action::Accept,
                "drop" | "reject" => Action::Drop,
                "return" => Action::Return,
                "jump" | "goto" | "vmap" | "queue" => Action::Elsewhere,
                "masquerade" => Action::Rewrite("masquerade"),
                "snat" => Action::Rewrite("snat"),
                "xt" => match (body["type"].as_str(), body["name"].as_str()) {
                    (Some("target"), Some("MASQUERADE")) => Action::Rewrite("masquerade"),
                    (Some("target"), Some("SNAT")) => Action::Rewrite("snat"),
                    (Some("target"), _) => Action::Elsewhere,
                    _ => {
                        truth = truth.max(Truth::Unknown);
                        continue;
                    }
                },
                // counter, log, limit, comment, …: no effect on where the packet goes.
                _ => continue,
            };
            if action == Action::None {
                action = a;
            }
        }
        Verdict { truth, action }
    }

    /// One `match` expression for `p`.
    fn matches(&self, m: &Value, p: &Packet) -> Truth {
        let op = m["op"].as_str().unwrap_or("==");
        let negate = op == "!=";
        if !matches!(op, "==" | "!=" | "in") {
            return Truth::Unknown;
        }
        let left = &m["left"];
        let right = self.elements(&m["right"]);
        let t = if let Some(meta) = left.get("meta") {
            match meta["key"].as_str().unwrap_or("") {
                "iifname" | "iif" => iface(p.iif, &right, self.gw),
                "oifname" | "oif" => iface(p.oif, &right, self.gw),
                "nfproto" | "protocol" => {
                    let names: &[&str] =
                        if p.v4 { &["ipv4", "ip", "2048"] } else { &["ipv6", "ip6", "34525"] };
                    if right.iter().any(|v| names.iter().any(|n| value_text(v) == *n)) {
                        Truth::Yes
                    } else {
                        Truth::No
                    }
                }
                "l4proto" => Truth::Part,
                _ => Truth::Unknown,
            }
        } else if let Some(pl) = left.get("payload") {
            match (pl["protocol"].as_str(), pl["field"].as_str()) {
                (Some(proto @ ("ip" | "ip6")), Some(field)) => {
                    if (proto == "ip") != p.v4 {
                        // `ip saddr …` never holds for an IPv6 packet, negated or not.
                        return Truth::No;
                    }
                    match field {
                        "saddr" => address(p.src, &right),
                        "daddr" => address(p.dst, &right),
                        "protocol" | "nexthdr" => Truth::Part,
                        _ => Truth::Unknown,
                    }
                }
                (Some(_), Some(_)) => Truth::Part,
                _ => Truth::Unknown,
            }
        } else if let Some(ct) = left.get("ct") {
            if ct["key"].as_str() != Some("state") {
                return Truth::Unknown;
            }
            if right.iter().any(|v| value_text(v) == "new") {
                Truth::Yes
            } else {
                Truth::No
            }
        } else {
            Truth::Unknown
        };
        if negate {
            t.not()
        } else {
            t
        }
    }

    /// The values a match's right side stands for: a set's elements, a named set's elements
    /// (`@name`, looked up in the same table), or the value itself.
    fn elements<'v>(&'v self, right: &'v Value) -> Vec<&'v Value> {
        let mut out = Vec::new();
        let unwrap = |v: &'v Value| v.get("elem").and_then(|e| e.get("val")).unwrap_or(v);
        match right {
            Value::Array(a) => out.extend(a.iter().map(unwrap)),
            Value::Object(o) if o.contains_key("set") => {
                out.extend(o["set"].as_array().into_iter().flatten().map(unwrap))
            }
            Value::String(s) if s.starts_with('@') => {
                let name = &s[1..];
                for set in self.objects.iter().filter_map(|o| o.get("set")) {
                    if set["name"] == name
                        && set["table"] == self.chain.table
                        && set["family"] == self.chain.family
                    {
                        out.extend(set["elem"].as_array().into_iter().flatten().map(unwrap));
                    }
                }
            }
            v => out.push(v),
        }
        out
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `iifname`/`oifname` `==` one of `names` (`*` at the end is a wildcard).
fn iface(side: Iface, names: &[&Value], gw: &Gateway) -> Truth {
    let fits = |name: &str, pattern: &str| match pattern.strip_suffix('*') {
        Some(stem) => name.starts_with(stem),
        None => name == pattern,
    };
    let patterns: Vec<String> = names.iter().map(|v| value_text(v)).collect();
    let any_fits = |name: &str| patterns.iter().any(|p| fits(name, p));
    let lan = gw.lan_ifaces;
    match side {
        Iface::Tun if any_fits(gw.tun) => Truth::Yes,
        Iface::Tun => Truth::No,
        Iface::Lan if lan.iter().any(|n| any_fits(n)) => Truth::Yes,
        // Every pattern names the TUN, `lo`, or (when they are known) a LAN interface only
        // if it is one of them.
        Iface::Lan | Iface::Wan => {
            let known = |p: &String| {
                p == gw.tun
                    || p == "lo"
                    || (side == Iface::Wan && lan.contains(p))
                    || (side == Iface::Lan && !lan.is_empty())
            };
            if patterns.iter().all(known) {
                Truth::No
            } else {
                Truth::Maybe
            }
        }
    }
}

/// An address test: the packet's address (in a prefix, or any partner) against elements that
/// are addresses, prefixes or ranges.
fn address(a: Addr, elements: &[&Value]) -> Truth {
    let mut spans = Vec::new();
    for e in elements {
        match span(e) {
            Some(s) => spans.push(s),
            None => return Truth::Unknown,
        }
    }
    let net = match a {
        Addr::Partner => return Truth::Part,
        Addr::In(n) => n,
    };
    let (lo, hi) = bounds(&net);
    if spans.iter().any(|&(a, b)| a <= lo && hi <= b) {
        Truth::Yes
    } else if spans.iter().all(|&(a, b)| b < lo || hi < a) {
        Truth::No
    } else {
        Truth::Part
    }
}

/// An element as an inclusive range of addresses (IPv4 ones as their 32-bit value; a family
/// mismatch cannot occur: nft types the set).
fn span(v: &Value) -> Option<(u128, u128)> {
    let ip = |v: &Value| v.as_str()?.parse::<IpAddr>().ok().map(num);
    if let Some(p) = v.get("prefix") {
        let addr: IpAddr = p["addr"].as_str()?.parse().ok()?;
        let net = IpNet::new(addr, u8::try_from(p["len"].as_u64()?).ok()?).ok()?;
        return Some(bounds(&net));
    }
    if let Some(r) = v.get("range").and_then(Value::as_array) {
        return Some((ip(r.first()?)?, ip(r.get(1)?)?));
    }
    let a = ip(v)?;
    Some((a, a))
}

fn num(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn bounds(n: &IpNet) -> (u128, u128) {
    (num(n.network()), num(n.broadcast()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from `nft -j list ruleset` (nftables 1.0.6) after `nft -f` of each ruleset,
    // in a scratch network namespace.

    /// docs/nftables-gateway.nft, the README's ruleset.
    const GOOD: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "filter", "handle": 1}}, {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}, {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 3, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 4, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 5, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 7, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["icmp", "ipv6-icmp"]}}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 8, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 9, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 7443}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 10, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 11, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 12, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "vip0"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 14, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vip0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": {"set": ["wan0", "wan1"]}}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 16, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": {"set": ["wan0", "wan1"]}}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "vip0"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 17, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vip0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "br0"}}, {"accept": null}]}}, {"table": {"family": "ip", "name": "nat", "handle": 2}}, {"chain": {"family": "ip", "table": "nat", "name": "postrouting", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip", "table": "nat", "chain": "postrouting", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": {"set": ["wan0", "wan1"]}}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "198.18.0.0", "len": 24}}}}, {"masquerade": null}]}}]}"#;

    /// `table ip nat { chain postrouting { type nat hook postrouting priority srcnat;
    /// policy accept; oifname "wan0" masquerade } }`: the usual one-line NAT.
    const MASQUERADE_ALL: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "nat", "handle": 3}}, {"chain": {"family": "ip", "table": "nat", "name": "postrouting", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip", "table": "nat", "chain": "postrouting", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "wan0"}}, {"masquerade": null}]}}]}"#;

    /// `table inet filter { chain forward { type filter hook forward priority filter;
    /// policy drop; ct state established,related accept; iifname "br0" oifname { "wan0",
    /// "wan1" } accept } }`: LAN -> WAN allowed, as on a box without vipgate.
    const LAN_TO_WAN_ONLY: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "filter", "handle": 4}}, {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": {"set": ["wan0", "wan1"]}}}, {"accept": null}]}}]}"#;

    /// An IPv6 NAT whose pool returns first through a named set (`ip6 saddr @pool6 return;
    /// snat to 2001:db8:2::1`); an IPv4 NAT of other sources (`ip saddr { 192.0.2.0/24,
    /// 198.51.100.0/24 } masquerade`), of root's own sockets (`meta skuid 0 masquerade`, not
    /// recognised) and towards one network (`ip daddr 203.0.113.0/24 snat to 198.51.100.1`,
    /// which rewrites pool traffic to it); a forward chain of policy accept ending in `drop`
    /// after accepting `iifname "vip0"` and `oifname "vip0"`.
    const MIXED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip6", "name": "nat6", "handle": 1}}, {"set": {"family": "ip6", "name": "pool6", "table": "nat6", "type": "ipv6_addr", "handle": 2, "flags": ["interval"], "elem": [{"prefix": {"addr": "2001:db8:ff::", "len": 64}}]}}, {"chain": {"family": "ip6", "table": "nat6", "name": "post", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip6", "table": "nat6", "chain": "post", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@pool6"}}, {"return": null}]}}, {"rule": {"family": "ip6", "table": "nat6", "chain": "post", "handle": 4, "expr": [{"snat": {"addr": "2001:db8:2::1"}}]}}, {"table": {"family": "ip", "name": "nat", "handle": 2}}, {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"set": [{"prefix": {"addr": "192.0.2.0", "len": 24}}, {"prefix": {"addr": "198.51.100.0", "len": 24}}]}}}, {"masquerade": null}]}}, {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 0}}, {"masquerade": null}]}}, {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "203.0.113.0", "len": 24}}}}, {"snat": {"addr": "198.51.100.1"}}]}}, {"table": {"family": "ip", "name": "filter", "handle": 3}}, {"chain": {"family": "ip", "table": "filter", "name": "fw", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}, {"rule": {"family": "ip", "table": "filter", "chain": "fw", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vip0"}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "fw", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "vip0"}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "fw", "handle": 4, "expr": [{"drop": null}]}}]}"#;

    /// `table inet filter { chain forward { type filter hook forward priority filter;
    /// policy drop; iifname "vip0" tcp dport 443 accept; oifname "vip0" meta l4proto tcp
    /// accept } }`: the TUN legs pass for part of the traffic only.
    const NARROW: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "filter", "handle": 1}}, {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vip0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 443}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "vip0"}}, {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"accept": null}]}}]}"#;

    #[test]
    fn legs_accepted_for_one_protocol_or_port_only_are_dropped_legs() {
        let w = warnings(NARROW, "vip0");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("LAN -> vip0, vip0 -> WAN, WAN -> vip0, vip0 -> LAN"), "{w:?}");
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn warnings(json: &str, tun: &str) -> Vec<String> {
        let lan = nets(&["192.0.2.0/24", "2001:db8:1::/64"]);
        let pools = nets(&["198.18.0.0/24", "2001:db8:ff::/64"]);
        let v: Value = serde_json::from_str(json).unwrap();
        let lan_ifaces = ["br0".to_string()];
        analyse(&v, &Gateway { tun, lan: &lan, pools: &pools, lan_ifaces: &lan_ifaces })
    }

    #[test]
    fn the_readme_ruleset_passes() {
        assert_eq!(warnings(GOOD, "vip0"), Vec::<String>::new());
    }

    #[test]
    fn the_readme_ruleset_without_one_leg_drops_that_leg() {
        let leg = r#"{"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 14, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vip0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": {"set": ["wan0", "wan1"]}}}, {"accept": null}]}}, "#;
        assert!(GOOD.contains(leg));
        let w = warnings(&GOOD.replace(leg, ""), "vip0");
        assert_eq!(w.len(), 1, "{w:?}");
        // `iifname "vip0" oifname "br0" accept` is not for it: br0 is the LAN's.
        assert!(
            w[0].contains("drops (policy drop) the gateway's forwarded legs vip0 -> WAN:"),
            "{w:?}"
        );
    }

    #[test]
    fn the_readme_ruleset_for_another_tun_drops_every_leg() {
        let w = warnings(GOOD, "vg1");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("`inet filter forward` drops (policy drop)")
                && w[0].contains("LAN -> vg1, vg1 -> WAN, WAN -> vg1, vg1 -> LAN"),
            "{w:?}"
        );
    }

    #[test]
    fn masquerade_of_everything_is_reported() {
        let w = warnings(MASQUERADE_ALL, "vip0");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("nftables rule 2 of chain `ip nat postrouting` (masquerade)")
                && w[0].contains("pool 198.18.0.0/24")
                && w[0].contains("`ip saddr != 198.18.0.0/24 masquerade`"),
            "{w:?}"
        );
    }

    #[test]
    fn a_forward_chain_for_lan_to_wan_only_drops_the_tun_legs() {
        let w = warnings(LAN_TO_WAN_ONLY, "vip0");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("chain `inet filter forward` drops (policy drop)")
                && w[0].contains("LAN -> vip0, vip0 -> WAN, WAN -> vip0, vip0 -> LAN")
                && w[0].contains("`iifname \"vip0\"` and `oifname \"vip0\"`"),
            "{w:?}"
        );
    }

    #[test]
    fn exemptions_narrow_matches_and_unrecognised_rules() {
        let w = warnings(MIXED, "vip0");
        // Only the snat towards 203.0.113.0/24 takes pool traffic; the IPv6 pool returns
        // first, the other sources and the unrecognised skuid rule are not the pool's.
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("nftables rule 5 of chain `ip nat post` (snat)"), "{w:?}");
        // Without `oifname "vip0" accept`, the final drop takes the legs into the TUN.
        let without = MIXED.replace(r#""right": "vip0"}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "fw", "handle": 4"#, r#""right": "other"}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "fw", "handle": 4"#);
        let w = warnings(&without, "vip0");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[1].contains("`ip filter fw` drops (rule 4)")
                && w[1].contains("LAN -> vip0, WAN -> vip0"),
            "{w:?}"
        );
    }

    #[test]
    fn matches() {
        let pool: IpNet = "198.18.0.0/24".parse().unwrap();
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let (a, b, c) = (
            v(r#"{"prefix": {"addr": "198.18.0.0", "len": 16}}"#),
            v(r#"{"range": ["198.18.0.128", "198.18.1.0"]}"#),
            v(r#""203.0.113.1""#),
        );
        assert_eq!(address(Addr::In(pool), &[&a]), Truth::Yes);
        assert_eq!(address(Addr::In(pool), &[&b]), Truth::Part);
        assert_eq!(address(Addr::In(pool), &[&c]), Truth::No);
        assert_eq!(address(Addr::Partner, &[&c]), Truth::Part);
        let names = [v(r#""vip*""#), v(r#""lo""#), v(r#""br0""#), v(r#""wan0""#)];
        let names: Vec<&Value> = names.iter().collect();
        let (lan, pools, ifs) = (nets(&["192.0.2.0/24"]), nets(&["198.18.0.0/24"]), ["br0".into()]);
        let gw = Gateway { tun: "vip0", lan: &lan, pools: &pools, lan_ifaces: &ifs };
        assert_eq!(iface(Iface::Tun, &names[..1], &gw), Truth::Yes);
        assert_eq!(iface(Iface::Tun, &names[..1], &Gateway { tun: "tun0", ..gw }), Truth::No);
        assert_eq!(iface(Iface::Wan, &names[1..2], &gw), Truth::No);
        // br0 is the LAN's, so never a WAN interface; wan0 may be one.
        assert_eq!(iface(Iface::Wan, &names[2..3], &gw), Truth::No);
        assert_eq!(iface(Iface::Wan, &names[3..], &gw), Truth::Maybe);
        assert_eq!(iface(Iface::Lan, &names[2..3], &gw), Truth::Yes);
        assert_eq!(iface(Iface::Lan, &names[3..], &gw), Truth::No);
        // Not knowing the LAN's interfaces, any other name may be the LAN's.
        let unknown = Gateway { lan_ifaces: &[], ..gw };
        assert_eq!(iface(Iface::Lan, &names[3..], &unknown), Truth::Maybe);
        assert_eq!(iface(Iface::Wan, &names[2..3], &unknown), Truth::Maybe);
    }

    #[test]
    fn an_empty_ruleset_is_fine() {
        assert!(warnings(r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}]}"#, "v").is_empty());
    }
}
