//! The control socket: binding it, the accept loop with its client slots,
//! and one task per connection that reads request lines, runs them on the
//! core and writes the answers (through `wire`).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::connection::{Connection, FdBudget, Incoming};
use super::core::Caller;
use super::shared::{lock, Shared};
use super::wire;
use crate::config::Config;
use crate::protocol::{parse_request, Refusal, RefusalCode, Response, MAX_LINE_BYTES};
use crate::throttle::Throttle;
use crate::timefmt;

/// Accepts control connections until the future is dropped: each gets a
/// task of its own while its caller has a slot, the rest one `busy` line.
///
/// Passed descriptors held by all connections together stay under half of
/// `open_files` (the limit on open files), so that sockets, maps and the
/// kill path always have the rest.
pub(super) async fn accept_loop(
    listener: UnixListener,
    state: Shared,
    config: &Config,
    open_files: usize,
) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let limits = SlotLimits::of(config);
    let budget = Arc::new(FdBudget::new((open_files / 2).max(64)));
    let mut busy = Throttle::new(Duration::from_secs(10));
    let mut failing = Throttle::new(Duration::from_secs(10));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: retrying at once would
                // spin; the timers and events go on meanwhile.
                if let Some(n) = failing.hit(std::time::Instant::now()) {
                    warn!(times = n, "accepting a control connection: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(caller) = caller_of(&stream, &mut failing) else {
            continue;
        };
        let privileged = lock(&state).may_change_grants(caller);
        match ClientSlot::take(&slots, limits, caller.uid, privileged) {
            Ok(slot) => {
                let conn =
                    Connection::new(stream, config.client_timeout, privileged, budget.clone());
                tokio::spawn(serve_client(state.clone(), conn, caller, slot));
            }
            Err(why) => refuse_busy(stream, caller, &why, &mut busy),
        }
    }
}

/// Who is on the other end (SO_PEERCRED, read once at accept).
fn caller_of(stream: &UnixStream, failing: &mut Throttle) -> Option<Caller> {
    match stream.peer_cred() {
        Ok(c) => Some(Caller {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().map_or(0, |p| p.max(0) as u32),
        }),
        Err(e) => {
            if let Some(n) = failing.hit(std::time::Instant::now()) {
                warn!(times = n, "reading a control client's credentials: {e}");
            }
            None
        }
    }
}

/// The connection limits: `max_clients` in all; callers who may not change
/// grants (who can only `list` and `status`) a quarter of it together; any
/// uid but root `max_clients_per_uid`. Local users who are not even allowed
/// can then never lock the proxies and root out, nor can one proxy the rest.
#[derive(Debug, Clone, Copy)]
struct SlotLimits {
    total: usize,
    unprivileged: usize,
    per_uid: usize,
}

impl SlotLimits {
    fn of(config: &Config) -> SlotLimits {
        SlotLimits {
            total: config.max_clients,
            unprivileged: (config.max_clients / 4).max(1),
            per_uid: config.max_clients_per_uid,
        }
    }
}

/// Connections held, in all, by unprivileged callers, and per uid.
#[derive(Debug, Default)]
struct Slots {
    total: usize,
    unprivileged: usize,
    per_uid: HashMap<u32, usize>,
}

/// Connections closed for the descriptors they sent, warned about at most
/// every 10 s (a flood must not flood the log too).
static FD_REFUSALS: Mutex<Throttle> = Mutex::new(Throttle::new(Duration::from_secs(10)));

fn lock_throttle(t: &Mutex<Throttle>) -> std::sync::MutexGuard<'_, Throttle> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// One control connection's place under the limits; given back when
/// dropped.
struct ClientSlot {
    slots: Arc<Mutex<Slots>>,
    uid: u32,
    privileged: bool,
}

impl ClientSlot {
    fn take(
        slots: &Arc<Mutex<Slots>>,
        limits: SlotLimits,
        uid: u32,
        privileged: bool,
    ) -> Result<ClientSlot, String> {
        let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
        if s.total >= limits.total {
            return Err(format!(
                "too many control connections (max_clients = {})",
                limits.total
            ));
        }
        if !privileged && s.unprivileged >= limits.unprivileged {
            return Err(format!(
                "too many control connections from callers who may only read ({}, a quarter of max_clients)",
                limits.unprivileged
            ));
        }
        let held = s.per_uid.get(&uid).copied().unwrap_or(0);
        if uid != 0 && held >= limits.per_uid {
            return Err(format!(
                "uid {uid} already holds {held} control connections (max_clients_per_uid = {})",
                limits.per_uid
            ));
        }
        s.total += 1;
        s.unprivileged += usize::from(!privileged);
        *s.per_uid.entry(uid).or_default() += 1;
        Ok(ClientSlot {
            slots: slots.clone(),
            uid,
            privileged,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.total -= 1;
        s.unprivileged -= usize::from(!self.privileged);
        if let Some(n) = s.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                s.per_uid.remove(&self.uid);
            }
        }
    }
}

/// A connection past its caller's limit gets one error line (if its buffer
/// takes it at once; nothing waits on it) and is closed: the daemon's
/// descriptors and memory stay bounded whatever clients do.
fn refuse_busy(stream: UnixStream, caller: Caller, why: &str, warning: &mut Throttle) {
    if let Some(refused) = warning.hit(std::time::Instant::now()) {
        warn!(
            refused,
            last_uid = caller.uid,
            "control connections refused: {why}"
        );
    }
    let refusal = Refusal::new(RefusalCode::Busy, format!("{why}; try again later"));
    let _ = stream.try_write(Response::refused(None, refusal).to_line().as_bytes());
}

async fn serve_client(state: Shared, mut conn: Connection, caller: Caller, _slot: ClientSlot) {
    let timeout = conn.timeout();
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
                        match outcome.map_err(wire::refusal).and_then(wire::result) {
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
            Incoming::Fds(why) => {
                if let Some(n) = lock_throttle(&FD_REFUSALS).hit(std::time::Instant::now()) {
                    warn!(
                        refused = n,
                        last_uid = caller.uid,
                        "control connections closed for their descriptors: {}",
                        why.message()
                    );
                }
                let refusal = Refusal::new(
                    RefusalCode::BadFd,
                    format!("{}; closing the connection", why.message()),
                );
                let _ = conn.send(&Response::refused(None, refusal).to_line()).await;
                return;
            }
            Incoming::Stalled => {
                let refusal = Refusal::new(
                    RefusalCode::TimedOut,
                    format!(
                        "request line left unfinished for {} (client_timeout); closing the connection",
                        timefmt::format_duration(timeout.as_nanos() as u64)
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
