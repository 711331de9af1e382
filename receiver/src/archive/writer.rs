//! Appending WAL: resent bytes compared, a provisional tail replaced, a gap refused (or bridged through a
//! switch record), segments completed and renamed.

use super::*;

/// A segment that starts with an append of this many bytes or more is being caught up: it need not wait for
/// the spare's zeros (see [`Archive::take_spare`]). A live message holds one or a few commits.
const GROWING_PARTIAL_APPEND: usize = 256 << 10;

impl Archive {
    /// Appends WAL of `timeline` starting at `start`. Bytes the archive already holds must be identical to the
    /// stored ones (a resend after a reconnect); a gap or a difference is an error and nothing is written.
    /// Not cancellation safe (disk I/O); call from a blocking context.
    pub fn append(&mut self, timeline: TimelineId, start: Lsn, bytes: &[u8]) -> Result<()> {
        self.check_usable()?;
        crate::metrics::METRICS
            .wal_bytes_received
            .inc_by(bytes.len() as u64);
        let seg = self.seg()?;
        if let Some(latest) = self.latest_timeline() {
            if timeline < latest {
                bail!("WAL for timeline {timeline} but the archive already holds timeline {latest}: refusing to write to a superseded timeline");
            }
        }
        if let Some(handover) = self.fenced(timeline)? {
            bail!("{}", fence_message(&handover));
        }
        let end = match self.end_of(timeline) {
            Some(end) => end,
            None => {
                if seg.offset(start) != 0 {
                    bail!(
                        "first WAL of timeline {timeline} starts at {start}, not at a segment boundary ({seg} segments)"
                    );
                }
                if self.latest_timeline().is_some_and(|l| timeline > l)
                    && !self.dir.join(history_file_name(timeline)).exists()
                {
                    bail!(
                        "WAL of timeline {timeline}, newer than the archive's, without its history file {}: a new timeline is \
                         accepted only with a history that branches from WAL this archive holds; refusing it",
                        history_file_name(timeline)
                    );
                }
                // a failover of an older timeline is over once WAL of a newer one arrives
                retire_failover(&self.dir, timeline)?;
                start
            }
        };
        if start > end && !self.bridge_switch(timeline, end, start, bytes)? {
            bail!("gap in WAL of timeline {timeline}: archive ends at {end}, the sender sent bytes from {start} (the WAL between \
                   is gone from the primary's pg_wal: keep WAL for walship with a replication slot, then restore the missing \
                   segments into the archive, or start over with a new base backup and an empty archive)");
        }
        let end = self.end_of(timeline).unwrap_or(end);
        let mut overlap = (end.0 - start.0).min(bytes.len() as u64) as usize;
        if overlap > 0 {
            if let Some(differs) = self.verify_overlap(timeline, start, &bytes[..overlap])? {
                self.replace_provisional(timeline, differs)?;
                overlap = (differs.0 - start.0) as usize;
            }
        }
        let mut pos = Lsn(start.0 + overlap as u64);
        let mut rest = &bytes[overlap..];
        while !rest.is_empty() {
            let segno = seg.segno(pos);
            let offset = seg.offset(pos);
            let room = (seg.as_u64() - offset) as usize;
            let n = room.min(rest.len());
            self.write_segment(timeline, segno, offset, &rest[..n])?;
            rest = &rest[n..];
            pos = Lsn(pos.0 + n as u64);
            // a timeline new to this receiver begins here, nothing of it confirmed
            self.timeline_mut(timeline, start).end = pos;
        }
        let end = Lsn(start.0 + bytes.len() as u64);
        let w = self.timeline_mut(timeline, start);
        w.verified = Some(w.verified.map_or(end, |v| v.max(end)));
        Ok(())
    }

    /// A sender resumes at `start`, the first byte of the segment after the archive's open partial, which ends
    /// at `end`: PostgreSQL removed the partial's segment after a crash, so the bytes cannot be resent and
    /// compared (issue 19, point 10). Accepted only where PostgreSQL's own history proves the archive's WAL:
    /// the partial's last valid record is an `XLOG_SWITCH` ending at `end`, so the rest of its segment is
    /// padding, and the first record at `start` names that switch as its predecessor (`xl_prev`, the link
    /// PostgreSQL's recovery follows). The partial is then completed with the padding PostgreSQL writes
    /// (zeros, PostgreSQL 11 and later) and the new bytes follow. Returns whether it bridged; `false` leaves
    /// the archive unchanged (the caller reports the gap).
    pub(crate) fn bridge_switch(
        &mut self,
        timeline: TimelineId,
        end: Lsn,
        start: Lsn,
        bytes: &[u8],
    ) -> Result<bool> {
        let seg = self.seg()?;
        let Some(identity) = self.identity else {
            return Ok(false);
        };
        // PostgreSQL 10 pads a switched segment with page headers, which the archive cannot rebuild
        if identity.pg_major() < 11 || seg.offset(start) != 0 || seg.offset(end) == 0 {
            return Ok(false);
        }
        let segno = seg.segno(end);
        if seg.segno(start) != segno + 1 {
            return Ok(false);
        }
        let Some(exp) = identity.page_expectation(timeline) else {
            return Ok(false);
        };
        let Some(cur) = self
            .current
            .as_ref()
            .filter(|c| c.timeline == timeline && c.segno == segno && c.len == seg.offset(end))
        else {
            return Ok(false);
        };
        let mut held = vec![0u8; cur.len as usize];
        cur.file.read_exact_at(&mut held, 0).with_context(|| {
            format!("read back {} to link a resumed sender", cur.path.display())
        })?;
        let base = seg.segment_start(segno);
        let Some(switch) = final_switch(exp, &held, base, end) else {
            return Ok(false);
        };
        if let Err(stop) = names_as_previous(exp, bytes, start, switch.start) {
            tracing::warn!(%start, switch = %switch.start, "not linking the resumed sender's WAL to the archive's switch record: {stop}");
            return Ok(false);
        }
        let name = segment_file_name(timeline, segno, seg);
        tracing::info!(
            segment = %name,
            switch = %switch.start,
            resumed = %start,
            "PostgreSQL removed the segment of the archive's last WAL after a restart; the primary's next record \
             follows the archive's switch record, so the segment is completed with its padding"
        );
        let zeros = vec![0u8; XLOG_BLCKSZ * 16];
        let mut pos = end;
        while pos < start {
            let n = ((start.0 - pos.0) as usize).min(zeros.len());
            self.write_segment(timeline, segno, seg.offset(pos), &zeros[..n])?;
            pos = Lsn(pos.0 + n as u64);
            self.timeline_mut(timeline, end).end = pos;
        }
        Ok(true)
    }
}

/// The partial's last valid record, if it is an `XLOG_SWITCH` ending at or before `end` with only padding
/// (zeros) after it: a drain ships the padding it finds.
fn final_switch(
    exp: walship_protocol::wal::PageExpectation,
    held: &[u8],
    base: Lsn,
    end: Lsn,
) -> Option<walship_protocol::walker::Record> {
    let mut walker = Walker::resync(exp, held, base).ok()?;
    let mut last = None;
    walker.walk(held, base, |r| last = Some(*r));
    last.filter(|r| {
        r.is_switch()
            && r.own_end <= end
            && held[(r.own_end.0 - base.0) as usize..]
                .iter()
                .all(|b| *b == 0)
    })
}

/// Whether the first record of `bytes` (at `start`, a segment's first byte) names the record at `previous`
/// as the one before it (`xl_prev`). A record not complete in this message is judged by its header alone.
fn names_as_previous(
    exp: walship_protocol::wal::PageExpectation,
    bytes: &[u8],
    start: Lsn,
    previous: Lsn,
) -> std::result::Result<(), WalkStop> {
    let mut next = Walker::new(exp, start, Some(previous));
    match next.next_record(bytes, start) {
        Ok(_) => Ok(()),
        Err(WalkStop::NeedMore { .. })
            if bytes.len() >= LONG_PAGE_HEADER + 16
                && u64::from_le_bytes(
                    bytes[LONG_PAGE_HEADER + 8..LONG_PAGE_HEADER + 16]
                        .try_into()
                        .expect("8 bytes"),
                ) == previous.0 =>
        {
            Ok(())
        }
        Err(stop) => Err(stop),
    }
}

impl Archive {
    /// Whether `timeline` is fenced: its end was handed to recovery at a failover (`restore` recorded the
    /// handover), so a standby was promoted from it and the server that wrote it must not extend or change
    /// it. Cheap while no failover is under way (one `stat`).
    pub fn fenced(&self, timeline: TimelineId) -> Result<Option<Handover>> {
        if !self.dir.join(FAILOVER_FILE).exists() {
            return Ok(None);
        }
        Ok(Failover::load(&self.dir)?
            .and_then(|f| f.current_handover().cloned())
            .filter(|h| h.timeline == timeline))
    }

    /// The resent WAL of `timeline` differs from the archive's from `at` on. Allowed only where nothing is
    /// confirmed and only in the open partial (a complete segment is never changed): the primary's OS lost
    /// WAL it had written but not flushed, and the primary wrote other WAL there after restarting. Cuts the
    /// partial back to `at` (durably) so the new bytes are appended there.
    pub(crate) fn replace_provisional(&mut self, timeline: TimelineId, at: Lsn) -> Result<()> {
        let seg = self.seg()?;
        let confirmed = self
            .timelines
            .get(&timeline)
            .map_or(Lsn(0), |w| w.confirmed);
        let name = segment_file_name(timeline, seg.segno(at), seg);
        if at < confirmed {
            bail!(
                "resent WAL differs from the archive at {at} (segment {name}), where the archive holds WAL the primary had confirmed (flushed, up to {confirmed}): the sender's history diverged from what was archived (another primary of this cluster: a restored copy started as a primary, a split brain, or a primary rebuilt without a new archive); refusing to overwrite"
            );
        }
        let Some(cur) = self
            .current
            .as_mut()
            .filter(|c| c.timeline == timeline && c.segno == seg.segno(at))
        else {
            bail!(
                "resent WAL differs from the archive at {at} (segment {name}, complete): a complete segment is never changed; refusing to overwrite"
            );
        };
        let offset = seg.offset(at);
        let dropped = cur.len - offset;
        tail::zero_range(&cur.file, offset, cur.len)
            .with_context(|| format!("write zeros to {} from {offset}", cur.path.display()))?;
        sync_file(&cur.file, &cur.path, false)?;
        cur.len = offset;
        cur.synced = offset;
        let path = cur.path.clone();
        self.generation += 1;
        let w = self.timeline_mut(timeline, at);
        w.end = at;
        w.durable = Some(w.durable.map_or(at, |d| d.min(at)));
        self.write_position();
        tracing::warn!(
            file = %path.display(),
            from = %at,
            dropped,
            confirmed = %confirmed,
            "replacing provisional WAL: the primary now has different WAL where it had written but not flushed it (its operating system lost unflushed WAL); the archive follows the primary"
        );
        Ok(())
    }

    pub(crate) fn write_segment(
        &mut self,
        timeline: TimelineId,
        segno: SegNo,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let seg = self.seg()?;
        let same = matches!(&self.current, Some(c) if c.timeline == timeline && c.segno == segno);
        if !same {
            if let Some(old) = self.current.as_mut() {
                // leaving a partial behind (timeline switch): make it durable first
                sync_file(&old.file, &old.path, false)?;
                old.synced = old.len;
            }
            self.current = None;
            if offset != 0 {
                bail!("internal: new segment {} of timeline {timeline} would start at offset {offset}", segno);
            }
            let name = format!("{}.partial", segment_file_name(timeline, segno, seg));
            let path = self.dir.join(&name);
            let file = self.take_spare(&path, data.len() >= GROWING_PARTIAL_APPEND)?;
            self.dir_dirty = true;
            self.current = Some(OpenPartial {
                timeline,
                segno,
                path,
                file: std::sync::Arc::new(file),
                len: 0,
                synced: 0,
            });
        }
        let cur = self.current.as_mut().context("internal: no open partial")?;
        if cur.len != offset {
            bail!(
                "internal: partial of segment {segno} holds {} bytes, write at {offset}",
                cur.len
            );
        }
        let written = write_at(&cur.file, data, offset);
        written.with_context(|| {
            format!(
                "write {} bytes to {} at offset {offset}",
                data.len(),
                cur.path.display()
            )
        })?;
        cur.len += data.len() as u64;
        if cur.len == seg.as_u64() {
            sync_file(&cur.file, &cur.path, false)?;
            cur.synced = cur.len;
            self.current = None;
            self.finish_segment_file(timeline, segno)?;
            // A sender completes a segment only with WAL the primary flushed (it never ships provisional WAL
            // to a segment's last byte), though its confirmation may come a moment later: the complete segment
            // is confirmed now, so a resume never needs a segment PostgreSQL may have removed meanwhile.
            let complete = seg.segment_start(segno + 1);
            let w = self.timeline_mut(timeline, complete);
            w.confirmed = w.confirmed.max(complete);
            self.dir_dirty = true;
            crash_point!("archive-renamed-before-dir-fsync");
        }
        Ok(())
    }

    pub(crate) fn finish_segment_file(&mut self, timeline: TimelineId, segno: SegNo) -> Result<()> {
        let seg = self.seg()?;
        let name = segment_file_name(timeline, segno, seg);
        let from = self.dir.join(format!("{name}.partial"));
        let to = self.dir.join(&name);
        fs::rename(&from, &to)
            .with_context(|| format!("rename {} to {}", from.display(), to.display()))?;
        tracing::debug!(segment = %name, "segment complete");
        crate::metrics::METRICS.segments_completed.inc();
        self.completed_unannounced = true;
        Ok(())
    }

    /// Compares resent WAL with the archive's; returns where it first differs, if it does.
    pub(crate) fn verify_overlap(
        &self,
        timeline: TimelineId,
        start: Lsn,
        expected: &[u8],
    ) -> Result<Option<Lsn>> {
        let seg = self.seg()?;
        let mut pos = start;
        let mut rest = expected;
        while !rest.is_empty() {
            let segno = seg.segno(pos);
            let offset = seg.offset(pos);
            let n = ((seg.as_u64() - offset) as usize).min(rest.len());
            let name = segment_file_name(timeline, segno, seg);
            let mut stored = vec![0u8; n];
            let read = match &self.current {
                Some(c) if c.timeline == timeline && c.segno == segno => {
                    c.file.read_exact_at(&mut stored, offset)
                }
                _ => File::open(self.dir.join(&name))
                    .or_else(|_| File::open(self.dir.join(format!("{name}.partial"))))
                    .and_then(|f| f.read_exact_at(&mut stored, offset)),
            };
            read.with_context(|| {
                format!("read back segment {name} at offset {offset} to compare a resent range")
            })?;
            if stored != rest[..n] {
                let first = stored
                    .iter()
                    .zip(&rest[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Ok(Some(Lsn(pos.0 + first as u64)));
            }
            rest = &rest[n..];
            pos = Lsn(pos.0 + n as u64);
        }
        Ok(None)
    }
}
