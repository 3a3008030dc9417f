//! What reaper keeps in etcd, and how a record is read back: the key
//! layout and the revocation record, pure (no etcd here), so that every
//! rule about a record is unit-tested and the one piece of code that
//! writes a record is the one that reads it.
//!
//! Keys, under the configured prefix (docs/fleet.md draws them):
//! * `{prefix}/nodes/{node}`: a node's liveness, under its node lease;
//! * `{prefix}/revocations/{selector}/{value}`: one standing revocation
//!   (selector `session`, `user`, `target` or `class`; the value escaped,
//!   see [`escape`]), under a lease as long as the longest session.
//!
//! Every node watches `{prefix}/revocations/`: a revocation concerns every
//! node. Sessions and node records are `session`'s.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// The record format; a node refuses records of another version.
pub const VERSION: u32 = 1;

/// Longest value of a selector (the protocol's limit on names).
pub const MAX_VALUE: usize = 256;

/// Longest node name.
pub const MAX_NODE: usize = 64;

/// What a revocation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selector {
    Session,
    User,
    Target,
    Class,
}

impl Selector {
    pub const ALL: [Selector; 4] = [
        Selector::Session,
        Selector::User,
        Selector::Target,
        Selector::Class,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Selector::Session => "session",
            Selector::User => "user",
            Selector::Target => "target",
            Selector::Class => "class",
        }
    }

    fn parse(text: &str) -> Option<Selector> {
        Selector::ALL.into_iter().find(|s| s.name() == text)
    }

    /// Whether the revocation is also a lock: while it stands, no node
    /// grants a new session that matches (as Teleport's `tctl lock`). A
    /// user or a target is locked out; a session name or a class is ended
    /// once (its sessions granted before the revocation die, later grants
    /// stand), since a class or a reused session name is not a culprit.
    pub fn locks(self) -> bool {
        matches!(self, Selector::User | Selector::Target)
    }
}

/// One standing revocation, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub v: u32,
    pub selector: Selector,
    pub value: String,
    /// The node (or the host of the CLI) that asked.
    pub by_node: String,
    /// The uid that asked there.
    pub by_uid: u32,
    /// When it was asked, Unix nanoseconds: sessions granted before it
    /// die; for a lock, every matching session dies.
    pub at_unix_ns: i64,
}

/// Why a stored record was refused: what is wrong, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fleet record {key}: {why}")]
pub struct BadRecord {
    pub key: String,
    pub why: String,
}

/// A stored record's format version (`v`).
pub(super) trait Versioned {
    fn version(&self) -> u32;
}

/// The refusal of the record stored under `key`, for `why`.
pub(super) fn bad_for(key: &[u8]) -> impl Fn(String) -> BadRecord + '_ {
    move |why| BadRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        why,
    }
}

/// Reads the `what` record stored under `key`: at most `max` bytes of
/// JSON, of the version this reaper reads. Every record's decoding starts
/// here; what the key and the fields must say is each record's own.
pub(super) fn read_versioned<T: serde::de::DeserializeOwned + Versioned>(
    key: &[u8],
    value: &[u8],
    what: &str,
    max: usize,
) -> Result<T, BadRecord> {
    let bad = bad_for(key);
    if value.len() > max {
        return Err(bad(format!(
            "{} bytes, more than a record holds",
            value.len()
        )));
    }
    let record: T =
        serde_json::from_slice(value).map_err(|e| bad(format!("not a {what} record: {e}")))?;
    if record.version() != VERSION {
        return Err(bad(format!(
            "record version {} (this reaper reads version {VERSION})",
            record.version()
        )));
    }
    Ok(record)
}

/// The prefix every key lives under, normalised: starts with `/`, no
/// trailing `/`.
pub fn normalise_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_end_matches('/');
    if !trimmed.starts_with('/') || trimmed.len() < 2 {
        return Err(format!(
            "prefix {prefix:?} must start with / and name something (e.g. \"/reaper\")"
        ));
    }
    if trimmed.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!(
            "prefix {prefix:?} holds spaces or control characters"
        ));
    }
    Ok(trimmed.to_owned())
}

/// Checks a node name: 1-64 bytes of `[A-Za-z0-9._-]` (a host name).
pub fn check_node(node: &str) -> Result<(), String> {
    if node.is_empty() || node.len() > MAX_NODE {
        return Err(format!("node name {node:?} must be 1 to {MAX_NODE} bytes"));
    }
    if !node
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "node name {node:?} may hold only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Where the revocations live: `{prefix}/revocations/`.
pub fn revocations_prefix(prefix: &str) -> String {
    format!("{prefix}/revocations/")
}

/// The key of the revocation of `value` by `selector`.
pub fn revocation_key(prefix: &str, selector: Selector, value: &str) -> String {
    format!(
        "{}{}/{}",
        revocations_prefix(prefix),
        selector.name(),
        escape(value)
    )
}

/// The key of a node's liveness record.
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{}{node}", super::session::nodes_prefix(prefix))
}

/// Percent-escapes every byte of `value` outside `[A-Za-z0-9._~@:+-]`,
/// so that a value holding `/` stays one path segment.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"._~@:+-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(super) fn unescape(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Checks a selector's value as a grant's names are checked: 1-256 bytes,
/// no control characters.
pub fn check_value(selector: Selector, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_VALUE {
        return Err(format!(
            "{} must be 1 to {MAX_VALUE} bytes",
            selector.name()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{} holds control characters", selector.name()));
    }
    Ok(())
}

impl Versioned for Revocation {
    fn version(&self) -> u32 {
        self.v
    }
}

impl Revocation {
    pub fn new(
        selector: Selector,
        value: &str,
        by_node: &str,
        by_uid: u32,
        at_unix_ns: i64,
    ) -> Revocation {
        Revocation {
            v: VERSION,
            selector,
            value: value.to_owned(),
            by_node: by_node.to_owned(),
            by_uid,
            at_unix_ns,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("records serialize")
    }

    /// Reads a record stored under `key` (below `prefix`): the key and the
    /// record must agree, and every field must be one a node would write.
    pub fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Result<Revocation, BadRecord> {
        let bad = bad_for(key);
        let (selector, value_in_key) = parse_revocation_key(prefix, key).map_err(&bad)?;
        let record: Revocation = read_versioned(key, value, "revocation", 4096)?;
        if record.selector != selector || record.value != value_in_key {
            return Err(bad(format!(
                "the record revokes {} {:?}, its key {} {:?}",
                record.selector.name(),
                record.value,
                selector.name(),
                value_in_key
            )));
        }
        check_value(selector, &record.value).map_err(&bad)?;
        check_node(&record.by_node).map_err(|e| bad(format!("by_node: {e}")))?;
        if record.at_unix_ns <= 0 {
            return Err(bad(format!(
                "at_unix_ns {} is not a time",
                record.at_unix_ns
            )));
        }
        Ok(record)
    }
}

/// The selector and value a revocation key names.
pub fn parse_revocation_key(prefix: &str, key: &[u8]) -> Result<(Selector, String), String> {
    let key = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_owned())?;
    let rest = key
        .strip_prefix(&revocations_prefix(prefix))
        .ok_or_else(|| format!("not under {}", revocations_prefix(prefix)))?;
    let (selector, value) = rest
        .split_once('/')
        .ok_or_else(|| "the key names no selector/value".to_owned())?;
    let selector = Selector::parse(selector)
        .ok_or_else(|| format!("unknown selector {selector:?} (session, user, target or class)"))?;
    let value = unescape(value).ok_or_else(|| format!("value {value:?} is badly escaped"))?;
    check_value(selector, &value)?;
    Ok((selector, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/reaper";

    #[test]
    fn a_record_reads_back_as_written() {
        let r = Revocation::new(Selector::User, "alice/ops team", "node-c", 0, 42);
        let key = revocation_key(P, r.selector, &r.value);
        assert_eq!(key, "/reaper/revocations/user/alice%2Fops%20team");
        assert_eq!(
            Revocation::decode(P, key.as_bytes(), r.encode().as_bytes()),
            Ok(r)
        );
    }

    #[test]
    fn bad_records_are_refused_naming_what_is_wrong() {
        let good = Revocation::new(Selector::User, "alice", "c", 0, 42);
        let key = revocation_key(P, Selector::User, "alice");
        let cases: Vec<(String, String, &str)> = vec![
            (key.clone(), "{".into(), "not a revocation record"),
            (
                key.clone(),
                good.encode().replace("\"v\":1", "\"v\":2"),
                "record version 2",
            ),
            (
                revocation_key(P, Selector::User, "bob"),
                good.encode(),
                "its key user \"bob\"",
            ),
            (
                "/reaper/revocations/host/alice".into(),
                good.encode(),
                "unknown selector \"host\"",
            ),
            (
                "/reaper/revocations/user/a%zz".into(),
                good.encode(),
                "badly escaped",
            ),
            (
                "/other/revocations/user/alice".into(),
                good.encode(),
                "not under",
            ),
            (
                key.clone(),
                good.encode().replace("\"c\"", "\"c d\""),
                "by_node",
            ),
            (
                key.clone(),
                good.encode()
                    .replace("\"at_unix_ns\":42", "\"at_unix_ns\":0"),
                "not a time",
            ),
            (
                key.clone(),
                good.encode().replace("}", ",\"extra\":1}"),
                "unknown field",
            ),
        ];
        for (key, value, expect) in cases {
            let err = Revocation::decode(P, key.as_bytes(), value.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(expect), "{key} {value}: {err}");
            assert!(err.to_string().contains(&key), "names the key: {err}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(normalise_prefix("/reaper/").unwrap(), "/reaper");
        assert!(normalise_prefix("reaper").is_err());
        assert!(normalise_prefix("/").is_err());
        assert!(check_node("compute-1.example").is_ok());
        assert!(check_node("").is_err());
        assert!(check_node("a/b").is_err());
        assert!(check_value(Selector::User, "").is_err());
        assert!(check_value(Selector::User, "a\nb").is_err());
        assert!(check_value(Selector::User, &"x".repeat(257)).is_err());
    }

    #[test]
    fn only_users_and_targets_are_locked() {
        let locked: Vec<_> = Selector::ALL.into_iter().filter(|s| s.locks()).collect();
        assert_eq!(locked, [Selector::User, Selector::Target]);
    }
}
