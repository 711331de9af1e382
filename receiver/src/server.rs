//! The TLS listener and one session per connected sender.
//!
//! Per session: the connection task reads frames and hands WAL to a bounded channel; a blocking writer task
//! owns the archive (through a lock, so only one session writes at a time), appends everything it can take
//! from the channel, makes it durable with one fsync (group commit) and publishes the durable position; the
//! connection task sends it as an `Ack`. A slow disk therefore slows the socket; memory stays bounded.
//!
//! Admission: a connection that has not completed its TLS handshake is *unauthenticated*. At most
//! `max_handshakes` of them exist at once; a new one evicts the oldest (never the other way round), and each
//! has `tls_timeout` to finish, so idle or half-open connections cannot crowd out a sender with a valid
//! certificate. Authenticated connections are limited separately (`max_sessions`).
//!
//! A new session for the archive takes over from an older one (a sender that reconnects after a network cut
//! must not wait for the old connection to time out), but only after its `Hello` has been validated against
//! the archive's identity and newest timeline: a foreign cluster or a superseded primary is refused without
//! disturbing the live session. The old session is then cancelled, its writer finishes what it took, and only
//! then the new one gets the archive.
//!
//! Every network stage has a deadline: the TLS handshake, the `Hello`, each frame (the idle timeout), and
//! every message sent (`send_timeout`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use walship_daemon::Reloadable;
use walship_protocol::message::Hello;
use walship_protocol::{
    Compression, Features, Lsn, MessageCodec, ReceiverMessage, RefuseCode, SenderMessage,
    TimelineId, WalSegSize, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

use crate::archive::{Archive, Identity, IdentityMismatch, Synced};
use crate::status::{SenderStatus, StatusBoard};

/// Tunables of the server, with defaults in one place.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Time for the TLS handshake of a new connection (short: until it completes, the peer is unknown).
    pub tls_timeout: Duration,
    /// Time for the `Hello` after the TLS handshake.
    pub handshake_timeout: Duration,
    /// A session with no frame for this long is closed (senders send keepalives every second).
    pub idle_timeout: Duration,
    /// Longest time one message to a sender may take to send (a stalled peer ends its session).
    pub send_timeout: Duration,
    /// How long a new session waits for an old one to hand over the archive before it is refused as busy.
    pub takeover_timeout: Duration,
    /// Largest frame payload accepted.
    pub max_payload: u32,
    /// Connections still in their TLS handshake allowed at once; a new one evicts the oldest.
    pub max_handshakes: usize,
    /// Authenticated connections (valid client certificate) allowed at once.
    pub max_sessions: usize,
    /// Let senders send zstd-compressed WAL (protocol 4).
    pub wire_compression: bool,
    /// Names (certificate CN or DNS subject alternative name) of the senders that may ship into the archive;
    /// empty: any certificate the client CA signed.
    pub allowed_senders: Vec<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            tls_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            takeover_timeout: Duration::from_secs(30),
            max_payload: walship_protocol::DEFAULT_MAX_PAYLOAD,
            max_handshakes: 64,
            max_sessions: 16,
            wire_compression: true,
            allowed_senders: Vec::new(),
        }
    }
}

/// What the server knows of the archive without taking its lock: enough to refuse a sender that must not
/// write to it before disturbing the session that holds it.
#[derive(Clone, Copy, Debug, Default)]
struct Known {
    identity: Option<Identity>,
    latest_timeline: Option<TimelineId>,
}

struct Shared {
    archive: Arc<tokio::sync::Mutex<Archive>>,
    /// The token of the session that holds or is about to hold the archive.
    active: Mutex<Option<CancellationToken>>,
    known: Mutex<Known>,
    opts: ServerOptions,
    /// The TLS configuration, reloaded at SIGHUP: each handshake takes the current one.
    tls: Reloadable<rustls::ServerConfig>,
    status: StatusBoard,
    /// Connections in their TLS handshake, oldest first.
    handshakes: Mutex<Admission>,
    sessions: Arc<tokio::sync::Semaphore>,
    /// Set when the archive cannot be trusted any more: the server stops with this error.
    fatal: Mutex<Option<anyhow::Error>>,
    stop: CancellationToken,
    /// When the session that holds the archive last received a message from its sender.
    heard: Mutex<Instant>,
}

/// A session that received a message this recently is alive: a new session does not take the archive from it
/// (senders send a keepalive every second).
const LIVE_SENDER: Duration = Duration::from_secs(3);
/// How long a new session waits for the one holding the archive to end by itself (a sender that reconnects has
/// just closed its old connection) before it looks at whether that one is alive.
const RECONNECT_GRACE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Admission {
    next_id: u64,
    pending: VecDeque<(u64, CancellationToken)>,
    evicted: u64,
    last_report: Option<Instant>,
}

impl Shared {
    /// Registers a new unauthenticated connection, evicting the oldest one when all places are taken.
    fn admit(&self) -> (u64, CancellationToken) {
        let mut a = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        if a.pending.len() >= self.opts.max_handshakes.max(1) {
            if let Some((_, oldest)) = a.pending.pop_front() {
                oldest.cancel();
                a.evicted += 1;
                let due = a
                    .last_report
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
                if due {
                    warn!(
                        evicted = a.evicted,
                        max_handshakes = self.opts.max_handshakes,
                        "too many connections without a completed TLS handshake: closing the oldest ones (a port scan or a flood?)"
                    );
                    a.last_report = Some(Instant::now());
                    a.evicted = 0;
                }
            }
        }
        let id = a.next_id;
        a.next_id += 1;
        let token = CancellationToken::new();
        a.pending.push_back((id, token.clone()));
        (id, token)
    }

    fn authenticated(&self, id: u64) {
        let mut a = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        a.pending.retain(|(i, _)| *i != id);
    }

    fn known(&self) -> Known {
        *self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the archive's identity and newest timeline (`accepted`: the timeline of a session about to
    /// write, newer than anything in the archive yet).
    fn learn(&self, archive: &Archive, accepted: Option<TimelineId>) {
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Known {
            identity: archive.identity(),
            latest_timeline: archive.latest_timeline().max(accepted),
        };
    }

    fn heard_now(&self) {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// How long the session holding the archive has received nothing.
    fn silent_for(&self) -> Duration {
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn fail(&self, e: anyhow::Error) {
        let mut f = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
        self.stop.cancel();
    }
}

/// Serves senders on `listener` until `shutdown` is cancelled, then waits for every session to finish its
/// last fsync. Returns an error when the archive became unusable (a write or fsync error that could not be
/// undone): the receiver must stop then, like PostgreSQL after a failed fsync of its WAL.
pub async fn serve(
    listener: TcpListener,
    tls: Reloadable<rustls::ServerConfig>,
    archive: Archive,
    opts: ServerOptions,
    status: StatusBoard,
    shutdown: CancellationToken,
) -> Result<()> {
    let stop = shutdown.child_token();
    let known = Known {
        identity: archive.identity(),
        latest_timeline: archive.latest_timeline(),
    };
    let shared = Arc::new(Shared {
        archive: Arc::new(tokio::sync::Mutex::new(archive)),
        active: Mutex::new(None),
        known: Mutex::new(known),
        sessions: Arc::new(tokio::sync::Semaphore::new(opts.max_sessions.max(1))),
        opts,
        tls,
        status,
        handshakes: Mutex::new(Admission::default()),
        fatal: Mutex::new(None),
        heard: Mutex::new(Instant::now()),
        stop: stop.clone(),
    });
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let shared = shared.clone();
                let token = stop.child_token();
                tracker.spawn(
                    async move {
                        match session(&shared, tcp, token).await {
                            Ok(()) => info!("session ended"),
                            Err(SessionError::Unauthenticated(e)) => {
                                error_count("tls");
                                tracing::debug!("closing connection: {e:#}")
                            }
                            Err(SessionError::Closed(e)) => {
                                error_count("session");
                                warn!("closing connection: {e:#}")
                            }
                            Err(SessionError::Fatal(e)) => {
                                error_count("archive");
                                tracing::error!("closing connection: {e:#}");
                                shared.fail(e);
                            }
                        }
                    }
                    .instrument(tracing::info_span!("session", %peer)),
                );
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    match fatal {
        Some(e) => Err(e.context("the receiver stopped: the archive cannot be trusted")),
        None => Ok(()),
    }
}

fn error_count(kind: &'static str) {
    crate::metrics::METRICS
        .errors
        .get_or_create(&crate::metrics::Kind { kind })
        .inc();
}

/// How a connection ended.
/// The names a certificate (DER) stands for: its subject's common names and its DNS subject alternative
/// names. Empty for a certificate that does not parse.
fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    names
}

enum SessionError {
    /// Before the TLS handshake completed (a stranger, a scan, an evicted idle connection): logged at debug.
    Unauthenticated(anyhow::Error),
    /// An authenticated session ended on an error.
    Closed(anyhow::Error),
    /// The archive cannot be trusted any more: the receiver stops.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for SessionError {
    fn from(e: anyhow::Error) -> Self {
        SessionError::Closed(e)
    }
}

type Reader<S> = FramedRead<ReadHalf<S>, MessageCodec<SenderMessage, ReceiverMessage>>;
type Writer<S> = FramedWrite<WriteHalf<S>, MessageCodec<SenderMessage, ReceiverMessage>>;

async fn say<S: AsyncWrite>(writer: &mut Writer<S>, msg: ReceiverMessage) {
    // best effort: the peer may be gone already
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.send(msg)).await;
}

/// Sends `msg` within `deadline`.
async fn send<S: AsyncWrite>(
    writer: &mut Writer<S>,
    msg: ReceiverMessage,
    deadline: Duration,
    what: &str,
) -> Result<()> {
    match tokio::time::timeout(deadline, writer.send(msg)).await {
        Ok(r) => r.with_context(|| format!("send {what}")),
        Err(_) => {
            bail!("sending {what} did not complete within {deadline:?}: the sender stopped reading")
        }
    }
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

fn refuse_code(m: &IdentityMismatch) -> RefuseCode {
    match m {
        IdentityMismatch::ForeignCluster { .. } => RefuseCode::ForeignCluster,
        IdentityMismatch::SegmentSize { .. } => RefuseCode::SegmentSizeMismatch,
        IdentityMismatch::MajorVersion { .. } => RefuseCode::Other,
    }
}

fn superseded(latest: TimelineId, hello: &Hello) -> String {
    format!(
        "the archive already holds timeline {latest}, newer than this primary's timeline {}: this server was superseded by a failover and must not ship WAL into this archive",
        hello.timeline
    )
}

async fn session(
    shared: &Arc<Shared>,
    tcp: tokio::net::TcpStream,
    token: CancellationToken,
) -> Result<(), SessionError> {
    let opts = &shared.opts;
    // a small read buffer until the peer has authenticated (see crate::socket)
    let tcp = crate::socket::SocketBuf::new(tcp);
    let (id, evict) = shared.admit();
    let accepted = tokio::select! {
        _ = evict.cancelled() => Err(anyhow!("evicted before completing the TLS handshake: newer connections needed the place")),
        _ = token.cancelled() => Err(anyhow!("the receiver is shutting down")),
        r = tokio::time::timeout(opts.tls_timeout, TlsAcceptor::from(shared.tls.current()).accept(tcp)) => match r {
            Err(_) => Err(anyhow!("no TLS handshake within {:?}", opts.tls_timeout)),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context(
                "TLS handshake failed (client without a certificate signed by --tls-client-ca?)",
            )),
            Ok(Ok(tls)) => Ok(tls),
        },
    };
    shared.authenticated(id);
    let mut tls = accepted.map_err(SessionError::Unauthenticated)?;
    if !opts.allowed_senders.is_empty() {
        // a certificate of the CA that is not named: closed without a word about the archive
        let names = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| certificate_names(c.as_ref()))
            .unwrap_or_default();
        if !names.iter().any(|n| opts.allowed_senders.contains(n)) {
            return Err(SessionError::Closed(anyhow!(
                "client certificate {names:?} is not among --allow-sender {:?}; closing the connection",
                opts.allowed_senders
            )));
        }
    }
    let Ok(_permit) = shared.sessions.clone().try_acquire_owned() else {
        return Err(SessionError::Closed(anyhow!(
            "too many authenticated connections ({}); closing this one",
            opts.max_sessions
        )));
    };
    // an authenticated sender of this archive: now the large buffer that its stream of WAL reads through
    tls.get_mut().0.enlarge(SOCKET_BUFFER);
    let (rd, wr) = tokio::io::split(tls);
    let mut reader: Reader<_> = FramedRead::new(rd, MessageCodec::new(opts.max_payload));
    let mut writer: Writer<_> = FramedWrite::new(wr, MessageCodec::new(opts.max_payload));

    let hello = match tokio::time::timeout(opts.handshake_timeout, reader.next()).await {
        Err(_) => return Err(anyhow!("no Hello within {:?}", opts.handshake_timeout).into()),
        Ok(None) => return Err(anyhow!("connection closed before Hello").into()),
        Ok(Some(Err(e))) => {
            say(
                &mut writer,
                ReceiverMessage::Error {
                    reason: e.to_string(),
                },
            )
            .await;
            return Err(anyhow::Error::new(e)
                .context("malformed frame instead of Hello")
                .into());
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
            return Err(anyhow!(reason).into());
        }
    };
    let span = tracing::info_span!("sender", name = %hello.sender_name, timeline = hello.timeline);
    async move {
        let Some(features) = Features::negotiate(hello.version_min, hello.version_max) else {
            let reason = format!(
                "no common protocol version: sender speaks {}..={}, this receiver {}..={}",
                hello.version_min, hello.version_max, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX
            );
            return Err(refuse(&mut writer, RefuseCode::UnsupportedVersion, reason).await.into());
        };
        let version = features.version();
        let seg = match WalSegSize::new(hello.wal_segment_size as u64) {
            Ok(seg) => seg,
            Err(e) => return Err(refuse(&mut writer, RefuseCode::Other, e.to_string()).await.into()),
        };
        if walship_protocol::wal::page_magic_for_version(hello.pg_version_num).is_none() {
            let reason = format!("PostgreSQL server_version_num {} is not supported (9.6 to 18 are)", hello.pg_version_num);
            return Err(refuse(&mut writer, RefuseCode::Other, reason).await.into());
        }
        let offered = Identity { system_identifier: hello.system_identifier, wal_segment_size: seg, pg_version_num: hello.pg_version_num };

        // Validate before disturbing anyone: a sender that must not write here is refused while the live
        // session goes on.
        let known = shared.known();
        if let Some(Err(mismatch)) = known.identity.map(|id| id.admits(&offered)) {
            warn!("refused a sender: {mismatch}");
            return Err(refuse(&mut writer, refuse_code(&mismatch), mismatch.for_peer()).await.into());
        }
        if let Some(latest) = known.latest_timeline.filter(|t| *t > hello.timeline) {
            return Err(refuse(&mut writer, RefuseCode::TimelineBehind, superseded(latest, &hello)).await.into());
        }

        // A live session keeps the archive: two primaries of one cluster (a restored copy started as a
        // primary, a split brain) must not take turns writing it. A session whose sender is gone or silent
        // hands it over.
        let guard = match shared.archive.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                let waited = tokio::select! {
                    _ = token.cancelled() => return Err(anyhow!("the receiver is shutting down").into()),
                    g = tokio::time::timeout(RECONNECT_GRACE, shared.archive.clone().lock_owned()) => g.ok(),
                };
                match waited {
                    Some(guard) => guard,
                    None => {
                        let silent = shared.silent_for();
                        if silent < LIVE_SENDER {
                            let reason = format!(
                                "another sender is streaming into this archive (its last message came {} ms ago): an archive takes WAL from one primary at a time. \
                                 The same server reconnecting gets in once its old connection has been silent for {LIVE_SENDER:?}; \
                                 another server with this cluster's system identifier (a restored copy started as a primary, a split brain) must not ship here: stop its sender",
                                silent.as_millis()
                            );
                            warn!("refused a second sender: {reason}");
                            return Err(refuse(&mut writer, RefuseCode::Busy, reason).await.into());
                        }
                        info!(silent_ms = silent.as_millis() as u64, "a silent session holds the archive; asking it to hand over");
                        let previous = shared.active.lock().unwrap_or_else(|p| p.into_inner()).take();
                        if let Some(previous) = previous {
                            previous.cancel();
                        }
                        tokio::select! {
                            _ = token.cancelled() => return Err(anyhow!("the receiver is shutting down").into()),
                            g = tokio::time::timeout(opts.takeover_timeout, shared.archive.clone().lock_owned()) => match g {
                                Ok(guard) => guard,
                                Err(_) => {
                                    let reason = format!("the archive is busy: the previous session did not hand it over within {:?}", opts.takeover_timeout);
                                    return Err(refuse(&mut writer, RefuseCode::Busy, reason).await.into());
                                }
                            },
                        }
                    }
                }
            }
        };
        shared.active.lock().unwrap_or_else(|p| p.into_inner()).replace(token.clone());
        shared.heard_now();
        // the authoritative check, under the archive's lock (pins the identity on first contact)
        let (guard, checked) = tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            let r = guard.check_or_pin_identity(offered);
            (guard, r)
        })
        .await
        .context("identity check task")?;
        shared.learn(&guard, None);
        if let Err(mismatch) = checked.context("pin archive identity")? {
            warn!("refused a sender: {mismatch}");
            return Err(refuse(&mut writer, refuse_code(&mismatch), mismatch.for_peer()).await.into());
        }
        if let Some(latest) = guard.latest_timeline().filter(|t| *t > hello.timeline) {
            return Err(refuse(&mut writer, RefuseCode::TimelineBehind, superseded(latest, &hello)).await.into());
        }
        // after a failover the old primary's timeline is fenced (its end went to recovery)
        if let Some(handover) = guard.fenced(hello.timeline).context("read the failover state")? {
            let reason = crate::archive::fence_message(&handover);
            warn!("refused a sender of a fenced timeline: {reason}");
            return Err(refuse(&mut writer, RefuseCode::TimelineBehind, reason).await.into());
        }
        shared.learn(&guard, Some(hello.timeline));
        // a sender connected: the primary (or its successor) is up again
        let guard = tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            if let Err(e) = guard.clear_primary_down() {
                warn!("{e:#}");
            }
            guard
        })
        .await
        .context("clear the primary's down state")?;
        let mut guard = guard;
        let resume = guard.begin_session();
        info!(?resume, version, pg_version_num = hello.pg_version_num, "sender accepted");
        crate::metrics::METRICS.sessions.inc();
        let compression = if features.wire_compression() && opts.wire_compression { Compression::Zstd } else { Compression::None };
        send(&mut writer, ReceiverMessage::Welcome { protocol_version: version, resume: resume.clone(), compression }, opts.send_timeout, "Welcome").await?;
        let start = resume.iter().find(|(t, _)| *t == hello.timeline).map(|(t, l)| (*t, *l));
        stream(shared, &hello, features, guard, reader, writer, start, token).await
    }
    .instrument(span)
    .await
}

enum Cmd {
    Wal(walship_protocol::message::Wal),
    /// The primary has flushed its WAL up to here (protocol 3).
    Confirm {
        timeline: TimelineId,
        flush: Lsn,
    },

    History {
        timeline: TimelineId,
        content: bytes::Bytes,
    },
    PrimaryDown {
        timeline: TimelineId,
        wal_end: Lsn,
        since_unix_micros: u64,
    },
}

/// Publishes the durable and confirmed positions of the session's timeline.
type AckTx = watch::Sender<Option<(TimelineId, Synced)>>;

/// Read buffer under the TLS layer of an authenticated session: TLS reads the socket in small pieces, and a
/// large buffer under it turns many small reads into few.
const SOCKET_BUFFER: usize = 256 << 10;

/// A WAL message this large means the sender is sending a backlog.
const LARGE_MESSAGE: usize = 512 << 10;
/// Most bytes one fsync covers.
const MAX_BATCH: usize = 64 << 20;
/// While catching up, how long and how often the writer waits for more before an fsync.
const CATCHUP_WAIT: std::time::Duration = std::time::Duration::from_micros(250);
const CATCHUP_WAITS: u32 = 8;

/// Applies commands to the archive. Runs on a blocking thread; not cancellation safe.
///
/// Group commit, pipelined: the writer appends WAL as it arrives, while a syncer thread runs the fdatasync of
/// everything appended so far, outside the archive's lock, then counts it durable and acknowledges it, and at
/// once starts the next sync if more has been appended meanwhile. So WAL lands in the archive's file without
/// waiting for the fsync in progress, and under load the syncs follow each other with no hand-over between
/// threads.
fn writer_loop(
    archive: OwnedMutexGuard<Archive>,
    mut rx: mpsc::Receiver<Cmd>,
    acks: AckTx,
    timeline: TimelineId,
    features: Features,
) -> Result<(), WriterError> {
    let state = std::sync::Mutex::new(SyncState {
        archive,
        done: false,
        ack_due: false,
        failed: None,
    });
    let wake = std::sync::Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let started = std::thread::scope(|scope| {
        let syncer = std::thread::Builder::new()
            .name("walship-fsync".into())
            .spawn_scoped(scope, || syncer_loop(&state, &wake, &acks, timeline));
        if let Err(e) = syncer {
            return Err(anyhow!("start the fsync thread: {e}"));
        }
        let applied = (|| -> Result<()> {
            while let Some(cmd) = rx.blocking_recv() {
                let mut next = Some(cmd);
                let mut taken = 0usize;
                let mut waits = 0;
                loop {
                    let Some(cmd) = next.take() else { break };
                    let large = {
                        let mut g = lock();
                        if g.failed.is_some() {
                            return Ok(()); // the syncer stopped on an error, taken up below
                        }
                        apply(&mut g.archive, cmd, features, &mut taken)?
                    };
                    if taken >= MAX_BATCH {
                        break;
                    }
                    next = rx.try_recv().ok();
                    // Large messages mean the sender is catching up: a moment's wait for the next one makes
                    // one fsync cover many megabytes instead of one (live streaming sends small messages).
                    while next.is_none() && large && waits < CATCHUP_WAITS && taken < MAX_BATCH / 2
                    {
                        waits += 1;
                        std::thread::sleep(CATCHUP_WAIT);
                        next = rx.try_recv().ok();
                    }
                }
                lock().ack_due = true;
                wake.notify_one();
            }
            Ok(())
        })();
        let mut g = lock();
        g.done = true;
        if let Err(e) = applied {
            g.failed.get_or_insert(e);
        }
        drop(g);
        wake.notify_one();
        Ok(())
    });
    let mut g = state.into_inner().unwrap_or_else(|p| p.into_inner());
    let failure = match started {
        Err(e) => Some(e),
        Ok(()) => g.failed.take(),
    };
    let Some(e) = failure else { return Ok(()) };
    // nothing written since the last good fsync is trusted: undo it, so the sender resends it
    match g.archive.recover_after_error() {
        Ok(()) => {
            info!(
                resume = ?g.archive.resume_points(),
                "archive rolled back to its last durable position after: {e:#}"
            );
            Err(WriterError::Recovered(e))
        }
        Err(again) => Err(WriterError::Unrecoverable(
            e.context(format!("undoing it failed: {again:#}")),
        )),
    }
}

/// What the writer and the syncer of a session share, under one lock.
struct SyncState {
    archive: OwnedMutexGuard<Archive>,
    /// The writer has applied its last command.
    done: bool,
    /// Commands were applied since the last acknowledgement (WAL, or only a confirmation).
    ack_due: bool,
    /// The first error of either thread: both stop, the archive is rolled back.
    failed: Option<anyhow::Error>,
}

/// Applies one command; returns whether it was a large WAL message (a catch-up).
fn apply(archive: &mut Archive, cmd: Cmd, features: Features, taken: &mut usize) -> Result<bool> {
    Ok(match cmd {
        Cmd::Wal(w) => {
            *taken += w.bytes.len();
            archive.append(w.timeline, w.start_lsn, &w.bytes)?;
            if !features.ship_on_write() {
                // before shipping on write a sender sends only WAL the primary has flushed
                archive.confirm(w.timeline, w.end_lsn());
            }
            w.bytes.len() >= LARGE_MESSAGE
        }
        Cmd::Confirm { timeline, flush } => {
            archive.confirm(timeline, flush);
            false
        }
        Cmd::History { timeline, content } => {
            archive.store_history(timeline, &content)?;
            false
        }
        Cmd::PrimaryDown {
            timeline,
            wal_end,
            since_unix_micros,
        } => {
            let state = archive.record_primary_down(timeline, wal_end, since_unix_micros)?;
            if state.complete() {
                info!(%wal_end, "the primary is down; the archive holds all of its WAL (up to {wal_end})");
            } else {
                warn!(%wal_end, archived = %state.archived_end, "the primary is down; the archive does not hold all of its WAL");
            }
            false
        }
    })
}

/// The syncer thread of a session: whenever something was appended (or confirmed), makes it durable and
/// acknowledges it. The fdatasync runs without the lock, so the writer appends meanwhile. Ends when the
/// writer is done and everything is durable, or at the first error.
fn syncer_loop(
    state: &std::sync::Mutex<SyncState>,
    wake: &std::sync::Condvar,
    acks: &AckTx,
    timeline: TimelineId,
) {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let mut g = lock();
    loop {
        while !g.ack_due && !g.archive.unsynced() && !g.done && g.failed.is_none() {
            g = wake.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.failed.is_some() || (g.done && !g.ack_due && !g.archive.unsynced()) {
            return;
        }
        g.ack_due = false;
        let synced = if g.archive.unsynced() {
            crate::archive::crash_point!("receiver-written-before-fsync");
            let job = g.archive.prepare_sync();
            drop(g);
            let job = job.map(|job| {
                let started = std::time::Instant::now();
                let r = job.run();
                crate::metrics::METRICS
                    .fsync_seconds
                    .observe(started.elapsed().as_secs_f64());
                (job, r)
            });
            g = lock();
            job.and_then(|(job, r)| g.archive.finish_sync(timeline, job, r))
        } else {
            // nothing to fsync (a confirmation, WAL sent twice): record it and acknowledge
            g.archive.sync(timeline)
        };
        match synced {
            Ok(Some(synced)) => {
                crate::archive::crash_point!("receiver-fsynced-before-ack");
                acks.send_replace(Some((timeline, synced)));
            }
            Ok(None) => {}
            Err(e) => {
                g.failed.get_or_insert(e);
                return;
            }
        }
    }
}

/// How the archive writer of a session ended.
#[derive(Debug)]
enum WriterError {
    /// A write or fsync failed and the archive was rolled back to its last durable position: the session
    /// ends, the receiver stays up, the sender resends.
    Recovered(anyhow::Error),
    /// The archive could not be brought back to a known durable state: the receiver must stop.
    Unrecoverable(anyhow::Error),
}

#[allow(clippy::too_many_arguments)]
async fn stream<S: AsyncRead + AsyncWrite + Send + 'static>(
    shared: &Arc<Shared>,
    hello: &Hello,
    features: Features,
    guard: OwnedMutexGuard<Archive>,
    mut reader: Reader<S>,
    mut writer: Writer<S>,
    start: Option<(TimelineId, Lsn)>,
    token: CancellationToken,
) -> Result<(), SessionError> {
    let timeline = hello.timeline;
    let send_timeout = shared.opts.send_timeout;
    let (tx, rx) = mpsc::channel::<Cmd>(16);
    let start = start.map(|(t, l)| {
        (
            t,
            Synced {
                durable: l,
                confirmed: l,
            },
        )
    });
    let (ack_tx, mut ack_rx) = watch::channel(start);
    let mut writer_task =
        tokio::task::spawn_blocking(move || writer_loop(guard, rx, ack_tx, timeline, features));
    let mut writer_result = None;
    let mut last_ack = start;
    // WAL received while the writer is busy (fsyncing): merged into one command, so that the next fsync
    // covers all of it however small the messages are (a sender shipping on write sends one per commit)
    let mut pending = Pending::default();
    shared.status.sender_connected(SenderStatus::new(
        &hello.sender_name,
        timeline,
        start.map(|s| s.1.durable),
    ));

    let outcome: Result<()> = async {
        loop {
            tokio::select! {
                _ = token.cancelled() => {
                    info!("session ends: receiver shutting down or a newer session took over");
                    return Ok(());
                }
                done = &mut writer_task, if writer_result.is_none() => {
                    let done = done.unwrap_or_else(|e| Err(WriterError::Unrecoverable(anyhow!("archive writer task failed: {e}"))));
                    let reason = match &done {
                        Ok(()) => "archive writer stopped".to_string(),
                        Err(WriterError::Recovered(e) | WriterError::Unrecoverable(e)) => format!("archive write failed: {e:#}"),
                    };
                    writer_result = Some(done);
                    say(&mut writer, ReceiverMessage::Error { reason: reason.clone() }).await;
                    bail!("{reason}; nothing past the last acknowledgement was confirmed");
                }
                permit = tx.reserve(), if pending.is_some() => {
                    if let (Ok(permit), Some(w)) = (permit, pending.take()) {
                        permit.send(Cmd::Wal(w));
                    }
                }
                changed = ack_rx.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let ack = *ack_rx.borrow_and_update();
                    if let Some((t, synced)) = ack {
                        last_ack = ack;
                        shared.status.durable(synced.durable);
                        send(&mut writer, ack_message(t, synced, features), send_timeout, "Ack").await?;
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
                        Ok(Some(Ok(SenderMessage::WalZstd(z)))) => {
                            if !features.wire_compression() || !shared.opts.wire_compression {
                                let reason = "compressed WAL, which this session did not allow".to_string();
                                say(&mut writer, ReceiverMessage::Error { reason: reason.clone() }).await;
                                bail!(reason);
                            }
                            crate::metrics::METRICS.wire_wal_bytes.inc_by(z.data.len() as u64);
                            match z.decompress(shared.opts.max_payload as usize) {
                                Ok(w) => SenderMessage::Wal(w),
                                Err(e) => {
                                    say(&mut writer, ReceiverMessage::Error { reason: e.to_string() }).await;
                                    return Err(anyhow::Error::new(e).context("bad compressed WAL from sender"));
                                }
                            }
                        }
                        Ok(Some(Ok(msg))) => {
                            if let SenderMessage::Wal(w) = &msg {
                                crate::metrics::METRICS.wire_wal_bytes.inc_by(w.bytes.len() as u64);
                            }
                            msg
                        }
                    };
                    shared.heard_now();
                    match msg {
                        SenderMessage::Wal(w) => {
                            if w.timeline != timeline {
                                let reason = format!("WAL for timeline {} in a session opened for timeline {timeline}", w.timeline);
                                say(&mut writer, ReceiverMessage::Error { reason: reason.clone() }).await;
                                bail!(reason);
                            }
                            if let Some(w) = pending.merge(w) {
                                // not contiguous, or the merged command is large: the writer takes it first
                                if tx.send(Cmd::Wal(w)).await.is_err() {
                                    continue; // the writer ended; its result is picked up above
                                }
                            }
                            // the only producer: with room now, the send succeeds; without, merge on
                            if tx.capacity() == 0 {
                                continue;
                            }
                            if let Some(w) = pending.take() {
                                match tx.try_send(Cmd::Wal(w)) {
                                    Ok(()) => {}
                                    Err(mpsc::error::TrySendError::Full(Cmd::Wal(w))) => pending.put_back(w),
                                    Err(_) => continue,
                                }
                            }
                        }
                        SenderMessage::History { timeline: t, content } => {
                            if t > timeline {
                                bail!("history file of timeline {t} in a session opened for timeline {timeline}");
                            }
                            pending.flush(&tx).await;
                            if tx.send(Cmd::History { timeline: t, content }).await.is_err() {
                                continue;
                            }
                        }
                        SenderMessage::Keepalive { primary_flush_lsn, sent_at_unix_micros, .. } => {
                            shared.status.keepalive(primary_flush_lsn, sent_at_unix_micros);
                            if features.ship_on_write() {
                                // in order with the WAL before it; the writer acknowledges it
                                pending.flush(&tx).await;
                                let confirm = Cmd::Confirm { timeline, flush: primary_flush_lsn };
                                if tx.send(confirm).await.is_err() {
                                    continue;
                                }
                            } else if let Some((t, synced)) = last_ack {
                                send(&mut writer, ack_message(t, synced, features), send_timeout, "Ack").await?;
                            }
                        }
                        SenderMessage::PrimaryDown { timeline: t, wal_end, down_since_unix_micros } => {
                            if t != timeline {
                                bail!("PrimaryDown for timeline {t} in a session opened for timeline {timeline}");
                            }
                            shared.status.primary_down(wal_end, down_since_unix_micros);
                            pending.flush(&tx).await;
                            if tx.send(Cmd::PrimaryDown { timeline: t, wal_end, since_unix_micros: down_since_unix_micros }).await.is_err() {
                                continue;
                            }
                        }
                        // decompressed into a Wal above
                        SenderMessage::WalZstd(_) => bail!("internal: compressed WAL was not decompressed"),
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

    // Let the writer finish what it took (so it is durable) and hand the archive back. WAL received but not
    // yet handed to the writer is valid (however the session ended): it is written too.
    pending.flush(&tx).await;
    drop(tx);
    let writer_result = match writer_result {
        Some(r) => r,
        None => {
            let r = writer_task.await.unwrap_or_else(|e| {
                Err(WriterError::Unrecoverable(anyhow!(
                    "archive writer task failed: {e}"
                )))
            });
            // tell a sender that is still listening (a graceful stop) what became durable at the end
            let last = *ack_rx.borrow_and_update();
            if let Some((t, synced)) = last.filter(|_| last != last_ack) {
                shared.status.durable(synced.durable);
                say(&mut writer, ack_message(t, synced, features)).await;
            }
            r
        }
    };
    shared.status.sender_disconnected();
    match writer_result {
        Err(WriterError::Unrecoverable(e)) => Err(SessionError::Fatal(e)),
        Err(WriterError::Recovered(e)) if outcome.is_ok() => {
            warn!("archive write failed while closing the session: {e:#}");
            Ok(())
        }
        _ => outcome.map_err(SessionError::Closed),
    }
}

/// The `Ack` for `synced` in a session with `features`.
fn ack_message(timeline: TimelineId, synced: Synced, features: Features) -> ReceiverMessage {
    ReceiverMessage::Ack {
        timeline,
        durable_lsn: synced.durable,
        confirmed_lsn: features.ship_on_write().then_some(synced.confirmed),
    }
}

/// Contiguous WAL received while the writer was busy, merged into one command.
#[derive(Default)]
struct Pending {
    /// Timeline, first position and bytes (grown in place).
    wal: Option<(TimelineId, Lsn, bytes::BytesMut)>,
}

/// The most WAL merged into one command.
const MERGE_MAX: usize = 4 << 20;

impl Pending {
    /// Adds `w`; returns what must go to the writer first (the merged WAL, when `w` does not continue it or
    /// would make it too large).
    fn merge(
        &mut self,
        w: walship_protocol::message::Wal,
    ) -> Option<walship_protocol::message::Wal> {
        if let Some((t, start, buf)) = &mut self.wal {
            if *t == w.timeline
                && start.0 + buf.len() as u64 == w.start_lsn.0
                && buf.len() + w.bytes.len() <= MERGE_MAX
            {
                buf.extend_from_slice(&w.bytes);
                return None;
            }
        }
        let first = self.take();
        let mut buf = bytes::BytesMut::with_capacity(w.bytes.len().max(64 << 10));
        buf.extend_from_slice(&w.bytes);
        self.wal = Some((w.timeline, w.start_lsn, buf));
        first
    }

    fn is_some(&self) -> bool {
        self.wal.is_some()
    }

    fn take(&mut self) -> Option<walship_protocol::message::Wal> {
        let (timeline, start_lsn, buf) = self.wal.take()?;
        Some(walship_protocol::message::Wal {
            timeline,
            start_lsn,
            bytes: buf.freeze(),
        })
    }

    /// Gives back a command the writer had no room for (it is merged with what comes next).
    fn put_back(&mut self, w: walship_protocol::message::Wal) {
        debug_assert!(self.wal.is_none());
        let mut buf = bytes::BytesMut::with_capacity(w.bytes.len().max(64 << 10));
        buf.extend_from_slice(&w.bytes);
        self.wal = Some((w.timeline, w.start_lsn, buf));
    }

    /// Hands the merged WAL to the writer (waiting for room), so what follows stays in order.
    async fn flush(&mut self, tx: &mpsc::Sender<Cmd>) {
        if let Some(w) = self.take() {
            // an error means the writer ended; the session picks its result up
            let _ = tx.send(Cmd::Wal(w)).await;
        }
    }
}

/// Binds `addr`; a separate step so callers can learn the port (port 0 in tests).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))
}
