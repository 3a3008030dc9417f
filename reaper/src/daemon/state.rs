//! The daemon's state: sessions, the flows the kernel tracks, and the
//! deadline schedule, kept consistent with the pinned kernel maps.
//!
//! The kernel maps are the truth; everything here is an index over them that
//! can be rebuilt at any time (`adopt`). Writes go to the kernel first, in an
//! order that leaves a crash harmless:
//! * grant: session record, then each flow's deadline;
//! * kill: each flow's deadline (so the backstop drops at once), then the
//!   socket destroy, then the session record.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};

use reaper_common::{Flow, FlowEvent, FlowEventKind, FlowTuple, Label, SessionRecord};
use tracing::{debug, error, info, warn};

use super::audit::{Audit, KillEvent, Reason};
use crate::clock::{self, DeadlineTimer};
use crate::config::Config;
use crate::enforcer::{socket, DestroyOutcome, DestroyTarget, Enforcer};
use crate::policy::{self, DeadlineLimits, Now};
use crate::protocol::{
    Command, ExtendRequest, FlowRef, FlowView, GrantRequest, GrantResult, KillView, ListArgs,
    ListResult, Refusal, RefusalCode, RevokeResult, RevokeSelector, SessionView, StatusResult,
    PROTOCOL_VERSION,
};

/// Who is asking, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

struct Session {
    record: SessionRecord,
    name: String,
    user: String,
    target: String,
    flows: BTreeSet<u64>,
}

pub struct State {
    enforcer: Enforcer,
    timer: DeadlineTimer,
    audit: Audit,
    config: Config,
    started_boot_ns: u64,
    /// Unix time minus boot time, read once at start: every boot-clock
    /// instant is shown as the same wall-clock time for the daemon's life,
    /// instead of jittering with each pair of clock reads.
    wall_offset_ns: i128,
    sessions: HashMap<u64, Session>,
    by_name: HashMap<String, u64>,
    next_id: u64,
    /// (deadline, session id), earliest first.
    schedule: BTreeSet<(u64, u64)>,
    /// Mirror of the kernel's FLOWS, fed by the ring buffer.
    flows: HashMap<u64, Flow>,
    /// (netns cookie, tuple) → socket cookie.
    by_tuple: HashMap<(u64, FlowTuple), u64>,
}

type Reply = Result<serde_json::Value, Refusal>;

fn refuse<T>(code: RefusalCode, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(code, message))
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(RefusalCode::Internal, e.to_string())
}

fn describe(t: &FlowTuple) -> String {
    let (l, r) = socket::addrs_of(t);
    format!("{l} <-> {r}")
}

impl State {
    pub fn new(enforcer: Enforcer, timer: DeadlineTimer, audit: Audit, config: Config) -> State {
        State {
            enforcer,
            timer,
            audit,
            config,
            started_boot_ns: clock::boot_ns(),
            wall_offset_ns: {
                let now = clock::now();
                now.unix_ns - now.boot_ns as i128
            },
            sessions: HashMap::new(),
            by_name: HashMap::new(),
            next_id: 1,
            schedule: BTreeSet::new(),
            flows: HashMap::new(),
            by_tuple: HashMap::new(),
        }
    }

    pub fn timer(&self) -> &DeadlineTimer {
        &self.timer
    }

    /// Rebuilds every index from the pinned maps: what a restarted daemon
    /// does before it accepts requests. Sessions whose deadline passed while
    /// no daemon ran are killed by the first timer expiry, right after.
    pub fn adopt(&mut self) {
        for (cookie, flow) in self.enforcer.flows() {
            self.index_flow(cookie, flow);
        }
        for (id, record) in self.enforcer.sessions() {
            let (Some(name), Some(user), Some(target)) = (
                record.name.as_str(),
                record.user.as_str(),
                record.target.as_str(),
            ) else {
                warn!(id, "dropping an unreadable session record");
                self.enforcer.remove_session(id);
                continue;
            };
            let (name, user, target) = (name.to_owned(), user.to_owned(), target.to_owned());
            self.index_session(id, record, name, user, target);
        }
        // Attach flows to their sessions; repair what a crash mid-write left.
        let granted: Vec<(u64, Flow)> = self
            .flows
            .iter()
            .filter(|(_, f)| f.session != 0)
            .map(|(c, f)| (*c, *f))
            .collect();
        for (cookie, mut flow) in granted {
            let id = flow.session;
            if !self.sessions.contains_key(&id) {
                // The session record was removed (a kill that crashed before
                // the flow closed): keep the deadline, under a stand-in.
                self.adopt_orphan(id, &flow);
            }
            let session = self.sessions.get_mut(&id).expect("present or adopted");
            session.flows.insert(cookie);
            if flow.deadline_ns != session.record.deadline_ns {
                flow.deadline_ns = session.record.deadline_ns;
                let _ = self.enforcer.update_flow(cookie, &flow);
                self.flows.insert(cookie, flow);
            }
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
        let now = clock::now();
        let record = SessionRecord {
            deadline_ns: flow.deadline_ns.max(1),
            granted_ns: flow.established_ns,
            granted_unix_ns: now.unix_of(flow.established_ns) as u64,
            name: Label::new(&name).expect("short"),
            user: Label::new("unknown").expect("short"),
            target: Label::new("unknown").expect("short"),
            ..Default::default()
        };
        let _ = self.enforcer.put_session(id, &record);
        warn!(session = %name, "flow without a session record: enforcing its deadline under a stand-in session");
        self.index_session(id, record, name, "unknown".into(), "unknown".into());
    }

    /// Adds a session to the in-memory indexes (its record is already in
    /// the kernel map).
    fn index_session(
        &mut self,
        id: u64,
        record: SessionRecord,
        name: String,
        user: String,
        target: String,
    ) {
        self.by_name.insert(name.clone(), id);
        self.schedule.insert((record.deadline_ns, id));
        self.sessions.insert(
            id,
            Session {
                record,
                name,
                user,
                target,
                flows: BTreeSet::new(),
            },
        );
        self.next_id = self.next_id.max(id + 1);
    }

    fn index_flow(&mut self, cookie: u64, flow: Flow) {
        self.by_tuple
            .insert((flow.netns_cookie, flow.tuple), cookie);
        self.flows.insert(cookie, flow);
    }

    fn unindex_flow(&mut self, cookie: u64) -> Option<Flow> {
        let flow = self.flows.remove(&cookie)?;
        let key = (flow.netns_cookie, flow.tuple);
        if self.by_tuple.get(&key) == Some(&cookie) {
            self.by_tuple.remove(&key);
        }
        if let Some(session) = self.sessions.get_mut(&flow.session) {
            session.flows.remove(&cookie);
        }
        Some(flow)
    }

    /// Applies flow events from the kernel, in order.
    pub fn apply_events(&mut self, events: &[FlowEvent]) {
        for event in events {
            if event.kind == FlowEventKind::Established as u32 {
                // The entry may already carry a grant (adopted state); keep ours.
                let flow = self.flows.get(&event.cookie).copied().unwrap_or(event.flow);
                self.index_flow(event.cookie, flow);
            } else if event.kind == FlowEventKind::Closed as u32 {
                if let Some(flow) = self.unindex_flow(event.cookie) {
                    debug!(cookie = event.cookie, flow = %describe(&flow.tuple), "flow closed");
                }
            }
        }
    }

    /// Re-arms the timer for the earliest deadline.
    fn rearm(&self) {
        let next = self.schedule.first().map(|(deadline, _)| *deadline);
        if let Err(e) = self.timer.arm(next) {
            error!("arming the deadline timer: {e}");
        }
    }

    /// Kills every session whose deadline has come. Called when the timer fires.
    pub fn expire_due(&mut self) {
        let now = clock::boot_ns();
        let due: Vec<u64> = self
            .schedule
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|(_, id)| *id)
            .collect();
        if !due.is_empty() {
            self.end_sessions(&due, Reason::Expired, None);
        }
        self.rearm();
    }

    pub fn handle(&mut self, command: Command, caller: Caller, fds: &[OwnedFd]) -> Reply {
        if command.mutates() && !self.config.access.allows(caller.uid, caller.gid) {
            let a = &self.config.access;
            return refuse(
                RefusalCode::PermissionDenied,
                format!(
                    "uid {} (gid {}) may not change grants; allowed are root, uids {:?} and gids {:?} (config [access])",
                    caller.uid, caller.gid, a.uids, a.gids
                ),
            );
        }
        fn value(r: impl serde::Serialize) -> Reply {
            serde_json::to_value(r).map_err(internal)
        }
        match command {
            Command::Grant(g) => value(self.grant(g, caller, fds)?),
            Command::Extend(e) => value(self.extend(e)?),
            Command::Revoke(r) => value(self.revoke(r)?),
            Command::List(l) => value(self.list(&l)),
            Command::Status => value(self.status()),
        }
    }

    fn limits(&self) -> DeadlineLimits {
        DeadlineLimits {
            max_ttl_ns: self.config.max_ttl_ns,
        }
    }

    /// Finds the tracked sockets of a flow named by addresses, in the
    /// daemon's own network namespace.
    fn lookup_addrs(
        &mut self,
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
    ) -> Vec<u64> {
        let netns = self.enforcer.netns_cookie;
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

    fn tracked_flow(&mut self, cookie: u64) -> Option<Flow> {
        if let Some(flow) = self.flows.get(&cookie) {
            return Some(*flow);
        }
        let flow = self.enforcer.flow(cookie)?;
        self.index_flow(cookie, flow);
        Some(flow)
    }

    fn resolve(&mut self, refs: &[FlowRef], fds: &[OwnedFd]) -> Result<Vec<u64>, Refusal> {
        let mut cookies = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            match *r {
                FlowRef::Fd(index) => {
                    let Some(fd) = fds.get(index) else {
                        return refuse(
                            RefusalCode::BadFd,
                            format!(
                                "flows[{i}].fd: descriptor {index} was not passed ({} came with the request; send them with SCM_RIGHTS in the same sendmsg as the line)",
                                fds.len()
                            ),
                        );
                    };
                    let info = socket::inspect(fd.as_fd()).map_err(|why| {
                        Refusal::new(RefusalCode::BadFd, format!("flows[{i}].fd: {why}"))
                    })?;
                    let Some(flow) = self.tracked_flow(info.cookie) else {
                        return refuse(
                            RefusalCode::FlowNotTracked,
                            format!(
                                "flows[{i}]: the socket {} <-> {} is not tracked: neither port is watched, or it belongs to a process outside cgroup {}",
                                info.local,
                                info.remote,
                                self.enforcer.cgroup.display()
                            ),
                        );
                    };
                    if flow.netns_cookie != self.enforcer.netns_cookie {
                        // Our netlink socket could not destroy it: refuse
                        // rather than promise a kill we cannot deliver.
                        return refuse(
                            RefusalCode::FlowNotTracked,
                            format!(
                                "flows[{i}]: the socket {} <-> {} lives in another network namespace, which this daemon does not reach",
                                info.local, info.remote
                            ),
                        );
                    }
                    cookies.push(info.cookie);
                }
                FlowRef::Addrs { local, remote } => {
                    let found = self.lookup_addrs(local, remote);
                    if found.is_empty() {
                        return refuse(
                            RefusalCode::NoSuchFlow,
                            format!(
                                "flows[{i}]: no tracked TCP flow {local} <-> {remote} in this network namespace (is it established, and is one of its ports watched?)"
                            ),
                        );
                    }
                    cookies.extend(found);
                }
            }
        }
        cookies.sort_unstable();
        cookies.dedup();
        Ok(cookies)
    }

    fn grant(
        &mut self,
        g: GrantRequest,
        caller: Caller,
        fds: &[OwnedFd],
    ) -> Result<GrantResult, Refusal> {
        let now = clock::now();
        let cookies = self.resolve(&g.flows, fds)?;
        let existing = self.by_name.get(&g.session).copied();
        for cookie in &cookies {
            let flow = self.flows[cookie];
            if flow.session != 0 && Some(flow.session) != existing {
                let other = self
                    .sessions
                    .get(&flow.session)
                    .map_or("?", |s| s.name.as_str());
                return refuse(
                    RefusalCode::FlowConflict,
                    format!(
                        "flow {} already belongs to session {other:?}",
                        describe(&flow.tuple)
                    ),
                );
            }
        }
        let requested =
            match &g.expiry {
                Some(expiry) => Some(policy::deadline_for(expiry, now, self.limits()).map_err(
                    |e| Refusal::new(RefusalCode::DeadlineRefused, format!("grant: {e}")),
                )?),
                None => None,
            };

        let (id, created) = match existing {
            Some(id) => {
                let s = &self.sessions[&id];
                if s.user != g.user || s.target != g.target {
                    return refuse(
                        RefusalCode::SessionConflict,
                        format!(
                            "session {:?} belongs to user {:?} on target {:?}, not {:?} on {:?}",
                            g.session, s.user, s.target, g.user, g.target
                        ),
                    );
                }
                // Joining never lengthens a session; an earlier deadline tightens it.
                let deadline =
                    requested.map_or(s.record.deadline_ns, |d| d.min(s.record.deadline_ns));
                self.set_deadline(id, deadline)?;
                (id, false)
            }
            None => {
                let Some(deadline) = requested else {
                    return refuse(
                        RefusalCode::BadRequest,
                        format!(
                            "grant: session {:?} is new, so it needs ttl or expires_at",
                            g.session
                        ),
                    );
                };
                if self.sessions.len() >= self.config.max_sessions as usize {
                    return refuse(
                        RefusalCode::TableFull,
                        format!(
                            "the session table is full ({} sessions, max_sessions)",
                            self.config.max_sessions
                        ),
                    );
                }
                let id = self.next_id;
                let record = SessionRecord {
                    deadline_ns: deadline,
                    granted_ns: now.boot_ns,
                    granted_unix_ns: now.unix_ns as u64,
                    granted_by_uid: caller.uid,
                    name: Label::new(&g.session).expect("length checked by the protocol"),
                    user: Label::new(&g.user).expect("length checked by the protocol"),
                    target: Label::new(&g.target).expect("length checked by the protocol"),
                    ..Default::default()
                };
                if !self.enforcer.put_session(id, &record).map_err(internal)? {
                    return refuse(RefusalCode::TableFull, "the kernel session table is full");
                }
                self.index_session(
                    id,
                    record,
                    g.session.clone(),
                    g.user.clone(),
                    g.target.clone(),
                );
                (id, true)
            }
        };

        let deadline = self.sessions[&id].record.deadline_ns;
        let mut added = 0;
        for cookie in cookies {
            let mut flow = self.flows[&cookie];
            flow.deadline_ns = deadline;
            flow.session = id;
            if self.enforcer.update_flow(cookie, &flow).map_err(internal)? {
                self.flows.insert(cookie, flow);
                self.sessions
                    .get_mut(&id)
                    .expect("present")
                    .flows
                    .insert(cookie);
                added += 1;
            } else {
                self.unindex_flow(cookie);
            }
        }
        if added == 0 && created {
            self.forget_session(id);
            self.rearm();
            return refuse(
                RefusalCode::NoSuchFlow,
                "grant: every named flow closed before it could be granted",
            );
        }
        self.rearm();
        let session = self.view(id, now);
        info!(session = %session.session, user = %session.user, target = %session.target,
              flows = added, deadline = %session.deadline, created, "granted");
        Ok(GrantResult { session, created })
    }

    /// Moves a session's deadline, in the kernel first.
    fn set_deadline(&mut self, id: u64, deadline: u64) -> Result<(), Refusal> {
        let session = self.sessions.get_mut(&id).expect("caller checked");
        let old = session.record.deadline_ns;
        if old == deadline {
            return Ok(());
        }
        session.record.deadline_ns = deadline;
        let record = session.record;
        let cookies: Vec<u64> = session.flows.iter().copied().collect();
        self.enforcer.put_session(id, &record).map_err(internal)?;
        for cookie in cookies {
            if let Some(mut flow) = self.flows.get(&cookie).copied() {
                flow.deadline_ns = deadline;
                if self.enforcer.update_flow(cookie, &flow).map_err(internal)? {
                    self.flows.insert(cookie, flow);
                } else {
                    self.unindex_flow(cookie);
                }
            }
        }
        self.schedule.remove(&(old, id));
        self.schedule.insert((deadline, id));
        Ok(())
    }

    fn extend(&mut self, e: ExtendRequest) -> Result<GrantResult, Refusal> {
        let now = clock::now();
        let Some(&id) = self.by_name.get(&e.session) else {
            return refuse(
                RefusalCode::NoSuchSession,
                format!("extend: no session {:?}", e.session),
            );
        };
        let deadline = policy::deadline_for(&e.expiry, now, self.limits())
            .map_err(|err| Refusal::new(RefusalCode::DeadlineRefused, format!("extend: {err}")))?;
        let current = self.sessions[&id].record.deadline_ns;
        if deadline < current {
            return refuse(
                RefusalCode::DeadlineRefused,
                format!(
                    "extend: the new deadline {} is earlier than the current {}; extend never shortens (revoke ends a session now)",
                    policy::format_rfc3339(now.unix_of(deadline)),
                    policy::format_rfc3339(now.unix_of(current))
                ),
            );
        }
        self.set_deadline(id, deadline)?;
        self.rearm();
        let session = self.view(id, now);
        info!(session = %session.session, deadline = %session.deadline, "extended");
        Ok(GrantResult {
            session,
            created: false,
        })
    }

    fn revoke(&mut self, selector: RevokeSelector) -> Result<RevokeResult, Refusal> {
        let pick = |f: &dyn Fn(&Session) -> bool| -> Vec<u64> {
            let mut ids: Vec<u64> = self
                .sessions
                .iter()
                .filter(|(_, s)| f(s))
                .map(|(id, _)| *id)
                .collect();
            ids.sort_unstable();
            ids
        };
        let ids = match &selector {
            RevokeSelector::Session(name) => match self.by_name.get(name) {
                Some(id) => vec![*id],
                None => {
                    return refuse(
                        RefusalCode::NoSuchSession,
                        format!("revoke: no session {name:?}"),
                    )
                }
            },
            RevokeSelector::User(user) => pick(&|s| &s.user == user),
            RevokeSelector::Target(target) => pick(&|s| &s.target == target),
            RevokeSelector::Flow { local, remote } => {
                let cookies = self.lookup_addrs(*local, *remote);
                if cookies.is_empty() {
                    return refuse(
                        RefusalCode::NoSuchFlow,
                        format!("revoke: no tracked TCP flow {local} <-> {remote} in this network namespace"),
                    );
                }
                let requested = clock::boot_ns();
                let kills = self.kill_flows(&cookies, Reason::Revoked, Some(requested));
                return Ok(RevokeResult {
                    sessions: vec![],
                    kills,
                });
            }
        };
        let names = ids
            .iter()
            .map(|id| self.sessions[id].name.clone())
            .collect();
        let kills = self.end_sessions(&ids, Reason::Revoked, Some(clock::boot_ns()));
        self.rearm();
        Ok(RevokeResult {
            sessions: names,
            kills,
        })
    }

    /// Kills every flow of the sessions and removes them.
    fn end_sessions(
        &mut self,
        ids: &[u64],
        reason: Reason,
        requested: Option<u64>,
    ) -> Vec<KillView> {
        let cookies: Vec<u64> = ids
            .iter()
            .filter_map(|id| self.sessions.get(id))
            .flat_map(|s| s.flows.iter().copied())
            .collect();
        let kills = self.kill_flows(&cookies, reason, requested);
        for id in ids {
            if let Some(s) = self.sessions.get(id) {
                if s.flows.is_empty() {
                    debug!(session = %s.name, ?reason, "session ended");
                }
            }
            self.forget_session(*id);
        }
        kills
    }

    fn forget_session(&mut self, id: u64) {
        if let Some(s) = self.sessions.remove(&id) {
            self.by_name.remove(&s.name);
            self.schedule.remove(&(s.record.deadline_ns, id));
            self.enforcer.remove_session(id);
        }
    }

    /// The kill path: deadline into the kernel (the backstop drops from now
    /// on), one batched socket destroy, an audit event per flow.
    /// `requested`: when a revoke asked for it; expiry measures lateness
    /// against each flow's deadline instead.
    fn kill_flows(
        &mut self,
        cookies: &[u64],
        reason: Reason,
        requested: Option<u64>,
    ) -> Vec<KillView> {
        let now = clock::boot_ns();
        let mut targets = Vec::new();
        let mut gone = Vec::new();
        for &cookie in cookies {
            match self.enforcer.flow(cookie) {
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
        let requests: Vec<DestroyTarget> = targets
            .iter()
            .map(|(cookie, flow)| DestroyTarget {
                cookie: *cookie,
                tuple: flow.tuple,
            })
            .collect();
        let outcomes = match self.enforcer.destroy(&requests) {
            Ok(o) => o,
            Err(e) => {
                error!(
                    "socket destroy failed: {e}; the kernel keeps dropping these flows' packets"
                );
                vec![DestroyOutcome::Failed(e.raw_os_error().unwrap_or(0)); requests.len()]
            }
        };
        let done = clock::now();
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
            let since = requested.unwrap_or(flow.deadline_ns);
            views.push(self.audit_kill(cookie, &flow, reason, done, since, result));
            // Even a drop-only flow leaves the index: its session is ending,
            // and the kernel entry (with its deadline) stays until it closes.
            self.unindex_flow(cookie);
        }
        for cookie in gone {
            if let Some(flow) = self.unindex_flow(cookie) {
                let since = requested.unwrap_or(flow.deadline_ns);
                views.push(self.audit_kill(cookie, &flow, reason, done, since, "already_closed"));
            }
        }
        views
    }

    fn audit_kill(
        &mut self,
        cookie: u64,
        flow: &Flow,
        reason: Reason,
        done: Now,
        since_ns: u64,
        result: &'static str,
    ) -> KillView {
        let (session, user, target) = match self.sessions.get(&flow.session) {
            Some(s) => (s.name.clone(), s.user.clone(), s.target.clone()),
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
            result,
        });
        KillView {
            session,
            cookie,
            local: local.to_string(),
            remote: remote.to_string(),
            result: result.to_string(),
        }
    }

    /// The wall-clock time of a boot-clock instant.
    fn wall(&self, boot_ns: u64) -> i128 {
        boot_ns as i128 + self.wall_offset_ns
    }

    fn view(&self, id: u64, now: Now) -> SessionView {
        let s = &self.sessions[&id];
        let flows = s
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
                }
            })
            .collect();
        let left = s.record.deadline_ns as i128 - now.boot_ns as i128;
        SessionView {
            session: s.name.clone(),
            user: s.user.clone(),
            target: s.target.clone(),
            deadline: policy::format_rfc3339(self.wall(s.record.deadline_ns)),
            deadline_boot_ns: s.record.deadline_ns,
            time_left_ms: (left / policy::NS_PER_MS as i128) as i64,
            granted_at: policy::format_rfc3339(s.record.granted_unix_ns as i128),
            granted_by_uid: s.record.granted_by_uid,
            flows,
        }
    }

    fn list(&self, filter: &ListArgs) -> ListResult {
        let now = clock::now();
        let keep = |s: &Session| {
            filter.session.as_ref().is_none_or(|v| &s.name == v)
                && filter.user.as_ref().is_none_or(|v| &s.user == v)
                && filter.target.as_ref().is_none_or(|v| &s.target == v)
        };
        let sessions = self
            .schedule
            .iter()
            .filter(|(_, id)| keep(&self.sessions[id]))
            .map(|(_, id)| self.view(*id, now))
            .collect();
        ListResult {
            now: policy::format_rfc3339(now.unix_ns),
            sessions,
        }
    }

    fn status(&self) -> StatusResult {
        let counters: BTreeMap<String, u64> = self.enforcer.counters();
        StatusResult {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_ms: (clock::boot_ns() - self.started_boot_ns) / policy::NS_PER_MS,
            cgroup: self.enforcer.cgroup.display().to_string(),
            pin_path: self.enforcer.pin_path.display().to_string(),
            sessions: self.sessions.len(),
            tracked_flows: self.flows.len(),
            granted_flows: self.sessions.values().map(|s| s.flows.len()).sum(),
            max_flows: self.config.max_flows,
            max_sessions: self.config.max_sessions,
            counters,
            watch: self.config.watch.clone(),
        }
    }
}
