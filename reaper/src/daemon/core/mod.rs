//! The daemon core: what happens to sessions and flows. It speaks to the
//! kernel only through the `Kernel` seam and to the audit trail only
//! through `AuditSink`, and hands out domain values (`model`), so all of it
//! runs in unit tests without root (`tests`, over `fake::FakeKernel`).
//!
//! Where to look:
//! * `ops/` — one file per control operation (grant, extend, touch,
//!   revoke, list, status) and the dispatch with the access check;
//! * `due` — what happens when the timer fires: deadlines, idle checks,
//!   fence ends, RST checks, garbage collection;
//! * `kill` — the kill pipeline, the one way any flow dies;
//! * `ended` — the connections a session still expected when it ended;
//! * `sync` — kernel → daemon: adoption at start, ring-buffer events,
//!   wall-clock moves;
//! * `store` — writes that keep kernel and index in step, in the
//!   crash-safe order;
//! * `index`, `schedule` — pure data: who is where, what is due when.
//!
//! Dependencies run one way: ops and due and sync → kill → store → index
//! and schedule.
//!
//! The write order every operation keeps, so that a crash at any point
//! leaves the kernel enforcing something safe:
//! * grant: session record, then each flow's deadline (or pending entry);
//! * kill: each flow's deadline (the backstop drops from then on), then
//!   the socket destroy, then the session record.

#![forbid(unsafe_code)]

mod due;
mod ended;
pub mod fleet;
mod fleet_sessions;
mod index;
mod kill;
pub mod model;
mod ops;
mod schedule;
mod store;
mod sync;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use crate::config::{Config, ConfigError};
use crate::kernel::Kernel;
use crate::policy::DeadlineLimits;
pub use fleet_sessions::{HeldPlace, Publish};
use index::Index;
use kill::RstChecks;
pub use model::{AuditSink, Outcome, Refused};
pub use ops::Caller;
use schedule::Schedule;
use store::Staged;

use crate::throttle::Throttle;

pub struct Core<K: Kernel> {
    kernel: K,
    audit: Box<dyn AuditSink>,
    config: Config,
    index: Index,
    schedule: Schedule,
    /// Grants' kernel writes, until the read's requests are settled.
    staged: Staged,
    rst_checks: RstChecks,
    /// What sessions that ended still expected (`ended`).
    ended: ended::EndedSessions,
    started_boot_ns: u64,
    /// Successful config loads (1 at start, +1 per reload), and the last
    /// reload's error: what `status` reports so operators can see a reload.
    config_loads: u64,
    last_reload_error: Option<String>,
    /// The kernel's lost-event count when the index last caught up.
    events_lost_seen: u64,
    /// The full-table warning (connections refused since the last one).
    table_full: Throttle,
    /// Unix time minus boot time, read once at start: every boot-clock
    /// instant is shown as the same wall-clock time for the daemon's life,
    /// instead of jittering with each pair of clock reads.
    wall_offset_ns: i128,
    /// Fleet revocations applied here, and the locks standing.
    fleet: fleet::FleetState,
}

impl<K: Kernel> Core<K> {
    /// A core over `kernel`; call `adopt` before serving requests.
    pub fn new(kernel: K, audit: Box<dyn AuditSink>, config: Config) -> Core<K> {
        let now = kernel.now();
        Core {
            kernel,
            audit,
            config,
            index: Index::new(),
            schedule: Schedule::default(),
            staged: Staged::default(),
            rst_checks: RstChecks::default(),
            ended: ended::EndedSessions::default(),
            started_boot_ns: now.boot_ns,
            config_loads: 1,
            last_reload_error: None,
            events_lost_seen: 0,
            table_full: Throttle::new(std::time::Duration::from_secs(10)),
            wall_offset_ns: now.unix_ns - now.boot_ns as i128,
            fleet: fleet::FleetState::default(),
        }
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// When the next thing is due (boot clock), if anything is.
    pub fn next_due_ns(&self) -> Option<u64> {
        self.schedule.next()
    }

    /// The kernel side itself, for the enforcer's own upkeep (re-attaching
    /// to an interface), which the core has no part in.
    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// Whether `caller` may change grants (under the config in force).
    pub fn may_change_grants(&self, caller: Caller) -> bool {
        self.config.access.allows(caller.uid, caller.gid)
    }

    /// The wall-clock time of a boot-clock instant.
    fn wall(&self, boot_ns: u64) -> i128 {
        boot_ns as i128 + self.wall_offset_ns
    }

    fn limits(&self) -> DeadlineLimits {
        DeadlineLimits {
            max_ttl_ns: self.config.max_ttl_ns,
        }
    }

    /// Ends every entry point: the kernel writes it staged are made, the
    /// flow writes become visible to the packet path at once, the timer is
    /// armed for what is due first (an operation may have moved it), and
    /// the audit lines go to the writer.
    fn settle(&mut self) {
        self.write_staged();
        if let Err(e) = self.kernel.publish_flows() {
            tracing::error!("announcing flow changes to the packet path: {e}");
        }
        self.kernel.arm_timer(self.schedule.next());
        self.audit.flush();
    }

    /// `settle` for the requests `handle` ran since the last call: the
    /// server calls it once per read's worth of requests, before it answers
    /// them, so that their grants share their kernel writes (one batched
    /// `bpf(2)` call each for the records, the flows and the pending
    /// entries, and one epoch bump, for the lot, against two or three calls
    /// a grant) and their audit lines one wake-up of the writer (once per
    /// request cost a fifth of the daemon's time at 50k grants/s).
    pub fn settle_requests(&mut self) {
        self.settle();
    }

    /// Applies a reloaded config: ports and grace go to the kernel at once;
    /// classes, limits, access and max_ttl apply to requests from now on.
    /// Live grants keep the terms they were given. Returns the keys that
    /// changed but wait for a restart.
    pub fn reload(&mut self, mut new: Config) -> Result<Vec<&'static str>, ConfigError> {
        let restart_only = self.config.restart_only_changes(&new);
        new.keep_restart_only(&self.config);
        self.kernel
            .apply_ports(&new)
            .map_err(|e| ConfigError::Apply(crate::error::chain(&e)))?;
        self.config = new;
        self.config_loads += 1;
        self.last_reload_error = None;
        Ok(restart_only)
    }

    /// Reopens the audit trail's file (SIGHUP: logrotate moved it away).
    pub fn reopen_audit(&mut self) {
        self.audit.reopen();
    }

    /// A reload that was refused: the running config stays, `status` says why.
    pub fn reload_refused(&mut self, why: String) {
        self.last_reload_error = Some(why);
    }
}
