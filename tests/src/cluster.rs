//! Real PostgreSQL clusters for tests: initdb, pg_ctl, pgbench, SQL over tokio-postgres.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use walship_protocol::Lsn;

use crate::env::{as_db_user, TestDir};

/// The directory with PostgreSQL's server binaries: `WALSHIP_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`. Panics with the fix when there is none.
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("WALSHIP_PG_BIN") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").exists(),
            "WALSHIP_PG_BIN={} has no initdb: point it at a PostgreSQL bin directory",
            dir.display()
        );
        return dir;
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found: walship's tests run against a real PostgreSQL server. \
             Fix: apt-get install -y postgresql (Debian/Ubuntu), or set WALSHIP_PG_BIN to a directory holding \
             initdb, pg_ctl, postgres and pgbench"
        ),
    }
}

/// Runs `cmd` as the database user and returns its output; panics with stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = crate::env::retry_busy(|| as_db_user(cmd).output())
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Options of [`Cluster::init`].
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// `initdb --wal-segsize` in MB (11+); default 16.
    pub wal_segsize_mb: Option<u32>,
    /// PostgreSQL's bin directory; default [`pg_bin`].
    pub bin: Option<PathBuf>,
    /// Extra postgresql.conf lines.
    pub conf: Vec<String>,
}

/// A PostgreSQL cluster in a test directory, listening on a Unix socket only. Stopped (immediately) on drop;
/// its log is printed if the test failed.
pub struct Cluster {
    pub name: String,
    pub bin: PathBuf,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub log: PathBuf,
    pub major: u32,
    running: bool,
    /// The port (of the Unix socket, and of TCP when `listen_addresses` is set).
    pub port: u16,
}

/// The major version of the server binaries in `bin`.
pub fn server_major(bin: &Path) -> u32 {
    let out = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .expect("postgres --version");
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 15.18 (Debian ...)"
    let ver = text.split_whitespace().nth(2).unwrap_or_default();
    let mut parts = ver.split('.');
    let first: u32 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("cannot read a version from {text:?}"));
    if first == 9 {
        900 + parts
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    } else {
        first
    }
}

impl Cluster {
    /// `initdb` a new cluster named `name` inside `dir`.
    pub fn init(dir: &TestDir, name: &str, opts: &InitOptions) -> Cluster {
        let bin = opts.bin.clone().unwrap_or_else(pg_bin);
        let major = server_major(&bin);
        let root = dir.subdir(name);
        let data = root.join("data");
        let socket_dir = dir.subdir(&format!("{name}-sock"));
        let log = root.join("postgres.log");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if let Some(mb) = opts.wal_segsize_mb {
            initdb.arg(format!("--wal-segsize={mb}"));
        }
        run_ok(&mut initdb);
        let keep = if major >= 13 {
            "wal_keep_size = '2GB'".to_string()
        } else {
            "wal_keep_segments = 128".to_string()
        };
        let mut conf = vec![
            "listen_addresses = ''".to_string(),
            format!("unix_socket_directories = '{}'", socket_dir.display()),
            "port = 5432".to_string(),
            // the primary's own durability is not what these tests check; the page cache survives kill -9
            "fsync = off".to_string(),
            "max_wal_size = '4GB'".to_string(),
            keep,
            "log_line_prefix = '%m [%p] '".to_string(),
        ];
        conf.extend(opts.conf.iter().cloned());
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("read postgresql.conf");
        text.push_str("\n# walship test harness\n");
        for line in conf {
            text.push_str(&line);
            text.push('\n');
        }
        std::fs::write(&path, text).expect("write postgresql.conf");
        Cluster {
            name: name.to_owned(),
            bin,
            data,
            socket_dir,
            log,
            major,
            running: false,
            port: 5432,
        }
    }

    /// Appends lines to postgresql.conf (takes effect at the next start).
    pub fn configure(&self, lines: &[&str]) {
        let path = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("read postgresql.conf");
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(&path, text).expect("write postgresql.conf");
    }

    /// A base backup of this (running) cluster as a new cluster named `name`, not started, with its own socket.
    /// No WAL is included (`-X none`): the standby gets all of it from the walship archive.
    pub fn base_backup(&self, dir: &TestDir, name: &str) -> Cluster {
        let root = dir.subdir(name);
        let data = root.join("data");
        let socket_dir = dir.subdir(&format!("{name}-sock"));
        let bin = self.bin.clone();
        let basebackup = crate::versions::tool(&bin, "pg_basebackup");
        run_ok(
            Command::new(basebackup)
                .arg("-D")
                .arg(&data)
                .arg("-h")
                .arg(&self.socket_dir)
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-U", "postgres", "-X", "none", "-c", "fast", "--no-sync"]),
        );
        let c = Cluster {
            name: name.to_owned(),
            bin,
            data,
            socket_dir: socket_dir.clone(),
            log: root.join("postgres.log"),
            major: self.major,
            running: false,
            port: self.port,
        };
        c.configure(&[
            "# standby",
            &format!("unix_socket_directories = '{}'", socket_dir.display()),
            "archive_mode = off",
            "hot_standby = on",
        ]);
        c
    }

    /// Sets up recovery from a restore_command: `standby` selects standby mode (else archive recovery).
    /// PostgreSQL 12+: settings in postgresql.conf plus standby.signal / recovery.signal; 10, 11: recovery.conf.
    pub fn configure_recovery(&self, restore_command: &str, standby: bool, extra: &[&str]) {
        let quoted = restore_command.replace('\'', "''");
        if self.major >= 12 {
            let mut lines = vec![
                format!("restore_command = '{quoted}'"),
                "recovery_target_timeline = 'latest'".to_string(),
            ];
            lines.extend(extra.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            self.configure(&refs);
            let signal = if standby {
                "standby.signal"
            } else {
                "recovery.signal"
            };
            std::fs::write(self.data.join(signal), "").expect("signal file");
            crate::env::chown_to_db_user(&self.data.join(signal));
        } else {
            let mut text =
                format!("restore_command = '{quoted}'\nrecovery_target_timeline = 'latest'\n");
            if standby {
                text.push_str("standby_mode = 'on'\n");
            }
            std::fs::write(self.data.join("recovery.conf"), text).expect("recovery.conf");
            crate::env::chown_to_db_user(&self.data.join("recovery.conf"));
            self.configure(extra);
        }
    }

    /// Sets the port (takes effect at the next start).
    pub fn set_port(&mut self, port: u16) {
        self.configure(&[&format!("port = {port}")]);
        self.port = port;
    }

    /// Listens on 127.0.0.1 at a free port too (takes effect at the next start); returns the port.
    pub fn listen_tcp(&mut self) -> u16 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        self.configure(&["listen_addresses = '127.0.0.1'"]);
        self.set_port(port);
        port
    }

    /// Starts without waiting until the server accepts connections (a standby may wait for WAL first).
    pub fn start_no_wait(&mut self) {
        run_ok(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&self.log)
                .args(["-W", "start"]),
        );
        self.running = true;
    }

    /// Tries to connect once.
    pub async fn try_connect(&self) -> Option<Client> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(), NoTls)
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Some(client)
    }

    pub fn start(&mut self) {
        run_ok(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&self.log)
                .args(["-w", "-t", "120", "start"]),
        );
        self.running = true;
    }

    /// Stops with `mode` (`fast`, `immediate`, `smart`).
    pub fn stop(&mut self, mode: &str) {
        if self.running {
            run_ok(
                Command::new(self.bin.join("pg_ctl"))
                    .arg("-D")
                    .arg(&self.data)
                    .args(["-w", "-t", "120", "-m", mode, "stop"]),
            );
            self.running = false;
        }
    }

    /// Stops like a crash: `pg_ctl stop -m immediate` (no shutdown checkpoint).
    pub fn kill(&mut self) {
        self.stop("immediate");
    }

    /// SIGKILL of the postmaster and all its children at once (the OOM killer, an operator's `kill -9`):
    /// nothing is flushed, `postmaster.pid` stays behind. Returns once the postmaster is gone.
    pub fn kill9(&mut self) {
        self.kill9_with(&[]);
    }

    /// [`Cluster::kill9`], and the processes `others` in the same `kill` (the primary's host dying: its
    /// walship sender goes down at the same instant as PostgreSQL).
    pub fn kill9_with(&mut self, others: &[u32]) {
        let text =
            std::fs::read_to_string(self.data.join("postmaster.pid")).expect("postmaster.pid");
        let pid: u32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("postmaster pid");
        let mut pids: Vec<String> = others.iter().map(u32::to_string).collect();
        pids.push(pid.to_string());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let _ = Command::new("kill")
            .arg("-9")
            .args(&pids)
            .stderr(std::process::Stdio::null())
            .status();
        let deadline = std::time::Instant::now() + WAIT;
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "postmaster {pid} survived kill -9"
            );
            std::thread::park_timeout(std::time::Duration::from_millis(10));
        }
        self.running = false;
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir.display(),
            self.port
        )
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.data.join(if self.major >= 10 {
            "pg_wal"
        } else {
            "pg_xlog"
        })
    }

    /// A SQL connection.
    pub async fn connect(&self) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(), NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to cluster {}: {e}", self.name));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// The flushed WAL position.
    pub async fn flush_lsn(&self, client: &Client) -> Lsn {
        let f = if self.major >= 10 {
            "pg_current_wal_flush_lsn()"
        } else {
            "pg_current_xlog_flush_location()"
        };
        let s: String = client
            .query_one(&format!("SELECT {f}::text"), &[])
            .await
            .expect("flush lsn")
            .get(0);
        s.parse().expect("parse lsn")
    }

    /// `pg_switch_wal()`, returning the position after the switch (the next segment's start).
    pub async fn switch_wal(&self, client: &Client) -> Lsn {
        let f = if self.major >= 10 {
            "pg_switch_wal()"
        } else {
            "pg_switch_xlog()"
        };
        client
            .execute("CREATE TABLE IF NOT EXISTS walship_switch(x int)", &[])
            .await
            .expect("create");
        client
            .execute("INSERT INTO walship_switch VALUES (1)", &[])
            .await
            .expect("insert");
        client
            .query_one(&format!("SELECT {f}"), &[])
            .await
            .expect("switch wal");
        self.flush_lsn(client).await
    }

    pub async fn system_identifier(&self, client: &Client) -> u64 {
        let s: String = client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .expect("system identifier")
            .get(0);
        s.parse::<i64>().expect("sysid") as u64
    }

    /// The pgbench binary: next to the server's, else the newest installed one.
    pub fn pgbench_bin(&self) -> PathBuf {
        crate::versions::tool(&self.bin, "pgbench")
    }

    /// A pgbench command against this cluster (run it with [`run_ok`] or spawn it).
    pub fn pgbench(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.pgbench_bin());
        cmd.arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres"])
            .args(args)
            .arg("postgres");
        as_db_user(&mut cmd);
        cmd
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- PostgreSQL log of cluster {} (last 60 lines) ---",
                self.name
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if self.running {
            let _ = as_db_user(
                Command::new(self.bin.join("pg_ctl"))
                    .arg("-D")
                    .arg(&self.data)
                    .args(["-m", "immediate", "-w", "stop"]),
            )
            .output();
        }
    }
}

/// How long tests wait for things that should take a moment.
pub const WAIT: Duration = Duration::from_secs(90);
