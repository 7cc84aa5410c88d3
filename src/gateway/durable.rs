//! The gateway's durable state: the lease store behind its writer thread, the translation
//! between the translator's monotonic clock and wall-clock time, and the packets held until
//! their lease is durable.
//!
//! Every lease event of a turn of the loop becomes one `Job::Apply` (group commit); when the
//! worker reports `Committed { seq }`, the translator learns that everything up to `seq` is
//! durable and the held packets are translated again.
//!
//! # When the store cannot write (a full disk, an I/O error)
//! Nothing is acknowledged that is not on disk, and the daemon recovers by itself:
//! - The writer keeps the failed group and retries it (50 ms, doubling to 1 s), every later
//!   group queued behind it ([`crate::store::StoreWorker`]). `Committed { seq }` is the
//!   durable watermark and never passes a change that was not written, so the replies and
//!   held packets waiting for it keep waiting.
//! - After [`STORE_PATIENCE`] of failing, the loop gives up on what waits
//!   ([`Durable::give_up_due`]): every rent, renew and release waiting for a commit is
//!   answered `internal`; the leases not durable yet are ended in the translator, without
//!   quarantine ([`crate::nat::Translator::abandon_undurable`]; their `Ended` events queue
//!   behind the failed group, so the store writes them as ends once it can); the held
//!   packets are dropped and counted (`held_unstored`). While it stays stuck, new rents,
//!   renews and releases are answered `internal` at once (counted, `store_refused`), no
//!   new lease is made (packets that need one are dropped as `store_failing`) and no packet
//!   is held.
//! - The first `Committed` after that ends it: everything is back to normal, no restart.
//!
//! What is held stays bounded meanwhile: at most [`MAX_HELD`] packets and [`MAX_HELD_BYTES`]
//! bytes; and the changes queued behind the failed group grow only by what the leases that
//! already exist produce (their ends and lives), since no lease is made while stuck.

use crate::nat::{EndReason, LeaseEvent, Origin, Translator};
use crate::store::{Change, Done, HistoryRow, Job, LeaseRow, QuarantineRow, Store, StoreWorker};
use anyhow::{Context, Result};
use log::{info, warn};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// File name of the lease database in the state directory.
pub const DB_FILE: &str = "leases.db";
/// Most packets held at once while their leases become durable; more are dropped.
pub const MAX_HELD: usize = 4096;
/// Most bytes of held packets at once; more are dropped.
pub const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;
/// How long the store may fail to write before what waits for it is given up.
pub const STORE_PATIENCE: Duration = Duration::from_secs(3);

/// The store, the clock anchor and the held packets.
pub struct Durable {
    worker: StoreWorker,
    anchor: (Instant, SystemTime),
    batch: Vec<Change>,
    batch_seq: u64,
    held: VecDeque<Vec<u8>>,
    held_bytes: usize,
    /// Commits that failed.
    pub commit_failures: u64,
    /// Held packets dropped because the store could not write their lease.
    pub held_unstored: u64,
    /// Requests answered `internal` because the store could not write.
    pub store_refused: u64,
    /// Since when the store fails (the first failed attempt since the last commit).
    failing_since: Option<Instant>,
    /// The loop gave up waiting for the store: see the module docs.
    stuck: bool,
    next_token: u64,
}

impl Durable {
    /// Opens the store in `state_dir`, starts its writer, and puts its leases and quarantine
    /// back into `nat`. Refuses with a clear error on a locked or damaged database.
    pub fn open(state_dir: &Path, waker: Arc<mio::Waker>, nat: &mut Translator) -> Result<Durable> {
        let path = state_dir.join(DB_FILE);
        let store = Store::open(&path)?;
        let (wall, now) = (SystemTime::now(), Instant::now());
        let (leases, quarantine) = store.load(wall).context("cannot read the lease database")?;
        let max = nat.config().max_leases;
        if leases.len() > max {
            // Dropping the surplus would hand their addresses to other hosts while their
            // history says they are still leased (and a later start would bring them back).
            return Err(anyhow::Error::new(crate::config::Refusal(format!(
                "the lease database {} holds {} current leases, more than --max-leases {max}: \
                 start with --max-leases {} or more",
                path.display(),
                leases.len(),
                leases.len()
            ))));
        }
        let worker =
            StoreWorker::try_spawn(store, waker).context("cannot start the store writer")?;
        let mut d = Durable {
            worker,
            anchor: (now, wall),
            batch: Vec::new(),
            batch_seq: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            commit_failures: 0,
            held_unstored: 0,
            store_refused: 0,
            failing_since: None,
            stuck: false,
            next_token: 1,
        };
        let mut restored = 0;
        for row in &leases {
            let origin = if row.explicit { Origin::Explicit } else { Origin::Implicit };
            let expires = row.expires.map(|t| d.mono(t));
            match nat.restore(row.real, row.virtual_addr, row.partner, origin, expires, now) {
                Ok(_) => restored += 1,
                Err(e) => warn!(
                    "lease {} -> {} for partner {} not restored: {e}",
                    row.real, row.virtual_addr, row.partner
                ),
            }
        }
        for q in &quarantine {
            nat.restore_quarantine(q.virtual_addr, q.partner, q.real, d.mono(q.until), now);
        }
        info!(
            "lease database {}: {restored} lease(s) and {} quarantined address(es) restored",
            path.display(),
            quarantine.len()
        );
        // The restored leases were written already: their events are durable.
        while let Some((seq, _)) = nat.poll_event() {
            d.batch_seq = seq;
        }
        nat.set_durable(d.batch_seq);
        Ok(d)
    }

    /// The wall-clock time of monotonic instant `t`.
    pub fn wall(&self, t: Instant) -> SystemTime {
        let (i0, w0) = self.anchor;
        if t >= i0 {
            w0 + (t - i0)
        } else {
            w0 - (i0 - t)
        }
    }

    /// The monotonic instant of wall-clock time `t`.
    pub fn mono(&self, t: SystemTime) -> Instant {
        let (i0, w0) = self.anchor;
        match t.duration_since(w0) {
            Ok(d) => i0 + d,
            Err(e) => i0.checked_sub(e.duration()).unwrap_or(i0),
        }
    }

    /// Adds a lease event to the current batch.
    pub fn record(&mut self, seq: u64, event: &LeaseEvent, now: Instant) {
        self.batch_seq = seq;
        let row = |l: &crate::nat::Lease| LeaseRow {
            real: l.real,
            virtual_addr: l.virtual_addr,
            partner: l.partner,
            explicit: l.origin == Origin::Explicit,
            created: self.wall(l.created),
            expires: l.expires.map(|t| self.wall(t)),
        };
        let change = match event {
            LeaseEvent::Created(l) | LeaseEvent::Updated(l) => Change::Upsert(row(l)),
            LeaseEvent::Ended(l, why) => Change::End {
                real: l.real,
                partner: l.partner,
                at: self.wall(now),
                reason: match why {
                    EndReason::Expired => "expired",
                    EndReason::Idle => "idle",
                    EndReason::Released => "released",
                    EndReason::Unstored => "unstored",
                }
                .to_string(),
            },
            LeaseEvent::Lives { real, partner, until } => {
                Change::Lives { real: *real, partner: *partner, until: self.wall(*until) }
            }
            LeaseEvent::Quarantined { virtual_addr, partner, real, until } => {
                Change::Quarantine(QuarantineRow {
                    virtual_addr: *virtual_addr,
                    partner: *partner,
                    real: *real,
                    until: self.wall(*until),
                })
            }
        };
        self.batch.push(change);
    }

    /// Sends the batch to the writer (one transaction).
    pub fn flush(&mut self) {
        if !self.batch.is_empty() {
            let changes = std::mem::take(&mut self.batch);
            self.worker.submit(Job::Apply { seq: self.batch_seq, changes });
        }
    }

    /// Keeps a packet until its lease is durable; false when too many are held (the caller
    /// counts the drop).
    /// While the store is stuck the packet is dropped at once (counted as unstored).
    pub fn hold(&mut self, packet: &[u8]) -> bool {
        if self.stuck {
            self.held_unstored += 1;
            return true;
        }
        if self.held.len() >= MAX_HELD || self.held_bytes + packet.len() > MAX_HELD_BYTES {
            return false;
        }
        self.held_bytes += packet.len();
        self.held.push_back(packet.to_vec());
        true
    }

    /// Takes every held packet, oldest first.
    pub fn take_held(&mut self) -> VecDeque<Vec<u8>> {
        self.held_bytes = 0;
        std::mem::take(&mut self.held)
    }

    /// An attempt to write failed.
    pub fn failed(&mut self, now: Instant) {
        self.commit_failures += 1;
        self.failing_since.get_or_insert(now);
    }

    /// A commit went through; true when that ends a time of being stuck.
    pub fn committed(&mut self) -> bool {
        self.failing_since = None;
        std::mem::replace(&mut self.stuck, false)
    }

    /// True while the loop has given up waiting for the store (requests that need a commit
    /// are answered `internal` at once).
    pub fn stuck(&self) -> bool {
        self.stuck
    }

    /// When the loop must give up waiting, while the store fails and it has not yet.
    pub fn give_up_at(&self) -> Option<Instant> {
        self.failing_since.filter(|_| !self.stuck).map(|t| t + STORE_PATIENCE)
    }

    /// True (once) when the store has failed for [`STORE_PATIENCE`]: the caller then answers
    /// what waits `internal`, abandons the leases that are not durable and calls
    /// [`Durable::drop_held`]. From then on the store counts as stuck until the next commit.
    pub fn give_up_due(&mut self, now: Instant) -> bool {
        if self.give_up_at().is_some_and(|t| t <= now) {
            self.stuck = true;
            return true;
        }
        false
    }

    /// Drops every held packet (counted as unstored); returns how many.
    pub fn drop_held(&mut self) -> usize {
        let n = self.take_held().len();
        self.held_unstored += n as u64;
        n
    }

    /// Asks the store who was behind `virtual_addr` for `partner` at `at`; the answer comes
    /// back as `Done::WhoWas` with the returned token.
    pub fn who_was(&mut self, virtual_addr: IpAddr, partner: IpAddr, at: SystemTime) -> u64 {
        let token = self.token();
        self.worker.submit(Job::WhoWas { token, virtual_addr, partner, at });
        token
    }

    /// Asks the store for history rows; the answer comes back as `Done::History`.
    pub fn history(
        &mut self,
        virtual_addr: Option<IpAddr>,
        at: Option<SystemTime>,
        limit: usize,
    ) -> u64 {
        let token = self.token();
        self.worker.submit(Job::History { token, virtual_addr, at, limit });
        token
    }

    /// Deletes history that ended before `before`.
    pub fn purge(&mut self, before: SystemTime) {
        self.worker.submit(Job::Purge { ended_before: before });
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// The next result of the writer, if any.
    pub fn try_done(&self) -> Option<Done> {
        self.worker.try_done()
    }

    /// Finishes the queued work (the last batch included) and stops the writer.
    pub fn close(mut self) {
        self.flush();
        for done in self.worker.finish() {
            if let Done::Failed { seq, error } = done {
                warn!("lease changes up to #{seq} were not stored: {error}");
            }
        }
    }
}

/// A history row as the control socket shows it.
pub fn history_record(r: &HistoryRow) -> crate::control::HistoryRecord {
    let t = |s: SystemTime| humantime::format_rfc3339_seconds(s).to_string();
    crate::control::HistoryRecord {
        real: r.real,
        virtual_addr: r.virtual_addr,
        partner: r.partner,
        origin: if r.explicit { "explicit" } else { "implicit" }.to_string(),
        start: t(r.start),
        end: r.end.map(t),
        end_reason: r.end_reason.clone(),
    }
}
