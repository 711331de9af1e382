//! Quick restarts of the primary without a replication slot and without wal_keep_size (issue 19, point 10):
//! each restart's end-of-recovery checkpoint may remove segments at once. The archive's confirmed position must keep up (a
//! complete segment is confirmed, a drain confirms what PostgreSQL proved flushed), so a resuming sender
//! never needs WAL that PostgreSQL removed, and the archive ends equal to pg_wal.

use walship_tests::archive::{assert_matches_primary_from, wait_archived};
use walship_tests::scenario::shipping;
use walship_tests::InitOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_restarts_never_strand_the_sender_on_removed_wal() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        // each restart's end-of-recovery checkpoint may remove every segment before the current one
        conf: vec!["wal_keep_size = 0".into()],
        ..Default::default()
    };
    let mut s = shipping("restarts", &opts).await;
    let client = s.primary.connect().await;
    client
        .batch_execute("CREATE TABLE t (i int, pad text)")
        .await
        .expect("table");
    drop(client);
    for round in 0..4 {
        let client = s.primary.connect().await;
        client
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series({}, {}) g",
                round * 3000,
                round * 3000 + 2999
            ))
            .await
            .expect("rows");
        drop(client);
        // a crash, then another one right after the next start. Before each crash the archive holds what
        // the server wrote (without a slot PostgreSQL may remove WAL that was never shipped: a gap, reported
        // as one); what may lag is the confirmation, and a restart's checkpoint then removes the segments
        for _ in 0..2 {
            let client = s.primary.connect().await;
            let written = s.primary.flush_lsn(&client).await;
            drop(client);
            wait_archived(&s.archive, s.seg, written).await;
            s.primary.stop("immediate");
            s.primary.start();
        }
    }
    let client = s.primary.connect().await;
    client
        .batch_execute("INSERT INTO t SELECT g, 'y' FROM generate_series(1, 1000) g")
        .await
        .expect("rows after the restarts");
    let flushed = s.primary.flush_lsn(&client).await;
    wait_archived(&s.archive, s.seg, flushed).await;
    let log = s.sender.log_text();
    assert!(
        !log.contains("is no longer in"),
        "the sender needed WAL PostgreSQL removed:\n{log}"
    );
    // compare from the oldest segment PostgreSQL still has
    let oldest = std::fs::read_dir(s.primary.wal_dir())
        .expect("pg_wal")
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.len() == 24 && n.starts_with("00000001"))
                .then(|| u64::from_str_radix(&n[8..], 16).ok())
                .flatten()
        })
        .min()
        .expect("segments in pg_wal");
    // names are TLI + two 8-digit halves; with 1 MB segments the low half counts segments within 0x1000
    let segno = (oldest >> 32) * 0x1000 + (oldest & 0xFFFF_FFFF);
    let compared = assert_matches_primary_from(&s.archive, &s.primary.wal_dir(), s.seg, 1, segno);
    println!("after 8 restarts the archive matches pg_wal: {compared:?}");
}

/// Issue 19, point 10: PostgreSQL crashes right after `pg_switch_wal()`, before the sender learnt that the
/// switch was flushed (its flush reports are frozen by a failpoint, which makes the race certain). The
/// drain ships the switch and its padding provisionally; the restarted server's end-of-recovery
/// checkpoint removes the switched segment at once (no slot, `wal_keep_size = 0`), so the sender cannot
/// resend and compare it. It resumes at the next segment, which the receiver links to the archive through
/// the switch record, and completes the switched segment with the padding PostgreSQL wrote: the archive
/// equals what the primary had, and a standby recovered from it holds every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_a_wal_switch_resumes_past_the_removed_segment() {
    use std::time::Duration;
    use walship_protocol::wal::segment_file_name;
    use walship_protocol::Lsn;
    use walship_tests::cluster::WAIT;
    use walship_tests::scenario::wait_drained;
    use walship_tests::wait_for;

    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        conf: vec!["wal_keep_size = 0".into()],
        ..Default::default()
    };
    let mut s = shipping("switch-crash", &opts).await;
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(&s.restore_command("--wait"), false, &[]);
    standby.start_no_wait();
    let client = s.primary.connect().await;
    client
        .batch_execute("CREATE TABLE t (i int, pad text); INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 1000) g")
        .await
        .expect("rows");
    let flushed = s.primary.flush_lsn(&client).await;
    wait_archived(&s.archive, s.seg, flushed).await;

    // from here on the sender never hears that the primary flushed: what it ships stays provisional
    s.sender.stop_sender_of(&s.receiver);
    let mut sender = s.walship.sender_with(
        &s.dir,
        &s.primary.conninfo(),
        s.receiver.port,
        &s.certs,
        &s.certs,
        &[],
        &[("FAILPOINTS", "sender-flush-frozen=return")],
    );
    sender.wait_for_log("streaming", Duration::from_secs(30));
    client
        .batch_execute(
            "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1001, 3000) g",
        )
        .await
        .expect("more rows");
    let switch_end: String = client
        .query_one("SELECT pg_switch_wal()::text", &[])
        .await
        .expect("pg_switch_wal")
        .get(0);
    let switch_end: Lsn = switch_end.parse().expect("an LSN");
    let segno = s.seg.segno(switch_end);
    let name = segment_file_name(1, segno, s.seg);
    // the switch is flushed when pg_switch_wal() returns: this is the segment as PostgreSQL keeps it
    let truth = std::fs::read(s.primary.wal_dir().join(&name)).expect("the switched segment");
    let shipped = s.seg.offset(switch_end);
    wait_for("the switch record to be shipped", WAIT, || async {
        walship_tests::archive::partial_len(&s.archive, s.seg, 1, segno)
            .filter(|len| *len >= shipped)
            .map(|_| ())
    })
    .await;
    drop(client);

    s.primary.stop("immediate");
    wait_drained(&mut sender);
    s.primary.start();
    assert!(
        !s.primary.wal_dir().join(&name).exists(),
        "the restarted server kept {name}: this test needs it removed"
    );
    sender.wait_for_log("resuming at the next segment", WAIT);
    let complete = s.archive.join(&name);
    wait_for("the switched segment to be completed", WAIT, || async {
        complete.exists().then_some(())
    })
    .await;
    assert!(
        std::fs::read(&complete).expect("the archived segment") == truth,
        "the archive's {name} differs from the primary's"
    );
    s.receiver
        .wait_for_log("completed with its padding", Duration::from_secs(5));

    // an ordinary sender from here on: confirmations flow again
    sender.stop_sender_of(&s.receiver);
    let mut sender = s.sender_for(&s.primary.conninfo());
    sender.wait_for_log("streaming", Duration::from_secs(30));
    let client = s.primary.connect().await;
    client
        .batch_execute("INSERT INTO t SELECT g, 'y' FROM generate_series(3001, 4000) g")
        .await
        .expect("rows after the restart");
    let flushed = s.primary.flush_lsn(&client).await;
    wait_archived(&s.archive, s.seg, flushed).await;
    drop(client);
    for log in [sender.log_text(), s.sender.log_text()] {
        assert!(
            !log.contains("is no longer in"),
            "the sender needed WAL PostgreSQL removed:\n{log}"
        );
    }
    assert_matches_primary_from(&s.archive, &s.primary.wal_dir(), s.seg, 1, segno + 1);

    // a standby recovered from the archive replays through the switch into the restarted primary's WAL
    s.primary.stop("fast");
    wait_drained(&mut sender);
    sender.stop_sender_of(&s.receiver);
    s.promote(&standby);
    let promoted = standby.connect().await;
    let rows: i64 = promoted
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 4000, "the standby must hold every row");
}
