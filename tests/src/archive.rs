//! Reading a walship archive from the outside and comparing it with a primary's `pg_wal`.

use std::collections::BTreeMap;
use std::path::Path;

use walship_protocol::wal::{SegNo, WalFileName};
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
    let (segno, (complete, size)) = files.get(&timeline)?.iter().next_back()?;
    Some(if *complete {
        seg.segment_start(segno + 1)
    } else {
        Lsn(seg.segment_start(*segno).0 + size)
    })
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
            assert!(ours.len() as u64 >= size);
            assert!(
                ours[..] == primary[..ours.len()],
                "archived {name}.partial differs from the primary's segment (first difference at byte {:?})",
                first_difference(&ours, &primary)
            );
            c.partial_bytes = ours.len() as u64;
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
                    !e.file_name()
                        .to_string_lossy()
                        .starts_with("walship.status")
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
