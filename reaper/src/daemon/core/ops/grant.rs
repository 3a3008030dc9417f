//! `grant`: gives flows (established ones, forwarded ones, and connections
//! to come) a deadline as part of a session, creating the session or
//! joining it.
//!
//! In two phases. First every check that can refuse: the flows exist and
//! are free, the class and terms allow it, the limits admit it, and every
//! kernel table has room. Only then the writes, in the crash-safe order:
//! evictions, the session record, each flow's deadline, forwarded grants,
//! pending entries. Should the kernel still refuse a write (a table full
//! against the count, an I/O error), what this grant wrote is undone in
//! reverse order before it is refused.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};

use reaper_common::{flow_flags, Flow, FlowTuple, Label, PendingGrant, SessionRecord};
use tracing::{debug, info};

use super::Caller;
use crate::daemon::core::kill::Victims;
use crate::daemon::core::model::{
    internal, refuse, Cause, Change, ChangeKind, Code, Granted, Owner, Reason, Refused,
};
use crate::daemon::core::Core;
use crate::kernel::Kernel;
use crate::policy::{self, Admission, Holder, Now};
use crate::protocol::{FlowRef, GrantRequest, NetnsRef, Op};
use crate::timefmt;
use crate::tuple::{self, describe};

/// What a grant will do, once every check has passed. It lives on the
/// stack for one call: boxing the record would cost an allocation a grant.
#[allow(clippy::large_enum_variant)]
enum Plan {
    /// Join session `id`, whose deadline becomes `deadline` (tightened or
    /// kept) with wall anchor `anchor`.
    Join { id: u64, deadline: u64, anchor: u64 },
    /// Create session `id` with `record`, after evicting `evict`.
    Create {
        id: u64,
        record: SessionRecord,
        evict: Vec<u64>,
    },
}

/// Connections to come: the namespace each is expected in, and the
/// `PENDING` keys it may be recorded under.
type Expected = Vec<(u64, Vec<FlowTuple>)>;

/// What a grant wrote, so that a failing write can be undone. (Vectors
/// that stay empty cost no allocation.)
#[derive(Default)]
struct Written {
    /// Flows and what their entry was before.
    flows: Vec<(u64, Flow)>,
    /// Forwarded grants and what they were before.
    forwarded: Vec<(FlowTuple, Option<PendingGrant>)>,
    /// `expect` items added to the session's index (their keys are there).
    expect_items: usize,
}

impl<K: Kernel> Core<K> {
    pub(super) fn grant(
        &mut self,
        g: GrantRequest,
        caller: Caller,
        fds: &[OwnedFd],
    ) -> Result<Granted, Refused> {
        self.grant_as(g, caller, fds, None)
    }

    /// A grant asked by `caller` here, or (`origin`) the mirror of a
    /// session node `origin` granted, which the fleet task hands in
    /// (core/fleet_sessions.rs): that node's checks were its own, so a
    /// mirror is held to no access scope, quota or class limit here, only
    /// to the locks, the flows and the tables.
    pub(in crate::daemon::core) fn grant_as(
        &mut self,
        g: GrantRequest,
        caller: Caller,
        fds: &[OwnedFd],
        origin: Option<&std::sync::Arc<str>>,
    ) -> Result<Granted, Refused> {
        let now = self.kernel.now();
        // Checks: nothing is written until every one has passed.
        self.check_unlocked(&g.user, &g.target)?;
        let (cookies, forwarded) = self.resolve(&g.flows, fds, caller)?;
        let existing = self.index.id_of(&g.session);
        self.check_mirror_kind(&g.session, existing, origin.is_some())?;
        self.check_flows_free(&cookies, &forwarded, existing, now)?;
        let expected = self.expected(&g.expect, caller)?;
        if origin.is_none() {
            self.check_rights(&g, caller, existing, &cookies, &forwarded, &expected)?;
        }
        let plan = match existing {
            Some(id) => {
                if origin.is_none() {
                    self.check_scope(Op::Grant, caller, id)?;
                }
                self.plan_join(id, &g, now)?
            }
            None => {
                self.check_reachable(g.class.as_deref())?;
                if origin.is_none() {
                    self.check_fleet_places(&g.session, g.class.as_deref())?;
                }
                self.plan_create(&g, caller, now, &cookies, &forwarded, origin.is_some())?
            }
        };
        self.check_room(&forwarded, &expected)?;

        // Writes, in the crash-safe order.
        let (id, deadline, created, before) = match plan {
            Plan::Join {
                id,
                deadline,
                anchor,
            } => {
                let t = self.index.session(id).expect("planned").terms;
                self.set_deadline(id, deadline, anchor)?;
                (
                    id,
                    deadline,
                    false,
                    Some((t.deadline_ns, t.expires_unix_ns)),
                )
            }
            Plan::Create { id, record, evict } => {
                if !evict.is_empty() {
                    let names: Vec<&str> = evict
                        .iter()
                        .filter_map(|id| self.index.session(*id).map(|s| s.name()))
                        .collect();
                    info!(evicted = ?names, for_user = %g.user, target = %g.target, "evicting the oldest sessions");
                    let cause = Cause::asked(Reason::Evicted, now.boot_ns, caller);
                    self.kill(Victims::Sessions(&evict), cause);
                }
                // Counted against max_sessions above; written with the
                // rest of the read's grants (store.rs, `Staged`).
                self.stage_session(id, &record);
                self.index_session(id, &record);
                (id, record.deadline_ns, true, None)
            }
        };
        let expecting = expected.len();
        let mut written = Written::default();
        let added =
            match self.write_grant(id, deadline, &cookies, &forwarded, expected, &mut written) {
                Ok(added) => added,
                Err(refusal) => {
                    self.undo_grant(id, before, written);
                    return Err(refusal);
                }
            };
        let idle_timeout = self
            .index
            .session(id)
            .expect("written")
            .terms
            .idle_timeout_ns;
        if created && idle_timeout != 0 {
            self.queue_idle_check(id, now.boot_ns + idle_timeout);
        }
        let session = self.snapshot(id, now);
        let kind = if created {
            ChangeKind::Created
        } else {
            ChangeKind::Joined
        };
        self.audit.change(&Change {
            kind,
            by: caller,
            by_node: origin.map(|o| &**o),
            at_unix_ns: now.unix_ns,
            session: &session,
        });
        if created {
            self.keep_fleet_places(&session.name);
        }
        self.fleet_session_changed(id);
        // The audit trail has the grant; a log line each would cost a
        // write per grant at 100k grants/s.
        debug!(session = %session.name, user = %session.user, target = %session.target,
              class = %session.class, flows = added, expected = expecting,
              deadline = %timefmt::format_rfc3339(session.deadline_unix_ns), created, "granted");
        Ok(Granted { session, created })
    }

    /// The flows a grant names: socket cookies of local flows, each checked
    /// to be tracked here, and keys of forwarded flows.
    fn resolve(
        &mut self,
        refs: &[FlowRef],
        fds: &[OwnedFd],
        caller: Caller,
    ) -> Result<(Vec<u64>, Vec<FlowTuple>), Refused> {
        let mut cookies = Vec::new();
        let mut forwarded = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            match *r {
                FlowRef::Fd(index) => {
                    let Some(fd) = fds.get(index) else {
                        return refuse(
                            Code::BadFd,
                            format!(
                                "flows[{i}].fd: descriptor {index} was not passed ({} came with the request; send them with SCM_RIGHTS in the same sendmsg as the line)",
                                fds.len()
                            ),
                        );
                    };
                    let info = self.kernel.inspect_socket(fd.as_fd()).map_err(|why| {
                        Refused::new(Code::BadFd, format!("flows[{i}].fd: {why}"))
                    })?;
                    if self.tracked_flow(info.cookie).is_none() {
                        let watched = self.config.watches(info.local.port(), info.remote.port());
                        if let Some(full) = self.exhausted().filter(|_| watched) {
                            return Err(full);
                        }
                        return refuse(
                            Code::FlowNotTracked,
                            format!(
                                "flows[{i}]: the socket {} <-> {} is not tracked: neither port is watched, or it belongs to a process outside cgroup {}",
                                info.local,
                                info.remote,
                                self.kernel.cgroup().display()
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
                    let netns_cookie = self.netns_of(netns.as_ref(), caller)?;
                    let found = self.lookup_addrs(local, remote, netns_cookie);
                    if found.is_empty() && netns.is_none() {
                        if let Some(key) = self.forwarded_key(local, remote) {
                            forwarded.push(key);
                            continue;
                        }
                    }
                    // Either end may be the socket that went untracked.
                    let watched = self.config.watches(local.port(), remote.port())
                        || self.config.watches(remote.port(), local.port());
                    if found.is_empty() && watched {
                        if let Some(full) = self.exhausted() {
                            return Err(full);
                        }
                    }
                    if found.is_empty() {
                        let place = netns
                            .as_ref()
                            .map_or("this network namespace".to_string(), |n| {
                                format!("network namespace {}", n.path().display())
                            });
                        return refuse(
                            Code::NoSuchFlow,
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
        forwarded.sort_unstable_by_key(|k| {
            (
                k.family,
                k.local_addr,
                k.local_port,
                k.remote_addr,
                k.remote_port,
            )
        });
        forwarded.dedup();
        Ok((cookies, forwarded))
    }

    /// The refusal for a watched flow the kernel does not track, when a
    /// full table or an owner's full share explains it (a proxy fails
    /// closed on `flow_table_exhausted`): it names who holds the table.
    fn exhausted(&self) -> Option<Refused> {
        let max = self.config.max_flows as usize;
        let tracked = self.index.flow_count();
        let share = u64::from(self.config.max_flows_per_owner);
        let mut holders = self.kernel.flow_holders();
        holders.sort_unstable_by_key(|(uid, held)| (std::cmp::Reverse(*held), *uid));
        let full_share: Vec<String> = holders
            .iter()
            .filter(|(_, held)| share != 0 && *held >= share)
            .map(|(uid, held)| format!("uid {uid} ({held})"))
            .collect();
        // A table within 1% of full refuses the connections that race in.
        let table_full = tracked + max / 100 >= max;
        if !table_full && full_share.is_empty() {
            return None;
        }
        let largest: Vec<String> = holders
            .iter()
            .take(3)
            .map(|(uid, held)| format!("uid {uid} ({held})"))
            .collect();
        let unowned = tracked.saturating_sub(holders.iter().map(|(_, h)| *h as usize).sum());
        let message = if table_full {
            format!(
                "the flow is watched but not tracked: the kernel flow table is full ({tracked} of max_flows {max}); largest holders: {}{}root and sockets older than reaper ({unowned})",
                largest.join(", "),
                if largest.is_empty() { "" } else { ", " }
            )
        } else {
            format!(
                "the flow is watched but not tracked: {} hold their whole share of the kernel flow table (max_flows_per_owner {share}); a flow of theirs cannot be tracked",
                full_share.join(", ")
            )
        };
        Some(Refused::new(Code::FlowTableExhausted, message))
    }

    /// Every named flow belongs to no session or to the one being joined,
    /// and no fenced flow is past its grace window.
    fn check_flows_free(
        &self,
        cookies: &[u64],
        forwarded: &[FlowTuple],
        existing: Option<u64>,
        now: Now,
    ) -> Result<(), Refused> {
        for key in forwarded {
            if let Some(grant) = self.kernel.forwarded_grant(key) {
                let holder = self.index.session(grant.session);
                if let Some(other) = holder.filter(|_| Some(grant.session) != existing) {
                    return refuse(
                        Code::FlowConflict,
                        format!(
                            "forwarded flow {} already belongs to session {:?}",
                            describe(key),
                            other.name()
                        ),
                    );
                }
            }
        }
        for cookie in cookies {
            let flow = self
                .index
                .flow(*cookie)
                .expect("resolved flows are indexed");
            if flow.session != 0 && Some(flow.session) != existing {
                let other = self.index.session(flow.session).map_or("?", |s| s.name());
                return refuse(
                    Code::FlowConflict,
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
                    Code::DeadlineRefused,
                    format!(
                        "flow {} is on a fenced port and was not granted within the {} grace window",
                        describe(&flow.tuple),
                        timefmt::format_duration(self.config.fence_grace_ns)
                    ),
                );
            }
        }
        Ok(())
    }

    /// The caller's scope admits this grant (class, target, every flow's
    /// ports), and its quota the sessions and pre-registrations it adds.
    /// (Joining someone else's session is `check_scope`'s to refuse.)
    fn check_rights(
        &self,
        g: &GrantRequest,
        caller: Caller,
        existing: Option<u64>,
        cookies: &[u64],
        forwarded: &[FlowTuple],
        expected: &Expected,
    ) -> Result<(), Refused> {
        let access = &self.config.access;
        let joined = existing.and_then(|id| self.index.session(id));
        let class = match joined {
            Some(s) => s.class(),
            None => g.class.as_deref().unwrap_or("default"),
        };
        // Only a scope can narrow a grant: without one, every grant (the
        // hot path) skips gathering its flows' ports.
        if !access.scopes.is_empty() {
            let ports_of = |t: &FlowTuple| [t.local_port, t.remote_port];
            let ports: Vec<[u16; 2]> = cookies
                .iter()
                .filter_map(|c| self.index.flow(*c))
                .map(|f| ports_of(&f.tuple))
                .chain(forwarded.iter().map(ports_of))
                .chain(expected.iter().map(|(_, keys)| ports_of(&keys[0])))
                .collect();
            if !access.may_grant(caller.uid, caller.gid, class, &g.target, &ports) {
                return refuse(
                    Code::PermissionDenied,
                    format!(
                        "grant: uid {} may not grant class {class:?} on target {:?} for these flows: outside its [[access.scope]] (classes, targets, ports)",
                        caller.uid, g.target
                    ),
                );
            }
        }
        let owner = joined.map_or(caller.uid, |s| s.terms.granted_by_uid);
        // Root and operators adding to another uid's session are not
        // held to a quota; everyone else to their own.
        let Some(quota) = access
            .quota(caller.uid, caller.gid)
            .filter(|_| owner == caller.uid)
        else {
            return Ok(());
        };
        let load = self.index.load_of(owner);
        if joined.is_none() && load.sessions >= quota.sessions {
            return refuse(
                Code::QuotaExceeded,
                format!(
                    "grant: uid {} already holds {} sessions, its quota ([access] max_sessions_per_uid or its scope's max_sessions)",
                    caller.uid, load.sessions
                ),
            );
        }
        if load.expecting as usize + expected.len() > quota.expecting as usize {
            return refuse(
                Code::QuotaExceeded,
                format!(
                    "grant: uid {} has {} pre-registered connections waiting; {} more would pass its quota of {} ([access] max_expecting_per_uid or its scope's max_expecting)",
                    caller.uid, load.expecting, expected.len(), quota.expecting
                ),
            );
        }
        Ok(())
    }

    /// The namespaces and kernel keys of the connections a grant expects.
    fn expected(
        &mut self,
        expect: &[(std::net::SocketAddr, std::net::SocketAddr, Option<NetnsRef>)],
        caller: Caller,
    ) -> Result<Expected, Refused> {
        let mut out = Vec::with_capacity(expect.len());
        for (local, remote, netns) in expect {
            // Port 0 (any) stays 0 in every form.
            out.push((
                self.netns_of(netns.as_ref(), caller)?,
                tuple::recorded_forms(*local, *remote),
            ));
        }
        Ok(out)
    }

    /// A grant naming an existing session: same user, target and class; it
    /// may tighten the deadline, never lengthen it.
    fn plan_join(&self, id: u64, g: &GrantRequest, now: Now) -> Result<Plan, Refused> {
        let s = self.index.session(id).expect("found by name");
        if s.user() != g.user || s.target() != g.target {
            return refuse(
                Code::SessionConflict,
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
                    Code::SessionConflict,
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
                Code::SessionConflict,
                format!(
                    "session {:?} already has its idle terms; a joining grant cannot change them",
                    g.session
                ),
            );
        }
        let current = (s.terms.deadline_ns, s.terms.expires_unix_ns);
        let (deadline, anchor) = match &g.asked.expiry {
            Some(expiry) => {
                let asked = policy::deadline_for(expiry, now, self.limits())
                    .map_err(|e| Refused::new(Code::DeadlineRefused, format!("grant: {e}")))?;
                // Only a tighter deadline replaces the session's (and its anchor).
                if asked < current.0 {
                    (asked, expiry.wall_anchor())
                } else {
                    current
                }
            }
            None => current,
        };
        Ok(Plan::Join {
            id,
            deadline,
            anchor,
        })
    }

    /// A grant for a new session: the class's terms and limits apply. A
    /// reject-new limit refuses it and kills the named flows (they came
    /// without a right to exist); the audit events name who was refused.
    fn plan_create(
        &mut self,
        g: &GrantRequest,
        caller: Caller,
        now: Now,
        cookies: &[u64],
        forwarded: &[FlowTuple],
        mirror: bool,
    ) -> Result<Plan, Refused> {
        let Some(class) = self.config.class(g.class.as_deref()) else {
            let known: Vec<&String> = self.config.classes.keys().collect();
            return refuse(
                Code::BadValue,
                format!(
                    "grant.class: no class {:?} (configured: {known:?})",
                    g.class.as_deref().unwrap_or("")
                ),
            );
        };
        // A mirror's terms were the origin's to bound; the global max_ttl
        // still bounds them here.
        let privileged = caller.uid == 0 || mirror;
        let terms = policy::terms_for(&class, &g.asked, now, self.limits(), privileged)
            .map_err(|e| Refused::new(Code::DeadlineRefused, format!("grant: {e}")))?;
        if self.index.session_count() >= self.config.max_sessions as usize {
            return refuse(
                Code::TableFull,
                format!(
                    "the session table is full ({} sessions, max_sessions)",
                    self.config.max_sessions
                ),
            );
        }
        // A fleet-wide limit was counted in etcd (the place taken for this
        // grant); the host's own limit still counts here.
        let class = if class.fleet_limits {
            crate::policy::Class {
                max_per_target: 0,
                max_per_user: 0,
                ..class
            }
        } else {
            class
        };
        let admission = if class.is_limited(self.config.limits) && !mirror {
            let holders: Vec<Holder<'_>> = self
                .index
                .sessions()
                .map(|(id, s)| Holder {
                    id,
                    user: s.user(),
                    target: s.target(),
                    granted_unix_ns: s.terms.granted_unix_ns as i128,
                })
                .collect();
            policy::admit(&holders, &g.user, &g.target, &class, self.config.limits)
        } else {
            Admission::Admit
        };
        let evict = match admission {
            Admission::Admit => Vec::new(),
            Admission::Evict(ids) => ids,
            Admission::Reject(why) => {
                let owner = Owner {
                    session: g.session.clone(),
                    user: g.user.clone(),
                    target: g.target.clone(),
                    granted_by_uid: Some(caller.uid),
                };
                let victims = Victims::Flows {
                    cookies,
                    forwarded,
                    owner: Some(&owner),
                };
                let killed =
                    self.kill(victims, Cause::asked(Reason::Rejected, now.boot_ns, caller));
                return refuse(
                    Code::LimitReached,
                    format!(
                        "grant refused by class {:?}: {why}; {} flow(s) of the refused grant killed",
                        class.name,
                        killed.len()
                    ),
                );
            }
        };
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
            flags: if mirror {
                reaper_common::session_flags::MIRROR
            } else {
                0
            },
            ..Default::default()
        };
        Ok(Plan::Create {
            id: self.index.next_id(),
            record,
            evict,
        })
    }

    /// The kernel tables the grant writes new keys into have room for them.
    fn check_room(&self, forwarded: &[FlowTuple], expected: &Expected) -> Result<(), Refused> {
        let new_pending: usize = expected.iter().map(|(_, keys)| keys.len()).sum();
        if self.index.pending_keys() + new_pending > self.config.max_pending as usize {
            return refuse(
                Code::TableFull,
                format!(
                    "the pre-registration table is full ({} entries, max_pending)",
                    self.config.max_pending
                ),
            );
        }
        let new_forwarded = forwarded
            .iter()
            .filter(|k| !self.index.has_forwarded_grant(k))
            .count();
        if self.index.forwarded_grant_count() + new_forwarded
            > reaper_common::MAX_FORWARDED as usize
        {
            return refuse(Code::TableFull, "the forwarded-flow grant table is full");
        }
        Ok(())
    }

    /// The flows' writes, after the session's: each flow's deadline, the
    /// forwarded grants, the pending entries. Returns how many flows were
    /// granted: every one named (a flow that closes before its staged write
    /// is granted all the same, and its close event ends it).
    fn write_grant(
        &mut self,
        id: u64,
        deadline: u64,
        cookies: &[u64],
        forwarded: &[FlowTuple],
        expected: Expected,
        written: &mut Written,
    ) -> Result<usize, Refused> {
        let mut added = 0;
        for &cookie in cookies {
            let before = self.index.flow(cookie).expect("resolved flows are indexed");
            let flow = Flow {
                deadline_ns: deadline,
                session: id,
                ..before
            };
            // Written with the rest of the read's grants (store.rs,
            // `Staged`). A flow that closes before then is granted all the
            // same, as if it had closed a moment after.
            self.stage_flow(cookie, &flow);
            written.flows.push((cookie, before));
            self.track_flow(cookie, flow);
            self.index.attach(cookie);
            added += 1;
        }
        let own_netns = self.kernel.own_netns();
        for key in forwarded {
            let before = self.kernel.forwarded_grant(key);
            let grant = PendingGrant {
                deadline_ns: deadline,
                session: id,
                netns_cookie: own_netns,
            };
            if !self
                .kernel
                .put_forwarded_grant(key, &grant)
                .map_err(internal)?
            {
                return refuse(Code::TableFull, "the forwarded-flow grant table is full");
            }
            written.forwarded.push((*key, before));
            self.index.note_forwarded_grant(*key);
            if let Some(s) = self.index.session_mut(id) {
                s.add_forwarded(*key);
            }
            added += 1;
        }
        for (netns_cookie, keys) in expected {
            let grant = PendingGrant {
                deadline_ns: deadline,
                session: id,
                netns_cookie,
            };
            // Counted against max_pending (`check_room`); written with
            // the rest of the read's grants (store.rs, `Staged`).
            self.stage_pending(&keys, &grant);
            self.index.add_pending(id, keys.into_boxed_slice());
            written.expect_items += 1;
        }
        Ok(added)
    }

    /// Undoes a grant's writes in reverse order. `before` is the joined
    /// session's (deadline, anchor) before the grant; `None`: it created
    /// the session, which goes.
    fn undo_grant(&mut self, id: u64, before: Option<(u64, u64)>, written: Written) {
        // Made first, then taken back below like any other write.
        self.write_staged();
        for _ in 0..written.expect_items {
            for key in self.index.pop_pending(id).iter().flatten() {
                self.kernel.remove_pending(key);
            }
        }
        for (key, old) in written.forwarded.iter().rev() {
            match old {
                Some(grant) => {
                    let _ = self.kernel.put_forwarded_grant(key, grant);
                }
                None => {
                    self.kernel.remove_forwarded_grant(key);
                    self.index.forget_forwarded_grant(key);
                }
            }
            if let Some(s) = self.index.session_mut(id) {
                if old.is_none_or(|g| g.session != id) {
                    s.remove_forwarded(key);
                }
            }
        }
        for (cookie, old) in written.flows.iter().rev() {
            let _ = self.kernel.update_flow(*cookie, old);
            self.index.remove_flow(*cookie);
            self.index.insert_flow(*cookie, *old);
            self.index.attach(*cookie);
        }
        match before {
            None => self.forget_session(id),
            Some((deadline, anchor)) => {
                let _ = self.set_deadline(id, deadline, anchor);
            }
        }
    }
}
