//! The kill pipeline: the one way a flow dies, whatever the reason
//! (expiry, revoke, idle, evict, reject, unauthorized, table full).
//!
//! For each flow, in this order: its deadline into the kernel (the
//! in-kernel drop holds it from then on, even if the daemon dies now), one
//! batched destroy (or exact RSTs), one `Kill` record per flow for the audit
//! trail and the caller, then the index. Sessions that end are forgotten
//! last, their records after their flows; the connections they still
//! expected stay registered a while, past their deadline (`ended`).

#![forbid(unsafe_code)]

use std::collections::HashMap;

use reaper_common::{Flow, FlowTuple, PendingGrant};
use tracing::{debug, warn};

use super::model::{Cause, Kill, KillResult, Owner};
use super::schedule::Due;
use super::Core;
use crate::kernel::{DestroyOutcome, Kernel, KillPath, SocketRef};
use crate::policy::Now;
use crate::timefmt;

/// How long after its RSTs a forwarded flow is checked for silence.
pub(super) const RST_CHECK_NS: u64 = 250 * timefmt::NS_PER_MS;

/// Who dies.
#[derive(Clone, Copy)]
pub(super) enum Victims<'a> {
    /// Every flow of these sessions, and then the sessions.
    Sessions(&'a [u64]),
    /// These flows (local ones by cookie, forwarded ones by key); sessions
    /// stay. `owner` names flows that belong to no session (a refused
    /// grant's, in its audit events).
    Flows {
        cookies: &'a [u64],
        forwarded: &'a [FlowTuple],
        owner: Option<&'a Owner>,
    },
}

/// A forwarded flow killed by RSTs, waiting for the check that completes
/// its audit event.
struct RstCheck {
    kill: Kill,
    key: FlowTuple,
    dropped_before: u64,
    sent: usize,
}

#[derive(Default)]
pub(super) struct RstChecks {
    pending: HashMap<u64, RstCheck>,
    next_id: u64,
}

/// `flow` as it is killed at `now`: a deadline later than now (or none)
/// brought forward to now, so the in-kernel drop holds it from then on.
fn killed_at(mut flow: Flow, now: u64) -> Flow {
    if flow.deadline_ns == 0 || flow.deadline_ns > now {
        flow.deadline_ns = now;
    }
    flow
}

impl<K: Kernel> Core<K> {
    /// Kills `victims` for `cause`.
    pub(super) fn kill(&mut self, victims: Victims<'_>, cause: Cause) -> Vec<Kill> {
        // A kill's writes must not be overtaken by a grant's.
        self.write_staged();
        let (cookies, forwarded, ended, owner) = match victims {
            Victims::Sessions(ids) => {
                let forwarded: Vec<FlowTuple> = ids
                    .iter()
                    .filter_map(|id| self.index.session(*id))
                    .flat_map(|s| s.forwarded().iter().copied())
                    .collect();
                // Out of their sessions now, out of the index one by one below.
                let cookies: Vec<u64> = ids
                    .iter()
                    .flat_map(|id| self.index.take_flows(*id))
                    .collect();
                (cookies, forwarded, ids, None)
            }
            Victims::Flows {
                cookies,
                forwarded,
                owner,
            } => (
                cookies.to_vec(),
                forwarded.to_vec(),
                &[][..],
                owner.cloned(),
            ),
        };
        let reason = cause.reason;
        let mut kills = self.kill_local(&cookies, &cause, owner.as_ref());
        kills.extend(self.kill_forwarded(&forwarded, &cause, owner.as_ref()));
        if tracing::enabled!(tracing::Level::DEBUG) {
            for s in ended.iter().filter_map(|id| self.index.session(*id)) {
                debug!(session = %s.name(), reason = reason.name(), "session ended");
            }
        }
        self.keep_expected(ended, &cause);
        self.forget_sessions(ended);
        kills
    }

    /// The names a killed flow's audit event carries.
    pub(super) fn owner_of(&self, session: u64, fallback: Option<&Owner>) -> Owner {
        match self.index.session(session) {
            Some(s) => Owner {
                session: s.name().to_owned(),
                user: s.user().to_owned(),
                target: s.target().to_owned(),
                granted_by_uid: Some(s.terms.granted_by_uid),
            },
            None => fallback.cloned().unwrap_or_default(),
        }
    }

    fn kill_local(&mut self, cookies: &[u64], cause: &Cause, owner: Option<&Owner>) -> Vec<Kill> {
        let due = cause.due;
        let now = self.kernel.now().boot_ns;
        // Only the sockets go to the destroy; each flow is looked up again
        // for its record after it (the index keeps it until then). When
        // 100k flows expire together, every pass and every megabyte of
        // fresh memory before the first destroy is time they all wait.
        let mut sockets: Vec<SocketRef> = Vec::with_capacity(cookies.len());
        // Flows the kernel knows and the index does not.
        let mut unindexed: HashMap<u64, Flow> = HashMap::new();
        let path = self.kernel.kill_path();
        // The RST path needs each socket's flow as well (its sequence numbers).
        let mut with_flows: Vec<(SocketRef, Flow)> = Vec::new();
        let mut gone = Vec::new();
        for &cookie in cookies {
            // The mirror is exact for what we need (the kernel sets a flow's
            // addresses once; the daemon writes its deadline), and sparing a
            // map lookup per flow matters when 100k flows expire together.
            // A flow that has closed meanwhile is found gone by the destroy.
            let indexed = self.index.flow(cookie);
            let Some(flow) = indexed.or_else(|| self.kernel.flow(cookie)) else {
                gone.push(cookie);
                continue;
            };
            let killed = killed_at(flow, now);
            if killed.deadline_ns != flow.deadline_ns {
                let _ = self.kernel.update_flow(cookie, &killed);
            }
            if indexed.is_none() {
                unindexed.insert(cookie, killed);
            }
            let socket = SocketRef {
                cookie,
                tuple: flow.tuple,
                netns_cookie: flow.netns_cookie,
            };
            sockets.push(socket);
            if path != KillPath::Destroy {
                with_flows.push((socket, killed));
            }
        }
        // The drop is in force for every target before any socket dies.
        if let Err(e) = self.kernel.publish_flows() {
            warn!("announcing killed flows to the packet path: {e}");
        }
        // The flow each socket was killed as: its deadline no later than now.
        let flow_of = |core: &Self, cookie: u64| {
            core.index
                .flow(cookie)
                .or_else(|| unindexed.get(&cookie).copied())
                .map(|flow| killed_at(flow, now))
        };
        let outcomes = if sockets.is_empty() {
            Vec::new()
        } else {
            match path {
                KillPath::Destroy => self.kernel.destroy(&sockets),
                KillPath::Rst | KillPath::Forward => self.kernel.reset(&with_flows),
            }
        };
        let done = self.kernel.now();
        let mut kills = Vec::with_capacity(sockets.len() + gone.len());
        for (socket, outcome) in sockets.iter().zip(outcomes) {
            let cookie = socket.cookie;
            // Out of the index already: named twice, recorded at the first.
            let Some(flow) = flow_of(self, cookie) else {
                continue;
            };
            let result = match outcome {
                DestroyOutcome::Destroyed => KillResult::Destroyed,
                DestroyOutcome::Gone => {
                    self.kernel.remove_flow(cookie);
                    KillResult::AlreadyClosed
                }
                DestroyOutcome::Failed(errno) => {
                    warn!(
                        cookie,
                        errno,
                        "socket destroy refused; the kernel keeps dropping the flow's packets"
                    );
                    KillResult::DropOnly
                }
            };
            let since = due.unwrap_or(flow.deadline_ns);
            kills.push(self.record_kill(cause, cookie, &flow, path, result, done, since, owner));
            // Even a drop-only flow leaves the index: its session is ending,
            // and the kernel entry (with its deadline) stays until it closes.
            self.untrack_flow(cookie);
        }
        for cookie in gone {
            if let Some(flow) = self.index.flow(cookie) {
                let since = due.unwrap_or(flow.deadline_ns);
                let result = KillResult::AlreadyClosed;
                kills
                    .push(self.record_kill(cause, cookie, &flow, path, result, done, since, owner));
                self.untrack_flow(cookie);
            }
        }
        kills
    }

    /// Builds a local flow's kill record and writes its audit event.
    #[allow(clippy::too_many_arguments)]
    fn record_kill(
        &mut self,
        cause: &Cause,
        cookie: u64,
        flow: &Flow,
        path: KillPath,
        result: KillResult,
        done: Now,
        since_ns: u64,
        owner: Option<&Owner>,
    ) -> Kill {
        let kill = Kill {
            reason: cause.reason,
            by: cause.by,
            by_node: cause.by_node.clone(),
            owner: self.owner_of(flow.session, owner),
            cookie,
            tuple: flow.tuple,
            path,
            result,
            done,
            late_ns: done.boot_ns.saturating_sub(since_ns),
            acknowledged: None,
        };
        self.audit.record(&kill);
        kill
    }

    /// Forwarded flows: deadline into the kernel (the tc program drops
    /// every further packet), a RST to each end, and a check a moment later
    /// of whether the flow's packets stopped, which completes the audit
    /// event (`finish_rst_check`).
    fn kill_forwarded(
        &mut self,
        keys: &[FlowTuple],
        cause: &Cause,
        owner: Option<&Owner>,
    ) -> Vec<Kill> {
        let Cause {
            reason,
            due,
            by,
            ref by_node,
        } = *cause;
        let mut kills = Vec::with_capacity(keys.len());
        for key in keys {
            let now = self.kernel.now().boot_ns;
            let mut grant = self.kernel.forwarded_grant(key).unwrap_or(PendingGrant {
                deadline_ns: 0,
                session: 0,
                netns_cookie: self.kernel.own_netns(),
            });
            if grant.deadline_ns == 0 || grant.deadline_ns > now {
                grant.deadline_ns = now;
                if let Ok(true) = self.kernel.put_forwarded_grant(key, &grant) {
                    self.index.note_forwarded_grant(*key);
                }
            }
            let kill_owner = self.owner_of(grant.session, owner);
            if let Some(s) = self.index.session_mut(grant.session) {
                s.remove_forwarded(key);
            }
            let since = due.unwrap_or(grant.deadline_ns);
            let flow = self.kernel.forwarded(key);
            // Nothing to reset once the flow is gone; else a RST to each end.
            let sent = flow.map(|f| self.kernel.reset_forwarded(key, &f));
            let done = self.kernel.now();
            let kill = Kill {
                reason,
                by,
                by_node: by_node.clone(),
                owner: kill_owner,
                cookie: 0,
                tuple: *key,
                path: KillPath::Forward,
                result: match flow {
                    None => KillResult::AlreadyClosed,
                    Some(_) => KillResult::RstSent,
                },
                done,
                late_ns: done.boot_ns.saturating_sub(since),
                acknowledged: None,
            };
            let (Some(flow), Some(sent)) = (flow, sent) else {
                self.audit.record(&kill);
                kills.push(kill);
                continue;
            };
            let checks = &mut self.rst_checks;
            checks.next_id += 1;
            let id = checks.next_id;
            checks.pending.insert(
                id,
                RstCheck {
                    kill: kill.clone(),
                    key: *key,
                    dropped_before: flow.dropped,
                    sent,
                },
            );
            self.schedule
                .push(done.boot_ns + RST_CHECK_NS, Due::RstCheck(id));
            kills.push(kill);
        }
        kills
    }

    /// The audit event of a forwarded kill: the peers acknowledged when
    /// none of the flow's packets had to be dropped since the RSTs.
    pub(super) fn finish_rst_check(&mut self, id: u64) {
        let Some(check) = self.rst_checks.pending.remove(&id) else {
            return;
        };
        let dropped_after = self
            .kernel
            .forwarded(&check.key)
            .map_or(check.dropped_before, |f| f.dropped);
        let acknowledged = check.sent > 0 && dropped_after == check.dropped_before;
        let kill = Kill {
            result: if acknowledged {
                KillResult::Reset
            } else {
                KillResult::DropOnly
            },
            acknowledged: Some(acknowledged),
            ..check.kill
        };
        self.audit.record(&kill);
    }
}
