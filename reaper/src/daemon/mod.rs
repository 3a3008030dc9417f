//! `reaper daemon`: wires the enforcer, the state and the control socket
//! together on one single-threaded runtime.
//!
//! Tasks: the control-socket acceptor (a task per connection), the deadline
//! timer, the flow-event reader and the kernel-log reader. They share the
//! state behind one mutex, held only for short synchronous sections (never
//! across an await), which keeps every request and every kill atomic.

mod audit;
mod commands;
mod connection;
mod state;
mod throttle;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use reaper_common::FlowEvent;
use tokio::io::unix::AsyncFd;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};

use crate::clock::{DeadlineTimer, WallClockWatch};
use crate::config::Config;
use crate::enforcer::{Enforcer, KernelLog, Started};
use crate::error::{Error, Result};
use crate::policy;
use crate::protocol::{parse_request, Refusal, RefusalCode, Response, MAX_LINE_BYTES};
use audit::Audit;
use connection::{Connection, Incoming};
use state::{Caller, State};

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    // A panic inside a handler must not take the whole control plane down.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the daemon with `config`, read from `path` (reloaded from there on
/// SIGHUP) or the defaults.
pub fn run(config: Config, path: Option<PathBuf>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the async runtime"))?;
    runtime.block_on(serve(config, path))
}

/// Raises the soft limit on open files to the hard one: every control
/// client holds a descriptor, and a thousand idle ones must not starve the
/// rest (the common default soft limit is 1024).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out-pointer, then a valid in-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn serve(config: Config, path: Option<PathBuf>) -> Result<()> {
    raise_fd_limit();
    let Started {
        enforcer,
        mut events,
        kernel_log,
    } = Enforcer::start(&config)?;
    // Events queued while no daemon ran are stale: the maps, scanned by
    // `adopt` right after, are the truth. Only later events are applied.
    while events.next().is_some() {}
    let timer = DeadlineTimer::new().map_err(Error::io("creating the deadline timer"))?;
    let timer_fd = timer_watch(&timer)?;
    let audit = Audit::open(config.audit_file.as_deref())?;
    let listener = bind_control_socket(&config)?;

    let wall_clock = WallClockWatch::new().map_err(Error::io("watching the wall clock"))?;
    let mut state = State::new(enforcer, timer, audit, config.clone());
    state.adopt();
    // The wall clock may have been set while no daemon ran.
    state.follow_wall_clock();
    let state: Shared = Arc::new(Mutex::new(state));
    // SAFETY: the AsyncFd owns the watch, whose descriptor stays open and
    // unreplaced for as long as it is registered.
    match unsafe { AsyncFd::register(wall_clock) } {
        Ok(fd) => {
            tokio::spawn(follow_wall_clock(state.clone(), fd));
        }
        Err(e) => error!(
            "cannot watch the wall clock ({e}): expires_at deadlines will not follow a clock change"
        ),
    }

    tokio::spawn(run_timer(state.clone(), timer_fd));
    tokio::spawn(read_events(state.clone(), events));
    if let Some(log) = kernel_log {
        tokio::spawn(read_kernel_log(log));
    }

    let mut terminate =
        signal(SignalKind::terminate()).map_err(Error::io("installing SIGTERM handler"))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(Error::io("installing SIGINT handler"))?;
    let mut hangup =
        signal(SignalKind::hangup()).map_err(Error::io("installing SIGHUP handler"))?;
    let clients = Arc::new(AtomicUsize::new(0));
    let mut busy = throttle::Throttle::new(Duration::from_secs(10));
    info!(socket = %config.socket.display(), "reaper daemon ready");
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match ClientSlot::take(&clients, config.max_clients) {
                    Some(slot) => {
                        tokio::spawn(serve_client(state.clone(), stream, config.client_timeout, slot));
                    }
                    None => refuse_busy(stream, config.max_clients, &mut busy),
                },
                Err(e) => {
                    // Out of descriptors, most likely: retrying at once would
                    // spin; the timers and events go on meanwhile.
                    warn!("accepting a control connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },_ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => reload(&state, path.as_deref()),
        }
    }
    let _ = std::fs::remove_file(&config.socket);
    info!("stopping; the pinned programs keep enforcing every deadline until the next start");
    Ok(())
}

/// SIGHUP: re-reads the config file. A file that does not load is refused
/// as a whole, with the error logged and shown by `status`; the running
/// config stays in force and no grant is touched either way.
fn reload(state: &Shared, path: Option<&Path>) {
    let Some(path) = path else {
        warn!("SIGHUP ignored: the daemon runs on the default config, with no file to reload");
        return;
    };
    let mut s = lock(state);
    let loaded = Config::load(path).map_err(|e| e.to_string());
    match loaded.and_then(|new| s.reload(new)) {
        Ok(restart_only) => {
            info!(config = %path.display(), "config reloaded; live grants keep their terms");
            if !restart_only.is_empty() {
                warn!(keys = ?restart_only, "these keys changed but take effect only at the next start");
            }
        }
        Err(e) => {
            error!("config reload refused, the running config stays in force: {e}");
            s.last_reload_error = Some(e);
        }
    }
}

/// A second descriptor for the timer, for the reactor to watch.
fn timer_watch(timer: &DeadlineTimer) -> Result<AsyncFd<OwnedFd>> {
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

async fn run_timer(state: Shared, fd: AsyncFd<OwnedFd>) {
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!("deadline timer failed: {e}");
                return;
            }
        };
        guard.clear_ready();
        let mut s = lock(&state);
        match s.timer().acknowledge() {
            Ok(()) => s.run_due(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => error!("reading the deadline timer: {e}"),
        }
    }
}

/// Moves `expires_at` deadlines whenever someone sets the wall clock.
async fn follow_wall_clock(state: Shared, fd: AsyncFd<WallClockWatch>) {
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

async fn read_events(state: Shared, ring: RingBuf<MapData>) {
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

async fn read_kernel_log(log: aya_log::EbpfLogger<KernelLog>) {
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

/// One of the `max_clients` control connections; given back when dropped.
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<ClientSlot> {
        // Only the accept loop takes slots, so a load then an add is exact.
        if count.load(Ordering::Relaxed) >= max {
            return None;
        }
        count.fetch_add(1, Ordering::Relaxed);
        Some(ClientSlot(count.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Past `max_clients`, a new connection gets one error line (if its buffer
/// takes it at once; nothing waits on it) and is closed: the daemon's
/// descriptors and memory stay bounded whatever clients do.
fn refuse_busy(stream: UnixStream, max: usize, warning: &mut throttle::Throttle) {
    if let Some(refused) = warning.hit(std::time::Instant::now()) {
        warn!(
            max_clients = max,
            refused, "control connections refused: too many clients"
        );
    }
    let refusal = Refusal::new(
        RefusalCode::Busy,
        format!("too many control connections (max_clients = {max}); try again later"),
    );
    let _ = stream.try_write(Response::refused(None, refusal).to_line().as_bytes());
}

async fn serve_client(state: Shared, stream: UnixStream, timeout: Duration, _slot: ClientSlot) {
    let caller = match stream.peer_cred() {
        Ok(c) => Caller {
            uid: c.uid(),
            gid: c.gid(),
        },
        Err(e) => {
            warn!("reading peer credentials: {e}");
            return;
        }
    };
    let mut conn = Connection::new(stream, timeout);
    loop {
        let incoming = match conn.next().await {
            Ok(i) => i,
            Err(e) => {
                debug!("control connection error: {e}");
                return;
            }
        };
        let response = match incoming {
            Incoming::Line { line, fds } => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match parse_request(&line) {
                    Ok(request) => {
                        let outcome = lock(&state).handle(request.command, caller, &fds);
                        match outcome {
                            Ok(result) => Response::ok(request.id, result),
                            Err(refusal) => Response::refused(request.id, refusal),
                        }
                    }
                    Err((id, refusal)) => Response::refused(id, refusal),
                }
            }
            Incoming::Closed { partial } => {
                if partial {
                    debug!("control client left in the middle of a request; ignored");
                }
                return;
            }
            Incoming::TooLong => {
                let refusal = Refusal::new(
                    RefusalCode::LineTooLong,
                    format!(
                        "request line longer than {MAX_LINE_BYTES} bytes; closing the connection"
                    ),
                );
                let _ = conn.send(&Response::refused(None, refusal).to_line()).await;
                return;
            }
            Incoming::Stalled => {
                let refusal = Refusal::new(
                    RefusalCode::TimedOut,
                    format!(
                        "request line left unfinished for {} (client_timeout); closing the connection",
                        policy::format_duration(timeout.as_nanos() as u64)
                    ),
                );
                let _ = conn.send(&Response::refused(None, refusal).to_line()).await;
                return;
            }
        };
        conn.queue(&response.to_line());
        // A client that pipelines gets the answers to one read's worth of
        // requests (16 KiB) in one write; nobody waits for a request that
        // has not arrived, and the queue never holds more than that.
        if !conn.has_line() && conn.flush().await.is_err() {
            return;
        }
    }
}

fn bind_control_socket(config: &Config) -> Result<UnixListener> {
    let path = &config.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Setup(format!(
                "another reaper daemon is listening on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(Error::io(format!("removing stale {}", path.display())))?;
    }
    let listener =
        UnixListener::bind(path).map_err(Error::io(format!("binding {}", path.display())))?;
    set_socket_access(path, config)?;
    Ok(listener)
}

fn set_socket_access(path: &Path, config: &Config) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))
        .map_err(Error::io(format!("setting the mode of {}", path.display())))?;
    if let Some(gid) = config.socket_group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(Error::io(format!(
            "setting the group of {}",
            path.display()
        )))?;
    }
    Ok(())
}
