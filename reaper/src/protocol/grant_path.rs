//! One-pass reading of the requests proxies send most: a `grant`, and a
//! `batch` of grants.
//!
//! The general parser (`request::parse_request`) reads a line into a JSON
//! tree, checks the tree for keys given twice, and then reads the
//! arguments out of it: at 80k grants/s that was a fifth of the daemon's
//! time, most of it allocating the tree. This reads the same line once,
//! keeping each member's text (`RawValue`, borrowed from the line) until
//! it knows the op, and builds the arguments straight from that text.
//!
//! It only ever accepts. Anything it does not take (another op, a key it
//! does not know or that is given twice, a value of the wrong type, a
//! grant that fails validation) is `None`, and the general parser reads
//! the line again and words the refusal. So what is accepted is what the
//! general parser accepts, with the same result, and every refusal is its
//! own; the tests below hold the two to that.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::request::{validate_grant, Command, Request, Strict, MAX_BATCH};
use super::wire::GrantArgs;
use super::PROTOCOL_VERSION;

/// A member name, borrowed from the line unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// An object's members in order, each value as its text.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some(Key(key)) = map.next_key()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((key, value));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

impl<'a> Members<'a> {
    /// An object's members, if `text` is one and names no key twice.
    fn of(text: &'a str) -> Option<Members<'a>> {
        let members: Members<'a> = serde_json::from_str(text).ok()?;
        let names = &members.0;
        let repeated = names
            .iter()
            .enumerate()
            .any(|(i, (k, _))| names[..i].iter().any(|(other, _)| other == k));
        (!repeated).then_some(members)
    }
}

fn value<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    serde_json::from_str(raw.get()).ok()
}

/// The request on `line`, if it is a grant or a batch of grants that the
/// general parser would accept; `None` for anything else.
pub(super) fn parse(line: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(line).ok()?;
    let Members(members) = Members::of(text)?;
    let mut id = None;
    let mut rest = Vec::with_capacity(members.len());
    for (key, raw) in members {
        if key == "id" {
            // Any JSON value, but held to the same no-repeated-keys rule.
            let Strict(v) = value(raw)?;
            id = Some(v);
        } else {
            rest.push((key, raw));
        }
    }
    let command = command(rest, true)?;
    Some(Request { id, command })
}

fn command(members: Vec<(Cow<'_, str>, &RawValue)>, may_batch: bool) -> Option<Command> {
    let mut op = None;
    let mut args = Vec::with_capacity(members.len());
    for (key, raw) in members {
        match &*key {
            "v" => {
                if value::<u64>(raw)? != PROTOCOL_VERSION {
                    return None;
                }
            }
            "op" => op = Some(value::<Key<'_>>(raw)?.0),
            _ => args.push((key, raw)),
        }
    }
    match &*op? {
        "grant" => grant(args).map(Command::Grant),
        "batch" if may_batch => batch(args),
        _ => None,
    }
}

fn grant(members: Vec<(Cow<'_, str>, &RawValue)>) -> Option<super::GrantRequest> {
    let (mut session, mut user, mut target) = (None, None, None);
    let mut a = GrantArgs::default();
    for (key, raw) in members {
        match &*key {
            "session" => session = Some(value(raw)?),
            "user" => user = Some(value(raw)?),
            "target" => target = Some(value(raw)?),
            "class" => a.class = Some(value(raw)?),
            "ttl" => a.ttl = Some(value(raw)?),
            "expires_at" => a.expires_at = Some(value(raw)?),
            "idle_timeout" => a.idle_timeout = Some(value(raw)?),
            "idle_direction" => a.idle_direction = Some(value(raw)?),
            "flows" => a.flows = value(raw)?,
            "expect" => a.expect = value(raw)?,
            _ => return None,
        }
    }
    a.session = session?;
    a.user = user?;
    a.target = target?;
    validate_grant(a).ok()
}

fn batch(members: Vec<(Cow<'_, str>, &RawValue)>) -> Option<Command> {
    let [(key, raw)] = <[_; 1]>::try_from(members).ok()?;
    if key != "requests" {
        return None;
    }
    let items: Vec<&RawValue> = value(raw)?;
    if items.len() > MAX_BATCH {
        return None;
    }
    let commands = items
        .into_iter()
        .map(|item| command(Members::of(item.get())?.0, false))
        .collect::<Option<Vec<_>>>()?;
    Some(Command::Batch(commands))
}

#[cfg(test)]
mod tests {
    use super::super::request::parse_general;
    use super::*;

    /// Lines this path takes, and lines it must leave to the general
    /// parser; for each, the two must agree.
    const LINES: &[&str] = &[
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","expect":[{"local":"127.0.0.1:5900","remote":"127.1.0.1:1024"}]}"#,
        r#"{"v":1,"id":7,"op":"grant","session":"s","user":"u","target":"t","ttl":30,"flows":[{"local":"127.0.0.1:5900","remote":"127.0.0.1:4000"},{"fd":0}]}"#,
        r#"{"id":{"a":[1,null]},"session":"s\u00e9","user":"u","target":"t","op":"grant","class":"vnc","expires_at":"2030-01-01T00:00:00Z","idle_timeout":"5m","idle_direction":"input","flows":[{"local":"[::1]:5900","remote":"[::1]:4000","netns":"blue"}]}"#,
        r#"{"op":"batch","id":"b","requests":[{"op":"grant","session":"a","user":"u","target":"t","ttl":"1m","expect":[{"local":"127.0.0.1:5900","remote":"127.0.0.1:0"}]},{"v":1,"op":"grant","session":"b","user":"u","target":"t","ttl":"1m","expect":[{"local":"127.0.0.1:5900","remote":"127.0.0.2:0"}]}]}"#,
        r#"{"op":"batch","requests":[]}"#,
        r#"{"\u006fp":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[{"fd":1}]}"#,
        // Left to the general parser: each must come out the same there.
        r#"{"op":"grant","op":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[{"fd":0,"fd":1}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","expect":[{"local":"127.0.0.1:1","local":"127.0.0.1:2","remote":"127.0.0.1:3"}]}"#,
        r#"{"id":{"x":1,"x":2},"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","ttl":"2h","flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","bogus":1,"flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","class":null,"flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","ttl":"1h","flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"","user":"u","target":"t","ttl":"1h","flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","expires_at":"2030-01-01T00:00:00Z","flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":-1,"flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[]}"#,
        r#"{"v":2,"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[{"fd":0}]}"#,
        r#"{"v":1.0,"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[{"fd":0}]}"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[{"fd":0}]} x"#,
        r#"{"op":"batch","requests":[{"op":"grant","session":"a","user":"u","target":"t","ttl":"1m","flows":[{"fd":0}]},{"op":"list"}]}"#,
        r#"{"op":"batch","requests":[{"id":1,"op":"grant","session":"a","user":"u","target":"t","ttl":"1m","flows":[{"fd":0}]}]}"#,
        r#"{"op":"batch","requests":[{"op":"batch","requests":[]}]}"#,
        r#"{"op":"batch","requests":[],"extra":1}"#,
        r#"{"op":"extend","session":"s","ttl":"1h"}"#,
        r#"{"op":"list"}"#,
        r#"[1,2]"#,
        r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"1h","flows":[{"local":"127.0.0.1:1","remote":"[::1]:2"}]}"#,
    ];

    #[test]
    fn takes_the_common_grants_and_agrees_with_the_general_parser() {
        let mut taken = 0;
        for line in LINES {
            let general = parse_general(line.as_bytes());
            // A line left alone is the general parser's to accept
            // (`class: null`, other ops) or to refuse.
            if let Some(fast) = parse(line.as_bytes()) {
                taken += 1;
                assert_eq!(Ok(&fast), general.as_ref(), "{line}");
            }
        }
        assert_eq!(taken, 6, "the first six lines are this path's");
    }

    #[test]
    fn a_whole_batch_of_grants_is_taken() {
        let grant = |i: usize| {
            format!(
                r#"{{"op":"grant","session":"s{i}","user":"u","target":"t","ttl":"1h","expect":[{{"local":"127.0.0.1:5900","remote":"127.0.0.{}:0"}}]}}"#,
                i % 250 + 1
            )
        };
        let items: Vec<String> = (0..MAX_BATCH).map(grant).collect();
        let line = format!(r#"{{"op":"batch","requests":[{}]}}"#, items.join(","));
        let Some(Request {
            command: Command::Batch(commands),
            ..
        }) = parse(line.as_bytes())
        else {
            panic!("a batch of grants is this path's");
        };
        assert_eq!(commands.len(), MAX_BATCH);
        let over = format!(
            r#"{{"op":"batch","requests":[{},{}]}}"#,
            items.join(","),
            grant(0)
        );
        assert!(
            parse(over.as_bytes()).is_none(),
            "too long a batch is the general parser's to refuse"
        );
    }
}
