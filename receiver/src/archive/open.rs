//! Opening an archive: the lock, the scan that finds where each timeline's WAL ends, torn tails of a
//! partial cut back (never below what `walship.position` recorded as durable).

use super::*;

impl Archive {
    /// Opens (creating it if needed, mode 0700) and locks the archive in `dir`, and re-derives where each
    /// timeline's WAL ends, truncating torn tails.
    pub fn open(dir: &Path) -> Result<Archive> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("create archive directory {}", dir.display()))?;
        }
        let meta =
            fs::metadata(dir).with_context(|| format!("archive directory {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("archive {} is not a directory", dir.display());
        }
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                archive = %dir.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "archive directory is readable by others; WAL holds every row of the database: chmod 0700 it"
            );
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = create_options()
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("open lock file {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => bail!(
                "archive {} is in use by another walship receiver (it holds the lock on {}); run one receiver per archive",
                dir.display(),
                LOCK_FILE
            ),
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("lock {}", lock_path.display()));
            }
        }
        let dir_handle =
            File::open(dir).with_context(|| format!("open archive directory {}", dir.display()))?;
        let position_path = dir.join(POSITION_FILE);
        let position = create_options()
            .create(true)
            .truncate(false)
            .open(&position_path)
            .with_context(|| format!("open {}", position_path.display()))?;
        let identity = Identity::load(dir)?;
        let mut archive = Archive {
            dir: dir.to_owned(),
            dir_handle,
            _lock: lock,
            position,
            identity,
            timelines: BTreeMap::new(),
            current: None,
            dir_dirty: false,
            poisoned: None,
            completions: None,
            completed_unannounced: false,
            generation: 0,
            spare: None,
        };
        archive.scan()?;
        archive.prepare_spare();
        Ok(archive)
    }

    pub(crate) fn scan(&mut self) -> Result<()> {
        let mut newest: BTreeMap<TimelineId, (SegNo, bool)> = BTreeMap::new();
        let mut wal_files = 0usize;
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("list archive {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("list archive {}", self.dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // an interrupted atomic write: never renamed, so never acknowledged
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(identity) = self.identity else {
                if name.len() >= 24 && name.as_bytes()[..24].iter().all(u8::is_ascii_hexdigit) {
                    wal_files += 1;
                }
                continue;
            };
            let seg = identity.wal_segment_size;
            match WalFileName::parse(name, seg) {
                Ok(WalFileName::Segment { timeline, segno }) => {
                    let e = newest.entry(timeline).or_insert((segno, false));
                    if segno >= e.0 {
                        *e = (segno, false);
                    }
                }
                Ok(WalFileName::Partial { timeline, segno }) => {
                    let e = newest.entry(timeline).or_insert((segno, true));
                    if segno > e.0 || (segno == e.0 && e.1) {
                        *e = (segno, true);
                    }
                }
                _ => {}
            }
        }
        if self.identity.is_none() && wal_files > 0 {
            bail!(
                "archive {} holds {wal_files} WAL files but no {ID_FILE}: it was not made by walship; use an empty directory",
                self.dir.display()
            );
        }
        if !newest.is_empty() {
            // names renamed just before a crash count only once the directory is on disk
            sync_dir_handle(&self.dir_handle, &self.dir)?;
        }
        let recorded = read_positions(&self.dir);
        for (timeline, (segno, partial)) in newest {
            let recorded = recorded.filter(|p| p.timeline == timeline);
            let wal = self.timeline_at_open(timeline, segno, partial, recorded)?;
            self.timelines.insert(timeline, wal);
        }
        Ok(())
    }

    /// What the files say of `timeline`, whose newest segment is `segno` (a `.partial` if `partial`), with
    /// `walship.position`'s record of it.
    fn timeline_at_open(
        &mut self,
        timeline: TimelineId,
        segno: SegNo,
        partial: bool,
        recorded: Option<Positions>,
    ) -> Result<TimelineWal> {
        let seg = self.seg()?;
        let end = if partial {
            // trailing zeros at or below the last recorded durable end were acknowledged: keep them
            let floor = recorded.map_or(0, |p| p.durable_in(seg, timeline, segno));
            let len = self.recover_partial(timeline, segno, floor)?;
            Lsn(seg.segment_start(segno).0 + len)
        } else {
            seg.segment_start(segno + 1)
        };
        // Without a record (an older timeline, a lost file) everything counts as confirmed: a difference is
        // then refused rather than replaced. A record may be stale (the file is not fsynced: a power loss of
        // the standby leaves an older one), never below what the files prove: a segment is completed only
        // with confirmed bytes, so everything before the open partial is confirmed. That keeps the resume
        // point within the segment the replication slot holds.
        let proven = if partial {
            seg.segment_start(segno)
        } else {
            end
        };
        let confirmed = recorded.map_or(end, |p| p.confirmed.max(proven).min(end));
        Ok(TimelineWal {
            end,
            durable: Some(end),
            confirmed,
            verified: None,
        })
    }

    /// Finds the valid end of a `.partial` after a restart ([`tail::valid_len`]: the end of its last complete,
    /// valid record, never below `floor`, the durable end that `walship.position` recorded: exact after a crash
    /// of the process, it is written after every fsync; at worst older after a power loss) and writes zeros
    /// over whatever lies beyond (a torn write, bytes never made durable): the sender resends from there. A
    /// partial written by an older receiver (growing, shorter than a segment) is filled with zeros to the
    /// segment's size, so appends to it need only `fdatasync` too. Returns the partial's valid length.
    pub(crate) fn recover_partial(
        &mut self,
        timeline: TimelineId,
        segno: SegNo,
        floor: u64,
    ) -> Result<u64> {
        let Some(identity) = self.identity else {
            return Ok(0);
        };
        let seg = identity.wal_segment_size;
        let name = format!("{}.partial", segment_file_name(timeline, segno, seg));
        let path = self.dir.join(&name);
        let mut file = create_options()
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .with_context(|| format!("read {}", path.display()))?;
        let found = data.len() as u64;
        let keep = tail::valid_len(&identity, timeline, segno, &data, floor);
        // the last byte that is not zero: what lies between the valid end and it is not WAL
        let written = data
            .iter()
            .rposition(|b| *b != 0)
            .map_or(0, |i| i as u64 + 1);
        if written > keep {
            tracing::warn!(
                file = %name,
                valid = keep,
                written,
                "partial segment tail after its last valid record is not WAL (a crash before an fsync?); zeroed, the sender resends it"
            );
        }
        if found > seg.as_u64() {
            file.set_len(seg.as_u64())
                .with_context(|| format!("truncate {}", path.display()))?;
        }
        // a preallocated partial: zeros over what follows the valid end; a growing one: filled to full size
        let zero_to = if found < seg.as_u64() {
            seg.as_u64()
        } else {
            written.min(seg.as_u64())
        };
        match tail::zero_range(&file, keep, zero_to.max(keep)) {
            Ok(()) => {}
            // a growing partial that cannot be filled (a full disk) stays growing: cut back to its valid end
            Err(e) if found < seg.as_u64() => {
                tracing::warn!(
                    file = %path.display(),
                    valid = keep,
                    "cannot fill the growing partial to the segment's size ({e}); it keeps growing with its appends"
                );
                file.set_len(keep).with_context(|| {
                    format!("truncate {} to its valid end {keep}", path.display())
                })?;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "write zeros to {} after its valid end {keep}",
                        path.display()
                    )
                })
            }
        }
        // What a crashed receiver wrote may still sit only in the page cache: it counts as durable (and is
        // offered in the first Welcome) only once this fsync has put it on disk.
        sync_file(&file, &path, true)?;
        if keep == seg.as_u64() {
            // complete, but the rename did not happen before a crash
            self.finish_segment_file(timeline, segno)?;
            sync_dir_handle(&self.dir_handle, &self.dir)?;
        } else {
            self.current = Some(OpenPartial {
                timeline,
                segno,
                path,
                file: std::sync::Arc::new(file),
                len: keep,
                synced: keep,
            });
        }
        Ok(keep)
    }
}
