//! A sender in its own PID namespace (a container sidecar): it reads the primary's `postmaster.pid` but cannot
//! see that process in `/proc`. Losing its PostgreSQL session (here `pg_terminate_backend`) must not be taken
//! for the primary's death (issue 19, point 6): only positive evidence (the server refusing connections)
//! starts a drain, so streaming simply resumes.

use std::process::Command;
use std::time::Duration;

use walship_tests::archive::{assert_matches_primary, wait_archived};
use walship_tests::cluster::WAIT;
use walship_tests::scenario::stage;
use walship_tests::{wait_for, Daemon, InitOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_in_another_pid_namespace_resumes_instead_of_draining() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let st = stage("namespace", &opts);
    let receiver = st.walship.receiver(&st.dir, &st.archive, &st.certs, 0);
    let inner = st.walship.sender_command(
        &st.primary.conninfo(),
        receiver.port,
        &st.certs,
        &st.certs,
        &[],
    );
    // unshare as the database user: a user namespace mapping that user to itself, a PID namespace and its /proc
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--user",
        "--map-current-user",
        "--pid",
        "--fork",
        "--mount-proc",
        // the sender (PID 1 of the namespace) ends with unshare: the harness stops unshare
        "--kill-child",
    ])
    .arg(inner.get_program())
    .args(inner.get_args());
    let mut sender = Daemon::spawn(&st.dir, "sender", cmd);
    sender.wait_for_log("streaming", Duration::from_secs(30));

    let client = st.primary.connect().await;
    client
        .batch_execute("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 10000)")
        .await
        .expect("rows");
    let flushed = st.primary.flush_lsn(&client).await;
    wait_archived(
        &st.archive,
        walship_protocol::WalSegSize::new(1 << 20).unwrap(),
        flushed,
    )
    .await;

    let streaming_before = sender.log_text().matches(" streaming ").count();
    let terminated: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'walship-sender'",
            &[],
        )
        .await
        .expect("terminate the sender's session")
        .get(0);
    assert!(terminated >= 1, "the sender's session was found");
    wait_for("the sender to stream again", WAIT, || async {
        (sender.log_text().matches(" streaming ").count() > streaming_before).then_some(())
    })
    .await;
    let log = sender.log_text();
    assert!(
        !log.contains("PostgreSQL is down"),
        "a lost session of a running server is not a dead primary:\n{log}"
    );

    client
        .batch_execute("INSERT INTO t SELECT generate_series(10001, 20000)")
        .await
        .expect("more rows");
    let flushed = st.primary.flush_lsn(&client).await;
    let seg = walship_protocol::WalSegSize::new(1 << 20).unwrap();
    wait_archived(&st.archive, seg, flushed).await;
    let compared = assert_matches_primary(&st.archive, &st.primary.wal_dir(), seg, 1);
    println!("after the lost session the archive matches pg_wal: {compared:?}");
    drop(sender);
    drop(receiver);
}
