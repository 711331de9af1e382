//! The archive directory: the only code that touches archive files.
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

/// The identity file's name.
pub const ID_FILE: &str = "walship.id";
/// The lock file's name.
pub const LOCK_FILE: &str = "walship.lock";
/// The durable-position file's name.
pub const POSITION_FILE: &str = "walship.position";

/// Reads `walship.position`: the timeline and durable end last made durable by the running receiver.
pub fn read_position(dir: &Path) -> Option<(TimelineId, Lsn)> {
    read_positions(dir).map(|p| (p.timeline, p.durable))
}

/// What `walship.position` says (rewritten in place after every group commit; not fsynced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Positions {
    pub timeline: TimelineId,
    /// Where the durable (fsynced) WAL of `timeline` ends.
    pub durable: Lsn,
    /// How much of it is confirmed: the primary had flushed it. Bytes between the two are provisional.
    /// Files written before walship knew provisional WAL hold no such field: all was confirmed.
    pub confirmed: Lsn,
}

impl Positions {
    fn render(&self) -> String {
        format!(
            "{:08X} {:016X} {:016X}\n",
            self.timeline, self.durable.0, self.confirmed.0
        )
    }
}

/// Reads `walship.position` (see [`Positions`]).
pub fn read_positions(dir: &Path) -> Option<Positions> {
    let mut buf = [0u8; 64];
    let n = File::open(dir.join(POSITION_FILE))
        .ok()?
        .read_at(&mut buf, 0)
        .ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let mut fields = text.lines().next()?.split(' ');
    let timeline = u32::from_str_radix(fields.next()?, 16).ok()?;
    let durable = Lsn(u64::from_str_radix(fields.next()?, 16).ok()?);
    let confirmed = match fields.next() {
        Some(c) => Lsn(u64::from_str_radix(c, 16).ok()?).min(durable),
        None => durable,
    };
    Some(Positions {
        timeline,
        durable,
        confirmed,
    })
}

/// Which cluster an archive belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub system_identifier: u64,
    pub wal_segment_size: WalSegSize,
    /// `server_version_num` of the first sender (only its major version is compared).
    pub pg_version_num: u32,
}

impl Identity {
    /// The PostgreSQL major version, e.g. 15 or 906 for 9.6.
    pub fn pg_major(&self) -> u32 {
        pg_major(self.pg_version_num)
    }

    /// The page checks for segments of `timeline`.
    pub fn page_expectation(&self, timeline: TimelineId) -> Option<PageExpectation> {
        Some(PageExpectation {
            magic: page_magic_for_version(self.pg_version_num)?,
            system_identifier: self.system_identifier,
            seg_size: self.wal_segment_size,
            timeline,
        })
    }

    /// Whether a sender of the `offered` cluster may write to an archive pinned to this identity.
    pub fn admits(&self, offered: &Identity) -> std::result::Result<(), IdentityMismatch> {
        if self.system_identifier != offered.system_identifier {
            return Err(IdentityMismatch::ForeignCluster {
                archive: self.system_identifier,
                sender: offered.system_identifier,
                archive_seg: self.wal_segment_size,
                sender_seg: offered.wal_segment_size,
            });
        }
        if self.wal_segment_size != offered.wal_segment_size {
            return Err(IdentityMismatch::SegmentSize {
                archive: self.wal_segment_size,
                sender: offered.wal_segment_size,
            });
        }
        if self.pg_major() != offered.pg_major() {
            return Err(IdentityMismatch::MajorVersion {
                archive: self.pg_major(),
                sender: offered.pg_major(),
            });
        }
        Ok(())
    }

    /// The content of `walship.id` (also the identity object of an object store).
    pub fn render(&self) -> String {
        format!(
            "# walship archive identity: written on first contact, never changed.\n\
             # Senders of any other cluster are refused.\n\
             system_identifier={}\nwal_segment_size={}\npg_version_num={}\n",
            self.system_identifier,
            self.wal_segment_size.bytes(),
            self.pg_version_num
        )
    }

    /// Reads [`Identity::render`]'s text.
    pub fn parse(text: &str) -> Option<Identity> {
        let mut sysid = None;
        let mut seg = None;
        let mut ver = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=')?;
            match k.trim() {
                "system_identifier" => sysid = v.trim().parse::<u64>().ok(),
                "wal_segment_size" => {
                    seg = v
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .and_then(|s| WalSegSize::new(s).ok())
                }
                "pg_version_num" => ver = v.trim().parse::<u32>().ok(),
                _ => {}
            }
        }
        Some(Identity {
            system_identifier: sysid?,
            wal_segment_size: seg?,
            pg_version_num: ver?,
        })
    }

    /// Reads the identity of the archive in `dir`, if it was pinned.
    pub fn load(dir: &Path) -> Result<Option<Identity>> {
        let path = dir.join(ID_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Identity::parse(&text)
                .map(Some)
                .with_context(|| format!("{} is damaged: it must hold system_identifier, wal_segment_size and pg_version_num", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }
}

/// The major version of a `server_version_num`.
pub fn pg_major(version_num: u32) -> u32 {
    if version_num >= 100_000 {
        version_num / 10_000
    } else {
        version_num / 100
    }
}

/// Why an archive refuses a sender's identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityMismatch {
    #[error("this archive belongs to the cluster with system identifier {archive} ({archive_seg} segments), the sender's cluster is {sender} ({sender_seg} segments): a walship archive holds the WAL of one cluster only; give this cluster its own archive directory")]
    ForeignCluster {
        archive: u64,
        sender: u64,
        archive_seg: WalSegSize,
        sender_seg: WalSegSize,
    },
    #[error("this archive holds {archive} WAL segments, the sender's cluster uses {sender}")]
    SegmentSize {
        archive: WalSegSize,
        sender: WalSegSize,
    },
    #[error(
        "this archive holds WAL of PostgreSQL major version {archive}, the sender runs {sender}"
    )]
    MajorVersion { archive: u32, sender: u32 },
}

impl IdentityMismatch {
    /// What the refused sender is told: its own side only, nothing about the archive's cluster (the
    /// receiver's log has the whole message).
    pub fn for_peer(&self) -> String {
        match self {
            IdentityMismatch::ForeignCluster { sender, sender_seg, .. } => format!(
                "this archive belongs to another cluster than this server's (system identifier {sender}, {sender_seg} segments): \
                 a walship archive holds the WAL of one cluster only; give this cluster its own archive directory (the receiver's \
                 log names the archive's cluster)"
            ),
            IdentityMismatch::SegmentSize { sender, .. } => format!(
                "this archive holds WAL segments of another size than this cluster's {sender}: give this cluster its own archive directory"
            ),
            IdentityMismatch::MajorVersion { sender, .. } => format!(
                "this archive holds WAL of another PostgreSQL major version than this server's {sender}: after a major upgrade, start a new archive directory"
            ),
        }
    }
}

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
            let handed: Lsn = handover.end_lsn.parse().map_err(|_| {
                anyhow::anyhow!("the failover state names a bad LSN {:?}", handover.end_lsn)
            })?;
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

    /// Appends WAL of `timeline` starting at `start`. Bytes the archive already holds must be identical to the
    /// stored ones (a resend after a reconnect); a gap or a difference is an error and nothing is written.
    /// Not cancellation safe (disk I/O); call from a blocking context.
    pub fn append(&mut self, timeline: TimelineId, start: Lsn, bytes: &[u8]) -> Result<()> {
        self.check_usable()?;
        crate::metrics::METRICS
            .wal_bytes_received
            .inc_by(bytes.len() as u64);
        let seg = self.seg()?;
        if let Some(latest) = self.latest_timeline() {
            if timeline < latest {
                bail!("WAL for timeline {timeline} but the archive already holds timeline {latest}: refusing to write to a superseded timeline");
            }
        }
        if let Some(handover) = self.fenced(timeline)? {
            bail!("{}", fence_message(&handover));
        }
        let end = match self.ends.get(&timeline) {
            Some(end) => *end,
            None => {
                if seg.offset(start) != 0 {
                    bail!(
                        "first WAL of timeline {timeline} starts at {start}, not at a segment boundary ({seg} segments)"
                    );
                }
                if self.latest_timeline().is_some_and(|l| timeline > l)
                    && !self.dir.join(history_file_name(timeline)).exists()
                {
                    bail!(
                        "WAL of timeline {timeline}, newer than the archive's, without its history file {}: a new timeline is \
                         accepted only with a history that branches from WAL this archive holds; refusing it",
                        history_file_name(timeline)
                    );
                }
                // a failover of an older timeline is over once WAL of a newer one arrives
                retire_failover(&self.dir, timeline)?;
                start
            }
        };
        if start > end && !self.bridge_switch(timeline, end, start, bytes)? {
            bail!("gap in WAL of timeline {timeline}: archive ends at {end}, the sender sent bytes from {start} (the WAL between \
                   is gone from the primary's pg_wal: keep WAL for walship with a replication slot, then restore the missing \
                   segments into the archive, or start over with a new base backup and an empty archive)");
        }
        let end = self.ends.get(&timeline).copied().unwrap_or(end);
        let mut overlap = (end.0 - start.0).min(bytes.len() as u64) as usize;
        if overlap > 0 {
            if let Some(differs) = self.verify_overlap(timeline, start, &bytes[..overlap])? {
                self.replace_provisional(timeline, differs)?;
                overlap = (differs.0 - start.0) as usize;
            }
        }
        let mut pos = Lsn(start.0 + overlap as u64);
        let mut rest = &bytes[overlap..];
        while !rest.is_empty() {
            let segno = seg.segno(pos);
            let offset = seg.offset(pos);
            let room = (seg.as_u64() - offset) as usize;
            let n = room.min(rest.len());
            self.write_segment(timeline, segno, offset, &rest[..n])?;
            rest = &rest[n..];
            pos = Lsn(pos.0 + n as u64);
            self.ends.insert(timeline, pos);
        }
        let end = Lsn(start.0 + bytes.len() as u64);
        let v = self.verified.entry(timeline).or_insert(end);
        *v = (*v).max(end);
        Ok(())
    }

    /// A sender resumes at `start`, the first byte of the segment after the archive's open partial, which ends
    /// at `end`: PostgreSQL removed the partial's segment after a crash, so the bytes cannot be resent and
    /// compared (issue 19, point 10). Accepted only where PostgreSQL's own history proves the archive's WAL:
    /// the partial's last valid record is an `XLOG_SWITCH` ending at `end`, so the rest of its segment is
    /// padding, and the first record at `start` names that switch as its predecessor (`xl_prev`, the link
    /// PostgreSQL's recovery follows). The partial is then completed with the padding PostgreSQL writes
    /// (zeros, PostgreSQL 11 and later) and the new bytes follow. Returns whether it bridged; `false` leaves
    /// the archive unchanged (the caller reports the gap).
    fn bridge_switch(
        &mut self,
        timeline: TimelineId,
        end: Lsn,
        start: Lsn,
        bytes: &[u8],
    ) -> Result<bool> {
        let seg = self.seg()?;
        let Some(identity) = self.identity else {
            return Ok(false);
        };
        // PostgreSQL 10 pads a switched segment with page headers, which the archive cannot rebuild
        if identity.pg_major() < 11 || seg.offset(start) != 0 || seg.offset(end) == 0 {
            return Ok(false);
        }
        let segno = seg.segno(end);
        if seg.segno(start) != segno + 1 {
            return Ok(false);
        }
        let Some(exp) = identity.page_expectation(timeline) else {
            return Ok(false);
        };
        let Some(cur) = self
            .current
            .as_ref()
            .filter(|c| c.timeline == timeline && c.segno == segno && c.len == seg.offset(end))
        else {
            return Ok(false);
        };
        let mut held = vec![0u8; cur.len as usize];
        cur.file.read_exact_at(&mut held, 0).with_context(|| {
            format!("read back {} to link a resumed sender", cur.path.display())
        })?;
        let base = seg.segment_start(segno);
        let Ok(mut walker) = Walker::resync(exp, &held, base) else {
            return Ok(false);
        };
        let mut last = None;
        walker.walk(&held, base, |r| last = Some(*r));
        // what follows the switch in the partial (a drain ships the padding it finds) must be padding
        let Some(switch) = last.filter(|r| {
            r.is_switch()
                && r.own_end <= end
                && held[(r.own_end.0 - base.0) as usize..]
                    .iter()
                    .all(|b| *b == 0)
        }) else {
            return Ok(false);
        };
        // the first record at `start` must name the switch as the record before it
        let mut next = Walker::new(exp, start, Some(switch.start));
        match next.next_record(bytes, start) {
            Ok(_) => {}
            // the record is not complete in this message: its header's prev-link decides
            Err(WalkStop::NeedMore { .. })
                if bytes.len() >= LONG_PAGE_HEADER + 16
                    && u64::from_le_bytes(
                        bytes[LONG_PAGE_HEADER + 8..LONG_PAGE_HEADER + 16]
                            .try_into()
                            .expect("8 bytes"),
                    ) == switch.start.0 => {}
            Err(stop) => {
                tracing::warn!(%start, switch = %switch.start, "not linking the resumed sender's WAL to the archive's switch record: {stop}");
                return Ok(false);
            }
        }
        let name = segment_file_name(timeline, segno, seg);
        tracing::info!(
            segment = %name,
            switch = %switch.start,
            resumed = %start,
            "PostgreSQL removed the segment of the archive's last WAL after a restart; the primary's next record \
             follows the archive's switch record, so the segment is completed with its padding"
        );
        let zeros = vec![0u8; XLOG_BLCKSZ * 16];
        let mut pos = end;
        while pos < start {
            let n = ((start.0 - pos.0) as usize).min(zeros.len());
            self.write_segment(timeline, segno, seg.offset(pos), &zeros[..n])?;
            pos = Lsn(pos.0 + n as u64);
            self.ends.insert(timeline, pos);
        }
        Ok(true)
    }

    /// Whether `timeline` is fenced: its end was handed to recovery at a failover (`restore` recorded the
    /// handover), so a standby was promoted from it and the server that wrote it must not extend or change
    /// it. Cheap while no failover is under way (one `stat`).
    pub fn fenced(&self, timeline: TimelineId) -> Result<Option<Handover>> {
        if !self.dir.join(FAILOVER_FILE).exists() {
            return Ok(None);
        }
        Ok(Failover::load(&self.dir)?
            .and_then(|f| f.current_handover().cloned())
            .filter(|h| h.timeline == timeline))
    }

    /// The resent WAL of `timeline` differs from the archive's from `at` on. Allowed only where nothing is
    /// confirmed and only in the open partial (a complete segment is never changed): the primary's OS lost
    /// WAL it had written but not flushed, and the primary wrote other WAL there after restarting. Cuts the
    /// partial back to `at` (durably) so the new bytes are appended there.
    fn replace_provisional(&mut self, timeline: TimelineId, at: Lsn) -> Result<()> {
        let seg = self.seg()?;
        let confirmed = self.confirmed.get(&timeline).copied().unwrap_or(Lsn(0));
        let name = segment_file_name(timeline, seg.segno(at), seg);
        if at < confirmed {
            bail!(
                "resent WAL differs from the archive at {at} (segment {name}), where the archive holds WAL the primary had confirmed (flushed, up to {confirmed}): the sender's history diverged from what was archived (another primary of this cluster: a restored copy started as a primary, a split brain, or a primary rebuilt without a new archive); refusing to overwrite"
            );
        }
        let Some(cur) = self
            .current
            .as_mut()
            .filter(|c| c.timeline == timeline && c.segno == seg.segno(at))
        else {
            bail!(
                "resent WAL differs from the archive at {at} (segment {name}, complete): a complete segment is never changed; refusing to overwrite"
            );
        };
        let offset = seg.offset(at);
        let dropped = cur.len - offset;
        cur.file
            .set_len(offset)
            .with_context(|| format!("truncate {} to {offset}", cur.path.display()))?;
        sync_file(&cur.file, &cur.path, false)?;
        cur.len = offset;
        cur.synced = offset;
        let path = cur.path.clone();
        self.generation += 1;
        self.ends.insert(timeline, at);
        let durable = self.durable.entry(timeline).or_insert(at);
        *durable = (*durable).min(at);
        self.write_position();
        tracing::warn!(
            file = %path.display(),
            from = %at,
            dropped,
            confirmed = %confirmed,
            "replacing provisional WAL: the primary now has different WAL where it had written but not flushed it (its operating system lost unflushed WAL); the archive follows the primary"
        );
        Ok(())
    }

    fn write_segment(
        &mut self,
        timeline: TimelineId,
        segno: SegNo,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let seg = self.seg()?;
        let same = matches!(&self.current, Some(c) if c.timeline == timeline && c.segno == segno);
        if !same {
            if let Some(old) = self.current.as_mut() {
                // leaving a partial behind (timeline switch): make it durable first
                sync_file(&old.file, &old.path, false)?;
                old.synced = old.len;
            }
            self.current = None;
            if offset != 0 {
                bail!("internal: new segment {} of timeline {timeline} would start at offset {offset}", segno);
            }
            let name = format!("{}.partial", segment_file_name(timeline, segno, seg));
            let path = self.dir.join(&name);
            let file = create_options()
                .create_new(true)
                .open(&path)
                .with_context(|| format!("create {}", path.display()))?;
            self.dir_dirty = true;
            self.current = Some(OpenPartial {
                timeline,
                segno,
                path,
                file,
                len: 0,
                synced: 0,
            });
        }
        let cur = self.current.as_mut().context("internal: no open partial")?;
        if cur.len != offset {
            bail!(
                "internal: partial of segment {segno} holds {} bytes, write at {offset}",
                cur.len
            );
        }
        let written = write_at(&cur.file, data, offset);
        written.with_context(|| {
            format!(
                "write {} bytes to {} at offset {offset}",
                data.len(),
                cur.path.display()
            )
        })?;
        cur.len += data.len() as u64;
        if cur.len == seg.as_u64() {
            sync_file(&cur.file, &cur.path, false)?;
            cur.synced = cur.len;
            self.current = None;
            self.finish_segment_file(timeline, segno)?;
            // A sender completes a segment only with WAL the primary flushed (it never ships provisional WAL
            // to a segment's last byte), though its confirmation may come a moment later: the complete segment
            // is confirmed now, so a resume never needs a segment PostgreSQL may have removed meanwhile.
            let c = self.confirmed.entry(timeline).or_insert(Lsn(0));
            *c = (*c).max(seg.segment_start(segno + 1));
            self.dir_dirty = true;
            crash_point!("archive-renamed-before-dir-fsync");
        }
        Ok(())
    }

    fn finish_segment_file(&mut self, timeline: TimelineId, segno: SegNo) -> Result<()> {
        let seg = self.seg()?;
        let name = segment_file_name(timeline, segno, seg);
        let from = self.dir.join(format!("{name}.partial"));
        let to = self.dir.join(&name);
        fs::rename(&from, &to)
            .with_context(|| format!("rename {} to {}", from.display(), to.display()))?;
        tracing::debug!(segment = %name, "segment complete");
        crate::metrics::METRICS.segments_completed.inc();
        Ok(())
    }

    /// Compares resent WAL with the archive's; returns where it first differs, if it does.
    fn verify_overlap(
        &self,
        timeline: TimelineId,
        start: Lsn,
        expected: &[u8],
    ) -> Result<Option<Lsn>> {
        let seg = self.seg()?;
        let mut pos = start;
        let mut rest = expected;
        while !rest.is_empty() {
            let segno = seg.segno(pos);
            let offset = seg.offset(pos);
            let n = ((seg.as_u64() - offset) as usize).min(rest.len());
            let name = segment_file_name(timeline, segno, seg);
            let mut stored = vec![0u8; n];
            let read = match &self.current {
                Some(c) if c.timeline == timeline && c.segno == segno => {
                    c.file.read_exact_at(&mut stored, offset)
                }
                _ => File::open(self.dir.join(&name))
                    .or_else(|_| File::open(self.dir.join(format!("{name}.partial"))))
                    .and_then(|f| f.read_exact_at(&mut stored, offset)),
            };
            read.with_context(|| {
                format!("read back segment {name} at offset {offset} to compare a resent range")
            })?;
            if stored != rest[..n] {
                let first = stored
                    .iter()
                    .zip(&rest[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Ok(Some(Lsn(pos.0 + first as u64)));
            }
            rest = &rest[n..];
            pos = Lsn(pos.0 + n as u64);
        }
        Ok(None)
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
        }
        for (t, end) in &self.ends {
            self.durable.insert(*t, *end);
        }
        self.write_position();
        Ok(self.synced(timeline))
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
            wal_end: wal_end.to_string(),
            down_since_unix_micros,
            archived_end: archived.to_string(),
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

/// Whether `dir` is a walship archive (it has `walship.id`); the error says what to fix.
pub fn ensure_archive(dir: &Path) -> Result<Identity> {
    if !dir.is_dir() {
        bail!(
            "archive directory {} does not exist: check --archive (the receiver's --archive directory)",
            dir.display()
        );
    }
    Identity::load(dir)?.with_context(|| {
        format!(
            "{} is not a walship archive (no {ID_FILE}): check --archive; a receiver writes {ID_FILE} when the first sender connects",
            dir.display()
        )
    })
}

/// The file where the receiver keeps the sender's word that the primary's server is down.
pub const PRIMARY_FILE: &str = "walship.primary";

/// The primary's server is down (its host was up): the sender drained `pg_wal/` and said where the
/// primary's WAL ends. Kept in `walship.primary` until a sender connects again (the primary is back, or a
/// promoted standby ships its own WAL).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PrimaryDown {
    pub timeline: TimelineId,
    /// Where the primary's WAL ends (`X/X`): the end of its last complete, valid record.
    pub wal_end: String,
    pub down_since_unix_micros: u64,
    /// The archive's durable end of that timeline when this was recorded (`X/X`).
    pub archived_end: String,
}

impl PrimaryDown {
    pub fn load(dir: &Path) -> Option<PrimaryDown> {
        serde_json::from_slice(&fs::read(dir.join(PRIMARY_FILE)).ok()?).ok()
    }

    /// Whether the archive holds every byte of the primary's WAL.
    pub fn complete(&self) -> bool {
        match (
            self.wal_end.parse::<Lsn>(),
            self.archived_end.parse::<Lsn>(),
        ) {
            (Ok(w), Ok(a)) => a >= w,
            _ => false,
        }
    }
}

/// The failover state file's name.
pub const FAILOVER_FILE: &str = "walship.failover";

/// What recovery got at failover.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Handover {
    pub timeline: TimelineId,
    /// The segment recovery asked for when the archive ended.
    pub segment: String,
    /// Bytes of that segment's `.partial` handed over, zero-padded (0: the archive ended on a segment boundary).
    pub partial_bytes: u64,
    /// The end of the WAL handed to recovery (`X/X`).
    pub end_lsn: String,
    pub at_unix_micros: u64,
}

/// A failover of the archive's timeline `timeline`: requested by `walship-receiver promote` (or a trigger
/// file), completed by `restore` when it hands the end of the archive to recovery. Kept in `walship.failover`,
/// written crash-safely; superseded (and removed by the receiver) once WAL of a newer timeline arrives, so a
/// later failover never sees an old one's state.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Failover {
    /// The archive's newest timeline when failover was requested: the one being failed over from.
    pub timeline: TimelineId,
    /// The standby's data directory (informational).
    pub requested_for: String,
    pub requested_at_unix_micros: u64,
    /// What recovery got, once it asked.
    pub handover: Option<Handover>,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Failover {
    /// The failover state of the archive in `dir`, unless it was superseded by WAL of a newer timeline.
    pub fn load(dir: &Path) -> Result<Option<Failover>> {
        let path = dir.join(FAILOVER_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let state: Failover = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is damaged; remove it and run promote again",
                path.display()
            )
        })?;
        let newest = newest_timeline(dir)?;
        Ok((newest.is_none_or(|t| t <= state.timeline)).then_some(state))
    }

    /// Requests failover of the archive in `dir` (which must be a walship archive). A request for the same
    /// timeline as an earlier one starts over: recovery must hand over the end of the archive again.
    /// `stored`: the newest timeline in the archive's object store, if it has one.
    pub fn request(dir: &Path, pgdata: &Path, stored: Option<TimelineId>) -> Result<Failover> {
        ensure_archive(dir)?;
        let timeline = newest_timeline(dir)?.max(stored).with_context(|| {
            format!(
                "archive {} holds no WAL yet: nothing to fail over to",
                dir.display()
            )
        })?;
        let state = Failover {
            timeline,
            requested_for: pgdata.display().to_string(),
            requested_at_unix_micros: now_micros(),
            handover: None,
        };
        state.store(dir)?;
        Ok(state)
    }

    /// Records what recovery got. Creates the state when failover was triggered by a trigger file.
    pub fn record_handover(dir: &Path, handover: Handover) -> Result<()> {
        let mut state = Failover::load(dir)?.unwrap_or_else(|| Failover {
            timeline: handover.timeline,
            requested_for: "trigger file".into(),
            requested_at_unix_micros: handover.at_unix_micros,
            handover: None,
        });
        state.handover = Some(handover);
        state.store(dir)
    }

    fn store(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).context("encode the failover state")?;
        crate::durable::replace(dir, FAILOVER_FILE, &json)
    }

    /// The handover, if it was made after this request (not one left from an earlier request).
    pub fn current_handover(&self) -> Option<&Handover> {
        self.handover
            .as_ref()
            .filter(|h| h.at_unix_micros >= self.requested_at_unix_micros)
    }
}

/// What a sender of a fenced timeline is told (see [`Archive::fenced`]).
pub fn fence_message(h: &Handover) -> String {
    format!(
        "timeline {t} of this archive was handed to recovery at a failover (WAL up to {end}, segment {seg}): a standby \
         was promoted from it, so timeline {t} is fenced and this server must not ship WAL into it; rebuild this \
         server as a standby of the new primary (pg_rewind, or a new base backup) before it ships again",
        t = h.timeline,
        end = h.end_lsn,
        seg = h.segment,
    )
}

/// Removes the failover state of a timeline older than `timeline` (its failover is over).
fn retire_failover(dir: &Path, timeline: TimelineId) -> Result<()> {
    let path = dir.join(FAILOVER_FILE);
    let Ok(bytes) = fs::read(&path) else {
        return Ok(());
    };
    let old = serde_json::from_slice::<Failover>(&bytes)
        .map(|f| f.timeline)
        .unwrap_or(0);
    if old < timeline {
        fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        tracing::info!(
            old_timeline = old,
            timeline,
            "WAL of a newer timeline arrived: the failover of timeline {old} is over"
        );
    }
    Ok(())
}

/// The newest timeline with WAL in the archive in `dir`.
pub fn newest_timeline(dir: &Path) -> Result<Option<TimelineId>> {
    let Some(id) = Identity::load(dir)? else {
        return Ok(None);
    };
    Ok(list_segments(dir, id.wal_segment_size)?
        .last()
        .map(|s| s.timeline))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use walship_protocol::wal::write_page_header;

    const SEG: u64 = 1 << 20;

    fn identity() -> Identity {
        Identity {
            system_identifier: 99,
            wal_segment_size: WalSegSize::new(SEG).unwrap(),
            pg_version_num: 150004,
        }
    }

    /// Appends and confirms, as a sender of protocol 1 or 2 does.
    fn append_confirmed(a: &mut Archive, timeline: TimelineId, start: Lsn, bytes: &[u8]) {
        a.append(timeline, start, bytes).unwrap();
        a.confirm(timeline, Lsn(start.0 + bytes.len() as u64));
    }

    /// Valid-looking WAL for `[start, start+len)`: page headers where pages start, non-zero filler elsewhere.
    fn wal(start: u64, len: usize) -> Vec<u8> {
        let exp = identity().page_expectation(1).unwrap();
        let first_page = start / XLOG_BLCKSZ as u64 * XLOG_BLCKSZ as u64;
        let total = (start - first_page) as usize + len;
        let mut buf: Vec<u8> = (0..total + XLOG_BLCKSZ)
            .map(|i| (i % 251) as u8 | 1)
            .collect();
        let mut p = 0;
        while p < total {
            write_page_header(&mut buf[p..], Lsn(first_page + p as u64), &exp);
            p += XLOG_BLCKSZ;
        }
        let skip = (start - first_page) as usize;
        buf[skip..skip + len].to_vec()
    }

    /// `data` with the bytes from `from` on changed (a different WAL tail; page headers left alone).
    fn diverge(data: &[u8], from: usize) -> Vec<u8> {
        let mut d = data.to_vec();
        for (i, b) in d[from..].iter_mut().enumerate() {
            if (from + i) % XLOG_BLCKSZ >= 40 {
                *b ^= 0x5A;
            }
        }
        d
    }

    /// Issue 19, point 10: a segment completed before the sender's confirmation arrived is confirmed all
    /// the same, so a sender resumes in the next segment (the one PostgreSQL still has after a restart).
    #[test]
    fn a_completed_segment_is_confirmed_before_its_confirmation_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut a = Archive::open(&path).unwrap();
        a.check_or_pin_identity(identity()).unwrap().unwrap();
        let start = 2 * SEG;
        let data = wal(start, SEG as usize + 100);
        a.begin_session();
        a.append(1, Lsn(start), &data).unwrap();
        a.confirm(1, Lsn(start + 100));
        let synced = a.sync(1).unwrap().unwrap();
        assert_eq!(synced.confirmed, Lsn(start + SEG));
        assert_eq!(a.begin_session(), vec![(1, Lsn(start + SEG))]);
    }

    /// Issue 19, point 5: `walship.position` is not fsynced, so a power loss of the standby can leave an
    /// older one. What decides the resume point never falls below what the files prove (everything before
    /// the open partial is confirmed), so a sender never resumes behind the segment its slot holds.
    #[test]
    fn a_stale_position_file_never_moves_the_resume_point_behind_the_open_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut a = Archive::open(&path).unwrap();
        a.check_or_pin_identity(identity()).unwrap().unwrap();
        let start = 2 * SEG;
        let data = wal(start, SEG as usize + 60_000);
        a.begin_session();
        append_confirmed(&mut a, 1, Lsn(start), &data[..SEG as usize + 20_000]);
        a.append(1, Lsn(start + SEG + 20_000), &data[SEG as usize + 20_000..])
            .unwrap();
        let synced = a.sync(1).unwrap().unwrap();
        assert_eq!(synced.confirmed, Lsn(start + SEG + 20_000));
        drop(a);
        // the position file as it was long before: confirmed in the segment before the partial
        let stale = Positions {
            timeline: 1,
            durable: Lsn(start + 10_000),
            confirmed: Lsn(start + 10_000),
        };
        std::fs::write(path.join(POSITION_FILE), stale.render()).unwrap();
        let mut a = Archive::open(&path).unwrap();
        assert_eq!(a.durable_end(1), Some(Lsn(start + SEG + 60_000)));
        assert_eq!(
            a.begin_session(),
            vec![(1, Lsn(start + SEG))],
            "the complete segment is confirmed; the partial is compared from its start"
        );
    }

    /// Issue 19, point 10: PostgreSQL crashed right after a WAL switch, and the restarted server removed the
    /// switched segment before the sender could resend its tail. The sender resumes at the next segment; the
    /// archive links it through the switch record (the next record's `xl_prev`) and pads the segment (part
    /// of the padding may be there already: a drain ships what it finds), or
    /// refuses and stays unchanged when the link does not hold.
    #[test]
    fn a_resume_after_a_removed_switched_segment_links_through_the_switch() {
        use walship_protocol::walker::{WalBuilder, RM_XLOG_ID, XLOG_SWITCH};
        let exp = identity().page_expectation(1).unwrap();
        let start = 2 * SEG;
        let mut b = WalBuilder::new(exp, Lsn(start));
        for _ in 0..20 {
            b.record(300, 10, 0);
        }
        let switch = b.record(0, RM_XLOG_ID, XLOG_SWITCH);
        for _ in 0..5 {
            b.record(200, 10, 0);
        }
        let own_end = (switch.own_end.0 - start) as usize;
        let next = (3 * SEG - start) as usize;

        let open = |name: &str, shipped: usize| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(name);
            let mut a = Archive::open(&path).unwrap();
            a.check_or_pin_identity(identity()).unwrap().unwrap();
            a.begin_session();
            // shipped up to the switch record's own end or into its padding; only the first records confirmed
            a.append(1, Lsn(start), &b.bytes[..shipped]).unwrap();
            a.confirm(1, Lsn(start + 1000));
            a.sync(1).unwrap();
            drop(a);
            let mut a = Archive::open(&path).unwrap();
            assert_eq!(a.begin_session(), vec![(1, Lsn(start + 1000))]);
            (dir, path, a)
        };

        // WAL of another history at the next segment: its first record does not follow the switch
        let (_dir, path, mut a) = open("refused", own_end);
        let mut other = WalBuilder::new(exp, Lsn(3 * SEG));
        other.record(200, 10, 0);
        let err = a.append(1, Lsn(3 * SEG), &other.bytes).unwrap_err();
        assert!(format!("{err:#}").contains("gap"), "{err:#}");
        assert_eq!(
            fs::read(path.join("000000010000000000000002.partial")).unwrap(),
            b.bytes[..own_end]
        );
        assert!(!path.join("000000010000000000000003.partial").exists());

        // the primary's own next record: linked, the segment completed with its (zero) padding, whether
        // the archive held the switch alone or some of its padding as well
        for shipped in [own_end, next - 1] {
            let (_dir, path, mut a) = open("linked", shipped);
            a.append(1, Lsn(3 * SEG), &b.bytes[next..]).unwrap();
            let synced = a.sync(1).unwrap().unwrap();
            assert_eq!(synced.durable, b.end());
            assert_eq!(
                fs::read(path.join("000000010000000000000002")).unwrap(),
                b.bytes[..next],
                "the switched segment is the primary's, padding included"
            );
            assert_eq!(
                fs::read(path.join("000000010000000000000003.partial")).unwrap(),
                b.bytes[next..]
            );
        }
    }

    #[test]
    fn provisional_bytes_are_replaced_confirmed_bytes_never() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut a = Archive::open(&path).unwrap();
        a.check_or_pin_identity(identity()).unwrap().unwrap();
        let start = 2 * SEG;
        let data = wal(start, 60_000);
        // a protocol-3 session: 60,000 bytes shipped on write, the primary confirmed 30,000 of them
        assert_eq!(a.begin_session(), vec![]);
        a.append(1, Lsn(start), &data).unwrap();
        a.confirm(1, Lsn(start + 30_000));
        let synced = a.sync(1).unwrap().unwrap();
        assert_eq!(synced.durable, Lsn(start + 60_000));
        assert_eq!(synced.confirmed, Lsn(start + 30_000));
        drop(a);

        // the primary's OS crashed; after its restart its WAL differs from 45,000 on
        let mut a = Archive::open(&path).unwrap();
        assert_eq!(a.durable_end(1), Some(Lsn(start + 60_000)));
        assert_eq!(a.begin_session(), vec![(1, Lsn(start + 30_000))]);
        let other = diverge(&data, 45_000);
        // it resends from the confirmed end; the same bytes first, then the different ones
        a.append(1, Lsn(start + 30_000), &other[30_000..40_000])
            .unwrap();
        let synced = a.sync(1).unwrap().unwrap();
        assert_eq!(
            synced.durable,
            Lsn(start + 40_000),
            "nothing beyond what this session sent is acknowledged"
        );
        a.append(1, Lsn(start + 40_000), &other[40_000..50_000])
            .unwrap();
        a.confirm(1, Lsn(start + 50_000));
        let synced = a.sync(1).unwrap().unwrap();
        assert_eq!(synced.durable, Lsn(start + 50_000));
        assert_eq!(synced.confirmed, Lsn(start + 50_000));
        let partial = path.join("000000010000000000000002.partial");
        assert_eq!(fs::read(&partial).unwrap(), other[..50_000]);

        // now confirmed, those bytes never change again: a differing resend is refused
        drop(a);
        let mut a = Archive::open(&path).unwrap();
        assert_eq!(a.begin_session(), vec![(1, Lsn(start + 50_000))]);
        let third = diverge(&other, 48_000);
        let err = a
            .append(1, Lsn(start + 40_000), &third[40_000..])
            .unwrap_err();
        assert!(format!("{err:#}").contains("confirmed"), "{err:#}");
        assert_eq!(fs::read(&partial).unwrap(), other[..50_000]);
    }

    #[test]
    fn a_complete_segment_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut a = Archive::open(&path).unwrap();
        a.check_or_pin_identity(identity()).unwrap().unwrap();
        let data = wal(0, SEG as usize + 8192);
        a.begin_session();
        a.append(1, Lsn(0), &data).unwrap();
        a.confirm(1, Lsn(SEG - 8192));
        a.sync(1).unwrap();
        a.begin_session();
        let other = diverge(&data, SEG as usize - 100);
        let err = a
            .append(1, Lsn(SEG - 8192), &other[(SEG - 8192) as usize..])
            .unwrap_err();
        // a complete segment is confirmed (it holds only flushed WAL): refused as confirmed WAL
        assert!(
            format!("{err:#}").contains("refusing to overwrite"),
            "{err:#}"
        );
        assert_eq!(
            fs::read(path.join("000000010000000000000000")).unwrap(),
            data[..SEG as usize]
        );
    }

    #[test]
    fn append_complete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut a = Archive::open(&path).unwrap();
        assert_eq!(a.check_or_pin_identity(identity()).unwrap(), Ok(()));
        let start = 3 * SEG;
        let data = wal(start, (SEG + 5000) as usize);
        append_confirmed(&mut a, 1, Lsn(start), &data[..100_000]);
        append_confirmed(&mut a, 1, Lsn(start + 100_000), &data[100_000..]);
        assert_eq!(
            a.sync(1).unwrap().map(|s| s.durable),
            Some(Lsn(start + SEG + 5000))
        );
        assert_eq!(
            fs::read(path.join("000000010000000000000003")).unwrap(),
            data[..SEG as usize]
        );
        assert_eq!(
            fs::read(path.join("000000010000000000000004.partial")).unwrap(),
            data[SEG as usize..]
        );

        // a second receiver cannot open it
        assert!(Archive::open(&path)
            .unwrap_err()
            .to_string()
            .contains("in use"));
        drop(a);
        let mut a = Archive::open(&path).unwrap();
        assert_eq!(a.resume_points(), vec![(1, Lsn(start + SEG + 5000))]);
        // identical resend is accepted, different is refused, a gap is refused
        append_confirmed(&mut a, 1, Lsn(start + 10), &data[10..20_000]);
        let mut bad = data[10..20_000].to_vec();
        bad[500] ^= 0xFF;
        assert!(a
            .append(1, Lsn(start + 10), &bad)
            .unwrap_err()
            .to_string()
            .contains("differs"));
        assert!(a
            .append(1, Lsn(start + SEG + 6000), &[1])
            .unwrap_err()
            .to_string()
            .contains("gap"));
        // foreign cluster refused
        let other = Identity {
            system_identifier: 1,
            ..identity()
        };
        assert!(matches!(
            a.check_or_pin_identity(other).unwrap(),
            Err(IdentityMismatch::ForeignCluster { .. })
        ));
        let other = Identity {
            wal_segment_size: WalSegSize::new(2 * SEG).unwrap(),
            ..identity()
        };
        assert!(matches!(
            a.check_or_pin_identity(other).unwrap(),
            Err(IdentityMismatch::SegmentSize { .. })
        ));
    }

    #[test]
    fn torn_tails_are_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut a = Archive::open(&path).unwrap();
        a.check_or_pin_identity(identity()).unwrap().unwrap();
        let data = wal(0, 40_000);
        append_confirmed(&mut a, 1, Lsn(0), &data);
        a.sync(1).unwrap();
        drop(a);
        // a power loss may leave zeros past the durable end, or garbage pages
        let partial = path.join("000000010000000000000000.partial");
        let mut f = OpenOptions::new().append(true).open(&partial).unwrap();
        f.write_all(&vec![0u8; 30_000]).unwrap();
        drop(f);
        let a = Archive::open(&path).unwrap();
        assert_eq!(a.resume_points(), vec![(1, Lsn(40_000))]);
        drop(a);
        let mut bytes = fs::read(&partial).unwrap();
        bytes[4 * XLOG_BLCKSZ] ^= 0xFF; // damage the magic of page 4
        fs::write(&partial, &bytes).unwrap();
        let a = Archive::open(&path).unwrap();
        assert_eq!(a.resume_points(), vec![(1, Lsn(4 * XLOG_BLCKSZ as u64))]);
    }

    #[test]
    fn refuses_foreign_directories_and_new_timelines_mid_segment() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("000000010000000000000001"), b"x").unwrap();
        assert!(Archive::open(dir.path())
            .unwrap_err()
            .to_string()
            .contains("not made by walship"));

        let dir = tempfile::tempdir().unwrap();
        let mut a = Archive::open(dir.path()).unwrap();
        a.check_or_pin_identity(identity()).unwrap().unwrap();
        assert!(a
            .append(2, Lsn(SEG + 8), &[1, 2])
            .unwrap_err()
            .to_string()
            .contains("segment boundary"));
        a.store_history(2, b"1\t0/100000\tx\n").unwrap();
        a.store_history(2, b"1\t0/100000\tx\n").unwrap();
        assert!(a.store_history(2, b"1\t0/200000\ty\n").is_err());
    }
}
