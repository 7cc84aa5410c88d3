//! Packet-replay benchmark of the translator (`vipgate::nat::Translator::translate`).
//!
//! A deterministic trace (see `trace/mod.rs`: 120,000 packets over about 18,500 host/partner
//! pairs, TCP/UDP/ICMP echo, IPv4 and IPv6, 64 to 1500 bytes, both directions, about 3 % of
//! packets the first of a new pair) is replayed through the translator. The translator rewrites
//! in place, so each packet's headers (IP and transport: all the translator reads or writes,
//! it never touches the payload of a data packet) are copied from the pristine trace into
//! one reused 2 KiB buffer before it is translated; in the daemon the packet is already there
//! after the TUN read. Each packet of the trace starts on a cache line, as a packet buffer
//! does. The baselines do the same copy. `*_full_copy` variants copy
//! whole packets, to show what the copy of an 89 MB trace costs on its own.
//!
//! Bench groups (throughput in packets):
//! - `translate/established`: every pair leased and every flow open before the replay; the
//!   same translator replays the trace again and again (the headline figure);
//! - `translate/established_durable`: the same, on a translator with durable leases as the
//!   gateway runs one (each flow's lease life is checked, see `nat::life`);
//! - `translate/established_batched` (and `..._cache_resident_batched`): the same replay in
//!   batches of [`BATCH`] packets through `Translator::translate_batch`, each packet copied
//!   into its own buffer of the batch;
//! - `translate/with_new_pairs`: a fresh translator per iteration that knows only the pairs
//!   the trace does not open, so about 3 % of the packets create a lease (setup untimed);
//! - `baseline/parse_copy`: copy, parse with `etherparse::SlicedPacket::from_ip`, read the
//!   addresses and ports: what merely looking at the packets costs;
//! - `baseline/copy`: the copy alone, the floor under all of the above.
//!
//! Before the benchmarks run, the binary prints the trace, the memory per lease and per flow
//! (from `Translator::allocation_size` and from a counting global allocator), and checks that
//! replaying the established trace allocates nothing and drops nothing (it panics otherwise,
//! so the benchmark cannot silently measure drops).
//!
//! Run: `cargo bench --bench translate`.

mod trace;

use criterion::{black_box, BatchSize, Criterion, Throughput};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use trace::{load, replay, replay_batched, replay_copying, Packets, Params, Trace, BATCH};
use vipgate::nat::{Counters, DropReason, Translator};

/// Lease capacity of the benchmark translators (the trace has 18,474 pairs).
const BENCH_LEASES: usize = 32_768;
/// Flow capacity of the benchmark translators (the trace has 46,199 flows).
const BENCH_FLOWS: usize = 131_072;

/// Table sizes of the memory report.
const MEM_LEASES: usize = 20_000;
const MEM_FLOWS: usize = 50_000;

/// Memory targets (from the issue).
const TARGET_FLOW_BYTES: f64 = 128.0;
const TARGET_LEASE_BYTES: f64 = 256.0;

// ---------------------------------------------------------------------------------------------
// Counting allocator: live heap bytes and number of allocation calls.

/// The system allocator, counting live bytes and allocation calls (alloc, alloc_zeroed and
/// realloc each count as one call).
struct CountingAlloc;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOC_CALLS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// counters are side effects only.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            ALLOC_CALLS.fetch_add(1, Relaxed);
            LIVE_BYTES.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            ALLOC_CALLS.fetch_add(1, Relaxed);
            LIVE_BYTES.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            ALLOC_CALLS.fetch_add(1, Relaxed);
            LIVE_BYTES.fetch_add(new_size, Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the allocation calls it made.
fn count_allocs<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOC_CALLS.load(Relaxed);
    let out = f();
    (out, ALLOC_CALLS.load(Relaxed) - before)
}

/// Heap bytes live while a translator with these capacities exists.
fn heap_bytes_of(max_leases: usize, max_flows: usize, now: Instant) -> usize {
    let before = LIVE_BYTES.load(Relaxed);
    let t = trace::translator(max_leases, max_flows, now);
    let bytes = LIVE_BYTES.load(Relaxed) - before;
    drop(t);
    bytes
}

// ---------------------------------------------------------------------------------------------
// Replay loops (the timed code).

/// Copies each packet into `scratch`, parses it with etherparse and reads its addresses and
/// ports.
fn parse_copy(packets: &Packets, scratch: &mut [u8; 2048]) {
    for p in packets.iter() {
        let buf = load(scratch, p, false);
        let Ok(s) = SlicedPacket::from_ip(buf) else { panic!("etherparse rejects a trace packet") };
        match s.net {
            Some(NetSlice::Ipv4(ip)) => {
                black_box((ip.header().source_addr(), ip.header().destination_addr()));
            }
            Some(NetSlice::Ipv6(ip)) => {
                black_box((ip.header().source_addr(), ip.header().destination_addr()));
            }
            _ => {}
        }
        match s.transport {
            Some(TransportSlice::Tcp(t)) => black_box((t.source_port(), t.destination_port())),
            Some(TransportSlice::Udp(u)) => black_box((u.source_port(), u.destination_port())),
            _ => black_box((0, 0)),
        };
    }
}

/// Loads each packet into `scratch`, nothing else.
fn copy_only(packets: &Packets, scratch: &mut [u8; 2048], full: bool) {
    for p in packets.iter() {
        black_box(load(scratch, p, full));
    }
}

// ---------------------------------------------------------------------------------------------
// Checks (untimed).

/// Panics unless `packets` went through `t` since `before` without a drop, every packet
/// forwarded in its direction; `new_leases` is how many leases the pass must have created.
fn check_pass(t: &Translator, before: &Counters, packets: &Packets, new_leases: u64, what: &str) {
    let c = t.counters();
    let drops = c.dropped_total() - before.dropped_total();
    if drops != 0 {
        let reasons: Vec<String> = DropReason::ALL
            .iter()
            .filter(|&&r| c.dropped(r) != before.dropped(r))
            .map(|&r| format!("{}: {}", r.as_str(), c.dropped(r) - before.dropped(r)))
            .collect();
        panic!(
            "{what}: {drops} packets dropped ({}); the benchmark would measure drops",
            reasons.join(", ")
        );
    }
    assert_eq!(
        c.outbound - before.outbound,
        packets.outbound,
        "{what}: outbound packets forwarded"
    );
    assert_eq!(c.inbound - before.inbound, packets.inbound, "{what}: inbound packets forwarded");
    assert_eq!(c.leases_created - before.leases_created, new_leases, "{what}: leases created");
}

/// Everything the benchmarks replay.
struct Fixture {
    now: Instant,
    /// Translator holding every pair of the trace, and the trace addressed to it.
    established: (Translator, Packets),
    /// A translator with durable leases holding the same pairs (the trace fits it too: the
    /// same allocations from the same seed).
    durable: Translator,
    /// Opening packets of every pair of the trace.
    open_all: Packets,
    /// Opening packets of the pairs the trace does not open itself.
    open_old: Packets,
    /// The trace addressed to a translator prepared by [`fresh_with_old_pairs`].
    with_new_pairs: Packets,
}

/// A fresh translator that holds only the pairs the trace does not open itself (`open_old`
/// from the fixture).
fn fresh_with_old_pairs(open_old: &Packets, now: Instant) -> Translator {
    let mut t = trace::translator(BENCH_LEASES, BENCH_FLOWS, now);
    trace::open_pairs(&mut t, open_old, now);
    t
}

impl Fixture {
    fn new() -> Fixture {
        let now = Instant::now();
        let trace = Trace::generate(Params::STANDARD);
        assert!(
            trace.pairs.len() <= MEM_LEASES && trace.flows.len() <= MEM_FLOWS,
            "trace fits the tables"
        );
        eprintln!("{}", trace.summary());

        // Established: open every pair first, then address the trace to that translator.
        let open_all = trace::opening_packets(&trace, 0..trace.pairs.len());
        let open_old = trace::opening_packets(&trace, 0..trace.old_pairs);
        let mut t = trace::translator(BENCH_LEASES, BENCH_FLOWS, now);
        trace::open_pairs(&mut t, &open_all, now);
        let packets = trace::materialize(&trace, &mut t, now);
        eprintln!(
            "established trace: {} packets, {:.1} MB, {} outbound, {} inbound; translator holds {:?} (leases, flows, quarantined)",
            packets.len(),
            packets.bytes() as f64 / 1e6,
            packets.outbound,
            packets.inbound,
            t.table_sizes()
        );

        // With new pairs: address the trace to a translator that knows only the old pairs.
        let mut probe = fresh_with_old_pairs(&open_old, now);
        let with_new_pairs = trace::materialize(&trace, &mut probe, now);
        drop(probe);

        // The same, with durable leases as the gateway runs them (the life test active).
        let mut durable = trace::durable_translator(BENCH_LEASES, BENCH_FLOWS, now);
        trace::open_pairs(&mut durable, &open_all, now);

        Fixture { now, established: (t, packets), durable, open_all, open_old, with_new_pairs }
    }

    /// The checks the benchmarks rely on: replays translate every packet, the established
    /// replay creates nothing and allocates nothing, and a fresh translator accepts the
    /// new-pairs trace.
    fn check(&mut self) {
        let now = self.now;
        let mut scratch = [0u8; 2048];
        let (t, packets) = &mut self.established;
        let before = t.counters().clone();
        let sizes = t.table_sizes();
        let ((), allocs) = count_allocs(|| replay(t, packets, now, &mut scratch));
        check_pass(t, &before, packets, 0, "established replay");
        assert_eq!(
            t.counters().flows_created,
            before.flows_created,
            "established replay creates no flow"
        );
        assert_eq!(t.table_sizes(), sizes, "established replay leaves the tables as they were");
        eprintln!("allocation check: one established replay pass ({} packets) made {allocs} allocation calls", packets.len());
        assert_eq!(allocs, 0, "replaying established flows must not allocate");

        let mut ring = Box::new([[0u8; 2048]; BATCH]);
        let before = t.counters().clone();
        let ((), allocs) = count_allocs(|| replay_batched(t, packets, now, &mut ring));
        check_pass(t, &before, packets, 0, "established replay in batches");
        assert_eq!(t.table_sizes(), sizes, "batched replay leaves the tables as they were");
        eprintln!("allocation check: one batched established replay pass ({} packets, {BATCH} per batch) made {allocs} allocation calls", packets.len());
        assert_eq!(allocs, 0, "replaying established flows in batches must not allocate");

        let mut fresh = fresh_with_old_pairs(&self.open_old, now);
        let before = fresh.counters().clone();
        let p = &self.with_new_pairs;
        let ((), allocs) = count_allocs(|| replay(&mut fresh, p, now, &mut scratch));
        check_pass(&fresh, &before, p, p.opening, "replay with new pairs");
        eprintln!(
            "allocation check: one replay pass with new pairs ({} packets, {} new leases, {} new flows) made {allocs} allocation calls",
            p.len(),
            fresh.counters().leases_created - before.leases_created,
            fresh.counters().flows_created - before.flows_created,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Memory report (untimed).

fn verdict(bytes: f64, target: f64) -> &'static str {
    if bytes <= target {
        "within target"
    } else {
        "OVER TARGET"
    }
}

/// Prints bytes per lease and per flow, measured two ways (see the module documentation).
fn memory_report(open_all: &Packets, now: Instant) {
    let (n, m) = (MEM_LEASES, MEM_FLOWS);

    // 1. What the translator says its tables reserve.
    let mut t = trace::translator(n, m, now);
    let (lease_bytes, flow_bytes) = t.allocation_size();
    let ((), fill_allocs) = count_allocs(|| trace::open_pairs(&mut t, open_all, now));
    let (leases, flows, _) = t.table_sizes();
    assert_eq!(t.allocation_size(), (lease_bytes, flow_bytes), "tables do not grow while filling");
    let (lf, ff) = (lease_bytes as f64, flow_bytes as f64);
    eprintln!("memory, Translator::allocation_size() with max_leases={n}, max_flows={m}: {lease_bytes} B lease tables, {flow_bytes} B flow tables");
    eprintln!(
        "memory: {:.1} bytes/flow, {:.1} bytes/lease (capacity-based, allocation_size)",
        ff / m as f64,
        lf / n as f64
    );
    eprintln!(
        "memory: {:.1} bytes/flow, {:.1} bytes/lease (occupancy-based, allocation_size, {flows} flows and {leases} leases held)",
        ff / flows as f64,
        lf / leases as f64
    );
    eprintln!("memory: filling the tables with {leases} leases and {flows} flows made {fill_allocs} allocation calls");
    drop(t);

    // 2. What the heap says: every byte the translator allocates, attributed by varying one
    //    capacity at a time (the rest is fixed cost).
    let fixed = heap_bytes_of(1, 1, now);
    let per_lease = (heap_bytes_of(n, 1, now) - fixed) as f64 / (n - 1) as f64;
    let per_flow = (heap_bytes_of(1, m, now) - fixed) as f64 / (m - 1) as f64;
    let total = heap_bytes_of(n, m, now);
    eprintln!(
        "memory, heap (counting allocator): translator with max_leases={n}, max_flows={m}: {total} B; fixed part {fixed} B"
    );
    eprintln!(
        "memory: {per_flow:.1} bytes/flow ({}, target {TARGET_FLOW_BYTES}), {per_lease:.1} bytes/lease ({}, target {TARGET_LEASE_BYTES}) (capacity-based, heap)",
        verdict(per_flow, TARGET_FLOW_BYTES),
        verdict(per_lease, TARGET_LEASE_BYTES),
    );
    eprintln!(
        "memory: heap minus allocation_size: {:.1} bytes/flow, {:.1} bytes/lease not reported by allocation_size",
        per_flow - ff / m as f64,
        per_lease - lf / n as f64,
    );
}

// ---------------------------------------------------------------------------------------------
// Benchmarks.

fn benches(c: &mut Criterion, fx: &mut Fixture) {
    let now = fx.now;
    let mut scratch = [0u8; 2048];
    let mut ring = Box::new([[0u8; 2048]; BATCH]);

    let mut g = c.benchmark_group("translate");
    g.sample_size(20).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    let (t, packets) = &mut fx.established;
    g.throughput(Throughput::Elements(packets.len() as u64));
    g.bench_function("established", |b| b.iter(|| replay(t, packets, now, &mut scratch)));
    g.bench_function("established_batched", |b| {
        b.iter(|| replay_batched(t, packets, now, &mut ring))
    });
    let d = &mut fx.durable;
    g.bench_function("established_durable", |b| b.iter(|| replay(d, packets, now, &mut scratch)));
    let hot = packets.prefix(1000);
    g.throughput(Throughput::Elements(hot.len() as u64));
    g.bench_function("established_first_1000_cache_resident", |b| {
        b.iter(|| replay(t, &hot, now, &mut scratch))
    });
    g.bench_function("established_first_1000_cache_resident_batched", |b| {
        b.iter(|| replay_batched(t, &hot, now, &mut ring))
    });
    g.throughput(Throughput::Elements(packets.len() as u64));
    g.bench_function("established_full_copy", |b| {
        b.iter(|| replay_copying(t, packets, now, &mut scratch, true))
    });
    let (open_old, p) = (&fx.open_old, &fx.with_new_pairs);
    g.throughput(Throughput::Elements(p.len() as u64));
    g.bench_function("with_new_pairs", |b| {
        b.iter_batched_ref(
            || fresh_with_old_pairs(open_old, now),
            |t| replay(t, p, now, &mut scratch),
            BatchSize::PerIteration,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("baseline");
    g.sample_size(20).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    let packets = &fx.established.1;
    g.throughput(Throughput::Elements(packets.len() as u64));
    g.bench_function("parse_copy", |b| b.iter(|| parse_copy(packets, &mut scratch)));
    g.bench_function("copy", |b| b.iter(|| copy_only(packets, &mut scratch, false)));
    g.bench_function("copy_full", |b| b.iter(|| copy_only(packets, &mut scratch, true)));
    g.finish();
}

fn main() {
    let mut fx = Fixture::new();
    memory_report(&fx.open_all, fx.now);
    fx.check();
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &mut fx);
    c.final_summary();
    // The established translator replayed the trace for the whole benchmark: still no drop.
    let counters = fx.established.0.counters();
    assert_eq!(counters.dropped_total(), 0, "established translator dropped packets");
    eprintln!(
        "after the benchmarks: established translator forwarded {} packets, dropped none",
        counters.outbound + counters.inbound
    );
    // The durable one forwarded the whole trace too: none dropped, none held.
    let d = fx.durable.counters();
    assert_eq!((d.dropped_total(), d.held), (0, 0), "the durable translator dropped or held");
    assert!(d.outbound + d.inbound >= counters.outbound.min(1), "the durable replay never ran");
}
