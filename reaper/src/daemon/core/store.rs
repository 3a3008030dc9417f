//! Writes that keep the kernel maps, the index and the schedule in step:
//! kernel first, in the order that leaves a crash harmless, then the index.
//!
//! A grant's session record, flow deadlines and pending entries are the
//! one exception to "kernel first": they are staged (`Staged`) and written
//! for all the requests of one read at once, in three `bpf(2)` calls, when
//! the server settles the read before it answers (`Core::settle_requests`).
//! Anything else that touches the kernel's flows, sessions or pending
//! entries writes them first (`write_staged`), so no later write is ever
//! overtaken by a staged one.

#![forbid(unsafe_code)]

use reaper_common::{flow_flags, Flow, FlowTuple, PendingGrant, SessionRecord};

use super::model::{internal, Refused};
use super::schedule::Due;
use super::Core;
use crate::kernel::Kernel;

/// Kernel writes of grants not made yet: session records, then flow
/// deadlines and pending entries, in the order the grants made them. A
/// grant indexes what it staged at once, so the next request of the same
/// read is judged against it.
#[derive(Default)]
pub(super) struct Staged {
    sessions: Vec<(u64, SessionRecord)>,
    flows: Vec<(u64, Flow)>,
    pending: Vec<(FlowTuple, PendingGrant)>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.flows.is_empty() && self.pending.is_empty()
    }
}

impl<K: Kernel> Core<K> {
    /// Stages a new session's record (see `Staged`).
    pub(super) fn stage_session(&mut self, id: u64, record: &SessionRecord) {
        self.staged.sessions.push((id, *record));
    }

    /// Stages a granted flow's entry (see `Staged`).
    pub(super) fn stage_flow(&mut self, cookie: u64, flow: &Flow) {
        self.staged.flows.push((cookie, *flow));
    }

    /// Stages a connection to come's pending entries (see `Staged`).
    pub(super) fn stage_pending(&mut self, keys: &[FlowTuple], grant: &PendingGrant) {
        self.staged
            .pending
            .extend(keys.iter().map(|k| (*k, *grant)));
    }

    /// Writes what grants staged: every session record, then every flow
    /// and pending entry (the crash-safe order holds across the whole
    /// read). The kernel refusing one is logged, not undone: its grant was
    /// judged (the tables' room counted first, `check_room`) and answered.
    /// A flow keeps its deadline without its session record (a restart
    /// enforces it under a stand-in, `sync::adopt_orphan`); a flow whose
    /// entry was not written is still killed by the daemon at its
    /// deadline, without the in-kernel drop behind it; a connection whose
    /// pending entry was not written comes untracked.
    pub(super) fn write_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let mut staged = std::mem::take(&mut self.staged);
        for (id, why) in self.kernel.put_sessions(&staged.sessions) {
            let name = self.index.session(id).map_or("?", |s| s.name());
            tracing::error!(session = %name, "writing a granted session's record: {why}; its flows keep their deadlines");
        }
        for (cookie, why) in self.kernel.put_flows(&staged.flows) {
            tracing::error!(cookie, "writing a granted flow's deadline: {why}; the daemon still kills it at its deadline, without the in-kernel drop");
        }
        for (key, why) in self.kernel.put_pendings(&staged.pending) {
            tracing::error!(connection = %crate::tuple::describe(&key), "writing a grant's connection to come: {why}; it will not be granted when it comes");
        }
        // Kept for the next read's grants: no allocation per read.
        staged.sessions.clear();
        staged.flows.clear();
        staged.pending.clear();
        self.staged = staged;
    }

    /// Indexes a tracked flow (not yet part of any session).
    pub(super) fn track_flow(&mut self, cookie: u64, flow: Flow) {
        self.index.insert_flow(cookie, flow);
    }

    /// Unindexes a flow, letting go of its network namespace when it was
    /// the last tracked flow there.
    pub(super) fn untrack_flow(&mut self, cookie: u64) -> Option<Flow> {
        let (flow, namespace_empty) = self.index.remove_flow(cookie)?;
        if namespace_empty {
            self.kernel.release_netns(flow.netns_cookie);
        }
        Some(flow)
    }

    /// Indexes a session whose record is in the kernel map, and schedules
    /// its deadline.
    pub(super) fn index_session(&mut self, id: u64, record: &SessionRecord) {
        self.index.insert_session(id, record);
        self.schedule.push(record.deadline_ns, Due::Deadline(id));
    }

    /// Removes a session whose flows are dead or gone: its schedule
    /// entries, its pre-registrations, and its record last.
    pub(super) fn forget_session(&mut self, id: u64) {
        self.forget_sessions(&[id]);
    }

    /// `forget_session` for many, their kernel records removed together
    /// at the end.
    pub(super) fn forget_sessions(&mut self, ids: &[u64]) {
        self.write_staged();
        let mut forgotten = Vec::with_capacity(ids.len());
        for &id in ids {
            let Some(s) = self.index.remove_session(id) else {
                continue;
            };
            self.fleet_session_forgotten(id, s.name());
            self.schedule.cancel(s.terms.deadline_ns, Due::Deadline(id));
            if let Some(at) = s.idle_check_at() {
                self.schedule.cancel(at, Due::IdleCheck(id));
            }
            for key in s.pending_keys() {
                self.kernel.remove_pending(key);
            }
            forgotten.push(id);
        }
        self.kernel.remove_sessions(&forgotten);
    }

    /// Moves a session's deadline: its record, then each flow's, forwarded
    /// grant's and pending entry's deadline in the kernel, then the
    /// schedule. `anchor` is the wall-clock instant it stands for when an
    /// `expires_at` set it (else 0).
    pub(super) fn set_deadline(
        &mut self,
        id: u64,
        deadline: u64,
        anchor: u64,
    ) -> Result<(), Refused> {
        self.write_staged();
        let session = self.index.session_mut(id).expect("caller checked");
        let old = session.terms.deadline_ns;
        if old == deadline && session.terms.expires_unix_ns == anchor {
            return Ok(());
        }
        session.terms.deadline_ns = deadline;
        session.terms.expires_unix_ns = anchor;
        let record = session.record();
        let cookies = session.flows.to_vec();
        let pending: Vec<FlowTuple> = session.pending_keys().copied().collect();
        let forwarded: Vec<FlowTuple> = session.forwarded().to_vec();
        self.kernel.put_session(id, &record).map_err(internal)?;
        for cookie in cookies {
            if let Some(mut flow) = self.index.flow(cookie) {
                flow.deadline_ns = deadline;
                if self.kernel.update_flow(cookie, &flow).map_err(internal)? {
                    self.index.insert_flow(cookie, flow);
                } else {
                    self.untrack_flow(cookie);
                }
            }
        }
        for key in forwarded {
            if let Some(mut grant) = self.kernel.forwarded_grant(&key) {
                grant.deadline_ns = deadline;
                self.kernel
                    .put_forwarded_grant(&key, &grant)
                    .map_err(internal)?;
            }
        }
        for key in pending {
            // Same registration, new deadline (and the namespace it had).
            if let Some(mut grant) = self.kernel.pending_grant(&key) {
                grant.deadline_ns = deadline;
                let _ = self.kernel.put_pending(&key, &grant);
            }
        }
        self.schedule.reschedule(old, deadline, Due::Deadline(id));
        self.fleet_session_changed(id);
        Ok(())
    }

    /// Queues (or moves) a session's idle check.
    pub(super) fn queue_idle_check(&mut self, id: u64, at: u64) {
        // Boot time 0 is never now; the index keeps the time as non-zero.
        let at = at.max(1);
        let Some(session) = self.index.session_mut(id) else {
            return;
        };
        if let Some(old) = session.set_idle_check(at) {
            self.schedule.cancel(old, Due::IdleCheck(id));
        }
        self.schedule.push(at, Due::IdleCheck(id));
    }

    /// Queues the end of an ungranted fenced flow's grace window.
    pub(super) fn queue_fence_check(&mut self, cookie: u64, flow: &Flow) {
        if flow.flags & flow_flags::FENCED != 0 && flow.session == 0 {
            let at = flow.established_ns + self.config.fence_grace_ns;
            self.schedule.push(at, Due::Fence(cookie));
        }
    }
}
