//! `walship-bench`: walship side by side with the tools a DBA would otherwise pick, in one run on one machine.
//!
//! Scenarios (each against a real PostgreSQL primary the bench creates itself):
//! 1. `lag`: pgbench load (unthrottled, and rate-limited at 20 tps); a probe commits a tiny row ten times a
//!    second and times how long until the target holds that commit's flush LSN; the primary's flush position
//!    is also sampled every 2 ms. Targets: walship (durable position: fsynced), pg_receivewal over a Unix
//!    socket, with `--synchronous`, over TLS with `--synchronous`, and archive_command file shipping.
//! 2. `catchup`: a WAL backlog built while the shipper is stopped, then the time until the target holds all of
//!    it (MB/s), CPU seconds per GB of every process involved, and the raw ceilings of this machine.
//! 3. `overhead`: pgbench TPS on the primary with and without the shipper.
//!
//! Results are printed as tables with ratios and written as JSON. `--quick` is a one-minute smoke version.

mod crash;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use walship_protocol::wal::WalFileName;
use walship_protocol::{Lsn, WalSegSize};
use walship_tests::cluster::{pg_bin, run_ok};
use walship_tests::env::as_db_user;
use walship_tests::{Cluster, Daemon, InitOptions, TestDir, Walship};

// ---------------------------------------------------------------------------------------------- settings

#[derive(Clone, Debug)]
struct Settings {
    quick: bool,
    json: PathBuf,
    scenarios: Vec<String>,
    lag_seconds: u64,
    rate_seconds: u64,
    backlog_mb: u64,
    /// Catch-up rounds; the order of the targets alternates between rounds (ABBA).
    catchup_rounds: u32,
    overhead_seconds: u64,
    scale: u32,
    archive_timeout: u64,
    /// Lag of walship alone (for comparing two builds of walship; no reference runs).
    walship_only: bool,
}

impl Settings {
    fn from_args() -> Result<Settings> {
        let mut s = Settings {
            quick: false,
            json: PathBuf::from("bench-results.json"),
            scenarios: vec![
                "lag".into(),
                "catchup".into(),
                "overhead".into(),
                "crash".into(),
            ],
            lag_seconds: 30,
            rate_seconds: 20,
            backlog_mb: 1536,
            catchup_rounds: 2,
            overhead_seconds: 30,
            scale: 10,
            archive_timeout: 10,
            walship_only: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => {
                    s.quick = true;
                    s.lag_seconds = 4;
                    s.rate_seconds = 3;
                    s.backlog_mb = 64;
                    s.catchup_rounds = 1;
                    s.overhead_seconds = 4;
                    s.scale = 1;
                    s.archive_timeout = 2;
                }
                "--walship-only" => s.walship_only = true,
                "--json" => s.json = PathBuf::from(args.next().context("--json needs a file")?),
                "--scenario" => {
                    s.scenarios = args
                        .next()
                        .context("--scenario needs lag, catchup, overhead or crash")?
                        .split(',')
                        .map(str::to_owned)
                        .collect()
                }
                "-h" | "--help" => {
                    println!(
                        "walship-bench [--quick] [--scenario lag,catchup,overhead,crash] [--walship-only] [--json FILE]\n\n\
                         Benchmarks walship against pg_receivewal and archive_command file shipping on this machine,\n\
                         with PostgreSQL from WALSHIP_PG_BIN or /usr/lib/postgresql/*/bin. --quick runs a short smoke\n\
                         version of every scenario. --walship-only leaves the references out of the lag scenario\n\
                         (to compare two builds of walship). Results: tables on stdout, JSON in bench-results.json."
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (see --help)"),
            }
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------- processes

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Peak resident set size in MB, from /proc/PID/status.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(15432)
}

// ---------------------------------------------------------------------------------------------- targets

/// Something that ships WAL into a directory, and how far it got.
trait Target: Send {
    fn name(&self) -> String;
    /// Where the target's copy of the WAL ends (timeline 1).
    fn position(&mut self) -> Option<Lsn>;
    /// For a target whose `position` is durable: where its written (not yet fsynced) copy ends.
    fn written(&mut self) -> Option<Lsn> {
        None
    }
    /// Processes whose CPU counts: (role, pid).
    fn pids(&self) -> Vec<(String, u32)>;
}

struct WalshipTarget {
    archive: PathBuf,
    sender: Option<Daemon>,
    receiver: Daemon,
    /// The sender's PostgreSQL backend (its queries cost the primary CPU too).
    backend: Option<u32>,
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
        let seg = WalSegSize::DEFAULT;
        let (segno, complete) = latest_segment(&self.archive, seg)?;
        if complete {
            return Some(seg.segment_start(segno + 1));
        }
        let name = walship_protocol::wal::segment_file_name(1, segno, seg);
        let len = std::fs::metadata(self.archive.join(format!("{name}.partial")))
            .ok()?
            .len();
        Some(Lsn(seg.segment_start(segno).0 + len))
    }
    fn pids(&self) -> Vec<(String, u32)> {
        let mut v = vec![("receiver".to_string(), self.receiver.pid())];
        if let Some(s) = &self.sender {
            v.push(("sender".into(), s.pid()));
        }
        if let Some(b) = self.backend {
            v.push(("backend".into(), b));
        }
        v
    }
}

/// The receiver's durable end (`walship.position`, rewritten after every group commit).
fn walship_receiver_position(archive: &Path) -> Option<Lsn> {
    walship_receiver::archive::read_position(archive).map(|(_, lsn)| lsn)
}

/// pg_receivewal's target directory: complete segments, and a `.partial` pre-padded with zeros, so the
/// position inside it is found by scanning for the last non-zero byte (rounded up to 8-byte alignment).
struct ReceivewalTarget {
    label: String,
    dir: PathBuf,
    seg: WalSegSize,
    child: Child,
    walsender: Option<u32>,
    /// (segno, bytes known to be written) of the partial being scanned
    scan: (u64, u64),
}

/// The newest segment in a directory of segment files and `.partial`s: (segno, complete).
fn latest_segment(dir: &Path, seg: WalSegSize) -> Option<(u64, bool)> {
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

impl Target for ReceivewalTarget {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn position(&mut self) -> Option<Lsn> {
        let (segno, complete) = latest_segment(&self.dir, self.seg)?;
        if complete {
            return Some(self.seg.segment_start(segno + 1));
        }
        let name = walship_protocol::wal::segment_file_name(1, segno, self.seg);
        let f = File::open(self.dir.join(format!("{name}.partial"))).ok()?;
        if self.scan.0 != segno {
            self.scan = (segno, 0);
        }
        let mut page = vec![0u8; 8192];
        let mut at = self.scan.1 / 8192 * 8192;
        let mut last = self.scan.1;
        loop {
            if at >= self.seg.as_u64() || f.read_exact_at(&mut page, at).is_err() {
                break;
            }
            match page.iter().rposition(|b| *b != 0) {
                None => break,
                Some(i) => last = last.max(at + i as u64 + 1),
            }
            at += 8192;
        }
        let last = last.div_ceil(8) * 8;
        self.scan.1 = last;
        Some(Lsn(self.seg.segment_start(segno).0 + last))
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
fn spawn_receivewal(dir: &Path, conn: &str, slot: &str, synchronous: bool) -> Result<Child> {
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
struct ArchiveCommandTarget {
    dir: PathBuf,
    seg: WalSegSize,
    timeout: u64,
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

// ---------------------------------------------------------------------------------------------- the bench world

struct World {
    archive_timeout: u64,
    walship: Walship,
    certs: PathBuf,
    primary: Cluster,
    port: u16,
    seg: WalSegSize,
    dir: TestDir,
    /// A directory in memory (/dev/shm), for targets whose disk must not be the primary's.
    memory: Option<TestDir>,
}

impl World {
    async fn new(name: &str, settings: &Settings) -> Result<World> {
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

    async fn start_walship(&self, tag: &str) -> Result<WalshipTarget> {
        self.start_walship_in(self.dir.path(), tag).await
    }

    /// A receiver with its archive under `base`, and a sender.
    async fn start_walship_in(&self, base: &Path, tag: &str) -> Result<WalshipTarget> {
        let archive = base.join(format!("archive-{tag}"));
        let receiver = self.walship.receiver(&self.dir, &archive, &self.certs, 0);
        let sender = self.start_sender(receiver.port);
        let backend = Some(self.walship_backend().await?);
        Ok(WalshipTarget {
            archive,
            sender: Some(sender),
            receiver,
            backend,
        })
    }

    /// The pid of the running sender's backend (found by its application_name).
    async fn walship_backend(&self) -> Result<u32> {
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

    fn start_sender(&self, port: u16) -> Daemon {
        let mut s = self.walship.sender(
            &self.dir,
            &self.primary.conninfo(),
            port,
            &self.certs,
            &self.certs,
            &[],
        );
        s.wait_for_log("streaming", Duration::from_secs(60));
        s
    }

    async fn start_receivewal(
        &self,
        tag: &str,
        synchronous: bool,
        tls: bool,
    ) -> Result<ReceivewalTarget> {
        self.start_receivewal_in(&self.dir, tag, synchronous, tls)
            .await
    }

    /// pg_receivewal with a slot, writing into a directory under `base`.
    async fn start_receivewal_in(
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

    async fn start_archive_command(&self) -> Result<ArchiveCommandTarget> {
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

    async fn stop_archive_command(&self) -> Result<()> {
        let client = self.primary.connect().await;
        client
            .batch_execute("ALTER SYSTEM SET archive_command = '/bin/true'")
            .await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        Ok(())
    }

    async fn drop_slots(&self) {
        let client = self.primary.connect().await;
        let _ = client
            .batch_execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")
            .await;
    }
}

// ---------------------------------------------------------------------------------------------- lag

/// Positions over time (only changes).
type Series = Vec<(Instant, Lsn)>;

/// The target's positions over time, polled every ~200 µs on its own thread (only changes are kept).
struct Poller {
    stop: Arc<AtomicBool>,
    series: Arc<Mutex<Series>>,
    /// The target's `written` positions, when it has them.
    written: Arc<Mutex<Series>>,
    handle: std::thread::JoinHandle<Box<dyn Target>>,
}

impl Poller {
    fn start(mut target: Box<dyn Target>) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let series = Arc::new(Mutex::new(Vec::new()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let (s, v, w) = (stop.clone(), series.clone(), written.clone());
        let handle = std::thread::spawn(move || {
            let (mut last, mut last_written) = (Lsn(0), Lsn(0));
            while !s.load(Ordering::Relaxed) {
                if let Some(p) = target.written() {
                    if p > last_written {
                        last_written = p;
                        if let Ok(mut w) = w.lock() {
                            w.push((Instant::now(), p));
                        }
                    }
                }
                if let Some(p) = target.position() {
                    if p > last {
                        last = p;
                        if let Ok(mut v) = v.lock() {
                            v.push((Instant::now(), p));
                        }
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            target
        });
        Poller {
            stop,
            series,
            written,
            handle,
        }
    }

    fn current(&self) -> Lsn {
        self.series
            .lock()
            .ok()
            .and_then(|v| v.last().map(|x| x.1))
            .unwrap_or(Lsn(0))
    }

    /// The target back, its position series and its written series (empty if it has none).
    fn finish(self) -> (Box<dyn Target>, Series, Series) {
        self.stop.store(true, Ordering::Relaxed);
        let target = self.handle.join().expect("poller thread");
        let series = self.series.lock().map(|v| v.clone()).unwrap_or_default();
        let written = self.written.lock().map(|v| v.clone()).unwrap_or_default();
        (target, series, written)
    }
}

/// When the target first held `lsn` (at or after `since`): milliseconds after `since`.
fn held_after(series: &[(Instant, Lsn)], since: Instant, lsn: Lsn) -> Option<f64> {
    let i = series.partition_point(|(_, p)| *p < lsn);
    let (t, _) = series.get(i)?;
    Some(t.saturating_duration_since(since).as_secs_f64() * 1000.0)
}

#[derive(Clone, Debug, Default, Serialize)]
struct Percentiles {
    n: usize,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Percentiles {
        n: v.len(),
        p50: at(0.5),
        p95: at(0.95),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

#[derive(Clone, Debug, Serialize)]
struct LagResult {
    target: String,
    profile: String,
    /// per-commit probe: ms from the commit's acknowledgement until the target held its flush LSN
    probe_ms: Percentiles,
    /// flush-position series: ms from a sample of the primary's flush LSN until the target held it
    flush_ms: Percentiles,
    /// bytes the target was behind the primary's flush position, per sample
    behind_bytes: Percentiles,
    wal_mb_per_s: f64,
    tps: f64,
    /// CPU seconds per GB of WAL streamed, per process
    cpu_s_per_gb: BTreeMap<String, f64>,
    peak_rss_mb: BTreeMap<String, f64>,
}

/// Runs one load profile against one target and measures how far it trails.
async fn measure_lag(
    world: &World,
    target: Box<dyn Target>,
    profile: &str,
    seconds: u64,
) -> Result<(Vec<LagResult>, Box<dyn Target>)> {
    let name = target.name();
    let pids = target.pids();
    let poller = Poller::start(target);
    let client = world.primary.connect().await;
    client.batch_execute("CREATE TABLE IF NOT EXISTS probe (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())").await?;
    let flush_sql = client
        .prepare("SELECT pg_current_wal_flush_lsn()::text")
        .await?;
    let probe_client = world.primary.connect().await;
    let probe_insert = probe_client
        .prepare("INSERT INTO probe DEFAULT VALUES")
        .await?;
    let probe_flush = probe_client
        .prepare("SELECT pg_current_wal_flush_lsn()::text")
        .await?;

    // let the target catch up with what is there before the load
    let start_flush: Lsn = client
        .query_one(&flush_sql, &[])
        .await?
        .get::<_, String>(0)
        .parse()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while poller.current() < start_flush {
        if Instant::now() > deadline {
            bail!("{name} did not catch up to {start_flush} before the load");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|(_, p)| cpu_seconds(*p).unwrap_or(0.0))
        .collect();

    let mut args: Vec<String> = vec![
        "-c".into(),
        "4".into(),
        "-j".into(),
        "2".into(),
        "-T".into(),
        seconds.to_string(),
        "-n".into(),
    ];
    if profile.starts_with("rate") {
        args.extend(["-R".into(), "20".into()]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut bench = world.primary.pgbench(&arg_refs);
    bench.stdout(Stdio::piped()).stderr(Stdio::null());
    let bench = bench.spawn().context("start pgbench")?;
    let load = tokio::task::spawn_blocking(move || bench.wait_with_output());

    let mut flushes: Vec<(Instant, Lsn)> = Vec::new();
    let mut probes: Vec<(Instant, Lsn)> = Vec::new();
    let mut behind: Vec<f64> = Vec::new();
    let started = Instant::now();
    let mut next_probe = started;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !load.is_finished() {
        tick.tick().await;
        let f: Lsn = client
            .query_one(&flush_sql, &[])
            .await?
            .get::<_, String>(0)
            .parse()?;
        let now = Instant::now();
        flushes.push((now, f));
        behind.push(f.saturating_sub(poller.current()) as f64);
        if now >= next_probe {
            next_probe = now + Duration::from_millis(100);
            probe_client.execute(&probe_insert, &[]).await?;
            let acked = Instant::now();
            let l: Lsn = probe_client
                .query_one(&probe_flush, &[])
                .await?
                .get::<_, String>(0)
                .parse()?;
            probes.push((acked, l));
        }
    }
    let out = load.await??;
    let elapsed = started.elapsed().as_secs_f64();
    // One more tiny commit after the load: WAL after the last probe, so that a target whose position is
    // read from zero-padded files (pg_receivewal) can show it held the last probe.
    probe_client.execute(&probe_insert, &[]).await?;
    let trailer: Lsn = probe_client
        .query_one(&probe_flush, &[])
        .await?
        .get::<_, String>(0)
        .parse()?;
    let end_flush = flushes
        .last()
        .map(|f| f.1)
        .unwrap_or(start_flush)
        .max(trailer);
    // wait until the target holds everything flushed during the load (bounded)
    let deadline = Instant::now()
        + Duration::from_secs(if name.starts_with("archive_command") {
            world.archive_timeout + 5
        } else {
            60
        });
    while poller.current() < end_flush && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu1: Vec<f64> = pids
        .iter()
        .map(|(_, p)| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let rss: BTreeMap<String, f64> = pids
        .iter()
        .map(|(r, p)| (r.clone(), peak_rss_mb(*p).unwrap_or(0.0)))
        .collect();
    let (target, series, written) = poller.finish();

    let never = 1e9;
    let probe_ms = |series: &[(Instant, Lsn)]| -> Vec<f64> {
        probes
            .iter()
            .map(|(t, l)| held_after(series, *t, *l).unwrap_or(never))
            .collect()
    };
    let flush_ms = |series: &[(Instant, Lsn)]| -> Vec<f64> {
        flushes
            .iter()
            .map(|(t, l)| held_after(series, *t, *l).unwrap_or(never))
            .collect()
    };
    let gb = end_flush.saturating_sub(start_flush) as f64 / 1e9;
    let cpu_s_per_gb = pids
        .iter()
        .zip(cpu0.iter().zip(&cpu1))
        .map(|((r, _), (a, b))| (r.clone(), if gb > 0.0 { (b - a) / gb } else { 0.0 }))
        .collect();
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let durable = LagResult {
        target: name.clone(),
        profile: profile.into(),
        probe_ms: percentiles(probe_ms(&series)),
        flush_ms: percentiles(flush_ms(&series)),
        behind_bytes: percentiles(behind),
        wal_mb_per_s: end_flush.saturating_sub(start_flush) as f64 / 1e6 / elapsed,
        tps,
        cpu_s_per_gb,
        peak_rss_mb: rss,
    };
    let mut results = Vec::new();
    if !written.is_empty() {
        // the same run, timed at the write (as the references are), before the fsync that the ack waits for
        results.push(LagResult {
            target: format!("{name} (written)"),
            probe_ms: percentiles(probe_ms(&written)),
            flush_ms: percentiles(flush_ms(&written)),
            ..durable.clone()
        });
    }
    results.insert(0, durable);
    Ok((results, target))
}

async fn lag_scenario(settings: &Settings) -> Result<Vec<LagResult>> {
    let world = World::new("bench-lag", settings).await?;
    let mut results = Vec::new();
    let profiles = [
        ("unthrottled", settings.lag_seconds),
        ("rate 20 tps", settings.rate_seconds),
    ];
    let targets = if settings.walship_only { 1 } else { 5 };
    for which in 0..targets {
        let target: Box<dyn Target> = match which {
            0 => Box::new(world.start_walship("lag").await?),
            1 => Box::new(world.start_receivewal("plain", false, false).await?),
            2 => Box::new(world.start_receivewal("sync", true, false).await?),
            3 => Box::new(world.start_receivewal("tls", true, true).await?),
            _ => Box::new(world.start_archive_command().await?),
        };
        let mut target = target;
        for (profile, seconds) in profiles {
            let (rs, t) = measure_lag(&world, target, profile, seconds).await?;
            for r in rs {
                eprintln!(
                    "  {:<45} {:<12} probe p50 {:>7.2} p99 {:>8.2} max {:>8.2} ms",
                    r.target, r.profile, r.probe_ms.p50, r.probe_ms.p99, r.probe_ms.max
                );
                results.push(r);
            }
            target = t;
        }
        drop(target);
        if which == 4 {
            world.stop_archive_command().await?;
        }
        world.drop_slots().await;
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------------- catch-up

#[derive(Clone, Debug, Serialize)]
struct CatchupResult {
    target: String,
    round: u32,
    backlog_mb: f64,
    seconds: f64,
    mb_per_s: f64,
    cpu_s_per_gb: BTreeMap<String, f64>,
    cpu_s_per_gb_total: f64,
    peak_rss_mb: BTreeMap<String, f64>,
}

impl CatchupResult {
    /// A round's result; speed and total CPU are derived from the parts.
    fn new(
        target: String,
        round: u32,
        backlog_mb: f64,
        seconds: f64,
        cpu_s_per_gb: BTreeMap<String, f64>,
        peak_rss_mb: BTreeMap<String, f64>,
    ) -> CatchupResult {
        CatchupResult {
            target,
            round,
            backlog_mb,
            seconds,
            mb_per_s: backlog_mb / seconds,
            cpu_s_per_gb_total: cpu_s_per_gb.values().sum(),
            cpu_s_per_gb,
            peak_rss_mb,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct Ceilings {
    read_wal_mb_per_s: f64,
    write_fsync_mb_per_s: f64,
    aes_gcm_mb_per_s_one_core: f64,
}

async fn make_backlog(world: &World, mb: u64) -> Result<Lsn> {
    let client = world.primary.connect().await;
    let rows = mb * 1000;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS backlog; CREATE TABLE backlog AS SELECT g, repeat(md5(g::text), 28) AS pad FROM generate_series(1, {rows}) g"
        ))
        .await?;
    Ok(world.primary.flush_lsn(&client).await)
}

async fn wait_position(target: &mut dyn Target, lsn: Lsn, limit: Duration) -> Result<f64> {
    let t = Instant::now();
    loop {
        if target.position().is_some_and(|p| p >= lsn) {
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > limit {
            bail!("{} did not reach {lsn} within {limit:?}", target.name());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn catchup_scenario(settings: &Settings) -> Result<(Vec<CatchupResult>, Ceilings)> {
    let world = World::new("bench-catchup", settings).await?;
    let mut results = Vec::new();
    // This machine's page cache gets slower and faster with what ran just before (a virtual machine's fresh
    // memory costs more on first touch): alternate the order between rounds so neither target always goes first.
    for round in 0..settings.catchup_rounds {
        if round % 2 == 0 {
            results.push(catchup_walship(&world, settings, round).await?);
            results.push(catchup_receivewal(&world, settings, round).await?);
        } else {
            results.push(catchup_receivewal(&world, settings, round).await?);
            results.push(catchup_walship(&world, settings, round).await?);
        }
    }
    let ceilings = ceilings(&world, settings)?;
    Ok((results, ceilings))
}

/// walship: stop the sender, build the backlog, start it again.
async fn catchup_walship(world: &World, settings: &Settings, round: u32) -> Result<CatchupResult> {
    let mut w = world.start_walship(&format!("catchup{round}")).await?;
    // hold what is there first: the restarted sender resumes where the archive ends
    let client = world.primary.connect().await;
    let now = world.primary.flush_lsn(&client).await;
    wait_position(&mut w, now, Duration::from_secs(120)).await?;
    if let Some(mut s) = w.sender.take() {
        s.terminate(Duration::from_secs(10));
    }
    w.backend = None;
    let from = walship_receiver_position(&w.archive).context("walship's archive holds nothing")?;
    let target_lsn = make_backlog(world, settings.backlog_mb).await?;
    let backlog_mb = target_lsn.saturating_sub(from) as f64 / 1e6;
    let r0 = cpu_seconds(w.receiver.pid()).unwrap_or(0.0);
    let started = Instant::now();
    let sender = world.walship.sender(
        &world.dir,
        &world.primary.conninfo(),
        w.receiver.port,
        &world.certs,
        &world.certs,
        &[],
    );
    w.sender = Some(sender);
    // the backend of the new session is counted from its start (found while the catch-up runs)
    let backend = world.walship_backend().await?;
    w.backend = Some(backend);
    wait_position(&mut w, target_lsn, Duration::from_secs(600)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let gb = backlog_mb / 1000.0;
    let mut cpu = BTreeMap::new();
    cpu.insert(
        "receiver".to_string(),
        (cpu_seconds(w.receiver.pid()).unwrap_or(0.0) - r0) / gb,
    );
    let sender_pid = w.sender.as_ref().map(|s| s.pid()).unwrap_or(0);
    cpu.insert(
        "sender".to_string(),
        cpu_seconds(sender_pid).unwrap_or(0.0) / gb,
    );
    cpu.insert(
        "backend".to_string(),
        cpu_seconds(backend).unwrap_or(0.0) / gb,
    );
    let rss = w
        .pids()
        .into_iter()
        .filter(|(r, _)| r != "backend")
        .map(|(r, p)| (r, peak_rss_mb(p).unwrap_or(0.0)))
        .collect();
    Ok(CatchupResult::new(
        "walship (TLS)".into(),
        round,
        backlog_mb,
        seconds,
        cpu,
        rss,
    ))
}

/// pg_receivewal over TLS with a slot: connect, stop, backlog, restart.
async fn catchup_receivewal(
    world: &World,
    settings: &Settings,
    round: u32,
) -> Result<CatchupResult> {
    let tag = format!("catchup{round}");
    let mut first = world.start_receivewal(&tag, false, true).await?;
    let client = world.primary.connect().await;
    let now = world.primary.flush_lsn(&client).await;
    wait_position(&mut first, now, Duration::from_secs(120)).await?;
    let from = first.position().unwrap_or(now);
    let dir = first.dir.clone();
    drop(first);
    let target_lsn = make_backlog(world, settings.backlog_mb).await?;
    let backlog_mb = target_lsn.saturating_sub(from) as f64 / 1e6;
    let started = Instant::now();
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres sslmode=require",
        world.port
    );
    let child = spawn_receivewal(&dir, &conn, &format!("bench_{tag}"), false)?;
    let mut again = ReceivewalTarget {
        label: "pg_receivewal (TLS)".into(),
        dir,
        seg: world.seg,
        child,
        walsender: None,
        scan: (u64::MAX, 0),
    };
    // the walsender appears once it connects
    let mut walsender_cpu0 = None;
    let t = Instant::now();
    loop {
        if again.walsender.is_none() {
            if let Some(r) = client
                .query_opt(
                    "SELECT pid FROM pg_stat_replication WHERE application_name = 'pg_receivewal'",
                    &[],
                )
                .await?
            {
                let pid = r.get::<_, i32>(0) as u32;
                again.walsender = Some(pid);
                walsender_cpu0 = cpu_seconds(pid);
            }
        }
        if again.position().is_some_and(|p| p >= target_lsn) {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("pg_receivewal did not catch up");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let gb = backlog_mb / 1000.0;
    let mut cpu = BTreeMap::new();
    cpu.insert(
        "pg_receivewal".to_string(),
        cpu_seconds(again.child.id()).unwrap_or(0.0) / gb,
    );
    if let (Some(pid), Some(c0)) = (again.walsender, walsender_cpu0) {
        cpu.insert(
            "walsender".to_string(),
            (cpu_seconds(pid).unwrap_or(c0) - c0) / gb,
        );
    }
    let rss = again
        .pids()
        .into_iter()
        .map(|(r, p)| (r, peak_rss_mb(p).unwrap_or(0.0)))
        .collect();
    let result = CatchupResult::new(again.label.clone(), round, backlog_mb, seconds, cpu, rss);
    drop(again);
    world.drop_slots().await;
    Ok(result)
}

/// Raw speeds of this machine: reading the primary's WAL files, writing with fsync, AES-GCM.
fn ceilings(world: &World, settings: &Settings) -> Result<Ceilings> {
    let wal = world.primary.wal_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&wal)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.len() == 24))
        .collect();
    files.sort();
    let budget = settings.backlog_mb * 1_000_000;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut read = 0u64;
    for f in &files {
        if read >= budget {
            break;
        }
        let file = File::open(f)?;
        let mut off = 0u64;
        while let Ok(n) = file.read_at(&mut buf, off) {
            if n == 0 {
                break;
            }
            off += n as u64;
            read += n as u64;
        }
    }
    let read_mb_s = read as f64 / 1e6 / t.elapsed().as_secs_f64();

    let out = world.dir.subdir("ceiling");
    let t = Instant::now();
    let mut written = 0u64;
    let mut i = 0;
    while written < budget {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(out.join(format!("f{i}")))?;
        for chunk in 0..16u64 {
            f.write_all_at(&buf, chunk << 20)?;
        }
        f.sync_all()?;
        written += 16 << 20;
        i += 1;
    }
    let write_mb_s = written as f64 / 1e6 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&out);

    let aes = Command::new("openssl")
        .args([
            "speed",
            "-elapsed",
            "-seconds",
            if settings.quick { "1" } else { "3" },
            "-evp",
            "aes-256-gcm",
            "-bytes",
            "16384",
        ])
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let line = text
                .lines()
                .rev()
                .find(|l| l.starts_with("AES-256-GCM") || l.starts_with("aes-256-gcm"))?
                .to_owned();
            let v = line
                .split_whitespace()
                .last()?
                .trim_end_matches('k')
                .parse::<f64>()
                .ok()?;
            Some(v * 1000.0 / 1e6)
        })
        .unwrap_or(0.0);
    Ok(Ceilings {
        read_wal_mb_per_s: read_mb_s,
        write_fsync_mb_per_s: write_mb_s,
        aes_gcm_mb_per_s_one_core: aes,
    })
}

// ---------------------------------------------------------------------------------------------- overhead

#[derive(Clone, Debug, Serialize)]
struct OverheadResult {
    tps_without: f64,
    tps_with_walship: f64,
    tps_with_pg_receivewal: f64,
    walship_ratio: f64,
    pg_receivewal_ratio: f64,
    /// The same with the receiving side's files in /dev/shm (its fsyncs off the primary's disk).
    tps_with_walship_target_in_memory: Option<f64>,
    tps_with_pg_receivewal_target_in_memory: Option<f64>,
    walship_ratio_target_in_memory: Option<f64>,
    pg_receivewal_ratio_target_in_memory: Option<f64>,
}

async fn tps(world: &World, seconds: u64) -> Result<f64> {
    let mut cmd = world
        .primary
        .pgbench(&["-c", "4", "-j", "2", "-T", &seconds.to_string(), "-n"]);
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .context("pgbench printed no tps")
}

async fn overhead_scenario(settings: &Settings) -> Result<OverheadResult> {
    let world = World::new("bench-overhead", settings).await?;
    let s = settings.overhead_seconds;
    // warm up, then alternate so drift hits all three alike
    tps(&world, s.min(5)).await?;
    let without1 = tps(&world, s).await?;
    let w = world.start_walship("overhead").await?;
    let with_walship = tps(&world, s).await?;
    drop(w);
    let r = world.start_receivewal("overhead", true, true).await?;
    let with_receivewal = tps(&world, s).await?;
    drop(r);
    world.drop_slots().await;
    // In production the standby's disk is not the primary's: the same two with their files in memory, so
    // only what the shipper costs the primary's CPU (and not its fsyncs on the primary's disk) remains.
    let mut in_memory = None;
    if let Some(memory) = &world.memory {
        let w = world.start_walship_in(memory.path(), "overhead").await?;
        let walship = tps(&world, s).await?;
        drop(w);
        let r = world
            .start_receivewal_in(memory, "overhead_memory", true, true)
            .await?;
        let receivewal = tps(&world, s).await?;
        drop(r);
        world.drop_slots().await;
        in_memory = Some((walship, receivewal));
    }
    let without2 = tps(&world, s).await?;
    let without = (without1 + without2) / 2.0;
    Ok(OverheadResult {
        tps_without: without,
        tps_with_walship: with_walship,
        tps_with_pg_receivewal: with_receivewal,
        walship_ratio: with_walship / without,
        pg_receivewal_ratio: with_receivewal / without,
        tps_with_walship_target_in_memory: in_memory.map(|m| m.0),
        tps_with_pg_receivewal_target_in_memory: in_memory.map(|m| m.1),
        walship_ratio_target_in_memory: in_memory.map(|m| m.0 / without),
        pg_receivewal_ratio_target_in_memory: in_memory.map(|m| m.1 / without),
    })
}

// ---------------------------------------------------------------------------------------------- report

#[derive(Debug, Default, Serialize)]
struct Report {
    machine: String,
    postgres: String,
    quick: bool,
    lag: Vec<LagResult>,
    catchup: Vec<CatchupResult>,
    ceilings: Option<Ceilings>,
    overhead: Option<OverheadResult>,
    crash: Vec<crash::CrashTrial>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!(
        "{} cores, {cpu}, {mem:.0} GiB",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

fn print_crash(r: &Report) {
    if r.crash.is_empty() {
        return;
    }
    println!(
        "\nPostgres crash (kill -9 of the postmaster and its children; the host lives), both shippers in the same trial:\n\
         acknowledged commits not in the target: lost for certain / possibly (bounds from the ledger's flush positions)"
    );
    println!(
        "{:>5} {:>12} | {:>22} {:>9} | {:>22}",
        "trial", "acknowledged", "walship lost", "drain ms", "pg_receivewal --sync lost"
    );
    for t in &r.crash {
        println!(
            "{:>5} {:>12} | {:>22} {:>9} | {:>22}",
            t.trial,
            t.acknowledged,
            format!("{} / {}", t.walship_lost, t.walship_possibly_lost),
            t.walship_drain_ms,
            format!("{} / {}", t.receivewal_lost, t.receivewal_possibly_lost)
        );
    }
}

fn print_report(r: &Report) {
    println!(
        "
walship-bench on {} with {}{}",
        r.machine,
        r.postgres,
        if r.quick { " (--quick)" } else { "" }
    );
    if !r.lag.is_empty() {
        println!("
Lag: ms from a commit's acknowledgement until the target holds it (probe, ~10/s); flush series every 2 ms");
        println!(
            "{:<40} {:<12} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>9} | {:>7} {:>6} {:>9}",
            "target",
            "profile",
            "p50",
            "p95",
            "p99",
            "max",
            "fl p50",
            "fl p99",
            "behind p99",
            "MB/s",
            "tps",
            "CPU s/GB"
        );
        for l in &r.lag {
            println!(
                "{:<40} {:<12} {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>8.2} {:>8.2} {:>9.0} | {:>7.2} {:>6.0} {:>9.2}",
                l.target, l.profile, l.probe_ms.p50, l.probe_ms.p95, l.probe_ms.p99, l.probe_ms.max, l.flush_ms.p50, l.flush_ms.p99,
                l.behind_bytes.p99, l.wal_mb_per_s, l.tps, l.cpu_s_per_gb.values().sum::<f64>()
            );
        }
        for profile in ["unthrottled", "rate 20 tps"] {
            let ours = r
                .lag
                .iter()
                .find(|l| l.target == "walship" && l.profile == profile);
            if let Some(ours) = ours {
                for other in r
                    .lag
                    .iter()
                    .filter(|l| !l.target.starts_with("walship") && l.profile == profile)
                {
                    println!(
                        "  {profile}: {} / walship — p50 {:.1}x, p99 {:.1}x, max {:.1}x",
                        other.target,
                        other.probe_ms.p50 / ours.probe_ms.p50.max(0.001),
                        other.probe_ms.p99 / ours.probe_ms.p99.max(0.001),
                        other.probe_ms.max / ours.probe_ms.max.max(0.001)
                    );
                }
            }
        }
    }
    if !r.catchup.is_empty() {
        println!(
            "
Catch-up after an outage"
        );
        println!(
            "{:<24} {:>5} {:>10} {:>8} {:>8} {:>12} {:<56} peak RSS MB",
            "target", "round", "backlog MB", "s", "MB/s", "CPU s/GB", "per process (s/GB)"
        );
        for c in &r.catchup {
            let per: Vec<String> = c
                .cpu_s_per_gb
                .iter()
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect();
            let rss: Vec<String> = c
                .peak_rss_mb
                .iter()
                .map(|(k, v)| format!("{k} {v:.0}"))
                .collect();
            println!(
                "{:<24} {:>5} {:>10.0} {:>8.2} {:>8.0} {:>12.2} {:<56} {}",
                c.target,
                c.round + 1,
                c.backlog_mb,
                c.seconds,
                c.mb_per_s,
                c.cpu_s_per_gb_total,
                per.join(", "),
                rss.join(", ")
            );
        }
        let best = |walship: bool| {
            r.catchup
                .iter()
                .filter(|c| c.target.starts_with("walship") == walship)
                .max_by(|a, b| a.mb_per_s.total_cmp(&b.mb_per_s))
        };
        if let (Some(w), Some(p)) = (best(true), best(false)) {
            println!(
                "  best rounds, walship / pg_receivewal: {:.2}x the speed, {:.2}x the CPU per GB",
                w.mb_per_s / p.mb_per_s,
                w.cpu_s_per_gb_total / p.cpu_s_per_gb_total.max(0.001)
            );
        }
        if let Some(c) = &r.ceilings {
            println!(
                "  ceilings here: reading WAL files {:.0} MB/s, writing with fsync {:.0} MB/s, AES-256-GCM {:.0} MB/s per core",
                c.read_wal_mb_per_s, c.write_fsync_mb_per_s, c.aes_gcm_mb_per_s_one_core
            );
        }
    }
    if let Some(o) = &r.overhead {
        println!(
            "
Primary overhead (pgbench -c 4 -j 2 TPS)"
        );
        println!("  without a shipper {:.0}, with walship {:.0} ({:.1} %), with pg_receivewal --synchronous over TLS {:.0} ({:.1} %)", o.tps_without, o.tps_with_walship, o.walship_ratio * 100.0, o.tps_with_pg_receivewal, o.pg_receivewal_ratio * 100.0);
        if let (Some(w), Some(p)) = (
            o.tps_with_walship_target_in_memory,
            o.tps_with_pg_receivewal_target_in_memory,
        ) {
            println!("  receiving side's files in /dev/shm (its fsyncs off the primary's disk): with walship {:.0} ({:.1} %), with pg_receivewal --synchronous over TLS {:.0} ({:.1} %)", w, w / o.tps_without * 100.0, p, p / o.tps_without * 100.0);
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let settings = Settings::from_args()?;
    if std::env::var_os("WALSHIP_BIN_DIR").is_none() {
        walship_tests::daemon::build_daemons()?;
    }
    let postgres = String::from_utf8_lossy(
        &Command::new(pg_bin().join("postgres"))
            .arg("--version")
            .output()?
            .stdout,
    )
    .trim()
    .to_owned();
    let mut report = Report {
        machine: machine(),
        postgres,
        quick: settings.quick,
        ..Default::default()
    };
    let run = async {
        if settings.scenarios.iter().any(|s| s == "lag") {
            eprintln!("lag ...");
            report.lag = lag_scenario(&settings).await?;
        }
        if settings.scenarios.iter().any(|s| s == "catchup") {
            eprintln!("catch-up ...");
            let (c, ceil) = catchup_scenario(&settings).await?;
            report.catchup = c;
            report.ceilings = Some(ceil);
        }
        if settings.scenarios.iter().any(|s| s == "overhead") {
            eprintln!("overhead ...");
            report.overhead = Some(overhead_scenario(&settings).await?);
        }
        if settings.scenarios.iter().any(|s| s == "crash") {
            eprintln!("crash of postgres ...");
            report.crash = crash::crash_scenario(&settings).await?;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = run => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
    print_report(&report);
    print_crash(&report);
    std::fs::write(&settings.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("write {}", settings.json.display()))?;
    println!(
        "
results written to {}",
        settings.json.display()
    );
    Ok(())
}
