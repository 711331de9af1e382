//! The archive on S3-compatible object storage, against a real server (s3s-fs): every object decompresses to
//! the primary's segment, the partial's durable part is there too, a store outage only delays uploads (and
//! cleanup waits for them), and a second cluster on the same prefix is refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use walship_protocol::wal::segment_file_name;
use walship_protocol::WalSegSize;
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::s3::S3Server;
use walship_tests::scenario::{stage, Stage};
use walship_tests::{wait_for, Cluster, InitOptions, Walship};

fn decompress(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::decode_all(bytes).expect("a stored object decompresses")
}

/// Waits until every complete segment of the archive up to `name` is in the store.
async fn wait_uploaded(archive: &Path, name: &str) {
    wait_for(&format!("{name} in the object store"), WAIT, || async {
        walship_receiver::upload::read_state(archive)
            .and_then(|s| s.segments_up_to)
            .filter(|up_to| up_to.as_str() >= name)
            .map(|_| ())
    })
    .await;
}

/// Every complete segment of the archive is in the store, and decompresses to the primary's file.
fn assert_store_matches_primary(
    s3: &S3Server,
    prefix: &str,
    archive: &Path,
    pg_wal: &Path,
) -> usize {
    let mut n = 0;
    let mut names: Vec<String> = std::fs::read_dir(archive)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    names.sort();
    for name in names {
        let stored = s3
            .object(&format!("{prefix}/{name}.zst"))
            .unwrap_or_else(|| panic!("{name} is not in the store"));
        let primary = std::fs::read(pg_wal.join(&name)).expect("the primary's segment");
        assert!(
            decompress(&stored) == primary,
            "{name} in the store differs from pg_wal"
        );
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holds_the_primarys_wal_and_an_outage_only_delays_it() {
    let Stage {
        dir,
        primary,
        archive,
        certs,
        walship,
    } = stage("store", &InitOptions::default());
    let client = primary.connect().await;
    let mut s3 = S3Server::start(&dir, "s3");
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = s3.url("cluster-a");
    let receiver = walship.receiver_with(
        &dir,
        &archive,
        &certs,
        0,
        &["--object-store", &url, "--partial-upload-interval", "1"],
        &env,
    );
    let mut sender = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &certs,
        &[],
    );
    sender.wait_for_log("streaming", WAIT);
    let seg = WalSegSize::DEFAULT;

    // shipping under pgbench, then two switches: the store holds every complete segment
    run_ok(&mut primary.pgbench(&["-i", "-s", "2", "-q"]));
    run_ok(&mut primary.pgbench(&["-c", "2", "-T", "3", "-n"]));
    primary.switch_wal(&client).await;
    let switched = primary.switch_wal(&client).await;
    let last = segment_file_name(1, seg.segno(switched) - 1, seg);
    wait_uploaded(&archive, &last).await;
    let n = assert_store_matches_primary(&s3, "cluster-a", &archive, &primary.wal_dir());
    println!("{n} segments in the store, identical to pg_wal");
    assert!(n >= 2);
    assert!(s3.object("cluster-a/walship.id").is_some());
    // the partial's durable part follows within the upload interval
    client
        .batch_execute("CREATE TABLE tail AS SELECT g FROM generate_series(1, 10000) g")
        .await
        .unwrap();
    let flush = primary.flush_lsn(&client).await;
    let partial = format!("{}.partial", segment_file_name(1, seg.segno(flush), seg));
    let on_primary = std::fs::read(primary.wal_dir().join(&partial[..24])).unwrap();
    wait_for("the partial segment in the store", WAIT, || async {
        let stored = decompress(&s3.object(&format!("cluster-a/{partial}.zst"))?);
        (stored.len() as u64 >= seg.offset(flush) && on_primary.starts_with(&stored)).then_some(())
    })
    .await;

    // the store goes away under load: the archive keeps growing, status says what waits, cleanup keeps it
    s3.stop();
    run_ok(&mut primary.pgbench(&["-c", "2", "-T", "3", "-n"]));
    let during = primary.switch_wal(&client).await;
    let not_uploaded = segment_file_name(1, seg.segno(during) - 1, seg);
    wait_for(
        "the segment switched during the outage, complete in the archive",
        WAIT,
        || async { archive.join(&not_uploaded).exists().then_some(()) },
    )
    .await;
    let status = run_ok(
        Command::new(walship.path(Walship::RECEIVER))
            .args(["status", "--archive"])
            .arg(&archive),
    );
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    println!("{status}");
    assert!(status.contains("object store:"), "{status}");
    assert!(!status.contains(" 0 waiting"), "{status}");
    let cleanup = run_ok(
        Command::new(walship.path(Walship::RECEIVER))
            .args(["cleanup", "--archive"])
            .arg(&archive)
            .arg(segment_file_name(1, seg.segno(during) + 5, seg)),
    );
    assert!(
        archive.join(&not_uploaded).exists(),
        "cleanup removed {not_uploaded}, which the store does not hold: {}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    // back: the uploads resume with no gap
    s3.resume(&dir);
    wait_uploaded(&archive, &not_uploaded).await;
    let n = assert_store_matches_primary(&s3, "cluster-a", &archive, &primary.wal_dir());
    println!("after the outage: {n} segments in the store, identical to pg_wal");
    assert!(sender.terminate(Duration::from_secs(20)).success());

    // restore_command: a segment cleanup removed locally comes from the store (decompressed, checked);
    // without the store it is missing
    let first = segment_file_name(1, 1, seg);
    assert!(!archive.join(&first).exists(), "cleanup kept {first}");
    let dest = dir.path().join("restored");
    let restore = |with_store: bool| {
        let mut cmd = Command::new(walship.path(Walship::RECEIVER));
        cmd.args(["restore", "--archive"]).arg(&archive);
        if with_store {
            cmd.args(["--object-store", &url]);
        }
        cmd.arg(&first).arg(&dest).envs(env.iter().copied());
        walship_tests::env::as_db_user(&mut cmd)
            .output()
            .expect("run restore")
    };
    assert_eq!(restore(false).status.code(), Some(1));
    let out = restore(true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&dest).unwrap() == std::fs::read(primary.wal_dir().join(&first)).unwrap(),
        "{first} restored from the store differs from pg_wal"
    );

    // a second cluster on the same prefix: its receiver takes the store's identity, its sender is refused
    let mut other = Cluster::init(&dir, "other", &InitOptions::default());
    other.start();
    let other_archive = dir.path().join("other-archive");
    let other_receiver = walship.receiver_with(
        &dir,
        &other_archive,
        &certs,
        0,
        &["--object-store", &url],
        &env,
    );
    let mut foreign = walship.sender(
        &dir,
        &other.conninfo(),
        other_receiver.port,
        &certs,
        &certs,
        &[],
    );
    let status = foreign.wait_exit(WAIT);
    let log = foreign.log_text();
    assert!(!status.success(), "{log}");
    let ours = primary.system_identifier(&client).await.to_string();
    assert!(
        log.contains(&ours),
        "the refusal does not name the store's cluster:\n{log}"
    );
}
