//! The WAL record walker: from a record boundary, decodes record after record the way PostgreSQL's
//! `xlogreader.c` does (`XLogDecodeNextRecord`), and answers "where does the last complete, valid record
//! end". No I/O and no clock: the caller hands it contiguous WAL bytes and the LSN of their first byte.
//!
//! What it checks, per record:
//! - every page header it crosses (magic, info bits, page address, timeline, and on a segment's first page
//!   the system identifier, segment size and block size: [`PageExpectation::check`]);
//! - `xl_tot_len` at least the record header (24 bytes) and at most PostgreSQL's limit (1020 MB);
//! - a record continued on the next page: that page has `XLP_FIRST_IS_CONTRECORD` and its `xlp_rem_len` is
//!   what is still missing of the record; or it has `XLP_FIRST_IS_OVERWRITE_CONTRECORD` (crash recovery
//!   found the record torn and wrote new WAL from that page on): the torn record is skipped, and the page's
//!   first record must be the `XLOG_OVERWRITE_CONTRECORD` naming it;
//! - the `xl_prev` chain: equal to the previous record's start when walking on from a known record, lower
//!   than the record's own address after a resynchronisation (as `XLogFindNextRecord` does);
//! - the CRC-32C of the record (body first, then the header up to `xl_crc`).
//!
//! Records are 8-byte aligned (MAXALIGN); one that starts at a page boundary starts after the page header;
//! an `XLOG_SWITCH` record ends its segment (the rest is padding).

use crate::error::PageError;
use crate::lsn::Lsn;
use crate::wal::{
    le_u32, le_u64, PageExpectation, PageHeader, LONG_PAGE_HEADER, SHORT_PAGE_HEADER, XLOG_BLCKSZ,
    XLP_FIRST_IS_CONTRECORD, XLP_FIRST_IS_OVERWRITE_CONTRECORD,
};

/// `SizeOfXLogRecord`: the fixed record header.
pub const RECORD_HEADER: usize = 24;
/// `XLogRecordMaxSize` (PostgreSQL 16; older servers never write larger records either).
pub const MAX_RECORD: u32 = 1020 * 1024 * 1024;
/// `RM_XLOG_ID`.
pub const RM_XLOG_ID: u8 = 0;
/// `XLOG_SWITCH` (in `xl_info & !XLR_INFO_MASK`).
pub const XLOG_SWITCH: u8 = 0x40;
/// `XLOG_CHECKPOINT_SHUTDOWN` (pg_control.h): a shutdown or end-of-recovery checkpoint.
pub const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
/// `XLOG_CHECKPOINT_ONLINE` (pg_control.h).
pub const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
/// `XLR_INFO_MASK`: the bits of `xl_info` that belong to the record machinery, not the resource manager.
pub const XLR_INFO_MASK: u8 = 0x0F;

const BLCKSZ: u64 = XLOG_BLCKSZ as u64;

/// `MAXALIGN` on x86-64 and arm64: 8 bytes.
pub fn maxalign(n: u64) -> u64 {
    (n + 7) & !7
}

/// One decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where the record starts.
    pub start: Lsn,
    /// Where the next record starts (`EndRecPtr`): past the alignment padding, or the end of the segment
    /// after an `XLOG_SWITCH`. Everything before it is this record or what precedes it.
    pub end: Lsn,
    /// Where this record's own bytes end (MAXALIGNed). The same as `end` except for an `XLOG_SWITCH`: the rest
    /// of its segment is padding that PostgreSQL writes when it flushes the switch, not before.
    pub own_end: Lsn,
    pub tot_len: u32,
    pub xid: u32,
    pub prev: Lsn,
    pub info: u8,
    pub rmid: u8,
}

impl Record {
    pub fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && self.info & !XLR_INFO_MASK == XLOG_SWITCH
    }

    /// A checkpoint record (`XLOG_CHECKPOINT_SHUTDOWN` or `XLOG_CHECKPOINT_ONLINE`).
    pub fn is_checkpoint(&self) -> bool {
        self.rmid == RM_XLOG_ID
            && matches!(
                self.info & !XLR_INFO_MASK,
                XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE
            )
    }
}

/// Why the walk stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WalkStop {
    /// The bytes end before the next record is complete: more WAL may still come (or this is where a torn
    /// write ends it).
    #[error("WAL ends in the middle of the record at {at} (more bytes needed)")]
    NeedMore { at: Lsn },
    /// The next record is not valid: WAL ends at `at`.
    #[error("no valid record at {at}: {reason}")]
    Invalid { at: Lsn, reason: RecordError },
}

/// What is wrong with a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("{0}")]
    Page(#[from] PageError),
    #[error("record length {len} is out of bounds")]
    Length { len: u32 },
    #[error("record offset {offset} in its page is inside the page header")]
    Offset { offset: u64 },
    #[error("the page says its first bytes continue a record, but a new record was expected")]
    ContrecordRequested,
    #[error("the record continues on page {page} but that page has no continuation flag")]
    NoContrecordFlag { page: Lsn },
    #[error("page {page} marks an overwritten continuation (the record was torn by a crash)")]
    OverwrittenContrecord { page: Lsn },
    #[error("page {page} marks the record as overwritten after a crash, but its first record names {named:?} instead")]
    OverwriteRecord { page: Lsn, named: Option<Lsn> },
    #[error("page {page} continues {found} bytes, {expected} were missing")]
    ContrecordLength {
        page: Lsn,
        found: u32,
        expected: u32,
    },
    #[error("prev-link {found} where {expected} was expected")]
    PrevLink { found: Lsn, expected: Lsn },
    #[error("prev-link {found} is not before the record")]
    PrevLinkAhead { found: Lsn },
    #[error("CRC-32C {found:08X} in the record, {computed:08X} computed")]
    Checksum { found: u32, computed: u32 },
}

/// How much of a segment file's first bytes (`data`, from the segment's first byte `start` on) is WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidPrefix {
    /// Bytes up to the first page whose header is invalid or incomplete (a multiple of the page size, or all).
    pub pages: usize,
    /// Bytes up to the end of the last complete, valid record, as PostgreSQL's recovery finds it (at an
    /// `XLOG_SWITCH`, the end of the switch record's own bytes: the rest of the segment is padding). 0 when no
    /// record starts and ends in `data`.
    pub records: usize,
}

/// Finds the [`ValidPrefix`] of a segment's bytes: where a preallocated (zero-filled) segment file's WAL
/// ends, and where a torn write ends it.
pub fn valid_prefix(exp: PageExpectation, start: Lsn, data: &[u8]) -> ValidPrefix {
    debug_assert_eq!(start.0 % BLCKSZ, 0);
    let mut pages = 0usize;
    while pages < data.len() {
        let end = (pages + XLOG_BLCKSZ).min(data.len());
        let header = if pages == 0 {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        };
        if end - pages < header
            || exp
                .check_pages(&data[pages..end], Lsn(start.0 + pages as u64))
                .is_err()
        {
            break;
        }
        pages = end;
    }
    let valid = &data[..pages];
    let records = match Walker::resync(exp, valid, start) {
        Ok(mut walker) => {
            let mut last = None;
            walker.walk(valid, start, |r| last = Some(*r));
            match last {
                Some(r) if r.is_switch() => r.own_end.0 - start.0,
                Some(_) => walker.next_lsn().0 - start.0,
                None => 0,
            }
        }
        Err(_) => 0,
    };
    ValidPrefix {
        pages,
        records: (records as usize).min(pages),
    }
}

/// WAL bytes `[base, base + bytes.len())`.
#[derive(Clone, Copy)]
struct Window<'a> {
    bytes: &'a [u8],
    base: Lsn,
}

impl<'a> Window<'a> {
    /// `len` bytes at `at`, if the window holds them.
    fn get(&self, at: Lsn, len: usize) -> Option<&'a [u8]> {
        let from = usize::try_from(at.0.checked_sub(self.base.0)?).ok()?;
        self.bytes.get(from..from.checked_add(len)?)
    }
}

/// Walks records forward. See the module docs.
#[derive(Clone, Debug)]
pub struct Walker {
    exp: PageExpectation,
    /// Where the next record starts (or the page boundary before it).
    next: Lsn,
    /// The start of the record before `next`, when known (then `xl_prev` must equal it).
    prev: Option<Lsn>,
}

impl Walker {
    /// A walker whose next record starts at `next` (a record boundary, or a page boundary where a record
    /// starts after the header); `prev` is the start of the record before it, if known.
    pub fn new(exp: PageExpectation, next: Lsn, prev: Option<Lsn>) -> Walker {
        Walker { exp, next, prev }
    }

    /// Where the next record starts: the end of the last record decoded.
    pub fn next_lsn(&self) -> Lsn {
        self.next
    }

    /// The start of the last record decoded, if any.
    pub fn prev_lsn(&self) -> Option<Lsn> {
        self.prev
    }

    /// Finds the first record that starts on the page at `page` (page-aligned) or, when that page is filled
    /// by the continuation of an earlier record, on a later page (`XLogFindNextRecord`). `bytes` are WAL from
    /// `page` on. Returns a walker positioned there, with an unknown previous record.
    pub fn resync(exp: PageExpectation, bytes: &[u8], page: Lsn) -> Result<Walker, WalkStop> {
        debug_assert_eq!(page.0 % BLCKSZ, 0);
        let w = Window { bytes, base: page };
        let mut p = page;
        loop {
            let h = page_header(&exp, &w, p)?;
            if h.info & XLP_FIRST_IS_CONTRECORD == 0 {
                return Ok(Walker::new(exp, Lsn(p.0 + h.len() as u64), None));
            }
            let room = BLCKSZ - h.len() as u64;
            let rem = maxalign(h.rem_len as u64);
            if rem >= room {
                p = Lsn(p.0 + BLCKSZ);
                continue;
            }
            return Ok(Walker::new(exp, Lsn(p.0 + h.len() as u64 + rem), None));
        }
    }

    /// Decodes the next record from `bytes` (WAL from `base` on; `base` at or before the next record, or at
    /// least at or before its page's header when the record starts on a page boundary) and moves past it.
    pub fn next_record(&mut self, bytes: &[u8], base: Lsn) -> Result<Record, WalkStop> {
        let w = Window { bytes, base };
        let rec = self.decode(&w)?;
        self.prev = Some(rec.start);
        self.next = rec.end;
        Ok(rec)
    }

    /// Decodes every record `bytes` holds completely; calls `each` for each. Returns why it stopped: at the
    /// end of the bytes ([`WalkStop::NeedMore`]) or at an invalid record. [`Walker::next_lsn`] is then the
    /// end of the last valid record.
    pub fn walk(&mut self, bytes: &[u8], base: Lsn, mut each: impl FnMut(&Record)) -> WalkStop {
        loop {
            match self.next_record(bytes, base) {
                Ok(rec) => each(&rec),
                Err(stop) => return stop,
            }
        }
    }

    fn decode(&self, w: &Window<'_>) -> Result<Record, WalkStop> {
        self.decode_at(w, self.next, None)
    }

    /// Decodes the record at `next`. `overwritten`: the record at `next` (a page boundary) replaces the torn
    /// record that started there, and has to say so (see [`Walker::check_overwrite`]).
    fn decode_at(
        &self,
        w: &Window<'_>,
        next: Lsn,
        overwritten: Option<Lsn>,
    ) -> Result<Record, WalkStop> {
        let invalid = |at: Lsn, reason: RecordError| WalkStop::Invalid { at, reason };
        let mut start = next;
        let page = Lsn(start.0 - start.0 % BLCKSZ);
        let off = start.0 - page.0;
        // the page's header: validated when the window holds it (it may start after it)
        let header = if w.base <= page {
            Some(page_header(&self.exp, w, page)?)
        } else {
            None
        };
        if let Some(h) = header {
            let hlen = h.len() as u64;
            if off == 0 {
                start = Lsn(page.0 + hlen);
            } else if off < hlen {
                return Err(invalid(start, RecordError::Offset { offset: off }));
            }
            if h.info & XLP_FIRST_IS_CONTRECORD != 0 && start.0 == page.0 + hlen {
                return Err(invalid(start, RecordError::ContrecordRequested));
            }
        } else if off == 0 {
            return Err(WalkStop::NeedMore { at: start });
        }
        let need_more = WalkStop::NeedMore { at: start };
        // xl_tot_len is always on the record's first page (records are MAXALIGNed)
        let tot_len = le_u32(w.get(start, 4).ok_or(need_more.clone())?, 0);
        if (tot_len as usize) < RECORD_HEADER || tot_len > MAX_RECORD {
            return Err(invalid(start, RecordError::Length { len: tot_len }));
        }
        let first = (BLCKSZ - start.0 % BLCKSZ).min(tot_len as u64) as usize;
        // The CRC-32C covers the data after the header, then the header's first 20 bytes: computed piece by
        // piece as the record's fragments come, never copied into one buffer (most records of a busy server
        // carry a full-page image and cross a page).
        let mut header = [0u8; RECORD_HEADER];
        let end;
        let crc;
        if first == tot_len as usize {
            let record = w.get(start, first).ok_or(need_more.clone())?;
            header.copy_from_slice(&record[..RECORD_HEADER]);
            self.check_header(&header, start)?;
            crc = crc32c::crc32c(&record[RECORD_HEADER..]);
            end = Lsn(start.0 + maxalign(tot_len as u64));
        } else {
            let mut pieces = Pieces {
                header: &mut header,
                have: 0,
                got: 0,
                crc: 0,
            };
            let mut checked = pieces.take(w.get(start, first).ok_or(need_more.clone())?);
            if checked {
                self.check_header(pieces.header, start)?;
            }
            let mut p = Lsn(page.0 + BLCKSZ);
            loop {
                let h = page_header(&self.exp, w, p).map_err(|e| match e {
                    WalkStop::NeedMore { .. } => need_more.clone(),
                    other => other,
                })?;
                if h.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
                    // The record was torn by a crash (its continuation never reached the disk) and crash
                    // recovery wrote new WAL from this page on: the torn record is skipped and the walk goes
                    // on with the page's first record, which has to name it (`xlogreader.c`,
                    // `overwrittenRecPtr`). Until that page is written, the walk ends at the torn record.
                    if overwritten.is_some() {
                        return Err(invalid(
                            start,
                            RecordError::OverwrittenContrecord { page: p },
                        ));
                    }
                    return self.decode_at(w, p, Some(start)).inspect(|rec| {
                        debug_assert!(rec.start.0 > p.0);
                    });
                }
                if h.info & XLP_FIRST_IS_CONTRECORD == 0 {
                    return Err(invalid(start, RecordError::NoContrecordFlag { page: p }));
                }
                let missing = tot_len - pieces.got as u32;
                if h.rem_len == 0 || h.rem_len != missing {
                    return Err(invalid(
                        start,
                        RecordError::ContrecordLength {
                            page: p,
                            found: h.rem_len,
                            expected: missing,
                        },
                    ));
                }
                let hlen = h.len() as u64;
                let take = (BLCKSZ - hlen).min(h.rem_len as u64) as usize;
                let data = w.get(Lsn(p.0 + hlen), take).ok_or(need_more.clone())?;
                if pieces.take(data) && !checked {
                    self.check_header(pieces.header, start)?;
                    checked = true;
                }
                if pieces.got == tot_len as usize {
                    end = Lsn(p.0 + hlen + maxalign(h.rem_len as u64));
                    break;
                }
                p = Lsn(p.0 + BLCKSZ);
            }
            crc = pieces.crc;
        }
        let found = le_u32(&header, 20);
        let computed = crc32c::crc32c_append(crc, &header[..20]);
        if found != computed {
            return Err(invalid(start, RecordError::Checksum { found, computed }));
        }
        let mut rec = Record {
            start,
            end,
            own_end: end,
            tot_len,
            xid: le_u32(&header, 4),
            prev: Lsn(le_u64(&header, 8)),
            info: header[16],
            rmid: header[17],
        };
        if let Some(torn) = overwritten {
            Self::check_overwrite(w, &rec, torn)?;
        }
        if rec.is_switch() {
            let seg = self.exp.seg_size.as_u64();
            let offset = rec.end.0 % seg;
            if offset != 0 {
                rec.end = Lsn(rec.end.0 + seg - offset);
            }
        }
        Ok(rec)
    }

    /// The first record on a page marked `XLP_FIRST_IS_OVERWRITE_CONTRECORD` must be crash recovery's
    /// `XLOG_OVERWRITE_CONTRECORD` naming the torn record `torn`: an XLOG record whose main data
    /// (`xl_overwrite_contrecord`) starts with that record's LSN. Anything else ends the WAL at the torn
    /// record, as before the page was written (a damaged flag never makes the walker skip WAL).
    fn check_overwrite(w: &Window<'_>, rec: &Record, torn: Lsn) -> Result<(), WalkStop> {
        let body = Lsn(rec.start.0 + RECORD_HEADER as u64);
        let body_len = (rec.tot_len as usize).saturating_sub(RECORD_HEADER);
        let named = (rec.rmid == RM_XLOG_ID)
            .then(|| w.get(body, body_len))
            .flatten()
            .and_then(main_data)
            .filter(|d| d.len() >= 8)
            .map(|d| Lsn(le_u64(d, 0)));
        if named == Some(torn) {
            return Ok(());
        }
        Err(WalkStop::Invalid {
            at: torn,
            reason: RecordError::OverwriteRecord {
                page: Lsn(rec.start.0 - rec.start.0 % BLCKSZ),
                named,
            },
        })
    }

    /// `ValidXLogRecordHeader`'s prev-link check (the length was checked before).
    fn check_header(&self, header: &[u8], start: Lsn) -> Result<(), WalkStop> {
        let found = Lsn(le_u64(header, 8));
        let reason = match self.prev {
            Some(expected) if found != expected => RecordError::PrevLink { found, expected },
            None if found >= start => RecordError::PrevLinkAhead { found },
            _ => return Ok(()),
        };
        Err(WalkStop::Invalid { at: start, reason })
    }
}

/// The main data of a record without block references (`body`: what follows its header): after an
/// optional replication origin (`XLR_BLOCK_ID_ORIGIN`) and top-level xid (`XLR_BLOCK_ID_TOPLEVEL_XID`),
/// `XLR_BLOCK_ID_DATA_SHORT` or `XLR_BLOCK_ID_DATA_LONG` with its length. `None` for anything else.
fn main_data(body: &[u8]) -> Option<&[u8]> {
    let mut at = 0usize;
    loop {
        match *body.get(at)? {
            253 => at += 1 + 2,
            252 => at += 1 + 4,
            255 => {
                let len = *body.get(at + 1)? as usize;
                return body.get(at + 2..at + 2 + len);
            }
            254 => {
                let len = le_u32(body.get(at + 1..at + 5)?, 0) as usize;
                return body.get(at + 5..at + 5 + len);
            }
            _ => return None,
        }
    }
}

/// The validated header of the page at `page`, or NeedMore when the window does not hold it yet.
fn page_header(exp: &PageExpectation, w: &Window<'_>, page: Lsn) -> Result<PageHeader, WalkStop> {
    let long = exp.seg_size.offset(page) == 0;
    let need = if long {
        LONG_PAGE_HEADER
    } else {
        SHORT_PAGE_HEADER
    };
    let Some(bytes) = w.get(page, need) else {
        return Err(WalkStop::NeedMore { at: page });
    };
    let h = exp.check(bytes, page).map_err(|e| WalkStop::Invalid {
        at: page,
        reason: RecordError::Page(e),
    })?;
    if h.len() > need {
        // a long header where a short one was expected: check() accepts it; make sure it is all there
        if w.get(page, h.len()).is_none() {
            return Err(WalkStop::NeedMore { at: page });
        }
    }
    Ok(h)
}

/// A record read a fragment at a time: its header gathered (it may itself cross a page), the CRC-32C of
/// the rest accumulated.
struct Pieces<'h> {
    header: &'h mut [u8; RECORD_HEADER],
    have: usize,
    /// Bytes of the record taken so far.
    got: usize,
    crc: u32,
}

impl Pieces<'_> {
    /// Takes the next fragment; true once the header is complete.
    fn take(&mut self, fragment: &[u8]) -> bool {
        let h = (RECORD_HEADER - self.have).min(fragment.len());
        self.header[self.have..self.have + h].copy_from_slice(&fragment[..h]);
        self.have += h;
        self.crc = crc32c::crc32c_append(self.crc, &fragment[h..]);
        self.got += fragment.len();
        self.have == RECORD_HEADER
    }
}

/// Builds valid WAL with records of chosen sizes, for tests and fuzzing: page headers with the
/// continuation flags and lengths, MAXALIGN padding, the `xl_prev` chain and CRC-32C. The records' contents
/// are filler; only their framing is PostgreSQL's.
#[derive(Clone, Debug)]
pub struct WalBuilder {
    exp: PageExpectation,
    /// The WAL written so far, from `start` on.
    pub bytes: Vec<u8>,
    pub start: Lsn,
    prev: Lsn,
    /// Every record written.
    pub records: Vec<Record>,
    /// Bytes no check covers (alignment padding after a record, the 4 pad bytes after `xlp_rem_len`,
    /// the low byte of `xlp_info` whose `XLP_BKP_REMOVABLE` bit nothing checks, `xlp_rem_len` of a page that
    /// does not start with a continuation): PostgreSQL ignores them too.
    pub unchecked: Vec<std::ops::Range<u64>>,
}

impl WalBuilder {
    /// Starts at the segment-aligned or page-aligned `start` (a page header comes first).
    pub fn new(exp: PageExpectation, start: Lsn) -> WalBuilder {
        assert_eq!(start.0 % BLCKSZ, 0, "start on a page boundary");
        WalBuilder {
            exp,
            bytes: Vec::new(),
            start,
            prev: Lsn(start.0.saturating_sub(64)),
            records: Vec::new(),
            unchecked: Vec::new(),
        }
    }

    /// The position after everything written.
    pub fn end(&self) -> Lsn {
        Lsn(self.start.0 + self.bytes.len() as u64)
    }

    /// Writes `n` bytes of record data at the end, inserting page headers where pages start (`rem` is what
    /// the record still has to write, for `xlp_rem_len`).
    fn put(&mut self, mut data: &[u8], mut rem: u32, mut first_of_record: bool) {
        while !data.is_empty() {
            let at = self.end();
            if at.0.is_multiple_of(BLCKSZ) {
                let continues = !first_of_record;
                self.page_header(at, if continues { rem } else { 0 });
            }
            let at = self.end();
            let room = (BLCKSZ - at.0 % BLCKSZ) as usize;
            let n = room.min(data.len());
            self.bytes.extend_from_slice(&data[..n]);
            data = &data[n..];
            rem -= n as u32;
            first_of_record = false;
        }
    }

    fn page_header(&mut self, at: Lsn, rem: u32) {
        let long = self.exp.seg_size.offset(at) == 0;
        let len = if long {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        };
        let mut h = vec![0u8; len];
        crate::wal::write_page_header(&mut h, at, &self.exp);
        // the 4 bytes of alignment padding after xlp_rem_len (in short and long headers alike)
        self.unchecked.push(at.0 + 20..at.0 + 24);
        // xlp_info's XLP_BKP_REMOVABLE bit is not checked by anyone either
        self.unchecked.push(at.0 + 2..at.0 + 3);
        if rem > 0 {
            let info = u16::from_le_bytes([h[2], h[3]]) | XLP_FIRST_IS_CONTRECORD;
            h[2..4].copy_from_slice(&info.to_le_bytes());
            h[16..20].copy_from_slice(&rem.to_le_bytes());
        } else {
            // xlp_rem_len means something only with XLP_FIRST_IS_CONTRECORD
            self.unchecked.push(at.0 + 16..at.0 + 20);
        }
        self.bytes.extend_from_slice(&h);
    }

    /// Appends a record with a body of `body_len` bytes (`rmid`, `info` as given); returns it.
    pub fn record(&mut self, body_len: usize, rmid: u8, info: u8) -> Record {
        // a record that would start at a page boundary starts after the header
        if self.end().0.is_multiple_of(BLCKSZ) {
            self.page_header(self.end(), 0);
        }
        let start = self.end();
        let body: Vec<u8> = (0..body_len)
            .map(|i| (i as u64 * 31 + start.0) as u8)
            .collect();
        self.record_with_body(&body, rmid, info)
    }

    /// What PostgreSQL's crash recovery leaves when a crash tore a record that crosses a page (its first
    /// page written, the rest not): the first page of a record with a body of `body_len` bytes, then, from
    /// the next page on (marked `XLP_FIRST_IS_OVERWRITE_CONTRECORD`), an `XLOG_OVERWRITE_CONTRECORD` record
    /// naming it. Returns where the torn record starts and the overwrite record.
    pub fn torn_record_overwritten(&mut self, body_len: usize) -> (Lsn, Record) {
        let prev = self.prev;
        let torn = self.record(body_len, 10, 0);
        let page_end = (torn.start.0 / BLCKSZ + 1) * BLCKSZ;
        assert!(
            torn.own_end.0 > page_end,
            "the torn record must cross a page"
        );
        self.bytes.truncate((page_end - self.start.0) as usize);
        self.unchecked.retain(|r| r.start < page_end);
        self.records.pop();
        self.prev = prev;
        self.page_header(Lsn(page_end), 0);
        let at = (page_end - self.start.0) as usize;
        let info = u16::from_le_bytes([self.bytes[at + 2], self.bytes[at + 3]])
            | XLP_FIRST_IS_OVERWRITE_CONTRECORD;
        self.bytes[at + 2..at + 4].copy_from_slice(&info.to_le_bytes());
        // xl_overwrite_contrecord { overwritten_lsn, overwrite_time } as main data (XLR_BLOCK_ID_DATA_SHORT)
        let mut body = vec![255u8, 16];
        body.extend_from_slice(&torn.start.0.to_le_bytes());
        body.extend_from_slice(&812_345_678_u64.to_le_bytes());
        let rec = self.record_with_body(&body, RM_XLOG_ID, 0xD0);
        (torn.start, rec)
    }

    /// Appends a record with the given body (what follows the 24-byte header); returns it.
    pub fn record_with_body(&mut self, body: &[u8], rmid: u8, info: u8) -> Record {
        if self.end().0.is_multiple_of(BLCKSZ) {
            self.page_header(self.end(), 0);
        }
        let start = self.end();
        let tot_len = (RECORD_HEADER + body.len()) as u32;
        let mut header = [0u8; RECORD_HEADER];
        header[0..4].copy_from_slice(&tot_len.to_le_bytes());
        header[4..8].copy_from_slice(&7u32.to_le_bytes());
        header[8..16].copy_from_slice(&self.prev.0.to_le_bytes());
        header[16] = info;
        header[17] = rmid;
        let crc = crc32c::crc32c_append(crc32c::crc32c(body), &header[..20]);
        header[20..24].copy_from_slice(&crc.to_le_bytes());
        let mut all = header.to_vec();
        all.extend_from_slice(body);
        self.put(&all, tot_len, true);
        // padding to MAXALIGN (never crosses a page: pages are 8-aligned)
        let pad = (maxalign(self.end().0) - self.end().0) as usize;
        self.unchecked.push(self.end().0..self.end().0 + pad as u64);
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        let mut rec = Record {
            start,
            end: self.end(),
            own_end: self.end(),
            tot_len,
            xid: 7,
            prev: self.prev,
            info,
            rmid,
        };
        if rec.is_switch() {
            let seg = self.exp.seg_size.as_u64();
            let offset = self.end().0 % seg;
            if offset != 0 {
                let fill = (seg - offset) as usize;
                self.unchecked
                    .push(self.end().0..self.end().0 + fill as u64);
                self.bytes.extend(std::iter::repeat_n(0u8, fill));
            }
            rec.end = self.end();
        }
        self.prev = start;
        self.records.push(rec);
        rec
    }
}

/// Walks arbitrary bytes as WAL of a 1 MB-segment cluster starting at the second segment, with the first
/// byte choosing whether to start at the segment or resynchronise on a page; checks that the walker never
/// panics and that what it returns is consistent (records in order, inside the bytes, ends after starts).
/// The body of the fuzz target `walker` and of a property test.
pub fn check_walk(data: &[u8]) {
    let exp = PageExpectation {
        magic: 0xD110,
        system_identifier: 42,
        seg_size: crate::wal::WalSegSize::new(1 << 20).expect("1 MB"),
        timeline: 1,
    };
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let base = Lsn(1 << 20);
    let walker = if mode & 1 == 0 {
        Ok(Walker::new(exp, base, None))
    } else {
        Walker::resync(exp, bytes, base)
    };
    let Ok(mut walker) = walker else { return };
    let mut last_end = walker.next_lsn();
    let stop = walker.walk(bytes, base, |r| {
        assert!(r.start >= last_end, "records out of order");
        assert!(r.end > r.start, "empty record");
        assert!(
            r.is_switch() || r.end.0 <= base.0 + bytes.len() as u64 + 7,
            "record beyond the bytes"
        );
        last_end = r.end;
    });
    assert_eq!(walker.next_lsn(), last_end);
    let _ = stop.to_string();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::WalSegSize;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// Valid WAL with bytes changed: the walker stops cleanly, never past the first damaged record.
        #[test]
        fn damaged_wal_never_panics_and_never_passes_the_damage(
            flips in proptest::collection::vec((any::<u32>(), any::<u8>()), 1..4),
            cut in any::<u32>(),
        ) {
            let b = sample_small();
            let mut bytes = b.bytes.clone();
            let mut first_damage = bytes.len();
            for (at, byte) in flips {
                let at = at as usize % bytes.len();
                let lsn = b.start.0 + at as u64;
                if bytes[at] != byte && !b.unchecked.iter().any(|r| r.contains(&lsn)) {
                    first_damage = first_damage.min(at);
                }
                bytes[at] = byte;
            }
            let len = bytes.len() - cut as usize % (bytes.len() / 4);
            let mut input = vec![0u8];
            input.extend_from_slice(&bytes[..len]);
            check_walk(&input);
            let (got, _, _) = walk_all(&b, &bytes[..len]);
            for r in &got {
                // only original records come back, and none at or after the first damaged byte
                let orig = b.records.iter().find(|o| o.start == r.start);
                prop_assert_eq!(Some(r), orig);
                let end = (r.end.0 - b.start.0) as usize;
                prop_assert!(end <= first_damage || r.is_switch(),
                    "a record covering damaged byte {} was accepted: {:?}", first_damage, r);
            }
        }
    }

    /// A few segments' worth of small and large records, quick to build.
    fn sample_small() -> WalBuilder {
        let mut b = WalBuilder::new(exp(), Lsn(SEG));
        for s in [10usize, 9000, 30, 20_000, 8168, 5, 100, 40_000, 64] {
            b.record(s, 10, 0);
        }
        b
    }

    const SEG: u64 = 1 << 20;

    fn exp() -> PageExpectation {
        PageExpectation {
            magic: 0xD110,
            system_identifier: 42,
            seg_size: WalSegSize::new(SEG).unwrap(),
            timeline: 1,
        }
    }

    /// Records of many sizes: small ones, ones crossing one page, several pages, and a segment boundary.
    fn sample() -> WalBuilder {
        let mut b = WalBuilder::new(exp(), Lsn(SEG));
        let sizes = [
            10usize, 0, 50, 8000, 100, 30_000, 3, 8168, 8150, 70_000, 5, 200,
        ];
        while b.end().0 < 2 * SEG + 40_000 {
            for s in sizes {
                b.record(s, 10, 0);
            }
        }
        b
    }

    fn walk_all(b: &WalBuilder, bytes: &[u8]) -> (Vec<Record>, WalkStop, Lsn) {
        let mut w = Walker::new(exp(), b.start, None);
        let mut got = Vec::new();
        let stop = w.walk(bytes, b.start, |r| got.push(*r));
        (got, stop, w.next_lsn())
    }

    #[test]
    fn walks_every_record_across_pages_and_segments() {
        let b = sample();
        let (got, stop, end) = walk_all(&b, &b.bytes);
        assert_eq!(got, b.records);
        assert_eq!(end, b.end());
        assert!(matches!(stop, WalkStop::NeedMore { .. }), "{stop:?}");
        assert!(got.iter().any(|r| r.start.0 / SEG != (r.end.0 - 1) / SEG));
    }

    #[test]
    fn a_torn_tail_ends_at_the_last_complete_record() {
        let b = sample();
        for cut in [1usize, 7, 24, 100, 8192, 20_000, 100_000, 1_000_001] {
            let len = b.bytes.len().saturating_sub(cut);
            let (got, stop, end) = walk_all(&b, &b.bytes[..len]);
            let expected: Vec<Record> = b
                .records
                .iter()
                .copied()
                .filter(|r| r.end.0 - b.start.0 <= len as u64)
                .collect();
            assert_eq!(got, expected, "cut {cut}");
            assert_eq!(end, expected.last().map(|r| r.end).unwrap_or(b.start));
            assert!(
                matches!(stop, WalkStop::NeedMore { .. }),
                "cut {cut}: {stop:?}"
            );
        }
    }

    #[test]
    fn zeros_after_the_last_record_end_the_walk() {
        let mut b = sample();
        let end = b.end();
        b.bytes.extend(std::iter::repeat_n(0u8, 20_000));
        let (got, stop, at) = walk_all(&b, &b.bytes);
        assert_eq!(got.len(), b.records.len());
        assert_eq!(at, end);
        assert!(
            matches!(
                stop,
                WalkStop::Invalid {
                    reason: RecordError::Length { len: 0 },
                    ..
                } | WalkStop::Invalid {
                    reason: RecordError::Page(_),
                    ..
                }
            ),
            "{stop:?}"
        );
    }

    #[test]
    fn a_bad_crc_stops_the_walk_before_that_record() {
        let b = sample();
        let victim = b.records[20];
        let mut bytes = b.bytes.clone();
        let at = (victim.start.0 - b.start.0) as usize + RECORD_HEADER;
        bytes[at] ^= 0x01;
        let (got, stop, end) = walk_all(&b, &bytes);
        assert_eq!(got, b.records[..20]);
        assert_eq!(end, victim.start);
        assert!(
            matches!(stop, WalkStop::Invalid { reason: RecordError::Checksum { .. }, at } if at == victim.start),
            "{stop:?}"
        );
    }

    #[test]
    fn a_stale_record_with_a_valid_crc_is_caught_by_the_prev_link() {
        // WAL of another history at the same place: valid CRCs, but its xl_prev does not chain
        let b = sample();
        let k = 30;
        let mut other = WalBuilder::new(exp(), Lsn(SEG));
        for r in &b.records[..k] {
            other.record((r.tot_len as usize) - RECORD_HEADER, r.rmid, r.info);
        }
        other.prev = Lsn(5); // breaks the chain from record k on
        while other.end() < b.end() {
            other.record(100, 10, 0);
        }
        let (got, stop, _) = walk_all(&b, &other.bytes);
        assert_eq!(got, b.records[..k]);
        assert!(
            matches!(
                stop,
                WalkStop::Invalid {
                    reason: RecordError::PrevLink { .. },
                    ..
                }
            ),
            "{stop:?}"
        );
    }

    #[test]
    fn a_recycled_page_stops_a_continued_record() {
        let b = sample();
        // the record of 70_000 bytes crosses several pages; make one of them an old page
        let big = b.records.iter().find(|r| r.tot_len > 60_000).unwrap();
        let page = (big.start.0 / BLCKSZ + 3) * BLCKSZ;
        let mut bytes = b.bytes.clone();
        let at = (page - b.start.0) as usize;
        bytes[at + 8..at + 16].copy_from_slice(&(page + 16 * SEG).to_le_bytes());
        let (got, stop, end) = walk_all(&b, &bytes);
        assert_eq!(end, big.start);
        assert_eq!(got.last().map(|r| r.end), Some(big.start));
        assert!(
            matches!(
                stop,
                WalkStop::Invalid {
                    reason: RecordError::Page(PageError::UnexpectedPageAddr { .. }),
                    ..
                }
            ),
            "{stop:?}"
        );
    }

    #[test]
    fn a_switch_record_ends_its_segment() {
        let mut b = WalBuilder::new(exp(), Lsn(SEG));
        b.record(100, 10, 0);
        let switch = b.record(0, RM_XLOG_ID, XLOG_SWITCH);
        assert_eq!(switch.end, Lsn(2 * SEG));
        assert_eq!(switch.own_end, Lsn(switch.start.0 + RECORD_HEADER as u64));
        let after = b.record(50, 10, 0);
        assert_eq!(after.start, Lsn(2 * SEG + LONG_PAGE_HEADER as u64));
        let (got, _, end) = walk_all(&b, &b.bytes);
        assert_eq!(got, b.records);
        assert_eq!(end, after.end);
        assert!(got[1].is_switch());
    }

    #[test]
    fn resync_finds_the_first_record_on_a_page() {
        let b = sample();
        for r in b.records.iter().skip(1) {
            let page = Lsn(r.start.0 / BLCKSZ * BLCKSZ);
            let from = (page.0 - b.start.0) as usize;
            let w = Walker::resync(exp(), &b.bytes[from..], page).unwrap();
            // the first record starting on or after that page, never one that started before it
            let first = b.records.iter().find(|x| x.start >= page).unwrap();
            assert_eq!(w.next_lsn(), first.start, "page {page}");
            let mut w = w;
            let mut got = Vec::new();
            w.walk(&b.bytes[from..], page, |x| got.push(*x));
            assert_eq!(got.last(), b.records.last());
        }
    }

    /// Walks `b` fed `step` bytes more at a time, re-reading from the page holding the next record as a
    /// caller does: how many records it found, and where it ended.
    fn walk_in_pieces(b: &WalBuilder, step: usize) -> (usize, Lsn) {
        let mut w = Walker::new(exp(), b.start, None);
        let mut count = 0;
        let mut have = 0usize;
        while have < b.bytes.len() {
            have = (have + step).min(b.bytes.len());
            let from = (w.next_lsn().0 / BLCKSZ * BLCKSZ).max(b.start.0);
            let slice = &b.bytes[(from - b.start.0) as usize..have];
            w.walk(slice, Lsn(from), |_| count += 1);
        }
        (count, w.next_lsn())
    }

    #[test]
    fn fed_in_pieces_it_reaches_the_same_end() {
        let b = sample();
        let (count, end) = walk_in_pieces(&b, 5_000);
        assert_eq!(count, b.records.len());
        assert_eq!(end, b.end());
    }

    /// Records, then one torn by a crash and overwritten by recovery (see
    /// [`WalBuilder::torn_record_overwritten`]), then more records.
    fn sample_overwritten() -> (WalBuilder, Lsn, Record) {
        let mut b = WalBuilder::new(exp(), Lsn(SEG));
        for s in [10usize, 9000, 30, 8100] {
            b.record(s, 10, 0);
        }
        let (torn, over) = b.torn_record_overwritten(20_000);
        for s in [50usize, 30_000, 7] {
            b.record(s, 10, 0);
        }
        (b, torn, over)
    }

    #[test]
    fn a_record_torn_by_a_crash_is_skipped_once_recovery_overwrote_it() {
        let (b, torn, over) = sample_overwritten();
        assert_eq!(over.start.0 % BLCKSZ, SHORT_PAGE_HEADER as u64);
        assert!(torn < over.start && over.start.0 - torn.0 < BLCKSZ);
        let (got, stop, end) = walk_all(&b, &b.bytes);
        assert_eq!(got, b.records, "every record but the torn one");
        assert!(got.contains(&over));
        assert_eq!(
            over.prev, got[3].start,
            "the overwrite record chains to the last valid one"
        );
        assert_eq!(end, b.end());
        assert!(matches!(stop, WalkStop::NeedMore { .. }), "{stop:?}");
        // fed in pieces, the same
        assert_eq!(walk_in_pieces(&b, 700), (b.records.len(), b.end()));
        // a preallocated segment holding it: its valid prefix ends after the last record
        let mut seg = b.bytes.clone();
        seg.resize(SEG as usize, 0);
        assert_eq!(valid_prefix(exp(), b.start, &seg).records, b.bytes.len());
        // resynchronising on the overwrite page finds the overwrite record
        let page = over.start.0 - over.start.0 % BLCKSZ;
        let r = Walker::resync(exp(), &b.bytes[(page - b.start.0) as usize..], Lsn(page)).unwrap();
        assert_eq!(r.next_lsn(), over.start);
    }

    #[test]
    fn until_recovery_overwrites_it_the_torn_record_ends_the_wal() {
        let (b, torn, over) = sample_overwritten();
        let page = (over.start.0 - over.start.0 % BLCKSZ - b.start.0) as usize;
        // the crash: the torn record's first page is there, the next one is not (yet)
        for len in [
            page,
            page + 8,
            over.start.0 as usize - b.start.0 as usize + 30,
        ] {
            let (got, stop, end) = walk_all(&b, &b.bytes[..len]);
            assert_eq!(end, torn, "cut at {len}");
            assert_eq!(got.len(), 4);
            assert!(matches!(stop, WalkStop::NeedMore { .. }), "{stop:?}");
        }
        // the next page zero-filled (preallocated) or stale: the WAL ends at the torn record
        let mut zeros = b.bytes[..page].to_vec();
        zeros.resize(page + 2 * XLOG_BLCKSZ, 0);
        let (_, stop, end) = walk_all(&b, &zeros);
        assert_eq!(end, torn);
        assert!(matches!(stop, WalkStop::Invalid { .. }), "{stop:?}");
    }

    #[test]
    fn an_overwrite_flag_without_the_record_naming_the_torn_one_ends_the_wal() {
        let (b, torn, over) = sample_overwritten();
        let at = (over.start.0 - b.start.0) as usize;
        let body = at + RECORD_HEADER;
        // the overwrite record naming another LSN, with a valid CRC
        let mut bytes = b.bytes.clone();
        bytes[body + 2..body + 10].copy_from_slice(&(torn.0 + 8).to_le_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&bytes[body..at + over.tot_len as usize]),
            &bytes[at..at + 20],
        );
        bytes[at + 20..at + 24].copy_from_slice(&crc.to_le_bytes());
        let (got, stop, end) = walk_all(&b, &bytes);
        assert_eq!((got.len(), end), (4, torn));
        assert!(
            matches!(
                stop,
                WalkStop::Invalid { at, reason: RecordError::OverwriteRecord { named: Some(n), .. } }
                    if at == torn && n == Lsn(torn.0 + 8)
            ),
            "{stop:?}"
        );
        // the page's flag on a page that continues a record normally is damage: the walk stops there
        let b = sample();
        let big = b.records.iter().find(|r| r.tot_len > 60_000).unwrap();
        let page = (big.start.0 / BLCKSZ + 2) * BLCKSZ;
        let mut bytes = b.bytes.clone();
        let p = (page - b.start.0) as usize;
        bytes[p + 2] |= XLP_FIRST_IS_OVERWRITE_CONTRECORD as u8;
        let (_, _, end) = walk_all(&b, &bytes);
        assert_eq!(end, big.start);
    }
}
