//! systemd's notify protocol (`Type=notify`): READY=1 once the programs
//! are attached and the control socket listens, RELOADING=1 then READY=1
//! around a SIGHUP reload, STOPPING=1 on the way out, and WATCHDOG=1 while
//! the core answers, when the unit sets `WatchdogSec`. Outside systemd
//! (no NOTIFY_SOCKET) every call is a no-op.

#![forbid(unsafe_code)]

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

use super::shared::{lock, Shared};

fn send(states: &[NotifyState]) {
    // `false`: keep NOTIFY_SOCKET, every later state goes there too.
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("telling systemd {states:?}: {e}");
    }
}

pub(super) fn ready() {
    send(&[NotifyState::Ready]);
}

/// A reload begins; `reloaded` ends it. systemd 253 and later want the
/// monotonic time with RELOADING=1; 252 ignores it.
pub(super) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub(super) fn reloaded(error: Option<&str>) {
    match error {
        None => send(&[NotifyState::Ready]),
        Some(e) => {
            let status = format!("config reload refused: {e}");
            send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
    }
}

pub(super) fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// WATCHDOG=1 at half the interval systemd asked for, each time after
/// taking the core's lock: a daemon whose core is stuck stops petting the
/// watchdog and is restarted.
pub(super) async fn run_watchdog(state: Shared) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    debug!(?every, "petting systemd's watchdog");
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        drop(lock(&state));
        send(&[NotifyState::Watchdog]);
    }
}
