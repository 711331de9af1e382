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
//! Per timeline the archive keeps one `TimelineWal`: where its WAL ends, how much of that is on disk
//! (`durable`), how much the primary reported flushed (`confirmed`) and how far the current session has sent
//! it (`verified`), with the invariants on its fields.
//!
//! Layout (DESIGN.md §4):
//! - `walship.id`: the pinned identity (system identifier, segment size, major version), written on first
//!   contact, never changed;
//! - `walship.lock`: held with an exclusive lock while a receiver writes the archive;
//! - `<segment>.partial`: the segment being received, preallocated (a full-size, zero-filled file): bytes
//!   `[segment start, end)` are WAL, appended in order, the rest zeros (older receivers' partials grow instead);
//! - `walship.spare`: the next partial, zero-filled ahead of need;
//! - `<segment>`: a complete segment, exactly `wal_segment_size` bytes, renamed from its `.partial` after an
//!   fsync, followed by an fsync of the directory;
//! - `<TLI>.history`: timeline history files.
//!
//! Durability rule: [`Archive::sync`] returns a position only after everything before it is on disk (file
//! data by `fdatasync`, names by an fsync of the directory). The receiver acknowledges nothing else.
//!
//! Crash rule: on open the end of every timeline is re-derived from the files, and everything counted is
//! fsynced first (a crashed receiver's last writes may sit only in the page cache). A `.partial` ends at its
//! last complete, valid record, as PostgreSQL's recovery finds it; whatever lies beyond (a torn write, blocks
//! a power loss kept of an unsynced write) is zeroed and the sender resends from there. Never below the
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
mod open;
mod positions;
mod sync;
mod tail;
#[cfg(test)]
mod tests;
mod writer;

pub use sync::{SyncJob, Synced};
pub use tail::{partial_end, valid_len, SPARE_FILE};

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
    /// Shared with a pipelined sync's job (no handle duplicated per fsync).
    file: std::sync::Arc<File>,
    /// Bytes in the file (all written by this process or found valid on open).
    len: u64,
    /// Bytes known to be on disk (fdatasync'ed).
    synced: u64,
}

/// What the archive knows of one timeline's WAL.
///
/// Invariants: `durable <= end`, `confirmed <= end`. What a session is told ([`Synced`]) is never beyond
/// `durable` or `verified`, and its confirmed part never beyond its durable part: nothing is confirmed to
/// a sender that is not on disk. A timeline new to this receiver starts with nothing confirmed (`confirmed`
/// is its first byte): its WAL is provisional until the primary says it flushed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimelineWal {
    /// Where the archived WAL ends (exclusive).
    pub(crate) end: Lsn,
    /// What the last sync made durable; `None` until the first sync of a timeline begun in this process.
    pub(crate) durable: Option<Lsn>,
    /// How far the archived WAL is confirmed (the primary had flushed it). Bytes beyond are provisional:
    /// shipped as soon as the primary wrote them, replaceable by a differing resend.
    pub(crate) confirmed: Lsn,
    /// Where the WAL the current session sent (or resent and matched) ends; `None` before it sent any.
    /// Nothing beyond it is acknowledged or confirmed in this session: the archive may hold a stale
    /// provisional tail there.
    pub(crate) verified: Option<Lsn>,
}

impl TimelineWal {
    /// A timeline whose first byte is at `first`: nothing written, nothing confirmed.
    fn new(first: Lsn) -> TimelineWal {
        TimelineWal {
            end: first,
            durable: None,
            confirmed: first,
            verified: None,
        }
    }
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
    /// What the archive knows of each timeline's WAL (see [`TimelineWal`] for the invariants).
    timelines: BTreeMap<TimelineId, TimelineWal>,
    current: Option<OpenPartial>,
    /// A file was created or renamed since the directory was last fsynced.
    dir_dirty: bool,
    /// Set when an error could not be undone (see [`Archive::recover_after_error`]): nothing more is written.
    poisoned: Option<String>,
    /// Told when a complete segment or a history file is durable under its final name (the uploader).
    completions: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// A segment was completed (renamed) since the directory was last fsynced.
    completed_unannounced: bool,
    /// Bumped whenever archived bytes are taken back (a replaced provisional tail, a rollback after an
    /// error): a sync job prepared before counts for nothing.
    generation: u64,
    /// The next partial, being zero-filled ahead of need (see `tail`).
    spare: Option<tail::Spare>,
}

fn write_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    fail::fail_point!("archive-write-enospc", |_| Err(
        io::Error::from_raw_os_error(libc::ENOSPC)
    ));
    file.write_all_at(data, offset)
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
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn identity(&self) -> Option<Identity> {
        self.identity
    }

    /// Where the confirmed, durable WAL of each timeline ends: what a sender resumes from. A provisional
    /// tail beyond it is resent and compared (see [`Archive::append`]).
    pub fn resume_points(&self) -> Vec<(TimelineId, Lsn)> {
        self.timelines
            .iter()
            .filter_map(|(t, w)| w.durable.map(|d| (*t, w.confirmed.min(d))))
            .collect()
    }

    /// Starts a session: nothing beyond the resume points counts as sent by it yet. Returns them.
    pub fn begin_session(&mut self) -> Vec<(TimelineId, Lsn)> {
        let resume = self.resume_points();
        for (t, w) in self.timelines.iter_mut() {
            w.verified = resume.iter().find(|(r, _)| r == t).map(|(_, l)| *l);
        }
        resume
    }

    /// The primary has flushed `timeline` up to `flush`: WAL the session sent before it is confirmed.
    pub fn confirm(&mut self, timeline: TimelineId, flush: Lsn) {
        let Some(w) = self.timelines.get_mut(&timeline) else {
            return;
        };
        let Some(verified) = w.verified else {
            return;
        };
        w.confirmed = w.confirmed.max(flush.min(verified));
    }

    /// Where the confirmed WAL of `timeline` ends.
    pub fn confirmed_end(&self, timeline: TimelineId) -> Option<Lsn> {
        self.timelines.get(&timeline).map(|w| w.confirmed)
    }

    /// The state of `timeline`, created (nothing written, nothing confirmed) with its first byte at `first`.
    pub(crate) fn timeline_mut(&mut self, timeline: TimelineId, first: Lsn) -> &mut TimelineWal {
        self.timelines
            .entry(timeline)
            .or_insert_with(|| TimelineWal::new(first))
    }

    /// Where the archived WAL of `timeline` ends.
    pub(crate) fn end_of(&self, timeline: TimelineId) -> Option<Lsn> {
        self.timelines.get(&timeline).map(|w| w.end)
    }

    /// The newest timeline in the archive.
    pub fn latest_timeline(&self) -> Option<TimelineId> {
        self.timelines.keys().next_back().copied()
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
        let end = self.timelines.get(&latest).map_or(Lsn(0), |w| w.end);
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

    /// Records how the primary counts the sender of `timeline` as a synchronous standby.
    pub fn record_synchronous(
        &mut self,
        timeline: TimelineId,
        state: walship_protocol::SyncState,
        now_unix_micros: u64,
    ) -> Result<()> {
        self.check_usable()?;
        let record = Synchronous {
            timeline,
            state,
            since_unix_micros: now_unix_micros,
        };
        let json = serde_json::to_vec_pretty(&record).context("encode the synchronous state")?;
        self.write_atomically(SYNCHRONOUS_FILE, &json)
    }

    /// Forgets that the primary was down, and how it counted the last sender (a sender connected again).
    pub fn clear_primary_down(&mut self) -> Result<()> {
        self.remove_state_file(SYNCHRONOUS_FILE)?;
        self.remove_state_file(PRIMARY_FILE)
    }

    fn remove_state_file(&mut self, name: &str) -> Result<()> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir_handle(&self.dir_handle, &self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }

    /// The durable end of `timeline`.
    pub fn durable_end(&self, timeline: TimelineId) -> Option<Lsn> {
        self.timelines.get(&timeline).and_then(|w| w.durable)
    }
}
