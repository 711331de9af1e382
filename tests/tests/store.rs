//! The archive on S3-compatible object storage, against a real server (s3s-fs): every object decompresses to
//! the primary's segment, the partial's durable part is there too, a store outage only delays uploads (and
//! cleanup waits for them), and a second cluster on the same prefix is refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use walship_protocol::wal::{segment_file_name, WalFileName};
use walship_protocol::{Lsn, WalSegSize};
use walship_tests::archive::archive_end;
use walship_tests::azurite::Azurite;
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::ledger::{verdict, Ledger};
use walship_tests::s3::S3Server;
use walship_tests::scenario::{stage, wait_drained, Stage};
use walship_tests::{wait_for, Cluster, Daemon, InitOptions, TestDir, Walship};

/// Which object store a test runs against.
#[derive(Clone, Copy, Debug)]
enum Kind {
    S3,
    Azure,
}

/// A running object store of either kind: s3s-fs or Azurite, with what the tests ask of it.
enum Backend {
    S3(S3Server),
    /// Azurite behind a proxy: an outage is the proxy refusing connections (stopping Azurite would lose
    /// what it holds in memory, or wait for the receiver's kept-alive connections to close).
    Azure(Azurite, walship_tests::proxy::Proxy),
}

impl Backend {
    async fn start(kind: Kind, dir: &TestDir) -> Backend {
        match kind {
            Kind::S3 => Backend::S3(S3Server::start(dir, "s3")),
            Kind::Azure => {
                let azurite = Azurite::start(dir, "azurite");
                let proxy = walship_tests::proxy::Proxy::start(
                    format!("127.0.0.1:{}", azurite.port)
                        .parse()
                        .expect("address"),
                )
                .await;
                Backend::Azure(azurite, proxy)
            }
        }
    }

    fn url(&self, prefix: &str) -> String {
        match self {
            Backend::S3(s) => s.url(prefix),
            Backend::Azure(a, _) => a.url(prefix),
        }
    }

    /// The client settings walship gets (through the proxy for Azure).
    fn env(&self) -> Vec<(String, String)> {
        match self {
            Backend::S3(s) => s.env(),
            Backend::Azure(a, proxy) => a
                .env()
                .into_iter()
                .map(|(k, v)| {
                    if k == "AZURE_STORAGE_ENDPOINT" {
                        let direct = format!("127.0.0.1:{}", a.port);
                        (k, v.replace(&direct, &format!("127.0.0.1:{}", proxy.port)))
                    } else {
                        (k, v)
                    }
                })
                .collect(),
        }
    }

    /// The store's secret in those settings (it must never show in a log).
    fn secret(&self) -> String {
        let name = match self {
            Backend::S3(_) => "AWS_SECRET_ACCESS_KEY",
            Backend::Azure(..) => "AZURE_STORAGE_ACCOUNT_KEY",
        };
        self.env()
            .into_iter()
            .find(|(k, _)| k == name)
            .expect("the secret")
            .1
    }

    /// An outage.
    fn stop(&mut self) {
        match self {
            Backend::S3(s) => s.stop(),
            Backend::Azure(_, proxy) => proxy.refuse(true),
        }
    }

    fn resume(&mut self, dir: &TestDir) {
        match self {
            Backend::S3(s) => s.resume(dir),
            Backend::Azure(_, proxy) => proxy.refuse(false),
        }
    }

    /// The walship store of `prefix` (for reading objects as they are stored; straight to the server).
    fn store(&self, prefix: &str) -> walship_receiver::store::Store {
        let env = match self {
            Backend::S3(s) => s.env(),
            Backend::Azure(a, _) => a.env(),
        };
        let options: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let spec =
            walship_receiver::store::StoreSpec::new(&self.url(prefix), &options).expect("spec");
        walship_receiver::store::Store::open(&spec).expect("open the store")
    }

    /// The stored bytes of object `key` (`prefix/name`), as the server keeps them (None: not there).
    fn object(&self, key: &str) -> Option<Vec<u8>> {
        match self {
            Backend::S3(s) => s.object(key),
            Backend::Azure(..) => {
                let (prefix, name) = key.rsplit_once('/').expect("prefix/name");
                let store = self.store(prefix);
                // a runtime of its own, on a thread of its own (the test's runtime is this thread's)
                std::thread::scope(|scope| {
                    scope
                        .spawn(|| walship_receiver::store::block_on(store.object_bytes(name)))
                        .join()
                })
                .expect("the reading thread")
                .expect("a runtime")
                .expect("read the object")
                .map(|b| b.to_vec())
            }
        }
    }

    /// The names of the objects directly under `prefix`, sorted.
    fn objects(&self, prefix: &str) -> Vec<String> {
        match self {
            Backend::S3(s) => s.objects(prefix),
            Backend::Azure(..) => {
                let store = self.store(prefix);
                std::thread::scope(|scope| {
                    scope
                        .spawn(|| walship_receiver::store::block_on(store.object_names()))
                        .join()
                })
                .expect("the listing thread")
                .expect("a runtime")
                .expect("list the objects")
            }
        }
    }
}

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
    s3: &Backend,
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

/// The store and its credentials in a 0600 config file for `restore` and `promote` (`--config`), not in
/// postgresql.conf or the environment.
fn store_config(dir: &TestDir, url: &str, env: &[(String, String)]) -> std::path::PathBuf {
    let config = dir.path().join("restore.toml");
    std::fs::write(
        &config,
        format!(
            "object-store = {url:?}\nobject-store-option = [{}]\n",
            env.iter()
                .map(|(k, v)| format!("\"{k}={v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    walship_tests::env::chown_to_db_user(&config);
    config
}

/// `restore_command` for a standby restoring from `archive` and the store of `config`.
fn restore_with_store(receiver_bin: &Path, config: &Path, archive: &Path) -> String {
    format!(
        "{} restore --config {} --archive {} %f %p",
        receiver_bin.display(),
        config.display(),
        archive.display()
    )
}

/// `walship-receiver promote` of `standby` with the store of `config`; what it printed (stdout, stderr).
fn promote_with_store(
    receiver_bin: &Path,
    config: &Path,
    archive: &Path,
    standby: &Cluster,
) -> String {
    let out = run_ok(
        Command::new(receiver_bin)
            .arg("promote")
            .arg("--config")
            .arg(config)
            .arg("--archive")
            .arg(archive)
            .arg("--pgdata")
            .arg(&standby.data)
            .args(["--timeout", "120"]),
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A receiver that uploads `archive` to `url` of `s3` (the partial every second), and a sender shipping
/// `primary` to it, streaming.
fn ship_to_store(
    dir: &TestDir,
    primary: &Cluster,
    archive: &Path,
    certs: &Path,
    walship: &Walship,
    s3: &Backend,
    url: &str,
) -> (Daemon, Daemon) {
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let receiver = walship.receiver_with(
        dir,
        archive,
        certs,
        0,
        &["--object-store", url, "--partial-upload-interval", "1"],
        &env,
    );
    let mut sender = walship.sender(dir, &primary.conninfo(), receiver.port, certs, certs, &[]);
    sender.wait_for_log("streaming", WAIT);
    (receiver, sender)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holds_the_primarys_wal_and_an_outage_only_delays_it_s3() {
    the_store_holds_the_primarys_wal_and_an_outage_only_delays_it(Kind::S3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holds_the_primarys_wal_and_an_outage_only_delays_it_azure() {
    the_store_holds_the_primarys_wal_and_an_outage_only_delays_it(Kind::Azure).await
}

async fn the_store_holds_the_primarys_wal_and_an_outage_only_delays_it(kind: Kind) {
    let Stage {
        dir,
        primary,
        archive,
        certs,
        walship,
    } = stage("store", &InitOptions::default());
    let client = primary.connect().await;
    let mut s3 = Backend::start(kind, &dir).await;
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = s3.url("cluster-a");
    let (_receiver, mut sender) =
        ship_to_store(&dir, &primary, &archive, &certs, &walship, &s3, &url);
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
    // recovery_target_timeline = latest probes a history file that never existed: with the store down,
    // restore --wait answers "missing" from the local archive instead of waiting for the store forever
    let probe = {
        let mut cmd = Command::new(walship.path(Walship::RECEIVER));
        cmd.args(["restore", "--wait", "--archive"])
            .arg(&archive)
            .args(["--object-store", &url])
            .arg("00000002.history")
            .arg(dir.path().join("probe"))
            .envs(env.iter().copied());
        walship_tests::env::as_db_user(&mut cmd)
            .output()
            .expect("run restore")
    };
    assert_eq!(
        probe.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
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
    let restore = |name: &str, with_store: bool| {
        let mut cmd = Command::new(walship.path(Walship::RECEIVER));
        cmd.args(["restore", "--archive"]).arg(&archive);
        if with_store {
            cmd.args(["--object-store", &url]);
        }
        cmd.arg(name).arg(&dest).envs(env.iter().copied());
        walship_tests::env::as_db_user(&mut cmd)
            .output()
            .expect("run restore")
    };
    assert_eq!(restore(&first, false).status.code(), Some(1));
    let out = restore(&first, true);
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
    // meanwhile the next segments were fetched ahead into the spool; the next restore takes its copy
    let second = segment_file_name(1, 2, seg);
    assert!(!archive.join(&second).exists(), "cleanup kept {second}");
    let spooled = archive.join("prefetch").join(&second);
    wait_for(&format!("{second} prefetched"), WAIT, || async {
        spooled.exists().then_some(())
    })
    .await;
    let out = restore(&second, true);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("prefetched"), "{said}");
    assert!(
        std::fs::read(&dest).unwrap() == std::fs::read(primary.wal_dir().join(&second)).unwrap(),
        "{second} restored from the prefetch spool differs from pg_wal"
    );
    assert!(
        !spooled.exists(),
        "the spool keeps {second} after handing it over"
    );

    // status lists what the store holds (exit 1: no sender is connected any more)
    let status = Command::new(walship.path(Walship::RECEIVER))
        .args(["status", "--archive"])
        .arg(&archive)
        .args(["--object-store", &url])
        .envs(env.iter().copied())
        .output()
        .expect("run status");
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    println!("{status}");
    assert!(
        status.contains("complete segments (000000010000000000000001 to"),
        "{status}"
    );
    // retention in the store: nothing stored less than --keep-days ago goes; with 0 days, what %r no longer
    // needs goes (history files and the identity stay)
    let third = segment_file_name(1, 3, seg);
    let clean_store = |days: &str| {
        run_ok(
            Command::new(walship.path(Walship::RECEIVER))
                .args(["cleanup", "--archive"])
                .arg(&archive)
                .args(["--object-store", &url, "--keep-days", days])
                .arg(&third)
                .envs(env.iter().copied()),
        )
    };
    clean_store("7");
    assert!(s3.object(&format!("cluster-a/{first}.zst")).is_some());
    clean_store("0");
    assert!(s3.object(&format!("cluster-a/{first}.zst")).is_none());
    assert!(s3.object(&format!("cluster-a/{second}.zst")).is_none());
    assert!(s3.object(&format!("cluster-a/{third}.zst")).is_some());
    assert!(s3.object("cluster-a/walship.id").is_some());
    // what retention deleted is recorded, so restore says "removed", never "missing"
    let recorded =
        std::fs::read_to_string(archive.join("walship.cleanup")).expect("walship.cleanup");
    assert!(
        recorded.trim() >= second.as_str(),
        "walship.cleanup names the newest removed segment: {recorded}"
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
        log.contains("belongs to another cluster") && !log.contains(&ours),
        "the refusal says the archive belongs to another cluster, without naming it to the sender:\n{log}"
    );
    assert!(
        other_receiver.log_text().contains(&ours),
        "the receiver's log names the store's cluster"
    );
}

/// The length of the archive file an object holds: decompressed, or as an encrypted object's header says.
fn stored_len(bytes: &[u8]) -> u64 {
    match walship_receiver::crypt::split(bytes) {
        Some((header, _)) => {
            header
                .file
                .expect("an encrypted object names its file's length")
                .0
        }
        None => decompress(bytes).len() as u64,
    }
}

/// Where the store's WAL of timeline 1 ends: the last complete segment's end, or its partial's.
fn store_end(s3: &Backend, prefix: &str, seg: WalSegSize) -> Lsn {
    let mut end = Lsn(0);
    for object in s3.objects(prefix) {
        let Some(name) = object.strip_suffix(".zst") else {
            continue;
        };
        let here = match WalFileName::parse(name, seg) {
            Ok(WalFileName::Segment { timeline: 1, segno }) => seg.segment_start(segno + 1),
            Ok(WalFileName::Partial { timeline: 1, segno }) => {
                let Some(bytes) = s3.object(&format!("{prefix}/{object}")) else {
                    continue;
                };
                Lsn(seg.segment_start(segno).0 + stored_len(&bytes))
            }
            _ => continue,
        };
        end = end.max(here);
    }
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_with_an_empty_archive_recovers_from_the_store_and_fails_over_s3() {
    a_standby_with_an_empty_archive_recovers_from_the_store_and_fails_over(Kind::S3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_with_an_empty_archive_recovers_from_the_store_and_fails_over_azure() {
    a_standby_with_an_empty_archive_recovers_from_the_store_and_fails_over(Kind::Azure).await
}

async fn a_standby_with_an_empty_archive_recovers_from_the_store_and_fails_over(kind: Kind) {
    let Stage {
        dir,
        mut primary,
        archive,
        certs,
        walship,
    } = stage("store-failover", &InitOptions::default());
    let s3 = Backend::start(kind, &dir).await;
    let env = s3.env();
    let url = s3.url("cluster");
    let seg = WalSegSize::DEFAULT;
    // the store is encrypted: the receiver holds the public key, the new standby the identity
    let receiver_bin = walship.path(Walship::RECEIVER);
    let key = dir.path().join("store.key");
    let keygen = run_ok(walship_tests::env::as_db_user(
        Command::new(&receiver_bin)
            .args(["keygen", "--out"])
            .arg(&key),
    ));
    let public = String::from_utf8_lossy(&keygen.stdout).trim().to_owned();
    assert!(public.starts_with("age1"), "keygen printed {public:?}");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut receiver = walship.receiver_with(
        &dir,
        &archive,
        &certs,
        0,
        &[
            "--object-store",
            &url,
            "--partial-upload-interval",
            "1",
            "--store-encrypt-to",
            &public,
        ],
        &env_refs,
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
    let mut standby = primary.base_backup(&dir, "standby");

    run_ok(&mut primary.pgbench(&["-i", "-s", "2", "-q"]));
    let ledger = Ledger::start(&primary).await;
    run_ok(&mut primary.pgbench(&["-c", "2", "-j", "2", "-T", "3", "-n"]));
    wait_for("ledger rows", WAIT, || async {
        (ledger.acknowledged().len() > 200).then_some(())
    })
    .await;
    // postgres crashes: the sender ships the rest of pg_wal to the archive
    primary.kill9();
    let rows = ledger.finish().await;
    wait_drained(&mut sender);
    let end = archive_end(&archive, seg, 1).expect("the archive's end");
    // the uploader brings the store to the archive's end: complete segments, then the partial's durable part
    // (every --partial-upload-interval, with no shutdown)
    wait_for(&format!("the store to reach {end}"), WAIT, || async {
        (store_end(&s3, "cluster", seg) >= end).then_some(())
    })
    .await;
    // the standby's host is lost, with its receiver and its archive
    sender.kill9();
    receiver.kill9();
    let identity = std::fs::read(archive.join("walship.id")).expect("the archive's identity");
    std::fs::remove_dir_all(&archive).expect("remove the lost archive");

    // nothing in the store reads as WAL, zstd or text without the key
    let objects = s3.objects("cluster");
    assert!(objects.len() >= 3, "{objects:?}");
    for object in &objects {
        let bytes = s3.object(&format!("cluster/{object}")).expect("the object");
        assert!(
            bytes.starts_with(walship_receiver::crypt::MAGIC),
            "{object} is stored unencrypted"
        );
        assert!(
            !bytes.windows(4).any(|w| w == [0x28, 0xB5, 0x2F, 0xFD]),
            "{object} holds a zstd frame in the clear"
        );
    }
    let stored_segment = objects
        .iter()
        .find(|o| o.len() == 28 && o.ends_with(".zst"))
        .expect("a complete segment in the store")
        .trim_end_matches(".zst")
        .to_owned();
    // restore without the key, and with another one: a clear error naming the object and the key id,
    // nothing handed to recovery
    let probe = dir.subdir("probe");
    std::fs::write(probe.join("walship.id"), &identity).unwrap();
    walship_tests::env::chown_to_db_user(&probe);
    walship_tests::env::chown_to_db_user(&probe.join("walship.id"));
    let other_key = dir.path().join("other.key");
    run_ok(walship_tests::env::as_db_user(
        Command::new(&receiver_bin)
            .args(["keygen", "--out"])
            .arg(&other_key),
    ));
    let bare = store_config(&dir, &url, &env);
    let config_text = std::fs::read_to_string(&bare).unwrap();
    let with_identity = |file: &Path| {
        std::fs::write(
            &bare,
            format!(
                "{config_text}store-identity = {:?}\n",
                file.display().to_string()
            ),
        )
        .unwrap();
    };
    for (identity, expect) in [
        (None, "no identity was given"),
        (Some(&other_key), "none of the identities"),
    ] {
        match identity {
            Some(file) => with_identity(file),
            None => std::fs::write(&bare, &config_text).unwrap(),
        }
        let target = probe.join("out");
        let out = walship_tests::env::as_db_user(
            Command::new(&receiver_bin)
                .arg("restore")
                .arg("--config")
                .arg(&bare)
                .arg("--archive")
                .arg(&probe)
                .args(["--prefetch", "0"])
                .arg(&stored_segment)
                .arg(&target),
        )
        .output()
        .expect("run restore");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !target.exists(),
            "restore without the right key: {err}"
        );
        assert!(
            err.contains(expect) && err.contains(&stored_segment),
            "{err}"
        );
        let secret = std::fs::read_to_string(&other_key).unwrap();
        let secret = secret
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .unwrap();
        assert!(!err.contains(secret), "a secret key in restore's output");
    }
    // with the key: byte-identical to the primary's segment
    with_identity(&key);
    let target = probe.join("out");
    run_ok(walship_tests::env::as_db_user(
        Command::new(&receiver_bin)
            .arg("restore")
            .arg("--config")
            .arg(&bare)
            .arg("--archive")
            .arg(&probe)
            .args(["--prefetch", "0"])
            .arg(&stored_segment)
            .arg(&target),
    ));
    assert!(
        std::fs::read(&target).unwrap()
            == std::fs::read(primary.wal_dir().join(&stored_segment)).unwrap(),
        "{stored_segment} restored from the encrypted store differs from the primary's"
    );

    // a new standby from the base backup, its local directory empty: everything comes from the store
    let local = dir.subdir("new-archive");
    walship_tests::env::chown_to_db_user(&local);
    let config = store_config(&dir, &url, &env);
    std::fs::write(
        &config,
        format!(
            "{}store-identity = {:?}\n",
            std::fs::read_to_string(&config).unwrap(),
            key.display().to_string()
        ),
    )
    .unwrap();
    standby.configure_recovery(
        &restore_with_store(&receiver_bin, &config, &local),
        true,
        &["wal_retrieve_retry_interval = '200ms'"],
    );
    standby.start_no_wait();
    // a hot standby that replayed the store's WAL up to its consistent point
    wait_for("the new standby to accept connections", WAIT, || async {
        standby.try_connect().await.map(|_| ())
    })
    .await;
    let text = promote_with_store(&receiver_bin, &config, &local, &standby);
    println!("{}", text.trim());
    let handover =
        std::fs::read_to_string(local.join("walship.failover")).expect("the handover record");
    assert!(
        handover.contains(&end.to_string()),
        "recovery took WAL up to another position than the store's end {end}: {handover}"
    );
    let log = standby.log_text();
    let secret = s3.secret();
    assert!(
        !log.contains(secret.as_str()),
        "the store's secret key is in the standby's log"
    );
    assert!(
        log.contains("restored from the object store")
            && log.contains("handed the partial segment from the object store to recovery"),
        "the standby's log does not show recovery from the store:\n{log}"
    );

    // the ledger check: every acknowledged row the store held is present on the promoted standby
    let promoted = standby.connect().await;
    let v = verdict(&rows, end, &promoted).await;
    println!(
        "acknowledged {}, held by the store (LSN <= {end}) {}, present after failover {}, lost beyond {}",
        v.acknowledged, v.covered, v.present, v.lost_beyond
    );
    v.assert_none_missing("the store");
    assert_eq!(v.lost_beyond, 0, "{v:?}");
    assert!(v.covered > 100, "{v:?}");
    promoted
        .execute("INSERT INTO ledger (id) VALUES (-1)", &[])
        .await
        .expect("write on the promoted standby");
}

/// Issue 19, point 8: the object store goes down; a standby in archive recovery goes on replaying from the
/// local archive, and a failover where the archive ends exactly on a segment boundary (no partial to hand
/// over) promotes the standby without the store, instead of waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_during_recovery_and_failover_is_done_without_s3() {
    a_store_outage_during_recovery_and_failover_is_done_without(Kind::S3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_during_recovery_and_failover_is_done_without_azure() {
    a_store_outage_during_recovery_and_failover_is_done_without(Kind::Azure).await
}

async fn a_store_outage_during_recovery_and_failover_is_done_without(kind: Kind) {
    let opts = InitOptions {
        // nothing but the test writes WAL (the archive must end where the test's switch ends it)
        conf: vec!["autovacuum = off".into()],
        ..Default::default()
    };
    let Stage {
        dir,
        mut primary,
        archive,
        certs,
        walship,
    } = stage("store-down", &opts);
    let mut s3 = Backend::start(kind, &dir).await;
    let env = s3.env();
    let url = s3.url("cluster");
    let seg = WalSegSize::DEFAULT;
    let (_receiver, mut sender) =
        ship_to_store(&dir, &primary, &archive, &certs, &walship, &s3, &url);
    let mut standby = primary.base_backup(&dir, "standby");
    let config = store_config(&dir, &url, &env);
    let receiver_bin = walship.path(Walship::RECEIVER);
    standby.configure_recovery(
        &restore_with_store(&receiver_bin, &config, &archive),
        true,
        &["wal_retrieve_retry_interval = '200ms'"],
    );
    standby.start_no_wait();
    let client = primary.connect().await;
    client
        .batch_execute("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .expect("rows");
    primary.switch_wal(&client).await;
    let replica = wait_for("the standby to accept connections", WAIT, || {
        standby.try_connect()
    })
    .await;

    // the store goes away: the standby goes on replaying from the local archive
    s3.stop();
    client
        .batch_execute("INSERT INTO t SELECT generate_series(1001, 2000)")
        .await
        .expect("rows while the store is down");
    primary.switch_wal(&client).await;
    wait_for("the standby to replay during the outage", WAIT, || async {
        let n: i64 = replica
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .ok()?
            .get(0);
        (n == 2000).then_some(())
    })
    .await;
    drop(replica);

    // the last WAL is a switch whose segment is complete in the archive: the archive ends on a boundary
    client
        .batch_execute("INSERT INTO t SELECT generate_series(2001, 3000)")
        .await
        .expect("the last rows");
    // PostgreSQL's background writer logs a running-transactions record up to every 15 s after WAL
    // activity, a switch included: switch again until none landed between the switch and the check
    // right before the kill (the window left is a few milliseconds, not seconds)
    let end = loop {
        let end = primary.switch_wal(&client).await;
        let last = segment_file_name(1, seg.segno(end) - 1, seg);
        wait_for(
            &format!("{last} to be complete in the archive"),
            WAIT,
            || async { archive.join(&last).exists().then_some(()) },
        )
        .await;
        let insert: String = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .expect("insert position")
            .get(0);
        let insert: Lsn = insert.parse().expect("an LSN");
        // at a segment's start the insert position counts its page header
        if insert.0 <= end.0 + walship_protocol::wal::LONG_PAGE_HEADER as u64 {
            break end;
        }
        println!("WAL was written after the switch to {end} (up to {insert}): switching again");
    };
    drop(client);
    primary.kill9();
    wait_drained(&mut sender);
    sender.kill9();
    let next = segment_file_name(1, seg.segno(end), seg);
    assert!(
        !archive.join(format!("{next}.partial")).exists(),
        "the primary wrote WAL after its last switch: this test needs the archive to end on a segment boundary"
    );

    println!(
        "{}",
        promote_with_store(&receiver_bin, &config, &archive, &standby)
    );
    let promoted = standby.connect().await;
    let n: i64 = promoted
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 3000, "the promoted standby holds every row");
    assert!(
        standby
            .log_text()
            .contains("the object store is unreachable"),
        "restore should say it went on without the store:\n{}",
        standby.log_text()
    );
}

/// `verify --object-store`: every object downloaded, decompressed, checked and compared with the local
/// file; an object replaced by another segment's is found and named, nothing in the archive or the store
/// is modified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_checks_every_object_of_the_store_against_the_archive() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let Stage {
        dir,
        primary,
        archive,
        certs,
        walship,
    } = stage("store-verify", &opts);
    let client = primary.connect().await;
    let s3 = Backend::start(Kind::S3, &dir).await;
    let Backend::S3(s3_server) = &s3 else {
        unreachable!("started as S3")
    };
    let url = s3.url("cluster-v");
    let (mut receiver, mut sender) =
        ship_to_store(&dir, &primary, &archive, &certs, &walship, &s3, &url);
    let seg = WalSegSize::new(1 << 20).unwrap();
    run_ok(&mut primary.pgbench(&["-i", "-s", "1", "-q"]));
    primary.switch_wal(&client).await;
    let switched = primary.switch_wal(&client).await;
    let last = segment_file_name(1, seg.segno(switched) - 1, seg);
    wait_uploaded(&archive, &last).await;
    sender.stop_sender_of(&receiver);
    receiver.terminate(Duration::from_secs(10));
    let config = store_config(&dir, &url, &s3.env());
    let verify = || {
        let before = (
            walship_tests::archive::snapshot(&archive),
            s3.objects("cluster-v")
                .iter()
                .map(|n| s3.object(&format!("cluster-v/{n}")))
                .collect::<Vec<_>>(),
        );
        let out = walship_tests::env::as_db_user(
            Command::new(walship.path(Walship::RECEIVER))
                .args(["verify", "--json", "--config"])
                .arg(&config)
                .arg("--archive")
                .arg(&archive),
        )
        .output()
        .expect("run verify");
        let after = (
            walship_tests::archive::snapshot(&archive),
            s3.objects("cluster-v")
                .iter()
                .map(|n| s3.object(&format!("cluster-v/{n}")))
                .collect::<Vec<_>>(),
        );
        assert!(before == after, "verify modified the archive or the store");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), json)
    };
    let (code, json) = verify();
    assert_eq!(code, Some(0), "{json:#}");
    let checked = json["store_objects_checked"].as_u64().unwrap_or(0);
    assert!(checked >= 3, "{json:#}");

    // an object replaced by another segment's
    let segments: Vec<String> = s3
        .objects("cluster-v")
        .into_iter()
        .filter(|n| n.len() == 28 && n.ends_with(".zst"))
        .collect();
    assert!(segments.len() >= 2, "{segments:?}");
    let (victim, other) = (&segments[0], &segments[1]);
    let bucket = s3_server
        .root
        .join(walship_tests::s3::BUCKET)
        .join("cluster-v");
    std::fs::copy(bucket.join(other), bucket.join(victim)).expect("replace the object");
    let (code, json) = verify();
    assert_eq!(code, Some(2), "{json:#}");
    let problems: Vec<(String, String)> = json["timelines"][0]["problems"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap_or_default().to_owned(),
                p["file"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let name = victim.trim_end_matches(".zst");
    assert!(
        problems.len() == 1
            && problems[0].1 == name
            && ["store_differs", "store_unreadable"].contains(&problems[0].0.as_str()),
        "{json:#}"
    );
}

/// Azure Blob Storage (`az://container/prefix`) through the same object-store crate, against Azurite: the
/// archive goes up as to S3, a segment restored from it equals the primary's, and verify checks every object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blob_storage_holds_the_archive_as_s3_does() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let Stage {
        dir,
        primary,
        archive,
        certs,
        walship,
    } = stage("store-azure", &opts);
    let client = primary.connect().await;
    let azurite = walship_tests::azurite::Azurite::start(&dir, "azurite");
    let url = azurite.url("cluster-az");
    let env = azurite.env();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut receiver = walship.receiver_with(
        &dir,
        &archive,
        &certs,
        0,
        &["--object-store", &url, "--partial-upload-interval", "1"],
        &env_refs,
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
    let seg = WalSegSize::new(1 << 20).unwrap();
    run_ok(&mut primary.pgbench(&["-i", "-s", "1", "-q"]));
    primary.switch_wal(&client).await;
    let switched = primary.switch_wal(&client).await;
    let last = segment_file_name(1, seg.segno(switched) - 1, seg);
    wait_uploaded(&archive, &last).await;
    sender.stop_sender_of(&receiver);
    receiver.terminate(Duration::from_secs(10));

    // a segment restored from the store alone equals the primary's
    let config = store_config(&dir, &url, &env);
    let receiver_bin = walship.path(Walship::RECEIVER);
    let probe = dir.subdir("probe");
    std::fs::copy(archive.join("walship.id"), probe.join("walship.id")).unwrap();
    walship_tests::env::chown_to_db_user(&probe);
    walship_tests::env::chown_to_db_user(&probe.join("walship.id"));
    let target = probe.join("restored");
    run_ok(walship_tests::env::as_db_user(
        Command::new(&receiver_bin)
            .arg("restore")
            .arg("--config")
            .arg(&config)
            .arg("--archive")
            .arg(&probe)
            .args(["--prefetch", "0"])
            .arg(&last)
            .arg(&target),
    ));
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(primary.wal_dir().join(&last)).unwrap(),
        "{last} restored from Azure differs from the primary's"
    );
    // verify downloads and checks every object against the archive
    let out = walship_tests::env::as_db_user(
        Command::new(&receiver_bin)
            .args(["verify", "--json", "--config"])
            .arg(&config)
            .arg("--archive")
            .arg(&archive),
    )
    .output()
    .expect("run verify");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    assert!(
        json["store_objects_checked"].as_u64().unwrap_or(0) >= 3,
        "{json:#}"
    );
}

/// After a failover whose new primary ships into the same store through a new receiver (a new, empty
/// archive adopting the store's identity), `verify --object-store` follows both timelines, and a standby
/// restored from the store alone reaches rows written on the new timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_store_holds_both_timelines_and_a_standby_follows_them_s3() {
    after_a_failover_the_store_holds_both_timelines_and_a_standby_follows_them(Kind::S3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_store_holds_both_timelines_and_a_standby_follows_them_azure() {
    after_a_failover_the_store_holds_both_timelines_and_a_standby_follows_them(Kind::Azure).await
}

async fn after_a_failover_the_store_holds_both_timelines_and_a_standby_follows_them(kind: Kind) {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let Stage {
        dir,
        mut primary,
        archive,
        certs,
        walship,
    } = stage("store-timelines", &opts);
    let s3 = Backend::start(kind, &dir).await;
    let env = s3.env();
    let url = s3.url("cluster");
    let seg = WalSegSize::new(1 << 20).unwrap();
    let receiver_bin = walship.path(Walship::RECEIVER);
    let (mut receiver, mut sender) =
        ship_to_store(&dir, &primary, &archive, &certs, &walship, &s3, &url);
    let standby = primary.base_backup(&dir, "standby");
    let late = primary.base_backup(&dir, "late");
    let client = primary.connect().await;
    client
        .batch_execute("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .expect("rows");
    let flushed = primary.flush_lsn(&client).await;
    walship_tests::archive::wait_archived(&archive, seg, flushed).await;
    drop(client);

    // the primary dies; the standby is promoted from the archive
    primary.kill9();
    wait_drained(&mut sender);
    sender.stop_sender_of(&receiver);
    let end = archive_end(&archive, seg, 1).expect("the archive's end");
    wait_for(&format!("the store to reach {end}"), WAIT, || async {
        (store_end(&s3, "cluster", seg) >= end).then_some(())
    })
    .await;
    let mut standby = standby;
    standby.configure_recovery(
        &format!(
            "{} restore --archive {} %f %p",
            receiver_bin.display(),
            archive.display()
        ),
        true,
        &["wal_retrieve_retry_interval = '200ms'"],
    );
    standby.start_no_wait();
    wait_for("the standby to accept connections", WAIT, || async {
        standby.try_connect().await.map(|_| ())
    })
    .await;
    let promoted_out = run_ok(
        Command::new(&receiver_bin)
            .arg("promote")
            .arg("--archive")
            .arg(&archive)
            .arg("--pgdata")
            .arg(&standby.data)
            .args(["--timeout", "120"]),
    );
    println!("{}", String::from_utf8_lossy(&promoted_out.stdout).trim());

    // the standby's host is lost with its receiver; a new receiver, a new empty archive, the same store
    receiver.terminate(Duration::from_secs(10));
    let archive_b = dir.path().join("archive-b");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let receiver_b = walship.receiver_with(
        &dir,
        &archive_b,
        &certs,
        0,
        &["--object-store", &url, "--partial-upload-interval", "1"],
        &env_refs,
    );
    let mut sender_b = walship.sender(
        &dir,
        &standby.conninfo(),
        receiver_b.port,
        &certs,
        &certs,
        &[],
    );
    sender_b.wait_for_log("streaming", WAIT);
    let promoted = standby.connect().await;
    promoted
        .batch_execute("INSERT INTO t SELECT generate_series(5001, 6000)")
        .await
        .expect("rows on timeline 2");
    let switched = standby.switch_wal(&promoted).await;
    let last = segment_file_name(2, seg.segno(switched) - 1, seg);
    wait_uploaded(&archive_b, &last).await;
    assert!(
        s3.object("cluster/00000002.history.zst").is_some(),
        "the history file is in the store"
    );
    sender_b.stop_sender_of(&receiver_b);

    // verify, the store and the new archive: both timelines, branching where recovery ended
    let config = store_config(&dir, &url, &env);
    let out = walship_tests::env::as_db_user(
        Command::new(&receiver_bin)
            .args(["verify", "--json", "--config"])
            .arg(&config)
            .arg("--archive")
            .arg(&archive_b),
    )
    .output()
    .expect("run verify");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let timelines = json["timelines"].as_array().expect("timelines");
    assert_eq!(timelines.len(), 2, "{json:#}");
    assert_eq!(timelines[1]["parent"].as_u64(), Some(1), "{json:#}");
    assert_eq!(
        timelines[1]["replayable"][0]["backup_from_timeline"].as_u64(),
        Some(1),
        "{json:#}"
    );

    // a standby from the first base backup, restoring from the store alone, follows the history to
    // timeline 2 and holds its rows
    let mut late = late;
    let local = dir.subdir("from-store");
    walship_tests::env::chown_to_db_user(&local);
    late.configure_recovery(
        &restore_with_store(&receiver_bin, &config, &local),
        true,
        &["wal_retrieve_retry_interval = '200ms'"],
    );
    late.start_no_wait();
    wait_for(
        "the late standby to replay timeline 2's rows",
        WAIT,
        || async {
            let c = late.try_connect().await?;
            let n: i64 = c
                .query_one("SELECT count(*) FROM t WHERE i > 5000", &[])
                .await
                .ok()?
                .get(0);
            (n == 1000).then_some(())
        },
    )
    .await;
    let log = late.log_text();
    assert!(
        log.contains("restored log file \"00000002"),
        "the late standby did not restore timeline 2's WAL:\n{log}"
    );
}
