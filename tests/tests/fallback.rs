//! Without SOCK_DESTROY: with socket destroy switched off (as on a kernel without
//! CONFIG_INET_DIAG_DESTROY), a local flow dies the same way through RST +
//! drop: a RST with the exact sequence number to each end.

use reaper_tests::{assert_reset, bound_ms, Conn, Sandbox, SECOND};
use serde_json::json;

#[test]
fn rst_and_drop_kill_local_flows_when_destroy_is_off() {
    let mut sb = Sandbox::new("fallback");
    sb.write_config("socket_destroy = false\n[[watch]]\nports = \"5900-5901\"\nside = \"local\"\n");
    sb.start_daemon();
    assert_eq!(sb.ok(json!({"op": "status"}))["kill_path"], "rst");
    // 5901 streams "screen updates": the server has data in flight when it dies.
    let peer = sb.peer(&["127.0.0.1:5900", "[::1]:5900", "stream:127.0.0.1:5901"]);
    let mut flows = [
        Conn::connect("127.0.0.1:5900"),
        Conn::connect("[::1]:5900"),
        Conn::connect("127.0.0.1:5901"),
    ];
    for (i, f) in flows.iter_mut().enumerate() {
        if i < 2 {
            f.echo().unwrap();
        }
    }
    let specs: Vec<_> = flows.iter().map(|f| f.spec()).collect();
    let granted = sb.ok(
        json!({"op": "grant", "session": "s1", "user": "alice", "target": "vm-1",
                               "ttl": "400ms", "flows": specs}),
    );
    let deadline = granted["session"]["deadline_boot_ns"].as_u64().unwrap();
    assert!(granted["session"]["flows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["path"] == "rst"));

    for f in &mut flows {
        let (err, seen_at) = f.wait_reset(5 * SECOND);
        assert_reset(&err);
        let late_ms = (seen_at as f64 - deadline as f64) / 1e6;
        println!(
            "{} -> {}: client reset by an injected RST {late_ms:.3} ms after the deadline",
            f.client, f.server
        );
        assert!(seen_at >= deadline && late_ms < bound_ms(50.0));
        let end = sb.peer_mut(peer).wait_end(f.client, 5 * SECOND);
        assert_eq!(
            end.as_deref(),
            Some("reset"),
            "the server side was reset too"
        );
    }
    let events = sb.wait_audit(3, 5 * SECOND);
    assert_eq!(events.len(), 3);
    for e in &events {
        assert_eq!(
            (e["path"].as_str(), e["result"].as_str()),
            (Some("rst"), Some("destroyed")),
            "{e}"
        );
    }
}
