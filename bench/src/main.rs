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
//! 4. `crash`, `hostdeath`: acknowledged commits lost when postgres crashes, or the primary's host dies;
//!    `sync-hostdeath`: the same with walship and pg_receivewal both synchronous standbys.
//! 6. `synchronous`: TPS and commit latency with walship `--synchronous` against pg_receivewal as the
//!    synchronous standby.
//! 5. `compression`: zstd on the wire and at rest; `restore`: archive recovery from the object store.
//! 7. `verify`: `walship-receiver verify` against `pg_waldump --quiet` on the same segments, one core each,
//!    and the CPU cost per GB of encryption at rest on upload and restore.
//!
//! Results are printed as tables with ratios and written as JSON. `--quick` is a one-minute smoke version.

mod catchup;
mod compression;
mod crash;
mod lag;
mod overhead;
mod report;
mod synchronous;
mod verify;
mod world;

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

use catchup::*;
use lag::*;
use overhead::*;
use report::*;
use world::*;

// ---------------------------------------------------------------------------------------------- settings

#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) quick: bool,
    pub(crate) json: PathBuf,
    pub(crate) scenarios: Vec<String>,
    pub(crate) lag_seconds: u64,
    pub(crate) rate_seconds: u64,
    pub(crate) backlog_mb: u64,
    /// Catch-up rounds; the order of the targets alternates between rounds (ABBA).
    pub(crate) catchup_rounds: u32,
    pub(crate) overhead_seconds: u64,
    pub(crate) scale: u32,
    pub(crate) archive_timeout: u64,
    /// Lag of walship alone (for comparing two builds of walship; no reference runs).
    pub(crate) walship_only: bool,
    /// pgbench -R of the lag scenario's throttled profile.
    pub(crate) rate: u32,
    /// pgbench -R of the synchronous scenario's throttled runs (0: none).
    pub(crate) sync_rate: u32,
}

/// A scenario of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Lag,
    Catchup,
    Overhead,
    Crash,
    Hostdeath,
    Synchronous,
    /// Host deaths with walship and pg_receivewal both synchronous standbys (ANY 2).
    SyncHostdeath,
    Compression,
    Restore,
    /// `walship-receiver verify` against `pg_waldump --quiet`, and the cost of encryption at rest.
    Verify,
}

/// Benchmarks walship against pg_receivewal and archive_command file shipping on this machine, with
/// PostgreSQL from WALSHIP_PG_BIN or /usr/lib/postgresql/*/bin. Results: tables on stdout, JSON in a file.
#[derive(clap::Parser, Debug)]
#[command(name = "walship-bench", about, long_about = None)]
struct Args {
    /// A short smoke version of every scenario (about a minute each).
    #[arg(long)]
    quick: bool,
    /// The scenarios to run (default: all), comma-separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Leave the references out of the lag scenario (to compare two builds of walship).
    #[arg(long)]
    walship_only: bool,
    /// The lag scenario's throttled profile, in transactions per second (pgbench -R). A steady rate
    /// (1000, say) makes the CPU per transaction of two builds comparable; the unthrottled profile's rate
    /// swings between runs on a shared machine.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// The synchronous scenario also runs walship and pg_receivewal as the synchronous standby at this steady
    /// rate (pgbench -R), where commit latency is not the CPU's queue (0: unthrottled runs only).
    #[arg(long, default_value_t = 0)]
    sync_rate: u32,
    /// Where to write the results as JSON.
    #[arg(long, value_name = "FILE", default_value = "bench-results.json")]
    json: PathBuf,
}

impl Settings {
    pub(crate) fn from_args() -> Result<Settings> {
        let args = <Args as clap::Parser>::parse();
        let scenarios = if args.scenario.is_empty() {
            <Scenario as clap::ValueEnum>::value_variants().to_vec()
        } else {
            args.scenario
        };
        let scenarios = scenarios
            .iter()
            .filter_map(clap::ValueEnum::to_possible_value)
            .map(|v| v.get_name().to_owned())
            .collect();
        let mut s = Settings {
            quick: args.quick,
            json: args.json,
            scenarios,
            lag_seconds: 30,
            rate_seconds: 20,
            backlog_mb: 1536,
            catchup_rounds: 2,
            overhead_seconds: 30,
            scale: 10,
            archive_timeout: 10,
            walship_only: args.walship_only,
            rate: args.rate,
            sync_rate: args.sync_rate,
        };
        if s.quick {
            s.lag_seconds = 4;
            s.rate_seconds = 3;
            s.backlog_mb = 64;
            s.catchup_rounds = 1;
            s.overhead_seconds = 4;
            s.scale = 1;
            s.archive_timeout = 2;
        }
        Ok(s)
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
            report.crash = crash::crash_scenario(&settings, crash::Failure::PostgresCrash).await?;
        }
        if settings.scenarios.iter().any(|s| s == "hostdeath") {
            eprintln!("death of the primary's host ...");
            report.host_death = crash::crash_scenario(&settings, crash::Failure::HostDeath).await?;
        }
        if settings.scenarios.iter().any(|s| s == "synchronous") {
            eprintln!("synchronous standbys ...");
            report.synchronous = Some(synchronous::synchronous_scenario(&settings).await?);
        }
        if settings.scenarios.iter().any(|s| s == "sync-hostdeath") {
            eprintln!("death of the primary's host, synchronous standbys ...");
            report.sync_host_death =
                crash::crash_scenario(&settings, crash::Failure::SyncHostDeath).await?;
        }
        if settings.scenarios.iter().any(|s| s == "compression") {
            eprintln!("compression and restore from the object store ...");
            report.compression = Some(compression::compression_scenario(&settings).await?);
        }
        if settings.scenarios.iter().any(|s| s == "restore") {
            eprintln!("archive recovery from the object store ...");
            let restore = compression::restore_scenario(&settings).await?;
            report
                .compression
                .get_or_insert_with(Default::default)
                .restore = restore;
        }
        if settings.scenarios.iter().any(|s| s == "verify") {
            eprintln!("verify against pg_waldump, encryption at rest ...");
            report.verify = Some(verify::verify_scenario(&settings).await?);
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = run => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
    print_report(&report);
    print_crash(&report);
    if let Some(s) = &report.synchronous {
        synchronous::print_synchronous(s);
    }
    if let Some(c) = &report.compression {
        compression::print_compression(c);
    }
    if let Some(v) = &report.verify {
        verify::print_verify(v);
    }
    std::fs::write(&settings.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("write {}", settings.json.display()))?;
    println!(
        "
results written to {}",
        settings.json.display()
    );
    Ok(())
}
