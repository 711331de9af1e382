//! A real S3-compatible server for the object-store tests: `s3s-fs` (crates.io), started per test on a free
//! port with its data in the test directory. The harness installs it on first use (`cargo install` of a
//! pinned version into the workspace's `target/tools`, one install at a time across test processes), so
//! `cargo test --workspace` needs nothing installed by hand; a failed install stops with the command to run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Daemon, TestDir};

pub const ACCESS_KEY: &str = "walship-test";
pub const SECRET_KEY: &str = "walship-test-secret";
pub const BUCKET: &str = "wal";

/// The s3s-fs release the tests run against.
const S3S_FS_VERSION: &str = "0.14.1";

/// The s3s-fs binary: `WALSHIP_S3S_FS`, else on PATH, else in ~/.cargo/bin, else the one the harness
/// installs into `target/tools` (installing it first if need be).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WALSHIP_S3S_FS") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    let cargo_bin = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin/s3s-fs"))
        .filter(|p| p.is_file());
    on_path
        .or(cargo_bin)
        .unwrap_or_else(|| install(&tools_dir()))
}

/// `target/tools` of this workspace.
pub(crate) fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("tools")
}

/// Installs s3s-fs into `root` (under a file lock: test binaries run in parallel) unless it is there.
fn install(root: &Path) -> PathBuf {
    let bin = root.join("bin").join("s3s-fs");
    std::fs::create_dir_all(root).expect("create target/tools");
    let lock = std::fs::File::create(root.join(".s3s-fs.lock")).expect("create the install lock");
    lock.lock().expect("take the install lock");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        println!(
            "installing s3s-fs {S3S_FS_VERSION} into {} (once)",
            root.display()
        );
        let status = Command::new(&cargo)
            .args([
                "install",
                "--locked",
                "--quiet",
                "s3s-fs",
                "--features",
                "binary",
            ])
            .args(["--version", S3S_FS_VERSION, "--root"])
            .arg(root)
            .status();
        let ok = matches!(status, Ok(s) if s.success());
        assert!(
            ok && bin.is_file(),
            "the object-store tests need an S3-compatible server, and installing s3s-fs failed ({status:?}): \
             run `cargo install s3s-fs --version {S3S_FS_VERSION} --features binary --locked`, or set \
             WALSHIP_S3S_FS to an s3s-fs binary"
        );
    }
    bin
}

/// A running s3s-fs; stopped on drop.
pub struct S3Server {
    pub port: u16,
    pub root: PathBuf,
    daemon: Option<Daemon>,
    binary: PathBuf,
}

impl S3Server {
    /// Starts a server with one bucket, [`BUCKET`], its files under `dir`/`name`.
    pub fn start(dir: &TestDir, name: &str) -> S3Server {
        let binary = binary();
        // the server runs as the database user (like everything the harness starts); copy it where that user
        // can run it
        let local = dir.path().join("s3s-fs");
        std::fs::copy(&binary, &local).expect("copy s3s-fs");
        crate::env::chown_to_db_user(&local);
        let root = dir.subdir(name);
        let bucket = root.join(BUCKET);
        std::fs::create_dir_all(&bucket).expect("create bucket");
        crate::env::chown_to_db_user(&bucket);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut s = S3Server {
            port,
            root,
            daemon: None,
            binary: local,
        };
        s.resume(dir);
        s
    }

    /// Starts the server (again), on the same port and files; waits until it accepts connections.
    pub fn resume(&mut self, dir: &TestDir) {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root);
        self.daemon = Some(Daemon::spawn(dir, "s3s-fs", cmd));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (kill -9: an outage).
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
    }

    /// `s3://wal/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment a client of this server needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            (
                "AWS_ENDPOINT_URL".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// The stored bytes of object `key` in the bucket, as the server keeps them (None: not there).
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(BUCKET).join(key)).ok()
    }

    /// The names of the objects directly under `prefix`, sorted.
    pub fn objects(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join(BUCKET).join(prefix))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}
