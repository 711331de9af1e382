//! Temp directories the database user can use, and running commands as that user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The OS user PostgreSQL and the walship daemons run as when the tests run as root.
pub const DB_USER: &str = "postgres";

/// Whether this process runs as root (from `/proc/self`, no unsafe code needed).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// `(uid, gid)` of `user` from /etc/passwd.
pub fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// The uid/gid to run servers and daemons as: the `postgres` user when root, else ourselves (`None`).
pub fn db_user() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    Some(lookup_user(DB_USER).unwrap_or_else(|| {
        panic!(
            "the tests run as root, and PostgreSQL refuses to run as root, but there is no `{DB_USER}` user to run it as. \
             Fix: apt-get install -y postgresql (creates the user), or useradd --system {DB_USER}"
        )
    }))
}

/// Makes `cmd` run as the database user when the tests run as root.
pub fn as_db_user(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = db_user() {
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", "/tmp")
            .env("USER", DB_USER);
    }
    cmd
}

/// Gives `path` to the database user (when root).
pub fn chown_to_db_user(path: &Path) {
    if let Some((uid, gid)) = db_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A per-test directory owned by the database user, under the system temp dir (which every user can enter).
/// It is removed on drop, unless the test failed: then its path is printed and it is kept for inspection.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        TestDir::new_in(name, &std::env::temp_dir())
    }

    /// Like [`TestDir::new`], under `parent` (which the database user must be able to enter).
    pub fn new_in(name: &str, parent: &Path) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("walship-{name}-"))
            .tempdir_in(parent)
            .expect("create test directory");
        let path = dir.path().to_owned();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .expect("chmod test dir");
        chown_to_db_user(&path);
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory owned by the database user.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).expect("create subdir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).expect("chmod subdir");
        chown_to_db_user(&p);
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let keep = std::env::var_os("WALSHIP_KEEP").is_some();
        if std::thread::panicking() || keep {
            if let Some(d) = self.dir.take() {
                let kept = d.keep();
                let why = if keep {
                    "WALSHIP_KEEP is set"
                } else {
                    "test failed"
                };
                eprintln!("{why}: its files are kept in {}", kept.display());
            }
        }
    }
}

/// Runs `f` again while it fails with ETXTBSY ("text file busy"): a binary just copied into a test directory
/// can still be open for writing in a child that another test thread forked and has not exec'd yet.
pub fn retry_busy<T>(mut f: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(26) && tries < 100 => {
                tries += 1;
                std::thread::park_timeout(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}
