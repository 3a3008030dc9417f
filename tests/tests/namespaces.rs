//! Other network namespaces: a granted flow whose socket lives in another network
//! namespace than the daemon's (a proxy in a container) is killed at its
//! deadline, and both peers see a reset.

use reaper_tests::{assert_reset, bound_ms, Conn, Sandbox, SECOND};
use serde_json::json;

#[test]
fn flow_in_another_namespace_is_killed_on_time() {
    let mut sb = Sandbox::new("netns");
    sb.start_daemon();
    // The server runs in its own namespace, reached over veth.
    let host = sb.other_host();
    let server = sb.peer_on(&host, &["198.18.0.2:5900"]);
    let server_pid = sb.peer_mut(server).pid();
    let mut by_name = Conn::connect("198.18.0.2:5900");
    let mut by_pid = Conn::connect("198.18.0.2:5900");
    by_name.echo().unwrap();
    by_pid.echo().unwrap();

    // Not in the daemon's namespace: without naming it, there is no such flow.
    let r = sb.request(
        json!({"op": "grant", "session": "s0", "user": "u", "target": "t",
                              "ttl": "60s", "flows": [by_name.spec()]}),
    );
    assert_eq!(r["error"]["code"], "no_such_flow", "{r}");

    // Named by its /run/netns name (CLI) and by a process's pid (protocol).
    let flow_arg = format!("{},{}", by_name.server, by_name.client);
    let out = sb.cli(&[
        "grant",
        "--json",
        "--session",
        "s1",
        "--user",
        "alice",
        "--target",
        "vm-1",
        "--ttl",
        "400ms",
        "--netns",
        &host,
        "--flow",
        &flow_arg,
    ]);
    let granted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(granted["ok"], true, "{granted}");
    let deadline = granted["result"]["session"]["deadline_boot_ns"]
        .as_u64()
        .unwrap();
    let mut spec = by_pid.spec();
    spec["netns"] = json!(server_pid);
    sb.ok(
        json!({"op": "grant", "session": "s2", "user": "bob", "target": "vm-2",
                 "ttl": "60s", "flows": [spec]}),
    );
    assert_eq!(sb.ok(json!({"op": "status"}))["namespaces"], 1);

    let (err, seen_at) = by_name.wait_reset(5 * SECOND);
    assert_reset(&err);
    let late_ms = (seen_at as f64 - deadline as f64) / 1e6;
    println!("flow in another namespace: client reset {late_ms:.3} ms after the deadline");
    assert!(seen_at >= deadline && late_ms < bound_ms(50.0));
    let end = sb.peer_mut(server).wait_end(by_name.client, 5 * SECOND);
    assert_eq!(
        end.as_deref(),
        Some("aborted"),
        "the server's own socket was destroyed"
    );
    by_pid
        .echo()
        .expect("the other session in that namespace is untouched");

    sb.ok(json!({"op": "revoke", "session": "s2"}));
    let (err, _) = by_pid.wait_reset(5 * SECOND);
    assert_reset(&err);
    let events = sb.wait_audit(2, 5 * SECOND);
    assert_eq!(events.len(), 2);
    assert!(
        events.iter().all(|e| e["result"] == "destroyed"),
        "{events:?}"
    );
    // No flow is left there: the daemon lets go of the namespace.
    let end = std::time::Instant::now() + 5 * SECOND;
    while sb.ok(json!({"op": "status"}))["namespaces"] != 0 && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(sb.ok(json!({"op": "status"}))["namespaces"], 0);
}
