//! What the receiver's integration tests share: a test cluster's identity and valid-looking WAL.

use walship_protocol::wal::{write_page_header, XLOG_BLCKSZ};
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

/// Valid-looking WAL of `timeline` for `[start, start + len)`, `start` page-aligned: page headers where
/// pages start, non-zero filler elsewhere.
pub fn wal(timeline: u32, start: u64, len: usize) -> Vec<u8> {
    let exp = identity().page_expectation(timeline).unwrap();
    let mut buf: Vec<u8> = (0..len + XLOG_BLCKSZ)
        .map(|i| (i % 251) as u8 | 1)
        .collect();
    let mut p = 0;
    while p < len {
        write_page_header(&mut buf[p..], Lsn(start + p as u64), &exp);
        p += XLOG_BLCKSZ;
    }
    buf.truncate(len);
    buf
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
