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

/// The keywords of service `name`: the user's service file (`PGSERVICEFILE` or `~/.pg_service.conf`) first,
/// then the system's (`PGSYSCONFDIR`/pg_service.conf, Debian's /etc/postgresql-common/pg_service.conf).
fn service_keywords(
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
fn password_from_file(
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

fn split_pgpass(line: &str) -> Vec<String> {
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

/// The rustls client configuration for `mode`: the CA of `sslrootcert` (default `~/.postgresql/root.crt`)
/// verifies the server with verify-ca and verify-full (and with require when the file is given, as libpq
/// does); verify-full also checks the host name. `sslcert`/`sslkey` (default `~/.postgresql/postgresql.crt`
/// and `.key` when present) are presented to the server.
fn tls_config(
    mode: SslMode,
    keys: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let home_pg = home_dir(env).map(|h| h.join(".postgresql"));
    let rootcert = keys.get("sslrootcert").map(PathBuf::from).or_else(|| {
        home_pg
            .as_ref()
            .map(|d| d.join("root.crt"))
            .filter(|p| p.exists())
    });
    let verify = match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => true,
        SslMode::Require => keys.contains_key("sslrootcert"),
        _ => false,
    };
    let builder = if verify {
        let root = rootcert.with_context(|| {
            format!(
                "sslmode={} needs the CA certificate that signed the primary's certificate: set sslrootcert \
                 (or PGSSLROOTCERT), or put it at ~/.postgresql/root.crt",
                mode.name()
            )
        })?;
        let roots = walship_daemon::trust_store(&root).context("sslrootcert")?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("build the certificate verifier")?;
        if mode == SslMode::VerifyFull {
            builder.with_webpki_verifier(webpki)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
        }
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider.clone())))
    };
    let cert = keys.get("sslcert").map(PathBuf::from).or_else(|| {
        home_pg
            .as_ref()
            .map(|d| d.join("postgresql.crt"))
            .filter(|p| p.exists())
    });
    Ok(match cert {
        Some(cert) => {
            let key = keys
                .get("sslkey")
                .map(PathBuf::from)
                .or_else(|| home_pg.as_ref().map(|d| d.join("postgresql.key")))
                .context("sslcert is set but not sslkey")?;
            check_key_permissions(&key)?;
            let chain = walship_daemon::certificates(&cert).context("sslcert")?;
            let key_der = walship_daemon::private_key(&key).context("sslkey")?;
            builder
                .with_client_auth_cert(chain, key_der)
                .with_context(|| {
                    format!(
                        "the key {} does not fit the certificate {}",
                        key.display(),
                        cert.display()
                    )
                })?
        }
        None => builder.with_no_client_auth(),
    })
}

/// libpq refuses a client key that others may read (0600, or 0640 owned by root).
fn check_key_permissions(key: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key).with_context(|| format!("sslkey {}", key.display()))?;
    let mode = meta.permissions().mode();
    let ok = mode & 0o077 == 0 || (meta.uid() == 0 && mode & 0o037 == 0);
    if !ok {
        bail!(
            "private key file {} has group or world access; it must be u=rw (0600) or less (chmod 600)",
            key.display()
        );
    }
    Ok(())
}

/// `verify-ca`: the chain must lead to the CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a CA: encrypted, the server not authenticated (libpq's behaviour).
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
