//! `walship-receiver check`: the archive (exists, writable, its cluster, its lock) and, given the standby's
//! data directory, that recovery will read this archive: restore_command, archive_mode, the recovery
//! signal or configuration files of its version, and the same cluster. One line per check (`ok: …` or
//! `FAIL: … fix: …`).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::archive::{Identity, ID_FILE};

/// What to check.
pub struct CheckOptions {
    pub archive: PathBuf,
    /// The standby's data directory.
    pub pgdata: Option<PathBuf>,
    /// Paths of TLS files `run` would use (checked when given).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

struct Lines {
    failed: usize,
}

impl Lines {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("ok: {what}: {detail}");
    }

    fn fail(&mut self, what: &str, problem: impl std::fmt::Display, fix: impl std::fmt::Display) {
        self.failed += 1;
        println!("FAIL: {what}: {problem}; fix: {fix}");
    }
}

/// Runs the checks, printing one line each; returns whether all passed.
pub fn check(opts: &CheckOptions) -> bool {
    let mut out = Lines { failed: 0 };
    let dir = &opts.archive;
    let identity = archive(&mut out, dir);
    if let Some((cert, key, ca)) = &opts.tls {
        match crate::tls::server_config(cert, key, ca) {
            Ok(_) => out.ok("TLS files", "certificate, key and client CA load and fit together"),
            Err(e) => out.fail(
                "TLS files",
                format!("{e:#}"),
                "give --tls-cert and --tls-key of one pair and --tls-client-ca (the CA of the senders' certificates)",
            ),
        }
    }
    if let Some(pgdata) = &opts.pgdata {
        standby(&mut out, pgdata, dir, identity.as_ref());
    }
    if out.failed == 0 {
        println!("all checks passed");
    } else {
        println!("{} check(s) failed", out.failed);
    }
    out.failed == 0
}

/// The archive: exists, writable, its cluster, its lock. Returns its identity, once pinned.
fn archive(out: &mut Lines, dir: &Path) -> Option<Identity> {
    let mut identity = None;
    if !dir.is_dir() {
        out.fail(
            "archive",
            format!("{} does not exist", dir.display()),
            format!(
                "create it for the receiver's user (install -d -m 0700 -o postgres {0}) or correct --archive",
                dir.display()
            ),
        );
    } else {
        let probe = dir.join(".walship-check.tmp");
        match fs::write(&probe, b"check").and_then(|()| fs::remove_file(&probe)) {
            Ok(()) => out.ok(
                "archive",
                format!("{} exists and is writable", dir.display()),
            ),
            Err(e) => out.fail(
                "archive",
                format!("cannot write in {}: {e}", dir.display()),
                "run the receiver (and check) as the archive's owner, or chown the archive to it",
            ),
        }
        match Identity::load(dir) {
            Ok(Some(id)) => {
                out.ok(
                    "archive cluster",
                    format!(
                        "system identifier {}, PostgreSQL {}, WAL segments of {}",
                        id.system_identifier,
                        crate::archive::pg_major(id.pg_version_num),
                        id.wal_segment_size
                    ),
                );
                identity = Some(id);
            }
            Ok(None) => out.ok(
                "archive cluster",
                format!("none yet ({ID_FILE} is written by the first sender, which pins the archive to its cluster)"),
            ),
            Err(e) => out.fail(
                "archive cluster",
                format!("{e:#}"),
                format!("restore {ID_FILE} from a backup, or start a new archive in an empty directory"),
            ),
        }
        match crate::status::read_status(dir) {
            Some(s)
                if s.receiver_pid != 0
                    && Path::new(&format!("/proc/{}", s.receiver_pid)).exists() =>
            {
                out.ok(
                    "archive lock",
                    format!("held by the running receiver (pid {})", s.receiver_pid),
                )
            }
            _ => out.ok("archive lock", "free: no receiver runs on this archive"),
        }
    }
    identity
}

/// The standby in `pgdata` recovers from the archive `dir`.
fn standby(out: &mut Lines, pgdata: &Path, dir: &Path, identity: Option<&Identity>) {
    let version = match fs::read_to_string(pgdata.join("PG_VERSION")) {
        Ok(v) => v.trim().to_owned(),
        Err(e) => {
            out.fail(
                "standby",
                format!(
                    "{} is not a PostgreSQL data directory ({e} reading PG_VERSION)",
                    pgdata.display()
                ),
                "give the standby's data directory as --pgdata",
            );
            return;
        }
    };
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    standby_cluster(out, pgdata, &version, identity);
    let example = format!(
        "restore_command = 'walship-receiver restore --archive {} --wait %f %p'",
        dir.display()
    );
    restore_command(out, pgdata, dir, major, &example);
    match crate::restore::setting(pgdata, "archive_mode") {
        Some(m) if m.eq_ignore_ascii_case("always") => out.fail(
            "archive_mode",
            "always: the standby would archive the zero-padded partial segment of a failover under the segment's name",
            "set archive_mode to on or off on the standby",
        ),
        m => out.ok("archive_mode", m.unwrap_or_else(|| "off".into())),
    }
    recovery_files(out, pgdata, &version, major, &example);
}

/// The standby's cluster is the archive's (pg_control begins with the system identifier).
fn standby_cluster(out: &mut Lines, pgdata: &Path, version: &str, identity: Option<&Identity>) {
    // the cluster: pg_control begins with the system identifier
    let mut control = [0u8; 8];
    match fs::File::open(pgdata.join("global/pg_control"))
        .and_then(|mut f| f.read_exact(&mut control))
    {
        Ok(()) => {
            let sysid = u64::from_le_bytes(control);
            match identity {
                Some(id) if id.system_identifier != sysid => out.fail(
                    "standby cluster",
                    format!(
                        "the standby is of cluster {sysid}, the archive of cluster {}",
                        id.system_identifier
                    ),
                    "make the standby from a base backup of the primary whose sender fills this archive",
                ),
                _ => out.ok("standby cluster", format!("PostgreSQL {version}, system identifier {sysid}")),
            }
        }
        Err(e) => out.fail(
            "standby cluster",
            format!(
                "cannot read {}: {e}",
                pgdata.join("global/pg_control").display()
            ),
            "run check as the standby's OS user",
        ),
    }
}

/// `restore_command` reads this archive, without `--live` under archive recovery.
fn restore_command(out: &mut Lines, pgdata: &Path, dir: &Path, major: u32, example: &str) {
    match crate::restore::setting(pgdata, "restore_command") {
        None => out.fail(
            "restore_command",
            "not set",
            format!(
                "{} {example}",
                if major >= 12 {
                    "in postgresql.conf:"
                } else {
                    "in recovery.conf:"
                }
            ),
        ),
        Some(cmd) if cmd.contains("--live") && crate::restore::archive_recovery(pgdata) => out.fail(
            "restore_command",
            "--live with archive recovery (recovery.signal, or recovery.conf without standby_mode): recovery would replay \
             the padded partial segment and promote this server while the primary is alive",
            "use standby.signal (standby_mode = on) for a hot standby, or drop --live",
        ),
        Some(cmd) => {
            if points_at(&cmd, dir) {
                out.ok("restore_command", &cmd)
            } else {
                out.fail(
                    "restore_command",
                    format!("{cmd:?} does not restore from {}", dir.display()),
                    example,
                )
            }
        }
    }
}

/// The recovery files fit the standby's version: a signal file (12+) or recovery.conf (before 12).
fn recovery_files(out: &mut Lines, pgdata: &Path, version: &str, major: u32, example: &str) {
    let standby_signal = pgdata.join("standby.signal").exists();
    let recovery_signal = pgdata.join("recovery.signal").exists();
    let recovery_conf = pgdata.join("recovery.conf").exists();
    if major >= 12 {
        if recovery_conf {
            out.fail(
                "recovery files",
                format!("recovery.conf exists: PostgreSQL {version} refuses to start with it"),
                "move its settings into postgresql.conf and remove recovery.conf",
            );
        } else if standby_signal || recovery_signal {
            out.ok(
                "recovery files",
                if standby_signal {
                    "standby.signal"
                } else {
                    "recovery.signal"
                },
            );
        } else {
            out.fail(
                "recovery files",
                "neither standby.signal nor recovery.signal: the server would start as a primary",
                format!("touch {}", pgdata.join("standby.signal").display()),
            );
        }
    } else if recovery_conf {
        out.ok("recovery files", "recovery.conf");
    } else {
        out.fail(
            "recovery files",
            format!("no recovery.conf: PostgreSQL {version} would start as a primary"),
            format!(
                "write {} with {example}",
                pgdata.join("recovery.conf").display()
            ),
        );
    }
}

/// Whether `command` runs walship's restore with `--archive` naming `dir` (same directory after resolving).
fn points_at(command: &str, dir: &Path) -> bool {
    if !command.contains("walship-receiver") || !command.contains("restore") {
        return false;
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    let given = words.iter().enumerate().find_map(|(i, w)| {
        if *w == "--archive" {
            words.get(i + 1).map(|v| v.to_string())
        } else {
            w.strip_prefix("--archive=").map(str::to_owned)
        }
    });
    let Some(given) = given else {
        // WALSHIP_ARCHIVE in the server's environment: cannot be seen from here
        return false;
    };
    let given = given.trim_matches(|c| c == '"' || c == '\'');
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(Path::new(given)) == canon(dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn restore_commands() {
        let dir = std::path::Path::new("/var/lib/walship/archive");
        assert!(super::points_at(
            "walship-receiver restore --archive /var/lib/walship/archive --wait %f %p",
            dir
        ));
        assert!(super::points_at(
            "/usr/bin/walship-receiver restore --archive=/var/lib/walship/archive %f %p",
            dir
        ));
        assert!(!super::points_at(
            "walship-receiver restore --archive /elsewhere %f %p",
            dir
        ));
        assert!(!super::points_at("cp /mnt/server/archivedir/%f %p", dir));
    }
}
