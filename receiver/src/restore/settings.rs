//! The standby's own settings, read from its configuration files: `archive_mode`, archive recovery or
//! standby mode, any setting `check` needs.

use super::*;

pub(super) fn refuse_archive_mode_always(opts: &RestoreOptions) -> Result<()> {
    if !opts.allow_archive_mode_always && archive_mode_always(&opts.data_dir) {
        bail!(
            "this standby runs with archive_mode = always: it would archive the zero-padded partial segment under the \
             real segment name. Set archive_mode to on or off on the standby, or pass --allow-archive-mode-always"
        );
    }
    Ok(())
}

/// Whether the server whose data directory is `data_dir` runs with `archive_mode = always`.
pub fn archive_mode_always(data_dir: &Path) -> bool {
    setting(data_dir, "archive_mode").is_some_and(|m| m.eq_ignore_ascii_case("always"))
}

/// The value of the server setting `name` as the configuration files of `data_dir` give it: postgresql.conf,
/// the `config_file` in postmaster.opts, postgresql.auto.conf, and (PostgreSQL 11 and older) recovery.conf;
/// the last setting wins. `include` directives are not followed.
/// Whether the server of `data_dir` runs archive recovery, not standby mode: `recovery.signal` without
/// `standby.signal` (12+), or `recovery.conf` without `standby_mode = on` (up to 11).
pub fn archive_recovery(data_dir: &Path) -> bool {
    if data_dir.join("standby.signal").exists() {
        return false;
    }
    if data_dir.join("recovery.signal").exists() {
        return true;
    }
    data_dir.join("recovery.conf").exists()
        && !setting(data_dir, "standby_mode")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1"))
}

pub fn setting(data_dir: &Path, name: &str) -> Option<String> {
    let mut files = vec![data_dir.join("postgresql.conf")];
    if let Ok(opts) = fs::read_to_string(data_dir.join("postmaster.opts")) {
        for part in opts.split('"') {
            if let Some(path) = part.strip_prefix("config_file=") {
                files.push(PathBuf::from(path));
            }
        }
    }
    files.push(data_dir.join("postgresql.auto.conf"));
    files.push(data_dir.join("recovery.conf"));
    let mut value = None;
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            if let Some((k, v)) = parse_conf_line(line) {
                if k.eq_ignore_ascii_case(name) {
                    value = Some(v);
                }
            }
        }
    }
    value
}

/// One `name = value` (or `name value`) line of a PostgreSQL configuration file: values quoted with '…'
/// ('' and \' for a quote), comments after #.
pub(super) fn parse_conf_line(line: &str) -> Option<(String, String)> {
    let line = line.trim_start();
    let end = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))?;
    let (name, rest) = line.split_at(end);
    if name.is_empty() {
        return None;
    }
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    if let Some(quoted) = rest.strip_prefix('\'') {
        let mut value = String::new();
        let mut chars = quoted.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                }
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    value.push('\'');
                }
                '\'' => return Some((name.to_owned(), value)),
                c => value.push(c),
            }
        }
        None
    } else {
        let value = rest.split('#').next().unwrap_or("").trim();
        (!value.is_empty()).then(|| (name.to_owned(), value.to_owned()))
    }
}
