//! Reads WAL bytes straight out of the segment files in `pg_wal/` and validates every page header before the
//! bytes may be shipped: a recycled or foreign segment is never sent.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use walship_protocol::wal::{segment_file_name, PageExpectation, SegNo, XLOG_BLCKSZ};
use walship_protocol::{Lsn, PageError, TimelineId, WalSegSize};

/// Why WAL could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The segment file is not in `pg_wal` (removed or recycled by a checkpoint).
    #[error("WAL segment {file} (needed from {lsn}) is no longer in {dir}: PostgreSQL removed or recycled it before walship shipped it")]
    Gone { file: String, lsn: Lsn, dir: String },
    /// The file holds pages that are not the WAL expected at that position.
    #[error("WAL segment {file} does not hold the expected WAL: {source}")]
    Invalid { file: String, source: PageError },
    #[error("read WAL segment {file}: {source}")]
    Io { file: String, source: io::Error },
}

/// Reads and validates WAL from one directory.
#[derive(Debug)]
pub struct WalReader {
    dir: PathBuf,
    seg: WalSegSize,
    magic: u16,
    system_identifier: u64,
    open: Option<(TimelineId, SegNo, File)>,
    /// The segment whose tail after an `XLOG_SWITCH` is being read (all-zero pages).
    zero_tail: Option<(TimelineId, SegNo)>,
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns how many bytes it read.
pub fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl WalReader {
    pub fn new(dir: &Path, seg: WalSegSize, magic: u16, system_identifier: u64) -> Self {
        WalReader {
            dir: dir.to_owned(),
            seg,
            magic,
            system_identifier,
            open: None,
            zero_tail: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn segment_size(&self) -> WalSegSize {
        self.seg
    }

    /// Reads `[start, end)` of `timeline` (both in one segment, `end` at most the segment's end). The pages
    /// touched are validated from their start. Returns exactly the requested bytes, without copying.
    pub fn read(&mut self, timeline: TimelineId, start: Lsn, end: Lsn) -> Result<Bytes, ReadError> {
        let segno = self.seg.segno(start);
        debug_assert!(end > start && end.0 <= self.seg.segment_start(segno + 1).0);
        let name = segment_file_name(timeline, segno, self.seg);
        let first_page = start.0 / XLOG_BLCKSZ as u64 * XLOG_BLCKSZ as u64;
        let offset = self.seg.offset(Lsn(first_page));
        let len = (end.0 - first_page) as usize;
        let exp = PageExpectation {
            magic: self.magic,
            system_identifier: self.system_identifier,
            seg_size: self.seg,
            timeline,
        };
        let mut buf = BytesMut::zeroed(len);
        // A file descriptor kept open across a recycling points at the renamed file: on a validation error
        // reopen once by name before giving up.
        for attempt in 0..2 {
            let file = self.file(timeline, segno, &name, start, attempt > 0)?;
            file.read_exact_at(&mut buf, offset).map_err(|source| {
                if source.kind() == io::ErrorKind::UnexpectedEof {
                    ReadError::Io {
                        file: name.clone(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("file ends before offset {}", offset + len as u64),
                        ),
                    }
                } else {
                    ReadError::Io {
                        file: name.clone(),
                        source,
                    }
                }
            })?;
            match self.validate(&exp, &buf, Lsn(first_page)) {
                Ok(()) => return Ok(buf.freeze().slice((start.0 - first_page) as usize..)),
                Err(source) if attempt > 0 => {
                    return Err(ReadError::Invalid { file: name, source })
                }
                Err(_) => self.open = None,
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The page checks for segments of `timeline`.
    pub fn expectation(&self, timeline: TimelineId) -> PageExpectation {
        PageExpectation {
            magic: self.magic,
            system_identifier: self.system_identifier,
            seg_size: self.seg,
            timeline,
        }
    }

    /// Up to `max` bytes of `timeline` from `start`, not past its segment's end, as they are in the file,
    /// unvalidated (the record walker validates them): fewer where the file ends, none where it is missing.
    pub fn read_raw(
        &self,
        timeline: TimelineId,
        start: Lsn,
        max: usize,
    ) -> Result<Vec<u8>, ReadError> {
        let segno = self.seg.segno(start);
        let name = segment_file_name(timeline, segno, self.seg);
        let offset = self.seg.offset(start);
        let len = ((self.seg.as_u64() - offset) as usize).min(max);
        let file = match File::open(self.dir.join(&name)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(ReadError::Io { file: name, source }),
        };
        let mut buf = vec![0u8; len];
        let got = read_up_to(&file, &mut buf, offset)
            .map_err(|source| ReadError::Io { file: name, source })?;
        buf.truncate(got);
        Ok(buf)
    }

    /// Checks every page that starts in `buf` (which starts at the page-aligned `start`). After an
    /// `XLOG_SWITCH` record PostgreSQL leaves the rest of the segment as zeros, so all-zero pages are accepted
    /// below the flush position, but never as a segment's first page and never followed by a non-zero page in
    /// the same segment (that would be a recycled or damaged file).
    fn validate(&mut self, exp: &PageExpectation, buf: &[u8], start: Lsn) -> Result<(), PageError> {
        let mut at = 0usize;
        while at < buf.len() {
            let lsn = Lsn(start.0 + at as u64);
            let page = &buf[at..(at + XLOG_BLCKSZ).min(buf.len())];
            let segno = self.seg.segno(lsn);
            let in_zero_tail =
                matches!(self.zero_tail, Some((t, s)) if t == exp.timeline && s == segno);
            if self.seg.offset(lsn) != 0 && page.iter().all(|b| *b == 0) {
                self.zero_tail = Some((exp.timeline, segno));
            } else if in_zero_tail {
                return Err(PageError::DataAfterSwitchTail { lsn });
            } else {
                exp.check_pages(page, lsn)?;
            }
            at += XLOG_BLCKSZ;
        }
        Ok(())
    }

    fn file(
        &mut self,
        timeline: TimelineId,
        segno: SegNo,
        name: &str,
        lsn: Lsn,
        reopen: bool,
    ) -> Result<&File, ReadError> {
        let fresh =
            reopen || !matches!(&self.open, Some((t, s, _)) if *t == timeline && *s == segno);
        if fresh {
            let path = self.dir.join(name);
            let f = File::open(&path).map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    ReadError::Gone {
                        file: name.to_owned(),
                        lsn,
                        dir: self.dir.display().to_string(),
                    }
                } else {
                    ReadError::Io {
                        file: name.to_owned(),
                        source,
                    }
                }
            })?;
            self.open = Some((timeline, segno, f));
        }
        match &self.open {
            Some((_, _, f)) => Ok(f),
            None => Err(ReadError::Io {
                file: name.to_owned(),
                source: io::Error::other("no open file"),
            }),
        }
    }

    /// Reads `<timeline>.history` from the WAL directory, if present.
    pub fn history(&self, timeline: TimelineId) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(
            self.dir
                .join(walship_protocol::wal::history_file_name(timeline)),
        ) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walship_protocol::wal::write_page_header;

    #[test]
    fn reads_validates_and_refuses_recycled() {
        let dir = tempfile::tempdir().unwrap();
        let seg = WalSegSize::new(1 << 20).unwrap();
        let exp = PageExpectation {
            magic: 0xD110,
            system_identifier: 5,
            seg_size: seg,
            timeline: 1,
        };
        let mut data = vec![7u8; 1 << 20];
        let base = seg.segment_start(3);
        for p in (0..data.len()).step_by(XLOG_BLCKSZ) {
            write_page_header(&mut data[p..], Lsn(base.0 + p as u64), &exp);
        }
        let name = segment_file_name(1, 3, seg);
        std::fs::write(dir.path().join(&name), &data).unwrap();
        let mut r = WalReader::new(dir.path(), seg, 0xD110, 5);
        let got = r.read(1, Lsn(base.0 + 100), Lsn(base.0 + 20_000)).unwrap();
        assert_eq!(&got[..], &data[100..20_000]);

        // a recycled file: same name, old page addresses
        let old = seg.segment_start(1);
        for p in (0..data.len()).step_by(XLOG_BLCKSZ) {
            write_page_header(&mut data[p..], Lsn(old.0 + p as u64), &exp);
        }
        std::fs::write(dir.path().join(&name), &data).unwrap();
        let e = r
            .read(1, Lsn(base.0 + 100), Lsn(base.0 + 20_000))
            .unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::Invalid {
                    source: PageError::UnexpectedPageAddr { .. },
                    ..
                }
            ),
            "{e}"
        );

        let e = r
            .read(1, seg.segment_start(9), Lsn(seg.segment_start(9).0 + 10))
            .unwrap_err();
        assert!(matches!(e, ReadError::Gone { .. }), "{e}");
    }
}
