//! One daemon per pin path and per socket: a second daemon on either is
//! refused before it loads or attaches anything, and the first one's
//! sessions are untouched.

use std::process::Command;
use std::time::Duration;

use reaper_tests::{reaper_bin, refused_start, Conn, Pins, Sandbox, ScratchDir};

#[test]
fn a_second_daemon_on_the_same_pins_or_socket_is_refused() {
    let mut sb = Sandbox::new("exclusive");
    sb.start_daemon();
    let _peer = sb.peer(&["127.0.0.1:5900"]);
    let mut conn = Conn::connect("127.0.0.1:5900");
    sb.grant("s1", "alice", "vm-1", "1h", &conn);

    // Same pins, its own socket: before, this daemon ran beside the first,
    // gave out the same session ids and deleted the first one's records.
    let scratch = ScratchDir::new(&format!("{}-second", sb.name));
    let same_pins = scratch.path.join("same-pins.toml");
    std::fs::write(
        &same_pins,
        format!(
            "socket = {:?}\npin_path = {:?}\ncgroup = {:?}\n",
            scratch.path.join("second.sock"),
            sb.pin_path,
            sb.cgroup
        ),
    )
    .unwrap();
    let said = refused_start(&same_pins);
    assert!(
        said.contains("in use by another reaper daemon"),
        "the refusal names the pin path: {said}"
    );

    // Same socket, its own pins and a fence on the granted port: before,
    // it attached its programs first and left them enforcing (dropping the
    // granted flow's data) when it found the socket taken.
    let other_pins = Pins::new(&format!("{}-second", sb.name));
    let same_socket = scratch.path.join("same-socket.toml");
    std::fs::write(
        &same_socket,
        format!(
            "socket = {:?}\npin_path = {:?}\ncgroup = {:?}\nfence_grace = \"100ms\"\n[[fence]]\nports = \"5900\"\nside = \"local\"\n",
            sb.socket, other_pins.path, sb.cgroup
        ),
    )
    .unwrap();
    let said = refused_start(&same_socket);
    assert!(
        said.contains("another reaper daemon is listening"),
        "{said}"
    );
    let pinned: Vec<_> = std::fs::read_dir(&other_pins.path)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(pinned.is_empty(), "the refused daemon pinned {pinned:?}");

    // The first daemon's session is whole, and its flow carries data.
    std::thread::sleep(Duration::from_millis(300));
    conn.echo().expect("the granted flow still carries data");
    let list = sb.ok(serde_json::json!({"op": "list"}));
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["sessions"][0]["session"], "s1");

    // And `reaper unload` will not pull the pins from under it.
    let out = Command::new(reaper_bin())
        .args(["unload", "--config"])
        .arg(&sb.config_path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "unload ran under a live daemon");
    assert!(sb.pin_path.exists());
}
