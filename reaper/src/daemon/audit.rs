//! The audit trail: one JSON line per killed flow and per grant, extend and
//! revoke (naming who asked), on stdout and optionally appended to a file
//! (reopened on SIGHUP, for logrotate). Operational logs go to stderr
//! through `tracing`, so stdout carries nothing but audit records and can
//! be shipped as is.
//!
//! The core hands over `Kill` and `Change` records (`core::AuditSink`);
//! each becomes one line, which also feeds the metrics and the live event
//! stream. The lines' shape, the stream's refusal and reload events
//! included, is decided here and nowhere else.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::core::model::{AuditSink, Change, ChangeKind, EventScope, Kill};
use super::events::EventBus;
use super::metrics::Metrics;
use crate::error::{Error, Result};
use crate::timefmt;
use crate::tuple;

/// The version of the audit lines' shape, in every line as `schema`: a
/// field may be added within a version, never renamed or removed.
pub const SCHEMA: u32 = 1;

/// One audit line.
#[derive(Debug, Clone, Serialize)]
struct KillEvent<'a> {
    schema: u32,
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
    /// The uid whose grant made the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    granted_by_uid: Option<u32>,
}

/// The audit line of a kill (without the newline).
pub fn line(kill: &Kill) -> String {
    let (local, remote) = tuple::addrs_of(&kill.tuple);
    let event = KillEvent {
        schema: SCHEMA,
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
        granted_by_uid: kill.owner.granted_by_uid,
    };
    serde_json::to_string(&event).expect("audit events serialize")
}

/// The audit line of a grant, extend or revoke.
#[derive(Debug, Clone, Serialize)]
struct ChangeEvent<'a> {
    schema: u32,
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
        schema: SCHEMA,
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

/// A refused request, on the live stream (not in the audit file: a caller
/// who may not change grants could otherwise fill the disk with them).
#[derive(Debug, Clone, Serialize)]
struct RefusalEvent<'a> {
    schema: u32,
    ts: String,
    event: &'static str,
    op: &'a str,
    code: &'a str,
    message: &'a str,
    by_uid: u32,
    by_pid: u32,
}

/// The stream line of a refusal.
pub fn refusal_line(op: &str, code: &str, message: &str, by: super::core::Caller) -> String {
    let event = RefusalEvent {
        schema: SCHEMA,
        ts: timefmt::format_rfc3339(crate::clock::unix_ns()),
        event: "refusal",
        op,
        code,
        message,
        by_uid: by.uid,
        by_pid: by.pid,
    };
    serde_json::to_string(&event).expect("events serialize")
}

/// A config reload, on the live stream.
#[derive(Debug, Clone, Serialize)]
struct ReloadEvent<'a> {
    schema: u32,
    ts: String,
    event: &'static str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

pub fn reload_line(error: Option<&str>) -> String {
    let event = ReloadEvent {
        schema: SCHEMA,
        ts: timefmt::format_rfc3339(crate::clock::unix_ns()),
        event: "reload",
        ok: error.is_none(),
        error,
    };
    serde_json::to_string(&event).expect("events serialize")
}

/// The core's audit sink: each record becomes one line, written to stdout
/// and the audit file, counted, and offered to the watchers.
pub struct Audit {
    /// Lines not yet written (see `AuditSink::flush`).
    pending: Vec<u8>,
    file: Option<File>,
    path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    events: EventBus,
}

fn open_file(p: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(Error::io(format!("opening audit file {}", p.display())))
}

impl Audit {
    pub fn open(path: Option<&Path>, metrics: Arc<Metrics>, events: EventBus) -> Result<Audit> {
        let file = path.map(open_file).transpose()?;
        Ok(Audit {
            pending: Vec::new(),
            file,
            path: path.map(Path::to_owned),
            metrics,
            events,
        })
    }
}

impl AuditSink for Audit {
    fn record(&mut self, kill: &Kill) {
        self.metrics.kill(kill);
        let line = line(kill);
        // Nobody watching (the usual case, and a mass expiry's): no copies.
        if self.events.watched() {
            let scope = EventScope {
                session: kill.owner.session.clone(),
                user: kill.owner.user.clone(),
                target: kill.owner.target.clone(),
                granted_by_uid: kill.owner.granted_by_uid,
            };
            self.events.publish(scope, line.clone());
        }
        self.write(line);
    }

    fn change(&mut self, change: &Change<'_>) {
        let line = change_line(change);
        if self.events.watched() {
            let s = change.session;
            let scope = EventScope {
                session: s.name.clone(),
                user: s.user.clone(),
                target: s.target.clone(),
                granted_by_uid: Some(s.granted_by_uid),
            };
            self.events.publish(scope, line.clone());
        }
        self.write(line);
    }

    /// Opens the audit file afresh (logrotate moved it away); on failure
    /// the old one is kept and the error logged.
    fn reopen(&mut self) {
        self.flush();
        let Some(path) = &self.path else { return };
        match open_file(path) {
            Ok(file) => self.file = Some(file),
            Err(e) => {
                tracing::error!("reopening the audit file, still writing to the old one: {e}")
            }
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(&self.pending).and_then(|_| out.flush()) {
            tracing::error!("writing audit events to stdout: {e}");
        }
        if let Some(file) = &mut self.file {
            if let Err(e) = file.write_all(&self.pending) {
                tracing::error!("writing audit events to file: {e}");
            }
        }
        self.pending.clear();
        // A mass expiry's buffer is not kept for the quiet that follows.
        if self.pending.capacity() > MAX_PENDING {
            self.pending = Vec::new();
        }
    }
}

/// Buffered audit bytes past which a line is written out at once, without
/// waiting for the end of the entry point.
const MAX_PENDING: usize = 256 * 1024;

impl Audit {
    fn write(&mut self, line: String) {
        self.pending.extend_from_slice(line.as_bytes());
        self.pending.push(b'\n');
        if self.pending.len() >= MAX_PENDING {
            AuditSink::flush(self);
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        AuditSink::flush(self);
    }
}
