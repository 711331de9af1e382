//! Fetching ahead from the object store while recovery replays. `restore` is one process per file, so after it
//! takes a segment from the store it starts `walship-receiver prefetch` in the background (as pgBackRest's
//! asynchronous archive-get and WAL-G's prefetch do): that process downloads the next segments into
//! `<archive>/prefetch/`, decompressed and checked, at most `--count` of them, and exits. The next `restore`
//! calls find them there. One prefetcher runs at a time (a lock in the spool); the spool never holds more than
//! the window ahead of what recovery asked for last.
//!
//! Spooled files are not fsynced (an fsync of 16 MB costs as much as replaying it on a small machine): the
//! spool records the kernel's boot id, and a spool from another boot (a crash of the host could have torn
//! what was in the page cache) is never used and is emptied by the next prefetcher. Where the boot id cannot
//! be read, every file is fsynced before it gets its name.

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
/// Held by the running prefetcher.
const LOCK_FILE: &str = ".lock";
/// Downloads in flight at once.
const PARALLEL: usize = 4;

pub fn spool(archive: &Path) -> PathBuf {
    archive.join(SPOOL_DIR)
}

/// Starts a prefetcher for the `count` segments after `after` (a segment name) in the background. Failing to
/// start one only costs speed: it is logged, never an error.
pub fn start(archive: &Path, store: &crate::store::StoreSpec, after: &str, count: usize) {
    if count == 0 {
        return;
    }
    // a running prefetcher reads where recovery is from the spool and goes on from there (a hint: no fsync;
    // the prefetcher ignores anything but a whole segment name)
    let dir = spool(archive);
    if fs::create_dir_all(&dir).is_ok()
        && fs::write(dir.join(WANTED_FILE), after).is_ok()
        && prefetcher_running(&dir)
    {
        return;
    }
    use std::os::unix::process::CommandExt;
    let spawned = std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .arg("prefetch")
            .arg("--archive")
            .arg(archive)
            .arg("--object-store")
            .arg(&store.url)
            // the store's settings as the child's environment (never its command line)
            .envs(store.environment())
            .envs(
                store
                    .identity_file
                    .as_ref()
                    .map(|f| ("WALSHIP_STORE_IDENTITY", f.as_os_str())),
            )
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

/// Where recovery is, as `restore` records it for a running prefetcher.
const WANTED_FILE: &str = ".wanted";
/// A prefetcher with nothing to do waits this long for recovery to move before it exits.
const IDLE: std::time::Duration = std::time::Duration::from_secs(2);

/// The prefetcher: keeps the `count` segments after the one recovery took last (`after`, then what `restore`
/// records in the spool) in the spool, fetching what is neither in the archive nor in the spool and removing
/// what recovery has gone past; exits when recovery has not moved for a while. Returns how many it fetched.
pub async fn run(archive: &Path, store: &Store, after: &str, count: usize) -> Result<usize> {
    let id = crate::archive::ensure_archive(archive)?;
    let dir = spool(archive);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        return Ok(0); // another prefetcher is at work
    }
    let boot = boot_id();
    if !trusted(archive) {
        // another boot's spool (or none yet): start afresh
        for entry in fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
            let Ok(entry) = entry else { continue };
            if entry.file_name() != LOCK_FILE && entry.file_name() != WANTED_FILE {
                let _ = fs::remove_file(entry.path());
            }
        }
        let mark = dir.join(BOOT_FILE);
        fs::write(&mark, boot.as_deref().unwrap_or(UNKNOWN_BOOT))
            .with_context(|| format!("write {}", mark.display()))?;
    }
    let sync = boot.is_none();
    let mut fetched = 0;
    let mut after = after.to_owned();
    loop {
        fetched += round(archive, store, &id, &dir, &after, count, sync).await?;
        // wait for recovery to move on (restore records it), at most IDLE
        let idle_until = std::time::Instant::now() + IDLE;
        let next = loop {
            let wanted = fs::read_to_string(dir.join(WANTED_FILE)).unwrap_or_default();
            if wanted.len() == 24 && wanted.as_str() > after.as_str() {
                break Some(wanted);
            }
            if std::time::Instant::now() > idle_until {
                break None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    drop(lock);
    Ok(fetched)
}

/// One round: the `count` segments after `after`.
async fn round(
    archive: &Path,
    store: &Store,
    id: &Identity,
    dir: &Path,
    after: &str,
    count: usize,
    sync: bool,
) -> Result<usize> {
    let seg = id.wal_segment_size;
    let (timeline, segno) = match WalFileName::parse(after, seg) {
        Ok(WalFileName::Segment { timeline, segno }) => (timeline, segno),
        _ => anyhow::bail!("{after:?} is not a WAL segment name"),
    };
    // what recovery has gone past, and downloads a killed prefetcher left unfinished
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
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
    let fetched = futures::stream::iter(wanted.into_iter().map(|name| async move {
        match fetch(store, id, dir, &name, sync).await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(file = %name, "prefetch: {e:#}");
                false
            }
        }
    }))
    .buffer_unordered(PARALLEL)
    .filter(|got| std::future::ready(*got))
    .count()
    .await;
    Ok(fetched)
}

/// Downloads segment `name` into the spool (written under a temporary name, renamed once complete and
/// checked, fsynced). `false` when the store does not hold it (yet).
async fn fetch(store: &Store, id: &Identity, dir: &Path, name: &str, sync: bool) -> Result<bool> {
    // the temporary file is there from the start: a restore call wanting this segment waits for it
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("create {}", tmp.display()))?;
    let fetched = fetch_into(store, id, &mut f, &tmp, name, sync).await;
    drop(f);
    match fetched {
        Ok(true) => tokio::fs::rename(&tmp, dir.join(name))
            .await
            .map(|()| true)
            .with_context(|| format!("rename {}", tmp.display())),
        other => {
            let _ = tokio::fs::remove_file(&tmp).await;
            other
        }
    }
}

async fn fetch_into(
    store: &Store,
    id: &Identity,
    f: &mut tokio::fs::File,
    tmp: &Path,
    name: &str,
    sync: bool,
) -> Result<bool> {
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
    use tokio::io::AsyncWriteExt;
    f.write_all(&raw)
        .await
        .with_context(|| format!("write {}", tmp.display()))?;
    f.flush()
        .await
        .with_context(|| format!("write {}", tmp.display()))?;
    if sync {
        // no boot id to tell a torn spool by: durable before it has its name
        f.sync_all()
            .await
            .with_context(|| format!("fsync {}", tmp.display()))?;
    }
    Ok(true)
}

/// The spool's record of the boot it was written in.
const BOOT_FILE: &str = ".boot";
const UNKNOWN_BOOT: &str = "unknown";

/// The kernel's id of this boot.
fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Whether the spool of `archive` was written in this boot (so nothing in it can be torn by a crash).
pub fn trusted(archive: &Path) -> bool {
    let current = boot_id();
    fs::read_to_string(spool(archive).join(BOOT_FILE))
        .is_ok_and(|b| b == current.as_deref().unwrap_or(UNKNOWN_BOOT))
}

/// Whether a prefetcher is at work in `dir` (it holds the spool's lock).
fn prefetcher_running(dir: &Path) -> bool {
    let Ok(lock) = fs::File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    match lock.try_lock_shared() {
        Ok(()) => false,
        Err(fs::TryLockError::WouldBlock) => true,
        Err(fs::TryLockError::Error(_)) => false,
    }
}

/// Waits (at most `limit`) while a running prefetcher downloads segment `name`.
pub fn await_in_flight(archive: &Path, name: &str, limit: std::time::Duration) {
    let dir = spool(archive);
    let tmp = dir.join(format!("{name}.tmp"));
    let deadline = std::time::Instant::now() + limit;
    while tmp.exists()
        && !dir.join(name).exists()
        && prefetcher_running(&dir)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Moves a spooled segment to `dest` (renamed, or copied across file systems); `false` when it is not
/// spooled.
pub fn take(archive: &Path, spooled: &Path, dest: &Path) -> std::io::Result<bool> {
    if !trusted(archive) {
        return Ok(false);
    }
    match fs::rename(spooled, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            fs::copy(spooled, dest)?;
            fs::remove_file(spooled)?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spool_of_another_boot_is_never_taken() {
        let archive = tempfile::tempdir().unwrap();
        let dir = spool(archive.path());
        fs::create_dir_all(&dir).unwrap();
        let spooled = dir.join("000000010000000000000003");
        let dest = archive.path().join("RECOVERYXLOG");
        fs::write(&spooled, b"wal").unwrap();
        // no boot recorded, or another boot's: left alone
        assert!(!take(archive.path(), &spooled, &dest).unwrap());
        fs::write(dir.join(BOOT_FILE), "another-boot").unwrap();
        assert!(!take(archive.path(), &spooled, &dest).unwrap());
        assert!(spooled.exists() && !dest.exists());
        // this boot's: moved
        fs::write(
            dir.join(BOOT_FILE),
            boot_id().unwrap_or(UNKNOWN_BOOT.into()),
        )
        .unwrap();
        assert!(take(archive.path(), &spooled, &dest).unwrap());
        assert!(!spooled.exists());
        assert_eq!(fs::read(&dest).unwrap(), b"wal");
        assert!(!take(archive.path(), &spooled, &dest).unwrap());
    }
}
