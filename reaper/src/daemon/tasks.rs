//! The daemon's background tasks: the deadline timer, the flow-event
//! reader, the wall-clock watch, the kernel-log reader, and the SIGHUP
//! reload. Each waits on its descriptor, then runs one synchronous core
//! call under the state lock.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use aya::maps::{MapData, RingBuf};
use reaper_common::FlowEvent;
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use super::{lock, Shared};
use crate::clock::{DeadlineTimer, WallClockWatch};
use crate::config::Config;
use crate::enforcer::KernelLog;
use crate::error::{Error, Result};

/// SIGHUP: re-reads the config file. A file that does not load is refused
/// as a whole, with the error logged and shown by `status`; the running
/// config stays in force and no grant is touched either way.
pub(super) fn reload(state: &Shared, path: Option<&Path>) {
    let Some(path) = path else {
        warn!("SIGHUP ignored: the daemon runs on the default config, with no file to reload");
        return;
    };
    let mut core = lock(state);
    match Config::load(path).and_then(|new| core.reload(new)) {
        Ok(restart_only) => {
            info!(config = %path.display(), "config reloaded; live grants keep their terms");
            if !restart_only.is_empty() {
                warn!(keys = ?restart_only, "these keys changed but take effect only at the next start");
            }
        }
        Err(e) => {
            error!("config reload refused, the running config stays in force: {e}");
            core.reload_refused(e.to_string());
        }
    }
}

/// A second descriptor for the timer, for the reactor to watch.
pub(super) fn timer_watch(timer: &DeadlineTimer) -> Result<AsyncFd<OwnedFd>> {
    // SAFETY: dup of a live descriptor; the copy is owned by the OwnedFd.
    let fd = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::io("duplicating the timer descriptor")(
            std::io::Error::last_os_error(),
        ));
    }
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: the OwnedFd stays open, unreplaced, for as long as the AsyncFd.
    unsafe { AsyncFd::register(owned) }.map_err(|e| Error::io("registering the timer")(e.into()))
}

pub(super) async fn run_timer(state: Shared, fd: AsyncFd<OwnedFd>) {
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!("deadline timer failed: {e}");
                return;
            }
        };
        guard.clear_ready();
        let mut core = lock(&state);
        match core.kernel().timer().acknowledge() {
            Ok(()) => core.run_due(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => error!("reading the deadline timer: {e}"),
        }
    }
}

/// Moves `expires_at` deadlines whenever someone sets the wall clock.
pub(super) async fn follow_wall_clock(state: Shared, fd: AsyncFd<WallClockWatch>) {
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!("wall clock watch failed: {e}");
                return;
            }
        };
        match fd.get_ref().was_set() {
            Ok(true) => {
                lock(&state).follow_wall_clock();
            }
            Ok(false) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
            Err(e) => {
                error!("reading the wall clock watch: {e}");
                return;
            }
        }
    }
}

pub(super) async fn read_events(state: Shared, ring: RingBuf<MapData>) {
    // SAFETY: the ring buffer owns its map descriptor for its whole life.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            error!("cannot watch the flow-event ring buffer: {e}; grants fall back to map scans");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                error!("flow-event ring buffer failed: {e}");
                return;
            }
        };
        // Clear first, then drain: an event that lands after the drain
        // raises readiness again instead of being missed.
        guard.clear_ready();
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a FlowEvent; read it unaligned.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) });
            }
        }
        if !batch.is_empty() {
            lock(&state).apply_events(&batch);
        }
    }
}

pub(super) async fn read_kernel_log(log: aya_log::EbpfLogger<KernelLog>) {
    // SAFETY: the logger owns its ring buffer descriptor for its whole life.
    let Ok(mut fd) = (unsafe { AsyncFd::register(log) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.clear_ready();
        guard.get_inner_mut().flush();
    }
}
