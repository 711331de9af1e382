//! Feeds arbitrary bytes to both directions' decoders; every message that decodes must re-encode to a frame
//! that decodes to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use walship_protocol::codec::encode_frame;
use walship_protocol::message::{Decode, Encode};
use walship_protocol::{MessageCodec, ReceiverMessage, SenderMessage};

fn check<M: Decode + Encode + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut codec = MessageCodec::<M, SenderMessage>::new(1 << 16);
    while let Ok(Some(msg)) = codec.decode_eof(&mut buf) {
        let mut again = BytesMut::new();
        encode_frame(&msg, &mut again);
        let mut c2 = MessageCodec::<M, SenderMessage>::new(1 << 16);
        let back = c2.decode(&mut again).expect("re-encoded frame decodes").expect("complete frame");
        assert_eq!(back, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<SenderMessage>(data);
    check::<ReceiverMessage>(data);
});
