//! `reaper watch`: the daemon's live events, one line each, until
//! interrupted (or the daemon goes away).

#![forbid(unsafe_code)]

use std::io::Write;

use serde_json::Value;

use super::WatchCmd;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::protocol::ListArgs;

pub fn watch(cmd: WatchCmd) -> Result<i32> {
    let selector = ListArgs {
        session: cmd.session,
        user: cmd.user,
        target: None,
    };
    let events = Client::new(&cmd.client.socket, None).watch(selector)?;
    let mut out = std::io::stdout().lock();
    for event in events {
        let (line, event) = event.map_err(Error::io("reading the event stream"))?;
        let printed = if cmd.client.json || event.is_null() {
            line
        } else {
            human(&event)
        };
        // A closed pipe (`reaper watch | head`) ends the watch quietly.
        if writeln!(out, "{printed}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(0);
        }
    }
    eprintln!("reaper: the daemon closed the event stream");
    Ok(1)
}

/// One event as a line for people: time, event, then its fields.
pub(super) fn human(event: &Value) -> String {
    let text = |key: &str| match &event[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut line = format!("{}  {:<8}", text("ts"), text("event"));
    let fields: &[&str] = match event["event"].as_str() {
        Some("kill") => &[
            "reason", "session", "user", "target", "local", "remote", "late_us", "path", "result",
        ],
        Some("grant" | "extend" | "revoke") => &[
            "session",
            "user",
            "target",
            "class",
            "deadline",
            "flows",
            "expecting",
            "by_uid",
        ],
        Some("refusal") => &["op", "code", "by_uid", "message"],
        Some("reload") => &["ok", "error"],
        _ => &["message"],
    };
    for key in fields {
        let value = text(key);
        if !value.is_empty() {
            line += &format!("  {key}={value}");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_kill_reads_as_one_line_with_its_fields() {
        let event = serde_json::json!({
            "schema": 1, "ts": "2026-12-02T06:00:00.000001Z", "event": "kill",
            "reason": "expired", "session": "s1", "user": "alice", "target": "vm-1",
            "local": "127.0.0.1:5900", "remote": "127.0.0.1:40000", "late_us": 312,
            "path": "destroy", "result": "destroyed", "cookie": 7
        });
        assert_eq!(
            super::human(&event),
            "2026-12-02T06:00:00.000001Z  kill      reason=expired  session=s1  user=alice  target=vm-1  local=127.0.0.1:5900  remote=127.0.0.1:40000  late_us=312  path=destroy  result=destroyed"
        );
    }
}
