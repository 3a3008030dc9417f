//! Requests as they travel: what the CLI (or any client) writes, and what
//! the daemon deserializes before validating it (`request`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::refusal::{Refusal, RefusalCode};
use super::request::Op;
use super::PROTOCOL_VERSION;
use crate::policy::IdleDirection;

/// A duration: a number of seconds, or text such as "300ms" or "1h30m".
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DurationArg {
    Seconds(f64),
    Text(String),
}

/// Read by its JSON type at once: serde's untagged form buffers the value
/// and builds (and formats) an error for each variant it tries, a cost
/// every grant paid for its `ttl`.
impl<'de> Deserialize<'de> for DurationArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationArg;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of seconds or a duration such as \"300ms\" or \"1h30m\"")
            }
            fn visit_f64<E>(self, v: f64) -> Result<DurationArg, E> {
                Ok(DurationArg::Seconds(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<DurationArg, E> {
                Ok(DurationArg::Seconds(v as f64))
            }
            fn visit_i64<E>(self, v: i64) -> Result<DurationArg, E> {
                Ok(DurationArg::Seconds(v as f64))
            }
            fn visit_str<E>(self, v: &str) -> Result<DurationArg, E> {
                Ok(DurationArg::Text(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<DurationArg, E> {
                Ok(DurationArg::Text(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A network namespace as a request names it: a name under /run/netns, a
/// path to a namespace file, or the pid of a process living in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NetnsRef {
    Pid(u32),
    Text(String),
}

impl NetnsRef {
    /// The namespace file it designates.
    pub fn path(&self) -> std::path::PathBuf {
        match self {
            NetnsRef::Pid(pid) => format!("/proc/{pid}/ns/net").into(),
            NetnsRef::Text(t) if t.starts_with('/') => t.into(),
            NetnsRef::Text(name) => std::path::Path::new("/run/netns").join(name),
        }
    }

    pub(super) fn check(&self, field: &str) -> Result<(), Refusal> {
        match self {
            NetnsRef::Text(t)
                if t.is_empty()
                    || (!t.starts_with('/') && (t.contains('/') || t == "." || t == "..")) =>
            {
                Err(Refusal::new(
                    RefusalCode::BadValue,
                    format!("{field}: {t:?} is neither a namespace name (as in /run/netns) nor an absolute path"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A flow, named by its addresses (from either end's point of view, in the
/// daemon's network namespace unless `netns` says otherwise) or by the index
/// of a socket descriptor sent with the request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetnsRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantArgs {
    pub session: String,
    pub user: String,
    pub target: String,
    /// The policy class; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<DurationArg>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<DurationArg>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_direction: Option<IdleDirection>,
    /// Established flows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flows: Vec<FlowSpec>,
    /// Flows that will be established: tagged the moment they are. A port
    /// of 0 matches any port (the client's ephemeral one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect: Vec<FlowSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendArgs {
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<DurationArg>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouchArgs {
    pub session: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A request on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum WireOp {
    Grant(GrantArgs),
    Extend(ExtendArgs),
    Touch(TouchArgs),
    Revoke(RevokeArgs),
    List(ListArgs),
    Status,
    Watch(ListArgs),
}

impl WireOp {
    pub fn op(&self) -> Op {
        match self {
            WireOp::Grant(_) => Op::Grant,
            WireOp::Extend(_) => Op::Extend,
            WireOp::Touch(_) => Op::Touch,
            WireOp::Revoke(_) => Op::Revoke,
            WireOp::List(_) => Op::List,
            WireOp::Status => Op::Status,
            WireOp::Watch(_) => Op::Watch,
        }
    }

    /// The request line (without the newline).
    pub fn to_line(&self, id: Option<Value>) -> String {
        let mut obj = match self {
            WireOp::Grant(a) => serde_json::to_value(a),
            WireOp::Extend(a) => serde_json::to_value(a),
            WireOp::Touch(a) => serde_json::to_value(a),
            WireOp::Revoke(a) => serde_json::to_value(a),
            WireOp::List(a) | WireOp::Watch(a) => serde_json::to_value(a),
            WireOp::Status => Ok(Value::Object(Map::new())),
        }
        .expect("requests serialize");
        let map = obj.as_object_mut().expect("requests are objects");
        map.insert("v".into(), PROTOCOL_VERSION.into());
        map.insert("op".into(), self.op().name().into());
        if let Some(id) = id {
            map.insert("id".into(), id);
        }
        obj.to_string()
    }
}
