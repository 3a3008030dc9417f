//! The audit trail: one JSON line per killed flow and per grant, extend and
//! revoke (naming who asked), on stdout and optionally appended to a file. Operational logs go to stderr through `tracing`, so
//! stdout carries nothing but audit records and can be shipped as is.
//!
//! The core hands over `Kill` and `Change` records (`core::AuditSink`); the
//! lines' shape is decided here and nowhere else.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use super::core::model::{AuditSink, Change, ChangeKind, Kill};
use crate::error::{Error, Result};
use crate::timefmt;
use crate::tuple;

/// One audit line.
#[derive(Debug, Clone, Serialize)]
struct KillEvent<'a> {
    ts: String,
    event: &'static str,
    reason: &'static str,
    session: &'a str,
    user: &'a str,
    target: &'a str,
    local: String,
    remote: String,
    cookie: u64,
    /// How long after the moment it was due the kill completed, in
    /// microseconds.
    late_us: u64,
    /// `destroy`, `rst` or `forward`.
    path: &'static str,
    /// `destroyed`, `already_closed`, `drop_only`, or for a forwarded flow
    /// `reset` (its packets stopped after the RSTs).
    result: &'static str,
    /// Forwarded flows: whether the peers took the RSTs.
    #[serde(skip_serializing_if = "Option::is_none")]
    acknowledged: Option<bool>,
    /// Who asked for the kill (revoke, a refused or evicting grant).
    #[serde(skip_serializing_if = "Option::is_none")]
    by_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    by_pid: Option<u32>,
}

/// The audit line of a kill (without the newline).
pub fn line(kill: &Kill) -> String {
    let (local, remote) = tuple::addrs_of(&kill.tuple);
    let event = KillEvent {
        ts: timefmt::format_rfc3339(kill.done.unix_ns),
        event: "kill",
        reason: kill.reason.name(),
        session: &kill.owner.session,
        user: &kill.owner.user,
        target: &kill.owner.target,
        local: local.to_string(),
        remote: remote.to_string(),
        cookie: kill.cookie,
        late_us: kill.late_ns / timefmt::NS_PER_US,
        path: kill.path.name(),
        result: kill.result.name(),
        acknowledged: kill.acknowledged,
        by_uid: kill.by.map(|c| c.uid),
        by_pid: kill.by.map(|c| c.pid),
    };
    serde_json::to_string(&event).expect("audit events serialize")
}

/// The audit line of a grant, extend or revoke.
#[derive(Debug, Clone, Serialize)]
struct ChangeEvent<'a> {
    ts: String,
    event: &'static str,
    /// Grants: whether this one created the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    session: &'a str,
    user: &'a str,
    target: &'a str,
    class: &'a str,
    deadline: String,
    flows: usize,
    expecting: usize,
    /// The session's creator.
    granted_by_uid: u32,
    by_uid: u32,
    by_pid: u32,
}

/// The audit line of a change (without the newline).
pub fn change_line(change: &Change<'_>) -> String {
    let s = change.session;
    let created = match change.kind {
        ChangeKind::Created => Some(true),
        ChangeKind::Joined => Some(false),
        _ => None,
    };
    let event = ChangeEvent {
        ts: timefmt::format_rfc3339(change.at_unix_ns),
        event: change.kind.name(),
        created,
        session: &s.name,
        user: &s.user,
        target: &s.target,
        class: &s.class,
        deadline: timefmt::format_rfc3339(s.deadline_unix_ns),
        flows: s.flows.len(),
        expecting: s.expecting,
        granted_by_uid: s.granted_by_uid,
        by_uid: change.by.uid,
        by_pid: change.by.pid,
    };
    serde_json::to_string(&event).expect("audit events serialize")
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
}

impl AuditSink for Audit {
    fn record(&mut self, kill: &Kill) {
        self.write(line(kill));
    }

    fn change(&mut self, change: &Change<'_>) {
        self.write(change_line(change));
    }
}

impl Audit {
    fn write(&mut self, mut line: String) {
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
