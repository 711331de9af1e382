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
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use walship_protocol::message::{Hello, Wal};
use walship_protocol::wal::parse_history;
use walship_protocol::{
    Lsn, MessageCodec, ReceiverMessage, SenderMessage, TimelineId, WalSegSize,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

use crate::postgres::Primary;
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

/// Runs the sender until `shutdown` is cancelled (returns `Ok`) or a fatal error (returns it).
pub async fn run(cfg: SenderConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut progressed = false;
        let outcome = session(&cfg, &shutdown, &mut progressed).await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                if progressed {
                    backoff = Duration::from_millis(100);
                }
                warn!("{e:#}; reconnecting in {} ms", backoff.as_millis());
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(cfg.max_backoff);
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

async fn session(
    cfg: &SenderConfig,
    shutdown: &CancellationToken,
    progressed: &mut bool,
) -> Result<(), Failure> {
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
    let mut reader = WalReader::new(&wal_dir, info.seg, info.magic, info.system_identifier);
    let mut events = match watch_dir(&wal_dir) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(dir = %wal_dir.display(), error = %e, "no inotify on the WAL directory; polling every {:?}", cfg.poll_interval);
            None
        }
    };
    let mut pos = pg.position().await.map_err(retry)?;
    let timeline = pos.timeline;

    let tls = crate::link::connect(
        &cfg.receiver,
        &cfg.server_name,
        cfg.tls.clone(),
        cfg.connect_timeout,
    )
    .await
    .map_err(retry)?;
    let (rd, wr) = tokio::io::split(tls);
    let mut rx = FramedRead::new(
        rd,
        MessageCodec::<ReceiverMessage, SenderMessage>::default(),
    );
    let mut tx = FramedWrite::new(
        wr,
        MessageCodec::<ReceiverMessage, SenderMessage>::default(),
    );
    tx.send(SenderMessage::Hello(Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        system_identifier: info.system_identifier,
        timeline,
        wal_segment_size: info.seg.bytes(),
        pg_version_num: info.version_num,
        sender_name: cfg.name.clone(),
    }))
    .await
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
    for t in 2..=timeline {
        if let Some(content) = reader
            .history(t)
            .context("read timeline history file")
            .map_err(retry)?
        {
            tx.send(SenderMessage::History {
                timeline: t,
                content: content.into(),
            })
            .await
            .context("send history file")
            .map_err(retry)?;
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

    let mut sent = start;
    let mut acked = start;
    let mut last_heard = Instant::now();
    let mut keepalive = tokio::time::interval(cfg.keepalive_interval);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = Instant::now();
    let mut slot_at = Lsn(0);
    let mut slot_moved = Instant::now();
    let mut hot = 0u32;
    let mut event_due = false;
    let mut last_query = Instant::now();
    let mut last_flush_change = Instant::now();
    loop {
        let mut wrote = false;
        while sent < pos.flush && sent.0 - acked.0 < cfg.window {
            let seg_end = info.seg.segment_start(info.seg.segno(sent) + 1);
            let end = Lsn(pos.flush.0.min(seg_end.0).min(sent.0 + cfg.max_message));
            // A plain blocking read: the runtime is this one thread, and WAL just written is in the page cache.
            let bytes = reader.read(timeline, sent, end).map_err(read_failure)?;
            tx.feed(SenderMessage::Wal(Wal {
                timeline,
                start_lsn: sent,
                bytes,
            }))
            .await
            .context("send WAL")
            .map_err(retry)?;
            sent = end;
            wrote = true;
        }
        if wrote {
            tx.flush().await.context("send WAL").map_err(retry)?;
        }
        if let Some(slot) = &cfg.slot {
            // at most once a second: release WAL the receiver has made durable
            if acked > slot_at && acked > start && slot_moved.elapsed() >= Duration::from_secs(1) {
                slot_moved = Instant::now();
                match pg.advance_slot(slot, acked).await {
                    Ok(()) => slot_at = acked,
                    Err(e) => warn!("{e:#}"),
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = Instant::now();
            info!(flush = %pos.flush, %sent, %acked, behind = pos.flush.saturating_sub(acked), "progress");
        }
        // No file-system event announces a flush (only the write before it). While WAL is inserted but not yet
        // flushed, re-poll soon. After a quiet spell (a commit arriving alone) the first event starts precise
        // short re-polls, since the primary's fsync takes a fraction of a millisecond. Under sustained load the
        // events keep coming; then at most one query per MIN_QUERY_GAP keeps the cost on the primary low.
        let pending = pos.insert > pos.flush;
        let mut query = false;
        if pending && hot > 0 {
            hot -= 1;
            // tokio's timers tick in milliseconds; nothing else waits on this thread meanwhile
            std::thread::sleep(HOT_POLL);
            while let Some(msg) = rx.next().now_or_never() {
                last_heard = Instant::now();
                on_receiver_message(msg, timeline, sent, &mut acked, progressed)?;
            }
            query = true;
        } else {
            let poll = if event_due {
                MIN_QUERY_GAP.saturating_sub(last_query.elapsed())
            } else if pending {
                Duration::from_millis(1)
            } else {
                cfg.poll_interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => {
                    info!(%sent, %acked, "shutting down");
                    // end the TLS session properly (close_notify); the receiver keeps what it acknowledged
                    let _ = tokio::time::timeout(Duration::from_secs(2), tx.close()).await;
                    return Ok(());
                }
                msg = rx.next() => {
                    last_heard = Instant::now();
                    on_receiver_message(msg, timeline, sent, &mut acked, progressed)?;
                }
                _ = next_event(&mut events), if !event_due => {
                    // one query covers every event already queued
                    while let Some(Some(_)) = events.as_mut().and_then(|e| e.next().now_or_never()) {}
                    if last_query.elapsed() >= MIN_QUERY_GAP {
                        query = true;
                    } else {
                        event_due = true;
                    }
                    if last_flush_change.elapsed() >= QUIET {
                        hot = HOT_POLLS;
                    }
                }
                _ = tokio::time::sleep(poll) => query = true,
                _ = keepalive.tick() => {
                    if last_heard.elapsed() > cfg.receiver_timeout {
                        return Err(retry(anyhow!("no answer from the receiver for {:?}", cfg.receiver_timeout)));
                    }
                    tx.send(SenderMessage::Keepalive { primary_flush_lsn: pos.flush, timeline, sent_at_unix_micros: now_micros() })
                        .await
                        .context("send keepalive")
                        .map_err(retry)?;
                }
            }
        }
        if query {
            event_due = false;
            last_query = Instant::now();
            let before = pos.flush;
            if pg.is_closed() {
                return Err(retry(anyhow!("the PostgreSQL connection closed")));
            }
            pos = pg.position().await.map_err(retry)?;
            if pos.flush != before {
                last_flush_change = Instant::now();
            }
            if pos.timeline != timeline {
                return Err(retry(anyhow!(
                    "the primary moved from timeline {timeline} to {}; starting a new session",
                    pos.timeline
                )));
            }
        }
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

/// Handles one message from the receiver during streaming.
fn on_receiver_message(
    msg: Option<Result<ReceiverMessage, walship_protocol::FrameError>>,
    timeline: TimelineId,
    sent: Lsn,
    acked: &mut Lsn,
    progressed: &mut bool,
) -> Result<(), Failure> {
    match msg {
        Some(Ok(ReceiverMessage::Ack {
            timeline: t,
            durable_lsn,
        })) => {
            if t == timeline && durable_lsn > *acked {
                if durable_lsn > sent {
                    return Err(retry(anyhow!(
                        "protocol violation: ack of {durable_lsn} beyond what was sent ({sent})"
                    )));
                }
                *acked = durable_lsn;
                *progressed = true;
            }
            Ok(())
        }
        Some(Ok(ReceiverMessage::Error { reason })) => {
            Err(retry(anyhow!("the receiver closed the session: {reason}")))
        }
        Some(Ok(other)) => Err(retry(anyhow!(
            "protocol violation: unexpected {other:?} from the receiver"
        ))),
        Some(Err(e)) => Err(retry(
            anyhow::Error::new(e).context("bad frame from the receiver"),
        )),
        None => Err(retry(anyhow!("the receiver closed the connection"))),
    }
}

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
