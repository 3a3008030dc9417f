//! Response lines, and the views of sessions, flows and kills they carry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::refusal::Refusal;
use super::PROTOCOL_VERSION;
use crate::config::Watch;
use crate::policy::IdleDirection;

/// One response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
}

impl Response {
    pub fn ok(id: Option<Value>, result: Value) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn refused(id: Option<Value>, refusal: Refusal) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            result: None,
            error: Some(refusal),
        }
    }

    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("responses serialize");
        s.push('\n');
        s
    }
}

/// A `batch`'s result: one entry per request, in order, each as the
/// response to that request alone would have said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResult {
    pub results: Vec<BatchItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchItem {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub cookie: u64,
    pub local: String,
    pub remote: String,
    pub established: String,
    /// How it will be killed: `destroy` (SOCK_DESTROY) or `rst` (RST + drop).
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub session: String,
    pub user: String,
    pub target: String,
    pub class: String,
    /// Wall-clock deadline (RFC 3339, UTC).
    pub deadline: String,
    /// The deadline on the kernel's boot clock, as enforced.
    pub deadline_boot_ns: u64,
    /// Milliseconds until the deadline (negative once it has passed).
    pub time_left_ms: i64,
    pub granted_at: String,
    pub granted_by_uid: u32,
    /// Idle timeout in milliseconds, if any, and what counts as activity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    pub idle_direction: IdleDirection,
    pub flows: Vec<FlowView>,
    /// Pre-registered connections not yet seen.
    pub expecting: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantResult {
    pub session: SessionView,
    /// Whether this grant created the session (false: it joined one).
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KillView {
    pub session: String,
    pub cookie: u64,
    pub local: String,
    pub remote: String,
    /// `destroy` or `rst`.
    pub path: String,
    /// `destroyed`, `already_closed` or `drop_only`.
    pub result: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokeResult {
    /// Sessions that ended.
    pub sessions: Vec<String>,
    pub kills: Vec<KillView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResult {
    pub now: String,
    pub sessions: Vec<SessionView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResult {
    pub version: String,
    pub protocol: u64,
    pub pid: u32,
    pub uptime_ms: u64,
    pub cgroup: String,
    pub pin_path: String,
    pub sessions: usize,
    /// Live sessions per class (added with `watch`; empty from older daemons).
    #[serde(default)]
    pub sessions_by_class: BTreeMap<String, usize>,
    pub tracked_flows: usize,
    pub granted_flows: usize,
    pub max_flows: u32,
    pub max_sessions: u32,
    pub counters: BTreeMap<String, u64>,
    /// Network namespaces other than the daemon's that it reaches now.
    pub namespaces: usize,
    /// How local flows are killed: `destroy` or `rst`.
    pub kill_path: String,
    pub watch: Vec<Watch>,
    pub fence: Vec<Watch>,
    pub classes: Vec<String>,
    /// Successful config loads: 1 at start, one more per SIGHUP reload.
    pub config_loads: u64,
    /// Why the last reload was refused, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload_error: Option<String>,
}
