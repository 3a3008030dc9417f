//! One handler per control-protocol operation. Each runs under the state
//! lock, checks everything before it writes anything, and then writes the
//! kernel maps first (see `state.rs` for the order), so a refused request
//! changes nothing.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use reaper_common::{flow_flags, forwarded_key, FlowTuple, Label, PendingGrant, SessionRecord};
use tracing::info;

use super::audit::Reason;
use super::state::{describe, internal, refuse, Caller, State};
use crate::clock;
use crate::enforcer::socket;
use crate::policy::{self, Admission, DeadlineLimits, Holder};
use crate::protocol::{
    Command, ExtendRequest, FlowRef, GrantRequest, GrantResult, ListArgs, ListResult, NetnsRef,
    Refusal, RefusalCode, RevokeResult, RevokeSelector, StatusResult, PROTOCOL_VERSION,
};

type Reply = Result<serde_json::Value, Refusal>;

impl State {
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
        let mutates = command.mutates();
        let result = match command {
            Command::Grant(g) => value(self.grant(g, caller, fds)?),
            Command::Extend(e) => value(self.extend(e)?),
            Command::Touch(session) => value(self.touch(&session)?),
            Command::Revoke(r) => value(self.revoke(r)?),
            Command::List(l) => value(self.list(&l)),
            Command::Status => value(self.status()),
        };
        if mutates {
            // A grant, extend, touch or revoke may have moved what is due first.
            self.rearm();
        }
        result
    }

    pub(super) fn limits(&self) -> DeadlineLimits {
        DeadlineLimits {
            max_ttl_ns: self.config.max_ttl_ns,
        }
    }

    /// A flow named by addresses that has no local socket, but that this
    /// host forwards.
    fn forwarded_key(&self, local: SocketAddr, remote: SocketAddr) -> Option<FlowTuple> {
        let t = socket::tuple_of(local, remote);
        let (key, _) = forwarded_key(
            t.family,
            t.local_addr,
            t.local_port,
            t.remote_addr,
            t.remote_port,
        );
        self.enforcer.forwarded(&key).map(|_| key)
    }

    /// The flows a grant names: socket cookies of local flows, each checked
    /// to be tracked here, and keys of forwarded flows.
    fn resolve(
        &mut self,
        refs: &[FlowRef],
        fds: &[OwnedFd],
    ) -> Result<(Vec<u64>, Vec<FlowTuple>), Refusal> {
        let mut cookies = Vec::new();
        let mut forwarded = Vec::new();
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
                    if self.tracked_flow(info.cookie).is_none() {
                        return refuse(
                            RefusalCode::FlowNotTracked,
                            format!(
                                "flows[{i}]: the socket {} <-> {} is not tracked: neither port is watched, or it belongs to a process outside cgroup {}",
                                info.local,
                                info.remote,
                                                                self.enforcer.cgroup.display()
                            ),
                        );
                    }
                    cookies.push(info.cookie);
                }
                FlowRef::Addrs {
                    local,
                    remote,
                    ref netns,
                } => {
                    let netns_cookie = self.netns_of(netns.as_ref())?;
                    let found = self.lookup_addrs(local, remote, netns_cookie);
                    if found.is_empty() && netns.is_none() {
                        if let Some(key) = self.forwarded_key(local, remote) {
                            forwarded.push(key);
                            continue;
                        }
                    }
                    if found.is_empty() {
                        let place = netns
                            .as_ref()
                            .map_or("this network namespace".to_string(), |n| {
                                format!("network namespace {}", n.path().display())
                            });
                        return refuse(
                            RefusalCode::NoSuchFlow,
                            format!(
                                "flows[{i}]: no tracked TCP flow {local} <-> {remote} in {place} (is it established, and is one of its ports watched?)"
                            ),
                        );
                    }
                    cookies.extend(found);
                }
            }
        }
        cookies.sort_unstable();
        cookies.dedup();
        Ok((cookies, forwarded))
    }

    fn grant(
        &mut self,
        g: GrantRequest,
        caller: Caller,
        fds: &[OwnedFd],
    ) -> Result<GrantResult, Refusal> {
        let now = clock::now();
        let (cookies, forwarded) = self.resolve(&g.flows, fds)?;
        let existing = self.by_name.get(g.session.as_str()).copied();
        for key in &forwarded {
            if let Some(grant) = self.enforcer.forwarded_grant(key) {
                let holder = self.sessions.get(&grant.session);
                if let Some(other) = holder.filter(|_| Some(grant.session) != existing) {
                    return refuse(
                        RefusalCode::FlowConflict,
                        format!(
                            "forwarded flow {} already belongs to session {:?}",
                            describe(key),
                            other.name()
                        ),
                    );
                }
            }
        }
        for cookie in &cookies {
            let flow = self.flows[cookie];
            if flow.session != 0 && Some(flow.session) != existing {
                let other = self.sessions.get(&flow.session).map_or("?", |s| s.name());
                return refuse(
                    RefusalCode::FlowConflict,
                    format!(
                        "flow {} already belongs to session {other:?}",
                        describe(&flow.tuple)
                    ),
                );
            }
            let grace_end = flow.established_ns + self.config.fence_grace_ns;
            if flow.session == 0 && flow.flags & flow_flags::FENCED != 0 && now.boot_ns >= grace_end
            {
                return refuse(
                    RefusalCode::DeadlineRefused,
                    format!(
                        "flow {} is on a fenced port and was not granted within the {} grace window",
                        describe(&flow.tuple),
                        policy::format_duration(self.config.fence_grace_ns)
                    ),
                );
            }
        }

        let (id, created) = match existing {
            Some(id) => (self.join_session(id, &g, now)?, false),
            None => (self.create_session(&g, caller, now, &cookies)?, true),
        };

        let deadline = self.sessions[&id].terms.deadline_ns;
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
        for key in forwarded {
            let grant = PendingGrant {
                deadline_ns: deadline,
                session: id,
                netns_cookie: self.enforcer.netns_cookie,
            };
            if !self
                .enforcer
                .put_forwarded_grant(&key, &grant)
                .map_err(internal)?
            {
                return refuse(
                    RefusalCode::TableFull,
                    "the forwarded-flow grant table is full",
                );
            }
            self.sessions
                .get_mut(&id)
                .expect("present")
                .forwarded
                .insert(key);
            added += 1;
        }
        let expected = self.register_expected(id, deadline, &g.expect)?;
        if added == 0 && expected == 0 && created {
            self.forget_session(id);
            return refuse(
                RefusalCode::NoSuchFlow,
                "grant: every named flow closed before it could be granted",
            );
        }
        let s = &self.sessions[&id];
        if created && s.terms.idle_timeout_ns != 0 {
            let first_check = now.boot_ns + s.terms.idle_timeout_ns;
            self.queue_idle_check(id, first_check);
        }
        let session = self.view(id, now);
        info!(session = %session.session, user = %session.user, target = %session.target,
              class = %session.class, flows = added, expected, deadline = %session.deadline,
              created, "granted");
        Ok(GrantResult { session, created })
    }

    /// A grant naming an existing session: same user, target and class; it
    /// may tighten the deadline, never lengthen it.
    fn join_session(
        &mut self,
        id: u64,
        g: &GrantRequest,
        now: policy::Now,
    ) -> Result<u64, Refusal> {
        let s = &self.sessions[&id];
        if s.user() != g.user || s.target() != g.target {
            return refuse(
                RefusalCode::SessionConflict,
                format!(
                    "session {:?} belongs to user {:?} on target {:?}, not {:?} on {:?}",
                    g.session,
                    s.user(),
                    s.target(),
                    g.user,
                    g.target
                ),
            );
        }
        if let Some(class) = &g.class {
            if class != s.class() {
                return refuse(
                    RefusalCode::SessionConflict,
                    format!(
                        "session {:?} is of class {:?}, not {class:?}",
                        g.session,
                        s.class()
                    ),
                );
            }
        }
        let asked_idle = g
            .asked
            .idle_timeout_ns
            .is_some_and(|t| t != s.terms.idle_timeout_ns);
        let asked_dir = g
            .asked
            .idle_direction
            .is_some_and(|d| d != s.idle_direction());
        if asked_idle || asked_dir {
            return refuse(
                RefusalCode::SessionConflict,
                format!(
                    "session {:?} already has its idle terms; a joining grant cannot change them",
                    g.session
                ),
            );
        }
        let current = (s.terms.deadline_ns, s.terms.expires_unix_ns);
        let (deadline, anchor) = match &g.asked.expiry {
            Some(expiry) => {
                let asked = policy::deadline_for(expiry, now, self.limits()).map_err(|e| {
                    Refusal::new(RefusalCode::DeadlineRefused, format!("grant: {e}"))
                })?;
                // Only a tighter deadline replaces the session's (and its anchor).
                if asked < current.0 {
                    (asked, expiry.wall_anchor())
                } else {
                    current
                }
            }
            None => current,
        };
        self.set_deadline(id, deadline, anchor)?;
        Ok(id)
    }

    /// A grant for a new session: the class's terms and limits apply.
    /// Returns the new session's id, or refuses (killing the named flows if
    /// a reject-new limit refused them).
    fn create_session(
        &mut self,
        g: &GrantRequest,
        caller: Caller,
        now: policy::Now,
        cookies: &[u64],
    ) -> Result<u64, Refusal> {
        let Some(class) = self.config.class(g.class.as_deref()) else {
            let known: Vec<&String> = self.config.classes.keys().collect();
            return refuse(
                RefusalCode::BadValue,
                format!(
                    "grant.class: no class {:?} (configured: {known:?})",
                    g.class.as_deref().unwrap_or("")
                ),
            );
        };
        let terms = policy::terms_for(&class, &g.asked, now, self.limits(), caller.uid == 0)
            .map_err(|e| Refusal::new(RefusalCode::DeadlineRefused, format!("grant: {e}")))?;
        if self.sessions.len() >= self.config.max_sessions as usize {
            return refuse(
                RefusalCode::TableFull,
                format!(
                    "the session table is full ({} sessions, max_sessions)",
                    self.config.max_sessions
                ),
            );
        }
        let admission = if class.is_limited(self.config.limits) {
            let holders: Vec<Holder<'_>> = self
                .sessions
                .iter()
                .map(|(id, s)| Holder {
                    id: *id,
                    user: s.user(),
                    target: s.target(),
                    granted_unix_ns: s.terms.granted_unix_ns as i128,
                })
                .collect();
            policy::admit(&holders, &g.user, &g.target, &class, self.config.limits)
        } else {
            Admission::Admit
        };
        match admission {
            Admission::Admit => {}
            Admission::Reject(why) => {
                // The flows came without a right to exist: they die now.
                let killed = self.kill_flows(cookies, Reason::Rejected, Some(now.boot_ns));
                return refuse(
                    RefusalCode::LimitReached,
                    format!(
                        "grant refused by class {:?}: {why}; {} flow(s) of the refused grant killed",
                        class.name,
                        killed.len()
                    ),
                );
            }
            Admission::Evict(ids) => {
                let names: Vec<String> = ids
                    .iter()
                    .map(|id| self.sessions[id].name().to_owned())
                    .collect();
                info!(evicted = ?names, for_user = %g.user, target = %g.target, "evicting the oldest sessions");
                self.end_sessions(&ids, Reason::Evicted, Some(now.boot_ns));
            }
        }
        let id = self.allocate_session_id();
        let record = SessionRecord {
            deadline_ns: terms.deadline_ns,
            granted_ns: now.boot_ns,
            granted_unix_ns: now.unix_ns as u64,
            granted_by_uid: caller.uid,
            idle_direction: terms.idle_direction.as_u32(),
            idle_timeout_ns: terms.idle_timeout_ns,
            touched_ns: 0,
            expires_unix_ns: terms.expires_unix_ns,
            name: Label::new(&g.session).expect("length checked by the protocol"),
            user: Label::new(&g.user).expect("length checked by the protocol"),
            target: Label::new(&g.target).expect("length checked by the protocol"),
            class: Label::new(&class.name).expect("length checked by the config"),
            ..Default::default()
        };
        if !self.enforcer.put_session(id, &record).map_err(internal)? {
            return refuse(RefusalCode::TableFull, "the kernel session table is full");
        }
        self.index_session(id, &record);
        Ok(id)
    }

    /// Registers connections to come in the kernel's `PENDING` table: the
    /// sock_ops program tags them the moment they are established.
    fn register_expected(
        &mut self,
        id: u64,
        deadline: u64,
        expect: &[(SocketAddr, SocketAddr, Option<NetnsRef>)],
    ) -> Result<usize, Refusal> {
        for (local, remote, netns) in expect {
            let grant = PendingGrant {
                deadline_ns: deadline,
                session: id,
                netns_cookie: self.netns_of(netns.as_ref())?,
            };
            // Port 0 (any) stays 0 in every form.
            let keys = socket::recorded_forms(*local, *remote);
            for key in &keys {
                if !self.enforcer.put_pending(key, &grant).map_err(internal)? {
                    return refuse(
                        RefusalCode::TableFull,
                        format!(
                            "the pre-registration table is full ({} entries, max_pending)",
                            self.config.max_pending
                        ),
                    );
                }
            }
            self.sessions
                .get_mut(&id)
                .expect("present")
                .pending
                .push(keys.into_boxed_slice());
        }
        Ok(expect.len())
    }

    /// Moves a session's deadline, in the kernel first. `anchor` is the
    /// wall-clock instant it stands for when an `expires_at` set it (else 0).
    pub(super) fn set_deadline(
        &mut self,
        id: u64,
        deadline: u64,
        anchor: u64,
    ) -> Result<(), Refusal> {
        let session = self.sessions.get_mut(&id).expect("caller checked");
        let old = session.terms.deadline_ns;
        if old == deadline && session.terms.expires_unix_ns == anchor {
            return Ok(());
        }
        session.terms.deadline_ns = deadline;
        session.terms.expires_unix_ns = anchor;
        let record = session.record();
        let cookies: Vec<u64> = session.flows.iter().copied().collect();
        let pending: Vec<FlowTuple> = session.pending.iter().flatten().copied().collect();
        let forwarded: Vec<FlowTuple> = session.forwarded.iter().copied().collect();
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
        for key in forwarded {
            if let Some(mut grant) = self.enforcer.forwarded_grant(&key) {
                grant.deadline_ns = deadline;
                self.enforcer
                    .put_forwarded_grant(&key, &grant)
                    .map_err(internal)?;
            }
        }
        for key in pending {
            // Same registration, new deadline (and the namespace it had).
            if let Some(mut grant) = self.enforcer.pending_grant(&key) {
                grant.deadline_ns = deadline;
                let _ = self.enforcer.put_pending(&key, &grant);
            }
        }
        self.requeue_deadline(id, old, deadline);
        Ok(())
    }

    fn session_id(&self, op: &str, name: &str) -> Result<u64, Refusal> {
        self.by_name.get(name).copied().ok_or_else(|| {
            Refusal::new(
                RefusalCode::NoSuchSession,
                format!("{op}: no session {name:?}"),
            )
        })
    }

    fn extend(&mut self, e: ExtendRequest) -> Result<GrantResult, Refusal> {
        let now = clock::now();
        let id = self.session_id("extend", &e.session)?;
        let deadline = policy::deadline_for(&e.expiry, now, self.limits())
            .map_err(|err| Refusal::new(RefusalCode::DeadlineRefused, format!("extend: {err}")))?;
        let current = self.sessions[&id].terms.deadline_ns;
        if deadline < current {
            return refuse(
                RefusalCode::DeadlineRefused,
                format!(
                    "extend: the new deadline {} is earlier than the current {}; extend never shortens (revoke ends a session now)",
                    policy::format_rfc3339(self.wall(deadline)),
                    policy::format_rfc3339(self.wall(current))
                ),
            );
        }
        self.set_deadline(id, deadline, e.expiry.wall_anchor())?;
        let session = self.view(id, now);
        info!(session = %session.session, deadline = %session.deadline, "extended");
        Ok(GrantResult {
            session,
            created: false,
        })
    }

    /// A proxy saw real user activity (e.g. VNC key or pointer events inside
    /// TLS or websocket framing, which the kernel cannot tell apart from
    /// keepalives).
    fn touch(&mut self, name: &str) -> Result<GrantResult, Refusal> {
        let now = clock::now();
        let id = self.session_id("touch", name)?;
        let session = self.sessions.get_mut(&id).expect("present");
        session.terms.touched_ns = now.boot_ns;
        let record = session.record();
        self.enforcer.put_session(id, &record).map_err(internal)?;
        Ok(GrantResult {
            session: self.view(id, now),
            created: false,
        })
    }

    fn revoke(&mut self, selector: RevokeSelector) -> Result<RevokeResult, Refusal> {
        let pick = |f: &dyn Fn(&super::state::Session) -> bool| -> Vec<u64> {
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
            RevokeSelector::Session(name) => vec![self.session_id("revoke", name)?],
            RevokeSelector::Class(class) => pick(&|s| s.class() == class),
            RevokeSelector::User(user) => pick(&|s| s.user() == user),
            RevokeSelector::Target(target) => pick(&|s| s.target() == target),
            RevokeSelector::Flow {
                local,
                remote,
                netns,
            } => {
                let netns_cookie = self.netns_of(netns.as_ref())?;
                let cookies = self.lookup_addrs(*local, *remote, netns_cookie);
                if cookies.is_empty() && netns.is_none() {
                    if let Some(key) = self.forwarded_key(*local, *remote) {
                        let kills =
                            self.kill_forwarded(&[key], Reason::Revoked, Some(clock::boot_ns()));
                        return Ok(RevokeResult {
                            sessions: vec![],
                            kills,
                        });
                    }
                }
                if cookies.is_empty() {
                    return refuse(
                        RefusalCode::NoSuchFlow,
                        format!("revoke: no tracked TCP flow {local} <-> {remote} in this network namespace"),
                    );
                }
                let kills = self.kill_flows(&cookies, Reason::Revoked, Some(clock::boot_ns()));
                return Ok(RevokeResult {
                    sessions: vec![],
                    kills,
                });
            }
        };
        let names = ids
            .iter()
            .map(|id| self.sessions[id].name().to_owned())
            .collect();
        let kills = self.end_sessions(&ids, Reason::Revoked, Some(clock::boot_ns()));
        Ok(RevokeResult {
            sessions: names,
            kills,
        })
    }

    fn list(&self, filter: &ListArgs) -> ListResult {
        let now = clock::now();
        let keep = |id: &u64| {
            let s = &self.sessions[id];
            filter.session.as_ref().is_none_or(|v| s.name() == v)
                && filter.user.as_ref().is_none_or(|v| s.user() == v)
                && filter.target.as_ref().is_none_or(|v| s.target() == v)
        };
        ListResult {
            now: policy::format_rfc3339(now.unix_ns),
            sessions: self
                .sessions_by_deadline()
                .iter()
                .filter(|id| keep(id))
                .map(|id| self.view(*id, now))
                .collect(),
        }
    }

    fn status(&self) -> StatusResult {
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
            counters: self.enforcer.counters(),
            namespaces: self.enforcer.namespaces_open(),
            kill_path: super::state::path_name(self.enforcer.kill_path).to_string(),
            watch: self.config.watch.clone(),
            fence: self.config.fence.clone(),
            classes: self.config.classes.keys().cloned().collect(),
            config_loads: self.config_loads,
            last_reload_error: self.last_reload_error.clone(),
        }
    }
}
