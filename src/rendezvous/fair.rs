//! Fair shares of the rendezvous server's tables, without I/O: no source (an IPv4 address,
//! an IPv6 /64: [`RateLimiter::source_key`]) may take what every client needs.
//!
//! - [`SourceCount`]: how many slots of a table (TLS connections, STUN-over-TCP connections)
//!   each source holds, and the cap on it.
//! - [`FairQueue`]: the queue of password checks, with a per-source share and round-robin
//!   service, so a source that keeps its share full delays another source's login by at most
//!   one check per busy source.

use crate::authority::RateLimiter;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// Slots of one table held per source, each source at most `cap`.
#[derive(Debug)]
pub struct SourceCount {
    cap: usize,
    held: HashMap<IpAddr, usize>,
}

impl SourceCount {
    /// Counts with a cap of `cap` slots per source (0 is taken as 1).
    pub fn new(cap: usize) -> SourceCount {
        SourceCount { cap: cap.max(1), held: HashMap::new() }
    }

    /// Takes a slot for `src`; false (nothing taken) when its source holds `cap` already.
    pub fn admit(&mut self, src: IpAddr) -> bool {
        let n = self.held.entry(RateLimiter::source_key(src)).or_insert(0);
        if *n >= self.cap {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a slot [`SourceCount::admit`] took for `src`.
    pub fn release(&mut self, src: IpAddr) {
        let key = RateLimiter::source_key(src);
        if let Some(n) = self.held.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&key);
            }
        }
    }

    /// Slots the source of `src` holds.
    pub fn held(&self, src: IpAddr) -> usize {
        self.held.get(&RateLimiter::source_key(src)).copied().unwrap_or(0)
    }

    /// Sources holding a slot.
    #[cfg(test)]
    pub fn sources(&self) -> usize {
        self.held.len()
    }
}

/// Why [`FairQueue::push`] refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source holds its share already.
    SourceShare,
    /// The whole queue is full.
    Full,
}

/// A queue of jobs served round-robin by source. A job counts against its source's share
/// from [`FairQueue::push`] until [`FairQueue::finished`] (so also while it runs).
#[derive(Debug)]
pub struct FairQueue<T> {
    total: usize,
    /// Jobs held (queued or running) in all.
    held: usize,
    counts: SourceCount,
    waiting: HashMap<IpAddr, VecDeque<T>>,
    /// Sources with a waiting job, in service order.
    turn: VecDeque<IpAddr>,
}

impl<T> FairQueue<T> {
    /// A queue of at most `total` jobs, at most `per_source` of them from one source.
    pub fn new(total: usize, per_source: usize) -> FairQueue<T> {
        FairQueue {
            total: total.max(1),
            held: 0,
            counts: SourceCount::new(per_source),
            waiting: HashMap::new(),
            turn: VecDeque::new(),
        }
    }

    /// Queues `job` of `src`, or gives it back with the reason.
    pub fn push(&mut self, src: IpAddr, job: T) -> Result<(), (T, Refusal)> {
        if self.counts.held(src) >= self.counts.cap {
            return Err((job, Refusal::SourceShare));
        }
        if self.held >= self.total {
            return Err((job, Refusal::Full));
        }
        self.counts.admit(src);
        self.held += 1;
        let key = RateLimiter::source_key(src);
        let q = self.waiting.entry(key).or_default();
        if q.is_empty() {
            self.turn.push_back(key);
        }
        q.push_back(job);
        Ok(())
    }

    /// The next job to run: the oldest of the source whose turn it is.
    pub fn pop(&mut self) -> Option<(IpAddr, T)> {
        let key = self.turn.pop_front()?;
        let q = self.waiting.get_mut(&key)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            self.waiting.remove(&key);
        } else {
            self.turn.push_back(key);
        }
        Some((key, job))
    }

    /// A job of `src` that [`FairQueue::pop`] handed out is done: its share is free again.
    pub fn finished(&mut self, src: IpAddr) {
        if self.counts.held(src) > 0 {
            self.counts.release(src);
            self.held -= 1;
        }
    }

    /// Jobs held, queued or running.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.held
    }

    /// Whether no job is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_capped_per_ipv4_address_and_per_ipv6_slash_64() {
        let mut c = SourceCount::new(2);
        assert!(c.admit(ip("203.0.113.20")));
        assert!(c.admit(ip("::ffff:203.0.113.20")), "a mapped address is the same source");
        assert!(!c.admit(ip("203.0.113.20")));
        assert!(c.admit(ip("203.0.113.21")), "another address has its own share");
        assert!(c.admit(ip("2001:db8:1:2::a")));
        assert!(c.admit(ip("2001:db8:1:2:ffff::b")));
        assert!(!c.admit(ip("2001:db8:1:2::c")), "one /64 is one source");
        assert!(c.admit(ip("2001:db8:1:3::a")), "the next /64 is another");
        c.release(ip("2001:db8:1:2::a"));
        assert!(c.admit(ip("2001:db8:1:2::d")));
        c.release(ip("203.0.113.20"));
        c.release(ip("203.0.113.20"));
        c.release(ip("203.0.113.20")); // one too many: ignored
        assert_eq!(c.held(ip("203.0.113.20")), 0);
        assert_eq!(c.sources(), 3);
    }

    #[test]
    fn the_queue_serves_sources_in_turn_and_caps_each_share() {
        let mut q = FairQueue::new(8, 3);
        let (f, g) = (ip("203.0.113.20"), ip("203.0.113.30"));
        for i in 0..3 {
            q.push(f, i).unwrap();
        }
        assert_eq!(q.push(f, 3), Err((3, Refusal::SourceShare)));
        q.push(g, 100).unwrap();
        // g waits behind one job of f, not behind all three.
        assert_eq!(q.pop(), Some((f, 0)));
        assert_eq!(q.pop(), Some((g, 100)));
        assert_eq!(q.pop(), Some((f, 1)));
        // A running job still counts against the share until it is finished.
        assert_eq!(q.push(f, 4), Err((4, Refusal::SourceShare)));
        q.finished(f);
        q.push(f, 4).unwrap();
        assert_eq!(q.pop(), Some((f, 2)));
        assert_eq!(q.pop(), Some((f, 4)));
        assert_eq!(q.pop(), None);
        for s in [f, g, f, f] {
            q.finished(s);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn the_whole_queue_has_a_cap_too() {
        let mut q = FairQueue::new(4, 2);
        for k in 0..4u8 {
            q.push(IpAddr::from([198, 18, 0, k / 2]), k).unwrap();
        }
        assert_eq!(q.push(ip("198.18.0.9"), 9), Err((9, Refusal::Full)));
        assert_eq!(q.len(), 4);
    }
}
