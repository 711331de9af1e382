//! postgres dies, its host lives: every record it flushed is still in `pg_wal/`, and the sender ships it
//! (the drain). Crashes at random moments under a ledger of acknowledged commits plus pgbench, each followed
//! by crash recovery on the same host; a clean `pg_ctl stop -m fast`; and the failover after the last crash.

use std::time::Duration;

use walship_protocol::wal::page_magic_for_version;
use walship_protocol::wal::PageExpectation;
use walship_protocol::walker::Walker;
use walship_protocol::Lsn;
use walship_tests::archive::{archive_end, assert_matches_primary, wait_archived};
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::ledger::{under_load, verdict, Ledger};
use walship_tests::scenario::{shipping, wait_drained};
use walship_tests::{wait_for, InitOptions, Lcg};

/// The page checks for timeline 1 of the cluster of `s`.
fn expectation(s: &walship_tests::scenario::Shipping, sysid: u64, major: u32) -> PageExpectation {
    PageExpectation {
        magic: page_magic_for_version(major * 10_000).expect("major"),
        system_identifier: sysid,
        seg_size: s.seg,
        timeline: 1,
    }
}

/// The WAL of timeline 1 in `dir` from the segment holding `from` on, as long as segment files follow each
/// other (`.partial` files too, for an archive); returns it with the LSN of its first byte.
fn read_segments(
    s: &walship_tests::scenario::Shipping,
    dir: &std::path::Path,
    from: Lsn,
) -> (Vec<u8>, Lsn) {
    let segno = s.seg.segno(from);
    let mut bytes = Vec::new();
    for n in segno..segno + 64 {
        let name = walship_protocol::wal::segment_file_name(1, n, s.seg);
        let b = std::fs::read(dir.join(&name))
            .or_else(|_| std::fs::read(dir.join(format!("{name}.partial"))));
        match b {
            Ok(b) => bytes.extend_from_slice(&b),
            Err(_) => break,
        }
    }
    (bytes, s.seg.segment_start(segno))
}

/// Where the valid WAL in the primary's pg_wal ends (what crash recovery will find), walking from the page
/// holding `from`.
fn pg_wal_end(s: &walship_tests::scenario::Shipping, sysid: u64, major: u32, from: Lsn) -> Lsn {
    let (bytes, base) = read_segments(s, &s.primary.wal_dir(), from);
    let page = Lsn(from.0 - from.0 % 8192);
    let bytes = &bytes[(page.0 - base.0) as usize..];
    let mut w =
        Walker::resync(expectation(s, sysid, major), bytes, page).expect("a record in the segment");
    w.walk(bytes, page, |_| {});
    w.next_lsn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_of_postgres_lose_no_acknowledged_commit() {
    let mut rng = Lcg::from_clock();
    println!("crash moments from seed {}", rng.0);
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut s = shipping("drain", &opts).await;
    let client = s.primary.connect().await;
    let sysid = s.primary.system_identifier(&client).await;
    let major = s.primary.major;
    drop(client);
    run_ok(&mut s.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(&s.restore_command("--wait"), false, &[]);
    standby.start_no_wait();

    let mut drains = Vec::new();
    let mut all_rows = Vec::new();
    for round in 1..=5 {
        let (ledger, mut bench) = under_load(&s.primary).await;
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        let drained_before = s
            .sender
            .log_text()
            .matches("primary down: the receiver holds")
            .count();
        s.primary.kill9();
        let rows = ledger.finish().await;
        let _ = bench.kill();
        let _ = bench.wait();
        wait_for("the sender to drain pg_wal", WAIT, || async {
            (s.sender
                .log_text()
                .matches("primary down: the receiver holds")
                .count()
                > drained_before)
                .then_some(())
        })
        .await;
        let drain_ms = s
            .sender
            .log_text()
            .lines()
            .rfind(|l| l.contains("primary down: the receiver holds"))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("drain_ms="))
                    .map(str::to_owned)
            })
            .and_then(|v| v.parse::<u64>().ok())
            .expect("drain_ms");
        let end = archive_end(&s.archive, s.seg, 1).expect("archive end");
        let last_acked = rows.iter().map(|(_, l)| *l).max().expect("rows");
        let valid_end = pg_wal_end(&s, sysid, major, last_acked);
        println!(
            "crash {round}: {} commits acknowledged, the last flushed at {last_acked}; pg_wal's valid WAL ends at {valid_end}; the archive ends at {end}; drained in {drain_ms} ms",
            rows.len()
        );
        assert!(end >= last_acked, "crash {round}: the archive ends at {end}, before the last acknowledged commit at {last_acked}");
        assert_eq!(
            end, valid_end,
            "crash {round}: the archive must end where pg_wal's valid WAL ends"
        );
        drains.push(drain_ms);
        all_rows.extend(rows);
        if round < 5 {
            // crash recovery on the same host: shipping resumes with no gap and no duplicate
            restart_and_resume(&mut s).await;
        }
    }
    // the primary's host is given up: fail over to the standby
    s.sender.stop_sender_of(&s.receiver);
    let end = s.end();
    let compared = assert_matches_primary(&s.archive, &s.primary.wal_dir(), s.seg, 1);
    println!("after 5 crashes the archive matches pg_wal: {compared:?}");
    let (timeline, start, text) = s.promote(&standby);
    println!("{}", text.trim());
    assert!(
        text.contains(&format!(
            "all WAL the primary wrote is in the archive (up to {end})"
        )),
        "promote must say the archive holds all of the primary's WAL:\n{text}"
    );
    assert_eq!(timeline, 2);
    assert!(start <= end);
    let promoted = standby.connect().await;
    let v = verdict(&all_rows, end, &promoted).await;
    println!(
        "5 crashes of postgres (archive recovery): acknowledged {}, present after failover {}, lost {}; drain times {drains:?} ms",
        v.acknowledged, v.present, v.acknowledged - v.present
    );
    assert!(v.missing_covered.is_empty(), "{v:?}");
    assert_eq!(
        v.present, v.acknowledged,
        "acknowledged commits lost: {v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_is_drained_to_its_checkpoint() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut s = shipping("drain-clean", &opts).await;
    let client = s.primary.connect().await;
    let sysid = s.primary.system_identifier(&client).await;
    let major = s.primary.major;
    run_ok(&mut s.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let standby = standby_in_standby_mode(&s);
    let ledger = Ledger::start(&s.primary).await;
    wait_for("ledger rows", WAIT, || async {
        (ledger.acknowledged().len() > 100).then_some(())
    })
    .await;
    let before = s.primary.flush_lsn(&client).await;
    drop(client);
    s.primary.stop("fast");
    let rows = ledger.finish().await;
    let drain_ms = wait_drained(&mut s.sender);
    let end = archive_end(&s.archive, s.seg, 1).expect("archive end");
    let valid_end = pg_wal_end(&s, sysid, major, before);
    assert_eq!(
        end, valid_end,
        "the archive must hold the shutdown checkpoint"
    );
    // the last record is the shutdown checkpoint (RM_XLOG_ID, XLOG_CHECKPOINT_SHUTDOWN = 0x00)
    // the sender tells the receiver the primary is down and stops without waiting for the receiver to
    // record it: status shows it once the receiver's writer has
    let status_of = || {
        let out = std::process::Command::new(s.walship.path(walship_tests::Walship::RECEIVER))
            .arg("status")
            .arg("--archive")
            .arg(&s.archive)
            .output()
            .expect("run status");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, status) = wait_for("status to report the primary down", WAIT, || async {
        let (code, status) = status_of();
        status
            .contains("primary:            down since")
            .then_some((code, status))
    })
    .await;
    // for monitoring, a primary that is down is critical (exit 2), whatever the archive holds
    assert_eq!(code, Some(2), "{status}");
    assert!(
        status.contains("verdict:            CRITICAL: the primary is down"),
        "{status}"
    );
    assert!(
        status.contains(&format!(
            "its WAL ends at {end}; the archive holds all of it: yes"
        )),
        "{status}"
    );
    println!("clean shutdown drained in {drain_ms} ms; archive ends at {end}\n{status}");
    s.sender.stop_sender_of(&s.receiver);
    let (_, _, text) = s.promote(&standby);
    println!("{}", text.trim());
    let promoted = standby.connect().await;
    let v = verdict(&rows, end, &promoted).await;
    assert_eq!(v.present, v.acknowledged, "{v:?}");
    assert!(
        last_record_is_shutdown_checkpoint(&s, sysid, major, before),
        "the archive's last record is not the shutdown checkpoint"
    );
}

/// Whether the last valid record in the archive is a shutdown checkpoint.
fn last_record_is_shutdown_checkpoint(
    s: &walship_tests::scenario::Shipping,
    sysid: u64,
    major: u32,
    from: Lsn,
) -> bool {
    let (bytes, base) = read_segments(s, &s.archive, from);
    let mut w = Walker::resync(expectation(s, sysid, major), &bytes, base).expect("a record");
    let mut last = None;
    w.walk(&bytes, base, |r| last = Some(*r));
    let last = last.expect("records");
    last.rmid == 0 && last.info & 0xF0 == 0x00
}

/// A crash that tears a record crossing a page (its first pages written, the last one not): crash recovery
/// skips it and writes new WAL from the next page on, marked `XLP_FIRST_IS_OVERWRITE_CONTRECORD`. A drain
/// walks past it as PostgreSQL's reader does: commits made after the restart are shipped when postgres dies
/// again before the sender has streamed them (the sender is frozen meanwhile). The archive matches pg_wal,
/// and a standby restoring from the archive replays through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_walks_past_a_record_torn_by_an_earlier_crash() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut s = shipping("drain-torn", &opts).await;
    let client = s.primary.connect().await;
    let sysid = s.primary.system_identifier(&client).await;
    let major = s.primary.major;
    drop(client);
    let standby = standby_in_standby_mode(&s);

    // A 20 kB non-transactional message is written into WAL buffers but flushed by nobody: the WAL writer
    // writes its completed pages, not its last one. Killed then, the record is torn. Something else may
    // flush it first (a checkpoint, autovacuum, a standby snapshot): then try again. The sender is frozen
    // meanwhile, so that what it has sent ends before the torn record, as when the record's first page
    // was written by a commit's flush that ended before it.
    let mut torn = None;
    for attempt in 1..=5 {
        let client = s.primary.connect().await;
        let before = s.primary.flush_lsn(&client).await;
        wait_archived(&s.archive, s.seg, before).await;
        signal(s.sender.pid(), "-STOP");
        let end: String = client
            .query_one(
                "SELECT pg_logical_emit_message(false, 'walship-test', repeat('x', 20000))::text",
                &[],
            )
            .await
            .expect("emit a message")
            .get(0);
        let end: Lsn = end.parse().expect("lsn");
        let last_page = Lsn(end.0 - end.0 % 8192);
        let flushed = wait_for(
            "the WAL writer to write the message's first pages",
            WAIT,
            || async {
                let f = s.primary.flush_lsn(&client).await;
                (f >= last_page).then_some(f)
            },
        )
        .await;
        drop(client);
        s.primary.kill9();
        let valid_end = pg_wal_end(&s, sysid, major, before);
        println!(
            "attempt {attempt}: message from after {before} to {end}, flushed {flushed} at the kill; pg_wal's valid WAL ends at {valid_end}"
        );
        if valid_end < end && flushed > valid_end {
            torn = Some(valid_end);
            break;
        }
        signal(s.sender.pid(), "-CONT");
        restart_and_resume(&mut s).await;
    }
    let torn_at =
        torn.expect("no torn record in 5 attempts: something flushed the message each time");
    // postgres restarts (recovery skips the torn record), commits, and dies again before the sender runs
    s.primary.start();
    let client = s.primary.connect().await;
    client
        .batch_execute(
            "CREATE TABLE after_tear(x int); INSERT INTO after_tear SELECT generate_series(1, 1000)",
        )
        .await
        .expect("write after the tear");
    let target = s.primary.flush_lsn(&client).await;
    drop(client);
    s.primary.kill9();
    let valid_end = pg_wal_end(&s, sysid, major, target);
    assert!(valid_end >= target);
    signal(s.sender.pid(), "-CONT");
    wait_archived(&s.archive, s.seg, target).await;
    wait_for("the drain to end", WAIT, || async {
        (archive_end(&s.archive, s.seg, 1) == Some(valid_end)).then_some(())
    })
    .await;
    let compared = assert_matches_primary(&s.archive, &s.primary.wal_dir(), s.seg, 1);
    println!(
        "the torn record at {torn_at} was walked past: the drain shipped up to {valid_end} (the commits flushed at {target}); the archive matches pg_wal: {compared:?}"
    );
    // PostgreSQL's own reader accepts what was archived: the standby replays past the tear
    s.primary.start();
    let client = s.primary.connect().await;
    let switched = s.primary.switch_wal(&client).await;
    // the standby takes complete segments only: up to the start of the segment after the switch
    let segment_start = s.seg.segment_start(s.seg.segno(switched));
    let standby_client = wait_for("the standby to accept connections", WAIT, || {
        standby.try_connect()
    })
    .await;
    wait_for(
        "the standby to replay past the torn record",
        WAIT,
        || async {
            let replayed: Option<String> = standby_client
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await
                .ok()?
                .get(0);
            let replayed: Lsn = replayed?.parse().ok()?;
            (replayed >= segment_start).then_some(())
        },
    )
    .await;
    let n: i64 = standby_client
        .query_one("SELECT count(*) FROM after_tear", &[])
        .await
        .expect("rows on the standby")
        .get(0);
    assert_eq!(n, 1000);
}

/// A standby in standby mode restoring from the archive (`restore_command` without `--wait`), started.
fn standby_in_standby_mode(s: &walship_tests::scenario::Shipping) -> walship_tests::Cluster {
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(
        &s.restore_command(""),
        true,
        &["wal_retrieve_retry_interval = '200ms'"],
    );
    standby.start_no_wait();
    standby
}

/// Starts the crashed primary again (crash recovery on the same host) and waits until the sender resumes.
async fn restart_and_resume(s: &mut walship_tests::scenario::Shipping) {
    let back_before = s.sender.log_text().matches("PostgreSQL is back").count();
    s.primary.start();
    wait_for("the sender to see PostgreSQL back", WAIT, || async {
        (s.sender.log_text().matches("PostgreSQL is back").count() > back_before).then_some(())
    })
    .await;
}

/// `kill <how> <pid>`.
fn signal(pid: u32, how: &str) {
    run_ok(std::process::Command::new("kill").args([how, &pid.to_string()]));
}
