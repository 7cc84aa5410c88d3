//! The gateway's life cycle in network namespaces: a second gateway on the same rule band
//! is refused and changes nothing, two gateways on their own bands run side by side, a
//! stopped gateway fails closed until `vipgate cleanup`.
//!
//! Needs root (network namespaces, TUN devices), `ip`, `ping` and `tcpdump`; fails, never
//! skips, without them.

mod common;

use common::netns::*;
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

/// Every policy rule of the namespace, both families (what `vipgate cleanup` must restore).
fn all_rules(ns: &str) -> String {
    ip(ns, &["-4", "rule", "show"]) + &ip(ns, &["-6", "rule", "show"])
}

/// The rules at priorities `first..first+6`, both families.
fn band(ns: &str, first: u32) -> Vec<String> {
    all_rules(ns)
        .lines()
        .filter(|l| {
            l.split(':')
                .next()
                .and_then(|p| p.trim().parse::<u32>().ok())
                .is_some_and(|p| (first..first + 6).contains(&p))
        })
        .map(str::to_string)
        .collect()
}

/// `vipgate ARGS` run in `ns`.
fn vipgate(ns: &str, args: &[&str]) -> std::process::Output {
    run_within(
        Command::new("ip").args(["netns", "exec", ns, BIN]).args(args),
        Duration::from_secs(20),
    )
}

fn ping_stream(ns: String, dst: IpAddr, count: u32) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let out = exec_in(
            &ns,
            "ping",
            &["-n", "-q", "-i", "0.05", "-W", "1", "-c", &count.to_string(), &dst.to_string()],
            Duration::from_secs(30),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

// ---------------------------------------------------------------------------------------------
// 2. The rule band belongs to one gateway
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_gateway_on_the_same_band_is_refused_and_the_first_loses_nothing() {
    let mut t = Topo::new(1);
    let first = t.gateway(&[]);
    let rules = band(&t.gw, 7443);
    assert_eq!(rules.len(), 14, "{rules:#?}");
    let stream = ping_stream(t.clients[0].clone(), SRV4.into(), 100);
    std::thread::sleep(Duration::from_millis(500));

    let gw = t.gw.clone();
    let args = ["--lan", LAN4, "--pool", POOL4, "--no-authority"];
    let log = Daemon::refused(&mut t.lab, &gw, &args);
    assert!(
        log.contains("belongs to another gateway")
            && log.contains(&format!("pid {}", first.pid()))
            && log.contains("--route-table"),
        "{log}"
    );
    assert!(!log.contains("removed"), "the refused gateway removed something:\n{log}");
    assert_eq!(band(&t.gw, 7443), rules, "the refused gateway changed the band");
    let log = Daemon::refused(&mut t.lab, &gw, &[&args[..], &["--tun", "vip1"]].concat());
    assert!(log.contains("belongs to another gateway"), "{log}");
    // Only the table is shared: refused as well.
    let log = Daemon::refused(
        &mut t.lab,
        &gw,
        &[&args[..], &["--tun", "vip1", "--rule-priority", "8000"]].concat(),
    );
    assert!(log.contains("table 7443"), "{log}");
    assert_eq!(band(&t.gw, 7443), rules, "the refused gateways changed the band");
    assert!(band(&t.gw, 8000).is_empty(), "{:#?}", band(&t.gw, 8000));

    let said = stream.join().unwrap();
    assert!(
        said.contains("100 packets transmitted, 100 received"),
        "the first gateway's LAN lost packets while others were refused:\n{said}"
    );
    // `vipgate cleanup` is refused too while the gateway runs.
    let out = vipgate(&t.gw, &["cleanup"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to another gateway"), "{err}");
    assert_eq!(band(&t.gw, 7443), rules);
}

#[test]
fn two_gateways_on_their_own_tables_and_bands_run_side_by_side() {
    let mut t = Topo::new(1);
    let v4 = t.gateway_with(&["--lan", LAN4, "--pool", POOL4, "--on-stop", "open"]);
    let gw = t.gw.clone();
    let mut v6 = Daemon::start(
        &mut t.lab,
        &gw,
        &[
            "--lan",
            LAN6,
            "--pool",
            POOL6,
            "--tun",
            "vip6",
            "--route-table",
            "7500",
            "--rule-priority",
            "7500",
            "--no-authority",
            "--on-stop",
            "open",
        ],
    );
    let client = t.clients[0].clone();
    for v6_side in [false, true] {
        let srv = if v6_side { IpAddr::from(SRV6) } else { IpAddr::from(SRV4) };
        let l = listen(&t.srv, sa(srv, 5000));
        let seen = tcp_roundtrip(&client, &l, sa(srv, 5000));
        assert!(in_pool(seen.ip()), "{seen} is not a virtual address");
    }
    // The second one stops; the first one's routing is untouched and still works.
    assert!(v6.stop().success());
    assert!(band(&t.gw, 7500).is_empty(), "{:#?}", band(&t.gw, 7500));
    assert_eq!(band(&t.gw, 7443).len(), 7, "{:#?}", band(&t.gw, 7443));
    let l = listen(&t.srv, sa(SRV4.into(), 5001));
    let seen = tcp_roundtrip(&client, &l, sa(SRV4.into(), 5001));
    assert!(in_pool(seen.ip()), "{seen}");
    drop(v4);
}

// ---------------------------------------------------------------------------------------------
// 4. A stopped gateway fails closed
// ---------------------------------------------------------------------------------------------

/// Sends UDP, a ping and a TCP attempt from the client to the server while `wan0` is
/// captured for LAN sources; returns the capture's size beyond its file header.
fn lan_sources_on_the_wan(t: &Topo, file: &str) -> usize {
    let path = t.lab.dir().join(file);
    let cap = Capture::start(
        &t.gw,
        "wan0",
        &path,
        &["src", "net", "192.0.2.0/24", "or", "src", "net", "2001:db8:1::/64"],
    );
    let c = &t.clients[0];
    for srv in [IpAddr::from(SRV4), IpAddr::from(SRV6)] {
        let s = udp(c, sa(client_addr(0, srv.is_ipv6()), 0));
        let _ = s.send_to(b"leak?", sa(srv, 5353));
        let _ = connect(c, sa(srv, 5000), Duration::from_millis(300));
        let fam = if srv.is_ipv6() { "-6" } else { "-4" };
        exec_in(
            c,
            "ping",
            &[fam, "-n", "-c", "2", "-i", "0.2", "-W", "1", &srv.to_string()],
            Duration::from_secs(10),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    cap.finish().len().saturating_sub(EMPTY_PCAP)
}

#[test]
fn a_stopped_gateway_keeps_the_lan_closed_until_cleanup() {
    let mut t = Topo::new(1);
    let before = all_rules(&t.gw);
    let mut gw = t.gateway(&[]);
    let l = listen(&t.srv, sa(SRV4.into(), 5000));
    assert!(in_pool(tcp_roundtrip(&t.clients[0], &l, sa(SRV4.into(), 5000)).ip()));
    drop(l);
    assert!(gw.stop().success(), "{}", gw.log_text());
    assert!(gw.log_text().contains("the guard stays"), "{}", gw.log_text());
    gw.assert_gone();
    let guard = band(&t.gw, 7443);
    assert!(guard.iter().any(|r| r.contains("prohibit")), "{guard:#?}");
    assert!(guard.iter().any(|r| r.contains("unreachable")), "{guard:#?}");

    let leaked = lan_sources_on_the_wan(&t, "closed.pcap");
    assert_eq!(leaked, 0, "packets with a LAN source left on the WAN after a clean stop");

    let out = vipgate(&t.gw, &["cleanup"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"), "{out:?}");
    assert_eq!(all_rules(&t.gw), before, "cleanup did not restore the rules");

    // The control: with --on-stop open the LAN goes out untranslated, and the capture sees it.
    let mut gw = t.gateway(&["--on-stop", "open"]);
    assert!(gw.stop().success(), "{}", gw.log_text());
    assert_eq!(all_rules(&t.gw), before, "--on-stop open left rules");
    let leaked = lan_sources_on_the_wan(&t, "open.pcap");
    assert!(leaked > 0, "the capture saw no LAN source even with --on-stop open");
}

#[test]
fn a_restart_after_a_closed_stop_has_no_leak_window() {
    let mut t = Topo::new(1);
    let gw = t.gateway(&[]);
    let mut gw = {
        let mut g = gw;
        assert!(g.stop().success());
        g.restart(&mut t.lab)
    };
    // Restarting on a closed box, and stopping again, never shows a LAN source outside.
    let path = t.lab.dir().join("restart.pcap");
    let cap = Capture::start(&t.gw, "wan0", &path, &["src", "net", "192.0.2.0/24"]);
    let stream = ping_stream(t.clients[0].clone(), SRV4.into(), 60);
    std::thread::sleep(Duration::from_millis(300));
    assert!(gw.stop().success());
    let gw = gw.restart(&mut t.lab);
    let said = stream.join().unwrap();
    let leaked = cap.finish().len().saturating_sub(EMPTY_PCAP);
    assert_eq!(leaked, 0, "a LAN source left on the WAN around a restart; ping said:\n{said}");
    drop(gw);
}

// ---------------------------------------------------------------------------------------------
// 3. Signals: SIGHUP reloads, never kills
// ---------------------------------------------------------------------------------------------

/// Waits (at most 5 s) until the daemon's log has `needle` at least `n` times.
fn wait_log(d: &Daemon, needle: &str, n: usize) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = d.log_text();
        if log.matches(needle).count() >= n {
            return log;
        }
        assert!(std::time::Instant::now() < deadline, "no {needle:?} (x{n}) in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /metrics` from namespace `ns`; the status line, or the connection error.
fn metrics_status(ns: &str, addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    in_ns(ns, move || match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = write!(s, "GET /metrics HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.lines().next().unwrap_or("").to_string()
        }
        Err(e) => format!("error: {e}"),
    })
}

#[test]
fn sighup_reloads_what_can_change_keeps_the_rest_and_never_kills() {
    let mut t = Topo::new(2);
    let file = t.lab.dir().join("gateway.toml");
    let base = format!("lan = [\"{LAN4}\"]\npool = [\"{POOL4}\"]\n");
    std::fs::write(&file, &base).unwrap();
    let path = file.to_str().unwrap().to_string();
    let gw = t.gateway_with(&["--config", &path]);
    let stream = ping_stream(t.clients[0].clone(), SRV4.into(), 100);
    std::thread::sleep(Duration::from_millis(300));
    let metrics: std::net::SocketAddr = "198.51.100.1:9477".parse().unwrap();
    assert!(metrics_status(&t.srv, metrics).starts_with("error"), "metrics on before the reload");

    // Quieter log, new timers and metrics address, and a key that takes a restart.
    std::fs::write(
        &file,
        format!(
            "{base}log-level = \"warn\"\nudp-timeout = 600\nmetrics-listen = \"{metrics}\"\n\
             inquiry-rate = 3\nmapping = \"per-host\"\n"
        ),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    let log = wait_log(&gw, "SIGHUP: configuration read again", 1);
    for said in [
        "log-level INFO -> WARN",
        "udp-timeout 300s -> 600s",
        "metrics-listen off -> 198.51.100.1:9477",
        "inquiry-rate 20 -> 3",
        "needs a restart (kept as running): mapping",
    ] {
        assert!(log.contains(said), "the reload line lacks {said:?}:\n{log}");
    }
    assert!(metrics_status(&t.srv, metrics).contains("200 OK"), "the new metrics address");
    // In force: a new lease (client 1) is no longer logged at info; per-partner mapping kept.
    let l = listen(&t.srv, sa(SRV4.into(), 5000));
    tcp_roundtrip(&t.clients[1], &l, sa(SRV4.into(), 5000));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.log_text().matches("lease created").count(), 1, "{}", gw.log_text());
    let c1 = client_addr(1, false);
    let v = gw.virtual_of(c1, SRV4.into());
    assert!(in_pool(v));

    // A file that no longer parses: refused with its line, the running configuration stays.
    std::fs::write(&file, format!("{base}log-level = \"info\"\nudp-timeout = \"soon\"\n")).unwrap();
    gw.signal(libc::SIGHUP);
    let log = wait_log(&gw, "configuration refused", 1);
    assert!(log.contains("line 4"), "the refusal names no line:\n{log}");
    assert!(metrics_status(&t.srv, metrics).contains("200 OK"), "metrics moved by a bad file");
    // Back to info: new leases (client 1 to the third party) are logged again.
    std::fs::write(&file, format!("{base}metrics-listen = \"{metrics}\"\n")).unwrap();
    gw.signal(libc::SIGHUP);
    wait_log(&gw, "SIGHUP: configuration read again", 2);
    let l = listen(&t.tp, sa(TP4.into(), 5001));
    tcp_roundtrip(&t.clients[1], &l, sa(TP4.into(), 5001));
    wait_log(&gw, "lease created", 2);

    let said = stream.join().unwrap();
    assert!(
        said.contains("100 packets transmitted, 100 received"),
        "the LAN lost packets across the reloads:\n{said}"
    );
    let mut gw = gw;
    assert!(gw.wait_exit(Duration::from_millis(200)).is_none(), "a SIGHUP ended the gateway");
    assert!(gw.stop().success());
}
