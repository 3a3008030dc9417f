//! reaper's kernel programs live in `main.rs` and are built for the BPF target
//! by `reaper/build.rs`. This empty library exists so that `reaper` can name the
//! crate as a build dependency: cargo then rebuilds the daemon whenever the
//! kernel side changes.
#![no_std]
