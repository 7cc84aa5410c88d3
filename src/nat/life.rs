//! An implicit lease's life across a restart: the store keeps, for each implicit lease, a
//! time until which the lease is alive at least (its *life*), so that after a crash at any
//! moment every lease that would have been alive at time T without the crash is alive at T
//! after the restart: never shorter, and longer by at most [`GRANULARITY_MS`].
//!
//! An implicit lease lives while its flows do (and `lease-idle` after the last one ends), and
//! a flow lives until its idle deadline, which every packet moves to `now + timeout`. The
//! store is not written per packet. Time is cut into checkpoint periods of [`PERIOD_MS`]
//! (`now >> PERIOD_SHIFT`), and the rule is: a packet may refresh a flow only when the
//! lease's durable life already covers every deadline the flow can reach before the period
//! ends, that is `end of period + timeout + idle`.
//!
//! - The fast path refreshes a flow only when its previous packet came in the same period and
//!   the packet does not lengthen the flow's timeout ([`super::flow::FlowTable::touch_if`]);
//!   so the first packet of a flow in each period takes the general path.
//! - There, [`Translator::cover`] hands the store a life one period further out than needed
//!   (`end of period + period + timeout + idle`) when what it was handed is less; that is one
//!   `Lives` event per active lease per period, stored with the other events of the loop's
//!   turn (group commit). The packet goes on at once when the durable life already covers
//!   it (the steady state: the previous period's event did), and waits for the commit
//!   (`Hold`, like the first packets of a new lease) when it does not: the first packet
//!   after an idle spell, or the one that completes a TCP handshake.
//!
//! By induction over the packets of a period, every deadline a flow holds is covered by a
//! durable life, so a crash never loses life. What is stored exceeds the real end by at most
//! two periods (a life handed out at the start of a period, then no more packets), and a
//! connection's close hands out the lower life its lease then needs (its packet waits for
//! that commit), so a lease whose connection closed does not keep the open one's life.

use super::lease::LeaseEntry;
use super::translate::Stop;
use super::{LeaseEvent, Origin, Translator};
use std::time::Duration;

/// Checkpoint periods are `1 << PERIOD_SHIFT` ms long.
pub const PERIOD_SHIFT: u32 = 13;
/// The length of a checkpoint period: 8.192 s.
pub const PERIOD_MS: u64 = 1 << PERIOD_SHIFT;
/// How much longer than without a crash a lease may live after one: two periods and the
/// expiry's resolution (a tick of the timer wheel), 17.384 s.
pub const GRANULARITY_MS: u64 = 2 * PERIOD_MS + super::wheel::TICK_MS;

impl Translator {
    /// The checkpoint period's shift when lease lives are kept (leases are durable), for the
    /// fast path's test.
    #[inline(always)]
    pub(super) fn life_shift(&self) -> Option<u32> {
        self.config.hold_until_durable.then_some(PERIOD_SHIFT)
    }

    /// [`Translator::cover`] for the lease of flow `fi`, which a packet with `flags` going
    /// `outbound` is about to refresh.
    pub(super) fn cover_flow(
        &mut self,
        fi: u32,
        flags: u8,
        outbound: bool,
        now: u64,
    ) -> Result<(), Stop> {
        if !self.config.hold_until_durable {
            return Ok(());
        }
        let timeouts = self.flows.timeout_after(fi, flags, outbound, &self.flow_timeouts);
        let (Some((li, _)), Some((after, before))) = (self.flows.owner(fi), timeouts) else {
            return Ok(());
        };
        if after < before {
            // A connection closing: the life it needed may be more than the lease needs now.
            self.lower(li, fi, after, now);
        }
        self.cover(li, after, now)
    }

    /// Before a packet refreshes a flow of lease `li` to `timeout` (ms) at `now`: makes sure
    /// the lease's stored life covers the deadlines the flow can reach in this period,
    /// handing the store a new life when needed; `Hold` while the life this packet needs is
    /// not durable yet. Explicit leases live by their TTL and need nothing.
    pub(super) fn cover(&mut self, li: u32, timeout: u64, now: u64) -> Result<(), Stop> {
        if !self.config.hold_until_durable {
            return Ok(());
        }
        let (durable, idle) = (self.durable, self.lease_idle_ms);
        let Some(l) = self.leases.get_mut(li) else { return Ok(()) };
        if l.origin != Origin::Implicit {
            return Ok(());
        }
        settle(l, durable);
        let need = period_end(now).saturating_add(timeout).saturating_add(idle);
        // One period further: the next period's first packet finds its life durable.
        let want = need.saturating_add(PERIOD_MS);
        if l.life_pending.0 < want {
            self.hand_out(li, want);
        }
        match self.leases.get(li) {
            // Not durable yet: the life this packet needs, or a lower one a connection's
            // close handed out (a crash before it is stored would keep the open
            // connection's life).
            Some(l) if l.life < need || l.life_pending.0 < l.life => Err(Stop::Hold),
            _ => Ok(()),
        }
    }

    /// Hands the store a lower life for lease `li` when its flow `fi` is about to get the
    /// shorter `timeout` (a TCP connection closing) and the lease's other flows do not need
    /// what it has: each flow whose last packet came in this period may reach
    /// `end of period + its timeout`, every other one stays at its deadline. Walks the
    /// lease's flows (only when a connection closes).
    fn lower(&mut self, li: u32, fi: u32, timeout: u64, now: u64) {
        let Some(l) = self.leases.get(li) else { return };
        if l.origin != Origin::Implicit {
            return;
        }
        let (this_period, end) = (now >> PERIOD_SHIFT, period_end(now) + PERIOD_MS);
        let mut need = end.saturating_add(timeout);
        let mut f = l.flow_head;
        while f != super::lease::NIL {
            if let (true, Some((last, deadline, t))) =
                (f != fi, self.flows.timing(f, &self.flow_timeouts))
            {
                let reach = if last >> PERIOD_SHIFT == this_period {
                    end.saturating_add(t)
                } else {
                    deadline
                };
                need = need.max(reach);
            }
            f = self.flows.next_of(f);
        }
        let want = need.saturating_add(self.lease_idle_ms).max(l.floor);
        if want < l.life_pending.0 {
            self.hand_out(li, want);
        }
    }

    /// Queues a `Lives` event giving lease `li` the life `until` (ms).
    fn hand_out(&mut self, li: u32, until: u64) {
        let Some(l) = self.leases.get(li) else { return };
        let (real, partner) = (l.real, l.partner);
        let at = self.epoch + Duration::from_millis(until);
        let seq = self.push_event(LeaseEvent::Lives { real, partner, until: at });
        let durable = self.durable;
        if let Some(l) = self.leases.get_mut(li) {
            l.life_pending = (until, seq);
            settle(l, durable);
        }
    }
}

/// The end of the checkpoint period `now` (ms) is in.
pub(super) fn period_end(now: u64) -> u64 {
    ((now >> PERIOD_SHIFT) + 1) << PERIOD_SHIFT
}

/// Takes the pending life as durable once its event is (it may be lower than the one
/// before: a connection closed).
fn settle(l: &mut LeaseEntry, durable: u64) {
    let (value, seq) = l.life_pending;
    if seq <= durable {
        l.life = value;
    }
}

#[cfg(test)]
mod tests {
    //! A gateway and its store on simulated time, crashed after every packet of many random
    //! traffic schedules: the restarted translator's lease must never end before the one
    //! that did not crash, and never more than [`GRANULARITY_MS`] after it.
    use super::super::{Config, LeaseEvent, Origin, Translator, Verdict};
    use super::GRANULARITY_MS;
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, Instant};

    const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const PARTNER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
    const SYN: u8 = 0x02;
    const FIN: u8 = 0x01;
    const ACK: u8 = 0x10;

    /// A packet of the schedule: when (ms), which way, UDP (port) or TCP (flags).
    #[derive(Debug, Clone, Copy)]
    struct Send {
        at: u64,
        outbound: bool,
        tcp: Option<u8>,
        port: u16,
    }

    fn packet(s: &Send, virt: Option<IpAddr>) -> Vec<u8> {
        let proto = if s.tcp.is_some() { 6 } else { 17 };
        let l4 = if s.tcp.is_some() { 20 } else { 8 };
        let mut b = vec![0u8; 20 + l4];
        let v = match virt {
            Some(IpAddr::V4(v)) => v,
            _ => Ipv4Addr::UNSPECIFIED,
        };
        let (src, dst) = if s.outbound { (HOST, PARTNER) } else { (PARTNER, v) };
        crate::wire::ipv4::emit_header(&mut b, src, dst, proto, l4, 64);
        let (sp, dp) = if s.outbound { (s.port, 80) } else { (80, s.port) };
        b[20..22].copy_from_slice(&sp.to_be_bytes());
        b[22..24].copy_from_slice(&dp.to_be_bytes());
        match s.tcp {
            Some(flags) => {
                b[32] = 5 << 4;
                b[33] = flags;
            }
            None => b[24..26].copy_from_slice(&8u16.to_be_bytes()),
        }
        b
    }

    /// A store as the gateway keeps one: the lease rows of every committed event.
    #[derive(Debug, Clone, Default)]
    struct Store {
        rows: HashMap<(IpAddr, IpAddr), (IpAddr, Option<Instant>)>,
        /// `Lives` events applied.
        lives: u64,
    }

    impl Store {
        fn apply(&mut self, e: &LeaseEvent) {
            match e {
                LeaseEvent::Created(l) | LeaseEvent::Updated(l) => {
                    self.rows.insert((l.real, l.partner), (l.virtual_addr, l.expires));
                }
                LeaseEvent::Ended(l, _) => {
                    self.rows.remove(&(l.real, l.partner));
                }
                LeaseEvent::Lives { real, partner, until } => {
                    self.lives += 1;
                    if let Some(r) = self.rows.get_mut(&(*real, *partner)) {
                        r.1 = Some(*until);
                    }
                }
                LeaseEvent::Quarantined { .. } => {}
            }
        }
    }

    struct Gateway {
        t: Translator,
        t0: Instant,
        committed: Store,
        batch: Vec<(u64, LeaseEvent)>,
        /// Packets that waited for a commit.
        holds: usize,
    }

    fn config(idle_ms: u64) -> Config {
        let mut c = Config::new(
            vec!["192.0.2.0/24".parse().unwrap()],
            vec!["198.18.0.0/24".parse().unwrap()],
        );
        c.hold_until_durable = true;
        c.timeouts.lease_idle = Duration::from_millis(idle_ms);
        (c.max_leases, c.max_flows) = (64, 256);
        c
    }

    impl Gateway {
        fn new(idle_ms: u64, t0: Instant) -> Gateway {
            let t = Translator::new(config(idle_ms), [7; 32], t0).unwrap();
            Gateway { t, t0, committed: Store::default(), batch: Vec::new(), holds: 0 }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn commit(&mut self) {
            while let Some(e) = self.t.poll_event() {
                self.batch.push(e);
            }
            if let Some(&(seq, _)) = self.batch.last() {
                for (_, e) in self.batch.drain(..) {
                    self.committed.apply(&e);
                }
                self.t.set_durable(seq);
            }
        }

        fn virt(&self) -> Option<IpAddr> {
            self.t.lease_of(HOST.into(), PARTNER.into()).map(|l| l.virtual_addr)
        }

        /// Sends one packet (expiry first, as the loop does); a held packet is sent again
        /// after the commit it waits for. Events of a forwarded packet stay uncommitted
        /// unless `commit`.
        fn send(&mut self, s: &Send, commit: bool) {
            let now = self.at(s.at);
            self.t.handle_timeout(now);
            while let Some(e) = self.t.poll_event() {
                self.batch.push(e);
            }
            if !s.outbound && self.virt().is_none() {
                return;
            }
            let mut b = packet(s, self.virt());
            match self.t.translate(&mut b, now) {
                Verdict::Hold => {
                    self.holds += 1;
                    self.commit();
                    let mut b = packet(s, self.virt());
                    let v = self.t.translate(&mut b, now);
                    assert!(matches!(v, Verdict::Forward(_)), "{s:?} after its commit: {v:?}");
                }
                Verdict::Forward(_) => {}
                v => panic!("{s:?}: {v:?}"),
            }
            if commit {
                self.commit();
            }
        }

        /// When the lease ends with no more packets from `from` on (to 100 ms: the clock
        /// steps to the translator's next deadline, at least 100 ms at a time).
        fn end(&mut self, from: u64) -> Option<u64> {
            let mut now = from;
            while now < from + 3 * 3600 * 1000 {
                self.t.handle_timeout(self.at(now));
                if self.virt().is_none() {
                    return Some(now);
                }
                let next = self
                    .t
                    .poll_timeout()
                    .map_or(u64::MAX, |t| t.saturating_duration_since(self.t0).as_millis() as u64);
                now = (now + 100).max(next.min(now + 3_600_000));
            }
            None
        }
    }

    /// A restarted gateway on `store` at `at` ms.
    fn restart(store: &Store, idle_ms: u64, t0: Instant, at: u64) -> Gateway {
        let mut g = Gateway::new(idle_ms, t0);
        let now = g.at(at);
        for (&(real, partner), &(virt, expires)) in &store.rows {
            // As `Store::load` does: a lease past its end is not restored.
            if expires.is_some_and(|e| e <= now) {
                continue;
            }
            g.t.restore(real, virt, partner, Origin::Implicit, expires, now).unwrap();
        }
        while g.t.poll_event().is_some() {}
        g.t.set_durable(u64::MAX / 2);
        g
    }

    /// A random schedule: UDP on two ports and a TCP connection that may close, with gaps
    /// from milliseconds to minutes (xorshift from `seed`).
    fn schedule(seed: u64) -> (Vec<Send>, Vec<bool>) {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let gaps = [3, 40, 900, 4_000, 7_900, 8_300, 20_000, 130_000, 250_000];
        let mut at = 1_000 + next() % 10_000;
        let mut out = Vec::new();
        let mut commits = Vec::new();
        let mut tcp_stage = 0;
        for _ in 0..24 {
            at += gaps[(next() % gaps.len() as u64) as usize] + next() % 500;
            let r = next() % 10;
            let s = if r < 4 {
                Send { at, outbound: r % 2 == 0, tcp: None, port: 1000 + (r as u16 % 2) }
            } else {
                let flags = match tcp_stage {
                    0 => SYN,
                    1 => SYN | ACK,
                    2..=5 => ACK,
                    6 => FIN | ACK,
                    7 => FIN | ACK,
                    _ => ACK,
                };
                let outbound = !matches!(tcp_stage, 1 | 3 | 5 | 7);
                tcp_stage += 1;
                Send { at, outbound, tcp: Some(flags), port: 2000 }
            };
            out.push(s);
            commits.push(next() % 3 == 0);
        }
        (out, commits)
    }

    #[test]
    fn a_crash_after_any_packet_never_shortens_a_lease_nor_lengthens_it_past_the_granularity() {
        let t0 = Instant::now();
        let mut checked = 0;
        for seed in 1..=40u64 {
            let idle = [0, 5_000][seed as usize % 2];
            let (sends, commits) = schedule(seed);
            for crash_after in 0..sends.len() {
                let mut g = Gateway::new(idle, t0);
                for (s, &c) in sends.iter().zip(&commits).take(crash_after + 1) {
                    g.send(s, c);
                }
                // The crash: only what was committed survives; the restart is at once, or
                // some time later.
                let crash = sends[crash_after].at + 1;
                let mut live = Gateway::new(idle, t0);
                for (s, &c) in sends.iter().zip(&commits).take(crash_after + 1) {
                    live.send(s, c);
                }
                let Some(expected) = live.end(crash) else { panic!("lease never ended") };
                for delay in [0, 9_000, 60_000] {
                    let back = crash + delay;
                    let mut r = restart(&g.committed, idle, t0, back);
                    let got = r.end(back).unwrap_or(back);
                    assert!(
                        got >= expected,
                        "seed {seed}, crash after packet {crash_after}, restart {delay} ms \
                         later: the restarted lease ended at {got} ms, before the one without \
                         a crash ({expected} ms)"
                    );
                    assert!(
                        got <= back.max(expected + GRANULARITY_MS),
                        "seed {seed}, crash after packet {crash_after}, restart {delay} ms \
                         later: the restarted lease lived until {got} ms, more than the \
                         granularity past the one without a crash ({expected} ms)"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 500, "only {checked} crashes checked");
    }

    #[test]
    fn a_steady_flow_waits_for_the_store_once_and_writes_once_per_period() {
        let mut g = Gateway::new(0, Instant::now());
        let (every, count) = (300, 200u64);
        for k in 0..count {
            let s = Send { at: 1_000 + k * every, outbound: k % 2 == 0, tcp: None, port: 1000 };
            g.send(&s, true);
        }
        assert_eq!(g.holds, 1, "only the first packet waits (for its new lease)");
        let periods = (count * every).div_ceil(super::PERIOD_MS);
        assert!(
            (periods..=periods + 1).contains(&g.committed.lives),
            "{} lives stored over {periods} periods",
            g.committed.lives
        );
    }
}
