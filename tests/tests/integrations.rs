//! The integrations of docs/integrations.md against the real software:
//! websockify from PyPI run through `python3 -m reaper_client.websockify`
//! (the Python client package, clients/python), as an operator would.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::ChildStdout;

use reaper_tests::{boot_ns, bound_ms, python, wait_listening, Sandbox, SECOND};
use serde_json::{json, Value};

const CONSOLE: &str = "198.18.0.2:5900";

/// A websocket client (tests/scripts/ws_client.py) through the proxy with
/// `token`; returns its output once the round trip worked.
fn ws_client(sb: &mut Sandbox, token: &str) -> BufReader<ChildStdout> {
    let mut out = BufReader::new(
        sb.spawn(
            python()
                .arg(reaper_tests::script("ws_client.py"))
                .arg(format!("ws://127.0.0.1:6080/?token={token}")),
        ),
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "echo ping",
        "round trip through websockify ({token})"
    );
    out
}

/// The session `name` as listed, once both its sockets are in.
fn session(sb: &Sandbox, name: &str) -> Value {
    let listed = sb.ok(json!({"op": "list", "session": name}));
    let s = listed["sessions"][0].clone();
    assert_eq!(s["flows"].as_array().map(Vec::len), Some(2), "{listed}");
    s
}

/// The proxy's upstream address: what the console sees as its client.
fn upstream_of(session: &Value) -> SocketAddr {
    let flows = session["flows"].as_array().unwrap();
    let upstream = flows
        .iter()
        .find(|f| f["remote"] == CONSOLE)
        .unwrap_or_else(|| panic!("no flow to the console: {session}"));
    upstream["local"].as_str().unwrap().parse().unwrap()
}

fn ended(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

#[test]
fn websockify_consoles_end_at_the_token_expiry_unless_extended() {
    let mut sb = Sandbox::new("integrations-websockify");
    sb.write_config(
        "[[watch]]\nports = \"6080\"\nside = \"local\"\n[[watch]]\nports = \"5900\"\nside = \"remote\"\n",
    );
    sb.start_daemon();
    let host = sb.other_host();
    let console = sb.peer_on(&host, &[CONSOLE]);
    let tokens = sb.dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("tok-a: {CONSOLE}\ntok-b: {CONSOLE}\ntok-c: {CONSOLE}\n"),
    )
    .unwrap();
    // Every token expires at one wall-clock instant, as Nova's do: late
    // enough for websockify to start and both consoles to connect.
    let expiry_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + reaper_tests::bound(6 * SECOND).as_secs_f64();
    let socket = sb.socket.display().to_string();
    let _proxy = sb.spawn(python().args([
        "-m",
        "reaper_client.websockify",
        "--reaper-socket",
        &socket,
        "--reaper-user",
        "erin",
        "--reaper-expires-at",
        &format!("@{expiry_unix}"),
        "--",
        "--token-plugin",
        "TokenFile",
        "--token-source",
        &tokens.display().to_string(),
        "127.0.0.1:6080",
    ]));
    assert!(
        wait_listening(6080, 20 * SECOND),
        "websockify did not start"
    );

    let mut a = ws_client(&mut sb, "tok-a");
    let mut b = ws_client(&mut sb, "tok-b");
    let mut c = ws_client(&mut sb, "tok-c");
    let sa = session(&sb, "tok-a");
    assert_eq!(
        (sa["user"].as_str(), sa["target"].as_str()),
        (Some("erin"), Some(CONSOLE))
    );
    let deadline = sa["deadline_boot_ns"].as_u64().unwrap();
    let (up_a, up_b, up_c) = (
        upstream_of(&sa),
        upstream_of(&session(&sb, "tok-b")),
        upstream_of(&session(&sb, "tok-c")),
    );

    // The portal refreshes the tokens of b and c: extended through the
    // client package, over one connection.
    let extended = python()
        .args([
            "-c",
            "import sys; from reaper_client import Client\n\
             with Client(sys.argv[1]) as c:\n    for s in ('tok-b', 'tok-c'): c.extend(s, ttl='1h')",
            &socket,
        ])
        .output()
        .unwrap();
    assert!(
        extended.status.success(),
        "{}",
        String::from_utf8_lossy(&extended.stderr)
    );
    assert!(
        boot_ns() < deadline,
        "the setup took past the token's expiry"
    );

    // At the expiry tok-a's console ends at both ends; tok-b's lives on.
    let how = ended(&mut a);
    let closed_at = boot_ns();
    assert!(how.starts_with("closed "), "{how}");
    let late_ms = (closed_at as f64 - deadline as f64) / 1e6;
    println!("websockify: tok-a's websocket {how} {late_ms:.1} ms after the token expired");
    assert!(closed_at >= deadline && late_ms < bound_ms(200.0));
    let end = sb.peer_mut(console).wait_end(up_a, 5 * SECOND);
    assert_eq!(end.as_deref(), Some("reset"), "the console's end of tok-a");
    assert_eq!(
        sb.peer_mut(console).wait_end(up_b, SECOND / 2),
        None,
        "tok-b lives"
    );
    let listed = sb.ok(json!({"op": "list", "session": "tok-b"}));
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 1, "{listed}");

    // `revoke --target`: every connection to the instance ends.
    let revoked = sb.cli(&["revoke", "--target", CONSOLE]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    for (name, out, up) in [("tok-b", &mut b, up_b), ("tok-c", &mut c, up_c)] {
        let how = ended(out);
        assert!(how.starts_with("closed "), "{name}: {how}");
        let end = sb.peer_mut(console).wait_end(up, 5 * SECOND);
        assert_eq!(end.as_deref(), Some("reset"), "the console's end of {name}");
    }
    let reasons: Vec<(String, String)> = sb
        .wait_audit(6, 5 * SECOND)
        .iter()
        .map(|e| {
            (
                e["session"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (name, reason) in [
        ("tok-a", "expired"),
        ("tok-b", "revoked"),
        ("tok-c", "revoked"),
    ] {
        assert_eq!(
            reasons
                .iter()
                .filter(|(s, r)| s == name && r == reason)
                .count(),
            2,
            "{name} {reason}: {reasons:?}"
        );
    }
}

/// A grant the daemon refuses ends the proxied connection before any byte
/// is relayed: the integration fails closed.
#[test]
fn websockify_fails_closed_when_the_grant_is_refused() {
    let mut sb = Sandbox::new("integrations-websockify-refused");
    // 6080 is not watched: the client's socket is not tracked, the grant
    // is refused flow_not_tracked.
    sb.write_config("[[watch]]\nports = \"5900\"\nside = \"remote\"\n");
    sb.start_daemon();
    let host = sb.other_host();
    sb.peer_on(&host, &[CONSOLE]);
    let tokens = sb.dir.join("tokens");
    std::fs::write(&tokens, format!("tok-x: {CONSOLE}\n")).unwrap();
    let socket = sb.socket.display().to_string();
    let _proxy = sb.spawn(python().args([
        "-m",
        "reaper_client.websockify",
        "--reaper-socket",
        &socket,
        "--reaper-ttl",
        "1h",
        "--",
        "--token-plugin",
        "TokenFile",
        "--token-source",
        &tokens.display().to_string(),
        "127.0.0.1:6080",
    ]));
    assert!(
        wait_listening(6080, 20 * SECOND),
        "websockify did not start"
    );
    let mut out = BufReader::new(
        sb.spawn(
            python()
                .arg(reaper_tests::script("ws_client.py"))
                .arg("ws://127.0.0.1:6080/?token=tok-x"),
        ),
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        !line.starts_with("echo"),
        "relayed although refused: {line:?}"
    );
    let listed = sb.ok(json!({"op": "list"}));
    assert_eq!(listed["sessions"], json!([]), "{listed}");
}
