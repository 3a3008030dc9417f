//! The index: sessions by id and name, tracked flows by cookie and tuple,
//! and how full the daemon-written kernel tables are. Pure data: nothing
//! here calls the kernel, so a lookup never writes and never blocks. The
//! kernel maps are the truth; the index is rebuilt from them at start
//! (`sync::adopt`) and kept in step by the code that writes them.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::num::NonZeroU64;

use hashbrown::HashTable;

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
    /// The record's (0 or 1; u16 so that `flags` fits beside it).
    pub idle_direction: u16,
    /// `reaper_common::session_flags`.
    pub flags: u16,
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
            idle_direction: record.idle_direction as u16,
            flags: u16::from(record.flags),
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

/// A small set kept as a sorted boxed slice: a session's socket cookies or
/// forwarded flows, usually one or two (a hash set costs 48 bytes empty, a
/// `Vec` 24, this 16). Each insert or remove reallocates: the sets are
/// small, and a sorted insert moves the tail anyway.
pub(super) struct SmallSet<T>(Box<[T]>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        SmallSet(Box::new([]))
    }
}

/// A session's socket cookies: nearly always one, held inline. Both forms
/// take the same 16 bytes (the slice's pointer is never null, so the
/// compiler marks `One` with it), and a one-flow session spares the 32-byte
/// heap chunk its cookie took as a slice: 3 MiB at 100k sessions.
pub(super) enum Cookies {
    One(u64),
    Many(SmallSet<u64>),
}

impl Default for Cookies {
    fn default() -> Self {
        Cookies::Many(SmallSet::default())
    }
}

impl Cookies {
    pub fn insert(&mut self, cookie: u64) -> bool {
        match self {
            Cookies::One(c) if *c == cookie => false,
            Cookies::One(c) => {
                let mut set = SmallSet::default();
                set.insert(*c);
                set.insert(cookie);
                *self = Cookies::Many(set);
                true
            }
            Cookies::Many(set) if set.len() == 0 => {
                *self = Cookies::One(cookie);
                true
            }
            Cookies::Many(set) => set.insert(cookie),
        }
    }

    pub fn remove(&mut self, cookie: &u64) -> bool {
        match self {
            Cookies::One(c) if c == cookie => {
                *self = Cookies::default();
                true
            }
            Cookies::One(_) => false,
            Cookies::Many(set) => {
                let removed = set.remove(cookie);
                if let [last] = *set.0 {
                    *self = Cookies::One(last);
                }
                removed
            }
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, u64> {
        self.as_slice().iter()
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn to_vec(&self) -> Vec<u64> {
        self.as_slice().to_vec()
    }

    fn as_slice(&self) -> &[u64] {
        match self {
            Cookies::One(c) => std::slice::from_ref(c),
            Cookies::Many(set) => &set.0,
        }
    }
}

impl<'a> IntoIterator for &'a Cookies {
    type Item = &'a u64;
    type IntoIter = std::slice::Iter<'a, u64>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Ord + Copy> SmallSet<T> {
    pub fn insert(&mut self, item: T) -> bool {
        match self.0.binary_search(&item) {
            Ok(_) => false,
            Err(at) => {
                let mut items = std::mem::take(&mut self.0).into_vec();
                items.insert(at, item);
                self.0 = items.into_boxed_slice();
                true
            }
        }
    }

    pub fn remove(&mut self, item: &T) -> bool {
        match self.0.binary_search(item) {
            Ok(at) => {
                let mut items = std::mem::take(&mut self.0).into_vec();
                items.remove(at);
                self.0 = items.into_boxed_slice();
                true
            }
            Err(_) => false,
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A list whose first entry is held inline, for lists that are nearly
/// always one long (a session's `expect` items): no allocation of its own
/// until a second entry comes, and the same 24 bytes as a `Vec`.
#[derive(Default)]
pub(super) enum InlineFirst<T> {
    #[default]
    Empty,
    One(T),
    Many(Vec<T>),
}

impl<T> InlineFirst<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            InlineFirst::Empty => &[],
            InlineFirst::One(item) => std::slice::from_ref(item),
            InlineFirst::Many(items) => items,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn push(&mut self, item: T) {
        *self = match std::mem::take(self) {
            InlineFirst::Empty => InlineFirst::One(item),
            InlineFirst::One(first) => InlineFirst::Many(vec![first, item]),
            InlineFirst::Many(mut items) => {
                items.push(item);
                InlineFirst::Many(items)
            }
        };
    }

    /// Takes out entry `i`. Panics if there is none, as `Vec::remove`.
    pub fn remove(&mut self, i: usize) -> T {
        match std::mem::take(self) {
            InlineFirst::One(item) if i == 0 => item,
            InlineFirst::Many(mut items) => {
                let item = items.remove(i);
                *self = match items.len() {
                    0 => InlineFirst::Empty,
                    1 => InlineFirst::One(items.remove(0)),
                    _ => InlineFirst::Many(items),
                };
                item
            }
            _ => panic!("InlineFirst::remove: no entry {i}"),
        }
    }

    pub fn pop(&mut self) -> Option<T> {
        let n = self.len();
        (n > 0).then(|| self.remove(n - 1))
    }

    pub fn into_vec(self) -> Vec<T> {
        match self {
            InlineFirst::Empty => Vec::new(),
            InlineFirst::One(item) => vec![item],
            InlineFirst::Many(items) => items,
        }
    }
}

pub(super) struct Session {
    /// The session's id: the session table finds a session through it.
    id: u64,
    pub terms: Terms,
    names: Names,
    pub flows: Cookies,
    /// Forwarded flows and connections to come, which most sessions (a
    /// local flow or two, their connections made) have none of: boxed
    /// apart, they cost such a session 8 bytes instead of 40, and its box
    /// one malloc size class less (3 MiB at 100k sessions).
    extras: Option<Box<Extras>>,
    /// When the next idle check is queued, if any (8 bytes, not 16).
    idle_check_at: Option<NonZeroU64>,
}

#[derive(Default)]
struct Extras {
    /// Forwarded flows (no local socket), by `forwarded_key`.
    forwarded: SmallSet<FlowTuple>,
    /// Pre-registered connections not yet seen: each entry is the set of
    /// kernel `PENDING` keys one `expect` item was registered under.
    pending: InlineFirst<Box<[FlowTuple]>>,
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

    /// Whether another node granted it and this one mirrors it.
    pub fn is_mirror(&self) -> bool {
        self.terms.flags & u16::from(reaper_common::session_flags::MIRROR) != 0
    }

    /// When the next idle check is queued, if any.
    pub fn idle_check_at(&self) -> Option<u64> {
        self.idle_check_at.map(NonZeroU64::get)
    }

    /// Notes the idle check queued at `at` (a boot time, so never 0);
    /// returns the one it replaces.
    pub fn set_idle_check(&mut self, at: u64) -> Option<u64> {
        let old = self.idle_check_at();
        self.idle_check_at = NonZeroU64::new(at);
        old
    }

    pub fn clear_idle_check(&mut self) {
        self.idle_check_at = None;
    }

    pub fn idle_direction(&self) -> IdleDirection {
        IdleDirection::from_u32(u32::from(self.terms.idle_direction))
    }

    /// Every `PENDING` key the session holds.
    pub fn pending_keys(&self) -> impl Iterator<Item = &FlowTuple> {
        self.pending().iter().flatten()
    }

    fn pending(&self) -> &[Box<[FlowTuple]>] {
        self.extras.as_ref().map_or(&[], |e| e.pending.as_slice())
    }

    /// The session's forwarded flows, by `forwarded_key`.
    pub fn forwarded(&self) -> &[FlowTuple] {
        self.extras.as_ref().map_or(&[], |e| &e.forwarded.0)
    }

    pub fn add_forwarded(&mut self, key: FlowTuple) -> bool {
        self.extras.get_or_insert_default().forwarded.insert(key)
    }

    pub fn remove_forwarded(&mut self, key: &FlowTuple) -> bool {
        let removed = self
            .extras
            .as_mut()
            .is_some_and(|e| e.forwarded.remove(key));
        self.drop_empty_extras();
        removed
    }

    fn drop_empty_extras(&mut self) {
        if self
            .extras
            .as_ref()
            .is_some_and(|e| e.forwarded.len() == 0 && e.pending.len() == 0)
        {
            self.extras = None;
        }
    }

    /// How many `expect` items are still waiting for their connection.
    pub fn expecting(&self) -> usize {
        self.pending().len()
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
            idle_direction: u32::from(t.idle_direction),
            flags: t.flags as u8,
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

/// Hashes the u64 (and u32) keys that the kernel or the daemon assigns:
/// session ids, socket and namespace cookies, uids. Nobody can choose
/// them, so nobody can choose collisions, and a multiply is enough where
/// SipHash cost a third of a lookup. Names and tuples, which requesters
/// do choose, keep the keyed `RandomState`.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        // A folded 128-bit multiply: every input bit reaches the low bits
        // (the bucket) and the high bits (the table's tag byte).
        let p = u128::from(self.0 ^ n) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// How many tables a big index table is split into.
const SHARDS: usize = 64;

/// Which of the `SHARDS` tables an entry of `hash` lives in: bits the
/// tables do not use themselves (hashbrown takes the low bits for the
/// bucket and the top seven for its tag).
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

/// A hash table split by hash into `SHARDS` tables. hashbrown grows a
/// table in one step, moving every entry: measured here, the session
/// tables' step at 115k sessions took 41 ms and the flow tables' 43 ms,
/// and the daemon is one thread, so a deadline due meanwhile was served
/// that late. Each shard grows on its own, a 64th of the entries a step.
/// The memory is the same: the shards fill alike.
struct Shards<T>(Box<[HashTable<T>]>);

impl<T> Default for Shards<T> {
    fn default() -> Self {
        Shards((0..SHARDS).map(|_| HashTable::new()).collect())
    }
}

impl<T> Shards<T> {
    fn of(&self, hash: u64) -> &HashTable<T> {
        &self.0[shard_of(hash)]
    }

    fn of_mut(&mut self, hash: u64) -> &mut HashTable<T> {
        &mut self.0[shard_of(hash)]
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(HashTable::iter)
    }

    fn len(&self) -> usize {
        self.0.iter().map(HashTable::len).sum()
    }
}

/// The flows by cookie, each entry with its cookie, in `Shards`.
#[derive(Default)]
struct FlowTable(Shards<(u64, Flow)>);

impl FlowTable {
    fn get(&self, cookie: &u64) -> Option<&Flow> {
        let hash = id_hash(*cookie);
        self.0
            .of(hash)
            .find(hash, |(c, _)| c == cookie)
            .map(|(_, f)| f)
    }

    /// Puts `flow` under `cookie`; returns the flow it replaces, if any.
    fn insert(&mut self, cookie: u64, flow: Flow) -> Option<Flow> {
        let hash = id_hash(cookie);
        match self
            .0
            .of_mut(hash)
            .entry(hash, |(c, _)| *c == cookie, |(c, _)| id_hash(*c))
        {
            hashbrown::hash_table::Entry::Occupied(mut e) => {
                Some(std::mem::replace(&mut e.get_mut().1, flow))
            }
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert((cookie, flow));
                None
            }
        }
    }

    fn remove(&mut self, cookie: &u64) -> Option<Flow> {
        let hash = id_hash(*cookie);
        let entry = self
            .0
            .of_mut(hash)
            .find_entry(hash, |(c, _)| c == cookie)
            .ok()?;
        Some(entry.remove().0 .1)
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Flow)> {
        self.0.iter().map(|(c, f)| (c, f))
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Puts `value` in `table` under `hash`, in place of the entry `same`
/// finds, if any. (`rehash` hashes an entry when the table grows.)
fn put<T>(
    table: &mut HashTable<T>,
    hash: u64,
    value: T,
    same: impl FnMut(&T) -> bool,
    rehash: impl Fn(&T) -> u64,
) {
    match table.entry(hash, same, rehash) {
        hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = value,
        hashbrown::hash_table::Entry::Vacant(e) => {
            e.insert(value);
        }
    }
}

fn id_hash(id: u64) -> u64 {
    BuildHasherDefault::<IdHasher>::default().hash_one(id)
}

/// Sessions by id. Each is boxed and holds its own id, so the table costs
/// a pointer a bucket (an id-keyed map cost twice that; the box's size
/// class has room for the id).
#[derive(Default)]
struct SessionTable(Shards<Box<Session>>);

impl SessionTable {
    fn get(&self, id: &u64) -> Option<&Session> {
        let hash = id_hash(*id);
        self.0.of(hash).find(hash, |s| s.id == *id).map(|s| &**s)
    }

    fn get_mut(&mut self, id: &u64) -> Option<&mut Session> {
        let hash = id_hash(*id);
        self.0
            .of_mut(hash)
            .find_mut(hash, |s| s.id == *id)
            .map(|s| &mut **s)
    }

    /// Adds `session`, replacing any with its id.
    fn insert(&mut self, session: Box<Session>) {
        let id = session.id;
        let hash = id_hash(id);
        put(
            self.0.of_mut(hash),
            hash,
            session,
            |s| s.id == id,
            |s| id_hash(s.id),
        );
    }

    fn remove(&mut self, id: &u64) -> Option<Box<Session>> {
        let hash = id_hash(*id);
        let entry = self.0.of_mut(hash).find_entry(hash, |s| s.id == *id).ok()?;
        Some(entry.remove().0)
    }

    fn iter(&self) -> impl Iterator<Item = &Session> {
        self.0.iter().map(|s| &**s)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Default)]
pub(super) struct Index {
    sessions: SessionTable,
    /// Session ids, found by name: each id is hashed and compared through
    /// its session's name, so a name is stored once.
    by_name: Shards<u64>,
    next_id: u64,
    /// Mirror of the kernel's FLOWS, fed by the ring buffer.
    flows: FlowTable,
    /// Socket cookies, found by (netns cookie, tuple): each cookie is
    /// hashed and compared through its flow, so the table holds 8 bytes
    /// an entry instead of a 48-byte key.
    by_tuple: Shards<u64>,
    /// The keyed hash of names and (netns, tuple) keys.
    keyed: RandomState,
    /// Tracked flows per network namespace: the enforcer keeps a socket
    /// open in each namespace that has any.
    per_netns: IdMap<u64, usize>,
    /// `PENDING` keys the daemon registered and has not removed. The kernel
    /// removes a key when a connection claims it, so this is never fewer
    /// than the kernel holds: a grant checked against it fits.
    pending_keys: usize,
    /// `FORWARDED_GRANTS` keys the daemon wrote and has not removed (a
    /// killed flow's grant stays, at its deadline, until collected).
    forwarded_grants: HashSet<FlowTuple>,
    /// What each uid's sessions hold, against its quota.
    owners: IdMap<u32, OwnerLoad>,
}

/// The key `by_tuple` finds a flow by.
fn tuple_key(flow: &Flow) -> (u64, FlowTuple) {
    (flow.netns_cookie, flow.tuple)
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
        self.sessions.get(&id)
    }

    pub fn session_mut(&mut self, id: u64) -> Option<&mut Session> {
        self.sessions.get_mut(&id)
    }

    pub fn id_of(&self, name: &str) -> Option<u64> {
        let sessions = &self.sessions;
        let hash = self.keyed.hash_one(name);
        self.by_name
            .of(hash)
            .find(hash, |id| {
                sessions.get(id).is_some_and(|s| s.name() == name)
            })
            .copied()
    }

    pub fn sessions(&self) -> impl Iterator<Item = (u64, &Session)> {
        self.sessions.iter().map(|s| (s.id, s))
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Ids of the sessions `keep` picks, in id order.
    pub fn pick(&self, keep: impl Fn(&Session) -> bool) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .sessions
            .iter()
            .filter(|s| keep(s))
            .map(|s| s.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The id a new session gets: never one in use or used since start.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Makes sure no new session is given `id` (one the kernel still knows).
    pub fn note_used_id(&mut self, id: u64) {
        self.next_id = self.next_id.max(id + 1);
    }

    /// Adds a session whose record is in the kernel map (unreadable labels
    /// show as "?").
    pub fn insert_session(&mut self, id: u64, record: &SessionRecord) {
        fn label(l: Option<&str>) -> &str {
            l.unwrap_or("?")
        }
        let names = Names::new(
            label(record.name.as_str()),
            label(record.user.as_str()),
            label(record.target.as_str()),
            label(record.class.as_str()),
        );
        let hash = self.keyed.hash_one(names.part(0));
        self.sessions.insert(Box::new(Session {
            id,
            terms: Terms::of(record),
            names,
            flows: Cookies::default(),
            extras: None,
            idle_check_at: None,
        }));
        // The session is in the table before its id is hashed through it.
        let (sessions, keyed) = (&self.sessions, &self.keyed);
        let name = sessions.get(&id).expect("just inserted").name();
        let name_of = |id: &u64| sessions.get(id).map_or("", |s| s.name());
        put(
            self.by_name.of_mut(hash),
            hash,
            id,
            |other| name_of(other) == name,
            |other| keyed.hash_one(name_of(other)),
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
        let hash = self.keyed.hash_one(s.name());
        if let Ok(entry) = self
            .by_name
            .of_mut(hash)
            .find_entry(hash, |other| *other == id)
        {
            entry.remove();
        }
        self.pending_keys -= s.pending_keys().count();
        self.unload(s.terms.granted_by_uid, 1, s.expecting() as u32);
        Some(s)
    }

    // --- pre-registrations

    pub fn add_pending(&mut self, id: u64, keys: Box<[FlowTuple]>) {
        if let Some(s) = self.sessions.get_mut(&id) {
            self.pending_keys += keys.len();
            s.extras.get_or_insert_default().pending.push(keys);
            let owner = s.terms.granted_by_uid;
            self.owners.entry(owner).or_default().expecting += 1;
        }
    }

    /// Takes the `expect` item of session `id` that the connection `flow`
    /// claimed, if any: all of its keys leave the kernel table.
    pub fn take_claimed(&mut self, id: u64, flow: &Flow) -> Option<Box<[FlowTuple]>> {
        let s = self.sessions.get_mut(&id)?;
        let i = s
            .pending()
            .iter()
            .position(|keys| keys.iter().any(|k| claims(k, flow)))?;
        let keys = s.extras.as_mut()?.pending.remove(i);
        s.drop_empty_extras();
        let owner = s.terms.granted_by_uid;
        self.pending_keys -= keys.len();
        self.unload(owner, 0, 1);
        Some(keys)
    }

    /// Takes back the last `expect` item added to session `id` (undoing a
    /// grant); its keys leave the count and are returned.
    pub fn pop_pending(&mut self, id: u64) -> Option<Box<[FlowTuple]>> {
        let s = self.sessions.get_mut(&id)?;
        let keys = s.extras.as_mut()?.pending.pop()?;
        s.drop_empty_extras();
        let owner = s.terms.granted_by_uid;
        self.pending_keys -= keys.len();
        self.unload(owner, 0, 1);
        Some(keys)
    }

    pub fn pending_keys(&self) -> usize {
        self.pending_keys
    }

    /// Takes every `expect` item out of session `id` (which is ending),
    /// still counted in `pending_keys` and against its creator's quota
    /// until `release_expected`: their kernel entries outlive the session
    /// for a while (`ended.rs`).
    pub fn take_expected(&mut self, id: u64) -> Vec<Box<[FlowTuple]>> {
        let Some(s) = self.sessions.get_mut(&id) else {
            return Vec::new();
        };
        let Some(extras) = s.extras.as_mut() else {
            return Vec::new();
        };
        let items = std::mem::take(&mut extras.pending).into_vec();
        s.drop_empty_extras();
        items
    }

    /// Counts a pending key that no session holds and whose creator is
    /// unknown (found in the kernel at start).
    pub fn count_ownerless_key(&mut self) {
        self.pending_keys += 1;
    }

    /// Stops counting what `count_ownerless_key` or `take_expected` left
    /// counted.
    pub fn release_expected(&mut self, uid: Option<u32>, keys: usize, items: u32) {
        self.pending_keys -= keys;
        if let Some(uid) = uid {
            self.unload(uid, 0, items);
        }
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
        self.sessions.iter().map(|s| s.flows.len()).sum()
    }

    pub fn flows(&self) -> impl Iterator<Item = (u64, Flow)> + '_ {
        self.flows.iter().map(|(c, f)| (*c, *f))
    }

    /// Adds (or refreshes) a tracked flow; not yet part of its session.
    pub fn insert_flow(&mut self, cookie: u64, flow: Flow) {
        match self.flows.insert(cookie, flow) {
            None => *self.per_netns.entry(flow.netns_cookie).or_default() += 1,
            Some(old) if tuple_key(&old) != tuple_key(&flow) => {
                self.unindex_tuple(cookie, &old);
            }
            Some(_) => {}
        }
        // The flow is in the table before its cookie is hashed through it.
        let (flows, keyed) = (&self.flows, &self.keyed);
        let key = tuple_key(&flow);
        let key_of = |c: &u64| flows.get(c).map(tuple_key);
        // A newer socket with the same tuple (the old one is closing)
        // takes its place.
        let hash = keyed.hash_one(key);
        put(
            self.by_tuple.of_mut(hash),
            hash,
            cookie,
            |other| key_of(other) == Some(key),
            |other| keyed.hash_one(key_of(other).unwrap_or_default()),
        );
    }

    /// Takes `cookie` out of the tuple index, if `flow`'s tuple finds it.
    fn unindex_tuple(&mut self, cookie: u64, flow: &Flow) {
        let hash = self.keyed.hash_one(tuple_key(flow));
        if let Ok(entry) = self
            .by_tuple
            .of_mut(hash)
            .find_entry(hash, |other| *other == cookie)
        {
            entry.remove();
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

    /// Takes session `id`'s flows out of it, leaving them indexed: for a
    /// kill of the whole session, whose flows then leave the index one by
    /// one without each taking itself out of a sorted set that is about to
    /// go (a session of n flows would cost n²/2 moves).
    pub fn take_flows(&mut self, id: u64) -> Vec<u64> {
        self.sessions
            .get_mut(&id)
            .map_or_else(Vec::new, |s| std::mem::take(&mut s.flows).to_vec())
    }

    /// Removes a flow from the index and from its session. Returns it, and
    /// whether its network namespace has no tracked flow left.
    pub fn remove_flow(&mut self, cookie: u64) -> Option<(Flow, bool)> {
        let flow = self.flows.remove(&cookie)?;
        self.unindex_tuple(cookie, &flow);
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
        let flows = &self.flows;
        let mut found: Vec<u64> = tuples
            .iter()
            .filter_map(|t| {
                let key = (netns, *t);
                let hash = self.keyed.hash_one(key);
                self.by_tuple
                    .of(hash)
                    .find(hash, |c| flows.get(c).map(tuple_key) == Some(key))
                    .copied()
            })
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> SessionRecord {
        SessionRecord {
            name: Label::new(name).unwrap(),
            user: Label::new("u").unwrap(),
            ..Default::default()
        }
    }

    fn flow(session: u64, local_port: u16) -> Flow {
        Flow {
            tuple: FlowTuple {
                family: 2,
                local_port,
                remote_port: 40000,
                ..FlowTuple::default()
            },
            netns_cookie: 7,
            session,
            ..Flow::default()
        }
    }

    #[test]
    fn inline_first_keeps_order_through_pushes_and_removes() {
        let mut list = InlineFirst::default();
        assert_eq!(list.pop(), None);
        list.push(1);
        assert!(matches!(list, InlineFirst::One(1)));
        list.push(2);
        list.push(3);
        assert_eq!(list.as_slice(), &[1, 2, 3]);
        assert_eq!(list.remove(1), 2);
        assert_eq!(list.as_slice(), &[1, 3]);
        assert_eq!(list.pop(), Some(3));
        assert!(matches!(list, InlineFirst::One(1)), "back to inline");
        assert_eq!(list.remove(0), 1);
        assert_eq!(list.len(), 0);
    }

    #[test]
    fn a_session_fits_a_128_byte_chunk_and_keeps_its_extras_only_while_it_has_some() {
        // glibc serves 113-120 bytes from a 128-byte chunk; the next class
        // is 144. 100k sessions: 1.6 MiB a class.
        assert!(
            std::mem::size_of::<Session>() <= 120,
            "{}",
            std::mem::size_of::<Session>()
        );
        let mut index = Index::new();
        index.insert_session(1, &SessionRecord::default());
        let key = FlowTuple {
            local_port: 1,
            ..FlowTuple::default()
        };
        let s = index.session_mut(1).unwrap();
        assert!(s.add_forwarded(key));
        assert_eq!(s.forwarded(), &[key]);
        assert!(s.remove_forwarded(&key));
        assert!(s.extras.is_none(), "an empty set of extras goes");
        index.add_pending(1, vec![key].into_boxed_slice());
        assert_eq!(index.session(1).unwrap().expecting(), 1);
        assert_eq!(index.pop_pending(1).as_deref(), Some(&[key][..]));
        assert!(index.session(1).unwrap().extras.is_none());
        assert_eq!(index.pending_keys(), 0);
    }

    #[test]
    fn sharded_tables_find_what_they_hold_across_every_shard() {
        let mut index = Index::new();
        for i in 1..=5_000u64 {
            index.insert_session(i, &record(&format!("s{i}")));
            let flow = Flow {
                session: i,
                tuple: FlowTuple {
                    local_port: (i % 60_000) as u16,
                    remote_addr: [i as u32, 0, 0, 0],
                    ..FlowTuple::default()
                },
                ..Flow::default()
            };
            index.insert_flow(i * 7, flow);
            index.attach(i * 7);
        }
        assert!(index.sessions.0 .0.iter().all(|shard| !shard.is_empty()));
        assert_eq!(index.session_count(), 5_000);
        assert_eq!(index.flow_count(), 5_000);
        for i in (1..=5_000u64).step_by(7) {
            assert_eq!(index.id_of(&format!("s{i}")), Some(i));
            let flow = index.flow(i * 7).expect("indexed");
            assert_eq!(index.lookup(0, &[flow.tuple]), vec![i * 7]);
        }
        for i in 1..=2_500u64 {
            index.remove_flow(i * 7);
            index.remove_session(i);
        }
        assert_eq!(index.session_count(), 2_500);
        assert_eq!(index.flows().count(), 2_500);
        assert_eq!(index.id_of("s1"), None);
        assert_eq!(index.id_of("s2501"), Some(2_501));
    }

    #[test]
    fn cookies_hold_one_inline_and_stay_sorted() {
        assert_eq!(std::mem::size_of::<Cookies>(), 16, "as small as the slice");
        let mut set = Cookies::default();
        assert_eq!(set.len(), 0);
        assert!(!set.remove(&5));
        assert!(set.insert(5));
        assert!(matches!(set, Cookies::One(5)));
        assert!(!set.insert(5), "already there");
        assert!(set.insert(3));
        assert!(set.insert(9));
        assert_eq!(set.to_vec(), [3, 5, 9]);
        assert!(set.remove(&5));
        assert!(!set.remove(&5));
        assert_eq!(set.to_vec(), [3, 9]);
        assert!(set.remove(&3));
        assert!(matches!(set, Cookies::One(9)), "back to inline");
        assert!(!set.remove(&3));
        assert!(set.remove(&9));
        assert_eq!(set.len(), 0);
        assert!(set.insert(1));
        assert!(matches!(set, Cookies::One(1)));
    }

    #[test]
    fn names_find_their_session_and_leave_with_it() {
        let mut index = Index::new();
        for id in 1..=1000 {
            index.insert_session(id, &record(&format!("s{id}")));
        }
        assert_eq!(index.id_of("s1"), Some(1));
        assert_eq!(index.id_of("s1000"), Some(1000));
        assert_eq!(index.id_of("s1001"), None);
        index.remove_session(500);
        assert_eq!(index.id_of("s500"), None);
        assert_eq!(index.id_of("s501"), Some(501), "the others stay");
    }

    #[test]
    fn tuples_find_the_newest_socket_and_follow_a_changed_tuple() {
        let mut index = Index::new();
        index.insert_session(1, &record("a"));
        let t = |port| flow(1, port).tuple;
        index.insert_flow(10, flow(1, 5900));
        index.insert_flow(11, flow(1, 5901));
        assert_eq!(index.lookup(7, &[t(5900), t(5901)]), vec![10, 11]);
        assert_eq!(
            index.lookup(8, &[t(5900)]),
            Vec::<u64>::new(),
            "other netns"
        );
        // A new socket on the same tuple is the one found; removing the
        // old one leaves it found.
        index.insert_flow(12, flow(1, 5900));
        assert_eq!(index.lookup(7, &[t(5900)]), vec![12]);
        index.remove_flow(10);
        assert_eq!(index.lookup(7, &[t(5900)]), vec![12]);
        // A refreshed flow with another tuple is found by the new one only.
        index.insert_flow(11, flow(1, 6000));
        assert_eq!(index.lookup(7, &[t(5901)]), Vec::<u64>::new());
        assert_eq!(index.lookup(7, &[t(6000)]), vec![11]);
        let (_, empty) = index.remove_flow(11).unwrap();
        assert!(!empty, "socket 12 is still in the namespace");
        let (_, empty) = index.remove_flow(12).unwrap();
        assert!(empty);
        assert_eq!(index.lookup(7, &[t(5900), t(6000)]), Vec::<u64>::new());
    }
}
