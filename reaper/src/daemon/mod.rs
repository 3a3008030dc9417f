//! `reaper daemon`: wires the enforcer, the core and the control socket
//! together on one single-threaded runtime.
//!
//! * `core/` — what happens to sessions and flows (behind `crate::kernel`);
//! * `server` — the control socket, its clients, and `wire`, the adapter
//!   from the core's values to the protocol's;
//! * `tasks` — the timer, the flow events, the wall-clock watch, reloads;
//! * `audit` — the audit trail the core writes kills to, which also feeds
//!   `metrics` and `events` (the live stream behind `watch`);
//! * `health` — the HTTP endpoint of `[metrics]`; `notify` — systemd's
//!   READY/RELOADING/STOPPING/WATCHDOG.
//!
//! The tasks share the core behind one mutex, held only for short
//! synchronous sections (never across an await), which keeps every request
//! and every kill atomic.

mod audit;
pub(crate) mod connection;
pub mod core;
mod events;
mod fleet;
mod health;
mod metrics;
mod notify;
mod places;
mod server;
mod shared;
mod socket_file;
mod tasks;
mod wire;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

use self::core::Core;
use crate::clock::WallClockWatch;
use crate::config::Config;
use crate::enforcer::{lock_pin_path, Enforcer, Started};
use crate::error::{Error, Result};
use audit::Audit;
use shared::{Shared, Telemetry};

/// Runs the daemon with `config`, read from `path` (reloaded from there on
/// SIGHUP) or the defaults.
pub fn run(config: Config, path: Option<PathBuf>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the async runtime"))?;
    runtime.block_on(serve(config, path))
}

/// Raises the soft limit on open files to the hard one, and returns the
/// limit now in force: every control client holds a descriptor, and a
/// thousand idle ones must not starve the rest (the common default soft
/// limit is 1024).
fn raise_fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: lim is a valid out-pointer, then a valid in-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0
            && lim.rlim_cur < lim.rlim_max
            && libc::setrlimit(
                libc::RLIMIT_NOFILE,
                &libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                },
            ) == 0
        {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur as usize
}

/// Runs the daemon at `nice`: a deadline's kill is due to the
/// millisecond, and should not queue behind ordinary processes.
fn set_priority(nice: i32) {
    // SAFETY: plain syscall on the calling process.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::warn!(
            nice,
            "could not set the daemon's priority ({}); kills may be late on a busy machine",
            std::io::Error::last_os_error()
        );
    }
}

/// Lets the daemon's thread run the deadlines at SCHED_FIFO `priority`
/// (see `crate::priority`). Refused, the daemon runs them at its nice
/// value, and says so.
fn set_realtime(priority: u8) {
    if priority == 0 {
        return;
    }
    match crate::priority::enable(priority) {
        Ok(()) => info!(
            priority,
            "deadlines are run at real-time priority (SCHED_FIFO)"
        ),
        Err(e) => tracing::warn!(
            priority,
            "could not run kills at real-time priority ({e}; needs CAP_SYS_NICE, and systemd's \
             RestrictRealtime=no); kills may be late on a busy machine"
        ),
    }
}

/// The `[metrics]` listener. A public address is the operator's explicit
/// choice; it is said so in the log.
fn bind_metrics(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(Error::io(format!(
            "listening for metrics on {addr} ([metrics] listen)"
        )))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics are served on a non-loopback address, as [metrics] listen says");
    }
    info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(listener)
}

async fn serve(config: Config, path: Option<PathBuf>) -> Result<()> {
    let open_files = raise_fd_limit();
    set_priority(config.nice);
    // Refusals first, before any program is loaded or attached: another
    // daemon on this socket, or on these pins (whose lock is then held for
    // the daemon's life).
    socket_file::refuse_if_listening(&config)?;
    // A node that cannot name itself cannot join its fleet: refused here.
    let fleet_node = match &config.fleet {
        Some(f) => Some(crate::fleet::node_name(f.node.as_deref()).map_err(Error::Setup)?),
        None => None,
    };
    let _pin_lock = lock_pin_path(&config.pin_path)?;
    let Started {
        enforcer,
        kernel_log,
    } = Enforcer::start(&config)?;
    let timer_fd = tasks::watch(enforcer.timer().as_fd(), "deadline timer")?;
    let events_fd = tasks::watch(enforcer.events_fd(), "flow-event ring buffer")?;
    let telemetry = Telemetry::default();
    let audit = Audit::open(
        config.audit_file.as_deref(),
        telemetry.metrics.clone(),
        telemetry.events.clone(),
        telemetry.audit.clone(),
    )?;
    // The metrics endpoint first: once the control socket takes a
    // connection (what a supervisor or a test waits for), /metrics and
    // /healthz take one too.
    let metrics_listener = match config.metrics_listen {
        None => None,
        Some(addr) => Some(bind_metrics(addr)?),
    };
    let listener = socket_file::bind_control_socket(&config)?;

    let wall_clock = WallClockWatch::new().map_err(Error::io("watching the wall clock"))?;
    let mut core = Core::new(enforcer, Box::new(audit), config.clone());
    core.adopt();
    // The wall clock may have been set while no daemon ran.
    core.follow_wall_clock();
    let state: Shared = Arc::new(Mutex::new(core));
    // SAFETY: the AsyncFd owns the watch, whose descriptor stays open and
    // unreplaced for as long as it is registered.
    match unsafe { AsyncFd::register(wall_clock) } {
        Ok(fd) => {
            tokio::spawn(tasks::follow_wall_clock(state.clone(), fd));
        }
        Err(e) => error!(
            "cannot watch the wall clock ({e}): expires_at deadlines will not follow a clock change"
        ),
    }
    tokio::spawn(tasks::run_timer(state.clone(), timer_fd));
    tokio::spawn(tasks::read_events(state.clone(), events_fd));
    if let Some(log) = kernel_log {
        tokio::spawn(tasks::read_kernel_log(log));
    }
    if let Some(listener) = metrics_listener {
        tokio::spawn(health::serve(listener, state.clone(), telemetry.clone()));
    }
    tokio::spawn(notify::run_watchdog(state.clone()));
    tokio::spawn(tasks::keep_kill_path_warm(state.clone()));
    let mut fleet_link = places::Link::default();
    if let (Some(fleet), Some(node)) = (config.fleet.clone(), fleet_node) {
        fleet_link = places::Link::new(&node, &fleet.prefix, config.max_ttl_ns);
        tokio::spawn(fleet::run(state.clone(), fleet, node, fleet_link.clone()));
    }
    if !config.forward_interfaces.is_empty() {
        let watch = crate::enforcer::links::LinkWatch::open()
            .map_err(Error::io("watching link events (for [forward] interfaces)"))?;
        // SAFETY: the AsyncFd owns the socket, open and unreplaced, for as
        // long as it is registered.
        let fd = unsafe { AsyncFd::register(watch) }
            .map_err(|e| Error::io("registering the link watch")(e.into()))?;
        tokio::spawn(tasks::follow_links(
            state.clone(),
            fd,
            config.forward_interfaces.clone(),
            config.forward_attach,
            telemetry.clone(),
        ));
    }

    let mut terminate =
        signal(SignalKind::terminate()).map_err(Error::io("installing SIGTERM handler"))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(Error::io("installing SIGINT handler"))?;
    let mut hangup =
        signal(SignalKind::hangup()).map_err(Error::io("installing SIGHUP handler"))?;
    info!(socket = %config.socket.display(), "reaper daemon ready");
    telemetry
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    set_realtime(config.realtime_priority);
    notify::ready();
    let accept = server::accept_loop(
        listener,
        state.clone(),
        &config,
        open_files,
        telemetry.clone(),
        fleet_link,
    );
    tokio::pin!(accept);
    loop {
        tokio::select! {
            _ = &mut accept => break,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => tasks::reload(&state, path.as_deref(), &telemetry),
        }
    }
    notify::stopping();
    let _ = std::fs::remove_file(&config.socket);
    info!("stopping; the pinned programs keep enforcing every deadline until the next start");
    Ok(())
}
