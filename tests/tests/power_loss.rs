//! Power loss of the primary's host against real PostgreSQL: WAL that PostgreSQL wrote but never flushed is
//! dropped before the restart, as a power loss drops it. The archive must follow the restarted primary (the
//! provisional rule, DESIGN.md §1): drained WAL is never confirmed, a resuming sender is compared and the
//! lost tail replaced, a hot standby fed by `restore --live` throughout never replays the lost WAL, and a
//! standby recovered from the archive holds exactly the rows the primary kept.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use walship_protocol::wal::segment_file_name;
use walship_protocol::{Lsn, WalSegSize};
use walship_tests::archive::{archive_end, assert_matches_primary_from, wait_archived};
use walship_tests::cluster::WAIT;
use walship_tests::scenario::{shipping, wait_drained};
use walship_tests::{wait_for, InitOptions};

/// `walship.position`: (durable, confirmed) of the archive's newest timeline.
fn positions(archive: &Path) -> Option<(Lsn, Lsn)> {
    let text = std::fs::read_to_string(archive.join("walship.position")).ok()?;
    let mut f = text.lines().next()?.split(' ');
    let _timeline = f.next()?;
    let durable = Lsn(u64::from_str_radix(f.next()?, 16).ok()?);
    let confirmed = Lsn(u64::from_str_radix(f.next()?, 16).ok()?);
    Some((durable, confirmed))
}

/// What a power loss leaves of `pg_wal`: every byte from `flush` to the end of its segment is zero (the
/// page cache never reached the disk; a segment file is zero-filled when PostgreSQL creates it).
fn drop_unflushed(pg_wal: &Path, seg: WalSegSize, flush: Lsn) {
    let name = segment_file_name(1, seg.segno(flush), seg);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(pg_wal.join(&name))
        .expect("open the segment holding the flush position");
    let offset = seg.offset(flush);
    let zeros = vec![0u8; (seg.as_u64() - offset) as usize];
    file.write_all_at(&zeros, offset)
        .expect("zero the unflushed tail");
    file.sync_all().expect("fsync the segment");
}

async fn scalar_i64(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn lsn(client: &tokio_postgres::Client, sql: &str) -> Lsn {
    let text: String = client.query_one(sql, &[]).await.expect(sql).get(0);
    text.parse().expect("an LSN")
}

/// The measurement of issue 19: postgres killed with written, unflushed WAL; the sender drains it; then the
/// host loses power (the sender dies, the unflushed WAL is gone) and the restarted primary writes other WAL
/// at the same positions. The archive must end up equal to the restarted primary's `pg_wal`, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_after_a_drain_never_splices_two_histories() {
    power_loss(Death::PostgresThenHost).await;
}

/// The same power loss without a drain: postgres and the sender die together (the host's power fails at
/// once). The archive holds the unflushed WAL that was shipped on write, provisional; the restarted
/// primary's sender resumes at the confirmed position and the receiver replaces what the primary lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_of_postgres_and_its_sender_together_is_followed() {
    power_loss(Death::HostAtOnce).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Death {
    /// postgres is killed, its host lives long enough for the sender to drain, then the power fails
    PostgresThenHost,
    /// the power fails: postgres and the sender die in the same instant
    HostAtOnce,
}

async fn power_loss(death: Death) {
    let opts = InitOptions {
        conf: [
            // WAL stays written but unflushed: commits do not flush, the WAL writer is stopped below, the
            // background writer writes no data page (which would flush WAL first), no checkpoint comes
            "synchronous_commit = off",
            "wal_writer_delay = '10s'",
            "wal_writer_flush_after = '1GB'",
            "wal_buffers = '64kB'",
            "bgwriter_lru_maxpages = 0",
            "autovacuum = off",
            "checkpoint_timeout = '1h'",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let mut s = shipping("power-loss-drain", &opts).await;
    let client = s.primary.connect().await;
    client
        .batch_execute("CREATE TABLE t (i int, pad text); SET synchronous_commit = on")
        .await
        .expect("create table");
    // a standby in archive recovery throughout: it gets complete segments only, never provisional WAL
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(&s.restore_command("--wait"), false, &[]);
    standby.start_no_wait();
    // and a hot standby with --live throughout: it replays confirmed WAL only
    let mut hot = s.primary.base_backup(&s.dir, "hot");
    hot.configure_recovery(
        &s.restore_command("--live"),
        true,
        &["wal_retrieve_retry_interval = '100ms'"],
    );
    hot.start_no_wait();
    // a fresh segment: the unflushed WAL below stays in one segment
    let switched = s.primary.switch_wal(&client).await;
    wait_archived(&s.archive, s.seg, switched).await;
    wait_for("the switch to be confirmed", WAIT, || async {
        positions(&s.archive)
            .filter(|(_, c)| *c >= switched)
            .map(|_| ())
    })
    .await;

    // the WAL writer stops (the postmaster's kill -9 below takes it too): nothing flushes WAL any more
    let walwriter = scalar_i64(
        &client,
        "SELECT pid::bigint FROM pg_stat_activity WHERE backend_type = 'walwriter'",
    )
    .await;
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &walwriter.to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    client
        .batch_execute(
            "SET synchronous_commit = off; \
             INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g",
        )
        .await
        .expect("insert the rows the power loss takes");
    let flush = lsn(&client, "SELECT pg_current_wal_flush_lsn()::text").await;
    let write = lsn(&client, "SELECT pg_current_wal_lsn()::text").await;
    println!("before the crash: flush {flush}, write {write}");
    assert!(
        write.0 >= flush.0 + (1 << 20),
        "the test needs unflushed WAL: flush {flush}, write {write}"
    );
    assert_eq!(s.seg.segno(flush), s.seg.segno(write), "one segment");
    drop(client);

    let shipped_at_least = Lsn(write.0.saturating_sub(64 << 10));
    if death == Death::PostgresThenHost {
        // postgres dies, its host lives: the sender drains what is in pg_wal
        s.primary.kill9();
        wait_drained(&mut s.sender);
    } else {
        // shipped on write before the power fails (provisional: nothing flushed it)
        wait_archived(&s.archive, s.seg, shipped_at_least).await;
        s.primary.kill9_with(&[s.sender.pid()]);
    }
    let shipped_end = archive_end(&s.archive, s.seg, 1).expect("archive end");
    assert!(
        shipped_end >= shipped_at_least,
        "the written WAL is in the archive (provisional): archive ends at {shipped_end}, written up to {write}"
    );
    let (durable, confirmed) = positions(&s.archive).expect("walship.position");
    println!("archive ends at {shipped_end}, durable {durable}, confirmed {confirmed}");
    assert!(
        confirmed <= flush,
        "the archive confirmed {confirmed}, past the primary's flush position {flush}"
    );

    // the power fails: the sender dies, what was not flushed is gone, the primary restarts and writes
    // other WAL at the same positions
    s.sender.kill9();
    drop_unflushed(&s.primary.wal_dir(), s.seg, flush);
    s.primary.start();
    let client = s.primary.connect().await;
    let before = scalar_i64(&client, "SELECT count(*) FROM t").await;
    assert_eq!(before, 0, "the power loss took the unflushed rows");
    client
        .batch_execute(
            "SET synchronous_commit = on; \
             INSERT INTO t SELECT 100000 + g, repeat('y', 100) FROM generate_series(1, 5000) g",
        )
        .await
        .expect("insert after the restart");
    let after = lsn(&client, "SELECT pg_current_wal_flush_lsn()::text").await;

    // a new sender (the host is back): it resumes at the confirmed position and the receiver compares
    let mut sender = s.sender_for(&s.primary.conninfo());
    sender.wait_for_log("streaming", Duration::from_secs(30));
    wait_for("the archive to confirm the new rows", WAIT, || async {
        positions(&s.archive)
            .filter(|(_, c)| *c >= after)
            .map(|_| ())
    })
    .await;
    assert!(
        s.receiver.log_text().contains("replacing provisional WAL"),
        "the receiver must replace the tail the primary lost:\n{}",
        s.receiver.log_text()
    );
    let end = lsn(&client, "SELECT pg_switch_wal()::text").await;
    wait_archived(&s.archive, s.seg, s.seg.segment_start(s.seg.segno(end) + 1)).await;
    let compared = assert_matches_primary_from(
        &s.archive,
        &s.primary.wal_dir(),
        s.seg,
        1,
        s.seg.segno(switched),
    );
    println!("the archive matches the restarted primary's pg_wal: {compared:?}");
    drop(client);

    // the hot standby ends with exactly the restarted primary's rows: it never replayed the lost ones
    let replica = wait_for("the hot standby to accept connections", WAIT, || {
        hot.try_connect()
    })
    .await;
    let counts = wait_for("the hot standby to replay the new rows", WAIT, || async {
        let lost: i64 = replica
            .query_one("SELECT count(*) FROM t WHERE i <= 100000", &[])
            .await
            .ok()?
            .get(0);
        let kept: i64 = replica
            .query_one("SELECT count(*) FROM t WHERE i > 100000", &[])
            .await
            .ok()?
            .get(0);
        (kept == 5000).then_some((lost, kept))
    })
    .await;
    assert_eq!(counts, (0, 5000), "the hot standby diverged");
    drop(replica);

    // a standby recovered from the archive holds exactly the rows the restarted primary kept
    s.primary.stop("fast");
    wait_for(
        "the sender to drain the shutdown checkpoint",
        WAIT,
        || async {
            sender
                .log_text()
                .contains("primary down: the receiver holds")
                .then_some(())
        },
    )
    .await;
    let (durable, confirmed) = positions(&s.archive).expect("walship.position");
    assert_eq!(
        confirmed, durable,
        "a clean shutdown's checkpoint (pg_control) proves all of its WAL flushed"
    );
    sender.stop_sender_of(&s.receiver);
    let (_, _, text) = s.promote(&standby);
    println!("{}", text.trim());
    let promoted = standby.connect().await;
    let lost = scalar_i64(&promoted, "SELECT count(*) FROM t WHERE i <= 100000").await;
    let kept = scalar_i64(&promoted, "SELECT count(*) FROM t WHERE i > 100000").await;
    assert_eq!(
        (lost, kept),
        (0, 5000),
        "the standby must hold exactly the restarted primary's rows"
    );
}
