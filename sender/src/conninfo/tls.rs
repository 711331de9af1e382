//! TLS to the primary by `sslmode` with rustls: the CA (`sslrootcert`, `~/.postgresql/root.crt`), a client
//! certificate (`sslcert`, `sslkey`, whose permissions are checked as libpq does), and the verifiers of
//! `require` (no check, or the chain only with a root certificate) and `verify-ca` (the chain, not the name).

use super::*;

/// The rustls client configuration for `mode`: the CA of `sslrootcert` (default `~/.postgresql/root.crt`)
/// verifies the server with verify-ca and verify-full (and with require when the file is given, as libpq
/// does); verify-full also checks the host name. `sslcert`/`sslkey` (default `~/.postgresql/postgresql.crt`
/// and `.key` when present) are presented to the server.
pub(super) fn tls_config(
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
pub(super) fn check_key_permissions(key: &Path) -> Result<()> {
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
