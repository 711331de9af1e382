//! Two failures under a ledger of acknowledged commits plus pgbench, and how many acknowledged commits are
//! not in each target when the dust settles. walship and pg_receivewal --synchronous (with a slot) ship from
//! the same primary in the same trial, so both see the same crash.
//!
//! - `crash`: postgres crashes, its host lives (kill -9 of the postmaster and its children). walship drains
//!   pg_wal after the crash.
//! - `hostdeath`: the primary's host dies (the postmaster, its children and the walship sender SIGKILLed in
//!   one `kill`; the receivers live). Nothing can be drained: what counts is what reached the target before.
//!
//! A commit's end is not known to the client; the ledger records the primary's flush position right after
//! each commit, which bounds it: the commit ended after the previous row's recorded position and at or before
//! its own. A row is **lost for certain** when even the previous row's position is at or beyond the target's
//! end, and **possibly lost** when its own recorded position is beyond it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use walship_tests::cluster::WAIT;
use walship_tests::ledger::{losses, Ledger};

use crate::{Settings, Target, World};

/// Which failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    PostgresCrash,
    HostDeath,
    /// The host dies with walship (`--synchronous`) and pg_receivewal both synchronous standbys
    /// (`synchronous_standby_names = 'ANY 2 (walship, pg_receivewal)'`): a commit returns only once both hold it.
    SyncHostDeath,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CrashTrial {
    pub trial: u32,
    pub acknowledged: usize,
    pub walship_end: String,
    pub walship_lost: usize,
    pub walship_possibly_lost: usize,
    pub walship_drain_ms: u64,
    pub receivewal_end: String,
    pub receivewal_lost: usize,
    pub receivewal_possibly_lost: usize,
}

fn log_text(log: &std::path::Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn count(log: &std::path::Path, pattern: &str) -> usize {
    log_text(log).matches(pattern).count()
}

pub async fn crash_scenario(settings: &Settings, failure: Failure) -> Result<Vec<CrashTrial>> {
    let synchronous = failure == Failure::SyncHostDeath;
    let trials = match (settings.quick, synchronous) {
        (true, _) => 2,
        (false, false) => 5,
        (false, true) => 10,
    };
    let name = match failure {
        Failure::PostgresCrash => "crash",
        Failure::HostDeath => "hostdeath",
        Failure::SyncHostDeath => "sync-hostdeath",
    };
    let sender_flags: Option<&[&str]> = synchronous.then_some(&["--synchronous"]);
    let mut world = World::new(&format!("bench-{name}"), settings).await?;
    if synchronous {
        world
            .synchronous_standby_names("ANY 2 (walship, pg_receivewal)")
            .await?;
    }
    let base = world.dir.path().to_owned();
    let mut walship = world.start_walship_with(&base, name, sender_flags).await?;
    let mut results = Vec::new();
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    for trial in 1..=trials {
        let mut receivewal = world
            .start_receivewal(&format!("crash-{trial}"), true, false)
            .await?;
        let ledger = Ledger::start(&world.primary).await;
        let mut bench = world
            .primary
            .pgbench(&["-c", "2", "-j", "2", "-T", "600", "-n"])
            .spawn()
            .context("pgbench")?;
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = Duration::from_millis(2000 + (rng >> 33) % 1000);
        tokio::time::sleep(wait).await;
        let sender = walship.sender.as_ref().context("sender")?.log.clone();
        let sender = sender.as_path();
        let drained_before = count(sender, "primary down: the receiver holds");
        let ended_before = walship.receiver.sessions_ended();
        let mut drain_ms = 0;
        let host_death = failure != Failure::PostgresCrash;
        if host_death {
            let pid = walship.sender.as_ref().context("sender")?.pid();
            world.primary.kill9_with(&[pid]);
            if let Some(mut s) = walship.sender.take() {
                s.kill9(); // reaps it
            }
        } else {
            world.primary.kill9();
        }
        let rows = ledger.finish().await;
        let _ = bench.kill();
        let _ = bench.wait();
        let deadline = Instant::now() + WAIT;
        if host_death {
            // walship: the receiver ends the session once its writer has made everything received durable
            while walship.receiver.sessions_ended() <= ended_before {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the walship receiver did not notice the sender's death"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            // walship: wait for the drain
            while count(sender, "primary down: the receiver holds") <= drained_before {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the walship sender did not drain"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drain_ms = log_text(sender)
                .lines()
                .rfind(|l| l.contains("primary down: the receiver holds"))
                .and_then(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("drain_ms="))
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        // pg_receivewal: it exits when its connection is gone
        let deadline = Instant::now() + WAIT;
        while receivewal.child.try_wait()?.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "pg_receivewal did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let w_end = walship.position().context("walship position")?;
        let r_end = receivewal.position().context("pg_receivewal position")?;
        let (wl, wp) = losses(&rows, w_end);
        let (rl, rp) = losses(&rows, r_end);
        eprintln!(
            "{name} {trial}: {} acknowledged; walship ends at {w_end} (lost {wl}, possibly {wp}; drained in {drain_ms} ms), pg_receivewal at {r_end} (lost {rl}, possibly {rp})",
            rows.len()
        );
        results.push(CrashTrial {
            trial,
            acknowledged: rows.len(),
            walship_end: w_end.to_string(),
            walship_lost: wl,
            walship_possibly_lost: wp,
            walship_drain_ms: drain_ms,
            receivewal_end: r_end.to_string(),
            receivewal_lost: rl,
            receivewal_possibly_lost: rp,
        });
        drop(receivewal);
        if host_death {
            // the host is back: crash recovery, and a new sender
            world.primary.start();
            let port = walship.receiver.port;
            walship.sender = Some(match sender_flags {
                Some(flags) => world.start_sender_with(port, flags),
                None => world.start_sender(port),
            });
        } else {
            // crash recovery on the same host; walship resumes by itself
            let back_before = count(sender, "PostgreSQL is back");
            world.primary.start();
            let deadline = Instant::now() + WAIT;
            while count(sender, "PostgreSQL is back") <= back_before {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the walship sender did not resume"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        world.drop_slots().await;
    }
    Ok(results)
}
