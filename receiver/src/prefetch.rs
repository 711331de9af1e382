//! Fetching ahead from the object store while recovery replays. `restore` is one process per file, so after it
//! takes a segment from the store it starts `walship-receiver prefetch` in the background (as pgBackRest's
//! asynchronous archive-get and WAL-G's prefetch do): that process downloads the next segments into
//! `<archive>/prefetch/`, decompressed and checked, at most `--count` of them, and exits. The next `restore`
//! calls find them there. One prefetcher runs at a time (a lock in the spool); the spool never holds more than
//! the window ahead of what recovery asked for last.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use futures::StreamExt;
use walship_protocol::wal::{segment_file_name, WalFileName};

use crate::archive::Identity;
use crate::store::Store;

/// The spool directory inside the archive.
pub const SPOOL_DIR: &str = "prefetch";
/// Downloads in flight at once.
const PARALLEL: usize = 4;

pub fn spool(archive: &Path) -> PathBuf {
    archive.join(SPOOL_DIR)
}

/// Starts a prefetcher for the `count` segments after `after` (a segment name) in the background. Failing to
/// start one only costs speed: it is logged, never an error.
pub fn start(archive: &Path, url: &str, after: &str, count: usize) {
    if count == 0 {
        return;
    }
    use std::os::unix::process::CommandExt;
    let spawned = std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .arg("prefetch")
            .arg("--archive")
            .arg(archive)
            .arg("--object-store")
            .arg(url)
            .arg("--after")
            .arg(after)
            .arg("--count")
            .arg(count.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // its errors go where restore's go (PostgreSQL's log)
            .process_group(0)
            .spawn()
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the prefetcher: {e}; segments come from the store one by one");
    }
}

/// The prefetcher: fetches the `count` segments after segment `after` of the same timeline that are neither
/// in the archive nor in the spool, and removes what recovery has gone past. Returns how many it fetched.
pub async fn run(archive: &Path, store: &Store, after: &str, count: usize) -> Result<usize> {
    let id = crate::archive::ensure_archive(archive)?;
    let seg = id.wal_segment_size;
    let (timeline, segno) = match WalFileName::parse(after, seg) {
        Ok(WalFileName::Segment { timeline, segno }) => (timeline, segno),
        _ => anyhow::bail!("--after {after:?} is not a WAL segment name"),
    };
    let dir = spool(archive);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let lock_path = dir.join(".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        return Ok(0); // another prefetcher is at work
    }
    // what recovery has gone past, and downloads a killed prefetcher left unfinished
    for entry in fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
        let Ok(entry) = entry else { continue };
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.ends_with(".tmp") || (!name.starts_with('.') && name.as_str() <= after) {
            let _ = fs::remove_file(entry.path());
        }
    }
    let wanted: Vec<String> = (1..=count as u64)
        .map(|i| segment_file_name(timeline, segno + i, seg))
        .filter(|n| !archive.join(n).exists() && !dir.join(n).exists())
        .collect();
    let fetched = futures::stream::iter(wanted.into_iter().map(|name| {
        let dir = &dir;
        async move {
            match fetch(store, &id, dir, &name).await {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(file = %name, "prefetch: {e:#}");
                    false
                }
            }
        }
    }))
    .buffer_unordered(PARALLEL)
    .filter(|got| std::future::ready(*got))
    .count()
    .await;
    drop(lock);
    Ok(fetched)
}

/// Downloads segment `name` into the spool (written under a temporary name, renamed once complete and
/// checked, fsynced). `false` when the store does not hold it (yet).
async fn fetch(store: &Store, id: &Identity, dir: &Path, name: &str) -> Result<bool> {
    let Some(raw) = store.get(name).await? else {
        return Ok(false);
    };
    anyhow::ensure!(
        raw.len() as u64 == id.wal_segment_size.as_u64(),
        "{}/{name}: {} bytes, a segment has {}",
        store.url(),
        raw.len(),
        id.wal_segment_size.as_u64()
    );
    let tmp = dir.join(format!("{name}.tmp"));
    // durable before it has its name: a spooled segment torn by a crash of this host would read as the end of
    // WAL to recovery
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("create {}", tmp.display()))?;
    use tokio::io::AsyncWriteExt;
    f.write_all(&raw)
        .await
        .with_context(|| format!("write {}", tmp.display()))?;
    f.sync_all()
        .await
        .with_context(|| format!("fsync {}", tmp.display()))?;
    tokio::fs::rename(&tmp, dir.join(name))
        .await
        .with_context(|| format!("rename {}", tmp.display()))?;
    Ok(true)
}
