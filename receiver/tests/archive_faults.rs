//! The archive under injected faults (the `failpoints` feature, which `cargo test --workspace` enables through
//! the end-to-end test crate): a failed fsync is never counted as durable, and the archive rolls back to what
//! its last good fsync covered. Failpoints are process-wide: each test holds `FailScenario`, which runs them one
//! at a time, and the spare's preallocation thread has a failpoint of its own (`archive-fsync-spare`), so that
//! it cannot take a failure meant for the archive's fsync.

mod common;
use common::{append_confirmed, assert_partial, identity, last_record_end, wal};

use walship_protocol::Lsn;
use walship_receiver::archive::Archive;

#[test]
fn a_failed_fsync_is_rolled_back_never_counted() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let data = wal(1, 0, 100_000);
    append_confirmed(&mut a, 1, Lsn(0), &data[..40_000]);
    assert_eq!(a.sync(1).unwrap().map(|s| s.durable), Some(Lsn(40_000)));

    // the next fsync fails: nothing of what it should have covered counts
    append_confirmed(&mut a, 1, Lsn(40_000), &data[40_000..70_000]);
    fail::cfg("archive-fsync", "1*return").unwrap();
    let err = a.sync(1).unwrap_err();
    assert!(
        format!("{err:#}").contains("000000010000000000000000.partial"),
        "{err:#}"
    );
    assert_eq!(a.durable_end(1), Some(Lsn(40_000)));
    a.recover_after_error().unwrap();
    assert_eq!(a.resume_points(), vec![(1, Lsn(40_000))]);
    let partial = path.join("000000010000000000000000.partial");
    // unsynced bytes must be dropped
    assert_partial(&partial, &data[..40_000]);
    // the sender resends; it is written and counted normally
    append_confirmed(&mut a, 1, Lsn(40_000), &data[40_000..]);
    assert_eq!(a.sync(1).unwrap().map(|s| s.durable), Some(Lsn(100_000)));
    assert_partial(&partial, &data);

    // a write that fails half-way (disk full) leaves nothing behind either
    fail::cfg("archive-write-enospc", "1*return").unwrap();
    let more = wal(1, 0, 120_000);
    let err = a.append(1, Lsn(100_000), &more[100_000..]).unwrap_err();
    assert!(format!("{err:#}").contains("No space left"), "{err:#}");
    a.recover_after_error().unwrap();
    assert_eq!(a.resume_points(), vec![(1, Lsn(100_000))]);

    // fsync failing for good: the archive refuses every further write and says why
    append_confirmed(&mut a, 1, Lsn(100_000), &more[100_000..]);
    fail::cfg("archive-fsync", "return").unwrap();
    a.sync(1).unwrap_err();
    a.recover_after_error().unwrap_err();
    let err = a.append(1, Lsn(120_000), &[1]).unwrap_err();
    assert!(format!("{err:#}").contains("cannot be trusted"), "{err:#}");
    fail::remove("archive-fsync");
    drop(a);

    // reopened, the archive holds exactly what was acknowledged, byte for byte
    let a = Archive::open(&path).unwrap();
    assert_eq!(a.resume_points(), vec![(1, Lsn(100_000))]);
    assert_partial(&partial, &data);
    scenario.teardown();
}

#[test]
fn opening_fsyncs_before_counting_anything_durable() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let data = wal(1, 0, 60_000);
    append_confirmed(&mut a, 1, Lsn(0), &data[..30_000]);
    assert_eq!(a.sync(1).unwrap().map(|s| s.durable), Some(Lsn(30_000)));
    // written, never fsynced, then the receiver dies: the bytes sit in the page cache only
    append_confirmed(&mut a, 1, Lsn(30_000), &data[30_000..]);
    drop(a);
    // if the fsync on open fails, nothing is counted or offered to a sender
    fail::cfg("archive-fsync", "1*return").unwrap();
    let err = Archive::open(&path).unwrap_err();
    assert!(format!("{err:#}").contains("fsync"), "{err:#}");
    fail::remove("archive-fsync");
    // once it succeeds, the bytes are on disk and count
    let a = Archive::open(&path).unwrap();
    assert_eq!(a.durable_end(1), Some(Lsn(last_record_end(0, &data))));
    // confirmed only as far as the last sync recorded: the sender resends the rest and it is compared
    assert_eq!(a.confirmed_end(1), Some(Lsn(30_000)));
    assert_eq!(a.resume_points(), vec![(1, Lsn(30_000))]);
    scenario.teardown();
}

#[test]
fn acknowledged_trailing_zeros_are_kept_on_reopen() {
    // failpoints are process-wide: run alone
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let mut data = wal(1, 0, 50_000);
    data[49_990..].fill(0); // a record ending in zeros, and alignment padding
    append_confirmed(&mut a, 1, Lsn(0), &data);
    assert_eq!(a.sync(1).unwrap().map(|s| s.durable), Some(Lsn(50_000)));
    drop(a);
    let a = Archive::open(&path).unwrap();
    assert_eq!(a.resume_points(), vec![(1, Lsn(50_000))]);
    scenario.teardown();
}
