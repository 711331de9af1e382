//! `walship-receiver promote`: trigger failover, wait until recovery has taken the end of the archive (the
//! last partial segment, zero-padded), promote the standby, and say where the new timeline starts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use walship_protocol::wal::{parse_history, WalFileName};
use walship_protocol::{Lsn, TimelineId, WalSegSize};

use crate::archive::{ensure_archive, Failover, Handover, FAILOVER_FILE};

#[derive(Clone, Debug)]
pub struct PromoteOptions {
    pub archive: PathBuf,
    pub pgdata: PathBuf,
    /// Directory of `pg_ctl`; default: the running server's own.
    pub pg_bin: Option<PathBuf>,
    pub timeout: Duration,
    /// The archive's object store (a standby restoring from it).
    pub object_store: Option<crate::store::StoreSpec>,
}

/// How the standby recovers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryMode {
    /// standby.signal, or recovery.conf with standby_mode = on: it must be promoted explicitly.
    Standby,
    /// recovery.signal, or recovery.conf without standby_mode: it promotes by itself at the end of WAL.
    Archive,
}

/// What `promote` did.
#[derive(Clone, Debug)]
pub struct PromoteReport {
    pub handover: Handover,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
}

pub fn recovery_mode(pgdata: &Path) -> Option<RecoveryMode> {
    if pgdata.join("standby.signal").exists() {
        return Some(RecoveryMode::Standby);
    }
    if pgdata.join("recovery.signal").exists() {
        return Some(RecoveryMode::Archive);
    }
    let conf = fs::read_to_string(pgdata.join("recovery.conf")).ok()?;
    let standby = conf.lines().any(|l| {
        let l = l.split('#').next().unwrap_or("").trim();
        l.strip_prefix("standby_mode").is_some_and(|rest| {
            let v = rest
                .trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('\'')
                .to_ascii_lowercase();
            matches!(v.as_str(), "on" | "true" | "yes" | "1")
        })
    });
    Some(if standby {
        RecoveryMode::Standby
    } else {
        RecoveryMode::Archive
    })
}

fn postmaster_pid(pgdata: &Path) -> Option<u32> {
    let text = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn pg_bin(opts: &PromoteOptions, pid: u32) -> PathBuf {
    if let Some(b) = &opts.pg_bin {
        return b.clone();
    }
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
        .unwrap_or_default()
}

/// `DBState` of a data directory, read from `global/pg_control` (its first fields have not moved since 9.0:
/// system identifier u64, pg_control_version u32, catalog_version_no u32, state i32), so no `pg_controldata`
/// binary is needed.
pub fn cluster_state(pgdata: &Path) -> Result<DbState> {
    let path = pgdata.join("global").join("pg_control");
    let bytes = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    anyhow::ensure!(bytes.len() >= 20, "{} is too short", path.display());
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    anyhow::ensure!(
        (900..10_000).contains(&version),
        "{} has an unknown pg_control_version {version}",
        path.display()
    );
    let state = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    Ok(match state {
        5 => DbState::InArchiveRecovery,
        6 => DbState::InProduction,
        other => DbState::Other(other),
    })
}

/// The states of `pg_control` that matter here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbState {
    InArchiveRecovery,
    InProduction,
    Other(u32),
}

fn wait_until(deadline: Instant, mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The timeline the promoted server in `pgdata` started (the newest history file in its pg_wal or pg_xlog)
/// and where it branched off.
fn promoted_timeline(pgdata: &Path) -> Option<(TimelineId, Lsn)> {
    let dir = [pgdata.join("pg_wal"), pgdata.join("pg_xlog")]
        .into_iter()
        .find(|d| d.is_dir())?;
    let newest = fs::read_dir(&dir)
        .ok()?
        .flatten()
        .filter_map(
            |e| match WalFileName::parse(e.file_name().to_str()?, WalSegSize::DEFAULT) {
                Ok(WalFileName::History { timeline }) => Some(timeline),
                _ => None,
            },
        )
        .max()?;
    let content = fs::read(dir.join(walship_protocol::wal::history_file_name(newest))).ok()?;
    let last = parse_history(&content)?.last().copied()?;
    Some((newest, last.switchpoint))
}

pub fn promote(opts: &PromoteOptions) -> Result<PromoteReport> {
    let deadline = Instant::now() + opts.timeout;
    let stored_timeline = stored_timeline(opts)?;
    // nothing is written anywhere before the archive and the standby are known to be what they claim
    ensure_archive(&opts.archive)?;
    let pid = postmaster_pid(&opts.pgdata).with_context(|| {
        format!(
            "no PostgreSQL server is running in {}",
            opts.pgdata.display()
        )
    })?;
    let mode = recovery_mode(&opts.pgdata).with_context(|| {
        format!(
            "{} is not in recovery (no standby.signal, recovery.signal or recovery.conf)",
            opts.pgdata.display()
        )
    })?;
    let bin = pg_bin(opts, pid);
    warn_of_a_connected_sender(&opts.archive);

    let request = Failover::request(&opts.archive, &opts.pgdata, stored_timeline)?;
    eprintln!(
        "walship: failover of timeline {} triggered; waiting for recovery to take the end of the archive",
        request.timeline
    );
    let handover = wait_for_handover(opts, &request, deadline)?;
    report_handover(&opts.archive, &handover);
    finish_recovery(opts, mode, &bin, deadline)?;
    let (timeline, start_lsn) =
        promoted_timeline(&opts.pgdata).context("find the new timeline's history file")?;
    Ok(PromoteReport {
        handover,
        timeline,
        start_lsn,
    })
}

/// A standby restoring from the store: the local directory takes the store's identity (if it has none
/// yet), and the store says which timeline ends the archive. `None` without a store.
fn stored_timeline(opts: &PromoteOptions) -> Result<Option<TimelineId>> {
    let Some(spec) = &opts.object_store else {
        return Ok(None);
    };
    let store = crate::store::Store::open(spec)?;
    let asked = crate::store::block_on(async {
        match store.adopt_identity(&opts.archive).await? {
            Some(id) => store.newest_timeline(id.wal_segment_size).await,
            None => Ok(None),
        }
    })
    .and_then(|r| r);
    match asked {
        Ok(t) => Ok(t),
        // the store holds copies of what this archive's receiver completed: an archive that receives WAL
        // knows its newest timeline without it (issue 19, point 8)
        Err(e) if crate::archive::receives_wal(&opts.archive) => {
            tracing::warn!("the object store is unreachable ({e:#}); failing over from the local archive, which receives WAL");
            Ok(None)
        }
        Err(e) => Err(e.context(
            "the object store is unreachable and the local archive holds no WAL: the failover needs the store",
        )),
    }
}

/// WAL a still-connected sender ships after the handover is not on the promoted standby: say so.
fn warn_of_a_connected_sender(archive: &Path) {
    let Some(status) =
        crate::status::read_status(archive).filter(|s| s.sender.is_some() && s.receiver_pid != 0)
    else {
        return;
    };
    if Path::new(&format!("/proc/{}", status.receiver_pid)).exists() {
        tracing::warn!(
            "a sender is still connected to the receiver: WAL it ships after the handover will not be on the \
             promoted standby. Stop the old primary (or its sender) before failing over"
        );
    }
}

/// Waits until `restore` has handed the end of the archive to recovery for `request` (not for an earlier
/// failover).
fn wait_for_handover(
    opts: &PromoteOptions,
    request: &Failover,
    deadline: Instant,
) -> Result<Handover> {
    let mut handover: Option<Handover> = None;
    let got = wait_until(deadline, || {
        handover = Failover::load(&opts.archive)?
            .filter(|f| f.requested_at_unix_micros == request.requested_at_unix_micros)
            .and_then(|f| f.current_handover().cloned());
        Ok(handover.is_some())
    })?;
    if !got {
        bail!(
            "recovery did not ask for the end of the archive within {:?}: is restore_command \
             'walship-receiver restore --archive {} %f %p'? (in standby mode PostgreSQL asks again every \
             wal_retrieve_retry_interval); {} is left in place, remove it to cancel the failover",
            opts.timeout,
            opts.archive.display(),
            FAILOVER_FILE
        );
    }
    handover.context("read the handover record")
}

/// Says what recovery took, and whether that is all the down primary wrote.
fn report_handover(archive: &Path, handover: &Handover) {
    if let Some(down) =
        crate::archive::PrimaryDown::load(archive).filter(|d| d.timeline == handover.timeline)
    {
        let (e, w) = (handover.end_lsn, down.wal_end);
        if e >= w {
            eprintln!(
                "walship: all WAL the primary wrote is in the archive (up to {w}): no acknowledged commit is lost"
            );
        } else {
            eprintln!(
                "walship: the archive misses {} bytes of the primary's WAL: it ends at {w}, the archive at {e}",
                w.0 - e.0
            );
        }
    }
    eprintln!(
        "walship: recovery took {}: {} bytes of its partial segment, zero-padded (WAL up to {})",
        handover.segment, handover.partial_bytes, handover.end_lsn
    );
    if let Some(line) = synchronous_verdict(archive, handover.timeline) {
        eprintln!("walship: {line}");
    }
}

/// What a `--synchronous` sender's last word (`walship.synchronous`) proves about acknowledged commits.
fn synchronous_verdict(archive: &Path, timeline: TimelineId) -> Option<String> {
    use walship_protocol::SyncState;
    let s = crate::archive::Synchronous::load(archive).filter(|s| s.timeline == timeline)?;
    let since = time::OffsetDateTime::from_unix_timestamp_nanos(s.since_unix_micros as i128 * 1000)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "?".into());
    Some(match s.state {
        SyncState::Sync => format!(
            "the primary counted walship as its synchronous standby (sync_state = sync, since {since}, as its sender \
             saw it every second until its session ended): every commit it acknowledged meanwhile waited for this \
             archive, and recovery got all of them"
        ),
        SyncState::Quorum => format!(
            "walship was one of a quorum of synchronous standbys (sync_state = quorum, since {since}): an \
             acknowledged commit is in this archive or on another standby of the quorum"
        ),
        SyncState::Async => format!(
            "the last sender ran --synchronous, but the primary did not count it as a synchronous standby (since \
             {since}): commits acknowledged then did not wait for this archive"
        ),
    })
}

/// Ends recovery: archive recovery ends by itself at the end of the handed-over WAL (given half the time),
/// otherwise `pg_ctl promote`; then waits until the server is in production.
fn finish_recovery(
    opts: &PromoteOptions,
    mode: RecoveryMode,
    bin: &Path,
    deadline: Instant,
) -> Result<()> {
    let in_production =
        || -> Result<bool> { Ok(cluster_state(&opts.pgdata)? == DbState::InProduction) };
    if mode == RecoveryMode::Archive {
        let half = Instant::now() + opts.timeout / 2;
        if !wait_until(half.min(deadline), in_production)? {
            tracing::warn!("archive recovery did not end by itself; promoting");
        }
    }
    if !in_production()? {
        let pg_ctl = if bin.as_os_str().is_empty() {
            PathBuf::from("pg_ctl")
        } else {
            bin.join("pg_ctl")
        };
        let secs = deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1)
            .to_string();
        let out = Command::new(&pg_ctl)
            .arg("promote")
            .arg("-D")
            .arg(&opts.pgdata)
            .args(["-w", "-t", &secs])
            .output()
            .with_context(|| format!("run {}", pg_ctl.display()))?;
        // the server may have finished recovery by itself in the meantime
        if !out.status.success() && !in_production()? {
            bail!(
                "{} promote failed: {}",
                pg_ctl.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    if !wait_until(deadline, in_production)? {
        bail!(
            "the server in {} did not finish promotion within {:?}",
            opts.pgdata.display(),
            opts.timeout
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_modes() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(recovery_mode(d.path()), None);
        fs::write(d.path().join("recovery.conf"), "restore_command = 'x'\n").unwrap();
        assert_eq!(recovery_mode(d.path()), Some(RecoveryMode::Archive));
        fs::write(d.path().join("recovery.conf"), "standby_mode = 'on'\n").unwrap();
        assert_eq!(recovery_mode(d.path()), Some(RecoveryMode::Standby));
        fs::write(d.path().join("recovery.conf"), "#standby_mode = on\n").unwrap();
        assert_eq!(recovery_mode(d.path()), Some(RecoveryMode::Archive));
        fs::remove_file(d.path().join("recovery.conf")).unwrap();
        fs::write(d.path().join("recovery.signal"), "").unwrap();
        assert_eq!(recovery_mode(d.path()), Some(RecoveryMode::Archive));
        fs::write(d.path().join("standby.signal"), "").unwrap();
        assert_eq!(recovery_mode(d.path()), Some(RecoveryMode::Standby));
    }
}
