//! The messages of both directions and their body encoding (see the table in the crate docs).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::FrameError;
use crate::lsn::Lsn;
use crate::wal::TimelineId;

/// Message tags, sender → receiver.
pub mod tag {
    pub const HELLO: u8 = b'H';
    pub const WAL: u8 = b'W';
    pub const HISTORY: u8 = b'T';
    pub const KEEPALIVE: u8 = b'K';
    /// Protocol version 2.
    pub const PRIMARY_DOWN: u8 = b'D';
    /// Version 5.
    pub const SYNC_STATE: u8 = b'S';
    /// Protocol version 4: zstd-compressed WAL.
    pub const WAL_ZSTD: u8 = b'Z';
    /// Receiver → sender.
    pub const WELCOME: u8 = b'w';
    pub const REFUSE: u8 = b'r';
    pub const ACK: u8 = b'a';
    pub const ERROR: u8 = b'e';
}

/// Longest string field (sender name, reasons).
pub const MAX_STRING: usize = 4096;
/// Most timelines a `Welcome` may list.
pub const MAX_RESUME_ENTRIES: usize = 4096;

/// The first message of a session, sender → receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    pub system_identifier: u64,
    pub timeline: TimelineId,
    pub wal_segment_size: u32,
    pub pg_version_num: u32,
    pub sender_name: String,
}

/// Contiguous WAL bytes `[start_lsn, start_lsn + bytes.len())` of `timeline`. Never empty, never past the
/// end of the address space (checked when decoding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wal {
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub bytes: Bytes,
}

impl Wal {
    /// The position right after the last byte.
    pub fn end_lsn(&self) -> Lsn {
        Lsn(self.start_lsn.0 + self.bytes.len() as u64)
    }
}

/// How WAL travels in a session (protocol 4: the receiver says in `Welcome`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    /// Only `Wal` messages.
    #[default]
    None = 0,
    /// `WalZstd` messages too (each compressed on its own: no state spans messages).
    Zstd = 1,
}

/// [`Wal`] compressed with zstd (one frame): `raw_len` bytes once decompressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressedWal {
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub raw_len: u32,
    pub data: Bytes,
}

impl Wal {
    /// This WAL compressed at zstd `level`, when that makes it smaller.
    pub fn compress(&self, level: i32) -> Option<CompressedWal> {
        self.compress_with(&mut zstd::bulk::Compressor::new(level).ok()?)
    }

    /// [`Wal::compress`] with a compressor kept across messages: creating a zstd context costs more than
    /// compressing a small message with one (profiled: a context per message was a tenth of the sender's
    /// and the receiver's CPU while streaming).
    pub fn compress_with(
        &self,
        compressor: &mut zstd::bulk::Compressor<'_>,
    ) -> Option<CompressedWal> {
        let data = compressor.compress(&self.bytes).ok()?;
        (data.len() < self.bytes.len()).then(|| CompressedWal {
            timeline: self.timeline,
            start_lsn: self.start_lsn,
            raw_len: self.bytes.len() as u32,
            data: data.into(),
        })
    }
}

impl CompressedWal {
    /// The WAL, decompressed into exactly `raw_len` bytes (at most `max`: memory stays bounded whatever
    /// the frame claims).
    pub fn decompress(&self, max: usize) -> Result<Wal, FrameError> {
        let mut decompressor =
            zstd::bulk::Decompressor::new().map_err(|e| FrameError::Decompress {
                start: self.start_lsn,
                reason: e.to_string(),
            })?;
        self.decompress_with(&mut decompressor, max)
    }

    /// [`CompressedWal::decompress`] with a decompressor kept across messages.
    pub fn decompress_with(
        &self,
        decompressor: &mut zstd::bulk::Decompressor<'_>,
        max: usize,
    ) -> Result<Wal, FrameError> {
        let raw_len = self.raw_len as usize;
        if raw_len == 0 || raw_len > max {
            return Err(FrameError::TooLong {
                message: "WalZstd",
                field: "raw_len",
                len: raw_len,
                max,
            });
        }
        let bytes =
            decompressor
                .decompress(&self.data, raw_len)
                .map_err(|e| FrameError::Decompress {
                    start: self.start_lsn,
                    reason: e.to_string(),
                })?;
        if bytes.len() != raw_len {
            return Err(FrameError::Decompress {
                start: self.start_lsn,
                reason: format!("{} bytes instead of the {raw_len} announced", bytes.len()),
            });
        }
        Ok(Wal {
            timeline: self.timeline,
            start_lsn: self.start_lsn,
            bytes: bytes.into(),
        })
    }
}

/// Sender → receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderMessage {
    Hello(Hello),
    Wal(Wal),
    /// Protocol 4, when the receiver's `Welcome` allows it: WAL compressed with zstd.
    WalZstd(CompressedWal),
    /// The content of `<timeline>.history` (timeline ≥ 2).
    History {
        timeline: TimelineId,
        content: Bytes,
    },
    /// Carries the primary's flush position. Up to protocol 2 the sender sends only flushed WAL and this is
    /// for lag reporting. From protocol 3 the sender also sends WAL the primary has written but not yet
    /// flushed (complete, CRC-valid records): this message then *confirms* WAL up to `primary_flush_lsn`,
    /// and is sent whenever that position moves. Unconfirmed bytes are provisional: the receiver may
    /// replace them with differing ones (a primary whose OS lost unflushed WAL), never confirmed ones.
    Keepalive {
        primary_flush_lsn: Lsn,
        timeline: TimelineId,
        sent_at_unix_micros: u64,
    },
    /// Protocol version 2: the primary's server is down (its host is up) and the sender has sent every
    /// complete, valid record still in `pg_wal/`: the primary's WAL of `timeline` ends at `wal_end`.
    PrimaryDown {
        timeline: TimelineId,
        wal_end: Lsn,
        down_since_unix_micros: u64,
    },
    /// Protocol version 5: how the primary counts the sender (`--synchronous`) in `synchronous_standby_names`,
    /// as its `pg_stat_replication` row last showed it; sent when it changes.
    SyncState {
        timeline: TimelineId,
        state: SyncState,
    },
}

/// The primary's `sync_state` of the sender's replication connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum SyncState {
    /// Not a synchronous standby (`async`, `potential`, or no row): commits do not wait for walship.
    Async = 0,
    /// The synchronous standby (`sync`): every commit the primary acknowledges waited for walship's archive.
    Sync = 1,
    /// One of a quorum (`ANY n (...)`): an acknowledged commit is in walship's archive or on another of them.
    Quorum = 2,
}

impl SyncState {
    fn from_u8(code: u8) -> Result<Self, FrameError> {
        Ok(match code {
            0 => SyncState::Async,
            1 => SyncState::Sync,
            2 => SyncState::Quorum,
            code => return Err(FrameError::UnknownSyncState { code }),
        })
    }

    /// From `pg_stat_replication.sync_state`.
    pub fn from_pg(text: &str) -> SyncState {
        match text {
            "sync" => SyncState::Sync,
            "quorum" => SyncState::Quorum,
            _ => SyncState::Async,
        }
    }
}

/// Why a receiver refused a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseCode {
    /// The archive belongs to another cluster (system identifier).
    ForeignCluster = 1,
    /// The archive was pinned with another WAL segment size.
    SegmentSizeMismatch = 2,
    /// No common protocol version.
    UnsupportedVersion = 3,
    /// Another session holds the archive and could not be taken over in time.
    Busy = 4,
    /// The archive already holds a newer timeline: this primary has been superseded by a failover.
    TimelineBehind = 5,
    /// Anything else; the reason says what.
    Other = 255,
}

impl RefuseCode {
    fn from_u8(code: u8) -> Result<Self, FrameError> {
        Ok(match code {
            1 => RefuseCode::ForeignCluster,
            2 => RefuseCode::SegmentSizeMismatch,
            3 => RefuseCode::UnsupportedVersion,
            4 => RefuseCode::Busy,
            5 => RefuseCode::TimelineBehind,
            255 => RefuseCode::Other,
            code => return Err(FrameError::UnknownRefuseCode { code }),
        })
    }

    /// Whether retrying later can help (true only for `Busy`).
    pub fn is_transient(self) -> bool {
        self == RefuseCode::Busy
    }
}

/// Receiver → sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiverMessage {
    /// Session accepted: the chosen protocol version and, per timeline in the archive, where its durable WAL
    /// ends. The sender resumes from there.
    Welcome {
        protocol_version: u16,
        resume: Vec<(TimelineId, Lsn)>,
        /// Protocol 4: whether the sender may send `WalZstd` (absent before 4: none).
        compression: Compression,
    },
    Refuse {
        code: RefuseCode,
        reason: String,
    },
    /// Everything of `timeline` before `durable_lsn` that this session sent is fsynced in the archive.
    /// Protocol 3 adds `confirmed_lsn`: how much of it the archive counts as confirmed (the primary had
    /// flushed it, as the sender's Keepalives said); bytes beyond it are provisional.
    Ack {
        timeline: TimelineId,
        durable_lsn: Lsn,
        confirmed_lsn: Option<Lsn>,
    },
    /// The receiver is closing the session for this reason.
    Error {
        reason: String,
    },
}

/// A body reader that never panics: every read is measured first.
struct Body {
    message: &'static str,
    buf: Bytes,
}

impl Body {
    fn need(&self, field: &'static str, n: usize) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            return Err(FrameError::Truncated {
                message: self.message,
                field,
                need: n,
                have: self.buf.remaining(),
            });
        }
        Ok(())
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        self.need(field, 1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.need(field, 2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.need(field, 4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.need(field, 8)?;
        Ok(self.buf.get_u64())
    }
    fn string(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = self.u16(field)? as usize;
        if len > MAX_STRING {
            return Err(FrameError::TooLong {
                message: self.message,
                field,
                len,
                max: MAX_STRING,
            });
        }
        self.need(field, len)?;
        let raw = self.buf.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| FrameError::InvalidString {
            message: self.message,
            field,
        })
    }
    fn timeline(&mut self, min: u32) -> Result<TimelineId, FrameError> {
        let timeline = self.u32("timeline")?;
        if timeline < min {
            return Err(FrameError::InvalidTimeline {
                message: self.message,
                timeline,
            });
        }
        Ok(timeline)
    }
    fn rest(&mut self) -> Bytes {
        self.buf.split_to(self.buf.remaining())
    }
    fn finish(self) -> Result<(), FrameError> {
        if self.buf.has_remaining() {
            return Err(FrameError::TrailingBytes {
                message: self.message,
                extra: self.buf.remaining(),
            });
        }
        Ok(())
    }
}

fn put_string(dst: &mut BytesMut, s: &str) {
    // Longer strings are cut at a character boundary rather than refused: they are only ever names and
    // human-readable reasons.
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u16(end as u16);
    dst.put_slice(&s.as_bytes()[..end]);
}

/// A message that can be written into a frame.
pub trait Encode {
    /// The frame tag.
    fn kind(&self) -> u8;
    /// An upper bound of the body size, for reserving.
    fn size_hint(&self) -> usize;
    /// Appends the body.
    fn encode_body(&self, dst: &mut BytesMut);
}

/// A message that can be read from a frame.
pub trait Decode: Sized {
    fn decode(kind: u8, payload: Bytes) -> Result<Self, FrameError>;
}

impl Encode for SenderMessage {
    fn kind(&self) -> u8 {
        match self {
            SenderMessage::Hello(_) => tag::HELLO,
            SenderMessage::Wal(_) => tag::WAL,
            SenderMessage::WalZstd(_) => tag::WAL_ZSTD,
            SenderMessage::History { .. } => tag::HISTORY,
            SenderMessage::Keepalive { .. } => tag::KEEPALIVE,
            SenderMessage::PrimaryDown { .. } => tag::PRIMARY_DOWN,
            SenderMessage::SyncState { .. } => tag::SYNC_STATE,
        }
    }

    fn size_hint(&self) -> usize {
        match self {
            SenderMessage::Hello(h) => 32 + h.sender_name.len(),
            SenderMessage::Wal(w) => 12 + w.bytes.len(),
            SenderMessage::WalZstd(z) => 16 + z.data.len(),
            SenderMessage::History { content, .. } => 4 + content.len(),
            SenderMessage::Keepalive { .. } => 20,
            SenderMessage::PrimaryDown { .. } => 20,
            SenderMessage::SyncState { .. } => 5,
        }
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            SenderMessage::Hello(h) => {
                dst.put_u16(h.version_min);
                dst.put_u16(h.version_max);
                dst.put_u64(h.system_identifier);
                dst.put_u32(h.timeline);
                dst.put_u32(h.wal_segment_size);
                dst.put_u32(h.pg_version_num);
                put_string(dst, &h.sender_name);
            }
            SenderMessage::Wal(w) => {
                dst.put_u32(w.timeline);
                dst.put_u64(w.start_lsn.0);
                dst.put_slice(&w.bytes);
            }
            SenderMessage::WalZstd(z) => {
                dst.put_u32(z.timeline);
                dst.put_u64(z.start_lsn.0);
                dst.put_u32(z.raw_len);
                dst.put_slice(&z.data);
            }
            SenderMessage::History { timeline, content } => {
                dst.put_u32(*timeline);
                dst.put_slice(content);
            }
            SenderMessage::Keepalive {
                primary_flush_lsn,
                timeline,
                sent_at_unix_micros,
            } => {
                dst.put_u64(primary_flush_lsn.0);
                dst.put_u32(*timeline);
                dst.put_u64(*sent_at_unix_micros);
            }
            SenderMessage::PrimaryDown {
                timeline,
                wal_end,
                down_since_unix_micros,
            } => {
                dst.put_u32(*timeline);
                dst.put_u64(wal_end.0);
                dst.put_u64(*down_since_unix_micros);
            }
            SenderMessage::SyncState { timeline, state } => {
                dst.put_u32(*timeline);
                dst.put_u8(*state as u8);
            }
        }
    }
}

impl Decode for SenderMessage {
    fn decode(kind: u8, payload: Bytes) -> Result<Self, FrameError> {
        let msg = match kind {
            tag::HELLO => {
                let mut b = Body {
                    message: "Hello",
                    buf: payload,
                };
                let h = Hello {
                    version_min: b.u16("version_min")?,
                    version_max: b.u16("version_max")?,
                    system_identifier: b.u64("system_identifier")?,
                    timeline: b.timeline(1)?,
                    wal_segment_size: b.u32("wal_segment_size")?,
                    pg_version_num: b.u32("pg_version_num")?,
                    sender_name: b.string("sender_name")?,
                };
                b.finish()?;
                SenderMessage::Hello(h)
            }
            tag::WAL => {
                let mut b = Body {
                    message: "Wal",
                    buf: payload,
                };
                let timeline = b.timeline(1)?;
                let start_lsn = Lsn(b.u64("start_lsn")?);
                let bytes = b.rest();
                let len = bytes.len() as u64;
                if len == 0 || start_lsn.checked_add(len).is_none() {
                    return Err(FrameError::AbsurdLsnRange {
                        message: "Wal",
                        start: start_lsn,
                        len,
                    });
                }
                SenderMessage::Wal(Wal {
                    timeline,
                    start_lsn,
                    bytes,
                })
            }
            tag::WAL_ZSTD => {
                let mut b = Body {
                    message: "WalZstd",
                    buf: payload,
                };
                let timeline = b.timeline(1)?;
                let start_lsn = Lsn(b.u64("start_lsn")?);
                let raw_len = b.u32("raw_len")?;
                if raw_len == 0 || start_lsn.checked_add(u64::from(raw_len)).is_none() {
                    return Err(FrameError::AbsurdLsnRange {
                        message: "WalZstd",
                        start: start_lsn,
                        len: u64::from(raw_len),
                    });
                }
                SenderMessage::WalZstd(CompressedWal {
                    timeline,
                    start_lsn,
                    raw_len,
                    data: b.rest(),
                })
            }
            tag::HISTORY => {
                let mut b = Body {
                    message: "History",
                    buf: payload,
                };
                let timeline = b.timeline(2)?;
                SenderMessage::History {
                    timeline,
                    content: b.rest(),
                }
            }
            tag::KEEPALIVE => {
                let mut b = Body {
                    message: "Keepalive",
                    buf: payload,
                };
                let m = SenderMessage::Keepalive {
                    primary_flush_lsn: Lsn(b.u64("primary_flush_lsn")?),
                    timeline: b.timeline(1)?,
                    sent_at_unix_micros: b.u64("sent_at_unix_micros")?,
                };
                b.finish()?;
                m
            }
            tag::PRIMARY_DOWN => {
                let mut b = Body {
                    message: "PrimaryDown",
                    buf: payload,
                };
                let m = SenderMessage::PrimaryDown {
                    timeline: b.timeline(1)?,
                    wal_end: Lsn(b.u64("wal_end")?),
                    down_since_unix_micros: b.u64("down_since_unix_micros")?,
                };
                b.finish()?;
                m
            }
            tag::SYNC_STATE => {
                let mut b = Body {
                    message: "SyncState",
                    buf: payload,
                };
                let m = SenderMessage::SyncState {
                    timeline: b.timeline(1)?,
                    state: SyncState::from_u8(b.u8("state")?)?,
                };
                b.finish()?;
                m
            }
            kind => return Err(FrameError::UnknownKind { kind }),
        };
        Ok(msg)
    }
}

impl Encode for ReceiverMessage {
    fn kind(&self) -> u8 {
        match self {
            ReceiverMessage::Welcome { .. } => tag::WELCOME,
            ReceiverMessage::Refuse { .. } => tag::REFUSE,
            ReceiverMessage::Ack { .. } => tag::ACK,
            ReceiverMessage::Error { .. } => tag::ERROR,
        }
    }

    fn size_hint(&self) -> usize {
        match self {
            ReceiverMessage::Welcome { resume, .. } => 5 + 12 * resume.len(),
            ReceiverMessage::Refuse { reason, .. } | ReceiverMessage::Error { reason } => {
                3 + reason.len()
            }
            ReceiverMessage::Ack { .. } => 20,
        }
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            ReceiverMessage::Welcome {
                protocol_version,
                resume,
                compression,
            } => {
                dst.put_u16(*protocol_version);
                let n = resume.len().min(MAX_RESUME_ENTRIES);
                dst.put_u16(n as u16);
                for (timeline, lsn) in &resume[resume.len() - n..] {
                    dst.put_u32(*timeline);
                    dst.put_u64(lsn.0);
                }
                if crate::Features::of(*protocol_version).wire_compression() {
                    dst.put_u8(*compression as u8);
                }
            }
            ReceiverMessage::Refuse { code, reason } => {
                dst.put_u8(*code as u8);
                put_string(dst, reason);
            }
            ReceiverMessage::Ack {
                timeline,
                durable_lsn,
                confirmed_lsn,
            } => {
                dst.put_u32(*timeline);
                dst.put_u64(durable_lsn.0);
                if let Some(c) = confirmed_lsn {
                    dst.put_u64(c.0);
                }
            }
            ReceiverMessage::Error { reason } => put_string(dst, reason),
        }
    }
}

impl Decode for ReceiverMessage {
    fn decode(kind: u8, payload: Bytes) -> Result<Self, FrameError> {
        let msg = match kind {
            tag::WELCOME => {
                let mut b = Body {
                    message: "Welcome",
                    buf: payload,
                };
                let protocol_version = b.u16("protocol_version")?;
                let n = b.u16("count")? as usize;
                if n > MAX_RESUME_ENTRIES {
                    return Err(FrameError::TooLong {
                        message: "Welcome",
                        field: "resume",
                        len: n,
                        max: MAX_RESUME_ENTRIES,
                    });
                }
                b.need("resume", n * 12)?;
                let mut resume = Vec::with_capacity(n);
                for _ in 0..n {
                    resume.push((b.timeline(1)?, Lsn(b.u64("resume lsn")?)));
                }
                let compression = if crate::Features::of(protocol_version).wire_compression() {
                    match b.u8("compression")? {
                        0 => Compression::None,
                        1 => Compression::Zstd,
                        other => {
                            return Err(FrameError::UnknownCompression { code: other });
                        }
                    }
                } else {
                    Compression::None
                };
                b.finish()?;
                ReceiverMessage::Welcome {
                    protocol_version,
                    resume,
                    compression,
                }
            }
            tag::REFUSE => {
                let mut b = Body {
                    message: "Refuse",
                    buf: payload,
                };
                let code = RefuseCode::from_u8(b.u8("code")?)?;
                let reason = b.string("reason")?;
                b.finish()?;
                ReceiverMessage::Refuse { code, reason }
            }
            tag::ACK => {
                let mut b = Body {
                    message: "Ack",
                    buf: payload,
                };
                let timeline = b.timeline(1)?;
                let durable_lsn = Lsn(b.u64("durable_lsn")?);
                let confirmed_lsn = if b.buf.has_remaining() {
                    Some(Lsn(b.u64("confirmed_lsn")?))
                } else {
                    None
                };
                let m = ReceiverMessage::Ack {
                    timeline,
                    durable_lsn,
                    confirmed_lsn,
                };
                b.finish()?;
                m
            }
            tag::ERROR => {
                let mut b = Body {
                    message: "Error",
                    buf: payload,
                };
                let reason = b.string("reason")?;
                b.finish()?;
                ReceiverMessage::Error { reason }
            }
            kind => return Err(FrameError::UnknownKind { kind }),
        };
        Ok(msg)
    }
}
