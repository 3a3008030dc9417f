//! Setting up the control socket's file safely. The daemon is root and
//! works by path in a directory other users might reach, so:
//!
//! * the directory must be root's and writable by root only (or by the
//!   group named in `socket_dir_group`), and so must every directory above
//!   it unless it is sticky, like `/tmp`: nobody else can then swap a path
//!   component between our checks and our calls;
//! * the socket is bound under a umask that leaves it `0600`, then given
//!   its group and mode through a descriptor opened without following
//!   links, after checking that it is the socket just bound;
//! * whatever else is found at the socket path is left alone and named in
//!   the error (only a dead socket is removed).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::config::Config;
use crate::error::{Error, Result};

/// Refuses to start where another daemon already answers on the socket:
/// checked before the kernel is touched, so that a refused daemon never
/// attaches a program.
pub(super) fn refuse_if_listening(config: &Config) -> Result<()> {
    let path = &config.socket;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::Setup(format!(
            "another reaper daemon is listening on {}",
            path.display()
        )));
    }
    Ok(())
}

pub(super) fn bind_control_socket(config: &Config) -> Result<UnixListener> {
    let path = &config.socket;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        // Made by root, 0755 (the default umask): nobody else can write it.
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    check_directory(dir, config.socket_dir_group)?;
    remove_dead_socket(path, config)?;
    let socket = bind_private(path)?;
    set_access(path, config)?;
    // Listening only now: no one connects before the socket has its mode
    // and group (a proxy in the group would otherwise be refused at start).
    // SAFETY: a bound stream socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), libc::SOMAXCONN) } != 0 {
        return Err(Error::io(format!("listening on {}", path.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    let listener = std::os::unix::net::UnixListener::from(socket);
    listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .map_err(Error::io(format!("listening on {}", path.display())))
}

/// Why `dir` (and its ancestors) may not hold the socket, if it may not.
fn check_directory(dir: &Path, trusted_group: Option<u32>) -> Result<()> {
    let dir =
        std::fs::canonicalize(dir).map_err(Error::io(format!("resolving {}", dir.display())))?;
    let refuse = |what: &Path, why: String| {
        Err(Error::Setup(format!(
            "socket directory {}: {why}; the daemon refuses to put its socket where another user could replace it",
            what.display()
        )))
    };
    for (depth, d) in dir.ancestors().enumerate() {
        let meta = std::fs::metadata(d).map_err(Error::io(format!("reading {}", d.display())))?;
        let mode = meta.mode();
        if meta.uid() != 0 {
            return refuse(d, format!("owned by uid {}, not root", meta.uid()));
        }
        let sticky = mode & 0o1000 != 0;
        if depth > 0 {
            // Above the socket's directory only a rename matters, which a
            // sticky directory keeps to each entry's owner.
            if mode & 0o022 != 0 && !sticky {
                return refuse(
                    d,
                    format!(
                        "mode {:04o} lets others rename what is in it",
                        mode & 0o7777
                    ),
                );
            }
            continue;
        }
        if mode & 0o002 != 0 {
            return refuse(d, format!("world-writable (mode {:04o})", mode & 0o7777));
        }
        if mode & 0o020 != 0 && trusted_group != Some(meta.gid()) {
            return refuse(
                d,
                format!(
                    "writable by group {} (mode {:04o}), which socket_dir_group does not name",
                    meta.gid(),
                    mode & 0o7777
                ),
            );
        }
    }
    Ok(())
}

/// Removes a socket left by a daemon that is gone; anything else at the
/// path is an error, and is not touched.
fn remove_dead_socket(path: &Path, config: &Config) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
    };
    let kind = meta.file_type();
    if !kind.is_socket() {
        let what = if kind.is_symlink() {
            "a symbolic link"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        return Err(Error::Setup(format!(
            "{} is {what}, not a socket; the daemon leaves it alone: remove it or choose another `socket`",
            path.display()
        )));
    }
    refuse_if_listening(config)?;
    std::fs::remove_file(path).map_err(Error::io(format!("removing stale {}", path.display())))
}

/// A stream socket bound to `path`, not yet listening, born `0600` (the
/// runtime has one thread, so the process-wide umask is ours for the call).
fn bind_private(path: &Path) -> Result<OwnedFd> {
    let failed = |what: &str| Error::io(format!("{what} {}", path.display()));
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::Setup(format!(
            "{}: not a socket path (too long, or a NUL byte)",
            path.display()
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked and owned.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(failed("making a socket for")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a descriptor we just made.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: umask only swaps the process's mask; addr is a filled
    // sockaddr_un of the size passed.
    let rc = unsafe {
        let old = libc::umask(0o177);
        let rc = libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        libc::umask(old);
        rc
    };
    if rc != 0 {
        return Err(failed("binding")(std::io::Error::last_os_error()));
    }
    Ok(socket)
}

/// Gives the socket its group and mode through a descriptor opened without
/// following links, after checking that it is the socket we bound.
fn set_access(path: &Path, config: &Config) -> Result<()> {
    let failed = |what: &str| Error::io(format!("{what} {}", path.display()));
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Setup(format!("{}: a NUL byte in the path", path.display())))?;
    // SAFETY: c_path is a valid C string; the result is checked.
    let raw = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(failed("opening")(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let meta = std::fs::metadata(&proc_path).map_err(failed("checking"))?;
    if !meta.file_type().is_socket() || meta.uid() != 0 {
        return Err(Error::Setup(format!(
            "{} was replaced between binding and setting its mode; refusing to go on",
            path.display()
        )));
    }
    if let Some(gid) = config.socket_group {
        // SAFETY: fd is open; an empty path with AT_EMPTY_PATH means fd itself.
        let rc = unsafe {
            libc::fchownat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                u32::MAX,
                gid,
                libc::AT_EMPTY_PATH,
            )
        };
        if rc != 0 {
            return Err(failed("setting the group of")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    // An O_PATH descriptor cannot be fchmod'ed, but its /proc link names
    // exactly the inode it holds.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        &proc_path,
        std::fs::Permissions::from_mode(config.socket_mode),
    )
    .map_err(failed("setting the mode of"))
}
