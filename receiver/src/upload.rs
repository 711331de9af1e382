//! The uploader (`--object-store`): every complete segment and history file goes to the store once it is
//! durable locally, in order, a bounded number at a time, retried with backoff; the partial segment every
//! `--partial-upload-interval` and at shutdown. Progress is kept in `walship.uploaded` in the archive: its
//! presence tells `cleanup` that the archive has a store, and it never removes a segment beyond it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use walship_protocol::wal::{segment_file_name, WalFileName};

use crate::archive::{list_segments, read_positions, Identity, ID_FILE};
use crate::durable::replace as write_atomically;
use crate::store::Store;

/// What has reached the store (written crash-safely after each upload).
pub const UPLOAD_FILE: &str = "walship.uploaded";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadState {
    /// The store's URL.
    pub store: String,
    /// Every complete segment up to this one (by name) is in the store.
    pub segments_up_to: Option<String>,
    /// History files in the store.
    pub history: Vec<String>,
}

/// The archive's upload state, when it has a store.
pub fn read_state(dir: &Path) -> Option<UploadState> {
    let text = std::fs::read_to_string(dir.join(UPLOAD_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_state(dir: &Path, state: &UploadState) -> Result<()> {
    let text = serde_json::to_string_pretty(state).context("encode the upload state")?;
    write_atomically(dir, UPLOAD_FILE, text.as_bytes())
}

/// Whether complete segment `name` is in the store (or the archive has no store).
pub fn uploaded(state: Option<&UploadState>, name: &str) -> bool {
    match state {
        None => true,
        Some(s) => s
            .segments_up_to
            .as_deref()
            .is_some_and(|up_to| name <= up_to),
    }
}

/// Before the archive opens: the local archive and the store must belong to one cluster. A new local archive
/// takes the store's identity (so that a sender of another cluster is refused at once); a local identity is
/// written to an empty store. Marks the archive as having a store.
pub async fn prepare(store: &Store, dir: &Path) -> Result<()> {
    let local = Identity::load(dir)?;
    let remote = match &local {
        // compared without reading it where it is encrypted and this receiver holds only the public key
        Some(l) => match store.identity_is(l).await? {
            Some(true) => Some(*l),
            Some(false) => bail!(
                "the archive {} belongs to the cluster with system identifier {}, the object store {} holds \
                 another cluster's walship.id: one store prefix per cluster",
                dir.display(),
                l.system_identifier,
                store.url()
            ),
            None => None,
        },
        None => store.identity().await.context(
            "the new archive takes the object store's identity, which is encrypted: give the receiver the \
             identity file once (--store-identity), or start with a copy of the archive's walship.id",
        )?,
    };
    match (&local, &remote) {
        (Some(l), Some(r)) if l != r => bail!(
            "the archive {} belongs to the cluster with system identifier {}, the object store {} to {}: one \
             store prefix per cluster",
            dir.display(),
            l.system_identifier,
            store.url(),
            r.system_identifier
        ),
        (None, Some(r)) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            write_atomically(dir, ID_FILE, r.render().as_bytes())?;
            tracing::info!(
                system_identifier = r.system_identifier,
                "the archive takes the identity of the object store {}",
                store.url()
            );
        }
        (Some(l), None) => store.pin(l).await?,
        _ => {}
    }
    if read_state(dir).is_none() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        write_state(
            dir,
            &UploadState {
                store: store.url().to_owned(),
                ..Default::default()
            },
        )?;
    }
    Ok(())
}

pub struct Uploader {
    pub store: Store,
    pub dir: PathBuf,
    pub partial_interval: Duration,
    /// Told by the archive when a segment or history file is complete and durable.
    pub wake: std::sync::Arc<tokio::sync::Notify>,
}

/// Without a word from the archive, the directory is looked at this often anyway (files that arrived by
/// other ways: an archive reopened, a segment restored by hand).
const RESCAN: Duration = Duration::from_secs(10);

impl Uploader {
    /// Uploads until `shutdown`, then once more (the partial too).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut pinned = false;
        let mut backoff =
            walship_daemon::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut partial_at = Instant::now();
        let mut failing = false;
        loop {
            let stopping = shutdown.is_cancelled();
            let partial_due = stopping || partial_at.elapsed() >= self.partial_interval;
            match self.pass(&mut pinned, partial_due).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("object store {}: uploads resumed", self.store.url());
                    }
                    failing = false;
                    backoff.reset();
                    if partial_due {
                        partial_at = Instant::now();
                    }
                }
                Err(e) => {
                    crate::metrics::METRICS
                        .errors
                        .get_or_create(&crate::metrics::Kind { kind: "store" })
                        .inc();
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        "object store {}: {e:#}; the local archive keeps everything, retrying in {:.1} s",
                        self.store.url(),
                        wait.as_secs_f64()
                    );
                    failing = true;
                    if stopping {
                        return;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            if stopping {
                return;
            }
            // until the archive completes something, the partial is due, or the rescan
            let partial_in = self.partial_interval.saturating_sub(partial_at.elapsed());
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(partial_in.min(RESCAN)) => {}
            }
        }
    }

    /// One round: the identity, new history files, new complete segments in order, the partial if due.
    async fn pass(&self, pinned: &mut bool, partial_due: bool) -> Result<()> {
        let dir = &self.dir;
        let Some(id) = Identity::load(dir)? else {
            return Ok(()); // no sender yet
        };
        if !*pinned {
            self.store.pin(&id).await?;
            *pinned = true;
        }
        let seg = id.wal_segment_size;
        let mut state = read_state(dir).unwrap_or_else(|| UploadState {
            store: self.store.url().to_owned(),
            ..Default::default()
        });
        // history files first: recovery needs them before the segments of their timeline
        let mut histories: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("list {}", dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| matches!(WalFileName::parse(n, seg), Ok(WalFileName::History { .. })))
            .filter(|n| !state.history.contains(n))
            .collect();
        histories.sort();
        for name in histories {
            let raw = tokio::fs::read(dir.join(&name))
                .await
                .with_context(|| format!("read {name}"))?;
            self.store.put_once(&name, &raw).await?;
            state.history.push(name);
            write_state(dir, &state)?;
        }
        // complete segments after the watermark, in order; at most 64 MB in memory
        let pending: Vec<String> = list_segments(dir, seg)?
            .into_iter()
            .filter(|s| s.complete)
            .map(|s| segment_file_name(s.timeline, s.segno, seg))
            .filter(|n| !uploaded(Some(&state), n))
            .collect();
        let at_once = ((64u64 << 20) / u64::from(seg.bytes())).clamp(1, 8) as usize;
        let store = &self.store;
        let mut uploads = futures::stream::iter(pending.into_iter().map(|name| async move {
            let raw = tokio::fs::read(dir.join(&name))
                .await
                .with_context(|| format!("read {name}"))?;
            store.put_once(&name, &raw).await?;
            Ok::<_, anyhow::Error>(name)
        }))
        .buffered(at_once);
        while let Some(name) = uploads.try_next().await? {
            // its partial object is superseded (best effort: a leftover is replaced by the next partial)
            let _ = store.delete(&format!("{name}.partial")).await;
            state.segments_up_to = Some(name);
            write_state(dir, &state)?;
            crate::metrics::METRICS.store_segments_uploaded.inc();
        }
        if partial_due {
            self.upload_partial(seg).await?;
        }
        Ok(())
    }

    /// The durable part of the current partial segment.
    async fn upload_partial(&self, seg: walship_protocol::WalSegSize) -> Result<()> {
        let dir = &self.dir;
        let Some(last) = list_segments(dir, seg)?.pop() else {
            return Ok(());
        };
        if last.complete {
            return Ok(());
        }
        let start = seg.segment_start(last.segno);
        let durable = read_positions(dir)
            .filter(|p| p.timeline == last.timeline)
            .map_or(0, |p| p.durable.0.saturating_sub(start.0));
        let len = durable.min(last.size) as usize;
        if len == 0 {
            return Ok(());
        }
        let name = format!(
            "{}.partial",
            segment_file_name(last.timeline, last.segno, seg)
        );
        let mut raw = tokio::fs::read(dir.join(&name))
            .await
            .with_context(|| format!("read {name}"))?;
        raw.truncate(len);
        self.store.put_replace(&name, &raw).await
    }
}

/// How many of `segments` (complete or not) wait for the store (for `status` and the metrics).
pub fn waiting(
    state: &UploadState,
    segments: &[crate::archive::ArchivedSegment],
    seg: walship_protocol::WalSegSize,
) -> usize {
    segments
        .iter()
        .filter(|s| s.complete)
        .filter(|s| !uploaded(Some(state), &segment_file_name(s.timeline, s.segno, seg)))
        .count()
}
