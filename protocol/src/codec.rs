//! The frame codec: `kind u8 | len u32 | payload | crc32 u32`, big-endian, CRC over kind, len and payload.
//!
//! Decoding order (as in rust-postgres' codec): not enough bytes for a header → `Ok(None)`; an announced
//! length above the limit → error before anything is buffered; not enough bytes for the frame → reserve and
//! `Ok(None)`; then the CRC; only then the body is parsed. Any error ends the connection.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::FrameError;
use crate::message::{Decode, Encode, ReceiverMessage, SenderMessage};

/// Bytes before the payload.
pub const HEADER_LEN: usize = 5;
/// Bytes after the payload.
pub const TRAILER_LEN: usize = 4;
/// The default payload limit (8 MiB). WAL is sent in chunks well below it.
pub const DEFAULT_MAX_PAYLOAD: u32 = 8 << 20;

/// One checked frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Bytes,
}

/// Splits a byte stream into CRC-checked frames.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_payload: u32,
}

impl FrameCodec {
    pub fn new(max_payload: u32) -> Self {
        FrameCodec { max_payload }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        }
        let kind = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        if len > self.max_payload {
            return Err(FrameError::FrameTooLarge {
                kind,
                len,
                max: self.max_payload,
            });
        }
        let total = HEADER_LEN + len as usize + TRAILER_LEN;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let body_end = HEADER_LEN + len as usize;
        let actual = crc32fast::hash(&src[..body_end]);
        let expected = u32::from_be_bytes([
            src[body_end],
            src[body_end + 1],
            src[body_end + 2],
            src[body_end + 3],
        ]);
        if actual != expected {
            return Err(FrameError::ChecksumMismatch {
                kind,
                expected,
                actual,
            });
        }
        let mut frame = src.split_to(total);
        frame.advance(HEADER_LEN);
        frame.truncate(len as usize);
        Ok(Some(Frame {
            kind,
            payload: frame.freeze(),
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::TruncatedFrame {
                need: frame_len(src).unwrap_or(HEADER_LEN),
                have: src.len(),
            }),
        }
    }
}

/// The whole length of the frame `buf` begins with, as its header says (`None` before a whole header).
fn frame_len(buf: &[u8]) -> Option<usize> {
    let len = buf.get(1..HEADER_LEN)?;
    Some(HEADER_LEN + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize + TRAILER_LEN)
}

/// Whether `buf` (what a reader has buffered) begins with a complete frame: a reader can take another message
/// at once, without waiting for the peer.
pub fn frame_buffered(buf: &[u8]) -> bool {
    frame_len(buf).is_some_and(|len| buf.len() >= len)
}

/// Writes one message as a frame into `dst`.
pub fn encode_frame<M: Encode + ?Sized>(msg: &M, dst: &mut BytesMut) {
    let start = dst.len();
    dst.reserve(HEADER_LEN + msg.size_hint() + TRAILER_LEN);
    dst.put_u8(msg.kind());
    dst.put_u32(0);
    msg.encode_body(dst);
    let len = (dst.len() - start - HEADER_LEN) as u32;
    dst[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    let crc = crc32fast::hash(&dst[start..]);
    dst.put_u32(crc);
}

/// Writes a frame of `kind` around an arbitrary `payload`, with a correct CRC: what fuzzers and tests use to
/// reach the message decoders behind the CRC check.
pub fn encode_raw_frame(kind: u8, payload: &[u8], dst: &mut BytesMut) {
    let start = dst.len();
    dst.reserve(HEADER_LEN + payload.len() + TRAILER_LEN);
    dst.put_u8(kind);
    dst.put_u32(payload.len() as u32);
    dst.put_slice(payload);
    let crc = crc32fast::hash(&dst[start..]);
    dst.put_u32(crc);
}

/// Decodes `data` framed as a message of the `kind` its first byte picks (one of the nine tags), with a
/// correct CRC, in the direction the tag belongs to; a message that decodes must encode to a frame that
/// decodes to the same message. Panics on any violation. The body of the fuzz target `messages` and of the
/// property test of the same name.
pub fn check_framed_message(data: &[u8]) {
    use crate::message::tag;
    const TAGS: [u8; 11] = [
        tag::HELLO,
        tag::WAL,
        tag::HISTORY,
        tag::KEEPALIVE,
        tag::PRIMARY_DOWN,
        tag::WAL_ZSTD,
        tag::SYNC_STATE,
        tag::WELCOME,
        tag::REFUSE,
        tag::ACK,
        tag::ERROR,
    ];
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let kind = TAGS[pick as usize % TAGS.len()];
    let mut frame = BytesMut::new();
    encode_raw_frame(kind, payload, &mut frame);
    // the first seven are the sender's
    if pick as usize % TAGS.len() < 7 {
        if let Some(SenderMessage::WalZstd(z)) = round_trip_decoded::<SenderMessage>(frame) {
            // whatever the frame claims, decompression is bounded and never panics
            if let Ok(w) = z.decompress(DEFAULT_MAX_PAYLOAD as usize) {
                assert_eq!(w.bytes.len(), z.raw_len as usize);
            }
        }
    } else {
        round_trip_decoded::<ReceiverMessage>(frame);
    }
}

fn round_trip_decoded<M: Decode + Encode + PartialEq + std::fmt::Debug>(
    mut frame: BytesMut,
) -> Option<M> {
    let mut codec = MessageCodec::<M, SenderMessage>::new(DEFAULT_MAX_PAYLOAD);
    if let Ok(Some(msg)) = codec.decode(&mut frame) {
        let mut again = BytesMut::new();
        encode_frame(&msg, &mut again);
        let mut c2 = MessageCodec::<M, SenderMessage>::new(DEFAULT_MAX_PAYLOAD);
        let back = c2
            .decode(&mut again)
            .expect("a re-encoded message decodes")
            .expect("a re-encoded message is one whole frame");
        assert_eq!(back, msg, "decode(encode(m)) != m");
        return Some(msg);
    }
    None
}

/// A typed codec: decodes `In` messages, encodes `Out` messages. The sender uses
/// `MessageCodec<ReceiverMessage, SenderMessage>`, the receiver the opposite.
pub struct MessageCodec<In, Out> {
    frames: FrameCodec,
    _marker: PhantomData<fn(Out) -> In>,
}

impl<In, Out> MessageCodec<In, Out> {
    pub fn new(max_payload: u32) -> Self {
        MessageCodec {
            frames: FrameCodec::new(max_payload),
            _marker: PhantomData,
        }
    }
}

impl<In, Out> Default for MessageCodec<In, Out> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl<In: Decode, Out> Decoder for MessageCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.frames.decode(src)? {
            Some(f) => In::decode(f.kind, f.payload).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.frames.decode_eof(src)? {
            Some(f) => In::decode(f.kind, f.payload).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: Encode> Encoder<Out> for MessageCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&item, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::message::{
        tag, Compression, Hello, ReceiverMessage, RefuseCode, SenderMessage, Wal,
    };
    use proptest::prelude::*;

    fn sender_messages() -> Vec<SenderMessage> {
        vec![
            SenderMessage::Hello(Hello {
                version_min: 1,
                version_max: 3,
                system_identifier: 7_300_000_000_000_000_001,
                timeline: 1,
                wal_segment_size: 16 << 20,
                pg_version_num: 150018,
                sender_name: "primary-1 ⚡".into(),
            }),
            SenderMessage::Wal(Wal {
                timeline: 2,
                start_lsn: Lsn(0x1_0000_0028),
                bytes: Bytes::from(vec![7u8; 100_000]),
            }),
            SenderMessage::WalZstd(
                Wal {
                    timeline: 2,
                    start_lsn: Lsn(0x1_0000_0028),
                    bytes: Bytes::from(vec![7u8; 100_000]),
                }
                .compress(1)
                .expect("compressible"),
            ),
            SenderMessage::History {
                timeline: 2,
                content: Bytes::from_static(b"1\t0/3000158\tx\n"),
            },
            SenderMessage::History {
                timeline: 3,
                content: Bytes::new(),
            },
            SenderMessage::Keepalive {
                primary_flush_lsn: Lsn(99),
                timeline: 1,
                sent_at_unix_micros: 1_700_000_000_000_000,
            },
            SenderMessage::PrimaryDown {
                timeline: 3,
                wal_end: Lsn(0x1_0000_0028),
                down_since_unix_micros: 1_700_000_000_000_001,
            },
            SenderMessage::SyncState {
                timeline: 2,
                state: crate::message::SyncState::Sync,
            },
            SenderMessage::SyncState {
                timeline: 1,
                state: crate::message::SyncState::Quorum,
            },
        ]
    }

    fn receiver_messages() -> Vec<ReceiverMessage> {
        vec![
            ReceiverMessage::Welcome {
                protocol_version: 1,
                resume: vec![],
                compression: Compression::None,
            },
            ReceiverMessage::Welcome {
                protocol_version: 1,
                resume: vec![(1, Lsn(5)), (2, Lsn(u64::MAX))],
                compression: Compression::None,
            },
            ReceiverMessage::Welcome {
                protocol_version: 4,
                resume: vec![(1, Lsn(5))],
                compression: Compression::Zstd,
            },
            ReceiverMessage::Welcome {
                protocol_version: 4,
                resume: vec![],
                compression: Compression::None,
            },
            ReceiverMessage::Refuse {
                code: RefuseCode::ForeignCluster,
                reason: "not yours".into(),
            },
            ReceiverMessage::Refuse {
                code: RefuseCode::Other,
                reason: String::new(),
            },
            ReceiverMessage::Ack {
                timeline: 1,
                durable_lsn: Lsn(0x16B_3748),
                confirmed_lsn: None,
            },
            ReceiverMessage::Ack {
                timeline: 1,
                durable_lsn: Lsn(0x16B_3748),
                confirmed_lsn: Some(Lsn(0x16B_0000)),
            },
            ReceiverMessage::Error {
                reason: "bye".into(),
            },
        ]
    }

    fn round_trip<M: Encode + Decode + PartialEq + std::fmt::Debug + Clone>(msgs: Vec<M>) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode_frame(m, &mut buf);
        }
        let mut codec = FrameCodec::default();
        for m in msgs {
            let f = codec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(M::decode(f.kind, f.payload).unwrap(), m);
        }
        assert!(buf.is_empty());
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn a_buffered_frame_is_seen_only_when_complete() {
        let mut buf = BytesMut::new();
        for m in sender_messages() {
            encode_frame(&m, &mut buf);
        }
        let first = frame_len(&buf).unwrap();
        assert!(!frame_buffered(&[]));
        for cut in 0..first {
            assert!(
                !frame_buffered(&buf[..cut]),
                "{cut} bytes of a {first}-byte frame"
            );
        }
        assert!(frame_buffered(&buf[..first]));
        assert!(frame_buffered(&buf));
    }

    #[test]
    fn compressed_wal_decompresses_to_the_same_bytes_within_bounds() {
        let raw: Vec<u8> = (0..200_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 1000) as u8)
            .collect();
        let wal = Wal {
            timeline: 1,
            start_lsn: Lsn(0x300_0000),
            bytes: Bytes::from(raw),
        };
        let z = wal.compress(1).expect("compressible");
        assert!(z.data.len() < wal.bytes.len() / 2, "{}", z.data.len());
        assert_eq!(z.decompress(1 << 20).unwrap(), wal);
        // more than the bound, a wrong length, garbage: errors, never a panic or a large allocation
        assert!(z.decompress(1000).is_err());
        let mut lying = z.clone();
        lying.raw_len -= 1;
        assert!(lying.decompress(1 << 20).is_err());
        let mut garbage = z.clone();
        garbage.data = Bytes::from_static(b"not zstd at all");
        assert!(garbage.decompress(1 << 20).is_err());
        // incompressible bytes stay plain
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let plain = Wal {
            timeline: 1,
            start_lsn: Lsn(0),
            bytes: Bytes::from(noise),
        };
        assert!(plain.compress(1).is_none());
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(sender_messages());
        round_trip(receiver_messages());
    }

    #[test]
    fn byte_by_byte_feeding() {
        let mut whole = BytesMut::new();
        for m in sender_messages() {
            encode_frame(&m, &mut whole);
        }
        let mut codec = MessageCodec::<SenderMessage, ReceiverMessage>::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            buf.put_u8(*b);
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, sender_messages());
    }

    /// A frame with the given kind and payload and a correct CRC.
    fn raw(kind: u8, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        b.put_u32(payload.len() as u32);
        b.put_slice(payload);
        let crc = crc32fast::hash(&b);
        b.put_u32(crc);
        b
    }

    fn decode_sender(mut buf: BytesMut) -> Result<Option<SenderMessage>, FrameError> {
        let mut c = MessageCodec::<SenderMessage, ReceiverMessage>::new(1 << 20);
        c.decode_eof(&mut buf)
    }

    #[test]
    fn bad_frames_have_their_own_errors() {
        // oversize: refused from the header alone
        let mut big = BytesMut::new();
        big.put_u8(tag::WAL);
        big.put_u32(u32::MAX);
        let mut c = FrameCodec::new(1 << 20);
        assert!(matches!(
            c.decode(&mut big),
            Err(FrameError::FrameTooLarge { len: u32::MAX, .. })
        ));
        assert!(
            big.capacity() < 1 << 20,
            "nothing was allocated for the oversize frame"
        );

        // bad CRC
        let mut f = raw(tag::KEEPALIVE, &[0; 20]);
        let last = f.len() - 1;
        f[last] ^= 0xFF;
        assert!(matches!(
            decode_sender(f),
            Err(FrameError::ChecksumMismatch { .. })
        ));

        // flipped payload bit
        let mut f = raw(tag::KEEPALIVE, &[0; 20]);
        f[7] ^= 1;
        assert!(matches!(
            decode_sender(f),
            Err(FrameError::ChecksumMismatch { .. })
        ));

        // truncated frame at end of stream
        let mut f = raw(tag::KEEPALIVE, &[0; 20]);
        f.truncate(10);
        assert!(matches!(
            decode_sender(f),
            Err(FrameError::TruncatedFrame { have: 10, need: 29 })
        ));
        assert!(matches!(
            decode_sender(BytesMut::from(&b"W\0"[..])),
            Err(FrameError::TruncatedFrame { .. })
        ));

        // truncated body
        assert!(matches!(
            decode_sender(raw(tag::KEEPALIVE, &[0; 10])),
            Err(FrameError::Truncated {
                message: "Keepalive",
                ..
            })
        ));
        // trailing bytes
        let mut body = vec![0u8; 8];
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&[0; 8]);
        body.push(0);
        assert!(matches!(
            decode_sender(raw(tag::KEEPALIVE, &body)),
            Err(FrameError::TrailingBytes {
                message: "Keepalive",
                extra: 1
            })
        ));
        // unknown kind, and a receiver tag sent by a sender
        assert!(matches!(
            decode_sender(raw(b'Q', &[])),
            Err(FrameError::UnknownKind { kind: b'Q' })
        ));
        assert!(matches!(
            decode_sender(raw(tag::ACK, &[0; 12])),
            Err(FrameError::UnknownKind { .. })
        ));

        // absurd LSN ranges: empty, and past the end of the address space
        let mut wal = Vec::new();
        wal.extend_from_slice(&1u32.to_be_bytes());
        wal.extend_from_slice(&(u64::MAX - 2).to_be_bytes());
        assert!(matches!(
            decode_sender(raw(tag::WAL, &wal)),
            Err(FrameError::AbsurdLsnRange { len: 0, .. })
        ));
        wal.extend_from_slice(&[1, 2, 3, 4]);
        assert!(matches!(
            decode_sender(raw(tag::WAL, &wal)),
            Err(FrameError::AbsurdLsnRange { len: 4, .. })
        ));

        // timeline 0, and a history file for timeline 1
        let mut wal = vec![0u8; 12];
        wal.push(1);
        assert!(matches!(
            decode_sender(raw(tag::WAL, &wal)),
            Err(FrameError::InvalidTimeline { timeline: 0, .. })
        ));
        assert!(matches!(
            decode_sender(raw(tag::HISTORY, &1u32.to_be_bytes())),
            Err(FrameError::InvalidTimeline { timeline: 1, .. })
        ));

        // string too long and not UTF-8
        let mut hello = vec![0u8; 24];
        hello[15] = 1; // timeline 1
        let mut long = hello.clone();
        long.extend_from_slice(&(5000u16).to_be_bytes());
        assert!(matches!(
            decode_sender(raw(tag::HELLO, &long)),
            Err(FrameError::TooLong { .. })
        ));
        hello.extend_from_slice(&2u16.to_be_bytes());
        hello.extend_from_slice(&[0xC3, 0x28]);
        assert!(matches!(
            decode_sender(raw(tag::HELLO, &hello)),
            Err(FrameError::InvalidString { .. })
        ));

        // receiver side: unknown refuse code, too many resume entries
        let mut c = MessageCodec::<ReceiverMessage, SenderMessage>::default();
        let mut f = raw(tag::REFUSE, &[9, 0, 0]);
        assert!(matches!(
            c.decode(&mut f),
            Err(FrameError::UnknownRefuseCode { code: 9 })
        ));
        let mut f = raw(tag::WELCOME, &[0, 1, 0xFF, 0xFF]);
        assert!(matches!(c.decode(&mut f), Err(FrameError::TooLong { .. })));
        let mut f = raw(tag::WELCOME, &[0, 1, 0, 2, 0, 0, 0, 1]);
        assert!(matches!(
            c.decode(&mut f),
            Err(FrameError::Truncated { .. })
        ));
    }

    /// Valid message bodies with a few bytes changed, cut or appended: most reach deep into the decoders.
    fn mutated_message() -> impl Strategy<Value = Vec<u8>> {
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        let tags = [
            b'H', b'W', b'T', b'K', b'D', b'Z', b'S', b'w', b'r', b'a', b'e',
        ];
        let mut push = |kind: u8, body: &[u8]| {
            let pick = tags.iter().position(|t| *t == kind).unwrap() as u8;
            let mut v = vec![pick];
            v.extend_from_slice(body);
            bodies.push(v);
        };
        for m in sender_messages() {
            let mut b = BytesMut::new();
            m.encode_body(&mut b);
            push(m.kind(), &b[..b.len().min(4096)]);
        }
        for m in receiver_messages() {
            let mut b = BytesMut::new();
            m.encode_body(&mut b);
            push(m.kind(), &b);
        }
        (
            proptest::sample::select(bodies),
            proptest::collection::vec((any::<u16>(), any::<u8>()), 0..4),
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..8),
        )
            .prop_map(|(mut body, flips, cut, tail)| {
                for (at, byte) in flips {
                    let len = body.len();
                    if len > 1 {
                        body[1 + at as usize % (len - 1)] = byte;
                    }
                }
                if cut % 4 == 0 {
                    body.truncate(1 + cut as usize % body.len());
                }
                body.extend(tail);
                body
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200_000))]
        /// The fuzz target `messages` as a property test: framed with a correct CRC, so the message decoders
        /// see every input (raw bytes almost never get past the CRC).
        #[test]
        fn framed_messages_decode_or_fail_cleanly(data in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            mutated_message(),
        ]) {
            check_framed_message(&data);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&data[..]);
            let mut c = MessageCodec::<SenderMessage, ReceiverMessage>::new(1024);
            while let Ok(Some(_)) = c.decode(&mut buf) {}
            let mut buf = BytesMut::from(&data[..]);
            let mut c = MessageCodec::<ReceiverMessage, SenderMessage>::new(1024);
            while let Ok(Some(_)) = c.decode_eof(&mut buf) {}
        }

        #[test]
        fn wal_round_trips(tli in 1u32.., start in 0u64..(u64::MAX / 2), data in proptest::collection::vec(any::<u8>(), 1..2048)) {
            let m = SenderMessage::Wal(Wal { timeline: tli, start_lsn: Lsn(start), bytes: Bytes::from(data) });
            let mut buf = BytesMut::new();
            encode_frame(&m, &mut buf);
            let mut c = MessageCodec::<SenderMessage, ReceiverMessage>::default();
            prop_assert_eq!(c.decode(&mut buf).unwrap().unwrap(), m);
        }
    }
}
