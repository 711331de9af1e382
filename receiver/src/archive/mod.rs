//! The archive directory: the WAL a receiver writes and the state files beside it. (`status`, `upload`,
//! `store`, `prefetch` and `cleanup` keep their own files there; every crash-safe write goes through
//! [`crate::durable`].)
//!
//! | room          | what it owns |
//! |---------------|--------------|
//! | this file     | [`Archive`]: opening and locking, re-deriving each timeline's end after a crash, history files, syncing and acknowledging |
//! | `writer`      | appending WAL: resends compared, provisional tails replaced, gaps refused, segments completed |
//! | `identity`    | `walship.id` and why a sender of another cluster is refused |
//! | `positions`   | `walship.position` |
//! | `failover`    | `walship.primary`, `walship.failover`, the fence of a handed-over timeline |
//! | `listing`     | the segments the directory holds |
//!
//! Per timeline the archive keeps where its WAL ends (`ends`), how much of that is on disk (`durable`), how
//! much the primary reported flushed (`confirmed`) and how far the current session has sent it (`verified`).
//! `durable <= ends` always; what is acknowledged ([`Synced`]) is never beyond `durable` or `verified`, and
//! its confirmed part never beyond its durable part: nothing is confirmed to a sender that is not on disk.
//!
//! Layout (DESIGN.md §4):
//! - `walship.id`: the pinned identity (system identifier, segment size, major version), written on first
//!   contact, never changed;
//! - `walship.lock`: held with an exclusive lock while a receiver writes the archive;
//! - `<segment>.partial`: bytes `[segment start, end)` of the segment being received, appended in order;
//! - `<segment>`: a complete segment, exactly `wal_segment_size` bytes, renamed from its `.partial` after an
//!   fsync, followed by an fsync of the directory;
//! - `<TLI>.history`: timeline history files.
//!
//! Durability rule: [`Archive::sync`] returns a position only after everything before it is on disk (file
//! data by `fdatasync`, names by an fsync of the directory). The receiver acknowledges nothing else.
//!
//! Crash rule: on open the end of every timeline is re-derived from the files, and everything counted is
//! fsynced first (a crashed receiver's last writes may sit only in the page cache). A `.partial` whose tail is
//! not valid WAL (a page with a bad header, or trailing zeros that a power loss may leave) is truncated back
//! to the last byte that is; the sender then resends from there. Trailing zeros are cut only beyond the
//! durable end recorded in `walship.position`: acknowledged bytes are never taken back.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use walship_protocol::wal::{
    history_file_name, page_magic_for_version, segment_file_name, PageExpectation, SegNo,
    WalFileName, LONG_PAGE_HEADER, XLOG_BLCKSZ,
};
use walship_protocol::walker::{WalkStop, Walker};

use crate::durable::{sync_dir_handle, sync_file};
use walship_protocol::{Lsn, TimelineId, WalSegSize};

mod failover;
mod identity;
mod listing;
mod positions;
#[cfg(test)]
mod tests;
mod writer;

pub use failover::*;
pub use identity::*;
pub use listing::*;
pub use positions::*;

/// The identity file's name.
pub const ID_FILE: &str = "walship.id";
/// The lock file's name.
pub const LOCK_FILE: &str = "walship.lock";
/// The segment being appended to.
#[derive(Debug)]
struct OpenPartial {
    timeline: TimelineId,
    segno: SegNo,
    path: PathBuf,
    file: File,
    /// Bytes in the file (all written by this process or found valid on open).
    len: u64,
    /// Bytes known to be on disk (fdatasync'ed).
    synced: u64,
}

/// An open, locked archive directory.
#[derive(Debug)]
pub struct Archive {
    dir: PathBuf,
    dir_handle: File,
    _lock: File,
    /// `walship.position`: the durable end, rewritten in place after every group commit (not fsynced; for
    /// `status` and benchmarks, never for recovery).
    position: File,
    identity: Option<Identity>,
    /// Where the archived WAL of each timeline ends (exclusive).
    ends: BTreeMap<TimelineId, Lsn>,
    current: Option<OpenPartial>,
    /// A file was created or renamed since the directory was last fsynced.
    dir_dirty: bool,
    /// Set when an error could not be undone (see [`Archive::recover_after_error`]): nothing more is written.
    poisoned: Option<String>,
    /// The position [`Archive::sync`] last made durable, per timeline.
    durable: BTreeMap<TimelineId, Lsn>,
    /// Per timeline, how far the archived WAL is confirmed (the primary had flushed it). Bytes beyond are
    /// provisional: shipped as soon as the primary wrote them, replaceable by a differing resend.
    confirmed: BTreeMap<TimelineId, Lsn>,
    /// Per timeline, where the WAL the current session sent (or resent and matched) ends. Nothing beyond it
    /// is acknowledged or confirmed in this session: the archive may hold a stale provisional tail there.
    verified: BTreeMap<TimelineId, Lsn>,
    /// Told when a complete segment or a history file is durable under its final name (the uploader).
    completions: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// A segment was completed (renamed) since the directory was last fsynced.
    completed_unannounced: bool,
    /// Bumped whenever archived bytes are taken back (a replaced provisional tail, a rollback after an
    /// error): a sync job prepared before counts for nothing.
    generation: u64,
}

/// The fdatasync of a pipelined sync (see [`Archive::prepare_sync`]): run [`SyncJob::run`] on another
/// thread while the archive takes more appends.
#[derive(Debug)]
pub struct SyncJob {
    /// A handle of the open partial, its path, timeline, segment and the length to make durable.
    file: Option<(File, PathBuf, TimelineId, SegNo, u64)>,
    /// Where each timeline's WAL ended when the job was prepared: durable once it succeeds.
    ends: BTreeMap<TimelineId, Lsn>,
    generation: u64,
}

impl SyncJob {
    /// The fdatasync (no archive state is touched).
    pub fn run(&self) -> Result<()> {
        match &self.file {
            Some((file, path, ..)) => sync_file(file, path, false),
            None => Ok(()),
        }
    }
}

/// What [`Archive::sync`] made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Synced {
    /// Everything before it that the session sent is on disk.
    pub durable: Lsn,
    /// How much of that is confirmed.
    pub confirmed: Lsn,
}

fn write_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    fail::fail_point!("archive-write-enospc", |_| Err(
        io::Error::from_raw_os_error(libc::ENOSPC)
    ));
    file.write_all_at(data, offset)
}

fn file_len(file: &File) -> Option<u64> {
    file.metadata().ok().map(|m| m.len())
}

/// A crash point for tests (cargo feature `failpoints`): with `FAILPOINTS=name=return` the process dies here
/// at once, as under `kill -9`, leaving the files as they are.
macro_rules! crash_point {
    ($name:expr) => {
        fail::fail_point!($name, |_| {
            eprintln!("failpoint {}: crashing", $name);
            std::process::abort()
        })
    };
}
pub(crate) use crash_point;

fn create_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true).mode(0o600);
    o
}

impl Archive {
    /// Opens (creating it if needed, mode 0700) and locks the archive in `dir`, and re-derives where each
    /// timeline's WAL ends, truncating torn tails.
    pub fn open(dir: &Path) -> Result<Archive> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("create archive directory {}", dir.display()))?;
        }
        let meta =
            fs::metadata(dir).with_context(|| format!("archive directory {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("archive {} is not a directory", dir.display());
        }
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                archive = %dir.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "archive directory is readable by others; WAL holds every row of the database: chmod 0700 it"
            );
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = create_options()
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("open lock file {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => bail!(
                "archive {} is in use by another walship receiver (it holds the lock on {}); run one receiver per archive",
                dir.display(),
                LOCK_FILE
            ),
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("lock {}", lock_path.display()));
            }
        }
        let dir_handle =
            File::open(dir).with_context(|| format!("open archive directory {}", dir.display()))?;
        let position_path = dir.join(POSITION_FILE);
        let position = create_options()
            .create(true)
            .truncate(false)
            .open(&position_path)
            .with_context(|| format!("open {}", position_path.display()))?;
        let identity = Identity::load(dir)?;
        let mut archive = Archive {
            dir: dir.to_owned(),
            dir_handle,
            _lock: lock,
            position,
            identity,
            ends: BTreeMap::new(),
            current: None,
            dir_dirty: false,
            poisoned: None,
            durable: BTreeMap::new(),
            confirmed: BTreeMap::new(),
            verified: BTreeMap::new(),
            completions: None,
            completed_unannounced: false,
            generation: 0,
        };
        archive.scan()?;
        Ok(archive)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn identity(&self) -> Option<Identity> {
        self.identity
    }

    /// Where the confirmed, durable WAL of each timeline ends: what a sender resumes from. A provisional
    /// tail beyond it is resent and compared (see [`Archive::append`]).
    pub fn resume_points(&self) -> Vec<(TimelineId, Lsn)> {
        self.durable
            .iter()
            .map(|(t, l)| (*t, self.confirmed.get(t).map_or(*l, |c| (*c).min(*l))))
            .collect()
    }

    /// Starts a session: nothing beyond the resume points counts as sent by it yet. Returns them.
    pub fn begin_session(&mut self) -> Vec<(TimelineId, Lsn)> {
        let resume = self.resume_points();
        self.verified = resume.iter().copied().collect();
        resume
    }

    /// The primary has flushed `timeline` up to `flush`: WAL the session sent before it is confirmed.
    pub fn confirm(&mut self, timeline: TimelineId, flush: Lsn) {
        let Some(verified) = self.verified.get(&timeline).copied() else {
            return;
        };
        let c = self.confirmed.entry(timeline).or_insert(Lsn(0));
        *c = (*c).max(flush.min(verified));
    }

    /// Where the confirmed WAL of `timeline` ends.
    pub fn confirmed_end(&self, timeline: TimelineId) -> Option<Lsn> {
        self.confirmed.get(&timeline).copied()
    }

    /// The newest timeline in the archive.
    pub fn latest_timeline(&self) -> Option<TimelineId> {
        self.ends.keys().next_back().copied()
    }

    fn scan(&mut self) -> Result<()> {
        let mut newest: BTreeMap<TimelineId, (SegNo, bool)> = BTreeMap::new();
        let mut wal_files = 0usize;
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("list archive {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("list archive {}", self.dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // an interrupted atomic write: never renamed, so never acknowledged
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(identity) = self.identity else {
                if name.len() >= 24 && name.as_bytes()[..24].iter().all(u8::is_ascii_hexdigit) {
                    wal_files += 1;
                }
                continue;
            };
            let seg = identity.wal_segment_size;
            match WalFileName::parse(name, seg) {
                Ok(WalFileName::Segment { timeline, segno }) => {
                    let e = newest.entry(timeline).or_insert((segno, false));
                    if segno >= e.0 {
                        *e = (segno, false);
                    }
                }
                Ok(WalFileName::Partial { timeline, segno }) => {
                    let e = newest.entry(timeline).or_insert((segno, true));
                    if segno > e.0 || (segno == e.0 && e.1) {
                        *e = (segno, true);
                    }
                }
                _ => {}
            }
        }
        if self.identity.is_none() && wal_files > 0 {
            bail!(
                "archive {} holds {wal_files} WAL files but no {ID_FILE}: it was not made by walship; use an empty directory",
                self.dir.display()
            );
        }
        if !newest.is_empty() {
            // names renamed just before a crash count only once the directory is on disk
            sync_dir_handle(&self.dir_handle, &self.dir)?;
        }
        let recorded = read_positions(&self.dir);
        for (timeline, (segno, partial)) in newest {
            let Some(identity) = self.identity else { break };
            let seg = identity.wal_segment_size;
            let recorded = recorded.filter(|p| p.timeline == timeline);
            let end = if partial {
                // trailing zeros at or below the last recorded durable end were acknowledged: keep them
                let floor = recorded
                    .filter(|p| seg.segno(p.durable) == segno)
                    .map(|p| seg.offset(p.durable))
                    .unwrap_or(0);
                let len = self.recover_partial(timeline, segno, floor)?;
                Lsn(seg.segment_start(segno).0 + len)
            } else {
                seg.segment_start(segno + 1)
            };
            self.ends.insert(timeline, end);
            self.durable.insert(timeline, end);
            // Without a record (an older timeline, a lost file) everything counts as confirmed: a
            // difference is then refused rather than replaced. A record may be stale (the file is not
            // fsynced: a power loss of the standby leaves an older one), never below what the files prove:
            // a segment is completed only with confirmed bytes, so everything before the open partial is
            // confirmed. That keeps the resume point within the segment the replication slot holds.
            let proven = if partial {
                seg.segment_start(segno)
            } else {
                end
            };
            let confirmed = recorded.map_or(end, |p| p.confirmed.max(proven).min(end));
            self.confirmed.insert(timeline, confirmed);
        }
        Ok(())
    }

    /// Validates the tail of a `.partial` after a restart and truncates what is not WAL. Trailing zeros are
    /// cut back to `floor` at most: the durable end that `walship.position` recorded, exact after a crash
    /// of the process (it is written after every fsync), at worst older after a power loss. Returns the
    /// partial's length.
    fn recover_partial(&mut self, timeline: TimelineId, segno: SegNo, floor: u64) -> Result<u64> {
        let Some(identity) = self.identity else {
            return Ok(0);
        };
        let seg = identity.wal_segment_size;
        let name = format!("{}.partial", segment_file_name(timeline, segno, seg));
        let path = self.dir.join(&name);
        let mut file = create_options()
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .with_context(|| format!("read {}", path.display()))?;
        let found = data.len() as u64;
        let mut keep = data.len().min(seg.bytes() as usize);
        if let Some(exp) = identity.page_expectation(timeline) {
            let start = seg.segment_start(segno);
            let mut at = 0usize;
            while at < keep {
                let end = (at + XLOG_BLCKSZ).min(keep);
                if let Err(e) = exp.check_pages(&data[at..end], Lsn(start.0 + at as u64)) {
                    tracing::warn!(file = %name, offset = at, error = %e, "torn or invalid page in partial segment; truncating there");
                    keep = at;
                    break;
                }
                if end - at < walship_protocol::wal::SHORT_PAGE_HEADER
                    || (at == 0 && end - at < walship_protocol::wal::LONG_PAGE_HEADER)
                {
                    // a header that is not complete cannot be judged: resend it
                    keep = at;
                    break;
                }
                at += XLOG_BLCKSZ;
            }
        }
        let floor = (floor as usize).min(keep);
        while keep > floor && data[keep - 1] == 0 {
            keep -= 1;
        }
        if keep as u64 != found {
            tracing::warn!(
                file = %name,
                found,
                kept = keep,
                "partial segment tail was not valid WAL (crash before fsync?); truncated, the sender resends it"
            );
            file.set_len(keep as u64)
                .with_context(|| format!("truncate {}", path.display()))?;
        }
        // What a crashed receiver wrote may still sit only in the page cache: it counts as durable (and is
        // offered in the first Welcome) only once this fsync has put it on disk.
        sync_file(&file, &path, true)?;
        if keep as u64 == seg.as_u64() {
            // complete, but the rename did not happen before a crash
            self.finish_segment_file(timeline, segno)?;
            sync_dir_handle(&self.dir_handle, &self.dir)?;
        } else {
            self.current = Some(OpenPartial {
                timeline,
                segno,
                path,
                file,
                len: keep as u64,
                synced: keep as u64,
            });
        }
        Ok(keep as u64)
    }

    /// Checks a sender's identity against the archive, pinning it (durably) on first contact.
    pub fn check_or_pin_identity(
        &mut self,
        offered: Identity,
    ) -> Result<std::result::Result<(), IdentityMismatch>> {
        if let Some(id) = self.identity {
            return Ok(id.admits(&offered));
        }
        self.write_atomically(ID_FILE, offered.render().as_bytes())?;
        tracing::info!(
            system_identifier = offered.system_identifier,
            wal_segment_size = offered.wal_segment_size.bytes(),
            "archive pinned to this cluster"
        );
        self.identity = Some(offered);
        Ok(Ok(()))
    }

    /// Writes `name` durably (see [`crate::durable::replace`]; a `.tmp` left over is removed at open).
    fn write_atomically(&mut self, name: &str, content: &[u8]) -> Result<()> {
        crate::durable::replace(&self.dir, name, content)
    }

    /// Stores a timeline history file. A file already present must be identical.
    pub fn store_history(&mut self, timeline: TimelineId, content: &[u8]) -> Result<()> {
        self.check_usable()?;
        let name = history_file_name(timeline);
        let path = self.dir.join(&name);
        match fs::read(&path) {
            Ok(existing) if existing == content => return Ok(()),
            Ok(_) => bail!(
                "history file {name} in the archive differs from the one the sender has: two clusters claim timeline {timeline}; refusing to overwrite it"
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        }
        if walship_protocol::wal::parse_history(content).is_none() {
            bail!("history file {name} sent by the sender is malformed; not stored");
        }
        self.check_branch(timeline, content)?;
        self.write_atomically(&name, content)?;
        tracing::info!(file = %name, "stored timeline history file");
        self.announce_completion();
        Ok(())
    }

    /// A timeline newer than any in the archive is accepted only with a history file whose branch point the
    /// archive holds: it must descend from the archive's newest timeline L, branching off at or before the
    /// end of L's WAL here, and at or before what was handed to recovery when a failover of L was recorded.
    /// A sender that claims a new timeline without that (a copy of the primary promoted elsewhere, another
    /// history) is refused and the archive keeps no trace of it.
    fn check_branch(&self, timeline: TimelineId, content: &[u8]) -> Result<()> {
        let Some(latest) = self.latest_timeline() else {
            return Ok(());
        };
        if timeline <= latest {
            return Ok(());
        }
        let name = history_file_name(timeline);
        let entries = walship_protocol::wal::parse_history(content)
            .with_context(|| format!("history file {name} is malformed"))?;
        let Some(branch) = entries.iter().find(|e| e.timeline == latest) else {
            bail!(
                "timeline {timeline} does not descend from timeline {latest}, the newest in this archive (its history file {name} \
                 names no switch from {latest}): it belongs to another history; refusing it"
            );
        };
        let end = self.ends.get(&latest).copied().unwrap_or(Lsn(0));
        if branch.switchpoint > end {
            bail!(
                "timeline {timeline} branched off timeline {latest} at {}, beyond the end of the archive's timeline {latest} ({end}): \
                 this archive does not hold the WAL it branched from; refusing it",
                branch.switchpoint
            );
        }
        if let Some(handover) = self.fenced(latest)? {
            let handed = handover.end_lsn;
            if branch.switchpoint > handed {
                bail!(
                    "timeline {timeline} branched off timeline {latest} at {}, after what the failover of timeline {latest} handed to \
                     recovery ({handed}): it is not the server promoted from this archive; refusing it",
                    branch.switchpoint
                );
            }
        }
        Ok(())
    }

    fn seg(&self) -> Result<WalSegSize> {
        Ok(self
            .identity
            .context("archive has no identity yet (no handshake)")?
            .wal_segment_size)
    }

    /// Makes everything appended so far durable and returns what of `timeline` is durable and confirmed
    /// (never beyond what the session sent). One call covers every append before it (group commit).
    pub fn sync(&mut self, timeline: TimelineId) -> Result<Option<Synced>> {
        self.check_usable()?;
        if let Some(cur) = self.current.as_mut() {
            if cur.synced < cur.len {
                sync_file(&cur.file, &cur.path, false)?;
                cur.synced = cur.len;
            }
        }
        if self.dir_dirty {
            sync_dir_handle(&self.dir_handle, &self.dir)?;
            self.dir_dirty = false;
            if std::mem::take(&mut self.completed_unannounced) {
                self.announce_completion();
            }
        }
        for (t, end) in &self.ends {
            self.durable.insert(*t, *end);
        }
        self.write_position();
        Ok(self.synced(timeline))
    }

    /// `notify` is told whenever a complete segment or a history file is durable under its final name: the
    /// uploader waits on it instead of rescanning the directory.
    pub fn announce_completions(&mut self, notify: std::sync::Arc<tokio::sync::Notify>) {
        self.completions = Some(notify);
    }

    fn announce_completion(&self) {
        if let Some(n) = &self.completions {
            n.notify_one(); // a permit is kept when the uploader is busy: never lost
        }
    }

    /// Whether anything appended is not yet on disk (an fsync is due).
    pub fn unsynced(&self) -> bool {
        self.dir_dirty || self.current.as_ref().is_some_and(|c| c.synced < c.len)
    }

    /// Pipelined sync, step 1 (with the archive): fsyncs the directory if names changed (rare: a new or
    /// completed segment), and returns the fdatasync of the open partial to run elsewhere, so that appends
    /// go on meanwhile. What the job covers counts as durable once [`Archive::finish_sync`] has its result.
    pub fn prepare_sync(&mut self) -> Result<SyncJob> {
        self.check_usable()?;
        if self.dir_dirty {
            sync_dir_handle(&self.dir_handle, &self.dir)?;
            self.dir_dirty = false;
            if std::mem::take(&mut self.completed_unannounced) {
                self.announce_completion();
            }
        }
        let file = match &self.current {
            Some(c) if c.synced < c.len => Some((
                c.file
                    .try_clone()
                    .with_context(|| format!("duplicate the handle of {}", c.path.display()))?,
                c.path.clone(),
                c.timeline,
                c.segno,
                c.len,
            )),
            _ => None,
        };
        Ok(SyncJob {
            file,
            ends: self.ends.clone(),
            generation: self.generation,
        })
    }

    /// Pipelined sync, step 3 (with the archive): `result` is the job's; on success everything it covered is
    /// durable. Returns what of `timeline` is durable and confirmed, as [`Archive::sync`] does. An error is
    /// the fsync's: call [`Archive::recover_after_error`].
    pub fn finish_sync(
        &mut self,
        timeline: TimelineId,
        job: SyncJob,
        result: Result<()>,
    ) -> Result<Option<Synced>> {
        result?;
        if job.generation != self.generation {
            // bytes were taken back meanwhile (and what remained was fsynced then): nothing to count
            return Ok(self.synced(timeline));
        }
        if let (Some((_, _, t, segno, len)), Some(cur)) = (&job.file, self.current.as_mut()) {
            if cur.timeline == *t && cur.segno == *segno {
                cur.synced = cur.synced.max(*len);
            }
        }
        for (t, end) in &job.ends {
            let d = self.durable.entry(*t).or_insert(*end);
            *d = (*d).max(*end);
        }
        self.write_position();
        Ok(self.synced(timeline))
    }

    /// What of `timeline` is durable and confirmed, never beyond what the session sent.
    fn synced(&self, timeline: TimelineId) -> Option<Synced> {
        let durable = self.durable.get(&timeline).copied()?;
        let durable = self
            .verified
            .get(&timeline)
            .map_or(durable, |v| durable.min(*v));
        let confirmed = self
            .confirmed
            .get(&timeline)
            .map_or(Lsn(0), |c| durable.min(*c));
        Some(Synced { durable, confirmed })
    }

    /// Rewrites `walship.position` in place (fixed width: one small pwrite per group commit).
    fn write_position(&mut self) {
        let Some((t, end)) = self.durable.iter().next_back() else {
            return;
        };
        let p = Positions {
            timeline: *t,
            durable: *end,
            confirmed: self.confirmed.get(t).map_or(Lsn(0), |c| (*c).min(*end)),
        };
        if let Err(e) = self.position.write_all_at(p.render().as_bytes(), 0) {
            tracing::debug!(error = %e, "could not update {POSITION_FILE}");
        }
    }

    /// Called after any write or fsync error: drops every byte written since the last successful fsync and
    /// re-derives the archive's state from what is then on disk.
    ///
    /// After a failed fsync Linux marks the unwritten pages clean: a fresh read would show bytes that never
    /// reached the disk. So the open partial is first truncated back to what its last good fsync covered (the
    /// sender resends the rest), and the re-scan fsyncs everything it then counts as durable (PostgreSQL
    /// PANICs for the same reason; walship can do better because the sender still holds the bytes). If even
    /// that fails, the archive is unusable until the receiver is restarted: every later call fails with the
    /// reason, and the caller should stop.
    pub fn recover_after_error(&mut self) -> Result<()> {
        self.generation += 1;
        let result = (|| -> Result<()> {
            if let Some(cur) = self.current.take() {
                if cur.synced < cur.len || file_len(&cur.file) != Some(cur.len) {
                    cur.file.set_len(cur.synced).with_context(|| {
                        format!(
                            "truncate {} back to its last fsynced length {}",
                            cur.path.display(),
                            cur.synced
                        )
                    })?;
                    tracing::warn!(
                        file = %cur.path.display(),
                        kept = cur.synced,
                        dropped = cur.len.saturating_sub(cur.synced),
                        "dropped the bytes written since the last successful fsync; the sender resends them"
                    );
                }
                sync_file(&cur.file, &cur.path, true)?;
            }
            self.ends.clear();
            self.durable.clear();
            self.confirmed.clear();
            self.verified.clear();
            self.dir_dirty = false;
            self.identity = Identity::load(&self.dir)?;
            self.scan()
        })();
        if let Err(e) = &result {
            self.poisoned = Some(format!("{e:#}"));
        }
        result
    }

    fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => bail!(
                "archive {} cannot be trusted after a failed write or fsync that could not be undone ({why}); \
                 check the disk and the kernel log, then restart the receiver",
                self.dir.display()
            ),
            None => Ok(()),
        }
    }

    /// Records that the primary is down and its WAL ends at `wal_end` (after a sync: `archived_end` is
    /// what is durable then).
    pub fn record_primary_down(
        &mut self,
        timeline: TimelineId,
        wal_end: Lsn,
        down_since_unix_micros: u64,
    ) -> Result<PrimaryDown> {
        self.check_usable()?;
        let archived = self.sync(timeline)?.map_or(Lsn(0), |s| s.durable);
        let state = PrimaryDown {
            timeline,
            wal_end,
            down_since_unix_micros,
            archived_end: archived,
        };
        let json = serde_json::to_vec_pretty(&state).context("encode the primary's state")?;
        self.write_atomically(PRIMARY_FILE, &json)?;
        Ok(state)
    }

    /// Forgets that the primary was down (a sender connected again).
    pub fn clear_primary_down(&mut self) -> Result<()> {
        let path = self.dir.join(PRIMARY_FILE);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir_handle(&self.dir_handle, &self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }

    /// The durable end of `timeline`.
    pub fn durable_end(&self, timeline: TimelineId) -> Option<Lsn> {
        self.durable.get(&timeline).copied()
    }
}
