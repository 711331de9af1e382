//! The shared world of every scenario: the primary the bench creates, the shippers it starts, and how
//! their positions and processes are read.

#[allow(unused_imports)]
use crate::*;

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Peak resident set size in MB, from /proc/PID/status.
pub(crate) fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(15432)
}

/// Something that ships WAL into a directory, and how far it got.
pub(crate) trait Target: Send {
    fn name(&self) -> String;
    /// Where the target's copy of the WAL ends (timeline 1).
    fn position(&mut self) -> Option<Lsn>;
    /// For a target whose `position` is durable: where its written (not yet fsynced) copy ends.
    fn written(&mut self) -> Option<Lsn> {
        None
    }
    /// For a target that holds WAL before the primary flushed it (walship): where the confirmed part ends.
    fn confirmed(&mut self) -> Option<Lsn> {
        None
    }
    /// Processes whose CPU counts: (role, pid).
    fn pids(&self) -> Vec<(String, u32)>;
}

pub(crate) struct WalshipTarget {
    pub(crate) archive: PathBuf,
    pub(crate) sender: Option<Daemon>,
    pub(crate) receiver: Daemon,
    /// The sender's PostgreSQL backend (its queries cost the primary CPU too).
    pub(crate) backend: Option<u32>,
    /// The walsender streaming to the sender (the flush signal), when it has one.
    pub(crate) walsender: Option<u32>,
    /// (segno, bytes known to be written) of the partial being scanned
    pub(crate) scan: (u64, u64),
}

impl Target for WalshipTarget {
    fn name(&self) -> String {
        "walship".into()
    }
    fn position(&mut self) -> Option<Lsn> {
        walship_receiver_position(&self.archive)
    }
    /// The newest segment's size (written into the page cache, the way pg_receivewal's target is measured).
    fn written(&mut self) -> Option<Lsn> {
        // preallocated partials (zero-filled, growing ones of older builds read the same way)
        written_end(&self.archive, WalSegSize::DEFAULT, &mut self.scan)
    }
    /// The confirmed end `walship.position` records (durable, and flushed by the primary).
    fn confirmed(&mut self) -> Option<Lsn> {
        walship_receiver::archive::read_positions(&self.archive).map(|p| p.confirmed)
    }
    fn pids(&self) -> Vec<(String, u32)> {
        let mut v = vec![("receiver".to_string(), self.receiver.pid())];
        if let Some(s) = &self.sender {
            v.push(("sender".into(), s.pid()));
        }
        if let Some(b) = self.backend {
            v.push(("backend".into(), b));
        }
        if let Some(w) = self.walsender {
            v.push(("walsender".into(), w));
        }
        v
    }
}

/// The receiver's durable end (`walship.position`, rewritten after every group commit).
pub(crate) fn walship_receiver_position(archive: &Path) -> Option<Lsn> {
    walship_receiver::archive::read_position(archive).map(|(_, lsn)| lsn)
}

/// pg_receivewal's target directory: complete segments, and a `.partial` pre-padded with zeros, so the
/// position inside it is found by scanning for the last non-zero byte (rounded up to 8-byte alignment).
pub(crate) struct ReceivewalTarget {
    pub(crate) label: String,
    pub(crate) dir: PathBuf,
    pub(crate) seg: WalSegSize,
    pub(crate) child: Child,
    pub(crate) walsender: Option<u32>,
    /// (segno, bytes known to be written) of the partial being scanned
    pub(crate) scan: (u64, u64),
}

/// The newest segment in a directory of segment files and `.partial`s: (segno, complete).
pub(crate) fn latest_segment(dir: &Path, seg: WalSegSize) -> Option<(u64, bool)> {
    let mut best: Option<(u64, bool)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let (segno, complete) = match WalFileName::parse(name, seg) {
            Ok(WalFileName::Segment { segno, .. }) => (segno, true),
            Ok(WalFileName::Partial { segno, .. }) => (segno, false),
            _ => continue,
        };
        if best.is_none_or(|(s, c)| segno > s || (segno == s && complete && !c)) {
            best = Some((segno, complete));
        }
    }
    best
}

/// Where the WAL written into a directory of segments and zero-padded `.partial`s ends: the newest partial
/// scanned for its last non-zero byte (rounded up to 8-byte alignment), from where the last scan (`scan`: segno,
/// bytes known to be written) got to.
pub(crate) fn written_end(dir: &Path, seg: WalSegSize, scan: &mut (u64, u64)) -> Option<Lsn> {
    let (segno, complete) = latest_segment(dir, seg)?;
    if complete {
        return Some(seg.segment_start(segno + 1));
    }
    let name = walship_protocol::wal::segment_file_name(1, segno, seg);
    let f = File::open(dir.join(format!("{name}.partial"))).ok()?;
    if scan.0 != segno {
        *scan = (segno, 0);
    }
    let mut page = vec![0u8; 8192];
    let mut at = scan.1 / 8192 * 8192;
    let mut last = scan.1;
    loop {
        // a growing partial (older builds) ends inside its last page
        let got = match f.read_at(&mut page, at) {
            Ok(n) if at < seg.as_u64() && n > 0 => n,
            _ => break,
        };
        match page[..got].iter().rposition(|b| *b != 0) {
            None => break,
            Some(i) => last = last.max(at + i as u64 + 1),
        }
        at += 8192;
    }
    let last = last.div_ceil(8) * 8;
    scan.1 = last;
    Some(Lsn(seg.segment_start(segno).0 + last))
}

impl Target for ReceivewalTarget {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn position(&mut self) -> Option<Lsn> {
        written_end(&self.dir, self.seg, &mut self.scan)
    }
    fn pids(&self) -> Vec<(String, u32)> {
        let mut v = vec![("pg_receivewal".to_string(), self.child.id())];
        if let Some(w) = self.walsender {
            v.push(("walsender".into(), w));
        }
        v
    }
}

impl Drop for ReceivewalTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts pg_receivewal (as the database user) into `dir` through `slot`.
pub(crate) fn spawn_receivewal(
    dir: &Path,
    conn: &str,
    slot: &str,
    synchronous: bool,
) -> Result<Child> {
    let mut cmd = Command::new(pg_bin().join("pg_receivewal"));
    cmd.arg("-D").arg(dir).args(["-d", conn, "-S", slot, "-n"]);
    if synchronous {
        cmd.arg("--synchronous");
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    as_db_user(&mut cmd);
    cmd.spawn().context("start pg_receivewal")
}

/// archive_command = 'cp %p DIR/%f': the target holds whole segments only.
pub(crate) struct ArchiveCommandTarget {
    pub(crate) dir: PathBuf,
    pub(crate) seg: WalSegSize,
    pub(crate) timeout: u64,
}

impl Target for ArchiveCommandTarget {
    fn name(&self) -> String {
        format!("archive_command (cp, archive_timeout {}s)", self.timeout)
    }
    fn position(&mut self) -> Option<Lsn> {
        let mut best = None;
        for e in std::fs::read_dir(&self.dir).ok()?.flatten() {
            if let Ok(WalFileName::Segment { segno, .. }) =
                WalFileName::parse(e.file_name().to_str()?, self.seg)
            {
                best = best.max(Some(segno));
            }
        }
        best.map(|s| self.seg.segment_start(s + 1))
    }
    fn pids(&self) -> Vec<(String, u32)> {
        Vec::new()
    }
}

pub(crate) struct World {
    pub(crate) archive_timeout: u64,
    pub(crate) walship: Walship,
    pub(crate) certs: PathBuf,
    pub(crate) primary: Cluster,
    pub(crate) port: u16,
    pub(crate) seg: WalSegSize,
    pub(crate) dir: TestDir,
    /// A directory in memory (/dev/shm), for targets whose disk must not be the primary's.
    pub(crate) memory: Option<TestDir>,
}

impl World {
    pub(crate) async fn new(name: &str, settings: &Settings) -> Result<World> {
        let dir = TestDir::new(name);
        let walship = Walship::install(&dir);
        let certs = walship.certs(&dir, "certs");
        let mut primary = Cluster::init(&dir, "primary", &InitOptions::default());
        let port = free_port();
        primary.configure(&[
            "# benchmark: a real primary",
            "fsync = on",
            "synchronous_commit = on",
            "listen_addresses = '127.0.0.1'",
            &format!("port = {port}"),
            "ssl = on",
            &format!("ssl_cert_file = '{}'", certs.join("server.crt").display()),
            &format!("ssl_key_file = '{}'", certs.join("server.key").display()),
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "archive_mode = on",
            "archive_command = '/bin/true'",
            &format!("archive_timeout = {}", settings.archive_timeout),
            "max_wal_size = '8GB'",
            "checkpoint_timeout = '30min'",
        ]);
        primary.set_port(port);
        primary.start();
        run_ok(&mut primary.pgbench(&["-i", "-s", &settings.scale.to_string(), "-q"]));
        Ok(World {
            archive_timeout: settings.archive_timeout,
            walship,
            certs,
            primary,
            port,
            seg: WalSegSize::DEFAULT,
            dir,
            memory: Path::new("/dev/shm")
                .is_dir()
                .then(|| TestDir::new_in(name, Path::new("/dev/shm"))),
        })
    }

    pub(crate) async fn start_walship(&self, tag: &str) -> Result<WalshipTarget> {
        self.start_walship_in(self.dir.path(), tag).await
    }

    /// A receiver with its archive under `base`, and a sender.
    pub(crate) async fn start_walship_in(&self, base: &Path, tag: &str) -> Result<WalshipTarget> {
        self.start_walship_with(base, tag, None).await
    }

    /// [`World::start_walship_in`], the sender with `extra` flags instead of `WALSHIP_BENCH_SENDER_ARGS`.
    pub(crate) async fn start_walship_with(
        &self,
        base: &Path,
        tag: &str,
        extra: Option<&[&str]>,
    ) -> Result<WalshipTarget> {
        let archive = base.join(format!("archive-{tag}"));
        let receiver = self.walship.receiver(&self.dir, &archive, &self.certs, 0);
        let sender = match extra {
            Some(extra) => self.start_sender_with(receiver.port, extra),
            None => self.start_sender(receiver.port),
        };
        let backend = Some(self.walship_backend().await?);
        let walsender = self.walship_walsender().await;
        Ok(WalshipTarget {
            scan: (0, 0),
            archive,
            sender: Some(sender),
            receiver,
            backend,
            walsender,
        })
    }

    /// The pid of the walsender streaming to the running sender (`application_name` walship), if any.
    pub(crate) async fn walship_walsender(&self) -> Option<u32> {
        let client = self.primary.connect().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = client
                .query_opt(
                    "SELECT pid FROM pg_stat_replication WHERE application_name = $1 ORDER BY backend_start DESC LIMIT 1",
                    &[&walship_sender::DEFAULT_STANDBY_NAME],
                )
                .await
                .ok()?;
            if let Some(r) = row {
                return Some(r.get::<_, i32>(0) as u32);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets `synchronous_standby_names` on the primary and reloads (empty: no synchronous standby).
    pub(crate) async fn synchronous_standby_names(&self, names: &str) -> Result<()> {
        let client = self.primary.connect().await;
        client
            .batch_execute(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
            ))
            .await
            .context("set synchronous_standby_names")?;
        // (ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement query)
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .context("reload the configuration")?;
        Ok(())
    }

    /// The pid of the running sender's backend (found by its application_name).
    pub(crate) async fn walship_backend(&self) -> Result<u32> {
        let client = self.primary.connect().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY backend_start DESC LIMIT 1",
                    &[&walship_sender::postgres::APPLICATION_NAME],
                )
                .await?;
            if let Some(r) = row {
                return Ok(r.get::<_, i32>(0) as u32);
            }
            if Instant::now() > deadline {
                bail!("the walship sender's session did not show in pg_stat_activity");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a sender to `port`; `WALSHIP_BENCH_SENDER_ARGS` adds flags (an A/B of settings, e.g.
    /// `--compression none`).
    pub(crate) fn start_sender(&self, port: u16) -> Daemon {
        let extra = std::env::var("WALSHIP_BENCH_SENDER_ARGS").unwrap_or_default();
        let extra: Vec<&str> = extra.split_whitespace().collect();
        self.start_sender_with(port, &extra)
    }

    /// A sender to `port` with `extra` flags, once it streams.
    pub(crate) fn start_sender_with(&self, port: u16, extra: &[&str]) -> Daemon {
        let mut s = self.walship.sender(
            &self.dir,
            &self.primary.conninfo(),
            port,
            &self.certs,
            &self.certs,
            extra,
        );
        s.wait_for_log("streaming", Duration::from_secs(60));
        s
    }

    pub(crate) async fn start_receivewal(
        &self,
        tag: &str,
        synchronous: bool,
        tls: bool,
    ) -> Result<ReceivewalTarget> {
        self.start_receivewal_in(&self.dir, tag, synchronous, tls)
            .await
    }

    /// pg_receivewal with a slot, writing into a directory under `base`.
    pub(crate) async fn start_receivewal_in(
        &self,
        base: &TestDir,
        tag: &str,
        synchronous: bool,
        tls: bool,
    ) -> Result<ReceivewalTarget> {
        let dir = base.subdir(&format!("receivewal-{tag}"));
        let client = self.primary.connect().await;
        let slot = format!("bench_{tag}").replace('-', "_");
        client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true)",
                &[&slot],
            )
            .await
            .context("create slot")?;
        let conn = if tls {
            format!(
                "host=127.0.0.1 port={} user=postgres sslmode=require",
                self.port
            )
        } else {
            format!(
                "host={} port={} user=postgres",
                self.primary.socket_dir.display(),
                self.port
            )
        };
        let child = spawn_receivewal(&dir, &conn, &slot, synchronous)?;
        let mut label = String::from("pg_receivewal");
        if synchronous {
            label.push_str(" --synchronous");
        }
        if tls {
            label.push_str(" (TLS)");
        }
        // its walsender
        let deadline = Instant::now() + Duration::from_secs(30);
        let walsender = loop {
            let row = client.query_opt("SELECT pid FROM pg_stat_replication WHERE application_name = 'pg_receivewal' ORDER BY backend_start DESC LIMIT 1", &[]).await?;
            if let Some(r) = row {
                break Some(r.get::<_, i32>(0) as u32);
            }
            if Instant::now() > deadline {
                bail!("pg_receivewal did not connect");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(ReceivewalTarget {
            label,
            dir,
            seg: self.seg,
            child,
            walsender,
            scan: (u64::MAX, 0),
        })
    }

    pub(crate) async fn start_archive_command(&self) -> Result<ArchiveCommandTarget> {
        let dir = self.dir.subdir("archive-command");
        let client = self.primary.connect().await;
        client
            .batch_execute(&format!(
                "ALTER SYSTEM SET archive_command = 'cp %p {}/%f'",
                dir.display()
            ))
            .await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        Ok(ArchiveCommandTarget {
            dir,
            seg: self.seg,
            timeout: self.archive_timeout,
        })
    }

    pub(crate) async fn stop_archive_command(&self) -> Result<()> {
        let client = self.primary.connect().await;
        client
            .batch_execute("ALTER SYSTEM SET archive_command = '/bin/true'")
            .await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        Ok(())
    }

    pub(crate) async fn drop_slots(&self) {
        let client = self.primary.connect().await;
        let _ = client
            .batch_execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")
            .await;
    }
}
