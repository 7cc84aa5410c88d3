//! The claim on a routing table and a band of rule priorities: before a gateway touches any
//! rule or route it takes exclusive `flock`s that name its network namespace, its table and
//! each priority of its band, so a second gateway (or `vipgate cleanup`) that wants any of
//! them refuses in one sentence and changes nothing. Two gateways with different tables and
//! bands hold different locks and run side by side.
//!
//! The locks are files in [`CLAIM_DIR`], one per table and one per priority, named
//! `net-<namespace inode>.table-<T>` and `net-<namespace inode>.priority-<P>`; each holds a
//! line naming its holder (pid, TUN, table, band) for the refusal. The kernel drops a lock
//! when its holder dies, so a crashed gateway's claim passes to the next start, which alone
//! removes the crashed run's leftovers. A holder that ends removes its files while it still
//! holds them; a taker checks after locking that the file it locked is still the one at the
//! path, so a file removed meanwhile is never held by two.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where the lock files live.
pub const CLAIM_DIR: &str = "/run/vipgate/routing";

/// What a claim is for.
#[derive(Debug, Clone)]
pub struct Band {
    /// The routing table.
    pub table: u32,
    /// The first rule priority.
    pub priority: u32,
    /// How many priorities from the first.
    pub len: u32,
}

/// A held claim; dropping it removes its files and releases the locks.
#[derive(Debug)]
pub struct Claim {
    locks: Vec<(PathBuf, File)>,
}

/// The identity of this process's network namespace: `net:[INODE]`, as `readlink
/// /proc/self/ns/net` shows it, and the inode.
fn namespace() -> Result<(String, u64)> {
    let ino = std::fs::metadata("/proc/self/ns/net")
        .context("cannot read /proc/self/ns/net (is /proc mounted?)")?
        .ino();
    Ok((format!("net:[{ino}]"), ino))
}

impl Claim {
    /// Takes the table and every priority of `band` for `holder` (a short description of
    /// who holds it, e.g. `vipgate gateway pid 12 TUN vip0`), or says in one sentence who
    /// holds what.
    pub fn take(band: &Band, holder: &str) -> Result<Claim> {
        Claim::take_in(Path::new(CLAIM_DIR), band, holder)
    }

    /// [`Claim::take`] with the lock files in `dir`.
    pub fn take_in(dir: &Path, band: &Band, holder: &str) -> Result<Claim> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let (ns, ino) = namespace()?;
        let last = band.priority + band.len.saturating_sub(1);
        let line = format!(
            "{holder}, routing table {}, rule priorities {}..{last}, network namespace {ns}\n",
            band.table, band.priority
        );
        let mut names =
            vec![(format!("net-{ino}.table-{}", band.table), format!("table {}", band.table))];
        for p in band.priority..=last {
            names.push((format!("net-{ino}.priority-{p}"), format!("rule priority {p}")));
        }
        let mut claim = Claim { locks: Vec::with_capacity(names.len()) };
        for (name, what) in names {
            let path = dir.join(name);
            match lock(&path)? {
                Some(mut file) => {
                    file.set_len(0)?;
                    file.write_all(line.as_bytes())?;
                    claim.locks.push((path, file));
                }
                None => {
                    let by = holder_of(&path);
                    // Dropping `claim` releases what was taken so far. A refusal (exit 78, as
                    // `--check` says it): retrying cannot help while the other one runs.
                    return Err(crate::config::Refusal(format!(
                        "the {what} in network namespace {ns} belongs to another gateway ({by}): \
                         give this one another --route-table and --rule-priority, or stop that one"
                    ))
                    .into());
                }
            }
        }
        Ok(claim)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Unlinked while still locked: a taker that opened the old file sees it is gone.
        for (path, _) in &self.locks {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Locks the file at `path` (created if missing): `None` when another holds it.
fn lock(path: &Path) -> Result<Option<File>> {
    loop {
        let file = crate::store::open_lock_file(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
        // The holder we waited out may have removed the file: lock the one at the path now.
        let same = std::fs::metadata(path)
            .is_ok_and(|m| m.ino() == file.metadata().map_or(0, |f| f.ino()));
        if same {
            return Ok(Some(file));
        }
    }
}

/// Who holds the lock at `path`, as its file says.
fn holder_of(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.rewind();
        let _ = f.read_to_string(&mut s);
    }
    let s = s.lines().next().unwrap_or("").trim().to_string();
    if s.is_empty() {
        "a gateway starting up".to_string()
    } else {
        s.split(", routing table").next().unwrap_or(&s).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn band(table: u32, priority: u32) -> Band {
        Band { table, priority, len: 6 }
    }

    #[test]
    fn a_second_claim_on_the_same_table_or_an_overlapping_band_is_refused() {
        let dir = std::env::temp_dir().join(format!("vipgate-claim-{}", std::process::id()));
        let first = Claim::take_in(&dir, &band(100, 1000), "first pid 1").unwrap();
        let e = Claim::take_in(&dir, &band(100, 2000), "second").unwrap_err().to_string();
        assert!(e.contains("table 100") && e.contains("first pid 1"), "{e}");
        let e = Claim::take_in(&dir, &band(101, 1005), "second").unwrap_err().to_string();
        assert!(e.contains("rule priority 1005") && e.contains("first pid 1"), "{e}");
        // The refused claims released what they had taken: table 101 and 1006.. are free.
        let other = Claim::take_in(&dir, &band(101, 1006), "third").unwrap();
        drop(first);
        let again = Claim::take_in(&dir, &band(100, 1000), "fourth").unwrap();
        drop((other, again));
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "lock files left: {left:?}");
        std::fs::remove_dir(&dir).unwrap();
    }
}
