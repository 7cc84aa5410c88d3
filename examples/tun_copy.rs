//! A bare TUN copy loop: the ceiling a userspace TUN forwarder cannot go above.
//!
//! Opens the TUN device NAME (default `vgcopy0`) through the gateway's own `TunDevice`, and
//! writes every packet it reads back into the same device unchanged. It sets up no routing:
//! `scripts/netbench.sh` steers traffic into the TUN exactly as the gateway does. On
//! SIGTERM/SIGINT it prints how many packets and bytes it copied, then exits.
//!
//! With `--offload` it opens the device with the same offloads as `vipgate gateway
//! --offload on` (virtio-net header, TSO, USO) and writes every frame back with its header
//! unchanged, so super-packets stay super-packets: the ceiling for the gateway with offloads.
//! With `--queues N` (N > 1) the device is multi-queue and N threads copy, one per queue: what
//! a multi-queue gateway could reach at most.
//!
//! Usage: `tun_copy [NAME] [--offload] [--queues N]` (as root, normally inside a network
//! namespace).

use std::io::{self, ErrorKind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use vipgate::config::OffloadMode;
use vipgate::gateway::tun::TunDevice;

#[derive(Default)]
struct Counts {
    packets: u64,
    bytes: u64,
    write_errors: u64,
    wakeups: u64,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let offload = args.iter().any(|a| a == "--offload");
    let queues = match args.iter().position(|a| a == "--queues") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=16).contains(n))
            .context("--queues takes a number from 1 to 16")?,
        None => 1,
    };
    let name = args
        .iter()
        .enumerate()
        .find(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--queues"))
        .map(|(_, a)| a.clone())
        .unwrap_or_else(|| "vgcopy0".to_string());
    let mode = if offload { OffloadMode::On } else { OffloadMode::Off };
    let tuns = if queues == 1 {
        vec![TunDevice::open(&name, mode)?]
    } else {
        TunDevice::open_queues(&name, mode, queues)?
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    eprintln!(
        "tun_copy: copying on {} (offloads: {}, queues {queues}, pid {})",
        tuns[0].name(),
        tuns[0].describe_offloads(),
        std::process::id()
    );

    let started = Instant::now();
    let results: Vec<io::Result<Counts>> = std::thread::scope(|s| {
        let workers: Vec<_> = tuns.iter().map(|tun| s.spawn(|| copy(tun, &stop))).collect();
        workers.into_iter().map(|w| w.join().expect("copy thread")).collect()
    });
    let mut all = Counts::default();
    for r in results {
        let c = r?;
        all.packets += c.packets;
        all.bytes += c.bytes;
        all.write_errors += c.write_errors;
        all.wakeups += c.wakeups;
    }
    println!(
        "tun_copy: packets {} bytes {} write_errors {} wakeups {} seconds {:.1}",
        all.packets,
        all.bytes,
        all.write_errors,
        all.wakeups,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Copies one queue until `stop`.
fn copy(tun: &TunDevice, stop: &AtomicBool) -> io::Result<Counts> {
    let mut c = Counts::default();
    let mut buf = vec![0u8; 65536 + vipgate::wire::vnet::HDR_LEN];
    while !stop.load(Ordering::Relaxed) {
        tun.wait_readable(200)?;
        c.wakeups += 1;
        // Drain until the queue is empty.
        loop {
            match tun.recv(&mut buf) {
                Ok(len) => {
                    c.packets += 1;
                    c.bytes += len as u64;
                    if tun.send(&buf[..len]).is_err() {
                        c.write_errors += 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(c)
}
