//! One timeline's WAL walked record by record across its segments, as recovery reads it: page headers, the
//! `xl_prev` chain across pages and segments, each record's length and CRC-32C, continuation and switch
//! records. Fed in order, a chunk at a time (memory: one chunk, plus the bytes of a record that continues into
//! the next chunk); what it finds are the ranges of WAL that replay without a break, and the problems that
//! break them.

use walship_protocol::wal::{segment_file_name, PageExpectation, SegNo, XLOG_BLCKSZ};
use walship_protocol::walker::{WalkStop, Walker};
use walship_protocol::{Lsn, WalSegSize};

use super::{Problem, ProblemKind};

const BLCKSZ: u64 = XLOG_BLCKSZ as u64;

fn page_of(lsn: Lsn) -> Lsn {
    Lsn(lsn.0 - lsn.0 % BLCKSZ)
}

/// The walk of one timeline's segments.
pub(crate) struct TimelineWalk {
    exp: PageExpectation,
    seg: WalSegSize,
    walker: Option<Walker>,
    /// WAL from `base` on that the walk still needs: from the page of the walker's next record on (or from
    /// `resync_at` without a walker).
    buf: Vec<u8>,
    base: Lsn,
    /// Without a walker: the page where the search for the next record starts.
    resync_at: Lsn,
    /// Where the range of WAL being walked began.
    range_start: Option<Lsn>,
    /// The file being walked, and whether it is a complete segment.
    file: String,
    complete: bool,
    /// A partial whose WAL ended (its valid end): the rest of the file is not WAL.
    ended: Option<Lsn>,
    next_segno: Option<SegNo>,
    pub ranges: Vec<(Lsn, Lsn)>,
    pub problems: Vec<Problem>,
    pub records: u64,
    pub segments: usize,
}

impl TimelineWalk {
    pub fn new(exp: PageExpectation) -> TimelineWalk {
        TimelineWalk {
            exp,
            seg: exp.seg_size,
            walker: None,
            buf: Vec::new(),
            base: Lsn(0),
            resync_at: Lsn(0),
            range_start: None,
            file: String::new(),
            complete: true,
            ended: None,
            next_segno: None,
            ranges: Vec::new(),
            problems: Vec::new(),
            records: 0,
            segments: 0,
        }
    }

    pub fn timeline(&self) -> walship_protocol::TimelineId {
        self.exp.timeline
    }

    /// Where the valid WAL walked so far ends (the end of the last valid record).
    pub fn end(&self) -> Option<Lsn> {
        self.walker.as_ref().map(Walker::next_lsn)
    }

    /// Starts segment `segno` (file `file`; `complete` unless a `.partial`). A segment that does not follow
    /// the one before breaks the WAL there, as does a partial followed by anything.
    pub fn begin_segment(&mut self, segno: SegNo, file: &str, complete: bool) {
        let start = self.seg.segment_start(segno);
        if let Some(next) = self.next_segno {
            if let Some(end) = self.ended.take() {
                self.problem(
                    ProblemKind::Gap,
                    Some(end),
                    format!(
                        "the partial segment's WAL ends at {end}, but {file} follows it: the WAL between is \
                         missing, recovery stops at {end}"
                    ),
                );
                self.break_walk();
                self.buf.clear();
            } else if segno != next {
                let missing = if segno == next + 1 {
                    segment_file_name(self.exp.timeline, next, self.seg)
                } else {
                    format!(
                        "{} to {}",
                        segment_file_name(self.exp.timeline, next, self.seg),
                        segment_file_name(self.exp.timeline, segno - 1, self.seg)
                    )
                };
                let at = self.seg.segment_start(next);
                self.file = missing.clone();
                self.problem(
                    ProblemKind::Gap,
                    Some(at),
                    format!(
                        "missing from the archive (WAL {at} to {start}): recovery stops at {}",
                        self.end().unwrap_or(at)
                    ),
                );
                self.break_walk();
                self.buf.clear();
            }
        }
        if self.walker.is_none() && self.buf.is_empty() {
            self.base = start;
            self.resync_at = start;
        }
        self.next_segno = Some(segno + 1);
        self.file = file.to_owned();
        self.complete = complete;
        self.segments += 1;
    }

    /// The next bytes of the current segment (`at` is where they start: right after the bytes fed before).
    pub fn feed(&mut self, at: Lsn, bytes: &[u8]) {
        if self.ended.is_some() {
            return;
        }
        debug_assert_eq!(at.0, self.base.0 + self.buf.len() as u64);
        self.buf.extend_from_slice(bytes);
        self.walk();
    }

    /// Reads the next bytes of the current segment (up to `max`) from `file` straight into the walk's
    /// buffer (one copy, the kernel's); returns how many (0 at the file's end).
    pub fn feed_from(
        &mut self,
        file: &mut impl std::io::Read,
        max: usize,
    ) -> std::io::Result<usize> {
        if self.ended.is_some() {
            return Ok(0);
        }
        let from = self.buf.len();
        self.buf.resize(from + max, 0);
        let mut got = 0;
        while got < max {
            match file.read(&mut self.buf[from + got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(from);
                    return Err(e);
                }
            }
        }
        self.buf.truncate(from + got);
        if got > 0 {
            self.walk();
        }
        Ok(got)
    }

    /// The walk is over: the last range ends where the valid WAL ends.
    pub fn finish(&mut self) {
        self.break_walk();
    }

    fn walk(&mut self) {
        loop {
            if self.walker.is_none() {
                let off = (self.resync_at.0 - self.base.0) as usize;
                if off >= self.buf.len() {
                    return;
                }
                match Walker::resync(self.exp, &self.buf[off..], self.resync_at) {
                    Ok(w) => {
                        self.range_start = Some(w.next_lsn());
                        self.walker = Some(w);
                    }
                    Err(WalkStop::Invalid { at, reason }) => {
                        if !self.complete {
                            // a partial with no valid page there: its WAL ends before it
                            self.ended = Some(at);
                            return;
                        }
                        self.problem(
                            ProblemKind::InvalidPage,
                            Some(at),
                            format!("not a valid WAL page of this cluster and timeline: {reason}"),
                        );
                        self.resync_at = Lsn(page_of(at).0 + BLCKSZ);
                        self.trim();
                        continue;
                    }
                    // more bytes needed
                    Err(_) => return,
                }
            }
            let w = self.walker.as_mut().expect("a walker");
            let mut records = 0u64;
            let stop = w.walk(&self.buf, self.base, |_| records += 1);
            self.records += records;
            match stop {
                WalkStop::Invalid { at, reason } => {
                    if !self.complete {
                        // a partial's WAL ends at its first invalid record (zeros, or a torn write)
                        self.ended = Some(at);
                        return;
                    }
                    self.problem(
                        ProblemKind::DamagedRecord,
                        Some(at),
                        format!(
                            "no valid record at {at} inside a complete segment: {reason}; recovery stops \
                             there (a bit flip, a torn write or an overwritten block)"
                        ),
                    );
                    self.break_walk();
                    self.resync_at = Lsn(page_of(at).0 + BLCKSZ);
                    self.trim();
                }
                // the bytes end inside the next record: it continues in the next chunk or segment
                _ => {
                    self.trim();
                    return;
                }
            }
        }
    }

    /// Ends the current range at the end of the valid WAL.
    fn break_walk(&mut self) {
        if let (Some(start), Some(w)) = (self.range_start.take(), self.walker.take()) {
            if w.next_lsn() > start {
                self.ranges.push((start, w.next_lsn()));
            }
        }
        self.walker = None;
    }

    /// Drops the bytes the walk no longer needs.
    fn trim(&mut self) {
        let keep_from = match &self.walker {
            Some(w) => page_of(w.next_lsn()),
            None => self.resync_at,
        };
        let drop = (keep_from.0.saturating_sub(self.base.0) as usize).min(self.buf.len());
        self.buf.drain(..drop);
        self.base = Lsn(self.base.0 + drop as u64);
    }

    fn problem(&mut self, kind: ProblemKind, lsn: Option<Lsn>, message: String) {
        self.problems.push(Problem {
            kind,
            timeline: self.exp.timeline,
            file: self.file.clone(),
            lsn,
            message,
        });
    }

    /// Where the current partial's WAL ended, if it did.
    pub fn partial_end(&self) -> Option<Lsn> {
        self.ended.or_else(|| self.end())
    }
}
