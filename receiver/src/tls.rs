//! TLS for the receiver: TLS 1.3 only, and a client certificate signed by the configured CA is required.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use walship_daemon::{certificates, private_key, trust_store};

/// Builds the server configuration from PEM files.
pub fn server_config(cert: &Path, key_path: &Path, client_ca: &Path) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = trust_store(client_ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("build client certificate verifier")?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(cert)?, private_key(key_path)?)
        .with_context(|| {
            format!(
                "server certificate {} does not match key {}",
                cert.display(),
                key_path.display()
            )
        })?;
    Ok(Arc::new(config))
}
