//! Typed errors of the protocol crate. Each variant carries the numbers that explain it.

use crate::lsn::Lsn;

/// Text that is not an `X/X` WAL position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a WAL position (expected X/X in hex, like 0/16B3748)")]
pub struct LsnParseError(pub String);

/// Why a frame or message was rejected. Any of these ends the connection it arrived on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced payload is larger than this side accepts; nothing was buffered.
    #[error(
        "frame of kind {kind:#04x} announces {len} payload bytes, more than the limit of {max}"
    )]
    FrameTooLarge { kind: u8, len: u32, max: u32 },
    /// The CRC at the end of the frame does not match its content.
    #[error("frame of kind {kind:#04x} has CRC {actual:#010x}, expected {expected:#010x}: the stream is corrupt")]
    ChecksumMismatch {
        kind: u8,
        expected: u32,
        actual: u32,
    },
    /// A tag this side does not know (or one that belongs to the other direction).
    #[error("unknown message kind {kind:#04x}")]
    UnknownKind { kind: u8 },
    /// The connection ended in the middle of a frame.
    #[error("connection ended inside a frame: {have} bytes of a frame that needs {need}")]
    TruncatedFrame { need: usize, have: usize },
    /// A message body is shorter than its fields.
    #[error("{message} message is truncated: field {field} needs {need} more bytes, {have} left")]
    Truncated {
        message: &'static str,
        field: &'static str,
        need: usize,
        have: usize,
    },
    /// A message body has bytes after its last field.
    #[error("{message} message has {extra} trailing bytes")]
    TrailingBytes { message: &'static str, extra: usize },
    /// A string field is not UTF-8.
    #[error("{message} message: field {field} is not valid UTF-8")]
    InvalidString {
        message: &'static str,
        field: &'static str,
    },
    /// A string or list is longer than the protocol allows.
    #[error("{message} message: field {field} has {len} entries, more than {max}")]
    TooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A WAL range that runs past the end of the WAL address space, or is empty.
    #[error("{message} message: absurd WAL range of {len} bytes starting at {start}")]
    AbsurdLsnRange {
        message: &'static str,
        start: Lsn,
        len: u64,
    },
    /// Timeline 0 does not exist; timeline 1 has no history file.
    #[error("{message} message: invalid timeline {timeline}")]
    InvalidTimeline {
        message: &'static str,
        timeline: u32,
    },
    /// An unknown refusal code.
    #[error("Refuse message: unknown code {code}")]
    UnknownRefuseCode { code: u8 },
    /// A `SyncState` this side does not know.
    #[error("SyncState message: unknown state {code}")]
    UnknownSyncState { code: u8 },
    /// A `Welcome` names a compression this side does not know.
    #[error("Welcome message: unknown compression {code}")]
    UnknownCompression { code: u8 },
    /// Compressed WAL that does not decompress to what it announced.
    #[error("WalZstd message at {start}: {reason}")]
    Decompress { start: Lsn, reason: String },
    /// An I/O error from the transport.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a name is not a WAL file name walship may touch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WalNameError {
    #[error("{name:?} is not a WAL file name (expected 24 upper-case hex digits, optionally with .partial, or TTTTTTTT.history)")]
    NotAWalFileName { name: String },
    #[error("{name:?}: segment part {low:#X} does not exist with {seg_size}-byte segments (at most {max:#X})")]
    SegmentOutOfRange {
        name: String,
        low: u32,
        max: u32,
        seg_size: u32,
    },
    #[error("{name:?}: timeline 0 does not exist")]
    TimelineZero { name: String },
}

/// An invalid WAL segment size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} bytes is not a valid WAL segment size (a power of two from 1 MB to 1 GB)")]
pub struct SegSizeError(pub u64);

/// Why a WAL page is not the page walship expected at a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PageError {
    #[error("page at {lsn} is shorter than its header ({len} bytes)")]
    Short { lsn: Lsn, len: usize },
    #[error("page at {lsn} has magic {found:#06X}, expected {expected:#06X} (wrong PostgreSQL version, or not WAL)")]
    BadMagic { lsn: Lsn, found: u16, expected: u16 },
    #[error("page at {lsn} has invalid info bits {info:#06X}")]
    BadInfo { lsn: Lsn, info: u16 },
    #[error("page at {lsn} claims address {found}: an old (recycled) or foreign page")]
    UnexpectedPageAddr { lsn: Lsn, found: Lsn },
    #[error("page at {lsn} has timeline {found}, outside 1..={max}")]
    BadTimeline { lsn: Lsn, found: u32, max: u32 },
    #[error("first page of the segment at {lsn} lacks the long header")]
    MissingLongHeader { lsn: Lsn },
    #[error("segment at {lsn} belongs to system {found}, expected {expected}")]
    ForeignSystem { lsn: Lsn, found: u64, expected: u64 },
    #[error("segment at {lsn} says segment size {found}, expected {expected}")]
    SegSizeMismatch { lsn: Lsn, found: u32, expected: u32 },
    #[error("page at {lsn} holds data after the zero-filled tail of a switched segment: a recycled or damaged file")]
    DataAfterSwitchTail { lsn: Lsn },
    #[error("segment at {lsn} says WAL block size {found}, walship supports 8192")]
    BlockSize { lsn: Lsn, found: u32 },
}
