//! What the receiver is doing, for `walship-receiver status`: kept in memory by the sessions and written to
//! `walship.status` in the archive once a second (informational: not fsynced, never trusted for recovery).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use walship_protocol::{Lsn, TimelineId};

/// The status file's name.
pub const STATUS_FILE: &str = "walship.status";

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The connected sender.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SenderStatus {
    pub name: String,
    pub timeline: TimelineId,
    /// Last position made durable in this session (`X/X`).
    pub durable_lsn: Option<String>,
    /// The primary's flush position from the sender's last keepalive (`X/X`).
    pub primary_flush_lsn: Option<String>,
    pub connected_at_unix_micros: u64,
    pub last_keepalive_unix_micros: Option<u64>,
    /// When the durable position last moved.
    pub last_durable_unix_micros: Option<u64>,
}

impl SenderStatus {
    pub fn new(name: &str, timeline: TimelineId, durable: Option<Lsn>) -> Self {
        SenderStatus {
            name: name.to_owned(),
            timeline,
            durable_lsn: durable.map(|l| l.to_string()),
            connected_at_unix_micros: now_micros(),
            ..Default::default()
        }
    }
}

/// The content of `walship.status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusFile {
    pub receiver_pid: u32,
    pub written_at_unix_micros: u64,
    pub sender: Option<SenderStatus>,
    /// When a sender was last connected (before any: when the receiver started).
    #[serde(default)]
    pub last_sender_unix_micros: Option<u64>,
}

/// Shared, cheap-to-clone status of one receiver.
#[derive(Clone, Debug)]
pub struct StatusBoard {
    inner: Arc<Mutex<Option<SenderStatus>>>,
    /// When a sender was last connected (or, before any, when the receiver started).
    last_sender: Arc<Mutex<u64>>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            inner: Arc::default(),
            last_sender: Arc::new(Mutex::new(now_micros())),
        }
    }
}

impl StatusBoard {
    fn update(&self, f: impl FnOnce(&mut Option<SenderStatus>)) {
        if let Ok(mut g) = self.inner.lock() {
            f(&mut g);
        }
    }

    pub fn sender_connected(&self, s: SenderStatus) {
        self.update(|g| *g = Some(s));
    }

    pub fn sender_disconnected(&self) {
        self.update(|g| *g = None);
        if let Ok(mut t) = self.last_sender.lock() {
            *t = now_micros();
        }
    }

    pub fn durable(&self, lsn: Lsn) {
        self.update(|g| {
            if let Some(s) = g {
                s.durable_lsn = Some(lsn.to_string());
                s.last_durable_unix_micros = Some(now_micros());
            }
        });
    }

    /// The sender says the primary's server is down and its WAL ends at `wal_end`.
    pub fn primary_down(&self, wal_end: Lsn, _since_unix_micros: u64) {
        self.update(|g| {
            if let Some(s) = g {
                s.primary_flush_lsn = Some(wal_end.to_string());
                s.last_keepalive_unix_micros = Some(now_micros());
            }
        });
    }

    pub fn keepalive(&self, primary_flush: Lsn, _sent_at_unix_micros: u64) {
        self.update(|g| {
            if let Some(s) = g {
                s.primary_flush_lsn = Some(primary_flush.to_string());
                s.last_keepalive_unix_micros = Some(now_micros());
            }
        });
    }

    pub fn snapshot(&self) -> StatusFile {
        let sender = self.inner.lock().ok().and_then(|g| g.clone());
        let now = now_micros();
        let last_sender = match (&sender, self.last_sender.lock()) {
            (Some(_), Ok(mut t)) => {
                *t = now;
                now
            }
            (None, Ok(t)) => *t,
            (_, Err(_)) => now,
        };
        StatusFile {
            receiver_pid: std::process::id(),
            written_at_unix_micros: now,
            sender,
            last_sender_unix_micros: Some(last_sender),
        }
    }

    /// Writes the status file every `every` until `shutdown`, and once more (without a sender) at the end.
    pub async fn run_writer(self, dir: PathBuf, every: Duration, shutdown: CancellationToken) {
        loop {
            // off the network thread: a rename can wait for the file system's journal
            let (d, snapshot) = (dir.clone(), self.snapshot());
            let _ = tokio::task::spawn_blocking(move || write_status(&d, &snapshot)).await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        write_status(
            &dir,
            &StatusFile {
                receiver_pid: 0,
                written_at_unix_micros: now_micros(),
                sender: None,
                last_sender_unix_micros: None,
            },
        );
    }
}

fn write_status(dir: &Path, status: &StatusFile) {
    // a report rewritten every second: atomic, not fsynced (see crate::durable)
    let result = serde_json::to_vec_pretty(status)
        .map_err(std::io::Error::other)
        .and_then(|json| crate::durable::replace_unsynced(dir, STATUS_FILE, &json));
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not write {STATUS_FILE}");
    }
}

/// Reads `walship.status` from an archive.
pub fn read_status(dir: &Path) -> Option<StatusFile> {
    serde_json::from_slice(&std::fs::read(dir.join(STATUS_FILE)).ok()?).ok()
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
    pub archived_lsn: Option<String>,
    /// How much of the archived WAL the primary had confirmed (flushed) when it arrived; beyond it the
    /// archive holds provisional WAL (written by the primary, not yet flushed when shipped).
    pub confirmed_lsn: Option<String>,
    pub complete_segments: usize,
    pub current_partial: Option<String>,
    pub current_partial_bytes: Option<u64>,
    pub receiver_running: bool,
    pub sender_connected: bool,
    pub sender_name: Option<String>,
    pub primary_flush_lsn: Option<String>,
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

/// A lag threshold: bytes behind the primary's flush position, or seconds the archive has been behind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lag {
    Bytes(u64),
    Seconds(f64),
}

impl std::str::FromStr for Lag {
    type Err = String;
    /// `1048576`, `512kB`, `16MB`, `1GB` (bytes, powers of 1024 as in PostgreSQL), or `30s`, `5min`.
    fn from_str(text: &str) -> Result<Lag, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a lag: use bytes (16MB) or seconds (30s)"))?;
        let bytes = |f: f64| Ok(Lag::Bytes((n * f) as u64));
        match unit.trim() {
            "" | "B" => bytes(1.0),
            "kB" => bytes(1024.0),
            "MB" => bytes(1024.0 * 1024.0),
            "GB" => bytes(1024.0 * 1024.0 * 1024.0),
            "s" => Ok(Lag::Seconds(n)),
            "min" => Ok(Lag::Seconds(n * 60.0)),
            other => Err(format!(
                "{text:?}: unknown unit {other:?} (bytes: B, kB, MB, GB; time: s, min)"
            )),
        }
    }
}

/// When `status` says warning or critical.
#[derive(Clone, Debug, Default)]
pub struct Thresholds {
    pub warn_lag: Option<Lag>,
    pub crit_lag: Option<Lag>,
    /// No sender connected for longer than this is critical (shorter: a warning).
    pub crit_no_sender_seconds: f64,
}

/// The verdict of `status`, as monitoring plugins give it: exit code 0 ok, 1 warning, 2 critical.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub code: u8,
    pub level: String,
    pub reasons: Vec<String>,
}

impl Report {
    /// Judges the report against `t` and records the verdict in it.
    pub fn judge(&mut self, t: &Thresholds) -> &Verdict {
        let mut code = 0u8;
        let mut reasons = Vec::new();
        let mut say = |level: u8, why: String| {
            code = code.max(level);
            reasons.push(why);
        };
        if let Some(down) = &self.primary_down {
            let all = self.primary_wal_archived.unwrap_or(false);
            say(
                2,
                format!(
                    "the primary is down (its WAL ends at {}; all of it archived: {})",
                    down.wal_end,
                    if all { "yes" } else { "no" }
                ),
            );
        }
        if !self.receiver_running {
            say(2, "the receiver is not running".into());
        } else if !self.sender_connected {
            let secs = self.no_sender_seconds.unwrap_or(0.0);
            let level = if secs > t.crit_no_sender_seconds {
                2
            } else {
                1
            };
            say(level, format!("no sender connected for {secs:.0} s"));
        }
        let exceeds = |lag: Lag| match lag {
            Lag::Bytes(b) => self.lag_bytes.is_some_and(|l| l > b),
            Lag::Seconds(s) => self.lag_seconds.is_some_and(|l| l > s),
        };
        let lag_text = format!(
            "lag {} bytes, {:.1} s",
            self.lag_bytes.unwrap_or(0),
            self.lag_seconds.unwrap_or(0.0)
        );
        if t.crit_lag.is_some_and(exceeds) {
            say(
                2,
                format!(
                    "{lag_text} (critical above {:?})",
                    t.crit_lag.unwrap_or(Lag::Bytes(0))
                ),
            );
        } else if t.warn_lag.is_some_and(exceeds) {
            say(
                1,
                format!(
                    "{lag_text} (warning above {:?})",
                    t.warn_lag.unwrap_or(Lag::Bytes(0))
                ),
            );
        }
        let level = ["OK", "WARNING", "CRITICAL"][code as usize].to_string();
        if reasons.is_empty() {
            reasons.push(format!("shipping; {lag_text}"));
        }
        self.verdict.insert(Verdict {
            code,
            level,
            reasons,
        })
    }
}

/// Gathers the status of the archive in `dir` (read-only).
pub fn report(dir: &Path) -> anyhow::Result<Report> {
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
        failover_triggered: failover.is_some(),
        handover: failover.and_then(|f| f.handover),
        primary_down: crate::archive::PrimaryDown::load(dir),
        primary_wal_archived: None,
        no_sender_seconds: None,
        store: None,
        store_uploaded_up_to: None,
        store_waiting_segments: None,
        store_contents: None,
        verdict: None,
    };
    let uploads = crate::upload::read_state(dir);
    if let Some(state) = &uploads {
        r.store = Some(state.store.clone());
        r.store_uploaded_up_to = state.segments_up_to.clone();
    }
    let mut archived = None;
    if let Some(id) = id {
        let seg = id.wal_segment_size;
        let segments = crate::archive::list_segments(dir, seg)?;
        r.complete_segments = segments.iter().filter(|s| s.complete).count();
        r.store_waiting_segments = uploads
            .as_ref()
            .map(|state| crate::upload::waiting(state, &segments, seg));
        if let Some(last) = segments.last() {
            if !last.complete {
                r.current_partial = Some(format!(
                    "{}.partial",
                    walship_protocol::wal::segment_file_name(last.timeline, last.segno, seg)
                ));
                r.current_partial_bytes = Some(last.size);
            }
        }
        if let Some((t, end)) = crate::archive::archive_end(&segments, seg) {
            r.timeline = Some(t);
            r.archived_lsn = Some(end.to_string());
            archived = Some(end);
            let confirmed = crate::archive::read_positions(dir)
                .filter(|p| p.timeline == t)
                .map_or(end, |p| p.confirmed.min(end));
            r.confirmed_lsn = Some(confirmed.to_string());
        }
        if let Some(down) = &r.primary_down {
            let wal_end = down.wal_end.parse::<Lsn>().ok();
            r.primary_wal_archived = match (wal_end, r.timeline) {
                (Some(w), Some(t)) if t == down.timeline => archived.map(|a| a >= w),
                _ => Some(down.complete()),
            };
        }
    }
    if let Some(s) = read_status(dir) {
        let alive = s.receiver_pid != 0 && Path::new(&format!("/proc/{}", s.receiver_pid)).exists();
        let fresh = now_micros().saturating_sub(s.written_at_unix_micros) < 10_000_000;
        r.receiver_running = alive && fresh;
        r.no_sender_seconds = match (&s.sender, s.last_sender_unix_micros) {
            (Some(_), _) => Some(0.0),
            (None, Some(t)) => Some(now_micros().saturating_sub(t) as f64 / 1e6),
            (None, None) => None,
        };
        if let (true, Some(sender)) = (r.receiver_running, s.sender) {
            r.sender_connected = true;
            r.sender_name = Some(sender.name);
            r.primary_flush_lsn = sender.primary_flush_lsn.clone();
            if let (Some(flush), Some(end)) = (
                sender.primary_flush_lsn.and_then(|f| f.parse::<Lsn>().ok()),
                archived,
            ) {
                let behind = flush.saturating_sub(end);
                r.lag_bytes = Some(behind);
                r.lag_seconds = Some(if behind == 0 {
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
    Ok(r)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        writeln!(f, "archive:            {}", self.archive)?;
        match (self.system_identifier, self.wal_segment_size) {
            (Some(id), Some(seg)) => writeln!(
                f,
                "cluster:            system identifier {id}, {} MB segments, server_version_num {}",
                seg >> 20,
                self.pg_version_num.unwrap_or(0)
            )?,
            _ => writeln!(f, "cluster:            none yet (no sender has connected)")?,
        }
        writeln!(
            f,
            "timeline:           {}",
            self.timeline
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into())
        )?;
        writeln!(f, "archived up to:     {}", opt(&self.archived_lsn))?;
        if self.confirmed_lsn != self.archived_lsn {
            writeln!(
                f,
                "confirmed up to:    {} (beyond: provisional, written by the primary but not yet known flushed)",
                opt(&self.confirmed_lsn)
            )?;
        }
        writeln!(f, "complete segments:  {}", self.complete_segments)?;
        match (&self.current_partial, self.current_partial_bytes) {
            (Some(p), Some(b)) => writeln!(f, "current partial:    {p} ({b} bytes)")?,
            _ => writeln!(f, "current partial:    -")?,
        }
        writeln!(
            f,
            "receiver running:   {}",
            if self.receiver_running { "yes" } else { "no" }
        )?;
        if self.sender_connected {
            writeln!(
                f,
                "sender:             {} (connected)",
                opt(&self.sender_name)
            )?;
            writeln!(f, "primary flushed:    {}", opt(&self.primary_flush_lsn))?;
            writeln!(
                f,
                "lag:                {} bytes, {:.1} s",
                self.lag_bytes.unwrap_or(0),
                self.lag_seconds.unwrap_or(0.0)
            )?;
        } else {
            writeln!(f, "sender:             not connected")?;
        }
        if let Some(down) = &self.primary_down {
            let since = time::OffsetDateTime::from_unix_timestamp_nanos(
                down.down_since_unix_micros as i128 * 1000,
            )
            .map(|t| t.to_string())
            .unwrap_or_else(|_| "?".into());
            writeln!(
                f,
                "primary:            down since {since}, its WAL ends at {}; the archive holds all of it: {}",
                down.wal_end,
                match self.primary_wal_archived {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "unknown",
                }
            )?;
        }
        if let Some(store) = &self.store {
            writeln!(
                f,
                "object store:       {store}: complete segments up to {}, {} waiting",
                self.store_uploaded_up_to.as_deref().unwrap_or("none yet"),
                self.store_waiting_segments.unwrap_or(0)
            )?;
        }
        if let Some(c) = &self.store_contents {
            match &c.error {
                Some(e) => writeln!(f, "object store:       {}: cannot list it: {e}", c.url)?,
                None => writeln!(
                    f,
                    "store holds:        {} complete segments ({} to {}), partial {}, {} history files, {:.1} MB compressed",
                    c.complete_segments,
                    c.oldest_segment.as_deref().unwrap_or("-"),
                    c.newest_segment.as_deref().unwrap_or("-"),
                    c.partial.as_deref().unwrap_or("none"),
                    c.history_files,
                    c.bytes as f64 / 1e6
                )?,
            }
        }
        if self.failover_triggered {
            writeln!(f, "failover:           triggered")?;
        }
        if let Some(h) = &self.handover {
            writeln!(
                f,
                "handed over:        {} ({} bytes of partial, WAL up to {})",
                h.segment, h.partial_bytes, h.end_lsn
            )?;
        }
        if let Some(v) = &self.verdict {
            writeln!(
                f,
                "verdict:            {}: {}",
                v.level,
                v.reasons.join("; ")
            )?;
        }
        Ok(())
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
            archived_lsn: Some("0/3000000".into()),
            confirmed_lsn: Some("0/3000000".into()),
            complete_segments: 2,
            current_partial: None,
            current_partial_bytes: None,
            receiver_running: true,
            sender_connected: true,
            sender_name: Some("s".into()),
            primary_flush_lsn: Some("0/3000000".into()),
            lag_bytes: Some(0),
            lag_seconds: Some(0.0),
            failover_triggered: false,
            handover: None,
            primary_down: None,
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
