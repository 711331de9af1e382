//! The session's connection task: frames in (WAL merged into larger writes, confirmations, history files,
//! primary-down reports), the live path (a message that came alone, written and synced here while the writer
//! has nothing in hand), `Ack`s out as WAL becomes durable, every stage with a deadline.

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
    /// The archive and sync state the writer shares with this task (the live path writes here).
    desk: Arc<Desk>,
    /// WAL received while the writer is busy (fsyncing): merged into one command, so that the next fsync
    /// covers all of it however small the messages are (a sender shipping on write sends one per commit).
    pending: Pending,
    /// `pending` waits only for room in the channel (else for more WAL to merge).
    due: bool,
    /// The last position acknowledged to the sender.
    last_ack: Option<(TimelineId, Synced)>,
    /// When an acknowledgement that only moves the confirmed position goes out (unless one that moves the
    /// durable position, which carries it too, goes first).
    confirm_ack_at: Option<tokio::time::Instant>,
    /// One zstd context for the session's compressed WAL (created at the first such message).
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// Why sending to the sender failed, once it did (it died, or stopped reading). No acknowledgement goes
    /// out after that, but what it sent before is still read and archived (see [`Stream::peer_gone`]).
    gone: Option<Gone>,
}

/// What the session read after sending to the sender failed.
struct Gone {
    why: String,
    messages: u64,
    wal_bytes: u64,
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
    let desk = Arc::new(Desk::new(guard, ack_tx, timeline, features));
    let writer_desk = desk.clone();
    let mut writer_task = tokio::task::spawn_blocking(move || writer_loop(writer_desk, rx));
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
        desk,
        pending: Pending::default(),
        due: false,
        last_ack: start,
        confirm_ack_at: None,
        decompressor: None,
        gone: None,
    };
    let outcome: Result<()> = async {
        // a handle of its own for reserving room (the handlers borrow the session mutably); dropped with
        // this block, before `close` waits for the writer
        let room = s.tx.clone();
        loop {
            tokio::select! {
                // in this order: an acknowledgement goes out before more WAL is read (and perhaps synced on
                // this task first)
                biased;
                _ = token.cancelled() => {
                    info!("session ends: receiver shutting down or a newer session took over");
                    return Ok(());
                }
                done = &mut writer_task, if writer_result.is_none() => {
                    let (done, reason) = writer_ended(done);
                    writer_result = Some(done);
                    refuse_and_end!(s, "{reason}; nothing past the last acknowledgement was confirmed");
                }
                changed = ack_rx.changed() => {
                    if changed.is_ok() {
                        let ack = *ack_rx.borrow_and_update();
                        s.on_durable(ack).await?;
                    }
                }
                _ = sleep_until(s.confirm_ack_at), if s.confirm_ack_at.is_some() => {
                    let ack = *ack_rx.borrow();
                    s.acknowledge(ack).await?;
                }
                permit = room.reserve(), if s.due && s.pending.is_some() => {
                    s.due = false;
                    if let (Ok(permit), Some(w)) = (permit, s.pending.take()) {
                        s.desk.handing();
                        permit.send(Cmd::Wal(w));
                    }
                }
                frame = tokio::time::timeout(s.read_timeout(), reader.next()) => {
                    if let Some(g) = &s.gone {
                        if !matches!(frame, Ok(Some(Ok(_)))) {
                            // everything the sender had sent before it went is read
                            bail!(
                                "{}; then read what it had sent before: {} messages, {} bytes of WAL",
                                g.why, g.messages, g.wal_bytes
                            );
                        }
                    }
                    let msg = match frame {
                        Err(_) => bail!("no message for {:?}; the sender is gone", shared.opts.idle_timeout),
                        Ok(None) => { info!("sender closed the connection"); return Ok(()); }
                        Ok(Some(Err(e))) => refuse_and_end!(s, "bad frame from sender: {e}"),
                        Ok(Some(Ok(msg))) => s.decompressed(msg).await?,
                    };
                    if let Some(g) = &mut s.gone {
                        g.messages += 1;
                        if let SenderMessage::Wal(w) = &msg {
                            g.wal_bytes += w.bytes.len() as u64;
                        }
                    }
                    shared.heard_now();
                    s.on_message(msg).await?;
                    // no further message to read at once: the WAL received goes to the archive now
                    s.dispatch(!walship_protocol::frame_buffered(reader.read_buffer())).await?;
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
    /// The archive recorded a newer durable or confirmed position. One that moves the durable position is
    /// acknowledged at once (a synchronous commit may wait for it); one that only moves the confirmed position
    /// within CONFIRM_ACK_DELAY (the sender needs it only to release its slot), or with the next durable one.
    async fn on_durable(&mut self, ack: Option<(TimelineId, Synced)>) -> Result<()> {
        let Some((t, synced)) = ack else {
            return Ok(());
        };
        let durable_moved = self
            .last_ack
            .is_none_or(|(lt, last)| lt != t || synced.durable != last.durable);
        if durable_moved {
            return self.acknowledge(ack).await;
        }
        if self.confirm_ack_at.is_none() {
            self.confirm_ack_at = Some(tokio::time::Instant::now() + CONFIRM_ACK_DELAY);
        }
        Ok(())
    }

    /// Sends the `Ack` for `ack`, the writer's newest durable position.
    async fn acknowledge(&mut self, ack: Option<(TimelineId, Synced)>) -> Result<()> {
        let Some((t, synced)) = ack else {
            return Ok(());
        };
        self.confirm_ack_at = None;
        self.last_ack = ack;
        self.shared.status.durable(synced.durable);
        let msg = ack_message(t, synced, self.features);
        self.send_ack(msg).await;
        Ok(())
    }

    /// Sends an acknowledgement, unless the sender is gone. A failed send does not end the session at once:
    /// see [`Stream::peer_gone`].
    async fn send_ack(&mut self, msg: ReceiverMessage) {
        if self.gone.is_some() {
            return;
        }
        if let Err(e) = send(&mut self.writer, msg, self.shared.opts.send_timeout, "Ack").await {
            self.peer_gone(format!("{e:#}"));
        }
    }

    /// Sending to the sender failed: it died (a reset connection) or stopped reading. WAL it sent before may
    /// still wait in this host's socket buffer — after the death of the primary's host it is the newest WAL
    /// anywhere — so the session reads on until the connection ends (or is quiet for [`GONE_READ`]) and
    /// archives it like any other: made durable, never acknowledged. Ending at once dropped it.
    fn peer_gone(&mut self, why: String) {
        warn!(
            error = %why,
            "cannot send to the sender: reading what it sent before, then ending the session"
        );
        self.gone = Some(Gone {
            why,
            messages: 0,
            wal_bytes: 0,
        });
    }

    /// How long the next message may take: the idle timeout, or once the sender is gone [`GONE_READ`].
    fn read_timeout(&self) -> Duration {
        match self.gone {
            Some(_) => GONE_READ.min(self.shared.opts.idle_timeout),
            None => self.shared.opts.idle_timeout,
        }
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
                self.hand_pending().await;
                let cmd = Cmd::History {
                    timeline: t,
                    content,
                };
                self.hand(cmd).await;
            }
            SenderMessage::Keepalive {
                primary_flush_lsn,
                sent_at_unix_micros,
                ..
            } => {
                let status = &self.shared.status;
                status.keepalive(primary_flush_lsn, sent_at_unix_micros);
                if self.features.ship_on_write() {
                    // in order with the WAL before it, recorded in the archive before it is acknowledged
                    let confirm = Cmd::Confirm {
                        timeline,
                        flush: primary_flush_lsn,
                    };
                    match self.try_live(Some(confirm)) {
                        Ok(Ok(())) => {}
                        Ok(Err(reason)) => refuse_and_end!(
                            self,
                            "{reason}; nothing past the last acknowledgement was confirmed"
                        ),
                        Err(confirm) => {
                            self.hand_pending().await;
                            self.hand(confirm.expect("given")).await;
                        }
                    }
                } else if let Some((t, synced)) = self.last_ack {
                    self.send_ack(ack_message(t, synced, self.features)).await;
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
                self.hand_pending().await;
                let since_unix_micros = down_since_unix_micros;
                let cmd = Cmd::PrimaryDown {
                    timeline: t,
                    wal_end,
                    since_unix_micros,
                };
                self.hand(cmd).await;
            }
            SenderMessage::SyncState { timeline: t, state } => {
                if t != timeline {
                    bail!("SyncState for timeline {t} in a session opened for timeline {timeline}");
                }
                self.hand_pending().await;
                self.hand(Cmd::SyncState { timeline: t, state }).await;
            }
            // decompressed into a Wal before
            SenderMessage::WalZstd(_) => bail!("internal: compressed WAL was not decompressed"),
            SenderMessage::Hello(_) => {
                refuse_and_end!(self, "protocol violation: Hello in the middle of a session")
            }
        }
        Ok(())
    }

    /// WAL: merged with what waits ([`Stream::dispatch`] takes it on).
    async fn on_wal(&mut self, w: walship_protocol::message::Wal) {
        if let Some(w) = self.pending.merge(w) {
            // not contiguous, or the merged command is large: the writer takes it first
            self.hand(Cmd::Wal(w)).await;
        }
    }

    /// The live path: the WAL waiting in `pending` (small) and then `cmd`, appended, synced and acknowledged on
    /// this task, when the writer has nothing in hand. `Err(cmd)` when it has (or `pending` is large): the
    /// caller hands them over. `Ok(Err(reason))`: the archive write failed.
    fn try_live(
        &mut self,
        cmd: Option<Cmd>,
    ) -> std::result::Result<Result<(), String>, Option<Cmd>> {
        // Several messages waiting means they came while this task was syncing: under load, the writer and
        // its syncer pipeline appends and syncs (the live path would stop reading for every sync)
        if self.pending.len() >= LARGE_MESSAGE || self.pending.messages() > 1 {
            return Err(cmd);
        }
        let Some(g) = self.desk.idle() else {
            return Err(cmd);
        };
        let cmds = self.pending.take().map(Cmd::Wal).into_iter().chain(cmd);
        Ok(self.desk.apply_and_sync(g, cmds))
    }

    /// Hands `cmd` to the writer, in order after everything before it (waiting for room). An error means the
    /// writer ended; the session picks its result up.
    async fn hand(&mut self, cmd: Cmd) {
        self.desk.handing();
        if self.tx.send(cmd).await.is_err() {
            self.desk.not_handed();
        }
    }

    /// Hands the merged WAL to the writer, so what follows stays in order.
    async fn hand_pending(&mut self) {
        if let Some(w) = self.pending.take() {
            self.hand(Cmd::Wal(w)).await;
        }
    }

    /// The WAL received and merged so far, once nothing more is there to read at once (`drained`) or it is
    /// large: appended, synced and acknowledged on this task when the writer has nothing in hand (the live
    /// path: one commit, no thread crossed), else handed to the writer when the channel has room (else it
    /// merges on, and the loop hands it over when room comes).
    async fn dispatch(&mut self, drained: bool) -> Result<()> {
        self.due = false;
        let len = self.pending.len();
        if len == 0 || (!drained && len < LARGE_MESSAGE) {
            return Ok(());
        }
        match self.try_live(None) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(reason)) => refuse_and_end!(
                self,
                "{reason}; nothing past the last acknowledgement was confirmed"
            ),
            Err(_) => {}
        }
        // the only producer: with room now, the send succeeds; without, merge on until there is room
        if self.tx.capacity() == 0 {
            self.due = true;
            return Ok(());
        }
        if let Some(w) = self.pending.take() {
            self.desk.handing();
            if let Err(mpsc::error::TrySendError::Full(Cmd::Wal(w))) = self.tx.try_send(Cmd::Wal(w))
            {
                self.desk.not_handed();
                self.pending.put_back(w);
                self.due = true;
            }
        }
        Ok(())
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
        self.hand_pending().await;
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
                    if self.gone.is_none() {
                        say(&mut self.writer, ack_message(t, synced, self.features)).await;
                    }
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

/// How long an acknowledgement that only moves the confirmed position may wait for one that moves the durable
/// position (a sender under load gets both in one; the sender uses the confirmed position only to release its
/// replication slot, and resumes from it after a reconnection).
pub(crate) const CONFIRM_ACK_DELAY: Duration = Duration::from_millis(20);

/// Once sending to the sender failed, how long the session waits for the rest of what it sent: a dead peer's
/// connection ends as soon as its buffered bytes are read; a live one that stopped reading is cut off here.
pub(crate) const GONE_READ: Duration = Duration::from_secs(1);

/// Sleeps until `at` (never, without one).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
    /// How many messages it merged.
    messages: usize,
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
                self.messages += 1;
                return None;
            }
        }
        let first = self.take();
        let mut buf = bytes::BytesMut::with_capacity(w.bytes.len().max(64 << 10));
        buf.extend_from_slice(&w.bytes);
        self.wal = Some((w.timeline, w.start_lsn, buf));
        self.messages = 1;
        first
    }

    pub(crate) fn is_some(&self) -> bool {
        self.wal.is_some()
    }

    /// How many bytes wait.
    pub(crate) fn len(&self) -> usize {
        self.wal.as_ref().map_or(0, |(_, _, buf)| buf.len())
    }

    /// How many messages wait merged: more than one means they came while the session was busy.
    pub(crate) fn messages(&self) -> usize {
        if self.wal.is_some() {
            self.messages
        } else {
            0
        }
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
}
