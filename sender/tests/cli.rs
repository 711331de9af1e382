//! The sender's command line: configuration errors stop it at once with a clear message, and a password never
//! shows in its output.

use std::process::Command;
use std::time::{Duration, Instant};

fn sender() -> Command {
    Command::new(env!("CARGO_BIN_EXE_walship-sender"))
}

#[test]
fn a_bad_connection_string_stops_the_sender_at_once_without_showing_the_password() {
    let started = Instant::now();
    let out = sender()
        .args([
            "run",
            "--pgconn",
            "host=db.example password=s3cr3t-pw bogus_keyword=1",
        ])
        .args([
            "--receiver",
            "127.0.0.1:9",
            "--tls-ca",
            "/nonexistent/ca.crt",
        ])
        .args([
            "--tls-cert",
            "/nonexistent/c.crt",
            "--tls-key",
            "/nonexistent/c.key",
        ])
        .env_remove("WALSHIP_LOG")
        .output()
        .expect("run walship-sender");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pgconn") && err.contains("bogus_keyword"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t-pw"), "the password leaked: {err}");
    assert_eq!(
        err.matches("is not valid").count(),
        1,
        "printed once: {err}"
    );
}

#[test]
fn help_never_shows_a_password_from_the_environment() {
    let out = sender()
        .args(["run", "--help"])
        .env(
            "WALSHIP_PGCONN",
            "postgresql://walship:s3cr3t-pw@db.example/postgres",
        )
        .output()
        .expect("run walship-sender");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--pgconn"), "{text}");
    assert!(!text.contains("s3cr3t-pw"), "the password leaked: {text}");
}

#[test]
fn the_example_config_file_is_read_and_flags_override_it() {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/walship-sender.toml"
    );
    // the file parses (an unknown key would be named); the flag wins over its pgconn and stops at once
    let out = sender()
        .args([
            "run",
            "--config",
            file,
            "--pgconn",
            "host=x bogus_keyword=1",
        ])
        .env_remove("WALSHIP_LOG")
        .output()
        .expect("run walship-sender");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("bogus_keyword"), "{err}");
    // a typo in a config file is named, with the file
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "recevier = \"x:1\"\n").unwrap();
    let out = sender()
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .expect("run walship-sender");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("recevier") && err.contains("bad.toml"),
        "{err}"
    );
}
