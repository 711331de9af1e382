//! Segments: a complete one (checked), the partial at failover or its confirmed part for a live standby,
//! and whether a segment will never arrive.

use super::*;

pub(super) fn segment(
    opts: &RestoreOptions,
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<Option<Outcome>> {
    let seg = id.wal_segment_size;
    let name = segment_file_name(timeline, segno, seg);
    let failover = failover(opts)?;
    let handover = failover.as_ref().and_then(|f| f.handover.clone());
    if let Some(h) = handover.as_ref().filter(|h| h.timeline == timeline) {
        if handover_segno(h, seg).is_some_and(|h_segno| segno > h_segno) {
            debug!(file = %name, handed_over = %h.segment, "after the handed-over partial: missing, so recovery ends");
            return Ok(Some(Outcome::Missing));
        }
    }
    if let Some(outcome) = complete_segment(opts, id, timeline, segno)? {
        return Ok(Some(outcome));
    }
    if failover.is_some() || opts.live {
        if let Some(outcome) = partial_segment(opts, id, timeline, segno, failover.as_ref())? {
            return Ok(Some(outcome));
        }
    }
    if let Some(removed) = crate::cleanup::removed_up_to(&opts.archive).filter(|r| *r >= name) {
        if removed.get(..8) == name.get(..8) {
            // never "missing": in archive recovery that would end recovery here, early
            bail!(
                "segment {name} was removed from the archive by cleanup (archive_cleanup_command removed segments up to {removed}): \
                 this server needs WAL the archive no longer keeps; rebuild it from a newer base backup"
            );
        }
    }
    if never_arrives(opts, seg, timeline, segno)? {
        debug!(file = %name, "the archive holds newer WAL: this segment will never arrive");
        return Ok(Some(Outcome::Missing));
    }
    Ok(None)
}

/// The complete segment, from the archive (checked) or else the prefetch spool or the store.
pub(super) fn complete_segment(
    opts: &RestoreOptions,
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<Option<Outcome>> {
    let seg = id.wal_segment_size;
    let name = segment_file_name(timeline, segno, seg);
    let complete = opts.archive.join(&name);
    match File::open(&complete) {
        Ok(f) => {
            validate_complete(&f, id, timeline, segno)
                .with_context(|| format!("archived segment {name} is damaged"))?;
            fs::copy(&complete, &opts.dest)
                .with_context(|| format!("copy {name} to {}", opts.dest.display()))?;
            info!(file = %name, "restored");
            Ok(Some(Outcome::Restored))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // a segment still partial here is not complete in the store either (only complete local segments
            // are uploaded): no need to ask it on every call while the receiver fills it
            let receiving = opts.archive.join(format!("{name}.partial")).exists();
            if opts.object_store.is_none() || receiving {
                return Ok(None);
            }
            match from_spool_or_store(opts, id, timeline, segno) {
                Ok(outcome) => Ok(outcome),
                Err(e) if beyond_local_end(opts, seg, timeline, segno)? => {
                    warn!(file = %name, "the object store is unreachable ({e:#}); going on with the local archive, which receives WAL up to the segment before this one");
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e).with_context(|| format!("open {}", complete.display())),
    }
}

/// The partial segment, zero-padded: its confirmed part for a live standby (`--live`), all of it at failover
/// (then the handover is recorded, which fences the old timeline). A running standby gets only confirmed
/// WAL (the primary had flushed it): provisional bytes reach recovery only at failover (DESIGN.md §1).
pub(super) fn partial_segment(
    opts: &RestoreOptions,
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
    failover: Option<&Failover>,
) -> Result<Option<Outcome>> {
    let seg = id.wal_segment_size;
    let name = segment_file_name(timeline, segno, seg);
    let partial = opts.archive.join(format!("{name}.partial"));
    let limit = failover
        .is_none()
        .then(|| confirmed_in_segment(opts, seg, timeline, segno));
    let handed = match limit {
        Some(0) => None,
        limit => hand_over_partial(opts, id, timeline, segno, &partial, limit)?,
    };
    let Some(state) = failover else {
        return Ok(handed.map(|_| Outcome::Restored));
    };
    let bytes = handed.unwrap_or(0);
    let at_end = handed.is_some() || archive_ends_before(opts, seg, timeline, segno)?;
    if !at_end {
        return Ok(None);
    }
    let record = Handover {
        timeline,
        segment: name.clone(),
        partial_bytes: bytes,
        end_lsn: Lsn(seg.segment_start(segno).0 + bytes),
        at_unix_micros: now_micros(),
    };
    let recorded = state.current_handover().is_some_and(|h| {
        (&h.segment, h.partial_bytes, h.timeline)
            == (&record.segment, record.partial_bytes, record.timeline)
    });
    if !recorded {
        // a failure here (injected in tests) leaves %p written but unrecorded: PostgreSQL is told "missing"
        // or asked to wait, and the next call hands over again and records it
        fail::fail_point!("restore-handover-before-record", |_| Err(anyhow::anyhow!(
            "injected failure before recording the handover"
        )));
        Failover::record_handover(&opts.archive, record.clone())?;
        info!(file = %name, partial_bytes = bytes, end = %record.end_lsn, "failover: handed the end of the archive to recovery");
    }
    Ok(Some(if handed.is_some() {
        Outcome::Restored
    } else {
        Outcome::Missing
    }))
}

/// Whether the archive holds WAL after `segno` of `timeline` (or a newer timeline) and not `segno` itself: the
/// segment will never arrive. The receiver renames a complete segment before it creates the next `.partial`,
/// so a segment completed between our look for it and the listing shows up in a second look: without it,
/// "missing" would end archive recovery one segment early (seen once in the version matrix).
pub(super) fn never_arrives(
    opts: &RestoreOptions,
    seg: WalSegSize,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<bool> {
    let all = segments_after(opts, seg, timeline, segno)?;
    let newer = all
        .iter()
        .any(|s| (s.timeline == timeline && s.segno > segno) || s.timeline > timeline);
    if !newer {
        return Ok(false);
    }
    let name = segment_file_name(timeline, segno, seg);
    let arrived = all
        .iter()
        .any(|s| (s.timeline, s.segno) == (timeline, segno))
        || opts.archive.join(&name).exists()
        || opts.archive.join(format!("{name}.partial")).exists();
    Ok(!arrived)
}

/// The archive's segments (the local directory's, and the store's from `segno` of `timeline` on), sorted.
pub(super) fn segments_after(
    opts: &RestoreOptions,
    seg: WalSegSize,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<Vec<ArchivedSegment>> {
    let local = list_segments(&opts.archive, seg)?;
    let from = segment_file_name(timeline, segno.saturating_sub(1), seg);
    let stored = match with_store(opts, |store| async move { store.list(&from).await }) {
        Ok(Some(stored)) => stored,
        Ok(None) => return Ok(local),
        Err(e) if beyond_local_end(opts, seg, timeline, segno)? => {
            warn!("the object store is unreachable ({e:#}); listing the local archive only, which receives WAL up to the segment before {}", segment_file_name(timeline, segno, seg));
            return Ok(local);
        }
        Err(e) => return Err(e),
    };
    let stored = stored
        .iter()
        .filter_map(|f| ArchivedSegment::from_name(&f.name, seg, 0));
    Ok(merge_segments(local.into_iter().chain(stored)))
}

/// Whether the local archive holds WAL of `timeline` and `segno` comes after all of it. The store holds
/// copies of what this archive's receiver completed, never WAL beyond it, so there an unreachable store can
/// be done without (a failover while the store is down, issue 19 point 8). Before the local end (a segment
/// `cleanup` removed here, or a local archive rebuilt from the store) the store is needed: never answer
/// from the local archive alone there, or archive recovery would end early.
pub(super) fn beyond_local_end(
    opts: &RestoreOptions,
    seg: WalSegSize,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<bool> {
    let newest = list_segments(&opts.archive, seg)?
        .iter()
        .filter(|s| s.timeline == timeline)
        .map(|s| s.segno)
        .max();
    Ok(newest.is_some_and(|n| segno > n))
}

/// Whether `segno` of `timeline` is where the archive ends (the next segment after the newest complete one).
pub(super) fn archive_ends_before(
    opts: &RestoreOptions,
    seg: WalSegSize,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<bool> {
    let segments = segments_after(opts, seg, timeline, segno)?;
    Ok(
        match segments.iter().rev().find(|s| s.timeline == timeline) {
            Some(last) => last.complete && last.segno + 1 == segno,
            None => false,
        },
    )
}

pub(super) fn validate_complete(
    f: &File,
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<()> {
    let seg = id.wal_segment_size;
    let size = f.metadata().context("stat")?.len();
    if size != seg.as_u64() {
        bail!("it has {size} bytes, a segment has {}", seg.as_u64());
    }
    check_first_page(f, id, timeline, segno)
}

pub(super) fn check_first_page(
    f: &File,
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<()> {
    let mut page = [0u8; LONG_PAGE_HEADER];
    f.read_exact_at(&mut page, 0)
        .context("read the first page header")?;
    check_page_header(&page, id, timeline, segno)
}

pub(super) fn check_page_header(
    page: &[u8],
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<()> {
    anyhow::ensure!(
        page.len() >= LONG_PAGE_HEADER,
        "{} bytes, shorter than a page header",
        page.len()
    );
    let exp = id
        .page_expectation(timeline)
        .with_context(|| format!("PostgreSQL {} is not supported", id.pg_major()))?;
    exp.check(
        &page[..LONG_PAGE_HEADER],
        id.wal_segment_size.segment_start(segno),
    )?;
    Ok(())
}

/// Writes the `.partial` of the segment, zero-padded to the segment size, to `%p`. Returns the bytes handed
/// over, or `None` when there is no partial (or one too short to hold a page header).
/// How many bytes of segment `segno` of `timeline` the archive holds confirmed, by `walship.position` (0
/// when it does not say: a running standby then waits for the complete segment). The file may be older than
/// the receiver's state, never ahead of it: a running standby may get less than is confirmed, never more.
pub(super) fn confirmed_in_segment(
    opts: &RestoreOptions,
    seg: WalSegSize,
    timeline: TimelineId,
    segno: SegNo,
) -> u64 {
    match crate::archive::read_positions(&opts.archive) {
        Some(p) if p.timeline == timeline && seg.segno(p.confirmed) == segno => {
            seg.offset(p.confirmed)
        }
        _ => 0,
    }
}

/// Hands the partial segment `segno` (at most `limit` bytes of it, when given) to recovery, zero-padded.
/// Without a local partial (and without a limit: at failover) the store's partial is taken.
pub(super) fn hand_over_partial(
    opts: &RestoreOptions,
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
    partial: &Path,
    limit: Option<u64>,
) -> Result<Option<u64>> {
    let f = match File::open(partial) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && limit.is_some() => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return match hand_over_stored_partial(opts, id, timeline, segno) {
                Err(e) if beyond_local_end(opts, id.wal_segment_size, timeline, segno)? => {
                    warn!(partial = %partial.display(), "the object store is unreachable ({e:#}); the local archive ends before this segment, so there is no partial to hand over");
                    Ok(None)
                }
                r => r,
            };
        }
        Err(e) => return Err(e).with_context(|| format!("open {}", partial.display())),
    };
    let seg = id.wal_segment_size;
    let size = f.metadata().context("stat partial segment")?.len();
    if size > seg.as_u64() {
        bail!(
            "{} has {size} bytes, more than a segment",
            partial.display()
        );
    }
    // a preallocated partial ends at its last valid record (or the durable end recorded), not at its size
    let len = crate::archive::partial_end(&opts.archive, id, timeline, segno)?;
    let len = limit.map_or(len, |l| len.min(l));
    if len < LONG_PAGE_HEADER as u64 {
        return Ok(None);
    }
    check_first_page(&f, id, timeline, segno)
        .with_context(|| format!("partial segment {} is damaged", partial.display()))?;
    // hand over only what is on disk: what a crashed receiver left in the page cache is made durable first
    f.sync_data()
        .with_context(|| format!("fsync {}", partial.display()))?;
    refuse_archive_mode_always(opts)?;
    let tmp_dest = &opts.dest;
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp_dest)
        .with_context(|| format!("create {}", tmp_dest.display()))?;
    let mut src = io::Read::take(f, len);
    let copied = io::copy(&mut src, &mut out)
        .with_context(|| format!("copy {} to {}", partial.display(), tmp_dest.display()))?;
    out.set_len(seg.as_u64())
        .with_context(|| format!("pad {} to {} bytes", tmp_dest.display(), seg.as_u64()))?;
    info!(file = %partial.display(), bytes = copied, "handed the partial segment to recovery, zero-padded");
    Ok(Some(copied))
}

pub(super) fn handover_segno(h: &Handover, seg: WalSegSize) -> Option<SegNo> {
    match WalFileName::parse(&h.segment, seg) {
        Ok(WalFileName::Segment { segno, .. }) => Some(segno),
        _ => None,
    }
}
