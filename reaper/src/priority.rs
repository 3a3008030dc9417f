//! The daemon thread's scheduling class: real-time (SCHED_FIFO) while it
//! waits for a deadline and while it kills, ordinary while it does what
//! others can cause.
//!
//! Why real-time at all: a thread of ordinary class woken by its timer
//! queues behind whatever else runs, and on a busy 2-core machine that
//! wait, not the kill, was most of a late kill (100k live flows: kill
//! lateness p99 2.3-5.3 ms at nice -10, 1.5 ms at SCHED_FIFO; the thread's
//! CPU time around a slow destroy was 0.1 ms of a 4.5 ms wall).
//!
//! Why not always: a caller's requests, the flow events of anyone's
//! connections and the metrics endpoint are work others decide the amount
//! of. A local user flooding them must not get a real-time core, so that
//! work is polled through [`Ordinary`], which drops the thread to its
//! ordinary class (its nice value kept) for each poll and raises it again
//! after; a kill that comes due in the middle of it (the core runs due
//! deadlines before each request) is raised for its own length by
//! [`urgent`]. What stays real-time is the wake-up and what privileged
//! callers scheduled: deadlines, fence ends, idle checks.
//!
//! The state is the calling thread's: the daemon is one thread, and
//! `SCHED_RESET_ON_FORK` keeps every thread it starts (the audit writer,
//! tokio's blocking pool) and every process ordinary.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Never raised (the default, `realtime_priority = 0`, or refused).
    Off,
    /// Raised to `priority`; `urgent` says whether it is now.
    On { priority: u8, urgent: bool },
}

thread_local! {
    static STATE: Cell<State> = const { Cell::new(State::Off) };
}

/// Raises the calling thread to SCHED_FIFO at `priority` (1-99), for good
/// unless [`Ordinary`] lowers it for a while.
pub fn enable(priority: u8) -> std::io::Result<()> {
    set_class(Some(priority))?;
    STATE.with(|s| {
        s.set(State::On {
            priority,
            urgent: true,
        })
    });
    Ok(())
}

/// Sets whether the thread runs real-time now; returns whether it did.
/// Nothing (and no syscall) when real-time is off or unchanged.
pub fn set_urgent(urgent: bool) -> bool {
    STATE.with(|s| match s.get() {
        State::Off => false,
        State::On {
            priority,
            urgent: was,
        } => {
            if was != urgent {
                // Lowering needs no privilege; raising again is what
                // `enable` was allowed to do. A refusal leaves the thread
                // as it was, which the state then says.
                if set_class(urgent.then_some(priority)).is_ok() {
                    s.set(State::On { priority, urgent });
                }
            }
            was
        }
    })
}

/// Runs `f` at real-time priority (if real-time is on), restoring the
/// class it found.
pub fn urgent<R>(f: impl FnOnce() -> R) -> R {
    let was = set_urgent(true);
    let r = f();
    set_urgent(was);
    r
}

fn set_class(fifo: Option<u8>) -> std::io::Result<()> {
    let (policy, priority) = match fifo {
        Some(p) => (libc::SCHED_FIFO, libc::c_int::from(p)),
        None => (libc::SCHED_OTHER, 0),
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: plain syscall on the calling thread (pid 0), with a valid
    // in-pointer.
    let rc = unsafe { libc::sched_setscheduler(0, policy | libc::SCHED_RESET_ON_FORK, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A future polled at the thread's ordinary class: for work whose amount
/// others decide (see the module's header).
pub struct Ordinary<F>(Pin<Box<F>>);

impl<F: Future> Ordinary<F> {
    pub fn new(work: F) -> Ordinary<F> {
        Ordinary(Box::pin(work))
    }
}

impl<F: Future> Future for Ordinary<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let was = set_urgent(false);
        let r = self.0.as_mut().poll(cx);
        set_urgent(was);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> libc::c_int {
        // SAFETY: plain syscall on the calling thread.
        unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
    }

    #[test]
    fn off_changes_nothing() {
        std::thread::spawn(|| {
            let before = policy();
            assert!(!set_urgent(true), "off is never urgent");
            assert_eq!(urgent(policy), before);
            assert!(!set_urgent(false));
            assert_eq!(policy(), before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn urgent_and_ordinary_nest_and_restore() {
        std::thread::spawn(|| {
            if enable(1).is_err() {
                // Not allowed here (no CAP_SYS_NICE, no RLIMIT_RTPRIO):
                // the refusal must leave the thread ordinary and off.
                assert_eq!(policy(), libc::SCHED_OTHER);
                assert!(!set_urgent(true));
                assert_eq!(policy(), libc::SCHED_OTHER);
                return;
            }
            assert_eq!(policy(), libc::SCHED_FIFO);
            let was = set_urgent(false);
            assert!(was);
            assert_eq!(policy(), libc::SCHED_OTHER);
            assert_eq!(urgent(policy), libc::SCHED_FIFO, "a kill inside is raised");
            assert_eq!(policy(), libc::SCHED_OTHER, "and lowered after");
            set_urgent(was);
            assert_eq!(policy(), libc::SCHED_FIFO);
            // A thread started now is ordinary.
            let child = std::thread::spawn(policy).join().unwrap();
            assert_eq!(child, libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
