//! Messages with descriptors (SCM_RIGHTS) on a control connection.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| reaper::fuzzing::descriptor_stream(data));
