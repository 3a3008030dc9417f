//! The control socket: the accept loop with its client slots, and one task
//! per connection that reads request lines, runs them on the core and
//! writes the answers (through `wire`), or, after a `watch`, streams the
//! live events the core's filter admits.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::audit;
use super::connection::{Connection, FdBudget, Incoming};
use super::core::model::{EventScope, Outcome, WatchFilter};
use super::core::Caller;
use super::metrics::Metrics;
use super::places::{self, Link};
use super::shared::{lock, Shared, Telemetry};
use super::wire;
use crate::config::Config;
use crate::protocol::{
    parse_request, Answer, Command, Refusal, RefusalCode, Response, MAX_LINE_BYTES,
};
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
    telemetry: Telemetry,
    fleet: Link,
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
        match ClientSlot::take(&slots, limits, caller.uid, privileged, &telemetry.metrics) {
            Ok(slot) => {
                let conn =
                    Connection::new(stream, config.client_timeout, privileged, budget.clone());
                tokio::spawn(serve_client(
                    state.clone(),
                    conn,
                    caller,
                    slot,
                    telemetry.clone(),
                    fleet.clone(),
                ));
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
    metrics: Arc<Metrics>,
}

impl ClientSlot {
    fn take(
        slots: &Arc<Mutex<Slots>>,
        limits: SlotLimits,
        uid: u32,
        privileged: bool,
        metrics: &Arc<Metrics>,
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
        metrics.client_connected(true);
        Ok(ClientSlot {
            slots: slots.clone(),
            uid,
            privileged,
            metrics: metrics.clone(),
        })
    }

    /// Whether this is the only control connection open.
    fn alone(&self) -> bool {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).total == 1
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.metrics.client_connected(false);
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

async fn serve_client(
    state: Shared,
    mut conn: Connection,
    caller: Caller,
    slot: ClientSlot,
    telemetry: Telemetry,
    fleet: Link,
) {
    let timeout = conn.timeout();
    // The core leaves a request's grant writes staged and its audit lines
    // buffered (see `Core::settle_requests`): they are made before the
    // answers go, and, whichever way this task ends, before it ends.
    struct Settle<'a>(&'a Shared);
    impl Drop for Settle<'_> {
        fn drop(&mut self) {
            lock(self.0).settle_requests();
        }
    }
    let _settle_at_end = Settle(&state);
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
                // This task's poll runs read, parse, handle and answer in
                // one go while lines keep coming: the timer's wake-up waits
                // behind it, so what fell due is run here (and before the
                // request, and before the answer).
                lock(&state).run_due_if_due();
                match parse_request(&line) {
                    Ok(request) => {
                        let op = request.command.op().name();
                        let scope = telemetry
                            .events
                            .watched()
                            .then(|| scope_of(&request.command, caller));
                        // A batch's refusals are counted and watched one
                        // by one, each under its own op and names.
                        let item_scopes: Vec<Option<EventScope>> = match &request.command {
                            Command::Batch(items) => items
                                .iter()
                                .map(|c| scope.is_some().then(|| scope_of(c, caller)))
                                .collect(),
                            _ => Vec::new(),
                        };
                        // A fleet-limited grant takes its places in etcd first.
                        let asks = lock(&state).fleet_place_asks(&request.command, caller);
                        let outcome = if asks.is_empty() {
                            lock(&state).handle(request.command, caller, &fds)
                        } else {
                            // It waits on etcd: what the requests before
                            // it did must not wait with it.
                            lock(&state).settle_requests();
                            places::grant_with_places(
                                &state,
                                &fleet,
                                request.command,
                                caller,
                                &fds,
                                asks,
                            )
                            .await
                        };
                        if let Ok(Outcome::Batch(items)) = &outcome {
                            for ((op, item), scope) in items
                                .iter()
                                .zip(item_scopes.into_iter().chain(std::iter::repeat(None)))
                            {
                                match item {
                                    Ok(_) => telemetry.metrics.request(op.name(), "ok"),
                                    Err(r) => refused(
                                        &telemetry,
                                        op.name(),
                                        &wire::refusal(r.clone()),
                                        caller,
                                        scope,
                                    ),
                                }
                            }
                        }
                        if let Ok(Outcome::Watching(filter)) = outcome {
                            lock(&state).settle_requests();
                            telemetry.metrics.request(op, "ok");
                            let watching = Answer::Watching { watching: true };
                            conn.queue(&Response::ok_line(request.id.as_ref(), &watching));
                            stream_events(conn, filter, &telemetry).await;
                            return;
                        }
                        lock(&state).run_due_if_due();
                        match outcome {
                            Ok(outcome) => {
                                telemetry.metrics.request(op, "ok");
                                Response::ok_line(request.id.as_ref(), &wire::result(outcome))
                            }
                            Err(r) => {
                                let refusal = wire::refusal(r);
                                refused(&telemetry, op, &refusal, caller, scope);
                                Response::refused(request.id, refusal).to_line()
                            }
                        }
                    }
                    Err((id, refusal)) => {
                        refused(&telemetry, "invalid", &refusal, caller, None);
                        Response::refused(id, refusal).to_line()
                    }
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
        conn.queue(&response);
        // A client that pipelines gets the answers to one read's worth of
        // requests (16 KiB) in one write; nobody waits for a request that
        // has not arrived, and the queue never holds more than that. The
        // answers go once what they did is in the kernel and its audit
        // lines are written.
        if !conn.has_line() {
            lock(&state).settle_requests();
            // Alone, this connection's answer is all the thread has to do.
            telemetry.audit.written(slot.alone()).await;
            if conn.flush().await.is_err() {
                return;
            }
        }
    }
}

/// Whom a request's refusal concerns, for the watchers' filters: the
/// names it gave, and the caller (who sees its own refusals).
fn scope_of(command: &Command, caller: Caller) -> EventScope {
    let mut scope = EventScope {
        granted_by_uid: Some(caller.uid),
        ..EventScope::default()
    };
    match command {
        Command::Grant(g) => {
            scope.session = g.session.clone();
            scope.user = g.user.clone();
            scope.target = g.target.clone();
        }
        Command::Extend(e) => scope.session = e.session.clone(),
        Command::Touch(session) => scope.session = session.clone(),
        _ => {}
    }
    scope
}

/// Counts a refusal, and offers it to the watchers.
fn refused(
    telemetry: &Telemetry,
    op: &'static str,
    refusal: &Refusal,
    caller: Caller,
    scope: Option<EventScope>,
) {
    let code = refusal.code.name();
    telemetry.metrics.request(op, code);
    if telemetry.events.watched() {
        let scope = scope.unwrap_or(EventScope {
            granted_by_uid: Some(caller.uid),
            ..EventScope::default()
        });
        let line = audit::refusal_line(op, code, &refusal.message, caller);
        telemetry.events.publish(scope, line);
    }
}

/// After a `watch`: the events `filter` admits, one JSON line each, until
/// the client goes away. A watcher too slow to keep up with the stream is
/// told so and closed; one that stops reading altogether is closed after
/// client_timeout. Either way the daemon never waits for it.
async fn stream_events(mut conn: Connection, filter: WatchFilter, telemetry: &Telemetry) {
    use tokio::sync::broadcast::error::RecvError;
    let mut events = telemetry.events.subscribe();
    telemetry.metrics.watcher(true);
    struct Gone<'a>(&'a Metrics);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            self.0.watcher(false);
        }
    }
    let _gone = Gone(&telemetry.metrics);
    // A write that times out is a watcher that stopped reading: dropped.
    let stalled = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            telemetry.metrics.watcher_dropped();
            debug!("dropping a watcher that stopped reading");
        }
    };
    if let Err(e) = conn.flush().await {
        return stalled(e);
    }
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => {
                    if filter.admits(&event.scope) {
                        conn.queue(&event.line);
                        conn.queue("\n");
                        // Whatever else is already waiting goes in the same write.
                        while let Ok(more) = events.try_recv() {
                            if filter.admits(&more.scope) {
                                conn.queue(&more.line);
                                conn.queue("\n");
                            }
                        }
                        if let Err(e) = conn.flush().await {
                            return stalled(e);
                        }
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    telemetry.metrics.watcher_dropped();
                    warn!(missed, "dropping a watcher that reads too slowly");
                    let line = serde_json::json!({
                        "schema": audit::SCHEMA,
                        "event": "dropped",
                        "message": format!("this watcher fell {missed} events behind and is dropped; watch again"),
                    });
                    conn.queue(&format!("{line}\n"));
                    let _ = conn.flush().await;
                    return;
                }
                Err(RecvError::Closed) => return,
            },
            incoming = conn.next() => match incoming {
                // What a watcher sends is not read; its leaving ends the stream.
                Ok(Incoming::Line { .. }) => {}
                _ => return,
            },
        }
    }
}
