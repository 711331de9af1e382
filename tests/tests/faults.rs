//! Faults, tested rather than assumed: crash points (failpoints built into the daemons that `cargo test`
//! builds), injected fsync errors, a kill -9 soak, a full disk, stalled and flooding peers, a foreign sender
//! with a valid certificate, and a graceful stop. Every test ends with the same proof: the archive is
//! byte-identical to the primary's `pg_wal`, with no gap, and no sender saw its receiver lose WAL that had been
//! acknowledged.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use walship_protocol::{Lsn, WalSegSize};
use walship_tests::archive::{archive_end, assert_matches_primary, Compared};
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::{wait_for, Cluster, Daemon, InitOptions, Lcg, TestDir, Walship};

/// What the sender logs when a receiver resumes behind a position it had acknowledged.
const LOST_ACKED: &str = "lost acknowledged WAL";

/// A primary with 1 MB segments (many segment boundaries for little WAL), a receiver and a sender.
struct Rig {
    walship: Walship,
    certs: PathBuf,
    archive: PathBuf,
    seg: WalSegSize,
    port: u16,
    /// Every sender started, for the final check of their logs.
    old_senders: Vec<Daemon>,
    sender: Daemon,
    receiver: Daemon,
    primary: Cluster,
    dir: TestDir,
}

impl Rig {
    async fn start(
        name: &str,
        archive_parent: Option<&Path>,
        receiver_env: &[(&str, &str)],
    ) -> Rig {
        let dir = TestDir::new(name);
        let walship = Walship::install(&dir);
        let certs = walship.certs(&dir, "certs");
        let opts = InitOptions {
            wal_segsize_mb: Some(1),
            ..Default::default()
        };
        let mut primary = Cluster::init(&dir, "primary", &opts);
        primary.start();
        let archive = archive_parent.unwrap_or(dir.path()).join("archive");
        let receiver = walship.receiver_with(&dir, &archive, &certs, 0, &[], receiver_env);
        let port = receiver.port;
        let mut sender = walship.sender(&dir, &primary.conninfo(), port, &certs, &certs, &[]);
        sender.wait_for_log("streaming", Duration::from_secs(30));
        Rig {
            walship,
            certs,
            archive,
            seg: WalSegSize::new(1 << 20).expect("1 MB"),
            port,
            old_senders: Vec::new(),
            sender,
            receiver,
            primary,
            dir,
        }
    }

    fn restart_receiver(&mut self, env: &[(&str, &str)]) {
        self.receiver.kill9();
        self.receiver =
            self.walship
                .receiver_with(&self.dir, &self.archive, &self.certs, self.port, &[], env);
    }

    fn restart_sender(&mut self, env: &[(&str, &str)]) {
        self.sender.kill9();
        let new = self.walship.sender_with(
            &self.dir,
            &self.primary.conninfo(),
            self.port,
            &self.certs,
            &self.certs,
            &[],
            env,
        );
        self.old_senders
            .push(std::mem::replace(&mut self.sender, new));
    }

    fn end(&self) -> Lsn {
        archive_end(&self.archive, self.seg, 1).unwrap_or(Lsn(0))
    }

    /// Waits until the archive grew past where it is now.
    async fn wait_progress(&self, what: &str) {
        let now = self.end();
        wait_for(what, WAIT, || async { (self.end() > now).then_some(()) }).await;
    }

    /// Switches to a new segment, waits until the archive has it, and compares everything with pg_wal. Also
    /// checks that no sender ever saw its receiver lose acknowledged WAL.
    async fn settle_and_compare(&self) -> Compared {
        let client = self.primary.connect().await;
        let switched = self.primary.switch_wal(&client).await;
        wait_for(
            &format!("the archive to reach {switched}"),
            WAIT,
            || async { (self.end() >= switched).then_some(()) },
        )
        .await;
        for s in self.old_senders.iter().chain([&self.sender]) {
            let log = s.log_text();
            assert!(!log.contains(LOST_ACKED), "{}:\n{log}", s.name);
        }
        assert_matches_primary(&self.archive, &self.primary.wal_dir(), self.seg, 1)
    }

    fn pgbench(&self, seconds: u32) -> std::process::Child {
        self.primary
            .pgbench(&["-c", "2", "-j", "2", "-T", &seconds.to_string(), "-n"])
            .spawn()
            .expect("pgbench")
    }
}

/// Waits for a daemon to die at a crash point and checks that it was that crash point.
fn wait_crash(d: &mut Daemon, point: &str) {
    let status = d.wait_exit(WAIT);
    assert!(
        !status.success(),
        "{} exited cleanly instead of crashing at {point}",
        d.name
    );
    let log = d.log_text();
    assert!(
        log.contains(&format!("failpoint {point}: crashing")),
        "{} did not die at {point} ({status}):\n{log}",
        d.name
    );
}

/// A crash at every crash point of the receiver and the sender, each restarted without the failpoint: nothing
/// acknowledged is lost and the archive matches pg_wal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_crash_point_loses_nothing() {
    let mut rig = Rig::start("crashpoints", None, &[]).await;
    run_ok(&mut rig.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut bench = rig.pgbench(60);
    rig.wait_progress("first WAL under load").await;
    let receiver_points = [
        ("receiver-written-before-fsync", "40*off->return"),
        ("receiver-fsynced-before-ack", "40*off->return"),
        ("archive-renamed-before-dir-fsync", "2*off->return"),
        // issue 21: preallocated partials
        ("archive-before-new-partial", "1*off->return"),
        ("archive-preallocating", "1*off->return"),
    ];
    for (point, action) in receiver_points {
        let fp = format!("{point}={action}");
        rig.restart_receiver(&[("FAILPOINTS", &fp)]);
        wait_crash(&mut rig.receiver, point);
        rig.restart_receiver(&[]);
        rig.wait_progress(&format!("shipping to resume after a crash at {point}"))
            .await;
        println!("receiver crashed at {point} and resumed at {}", rig.end());
    }
    let point = "sender-read-before-send";
    rig.restart_sender(&[("FAILPOINTS", &format!("{point}=30*off->return"))]);
    wait_crash(&mut rig.sender, point);
    rig.restart_sender(&[]);
    rig.wait_progress("shipping to resume after the sender crashed")
        .await;
    let _ = bench.kill();
    let _ = bench.wait();
    let compared = rig.settle_and_compare().await;
    println!("after crashes at 6 crash points the archive matches pg_wal: {compared:?}");
    assert!(compared.complete_segments > 5, "{compared:?}");
}

/// An fsync that fails once: the receiver drops what that fsync should have covered, acknowledges none of
/// it, stays up, and the sender resends. An fsync that keeps failing: the receiver stops with an error
/// naming the file, and a restarted receiver continues without loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_errors_are_never_acknowledged() {
    let mut rig = Rig::start("fsync-eio", None, &[]).await;
    run_ok(&mut rig.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut bench = rig.pgbench(60);
    rig.wait_progress("first WAL under load").await;

    // one failed fsync
    rig.restart_receiver(&[("FAILPOINTS", "archive-fsync=30*off->1*return->off")]);
    rig.receiver
        .wait_for_log("rolled back to its last durable position", WAIT);
    let log = rig.receiver.log_text();
    assert!(
        log.contains("Input/output error") && log.contains(".partial"),
        "the error must name the file and the error:\n{log}"
    );
    assert!(
        rig.receiver.alive(),
        "the receiver must stay up after a recovered fsync error"
    );
    rig.wait_progress("shipping to resume after the fsync error")
        .await;

    // an fsync that keeps failing: unrecoverable, the receiver stops
    rig.restart_receiver(&[("FAILPOINTS", "archive-fsync=30*off->return")]);
    let status = rig.receiver.wait_exit(WAIT);
    assert!(
        !status.success(),
        "the receiver must stop when the archive cannot be trusted"
    );
    let log = rig.receiver.log_text();
    assert!(
        log.contains("cannot be trusted")
            && log.contains("Input/output error")
            && log.contains(".partial"),
        "{log}"
    );
    rig.restart_receiver(&[]);
    rig.wait_progress("shipping to resume after the receiver was restarted")
        .await;
    let _ = bench.kill();
    let _ = bench.wait();
    let compared = rig.settle_and_compare().await;
    println!("after fsync errors the archive matches pg_wal: {compared:?}");
}

/// kill -9 of the receiver or the sender at 20+ random moments under pgbench, each restarted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_soak_leaves_the_archive_identical() {
    let mut rng = std::env::var("WALSHIP_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Lcg)
        .unwrap_or_else(Lcg::from_clock);
    println!("kill -9 soak seed {} (WALSHIP_SOAK_SEED replays it)", rng.0);
    let mut rig = Rig::start("soak", None, &[]).await;
    run_ok(&mut rig.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut bench = rig.pgbench(600);
    rig.wait_progress("first WAL under load").await;
    let (mut receiver_kills, mut sender_kills) = (0, 0);
    for _ in 0..22 {
        std::thread::sleep(Duration::from_millis(100 + rng.below(900)));
        if rng.below(2) == 0 {
            rig.restart_receiver(&[]);
            receiver_kills += 1;
        } else {
            rig.restart_sender(&[]);
            sender_kills += 1;
        }
    }
    rig.wait_progress("shipping to resume after the last kill")
        .await;
    let _ = bench.kill();
    let _ = bench.wait();
    let compared = rig.settle_and_compare().await;
    println!(
        "after {receiver_kills} receiver and {sender_kills} sender kill -9s the archive matches pg_wal: {compared:?}"
    );
    assert!(compared.complete_segments > 5, "{compared:?}");
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        assert!(
            walship_tests::env::is_root(),
            "the disk-full test mounts a small tmpfs and needs root: run the suite as root (CI does), e.g. `sudo -E cargo test --workspace`"
        );
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs {} failed: {status}",
            path.display()
        );
        walship_tests::env::chown_to_db_user(path);
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The archive's disk fills up: the receiver says "No space left" naming the archive, acknowledges nothing
/// it could not write, stays up, leaves nothing torn, and resumes by itself once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_shipping_and_loses_nothing() {
    let dir = TestDir::new("diskfull-mnt");
    let mnt = Tmpfs::mount(&dir.path().join("small"), "40m");
    // most of the disk is taken by something else
    let filler = mnt.0.join("filler");
    std::fs::write(&filler, vec![1u8; 36 << 20]).expect("filler");
    let rig = Rig::start("diskfull", Some(&mnt.0), &[]).await;
    // ~15 MB of WAL: more than the 4 MB left
    run_ok(&mut rig.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut receiver = rig.receiver;
    let line = receiver.wait_for_log("No space left on device", WAIT);
    assert!(
        line.contains(&rig.archive.display().to_string()),
        "the error must name the archive: {line}"
    );
    // wait for a second attempt: still full, still up
    wait_for("the sender to retry into the full disk", WAIT, || async {
        (receiver
            .log_text()
            .matches("No space left on device")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    assert!(receiver.alive(), "the receiver must stay up on a full disk");
    let mut sender = rig.sender;
    assert!(sender.alive(), "the sender must keep trying, not stop");
    // nothing torn: what is there is exactly the primary's WAL
    let during = assert_matches_primary(&rig.archive, &rig.primary.wal_dir(), rig.seg, 1);
    println!("while the disk was full the archive held {during:?}, identical to pg_wal");

    let client = rig.primary.connect().await;
    let flush = rig.primary.flush_lsn(&client).await;
    std::fs::remove_file(&filler).expect("free space");
    let freed = Instant::now();
    wait_for(
        &format!("the archive to reach {flush} once space returned"),
        WAIT,
        || async {
            (archive_end(&rig.archive, rig.seg, 1).unwrap_or(Lsn(0)) >= flush).then_some(())
        },
    )
    .await;
    println!(
        "shipping resumed by itself {:.1} s after space returned",
        freed.elapsed().as_secs_f64()
    );
    let switched = rig.primary.switch_wal(&client).await;
    wait_for("the switch to be archived", WAIT, || async {
        (archive_end(&rig.archive, rig.seg, 1).unwrap_or(Lsn(0)) >= switched).then_some(())
    })
    .await;
    assert!(!sender.log_text().contains(LOST_ACKED));
    let compared = assert_matches_primary(&rig.archive, &rig.primary.wal_dir(), rig.seg, 1);
    println!("after the disk was full the archive matches pg_wal: {compared:?}");
    sender.kill9();
    receiver.kill9();
    drop(mnt);
}

/// The network between sender and receiver stops moving bytes (a hung peer, a black-holed route): both sides
/// notice within their timeouts, the sender's memory stays bounded by its window, SIGTERM still ends both
/// daemons at once, and shipping later goes on without loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_is_noticed_and_shutdown_still_works() {
    let dir = TestDir::new("stall");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut primary = Cluster::init(&dir, "primary", &opts);
    primary.start();
    let seg = WalSegSize::new(1 << 20).expect("1 MB");
    run_ok(&mut primary.pgbench(&["-i", "-s", "1", "-q"]));
    let archive = dir.path().join("archive");
    let mut receiver =
        walship.receiver_with(&dir, &archive, &certs, 0, &["--idle-timeout", "3"], &[]);
    let port = receiver.port;
    let proxy = walship_tests::proxy::Proxy::start(([127, 0, 0, 1], port).into()).await;
    let mut sender = walship.sender(
        &dir,
        &primary.conninfo(),
        proxy.port,
        &certs,
        &certs,
        &["--receiver-timeout", "3", "--window-mb", "4"],
    );
    sender.wait_for_log("streaming", Duration::from_secs(30));
    let mut bench = primary
        .pgbench(&["-c", "2", "-j", "2", "-T", "600", "-n"])
        .spawn()
        .expect("pgbench");
    let end = || archive_end(&archive, seg, 1).unwrap_or(Lsn(0));
    let before = end();
    wait_for("WAL under load", WAIT, || async {
        (end() > before).then_some(())
    })
    .await;

    proxy.stall(true);
    let stalled_at = Instant::now();
    sender.wait_for_log("stalled", Duration::from_secs(20));
    let sender_noticed = stalled_at.elapsed();
    receiver.wait_for_log("no message for 3s", Duration::from_secs(20));
    let receiver_noticed = stalled_at.elapsed();
    // the sender keeps trying through the stalled proxy; its memory stays bounded meanwhile
    let mut max_rss = 0;
    let sample_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < sample_until {
        max_rss = max_rss.max(sender.rss_kib());
        std::thread::park_timeout(Duration::from_millis(100));
    }
    println!(
        "stall noticed by the sender after {:.1} s, by the receiver after {:.1} s; sender RSS at most {} KiB",
        sender_noticed.as_secs_f64(),
        receiver_noticed.as_secs_f64(),
        max_rss
    );
    assert!(
        max_rss > 0 && max_rss < 64 << 10,
        "sender RSS {max_rss} KiB with a 4 MB window"
    );

    // SIGTERM while stalled: both end promptly
    let t = Instant::now();
    assert!(
        sender.terminate(Duration::from_secs(15)).success(),
        "{}",
        sender.log_text()
    );
    assert!(
        receiver.terminate(Duration::from_secs(15)).success(),
        "{}",
        receiver.log_text()
    );
    println!(
        "both daemons stopped {:.1} s after SIGTERM",
        t.elapsed().as_secs_f64()
    );

    // back to normal, directly: nothing was lost
    proxy.stall(false);
    let receiver = walship.receiver(&dir, &archive, &certs, port);
    let sender = walship.sender(&dir, &primary.conninfo(), port, &certs, &certs, &[]);
    let _ = bench.kill();
    let _ = bench.wait();
    let client = primary.connect().await;
    let switched = primary.switch_wal(&client).await;
    wait_for("the archive to catch up", WAIT, || async {
        (end() >= switched).then_some(())
    })
    .await;
    let compared = assert_matches_primary(&archive, &primary.wal_dir(), seg, 1);
    println!("after the stall the archive matches pg_wal: {compared:?}");
    drop((sender, receiver));
}

/// A sender of another cluster, with a valid certificate, is refused and stops; the live session is not
/// interrupted (no takeover before the `Hello` is validated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_sender_does_not_interrupt_the_live_session() {
    let rig = Rig::start("foreign", None, &[]).await;
    run_ok(&mut rig.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut bench = rig.pgbench(600);
    rig.wait_progress("WAL under load").await;
    let mut other = Cluster::init(&rig.dir, "other", &InitOptions::default());
    other.start();
    for _ in 0..3 {
        let mut foreign = rig.walship.sender(
            &rig.dir,
            &other.conninfo(),
            rig.port,
            &rig.certs,
            &rig.certs,
            &[],
        );
        let status = foreign.wait_exit(WAIT);
        assert!(!status.success(), "a foreign sender must stop");
        let log = foreign.log_text();
        assert!(log.contains("refused"), "{log}");
    }
    rig.wait_progress("shipping to go on").await;
    let log = rig.receiver.log_text();
    assert_eq!(log.matches("sender accepted").count(), 1, "{log}");
    assert!(
        !log.contains("hand over"),
        "the live session was asked to hand over:\n{log}"
    );
    assert!(log.matches("refused sender").count() >= 3, "{log}");
    assert!(
        !rig.sender.log_text().contains("reconnecting"),
        "the live sender was interrupted:\n{}",
        rig.sender.log_text()
    );
    let _ = bench.kill();
    let _ = bench.wait();
    rig.settle_and_compare().await;
}

/// Hundreds of connections that never complete a TLS handshake (idle, or a few bytes and then nothing):
/// a sender with a valid certificate is still served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_does_not_lock_the_sender_out() {
    use tokio::io::AsyncWriteExt;
    let mut rig = Rig::start("flood", None, &[]).await;
    run_ok(&mut rig.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let target = ("127.0.0.1", rig.port);
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut c = tokio::net::TcpStream::connect(target)
            .await
            .expect("flood connect");
        if i % 3 == 0 {
            // the start of a TLS record, then nothing
            let _ = c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
        }
        flood.push(c);
    }
    let t = Instant::now();
    rig.restart_sender(&[]);
    rig.sender
        .wait_for_log("streaming", Duration::from_secs(10));
    let served = t.elapsed();
    println!(
        "with {} flood connections open, the sender streamed {:.0} ms after it started",
        flood.len(),
        served.as_secs_f64() * 1e3
    );
    // issue 19.9 asks for "within a second" (measured here: 40 to 50 ms); the bound leaves room for a
    // loaded CI machine, where the other tests of this file run at the same time
    assert!(
        served < Duration::from_secs(3),
        "a sender needed {served:?} to get in through the flood"
    );
    assert!(
        rig.receiver
            .log_text()
            .contains("without a completed TLS handshake"),
        "the receiver should say it evicted unauthenticated connections"
    );
    let mut bench = rig.pgbench(3);
    rig.wait_progress("shipping under the flood").await;
    let _ = bench.wait();
    drop(flood);
    rig.settle_and_compare().await;
}

/// SIGTERM of the sender under load: it waits for the receiver to acknowledge everything it sent, so the
/// archive holds all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_the_sender_loses_nothing_in_flight() {
    let mut rig = Rig::start("graceful", None, &[]).await;
    run_ok(&mut rig.primary.pgbench(&["-i", "-s", "1", "-q"]));
    let mut bench = rig.pgbench(600);
    rig.wait_progress("WAL under load").await;
    let status = rig.sender.stop_sender_of(&rig.receiver);
    assert!(status.success());
    let log = rig.sender.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("stopped: the receiver holds everything"))
        .unwrap_or_else(|| panic!("no stop line:\n{log}"));
    let field = |name: &str| -> Lsn {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {line}"))
    };
    let (sent, acked) = (field("sent"), field("acked"));
    assert_eq!(
        sent, acked,
        "the sender stopped before everything was acknowledged: {line}"
    );
    let end = rig.end();
    assert!(
        end >= sent,
        "archive ends at {end}, the sender had sent up to {sent}"
    );
    println!("SIGTERM under load: sent {sent}, acknowledged {acked}, archive ends at {end}");
    let _ = bench.kill();
    let _ = bench.wait();
    rig.restart_sender(&[]);
    rig.settle_and_compare().await;
}
