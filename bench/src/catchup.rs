//! Scenario `catchup`: a WAL backlog built while the shipper is stopped, then the time to ship it.

#[allow(unused_imports)]
use crate::*;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct CatchupResult {
    pub(crate) target: String,
    pub(crate) round: u32,
    pub(crate) backlog_mb: f64,
    pub(crate) seconds: f64,
    pub(crate) mb_per_s: f64,
    pub(crate) cpu_s_per_gb: BTreeMap<String, f64>,
    pub(crate) cpu_s_per_gb_total: f64,
    pub(crate) peak_rss_mb: BTreeMap<String, f64>,
}

impl CatchupResult {
    /// A round's result; speed and total CPU are derived from the parts.
    pub(crate) fn new(
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
pub(crate) struct Ceilings {
    pub(crate) read_wal_mb_per_s: f64,
    pub(crate) write_fsync_mb_per_s: f64,
    pub(crate) aes_gcm_mb_per_s_one_core: f64,
}

pub(crate) async fn make_backlog(world: &World, mb: u64) -> Result<Lsn> {
    let client = world.primary.connect().await;
    let rows = mb * 1000;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS backlog; CREATE TABLE backlog AS SELECT g, repeat(md5(g::text), 28) AS pad FROM generate_series(1, {rows}) g"
        ))
        .await?;
    Ok(world.primary.flush_lsn(&client).await)
}

pub(crate) async fn wait_position(
    target: &mut dyn Target,
    lsn: Lsn,
    limit: Duration,
) -> Result<f64> {
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

pub(crate) async fn catchup_scenario(
    settings: &Settings,
) -> Result<(Vec<CatchupResult>, Ceilings)> {
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
pub(crate) async fn catchup_walship(
    world: &World,
    settings: &Settings,
    round: u32,
) -> Result<CatchupResult> {
    let mut w = world.start_walship(&format!("catchup{round}")).await?;
    // hold what is there first: the restarted sender resumes where the archive ends
    let client = world.primary.connect().await;
    let now = world.primary.flush_lsn(&client).await;
    wait_position(&mut w, now, Duration::from_secs(120)).await?;
    if let Some(mut s) = w.sender.take() {
        s.terminate(Duration::from_secs(10));
    }
    w.backend = None;
    w.walsender = None;
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
    w.walsender = world.walship_walsender().await;
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
    if let Some(pid) = w.walsender {
        cpu.insert(
            "walsender".to_string(),
            cpu_seconds(pid).unwrap_or(0.0) / gb,
        );
    }
    let rss = w
        .pids()
        .into_iter()
        .filter(|(r, _)| r != "backend" && r != "walsender")
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
pub(crate) async fn catchup_receivewal(
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
pub(crate) fn ceilings(world: &World, settings: &Settings) -> Result<Ceilings> {
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
