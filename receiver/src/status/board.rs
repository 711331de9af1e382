//! The receiver's status in memory ([`StatusBoard`], updated by the sessions) and its copy in
//! `walship.status`, written once a second for `walship-receiver status`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use walship_protocol::{Lsn, TimelineId};

use super::now_micros;

/// The status file's name.
pub const STATUS_FILE: &str = "walship.status";

/// The connected sender.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SenderStatus {
    pub name: String,
    pub timeline: TimelineId,
    /// Last position made durable in this session (`X/X`).
    pub durable_lsn: Option<Lsn>,
    /// The primary's flush position from the sender's last keepalive (`X/X`).
    pub primary_flush_lsn: Option<Lsn>,
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
            durable_lsn: durable,
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
                s.durable_lsn = Some(lsn);
                s.last_durable_unix_micros = Some(now_micros());
            }
        });
    }

    /// The sender says the primary's server is down and its WAL ends at `wal_end`.
    pub fn primary_down(&self, wal_end: Lsn, _since_unix_micros: u64) {
        self.update(|g| {
            if let Some(s) = g {
                s.primary_flush_lsn = Some(wal_end);
                s.last_keepalive_unix_micros = Some(now_micros());
            }
        });
    }

    pub fn keepalive(&self, primary_flush: Lsn, _sent_at_unix_micros: u64) {
        self.update(|g| {
            if let Some(s) = g {
                s.primary_flush_lsn = Some(primary_flush);
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
