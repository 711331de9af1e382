//! The primary-down and failover state: `walship.primary` (the sender said the primary stopped, and where
//! its WAL ends) and `walship.failover` (a failover was requested; what restore handed to recovery, which
//! fences the old timeline).

use super::*;

/// The file where the receiver keeps the sender's word that the primary's server is down.
pub const PRIMARY_FILE: &str = "walship.primary";

/// The primary's server is down (its host was up): the sender drained `pg_wal/` and said where the
/// primary's WAL ends. Kept in `walship.primary` until a sender connects again (the primary is back, or a
/// promoted standby ships its own WAL).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PrimaryDown {
    pub timeline: TimelineId,
    /// Where the primary's WAL ends (`X/X`): the end of its last complete, valid record.
    pub wal_end: Lsn,
    pub down_since_unix_micros: u64,
    /// The archive's durable end of that timeline when this was recorded (`X/X`).
    pub archived_end: Lsn,
}

impl PrimaryDown {
    pub fn load(dir: &Path) -> Option<PrimaryDown> {
        serde_json::from_slice(&fs::read(dir.join(PRIMARY_FILE)).ok()?).ok()
    }

    /// Whether the archive holds every byte of the primary's WAL.
    pub fn complete(&self) -> bool {
        self.archived_end >= self.wal_end
    }
}

/// The file where the receiver keeps how the primary counted the last `--synchronous` sender.
pub const SYNCHRONOUS_FILE: &str = "walship.synchronous";

/// How the primary counted the sender of `timeline` in `synchronous_standby_names` (its `pg_stat_replication`
/// `sync_state`, as the sender last saw it, at most a second old), since when. Written when a `--synchronous`
/// sender says it changed; removed when a session is admitted (a sender that says nothing is not counted).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Synchronous {
    pub timeline: TimelineId,
    pub state: walship_protocol::SyncState,
    pub since_unix_micros: u64,
}

impl Synchronous {
    pub fn load(dir: &Path) -> Option<Synchronous> {
        serde_json::from_slice(&fs::read(dir.join(SYNCHRONOUS_FILE)).ok()?).ok()
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
    pub end_lsn: Lsn,
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

pub(crate) fn now_micros() -> u64 {
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

    pub(crate) fn store(&self, dir: &Path) -> Result<()> {
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
pub(crate) fn retire_failover(dir: &Path, timeline: TimelineId) -> Result<()> {
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
