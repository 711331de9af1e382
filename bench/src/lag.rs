//! Scenario `lag`: how far each target trails the primary under pgbench, per commit.

#[allow(unused_imports)]
use crate::*;

/// Positions over time (only changes).
pub(crate) type Series = Vec<(Instant, Lsn)>;

/// The target's positions over time, polled every ~200 µs on its own thread (only changes are kept).
pub(crate) struct Poller {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) series: Arc<Mutex<Series>>,
    /// The target's `written` positions, when it has them.
    pub(crate) written: Arc<Mutex<Series>>,
    /// The target's `confirmed` positions, when it has them.
    pub(crate) confirmed: Arc<Mutex<Series>>,
    pub(crate) handle: std::thread::JoinHandle<Box<dyn Target>>,
}

impl Poller {
    pub(crate) fn start(mut target: Box<dyn Target>) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let series = Arc::new(Mutex::new(Vec::new()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let confirmed = Arc::new(Mutex::new(Vec::new()));
        let (s, v, w, c) = (
            stop.clone(),
            series.clone(),
            written.clone(),
            confirmed.clone(),
        );
        let handle = std::thread::spawn(move || {
            let (mut last, mut last_written, mut last_confirmed) = (Lsn(0), Lsn(0), Lsn(0));
            while !s.load(Ordering::Relaxed) {
                if let Some(p) = target.confirmed() {
                    if p > last_confirmed {
                        last_confirmed = p;
                        if let Ok(mut c) = c.lock() {
                            c.push((Instant::now(), p));
                        }
                    }
                }
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
            confirmed,
            handle,
        }
    }

    pub(crate) fn current(&self) -> Lsn {
        self.series
            .lock()
            .ok()
            .and_then(|v| v.last().map(|x| x.1))
            .unwrap_or(Lsn(0))
    }

    /// The target back, its position series, its written series and its confirmed series (empty if it has
    /// none).
    pub(crate) fn finish(self) -> (Box<dyn Target>, Series, Series, Series) {
        self.stop.store(true, Ordering::Relaxed);
        let target = self.handle.join().expect("poller thread");
        let series = self.series.lock().map(|v| v.clone()).unwrap_or_default();
        let written = self.written.lock().map(|v| v.clone()).unwrap_or_default();
        let confirmed = self.confirmed.lock().map(|v| v.clone()).unwrap_or_default();
        (target, series, written, confirmed)
    }
}

/// When the target first held `lsn` (at or after `since`): milliseconds after `since`.
pub(crate) fn held_after(series: &[(Instant, Lsn)], since: Instant, lsn: Lsn) -> Option<f64> {
    let i = series.partition_point(|(_, p)| *p < lsn);
    let (t, _) = series.get(i)?;
    Some(t.saturating_duration_since(since).as_secs_f64() * 1000.0)
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p95: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

pub(crate) fn percentiles(mut v: Vec<f64>) -> Percentiles {
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
pub(crate) struct LagResult {
    pub(crate) target: String,
    pub(crate) profile: String,
    /// per-commit probe: ms from the commit's acknowledgement until the target held its flush LSN
    pub(crate) probe_ms: Percentiles,
    /// flush-position series: ms from a sample of the primary's flush LSN until the target held it
    pub(crate) flush_ms: Percentiles,
    /// bytes the target was behind the primary's flush position, per sample
    pub(crate) behind_bytes: Percentiles,
    pub(crate) wal_mb_per_s: f64,
    pub(crate) tps: f64,
    /// CPU seconds per GB of WAL streamed, per process
    pub(crate) cpu_s_per_gb: BTreeMap<String, f64>,
    pub(crate) peak_rss_mb: BTreeMap<String, f64>,
}

/// Runs one load profile against one target and measures how far it trails.
pub(crate) async fn measure_lag(
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
    // "rate N tps"
    if let Some(rate) = profile
        .strip_prefix("rate ")
        .and_then(|r| r.split(' ').next())
    {
        args.extend(["-R".into(), rate.into()]);
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
    let (target, series, written, confirmed) = poller.finish();

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
    if !confirmed.is_empty() {
        // durable and confirmed: the primary had flushed it and walship knew
        results.push(LagResult {
            target: format!("{name} (confirmed)"),
            probe_ms: percentiles(probe_ms(&confirmed)),
            flush_ms: percentiles(flush_ms(&confirmed)),
            ..durable.clone()
        });
    }
    results.insert(0, durable);
    Ok((results, target))
}

pub(crate) async fn lag_scenario(settings: &Settings) -> Result<Vec<LagResult>> {
    let world = World::new("bench-lag", settings).await?;
    let mut results = Vec::new();
    let throttled = format!("rate {} tps", settings.rate);
    let profiles = [
        ("unthrottled", settings.lag_seconds),
        (throttled.as_str(), settings.rate_seconds),
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
