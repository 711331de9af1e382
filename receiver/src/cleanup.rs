//! `walship-receiver cleanup %r`: `archive_cleanup_command`. Removes complete segments older than `%r`
//! (compared like pg_archivecleanup: by the whole name, timeline first); never `%r` or anything after it, never a
//! partial, never a history file.
//!
//! With `--object-store`, the store is cleaned too: segments (and leftover partials) older than `%r` whose
//! objects are older than `--keep-days` (the point-in-time-recovery window) are deleted; history files and
//! the identity stay.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use walship_protocol::wal::{segment_file_name, WalFileName};

use crate::archive::{ensure_archive, list_segments};

/// Removes what `restartpoint` (`%r`) no longer needs; returns the names removed.
pub fn cleanup(archive: &Path, restartpoint: &str) -> Result<Vec<String>> {
    // a typo in --archive must not look like "nothing to clean": refuse before touching anything
    let id = ensure_archive(archive)?;
    let seg = id.wal_segment_size;
    match WalFileName::parse(restartpoint, seg) {
        Ok(WalFileName::Segment { .. }) => {}
        _ => {
            bail!("{restartpoint:?} is not a WAL segment name (archive_cleanup_command passes %r)")
        }
    }
    // with an object store: never a segment the store does not hold yet
    let uploads = crate::upload::read_state(archive);
    let mut removed = Vec::new();
    let mut kept = 0;
    for s in list_segments(archive, seg)? {
        if !s.complete {
            continue;
        }
        let name = segment_file_name(s.timeline, s.segno, seg);
        if name.as_str() < restartpoint && !crate::upload::uploaded(uploads.as_ref(), &name) {
            kept += 1;
            continue;
        }
        if name.as_str() < restartpoint {
            fs::remove_file(archive.join(&name)).with_context(|| format!("remove {name}"))?;
            removed.push(name);
        }
    }
    if kept > 0 {
        eprintln!(
            "walship cleanup: kept {kept} segment(s) older than {restartpoint} that the object store does not hold yet"
        );
    }
    record_removed(archive, &removed)?;
    if !removed.is_empty() {
        fs::File::open(archive)
            .and_then(|d| d.sync_all())
            .context("fsync archive directory")?;
    }
    Ok(removed)
}

/// Remembers the newest of the segments `removed` (from the archive or its store), so that restore never
/// takes a removed segment for one that never arrives.
fn record_removed(archive: &Path, removed: &[String]) -> Result<()> {
    let Some(newest) = removed.iter().max() else {
        return Ok(());
    };
    let previous = removed_up_to(archive);
    if previous.as_deref().is_none_or(|p| p < newest.as_str()) {
        crate::durable::replace(archive, CLEANUP_FILE, format!("{newest}\n").as_bytes())?;
    }
    Ok(())
}

/// Where cleanup records the newest segment it removed.
pub const CLEANUP_FILE: &str = "walship.cleanup";

/// The newest segment `cleanup` removed from the archive in `dir`, if it removed any.
pub fn removed_up_to(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(CLEANUP_FILE))
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// Deletes from the store the segments before `restartpoint` stored more than `keep_days` days before `now`
/// (seconds since the epoch), and records them as removed in `archive` (see [`removed_up_to`]); returns the
/// object names deleted.
pub async fn cleanup_store(
    archive: &Path,
    store: &crate::store::Store,
    seg: walship_protocol::WalSegSize,
    restartpoint: &str,
    keep_days: u64,
    now: i64,
) -> Result<Vec<String>> {
    let cutoff = now - (keep_days * 86_400) as i64;
    let mut deleted = Vec::new();
    let mut segments = Vec::new();
    for f in store.list("").await? {
        let Some(s) = crate::archive::ArchivedSegment::from_name(&f.name, seg, 0) else {
            continue;
        };
        let segment = segment_file_name(s.timeline, s.segno, seg);
        if segment.as_str() < restartpoint && f.modified_unix < cutoff {
            store.delete(&f.name).await?;
            deleted.push(f.name);
            segments.push(segment);
        }
    }
    record_removed(archive, &segments)?;
    Ok(deleted)
}
