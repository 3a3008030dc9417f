//! `reaper`: kernel-enforced deadlines for console connections.
//!
//! Layers, from the bottom; each module uses only those listed before it
//! (docs/architecture.md draws the map):
//! * pure: `timefmt` (times and durations as text), `tuple` (flow tuples
//!   and addresses), `throttle` (repeated warnings), `policy` (the rules),
//!   `config` (the file), `protocol` (the control protocol, spoken by the
//!   daemon and by the CLI), `fleet::record` (what nodes keep in etcd);
//!   `error`, the set-up error every layer returns;
//! * `kernel`: the seam, everything the daemon core asks of the kernel;
//! * `daemon::core`: what happens to sessions and flows, behind the seam;
//! * `clock`, `priority` and `enforcer`: the real kernel side of the seam
//!   (programs, maps, kill mechanics, timers, the thread's scheduling);
//! * `daemon`: the control plane around the core (socket, the wire adapter,
//!   audit trail, metrics, live events, systemd notify, tasks) and the
//!   wiring; `logging`, its operational log;
//! * `fleet::etcd`: the etcd client, the daemon's and the CLI's way to the
//!   fleet;
//! * `client`: the Rust client of the protocol; `cli`: the `reaper`
//!   command, built on it.
//!
//! A library so that the fuzz targets (`fuzz/`) reach the parsers.

pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod enforcer;
pub mod error;
pub mod fleet;
pub mod fuzzing;
pub mod kernel;
pub mod logging;
pub mod policy;
pub mod priority;
pub mod protocol;
pub mod throttle;
pub mod timefmt;
pub mod tuple;
