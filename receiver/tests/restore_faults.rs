//! Failover state and the restore handover under an injected failure between handing the partial to
//! recovery and recording it (process-wide failpoints: one test binary of its own).

use std::fs;

mod common;
use common::{append_confirmed, identity, wal, SEG};

use walship_protocol::wal::segment_file_name;
use walship_protocol::Lsn;
use walship_receiver::archive::{Archive, Failover, FAILOVER_FILE};
use walship_receiver::restore::{restore, Outcome, RestoreOptions};

#[test]
fn failover_state_is_keyed_by_timeline_and_the_handover_survives_a_failure() {
    let scenario = fail::FailScenario::setup();
    let tmp = tempfile::tempdir().unwrap();

    // promote/restore refuse what is not an archive, and write nothing into it
    let not_archive = tmp.path().join("plain");
    fs::create_dir(&not_archive).unwrap();
    let err = Failover::request(&not_archive, tmp.path(), None).unwrap_err();
    assert!(
        format!("{err:#}").contains("not a walship archive"),
        "{err:#}"
    );
    assert!(!not_archive.join(FAILOVER_FILE).exists());
    let err = Failover::request(&tmp.path().join("missing"), tmp.path(), None).unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");

    let dir = tmp.path().join("archive");
    let mut a = Archive::open(&dir).unwrap();
    a.check_or_pin_identity(identity()).unwrap().unwrap();
    let start = 3 * SEG;
    let data = wal(1, start, 50_000);
    append_confirmed(&mut a, 1, Lsn(start), &data);
    a.sync(1).unwrap();

    let state = Failover::request(&dir, tmp.path(), None).unwrap();
    assert_eq!(state.timeline, 1);
    let name = segment_file_name(1, 3, identity().wal_segment_size);
    let dest = tmp.path().join("RECOVERYXLOG");
    let opts = RestoreOptions {
        archive: dir.clone(),
        wait: false,
        live: false,
        trigger: None,
        allow_archive_mode_always: false,
        wanted: name.clone(),
        dest: dest.clone(),
        data_dir: tmp.path().to_owned(),
        object_store: None,
        prefetch: 0,
    };

    // the call fails after writing %p but before recording: recovery is told "missing", nothing recorded
    fail::cfg("restore-handover-before-record", "1*return").unwrap();
    assert_eq!(restore(&opts), Outcome::Missing);
    let state = Failover::load(&dir).unwrap().unwrap();
    assert!(state.current_handover().is_none());
    // PostgreSQL asks again: handed over, zero-padded, and recorded
    assert_eq!(restore(&opts), Outcome::Restored);
    let got = fs::read(&dest).unwrap();
    assert_eq!(got.len() as u64, SEG);
    assert_eq!(&got[..data.len()], &data[..]);
    assert!(got[data.len()..].iter().all(|b| *b == 0));
    let h = Failover::load(&dir).unwrap().unwrap().handover.unwrap();
    assert_eq!((h.timeline, h.partial_bytes), (1, 50_000));
    assert_eq!(h.end_lsn, Lsn(start + 50_000));
    // later segments of that timeline are missing, so recovery ends at the handover
    let next = RestoreOptions {
        wanted: segment_file_name(1, 4, identity().wal_segment_size),
        ..opts.clone()
    };
    assert_eq!(restore(&next), Outcome::Missing);

    // the promoted server's WAL (timeline 2) arrives: the failover of timeline 1 is over and forgotten
    let switch = start + 40_000;
    let new_start = identity().wal_segment_size.floor(Lsn(switch));
    a.store_history(
        2,
        format!("1\t{}\tno recovery target specified\n", Lsn(switch)).as_bytes(),
    )
    .unwrap();
    a.append(2, new_start, &wal(2, new_start.0, 20_000))
        .unwrap();
    a.sync(2).unwrap();
    assert!(!dir.join(FAILOVER_FILE).exists());
    assert_eq!(Failover::load(&dir).unwrap(), None);
    // a stale state left for an older timeline (restored from a backup, say) is ignored too
    fs::write(dir.join(FAILOVER_FILE), serde_json::to_vec(&state).unwrap()).unwrap();
    assert_eq!(Failover::load(&dir).unwrap(), None);
    // a new failover is of timeline 2
    assert_eq!(
        Failover::request(&dir, tmp.path(), None).unwrap().timeline,
        2
    );
    scenario.teardown();
}
