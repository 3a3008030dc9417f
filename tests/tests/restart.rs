//! Restarts: stopping the daemon (cleanly or by SIGKILL) loses no
//! grant. While it is down the kernel drops the packets of an expired flow;
//! the restarted daemon lists the grants it adopted, destroys the flow that
//! expired meanwhile, and enforces the live one at its deadline.

use reaper_tests::{assert_reset, bound_ms, sleep_until_boot, Conn, Sandbox, SECOND};
use serde_json::json;

fn survives_restart(name: &str, signal: i32) {
    let mut sb = Sandbox::new(name);
    sb.start_daemon();
    let peer = sb.peer(&["127.0.0.1:5900"]);
    let mut doomed = Conn::connect("127.0.0.1:5900");
    let mut kept = Conn::connect("127.0.0.1:5900");
    doomed.echo().unwrap();
    kept.echo().unwrap();
    let doomed_deadline = sb.grant("doomed", "alice", "vm-1", "1500ms", &doomed)["session"]
        ["deadline_boot_ns"]
        .as_u64()
        .unwrap();
    // Long enough to outlive a restart under software emulation too.
    let kept_deadline = sb.grant("kept", "bob", "vm-2", "10s", &kept)["session"]
        ["deadline_boot_ns"]
        .as_u64()
        .unwrap();

    sb.stop_daemon(signal);
    sleep_until_boot(doomed_deadline + 100_000_000);

    // Backstop: no daemon, and the expired flow carries nothing.
    assert!(
        !sb.delivers(peer, &mut doomed.stream, doomed.client),
        "expired flow delivered data while the daemon was down"
    );
    kept.echo()
        .expect("a live grant keeps working while the daemon is down");

    sb.start_daemon();
    let (err, _) = doomed.wait_reset(5 * SECOND);
    assert_reset(&err);

    let listed = sb.ok(json!({"op": "list"}));
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{listed}");
    assert_eq!(sessions[0]["session"], "kept");
    assert_eq!(sessions[0]["deadline_boot_ns"], kept_deadline);
    assert_eq!(sessions[0]["flows"][0]["remote"], kept.client.to_string());
    let status = sb.ok(json!({"op": "status"}));
    let dropped = status["counters"]["dropped_packets"].as_u64().unwrap();
    println!("packets dropped by the kernel while the daemon was down: {dropped}");
    assert!(dropped >= 1);

    let events = sb.wait_audit(1, 5 * SECOND);
    assert_eq!(events[0]["session"], "doomed");
    assert_eq!(events[0]["reason"], "expired");
    println!(
        "doomed flow destroyed {} us after its deadline (daemon was down)",
        events[0]["late_us"]
    );

    // The adopted grant is still enforced on time by the new daemon.
    let (err, seen_at) = kept.wait_reset(10 * SECOND);
    assert_reset(&err);
    let late_ms = (seen_at - kept_deadline) as f64 / 1e6;
    println!("adopted grant killed {late_ms:.3} ms after its deadline");
    assert!(late_ms < bound_ms(50.0));
}

#[test]
fn grants_survive_sigterm() {
    survives_restart("restart-term", libc::SIGTERM);
}

#[test]
fn grants_survive_sigkill() {
    survives_restart("restart-kill", libc::SIGKILL);
}

/// The packet path keeps per-socket marks that cache each flow's deadline
/// (see `FlowMark`). A deadline that changes after packets were cached must
/// reach the backstop, and a flow stays covered after its port leaves the
/// config: with the daemon down, the extended flow lives past its first
/// deadline and the flow whose port was unwatched by a reload is dropped.
#[test]
fn backstop_follows_extends_and_outlives_unwatched_ports() {
    let mut sb = Sandbox::new("restart-marks");
    sb.start_daemon();
    let peer = sb.peer(&["127.0.0.1:5900"]);
    let mut doomed = Conn::connect("127.0.0.1:5900");
    let mut extended = Conn::connect("127.0.0.1:5900");

    // Port 5900 leaves the config; the flows already on it stay tracked.
    sb.write_config("[[watch]]\nports = \"6100\"\nside = \"local\"\n");
    sb.hangup();
    let end = std::time::Instant::now() + 5 * SECOND;
    while sb.ok(json!({"op": "status"}))["config_loads"] != 2 {
        assert!(std::time::Instant::now() < end, "reload not applied");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // Each change is preceded by packets, so that the marks hold what was
    // true before it: ungranted, then the 1.5 s deadline, then the extend.
    doomed.echo().unwrap();
    extended.echo().unwrap();
    let first_deadline = sb.grant("doomed", "alice", "vm-1", "1500ms", &doomed)["session"]
        ["deadline_boot_ns"]
        .as_u64()
        .unwrap();
    sb.grant("extended", "bob", "vm-2", "1500ms", &extended);
    doomed.echo().unwrap();
    extended.echo().unwrap();
    sb.ok(json!({"op": "extend", "session": "extended", "ttl": "20s"}));

    sb.stop_daemon(libc::SIGKILL);
    sleep_until_boot(first_deadline + 100_000_000);
    assert!(
        !sb.delivers(peer, &mut doomed.stream, doomed.client),
        "a flow on a port unwatched by reload delivered data past its deadline"
    );
    extended
        .echo()
        .expect("an extended flow keeps working past its first deadline");
}

/// Pins a small hash map at `path` (raw `bpf(2)`: BPF_MAP_CREATE, then
/// BPF_OBJ_PIN), standing in for whatever an earlier reaper pinned there.
fn pin_a_map(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    // union bpf_attr, map_create: type (1, hash), key and value sizes, entries.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[1, 4, 4, 1]);
    // SAFETY: BPF_MAP_CREATE reads the attribute buffer it is given.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), 128) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // union bpf_attr, obj_pin: pathname (a pointer), bpf_fd, file_flags.
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    attr[1] = fd as u64;
    // SAFETY: BPF_OBJ_PIN reads the path and descriptor it is given.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_ptr(), 128) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: closing the descriptor made above; the pin holds the map.
    unsafe { libc::close(fd as i32) };
}

/// Before, a cgroup/sock_create program recorded each socket's owner in a
/// socket storage map, both pinned. Now the owner is read from the socket
/// itself; a daemon started over an earlier reaper's pins removes those two
/// (the program is detached with its link's pin) and says so.
#[test]
fn an_earlier_reapers_socket_owner_pins_are_removed_at_start() {
    let mut sb = Sandbox::new("restart-retired-pins");
    std::fs::create_dir_all(&sb.pin_path).unwrap();
    let retired = ["link_sock_create", "OWNERS"].map(|name| sb.pin_path.join(name));
    for path in &retired {
        pin_a_map(path);
    }
    sb.start_daemon();
    for path in &retired {
        assert!(!path.exists(), "{} is still pinned", path.display());
    }
    let log = sb.daemon_log();
    assert_eq!(
        log.matches("removed a pin an earlier reaper left").count(),
        2,
        "{log}"
    );
    assert!(sb.pin_path.join("link_sockops").exists());
}
