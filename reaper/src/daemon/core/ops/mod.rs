//! The control operations, one file each, dispatched from `handle`, which
//! also does the access check. Every handler checks everything that can
//! refuse before its first write, so a refused request changes nothing
//! (the one exception is stated by its code: `limit_reached` kills the
//! refused grant's flows).
//!
//! This file also holds what several handlers share: finding sessions and
//! flows, and a session's snapshot.

#![forbid(unsafe_code)]

mod extend;
mod grant;
mod list;
mod revoke;
mod status;
mod touch;
mod watch;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use reaper_common::FlowTuple;

use super::index::Session;
pub use super::model::Caller;
use super::model::{refuse, Code, FlowSnapshot, Granted, Outcome, Refused, SessionSnapshot};
use super::Core;
use crate::kernel::{Kernel, KillPath};
use crate::protocol::{Command, NetnsRef, Op};
use crate::tuple;

/// Whether `caller` may see and act on the session `s`: its creator, root
/// and the operators may. A fleet mirror's creator is another node's uid,
/// so there only root and the operators may: a local uid that happens to
/// have that number may not.
pub(super) fn may_touch(access: &crate::policy::Access, caller: Caller, s: &Session) -> bool {
    if s.is_mirror() {
        return access.is_operator(caller.uid, caller.gid);
    }
    access.may_touch(caller.uid, caller.gid, s.terms.granted_by_uid)
}

impl<K: Kernel> Core<K> {
    /// Runs one request for `caller`; `fds` are the descriptors that came
    /// with it. Its grants' kernel writes stay staged and its audit lines
    /// buffered until `settle_requests`: the caller settles before it
    /// answers, and before it waits on anything.
    pub fn handle(
        &mut self,
        command: Command,
        caller: Caller,
        fds: &[OwnedFd],
    ) -> Result<Outcome, Refused> {
        match command {
            Command::Batch(commands) => Ok(Outcome::Batch(
                commands
                    .into_iter()
                    .map(|c| {
                        self.run_due_if_due();
                        (c.op(), self.perform(c, caller, fds))
                    })
                    .collect(),
            )),
            command => {
                self.run_due_if_due();
                self.perform(command, caller, fds)
            }
        }
    }

    /// One operation, after the access check; the caller settles.
    fn perform(
        &mut self,
        command: Command,
        caller: Caller,
        fds: &[OwnedFd],
    ) -> Result<Outcome, Refused> {
        let op = command.op();
        if op != Op::Grant {
            // Only grants add to the staged writes; everything else finds
            // the kernel as the grants before it left it.
            self.write_staged();
        }
        if op.mutates() && !self.config.access.allows(caller.uid, caller.gid) {
            // Who else is allowed is not the caller's business.
            return refuse(
                Code::PermissionDenied,
                format!(
                    "uid {} (gid {}) may not {}: only root and the uids and gids in the daemon's [access] may change grants",
                    caller.uid,
                    caller.gid,
                    op.name()
                ),
            );
        }
        match command {
            Command::Grant(g) => self.grant(g, caller, fds).map(Outcome::Granted),
            Command::Extend(e) => self.extend(e, caller).map(Outcome::Granted),
            Command::Touch(session) => self.touch(&session, caller).map(Outcome::Granted),
            Command::Revoke(r) => self.revoke(r, caller).map(Outcome::Revoked),
            Command::List(l) => Ok(Outcome::Listed(self.list(&l, caller))),
            Command::Status => Ok(Outcome::Status(self.status())),
            Command::Watch(w) => Ok(Outcome::Watching(self.watch(w, caller))),
            // The parser never nests batches.
            Command::Batch(_) => refuse(Code::BadValue, "a batch cannot hold a batch"),
        }
    }

    /// The id of the session called `name`.
    fn session_id(&self, op: Op, name: &str) -> Result<u64, Refused> {
        self.index.id_of(name).ok_or_else(|| {
            Refused::new(
                Code::NoSuchSession,
                format!("{}: no session {name:?}", op.name()),
            )
        })
    }

    /// Whether `caller` may act on the session `id`.
    fn may_act_on(&self, caller: Caller, id: u64) -> bool {
        self.index
            .session(id)
            .is_some_and(|s| may_touch(&self.config.access, caller, s))
    }

    /// Refuses `op` on session `id` for a caller whose scope it is not in.
    fn check_scope(&self, op: Op, caller: Caller, id: u64) -> Result<(), Refused> {
        if self.may_act_on(caller, id) {
            return Ok(());
        }
        let s = self.index.session(id).expect("caller checked");
        refuse(
            Code::PermissionDenied,
            format!(
                "{}: session {:?} belongs to uid {}; uid {} may act only on its own sessions ([access] operator_uids and operator_gids may act on all)",
                op.name(),
                s.name(),
                s.terms.granted_by_uid,
                caller.uid
            ),
        )
    }

    /// The cookie of the namespace a request names (the daemon's own when
    /// it names none). Why a path is refused is told to root only: to
    /// anyone else every refusal reads alike, so that the daemon (which
    /// looks as root) never tells whether a path exists where the caller
    /// could not look.
    fn netns_of(&mut self, netns: Option<&NetnsRef>, caller: Caller) -> Result<u64, Refused> {
        let Some(n) = netns else {
            return Ok(self.kernel.own_netns());
        };
        let path = n.path();
        self.kernel.resolve_netns(&path).map_err(|why| {
            let message = if caller.uid == 0 {
                format!("netns: {why}")
            } else {
                format!(
                    "netns: {} is not a network namespace this daemon can use",
                    path.display()
                )
            };
            Refused::new(Code::BadValue, message)
        })
    }

    /// Finds the tracked sockets of a flow named by addresses, in the
    /// network namespace with cookie `netns`: in the index, caught up with
    /// the kernel's events if it misses.
    pub(in crate::daemon::core) fn lookup_addrs(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        netns: u64,
    ) -> Vec<u64> {
        let candidates = tuple::candidate_tuples(local, remote);
        let found = self.index.lookup(netns, &candidates);
        if found.is_empty() && self.catch_up() {
            return self.index.lookup(netns, &candidates);
        }
        found
    }

    /// A tracked flow by cookie: from the index, or (its event not read
    /// yet, or lost) by one keyed lookup in the kernel's table.
    fn tracked_flow(&mut self, cookie: u64) -> Option<reaper_common::Flow> {
        if let Some(flow) = self.index.flow(cookie) {
            return Some(flow);
        }
        let flow = self.kernel.flow(cookie)?;
        self.track_flow(cookie, flow);
        self.queue_fence_check(cookie, &flow);
        Some(flow)
    }

    /// A flow named by addresses that has no local socket, but that this
    /// host forwards.
    fn forwarded_key(&self, local: SocketAddr, remote: SocketAddr) -> Option<FlowTuple> {
        let key = tuple::forwarded_key_of(local, remote);
        self.kernel.forwarded(&key).map(|_| key)
    }

    /// A session as it stands now.
    pub(in crate::daemon::core) fn snapshot(
        &self,
        id: u64,
        now: crate::policy::Now,
    ) -> SessionSnapshot {
        let s = self.index.session(id).expect("caller checked");
        let path = self.kernel.kill_path();
        let mut flows: Vec<FlowSnapshot> = s
            .flows
            .iter()
            .filter_map(|c| self.index.flow(*c).map(|f| (*c, f)))
            .map(|(cookie, f)| FlowSnapshot {
                cookie,
                tuple: f.tuple,
                established_unix_ns: self.wall(f.established_ns),
                path,
            })
            .collect();
        for key in s.forwarded() {
            let first_seen = self.kernel.forwarded(key).map_or(0, |f| f.first_seen_ns);
            flows.push(FlowSnapshot {
                cookie: 0,
                tuple: *key,
                established_unix_ns: self.wall(first_seen),
                path: KillPath::Forward,
            });
        }
        SessionSnapshot {
            name: s.name().to_owned(),
            user: s.user().to_owned(),
            target: s.target().to_owned(),
            class: s.class().to_owned(),
            deadline_boot_ns: s.terms.deadline_ns,
            deadline_unix_ns: self.wall(s.terms.deadline_ns),
            time_left_ns: s.terms.deadline_ns as i128 - now.boot_ns as i128,
            granted_unix_ns: s.terms.granted_unix_ns as i128,
            granted_by_uid: s.terms.granted_by_uid,
            idle_timeout_ns: s.terms.idle_timeout_ns,
            idle_direction: s.idle_direction(),
            flows,
            expecting: s.expecting(),
        }
    }

    /// What an extend or touch answers.
    fn granted(&self, id: u64, now: crate::policy::Now) -> Granted {
        Granted {
            session: self.snapshot(id, now),
            created: false,
        }
    }
}
