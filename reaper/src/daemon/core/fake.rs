//! An in-memory kernel for the core's unit tests: maps with capacities, a
//! settable clock, sockets that a destroy closes, and a log of every write
//! in the order the core made it (what the write-order tests read).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use reaper_common::{
    flow_flags, Flow, FlowEvent, FlowEventKind, FlowTuple, Forwarded, PendingGrant, SessionRecord,
};

use crate::config::Config;
use crate::error::Result;
use crate::kernel::{
    Activity, DestroyOutcome, Kernel, KillPath, NetnsError, Reading, SocketInfo, SocketRef,
};
use crate::policy::Now;
use crate::timefmt::NS_PER_SEC;
use crate::tuple;

/// One write the core made, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Session {
        id: u64,
        deadline: u64,
    },
    RemoveSession(u64),
    Flow {
        cookie: u64,
        session: u64,
        deadline: u64,
    },
    RemoveFlow(u64),
    Publish,
    Pending(FlowTuple),
    RemovePending(FlowTuple),
    ForwardedGrant {
        key: FlowTuple,
        deadline: u64,
    },
    RemoveForwardedGrant(FlowTuple),
    RemoveForwarded(FlowTuple),
    Destroy(Vec<u64>),
    Reset(Vec<u64>),
    ResetForwarded(FlowTuple),
}

pub struct FakeKernel {
    pub now: Now,
    pub timer: Option<u64>,
    pub kill_path: KillPath,
    pub flows: BTreeMap<u64, Flow>,
    pub sessions: BTreeMap<u64, SessionRecord>,
    pub pending: HashMap<FlowTuple, PendingGrant>,
    pub forwarded: HashMap<FlowTuple, Forwarded>,
    pub forwarded_grants: HashMap<FlowTuple, PendingGrant>,
    /// Capacities: an insert of a new key past them says "full".
    pub max_sessions: usize,
    pub max_pending: usize,
    pub max_forwarded_grants: usize,
    /// Activity of each socket, for idle checks (absent: gone).
    pub activity: HashMap<u64, Activity>,
    /// What each passed descriptor (by number) is.
    pub sockets: HashMap<i32, SocketInfo>,
    /// Namespace files a request may name, and their cookies.
    pub namespaces: HashMap<PathBuf, u64>,
    pub log: Vec<Write>,
    /// Events not yet taken by the core, and how many the ring lost.
    pub queued: Vec<FlowEvent>,
    pub lost: u64,
    /// What `flow_holders` says.
    pub holders: Vec<(u32, u64)>,
    /// Whether the core said its work is a kill (`set_urgent`), and how
    /// many destroys it made while so.
    pub urgent: bool,
    pub urgent_destroys: usize,
    /// Flow writes since the last publish.
    dirty: bool,
}

/// The daemon's own namespace in the fake.
pub const OWN_NETNS: u64 = 4026531840;

impl FakeKernel {
    pub fn new() -> FakeKernel {
        FakeKernel {
            // Boot time 1000 s; Unix time 2026-12-01T00:00:00Z.
            now: Now {
                boot_ns: 1000 * NS_PER_SEC,
                unix_ns: 1_796_083_200 * NS_PER_SEC as i128,
            },
            timer: None,
            kill_path: KillPath::Destroy,
            flows: BTreeMap::new(),
            sessions: BTreeMap::new(),
            pending: HashMap::new(),
            forwarded: HashMap::new(),
            forwarded_grants: HashMap::new(),
            max_sessions: 1 << 20,
            max_pending: 1 << 20,
            max_forwarded_grants: 1 << 20,
            activity: HashMap::new(),
            sockets: HashMap::new(),
            namespaces: HashMap::new(),
            log: Vec::new(),
            queued: Vec::new(),
            lost: 0,
            holders: Vec::new(),
            urgent: false,
            urgent_destroys: 0,
            dirty: false,
        }
    }

    /// Lets time pass (both clocks alike).
    pub fn advance(&mut self, ns: u64) {
        self.now.boot_ns += ns;
        self.now.unix_ns += ns as i128;
    }

    /// A connection the sock_ops program tracked: its `FLOWS` entry, and
    /// the event the core reads. `passive`: it was accepted here.
    pub fn connect(
        &mut self,
        cookie: u64,
        local: &str,
        remote: &str,
        passive: bool,
        fenced: bool,
    ) -> FlowEvent {
        let local: SocketAddr = local.parse().expect("test address");
        let remote: SocketAddr = remote.parse().expect("test address");
        let mut flags = 0;
        if passive {
            flags |= flow_flags::PASSIVE;
        }
        if fenced {
            flags |= flow_flags::FENCED;
        }
        let flow = Flow {
            tuple: tuple::tuple_of(local, remote),
            netns_cookie: OWN_NETNS,
            established_ns: self.now.boot_ns,
            flags,
            ..Flow::default()
        };
        let flow = self.claim_pending(flow);
        self.flows.insert(cookie, flow);
        self.activity.insert(
            cookie,
            Activity {
                last_recv_ago_ms: 0,
                last_sent_ago_ms: 0,
            },
        );
        FlowEvent {
            kind: FlowEventKind::Established as u32,
            _pad: 0,
            cookie,
            flow,
        }
    }

    /// What sock_ops does with a pre-registration: the connection takes
    /// its grant and the key goes.
    fn claim_pending(&mut self, mut flow: Flow) -> Flow {
        let mut wild = flow.tuple;
        if flow.flags & flow_flags::PASSIVE != 0 {
            wild.remote_port = 0;
        } else {
            wild.local_port = 0;
        }
        for key in [flow.tuple, wild] {
            if let Some(grant) = self.pending.remove(&key) {
                flow.deadline_ns = grant.deadline_ns;
                flow.session = grant.session;
                break;
            }
        }
        flow
    }

    /// The socket closed on its own: its entry goes, and the event says so.
    pub fn close(&mut self, cookie: u64) -> FlowEvent {
        let flow = self.flows.remove(&cookie).unwrap_or_default();
        self.activity.remove(&cookie);
        FlowEvent {
            kind: FlowEventKind::Closed as u32,
            _pad: 0,
            cookie,
            flow,
        }
    }

    /// The writes logged since `mark` (a length of `log` taken earlier).
    pub fn writes_since(&self, mark: usize) -> &[Write] {
        &self.log[mark..]
    }
}

fn full(len: usize, max: usize, exists: bool) -> bool {
    !exists && len >= max
}

impl Kernel for FakeKernel {
    fn now(&self) -> Now {
        self.now
    }

    /// The fake's clock moves only when a test moves it.
    fn wait_until(&self, _at: u64) {}

    fn set_urgent(&mut self, urgent: bool) -> bool {
        std::mem::replace(&mut self.urgent, urgent)
    }

    fn arm_timer(&mut self, at: Option<u64>) {
        self.timer = at;
    }

    fn kill_path(&self) -> KillPath {
        self.kill_path
    }

    fn own_netns(&self) -> u64 {
        OWN_NETNS
    }

    fn cgroup(&self) -> &Path {
        Path::new("/sys/fs/cgroup/fake")
    }

    fn pin_path(&self) -> &Path {
        Path::new("/sys/fs/bpf/fake")
    }

    fn flows(&self) -> Vec<(u64, Flow)> {
        self.flows.iter().map(|(c, f)| (*c, *f)).collect()
    }

    fn flow(&self, cookie: u64) -> Option<Flow> {
        self.flows.get(&cookie).copied()
    }

    fn update_flow(&mut self, cookie: u64, flow: &Flow) -> Result<bool> {
        let Some(entry) = self.flows.get_mut(&cookie) else {
            return Ok(false);
        };
        *entry = *flow;
        self.dirty = true;
        self.log.push(Write::Flow {
            cookie,
            session: flow.session,
            deadline: flow.deadline_ns,
        });
        Ok(true)
    }

    /// As the kernel's batch: created or replaced, so the entry of a
    /// socket that closed since comes back.
    fn put_flows(&mut self, flows: &[(u64, Flow)]) -> Vec<(u64, String)> {
        for (cookie, flow) in flows {
            self.flows.insert(*cookie, *flow);
            self.dirty = true;
            self.log.push(Write::Flow {
                cookie: *cookie,
                session: flow.session,
                deadline: flow.deadline_ns,
            });
        }
        Vec::new()
    }

    fn remove_flow(&mut self, cookie: u64) {
        self.flows.remove(&cookie);
        self.dirty = true;
        self.log.push(Write::RemoveFlow(cookie));
    }

    fn take_events(&mut self) -> Vec<FlowEvent> {
        std::mem::take(&mut self.queued)
    }

    fn events_lost(&self) -> u64 {
        self.lost
    }

    fn publish_flows(&mut self) -> Result<()> {
        if std::mem::take(&mut self.dirty) {
            self.log.push(Write::Publish);
        }
        Ok(())
    }

    fn sessions(&self) -> Vec<(u64, SessionRecord)> {
        self.sessions.iter().map(|(i, r)| (*i, *r)).collect()
    }

    fn put_session(&mut self, id: u64, record: &SessionRecord) -> Result<bool> {
        let exists = self.sessions.contains_key(&id);
        if full(self.sessions.len(), self.max_sessions, exists) {
            return Ok(false);
        }
        self.sessions.insert(id, *record);
        self.log.push(Write::Session {
            id,
            deadline: record.deadline_ns,
        });
        Ok(true)
    }

    fn remove_session(&mut self, id: u64) {
        self.sessions.remove(&id);
        self.log.push(Write::RemoveSession(id));
    }

    fn pending(&self) -> Vec<(FlowTuple, PendingGrant)> {
        self.pending.iter().map(|(k, g)| (*k, *g)).collect()
    }

    fn pending_grant(&self, key: &FlowTuple) -> Option<PendingGrant> {
        self.pending.get(key).copied()
    }

    fn put_pending(&mut self, key: &FlowTuple, grant: &PendingGrant) -> Result<bool> {
        let exists = self.pending.contains_key(key);
        if full(self.pending.len(), self.max_pending, exists) {
            return Ok(false);
        }
        self.pending.insert(*key, *grant);
        self.log.push(Write::Pending(*key));
        Ok(true)
    }

    fn remove_pending(&mut self, key: &FlowTuple) {
        self.pending.remove(key);
        self.log.push(Write::RemovePending(*key));
    }

    fn forwarded(&self, key: &FlowTuple) -> Option<Forwarded> {
        self.forwarded.get(key).copied()
    }

    fn forwarded_flows(&self) -> Vec<(FlowTuple, Forwarded)> {
        self.forwarded.iter().map(|(k, f)| (*k, *f)).collect()
    }

    fn forwarded_grant(&self, key: &FlowTuple) -> Option<PendingGrant> {
        self.forwarded_grants.get(key).copied()
    }

    fn forwarded_grants(&self) -> Vec<(FlowTuple, PendingGrant)> {
        self.forwarded_grants
            .iter()
            .map(|(k, g)| (*k, *g))
            .collect()
    }

    fn put_forwarded_grant(&mut self, key: &FlowTuple, grant: &PendingGrant) -> Result<bool> {
        let exists = self.forwarded_grants.contains_key(key);
        if full(
            self.forwarded_grants.len(),
            self.max_forwarded_grants,
            exists,
        ) {
            return Ok(false);
        }
        self.forwarded_grants.insert(*key, *grant);
        self.log.push(Write::ForwardedGrant {
            key: *key,
            deadline: grant.deadline_ns,
        });
        Ok(true)
    }

    fn remove_forwarded_grant(&mut self, key: &FlowTuple) {
        self.forwarded_grants.remove(key);
        self.log.push(Write::RemoveForwardedGrant(*key));
    }

    fn remove_forwarded(&mut self, key: &FlowTuple) {
        self.forwarded.remove(key);
        self.forwarded_grants.remove(key);
        self.log.push(Write::RemoveForwarded(*key));
    }

    /// A destroy closes the socket: like the kernel, its entry goes (the
    /// Closed event is the test's to deliver, if it wants).
    fn destroy(&mut self, sockets: &[SocketRef]) -> Vec<DestroyOutcome> {
        self.urgent_destroys += usize::from(self.urgent);
        self.log
            .push(Write::Destroy(sockets.iter().map(|s| s.cookie).collect()));
        sockets
            .iter()
            .map(|s| match self.flows.remove(&s.cookie) {
                Some(_) => {
                    self.activity.remove(&s.cookie);
                    DestroyOutcome::Destroyed
                }
                None => DestroyOutcome::Gone,
            })
            .collect()
    }

    fn reset(&mut self, sockets: &[(SocketRef, Flow)]) -> Vec<DestroyOutcome> {
        self.log.push(Write::Reset(
            sockets.iter().map(|(s, _)| s.cookie).collect(),
        ));
        sockets
            .iter()
            .map(|(s, _)| match self.flows.remove(&s.cookie) {
                Some(_) => DestroyOutcome::Destroyed,
                None => DestroyOutcome::Gone,
            })
            .collect()
    }

    fn reset_forwarded(&mut self, key: &FlowTuple, _flow: &Forwarded) -> usize {
        self.log.push(Write::ResetForwarded(*key));
        2
    }

    fn activity(&mut self, sockets: &[SocketRef]) -> Vec<Reading> {
        sockets
            .iter()
            .map(|s| match self.activity.get(&s.cookie) {
                Some(a) => Reading::Seen(*a),
                None => Reading::Gone,
            })
            .collect()
    }

    fn resolve_netns(&mut self, path: &Path) -> Result<u64, NetnsError> {
        self.namespaces
            .get(path)
            .copied()
            .ok_or_else(|| NetnsError {
                action: "open",
                path: path.display().to_string(),
                why: "No such file or directory (os error 2)".into(),
            })
    }

    fn release_netns(&mut self, _cookie: u64) {}

    fn namespaces_open(&self) -> usize {
        0
    }

    fn flow_holders(&self) -> Vec<(u32, u64)> {
        self.holders.clone()
    }

    fn inspect_socket(&self, fd: BorrowedFd<'_>) -> std::result::Result<SocketInfo, String> {
        self.sockets
            .get(&fd.as_raw_fd())
            .copied()
            .ok_or_else(|| "not a socket (Socket operation on non-socket (os error 88))".into())
    }

    fn apply_ports(&mut self, _config: &Config) -> Result<()> {
        Ok(())
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
}
