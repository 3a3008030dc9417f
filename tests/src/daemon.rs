//! The daemon under test and a client of its control socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bound, reaper_bin};

/// A running `reaper daemon`. Dropped: killed (SIGKILL) and reaped; the
/// pinned programs it leaves are the `Pins` guard's to remove.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `reaper daemon --config CONFIG`, its log appended to `log`,
    /// and waits until `socket` answers.
    pub fn start(config: &Path, socket: &Path, log: &Path) -> Daemon {
        Daemon::start_as(Command::new(reaper_bin()), config, socket, log)
    }

    /// Like `start`, with `command` as the program (another binary, a
    /// wrapper such as setpriv, extra environment) that `daemon --config
    /// CONFIG` is appended to.
    pub fn start_as(mut command: Command, config: &Path, socket: &Path, log: &Path) -> Daemon {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = command
            .args(["daemon", "--config"])
            .arg(config)
            // Debug, for the failing test's log; the benchmarks set
            // REAPER_TEST_LOG to measure the daemon at its default level.
            .env(
                "REAPER_LOG",
                std::env::var("REAPER_TEST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn reaper daemon");
        let mut daemon = Daemon { child };
        let read_log = || std::fs::read_to_string(log).unwrap_or_default();
        let deadline = Instant::now() + bound(Duration::from_secs(20));
        loop {
            if UnixStream::connect(socket).is_ok() {
                return daemon;
            }
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("reaper daemon exited with {status}:\n{}", read_log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready:\n{}",
                read_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Stops the daemon with `signal` and waits for it to exit.
    pub fn stop(mut self, signal: i32) {
        self.signal(signal);
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `reaper daemon` on `config`, which must be refused: it has to
/// exit on its own, unsuccessfully, within a few seconds. Returns what it
/// said. (A daemon that starts instead is killed, and the test fails.)
pub fn refused_start(config: &Path) -> String {
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
            panic!("a daemon that should have been refused started and kept running");
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
    assert!(!status.success(), "the refused daemon exited 0: {said}");
    said
}

/// A client of a daemon's control socket: one connection per request, as
/// a short-lived CLI call makes.
#[derive(Clone)]
pub struct Control {
    pub socket: PathBuf,
}

impl Control {
    /// One raw protocol exchange: sends `line` (newline added), returns the
    /// parsed response.
    pub fn raw(&self, line: &str) -> Value {
        let mut s = UnixStream::connect(&self.socket).expect("connect control socket");
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad response {reply:?}: {e}"))
    }

    pub fn request(&self, req: Value) -> Value {
        self.raw(&req.to_string())
    }

    /// A request sent with `fds` (SCM_RIGHTS, in the same sendmsg as its
    /// line), as a proxy passes its sockets.
    pub fn request_with_fds(&self, req: Value, fds: &[std::os::fd::RawFd]) -> Value {
        let s = UnixStream::connect(&self.socket).expect("connect control socket");
        let line = format!("{req}\n");
        let sent = send_with_fds(&s, line.as_bytes(), fds, 0).expect("sendmsg");
        assert_eq!(sent, line.len(), "a short sendmsg");
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad response {reply:?}: {e}"))
    }

    /// A request that must succeed; returns its result.
    pub fn ok(&self, req: Value) -> Value {
        let r = self.request(req.clone());
        assert_eq!(r["ok"], true, "{req} was refused: {r}");
        r["result"].clone()
    }
}

/// One `sendmsg` of `bytes` with `fds` (SCM_RIGHTS) on a Unix stream, with
/// `flags` (`MSG_DONTWAIT`, ...): how a proxy passes its sockets. Returns
/// the bytes sent.
pub fn send_with_fds(
    sock: &UnixStream,
    bytes: &[u8],
    fds: &[std::os::fd::RawFd],
    flags: i32,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let size = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is arithmetic; msghdr and the cmsg macros point
    // into buffers that live across the call.
    let sent = unsafe {
        let space = libc::CMSG_SPACE(size) as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut _,
            iov_len: bytes.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        libc::sendmsg(sock.as_raw_fd(), &msg, flags)
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Reads a control connection until the daemon closes it; `Err` if it
/// keeps it open past `timeout` (scaled). A reset counts as the close: a
/// Unix socket closed with unread data (a line the daemon refused without
/// reading it all) resets its peer instead of sending EOF.
pub fn read_to_eof(stream: &mut UnixStream, timeout: Duration) -> std::io::Result<Vec<u8>> {
    let end = Instant::now() + bound(timeout);
    let mut all = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(all),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(all),
            Err(e) => return Err(e),
        }
    }
}
