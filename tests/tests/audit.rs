//! The audit trail names who asked: a grant, an extend and a revoke are
//! each an event with the requester's uid and pid, and the revoke's kill
//! names them too.

use std::time::Duration;

use reaper_tests::{Conn, Sandbox};
use serde_json::json;

#[test]
fn grants_extends_and_revokes_name_their_requester() {
    let mut sb = Sandbox::new("audit-requester");
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let conn = Conn::connect("127.0.0.1:5900");
    sb.grant("s1", "alice", "vm-1", "10m", &conn);
    sb.ok(json!({"op": "extend", "session": "s1", "ttl": "20m"}));
    sb.ok(json!({"op": "revoke", "session": "s1"}));
    sb.wait_audit(1, Duration::from_secs(5));
    let me = std::process::id();
    let trail = sb.audit_trail();
    let kinds: Vec<&str> = trail.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["grant", "extend", "revoke", "kill"], "{trail:?}");
    for e in &trail {
        assert_eq!(
            (e["by_uid"].as_u64(), e["by_pid"].as_u64()),
            (Some(0), Some(me as u64)),
            "{e}"
        );
        assert_eq!(e["session"], "s1");
    }
    assert_eq!(trail[0]["created"], true);
    assert_eq!(trail[0]["flows"], 1);
    assert_eq!(trail[0]["granted_by_uid"], 0);
}
