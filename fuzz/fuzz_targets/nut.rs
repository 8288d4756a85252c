#![no_main]
//! Fuzz the nut decoder: arbitrary bytes, fed whole and split at a point the input chooses,
//! must never panic, must always advance, and must give the same items both ways.
use libfuzzer_sys::fuzz_target;
use mamori_protocol::*;

fuzz_target!(|data: &[u8]| {
    mamori_fuzz_support::check(|| nut::ReadingDecoder::default(), data);
});
