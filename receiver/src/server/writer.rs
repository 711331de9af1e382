//! The session's writer: a blocking task that owns the archive, appends what the connection hands it and
//! makes it durable with group commits on a syncer thread, publishing each durable position.

use super::*;

pub(crate) enum Cmd {
    Wal(walship_protocol::message::Wal),
    /// The primary has flushed its WAL up to here (protocol 3).
    Confirm {
        timeline: TimelineId,
        flush: Lsn,
    },

    History {
        timeline: TimelineId,
        content: bytes::Bytes,
    },
    PrimaryDown {
        timeline: TimelineId,
        wal_end: Lsn,
        since_unix_micros: u64,
    },
    /// Protocol 5: how the primary counts the sender as a synchronous standby.
    SyncState {
        timeline: TimelineId,
        state: walship_protocol::SyncState,
    },
}

/// Publishes the durable and confirmed positions of the session's timeline.
pub(crate) type AckTx = watch::Sender<Option<(TimelineId, Synced)>>;

/// Read buffer under the TLS layer of an authenticated session: TLS reads the socket in small pieces, and a
/// large buffer under it turns many small reads into few.
pub(crate) const SOCKET_BUFFER: usize = 256 << 10;

/// A WAL message this large means the sender is sending a backlog.
pub(crate) const LARGE_MESSAGE: usize = 512 << 10;
/// Most bytes one fsync covers.
pub(crate) const MAX_BATCH: usize = 64 << 20;
/// While catching up, how long and how often the writer waits for more before an fsync.
pub(crate) const CATCHUP_WAIT: std::time::Duration = std::time::Duration::from_micros(250);
pub(crate) const CATCHUP_WAITS: u32 = 8;

/// What a session's connection task, its writer and its syncer share: the archive and the sync state under one
/// lock, the syncer's wake-up, the acknowledgement channel, and how many commands went through the channel.
pub(crate) struct Desk {
    state: std::sync::Mutex<SyncState>,
    wake: std::sync::Condvar,
    acks: AckTx,
    timeline: TimelineId,
    features: Features,
    /// Commands the connection task handed to the writer through the channel (it alone counts them).
    handed: std::sync::atomic::AtomicU64,
}

impl Desk {
    pub(crate) fn new(
        archive: OwnedMutexGuard<Archive>,
        acks: AckTx,
        timeline: TimelineId,
        features: Features,
    ) -> Desk {
        Desk {
            state: std::sync::Mutex::new(SyncState {
                archive,
                done: false,
                ack_due: false,
                syncing: false,
                busy: false,
                applied: 0,
                failed: None,
            }),
            wake: std::sync::Condvar::new(),
            acks,
            timeline,
            features,
            handed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a command handed to the writer through the channel (call before it is sent).
    pub(crate) fn handing(&self) {
        self.handed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes back the count of a command the channel refused.
    pub(crate) fn not_handed(&self) {
        self.handed
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The archive, when the writer has nothing in hand: every command handed to it applied, no batch of it
    /// and no sync in progress, nothing failed. Never waits for the lock.
    pub(crate) fn idle(&self) -> Option<std::sync::MutexGuard<'_, SyncState>> {
        let g = match self.state.try_lock() {
            Ok(g) => g,
            Err(_) => return None,
        };
        let handed = self.handed.load(std::sync::atomic::Ordering::Relaxed);
        let idle = g.applied == handed
            && !g.busy
            && !g.syncing
            && !g.ack_due
            && !g.done
            && g.failed.is_none();
        idle.then_some(g)
    }

    /// The live path, on the connection task: applies `cmds` with the archive [`Desk::idle`] gave, makes them
    /// durable with one fdatasync and publishes the acknowledgement, crossing no thread. In order with
    /// everything handed to the writer before (it has applied all of it). An error is recorded (the writer
    /// rolls the archive back when the session ends) and returned, said for the sender.
    pub(crate) fn apply_and_sync<'a>(
        &'a self,
        mut g: std::sync::MutexGuard<'a, SyncState>,
        cmds: impl IntoIterator<Item = Cmd>,
    ) -> Result<(), String> {
        let mut taken = 0;
        for cmd in cmds {
            if let Err(e) = apply(&mut g.archive, cmd, self.features, &mut taken) {
                let reason = format!("archive write failed: {e:#}");
                g.failed.get_or_insert(e);
                return Err(reason);
            }
        }
        // (a slow fsync on the session's own task, for the fault tests)
        fail::fail_point!("session-live-sync");
        let (g, done) = sync_and_ack(g, &|| self.lock(), &self.acks, self.timeline);
        match done {
            Ok(()) => {
                // (by the conditions of `idle` nothing waits for the syncer; should that change, wake it)
                if g.ack_due || g.archive.unsynced() {
                    drop(g);
                    self.wake.notify_one();
                }
                Ok(())
            }
            Err(()) => Err(match &g.failed {
                Some(e) => format!("archive write failed: {e:#}"),
                None => "archive write failed".to_owned(),
            }),
        }
    }
}

/// Applies commands to the archive. Runs on a blocking thread; not cancellation safe.
///
/// Group commit, three ways. The live path (a sender shipping on write sends one small message per write of
/// the primary): the connection task appends, syncs and acknowledges a message itself when the writer has
/// nothing in hand ([`Desk::apply_and_sync`]), so a commit crosses no thread between its arrival and its
/// acknowledgement. Small batches that arrive while the writer works: it takes them from the channel as one
/// batch, syncs and acknowledges it itself when no sync is in progress. Catching up (large batches), or while a
/// sync is in progress: pipelined, a syncer thread runs the fdatasync of everything appended so far, outside
/// the archive's lock, counts it durable and acknowledges it, and at once starts the next sync if more has been
/// appended meanwhile; the writer appends on without waiting for the fsync in progress.
pub(crate) fn writer_loop(desk: Arc<Desk>, mut rx: mpsc::Receiver<Cmd>) -> Result<(), WriterError> {
    let started = std::thread::scope(|scope| {
        let syncer = std::thread::Builder::new()
            .name("walship-fsync".into())
            .spawn_scoped(scope, || syncer_loop(&desk));
        if let Err(e) = syncer {
            return Err(anyhow!("start the fsync thread: {e}"));
        }
        let applied = apply_commands(&mut rx, &desk);
        let mut g = desk.lock();
        g.done = true;
        if let Err(e) = applied {
            g.failed.get_or_insert(e);
        }
        drop(g);
        desk.wake.notify_one();
        Ok(())
    });
    let mut g = desk.lock();
    let failure = match started {
        Err(e) => Some(e),
        Ok(()) => g.failed.take(),
    };
    let Some(e) = failure else { return Ok(()) };
    Err(roll_back(&mut g.archive, e))
}

/// Nothing written since the last good fsync is trusted after `e`: undoes it, so the sender resends it.
fn roll_back(archive: &mut Archive, e: anyhow::Error) -> WriterError {
    match archive.recover_after_error() {
        Ok(()) => {
            info!(
                resume = ?archive.resume_points(),
                "archive rolled back to its last durable position after: {e:#}"
            );
            WriterError::Recovered(e)
        }
        Err(again) => {
            WriterError::Unrecoverable(e.context(format!("undoing it failed: {again:#}")))
        }
    }
}

/// Applies commands as they come, in batches: each batch ends by asking the syncer for an fsync and an
/// acknowledgement. Returns when the session's channel closes, or early when the syncer failed.
fn apply_commands(rx: &mut mpsc::Receiver<Cmd>, desk: &Desk) -> Result<()> {
    let lock = || desk.lock();
    while let Some(cmd) = rx.blocking_recv() {
        let mut next = Some(cmd);
        let mut taken = 0usize;
        let mut waits = 0;
        let mut catching_up = false;
        while let Some(cmd) = next.take() {
            let large = {
                let mut g = lock();
                if g.failed.is_some() {
                    return Ok(()); // the syncer stopped on an error, taken up by the caller
                }
                g.busy = true;
                g.applied += 1;
                apply(&mut g.archive, cmd, desk.features, &mut taken)?
            };
            catching_up |= large;
            if taken >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
            // Large messages mean the sender is catching up: a moment's wait for the next one makes one
            // fsync cover many megabytes instead of one (live streaming sends small messages).
            while next.is_none() && large && waits < CATCHUP_WAITS && taken < MAX_BATCH / 2 {
                waits += 1;
                std::thread::sleep(CATCHUP_WAIT);
                next = rx.try_recv().ok();
            }
        }
        let mut g = lock();
        if catching_up || g.syncing || g.ack_due {
            // pipelined: the syncer takes it (after the sync in progress, if any)
            g.ack_due = true;
            g.busy = false;
            drop(g);
            desk.wake.notify_one();
        } else {
            // small: synced and acknowledged here, no hand-over
            let (mut g, done) = sync_and_ack(g, &lock, &desk.acks, desk.timeline);
            g.busy = false;
            drop(g);
            if done.is_err() {
                return Ok(()); // recorded in `failed`, taken up by the caller
            }
        }
    }
    Ok(())
}

/// Makes everything appended so far durable (the fdatasync runs without the lock, marked `syncing`) and
/// publishes the acknowledgement. An error is recorded in `failed` (both threads stop) and returned.
fn sync_and_ack<'a>(
    mut g: std::sync::MutexGuard<'a, SyncState>,
    lock: &impl Fn() -> std::sync::MutexGuard<'a, SyncState>,
    acks: &AckTx,
    timeline: TimelineId,
) -> (std::sync::MutexGuard<'a, SyncState>, Result<(), ()>) {
    g.ack_due = false;
    let synced = if g.archive.unsynced() {
        crate::archive::crash_point!("receiver-written-before-fsync");
        let job = g.archive.prepare_sync();
        g.syncing = true;
        drop(g);
        let job = job.map(|job| {
            let started = std::time::Instant::now();
            let r = job.run();
            crate::metrics::METRICS
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            (job, r)
        });
        g = lock();
        g.syncing = false;
        job.and_then(|(job, r)| g.archive.finish_sync(timeline, job, r))
    } else {
        // nothing to fsync (a confirmation, WAL sent twice): record it and acknowledge
        g.archive.sync(timeline)
    };
    match synced {
        Ok(Some(synced)) => {
            crate::archive::crash_point!("receiver-fsynced-before-ack");
            acks.send_replace(Some((timeline, synced)));
            (g, Ok(()))
        }
        Ok(None) => (g, Ok(())),
        Err(e) => {
            g.failed.get_or_insert(e);
            (g, Err(()))
        }
    }
}

/// What the writer and the syncer of a session share, under one lock.
pub(crate) struct SyncState {
    archive: OwnedMutexGuard<Archive>,
    /// The writer has applied its last command.
    done: bool,
    /// Commands were applied since the last acknowledgement (WAL, or only a confirmation): the syncer's turn.
    ack_due: bool,
    /// An fdatasync is running without the lock (the connection task's, the writer's or the syncer's): the
    /// others wait for it.
    syncing: bool,
    /// The writer is applying a batch and has not yet synced it or handed it to the syncer.
    busy: bool,
    /// Commands the writer took from the channel and applied.
    applied: u64,
    /// The first error of either thread: both stop, the archive is rolled back.
    failed: Option<anyhow::Error>,
}

/// Applies one command; returns whether it was a large WAL message (a catch-up).
pub(crate) fn apply(
    archive: &mut Archive,
    cmd: Cmd,
    features: Features,
    taken: &mut usize,
) -> Result<bool> {
    Ok(match cmd {
        Cmd::Wal(w) => {
            *taken += w.bytes.len();
            archive.append(w.timeline, w.start_lsn, &w.bytes)?;
            if !features.ship_on_write() {
                // before shipping on write a sender sends only WAL the primary has flushed
                archive.confirm(w.timeline, w.end_lsn());
            }
            w.bytes.len() >= LARGE_MESSAGE
        }
        Cmd::Confirm { timeline, flush } => {
            archive.confirm(timeline, flush);
            false
        }
        Cmd::History { timeline, content } => {
            archive.store_history(timeline, &content)?;
            false
        }
        Cmd::PrimaryDown {
            timeline,
            wal_end,
            since_unix_micros,
        } => {
            let state = archive.record_primary_down(timeline, wal_end, since_unix_micros)?;
            if state.complete() {
                info!(%wal_end, "the primary is down; the archive holds all of its WAL (up to {wal_end})");
            } else {
                warn!(%wal_end, archived = %state.archived_end, "the primary is down; the archive does not hold all of its WAL");
            }
            false
        }
        Cmd::SyncState { timeline, state } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            archive.record_synchronous(timeline, state, now)?;
            info!(
                ?state,
                "the primary counts the sender as {state:?} (synchronous_standby_names)"
            );
            false
        }
    })
}

/// The syncer thread of a session: whenever something was appended (or confirmed), makes it durable and
/// acknowledges it. The fdatasync runs without the lock, so the writer appends meanwhile. Ends when the
/// writer is done and everything is durable, or at the first error.
pub(crate) fn syncer_loop(desk: &Desk) {
    let lock = || desk.lock();
    let mut g = lock();
    loop {
        while (g.syncing || (!g.ack_due && !g.archive.unsynced() && !g.done)) && g.failed.is_none()
        {
            g = desk.wake.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.failed.is_some() || (g.done && !g.ack_due && !g.archive.unsynced()) {
            return;
        }
        let (again, done) = sync_and_ack(g, &lock, &desk.acks, desk.timeline);
        g = again;
        if done.is_err() {
            return;
        }
    }
}

/// How the archive writer of a session ended.
#[derive(Debug)]
pub(crate) enum WriterError {
    /// A write or fsync failed and the archive was rolled back to its last durable position: the session
    /// ends, the receiver stays up, the sender resends.
    Recovered(anyhow::Error),
    /// The archive could not be brought back to a known durable state: the receiver must stop.
    Unrecoverable(anyhow::Error),
}
