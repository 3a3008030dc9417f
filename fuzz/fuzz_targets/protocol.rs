//! A control line as a client sends it (without its newline).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| reaper::fuzzing::protocol_line(data));
