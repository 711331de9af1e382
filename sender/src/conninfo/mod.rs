//! The primary's connection the libpq way: a keyword string or a `postgresql://` URI, then the service file
//! (`service`, `PGSERVICE`), then the `PG*` environment variables, then libpq's defaults; a password from the
//! password file (`passfile`, `PGPASSFILE`, `~/.pgpass`) when none is given; TLS by `sslmode` (disable …
//! verify-full) with rustls, `sslrootcert`, `sslcert` and `sslkey`.
//!
//! tokio-postgres parses the keywords it knows and makes the connection; what it does not know (`service`,
//! `passfile`, the verifying `sslmode`s and the TLS files) is taken out first and handled here, with
//! libpq's rules (precedence and the password file's format and permission check, from libpq's
//! `conninfo_add_defaults` and `passwordFromFile`). No message ever carries a password.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

mod files;
mod tls;

use files::*;
use tls::*;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => bail!(
                "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            ),
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A resolved connection: what tokio-postgres needs, and how to do TLS.
#[derive(Clone)]
pub struct Conn {
    pub config: tokio_postgres::Config,
    /// `None` with `sslmode=disable`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub sslmode: SslMode,
    /// Where the password came from ("the connection string", "PGPASSWORD", "password file X"), never it.
    pub password_source: Option<String>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Conn {
    /// Where the connection goes and as whom, for messages: never the password.
    pub fn describe(&self) -> String {
        let mut text = describe(&self.config);
        text.push_str(&format!(" sslmode={}", self.sslmode.name()));
        if let Some(source) = &self.password_source {
            text.push_str(&format!(" (password from {source})"));
        }
        text
    }
}

/// Keywords the connection string may carry that tokio-postgres does not take; handled here.
const OURS: &[&str] = &[
    "service",
    "passfile",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
];

/// The environment variables libpq reads, and their keywords (libpq's `PQconninfoOptions`).
const ENV: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGUSER", "user"),
    ("PGDATABASE", "dbname"),
    ("PGPASSWORD", "password"),
    ("PGPASSFILE", "passfile"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGAPPNAME", "application_name"),
    ("PGOPTIONS", "options"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
];

/// The process's environment, as [`resolve`] reads it.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn invalid(why: impl std::fmt::Display) -> anyhow::Error {
    crate::error::Unfixable(format!(
        "the connection string of the primary (--pgconn) is not valid: {why}. It takes libpq's keywords \
         (host, hostaddr, port, user, password, passfile, dbname, service, connect_timeout, application_name, \
         sslmode, sslrootcert, sslcert, sslkey, ...) or a postgresql:// URI"
    ))
    .into()
}

/// Resolves `conninfo` as libpq would: the string, then its service, then the environment (`env`), then the
/// defaults; the password file; the TLS set-up. An error names the problem and never repeats a value.
pub fn resolve(conninfo: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Conn> {
    let mut keys = keywords(conninfo)?;
    // the service file fills what the string leaves open, the environment what both leave open
    let service = keys.get("service").cloned().or_else(|| env("PGSERVICE"));
    if let Some(name) = service {
        for (k, v) in service_keywords(&name, env)? {
            keys.entry(k).or_insert(v);
        }
    }
    for (var, key) in ENV {
        if let Some(v) = env(var) {
            keys.entry((*key).to_owned()).or_insert(v);
        }
    }
    // libpq's defaults where it differs from tokio-postgres's, and walship's database
    if !keys.contains_key("host") && !keys.contains_key("hostaddr") {
        let socket = ["/var/run/postgresql", "/tmp"]
            .into_iter()
            .find(|d| Path::new(d).is_dir())
            .unwrap_or("/tmp");
        keys.insert("host".into(), socket.into());
    }
    keys.entry("dbname".into())
        .or_insert_with(|| "postgres".into());
    let mut password_source = keys.contains_key("password").then(|| {
        if env("PGPASSWORD").as_deref() == keys.get("password").map(String::as_str) {
            "PGPASSWORD".to_owned()
        } else {
            "the connection string".to_owned()
        }
    });
    let sslmode = match keys.get("sslmode") {
        Some(s) => SslMode::parse(s).map_err(invalid)?,
        None => SslMode::Prefer,
    };

    // what tokio-postgres takes, re-quoted the libpq way
    let mut text = String::new();
    for (k, v) in &keys {
        if OURS.contains(&k.as_str()) {
            continue;
        }
        let quoted = v.replace('\\', "\\\\").replace('\'', "\\'");
        text.push_str(&format!("{k}='{quoted}' "));
    }
    let mut config: tokio_postgres::Config = text
        .parse()
        .map_err(|e: tokio_postgres::Error| invalid(format!("{:#}", anyhow::Error::new(e))))?;
    config.ssl_mode(match sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });

    if config.get_password().is_none() {
        let home = home_dir(env);
        let given = keys.get("passfile").map(PathBuf::from);
        let explicit = given.is_some();
        let passfile = given.or_else(|| home.as_ref().map(|h| h.join(".pgpass")));
        if let Some(path) = passfile {
            let user = config.get_user().map(str::to_owned).or_else(os_user);
            if let Some(password) = password_from_file(&path, &config, user.as_deref(), explicit)? {
                config.password(password);
                password_source = Some(format!("password file {}", path.display()));
            }
        }
    }

    let tls = match sslmode {
        SslMode::Disable => None,
        mode => Some(Arc::new(tls_config(mode, &keys, env)?)),
    };
    Ok(Conn {
        config,
        tls,
        sslmode,
        password_source,
    })
}

/// The keyword/value pairs of a connection string: libpq's `keyword = value` syntax (values quoted with
/// '…', backslash escapes), or a URI, whose authority and path become host, port, user, password, dbname.
fn keywords(conninfo: &str) -> Result<BTreeMap<String, String>> {
    let mut keys = BTreeMap::new();
    if conninfo.starts_with("postgresql://") || conninfo.starts_with("postgres://") {
        let (base, query) = conninfo.split_once('?').unwrap_or((conninfo, ""));
        // tokio-postgres parses the authority (several hosts, [v6]:port, percent-encoding)
        let config: tokio_postgres::Config = base
            .parse()
            .map_err(|e: tokio_postgres::Error| invalid(format!("{:#}", anyhow::Error::new(e))))?;
        use tokio_postgres::config::Host;
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        if !hosts.is_empty() {
            keys.insert("host".into(), hosts.join(","));
        }
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        if !ports.is_empty() {
            keys.insert("port".into(), ports.join(","));
        }
        if let Some(u) = config.get_user() {
            keys.insert("user".into(), u.to_owned());
        }
        if let Some(p) = config.get_password() {
            let p =
                String::from_utf8(p.to_vec()).map_err(|_| invalid("the password is not UTF-8"))?;
            keys.insert("password".into(), p);
        }
        if let Some(d) = config.get_dbname() {
            keys.insert("dbname".into(), d.to_owned());
        }
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param
                .split_once('=')
                .ok_or_else(|| invalid("a URI parameter has no '='"))?;
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| invalid("a URI parameter is not UTF-8"))
            };
            keys.insert(decode(k)?, decode(v)?);
        }
        return Ok(keys);
    }
    let mut rest = conninfo.trim_start();
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| invalid("missing \"=\" after a keyword"))?;
        let key = rest[..eq].trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            bail!(invalid("missing \"=\" after a keyword"));
        }
        rest = rest[eq + 1..].trim_start();
        let mut value = String::new();
        if let Some(quoted) = rest.strip_prefix('\'') {
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let end = end.ok_or_else(|| invalid(format!("unterminated quoted value of {key}")))?;
            rest = &quoted[end..];
        } else {
            let mut chars = rest.char_indices();
            let mut end = rest.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    c if c.is_whitespace() => {
                        end = i;
                        break;
                    }
                    c => value.push(c),
                }
            }
            rest = &rest[end..];
        }
        keys.insert(key.to_owned(), value);
        rest = rest.trim_start();
    }
    Ok(keys)
}

fn home_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env("HOME").map(PathBuf::from)
}

fn os_user() -> Option<String> {
    process_env("USER").or_else(|| process_env("LOGNAME"))
}

/// The connection in messages: where it goes and as whom, never its password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let mut parts = Vec::new();
    if !hosts.is_empty() {
        parts.push(format!("host={}", hosts.join(",")));
    }
    let addrs: Vec<String> = config
        .get_hostaddrs()
        .iter()
        .map(|a| a.to_string())
        .collect();
    if !addrs.is_empty() {
        parts.push(format!("hostaddr={}", addrs.join(",")));
    }
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if let Some(db) = config.get_dbname() {
        parts.push(format!("dbname={db}"));
    }
    if config.get_password().is_some() {
        parts.push("password=(hidden)".into());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn keywords_and_uris() {
        let k = keywords(r"host=h port = 5433 password='a \'b\' c' user=u").unwrap();
        assert_eq!(k["password"], "a 'b' c");
        assert_eq!(k["port"], "5433");
        let k = keywords(
            "postgresql://u:p%40ss@h1:5433,h2/db?sslmode=verify-full&application_name=x%20y",
        )
        .unwrap();
        assert_eq!(k["user"], "u");
        assert_eq!(k["password"], "p@ss");
        assert_eq!(k["host"], "h1,h2");
        assert_eq!(k["dbname"], "db");
        assert_eq!(k["sslmode"], "verify-full");
        assert_eq!(k["application_name"], "x y");
    }

    #[test]
    fn precedence_string_then_service_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let services = dir.path().join("services.conf");
        std::fs::write(
            &services,
            "# test\n[other]\nport=1\n[main]\nhost=svc-host\nport=6000\nuser=svc-user\n",
        )
        .unwrap();
        let file = services.to_str().unwrap();
        let env = env_of(&[
            ("PGSERVICEFILE", file),
            ("PGHOST", "env-host"),
            ("PGUSER", "env-user"),
            ("PGDATABASE", "env-db"),
            ("PGSSLMODE", "disable"),
        ]);
        let c = resolve("service=main user=str-user", &env).unwrap();
        let text = c.describe();
        assert!(text.contains("host=svc-host"), "{text}");
        assert!(text.contains("port=6000"), "{text}");
        assert!(text.contains("user=str-user"), "{text}");
        assert!(text.contains("dbname=env-db"), "{text}");
        assert_eq!(c.sslmode, SslMode::Disable);
        assert!(c.tls.is_none());
        // the service named by PGSERVICE
        let env = env_of(&[
            ("PGSERVICEFILE", file),
            ("PGSERVICE", "main"),
            ("PGSSLMODE", "disable"),
        ]);
        assert!(resolve("", &env)
            .unwrap()
            .describe()
            .contains("host=svc-host"));
        // a missing service is an error naming the files searched
        let e = resolve("service=nope", &env).unwrap_err();
        assert!(format!("{e:#}").contains("nope") && format!("{e:#}").contains(file));
    }

    #[test]
    fn password_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pgpass");
        std::fs::write(
            &pass,
            "# comment\nother:*:*:*:wrong\ndb\\:host:5433:*:u:not-this\nh:5433:postgres:u:pa\\:ss\n*:*:*:*:fallback\n",
        )
        .unwrap();
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = pass.to_str().unwrap();
        let env = env_of(&[("PGPASSFILE", p), ("PGSSLMODE", "disable")]);
        let c = resolve("host=h port=5433 user=u", &env).unwrap();
        assert_eq!(c.config.get_password(), Some(&b"pa:ss"[..]));
        assert!(c.describe().contains(p) && !c.describe().contains("pa:ss"));
        let c = resolve("host=x port=1 user=u", &env).unwrap();
        assert_eq!(c.config.get_password(), Some(&b"fallback"[..]));
        // a password given wins over the file
        let c = resolve("host=h port=5433 user=u password=given", &env).unwrap();
        assert_eq!(c.config.get_password(), Some(&b"given"[..]));
        // a file others can read is ignored
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = resolve("host=h port=5433 user=u", &env).unwrap();
        assert_eq!(c.config.get_password(), None);
    }

    #[test]
    fn tls_modes() {
        let env = env_of(&[]);
        let c = resolve("host=h", &env).unwrap();
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert!(c.tls.is_some());
        let e = resolve(
            "host=h sslmode=verify-full sslrootcert=/nonexistent/ca.crt",
            &env,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/ca.crt"), "{e:#}");
        let e = resolve("host=h sslmode=verify-full", &env).unwrap_err();
        assert!(format!("{e:#}").contains("sslrootcert"), "{e:#}");
        let e = resolve("host=h sslmode=sometimes", &env).unwrap_err();
        assert!(format!("{e:#}").contains("sslmode"), "{e:#}");
    }

    #[test]
    fn passwords_never_appear_in_messages() {
        let env = env_of(&[("PGSSLMODE", "disable")]);
        for conninfo in [
            "host=x password=secret user=u",
            "host=x password = secret user=u",
            "host=x password='secret' user=u",
            "postgresql://u:secret@x:5433/db",
            "postgresql://u:secret@x/db?sslmode=disable",
        ] {
            let text = resolve(conninfo, &env).unwrap().describe();
            assert!(!text.contains("secret"), "{conninfo}: {text}");
            assert!(text.contains("user=u") && text.contains("host=x"), "{text}");
        }
        for bad in [
            "host=x password=secret bogus_keyword=1",
            "host=x password=secret port=notanumber",
            "host=x password='secret",
            "postgresql://u:secret@x/db?bogus=1",
        ] {
            let e = resolve(bad, &env).unwrap_err();
            let text = format!("{e:#}");
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains("--pgconn"), "{text}");
        }
        let e = resolve("host=x bogus_keyword=1", &env).unwrap_err();
        assert!(format!("{e:#}").contains("bogus_keyword"), "{e:#}");
    }
}
