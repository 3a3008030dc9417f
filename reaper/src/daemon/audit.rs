//! Audit events: one JSON line per killed flow, on stdout and optionally
//! appended to a file. Operational logs go to stderr through `tracing`, so
//! stdout carries nothing but audit records and can be shipped as is.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// Why a flow was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The session's deadline passed.
    Expired,
    /// Someone revoked it.
    Revoked,
    /// No activity for the idle timeout.
    Idle,
    /// A newer session took its place under an evict-oldest limit.
    Evicted,
    /// A fenced flow was not granted within the grace window.
    Unauthorized,
    /// The grant for it was refused by a reject-new limit.
    Rejected,
    /// It needed tracking (a fenced port, or a pre-registered grant) and the
    /// kernel flow table was full: it fails closed.
    TableFull,
}

#[derive(Debug, Clone, Serialize)]
pub struct KillEvent {
    pub ts: String,
    pub event: &'static str,
    pub reason: Reason,
    pub session: String,
    pub user: String,
    pub target: String,
    pub local: String,
    pub remote: String,
    pub cookie: u64,
    /// How long after the moment it was due (deadline, idle deadline, end
    /// of the fence grace, or the request that asked for it) the socket
    /// was destroyed, in microseconds.
    pub late_us: u64,
    /// How it was killed: `destroy` (SOCK_DESTROY) or `rst` (RST + drop).
    pub path: crate::enforcer::KillPath,
    /// `destroyed`, `already_closed`, `drop_only`, or for a forwarded flow
    /// `reset` (its packets stopped after the RSTs).
    pub result: &'static str,
    /// Forwarded flows: whether the peers took the RSTs (no packet of the
    /// flow reached this host after them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<bool>,
}

pub struct Audit {
    file: Option<File>,
}

impl Audit {
    pub fn open(path: Option<&Path>) -> Result<Audit> {
        let file = match path {
            None => None,
            Some(p) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(Error::io(format!("opening audit file {}", p.display())))?,
            ),
        };
        Ok(Audit { file })
    }

    pub fn record(&mut self, event: &KillEvent) {
        let mut line = serde_json::to_string(event).expect("audit events serialize");
        line.push('\n');
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|_| out.flush()) {
            tracing::error!("writing audit event to stdout: {e}");
        }
        if let Some(file) = &mut self.file {
            if let Err(e) = file.write_all(line.as_bytes()) {
                tracing::error!("writing audit event to file: {e}");
            }
        }
    }
}
