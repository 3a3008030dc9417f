//! Bad input changes nothing: malformed and unauthorised requests are refused with a
//! specific error, and a live grant is unchanged afterwards.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

use reaper_tests::{read_to_eof, reaper_bin, Conn, Sandbox, SECOND};
use serde_json::{json, Value};

#[test]
fn bad_requests_get_specific_errors_and_change_nothing() {
    let mut sb = Sandbox::new("protocol");
    sb.write_config(
        "socket_mode = \"0666\"\nmax_ttl = \"1d\"\n[[watch]]\nports = \"5900\"\nside = \"local\"\n",
    );
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let mut flow = Conn::connect("127.0.0.1:5900");
    let mut other = Conn::connect("127.0.0.1:5900");
    sb.grant("s1", "alice", "vm-1", "1h", &flow);
    let before = sb.ok(json!({"op": "list"}))["sessions"].clone();

    let live = flow.spec();
    let spare = other.spec();
    let grant = |extra: Value| {
        let mut g = json!({"op": "grant", "session": "s2", "user": "bob", "target": "vm-2",
                           "ttl": "1m", "flows": [spare.clone()]});
        for (k, v) in extra.as_object().unwrap() {
            g[k] = v.clone();
        }
        g.to_string()
    };
    let cases: Vec<(String, &str, &str)> = vec![
        ("this is not json".into(), "bad_json", "not valid JSON"),
        ("[1, 2, 3]".into(), "bad_json", "JSON object"),
        (r#"{"op": "grant"}"#.into(), "bad_request", "missing field"),
        (r#"{"op": "fly"}"#.into(), "unknown_op", "fly"),
        (
            r#"{"v": 9, "op": "status"}"#.into(),
            "unsupported_version",
            "version 9",
        ),
        (
            r#"{"op": "status", "verbose": true}"#.into(),
            "bad_request",
            "unknown field `verbose`",
        ),
        (
            grant(json!({"color": "red"})),
            "bad_request",
            "unknown field `color`",
        ),
        (grant(json!({"ttl": -5})), "bad_value", "negative"),
        (grant(json!({"ttl": "100y"})), "bad_value", "unknown unit"),
        (
            grant(json!({"ttl": 0})),
            "deadline_refused",
            "greater than zero",
        ),
        (
            grant(json!({"ttl": "3650d"})),
            "deadline_refused",
            "max_ttl",
        ),
        (grant(json!({"ttl": 1e300})), "bad_value", "too large"),
        (
            grant(json!({"ttl": null, "expires_at": "2001-01-01T00:00:00Z"})),
            "deadline_refused",
            "not in the future",
        ),
        (
            grant(json!({"ttl": null, "expires_at": "next tuesday"})),
            "bad_value",
            "RFC 3339",
        ),
        (
            grant(json!({"flows": [{"local": "127.0.0.1:5900", "remote": "127.0.0.1:1"}]})),
            "no_such_flow",
            "127.0.0.1:1",
        ),
        (
            grant(json!({"flows": [{"local": "127.0.0.1:5900"}]})),
            "bad_request",
            "flows[0]",
        ),
        (
            grant(json!({"flows": [{"fd": 0}]})),
            "bad_fd",
            "was not passed",
        ),
        (
            grant(json!({"flows": [live.clone()]})),
            "flow_conflict",
            "\"s1\"",
        ),
        (grant(json!({"session": "s1"})), "session_conflict", "alice"),
        (
            grant(json!({"user": "x".repeat(65)})),
            "bad_value",
            "grant.user",
        ),
        (
            json!({"op": "extend", "session": "s1", "ttl": "1s"}).to_string(),
            "deadline_refused",
            "never shortens",
        ),
        (
            json!({"op": "extend", "session": "nope", "ttl": "1h"}).to_string(),
            "no_such_session",
            "nope",
        ),
        (
            json!({"op": "revoke", "session": "nope"}).to_string(),
            "no_such_session",
            "nope",
        ),
        (
            json!({"op": "revoke", "user": "alice", "target": "vm-1"}).to_string(),
            "bad_request",
            "exactly one",
        ),
    ];
    for (line, code, needle) in &cases {
        let r = sb.raw(line);
        assert_eq!(r["ok"], false, "{line} -> {r}");
        assert_eq!(r["error"]["code"], *code, "{line} -> {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{line} -> {msg}");
    }

    // The id of a refused request comes back, so pipelining clients can match.
    let r = sb.raw(r#"{"id": 42, "op": "fly"}"#);
    assert_eq!(r["id"], 42);

    // An oversized line is refused and the connection closed.
    let mut s = UnixStream::connect(&sb.socket).unwrap();
    let _ = s.write_all(&vec![b'a'; 70 * 1024]);
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    let r: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(r["error"]["code"], "line_too_long");
    assert!(reader.buffer().is_empty(), "nothing after the reply");
    let rest = read_to_eof(reader.get_mut(), 10 * SECOND).expect("the connection is closed");
    assert!(rest.is_empty(), "nothing after the reply");

    // A client that sends half a request and vanishes.
    let mut s = UnixStream::connect(&sb.socket).unwrap();
    s.write_all(br#"{"op": "grant", "session": "s1", "us"#)
        .unwrap();
    drop(s);

    // Several requests pipelined on one connection are answered in order.
    let mut s = UnixStream::connect(&sb.socket).unwrap();
    s.write_all(
        b"{\"id\":1,\"op\":\"status\"}\n{\"id\":2,\"op\":\"nope\"}\n{\"id\":3,\"op\":\"list\"}\n",
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    for id in 1..=3 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let r: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(r["id"], id);
    }

    // Unauthorised peer credentials: uid 65534 may connect (mode 0666) but
    // not change grants.
    let out = Command::new(reaper_bin())
        .args(["revoke", "--session", "s1", "--socket"])
        .arg(&sb.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("permission_denied") && stderr.contains("uid 65534"),
        "{stderr}"
    );

    // Bad CLI arguments are refused before anything is sent.
    let out = sb.cli(&[
        "grant",
        "--session",
        "s",
        "--user",
        "u",
        "--target",
        "t",
        "--ttl",
        "5s",
        "--flow",
        "nonsense",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOCAL,REMOTE"));

    // Nothing changed: the live grant is as it was and its flow works.
    let after = sb.ok(json!({"op": "list"}))["sessions"].clone();
    assert_eq!(before[0]["deadline_boot_ns"], after[0]["deadline_boot_ns"]);
    assert_eq!(before[0]["flows"], after[0]["flows"]);
    assert_eq!(after.as_array().unwrap().len(), 1, "{after}");
    flow.echo().unwrap();
    other.echo().unwrap();
    assert!(sb.audit().is_empty(), "nothing may have been killed");
}
