//! Connections a session still expected when it ended.
//!
//! An `expect` item names a connection before it exists. It can complete
//! its handshake after its session ended: a server whose accept queue was
//! full takes the client's last ACK only at its next SYN-ACK, a second or
//! more later (the client has long thought itself connected), and a proxy
//! may connect after a revoke it has not seen. Were its kernel entry gone
//! with the session, that connection would run with no deadline at all.
//!
//! So the entries of keys that name both ports stay for [`ENDED_EXPECT_NS`]
//! after the session ends, their deadline the moment it ended. A
//! connection that claims one is born past its deadline (the in-kernel
//! drop holds it from its first packet) and is killed as soon as its event
//! is read, audited under its session's names and the reason it ended.
//! Keys that leave the client's port open go with the session: they would
//! catch the next connection from the same host, which nobody granted.
//! While they stay, the entries count against `max_pending` and their
//! creator's `expecting` quota, as they did in the session.

#![forbid(unsafe_code)]

use std::collections::HashMap;

use reaper_common::{Flow, FlowTuple};
use tracing::debug;

use super::index::claims;
use super::kill::Victims;
use super::model::{Cause, Owner};
use super::schedule::Due;
use super::Core;
use crate::kernel::Kernel;
use crate::timefmt::NS_PER_SEC;

/// How long an ended session's exact keys stay: past the kernel's default
/// SYN-ACK retries (`tcp_synack_retries` 5: 63 s), the longest a
/// half-finished handshake can take to complete.
pub(super) const ENDED_EXPECT_NS: u64 = 75 * NS_PER_SEC;

/// What an ended session left expected.
struct EndedSession {
    /// Why the session ended; a late connection dies for the same reason.
    cause: Cause,
    owner: Owner,
    /// Whose quota the items count against (unknown for entries adopted
    /// from the kernel at start).
    uid: Option<u32>,
    /// The `expect` items, each the exact keys it was registered under.
    items: Vec<Box<[FlowTuple]>>,
}

#[derive(Default)]
pub(super) struct EndedSessions(HashMap<u64, EndedSession>);

/// Whether a key names both ports (a connection, not any connection from a
/// host).
fn is_exact(key: &FlowTuple) -> bool {
    key.local_port != 0 && key.remote_port != 0
}

impl<K: Kernel> Core<K> {
    /// Sessions `ids` are ending for `cause`: their exact keys stay in the
    /// kernel with a deadline no later than now, the others go. Called
    /// before the sessions are forgotten.
    pub(super) fn keep_expected(&mut self, ids: &[u64], cause: &Cause) {
        let now = self.kernel.now().boot_ns;
        for &id in ids {
            let Some(session) = self.index.session(id) else {
                continue;
            };
            if session.expecting() == 0 {
                continue;
            }
            let uid = Some(session.terms.granted_by_uid);
            let owner = self.owner_of(id, None);
            let mut kept = Vec::new();
            for item in self.index.take_expected(id) {
                let (exact, open): (Vec<FlowTuple>, Vec<FlowTuple>) =
                    item.iter().partition(|k| is_exact(k));
                for key in &open {
                    self.kernel.remove_pending(key);
                }
                for key in &exact {
                    match self.kernel.pending_grant(key) {
                        Some(mut grant) if grant.session == id && grant.deadline_ns > now => {
                            grant.deadline_ns = now;
                            let _ = self.kernel.put_pending(key, &grant);
                        }
                        // At the deadline already; or claimed, and its
                        // event, still unread, will find this session.
                        _ => {}
                    }
                }
                let items = u32::from(exact.is_empty());
                self.index.release_expected(uid, open.len(), items);
                if !exact.is_empty() {
                    kept.push(exact.into_boxed_slice());
                }
            }
            if kept.is_empty() {
                continue;
            }
            let ended = EndedSession {
                cause: cause.clone(),
                owner,
                uid,
                items: kept,
            };
            self.ended.0.insert(id, ended);
            self.schedule
                .push(now + ENDED_EXPECT_NS, Due::EndedExpect(id));
        }
    }

    /// A connection tagged with a session that is no more: when that
    /// session ended expecting it, it dies now, for the reason the session
    /// did. Returns whether it was one.
    pub(super) fn claim_ended(&mut self, cookie: u64, flow: Flow) -> bool {
        let id = flow.session;
        let Some(ended) = self.ended.0.get_mut(&id) else {
            return false;
        };
        if let Some(i) = ended
            .items
            .iter()
            .position(|keys| keys.iter().any(|k| claims(k, &flow)))
        {
            let keys = ended.items.swap_remove(i);
            let uid = ended.uid;
            self.release_keys(id, uid, &keys);
        }
        let ended = &self.ended.0[&id];
        let owner = ended.owner.clone();
        let cause = Cause {
            due: Some(flow.established_ns),
            ..ended.cause.clone()
        };
        if ended.items.is_empty() {
            self.ended.0.remove(&id);
        }
        debug!(cookie, session = %owner.session, "a connection its ended session expected came");
        self.track_flow(cookie, flow);
        let victims = Victims::Flows {
            cookies: &[cookie],
            forwarded: &[],
            owner: Some(&owner),
        };
        self.kill(victims, cause);
        true
    }

    /// An ended session's time to be expected is over.
    pub(super) fn expire_ended(&mut self, id: u64) {
        let Some(ended) = self.ended.0.remove(&id) else {
            return;
        };
        for keys in &ended.items {
            self.release_keys(id, ended.uid, keys);
        }
    }

    /// Entries found at start whose session is gone: those with an exact
    /// key and a deadline that passed less than [`ENDED_EXPECT_NS`] ago are
    /// kept as an ended session's (its names unknown); the caller removes
    /// the rest. Returns whether `key` was kept.
    pub(super) fn adopt_ended(&mut self, key: FlowTuple, id: u64, deadline_ns: u64) -> bool {
        let now = self.kernel.now().boot_ns;
        let recent = deadline_ns <= now && now < deadline_ns.saturating_add(ENDED_EXPECT_NS);
        if !is_exact(&key) || !recent {
            return false;
        }
        self.index.count_ownerless_key();
        // A new session must never be given the id late connections are
        // tagged with.
        self.index.note_used_id(id);
        let ended = self.ended.0.entry(id).or_insert_with(|| EndedSession {
            cause: Cause::own(super::model::Reason::Expired, None),
            owner: Owner {
                session: format!("ended-{id}"),
                user: "unknown".into(),
                target: "unknown".into(),
                granted_by_uid: None,
            },
            uid: None,
            items: Vec::new(),
        });
        ended.items.push(Box::new([key]));
        self.schedule
            .push(deadline_ns + ENDED_EXPECT_NS, Due::EndedExpect(id));
        true
    }

    /// Removes an ended session's keys from the kernel (those a newer
    /// grant has not taken over) and from the counts.
    fn release_keys(&mut self, id: u64, uid: Option<u32>, keys: &[FlowTuple]) {
        for key in keys {
            if self
                .kernel
                .pending_grant(key)
                .is_some_and(|g| g.session == id)
            {
                self.kernel.remove_pending(key);
            }
        }
        self.index.release_expected(uid, keys.len(), 1);
    }
}
