//! The session's connection task: frames in (WAL merged into larger writes, confirmations, history files,
//! primary-down reports), `Ack`s out as the writer makes WAL durable, every stage with a deadline.

use super::*;

/// What the session was opened for: the sender's `Hello`, the negotiated features, and where the archive's
/// durable WAL of its timeline ends.
pub(crate) struct Opened<'h> {
    pub hello: &'h Hello,
    pub features: Features,
    pub start: Option<(TimelineId, Lsn)>,
}

/// The connection task's state between events.
struct Stream<'a, S> {
    shared: &'a Arc<Shared>,
    timeline: TimelineId,
    features: Features,
    writer: Writer<S>,
    /// Commands to the writer task (bounded: a slow disk slows the socket).
    tx: mpsc::Sender<Cmd>,
    /// WAL received while the writer is busy (fsyncing): merged into one command, so that the next fsync
    /// covers all of it however small the messages are (a sender shipping on write sends one per commit).
    pending: Pending,
    /// The last position acknowledged to the sender.
    last_ack: Option<(TimelineId, Synced)>,
    /// One zstd context for the session's compressed WAL (created at the first such message).
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

/// Ends the session with `reason`, said to the sender first.
macro_rules! refuse_and_end {
    ($self:ident, $($arg:tt)+) => {{
        let reason = format!($($arg)+);
        say(&mut $self.writer, ReceiverMessage::Error { reason: reason.clone() }).await;
        bail!(reason)
    }};
}

pub(crate) async fn stream<S: AsyncRead + AsyncWrite + Send + 'static>(
    shared: &Arc<Shared>,
    opened: Opened<'_>,
    guard: OwnedMutexGuard<Archive>,
    mut reader: Reader<S>,
    writer: Writer<S>,
    token: CancellationToken,
) -> Result<(), SessionError> {
    let Opened {
        hello,
        features,
        start,
    } = opened;
    let timeline = hello.timeline;
    let (tx, rx) = mpsc::channel::<Cmd>(16);
    // the resume point is durable and confirmed
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
    shared.status.sender_connected(SenderStatus::new(
        &hello.sender_name,
        timeline,
        start.map(|s| s.1.durable),
    ));
    let mut s = Stream {
        shared,
        timeline,
        features,
        writer,
        tx,
        pending: Pending::default(),
        last_ack: start,
        decompressor: None,
    };
    let outcome: Result<()> = async {
        // a handle of its own for reserving room (the handlers borrow the session mutably); dropped with
        // this block, before `close` waits for the writer
        let room = s.tx.clone();
        loop {
            tokio::select! {
                _ = token.cancelled() => {
                    info!("session ends: receiver shutting down or a newer session took over");
                    return Ok(());
                }
                done = &mut writer_task, if writer_result.is_none() => {
                    let (done, reason) = writer_ended(done);
                    writer_result = Some(done);
                    refuse_and_end!(s, "{reason}; nothing past the last acknowledgement was confirmed");
                }
                permit = room.reserve(), if s.pending.is_some() => {
                    if let (Ok(permit), Some(w)) = (permit, s.pending.take()) {
                        permit.send(Cmd::Wal(w));
                    }
                }
                changed = ack_rx.changed() => {
                    if changed.is_ok() {
                        let ack = *ack_rx.borrow_and_update();
                        s.acknowledge(ack).await?;
                    }
                }
                frame = tokio::time::timeout(shared.opts.idle_timeout, reader.next()) => {
                    let msg = match frame {
                        Err(_) => bail!("no message for {:?}; the sender is gone", shared.opts.idle_timeout),
                        Ok(None) => { info!("sender closed the connection"); return Ok(()); }
                        Ok(Some(Err(e))) => refuse_and_end!(s, "bad frame from sender: {e}"),
                        Ok(Some(Ok(msg))) => s.decompressed(msg).await?,
                    };
                    shared.heard_now();
                    s.on_message(msg).await?;
                }
            }
        }
    }
    .await;
    s.close(outcome, writer_result, writer_task, ack_rx).await
}

/// The writer task's result, and what the sender is told about it.
fn writer_ended(
    joined: std::result::Result<Result<(), WriterError>, tokio::task::JoinError>,
) -> (Result<(), WriterError>, String) {
    let done = joined.unwrap_or_else(|e| {
        Err(WriterError::Unrecoverable(anyhow!(
            "archive writer task failed: {e}"
        )))
    });
    let reason = match &done {
        Ok(()) => "archive writer stopped".to_string(),
        Err(WriterError::Recovered(e) | WriterError::Unrecoverable(e)) => {
            format!("archive write failed: {e:#}")
        }
    };
    (done, reason)
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Stream<'_, S> {
    /// Sends the `Ack` for `ack`, the writer's newest durable position.
    async fn acknowledge(&mut self, ack: Option<(TimelineId, Synced)>) -> Result<()> {
        let Some((t, synced)) = ack else {
            return Ok(());
        };
        self.last_ack = ack;
        self.shared.status.durable(synced.durable);
        let msg = ack_message(t, synced, self.features);
        send(&mut self.writer, msg, self.shared.opts.send_timeout, "Ack").await
    }

    /// `msg` with compressed WAL decompressed (where the session allowed compression), counting what the WAL
    /// took on the wire.
    async fn decompressed(&mut self, msg: SenderMessage) -> Result<SenderMessage> {
        let wire = &crate::metrics::METRICS.wire_wal_bytes;
        match msg {
            SenderMessage::WalZstd(z) => {
                if !self.features.wire_compression() || !self.shared.opts.wire_compression {
                    refuse_and_end!(self, "compressed WAL, which this session did not allow");
                }
                wire.inc_by(z.data.len() as u64);
                let max = self.shared.opts.max_payload as usize;
                let decompressed = match &mut self.decompressor {
                    Some(d) => z.decompress_with(d, max),
                    None => match zstd::bulk::Decompressor::new() {
                        Ok(d) => z.decompress_with(self.decompressor.insert(d), max),
                        Err(e) => bail!("no zstd context: {e}"),
                    },
                };
                match decompressed {
                    Ok(w) => Ok(SenderMessage::Wal(w)),
                    Err(e) => refuse_and_end!(self, "bad compressed WAL from sender: {e}"),
                }
            }
            SenderMessage::Wal(w) => {
                wire.inc_by(w.bytes.len() as u64);
                Ok(SenderMessage::Wal(w))
            }
            other => Ok(other),
        }
    }

    /// One message of the sender. Returning early without an error when the writer is gone is right: its
    /// result is picked up by the loop.
    async fn on_message(&mut self, msg: SenderMessage) -> Result<()> {
        let timeline = self.timeline;
        match msg {
            SenderMessage::Wal(w) => {
                if w.timeline != timeline {
                    refuse_and_end!(
                        self,
                        "WAL for timeline {} in a session opened for timeline {timeline}",
                        w.timeline
                    );
                }
                self.on_wal(w).await;
            }
            SenderMessage::History {
                timeline: t,
                content,
            } => {
                if t > timeline {
                    bail!(
                        "history file of timeline {t} in a session opened for timeline {timeline}"
                    );
                }
                self.pending.hand_over(&self.tx).await;
                let _ = self
                    .tx
                    .send(Cmd::History {
                        timeline: t,
                        content,
                    })
                    .await;
            }
            SenderMessage::Keepalive {
                primary_flush_lsn,
                sent_at_unix_micros,
                ..
            } => {
                let status = &self.shared.status;
                status.keepalive(primary_flush_lsn, sent_at_unix_micros);
                if self.features.ship_on_write() {
                    // in order with the WAL before it; the writer acknowledges it
                    self.pending.hand_over(&self.tx).await;
                    let flush = primary_flush_lsn;
                    let _ = self.tx.send(Cmd::Confirm { timeline, flush }).await;
                } else if let Some((t, synced)) = self.last_ack {
                    let msg = ack_message(t, synced, self.features);
                    send(&mut self.writer, msg, self.shared.opts.send_timeout, "Ack").await?;
                }
            }
            SenderMessage::PrimaryDown {
                timeline: t,
                wal_end,
                down_since_unix_micros,
            } => {
                if t != timeline {
                    bail!(
                        "PrimaryDown for timeline {t} in a session opened for timeline {timeline}"
                    );
                }
                self.shared
                    .status
                    .primary_down(wal_end, down_since_unix_micros);
                self.pending.hand_over(&self.tx).await;
                let since_unix_micros = down_since_unix_micros;
                let cmd = Cmd::PrimaryDown {
                    timeline: t,
                    wal_end,
                    since_unix_micros,
                };
                let _ = self.tx.send(cmd).await;
            }
            SenderMessage::SyncState { timeline: t, state } => {
                if t != timeline {
                    bail!("SyncState for timeline {t} in a session opened for timeline {timeline}");
                }
                let _ = self.tx.send(Cmd::SyncState { timeline: t, state }).await;
            }
            // decompressed into a Wal before
            SenderMessage::WalZstd(_) => bail!("internal: compressed WAL was not decompressed"),
            SenderMessage::Hello(_) => {
                refuse_and_end!(self, "protocol violation: Hello in the middle of a session")
            }
        }
        Ok(())
    }

    /// WAL: merged with what waits, handed to the writer when it has room.
    async fn on_wal(&mut self, w: walship_protocol::message::Wal) {
        if let Some(w) = self.pending.merge(w) {
            // not contiguous, or the merged command is large: the writer takes it first
            if self.tx.send(Cmd::Wal(w)).await.is_err() {
                return; // the writer ended
            }
        }
        // the only producer: with room now, the send succeeds; without, merge on
        if self.tx.capacity() == 0 {
            return;
        }
        if let Some(w) = self.pending.take() {
            if let Err(mpsc::error::TrySendError::Full(Cmd::Wal(w))) = self.tx.try_send(Cmd::Wal(w))
            {
                self.pending.put_back(w);
            }
        }
    }

    /// Lets the writer finish what it took (so it is durable) and hand the archive back. WAL received but
    /// not yet handed to the writer is valid (however the session ended): it is written too.
    async fn close(
        mut self,
        outcome: Result<()>,
        writer_result: Option<Result<(), WriterError>>,
        writer_task: tokio::task::JoinHandle<Result<(), WriterError>>,
        mut ack_rx: watch::Receiver<Option<(TimelineId, Synced)>>,
    ) -> Result<(), SessionError> {
        self.pending.hand_over(&self.tx).await;
        drop(self.tx);
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
                if let Some((t, synced)) = last.filter(|_| last != self.last_ack) {
                    self.shared.status.durable(synced.durable);
                    say(&mut self.writer, ack_message(t, synced, self.features)).await;
                }
                r
            }
        };
        self.shared.status.sender_disconnected();
        match writer_result {
            Err(WriterError::Unrecoverable(e)) => Err(SessionError::Fatal(e)),
            Err(WriterError::Recovered(e)) if outcome.is_ok() => {
                warn!("archive write failed while closing the session: {e:#}");
                Ok(())
            }
            _ => outcome.map_err(SessionError::Closed),
        }
    }
}

/// The `Ack` for `synced` in a session with `features`.
pub(crate) fn ack_message(
    timeline: TimelineId,
    synced: Synced,
    features: Features,
) -> ReceiverMessage {
    ReceiverMessage::Ack {
        timeline,
        durable_lsn: synced.durable,
        confirmed_lsn: features.ship_on_write().then_some(synced.confirmed),
    }
}

/// Contiguous WAL received while the writer was busy, merged into one command.
#[derive(Default)]
pub(crate) struct Pending {
    /// Timeline, first position and bytes (grown in place).
    wal: Option<(TimelineId, Lsn, bytes::BytesMut)>,
}

/// The most WAL merged into one command.
pub(crate) const MERGE_MAX: usize = 4 << 20;

impl Pending {
    /// Adds `w`; returns what must go to the writer first (the merged WAL, when `w` does not continue it or
    /// would make it too large).
    pub(crate) fn merge(
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

    pub(crate) fn is_some(&self) -> bool {
        self.wal.is_some()
    }

    pub(crate) fn take(&mut self) -> Option<walship_protocol::message::Wal> {
        let (timeline, start_lsn, buf) = self.wal.take()?;
        Some(walship_protocol::message::Wal {
            timeline,
            start_lsn,
            bytes: buf.freeze(),
        })
    }

    /// Gives back a command the writer had no room for (it is merged with what comes next).
    pub(crate) fn put_back(&mut self, w: walship_protocol::message::Wal) {
        debug_assert!(self.wal.is_none());
        let mut buf = bytes::BytesMut::with_capacity(w.bytes.len().max(64 << 10));
        buf.extend_from_slice(&w.bytes);
        self.wal = Some((w.timeline, w.start_lsn, buf));
    }

    /// Hands the merged WAL to the writer (waiting for room), so what follows stays in order.
    pub(crate) async fn hand_over(&mut self, tx: &mpsc::Sender<Cmd>) {
        if let Some(w) = self.take() {
            // an error means the writer ended; the session picks its result up
            let _ = tx.send(Cmd::Wal(w)).await;
        }
    }
}
