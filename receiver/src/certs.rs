//! `walship-receiver certs`: a CA plus server and client certificates for a quick start (rcgen).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Files written by [`write_certificates`].
pub const FILES: [&str; 6] = [
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "client.crt",
    "client.key",
];

fn years_from_now(years: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(365 * years)
}

/// Writes a set of files all or nothing: each goes to a temporary file (0600, fsynced) beside its final name,
/// and only when all are written are they renamed into place (and the directory fsynced). Without
/// `overwrite`, an existing file stops everything before anything is written.
fn write_set(dir: &Path, files: &[(&str, String)], overwrite: bool) -> Result<()> {
    if !overwrite {
        if let Some((name, _)) = files.iter().find(|(n, _)| dir.join(n).exists()) {
            anyhow::bail!(
                "{} exists already: pass --force to replace the set (nothing was written)",
                dir.join(name).display()
            );
        }
    }
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_bytes())).collect();
    crate::durable::replace_all(dir, &files, 0o600)
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: Vec<String>,
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let mut p = CertificateParams::new(names).context("certificate names")?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p.use_authority_key_identifier_extension = true;
    p.not_before = years_from_now(-1);
    p.not_after = years_from_now(10);
    let key = KeyPair::generate().context("generate key")?;
    let cert = p.signed_by(&key, issuer).context("sign certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `ca.crt` and `ca.key` (the CA, kept to issue more sender certificates with
/// [`add_client`]), `server.crt`/`server.key` (valid for `server_names`) and `client.crt`/`client.key` into
/// `out` (created 0700 if missing; files 0600), all or nothing.
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
    check_client_name(client_name)?;
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
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let first = server_names
        .first()
        .map(String::as_str)
        .unwrap_or("localhost");
    let (server_crt, server_key) = leaf(
        &issuer,
        server_names.to_vec(),
        first,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_crt, client_key) = leaf(
        &issuer,
        Vec::new(),
        client_name,
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let contents = [
        ca_cert.pem(),
        ca_key_pem,
        server_crt,
        server_key,
        client_crt,
        client_key,
    ];
    let files: Vec<(&str, String)> = FILES.iter().copied().zip(contents).collect();
    write_set(out, &files, force)
}

/// A client name becomes a file name and a certificate's common name: letters, digits, `.`, `_`, `-`.
fn check_client_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    anyhow::ensure!(
        ok,
        "client name {name:?} may hold only letters, digits, '.', '_' and '-' (it names the files and the \
         certificate); nothing was written"
    );
    Ok(())
}

/// Issues another sender certificate, `NAME.crt`/`NAME.key` in `out`, from the CA kept there (`ca.crt`,
/// `ca.key`); returns the files written.
pub fn add_client(out: &Path, name: &str, force: bool) -> Result<[String; 2]> {
    check_client_name(name)?;
    let ca_crt = out.join("ca.crt");
    let ca_key = out.join("ca.key");
    let key_pem = fs::read_to_string(&ca_key).with_context(|| {
        format!(
            "read the CA key {}: --add-client needs the CA key that `certs` keeps beside ca.crt (sets made \
             before walship kept it cannot issue more certificates: make a new set and give the receiver its ca.crt)",
            ca_key.display()
        )
    })?;
    let cert_pem = fs::read_to_string(&ca_crt)
        .with_context(|| format!("read the CA certificate {}", ca_crt.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("parse the CA key {}", ca_key.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
        .with_context(|| format!("parse the CA certificate {}", ca_crt.display()))?;
    let (crt, key) = leaf(
        &issuer,
        Vec::new(),
        name,
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let files = [format!("{name}.crt"), format!("{name}.key")];
    write_set(
        out,
        &[(files[0].as_str(), crt), (files[1].as_str(), key)],
        force,
    )?;
    Ok(files)
}
