//! The TLS listener and one session per connected sender.
//!
//! Per session: the connection task reads frames and hands WAL to a bounded channel; a blocking writer task
//! owns the archive (through a lock, so only one session writes at a time), appends everything it can take
//! from the channel, makes it durable with one fsync (group commit) and publishes the durable position; the
//! connection task sends it as an `Ack`. A slow disk therefore slows the socket; memory stays bounded.
//!
//! A new session for the archive takes over from an older one (a sender that reconnects after a network cut
//! must not wait for the old connection to time out): the old session is cancelled, its writer finishes what
//! it took, and only then the new one gets the archive.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedMutexGuard};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};
use walship_protocol::message::Hello;
use walship_protocol::{
    Lsn, MessageCodec, ReceiverMessage, RefuseCode, SenderMessage, TimelineId, WalSegSize,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

use crate::archive::{Archive, Identity};
use crate::status::{SenderStatus, StatusBoard};

/// Tunables of the server, with defaults in one place.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Time for the TLS handshake and the `Hello`.
    pub handshake_timeout: Duration,
    /// A session with no frame for this long is closed (senders send keepalives every few seconds).
    pub idle_timeout: Duration,
    /// How long a new session waits for an old one to hand over the archive before it is refused as busy.
    pub takeover_timeout: Duration,
    /// Largest frame payload accepted.
    pub max_payload: u32,
    /// Connections allowed at once (handshakes included).
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            takeover_timeout: Duration::from_secs(30),
            max_payload: walship_protocol::DEFAULT_MAX_PAYLOAD,
            max_connections: 64,
        }
    }
}

struct Shared {
    archive: Arc<tokio::sync::Mutex<Archive>>,
    /// The token of the session that holds or is about to hold the archive.
    active: Mutex<Option<CancellationToken>>,
    opts: ServerOptions,
    acceptor: TlsAcceptor,
    status: StatusBoard,
}

/// Serves senders on `listener` until `shutdown` is cancelled, then waits for every session to finish its
/// last fsync.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    archive: Archive,
    opts: ServerOptions,
    status: StatusBoard,
    shutdown: CancellationToken,
) -> Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let shared = Arc::new(Shared {
        archive: Arc::new(tokio::sync::Mutex::new(archive)),
        active: Mutex::new(None),
        opts,
        acceptor,
        status,
    });
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    warn!(%peer, "too many connections; closing this one");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let shared = shared.clone();
                let token = shutdown.child_token();
                tracker.spawn(
                    async move {
                        let _permit = permit;
                        match session(&shared, tcp, token).await {
                            Ok(()) => info!("session ended"),
                            Err(e) => warn!("closing connection: {e:#}"),
                        }
                    }
                    .instrument(tracing::info_span!("session", %peer)),
                );
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

type Reader<S> = FramedRead<ReadHalf<S>, MessageCodec<SenderMessage, ReceiverMessage>>;
type Writer<S> = FramedWrite<WriteHalf<S>, MessageCodec<SenderMessage, ReceiverMessage>>;

async fn say<S: AsyncWrite>(writer: &mut Writer<S>, msg: ReceiverMessage) {
    // best effort: the peer may be gone already
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.send(msg)).await;
}

async fn refuse<S: AsyncWrite>(
    writer: &mut Writer<S>,
    code: RefuseCode,
    reason: String,
) -> anyhow::Error {
    say(
        writer,
        ReceiverMessage::Refuse {
            code,
            reason: reason.clone(),
        },
    )
    .await;
    anyhow!("refused sender: {reason}")
}

async fn session(
    shared: &Arc<Shared>,
    tcp: tokio::net::TcpStream,
    token: CancellationToken,
) -> Result<()> {
    let opts = &shared.opts;
    // TLS reads the socket in small pieces; a large buffer under it turns many small reads into few
    let tcp = tokio::io::BufReader::with_capacity(SOCKET_BUFFER, tcp);
    let tls = tokio::time::timeout(opts.handshake_timeout, shared.acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context(
            "TLS handshake failed (client without a certificate signed by --tls-client-ca?)",
        )?;
    let (rd, wr) = tokio::io::split(tls);
    let mut reader: Reader<_> = FramedRead::new(rd, MessageCodec::new(opts.max_payload));
    let mut writer: Writer<_> = FramedWrite::new(wr, MessageCodec::new(opts.max_payload));

    let hello = match tokio::time::timeout(opts.handshake_timeout, reader.next()).await {
        Err(_) => bail!("no Hello within {:?}", opts.handshake_timeout),
        Ok(None) => bail!("connection closed before Hello"),
        Ok(Some(Err(e))) => {
            say(
                &mut writer,
                ReceiverMessage::Error {
                    reason: e.to_string(),
                },
            )
            .await;
            return Err(e).context("malformed frame instead of Hello");
        }
        Ok(Some(Ok(SenderMessage::Hello(h)))) => h,
        Ok(Some(Ok(_))) => {
            let reason = "protocol violation: the first message must be Hello".to_string();
            say(
                &mut writer,
                ReceiverMessage::Error {
                    reason: reason.clone(),
                },
            )
            .await;
            bail!(reason);
        }
    };
    let span = tracing::info_span!("sender", name = %hello.sender_name, timeline = hello.timeline);
    async move {
        let version = PROTOCOL_VERSION_MAX.min(hello.version_max);
        if version < PROTOCOL_VERSION_MIN.max(hello.version_min) {
            let reason = format!(
                "no common protocol version: sender speaks {}..={}, this receiver {}..={}",
                hello.version_min, hello.version_max, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX
            );
            return Err(refuse(&mut writer, RefuseCode::UnsupportedVersion, reason).await);
        }
        let seg = match WalSegSize::new(hello.wal_segment_size as u64) {
            Ok(seg) => seg,
            Err(e) => return Err(refuse(&mut writer, RefuseCode::Other, e.to_string()).await),
        };
        if walship_protocol::wal::page_magic_for_version(hello.pg_version_num).is_none() {
            let reason = format!("PostgreSQL server_version_num {} is not supported (9.6 to 18 are)", hello.pg_version_num);
            return Err(refuse(&mut writer, RefuseCode::Other, reason).await);
        }

        // take the archive over from an older session
        let previous = shared.active.lock().map_err(|_| anyhow!("poisoned"))?.replace(token.clone());
        if let Some(previous) = previous {
            info!("a session holds the archive; asking it to hand over");
            previous.cancel();
        }
        let guard = match tokio::time::timeout(opts.takeover_timeout, shared.archive.clone().lock_owned()).await {
            Ok(guard) => guard,
            Err(_) => {
                let reason = format!("the archive is busy: the previous session did not hand it over within {:?}", opts.takeover_timeout);
                return Err(refuse(&mut writer, RefuseCode::Busy, reason).await);
            }
        };
        let offered = Identity { system_identifier: hello.system_identifier, wal_segment_size: seg, pg_version_num: hello.pg_version_num };
        let (guard, checked) = tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            let r = guard.check_or_pin_identity(offered);
            (guard, r)
        })
        .await
        .context("identity check task")?;
        if let Err(mismatch) = checked.context("pin archive identity")? {
            let code = match mismatch {
                crate::archive::IdentityMismatch::ForeignCluster { .. } => RefuseCode::ForeignCluster,
                crate::archive::IdentityMismatch::SegmentSize { .. } => RefuseCode::SegmentSizeMismatch,
                crate::archive::IdentityMismatch::MajorVersion { .. } => RefuseCode::Other,
            };
            return Err(refuse(&mut writer, code, mismatch.to_string()).await);
        }
        if let Some(latest) = guard.latest_timeline().filter(|t| *t > hello.timeline) {
            let reason = format!(
                "the archive already holds timeline {latest}, newer than this primary's timeline {}: this server was superseded by a failover and must not ship WAL into this archive",
                hello.timeline
            );
            return Err(refuse(&mut writer, RefuseCode::TimelineBehind, reason).await);
        }
        let resume = guard.resume_points();
        info!(?resume, version, pg_version_num = hello.pg_version_num, "sender accepted");
        writer
            .send(ReceiverMessage::Welcome { protocol_version: version, resume: resume.clone() })
            .await
            .context("send Welcome")?;
        let start = resume.iter().find(|(t, _)| *t == hello.timeline).map(|(t, l)| (*t, *l));
        stream(shared, &hello, guard, reader, writer, start, token).await
    }
    .instrument(span)
    .await
}

enum Cmd {
    Wal(walship_protocol::message::Wal),
    History {
        timeline: TimelineId,
        content: bytes::Bytes,
    },
}

/// Publishes the durable position of the session's timeline.
type AckTx = watch::Sender<Option<(TimelineId, Lsn)>>;

/// Read buffer under the TLS layer.
const SOCKET_BUFFER: usize = 256 << 10;

/// A WAL message this large means the sender is sending a backlog.
const LARGE_MESSAGE: usize = 512 << 10;
/// Most bytes one fsync covers.
const MAX_BATCH: usize = 64 << 20;
/// While catching up, how long and how often the writer waits for more before an fsync.
const CATCHUP_WAIT: std::time::Duration = std::time::Duration::from_micros(250);
const CATCHUP_WAITS: u32 = 8;

/// Applies commands to the archive, one fsync per batch. Runs on a blocking thread; not cancellation safe.
fn writer_loop(
    mut archive: OwnedMutexGuard<Archive>,
    mut rx: mpsc::Receiver<Cmd>,
    acks: AckTx,
    timeline: TimelineId,
) -> Result<()> {
    let result = (|| -> Result<()> {
        while let Some(cmd) = rx.blocking_recv() {
            let mut next = Some(cmd);
            let mut taken = 0usize;
            let mut waits = 0;
            loop {
                let Some(cmd) = next.take() else { break };
                let large = match cmd {
                    Cmd::Wal(w) => {
                        taken += w.bytes.len();
                        archive.append(w.timeline, w.start_lsn, &w.bytes)?;
                        w.bytes.len() >= LARGE_MESSAGE
                    }
                    Cmd::History { timeline, content } => {
                        archive.store_history(timeline, &content)?;
                        false
                    }
                };
                if taken >= MAX_BATCH {
                    break;
                }
                next = rx.try_recv().ok();
                // Large messages mean the sender is catching up: a moment's wait for the next one makes one
                // fsync cover many megabytes instead of one (live streaming sends small messages: no wait).
                while next.is_none() && large && waits < CATCHUP_WAITS && taken < MAX_BATCH / 2 {
                    waits += 1;
                    std::thread::sleep(CATCHUP_WAIT);
                    next = rx.try_recv().ok();
                }
            }
            if let Some(durable) = archive.sync(timeline)? {
                acks.send_replace(Some((timeline, durable)));
            }
        }
        Ok(())
    })();
    if result.is_err() {
        if let Err(e) = archive.reload() {
            warn!("re-reading the archive after an error failed too: {e:#}");
        }
    }
    result
}

async fn stream<S: AsyncRead + AsyncWrite + Send + 'static>(
    shared: &Arc<Shared>,
    hello: &Hello,
    guard: OwnedMutexGuard<Archive>,
    mut reader: Reader<S>,
    mut writer: Writer<S>,
    start: Option<(TimelineId, Lsn)>,
    token: CancellationToken,
) -> Result<()> {
    let timeline = hello.timeline;
    let (tx, rx) = mpsc::channel::<Cmd>(16);
    let (ack_tx, mut ack_rx) = watch::channel(start);
    let mut writer_task =
        tokio::task::spawn_blocking(move || writer_loop(guard, rx, ack_tx, timeline));
    let mut writer_done = false;
    let mut last_ack = start;
    shared.status.sender_connected(SenderStatus::new(
        &hello.sender_name,
        timeline,
        start.map(|s| s.1),
    ));

    let outcome: Result<()> = async {
        loop {
            tokio::select! {
                _ = token.cancelled() => {
                    info!("session ends: receiver shutting down or a newer session took over");
                    return Ok(());
                }
                done = &mut writer_task, if !writer_done => {
                    writer_done = true;
                    let err = match done {
                        Ok(Ok(())) => anyhow!("archive writer stopped"),
                        Ok(Err(e)) => e,
                        Err(e) => anyhow!("archive writer task failed: {e}"),
                    };
                    say(&mut writer, ReceiverMessage::Error { reason: format!("archive write failed: {err:#}") }).await;
                    return Err(err.context("archive write failed; nothing past the last acknowledgement was confirmed"));
                }
                changed = ack_rx.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let ack = *ack_rx.borrow_and_update();
                    if let Some((t, lsn)) = ack {
                        last_ack = ack;
                        shared.status.durable(lsn);
                        writer.send(ReceiverMessage::Ack { timeline: t, durable_lsn: lsn }).await.context("send Ack")?;
                    }
                }
                frame = tokio::time::timeout(shared.opts.idle_timeout, reader.next()) => {
                    let msg = match frame {
                        Err(_) => bail!("no message for {:?}; the sender is gone", shared.opts.idle_timeout),
                        Ok(None) => { info!("sender closed the connection"); return Ok(()); }
                        Ok(Some(Err(e))) => {
                            say(&mut writer, ReceiverMessage::Error { reason: e.to_string() }).await;
                            return Err(anyhow::Error::new(e).context("bad frame from sender"));
                        }
                        Ok(Some(Ok(msg))) => msg,
                    };
                    match msg {
                        SenderMessage::Wal(w) => {
                            if w.timeline != timeline {
                                let reason = format!("WAL for timeline {} in a session opened for timeline {timeline}", w.timeline);
                                say(&mut writer, ReceiverMessage::Error { reason: reason.clone() }).await;
                                bail!(reason);
                            }
                            if tx.send(Cmd::Wal(w)).await.is_err() {
                                continue; // the writer ended; its result is picked up above
                            }
                        }
                        SenderMessage::History { timeline: t, content } => {
                            if t > timeline {
                                bail!("history file of timeline {t} in a session opened for timeline {timeline}");
                            }
                            if tx.send(Cmd::History { timeline: t, content }).await.is_err() {
                                continue;
                            }
                        }
                        SenderMessage::Keepalive { primary_flush_lsn, sent_at_unix_micros, .. } => {
                            shared.status.keepalive(primary_flush_lsn, sent_at_unix_micros);
                            if let Some((t, lsn)) = last_ack {
                                writer.send(ReceiverMessage::Ack { timeline: t, durable_lsn: lsn }).await.context("send Ack")?;
                            }
                        }
                        SenderMessage::Hello(_) => {
                            let reason = "protocol violation: Hello in the middle of a session".to_string();
                            say(&mut writer, ReceiverMessage::Error { reason: reason.clone() }).await;
                            bail!(reason);
                        }
                    }
                }
            }
        }
    }
    .await;

    // Let the writer finish what it took (so it is durable) and hand the archive back.
    drop(tx);
    if !writer_done {
        match writer_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("archive write failed while closing the session: {e:#}"),
            Err(e) => warn!("archive writer task failed: {e}"),
        }
    }
    shared.status.sender_disconnected();
    outcome
}

/// Binds `addr`; a separate step so callers can learn the port (port 0 in tests).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))
}
