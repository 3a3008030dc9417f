//! The daemon thread's scheduling class: real-time (SCHED_FIFO) for the
//! deadlines' run, ordinary (at its nice value) for everything else.
//!
//! Why real-time: on a busy 2-core machine the thread was preempted in the
//! middle of a kill (100k live flows: a slow destroy took 4.5 ms of wall
//! time and 0.1 ms of CPU time). The timer fires 0.5 ms before a deadline,
//! and the rest is spun out at real-time priority, so the wake-up itself
//! has that much slack at the ordinary class.
//!
//! Why only then: raised for good, the thread served callers' requests,
//! flow events and `/metrics` at real-time priority too, work others decide
//! the amount of (a local user flooding requests must not get a real-time
//! core); and dropping it to ordinary around each of those polls cost two
//! syscalls and a preemption each, which halved lock-step grants. Deadlines
//! are what privileged callers scheduled, and their run is bounded by them.
//!
//! The state is the calling thread's: the daemon is one thread, and
//! `SCHED_RESET_ON_FORK` keeps anything it starts ordinary.

use std::cell::Cell;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Never raised (the default, `realtime_priority = 0`, or refused).
    Off,
    /// Allowed up to `priority`; `urgent` says whether it is raised now.
    On { priority: u8, urgent: bool },
}

thread_local! {
    static STATE: Cell<State> = const { Cell::new(State::Off) };
}

/// Lets [`set_urgent`] raise the calling thread to SCHED_FIFO at
/// `priority` (1-99). Tried once here, so that a refusal is told at start.
pub fn enable(priority: u8) -> std::io::Result<()> {
    set_class(Some(priority))?;
    set_class(None)?;
    STATE.with(|s| {
        s.set(State::On {
            priority,
            urgent: false,
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
                // Raising is what `enable` was allowed to do; lowering
                // needs no privilege. A refusal leaves the thread as it
                // was, which the state then says.
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
    fn urgent_raises_for_its_length_and_nests() {
        std::thread::spawn(|| {
            if enable(1).is_err() {
                // Not allowed here (no CAP_SYS_NICE, no RLIMIT_RTPRIO):
                // the refusal must leave the thread ordinary and off.
                assert_eq!(policy(), libc::SCHED_OTHER);
                assert!(!set_urgent(true));
                assert_eq!(policy(), libc::SCHED_OTHER);
                return;
            }
            assert_eq!(policy(), libc::SCHED_OTHER, "enabled is not raised");
            let inside = urgent(|| {
                // A thread started while raised is ordinary.
                let child = std::thread::spawn(policy).join().unwrap();
                (policy(), urgent(policy), policy(), child)
            });
            assert_eq!(
                inside,
                (
                    libc::SCHED_FIFO,
                    libc::SCHED_FIFO,
                    libc::SCHED_FIFO,
                    libc::SCHED_OTHER
                ),
                "raised, still raised after a nested run, children ordinary"
            );
            assert_eq!(policy(), libc::SCHED_OTHER, "lowered after");
        })
        .join()
        .unwrap();
    }
}
