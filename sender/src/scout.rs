//! Finds where the WAL the primary has *written* ends, before PostgreSQL has flushed it: the record walker
//! over the bytes in `pg_wal/` beyond what was sent, kept between calls so each call walks only what is new.
//!
//! Only complete records whose CRC-32C, length, page headers and `xl_prev` link check out are counted, so a
//! page read while PostgreSQL is still writing it (torn), a recycled segment's old content, or zeros all end
//! the walk there. The next call starts again from the page of the last valid record's end.

use walship_protocol::wal::{
    segment_file_name, LONG_PAGE_HEADER, XLOG_BLCKSZ, XLP_FIRST_IS_CONTRECORD,
};
use walship_protocol::walker::{maxalign, WalkStop, Walker};
use walship_protocol::{Lsn, TimelineId};

use crate::wal_reader::{ReadError, WalReader};

/// Bytes read by the first step (a commit's WAL is usually a few kB); each further step reads twice as much,
/// up to `MAX_CHUNK`.
const FIRST_CHUNK: usize = 16 << 10;
const MAX_CHUNK: usize = 1 << 20;
/// Most bytes one call holds (the largest record is 1 GB in theory; anything this far ahead is shipped once
/// flushed instead).
const MAX_BYTES: usize = 16 << 20;
/// A walker this far behind what was sent starts over at what was sent (a catch-up moved past it).
const RESET_BEHIND: u64 = 1 << 20;

fn page_of(lsn: Lsn) -> Lsn {
    Lsn(lsn.0 - lsn.0 % XLOG_BLCKSZ as u64)
}

/// The walker over written WAL of one timeline.
#[derive(Debug, Default)]
pub struct Scout {
    walker: Option<Walker>,
    /// Where the walker found its first record: everything in `[anchor, end())` is validated records.
    anchor: Lsn,
    /// The bytes of the last walk, from `buf_base` on (kept for its capacity: a walk runs on every write
    /// event). Those of valid records are shipped from here: one read of each byte.
    buf: Vec<u8>,
    buf_base: Lsn,
    /// The segment file last read, kept open.
    file: Option<(TimelineId, u64, std::fs::File)>,
    /// `XLOG_SWITCH` records walked whose segment shipping has not finished: (the record's own end, the
    /// segment's end). The padding between them is not written WAL: PostgreSQL writes it when it flushes the
    /// switch (zeros from 11 on, page headers on 10), and until then the file holds zeros or a recycled
    /// segment's old bytes there. Only flushed padding is shipped.
    switches: Vec<(Lsn, Lsn)>,
    /// Checkpoint records walked that end beyond what was sent: (start, end). A drain proves WAL flushed
    /// up to the end of the checkpoint `pg_control` names.
    checkpoints: Vec<(Lsn, Lsn)>,
}

impl Scout {
    /// Where the validated WAL ends, if the scout has walked from at or before `from`: then every byte of
    /// `[from, end)` belongs to complete, valid records.
    pub fn valid_from(&self, from: Lsn) -> Option<Lsn> {
        let w = self.walker.as_ref()?;
        if self.anchor > from || w.next_lsn() < from {
            return None;
        }
        Some(
            match self.switches.iter().find(|(_, seg_end)| *seg_end > from) {
                Some((own_end, _)) => w.next_lsn().min(*own_end).max(from),
                None => w.next_lsn(),
            },
        )
    }

    /// The bytes of `[start, end)` as the last walk read them, when they all belong to complete, valid
    /// records it walked (then they are what the primary wrote: PostgreSQL never rewrites written WAL of
    /// a record, only appends after it). None when the walk did not cover them: read them from the file.
    pub fn walked_bytes(&self, start: Lsn, end: Lsn) -> Option<&[u8]> {
        let valid_end = self.valid_from(start)?;
        if end > valid_end || start < self.buf_base {
            return None;
        }
        let from = (start.0 - self.buf_base.0) as usize;
        let to = (end.0 - self.buf_base.0) as usize;
        self.buf.get(from..to)
    }

    /// Where the walk has got to: the end of the last complete, valid record (padding of a switch included).
    pub fn walked_to(&self) -> Option<Lsn> {
        self.walker.as_ref().map(Walker::next_lsn)
    }

    /// The checkpoint records walked that end beyond what was sent: (start, end).
    pub fn checkpoints(&self) -> &[(Lsn, Lsn)] {
        &self.checkpoints
    }

    /// Walks whatever the primary has written since the last call. `sent` is where shipping stands: a walker
    /// far behind it starts over there.
    pub fn advance(
        &mut self,
        reader: &WalReader,
        timeline: TimelineId,
        sent: Lsn,
    ) -> Result<(), ReadError> {
        if let Some(w) = &self.walker {
            if w.next_lsn().0 + RESET_BEHIND < sent.0 {
                self.walker = None;
                self.switches.clear();
            }
        }
        self.switches.retain(|(_, seg_end)| *seg_end > sent);
        self.checkpoints.retain(|(_, end)| *end > sent);
        let exp = reader.expectation(timeline);
        let base = match &self.walker {
            Some(w) => page_of(w.next_lsn()),
            None => self.walk_start(reader, timeline, sent)?,
        };
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        self.buf_base = base;
        let mut chunk = FIRST_CHUNK;
        while buf.len() < MAX_BYTES {
            let at = Lsn(base.0 + buf.len() as u64);
            if self.read_into(reader, timeline, at, chunk, &mut buf)? == 0 {
                break;
            }
            chunk = (chunk * 2).min(MAX_CHUNK);
            let buf = &buf;
            let w = match &mut self.walker {
                Some(w) => w,
                None => match Walker::resync(exp, buf, base) {
                    Ok(w) => {
                        // right after the page header (validated): the walk covers the page from its
                        // start; after a continuation of an earlier record, from the first record found
                        self.anchor = if w.next_lsn().0 - base.0 <= LONG_PAGE_HEADER as u64 {
                            base
                        } else {
                            w.next_lsn()
                        };
                        self.walker.insert(w)
                    }
                    Err(WalkStop::NeedMore { .. }) => continue,
                    Err(stop) => {
                        tracing::debug!(%sent, "no record to start the walk from: {stop}");
                        break;
                    }
                },
            };
            let (switches, checkpoints) = (&mut self.switches, &mut self.checkpoints);
            let walked = w.walk(buf, base, |r| {
                if r.is_switch() {
                    switches.push((r.own_end, r.end));
                }
                if r.is_checkpoint() {
                    checkpoints.push((r.start, r.end));
                }
            });
            match walked {
                WalkStop::NeedMore { .. } => continue,
                stop => {
                    tracing::trace!(%sent, read = buf.len(), "written WAL ends: {stop}");
                    break;
                }
            }
        }
        self.buf = buf;
        Ok(())
    }

    /// Where a new walk starts so that it validates the record `sent` lies in: the page of `sent`, or, when
    /// `sent` falls inside a record continued from earlier pages (a flush position PostgreSQL's WAL writer
    /// left mid-record, a session resuming there), the page that record starts on, found from the page
    /// headers going back (at most RESET_BEHIND, and only through pages pg_wal still holds). Without it, the
    /// walk would validate nothing before the next record's start, and written WAL would wait for the
    /// primary's flush to pass it: shipping on write stalls as long as the flush does not move.
    fn walk_start(
        &mut self,
        reader: &WalReader,
        timeline: TimelineId,
        sent: Lsn,
    ) -> Result<Lsn, ReadError> {
        let exp = reader.expectation(timeline);
        let first = page_of(sent);
        let mut page = first;
        let mut header = Vec::with_capacity(LONG_PAGE_HEADER);
        loop {
            header.clear();
            self.read_into(reader, timeline, page, LONG_PAGE_HEADER, &mut header)?;
            let Ok(h) = exp.check(&header, page) else {
                // not (or no longer) a valid page of this timeline: no walk from further back
                return Ok(first);
            };
            if h.info & XLP_FIRST_IS_CONTRECORD == 0 {
                // a record starts right after this page's header
                return Ok(page);
            }
            let first_record = page.0 + h.len() as u64 + maxalign(h.rem_len as u64);
            if first_record < page.0 + XLOG_BLCKSZ as u64
                && (first_record <= sent.0 || page < first)
            {
                // a record starts on this page, at or before `sent`
                return Ok(page);
            }
            if first.0 - page.0 >= RESET_BEHIND || page.0 < XLOG_BLCKSZ as u64 {
                return Ok(first);
            }
            page = Lsn(page.0 - XLOG_BLCKSZ as u64);
        }
    }

    /// Appends up to `max` bytes of `timeline` from `start` to `out` (not past the segment's end; fewer where
    /// the file ends, none where it is missing). Returns how many.
    fn read_into(
        &mut self,
        reader: &WalReader,
        timeline: TimelineId,
        start: Lsn,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, ReadError> {
        let seg = reader.segment_size();
        let segno = seg.segno(start);
        let name = segment_file_name(timeline, segno, seg);
        if !matches!(&self.file, Some((t, s, _)) if *t == timeline && *s == segno) {
            self.file = None;
            match std::fs::File::open(reader.dir().join(&name)) {
                Ok(f) => self.file = Some((timeline, segno, f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(source) => return Err(ReadError::Io { file: name, source }),
            }
        }
        let Some((_, _, file)) = &self.file else {
            return Ok(0);
        };
        let offset = seg.offset(start);
        let len = ((seg.as_u64() - offset) as usize).min(max);
        let from = out.len();
        out.resize(from + len, 0);
        match crate::wal_reader::read_up_to(file, &mut out[from..], offset) {
            Ok(got) => {
                out.truncate(from + got);
                Ok(got)
            }
            Err(source) => {
                out.truncate(from);
                Err(ReadError::Io { file: name, source })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walship_protocol::wal::{PageExpectation, XLOG_BLCKSZ};
    use walship_protocol::walker::WalBuilder;
    use walship_protocol::WalSegSize;

    const SEG: u64 = 1 << 20;

    fn exp() -> PageExpectation {
        PageExpectation {
            magic: walship_protocol::wal::page_magic_for_version(150000).unwrap(),
            system_identifier: 42,
            seg_size: WalSegSize::new(SEG).unwrap(),
            timeline: 1,
        }
    }

    /// A segment file holding `wal` (from the segment's start) and then `rest` as the remainder.
    fn write_segment(dir: &std::path::Path, wal: &[u8], tail: u8) {
        let mut content = wal.to_vec();
        content.resize(SEG as usize, tail);
        std::fs::write(dir.join("000000010000000000000001"), content).unwrap();
    }

    #[test]
    fn ships_only_complete_valid_records_as_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = WalBuilder::new(exp(), Lsn(SEG));
        let sizes = [100usize, 3000, 20_000, 50, 9000, 400];
        let recs: Vec<_> = sizes.iter().map(|n| b.record(*n, 10, 0)).collect();
        let wal = b.bytes.clone();
        let reader = WalReader::new(dir.path(), WalSegSize::new(SEG).unwrap(), exp().magic, 42);
        let mut scout = Scout::default();

        // written up to the middle of the third record, zeros after: the walk ends after the second
        let cut = (recs[2].start.0 - SEG) as usize + 5000;
        write_segment(dir.path(), &wal[..cut], 0);
        scout.advance(&reader, 1, Lsn(SEG)).unwrap();
        assert_eq!(scout.valid_from(Lsn(SEG)), Some(recs[1].end));

        // the rest arrives, one byte of the fifth record torn (as read while PostgreSQL writes it)
        let mut torn = wal.clone();
        let at = (recs[4].start.0 - SEG) as usize + 4000;
        torn[at] ^= 0xFF;
        write_segment(dir.path(), &torn, 0);
        scout.advance(&reader, 1, Lsn(SEG)).unwrap();
        assert_eq!(scout.valid_from(Lsn(SEG)), Some(recs[3].end));

        // written completely, with an old recycled segment's bytes after it
        write_segment(dir.path(), &wal, 0x37);
        scout.advance(&reader, 1, Lsn(SEG)).unwrap();
        assert_eq!(scout.valid_from(Lsn(SEG)), Some(recs[5].end));
        // from a position after the anchor and before the end
        assert_eq!(scout.valid_from(recs[3].start), Some(recs[5].end));
        assert_eq!(scout.valid_from(Lsn(recs[5].end.0 + 8)), None);
        // shipped from the walk's own bytes: exactly the file's, and only as far as the valid records go
        // (this walk read from the page where the last one ended: what came before is read from the file)
        assert_eq!(scout.walked_bytes(recs[1].start, recs[5].end), None);
        let (a, b) = (recs[4].start, recs[5].end);
        assert_eq!(
            scout.walked_bytes(a, b),
            Some(&wal[(a.0 - SEG) as usize..(b.0 - SEG) as usize])
        );
        assert_eq!(scout.walked_bytes(a, Lsn(b.0 + 8)), None);
    }

    #[test]
    fn starting_mid_record_walks_from_the_start_of_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = WalBuilder::new(exp(), Lsn(SEG));
        let recs: Vec<_> = [20_000usize, 100, 100]
            .iter()
            .map(|n| b.record(*n, 10, 0))
            .collect();
        write_segment(dir.path(), &b.bytes, 0);
        let reader = WalReader::new(dir.path(), WalSegSize::new(SEG).unwrap(), exp().magic, 42);
        let mut scout = Scout::default();
        // shipping stands inside the large first record (its third page)
        let sent = Lsn(SEG + 2 * XLOG_BLCKSZ as u64 + 100);
        scout.advance(&reader, 1, sent).unwrap();
        // the walk went back to the first record's start (its page headers say where): the written WAL
        // from `sent` on is validated, whatever the flush position does
        assert_eq!(scout.valid_from(sent), Some(recs[2].end));
        assert_eq!(scout.valid_from(recs[1].start), Some(recs[2].end));
        assert_eq!(scout.valid_from(recs[0].start), Some(recs[2].end));
    }

    #[test]
    fn a_record_begun_in_a_removed_segment_is_not_validated() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = WalBuilder::new(exp(), Lsn(SEG));
        // small records up to near the segment's end, then one continued into the next segment
        while b.end().0 < 2 * SEG - 3 * XLOG_BLCKSZ as u64 {
            b.record(2000, 10, 0);
        }
        let spanning = b.record(40_000, 10, 0);
        let after = b.record(100, 10, 0);
        assert!(spanning.start.0 < 2 * SEG && spanning.end.0 > 2 * SEG + XLOG_BLCKSZ as u64);
        // only the second segment is in pg_wal
        std::fs::write(
            dir.path().join("000000010000000000000002"),
            &b.bytes[SEG as usize..],
        )
        .unwrap();
        let reader = WalReader::new(dir.path(), WalSegSize::new(SEG).unwrap(), exp().magic, 42);
        let mut scout = Scout::default();
        let sent = Lsn(2 * SEG + XLOG_BLCKSZ as u64 + 16);
        scout.advance(&reader, 1, sent).unwrap();
        // the spanning record's start is gone: from its end on only
        assert_eq!(scout.valid_from(sent), None);
        assert_eq!(scout.valid_from(spanning.end), Some(after.end));
    }

    #[test]
    fn the_padding_after_a_switch_is_not_written_wal() {
        use walship_protocol::walker::{RM_XLOG_ID, XLOG_SWITCH};
        let dir = tempfile::tempdir().unwrap();
        let mut b = WalBuilder::new(exp(), Lsn(SEG));
        b.record(100, 10, 0);
        let switch = b.record(0, RM_XLOG_ID, XLOG_SWITCH);
        let after = b.record(300, 10, 0);
        // the switch is written, its padding not yet: the file holds a recycled segment's bytes there (or
        // page headers on PostgreSQL 10 once written); the next segment already holds a record
        let own = (switch.own_end.0 - SEG) as usize;
        write_segment(dir.path(), &b.bytes[..own], 0x37);
        std::fs::write(
            dir.path().join("000000010000000000000002"),
            &b.bytes[SEG as usize..],
        )
        .unwrap();
        let reader = WalReader::new(dir.path(), WalSegSize::new(SEG).unwrap(), exp().magic, 42);
        let mut scout = Scout::default();
        scout.advance(&reader, 1, Lsn(SEG)).unwrap();
        assert_eq!(scout.valid_from(Lsn(SEG)), Some(switch.own_end));
        // shipped up to the switch: nothing more until the padding is flushed
        assert_eq!(scout.valid_from(switch.own_end), Some(switch.own_end));
        // the padding was flushed and shipped: the next segment's records count
        scout.advance(&reader, 1, switch.end).unwrap();
        assert_eq!(scout.valid_from(switch.end), Some(after.end));
    }
}
