//! Refusals and bad input: clients without or with foreign certificates, senders of other clusters, and
//! garbage frames. Each is refused with a clear reason and the archive is unchanged or keeps working.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use walship_protocol::{Lsn, WalSegSize};
use walship_tests::archive::{assert_matches_primary, snapshot, wait_archived};
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::scenario::shipping;
use walship_tests::{wait_for, Cluster, Daemon, InitOptions, TestDir, Walship};

/// A TLS client that trusts the receiver's CA and presents no certificate.
fn client_without_certificate(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Connects over TLS, writes `bytes`, then reads until the receiver closes; returns what was read (or the
/// error that ended the connection).
async fn send_raw(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> Result<Vec<u8>, std::io::Error> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    tls.write_all(bytes).await?;
    // close our side (TLS close_notify), so the receiver sees the end of the stream after these bytes
    tls.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut out))
        .await
        .expect("receiver closes the connection")?;
    Ok(out)
}

async fn wait_log(d: &Daemon, pattern: &str) {
    wait_for(&format!("{} to log {pattern:?}", d.name), WAIT, || async {
        d.log_text().contains(pattern).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_the_archive_is_unchanged() {
    let dir = TestDir::new("refuse");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    let other_ca = walship.certs(&dir, "other-ca");
    let mut primary = Cluster::init(&dir, "primary", &InitOptions::default());
    primary.start();
    let client = primary.connect().await;
    let seg = WalSegSize::DEFAULT;
    let archive = dir.path().join("archive");
    let receiver = walship.receiver(&dir, &archive, &certs, 0);

    // the legitimate sender pins the archive to this cluster, ships a bit, and stops cleanly
    let mut sender = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &certs,
        &[],
    );
    sender.wait_for_log("streaming", Duration::from_secs(30));
    let flush = primary.switch_wal(&client).await;
    wait_archived(&archive, seg, flush).await;
    assert!(sender.terminate(Duration::from_secs(10)).success());
    let before = snapshot(&archive);

    // 1. no client certificate: the TLS session is refused
    let r = send_raw(
        receiver.port,
        client_without_certificate(&certs.join("ca.crt")),
        b"hello",
    )
    .await;
    assert!(
        r.as_ref().map(|b| b.is_empty()).unwrap_or(true),
        "a client without a certificate got data: {r:?}"
    );
    wait_log(&receiver, "TLS handshake failed").await;

    // 2. a client certificate from another CA: refused; the sender says why and keeps retrying
    let mut stranger = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &other_ca,
        &[],
    );
    stranger.wait_for_log("reconnecting", Duration::from_secs(30));
    let log = stranger.log_text();
    assert!(
        log.contains("TLS") || log.contains("certificate"),
        "sender log does not say the TLS session failed:\n{log}"
    );
    stranger.kill9();

    // 3. a sender of another cluster: refused, told its own system identifier and nothing of the archive's
    //    cluster (the receiver's log names both); the sender stops
    let mut other = Cluster::init(&dir, "other", &InitOptions::default());
    other.start();
    let other_client = other.connect().await;
    let ours = primary.system_identifier(&client).await;
    let theirs = other.system_identifier(&other_client).await;
    let mut foreign = walship.sender(&dir, &other.conninfo(), receiver.port, &certs, &certs, &[]);
    let status = foreign.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "a sender refused for a foreign cluster must stop with an error"
    );
    let log = foreign.log_text();
    assert!(
        log.contains(&theirs.to_string()) && log.contains("belongs to another cluster"),
        "the refusal names the sender's own cluster:\n{log}"
    );
    assert!(
        !log.contains(&ours.to_string()),
        "a refused sender learns nothing about the archive's cluster:\n{log}"
    );
    let receiver_log = receiver.log_text();
    assert!(receiver_log.contains(&theirs.to_string()) && receiver_log.contains(&ours.to_string()));

    assert_eq!(
        snapshot(&archive),
        before,
        "the archive changed after refused connections"
    );
    // 4. a sender whose cluster has another segment size is refused too (a receiver pinned to 16 MB)
    let mut small = Cluster::init(
        &dir,
        "small",
        &InitOptions {
            wal_segsize_mb: Some(1),
            ..Default::default()
        },
    );
    small.start();
    let fresh_archive = dir.path().join("archive-16mb");
    let receiver16 = walship.receiver(&dir, &fresh_archive, &certs, 0);
    let mut s16 = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver16.port,
        &certs,
        &certs,
        &[],
    );
    s16.wait_for_log("streaming", Duration::from_secs(30));
    s16.kill9();
    let fresh_before = snapshot(&fresh_archive);
    // a different cluster with a different segment size: the identity check names the cluster first
    let mut s1 = walship.sender(
        &dir,
        &small.conninfo(),
        receiver16.port,
        &certs,
        &certs,
        &[],
    );
    assert!(!s1.wait_exit(Duration::from_secs(30)).success());
    let log = s1.log_text();
    assert!(
        log.contains("refused") && log.contains("1 MB segments") && !log.contains("16 MB segments"),
        "the sender is told its own segment size, not the archive's:\n{log}"
    );
    assert!(receiver16.log_text().contains("16 MB segments"));
    let fresh_after = snapshot(&fresh_archive);
    assert_eq!(
        fresh_before.keys().collect::<Vec<_>>(),
        fresh_after.keys().collect::<Vec<_>>()
    );
}

/// A frame with a correct CRC.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    let crc = crc32(&b);
    b.put_u32(crc);
    b.to_vec()
}

fn crc32(data: &[u8]) -> u32 {
    // the receiver's frames use CRC-32 (IEEE); computed bitwise here so the test does not share the code
    let mut crc = 0xFFFF_FFFFu32;
    for b in data {
        crc ^= *b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let s = shipping(
        "garbage",
        &InitOptions {
            wal_segsize_mb: Some(1),
            ..Default::default()
        },
    )
    .await;
    let (certs, archive, seg, primary, receiver, sender) = (
        &s.certs,
        &s.archive,
        s.seg,
        &s.primary,
        &s.receiver,
        &s.sender,
    );
    let client = primary.connect().await;
    let mut bench = primary
        .pgbench(&["-i", "-s", "1", "-q"])
        .spawn()
        .expect("pgbench -i");

    let valid = walship_sender::link::client_config(
        &certs.join("ca.crt"),
        &certs.join("client.crt"),
        &certs.join("client.key"),
    )
    .unwrap();
    let mut bad_crc = frame(b'K', &[0u8; 20]);
    let n = bad_crc.len();
    bad_crc[n - 1] ^= 0x55;
    let mut wal_first = 1u32.to_be_bytes().to_vec();
    wal_first.extend_from_slice(&0u64.to_be_bytes());
    wal_first.extend_from_slice(&[1, 2, 3]);
    let truncated = frame(b'H', &[0u8; 40])[..20].to_vec();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "more than the limit",
        ),
        (bad_crc, "CRC"),
        (frame(b'Q', b"what"), "unknown message kind"),
        (frame(b'W', &wal_first), "first message must be Hello"),
        (truncated, "connection ended inside a frame"),
    ];
    for (bytes, reason) in cases {
        let answer = send_raw(receiver.port, valid.clone(), &bytes).await;
        // the receiver answers with an Error frame (or just closes) and never with a Welcome
        if let Ok(a) = &answer {
            assert!(a.first() != Some(&b'w'), "garbage got a Welcome");
        }
        wait_log(receiver, reason).await;
    }
    // the real sender's session was never disturbed
    assert!(bench.wait().expect("pgbench").success());
    let flush = primary.switch_wal(&client).await;
    wait_archived(archive, seg, flush).await;
    assert!(
        !sender.log_text().contains("reconnecting"),
        "the real sender was disturbed:\n{}",
        sender.log_text()
    );
    let compared = assert_matches_primary(archive, &primary.wal_dir(), seg, 1);
    println!("after five garbage connections the archive still matches: {compared:?}");
    let _ = Lsn(0);
    run_ok(&mut primary.pgbench(&["-c", "1", "-t", "10", "-n"]));
}

/// A wrong password is a configuration error: the sender stops within seconds naming it (never retries it
/// forever while its unit looks "active"), and the password shows nowhere; the right one (SCRAM) streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_the_sender_and_never_shows() {
    let dir = TestDir::new("auth");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    let mut primary = Cluster::init(&dir, "primary", &InitOptions::default());
    std::fs::write(
        primary.data.join("pg_hba.conf"),
        "local all walship scram-sha-256\nlocal all all trust\n",
    )
    .expect("write pg_hba.conf");
    primary.configure(&["password_encryption = 'scram-sha-256'"]);
    primary.start();
    let client = primary.connect().await;
    client
        .batch_execute("CREATE ROLE walship LOGIN SUPERUSER PASSWORD 'right-pw-4711'")
        .await
        .expect("create role");
    let archive = dir.path().join("archive");
    let receiver = walship.receiver(&dir, &archive, &certs, 0);
    let conninfo = |password: &str| {
        format!(
            "host={} port={} user=walship password={password} dbname=postgres",
            primary.socket_dir.display(),
            primary.port
        )
    };

    let started = std::time::Instant::now();
    let mut wrong = walship.sender(
        &dir,
        &conninfo("wrong-pw-0815"),
        receiver.port,
        &certs,
        &certs,
        &[],
    );
    let status = wrong.wait_exit(Duration::from_secs(10));
    assert!(
        !status.success(),
        "the sender must stop on a wrong password"
    );
    println!("stopped after {:?}", started.elapsed());
    let log = wrong.log_text();
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains("wrong-pw-0815"), "the password leaked: {log}");

    let mut right = walship.sender(
        &dir,
        &conninfo("right-pw-4711"),
        receiver.port,
        &certs,
        &certs,
        &[],
    );
    right.wait_for_log("streaming", WAIT);
    assert!(!right.log_text().contains("right-pw-4711"));
}

/// Copies the certificate files of `from` into `to` (in place, as a renewal does).
fn install_certs(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    walship_tests::env::chown_to_db_user(to);
    for f in [
        "ca.crt",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy certificate");
        walship_tests::env::chown_to_db_user(&to.join(f));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_renewed_certificates_without_a_restart() {
    // (bound in this order, dropped in the reverse one: the test directory last)
    let walship_tests::scenario::Stage {
        dir,
        primary,
        archive,
        certs: old,
        walship,
    } = walship_tests::scenario::stage("sighup", &InitOptions::default());
    let new = walship.certs(&dir, "new");
    // both daemons read their files from here; a renewal replaces them in place
    let live = dir.path().join("live");
    install_certs(&old, &live);
    let client = primary.connect().await;
    let receiver = walship.receiver(&dir, &archive, &live, 0);
    let proxy =
        walship_tests::proxy::Proxy::start(format!("127.0.0.1:{}", receiver.port).parse().unwrap())
            .await;
    let mut sender = walship.sender(&dir, &primary.conninfo(), proxy.port, &live, &live, &[]);
    sender.wait_for_log("streaming", WAIT);

    // a broken file at SIGHUP: the receiver keeps what it has and says why
    std::fs::write(live.join("server.crt"), "not a certificate\n").unwrap();
    receiver.hangup();
    wait_log(&receiver, "could not reload").await;

    // the renewed set (a new CA): both daemons take it at SIGHUP, the session in progress goes on
    install_certs(&new, &live);
    receiver.hangup();
    wait_log(&receiver, "SIGHUP: reloaded").await;
    sender.hangup();
    wait_log(&sender, "SIGHUP: reloaded the TLS").await;
    // the next connection is made with the new certificates and accepted
    proxy.cut();
    wait_for(
        "the sender to stream again, with the new certificate",
        WAIT,
        || async { (sender.log_text().matches(": streaming ").count() >= 2).then_some(()) },
    )
    .await;
    let flush = primary.switch_wal(&client).await;
    wait_archived(&archive, WalSegSize::DEFAULT, flush).await;

    // a sender still holding the old certificate is refused now
    let mut stale = walship.sender(&dir, &primary.conninfo(), receiver.port, &old, &old, &[]);
    stale.wait_for_log("reconnecting", WAIT);
    stale.kill9();
    assert!(sender.terminate(Duration::from_secs(20)).success());
}

/// `--allow-sender`: only the named client certificates may ship; another certificate of the same CA is
/// closed right after the TLS handshake, told nothing, and the archive stays untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_sender_names_may_ship() {
    let dir = TestDir::new("allow-sender");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    for name in ["db1", "intruder"] {
        let out = walship_tests::cluster::run_ok(
            std::process::Command::new(walship.path(Walship::RECEIVER))
                .args(["certs", "--out"])
                .arg(&certs)
                .args(["--add-client", name]),
        );
        assert!(out.status.success());
    }
    // the sender helper takes client.crt/client.key from a directory: one per name
    let as_client = |name: &str| {
        let d = dir.subdir(&format!("client-{name}"));
        std::fs::copy(certs.join(format!("{name}.crt")), d.join("client.crt")).unwrap();
        std::fs::copy(certs.join(format!("{name}.key")), d.join("client.key")).unwrap();
        walship_tests::env::chown_to_db_user(&d.join("client.crt"));
        walship_tests::env::chown_to_db_user(&d.join("client.key"));
        d
    };
    let mut primary = Cluster::init(&dir, "primary", &InitOptions::default());
    primary.start();
    let archive = dir.path().join("archive");
    let receiver =
        walship.receiver_with(&dir, &archive, &certs, 0, &["--allow-sender", "db1"], &[]);

    let intruder_certs = as_client("intruder");
    let mut intruder = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &intruder_certs,
        &[],
    );
    intruder.wait_for_log("reconnecting", Duration::from_secs(30));
    let log = intruder.log_text();
    assert!(!log.contains("streaming"), "{log}");
    assert!(
        !archive.join("walship.id").exists(),
        "an unnamed certificate must not pin or touch the archive"
    );
    assert!(receiver.log_text().contains("is not among --allow-sender"));
    intruder.kill9();

    let db1_certs = as_client("db1");
    let mut sender = walship.sender(
        &dir,
        &primary.conninfo(),
        receiver.port,
        &certs,
        &db1_certs,
        &[],
    );
    sender.wait_for_log("streaming", Duration::from_secs(30));
    let client = primary.connect().await;
    let flush = primary.switch_wal(&client).await;
    wait_archived(&archive, WalSegSize::DEFAULT, flush).await;
}
