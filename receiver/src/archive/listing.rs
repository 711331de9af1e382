//! What the archive directory holds: its segments, complete or partial, and where its WAL ends.

use super::*;

/// A WAL file found in an archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchivedSegment {
    pub timeline: TimelineId,
    pub segno: SegNo,
    pub complete: bool,
    pub size: u64,
}

impl ArchivedSegment {
    /// The segment that a complete (`…03`) or partial (`…03.partial`) segment file's name stands for; `None`
    /// for any other name.
    pub fn from_name(name: &str, seg: WalSegSize, size: u64) -> Option<ArchivedSegment> {
        let (timeline, segno, complete) = match WalFileName::parse(name, seg) {
            Ok(WalFileName::Segment { timeline, segno }) => (timeline, segno, true),
            Ok(WalFileName::Partial { timeline, segno }) => (timeline, segno, false),
            _ => return None,
        };
        Some(ArchivedSegment {
            timeline,
            segno,
            complete,
            size,
        })
    }
}

/// One entry per segment, sorted by timeline and segment. A segment present both complete and partial (a crash
/// between rename steps cannot cause it, but a copy by hand can, and the store keeps a partial until the
/// complete segment is up) is listed once, as complete.
pub fn merge_segments(files: impl IntoIterator<Item = ArchivedSegment>) -> Vec<ArchivedSegment> {
    let mut found: BTreeMap<(TimelineId, SegNo), ArchivedSegment> = BTreeMap::new();
    for f in files {
        let e = found.entry((f.timeline, f.segno)).or_insert(f);
        if f.complete && !e.complete {
            *e = f;
        }
    }
    found.into_values().collect()
}

/// Lists the segment files of an archive (read-only; no lock needed), as [`merge_segments`] has them.
pub fn list_segments(dir: &Path, seg: WalSegSize) -> Result<Vec<ArchivedSegment>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("list archive {}", dir.display()))? {
        let entry = entry.with_context(|| format!("list archive {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(mut s) = ArchivedSegment::from_name(name, seg, 0) {
            s.size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            files.push(s);
        }
    }
    Ok(merge_segments(files))
}

/// Where the archived WAL of the newest timeline ends, from the files (what has been written; the receiver
/// acknowledges only what it has fsynced).
pub fn archive_end(segments: &[ArchivedSegment], seg: WalSegSize) -> Option<(TimelineId, Lsn)> {
    let last = segments.last()?;
    let end = if last.complete {
        seg.segment_start(last.segno + 1)
    } else {
        Lsn(seg.segment_start(last.segno).0 + last.size)
    };
    Some((last.timeline, end))
}

/// Whether the archive in `dir` holds WAL segments of its own: it receives WAL, it is not restoring from the
/// object store alone (whose objects are copies of what such an archive completed).
pub fn receives_wal(dir: &Path) -> bool {
    ensure_archive(dir)
        .and_then(|id| list_segments(dir, id.wal_segment_size))
        .is_ok_and(|l| !l.is_empty())
}
