//! Draining a stopped primary: when PostgreSQL is down and its host lives, every complete, valid record left
//! in `pg_wal/` is shipped; what PostgreSQL proved flushed (its last reported flush position, the checkpoint
//! `pg_control` names, every segment before the one where its WAL ends) is confirmed, the rest stays
//! provisional (DESIGN.md §1).

use super::*;

impl Streaming<'_> {
    /// The PostgreSQL connection failed. If the server is down while its host lives (a crash, the OOM
    /// killer, `pg_ctl stop`), every record it flushed is still in `pg_wal/`: ship every complete, valid
    /// record beyond what was sent, tell the receiver where the primary's WAL ends, then wait for the server
    /// to come back (crash recovery continues the WAL exactly there) or for shutdown.
    pub(crate) async fn drain(
        &mut self,
        shutdown: &CancellationToken,
        cause: anyhow::Error,
        progressed: &mut bool,
    ) -> Result<Stop, Failure> {
        // the walsender is gone with its server (or the session restarts): the drain proves flushes itself
        self.walsender = None;
        self.cross = None;
        let why = match self.confirm_down(shutdown, cause).await? {
            Ok((why, cause)) => {
                warn!(sent = %self.link.sent(), "PostgreSQL is down ({why}; {cause:#}): shipping every complete record left in pg_wal");
                why
            }
            Err(stop) => return Ok(stop),
        };
        let down_since = now_micros();
        let started = Instant::now();
        let sent = self.link.sent();
        let end = match self.ship_until_stopped(shutdown, progressed).await? {
            Ok(end) => end,
            Err(stop) => return Ok(stop),
        };
        self.report_down(end, down_since).await?;
        info!(
            wal_end = %end,
            drained_bytes = end.0.saturating_sub(sent.0),
            drain_ms = started.elapsed().as_millis() as u64,
            down = %why,
            "primary down: the receiver holds all of its WAL (up to {end}); waiting for PostgreSQL to come back"
        );
        self.wait_for_return(shutdown, progressed, end, down_since, started)
            .await
    }

    /// Whether the server is really down. A crash takes a moment to show: the postmaster may still exist
    /// for a few milliseconds after its backends died. Decides within a few seconds; only a successful
    /// connection means "up" (then the session is retried). `Ok(Ok(why))`: down.
    async fn confirm_down(
        &self,
        shutdown: &CancellationToken,
        cause: anyhow::Error,
    ) -> Result<Result<(String, anyhow::Error), Stop>, Failure> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match server_state(self.data_dir.as_deref(), &self.cfg.pgconn.current()).await {
                ServerState::Up => return Err(retry(cause.context("PostgreSQL is still up"))),
                ServerState::Down(why) => return Ok(Ok((why, cause))),
                ServerState::Unknown(why) if Instant::now() >= deadline => {
                    return Err(retry(cause.context(format!(
                        "PostgreSQL's state is unclear ({why}); not draining pg_wal"
                    ))))
                }
                ServerState::Unknown(_) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Err(Stop::Shutdown)),
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }

    /// A server that is shutting down (or restarting) may still write WAL, e.g. its shutdown checkpoint:
    /// keeps shipping what appears until its postmaster is gone (at most a minute). Returns where the valid
    /// WAL ends.
    async fn ship_until_stopped(
        &mut self,
        shutdown: &CancellationToken,
        progressed: &mut bool,
    ) -> Result<Result<Lsn, Stop>, Failure> {
        let settle = Instant::now() + Duration::from_secs(60);
        let mut end = self.ship_valid_wal(shutdown, progressed).await?;
        loop {
            if !postmaster_running(self.data_dir.as_deref()) || Instant::now() >= settle {
                // One more walk once the postmaster is seen gone: what it wrote after the last walk began
                // (a fast shutdown's checkpoint while the pass before waited for acknowledgements) is in
                // pg_wal by now, and the drain ends only with it.
                return Ok(Ok(self.ship_valid_wal(shutdown, progressed).await?));
            }
            if let ServerState::Up =
                server_state(self.data_dir.as_deref(), &self.cfg.pgconn.current()).await
            {
                info!("PostgreSQL is back; resuming from {end}");
                return Ok(Err(Stop::PrimaryLost(anyhow!("PostgreSQL restarted"))));
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Err(Stop::Shutdown)),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            end = self.ship_valid_wal(shutdown, progressed).await?;
        }
    }

    /// Keeps the session open (keepalives with only what is proven flushed) until PostgreSQL is back or
    /// shutdown. Probes often: a restarted server's end-of-recovery checkpoint may remove old segments at
    /// once, so the sender has to be back (and compare, confirm) before the next restart or checkpoint does
    /// the same. WAL that appears meanwhile (a server restarting writes before it accepts connections) is
    /// shipped and reported.
    async fn wait_for_return(
        &mut self,
        shutdown: &CancellationToken,
        progressed: &mut bool,
        mut end: Lsn,
        down_since: u64,
        started: Instant,
    ) -> Result<Stop, Failure> {
        let mut keepalive = tokio::time::interval(self.cfg.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = tokio::time::interval(Duration::from_millis(100));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Stop::Shutdown),
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
    pub(crate) async fn ship_valid_wal(
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
            if self.pump(shutdown, true).await?.is_some() {
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
    pub(crate) fn proven_flush(&self, walked: &Walked) -> Lsn {
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
    pub(crate) async fn report_down(&mut self, end: Lsn, since: u64) -> Result<(), Failure> {
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

    /// Walks the valid records in `pg_wal/` from the page holding `from` with a scout of its own (the same
    /// walk as shipping on write, to its end): where the last complete, valid record ends, and the
    /// checkpoint records on the way.
    pub(crate) fn walk_pg_wal(&self, from: Lsn) -> Result<Walked, Failure> {
        let mut scout = Scout::default();
        let mut walked_to = None;
        loop {
            scout
                .advance(&self.reader, self.timeline, from)
                .map_err(read_failure)?;
            // each call walks a bounded stretch; the WAL ends where a call gets no further
            if scout.walked_to() == walked_to {
                break;
            }
            walked_to = scout.walked_to();
        }
        if walked_to.is_none() {
            warn!(%from, "no valid record after {from} in pg_wal");
        }
        Ok(Walked {
            end: walked_to.unwrap_or(from).max(from),
            checkpoints: scout.checkpoints().to_vec(),
        })
    }
}

/// What a walk of `pg_wal/` found.
pub(crate) struct Walked {
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
pub(crate) fn pg_control_checkpoint(
    data_dir: &std::path::Path,
    system_identifier: u64,
) -> Option<Lsn> {
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
