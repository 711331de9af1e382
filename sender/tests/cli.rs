//! The command-line contract other tools and the docs rely on.

use std::process::Command;

#[test]
fn run_help_names_every_contract_flag_and_its_environment_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_walship-sender"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--pgconn",
        "--receiver",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
        "--tls-server-name",
        "--wal-dir",
        "--start-lsn",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}:\n{help}");
    }
    for var in [
        "WALSHIP_PGCONN",
        "WALSHIP_RECEIVER",
        "WALSHIP_TLS_CA",
        "WALSHIP_START_LSN",
    ] {
        assert!(help.contains(var), "run --help lacks {var}");
    }
}

#[test]
fn a_bad_lsn_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_walship-sender"))
        .args([
            "run",
            "--receiver",
            "x:1",
            "--tls-ca",
            "a",
            "--tls-cert",
            "b",
            "--tls-key",
            "c",
            "--start-lsn",
            "16/zz",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a WAL position"), "{err}");
}

#[test]
fn missing_certificate_files_are_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_walship-sender"))
        .args([
            "run",
            "--receiver",
            "127.0.0.1:1",
            "--tls-ca",
            "/nonexistent/ca.crt",
            "--tls-cert",
            "b",
            "--tls-key",
            "c",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/ca.crt"), "{err}");
}
