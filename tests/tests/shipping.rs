//! End-to-end shipping against a real PostgreSQL server: the archive must be byte-identical to the
//! primary's pg_wal, through crashes, restarts and network cuts.

use std::time::{Duration, Instant};

use walship_protocol::{Lsn, WalSegSize};
use walship_tests::archive::{archive_end, assert_matches_primary, wait_archived};
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::scenario::shipping;
use walship_tests::{wait_for, Cluster, InitOptions, TestDir, Walship};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_wal_arrives_byte_identical() {
    let s = shipping("ship", &InitOptions::default()).await;
    let (walship, archive, seg, primary) = (&s.walship, &s.archive, s.seg, &s.primary);
    let client = primary.connect().await;

    // a DBA finds the sender's session by its application_name
    let sessions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walship-sender'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert_eq!(sessions, 1, "the sender's session in pg_stat_activity");

    run_ok(&mut primary.pgbench(&["-i", "-s", "4", "-q"]));

    // pgbench load while sampling how far the archive trails the primary's flush position
    let mut bench = primary
        .pgbench(&["-c", "4", "-j", "2", "-T", "8", "-n"])
        .spawn()
        .expect("pgbench");
    let mut samples: Vec<(Instant, Lsn, Lsn)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while bench.try_wait().expect("pgbench status").is_none() {
        tick.tick().await;
        let flush = primary.flush_lsn(&client).await;
        let archived = archive_end(archive, seg, 1).unwrap_or(Lsn(0));
        samples.push((Instant::now(), flush, archived));
    }
    assert!(bench.wait().expect("pgbench").success());
    let mut bytes_behind: Vec<f64> = samples
        .iter()
        .map(|(_, f, a)| f.saturating_sub(*a) as f64)
        .collect();
    bytes_behind.sort_by(f64::total_cmp);
    // time lag: for each flush sample, how long until the archive held it
    let mut ms_behind: Vec<f64> = Vec::new();
    for (i, (t, flush, _)) in samples.iter().enumerate() {
        if let Some((t2, _, _)) = samples[i..].iter().find(|(_, _, a)| a >= flush) {
            ms_behind.push(t2.duration_since(*t).as_secs_f64() * 1000.0);
        }
    }
    ms_behind.sort_by(f64::total_cmp);
    println!(
        "lag during pgbench ({} samples): bytes behind p50 {:.0} p99 {:.0} max {:.0}; ms until archived p50 {:.1} p99 {:.1} max {:.1}",
        samples.len(),
        percentile(&bytes_behind, 0.5),
        percentile(&bytes_behind, 0.99),
        percentile(&bytes_behind, 1.0),
        percentile(&ms_behind, 0.5),
        percentile(&ms_behind, 0.99),
        percentile(&ms_behind, 1.0),
    );

    let switched = primary.switch_wal(&client).await;
    wait_archived(archive, seg, switched).await;
    // a little more WAL after the switch, so the archive ends in a .partial
    client
        .execute(
            "CREATE TABLE after_switch AS SELECT g FROM generate_series(1, 1000) g",
            &[],
        )
        .await
        .unwrap();
    let flush = primary.flush_lsn(&client).await;
    wait_archived(archive, seg, flush).await;

    let compared = assert_matches_primary(archive, &primary.wal_dir(), seg, 1);
    println!("archive byte-identical to pg_wal: {compared:?}");
    assert!(
        compared.complete_segments >= 3,
        "expected several complete segments, got {compared:?}"
    );
    assert!(
        compared.partial_bytes >= seg.offset(flush),
        "partial shorter than the flush offset"
    );
    assert!(std::fs::metadata(archive.join("walship.id")).is_ok());

    // status: connected sender, position, lag
    let status = wait_for("status to show the connected sender", WAIT, || async {
        let out = run_ok(
            std::process::Command::new(walship.path(Walship::RECEIVER))
                .args(["status", "--json", "--archive"])
                .arg(archive),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("\"sender_connected\": true") && text.contains("\"primary_flush_lsn\": \""))
            .then_some(text)
    })
    .await;
    assert!(
        status.contains(&format!(
            "\"system_identifier\": {}",
            primary.system_identifier(&client).await
        )),
        "{status}"
    );
    assert!(status.contains("\"lag_bytes\""), "{status}");
    let human = run_ok(
        std::process::Command::new(walship.path(Walship::RECEIVER))
            .args(["status", "--archive"])
            .arg(archive),
    );
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    println!("{human}");
    assert!(
        human.contains("verdict:            OK: shipping"),
        "{human}"
    );

    // the load was shipped on write (records read while PostgreSQL was still writing and fsyncing them),
    // and the archive above is byte-identical to pg_wal: nothing torn or invalid was shipped
    let mut s = s;
    s.sender.stop_sender_of(&s.receiver);
    let log = s.sender.log_text();
    let stopped = log
        .lines()
        .rfind(|l| l.contains("stopped: the receiver holds"))
        .unwrap_or_else(|| panic!("no stop line:\n{log}"));
    let on_write: u64 = stopped
        .split_whitespace()
        .find_map(|w| w.strip_prefix("shipped_on_write_bytes="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no shipped_on_write_bytes in {stopped:?}"));
    println!("shipped before the primary's flush: {on_write} bytes");
    assert!(on_write > 0, "nothing was shipped on write: {stopped}");

    // no sender: a warning for monitoring (exit 1) until --crit-no-sender seconds have passed, then critical
    let status = |crit: &str| {
        std::process::Command::new(s.walship.path(Walship::RECEIVER))
            .args(["status", "--crit-no-sender", crit, "--archive"])
            .arg(&s.archive)
            .output()
            .expect("run status")
    };
    // the status file is rewritten once a second: wait until it says the sender is gone
    let out = wait_for("status to show no sender", WAIT, || async {
        let out = status("3600");
        String::from_utf8_lossy(&out.stdout)
            .contains("not connected")
            .then_some(out)
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("WARNING: no sender connected"), "{text}");
    let out = status("0");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Waits until the archive has grown past where it is now (the stream is alive).
async fn wait_progress(archive: &std::path::Path, seg: WalSegSize, what: &str) {
    let now = archive_end(archive, seg, 1).unwrap_or(Lsn(0));
    wait_for(what, WAIT, || async {
        archive_end(archive, seg, 1)
            .filter(|e| *e > now)
            .map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_restarts_and_network_cuts_leave_no_gap() {
    let dir = TestDir::new("crash");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    // 1 MB segments: many segment boundaries for little WAL
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut primary = Cluster::init(&dir, "primary", &opts);
    primary.start();
    let client = primary.connect().await;
    let seg = WalSegSize::new(1 << 20).unwrap();
    run_ok(&mut primary.pgbench(&["-i", "-s", "2", "-q"]));

    let archive = dir.path().join("archive");
    let mut receiver = walship.receiver(&dir, &archive, &certs, 0);
    let port = receiver.port;
    let proxy = walship_tests::proxy::Proxy::start(([127, 0, 0, 1], port).into()).await;
    let mut sender = walship.sender(&dir, &primary.conninfo(), proxy.port, &certs, &certs, &[]);
    sender.wait_for_log("streaming", Duration::from_secs(30));

    let mut bench = primary
        .pgbench(&["-c", "2", "-j", "2", "-T", "30", "-n"])
        .spawn()
        .expect("pgbench");
    wait_progress(&archive, seg, "first WAL in the archive").await;

    // receiver crash mid-stream (kill -9), restart on the same port
    receiver.kill9();
    receiver = walship.receiver(&dir, &archive, &certs, port);
    wait_progress(&archive, seg, "shipping to resume after a receiver crash").await;

    // sender crash, restart (wait for the new sender's session: the receiver may still be archiving what the
    // killed one sent, and a cut before the new connection is open would cut nothing)
    sender.kill9();
    sender = walship.sender(&dir, &primary.conninfo(), proxy.port, &certs, &certs, &[]);
    sender.wait_for_log("streaming", Duration::from_secs(30));
    wait_progress(&archive, seg, "shipping to resume after a sender crash").await;

    // network cut between them: the sender notices, reconnects, and shipping goes on
    let reconnects = sender.log_text().matches("reconnecting").count();
    assert!(proxy.cut() >= 1, "the cut found no open connection");
    wait_for("the sender to notice the cut", WAIT, || async {
        (sender.log_text().matches("reconnecting").count() > reconnects).then_some(())
    })
    .await;
    wait_progress(&archive, seg, "shipping to resume after a network cut").await;

    // and once more a receiver crash, this time right after a cut
    proxy.cut();
    receiver.kill9();
    receiver = walship.receiver(&dir, &archive, &certs, port);
    wait_progress(&archive, seg, "shipping to resume after cut + crash").await;

    assert!(bench.wait().expect("pgbench").success());
    let switched = primary.switch_wal(&client).await;
    wait_archived(&archive, seg, switched).await;
    let compared = assert_matches_primary(&archive, &primary.wal_dir(), seg, 1);
    println!("after 2 receiver crashes, 1 sender crash and 2 network cuts, the archive matches pg_wal: {compared:?}");
    assert!(compared.complete_segments > 5, "{compared:?}");

    // a clean shutdown on SIGTERM
    assert!(
        sender.terminate(Duration::from_secs(10)).success(),
        "sender exit on SIGTERM"
    );
    assert!(
        receiver.terminate(Duration::from_secs(10)).success(),
        "receiver exit on SIGTERM"
    );
    assert!(receiver.log_text().contains("receiver stopped"));
}

async fn restart_lsn(c: &tokio_postgres::Client) -> Option<Lsn> {
    let s: Option<String> = c
        .query_one(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'",
            &[],
        )
        .await
        .expect("the slot exists")
        .get(0);
    s.map(|s| s.parse::<Lsn>().expect("lsn"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_slot_keeps_wal_until_it_is_archived() {
    let dir = TestDir::new("slot");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    // no wal_keep_size: only the slot keeps WAL
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        conf: vec![
            "wal_keep_size = 0".into(),
            "max_wal_size = '32MB'".into(),
            "min_wal_size = '2MB'".into(),
        ],
        ..Default::default()
    };
    let mut primary = Cluster::init(&dir, "primary", &opts);
    primary.start();
    let client = primary.connect().await;
    let seg = WalSegSize::new(1 << 20).unwrap();
    let archive = dir.path().join("archive");
    let receiver = walship.receiver(&dir, &archive, &certs, 0);
    let slot_args = ["--slot", "walship"];
    let mut sender = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &certs,
        &slot_args,
    );
    sender.wait_for_log("streaming", Duration::from_secs(30));
    let created = restart_lsn(&client).await.expect("the slot reserves WAL");

    run_ok(&mut primary.pgbench(&["-i", "-s", "1", "-q"]));
    let switched = primary.switch_wal(&client).await;
    wait_archived(&archive, seg, switched).await;
    // the slot follows what the receiver made durable, never beyond it
    let moved = wait_for("the slot to advance", WAIT, || async {
        let r = restart_lsn(&client).await?;
        (r > created).then_some(r)
    })
    .await;
    assert!(
        moved <= archive_end(&archive, seg, 1).unwrap(),
        "slot {moved} is ahead of the archive"
    );

    // with the sender stopped, checkpoints do not remove what the archive lacks
    assert!(sender.terminate(Duration::from_secs(10)).success());
    let held = restart_lsn(&client).await.unwrap();
    run_ok(&mut primary.pgbench(&["-c", "2", "-t", "8000", "-n"]));
    client.batch_execute("CHECKPOINT").await.unwrap();
    client.batch_execute("CHECKPOINT").await.unwrap();
    let name = walship_protocol::wal::segment_file_name(1, seg.segno(held), seg);
    assert!(
        primary.wal_dir().join(&name).exists(),
        "{name} (needed by the archive) was removed despite the slot"
    );

    let _sender = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &certs,
        &slot_args,
    );
    let switched = primary.switch_wal(&client).await;
    wait_archived(&archive, seg, switched).await;
    let compared = walship_tests::archive::assert_matches_primary_from(
        &archive,
        &primary.wal_dir(),
        seg,
        1,
        seg.segno(held),
    );
    println!("slot kept WAL through checkpoints; archive matches: {compared:?}");
    assert!(compared.complete_segments > 3, "{compared:?}");
}
