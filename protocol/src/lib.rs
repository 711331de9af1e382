//! walship's shared vocabulary: WAL positions, timelines, segment and history file names, WAL page headers,
//! and the wire format spoken between `walship-sender` and `walship-receiver`.
//!
//! This crate knows bytes, never sockets, files or clocks, so everything here is tested deterministically.
//!
//! | module      | what it holds |
//! |-------------|---------------|
//! | [`lsn`]     | [`Lsn`], the 64-bit WAL position printed as `X/X` |
//! | [`wal`]     | segment sizes, segment/history file names (strictly validated), page-header parsing and checks |
//! | [`walker`]  | the WAL record walker (`xlogreader.c`'s checks: page headers, continuation, `xl_prev`, CRC-32C) |
//! | [`message`] | the messages of both directions and their body encoding |
//! | [`codec`]   | the frame codec (tokio-util `Decoder`/`Encoder`) with CRC and a size limit |
//! | [`error`]   | typed errors |
//!
//! # Wire format
//!
//! Every message travels in one frame; all integers are big-endian:
//!
//! | field   | size | meaning |
//! |---------|------|---------|
//! | kind    | 1    | message tag (sender tags are upper case, receiver tags lower case) |
//! | len     | 4    | payload length, checked against the limit before anything is buffered |
//! | payload | len  | message body |
//! | crc     | 4    | CRC-32 (IEEE, `crc32fast`) over kind, len and payload |
//!
//! | dir | tag | message | body |
//! |-----|-----|---------|------|
//! | S→R | `H` | `Hello` | version_min u16, version_max u16, system_identifier u64, timeline u32, wal_segment_size u32, pg_version_num u32, sender_name str |
//! | S→R | `W` | `Wal` | timeline u32, start_lsn u64, bytes… (rest of the payload) |
//! | S→R | `Z` | `WalZstd` (version 4) | timeline u32, start_lsn u64, raw_len u32, zstd frame… (rest of the payload) |
//! | S→R | `T` | `History` | timeline u32, file content… |
//! | S→R | `K` | `Keepalive` | primary_flush_lsn u64, timeline u32, sent_at_unix_micros u64 (version 3: confirms WAL up to primary_flush_lsn) |
//! | S→R | `D` | `PrimaryDown` (version 2) | timeline u32, wal_end u64, down_since_unix_micros u64 |
//! | S→R | `S` | `SyncState` (version 5) | timeline u32, state u8 (0 async, 1 sync, 2 quorum: the primary's `sync_state` of the sender) |
//! | R→S | `w` | `Welcome` | protocol_version u16, count u16, count × (timeline u32, end_lsn u64), compression u8 (version 4: 0 none, 1 zstd) |
//! | R→S | `r` | `Refuse` | code u8, reason str |
//! | R→S | `a` | `Ack` | timeline u32, durable_lsn u64, confirmed_lsn u64 (version 3) |
//! | R→S | `e` | `Error` | reason str |
//!
//! `str` is a u16 length followed by that many bytes of UTF-8.
//!
//! Version 3 (ship on write, confirm on flush): the sender may send complete, CRC-valid records the primary
//! has written but not yet flushed; its `Keepalive`s confirm WAL up to the primary's flush position. The
//! receiver's `Welcome` resumes at the confirmed end, so a reconnecting sender resends the provisional tail
//! and the receiver compares it (replacing it where the primary's WAL now differs, refusing where a
//! confirmed byte would change).
//!
//! Each version's features are named in [`Features`], which both daemons ask.
//!
//! Version 4 (compression on the wire): the receiver's `Welcome` says whether the sender may send WAL as
//! `WalZstd` (each message one zstd frame of at most one `Wal`'s bytes; the receiver decompresses into at
//! most the frame limit, so memory stays bounded). A sender or receiver configured without compression sends
//! or allows only `Wal`.
//!
//! Version 5 (synchronous standby): a sender running `--synchronous` tells the receiver how the primary counts
//! it (`SyncState`), so that `promote` can say whether every commit the primary acknowledged is in the archive.
#![forbid(unsafe_code)]

pub mod codec;
pub mod error;
pub mod features;
pub mod lsn;
pub mod message;
pub mod wal;
pub mod walker;

pub use codec::{frame_buffered, Frame, FrameCodec, MessageCodec, DEFAULT_MAX_PAYLOAD};
pub use error::{FrameError, PageError, WalNameError};
pub use features::Features;
pub use lsn::Lsn;
pub use message::{
    CompressedWal, Compression, ReceiverMessage, RefuseCode, SenderMessage, SyncState,
};
pub use wal::{TimelineId, WalSegSize};

/// The protocol versions this build speaks. The sender offers a range in `Hello`, the receiver picks the
/// highest common one and names it in `Welcome`.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// See [`PROTOCOL_VERSION_MIN`].
pub const PROTOCOL_VERSION_MAX: u16 = 5;
