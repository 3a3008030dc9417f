//! The crate's one error type for set-up and I/O failures. Errors a control
//! client caused are not here: they are [`crate::protocol::Refusal`]s, sent
//! back to the client, never fatal to the daemon.

#![forbid(unsafe_code)]

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),

    #[error("loading eBPF programs: {0}")]
    Ebpf(#[from] aya::EbpfError),

    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),

    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),

    #[error("eBPF link: {0}")]
    Link(#[from] aya::programs::links::LinkError),

    #[error("pinning: {0}")]
    Pin(#[from] aya::pin::PinError),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// The kernel lacks a BPF feature reaper cannot work without.
    #[error("{0}")]
    Kernel(String),

    /// A precondition of the machine is missing (no cgroup2, no bpffs, ...).
    #[error("{0}")]
    Setup(String),
}

impl Error {
    /// Wraps an `io::Error` with what was being done, for `map_err`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error with its sources, each once: aya's errors keep the syscall's
/// errno in their source, which is what an operator needs to see.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}
