//! A second primary of the same cluster (issue 19, point 4): a base backup of the primary, its WAL copied,
//! started as a primary without recovery configuration (a restored test copy, a split brain). It has the
//! archive's system identifier and timeline, and its sender holds a valid certificate. It must never write
//! into the archive: refused while the real primary's sender is live, and refused when it resumes because
//! the WAL it resends below the resume point differs from the archive's confirmed WAL.

use walship_tests::archive::assert_matches_primary;
use walship_tests::cluster::WAIT;
use walship_tests::env::chown_to_db_user;
use walship_tests::scenario::shipping;
use walship_tests::{wait_for, InitOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_the_primary_never_writes_into_the_archive() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut s = shipping("rogue", &opts).await;
    let client = s.primary.connect().await;
    client
        .batch_execute(
            "CREATE TABLE t (i int, pad text); INSERT INTO t SELECT generate_series(1, 1000), 'p'",
        )
        .await
        .expect("rows");

    // the copy: a base backup with the primary's WAL as it is now
    let mut copy = s.primary.base_backup(&s.dir, "copy");
    for entry in std::fs::read_dir(s.primary.wal_dir())
        .expect("pg_wal")
        .flatten()
    {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let to = copy.data.join("pg_wal").join(entry.file_name());
            std::fs::copy(entry.path(), &to).expect("copy WAL");
            chown_to_db_user(&to);
        }
    }
    // the real primary goes on: the archive confirms WAL the copy never had
    client
        .batch_execute("INSERT INTO t SELECT generate_series(1001, 6000), repeat('p', 100)")
        .await
        .expect("rows on the primary");
    let flushed = s.primary.flush_lsn(&client).await;
    wait_for("the primary's rows to be confirmed", WAIT, || async {
        let text = std::fs::read_to_string(s.archive.join("walship.position")).ok()?;
        let confirmed = u64::from_str_radix(text.split_whitespace().nth(2)?, 16).ok()?;
        (confirmed >= flushed.0).then_some(())
    })
    .await;

    // the copy starts as a primary on the same timeline and writes WAL of its own
    copy.start();
    let on_copy = copy.connect().await;
    on_copy
        .batch_execute("INSERT INTO t SELECT generate_series(100001, 130000), repeat('c', 100)")
        .await
        .expect("rows on the copy");
    drop(on_copy);

    // its sender is refused while the primary's sender is live
    let mut rogue = s.sender_for(&copy.conninfo());
    rogue.wait_for_log("another sender is streaming into this archive", WAIT);
    assert!(s.sender.alive(), "the primary's sender goes on");
    assert!(
        !s.sender.log_text().contains("hand over"),
        "the live session was not disturbed"
    );

    // the primary's sender stops: the copy gets a session, but what it resends below the resume point is not
    // the archive's confirmed WAL, so it is refused before it writes anything
    s.sender.stop_sender_of(&s.receiver);
    let refused = s
        .receiver
        .wait_for_log("the sender's history diverged from what was archived", WAIT);
    println!("{refused}");
    rogue.kill9();
    let compared = assert_matches_primary(&s.archive, &s.primary.wal_dir(), s.seg, 1);
    println!("the archive still equals the real primary's pg_wal: {compared:?}");
    assert!(
        s.receiver
            .log_text()
            .lines()
            .all(|l| !l.contains("replacing provisional WAL")),
        "nothing of the archive was replaced"
    );
}
