//! The control socket: binding it, the accept loop with its client slots,
//! and one task per connection that reads request lines, runs them on the
//! core and writes the answers (through `wire`).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::connection::{Connection, Incoming};
use super::core::Caller;
use super::shared::{lock, Shared};
use super::wire;
use crate::config::Config;
use crate::protocol::{parse_request, Refusal, RefusalCode, Response, MAX_LINE_BYTES};
use crate::throttle;
use crate::timefmt;

/// Accepts control connections until the future is dropped: each gets a
/// task of its own while a slot is free, the rest one `busy` line.
pub(super) async fn accept_loop(listener: UnixListener, state: Shared, config: &Config) {
    let clients = Arc::new(AtomicUsize::new(0));
    let mut busy = throttle::Throttle::new(Duration::from_secs(10));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match ClientSlot::take(&clients, config.max_clients) {
                Some(slot) => {
                    tokio::spawn(serve_client(
                        state.clone(),
                        stream,
                        config.client_timeout,
                        slot,
                    ));
                }
                None => refuse_busy(stream, config.max_clients, &mut busy),
            },
            Err(e) => {
                // Out of descriptors, most likely: retrying at once would
                // spin; the timers and events go on meanwhile.
                warn!("accepting a control connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
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
            pid: c.pid().map_or(0, |p| p.max(0) as u32),
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
