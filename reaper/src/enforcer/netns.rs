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

use super::diag::SockDiag;

pub struct Namespaces {
    own_cookie: u64,
    others: HashMap<u64, SockDiag>,
}

/// Opens a sock_diag socket inside the namespace behind `file`.
fn open_in(file: File) -> io::Result<SockDiag> {
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace descriptor; only this thread moves.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        SockDiag::open()
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
}

impl Namespaces {
    pub fn new(own_cookie: u64) -> Namespaces {
        Namespaces {
            own_cookie,
            others: HashMap::new(),
        }
    }

    /// The socket for another namespace, scanning for it if needed. `None`
    /// when it cannot be found (the namespace is gone).
    pub fn get(&mut self, cookie: u64) -> Option<&mut SockDiag> {
        if !self.others.contains_key(&cookie) {
            self.scan_for(cookie);
        }
        self.others.get_mut(&cookie)
    }

    /// Opens (or reuses) the namespace behind a namespace file; returns its
    /// cookie.
    pub fn resolve(&mut self, path: &Path) -> Result<u64, String> {
        let file = File::open(path)
            .map_err(|e| format!("cannot open network namespace {} ({e})", path.display()))?;
        let diag = open_in(file)
            .map_err(|e| format!("cannot enter network namespace {} ({e})", path.display()))?;
        let cookie = diag
            .netns_cookie()
            .map_err(|e| format!("cannot identify network namespace {} ({e})", path.display()))?;
        if cookie != self.own_cookie {
            self.others.entry(cookie).or_insert(diag);
        }
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
            let Ok(diag) = open_in(file) else {
                continue;
            };
            if diag.netns_cookie().ok() == Some(wanted) {
                info!(netns = %path.display(), cookie = wanted, "reaching flows in another network namespace");
                self.others.insert(wanted, diag);
                return;
            }
        }
        debug!(cookie = wanted, "network namespace not found: it is gone");
    }

    /// Closes the socket of a namespace that holds no tracked flow any more.
    pub fn release(&mut self, cookie: u64) {
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
