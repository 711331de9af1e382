//! Frames each input with a correct CRC (the first byte picks one of the ten message tags, the rest is the
//! payload), so every input reaches the message decoders; raw bytes (the `decode` target) almost never get
//! past the CRC. A message that decodes must re-encode to one that decodes to the same message; compressed WAL must
//! decompress within its bound or fail cleanly.
//! Seed corpus: `fuzz/seeds/messages` (one valid body per message kind; `.ci/run` copies it to a scratch corpus).
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship_protocol::codec::check_framed_message;

fuzz_target!(|data: &[u8]| check_framed_message(data));
