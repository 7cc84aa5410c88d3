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
//!
//! Usage: `tun_copy [NAME] [--offload]` (as root, normally inside a network namespace).

use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vipgate::config::OffloadMode;
use vipgate::gateway::tun::TunDevice;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let offload = args.iter().any(|a| a == "--offload");
    let name = args.iter().find(|a| !a.starts_with("--")).cloned();
    let name = name.unwrap_or_else(|| "vgcopy0".to_string());
    let mode = if offload { OffloadMode::On } else { OffloadMode::Off };
    let tun = TunDevice::open(&name, mode)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    eprintln!(
        "tun_copy: copying on {} (offloads: {}, pid {})",
        tun.name(),
        tun.describe_offloads(),
        std::process::id()
    );

    let started = Instant::now();
    let mut buf = vec![0u8; 65536 + vipgate::wire::vnet::HDR_LEN];
    let (mut packets, mut bytes, mut write_errors, mut wakeups) = (0u64, 0u64, 0u64, 0u64);
    let mut pfd = libc::pollfd { fd: tun.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err.into());
        }
        if n == 0 {
            continue;
        }
        wakeups += 1;
        // Drain until the queue is empty.
        loop {
            match tun.recv(&mut buf) {
                Ok(len) => {
                    packets += 1;
                    bytes += len as u64;
                    if tun.send(&buf[..len]).is_err() {
                        write_errors += 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    println!(
        "tun_copy: packets {packets} bytes {bytes} write_errors {write_errors} wakeups {wakeups} \
         seconds {:.1}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
