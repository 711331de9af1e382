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
//!
//! | room         | what it owns |
//! |--------------|--------------|
//! | this file    | the options, one call ([`restore`]): waiting, history and backup files, which segment is asked |
//! | `segment`    | a complete segment (checked), the partial at failover or for `--live`, segments that never arrive |
//! | `from_store` | what the local archive lacks, from the prefetch spool or the object store |
//! | `settings`   | the standby's own settings (`archive_mode`, archive recovery or standby mode) |

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

mod from_store;
mod segment;
mod settings;

use from_store::*;
use segment::*;
use settings::*;
pub use settings::{archive_mode_always, archive_recovery, setting};

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
