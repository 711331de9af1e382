//! After a failover the old primary's timeline is fenced (issue 19, point 3): once `restore` has handed the
//! end of timeline N to recovery, a sender of timeline N (the old primary coming back) is refused with a
//! message that says what happened and what to do, the archive is left unchanged, and the promoted
//! standby's WAL continues in the archive on the new timeline.

use std::time::Duration;

use walship_tests::archive::{archive_end, snapshot, wait_archived};
use walship_tests::cluster::WAIT;
use walship_tests::scenario::{shipping, wait_drained};
use walship_tests::{wait_for, InitOptions};

/// The WAL files of an archive snapshot (segments, partials, history files).
fn wal_files(
    snap: &std::collections::BTreeMap<String, Vec<u8>>,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    snap.iter()
        .filter(|(name, _)| !name.starts_with("walship."))
        .map(|(n, b)| (n.clone(), b.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_primary_is_refused_after_a_failover() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut s = shipping("fence", &opts).await;
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(&s.restore_command("--wait"), false, &[]);
    standby.start_no_wait();
    let client = s.primary.connect().await;
    client
        .batch_execute("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .expect("rows");
    let flushed = s.primary.flush_lsn(&client).await;
    wait_archived(&s.archive, s.seg, flushed).await;
    drop(client);

    // the primary dies; the standby is promoted from the archive
    s.primary.kill9();
    wait_drained(&mut s.sender);
    s.sender.stop_sender_of(&s.receiver);
    let (timeline, start, text) = s.promote(&standby);
    println!("{}", text.trim());
    assert_eq!(timeline, 2);
    let handed_over = snapshot(&s.archive);

    // the old primary comes back (crash recovery on timeline 1) and writes more WAL: its sender is refused
    s.primary.start();
    let client = s.primary.connect().await;
    client
        .batch_execute("INSERT INTO t SELECT generate_series(1001, 2000)")
        .await
        .expect("rows on the old primary");
    drop(client);
    let mut old = s.sender_for(&s.primary.conninfo());
    let status = old.wait_exit(WAIT);
    assert!(!status.success(), "the old primary's sender must stop");
    let log = old.log_text();
    assert!(
        log.contains("was handed to recovery at a failover")
            && log.contains("pg_rewind, or a new base backup"),
        "the refusal says what happened and what to do:\n{log}"
    );
    assert_eq!(
        wal_files(&snapshot(&s.archive)),
        wal_files(&handed_over),
        "the archive's WAL is unchanged by the fenced sender"
    );
    s.primary.stop("immediate");

    // the promoted standby ships its new timeline into the same archive
    let mut new = s.sender_for(&standby.conninfo());
    new.wait_for_log("streaming", Duration::from_secs(30));
    let promoted = standby.connect().await;
    promoted
        .batch_execute("INSERT INTO t SELECT generate_series(5001, 6000)")
        .await
        .expect("rows on the new primary");
    let flushed = standby.flush_lsn(&promoted).await;
    wait_for("timeline 2 in the archive", WAIT, || async {
        archive_end(&s.archive, s.seg, 2)
            .filter(|end| *end >= flushed)
            .map(|_| ())
    })
    .await;
    assert!(s.archive.join("00000002.history").exists());
    assert!(start <= flushed);
    new.stop_sender_of(&s.receiver);

    // verify follows both timelines: timeline 2 branches from timeline 1 where recovery ended, and a base
    // backup of timeline 1 recovers through the branch to timeline 2's end
    let out = walship_tests::env::as_db_user(
        std::process::Command::new(s.walship.path(walship_tests::Walship::RECEIVER))
            .args(["verify", "--json", "--archive"])
            .arg(&s.archive),
    )
    .output()
    .expect("run verify");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON from verify ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let timelines = json["timelines"].as_array().expect("timelines");
    assert_eq!(timelines.len(), 2, "{json:#}");
    let (t1, t2) = (&timelines[0], &timelines[1]);
    assert_eq!(
        (t1["timeline"].as_u64(), t2["timeline"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(t2["parent"].as_u64(), Some(1), "{json:#}");
    assert_eq!(
        t2["branch_point"].as_str(),
        Some(start.to_string().as_str()),
        "{json:#}"
    );
    let lsn = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|s| s.parse::<walship_protocol::Lsn>().ok())
    };
    let t1_range = &t1["replayable"][0];
    let t2_range = &t2["replayable"][0];
    assert!(lsn(&t1_range["to"]) >= Some(start), "{json:#}");
    assert!(lsn(&t2_range["to"]) >= Some(flushed), "{json:#}");
    assert_eq!(
        t2_range["backup_from_timeline"].as_u64(),
        Some(1),
        "{json:#}"
    );
    assert_eq!(t2_range["backup_from"], t1_range["from"], "{json:#}");
}
