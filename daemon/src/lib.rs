//! What walship's two daemons share, written once: logging set-up, shutdown on SIGINT/SIGTERM, reloading
//! on SIGHUP, and loading certificates, keys and CA sets from PEM files with errors that name the file.
#![forbid(unsafe_code)]

mod backoff;
pub mod config;

pub use backoff::Backoff;

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// Sets up `tracing` logs on stderr; `WALSHIP_LOG` (or `RUST_LOG`) filters them, `info` by default.
pub fn init_logging() {
    init_logging_with("info")
}

/// [`init_logging`] with another default filter.
pub fn init_logging_with(default: &str) {
    let filter = std::env::var("WALSHIP_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A token cancelled by the first SIGINT or SIGTERM. Call inside a tokio runtime.
pub fn shutdown_on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        notify(&[sd_notify::NotifyState::Stopping]);
        t.cancel();
    });
    Ok(token)
}

/// Tells systemd (a `Type=notify` unit; nothing without NOTIFY_SOCKET) about the daemon's state.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(state) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }
}

/// The daemon is up (`READY=1`; systemd's start job completes), with a status line for `systemctl status`.
/// Starts the watchdog pings when the unit has `WatchdogSec=`: they come from the daemon's runtime, so a
/// wedged runtime stops them and systemd restarts the daemon. Call inside a tokio runtime.
pub fn notify_ready(status: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}

/// A new status line for `systemctl status` (`STATUS=`).
pub fn notify_status(status: &str) {
    notify(&[sd_notify::NotifyState::Status(status)]);
}

/// A value loaded from files at start and again at every SIGHUP (certificate rotation without a restart).
/// A reload that fails keeps the current value and says why; new connections take the value current when
/// they start, open ones keep theirs.
pub struct Reloadable<T> {
    current: Arc<RwLock<Arc<T>>>,
}

impl<T> Clone for Reloadable<T> {
    fn clone(&self) -> Self {
        Reloadable {
            current: self.current.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloadable")
    }
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// A value that never changes.
    pub fn fixed(value: Arc<T>) -> Self {
        Reloadable {
            current: Arc::new(RwLock::new(value)),
        }
    }

    /// Loads the value now (an error is returned: a daemon does not start with bad files) and at every SIGHUP.
    /// `what` names it in the log. Call inside a tokio runtime.
    pub fn on_sighup(
        what: &'static str,
        load: impl Fn() -> Result<Arc<T>> + Send + 'static,
    ) -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let this = Reloadable::fixed(load()?);
        let mut hup = signal(SignalKind::hangup()).context("install the SIGHUP handler")?;
        let current = this.current.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match load() {
                    Ok(value) => {
                        *current.write().unwrap_or_else(|p| p.into_inner()) = value;
                        tracing::info!("SIGHUP: reloaded {what}; new connections use it");
                    }
                    Err(e) => tracing::error!(
                        "SIGHUP: could not reload {what}, keeping the one in use: {e:#}"
                    ),
                }
            }
        });
        Ok(this)
    }

    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Every certificate in a PEM file (at least one).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
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

/// The private key in a PEM file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("read a PEM private key from {}", path.display()))
}

/// The CA certificates of a PEM file as a trust store.
pub fn trust_store(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in certificates(path)? {
        roots
            .add(ca)
            .with_context(|| format!("add CA certificate from {}", path.display()))?;
    }
    Ok(roots)
}

/// Serves `render()` (Prometheus/OpenMetrics text) at `http://addr/metrics` from a thread of its own, so a
/// scrape never waits on the daemon's runtime; returns the address bound (port 0 picks one).
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> Result<std::net::SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(|e| {
        anyhow::anyhow!("cannot listen for metrics on {addr} (--metrics-listen): {e}")
    })?;
    let bound = server
        .server_addr()
        .to_ip()
        .context("the metrics listener has no IP address")?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .expect("a valid header");
                    tiny_http::Response::from_string(render()).with_header(header)
                } else {
                    tiny_http::Response::from_string("walship: metrics are at /metrics\n")
                        .with_status_code(404)
                };
                if let Err(e) = request.respond(response) {
                    tracing::debug!(error = %e, "metrics: answering a scrape failed");
                }
            }
        })
        .context("start the metrics thread")?;
    tracing::info!("metrics at http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let e = super::certificates(&empty).unwrap_err();
        assert!(format!("{e:#}").contains("empty.pem"), "{e:#}");
        let e = super::private_key(&dir.path().join("missing.key")).unwrap_err();
        assert!(format!("{e:#}").contains("missing.key"), "{e:#}");
    }
}
