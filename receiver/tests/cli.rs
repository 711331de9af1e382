//! The command-line contract other tools and the docs rely on.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn receiver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_walship-receiver"))
}

#[test]
fn run_help_names_every_contract_flag() {
    let out = receiver().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--archive",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "WALSHIP_ARCHIVE",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}:\n{help}");
    }
}

#[test]
fn certs_writes_six_private_files_keeps_the_ca_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    let out = receiver()
        .arg("certs")
        .arg("--out")
        .arg(&out_dir)
        .args(["--server-name", "db2.example.com"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("keep it offline"));
    for f in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ] {
        let meta = std::fs::metadata(out_dir.join(f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
        assert!(std::fs::read_to_string(out_dir.join(f))
            .unwrap()
            .starts_with("-----BEGIN"));
    }
    let again = receiver()
        .arg("certs")
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    // nothing of the refused set was written, no temporary file is left
    let before: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before.len(), 6, "{before:?}");

    // another sender's certificate from the kept CA; a name that is not a plain file name is refused
    let added = receiver()
        .arg("certs")
        .arg("--out")
        .arg(&out_dir)
        .args(["--add-client", "sender-2"])
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    for f in ["sender-2.crt", "sender-2.key"] {
        let meta = std::fs::metadata(out_dir.join(f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let bad = receiver()
        .arg("certs")
        .arg("--out")
        .arg(&out_dir)
        .args(["--add-client", "../evil"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nothing was written"));
    let no_ca = receiver()
        .arg("certs")
        .arg("--out")
        .arg(dir.path())
        .args(["--add-client", "x"])
        .output()
        .unwrap();
    assert!(!no_ca.status.success());
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("ca.key"));
    let forced = receiver()
        .arg("certs")
        .arg("--out")
        .arg(&out_dir)
        .arg("--force")
        .output()
        .unwrap();
    assert!(forced.status.success());
}

#[test]
fn a_server_key_that_does_not_match_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    assert!(receiver()
        .arg("certs")
        .arg("--out")
        .arg(&a)
        .status()
        .unwrap()
        .success());
    assert!(receiver()
        .arg("certs")
        .arg("--out")
        .arg(&b)
        .status()
        .unwrap()
        .success());
    let out = receiver()
        .args(["run", "--listen", "127.0.0.1:0"])
        .arg("--archive")
        .arg(dir.path().join("archive"))
        .arg("--tls-cert")
        .arg(a.join("server.crt"))
        .arg("--tls-key")
        .arg(b.join("server.key"))
        .arg("--tls-client-ca")
        .arg(a.join("ca.crt"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match key"), "{err}");
}

/// A wrong --archive is an error that names the directory, never "nothing there yet".
#[test]
fn a_directory_that_is_not_an_archive_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    for target in [&missing, &plain] {
        let out = receiver()
            .arg("status")
            .arg("--archive")
            .arg(target)
            .output()
            .unwrap();
        // for monitoring: 3 is "unknown" (0 ok, 1 warning, 2 critical)
        assert_eq!(out.status.code(), Some(3), "status on {}", target.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&target.display().to_string()), "{err}");

        let out = receiver()
            .arg("cleanup")
            .arg("--archive")
            .arg(target)
            .arg("000000010000000000000003")
            .output()
            .unwrap();
        assert!(!out.status.success(), "cleanup on {}", target.display());
        assert!(String::from_utf8_lossy(&out.stderr).contains(&target.display().to_string()));

        // restore says "missing" (exit 1: recovery keeps waiting) and explains why on stderr, every call
        let out = receiver()
            .arg("restore")
            .arg("--archive")
            .arg(target)
            .arg("000000010000000000000003")
            .arg(dir.path().join("RECOVERYXLOG"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&target.display().to_string()), "{err}");
    }
    assert!(!plain.join("walship.failover").exists());
}

/// A server name no sender could match is refused before anything is written.
#[test]
fn certs_refuse_a_name_that_is_neither_a_dns_name_nor_an_ip_address() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    let out = receiver()
        .args(["certs", "--server-name", "bad name!", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad name!") && err.contains("not a DNS name or an IP address"),
        "{err}"
    );
    assert!(!out_dir.exists(), "nothing may be written");
    // DNS names and addresses are fine
    let out = receiver()
        .args([
            "certs",
            "--server-name",
            "standby.example.com,10.0.0.5,::1",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_config_file_serves_run_and_check() {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/walship-receiver.toml"
    );
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    // check takes the archive from the file unless a flag says otherwise; run's keys (listen) are ignored
    let out = receiver()
        .args(["check", "--config", file, "--archive"])
        .arg(&archive)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "ok: archive: {} exists and is writable",
            archive.display()
        )),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // its TLS files do not exist here: that line fails, with the fix
    assert!(!out.status.success());
    assert!(
        text.contains("FAIL: TLS files:") && text.contains("fix:"),
        "{text}"
    );
}

#[test]
fn store_credentials_from_the_config_file_never_show_and_bad_names_stop() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("store.toml");
    std::fs::write(
        &config,
        "object-store = \"s3://wal/x\"\nobject-store-option = [\"AWS_SECRET_ACCESS_KEY=sup3r-s3cret\"]\n",
    )
    .unwrap();
    for sub in ["restore", "status", "cleanup", "promote"] {
        let out = receiver()
            .arg(sub)
            .arg("--config")
            .arg(&config)
            .arg("--help")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("--object-store-option"), "{sub}: {text}");
        assert!(
            !text.contains("sup3r-s3cret"),
            "{sub} --help shows the secret:\n{text}"
        );
    }
    // a name that is neither an AWS_* nor an AZURE_* setting stops before anything is done, without echoing
    // the value
    let out = receiver()
        .args(["status", "--archive"])
        .arg(dir.path())
        .args(["--object-store-option", "PASSWORD=sup3r-s3cret"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(text.contains("not an AWS_* or AZURE_* setting"), "{text}");
    assert!(!text.contains("sup3r-s3cret"), "{text}");
}
