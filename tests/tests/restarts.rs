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
        // a crash under way, then another one right after the next start
        s.primary.stop("immediate");
        s.primary.start();
        s.primary.stop("immediate");
        s.primary.start();
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
