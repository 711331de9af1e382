//! Scenario `overhead`: the primary's TPS with and without each shipper.

#[allow(unused_imports)]
use crate::*;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct OverheadResult {
    pub(crate) tps_without: f64,
    /// The mean of two runs, before and after the reference's (walship, pg_receivewal, walship).
    pub(crate) tps_with_walship: f64,
    /// The two runs.
    pub(crate) tps_with_walship_runs: Vec<f64>,
    pub(crate) tps_with_pg_receivewal: f64,
    pub(crate) walship_ratio: f64,
    pub(crate) pg_receivewal_ratio: f64,
    /// The same with the receiving side's files in /dev/shm (its fsyncs off the primary's disk).
    pub(crate) tps_with_walship_target_in_memory: Option<f64>,
    pub(crate) tps_with_pg_receivewal_target_in_memory: Option<f64>,
    pub(crate) walship_ratio_target_in_memory: Option<f64>,
    pub(crate) pg_receivewal_ratio_target_in_memory: Option<f64>,
}

pub(crate) async fn tps(world: &World, seconds: u64) -> Result<f64> {
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

pub(crate) async fn overhead_scenario(settings: &Settings) -> Result<OverheadResult> {
    let world = World::new("bench-overhead", settings).await?;
    let s = settings.overhead_seconds;
    // warm up, then alternate so drift hits all three alike
    tps(&world, s.min(5)).await?;
    let without1 = tps(&world, s).await?;
    // walship, the reference, walship again: this machine's TPS drifts, the spread shows by how much
    let w = world.start_walship("overhead").await?;
    let walship1 = tps(&world, s).await?;
    drop(w);
    let r = world.start_receivewal("overhead", true, true).await?;
    let with_receivewal = tps(&world, s).await?;
    drop(r);
    world.drop_slots().await;
    let w = world.start_walship("overhead-2").await?;
    let walship2 = tps(&world, s).await?;
    drop(w);
    let with_walship = (walship1 + walship2) / 2.0;
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
        tps_with_walship_runs: vec![walship1, walship2],
        tps_with_pg_receivewal: with_receivewal,
        walship_ratio: with_walship / without,
        pg_receivewal_ratio: with_receivewal / without,
        tps_with_walship_target_in_memory: in_memory.map(|m| m.0),
        tps_with_pg_receivewal_target_in_memory: in_memory.map(|m| m.1),
        walship_ratio_target_in_memory: in_memory.map(|m| m.0 / without),
        pg_receivewal_ratio_target_in_memory: in_memory.map(|m| m.1 / without),
    })
}
