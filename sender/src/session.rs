//! One session with the receiver: connecting to PostgreSQL and to the receiver, the handshake, where to
//! resume ([`decide_start`]), and what a failed read of `pg_wal/` means.

use super::*;
use crate::link::{Rx, Tx};
use walship_protocol::{Compression, Features};

pub(crate) fn read_failure(e: ReadError) -> Failure {
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
pub(crate) fn resume_past_removed(
    lsn: Lsn,
    timeline: TimelineId,
    seg: WalSegSize,
    reader: &WalReader,
) -> Lsn {
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
pub(crate) fn decide_start(
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
pub(crate) async fn session(
    cfg: &SenderConfig,
    state: &StatePublisher,
    shutdown: &CancellationToken,
    progressed: &mut bool,
    acked_before: &mut Option<(TimelineId, Lsn)>,
    remembered: &mut Option<Origin>,
) -> Result<(), Failure> {
    // Connecting and the handshake send no WAL: shutdown may interrupt them anywhere.
    let opened = tokio::select! {
        r = open(cfg, state, *acked_before, remembered) => r?,
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
    let confirmed = streaming.link.confirmed();
    if confirmed > streaming.start {
        *acked_before = Some((streaming.timeline, confirmed));
    }
    match outcome {
        Ok(Stop::Shutdown) => {
            let Streaming {
                link,
                pos,
                shipped_on_write_total,
                ..
            } = streaming;
            let sent = link.sent();
            let acked = link.close_when_acknowledged(cfg.shutdown_grace).await;
            info!(flush = %pos.flush, %sent, %acked, shipped_on_write_bytes = shipped_on_write_total, "stopped: the receiver holds everything up to {acked}");
            Ok(())
        }
        Ok(Stop::Abandon) => Ok(()),
        Ok(Stop::PrimaryLost(e)) => Err(retry(e)),
        Err(e) => Err(e),
    }
}

/// Connects to PostgreSQL and to the receiver and completes the handshake. Cancellation safe.
pub(crate) async fn open<'a>(
    cfg: &'a SenderConfig,
    state: &StatePublisher,
    acked_before: Option<(TimelineId, Lsn)>,
    remembered: &mut Option<Origin>,
) -> Result<Streaming<'a>, Failure> {
    let (pg, origin) = connect_primary(cfg, remembered).await?;
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

    let (rx, tx, resume, features, compression) = handshake(cfg, &info, timeline).await?;
    if let (Some(slot), Some(pg)) = (&cfg.slot, &pg) {
        pg.ensure_slot(slot).await.map_err(|e| {
            if crate::postgres::Unfixable::is_in(&e) {
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
    let mut link = Link::new(
        rx,
        tx,
        (timeline, start),
        cfg.window,
        cfg.receiver_timeout,
        state.clone(),
    );
    // zstd on the wire when both sides want it (the receiver says so in its Welcome)
    if compression == walship_protocol::Compression::Zstd {
        link.compress_with(cfg.compression_level, cfg.compress_min);
    }
    prove_and_send_history(&mut link, &mut reader, timeline, start, resumed, info.seg).await?;
    let walsender = match &pg {
        Some(_) => open_walsender(cfg, &info, timeline, start).await?,
        None => None,
    };
    announce(cfg, &wal_dir, &info, &pos, start, acked_before);
    state.streaming(timeline, start);
    let data_dir = Origin::data_dir_of(&info, &wal_dir);
    let opened = Opened {
        pg,
        data_dir,
        features,
        reader,
        events,
        link,
        timeline,
        start,
        pos,
        walsender,
    };
    Ok(Streaming::new(cfg, opened, info.seg))
}

/// The walsender's stream as the flush signal (and with `--synchronous` the durable report), unless
/// `--confirm-by query`. With `auto`, a primary that refuses a replication connection leaves the query.
async fn open_walsender(
    cfg: &SenderConfig,
    info: &ServerInfo,
    timeline: TimelineId,
    start: Lsn,
) -> Result<Option<Walsender>, Failure> {
    use replication::ConfirmBy;
    if cfg.confirm_by == ConfirmBy::Query {
        return Ok(None);
    }
    let conn = cfg.pgconn.current();
    let opening = Walsender::open(
        &conn,
        &cfg.standby_name,
        info.system_identifier,
        timeline,
        start,
        cfg.synchronous,
    );
    let e = match tokio::time::timeout(cfg.connect_timeout, opening).await {
        Ok(Ok(w)) => {
            info!(from = %w.from, synchronous = cfg.synchronous, application_name = %cfg.standby_name, "the primary's walsender streams from its flush position: it confirms what was shipped");
            return Ok(Some(w));
        }
        Ok(Err(e)) => e,
        Err(_) => anyhow!("opening the replication connection timed out"),
    };
    if crate::error::Unfixable::is_in(&e) {
        return Err(Failure::Fatal(e));
    }
    if cfg.confirm_by == ConfirmBy::Auto {
        warn!("{e:#}; the flush position is polled instead (--confirm-by query says so without this warning)");
        return Ok(None);
    }
    let what = if cfg.synchronous {
        "--synchronous"
    } else {
        "--confirm-by replication"
    };
    match replication::fix_for(&e) {
        Some(fix) => Err(Failure::Fatal(
            e.context(format!("{what} needs a replication connection: {fix}")),
        )),
        None => Err(retry(
            e.context(format!("{what} needs a replication connection")),
        )),
    }
}

/// What a session opened with.
pub(crate) struct Opened {
    pg: Option<Arc<Primary>>,
    data_dir: Option<PathBuf>,
    features: Features,
    reader: WalReader,
    events: Option<Events>,
    link: Link,
    timeline: TimelineId,
    start: Lsn,
    pos: Position,
    walsender: Option<Walsender>,
}

impl<'a> Streaming<'a> {
    /// The streaming phase of a session just opened: nothing shipped yet beyond `start`.
    fn new(cfg: &'a SenderConfig, o: Opened, seg: WalSegSize) -> Streaming<'a> {
        let start = o.start;
        let mut pos = o.pos;
        // the walsender streams from the primary's flush position when it began: all before it is flushed
        if let Some(w) = &o.walsender {
            pos.flush = pos.flush.max(w.from);
            pos.insert = pos.insert.max(pos.flush);
        }
        Streaming {
            cfg,
            pg: o.pg,
            data_dir: o.data_dir,
            features: o.features,
            reader: o.reader,
            events: o.events,
            link: o.link,
            seg,
            timeline: o.timeline,
            start,
            pos,
            hot: 0,
            event_due: false,
            scout: Scout::default(),
            confirm_sent: start,
            last_query: Instant::now(),
            last_ack_wake: Instant::now(),
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
            // the first look at once (the receiver learns the synchronous state early)
            primary_view: (
                None,
                Instant::now()
                    .checked_sub(Duration::from_secs(60))
                    .unwrap_or_else(Instant::now),
            ),
            sync_state: None,
            sync_state_told: None,
            drain_target: None,
            cross: o
                .walsender
                .as_ref()
                .map(|w| replication::CrossCheck::new(w.from, CROSS_CHECK_LIMIT)),
            walsender: o.walsender,
        }
    }
}

/// Whether the peer ended the TLS session with an alert (it refused our certificate).
fn tls_alert(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(_)))
    })
}

/// Connects to PostgreSQL and learns what the session needs of it. When the server is down and this process
/// knew it before, the session goes on with what it knew (to drain `pg_wal/`, see `drain`).
async fn connect_primary(
    cfg: &SenderConfig,
    remembered: &mut Option<Origin>,
) -> Result<(Option<Arc<Primary>>, Origin), Failure> {
    let connected =
        tokio::time::timeout(cfg.connect_timeout, Primary::connect(&cfg.pgconn.current()))
            .await
            .map_err(|_| retry(anyhow!("connecting to PostgreSQL timed out")))
            .and_then(|r| {
                r.map_err(|e| {
                    if let Some(fix) = crate::postgres::fatal_cause(&e) {
                        Failure::Fatal(e.context(fix))
                    } else if crate::postgres::Unfixable::is_in(&e) {
                        Failure::Fatal(e)
                    } else {
                        Failure::Retry(e)
                    }
                })
            });
    match connected {
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
            Ok((Some(Arc::new(pg)), origin))
        }
        Err(Failure::Retry(e)) => {
            // PostgreSQL went down while this process was not streaming (between sessions): its WAL may
            // still hold records the archive lacks. Drain them with what this process knows of the primary.
            let Some(origin) = remembered.clone() else {
                return Err(Failure::Retry(e));
            };
            match server_state(origin.data_dir().as_deref(), &cfg.pgconn.current()).await {
                ServerState::Down(_) => Ok((None, origin)),
                _ => Err(Failure::Retry(e)),
            }
        }
        Err(fatal) => Err(fatal),
    }
}

/// The receiver's side of the handshake: TLS, `Hello`, and its `Welcome` (where to resume, the protocol's
/// features, compression on the wire) or its refusal.
async fn handshake(
    cfg: &SenderConfig,
    info: &ServerInfo,
    timeline: TimelineId,
) -> Result<(Rx, Tx, Vec<(TimelineId, Lsn)>, Features, Compression), Failure> {
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
    let (resume, features, compression) = read_welcome(&mut rx, cfg.connect_timeout).await?;
    Ok((rx, tx, resume, features, compression))
}

/// The receiver's answer to `Hello`: where to resume, the protocol's features and compression on the wire;
/// a refusal is fatal unless the receiver says it is transient.
async fn read_welcome(
    rx: &mut Rx,
    timeout: Duration,
) -> Result<(Vec<(TimelineId, Lsn)>, Features, Compression), Failure> {
    let answer = tokio::time::timeout(timeout, rx.next()).await;
    let welcomed = match answer {
        Err(_) => {
            return Err(retry(anyhow!(
                "the receiver did not answer Hello within {:?}",
                timeout
            )))
        }
        Ok(None) => {
            return Err(retry(anyhow!(
                "the receiver closed the connection during the handshake (certificate refused?)"
            )))
        }
        Ok(Some(Err(e))) => {
            let e = anyhow::Error::new(e);
            return Err(retry(if tls_alert(&e) {
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
            let transient = code.is_transient();
            let e = anyhow::Error::new(crate::error::Refused { code, reason });
            return Err(if transient {
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
    Ok(welcomed)
}

/// Proves that this server continues the archive's history, then sends the timeline history files.
async fn prove_and_send_history(
    link: &mut Link,
    reader: &mut WalReader,
    timeline: TimelineId,
    start: Lsn,
    resumed: bool,
    seg: WalSegSize,
) -> Result<(), Failure> {
    // Prove that this server continues the archive's history: resend the page before the resume point
    // (within its segment). The receiver holds those bytes confirmed and compares them, so another primary
    // of this cluster (a restored copy started as a primary, a split brain) is refused before it writes.
    let proof_from = Lsn(start
        .0
        .saturating_sub(walship_protocol::wal::XLOG_BLCKSZ as u64)
        .max(seg.floor(start).0));
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
    Ok(())
}

/// Says that the session streams (log, metrics, systemd status), and loudly when the receiver resumes
/// behind what it acknowledged to this process before.
fn announce(
    cfg: &SenderConfig,
    wal_dir: &std::path::Path,
    info: &ServerInfo,
    pos: &Position,
    start: Lsn,
    acked_before: Option<(TimelineId, Lsn)>,
) {
    let timeline = pos.timeline;
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
}
