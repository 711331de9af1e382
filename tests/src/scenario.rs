//! Scenarios shared by the end-to-end tests and the version matrix: a primary shipping to a receiver, and a
//! crash of that primary followed by a failover with the ledger check.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use walship_protocol::{Lsn, WalSegSize};

use crate::archive::archive_end;
use crate::cluster::{run_ok, WAIT};
use crate::ledger::{verdict, Ledger};
use crate::{wait_for, Cluster, Daemon, InitOptions, TestDir, Walship};

/// A primary shipping to a receiver. Fields drop in order: the test directory last.
pub struct Shipping {
    pub walship: Walship,
    /// `certs` made by `walship-receiver certs`: the CA, server and client certificates in use.
    pub certs: PathBuf,
    pub archive: PathBuf,
    pub seg: WalSegSize,
    pub sender: Daemon,
    pub receiver: Daemon,
    pub primary: Cluster,
    pub dir: TestDir,
}

/// What most tests start from: a test directory with the daemons installed, certificates, a running primary
/// and the path of an archive (not yet made). Fields drop in order: the test directory last.
pub struct Stage {
    pub walship: Walship,
    /// `certs` made by `walship-receiver certs`.
    pub certs: PathBuf,
    pub archive: PathBuf,
    pub primary: Cluster,
    pub dir: TestDir,
}

/// A [`Stage`] named `name`, its primary initialised with `opts` and started.
pub fn stage(name: &str, opts: &InitOptions) -> Stage {
    let dir = TestDir::new(name);
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    let mut primary = Cluster::init(&dir, "primary", opts);
    primary.start();
    let archive = dir.path().join("archive");
    Stage {
        walship,
        certs,
        archive,
        primary,
        dir,
    }
}

/// Starts a primary (with `opts`), a receiver and a sender, and waits until the sender streams.
pub async fn shipping(name: &str, opts: &InitOptions) -> Shipping {
    let Stage {
        walship,
        certs,
        archive,
        primary,
        dir,
    } = stage(name, opts);
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
    let seg =
        WalSegSize::new((opts.wal_segsize_mb.unwrap_or(16) as u64) << 20).expect("segment size");
    Shipping {
        walship,
        certs,
        archive,
        seg,
        sender,
        receiver,
        primary,
        dir,
    }
}

impl Shipping {
    pub fn restore_command(&self, flags: &str) -> String {
        format!(
            "{} restore --archive {} {flags} %f %p",
            self.walship.path(Walship::RECEIVER).display(),
            self.archive.display()
        )
    }

    /// Starts another sender, for the server of `conninfo`, shipping to this receiver with this certificate set.
    pub fn sender_for(&self, conninfo: &str) -> Daemon {
        self.walship.sender(
            &self.dir,
            conninfo,
            self.receiver.port,
            &self.certs,
            &self.certs,
            &[],
        )
    }

    pub fn end(&self) -> Lsn {
        archive_end(&self.archive, self.seg, 1).unwrap_or(Lsn(0))
    }

    /// Runs `walship-receiver promote` for `standby`; returns (new timeline, its start LSN, stdout).
    pub fn promote(&self, standby: &Cluster) -> (u32, Lsn, String) {
        let out = run_ok(
            Command::new(self.walship.path(Walship::RECEIVER))
                .arg("promote")
                .arg("--archive")
                .arg(&self.archive)
                .arg("--pgdata")
                .arg(&standby.data)
                .args(["--timeout", "120"]),
        );
        // stdout, then what promote told the operator on stderr
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // "promoted: timeline 2 starts at 0/3000158; ..."
        let words: Vec<&str> = text.split_whitespace().collect();
        let tli = words
            .iter()
            .position(|w| *w == "timeline")
            .and_then(|i| words.get(i + 1))
            .and_then(|w| w.parse().ok());
        let lsn = words
            .iter()
            .position(|w| *w == "at")
            .and_then(|i| words.get(i + 1))
            .and_then(|w| w.trim_end_matches(';').parse().ok());
        (
            tli.unwrap_or_else(|| panic!("no timeline in {text:?}")),
            lsn.unwrap_or_else(|| panic!("no LSN in {text:?}")),
            text,
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// recovery.signal + restore --wait
    Archive,
    /// standby.signal + restore (no wait), promoted by walship-receiver promote
    Standby,
}

/// What a failover gave.
#[derive(Debug, Clone)]
pub struct FailoverResult {
    /// How long the sender took to ship the rest of pg_wal after postgres died.
    pub drain_ms: u64,
    pub acknowledged: usize,
    pub covered: usize,
    pub present: usize,
    pub lost_beyond: usize,
    pub archive_end: Lsn,
    pub timeline_start: Lsn,
    pub promote_seconds: f64,
}

/// Base backup, standby recovering from the archive (`mode`), ledger + pgbench load, the primary crashes,
/// `walship-receiver promote`, then the ledger check: every acknowledged row the archive held is present.
pub async fn crash_and_fail_over(name: &str, opts: &InitOptions, mode: Mode) -> FailoverResult {
    let mut s = shipping(name, opts).await;
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    let flags = if mode == Mode::Archive { "--wait" } else { "" };
    standby.configure_recovery(
        &s.restore_command(flags),
        mode == Mode::Standby,
        &["wal_retrieve_retry_interval = '200ms'"],
    );
    standby.start_no_wait();

    run_ok(&mut s.primary.pgbench(&["-i", "-s", "2", "-q"]));
    let ledger = Ledger::start(&s.primary).await;
    let mut bench = s
        .primary
        .pgbench(&["-c", "2", "-j", "2", "-T", "4", "-n"])
        .spawn()
        .expect("pgbench");
    assert!(bench.wait().expect("pgbench").success());
    wait_for("ledger rows", WAIT, || async {
        (ledger.acknowledged().len() > 200).then_some(())
    })
    .await;
    // The check is meaningful only if the archive holds most of the load: wait (with a deadline) until it has
    // what the primary had flushed by now. The ledger goes on meanwhile, so the crash still hits it mid-flight.
    let client = s.primary.connect().await;
    let target = s.primary.flush_lsn(&client).await;
    wait_for(
        &format!("{name}: the archive to reach {target} before the crash"),
        WAIT,
        || async { (s.end() >= target).then_some(()) },
    )
    .await;
    drop(client);

    // postgres crashes (SIGKILL of the postmaster and its children; its host lives): the sender drains the
    // rest of pg_wal and says so
    s.primary.kill9();
    let rows = ledger.finish().await;
    let drain_ms = wait_drained(&mut s.sender);
    s.sender.stop_sender_of(&s.receiver);
    let end = s.end();

    let started = Instant::now();
    let (timeline, start_lsn, text) = s.promote(&standby);
    let promote_seconds = started.elapsed().as_secs_f64();
    println!("{name} {mode:?}: {} in {promote_seconds:.1} s", text.trim());
    let promoted = standby.connect().await;
    let in_recovery: bool = promoted
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !in_recovery,
        "the standby is still in recovery after promote"
    );
    let v = verdict(&rows, end, &promoted).await;
    println!(
        "{name} {mode:?}: acknowledged {}, covered by the archive (LSN <= {end}) {}, present after failover {}, lost beyond the archive {}; the sender drained pg_wal {drain_ms} ms after the crash",
        v.acknowledged, v.covered, v.present, v.lost_beyond
    );
    v.assert_none_missing("the archive");
    assert_eq!(
        v.lost_beyond, 0,
        "acknowledged rows lost although postgres died with its host alive (the drain should have shipped them): {v:?}"
    );
    assert!(v.covered > 100, "{v:?}");
    assert_eq!(timeline, 2);
    assert!(
        start_lsn <= end,
        "the new timeline starts at {start_lsn}, beyond the archive's end {end}"
    );
    let last_covered = rows
        .iter()
        .filter(|(_, l)| *l <= end)
        .map(|(_, l)| *l)
        .max()
        .unwrap();
    assert!(
        start_lsn.0 + 8192 >= last_covered.0 || start_lsn >= last_covered,
        "timeline starts at {start_lsn}, well before the last shipped commit at {last_covered}"
    );
    let handover = std::fs::read_to_string(s.archive.join("walship.failover"))
        .expect("failover state with the handover record");
    assert!(
        handover.contains(&end.to_string()),
        "handover record {handover} does not end at {end}"
    );
    // the promoted server works
    promoted
        .execute("INSERT INTO ledger (id) VALUES (-1)", &[])
        .await
        .expect("write on the promoted standby");
    FailoverResult {
        drain_ms,
        acknowledged: v.acknowledged,
        covered: v.covered,
        present: v.present,
        lost_beyond: v.lost_beyond,
        archive_end: end,
        timeline_start: start_lsn,
        promote_seconds,
    }
}

/// Waits until the sender has drained pg_wal after postgres died; returns the drain time it logged (ms).
pub fn wait_drained(sender: &mut Daemon) -> u64 {
    let line = sender.wait_for_log("primary down: the receiver holds all of its WAL", WAIT);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("drain_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no drain_ms in {line}"))
}

/// A pgbench load, a segment switch and a little more WAL, then the archive must be byte-identical to the
/// primary's pg_wal (the `.partial` to the same prefix).
pub async fn ship_and_compare(name: &str, opts: &InitOptions) -> crate::archive::Compared {
    let s = shipping(name, opts).await;
    let client = s.primary.connect().await;
    run_ok(&mut s.primary.pgbench(&["-i", "-s", "1", "-q"]));
    run_ok(
        &mut s
            .primary
            .pgbench(&["-c", "2", "-j", "2", "-t", "300", "-n"]),
    );
    let switched = s.primary.switch_wal(&client).await;
    wait_for(
        &format!("{name}: the archive to reach {switched}"),
        WAIT,
        || async {
            archive_end(&s.archive, s.seg, 1)
                .filter(|e| *e >= switched)
                .map(|_| ())
        },
    )
    .await;
    client
        .batch_execute("CREATE TABLE after_switch AS SELECT g FROM generate_series(1, 1000) g")
        .await
        .expect("write after the switch");
    let flush = s.primary.flush_lsn(&client).await;
    wait_for(
        &format!("{name}: the archive to reach {flush}"),
        WAIT,
        || async {
            archive_end(&s.archive, s.seg, 1)
                .filter(|e| *e >= flush)
                .map(|_| ())
        },
    )
    .await;
    // the flush signal: the primary's walsender (a replication connection on every version), which confirms
    // everything flushed without a query
    assert!(
        s.sender.log_text().contains("walsender streams"),
        "{name}: the sender did not open a replication connection"
    );
    wait_for(
        &format!("{name}: the archive to be confirmed up to {flush}"),
        WAIT,
        || async {
            let out = Command::new(s.walship.path(Walship::RECEIVER))
                .args(["status", "--json", "--archive"])
                .arg(&s.archive)
                .output()
                .ok()?;
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            status["confirmed_lsn"]
                .as_str()
                .and_then(|c| c.parse::<Lsn>().ok())
                .filter(|c| *c >= flush)
                .map(|_| ())
        },
    )
    .await;
    let compared =
        crate::archive::assert_matches_primary(&s.archive, &s.primary.wal_dir(), s.seg, 1);
    assert!(compared.complete_segments >= 1, "{compared:?}");
    compared
}
