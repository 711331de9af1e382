//! The walship binaries, copied where the database user can run them, and daemons started from them.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::env::{as_db_user, chown_to_db_user, TestDir};

/// The cargo target directory of this test binary (`target/debug`).
fn build_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("WALSHIP_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // a binary in target/debug, or a test in target/debug/deps
    let dir = exe.parent().expect("exe dir");
    if dir.join(Walship::SENDER).exists() {
        return dir.to_owned();
    }
    dir.parent().expect("target dir").to_owned()
}

/// Builds the daemons next to the running binary (`cargo build -p walship-sender -p walship-receiver
/// --bins`, `--release` when the caller is a release build), so that tools run through cargo (the demo, the
/// bench) never use stale daemons. The test suite does not call it: `cargo test --workspace` builds them.
pub fn build_daemons() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let release = std::env::current_exe()?
        .components()
        .any(|c| c.as_os_str() == "release");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "--manifest-path",
        manifest,
        "-p",
        "walship-sender",
        "-p",
        "walship-receiver",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    anyhow::ensure!(
        cmd.status()?.success(),
        "building walship-sender and walship-receiver failed"
    );
    Ok(())
}

/// The walship binaries, copied into a test directory (CI's checkout may sit where `postgres` cannot enter).
#[derive(Clone, Debug)]
pub struct Walship {
    pub bin_dir: PathBuf,
}

impl Walship {
    pub const SENDER: &'static str = "walship-sender";
    pub const RECEIVER: &'static str = "walship-receiver";

    pub fn install(dir: &TestDir) -> Walship {
        let from = build_dir();
        let bin_dir = dir.subdir("bin");
        for name in [Self::SENDER, Self::RECEIVER] {
            let src = from.join(name);
            assert!(
                src.exists(),
                "{} not found: build the daemons first (`cargo test --workspace` builds them; or set WALSHIP_BIN_DIR)",
                src.display()
            );
            let dst = bin_dir.join(name);
            std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            chown_to_db_user(&dst);
        }
        Walship { bin_dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Runs `walship-receiver certs --out <dir>/<name>` as the database user; returns the directory.
    pub fn certs(&self, dir: &TestDir, name: &str) -> PathBuf {
        let out = dir.path().join(name);
        crate::cluster::run_ok(
            Command::new(self.path(Self::RECEIVER))
                .arg("certs")
                .arg("--out")
                .arg(&out),
        );
        out
    }

    /// Starts `walship-receiver run` on 127.0.0.1:`port` (0: any) and waits until it listens.
    pub fn receiver(&self, dir: &TestDir, archive: &Path, certs: &Path, port: u16) -> Daemon {
        self.receiver_with(dir, archive, certs, port, &[], &[])
    }

    /// [`Walship::receiver`] with extra flags and environment (e.g. `FAILPOINTS`).
    pub fn receiver_with(
        &self,
        dir: &TestDir,
        archive: &Path,
        certs: &Path,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut cmd = Command::new(self.path(Self::RECEIVER));
        cmd.envs(env.iter().copied());
        cmd.arg("run")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--archive")
            .arg(archive)
            .arg("--tls-cert")
            .arg(certs.join("server.crt"))
            .arg("--tls-key")
            .arg(certs.join("server.key"))
            .arg("--tls-client-ca")
            .arg(certs.join("ca.crt"))
            .args(extra);
        let mut d = Daemon::spawn(dir, "receiver", cmd);
        let line = d.wait_for_log("listening on", Duration::from_secs(30));
        let addr = line
            .rsplit("listening on ")
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        d.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        d
    }

    /// Starts `walship-sender run` against `conninfo`, shipping to 127.0.0.1:`port`, authenticated with the
    /// CA of `ca_dir` and the client certificate of `client_dir`.
    pub fn sender(
        &self,
        dir: &TestDir,
        conninfo: &str,
        port: u16,
        ca_dir: &Path,
        client_dir: &Path,
        extra: &[&str],
    ) -> Daemon {
        self.sender_with(dir, conninfo, port, ca_dir, client_dir, extra, &[])
    }

    /// [`Walship::sender`] with environment (e.g. `FAILPOINTS`).
    #[allow(clippy::too_many_arguments)]
    pub fn sender_with(
        &self,
        dir: &TestDir,
        conninfo: &str,
        port: u16,
        ca_dir: &Path,
        client_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut cmd = self.sender_command(conninfo, port, ca_dir, client_dir, extra);
        cmd.envs(env.iter().copied());
        Daemon::spawn(dir, "sender", cmd)
    }

    /// The command line of [`Walship::sender`], not started (to run it under a wrapper such as `unshare`).
    pub fn sender_command(
        &self,
        conninfo: &str,
        port: u16,
        ca_dir: &Path,
        client_dir: &Path,
        extra: &[&str],
    ) -> Command {
        let mut cmd = Command::new(self.path(Self::SENDER));
        cmd.arg("run")
            .args(["--pgconn", conninfo])
            .args(["--receiver", &format!("127.0.0.1:{port}")])
            .args(["--tls-server-name", "localhost"])
            .arg("--tls-ca")
            .arg(ca_dir.join("ca.crt"))
            .arg("--tls-cert")
            .arg(client_dir.join("client.crt"))
            .arg("--tls-key")
            .arg(client_dir.join("client.key"))
            .args(["--poll-ms", "50"])
            .args(extra);
        cmd
    }
}

/// A daemon child process, run as the database user, logging to a file. Killed on drop; its log is printed
/// if the test failed.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    /// The port a receiver listens on.
    pub port: u16,
}

impl Daemon {
    pub fn spawn(dir: &TestDir, name: &str, mut cmd: Command) -> Daemon {
        let mut n = 0;
        let log = loop {
            let p = dir.path().join(format!("{name}-{n}.log"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let out = File::create(&log).expect("create log");
        chown_to_db_user(&log);
        let err = out.try_clone().expect("clone log handle");
        cmd.stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null())
            // WALSHIP_TEST_LOG: another filter for the daemons' logs (a test or bench being investigated)
            .env(
                "WALSHIP_LOG",
                std::env::var("WALSHIP_TEST_LOG").unwrap_or_else(|_| "info,walship=debug".into()),
            );
        as_db_user(&mut cmd);
        let child =
            crate::env::retry_busy(|| cmd.spawn()).unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        Daemon {
            name: format!("{name}-{n}"),
            child: Some(child),
            log,
            port: 0,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a log line contains `pattern`; returns that line. Panics (with the log) on timeout or if
    /// the process exits first.
    pub fn wait_for_log(&mut self, pattern: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_text().lines().find(|l| l.contains(pattern)) {
                return line.to_owned();
            }
            if let Some(status) = self.try_status() {
                panic!(
                    "{} exited ({status}) before logging {pattern:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {pattern:?} within {timeout:?}:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// The process id (0 once it was reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Resident memory of the process in KiB (VmRSS), 0 if it is gone.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// For a receiver: how many sessions it has seen end, cleanly or not. It logs the end only after its
    /// writer has made everything received durable.
    pub fn sessions_ended(&self) -> usize {
        let log = self.log_text();
        log.matches("session ended").count() + log.matches("closing connection").count()
    }

    /// Stops this sender (SIGTERM) and waits until `receiver` has no session open: it logs a session's end
    /// only after its writer has applied and fsynced everything received, so then the archive is final.
    pub fn stop_sender_of(&mut self, receiver: &Daemon) -> ExitStatus {
        let status = self.terminate(Duration::from_secs(10));
        let open =
            || receiver.log_text().matches("sender accepted").count() > receiver.sessions_ended();
        let deadline = Instant::now() + Duration::from_secs(30);
        while open() {
            assert!(
                Instant::now() < deadline,
                "{} still had a session open 30 s after {} stopped:\n{}",
                receiver.name,
                self.name,
                receiver.log_text()
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
        status
    }

    /// SIGHUP (reload the TLS files).
    pub fn hangup(&self) {
        let pid = self.child.as_ref().map(|c| c.id()).expect("daemon running");
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP {pid}");
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.child.as_ref().map(|c| c.id()).expect("daemon running");
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        self.wait_exit(timeout)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.name, self.log_text());
        }
        self.kill9();
    }
}
