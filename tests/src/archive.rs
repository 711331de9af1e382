//! Reading a walship archive from the outside and comparing it with a primary's `pg_wal`.

use std::collections::BTreeMap;
use std::path::Path;

use walship_protocol::wal::{page_magic_for_version, PageExpectation, SegNo, WalFileName};
use walship_protocol::{Lsn, TimelineId, WalSegSize};

/// The WAL files of an archive: per timeline, segment number → (complete?, size).
pub fn wal_files(
    archive: &Path,
    seg: WalSegSize,
) -> BTreeMap<TimelineId, BTreeMap<SegNo, (bool, u64)>> {
    let mut out: BTreeMap<TimelineId, BTreeMap<SegNo, (bool, u64)>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(archive) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
        match WalFileName::parse(&name, seg) {
            Ok(WalFileName::Segment { timeline, segno }) => {
                out.entry(timeline).or_default().insert(segno, (true, size));
            }
            Ok(WalFileName::Partial { timeline, segno }) => {
                out.entry(timeline)
                    .or_default()
                    .entry(segno)
                    .or_insert((false, size));
            }
            _ => {}
        }
    }
    out
}

/// Where the archived WAL of `timeline` ends (what the receiver has written; durable once acknowledged).
pub fn archive_end(archive: &Path, seg: WalSegSize, timeline: TimelineId) -> Option<Lsn> {
    let files = wal_files(archive, seg);
    let (segno, (complete, _)) = files.get(&timeline)?.iter().next_back()?;
    Some(if *complete {
        seg.segment_start(segno + 1)
    } else {
        Lsn(seg.segment_start(*segno).0 + partial_len(archive, seg, timeline, *segno)?)
    })
}

/// The page expectation of the archive's pinned cluster (from `walship.id`) for `timeline`.
pub fn page_expectation(
    archive: &Path,
    seg: WalSegSize,
    timeline: TimelineId,
) -> Option<PageExpectation> {
    let text = std::fs::read_to_string(archive.join("walship.id")).ok()?;
    let value = |key: &str| {
        text.lines()
            .filter_map(|l| l.trim().split_once('='))
            .find(|(k, _)| k.trim() == key)
            .and_then(|(_, v)| v.trim().parse::<u64>().ok())
    };
    Some(PageExpectation {
        magic: page_magic_for_version(value("pg_version_num")? as u32)?,
        system_identifier: value("system_identifier")?,
        seg_size: seg,
        timeline,
    })
}

/// How many bytes of the archive's `.partial` of `segno` the receiver has written: its size when it grows (an
/// older receiver's); else, it is preallocated and zero-filled, the end of its last complete, valid record or
/// of its last byte that is not zero or of the durable end the receiver recorded, whichever is further (the
/// sender may hold back the last byte of a record that ends the segment: the rest of it is there).
pub fn partial_len(
    archive: &Path,
    seg: WalSegSize,
    timeline: TimelineId,
    segno: SegNo,
) -> Option<u64> {
    let name = walship_protocol::wal::segment_file_name(timeline, segno, seg);
    let data = std::fs::read(archive.join(format!("{name}.partial"))).ok()?;
    if (data.len() as u64) < seg.as_u64() {
        return Some(data.len() as u64);
    }
    let exp = page_expectation(archive, seg, timeline)?;
    let records =
        walship_protocol::walker::valid_prefix(exp, seg.segment_start(segno), &data).records;
    let written = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    // The receiver's record of its durable end: the shipped tail of an unfinished record may end in zero
    // bytes (the high bytes of a length or an LSN), which neither the walk nor the last non-zero byte can
    // tell from the preallocated zeros after it.
    let recorded = walship_receiver::archive::read_positions(archive)
        .filter(|p| p.timeline == timeline && seg.segno(p.durable) == segno)
        .map_or(0, |p| seg.offset(p.durable));
    Some(records.max(written).max(recorded as usize) as u64)
}

/// What [`assert_matches_primary`] compared.
#[derive(Debug, Default)]
pub struct Compared {
    pub complete_segments: usize,
    pub partial_bytes: u64,
    pub first: Option<SegNo>,
    pub last: Option<SegNo>,
}

/// Asserts that every WAL file of `timeline` in the archive is byte-identical to the primary's file in
/// `pg_wal` (a `.partial` to the same prefix of it), and that the archive has no gap: every segment from the
/// first to the last is there, complete except for the last.
pub fn assert_matches_primary(
    archive: &Path,
    pg_wal: &Path,
    seg: WalSegSize,
    timeline: TimelineId,
) -> Compared {
    assert_matches_primary_from(archive, pg_wal, seg, timeline, 0)
}

/// [`assert_matches_primary`] for the segments from `from` on (older ones may be gone from pg_wal).
pub fn assert_matches_primary_from(
    archive: &Path,
    pg_wal: &Path,
    seg: WalSegSize,
    timeline: TimelineId,
    from: SegNo,
) -> Compared {
    let files = wal_files(archive, seg);
    let segs = files.get(&timeline).unwrap_or_else(|| {
        panic!(
            "archive {} has no WAL of timeline {timeline}",
            archive.display()
        )
    });
    let mut c = Compared::default();
    let first = (*segs.keys().next().expect("segments")).max(from);
    let last = *segs.keys().next_back().expect("segments");
    c.first = Some(first);
    c.last = Some(last);
    for segno in first..=last {
        let name = walship_protocol::wal::segment_file_name(timeline, segno, seg);
        let (complete, size) = *segs
            .get(&segno)
            .unwrap_or_else(|| panic!("gap in the archive: segment {name} is missing"));
        assert!(
            complete || segno == last,
            "segment {name} is still partial but newer segments exist"
        );
        let primary = std::fs::read(pg_wal.join(&name)).unwrap_or_else(|e| {
            panic!("primary's {name} is not readable ({e}); keep WAL longer in the test")
        });
        if complete {
            let ours = std::fs::read(archive.join(&name)).expect("read archived segment");
            assert_eq!(
                ours.len() as u64,
                seg.as_u64(),
                "archived {name} has the wrong size"
            );
            assert!(ours == primary, "archived segment {name} differs from the primary's (first difference at byte {:?})", first_difference(&ours, &primary));
            c.complete_segments += 1;
        } else {
            // the receiver may complete the segment while we look: then compare the complete file
            let ours = std::fs::read(archive.join(format!("{name}.partial")))
                .or_else(|_| std::fs::read(archive.join(&name)))
                .expect("read partial");
            // a preallocated partial: WAL up to where it was written, zeros after it
            let len = if ours.len() as u64 == seg.as_u64() {
                partial_len(archive, seg, timeline, segno).unwrap_or(seg.as_u64()) as usize
            } else {
                ours.len()
            };
            assert!(ours.len() as u64 >= size);
            assert!(
                ours[..len] == primary[..len],
                "archived {name}.partial differs from the primary's segment (first difference at byte {:?})",
                first_difference(&ours[..len], &primary)
            );
            c.partial_bytes = len as u64;
        }
    }
    c
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Names, sizes and contents of every file in a directory (for "unchanged" assertions), without the
/// receiver's informational status file.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    // the spare partial is filled in the background
                    !name.starts_with("walship.status") && name != "walship.spare"
                })
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to the harness's deadline) until the archive holds timeline 1 up to at least `target`.
pub async fn wait_archived(archive: &Path, seg: WalSegSize, target: Lsn) {
    crate::wait_for(
        &format!("the archive to reach {target}"),
        crate::cluster::WAIT,
        || async {
            archive_end(archive, seg, 1)
                .filter(|end| *end >= target)
                .map(|_| ())
        },
    )
    .await;
}
