//! The durable lease store: current leases, quarantine entries and the audit history, in an
//! embedded SQLite database (bundled SQLite, one file plus its `-wal`/`-shm` companions and a
//! `.lock` file beside it).
//!
//! # What it owns
//! - **`lease`**: the current correspondence table *(real, partner) → virtual*, what a restart
//!   restores.
//! - **`quarantine`**: addresses held back after a lease ended *(virtual, partner) → until*.
//! - **`history`**: one row per lease lifetime *(real, virtual, partner, start, end, reason)*,
//!   what [`Store::who_was`] answers an authorised inquiry from, long after the lease ended.
//!   Kept until [`Store::purge_history`] removes it (the retention policy is the caller's).
//!
//! Every commit is durable when it returns (WAL journal, `synchronous=FULL`). The file is
//! private: created mode 0600 (its directory 0700 when the store creates it), and only one
//! process uses it at a time: [`Store::open`] takes an exclusive `flock` on `<file>.lock` and
//! a second daemon gets [`StoreError::Locked`]. A file that exists but is not a sound vipgate
//! database (garbage, torn, truncated to nothing, failing `PRAGMA quick_check`, another
//! program's database) is refused with [`StoreError::Corrupt`] and left untouched: the store
//! never silently starts empty over lost leases.
//!
//! # How to drive it
//! The daemon's event loop must never wait on the disk, so it talks to a [`StoreWorker`]:
//! ```no_run
//! use std::sync::Arc;
//! use std::time::SystemTime;
//! use vipgate::store::{Change, Done, Job, Store, StoreWorker};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let poll = mio::Poll::new()?;
//! let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(99))?);
//! let store = Store::open("/var/lib/vipgate/leases.db".as_ref())?;
//! let (leases, quarantine) = store.load(SystemTime::now())?; // restore these into the core
//! # let _ = (leases, quarantine);
//! let worker = StoreWorker::spawn(store, waker);
//! // For each batch of lease events of one loop turn:
//! let changes: Vec<Change> = Vec::new();
//! worker.submit(Job::Apply { seq: 1, changes });
//! // When the waker's token fires:
//! while let Some(done) = worker.try_done() {
//!     match done {
//!         Done::Committed { seq } => { /* everything submitted up to `seq` is on disk */ let _ = seq; }
//!         Done::Failed { seq, error } => { /* not stored yet: the worker retries it */ let _ = (seq, error); }
//!         _ => { /* answers to WhoWas / History queries, by token */ }
//!     }
//! }
//! worker.shutdown(); // finishes the queue, joins the thread
//! # Ok(()) }
//! ```
//! The worker groups every `Apply` job queued while it was busy into one transaction (group
//! commit): one `fsync` for many rents. A group that fails (say, the disk is full) is kept
//! and retried with a backoff, later jobs queued behind it, so `Committed` never covers a
//! change that is not on disk and the worker recovers by itself once the disk can be
//! written again (all changes are idempotent, so a retry is safe).
//!
//! # Times and addresses
//! Times are stored as integer Unix milliseconds (sub-millisecond parts are dropped),
//! addresses as their canonical text (`IpAddr`'s `Display`), so `sqlite3 -readonly` shows an
//! operator readable rows.

mod worker;

#[cfg(test)]
mod tests;

pub use worker::{Done, Job, StoreWorker};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// The `end_reason` the store itself writes when an upsert moves a (real, partner) pair to a
/// different virtual address, closing the previous history row.
pub const REASON_REPLACED: &str = "replaced";
/// The `end_reason` [`Store::load`] writes for leases that expired while nobody ran.
pub const REASON_EXPIRED: &str = "expired";

/// How long [`Store::open`] waits for the lock before it answers [`StoreError::Locked`].
pub const LOCK_PATIENCE: Duration = Duration::from_millis(250);

/// How long a statement waits for a lock held by a foreign reader (e.g. `sqlite3`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(1);

const SCHEMA_V1: &str = "
CREATE TABLE lease (
    real_addr    TEXT NOT NULL,
    partner_addr TEXT NOT NULL,
    virtual_addr TEXT NOT NULL,
    explicit     INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER,
    PRIMARY KEY (real_addr, partner_addr)
) STRICT, WITHOUT ROWID;

CREATE TABLE quarantine (
    virtual_addr TEXT NOT NULL,
    partner_addr TEXT NOT NULL, -- '' = against every partner
    real_addr    TEXT NOT NULL,
    until_ms     INTEGER NOT NULL,
    PRIMARY KEY (virtual_addr, partner_addr)
) STRICT, WITHOUT ROWID;
CREATE INDEX quarantine_until ON quarantine (until_ms);

CREATE TABLE history (
    id           INTEGER PRIMARY KEY,
    real_addr    TEXT NOT NULL,
    virtual_addr TEXT NOT NULL,
    partner_addr TEXT NOT NULL,
    explicit     INTEGER NOT NULL,
    started_ms   INTEGER NOT NULL,
    ended_ms     INTEGER,
    end_reason   TEXT
) STRICT;
-- who_was: (virtual, partner) at a moment.
CREATE INDEX history_who ON history (virtual_addr, partner_addr, started_ms);
-- the open row of a lease, found by the lease's key; at most one.
CREATE UNIQUE INDEX history_open ON history (real_addr, partner_addr) WHERE ended_ms IS NULL;
-- (newest first is by id, the insertion order; one virtual address uses history_who:
-- every index here is paid by every rent, so there are no more than the queries need.)
-- retention.
CREATE INDEX history_ended ON history (ended_ms) WHERE ended_ms IS NOT NULL;
";

/// What a database file holds: the schema a new file gets, its version, and the table that
/// tells a file of this kind from another vipgate database.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schema {
    /// The statements that create a fresh database.
    pub sql: &'static str,
    /// `PRAGMA user_version` of this build.
    pub version: i64,
    /// A table every database of this kind has.
    pub marker_table: &'static str,
    /// What the file is, for errors ("vipgate lease database").
    pub kind: &'static str,
}

const LEASES: Schema = Schema {
    sql: SCHEMA_V1,
    version: SCHEMA_VERSION,
    marker_table: "lease",
    kind: "vipgate lease database",
};

/// A current lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The host's real address.
    pub real: IpAddr,
    /// The virtual address rented to it.
    pub virtual_addr: IpAddr,
    /// The partner the lease is for.
    pub partner: IpAddr,
    /// Rented explicitly (`true`) or made implicitly by the gateway (`false`).
    pub explicit: bool,
    /// When the lease was made (millisecond precision once stored).
    pub created: SystemTime,
    /// When it ends, if known: an explicit lease's TTL; for an implicit lease, the life its
    /// flows were last checkpointed with ([`Change::Lives`]; none before the first).
    pub expires: Option<SystemTime>,
}

/// An address held back after its lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRow {
    /// The quarantined virtual address.
    pub virtual_addr: IpAddr,
    /// The partner it is held back from; `None`: from every partner (per-host mapping).
    pub partner: Option<IpAddr>,
    /// The host that had it (it may have it back at once).
    pub real: IpAddr,
    /// When the quarantine ends.
    pub until: SystemTime,
}

/// One lease lifetime in the audit history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    /// The host's real address.
    pub real: IpAddr,
    /// The virtual address it had.
    pub virtual_addr: IpAddr,
    /// The partner the lease was for.
    pub partner: IpAddr,
    /// Whether the lease was (or became) explicit.
    pub explicit: bool,
    /// When the lease began.
    pub start: SystemTime,
    /// When it ended; `None` while it is current.
    pub end: Option<SystemTime>,
    /// Why it ended (the caller's reason, or [`REASON_REPLACED`] / [`REASON_EXPIRED`]).
    pub end_reason: Option<String>,
}

/// One change to apply; a slice of them is applied atomically by [`Store::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A lease was created or updated (key: `real` + `partner`). Opens a history row
    /// starting at `created` unless one is open for (real, virtual, partner); if the open row
    /// has another virtual address, that row is closed (reason [`REASON_REPLACED`]) first.
    /// Becoming explicit marks the open history row explicit.
    Upsert(LeaseRow),
    /// A lease ended: the current lease (real, partner) is deleted and its open history row
    /// closed with `end = at` and `end_reason = reason`. Also drops quarantine entries whose
    /// `until` is not after `at` (they are over). Ending a lease the store does not have is a
    /// no-op.
    End {
        /// The host's real address.
        real: IpAddr,
        /// The partner.
        partner: IpAddr,
        /// When it ended.
        at: SystemTime,
        /// Why (e.g. `expired`, `idle`, `released`).
        reason: String,
    },
    /// An implicit lease lives at least until `until` (its checkpointed life, which a restart
    /// gives it back as its expiry). A lease the store does not have, or an explicit one
    /// (which lives by its TTL), is left alone.
    Lives {
        /// The host's real address.
        real: IpAddr,
        /// The partner.
        partner: IpAddr,
        /// The lease lives at least until then.
        until: SystemTime,
    },
    /// A quarantine entry was set (key: virtual + partner; replaces an earlier one).
    Quarantine(QuarantineRow),
}

/// Why the store failed; every message names the file and says what a person can do. The
/// underlying error is part of the message (not a `source()`), so `{:#}` prints it once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (or another `Store` in this one) has the database open.
    #[error(
        "the database {} is locked by another process (is another vipgate running?)",
        .0.display()
    )]
    Locked(PathBuf),
    /// The file exists but is not a sound vipgate database (not a database, malformed,
    /// failed the integrity check, truncated, or another program's). It was not modified.
    #[error(
        "the database {} is damaged ({}): move it away to start empty, or restore a backup",
        .0.display(),
        .1
    )]
    Corrupt(PathBuf, String),
    /// The database was written by a newer vipgate with a schema this build does not know.
    #[error(
        "the database {} has schema version {found}, newer than this vipgate knows \
         ({supported}): run the newer vipgate, or restore a backup made by this version",
        path.display()
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A file-system operation on the database, its directory or its lock file failed.
    #[error(
        "cannot use the database file {}: {} (check the path, its permissions and free \
         disk space)",
        .0.display(),
        .1
    )]
    Io(PathBuf, io::Error),
    /// SQLite reported an error (e.g. disk full, I/O error) on the database.
    #[error("the database {} failed: {}", .0.display(), .1)]
    Sqlite(PathBuf, rusqlite::Error),
}

/// The durable lease store: one SQLite connection, exclusively owned. See the module docs.
pub struct Store {
    // Field order matters: the connection closes before the lock is released.
    conn: Connection,
    path: PathBuf,
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

/// `<path><suffix>`, e.g. `leases.db.lock`.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl Store {
    /// Opens (or creates) the lease database at `path`.
    ///
    /// Creates a missing parent directory (mode 0700) and a missing database (mode 0600,
    /// schema written to `<path>.new`, synced, then renamed into place, so a file at `path`
    /// is always a complete database). Takes an exclusive `flock` on `<path>.lock` first, so
    /// a second opener, in this process or another, gets [`StoreError::Locked`] (after
    /// waiting [`LOCK_PATIENCE`]).
    /// Then runs `PRAGMA quick_check` (reads the whole file: large stores take a moment),
    /// checks the schema version, and sets WAL mode with `synchronous=FULL`. An existing file
    /// with group/other permission bits is narrowed to 0600.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let (conn, path, lock) = open_database(path, &LEASES)?;
        Ok(Store { conn, path, _lock: lock })
    }

    /// The database file this store uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        sql_error(&self.path, e)
    }

    /// The current leases and quarantine entries, to restore into the translator.
    ///
    /// Only leases with no expiry or one after `now`, and quarantine entries whose `until`
    /// is after `now`. Leases that expired while nobody ran are retired here, in one
    /// transaction: deleted, and their history rows closed at their expiry time with reason
    /// [`REASON_EXPIRED`] (so `who_was` does not claim they lasted forever); quarantine
    /// entries that are over are deleted.
    pub fn load(&self, now: SystemTime) -> Result<(Vec<LeaseRow>, Vec<QuarantineRow>), StoreError> {
        let now_ms = to_ms(now);
        let run = || -> rusqlite::Result<(Vec<LeaseRow>, Vec<QuarantineRow>)> {
            let tx = self.conn.unchecked_transaction()?;
            tx.execute(
                "UPDATE history SET ended_ms = (
                     SELECT l.expires_ms FROM lease l
                     WHERE l.real_addr = history.real_addr AND l.partner_addr = history.partner_addr),
                   end_reason = ?2
                 WHERE ended_ms IS NULL AND EXISTS (
                     SELECT 1 FROM lease l
                     WHERE l.real_addr = history.real_addr AND l.partner_addr = history.partner_addr
                       AND l.expires_ms <= ?1)",
                params![now_ms, REASON_EXPIRED],
            )?;
            tx.execute("DELETE FROM lease WHERE expires_ms <= ?1", [now_ms])?;
            tx.execute("DELETE FROM quarantine WHERE until_ms <= ?1", [now_ms])?;
            let leases = {
                let mut stmt = tx.prepare(
                    "SELECT real_addr, virtual_addr, partner_addr, explicit, created_ms, expires_ms
                     FROM lease ORDER BY created_ms, real_addr, partner_addr",
                )?;
                let rows = stmt.query_map([], |row| {
                    Ok(LeaseRow {
                        real: ip(row, 0)?,
                        virtual_addr: ip(row, 1)?,
                        partner: ip(row, 2)?,
                        explicit: row.get(3)?,
                        created: from_ms(row.get(4)?),
                        expires: row.get::<_, Option<i64>>(5)?.map(from_ms),
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let quarantine = {
                let mut stmt = tx.prepare(
                    "SELECT virtual_addr, partner_addr, real_addr, until_ms
                     FROM quarantine ORDER BY until_ms, virtual_addr, partner_addr",
                )?;
                let rows = stmt.query_map([], |row| {
                    let partner: String = row.get(1)?;
                    Ok(QuarantineRow {
                        virtual_addr: ip(row, 0)?,
                        partner: if partner.is_empty() {
                            None
                        } else {
                            Some(parse_ip(&partner, 1)?)
                        },
                        real: ip(row, 2)?,
                        until: from_ms(row.get(3)?),
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.commit()?;
            Ok((leases, quarantine))
        };
        run().map_err(|e| self.err(e))
    }

    /// Applies `changes` in order, as ONE transaction: all of them are durable when this
    /// returns `Ok`, none of them on `Err`.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        self.apply_all(changes.iter())
    }

    /// [`Store::apply`] over any sequence (the worker chains its jobs without copying).
    pub(crate) fn apply_all<'a, I>(&mut self, changes: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = &'a Change>,
    {
        let mut changes = changes.into_iter().peekable();
        if changes.peek().is_none() {
            return Ok(());
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut find_open = tx.prepare_cached(
                    "SELECT id, virtual_addr FROM history
                     WHERE real_addr = ?1 AND partner_addr = ?2 AND ended_ms IS NULL",
                )?;
                let mut mark_explicit = tx.prepare_cached(
                    "UPDATE history SET explicit = 1 WHERE id = ?1 AND explicit = 0",
                )?;
                let mut replace = tx.prepare_cached(
                    "UPDATE history SET ended_ms = MAX(started_ms, ?2), end_reason = ?3 WHERE id = ?1",
                )?;
                let mut open = tx.prepare_cached(
                    "INSERT INTO history (real_addr, virtual_addr, partner_addr, explicit, started_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO lease (real_addr, partner_addr, virtual_addr, explicit, created_ms, expires_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (real_addr, partner_addr) DO UPDATE SET
                       virtual_addr = excluded.virtual_addr, explicit = excluded.explicit,
                       created_ms = excluded.created_ms, expires_ms = excluded.expires_ms",
                )?;
                let mut delete = tx.prepare_cached(
                    "DELETE FROM lease WHERE real_addr = ?1 AND partner_addr = ?2",
                )?;
                let mut close = tx.prepare_cached(
                    "UPDATE history SET ended_ms = ?3, end_reason = ?4
                     WHERE real_addr = ?1 AND partner_addr = ?2 AND ended_ms IS NULL",
                )?;
                let mut quarantine = tx.prepare_cached(
                    "INSERT INTO quarantine (virtual_addr, partner_addr, real_addr, until_ms)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (virtual_addr, partner_addr) DO UPDATE SET
                       real_addr = excluded.real_addr, until_ms = excluded.until_ms",
                )?;
                let mut latest_end: Option<i64> = None;
                for change in changes {
                    match change {
                        Change::Upsert(row) => {
                            let real = row.real.to_string();
                            let partner = row.partner.to_string();
                            let virt = row.virtual_addr.to_string();
                            let created = to_ms(row.created);
                            let current: Option<(i64, String)> = find_open
                                .query_row(params![real, partner], |r| Ok((r.get(0)?, r.get(1)?)))
                                .optional()?;
                            match current {
                                Some((id, v)) if v == virt => {
                                    if row.explicit {
                                        mark_explicit.execute([id])?;
                                    }
                                }
                                other => {
                                    if let Some((id, _)) = other {
                                        replace.execute(params![id, created, REASON_REPLACED])?;
                                    }
                                    open.execute(params![
                                        real,
                                        virt,
                                        partner,
                                        row.explicit,
                                        created
                                    ])?;
                                }
                            }
                            upsert.execute(params![
                                real,
                                partner,
                                virt,
                                row.explicit,
                                created,
                                row.expires.map(to_ms)
                            ])?;
                        }
                        Change::End { real, partner, at, reason } => {
                            let (real, partner, at) =
                                (real.to_string(), partner.to_string(), to_ms(*at));
                            delete.execute(params![real, partner])?;
                            close.execute(params![real, partner, at, reason])?;
                            latest_end = Some(latest_end.map_or(at, |l| l.max(at)));
                        }
                        Change::Lives { real, partner, until } => {
                            tx.prepare_cached(
                                "UPDATE lease SET expires_ms = ?3
                                 WHERE real_addr = ?1 AND partner_addr = ?2 AND explicit = 0",
                            )?
                            .execute(params![
                                real.to_string(),
                                partner.to_string(),
                                to_ms(*until)
                            ])?;
                        }
                        Change::Quarantine(q) => {
                            let partner = q.partner.map(|p| p.to_string()).unwrap_or_default();
                            quarantine.execute(params![
                                q.virtual_addr.to_string(),
                                partner,
                                q.real.to_string(),
                                to_ms(q.until)
                            ])?;
                        }
                    }
                }
                if let Some(at) = latest_end {
                    tx.prepare_cached("DELETE FROM quarantine WHERE until_ms <= ?1")?
                        .execute([at])?;
                }
            }
            tx.commit()
        })();
        result.map_err(|e| self.err(e))
    }

    /// The real address that was behind `virtual_addr` for `partner` at `at`: the history
    /// row for (virtual, partner) with the latest start not after `at`, if it had not ended
    /// by then (`start <= at < end`). One index probe.
    pub fn who_was(
        &self,
        virtual_addr: IpAddr,
        partner: IpAddr,
        at: SystemTime,
    ) -> Result<Option<IpAddr>, StoreError> {
        let at_ms = to_ms(at);
        let run = || -> rusqlite::Result<Option<IpAddr>> {
            let mut stmt = self.conn.prepare_cached(
                "SELECT real_addr, ended_ms FROM history
                 WHERE virtual_addr = ?1 AND partner_addr = ?2 AND started_ms <= ?3
                 ORDER BY started_ms DESC, id DESC LIMIT 1",
            )?;
            let found = stmt
                .query_row(params![virtual_addr.to_string(), partner.to_string(), at_ms], |r| {
                    Ok((ip(r, 0)?, r.get::<_, Option<i64>>(1)?))
                })
                .optional()?;
            Ok(found.and_then(|(real, end)| match end {
                Some(end) if end <= at_ms => None,
                _ => Some(real),
            }))
        };
        run().map_err(|e| self.err(e))
    }

    /// History rows, newest start first, at most `limit`: all of them, or only those of
    /// `virtual_addr`, or only those current at `at` (`start <= at < end`), or both.
    pub fn history(
        &self,
        virtual_addr: Option<IpAddr>,
        at: Option<SystemTime>,
        limit: usize,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        const COLUMNS: &str =
            "SELECT real_addr, virtual_addr, partner_addr, explicit, started_ms, \
                               ended_ms, end_reason FROM history";
        const ORDER: &str = "ORDER BY id DESC LIMIT ?3";
        const AT: &str = "started_ms <= ?2 AND (ended_ms IS NULL OR ended_ms > ?2)";
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = match (virtual_addr.is_some(), at.is_some()) {
            (false, false) => format!("{COLUMNS} WHERE ?1 IS NULL AND ?2 IS NULL {ORDER}"),
            (true, false) => format!("{COLUMNS} WHERE virtual_addr = ?1 AND ?2 IS NULL {ORDER}"),
            (false, true) => format!("{COLUMNS} WHERE ?1 IS NULL AND {AT} {ORDER}"),
            (true, true) => format!("{COLUMNS} WHERE virtual_addr = ?1 AND {AT} {ORDER}"),
        };
        let run = || -> rusqlite::Result<Vec<HistoryRow>> {
            let mut stmt = self.conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![virtual_addr.map(|v| v.to_string()), at.map(to_ms), limit],
                |row| {
                    Ok(HistoryRow {
                        real: ip(row, 0)?,
                        virtual_addr: ip(row, 1)?,
                        partner: ip(row, 2)?,
                        explicit: row.get(3)?,
                        start: from_ms(row.get(4)?),
                        end: row.get::<_, Option<i64>>(5)?.map(from_ms),
                        end_reason: row.get(6)?,
                    })
                },
            )?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// Retention: deletes the closed history rows that ended before `ended_before`; returns
    /// how many. Open rows (current leases) are never purged.
    pub fn purge_history(&mut self, ended_before: SystemTime) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "DELETE FROM history WHERE ended_ms IS NOT NULL AND ended_ms < ?1",
                [to_ms(ended_before)],
            )
            .map_err(|e| self.err(e))
    }
}

/// Makes `dir` (a state or socket directory; `what` names it in the log) private to this
/// user: a missing one is created mode 0700 (missing parents too); an existing one that group
/// or others may enter is narrowed to 0700 and that is logged, when `narrow` says the
/// directory is vipgate's own. A sticky directory (`/tmp`) is shared by definition and never
/// changed; neither is a directory that is not vipgate's (only logged at debug level).
pub fn private_dir(dir: &Path, what: &str, narrow: bool) -> io::Result<()> {
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
        }
        Err(e) => return Err(e),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() || mode & 0o077 == 0 {
        return Ok(());
    }
    if !narrow || mode & 0o1000 != 0 {
        log::debug!("{what} {} has mode {mode:04o}; it is shared, left as is", dir.display());
        return Ok(());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode & !0o077))?;
    log::warn!(
        "{what} {} had mode {mode:04o} (open to group or others): narrowed to {:04o}",
        dir.display(),
        mode & !0o077
    );
    Ok(())
}

/// Opens (or creates) the database at `path` holding `schema`: the parent directory (0700)
/// and a fresh file (0600, written aside and renamed into place) when missing, the exclusive
/// `flock` on `<path>.lock`, the integrity and schema checks, WAL with `synchronous=FULL`.
/// See [`Store::open`].
pub(crate) fn open_database(
    path: &Path,
    schema: &Schema,
) -> Result<(Connection, PathBuf, File), StoreError> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        private_dir(parent, "database directory", false)
            .map_err(|e| StoreError::Io(parent.to_path_buf(), e))?;
    }
    let lock = lock(&path)?;
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => {
            if meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(|e| StoreError::Io(path.clone(), e))?;
            }
        }
        Ok(_) => {
            return Err(StoreError::Corrupt(path, "it is not a regular file".into()));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(&path, schema)?,
        Err(e) => return Err(StoreError::Io(path, e)),
    }
    // The checks run on a read-only connection: a refused file must stay byte-identical,
    // and the last read-write connection's close would checkpoint a WAL into it (and delete
    // the WAL). Only a file that passed is opened for writing.
    {
        let ro = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sql_error(&path, e))?;
        check(&ro, &path, schema)?;
        ro.close().map_err(|(_, e)| sql_error(&path, e))?;
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sql_error(&path, e))?;
    configure(&conn, &path)?;
    Ok((conn, path, lock))
}

/// Takes the exclusive `flock` on `<path>.lock`, waiting at most [`LOCK_PATIENCE`].
/// `flock` locks belong to the open file description: two opens in one process conflict
/// exactly like two processes do, and the kernel drops the lock when the last descriptor
/// closes (at the latest when the process dies). The short wait covers a child the
/// previous holder forked: it shares the description until it `exec`s (the descriptor
/// is close-on-exec), and a restart right behind a stopping daemon.
fn lock(path: &Path) -> Result<File, StoreError> {
    let lock_path = sidecar(path, ".lock");
    let file = open_lock_file(&lock_path).map_err(|e| StoreError::Io(lock_path.clone(), e))?;
    let started = Instant::now();
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if started.elapsed() < LOCK_PATIENCE => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StoreError::Locked(path.to_path_buf()));
            }
            Err(e) => return Err(StoreError::Io(lock_path, e.into())),
        }
    }
}

/// Opens (creating it, mode 0600, never truncating) a file that is only ever `flock`ed.
pub(crate) fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)
}

/// Writes a fresh database to `<path>.new` and renames it to `path`.
fn create(path: &Path, schema: &Schema) -> Result<(), StoreError> {
    let tmp = sidecar(path, ".new");
    for stale in [tmp.clone(), sidecar(&tmp, "-journal"), sidecar(&tmp, "-wal")] {
        match fs::remove_file(&stale) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(StoreError::Io(stale, e));
            }
            _ => {}
        }
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| StoreError::Io(tmp.clone(), e))?;
    {
        let conn = Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sql_error(&tmp, e))?;
        let setup = || -> rusqlite::Result<()> {
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(schema.sql)?;
            tx.pragma_update(None, "user_version", schema.version)?;
            tx.commit()
        };
        setup().map_err(|e| sql_error(&tmp, e))?;
        conn.close().map_err(|(_, e)| sql_error(&tmp, e))?;
    }
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| StoreError::Io(tmp.clone(), e))?;
    fs::rename(&tmp, path).map_err(|e| StoreError::Io(path.to_path_buf(), e))?;
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Io(parent.to_path_buf(), e))?;
    }
    Ok(())
}

/// Integrity check and version check, on a read-only connection: a file that is not ours
/// (or not sound) is refused without a byte of it, or of its WAL, changing.
fn check(conn: &Connection, path: &Path, schema: &Schema) -> Result<(), StoreError> {
    let err = |e| sql_error(path, e);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    let problems: Vec<String> = {
        let mut stmt = conn.prepare("PRAGMA quick_check(4)").map_err(err)?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0)).map_err(err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(err)?
    };
    if problems.iter().any(|p| p != "ok") {
        let found: Vec<String> = problems
            .iter()
            .flat_map(|p| p.lines())
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("***"))
            .map(String::from)
            .collect();
        let detail = format!("integrity check failed: {}", found.join("; "));
        return Err(StoreError::Corrupt(path.to_path_buf(), detail));
    }
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(err)?;
    if version == 0 {
        let detail = format!("it is empty or not a {}: no schema version", schema.kind);
        return Err(StoreError::Corrupt(path.to_path_buf(), detail));
    }
    let marked: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [schema.marker_table],
            |r| r.get(0),
        )
        .map_err(err)?;
    if !marked {
        let detail = format!("it is not a {} (no table {})", schema.kind, schema.marker_table);
        return Err(StoreError::Corrupt(path.to_path_buf(), detail));
    }
    if version > schema.version {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported: schema.version,
        });
    }
    // Migrations from older versions would run in `configure`, on the read-write
    // connection (none yet: version 1 is the first).
    Ok(())
}

/// The durable settings, on the read-write connection of a file [`check`] passed.
fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = |e| sql_error(path, e);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        let e = io::Error::other(format!("cannot switch to WAL journal mode (got {mode})"));
        return Err(StoreError::Io(path.to_path_buf(), e));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
    // After a checkpoint, a WAL grown by one huge group commit is cut back to this size.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024).map_err(err)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// Maps a SQLite error on `path` to the error a person can act on.
fn sql_error(path: &Path, e: rusqlite::Error) -> StoreError {
    use rusqlite::ffi::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            StoreError::Corrupt(path.to_path_buf(), "it is not an SQLite database".into())
        }
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt(path.to_path_buf(), e.to_string()),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Locked(path.to_path_buf())
        }
        _ => match e {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => {
                StoreError::Corrupt(path.to_path_buf(), format!("unexpected value: {e}"))
            }
            e => StoreError::Sqlite(path.to_path_buf(), e),
        },
    }
}

fn parse_ip(text: &str, column: usize) -> rusqlite::Result<IpAddr> {
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn ip(row: &Row<'_>, column: usize) -> rusqlite::Result<IpAddr> {
    parse_ip(&row.get::<_, String>(column)?, column)
}

/// Unix milliseconds (negative before 1970), saturating.
fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

fn from_ms(ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    let t = if ms >= 0 { UNIX_EPOCH.checked_add(d) } else { UNIX_EPOCH.checked_sub(d) };
    t.unwrap_or(UNIX_EPOCH)
}
