//! walship sender: reads WAL straight out of the segment files in `pg_wal/` as PostgreSQL writes it, validates
//! it, and streams it to a walship receiver over TLS; the primary's flush position confirms what was shipped.
//!
//! | module        | what it owns |
//! |---------------|--------------|
//! | [`postgres`]  | the tokio-postgres connection: version dialect, identity, segment size, flush position |
//! | [`wal_reader`]| reading and validating segment files |
//! | [`scout`]     | the record walker over written, not yet flushed WAL |
//! | [`link`]      | the TLS connection to the receiver |
//!
//! The loop ([`run`]): connect to PostgreSQL and to the receiver, say `Hello`, resume where the receiver's
//! `Welcome` says its confirmed, durable WAL ends, then repeat. With a receiver of protocol 3 (ship on write):
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
pub mod link;
pub mod metrics;
pub mod postgres;
pub mod scout;
pub mod wal_reader;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use walship_protocol::message::Hello;
use walship_protocol::wal::parse_history;
use walship_protocol::{
    Lsn, ReceiverMessage, SenderMessage, TimelineId, WalSegSize, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};

use walship_protocol::walker::{WalkStop, Walker};

use crate::link::{Backoff, Link, LinkError};
use crate::postgres::{Position, Primary, ServerInfo};
use crate::scout::Scout;
use crate::wal_reader::{ReadError, WalReader};

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
    /// Most bytes sent and not yet acknowledged.
    pub window: u64,
    /// zstd level for WAL on the wire when the receiver allows it (protocol 4); `None`: never compress.
    pub compression_level: Option<i32>,
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
            window: 64 << 20,
            compression_level: Some(1),
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

/// The last error that made the sender reconnect (for `check`).
pub static LAST_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Runs the sender until `shutdown` is cancelled (returns `Ok`) or a fatal error (returns it).
pub async fn run(cfg: SenderConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(cfg.max_backoff);
    let mut acked_before: Option<(TimelineId, Lsn)> = None;
    let mut remembered: Option<Origin> = None;
    loop {
        let mut progressed = false;
        let outcome = session(
            &cfg,
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
                metrics::count_error(&e);
                *LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
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

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn read_failure(e: ReadError) -> Failure {
    match e {
        ReadError::Gone { .. } => Failure::Fatal(anyhow!(
            "{e}. The archive cannot be continued without a gap. To fix: keep WAL on the primary for walship \
             (a replication slot or a larger wal_keep_size / wal_keep_segments), then either restore the missing \
             segments into the archive from another WAL archive, or start over: a new base backup for the standby \
             and an empty archive directory"
        )),
        ReadError::Invalid { .. } => Failure::Fatal(anyhow!(
            "{e}. walship never ships WAL it cannot validate; check that --wal-dir belongs to the server of --pgconn"
        )),
        ReadError::Io { .. } => Failure::Retry(e.into()),
    }
}

/// The archive resumes at `lsn`, inside a segment PostgreSQL has already removed while the next segment is
/// still in `pg_wal/`: after a crash right after a WAL switch, the restarted server's checkpoint removes the
/// switched segment before the sender could resend and compare its tail. Resume at the next segment instead;
/// the receiver accepts that only if its WAL there ends with the switch record that the first record of the
/// next segment names as its predecessor (otherwise it reports the gap). Anywhere else: `lsn`.
fn resume_past_removed(lsn: Lsn, timeline: TimelineId, seg: WalSegSize, reader: &WalReader) -> Lsn {
    let segno = seg.segno(lsn);
    let file = |n| {
        reader
            .dir()
            .join(walship_protocol::wal::segment_file_name(timeline, n, seg))
    };
    if file(segno).exists() || !file(segno + 1).exists() {
        return lsn;
    }
    let next = seg.segment_start(segno + 1);
    info!(
        resume = %lsn,
        from = %next,
        "the segment of the archive's resume point is gone from pg_wal; resuming at the next segment, which the receiver links to the archive's WAL through the WAL switch before it"
    );
    next
}

/// Where to start streaming on `timeline`, given the receiver's resume points.
fn decide_start(
    resume: &[(TimelineId, Lsn)],
    timeline: TimelineId,
    flush: Lsn,
    seg: WalSegSize,
    start_lsn: Option<Lsn>,
    reader: &WalReader,
) -> Result<Lsn, Failure> {
    if let Some((_, lsn)) = resume.iter().find(|(t, _)| *t == timeline) {
        if start_lsn.is_some() {
            info!("--start-lsn ignored: the archive already holds timeline {timeline}");
        }
        return Ok(resume_past_removed(*lsn, timeline, seg, reader));
    }
    if let Some(&(old, old_end)) = resume
        .iter()
        .filter(|(t, _)| *t < timeline)
        .max_by_key(|(t, _)| *t)
    {
        let content = reader
            .history(timeline)
            .context("read the timeline history file")
            .map_err(retry)?
            .ok_or_else(|| {
                Failure::Fatal(anyhow!(
                    "the archive ends on timeline {old} but the primary is on timeline {timeline} and its history file {} is not in {}",
                    walship_protocol::wal::history_file_name(timeline),
                    reader.dir().display()
                ))
            })?;
        let entries = parse_history(&content).ok_or_else(|| {
            Failure::Fatal(anyhow!("history file of timeline {timeline} is malformed"))
        })?;
        let switch = entries.iter().find(|e| e.timeline == old).map(|e| e.switchpoint).ok_or_else(|| {
            Failure::Fatal(anyhow!(
                "the archive's timeline {old} is not an ancestor of the primary's timeline {timeline}: this archive belongs to another history"
            ))
        })?;
        if old_end < seg.floor(switch) {
            warn!(%old_end, %switch, "the archive's timeline {old} ends before the segment where timeline {timeline} branched off: WAL between them is missing from the archive");
        }
        info!(%switch, "the primary moved from timeline {old} to {timeline}; continuing on the new timeline");
        return Ok(seg.floor(switch));
    }
    Ok(seg.floor(start_lsn.unwrap_or(flush)))
}

/// Connects to PostgreSQL and the receiver, says `Hello`, and streams until shutdown or a failure.
/// `acked_before` is the highest position any receiver acknowledged to this process.
async fn session(
    cfg: &SenderConfig,
    shutdown: &CancellationToken,
    progressed: &mut bool,
    acked_before: &mut Option<(TimelineId, Lsn)>,
    remembered: &mut Option<Origin>,
) -> Result<(), Failure> {
    // Connecting and the handshake send no WAL: shutdown may interrupt them anywhere.
    let opened = tokio::select! {
        r = open(cfg, *acked_before, remembered) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let mut streaming = opened;
    let mut outcome = if streaming.pg.is_none() {
        Ok(Stop::PrimaryLost(anyhow!("PostgreSQL is down")))
    } else {
        streaming.run(shutdown, progressed).await
    };
    if let Ok(Stop::PrimaryLost(cause)) = outcome {
        outcome = streaming.drain(shutdown, cause, progressed).await;
    }
    // what the receiver holds durably and confirmed: it resumes there at the latest
    let acked = streaming.link.confirmed();
    if acked > streaming.start {
        *acked_before = Some((streaming.timeline, acked));
    }
    match outcome {
        Ok(Stop::Drain) => {
            let Streaming {
                link,
                pos,
                shipped_on_write_total,
                ..
            } = streaming;
            let sent = link.sent();
            let acked = link.drain_and_close(cfg.shutdown_grace).await;
            info!(flush = %pos.flush, %sent, %acked, shipped_on_write_bytes = shipped_on_write_total, "stopped: the receiver holds everything up to {acked}");
            Ok(())
        }
        Ok(Stop::Abandon) => Ok(()),
        Ok(Stop::PrimaryLost(e)) => Err(retry(e)),
        Err(e) => Err(e),
    }
}

/// Connects to PostgreSQL and to the receiver and completes the handshake. Cancellation safe.
async fn open<'a>(
    cfg: &'a SenderConfig,
    acked_before: Option<(TimelineId, Lsn)>,
    remembered: &mut Option<Origin>,
) -> Result<Streaming<'a>, Failure> {
    let connected =
        tokio::time::timeout(cfg.connect_timeout, Primary::connect(&cfg.pgconn.current()))
            .await
            .map_err(|_| retry(anyhow!("connecting to PostgreSQL timed out")))
            .and_then(|r| {
                r.map_err(|e| {
                    if let Some(fix) = crate::postgres::fatal_cause(&e) {
                        Failure::Fatal(e.context(fix))
                    } else if e.to_string().contains("not supported")
                        || e.to_string().contains("in recovery")
                        || e.to_string().contains("--pgconn")
                    {
                        Failure::Fatal(e)
                    } else {
                        Failure::Retry(e)
                    }
                })
            });
    let (pg, origin) = match connected {
        Ok(pg) => {
            let info = pg.info.clone();
            let wal_dir = match (&cfg.wal_dir, &info.data_directory) {
                (Some(d), _) => d.clone(),
                (None, Some(data)) => data.join(info.dialect.wal_dir),
                (None, None) => {
                    return Err(Failure::Fatal(anyhow!(
                        "this role cannot read data_directory: pass --wal-dir, or connect as a superuser or a member of pg_read_all_settings"
                    )))
                }
            };
            let pos = pg.position().await.map_err(retry)?;
            let origin = Origin { info, wal_dir, pos };
            *remembered = Some(origin.clone());
            (Some(Arc::new(pg)), origin)
        }
        Err(Failure::Retry(e)) => {
            // PostgreSQL went down while this process was not streaming (between sessions): its WAL may
            // still hold records the archive lacks. Drain them with what this process knows of the primary.
            let Some(origin) = remembered.clone() else {
                return Err(Failure::Retry(e));
            };
            match server_state(origin.data_dir().as_deref(), &cfg.pgconn.current()).await {
                ServerState::Down(_) => (None, origin),
                _ => return Err(Failure::Retry(e)),
            }
        }
        Err(fatal) => return Err(fatal),
    };
    let Origin { info, wal_dir, pos } = origin;
    let mut reader = WalReader::new(&wal_dir, info.seg, info.magic, info.system_identifier);
    let events = match watch_dir(&wal_dir) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(dir = %wal_dir.display(), error = %e, "no inotify on the WAL directory; polling every {:?}", cfg.poll_interval);
            None
        }
    };
    let timeline = pos.timeline;

    let tls = crate::link::connect(
        &cfg.receiver,
        &cfg.server_name,
        cfg.tls.current(),
        cfg.connect_timeout,
    )
    .await
    .map_err(retry)?;
    let (mut rx, mut tx) = Link::frame(tls);
    let hello = SenderMessage::Hello(Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        system_identifier: info.system_identifier,
        timeline,
        wal_segment_size: info.seg.bytes(),
        pg_version_num: info.version_num,
        sender_name: cfg.name.clone(),
    });
    tokio::time::timeout(cfg.connect_timeout, tx.send(hello))
        .await
        .map_err(|_| {
            retry(anyhow!(
                "sending Hello timed out after {:?}",
                cfg.connect_timeout
            ))
        })?
        .context("send Hello")
        .map_err(retry)?;
    let (resume, features, compression) = match tokio::time::timeout(cfg.connect_timeout, rx.next())
        .await
    {
        Err(_) => {
            return Err(retry(anyhow!(
                "the receiver did not answer Hello within {:?}",
                cfg.connect_timeout
            )))
        }
        Ok(None) => {
            return Err(retry(anyhow!(
                "the receiver closed the connection during the handshake (certificate refused?)"
            )))
        }
        Ok(Some(Err(e))) => {
            let e = anyhow::Error::new(e);
            return Err(retry(if format!("{e}").contains("alert") {
                e.context(
                    "the receiver refused the TLS session: check that --tls-cert and --tls-key were issued by the CA \
                     the receiver trusts (its --tls-client-ca)",
                )
            } else {
                e.context("handshake with the receiver")
            }));
        }
        Ok(Some(Ok(ReceiverMessage::Welcome {
            resume,
            protocol_version,
            compression,
        }))) => (
            resume,
            walship_protocol::Features::of(protocol_version),
            compression,
        ),
        Ok(Some(Ok(ReceiverMessage::Refuse { code, reason }))) => {
            let e = anyhow!("the receiver refused this sender: {reason}");
            return Err(if code.is_transient() {
                Failure::Retry(e)
            } else {
                Failure::Fatal(e)
            });
        }
        Ok(Some(Ok(ReceiverMessage::Error { reason }))) => {
            return Err(retry(anyhow!("the receiver reported: {reason}")))
        }
        Ok(Some(Ok(other))) => {
            return Err(retry(anyhow!(
                "protocol violation: {other:?} instead of Welcome"
            )))
        }
    };

    if let (Some(slot), Some(pg)) = (&cfg.slot, &pg) {
        pg.ensure_slot(slot).await.map_err(|e| {
            if e.to_string().contains("needs PostgreSQL")
                || e.to_string().contains("not a physical")
            {
                Failure::Fatal(e)
            } else {
                Failure::Retry(e)
            }
        })?;
    }
    let start = decide_start(
        &resume,
        timeline,
        pos.flush,
        info.seg,
        cfg.start_lsn,
        &reader,
    )?;
    let resumed = resume.iter().any(|(t, _)| *t == timeline);
    let mut link = Link::new(rx, tx, timeline, start, cfg.window, cfg.receiver_timeout);
    // zstd on the wire when both sides want it (the receiver says so in its Welcome)
    if compression == walship_protocol::Compression::Zstd {
        link.compress_with(cfg.compression_level);
    }
    // Prove that this server continues the archive's history: resend the page before the resume point
    // (within its segment). The receiver holds those bytes confirmed and compares them, so another primary
    // of this cluster (a restored copy started as a primary, a split brain) is refused before it writes.
    let proof_from = Lsn(start
        .0
        .saturating_sub(walship_protocol::wal::XLOG_BLCKSZ as u64)
        .max(info.seg.floor(start).0));
    if resumed && proof_from < start {
        let bytes = reader
            .read(timeline, proof_from, start)
            .map_err(read_failure)?;
        let msg = SenderMessage::Wal(walship_protocol::message::Wal {
            timeline,
            start_lsn: proof_from,
            bytes,
        });
        link.send(msg, "resending the page before the resume point")
            .await?;
    }
    for t in 2..=timeline {
        if let Some(content) = reader
            .history(t)
            .context("read timeline history file")
            .map_err(retry)?
        {
            let msg = SenderMessage::History {
                timeline: t,
                content: content.into(),
            };
            link.send(msg, "sending a history file").await?;
        }
    }
    info!(
        receiver = %cfg.receiver,
        primary = %cfg.pgconn.current().describe(),
        wal_dir = %wal_dir.display(),
        timeline,
        %start,
        flush = %pos.flush,
        segment_size = %info.seg,
        "streaming"
    );
    metrics::METRICS.sessions.inc();
    walship_daemon::notify_status(&format!(
        "streaming timeline {timeline} to {} from {start}",
        cfg.receiver
    ));
    metrics::METRICS.timeline.set(i64::from(timeline));
    metrics::METRICS.primary_flush_lsn.set(pos.flush.0 as i64);
    if let Some((t, acked)) = acked_before.filter(|(t, _)| *t == timeline) {
        if start < acked {
            // The archive lost WAL it had acknowledged (restored from a backup, a disk that lied about its
            // fsync, or a bug). Resending from the receiver's position repairs the archive while pg_wal still
            // holds the bytes; say so loudly.
            tracing::error!(
                acknowledged = %acked,
                resume = %start,
                "the receiver acknowledged timeline {t} up to {acked} earlier but now resumes at {start}: \
                 its archive lost acknowledged WAL; resending it from pg_wal"
            );
        }
    }
    let data_dir = Origin::data_dir_of(&info, &wal_dir);
    Ok(Streaming {
        cfg,
        pg,
        data_dir,
        features,
        reader,
        events,
        link,
        seg: info.seg,
        timeline,
        start,
        pos,
        hot: 0,
        event_due: false,
        scout: Scout::default(),
        confirm_sent: start,
        last_query: Instant::now(),
        last_flush_change: Instant::now(),
        slot_at: Lsn(0),
        slot_moved: Instant::now(),
        last_report: Instant::now(),
        // a catch-up is timed from the start of the session
        catch_up: Some(CatchUp {
            began: Instant::now(),
            from: start,
            reported: Instant::now(),
        }),
        shipped_on_write: 0,
        shipped_on_write_total: 0,
        asking: None,
        slot_task: None,
        drain_target: None,
    })
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
    Drain,
    /// A send to the receiver was blocked when shutdown came: closing at once (nothing would drain).
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
    /// The slot advance in progress, with the position it advances to.
    slot_task: Option<(Lsn, tokio::task::JoinHandle<anyhow::Result<()>>)>,
    /// While draining a stopped primary: how far to ship (valid records, provisional beyond `pos.flush`).
    drain_target: Option<Lsn>,
}

impl Streaming<'_> {
    async fn run(
        &mut self,
        shutdown: &CancellationToken,
        progressed: &mut bool,
    ) -> Result<Stop, Failure> {
        let mut keepalive = tokio::time::interval(self.cfg.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(stop) = self.pump(shutdown).await? {
                return Ok(stop);
            }
            if let Some(stop) = self.confirm(shutdown).await? {
                return Ok(stop);
            }
            self.maintain_slot().await;
            self.report_catch_up();
            if self.last_report.elapsed() >= Duration::from_secs(60) {
                self.last_report = Instant::now();
                let on_write = std::mem::take(&mut self.shipped_on_write);
                info!(flush = %self.pos.flush, sent = %self.link.sent(), acked = %self.link.acked(), behind = self.pos.flush.saturating_sub(self.link.acked()), shipped_on_write_bytes = on_write, "progress");
            }
            // No file-system event announces a flush (only the write before it). While WAL is inserted but not
            // yet flushed, re-poll soon. After a quiet spell (a commit arriving alone) the first event starts
            // precise short re-polls, since the primary's fsync takes a fraction of a millisecond. Under
            // sustained load the events keep coming; then at most one query per MIN_QUERY_GAP keeps the cost on
            // the primary low.
            let pending = self.pos.insert > self.pos.flush;
            let mut query = false;
            if self.held_at_segment_end() {
                // Written WAL waits for the flush to pass a segment's end (once per segment): PostgreSQL
                // fsyncs a segment as soon as its last page is written, so poll precisely until it has.
                std::thread::sleep(HOT_POLL);
                *progressed |= self.link.poll_received()?;
                query = true;
            } else if self.ships_on_write() {
                // Ship on write: a file-system event makes the scout walk what was written, and the loop ships
                // it at once. The flush position only confirms: asked at most every CONFIRM_GAP while
                // something is unconfirmed, else every poll interval.
                let unconfirmed = self.event_due || pending || self.link.sent() > self.pos.flush;
                let gap = if unconfirmed {
                    CONFIRM_GAP
                } else {
                    self.cfg.poll_interval
                };
                let wait = gap.saturating_sub(self.last_query.elapsed());
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        info!(sent = %self.link.sent(), acked = %self.link.acked(), "shutting down: waiting for the receiver to acknowledge what was sent");
                        return Ok(Stop::Drain);
                    }
                    moved = self.link.recv() => *progressed |= moved?,
                    _ = next_event(&mut self.events) => {
                        while let Some(Some(_)) = self.events.as_mut().and_then(|e| e.next().now_or_never()) {}
                        self.scout.advance(&self.reader, self.timeline, self.link.sent()).map_err(read_failure)?;
                        self.event_due = true;
                    }
                    answer = answer(&mut self.asking) => {
                        self.asking = None;
                        if let Some(stop) = self.apply_position(answer)? {
                            return Ok(stop);
                        }
                    }
                    _ = tokio::time::sleep(wait), if self.asking.is_none() => {
                        if let Some(stop) = self.ask() {
                            return Ok(stop);
                        }
                    }
                    _ = keepalive.tick() => {
                        let flush = self.pos.flush;
                        let grace = self.cfg.shutdown_grace;
                        if let Some(stop) = finish_on_shutdown(self.link.keepalive(flush, now_micros()), shutdown, grace).await? {
                            return Ok(stop);
                        }
                        self.confirm_sent = self.confirm_sent.max(flush.min(self.link.sent()));
                    }
                }
            } else if pending && self.hot > 0 {
                self.hot -= 1;
                // tokio's timers tick in milliseconds; nothing else waits on this thread meanwhile
                std::thread::sleep(HOT_POLL);
                *progressed |= self.link.poll_received()?;
                query = true;
            } else {
                let poll = if self.event_due {
                    MIN_QUERY_GAP.saturating_sub(self.last_query.elapsed())
                } else if pending {
                    Duration::from_millis(1)
                } else {
                    self.cfg.poll_interval
                };
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        info!(sent = %self.link.sent(), acked = %self.link.acked(), "shutting down: waiting for the receiver to acknowledge what was sent");
                        return Ok(Stop::Drain);
                    }
                    moved = self.link.recv() => *progressed |= moved?,
                    _ = next_event(&mut self.events), if !self.event_due => {
                        // one query covers every event already queued
                        while let Some(Some(_)) = self.events.as_mut().and_then(|e| e.next().now_or_never()) {}
                        if self.last_query.elapsed() >= MIN_QUERY_GAP {
                            query = true;
                        } else {
                            self.event_due = true;
                        }
                        if self.last_flush_change.elapsed() >= QUIET {
                            self.hot = HOT_POLLS;
                        }
                    }
                    _ = tokio::time::sleep(poll) => query = true,
                    _ = keepalive.tick() => {
                        let flush = self.pos.flush;
                        let grace = self.cfg.shutdown_grace;
                        if let Some(stop) = finish_on_shutdown(self.link.keepalive(flush, now_micros()), shutdown, grace).await? {
                            return Ok(stop);
                        }
                    }
                }
            }
            if query {
                if let Some(stop) = self.query().await? {
                    return Ok(stop);
                }
            }
        }
    }

    /// Protocol 3: the receiver takes WAL before it is flushed (provisional until confirmed).
    fn ships_on_write(&self) -> bool {
        self.features.ship_on_write()
    }

    /// How far to ship: the flush position, and from protocol 3 the written WAL beyond it that the scout
    /// validated, except the last byte of a segment (a segment is completed in the archive, and handed to
    /// recovery, only with confirmed bytes).
    fn target(&self) -> Lsn {
        if let Some(target) = self.drain_target {
            return target;
        }
        let flush = self.pos.flush;
        if !self.ships_on_write() {
            return flush;
        }
        let Some(written) = self.scout.valid_from(self.link.sent()) else {
            return flush;
        };
        flush.max(written.min(self.provisional_cap()))
    }

    /// How far unconfirmed WAL may go: short of the last byte of the segment holding the flush position.
    fn provisional_cap(&self) -> Lsn {
        Lsn(self.seg.segment_start(self.seg.segno(self.pos.flush) + 1).0 - 1)
    }

    /// Protocol 3: written WAL is held back only because it would complete a segment with unconfirmed bytes.
    fn held_at_segment_end(&self) -> bool {
        if !self.ships_on_write() {
            return false;
        }
        let cap = self.provisional_cap();
        self.link.sent() >= cap
            && self.link.has_room()
            && self
                .scout
                .valid_from(self.link.sent())
                .is_some_and(|w| w > cap)
    }

    /// Protocol 3: tells the receiver what the primary has flushed, once it confirms more of what was sent.
    async fn confirm(&mut self, shutdown: &CancellationToken) -> Result<Option<Stop>, Failure> {
        let flush = self.pos.flush;
        let confirms = flush.min(self.link.sent());
        if !self.ships_on_write() || confirms <= self.confirm_sent {
            return Ok(None);
        }
        let grace = self.cfg.shutdown_grace;
        let stop =
            finish_on_shutdown(self.link.keepalive(flush, now_micros()), shutdown, grace).await?;
        self.confirm_sent = confirms;
        Ok(stop)
    }

    /// Sends `[sent, target)` while the window has room. Returns how to stop if shutdown came meanwhile.
    async fn pump(&mut self, shutdown: &CancellationToken) -> Result<Option<Stop>, Failure> {
        let grace = self.cfg.shutdown_grace;
        let mut wrote = false;
        let target = self.target();
        while self.link.sent() < target && self.link.has_room() {
            if shutdown.is_cancelled() {
                break;
            }
            let sent = self.link.sent();
            let seg_end = self.seg.segment_start(self.seg.segno(sent) + 1);
            let end = Lsn(target.0.min(seg_end.0).min(sent.0 + self.cfg.max_message));
            let on_write = end.0.saturating_sub(sent.0.max(self.pos.flush.0));
            self.shipped_on_write += on_write;
            self.shipped_on_write_total += on_write;
            metrics::METRICS.shipped_on_write_bytes.inc_by(on_write);
            // A plain blocking read: the runtime is this one thread, and WAL just written is in the page cache.
            let bytes = self
                .reader
                .read(self.timeline, sent, end)
                .map_err(read_failure)?;
            crash_point!("sender-read-before-send");
            // a long catch-up can keep this loop busy for a whole window: take in the acknowledgements
            // already here (the window slides on) and report from here too
            self.link.poll_received()?;
            self.report_catch_up();
            if let Some(stop) =
                finish_on_shutdown(self.link.feed_wal(sent, bytes), shutdown, grace).await?
            {
                return Ok(Some(stop));
            }
            wrote = true;
        }
        if wrote {
            if let Some(stop) = finish_on_shutdown(self.link.flush(), shutdown, grace).await? {
                return Ok(Some(stop));
            }
        }
        Ok(shutdown.is_cancelled().then_some(Stop::Drain))
    }

    /// At most once a second: release WAL the receiver has made durable.
    async fn maintain_slot(&mut self) {
        let Some(slot) = &self.cfg.slot else { return };
        // durable and confirmed: a provisional byte may still be replaced
        let acked = self.link.confirmed();
        if acked > self.slot_at
            && acked > self.start
            && self.slot_moved.elapsed() >= Duration::from_secs(1)
        {
            self.slot_moved = Instant::now();
            let Some(pg) = self.pg.clone() else { return };
            if self.ships_on_write() {
                // in a task of its own: shipping never waits for the primary
                if self.slot_task.is_none() {
                    let slot = slot.clone();
                    let task = tokio::spawn(async move { pg.advance_slot(&slot, acked).await });
                    self.slot_task = Some((acked, task));
                }
            } else {
                match pg.advance_slot(slot, acked).await {
                    Ok(()) => self.slot_at = acked,
                    Err(e) => warn!("{e:#}"),
                }
            }
        }
        if let Some((to, task)) = self.slot_task.take_if(|(_, t)| t.is_finished()) {
            match task.now_or_never() {
                Some(Ok(Ok(()))) => self.slot_at = to,
                Some(Ok(Err(e))) => warn!("{e:#}"),
                Some(Err(e)) => warn!("advancing the replication slot failed: {e}"),
                None => {}
            }
        }
    }

    /// Asks the primary where WAL is flushed.
    async fn query(&mut self) -> Result<Option<Stop>, Failure> {
        self.event_due = false;
        self.last_query = Instant::now();
        let Some(pg) = self.pg.as_ref().filter(|pg| !pg.is_closed()) else {
            return Ok(Some(Stop::PrimaryLost(anyhow!(
                "the PostgreSQL connection closed"
            ))));
        };
        let answer = pg.position().await;
        self.apply_position(answer)
    }

    /// Starts asking the primary where WAL is flushed, in a task of its own (protocol 3): the answer comes
    /// back through [`answer`] while shipping goes on.
    fn ask(&mut self) -> Option<Stop> {
        self.event_due = false;
        self.last_query = Instant::now();
        let Some(pg) = self.pg.clone().filter(|pg| !pg.is_closed()) else {
            return Some(Stop::PrimaryLost(anyhow!(
                "the PostgreSQL connection closed"
            )));
        };
        self.asking = Some(tokio::spawn(async move { pg.position().await }));
        None
    }

    /// While the receiver is more than a segment behind, says every few seconds how much is left, at what
    /// rate and for how long; and once it has caught up, how long that took.
    fn report_catch_up(&mut self) {
        const BEHIND: u64 = 16 << 20;
        const EVERY: Duration = Duration::from_secs(5);
        let acked = self.link.acked();
        let behind = self.pos.flush.saturating_sub(acked);
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        match &mut self.catch_up {
            None if behind > BEHIND => {
                let now = Instant::now();
                self.catch_up = Some(CatchUp {
                    began: now,
                    from: acked,
                    reported: now,
                });
            }
            Some(c) if behind <= BEHIND => {
                let secs = c.began.elapsed().as_secs_f64();
                if secs >= EVERY.as_secs_f64() {
                    let done = acked.saturating_sub(c.from);
                    info!(
                        "caught up: {:.0} MB shipped in {secs:.1} s ({:.1} MB/s); {:.1} MB behind the primary's flush",
                        mb(done),
                        mb(done) / secs.max(0.001),
                        mb(behind)
                    );
                }
                self.catch_up = None;
            }
            Some(c) if c.reported.elapsed() >= EVERY => {
                c.reported = Instant::now();
                let secs = c.began.elapsed().as_secs_f64().max(0.001);
                let rate = acked.saturating_sub(c.from) as f64 / secs;
                let eta = if rate > 0.0 {
                    format!("about {:.0} s to go", behind as f64 / rate)
                } else {
                    "no progress yet".to_owned()
                };
                info!(
                    left_bytes = behind,
                    bytes_per_second = rate as u64,
                    "catching up: {:.0} MB left at {:.1} MB/s, {eta}",
                    mb(behind),
                    mb(rate as u64)
                );
            }
            _ => {}
        }
    }

    /// Takes in the primary's positions (or the failure to get them).
    fn apply_position(
        &mut self,
        answer: anyhow::Result<Position>,
    ) -> Result<Option<Stop>, Failure> {
        let before = self.pos.flush;
        self.pos = match answer {
            Ok(pos) => pos,
            Err(e) => return Ok(Some(Stop::PrimaryLost(e))),
        };
        // tests: the primary's flush reports stop reaching the sender, so what it ships stays provisional
        #[cfg(feature = "failpoints")]
        if fail::eval("sender-flush-frozen", |_| ()).is_some() {
            self.pos.flush = before;
        }
        if self.pos.flush != before {
            self.last_flush_change = Instant::now();
            metrics::METRICS
                .primary_flush_lsn
                .set(self.pos.flush.0 as i64);
        }
        if self.pos.timeline != self.timeline {
            return Err(retry(anyhow!(
                "the primary moved from timeline {} to {}; starting a new session",
                self.timeline,
                self.pos.timeline
            )));
        }
        Ok(None)
    }

    /// The PostgreSQL connection failed. If the server is down while its host lives (a crash, the OOM
    /// killer, `pg_ctl stop`), every record it flushed is still in `pg_wal/`: ship every complete, valid
    /// record beyond what was sent, tell the receiver where the primary's WAL ends, then wait for the server
    /// to come back (crash recovery continues the WAL exactly there) or for shutdown.
    async fn drain(
        &mut self,
        shutdown: &CancellationToken,
        cause: anyhow::Error,
        progressed: &mut bool,
    ) -> Result<Stop, Failure> {
        // A crash takes a moment to show: the postmaster may still exist for a few milliseconds after its
        // backends died. Decide within a few seconds; only a successful connection means "up".
        let deadline = Instant::now() + Duration::from_secs(3);
        let why = loop {
            match server_state(self.data_dir.as_deref(), &self.cfg.pgconn.current()).await {
                ServerState::Up => return Err(retry(cause.context("PostgreSQL is still up"))),
                ServerState::Down(why) => break why,
                ServerState::Unknown(why) if Instant::now() >= deadline => {
                    return Err(retry(cause.context(format!(
                        "PostgreSQL's state is unclear ({why}); not draining pg_wal"
                    ))))
                }
                ServerState::Unknown(_) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Stop::Drain),
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        };
        let down_since = now_micros();
        let started = Instant::now();
        let sent = self.link.sent();
        warn!(%sent, "PostgreSQL is down ({why}; {cause:#}): shipping every complete record left in pg_wal");
        // A server that is shutting down (or restarting) may still write WAL, e.g. its shutdown checkpoint:
        // keep shipping what appears until its postmaster is gone (at most a minute), then report.
        let settle = Instant::now() + Duration::from_secs(60);
        let mut end = self.ship_valid_wal(shutdown, progressed).await?;
        while postmaster_running(self.data_dir.as_deref()) && Instant::now() < settle {
            if let ServerState::Up =
                server_state(self.data_dir.as_deref(), &self.cfg.pgconn.current()).await
            {
                info!("PostgreSQL is back; resuming from {end}");
                return Ok(Stop::PrimaryLost(anyhow!("PostgreSQL restarted")));
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Stop::Drain),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            end = self.ship_valid_wal(shutdown, progressed).await?;
        }
        self.report_down(end, down_since).await?;
        info!(
            wal_end = %end,
            drained_bytes = end.0.saturating_sub(sent.0),
            drain_ms = started.elapsed().as_millis() as u64,
            "primary down: the receiver holds all of its WAL (up to {end}); waiting for PostgreSQL to come back"
        );
        let mut keepalive = tokio::time::interval(self.cfg.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Probe often: a restarted server's end-of-recovery checkpoint may remove old segments at once, so the
        // sender has to be back (and compare, confirm) before the next restart or checkpoint does the same.
        let mut probe = tokio::time::interval(Duration::from_millis(100));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Stop::Drain),
                moved = self.link.recv() => *progressed |= moved?,
                _ = keepalive.tick() => {
                    // only what is proven flushed: the rest of the drained WAL stays provisional
                    let grace = self.cfg.shutdown_grace;
                    let flushed = self.pos.flush;
                    if let Some(stop) = finish_on_shutdown(self.link.keepalive(flushed, now_micros()), shutdown, grace).await? {
                        return Ok(stop);
                    }
                }
                _ = probe.tick() => {
                    if let ServerState::Up = server_state(self.data_dir.as_deref(), &self.cfg.pgconn.current()).await {
                        info!("PostgreSQL is back; resuming from {end}");
                        *progressed = true;
                        return Ok(Stop::PrimaryLost(anyhow!("PostgreSQL restarted")));
                    }
                    // a server restarting after a crash writes WAL before it accepts connections
                    let newer = self.ship_valid_wal(shutdown, progressed).await?;
                    if newer > end {
                        end = newer;
                        self.report_down(end, down_since).await?;
                        info!(wal_end = %end, drain_ms = started.elapsed().as_millis() as u64, "primary down: the receiver holds all of its WAL (up to {end}), including WAL that appeared while PostgreSQL was down");
                    }
                }
            }
        }
    }

    /// Ships every complete, valid record in `pg_wal/` beyond what was sent and waits until the receiver
    /// has made it durable. Returns where the valid WAL ends.
    ///
    /// The server that wrote these records is down, but that does not make them flushed: a power loss can
    /// still take the unflushed tail, and the restarted primary then writes other WAL there. So drained WAL
    /// stays **provisional** (DESIGN.md §1): only what is proven flushed is confirmed (see
    /// [`Streaming::proven_flush`]), the rest is shipped for a failover and compared when a sender resumes.
    async fn ship_valid_wal(
        &mut self,
        shutdown: &CancellationToken,
        progressed: &mut bool,
    ) -> Result<Lsn, Failure> {
        let from = self.link.sent().min(self.pos.flush.max(self.start));
        let walked = self.walk_pg_wal(from)?;
        let end = walked.end.max(self.link.sent());
        let proven = self.proven_flush(&walked);
        if proven > self.pos.flush {
            info!(flushed = %proven, previous = %self.pos.flush, "the stopped primary's WAL is proven flushed up to {proven}");
            self.pos.flush = proven;
        }
        self.pos.insert = self.pos.flush;
        // An old receiver (protocol < 3) takes only flushed WAL. Otherwise ship every valid record, short of
        // the last byte of a segment that is not proven flushed (a segment is completed only with confirmed
        // bytes): by construction of the proof that can only be the segment where the valid WAL ends.
        let target = if !self.ships_on_write() {
            self.pos.flush.min(end)
        } else if end > self.pos.flush {
            end.min(self.provisional_cap())
        } else {
            end
        };
        self.drain_target = Some(target);
        while self.link.sent() < target {
            if self.pump(shutdown).await?.is_some() {
                return Err(retry(anyhow!("shutting down during the drain")));
            }
            if self.link.sent() < target {
                // the window is full: wait for acknowledgements
                tokio::select! {
                    moved = self.link.recv() => *progressed |= moved?,
                    _ = shutdown.cancelled() => return Err(retry(anyhow!("shutting down during the drain"))),
                }
            }
        }
        // confirm what is proven flushed (never more than was sent)
        if self.confirm(shutdown).await?.is_some() {
            return Err(retry(anyhow!("shutting down during the drain")));
        }
        let deadline = tokio::time::Instant::now() + self.cfg.receiver_timeout;
        while self.link.acked() < target {
            tokio::select! {
                moved = self.link.recv() => *progressed |= moved?,
                _ = shutdown.cancelled() => return Err(retry(anyhow!("shutting down during the drain"))),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(retry(anyhow!("the receiver did not acknowledge the drained WAL up to {target} within {:?}", self.cfg.receiver_timeout)));
                }
            }
        }
        Ok(end)
    }

    /// How far the WAL of a primary that is down is proven flushed, from what PostgreSQL itself wrote:
    /// - the flush position it last reported;
    /// - the checkpoint `pg_control` names, when that record is among the valid records walked: PostgreSQL
    ///   updates `pg_control` only after flushing the checkpoint record (`CreateCheckPoint`), so everything up
    ///   to its end was flushed (a clean shutdown's checkpoint ends its WAL);
    /// - the start of the segment where the valid WAL ends: PostgreSQL fsyncs a segment as soon as it has
    ///   written its last page, before it writes any page of the next one (`XLogWrite`, `finishing_seg`), so
    ///   a valid record in segment M proves every segment before M flushed.
    fn proven_flush(&self, walked: &Walked) -> Lsn {
        let mut proven = self.pos.flush;
        if walked.end > Lsn(0) {
            let last = Lsn(walked.end.0 - 1);
            proven = proven.max(self.seg.segment_start(self.seg.segno(last)).min(walked.end));
        }
        if let Some(at) = self.data_dir.as_deref().and_then(|d| {
            pg_control_checkpoint(d, self.reader.expectation(self.timeline).system_identifier)
        }) {
            if let Some((_, end)) = walked.checkpoints.iter().find(|(start, _)| *start == at) {
                proven = proven.max(*end);
            }
        }
        proven
    }

    /// Tells the receiver (protocol 2+) that the primary is down and where its WAL ends.
    async fn report_down(&mut self, end: Lsn, since: u64) -> Result<(), Failure> {
        if self.features.primary_down() {
            let msg = SenderMessage::PrimaryDown {
                timeline: self.timeline,
                wal_end: end,
                down_since_unix_micros: since,
            };
            self.link.send(msg, "sending PrimaryDown").await?;
        }
        Ok(())
    }

    /// Walks the valid records in `pg_wal/` from the page holding `from`: where the last complete, valid
    /// record ends, and the checkpoint records on the way.
    fn walk_pg_wal(&self, from: Lsn) -> Result<Walked, Failure> {
        const CHUNK: usize = 1 << 20;
        let exp = self.reader.expectation(self.timeline);
        let base = Lsn(from.0 - from.0 % walship_protocol::wal::XLOG_BLCKSZ as u64);
        let mut buf: Vec<u8> = Vec::new();
        let mut walker: Option<Walker> = None;
        let mut checkpoints = Vec::new();
        let mut note = |r: &walship_protocol::walker::Record| {
            if r.is_checkpoint() {
                checkpoints.push((r.start, r.end));
            }
        };
        loop {
            let at = Lsn(base.0 + buf.len() as u64);
            let chunk = self
                .reader
                .read_raw(self.timeline, at, CHUNK)
                .map_err(|e| retry(anyhow::Error::new(e)))?;
            if chunk.is_empty() {
                break;
            }
            buf.extend_from_slice(&chunk);
            let w = match &mut walker {
                Some(w) => w,
                None => match Walker::resync(exp, &buf, base) {
                    Ok(w) => walker.insert(w),
                    Err(WalkStop::NeedMore { .. }) => continue,
                    Err(stop) => {
                        warn!(%from, "no valid record after {from}: {stop}");
                        break;
                    }
                },
            };
            match w.walk(&buf, base, &mut note) {
                WalkStop::NeedMore { .. } => continue,
                stop => {
                    debug!(%from, "the WAL in pg_wal ends at {}: {stop}", w.next_lsn());
                    break;
                }
            }
        }
        Ok(Walked {
            end: walker.map(|w| w.next_lsn()).unwrap_or(from).max(from),
            checkpoints,
        })
    }
}

/// What a walk of `pg_wal/` found.
struct Walked {
    /// Where the last complete, valid record ends.
    end: Lsn,
    /// The checkpoint records walked: (start, end).
    checkpoints: Vec<(Lsn, Lsn)>,
}

/// The location of the latest checkpoint that `global/pg_control` in `data_dir` names, if the file belongs
/// to the cluster `system_identifier`. `ControlFileData` starts (9.3+) with `system_identifier: u64`,
/// `pg_control_version: u32`, `catalog_version_no: u32`, `state: u32`, `time: i64` (aligned to 8) and
/// `checkPoint: u64` at offset 32, native byte order. The caller trusts the location only if a valid
/// checkpoint record starts there.
fn pg_control_checkpoint(data_dir: &std::path::Path, system_identifier: u64) -> Option<Lsn> {
    use std::io::Read;
    let mut head = [0u8; 40];
    std::fs::File::open(data_dir.join("global").join("pg_control"))
        .and_then(|mut f| f.read_exact(&mut head))
        .ok()?;
    let sysid = u64::from_le_bytes(head[0..8].try_into().ok()?);
    if sysid != system_identifier {
        return None;
    }
    Some(Lsn(u64::from_le_bytes(head[32..40].try_into().ok()?)))
}

/// What the sender can tell of the primary's server after its connection failed.
enum ServerState {
    /// A new connection works.
    Up,
    /// The server refuses connections: nothing listens, its socket is gone, or it is starting up, in
    /// crash recovery or shutting down.
    Down(String),
    /// Neither (yet).
    Unknown(String),
}

/// What `postmaster.pid` in `data_dir` says of the postmaster.
enum Postmaster {
    /// Running (a server that is up, shutting down or restarting).
    Running,
    /// The file is gone (a clean shutdown), or its process is gone or a zombie waiting to be reaped.
    Gone(String),
    /// No data directory, or the file cannot be read.
    Unknown,
}

fn postmaster(data_dir: Option<&std::path::Path>) -> Postmaster {
    let Some(dir) = data_dir else {
        return Postmaster::Unknown;
    };
    let text = match std::fs::read_to_string(dir.join("postmaster.pid")) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Postmaster::Gone("postmaster.pid is gone".into())
        }
        Err(_) => return Postmaster::Unknown,
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return Postmaster::Unknown;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if stat.is_empty() || state == Some("Z") || state == Some("X") {
        Postmaster::Gone(format!("its postmaster (pid {pid}) is gone"))
    } else {
        Postmaster::Running
    }
}

/// Whether the postmaster still runs (a server shutting down or restarting).
fn postmaster_running(data_dir: Option<&std::path::Path>) -> bool {
    matches!(postmaster(data_dir), Postmaster::Running)
}

/// Only positive evidence counts as "down": the server refusing connections (nothing listens, its socket is
/// gone, or it says it is starting up, in recovery or shutting down). A missing `postmaster.pid` or an
/// unreadable `/proc/PID` alone proves nothing (a sender in another PID or mount namespace, a container
/// sidecar, `--wal-dir` without the data directory), so a working connection always means "up".
async fn server_state(data_dir: Option<&std::path::Path>, pgconn: &conninfo::Conn) -> ServerState {
    let postmaster = match postmaster(data_dir) {
        Postmaster::Gone(why) => format!("{why}; "),
        _ => String::new(),
    };
    match tokio::time::timeout(Duration::from_secs(2), Primary::connect(pgconn)).await {
        Ok(Ok(_)) => ServerState::Up,
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            let down = [
                "starting up",
                "shutting down",
                "in recovery mode",
                "not yet accepting connections",
                "Connection refused",
                "No such file or directory",
            ];
            if down.iter().any(|p| text.contains(p)) {
                ServerState::Down(format!("{postmaster}it refuses connections: {text}"))
            } else {
                ServerState::Unknown(format!("{postmaster}{text}"))
            }
        }
        Err(_) => ServerState::Unknown(format!("{postmaster}a connection attempt timed out")),
    }
}

/// Runs a send to completion. If shutdown comes meanwhile, the send gets `grace` more to finish (then the
/// session drains); a send still blocked after that means the receiver takes nothing: stop at once.
async fn finish_on_shutdown<F>(
    send: F,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Result<Option<Stop>, Failure>
where
    F: std::future::Future<Output = Result<(), LinkError>>,
{
    tokio::pin!(send);
    tokio::select! {
        r = &mut send => { r?; Ok(None) }
        _ = shutdown.cancelled() => match tokio::time::timeout(grace, &mut send).await {
            Ok(r) => { r?; Ok(Some(Stop::Drain)) }
            Err(_) => {
                warn!("shutting down while the receiver was not taking WAL for {grace:?}; closing without waiting");
                Ok(Some(Stop::Abandon))
            }
        },
    }
}

/// Precise re-poll interval right after a file-system event while a flush is pending.
const HOT_POLL: Duration = Duration::from_micros(250);
/// How many precise re-polls one burst of events allows (then 1 ms polls take over).
const HOT_POLLS: u32 = 12;
/// Under sustained load, the shortest time between two position queries.
const MIN_QUERY_GAP: Duration = Duration::from_micros(500);
/// Protocol 3 (ship on write): while shipped or written WAL is unconfirmed, the time between two flush
/// queries. Shipping does not wait for them; they only confirm (and release the slot).
const CONFIRM_GAP: Duration = Duration::from_millis(5);
/// No flush for this long makes the next event the start of a burst (precise re-polls allowed).
const QUIET: Duration = Duration::from_millis(5);

type Events = inotify::EventStream<Vec<u8>>;

fn watch_dir(dir: &std::path::Path) -> std::io::Result<Events> {
    let inotify = inotify::Inotify::init()?;
    inotify.watches().add(
        dir,
        inotify::WatchMask::MODIFY
            | inotify::WatchMask::CREATE
            | inotify::WatchMask::MOVED_TO
            | inotify::WatchMask::CLOSE_WRITE,
    )?;
    inotify.into_event_stream(vec![0u8; 16 * 1024])
}

/// The answer to the flush query in progress; pending while there is none.
async fn answer(
    asking: &mut Option<tokio::task::JoinHandle<anyhow::Result<Position>>>,
) -> anyhow::Result<Position> {
    match asking {
        Some(task) => match task.await {
            Ok(answer) => answer,
            Err(e) => Err(anyhow!("the flush query task failed: {e}")),
        },
        None => std::future::pending().await,
    }
}

async fn next_event(events: &mut Option<Events>) {
    match events {
        Some(s) => {
            if s.next().await.is_none() {
                *events = None;
            }
        }
        None => std::future::pending().await,
    }
}
