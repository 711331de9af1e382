//! libpq's files: the connection service file (`service`, `PGSERVICE`, `PGSERVICEFILE`, `PGSYSCONFDIR`) and
//! the password file (`passfile`, `PGPASSFILE`, `~/.pgpass`), with libpq's format and permission rules.

use super::*;

/// The keywords of service `name`: the user's service file (`PGSERVICEFILE` or `~/.pg_service.conf`) first,
/// then the system's (`PGSYSCONFDIR`/pg_service.conf, Debian's /etc/postgresql-common/pg_service.conf).
pub(super) fn service_keywords(
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>> {
    let mut files: Vec<PathBuf> = Vec::new();
    match env("PGSERVICEFILE") {
        Some(f) => files.push(f.into()),
        None => files.extend(home_dir(env).map(|h| h.join(".pg_service.conf"))),
    }
    match env("PGSYSCONFDIR") {
        Some(d) => files.push(Path::new(&d).join("pg_service.conf")),
        None => files.push("/etc/postgresql-common/pg_service.conf".into()),
    }
    for file in &files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("read service file {}", file.display()))
            }
        };
        let mut found = false;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                if found {
                    break;
                }
                found = section.trim() == name;
                continue;
            }
            if !found {
                continue;
            }
            let (k, v) = line.split_once('=').with_context(|| {
                format!(
                    "syntax error in service file {}, line {}: expected keyword=value",
                    file.display(),
                    n + 1
                )
            })?;
            let k = k.trim();
            if k == "service" {
                bail!(
                    "nested service specifications are not supported in service file {}, line {}",
                    file.display(),
                    n + 1
                );
            }
            keys.push((k.to_owned(), v.trim().to_owned()));
        }
        if found {
            return Ok(keys);
        }
    }
    let searched: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    bail!(
        "definition of service {name:?} not found (searched {}): add a [{name}] section or set PGSERVICEFILE",
        searched.join(", ")
    )
}

/// The password of the first matching `hostname:port:database:username:password` line (`*` matches
/// anything, `\` escapes `:` and `\`), like libpq. A file that group or others may read is ignored with a
/// warning, as libpq does.
pub(super) fn password_from_file(
    path: &Path,
    config: &tokio_postgres::Config,
    user: Option<&str>,
    explicit: bool,
) -> Result<Option<String>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // ~/.pgpass of another user's home (HOME kept across su): libpq skips it silently too
        Err(_) if !explicit => return Ok(None),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the password file");
            return Ok(None);
        }
    };
    if !meta.is_file() {
        tracing::warn!(file = %path.display(), "the password file is not a plain file; ignored");
        return Ok(None);
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "the password file has group or world access; permissions should be u=rw (0600) or less: ignored"
        );
        return Ok(None);
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(_) if !explicit => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("read the password file {}", path.display()))
        }
    };
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => config
            .get_hostaddrs()
            .first()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "localhost".into()),
    };
    let socket = host.starts_with('/');
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let db = config.get_dbname().unwrap_or_default();
    let user = user.unwrap_or_default();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        let host_ok = matches(&fields[0], &host) || (socket && fields[0] == "localhost");
        if host_ok
            && matches(&fields[1], &port)
            && matches(&fields[2], db)
            && matches(&fields[3], user)
        {
            return Ok(Some(fields[4].clone()));
        }
    }
    Ok(None)
}

pub(super) fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("one field").push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}
