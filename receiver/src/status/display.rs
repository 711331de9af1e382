//! The status report as text (`walship-receiver status` without `--json`).

use std::fmt::{Display, Formatter, Result};

use walship_protocol::Lsn;

use super::Report;

/// An optional value, or `-`.
struct Opt<'a, T>(&'a Option<T>);

impl<T: Display> Display for Opt<'_, T> {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl Display for Report {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        self.archive_lines(f)?;
        self.sender_lines(f)?;
        self.store_lines(f)?;
        self.failover_lines(f)?;
        if let Some(v) = &self.verdict {
            writeln!(
                f,
                "verdict:            {}: {}",
                v.level,
                v.reasons.join("; ")
            )?;
        }
        Ok(())
    }
}

impl Report {
    fn archive_lines(&self, f: &mut Formatter<'_>) -> Result {
        writeln!(f, "archive:            {}", self.archive)?;
        match (self.system_identifier, self.wal_segment_size) {
            (Some(id), Some(seg)) => writeln!(
                f,
                "cluster:            system identifier {id}, {} MB segments, server_version_num {}",
                seg >> 20,
                self.pg_version_num.unwrap_or(0)
            )?,
            _ => writeln!(f, "cluster:            none yet (no sender has connected)")?,
        }
        writeln!(f, "timeline:           {}", Opt(&self.timeline))?;
        writeln!(f, "archived up to:     {}", Opt(&self.archived_lsn))?;
        if self.confirmed_lsn != self.archived_lsn {
            writeln!(
                f,
                "confirmed up to:    {} (beyond: provisional, written by the primary but not yet known flushed)",
                Opt(&self.confirmed_lsn)
            )?;
        }
        writeln!(f, "complete segments:  {}", self.complete_segments)?;
        match (&self.current_partial, self.current_partial_bytes) {
            (Some(p), Some(b)) => writeln!(f, "current partial:    {p} ({b} bytes)"),
            _ => writeln!(f, "current partial:    -"),
        }
    }

    fn sender_lines(&self, f: &mut Formatter<'_>) -> Result {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "receiver running:   {}", yes_no(self.receiver_running))?;
        if self.sender_connected {
            writeln!(
                f,
                "sender:             {} (connected)",
                Opt(&self.sender_name)
            )?;
            writeln!(f, "primary flushed:    {}", Opt(&self.primary_flush_lsn))?;
            writeln!(
                f,
                "lag:                {} bytes, {:.1} s",
                self.lag_bytes.unwrap_or(0),
                self.lag_seconds.unwrap_or(0.0)
            )?;
        } else {
            writeln!(f, "sender:             not connected")?;
        }
        if let Some(line) = self.synchronous_line() {
            writeln!(f, "synchronous:        {line}")?;
        }
        let Some(down) = &self.primary_down else {
            return Ok(());
        };
        let since = time::OffsetDateTime::from_unix_timestamp_nanos(
            down.down_since_unix_micros as i128 * 1000,
        )
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "?".into());
        let all = match self.primary_wal_archived {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        };
        writeln!(
            f,
            "primary:            down since {since}, its WAL ends at {}; the archive holds all of it: {all}",
            down.wal_end
        )
    }

    /// With a `--synchronous` sender: whether commits on the primary wait for this archive, and whether they
    /// are waiting now because no sender is connected.
    fn synchronous_line(&self) -> Option<String> {
        use walship_protocol::SyncState;
        let s = self.synchronous.as_ref()?;
        let since =
            time::OffsetDateTime::from_unix_timestamp_nanos(s.since_unix_micros as i128 * 1000)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| "?".into());
        let state = match s.state {
            SyncState::Sync => "sync",
            SyncState::Quorum => "quorum",
            SyncState::Async => "async",
        };
        Some(match (s.state, self.sender_connected) {
            (SyncState::Async, _) => format!(
                "the sender runs --synchronous but the primary does not count it (sync_state = {state} since \
                 {since}): commits do not wait for this archive; is it named in synchronous_standby_names?"
            ),
            (_, true) => format!(
                "yes (sync_state = {state} since {since}): a commit on the primary returns once this archive \
                 holds it"
            ),
            (_, false) => format!(
                "sync_state was {state} (since {since}) when the last sender left{}: commits on the primary wait \
                 for walship until a sender is back, unless another standby of a quorum answers or walship is \
                 taken out of synchronous_standby_names",
                self.no_sender_seconds
                    .map(|n| format!(" {n:.0} s ago"))
                    .unwrap_or_default()
            ),
        })
    }

    fn store_lines(&self, f: &mut Formatter<'_>) -> Result {
        if let Some(store) = &self.store {
            writeln!(
                f,
                "object store:       {store}: complete segments up to {}, {} waiting",
                self.store_uploaded_up_to.as_deref().unwrap_or("none yet"),
                self.store_waiting_segments.unwrap_or(0)
            )?;
        }
        let Some(c) = &self.store_contents else {
            return Ok(());
        };
        match &c.error {
            Some(e) => writeln!(f, "object store:       {}: cannot list it: {e}", c.url),
            None => writeln!(
                f,
                "store holds:        {} complete segments ({} to {}), partial {}, {} history files, {:.1} MB compressed",
                c.complete_segments,
                c.oldest_segment.as_deref().unwrap_or("-"),
                c.newest_segment.as_deref().unwrap_or("-"),
                c.partial.as_deref().unwrap_or("none"),
                c.history_files,
                c.bytes as f64 / 1e6
            ),
        }
    }

    fn failover_lines(&self, f: &mut Formatter<'_>) -> Result {
        if self.failover_triggered {
            writeln!(f, "failover:           triggered")?;
        }
        if let Some(h) = &self.handover {
            let end: Lsn = h.end_lsn;
            writeln!(
                f,
                "handed over:        {} ({} bytes of partial, WAL up to {end})",
                h.segment, h.partial_bytes
            )?;
        }
        Ok(())
    }
}
