//! Fleet revocations, as the core sees them: records the fleet task read
//! from etcd (`daemon::fleet`), applied to this node's sessions, and the
//! locks they leave standing, which `grant` checks. No etcd here: the
//! task hands in records and revisions, in revision order.
//!
//! Who may: whoever may write the revocation keys in etcd (its TLS client
//! certificates and roles are the gate, docs/fleet.md); a revocation
//! reaches every session that matches, whoever granted it, as an
//! operator's revoke would. A record that fails to read changes nothing
//! and is counted (`bad_records`) and logged naming its key.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use super::index::Session;
use super::kill::Victims;
use super::model::{refuse, Cause, Change, ChangeKind, Code, Kill, Reason, Refused};
use super::Core;
use crate::fleet::record::{BadRecord, Revocation, Selector};
use crate::kernel::Kernel;
use crate::protocol::FleetStatus;

/// What the core knows of the fleet.
#[derive(Default)]
pub(super) struct FleetState {
    /// Set once the fleet task starts: this node's name and members.
    pub(super) joined: Option<(String, Vec<String>)>,
    /// Sessions published and mirrored, and the partition state
    /// (`fleet_sessions`).
    pub(super) sessions: super::fleet_sessions::Sessions,
    /// Standing locks (user and target revocations), with the revision
    /// they were written at.
    /// Keyed by selector, then value, so that a grant looks its names up
    /// without making a key.
    locks: BTreeMap<Selector, BTreeMap<String, (Revocation, i64)>>,
    applied_revision: i64,
    /// How long the last applied revocation took from being asked to
    /// being applied here (wall clocks of two nodes: as good as NTP).
    last_lag_ms: Option<f64>,
    connected: bool,
    /// Boot time the connection state last changed.
    since_ns: u64,
    last_error: Option<String>,
    bad_records: u64,
    relists: u64,
}

/// How a revocation reaches the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applying {
    /// Newly written (from the watch, or standing in a list): kills what
    /// it matches, and a lock stands from now.
    Now,
    /// Replayed from history the node missed while it was down, older
    /// than the list it already took its locks from: kills what it
    /// matches, but whether a lock stands is the list's to say.
    Replayed,
}

impl<K: Kernel> Core<K> {
    /// The fleet task has started: `node` in the cluster of `endpoints`.
    /// The grace counts from now; `wake` is told when a session's records
    /// have to be written.
    pub fn fleet_joined(
        &mut self,
        node: &str,
        endpoints: &[String],
        resume_from: i64,
        grace_ns: u64,
        wake: Arc<tokio::sync::Notify>,
    ) {
        self.fleet.joined = Some((node.to_owned(), endpoints.to_vec()));
        self.fleet.applied_revision = resume_from;
        self.fleet.since_ns = self.kernel.now().boot_ns;
        self.fleet.sessions.grace_ns = grace_ns;
        self.fleet.sessions.wake = Some(wake);
        // Sessions adopted from the kernel that are mirrors: their origin
        // is learnt again from the list.
        self.fleet_renewed();
    }

    /// The connection to etcd came up or went down (`error` says why).
    pub fn fleet_connection(&mut self, connected: bool, error: Option<String>) {
        if self.fleet.connected != connected {
            self.fleet.since_ns = self.kernel.now().boot_ns;
        }
        self.fleet.connected = connected;
        if error.is_some() {
            self.fleet.last_error = error;
        }
    }

    /// A record that did not read: counted and logged, nothing else.
    pub fn fleet_bad_record(&mut self, bad: &BadRecord) {
        self.fleet.bad_records += 1;
        warn!("refused {bad}; nothing changed");
    }

    /// The standing revocations, listed at `revision`: the locks become
    /// exactly those listed, and each revocation kills what it matches.
    pub fn fleet_listed(&mut self, standing: &[(Revocation, i64)], revision: i64) -> Vec<Kill> {
        self.fleet.relists += 1;
        self.fleet.locks.clear();
        let mut kills = Vec::new();
        for (revocation, written) in standing {
            kills.extend(self.apply_revocation(revocation, *written, Applying::Now));
        }
        self.fleet.applied_revision = self.fleet.applied_revision.max(revision);
        self.settle();
        kills
    }

    /// One revocation written at `revision`.
    pub fn fleet_revoked(
        &mut self,
        revocation: &Revocation,
        revision: i64,
        applying: Applying,
    ) -> Vec<Kill> {
        let kills = self.apply_revocation(revocation, revision, applying);
        self.fleet.applied_revision = self.fleet.applied_revision.max(revision);
        let lag_ns = crate::clock::unix_ns() - i128::from(revocation.at_unix_ns);
        if applying == Applying::Now {
            self.fleet.last_lag_ms = Some(lag_ns.max(0) as f64 / 1e6);
        }
        self.settle();
        kills
    }

    /// The revocation of `value` by `selector` was deleted at `revision`
    /// (lifted, or its lease ran out): its lock, if any, falls.
    pub fn fleet_lifted(
        &mut self,
        selector: Selector,
        value: &str,
        revision: i64,
        applying: Applying,
    ) {
        let lifted = applying == Applying::Now
            && self
                .fleet
                .locks
                .get_mut(&selector)
                .and_then(|values| values.remove(value))
                .is_some();
        if lifted {
            info!(
                selector = selector.name(),
                value, revision, "fleet lock lifted"
            );
        }
        self.fleet.applied_revision = self.fleet.applied_revision.max(revision);
    }

    /// The revision every change up to which is applied here.
    pub fn fleet_applied_revision(&self) -> i64 {
        self.fleet.applied_revision
    }

    /// Refuses a grant for a locked user or target.
    pub(super) fn check_unlocked(&self, user: &str, target: &str) -> Result<(), Refused> {
        for (selector, value) in [(Selector::User, user), (Selector::Target, target)] {
            let lock = self.fleet.locks.get(&selector).and_then(|v| v.get(value));
            if let Some((r, revision)) = lock {
                return refuse(
                    Code::Locked,
                    format!(
                        "grant: {} {value:?} is revoked fleet-wide (asked on node {} by uid {}, revision {revision}); no node grants it until the revocation is lifted (`reaper unlock --{} ...`) or expires",
                        selector.name(),
                        r.by_node,
                        r.by_uid,
                        selector.name()
                    ),
                );
            }
        }
        Ok(())
    }

    fn apply_revocation(&mut self, r: &Revocation, revision: i64, applying: Applying) -> Vec<Kill> {
        let matches = |s: &Session| {
            let named = match r.selector {
                Selector::Session => s.name(),
                Selector::User => s.user(),
                Selector::Target => s.target(),
                Selector::Class => s.class(),
            };
            // A standing lock ends every matching session; a one-off
            // revocation, or a replayed one the list no longer holds, only
            // those granted before it was asked.
            named == r.value
                && ((r.selector.locks() && applying == Applying::Now)
                    || i128::from(s.terms.granted_unix_ns) < i128::from(r.at_unix_ns))
        };
        let ids = self.index.pick(matches);
        if r.selector.locks() && applying == Applying::Now {
            self.fleet
                .locks
                .entry(r.selector)
                .or_default()
                .insert(r.value.clone(), (r.clone(), revision));
        }
        if ids.is_empty() {
            return Vec::new();
        }
        let now = self.kernel.now();
        // The asker's uid, as stored; no gid or pid crosses nodes.
        let by = super::Caller {
            uid: r.by_uid,
            gid: u32::MAX,
            pid: 0,
        };
        for id in &ids {
            let snapshot = self.snapshot(*id, now);
            self.audit.change(&Change {
                kind: ChangeKind::Revoked,
                by,
                by_node: Some(&r.by_node),
                at_unix_ns: now.unix_ns,
                session: &snapshot,
            });
        }
        info!(
            selector = r.selector.name(),
            value = %r.value,
            by_node = %r.by_node,
            revision,
            sessions = ids.len(),
            "fleet revocation applied"
        );
        let node: Arc<str> = Arc::from(r.by_node.as_str());
        self.kill(
            Victims::Sessions(&ids),
            Cause::fleet(Reason::Revoked, now.boot_ns, by, node),
        )
    }

    pub(super) fn fleet_status(&self) -> Option<FleetStatus> {
        let (node, endpoints) = self.fleet.joined.clone()?;
        let now = self.kernel.now().boot_ns;
        Some(FleetStatus {
            node,
            endpoints,
            connected: self.fleet.connected,
            state_for_ms: now.saturating_sub(self.fleet.since_ns) / 1_000_000,
            applied_revision: self.fleet.applied_revision,
            last_lag_ms: self.fleet.last_lag_ms,
            locks: self
                .fleet
                .locks
                .iter()
                .flat_map(|(s, values)| values.keys().map(|v| format!("{}={v}", s.name())))
                .collect(),
            bad_records: self.fleet.bad_records,
            relists: self.fleet.relists,
            cut_off: self.fleet.sessions.cut_off,
            renewed_ms_ago: now.saturating_sub(self.fleet.sessions.renewed_ns) / 1_000_000,
            nodes: self
                .fleet
                .sessions
                .addresses
                .keys()
                .filter(|n| Some(&***n) != self.fleet.joined.as_ref().map(|(me, _)| me.as_str()))
                .map(|n| n.to_string())
                .collect(),
            published: self.fleet.sessions.published.len(),
            mirrors: self.index.sessions().filter(|(_, s)| s.is_mirror()).count(),
            mirrors_refused: self.fleet.sessions.refused,
            last_error: self.fleet.last_error.clone(),
        })
    }
}
