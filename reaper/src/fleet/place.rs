//! Fleet-wide limits, as stored in etcd: a class whose `limit_scope` is
//! `"fleet"` counts its sessions per target and per user across every
//! node. Each session holds a *place*: one of `max` slots under
//! `{prefix}/places/{class}/{target|user}/{value}/{slot}`, taken with a
//! create-if-absent transaction (so two nodes racing for the last place
//! cannot both win) under the holder's node lease (so a node that dies
//! frees its places when etcd forgets it). Pure, like `record`.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

use super::record::{escape, read_versioned, BadRecord, Versioned, VERSION};

/// Most places one limit may have (a limit of more is not a console's).
pub const MAX_PLACES: u32 = 1024;

/// What one limit of a grant asks for: a place under `under`, one of
/// `max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// `{prefix}/places/{class}/{kind}/{value}/`.
    pub under: String,
    pub max: u32,
    /// `target "vm-1"`: what the limit counts, for messages.
    pub what: String,
    pub evict_oldest: bool,
}

impl Ask {
    pub fn new(
        prefix: &str,
        class: &str,
        kind: &str,
        value: &str,
        max: u32,
        evict_oldest: bool,
    ) -> Ask {
        Ask {
            under: format!("{}{class}/{kind}/{}/", places_prefix(prefix), escape(value)),
            max: max.min(MAX_PLACES),
            what: format!("{kind} {value:?} of class {class:?}"),
            evict_oldest,
        }
    }

    pub fn slot_key(&self, slot: u32) -> String {
        format!("{}{slot}", self.under)
    }
}

/// Who holds a place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    pub v: u32,
    pub session: String,
    pub node: String,
    pub granted_unix_ns: i64,
}

impl Versioned for Holder {
    fn version(&self) -> u32 {
        self.v
    }
}

impl Holder {
    pub fn new(session: &str, node: &str, granted_unix_ns: i64) -> Holder {
        Holder {
            v: VERSION,
            session: session.to_owned(),
            node: node.to_owned(),
            granted_unix_ns,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("records serialize")
    }

    pub fn decode(key: &[u8], value: &[u8]) -> Result<Holder, BadRecord> {
        read_versioned(key, value, "place", 4096)
    }
}

/// Where every place lives.
pub fn places_prefix(prefix: &str) -> String {
    format!("{prefix}/places/")
}

/// What a place's key says: (class, "target" or "user", value).
pub fn parse_key(prefix: &str, key: &[u8]) -> Option<(String, String, String)> {
    let rest = std::str::from_utf8(key)
        .ok()?
        .strip_prefix(&places_prefix(prefix))?;
    let mut parts = rest.split('/');
    let (class, kind, value) = (parts.next()?, parts.next()?, parts.next()?);
    parts.next()?.parse::<u32>().ok()?;
    Some((
        class.to_owned(),
        kind.to_owned(),
        super::record::unescape(value)?,
    ))
}

/// One occupied place, as listed: its slot, holder and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occupied {
    pub slot: u32,
    pub holder: Holder,
    pub mod_revision: i64,
}

/// The occupied places of `ask` from a listing of its keys; keys that do
/// not read (another slot syntax, a bad record) count as occupied by
/// nobody known, so that a bad record never frees a place.
pub fn occupied(ask: &Ask, kvs: &[(Vec<u8>, Vec<u8>, i64)]) -> Vec<Occupied> {
    let mut out: Vec<Occupied> = kvs
        .iter()
        .filter_map(|(key, value, rev)| {
            let slot = std::str::from_utf8(key)
                .ok()?
                .strip_prefix(&ask.under)?
                .parse::<u32>()
                .ok()?;
            let holder = Holder::decode(key, value).unwrap_or_else(|_| Holder::new("?", "?", 0));
            Some(Occupied {
                slot,
                holder,
                mod_revision: *rev,
            })
        })
        .collect();
    out.sort_by_key(|o| o.slot);
    out
}

/// What to do next with `ask`, given its occupied places.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Try to take this free slot.
    Take(u32),
    /// Every place is held: replace the oldest holder's (evict-oldest).
    Evict(Occupied),
    /// Every place is held (reject-new): the message names the holders.
    Full(String),
}

pub fn next(ask: &Ask, occupied: &[Occupied]) -> Next {
    if let Some(free) = (0..ask.max).find(|s| !occupied.iter().any(|o| o.slot == *s)) {
        return Next::Take(free);
    }
    let in_range = occupied.iter().filter(|o| o.slot < ask.max);
    if ask.evict_oldest {
        if let Some(oldest) = in_range.min_by_key(|o| (o.holder.granted_unix_ns, o.slot)) {
            return Next::Evict(oldest.clone());
        }
    }
    let holders: Vec<String> = occupied
        .iter()
        .filter(|o| o.slot < ask.max)
        .map(|o| format!("session {:?} on node {}", o.holder.session, o.holder.node))
        .collect();
    Next::Full(format!(
        "{} already has its {} fleet-wide place(s), held by {}",
        ask.what,
        ask.max,
        holders.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(ask: &Ask, slot: u32, session: &str, node: &str, at: i64) -> (Vec<u8>, Vec<u8>, i64) {
        (
            ask.slot_key(slot).into_bytes(),
            Holder::new(session, node, at).encode().into_bytes(),
            10 + i64::from(slot),
        )
    }

    #[test]
    fn the_first_free_slot_is_taken_then_the_limit_names_its_holders() {
        let ask = Ask::new("/r", "console", "target", "vm/1", 2, false);
        assert_eq!(ask.slot_key(0), "/r/places/console/target/vm%2F1/0");
        assert_eq!(
            parse_key("/r", ask.slot_key(1).as_bytes()),
            Some(("console".into(), "target".into(), "vm/1".into()))
        );
        assert_eq!(next(&ask, &[]), Next::Take(0));
        let one = occupied(&ask, &[kv(&ask, 0, "s1", "node-a", 5)]);
        assert_eq!(next(&ask, &one), Next::Take(1));
        let two = occupied(
            &ask,
            &[
                kv(&ask, 1, "s2", "node-b", 3),
                kv(&ask, 0, "s1", "node-a", 5),
            ],
        );
        let Next::Full(why) = next(&ask, &two) else {
            panic!()
        };
        assert!(why.contains("session \"s1\" on node node-a"), "{why}");
        assert!(why.contains("session \"s2\" on node node-b"), "{why}");
    }

    #[test]
    fn evict_oldest_picks_the_oldest_holder_and_bad_records_hold_their_place() {
        let ask = Ask::new("/r", "shared", "user", "alice", 2, true);
        let mut kvs = vec![
            kv(&ask, 0, "s1", "node-a", 5),
            kv(&ask, 1, "s2", "node-b", 3),
        ];
        let Next::Evict(o) = next(&ask, &occupied(&ask, &kvs)) else {
            panic!()
        };
        assert_eq!((o.slot, o.holder.session.as_str()), (1, "s2"));
        kvs[1].1 = b"garbage".to_vec();
        let places = occupied(&ask, &kvs);
        assert_eq!(places.len(), 2, "a bad record still holds its place");
    }
}
