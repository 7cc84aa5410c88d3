#[path = "../benches/trace/mod.rs"]
#[allow(dead_code)]
mod trace;
use std::time::Instant;
use trace::{Params, Trace, BATCH};
use vipgate::nat::Translator;

#[inline(never)]
fn pass(
    t: &mut Translator,
    packets: &trace::Packets,
    now: Instant,
    ring: &mut trace::Ring,
    v: usize,
) {
    let n = packets.len();
    let mut i = 0;
    while i < n {
        let mut bufs: [&mut [u8]; BATCH] = ring.each_mut().map(|b| &mut b[..]);
        let mut k = 0;
        for slot in bufs.iter_mut() {
            let Some(p) = packets.get(i + k) else { break };
            if let Some(a) = packets.get(i + k + BATCH) {
                for line in a.bytes[..a.head].chunks(64) {
                    safe_arch::prefetch_t0(&line[0]);
                }
            }
            let b = std::mem::take(slot);
            b[..p.head].copy_from_slice(&p.bytes[..p.head]);
            *slot = &mut b[..p.bytes.len()];
            k += 1;
        }
        match v {
            0 => t.translate_batch_pipelined(&mut bufs[..k], now, |_, v| {
                std::hint::black_box(v);
            }),
            1 => t.translate_batch(&mut bufs[..k], now, |_, v| {
                std::hint::black_box(v);
            }),
            2 => {}
            l => {
                std::hint::black_box(t.batch_probe(&mut bufs[..k], l as u32 - 2));
            }
        }
        match v {
            _ => {}
        }
        if false {
            t.translate_batch(&mut bufs[..k], now, |_, v| {
                std::hint::black_box(v);
            });
        }
        i += k;
    }
}

fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(30, |a| a.parse().unwrap());
    let now = Instant::now();
    let tr = Trace::generate(Params::STANDARD);
    let open_all = trace::opening_packets(&tr, 0..tr.pairs.len());
    let mut t = trace::translator(32_768, 131_072, now);
    trace::open_pairs(&mut t, &open_all, now);
    let all = trace::materialize(&tr, &mut t, now);
    let mode = std::env::args().nth(2).unwrap_or_default();
    let all = if mode.contains("hot") { all.prefix(1000) } else { all };
    eprintln!("{} packets", all.len());
    let mut ring = Box::new([[0u8; 2048]; BATCH]);
    let names = ["pipelined", "new", "harness", "+key", "+slot", "+flowpf", "+find"];
    let mut times: Vec<Vec<f64>> = vec![vec![]; names.len()];
    for _ in 0..rounds {
        let only: Option<usize> = std::env::var("VARIANT").ok().map(|v| v.parse().unwrap());
        for v in 0..names.len() {
            if only.is_some_and(|o| o != v) {
                continue;
            }
            let a = Instant::now();
            pass(&mut t, &all, now, &mut ring, v);
            times[v].push(a.elapsed().as_secs_f64() * 1e9 / all.len() as f64);
        }
    }
    for (v, ts) in times.iter_mut().enumerate().filter(|(_, t)| !t.is_empty()) {
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{:10} min {:.1} ns  median {:.1} ns  ({:.2} Mpps median)",
            names[v],
            ts[0],
            ts[ts.len() / 2],
            1e3 / ts[ts.len() / 2]
        );
    }
    assert_eq!(t.counters().dropped_total(), 0);
}
