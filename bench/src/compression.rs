//! Scenario `compression` (issue 13): what zstd does to WAL on the wire and at rest, and how fast a standby
//! restores from the object store.
//!
//! 1. **Wire**: for the primary's `wal_compression` off and lz4, a pgbench backlog (after a checkpoint, so
//!    with full-page images) built while the sender is stopped, then caught up with `--compression zstd` and
//!    with `--compression none`: bytes on the wire against raw WAL (the receiver's counters), MB/s, CPU s/GB
//!    of the sender and the receiver.
//! 2. **At rest**: the same segments compressed as the object store keeps them (zstd level 3, and level 1 for
//!    comparison) on one core: ratio, MB/s, CPU s/GB.
//! 3. **Restore**: a pgbench backlog and a bulk load in a real S3-compatible server (s3s-fs, as the tests use); three standbys
//!    from one base backup each recover it in archive recovery: from the local archive (replay is the
//!    limit), from the store alone with prefetch (the default, 8 segments), and from the store without it.

#[allow(unused_imports)]
use crate::*;

use walship_tests::metrics::{metrics_port, sample, scrape};
use walship_tests::s3::S3Server;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct WireResult {
    /// The primary's `wal_compression`.
    pub(crate) wal_compression: String,
    /// The sender's `--compression`.
    pub(crate) compression: String,
    pub(crate) wal_mb: f64,
    pub(crate) wire_mb: f64,
    pub(crate) ratio: f64,
    pub(crate) seconds: f64,
    pub(crate) mb_per_s: f64,
    pub(crate) sender_cpu_s_per_gb: f64,
    pub(crate) receiver_cpu_s_per_gb: f64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct AtRestResult {
    pub(crate) wal_compression: String,
    pub(crate) level: i32,
    pub(crate) segments: usize,
    pub(crate) ratio: f64,
    pub(crate) mb_per_s_one_core: f64,
    pub(crate) cpu_s_per_gb: f64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct RestoreResult {
    pub(crate) source: String,
    pub(crate) segments: u64,
    pub(crate) seconds: f64,
    pub(crate) segments_per_s: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct CompressionReport {
    pub(crate) wire: Vec<WireResult>,
    pub(crate) at_rest: Vec<AtRestResult>,
    pub(crate) restore: Vec<RestoreResult>,
    pub(crate) notes: Vec<String>,
}

pub(crate) async fn compression_scenario(settings: &Settings) -> Result<CompressionReport> {
    let mut report = CompressionReport::default();
    let backlog_seconds = if settings.quick { "3" } else { "20" };
    for wal_compression in ["off", "lz4"] {
        let world = World::new(&format!("bench-compress-{wal_compression}"), settings).await?;
        let client = world.primary.connect().await;
        // ALTER SYSTEM runs outside a transaction block: a statement of its own
        let set = client
            .batch_execute(&format!(
                "ALTER SYSTEM SET wal_compression = '{wal_compression}'"
            ))
            .await;
        if let Err(e) = set {
            let why = e
                .as_db_error()
                .map_or(e.to_string(), |d| d.message().to_owned());
            report.notes.push(format!(
                "wal_compression = {wal_compression} is not available on this server ({why}); skipped"
            ));
            continue;
        }
        client.batch_execute("SELECT pg_reload_conf()").await?;
        let mut archives = Vec::new();
        for compression in ["zstd", "none"] {
            let (result, archive) =
                wire_round(&world, wal_compression, compression, backlog_seconds).await?;
            report.wire.push(result);
            archives.push(archive);
        }
        for level in [1, 3] {
            report
                .at_rest
                .push(at_rest(&archives[0], wal_compression, level)?);
        }
    }
    Ok(report)
}

/// Scenario `restore`: archive recovery from the local archive and from the store.
pub(crate) async fn restore_scenario(settings: &Settings) -> Result<Vec<RestoreResult>> {
    restore_speed(settings, if settings.quick { "3" } else { "20" }).await
}

/// Bytes on the wire and WAL bytes the receiver of `metrics` has counted.
fn wire_counters(metrics: u16) -> (f64, f64) {
    let text = scrape(metrics);
    (
        sample(&text, "walship_receiver_wire_wal_bytes_total").unwrap_or(0.0),
        sample(&text, "walship_receiver_wal_bytes_received_total").unwrap_or(0.0),
    )
}

/// One catch-up of a pgbench backlog with the sender's `--compression compression`.
async fn wire_round(
    world: &World,
    wal_compression: &str,
    compression: &str,
    backlog_seconds: &str,
) -> Result<(WireResult, PathBuf)> {
    let archive = world
        .dir
        .path()
        .join(format!("archive-{wal_compression}-{compression}"));
    let mut receiver = world.walship.receiver_with(
        &world.dir,
        &archive,
        &world.certs,
        0,
        &["--metrics-listen", "127.0.0.1:0"],
        &[],
    );
    let metrics = metrics_port(&mut receiver);
    let sender_args = ["--compression", compression];
    let start_sender = || world.start_sender_with(receiver.port, &sender_args);
    // the archive holds what is there; then the sender stops and a backlog builds
    let client = world.primary.connect().await;
    let now = world.primary.flush_lsn(&client).await;
    let mut sender = start_sender();
    wait_archive(&archive, now, Duration::from_secs(300)).await?;
    sender.terminate(Duration::from_secs(20));
    client.batch_execute("CHECKPOINT").await?;
    run_ok(
        &mut world
            .primary
            .pgbench(&["-c", "4", "-j", "2", "-T", backlog_seconds, "-n"]),
    );
    let target = world.primary.flush_lsn(&client).await;
    let (wire0, raw0) = wire_counters(metrics);
    let r0 = cpu_seconds(receiver.pid()).unwrap_or(0.0);
    let started = Instant::now();
    let sender = start_sender();
    wait_archive(&archive, target, Duration::from_secs(600)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let (_, raw1) = wire_counters(metrics);
    let sender_cpu = cpu_seconds(sender.pid()).unwrap_or(0.0);
    let receiver_cpu = cpu_seconds(receiver.pid()).unwrap_or(0.0) - r0;
    // WAL written after the target (autovacuum after pgbench) may be on the wire and not yet appended: the
    // ratio is taken once the sender has stopped, which waits until the receiver acknowledged all it sent
    let mut sender = sender;
    sender.terminate(Duration::from_secs(20));
    let (wire2, raw2) = wire_counters(metrics);
    let wal_mb = (raw1 - raw0) / 1e6;
    let gb = wal_mb / 1000.0;
    let ratio = (raw2 - raw0) / (wire2 - wire0).max(1.0);
    let result = WireResult {
        wal_compression: wal_compression.into(),
        compression: compression.into(),
        wal_mb,
        wire_mb: wal_mb / ratio,
        ratio,
        seconds,
        mb_per_s: wal_mb / seconds,
        sender_cpu_s_per_gb: sender_cpu / gb,
        receiver_cpu_s_per_gb: receiver_cpu / gb,
    };
    drop(sender);
    drop(receiver);
    Ok((result, archive))
}

async fn wait_archive(archive: &Path, lsn: Lsn, limit: Duration) -> Result<()> {
    let t = Instant::now();
    while walship_receiver_position(archive).is_none_or(|p| p < lsn) {
        if t.elapsed() > limit {
            bail!("{} did not reach {lsn} within {limit:?}", archive.display());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The archive's complete segments compressed one by one at `level`, as the store keeps them.
fn at_rest(archive: &Path, wal_compression: &str, level: i32) -> Result<AtRestResult> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(archive)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .collect();
    names.sort();
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    let (mut raw, mut packed, mut busy) = (0usize, 0usize, Duration::ZERO);
    for path in &names {
        let bytes = std::fs::read(path)?;
        let t = Instant::now();
        packed += compressor.compress(&bytes)?.len();
        busy += t.elapsed();
        raw += bytes.len();
    }
    let mb = raw as f64 / 1e6;
    Ok(AtRestResult {
        wal_compression: wal_compression.into(),
        level,
        segments: names.len(),
        ratio: raw as f64 / packed.max(1) as f64,
        mb_per_s_one_core: mb / busy.as_secs_f64().max(1e-9),
        cpu_s_per_gb: busy.as_secs_f64() / (mb / 1000.0).max(1e-9),
    })
}

/// Archive recovery of one pgbench backlog and bulk load from the local archive, and from the store alone with and without
/// prefetch.
async fn restore_speed(settings: &Settings, backlog_seconds: &str) -> Result<Vec<RestoreResult>> {
    let world = World::new("bench-restore", settings).await?;
    let s3 = S3Server::start(&world.dir, "s3");
    let env = s3.env();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = s3.url("bench");
    let archive = world.dir.path().join("archive");
    let receiver = world.walship.receiver_with(
        &world.dir,
        &archive,
        &world.certs,
        0,
        &["--object-store", &url],
        &env_refs,
    );
    let mut sender = world.start_sender(receiver.port);
    let sources = [
        ("local archive", None),
        ("object store, prefetch 8 (default)", Some(8)),
        ("object store, no prefetch", Some(0)),
    ];
    let mut standbys = Vec::new();
    for (i, _) in sources.iter().enumerate() {
        standbys.push(
            world
                .primary
                .base_backup(&world.dir, &format!("standby{i}")),
        );
    }
    let client = world.primary.connect().await;
    let from = world.primary.flush_lsn(&client).await;
    run_ok(
        &mut world
            .primary
            .pgbench(&["-c", "4", "-j", "2", "-T", backlog_seconds, "-n"]),
    );
    // and a bulk load: enough segments for a steady state
    make_backlog(&world, if settings.quick { 32 } else { 384 }).await?;
    let end = world.primary.switch_wal(&client).await;
    let seg = world.seg;
    let last = walship_protocol::wal::segment_file_name(1, seg.segno(end) - 1, seg);
    wait_archive(&archive, end, Duration::from_secs(300)).await?;
    let t = Instant::now();
    while walship_receiver::upload::read_state(&archive)
        .and_then(|s| s.segments_up_to)
        .is_none_or(|up_to| up_to < last)
    {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("the store did not get {last} within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sender.terminate(Duration::from_secs(20));
    let segments = seg.segno(end) - seg.segno(from);
    let receiver_bin = world.walship.path(Walship::RECEIVER);
    let env_prefix: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut results = Vec::new();
    for ((source, prefetch), mut standby) in sources.into_iter().zip(standbys) {
        let command = match prefetch {
            None => format!(
                "{} restore --archive {} %f %p",
                receiver_bin.display(),
                archive.display()
            ),
            Some(n) => {
                let local = world.dir.subdir(&format!("empty-{n}"));
                walship_tests::env::chown_to_db_user(&local);
                format!(
                    "env {} {} restore --archive {} --object-store {url} --prefetch {n} %f %p",
                    env_prefix.join(" "),
                    receiver_bin.display(),
                    local.display()
                )
            }
        };
        // the primary's port is in the copied configuration: the standby listens on its socket only
        standby.configure_recovery(&command, false, &["listen_addresses = ''"]);
        let started = Instant::now();
        standby.start_no_wait();
        loop {
            // recovery ends by itself at the end of the archive and the server leaves recovery
            if let Some(c) = standby.try_connect().await {
                let done = c
                    .query_one("SELECT NOT pg_is_in_recovery()", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, bool>(0));
                if done {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(900) {
                bail!("{source}: recovery did not end within 900 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        standby.stop("fast");
        results.push(RestoreResult {
            source: source.into(),
            segments,
            seconds,
            segments_per_s: segments as f64 / seconds,
        });
    }
    // the restore calls alone, one after the other as recovery makes them, with no replay to share the CPU
    let local = world.dir.subdir("empty-calls");
    walship_tests::env::chown_to_db_user(&local);
    let dest = local.join("RECOVERYXLOG");
    let first = seg.segno(from);
    let started = Instant::now();
    for segno in first..first + segments {
        let name = walship_protocol::wal::segment_file_name(1, segno, seg);
        let mut cmd = Command::new(&receiver_bin);
        cmd.args(["restore", "--archive"])
            .arg(&local)
            .args(["--object-store", &url])
            .arg(&name)
            .arg(&dest)
            .envs(env_refs.iter().copied());
        // its output is not captured: the prefetcher it starts keeps stderr open (PostgreSQL waits for the
        // command's exit only)
        let status = as_db_user(&mut cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("restore {name} from the store failed ({status}); run it by hand to see why");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    results.push(RestoreResult {
        source: "object store, restore calls alone (no replay)".into(),
        segments,
        seconds,
        segments_per_s: segments as f64 / seconds,
    });
    drop(receiver);
    Ok(results)
}

pub(crate) fn print_compression(r: &CompressionReport) {
    if r.wire.is_empty() && r.restore.is_empty() {
        return;
    }
    println!("\nCompression on the wire: a pgbench backlog caught up (after a checkpoint: with full-page images)");
    println!(
        "{:<16} {:<12} {:>9} {:>9} {:>7} {:>8} {:>14} {:>16}",
        "wal_compression",
        "--compression",
        "WAL MB",
        "wire MB",
        "ratio",
        "MB/s",
        "sender s/GB",
        "receiver s/GB"
    );
    for w in &r.wire {
        println!(
            "{:<16} {:<12} {:>9.1} {:>9.1} {:>7.2} {:>8.1} {:>14.2} {:>16.2}",
            w.wal_compression,
            w.compression,
            w.wal_mb,
            w.wire_mb,
            w.ratio,
            w.mb_per_s,
            w.sender_cpu_s_per_gb,
            w.receiver_cpu_s_per_gb
        );
    }
    println!("\nAt rest (the object store's zstd, one core, segment by segment)");
    println!(
        "{:<16} {:>6} {:>9} {:>7} {:>12} {:>9}",
        "wal_compression", "level", "segments", "ratio", "MB/s", "CPU s/GB"
    );
    for a in &r.at_rest {
        println!(
            "{:<16} {:>6} {:>9} {:>7.2} {:>12.1} {:>9.2}",
            a.wal_compression, a.level, a.segments, a.ratio, a.mb_per_s_one_core, a.cpu_s_per_gb
        );
    }
    println!(
        "\nArchive recovery of a pgbench backlog and a bulk load (one base backup per source)"
    );
    println!(
        "{:<46} {:>9} {:>9} {:>12}",
        "source", "segments", "seconds", "segments/s"
    );
    for x in &r.restore {
        println!(
            "{:<46} {:>9} {:>9.2} {:>12.2}",
            x.source, x.segments, x.seconds, x.segments_per_s
        );
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}
