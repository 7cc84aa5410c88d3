//! The extra queues of a multi-queue TUN (`--queues N`): one thread per queue, each reading,
//! translating and writing its own frames.
//!
//! The kernel spreads flows over the queues by hash, so one flow stays on one queue. The
//! translator is shared: a queue thread takes its lock only around `translate_with` (the
//! syscalls and the kernel's forwarding work inside each write run unlocked, which is where
//! the time goes). Everything else stays with the main loop: expiry, the lease store, the
//! authority, the control socket. A frame whose lease is not durable yet waits in the
//! thread's own queue and is tried again every few milliseconds; the thread wakes the main
//! loop so the lease gets stored at once.

use super::tun::TunDevice;
use super::{dispatch, turn_offloads_off, Io, SharedNat, BATCH, FRAME_MAX};
use crate::control::Stats;
use log::warn;
use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

/// Frames a queue keeps while their leases become durable; more are dropped and counted.
const MAX_HELD: usize = 1024;
/// How long a queue sleeps when idle (it checks for the stop flag this often).
const IDLE_MS: i32 = 200;
/// How soon held frames are tried again.
const HELD_RETRY_MS: i32 = 5;

/// The queue threads.
pub struct Queues {
    stop: Arc<AtomicBool>,
    threads: Vec<(JoinHandle<()>, Arc<Mutex<Stats>>)>,
}

impl Queues {
    /// Starts one thread per device.
    pub fn start(
        devices: Vec<TunDevice>,
        nat: &SharedNat,
        waker: &Arc<mio::Waker>,
    ) -> io::Result<Queues> {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = devices
            .into_iter()
            .enumerate()
            .map(|(i, tun)| {
                let stats = Arc::new(Mutex::new(Stats::default()));
                let q = Queue {
                    tun,
                    nat: Arc::clone(nat),
                    waker: Arc::clone(waker),
                    stop: Arc::clone(&stop),
                    published: Arc::clone(&stats),
                };
                let handle = std::thread::Builder::new()
                    .name(format!("vipgate-q{}", i + 1))
                    .spawn(move || q.run())?;
                Ok((handle, stats))
            })
            .collect::<io::Result<_>>()?;
        Ok(Queues { stop, threads })
    }

    /// Adds the queues' TUN counters to `into`.
    pub fn add_counters(&self, into: &mut Stats) {
        for (_, s) in &self.threads {
            let s = s.lock().unwrap_or_else(PoisonError::into_inner);
            add_tun_counters(into, &s);
            into.tun_rx_per_queue.push(s.tun_rx);
        }
    }

    /// Stops the threads and waits for them (each notices within [`IDLE_MS`]).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for (t, _) in self.threads {
            let _ = t.join();
        }
    }
}

/// Adds the TUN counters of `from` to `into`.
pub(super) fn add_tun_counters(into: &mut Stats, from: &Stats) {
    into.tun_rx += from.tun_rx;
    into.tun_rx_bytes += from.tun_rx_bytes;
    into.tun_tx += from.tun_tx;
    into.tun_write_errors += from.tun_write_errors;
    into.tun_super_packets += from.tun_super_packets;
    into.tun_super_packet_bytes += from.tun_super_packet_bytes;
    into.tun_offload_errors += from.tun_offload_errors;
    into.tun_segmented_in_software += from.tun_segmented_in_software;
    into.held_dropped += from.held_dropped;
}

struct Queue {
    tun: TunDevice,
    nat: SharedNat,
    waker: Arc<mio::Waker>,
    stop: Arc<AtomicBool>,
    published: Arc<Mutex<Stats>>,
}

impl Queue {
    fn run(mut self) {
        let mut buf = vec![0u8; FRAME_MAX];
        let mut scratch = vec![0u8; FRAME_MAX];
        let mut held: VecDeque<Vec<u8>> = VecDeque::new();
        let mut stats = Stats::default();
        while !self.stop.load(Ordering::Relaxed) {
            let wait = if held.is_empty() { IDLE_MS } else { HELD_RETRY_MS };
            if let Err(e) = self.tun.wait_readable(wait) {
                warn!("TUN {} queue: poll failed: {e}", self.tun.name());
                return;
            }
            let now = Instant::now();
            let mut refused = false;
            for _ in 0..held.len() {
                let Some(mut frame) = held.pop_front() else { break };
                let io = Io { tun: &self.tun, stats: &mut stats, scratch: &mut scratch };
                let mut again = false;
                refused |= dispatch(&self.nat, io, &mut frame, now, |_| {
                    again = true;
                    true
                });
                if again {
                    held.push_back(frame);
                }
            }
            for _ in 0..4 * BATCH {
                let n = match self.tun.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!("TUN {} queue: read failed: {e}", self.tun.name());
                        break;
                    }
                };
                stats.tun_rx += 1;
                stats.tun_rx_bytes += n.saturating_sub(self.tun.header_len()) as u64;
                let io = Io { tun: &self.tun, stats: &mut stats, scratch: &mut scratch };
                let waker = &self.waker;
                refused |= dispatch(&self.nat, io, &mut buf[..n], now, |f| {
                    if held.len() >= MAX_HELD {
                        return false;
                    }
                    held.push_back(f.to_vec());
                    // The main loop stores the new lease; until then this frame waits.
                    let _ = waker.wake();
                    true
                });
            }
            if refused {
                turn_offloads_off(&mut self.tun);
            }
            *self.published.lock().unwrap_or_else(PoisonError::into_inner) = stats.clone();
        }
    }
}
