//! The store's writer thread: the event loop submits jobs without blocking and is woken
//! through its `mio::Waker` when results are ready.

use super::{Change, HistoryRow, Store};
use log::{error, info, warn};
use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

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
    /// Every `Apply` job up to and including `seq` is durable (except those answered
    /// `Failed`, which always arrive before the `Committed` that follows them).
    Committed {
        /// The highest `seq` of the committed group.
        seq: u64,
    },
    /// This job's changes were NOT stored (the whole group's transaction was rolled back;
    /// every job of the group gets its own `Failed`). Changes are idempotent: resubmitting
    /// them is safe.
    Failed {
        /// The failed job's `seq`.
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
    let mut applies: Vec<(u64, Vec<Change>)> = Vec::new();
    let mut queries: Vec<Job> = Vec::new();
    while let Ok(first) = jobs.recv() {
        let mut changes = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Apply { seq, changes: c } => {
                    changes += c.len();
                    applies.push((seq, c));
                }
                query => queries.push(query),
            }
            if changes < MAX_BATCH_CHANGES {
                match jobs.try_recv() {
                    Ok(job) => next = Some(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
                }
            }
        }
        if !applies.is_empty() {
            match store.apply_all(applies.iter().flat_map(|(_, c)| c.iter())) {
                Ok(()) => {
                    let seq = applies.iter().map(|(s, _)| *s).max().unwrap_or_default();
                    send(Done::Committed { seq });
                }
                Err(e) => {
                    let error = e.to_string();
                    error!("lease store: {} change(s) not stored: {error}", changes);
                    for (seq, _) in &applies {
                        send(Done::Failed { seq: *seq, error: error.clone() });
                    }
                }
            }
            applies.clear();
            wake();
        }
        if !queries.is_empty() {
            for query in queries.drain(..) {
                answer(&mut store, query, &send);
            }
            wake();
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
