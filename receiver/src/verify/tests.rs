//! The timeline walk over WAL built record by record: clean, a bit flip, a missing segment, a partial.

use walship_protocol::wal::{PageExpectation, XLOG_BLCKSZ};
use walship_protocol::walker::WalBuilder;
use walship_protocol::{Lsn, WalSegSize};

use super::walk::TimelineWalk;
use super::ProblemKind;

const SEG: u64 = 1 << 20;

fn exp() -> PageExpectation {
    PageExpectation {
        magic: walship_protocol::wal::page_magic_for_version(150000).unwrap(),
        system_identifier: 42,
        seg_size: WalSegSize::new(SEG).unwrap(),
        timeline: 1,
    }
}

/// Three segments (1 to 3) of records of varied sizes, some crossing pages and segments.
fn wal() -> WalBuilder {
    let mut b = WalBuilder::new(exp(), Lsn(SEG));
    let sizes = [100usize, 3000, 20_000, 50, 9000, 400, 70_000];
    let mut i = 0;
    while b.end().0 < 4 * SEG - 200_000 {
        b.record(sizes[i % sizes.len()], 10, 0);
        i += 1;
    }
    b
}

fn segment(b: &WalBuilder, segno: u64) -> &[u8] {
    let from = ((segno * SEG) - b.start.0) as usize;
    &b.bytes[from..(from + SEG as usize).min(b.bytes.len())]
}

/// Feeds segments (segno, bytes, complete) in chunks of 100 kB, as a file is read.
fn walk(files: &[(u64, &[u8], bool)]) -> TimelineWalk {
    let mut w = TimelineWalk::new(exp());
    for (segno, bytes, complete) in files {
        w.begin_segment(*segno, &format!("seg{segno}"), *complete);
        let mut at = *segno * SEG;
        for chunk in bytes.chunks(100_000) {
            w.feed(Lsn(at), chunk);
            at += chunk.len() as u64;
        }
    }
    w.finish();
    w
}

#[test]
fn clean_wal_is_one_range_from_the_first_record_to_the_last() {
    let b = wal();
    let mut partial = segment(&b, 3).to_vec();
    partial.resize(SEG as usize, 0);
    let w = walk(&[
        (1, segment(&b, 1), true),
        (2, segment(&b, 2), true),
        (3, &partial, false),
    ]);
    assert!(w.problems.is_empty(), "{:?}", w.problems);
    let first = b.records.first().unwrap().start;
    let last = b.records.last().unwrap().end;
    assert_eq!(w.ranges, vec![(first, last)]);
    assert_eq!(w.records, b.records.len() as u64);
}

#[test]
fn a_bit_flip_inside_a_record_splits_the_range_there() {
    let b = wal();
    let victim = b.records[b.records.len() / 2];
    let mut seg2 = segment(&b, 2).to_vec();
    let mut seg3 = segment(&b, 3).to_vec();
    let at = victim.start.0 + 30;
    match at / SEG {
        2 => seg2[(at - 2 * SEG) as usize] ^= 0x10,
        _ => seg3[(at - 3 * SEG) as usize] ^= 0x10,
    }
    seg3.resize(SEG as usize, 0);
    let w = walk(&[
        (1, segment(&b, 1), true),
        (2, &seg2, true),
        (3, &seg3, false),
    ]);
    assert_eq!(w.problems.len(), 1, "{:?}", w.problems);
    assert_eq!(w.problems[0].kind, ProblemKind::DamagedRecord);
    assert_eq!(w.problems[0].lsn, Some(victim.start));
    assert_eq!(w.ranges.len(), 2);
    assert_eq!(w.ranges[0], (b.records[0].start, victim.start));
    // the walk resynchronised on a later record and went on to the end
    assert!(
        w.ranges[1].0 > victim.start
            && w.ranges[1].0 .0 <= victim.end.0 + 2 * XLOG_BLCKSZ as u64 + 70_000
    );
    assert_eq!(w.ranges[1].1, b.records.last().unwrap().end);
}

#[test]
fn a_missing_segment_is_a_gap_named_by_its_file() {
    let b = wal();
    let w = walk(&[(1, segment(&b, 1), true), (3, segment(&b, 3), true)]);
    assert_eq!(w.problems.len(), 1, "{:?}", w.problems);
    assert_eq!(w.problems[0].kind, ProblemKind::Gap);
    assert_eq!(w.problems[0].file, "000000010000000000000002");
    assert_eq!(w.problems[0].lsn, Some(Lsn(2 * SEG)));
    assert_eq!(w.ranges.len(), 2);
    // the first range ends with the last record complete in segment 1
    let last_in_1 = b.records.iter().rfind(|r| r.end.0 <= 2 * SEG).unwrap();
    assert_eq!(w.ranges[0].1, last_in_1.end);
    assert!(w.ranges[1].0 >= Lsn(3 * SEG));
}

#[test]
fn a_partial_ends_at_its_last_valid_record_and_a_torn_one_is_not_a_problem() {
    let b = wal();
    let mut partial = segment(&b, 2).to_vec();
    let cut_record = b
        .records
        .iter()
        .find(|r| r.start.0 > 2 * SEG + 300_000)
        .unwrap();
    // written up to the middle of a record (a torn write), zeros after
    partial.truncate((cut_record.start.0 + 20 - 2 * SEG) as usize);
    partial.resize(SEG as usize, 0);
    let w = walk(&[(1, segment(&b, 1), true), (2, &partial, false)]);
    assert!(w.problems.is_empty(), "{:?}", w.problems);
    assert_eq!(w.ranges, vec![(b.records[0].start, cut_record.start)]);
    assert_eq!(w.partial_end(), Some(cut_record.start));
}

#[test]
fn a_partial_followed_by_a_later_segment_is_a_gap() {
    let b = wal();
    let mut partial = segment(&b, 2)[..300_000].to_vec();
    partial.resize(SEG as usize, 0);
    let w = walk(&[
        (1, segment(&b, 1), true),
        (2, &partial, false),
        (3, segment(&b, 3), true),
    ]);
    assert_eq!(w.problems.len(), 1, "{:?}", w.problems);
    assert_eq!(w.problems[0].kind, ProblemKind::Gap);
    assert_eq!(w.ranges.len(), 2);
}
