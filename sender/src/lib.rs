//! walship sender: reads WAL straight out of the segment files in `pg_wal/` as PostgreSQL writes it, validates
//! it, and streams it to a walship receiver over TLS; the primary's flush position confirms what was shipped.
//!
//! | module          | what it owns |
//! |-----------------|--------------|
//! | this file       | the configuration, [`run`] and [`start`] (the reconnect loop, backoff with jitter), the session state it shares with the rooms below |
//! | `session`       | connecting to PostgreSQL and the receiver, the handshake, where to resume |
//! | `streaming`     | the streaming loop: events, shipping within the window, flush polling and confirmation, the slot |
//! | `drain`         | a stopped primary: shipping what is left in `pg_wal/`, confirming only what PostgreSQL proved flushed |
//! | `server_state`  | whether the primary's server is down (positive evidence only) |
//! | [`postgres`]    | the tokio-postgres connection: version dialect, identity, segment size, flush position |
//! | [`conninfo`]    | libpq connection strings, service and password files, the PG* environment |
//! | [`wal_reader`]  | reading and validating segment files |
//! | [`scout`]       | the record walker over written, not yet flushed WAL |
//! | [`link`]        | the TLS connection to the receiver, the window, the graceful close |
//! | [`state`]       | what the sender is doing, published on a watch channel ([`start`]) for `check` and the logs |
//! | [`error`]       | failures a reconnect cannot fix ([`error::Unfixable`]), decided where they are found |
//! | [`check`]       | `walship-sender check` |
//! | [`metrics`]     | the Prometheus metrics |
//!
//! The loop ([`run`]): connect to PostgreSQL and to the receiver, say `Hello`, resume where the receiver's
//! `Welcome` says its confirmed, durable WAL ends, then repeat. With a receiver that takes WAL on write (protocol 3+,
//! see `walship_protocol::Features`):
//! on an inotify write event the scout walks the new records and every complete, CRC-valid one is sent at once,
//! before PostgreSQL's fsync; the flush position is read off the critical path (at most every 5 ms while
//! something is unconfirmed) and sent in a `Keepalive`, which confirms it. With an older receiver only flushed
//! WAL is sent, and the flush position is polled precisely after each event. Either way at most `window` bytes
//! are unacknowledged. Any network or PostgreSQL error restarts the session after a backoff; the receiver's
//! `Welcome` says where to continue, so nothing is lost or reordered. When PostgreSQL is down and its host lives,
//! every valid record left in `pg_wal/` is drained.
#![forbid(unsafe_code)]

pub mod check;
pub mod conninfo;
pub mod error;
pub mod link;
pub mod metrics;
pub mod postgres;
pub mod replication;
pub mod scout;
pub mod state;
pub mod wal_reader;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use walship_protocol::message::Hello;
use walship_protocol::wal::parse_history;
use walship_protocol::{
    Lsn, ReceiverMessage, SenderMessage, TimelineId, WalSegSize, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};

use crate::link::{Link, LinkError};
use crate::postgres::{Position, Primary, ServerInfo};
use crate::replication::Walsender;
use crate::scout::Scout;
pub use crate::state::SenderState;
use crate::state::StatePublisher;
use crate::wal_reader::{ReadError, WalReader};

/// `--compression auto`: WAL messages from this size on are compressed (a catch-up, a bulk load, where zstd
/// saves the most bytes for the least CPU per byte), smaller ones go plain: the live stream's messages (one
/// or a few commits each) cost the primary more CPU to compress, frame by frame, than their bytes cost the
/// link (measured: BENCHMARKS.md, issue 21, fourth step).
pub const COMPRESS_MIN_AUTO: usize = 32 << 10;

/// Everything the sender needs, with defaults in [`SenderConfig::new`].
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// The primary's connection, resolved the libpq way ([`conninfo::resolve`]), again at SIGHUP.
    pub pgconn: walship_daemon::Reloadable<conninfo::Conn>,
    /// `HOST:PORT` of the receiver.
    pub receiver: String,
    /// The name the receiver's certificate must carry.
    pub server_name: String,
    /// The TLS configuration for the receiver, reloaded at SIGHUP: each connection takes the current one.
    pub tls: walship_daemon::Reloadable<rustls::ClientConfig>,
    /// The WAL directory, when not `data_directory/pg_wal`.
    pub wal_dir: Option<PathBuf>,
    /// Where to start when the archive is empty (rounded down to its segment's start).
    pub start_lsn: Option<Lsn>,
    /// A physical replication slot kept at the receiver's durable position, so the primary never removes
    /// WAL walship has not archived.
    pub slot: Option<String>,
    /// How this sender names itself to the receiver.
    pub name: String,
    /// The replication connection's `application_name` (`--name`, default `walship`): what
    /// `synchronous_standby_names` names.
    pub standby_name: String,
    /// How the primary's flush position is learnt.
    pub confirm_by: replication::ConfirmBy,
    /// Report the receiver's durable position to the walsender at once (a synchronous standby).
    pub synchronous: bool,
    /// Most bytes sent and not yet acknowledged.
    pub window: u64,
    /// zstd level for WAL on the wire when the receiver allows it (protocol 4); `None`: never compress.
    pub compression_level: Option<i32>,
    /// The smallest WAL message compressed (smaller ones go plain): [`COMPRESS_MIN_AUTO`] by default.
    pub compress_min: usize,
    /// Most WAL bytes in one message.
    pub max_message: u64,
    /// Fallback poll of the flush position when no file-system event comes.
    pub poll_interval: Duration,
    /// How often a keepalive goes out.
    pub keepalive_interval: Duration,
    /// A receiver silent for this long is considered gone.
    pub receiver_timeout: Duration,
    /// Time for connecting (TCP + TLS, or PostgreSQL) and for the handshake.
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// At SIGTERM, how long to wait for the receiver to acknowledge everything sent before closing.
    pub shutdown_grace: Duration,
}

impl SenderConfig {
    pub fn new(
        pgconn: walship_daemon::Reloadable<conninfo::Conn>,
        receiver: String,
        server_name: String,
        tls: walship_daemon::Reloadable<rustls::ClientConfig>,
    ) -> Self {
        SenderConfig {
            pgconn,
            receiver,
            server_name,
            tls,
            wal_dir: None,
            start_lsn: None,
            slot: None,
            name: default_name(),
            standby_name: DEFAULT_STANDBY_NAME.to_owned(),
            confirm_by: replication::ConfirmBy::Auto,
            synchronous: false,
            window: 64 << 20,
            compression_level: Some(1),
            compress_min: COMPRESS_MIN_AUTO,
            max_message: 1 << 20,
            poll_interval: Duration::from_millis(200),
            keepalive_interval: Duration::from_secs(1),
            receiver_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// `application_name` of the replication connection unless `--name` is given.
pub const DEFAULT_STANDBY_NAME: &str = "walship";

/// The host name, or `walship-sender`.
pub fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "walship-sender".into())
}

/// How a session ended.
enum Failure {
    /// Retrying cannot help (wrong cluster, WAL gone, misconfiguration): the daemon stops with this error.
    Fatal(anyhow::Error),
    /// Network, PostgreSQL or receiver trouble: reconnect after a backoff.
    Retry(anyhow::Error),
}

fn retry<E: Into<anyhow::Error>>(e: E) -> Failure {
    Failure::Retry(e.into())
}

impl From<LinkError> for Failure {
    fn from(e: LinkError) -> Self {
        // every link failure is the network's or the receiver's: a new session may succeed
        Failure::Retry(e.into())
    }
}

/// A crash point for tests (cargo feature `failpoints`): with `FAILPOINTS=name=return` the process dies here
/// at once, as under `kill -9`.
macro_rules! crash_point {
    ($name:expr) => {
        fail::fail_point!($name, |_| {
            eprintln!("failpoint {}: crashing", $name);
            std::process::abort()
        })
    };
}

/// The first wait before reconnecting (doubling from there, with jitter, up to `--max-backoff`).
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Runs the sender until `shutdown` is cancelled (returns `Ok`) or a fatal error (returns it).
pub async fn run(cfg: SenderConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (state, _) = StatePublisher::new();
    run_published(cfg, shutdown, state).await
}

/// Starts the sender as a task; the receiver follows what it does (sessions, errors, acknowledgements).
pub fn start(
    cfg: SenderConfig,
    shutdown: CancellationToken,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio::sync::watch::Receiver<SenderState>,
) {
    let (state, watch) = StatePublisher::new();
    (tokio::spawn(run_published(cfg, shutdown, state)), watch)
}

async fn run_published(
    cfg: SenderConfig,
    shutdown: CancellationToken,
    state: StatePublisher,
) -> anyhow::Result<()> {
    let mut backoff = walship_daemon::Backoff::new(FIRST_RETRY, cfg.max_backoff);
    let mut acked_before: Option<(TimelineId, Lsn)> = None;
    let mut remembered: Option<Origin> = None;
    loop {
        let mut progressed = false;
        let outcome = session(
            &cfg,
            &state,
            &shutdown,
            &mut progressed,
            &mut acked_before,
            &mut remembered,
        )
        .await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                if progressed {
                    backoff.reset();
                }
                let wait = backoff.next_wait();
                metrics::METRICS.reconnects.inc();
                metrics::METRICS.replication_stream.set(0);
                if cfg.synchronous && metrics::METRICS.synchronous_behind_since.get() == 0 {
                    // no synchronous standby of walship's now: commits on the primary wait from here on
                    metrics::METRICS
                        .synchronous_behind_since
                        .set(now_micros() as i64);
                }
                count_error(&e);
                state.reconnecting(&e);
                walship_daemon::notify_status(&format!("reconnecting: {e:#}"));
                warn!("{e:#}; reconnecting in {} ms", wait.as_millis());
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Counts a session that ended on an error, by what failed.
fn count_error(e: &anyhow::Error) {
    let kind = if e
        .chain()
        .any(|c| c.downcast_ref::<tokio_postgres::Error>().is_some())
    {
        "postgres"
    } else if e.chain().any(|c| c.downcast_ref::<LinkError>().is_some()) {
        "receiver"
    } else if e.chain().any(|c| c.downcast_ref::<ReadError>().is_some()) {
        "wal"
    } else {
        "other"
    };
    metrics::METRICS
        .errors
        .get_or_create(&metrics::Kind { kind })
        .inc();
}

pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A catch-up being reported.
struct CatchUp {
    began: Instant,
    from: Lsn,
    reported: Instant,
}

/// What a session learned of the primary: kept between sessions so that a primary found down can still be
/// drained.
#[derive(Clone, Debug)]
struct Origin {
    info: ServerInfo,
    wal_dir: PathBuf,
    pos: Position,
}

impl Origin {
    fn data_dir_of(info: &ServerInfo, wal_dir: &std::path::Path) -> Option<PathBuf> {
        info.data_directory
            .clone()
            .or_else(|| wal_dir.parent().map(PathBuf::from))
    }

    fn data_dir(&self) -> Option<PathBuf> {
        Self::data_dir_of(&self.info, &self.wal_dir)
    }
}

/// How streaming ended.
enum Stop {
    /// Shutdown: wait for the receiver to acknowledge what was sent, then close.
    Shutdown,
    /// A send to the receiver was blocked when shutdown came: closing at once (nothing would be acknowledged).
    Abandon,
    /// The PostgreSQL connection failed: find out whether the server is down, and if so drain `pg_wal/`.
    PrimaryLost(anyhow::Error),
}

/// The streaming phase of a session.
///
/// Invariants: `link.acked() <= link.sent()`; everything in `[start, link.sent())` was read from `pg_wal`
/// and validated; up to protocol 2 `link.sent() <= pos.flush`, from protocol 3 bytes beyond `pos.flush` are
/// complete, CRC-valid records (the scout's walk) and never complete a segment.
struct Streaming<'a> {
    cfg: &'a SenderConfig,
    /// None when the session started while PostgreSQL was down (it only drains).
    pg: Option<Arc<Primary>>,
    /// The primary's data directory (for `postmaster.pid`), when known.
    data_dir: Option<PathBuf>,
    /// What the session's protocol version allows.
    features: walship_protocol::Features,
    reader: WalReader,
    events: Option<Events>,
    link: Link,
    seg: WalSegSize,
    timeline: TimelineId,
    /// Where this session started (the receiver's durable end then).
    start: Lsn,
    /// The primary's positions at the last query.
    pos: Position,
    /// Precise re-polls left in the current burst of file-system events.
    hot: u32,
    /// An event arrived while the last query was too recent: query at `last_query + MIN_QUERY_GAP` (protocol
    /// 3: at `last_query + CONFIRM_GAP`).
    event_due: bool,
    /// Protocol 3: where the WAL the primary has written (not only flushed) ends.
    scout: Scout,
    /// Protocol 3: what the last Keepalive confirmed (the primary's flush then, or what was sent if less).
    confirm_sent: Lsn,
    last_query: Instant,
    /// When the streaming loop last woke up for the receiver's acknowledgements (see `ACK_WAKE`).
    last_ack_wake: Instant,
    last_flush_change: Instant,
    /// Where the replication slot was last advanced to, and when.
    slot_at: Lsn,
    slot_moved: Instant,
    last_report: Instant,
    /// A catch-up in progress: when it began, what the receiver held then, and when it was last reported.
    catch_up: Option<CatchUp>,
    /// Bytes sent before the primary had flushed them (protocol 3), since the last progress report.
    shipped_on_write: u64,
    /// The same, over the session.
    shipped_on_write_total: u64,
    /// Protocol 3: the flush query in progress (a task of its own: shipping never waits for it).
    asking: Option<tokio::task::JoinHandle<anyhow::Result<Position>>>,
    /// The primary's view of this sender (pg_stat_replication), asked every few seconds while the walsender
    /// streams: in progress, and when last asked.
    primary_view: (Option<PrimaryView>, Instant),
    /// With `--synchronous`: how the primary counts this sender, as last seen, and as last told the receiver.
    sync_state: Option<walship_protocol::SyncState>,
    sync_state_told: Option<walship_protocol::SyncState>,
    /// The slot advance in progress, with the position it advances to.
    slot_task: Option<(Lsn, tokio::task::JoinHandle<anyhow::Result<()>>)>,
    /// While draining a stopped primary: how far to ship (valid records, provisional beyond `pos.flush`).
    drain_target: Option<Lsn>,
    /// The primary's walsender streaming flushed WAL (the flush signal), unless `--confirm-by query` or the
    /// primary refused it.
    walsender: Option<Walsender>,
    /// What was shipped compared with what the walsender streamed, when it streams.
    cross: Option<replication::CrossCheck>,
}

/// Asking the primary's `pg_stat_replication` (synchronous or not, flush lag in ms).
type PrimaryView = tokio::task::JoinHandle<anyhow::Result<(walship_protocol::SyncState, i64)>>;

/// Most bytes one side of the cross-check may be ahead of the other before the oldest go uncompared.
const CROSS_CHECK_LIMIT: usize = 64 << 20;

// after `crash_point!`, which they use (macros are in scope from their definition on)
mod drain;
mod server_state;
mod session;
mod streaming;

use server_state::*;
use session::*;
use streaming::*;
