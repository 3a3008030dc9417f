//! Kernel → daemon: what the core learns without being asked. Adoption
//! rebuilds the index from the pinned maps at start (repairing what a crash
//! mid-write left), ring-buffer events add and remove flows as the kernel
//! sees them, and a wall-clock step moves `expires_at` deadlines.

#![forbid(unsafe_code)]

use reaper_common::{Flow, FlowEvent, FlowEventKind, Label, SessionRecord};
use tracing::{debug, error, info, warn};

use super::due::FORWARD_GC_EVERY_NS;
use super::kill::Victims;
use super::model::{Cause, Reason};
use super::schedule::Due;
use super::Core;
use crate::kernel::Kernel;
use crate::policy;
use crate::tuple::describe;

impl<K: Kernel> Core<K> {
    /// Rebuilds every index from the pinned maps: what a restarted daemon
    /// does before it accepts requests. What fell due while no daemon ran
    /// is handled by the first timer expiry, right after.
    pub fn adopt(&mut self) {
        // Events queued while no daemon ran are stale: the maps are the
        // truth. Only later events are applied.
        self.kernel.take_events();
        self.events_lost_seen = self.kernel.events_lost();
        for (cookie, flow) in self.kernel.flows() {
            self.track_flow(cookie, flow);
        }
        for (id, record) in self.kernel.sessions() {
            let labels = (
                record.name.as_str(),
                record.user.as_str(),
                record.target.as_str(),
                record.class.as_str(),
            );
            let (Some(_), Some(_), Some(_), Some(_)) = labels else {
                warn!(id, "dropping an unreadable session record");
                self.kernel.remove_session(id);
                continue;
            };
            self.index_session(id, &record);
        }
        for (key, grant) in self.kernel.forwarded_grants() {
            self.index.note_forwarded_grant(key);
            if let Some(s) = self.index.session_mut(grant.session) {
                s.add_forwarded(key);
            }
        }
        if !self.config.forward_interfaces.is_empty() {
            let first = self.kernel.now().boot_ns + FORWARD_GC_EVERY_NS;
            self.schedule.push(first, Due::ForwardGc);
        }
        for (key, grant) in self.kernel.pending() {
            if self.index.session(grant.session).is_some() {
                self.index.add_pending(grant.session, Box::new([key]));
            } else if !self.adopt_ended(key, grant.session, grant.deadline_ns) {
                self.kernel.remove_pending(&key);
            }
        }
        // Attach flows to their sessions; repair what a crash mid-write left.
        let tracked: Vec<(u64, Flow)> = self.index.flows().collect();
        for (cookie, flow) in tracked {
            if flow.session == 0 {
                self.queue_fence_check(cookie, &flow);
                continue;
            }
            if self.index.session(flow.session).is_none() {
                // The session record was removed (a kill that crashed before
                // the flow closed): keep the deadline, under a stand-in.
                self.adopt_orphan(flow.session, &flow);
            }
            self.attach_flow(cookie, flow);
        }
        let idle = self.index.pick(|s| s.terms.idle_timeout_ns != 0);
        let now = self.kernel.now().boot_ns;
        for id in idle {
            self.queue_idle_check(id, now);
        }
        info!(
            sessions = self.index.session_count(),
            tracked_flows = self.index.flow_count(),
            "state adopted from pinned maps"
        );
        self.settle();
    }

    /// A flow tagged with a session that has no record: its deadline is
    /// kept under a stand-in session, so it still dies on time.
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
        let _ = self.kernel.put_session(id, &record);
        warn!(session = %name, "flow without a session record: enforcing its deadline under a stand-in session");
        self.index_session(id, &record);
    }

    /// Makes a tracked flow (already tagged with its session in the kernel)
    /// part of that session, and its deadline the session's.
    fn attach_flow(&mut self, cookie: u64, mut flow: Flow) {
        let Some(session) = self.index.session(flow.session) else {
            return;
        };
        let deadline = session.terms.deadline_ns;
        // A pre-registration it claimed is no longer pending; the other keys
        // of the same `expect` item go too.
        if let Some(keys) = self.index.take_claimed(flow.session, &flow) {
            for key in keys.iter() {
                self.kernel.remove_pending(key);
            }
        }
        if flow.deadline_ns != deadline {
            flow.deadline_ns = deadline;
            let _ = self.kernel.update_flow(cookie, &flow);
        }
        self.track_flow(cookie, flow);
        self.index.attach(cookie);
    }

    /// Applies the flow events the kernel has queued.
    pub fn sync_events(&mut self) {
        let events = self.kernel.take_events();
        if !events.is_empty() {
            self.apply_events(&events);
        }
    }

    /// Brings the index up to the kernel's flows when a lookup missed: the
    /// queued events first (a proxy often grants before its connection's
    /// event is read), and the whole map only if the kernel lost events
    /// since the last time. Returns whether anything was learnt.
    pub(super) fn catch_up(&mut self) -> bool {
        let before = self.index.flow_count();
        self.sync_events();
        let lost = self.kernel.events_lost();
        if lost != self.events_lost_seen {
            self.events_lost_seen = lost;
            tracing::warn!(lost, "flow events were lost: reading the flow table again");
            for (cookie, flow) in self.kernel.flows() {
                if self.index.flow(cookie).is_none() {
                    self.track_flow(cookie, flow);
                    self.queue_fence_check(cookie, &flow);
                }
            }
            return true;
        }
        self.index.flow_count() != before
    }

    /// Applies flow events from the kernel, in order.
    pub fn apply_events(&mut self, events: &[FlowEvent]) {
        // Before a close event is applied, not after: a staged write would
        // re-create the entry of the flow that closed.
        self.write_staged();
        for event in events {
            if event.kind == FlowEventKind::Established as u32 {
                // The entry may already carry a grant (adopted state); keep ours.
                let flow = self.index.flow(event.cookie).unwrap_or(event.flow);
                if flow.session != 0 {
                    if self.index.session(flow.session).is_none() {
                        if self.claim_ended(event.cookie, flow) {
                            continue;
                        }
                        self.adopt_orphan(flow.session, &flow);
                    }
                    debug!(cookie = event.cookie, flow = %describe(&flow.tuple), "pre-registered flow established");
                    self.attach_flow(event.cookie, flow);
                } else {
                    self.track_flow(event.cookie, flow);
                    self.queue_fence_check(event.cookie, &flow);
                }
            } else if event.kind == FlowEventKind::Closed as u32 {
                if let Some(flow) = self.untrack_flow(event.cookie) {
                    debug!(cookie = event.cookie, flow = %describe(&flow.tuple), "flow closed");
                    // The kernel removed the entry as the socket closed; a
                    // grant's batched write (`Kernel::put_flows`) that came
                    // after may have put it back.
                    if flow.session != 0 {
                        self.kernel.remove_flow(event.cookie);
                    }
                }
            } else if event.kind == FlowEventKind::Refused as u32 {
                self.refuse_untracked(event.cookie, event.flow);
            }
        }
        self.settle();
    }

    /// A connection that had to be tracked found the flow table full: the
    /// kernel already drops its packets; destroying it tells both peers.
    /// Warned about at most every 10 s, with the count in between.
    fn refuse_untracked(&mut self, cookie: u64, flow: Flow) {
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
        // Not in `FLOWS`: the index is all the kill path will know of it.
        self.track_flow(cookie, flow);
        let victims = Victims::Flows {
            cookies: &[cookie],
            forwarded: &[],
            owner: None,
        };
        self.kill(
            victims,
            Cause::own(Reason::TableFull, Some(flow.established_ns)),
        );
    }

    /// Someone set the wall clock (or it may have been set while no daemon
    /// ran): every session whose deadline came from an `expires_at` moves
    /// to where that wall time now lies on the boot clock, through the same
    /// path as an extend (kernel maps first, then the schedule). Deadlines
    /// given as a ttl do not move. Returns how many sessions moved.
    pub fn follow_wall_clock(&mut self) -> usize {
        /// Reading the two clocks back to back skews them by microseconds;
        /// a real step of the clock is far larger.
        const SKEW_NS: u64 = 1_000_000;
        let now = self.kernel.now();
        let limits = self.limits();
        let moves: Vec<(u64, u64, u64)> = self
            .index
            .sessions()
            .filter_map(|(id, s)| {
                let anchor = s.terms.expires_unix_ns;
                let to = policy::follow_wall_clock(anchor, now, limits);
                let moved = anchor != 0 && s.terms.deadline_ns.abs_diff(to) > SKEW_NS;
                moved.then_some((id, to, anchor))
            })
            .collect();
        for &(id, to, anchor) in &moves {
            if let Err(e) = self.set_deadline(id, to, anchor) {
                let name = self.index.session(id).map_or("?", |s| s.name());
                error!(session = %name, "moving a deadline after a clock change: {}", e.message);
            }
        }
        if !moves.is_empty() {
            info!(
                sessions = moves.len(),
                "the wall clock was set: deadlines given as expires_at follow it"
            );
            self.run_due();
        }
        self.settle();
        moves.len()
    }
}
