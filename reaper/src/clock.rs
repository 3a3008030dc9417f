//! The daemon's clocks, in one place.
//!
//! Deadlines are kept on `CLOCK_BOOTTIME`: the clock `bpf_ktime_get_boot_ns`
//! reads in the kernel programs, which never jumps when someone sets the
//! wall clock and keeps counting through suspend. Wall time is only used to
//! talk to people (RFC 3339 in responses and audit events) and to convert an
//! `expires_at` when a request arrives. A deadline given as `expires_at`
//! keeps that wall time beside it: when someone sets the wall clock
//! ([`WallClockWatch`]), it is converted again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::policy::Now;

fn read(clock: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; these clocks always exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock}) failed");
    ts
}

/// How long before a deadline the timer fires. Waking a sleeping thread
/// takes 0.1-0.7 ms on the machines measured (a virtual CPU has to be woken
/// too): firing early, then spinning to the deadline, puts that latency
/// before the deadline instead of after it. It costs at most this much CPU
/// per wake-up.
pub const TIMER_LEAD_NS: u64 = 500_000;

/// Nanoseconds on `CLOCK_BOOTTIME`.
pub fn boot_ns() -> u64 {
    let ts = read(libc::CLOCK_BOOTTIME);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns() -> i128 {
    let ts = read(libc::CLOCK_REALTIME);
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Both clocks, read back to back.
pub fn now() -> Now {
    Now {
        boot_ns: boot_ns(),
        unix_ns: unix_ns(),
    }
}

/// A timerfd on `CLOCK_BOOTTIME`, armed at an absolute deadline. One timer
/// serves every deadline: the scheduler re-arms it for the earliest one, so
/// no deadline is ever found by polling.
pub struct DeadlineTimer {
    fd: OwnedFd,
    /// What the timer is armed for, while known: re-arming it for the same
    /// instant (most grants do not move the earliest deadline) is skipped.
    /// Forgotten when it fires.
    armed: std::cell::Cell<Option<Option<u64>>>,
}

impl DeadlineTimer {
    pub fn new() -> io::Result<DeadlineTimer> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe {
            libc::timerfd_create(libc::CLOCK_BOOTTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(DeadlineTimer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: std::cell::Cell::new(None),
        })
    }

    /// Fires `TIMER_LEAD_NS` before `deadline_ns` (boot clock), at once if
    /// that is past; `None` disarms. The caller then waits out the rest
    /// (`wait_until`).
    pub fn arm(&self, deadline_ns: Option<u64>) -> io::Result<()> {
        if self.armed.get() == Some(deadline_ns) {
            return Ok(());
        }
        let fire_at = deadline_ns.map(|ns| ns.saturating_sub(TIMER_LEAD_NS));
        let value = match fire_at {
            // 0 would disarm; a deadline at 0 is long past anyway.
            Some(ns) => libc::timespec {
                tv_sec: (ns.max(1) / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns.max(1) % 1_000_000_000) as libc::c_long,
            },
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: spec is valid; old value not requested.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            self.armed.set(None);
            return Err(io::Error::last_os_error());
        }
        self.armed.set(Some(deadline_ns));
        Ok(())
    }

    /// Returns once the boot clock reaches `at`, if that is within
    /// `TIMER_LEAD_NS`; at once otherwise. It spins: sleeping again would
    /// pay the wake-up latency the lead is there to absorb.
    pub fn wait_until(at: u64) {
        loop {
            let now = boot_ns();
            if now >= at || at - now > TIMER_LEAD_NS {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Consumes a pending expiry; `WouldBlock` when there is none.
    pub fn acknowledge(&self) -> io::Result<()> {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into an 8-byte buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // It fired, so it is disarmed now, whatever it was armed for.
        self.armed.set(None);
        Ok(())
    }
}

/// Becomes readable when someone sets `CLOCK_REALTIME` (settimeofday,
/// clock_settime, an NTP step; not the gradual slewing, which moves both
/// clocks alike): a timerfd armed far in the future with
/// `TFD_TIMER_CANCEL_ON_SET`, whose read then fails with ECANCELED.
pub struct WallClockWatch {
    fd: OwnedFd,
}

impl WallClockWatch {
    pub fn new() -> io::Result<WallClockWatch> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe {
            libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let watch = WallClockWatch {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        watch.arm()?;
        Ok(watch)
    }

    /// Arms (again: a cancelled timer stays cancelled until set) for a time
    /// no clock will reach.
    fn arm(&self) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                // Year 2500 or so: far, and valid for a 64-bit time_t.
                tv_sec: 16_725_225_600,
                tv_nsec: 0,
            },
        };
        // SAFETY: spec is valid; old value not requested.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the clock was set since the last call (re-arming if so);
    /// `WouldBlock` when nothing happened.
    pub fn was_set(&self) -> io::Result<bool> {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into an 8-byte buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n >= 0 {
            return Ok(false);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ECANCELED) {
            self.arm()?;
            return Ok(true);
        }
        Err(e)
    }
}

impl AsRawFd for WallClockWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl std::os::fd::AsFd for DeadlineTimer {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for DeadlineTimer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}
