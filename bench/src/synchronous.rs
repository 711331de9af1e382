//! Scenario `synchronous`: the primary's pgbench TPS and commit latency (as pgbench reports them) with walship
//! `--synchronous` as the synchronous standby, side by side with pg_receivewal `--synchronous` as the
//! synchronous standby, and both asynchronous. Order: walship sync, pg_receivewal sync, walship sync, then
//! walship async and pg_receivewal async (drift shows in the spread of the two walship sync runs).

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
    /// walship --synchronous: mean of the two runs.
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
}

/// pgbench `-c 4 -j 2` for `seconds`: (tps, average latency in ms).
pub(crate) async fn pgbench_run(world: &World, seconds: u64) -> Result<(f64, f64)> {
    let out = world
        .primary
        .pgbench(&["-c", "4", "-j", "2", "-T", &seconds.to_string(), "-n"])
        .output()?;
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
    pgbench_run(&world, s.min(5)).await?; // warm up
    let mut runs = Vec::new();
    let mut record = |label: &str, (tps, latency_ms): (f64, f64)| {
        eprintln!("  {label}: {tps:.0} tps, {latency_ms:.2} ms");
        runs.push(PgbenchRun {
            label: label.into(),
            tps,
            latency_ms,
        });
        (tps, latency_ms)
    };
    let base = world.dir.path().to_owned();
    world.synchronous_standby_names("walship").await?;
    let w = world
        .start_walship_with(&base, "sync-1", Some(&["--synchronous"]))
        .await?;
    let w1 = record("walship --synchronous", pgbench_run(&world, s).await?);
    drop(w);
    world.synchronous_standby_names("pg_receivewal").await?;
    let r = world.start_receivewal("sync", true, false).await?;
    let r_sync = record(
        "pg_receivewal --synchronous (synchronous standby)",
        pgbench_run(&world, s).await?,
    );
    drop(r);
    world.drop_slots().await;
    world.synchronous_standby_names("walship").await?;
    let w = world
        .start_walship_with(&base, "sync-2", Some(&["--synchronous"]))
        .await?;
    let w2 = record("walship --synchronous", pgbench_run(&world, s).await?);
    drop(w);
    world.synchronous_standby_names("").await?;
    let w = world.start_walship_with(&base, "async", None).await?;
    let w_async = record("walship (async)", pgbench_run(&world, s).await?);
    drop(w);
    let r = world.start_receivewal("async", true, false).await?;
    let r_async = record(
        "pg_receivewal --synchronous (async)",
        pgbench_run(&world, s).await?,
    );
    drop(r);
    world.drop_slots().await;
    let sync_tps = (w1.0 + w2.0) / 2.0;
    let sync_latency = (w1.1 + w2.1) / 2.0;
    Ok(SynchronousResult {
        runs,
        walship_sync_tps: sync_tps,
        walship_sync_latency_ms: sync_latency,
        receivewal_sync_tps: r_sync.0,
        receivewal_sync_latency_ms: r_sync.1,
        walship_async_tps: w_async.0,
        walship_async_latency_ms: w_async.1,
        receivewal_async_tps: r_async.0,
        tps_ratio: sync_tps / r_sync.0,
        latency_ratio: sync_latency / r_sync.1,
        latency_vs_async: sync_latency / w_async.1,
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
}
