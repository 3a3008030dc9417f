//! What happens when the timer fires: everything the schedule holds that
//! has come due. Deadlines and fence ends go to the kill pipeline; idle
//! checks read the sockets' activity first; RST checks complete forwarded
//! kills' audit events; the forwarded-flow collection forgets stale
//! entries.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap, HashSet};

use reaper_common::{flow_flags, FlowTuple};
use tracing::{debug, info};

use super::kill::Victims;
use super::model::{Cause, Reason};
use super::schedule::Due;
use super::Core;
use crate::kernel::{Kernel, Reading, SocketRef};
use crate::policy::{self, IdleDirection, SocketActivity};
use crate::timefmt;

/// Forwarded flows not seen for this long (and not granted, or long past
/// their deadline) are forgotten; the collection runs this often.
const FORWARD_IDLE_NS: u64 = 120 * timefmt::NS_PER_SEC;
pub(super) const FORWARD_GC_EVERY_NS: u64 = 30 * timefmt::NS_PER_SEC;

impl<K: Kernel> Core<K> {
    /// Does everything that has come due. Called when the timer fires (and
    /// after the wall clock moved deadlines).
    pub fn run_due(&mut self) {
        let was = self.kernel.set_urgent(true);
        self.run_due_now();
        self.kernel.set_urgent(was);
    }

    fn run_due_now(&mut self) {
        self.write_staged();
        // The timer fires a little before the first deadline; wait it out.
        if let Some(next) = self.schedule.next() {
            self.kernel.wait_until(next);
        }
        let now = self.kernel.now().boot_ns;
        let mut expired = Vec::new();
        let mut idle_checks = Vec::new();
        let mut fences = Vec::new();
        while let Some((at, due)) = self.schedule.pop_due(now) {
            match due {
                Due::Deadline(id) => {
                    if expired.is_empty() {
                        // How late the timer woke us: the part of a kill's
                        // lateness that is the machine's, not ours.
                        debug!(woke_late_us = (now - at) / 1000, "deadline due");
                    }
                    expired.push(id)
                }
                Due::IdleCheck(id) => {
                    if let Some(s) = self.index.session_mut(id) {
                        s.clear_idle_check();
                        idle_checks.push(id);
                    }
                }
                Due::Fence(cookie) => fences.push((cookie, at)),
                Due::RstCheck(id) => self.finish_rst_check(id),
                Due::EndedExpect(id) => self.expire_ended(id),
                Due::FleetGrace => {
                    self.fleet_grace_due(now);
                }
                Due::ForwardGc => {
                    self.collect_forwarded(now);
                    self.schedule
                        .push(now + FORWARD_GC_EVERY_NS, Due::ForwardGc);
                }
            }
        }
        if !expired.is_empty() {
            self.kill(
                Victims::Sessions(&expired),
                Cause::own(Reason::Expired, None),
            );
        }
        if !idle_checks.is_empty() {
            self.check_idle(&idle_checks);
        }
        for (cookie, grace_end) in fences {
            // Granted (or gone) since: nothing to do.
            if self.kernel.flow(cookie).is_some_and(|f| f.session == 0) {
                let victims = Victims::Flows {
                    cookies: &[cookie],
                    forwarded: &[],
                    owner: None,
                };
                self.kill(victims, Cause::own(Reason::Unauthorized, Some(grace_end)));
            }
        }
        self.settle();
    }

    /// Runs what has come due, if anything has: called before every request
    /// (and each of a batch's), because deadlines come before requests, and
    /// by the control plane between the steps of a request (reading,
    /// parsing, answering a 200-grant batch take about half a millisecond
    /// each). A caller pipelining requests, or a hostile one flooding them,
    /// keeps the daemon's one thread busy and the timer's wake-up waiting
    /// behind them; this way a kill waits for one step at most, and no
    /// request (an extend racing the timer) sees a session past its
    /// deadline.
    pub fn run_due_if_due(&mut self) {
        if self
            .schedule
            .next()
            .is_some_and(|at| at <= self.kernel.now().boot_ns)
        {
            self.run_due();
        }
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
            .filter(|id| self.index.session(*id).is_some())
            .collect();
        for id in &ids {
            let s = self.index.session(*id).expect("filtered");
            for cookie in s.flows.iter() {
                if let Some(flow) = self.index.flow(*cookie) {
                    targets.push(SocketRef {
                        cookie: *cookie,
                        tuple: flow.tuple,
                        netns_cookie: flow.netns_cookie,
                    });
                }
            }
        }
        let readings = self.kernel.activity(&targets);
        let mut activity: HashMap<u64, SocketActivity> = HashMap::new();
        let mut unknown: BTreeSet<u64> = BTreeSet::new();
        for (t, reading) in targets.iter().zip(readings) {
            match reading {
                Reading::Seen(a) => {
                    let flags = self.index.flow(t.cookie).map_or(0, |f| f.flags);
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
        let now = self.kernel.now().boot_ns;
        for id in ids {
            let s = self.index.session(id).expect("filtered");
            if s.flows.iter().any(|c| unknown.contains(c)) {
                // Without evidence of idleness nobody is killed; look again soon.
                self.queue_idle_check(id, now + timefmt::NS_PER_SEC);
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
                for key in s.forwarded() {
                    if let Some(f) = self.kernel.forwarded(key) {
                        floor = floor.max(f.last_seen_ns);
                    }
                }
            }
            let last = policy::last_activity(now, s.idle_direction(), &sockets, floor);
            let idle_deadline = last + s.terms.idle_timeout_ns;
            if now >= idle_deadline {
                info!(session = %s.name(), idle_for_ms = (now - last) / timefmt::NS_PER_MS, "idle");
                self.kill(
                    Victims::Sessions(&[id]),
                    Cause::own(Reason::Idle, Some(idle_deadline)),
                );
            } else {
                self.queue_idle_check(id, idle_deadline);
            }
        }
    }

    /// Forgets forwarded flows unseen for a while that no live grant holds:
    /// their RSTs are long sent and their drop long enforced.
    fn collect_forwarded(&mut self, now: u64) {
        let live: HashSet<FlowTuple> = self
            .index
            .sessions()
            .flat_map(|(_, s)| s.forwarded().iter().copied())
            .collect();
        for (key, flow) in self.kernel.forwarded_flows() {
            if !live.contains(&key) && now.saturating_sub(flow.last_seen_ns) > FORWARD_IDLE_NS {
                self.kernel.remove_forwarded(&key);
                self.index.forget_forwarded_grant(&key);
            }
        }
    }
}
