//! Scenario `synchronous`: the primary's pgbench TPS and commit latency (as pgbench reports them) with walship
//! `--synchronous` as the synchronous standby, side by side with pg_receivewal `--synchronous` as the
//! synchronous standby, and both asynchronous. Order: walship sync, pg_receivewal sync, twice, walship sync
//! again, then walship async and pg_receivewal async; each run starts right after a checkpoint.

#[allow(unused_imports)]
use crate::*;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct PgbenchRun {
    pub(crate) label: String,
    pub(crate) tps: f64,
    pub(crate) latency_ms: f64,
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
    /// `--sync-rate`: the throttled runs' rate (0: none ran) and each tool's mean latency there.
    pub(crate) rate: u32,
    pub(crate) walship_sync_latency_at_rate_ms: f64,
    pub(crate) receivewal_sync_latency_at_rate_ms: f64,
}

/// pgbench `-c 4 -j 2` for `seconds`, at `rate` transactions per second if given: (tps, average latency in
/// ms; with a rate pgbench counts it from each transaction's scheduled start).
pub(crate) async fn pgbench_run(
    world: &World,
    seconds: u64,
    rate: Option<u32>,
) -> Result<(f64, f64)> {
    let seconds = seconds.to_string();
    let rate = rate.map(|r| r.to_string());
    let mut args = vec!["-c", "4", "-j", "2", "-T", &seconds, "-n"];
    if let Some(r) = &rate {
        args.extend(["-R", r]);
    }
    let out = world.primary.pgbench(&args).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |prefix: &str, nth: usize| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(nth))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Ok((
        value("tps", 2).context("pgbench printed no tps")?,
        value("latency average", 3).context("pgbench printed no latency")?,
    ))
}

pub(crate) async fn synchronous_scenario(settings: &Settings) -> Result<SynchronousResult> {
    let world = World::new("bench-synchronous", settings).await?;
    let s = settings.overhead_seconds;
    pgbench_run(&world, s.min(5), None).await?; // warm up
    let client = world.primary.connect().await;
    let mut runs = Vec::new();
    // Each run starts right after a checkpoint, so that every run writes the same share of full-page
    // images (without it, the first runs after start write more WAL per transaction than the later ones).
    let mut measure = async |label: &str, rate: Option<u32>| -> Result<(f64, f64)> {
        client.batch_execute("CHECKPOINT").await?;
        let (tps, latency_ms) = pgbench_run(&world, s, rate).await?;
        let label = match rate {
            Some(r) => format!("{label} at {r} tps"),
            None => label.to_owned(),
        };
        eprintln!("  {label}: {tps:.0} tps, {latency_ms:.2} ms");
        runs.push(PgbenchRun {
            label,
            tps,
            latency_ms,
        });
        Ok((tps, latency_ms))
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
    // at a steady rate, alternating: the commit latency of each path where the CPU has room
    let (mut walship_rate, mut reference_rate) = (Vec::new(), Vec::new());
    if settings.sync_rate > 0 {
        let rate = Some(settings.sync_rate);
        for round in 1..=2 {
            world.synchronous_standby_names("walship").await?;
            let w = world
                .start_walship_with(&base, &format!("rate-{round}"), Some(&["--synchronous"]))
                .await?;
            walship_rate.push(measure("walship --synchronous", rate).await?);
            drop(w);
            world.synchronous_standby_names("pg_receivewal").await?;
            let r = world
                .start_receivewal(&format!("rate-{round}"), true, false)
                .await?;
            reference_rate
                .push(measure("pg_receivewal --synchronous (synchronous standby)", rate).await?);
            drop(r);
            world.drop_slots().await;
        }
        world.synchronous_standby_names("").await?;
    }
    let mean =
        |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
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
        rate: settings.sync_rate,
        walship_sync_latency_at_rate_ms: if walship_rate.is_empty() {
            0.0
        } else {
            mean(&walship_rate, |r| r.1)
        },
        receivewal_sync_latency_at_rate_ms: if reference_rate.is_empty() {
            0.0
        } else {
            mean(&reference_rate, |r| r.1)
        },
    })
}

pub(crate) fn print_synchronous(r: &SynchronousResult) {
    println!("\nSynchronous standby (pgbench -c 4 -j 2, latency as pgbench reports it)");
    for run in &r.runs {
        println!(
            "  {:<52} {:>8.0} tps {:>8.2} ms",
            run.label, run.tps, run.latency_ms
        );
    }
    println!(
        "  walship --synchronous / pg_receivewal as synchronous standby: TPS {:.2}× (target ≥ 1.1), latency {:.2}× (target ≤ 0.9); walship sync / async latency {:.2}× (target ≤ 1.2)",
        r.tps_ratio, r.latency_ratio, r.latency_vs_async
    );
    if r.rate > 0 {
        println!(
            "  at {} tps: walship --synchronous {:.2} ms, pg_receivewal as synchronous standby {:.2} ms ({:.2}×)",
            r.rate,
            r.walship_sync_latency_at_rate_ms,
            r.receivewal_sync_latency_at_rate_ms,
            r.walship_sync_latency_at_rate_ms / r.receivewal_sync_latency_at_rate_ms
        );
    }
}
