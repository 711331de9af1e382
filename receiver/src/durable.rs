//! Crash-safe file writing: the one place the receiver makes files durable. A file replaced here holds its
//! old content or its new one after a crash, never a mix; an fsync error names the file.
//!
//! - [`replace`] / [`replace_all`]: write under a temporary name, fsync, rename over the old file, fsync the
//!   directory (identity, history files, positions, failover and upload state, certificates).
//! - [`replace_unsynced`]: the same without fsyncs, for reports rewritten every second whose loss costs
//!   nothing (`walship.status`): atomic, not durable.
//! - [`sync_file`], [`sync_dir`]: fsync of a file or a directory, with the failpoints the fault tests use.
//!
//! Leftover temporary files are named `<name>.tmp` (`.<name>.tmp` for [`replace_all`]); the archive removes
//! them when it opens.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Replaces `dir/name` with `content` durably (mode 0600).
pub fn replace(dir: &Path, name: &str, content: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    write_synced(&tmp, content, 0o600)?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// Replaces several files of `dir` (mode `mode`) so that either all of them are written or, when writing
/// one fails, none is touched; then fsyncs the directory.
pub fn replace_all(dir: &Path, files: &[(&str, &[u8])], mode: u32) -> Result<()> {
    let temp = |name: &str| dir.join(format!(".{name}.tmp"));
    let written = files
        .iter()
        .try_for_each(|(name, content)| write_synced(&temp(name), content, mode));
    if let Err(e) = written {
        for (name, _) in files {
            let _ = std::fs::remove_file(temp(name));
        }
        return Err(e.context("nothing was written"));
    }
    for (name, _) in files {
        std::fs::rename(temp(name), dir.join(name))
            .with_context(|| format!("rename into {}", dir.join(name).display()))?;
    }
    sync_dir(dir)
}

/// Replaces `dir/name` atomically but without fsync (mode 0600): after a crash it may hold the old content.
pub fn replace_unsynced(dir: &Path, name: &str, content: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = options(0o600).open(&tmp)?;
    f.write_all(content)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Writes `content` to a new `path` and fsyncs it.
fn write_synced(path: &PathBuf, content: &[u8], mode: u32) -> Result<()> {
    let mut f = options(mode)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(content)
        .with_context(|| format!("write {}", path.display()))?;
    sync_file(&f, path, true)
}

fn options(mode: u32) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true).mode(mode);
    o
}

/// `fdatasync` (or `fsync` with `all`) of `file`, naming `path` in the error.
pub fn sync_file(file: &File, path: &Path, all: bool) -> Result<()> {
    fail::fail_point!("archive-fsync", |_| Err(injected_eio())
        .with_context(|| format!("fsync {}", path.display())));
    sync_file_io(file, path, all)
}

/// [`sync_file`] without its failpoint, for callers with a failpoint of their own (the spare's preallocation
/// runs on its own thread: sharing `archive-fsync` would let it take a failure meant for the archive).
pub(crate) fn sync_file_io(file: &File, path: &Path, all: bool) -> Result<()> {
    if all {
        file.sync_all()
    } else {
        file.sync_data()
    }
    .with_context(|| format!("fsync {}", path.display()))
}

/// Fsyncs the directory `path` (names created or renamed in it).
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = File::open(path).with_context(|| format!("open directory {}", path.display()))?;
    sync_dir_handle(&dir, path)
}

/// [`sync_dir`] through an open handle of the directory.
pub fn sync_dir_handle(dir: &File, path: &Path) -> Result<()> {
    fail::fail_point!("archive-fsync-dir", |_| Err(injected_eio())
        .with_context(|| format!("fsync directory {}", path.display())));
    dir.sync_all()
        .with_context(|| format!("fsync directory {}", path.display()))
}

/// The error a failpoint injects for a failed fsync (tests only).
#[allow(dead_code)]
pub(crate) fn injected_eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_leaves_the_new_content_and_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        replace(d.path(), "f", b"one").unwrap();
        replace(d.path(), "f", b"two").unwrap();
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"two");
        assert!(!d.path().join("f.tmp").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn replace_all_touches_nothing_when_one_file_cannot_be_written() {
        let d = tempfile::tempdir().unwrap();
        replace_all(d.path(), &[("a", b"old"), ("b", b"old")], 0o600).unwrap();
        // a name that cannot be created (its parent does not exist)
        let err =
            replace_all(d.path(), &[("a", b"new"), ("missing/b", b"new")], 0o600).unwrap_err();
        assert!(
            format!("{err:#}").contains("nothing was written"),
            "{err:#}"
        );
        assert_eq!(std::fs::read(d.path().join("a")).unwrap(), b"old");
        assert!(!d.path().join(".a.tmp").exists());
    }
}
