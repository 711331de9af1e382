//! `walship-receiver certs`: a CA plus server and client certificates for a quick start (rcgen).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Files written by [`write_certificates`].
pub const FILES: [&str; 5] = [
    "ca.crt",
    "server.crt",
    "server.key",
    "client.crt",
    "client.key",
];

fn years_from_now(years: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(365 * years)
}

fn write_file(path: &Path, content: &str, overwrite: bool) -> Result<()> {
    let mut o = fs::OpenOptions::new();
    o.write(true).mode(0o600);
    if overwrite {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o.open(path).with_context(|| {
        if overwrite {
            format!("create {}", path.display())
        } else {
            format!(
                "create {} (it exists already? pass --force to overwrite)",
                path.display()
            )
        }
    })?;
    f.write_all(content.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))
}

/// Writes `ca.crt`, `server.crt`/`server.key` (valid for `server_names`) and `client.crt`/`client.key` into
/// `out` (created 0700 if missing; files 0600). The CA key is not kept: make new certificates to add senders.
pub fn write_certificates(
    out: &Path,
    server_names: &[String],
    client_name: &str,
    force: bool,
) -> Result<()> {
    // a name a sender could never match would make certificates that never work: refuse before writing
    for name in server_names {
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            anyhow::bail!(
                "--server-name {name:?} is not a DNS name or an IP address: senders reach the receiver by one of \
                 those (e.g. --server-name standby.example.com --server-name 10.0.0.5); nothing was written"
            );
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("create {}", out.display()))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "walship CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = years_from_now(-1);
    ca_params.not_after = years_from_now(10);
    let ca_key = KeyPair::generate().context("generate CA key")?;
    let ca_cert = ca_params.self_signed(&ca_key).context("self-sign CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>,
                cn: &str,
                usage: ExtendedKeyUsagePurpose|
     -> Result<(String, String)> {
        let mut p = CertificateParams::new(names).context("certificate names")?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        p.not_before = years_from_now(-1);
        p.not_after = years_from_now(10);
        let key = KeyPair::generate().context("generate key")?;
        let cert = p.signed_by(&key, &issuer).context("sign certificate")?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let first = server_names
        .first()
        .map(String::as_str)
        .unwrap_or("localhost");
    let (server_crt, server_key) = leaf(
        server_names.to_vec(),
        first,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_crt, client_key) =
        leaf(Vec::new(), client_name, ExtendedKeyUsagePurpose::ClientAuth)?;

    for (name, content) in FILES.iter().zip([
        ca_cert.pem(),
        server_crt,
        server_key,
        client_crt,
        client_key,
    ]) {
        write_file(&out.join(name), &content, force)?;
    }
    Ok(())
}
