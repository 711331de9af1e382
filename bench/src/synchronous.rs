//! Scenario `synchronous`: the primary's pgbench TPS and commit latency (as pgbench reports them) with walship
//! `--synchronous` as the synchronous standby, side by side with pg_receivewal `--synchronous` as the
//! synchronous standby, and both asynchronous. Order: walship sync, pg_receivewal sync, twice, walship sync
//! again, then walship async and pg_receivewal async; each run starts right after a checkpoint. Then the two
//! synchronous standbys with their files in /dev/shm (the standby's disk not the primary's), alternated twice,
//! and with `--sync-rate` both at a steady rate, alternated twice, on the primary's disk and in /dev/shm.

#[allow(unused_imports)]
use crate::*;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct PgbenchRun {
    pub(crate) label: String,
    pub(crate) tps: f64,
    pub(crate) latency_ms: f64,
    /// At a steady rate: the median and 99th percentile of the transactions' own latency (pgbench -l,
    /// without the schedule lag), in ms.
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct SynchronousResult {
    pub(crate) runs: Vec<PgbenchRun>,
    /// walship --synchronous: mean of its three runs (pg_receivewal's: of its two).
    pub(crate) walship_sync_tps: f64,
    pub(crate) walship_sync_latency_ms: f64,
    pub(crate) receivewal_sync_tps: f64,
    pub(crate) receivewal_sync_latency_ms: f64,
    pub(crate) walship_async_tps: f64,
    pub(crate) walship_async_latency_ms: f64,
    pub(crate) receivewal_async_tps: f64,
    /// walship sync TPS / pg_receivewal sync TPS (target ≥ 1.1).
    pub(crate) tps_ratio: f64,
    /// walship sync latency / pg_receivewal sync latency (target ≤ 0.9).
    pub(crate) latency_ratio: f64,
    /// walship sync latency / walship async latency (target ≤ 1.2).
    pub(crate) latency_vs_async: f64,
    /// The same two synchronous standbys with their files in /dev/shm (a standby whose disk is not the
    /// primary's, as in production): mean TPS and latency of each (0: no /dev/shm).
    pub(crate) walship_sync_in_memory_tps: f64,
    pub(crate) walship_sync_in_memory_latency_ms: f64,
    pub(crate) receivewal_sync_in_memory_tps: f64,
    pub(crate) receivewal_sync_in_memory_latency_ms: f64,
    /// `--sync-rate`: the throttled runs' rate (0: none ran) and each tool's median commit latency there
    /// (the mean of its runs' medians).
    pub(crate) rate: u32,
    pub(crate) walship_sync_p50_at_rate_ms: f64,
    pub(crate) receivewal_sync_p50_at_rate_ms: f64,
    /// The same with the receiving sides in /dev/shm (0: not run).
    pub(crate) walship_sync_p50_at_rate_in_memory_ms: f64,
    pub(crate) receivewal_sync_p50_at_rate_in_memory_ms: f64,
}

/// What one pgbench run printed and logged.
pub(crate) struct Pgbench {
    pub(crate) tps: f64,
    /// As pgbench prints it (with a rate: from each transaction's scheduled start).
    pub(crate) latency_ms: f64,
    /// With a rate: the median and 99th percentile of the transactions' own latency.
    pub(crate) percentiles_ms: Option<(f64, f64)>,
}

/// pgbench `-c 4 -j 2` for `seconds`, at `rate` transactions per second if given (then each transaction is
/// logged: on a shared VM a stall of a few hundred ms moves the average of a steady-rate run by tens of ms,
/// the median not).
pub(crate) async fn pgbench_run(world: &World, seconds: u64, rate: Option<u32>) -> Result<Pgbench> {
    let seconds = seconds.to_string();
    let rate = rate.map(|r| r.to_string());
    let mut args = vec!["-c", "4", "-j", "2", "-T", &seconds, "-n"];
    let logs = world
        .dir
        .path()
        .join(format!("pgbench-log-{}", std::process::id()));
    let prefix = format!("--log-prefix={}/tx", logs.display());
    if let Some(r) = &rate {
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs)?;
        // pgbench runs as the database's OS user
        std::fs::set_permissions(&logs, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        args.extend(["-R", r, "-l", &prefix]);
    }
    let out = world.primary.pgbench(&args).output()?;
    let percentiles_ms = match rate {
        Some(_) => Some(logged_percentiles(&logs)?),
        None => None,
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |prefix: &str, nth: usize| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(nth))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Ok(Pgbench {
        tps: value("tps", 2).context("pgbench printed no tps")?,
        latency_ms: value("latency average", 3).context("pgbench printed no latency")?,
        percentiles_ms,
    })
}

/// The median and 99th percentile (ms) of the latencies in pgbench's transaction logs in `dir` (third field,
/// µs), which are then removed.
fn logged_percentiles(dir: &std::path::Path) -> Result<(f64, f64)> {
    let mut us = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        us.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    std::fs::remove_dir_all(dir)?;
    anyhow::ensure!(
        !us.is_empty(),
        "pgbench logged no transaction in {}",
        dir.display()
    );
    us.sort_unstable();
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    Ok((at(0.5), at(0.99)))
}

pub(crate) async fn synchronous_scenario(settings: &Settings) -> Result<SynchronousResult> {
    let world = World::new("bench-synchronous", settings).await?;
    let s = settings.overhead_seconds;
    pgbench_run(&world, s.min(5), None).await?; // warm up
    let client = world.primary.connect().await;
    let mut runs = Vec::new();
    // Each run starts right after a checkpoint, so that every run writes the same share of full-page
    // images (without it, the first runs after start write more WAL per transaction than the later ones).
    // (tps, latency: the average without a rate, the median with one)
    let mut measure = async |label: &str, rate: Option<u32>| -> Result<(f64, f64)> {
        client.batch_execute("CHECKPOINT").await?;
        let run = pgbench_run(&world, s, rate).await?;
        let (tps, latency_ms) = (run.tps, run.latency_ms);
        let label = match rate {
            Some(r) => format!("{label} at {r} tps"),
            None => label.to_owned(),
        };
        let (p50_ms, p99_ms) = run.percentiles_ms.unzip();
        match run.percentiles_ms {
            Some((p50, p99)) => eprintln!(
                "  {label}: {tps:.0} tps, {latency_ms:.2} ms; p50 {p50:.2} ms, p99 {p99:.2} ms"
            ),
            None => eprintln!("  {label}: {tps:.0} tps, {latency_ms:.2} ms"),
        }
        runs.push(PgbenchRun {
            label,
            tps,
            latency_ms,
            p50_ms,
            p99_ms,
        });
        Ok((tps, p50_ms.unwrap_or(latency_ms)))
    };
    let base = world.dir.path().to_owned();
    // alternating, walship first and last: drift over the run shows in the spread of each tool's runs
    let mut walship_sync = Vec::new();
    let mut reference_sync = Vec::new();
    for round in 1..=2 {
        world.synchronous_standby_names("walship").await?;
        let w = world
            .start_walship_with(&base, &format!("sync-{round}"), Some(&["--synchronous"]))
            .await?;
        walship_sync.push(measure("walship --synchronous", None).await?);
        drop(w);
        world.synchronous_standby_names("pg_receivewal").await?;
        let r = world
            .start_receivewal(&format!("sync-{round}"), true, false)
            .await?;
        reference_sync
            .push(measure("pg_receivewal --synchronous (synchronous standby)", None).await?);
        drop(r);
        world.drop_slots().await;
    }
    world.synchronous_standby_names("walship").await?;
    let w = world
        .start_walship_with(&base, "sync-3", Some(&["--synchronous"]))
        .await?;
    walship_sync.push(measure("walship --synchronous", None).await?);
    drop(w);
    world.synchronous_standby_names("").await?;
    let w = world.start_walship_with(&base, "async", None).await?;
    let w_async = measure("walship (async)", None).await?;
    drop(w);
    let r = world.start_receivewal("async", true, false).await?;
    let r_async = measure("pg_receivewal --synchronous (async)", None).await?;
    drop(r);
    world.drop_slots().await;
    // The standby's disk is not the primary's in production: here both receiving sides write into memory
    // (their fsyncs cost nothing), alternated twice, so the primary's disk serves the primary alone
    let (mut walship_memory, mut reference_memory) = (Vec::new(), Vec::new());
    if let Some(memory) = &world.memory {
        for round in 1..=2 {
            world.synchronous_standby_names("walship").await?;
            let w = world
                .start_walship_with(
                    memory.path(),
                    &format!("sync-memory-{round}"),
                    Some(&["--synchronous"]),
                )
                .await?;
            walship_memory.push(measure("walship --synchronous, archive in /dev/shm", None).await?);
            drop(w);
            world.synchronous_standby_names("pg_receivewal").await?;
            let r = world
                .start_receivewal_in(memory, &format!("sync-memory-{round}"), true, false)
                .await?;
            reference_memory.push(
                measure(
                    "pg_receivewal --synchronous (synchronous standby), in /dev/shm",
                    None,
                )
                .await?,
            );
            drop(r);
            world.drop_slots().await;
        }
        world.synchronous_standby_names("").await?;
    }
    // at a steady rate, alternating: the commit latency of each path where the CPU has room; on the
    // primary's disk, then (where /dev/shm is) with the receiving sides in memory
    let (mut walship_rate, mut reference_rate) = (Vec::new(), Vec::new());
    let (mut walship_rate_memory, mut reference_rate_memory) = (Vec::new(), Vec::new());
    if settings.sync_rate > 0 {
        let rate = Some(settings.sync_rate);
        let places = std::iter::once(None).chain(world.memory.as_ref().map(Some));
        for memory in places {
            let (suffix, tag) = match memory {
                Some(_) => (", in /dev/shm", "rate-memory"),
                None => ("", "rate"),
            };
            for round in 1..=2 {
                world.synchronous_standby_names("walship").await?;
                let w = world
                    .start_walship_with(
                        memory.map_or(base.as_path(), |m| m.path()),
                        &format!("{tag}-{round}"),
                        Some(&["--synchronous"]),
                    )
                    .await?;
                let run = measure(&format!("walship --synchronous{suffix}"), rate).await?;
                match memory {
                    Some(_) => walship_rate_memory.push(run),
                    None => walship_rate.push(run),
                }
                drop(w);
                world.synchronous_standby_names("pg_receivewal").await?;
                let r = world
                    .start_receivewal_in(
                        memory.unwrap_or(&world.dir),
                        &format!("{tag}-{round}"),
                        true,
                        false,
                    )
                    .await?;
                let label = format!("pg_receivewal --synchronous (synchronous standby){suffix}");
                let run = measure(&label, rate).await?;
                match memory {
                    Some(_) => reference_rate_memory.push(run),
                    None => reference_rate.push(run),
                }
                drop(r);
                world.drop_slots().await;
            }
        }
        world.synchronous_standby_names("").await?;
    }
    let mean =
        |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let mean_or_zero = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        if v.is_empty() {
            0.0
        } else {
            mean(v, f)
        }
    };
    let sync_tps = mean(&walship_sync, |r| r.0);
    let sync_latency = mean(&walship_sync, |r| r.1);
    let ref_tps = mean(&reference_sync, |r| r.0);
    let ref_latency = mean(&reference_sync, |r| r.1);
    Ok(SynchronousResult {
        runs,
        walship_sync_tps: sync_tps,
        walship_sync_latency_ms: sync_latency,
        receivewal_sync_tps: ref_tps,
        receivewal_sync_latency_ms: ref_latency,
        walship_async_tps: w_async.0,
        walship_async_latency_ms: w_async.1,
        receivewal_async_tps: r_async.0,
        tps_ratio: sync_tps / ref_tps,
        latency_ratio: sync_latency / ref_latency,
        latency_vs_async: sync_latency / w_async.1,
        walship_sync_in_memory_tps: mean_or_zero(&walship_memory, |r| r.0),
        walship_sync_in_memory_latency_ms: mean_or_zero(&walship_memory, |r| r.1),
        receivewal_sync_in_memory_tps: mean_or_zero(&reference_memory, |r| r.0),
        receivewal_sync_in_memory_latency_ms: mean_or_zero(&reference_memory, |r| r.1),
        rate: settings.sync_rate,
        walship_sync_p50_at_rate_ms: mean_or_zero(&walship_rate, |r| r.1),
        receivewal_sync_p50_at_rate_ms: mean_or_zero(&reference_rate, |r| r.1),
        walship_sync_p50_at_rate_in_memory_ms: mean_or_zero(&walship_rate_memory, |r| r.1),
        receivewal_sync_p50_at_rate_in_memory_ms: mean_or_zero(&reference_rate_memory, |r| r.1),
    })
}

pub(crate) fn print_synchronous(r: &SynchronousResult) {
    println!("\nSynchronous standby (pgbench -c 4 -j 2, latency as pgbench reports it)");
    for run in &r.runs {
        print!(
            "  {:<64} {:>8.0} tps {:>8.2} ms",
            run.label, run.tps, run.latency_ms
        );
        match (run.p50_ms, run.p99_ms) {
            (Some(p50), Some(p99)) => println!("   p50 {p50:.2} ms, p99 {p99:.2} ms"),
            _ => println!(),
        }
    }
    println!(
        "  walship --synchronous / pg_receivewal as synchronous standby: TPS {:.2}× (target ≥ 1.1), latency {:.2}× (target ≤ 0.9); walship sync / async latency {:.2}× (target ≤ 1.2)",
        r.tps_ratio, r.latency_ratio, r.latency_vs_async
    );
    if r.receivewal_sync_in_memory_tps > 0.0 {
        println!(
            "  receiving sides in /dev/shm (the standby's disk not the primary's): walship --synchronous {:.0} tps {:.2} ms, pg_receivewal {:.0} tps {:.2} ms: TPS {:.2}×, latency {:.2}×",
            r.walship_sync_in_memory_tps,
            r.walship_sync_in_memory_latency_ms,
            r.receivewal_sync_in_memory_tps,
            r.receivewal_sync_in_memory_latency_ms,
            r.walship_sync_in_memory_tps / r.receivewal_sync_in_memory_tps,
            r.walship_sync_in_memory_latency_ms / r.receivewal_sync_in_memory_latency_ms
        );
    }
    if r.rate > 0 {
        println!(
            "  at {} tps, median commit latency: walship --synchronous {:.2} ms, pg_receivewal as synchronous standby {:.2} ms ({:.2}×)",
            r.rate,
            r.walship_sync_p50_at_rate_ms,
            r.receivewal_sync_p50_at_rate_ms,
            r.walship_sync_p50_at_rate_ms / r.receivewal_sync_p50_at_rate_ms
        );
    }
    if r.rate > 0 && r.receivewal_sync_p50_at_rate_in_memory_ms > 0.0 {
        println!(
            "  the same with the receiving sides in /dev/shm: walship --synchronous {:.2} ms, pg_receivewal {:.2} ms ({:.2}×)",
            r.walship_sync_p50_at_rate_in_memory_ms,
            r.receivewal_sync_p50_at_rate_in_memory_ms,
            r.walship_sync_p50_at_rate_in_memory_ms / r.receivewal_sync_p50_at_rate_in_memory_ms
        );
    }
}
