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
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use serde::Serialize;
use tokio::sync::watch;

use super::core::model::{AuditSink, Change, ChangeKind, EventScope, Kill};
use super::events::EventBus;
use super::metrics::Metrics;
use crate::error::{Error, Result};
use crate::timefmt;
use crate::tuple;

/// The version of the audit lines' shape, in every line as `schema`: a
/// field may be added within a version, never renamed or removed.
pub const SCHEMA: u32 = 1;

/// One audit line. Every field borrows or is a number: a mass expiry
/// writes 100k of these at once, straight into the pending buffer.
#[derive(Debug, Clone, Serialize)]
struct KillEvent<'a> {
    schema: u32,
    ts: timefmt::Rfc3339,
    event: &'static str,
    reason: &'static str,
    session: &'a str,
    user: &'a str,
    target: &'a str,
    local: SocketAddr,
    remote: SocketAddr,
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
    /// The fleet node that asked, when it is not this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    by_node: Option<&'a str>,
    /// The uid whose grant made the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    granted_by_uid: Option<u32>,
}

/// Appends the audit line of a kill (without the newline) to `out`.
fn write_line(out: &mut Vec<u8>, kill: &Kill) {
    let (local, remote) = tuple::addrs_of(&kill.tuple);
    let event = KillEvent {
        schema: SCHEMA,
        ts: timefmt::Rfc3339(kill.done.unix_ns),
        event: "kill",
        reason: kill.reason.name(),
        session: &kill.owner.session,
        user: &kill.owner.user,
        target: &kill.owner.target,
        local,
        remote,
        cookie: kill.cookie,
        late_us: kill.late_ns / timefmt::NS_PER_US,
        path: kill.path.name(),
        result: kill.result.name(),
        acknowledged: kill.acknowledged,
        by_uid: kill.by.map(|c| c.uid),
        by_pid: kill.by.map(|c| c.pid),
        by_node: kill.by_node.as_deref(),
        granted_by_uid: kill.owner.granted_by_uid,
    };
    serde_json::to_writer(out, &event).expect("audit events serialize");
}

/// The audit line of a kill (without the newline).
pub fn line(kill: &Kill) -> String {
    let mut out = Vec::with_capacity(256);
    write_line(&mut out, kill);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// The audit line of a grant, extend or revoke.
#[derive(Debug, Clone, Serialize)]
struct ChangeEvent<'a> {
    schema: u32,
    ts: timefmt::Rfc3339,
    event: &'static str,
    /// Grants: whether this one created the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    session: &'a str,
    user: &'a str,
    target: &'a str,
    class: &'a str,
    deadline: timefmt::Rfc3339,
    flows: usize,
    expecting: usize,
    /// The session's creator.
    granted_by_uid: u32,
    by_uid: u32,
    by_pid: u32,
    /// The fleet node that asked, when it is not this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    by_node: Option<&'a str>,
}

/// The audit line of a change (without the newline).
pub fn change_line(change: &Change<'_>) -> String {
    let mut out = Vec::with_capacity(256);
    write_change_line(&mut out, change);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Appends the audit line of a grant, extend or revoke (without the
/// newline) to `out`.
fn write_change_line(out: &mut Vec<u8>, change: &Change<'_>) {
    let s = change.session;
    let created = match change.kind {
        ChangeKind::Created => Some(true),
        ChangeKind::Joined => Some(false),
        _ => None,
    };
    let event = ChangeEvent {
        schema: SCHEMA,
        ts: timefmt::Rfc3339(change.at_unix_ns),
        event: change.kind.name(),
        created,
        session: &s.name,
        user: &s.user,
        target: &s.target,
        class: &s.class,
        deadline: timefmt::Rfc3339(s.deadline_unix_ns),
        flows: s.flows.len(),
        expecting: s.expecting,
        granted_by_uid: s.granted_by_uid,
        by_uid: change.by.uid,
        by_pid: change.by.pid,
        by_node: change.by_node,
    };
    serde_json::to_writer(out, &event).expect("audit events serialize");
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

/// How far the audit lines have got: the core queues them for the
/// writer thread, which writes them to stdout and the file. Shared with the
/// server, which holds each answer back until the lines queued before it
/// are written ("a record is out before the answer to the request that
/// made it"), while the core goes on: a disk or journald that stalls delays
/// answers, never a kill. (A write into a page under writeback stalled the
/// core for 20 ms here, every few seconds, each time the file system
/// committed.)
pub struct AuditProgress {
    queued: AtomicU64,
    written: watch::Sender<u64>,
    /// What `written` holds, for `written`'s spin to read without a lock.
    written_seq: AtomicU64,
    /// Whether the last wait for the writer was a lone connection's (see
    /// `written`): the writer then polls a while for the next lines.
    lone_waiter: AtomicBool,
}

impl Default for AuditProgress {
    fn default() -> Self {
        AuditProgress {
            queued: AtomicU64::new(0),
            written: watch::Sender::new(0),
            written_seq: AtomicU64::new(0),
            lone_waiter: AtomicBool::new(false),
        }
    }
}

/// How long `written` may spin for the writer before it sleeps.
const SPIN_FOR: std::time::Duration = std::time::Duration::from_micros(100);

impl AuditProgress {
    /// Waits until every line queued so far is written (or the writer is
    /// gone, at shutdown). With `spin`, it first spins for a little while
    /// (`SPIN_FOR`), holding up the thread's other tasks that long at most:
    /// the writer is usually done within it, and being woken costs more on
    /// a virtual machine (an idle vCPU halts; waking it takes a round trip
    /// through the hypervisor). The server asks for it only for a
    /// connection that is the only one open, and the writer then stays
    /// awake a while for that connection's next lines (`next_message`).
    /// It yields between polls: the writer may be queued on this very CPU
    /// (it was polling here when the request woke this thread), and
    /// spinning outright held it off for the whole `SPIN_FOR`, one grant
    /// in a hundred.
    pub async fn written(&self, spin: bool) {
        self.lone_waiter.store(spin, Ordering::Relaxed);
        let upto = self.queued.load(Ordering::Acquire);
        if spin {
            let start = std::time::Instant::now();
            while self.written_seq.load(Ordering::Acquire) < upto {
                if start.elapsed() > SPIN_FOR {
                    break;
                }
                std::thread::yield_now();
            }
        }
        let mut written = self.written.subscribe();
        let _ = written.wait_for(|w| *w >= upto).await;
    }
}

enum ToWriter {
    /// Lines, and their sequence number.
    Lines(Vec<u8>, u64),
    Reopen,
}

/// The next message for the writer, or `None` once the core's `Audit` is
/// gone. After lines a lone connection waited for, it polls for the next
/// ones (`SPIN_FOR` at most) before it sleeps: a proxy granting in lock
/// step sends its next request within that, and its grant then finds the
/// writer awake instead of paying for a sleeping vCPU's wake-up. It yields
/// between polls: spinning outright, it kept the proxy or the daemon's
/// thread from a CPU they were woken on, and one grant in a hundred took
/// 100 µs longer. Any other time it sleeps at once.
fn next_message(from_core: &mpsc::Receiver<ToWriter>, spin: bool) -> Option<ToWriter> {
    if spin {
        let start = std::time::Instant::now();
        while start.elapsed() <= SPIN_FOR {
            match from_core.try_recv() {
                Ok(message) => return Some(message),
                Err(mpsc::TryRecvError::Disconnected) => return None,
                Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            }
        }
    }
    from_core.recv().ok()
}

/// The writer thread: writes each chunk of lines to stdout and the file, in
/// order, and reopens the file when asked (SIGHUP). It ends when the core's
/// `Audit` is dropped, after writing everything queued.
fn run_writer(
    from_core: mpsc::Receiver<ToWriter>,
    mut file: Option<File>,
    path: Option<PathBuf>,
    progress: Arc<AuditProgress>,
) {
    let mut spin = false;
    while let Some(message) = next_message(&from_core, spin) {
        spin = false;
        match message {
            ToWriter::Lines(lines, seq) => {
                let mut out = std::io::stdout().lock();
                if let Err(e) = out.write_all(&lines).and_then(|_| out.flush()) {
                    tracing::error!("writing audit events to stdout: {e}");
                }
                drop(out);
                if let Some(file) = &mut file {
                    if let Err(e) = file.write_all(&lines) {
                        tracing::error!("writing audit events to file: {e}");
                    }
                }
                progress.written_seq.store(seq, Ordering::Release);
                progress.written.send_replace(seq);
                spin = progress.lone_waiter.load(Ordering::Relaxed);
            }
            ToWriter::Reopen => {
                let Some(path) = &path else { continue };
                match open_file(path) {
                    Ok(new) => file = Some(new),
                    Err(e) => {
                        tracing::error!(
                            "reopening the audit file, still writing to the old one: {e}"
                        )
                    }
                }
            }
        }
    }
}

/// The core's audit sink: each record becomes one line, counted, offered
/// to the watchers, and buffered; `flush` hands the buffer to the writer
/// thread.
pub struct Audit {
    /// Lines not yet handed over (see `AuditSink::flush`).
    pending: Vec<u8>,
    seq: u64,
    to_writer: Option<mpsc::Sender<ToWriter>>,
    writer: Option<std::thread::JoinHandle<()>>,
    progress: Arc<AuditProgress>,
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
    /// Opens the file (an error names it) and starts the writer thread.
    pub fn open(
        path: Option<&Path>,
        metrics: Arc<Metrics>,
        events: EventBus,
        progress: Arc<AuditProgress>,
    ) -> Result<Audit> {
        let file = path.map(open_file).transpose()?;
        let (to_writer, from_core) = mpsc::channel();
        let writer = {
            let (path, progress) = (path.map(Path::to_owned), progress.clone());
            std::thread::Builder::new()
                .name("reaper-audit".into())
                .spawn(move || run_writer(from_core, file, path, progress))
                .map_err(Error::io("starting the audit writer thread"))?
        };
        Ok(Audit {
            pending: Vec::new(),
            seq: 0,
            to_writer: Some(to_writer),
            writer: Some(writer),
            progress,
            metrics,
            events,
        })
    }

    fn send(&mut self, message: ToWriter) {
        let sent = self.to_writer.as_ref().map(|w| w.send(message));
        if !matches!(sent, Some(Ok(()))) {
            tracing::error!("the audit writer thread is gone: audit events are lost");
        }
    }
}

impl AuditSink for Audit {
    fn record(&mut self, kill: &Kill) {
        self.metrics.kill(kill);
        // Nobody watching (the usual case, and a mass expiry's): the line
        // goes straight into the buffer, with no copy of its own.
        if !self.events.watched() {
            write_line(&mut self.pending, kill);
            self.end_line();
            return;
        }
        let line = line(kill);
        let scope = EventScope {
            session: kill.owner.session.clone(),
            user: kill.owner.user.clone(),
            target: kill.owner.target.clone(),
            granted_by_uid: kill.owner.granted_by_uid,
        };
        self.events.publish(scope, line.clone());
        self.write(line);
    }

    fn change(&mut self, change: &Change<'_>) {
        // As `record`: with nobody watching, straight into the buffer.
        if !self.events.watched() {
            write_change_line(&mut self.pending, change);
            self.end_line();
            return;
        }
        let line = change_line(change);
        let s = change.session;
        let scope = EventScope {
            session: s.name.clone(),
            user: s.user.clone(),
            target: s.target.clone(),
            granted_by_uid: Some(s.granted_by_uid),
        };
        self.events.publish(scope, line.clone());
        self.write(line);
    }

    /// Opens the audit file afresh (logrotate moved it away), after the
    /// lines already queued went to the old one; on failure the old one is
    /// kept and the error logged.
    fn reopen(&mut self) {
        self.flush();
        self.send(ToWriter::Reopen);
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // A mass expiry's buffer is not kept for the quiet that follows.
        let capacity = if self.pending.capacity() > MAX_PENDING {
            0
        } else {
            self.pending.capacity()
        };
        let lines = std::mem::replace(&mut self.pending, Vec::with_capacity(capacity));
        self.seq += 1;
        self.progress.queued.store(self.seq, Ordering::Release);
        self.send(ToWriter::Lines(lines, self.seq));
    }
}

/// Buffered audit bytes past which a line is written out at once, without
/// waiting for the end of the entry point.
const MAX_PENDING: usize = 256 * 1024;

impl Audit {
    fn write(&mut self, line: String) {
        self.pending.extend_from_slice(line.as_bytes());
        self.end_line();
    }

    fn end_line(&mut self) {
        self.pending.push(b'\n');
        if self.pending.len() >= MAX_PENDING {
            AuditSink::flush(self);
        }
    }
}

impl Drop for Audit {
    /// Everything queued is written before the daemon exits.
    fn drop(&mut self) {
        AuditSink::flush(self);
        self.to_writer = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::core::model::{KillResult, Owner, Reason};
    use crate::kernel::KillPath;

    fn kill(cookie: u64) -> Kill {
        Kill {
            reason: Reason::Expired,
            by: None,
            by_node: None,
            owner: Owner {
                session: "s\"1".into(),
                user: "alice".into(),
                target: "vm-1".into(),
                granted_by_uid: Some(0),
            },
            cookie,
            tuple: tuple::tuple_of(
                "[2001:db8::5]:5900".parse().unwrap(),
                "[2001:db8::1]:40001".parse().unwrap(),
            ),
            path: KillPath::Destroy,
            result: KillResult::Destroyed,
            done: crate::policy::Now {
                boot_ns: 1,
                unix_ns: 1_764_000_000_123_456_789,
            },
            late_ns: 12_345,
            acknowledged: None,
        }
    }

    #[test]
    fn a_kill_line_reads_back_with_every_field() {
        let line: serde_json::Value = serde_json::from_str(&line(&kill(7))).unwrap();
        assert_eq!(line["session"], "s\"1");
        assert_eq!(line["ts"], "2025-11-24T16:00:00.123456Z");
        assert_eq!(line["local"], "[2001:db8::5]:5900");
        assert_eq!(line["remote"], "[2001:db8::1]:40001");
        assert_eq!(
            (line["cookie"].as_u64(), line["late_us"].as_u64()),
            (Some(7), Some(12))
        );
        assert!(line.get("by_uid").is_none());
    }

    #[test]
    fn a_spin_that_outlasts_its_bound_still_waits_for_the_writer() {
        let progress = Arc::new(AuditProgress::default());
        progress.queued.store(1, Ordering::Release);
        let writer = {
            let progress = progress.clone();
            std::thread::spawn(move || {
                // Well past the spin's bound: the wait goes to sleep.
                std::thread::sleep(SPIN_FOR * 50);
                progress.written_seq.store(1, Ordering::Release);
                progress.written.send_replace(1);
            })
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(progress.written(true));
        assert_eq!(*progress.written.borrow(), 1, "returned before the write");
        writer.join().unwrap();
    }

    #[test]
    fn a_writer_that_outpolls_its_bound_sleeps_until_the_next_lines_or_the_end() {
        let (to_writer, from_core) = mpsc::channel();
        let core = std::thread::spawn(move || {
            // Well past the poll's bound: the writer is asleep by then.
            std::thread::sleep(SPIN_FOR * 50);
            to_writer
                .send(ToWriter::Lines(b"late\n".to_vec(), 1))
                .unwrap();
            std::thread::sleep(SPIN_FOR * 50);
        });
        let Some(ToWriter::Lines(lines, 1)) = next_message(&from_core, true) else {
            panic!("the late lines are the next message");
        };
        assert_eq!(lines, b"late\n");
        assert!(
            next_message(&from_core, true).is_none(),
            "the core's end ends the writer, polling or not"
        );
        core.join().unwrap();
    }

    #[test]
    fn the_writer_thread_writes_in_order_and_reopens_after_a_rotation() {
        let dir = std::env::temp_dir().join(format!("reaper-audit-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let progress = Arc::new(AuditProgress::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut audit = Audit::open(
            Some(&path),
            Arc::default(),
            EventBus::default(),
            progress.clone(),
        )
        .unwrap();
        for cookie in 1..=3 {
            audit.record(&kill(cookie));
        }
        audit.flush();
        // What the server does before it sends an answer (spinning first,
        // as for a lone connection).
        runtime.block_on(progress.written(true));
        let cookies = |p: &Path| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["cookie"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(
            cookies(&path),
            [1, 2, 3],
            "written before the answer may go"
        );
        // logrotate moves the file away, then sends SIGHUP.
        let rotated = dir.join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        audit.record(&kill(4));
        audit.reopen();
        audit.record(&kill(5));
        drop(audit);
        assert_eq!(cookies(&rotated), [1, 2, 3, 4], "queued before the reopen");
        assert_eq!(
            cookies(&path),
            [5],
            "everything is written by the time the daemon exits"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
