//! The enforcer: kernel programs, their maps and links, and the kill
//! mechanics; the real side of the `crate::kernel::Kernel` seam.
//!
//! All state that must survive the daemon lives in maps pinned under
//! `pin_path`, and the programs stay attached through pinned links. Starting
//! the enforcer therefore *adopts* what a previous daemon left: the maps are
//! reopened from their pins, the freshly loaded programs are attached, and
//! their links replace the old pins atomically (a rename), so enforcement
//! never has a gap.
//!
//! * `load` — loading, attaching and pinning the programs (`Enforcer::start`);
//! * this file — the typed façade over the maps, as the `Kernel` trait;
//! * `kill` — destroying sockets and injecting RSTs (with `rst`, `diag`,
//!   `netns`).

mod btf;
pub mod diag;
pub mod features;
mod kill;
pub mod links;
mod load;
pub mod netns;
mod pins;
pub mod rst;
pub mod socket;
mod sys;

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::Ebpf;
use reaper_common::{
    counter, setting, watch_slot, Flow, FlowEvent, FlowTuple, Forwarded, PendingGrant, PortSet,
    PortSide, SessionRecord,
};

use crate::config::Config;
use crate::error::Result;
use crate::kernel::{DestroyOutcome, Kernel, KillPath, NetnsError, Reading, SocketInfo, SocketRef};
use crate::policy::Now;
pub use load::{cgroup2_root, detach_forwarding, port_bitmap};
pub use pins::{ensure_bpffs, lock_pin_path, unload, PinLock};

pub struct Enforcer {
    /// Keeps the programs (and the log ring buffer) alive.
    _ebpf: Ebpf,
    flows: HashMap<MapData, u64, Flow>,
    sessions: HashMap<MapData, u64, SessionRecord>,
    counters: PerCpuArray<MapData, u64>,
    watch: Array<MapData, u64>,
    settings: Array<MapData, u64>,
    /// The last `setting::FLOWS_EPOCH` written: see [`Enforcer::bump_epoch`].
    epoch: u64,
    pending: HashMap<MapData, FlowTuple, PendingGrant>,
    forwarded: HashMap<MapData, FlowTuple, Forwarded>,
    forwarded_grants: HashMap<MapData, FlowTuple, PendingGrant>,
    /// Tracked flows per socket owner uid (the kernel keeps the counts).
    owner_flows: HashMap<MapData, u32, u64>,
    /// AF_PACKET socket for RSTs to forwarded flows' ends (when forwarding).
    frames: Option<std::os::fd::OwnedFd>,
    /// The daemon's own namespace.
    own: netns::Netns,
    /// Other namespaces with tracked flows.
    namespaces: netns::Namespaces,
    /// The one deadline timer (CLOCK_BOOTTIME timerfd) the core arms.
    timer: crate::clock::DeadlineTimer,
    /// Flow events from the sock_ops program (see `Kernel::take_events`).
    events: RingBuf<MapData>,
    /// Flow writes not yet announced to the packet path (see
    /// `Kernel::publish_flows`).
    flows_dirty: bool,
    /// How local flows die.
    kill_path: KillPath,
    /// The namespace the daemon (and its destroyer) lives in.
    netns_cookie: u64,
    cgroup: PathBuf,
    pin_path: PathBuf,
    /// Whether the kernel has tcx (for re-attaching forwarding).
    has_tcx: bool,
}

/// What `Enforcer::start` hands over besides the enforcer itself.
pub struct Started {
    pub enforcer: Enforcer,
    pub kernel_log: Option<aya_log::EbpfLogger<KernelLog>>,
}

/// Forwards aya-log records from the kernel programs to `tracing`.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        match record.level() {
            log::Level::Error => tracing::error!(target: "reaper::kernel", "{}", record.args()),
            log::Level::Warn => tracing::warn!(target: "reaper::kernel", "{}", record.args()),
            _ => tracing::info!(target: "reaper::kernel", "{}", record.args()),
        }
    }
    fn flush(&self) {}
}

impl Enforcer {
    /// The flow-event ring buffer's descriptor, for the daemon's reactor to
    /// wait on (the events themselves are read with `take_events`).
    pub fn events_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.events.as_fd()
    }

    /// The deadline timer, for the daemon's reactor to wait on.
    pub fn timer(&self) -> &crate::clock::DeadlineTimer {
        &self.timer
    }

    /// Sends a destroy of a socket that cannot exist, when local flows die
    /// by SOCK_DESTROY. The kernel's destroy path runs slowly the first
    /// time after a quiet while: measured on this kind of machine, a kill
    /// 1 s after the last one took 4.6-6.0 ms, 6.5 ms of it in the
    /// SOCK_DESTROY call, against 1.1-1.8 ms when such a request had gone
    /// through within the last 100 ms. The daemon sends one every 100 ms
    /// while a kill is due within the next second.
    pub fn keep_kill_path_warm(&mut self) {
        if self.kill_path == KillPath::Destroy {
            let _ = self.own.diag.destroy_supported();
        }
    }

    /// Attaches the forwarding program to `interface` again: it was
    /// deleted and re-created, and its old attachment went with it.
    pub fn reattach_forwarding(
        &mut self,
        interface: &str,
        attach: crate::config::ForwardAttach,
    ) -> Result<()> {
        let pin = self.pin_path.join(load::forward_pin_name(interface));
        let prog = load::forward_program(&mut self._ebpf)?;
        load::attach_interface(prog, attach, self.has_tcx, interface, &pin)
    }

    /// Tells the packet path that `FLOWS` or the grace changed: it caches
    /// what it needs of a flow per CPU, and reads the flow again at its
    /// next packet when the epoch has moved. Called after the writes it
    /// announces, so what was cached before them is stale.
    fn bump_epoch(&mut self) -> Result<()> {
        self.epoch += 1;
        self.settings.set(setting::FLOWS_EPOCH, self.epoch, 0)?;
        self.flows_dirty = false;
        Ok(())
    }
}

fn is_errno(e: &MapError, errno: i32) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

/// Writes each (key, value) of `writes` into the map behind `map`, with
/// as few batched calls as the kernel's answers allow: where the kernel
/// stops at an entry (a full table, or no batch updates at all), the rest
/// goes on after it. Returns the writes it stopped at, for the caller to
/// make alone (which says why, if one fails again).
fn batch_stops<K: Copy, V: Copy>(map: &MapData, writes: &[(K, V)]) -> Vec<(K, V)> {
    use std::os::fd::AsFd;
    if writes.is_empty() {
        return Vec::new();
    }
    let (keys, values): (Vec<K>, Vec<V>) = writes.iter().copied().unzip();
    let fd = map.fd().as_fd();
    let mut stops = Vec::new();
    let mut start = 0;
    while start < keys.len() {
        let (done, error) = sys::update_batch(fd, &keys[start..], &values[start..]);
        if error.is_none() {
            break;
        }
        if done == 0 && start == 0 && stops.is_empty() {
            // Refused before the first entry: no batch updates here.
            return writes.to_vec();
        }
        stops.push(writes[start + done]);
        start += done + 1;
    }
    stops
}

/// An insert's answer: `Ok(false)` when the table is full.
fn inserted(result: std::result::Result<(), MapError>) -> Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if is_errno(&e, libc::E2BIG) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Kernel for Enforcer {
    fn now(&self) -> Now {
        crate::clock::now()
    }

    fn arm_timer(&mut self, at: Option<u64>) {
        if let Err(e) = self.timer.arm(at) {
            tracing::error!("arming the deadline timer: {e}");
        }
    }

    fn wait_until(&self, at: u64) {
        crate::clock::DeadlineTimer::wait_until(at);
    }

    fn set_urgent(&mut self, urgent: bool) -> bool {
        crate::priority::set_urgent(urgent)
    }

    fn kill_path(&self) -> KillPath {
        self.kill_path
    }

    fn own_netns(&self) -> u64 {
        self.netns_cookie
    }

    fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    fn flows(&self) -> Vec<(u64, Flow)> {
        self.flows.iter().filter_map(|r| r.ok()).collect()
    }

    fn flow(&self, cookie: u64) -> Option<Flow> {
        self.flows.get(&cookie, 0).ok()
    }

    /// Rewrites an existing flow entry; `Ok(false)` if the flow has closed in
    /// the meantime (its entry is never re-created).
    fn update_flow(&mut self, cookie: u64, flow: &Flow) -> Result<bool> {
        match self.flows.insert(cookie, flow, 2 /* BPF_EXIST */) {
            Ok(()) => {
                self.flows_dirty = true;
                Ok(true)
            }
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// One `bpf(2)` call for all of them (the grants of one read). A
    /// batch write is always "create or replace"; an entry the kernel stops
    /// at is written again alone, as `update_flow` would.
    fn put_flows(&mut self, flows: &[(u64, Flow)]) -> Vec<(u64, String)> {
        let stopped = batch_stops(IterableMap::<u64, Flow>::map(&self.flows), flows);
        self.flows_dirty |= !flows.is_empty();
        crate::kernel::put_each(&stopped, None, |(cookie, flow)| {
            self.update_flow(*cookie, flow)
        })
    }

    fn remove_flow(&mut self, cookie: u64) {
        if self.flows.remove(&cookie).is_ok() {
            self.flows_dirty = true;
        }
    }

    fn take_events(&mut self) -> Vec<FlowEvent> {
        let mut batch = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a FlowEvent; read it unaligned.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) });
            }
        }
        batch
    }

    fn events_lost(&self) -> u64 {
        self.counters
            .get(&counter::EVENTS_LOST, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    fn publish_flows(&mut self) -> Result<()> {
        if self.flows_dirty {
            self.bump_epoch()?;
        }
        Ok(())
    }

    fn sessions(&self) -> Vec<(u64, SessionRecord)> {
        self.sessions.iter().filter_map(|r| r.ok()).collect()
    }

    fn put_session(&mut self, id: u64, record: &SessionRecord) -> Result<bool> {
        inserted(self.sessions.insert(id, record, 0))
    }

    /// One `bpf(2)` call for all of them, as `put_flows`.
    fn put_sessions(&mut self, records: &[(u64, SessionRecord)]) -> Vec<(u64, String)> {
        let stopped = batch_stops(
            IterableMap::<u64, SessionRecord>::map(&self.sessions),
            records,
        );
        crate::kernel::put_each(&stopped, Some(crate::kernel::SESSIONS_FULL), |(id, r)| {
            self.put_session(*id, r)
        })
    }

    fn remove_session(&mut self, id: u64) {
        let _ = self.sessions.remove(&id);
    }

    /// One `bpf(2)` call for all of them (a mass expiry forgets 100k
    /// sessions; a call each was a fifth of its bookkeeping). A key the
    /// kernel stops at (one already gone) is stepped over; a kernel without
    /// batch deletes gets one call per session.
    fn remove_sessions(&mut self, ids: &[u64]) {
        use std::os::fd::AsFd;
        let mut rest = ids;
        while !rest.is_empty() {
            let map = IterableMap::<u64, SessionRecord>::map(&self.sessions);
            let (done, error) = sys::delete_batch(map.fd().as_fd(), rest);
            match error {
                None => return,
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
                Some(_) => {
                    for id in &rest[done..] {
                        self.remove_session(*id);
                    }
                    return;
                }
            }
        }
    }

    fn pending(&self) -> Vec<(FlowTuple, PendingGrant)> {
        self.pending.iter().filter_map(|r| r.ok()).collect()
    }

    fn pending_grant(&self, key: &FlowTuple) -> Option<PendingGrant> {
        self.pending.get(key, 0).ok()
    }

    fn put_pending(&mut self, key: &FlowTuple, grant: &PendingGrant) -> Result<bool> {
        inserted(self.pending.insert(key, grant, 0))
    }

    fn remove_pending(&mut self, key: &FlowTuple) {
        let _ = self.pending.remove(key);
    }

    /// One `bpf(2)` call for all of them, as `put_flows`.
    fn put_pendings(&mut self, entries: &[(FlowTuple, PendingGrant)]) -> Vec<(FlowTuple, String)> {
        let stopped = batch_stops(
            IterableMap::<FlowTuple, PendingGrant>::map(&self.pending),
            entries,
        );
        crate::kernel::put_each(&stopped, Some(crate::kernel::PENDING_FULL), |(key, g)| {
            self.put_pending(key, g)
        })
    }

    fn forwarded(&self, key: &FlowTuple) -> Option<Forwarded> {
        self.forwarded.get(key, 0).ok()
    }

    fn forwarded_flows(&self) -> Vec<(FlowTuple, Forwarded)> {
        self.forwarded.iter().filter_map(|r| r.ok()).collect()
    }

    fn forwarded_grant(&self, key: &FlowTuple) -> Option<PendingGrant> {
        self.forwarded_grants.get(key, 0).ok()
    }

    fn flow_holders(&self) -> Vec<(u32, u64)> {
        self.owner_flows
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, held)| *held != 0)
            .collect()
    }

    fn forwarded_grants(&self) -> Vec<(FlowTuple, PendingGrant)> {
        self.forwarded_grants
            .iter()
            .filter_map(|r| r.ok())
            .collect()
    }

    fn put_forwarded_grant(&mut self, key: &FlowTuple, grant: &PendingGrant) -> Result<bool> {
        inserted(self.forwarded_grants.insert(key, grant, 0))
    }

    fn remove_forwarded_grant(&mut self, key: &FlowTuple) {
        let _ = self.forwarded_grants.remove(key);
    }

    fn remove_forwarded(&mut self, key: &FlowTuple) {
        let _ = self.forwarded.remove(key);
        let _ = self.forwarded_grants.remove(key);
    }

    fn destroy(&mut self, sockets: &[SocketRef]) -> Vec<DestroyOutcome> {
        self.destroy_sockets(sockets)
    }

    fn reset(&mut self, sockets: &[(SocketRef, Flow)]) -> Vec<DestroyOutcome> {
        self.reset_sockets(sockets)
    }

    fn reset_forwarded(&mut self, key: &FlowTuple, flow: &Forwarded) -> usize {
        self.reset_forwarded_flow(key, flow)
    }

    fn activity(&mut self, sockets: &[SocketRef]) -> Vec<Reading> {
        self.sample(sockets)
            .into_iter()
            .map(|s| match s {
                diag::Sampled::Seen(s) => Reading::Seen(crate::kernel::Activity {
                    last_recv_ago_ms: s.last_recv_ago_ms,
                    last_sent_ago_ms: s.last_sent_ago_ms,
                }),
                diag::Sampled::Gone => Reading::Gone,
                diag::Sampled::Unknown => Reading::Unknown,
            })
            .collect()
    }

    fn resolve_netns(&mut self, path: &Path) -> Result<u64, NetnsError> {
        self.namespaces.resolve(path)
    }

    fn release_netns(&mut self, cookie: u64) {
        self.namespaces.release(cookie);
    }

    fn namespaces_open(&self) -> usize {
        self.namespaces.open_count()
    }

    fn inspect_socket(&self, fd: BorrowedFd<'_>) -> Result<SocketInfo, String> {
        socket::inspect(fd)
    }

    /// Writes the watch and fence bitmaps and the fence grace. Used at start
    /// and on reload; the programs read them at the next connection.
    fn apply_ports(&mut self, config: &Config) -> Result<()> {
        let seen = watch_slot(PortSet::Seen, PortSide::Local, 0).0;
        for (i, word) in port_bitmap(&config.watch, &config.fence)
            .into_iter()
            .enumerate()
        {
            let i = i as u32;
            if i < seen {
                self.watch.set(i, word, 0)?;
                continue;
            }
            // Seen ports stay seen: a flow tracked on a port since dropped
            // from the config keeps its kernel backstop.
            let before = self.watch.get(&i, 0)?;
            if before | word != before {
                self.watch.set(i, before | word, 0)?;
            }
        }
        self.settings
            .set(setting::FENCE_GRACE_NS, config.fence_grace_ns, 0)?;
        self.settings.set(
            setting::FLOWS_PER_OWNER,
            config.max_flows_per_owner as u64,
            0,
        )?;
        // Also at start: marks cached by the programs of an earlier run
        // are re-read, and the epoch is never 0 while programs run.
        self.bump_epoch()
    }

    /// Kernel counters, summed over CPUs.
    fn counters(&self) -> BTreeMap<String, u64> {
        let names = [
            (counter::TRACKED, "tracked"),
            (counter::CLOSED, "closed"),
            (counter::DROPPED, "dropped_packets"),
            (counter::TABLE_FULL, "table_full"),
            (counter::EVENTS_LOST, "events_lost"),
            (counter::PENDING_MATCHED, "pending_matched"),
            (counter::UNMARKED, "unmarked"),
            (counter::SHARE_EXCEEDED, "share_exceeded"),
        ];
        names
            .iter()
            .map(|(index, name)| {
                let sum = self
                    .counters
                    .get(index, 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (name.to_string(), sum)
            })
            .collect()
    }
}
