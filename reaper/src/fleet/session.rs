//! Fleet sessions and node records, as stored in etcd: pure, like
//! `record` (whose escaping and name checks they share).
//!
//! Keys, under the configured prefix (docs/fleet.md draws them):
//! * `{prefix}/nodes/{node}`: the node's record (its addresses), under its
//!   node lease; every node watches `{prefix}/nodes/` to learn where an
//!   address lives;
//! * `{prefix}/sessions/{landing}/{origin}/{session}`: the part of a
//!   session granted on node `origin` whose flows land on node `landing`
//!   (their other end is one of its addresses), written by `origin` under
//!   its node lease. A node watches `{prefix}/sessions/{itself}/` and
//!   nothing else of the sessions: only what lands on it concerns it.
//!
//! A session record carries its flows as the landing node sees them
//! (its own address first), so that the landing node looks them up as
//! they are.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::record::{
    bad_for, check_node, escape, read_versioned, unescape, BadRecord, Versioned, VERSION,
};

/// Most flows a session record carries (a console has two or three).
pub const MAX_FLOWS: usize = 64;
/// Most addresses a node record carries.
pub const MAX_ADDRESSES: usize = 64;
/// Longest record read back, in bytes.
const MAX_RECORD: usize = 16 * 1024;

/// A node, as it says in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub v: u32,
    pub node: String,
    /// The reaper version it runs.
    pub version: String,
    /// Where connections to the node arrive: a flow whose far end is one
    /// of these lands on it.
    pub addresses: Vec<IpAddr>,
}

/// One flow of a fleet session, as the landing node sees it: `local` is
/// the landing node's end, `remote` the origin's (port 0: any, for a
/// connection still to come).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFlow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// The part of a session that lands on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSession {
    pub v: u32,
    pub session: String,
    /// The node that granted it (and owns it).
    pub origin: String,
    pub user: String,
    pub target: String,
    pub class: String,
    /// The uid that granted it on the origin.
    pub granted_by_uid: u32,
    pub granted_unix_ns: i64,
    /// Its deadline as a wall-clock instant: every node ends it when its
    /// clock reads this (nodes keep their clocks by NTP).
    pub expires_unix_ns: i64,
    pub flows: Vec<FleetFlow>,
}

pub fn nodes_prefix(prefix: &str) -> String {
    format!("{prefix}/nodes/")
}

/// Where every node's session records live.
pub fn sessions_prefix(prefix: &str) -> String {
    format!("{prefix}/sessions/")
}

/// Where the sessions landing on `node` live.
pub fn landing_prefix(prefix: &str, node: &str) -> String {
    format!("{prefix}/sessions/{node}/")
}

/// The key of the part of `session` (granted on `origin`) that lands on
/// `landing`.
pub fn session_key(prefix: &str, landing: &str, origin: &str, session: &str) -> String {
    format!(
        "{}{origin}/{}",
        landing_prefix(prefix, landing),
        escape(session)
    )
}

fn text_of<'a>(key: &'a [u8], bad: &dyn Fn(String) -> BadRecord) -> Result<&'a str, BadRecord> {
    std::str::from_utf8(key).map_err(|_| bad("the key is not UTF-8".into()))
}

/// Checks a name a record carries (session, user, target, class): 1 to
/// `max` bytes, no control characters, as the protocol checks a grant's.
fn check_name(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() || value.len() > max {
        return Err(format!("{what} must be 1 to {max} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{what} holds control characters"));
    }
    Ok(())
}

impl Versioned for NodeRecord {
    fn version(&self) -> u32 {
        self.v
    }
}

impl Versioned for FleetSession {
    fn version(&self) -> u32 {
        self.v
    }
}

impl NodeRecord {
    pub fn new(node: &str, addresses: Vec<IpAddr>) -> NodeRecord {
        NodeRecord {
            v: VERSION,
            node: node.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            addresses,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("records serialize")
    }

    /// The node a key under `{prefix}/nodes/` names.
    pub fn parse_key(prefix: &str, key: &[u8]) -> Result<String, BadRecord> {
        let bad = bad_for(key);
        let text = text_of(key, &bad)?;
        let node = text
            .strip_prefix(&nodes_prefix(prefix))
            .ok_or_else(|| bad(format!("not under {}", nodes_prefix(prefix))))?;
        check_node(node).map_err(&bad)?;
        Ok(node.to_owned())
    }

    pub fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Result<NodeRecord, BadRecord> {
        let bad = bad_for(key);
        let node = NodeRecord::parse_key(prefix, key)?;
        let record: NodeRecord = read_versioned(key, value, "node", MAX_RECORD)?;
        if record.node != node {
            return Err(bad(format!(
                "the record is node {:?}'s, its key {node:?}'s",
                record.node
            )));
        }
        if record.addresses.len() > MAX_ADDRESSES {
            return Err(bad(format!(
                "{} addresses, more than {MAX_ADDRESSES}",
                record.addresses.len()
            )));
        }
        Ok(record)
    }
}

impl FleetSession {
    /// The node a key under `{prefix}/sessions/` lands on.
    pub fn landing_of(prefix: &str, key: &[u8]) -> Option<String> {
        let rest = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&sessions_prefix(prefix))?;
        let (landing, _) = rest.split_once('/')?;
        check_node(landing).ok()?;
        Some(landing.to_owned())
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("records serialize")
    }

    /// The (origin, session) a key under `{prefix}/sessions/{landing}/`
    /// names.
    pub fn parse_key(
        prefix: &str,
        landing: &str,
        key: &[u8],
    ) -> Result<(String, String), BadRecord> {
        let bad = bad_for(key);
        let text = text_of(key, &bad)?;
        let under = landing_prefix(prefix, landing);
        let rest = text
            .strip_prefix(&under)
            .ok_or_else(|| bad(format!("not under {under}")))?;
        let (origin, session) = rest
            .split_once('/')
            .ok_or_else(|| bad("the key names no origin/session".into()))?;
        check_node(origin).map_err(|e| bad(format!("origin: {e}")))?;
        let session = unescape(session)
            .ok_or_else(|| bad(format!("session {session:?} is badly escaped")))?;
        check_name("session", &session, reaper_common::SESSION_NAME_MAX).map_err(&bad)?;
        Ok((origin.to_owned(), session))
    }

    /// Reads a record stored under `key`, landing on `landing`: the key
    /// and the record must agree, every name must be one a grant may
    /// carry, and every flow must land on `landing`'s side.
    pub fn decode(
        prefix: &str,
        landing: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<FleetSession, BadRecord> {
        let bad = bad_for(key);
        let (origin, session) = FleetSession::parse_key(prefix, landing, key)?;
        let record: FleetSession = read_versioned(key, value, "session", MAX_RECORD)?;
        if record.origin != origin || record.session != session {
            return Err(bad(format!(
                "the record is session {:?} of node {:?}, its key {session:?} of {origin:?}",
                record.session, record.origin
            )));
        }
        if origin == landing {
            return Err(bad("a node's session cannot land on itself".into()));
        }
        use reaper_common::{CLASS_NAME_MAX, TARGET_NAME_MAX, USER_NAME_MAX};
        check_name("user", &record.user, USER_NAME_MAX).map_err(&bad)?;
        check_name("target", &record.target, TARGET_NAME_MAX).map_err(&bad)?;
        check_name("class", &record.class, CLASS_NAME_MAX).map_err(&bad)?;
        if record.expires_unix_ns <= 0 || record.granted_unix_ns <= 0 {
            return Err(bad(
                "expires_unix_ns and granted_unix_ns must be times".into()
            ));
        }
        if record.flows.is_empty() || record.flows.len() > MAX_FLOWS {
            return Err(bad(format!(
                "{} flows (a record carries 1 to {MAX_FLOWS})",
                record.flows.len()
            )));
        }
        if let Some(f) = record.flows.iter().find(|f| f.local.port() == 0) {
            return Err(bad(format!(
                "flow {} <-> {}: the landing node's port must be named",
                f.local, f.remote
            )));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/reaper";

    fn session() -> FleetSession {
        FleetSession {
            v: VERSION,
            session: "tok/1".into(),
            origin: "ctl-1".into(),
            user: "alice".into(),
            target: "vm-7".into(),
            class: "console".into(),
            granted_by_uid: 1000,
            granted_unix_ns: 1,
            expires_unix_ns: 2,
            flows: vec![FleetFlow {
                local: "198.18.2.2:5900".parse().unwrap(),
                remote: "198.18.1.2:40000".parse().unwrap(),
            }],
        }
    }

    #[test]
    fn records_read_back_as_written() {
        let s = session();
        let key = session_key(P, "cmp-2", &s.origin, &s.session);
        assert_eq!(key, "/reaper/sessions/cmp-2/ctl-1/tok%2F1");
        assert_eq!(
            FleetSession::decode(P, "cmp-2", key.as_bytes(), s.encode().as_bytes()),
            Ok(s)
        );
        let n = NodeRecord::new("cmp-2", vec!["198.18.2.2".parse().unwrap()]);
        let key = format!("{}cmp-2", nodes_prefix(P));
        assert_eq!(
            NodeRecord::decode(P, key.as_bytes(), n.encode().as_bytes()),
            Ok(n)
        );
    }

    #[test]
    fn bad_session_records_are_refused_naming_what_is_wrong() {
        let good = session();
        let key = session_key(P, "cmp-2", "ctl-1", "tok/1");
        let with = |f: &dyn Fn(&mut FleetSession)| {
            let mut s = good.clone();
            f(&mut s);
            s.encode()
        };
        let cases: Vec<(String, String, &str)> = vec![
            (key.clone(), "[".into(), "not a session record"),
            (key.clone(), with(&|s| s.v = 9), "record version 9"),
            (key.clone(), with(&|s| s.origin = "ctl-2".into()), "its key"),
            (
                session_key(P, "cmp-2", "cmp-2", "tok/1"),
                with(&|s| s.origin = "cmp-2".into()),
                "land on itself",
            ),
            (
                key.clone(),
                with(&|s| s.user = String::new()),
                "user must be",
            ),
            (key.clone(), with(&|s| s.class = "a\u{7}".into()), "control"),
            (
                key.clone(),
                with(&|s| s.expires_unix_ns = 0),
                "must be times",
            ),
            (key.clone(), with(&|s| s.flows.clear()), "0 flows"),
            (
                key.clone(),
                with(&|s| s.flows[0].local.set_port(0)),
                "port must be named",
            ),
            (
                "/reaper/sessions/cmp-3/ctl-1/tok%2F1".into(),
                good.encode(),
                "not under",
            ),
            (
                "/reaper/sessions/cmp-2/ctl 1/x".into(),
                good.encode(),
                "origin",
            ),
            (
                key.clone(),
                good.encode().replace("}", ",\"extra\":1}"),
                "unknown field",
            ),
        ];
        for (key, value, expect) in cases {
            let err =
                FleetSession::decode(P, "cmp-2", key.as_bytes(), value.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(expect), "{key} {value}: {err}");
            assert!(err.to_string().contains(&key), "names the key: {err}");
        }
    }

    #[test]
    fn bad_node_records_are_refused() {
        let n = NodeRecord::new("cmp-2", vec![]);
        let other = format!("{}cmp-3", nodes_prefix(P));
        let err = NodeRecord::decode(P, other.as_bytes(), n.encode().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("its key"), "{err}");
        let key = format!("{}cmp-2", nodes_prefix(P));
        let err = NodeRecord::decode(P, key.as_bytes(), b"{}").unwrap_err();
        assert!(err.to_string().contains("not a node record"), "{err}");
    }
}
