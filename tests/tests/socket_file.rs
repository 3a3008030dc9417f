//! The control socket is set up where nobody else can swap it: the daemon
//! refuses a socket directory another user owns or may write, leaves alone
//! (and names) whatever non-socket it finds at the socket path, and gives
//! the socket its mode and group on the socket itself.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use reaper_tests::{refused_start, Sandbox};

const NOBODY: u32 = 65534;

/// A config for `sb` whose socket is `socket`.
fn config_with_socket(sb: &Sandbox, socket: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = sb.dir.join("socket-test.toml");
    std::fs::write(
        &path,
        format!(
            "socket = {socket:?}\npin_path = {:?}\ncgroup = {:?}\n{extra}",
            sb.pin_path, sb.cgroup
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_socket_directory_others_can_write_is_refused() {
    let sb = Sandbox::new("socket-dir");
    let dir = sb.dir.join("run");
    std::fs::create_dir(&dir).unwrap();
    let socket = dir.join("reaper.sock");
    let config = config_with_socket(&sb, &socket, "");

    // Before, the daemon bound in a directory owned by an unprivileged
    // user, who could then swap the socket for a link to any root file
    // before the chmod by path made that file 0666.
    std::os::unix::fs::chown(&dir, Some(NOBODY), None).unwrap();
    let said = refused_start(&config);
    assert!(said.contains("owned by uid 65534, not root"), "{said}");
    assert!(!socket.exists(), "nothing was bound");

    std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let said = refused_start(&config);
    assert!(said.contains("world-writable"), "{said}");

    // Group-writable: only for the group socket_dir_group names.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    std::os::unix::fs::chown(&dir, None, Some(NOBODY)).unwrap();
    let said = refused_start(&config);
    assert!(said.contains("socket_dir_group does not name"), "{said}");
}

#[test]
fn a_group_writable_directory_named_in_the_config_is_used_and_the_socket_gets_its_mode() {
    let mut sb = Sandbox::new("socket-dir-group");
    let dir = sb.dir.join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    std::os::unix::fs::chown(&dir, None, Some(NOBODY)).unwrap();
    sb.move_socket(dir.join("reaper.sock"));
    sb.write_config(&format!(
        "socket_dir_group = {NOBODY}\nsocket_group = {NOBODY}\nsocket_mode = \"0640\"\n"
    ));
    sb.start_daemon();
    let meta = std::fs::symlink_metadata(&sb.socket).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (0, NOBODY));
}

#[test]
fn what_is_not_a_socket_at_the_socket_path_is_left_alone() {
    let sb = Sandbox::new("socket-path");
    let socket = sb.dir.join("taken.sock");
    let config = config_with_socket(&sb, &socket, "");

    // Before, any file there was silently removed.
    std::fs::write(&socket, "precious").unwrap();
    let said = refused_start(&config);
    assert!(said.contains("is a regular file, not a socket"), "{said}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
    std::fs::remove_file(&socket).unwrap();

    // A link (to a root file that a chmod through it would open up).
    let target = sb.dir.join("root-only");
    std::fs::write(&target, "secret").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&target, &socket).unwrap();
    let said = refused_start(&config);
    assert!(said.contains("is a symbolic link, not a socket"), "{said}");
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o600);
}
