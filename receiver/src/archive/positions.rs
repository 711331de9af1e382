//! `walship.position`: where the archive's durable and confirmed WAL end, as last recorded (not fsynced:
//! what decides a resume point never falls below what the files prove, see `Archive::open`).

use super::*;

/// The durable-position file's name.
pub const POSITION_FILE: &str = "walship.position";

/// Reads `walship.position`: the timeline and durable end last made durable by the running receiver.
pub fn read_position(dir: &Path) -> Option<(TimelineId, Lsn)> {
    read_positions(dir).map(|p| (p.timeline, p.durable))
}

/// What `walship.position` says (rewritten in place after every group commit; not fsynced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Positions {
    pub timeline: TimelineId,
    /// Where the durable (fsynced) WAL of `timeline` ends.
    pub durable: Lsn,
    /// How much of it is confirmed: the primary had flushed it. Bytes between the two are provisional.
    /// Files written before walship knew provisional WAL hold no such field: all was confirmed.
    pub confirmed: Lsn,
}

impl Positions {
    /// How many bytes of segment `segno` of `timeline` this record counts as durable (0 when it speaks of
    /// another segment or timeline).
    pub(crate) fn durable_in(&self, seg: WalSegSize, timeline: TimelineId, segno: SegNo) -> u64 {
        if self.timeline == timeline && seg.segno(self.durable) == segno {
            seg.offset(self.durable)
        } else {
            0
        }
    }

    pub(crate) fn render(&self) -> String {
        format!(
            "{:08X} {:016X} {:016X}\n",
            self.timeline, self.durable.0, self.confirmed.0
        )
    }
}

/// Reads `walship.position` (see [`Positions`]).
pub fn read_positions(dir: &Path) -> Option<Positions> {
    let mut buf = [0u8; 64];
    let n = File::open(dir.join(POSITION_FILE))
        .ok()?
        .read_at(&mut buf, 0)
        .ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let mut fields = text.lines().next()?.split(' ');
    let timeline = u32::from_str_radix(fields.next()?, 16).ok()?;
    let durable = Lsn(u64::from_str_radix(fields.next()?, 16).ok()?);
    let confirmed = match fields.next() {
        Some(c) => Lsn(u64::from_str_radix(c, 16).ok()?).min(durable),
        None => durable,
    };
    Some(Positions {
        timeline,
        durable,
        confirmed,
    })
}
