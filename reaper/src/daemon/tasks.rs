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
use crate::config::{Config, ForwardAttach};
use crate::enforcer::links::{self, LinkChange, LinkWatch};
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

/// Re-attaches the forwarding program to each `[forward]` interface that is
/// deleted and created again (a new index), within the event's arrival:
/// forwarded flows through it are tracked again at once. A deletion is
/// logged: until the interface is back, nothing passes through it anyway.
pub(super) async fn follow_links(
    state: Shared,
    fd: AsyncFd<LinkWatch>,
    interfaces: Vec<String>,
    attach: ForwardAttach,
    telemetry: Telemetry,
) {
    let mut attached: std::collections::HashMap<String, Option<u32>> = interfaces
        .iter()
        .map(|i| (i.clone(), links::index_of(i)))
        .collect();
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!("link watch failed: {e}; re-created interfaces need a restart");
                return;
            }
        };
        guard.clear_ready();
        let changes = match fd.get_ref().read() {
            Ok(c) => c,
            Err(e) => {
                // Events were lost (ENOBUFS): look at each interface instead.
                warn!("link events lost ({e}); checking every forwarding interface");
                interfaces
                    .iter()
                    .filter_map(|name| {
                        links::index_of(name).map(|index| LinkChange::Present {
                            name: name.clone(),
                            index,
                        })
                    })
                    .collect()
            }
        };
        for change in changes {
            match change {
                LinkChange::Gone { name, index } if attached.get(&name) == Some(&Some(index)) => {
                    warn!(interface = %name, "forwarding interface deleted; its forwarded flows are untracked until it returns");
                    attached.insert(name, None);
                }
                LinkChange::Present { name, index } => {
                    let Some(known) = attached.get(&name) else {
                        continue;
                    };
                    if *known == Some(index) {
                        continue;
                    }
                    let result = lock(&state).kernel_mut().reattach_forwarding(&name, attach);
                    match result {
                        Ok(()) => {
                            info!(interface = %name, index, "forwarding interface re-created: program re-attached");
                            telemetry.metrics.interface_attached();
                            attached.insert(name, Some(index));
                        }
                        Err(e) => {
                            error!(interface = %name, "re-attaching the forwarding program: {e}")
                        }
                    }
                }
                LinkChange::Gone { .. } => {}
            }
        }
    }
}

/// Keeps the kill path warm while a kill is near: every 100 ms, while
/// something is due within the next second, the enforcer sends a destroy of
/// a socket that cannot exist (see `Enforcer::keep_kill_path_warm`). A host
/// with nothing due soon is left quiet.
pub(super) async fn keep_kill_path_warm(state: Shared) {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(100);
    const AHEAD_NS: u64 = 1_000_000_000;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut core = lock(&state);
        let now = crate::kernel::Kernel::now(core.kernel()).boot_ns;
        if core.next_due_ns().is_some_and(|due| due <= now + AHEAD_NS) {
            core.kernel_mut().keep_kill_path_warm();
        }
    }
}
