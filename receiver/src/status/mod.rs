//! What the receiver is doing, for `walship-receiver status` and the metrics: kept in memory by the sessions
//! ([`StatusBoard`]) and written to `walship.status` in the archive once a second (informational: not
//! fsynced, never trusted for recovery), so that `status`, another process, can read it.
//!
//! | room      | what it owns |
//! |-----------|--------------|
//! | this file | the [`Report`]: gathered from the archive and either the status file or the in-memory board |
//! | `board`   | the in-memory [`StatusBoard`] and the `walship.status` file it writes |
//! | `verdict` | lag thresholds and the monitoring verdict (0 ok, 1 warning, 2 critical) |
//! | `display` | the report as text |

use std::path::Path;

use serde::{Deserialize, Serialize};
use walship_protocol::{Lsn, TimelineId};

mod board;
mod display;
mod verdict;

pub use board::{read_status, SenderStatus, StatusBoard, StatusFile, STATUS_FILE};
pub use verdict::{Lag, Thresholds, Verdict};

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The answer of `walship-receiver status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub archive: String,
    pub system_identifier: Option<u64>,
    pub wal_segment_size: Option<u32>,
    pub pg_version_num: Option<u32>,
    pub timeline: Option<TimelineId>,
    /// Where the archived WAL of the newest timeline ends (`X/X`).
    pub archived_lsn: Option<Lsn>,
    /// How much of the archived WAL the primary had confirmed (flushed) when it arrived; beyond it the
    /// archive holds provisional WAL (written by the primary, not yet flushed when shipped).
    pub confirmed_lsn: Option<Lsn>,
    pub complete_segments: usize,
    pub current_partial: Option<String>,
    pub current_partial_bytes: Option<u64>,
    pub receiver_running: bool,
    pub sender_connected: bool,
    pub sender_name: Option<String>,
    pub primary_flush_lsn: Option<Lsn>,
    pub lag_bytes: Option<u64>,
    /// Seconds since the archive last moved while it is behind the primary (0 when caught up).
    pub lag_seconds: Option<f64>,
    pub failover_triggered: bool,
    pub handover: Option<crate::restore::Handover>,
    /// The sender's word that the primary's server is down, and where its WAL ends.
    pub primary_down: Option<crate::archive::PrimaryDown>,
    /// Whether the archive holds every byte of the down primary's WAL.
    pub primary_wal_archived: Option<bool>,
    /// Seconds since a sender was last connected (0 while one is).
    #[serde(default)]
    pub no_sender_seconds: Option<f64>,
    /// How the primary counts a `--synchronous` sender (`pg_stat_replication.sync_state`), as its last
    /// session said, and since when.
    #[serde(default)]
    pub synchronous: Option<crate::archive::Synchronous>,
    /// The object store the archive is copied to (`--object-store`), how far, and what waits.
    pub store: Option<String>,
    pub store_uploaded_up_to: Option<String>,
    pub store_waiting_segments: Option<usize>,
    /// What the store holds (`status --object-store`).
    #[serde(default)]
    pub store_contents: Option<StoreContents>,
    /// The monitoring verdict (see [`Thresholds`]); `None` until [`Report::judge`] ran.
    #[serde(default)]
    pub verdict: Option<Verdict>,
}

/// What the object store holds, listed by `status --object-store`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StoreContents {
    pub url: String,
    pub complete_segments: usize,
    pub oldest_segment: Option<String>,
    pub newest_segment: Option<String>,
    /// The partial segment object (the durable tail, uploaded every `--partial-upload-interval`).
    pub partial: Option<String>,
    pub history_files: usize,
    /// Compressed bytes of all its files.
    pub bytes: u64,
    /// Why the store could not be listed.
    pub error: Option<String>,
}

impl StoreContents {
    /// Lists `store` (an unreachable store is reported, not an error: the local archive is still there).
    pub async fn list(
        store: &crate::store::Store,
        seg: walship_protocol::WalSegSize,
    ) -> StoreContents {
        use walship_protocol::wal::WalFileName;
        let mut c = StoreContents {
            url: store.url().to_owned(),
            ..Default::default()
        };
        match store.list("").await {
            Ok(files) => {
                for f in files {
                    c.bytes += f.size;
                    match WalFileName::parse(&f.name, seg) {
                        Ok(WalFileName::Segment { .. }) => {
                            c.complete_segments += 1;
                            c.oldest_segment.get_or_insert_with(|| f.name.clone());
                            c.newest_segment = Some(f.name);
                        }
                        Ok(WalFileName::Partial { .. }) => c.partial = Some(f.name),
                        Ok(WalFileName::History { .. }) => c.history_files += 1,
                        _ => {}
                    }
                }
            }
            Err(e) => c.error = Some(format!("{e:#}")),
        }
        c
    }
}

/// Gathers the status of the archive in `dir` (read-only), with what the receiver last wrote to
/// `walship.status` (`walship-receiver status`, another process than the receiver).
pub fn report(dir: &Path) -> anyhow::Result<Report> {
    let mut r = archive_report(dir)?;
    if let Some(s) = read_status(dir) {
        let alive = s.receiver_pid != 0 && Path::new(&format!("/proc/{}", s.receiver_pid)).exists();
        let fresh = now_micros().saturating_sub(s.written_at_unix_micros) < 10_000_000;
        r.add_receiver(alive && fresh, s);
    }
    Ok(r)
}

/// The same report inside the running receiver, from its in-memory `board` (the metrics endpoint): no
/// round trip through `walship.status`.
pub fn report_live(dir: &Path, board: &StatusBoard) -> anyhow::Result<Report> {
    let mut r = archive_report(dir)?;
    r.add_receiver(true, board.snapshot());
    Ok(r)
}

/// What the archive directory itself says: identity, segments, positions, primary-down and failover state,
/// uploads.
fn archive_report(dir: &Path) -> anyhow::Result<Report> {
    if !dir.is_dir() {
        anyhow::bail!(
            "archive directory {} does not exist: check --archive",
            dir.display()
        );
    }
    let id = crate::archive::Identity::load(dir)?;
    if id.is_none() && !dir.join(crate::archive::LOCK_FILE).exists() {
        anyhow::bail!(
            "{} is not a walship archive (no {} or {}): check --archive",
            dir.display(),
            crate::archive::ID_FILE,
            crate::archive::LOCK_FILE
        );
    }
    let failover = crate::archive::Failover::load(dir)?;
    let mut r = Report {
        archive: dir.display().to_string(),
        system_identifier: id.map(|i| i.system_identifier),
        wal_segment_size: id.map(|i| i.wal_segment_size.bytes()),
        pg_version_num: id.map(|i| i.pg_version_num),
        failover_triggered: failover.is_some(),
        handover: failover.and_then(|f| f.handover),
        primary_down: crate::archive::PrimaryDown::load(dir),
        synchronous: crate::archive::Synchronous::load(dir),
        ..Report::empty()
    };
    let uploads = crate::upload::read_state(dir);
    if let Some(state) = &uploads {
        r.store = Some(state.store.clone());
        r.store_uploaded_up_to = state.segments_up_to.clone();
    }
    let Some(id) = id else { return Ok(r) };
    let seg = id.wal_segment_size;
    let mut segments = crate::archive::list_segments(dir, seg)?;
    if let Some(last) = segments.last_mut().filter(|s| !s.complete) {
        // a preallocated partial's size is not its end
        last.size = crate::archive::partial_end(dir, &id, last.timeline, last.segno).unwrap_or(0);
    }
    r.complete_segments = segments.iter().filter(|s| s.complete).count();
    r.store_waiting_segments = uploads
        .as_ref()
        .map(|state| crate::upload::waiting(state, &segments, seg));
    if let Some(last) = segments.last().filter(|s| !s.complete) {
        r.current_partial = Some(format!(
            "{}.partial",
            walship_protocol::wal::segment_file_name(last.timeline, last.segno, seg)
        ));
        r.current_partial_bytes = Some(last.size);
    }
    if let Some((t, end)) = crate::archive::archive_end(&segments, seg) {
        r.timeline = Some(t);
        r.archived_lsn = Some(end);
        let confirmed = crate::archive::read_positions(dir)
            .filter(|p| p.timeline == t)
            .map_or(end, |p| p.confirmed.min(end));
        r.confirmed_lsn = Some(confirmed);
    }
    if let Some(down) = &r.primary_down {
        r.primary_wal_archived = match r.timeline {
            Some(t) if t == down.timeline => r.archived_lsn.map(|a| a >= down.wal_end),
            _ => Some(down.complete()),
        };
    }
    Ok(r)
}

impl Report {
    /// The report as metrics gauges, judged with `status`'s default thresholds (critical after 60 s without
    /// a sender).
    pub fn gauges(mut self) -> crate::metrics::Gauges {
        let code = self
            .judge(&Thresholds {
                crit_no_sender_seconds: 60.0,
                ..Default::default()
            })
            .code;
        let lsn = |l: Option<Lsn>| l.map(|l| l.0 as i64);
        crate::metrics::Gauges {
            timeline: self.timeline.map(i64::from),
            durable_lsn: lsn(self.archived_lsn),
            confirmed_lsn: lsn(self.confirmed_lsn),
            primary_flush_lsn: lsn(self.primary_flush_lsn),
            lag_bytes: self.lag_bytes.map(|b| b as i64),
            lag_seconds: self.lag_seconds,
            sender_connected: Some(i64::from(self.sender_connected)),
            no_sender_seconds: self.no_sender_seconds,
            complete_segments: Some(self.complete_segments as i64),
            store_waiting_segments: self.store_waiting_segments.map(|n| n as i64),
            status_code: Some(i64::from(code)),
        }
    }

    /// A report with nothing known yet.
    fn empty() -> Report {
        Report {
            archive: String::new(),
            system_identifier: None,
            wal_segment_size: None,
            pg_version_num: None,
            timeline: None,
            archived_lsn: None,
            confirmed_lsn: None,
            complete_segments: 0,
            current_partial: None,
            current_partial_bytes: None,
            receiver_running: false,
            sender_connected: false,
            sender_name: None,
            primary_flush_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            failover_triggered: false,
            handover: None,
            primary_down: None,
            synchronous: None,
            primary_wal_archived: None,
            no_sender_seconds: None,
            store: None,
            store_uploaded_up_to: None,
            store_waiting_segments: None,
            store_contents: None,
            verdict: None,
        }
    }

    /// Adds what the receiver says of itself and its sender (`running`: the receiver is alive).
    fn add_receiver(&mut self, running: bool, s: StatusFile) {
        self.receiver_running = running;
        self.no_sender_seconds = match (&s.sender, s.last_sender_unix_micros) {
            (Some(_), _) => Some(0.0),
            (None, Some(t)) => Some(now_micros().saturating_sub(t) as f64 / 1e6),
            (None, None) => None,
        };
        let Some(sender) = s.sender.filter(|_| running) else {
            return;
        };
        self.sender_connected = true;
        self.sender_name = Some(sender.name);
        self.primary_flush_lsn = sender.primary_flush_lsn;
        if let (Some(flush), Some(end)) = (sender.primary_flush_lsn, self.archived_lsn) {
            let behind = flush.saturating_sub(end);
            self.lag_bytes = Some(behind);
            self.lag_seconds = Some(if behind == 0 {
                0.0
            } else {
                let since = sender
                    .last_durable_unix_micros
                    .unwrap_or(sender.connected_at_unix_micros);
                now_micros().saturating_sub(since) as f64 / 1e6
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            archive: "/a".into(),
            system_identifier: Some(1),
            wal_segment_size: Some(16 << 20),
            pg_version_num: Some(150000),
            timeline: Some(1),
            archived_lsn: Some(Lsn(0x300_0000)),
            confirmed_lsn: Some(Lsn(0x300_0000)),
            complete_segments: 2,
            current_partial: None,
            current_partial_bytes: None,
            receiver_running: true,
            sender_connected: true,
            sender_name: Some("s".into()),
            primary_flush_lsn: Some(Lsn(0x300_0000)),
            lag_bytes: Some(0),
            lag_seconds: Some(0.0),
            failover_triggered: false,
            handover: None,
            primary_down: None,
            synchronous: None,
            primary_wal_archived: None,
            no_sender_seconds: Some(0.0),
            store: None,
            store_uploaded_up_to: None,
            store_waiting_segments: None,
            store_contents: None,
            verdict: None,
        }
    }

    #[test]
    fn lags_parse_as_bytes_or_seconds() {
        assert_eq!("1048576".parse::<Lag>(), Ok(Lag::Bytes(1 << 20)));
        assert_eq!("16MB".parse::<Lag>(), Ok(Lag::Bytes(16 << 20)));
        assert_eq!("512kB".parse::<Lag>(), Ok(Lag::Bytes(512 << 10)));
        assert_eq!("1GB".parse::<Lag>(), Ok(Lag::Bytes(1 << 30)));
        assert_eq!("30s".parse::<Lag>(), Ok(Lag::Seconds(30.0)));
        assert_eq!("5min".parse::<Lag>(), Ok(Lag::Seconds(300.0)));
        assert!("5 parsecs"
            .parse::<Lag>()
            .unwrap_err()
            .contains("unknown unit"));
        assert!("fast".parse::<Lag>().is_err());
    }

    #[test]
    fn verdicts_follow_the_thresholds() {
        let t = Thresholds {
            warn_lag: Some(Lag::Bytes(1 << 20)),
            crit_lag: Some(Lag::Seconds(30.0)),
            crit_no_sender_seconds: 60.0,
        };
        assert_eq!(report().judge(&t).code, 0);
        let mut r = report();
        r.lag_bytes = Some(2 << 20);
        r.lag_seconds = Some(3.0);
        assert_eq!(r.judge(&t).code, 1);
        r.lag_seconds = Some(31.0);
        assert_eq!(r.judge(&t).code, 2);
        let mut r = report();
        r.sender_connected = false;
        r.no_sender_seconds = Some(10.0);
        assert_eq!(r.judge(&t).code, 1);
        r.no_sender_seconds = Some(61.0);
        assert_eq!(r.judge(&t).code, 2);
        let mut r = report();
        r.receiver_running = false;
        let v = r.judge(&t).clone();
        assert_eq!((v.code, v.level.as_str()), (2, "CRITICAL"));
        assert!(v.reasons[0].contains("not running"), "{v:?}");
    }
}
