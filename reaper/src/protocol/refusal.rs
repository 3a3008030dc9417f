//! Why a request was refused: a stable machine-readable code plus a message
//! for humans that names what was wrong.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a request was refused: a stable machine-readable code plus a message
/// for humans that names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The line is not JSON, or not a JSON object.
    BadJson,
    /// A field is missing, unknown, of the wrong type, or conflicts with another.
    BadRequest,
    UnknownOp,
    UnsupportedVersion,
    LineTooLong,
    /// A ttl, expires_at or name is malformed.
    BadValue,
    /// The deadline is in the past, zero, or beyond max_ttl.
    DeadlineRefused,
    NoSuchFlow,
    NoSuchSession,
    /// The flow is not one the kernel tracks (unwatched port or outside the cgroup).
    FlowNotTracked,
    /// The session exists with another user or target.
    SessionConflict,
    /// The flow already belongs to another session.
    FlowConflict,
    /// A session limit of the class (or the host) refused the new session;
    /// its flows were killed.
    LimitReached,
    PermissionDenied,
    /// A passed file descriptor is missing or not a TCP socket.
    BadFd,
    /// A kernel table is full.
    TableFull,
    /// A watched flow is not tracked because the kernel flow table, or its
    /// owner's share of it, is full: the message names who holds it. A
    /// proxy fails closed on it.
    FlowTableExhausted,
    /// The caller's uid holds as many sessions, or pre-registered
    /// connections, as its quota (`[access]`) allows.
    QuotaExceeded,
    /// The grant's user or target is revoked fleet-wide: a lock stands
    /// until it is lifted or expires; the message names who asked, where.
    Locked,
    /// The node is cut off from the fleet (no quorum for `fleet.grace`)
    /// and the grant's class fails closed: it grants nothing of the class
    /// until it is back.
    Partitioned,
    /// The daemon already serves `max_clients` control connections.
    Busy,
    /// A request line was left unfinished for `client_timeout`.
    TimedOut,
    Internal,
}

impl RefusalCode {
    /// The code as the wire spells it.
    pub fn name(self) -> &'static str {
        match self {
            RefusalCode::BadJson => "bad_json",
            RefusalCode::BadRequest => "bad_request",
            RefusalCode::UnknownOp => "unknown_op",
            RefusalCode::UnsupportedVersion => "unsupported_version",
            RefusalCode::LineTooLong => "line_too_long",
            RefusalCode::BadValue => "bad_value",
            RefusalCode::DeadlineRefused => "deadline_refused",
            RefusalCode::NoSuchFlow => "no_such_flow",
            RefusalCode::NoSuchSession => "no_such_session",
            RefusalCode::FlowNotTracked => "flow_not_tracked",
            RefusalCode::SessionConflict => "session_conflict",
            RefusalCode::FlowConflict => "flow_conflict",
            RefusalCode::LimitReached => "limit_reached",
            RefusalCode::PermissionDenied => "permission_denied",
            RefusalCode::BadFd => "bad_fd",
            RefusalCode::TableFull => "table_full",
            RefusalCode::FlowTableExhausted => "flow_table_exhausted",
            RefusalCode::QuotaExceeded => "quota_exceeded",
            RefusalCode::Locked => "locked",
            RefusalCode::Partitioned => "partitioned",
            RefusalCode::Busy => "busy",
            RefusalCode::TimedOut => "timed_out",
            RefusalCode::Internal => "internal",
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

pub(super) fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(RefusalCode::BadRequest, message)
}

#[cfg(test)]
mod tests {
    use super::RefusalCode;

    #[test]
    fn names_are_the_wire_spelling() {
        for code in [
            RefusalCode::BadJson,
            RefusalCode::FlowTableExhausted,
            RefusalCode::Internal,
        ] {
            let wire = serde_json::to_value(code).unwrap();
            assert_eq!(wire.as_str(), Some(code.name()));
        }
    }
}
