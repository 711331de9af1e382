//! Durability: group commit ([`Archive::sync`]), the pipelined fsync of the open partial
//! ([`Archive::prepare_sync`], [`SyncJob::run`], [`Archive::finish_sync`]), what is acknowledged
//! ([`Synced`]), and the rollback after a failed write or fsync.

use super::*;

/// The fdatasync of a pipelined sync (see [`Archive::prepare_sync`]): run [`SyncJob::run`] on another
/// thread while the archive takes more appends.
#[derive(Debug)]
pub struct SyncJob {
    /// A handle of the open partial, its path, timeline, segment and the length to make durable.
    file: Option<(std::sync::Arc<File>, PathBuf, TimelineId, SegNo, u64)>,
    /// Where each timeline's WAL ended when the job was prepared: durable once it succeeds.
    ends: BTreeMap<TimelineId, Lsn>,
    generation: u64,
}

impl SyncJob {
    /// The fdatasync (no archive state is touched).
    pub fn run(&self) -> Result<()> {
        match &self.file {
            Some((file, path, ..)) => sync_file(file, path, false),
            None => Ok(()),
        }
    }
}

/// What [`Archive::sync`] made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Synced {
    /// Everything before it that the session sent is on disk.
    pub durable: Lsn,
    /// How much of that is confirmed.
    pub confirmed: Lsn,
}

impl Archive {
    /// Makes everything appended so far durable and returns what of `timeline` is durable and confirmed
    /// (never beyond what the session sent). One call covers every append before it (group commit).
    pub fn sync(&mut self, timeline: TimelineId) -> Result<Option<Synced>> {
        self.check_usable()?;
        if let Some(cur) = self.current.as_mut() {
            if cur.synced < cur.len {
                sync_file(&cur.file, &cur.path, false)?;
                cur.synced = cur.len;
            }
        }
        if self.dir_dirty {
            sync_dir_handle(&self.dir_handle, &self.dir)?;
            self.dir_dirty = false;
            if std::mem::take(&mut self.completed_unannounced) {
                self.announce_completion();
            }
        }
        for w in self.timelines.values_mut() {
            w.durable = Some(w.end);
        }
        self.write_position();
        Ok(self.synced(timeline))
    }

    /// Whether anything appended is not yet on disk (an fsync is due).
    pub fn unsynced(&self) -> bool {
        self.dir_dirty || self.current.as_ref().is_some_and(|c| c.synced < c.len)
    }

    /// Pipelined sync, step 1 (with the archive): fsyncs the directory if names changed (rare: a new or
    /// completed segment), and returns the fdatasync of the open partial to run elsewhere, so that appends
    /// go on meanwhile. What the job covers counts as durable once [`Archive::finish_sync`] has its result.
    pub fn prepare_sync(&mut self) -> Result<SyncJob> {
        self.check_usable()?;
        if self.dir_dirty {
            sync_dir_handle(&self.dir_handle, &self.dir)?;
            self.dir_dirty = false;
            if std::mem::take(&mut self.completed_unannounced) {
                self.announce_completion();
            }
        }
        let file = match &self.current {
            Some(c) if c.synced < c.len => {
                Some((c.file.clone(), c.path.clone(), c.timeline, c.segno, c.len))
            }
            _ => None,
        };
        Ok(SyncJob {
            file,
            ends: self.timelines.iter().map(|(t, w)| (*t, w.end)).collect(),
            generation: self.generation,
        })
    }

    /// Pipelined sync, step 3 (with the archive): `result` is the job's; on success everything it covered is
    /// durable. Returns what of `timeline` is durable and confirmed, as [`Archive::sync`] does. An error is
    /// the fsync's: call [`Archive::recover_after_error`].
    pub fn finish_sync(
        &mut self,
        timeline: TimelineId,
        job: SyncJob,
        result: Result<()>,
    ) -> Result<Option<Synced>> {
        result?;
        if job.generation != self.generation {
            // bytes were taken back meanwhile (and what remained was fsynced then): nothing to count
            return Ok(self.synced(timeline));
        }
        if let (Some((_, _, t, segno, len)), Some(cur)) = (&job.file, self.current.as_mut()) {
            if cur.timeline == *t && cur.segno == *segno {
                cur.synced = cur.synced.max(*len);
            }
        }
        for (t, end) in &job.ends {
            if let Some(w) = self.timelines.get_mut(t) {
                w.durable = Some(w.durable.map_or(*end, |d| d.max(*end)));
            }
        }
        self.write_position();
        Ok(self.synced(timeline))
    }

    /// What of `timeline` is durable and confirmed, never beyond what the session sent.
    pub(crate) fn synced(&self, timeline: TimelineId) -> Option<Synced> {
        let w = self.timelines.get(&timeline)?;
        let durable = w.durable?;
        let durable = w.verified.map_or(durable, |v| durable.min(v));
        let confirmed = durable.min(w.confirmed);
        Some(Synced { durable, confirmed })
    }

    /// Rewrites `walship.position` in place (fixed width: one small pwrite per group commit).
    pub(crate) fn write_position(&mut self) {
        let newest = self
            .timelines
            .iter()
            .rev()
            .find_map(|(t, w)| w.durable.map(|d| (*t, d, w.confirmed)));
        let Some((timeline, durable, confirmed)) = newest else {
            return;
        };
        let p = Positions {
            timeline,
            durable,
            confirmed: confirmed.min(durable),
        };
        if let Err(e) = self.position.write_all_at(p.render().as_bytes(), 0) {
            tracing::debug!(error = %e, "could not update {POSITION_FILE}");
        }
    }

    /// Called after any write or fsync error: drops every byte written since the last successful fsync and
    /// re-derives the archive's state from what is then on disk.
    ///
    /// After a failed fsync Linux marks the unwritten pages clean: a fresh read would show bytes that never
    /// reached the disk. So the open partial is first truncated back to what its last good fsync covered (the
    /// sender resends the rest), and the re-scan fsyncs everything it then counts as durable (PostgreSQL
    /// PANICs for the same reason; walship can do better because the sender still holds the bytes). If even
    /// that fails, the archive is unusable until the receiver is restarted: every later call fails with the
    /// reason, and the caller should stop.
    pub fn recover_after_error(&mut self) -> Result<()> {
        self.generation += 1;
        let result = (|| -> Result<()> {
            if let Some(cur) = self.current.take() {
                if cur.synced < cur.len {
                    // rewritten, not cut: the partial stays preallocated (the bytes a failed fsync dropped are
                    // overwritten, so a fresh read cannot show them)
                    tail::zero_range(&cur.file, cur.synced, cur.len).with_context(|| {
                        format!(
                            "write zeros to {} after its last fsynced length {}",
                            cur.path.display(),
                            cur.synced
                        )
                    })?;
                    tracing::warn!(
                        file = %cur.path.display(),
                        kept = cur.synced,
                        dropped = cur.len.saturating_sub(cur.synced),
                        "dropped the bytes written since the last successful fsync; the sender resends them"
                    );
                }
                sync_file(&cur.file, &cur.path, true)?;
            }
            self.timelines.clear();
            self.dir_dirty = false;
            self.identity = Identity::load(&self.dir)?;
            self.scan()
        })();
        if let Err(e) = &result {
            self.poisoned = Some(format!("{e:#}"));
        }
        result
    }
}
