//! The primary's connection the libpq way, against real servers: SCRAM passwords from a password file
//! (PGPASSFILE), a service file (PGSERVICEFILE) and the PG* environment; a hostssl-only primary reached with
//! sslmode=verify-full (and refused with the wrong CA, a name its certificate does not carry, or no TLS).
//! No password ever appears in a log.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use walship_protocol::WalSegSize;
use walship_tests::archive::wait_archived;
use walship_tests::cluster::{run_ok, WAIT};
use walship_tests::env::chown_to_db_user;
use walship_tests::{Cluster, Daemon, InitOptions, TestDir, Walship};

const PASSWORD: &str = "pw-3141-secret";

/// A file only the database user may read (libpq ignores a password file others can read).
fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    chown_to_db_user(path);
}

/// A primary on 127.0.0.1 whose pg_hba.conf is `hba`, with `files` copied into its data directory and a
/// SCRAM role `walship`.
async fn primary_with(dir: &TestDir, hba: &str, conf: &[&str], files: &[&Path]) -> (Cluster, u16) {
    let mut primary = Cluster::init(dir, "primary", &InitOptions::default());
    for f in files {
        let to = primary.data.join(f.file_name().expect("a file name"));
        std::fs::copy(f, &to).expect("copy into the data directory");
        chown_to_db_user(&to);
    }
    let port = primary.listen_tcp();
    std::fs::write(
        primary.data.join("pg_hba.conf"),
        format!("{hba}\nlocal all all trust\n"),
    )
    .expect("write pg_hba.conf");
    primary.configure(&["password_encryption = 'scram-sha-256'"]);
    primary.configure(conf);
    primary.start();
    primary
        .connect()
        .await
        .batch_execute(&format!(
            "CREATE ROLE walship LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
        ))
        .await
        .expect("create role");
    (primary, port)
}

/// The sender streams, a switched segment reaches the archive complete, and the sender stops cleanly;
/// returns its log, checked for the password.
async fn ships(primary: &Cluster, archive: &Path, mut sender: Daemon) -> String {
    sender.wait_for_log("streaming", WAIT);
    let client = primary.connect().await;
    let flush = primary.switch_wal(&client).await;
    wait_archived(archive, WalSegSize::DEFAULT, flush).await;
    assert!(sender.terminate(Duration::from_secs(20)).success());
    let log = sender.log_text();
    assert!(!log.contains(PASSWORD), "the password leaked:\n{log}");
    log
}

/// The sender stops (non-zero) within 10 s, saying `why`; returns its log.
fn refused(mut sender: Daemon, why: &str) -> String {
    let status = sender.wait_exit(Duration::from_secs(10));
    let log = sender.log_text();
    assert!(!status.success(), "the sender must stop:\n{log}");
    assert!(log.contains(why), "the sender does not say {why:?}:\n{log}");
    assert!(!log.contains(PASSWORD), "the password leaked:\n{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_service_file_and_environment() {
    let dir = TestDir::new("libpq-auth");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    let (primary, port) = primary_with(
        &dir,
        "host all walship 127.0.0.1/32 scram-sha-256",
        &[],
        &[],
    )
    .await;
    let archive = dir.path().join("archive");
    let receiver = walship.receiver(&dir, &archive, &certs, 0);
    let sender = |conninfo: &str, env: &[(&str, &str)]| {
        walship.sender_with(&dir, conninfo, receiver.port, &certs, &certs, &[], env)
    };

    // a password file named by PGPASSFILE (with a line for another port first)
    let passfile = dir.path().join("pgpass");
    private_file(
        &passfile,
        &format!("127.0.0.1:1:*:walship:wrong\n127.0.0.1:{port}:*:walship:{PASSWORD}\n"),
    );
    let log = ships(
        &primary,
        &archive,
        sender(
            &format!("host=127.0.0.1 port={port} user=walship"),
            &[("PGPASSFILE", passfile.to_str().unwrap())],
        ),
    )
    .await;
    assert!(log.contains("password from password file"), "{log}");

    // a service file (PGSERVICEFILE) holding the whole connection, password included
    let services = dir.path().join("pg_service.conf");
    private_file(
        &services,
        &format!(
            "[other]\nport=1\n\n[primary]\nhost=127.0.0.1\nport={port}\nuser=walship\npassword={PASSWORD}\n"
        ),
    );
    ships(
        &primary,
        &archive,
        sender(
            "service=primary",
            &[("PGSERVICEFILE", services.to_str().unwrap())],
        ),
    )
    .await;

    // nothing in --pgconn: PGHOST, PGPORT, PGUSER and PGPASSWORD
    let port_text = port.to_string();
    ships(
        &primary,
        &archive,
        sender(
            "",
            &[
                ("PGHOST", "127.0.0.1"),
                ("PGPORT", &port_text),
                ("PGUSER", "walship"),
                ("PGPASSWORD", PASSWORD),
            ],
        ),
    )
    .await;

    // a URI with the password in it: works, and its log never shows the password
    ships(
        &primary,
        &archive,
        sender(
            &format!("postgresql://walship:{PASSWORD}@127.0.0.1:{port}/postgres?application_name=walship-uri"),
            &[],
        ),
    )
    .await;

    // a URI with the wrong password: stops, naming the problem, never the password
    refused(
        sender(
            &format!("postgresql://walship:{PASSWORD}-not@127.0.0.1:{port}/postgres"),
            &[],
        ),
        "authentication failed",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostssl_only_primary_with_verify_full() {
    let dir = TestDir::new("libpq-tls");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    let other_ca = walship.certs(&dir, "other-ca");
    // the primary's certificate, for the name "localhost" only
    let pg_certs = dir.path().join("pg-certs");
    run_ok(
        Command::new(walship.path(Walship::RECEIVER))
            .arg("certs")
            .arg("--out")
            .arg(&pg_certs)
            .args(["--server-name", "localhost"]),
    );
    let (primary, port) = primary_with(
        &dir,
        "hostssl all walship 127.0.0.1/32 scram-sha-256",
        &[
            "ssl = on",
            "ssl_cert_file = 'server.crt'",
            "ssl_key_file = 'server.key'",
        ],
        &[&pg_certs.join("server.crt"), &pg_certs.join("server.key")],
    )
    .await;
    let archive = dir.path().join("archive");
    let receiver = walship.receiver(&dir, &archive, &certs, 0);
    let sender =
        |conninfo: String| walship.sender(&dir, &conninfo, receiver.port, &certs, &certs, &[]);
    let ca = pg_certs.join("ca.crt");
    let base = format!("port={port} user=walship password={PASSWORD}");

    // no TLS: pg_hba.conf has no entry for it
    refused(
        sender(format!("host=127.0.0.1 {base} sslmode=disable")),
        "pg_hba.conf",
    );
    // the wrong CA
    refused(
        sender(format!(
            "host=localhost hostaddr=127.0.0.1 {base} sslmode=verify-full sslrootcert={}",
            other_ca.join("ca.crt").display()
        )),
        "TLS certificate was not accepted",
    );
    // the right CA, but a name the certificate does not carry
    refused(
        sender(format!(
            "host=127.0.0.1 {base} sslmode=verify-full sslrootcert={}",
            ca.display()
        )),
        "TLS certificate was not accepted",
    );
    // verify-ca does not check the name
    ships(
        &primary,
        &archive,
        sender(format!(
            "host=127.0.0.1 {base} sslmode=verify-ca sslrootcert={}",
            ca.display()
        )),
    )
    .await;
    // verify-full with the name on the certificate
    let log = ships(
        &primary,
        &archive,
        sender(format!(
            "host=localhost hostaddr=127.0.0.1 {base} sslmode=verify-full sslrootcert={}",
            ca.display()
        )),
    )
    .await;
    assert!(log.contains("sslmode=verify-full"), "{log}");
}
