//! A config file's text.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| reaper::fuzzing::config_text(data));
