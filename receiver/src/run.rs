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
    let completions = Arc::new(tokio::sync::Notify::new());
    let uploads_stop = CancellationToken::new();
    let mut uploads = match &config.store {
        Some(spec) => Some(
            start_uploads(
                spec.clone(),
                &config,
                completions.clone(),
                uploads_stop.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let dir = config.archive.clone();
    let mut archive = tokio::task::spawn_blocking(move || Archive::open(&dir))
        .await
        .context("open the archive")??;
    archive.announce_completions(completions);
    tracing::info!(archive = %config.archive.display(), resume = ?archive.resume_points(), "archive opened");
    if let Some(u) = &mut uploads {
        u.go();
    }
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
    if let Some(u) = uploads {
        if tokio::time::timeout(LAST_UPLOAD, u.done).await.is_err() {
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

/// The object store's side of the daemon, on a thread of its own with a runtime of its own.
struct Uploads {
    /// Starts the uploads (once the archive is open); dropped unsent, the thread ends.
    go: Option<tokio::sync::oneshot::Sender<()>>,
    /// Fires when the uploader has finished its last round after `stop`.
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Uploads {
    fn go(&mut self) {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
    }
}

/// Opens and prepares the object store (its errors are returned before anything else starts) on a thread of
/// its own, with a runtime of its own, where the uploader then runs, woken by `completions`, until `stop`:
/// the store client's request signing, TLS and I/O never hold up a session's live path on the daemon's
/// runtime (one thread, see `main.rs`).
async fn start_uploads(
    spec: StoreSpec,
    config: &RunConfig,
    completions: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) -> Result<Uploads> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let dir = config.archive.clone();
    let partial_interval = config.partial_upload_interval.max(Duration::from_secs(1));
    std::thread::Builder::new()
        .name("walship-upload".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(
                        anyhow::Error::new(e).context("start the uploads' runtime")
                    ));
                    return;
                }
            };
            rt.block_on(async move {
                let store = match Store::open(&spec) {
                    Ok(store) => store,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = crate::upload::prepare(&store, &dir).await {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                if go_rx.await.is_err() {
                    return; // the daemon did not start
                }
                tracing::info!(
                    store = store.url(),
                    "uploading the archive to the object store"
                );
                let uploader = Uploader {
                    store,
                    dir,
                    partial_interval,
                    wake: completions,
                };
                uploader.run(stop).await;
                let _ = done_tx.send(());
            });
        })
        .context("start the upload thread")?;
    ready_rx
        .await
        .context("the upload thread ended before the object store was opened")??;
    Ok(Uploads {
        go: Some(go_tx),
        done: done_rx,
    })
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
