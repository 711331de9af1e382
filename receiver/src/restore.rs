//! `walship-receiver restore %f %p`: PostgreSQL's `restore_command`.
//!
//! Exit status 0: the file is at `%p`. Exit status 1: the file does not exist (and nothing else: walship's own
//! trouble never ends recovery; it is logged loudly and the standby stays in recovery). Never above 125.
//!
//! | request | answer |
//! |---|---|
//! | complete segment in the archive | validated (size, first page header), copied (copy_file_range) |
//! | `.history`, `.backup` | copied if present, else "missing" at once |
//! | segment not complete, failover triggered, `.partial` present | the partial zero-padded to the segment size; the handover is recorded |
//! | segment beyond a handed-over partial | "missing", so recovery ends there |
//! | segment not complete, `--live`, `.partial` present | its confirmed part (what the primary had flushed), zero-padded (standby mode re-requests it as it grows) |
//! | segment not there yet, `--wait` | wait for it or for failover, woken by file-system events |
//! | segment not there yet, no `--wait` | "missing" at once; PostgreSQL in standby mode retries |

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tracing::{debug, error, info, warn};
use walship_protocol::wal::{segment_file_name, SegNo, WalFileName, LONG_PAGE_HEADER};
use walship_protocol::{Lsn, TimelineId, WalSegSize};

use crate::archive::{list_segments, merge_segments, ArchivedSegment, Identity};

pub use crate::archive::{Failover, Handover, FAILOVER_FILE};

/// Options of one `restore` call.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub archive: PathBuf,
    /// Wait for a segment that is not there yet (archive recovery, pg_standby style).
    pub wait: bool,
    /// Hand over the current partial before any failover (standby mode, continuous replay).
    pub live: bool,
    /// A file whose existence triggers failover (besides `walship-receiver promote`).
    pub trigger: Option<PathBuf>,
    /// Hand over padded partials even to a standby with `archive_mode = always`.
    pub allow_archive_mode_always: bool,
    /// `%f`
    pub wanted: String,
    /// `%p`
    pub dest: PathBuf,
    /// The server's data directory (restore_command runs there), for the `archive_mode` check.
    pub data_dir: PathBuf,
    /// The archive's object store: complete segments and history files missing locally are taken from it.
    pub object_store: Option<crate::store::StoreSpec>,
    /// With a store: how many of the next segments a background process fetches ahead into
    /// `<archive>/prefetch/` while recovery replays (0: none).
    pub prefetch: usize,
}

/// File `name` from the object store of `opts`, decompressed and checked; `None` without a store or when
/// the store does not hold it.
fn from_store(opts: &RestoreOptions, name: &str) -> Result<Option<Vec<u8>>> {
    with_store(opts, |store| async move { store.get(name).await }).map(Option::flatten)
}

/// Runs `f` with the object store of `opts` (a short-lived runtime: restore is one call per file); `None`
/// without a store.
fn with_store<T, F, Fut>(opts: &RestoreOptions, f: F) -> Result<Option<T>>
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

/// Writes `bytes` to `%p` (a failed write leaves nothing there).
fn write_dest(opts: &RestoreOptions, bytes: &[u8]) -> Result<()> {
    fs::write(&opts.dest, bytes).map_err(|e| {
        let _ = fs::remove_file(&opts.dest);
        anyhow::Error::new(e).context(format!("write {}", opts.dest.display()))
    })
}

/// The answer to PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file is at `%p` (exit 0).
    Restored,
    /// The file does not exist (exit 1).
    Missing,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Restored => 0,
            Outcome::Missing => 1,
        }
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs one `restore_command` call. Never panics on I/O errors; returns the answer for PostgreSQL.
pub fn restore(opts: &RestoreOptions) -> Outcome {
    // --live is for standby mode: archive recovery would replay the padded partial, find its end and promote
    // the server while the primary is alive. Refuse the live part; complete segments are still served.
    let live_refused;
    let opts = if opts.live && archive_recovery(&opts.data_dir) {
        error!(
            data_dir = %opts.data_dir.display(),
            "--live with archive recovery (recovery.signal, or recovery.conf without standby_mode = on) would promote \
             this server at the end of the partial segment while the primary is alive: ignoring --live, serving complete \
             segments only; use standby.signal (standby_mode = on) for a hot standby"
        );
        live_refused = RestoreOptions {
            live: false,
            ..opts.clone()
        };
        &live_refused
    } else {
        opts
    };
    // with --wait, watch before looking, so that nothing that happens in between is missed
    let mut watcher = if opts.wait { Watcher::new(opts) } else { None };
    let mut logged_wait = false;
    let mut last_trouble = String::new();
    loop {
        match attempt(opts) {
            Ok(Some(outcome)) => return outcome,
            Ok(None) => {
                if !opts.wait {
                    debug!(file = %opts.wanted, "not in the archive yet");
                    return Outcome::Missing;
                }
                if !logged_wait {
                    info!(file = %opts.wanted, "waiting for the segment to arrive, or for failover");
                    logged_wait = true;
                }
            }
            Err(e) => {
                let text = format!("{e:#}");
                if text != last_trouble {
                    error!(file = %opts.wanted, "{text}; not handing this file to recovery");
                    last_trouble = text;
                }
                if !opts.wait {
                    // standby mode: PostgreSQL retries by itself and never ends recovery on a missing file
                    return Outcome::Missing;
                }
                // archive recovery: "missing" would end recovery here, so keep the standby waiting
            }
        }
        match watcher.as_mut() {
            Some(w) => w.wait(Duration::from_secs(1)),
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// File-system events in the archive and in the trigger file's directory.
struct Watcher {
    rt: tokio::runtime::Runtime,
    events: inotify::EventStream<Vec<u8>>,
}

impl Watcher {
    fn new(opts: &RestoreOptions) -> Option<Watcher> {
        let mut dirs = vec![opts.archive.clone()];
        if let Some(parent) = opts.trigger.as_ref().and_then(|t| t.parent()) {
            dirs.push(if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent.to_owned()
            });
        }
        let made = (|| -> io::Result<Watcher> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let events = rt.block_on(async {
                let inotify = inotify::Inotify::init()?;
                for d in &dirs {
                    let mask = inotify::WatchMask::CREATE
                        | inotify::WatchMask::MOVED_TO
                        | inotify::WatchMask::CLOSE_WRITE
                        | inotify::WatchMask::ATTRIB;
                    if let Err(e) = inotify.watches().add(d, mask) {
                        debug!(dir = %d.display(), error = %e, "cannot watch");
                    }
                }
                inotify.into_event_stream(vec![0u8; 4096])
            })?;
            Ok(Watcher { rt, events })
        })();
        match made {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "no inotify; polling the archive");
                None
            }
        }
    }

    /// Waits for the next event (and takes every event already queued), at most `limit`.
    fn wait(&mut self, limit: Duration) {
        let events = &mut self.events;
        self.rt.block_on(async {
            use futures::{FutureExt, StreamExt};
            let _ = tokio::time::timeout(limit, events.next()).await;
            while let Some(Some(_)) = events.next().now_or_never() {}
        });
    }
}

/// The failover in progress, if any: requested by `promote` (and not superseded by a newer timeline), or a
/// trigger file.
fn failover(opts: &RestoreOptions) -> Result<Option<Failover>> {
    if let Some(state) = Failover::load(&opts.archive)? {
        return Ok(Some(state));
    }
    if opts.trigger.as_ref().is_some_and(|t| t.exists()) {
        return Ok(Some(Failover {
            timeline: 0,
            requested_for: "trigger file".into(),
            requested_at_unix_micros: 0,
            handover: None,
        }));
    }
    Ok(None)
}

/// One look at the archive: `Some(answer)`, or `None` when the segment is not there yet.
fn attempt(opts: &RestoreOptions) -> Result<Option<Outcome>> {
    if !opts.archive.is_dir() {
        bail!(
            "archive directory {} does not exist: check --archive in restore_command",
            opts.archive.display()
        );
    }
    // a new standby's empty local directory takes the store's identity: the store says whose WAL it holds,
    // and `promote`, `status` and a receiver started there later see whose archive it is
    let identity = match Identity::load(&opts.archive)? {
        Some(id) => Some(id),
        None => with_store(opts, |store| {
            let dir = opts.archive.clone();
            async move { store.adopt_identity(&dir).await }
        })?
        .flatten(),
    };
    let seg = identity
        .map(|i| i.wal_segment_size)
        .unwrap_or(WalSegSize::DEFAULT);
    let name = match WalFileName::parse(&opts.wanted, seg) {
        Ok(n) => n,
        Err(e) => {
            warn!(file = %opts.wanted, "{e}; answering \"missing\"");
            return Ok(Some(Outcome::Missing));
        }
    };
    match name {
        WalFileName::History { .. } | WalFileName::Backup { .. } => small_file(opts),
        WalFileName::Partial { .. } => Ok(Some(Outcome::Missing)),
        WalFileName::Segment { timeline, segno } => {
            let Some(identity) = identity else {
                no_wal_yet(opts);
                return Ok(None);
            };
            segment(opts, &identity, timeline, segno)
        }
    }
}

fn segment(
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
fn complete_segment(
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
fn partial_segment(
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

/// A history or backup-label file: from the archive, else from the store.
fn small_file(opts: &RestoreOptions) -> Result<Option<Outcome>> {
    let src = opts.archive.join(&opts.wanted);
    match fs::copy(&src, &opts.dest) {
        Ok(_) => {
            info!(file = %opts.wanted, "restored");
            return Ok(Some(Outcome::Restored));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("copy {} to {}", src.display(), opts.dest.display()))
        }
    }
    let stored = match from_store(opts, &opts.wanted) {
        Ok(stored) => stored,
        // The store only holds what this archive's receiver uploaded: a history file missing from an
        // archive that receives WAL is missing (recovery_target_timeline = latest probes timelines that
        // never existed). Only an archive with no WAL of its own (restoring from the store alone) has to
        // wait for the store.
        Err(e) if crate::archive::receives_wal(&opts.archive) => {
            warn!(file = %opts.wanted, "the object store is unreachable ({e:#}); the local archive does not hold this file: answering \"missing\"");
            None
        }
        Err(e) => return Err(e),
    };
    let Some(bytes) = stored else {
        return Ok(Some(Outcome::Missing));
    };
    write_dest(opts, &bytes)?;
    info!(file = %opts.wanted, "restored from the object store");
    Ok(Some(Outcome::Restored))
}

/// Said on every call (PostgreSQL logs restore_command's stderr): a wrong --archive must not look like "the
/// segment has not arrived yet".
fn no_wal_yet(opts: &RestoreOptions) {
    if opts.archive.join(crate::archive::LOCK_FILE).exists() {
        warn!(
            file = %opts.wanted,
            "archive {} holds no WAL yet: no sender has connected to its receiver",
            opts.archive.display()
        );
    } else {
        error!(
            file = %opts.wanted,
            "{} is not a walship archive (no {} or {}): check --archive in restore_command",
            opts.archive.display(),
            crate::archive::ID_FILE,
            crate::archive::LOCK_FILE
        );
    }
}

/// Whether the archive holds WAL after `segno` of `timeline` (or a newer timeline) and not `segno` itself: the
/// segment will never arrive. The receiver renames a complete segment before it creates the next `.partial`,
/// so a segment completed between our look for it and the listing shows up in a second look: without it,
/// "missing" would end archive recovery one segment early (seen once in the version matrix).
fn never_arrives(
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
fn segments_after(
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
fn beyond_local_end(
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
fn archive_ends_before(
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

fn validate_complete(f: &File, id: &Identity, timeline: TimelineId, segno: SegNo) -> Result<()> {
    let seg = id.wal_segment_size;
    let size = f.metadata().context("stat")?.len();
    if size != seg.as_u64() {
        bail!("it has {size} bytes, a segment has {}", seg.as_u64());
    }
    check_first_page(f, id, timeline, segno)
}

fn check_first_page(f: &File, id: &Identity, timeline: TimelineId, segno: SegNo) -> Result<()> {
    let mut page = [0u8; LONG_PAGE_HEADER];
    f.read_exact_at(&mut page, 0)
        .context("read the first page header")?;
    check_page_header(&page, id, timeline, segno)
}

fn check_page_header(page: &[u8], id: &Identity, timeline: TimelineId, segno: SegNo) -> Result<()> {
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
fn confirmed_in_segment(
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
fn hand_over_partial(
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
    let len = f.metadata().context("stat partial segment")?.len();
    let len = limit.map_or(len, |l| len.min(l));
    if len < LONG_PAGE_HEADER as u64 {
        return Ok(None);
    }
    let seg = id.wal_segment_size;
    if len > seg.as_u64() {
        bail!("{} has {len} bytes, more than a segment", partial.display());
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

/// Complete segment `segno` from the prefetch spool or the object store, checked, at `%p`; starts the
/// prefetcher for the segments after it. `None` when the store does not hold it.
fn from_spool_or_store(
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
fn from_store_to_dest(opts: &RestoreOptions, name: &str) -> Result<bool> {
    match from_store(opts, name)? {
        Some(bytes) => write_dest(opts, &bytes).map(|()| true),
        None => Ok(false),
    }
}

/// The store's copy of the partial segment (the receiver uploads its durable part every
/// `--partial-upload-interval` and at shutdown), zero-padded to `%p`: the end of the archive when the
/// receiver's host is lost. Returns the bytes handed over, `None` when the store has no partial either.
fn hand_over_stored_partial(
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

fn refuse_archive_mode_always(opts: &RestoreOptions) -> Result<()> {
    if !opts.allow_archive_mode_always && archive_mode_always(&opts.data_dir) {
        bail!(
            "this standby runs with archive_mode = always: it would archive the zero-padded partial segment under the \
             real segment name. Set archive_mode to on or off on the standby, or pass --allow-archive-mode-always"
        );
    }
    Ok(())
}

fn handover_segno(h: &Handover, seg: WalSegSize) -> Option<SegNo> {
    match WalFileName::parse(&h.segment, seg) {
        Ok(WalFileName::Segment { segno, .. }) => Some(segno),
        _ => None,
    }
}

/// Whether the server whose data directory is `data_dir` runs with `archive_mode = always`.
pub fn archive_mode_always(data_dir: &Path) -> bool {
    setting(data_dir, "archive_mode").is_some_and(|m| m.eq_ignore_ascii_case("always"))
}

/// The value of the server setting `name` as the configuration files of `data_dir` give it: postgresql.conf,
/// the `config_file` in postmaster.opts, postgresql.auto.conf, and (PostgreSQL 11 and older) recovery.conf;
/// the last setting wins. `include` directives are not followed.
/// Whether the server of `data_dir` runs archive recovery, not standby mode: `recovery.signal` without
/// `standby.signal` (12+), or `recovery.conf` without `standby_mode = on` (up to 11).
pub fn archive_recovery(data_dir: &Path) -> bool {
    if data_dir.join("standby.signal").exists() {
        return false;
    }
    if data_dir.join("recovery.signal").exists() {
        return true;
    }
    data_dir.join("recovery.conf").exists()
        && !setting(data_dir, "standby_mode")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1"))
}

pub fn setting(data_dir: &Path, name: &str) -> Option<String> {
    let mut files = vec![data_dir.join("postgresql.conf")];
    if let Ok(opts) = fs::read_to_string(data_dir.join("postmaster.opts")) {
        for part in opts.split('"') {
            if let Some(path) = part.strip_prefix("config_file=") {
                files.push(PathBuf::from(path));
            }
        }
    }
    files.push(data_dir.join("postgresql.auto.conf"));
    files.push(data_dir.join("recovery.conf"));
    let mut value = None;
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            if let Some((k, v)) = parse_conf_line(line) {
                if k.eq_ignore_ascii_case(name) {
                    value = Some(v);
                }
            }
        }
    }
    value
}

/// One `name = value` (or `name value`) line of a PostgreSQL configuration file: values quoted with '…'
/// ('' and \' for a quote), comments after #.
fn parse_conf_line(line: &str) -> Option<(String, String)> {
    let line = line.trim_start();
    let end = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))?;
    let (name, rest) = line.split_at(end);
    if name.is_empty() {
        return None;
    }
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    if let Some(quoted) = rest.strip_prefix('\'') {
        let mut value = String::new();
        let mut chars = quoted.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                }
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    value.push('\'');
                }
                '\'' => return Some((name.to_owned(), value)),
                c => value.push(c),
            }
        }
        None
    } else {
        let value = rest.split('#').next().unwrap_or("").trim();
        (!value.is_empty()).then(|| (name.to_owned(), value.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_lines() {
        assert_eq!(
            parse_conf_line("restore_command = 'walship-receiver restore --archive /a %f %p'  # x"),
            Some((
                "restore_command".into(),
                "walship-receiver restore --archive /a %f %p".into()
            ))
        );
        assert_eq!(
            parse_conf_line("archive_mode=always"),
            Some(("archive_mode".into(), "always".into()))
        );
        assert_eq!(
            parse_conf_line("x = 'it''s'"),
            Some(("x".into(), "it's".into()))
        );
        assert_eq!(parse_conf_line("# archive_mode = always"), None);
        assert_eq!(parse_conf_line(""), None);
    }

    #[test]
    fn a_segment_completed_while_looking_is_not_taken_for_one_that_never_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let seg = WalSegSize::new(1 << 20).unwrap();
        let opts = RestoreOptions {
            archive: dir.path().to_owned(),
            wait: true,
            live: false,
            trigger: None,
            allow_archive_mode_always: false,
            wanted: "000000010000000000000003".into(),
            dest: dir.path().join("out"),
            data_dir: dir.path().to_owned(),
            object_store: None,
            prefetch: 0,
        };
        // what a listing sees just after the receiver renamed segment 3 and started 4
        fs::write(dir.path().join("000000010000000000000004.partial"), b"x").unwrap();
        fs::write(dir.path().join("000000010000000000000003"), b"x").unwrap();
        assert!(!never_arrives(&opts, seg, 1, 3).unwrap());
        // 3 really is gone (the archive moved on without it): it never arrives
        fs::remove_file(dir.path().join("000000010000000000000003")).unwrap();
        assert!(never_arrives(&opts, seg, 1, 3).unwrap());
        // nothing newer: it may still come
        assert!(!never_arrives(&opts, seg, 1, 4).unwrap());
    }

    #[test]
    fn archive_mode_detection() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!archive_mode_always(dir.path()));
        fs::write(
            dir.path().join("postgresql.conf"),
            "archive_mode = always  # keep\n",
        )
        .unwrap();
        assert!(archive_mode_always(dir.path()));
        fs::write(
            dir.path().join("postgresql.auto.conf"),
            "archive_mode = 'on'\n",
        )
        .unwrap();
        assert!(!archive_mode_always(dir.path()));
        fs::write(
            dir.path().join("postgresql.auto.conf"),
            "#archive_mode = 'on'\narchive_mode='always'\n",
        )
        .unwrap();
        assert!(archive_mode_always(dir.path()));
        fs::write(
            dir.path().join("postgresql.auto.conf"),
            "archive_mode_x = on\n",
        )
        .unwrap();
        assert!(archive_mode_always(dir.path()));
    }
}
