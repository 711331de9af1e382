//! What the local archive lacks, from the prefetch spool or the object store (decompressed, checked).

use super::*;

/// File `name` from the object store of `opts`, decompressed and checked; `None` without a store or when
/// the store does not hold it.
pub(super) fn from_store(opts: &RestoreOptions, name: &str) -> Result<Option<Vec<u8>>> {
    with_store(opts, |store| async move { store.get(name).await }).map(Option::flatten)
}

/// Runs `f` with the object store of `opts` (a short-lived runtime: restore is one call per file); `None`
/// without a store.
pub(super) fn with_store<T, F, Fut>(opts: &RestoreOptions, f: F) -> Result<Option<T>>
where
    F: FnOnce(crate::store::Store) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let Some(spec) = &opts.object_store else {
        return Ok(None);
    };
    let store = crate::store::Store::open(spec)?;
    crate::store::block_on(f(store))?.map(Some)
}

/// Complete segment `segno` from the prefetch spool or the object store, checked, at `%p`; starts the
/// prefetcher for the segments after it. `None` when the store does not hold it.
pub(super) fn from_spool_or_store(
    opts: &RestoreOptions,
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<Option<Outcome>> {
    let name = segment_file_name(timeline, segno, id.wal_segment_size);
    let checked_dest = || -> Result<()> {
        let f = File::open(&opts.dest).with_context(|| format!("open {}", opts.dest.display()))?;
        validate_complete(&f, id, timeline, segno)
    };
    let spooled = crate::prefetch::spool(&opts.archive).join(&name);
    // the prefetcher may be downloading this very segment: waiting for it beats downloading it twice
    crate::prefetch::await_in_flight(&opts.archive, &name, Duration::from_secs(30));
    let taken = crate::prefetch::take(&opts.archive, &spooled, &opts.dest)
        .with_context(|| format!("move {} to {}", spooled.display(), opts.dest.display()))?;
    let prefetched = taken
        && match checked_dest() {
            Ok(()) => true,
            Err(e) => {
                warn!(file = %name, "prefetched copy is damaged ({e:#}); taking it from the store again");
                let _ = fs::remove_file(&opts.dest);
                false
            }
        };
    let source = if prefetched {
        "the object store (prefetched)"
    } else {
        if !from_store_to_dest(opts, &name)? {
            return Ok(None);
        }
        if let Err(e) = checked_dest() {
            let _ = fs::remove_file(&opts.dest);
            return Err(e.context(format!("segment {name} from the object store is damaged")));
        }
        "the object store"
    };
    info!(file = %name, "restored from {source}");
    if let Some(spec) = &opts.object_store {
        crate::prefetch::start(&opts.archive, spec, &name, opts.prefetch);
    }
    Ok(Some(Outcome::Restored))
}

/// Writes file `name` from the store to `%p`; `false` when the store does not hold it.
pub(super) fn from_store_to_dest(opts: &RestoreOptions, name: &str) -> Result<bool> {
    match from_store(opts, name)? {
        Some(bytes) => write_dest(opts, &bytes).map(|()| true),
        None => Ok(false),
    }
}

/// The store's copy of the partial segment (the receiver uploads its durable part every
/// `--partial-upload-interval` and at shutdown), zero-padded to `%p`: the end of the archive when the
/// receiver's host is lost. Returns the bytes handed over, `None` when the store has no partial either.
pub(super) fn hand_over_stored_partial(
    opts: &RestoreOptions,
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<Option<u64>> {
    let seg = id.wal_segment_size;
    let name = format!("{}.partial", segment_file_name(timeline, segno, seg));
    let Some(bytes) = from_store(opts, &name)? else {
        return Ok(None);
    };
    if (bytes.len() as u64) < LONG_PAGE_HEADER as u64 {
        return Ok(None);
    }
    if bytes.len() as u64 > seg.as_u64() {
        bail!(
            "{name} in the object store has {} bytes, more than a segment",
            bytes.len()
        );
    }
    check_page_header(&bytes, id, timeline, segno)
        .with_context(|| format!("partial segment {name} in the object store is damaged"))?;
    refuse_archive_mode_always(opts)?;
    let mut padded = bytes;
    let len = padded.len() as u64;
    padded.resize(seg.as_u64() as usize, 0);
    write_dest(opts, &padded)?;
    info!(file = %name, bytes = len, "handed the partial segment from the object store to recovery, zero-padded");
    Ok(Some(len))
}
