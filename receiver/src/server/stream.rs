//! The session's connection task: frames in (WAL merged into larger writes, confirmations, history files,
//! primary-down reports), `Ack`s out as the writer makes WAL durable, every stage with a deadline.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(crate) async fn stream<S: AsyncRead + AsyncWrite + Send + 'static>(
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
    pub(crate) async fn flush(&mut self, tx: &mpsc::Sender<Cmd>) {
        if let Some(w) = self.take() {
            // an error means the writer ended; the session picks its result up
            let _ = tx.send(Cmd::Wal(w)).await;
        }
    }
}
