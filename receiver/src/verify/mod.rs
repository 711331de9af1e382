//! `walship-receiver verify`: proves what an archive can restore. Every record of every timeline it holds is
//! walked as recovery would read it ([`walk`]), the history files are followed (each timeline's branch point
//! against its parent's WAL), the partial's valid end is compared with what the receiver acknowledged as
//! durable, and with `--object-store` every object is downloaded, decompressed, checked and compared with
//! the local file where both exist. Nothing is modified.
//!
//! The answer, per timeline: the ranges of WAL that replay without a break ("a base backup taken at or after
//! X recovers to any point up to Y"), and each problem with its file, LSN and meaning. Exit codes as
//! `status`: 0 no problem, 2 a problem, 3 the archive could not be read.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use walship_protocol::wal::{
    history_file_name, parse_history, segment_file_name, SegNo, WalFileName,
};
use walship_protocol::{Lsn, TimelineId};

use crate::archive::{read_positions, ArchivedSegment, Identity};
use crate::store::{block_on, Store};

mod walk;
use walk::TimelineWalk;

/// Bytes of a local segment read at a time.
const CHUNK: usize = 4 << 20;

/// What kind of problem (for monitoring; the message says what it means).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Segments missing between two the archive holds, or a partial followed by later WAL.
    Gap,
    /// A record inside a complete segment fails its checks (CRC-32C, length, `xl_prev`, page header).
    DamagedRecord,
    /// A page header that is not this cluster's or timeline's.
    InvalidPage,
    /// A complete segment of the wrong size.
    WrongSize,
    /// The partial holds less WAL than the receiver acknowledged as durable.
    TruncatedPartial,
    /// A timeline branches where its parent has no WAL.
    Branch,
    /// A timeline without its history file, or a history file that does not parse.
    History,
    /// An object of the store that cannot be read, does not decompress or fails its checksum.
    StoreUnreadable,
    /// An object of the store whose content differs from the local file.
    StoreDiffers,
    /// A local file that cannot be read.
    Unreadable,
}

/// One problem found.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub timeline: TimelineId,
    pub file: String,
    pub lsn: Option<Lsn>,
    pub message: String,
}

/// WAL that replays without a break.
#[derive(Clone, Debug, Serialize)]
pub struct Range {
    pub from: Lsn,
    pub to: Lsn,
    /// Where a base backup must start (timeline, LSN) to reach `to` through this range: `from` on this
    /// timeline, or, for a timeline's first range that continues its parent's WAL through the branch
    /// point, where the parent's range starts.
    pub backup_from_timeline: TimelineId,
    pub backup_from: Lsn,
}

/// One timeline of the archive.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineReport {
    pub timeline: TimelineId,
    /// The timeline it branched from and where (its history file).
    pub parent: Option<TimelineId>,
    pub branch_point: Option<Lsn>,
    pub segments: usize,
    pub first_file: Option<String>,
    pub last_file: Option<String>,
    pub records: u64,
    /// The end of the last valid record of the timeline's last file.
    pub valid_end: Option<Lsn>,
    pub replayable: Vec<Range>,
    pub problems: Vec<Problem>,
}

/// The answer of `verify`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub archive: String,
    pub object_store: Option<String>,
    pub system_identifier: u64,
    pub wal_segment_size: u32,
    pub pg_version_num: u32,
    pub timelines: Vec<TimelineReport>,
    /// Objects of the store downloaded and checked.
    pub store_objects_checked: usize,
    /// Problems found, all timelines.
    pub problems: usize,
}

impl Report {
    /// 0 without a problem, 2 with one (as `status`' CRITICAL).
    pub fn exit_code(&self) -> u8 {
        if self.problems == 0 {
            0
        } else {
            2
        }
    }
}

/// What to verify.
pub struct Options<'a> {
    pub archive: &'a Path,
    pub store: Option<&'a Store>,
    /// Start at this segment number (segments before it are not read).
    pub from: Option<SegNo>,
    /// Show progress on stderr.
    pub progress: bool,
}

/// Where one segment's bytes are.
#[derive(Clone, Debug, Default)]
struct Sources {
    /// The local file: path, complete or not.
    local: Option<(PathBuf, bool)>,
    /// The store's object of the complete segment, and of its partial.
    stored_complete: bool,
    stored_partial: bool,
}

/// Parses `--from`: a segment file name or an LSN.
pub fn parse_from(text: &str, identity: &Identity) -> Result<SegNo> {
    let seg = identity.wal_segment_size;
    if let Ok(WalFileName::Segment { segno, .. } | WalFileName::Partial { segno, .. }) =
        WalFileName::parse(text, seg)
    {
        return Ok(segno);
    }
    match text.parse::<Lsn>() {
        Ok(lsn) => Ok(seg.segno(lsn)),
        Err(_) => bail!(
            "--from {text:?} is neither a segment file name (000000010000000000000003) nor an LSN (0/3000000)"
        ),
    }
}

/// The archive's identity: its `walship.id`, or the store's for a directory that restores from it alone.
pub fn identity(archive: &Path, store: Option<&Store>) -> Result<Identity> {
    if let Some(id) = Identity::load(archive)? {
        return Ok(id);
    }
    if let Some(store) = store {
        if let Some(id) = block_on(store.identity())?? {
            return Ok(id);
        }
    }
    bail!(
        "{} holds no walship.id{}: not a walship archive (or not yet written to by a receiver)",
        archive.display(),
        if store.is_some() {
            ", nor does the object store"
        } else {
            ""
        }
    )
}

/// Verifies the archive (read-only).
pub fn verify(opts: &Options<'_>) -> Result<Report> {
    let id = identity(opts.archive, opts.store)?;
    let seg = id.wal_segment_size;
    // what is where: local files, store objects
    let mut segments: BTreeMap<(TimelineId, SegNo), Sources> = BTreeMap::new();
    let mut histories: BTreeMap<TimelineId, (Option<PathBuf>, bool)> = BTreeMap::new();
    for entry in std::fs::read_dir(opts.archive)
        .with_context(|| format!("list archive {}", opts.archive.display()))?
    {
        let entry = entry.with_context(|| format!("list archive {}", opts.archive.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        match WalFileName::parse(name, seg) {
            Ok(WalFileName::History { timeline }) => {
                histories.entry(timeline).or_default().0 = Some(entry.path());
            }
            _ => {
                if let Some(s) = ArchivedSegment::from_name(name, seg, 0) {
                    let e = segments.entry((s.timeline, s.segno)).or_default();
                    if e.local.as_ref().is_none_or(|(_, complete)| !complete) {
                        e.local = Some((entry.path(), s.complete));
                    }
                }
            }
        }
    }
    if let Some(store) = opts.store {
        for f in block_on(store.list(""))?? {
            match WalFileName::parse(&f.name, seg) {
                Ok(WalFileName::History { timeline }) => {
                    histories.entry(timeline).or_default().1 = true
                }
                Ok(WalFileName::Segment { timeline, segno }) => {
                    segments
                        .entry((timeline, segno))
                        .or_default()
                        .stored_complete = true
                }
                Ok(WalFileName::Partial { timeline, segno }) => {
                    segments
                        .entry((timeline, segno))
                        .or_default()
                        .stored_partial = true
                }
                _ => {}
            }
        }
    }
    if let Some(from) = opts.from {
        segments.retain(|(_, segno), _| *segno >= from);
    }
    let positions = read_positions(opts.archive);
    let mut timelines: BTreeMap<TimelineId, TimelineReport> = BTreeMap::new();
    let mut store_checked = 0usize;
    let total = segments.len();
    let mut progress = Progress::new(opts.progress, total);

    // history files: each timeline's parent and branch point
    let mut parents: BTreeMap<TimelineId, (TimelineId, Lsn)> = BTreeMap::new();
    let mut history_problems: Vec<Problem> = Vec::new();
    for (&timeline, (local, stored)) in &histories {
        let name = history_file_name(timeline);
        let mut content = None;
        if let Some(path) = local {
            match std::fs::read(path) {
                Ok(c) => content = Some(c),
                Err(e) => history_problems.push(Problem {
                    kind: ProblemKind::Unreadable,
                    timeline,
                    file: name.clone(),
                    lsn: None,
                    message: format!("cannot be read: {e}"),
                }),
            }
        }
        if let (Some(store), true) = (opts.store, *stored) {
            store_checked += 1;
            match block_on(store.get(&name)).and_then(|r| r) {
                Ok(Some(obj)) => match &content {
                    Some(c) if *c != obj => {
                        history_problems.push(store_differs(store, timeline, &name))
                    }
                    Some(_) => {}
                    None => content = Some(obj),
                },
                Ok(None) => {}
                Err(e) => history_problems.push(store_unreadable(timeline, &name, &e)),
            }
        }
        let Some(content) = content else { continue };
        match parse_history(&content).and_then(|h| h.last().copied()) {
            Some(last) if last.timeline < timeline => {
                parents.insert(timeline, (last.timeline, last.switchpoint));
            }
            _ => history_problems.push(Problem {
                kind: ProblemKind::History,
                timeline,
                file: name,
                lsn: None,
                message: "the history file does not parse as PostgreSQL's (parentTLI, switchpoint, reason \
                          per line, timelines ascending and below its own): recovery cannot follow this \
                          timeline"
                    .into(),
            }),
        }
    }

    // the WAL, one timeline after the other, each segment in order
    let mut by_timeline: BTreeMap<TimelineId, Vec<(SegNo, Sources)>> = BTreeMap::new();
    for ((timeline, segno), s) in segments {
        by_timeline.entry(timeline).or_default().push((segno, s));
    }
    for (&timeline, files) in &by_timeline {
        let Some(exp) = id.page_expectation(timeline) else {
            bail!(
                "the archive's PostgreSQL version ({}) is one walship does not know the WAL page magic of",
                id.pg_version_num
            );
        };
        let mut walk = TimelineWalk::new(exp);
        let mut extra = Vec::new();
        let mut valid_end = None;
        for (i, (segno, src)) in files.iter().enumerate() {
            let last = i + 1 == files.len();
            let complete_name = segment_file_name(timeline, *segno, seg);
            let partial_name = format!("{complete_name}.partial");
            let start = seg.segment_start(*segno);
            // the store's objects: downloaded, checked, compared with the local file
            let mut stored: Option<(Vec<u8>, bool)> = None;
            if let Some(store) = opts.store {
                for (name, complete, there) in [
                    (&complete_name, true, src.stored_complete),
                    (&partial_name, false, src.stored_partial),
                ] {
                    if !there {
                        continue;
                    }
                    store_checked += 1;
                    match block_on(store.get(name)).and_then(|r| r) {
                        Ok(Some(obj)) => {
                            if let Some(p) =
                                compare_with_local(store, timeline, name, &obj, complete, src)
                            {
                                extra.push(p);
                            }
                            if complete || stored.is_none() {
                                stored = Some((obj, complete));
                            }
                        }
                        Ok(None) => {}
                        Err(e) => extra.push(store_unreadable(timeline, name, &e)),
                    }
                }
            }
            // the bytes walked: the local file, else the store's
            match (&src.local, stored) {
                (Some((path, complete)), _) => {
                    let name = if *complete {
                        &complete_name
                    } else {
                        &partial_name
                    };
                    walk.begin_segment(*segno, name, *complete);
                    if let Err(e) = walk_file(&mut walk, path, name, start, seg.as_u64(), *complete)
                    {
                        extra.push(Problem {
                            kind: ProblemKind::Unreadable,
                            timeline,
                            file: name.clone(),
                            lsn: Some(start),
                            message: format!("{e:#}"),
                        });
                    }
                    if !*complete {
                        let floor = positions.map_or(0, |p| p.durable_in(seg, timeline, *segno));
                        if let Some(p) = check_partial(&id, timeline, *segno, path, floor) {
                            extra.push(p);
                        }
                    }
                }
                (None, Some((obj, complete))) => {
                    let name = if complete {
                        &complete_name
                    } else {
                        &partial_name
                    };
                    walk.begin_segment(*segno, name, complete);
                    if complete && obj.len() as u64 != seg.as_u64() {
                        extra.push(wrong_size(
                            timeline,
                            name,
                            start,
                            obj.len() as u64,
                            seg.as_u64(),
                        ));
                    }
                    walk.feed(start, &obj[..obj.len().min(seg.as_u64() as usize)]);
                }
                (None, None) => {}
            }
            if last {
                valid_end = walk.partial_end();
            }
            progress.step();
        }
        walk.finish();
        let mut problems = walk.problems;
        problems.extend(extra);
        timelines.insert(
            timeline,
            TimelineReport {
                timeline,
                parent: parents.get(&timeline).map(|p| p.0),
                branch_point: parents.get(&timeline).map(|p| p.1),
                segments: walk.segments,
                first_file: files
                    .first()
                    .map(|(s, _)| segment_file_name(timeline, *s, seg)),
                last_file: files.last().map(|(s, src)| {
                    let name = segment_file_name(timeline, *s, seg);
                    match &src.local {
                        Some((_, false)) => format!("{name}.partial"),
                        None if !src.stored_complete => format!("{name}.partial"),
                        _ => name,
                    }
                }),
                records: walk.records,
                valid_end,
                replayable: walk
                    .ranges
                    .iter()
                    .map(|&(from, to)| Range {
                        from,
                        to,
                        backup_from_timeline: timeline,
                        backup_from: from,
                    })
                    .collect(),
                problems,
            },
        );
    }
    progress.done();

    // timelines known from their history file only
    for (&timeline, &(parent, at)) in &parents {
        timelines.entry(timeline).or_insert_with(|| TimelineReport {
            timeline,
            parent: Some(parent),
            branch_point: Some(at),
            segments: 0,
            first_file: None,
            last_file: None,
            records: 0,
            valid_end: None,
            replayable: Vec::new(),
            problems: Vec::new(),
        });
    }
    for p in history_problems {
        if let Some(t) = timelines.get_mut(&p.timeline) {
            t.problems.push(p);
        } else {
            timelines.insert(
                p.timeline,
                TimelineReport {
                    timeline: p.timeline,
                    parent: None,
                    branch_point: None,
                    segments: 0,
                    first_file: None,
                    last_file: None,
                    records: 0,
                    valid_end: None,
                    replayable: Vec::new(),
                    problems: vec![p],
                },
            );
        }
    }
    follow_branches(&mut timelines, &histories, seg, opts.from.is_some());

    let problems = timelines.values().map(|t| t.problems.len()).sum();
    Ok(Report {
        archive: opts.archive.display().to_string(),
        object_store: opts.store.map(|s| s.url().to_owned()),
        system_identifier: id.system_identifier,
        wal_segment_size: seg.bytes(),
        pg_version_num: id.pg_version_num,
        timelines: timelines.into_values().collect(),
        store_objects_checked: store_checked,
        problems,
    })
}

/// Each timeline's branch point against its parent's WAL; a timeline's first range that continues its
/// parent's through the branch point is recoverable from where the parent's range starts.
fn follow_branches(
    timelines: &mut BTreeMap<TimelineId, TimelineReport>,
    histories: &BTreeMap<TimelineId, (Option<PathBuf>, bool)>,
    seg: walship_protocol::WalSegSize,
    partial_view: bool,
) {
    let ids: Vec<TimelineId> = timelines.keys().copied().collect();
    for t in ids {
        let (parent, at) = {
            let r = &timelines[&t];
            if r.timeline > 1 && r.segments > 0 && !histories.contains_key(&t) {
                let first = r.first_file.clone().unwrap_or_default();
                timelines.get_mut(&t).expect("listed").problems.push(Problem {
                    kind: ProblemKind::History,
                    timeline: t,
                    file: history_file_name(t),
                    lsn: None,
                    message: format!(
                        "missing: the archive holds WAL of timeline {t} (from {first}) but not the history \
                         file that says where it branched; recovery cannot follow it to this timeline"
                    ),
                });
                continue;
            }
            match (r.parent, r.branch_point) {
                (Some(p), Some(at)) => (p, at),
                _ => continue,
            }
        };
        let Some(parent_ranges) = timelines.get(&parent).map(|p| p.replayable.clone()) else {
            continue;
        };
        if parent_ranges.is_empty() {
            // the parent's WAL is not in the archive (removed by cleanup, or never shipped here)
            continue;
        }
        let child = &timelines[&t];
        let first = child.replayable.first().cloned();
        // recovery reads the parent's WAL up to the branch point's segment, then the child's copy of it
        let joined = parent_ranges.iter().find(|p| {
            p.from <= at
                && (p.to >= at
                    || first
                        .as_ref()
                        .is_some_and(|c| c.from <= at && at <= c.to && p.to >= c.from))
        });
        let child = timelines.get_mut(&t).expect("listed");
        match joined {
            Some(p) => {
                if let Some(c) = child.replayable.first_mut() {
                    if c.from <= at && at <= c.to {
                        c.backup_from_timeline = p.backup_from_timeline;
                        c.backup_from = p.backup_from;
                    }
                }
            }
            None if partial_view && parent_ranges.first().is_some_and(|p| p.from > at) => {}
            None => {
                let parent_end = parent_ranges.last().map(|p| p.to).unwrap_or_default();
                child.problems.push(Problem {
                    kind: ProblemKind::Branch,
                    timeline: t,
                    file: history_file_name(t),
                    lsn: Some(at),
                    message: format!(
                        "timeline {t} branches from timeline {parent} at {at}, but the archive's WAL of \
                         timeline {parent} {}: recovery cannot follow the history from timeline {parent} \
                         to {t}",
                        if at > parent_end {
                            format!("ends at {parent_end}")
                        } else {
                            format!(
                                "has no valid WAL there (segment {})",
                                segment_file_name(parent, seg.segno(at), seg)
                            )
                        }
                    ),
                });
            }
        }
    }
}

/// Walks a local segment file a chunk at a time.
fn walk_file(
    walk: &mut TimelineWalk,
    path: &Path,
    name: &str,
    start: Lsn,
    seg_size: u64,
    complete: bool,
) -> Result<()> {
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if complete && size != seg_size {
        let timeline = walk.timeline();
        walk.problems
            .push(wrong_size(timeline, name, start, size, seg_size));
    }
    let mut read = 0u64;
    while read < seg_size {
        let want = ((seg_size - read) as usize).min(CHUNK);
        let n = walk
            .feed_from(&mut file, want)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    Ok(())
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A partial holds at least the durable bytes the receiver acknowledged: their pages are there and valid.
fn check_partial(
    id: &Identity,
    timeline: TimelineId,
    segno: SegNo,
    path: &Path,
    floor: u64,
) -> Option<Problem> {
    if floor == 0 {
        return None;
    }
    let seg = id.wal_segment_size;
    let name = path.file_name()?.to_string_lossy().into_owned();
    let data = std::fs::read(path).ok()?;
    let exp = id.page_expectation(timeline)?;
    let start = seg.segment_start(segno);
    let pages = walship_protocol::walker::valid_prefix(exp, start, &data).pages as u64;
    let holds = pages.min(data.len() as u64);
    (holds < floor).then(|| Problem {
        kind: ProblemKind::TruncatedPartial,
        timeline,
        file: name,
        lsn: Some(Lsn(start.0 + holds)),
        message: format!(
            "holds valid WAL pages up to {} only, but the receiver acknowledged WAL up to {} as durable \
             (walship.position): acknowledged WAL is missing (the file was truncated or overwritten)",
            Lsn(start.0 + holds),
            Lsn(start.0 + floor)
        ),
    })
}

fn wrong_size(timeline: TimelineId, name: &str, start: Lsn, size: u64, seg_size: u64) -> Problem {
    Problem {
        kind: ProblemKind::WrongSize,
        timeline,
        file: name.to_owned(),
        lsn: Some(Lsn(start.0 + size.min(seg_size))),
        message: format!(
            "a complete segment of {size} bytes, where the cluster's segments have {seg_size}: recovery \
             refuses it"
        ),
    }
}

fn store_unreadable(timeline: TimelineId, name: &str, e: &anyhow::Error) -> Problem {
    Problem {
        kind: ProblemKind::StoreUnreadable,
        timeline,
        file: name.to_owned(),
        lsn: None,
        message: format!("the object store's copy cannot be used: {e:#}"),
    }
}

fn store_differs(store: &Store, timeline: TimelineId, name: &str) -> Problem {
    Problem {
        kind: ProblemKind::StoreDiffers,
        timeline,
        file: name.to_owned(),
        lsn: None,
        message: format!(
            "{}/{} differs from the local file: a restore from the store would hand recovery other WAL \
             than this archive holds",
            store.url(),
            Store::object_name(name)
        ),
    }
}

/// The store's object against the local file: a complete segment equal to the local complete one, a
/// partial equal to the start of the local file (the store holds the durable part uploaded last).
fn compare_with_local(
    store: &Store,
    timeline: TimelineId,
    name: &str,
    obj: &[u8],
    complete: bool,
    src: &Sources,
) -> Option<Problem> {
    let (path, local_complete) = src.local.as_ref()?;
    if complete && !local_complete {
        // the local partial is older than the store's complete segment (a standby restoring from both)
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let mut local = vec![0u8; obj.len()];
    let n = read_full(&mut file, &mut local).ok()?;
    let differs = if complete {
        n != obj.len() || file.read(&mut [0u8; 1]).ok()? != 0 || local != obj
    } else {
        // a partial object: zeros beyond the local file's end are what a preallocated partial holds
        local[..n] != obj[..n] || obj[n..].iter().any(|b| *b != 0)
    };
    differs.then(|| store_differs(store, timeline, name))
}

/// Progress on a terminal for long runs.
struct Progress {
    on: bool,
    total: usize,
    done: usize,
    last: Instant,
}

impl Progress {
    fn new(on: bool, total: usize) -> Progress {
        Progress {
            on: on && std::io::stderr().is_terminal(),
            total,
            done: 0,
            last: Instant::now(),
        }
    }

    fn step(&mut self) {
        self.done += 1;
        if self.on && self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            eprint!("\rverified {} of {} segments", self.done, self.total);
            let _ = std::io::stderr().flush();
        }
    }

    fn done(&self) {
        if self.on && self.total > 0 {
            eprintln!("\rverified {} of {} segments", self.done, self.total);
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "archive {} (system identifier {}, PostgreSQL {}, {} MB segments){}",
            self.archive,
            self.system_identifier,
            crate::archive::pg_major(self.pg_version_num),
            self.wal_segment_size >> 20,
            match &self.object_store {
                Some(s) => format!(
                    ", object store {s} ({} objects checked)",
                    self.store_objects_checked
                ),
                None => String::new(),
            }
        )?;
        for t in &self.timelines {
            write!(f, "timeline {}:", t.timeline)?;
            if let (Some(p), Some(at)) = (t.parent, t.branch_point) {
                write!(f, " branches from timeline {p} at {at};")?;
            }
            match (&t.first_file, &t.last_file) {
                (Some(a), Some(b)) => writeln!(
                    f,
                    " {} segment files, {a} to {b}, {} records{}",
                    t.segments,
                    t.records,
                    t.valid_end
                        .map(|e| format!(", valid WAL ends at {e}"))
                        .unwrap_or_default()
                )?,
                _ => writeln!(f, " no WAL in the archive")?,
            }
            for r in &t.replayable {
                if r.backup_from_timeline == t.timeline {
                    writeln!(
                        f,
                        "  replayable {} to {}: a base backup taken at or after {} recovers to any point up to {}",
                        r.from, r.to, r.backup_from, r.to
                    )?;
                } else {
                    writeln!(
                        f,
                        "  replayable {} to {}: a base backup taken at or after {} on timeline {} recovers through the branch to any point up to {} on timeline {}",
                        r.from, r.to, r.backup_from, r.backup_from_timeline, r.to, t.timeline
                    )?;
                }
            }
            for p in &t.problems {
                match p.lsn {
                    Some(lsn) => writeln!(f, "  PROBLEM {} at {lsn}: {}", p.file, p.message)?,
                    None => writeln!(f, "  PROBLEM {}: {}", p.file, p.message)?,
                }
            }
        }
        let records: u64 = self.timelines.iter().map(|t| t.records).sum();
        let segments: usize = self.timelines.iter().map(|t| t.segments).sum();
        if self.problems == 0 {
            writeln!(
                f,
                "OK: {records} records in {segments} segment files verified, no problem"
            )
        } else {
            writeln!(
                f,
                "CRITICAL: {} problem{} ({records} records in {segments} segment files read)",
                self.problems,
                if self.problems == 1 { "" } else { "s" }
            )
        }
    }
}

#[cfg(test)]
mod tests;
