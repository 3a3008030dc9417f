//! The seam between the daemon core and the kernel: everything the core
//! asks of the machine (the pinned maps, the kill mechanics, namespaces,
//! the clocks and the deadline timer), as one trait.
//!
//! The enforcer implements it for real (`crate::enforcer`); the core's unit
//! tests implement it in memory and record the order of every write, which
//! is how the crash-safe write order is checked without root. Neither side
//! depends on the other: both depend on this module.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::path::Path;

use reaper_common::{Flow, FlowEvent, FlowTuple, Forwarded, PendingGrant, SessionRecord};

use crate::config::Config;
use crate::error::Result;
use crate::policy::Now;

/// How a local flow is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KillPath {
    /// netlink SOCK_DESTROY: the socket is aborted, the peer gets a RST.
    Destroy,
    /// Without SOCK_DESTROY (kernel built without it, or `socket_destroy =
    /// false`): a RST with the exact sequence number to each end, and the
    /// in-kernel drop.
    Rst,
    /// A flow this host forwards: a RST to each end out of the interface it
    /// lives behind, and the tc program drops the rest.
    Forward,
}

impl KillPath {
    pub fn name(self) -> &'static str {
        match self {
            KillPath::Destroy => "destroy",
            KillPath::Rst => "rst",
            KillPath::Forward => "forward",
        }
    }
}

/// One socket, as the kill mechanics reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketRef {
    pub cookie: u64,
    pub tuple: FlowTuple,
    /// The namespace the socket lives in (whose sock_diag reaches it).
    pub netns_cookie: u64,
}

/// What the kernel said about one destroy (or one RST kill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestroyOutcome {
    /// Aborted: the peer got a RST.
    Destroyed,
    /// No such socket (it closed on its own), or the addresses now belong to
    /// another socket (cookie mismatch): nothing was touched.
    Gone,
    /// The kernel refused (errno); the in-kernel drop stays in force.
    Failed(i32),
}

/// How long ago a socket last received and sent data, from tcp_info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    pub last_recv_ago_ms: u32,
    pub last_sent_ago_ms: u32,
}

/// What reading a socket's activity gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    Seen(Activity),
    /// No such socket (closed, or its namespace is gone).
    Gone,
    /// The request failed: no evidence either way.
    Unknown,
}

/// A TCP socket as seen through a descriptor a client passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketInfo {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Why a network namespace a request named cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} network namespace {path} ({why})")]
pub struct NetnsError {
    /// What failed: `open`, `enter` or `identify`.
    pub action: &'static str,
    pub path: String,
    pub why: String,
}

/// What the daemon core asks of the kernel. Map writes return `Ok(false)`
/// where the map says "no": a full table for inserts, a closed flow for
/// `update_flow`. Removals of what is already gone are not errors.
pub trait Kernel {
    // --- clocks and the deadline timer
    fn now(&self) -> Now;
    /// Arms the one deadline timer for `at` (boot clock), `None` disarms.
    /// It may fire a little early (the lead of `wait_until`).
    fn arm_timer(&mut self, at: Option<u64>);
    /// Returns once the clock reaches `at` if the timer fired early for it;
    /// at once otherwise (never before `at` when it waits).
    fn wait_until(&self, at: u64);
    /// Says whether what follows is a kill (the deadlines' run) that must
    /// not queue behind other work: the thread runs at real-time priority
    /// while it is, if so configured. Returns what it was.
    fn set_urgent(&mut self, urgent: bool) -> bool;

    // --- where the enforcer stands
    fn kill_path(&self) -> KillPath;
    /// Cookie of the daemon's own network namespace.
    fn own_netns(&self) -> u64;
    fn cgroup(&self) -> &Path;
    fn pin_path(&self) -> &Path;

    // --- FLOWS: tracked connections, by socket cookie
    fn flows(&self) -> Vec<(u64, Flow)>;
    fn flow(&self, cookie: u64) -> Option<Flow>;
    fn update_flow(&mut self, cookie: u64, flow: &Flow) -> Result<bool>;
    fn remove_flow(&mut self, cookie: u64);
    /// Writes many flows' entries, each created or replaced, in as few
    /// calls as the kernel allows. Unlike `update_flow`, a batch cannot
    /// write "only if it is there": the entry of a socket that closed since
    /// may come back, so the core removes a granted flow's entry when its
    /// close event comes. Returns the writes the kernel refused, with why.
    fn put_flows(&mut self, flows: &[(u64, Flow)]) -> Vec<(u64, String)> {
        put_each(flows, None, |(cookie, flow)| {
            self.update_flow(*cookie, flow)
        })
    }
    /// The flow events the kernel queued since the last call, in order.
    fn take_events(&mut self) -> Vec<FlowEvent>;
    /// How many events the kernel could not queue (ring buffer full) since
    /// it started: when this moves, the index may miss flows.
    fn events_lost(&self) -> u64;
    /// Makes the flow writes since the last call visible to the packet
    /// path, which caches flows per CPU (one epoch bump for a whole batch).
    /// The core calls it after each batch and before any destroy.
    fn publish_flows(&mut self) -> Result<()>;

    // --- SESSIONS: session records, by id
    fn sessions(&self) -> Vec<(u64, SessionRecord)>;
    fn put_session(&mut self, id: u64, record: &SessionRecord) -> Result<bool>;
    fn remove_session(&mut self, id: u64);
    /// Writes many session records, each created or replaced, in as few
    /// calls as the kernel allows. Returns the records the kernel refused,
    /// with why.
    fn put_sessions(&mut self, records: &[(u64, SessionRecord)]) -> Vec<(u64, String)> {
        put_each(records, Some(SESSIONS_FULL), |(id, record)| {
            self.put_session(*id, record)
        })
    }
    /// Removes many session records at once.
    fn remove_sessions(&mut self, ids: &[u64]) {
        for id in ids {
            self.remove_session(*id);
        }
    }

    // --- PENDING: grants for connections to come
    fn pending(&self) -> Vec<(FlowTuple, PendingGrant)>;
    fn pending_grant(&self, key: &FlowTuple) -> Option<PendingGrant>;
    fn put_pending(&mut self, key: &FlowTuple, grant: &PendingGrant) -> Result<bool>;
    /// Writes many pending entries, each created or replaced, in as few
    /// calls as the kernel allows. Returns the keys the kernel refused,
    /// with why.
    fn put_pendings(&mut self, entries: &[(FlowTuple, PendingGrant)]) -> Vec<(FlowTuple, String)> {
        put_each(entries, Some(PENDING_FULL), |(key, grant)| {
            self.put_pending(key, grant)
        })
    }
    fn remove_pending(&mut self, key: &FlowTuple);

    /// Tracked flows per socket owner uid with any (`OWNER_FLOWS`); root
    /// and sockets older than reaper count under no owner, and are absent.
    fn flow_holders(&self) -> Vec<(u32, u64)>;

    // --- FORWARDED and its grants: flows this host routes
    fn forwarded(&self, key: &FlowTuple) -> Option<Forwarded>;
    fn forwarded_flows(&self) -> Vec<(FlowTuple, Forwarded)>;
    fn forwarded_grant(&self, key: &FlowTuple) -> Option<PendingGrant>;
    fn forwarded_grants(&self) -> Vec<(FlowTuple, PendingGrant)>;
    fn put_forwarded_grant(&mut self, key: &FlowTuple, grant: &PendingGrant) -> Result<bool>;
    /// Takes a forwarded flow's grant back (the flow stays known).
    fn remove_forwarded_grant(&mut self, key: &FlowTuple);
    /// Forgets a forwarded flow: its entry and any grant.
    fn remove_forwarded(&mut self, key: &FlowTuple);

    // --- kill mechanics
    /// Destroys the sockets (SOCK_DESTROY); outcomes in order.
    fn destroy(&mut self, sockets: &[SocketRef]) -> Vec<DestroyOutcome>;
    /// Kills local sockets without SOCK_DESTROY: exact RSTs to each end.
    fn reset(&mut self, sockets: &[(SocketRef, Flow)]) -> Vec<DestroyOutcome>;
    /// Sends each end of a forwarded flow its RST; how many were sent.
    fn reset_forwarded(&mut self, key: &FlowTuple, flow: &Forwarded) -> usize;
    fn activity(&mut self, sockets: &[SocketRef]) -> Vec<Reading>;

    // --- namespaces and passed sockets
    /// Opens the namespace file at `path`; returns its cookie.
    fn resolve_netns(&mut self, path: &Path) -> Result<u64, NetnsError>;
    /// Lets go of a namespace whose last tracked flow closed.
    fn release_netns(&mut self, cookie: u64);
    fn namespaces_open(&self) -> usize;
    /// What a passed descriptor is; refuses anything but a connected TCP socket.
    fn inspect_socket(&self, fd: BorrowedFd<'_>) -> Result<SocketInfo, String>;

    // --- settings and counters
    /// Writes the watch and fence port sets and the fence grace.
    fn apply_ports(&mut self, config: &Config) -> Result<()>;
    fn counters(&self) -> BTreeMap<String, u64>;
}

/// Why a session record or a pending entry was refused with `Ok(false)`.
pub const SESSIONS_FULL: &str = "the kernel session table is full";
pub const PENDING_FULL: &str = "the kernel pre-registration table is full";

/// Makes each write with `put`, one call each; returns the keys of those
/// refused, with why. `Ok(false)` is a refusal saying `refused_as` (a
/// full table), or none where that is `None` (a flow that closed: its
/// close event says the rest).
pub fn put_each<K: Copy, V>(
    writes: &[(K, V)],
    refused_as: Option<&str>,
    mut put: impl FnMut(&(K, V)) -> Result<bool>,
) -> Vec<(K, String)> {
    let mut refused = Vec::new();
    for write in writes {
        match put(write) {
            Ok(true) => {}
            Ok(false) => {
                if let Some(why) = refused_as {
                    refused.push((write.0, why.to_string()));
                }
            }
            Err(e) => refused.push((write.0, crate::error::chain(&e))),
        }
    }
    refused
}
