//! The cross-check: what the sender read from `pg_wal/` and shipped against what the walsender streamed, which
//! PostgreSQL sends only once it has flushed it. Both are contiguous from where the replication stream began;
//! whichever side is ahead waits in one queue until the other catches up, and each byte is compared once.

use std::collections::VecDeque;

use bytes::Bytes;
use walship_protocol::Lsn;

/// Which side a run of bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Read from `pg_wal/` and shipped to the receiver.
    Shipped,
    /// Streamed by the primary's walsender (flushed).
    Flushed,
}

/// Where the two sides disagree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CrossCheckError {
    #[error("the WAL walship read from pg_wal differs at {at} from what the primary's walsender streamed as flushed")]
    Mismatch { at: Lsn },
    #[error("internal: {side:?} bytes from {start} do not continue the stream at {end}")]
    Gap { side: Side, start: Lsn, end: Lsn },
}

/// The comparison state. Bytes before `from` are not compared (the primary had flushed them before the
/// replication stream began).
#[derive(Debug)]
pub struct CrossCheck {
    shipped_end: Lsn,
    flushed_end: Lsn,
    /// The bytes of the side that is ahead, from `checked` on.
    waiting: VecDeque<Bytes>,
    waiting_len: usize,
    ahead: Side,
    /// Everything before it was compared (or skipped over the limit).
    checked: Lsn,
    /// Most bytes waiting; beyond it the oldest are dropped uncompared (counted in `skipped`).
    limit: usize,
    /// Bytes confirmed without a comparison because one side ran more than `limit` ahead.
    pub skipped: u64,
    /// Bytes compared equal.
    pub compared: u64,
}

impl CrossCheck {
    pub fn new(from: Lsn, limit: usize) -> CrossCheck {
        CrossCheck {
            shipped_end: from,
            flushed_end: from,
            waiting: VecDeque::new(),
            waiting_len: 0,
            ahead: Side::Shipped,
            checked: from,
            limit,
            skipped: 0,
            compared: 0,
        }
    }

    /// Everything before this was compared equal (or skipped).
    pub fn checked(&self) -> Lsn {
        self.checked
    }

    /// Where the walsender's stream has reached: the primary has flushed everything before it.
    pub fn flushed_end(&self) -> Lsn {
        self.flushed_end
    }

    /// Takes in `bytes` starting at `start` from `side`, comparing what the other side already holds.
    pub fn add(&mut self, side: Side, start: Lsn, bytes: Bytes) -> Result<(), CrossCheckError> {
        let end = match side {
            Side::Shipped => &mut self.shipped_end,
            Side::Flushed => &mut self.flushed_end,
        };
        let stop = Lsn(start.0 + bytes.len() as u64);
        if stop <= *end {
            return Ok(()); // before the stream began, or already taken
        }
        if start > *end {
            return Err(CrossCheckError::Gap {
                side,
                start,
                end: *end,
            });
        }
        let mut bytes = bytes.slice((end.0 - start.0) as usize..);
        *end = stop;
        let mut at = stop.0 - bytes.len() as u64;
        // the other side's bytes dropped over the limit: these were not compared either
        if self.ahead != side && at < self.checked.0 {
            let skip = ((self.checked.0 - at) as usize).min(bytes.len());
            let _ = bytes.split_to(skip);
            at += skip as u64;
        }
        // compare against the other side's waiting bytes
        while !bytes.is_empty() && self.ahead != side && self.waiting_len > 0 {
            let front = self.waiting.front_mut().expect("waiting_len > 0");
            let n = front.len().min(bytes.len());
            if front[..n] != bytes[..n] {
                let i = front[..n]
                    .iter()
                    .zip(&bytes[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(CrossCheckError::Mismatch {
                    at: Lsn(at + i as u64),
                });
            }
            let _ = bytes.split_to(n);
            let _ = front.split_to(n);
            if front.is_empty() {
                self.waiting.pop_front();
            }
            self.waiting_len -= n;
            self.compared += n as u64;
            at += n as u64;
            self.checked = Lsn(at);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // this side is ahead now: its bytes wait for the other's
        self.ahead = side;
        self.waiting_len += bytes.len();
        self.waiting.push_back(bytes);
        while self.waiting_len > self.limit {
            let dropped = self.waiting.pop_front().expect("waiting_len > limit");
            self.waiting_len -= dropped.len();
            self.skipped += dropped.len() as u64;
            self.checked = Lsn(self.checked.0 + dropped.len() as u64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    #[test]
    fn equal_bytes_in_any_order_and_any_chunking_check_out() {
        let mut c = CrossCheck::new(Lsn(100), 1 << 20);
        // shipped from before the stream began: its head is not compared
        c.add(Side::Shipped, Lsn(90), b(b"0123456789abcdef"))
            .unwrap();
        assert_eq!(c.checked(), Lsn(100));
        c.add(Side::Flushed, Lsn(100), b(b"abc")).unwrap();
        assert_eq!(c.checked(), Lsn(103));
        c.add(Side::Flushed, Lsn(103), b(b"defXYZ")).unwrap();
        assert_eq!(c.checked(), Lsn(106));
        assert_eq!(c.flushed_end(), Lsn(109));
        c.add(Side::Shipped, Lsn(106), b(b"XY")).unwrap();
        c.add(Side::Shipped, Lsn(108), b(b"Z!")).unwrap();
        assert_eq!(c.checked(), Lsn(109));
        c.add(Side::Flushed, Lsn(109), b(b"!")).unwrap();
        assert_eq!(c.checked(), Lsn(110));
        assert_eq!(c.compared, 10);
        assert_eq!(c.skipped, 0);
    }

    #[test]
    fn a_differing_byte_is_named() {
        let mut c = CrossCheck::new(Lsn(0), 1 << 20);
        c.add(Side::Shipped, Lsn(0), b(b"hello world")).unwrap();
        assert_eq!(
            c.add(Side::Flushed, Lsn(0), b(b"hello_world")),
            Err(CrossCheckError::Mismatch { at: Lsn(5) })
        );
        let mut c = CrossCheck::new(Lsn(0), 1 << 20);
        c.add(Side::Flushed, Lsn(0), b(b"abc")).unwrap();
        c.add(Side::Flushed, Lsn(3), b(b"def")).unwrap();
        assert_eq!(
            c.add(Side::Shipped, Lsn(0), b(b"abcdeX")),
            Err(CrossCheckError::Mismatch { at: Lsn(5) })
        );
    }

    #[test]
    fn a_gap_is_an_error_and_repeats_are_ignored() {
        let mut c = CrossCheck::new(Lsn(0), 1 << 20);
        c.add(Side::Shipped, Lsn(0), b(b"abc")).unwrap();
        c.add(Side::Shipped, Lsn(0), b(b"abc")).unwrap();
        assert!(matches!(
            c.add(Side::Shipped, Lsn(4), b(b"x")),
            Err(CrossCheckError::Gap { .. })
        ));
    }

    #[test]
    fn a_side_far_ahead_is_bounded_and_counted() {
        let mut c = CrossCheck::new(Lsn(0), 4);
        c.add(Side::Flushed, Lsn(0), b(b"abc")).unwrap();
        c.add(Side::Flushed, Lsn(3), b(b"def")).unwrap();
        assert_eq!(c.skipped, 3);
        assert_eq!(c.checked(), Lsn(3));
        c.add(Side::Shipped, Lsn(0), b(b"abcdef")).unwrap();
        assert_eq!(c.checked(), Lsn(6));
        assert_eq!(c.compared, 3);
    }
}
