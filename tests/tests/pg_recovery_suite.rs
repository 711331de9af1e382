//! PostgreSQL's own recovery tests that use a WAL archive, run with walship as the archive (issue 19): the
//! scripts of the installed server's source package, their assertions unchanged. `tests/pgtap/WalshipArchive.pm`
//! changes only how `PostgreSQL::Test::Cluster` archives and restores: a walship receiver per archive
//! directory, a walship sender per primary (a promoted server's sender fences the previous one, as a DBA
//! does at a failover), an `archive_command` that waits until walship's archive holds the file, and
//! `walship-receiver restore` as `restore_command`. Not run: `020_archive_status.pl` (it tests the
//! archiver's own retry and status files with an `archive_command` that fails on purpose) and
//! `025_stuck_on_old_timeline.pl` (it brings its own `archive_command`).

use std::path::Path;
use std::process::Command;

use walship_tests::daemon::Walship;
use walship_tests::env::{as_db_user, chown_to_db_user, TestDir};
use walship_tests::pgsource::recovery_suite;

/// The tests that archive or restore WAL through the cluster's archive settings.
const TESTS: &[&str] = &[
    "002_archiving",
    "003_recovery_targets",
    "004_timeline_switch",
    "010_logical_decoding_timelines",
    "023_pitr_prepared_xact",
    "024_archive_recovery",
    "028_pitr_timelines",
    "043_no_contrecord_switch",
    "045_archive_restartpoint",
];
/// The ones every supported server version has.
const REQUIRED: &[&str] = &[
    "002_archiving",
    "024_archive_recovery",
    "028_pitr_timelines",
];
/// Runs in a row: a stall or a flaky archive shows up as a failure of a later round.
const ROUNDS: usize = 3;

fn chown_tree(path: &Path) {
    chown_to_db_user(path);
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("read dir").flatten() {
            chown_tree(&e.path());
        }
    }
}

#[test]
fn postgresql_recovery_tests_pass_with_walship_as_the_archive() {
    let suite = recovery_suite();
    let dir = TestDir::new("pg-recovery-suite");
    let root = dir.path().to_path_buf();
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    // the scripts, each behind a wrapper that loads walship's archive settings first
    let orig = dir.subdir("orig");
    let t = dir.subdir("t");
    let lib = dir.subdir("lib");
    let mut run = Vec::new();
    for name in TESTS {
        let script = suite.tests.join(format!("{name}.pl"));
        if !script.is_file() {
            assert!(
                !REQUIRED.contains(name),
                "{name}.pl is not in PostgreSQL {}'s recovery suite",
                suite.version
            );
            println!(
                "{name}.pl: not in PostgreSQL {}'s recovery suite",
                suite.version
            );
            continue;
        }
        std::fs::copy(&script, orig.join(format!("{name}.pl"))).expect("copy the test script");
        std::fs::write(
            t.join(format!("{name}.pl")),
            format!("use strict;\nuse warnings;\nuse WalshipArchive;\ndo \"./orig/{name}.pl\";\ndie $@ if $@;\n"),
        )
        .expect("write the wrapper");
        run.push(format!("t/{name}.pl"));
    }
    std::fs::write(
        lib.join("WalshipArchive.pm"),
        include_str!("../pgtap/WalshipArchive.pm"),
    )
    .expect("write WalshipArchive.pm");
    // the database user reads everything from the test directory (target/ may be closed to it)
    let mut perl_lib = vec![lib.clone()];
    for extra in &suite.perl_lib {
        if extra.starts_with("/usr") {
            perl_lib.push(extra.clone());
        } else {
            let copy = dir.subdir("perl");
            let status = Command::new("cp")
                .arg("-r")
                .arg(extra.join("."))
                .arg(&copy)
                .status()
                .expect("run cp");
            assert!(status.success(), "copy {}", extra.display());
            perl_lib.push(copy);
        }
    }
    chown_tree(&root);
    let path = format!(
        "{}:{}",
        suite.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let perl5lib = std::env::join_paths(&perl_lib).expect("PERL5LIB");
    println!(
        "PostgreSQL {} recovery tests with walship as the archive: {}",
        suite.version,
        run.join(" ")
    );
    for round in 1..=ROUNDS {
        let _ = std::fs::remove_dir_all(root.join("tmp_check"));
        let mut cmd = Command::new("prove");
        cmd.current_dir(&root)
            .args(&run)
            .env("PATH", &path)
            .env("PERL5LIB", &perl5lib)
            .env("WALSHIP_BIN", &walship.bin_dir)
            .env("WALSHIP_CERTS", &certs)
            .env("TESTDIR", &root)
            .env("PG_REGRESS", &suite.pg_regress)
            // kept, to check below that walship was the archive
            .env("PG_TEST_NOCLEAN", "1");
        as_db_user(&mut cmd);
        let out = cmd.output().expect("run prove");
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("round {round}:\n{stdout}");
        if !out.status.success() {
            let logs = root.join("tmp_check/log");
            let mut detail = String::new();
            for e in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("regress_log_") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    detail += &format!("--- {name} (last 40 lines)\n");
                    for l in tail.iter().rev() {
                        detail += l;
                        detail.push('\n');
                    }
                }
            }
            panic!(
                "PostgreSQL's recovery tests failed with walship as the archive (round {round}):\n{stdout}\n{}\n{detail}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(stdout.contains("All tests successful"), "{stdout}");
        // each test archived through walship: an archive with walship's identity file
        for script in &run {
            let name = script.trim_start_matches("t/").trim_end_matches(".pl");
            let archived = std::fs::read_dir(root.join("tmp_check"))
                .expect("tmp_check")
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("t_{name}_"))
                })
                .any(|e| e.path().join("archives/walship.id").is_file());
            assert!(archived, "{name}: no walship archive under tmp_check");
        }
    }
}
