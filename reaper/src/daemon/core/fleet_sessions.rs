//! Fleet sessions, as the core sees them: a session granted here whose
//! flows land on another node is published for that node (the outbox the
//! fleet task writes to etcd), and the parts of other nodes' sessions
//! that land here are mirrored: granted here as the origin granted them,
//! with the same deadline, until the origin ends them. Also the partition
//! rule: a node that has not renewed its lease for `fleet.grace` is cut
//! off, and `fail-closed` classes' sessions die.
//!
//! Who may: a mirror is the fleet's (whoever may write the session keys
//! in etcd, docs/fleet.md); here only root and the operators may see or
//! act on one (`ops::may_touch`), never a proxy's uid that happens to
//! match the origin's.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tracing::{info, warn};

use super::kill::Victims;
use super::model::{refuse, Cause, Code, Kill, Reason, Refused};
use super::schedule::Due;
use super::{Caller, Core};
use crate::fleet::place;
use crate::fleet::session::{self, FleetFlow, FleetSession, NodeRecord};
use crate::kernel::Kernel;
use crate::policy::{Asked, Expiry, OnPartition};
use crate::protocol::{FlowRef, GrantRequest};
use crate::tuple;

/// One write the fleet task owes etcd: `value` at `key` under the node
/// lease, or (`None`) the key deleted; with `if_revision`, only if the key
/// is still as written then (a place this node holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub key: String,
    pub value: Option<String>,
    pub if_revision: Option<i64>,
}

/// A fleet-wide limit's place this node holds (or took for a grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPlace {
    pub key: String,
    pub revision: i64,
    pub value: String,
}

/// What the core keeps of fleet sessions (inside `FleetState`).
#[derive(Default)]
pub(super) struct Sessions {
    /// Where each other node's addresses are.
    pub node_of: BTreeMap<IpAddr, Arc<str>>,
    /// Each node's addresses as its record says.
    pub addresses: BTreeMap<Arc<str>, Vec<IpAddr>>,
    /// What is in etcd for each session granted here: landing node →
    /// record as written ("" once a new lease needs it written again).
    pub published: BTreeMap<String, BTreeMap<Arc<str>, String>>,
    /// Sessions whose records may have to change.
    pub dirty: BTreeSet<String>,
    /// Told when `dirty` gains a session (the fleet task waits on it).
    pub wake: Option<Arc<tokio::sync::Notify>>,
    /// Mirrors here: session id → its origin and the connections to come
    /// it registered.
    pub mirrors: BTreeMap<u64, (Arc<str>, BTreeSet<FleetFlow>)>,
    /// Mirror records this node could not grant.
    pub refused: u64,
    /// Boot time the lease was last renewed (or the fleet joined).
    pub renewed_ns: u64,
    pub grace_ns: u64,
    /// Cut off: no renewal for `grace_ns`.
    pub cut_off: bool,
    /// Places taken for a grant being made, by session name.
    pub taken: BTreeMap<String, Vec<HeldPlace>>,
    /// Places the sessions granted here hold, by session name.
    pub held: BTreeMap<String, Vec<HeldPlace>>,
    /// Places to free, or (`rewrite`) to write again under a new lease.
    pub releases: Vec<HeldPlace>,
    pub rewrite: Vec<HeldPlace>,
}

impl<K: Kernel> Core<K> {
    /// The node's lease was renewed: it reaches a quorum.
    pub fn fleet_renewed(&mut self) {
        let now = self.kernel.now().boot_ns;
        let f = &mut self.fleet.sessions;
        // One check stands: the one for the latest renewal.
        if f.renewed_ns != 0 {
            self.schedule
                .cancel(f.renewed_ns + f.grace_ns, Due::FleetGrace);
        }
        f.renewed_ns = now;
        if f.cut_off {
            f.cut_off = false;
            info!("fleet: the lease is renewed again; no longer cut off");
        }
        self.schedule.push(now + f.grace_ns, Due::FleetGrace);
        self.kernel.arm_timer(self.schedule.next());
    }

    /// A `FleetGrace` entry is due: past the grace without a renewal, the
    /// node is cut off and `fail-closed` classes' sessions die.
    pub(super) fn fleet_grace_due(&mut self, now: u64) -> Vec<Kill> {
        let f = &self.fleet.sessions;
        if self.fleet.joined.is_none() || f.cut_off || now < f.renewed_ns + f.grace_ns {
            return Vec::new();
        }
        self.fleet.sessions.cut_off = true;
        // Looked up, not cloned, once per session.
        let fail_closed = |class: &str| {
            self.config
                .classes
                .get(class)
                .is_some_and(|c| c.on_partition == OnPartition::FailClosed)
        };
        let ids = self.index.pick(|s| fail_closed(s.class()));
        warn!(
            unrenewed_ms = (now - self.fleet.sessions.renewed_ns) / 1_000_000,
            killing = ids.len(),
            "fleet: cut off (no lease renewal within fleet.grace); fail-closed classes' sessions end"
        );
        if ids.is_empty() {
            return Vec::new();
        }
        self.kill(
            Victims::Sessions(&ids),
            Cause::own(Reason::Partitioned, Some(now)),
        )
    }

    /// Whether the node is cut off from the fleet (no lease renewal for
    /// the grace).
    pub fn fleet_cut_off(&self) -> bool {
        self.fleet.sessions.cut_off
    }

    /// Refuses a new session of a `fail-closed` class while cut off.
    pub(super) fn check_reachable(&self, class: Option<&str>) -> Result<(), Refused> {
        if !self.fleet.sessions.cut_off {
            return Ok(());
        }
        match self.config.class(class) {
            Some(c) if c.on_partition == OnPartition::FailClosed => refuse(
                Code::Partitioned,
                format!(
                    "grant: this node is cut off from the fleet (no lease renewal for {} ms) and class {:?} fails closed; grant again once it is back",
                    (self.kernel.now().boot_ns - self.fleet.sessions.renewed_ns) / 1_000_000,
                    c.name
                ),
            ),
            _ => Ok(()),
        }
    }

    /// The node records, as listed: where every address lives (added to
    /// what is known; see `fleet_node` for why none is forgotten).
    pub fn fleet_nodes_listed(&mut self, nodes: Vec<NodeRecord>) {
        let f = &mut self.fleet.sessions;
        for n in nodes {
            f.addresses.insert(n.node.into(), n.addresses);
        }
        self.nodes_changed();
    }

    /// A node record written (`Some`) or gone. A node whose record went
    /// (its lease ran out: down, or cut off) keeps its addresses here:
    /// flows still land there, and forgetting them would delete the
    /// records it finds when it comes back, ending sessions that live on.
    pub fn fleet_node(&mut self, node: &str, record: Option<NodeRecord>) {
        let f = &mut self.fleet.sessions;
        match record {
            Some(n) if f.addresses.get(node) != Some(&n.addresses) => {
                f.addresses.insert(node.into(), n.addresses);
                self.nodes_changed();
            }
            _ => {}
        }
    }

    /// The address map follows the records; every session granted here may
    /// now land somewhere else.
    fn nodes_changed(&mut self) {
        let me = self.fleet.joined.as_ref().map(|(n, _)| n.clone());
        let f = &mut self.fleet.sessions;
        f.node_of.clear();
        for (node, addresses) in &f.addresses {
            if Some(&**node) == me.as_deref() {
                continue;
            }
            for a in addresses {
                f.node_of.insert(a.to_canonical(), node.clone());
            }
        }
        let local: Vec<String> = self
            .index
            .sessions()
            .filter(|(_, s)| !s.is_mirror())
            .map(|(_, s)| s.name().to_owned())
            .collect();
        let f = &mut self.fleet.sessions;
        f.dirty.extend(local);
        f.dirty.extend(f.published.keys().cloned());
        if let Some(w) = &f.wake {
            w.notify_one();
        }
    }

    /// A session granted here changed (granted, joined, deadline moved):
    /// its records may have to follow.
    pub(super) fn fleet_session_changed(&mut self, id: u64) {
        let f = &self.fleet.sessions;
        if self.fleet.joined.is_none() || f.node_of.is_empty() {
            return;
        }
        let Some(s) = self.index.session(id).filter(|s| !s.is_mirror()) else {
            return;
        };
        let name = s.name().to_owned();
        self.mark_dirty(name);
    }

    /// A session is gone from the index: its records go too; a mirror is
    /// forgotten.
    pub(super) fn fleet_session_forgotten(&mut self, id: u64, name: &str) {
        let f = &mut self.fleet.sessions;
        f.mirrors.remove(&id);
        if let Some(places) = f.held.remove(name) {
            f.releases.extend(places);
            if let Some(w) = &f.wake {
                w.notify_one();
            }
        }
        if f.published.contains_key(name) {
            self.mark_dirty(name.to_owned());
        }
    }

    fn mark_dirty(&mut self, name: String) {
        let f = &mut self.fleet.sessions;
        if f.dirty.insert(name) {
            if let Some(w) = &f.wake {
                w.notify_one();
            }
        }
    }

    /// A new node lease: every record this node wrote must be written
    /// again under it.
    pub fn fleet_republish_all(&mut self) {
        let f = &mut self.fleet.sessions;
        for parts in f.published.values_mut() {
            for value in parts.values_mut() {
                value.clear();
            }
        }
        f.rewrite = f.held.values().flatten().cloned().collect();
        self.nodes_changed();
    }

    /// The writes that bring etcd to what the sessions granted here are
    /// now, taking them from the outbox.
    pub fn fleet_outbox(&mut self, prefix: &str) -> Vec<Publish> {
        let Some((me, _)) = self.fleet.joined.clone() else {
            return Vec::new();
        };
        let dirty = std::mem::take(&mut self.fleet.sessions.dirty);
        let f = &mut self.fleet.sessions;
        let mut out: Vec<Publish> = std::mem::take(&mut f.releases)
            .into_iter()
            .map(|p| Publish {
                key: p.key,
                value: None,
                if_revision: Some(p.revision),
            })
            .chain(std::mem::take(&mut f.rewrite).into_iter().map(|p| Publish {
                key: p.key,
                value: Some(p.value),
                if_revision: Some(p.revision),
            }))
            .collect();
        for name in dirty {
            let want = self.landing_parts(&me, &name);
            let had = self
                .fleet
                .sessions
                .published
                .remove(&name)
                .unwrap_or_default();
            for landing in had.keys().filter(|l| !want.contains_key(*l)) {
                out.push(Publish {
                    key: session::session_key(prefix, landing, &me, &name),
                    value: None,
                    if_revision: None,
                });
            }
            let mut now_published = BTreeMap::new();
            for (landing, record) in want {
                let value = record.encode();
                if had.get(&landing) != Some(&value) {
                    out.push(Publish {
                        key: session::session_key(prefix, &landing, &me, &name),
                        value: Some(value.clone()),
                        if_revision: None,
                    });
                }
                now_published.insert(landing, value);
            }
            if !now_published.is_empty() {
                self.fleet.sessions.published.insert(name, now_published);
            }
        }
        out
    }

    /// The records of the session called `name` (granted here), one per
    /// node its flows land on.
    fn landing_parts(&self, me: &str, name: &str) -> BTreeMap<Arc<str>, FleetSession> {
        let mut parts: BTreeMap<Arc<str>, FleetSession> = BTreeMap::new();
        let Some(id) = self.index.id_of(name) else {
            return parts;
        };
        let Some(s) = self.index.session(id).filter(|s| !s.is_mirror()) else {
            return parts;
        };
        let ends = s
            .flows
            .iter()
            .filter_map(|c| self.index.flow(*c))
            .map(|f| tuple::addrs_of(&f.tuple))
            .chain(s.pending_keys().map(tuple::addrs_of));
        for (local, remote) in ends {
            let (local, remote) = (canonical(local), canonical(remote));
            let Some(landing) = self.fleet.sessions.node_of.get(&remote.ip()) else {
                continue;
            };
            if remote.port() == 0 {
                continue;
            }
            let part = parts
                .entry(landing.clone())
                .or_insert_with(|| FleetSession {
                    v: crate::fleet::record::VERSION,
                    session: name.to_owned(),
                    origin: me.to_owned(),
                    user: s.user().to_owned(),
                    target: s.target().to_owned(),
                    class: s.class().to_owned(),
                    granted_by_uid: s.terms.granted_by_uid,
                    granted_unix_ns: s.terms.granted_unix_ns as i64,
                    expires_unix_ns: self.wall(s.terms.deadline_ns).clamp(1, i64::MAX as i128)
                        as i64,
                    flows: Vec::new(),
                });
            // As the landing node sees it.
            let flow = FleetFlow {
                local: remote,
                remote: local,
            };
            if !part.flows.contains(&flow) && part.flows.len() < session::MAX_FLOWS {
                part.flows.push(flow);
            }
        }
        for part in parts.values_mut() {
            part.flows.sort();
        }
        parts
    }

    /// The sessions landing here, as listed: each is mirrored, and a
    /// mirror whose session is no longer listed ended while this node was
    /// not watching.
    pub fn fleet_mirrors_listed(&mut self, records: Vec<FleetSession>) -> Vec<Kill> {
        let listed: BTreeSet<&str> = records.iter().map(|r| r.session.as_str()).collect();
        let gone: Vec<u64> = self
            .index
            .sessions()
            .filter(|(_, s)| s.is_mirror() && !listed.contains(s.name()))
            .map(|(id, _)| id)
            .collect();
        let mut kills = Vec::new();
        for id in gone {
            kills.extend(self.end_mirror(id));
        }
        for r in records {
            self.mirror(r);
        }
        self.settle();
        kills
    }

    /// One session record landing here, written.
    pub fn fleet_mirror_put(&mut self, record: FleetSession) {
        self.mirror(record);
        self.settle();
    }

    /// The record of `session` from `origin` is gone: the origin ended it
    /// (or its lease ran out), so its flows here end too.
    pub fn fleet_mirror_gone(&mut self, origin: &str, session: &str) -> Vec<Kill> {
        let id = self.index.id_of(session).filter(|id| {
            self.fleet
                .sessions
                .mirrors
                .get(id)
                .is_none_or(|(o, _)| &**o == origin)
        });
        let kills = match id {
            Some(id) if self.index.session(id).is_some_and(|s| s.is_mirror()) => {
                self.end_mirror(id)
            }
            _ => Vec::new(),
        };
        self.settle();
        kills
    }

    fn end_mirror(&mut self, id: u64) -> Vec<Kill> {
        let now = self.kernel.now().boot_ns;
        let Some(s) = self.index.session(id) else {
            return Vec::new();
        };
        let by = Caller {
            uid: s.terms.granted_by_uid,
            gid: u32::MAX,
            pid: 0,
        };
        let origin = self
            .fleet
            .sessions
            .mirrors
            .get(&id)
            .map_or_else(|| Arc::from("?"), |(o, _)| o.clone());
        self.kill(
            Victims::Sessions(&[id]),
            Cause::fleet(Reason::OriginEnded, now, by, origin),
        )
    }

    /// Grants (or brings up to date) the mirror of `r`: its established
    /// flows here, its connections to come as expected ones, its deadline.
    fn mirror(&mut self, r: FleetSession) {
        let origin: Arc<str> = Arc::from(r.origin.as_str());
        let existing = self.index.id_of(&r.session);
        if let Some(id) = existing {
            if !self.index.session(id).is_some_and(|s| s.is_mirror()) {
                self.fleet.sessions.refused += 1;
                warn!(session = %r.session, origin = %r.origin,
                      "fleet session not mirrored: a session of that name was granted here");
                return;
            }
        }
        let own_netns = self.kernel.own_netns();
        let registered = existing
            .and_then(|id| self.fleet.sessions.mirrors.get(&id))
            .map(|(_, e)| e.clone())
            .unwrap_or_default();
        let mut flows = Vec::new();
        let mut expect = Vec::new();
        for f in &r.flows {
            let found = if f.remote.port() == 0 {
                Vec::new()
            } else {
                self.lookup_addrs(f.local, f.remote, own_netns)
            };
            // Already the mirror's: nothing to grant again.
            let attached = existing.is_some_and(|id| {
                found
                    .iter()
                    .all(|c| self.index.flow(*c).is_some_and(|flow| flow.session == id))
            });
            if !found.is_empty() && !attached {
                flows.push(FlowRef::Addrs {
                    local: f.local,
                    remote: f.remote,
                    netns: None,
                });
            } else if found.is_empty() && !registered.contains(f) {
                expect.push(*f);
            }
        }
        let expiry = Expiry::At(i128::from(r.expires_unix_ns));
        let by = Caller {
            uid: r.granted_by_uid,
            gid: u32::MAX,
            pid: 0,
        };
        if let Some(id) = existing {
            self.fleet.sessions.mirrors.entry(id).or_default().0 = origin.clone();
            self.mirror_deadline(id, &expiry, by, &origin);
            if flows.is_empty() && expect.is_empty() {
                return;
            }
        }
        let class = self.config.class(Some(&r.class)).map(|_| r.class.clone());
        let grant = GrantRequest {
            session: r.session.clone(),
            user: r.user.clone(),
            target: r.target.clone(),
            class,
            asked: Asked {
                expiry: existing.is_none().then_some(expiry),
                ..Asked::default()
            },
            flows,
            expect: expect.iter().map(|f| (f.local, f.remote, None)).collect(),
        };
        match self.grant_as(grant, by, &[], Some(&origin)) {
            Ok(granted) => {
                let id = self.index.id_of(&granted.session.name).expect("granted");
                let entry = self
                    .fleet
                    .sessions
                    .mirrors
                    .entry(id)
                    .or_insert_with(|| (origin.clone(), BTreeSet::new()));
                entry.0 = origin;
                entry.1.extend(expect);
            }
            Err(refusal) => {
                self.fleet.sessions.refused += 1;
                warn!(session = %r.session, origin = %r.origin,
                      "fleet session not mirrored: {}", refusal.message);
            }
        }
    }

    /// The origin moved a mirror's deadline (an extend there, or a
    /// tighter join): earlier or later, the origin is the authority. The
    /// audit trail says so as an `extended` by the origin.
    fn mirror_deadline(&mut self, id: u64, expiry: &Expiry, by: Caller, origin: &Arc<str>) {
        let now = self.kernel.now();
        let Ok(deadline) = crate::policy::deadline_for(expiry, now, self.limits()) else {
            return;
        };
        let current = self.index.session(id).map(|s| s.terms.deadline_ns);
        if current == Some(deadline) {
            return;
        }
        if let Err(e) = self.set_deadline(id, deadline, expiry.wall_anchor()) {
            warn!("fleet session deadline: {}", e.message);
            return;
        }
        let snapshot = self.snapshot(id, now);
        self.audit.change(&super::model::Change {
            kind: super::model::ChangeKind::Extended,
            by,
            by_node: Some(origin),
            at_unix_ns: now.unix_ns,
            session: &snapshot,
        });
    }

    /// Whether the session `id` is a mirror another node owns.
    pub(super) fn is_mirror(&self, id: u64) -> bool {
        self.index.session(id).is_some_and(|s| s.is_mirror())
    }

    /// A grant here cannot join a mirror, nor a mirror a session granted
    /// here: a session has one owner.
    pub(super) fn check_mirror_kind(
        &self,
        name: &str,
        existing: Option<u64>,
        as_mirror: bool,
    ) -> Result<(), Refused> {
        match existing {
            Some(id) if self.is_mirror(id) != as_mirror => {
                let owner = self
                    .fleet
                    .sessions
                    .mirrors
                    .get(&id)
                    .map_or("another node".to_owned(), |(o, _)| format!("node {o}"));
                refuse(
                    Code::SessionConflict,
                    format!(
                        "session {name:?} belongs to {owner} (a fleet session); grant it there"
                    ),
                )
            }
            _ => Ok(()),
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl<K: Kernel> Core<K> {
    /// The fleet-wide places a command needs before the core may run it:
    /// a grant creating a session of a class whose limits are the fleet's.
    /// Empty for everything else (a join holds the places it has).
    /// Nothing for a caller who may not grant: the core refuses it
    /// without etcd being asked anything.
    pub fn fleet_place_asks(
        &self,
        command: &crate::protocol::Command,
        caller: Caller,
    ) -> Vec<place::Ask> {
        let crate::protocol::Command::Grant(g) = command else {
            return Vec::new();
        };
        // Every grant comes through here: the common case returns before
        // anything is cloned.
        if !self.config.class_has_fleet_limits(g.class.as_deref())
            || !self.may_change_grants(caller)
            || self.index.id_of(&g.session).is_some()
        {
            return Vec::new();
        }
        let Some(class) = self.config.class(g.class.as_deref()) else {
            return Vec::new();
        };
        let prefix = self.config.fleet.as_ref().map_or("", |f| f.prefix.as_str());
        let evict = class.on_limit == crate::policy::OnLimit::EvictOldest;
        [
            ("target", &g.target, class.max_per_target),
            ("user", &g.user, class.max_per_user),
        ]
        .into_iter()
        .filter(|(_, _, max)| *max != 0)
        .map(|(kind, value, max)| place::Ask::new(prefix, &class.name, kind, value, max, evict))
        .collect()
    }

    /// The places etcd says this node holds, listed after (re)joining:
    /// those of sessions still here are held again (a restarted daemon
    /// adopted the sessions, not the places) and rewritten under the new
    /// lease by `fleet_republish_all`; the rest are freed.
    pub fn fleet_places_listed(&mut self, mine: Vec<(String, HeldPlace)>) {
        let f = &mut self.fleet.sessions;
        for (session, place) in mine {
            let known = f
                .held
                .get(&session)
                .is_some_and(|places| places.iter().any(|p| p.key == place.key));
            if known {
                continue;
            }
            if self.index.id_of(&session).is_some() {
                f.held.entry(session).or_default().push(place);
            } else {
                f.releases.push(place);
            }
        }
    }

    /// The places taken in etcd for the grant of `session` about to run.
    pub fn fleet_places_taken(&mut self, session: &str, places: Vec<HeldPlace>) {
        self.fleet.sessions.taken.insert(session.to_owned(), places);
    }

    /// After the grant ran: the places it did not keep (it was refused),
    /// which the caller frees.
    pub fn fleet_places_unused(&mut self, session: &str) -> Vec<HeldPlace> {
        self.fleet
            .sessions
            .taken
            .remove(session)
            .unwrap_or_default()
    }

    /// A new session of a fleet-limited class holds the places taken for
    /// it; without them it cannot be granted here.
    pub(super) fn check_fleet_places(
        &self,
        session: &str,
        class: Option<&str>,
    ) -> Result<(), Refused> {
        if !self.config.class_has_fleet_limits(class)
            || self.fleet.sessions.taken.contains_key(session)
        {
            return Ok(());
        }
        refuse(
            Code::BadValue,
            format!(
                "grant: class {:?} counts its limits fleet-wide; such a grant must come on its own (not in a batch) to a daemon in the fleet",
                class.unwrap_or("default")
            ),
        )
    }

    /// The grant of `session` was made: its places are held until it ends.
    pub(super) fn keep_fleet_places(&mut self, session: &str) {
        if let Some(places) = self.fleet.sessions.taken.remove(session) {
            self.fleet.sessions.held.insert(session.to_owned(), places);
        }
    }

    /// A place written again under a new lease (`Some` revision), or lost
    /// to another session meanwhile (`None`): the session that held it ends.
    pub fn fleet_place_rewritten(&mut self, key: &str, revision: Option<i64>) -> Vec<Kill> {
        let held = &mut self.fleet.sessions.held;
        let Some(name) = held
            .iter()
            .find(|(_, places)| places.iter().any(|p| p.key == key))
            .map(|(n, _)| n.clone())
        else {
            return Vec::new();
        };
        if let Some(revision) = revision {
            for p in held.get_mut(&name).into_iter().flatten() {
                if p.key == key {
                    p.revision = revision;
                }
            }
            return Vec::new();
        }
        warn!(session = %name, place = key, "fleet: the session's place was taken while this node was away; it ends");
        let Some(id) = self.index.id_of(&name) else {
            return Vec::new();
        };
        let now = self.kernel.now().boot_ns;
        let kills = self.kill(
            Victims::Sessions(&[id]),
            Cause::own(Reason::Evicted, Some(now)),
        );
        self.settle();
        kills
    }
}
