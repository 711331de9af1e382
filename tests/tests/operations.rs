//! What a DBA runs around the daemons: `check` on both sides (passing on a good pair; failing with the right
//! line on a wrong CA, an unreachable receiver, a foreign archive and a standby that restores from elsewhere),
//! the config file shared by `run` and `check`, and `/metrics` agreeing with `status`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use walship_protocol::{Lsn, WalSegSize};
use walship_tests::archive::wait_archived;
use walship_tests::cluster::WAIT;
use walship_tests::env::{as_db_user, chown_to_db_user};
use walship_tests::metrics::{metrics_port, sample, scrape};
use walship_tests::scenario::{stage, Stage};
use walship_tests::{wait_for, Cluster, Daemon, InitOptions, TestDir, Walship};

/// Runs `cmd` as the database user; returns its output (whatever the exit status).
fn output(cmd: &mut Command) -> Output {
    as_db_user(cmd).output().expect("run command")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write config");
    chown_to_db_user(path);
}

/// The sender's config file: everything `run` and `check` need.
fn sender_config(dir: &TestDir, name: &str, primary: &Cluster, port: u16, certs: &Path) -> PathBuf {
    let path = dir.path().join(name);
    write_config(
        &path,
        &format!(
            "# walship-sender\npgconn = \"{}\"\nreceiver = \"127.0.0.1:{port}\"\ntls-server-name = \"localhost\"\n\
             tls-ca = \"{ca}\"\ntls-cert = \"{crt}\"\ntls_key = \"{key}\"\npoll-ms = 50\n",
            primary.conninfo(),
            ca = certs.join("ca.crt").display(),
            crt = certs.join("client.crt").display(),
            key = certs.join("client.key").display(),
        ),
    );
    path
}

fn sender_check(walship: &Walship, config: &Path, extra: &[&str]) -> Output {
    output(
        Command::new(walship.path(Walship::SENDER))
            .arg("check")
            .arg("--config")
            .arg(config)
            .args(extra),
    )
}

/// The line of `check`'s output about `what`.
fn line<'a>(out: &'a str, what: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(&format!(" {what}: ")))
        .unwrap_or_else(|| panic!("no line about {what}:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_pair_and_names_what_is_wrong() {
    // (bound in this order, dropped in the reverse one: the test directory last)
    let Stage {
        dir,
        primary,
        archive,
        certs,
        walship,
    } = stage("check", &InitOptions::default());
    let other_ca = walship.certs(&dir, "other-ca");

    // the receiver runs from its config file; `check` reads the same file
    let receiver_toml = dir.path().join("receiver.toml");
    write_config(
        &receiver_toml,
        &format!(
            "listen = \"127.0.0.1:0\"\narchive = \"{}\"\ntls-cert = \"{}\"\ntls-key = \"{}\"\ntls-client-ca = \"{}\"\n",
            archive.display(),
            certs.join("server.crt").display(),
            certs.join("server.key").display(),
            certs.join("ca.crt").display()
        ),
    );
    let mut cmd = Command::new(walship.path(Walship::RECEIVER));
    cmd.arg("run").arg("--config").arg(&receiver_toml);
    let mut receiver = Daemon::spawn(&dir, "receiver", cmd);
    let listening = receiver.wait_for_log("listening on", WAIT);
    let port: u16 = listening
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {listening:?}"));
    let config = sender_config(&dir, "sender.toml", &primary, port, &certs);

    // a good pair: every line ok, and the switched segment is complete in the archive
    let good = sender_check(&walship, &config, &[]);
    let text = stdout(&good);
    println!("{text}");
    assert!(
        good.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(!text.contains("FAIL"), "{text}");
    let round_trip = line(&text, "round trip");
    let segment = round_trip
        .split_whitespace()
        .find(|w| w.len() == 24 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no segment in {round_trip:?}"));
    assert!(
        archive.join(segment).exists(),
        "{segment} is not complete in the archive"
    );

    // the wrong CA for the receiver's certificate
    let out = sender_check(
        &walship,
        &config,
        &["--tls-ca", other_ca.join("ca.crt").to_str().unwrap()],
    );
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        line(&text, "receiver").starts_with("FAIL")
            && line(&text, "receiver").contains("fix: --tls-ca"),
        "{text}"
    );
    // nothing listens there
    let out = sender_check(&walship, &config, &["--receiver", "127.0.0.1:1"]);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    let l = line(&text, "receiver");
    assert!(
        l.starts_with("FAIL") && l.contains("is walship-receiver running"),
        "{text}"
    );
    // an archive of another cluster
    let mut other = Cluster::init(&dir, "other", &InitOptions::default());
    other.start();
    let out = sender_check(&walship, &config, &["--pgconn", &other.conninfo()]);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    let l = line(&text, "receiver");
    assert!(
        l.starts_with("FAIL") && l.contains("another cluster"),
        "{text}"
    );

    // the receiver's side: the archive and a standby that restores from it
    let standby = primary.base_backup(&dir, "standby");
    let restore = |archive: &Path| {
        format!(
            "{} restore --archive {} --wait %f %p",
            walship.path(Walship::RECEIVER).display(),
            archive.display()
        )
    };
    standby.configure_recovery(&restore(&archive), true, &[]);
    let receiver_check = |pgdata: &Path| {
        output(
            Command::new(walship.path(Walship::RECEIVER))
                .arg("check")
                .arg("--config")
                .arg(&receiver_toml)
                .arg("--pgdata")
                .arg(pgdata),
        )
    };
    let out = receiver_check(&standby.data);
    let text = stdout(&out);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        line(&text, "archive lock").contains("held by the running receiver"),
        "{text}"
    );
    // a standby whose restore_command reads another archive
    let elsewhere = primary.base_backup(&dir, "elsewhere");
    elsewhere.configure_recovery(&restore(&dir.path().join("other-archive")), true, &[]);
    let out = receiver_check(&elsewhere.data);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(line(&text, "restore_command").starts_with("FAIL"), "{text}");
    // a standby of another cluster
    let out = receiver_check(&other.data);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(line(&text, "standby cluster").starts_with("FAIL"), "{text}");
    // no archive there
    let out = output(
        Command::new(walship.path(Walship::RECEIVER))
            .args(["check", "--archive"])
            .arg(dir.path().join("typo")),
    );
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(line(&text, "archive").contains("does not exist"), "{text}");
    receiver.terminate(Duration::from_secs(20));
}

fn json_field(json: &str, key: &str) -> Option<String> {
    let rest = json.split(&format!("\"{key}\": ")).nth(1)?;
    let v = rest.split([',', '\n']).next()?.trim().trim_matches('"');
    (v != "null").then(|| v.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_status() {
    // (bound in this order, dropped in the reverse one: the test directory last)
    let Stage {
        dir,
        primary,
        archive,
        certs,
        walship,
    } = stage("metrics", &InitOptions::default());
    let client = primary.connect().await;
    let mut receiver = walship.receiver_with(
        &dir,
        &archive,
        &certs,
        0,
        &["--metrics-listen", "127.0.0.1:0"],
        &[],
    );
    let receiver_metrics = metrics_port(&mut receiver);
    let mut sender = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &certs,
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let sender_metrics = metrics_port(&mut sender);
    sender.wait_for_log("streaming", WAIT);
    client
        .batch_execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g")
        .await
        .unwrap();
    let switched = primary.switch_wal(&client).await;
    wait_archived(&archive, WalSegSize::DEFAULT, switched).await;

    // scrape and status see the same archive: equal positions and lag (retried until a scrape and a
    // status fall between the same two writes of the status file)
    let (text, status) = wait_for("metrics and status to agree", WAIT, || async {
        let text = scrape(receiver_metrics);
        let out = output(
            Command::new(walship.path(Walship::RECEIVER))
                .args(["status", "--json", "--archive"])
                .arg(&archive),
        );
        let status = stdout(&out);
        let lsn = |k: &str| {
            json_field(&status, k)
                .and_then(|v| v.parse::<Lsn>().ok())
                .map(|l| l.0 as f64)
        };
        let num = |k: &str| json_field(&status, k).and_then(|v| v.parse::<f64>().ok());
        let agree = sample(&text, "walship_receiver_durable_lsn") == lsn("archived_lsn")
            && sample(&text, "walship_receiver_confirmed_lsn") == lsn("confirmed_lsn")
            && sample(&text, "walship_receiver_primary_flush_lsn") == lsn("primary_flush_lsn")
            && sample(&text, "walship_receiver_lag_bytes") == num("lag_bytes")
            && sample(&text, "walship_receiver_sender_connected") == Some(1.0)
            && lsn("archived_lsn").is_some_and(|a| a >= switched.0 as f64);
        agree.then_some((text, status))
    })
    .await;
    println!("{text}\n{status}");
    for name in [
        "walship_receiver_segments_completed_total",
        "walship_receiver_sessions_total",
        "walship_receiver_wal_bytes_received_total",
        "walship_receiver_fsync_seconds_count",
        "walship_receiver_lag_seconds",
    ] {
        assert!(sample(&text, name).is_some(), "no {name}:\n{text}");
    }
    assert!(sample(&text, "walship_receiver_segments_completed_total").unwrap() >= 1.0);
    assert!(
        text.contains("walship_receiver_fsync_seconds_bucket{le="),
        "{text}"
    );

    // the sender's durable position is the receiver's
    let durable = sample(&text, "walship_receiver_durable_lsn").unwrap();
    wait_for(
        "the sender's metrics to show the receiver's position",
        WAIT,
        || async {
            let s = scrape(sender_metrics);
            (sample(&s, "walship_sender_durable_lsn").is_some_and(|d| d >= durable)
                && sample(&s, "walship_sender_sessions_total") == Some(1.0)
                && sample(&s, "walship_sender_wal_bytes_sent_total").is_some_and(|b| b > 0.0))
            .then_some(())
        },
    )
    .await;
    assert!(sender.terminate(Duration::from_secs(20)).success());
}

/// Datagrams a daemon sends to its NOTIFY_SOCKET, as systemd would receive them.
struct NotifySocket {
    path: PathBuf,
    socket: std::os::unix::net::UnixDatagram,
    heard: String,
}

impl NotifySocket {
    fn new(dir: &TestDir, name: &str) -> NotifySocket {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join(name);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        // the daemon runs as the database user
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        NotifySocket {
            path,
            socket,
            heard: String::new(),
        }
    }

    /// Waits until a line starting with `what` (e.g. "READY=1") has been heard.
    async fn heard(&mut self, what: &str) {
        let deadline = std::time::Instant::now() + WAIT;
        let mut buf = [0u8; 4096];
        while !self.heard.lines().any(|l| l.starts_with(what)) {
            assert!(
                std::time::Instant::now() < deadline,
                "never heard {what}; heard:\n{}",
                self.heard
            );
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.heard.push_str(&String::from_utf8_lossy(&buf[..n]));
                self.heard.push('\n');
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_and_stopping() {
    // (bound in this order, dropped in the reverse one: the test directory last)
    let Stage {
        dir,
        primary,
        archive,
        certs,
        walship,
    } = stage("notify", &InitOptions::default());
    let mut receiver_socket = NotifySocket::new(&dir, "receiver.notify");
    let mut sender_socket = NotifySocket::new(&dir, "sender.notify");
    let receiver_path = receiver_socket.path.to_str().unwrap().to_owned();
    let sender_path = sender_socket.path.to_str().unwrap().to_owned();
    let watchdog = [("WATCHDOG_USEC", "400000")];
    let mut receiver = walship.receiver_with(
        &dir,
        &archive,
        &certs,
        0,
        &[],
        &[("NOTIFY_SOCKET", receiver_path.as_str()), watchdog[0]],
    );
    receiver_socket.heard("READY=1").await;
    receiver_socket.heard("WATCHDOG=1").await;
    let mut sender = walship.sender_with(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &certs,
        &[],
        &[("NOTIFY_SOCKET", sender_path.as_str()), watchdog[0]],
    );
    sender_socket.heard("READY=1").await;
    sender_socket.heard("WATCHDOG=1").await;
    sender.wait_for_log("streaming", WAIT);
    // systemctl status shows what it does
    sender_socket.heard("STATUS=streaming timeline 1").await;
    assert!(sender.terminate(Duration::from_secs(20)).success());
    sender_socket.heard("STOPPING=1").await;
    assert!(receiver.terminate(Duration::from_secs(20)).success());
    receiver_socket.heard("STOPPING=1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_reports_what_is_left() {
    // (bound in this order, dropped in the reverse one: the test directory last)
    let Stage {
        dir,
        primary,
        archive,
        certs,
        walship,
    } = stage("catchup-log", &InitOptions::default());
    let client = primary.connect().await;
    let receiver = walship.receiver(&dir, &archive, &certs, 0);
    let proxy =
        walship_tests::proxy::Proxy::start(format!("127.0.0.1:{}", receiver.port).parse().unwrap())
            .await;
    let mut sender = walship.sender(&dir, &primary.conninfo(), proxy.port, &certs, &certs, &[]);
    sender.wait_for_log("streaming", WAIT);
    assert!(sender.terminate(Duration::from_secs(20)).success());
    // a backlog of about 90 MB while no sender runs, then a slow link (8 MB/s)
    client
        .batch_execute("CREATE TABLE backlog AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 500000) g")
        .await
        .unwrap();
    let flush = primary.switch_wal(&client).await;
    proxy.throttle(8 << 20);
    // (uncompressed: pgbench-like WAL compresses 15x, and the link would not be slow any more)
    let mut sender = walship.sender(
        &dir,
        &primary.conninfo(),
        proxy.port,
        &certs,
        &certs,
        &["--compression", "none"],
    );
    let line = sender.wait_for_log("catching up: ", WAIT);
    println!("{line}");
    assert!(
        line.contains("MB left at") && line.contains("s to go"),
        "{line}"
    );
    let line = sender.wait_for_log("caught up: ", WAIT);
    println!("{line}");
    wait_archived(&archive, WalSegSize::DEFAULT, flush).await;
    assert!(sender.terminate(Duration::from_secs(20)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_compression_on_and_off_give_identical_archives() {
    let Stage {
        dir,
        primary,
        certs,
        walship,
        ..
    } = stage("compression", &InitOptions::default());
    let client = primary.connect().await;
    walship_tests::cluster::run_ok(&mut primary.pgbench(&["-i", "-s", "2", "-q"]));
    // one receiver allows compression, the other does not; both senders would compress
    let zstd_archive = dir.path().join("archive-zstd");
    let plain_archive = dir.path().join("archive-plain");
    let mut zstd_receiver = walship.receiver_with(
        &dir,
        &zstd_archive,
        &certs,
        0,
        &["--metrics-listen", "127.0.0.1:0"],
        &[],
    );
    let mut plain_receiver = walship.receiver_with(
        &dir,
        &plain_archive,
        &certs,
        0,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--wire-compression",
            "off",
        ],
        &[],
    );
    let zstd_metrics = metrics_port(&mut zstd_receiver);
    let plain_metrics = metrics_port(&mut plain_receiver);
    let start = format!("{}", primary.flush_lsn(&client).await);
    // every message, the small ones of the live stream too (auto would send those raw)
    let extra = [
        "--start-lsn",
        start.as_str(),
        "--compression",
        "zstd",
        "--compression-level",
        "3",
    ];
    let mut a = walship.sender(
        &dir,
        &primary.conninfo(),
        zstd_receiver.port,
        &certs,
        &certs,
        &extra,
    );
    let mut b = walship.sender(
        &dir,
        &primary.conninfo(),
        plain_receiver.port,
        &certs,
        &certs,
        &extra,
    );
    a.wait_for_log("streaming", WAIT);
    b.wait_for_log("streaming", WAIT);
    walship_tests::cluster::run_ok(&mut primary.pgbench(&["-c", "2", "-T", "5", "-n"]));
    let flush = primary.switch_wal(&client).await;
    client
        .batch_execute("CREATE TABLE tail AS SELECT g FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    let flush = flush.max(primary.flush_lsn(&client).await);
    for archive in [&zstd_archive, &plain_archive] {
        wait_archived(archive, WalSegSize::DEFAULT, flush).await;
    }
    let seg = WalSegSize::DEFAULT;
    let zstd =
        walship_tests::archive::assert_matches_primary(&zstd_archive, &primary.wal_dir(), seg, 1);
    let plain =
        walship_tests::archive::assert_matches_primary(&plain_archive, &primary.wal_dir(), seg, 1);
    println!("compressed: {zstd:?}\nplain: {plain:?}");
    assert_eq!(zstd.complete_segments, plain.complete_segments);
    // the wire: compressed well below the WAL's size with compression, the WAL's size without
    let wire = |port: u16| {
        let text = scrape(port);
        (
            sample(&text, "walship_receiver_wire_wal_bytes_total").unwrap_or(0.0),
            sample(&text, "walship_receiver_wal_bytes_received_total").unwrap_or(0.0),
        )
    };
    let (zstd_wire, zstd_raw) = wire(zstd_metrics);
    let (plain_wire, plain_raw) = wire(plain_metrics);
    println!(
        "zstd: {zstd_wire} bytes on the wire for {zstd_raw} of WAL ({:.1}x); plain: {plain_wire} for {plain_raw}",
        zstd_raw / zstd_wire.max(1.0)
    );
    assert!(
        zstd_raw > 0.0 && zstd_wire < zstd_raw / 2.0,
        "{zstd_wire} vs {zstd_raw}"
    );
    assert_eq!(plain_wire, plain_raw);
    assert!(a.terminate(Duration::from_secs(20)).success());
    assert!(b.terminate(Duration::from_secs(20)).success());
}
