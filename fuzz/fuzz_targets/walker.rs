//! Walks arbitrary bytes as WAL (the first byte picks a start at a record or a resynchronisation on a page):
//! the record walker must never panic and must return records in order, inside the bytes. Seeds (built WAL):
//! `fuzz/seeds/walker`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship_protocol::walker::check_walk;

fuzz_target!(|data: &[u8]| check_walk(data));
