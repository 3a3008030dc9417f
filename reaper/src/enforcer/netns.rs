//! Reaching sockets in other network namespaces.
//!
//! A netlink socket acts in the namespace it was created in, so the daemon
//! keeps one `SockDiag` per namespace that holds tracked flows: created by a
//! short-lived thread that enters the namespace (`setns` affects only the
//! calling thread), found by its namespace cookie, and dropped when the last
//! tracked flow there closes (the socket would otherwise keep the namespace
//! alive).
//!
//! Namespaces are found where operators and container runtimes leave them:
//! `/run/netns/NAME` (`ip netns`) and `/proc/PID/ns/net` of running
//! processes. A scan only happens when a flow names a namespace not seen yet.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tracing::{debug, info};

use std::os::fd::{FromRawFd, OwnedFd};

use super::diag::SockDiag;
use super::rst::{self, Rst};
use crate::kernel::{DestroyOutcome, NetnsError, SocketRef};

/// Raw IP sockets that put hand-built RSTs into a namespace's stack: one to
/// a local address is delivered to the local socket, one to a remote
/// address is routed out like any packet.
pub struct Injector {
    raw4: OwnedFd,
    /// None where the namespace has no IPv6.
    raw6: Option<OwnedFd>,
}

fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; IPPROTO_RAW implies we write the IP header.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Injector {
    pub fn open() -> io::Result<Injector> {
        Ok(Injector {
            raw4: raw_socket(libc::AF_INET)?,
            raw6: raw_socket(libc::AF_INET6).ok(),
        })
    }

    /// Sends one RST into the stack.
    pub fn send(&self, segment: &Rst) -> io::Result<()> {
        use std::os::fd::AsFd;
        let packet = rst::ip_packet(segment);
        match segment.dst {
            std::net::SocketAddr::V4(d) => {
                // SAFETY: an all-zero sockaddr_in is valid; fields set below.
                let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                sin.sin_family = libc::AF_INET as u16;
                sin.sin_addr.s_addr = u32::from_ne_bytes(d.ip().octets());
                super::sys::send_to(self.raw4.as_fd(), &packet, &sin)
            }
            std::net::SocketAddr::V6(d) => {
                let Some(raw6) = &self.raw6 else {
                    return Err(io::Error::other("no IPv6 in this network namespace"));
                };
                // SAFETY: an all-zero sockaddr_in6 is valid; fields set below.
                let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                sin6.sin6_family = libc::AF_INET6 as u16;
                sin6.sin6_addr.s6_addr = d.ip().octets();
                super::sys::send_to(raw6.as_fd(), &packet, &sin6)
            }
        }
    }
}

/// The daemon's reach into one network namespace.
pub struct Netns {
    pub diag: SockDiag,
    /// One more sock_diag socket per further core (up to three): a mass
    /// expiry destroys on all of them at once (`diag::destroy_spread`).
    pub spare_diags: Vec<SockDiag>,
    pub inject: Injector,
}

impl Netns {
    /// Opens the sockets in the calling thread's namespace.
    pub fn open() -> io::Result<Netns> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Netns {
            diag: SockDiag::open()?,
            spare_diags: (1..cores.min(4))
                .map(|_| SockDiag::open())
                .collect::<io::Result<_>>()?,
            inject: Injector::open()?,
        })
    }

    /// Destroys `targets`, spread over this namespace's sock_diag sockets.
    pub fn destroy(&mut self, targets: &[SocketRef]) -> Vec<DestroyOutcome> {
        super::diag::destroy_spread(&mut self.diag, &mut self.spare_diags, targets)
    }
}

pub struct Namespaces {
    own_cookie: u64,
    others: HashMap<u64, Netns>,
    /// Namespace file identity (nsfs device, inode) → cookie, for every
    /// namespace reached, the daemon's own included: a request naming a
    /// known namespace costs a stat, not a thread and three sockets.
    known: HashMap<(u64, u64), u64>,
}

/// The identity of the namespace behind a namespace file (a bind mount under
/// /run/netns and /proc/PID/ns/net of a process in it stat the same).
fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `NS_GET_NSTYPE`, `_IO(0xb7, 0x3)`: which kind of namespace a file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Whether `path` is `/proc/PID/ns/net` (PID a number, `self` or
/// `thread-self`): a magic link into nsfs, the one kind of link followed.
fn is_proc_ns_link(path: &Path) -> bool {
    let parts: Vec<&std::ffi::OsStr> = path.iter().collect();
    match parts.as_slice() {
        [root, proc, pid, ns, net] => {
            *root == "/"
                && *proc == "proc"
                && *ns == "ns"
                && *net == "net"
                && pid.to_str().is_some_and(|p| {
                    p == "self" || p == "thread-self" || p.bytes().all(|b| b.is_ascii_digit())
                })
        }
        _ => false,
    }
}

/// Opens a file a request names as a network namespace, safely as root:
/// never blocking (a FIFO there must not stall the daemon), not following a
/// link at the end of the path (but for /proc/PID/ns/net), and only if it
/// really is a network namespace file (nsfs, `CLONE_NEWNET`).
fn open_namespace(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !is_proc_ns_link(path) {
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)?;
    let not_netns = || io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace file");
    // SAFETY: fstatfs and ioctl on a descriptor we own; st is a valid
    // out-pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 || st.f_type as i64 != NSFS_MAGIC {
        return Err(not_netns());
    }
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(not_netns());
    }
    Ok(file)
}

/// Opens the sockets inside the namespace behind `file`.
fn open_in(file: File) -> io::Result<Netns> {
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace descriptor; only this thread moves.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Netns::open()
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
}

impl Namespaces {
    pub fn new(own_cookie: u64) -> Namespaces {
        let mut known = HashMap::new();
        if let Ok(own) = identity(Path::new("/proc/thread-self/ns/net")) {
            known.insert(own, own_cookie);
        }
        Namespaces {
            own_cookie,
            others: HashMap::new(),
            known,
        }
    }

    /// The socket for another namespace, scanning for it if needed. `None`
    /// when it cannot be found (the namespace is gone).
    pub fn get(&mut self, cookie: u64) -> Option<&mut Netns> {
        if !self.others.contains_key(&cookie) {
            self.scan_for(cookie);
        }
        self.others.get_mut(&cookie)
    }

    /// Opens (or reuses) the namespace behind a namespace file; returns its
    /// cookie.
    pub fn resolve(&mut self, path: &Path) -> Result<u64, NetnsError> {
        let failed = |action: &'static str| {
            move |e: io::Error| NetnsError {
                action,
                path: path.display().to_string(),
                why: e.to_string(),
            }
        };
        let file = open_namespace(path).map_err(failed("open"))?;
        let meta = file.metadata().map_err(failed("open"))?;
        let id = (meta.dev(), meta.ino());
        if let Some(&cookie) = self.known.get(&id) {
            if cookie == self.own_cookie || self.others.contains_key(&cookie) {
                return Ok(cookie);
            }
        }
        let netns = open_in(file).map_err(failed("enter"))?;
        let cookie = netns.diag.netns_cookie().map_err(failed("identify"))?;
        if cookie != self.own_cookie {
            self.others.entry(cookie).or_insert(netns);
        }
        self.known.insert(id, cookie);
        Ok(cookie)
    }

    /// Looks through the named namespaces and those of running processes
    /// until `wanted` turns up, keeping it (and only it) open.
    fn scan_for(&mut self, wanted: u64) {
        let mut seen: HashSet<(u64, u64)> = HashSet::new();
        let named = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path());
        let procs = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .map(|e| e.path().join("ns/net"));
        for path in named.chain(procs) {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let Ok(netns) = open_in(file) else {
                continue;
            };
            if netns.diag.netns_cookie().ok() == Some(wanted) {
                info!(netns = %path.display(), cookie = wanted, "reaching flows in another network namespace");
                self.others.insert(wanted, netns);
                self.known.insert((meta.dev(), meta.ino()), wanted);
                return;
            }
        }
        debug!(cookie = wanted, "network namespace not found: it is gone");
    }

    /// Closes the socket of a namespace that holds no tracked flow any more.
    pub fn release(&mut self, cookie: u64) {
        if cookie == self.own_cookie {
            return;
        }
        // The socket held the namespace alive; once it goes, the namespace's
        // inode number may be reused, so its identity is forgotten too.
        self.known.retain(|_, c| *c != cookie);
        if self.others.remove(&cookie).is_some() {
            debug!(
                cookie,
                "closed the sock_diag socket of a namespace without flows"
            );
        }
    }

    /// How many other namespaces are reached now.
    pub fn open_count(&self) -> usize {
        self.others.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn only_network_namespace_files_are_opened_and_nothing_blocks() {
        // Before, a FIFO named as `netns` blocked the daemon (and every
        // kill) until someone wrote to it.
        let dir = std::env::temp_dir().join(format!("reaper-netns-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let plain = dir.join("plain");
        std::fs::write(&plain, "x").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink("/proc/self/ns/net", &link).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo, plain, link, PathBuf::from("/proc/self/ns/uts")];
        std::thread::spawn(move || {
            let results: Vec<bool> = paths.iter().map(|p| open_namespace(p).is_err()).collect();
            let _ = tx.send(results);
        });
        let refused = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("opening a FIFO blocked");
        assert_eq!(
            refused,
            vec![true; 4],
            "fifo, plain file, link, uts namespace"
        );
        assert!(is_proc_ns_link(Path::new("/proc/123/ns/net")));
        assert!(!is_proc_ns_link(Path::new("/tmp/proc/123/ns/net")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
