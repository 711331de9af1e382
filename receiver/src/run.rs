//! The receiver daemon (`walship-receiver run`) as a library: [`run`] opens the archive, starts the uploader,
//! the status writer and the metrics endpoint, serves senders on a listener it is given until `shutdown`, and
//! stops in order (sessions finish their last fsync, then a last upload round). `main.rs` only parses the
//! command line and starts a runtime; the tests start the same daemon in-process on a port-0 listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use walship_daemon::Reloadable;

use crate::archive::Archive;
use crate::server::{self, ServerOptions};
use crate::status::{report_live, StatusBoard};
use crate::store::{Store, StoreSpec};
use crate::upload::Uploader;

/// What the daemon needs, from the command line or a test.
pub struct RunConfig {
    /// The archive directory (created 0700 if missing).
    pub archive: PathBuf,
    /// The TLS server configuration (reloaded at SIGHUP by the daemon; fixed in tests).
    pub tls: Reloadable<rustls::ServerConfig>,
    /// The sessions' tunables.
    pub server: ServerOptions,
    /// The archive's object store, if it is copied to one.
    pub store: Option<StoreSpec>,
    /// How often the partial segment's durable part is uploaded.
    pub partial_upload_interval: Duration,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// Last upload round at shutdown: longer than this and the receiver stops without it (the local archive
/// holds everything).
const LAST_UPLOAD: Duration = Duration::from_secs(30);

/// Runs the receiver on `listener` until `shutdown` is cancelled. An error means the archive cannot be used
/// (it could not be opened, or a write or fsync failed and the receiver stopped, as PostgreSQL does).
pub async fn run(
    config: RunConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = match &config.store {
        Some(spec) => {
            let store = Store::open(spec)?;
            crate::upload::prepare(&store, &config.archive).await?;
            Some(store)
        }
        None => None,
    };
    let dir = config.archive.clone();
    let mut archive = tokio::task::spawn_blocking(move || Archive::open(&dir))
        .await
        .context("open the archive")??;
    let completions = Arc::new(tokio::sync::Notify::new());
    archive.announce_completions(completions.clone());
    tracing::info!(archive = %config.archive.display(), resume = ?archive.resume_points(), "archive opened");
    let uploads_stop = CancellationToken::new();
    let uploader = store.map(|store| start_uploader(store, &config, completions, &uploads_stop));
    let board = StatusBoard::default();
    if let Some(addr) = config.metrics_listen {
        serve_metrics(addr, config.archive.clone(), board.clone())?;
    }
    let local = listener.local_addr().context("local address")?;
    tracing::info!("listening on {local}");
    walship_daemon::notify_ready(&format!(
        "archiving into {}, listening on {local}",
        config.archive.display()
    ));
    let writer = tokio::spawn(board.clone().run_writer(
        config.archive.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    let served = server::serve(
        listener,
        config.tls,
        archive,
        config.server,
        board,
        shutdown,
    )
    .await;
    // the sessions are over: a last upload round, the partial included, then stop
    uploads_stop.cancel();
    if let Some(task) = uploader {
        if tokio::time::timeout(LAST_UPLOAD, task).await.is_err() {
            tracing::warn!(
                "stopping without the last upload to the object store ({} s passed); the local archive has it",
                LAST_UPLOAD.as_secs()
            );
        }
    }
    served?;
    let _ = writer.await;
    tracing::info!("receiver stopped");
    Ok(())
}

/// The uploader, woken by `completions`, until `stop`.
fn start_uploader(
    store: Store,
    config: &RunConfig,
    completions: Arc<tokio::sync::Notify>,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tracing::info!(
        store = store.url(),
        "uploading the archive to the object store"
    );
    let uploader = Uploader {
        store,
        dir: config.archive.clone(),
        partial_interval: config.partial_upload_interval.max(Duration::from_secs(1)),
        wake: completions,
    };
    tokio::spawn(uploader.run(stop.clone()))
}

/// Prometheus metrics at `addr`: the counters, and gauges from the in-memory status of `board`.
fn serve_metrics(addr: SocketAddr, dir: PathBuf, board: StatusBoard) -> Result<()> {
    let registry = crate::metrics::registry(move || match report_live(&dir, &board) {
        Ok(r) => Some(r.gauges()),
        Err(e) => {
            tracing::warn!("metrics: cannot read the archive: {e:#}");
            None
        }
    });
    walship_daemon::serve_metrics(addr, move || crate::metrics::encode(&registry))?;
    Ok(())
}
