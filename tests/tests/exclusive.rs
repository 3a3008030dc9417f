//! One daemon per pin path and per socket: a second daemon on either is
//! refused before it loads or attaches anything, and the first one's
//! sessions are untouched.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reaper_tests::{bound, reaper_bin, Conn, Pins, Sandbox, ScratchDir};

/// Starts `reaper daemon` on `config`, which must be refused: it has to
/// exit on its own, unsuccessfully, within a few seconds. Returns what it
/// said. (A daemon that starts instead is killed, and the test fails.)
fn refused_start(config: &std::path::Path) -> String {
    let mut child = Command::new(reaper_bin())
        .args(["daemon", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run reaper daemon");
    let end = Instant::now() + bound(Duration::from_secs(10));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the second daemon started and kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut said = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(!status.success(), "the second daemon exited 0: {said}");
    said
}

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
