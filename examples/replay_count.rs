//! Replays the translator benchmark's trace for instruction counting, so a change to the
//! packet path can be weighed by a number that does not move with the machine's mood:
//!
//! ```text
//! cargo build --release --example replay_count
//! valgrind --tool=callgrind --toggle-collect='replay_count::trace::replay*' \
//!     target/release/examples/replay_count [PACKETS] [PASSES] [batched|single] [durable]
//! ```
//!
//! `durable`: leases are durable as in the gateway (their stored life is kept covered).
//!
//! Instructions per packet = the collected count / (PACKETS × PASSES). The defaults, the
//! first 1,000 packets 100 times, are the bench's cache-resident replay.

#[path = "../benches/trace/mod.rs"]
#[allow(dead_code)]
mod trace;

use std::time::Instant;
use trace::{replay, replay_batched, Params, Trace, BATCH};

fn main() {
    let mut args = std::env::args().skip(1);
    let packets: usize = args.next().map_or(1000, |a| a.parse().expect("PACKETS"));
    let passes: usize = args.next().map_or(100, |a| a.parse().expect("PASSES"));
    let batched = args.next().as_deref() == Some("batched");
    let durable = args.next().as_deref() == Some("durable");
    let now = Instant::now();
    let tr = Trace::generate(Params::STANDARD);
    let open_all = trace::opening_packets(&tr, 0..tr.pairs.len());
    let mut t = if durable {
        trace::durable_translator(32_768, 131_072, now)
    } else {
        trace::translator(32_768, 131_072, now)
    };
    trace::open_pairs(&mut t, &open_all, now);
    let all = trace::materialize(&tr, &mut t, now);
    let hot = all.prefix(packets);
    let before = t.counters().dropped_total();
    let mut scratch = [0u8; 2048];
    let mut ring = Box::new([[0u8; 2048]; BATCH]);
    for _ in 0..passes {
        if batched {
            replay_batched(&mut t, &hot, now, &mut ring);
        } else {
            replay(&mut t, &hot, now, &mut scratch);
        }
    }
    assert_eq!(t.counters().dropped_total(), before, "the replay dropped packets");
    println!("{} packets x {passes} passes{}", hot.len(), if batched { ", batched" } else { "" });
}
