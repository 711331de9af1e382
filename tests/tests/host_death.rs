//! The primary's host dies under load: the postmaster, its children and the walship sender are SIGKILLed in
//! one `kill` while a ledger of acknowledged commits and pgbench run; the receiver lives. Nothing can be
//! drained from `pg_wal/` (the host is gone), so what counts is what reached the archive before: with ship on
//! write, records travel while the primary is still fsyncing them.
//!
//! Five deaths at random moments. After each, the archive must be byte-identical to the primary's WAL for all
//! it holds (provisional bytes included: nothing torn or invalid was shipped), and the acknowledged commits
//! beyond its end are counted and reported. The first four are followed by the host coming back (crash
//! recovery, a new sender resuming at the confirmed end); after the fifth the standby fails over, and every
//! acknowledged commit the archive covers must be on it.

use walship_tests::archive::{archive_end, assert_matches_primary};
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::ledger::{losses, under_load, verdict};
use walship_tests::scenario::shipping;
use walship_tests::{wait_for, InitOptions, Lcg};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_death_under_load_loses_at_most_what_was_in_flight() {
    let mut rng = Lcg::from_clock();
    println!("death moments from seed {}", rng.0);
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut s = shipping("hostdeath", &opts).await;
    run_ok(&mut s.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut standby = s.primary.base_backup(&s.dir, "standby");
    standby.configure_recovery(&s.restore_command("--wait"), false, &[]);
    standby.start_no_wait();

    let mut all_rows = Vec::new();
    let mut report = Vec::new();
    for round in 1..=5 {
        let (ledger, mut bench) = under_load(&s.primary).await;
        // a random moment under load (not a synchronisation)
        std::thread::sleep(std::time::Duration::from_millis(rng.below(1500)));
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
        let (lost, possibly) = losses(&rows, end);
        let log = s.receiver.log_text();
        let how = log
            .lines()
            .rfind(|l| l.contains("session ended") || l.contains("closing connection"))
            .unwrap_or_default()
            .to_owned();
        println!("the receiver: {how}");
        let last_acked = rows.iter().map(|(_, l)| *l).max().expect("rows");
        println!(
            "host death {round}: {} commits acknowledged, the last flushed at {last_acked}; the archive ends at {end}; lost {lost} for certain, {possibly} possibly",
            rows.len()
        );
        // pg_wal survived (this host did not really lose its page cache): everything archived, provisional
        // or confirmed, is byte for byte the primary's WAL
        assert_matches_primary(&s.archive, &s.primary.wal_dir(), s.seg, 1);
        report.push((lost, possibly));
        all_rows.extend(rows);
        if round < 5 {
            s.primary.start();
            s.sender = s.sender_for(&s.primary.conninfo());
            s.sender.wait_for_log("streaming", WAIT);
        }
    }
    // the fifth death is final: fail over to the standby with what the archive holds
    let end = archive_end(&s.archive, s.seg, 1).expect("archive end");
    let (timeline, start, text) = s.promote(&standby);
    println!("{}", text.trim());
    assert_eq!(timeline, 2);
    assert!(
        start <= end,
        "timeline 2 starts at {start}, after the archive's end {end}"
    );
    let promoted = standby.connect().await;
    let v = verdict(&all_rows, end, &promoted).await;
    println!(
        "5 host deaths: losses per death (certain, possible) {report:?}; after failover: acknowledged {}, present {}, lost {}",
        v.acknowledged,
        v.present,
        v.acknowledged - v.present
    );
    assert!(
        v.missing_covered.is_empty(),
        "commits the archive covers are missing after failover: {v:?}"
    );
    let (lost_last, _) = report[4];
    assert!(
        v.acknowledged - v.present <= report[4].1,
        "more commits lost after failover ({}) than were beyond the archive at the last death ({lost_last} certain, {} possible)",
        v.acknowledged - v.present,
        report[4].1
    );
}
