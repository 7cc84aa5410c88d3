//! Store tests on real SQLite files in unique temporary directories.

use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "vipgate-store-{name}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("leases.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A moment, in milliseconds after a fixed base.
fn t(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn host(n: u8) -> IpAddr {
    v4(192, 0, 2, n)
}

fn virt(n: u8) -> IpAddr {
    v4(198, 18, 0, n)
}

fn partner(n: u8) -> IpAddr {
    v4(203, 0, 113, n)
}

fn lease(real: IpAddr, virtual_addr: IpAddr, partner: IpAddr, created: u64) -> LeaseRow {
    LeaseRow { real, virtual_addr, partner, explicit: false, created: t(created), expires: None }
}

fn end(real: IpAddr, partner: IpAddr, at: u64, reason: &str) -> Change {
    Change::End { real, partner, at: t(at), reason: reason.into() }
}

fn waker() -> (mio::Poll, Arc<mio::Waker>) {
    let poll = mio::Poll::new().expect("poll");
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(1)).expect("waker"));
    (poll, waker)
}

/// Collects results until `pred` says enough, waiting on the waker (bounded: 30 s).
fn collect_until(
    poll: &mut mio::Poll,
    worker: &StoreWorker,
    mut pred: impl FnMut(&[Done]) -> bool,
) -> Vec<Done> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = mio::Events::with_capacity(4);
    let mut out = Vec::new();
    loop {
        while let Some(d) = worker.try_done() {
            out.push(d);
        }
        if pred(&out) {
            return out;
        }
        assert!(Instant::now() < deadline, "store worker did not answer in time: {out:?}");
        poll.poll(&mut events, Some(Duration::from_millis(100))).expect("poll");
    }
}

#[test]
fn round_trip_through_reopen() {
    let dir = TempDir::new("roundtrip");
    let v6 = |n: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n));
    let kept = LeaseRow {
        explicit: true,
        expires: Some(t(1_000_000)),
        ..lease(host(1), virt(1), partner(1), 10)
    };
    let ipv6 = lease(v6(1), v6(0x100), v6(0x200), 20);
    let ended = lease(host(2), virt(2), partner(1), 30);
    let q_partner = QuarantineRow {
        virtual_addr: virt(2),
        partner: Some(partner(1)),
        real: host(2),
        until: t(500_000),
    };
    let q_all =
        QuarantineRow { virtual_addr: virt(3), partner: None, real: host(3), until: t(600_000) };
    {
        let mut store = Store::open(&dir.db()).expect("open");
        store
            .apply(&[
                Change::Upsert(lease(host(1), virt(1), partner(1), 10)),
                Change::Upsert(ipv6.clone()),
                Change::Upsert(ended.clone()),
            ])
            .expect("apply 1");
        store
            .apply(&[
                // Renting again: same lease, now explicit with a TTL.
                Change::Upsert(kept.clone()),
                end(host(2), partner(1), 400, "released"),
                Change::Quarantine(QuarantineRow { until: t(1), ..q_partner.clone() }),
                Change::Quarantine(q_partner.clone()), // replaces the previous entry
                Change::Quarantine(q_all.clone()),
            ])
            .expect("apply 2");
    }
    let store = Store::open(&dir.db()).expect("reopen");
    let (leases, quarantine) = store.load(t(1_000)).expect("load");
    assert_eq!(leases, vec![kept.clone(), ipv6.clone()]);
    assert_eq!(quarantine, vec![q_partner, q_all]);

    let history = store.history(None, None, 100).expect("history");
    let row = |l: &LeaseRow, explicit: bool, end: Option<u64>, reason: Option<&str>| HistoryRow {
        real: l.real,
        virtual_addr: l.virtual_addr,
        partner: l.partner,
        explicit,
        start: l.created,
        end: end.map(t),
        end_reason: reason.map(String::from),
    };
    assert_eq!(
        history,
        vec![
            row(&ended, false, Some(400), Some("released")),
            row(&ipv6, false, None, None),
            row(&kept, true, None, None), // one row: the renewal did not open another
        ]
    );
}

#[test]
fn upsert_to_another_virtual_closes_the_old_history_row() {
    let dir = TempDir::new("replace");
    let mut store = Store::open(&dir.db()).expect("open");
    store.apply(&[Change::Upsert(lease(host(1), virt(1), partner(1), 100))]).expect("apply");
    store.apply(&[Change::Upsert(lease(host(1), virt(2), partner(1), 200))]).expect("apply");
    let (leases, _) = store.load(t(300)).expect("load");
    assert_eq!(leases, vec![lease(host(1), virt(2), partner(1), 200)]);
    let history = store.history(None, None, 10).expect("history");
    assert_eq!(history.len(), 2);
    assert_eq!((history[0].virtual_addr, history[0].end), (virt(2), None));
    assert_eq!(history[1].virtual_addr, virt(1));
    assert_eq!(history[1].end, Some(t(200)));
    assert_eq!(history[1].end_reason.as_deref(), Some(REASON_REPLACED));
    assert_eq!(store.who_was(virt(1), partner(1), t(250)).expect("who"), None);
    assert_eq!(store.who_was(virt(2), partner(1), t(250)).expect("who"), Some(host(1)));
}

#[test]
fn who_was_before_within_and_after_a_lease() {
    let dir = TempDir::new("whowas");
    let mut store = Store::open(&dir.db()).expect("open");
    store
        .apply(&[
            Change::Upsert(lease(host(1), virt(1), partner(1), 1_000)),
            // Same virtual address, another partner, another host, at the same time.
            Change::Upsert(lease(host(2), virt(1), partner(2), 1_000)),
        ])
        .expect("apply");
    store.apply(&[end(host(1), partner(1), 2_000, "idle")]).expect("end");
    // Later the address goes to host 3 for partner 1.
    store.apply(&[Change::Upsert(lease(host(3), virt(1), partner(1), 3_000))]).expect("apply");

    let who = |p: IpAddr, at: u64| store.who_was(virt(1), p, t(at)).expect("who_was");
    assert_eq!(who(partner(1), 999), None, "before");
    assert_eq!(who(partner(1), 1_000), Some(host(1)), "at the start");
    assert_eq!(who(partner(1), 1_999), Some(host(1)), "within");
    assert_eq!(who(partner(1), 2_000), None, "at the end (exclusive)");
    assert_eq!(who(partner(1), 2_500), None, "between leases");
    assert_eq!(who(partner(1), 3_000), Some(host(3)), "the next lease");
    assert_eq!(who(partner(1), 9_000_000), Some(host(3)), "still open");
    assert_eq!(who(partner(2), 2_500), Some(host(2)), "another partner sees another host");
    assert_eq!(who(partner(3), 2_500), None, "a partner that never had it");
    assert_eq!(store.who_was(virt(9), partner(1), t(1_500)).expect("who_was"), None);
}

#[test]
fn history_filters_by_virtual_and_moment_newest_first() {
    let dir = TempDir::new("history");
    let mut store = Store::open(&dir.db()).expect("open");
    store
        .apply(&[
            Change::Upsert(lease(host(1), virt(1), partner(1), 100)),
            Change::Upsert(lease(host(2), virt(2), partner(1), 200)),
            Change::Upsert(lease(host(3), virt(1), partner(2), 300)),
            end(host(1), partner(1), 400, "released"),
            Change::Upsert(lease(host(4), virt(1), partner(1), 500)),
        ])
        .expect("apply");
    let reals = |rows: Vec<HistoryRow>| rows.into_iter().map(|r| r.real).collect::<Vec<_>>();
    let h = |v: Option<IpAddr>, at: Option<u64>, limit| {
        reals(store.history(v, at.map(t), limit).expect("history"))
    };
    assert_eq!(h(None, None, 10), vec![host(4), host(3), host(2), host(1)]);
    assert_eq!(h(None, None, 2), vec![host(4), host(3)]);
    assert_eq!(h(None, None, 0), Vec::<IpAddr>::new());
    assert_eq!(h(Some(virt(1)), None, 10), vec![host(4), host(3), host(1)]);
    assert_eq!(h(None, Some(350), 10), vec![host(3), host(2), host(1)]);
    assert_eq!(h(None, Some(450), 10), vec![host(3), host(2)]);
    assert_eq!(h(Some(virt(1)), Some(350), 10), vec![host(3), host(1)]);
    assert_eq!(h(Some(virt(1)), Some(600), 1), vec![host(4)]);
    assert_eq!(h(Some(virt(2)), Some(50), 10), Vec::<IpAddr>::new());
}

#[test]
fn purge_deletes_only_closed_rows_that_ended_before() {
    let dir = TempDir::new("purge");
    let mut store = Store::open(&dir.db()).expect("open");
    store
        .apply(&[
            Change::Upsert(lease(host(1), virt(1), partner(1), 100)),
            Change::Upsert(lease(host(2), virt(2), partner(1), 100)),
            Change::Upsert(lease(host(3), virt(3), partner(1), 100)),
            end(host(1), partner(1), 200, "idle"),
            end(host(2), partner(1), 300, "idle"),
        ])
        .expect("apply");
    assert_eq!(store.purge_history(t(200)).expect("purge"), 0, "end is not before 200");
    assert_eq!(store.purge_history(t(250)).expect("purge"), 1);
    assert_eq!(store.purge_history(t(1_000_000)).expect("purge"), 1, "open rows stay");
    let rows = store.history(None, None, 10).expect("history");
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].real, rows[0].end), (host(3), None));
    assert_eq!(store.who_was(virt(1), partner(1), t(150)).expect("who"), None, "purged");
}

#[test]
fn load_retires_leases_that_expired_while_down() {
    let dir = TempDir::new("expired");
    let mut store = Store::open(&dir.db()).expect("open");
    let expiring = LeaseRow {
        explicit: true,
        expires: Some(t(5_000)),
        ..lease(host(1), virt(1), partner(1), 100)
    };
    let later = LeaseRow {
        explicit: true,
        expires: Some(t(50_000)),
        ..lease(host(2), virt(2), partner(1), 100)
    };
    let implicit = lease(host(3), virt(3), partner(1), 100);
    store
        .apply(&[
            Change::Upsert(expiring),
            Change::Upsert(later.clone()),
            Change::Upsert(implicit.clone()),
            Change::Quarantine(QuarantineRow {
                virtual_addr: virt(9),
                partner: None,
                real: host(9),
                until: t(6_000),
            }),
        ])
        .expect("apply");
    let (leases, quarantine) = store.load(t(10_000)).expect("load");
    assert_eq!(leases, vec![later, implicit]);
    assert!(quarantine.is_empty());
    assert_eq!(store.who_was(virt(1), partner(1), t(4_999)).expect("who"), Some(host(1)));
    assert_eq!(store.who_was(virt(1), partner(1), t(5_000)).expect("who"), None, "ended at expiry");
    let rows = store.history(Some(virt(1)), None, 10).expect("history");
    assert_eq!(rows[0].end_reason.as_deref(), Some(REASON_EXPIRED));
    // The retirement was committed: loading again (even earlier) does not bring it back.
    drop(store);
    let store = Store::open(&dir.db()).expect("reopen");
    assert_eq!(store.load(t(0)).expect("load").0.len(), 2);
}

#[test]
fn ending_a_lease_drops_quarantine_entries_that_are_over() {
    let dir = TempDir::new("quarantine");
    let mut store = Store::open(&dir.db()).expect("open");
    let q = |n: u8, until: u64| {
        Change::Quarantine(QuarantineRow {
            virtual_addr: virt(n),
            partner: Some(partner(1)),
            real: host(n),
            until: t(until),
        })
    };
    store.apply(&[q(1, 1_000), q(2, 3_000)]).expect("apply");
    store.apply(&[end(host(7), partner(7), 2_000, "idle")]).expect("end of an unknown lease");
    let count: i64 =
        store.conn.query_row("SELECT count(*) FROM quarantine", [], |r| r.get(0)).expect("count");
    assert_eq!(count, 1);
    assert_eq!(store.load(t(0)).expect("load").1.len(), 1);
}

#[test]
fn committed_rows_are_visible_to_another_connection() {
    let dir = TempDir::new("durable");
    {
        let mut store = Store::open(&dir.db()).expect("open");
        store.apply(&[Change::Upsert(lease(host(1), virt(1), partner(1), 100))]).expect("apply");
        // A second connection while the store is open: WAL readers see the commit.
        let reader = Connection::open_with_flags(dir.db(), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("reader");
        let n: i64 =
            reader.query_row("SELECT count(*) FROM lease", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 1);
        // `std::mem::forget` would model a crash of the connection: the WAL holds the commit.
    }
    let reader =
        Connection::open_with_flags(dir.db(), OpenFlags::SQLITE_OPEN_READ_ONLY).expect("reader");
    let (real, virtual_addr): (String, String) = reader
        .query_row("SELECT real_addr, virtual_addr FROM lease", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("row");
    assert_eq!((real.as_str(), virtual_addr.as_str()), ("192.0.2.1", "198.18.0.1"));
    let open_history: i64 = reader
        .query_row("SELECT count(*) FROM history WHERE ended_ms IS NULL", [], |r| r.get(0))
        .expect("count");
    assert_eq!(open_history, 1);
}

/// A crash right after a commit: the process dies without closing anything (no checkpoint,
/// the commit lives only in the WAL). Modelled by leaking the store (no close), copying the
/// database with its WAL as the disk holds them, and opening the copy.
#[test]
fn a_commit_survives_a_crash_in_the_wal() {
    let dir = TempDir::new("crash");
    let mut store = Store::open(&dir.db()).expect("open");
    store.apply(&[Change::Upsert(lease(host(1), virt(1), partner(1), 100))]).expect("apply");
    let crashed = dir.0.join("crashed.db");
    fs::copy(dir.db(), &crashed).expect("copy db");
    fs::copy(sidecar(&dir.db(), "-wal"), sidecar(&crashed, "-wal")).expect("copy wal");
    let wal_len = fs::metadata(sidecar(&crashed, "-wal")).expect("wal").len();
    assert!(wal_len > 0, "the commit is in the WAL");
    drop(store);
    let store = Store::open(&crashed).expect("open the crashed copy");
    assert_eq!(store.load(t(200)).expect("load").0, vec![lease(host(1), virt(1), partner(1), 100)]);
}

#[test]
fn garbage_file_is_refused_and_left_untouched() {
    let dir = TempDir::new("garbage");
    let garbage: Vec<u8> =
        (0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(dir.db(), &garbage).expect("write");
    let err = Store::open(&dir.db()).expect_err("garbage must not open");
    assert!(matches!(err, StoreError::Corrupt(ref p, _) if p == &dir.db()), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.db().display().to_string()), "{msg}");
    assert!(msg.contains("damaged") && msg.contains("move it away"), "{msg}");
    assert_eq!(fs::read(dir.db()).expect("read"), garbage, "the file was modified");
}

#[test]
fn empty_file_and_foreign_database_are_refused() {
    let dir = TempDir::new("foreign");
    fs::write(dir.db(), b"").expect("write");
    let err = Store::open(&dir.db()).expect_err("empty file");
    assert!(matches!(err, StoreError::Corrupt(..)), "{err:?}");
    assert_eq!(fs::metadata(dir.db()).expect("meta").len(), 0, "the file was modified");

    let other = dir.0.join("other.db");
    Connection::open(&other)
        .and_then(|c| c.execute_batch("CREATE TABLE t (x)"))
        .expect("foreign db");
    let before = fs::read(&other).expect("read");
    let err = Store::open(&other).expect_err("foreign database");
    assert!(matches!(err, StoreError::Corrupt(..)), "{err:?}");
    assert!(err.to_string().contains("not a vipgate lease database"), "{err}");
    assert_eq!(fs::read(&other).expect("read"), before);

    let newer = dir.0.join("newer.db");
    drop(Store::open(&newer).expect("create"));
    Connection::open(&newer).and_then(|c| c.pragma_update(None, "user_version", 99)).expect("bump");
    let err = Store::open(&newer).expect_err("newer schema");
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err:?}");
}

#[test]
fn damaged_pages_fail_the_integrity_check() {
    let dir = TempDir::new("torn");
    {
        let mut store = Store::open(&dir.db()).expect("open");
        let mut changes = Vec::new();
        for i in 0..5_000u32 {
            let real = IpAddr::V4(Ipv4Addr::from(0xc000_0200 + (i % 256)));
            let partner = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + i / 256));
            let v = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i));
            let start = u64::from(i) * 10;
            changes.push(Change::Upsert(lease(real, v, partner, start)));
            changes.push(Change::End { real, partner, at: t(start + 5), reason: "idle".into() });
        }
        store.apply(&changes).expect("apply");
    }
    assert!(!sidecar(&dir.db(), "-wal").exists(), "closing checkpoints the WAL");
    let mut bytes = fs::read(dir.db()).expect("read");
    let pages = bytes.len() / 4096;
    assert!(pages > 100, "only {pages} pages");
    for k in [pages / 3, pages / 2, 2 * pages / 3] {
        for (j, b) in bytes[k * 4096..(k + 1) * 4096].iter_mut().enumerate() {
            *b = (j as u32).wrapping_mul(2_654_435_761).rotate_right(7) as u8;
        }
    }
    fs::write(dir.db(), &bytes).expect("write");
    let err = Store::open(&dir.db()).expect_err("damaged database must not open");
    assert!(matches!(err, StoreError::Corrupt(..)), "{err:?}");
    assert!(err.to_string().contains("damaged"), "{err}");
    assert_eq!(fs::read(dir.db()).expect("read"), bytes, "the file was modified");
}

/// A damaged database with a WAL beside it (a crash left commits in the WAL) is refused
/// without a byte of either changing: the check must not checkpoint the WAL into it.
#[test]
fn a_damaged_database_and_its_wal_are_left_byte_identical() {
    let dir = TempDir::new("tornwal");
    {
        let mut store = Store::open(&dir.db()).expect("open");
        let changes: Vec<Change> = (0..3_000u32)
            .map(|i| {
                let real = IpAddr::V4(Ipv4Addr::from(0xc000_0200 + (i % 256)));
                let partner = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + i / 256));
                let v = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i));
                Change::Upsert(lease(real, v, partner, u64::from(i)))
            })
            .collect();
        store.apply(&changes).expect("apply");
    }
    let mut store = Store::open(&dir.db()).expect("reopen");
    store.apply(&[Change::Upsert(lease(host(1), virt(1), partner(9), 1))]).expect("apply");
    let crashed = dir.0.join("crashed.db");
    fs::copy(dir.db(), &crashed).expect("copy db");
    fs::copy(sidecar(&dir.db(), "-wal"), sidecar(&crashed, "-wal")).expect("copy wal");
    drop(store);
    let mut bytes = fs::read(&crashed).expect("read");
    let pages = bytes.len() / 4096;
    assert!(pages > 30, "only {pages} pages");
    for k in [pages / 3, pages / 2] {
        for (j, b) in bytes[k * 4096..(k + 1) * 4096].iter_mut().enumerate() {
            *b = (j as u32).wrapping_mul(2_654_435_761).rotate_right(7) as u8;
        }
    }
    fs::write(&crashed, &bytes).expect("write");
    let wal = fs::read(sidecar(&crashed, "-wal")).expect("read wal");
    assert!(!wal.is_empty(), "the last commit is in the WAL");
    let err = Store::open(&crashed).expect_err("damaged database must not open");
    assert!(matches!(err, StoreError::Corrupt(..)), "{err:?}");
    assert_eq!(fs::read(&crashed).expect("read"), bytes, "the database was modified");
    let after = fs::read(sidecar(&crashed, "-wal")).expect("the WAL was deleted");
    assert!(after == wal, "the WAL was modified");
}

#[test]
fn second_open_is_locked_until_the_first_is_dropped() {
    let dir = TempDir::new("locked");
    let store = Store::open(&dir.db()).expect("open");
    let err = Store::open(&dir.db()).expect_err("second open");
    assert!(matches!(err, StoreError::Locked(ref p) if p == &dir.db()), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.db().display().to_string()) && msg.contains("another vipgate"),
        "{msg}"
    );
    // The failed open did not disturb the first one.
    drop(store);
    drop(Store::open(&dir.db()).expect("open after the first closed"));
}

const PROBE_ENV: &str = "VIPGATE_STORE_LOCK_PROBE";

/// Runs this test binary again, as another process, to open `db` (see `lock_probe_child`).
fn probe_in_child(db: &Path, expect: &str) -> bool {
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .args(["--exact", "store::tests::lock_probe_child", "--nocapture", "--test-threads=1"])
        .env(PROBE_ENV, format!("{expect}:{}", db.display()))
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 passed") || stdout.contains("1 failed"),
        "probe did not run: {stdout}"
    );
    out.status.success()
}

/// The other process of `lock_conflicts_across_processes`; does nothing when run normally.
#[test]
fn lock_probe_child() {
    let Ok(probe) = std::env::var(PROBE_ENV) else { return };
    let (expect, path) = probe.split_once(':').expect("expect:path");
    match (expect, Store::open(Path::new(path))) {
        ("locked", Err(StoreError::Locked(_))) | ("free", Ok(_)) => {}
        (_, other) => panic!("expected {expect}, got {other:?}"),
    }
}

#[test]
fn lock_conflicts_across_processes() {
    let dir = TempDir::new("xproc");
    let store = Store::open(&dir.db()).expect("open");
    assert!(probe_in_child(&dir.db(), "locked"), "another process could open a held store");
    assert!(!probe_in_child(&dir.db(), "free"), "the probe must be able to fail");
    drop(store);
    assert!(probe_in_child(&dir.db(), "free"), "the lock outlived the store");
}

#[test]
fn files_are_private() {
    let dir = TempDir::new("mode");
    let db = dir.0.join("state/vipgate/leases.db");
    let mut store = Store::open(&db).expect("open");
    store.apply(&[Change::Upsert(lease(host(1), virt(1), partner(1), 100))]).expect("apply");
    let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&sidecar(&db, ".lock")), 0o600);
    assert_eq!(mode(&sidecar(&db, "-wal")), 0o600);
    assert_eq!(mode(&sidecar(&db, "-shm")), 0o600);
    assert_eq!(mode(&dir.0.join("state/vipgate")), 0o700);
    assert_eq!(mode(&dir.0.join("state")), 0o700);
    drop(store);
    // A file made readable by others is narrowed again on open.
    fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).expect("chmod");
    drop(Store::open(&db).expect("reopen"));
    assert_eq!(mode(&db), 0o600);
}

#[test]
fn worker_groups_queued_applies_and_answers_queries() {
    let dir = TempDir::new("worker");
    let (mut poll, waker) = waker();
    let worker = StoreWorker::spawn(Store::open(&dir.db()).expect("open"), waker);
    for seq in 1..=100u64 {
        let n = seq as u32;
        let real = IpAddr::V4(Ipv4Addr::from(0xc000_0200 + n));
        let v = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + n));
        worker.submit(Job::Apply {
            seq,
            changes: vec![Change::Upsert(lease(real, v, partner(1), seq))],
        });
    }
    worker.submit(Job::WhoWas {
        token: 7,
        virtual_addr: v4(198, 18, 0, 42),
        partner: partner(1),
        at: t(50),
    });
    worker.submit(Job::History { token: 8, virtual_addr: None, at: None, limit: 3 });
    let done = collect_until(&mut poll, &worker, |d| {
        d.iter().any(|d| matches!(d, Done::Committed { seq: 100 }))
            && d.iter().any(|d| matches!(d, Done::History { .. }))
    });
    let commits: Vec<u64> = done
        .iter()
        .filter_map(|d| match d {
            Done::Committed { seq } => Some(*seq),
            Done::Failed { seq, error } => panic!("job {seq} failed: {error}"),
            _ => None,
        })
        .collect();
    assert!(commits.windows(2).all(|w| w[0] < w[1]), "{commits:?}");
    assert_eq!(commits.last(), Some(&100));
    assert!(commits.len() < 100, "no grouping at all: {} commits", commits.len());
    assert!(done.contains(&Done::WhoWas { token: 7, real: Some(host(42)) }), "{done:?}");
    let rows = done.iter().find_map(|d| match d {
        Done::History { token: 8, rows } => Some(rows.clone()),
        _ => None,
    });
    let rows = rows.expect("history answer");
    assert_eq!(
        rows.iter().map(|r| r.real).collect::<Vec<_>>(),
        vec![host(100), host(99), host(98)]
    );

    worker.submit(Job::Apply {
        seq: 101,
        changes: vec![end(host(1), partner(1), 1_000, "released")],
    });
    worker.submit(Job::Purge { ended_before: t(2_000) });
    worker.submit(Job::WhoWas {
        token: 9,
        virtual_addr: v4(198, 18, 0, 1),
        partner: partner(1),
        at: t(500),
    });
    let rest = worker.finish();
    assert!(rest.contains(&Done::Committed { seq: 101 }), "{rest:?}");
    assert!(rest.contains(&Done::WhoWas { token: 9, real: None }), "purged: {rest:?}");

    let store = Store::open(&dir.db()).expect("reopen after shutdown");
    assert_eq!(store.load(t(0)).expect("load").0.len(), 99);
}

#[test]
fn worker_reports_failures_per_job() {
    let dir = TempDir::new("workerfail");
    let (mut poll, waker) = waker();
    let store = Store::open(&dir.db()).expect("open");
    // Sabotage: make every write fail inside the transaction.
    store
        .conn
        .execute_batch(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.lease BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .expect("trigger");
    let worker = StoreWorker::spawn(store, waker);
    worker.submit(Job::Apply {
        seq: 1,
        changes: vec![Change::Upsert(lease(host(1), virt(1), partner(1), 1))],
    });
    worker.submit(Job::Apply { seq: 2, changes: vec![] });
    let done = collect_until(&mut poll, &worker, |d| {
        d.iter().filter(|d| matches!(d, Done::Failed { .. } | Done::Committed { .. })).count() >= 1
    });
    match &done[0] {
        Done::Failed { seq: 1, error } => assert!(error.contains("refused"), "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    worker.shutdown();
    let store = Store::open(&dir.db()).expect("reopen");
    assert!(store.load(t(0)).expect("load").0.is_empty(), "the failed job left nothing behind");
}

/// A failing group is kept and retried, later jobs wait behind it (no `Committed` passes
/// it, even for a job that alone would be stored), and once the store can write again
/// everything is stored by itself.
#[test]
fn worker_retries_a_failed_group_and_never_commits_past_it() {
    let dir = TempDir::new("workerretry");
    let (mut poll, waker) = waker();
    let store = Store::open(&dir.db()).expect("open");
    // Sabotage what a full disk does: host 1's rows fail while table `stop` has a row.
    store
        .conn
        .execute_batch(&format!(
            "CREATE TABLE main.stop (x); INSERT INTO main.stop VALUES (1);
             CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.lease
             WHEN NEW.real_addr = '{}' AND EXISTS (SELECT 1 FROM main.stop)
             BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
            host(1)
        ))
        .expect("trigger");
    let worker = StoreWorker::spawn(store, waker);
    worker.submit(Job::Apply {
        seq: 1,
        changes: vec![Change::Upsert(lease(host(1), virt(1), partner(1), 1))],
    });
    let done = collect_until(&mut poll, &worker, |d| {
        d.iter().filter(|d| matches!(d, Done::Failed { .. })).count() >= 2
    });
    assert!(done.iter().all(|d| matches!(d, Done::Failed { seq: 1, .. })), "{done:?}");
    // A job that alone would be stored waits behind the failing one.
    worker.submit(Job::Apply {
        seq: 2,
        changes: vec![Change::Upsert(lease(host(2), virt(2), partner(1), 2))],
    });
    let done = collect_until(&mut poll, &worker, |d| {
        d.iter().filter(|d| matches!(d, Done::Failed { .. })).count() >= 2
    });
    assert!(!done.iter().any(|d| matches!(d, Done::Committed { .. })), "{done:?}");
    // The disk is writable again: both are stored, and one Committed covers them.
    Connection::open(dir.db()).and_then(|c| c.execute("DELETE FROM stop", [])).expect("free");
    let done = collect_until(&mut poll, &worker, |d| {
        d.iter().any(|d| matches!(d, Done::Committed { .. }))
    });
    assert!(done.contains(&Done::Committed { seq: 2 }), "{done:?}");
    worker.shutdown();
    let store = Store::open(&dir.db()).expect("reopen");
    assert_eq!(store.load(t(0)).expect("load").0.len(), 2);
}

#[test]
fn times_round_trip_in_milliseconds() {
    for ms in [0i64, 1, -1, 1_700_000_000_123, -86_400_000] {
        assert_eq!(to_ms(from_ms(ms)), ms);
    }
    assert_eq!(to_ms(UNIX_EPOCH + Duration::from_micros(1_999)), 1);
}

/// State and socket directories: created 0700; an existing one open to others is narrowed
/// when it is vipgate's own, never when it is shared (sticky) or not vipgate's.
#[test]
fn private_dirs() {
    let dir = TempDir::new("private-dir");
    let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o7777;
    let fresh = dir.0.join("a/b");
    private_dir(&fresh, "state directory", true).expect("create");
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&dir.0.join("a")), 0o700);

    let open = dir.0.join("open");
    fs::create_dir(&open).expect("mkdir");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).expect("chmod");
    private_dir(&open, "state directory", false).expect("not ours");
    assert_eq!(mode(&open), 0o755, "not vipgate's: left");
    private_dir(&open, "state directory", true).expect("narrow");
    assert_eq!(mode(&open), 0o700, "narrowed");

    let shared = dir.0.join("tmp");
    fs::create_dir(&shared).expect("mkdir");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).expect("chmod");
    private_dir(&shared, "state directory", true).expect("shared");
    assert_eq!(mode(&shared), 0o1777, "a sticky directory is shared: left");
}
