//! A proxy written in Python (standard library only) registers its client
//! and upstream sockets by passing their descriptors (SCM_RIGHTS), using the
//! snippet docs/protocol.md shows (examples/reaper_grant.py). At the deadline the
//! browser-side client sees a reset, the console server sees a reset, and
//! the proxy's own sockets are aborted.

use std::io::{BufRead, BufReader};
use std::path::Path;

use reaper_tests::{assert_reset, Conn, Sandbox, SECOND};
use serde_json::Value;

#[test]
fn python_proxy_registers_its_sockets_by_descriptor() {
    let mut sb = Sandbox::new("fd-grant");
    // The proxy's client-facing port, and the console port it connects to.
    sb.write_config(
        "[[watch]]\nports = \"6080\"\nside = \"local\"\n[[watch]]\nports = \"5900\"\nside = \"remote\"\n",
    );
    sb.start_daemon();
    let console = sb.peer(&["127.0.0.1:5900"]);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fd_proxy.py");
    let socket = sb.socket.clone();
    let mut out = BufReader::new(
        sb.spawn(
            reaper_tests::python()
                .arg(&script)
                .arg(&socket)
                .args(["6080", "5900", "0.4"]),
        ),
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");

    let mut browser = Conn::connect("127.0.0.1:6080");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("upstream "), "{line:?}");
    line.clear();
    out.read_line(&mut line).unwrap();
    let grant: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(grant["session"]["session"], "py-1");
    assert_eq!(
        grant["session"]["flows"].as_array().unwrap().len(),
        2,
        "{grant}"
    );
    browser
        .echo()
        .expect("the proxy relays to the console and back");

    let (err, _) = browser.wait_reset(5 * SECOND);
    assert_reset(&err);
    let console_end = sb
        .peer_mut(console)
        .expect(|l| l.starts_with("end "), 5 * SECOND);
    assert!(
        console_end.ends_with(" reset"),
        "console server saw: {console_end}"
    );

    line.clear();
    out.read_line(&mut line).unwrap();
    let ends: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ends["client"], "Software caused connection abort", "{ends}");
    assert_eq!(
        ends["upstream"], "Software caused connection abort",
        "{ends}"
    );
    let events = sb.wait_audit(2, 5 * SECOND);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events
        .iter()
        .all(|e| e["session"] == "py-1" && e["reason"] == "expired"));
}
