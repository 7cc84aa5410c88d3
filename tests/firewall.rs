//! The gateway and the box's nftables firewall, and `vipgate gateway --check`: the README's
//! ruleset (`docs/nftables-gateway.nft`) carries the whole story; a masquerade of everything
//! and a forward chain without the TUN legs are warned about, and do what the warnings say;
//! `--check` refuses what cannot start and changes nothing.
//!
//! Needs root (network namespaces, TUN devices), `ip`, `ping` and `nft` (package nftables);
//! fails, never skips, without them. Rulesets are loaded only inside the test's own gateway
//! namespace (`ip netns exec NS nft -f FILE`). See `tests/common/netns.rs` for the topology.

mod common;

use common::netns::*;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

/// The README's ruleset for a gateway box.
fn readme_ruleset() -> String {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/nftables-gateway.nft");
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// The one-line NAT of a box without vipgate: everything leaving on the WAN is masqueraded.
const MASQUERADE_ALL: &str = "flush ruleset
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname { \"wan0\", \"wan1\" } masquerade
    }
}
";

/// The forward policy of a box without vipgate: LAN -> WAN and what comes back.
const LAN_TO_WAN_ONLY: &str = "flush ruleset
table inet filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname \"br0\" oifname { \"wan0\", \"wan1\" } accept
    }
}
";

/// Loads `ruleset` into the namespace `ns` (only there).
fn nft_load(topo: &Topo, ns: &str, name: &str, ruleset: &str) {
    let file = topo.lab.dir().join(format!("{name}.nft"));
    std::fs::write(&file, ruleset).unwrap();
    let o = exec_in(ns, "nft", &["-f", file.to_str().unwrap()], Duration::from_secs(10));
    assert!(
        o.status.success(),
        "nft -f {name} in {ns} failed (is nftables installed?): {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `vipgate gateway --check` in `ns` with the standard LAN and pools plus `extra`, on a
/// state directory and control socket that must not come into being.
fn check(topo: &Topo, ns: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let state: PathBuf = topo.lab.dir().join("check-state");
    let socket = topo.lab.dir().join("check.sock");
    let mut args = vec!["gateway", "--check", "--lan", LAN4, "--lan", LAN6];
    args.extend(["--pool", POOL4, "--pool", POOL6]);
    args.extend(["--state-dir", state.to_str().unwrap()]);
    args.extend(["--control-socket", socket.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let o: Output = exec_in(ns, BIN, &args, Duration::from_secs(20));
    assert!(!state.exists(), "--check created the state directory {}", state.display());
    assert!(!socket.exists(), "--check created the control socket {}", socket.display());
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (o.status.code(), text(&o.stdout), text(&o.stderr))
}

/// `--check` passed; returns its warning lines.
fn check_passes(topo: &Topo, ns: &str) -> Vec<String> {
    let (status, out, err) = check(topo, ns, &[]);
    assert_eq!(status, Some(0), "--check failed:\n{out}{err}");
    assert!(out.contains("nothing was changed"), "{out}");
    out.lines().filter_map(|l| l.strip_prefix("warning: ")).map(str::to_string).collect()
}

/// `--check` refused with status 78 and one sentence containing `needle`.
fn check_refuses(topo: &Topo, ns: &str, extra: &[&str], needle: &str) {
    let (status, out, err) = check(topo, ns, extra);
    assert_eq!(status, Some(78), "--check should refuse ({needle}):\n{out}{err}");
    assert_eq!(err.lines().count(), 1, "one sentence: {err:?}");
    assert!(err.starts_with("vipgate: ") && err.contains(needle), "{needle:?} not in {err:?}");
}

fn server(v6: bool) -> IpAddr {
    if v6 {
        SRV6.into()
    } else {
        SRV4.into()
    }
}

fn ping(ns: &str, dst: IpAddr) -> Output {
    let fam = if dst.is_ipv6() { "-6" } else { "-4" };
    let args = [fam, "-n", "-c", "2", "-i", "0.2", "-W", "2", &dst.to_string()];
    exec_in(ns, "ping", &args, Duration::from_secs(10))
}

/// What the kernel holds in `ns` that the gateway could touch: rules, routes of every table,
/// links, the ruleset.
fn kernel_state(ns: &str) -> String {
    let mut s = String::new();
    for fam in ["-4", "-6"] {
        s += &ip(ns, &[fam, "rule", "show"]);
        s += &ip(ns, &[fam, "route", "show", "table", "all"]);
    }
    s += &ip(ns, &["link", "show"]);
    let o = exec_in(ns, "nft", &["list", "ruleset"], Duration::from_secs(10));
    s + &String::from_utf8_lossy(&o.stdout)
}

// ---------------------------------------------------------------------------------------------
// The README's ruleset: forward policy drop, masquerade of the box's other traffic, the pool
// exempt, and the whole story through it
// ---------------------------------------------------------------------------------------------

#[test]
fn the_readme_ruleset_carries_the_whole_story() {
    let mut topo = Topo::new(1);
    let gw_ns = topo.gw.clone();
    nft_load(&topo, &gw_ns, "readme", &readme_ruleset());
    let warnings = check_passes(&topo, &gw_ns);
    assert!(warnings.is_empty(), "the README's ruleset is warned about: {warnings:#?}");

    let gw = topo.gateway(&[]);
    let cli = topo.clients[0].clone();
    for v6 in [false, true] {
        let (me, srv) = (client_addr(0, v6), server(v6));
        // Out: UDP, TCP and ping under a virtual address.
        let c = udp(&cli, sa(me, 4000));
        let s = udp(&topo.srv, sa(srv, 7000));
        let v = udp_roundtrip(&c, &s).ip();
        assert!(in_pool(v), "UDP: the server saw {v}, not a virtual address");
        let l = listen(&topo.srv, sa(srv, 7001));
        let peer = tcp_roundtrip(&cli, &l, sa(srv, 7001));
        assert_eq!(peer.ip(), v, "TCP: the server saw another address");
        let o = ping(&cli, srv);
        assert!(o.status.success(), "ping {srv}: {}", String::from_utf8_lossy(&o.stdout));
        // Back: the server opens a new TCP connection and a new UDP flow to the virtual
        // address, and reaches the client (WAN -> TUN, then TUN -> LAN).
        let l = listen(&cli, sa(me, 5000));
        let peer = tcp_roundtrip(&topo.srv, &l, sa(v, 5000));
        assert_eq!(peer.ip(), srv, "the client should see the server's real address");
        let s2 = udp(&topo.srv, sa(srv, 0));
        s2.send_to(b"knock", sa(v, 4000)).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = recv_from(&c, &mut buf)
            .unwrap_or_else(|e| panic!("the server's new UDP flow to {v} never arrived ({e})"));
        assert_eq!((&buf[..n], from.ip()), (&b"knock"[..], srv));
    }
    let log = gw.log_text();
    assert!(!log.contains("nftables"), "the gateway warned about the README's ruleset:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// The warnings are real
// ---------------------------------------------------------------------------------------------

#[test]
fn a_masquerade_of_everything_is_warned_about_and_shows_the_partner_the_box() {
    let mut topo = Topo::new(1);
    let gw_ns = topo.gw.clone();
    nft_load(&topo, &gw_ns, "masquerade", MASQUERADE_ALL);
    let warnings = check_passes(&topo, &gw_ns);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    let w = &warnings[0];
    assert!(
        w.contains("chain `ip nat postrouting` (masquerade)")
            && w.contains(&format!("from pool {POOL4} to the box's own address"))
            && w.contains(&format!("`ip saddr != {POOL4} masquerade`")),
        "{w}"
    );
    let gw = topo.gateway(&[]);
    assert!(gw.log_text().contains(w.as_str()), "the start did not warn:\n{}", gw.log_text());
    // And the partner indeed sees the box's WAN address, not a virtual one.
    let cli = topo.clients[0].clone();
    let c = udp(&cli, sa(client_addr(0, false), 0));
    let s = udp(&topo.srv, sa(SRV4.into(), 7000));
    let seen = udp_roundtrip(&c, &s).ip();
    assert_eq!(seen, IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), "the server saw {seen}");
}

#[test]
fn a_forward_chain_without_the_tun_legs_is_warned_about_and_drops_them() {
    let mut topo = Topo::new(1);
    let gw_ns = topo.gw.clone();
    nft_load(&topo, &gw_ns, "lan-to-wan", LAN_TO_WAN_ONLY);
    let warnings = check_passes(&topo, &gw_ns);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    let w = &warnings[0];
    assert!(
        w.contains("chain `inet filter forward` drops (policy drop)")
            && w.contains("LAN -> vip0, vip0 -> WAN, WAN -> vip0, vip0 -> LAN")
            && w.contains("accept `iifname \"vip0\"` and `oifname \"vip0\"`"),
        "{w}"
    );
    let gw = topo.gateway(&[]);
    assert!(gw.log_text().contains(w.as_str()), "the start did not warn:\n{}", gw.log_text());
    // And the client's packets indeed never reach the server.
    let cli = topo.clients[0].clone();
    let c = udp(&cli, sa(client_addr(0, false), 0));
    let s = udp(&topo.srv, sa(SRV4.into(), 7000));
    s.set_read_timeout(Some(QUIET)).unwrap();
    c.send_to(b"hello", sa(SRV4.into(), 7000)).unwrap();
    let mut buf = [0u8; 16];
    let got = s.recv_from(&mut buf);
    assert!(got.is_err(), "a packet got through the forward chain: {got:?}");
}

// ---------------------------------------------------------------------------------------------
// --check refuses what cannot start, and changes nothing
// ---------------------------------------------------------------------------------------------

#[test]
fn check_changes_nothing_and_refuses_a_taken_band() {
    let mut topo = Topo::new(1);
    let gw_ns = topo.gw.clone();
    nft_load(&topo, &gw_ns, "readme", &readme_ruleset());

    // Nothing changes, whether it passes or refuses.
    let before = kernel_state(&gw_ns);
    let warnings = check_passes(&topo, &gw_ns);
    assert!(warnings.is_empty(), "{warnings:#?}");
    check_refuses(&topo, &gw_ns, &["--pool", "198.18.7.1/24"], "--pool 198.18.7.1/24 has host");
    assert_eq!(kernel_state(&gw_ns), before, "--check changed the kernel's state");

    // A box without forwarding is refused.
    let plain = topo.lab.netns("plain");
    sysctl(&plain, &["net.ipv4.ip_forward=0"]);
    check_refuses(&topo, &plain, &[], "IP forwarding is off for IPv4");

    // A running gateway's table and band: refused, and the gateway's routing stays.
    let mut gw = topo.gateway(&[]);
    let running = kernel_state(&gw_ns);
    check_refuses(&topo, &gw_ns, &[], "the TUN device vip0 exists already");
    assert_eq!(kernel_state(&gw_ns), running, "--check changed a running gateway's state");
    // Another TUN, the same table; then another table too, the same band: still refused.
    check_refuses(&topo, &gw_ns, &["--tun", "vg1"], "routing table 7443 is in use");
    check_refuses(
        &topo,
        &gw_ns,
        &["--tun", "vg1", "--route-table", "7500"],
        "rule priority 7444 (in the band 7443..7448 of --rule-priority) holds a rule that is \
         not this gateway's (`to 198.18.0.0/24 lookup 7443`)",
    );
    assert_eq!(kernel_state(&gw_ns), running, "--check changed a running gateway's state");
    let cli = topo.clients[0].clone();
    let c = udp(&cli, sa(client_addr(0, false), 0));
    let s = udp(&topo.srv, sa(SRV4.into(), 7000));
    assert!(in_pool(udp_roundtrip(&c, &s).ip()), "the gateway stopped translating");

    // After a crash the guard rules stay; they are the start's to replace, so --check passes.
    gw.crash();
    let (status, out, err) = check(&topo, &gw_ns, &[]);
    assert_eq!(status, Some(0), "after a crash:\n{out}{err}");
    assert!(out.contains("a stopped or crashed gateway left, which the start replaces"), "{out}");

    // A rule in the band that vipgate did not install would be deleted by a start: refused.
    ip(&gw_ns, &["rule", "add", "priority", "7600", "from", "203.0.113.0/24", "lookup", "100"]);
    check_refuses(
        &topo,
        &gw_ns,
        &["--rule-priority", "7597", "--route-table", "7501", "--tun", "vg1"],
        "rule priority 7600 (in the band 7597..7602 of --rule-priority) holds a rule that is \
         not this gateway's (`from 203.0.113.0/24 lookup 100`)",
    );
}
