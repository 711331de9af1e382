//! `walship-demo`: walship's main job on a throwaway primary and standby on this machine.
//!
//! Creates a primary with the installed PostgreSQL, certificates, a receiver and a sender, a standby that
//! recovers from the walship archive (restore_command = walship-receiver restore --wait), runs a write load
//! while printing progress, crashes the primary, fails over with `walship-receiver promote` and prints the
//! verdict: transactions acknowledged by the primary against transactions present on the promoted standby.
//! Everything lives in one temp directory, removed at the end, also on Ctrl-C.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use walship_protocol::{Lsn, WalSegSize};
use walship_tests::archive::archive_end;
use walship_tests::cluster::{pg_bin, run_ok};
use walship_tests::ledger::{verdict, Ledger};
use walship_tests::{Cluster, InitOptions, TestDir, Walship};

const LOAD_SECONDS: u64 = 10;

fn step(n: u32, text: &str) {
    println!("[{n}/6] {text}");
}

async fn demo() -> Result<()> {
    let bin = pg_bin();
    println!(
        "walship demo: a throwaway primary and standby with PostgreSQL from {}",
        bin.display()
    );
    let dir = TestDir::new("demo");
    println!("      (working in {})", dir.path().display());
    let walship = Walship::install(&dir);

    step(1, "certificates (walship-receiver certs)");
    let certs = walship.certs(&dir, "certs");

    step(2, "primary: initdb, start");
    let mut primary = Cluster::init(&dir, "primary", &InitOptions::default());
    primary.start();
    let client = primary.connect().await;
    let seg = WalSegSize::DEFAULT;

    step(
        3,
        "receiver and sender: shipping WAL over mutually authenticated TLS",
    );
    let archive = dir.path().join("archive");
    let receiver = walship.receiver(&dir, &archive, &certs, 0);
    let mut sender = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &certs,
        &[],
    );
    sender.wait_for_log("streaming", Duration::from_secs(30));

    step(4, "standby: base backup, restore_command = 'walship-receiver restore --wait %f %p' (archive recovery)");
    let mut standby = primary.base_backup(&dir, "standby");
    let restore = format!(
        "{} restore --archive {} --wait %f %p",
        walship.path(Walship::RECEIVER).display(),
        archive.display()
    );
    standby.configure_recovery(&restore, false, &[]);
    standby.start_no_wait();

    step(
        5,
        &format!("write load for {LOAD_SECONDS} s: pgbench plus a ledger of numbered commits"),
    );
    run_ok(&mut primary.pgbench(&["-i", "-s", "4", "-q"]));
    let ledger = Ledger::start(&primary).await;
    let mut bench = primary.pgbench(&["-c", "2", "-j", "2", "-T", &LOAD_SECONDS.to_string(), "-n"]);
    bench
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut bench = bench.spawn().context("start pgbench")?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut max_behind = 0u64;
    while bench.try_wait()?.is_none() {
        tick.tick().await;
        let flush = primary.flush_lsn(&client).await;
        let archived = archive_end(&archive, seg, 1).unwrap_or(Lsn(0));
        let behind = flush.saturating_sub(archived);
        if started.elapsed() > Duration::from_millis(500) {
            // the first sample still shows the backlog of pgbench -i
            max_behind = max_behind.max(behind);
        }
        println!(
            "      t={:>4.1}s  primary flushed {flush:<11}  archived {archived:<11}  behind {behind:>8} bytes  ledger commits {}",
            started.elapsed().as_secs_f64(),
            ledger.acknowledged().len()
        );
    }

    step(6, "crash: postgres is killed (kill -9 of the postmaster and its children; the host lives); the sender ships what is left in pg_wal; failover with walship-receiver promote");
    primary.kill9();
    let rows = ledger.finish().await;
    let drain_ms = walship_tests::scenario::wait_drained(&mut sender);
    println!("      the sender shipped the rest of pg_wal {drain_ms} ms after the crash");
    sender.stop_sender_of(&receiver);
    let end = archive_end(&archive, seg, 1).context("the archive is empty")?;
    let out = run_ok(
        Command::new(walship.path(Walship::RECEIVER))
            .arg("promote")
            .arg("--archive")
            .arg(&archive)
            .arg("--pgdata")
            .arg(&standby.data)
            .args(["--timeout", "120"]),
    );
    print!("      {}", String::from_utf8_lossy(&out.stdout));
    let promoted = standby.connect().await;
    let v = verdict(&rows, end, &promoted).await;

    println!();
    println!("verdict");
    println!(
        "  transactions acknowledged by the primary:       {}",
        v.acknowledged
    );
    println!(
        "  of which flushed before the archive's end:      {} (archive ends at {end})",
        v.covered
    );
    println!(
        "  present on the promoted standby:                {}",
        v.present
    );
    println!("  largest lag seen during the load:               {max_behind} bytes");
    if v.missing_covered.is_empty() && v.lost_beyond == 0 {
        println!("  lost:                                           0 — every acknowledged commit survived the crash");
    } else if v.missing_covered.is_empty() {
        println!(
            "  lost:                                           {} — acknowledged after the last WAL the sender could read \
             before the crash (the primary died before walship saw it flushed)",
            v.lost_beyond
        );
    } else {
        println!(
            "  MISSING although archived:                      {:?}",
            v.missing_covered
        );
        anyhow::bail!("rows the archive held are missing on the promoted standby");
    }
    drop(receiver);
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    walship_tests::daemon::build_daemons()?;
    tokio::select! {
        r = demo() => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: stopping the servers and removing the demo's files");
            Ok(())
        }
    }
}
