//! Scenario `verify`: `walship-receiver verify` against `pg_waldump --quiet` over the same segments, each
//! pinned to one core, and the cost per GB of the object store's encryption at rest (age) beside its zstd,
//! on upload and on restore.

#[allow(unused_imports)]
use crate::*;

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct VerifyResult {
    pub(crate) wal_mb: f64,
    pub(crate) segments: usize,
    pub(crate) records: u64,
    pub(crate) walship_verify_seconds: f64,
    pub(crate) pg_waldump_seconds: f64,
    /// walship's time over pg_waldump's (below 1: faster).
    pub(crate) ratio: f64,
    /// CPU seconds per GB of WAL, one core: zstd (level 3, as stored) and zstd + age on upload; the reverse
    /// on restore.
    pub(crate) upload_zstd_s_per_gb: f64,
    pub(crate) upload_zstd_age_s_per_gb: f64,
    pub(crate) restore_zstd_s_per_gb: f64,
    pub(crate) restore_age_zstd_s_per_gb: f64,
}

/// Runs `cmd` pinned to core 0 as the database user; returns its wall time (a single-threaded process).
fn timed_on_one_core(cmd: &mut Command) -> Result<(f64, std::process::Output)> {
    let started = Instant::now();
    let out = as_db_user(cmd).output()?;
    Ok((started.elapsed().as_secs_f64(), out))
}

pub(crate) async fn verify_scenario(settings: &Settings) -> Result<VerifyResult> {
    let world = World::new("bench-verify", settings).await?;
    let client = world.primary.connect().await;
    let seg = world.seg;
    let start = world.primary.flush_lsn(&client).await;
    // WAL of both shapes: pgbench's small records, then large ones
    run_ok(
        &mut world
            .primary
            .pgbench(&["-i", "-s", &settings.scale.to_string(), "-q"]),
    );
    let seconds = if settings.quick { "3" } else { "20" };
    run_ok(
        &mut world
            .primary
            .pgbench(&["-c", "4", "-j", "2", "-T", seconds, "-n"]),
    );
    make_backlog(&world, settings.backlog_mb).await?;
    let end = world.primary.switch_wal(&client).await;
    let system_identifier: i64 = client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await?
        .get(0);
    let version: String = client
        .query_one("SHOW server_version_num", &[])
        .await?
        .get(0);

    // the complete segments from the first full one after `start` to the switch, as an archive
    let archive = world.dir.path().join("verify-archive");
    std::fs::create_dir_all(&archive)?;
    let (first, last) = (seg.segno(start) + 1, seg.segno(end) - 1);
    let mut files = Vec::new();
    for segno in first..=last {
        let name = walship_protocol::wal::segment_file_name(1, segno, seg);
        std::fs::copy(world.primary.wal_dir().join(&name), archive.join(&name))
            .with_context(|| format!("copy {name}"))?;
        files.push(archive.join(&name));
    }
    let id = walship_receiver::archive::Identity {
        system_identifier: system_identifier as u64,
        wal_segment_size: seg,
        pg_version_num: version.parse()?,
    };
    std::fs::write(archive.join("walship.id"), id.render())?;
    walship_tests::env::chown_to_db_user(&archive);
    for e in std::fs::read_dir(&archive)?.flatten() {
        walship_tests::env::chown_to_db_user(&e.path());
    }
    let wal_bytes = files.len() as u64 * seg.as_u64();

    // read once each to have the files in the page cache for both
    for f in &files {
        std::fs::read(f)?;
    }
    // each twice, alternating; the faster run of each counts (both read from the page cache)
    let from = seg.segment_start(first);
    let to = seg.segment_start(last + 1);
    let (mut walship_seconds, mut waldump_seconds) = (f64::MAX, f64::MAX);
    let mut records = 0;
    for _ in 0..2 {
        let (seconds, out) = timed_on_one_core(
            Command::new("taskset")
                .args(["-c", "0"])
                .arg(world.walship.path(Walship::RECEIVER))
                .args(["verify", "--json", "--archive"])
                .arg(&archive),
        )?;
        walship_seconds = walship_seconds.min(seconds);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("verify: {}", String::from_utf8_lossy(&out.stderr)))?;
        if report["problems"].as_u64() != Some(0) {
            bail!("verify found problems in the primary's own WAL: {report:#}");
        }
        records = report["timelines"][0]["records"].as_u64().unwrap_or(0);
        let (seconds, out) = timed_on_one_core(
            Command::new("taskset")
                .args(["-c", "0"])
                .arg(pg_bin().join("pg_waldump"))
                .arg("--quiet")
                .arg("--path")
                .arg(&archive)
                .args([
                    "--timeline",
                    "1",
                    "--start",
                    &from.to_string(),
                    "--end",
                    &to.to_string(),
                ]),
        )?;
        waldump_seconds = waldump_seconds.min(seconds);
        if !out.status.success() {
            // the end of the range may fall inside a record continued into the next (absent) segment
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("error in WAL record") {
                bail!("pg_waldump failed: {err}");
            }
        }
    }

    // encryption's cost per GB on upload and restore, one core, on these segments
    let key_dir = world.dir.path().join("verify-key");
    std::fs::create_dir_all(&key_dir)?;
    let public = walship_receiver::crypt::keygen(&key_dir.join("store.key"))?;
    let recipients =
        walship_receiver::crypt::Recipients::parse(&[public])?.context("a recipient")?;
    let identities = walship_receiver::crypt::Identities::load(&key_dir.join("store.key"))?;
    let (mut zstd_up, mut age_up, mut age_down, mut zstd_down) = (0f64, 0f64, 0f64, 0f64);
    let rounds = files.len().min(if settings.quick { 8 } else { 64 });
    for f in files.iter().take(rounds) {
        let raw = std::fs::read(f)?;
        let t = Instant::now();
        let mut c = zstd::bulk::Compressor::new(3)?;
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
        let compressed = c.compress(&raw)?;
        zstd_up += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let stored = recipients.encrypt(&compressed, (raw.len() as u64, 0))?;
        age_up += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (h, age_file) = walship_receiver::crypt::split(&stored).context("encrypted")?;
        let plain = walship_receiver::crypt::decrypt(
            "bench",
            &h.key_ids,
            age_file,
            Some(&identities),
            1 << 31,
        )?;
        age_down += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let back = zstd::stream::decode_all(&plain[..])?;
        zstd_down += t.elapsed().as_secs_f64();
        if back != raw {
            bail!("the encrypted round trip changed {}", f.display());
        }
    }
    let gb = (rounds as u64 * seg.as_u64()) as f64 / 1e9;
    Ok(VerifyResult {
        wal_mb: wal_bytes as f64 / 1e6,
        segments: files.len(),
        records,
        walship_verify_seconds: walship_seconds,
        pg_waldump_seconds: waldump_seconds,
        ratio: walship_seconds / waldump_seconds,
        upload_zstd_s_per_gb: zstd_up / gb,
        upload_zstd_age_s_per_gb: (zstd_up + age_up) / gb,
        restore_zstd_s_per_gb: zstd_down / gb,
        restore_age_zstd_s_per_gb: (zstd_down + age_down) / gb,
    })
}

pub(crate) fn print_verify(r: &VerifyResult) {
    println!(
        "\nVerify: {:.0} MB of WAL ({} segments, {} records), one core each, files in the page cache, best of 2",
        r.wal_mb, r.segments, r.records
    );
    println!(
        "  walship-receiver verify {:.2} s ({:.0} MB/s), pg_waldump --quiet {:.2} s ({:.0} MB/s): walship/pg_waldump {:.2}x",
        r.walship_verify_seconds,
        r.wal_mb / r.walship_verify_seconds,
        r.pg_waldump_seconds,
        r.wal_mb / r.pg_waldump_seconds,
        r.ratio
    );
    println!(
        "Encryption at rest (CPU s per GB of WAL, one core): upload zstd {:.2}, zstd + age {:.2}; restore zstd {:.2}, age + zstd {:.2}",
        r.upload_zstd_s_per_gb, r.upload_zstd_age_s_per_gb, r.restore_zstd_s_per_gb, r.restore_age_zstd_s_per_gb
    );
}
