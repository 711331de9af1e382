//! WAL vocabulary: segment sizes, segment and history file names, page headers.
//!
//! File names are validated strictly: only names produced by [`WalFileName::parse`] may ever become a path,
//! so nothing a peer or `restore_command` says can escape the archive directory.

use std::fmt;

use crate::error::{PageError, SegSizeError, WalNameError};
use crate::lsn::Lsn;

/// PostgreSQL's `TimeLineID`.
pub type TimelineId = u32;
/// A segment number: `lsn / wal_segment_size`.
pub type SegNo = u64;

/// `XLOG_BLCKSZ`: walship supports the default 8 kB WAL pages only (PostgreSQL's own default; a build with
/// another `--with-wal-blocksize` is refused with a clear error when its first page is read).
pub const XLOG_BLCKSZ: usize = 8192;
/// `SizeOfXLogShortPHD` (24 bytes with alignment).
pub const SHORT_PAGE_HEADER: usize = 24;
/// `SizeOfXLogLongPHD` (40 bytes).
pub const LONG_PAGE_HEADER: usize = 40;

/// `xlp_info` flags (xlog_internal.h).
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub const XLP_LONG_HEADER: u16 = 0x0002;
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// A WAL segment size: a power of two from 1 MB to 1 GB (initdb `--wal-segsize`). Never assume 16 MB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalSegSize(u32);

impl WalSegSize {
    pub const MIN: u32 = 1 << 20;
    pub const MAX: u32 = 1 << 30;
    /// PostgreSQL's default, for tests and documentation only.
    pub const DEFAULT: WalSegSize = WalSegSize(16 << 20);

    pub fn new(bytes: u64) -> Result<Self, SegSizeError> {
        if bytes.is_power_of_two() && (Self::MIN as u64..=Self::MAX as u64).contains(&bytes) {
            Ok(WalSegSize(bytes as u32))
        } else {
            Err(SegSizeError(bytes))
        }
    }

    pub fn bytes(self) -> u32 {
        self.0
    }

    pub fn as_u64(self) -> u64 {
        self.0 as u64
    }

    /// `XLogSegmentsPerXLogId`: how many segments share one "xlogid" (the middle 8 hex digits of a name).
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / self.0 as u64
    }

    /// The segment holding `lsn`.
    pub fn segno(self, lsn: Lsn) -> SegNo {
        lsn.0 / self.0 as u64
    }

    /// The offset of `lsn` inside its segment.
    pub fn offset(self, lsn: Lsn) -> u64 {
        lsn.0 % self.0 as u64
    }

    /// The first position of segment `segno`.
    pub fn segment_start(self, segno: SegNo) -> Lsn {
        Lsn(segno.saturating_mul(self.0 as u64))
    }

    /// The start of the segment holding `lsn`.
    pub fn floor(self, lsn: Lsn) -> Lsn {
        Lsn(lsn.0 - self.offset(lsn))
    }
}

impl fmt::Display for WalSegSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1 << 20 {
            write!(f, "{} MB", self.0 >> 20)
        } else {
            write!(f, "{} bytes", self.0)
        }
    }
}

/// The name of segment `segno` on `timeline` (`XLogFileName`).
pub fn segment_file_name(timeline: TimelineId, segno: SegNo, seg: WalSegSize) -> String {
    let per = seg.segments_per_xlogid();
    format!("{:08X}{:08X}{:08X}", timeline, segno / per, segno % per)
}

/// The name of the history file that introduces `timeline` (`TLHistoryFileName`).
pub fn history_file_name(timeline: TimelineId) -> String {
    format!("{timeline:08X}.history")
}

/// A file name walship recognises. Anything else is refused, so only these names ever become paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalFileName {
    /// A complete segment, `TTTTTTTTXXXXXXXXYYYYYYYY`.
    Segment { timeline: TimelineId, segno: SegNo },
    /// An incomplete segment in a walship archive, `<segment>.partial`.
    Partial { timeline: TimelineId, segno: SegNo },
    /// `TTTTTTTT.history`.
    History { timeline: TimelineId },
    /// A backup history file, `<segment>.XXXXXXXX.backup`.
    Backup {
        timeline: TimelineId,
        segno: SegNo,
        offset: u32,
    },
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn hex8(s: &str) -> u32 {
    // callers checked 8 upper-case hex digits
    u32::from_str_radix(s, 16).unwrap_or(0)
}

impl WalFileName {
    /// Parses a bare file name (no directories) strictly: upper-case hex only, segment parts in range.
    pub fn parse(name: &str, seg: WalSegSize) -> Result<Self, WalNameError> {
        let not = || WalNameError::NotAWalFileName {
            name: name.to_owned(),
        };
        if !name.is_ascii() {
            return Err(not());
        }
        let segment = |s: &str| -> Result<(TimelineId, SegNo), WalNameError> {
            if s.len() != 24 || !is_upper_hex(s) {
                return Err(not());
            }
            let tli = hex8(&s[0..8]);
            let hi = hex8(&s[8..16]) as u64;
            let lo = hex8(&s[16..24]);
            if tli == 0 {
                return Err(WalNameError::TimelineZero {
                    name: name.to_owned(),
                });
            }
            let per = seg.segments_per_xlogid();
            if lo as u64 >= per {
                return Err(WalNameError::SegmentOutOfRange {
                    name: name.to_owned(),
                    low: lo,
                    max: (per - 1) as u32,
                    seg_size: seg.bytes(),
                });
            }
            Ok((tli, hi * per + lo as u64))
        };
        if let Some(base) = name.strip_suffix(".partial") {
            let (timeline, segno) = segment(base)?;
            return Ok(WalFileName::Partial { timeline, segno });
        }
        if let Some(base) = name.strip_suffix(".history") {
            if base.len() != 8 || !is_upper_hex(base) {
                return Err(not());
            }
            let timeline = hex8(base);
            if timeline == 0 {
                return Err(WalNameError::TimelineZero {
                    name: name.to_owned(),
                });
            }
            return Ok(WalFileName::History { timeline });
        }
        if let Some(base) = name.strip_suffix(".backup") {
            let (seg_part, off) = base.split_once('.').ok_or_else(not)?;
            if off.len() != 8 || !is_upper_hex(off) {
                return Err(not());
            }
            let (timeline, segno) = segment(seg_part)?;
            return Ok(WalFileName::Backup {
                timeline,
                segno,
                offset: hex8(off),
            });
        }
        let (timeline, segno) = segment(name)?;
        Ok(WalFileName::Segment { timeline, segno })
    }

    /// The canonical file name (what [`WalFileName::parse`] accepts).
    pub fn to_name(&self, seg: WalSegSize) -> String {
        match *self {
            WalFileName::Segment { timeline, segno } => segment_file_name(timeline, segno, seg),
            WalFileName::Partial { timeline, segno } => {
                format!("{}.partial", segment_file_name(timeline, segno, seg))
            }
            WalFileName::History { timeline } => history_file_name(timeline),
            WalFileName::Backup {
                timeline,
                segno,
                offset,
            } => {
                format!(
                    "{}.{offset:08X}.backup",
                    segment_file_name(timeline, segno, seg)
                )
            }
        }
    }
}

/// `XLOG_PAGE_MAGIC` of a PostgreSQL major version (`server_version_num / 100` for 10+, e.g. 906 for 9.6).
pub fn page_magic_for_version(server_version_num: u32) -> Option<u16> {
    let major = if server_version_num >= 100_000 {
        server_version_num / 10_000
    } else {
        server_version_num / 100
    };
    Some(match major {
        906 => 0xD093,
        10 => 0xD097,
        11 => 0xD098,
        12 => 0xD101,
        13 => 0xD106,
        14 => 0xD10D,
        15 => 0xD110,
        16 => 0xD113,
        17 => 0xD116,
        18 => 0xD118,
        _ => return None,
    })
}

/// The extra fields of the first page of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongHeader {
    pub system_identifier: u64,
    pub seg_size: u32,
    pub xlog_blcksz: u32,
}

/// A parsed WAL page header (`XLogPageHeaderData`, native = little-endian byte order on the platforms walship
/// supports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub timeline: TimelineId,
    pub pageaddr: Lsn,
    pub rem_len: u32,
    pub long: Option<LongHeader>,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl PageHeader {
    /// Parses the header at the start of `page`; `lsn` only names the page in errors.
    pub fn parse(page: &[u8], lsn: Lsn) -> Result<PageHeader, PageError> {
        if page.len() < SHORT_PAGE_HEADER {
            return Err(PageError::Short {
                lsn,
                len: page.len(),
            });
        }
        let info = le_u16(page, 2);
        let long = if info & XLP_LONG_HEADER != 0 {
            if page.len() < LONG_PAGE_HEADER {
                return Err(PageError::Short {
                    lsn,
                    len: page.len(),
                });
            }
            Some(LongHeader {
                system_identifier: le_u64(page, 24),
                seg_size: le_u32(page, 32),
                xlog_blcksz: le_u32(page, 36),
            })
        } else {
            None
        };
        Ok(PageHeader {
            magic: le_u16(page, 0),
            info,
            timeline: le_u32(page, 4),
            pageaddr: Lsn(le_u64(page, 8)),
            rem_len: le_u32(page, 16),
            long,
        })
    }

    /// The header length on disk.
    pub fn len(&self) -> usize {
        if self.long.is_some() {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        }
    }

    /// Never true; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a page must look like to be shipped or served: the checks of xlogreader.c
/// `XLogReaderValidatePageHeader` that can be made without reading records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageExpectation {
    pub magic: u16,
    pub system_identifier: u64,
    pub seg_size: WalSegSize,
    /// The timeline of the segment file; pages may carry this or an older timeline (the first segment of a
    /// new timeline starts with a copy of the old one).
    pub timeline: TimelineId,
}

impl PageExpectation {
    /// Validates the page that must start at `lsn` (page-aligned). `page` holds at least the header.
    pub fn check(&self, page: &[u8], lsn: Lsn) -> Result<PageHeader, PageError> {
        let h = PageHeader::parse(page, lsn)?;
        if h.magic != self.magic {
            return Err(PageError::BadMagic {
                lsn,
                found: h.magic,
                expected: self.magic,
            });
        }
        if h.info & !XLP_ALL_FLAGS != 0 {
            return Err(PageError::BadInfo { lsn, info: h.info });
        }
        if h.pageaddr != lsn {
            return Err(PageError::UnexpectedPageAddr {
                lsn,
                found: h.pageaddr,
            });
        }
        if h.timeline == 0 || h.timeline > self.timeline {
            return Err(PageError::BadTimeline {
                lsn,
                found: h.timeline,
                max: self.timeline,
            });
        }
        if self.seg_size.offset(lsn) == 0 {
            let long = h.long.ok_or(PageError::MissingLongHeader { lsn })?;
            if long.system_identifier != self.system_identifier {
                return Err(PageError::ForeignSystem {
                    lsn,
                    found: long.system_identifier,
                    expected: self.system_identifier,
                });
            }
            if long.seg_size != self.seg_size.bytes() {
                return Err(PageError::SegSizeMismatch {
                    lsn,
                    found: long.seg_size,
                    expected: self.seg_size.bytes(),
                });
            }
            if long.xlog_blcksz as usize != XLOG_BLCKSZ {
                return Err(PageError::BlockSize {
                    lsn,
                    found: long.xlog_blcksz,
                });
            }
        }
        Ok(h)
    }

    /// Validates every page that starts inside `buf`, where `buf` begins at the page-aligned `start`.
    /// A trailing page whose header is not complete yet in `buf` is checked as far as it goes only when at
    /// least its short header is there.
    pub fn check_pages(&self, buf: &[u8], start: Lsn) -> Result<(), PageError> {
        debug_assert_eq!(start.0 % XLOG_BLCKSZ as u64, 0);
        let mut at = 0usize;
        while at < buf.len() {
            let lsn = Lsn(start.0 + at as u64);
            let end = (at + XLOG_BLCKSZ).min(buf.len());
            let page = &buf[at..end];
            let need = if self.seg_size.offset(lsn) == 0 {
                LONG_PAGE_HEADER
            } else {
                SHORT_PAGE_HEADER
            };
            if page.len() >= need {
                self.check(page, lsn)?;
            }
            at += XLOG_BLCKSZ;
        }
        Ok(())
    }
}

/// Writes a valid page header for `lsn` into `page` (tests, fuzzing, demos). `page` is at least 40 bytes.
pub fn write_page_header(page: &mut [u8], lsn: Lsn, exp: &PageExpectation) {
    let long = exp.seg_size.offset(lsn) == 0;
    page[0..2].copy_from_slice(&exp.magic.to_le_bytes());
    let info: u16 = if long { XLP_LONG_HEADER } else { 0 };
    page[2..4].copy_from_slice(&info.to_le_bytes());
    page[4..8].copy_from_slice(&exp.timeline.to_le_bytes());
    page[8..16].copy_from_slice(&lsn.0.to_le_bytes());
    page[16..20].copy_from_slice(&0u32.to_le_bytes());
    page[20..24].fill(0);
    if long {
        page[24..32].copy_from_slice(&exp.system_identifier.to_le_bytes());
        page[32..36].copy_from_slice(&exp.seg_size.bytes().to_le_bytes());
        page[36..40].copy_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
    }
}

/// One entry of a timeline history file: `timeline` was left for the next one at `switchpoint`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub timeline: TimelineId,
    pub switchpoint: Lsn,
}

/// Parses a `.history` file (`readTimeLineHistory`): lines `parentTLI<tab>switchpoint<tab>reason`, comments
/// with `#`, blank lines ignored. Returns `None` for a malformed file.
pub fn parse_history(content: &[u8]) -> Option<Vec<HistoryEntry>> {
    let text = std::str::from_utf8(content).ok()?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let timeline: u32 = fields.next()?.parse().ok()?;
        let switchpoint: Lsn = fields.next()?.parse().ok()?;
        if out
            .last()
            .is_some_and(|e: &HistoryEntry| e.timeline >= timeline)
        {
            return None;
        }
        out.push(HistoryEntry {
            timeline,
            switchpoint,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg16() -> WalSegSize {
        WalSegSize::new(16 << 20).unwrap()
    }

    #[test]
    fn segment_sizes() {
        for ok in [1u64 << 20, 16 << 20, 64 << 20, 1 << 30] {
            assert_eq!(WalSegSize::new(ok).unwrap().as_u64(), ok);
        }
        for bad in [0u64, 8192, (1 << 20) - 1, 3 << 20, 2 << 30, u64::MAX] {
            assert!(WalSegSize::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_round_trip_for_every_size() {
        for mb in [1u64, 2, 16, 64, 1024] {
            let seg = WalSegSize::new(mb << 20).unwrap();
            for segno in [
                0u64,
                1,
                255,
                256,
                4095,
                4096,
                1 << 20,
                seg.segments_per_xlogid() * 7 + 3,
            ] {
                let name = segment_file_name(1, segno, seg);
                assert_eq!(
                    WalFileName::parse(&name, seg).unwrap(),
                    WalFileName::Segment { timeline: 1, segno }
                );
                let partial = WalFileName::Partial { timeline: 2, segno };
                assert_eq!(
                    WalFileName::parse(&partial.to_name(seg), seg).unwrap(),
                    partial
                );
            }
        }
        // 16 MB segments: 256 per xlogid
        assert_eq!(
            segment_file_name(1, 0x1FF, seg16()),
            "0000000100000001000000FF"
        );
        // 1 GB segments: 4 per xlogid
        let g = WalSegSize::new(1 << 30).unwrap();
        assert_eq!(segment_file_name(3, 9, g), "000000030000000200000001");
        assert!(WalFileName::parse("000000010000000000000004", g).is_err());
    }

    #[test]
    fn strict_names() {
        let seg = seg16();
        assert_eq!(
            WalFileName::parse("00000002.history", seg).unwrap(),
            WalFileName::History { timeline: 2 }
        );
        assert_eq!(
            WalFileName::parse("000000010000000000000002.00000028.backup", seg).unwrap(),
            WalFileName::Backup {
                timeline: 1,
                segno: 2,
                offset: 0x28
            }
        );
        for bad in [
            "",
            "..",
            "../000000010000000000000001",
            "/etc/passwd",
            "000000010000000000000001/",
            "00000001000000000000001",
            "0000000100000000000000011",
            "00000001000000000000000a",
            "000000000000000000000001",
            "000000010000000000000100",
            "00000000.history",
            "0000001.history",
            "000000010000000000000001.partial.partial",
            "000000010000000000000001.tmp",
            "RECOVERYXLOG",
            "00000001000000000000000１",
        ] {
            assert!(WalFileName::parse(bad, seg).is_err(), "{bad:?} accepted");
        }
    }

    fn exp() -> PageExpectation {
        PageExpectation {
            magic: 0xD110,
            system_identifier: 42,
            seg_size: seg16(),
            timeline: 2,
        }
    }

    #[test]
    fn page_checks() {
        let e = exp();
        let mut seg = vec![0u8; 3 * XLOG_BLCKSZ];
        let base = Lsn(5 * (16 << 20));
        for i in 0..3 {
            write_page_header(
                &mut seg[i * XLOG_BLCKSZ..],
                Lsn(base.0 + (i * XLOG_BLCKSZ) as u64),
                &e,
            );
        }
        e.check_pages(&seg, base).unwrap();
        let h = e.check(&seg, base).unwrap();
        assert_eq!(h.long.unwrap().system_identifier, 42);
        assert_eq!(h.len(), LONG_PAGE_HEADER);

        let second = Lsn(base.0 + XLOG_BLCKSZ as u64);
        let mut bad = seg.clone();
        bad[XLOG_BLCKSZ + 8..XLOG_BLCKSZ + 16]
            .copy_from_slice(&(second.0 - (16 << 20)).to_le_bytes());
        assert!(matches!(
            e.check_pages(&bad, base),
            Err(PageError::UnexpectedPageAddr { .. })
        ));

        let mut bad = seg.clone();
        bad[0] ^= 1;
        assert!(matches!(
            e.check_pages(&bad, base),
            Err(PageError::BadMagic { .. })
        ));

        let other = PageExpectation {
            system_identifier: 7,
            ..e
        };
        assert!(matches!(
            other.check(&seg, base),
            Err(PageError::ForeignSystem {
                found: 42,
                expected: 7,
                ..
            })
        ));

        let older = PageExpectation { timeline: 1, ..e };
        assert!(matches!(
            older.check(&seg, base),
            Err(PageError::BadTimeline { .. })
        ));

        let zeros = vec![0u8; XLOG_BLCKSZ];
        assert!(e.check(&zeros, second).is_err());
        assert!(matches!(
            e.check(&seg[..10], base),
            Err(PageError::Short { .. })
        ));
        // a page header that is not complete yet at the end of the buffer is not judged
        e.check_pages(&seg[..XLOG_BLCKSZ + 10], base).unwrap();
    }

    #[test]
    fn magic_table() {
        assert_eq!(page_magic_for_version(90624), Some(0xD093));
        assert_eq!(page_magic_for_version(100020), Some(0xD097));
        assert_eq!(page_magic_for_version(150018), Some(0xD110));
        assert_eq!(page_magic_for_version(180004), Some(0xD118));
        assert_eq!(page_magic_for_version(90500), None);
        assert_eq!(page_magic_for_version(190000), None);
    }

    #[test]
    fn history_files() {
        let text =
            b"1\t0/3000158\tno recovery target specified\n\n# c\n2\t0/5000000\tafter promote\n";
        let h = parse_history(text).unwrap();
        assert_eq!(
            h,
            vec![
                HistoryEntry {
                    timeline: 1,
                    switchpoint: Lsn(0x300_0158)
                },
                HistoryEntry {
                    timeline: 2,
                    switchpoint: Lsn(0x500_0000)
                },
            ]
        );
        assert!(parse_history(b"x\t0/1\n").is_none());
        assert!(parse_history(b"2\t0/1\n1\t0/2\n").is_none());
    }
}
