//! A lease store that cannot write never acknowledges: the gateway's state directory is a
//! small tmpfs the test mounts under its own temporary directory (and unmounts, also when
//! the test fails), filled during a rent storm and freed again.
//!
//! Needs root (network namespaces, TUN devices, `mount`); fails, never skips, without them.
//! Addresses only from the documentation and benchmarking ranges; nothing outside the
//! namespaces the test creates (and removes) is touched.

mod common;

use common::netns::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};
use vipgate::authority::{AuthorityClient, Command, ErrorCode, Outcome};

/// The authority's port.
const PORT: u16 = 7443;
/// The gateway's LAN address.
const GW_LAN4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
/// Long enough for a reply that waits for the store to give up (3 s).
const RENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A tmpfs mounted at a directory; unmounted (lazily, whatever still uses it) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let opts = format!("size={size},mode=0700");
        let out = Process::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "vipgate-test", at.to_str().unwrap()])
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Process::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file until the file system is full (bounded: 256 MiB); returns its size.
fn fill(path: &Path) -> u64 {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 16 * 1024];
    let mut written = 0u64;
    while written < 256 << 20 {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
    written
}

/// The `k`-th partner: 198.51.100.0/24 then 203.0.113.0/24, hosts 10..=250.
fn partner(k: usize) -> IpAddr {
    let (net, host) = (k / 241, 10 + (k % 241) as u8);
    match net % 2 {
        0 => IpAddr::V4(Ipv4Addr::new(198, 51, 100, host)),
        _ => IpAddr::V4(Ipv4Addr::new(203, 0, 113, host)),
    }
}

/// What became of one rent.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Ok(IpAddr),
    Refused(ErrorCode),
}

fn rent(c: &mut AuthorityClient, partner: IpAddr, gw: &Daemon) -> Answer {
    let r = c.call(&Command::Rent { partner, ttl: Some(Duration::from_secs(3600)) });
    let r = r.unwrap_or_else(|e| {
        panic!("rent towards {partner}: no reply ({e:#})\ndaemon log:\n{}", gw.log_text())
    });
    match r.outcome {
        Outcome::Leased { virtual_addr, .. } => Answer::Ok(virtual_addr),
        Outcome::Error { code, .. } => Answer::Refused(code),
        other => panic!("rent towards {partner}: {other:?}"),
    }
}

/// `(real, virtual, partner)` of every lease the gateway holds.
fn leases(gw: &Daemon) -> BTreeSet<(String, String, String)> {
    gw.leases()
        .iter()
        .map(|l| {
            let f = |k: &str| l[k].as_str().unwrap_or_default().to_string();
            (f("real"), f("virtual"), f("partner"))
        })
        .collect()
}

#[test]
fn a_full_disk_refuses_rents_and_loses_no_acknowledged_one() {
    let mut topo = Topo::new(1);
    let cli = topo.clients[0].clone();
    let real = client_addr(0, false);
    // Start once to learn the state directory, then put it on a small tmpfs.
    let mut first = topo.gateway(&[]);
    assert!(first.stop().success());
    let _ = fs::remove_dir_all(&first.state);
    let tmpfs = Tmpfs::mount(&first.state, "8m");
    let mut gw = first.restart(&mut topo.lab);
    let ca = gw.state.join("tls").join("cert.pem");
    let mut c = in_ns(&cli, || AuthorityClient::connect((GW_LAN4, PORT).into(), &ca, RENT_TIMEOUT))
        .expect("connect to the authority");

    // Each (partner, answer) in order; the last answer per partner is what counts.
    let mut answers: Vec<(IpAddr, Answer)> = Vec::new();
    let mut k = 0;
    let mut next = |c: &mut AuthorityClient, gw: &Daemon, answers: &mut Vec<(IpAddr, Answer)>| {
        let p = partner(k);
        k += 1;
        let a = rent(c, p, gw);
        answers.push((p, a.clone()));
        a
    };

    // 1. The storm with room: every rent ok.
    for _ in 0..50 {
        assert!(matches!(next(&mut c, &gw, &mut answers), Answer::Ok(_)), "{answers:?}");
    }
    // 2. The disk fills: rents go on until some are refused (bounded: 400 rents, 60 s).
    let filler = tmpfs.0.join("filler");
    let filled = fill(&filler);
    // A packet of a new pair while the store cannot write: held for its lease, then dropped
    // (counted), never sent: the lease was never stored.
    let srv_sock = udp(&topo.srv, sa(SRV4.into(), 7000));
    let cli_sock = udp(&cli, sa(real, 0));
    cli_sock.send_to(b"unstored", sa(SRV4.into(), 7000)).unwrap();
    let started = Instant::now();
    let (mut ok_full, mut refused_full) = (0, 0);
    while refused_full < 20
        && ok_full + refused_full < 400
        && started.elapsed() < Duration::from_secs(60)
    {
        match next(&mut c, &gw, &mut answers) {
            Answer::Ok(_) => ok_full += 1,
            Answer::Refused(code) => {
                assert_eq!(code, ErrorCode::Internal, "{answers:?}");
                refused_full += 1;
            }
        }
    }
    assert!(refused_full > 0, "no rent was refused with a full disk ({ok_full} ok)");
    let stats = gw.stats();
    eprintln!(
        "full disk ({filled} bytes of filler): {ok_full} rent(s) ok, {refused_full} refused \
         in {:.1} s; store_failures={} store_refused={} held_unstored={}",
        started.elapsed().as_secs_f64(),
        stats["store_failures"],
        stats["store_refused"],
        stats["held_unstored"]
    );
    assert!(stats["store_refused"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert!(stats["held_unstored"].as_u64().unwrap_or(0) >= 1, "no held packet dropped: {stats}");
    srv_sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 64];
    assert!(srv_sock.recv_from(&mut buf).is_err(), "a packet of an unstored lease got out");
    // 3. Space comes back: rents succeed again, without a restart (bounded: 30 s).
    fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    loop {
        if let Answer::Ok(_) = next(&mut c, &gw, &mut answers) {
            break;
        }
        assert!(freed.elapsed() < Duration::from_secs(30), "no recovery: {answers:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let recovery = freed.elapsed();
    for _ in 0..20 {
        assert!(matches!(next(&mut c, &gw, &mut answers), Answer::Ok(_)), "{answers:?}");
    }
    eprintln!("rents ok again {:.2} s after the space was freed", recovery.as_secs_f64());
    drop(c);

    // 4. kill -9, restart: every acknowledged rent is there, no refused one is.
    gw.crash();
    let gw2 = gw.restart(&mut topo.lab);
    let have = leases(&gw2);
    let mut last: BTreeMap<IpAddr, Answer> = BTreeMap::new();
    for (p, a) in &answers {
        last.insert(*p, a.clone());
    }
    let (mut acked, mut unacked) = (0, 0);
    for (p, a) in &last {
        let of_pair: Vec<_> =
            have.iter().filter(|(r, _, q)| *r == real.to_string() && *q == p.to_string()).collect();
        match a {
            Answer::Ok(v) => {
                acked += 1;
                assert!(
                    have.contains(&(real.to_string(), v.to_string(), p.to_string())),
                    "acknowledged lease {real} -> {v} for {p} lost after kill -9; have {have:?}"
                );
            }
            Answer::Refused(_) => {
                unacked += 1;
                assert!(of_pair.is_empty(), "a refused rent for {p} is a lease: {of_pair:?}");
            }
        }
    }
    eprintln!("after kill -9: {acked} acknowledged lease(s) all back, {unacked} refused absent");
    drop(gw2);
    drop(tmpfs);
}
