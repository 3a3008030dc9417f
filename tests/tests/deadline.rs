//! Issue 2, tests 1, 2 and 6: a granted flow dies at its deadline, `extend`
//! postpones that, `revoke` kills at once and only what it names, and IPv6
//! behaves like IPv4.

use reaper_tests::{assert_reset, boot_ns, sleep_until_boot, Flow, Sandbox, SECOND};
use serde_json::json;

fn killed_at_deadline(name: &str, listen: &str) {
    let mut sb = Sandbox::new(name);
    sb.start_daemon();
    let peer = sb.peer(&[listen]);
    let mut flow = Flow::connect(listen);
    flow.echo().unwrap();

    let granted = sb.grant("s1", "alice", "vm-1", "300ms", &flow);
    let deadline = granted["session"]["deadline_boot_ns"].as_u64().unwrap();
    assert_eq!(
        granted["session"]["flows"].as_array().unwrap().len(),
        1,
        "{granted}"
    );
    let (err, seen_at) = flow.wait_reset(5 * SECOND);
    assert_reset(&err);
    assert!(seen_at >= deadline, "reset before the deadline");
    let late_ms = (seen_at - deadline) as f64 / 1e6;
    println!("{listen}: client saw the reset {late_ms:.3} ms after the deadline");
    assert!(late_ms < 50.0, "reset {late_ms} ms late");

    // The server side was destroyed (ECONNABORTED), not merely reset.
    let how = sb.peer_mut(peer).wait_end(flow.client, 5 * SECOND);
    assert_eq!(how.as_deref(), Some("aborted"));

    let events = sb.wait_audit(1, 5 * SECOND);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e["reason"].as_str(), e["session"].as_str()),
        (Some("expired"), Some("s1"))
    );
    assert_eq!(
        (e["user"].as_str(), e["target"].as_str()),
        (Some("alice"), Some("vm-1"))
    );
    assert_eq!(e["remote"], flow.client.to_string());
    assert_eq!(e["result"], "destroyed");
    let late_us = e["late_us"].as_u64().unwrap();
    println!("{listen}: audit reports the kill {late_us} us after the deadline");
    assert!(late_us < 50_000);
}

/// Test 1.
#[test]
fn granted_flow_is_reset_at_its_deadline() {
    killed_at_deadline("deadline-v4", "127.0.0.1:5900");
}

/// Test 6.
#[test]
fn ipv6_flow_is_reset_at_its_deadline() {
    killed_at_deadline("deadline-v6", "[::1]:5900");
}

/// Test 2, first half: extend postpones, revoke kills now.
#[test]
fn extend_postpones_and_revoke_kills_at_once() {
    let mut sb = Sandbox::new("extend-revoke");
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let mut flow = Flow::connect("127.0.0.1:5900");

    let first = sb.grant("s1", "alice", "vm-1", "600ms", &flow)["session"]["deadline_boot_ns"]
        .as_u64()
        .unwrap();
    let extended = sb.ok(json!({"op": "extend", "session": "s1", "ttl": "30s"}));
    assert!(extended["session"]["deadline_boot_ns"].as_u64().unwrap() > first + 20_000_000_000);

    // Well past the first deadline the flow still works both ways.
    sleep_until_boot(first + 300_000_000);
    flow.echo()
        .expect("extended flow must outlive its first deadline");
    assert!(sb.audit().is_empty());

    let asked = boot_ns();
    let revoked = sb.ok(json!({"op": "revoke", "session": "s1"}));
    assert_eq!(revoked["sessions"], json!(["s1"]));
    assert_eq!(revoked["kills"][0]["result"], "destroyed");
    let (err, seen_at) = flow.wait_reset(2 * SECOND);
    assert_reset(&err);
    println!("revoke to reset: {:.3} ms", (seen_at - asked) as f64 / 1e6);
    let events = sb.wait_audit(1, 5 * SECOND);
    assert_eq!(events[0]["reason"], "revoked");
    let listed = sb.ok(json!({"op": "list"}));
    assert_eq!(listed["sessions"], json!([]));
}

/// Test 2, second half: revoking a user kills all of that user's flows
/// (a session may hold several) and nothing else.
#[test]
fn revoking_a_user_kills_only_that_users_flows() {
    let mut sb = Sandbox::new("revoke-user");
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let mut alice1 = Flow::connect("127.0.0.1:5900");
    let mut alice2a = Flow::connect("127.0.0.1:5900");
    let mut alice2b = Flow::connect("127.0.0.1:5900");
    let mut bob = Flow::connect("127.0.0.1:5900");
    let mut ungranted = Flow::connect("127.0.0.1:5900");
    for f in [
        &mut alice1,
        &mut alice2a,
        &mut alice2b,
        &mut bob,
        &mut ungranted,
    ] {
        f.echo().unwrap();
    }
    sb.grant("a1", "alice", "vm-1", "60s", &alice1);
    // One session, two flows, one request (a proxy's client and upstream sockets).
    sb.ok(
        json!({"op": "grant", "session": "a2", "user": "alice", "target": "vm-2", "ttl": "60s",
                 "flows": [alice2a.spec(), alice2b.spec()]}),
    );
    sb.grant("b1", "bob", "vm-1", "60s", &bob);

    let out = sb.cli(&["revoke", "--user", "alice", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["result"]["sessions"], json!(["a1", "a2"]));
    assert_eq!(reply["result"]["kills"].as_array().unwrap().len(), 3);

    for f in [&mut alice1, &mut alice2a, &mut alice2b] {
        let (err, _) = f.wait_reset(2 * SECOND);
        assert_reset(&err);
    }
    bob.echo().expect("bob's flow must survive");
    ungranted.echo().expect("an ungranted flow must survive");
    let listed = sb.ok(json!({"op": "list"}));
    let names: Vec<&str> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b1"]);
    assert_eq!(sb.wait_audit(3, 5 * SECOND).len(), 3);
}
