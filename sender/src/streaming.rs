//! The streaming loop of a session ([`Streaming::run`]): file-system events, the scout, shipping within the
//! window, the flush position (polled off the critical path) that confirms shipped WAL, the slot, and how a
//! send finishes when shutdown comes.

use super::*;

/// What a wait of the streaming loop ended with.
pub(crate) enum Waited {
    /// Go round again.
    Go,
    /// Ask the primary for its flush position now.
    Query,
    /// The session ends.
    Stop(Stop),
}

impl Streaming<'_> {
    pub(crate) async fn run(
        &mut self,
        shutdown: &CancellationToken,
        progressed: &mut bool,
    ) -> Result<Stop, Failure> {
        let mut keepalive = tokio::time::interval(self.cfg.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // WAL and the confirmation that follows it leave in one write (the receiver takes them as one)
            let confirming = self.confirm_due();
            if let Some(stop) = self.pump(shutdown, !confirming).await? {
                return Ok(stop);
            }
            if let Some(stop) = self.confirm(shutdown).await? {
                return Ok(stop);
            }
            self.maintain_slot().await;
            self.report_catch_up();
            self.report_progress();
            // No file-system event announces a flush (only the write before it). While WAL is inserted but not
            // yet flushed, re-poll soon. After a quiet spell (a commit arriving alone) the first event starts
            // precise short re-polls, since the primary's fsync takes a fraction of a millisecond. Under
            // sustained load the events keep coming; then at most one query per MIN_QUERY_GAP keeps the cost on
            // the primary low.
            let pending = self.pos.insert > self.pos.flush;
            let waited = if self.walsender.is_some() {
                // the walsender pushes the flush position: no query, no polling
                self.wait_streamed(shutdown, &mut keepalive, progressed)
                    .await?
            } else if self.held_at_segment_end() {
                // Written WAL waits for the flush to pass a segment's end (once per segment): PostgreSQL
                // fsyncs a segment as soon as its last page is written, so poll precisely until it has.
                self.hot_poll(progressed)?
            } else if self.ships_on_write() {
                self.wait_shipping_on_write(shutdown, &mut keepalive, progressed, pending)
                    .await?
            } else if pending && self.hot > 0 {
                self.hot -= 1;
                self.hot_poll(progressed)?
            } else {
                self.wait_polling(shutdown, &mut keepalive, progressed, pending)
                    .await?
            };
            if let Some(w) = &self.walsender {
                // what the receiver holds durably in this session, never more (DESIGN.md §1)
                w.report_durable(self.link.acked());
                self.watch_synchronous();
            }
            if let Some(stop) = self.tell_sync_state(shutdown).await? {
                return Ok(stop);
            }
            let query = match waited {
                Waited::Stop(stop) => return Ok(stop),
                Waited::Query => true,
                Waited::Go => false,
            };
            if query {
                if let Some(stop) = self.query().await? {
                    return Ok(stop);
                }
            }
        }
    }

    /// Once a minute: where the primary, the sender and the receiver are.
    fn report_progress(&mut self) {
        if self.last_report.elapsed() < Duration::from_secs(60) {
            return;
        }
        self.last_report = Instant::now();
        let on_write = std::mem::take(&mut self.shipped_on_write);
        info!(flush = %self.pos.flush, sent = %self.link.sent(), acked = %self.link.acked(), behind = self.pos.flush.saturating_sub(self.link.acked()), shipped_on_write_bytes = on_write, "progress");
    }

    /// A precise short wait before the next flush query. A thread sleep on purpose: tokio's timers tick in
    /// milliseconds, the primary's fsync takes a fraction of one, and nothing else waits on this task's
    /// thread meanwhile (HOT_POLL is well under a millisecond).
    fn hot_poll(&mut self, progressed: &mut bool) -> Result<Waited, Failure> {
        std::thread::sleep(HOT_POLL);
        *progressed |= self.link.poll_received()?;
        Ok(Waited::Query)
    }

    /// Ship on write: a file-system event makes the scout walk what was written, and the loop ships it at
    /// once. The flush position only confirms: asked at most every CONFIRM_GAP while something is
    /// unconfirmed, else every poll interval; the query runs beside the loop.
    async fn wait_shipping_on_write(
        &mut self,
        shutdown: &CancellationToken,
        keepalive: &mut tokio::time::Interval,
        progressed: &mut bool,
        pending: bool,
    ) -> Result<Waited, Failure> {
        let unconfirmed = self.event_due || pending || self.link.sent() > self.pos.flush;
        let gap = if unconfirmed {
            CONFIRM_GAP
        } else {
            self.cfg.poll_interval
        };
        let wait = gap.saturating_sub(self.last_query.elapsed());
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(self.stop_on_shutdown()),
            moved = self.link.recv() => *progressed |= moved?,
            _ = next_event(&mut self.events) => {
                self.take_events();
                self.scout.advance(&self.reader, self.timeline, self.link.sent()).map_err(read_failure)?;
                self.event_due = true;
            }
            answer = answer(&mut self.asking) => {
                self.asking = None;
                if let Some(stop) = self.apply_position(answer)? {
                    return Ok(Waited::Stop(stop));
                }
            }
            _ = tokio::time::sleep(wait), if self.asking.is_none() => {
                if let Some(stop) = self.ask() {
                    return Ok(Waited::Stop(stop));
                }
            }
            _ = keepalive.tick() => {
                if let Some(stop) = self.send_keepalive(shutdown).await? {
                    return Ok(Waited::Stop(stop));
                }
            }
        }
        Ok(Waited::Go)
    }

    /// The walsender streams flushed WAL: wait for it, a file-system event (the scout walks what was written
    /// and the loop ships it), the receiver, or the keepalive.
    async fn wait_streamed(
        &mut self,
        shutdown: &CancellationToken,
        keepalive: &mut tokio::time::Interval,
        progressed: &mut bool,
    ) -> Result<Waited, Failure> {
        let walsender = self
            .walsender
            .as_mut()
            .expect("streaming from the walsender");
        let pg = self.pg.clone();
        let pg_closed = async {
            match &pg {
                Some(pg) => pg.closed().await,
                None => std::future::pending().await,
            }
        };
        // The receiver's acknowledgements are taken whenever the loop is awake anyway. It wakes up for them
        // only where they are wanted at once (synchronous mode: a commit waits for them; the window half
        // full), else at most every ACK_WAKE: one wake-up less per commit on a busy primary, where the
        // sender's wake-ups wait for a CPU and a commit shipped late is lost if the host dies (BENCHMARKS.md)
        *progressed |= self.link.poll_received()?;
        let wake_for_acks = self.cfg.synchronous
            || self.link.sent().0 - self.link.acked().0 > self.cfg.window / 2
            || self.last_ack_wake.elapsed() >= ACK_WAKE;
        tokio::select! {
            // the query connection (the slot, the server's facts) ended: the session starts anew
            _ = pg_closed => {
                return Ok(Waited::Stop(Stop::PrimaryLost(anyhow!("the PostgreSQL connection closed"))));
            }
            _ = shutdown.cancelled() => return Ok(self.stop_on_shutdown()),
            moved = self.link.recv(), if wake_for_acks => {
                self.last_ack_wake = Instant::now();
                *progressed |= moved?
            }
            _ = tokio::time::sleep(ACK_WAKE), if !wake_for_acks => {}
            _ = next_event(&mut self.events) => {
                self.take_events();
                if self.ships_on_write() {
                    self.scout.advance(&self.reader, self.timeline, self.link.sent()).map_err(read_failure)?;
                }
                // flushes the walsender already reported are confirmed in the same write as this WAL
                return self.take_queued_flushes(Waited::Go);
            }
            event = walsender.next() => {
                // what the walsender already sent moves the flush position at once: one confirmation
                let waited = self.take_flushed(event)?;
                let waited = self.take_queued_flushes(waited)?;
                // and WAL written meanwhile goes out in the same write as it
                if self.take_events() && self.ships_on_write() {
                    self.scout.advance(&self.reader, self.timeline, self.link.sent()).map_err(read_failure)?;
                }
                return Ok(waited);
            }
            _ = keepalive.tick() => {
                if let Some(stop) = self.send_keepalive(shutdown).await? {
                    return Ok(Waited::Stop(stop));
                }
            }
        }
        Ok(Waited::Go)
    }

    /// Takes the file-system events already queued (one walk of the scout covers them all); whether there were
    /// any.
    fn take_events(&mut self) -> bool {
        let mut any = false;
        while let Some(Some(_)) = self.events.as_mut().and_then(|e| e.next().now_or_never()) {
            any = true;
        }
        any
    }

    /// Takes in what the walsender already sent, without waiting (after `waited`, unless that ends the loop).
    fn take_queued_flushes(&mut self, mut waited: Waited) -> Result<Waited, Failure> {
        while matches!(waited, Waited::Go) {
            let Some(more) = self.walsender.as_mut().and_then(|w| w.try_next()) else {
                break;
            };
            waited = self.take_flushed(more)?;
        }
        Ok(waited)
    }

    /// WAL the walsender streamed: the primary flushed it. Compared with what was shipped; then the flush
    /// position moves to its end (a shipped byte is confirmed only once compared, see [`CrossCheck`]).
    fn take_flushed(&mut self, event: replication::Event) -> Result<Waited, Failure> {
        let (start, bytes) = match event {
            replication::Event::Wal { start, bytes } => (start, bytes),
            replication::Event::Ended(e) => {
                self.walsender = None;
                return Ok(Waited::Stop(Stop::PrimaryLost(e)));
            }
        };
        let end = Lsn(start.0 + bytes.len() as u64);
        self.cross_check(replication::Side::Flushed, start, bytes)?;
        // tests: the primary's flush reports stop reaching the sender, so what it ships stays provisional
        #[cfg(feature = "failpoints")]
        if fail::eval("sender-flush-frozen", |_| ()).is_some() {
            return Ok(Waited::Go);
        }
        if end > self.pos.flush {
            self.pos.flush = end;
            self.pos.insert = self.pos.insert.max(end);
            self.last_flush_change = Instant::now();
            metrics::METRICS.primary_flush_lsn.set(end.0 as i64);
        }
        Ok(Waited::Go)
    }

    /// Compares `bytes` from `side` with the other side's (when the walsender streams).
    fn cross_check(
        &mut self,
        side: replication::Side,
        start: Lsn,
        bytes: bytes::Bytes,
    ) -> Result<(), Failure> {
        let Some(cross) = &mut self.cross else {
            return Ok(());
        };
        let before = cross.compared;
        match cross.add(side, start, bytes) {
            Ok(()) => {
                metrics::METRICS
                    .cross_checked_bytes
                    .inc_by(cross.compared - before);
                Ok(())
            }
            Err(e) => Err(self.cross_check_failed(e)),
        }
    }

    /// The shipped WAL differs from what the primary flushed: nothing from there on is confirmed.
    fn cross_check_failed(&self, e: replication::CrossCheckError) -> Failure {
        metrics::METRICS.cross_check_mismatches.inc();
        let at = match &e {
            replication::CrossCheckError::Mismatch { at } => *at,
            replication::CrossCheckError::Gap { start, .. } => *start,
        };
        let file =
            walship_protocol::wal::segment_file_name(self.timeline, self.seg.segno(at), self.seg);
        tracing::error!(%at, file = %file, dir = %self.reader.dir().display(), "{e}");
        retry(anyhow!(
            "{e} (WAL file {file} in {}): nothing from {at} on is confirmed; the next session resends it from \
             the archive's confirmed position and the receiver compares. If this repeats, what pg_wal holds is not \
             what PostgreSQL flushed: check the storage and that --wal-dir is this server's",
            self.reader.dir().display()
        ))
    }

    /// Ship once flushed: wait for an event, the receiver, or the next poll; one query covers every event
    /// already queued, at most one per MIN_QUERY_GAP.
    async fn wait_polling(
        &mut self,
        shutdown: &CancellationToken,
        keepalive: &mut tokio::time::Interval,
        progressed: &mut bool,
        pending: bool,
    ) -> Result<Waited, Failure> {
        let poll = if self.event_due {
            MIN_QUERY_GAP.saturating_sub(self.last_query.elapsed())
        } else if pending {
            Duration::from_millis(1)
        } else {
            self.cfg.poll_interval
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(self.stop_on_shutdown()),
            moved = self.link.recv() => *progressed |= moved?,
            _ = next_event(&mut self.events), if !self.event_due => {
                self.take_events();
                if self.last_flush_change.elapsed() >= QUIET {
                    self.hot = HOT_POLLS;
                }
                if self.last_query.elapsed() >= MIN_QUERY_GAP {
                    return Ok(Waited::Query);
                }
                self.event_due = true;
            }
            _ = tokio::time::sleep(poll) => return Ok(Waited::Query),
            _ = keepalive.tick() => {
                if let Some(stop) = self.send_keepalive(shutdown).await? {
                    return Ok(Waited::Stop(stop));
                }
            }
        }
        Ok(Waited::Go)
    }

    fn stop_on_shutdown(&self) -> Waited {
        info!(sent = %self.link.sent(), acked = %self.link.acked(), "shutting down: waiting for the receiver to acknowledge what was sent");
        Waited::Stop(Stop::Shutdown)
    }

    /// The keepalive with the primary's flush position (it confirms shipped WAL), finished even when shutdown
    /// comes meanwhile; records what it confirmed.
    async fn send_keepalive(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Stop>, Failure> {
        let flush = self.pos.flush;
        let grace = self.cfg.shutdown_grace;
        let stop =
            finish_on_shutdown(self.link.keepalive(flush, now_micros()), shutdown, grace).await?;
        if stop.is_none() {
            self.confirm_sent = self.confirm_sent.max(flush.min(self.link.sent()));
        }
        Ok(stop)
    }

    /// Protocol 3: the receiver takes WAL before it is flushed (provisional until confirmed).
    pub(crate) fn ships_on_write(&self) -> bool {
        self.features.ship_on_write()
    }

    /// How far to ship: the flush position, and from protocol 3 the written WAL beyond it that the scout
    /// validated, except the last byte of a segment (a segment is completed in the archive, and handed to
    /// recovery, only with confirmed bytes).
    pub(crate) fn target(&self) -> Lsn {
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
    pub(crate) fn provisional_cap(&self) -> Lsn {
        Lsn(self.seg.segment_start(self.seg.segno(self.pos.flush) + 1).0 - 1)
    }

    /// Protocol 3: written WAL is held back only because it would complete a segment with unconfirmed bytes.
    pub(crate) fn held_at_segment_end(&self) -> bool {
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

    /// Protocol 3: whether the primary has flushed more of what was sent than the receiver was told (and
    /// [`Streaming::confirm`] sends it). Stays true while more is sent.
    pub(crate) fn confirm_due(&self) -> bool {
        self.ships_on_write() && self.pos.flush.min(self.link.sent()) > self.confirm_sent
    }

    /// Protocol 3: tells the receiver what the primary has flushed, once it confirms more of what was sent;
    /// sends whatever is queued before it in the same write.
    pub(crate) async fn confirm(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Stop>, Failure> {
        if !self.confirm_due() {
            return Ok(None);
        }
        let flush = self.pos.flush;
        let confirms = flush.min(self.link.sent());
        let grace = self.cfg.shutdown_grace;
        let stop =
            finish_on_shutdown(self.link.keepalive(flush, now_micros()), shutdown, grace).await?;
        self.confirm_sent = confirms;
        Ok(stop)
    }

    /// Sends `[sent, target)` while the window has room; with `flush` false leaves the last of it queued for
    /// the caller's next send (which must follow at once). Returns how to stop if shutdown came meanwhile.
    pub(crate) async fn pump(
        &mut self,
        shutdown: &CancellationToken,
        flush: bool,
    ) -> Result<Option<Stop>, Failure> {
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
            // Valid records the scout walked are shipped as it read them; anything else (flushed WAL beyond
            // its walk, a catch-up) with a plain blocking read: the runtime is this one thread, and WAL just
            // written is in the page cache.
            let bytes = match self.scout.walked_bytes(sent, end) {
                Some(walked) => bytes::Bytes::copy_from_slice(walked),
                None => self
                    .reader
                    .read(self.timeline, sent, end)
                    .map_err(read_failure)?,
            };
            crash_point!("sender-read-before-send");
            if self.cross.is_some() {
                self.cross_check(replication::Side::Shipped, sent, bytes.clone())?;
            }
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
        if wrote && flush {
            if let Some(stop) = finish_on_shutdown(self.link.flush(), shutdown, grace).await? {
                return Ok(Some(stop));
            }
        }
        Ok(shutdown.is_cancelled().then_some(Stop::Shutdown))
    }

    /// With the walsender streaming: how long flushed WAL has waited for the receiver (with --synchronous),
    /// and every few seconds the primary's own view of this sender (pg_stat_replication).
    fn watch_synchronous(&mut self) {
        let m = &metrics::METRICS;
        m.replication_stream.set(1);
        if self.cfg.synchronous {
            let behind = self.pos.flush > self.link.acked();
            match (behind, m.synchronous_behind_since.get()) {
                (true, 0) => {
                    m.synchronous_behind_since.set(now_micros() as i64);
                }
                (false, since) if since != 0 => {
                    m.synchronous_behind_since.set(0);
                }
                _ => {}
            }
        }
        let (task, asked) = &mut self.primary_view;
        if let Some(t) = task.take_if(|t| t.is_finished()) {
            match t.now_or_never() {
                Some(Ok(Ok((state, lag_ms)))) => {
                    let sync = state != walship_protocol::SyncState::Async;
                    m.primary_sees_synchronous.set(sync as i64);
                    m.primary_flush_lag_ms.set(lag_ms);
                    if self.cfg.synchronous && self.sync_state != Some(state) {
                        info!(state = ?state, "the primary counts this sender as {}", match state {
                            walship_protocol::SyncState::Sync => "its synchronous standby: a commit returns once the archive holds it",
                            walship_protocol::SyncState::Quorum => "one of a quorum of synchronous standbys",
                            walship_protocol::SyncState::Async => "an asynchronous standby: commits do not wait for walship (is it in synchronous_standby_names?)",
                        });
                    }
                    self.sync_state = Some(state);
                }
                Some(Ok(Err(e))) => warn!("reading pg_stat_replication: {e:#}"),
                _ => {}
            }
        }
        // every second with --synchronous (promote relies on the last word), else every 5 s
        let every = if self.cfg.synchronous { 1 } else { 5 };
        if task.is_none() && asked.elapsed() >= Duration::from_secs(every) {
            *asked = Instant::now();
            // flush_lag is there from PostgreSQL 10
            if let Some(pg) = self.pg.clone().filter(|pg| pg.info.version_num >= 100_000) {
                let name = self.cfg.standby_name.clone();
                *task = Some(tokio::spawn(
                    async move { pg.replication_view(&name).await },
                ));
            }
        }
    }

    /// With `--synchronous` (protocol 5): tells the receiver how the primary counts this sender, when that
    /// changed, so that `promote` can say whether every acknowledged commit is in the archive.
    async fn tell_sync_state(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Stop>, Failure> {
        let Some(state) = self.sync_state else {
            return Ok(None);
        };
        if !self.cfg.synchronous
            || !self.features.sync_state()
            || self.sync_state_told == Some(state)
        {
            return Ok(None);
        }
        let msg = SenderMessage::SyncState {
            timeline: self.timeline,
            state,
        };
        let grace = self.cfg.shutdown_grace;
        let stop = finish_on_shutdown(
            self.link.send(msg, "sending the synchronous state"),
            shutdown,
            grace,
        )
        .await?;
        self.sync_state_told = Some(state);
        Ok(stop)
    }

    /// At most once a second: release WAL the receiver has made durable.
    pub(crate) async fn maintain_slot(&mut self) {
        let Some(slot) = &self.cfg.slot else { return };
        // durable and confirmed: a provisional byte may still be replaced
        let confirmed = self.link.confirmed();
        if confirmed > self.slot_at
            && confirmed > self.start
            && self.slot_moved.elapsed() >= Duration::from_secs(1)
        {
            self.slot_moved = Instant::now();
            let Some(pg) = self.pg.clone() else { return };
            if self.ships_on_write() {
                // in a task of its own: shipping never waits for the primary
                if self.slot_task.is_none() {
                    let slot = slot.clone();
                    let task = tokio::spawn(async move { pg.advance_slot(&slot, confirmed).await });
                    self.slot_task = Some((confirmed, task));
                }
            } else {
                match pg.advance_slot(slot, confirmed).await {
                    Ok(()) => self.slot_at = confirmed,
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
    pub(crate) async fn query(&mut self) -> Result<Option<Stop>, Failure> {
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
    pub(crate) fn ask(&mut self) -> Option<Stop> {
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
    pub(crate) fn report_catch_up(&mut self) {
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
    pub(crate) fn apply_position(
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
}

/// Runs a send to completion. If shutdown comes meanwhile, the send gets `grace` more to finish (then the
/// session drains); a send still blocked after that means the receiver takes nothing: stop at once.
pub(crate) async fn finish_on_shutdown<F>(
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
            Ok(r) => { r?; Ok(Some(Stop::Shutdown)) }
            Err(_) => {
                warn!("shutting down while the receiver was not taking WAL for {grace:?}; closing without waiting");
                Ok(Some(Stop::Abandon))
            }
        },
    }
}

/// Precise re-poll interval right after a file-system event while a flush is pending.
pub(crate) const HOT_POLL: Duration = Duration::from_micros(250);
/// How many precise re-polls one burst of events allows (then 1 ms polls take over).
pub(crate) const HOT_POLLS: u32 = 12;
/// Under sustained load, the shortest time between two position queries.
pub(crate) const MIN_QUERY_GAP: Duration = Duration::from_micros(500);
/// Protocol 3 (ship on write): while shipped or written WAL is unconfirmed, the time between two flush
/// queries. Shipping does not wait for them; they only confirm (and release the slot).
pub(crate) const CONFIRM_GAP: Duration = Duration::from_millis(5);
/// No flush for this long makes the next event the start of a burst (precise re-polls allowed).
pub(crate) const QUIET: Duration = Duration::from_millis(5);

pub(crate) type Events = inotify::EventStream<Vec<u8>>;

/// Asynchronous shipping from the walsender's stream: how long the receiver's acknowledgements may wait for
/// the loop to wake up for something else (they release the slot and feed `status`; nothing waits on them).
const ACK_WAKE: Duration = Duration::from_millis(20);

pub(crate) fn watch_dir(dir: &std::path::Path) -> std::io::Result<Events> {
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
pub(crate) async fn answer(
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

pub(crate) async fn next_event(events: &mut Option<Events>) {
    match events {
        Some(s) => {
            if s.next().await.is_none() {
                *events = None;
            }
        }
        None => std::future::pending().await,
    }
}
