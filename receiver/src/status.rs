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
}

/// Shared, cheap-to-clone status of one receiver.
#[derive(Clone, Debug, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<Option<SenderStatus>>>,
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
    }

    pub fn durable(&self, lsn: Lsn) {
        self.update(|g| {
            if let Some(s) = g {
                s.durable_lsn = Some(lsn.to_string());
                s.last_durable_unix_micros = Some(now_micros());
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
        StatusFile {
            receiver_pid: std::process::id(),
            written_at_unix_micros: now_micros(),
            sender: self.inner.lock().ok().and_then(|g| g.clone()),
        }
    }

    /// Writes the status file every `every` until `shutdown`, and once more (without a sender) at the end.
    pub async fn run_writer(self, dir: PathBuf, every: Duration, shutdown: CancellationToken) {
        loop {
            write_status(&dir, &self.snapshot());
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
            },
        );
    }
}

fn write_status(dir: &Path, status: &StatusFile) {
    let tmp = dir.join(format!("{STATUS_FILE}.tmp"));
    let result = serde_json::to_vec_pretty(status)
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&tmp, json))
        .and_then(|()| std::fs::rename(&tmp, dir.join(STATUS_FILE)));
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not write {STATUS_FILE}");
    }
}

/// Reads `walship.status` from an archive.
pub fn read_status(dir: &Path) -> Option<StatusFile> {
    serde_json::from_slice(&std::fs::read(dir.join(STATUS_FILE)).ok()?).ok()
}
