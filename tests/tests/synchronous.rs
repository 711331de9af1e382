//! The primary's walsender as the flush signal, and walship as a synchronous standby (`--synchronous`).
//!
//! - With the default `--confirm-by auto`, the sender opens a physical replication connection (it shows in
//!   `pg_stat_replication` as `walship`), learns flushes from it and runs no flush query while streaming
//!   (counted with `pg_stat_statements`); the streamed bytes are compared with the shipped ones.
//! - A streamed byte that differs from the shipped one (a failpoint flips it) is reported and nothing past
//!   it is confirmed.
//! - `--synchronous` with `synchronous_standby_names = 'walship'`: a commit does not return while the
//!   receiver is stopped, and returns once it is back; host death under a ledger, ten times, loses no
//!   acknowledged commit, and the standby promoted after the last has every one of them.

use std::time::Duration;

use walship_protocol::Lsn;
use walship_tests::archive::{archive_end, assert_matches_primary};
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::daemon::Walship;
use walship_tests::ledger::{losses, under_load, verdict};
use walship_tests::metrics::{metrics_port, sample, scrape};
use walship_tests::scenario::{shipping, stage, Shipping};
use walship_tests::{wait_for, InitOptions, Lcg};

/// The sender's metric `name`.
fn sender_metric(port: u16, name: &str) -> f64 {
    sample(&scrape(port), name).unwrap_or(0.0)
}

/// Calls of the flush-position query so far (pg_stat_statements).
async fn flush_queries(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE '%pg_current_wal_flush_lsn()::text, pg_current_wal_insert_lsn()%'",
            &[],
        )
        .await
        .expect("pg_stat_statements")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walsender_confirms_shipped_wal_without_a_flush_query() {
    let opts = InitOptions {
        conf: vec!["shared_preload_libraries = 'pg_stat_statements'".into()],
        ..Default::default()
    };
    let st = stage("walsender-signal", &opts);
    let receiver = st.walship.receiver(&st.dir, &st.archive, &st.certs, 0);
    let mut sender = st.walship.sender(
        &st.dir,
        &st.primary.conninfo(),
        receiver.port,
        &st.certs,
        &st.certs,
        &["--metrics-listen", "127.0.0.1:0"],
    );
    sender.wait_for_log("walsender streams", WAIT);
    let port = metrics_port(&mut sender);
    let client = st.primary.connect().await;
    client
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .expect("create pg_stat_statements");
    let app: String = client
        .query_one("SELECT application_name FROM pg_stat_replication", &[])
        .await
        .expect("walship in pg_stat_replication")
        .get(0);
    assert_eq!(app, "walship");
    let before = flush_queries(&client).await;
    run_ok(&mut st.primary.pgbench(&["-i", "-s", "2", "-q"]));
    run_ok(&mut st.primary.pgbench(&["-c", "2", "-j", "2", "-T", "3", "-n"]));
    let flush = st.primary.flush_lsn(&client).await;
    wait_for(
        "the sender to confirm the primary's flush",
        WAIT,
        || async {
            (sender_metric(port, "walship_sender_confirmed_lsn") >= flush.0 as f64).then_some(())
        },
    )
    .await;
    let after = flush_queries(&client).await;
    assert_eq!(
        after, before,
        "the sender queried the flush position while the walsender streamed"
    );
    let checked = sender_metric(port, "walship_sender_cross_checked_bytes_total");
    println!("cross-checked {checked} bytes; flush queries {before} -> {after}");
    assert!(
        checked > (8 << 20) as f64,
        "only {checked} bytes were compared with the walsender's"
    );
    assert_eq!(
        sender_metric(port, "walship_sender_cross_check_mismatches_total"),
        0.0
    );
    let seg = walship_protocol::WalSegSize::new(16 << 20).unwrap();
    walship_tests::archive::wait_archived(&st.archive, seg, flush).await;
    assert_matches_primary(&st.archive, &st.primary.wal_dir(), seg, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_byte_that_differs_is_reported_and_never_archived() {
    let st = stage("crosscheck", &InitOptions::default());
    let receiver = st.walship.receiver(&st.dir, &st.archive, &st.certs, 0);
    let mut sender = st.walship.sender_with(
        &st.dir,
        &st.primary.conninfo(),
        receiver.port,
        &st.certs,
        &st.certs,
        &["--metrics-listen", "127.0.0.1:0"],
        &[("FAILPOINTS", "sender-walsender-bytes-differ=return")],
    );
    sender.wait_for_log("walsender streams", WAIT);
    let port = metrics_port(&mut sender);
    run_ok(&mut st.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut bench = st
        .primary
        .pgbench(&["-c", "1", "-j", "1", "-T", "600", "-n"])
        .spawn()
        .expect("pgbench");
    let line = sender.wait_for_log("differs at", WAIT);
    println!("{line}");
    assert!(
        line.contains("WAL file") || line.contains("file="),
        "{line}"
    );
    // every session fails the same way and starts anew: reported each time
    wait_for("a second mismatch", WAIT, || async {
        (sender_metric(port, "walship_sender_cross_check_mismatches_total") >= 2.0).then_some(())
    })
    .await;
    let _ = bench.kill();
    let _ = bench.wait();
    sender.terminate(WAIT);
    // the walsender's differing bytes reached no file of the archive: it holds pg_wal's bytes only
    let seg = walship_protocol::WalSegSize::new(16 << 20).unwrap();
    assert_matches_primary(&st.archive, &st.primary.wal_dir(), seg, 1);
}

/// `walship` as the primary's synchronous standby.
async fn synchronous_shipping(name: &str, segsize: Option<u32>) -> Shipping {
    let opts = InitOptions {
        wal_segsize_mb: segsize,
        conf: vec!["synchronous_standby_names = 'walship'".into()],
        ..Default::default()
    };
    let mut s = shipping(name, &opts).await;
    // the harness's sender is asynchronous: make it synchronous
    s.sender.terminate(WAIT);
    s.sender = s.walship.sender(
        &s.dir,
        &s.primary.conninfo(),
        s.receiver.port,
        &s.certs,
        &s.certs,
        &["--synchronous"],
    );
    s.sender.wait_for_log("walsender streams", WAIT);
    s.sender
        .wait_for_log("counts this sender as its synchronous standby", WAIT);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_commit_waits_until_the_archive_holds_it() {
    let mut s = synchronous_shipping("sync-wait", None).await;
    let client = s.primary.connect().await;
    client
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .expect("a commit with the receiver up");
    let state: String = client
        .query_one(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walship'",
            &[],
        )
        .await
        .expect("walship in pg_stat_replication")
        .get(0);
    assert_eq!(state, "sync");
    let status_text = |s: &Shipping| {
        let out = std::process::Command::new(s.walship.path(Walship::RECEIVER))
            .args(["status", "--archive"])
            .arg(&s.archive)
            .output()
            .expect("run status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // status says that commits wait for the archive ...
    wait_for(
        "status to show walship as the synchronous standby",
        WAIT,
        || async {
            status_text(&s)
                .contains("synchronous:        yes (sync_state = sync since")
                .then_some(())
        },
    )
    .await;
    let port = s.receiver.port;
    s.receiver.terminate(WAIT);
    // ... and, with no sender, that they are waiting now
    let text = status_text(&s);
    assert!(
        text.contains("commits on the primary wait for walship until a sender is back"),
        "status with the receiver stopped:\n{text}"
    );
    let writer = s.primary.connect().await;
    let commit = tokio::spawn(async move {
        writer
            .batch_execute("INSERT INTO t VALUES (1)")
            .await
            .expect("insert");
        let lsn: String = writer
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .expect("flush")
            .get(0);
        lsn.parse::<Lsn>().expect("lsn")
    });
    // a bounded wait on purpose: the commit must NOT return while no archive holds it
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !commit.is_finished(),
        "a synchronous commit returned while the receiver was stopped"
    );
    s.receiver = s.walship.receiver(&s.dir, &s.archive, &s.certs, port);
    let flushed = tokio::time::timeout(WAIT, commit)
        .await
        .expect("the commit returns once the receiver is back")
        .expect("commit task");
    let end = archive_end(&s.archive, s.seg, 1).expect("archive end");
    println!("the commit returned once the archive held WAL up to {end} (flush then {flushed})");
    let row: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(row, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_host_deaths_lose_no_acknowledged_commit() {
    let mut rng = Lcg::from_clock();
    println!("death moments from seed {}", rng.0);
    let mut s = synchronous_shipping("sync-hostdeath", Some(1)).await;
    run_ok(&mut s.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(&s.restore_command("--wait"), false, &[]);
    standby.start_no_wait();
    let mut all_rows = Vec::new();
    const DEATHS: usize = 10;
    for round in 1..=DEATHS {
        let (ledger, mut bench) = under_load(&s.primary).await;
        // a random moment under load (not a synchronisation)
        std::thread::sleep(Duration::from_millis(rng.below(1000)));
        let ended_before = s.receiver.sessions_ended();
        s.primary.kill9_with(&[s.sender.pid()]);
        s.sender.kill9();
        let rows = ledger.finish().await;
        let _ = bench.kill();
        let _ = bench.wait();
        wait_for(
            "the receiver to end the dead sender's session",
            WAIT,
            || async { (s.receiver.sessions_ended() > ended_before).then_some(()) },
        )
        .await;
        let end = archive_end(&s.archive, s.seg, 1).expect("archive end");
        let (certain, possible) = losses(&rows, end);
        println!(
            "synchronous host death {round}: {} commits acknowledged; the archive ends at {end}; lost {certain} for certain, {possible} possibly",
            rows.len()
        );
        assert_eq!(
            certain, 0,
            "a synchronous commit acknowledged before the host died is beyond the archive's end {end}"
        );
        assert_matches_primary(&s.archive, &s.primary.wal_dir(), s.seg, 1);
        all_rows.extend(rows);
        if round < DEATHS {
            s.primary.start();
            s.sender = s.walship.sender(
                &s.dir,
                &s.primary.conninfo(),
                s.receiver.port,
                &s.certs,
                &s.certs,
                &["--synchronous"],
            );
            s.sender
                .wait_for_log("counts this sender as its synchronous standby", WAIT);
        }
    }
    let end = archive_end(&s.archive, s.seg, 1).expect("archive end");
    let (timeline, start, text) = s.promote(&standby);
    println!("{}", text.trim());
    assert_eq!(timeline, 2);
    assert!(start <= end);
    assert!(
        text.contains("as its synchronous standby (sync_state = sync"),
        "promote does not say that the archive holds every acknowledged commit:\n{text}"
    );
    let promoted = standby.connect().await;
    let v = verdict(&all_rows, end, &promoted).await;
    println!(
        "{DEATHS} synchronous host deaths: acknowledged {}, present after failover {}",
        v.acknowledged, v.present
    );
    assert_eq!(
        v.acknowledged, v.present,
        "acknowledged synchronous commits are missing after failover: {v:?}"
    );
}
