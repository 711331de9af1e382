//! What the receiver's integration tests share: a test cluster's identity and valid-looking WAL.

// not every test binary uses every helper
#![allow(dead_code)]

pub mod client;

use walship_protocol::{Lsn, WalSegSize};
use walship_receiver::archive::Identity;

pub const SEG: u64 = 1 << 20;

pub fn identity() -> Identity {
    Identity {
        system_identifier: 7,
        wal_segment_size: WalSegSize::new(SEG).unwrap(),
        pg_version_num: 150004,
    }
}

/// Valid WAL of `timeline` for `[start, start + len)`, `start` page-aligned: records of varied sizes, framed
/// as PostgreSQL frames them (the last one may be cut off at `len`).
pub fn wal(timeline: u32, start: u64, len: usize) -> Vec<u8> {
    let exp = identity().page_expectation(timeline).unwrap();
    let mut b = walship_protocol::walker::WalBuilder::new(exp, Lsn(start));
    let sizes = [120, 3000, 50, 9000, 400, 20_000, 64, 5000, 700];
    let mut i = 0;
    while b.bytes.len() < len {
        b.record(sizes[i % sizes.len()], 10, 0);
        i += 1;
    }
    b.bytes.truncate(len);
    b.bytes
}

/// Where the last complete record of `wal` (WAL of timeline 1 from the segment start `start`) ends.
pub fn last_record_end(start: u64, wal: &[u8]) -> u64 {
    let exp = identity().page_expectation(1).unwrap();
    start + walship_protocol::walker::valid_prefix(exp, Lsn(start), wal).records as u64
}

/// The preallocated partial at `path` holds `wal`, then zeros to the segment's end.
pub fn assert_partial(path: &std::path::Path, wal: &[u8]) {
    let held = std::fs::read(path).unwrap();
    assert_eq!(held.len() as u64, SEG, "{} is preallocated", path.display());
    assert!(held[..wal.len()] == wal[..], "{} differs", path.display());
    assert!(
        held[wal.len()..].iter().all(|b| *b == 0),
        "{} holds bytes after its WAL",
        path.display()
    );
}

/// Appends and confirms, as a sender of protocol 1 or 2 does (it sends only WAL the primary has flushed).
#[allow(dead_code)] // not every test file appends directly
pub fn append_confirmed(
    a: &mut walship_receiver::archive::Archive,
    timeline: u32,
    start: Lsn,
    bytes: &[u8],
) {
    a.append(timeline, start, bytes).unwrap();
    a.confirm(timeline, Lsn(start.0 + bytes.len() as u64));
}
