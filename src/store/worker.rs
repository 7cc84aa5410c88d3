//! The store's writer thread: the event loop submits jobs without blocking and is woken
//! through its `mio::Waker` when results are ready.
//!
//! A group that fails (a full disk, an I/O error) is not dropped: the thread keeps it and
//! tries it again with a backoff (50 ms doubling to [`MAX_BACKOFF`]), and every job that
//! comes later waits behind it. So `Committed { seq }`, the durable watermark, never passes
//! a change that is not on disk, and when the disk can be written again everything is
//! stored by itself, in order. Each failed attempt is reported (`Failed`); what to tell the
//! clients meanwhile is the event loop's business (see `gateway::durable`).

use super::{Change, HistoryRow, Store};
use log::{error, info, warn};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// At most this many changes go into one transaction; a longer queue is committed in several
/// (bounds the latency of the first job and the memory of one transaction).
const MAX_BATCH_CHANGES: usize = 65_536;

/// Work for the store thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Apply these changes durably. `seq` must increase from job to job: the answer for a
    /// group of jobs is one [`Done::Committed`] with the highest `seq` of the group.
    Apply {
        /// The caller's sequence number.
        seq: u64,
        /// The changes, in order.
        changes: Vec<Change>,
    },
    /// [`Store::who_was`]; answered with [`Done::WhoWas`] (or [`Done::QueryFailed`]).
    WhoWas {
        /// The caller's token, echoed in the answer.
        token: u64,
        /// The virtual address asked about.
        virtual_addr: IpAddr,
        /// The partner asking.
        partner: IpAddr,
        /// The moment asked about.
        at: SystemTime,
    },
    /// [`Store::history`]; answered with [`Done::History`] (or [`Done::QueryFailed`]).
    History {
        /// The caller's token, echoed in the answer.
        token: u64,
        /// Only this virtual address.
        virtual_addr: Option<IpAddr>,
        /// Only rows current at this moment.
        at: Option<SystemTime>,
        /// At most this many rows.
        limit: usize,
    },
    /// [`Store::purge_history`]; not answered (the result is logged).
    Purge {
        /// Delete closed rows that ended before this.
        ended_before: SystemTime,
    },
}

/// A result from the store thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Every `Apply` job up to and including `seq` is durable.
    Committed {
        /// The highest `seq` of the committed group.
        seq: u64,
    },
    /// An attempt to store a group failed (its transaction was rolled back): the worker
    /// keeps the group and retries it, first after 50 ms, then doubling up to
    /// [`MAX_BACKOFF`], with every later job queued behind it, so no `Committed` covers
    /// `seq` before its changes are on disk. Sent once per failed attempt. Only when the
    /// event loop hung up (shutdown) and a few more attempts failed are the changes given
    /// up: then every job of the group gets a last `Failed` of its own.
    Failed {
        /// The first `seq` of the failing group.
        seq: u64,
        /// What went wrong, for the log.
        error: String,
    },
    /// The answer to [`Job::WhoWas`].
    WhoWas {
        /// The job's token.
        token: u64,
        /// The real address, if a lease held the virtual address for that partner then.
        real: Option<IpAddr>,
    },
    /// The answer to [`Job::History`].
    History {
        /// The job's token.
        token: u64,
        /// Newest first.
        rows: Vec<HistoryRow>,
    },
    /// A query job failed.
    QueryFailed {
        /// The job's token.
        token: u64,
        /// What went wrong, for the log.
        error: String,
    },
}

/// Owns the [`Store`] on its own thread; see the module docs for the protocol.
#[derive(Debug)]
pub struct StoreWorker {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

impl StoreWorker {
    /// Moves `store` to a new thread named `vipgate-store`; `waker` is woken whenever
    /// results are ready to be taken with [`StoreWorker::try_done`].
    ///
    /// # Panics
    /// If the operating system cannot start a thread (see [`StoreWorker::try_spawn`]).
    pub fn spawn(store: Store, waker: Arc<mio::Waker>) -> StoreWorker {
        match Self::try_spawn(store, waker) {
            Ok(worker) => worker,
            Err(e) => panic!("cannot start the lease store thread: {e}"),
        }
    }

    /// [`StoreWorker::spawn`], returning the error if the thread cannot be started.
    pub fn try_spawn(store: Store, waker: Arc<mio::Waker>) -> std::io::Result<StoreWorker> {
        let (job_tx, job_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vipgate-store".into())
            .spawn(move || run(store, job_rx, done_tx, waker))?;
        Ok(StoreWorker { jobs: Some(job_tx), done: done_rx, thread: Some(thread) })
    }

    /// Queues a job; never blocks. If the store thread has died (see
    /// [`StoreWorker::is_alive`]) the job is dropped and never answered.
    pub fn submit(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            if jobs.send(job).is_err() {
                error!("the lease store thread is gone; a store job was dropped");
            }
        }
    }

    /// Takes the next result, if one is ready; never blocks.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// Whether the store thread still runs (it only stops after [`StoreWorker::shutdown`] or
    /// if it panicked).
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Finishes every queued job, joins the thread and returns the results not yet taken.
    pub fn finish(mut self) -> Vec<Done> {
        self.stop();
        self.done.try_iter().collect()
    }

    /// Finishes every queued job and joins the thread. Results not yet taken are dropped
    /// (failures among them are logged); use [`StoreWorker::finish`] to see them.
    pub fn shutdown(self) {
        for done in self.finish() {
            if let Done::Failed { seq, error } = done {
                error!("lease store: changes of job {seq} were not stored: {error}");
            }
        }
    }

    fn stop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the lease store thread panicked");
            }
        }
    }
}

impl Drop for StoreWorker {
    /// Like [`StoreWorker::shutdown`]: queued jobs are finished before the thread ends.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Retries of a failing group start this far apart and double up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two attempts at a failing group: how soon after the disk can be
/// written again the changes are stored.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Attempts at a failing group after the event loop hung up (shutdown), before its changes
/// are given up (and reported `Failed` one last time).
const ATTEMPTS_AT_SHUTDOWN: u32 = 3;

fn run(mut store: Store, jobs: Receiver<Job>, done: Sender<Done>, waker: Arc<mio::Waker>) {
    let wake = || {
        if let Err(e) = waker.wake() {
            warn!("lease store: cannot wake the event loop: {e}");
        }
    };
    // Results go to a receiver that may already be gone at shutdown: ignore send errors.
    let send = |d: Done| {
        let _ = done.send(d);
    };
    // The group being written: kept across failed attempts, so nothing after it can be
    // reported durable before it is.
    let mut applies: Vec<(u64, Vec<Change>)> = Vec::new();
    let mut changes = 0;
    let mut queries: Vec<Job> = Vec::new();
    // Jobs received while waiting to retry, in order; they join the next groups.
    let mut behind: VecDeque<Job> = VecDeque::new();
    let mut backoff: Option<Duration> = None;
    let mut failing_since: Option<Instant> = None;
    let mut hung_up = false;
    let mut attempts_after_hang_up = 0;
    loop {
        if let Some(wait) = backoff {
            let until = Instant::now() + wait;
            if hung_up {
                std::thread::sleep(wait);
            }
            while !hung_up {
                let left = until.saturating_duration_since(Instant::now());
                match jobs.recv_timeout(left) {
                    Ok(job) => behind.push_back(job),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => hung_up = true,
                }
            }
        } else if behind.is_empty() && !hung_up {
            match jobs.recv() {
                Ok(job) => behind.push_back(job),
                Err(_) => hung_up = true,
            }
        }
        while changes < MAX_BATCH_CHANGES {
            let job = match behind.pop_front() {
                Some(job) => job,
                None if hung_up => break,
                None => match jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        hung_up = true;
                        break;
                    }
                },
            };
            match job {
                Job::Apply { seq, changes: c } => {
                    changes += c.len();
                    applies.push((seq, c));
                }
                query => queries.push(query),
            }
        }
        if !applies.is_empty() {
            match store.apply_all(applies.iter().flat_map(|(_, c)| c.iter())) {
                Ok(()) => {
                    let seq = applies.iter().map(|(s, _)| *s).max().unwrap_or_default();
                    if let Some(t) = failing_since.take() {
                        info!(
                            "lease store: writing again; the {changes} change(s) held since the \
                             first failure {:.1} s ago are stored",
                            t.elapsed().as_secs_f64()
                        );
                    }
                    send(Done::Committed { seq });
                    applies.clear();
                    changes = 0;
                    backoff = None;
                }
                Err(e) => {
                    let error = e.to_string();
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        error!(
                            "lease store: {changes} change(s) not stored: {error}; retrying \
                             (later changes wait behind them)"
                        );
                    }
                    let first = applies.first().map_or(0, |(s, _)| *s);
                    send(Done::Failed { seq: first, error: error.clone() });
                    backoff = Some(backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF)));
                    if hung_up {
                        attempts_after_hang_up += 1;
                        if attempts_after_hang_up >= ATTEMPTS_AT_SHUTDOWN {
                            error!(
                                "lease store: shutting down with {changes} change(s) not \
                                 stored: {error}"
                            );
                            for (seq, _) in &applies {
                                send(Done::Failed { seq: *seq, error: error.clone() });
                            }
                            applies.clear();
                            changes = 0;
                            backoff = None;
                        }
                    }
                }
            }
            wake();
        }
        if !queries.is_empty() {
            for query in queries.drain(..) {
                answer(&mut store, query, &send);
            }
            wake();
        }
        if hung_up && applies.is_empty() && behind.is_empty() {
            break;
        }
    }
}

fn answer(store: &mut Store, query: Job, send: &impl Fn(Done)) {
    match query {
        Job::WhoWas { token, virtual_addr, partner, at } => {
            send(match store.who_was(virtual_addr, partner, at) {
                Ok(real) => Done::WhoWas { token, real },
                Err(e) => Done::QueryFailed { token, error: e.to_string() },
            })
        }
        Job::History { token, virtual_addr, at, limit } => {
            send(match store.history(virtual_addr, at, limit) {
                Ok(rows) => Done::History { token, rows },
                Err(e) => Done::QueryFailed { token, error: e.to_string() },
            })
        }
        Job::Purge { ended_before } => match store.purge_history(ended_before) {
            Ok(n) => info!("lease store: purged {n} history row(s)"),
            Err(e) => error!("lease store: history purge failed: {e}"),
        },
        Job::Apply { .. } => unreachable!("apply jobs are grouped, not answered as queries"),
    }
}
