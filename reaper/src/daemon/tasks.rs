//! The daemon's background tasks: the deadline timer, the flow-event
//! reader, the wall-clock watch, the kernel-log reader, and the SIGHUP
//! reload. Each waits on its descriptor, then runs one synchronous core
//! call under the state lock.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use super::audit;
use super::core::model::EventScope;
use super::notify;
use super::shared::{lock, Shared, Telemetry};
use crate::clock::WallClockWatch;
use crate::config::Config;
use crate::enforcer::KernelLog;
use crate::error::{Error, Result};

/// SIGHUP: re-reads the config file. A file that does not load is refused
/// as a whole, with the error logged and shown by `status`; the running
/// config stays in force and no grant is touched either way.
/// The audit file is reopened either way (logrotate sends the SIGHUP).
pub(super) fn reload(state: &Shared, path: Option<&Path>, telemetry: &Telemetry) {
    let mut core = lock(state);
    core.reopen_audit();
    let Some(path) = path else {
        warn!("SIGHUP: audit file reopened; the daemon runs on the default config, with no file to reload");
        return;
    };
    notify::reloading();
    let error = match Config::load(path).and_then(|new| core.reload(new)) {
        Ok(restart_only) => {
            info!(config = %path.display(), "config reloaded; live grants keep their terms");
            if !restart_only.is_empty() {
                warn!(keys = ?restart_only, "these keys changed but take effect only at the next start");
            }
            None
        }
        Err(e) => {
            error!("config reload refused, the running config stays in force: {e}");
            core.reload_refused(e.to_string());
            Some(e.to_string())
        }
    };
    drop(core);
    telemetry.metrics.reload(error.is_none());
    telemetry
        .events
        .publish(EventScope::default(), audit::reload_line(error.as_deref()));
    notify::reloaded(error.as_deref());
}

/// A second descriptor for one the enforcer owns (the timer, the event
/// ring), for the reactor to watch; readiness is the same on both.
pub(super) fn watch(fd: BorrowedFd<'_>, what: &str) -> Result<AsyncFd<OwnedFd>> {
    let owned = fd
        .try_clone_to_owned()
        .map_err(Error::io(format!("duplicating the {what} descriptor")))?;
    // SAFETY: the OwnedFd stays open, unreplaced, for as long as the AsyncFd.
    unsafe { AsyncFd::register(owned) }
        .map_err(|e| Error::io(format!("registering the {what}"))(e.into()))
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

/// Applies the kernel's flow events as they come: waits for the ring
/// buffer to be readable, then lets the core drain it.
pub(super) async fn read_events(state: Shared, fd: AsyncFd<OwnedFd>) {
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!("flow-event ring buffer failed: {e}");
                return;
            }
        };
        // Clear first, then drain: an event that lands after the drain
        // raises readiness again instead of being missed.
        guard.clear_ready();
        lock(&state).sync_events();
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
