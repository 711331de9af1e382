//! Restore mode and failover against real PostgreSQL: a standby recovering from the walship archive gets the
//! last partial segment at failover, so every acknowledged commit the archive held survives promotion.

use std::process::Command;
use std::time::{Duration, Instant};

use walship_protocol::wal::segment_file_name;
use walship_tests::archive::archive_end;
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::env::as_db_user;
use walship_tests::ledger::{verdict, Ledger};
use walship_tests::scenario::{crash_and_fail_over, shipping, Mode, Shipping};
use walship_tests::{wait_for, InitOptions, Walship};

fn default() -> InitOptions {
    InitOptions::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_recovery_failover_keeps_every_shipped_commit() {
    let r = crash_and_fail_over("failover-archive", &default(), Mode::Archive).await;
    assert_eq!(r.present, r.acknowledged - r.lost_beyond);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_mode_failover_keeps_every_shipped_commit() {
    let r = crash_and_fail_over("failover-standby", &default(), Mode::Standby).await;
    assert_eq!(r.present, r.acknowledged - r.lost_beyond);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_primary_fails_over_without_loss() {
    let mut s = shipping("quiet", &default()).await;
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(&s.restore_command("--wait"), false, &[]);
    standby.start_no_wait();
    let ledger = Ledger::start(&s.primary).await;
    wait_for("ledger rows", WAIT, || async {
        (ledger.acknowledged().len() > 50).then_some(())
    })
    .await;
    let rows = ledger.stop().await;
    let client = s.primary.connect().await;
    let switched = s.primary.switch_wal(&client).await;
    wait_for("the switch to be archived", WAIT, || async {
        archive_end(&s.archive, s.seg, 1)
            .filter(|e| *e >= switched)
            .map(|_| ())
    })
    .await;
    s.primary.kill();
    s.sender.stop_sender_of(&s.receiver);
    let end = s.end();
    let (_, start_lsn, text) = s.promote(&standby);
    println!("quiet primary: {}", text.trim());
    let promoted = standby.connect().await;
    let v = verdict(&rows, end, &promoted).await;
    println!(
        "quiet primary: acknowledged {}, present {}, lost {}",
        v.acknowledged, v.present, v.lost_beyond
    );
    assert!(v.missing_covered.is_empty() && v.lost_beyond == 0, "{v:?}");
    assert_eq!(v.present, rows.len());
    assert!(start_lsn <= end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_mode_hot_standby_sees_fresh_rows() {
    let s = shipping("live", &default()).await;
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(
        &s.restore_command("--live"),
        true,
        &["wal_retrieve_retry_interval = '100ms'"],
    );
    standby.start_no_wait();
    let primary = s.primary.connect().await;
    primary
        .batch_execute("CREATE TABLE probe (id int PRIMARY KEY)")
        .await
        .unwrap();
    let replica = wait_for("the hot standby to accept connections", WAIT, || {
        standby.try_connect()
    })
    .await;
    let mut delays = Vec::new();
    for id in 0..20 {
        primary
            .execute("INSERT INTO probe VALUES ($1)", &[&id])
            .await
            .unwrap();
        let t = Instant::now();
        wait_for(&format!("row {id} on the hot standby"), WAIT, || async {
            let n: i64 = replica
                .query_one("SELECT count(*) FROM probe WHERE id = $1", &[&id])
                .await
                .ok()?
                .get(0);
            (n == 1).then_some(())
        })
        .await;
        delays.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    delays.sort_by(f64::total_cmp);
    println!(
        "live mode, wal_retrieve_retry_interval = 100ms: a committed row is visible on the hot standby after p50 {:.0} ms, max {:.0} ms (20 probes)",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    let in_recovery: bool = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery);
}

fn restore_once(s: &Shipping, file: &str, wait: bool) -> (bool, String, Duration) {
    let out_dir = s.dir.subdir("restore-out");
    let dest = out_dir.join("RECOVERYXLOG");
    let _ = std::fs::remove_file(&dest);
    let mut cmd = Command::new(s.walship.path(Walship::RECEIVER));
    cmd.arg("restore").arg("--archive").arg(&s.archive);
    if wait {
        cmd.arg("--wait");
    }
    cmd.arg(file).arg(&dest).current_dir(&out_dir);
    let t = Instant::now();
    let out = as_db_user(&mut cmd).output().expect("run restore");
    let code = out.status.code().expect("restore exited normally");
    assert!(
        code == 0 || code == 1,
        "restore must answer 0 or 1, got {code}"
    );
    assert_eq!(code == 0, dest.exists(), "exit status and %p disagree");
    (
        code == 0,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_segments_are_never_handed_to_recovery() {
    let mut s = shipping(
        "damaged",
        &InitOptions {
            wal_segsize_mb: Some(1),
            ..Default::default()
        },
    )
    .await;
    let standby_backup = s.primary.base_backup(&s.dir, "standby");
    let client = s.primary.connect().await;
    run_ok(&mut s.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let switched = s.primary.switch_wal(&client).await;
    wait_for("the archive to catch up", WAIT, || async {
        archive_end(&s.archive, s.seg, 1)
            .filter(|e| *e >= switched)
            .map(|_| ())
    })
    .await;
    s.sender.stop_sender_of(&s.receiver);
    let mut standby = standby_backup;

    let segs = walship_tests::archive::wal_files(&s.archive, s.seg)[&1].clone();
    let complete: Vec<u64> = segs
        .iter()
        .filter(|(_, (c, _))| *c)
        .map(|(n, _)| *n)
        .collect();
    assert!(complete.len() >= 8, "need several segments: {segs:?}");
    let name = |segno: u64| segment_file_name(1, segno, s.seg);
    let path = |segno: u64| s.archive.join(name(segno));

    // a good one restores
    let (ok, _, _) = restore_once(&s, &name(complete[1]), false);
    assert!(ok);

    // bad magic, wrong page address, truncated: never handed over, and the message names the file and the problem
    let (bad_magic, bad_addr, truncated) = (complete[3], complete[4], complete[5]);
    let mut bytes = std::fs::read(path(bad_magic)).unwrap();
    bytes[0] ^= 0xFF;
    std::fs::write(path(bad_magic), &bytes).unwrap();
    let mut bytes = std::fs::read(path(bad_addr)).unwrap();
    let wrong = s.seg.segment_start(bad_addr - 2).0.to_le_bytes();
    bytes[8..16].copy_from_slice(&wrong);
    std::fs::write(path(bad_addr), &bytes).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path(truncated))
        .unwrap();
    f.set_len(s.seg.as_u64() - 8192).unwrap();
    for (segno, problem) in [
        (bad_magic, "magic"),
        (bad_addr, "claims address"),
        (truncated, "bytes, a segment has"),
    ] {
        let (ok, log, _) = restore_once(&s, &name(segno), false);
        assert!(!ok, "damaged {} was handed over", name(segno));
        assert!(
            log.contains(&name(segno)) && log.contains(problem),
            "the log must name {} and {problem:?}:\n{log}",
            name(segno)
        );
    }

    // a history file that does not exist is answered at once, even with --wait
    let (ok, _, took) = restore_once(&s, "0000000A.history", true);
    assert!(!ok);
    println!("missing .history answered in {} ms", took.as_millis());
    assert!(
        took < Duration::from_secs(2),
        "a missing history file took {took:?}"
    );

    // a standby in archive recovery (restore --wait) stops before the bad segment and stays in recovery
    standby.configure_recovery(&s.restore_command("--wait"), false, &[]);
    standby.start_no_wait();
    wait_for(
        "the standby's log to name the damaged segment",
        WAIT,
        || async {
            let log = standby.log_text();
            (log.contains(&name(bad_magic)) && log.contains("damaged")).then_some(())
        },
    )
    .await;
    let out = run_ok(
        Command::new(standby.bin.join("pg_controldata"))
            .arg("-D")
            .arg(&standby.data)
            .env("LC_ALL", "C"),
    );
    let state = String::from_utf8_lossy(&out.stdout);
    assert!(
        state.contains("in archive recovery"),
        "the standby left recovery:\n{state}"
    );
    assert!(
        !standby.log_text().contains("archive recovery complete"),
        "recovery ended at a damaged segment"
    );

    // archive_cleanup_command: removes what %r no longer needs, never %r, newer segments or partials
    let r = name(complete[6]);
    run_ok(
        Command::new(s.walship.path(Walship::RECEIVER))
            .arg("cleanup")
            .arg("--archive")
            .arg(&s.archive)
            .arg(&r),
    );
    let after = walship_tests::archive::wal_files(&s.archive, s.seg)[&1].clone();
    for segno in segs.keys() {
        let kept = after.contains_key(segno);
        if *segno < complete[6] && segs[segno].0 {
            assert!(!kept, "{} should have been removed", name(*segno));
        } else {
            assert!(kept, "{} was removed but %r is {r}", name(*segno));
        }
    }
    // a segment cleanup removed is never answered "missing" by a waiting restore (archive recovery would end
    // there, early): it says what happened and keeps the server waiting; standby mode gets "missing" (it
    // retries by itself) with the same error
    let removed = name(*segs.keys().next().unwrap());
    let (restored, stderr, _) = restore_once(&s, &removed, false);
    assert!(!restored);
    assert!(
        stderr.contains("was removed from the archive by cleanup"),
        "{stderr}"
    );
    let out_dir = s.dir.subdir("restore-removed");
    let mut waiting = walship_tests::env::as_db_user(
        Command::new(s.walship.path(Walship::RECEIVER))
            .arg("restore")
            .arg("--archive")
            .arg(&s.archive)
            .arg("--wait")
            .arg(&removed)
            .arg(out_dir.join("RECOVERYXLOG"))
            .current_dir(&out_dir)
            .stderr(std::process::Stdio::piped()),
    )
    .spawn()
    .expect("start restore --wait");
    let mut stderr = waiting.stderr.take().unwrap();
    let said = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let mut text = String::new();
        while !text.contains("removed from the archive by cleanup") {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        text
    });
    let text = tokio::time::timeout(WAIT, said)
        .await
        .expect("restore --wait to say why")
        .unwrap();
    assert!(
        text.contains("rebuild it from a newer base backup"),
        "{text}"
    );
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "restore --wait must keep waiting, not answer \"missing\""
    );
    let _ = waiting.kill();
    let _ = waiting.wait();
    drop(client);
    let _ = &s.receiver;
}

/// Issue 19, point 8: `--live` with archive recovery (recovery.signal) would hand the padded partial to a
/// recovery that then promotes the server while the primary lives. restore refuses the live part (complete
/// segments only) and says why; the server stays in recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_mode_with_archive_recovery_never_promotes_the_standby() {
    let s = shipping("live-archive-recovery", &default()).await;
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(&s.restore_command("--live --wait"), false, &[]);
    standby.start_no_wait();
    let primary = s.primary.connect().await;
    primary
        .batch_execute(
            "CREATE TABLE probe (id int); INSERT INTO probe SELECT generate_series(1, 100)",
        )
        .await
        .unwrap();
    // a complete segment past the end of the base backup: the standby becomes consistent
    let switched = s.primary.switch_wal(&primary).await;
    wait_for("the switch to be archived", WAIT, || async {
        archive_end(&s.archive, s.seg, 1)
            .filter(|e| *e >= switched)
            .map(|_| ())
    })
    .await;
    primary
        .batch_execute("INSERT INTO probe SELECT generate_series(101, 200)")
        .await
        .unwrap();
    wait_for("restore to refuse --live", WAIT, || async {
        standby.log_text().contains("ignoring --live").then_some(())
    })
    .await;
    let replica = wait_for("the standby to accept connections", WAIT, || {
        standby.try_connect()
    })
    .await;
    let in_recovery: bool = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "the standby must stay in recovery");
    assert!(
        !standby.log_text().contains("selected new timeline ID"),
        "the standby promoted:\n{}",
        standby.log_text()
    );
}
