//! `reaper watch`: the daemon's live events, one line each, until
//! interrupted (or the daemon goes away).

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use super::WatchCmd;
use crate::error::{Error, Result};
use crate::protocol::{ListArgs, Response, WireOp};

/// Opens a watch: the request sent and its answer read. The stream's
/// lines follow on the returned reader.
pub(super) fn open(socket: &Path, selector: ListArgs) -> Result<BufReader<UnixStream>> {
    let mut stream = super::connect(socket)?;
    let line = WireOp::Watch(selector).to_line(None) + "\n";
    stream
        .write_all(line.as_bytes())
        .map_err(Error::io("sending the watch request"))?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .map_err(Error::io("reading the watch answer"))?;
    let response: Response = serde_json::from_str(&reply).map_err(|e| {
        Error::Setup(format!(
            "the daemon sent an unreadable response ({e}): {reply:?}"
        ))
    })?;
    if let Some(err) = response.error {
        return Err(Error::Setup(format!("{}: {}", err.code, err.message)));
    }
    Ok(reader)
}

pub fn watch(cmd: WatchCmd) -> Result<i32> {
    let selector = ListArgs {
        session: cmd.session,
        user: cmd.user,
        target: None,
    };
    let reader = open(&cmd.client.socket, selector)?;
    let mut out = std::io::stdout().lock();
    for line in reader.lines() {
        let line = line.map_err(Error::io("reading the event stream"))?;
        let printed = if cmd.client.json {
            line
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(event) => human(&event),
                Err(_) => line,
            }
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
