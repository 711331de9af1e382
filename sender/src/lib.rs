//! walship sender: asks the primary where its WAL is flushed, reads the new bytes straight out of the segment
//! files in `pg_wal/`, validates their page headers and streams them to a walship receiver over TLS.
//!
//! | module        | what it owns |
//! |---------------|--------------|
//! | [`postgres`]  | the tokio-postgres connection: version dialect, identity, segment size, flush position |
//! | [`wal_reader`]| reading and validating segment files |
//! | [`link`]      | the TLS connection to the receiver |
//!
//! The loop ([`run`]): connect to PostgreSQL and to the receiver, say `Hello`, resume where the receiver's
//! `Welcome` says its durable WAL ends, then repeat: wait for new WAL (inotify on the WAL directory, a short
//! poll as a fallback, a 1 ms re-poll while written WAL is not yet flushed), read the flush position, send
//! `[shipped, flush)` in chunks while fewer than `window` bytes are unacknowledged. Any network or PostgreSQL
//! error restarts the session after a backoff; the receiver's `Welcome` says where to continue, so nothing is
//! lost or reordered.
#![forbid(unsafe_code)]

pub mod link;
pub mod postgres;
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

use crate::link::{Backoff, Link, LinkError};
use crate::postgres::{Position, Primary};
use crate::wal_reader::{ReadError, WalReader};

/// Everything the sender needs, with defaults in [`SenderConfig::new`].
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// libpq-style connection string of the primary.
    pub pgconn: String,
    /// `HOST:PORT` of the receiver.
    pub receiver: String,
    /// The name the receiver's certificate must carry.
    pub server_name: String,
    pub tls: Arc<rustls::ClientConfig>,
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
        pgconn: String,
        receiver: String,
        server_name: String,
        tls: Arc<rustls::ClientConfig>,
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

/// Runs the sender until `shutdown` is cancelled (returns `Ok`) or a fatal error (returns it).
pub async fn run(cfg: SenderConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(cfg.max_backoff);
    let mut acked_before: Option<(TimelineId, Lsn)> = None;
    loop {
        let mut progressed = false;
        let outcome = session(&cfg, &shutdown, &mut progressed, &mut acked_before).await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                if progressed {
                    backoff.reset();
                }
                let wait = backoff.next_wait();
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
        return Ok(*lsn);
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
) -> Result<(), Failure> {
    // Connecting and the handshake send no WAL: shutdown may interrupt them anywhere.
    let opened = tokio::select! {
        r = open(cfg, *acked_before) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let mut streaming = opened;
    let outcome = streaming.run(shutdown, progressed).await;
    let acked = streaming.link.acked();
    if acked > streaming.start {
        *acked_before = Some((streaming.timeline, acked));
    }
    match outcome {
        Ok(Stop::Drain) => {
            let Streaming { link, pos, .. } = streaming;
            let sent = link.sent();
            let acked = link.drain_and_close(cfg.shutdown_grace).await;
            info!(flush = %pos.flush, %sent, %acked, "stopped: the receiver holds everything up to {acked}");
            Ok(())
        }
        Ok(Stop::Abandon) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Connects to PostgreSQL and to the receiver and completes the handshake. Cancellation safe.
async fn open(
    cfg: &SenderConfig,
    acked_before: Option<(TimelineId, Lsn)>,
) -> Result<Streaming<'_>, Failure> {
    let pg = tokio::time::timeout(cfg.connect_timeout, Primary::connect(&cfg.pgconn))
        .await
        .map_err(|_| retry(anyhow!("connecting to PostgreSQL timed out")))?
        .map_err(|e| {
            if e.to_string().contains("not supported") || e.to_string().contains("in recovery") {
                Failure::Fatal(e)
            } else {
                Failure::Retry(e)
            }
        })?;
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
    let reader = WalReader::new(&wal_dir, info.seg, info.magic, info.system_identifier);
    let events = match watch_dir(&wal_dir) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(dir = %wal_dir.display(), error = %e, "no inotify on the WAL directory; polling every {:?}", cfg.poll_interval);
            None
        }
    };
    let pos = pg.position().await.map_err(retry)?;
    let timeline = pos.timeline;

    let tls = crate::link::connect(
        &cfg.receiver,
        &cfg.server_name,
        cfg.tls.clone(),
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
    let resume = match tokio::time::timeout(cfg.connect_timeout, rx.next()).await {
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
        Ok(Some(Ok(ReceiverMessage::Welcome { resume, .. }))) => resume,
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

    if let Some(slot) = &cfg.slot {
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
    let mut link = Link::new(rx, tx, timeline, start, cfg.window, cfg.receiver_timeout);
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
        wal_dir = %wal_dir.display(),
        timeline,
        %start,
        flush = %pos.flush,
        segment_size = %info.seg,
        "streaming"
    );
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
    Ok(Streaming {
        cfg,
        pg,
        reader,
        events,
        link,
        seg: info.seg,
        timeline,
        start,
        pos,
        hot: 0,
        event_due: false,
        last_query: Instant::now(),
        last_flush_change: Instant::now(),
        slot_at: Lsn(0),
        slot_moved: Instant::now(),
        last_report: Instant::now(),
    })
}

/// How streaming ended on shutdown.
enum Stop {
    /// Wait for the receiver to acknowledge what was sent, then close.
    Drain,
    /// A send to the receiver was blocked when shutdown came: closing at once (nothing would drain).
    Abandon,
}

/// The streaming phase of a session.
///
/// Invariants: `link.acked() <= link.sent() <= pos.flush` (nothing beyond the primary's flush position is
/// ever read or sent), and everything in `[start, link.sent())` was read from `pg_wal` and validated.
struct Streaming<'a> {
    cfg: &'a SenderConfig,
    pg: Primary,
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
    /// An event arrived while the last query was too recent: query at `last_query + MIN_QUERY_GAP`.
    event_due: bool,
    last_query: Instant,
    last_flush_change: Instant,
    /// Where the replication slot was last advanced to, and when.
    slot_at: Lsn,
    slot_moved: Instant,
    last_report: Instant,
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
            self.maintain_slot().await;
            if self.last_report.elapsed() >= Duration::from_secs(60) {
                self.last_report = Instant::now();
                info!(flush = %self.pos.flush, sent = %self.link.sent(), acked = %self.link.acked(), behind = self.pos.flush.saturating_sub(self.link.acked()), "progress");
            }
            // No file-system event announces a flush (only the write before it). While WAL is inserted but not
            // yet flushed, re-poll soon. After a quiet spell (a commit arriving alone) the first event starts
            // precise short re-polls, since the primary's fsync takes a fraction of a millisecond. Under
            // sustained load the events keep coming; then at most one query per MIN_QUERY_GAP keeps the cost on
            // the primary low.
            let pending = self.pos.insert > self.pos.flush;
            let mut query = false;
            if pending && self.hot > 0 {
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
                self.query().await?;
            }
        }
    }

    /// Sends `[sent, flush)` while the window has room. Returns how to stop if shutdown came meanwhile.
    async fn pump(&mut self, shutdown: &CancellationToken) -> Result<Option<Stop>, Failure> {
        let grace = self.cfg.shutdown_grace;
        let mut wrote = false;
        while self.link.sent() < self.pos.flush && self.link.has_room() {
            if shutdown.is_cancelled() {
                break;
            }
            let sent = self.link.sent();
            let seg_end = self.seg.segment_start(self.seg.segno(sent) + 1);
            let end = Lsn(self
                .pos
                .flush
                .0
                .min(seg_end.0)
                .min(sent.0 + self.cfg.max_message));
            // A plain blocking read: the runtime is this one thread, and WAL just written is in the page cache.
            let bytes = self
                .reader
                .read(self.timeline, sent, end)
                .map_err(read_failure)?;
            crash_point!("sender-read-before-send");
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
        let acked = self.link.acked();
        if acked > self.slot_at
            && acked > self.start
            && self.slot_moved.elapsed() >= Duration::from_secs(1)
        {
            self.slot_moved = Instant::now();
            match self.pg.advance_slot(slot, acked).await {
                Ok(()) => self.slot_at = acked,
                Err(e) => warn!("{e:#}"),
            }
        }
    }

    /// Asks the primary where WAL is flushed.
    async fn query(&mut self) -> Result<(), Failure> {
        self.event_due = false;
        self.last_query = Instant::now();
        let before = self.pos.flush;
        if self.pg.is_closed() {
            return Err(retry(anyhow!("the PostgreSQL connection closed")));
        }
        self.pos = self.pg.position().await.map_err(retry)?;
        if self.pos.flush != before {
            self.last_flush_change = Instant::now();
        }
        if self.pos.timeline != self.timeline {
            return Err(retry(anyhow!(
                "the primary moved from timeline {} to {}; starting a new session",
                self.timeline,
                self.pos.timeline
            )));
        }
        Ok(())
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
