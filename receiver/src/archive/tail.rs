//! Preallocated partials (issue 21): a `.partial` is a full-size, zero-filled file from its creation on, so
//! that an append's `fdatasync` writes data only, never the inode (its size), as PostgreSQL's own WAL
//! segments. Its valid end is therefore not its size: the receiver knows it in memory, and anything reading
//! the file from outside (open after a crash, `restore`, `status`) finds it as PostgreSQL's recovery does,
//! at the end of the last complete, CRC-valid record ([`valid_len`]), never below what `walship.position`
//! recorded as durable. A torn or half-written tail (a power loss between a write and its fsync leaves some
//! of its blocks and not others) is invisible by construction: its first broken record ends the walk.
//!
//! The next partial is zero-filled and fsynced ahead of need, on its own thread, as `walship.spare`; taking
//! it is one rename. Partials written by receivers before this one grow with each append: they are read as
//! before (their size is their end) and filled up when the archive opens them.

use super::*;

/// The zero-filled file that becomes the next `.partial` (removed at open if a crash left one behind).
pub const SPARE_FILE: &str = "walship.spare";

/// Zeros written at a time when filling a file.
const ZEROS: usize = 1 << 20;
/// The spare is filled and written back this much at a time, with a pause between steps.
const SPARE_STEP: u64 = 1 << 20;
const SPARE_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// How many leading bytes of a partial of segment `segno` of `timeline` (its bytes `data`) are WAL: the end
/// of its last complete, valid record (the record walker: page headers, lengths, `xl_prev`, CRC-32C), at an
/// `XLOG_SWITCH` the end of the switch record's own bytes. Bytes below `floor` (acknowledged as durable) are
/// kept as long as their pages' headers are valid: they may end inside a record (a sender of protocol 1 or 2
/// sends what the primary flushed, wherever that ends). Without a page expectation for the timeline (a
/// version it does not know), trailing zeros are cut back to `floor`.
pub fn valid_len(
    identity: &Identity,
    timeline: TimelineId,
    segno: SegNo,
    data: &[u8],
    floor: u64,
) -> u64 {
    let seg = identity.wal_segment_size;
    let data = &data[..data.len().min(seg.bytes() as usize)];
    let floor = (floor as usize).min(data.len());
    let start = seg.segment_start(segno);
    let Some(exp) = identity.page_expectation(timeline) else {
        let mut keep = data.len();
        while keep > floor && data[keep - 1] == 0 {
            keep -= 1;
        }
        return keep as u64;
    };
    let v = walship_protocol::walker::valid_prefix(exp, start, data);
    v.records.max(floor.min(v.pages)) as u64
}

/// The valid end of the `.partial` at `path` (segment `segno` of `timeline`), as [`valid_len`] finds it with
/// `walship.position`'s durable end as floor. A partial shorter than a segment was written by a receiver
/// before preallocation: its size is its end.
pub fn partial_end(
    dir: &Path,
    identity: &Identity,
    timeline: TimelineId,
    segno: SegNo,
) -> Result<u64> {
    let seg = identity.wal_segment_size;
    let path = dir.join(format!(
        "{}.partial",
        segment_file_name(timeline, segno, seg)
    ));
    let data = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    if (data.len() as u64) < seg.as_u64() {
        return Ok(data.len() as u64);
    }
    let floor = read_positions(dir).map_or(0, |p| p.durable_in(seg, timeline, segno));
    Ok(valid_len(identity, timeline, segno, &data, floor))
}

/// Writes zeros over `[from, to)` of `file`.
pub(crate) fn zero_range(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZEROS.min(to.saturating_sub(from) as usize)];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The next partial being zero-filled on its own thread. Dropping the archive stops and joins it (see
/// `Drop for Archive`): no thread writes into the directory once the archive's lock is released.
#[derive(Debug)]
pub(crate) struct Spare {
    job: std::thread::JoinHandle<Result<File>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Spare {
    fn join(self) -> std::thread::Result<Result<File>> {
        self.job.join()
    }

    /// Stops the fill at its next step and waits for the thread (at most one step and its fsync).
    pub(crate) fn cancel(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.job.join();
    }
}

/// Creates `path` (replacing a leftover) as `size` zeros, fsynced: data and size on disk, so that writes
/// into it later need only `fdatasync`. With `stop` set between two steps, it gives up (the leftover is
/// removed when an archive opens the directory next, or replaced by the next fill).
pub(crate) fn zero_filled(
    path: &Path,
    size: u64,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
    }
    let file = create_options()
        .create_new(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let fill = |from, to| {
        zero_range(&file, from, to).with_context(|| {
            format!(
                "fill {} with {size} zeros (is the disk full?)",
                path.display()
            )
        })
    };
    // In steps, each written back before the next: one large writeback would queue before the fsyncs of the
    // partial being received (and the primary's, on a shared disk) and stall them.
    let sync = |all| {
        fail::fail_point!("archive-fsync-spare", |_| Err(
            crate::durable::injected_eio()
        )
        .with_context(|| format!("fsync {}", path.display())));
        crate::durable::sync_file_io(&file, path, all)
    };
    let mut at = 0;
    while at < size {
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
            bail!("filling {} stopped: the archive was closed", path.display());
        }
        let to = (at + SPARE_STEP).min(size);
        fill(at, to)?;
        if at == 0 {
            crash_point!("archive-preallocating");
        }
        sync(false)?;
        at = to;
        std::thread::sleep(SPARE_PAUSE);
    }
    sync(true)?;
    Ok(file)
}

impl Archive {
    /// Starts zero-filling the next partial on its own thread, if none is under way.
    pub(crate) fn prepare_spare(&mut self) {
        let Some(id) = self.identity else { return };
        if self.spare.is_some() {
            return;
        }
        let path = self.dir.join(SPARE_FILE);
        let size = id.wal_segment_size.as_u64();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let job = std::thread::Builder::new()
            .name("walship-prealloc".into())
            .spawn(move || zero_filled(&path, size, Some(&flag)));
        match job {
            Ok(job) => self.spare = Some(Spare { job, stop }),
            Err(e) => {
                tracing::debug!(error = %e, "no thread to preallocate the next partial; it is filled when needed")
            }
        }
    }

    /// A zero-filled file under the name `path` (a new `.partial`): the spare, renamed, or one filled now
    /// when the spare is not there. With `large` (the segment starts with a catch-up's large append) and the
    /// spare still being filled, an empty file instead, which grows with its appends as the partials of
    /// receivers before preallocation did (their `fdatasync` writes the size too; few and large in a
    /// catch-up): waiting for the zeros, and writing every segment twice, halved a catch-up's rate. The
    /// directory must be fsynced before anything in it counts as durable.
    pub(crate) fn take_spare(&mut self, path: &Path, large: bool) -> Result<File> {
        crash_point!("archive-before-new-partial");
        if large && self.spare.as_ref().is_some_and(|s| !s.job.is_finished()) {
            return create_options()
                .create_new(true)
                .open(path)
                .with_context(|| {
                    format!(
                        "create {} (a new partial; if it exists already, it is not replaced)",
                        path.display()
                    )
                });
        }
        let spare = self.dir.join(SPARE_FILE);
        let ready = match self.spare.take().map(|job| job.join()) {
            Some(Ok(Ok(file))) => Some(file),
            Some(Ok(Err(e))) => {
                tracing::warn!(file = %spare.display(), "preallocating the next partial failed ({e:#}); trying again now");
                None
            }
            Some(Err(_)) => {
                tracing::warn!(file = %spare.display(), "the thread preallocating the next partial panicked; filling it now");
                None
            }
            None => None,
        };
        let file = match ready {
            Some(file) => file,
            None => zero_filled(&spare, self.seg()?.as_u64(), None)?,
        };
        if path.exists() {
            bail!(
                "{} exists already: refusing to replace it with a new partial",
                path.display()
            );
        }
        fs::rename(&spare, path)
            .with_context(|| format!("rename {} to {}", spare.display(), path.display()))?;
        self.prepare_spare();
        Ok(file)
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        // before the fields (the lock among them) go: the spare's thread must not outlive the lock
        if let Some(spare) = self.spare.take() {
            spare.cancel();
        }
    }
}
