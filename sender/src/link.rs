//! The TLS link to the receiver.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse PEM certificates in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// TLS 1.3 client configuration: trust `ca`, authenticate with `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("add CA certificate from {}", ca.display()))?;
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read a PEM private key from {}", key.display()))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(cert)?, key)
        .with_context(|| {
            format!(
                "client certificate {} does not match its key",
                cert.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Connects to `addr` and completes the TLS handshake within `timeout`.
pub async fn connect(
    addr: &str,
    server_name: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_owned()).with_context(|| {
        format!("{server_name:?} is not a valid TLS server name (use --tls-server-name)")
    })?;
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to receiver {addr}"))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .with_context(|| {
                format!("TLS handshake with receiver {addr} (server name {server_name})")
            })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("connecting to receiver {addr} timed out"))?
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts() {
        assert_eq!(super::host_of("db2.example.com:7433"), "db2.example.com");
        assert_eq!(super::host_of("[::1]:7433"), "::1");
        assert_eq!(super::host_of("127.0.0.1:1"), "127.0.0.1");
    }
}
