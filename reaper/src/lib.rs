//! `reaper`: kernel-enforced deadlines for console connections.
//!
//! Layers, from the bottom: `policy` (pure rules), `enforcer` (kernel
//! programs, maps, kill paths), `daemon` (state and the control socket),
//! `protocol` (what travels on that socket, shared with the CLI), `cli`.
//! A library so that the fuzz targets (`fuzz/`) reach the parsers.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod enforcer;
pub mod error;
pub mod fuzzing;
pub mod kernel;
pub mod policy;
pub mod protocol;
pub mod timefmt;
pub mod tuple;
