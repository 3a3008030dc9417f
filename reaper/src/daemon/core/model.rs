//! What the core hands out: domain values, not protocol views. The control
//! plane's adapter (`daemon::wire`) turns them into JSON, and the audit
//! writer (`daemon::audit`) into audit lines, so neither the timer path nor
//! the handlers know the wire's shape.

use std::collections::BTreeMap;
use std::sync::Arc;

use reaper_common::FlowTuple;

use crate::config::Watch;
use crate::kernel::KillPath;
use crate::policy::{IdleDirection, Now};
use crate::protocol::Op;

/// Why a flow was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// A fleet mirror whose session ended on the node that granted it.
    OriginEnded,
    /// A `fail-closed` class's session on a node cut off from the fleet.
    Partitioned,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::Revoked => "revoked",
            Reason::Idle => "idle",
            Reason::Evicted => "evicted",
            Reason::Unauthorized => "unauthorized",
            Reason::Rejected => "rejected",
            Reason::TableFull => "table_full",
            Reason::OriginEnded => "origin_ended",
            Reason::Partitioned => "partitioned",
        }
    }
}

/// How one kill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillResult {
    /// The socket was aborted (or reset): the peer got its RST.
    Destroyed,
    /// It had closed on its own before the kill reached it.
    AlreadyClosed,
    /// The kernel refused the destroy: the in-kernel drop holds the flow.
    DropOnly,
    /// A forwarded flow's RSTs are out; whether they took is known later
    /// (the audit event then says `reset` or `drop_only`).
    RstSent,
    /// A forwarded flow's packets stopped after its RSTs.
    Reset,
}

impl KillResult {
    pub fn name(self) -> &'static str {
        match self {
            KillResult::Destroyed => "destroyed",
            KillResult::AlreadyClosed => "already_closed",
            KillResult::DropOnly => "drop_only",
            KillResult::RstSent => "rst_sent",
            KillResult::Reset => "reset",
        }
    }
}

/// Whose a killed flow was: its session's names, or for a refused grant
/// the names the grant asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub session: String,
    pub user: String,
    pub target: String,
    /// The uid whose grant made the session (for a refused grant: who
    /// asked); `None` for a flow no session holds (a fence kill).
    pub granted_by_uid: Option<u32>,
}

/// Who is asking, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// 0 where unknown.
    pub pid: u32,
}

/// Why a kill happens, when it became due, and who asked for it (`None`:
/// the daemon itself, at a deadline, an idle check, a fence end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub reason: Reason,
    /// When the kill became due (None: each flow's own deadline), from
    /// which lateness is measured.
    pub due: Option<u64>,
    pub by: Option<Caller>,
    /// The fleet node that asked (a revocation written to etcd there);
    /// `None`: this node.
    pub by_node: Option<Arc<str>>,
}

impl Cause {
    /// A kill the daemon does on its own.
    pub fn own(reason: Reason, due: Option<u64>) -> Cause {
        Cause {
            reason,
            due,
            by: None,
            by_node: None,
        }
    }

    /// A kill a request asked for at `now`.
    pub fn asked(reason: Reason, now: u64, by: Caller) -> Cause {
        Cause {
            reason,
            due: Some(now),
            by: Some(by),
            by_node: None,
        }
    }

    /// A kill a fleet revocation from `node` asked for at `now`.
    pub fn fleet(reason: Reason, now: u64, by: Caller, node: Arc<str>) -> Cause {
        Cause {
            by_node: Some(node),
            ..Cause::asked(reason, now, by)
        }
    }
}

/// One killed flow: what the audit event and the revoke response are both
/// made from.
#[derive(Debug, Clone, PartialEq)]
pub struct Kill {
    pub reason: Reason,
    /// Who asked for it (revoke, a refused or evicting grant).
    pub by: Option<Caller>,
    /// The fleet node it was asked on, if not this one.
    pub by_node: Option<Arc<str>>,
    pub owner: Owner,
    /// 0 for a forwarded flow (no local socket).
    pub cookie: u64,
    pub tuple: FlowTuple,
    pub path: KillPath,
    pub result: KillResult,
    /// When the kill completed.
    pub done: Now,
    /// How long after it was due (deadline, idle deadline, end of the fence
    /// grace, or the request that asked for it) it completed.
    pub late_ns: u64,
    /// Forwarded flows, once checked: whether the peers took the RSTs.
    pub acknowledged: Option<bool>,
}

/// What a request did to a session, for the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A grant created the session.
    Created,
    /// A grant joined it (adding flows or pre-registrations).
    Joined,
    Extended,
    Revoked,
}

impl ChangeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Created | ChangeKind::Joined => "grant",
            ChangeKind::Extended => "extend",
            ChangeKind::Revoked => "revoke",
        }
    }
}

/// A grant, extend or revoke, with who asked and the session as the
/// request left it (a revoked one as it stood before its kills).
#[derive(Debug, Clone, PartialEq)]
pub struct Change<'a> {
    pub kind: ChangeKind,
    pub by: Caller,
    /// The fleet node it was asked on, if not this one.
    pub by_node: Option<&'a str>,
    pub at_unix_ns: i128,
    pub session: &'a SessionSnapshot,
}

/// The audit trail: every kill is recorded once, when it is complete, and
/// every grant, extend and revoke when it is done.
pub trait AuditSink: Send {
    fn record(&mut self, kill: &Kill);
    fn change(&mut self, change: &Change<'_>);
    /// Reopens where the records go (SIGHUP, after a log rotation).
    fn reopen(&mut self) {}
    /// Writes out what `record` and `change` buffered. The core calls it at
    /// the end of every entry point, so a record is out before the answer
    /// to the request that made it, and a mass kill's thousands of records
    /// cost a few writes, not two each.
    fn flush(&mut self) {}
}

/// One flow of a session, as `list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowSnapshot {
    pub cookie: u64,
    pub tuple: FlowTuple,
    pub established_unix_ns: i128,
    pub path: KillPath,
}

/// A session as it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSnapshot {
    pub name: String,
    pub user: String,
    pub target: String,
    pub class: String,
    pub deadline_boot_ns: u64,
    pub deadline_unix_ns: i128,
    /// Negative once the deadline has passed (the kill is under way).
    pub time_left_ns: i128,
    pub granted_unix_ns: i128,
    pub granted_by_uid: u32,
    /// 0: no idle timeout.
    pub idle_timeout_ns: u64,
    pub idle_direction: IdleDirection,
    pub flows: Vec<FlowSnapshot>,
    /// Pre-registered connections not yet seen.
    pub expecting: usize,
}

/// What a grant, extend or touch leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    pub session: SessionSnapshot,
    /// Whether this grant created the session (false: it joined one).
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Revoked {
    /// Names of the sessions that ended.
    pub sessions: Vec<String>,
    pub kills: Vec<Kill>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub now_unix_ns: i128,
    /// In deadline order.
    pub sessions: Vec<SessionSnapshot>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub uptime_ns: u64,
    pub cgroup: String,
    pub pin_path: String,
    pub sessions: usize,
    pub sessions_by_class: BTreeMap<String, usize>,
    pub tracked_flows: usize,
    pub granted_flows: usize,
    pub max_flows: u32,
    pub max_sessions: u32,
    pub counters: BTreeMap<String, u64>,
    pub namespaces: usize,
    pub kill_path: KillPath,
    pub watch: Vec<Watch>,
    pub fence: Vec<Watch>,
    pub classes: Vec<String>,
    pub config_loads: u64,
    pub last_reload_error: Option<String>,
    pub fleet: Option<Box<crate::protocol::FleetStatus>>,
}

/// What an operation produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// grant, extend and touch.
    Granted(Granted),
    Revoked(Revoked),
    Listed(Listing),
    Status(Status),
    /// `watch`: the events this caller may follow.
    Watching(WatchFilter),
    /// `batch`: each request's own outcome, in order.
    Batch(Vec<(Op, Result<Outcome, Refused>)>),
}

/// Which live events a watcher gets: those of the sessions it may `list`
/// (every event for an operator), narrowed by its selector.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchFilter {
    pub everything: bool,
    pub uid: u32,
    pub selector: crate::protocol::ListArgs,
}

/// Whom a live event concerns. Events of no session (a reload, a fence
/// kill) have empty names and no uid: only operators see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventScope {
    pub session: String,
    pub user: String,
    pub target: String,
    pub granted_by_uid: Option<u32>,
}

impl WatchFilter {
    pub fn admits(&self, e: &EventScope) -> bool {
        let s = &self.selector;
        (self.everything || e.granted_by_uid == Some(self.uid))
            && s.session.as_ref().is_none_or(|v| *v == e.session)
            && s.user.as_ref().is_none_or(|v| *v == e.user)
            && s.target.as_ref().is_none_or(|v| *v == e.target)
    }
}

/// Why the core refused a request; the control plane maps the code to the
/// protocol's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// A name or value is malformed or names nothing configured.
    BadValue,
    /// The deadline is in the past, zero, or beyond max_ttl.
    DeadlineRefused,
    NoSuchFlow,
    NoSuchSession,
    /// The flow is not one the kernel tracks.
    FlowNotTracked,
    /// The session exists with other terms.
    SessionConflict,
    /// The flow already belongs to another session.
    FlowConflict,
    /// A session limit refused the new session; its flows were killed.
    LimitReached,
    PermissionDenied,
    /// A passed descriptor is missing or not a TCP socket.
    BadFd,
    /// A table is full.
    TableFull,
    /// A watched flow went untracked because the kernel flow table, or its
    /// owner's share of it, is full.
    FlowTableExhausted,
    /// The caller's uid holds as many sessions or pre-registrations as its
    /// quota allows.
    QuotaExceeded,
    /// The user or target is revoked fleet-wide (a lock stands).
    Locked,
    /// Cut off from the fleet, and the class fails closed.
    Partitioned,
    Internal,
}

/// A refusal: nothing was changed, except where the code says otherwise
/// (`LimitReached` kills the refused grant's flows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: Code,
    pub message: String,
}

impl Refused {
    pub fn new(code: Code, message: impl Into<String>) -> Refused {
        Refused {
            code,
            message: message.into(),
        }
    }
}

pub(super) fn refuse<T>(code: Code, message: impl Into<String>) -> Result<T, Refused> {
    Err(Refused::new(code, message))
}

pub(super) fn internal(e: impl std::fmt::Display) -> Refused {
    Refused::new(Code::Internal, e.to_string())
}
