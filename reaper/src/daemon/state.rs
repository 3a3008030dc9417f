//! The daemon's state: sessions, the flows the kernel tracks, and the queue
//! of things due at a time, kept consistent with the pinned kernel maps.
//!
//! The kernel maps are the truth; everything here is an index over them that
//! can be rebuilt at any time (`adopt`). Writes go to the kernel first, in an
//! order that leaves a crash harmless:
//! * grant: session record, then each flow's deadline (or pending entry);
//! * kill: each flow's deadline (so the backstop drops at once), then the
//!   socket destroy, then the session record.
//!
//! The request handlers live in `commands.rs`.

use std::collections::{BTreeSet, HashMap, HashSet};

use reaper_common::{flow_flags, Flow, FlowEvent, FlowEventKind, FlowTuple, Label, SessionRecord};
use tracing::{debug, error, info, warn};

use super::audit::{Audit, KillEvent, Reason};
use super::throttle::Throttle;
use crate::clock::{self, DeadlineTimer};
use crate::config::Config;
use crate::enforcer::{socket, DestroyOutcome, DiagTarget, Enforcer, KillPath, Reading};
use crate::policy::{self, IdleDirection, Now, SocketActivity};
use crate::protocol::{FlowView, KillView, Refusal, RefusalCode, SessionView};

/// Who is asking, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Something the timer must do at a given boot time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Due {
    /// A session's absolute deadline.
    Deadline(u64),
    /// Time to look at a session's activity.
    IdleCheck(u64),
    /// A fenced flow's grace window is over (by socket cookie).
    Fence(u64),
    /// Time to see whether a forwarded flow's packets stopped after its
    /// RSTs (by check id), and write its audit event.
    RstCheck(u64),
    /// Time to forget forwarded flows nobody uses any more.
    ForwardGc,
}

/// How long after its RSTs a forwarded flow is checked for silence.
const RST_CHECK_NS: u64 = 250 * policy::NS_PER_MS;
/// Forwarded flows not seen for this long (and not granted, or long past
/// their deadline) are forgotten; the collection runs this often.
const FORWARD_IDLE_NS: u64 = 120 * policy::NS_PER_SEC;
const FORWARD_GC_EVERY_NS: u64 = 30 * policy::NS_PER_SEC;

/// A forwarded flow killed by RSTs, waiting for its audit event.
struct RstCheck {
    key: FlowTuple,
    reason: Reason,
    since_ns: u64,
    done: Now,
    dropped_before: u64,
    sent: usize,
    session: String,
    user: String,
    target: String,
}

/// The scalar part of a session's kernel record. The daemon keeps this,
/// not the whole `SessionRecord`: the record's fixed-size labels repeat the
/// names below and would triple the memory a session costs.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Terms {
    pub deadline_ns: u64,
    pub granted_ns: u64,
    pub granted_unix_ns: u64,
    pub granted_by_uid: u32,
    pub idle_direction: u32,
    pub idle_timeout_ns: u64,
    pub touched_ns: u64,
    /// See `SessionRecord::expires_unix_ns`.
    pub expires_unix_ns: u64,
}

impl Terms {
    fn of(record: &SessionRecord) -> Terms {
        Terms {
            deadline_ns: record.deadline_ns,
            granted_ns: record.granted_ns,
            granted_unix_ns: record.granted_unix_ns,
            granted_by_uid: record.granted_by_uid,
            idle_direction: record.idle_direction,
            idle_timeout_ns: record.idle_timeout_ns,
            touched_ns: record.touched_ns,
            expires_unix_ns: record.expires_unix_ns,
        }
    }
}

/// A session's four names in one allocation (a session costs a few
/// hundred bytes; four separate strings were a third of that).
pub(super) struct Names {
    text: Box<str>,
    /// Where the name, user and target end in `text`.
    ends: [u16; 3],
}

impl Names {
    /// Names are at most a few hundred bytes (protocol and label limits).
    fn new(name: &str, user: &str, target: &str, class: &str) -> Names {
        let a = name.len();
        let b = a + user.len();
        let c = b + target.len();
        Names {
            text: [name, user, target, class].concat().into_boxed_str(),
            ends: [a, b, c].map(|e| u16::try_from(e).expect("names are short")),
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends.get(i).map_or(self.text.len(), |e| *e as usize);
        &self.text[start..end]
    }
}

/// A session's socket cookies: usually one or two, so a sorted vector (a
/// B-tree node would cost about 100 bytes for a single cookie).
#[derive(Default)]
pub(super) struct Cookies(Vec<u64>);

impl Cookies {
    pub fn insert(&mut self, cookie: u64) -> bool {
        match self.0.binary_search(&cookie) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, cookie);
                true
            }
        }
    }

    pub fn remove(&mut self, cookie: &u64) -> bool {
        match self.0.binary_search(cookie) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, u64> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

pub(super) struct Session {
    pub terms: Terms,
    pub names: Names,
    pub flows: Cookies,
    /// Forwarded flows (no local socket), by `forwarded_key`.
    pub forwarded: HashSet<FlowTuple>,
    /// Pre-registered connections not yet seen: each entry is the set of
    /// kernel `PENDING` keys one `expect` item was registered under.
    pub pending: Vec<Box<[FlowTuple]>>,
    /// When the next idle check is queued, if any.
    pub idle_check_at: Option<u64>,
}

impl Session {
    pub fn name(&self) -> &str {
        self.names.part(0)
    }
    pub fn user(&self) -> &str {
        self.names.part(1)
    }
    pub fn target(&self) -> &str {
        self.names.part(2)
    }
    pub fn class(&self) -> &str {
        self.names.part(3)
    }

    pub fn idle_direction(&self) -> IdleDirection {
        IdleDirection::from_u32(self.terms.idle_direction)
    }

    /// The kernel's copy of this session. Names were length-checked when
    /// the session was made (or read back from a record), so they fit.
    pub fn record(&self) -> SessionRecord {
        let t = &self.terms;
        SessionRecord {
            deadline_ns: t.deadline_ns,
            granted_ns: t.granted_ns,
            granted_unix_ns: t.granted_unix_ns,
            granted_by_uid: t.granted_by_uid,
            idle_direction: t.idle_direction,
            idle_timeout_ns: t.idle_timeout_ns,
            touched_ns: t.touched_ns,
            expires_unix_ns: t.expires_unix_ns,
            name: Label::new(self.name()).unwrap_or_default(),
            user: Label::new(self.user()).unwrap_or_default(),
            target: Label::new(self.target()).unwrap_or_default(),
            class: Label::new(self.class()).unwrap_or_default(),
            ..Default::default()
        }
    }
}

pub struct State {
    pub(super) enforcer: Enforcer,
    timer: DeadlineTimer,
    audit: Audit,
    pub(super) config: Config,
    pub(super) started_boot_ns: u64,
    /// Successful config loads (1 at start, +1 per reload), and the last
    /// reload's error: what `status` reports so operators can see a reload.
    pub(super) config_loads: u64,
    pub last_reload_error: Option<String>,
    /// The full-table warning (connections refused since the last one).
    table_full: Throttle,
    /// Unix time minus boot time, read once at start: every boot-clock
    /// instant is shown as the same wall-clock time for the daemon's life,
    /// instead of jittering with each pair of clock reads.
    wall_offset_ns: i128,
    /// Boxed: the table keeps spare buckets, and a bucket should cost a
    /// pointer, not a whole session.
    pub(super) sessions: HashMap<u64, Box<Session>>,
    pub(super) by_name: HashMap<Box<str>, u64>,
    next_id: u64,
    /// What is due when, earliest first.
    queue: BTreeSet<(u64, Due)>,
    /// Mirror of the kernel's FLOWS, fed by the ring buffer.
    pub(super) flows: HashMap<u64, Flow>,
    /// (netns cookie, tuple) → socket cookie.
    by_tuple: HashMap<(u64, FlowTuple), u64>,
    /// Tracked flows per network namespace: the enforcer keeps a socket
    /// open in each namespace that has any.
    per_netns: HashMap<u64, usize>,
    rst_checks: HashMap<u64, RstCheck>,
    next_check: u64,
}

pub(super) fn refuse<T>(code: RefusalCode, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(code, message))
}

pub(super) fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(RefusalCode::Internal, e.to_string())
}

/// What the flows killed together share in their audit events.
#[derive(Clone, Copy)]
struct KillBatch {
    reason: Reason,
    path: KillPath,
    /// When the kill completed.
    done: Now,
}

pub(super) fn path_name(path: KillPath) -> &'static str {
    match path {
        KillPath::Destroy => "destroy",
        KillPath::Rst => "rst",
        KillPath::Forward => "forward",
    }
}

pub(super) fn describe(t: &FlowTuple) -> String {
    let (l, r) = socket::addrs_of(t);
    format!("{l} <-> {r}")
}

/// Whether a kernel `PENDING` key claims a connection with this tuple (the
/// same rule the sock_ops program applies).
fn claims(key: &FlowTuple, flow: &Flow) -> bool {
    let mut t = flow.tuple;
    if *key == t {
        return true;
    }
    if flow.flags & flow_flags::PASSIVE != 0 {
        t.remote_port = 0;
    } else {
        t.local_port = 0;
    }
    *key == t
}

impl State {
    pub fn new(enforcer: Enforcer, timer: DeadlineTimer, audit: Audit, config: Config) -> State {
        let now = clock::now();
        State {
            enforcer,
            timer,
            audit,
            config,
            started_boot_ns: now.boot_ns,
            config_loads: 1,
            last_reload_error: None,
            table_full: Throttle::new(std::time::Duration::from_secs(10)),
            wall_offset_ns: now.unix_ns - now.boot_ns as i128,
            sessions: HashMap::new(),
            by_name: HashMap::new(),
            next_id: 1,
            queue: BTreeSet::new(),
            flows: HashMap::new(),
            by_tuple: HashMap::new(),
            per_netns: HashMap::new(),
            rst_checks: HashMap::new(),
            next_check: 1,
        }
    }

    pub fn timer(&self) -> &DeadlineTimer {
        &self.timer
    }

    /// The wall-clock time of a boot-clock instant.
    pub(super) fn wall(&self, boot_ns: u64) -> i128 {
        boot_ns as i128 + self.wall_offset_ns
    }

    /// Rebuilds every index from the pinned maps: what a restarted daemon
    /// does before it accepts requests. What fell due while no daemon ran
    /// is handled by the first timer expiry, right after.
    pub fn adopt(&mut self) {
        for (cookie, flow) in self.enforcer.flows() {
            self.index_flow(cookie, flow);
        }
        for (id, record) in self.enforcer.sessions() {
            let labels = (
                record.name.as_str(),
                record.user.as_str(),
                record.target.as_str(),
                record.class.as_str(),
            );
            let (Some(_), Some(_), Some(_), Some(_)) = labels else {
                warn!(id, "dropping an unreadable session record");
                self.enforcer.remove_session(id);
                continue;
            };
            self.index_session(id, &record);
        }
        for (key, grant) in self.enforcer.forwarded_grants() {
            if let Some(s) = self.sessions.get_mut(&grant.session) {
                s.forwarded.insert(key);
            }
        }
        if !self.config.forward_interfaces.is_empty() {
            self.queue
                .insert((clock::boot_ns() + FORWARD_GC_EVERY_NS, Due::ForwardGc));
        }
        for (key, grant) in self.enforcer.pending() {
            match self.sessions.get_mut(&grant.session) {
                Some(s) => s.pending.push(Box::new([key])),
                None => self.enforcer.remove_pending(&key),
            }
        }
        // Attach flows to their sessions; repair what a crash mid-write left.
        let tracked: Vec<(u64, Flow)> = self.flows.iter().map(|(c, f)| (*c, *f)).collect();
        for (cookie, flow) in tracked {
            if flow.session == 0 {
                self.queue_fence_check(cookie, &flow);
                continue;
            }
            if !self.sessions.contains_key(&flow.session) {
                // The session record was removed (a kill that crashed before
                // the flow closed): keep the deadline, under a stand-in.
                self.adopt_orphan(flow.session, &flow);
            }
            self.attach_flow(cookie, flow);
        }
        let idle: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.terms.idle_timeout_ns != 0)
            .map(|(id, _)| *id)
            .collect();
        let now = clock::boot_ns();
        for id in idle {
            self.queue_idle_check(id, now);
        }
        info!(
            sessions = self.sessions.len(),
            tracked_flows = self.flows.len(),
            "state adopted from pinned maps"
        );
        self.rearm();
    }

    fn adopt_orphan(&mut self, id: u64, flow: &Flow) {
        let name = format!("orphan-{id}");
        let record = SessionRecord {
            deadline_ns: flow.deadline_ns.max(1),
            granted_ns: flow.established_ns,
            granted_unix_ns: self.wall(flow.established_ns) as u64,
            name: Label::new(&name).expect("short"),
            user: Label::new("unknown").expect("short"),
            target: Label::new("unknown").expect("short"),
            class: Label::new("unknown").expect("short"),
            ..Default::default()
        };
        let _ = self.enforcer.put_session(id, &record);
        warn!(session = %name, "flow without a session record: enforcing its deadline under a stand-in session");
        self.index_session(id, &record);
    }

    /// Adds a session to the in-memory indexes (its record is already in
    /// the kernel map, with labels the caller checked are readable).
    pub(super) fn index_session(&mut self, id: u64, record: &SessionRecord) {
        let label = |l: Option<&str>| l.unwrap_or("?").to_owned();
        let names = Names::new(
            &label(record.name.as_str()),
            &label(record.user.as_str()),
            &label(record.target.as_str()),
            &label(record.class.as_str()),
        );
        self.by_name.insert(names.part(0).into(), id);
        self.queue.insert((record.deadline_ns, Due::Deadline(id)));
        self.sessions.insert(
            id,
            Box::new(Session {
                terms: Terms::of(record),
                names,
                flows: Cookies::default(),
                forwarded: HashSet::new(),
                pending: Vec::new(),
                idle_check_at: None,
            }),
        );
        self.next_id = self.next_id.max(id + 1);
    }

    pub(super) fn allocate_session_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub(super) fn index_flow(&mut self, cookie: u64, flow: Flow) {
        self.by_tuple
            .insert((flow.netns_cookie, flow.tuple), cookie);
        if self.flows.insert(cookie, flow).is_none() {
            *self.per_netns.entry(flow.netns_cookie).or_default() += 1;
        }
    }

    pub(super) fn unindex_flow(&mut self, cookie: u64) -> Option<Flow> {
        let flow = self.flows.remove(&cookie)?;
        let key = (flow.netns_cookie, flow.tuple);
        if self.by_tuple.get(&key) == Some(&cookie) {
            self.by_tuple.remove(&key);
        }
        if let Some(count) = self.per_netns.get_mut(&flow.netns_cookie) {
            *count -= 1;
            if *count == 0 {
                self.per_netns.remove(&flow.netns_cookie);
                self.enforcer.release_netns(flow.netns_cookie);
            }
        }
        if let Some(session) = self.sessions.get_mut(&flow.session) {
            session.flows.remove(&cookie);
        }
        Some(flow)
    }

    /// Makes a tracked flow (already tagged with its session in the kernel)
    /// part of that session, and its deadline the session's.
    fn attach_flow(&mut self, cookie: u64, mut flow: Flow) {
        let Some(session) = self.sessions.get_mut(&flow.session) else {
            return;
        };
        session.flows.insert(cookie);
        // A pre-registration it claimed is no longer pending; the other keys
        // of the same `expect` item go too.
        if let Some(i) = session
            .pending
            .iter()
            .position(|keys| keys.iter().any(|k| claims(k, &flow)))
        {
            for key in session.pending.remove(i).iter() {
                self.enforcer.remove_pending(key);
            }
        }
        let deadline = session.terms.deadline_ns;
        if flow.deadline_ns != deadline {
            flow.deadline_ns = deadline;
            let _ = self.enforcer.update_flow(cookie, &flow);
        }
        self.index_flow(cookie, flow);
    }

    /// Applies flow events from the kernel, in order.
    pub fn apply_events(&mut self, events: &[FlowEvent]) {
        for event in events {
            if event.kind == FlowEventKind::Established as u32 {
                // The entry may already carry a grant (adopted state); keep ours.
                let flow = self.flows.get(&event.cookie).copied().unwrap_or(event.flow);
                if flow.session != 0 {
                    if !self.sessions.contains_key(&flow.session) {
                        self.adopt_orphan(flow.session, &flow);
                    }
                    debug!(cookie = event.cookie, flow = %describe(&flow.tuple), "pre-registered flow established");
                    self.attach_flow(event.cookie, flow);
                } else {
                    self.index_flow(event.cookie, flow);
                    self.queue_fence_check(event.cookie, &flow);
                }
            } else if event.kind == FlowEventKind::Closed as u32 {
                if let Some(flow) = self.unindex_flow(event.cookie) {
                    debug!(cookie = event.cookie, flow = %describe(&flow.tuple), "flow closed");
                }
            } else if event.kind == FlowEventKind::Refused as u32 {
                self.refuse_untracked(event.cookie, event.flow);
            }
        }
        self.rearm();
    }

    /// A connection that had to be tracked found the flow table full: the
    /// kernel already drops its packets; destroying it tells both peers.
    /// Warned about at most every 10 s, with the count in between.
    pub(super) fn refuse_untracked(&mut self, cookie: u64, flow: Flow) {
        if let Some(refused) = self.table_full.hit(std::time::Instant::now()) {
            warn!(
                max_flows = self.config.max_flows,
                refused,
                latest = %describe(&flow.tuple),
                "flow table full: fenced or pre-granted connections are refused \
                 (killed, reason table_full); other watched connections go untracked. \
                 Raise max_flows"
            );
        }
        // Not in `FLOWS`: the mirror is all the kill path will know of it.
        self.index_flow(cookie, flow);
        self.kill_flows(&[cookie], Reason::TableFull, Some(flow.established_ns));
    }

    fn queue_fence_check(&mut self, cookie: u64, flow: &Flow) {
        if flow.flags & flow_flags::FENCED != 0 && flow.session == 0 {
            let at = flow.established_ns + self.config.fence_grace_ns;
            self.queue.insert((at, Due::Fence(cookie)));
        }
    }

    /// Queues (or moves) a session's idle check.
    pub(super) fn queue_idle_check(&mut self, id: u64, at: u64) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if let Some(old) = session.idle_check_at.replace(at) {
            self.queue.remove(&(old, Due::IdleCheck(id)));
        }
        self.queue.insert((at, Due::IdleCheck(id)));
    }

    /// Moves a session's deadline in the queue.
    pub(super) fn requeue_deadline(&mut self, id: u64, old: u64, new: u64) {
        self.queue.remove(&(old, Due::Deadline(id)));
        self.queue.insert((new, Due::Deadline(id)));
    }

    /// Re-arms the timer for the earliest thing due.
    pub(super) fn rearm(&self) {
        let next = self.queue.first().map(|(at, _)| *at);
        if let Err(e) = self.timer.arm(next) {
            error!("arming the deadline timer: {e}");
        }
    }

    /// Does everything that has come due. Called when the timer fires.
    pub fn run_due(&mut self) {
        let now = clock::boot_ns();
        let mut expired = Vec::new();
        let mut idle_checks = Vec::new();
        let mut fences = Vec::new();
        while let Some(&(at, due)) = self.queue.first() {
            if at > now {
                break;
            }
            self.queue.pop_first();
            match due {
                Due::Deadline(id) => expired.push(id),
                Due::IdleCheck(id) => {
                    if let Some(s) = self.sessions.get_mut(&id) {
                        s.idle_check_at = None;
                        idle_checks.push(id);
                    }
                }
                Due::Fence(cookie) => fences.push((cookie, at)),
                Due::RstCheck(id) => self.finish_rst_check(id),
                Due::ForwardGc => {
                    self.collect_forwarded(now);
                    self.queue
                        .insert((now + FORWARD_GC_EVERY_NS, Due::ForwardGc));
                }
            }
        }
        if !expired.is_empty() {
            self.end_sessions(&expired, Reason::Expired, None);
        }
        if !idle_checks.is_empty() {
            self.check_idle(&idle_checks);
        }
        for (cookie, grace_end) in fences {
            // Granted (or gone) since: nothing to do.
            if self.enforcer.flow(cookie).is_some_and(|f| f.session == 0) {
                self.kill_flows(&[cookie], Reason::Unauthorized, Some(grace_end));
            }
        }
        self.rearm();
    }

    /// Someone set the wall clock (or it may have been set while no daemon
    /// ran): every session whose deadline came from an `expires_at` moves
    /// to where that wall time now lies on the boot clock, through the same
    /// path as an extend (kernel maps first, then the queue). Deadlines
    /// given as a ttl do not move. Returns how many sessions moved.
    pub fn follow_wall_clock(&mut self) -> usize {
        /// Reading the two clocks back to back skews them by microseconds;
        /// a real step of the clock is far larger.
        const SKEW_NS: u64 = 1_000_000;
        let now = clock::now();
        let limits = self.limits();
        let moves: Vec<(u64, u64, u64)> = self
            .sessions
            .iter()
            .filter_map(|(id, s)| {
                let anchor = s.terms.expires_unix_ns;
                let to = policy::follow_wall_clock(anchor, now, limits);
                let moved = anchor != 0 && s.terms.deadline_ns.abs_diff(to) > SKEW_NS;
                moved.then_some((*id, to, anchor))
            })
            .collect();
        for &(id, to, anchor) in &moves {
            if let Err(e) = self.set_deadline(id, to, anchor) {
                error!(session = %self.sessions[&id].name(), "moving a deadline after a clock change: {}", e.message);
            }
        }
        if !moves.is_empty() {
            info!(
                sessions = moves.len(),
                "the wall clock was set: deadlines given as expires_at follow it"
            );
            self.run_due();
        }
        moves.len()
    }

    /// Reads the kernel's activity for the sessions' sockets; ends the idle
    /// ones and queues the next check for the others at their new idle
    /// deadline.
    fn check_idle(&mut self, ids: &[u64]) {
        let mut targets = Vec::new();
        // A session may have ended earlier in the same timer run.
        let ids: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| self.sessions.contains_key(id))
            .collect();
        for id in &ids {
            for cookie in self.sessions[id].flows.iter() {
                if let Some(flow) = self.flows.get(cookie) {
                    targets.push(DiagTarget {
                        cookie: *cookie,
                        tuple: flow.tuple,
                        netns_cookie: flow.netns_cookie,
                    });
                }
            }
        }
        let readings = self.enforcer.activity(&targets);
        let mut activity: HashMap<u64, SocketActivity> = HashMap::new();
        let mut unknown: BTreeSet<u64> = BTreeSet::new();
        for (t, reading) in targets.iter().zip(readings) {
            match reading {
                Reading::Seen(a) => {
                    let flags = self.flows.get(&t.cookie).map_or(0, |f| f.flags);
                    let seen = SocketActivity {
                        passive: flags & flow_flags::PASSIVE != 0,
                        last_recv_ago_ms: a.last_recv_ago_ms,
                        last_sent_ago_ms: a.last_sent_ago_ms,
                    };
                    activity.insert(t.cookie, seen);
                }
                Reading::Gone => {}
                Reading::Unknown => {
                    unknown.insert(t.cookie);
                }
            }
        }
        let now = clock::boot_ns();
        for id in ids {
            let s = &self.sessions[&id];
            if s.flows.iter().any(|c| unknown.contains(c)) {
                // Without evidence of idleness nobody is killed; look again soon.
                self.queue_idle_check(id, now + policy::NS_PER_SEC);
                continue;
            }
            let sockets: Vec<SocketActivity> = s
                .flows
                .iter()
                .filter_map(|c| activity.get(c).copied())
                .collect();
            let mut floor = s.terms.granted_ns.max(s.terms.touched_ns);
            if s.idle_direction() == IdleDirection::Any {
                // A forwarded flow's packets, either way, are activity; a
                // router cannot tell which end is the user, so under
                // `input` only `touch` speaks for forwarded flows.
                for key in &s.forwarded {
                    if let Some(f) = self.enforcer.forwarded(key) {
                        floor = floor.max(f.last_seen_ns);
                    }
                }
            }
            let last = policy::last_activity(now, s.idle_direction(), &sockets, floor);
            let idle_deadline = last + s.terms.idle_timeout_ns;
            if now >= idle_deadline {
                info!(session = %s.name(), idle_for_ms = (now - last) / policy::NS_PER_MS, "idle");
                self.end_sessions(&[id], Reason::Idle, Some(idle_deadline));
            } else {
                self.queue_idle_check(id, idle_deadline);
            }
        }
    }

    /// Kills every flow of the sessions and removes them. `due` is when
    /// the kill became due (None: each flow's own deadline).
    pub(super) fn end_sessions(
        &mut self,
        ids: &[u64],
        reason: Reason,
        due: Option<u64>,
    ) -> Vec<KillView> {
        let cookies: Vec<u64> = ids
            .iter()
            .filter_map(|id| self.sessions.get(id))
            .flat_map(|s| s.flows.iter().copied())
            .collect();
        let mut kills = self.kill_flows(&cookies, reason, due);
        let forwarded: Vec<FlowTuple> = ids
            .iter()
            .filter_map(|id| self.sessions.get(id))
            .flat_map(|s| s.forwarded.iter().copied())
            .collect();
        kills.extend(self.kill_forwarded(&forwarded, reason, due));
        for id in ids {
            if let Some(s) = self.sessions.get(id) {
                debug!(session = %s.name(), ?reason, "session ended");
            }
            self.forget_session(*id);
        }
        kills
    }

    pub(super) fn forget_session(&mut self, id: u64) {
        if let Some(s) = self.sessions.remove(&id) {
            self.by_name.remove(s.name());
            self.queue.remove(&(s.terms.deadline_ns, Due::Deadline(id)));
            if let Some(at) = s.idle_check_at {
                self.queue.remove(&(at, Due::IdleCheck(id)));
            }
            for key in s.pending.iter().flatten() {
                self.enforcer.remove_pending(key);
            }
            self.enforcer.remove_session(id);
        }
    }

    /// The kill path: deadline into the kernel (the backstop drops from now
    /// on), one batched socket destroy, an audit event per flow.
    pub(super) fn kill_flows(
        &mut self,
        cookies: &[u64],
        reason: Reason,
        due: Option<u64>,
    ) -> Vec<KillView> {
        let now = clock::boot_ns();
        let mut targets = Vec::new();
        let mut gone = Vec::new();
        for &cookie in cookies {
            // The mirror is exact for what we need (the kernel sets a flow's
            // addresses once; the daemon writes its deadline), and sparing a
            // map lookup per flow matters when 100k flows expire together.
            // A flow that has closed meanwhile is found gone by the destroy.
            let known = self.flows.get(&cookie).copied();
            match known.or_else(|| self.enforcer.flow(cookie)) {
                Some(mut flow) => {
                    if flow.deadline_ns == 0 || flow.deadline_ns > now {
                        flow.deadline_ns = now;
                        let _ = self.enforcer.update_flow(cookie, &flow);
                    }
                    targets.push((cookie, flow));
                }
                None => gone.push(cookie),
            }
        }
        let requests: Vec<DiagTarget> = targets
            .iter()
            .map(|(cookie, flow)| DiagTarget {
                cookie: *cookie,
                tuple: flow.tuple,
                netns_cookie: flow.netns_cookie,
            })
            .collect();
        let path = self.enforcer.kill_path;
        let outcomes = match path {
            KillPath::Destroy => self.enforcer.destroy(&requests),
            KillPath::Rst | KillPath::Forward => {
                let with_flows: Vec<(DiagTarget, Flow)> = requests
                    .iter()
                    .zip(&targets)
                    .map(|(r, (_, f))| (*r, *f))
                    .collect();
                self.enforcer.reset(&with_flows)
            }
        };
        let batch = KillBatch {
            reason,
            path,
            done: clock::now(),
        };
        let mut views = Vec::new();
        for ((cookie, flow), outcome) in targets.into_iter().zip(outcomes) {
            let result = match outcome {
                DestroyOutcome::Destroyed => "destroyed",
                DestroyOutcome::Gone => {
                    self.enforcer.remove_flow(cookie);
                    "already_closed"
                }
                DestroyOutcome::Failed(errno) => {
                    warn!(
                        cookie,
                        errno,
                        "socket destroy refused; the kernel keeps dropping the flow's packets"
                    );
                    "drop_only"
                }
            };
            let since = due.unwrap_or(flow.deadline_ns);
            views.push(self.audit_kill(&batch, cookie, &flow, since, result));
            // Even a drop-only flow leaves the index: its session is ending,
            // and the kernel entry (with its deadline) stays until it closes.
            self.unindex_flow(cookie);
        }
        for cookie in gone {
            if let Some(flow) = self.unindex_flow(cookie) {
                let since = due.unwrap_or(flow.deadline_ns);
                views.push(self.audit_kill(&batch, cookie, &flow, since, "already_closed"));
            }
        }
        views
    }

    /// Kills forwarded flows: deadline into the kernel (the tc program drops
    /// every further packet), a RST to each end, and a check a moment later
    /// of whether the flow's packets stopped, which completes the audit
    /// event.
    pub(super) fn kill_forwarded(
        &mut self,
        keys: &[FlowTuple],
        reason: Reason,
        due: Option<u64>,
    ) -> Vec<KillView> {
        let mut views = Vec::new();
        for key in keys {
            let now = clock::boot_ns();
            let mut grant =
                self.enforcer
                    .forwarded_grant(key)
                    .unwrap_or(reaper_common::PendingGrant {
                        deadline_ns: 0,
                        session: 0,
                        netns_cookie: self.enforcer.netns_cookie,
                    });
            if grant.deadline_ns == 0 || grant.deadline_ns > now {
                grant.deadline_ns = now;
                let _ = self.enforcer.put_forwarded_grant(key, &grant);
            }
            let (session, user, target) = match self.sessions.get_mut(&grant.session) {
                Some(s) => {
                    s.forwarded.remove(key);
                    (
                        s.name().to_owned(),
                        s.user().to_owned(),
                        s.target().to_owned(),
                    )
                }
                None => Default::default(),
            };
            let (local, remote) = socket::addrs_of(key);
            let view = |result: &str| KillView {
                session: session.clone(),
                cookie: 0,
                local: local.to_string(),
                remote: remote.to_string(),
                path: path_name(KillPath::Forward).to_string(),
                result: result.to_string(),
            };
            let Some(flow) = self.enforcer.forwarded(key) else {
                views.push(view("already_closed"));
                continue;
            };
            let sent = self.enforcer.reset_forwarded(key, &flow);
            let id = self.next_check;
            self.next_check += 1;
            let done = clock::now();
            self.rst_checks.insert(
                id,
                RstCheck {
                    key: *key,
                    reason,
                    since_ns: due.unwrap_or(grant.deadline_ns),
                    done,
                    dropped_before: flow.dropped,
                    sent,
                    session: session.clone(),
                    user,
                    target,
                },
            );
            self.queue
                .insert((done.boot_ns + RST_CHECK_NS, Due::RstCheck(id)));
            views.push(view("rst_sent"));
        }
        views
    }

    /// The audit event of a forwarded kill: the peers acknowledged when
    /// none of the flow's packets had to be dropped since the RSTs.
    fn finish_rst_check(&mut self, id: u64) {
        let Some(check) = self.rst_checks.remove(&id) else {
            return;
        };
        let dropped_after = self
            .enforcer
            .forwarded(&check.key)
            .map_or(check.dropped_before, |f| f.dropped);
        let acknowledged = check.sent > 0 && dropped_after == check.dropped_before;
        let (local, remote) = socket::addrs_of(&check.key);
        self.audit.record(&KillEvent {
            ts: policy::format_rfc3339(check.done.unix_ns),
            event: "kill",
            reason: check.reason,
            session: check.session,
            user: check.user,
            target: check.target,
            local: local.to_string(),
            remote: remote.to_string(),
            cookie: 0,
            late_us: check.done.boot_ns.saturating_sub(check.since_ns) / policy::NS_PER_US,
            path: KillPath::Forward,
            result: if acknowledged { "reset" } else { "drop_only" },
            acknowledged: Some(acknowledged),
        });
    }

    /// Forgets forwarded flows unseen for a while that no live grant holds:
    /// their RSTs are long sent and their drop long enforced.
    fn collect_forwarded(&mut self, now: u64) {
        let live: HashSet<FlowTuple> = self
            .sessions
            .values()
            .flat_map(|s| s.forwarded.iter().copied())
            .collect();
        for (key, flow) in self.enforcer.forwarded_flows() {
            if !live.contains(&key) && now.saturating_sub(flow.last_seen_ns) > FORWARD_IDLE_NS {
                self.enforcer.remove_forwarded(&key);
            }
        }
    }

    fn audit_kill(
        &mut self,
        batch: &KillBatch,
        cookie: u64,
        flow: &Flow,
        since_ns: u64,
        result: &'static str,
    ) -> KillView {
        let KillBatch { reason, path, done } = *batch;
        let (session, user, target) = match self.sessions.get(&flow.session) {
            Some(s) => (
                s.name().to_owned(),
                s.user().to_owned(),
                s.target().to_owned(),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        let (local, remote) = socket::addrs_of(&flow.tuple);
        let late_us = done.boot_ns.saturating_sub(since_ns) / policy::NS_PER_US;
        self.audit.record(&KillEvent {
            ts: policy::format_rfc3339(done.unix_ns),
            event: "kill",
            reason,
            session: session.clone(),
            user,
            target,
            local: local.to_string(),
            remote: remote.to_string(),
            cookie,
            late_us,
            path,
            result,
            acknowledged: None,
        });
        KillView {
            session,
            cookie,
            local: local.to_string(),
            remote: remote.to_string(),
            path: path_name(path).to_string(),
            result: result.to_string(),
        }
    }

    /// The cookie of the namespace a request names (the daemon's own when
    /// it names none).
    pub(super) fn netns_of(
        &mut self,
        netns: Option<&crate::protocol::NetnsRef>,
    ) -> Result<u64, Refusal> {
        match netns {
            None => Ok(self.enforcer.netns_cookie),
            Some(n) => self
                .enforcer
                .resolve_netns(&n.path())
                .map_err(|why| Refusal::new(RefusalCode::BadValue, format!("netns: {why}"))),
        }
    }

    /// Finds the tracked sockets of a flow named by addresses, in the
    /// network namespace with cookie `netns`.
    pub(super) fn lookup_addrs(
        &mut self,
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
        netns: u64,
    ) -> Vec<u64> {
        let candidates = socket::candidate_tuples(local, remote);
        let mut found: Vec<u64> = candidates
            .iter()
            .filter_map(|t| self.by_tuple.get(&(netns, *t)).copied())
            .collect();
        if found.is_empty() {
            // The ring buffer may have lost events: ask the kernel itself.
            for (cookie, flow) in self.enforcer.flows() {
                if flow.netns_cookie == netns && candidates.contains(&flow.tuple) {
                    self.index_flow(cookie, flow);
                    found.push(cookie);
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    pub(super) fn tracked_flow(&mut self, cookie: u64) -> Option<Flow> {
        if let Some(flow) = self.flows.get(&cookie) {
            return Some(*flow);
        }
        let flow = self.enforcer.flow(cookie)?;
        self.index_flow(cookie, flow);
        Some(flow)
    }

    pub(super) fn view(&self, id: u64, now: Now) -> SessionView {
        let s = &self.sessions[&id];
        let flows: Vec<FlowView> = s
            .flows
            .iter()
            .filter_map(|c| self.flows.get(c).map(|f| (*c, f)))
            .map(|(cookie, f)| {
                let (local, remote) = socket::addrs_of(&f.tuple);
                FlowView {
                    cookie,
                    local: local.to_string(),
                    remote: remote.to_string(),
                    established: policy::format_rfc3339(self.wall(f.established_ns)),
                    path: path_name(self.enforcer.kill_path).to_string(),
                }
            })
            .collect();
        let mut flows: Vec<FlowView> = flows;
        for key in &s.forwarded {
            let (local, remote) = socket::addrs_of(key);
            let first_seen = self.enforcer.forwarded(key).map_or(0, |f| f.first_seen_ns);
            flows.push(FlowView {
                cookie: 0,
                local: local.to_string(),
                remote: remote.to_string(),
                established: policy::format_rfc3339(self.wall(first_seen)),
                path: path_name(KillPath::Forward).to_string(),
            });
        }
        let left = s.terms.deadline_ns as i128 - now.boot_ns as i128;
        SessionView {
            session: s.name().to_owned(),
            user: s.user().to_owned(),
            target: s.target().to_owned(),
            class: s.class().to_owned(),
            deadline: policy::format_rfc3339(self.wall(s.terms.deadline_ns)),
            deadline_boot_ns: s.terms.deadline_ns,
            time_left_ms: (left / policy::NS_PER_MS as i128) as i64,
            granted_at: policy::format_rfc3339(s.terms.granted_unix_ns as i128),
            granted_by_uid: s.terms.granted_by_uid,
            idle_timeout_ms: (s.terms.idle_timeout_ns != 0)
                .then_some(s.terms.idle_timeout_ns / policy::NS_PER_MS),
            idle_direction: s.idle_direction(),
            flows,
            expecting: s.pending.len(),
        }
    }

    /// Sessions in deadline order.
    pub(super) fn sessions_by_deadline(&self) -> Vec<u64> {
        self.queue
            .iter()
            .filter_map(|(_, due)| match due {
                Due::Deadline(id) => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Applies a reloaded config: ports and grace go to the kernel at once;
    /// classes, limits, access and max_ttl apply to requests from now on.
    /// Live grants keep the terms they were given.
    pub fn reload(&mut self, mut new: Config) -> Result<Vec<&'static str>, String> {
        let restart_only = self.config.restart_only_changes(&new);
        new.keep_restart_only(&self.config);
        self.enforcer
            .apply_ports(&new)
            .map_err(|e| format!("writing the new ports to the kernel: {e}"))?;
        self.config = new;
        self.config_loads += 1;
        self.last_reload_error = None;
        Ok(restart_only)
    }
}
