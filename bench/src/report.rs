//! The printed tables (with ratios) and the JSON report.

#[allow(unused_imports)]
use crate::*;

#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: String,
    pub(crate) postgres: String,
    pub(crate) quick: bool,
    pub(crate) lag: Vec<LagResult>,
    pub(crate) catchup: Vec<CatchupResult>,
    pub(crate) ceilings: Option<Ceilings>,
    pub(crate) overhead: Option<OverheadResult>,
    pub(crate) crash: Vec<crash::CrashTrial>,
    pub(crate) host_death: Vec<crash::CrashTrial>,
    pub(crate) sync_host_death: Vec<crash::CrashTrial>,
    pub(crate) synchronous: Option<crate::synchronous::SynchronousResult>,
    pub(crate) compression: Option<crate::compression::CompressionReport>,
    pub(crate) verify: Option<crate::verify::VerifyResult>,
}

pub(crate) fn machine() -> String {
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

pub(crate) fn print_crash(r: &Report) {
    print_trials(
        &r.crash,
        "Postgres crash (kill -9 of the postmaster and its children; the host lives)",
    );
    print_trials(
        &r.host_death,
        "Host death (kill -9 of the postmaster, its children and the walship sender in one kill; the receivers live)",
    );
    print_trials(
        &r.sync_host_death,
        "Host death with walship --synchronous and pg_receivewal --synchronous both synchronous standbys (ANY 2)",
    );
}

fn print_trials(trials: &[crash::CrashTrial], title: &str) {
    if trials.is_empty() {
        return;
    }
    println!(
        "\n{title}, both shippers in the same trial:\n\
         acknowledged commits not in the target: lost for certain / possibly (bounds from the ledger's flush positions)"
    );
    println!(
        "{:>5} {:>12} | {:>22} {:>9} | {:>22}",
        "trial", "acknowledged", "walship lost", "drain ms", "pg_receivewal --sync lost"
    );
    for t in trials {
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

pub(crate) fn print_report(r: &Report) {
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
        let mut profiles: Vec<&str> = Vec::new();
        for l in &r.lag {
            if !profiles.contains(&l.profile.as_str()) {
                profiles.push(&l.profile);
            }
        }
        for profile in profiles {
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
        println!("  without a shipper {:.0}, with walship {:.0} ({:.1} %; runs before and after the reference: {}), with pg_receivewal --synchronous over TLS {:.0} ({:.1} %)", o.tps_without, o.tps_with_walship, o.walship_ratio * 100.0, o.tps_with_walship_runs.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(" and "), o.tps_with_pg_receivewal, o.pg_receivewal_ratio * 100.0);
        if let (Some(w), Some(p)) = (
            o.tps_with_walship_target_in_memory,
            o.tps_with_pg_receivewal_target_in_memory,
        ) {
            println!("  receiving side's files in /dev/shm (its fsyncs off the primary's disk): with walship {:.0} ({:.1} %), with pg_receivewal --synchronous over TLS {:.0} ({:.1} %)", w, w / o.tps_without * 100.0, p, p / o.tps_without * 100.0);
        }
    }
}
