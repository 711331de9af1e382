//! The TLS listener and one session per connected sender.
//!
//! Per session: the connection task reads frames. A WAL message that comes alone while the writer has nothing
//! in hand (the live path) it appends, fsyncs and acknowledges itself; otherwise it hands WAL to a bounded
//! channel, and a blocking writer task appends everything it can take from it, makes it durable with one fsync
//! (group commit, pipelined on a syncer thread under load) and publishes the durable position, which the
//! connection task sends as an `Ack`. The archive sits behind a lock both share (one session writes at a time). A
//! slow disk therefore slows the socket; memory stays bounded.
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
//! | room        | what it owns |
//! |-------------|--------------|
//! | this file   | the options, the listener ([`serve`], [`bind`]), admission of unauthenticated connections, the state sessions share |
//! | `handshake` | one connection up to its session: TLS, `Hello`, the identity, timeline and live-session checks, `Welcome` |
//! | `stream`    | the connection task of a session: frames in, `Ack`s out |
//! | `writer`    | the archive both share (`Desk`), the blocking writer and its syncer thread: appends, group commits, durable positions |
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

mod handshake;
mod stream;
mod writer;

use handshake::*;
use stream::*;
use writer::*;

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

/// Binds `addr`; a separate step so callers can learn the port (port 0 in tests).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))
}
