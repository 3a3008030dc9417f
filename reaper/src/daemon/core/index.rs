//! The index: sessions by id and name, tracked flows by cookie and tuple,
//! and how full the daemon-written kernel tables are. Pure data: nothing
//! here calls the kernel, so a lookup never writes and never blocks. The
//! kernel maps are the truth; the index is rebuilt from them at start
//! (`sync::adopt`) and kept in step by the code that writes them.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};

use reaper_common::{flow_flags, Flow, FlowTuple, Label, SessionRecord};

use crate::policy::IdleDirection;

/// The scalar part of a session's kernel record. The daemon keeps this,
/// not the whole `SessionRecord`: the record's fixed-size labels repeat the
/// names below and would triple the memory a session costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Terms {
    pub deadline_ns: u64,
    pub granted_ns: u64,
    pub granted_unix_ns: u64,
    pub granted_by_uid: u32,
    pub idle_direction: u32,
    pub idle_timeout_ns: u64,
    pub touched_ns: u64,
    /// See `SessionRecord::expires_unix_ns`.
    pub expires_unix_ns: u64,
}

impl Terms {
    fn of(record: &SessionRecord) -> Terms {
        Terms {
            deadline_ns: record.deadline_ns,
            granted_ns: record.granted_ns,
            granted_unix_ns: record.granted_unix_ns,
            granted_by_uid: record.granted_by_uid,
            idle_direction: record.idle_direction,
            idle_timeout_ns: record.idle_timeout_ns,
            touched_ns: record.touched_ns,
            expires_unix_ns: record.expires_unix_ns,
        }
    }
}

/// A session's four names in one allocation (a session costs a few
/// hundred bytes; four separate strings were a third of that).
pub(super) struct Names {
    text: Box<str>,
    /// Where the name, user and target end in `text`.
    ends: [u16; 3],
}

impl Names {
    /// Names are at most a few hundred bytes (protocol and label limits).
    fn new(name: &str, user: &str, target: &str, class: &str) -> Names {
        let a = name.len();
        let b = a + user.len();
        let c = b + target.len();
        Names {
            text: [name, user, target, class].concat().into_boxed_str(),
            ends: [a, b, c].map(|e| u16::try_from(e).expect("names are short")),
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends.get(i).map_or(self.text.len(), |e| *e as usize);
        &self.text[start..end]
    }
}

/// A session's socket cookies: usually one or two, so a sorted vector (a
/// B-tree node would cost about 100 bytes for a single cookie).
#[derive(Default)]
pub(super) struct Cookies(Vec<u64>);

impl Cookies {
    pub fn insert(&mut self, cookie: u64) -> bool {
        match self.0.binary_search(&cookie) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, cookie);
                true
            }
        }
    }

    pub fn remove(&mut self, cookie: &u64) -> bool {
        match self.0.binary_search(cookie) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, u64> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn to_vec(&self) -> Vec<u64> {
        self.0.clone()
    }
}

pub(super) struct Session {
    pub terms: Terms,
    names: Names,
    pub flows: Cookies,
    /// Forwarded flows (no local socket), by `forwarded_key`.
    pub forwarded: HashSet<FlowTuple>,
    /// Pre-registered connections not yet seen: each entry is the set of
    /// kernel `PENDING` keys one `expect` item was registered under.
    pending: Vec<Box<[FlowTuple]>>,
    /// When the next idle check is queued, if any.
    pub idle_check_at: Option<u64>,
}

impl Session {
    pub fn name(&self) -> &str {
        self.names.part(0)
    }
    pub fn user(&self) -> &str {
        self.names.part(1)
    }
    pub fn target(&self) -> &str {
        self.names.part(2)
    }
    pub fn class(&self) -> &str {
        self.names.part(3)
    }

    pub fn idle_direction(&self) -> IdleDirection {
        IdleDirection::from_u32(self.terms.idle_direction)
    }

    /// Every `PENDING` key the session holds.
    pub fn pending_keys(&self) -> impl Iterator<Item = &FlowTuple> {
        self.pending.iter().flatten()
    }

    /// How many `expect` items are still waiting for their connection.
    pub fn expecting(&self) -> usize {
        self.pending.len()
    }

    /// The kernel's copy of this session. Names were length-checked when
    /// the session was made (or read back from a record), so they fit.
    pub fn record(&self) -> SessionRecord {
        let t = &self.terms;
        SessionRecord {
            deadline_ns: t.deadline_ns,
            granted_ns: t.granted_ns,
            granted_unix_ns: t.granted_unix_ns,
            granted_by_uid: t.granted_by_uid,
            idle_direction: t.idle_direction,
            idle_timeout_ns: t.idle_timeout_ns,
            touched_ns: t.touched_ns,
            expires_unix_ns: t.expires_unix_ns,
            name: Label::new(self.name()).unwrap_or_default(),
            user: Label::new(self.user()).unwrap_or_default(),
            target: Label::new(self.target()).unwrap_or_default(),
            class: Label::new(self.class()).unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// Whether a kernel `PENDING` key claims a connection with this tuple (the
/// same rule the sock_ops program applies).
pub(super) fn claims(key: &FlowTuple, flow: &Flow) -> bool {
    let mut t = flow.tuple;
    if *key == t {
        return true;
    }
    if flow.flags & flow_flags::PASSIVE != 0 {
        t.remote_port = 0;
    } else {
        t.local_port = 0;
    }
    *key == t
}

#[derive(Default)]
pub(super) struct Index {
    /// Boxed: the table keeps spare buckets, and a bucket should cost a
    /// pointer, not a whole session.
    sessions: HashMap<u64, Box<Session>>,
    by_name: HashMap<Box<str>, u64>,
    next_id: u64,
    /// Mirror of the kernel's FLOWS, fed by the ring buffer.
    flows: HashMap<u64, Flow>,
    /// (netns cookie, tuple) → socket cookie.
    by_tuple: HashMap<(u64, FlowTuple), u64>,
    /// Tracked flows per network namespace: the enforcer keeps a socket
    /// open in each namespace that has any.
    per_netns: HashMap<u64, usize>,
    /// `PENDING` keys the daemon registered and has not removed. The kernel
    /// removes a key when a connection claims it, so this is never fewer
    /// than the kernel holds: a grant checked against it fits.
    pending_keys: usize,
    /// `FORWARDED_GRANTS` keys the daemon wrote and has not removed (a
    /// killed flow's grant stays, at its deadline, until collected).
    forwarded_grants: HashSet<FlowTuple>,
    /// What each uid's sessions hold, against its quota.
    owners: HashMap<u32, OwnerLoad>,
}

/// Live sessions a uid created, and the `expect` items waiting in them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct OwnerLoad {
    pub sessions: u32,
    pub expecting: u32,
}

impl Index {
    pub fn new() -> Index {
        Index {
            next_id: 1,
            ..Index::default()
        }
    }

    // --- sessions

    pub fn session(&self, id: u64) -> Option<&Session> {
        self.sessions.get(&id).map(|s| &**s)
    }

    pub fn session_mut(&mut self, id: u64) -> Option<&mut Session> {
        self.sessions.get_mut(&id).map(|s| &mut **s)
    }

    pub fn id_of(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    pub fn sessions(&self) -> impl Iterator<Item = (u64, &Session)> {
        self.sessions.iter().map(|(id, s)| (*id, &**s))
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Ids of the sessions `keep` picks, in id order.
    pub fn pick(&self, keep: impl Fn(&Session) -> bool) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| keep(s))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The id a new session gets: never one in use or used since start.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Adds a session whose record is in the kernel map (unreadable labels
    /// show as "?").
    pub fn insert_session(&mut self, id: u64, record: &SessionRecord) {
        let label = |l: Option<&str>| l.unwrap_or("?").to_owned();
        let names = Names::new(
            &label(record.name.as_str()),
            &label(record.user.as_str()),
            &label(record.target.as_str()),
            &label(record.class.as_str()),
        );
        self.by_name.insert(names.part(0).into(), id);
        self.sessions.insert(
            id,
            Box::new(Session {
                terms: Terms::of(record),
                names,
                flows: Cookies::default(),
                forwarded: HashSet::new(),
                pending: Vec::new(),
                idle_check_at: None,
            }),
        );
        self.next_id = self.next_id.max(id + 1);
        self.owners
            .entry(record.granted_by_uid)
            .or_default()
            .sessions += 1;
    }

    /// What the sessions `uid` created hold.
    pub fn load_of(&self, uid: u32) -> OwnerLoad {
        self.owners.get(&uid).copied().unwrap_or_default()
    }

    fn unload(&mut self, uid: u32, sessions: u32, expecting: u32) {
        if let Some(load) = self.owners.get_mut(&uid) {
            load.sessions -= sessions;
            load.expecting -= expecting;
            if load.sessions == 0 && load.expecting == 0 {
                self.owners.remove(&uid);
            }
        }
    }

    /// Forgets a session; its flows stay indexed (the caller unindexes
    /// them) and its pending keys leave the count.
    pub fn remove_session(&mut self, id: u64) -> Option<Box<Session>> {
        let s = self.sessions.remove(&id)?;
        self.by_name.remove(s.name());
        self.pending_keys -= s.pending_keys().count();
        self.unload(s.terms.granted_by_uid, 1, s.pending.len() as u32);
        Some(s)
    }

    // --- pre-registrations

    pub fn add_pending(&mut self, id: u64, keys: Box<[FlowTuple]>) {
        if let Some(s) = self.sessions.get_mut(&id) {
            self.pending_keys += keys.len();
            s.pending.push(keys);
            let owner = s.terms.granted_by_uid;
            self.owners.entry(owner).or_default().expecting += 1;
        }
    }

    /// Takes the `expect` item of session `id` that the connection `flow`
    /// claimed, if any: all of its keys leave the kernel table.
    pub fn take_claimed(&mut self, id: u64, flow: &Flow) -> Option<Box<[FlowTuple]>> {
        let s = self.sessions.get_mut(&id)?;
        let i = s
            .pending
            .iter()
            .position(|keys| keys.iter().any(|k| claims(k, flow)))?;
        let keys = s.pending.remove(i);
        let owner = s.terms.granted_by_uid;
        self.pending_keys -= keys.len();
        self.unload(owner, 0, 1);
        Some(keys)
    }

    /// Takes back the last `expect` item added to session `id` (undoing a
    /// grant); its keys leave the count and are returned.
    pub fn pop_pending(&mut self, id: u64) -> Option<Box<[FlowTuple]>> {
        let s = self.sessions.get_mut(&id)?;
        let keys = s.pending.pop()?;
        let owner = s.terms.granted_by_uid;
        self.pending_keys -= keys.len();
        self.unload(owner, 0, 1);
        Some(keys)
    }

    pub fn pending_keys(&self) -> usize {
        self.pending_keys
    }

    // --- forwarded grants

    pub fn note_forwarded_grant(&mut self, key: FlowTuple) {
        self.forwarded_grants.insert(key);
    }

    pub fn forget_forwarded_grant(&mut self, key: &FlowTuple) {
        self.forwarded_grants.remove(key);
    }

    pub fn has_forwarded_grant(&self, key: &FlowTuple) -> bool {
        self.forwarded_grants.contains(key)
    }

    /// Counts `n` forwarded grants written by earlier runs, as adoption would.
    #[cfg(test)]
    pub fn fill_forwarded_grants_for_test(&mut self, n: usize) {
        for i in 0..n {
            let key = FlowTuple {
                local_port: (i % 65536) as u16,
                remote_port: (i / 65536) as u16,
                ..FlowTuple::default()
            };
            self.forwarded_grants.insert(key);
        }
    }

    pub fn forwarded_grant_count(&self) -> usize {
        self.forwarded_grants.len()
    }

    // --- flows

    pub fn flow(&self, cookie: u64) -> Option<Flow> {
        self.flows.get(&cookie).copied()
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn granted_flow_count(&self) -> usize {
        self.sessions.values().map(|s| s.flows.len()).sum()
    }

    pub fn flows(&self) -> impl Iterator<Item = (u64, Flow)> + '_ {
        self.flows.iter().map(|(c, f)| (*c, *f))
    }

    /// Adds (or refreshes) a tracked flow; not yet part of its session.
    pub fn insert_flow(&mut self, cookie: u64, flow: Flow) {
        self.by_tuple
            .insert((flow.netns_cookie, flow.tuple), cookie);
        if self.flows.insert(cookie, flow).is_none() {
            *self.per_netns.entry(flow.netns_cookie).or_default() += 1;
        }
    }

    /// Makes an indexed flow part of the session it is tagged with.
    pub fn attach(&mut self, cookie: u64) {
        let Some(flow) = self.flows.get(&cookie) else {
            return;
        };
        if let Some(s) = self.sessions.get_mut(&flow.session) {
            s.flows.insert(cookie);
        }
    }

    /// Removes a flow from the index and from its session. Returns it, and
    /// whether its network namespace has no tracked flow left.
    pub fn remove_flow(&mut self, cookie: u64) -> Option<(Flow, bool)> {
        let flow = self.flows.remove(&cookie)?;
        let key = (flow.netns_cookie, flow.tuple);
        if self.by_tuple.get(&key) == Some(&cookie) {
            self.by_tuple.remove(&key);
        }
        let mut namespace_empty = false;
        if let Some(count) = self.per_netns.get_mut(&flow.netns_cookie) {
            *count -= 1;
            if *count == 0 {
                self.per_netns.remove(&flow.netns_cookie);
                namespace_empty = true;
            }
        }
        if let Some(session) = self.sessions.get_mut(&flow.session) {
            session.flows.remove(&cookie);
        }
        Some((flow, namespace_empty))
    }

    /// Cookies of the tracked flows in namespace `netns` recorded under any
    /// of `tuples`, sorted.
    pub fn lookup(&self, netns: u64, tuples: &[FlowTuple]) -> Vec<u64> {
        let mut found: Vec<u64> = tuples
            .iter()
            .filter_map(|t| self.by_tuple.get(&(netns, *t)).copied())
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
}
