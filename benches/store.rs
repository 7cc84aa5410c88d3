//! Durable rents per second through the lease store's writer thread
//! (`vipgate::store::StoreWorker`), on a real SQLite file (WAL, `synchronous=FULL`) under the
//! system temp directory.
//!
//! Every rent is one `Change::Upsert` of a new (real, virtual, partner) lease: one lease row
//! and one history row, each with its indexes. A shape is timed from the first `submit` until
//! the worker reports `Committed` for the last job, i.e. until every rent is on disk.
//! - `grouped 1000 x 100`: 100,000 rents submitted as 1,000 jobs of 100;
//! - `grouped 100000 x 1`: 100,000 rents submitted as 100,000 jobs of 1 (the worker groups
//!   whatever is queued into one transaction);
//! - `serial 1 x 1`: one rent per job, each awaited before the next is submitted (at most
//!   2 s): no grouping possible, one `fsync` per rent, the floor;
//! - `paced R/s x 1`: rents arrive at R per second (20,000 and 100,000), one per job,
//!   submitted every millisecond like event-loop turns, for 2 s: the durable rate, rents per
//!   commit, and how long a rent waits for its commit (p50, p99, max).
//!
//! Run: `cargo bench --bench store` (about 10 s). Under `cargo test --benches` (no `--bench`
//! argument) it runs each shape with 1,000 rents as a smoke test.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use vipgate::store::{Change, Done, Job, LeaseRow, Store, StoreWorker};

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vipgate-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rent number `i`: host in 192.0.2.0/24 + 198.18.0.0/16, partner in 203.0.113.0/24 and
/// 198.51.100.0/24, virtual in 198.19.0.0/16 (benchmarking and TEST-NET ranges only).
fn rent(i: u32, now: SystemTime) -> Change {
    let real = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + (i & 0xffff)));
    let partner = if i >> 16 == 0 { [203, 0, 113, 1] } else { [198, 51, 100, (i >> 16) as u8] };
    Change::Upsert(LeaseRow {
        real,
        virtual_addr: IpAddr::V4(Ipv4Addr::from(0xc613_0000 + (i & 0xffff))),
        partner: IpAddr::V4(Ipv4Addr::from(partner)),
        explicit: true,
        created: now,
        expires: Some(now + Duration::from_secs(3600)),
    })
}

struct Harness {
    _dir: TempDir,
    poll: mio::Poll,
    events: mio::Events,
    worker: StoreWorker,
    commits: usize,
}

impl Harness {
    fn new(name: &str) -> Harness {
        let dir = TempDir::new(name);
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let store = Store::open(&dir.0.join("leases.db")).expect("open the store");
        let worker = StoreWorker::spawn(store, waker);
        Harness { _dir: dir, poll, events: mio::Events::with_capacity(8), worker, commits: 0 }
    }

    /// Waits (on the waker, like the event loop) until `seq` is committed.
    fn wait_for(&mut self, seq: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            while let Some(done) = self.worker.try_done() {
                match done {
                    Done::Committed { seq: s } => {
                        self.commits += 1;
                        if s >= seq {
                            return;
                        }
                    }
                    Done::Failed { seq, error } => panic!("job {seq} failed: {error}"),
                    other => panic!("unexpected answer {other:?}"),
                }
            }
            assert!(Instant::now() < deadline, "the store did not commit {seq} in time");
            self.poll.poll(&mut self.events, Some(Duration::from_secs(1))).expect("poll");
        }
    }
}

fn grouped(jobs: u32, per_job: u32) {
    let mut h = Harness::new(&format!("grouped-{jobs}x{per_job}"));
    let now = SystemTime::now();
    let started = Instant::now();
    for j in 0..jobs {
        let changes = (0..per_job).map(|k| rent(j * per_job + k, now)).collect();
        h.worker.submit(Job::Apply { seq: u64::from(j) + 1, changes });
    }
    let submitted = started.elapsed();
    h.wait_for(u64::from(jobs));
    let elapsed = started.elapsed();
    let rents = f64::from(jobs * per_job);
    println!(
        "store/grouped {jobs} x {per_job}: {:.0} rents/s ({} rents durable in {:.3} s; \
         {} commits; submitting took {:.3} s)",
        rents / elapsed.as_secs_f64(),
        jobs * per_job,
        elapsed.as_secs_f64(),
        h.commits,
        submitted.as_secs_f64()
    );
    h.worker.shutdown();
}

fn serial(max_rents: u32, max_time: Duration) {
    let mut h = Harness::new("serial");
    let now = SystemTime::now();
    let started = Instant::now();
    let mut rents = 0;
    while rents < max_rents && started.elapsed() < max_time {
        h.worker.submit(Job::Apply { seq: u64::from(rents) + 1, changes: vec![rent(rents, now)] });
        h.wait_for(u64::from(rents) + 1);
        rents += 1;
    }
    let elapsed = started.elapsed();
    println!(
        "store/serial 1 x 1: {:.0} rents/s ({rents} rents, each awaited, in {:.3} s)",
        f64::from(rents) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    h.worker.shutdown();
}

/// Takes the worker's answers; records how long each newly durable rent waited.
fn collect(
    h: &mut Harness,
    submitted_at: &[Instant],
    committed: &mut usize,
    latencies: &mut Vec<Duration>,
) {
    while let Some(done) = h.worker.try_done() {
        match done {
            Done::Committed { seq } => {
                h.commits += 1;
                let at = Instant::now();
                let seq = usize::try_from(seq).expect("seq fits");
                latencies.extend(submitted_at[*committed..seq].iter().map(|t| at - *t));
                *committed = seq;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

/// Rents arrive at `rate` per second, one per job, submitted each millisecond like an event
/// loop turn would, for `duration`; reports the durable rate and how long a rent waited for
/// its commit.
fn paced(rate: u32, duration: Duration) {
    let mut h = Harness::new(&format!("paced-{rate}"));
    let now = SystemTime::now();
    let total = (f64::from(rate) * duration.as_secs_f64()) as u32;
    let mut submitted_at: Vec<Instant> = Vec::with_capacity(total as usize);
    let mut latencies: Vec<Duration> = Vec::with_capacity(total as usize);
    let mut committed = 0usize; // jobs 1..=committed are durable
    let started = Instant::now();
    while submitted_at.len() < total as usize {
        let due =
            ((started.elapsed().as_secs_f64() * f64::from(rate)) as usize).min(total as usize);
        while submitted_at.len() < due {
            let i = submitted_at.len() as u32;
            submitted_at.push(Instant::now());
            h.worker.submit(Job::Apply { seq: u64::from(i) + 1, changes: vec![rent(i, now)] });
        }
        collect(&mut h, &submitted_at, &mut committed, &mut latencies);
        std::thread::sleep(Duration::from_millis(1));
    }
    while committed < total as usize {
        h.poll.poll(&mut h.events, Some(Duration::from_millis(100))).expect("poll");
        collect(&mut h, &submitted_at, &mut committed, &mut latencies);
        assert!(started.elapsed() < duration * 30, "the store fell behind");
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!(
        "store/paced {rate}/s x 1: {:.0} rents/s durable ({total} rents in {:.3} s; {} commits, \
         {:.0} rents per commit; wait for durability p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
        f64::from(total) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        h.commits,
        f64::from(total) / h.commits as f64,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    h.worker.shutdown();
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 100_000 } else { 1_000 };
    println!("store bench: database under {}", std::env::temp_dir().display());
    grouped(n / 100, 100);
    grouped(n, 1);
    serial(n, Duration::from_secs(if full { 2 } else { 1 }));
    let paced_for = Duration::from_millis(if full { 2_000 } else { 100 });
    paced(20_000, paced_for);
    paced(100_000, paced_for);
}
