//! The rendezvous server's durable state: accounts (name and password hash) and buddy requests,
//! in an SQLite file in the state directory (same guarantees as the lease store: private
//! file, exclusive lock, integrity check at open, WAL with `synchronous=FULL`).
//!
//! A buddy relation is two rows: *(a, b)* says "a asked for b". One row is a pending request;
//! both rows make a and b mutual buddies. Requests may name an account that does not exist
//! (yet): refusing them would tell anyone which names are registered.

use crate::store::{open_database, Schema, StoreError};
use rusqlite::{params, Connection, OptionalExtension};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// File name of the database in the state directory.
pub const DB_FILE: &str = "rendezvous.db";

const SCHEMA: Schema = Schema {
    sql: "
CREATE TABLE account (
    name       TEXT PRIMARY KEY,
    phc        TEXT NOT NULL,   -- the password hash, PHC string format (argon2id)
    created_ms INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE buddy (
    from_name TEXT NOT NULL,     -- asked ...
    to_name   TEXT NOT NULL,     -- ... for this one
    PRIMARY KEY (from_name, to_name)
) STRICT, WITHOUT ROWID;
CREATE INDEX buddy_to ON buddy (to_name, from_name);
",
    version: 1,
    marker_table: "account",
    kind: "vipgate rendezvous database",
};

/// How two names stand to each other, seen from the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Nothing between them.
    None,
    /// The first asked for the second, who has not answered.
    Requested,
    /// The second asked for the first.
    Incoming,
    /// Both asked: buddies.
    Mutual,
}

impl Standing {
    /// The wire name (`requested`, `incoming`, `mutual`; `none` is never listed).
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::None => "none",
            Standing::Requested => "requested",
            Standing::Incoming => "incoming",
            Standing::Mutual => "mutual",
        }
    }
}

/// Accounts and buddy requests.
pub struct Accounts {
    // The connection closes before the lock is released.
    conn: Connection,
    path: PathBuf,
    _lock: File,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Accounts {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Accounts, StoreError> {
        let (conn, path, lock) = open_database(path, &SCHEMA)?;
        Ok(Accounts { conn, path, _lock: lock })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        StoreError::Sqlite(self.path.clone(), e)
    }

    /// Creates account `name` with password hash `phc`; false when the name is taken.
    pub fn create(&mut self, name: &str, phc: &str, now: SystemTime) -> Result<bool, StoreError> {
        let ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let n = self
            .conn
            .prepare_cached(
                "INSERT INTO account (name, phc, created_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![name, phc, ms]))
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    /// The password hash of `name`, if the account exists.
    pub fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT phc FROM account WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))
    }

    /// How `a` stands to `b`.
    pub fn standing(&self, a: &str, b: &str) -> Result<Standing, StoreError> {
        let asked = |x: &str, y: &str| -> Result<bool, StoreError> {
            self.conn
                .prepare_cached("SELECT 1 FROM buddy WHERE from_name = ?1 AND to_name = ?2")
                .and_then(|mut s| s.exists([x, y]))
                .map_err(|e| self.err(e))
        };
        Ok(match (asked(a, b)?, asked(b, a)?) {
            (true, true) => Standing::Mutual,
            (true, false) => Standing::Requested,
            (false, true) => Standing::Incoming,
            (false, false) => Standing::None,
        })
    }

    /// Records that `a` asks for `b` (idempotent); returns the standing afterwards.
    pub fn ask(&mut self, a: &str, b: &str) -> Result<Standing, StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO buddy (from_name, to_name) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute([a, b]))
            .map_err(|e| self.err(e))?;
        self.standing(a, b)
    }

    /// Removes everything between `a` and `b`, both ways; returns the standing before.
    pub fn remove(&mut self, a: &str, b: &str) -> Result<Standing, StoreError> {
        let before = self.standing(a, b)?;
        self.conn
            .prepare_cached(
                "DELETE FROM buddy WHERE (from_name = ?1 AND to_name = ?2)
                                      OR (from_name = ?2 AND to_name = ?1)",
            )
            .and_then(|mut s| s.execute([a, b]))
            .map_err(|e| self.err(e))?;
        Ok(before)
    }

    /// Everyone `a` stands to, with the standing, sorted by name.
    pub fn relations(&self, a: &str) -> Result<Vec<(String, Standing)>, StoreError> {
        let rows: Vec<(String, bool, bool)> = self
            .conn
            .prepare_cached(
                "SELECT other, max(outgoing), max(incoming) FROM (
                     SELECT to_name AS other, 1 AS outgoing, 0 AS incoming
                       FROM buddy WHERE from_name = ?1
                     UNION ALL
                     SELECT from_name, 0, 1 FROM buddy WHERE to_name = ?1)
                 GROUP BY other ORDER BY other",
            )
            .and_then(|mut s| {
                s.query_map([a], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
            })
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(name, out, inc)| {
                let st = match (out, inc) {
                    (true, true) => Standing::Mutual,
                    (true, false) => Standing::Requested,
                    _ => Standing::Incoming,
                };
                (name, st)
            })
            .collect())
    }

    /// The mutual buddies of `a`.
    pub fn buddies(&self, a: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .relations(a)?
            .into_iter()
            .filter(|(_, s)| *s == Standing::Mutual)
            .map(|(n, _)| n)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::TempDir;

    fn open() -> (TempDir, Accounts) {
        let dir = TempDir::new("rendezvous");
        let a = Accounts::open(&dir.path().join(DB_FILE)).expect("open");
        (dir, a)
    }

    #[test]
    fn accounts_are_unique_and_survive_reopen() {
        let (dir, mut a) = open();
        assert!(a.create("alice", "$argon2id$x", SystemTime::now()).unwrap());
        assert!(!a.create("alice", "$argon2id$y", SystemTime::now()).unwrap());
        drop(a);
        let a = Accounts::open(&dir.path().join(DB_FILE)).expect("reopen");
        assert_eq!(a.password_hash("alice").unwrap().as_deref(), Some("$argon2id$x"));
        assert_eq!(a.password_hash("bob").unwrap(), None);
    }

    #[test]
    fn buddy_requests_become_mutual_and_removal_ends_both_ways() {
        let (_dir, mut a) = open();
        assert_eq!(a.ask("alice", "bob").unwrap(), Standing::Requested);
        assert_eq!(a.standing("bob", "alice").unwrap(), Standing::Incoming);
        assert_eq!(a.ask("alice", "bob").unwrap(), Standing::Requested, "idempotent");
        assert_eq!(a.ask("bob", "alice").unwrap(), Standing::Mutual);
        a.ask("alice", "carol").unwrap();
        a.ask("dave", "alice").unwrap();
        let rel = a.relations("alice").unwrap();
        assert_eq!(
            rel,
            vec![
                ("bob".to_string(), Standing::Mutual),
                ("carol".to_string(), Standing::Requested),
                ("dave".to_string(), Standing::Incoming),
            ]
        );
        assert_eq!(a.buddies("alice").unwrap(), vec!["bob".to_string()]);
        assert_eq!(a.remove("bob", "alice").unwrap(), Standing::Mutual);
        assert_eq!(a.standing("alice", "bob").unwrap(), Standing::None);
        assert!(a.buddies("bob").unwrap().is_empty());
    }

    #[test]
    fn a_lease_database_is_not_a_rendezvous_database() {
        let dir = TempDir::new("rendezvous-kind");
        let path = dir.path().join("leases.db");
        drop(crate::store::Store::open(&path).expect("lease store"));
        let err = Accounts::open(&path).expect_err("wrong kind");
        assert!(err.to_string().contains("not a vipgate rendezvous database"), "{err}");
    }
}
