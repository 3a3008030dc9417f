//! Requests once validated: what the daemon acts on, and `parse_request`,
//! which turns a line into one or refuses it naming the field.

use std::fmt::Display;
use std::net::SocketAddr;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::refusal::{bad, Refusal, RefusalCode};
use super::wire::{
    DurationArg, ExtendArgs, FlowSpec, GrantArgs, ListArgs, NetnsRef, RevokeArgs, TouchArgs,
};
use super::{MAX_FDS_PER_REQUEST, PROTOCOL_VERSION};
use crate::policy::{self, Asked, Expiry};
use crate::timefmt;

/// A flow reference the daemon can resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowRef {
    Addrs {
        local: SocketAddr,
        remote: SocketAddr,
        netns: Option<NetnsRef>,
    },
    /// Index into the descriptors passed with the request.
    Fd(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrantRequest {
    pub session: String,
    pub user: String,
    pub target: String,
    pub class: Option<String>,
    /// Expiry and idle terms as asked; the class fills in and bounds them.
    /// A grant joining an existing session keeps that session's terms.
    pub asked: Asked,
    pub flows: Vec<FlowRef>,
    /// (local, remote, namespace) of connections to come; port 0 matches any.
    pub expect: Vec<(SocketAddr, SocketAddr, Option<NetnsRef>)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExtendRequest {
    pub session: String,
    pub expiry: Expiry,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RevokeSelector {
    Session(String),
    Class(String),
    User(String),
    Target(String),
    Flow {
        local: SocketAddr,
        remote: SocketAddr,
        netns: Option<NetnsRef>,
    },
}

/// The control operations: the one list every message and dispatch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Grant,
    Extend,
    Touch,
    Revoke,
    List,
    Status,
    /// Streams events until the client goes away (served by the control
    /// plane itself, not the core).
    Watch,
    /// Many grants, extends, touches and revokes in one line, answered in
    /// one line (see `parse_batch`).
    Batch,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Grant,
        Op::Extend,
        Op::Touch,
        Op::Revoke,
        Op::List,
        Op::Status,
        Op::Watch,
        Op::Batch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Grant => "grant",
            Op::Extend => "extend",
            Op::Touch => "touch",
            Op::Revoke => "revoke",
            Op::List => "list",
            Op::Status => "status",
            Op::Watch => "watch",
            Op::Batch => "batch",
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Whether the operation changes grants (and so needs an allowed caller).
    pub fn mutates(self) -> bool {
        matches!(
            self,
            Op::Grant | Op::Extend | Op::Touch | Op::Revoke | Op::Batch
        )
    }

    /// "grant, extend, touch, revoke, list, status", for messages.
    pub fn list() -> String {
        Op::ALL.map(Op::name).join(", ")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Grant(GrantRequest),
    Extend(ExtendRequest),
    Touch(String),
    Revoke(RevokeSelector),
    List(ListArgs),
    Status,
    /// Events of the sessions these filters select (all: none set).
    Watch(ListArgs),
    /// Requests done in order, each on its own (never another batch, nor
    /// a list, status or watch).
    Batch(Vec<Command>),
}

impl Command {
    pub fn op(&self) -> Op {
        match self {
            Command::Grant(_) => Op::Grant,
            Command::Extend(_) => Op::Extend,
            Command::Touch(_) => Op::Touch,
            Command::Revoke(_) => Op::Revoke,
            Command::List(_) => Op::List,
            Command::Status => Op::Status,
            Command::Watch(_) => Op::Watch,
            Command::Batch(_) => Op::Batch,
        }
    }

    /// Whether the command changes grants (and so needs an allowed caller).
    pub fn mutates(&self) -> bool {
        self.op().mutates()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub command: Command,
}

/// Parses one request line. On error, also returns the request id if one
/// could be read, so the refusal can carry it.
pub fn parse_request(line: &[u8]) -> Result<Request, (Option<Value>, Refusal)> {
    // Grants, the bulk of the traffic, in one pass (see `grant_path`);
    // everything else, and every refusal, here.
    if let Some(request) = super::grant_path::parse(line) {
        return Ok(request);
    }
    parse_general(line)
}

/// `parse_request` for any request: the line as a JSON tree first.
pub(super) fn parse_general(line: &[u8]) -> Result<Request, (Option<Value>, Refusal)> {
    let value = match serde_json::from_slice::<Strict>(line) {
        Ok(Strict(value)) => value,
        Err(e) if e.to_string().starts_with(DUPLICATE) => {
            return Err((None, bad(format!("request is ambiguous: {e}"))));
        }
        Err(e) => {
            return Err((
                None,
                Refusal::new(
                    RefusalCode::BadJson,
                    format!("request is not valid JSON: {e}"),
                ),
            ))
        }
    };
    let Value::Object(mut obj) = value else {
        return Err((
            None,
            Refusal::new(RefusalCode::BadJson, "request must be a JSON object"),
        ));
    };
    let id = obj.remove("id");
    parse_object(obj)
        .map(|command| Request {
            id: id.clone(),
            command,
        })
        .map_err(|r| (id, r))
}

/// What a request's duplicate key is refused with.
const DUPLICATE: &str = "the key";

/// A JSON value read as serde_json reads one, except that an object naming
/// a key twice is refused (serde_json keeps the last, so
/// `{"op":"list","op":"status"}` would silently be a status request).
pub(super) struct Strict(pub(super) Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if obj.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "{DUPLICATE} {key:?} is given twice"
                )));
            }
            obj.insert(key, value);
        }
        Ok(Value::Object(obj))
    }
}

fn parse_object(mut obj: Map<String, Value>) -> Result<Command, Refusal> {
    match obj.remove("v") {
        None => {}
        Some(Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION) => {}
        Some(other) => {
            return Err(Refusal::new(
                RefusalCode::UnsupportedVersion,
                format!("protocol version {other} is not supported (this daemon speaks v{PROTOCOL_VERSION})"),
            ))
        }
    }
    let op = match obj.remove("op") {
        Some(Value::String(op)) => op,
        Some(other) => return Err(bad(format!("\"op\" must be a string, not {other}"))),
        None => return Err(bad(format!("missing \"op\" (one of {})", Op::list()))),
    };
    let body = Value::Object(obj);
    fn args<T: for<'de> Deserialize<'de>>(op: &str, body: Value) -> Result<T, Refusal> {
        serde_json::from_value(body).map_err(|e| bad(format!("{op}: {e}")))
    }
    let Some(op) = Op::from_name(&op) else {
        return Err(Refusal::new(
            RefusalCode::UnknownOp,
            format!("unknown op {op:?} (one of {})", Op::list()),
        ));
    };
    let name = op.name();
    match op {
        Op::Grant => validate_grant(args(name, body)?).map(Command::Grant),
        Op::Extend => validate_extend(args(name, body)?).map(Command::Extend),
        Op::Touch => {
            let a: TouchArgs = args(name, body)?;
            check_name("touch.session", &a.session, reaper_common::SESSION_NAME_MAX)?;
            Ok(Command::Touch(a.session))
        }
        Op::Revoke => validate_revoke(args(name, body)?).map(Command::Revoke),
        Op::List => selector_args(name, body).map(Command::List),
        Op::Watch => selector_args(name, body).map(Command::Watch),
        Op::Status => {
            let _: EmptyArgs = args(name, body)?;
            Ok(Command::Status)
        }
        Op::Batch => parse_batch(body),
    }
}

/// The most requests one `batch` carries. (The line limit keeps a batch of
/// grants to a few hundred anyway.)
pub const MAX_BATCH: usize = 1024;

/// `batch`: `{"requests": [request, ...]}`, each request an object as it
/// would be on its own line, without `id`. The whole batch is refused,
/// before anything is done, if any request in it cannot be parsed: the
/// refusal names it by index. Parsed, each is done on its own.
fn parse_batch(body: Value) -> Result<Command, Refusal> {
    let Value::Object(mut obj) = body else {
        unreachable!("parse_object passes an object");
    };
    let items = match obj.remove("requests") {
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(bad(format!(
                "batch.requests must be an array of requests, not {other}"
            )))
        }
        None => return Err(bad("batch: missing \"requests\"")),
    };
    if let Some(key) = obj.keys().next() {
        return Err(bad(format!(
            "batch: unknown field {key:?} (a batch has only \"requests\")"
        )));
    }
    if items.len() > MAX_BATCH {
        return Err(bad(format!(
            "batch.requests holds {} requests; at most {MAX_BATCH}",
            items.len()
        )));
    }
    let mut commands = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = |r: Refusal| Refusal::new(r.code, format!("batch.requests[{i}]: {}", r.message));
        let Value::Object(item) = item else {
            return Err(at(bad("must be a request object")));
        };
        let command = parse_object(item).map_err(at)?;
        let op = command.op();
        if !op.mutates() || op == Op::Batch {
            return Err(at(bad(format!(
                "{} cannot be batched (only grant, extend, touch and revoke)",
                op.name()
            ))));
        }
        commands.push(command);
    }
    Ok(Command::Batch(commands))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyArgs {}

/// `list` and `watch`: optional session, user and target filters.
fn selector_args(op: &str, body: Value) -> Result<ListArgs, Refusal> {
    let a: ListArgs = serde_json::from_value(body).map_err(|e| bad(format!("{op}: {e}")))?;
    for (field, v) in [
        ("session", &a.session),
        ("user", &a.user),
        ("target", &a.target),
    ] {
        if let Some(v) = v {
            check_name(&format!("{op}.{field}"), v, usize::MAX)?;
        }
    }
    Ok(a)
}

fn check_name(field: &str, value: &str, max: usize) -> Result<(), Refusal> {
    let refuse = |why: String| Refusal::new(RefusalCode::BadValue, format!("{field}: {why}"));
    if value.is_empty() {
        return Err(refuse("must not be empty".into()));
    }
    if value.len() > max {
        return Err(refuse(format!(
            "{} bytes is longer than the {max} allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(refuse("must not contain control characters".into()));
    }
    if let Some(c) = value.chars().find(|c| is_invisible(*c)) {
        return Err(refuse(format!(
            "must not contain invisible or formatting characters (U+{:04X} found): a name must look like what it is",
            c as u32
        )));
    }
    Ok(())
}

/// Characters that change how text looks without being seen: Unicode's
/// format characters (category Cf: bidi overrides and isolates, zero-width
/// spaces and joiners, the BOM, tag characters), variation selectors, and
/// the blank fillers. `\u{202e}ecila` would otherwise print as "alice".
fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5 | 0x180E | 0x3164 | 0xFEFF
        | 0xFFA0 | 0x0600..=0x0605 | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x180B..=0x180F | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F
        | 0xFE00..=0xFE0F | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF)
}

fn expiry_of(
    op: &str,
    ttl: Option<DurationArg>,
    expires_at: Option<String>,
) -> Result<Option<Expiry>, Refusal> {
    let value = |e: policy::PolicyError| Refusal::new(RefusalCode::BadValue, format!("{op}: {e}"));
    match (ttl, expires_at) {
        (Some(_), Some(_)) => Err(bad(format!("{op}: give ttl or expires_at, not both"))),
        (Some(DurationArg::Seconds(s)), None) => Ok(Some(Expiry::Ttl(
            timefmt::seconds_to_ns(s)
                .map_err(|e| Refusal::new(RefusalCode::BadValue, format!("{op}: ttl {e}")))?,
        ))),
        (Some(DurationArg::Text(t)), None) => Ok(Some(Expiry::Ttl(
            timefmt::parse_duration(&t)
                .map_err(|e| value(policy::PolicyError(format!("ttl: {e}"))))?,
        ))),
        (None, Some(at)) => Ok(Some(Expiry::At(
            timefmt::parse_rfc3339(&at)
                .map_err(|e| value(policy::PolicyError(format!("expires_at: {e}"))))?,
        ))),
        (None, None) => Ok(None),
    }
}

fn parse_addr(field: impl Display, text: &str) -> Result<SocketAddr, Refusal> {
    text.parse().map_err(|_| {
        Refusal::new(
            RefusalCode::BadValue,
            format!("{field}: {text:?} is not an address like 127.0.0.1:5900 or [::1]:5900"),
        )
    })
}

/// The name of a request field in a refusal, such as `grant.expect[3]`:
/// formatted only when a refusal needs it, since a grant names its flows
/// by it and a pipelining proxy sends 100k of them a second.
#[derive(Clone, Copy)]
struct Field<'a> {
    name: &'a str,
    index: Option<usize>,
    part: &'a str,
}

impl<'a> Field<'a> {
    fn named(name: &'a str) -> Field<'a> {
        Field {
            name,
            index: None,
            part: "",
        }
    }

    fn item(name: &'a str, index: usize) -> Field<'a> {
        Field {
            name,
            index: Some(index),
            part: "",
        }
    }

    /// A sub-field: `.local`, `.remote`, ...
    fn part(self, part: &'a str) -> Field<'a> {
        Field { part, ..self }
    }
}

impl Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)?;
        if let Some(i) = self.index {
            write!(f, "[{i}]")?;
        }
        f.write_str(self.part)
    }
}

fn flow_ref(field: Field<'_>, spec: FlowSpec, allow_fd: bool) -> Result<FlowRef, Refusal> {
    match spec {
        FlowSpec {
            local: Some(l),
            remote: Some(r),
            fd: None,
            netns,
        } => {
            let local = parse_addr(field.part(".local"), &l)?;
            let remote = parse_addr(field.part(".remote"), &r)?;
            if local.is_ipv4() != remote.is_ipv4() {
                return Err(Refusal::new(
                    RefusalCode::BadValue,
                    format!("{field}: local and remote must both be IPv4 or both IPv6"),
                ));
            }
            if let Some(n) = &netns {
                n.check(&field.part(".netns").to_string())?;
            }
            Ok(FlowRef::Addrs {
                local,
                remote,
                netns,
            })
        }
        FlowSpec {
            local: None,
            remote: None,
            fd: Some(fd),
            netns: None,
        } if allow_fd => {
            if fd as usize >= MAX_FDS_PER_REQUEST {
                return Err(Refusal::new(
                    RefusalCode::BadFd,
                    format!(
                        "{field}.fd: {fd} is beyond the {MAX_FDS_PER_REQUEST} descriptors a request may carry"
                    ),
                ));
            }
            Ok(FlowRef::Fd(fd as usize))
        }
        FlowSpec {
            fd: Some(_),
            netns: Some(_),
            ..
        } => Err(bad(format!(
            "{field}: a descriptor already says which namespace its socket is in; drop \"netns\""
        ))),
        _ if allow_fd => Err(bad(format!(
            "{field}: give either \"fd\" or both \"local\" and \"remote\""
        ))),
        _ => Err(bad(format!("{field}: give both \"local\" and \"remote\""))),
    }
}

pub(super) fn validate_grant(a: GrantArgs) -> Result<GrantRequest, Refusal> {
    use reaper_common::{SESSION_NAME_MAX, TARGET_NAME_MAX, USER_NAME_MAX};
    check_name("grant.session", &a.session, SESSION_NAME_MAX)?;
    check_name("grant.user", &a.user, USER_NAME_MAX)?;
    check_name("grant.target", &a.target, TARGET_NAME_MAX)?;
    if let Some(class) = &a.class {
        check_name("grant.class", class, reaper_common::CLASS_NAME_MAX)?;
    }
    if a.flows.is_empty() && a.expect.is_empty() {
        return Err(bad("grant: name at least one flow in flows or expect"));
    }
    if a.flows.len() + a.expect.len() > 64 {
        return Err(bad(
            "grant: at most 64 flows (flows and expect together) per request",
        ));
    }
    let flows = a
        .flows
        .into_iter()
        .enumerate()
        .map(|(i, f)| flow_ref(Field::item("grant.flows", i), f, true))
        .collect::<Result<Vec<_>, _>>()?;
    let expect = a
        .expect
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let field = Field::item("grant.expect", i);
            match flow_ref(field, f, false)? {
                FlowRef::Addrs { local, remote, .. } if local.port() == 0 && remote.port() == 0 => {
                    Err(Refusal::new(
                        RefusalCode::BadValue,
                        format!("{field}: at most one of the two ports may be 0 (any)"),
                    ))
                }
                FlowRef::Addrs {
                    local,
                    remote,
                    netns,
                } => Ok((local, remote, netns)),
                FlowRef::Fd(_) => unreachable!("fds are refused for expect"),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let idle_timeout_ns = match a.idle_timeout {
        None => None,
        Some(DurationArg::Seconds(s)) => Some(timefmt::seconds_to_ns(s).map_err(|e| {
            Refusal::new(RefusalCode::BadValue, format!("grant: idle_timeout {e}"))
        })?),
        Some(DurationArg::Text(t)) => Some(timefmt::parse_duration(&t).map_err(|e| {
            Refusal::new(RefusalCode::BadValue, format!("grant: idle_timeout: {e}"))
        })?),
    };
    Ok(GrantRequest {
        asked: Asked {
            expiry: expiry_of("grant", a.ttl, a.expires_at)?,
            idle_timeout_ns,
            idle_direction: a.idle_direction,
        },
        session: a.session,
        user: a.user,
        target: a.target,
        class: a.class,
        flows,
        expect,
    })
}

fn validate_extend(a: ExtendArgs) -> Result<ExtendRequest, Refusal> {
    check_name(
        "extend.session",
        &a.session,
        reaper_common::SESSION_NAME_MAX,
    )?;
    let expiry = expiry_of("extend", a.ttl, a.expires_at)?
        .ok_or_else(|| bad("extend: give ttl or expires_at"))?;
    Ok(ExtendRequest {
        session: a.session,
        expiry,
    })
}

fn validate_revoke(a: RevokeArgs) -> Result<RevokeSelector, Refusal> {
    let given = [
        a.session.is_some(),
        a.class.is_some(),
        a.user.is_some(),
        a.target.is_some(),
        a.flow.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given != 1 {
        return Err(bad(
            "revoke: give exactly one of session, class, user, target, flow",
        ));
    }
    let name =
        |field: &str, v: String| check_name(&format!("revoke.{field}"), &v, usize::MAX).map(|_| v);
    Ok(match a {
        RevokeArgs {
            session: Some(s), ..
        } => RevokeSelector::Session(name("session", s)?),
        RevokeArgs { class: Some(c), .. } => RevokeSelector::Class(name("class", c)?),
        RevokeArgs { user: Some(u), .. } => RevokeSelector::User(name("user", u)?),
        RevokeArgs {
            target: Some(t), ..
        } => RevokeSelector::Target(name("target", t)?),
        RevokeArgs { flow: Some(f), .. } => {
            match flow_ref(Field::named("revoke.flow"), f, false)? {
                FlowRef::Addrs {
                    local,
                    remote,
                    netns,
                } => RevokeSelector::Flow {
                    local,
                    remote,
                    netns,
                },
                FlowRef::Fd(_) => unreachable!("fds are refused for revoke"),
            }
        }
        _ => unreachable!("exactly one selector was counted"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    #[test]
    fn flow_refusals_name_the_field_they_are_about() {
        let cases = [
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"expect":[{"local":"127.0.0.1:5900","remote":"127.0.0.1:0"},{"local":"127.0.0.1:5900","remote":"nowhere"}]}"#,
                "grant.expect[1].remote: \"nowhere\" is not an address",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"flows":[{"local":"127.0.0.1:5900","remote":"[::1]:4"}]}"#,
                "grant.flows[0]: local and remote must both be IPv4 or both IPv6",
            ),
            (
                r#"{"op":"revoke","flow":{"local":"127.0.0.1:x","remote":"127.0.0.1:3"}}"#,
                "revoke.flow.local: \"127.0.0.1:x\" is not an address",
            ),
        ];
        for (line, says) in cases {
            let r = refusal(line);
            assert!(r.message.starts_with(says), "{line}: {r}");
        }
    }

    #[test]
    fn a_key_given_twice_is_refused_at_any_depth() {
        // Before, serde_json kept the last value: this was a status request.
        let r = refusal(r#"{"op":"list","op":"status"}"#);
        assert_eq!(r.code, RefusalCode::BadRequest, "{r}");
        assert!(r.message.contains("\"op\" is given twice"), "{r}");
        let r = refusal(
            r#"{"op":"revoke","flow":{"local":"127.0.0.1:1","local":"127.0.0.1:2","remote":"127.0.0.1:3"}}"#,
        );
        assert!(r.message.contains("\"local\" is given twice"), "{r}");
        assert!(parse_request(br#"{"op":"list","user":"a","id":[1,{"x":null}]}"#).is_ok());
    }

    #[test]
    fn names_with_invisible_characters_are_refused() {
        for name in [
            "\u{202e}ecila",
            "al\u{200b}ice",
            "alice\u{feff}",
            "a\u{2066}b",
            "x\u{e0041}",
        ] {
            let line = serde_json::json!({"op": "grant", "session": "s", "user": name,
                "target": "t", "ttl": 5, "flows": [{"local": "127.0.0.1:1", "remote": "127.0.0.1:2"}]});
            let r = refusal(&line.to_string());
            assert_eq!(r.code, RefusalCode::BadValue, "{name:?}: {r}");
            assert!(
                r.message.contains("grant.user") && r.message.contains("U+"),
                "{r}"
            );
        }
        for name in ["Zoë", "李雷", "o'brien", "vm-7/console"] {
            let line = serde_json::json!({"op": "list", "user": name});
            assert!(
                parse_request(line.to_string().as_bytes()).is_ok(),
                "{name:?}"
            );
        }
    }

    fn refusal(line: &str) -> Refusal {
        parse_request(line.as_bytes()).unwrap_err().1
    }

    #[test]
    fn a_batch_parses_each_request_or_refuses_naming_the_bad_one() {
        let r = parse_request(
            br#"{"v":1,"id":3,"op":"batch","requests":[
                {"op":"grant","session":"s1","user":"alice","target":"vm-1","ttl":"1m",
                 "expect":[{"local":"127.0.0.1:5900","remote":"127.0.0.1:0"}]},
                {"op":"extend","session":"s1","ttl":"2m"},
                {"op":"revoke","user":"bob"}]}"#,
        )
        .unwrap();
        let Command::Batch(items) = r.command else {
            panic!("not a batch: {r:?}")
        };
        let ops: Vec<Op> = items.iter().map(Command::op).collect();
        assert_eq!(ops, [Op::Grant, Op::Extend, Op::Revoke]);
        for (line, names) in [
            (
                r#"{"op":"batch","requests":[{"op":"touch","session":"s"},{"op":"grant","session":"s"}]}"#,
                "batch.requests[1]: grant: missing field `user`",
            ),
            (
                r#"{"op":"batch","requests":[{"op":"list"}]}"#,
                "batch.requests[0]: list cannot be batched",
            ),
            (
                r#"{"op":"batch","requests":[{"op":"batch","requests":[]}]}"#,
                "batch.requests[0]: batch cannot be batched",
            ),
            (
                r#"{"op":"batch","requests":[{"op":"touch","session":"s","id":1}]}"#,
                "batch.requests[0]: touch: unknown field `id`",
            ),
            (
                r#"{"op":"batch","requests":[7]}"#,
                "batch.requests[0]: must be a request object",
            ),
            (
                r#"{"op":"batch","requests":{}}"#,
                "batch.requests must be an array",
            ),
            (r#"{"op":"batch"}"#, "batch: missing \"requests\""),
            (
                r#"{"op":"batch","requests":[],"x":1}"#,
                "batch: unknown field \"x\"",
            ),
        ] {
            let r = refusal(line);
            assert!(r.message.starts_with(names), "{line}: {r}");
        }
        let many = format!(
            r#"{{"op":"batch","requests":[{}]}}"#,
            vec![r#"{"op":"touch","session":"s"}"#; MAX_BATCH + 1].join(",")
        );
        assert!(refusal(&many).message.contains("at most 1024"));
    }

    #[test]
    fn grant_by_addrs_and_fd() {
        let r = parse_request(
            br#"{"v":1,"id":7,"op":"grant","session":"s1","user":"alice","target":"vm-1",
                "ttl":"300ms","flows":[{"local":"127.0.0.1:5900","remote":"127.0.0.1:40000"},{"fd":0}]}"#,
        )
        .unwrap();
        assert_eq!(r.id, Some(7.into()));
        let Command::Grant(g) = r.command else {
            panic!()
        };
        assert_eq!(g.asked.expiry, Some(Expiry::Ttl(300 * timefmt::NS_PER_MS)));
        assert_eq!(g.flows[1], FlowRef::Fd(0));
        assert!(matches!(g.flows[0], FlowRef::Addrs { .. }));
    }

    #[test]
    fn ttl_as_seconds_and_expires_at() {
        let Command::Extend(e) = parse_request(br#"{"op":"extend","session":"s","ttl":1.5}"#)
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(e.expiry, Expiry::Ttl(1_500 * timefmt::NS_PER_MS));
        let Command::Extend(e) =
            parse_request(br#"{"op":"extend","session":"s","expires_at":"2026-11-22T10:00:00Z"}"#)
                .unwrap()
                .command
        else {
            panic!()
        };
        assert!(matches!(e.expiry, Expiry::At(_)));
    }

    #[test]
    fn wire_ops_round_trip() {
        let op = WireOp::Grant(GrantArgs {
            session: "s".into(),
            user: "u".into(),
            target: "t".into(),
            ttl: Some(DurationArg::Text("5s".into())),
            expires_at: None,
            flows: vec![FlowSpec {
                fd: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        });
        let r = parse_request(op.to_line(Some("x".into())).as_bytes()).unwrap();
        assert_eq!(r.id, Some("x".into()));
        assert!(matches!(r.command, Command::Grant(_)));
        for op in [WireOp::Status, WireOp::List(ListArgs::default())] {
            parse_request(op.to_line(None).as_bytes()).unwrap();
        }
    }

    /// Every malformed request gets its own specific refusal.
    #[test]
    fn malformed_requests_are_refused_specifically() {
        use RefusalCode::*;
        let cases: &[(&str, RefusalCode, &str)] = &[
            ("not json", BadJson, "not valid JSON"),
            ("[1,2]", BadJson, "JSON object"),
            (r#"{"v":1}"#, BadRequest, "missing \"op\""),
            (r#"{"op":5}"#, BadRequest, "must be a string"),
            (r#"{"op":"explode"}"#, UnknownOp, "explode"),
            (r#"{"v":2,"op":"status"}"#, UnsupportedVersion, "version 2"),
            (
                r#"{"op":"status","verbose":true}"#,
                BadRequest,
                "unknown field `verbose`",
            ),
            (
                r#"{"op":"grant","user":"u","target":"t","ttl":5,"flows":[{"fd":0}]}"#,
                BadRequest,
                "missing field `session`",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"flows":[]}"#,
                BadRequest,
                "at least one flow in flows or expect",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":-5,"flows":[{"fd":0}]}"#,
                BadValue,
                "negative",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":"soon","flows":[{"fd":0}]}"#,
                BadValue,
                "ttl",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"expires_at":"2026-01-01T00:00:00Z","flows":[{"fd":0}]}"#,
                BadRequest,
                "not both",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","expires_at":"tomorrow","flows":[{"fd":0}]}"#,
                BadValue,
                "expires_at",
            ),
            (
                r#"{"op":"grant","session":"","user":"u","target":"t","ttl":5,"flows":[{"fd":0}]}"#,
                BadValue,
                "grant.session: must not be empty",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u\n","target":"t","ttl":5,"flows":[{"fd":0}]}"#,
                BadValue,
                "control characters",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"flows":[{"local":"1.2.3.4:5"}]}"#,
                BadRequest,
                "flows[0]",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"flows":[{"local":"nowhere","remote":"1.2.3.4:5"}]}"#,
                BadValue,
                "flows[0].local",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"flows":[{"local":"[::1]:5","remote":"1.2.3.4:5"}]}"#,
                BadValue,
                "both be IPv4",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"flows":[{"fd":99}]}"#,
                BadFd,
                "fd",
            ),
            (
                r#"{"op":"grant","session":"s","user":"u","target":"t","ttl":5,"flows":[{"fd":0,"port":1}]}"#,
                BadRequest,
                "unknown field `port`",
            ),
            (
                r#"{"op":"extend","session":"s"}"#,
                BadRequest,
                "give ttl or expires_at",
            ),
            (r#"{"op":"revoke"}"#, BadRequest, "exactly one"),
            (
                r#"{"op":"revoke","user":"a","session":"b"}"#,
                BadRequest,
                "exactly one",
            ),
            (
                r#"{"op":"revoke","flow":{"fd":1}}"#,
                BadRequest,
                "revoke.flow",
            ),
        ];
        for (line, code, needle) in cases {
            let r = refusal(line);
            assert_eq!(r.code, *code, "{line} -> {r}");
            assert!(r.message.contains(needle), "{line} -> {r}");
        }
        let long = format!(
            r#"{{"op":"grant","session":"{}","user":"u","target":"t","ttl":5,"flows":[{{"fd":0}}]}}"#,
            "s".repeat(200)
        );
        assert_eq!(refusal(&long).code, RefusalCode::BadValue);
    }

    #[test]
    fn refusals_keep_the_request_id() {
        let (id, r) = parse_request(br#"{"id":"abc","op":"nope"}"#).unwrap_err();
        assert_eq!(id, Some("abc".into()));
        assert_eq!(r.code, RefusalCode::UnknownOp);
        let line = Response::refused(id, r).to_line();
        assert!(line.ends_with('\n'));
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.error.unwrap().code, RefusalCode::UnknownOp);
    }
}
