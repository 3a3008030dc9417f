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
    pub fn refused(id: Option<Value>, refusal: Refusal) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            result: None,
            error: Some(refusal),
        }
    }

    /// The line answering request `id` with `result`, which a client reads
    /// back as a `Response` with `ok` true.
    pub fn ok_line(id: Option<&Value>, result: &Answer) -> String {
        let line = OkLine {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            result,
        };
        let mut s = serde_json::to_string(&line).expect("responses serialize");
        s.push('\n');
        s
    }

    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("responses serialize");
        s.push('\n');
        s
    }
}

/// A response's `result` as the daemon writes it: the typed views,
/// serialized straight into the line, with no `Value` tree between (a
/// batch of 200 grants built one, and copied it twice).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// grant, extend and touch.
    Granted(GrantResult),
    Revoked(RevokeResult),
    Listed(ListResult),
    Status(StatusResult),
    Watching {
        watching: bool,
    },
    /// One entry per request of the batch, in order, each as the response
    /// to that request alone would have said.
    Batch {
        results: Vec<BatchItem>,
    },
}

#[derive(Debug, Serialize)]
pub struct BatchItem {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Answer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
}

/// A success line as `Response` reads it back, borrowing what it says.
#[derive(Serialize)]
struct OkLine<'a> {
    v: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    ok: bool,
    result: &'a Answer,
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
    /// The fleet, for a node configured with `[fleet]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Box<FleetStatus>>,
}

/// A node's view of its fleet (`status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub node: String,
    pub endpoints: Vec<String>,
    /// Whether the node is connected to etcd and watching now.
    pub connected: bool,
    /// How long it has been connected (or not).
    pub state_for_ms: u64,
    /// Every fleet change up to this etcd revision is applied here.
    pub applied_revision: i64,
    /// From the ask to the apply here, for the last revocation applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_lag_ms: Option<f64>,
    /// Standing locks, `user=alice`, `target=vm-1`.
    pub locks: Vec<String>,
    /// Records refused as malformed since start.
    pub bad_records: u64,
    /// Full lists of the revocations (at start, after a compaction or an
    /// outage).
    pub relists: u64,
    /// No lease renewal for `fleet.grace`: fail-closed classes' sessions
    /// were killed and new ones are refused.
    pub cut_off: bool,
    /// Since the node last renewed its lease.
    pub renewed_ms_ago: u64,
    /// Other nodes whose addresses are known (kept while their record is
    /// gone: their flows still land there).
    pub nodes: Vec<String>,
    /// Sessions granted here with flows landing on other nodes.
    pub published: usize,
    /// Other nodes' sessions enforced here.
    pub mirrors: usize,
    /// Other nodes' session records this node could not grant.
    pub mirrors_refused: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ok_line_reads_back_as_a_response() {
        let refusal = Refusal::new(super::super::RefusalCode::NoSuchSession, "no session \"x\"");
        let answer = Answer::Batch {
            results: vec![
                BatchItem {
                    ok: true,
                    result: Some(Answer::Watching { watching: true }),
                    error: None,
                },
                BatchItem {
                    ok: false,
                    result: None,
                    error: Some(refusal.clone()),
                },
            ],
        };
        let line = Response::ok_line(Some(&Value::from(7)), &answer);
        assert!(line.ends_with("}\n") && !line[..line.len() - 1].contains('\n'));
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (back.v, back.id, back.ok, back.error),
            (PROTOCOL_VERSION, Some(7.into()), true, None)
        );
        assert_eq!(
            back.result.unwrap(),
            serde_json::json!({"results": [
                {"ok": true, "result": {"watching": true}},
                {"ok": false, "error": serde_json::to_value(&refusal).unwrap()},
            ]})
        );
        let no_id = Response::ok_line(None, &Answer::Watching { watching: true });
        assert_eq!(
            no_id,
            "{\"v\":1,\"ok\":true,\"result\":{\"watching\":true}}\n"
        );
    }
}
