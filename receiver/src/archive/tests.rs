use super::*;
use std::io::Write;

const SEG: u64 = 1 << 20;

fn identity() -> Identity {
    Identity {
        system_identifier: 99,
        wal_segment_size: WalSegSize::new(SEG).unwrap(),
        pg_version_num: 150004,
    }
}

/// Appends and confirms, as a sender of protocol 1 or 2 does.
fn append_confirmed(a: &mut Archive, timeline: TimelineId, start: Lsn, bytes: &[u8]) {
    a.append(timeline, start, bytes).unwrap();
    a.confirm(timeline, Lsn(start.0 + bytes.len() as u64));
}

/// Valid WAL for `[start, start+len)` (`start` a segment's first byte): records of varied sizes, framed as
/// PostgreSQL frames them; the last one may be cut off at `len`.
fn wal(start: u64, len: usize) -> Vec<u8> {
    wal_records(start, len).0
}

/// [`wal`], with the records (the last may end after `len`).
fn wal_records(start: u64, len: usize) -> (Vec<u8>, Vec<walship_protocol::walker::Record>) {
    let exp = identity().page_expectation(1).unwrap();
    let mut b = walship_protocol::walker::WalBuilder::new(exp, Lsn(start));
    let sizes = [120, 3000, 50, 9000, 400, 20_000, 64, 5000, 700];
    let mut i = 0;
    while b.bytes.len() < len {
        b.record(sizes[i % sizes.len()], 10, 0);
        i += 1;
    }
    b.bytes.truncate(len);
    (b.bytes, b.records)
}

/// The preallocated partial at `path` holds `wal`, then zeros to the segment's end.
fn assert_partial(path: &Path, wal: &[u8]) {
    let held = fs::read(path).unwrap();
    assert_eq!(held.len() as u64, SEG, "{} is preallocated", path.display());
    assert!(held[..wal.len()] == wal[..], "{} differs", path.display());
    assert!(
        held[wal.len()..].iter().all(|b| *b == 0),
        "{} holds bytes after its WAL",
        path.display()
    );
}

fn diverge(data: &[u8], from: usize) -> Vec<u8> {
    let mut d = data.to_vec();
    for (i, b) in d[from..].iter_mut().enumerate() {
        if (from + i) % XLOG_BLCKSZ >= 40 {
            *b ^= 0x5A;
        }
    }
    d
}

/// Issue 19, point 10: a segment completed before the sender's confirmation arrived is confirmed all
/// the same, so a sender resumes in the next segment (the one PostgreSQL still has after a restart).
#[test]
fn a_completed_segment_is_confirmed_before_its_confirmation_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let start = 2 * SEG;
    let data = wal(start, SEG as usize + 100);
    a.begin_session();
    a.append(1, Lsn(start), &data).unwrap();
    a.confirm(1, Lsn(start + 100));
    let synced = a.sync(1).unwrap().unwrap();
    assert_eq!(synced.confirmed, Lsn(start + SEG));
    assert_eq!(a.begin_session(), vec![(1, Lsn(start + SEG))]);
}

/// The first WAL of a timeline new to this receiver (a new archive, a promoted primary) is provisional like
/// any other until the primary confirms it: a sender that reconnects before the first confirmation resumes
/// at the timeline's start and resends it for comparison (DESIGN.md §1), never after it. Found while moving
/// the archive's per-timeline state into one place: a timeline without a confirmation resumed at its
/// durable end.
#[test]
fn a_new_timeline_resumes_at_its_start_until_something_is_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let start = 2 * SEG;
    let data = wal(start, 20_000);
    a.begin_session();
    a.append(1, Lsn(start), &data).unwrap(); // shipped on write, not yet flushed by the primary
    let synced = a.sync(1).unwrap().unwrap();
    assert_eq!(synced.durable, Lsn(start + 20_000));
    assert_eq!(synced.confirmed, Lsn(start), "nothing confirmed yet");
    // the sender reconnects (a network cut, or the primary's host lost power): it resends from the start
    assert_eq!(a.begin_session(), vec![(1, Lsn(start))]);
    // and a primary whose OS lost the unflushed WAL sends other bytes there: they replace the provisional ones
    let other = diverge(&data, 4096);
    a.append(1, Lsn(start), &other).unwrap();
    a.confirm(1, Lsn(start + 20_000));
    let synced = a.sync(1).unwrap().unwrap();
    assert_eq!(
        (synced.durable, synced.confirmed),
        (Lsn(start + 20_000), Lsn(start + 20_000))
    );
    assert_partial(&path.join("000000010000000000000002.partial"), &other);
}

/// Issue 19, point 5: `walship.position` is not fsynced, so a power loss of the standby can leave an
/// older one. What decides the resume point never falls below what the files prove (everything before
/// the open partial is confirmed), so a sender never resumes behind the segment its slot holds.
#[test]
fn a_stale_position_file_never_moves_the_resume_point_behind_the_open_partial() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let start = 2 * SEG;
    let (data, records) = wal_records(start, SEG as usize + 60_000);
    a.begin_session();
    append_confirmed(&mut a, 1, Lsn(start), &data[..SEG as usize + 20_000]);
    a.append(1, Lsn(start + SEG + 20_000), &data[SEG as usize + 20_000..])
        .unwrap();
    let synced = a.sync(1).unwrap().unwrap();
    assert_eq!(synced.confirmed, Lsn(start + SEG + 20_000));
    drop(a);
    // the position file as it was long before: confirmed in the segment before the partial
    let stale = Positions {
        timeline: 1,
        durable: Lsn(start + 10_000),
        confirmed: Lsn(start + 10_000),
    };
    std::fs::write(path.join(POSITION_FILE), stale.render()).unwrap();
    let mut a = Archive::open(&path).unwrap();
    // the position does not speak of the partial: it ends at its last complete record
    let last = records
        .iter()
        .map(|r| r.end)
        .filter(|e| e.0 <= start + SEG + 60_000)
        .max()
        .unwrap();
    assert!(last.0 > start + SEG + 20_000);
    assert_eq!(a.durable_end(1), Some(last));
    assert_eq!(
        a.begin_session(),
        vec![(1, Lsn(start + SEG))],
        "the complete segment is confirmed; the partial is compared from its start"
    );
}

/// Issue 19, point 10: PostgreSQL crashed right after a WAL switch, and the restarted server removed the
/// switched segment before the sender could resend its tail. The sender resumes at the next segment; the
/// archive links it through the switch record (the next record's `xl_prev`) and pads the segment (part
/// of the padding may be there already: a drain ships what it finds), or
/// refuses and stays unchanged when the link does not hold.
#[test]
fn a_resume_after_a_removed_switched_segment_links_through_the_switch() {
    use walship_protocol::walker::{WalBuilder, RM_XLOG_ID, XLOG_SWITCH};
    let exp = identity().page_expectation(1).unwrap();
    let start = 2 * SEG;
    let mut b = WalBuilder::new(exp, Lsn(start));
    for _ in 0..20 {
        b.record(300, 10, 0);
    }
    let switch = b.record(0, RM_XLOG_ID, XLOG_SWITCH);
    for _ in 0..5 {
        b.record(200, 10, 0);
    }
    let own_end = (switch.own_end.0 - start) as usize;
    let next = (3 * SEG - start) as usize;

    let open = |name: &str, shipped: usize| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let mut a = Archive::open(&path).unwrap();
        a.check_or_pin_identity(identity()).unwrap().unwrap();
        a.begin_session();
        // shipped up to the switch record's own end or into its padding; only the first records confirmed
        a.append(1, Lsn(start), &b.bytes[..shipped]).unwrap();
        a.confirm(1, Lsn(start + 1000));
        a.sync(1).unwrap();
        drop(a);
        let mut a = Archive::open(&path).unwrap();
        assert_eq!(a.begin_session(), vec![(1, Lsn(start + 1000))]);
        (dir, path, a)
    };

    // WAL of another history at the next segment: its first record does not follow the switch
    let (_dir, path, mut a) = open("refused", own_end);
    let mut other = WalBuilder::new(exp, Lsn(3 * SEG));
    other.record(200, 10, 0);
    let err = a.append(1, Lsn(3 * SEG), &other.bytes).unwrap_err();
    assert!(format!("{err:#}").contains("gap"), "{err:#}");
    assert_partial(
        &path.join("000000010000000000000002.partial"),
        &b.bytes[..own_end],
    );
    assert!(!path.join("000000010000000000000003.partial").exists());

    // the primary's own next record: linked, the segment completed with its (zero) padding, whether
    // the archive held the switch alone or some of its padding as well
    for shipped in [own_end, next - 1] {
        let (_dir, path, mut a) = open("linked", shipped);
        a.append(1, Lsn(3 * SEG), &b.bytes[next..]).unwrap();
        let synced = a.sync(1).unwrap().unwrap();
        assert_eq!(synced.durable, b.end());
        assert_eq!(
            fs::read(path.join("000000010000000000000002")).unwrap(),
            b.bytes[..next],
            "the switched segment is the primary's, padding included"
        );
        assert_partial(
            &path.join("000000010000000000000003.partial"),
            &b.bytes[next..],
        );
    }
}

#[test]
fn provisional_bytes_are_replaced_confirmed_bytes_never() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let start = 2 * SEG;
    let data = wal(start, 60_000);
    // a protocol-3 session: 60,000 bytes shipped on write, the primary confirmed 30,000 of them
    assert_eq!(a.begin_session(), vec![]);
    a.append(1, Lsn(start), &data).unwrap();
    a.confirm(1, Lsn(start + 30_000));
    let synced = a.sync(1).unwrap().unwrap();
    assert_eq!(synced.durable, Lsn(start + 60_000));
    assert_eq!(synced.confirmed, Lsn(start + 30_000));
    drop(a);

    // the primary's OS crashed; after its restart its WAL differs from 45,000 on
    let mut a = Archive::open(&path).unwrap();
    assert_eq!(a.durable_end(1), Some(Lsn(start + 60_000)));
    assert_eq!(a.begin_session(), vec![(1, Lsn(start + 30_000))]);
    let other = diverge(&data, 45_000);
    // it resends from the confirmed end; the same bytes first, then the different ones
    a.append(1, Lsn(start + 30_000), &other[30_000..40_000])
        .unwrap();
    let synced = a.sync(1).unwrap().unwrap();
    assert_eq!(
        synced.durable,
        Lsn(start + 40_000),
        "nothing beyond what this session sent is acknowledged"
    );
    a.append(1, Lsn(start + 40_000), &other[40_000..50_000])
        .unwrap();
    a.confirm(1, Lsn(start + 50_000));
    let synced = a.sync(1).unwrap().unwrap();
    assert_eq!(synced.durable, Lsn(start + 50_000));
    assert_eq!(synced.confirmed, Lsn(start + 50_000));
    let partial = path.join("000000010000000000000002.partial");
    assert_partial(&partial, &other[..50_000]);

    // now confirmed, those bytes never change again: a differing resend is refused
    drop(a);
    let mut a = Archive::open(&path).unwrap();
    assert_eq!(a.begin_session(), vec![(1, Lsn(start + 50_000))]);
    let third = diverge(&other, 48_000);
    let err = a
        .append(1, Lsn(start + 40_000), &third[40_000..])
        .unwrap_err();
    assert!(format!("{err:#}").contains("confirmed"), "{err:#}");
    assert_partial(&partial, &other[..50_000]);
}

#[test]
fn a_complete_segment_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let data = wal(0, SEG as usize + 8192);
    a.begin_session();
    a.append(1, Lsn(0), &data).unwrap();
    a.confirm(1, Lsn(SEG - 8192));
    a.sync(1).unwrap();
    a.begin_session();
    let other = diverge(&data, SEG as usize - 100);
    let err = a
        .append(1, Lsn(SEG - 8192), &other[(SEG - 8192) as usize..])
        .unwrap_err();
    // a complete segment is confirmed (it holds only flushed WAL): refused as confirmed WAL
    assert!(
        format!("{err:#}").contains("refusing to overwrite"),
        "{err:#}"
    );
    assert_eq!(
        fs::read(path.join("000000010000000000000000")).unwrap(),
        data[..SEG as usize]
    );
}

#[test]
fn append_complete_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    assert_eq!(a.check_or_pin_identity(identity()).unwrap(), Ok(()));
    let start = 3 * SEG;
    let data = wal(start, (SEG + 5000) as usize);
    append_confirmed(&mut a, 1, Lsn(start), &data[..100_000]);
    append_confirmed(&mut a, 1, Lsn(start + 100_000), &data[100_000..]);
    assert_eq!(
        a.sync(1).unwrap().map(|s| s.durable),
        Some(Lsn(start + SEG + 5000))
    );
    assert_eq!(
        fs::read(path.join("000000010000000000000003")).unwrap(),
        data[..SEG as usize]
    );
    assert_partial(
        &path.join("000000010000000000000004.partial"),
        &data[SEG as usize..],
    );

    // a second receiver cannot open it
    assert!(Archive::open(&path)
        .unwrap_err()
        .to_string()
        .contains("in use"));
    drop(a);
    let mut a = Archive::open(&path).unwrap();
    assert_eq!(a.resume_points(), vec![(1, Lsn(start + SEG + 5000))]);
    // identical resend is accepted, different is refused, a gap is refused
    append_confirmed(&mut a, 1, Lsn(start + 10), &data[10..20_000]);
    let mut bad = data[10..20_000].to_vec();
    bad[500] ^= 0xFF;
    assert!(a
        .append(1, Lsn(start + 10), &bad)
        .unwrap_err()
        .to_string()
        .contains("differs"));
    assert!(a
        .append(1, Lsn(start + SEG + 6000), &[1])
        .unwrap_err()
        .to_string()
        .contains("gap"));
    // foreign cluster refused
    let other = Identity {
        system_identifier: 1,
        ..identity()
    };
    assert!(matches!(
        a.check_or_pin_identity(other).unwrap(),
        Err(IdentityMismatch::ForeignCluster { .. })
    ));
    let other = Identity {
        wal_segment_size: WalSegSize::new(2 * SEG).unwrap(),
        ..identity()
    };
    assert!(matches!(
        a.check_or_pin_identity(other).unwrap(),
        Err(IdentityMismatch::SegmentSize { .. })
    ));
}

#[test]
fn torn_tails_are_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let data = wal(0, 40_000);
    append_confirmed(&mut a, 1, Lsn(0), &data);
    a.sync(1).unwrap();
    drop(a);
    // a power loss may leave zeros past the durable end, or garbage pages
    let partial = path.join("000000010000000000000000.partial");
    let mut f = OpenOptions::new().append(true).open(&partial).unwrap();
    f.write_all(&vec![0u8; 30_000]).unwrap();
    drop(f);
    let a = Archive::open(&path).unwrap();
    assert_eq!(a.resume_points(), vec![(1, Lsn(40_000))]);
    drop(a);
    let mut bytes = fs::read(&partial).unwrap();
    bytes[4 * XLOG_BLCKSZ] ^= 0xFF; // damage the magic of page 4
    fs::write(&partial, &bytes).unwrap();
    let a = Archive::open(&path).unwrap();
    assert_eq!(a.resume_points(), vec![(1, Lsn(4 * XLOG_BLCKSZ as u64))]);
}

#[test]
fn refuses_foreign_directories_and_new_timelines_mid_segment() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("000000010000000000000001"), b"x").unwrap();
    assert!(Archive::open(dir.path())
        .unwrap_err()
        .to_string()
        .contains("not made by walship"));

    let dir = tempfile::tempdir().unwrap();
    let mut a = Archive::open(dir.path()).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    assert!(a
        .append(2, Lsn(SEG + 8), &[1, 2])
        .unwrap_err()
        .to_string()
        .contains("segment boundary"));
    a.store_history(2, b"1\t0/100000\tx\n").unwrap();
    a.store_history(2, b"1\t0/100000\tx\n").unwrap();
    assert!(a.store_history(2, b"1\t0/200000\ty\n").is_err());
}

/// Issue 21: a power loss between a write into a preallocated partial and its fsync may keep some of the
/// write's blocks and not others. The partial then ends at its last complete, valid record (as PostgreSQL's
/// recovery finds it), never below the durable end recorded; whatever lies beyond is zeroed and resent.
#[test]
fn a_torn_write_into_a_preallocated_partial_ends_at_its_last_valid_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let start = 2 * SEG;
    let (data, records) = wal_records(start, 200_000);
    a.begin_session();
    append_confirmed(&mut a, 1, Lsn(start), &data[..100_000]);
    a.sync(1).unwrap();
    // written, not yet fsynced when the power fails
    a.append(1, Lsn(start + 100_000), &data[100_000..200_000])
        .unwrap();
    drop(a);
    let partial = path.join("000000010000000000000002.partial");
    let f = OpenOptions::new().write(true).open(&partial).unwrap();
    f.write_all_at(&[0u8; 4096], 150_000 / 4096 * 4096).unwrap(); // a block that never reached the disk
    drop(f);
    let torn = (150_000 / 4096 * 4096) as u64 + start;
    let expected = records
        .iter()
        .map(|r| r.end)
        .filter(|e| *e <= Lsn(torn))
        .max()
        .unwrap();
    let mut a = Archive::open(&path).unwrap();
    assert_eq!(a.durable_end(1), Some(expected));
    assert_eq!(a.begin_session(), vec![(1, Lsn(start + 100_000))]);
    let valid = (expected.0 - start) as usize;
    assert_partial(&partial, &data[..valid]);
    // the sender resends from the confirmed end: the same bytes, compared and appended
    a.append(1, Lsn(start + 100_000), &data[100_000..200_000])
        .unwrap();
    a.confirm(1, Lsn(start + 200_000));
    assert_eq!(
        a.sync(1).unwrap().map(|s| s.durable),
        Some(Lsn(start + 200_000))
    );
    assert_partial(&partial, &data);
}

/// Issue 21: a partial written by a receiver before preallocation grows with each append. Opened by this
/// one, it ends where its size says (what was acknowledged), is filled with zeros to the segment's size and
/// appended to.
#[test]
fn a_growing_partial_of_an_older_receiver_is_filled_and_continued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut a = Archive::open(&path).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    drop(a);
    let start = 2 * SEG;
    let data = wal(start, 150_000);
    let partial = path.join("000000010000000000000002.partial");
    fs::write(&partial, &data[..70_000]).unwrap();
    let old = Positions {
        timeline: 1,
        durable: Lsn(start + 70_000),
        confirmed: Lsn(start + 70_000),
    };
    fs::write(path.join(POSITION_FILE), old.render()).unwrap();
    // restore and status read a growing partial's end from its size
    assert_eq!(partial_end(&path, &identity(), 1, 2).unwrap(), 70_000);
    let mut a = Archive::open(&path).unwrap();
    assert_eq!(a.durable_end(1), Some(Lsn(start + 70_000)));
    // filled up, its end is still found: the last record, or the durable end recorded beyond it
    assert_eq!(partial_end(&path, &identity(), 1, 2).unwrap(), 70_000);
    assert_eq!(a.begin_session(), vec![(1, Lsn(start + 70_000))]);
    assert_partial(&partial, &data[..70_000]);
    a.append(1, Lsn(start + 70_000), &data[70_000..]).unwrap();
    a.confirm(1, Lsn(start + 150_000));
    assert_eq!(
        a.sync(1).unwrap().map(|s| s.durable),
        Some(Lsn(start + 150_000))
    );
    assert_partial(&partial, &data);
}
