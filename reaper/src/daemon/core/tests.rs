//! The core's rules, checked without root over `FakeKernel`: the write
//! order every operation promises, the join / tighten / extend rules, the
//! limits, adoption, the wall clock, and that a refused request changes
//! nothing.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use reaper_common::{FlowTuple, Forwarded, Label, PendingGrant, SessionRecord};

use super::fake::{FakeKernel, Write, OWN_NETNS};
use super::fleet::Applying;
use super::model::{
    AuditSink, Change, ChangeKind, Code, Kill, KillResult, Outcome, Reason, Refused,
};
use super::{Caller, Core};
use super::{HeldPlace, Publish};
use crate::config::Config;
use crate::fleet::record::{Revocation, Selector};
use crate::fleet::session::{FleetFlow, FleetSession, NodeRecord};
use crate::kernel::SocketInfo;
use crate::protocol::parse_request;
use crate::timefmt::{NS_PER_MS, NS_PER_SEC};
use crate::tuple;

const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 0,
};
const PROXY: Caller = Caller {
    uid: 1000,
    gid: 1000,
    pid: 0,
};
const OTHER_PROXY: Caller = Caller {
    uid: 1001,
    gid: 1001,
    pid: 0,
};
const OPERATOR: Caller = Caller {
    uid: 2000,
    gid: 50,
    pid: 0,
};

/// The audit trail: kills, and (kind, requester, session) per change.
type Changes = Arc<Mutex<Vec<(ChangeKind, Caller, String)>>>;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<Kill>>>, Changes);

impl AuditSink for Captured {
    fn record(&mut self, kill: &Kill) {
        self.0.lock().unwrap().push(kill.clone());
    }

    fn change(&mut self, change: &Change<'_>) {
        self.1
            .lock()
            .unwrap()
            .push((change.kind, change.by, change.session.name.clone()));
    }
}

impl Captured {
    fn take(&self) -> Vec<Kill> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    fn take_changes(&self) -> Vec<(ChangeKind, Caller, String)> {
        std::mem::take(&mut *self.1.lock().unwrap())
    }
}

struct Harness {
    core: Core<FakeKernel>,
    audit: Captured,
}

const CONFIG: &str = r#"
max_pending = 16
max_sessions = 16
[access]
uids = [1000, 1001]
operator_gids = [50]
[classes.default]
ttl = "10m"
[classes.console]
max_ttl = "1h"
max_per_target = 1
[classes.shared]
max_per_target = 1
on_limit = "evict-oldest"
[classes.notebook]
idle_timeout = "10m"
idle_direction = "input"
"#;

fn harness() -> Harness {
    harness_with(CONFIG)
}

fn harness_with(config: &str) -> Harness {
    let audit = Captured::default();
    let config = Config::from_toml(config).expect("test config");
    let mut core = Core::new(FakeKernel::new(), Box::new(audit.clone()), config);
    core.adopt();
    Harness { core, audit }
}

impl Harness {
    fn fake(&mut self) -> &mut FakeKernel {
        &mut self.core.kernel
    }

    /// A tracked connection, known to the core through its event.
    fn connect(&mut self, cookie: u64, local: &str, remote: &str) {
        let event = self.fake().connect(cookie, local, remote, true, false);
        self.core.apply_events(&[event]);
    }

    fn ask(&mut self, caller: Caller, line: &str) -> Result<Outcome, Refused> {
        let request = parse_request(line.as_bytes()).expect("test request parses");
        let outcome = self.core.handle(request.command, caller, &[]);
        // As the server does before it answers.
        self.core.settle_requests();
        outcome
    }

    fn ok(&mut self, line: &str) -> Outcome {
        self.ask(ROOT, line).expect("request succeeds")
    }

    fn refused(&mut self, caller: Caller, line: &str) -> Refused {
        self.ask(caller, line).expect_err("request is refused")
    }

    /// Everything the kernel holds, to compare before and after.
    fn kernel_state(&self) -> String {
        let k = &self.core.kernel;
        let mut pending: Vec<String> = k.pending.iter().map(|e| format!("{e:?}")).collect();
        pending.sort();
        let mut grants: Vec<String> = k
            .forwarded_grants
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        grants.sort();
        format!("{:?}\n{:?}\n{pending:?}\n{grants:?}", k.flows, k.sessions)
    }

    fn sessions(&mut self) -> Vec<String> {
        match self.ok(r#"{"op":"list"}"#) {
            Outcome::Listed(l) => l.sessions.into_iter().map(|s| s.name).collect(),
            other => panic!("list answered {other:?}"),
        }
    }

    /// Lets `ns` pass and runs what fell due, as the timer would.
    fn pass(&mut self, ns: u64) {
        self.fake().advance(ns);
        self.core.run_due();
    }

    fn mark(&self) -> usize {
        self.core.kernel.log.len()
    }

    fn writes_since(&self, mark: usize) -> Vec<Write> {
        self.core.kernel.writes_since(mark).to_vec()
    }
}

fn grant_line(
    session: &str,
    user: &str,
    target: &str,
    extra: &str,
    flows: &[(&str, &str)],
) -> String {
    let flows: Vec<String> = flows
        .iter()
        .map(|(l, r)| format!(r#"{{"local":"{l}","remote":"{r}"}}"#))
        .collect();
    format!(
        r#"{{"op":"grant","session":"{session}","user":"{user}","target":"{target}"{extra},"flows":[{}]}}"#,
        flows.join(",")
    )
}

const A: (&str, &str) = ("127.0.0.1:5900", "127.0.0.1:40001");
const B: (&str, &str) = ("127.0.0.1:5900", "127.0.0.1:40002");

fn index_of(writes: &[Write], pred: impl Fn(&Write) -> bool) -> usize {
    writes
        .iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no such write in {writes:?}"))
}

// --- write order

#[test]
fn grant_writes_the_session_record_before_any_flow() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    let mark = h.mark();
    h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]));
    let w = h.writes_since(mark);
    let session = index_of(&w, |w| matches!(w, Write::Session { .. }));
    let flow = index_of(
        &w,
        |w| matches!(w, Write::Flow { cookie: 1, session, .. } if *session != 0),
    );
    let publish = index_of(&w, |w| matches!(w, Write::Publish));
    assert!(session < flow && flow < publish, "order was {w:?}");
}

#[test]
fn a_batch_does_each_request_on_its_own_and_settles_once() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    let mark = h.mark();
    let line = format!(
        r#"{{"op":"batch","requests":[{},{},{}]}}"#,
        grant_line("s1", "alice", "vm-1", "", &[A]),
        grant_line("s2", "bob", "vm-2", "", &[B]),
        // Refused: B is s2's now.
        grant_line("s3", "carol", "vm-3", "", &[B]),
    );
    let Outcome::Batch(items) = h.ok(&line) else {
        panic!("not a batch outcome")
    };
    let ok: Vec<bool> = items.iter().map(|(_, r)| r.is_ok()).collect();
    assert_eq!(ok, [true, true, false], "{items:?}");
    let (_, Err(conflict)) = &items[2] else {
        unreachable!()
    };
    assert_eq!(conflict.code, Code::FlowConflict, "{conflict:?}");
    assert_eq!(h.sessions(), ["s1", "s2"]);
    let publishes = h
        .writes_since(mark)
        .iter()
        .filter(|w| matches!(w, Write::Publish))
        .count();
    assert_eq!(publishes, 1, "one settle for the batch");
}

#[test]
fn a_due_deadline_is_run_before_the_next_request_is_answered() {
    // The timer's wake-up waits behind requests the daemon is busy with;
    // each request (and each of a batch's) runs what fell due meanwhile.
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"10s""#, &[A]));
    h.ok(&grant_line("s2", "bob", "vm-2", r#","ttl":"1h""#, &[B]));
    h.fake().advance(10 * NS_PER_SEC);
    assert_eq!(h.sessions(), ["s2"], "the list that came first saw it gone");
    let kills = h.audit.take();
    assert_eq!(kills.len(), 1, "{kills:?}");
    assert_eq!((kills[0].cookie, kills[0].reason), (1, Reason::Expired));

    h.connect(3, A.0, "127.0.0.1:40003");
    h.ok(&grant_line(
        "s3",
        "carol",
        "vm-3",
        r#","ttl":"10s""#,
        &[(A.0, "127.0.0.1:40003")],
    ));
    h.fake().advance(10 * NS_PER_SEC);
    let batch = r#"{"op":"batch","requests":[{"op":"touch","session":"s2"},{"op":"touch","session":"s3"}]}"#;
    let Outcome::Batch(answers) = h.ok(batch) else {
        panic!("a batch answers Batch")
    };
    assert!(answers[0].1.is_ok());
    assert_eq!(
        answers[1].1.as_ref().unwrap_err().code,
        Code::NoSuchSession,
        "s3 expired after the first request of the batch"
    );
    assert_eq!(h.audit.take()[0].cookie, 3);
}

#[test]
fn deadlines_are_killed_urgent_and_requests_are_not() {
    // The deadlines' run asks for real-time priority, whether the timer or
    // a request ran it; a revoke (a caller's work) does not.
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"10s""#, &[A]));
    h.ok(&grant_line("s2", "bob", "vm-2", r#","ttl":"1h""#, &[B]));
    h.fake().advance(10 * NS_PER_SEC);
    h.sessions();
    assert_eq!(h.fake().urgent_destroys, 1, "the expiry destroyed urgent");
    assert!(!h.fake().urgent, "and the request after it is not urgent");
    h.ok(r#"{"op":"revoke","user":"bob"}"#);
    assert_eq!(h.audit.take().len(), 2, "both killed");
    assert_eq!(
        h.fake().urgent_destroys,
        1,
        "the revoke's destroy is not urgent"
    );
}

#[test]
fn kill_writes_the_deadline_then_destroys_then_removes_the_session() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line(
        "s1",
        "alice",
        "vm-1",
        r#","ttl":"10s""#,
        &[A, B],
    ));
    let mark = h.mark();
    h.pass(10 * NS_PER_SEC);
    let w = h.writes_since(mark);
    // At expiry the kernel already holds each flow's deadline (the drop is
    // in force): the destroy comes first, the session record goes last.
    let now = h.core.kernel.now.boot_ns;
    assert!(h.core.kernel.sessions.is_empty());
    let destroy = index_of(&w, |w| matches!(w, Write::Destroy(c) if c == &vec![1, 2]));
    let removed = index_of(&w, |w| matches!(w, Write::RemoveSession(_)));
    assert!(destroy < removed, "{w:?}");
    assert!(!w
        .iter()
        .any(|w| matches!(w, Write::Flow { deadline, .. } if *deadline > now)));
    assert_eq!(
        w.iter().filter(|w| matches!(w, Write::Destroy(_))).count(),
        1,
        "one batched destroy: {w:?}"
    );
    let kills = h.audit.take();
    assert_eq!(kills.len(), 2);
    assert!(kills
        .iter()
        .all(|k| k.reason == Reason::Expired && k.result == KillResult::Destroyed));
    assert!(kills
        .iter()
        .all(|k| k.owner.session == "s1" && k.owner.user == "alice"));
    assert!(h.sessions().is_empty());
}

#[test]
fn revoke_keeps_the_kill_order_and_answers_with_the_audited_records() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]));
    let mark = h.mark();
    let Outcome::Revoked(r) = h.ok(r#"{"op":"revoke","user":"alice"}"#) else {
        panic!("revoke answers Revoked");
    };
    let w = h.writes_since(mark);
    let flow = index_of(&w, |w| matches!(w, Write::Flow { cookie: 1, .. }));
    let destroy = index_of(&w, |w| matches!(w, Write::Destroy(_)));
    let removed = index_of(&w, |w| matches!(w, Write::RemoveSession(_)));
    assert!(flow < destroy && destroy < removed, "{w:?}");
    assert_eq!(r.sessions, vec!["s1".to_string()]);
    assert_eq!(
        r.kills,
        h.audit.take(),
        "the response and the audit share one record"
    );
}

#[test]
fn the_timer_is_armed_for_the_earliest_deadline() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    let start = h.core.kernel.now.boot_ns;
    h.ok(&grant_line(
        "late",
        "alice",
        "vm-1",
        r#","ttl":"10m""#,
        &[A],
    ));
    assert_eq!(h.core.kernel.timer, Some(start + 600 * NS_PER_SEC));
    h.ok(&grant_line("early", "bob", "vm-2", r#","ttl":"1m""#, &[B]));
    assert_eq!(h.core.kernel.timer, Some(start + 60 * NS_PER_SEC));
    h.pass(60 * NS_PER_SEC);
    assert_eq!(h.core.kernel.timer, Some(start + 600 * NS_PER_SEC));
}

// --- join, tighten, extend

#[test]
fn a_joining_grant_tightens_the_deadline_and_never_lengthens_it() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    let start = h.core.kernel.now.boot_ns;
    h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]));
    let Outcome::Granted(g) = h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"1h""#, &[B]))
    else {
        panic!("grant answers Granted")
    };
    assert!(!g.created);
    assert_eq!(
        g.session.deadline_boot_ns,
        start + 600 * NS_PER_SEC,
        "not lengthened"
    );
    assert_eq!(g.session.flows.len(), 2);
    let Outcome::Granted(g) = h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"1m""#, &[A]))
    else {
        panic!("grant answers Granted")
    };
    assert_eq!(
        g.session.deadline_boot_ns,
        start + 60 * NS_PER_SEC,
        "tightened"
    );
    for cookie in [1, 2] {
        assert_eq!(
            h.core.kernel.flows[&cookie].deadline_ns,
            start + 60 * NS_PER_SEC
        );
    }
}

#[test]
fn extend_moves_the_deadline_later_only() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    let start = h.core.kernel.now.boot_ns;
    h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]));
    h.ok(r#"{"op":"extend","session":"s1","ttl":"30m"}"#);
    assert_eq!(
        h.core.kernel.flows[&1].deadline_ns,
        start + 1800 * NS_PER_SEC
    );
    assert_eq!(
        h.core.kernel.sessions[&1].deadline_ns,
        start + 1800 * NS_PER_SEC
    );
    let before = h.kernel_state();
    let r = h.refused(ROOT, r#"{"op":"extend","session":"s1","ttl":"1m"}"#);
    assert_eq!(r.code, Code::DeadlineRefused);
    assert_eq!(h.kernel_state(), before);
}

#[test]
fn touch_restarts_the_idle_clock() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.ok(&grant_line(
        "nb",
        "alice",
        "lab",
        r#","class":"notebook","ttl":"1h""#,
        &[A],
    ));
    // The user's input stopped 9 minutes ago.
    h.fake().activity.get_mut(&1).unwrap().last_recv_ago_ms = 9 * 60 * 1000;
    h.pass(9 * 60 * NS_PER_SEC);
    assert_eq!(
        h.sessions(),
        vec!["nb".to_string()],
        "idle for 9 of 10 minutes"
    );
    h.ok(r#"{"op":"touch","session":"nb"}"#);
    h.fake().activity.get_mut(&1).unwrap().last_recv_ago_ms = 10 * 60 * 1000;
    h.pass(2 * 60 * NS_PER_SEC);
    assert_eq!(
        h.sessions(),
        vec!["nb".to_string()],
        "the touch counts as input"
    );
    // No input since well before the touch; activity is credited a jiffy
    // late (policy::JIFFY_SLACK_MS).
    h.fake().activity.get_mut(&1).unwrap().last_recv_ago_ms = 60 * 60 * 1000;
    h.pass(9 * 60 * NS_PER_SEC + 20 * NS_PER_MS);
    assert!(
        h.sessions().is_empty(),
        "10 minutes after the touch it is idle"
    );
    let kills = h.audit.take();
    assert_eq!(kills.len(), 1);
    assert_eq!(kills[0].reason, Reason::Idle);
}

// --- limits

#[test]
fn reject_new_kills_the_refused_flows_and_names_who_was_refused() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line(
        "first",
        "alice",
        "vm-1",
        r#","class":"console","ttl":"10m""#,
        &[A],
    ));
    let r = h.refused(
        ROOT,
        &grant_line(
            "second",
            "bob",
            "vm-1",
            r#","class":"console","ttl":"10m""#,
            &[B],
        ),
    );
    assert_eq!(r.code, Code::LimitReached, "{r:?}");
    assert!(r.message.contains("1 flow(s)"), "{}", r.message);
    assert_eq!(h.sessions(), vec!["first".to_string()], "the holder stays");
    let kills = h.audit.take();
    assert_eq!(kills.len(), 1);
    assert_eq!(kills[0].cookie, 2);
    assert_eq!(kills[0].reason, Reason::Rejected);
    assert_eq!(kills[0].by, Some(ROOT));
    assert_eq!(
        (
            kills[0].owner.session.as_str(),
            kills[0].owner.user.as_str(),
            kills[0].owner.target.as_str()
        ),
        ("second", "bob", "vm-1"),
        "the audit event names the refused grant"
    );
    assert!(h.core.kernel.flows.contains_key(&1));
}

#[test]
fn evict_oldest_ends_the_holder_for_the_newcomer() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line(
        "old",
        "alice",
        "vm-1",
        r#","class":"shared","ttl":"10m""#,
        &[A],
    ));
    h.fake().advance(NS_PER_SEC);
    h.ok(&grant_line(
        "new",
        "bob",
        "vm-1",
        r#","class":"shared","ttl":"10m""#,
        &[B],
    ));
    assert_eq!(h.sessions(), vec!["new".to_string()]);
    let kills = h.audit.take();
    assert_eq!(kills.len(), 1);
    assert_eq!((kills[0].reason, kills[0].cookie), (Reason::Evicted, 1));
    assert_eq!(kills[0].owner.session, "old");
}

// --- adoption, events, wall clock

#[test]
fn adoption_repairs_a_half_written_state() {
    let audit = Captured::default();
    let mut fake = FakeKernel::new();
    let now = fake.now.boot_ns;
    // A flow whose session record is gone (a kill crashed midway).
    let tracked = fake.connect(1, A.0, A.1, true, false);
    let mut orphan = tracked.flow;
    orphan.session = 7;
    orphan.deadline_ns = now + 5 * NS_PER_SEC;
    fake.flows.insert(1, orphan);
    // A record with an unreadable label, and a pre-registration of a
    // session that does not exist (and did not just end: its deadline is
    // still to come).
    let bad = SessionRecord {
        deadline_ns: now + NS_PER_SEC,
        name: Label {
            len: 200,
            ..Label::default()
        },
        ..SessionRecord::default()
    };
    fake.sessions.insert(9, bad);
    let key = tuple::tuple_of(B.0.parse().unwrap(), B.1.parse().unwrap());
    fake.pending.insert(
        key,
        PendingGrant {
            deadline_ns: now + NS_PER_SEC,
            session: 8,
            netns_cookie: OWN_NETNS,
        },
    );
    let config = Config::from_toml(CONFIG).unwrap();
    let mut core = Core::new(fake, Box::new(audit.clone()), config);
    core.adopt();
    let k = &core.kernel;
    assert!(
        !k.sessions.contains_key(&9),
        "the unreadable record is dropped"
    );
    assert!(
        k.pending.is_empty(),
        "the ownerless pre-registration is dropped"
    );
    let stand_in = k
        .sessions
        .get(&7)
        .expect("a stand-in session for the orphan");
    assert_eq!(
        stand_in.deadline_ns,
        now + 5 * NS_PER_SEC,
        "the flow keeps its deadline"
    );
    assert_eq!(stand_in.name.as_str(), Some("orphan-7"));
    assert_eq!(k.timer, Some(now + 5 * NS_PER_SEC));
    core.kernel.advance(5 * NS_PER_SEC);
    core.run_due();
    let kills = audit.take();
    assert_eq!(kills.len(), 1);
    assert_eq!((kills[0].cookie, kills[0].reason), (1, Reason::Expired));
}

#[test]
fn a_pre_registered_connection_takes_its_grant_when_it_comes() {
    let mut h = harness();
    h.ok(r#"{"op":"grant","session":"s1","user":"alice","target":"vm-1","ttl":"10m","expect":[{"local":"127.0.0.1:0","remote":"127.0.0.1:5900"}]}"#);
    assert_eq!(h.core.kernel.pending.len(), 2, "as given and v4-mapped");
    let event = h
        .fake()
        .connect(5, "127.0.0.1:41000", "127.0.0.1:5900", false, false);
    assert_eq!(event.flow.session, 1, "the kernel tagged it");
    h.core.apply_events(&[event]);
    assert!(
        h.core.kernel.pending.is_empty(),
        "every key of the item is gone"
    );
    assert_eq!(h.core.index.pending_keys(), 0);
    let Outcome::Listed(l) = h.ok(r#"{"op":"list"}"#) else {
        panic!()
    };
    assert_eq!(l.sessions[0].flows.len(), 1);
    assert_eq!(l.sessions[0].expecting, 0);
}

/// A server with a full accept queue finishes a handshake a second or more
/// after the client thinks itself connected: a connection its session
/// expected that comes after the session ended dies at once, audited as
/// its session's, for the reason the session ended.
#[test]
fn a_connection_expected_by_an_ended_session_dies_when_it_comes() {
    let mut h = harness();
    h.ok(r#"{"op":"grant","session":"s1","user":"alice","target":"vm-1","ttl":"10s","expect":[{"local":"127.0.0.1:5900","remote":"127.0.0.1:41000"}]}"#);
    h.pass(10 * NS_PER_SEC);
    assert!(h.sessions().is_empty());
    assert_eq!(
        h.core.kernel.pending.len(),
        2,
        "both keys stay, at the deadline"
    );
    let now = h.core.kernel.now.boot_ns;
    assert!(h.core.kernel.pending.values().all(|g| g.deadline_ns <= now));
    assert_eq!(
        h.core.index.pending_keys(),
        2,
        "and still count against max_pending"
    );
    h.pass(NS_PER_SEC);
    let event = h
        .fake()
        .connect(5, "127.0.0.1:5900", "127.0.0.1:41000", true, false);
    assert_eq!(event.flow.session, 1, "the kernel tagged it");
    h.core.apply_events(&[event]);
    let kills = h.audit.take();
    assert_eq!(kills.len(), 1);
    let k = &kills[0];
    assert_eq!(
        (k.cookie, k.reason, k.result),
        (5, Reason::Expired, KillResult::Destroyed)
    );
    assert_eq!(
        (k.owner.session.as_str(), k.owner.user.as_str()),
        ("s1", "alice")
    );
    assert_eq!(
        k.late_ns, 0,
        "late from when it came, not from the deadline"
    );
    assert!(
        h.core.kernel.pending.is_empty(),
        "every key of the item is gone"
    );
    assert_eq!(h.core.index.pending_keys(), 0);
    assert!(h.sessions().is_empty(), "no stand-in session");
}

/// Keys with the client's port open go with their session (they would
/// catch the next connection from the host); exact keys of a revoked
/// session are brought to its end, and go after `ENDED_EXPECT_NS`, their
/// place in the table and the quota given back.
#[test]
fn an_ended_sessions_expected_keys_stay_only_exact_and_only_for_a_while() {
    let mut h = harness();
    let line = r#"{"op":"grant","session":"s1","user":"alice","target":"vm-1","ttl":"10m","expect":[{"local":"127.0.0.1:0","remote":"127.0.0.1:5900"},{"local":"127.0.0.1:5900","remote":"127.0.0.1:41000"}]}"#;
    h.ask(PROXY, line).expect("grant");
    assert_eq!(h.core.index.load_of(PROXY.uid).expecting, 2);
    h.ok(r#"{"op":"revoke","session":"s1"}"#);
    let now = h.core.kernel.now.boot_ns;
    let kept: Vec<_> = h.core.kernel.pending.iter().collect();
    assert_eq!(kept.len(), 2, "the exact item's two keys: {kept:?}");
    assert!(kept
        .iter()
        .all(|(k, g)| k.local_port == 5900 && g.deadline_ns == now));
    assert_eq!(h.core.index.load_of(PROXY.uid).expecting, 1);
    // The open key went: the host's next connection is nobody's.
    let event = h
        .fake()
        .connect(6, "127.0.0.1:42000", "127.0.0.1:5900", false, false);
    assert_eq!(event.flow.session, 0);
    h.core.apply_events(&[event]);
    h.pass(super::ended::ENDED_EXPECT_NS);
    assert!(h.audit.take().is_empty(), "nothing killed");
    assert!(h.core.kernel.pending.is_empty());
    assert_eq!(h.core.index.pending_keys(), 0);
    assert_eq!(h.core.index.load_of(PROXY.uid).expecting, 0);
}

/// A restarted daemon keeps a recently ended session's exact keys (its
/// names are lost with the old daemon) and never gives a new session
/// their id.
#[test]
fn adoption_keeps_an_ended_sessions_recent_keys() {
    let audit = Captured::default();
    let mut fake = FakeKernel::new();
    let now = fake.now.boot_ns;
    let exact = tuple::tuple_of(B.0.parse().unwrap(), B.1.parse().unwrap());
    let old = tuple::tuple_of(A.0.parse().unwrap(), A.1.parse().unwrap());
    let grant = |deadline_ns| PendingGrant {
        deadline_ns,
        session: 40,
        netns_cookie: OWN_NETNS,
    };
    fake.pending.insert(exact, grant(now - NS_PER_SEC));
    fake.pending.insert(old, grant(now - 100 * NS_PER_SEC));
    let config = Config::from_toml(CONFIG).unwrap();
    let mut core = Core::new(fake, Box::new(audit.clone()), config);
    core.adopt();
    assert_eq!(core.kernel.pending.keys().collect::<Vec<_>>(), [&exact]);
    assert!(core.index.next_id() > 40);
    let event = core.kernel.connect(9, B.0, B.1, true, false);
    core.apply_events(&[event]);
    let kills = audit.take();
    assert_eq!(kills.len(), 1);
    assert_eq!(
        (kills[0].cookie, kills[0].owner.session.as_str()),
        (9, "ended-40")
    );
    assert_eq!(core.index.pending_keys(), 0);
}

#[test]
fn a_fenced_flow_not_granted_in_its_grace_window_dies() {
    let mut h = harness();
    let event = h
        .fake()
        .connect(3, "127.0.0.1:5901", "127.0.0.1:40003", true, true);
    h.core.apply_events(&[event]);
    let grace = h.core.config.fence_grace_ns;
    h.pass(grace);
    let kills = h.audit.take();
    assert_eq!(kills.len(), 1);
    assert_eq!(
        (kills[0].cookie, kills[0].reason),
        (3, Reason::Unauthorized)
    );
    assert_eq!(kills[0].late_ns, 0);
}

#[test]
fn expires_at_deadlines_follow_the_wall_clock_and_ttl_ones_do_not() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    let now = h.core.kernel.now;
    let at = crate::timefmt::format_rfc3339(now.unix_ns + 1800 * NS_PER_SEC as i128);
    h.ok(&grant_line(
        "wall",
        "alice",
        "vm-1",
        &format!(r#","expires_at":"{at}""#),
        &[A],
    ));
    h.ok(&grant_line("ttl", "bob", "vm-2", r#","ttl":"30m""#, &[B]));
    // Someone sets the clock 20 minutes forward.
    h.fake().now.unix_ns += 1200 * NS_PER_SEC as i128;
    assert_eq!(h.core.follow_wall_clock(), 1);
    let k = &h.core.kernel;
    assert_eq!(
        k.flows[&1].deadline_ns,
        now.boot_ns + 600 * NS_PER_SEC,
        "10 minutes left"
    );
    assert_eq!(
        k.flows[&2].deadline_ns,
        now.boot_ns + 1800 * NS_PER_SEC,
        "the ttl stays"
    );
}

// --- a refused request changes nothing

/// Asks, expects `code`, and checks that neither the kernel nor what
/// `list` shows moved, and that nothing was written.
fn refused_changes_nothing(h: &mut Harness, caller: Caller, line: &str, code: Code) -> Refused {
    let before = (h.kernel_state(), h.sessions());
    let mark = h.mark();
    h.audit.take_changes();
    let r = h.refused(caller, line);
    assert_eq!(r.code, code, "{line} -> {r:?}");
    assert_eq!(h.writes_since(mark), vec![], "{line} wrote to the kernel");
    assert_eq!(
        (h.kernel_state(), h.sessions()),
        before,
        "{line} changed the state"
    );
    assert!(h.audit.take().is_empty(), "{line} killed something");
    assert!(
        h.audit.take_changes().is_empty(),
        "{line} was audited as done"
    );
    r
}

#[test]
fn a_refused_request_changes_nothing_for_every_code() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]));
    let cases: Vec<(Caller, String, Code)> = vec![
        (Caller { uid: 1002, gid: 1002, pid: 0 }, grant_line("s2", "bob", "vm-2", "", &[B]), Code::PermissionDenied),
        (ROOT, grant_line("s2", "bob", "vm-2", r#","class":"nope""#, &[B]), Code::BadValue),
        (PROXY, grant_line("s2", "bob", "vm-2", r#","class":"console","ttl":"2h""#, &[B]), Code::DeadlineRefused),
        (ROOT, grant_line("s2", "bob", "vm-2", "", &[("127.0.0.1:5900", "127.0.0.1:49999")]), Code::NoSuchFlow),
        (ROOT, r#"{"op":"extend","session":"nobody","ttl":"1m"}"#.into(), Code::NoSuchSession),
        (ROOT, r#"{"op":"touch","session":"nobody"}"#.into(), Code::NoSuchSession),
        (ROOT, r#"{"op":"revoke","session":"nobody"}"#.into(), Code::NoSuchSession),
        (ROOT, grant_line("s1", "mallory", "vm-1", "", &[B]), Code::SessionConflict),
        (ROOT, grant_line("s1", "alice", "vm-1", r#","idle_timeout":"5m""#, &[B]), Code::SessionConflict),
        (ROOT, grant_line("s2", "bob", "vm-2", "", &[A]), Code::FlowConflict),
        (ROOT, r#"{"op":"grant","session":"s2","user":"bob","target":"vm-2","flows":[{"fd":0}]}"#.into(), Code::BadFd),
        (ROOT, r#"{"op":"grant","session":"s2","user":"bob","target":"vm-2","flows":[{"local":"127.0.0.1:5900","remote":"127.0.0.1:40002","netns":"/run/netns/absent"}]}"#.into(), Code::BadValue),
        (ROOT, r#"{"op":"revoke","flow":{"local":"127.0.0.1:5900","remote":"127.0.0.1:49999"}}"#.into(), Code::NoSuchFlow),
    ];
    for (caller, line, code) in cases {
        refused_changes_nothing(&mut h, caller, &line, code);
    }
    // The refusal does not tell who else is allowed.
    let r = h.refused(
        Caller {
            uid: 1002,
            gid: 1002,
            pid: 0,
        },
        &grant_line("s9", "u", "t", "", &[B]),
    );
    assert!(
        !r.message.contains("1000") && !r.message.contains("1001"),
        "{}",
        r.message
    );
    // Reading needs no [access] entry.
    assert!(h
        .ask(
            Caller {
                uid: 1002,
                gid: 1002,
                pid: 0
            },
            r#"{"op":"status"}"#
        )
        .is_ok());
}

#[test]
fn a_refused_grant_for_an_untracked_socket_changes_nothing() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    let file = std::fs::File::open("/dev/null").unwrap();
    let fd = OwnedFd::from(file);
    h.fake().sockets.insert(
        fd.as_raw_fd(),
        SocketInfo {
            cookie: 77,
            local: A.0.parse().unwrap(),
            remote: "127.0.0.1:40077".parse().unwrap(),
        },
    );
    let before = h.kernel_state();
    let line = r#"{"op":"grant","session":"s2","user":"bob","target":"vm-2","flows":[{"fd":0}]}"#;
    let request = parse_request(line.as_bytes()).unwrap();
    let r = h.core.handle(request.command, ROOT, &[fd]).unwrap_err();
    assert_eq!(r.code, Code::FlowNotTracked, "{r:?}");
    assert_eq!(h.kernel_state(), before);
}

#[test]
fn a_full_session_table_refuses_before_anything_is_written() {
    let mut h = harness();
    for i in 0..16u64 {
        let remote = format!("127.0.0.1:{}", 41000 + i);
        h.connect(100 + i, "127.0.0.1:5900", &remote);
        h.ok(&grant_line(
            &format!("s{i}"),
            "alice",
            &format!("vm-{i}"),
            "",
            &[("127.0.0.1:5900", &remote)],
        ));
    }
    h.connect(1, A.0, A.1);
    let r = refused_changes_nothing(
        &mut h,
        ROOT,
        &grant_line("one-more", "bob", "vm-x", "", &[A]),
        Code::TableFull,
    );
    assert!(r.message.contains("max_sessions"), "{}", r.message);
}

/// A forwarded flow the tc program has seen, as the fake kernel holds it.
fn forwarded(h: &mut Harness, local: &str, remote: &str) -> FlowTuple {
    let key = tuple::forwarded_key_of(local.parse().unwrap(), remote.parse().unwrap());
    h.fake().forwarded.insert(key, Forwarded::default());
    key
}

#[test]
fn a_grant_refused_for_a_full_forwarded_table_writes_no_local_flow() {
    // Before the core was reshaped, such a grant had already created its
    // session and written its local flows' deadlines when it was refused.
    let mut h = harness();
    h.connect(1, A.0, A.1);
    forwarded(&mut h, "198.18.0.2:5900", "198.18.1.2:40000");
    h.fake().max_forwarded_grants = 0;
    h.core
        .index
        .fill_forwarded_grants_for_test(reaper_common::MAX_FORWARDED as usize);
    let line = grant_line(
        "s1",
        "alice",
        "vm-1",
        r#","ttl":"10m""#,
        &[A, ("198.18.0.2:5900", "198.18.1.2:40000")],
    );
    let r = refused_changes_nothing(&mut h, ROOT, &line, Code::TableFull);
    assert!(r.message.contains("forwarded"), "{}", r.message);
    assert_eq!(
        h.core.kernel.flows[&1].session, 0,
        "the local flow was not granted"
    );
}

#[test]
fn a_kernel_that_refuses_a_write_after_the_checks_gets_it_undone() {
    // The kernel's forwarded-grant table is full while the daemon's count
    // says there is room (entries written by someone else): the grant has
    // written its session and local flow when the kernel says no, and
    // undoes both.
    let mut h = harness();
    h.connect(1, A.0, A.1);
    forwarded(&mut h, "198.18.0.2:5900", "198.18.1.2:40000");
    h.fake().max_forwarded_grants = 0;
    let before = (h.kernel_state(), h.sessions());
    let line = grant_line(
        "s1",
        "alice",
        "vm-1",
        r#","ttl":"10m""#,
        &[A, ("198.18.0.2:5900", "198.18.1.2:40000")],
    );
    let r = h.refused(ROOT, &line);
    assert_eq!(r.code, Code::TableFull);
    assert_eq!((h.kernel_state(), h.sessions()), before, "undone");
    assert_eq!(h.core.index.flow(1).map(|f| f.session), Some(0));
    // And the same grant goes through once there is room.
    h.fake().max_forwarded_grants = 10;
    h.ok(&line);
    assert_ne!(h.core.kernel.flows[&1].session, 0);
}

#[test]
fn an_evicting_grant_refused_for_a_full_pre_registration_table_evicts_nobody() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.ok(&grant_line(
        "old",
        "alice",
        "vm-1",
        r#","class":"shared","ttl":"10m""#,
        &[A],
    ));
    // Fill the pre-registration table (16 entries: 8 IPv4 items, 2 keys each).
    for i in 0..8 {
        h.ok(&format!(
            r#"{{"op":"grant","session":"e{i}","user":"u","target":"t{i}","expect":[{{"local":"127.0.0.1:0","remote":"127.0.0.1:{}"}}]}}"#,
            6000 + i
        ));
    }
    let line = r#"{"op":"grant","session":"new","user":"bob","target":"vm-1","class":"shared","ttl":"10m","expect":[{"local":"127.0.0.1:0","remote":"127.0.0.1:5900"}]}"#;
    let r = refused_changes_nothing(&mut h, ROOT, line, Code::TableFull);
    assert!(r.message.contains("max_pending"), "{}", r.message);
    assert!(
        h.sessions().contains(&"old".to_string()),
        "the holder was not evicted"
    );
}

#[test]
fn a_flow_that_closed_before_its_grant_was_written_leaves_no_kernel_entry() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    // The socket closes before its event is read: the index still has it,
    // and the grant is judged (and answered) as if it closed a moment after.
    let event = h.fake().close(1);
    h.ok(&grant_line("s1", "alice", "vm-1", "", &[A]));
    // The batched write cannot say "only if present": the entry came back.
    assert_eq!(h.core.kernel.flows[&1].session, 1);
    h.fake().queued.push(event);
    h.core.sync_events();
    assert!(
        !h.core.kernel.flows.contains_key(&1),
        "the close event removed it"
    );
    let Outcome::Listed(l) = h.ok(r#"{"op":"list"}"#) else {
        panic!()
    };
    assert!(l.sessions[0].flows.is_empty(), "{l:?}");
}

#[test]
fn a_read_of_grants_writes_sessions_before_flows_and_publishes_once() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    let mark = h.core.kernel.log.len();
    // Two pipelined grants of one read: handled one by one, settled once.
    for (session, flow) in [("s1", A), ("s2", B)] {
        let line = grant_line(session, "alice", "vm-1", "", &[flow]);
        let request = parse_request(line.as_bytes()).unwrap();
        h.core.handle(request.command, ROOT, &[]).expect("granted");
    }
    assert!(
        h.core.kernel.writes_since(mark).is_empty(),
        "staged until the read is settled"
    );
    // The second grant was judged against the first: the flow is taken.
    let line = grant_line("s3", "bob", "vm-2", "", &[A]);
    let request = parse_request(line.as_bytes()).unwrap();
    let r = h.core.handle(request.command, ROOT, &[]).unwrap_err();
    assert_eq!(r.code, Code::FlowConflict, "{r:?}");
    h.core.settle_requests();
    let deadline = h.core.kernel.sessions[&1].deadline_ns;
    assert_eq!(
        h.core.kernel.writes_since(mark),
        [
            Write::Session { id: 1, deadline },
            Write::Session { id: 2, deadline },
            Write::Flow {
                cookie: 1,
                session: 1,
                deadline
            },
            Write::Flow {
                cookie: 2,
                session: 2,
                deadline
            },
            Write::Publish,
        ]
    );
}

#[test]
fn a_session_record_the_kernel_refuses_after_the_answer_leaves_its_flow_its_deadline() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line("s1", "alice", "vm-1", "", &[A]));
    // The kernel's table is smaller than the count the grant was judged by.
    h.fake().max_sessions = 1;
    h.ok(&grant_line("s2", "bob", "vm-2", "", &[B]));
    assert!(
        !h.core.kernel.sessions.contains_key(&2),
        "refused by the kernel"
    );
    let flow = h.core.kernel.flows[&2];
    assert_eq!(
        (flow.session, flow.deadline_ns),
        (2, h.core.kernel.sessions[&1].deadline_ns)
    );
    // And the daemon still kills it at its deadline.
    h.pass(600 * NS_PER_SEC);
    let kills = h.audit.take();
    assert!(kills.iter().any(|k| k.cookie == 2), "{kills:?}");
}

#[test]
fn a_revoke_after_a_grant_in_the_same_read_is_not_overtaken_by_it() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    let mark = h.core.kernel.log.len();
    let run = |h: &mut Harness, line: &str| {
        let request = parse_request(line.as_bytes()).unwrap();
        h.core.handle(request.command, ROOT, &[]).expect("done");
    };
    run(
        &mut h,
        &grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]),
    );
    run(&mut h, r#"{"op":"revoke","session":"s1"}"#);
    h.core.settle_requests();
    let writes = h.core.kernel.writes_since(mark);
    let granted = writes
        .iter()
        .position(|w| {
            matches!(
                w,
                Write::Flow {
                    cookie: 1,
                    session: 1,
                    ..
                }
            )
        })
        .expect("the grant's write");
    let destroyed = writes
        .iter()
        .position(|w| matches!(w, Write::Destroy(_)))
        .expect("the revoke's destroy");
    assert!(granted < destroyed, "{writes:?}");
    assert!(h.core.kernel.sessions.is_empty(), "{writes:?}");
    assert!(!h.core.kernel.flows.contains_key(&1), "{writes:?}");
}

#[test]
fn revoke_of_a_flow_kills_it_and_leaves_its_session() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line(
        "s1",
        "alice",
        "vm-1",
        r#","ttl":"10m""#,
        &[A, B],
    ));
    h.ok(&format!(
        r#"{{"op":"revoke","flow":{{"local":"{}","remote":"{}"}}}}"#,
        A.0, A.1
    ));
    let kills = h.audit.take();
    assert_eq!(kills.len(), 1);
    assert_eq!((kills[0].cookie, kills[0].reason), (1, Reason::Revoked));
    let Outcome::Listed(l) = h.ok(r#"{"op":"list"}"#) else {
        panic!()
    };
    assert_eq!(l.sessions[0].flows.len(), 1, "the other flow stays granted");
}

#[test]
fn an_allowed_proxy_grants_and_a_closed_flow_leaves_its_session() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ask(
        PROXY,
        &grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A, B]),
    )
    .expect("uid 1000 is in [access]");
    let event = h.fake().close(1);
    h.core.apply_events(&[event]);
    let Outcome::Listed(l) = h.ok(r#"{"op":"list"}"#) else {
        panic!()
    };
    assert_eq!(l.sessions[0].flows.len(), 1);
    assert_eq!(l.sessions[0].flows[0].cookie, 2);
    assert_eq!(l.sessions[0].granted_by_uid, 1000);
}

#[test]
fn a_grant_finds_a_flow_whose_event_is_still_queued_or_was_lost() {
    let mut h = harness();
    // The proxy grants before the daemon has read the connection's event.
    let event = h.fake().connect(1, A.0, A.1, true, false);
    h.fake().queued.push(event);
    h.ok(&grant_line("s1", "alice", "vm-1", "", &[A]));
    assert_eq!(h.core.kernel.flows[&1].session, 1);
    // The ring buffer was full: the event never came; the lost count says so.
    h.fake().connect(2, B.0, B.1, true, false);
    h.fake().lost += 1;
    h.ok(&grant_line("s2", "bob", "vm-2", "", &[B]));
    assert_ne!(h.core.kernel.flows[&2].session, 0);
    // Without a lost event, a miss is a miss: nothing scans the flow table.
    h.fake()
        .connect(3, "127.0.0.1:5900", "127.0.0.1:40003", true, false);
    let r = h.refused(
        ROOT,
        &grant_line(
            "s3",
            "carol",
            "vm-3",
            "",
            &[("127.0.0.1:5900", "127.0.0.1:40003")],
        ),
    );
    assert_eq!(r.code, Code::NoSuchFlow);
}

#[test]
fn extend_obeys_the_class_max_ttl_except_for_root() {
    // Before, an extend was bounded by the global max_ttl only: a session
    // of a class with max_ttl = 1h could be extended to 2h by any proxy.
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.ask(
        PROXY,
        &grant_line(
            "s1",
            "alice",
            "vm-1",
            r#","class":"console","ttl":"10m""#,
            &[A],
        ),
    )
    .expect("within the class");
    let r = refused_changes_nothing(
        &mut h,
        PROXY,
        r#"{"op":"extend","session":"s1","ttl":"2h"}"#,
        Code::DeadlineRefused,
    );
    assert!(
        r.message.contains("max_ttl") && r.message.contains("console"),
        "{}",
        r.message
    );
    h.ask(PROXY, r#"{"op":"extend","session":"s1","ttl":"1h"}"#)
        .expect("up to the class bound");
    h.ask(ROOT, r#"{"op":"extend","session":"s1","ttl":"2h"}"#)
        .expect("root is bounded by the global max_ttl only");
}

#[test]
fn a_session_is_in_the_scope_of_its_creator_root_and_operators_only() {
    // Before, any allowed uid could join, extend, shorten or revoke any
    // session, and revoke a flow nobody had granted.
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.connect(3, "127.0.0.1:5900", "127.0.0.1:40003");
    h.ask(
        PROXY,
        &grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]),
    )
    .expect("the first proxy grants");
    let theirs = [
        grant_line("s1", "alice", "vm-1", r#","ttl":"1s""#, &[B]),
        r#"{"op":"extend","session":"s1","ttl":"20m"}"#.to_string(),
        r#"{"op":"touch","session":"s1"}"#.to_string(),
        r#"{"op":"revoke","session":"s1"}"#.to_string(),
        format!(
            r#"{{"op":"revoke","flow":{{"local":"{}","remote":"{}"}}}}"#,
            A.0, A.1
        ),
        r#"{"op":"revoke","flow":{"local":"127.0.0.1:5900","remote":"127.0.0.1:40003"}}"#
            .to_string(),
    ];
    for line in &theirs {
        let r = refused_changes_nothing(&mut h, OTHER_PROXY, line, Code::PermissionDenied);
        assert!(r.message.contains("1001"), "{}", r.message);
    }
    // A revoke by user from the other proxy ends only its own sessions.
    h.ask(
        OTHER_PROXY,
        &grant_line("s2", "alice", "vm-2", r#","ttl":"10m""#, &[B]),
    )
    .unwrap();
    let Outcome::Revoked(r) = h
        .ask(OTHER_PROXY, r#"{"op":"revoke","user":"alice"}"#)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(r.sessions, vec!["s2".to_string()]);
    // Each sees its own sessions; root and operators see all.
    let names = |h: &mut Harness, who: Caller| match h.ask(who, r#"{"op":"list"}"#).unwrap() {
        Outcome::Listed(l) => l.sessions.into_iter().map(|s| s.name).collect::<Vec<_>>(),
        _ => panic!(),
    };
    assert_eq!(names(&mut h, OTHER_PROXY), Vec::<String>::new());
    assert_eq!(names(&mut h, PROXY), vec!["s1".to_string()]);
    assert_eq!(names(&mut h, OPERATOR), vec!["s1".to_string()]);
    // The owner, and an operator, may act on it; an operator may revoke a
    // flow that no session holds.
    h.ask(PROXY, r#"{"op":"extend","session":"s1","ttl":"20m"}"#)
        .unwrap();
    h.ask(
        OPERATOR,
        r#"{"op":"revoke","flow":{"local":"127.0.0.1:5900","remote":"127.0.0.1:40003"}}"#,
    )
    .expect("operators may revoke ungranted flows");
    h.ask(OPERATOR, r#"{"op":"revoke","user":"alice"}"#)
        .unwrap();
    assert!(h.sessions().is_empty());
}

#[test]
fn a_bad_netns_is_explained_to_root_only() {
    // The daemon opens the path as root: telling anyone else why it failed
    // would tell them whether something exists where they cannot look.
    let mut h = harness();
    let line = r#"{"op":"grant","session":"s2","user":"bob","target":"vm-2","flows":[{"local":"127.0.0.1:5900","remote":"127.0.0.1:40002","netns":"/root/secret/x"}]}"#;
    let r = refused_changes_nothing(&mut h, PROXY, line, Code::BadValue);
    assert!(
        r.message
            .contains("is not a network namespace this daemon can use"),
        "{}",
        r.message
    );
    assert!(!r.message.contains("os error"), "{}", r.message);
    let r = refused_changes_nothing(&mut h, ROOT, line, Code::BadValue);
    assert!(
        r.message.contains("os error 2"),
        "root is told why: {}",
        r.message
    );
}

const SCOPED: Caller = Caller {
    uid: 3000,
    gid: 3000,
    pid: 77,
};

const SCOPES: &str = r#"
max_pending = 64
max_sessions = 64
[access]
uids = [1000]
max_sessions_per_uid = 3
max_expecting_per_uid = 2
[[access.scope]]
uids = [3000]
classes = ["console"]
targets = ["vm-*"]
ports = ["5900-5999"]
max_sessions = 1
[[access.scope]]
gids = [60]
all_sessions = true
[classes.console]
max_ttl = "1h"
"#;

#[test]
fn a_scope_limits_the_classes_targets_and_ports_a_caller_may_grant() {
    let mut h = harness_with(SCOPES);
    h.connect(1, A.0, A.1);
    h.connect(2, "127.0.0.1:22", "127.0.0.1:40009");
    let outside = [
        grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]),
        grant_line("s1", "alice", "db-1", r#","class":"console","ttl":"10m""#, &[A]),
        grant_line(
            "s1",
            "alice",
            "vm-1",
            r#","class":"console","ttl":"10m""#,
            &[A, ("127.0.0.1:22", "127.0.0.1:40009")],
        ),
        r#"{"op":"grant","session":"s1","user":"alice","target":"vm-1","class":"console","ttl":"10m","expect":[{"local":"127.0.0.1:0","remote":"127.0.0.1:22"}]}"#.to_string(),
    ];
    for line in &outside {
        let r = refused_changes_nothing(&mut h, SCOPED, line, Code::PermissionDenied);
        assert!(r.message.contains("[[access.scope]]"), "{}", r.message);
    }
    h.ask(
        SCOPED,
        &grant_line(
            "s1",
            "alice",
            "vm-1",
            r#","class":"console","ttl":"10m""#,
            &[A],
        ),
    )
    .expect("inside the scope");
    // A scope with all_sessions acts on others' sessions, as an operator.
    let operator = Caller {
        uid: 4000,
        gid: 60,
        pid: 1,
    };
    h.ask(operator, r#"{"op":"extend","session":"s1","ttl":"20m"}"#)
        .expect("all_sessions");
}

#[test]
fn quotas_bound_the_sessions_and_pre_registrations_of_each_uid() {
    // Before, one allowed caller could fill the session table with
    // pre-registrations that need no socket.
    let mut h = harness_with(SCOPES);
    let expect = |name: &str, n: usize| {
        let items: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"local":"127.0.0.1:0","remote":"127.0.0.1:{}"}}"#,
                    5900 + i
                )
            })
            .collect();
        format!(
            r#"{{"op":"grant","session":"{name}","user":"u","target":"vm-{name}","ttl":"10m","expect":[{}]}}"#,
            items.join(",")
        )
    };
    let r = refused_changes_nothing(&mut h, PROXY, &expect("e0", 3), Code::QuotaExceeded);
    assert!(r.message.contains("max_expecting_per_uid"), "{}", r.message);
    h.ask(PROXY, &expect("e1", 2)).expect("within the quota");
    let r = refused_changes_nothing(&mut h, PROXY, &expect("e2", 1), Code::QuotaExceeded);
    assert!(r.message.contains("2 pre-registered"), "{}", r.message);
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.connect(3, "127.0.0.1:5901", "127.0.0.1:40003");
    h.ask(PROXY, &grant_line("s1", "u", "t1", r#","ttl":"10m""#, &[A]))
        .unwrap();
    h.ask(PROXY, &grant_line("s2", "u", "t2", r#","ttl":"10m""#, &[B]))
        .unwrap();
    let line = grant_line(
        "s3",
        "u",
        "t3",
        r#","ttl":"10m""#,
        &[("127.0.0.1:5901", "127.0.0.1:40003")],
    );
    let r = refused_changes_nothing(&mut h, PROXY, &line, Code::QuotaExceeded);
    assert!(r.message.contains("holds 3 sessions"), "{}", r.message);
    // Root has no quota; a freed session makes room; a scope's own quota
    // replaces the default.
    h.ask(PROXY, r#"{"op":"revoke","session":"e1"}"#).unwrap();
    h.ask(PROXY, &line).expect("room again");
    h.ask(ROOT, &expect("r1", 5)).expect("root has no quota");
    let console = |name: &str| {
        format!(
            r#"{{"op":"grant","session":"{name}","user":"u","target":"vm-1","class":"console","ttl":"10m","expect":[{{"local":"127.0.0.1:0","remote":"127.0.0.1:5900"}}]}}"#
        )
    };
    h.ask(SCOPED, &console("c1"))
        .expect("the scope's one session");
    let r = refused_changes_nothing(&mut h, SCOPED, &console("c2"), Code::QuotaExceeded);
    assert!(r.message.contains("holds 1 sessions"), "{}", r.message);
}

#[test]
fn grants_extends_and_revokes_are_audited_with_their_requester() {
    let mut h = harness();
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    let proxy = Caller { pid: 4242, ..PROXY };
    h.ask(
        proxy,
        &grant_line("s1", "alice", "vm-1", r#","ttl":"10m""#, &[A]),
    )
    .unwrap();
    h.ask(proxy, &grant_line("s1", "alice", "vm-1", "", &[B]))
        .unwrap();
    h.ask(proxy, r#"{"op":"extend","session":"s1","ttl":"20m"}"#)
        .unwrap();
    h.ask(OPERATOR, r#"{"op":"revoke","session":"s1"}"#)
        .unwrap();
    let s1 = || "s1".to_string();
    assert_eq!(
        h.audit.take_changes(),
        vec![
            (ChangeKind::Created, proxy, s1()),
            (ChangeKind::Joined, proxy, s1()),
            (ChangeKind::Extended, proxy, s1()),
            (ChangeKind::Revoked, OPERATOR, s1()),
        ]
    );
}

#[test]
fn a_watched_flow_left_untracked_by_a_full_share_is_refused_naming_the_holder() {
    let mut h = harness_with(&format!("max_flows_per_owner = 10\n{CONFIG}"));
    h.fake().holders = vec![(1001, 3), (65534, 10)];
    let line = grant_line(
        "s1",
        "alice",
        "vm-1",
        r#","ttl":"10m""#,
        &[("127.0.0.1:5901", "127.0.0.1:40001")],
    );
    let r = refused_changes_nothing(&mut h, PROXY, &line, Code::FlowTableExhausted);
    assert!(r.message.contains("uid 65534 (10)"), "{}", r.message);
    assert!(
        !r.message.contains("uid 1001"),
        "below its share: {}",
        r.message
    );
    // An unwatched flow is simply not there.
    let line = grant_line(
        "s1",
        "alice",
        "vm-1",
        r#","ttl":"10m""#,
        &[("127.0.0.1:22", "127.0.0.1:40001")],
    );
    refused_changes_nothing(&mut h, PROXY, &line, Code::NoSuchFlow);
    // With every share below its bound, a missing flow is missing.
    h.fake().holders = vec![(65534, 9)];
    let line = grant_line(
        "s1",
        "alice",
        "vm-1",
        r#","ttl":"10m""#,
        &[("127.0.0.1:5901", "127.0.0.1:40001")],
    );
    refused_changes_nothing(&mut h, PROXY, &line, Code::NoSuchFlow);
}

// --- fleet revocations

fn join_fleet(h: &mut Harness, node: &str) {
    h.core.fleet_joined(
        node,
        &["http://198.18.0.1:2379".into()],
        0,
        2 * NS_PER_SEC,
        Default::default(),
    );
}

fn revocation(selector: Selector, value: &str, at_unix_ns: i128) -> Revocation {
    Revocation::new(selector, value, "node-c", 0, at_unix_ns as i64)
}

#[test]
fn a_fleet_lock_ends_matching_sessions_and_refuses_grants_until_lifted() {
    let mut h = harness();
    join_fleet(&mut h, "node-a");
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line("s1", "alice", "vm-1", "", &[A]));
    h.ok(&grant_line("s2", "bob", "vm-2", "", &[B]));
    h.audit.take_changes();
    let now = crate::kernel::Kernel::now(&h.core.kernel).unix_ns;
    let kills = h
        .core
        .fleet_revoked(&revocation(Selector::User, "alice", now), 10, Applying::Now);
    assert_eq!(kills.len(), 1, "{kills:?}");
    assert_eq!(kills[0].owner.session, "s1");
    assert_eq!(kills[0].by_node.as_deref(), Some("node-c"));
    let changes = h.audit.take_changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].0, ChangeKind::Revoked);
    assert_eq!(h.sessions(), ["s2"], "bob's session is not touched");
    assert_eq!(h.audit.take().len(), 1, "the kill is audited");

    // Locked: a new grant for alice is refused, on any flow, and changes
    // nothing; the message names the node that asked.
    h.connect(3, "127.0.0.1:5900", "127.0.0.1:40003");
    let line = grant_line(
        "s3",
        "alice",
        "vm-3",
        "",
        &[("127.0.0.1:5900", "127.0.0.1:40003")],
    );
    let r = refused_changes_nothing(&mut h, ROOT, &line, Code::Locked);
    assert!(r.message.contains("node-c"), "{}", r.message);
    let status = h.core.status().fleet.expect("a fleet status");
    assert_eq!(status.locks, ["user=alice"]);
    assert_eq!(status.applied_revision, 10);

    // Lifted: granted again.
    h.core
        .fleet_lifted(Selector::User, "alice", 11, Applying::Now);
    h.ok(&line);
    assert_eq!(h.sessions(), ["s2", "s3"]);
}

#[test]
fn a_one_off_or_replayed_revocation_spares_sessions_granted_after_it() {
    let mut h = harness();
    let before = crate::kernel::Kernel::now(&h.core.kernel).unix_ns;
    h.fake().advance(NS_PER_SEC);
    h.connect(1, A.0, A.1);
    h.ok(&grant_line("s1", "alice", "vm-1", "", &[A]));
    // Asked before s1 was granted: a class revocation, or a lock replayed
    // from history the list no longer holds, leaves it alone.
    let class = revocation(Selector::Class, "default", before);
    assert!(h.core.fleet_revoked(&class, 5, Applying::Now).is_empty());
    let lock = revocation(Selector::User, "alice", before);
    assert!(h
        .core
        .fleet_revoked(&lock, 6, Applying::Replayed)
        .is_empty());
    assert_eq!(h.sessions(), ["s1"]);
    assert!(
        h.core.status().fleet.is_none(),
        "no fleet joined, none shown"
    );
    // A standing lock ends it whenever it was granted.
    assert_eq!(h.core.fleet_revoked(&lock, 7, Applying::Now).len(), 1);
    assert!(h.sessions().is_empty());
}

#[test]
fn a_list_makes_the_locks_exactly_those_standing() {
    let mut h = harness();
    let now = crate::kernel::Kernel::now(&h.core.kernel).unix_ns;
    h.core
        .fleet_revoked(&revocation(Selector::User, "gone", now), 3, Applying::Now);
    let standing = [(revocation(Selector::Target, "vm-9", now), 4)];
    h.core.fleet_listed(&standing, 9);
    h.core
        .fleet_joined("node-a", &[], 9, NS_PER_SEC, Default::default());
    let status = h.core.status().fleet.unwrap();
    assert_eq!(status.locks, ["target=vm-9"]);
    assert_eq!(h.core.fleet_applied_revision(), 9);
}

// --- fleet sessions

fn node_record(name: &str, address: &str) -> NodeRecord {
    NodeRecord::new(name, vec![address.parse().unwrap()])
}

fn fleet_flow(local: &str, remote: &str) -> FleetFlow {
    FleetFlow {
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
    }
}

fn decode_put(p: &Publish, landing: &str) -> FleetSession {
    let value = p.value.as_ref().expect("a put");
    FleetSession::decode("/p", landing, p.key.as_bytes(), value.as_bytes()).expect("reads back")
}

#[test]
fn a_session_with_flows_on_another_node_is_published_for_it_until_it_ends() {
    let mut h = harness();
    join_fleet(&mut h, "node-a");
    h.core.fleet_nodes_listed(vec![
        node_record("node-a", "198.18.1.2"),
        node_record("node-b", "198.18.2.2"),
    ]);
    h.connect(1, "198.18.1.2:40000", "198.18.2.2:5900");
    h.connect(2, "127.0.0.1:6080", "127.0.0.1:50000");
    // A session with no flow elsewhere stays this node's own.
    h.ok(&grant_line(
        "alone",
        "bob",
        "vm-2",
        "",
        &[("127.0.0.1:6080", "127.0.0.1:50000")],
    ));
    assert_eq!(h.core.fleet_outbox("/p"), []);

    h.connect(3, "127.0.0.1:6080", "127.0.0.1:50001");
    let now = crate::kernel::Kernel::now(&h.core.kernel);
    h.ok(&grant_line(
        "s1",
        "alice",
        "vm-1",
        r#","ttl":"60s""#,
        &[
            ("198.18.1.2:40000", "198.18.2.2:5900"),
            ("127.0.0.1:6080", "127.0.0.1:50001"),
        ],
    ));
    let out = h.core.fleet_outbox("/p");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].key, "/p/sessions/node-b/node-a/s1");
    let r = decode_put(&out[0], "node-b");
    // Only the flow that lands there, as node-b sees it.
    assert_eq!(r.flows, [fleet_flow("198.18.2.2:5900", "198.18.1.2:40000")]);
    assert_eq!((r.user.as_str(), r.target.as_str()), ("alice", "vm-1"));
    let first_expiry = r.expires_unix_ns;
    assert!(
        (i128::from(first_expiry) - now.unix_ns - 60 * NS_PER_SEC as i128).abs()
            < NS_PER_MS as i128
    );
    assert_eq!(
        h.core.fleet_outbox("/p"),
        [],
        "nothing changed, nothing written"
    );

    h.ok(r#"{"op":"extend","session":"s1","ttl":"120s"}"#);
    let out = h.core.fleet_outbox("/p");
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(decode_put(&out[0], "node-b").expires_unix_ns > first_expiry);

    // A new lease: written again, unchanged.
    h.core.fleet_republish_all();
    let out = h.core.fleet_outbox("/p");
    assert_eq!(out.len(), 1, "{out:?}");

    h.ok(r#"{"op":"revoke","session":"s1"}"#);
    assert_eq!(
        h.core.fleet_outbox("/p"),
        [Publish {
            key: "/p/sessions/node-b/node-a/s1".into(),
            value: None,
            if_revision: None
        }]
    );
}

fn mirrored(expires_unix_ns: i128) -> FleetSession {
    FleetSession {
        v: crate::fleet::record::VERSION,
        session: "s1".into(),
        origin: "node-a".into(),
        user: "alice".into(),
        target: "vm-1".into(),
        class: "console".into(),
        granted_by_uid: 1000,
        granted_unix_ns: 1,
        expires_unix_ns: expires_unix_ns as i64,
        flows: vec![
            fleet_flow("198.18.2.2:5900", "198.18.1.2:40000"),
            fleet_flow("198.18.2.2:5901", "198.18.1.2:0"),
        ],
    }
}

#[test]
fn a_session_landing_here_is_mirrored_with_its_deadline_until_its_origin_ends_it() {
    let mut h = harness();
    join_fleet(&mut h, "node-b");
    h.connect(1, "198.18.2.2:5900", "198.18.1.2:40000");
    let now = crate::kernel::Kernel::now(&h.core.kernel);
    let expires = now.unix_ns + 60 * NS_PER_SEC as i128;
    h.core.fleet_mirror_put(mirrored(expires));
    let Outcome::Listed(l) = h.ok(r#"{"op":"list","session":"s1"}"#) else {
        panic!()
    };
    let s = &l.sessions[0];
    assert_eq!((s.flows.len(), s.expecting), (1, 1), "{s:?}");
    assert_eq!(s.deadline_unix_ns, expires);
    assert_eq!(h.core.status().fleet.unwrap().mirrors, 1);
    assert_eq!(h.audit.take_changes()[0].0, ChangeKind::Created);

    // The origin's uid number means nothing here; a session of that name
    // cannot be granted here.
    let before = h.kernel_state();
    h.refused(PROXY, r#"{"op":"extend","session":"s1","ttl":"1h"}"#);
    let Ok(Outcome::Listed(seen)) = h.ask(PROXY, r#"{"op":"list"}"#) else {
        panic!()
    };
    assert!(
        seen.sessions.is_empty(),
        "a local uid 1000 does not see node-a's uid 1000's session"
    );
    let Ok(Outcome::Revoked(r)) = h.ask(PROXY, r#"{"op":"revoke","user":"alice"}"#) else {
        panic!()
    };
    assert!(r.kills.is_empty(), "nor may it revoke it");
    let Ok(Outcome::Listed(seen)) = h.ask(OPERATOR, r#"{"op":"list"}"#) else {
        panic!()
    };
    assert_eq!(seen.sessions.len(), 1, "an operator sees it");
    h.connect(2, A.0, A.1);
    let conflict = h.refused(ROOT, &grant_line("s1", "alice", "vm-1", "", &[A]));
    assert_eq!(conflict.code, Code::SessionConflict, "{}", conflict.message);
    assert!(
        conflict.message.contains("node node-a"),
        "{}",
        conflict.message
    );
    assert_eq!(h.kernel_state().lines().nth(1), before.lines().nth(1));

    // The origin moves the deadline (earlier too), then ends it.
    h.core
        .fleet_mirror_put(mirrored(expires - 30 * NS_PER_SEC as i128));
    let Outcome::Listed(l) = h.ok(r#"{"op":"list","session":"s1"}"#) else {
        panic!()
    };
    assert_eq!(
        l.sessions[0].deadline_unix_ns,
        expires - 30 * NS_PER_SEC as i128
    );
    assert_eq!(
        l.sessions[0].expecting, 1,
        "the expected connection is not registered twice"
    );
    let changes = h.audit.take_changes();
    assert_eq!(
        changes.iter().map(|c| c.0).collect::<Vec<_>>(),
        [ChangeKind::Extended],
        "one audit event for the moved deadline, no joins: {changes:?}"
    );
    let kills = h.core.fleet_mirror_gone("node-a", "s1");
    assert_eq!(kills.len(), 1);
    assert_eq!(kills[0].reason, Reason::OriginEnded);
    assert_eq!(kills[0].by_node.as_deref(), Some("node-a"));
    assert_eq!(h.sessions(), Vec::<String>::new());
}

#[test]
fn a_list_without_a_mirror_ends_it_and_limits_do_not_apply_to_mirrors() {
    let mut h = harness();
    join_fleet(&mut h, "node-b");
    h.connect(1, "198.18.2.2:5900", "198.18.1.2:40000");
    h.connect(2, "198.18.2.2:5900", "198.18.1.2:40001");
    let now = crate::kernel::Kernel::now(&h.core.kernel);
    let mut second = mirrored(now.unix_ns + 60 * NS_PER_SEC as i128);
    second.session = "s2".into();
    second.flows = vec![fleet_flow("198.18.2.2:5900", "198.18.1.2:40001")];
    // Class console allows one per target here; the origin decided.
    let kills = h.core.fleet_mirrors_listed(vec![
        mirrored(now.unix_ns + 60 * NS_PER_SEC as i128),
        second.clone(),
    ]);
    assert_eq!(kills, []);
    assert_eq!(h.sessions(), ["s1", "s2"]);
    let kills = h.core.fleet_mirrors_listed(vec![second]);
    assert_eq!(kills.len(), 1, "s1's one established flow: {kills:?}");
    assert!(kills.iter().all(|k| k.reason == Reason::OriginEnded));
    assert_eq!(h.sessions(), ["s2"]);
}

#[test]
fn a_cut_off_node_ends_fail_closed_sessions_at_the_grace_and_refuses_new_ones() {
    let mut h = harness_with(&format!(
        "{CONFIG}[classes.secure]\nttl = \"1h\"\non_partition = \"fail-closed\"\n"
    ));
    join_fleet(&mut h, "node-a");
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    h.ok(&grant_line(
        "locked-down",
        "alice",
        "vm-1",
        r#","class":"secure""#,
        &[A],
    ));
    h.ok(&grant_line("easy", "bob", "vm-2", "", &[B]));
    h.pass(NS_PER_SEC);
    h.core.fleet_renewed();
    h.pass(3 * NS_PER_SEC / 2);
    assert_eq!(h.audit.take(), [], "renewed 1.5 s ago: within the grace");
    h.pass(NS_PER_SEC);
    let kills = h.audit.take();
    assert_eq!(kills.len(), 1, "{kills:?}");
    assert_eq!(
        (kills[0].owner.session.as_str(), kills[0].reason),
        ("locked-down", Reason::Partitioned)
    );
    assert!(h.core.status().fleet.unwrap().cut_off);

    h.connect(3, "127.0.0.1:5900", "127.0.0.1:40003");
    let line = grant_line(
        "again",
        "alice",
        "vm-1",
        r#","class":"secure""#,
        &[("127.0.0.1:5900", "127.0.0.1:40003")],
    );
    refused_changes_nothing(&mut h, ROOT, &line, Code::Partitioned);
    h.ok(&grant_line(
        "more",
        "bob",
        "vm-3",
        "",
        &[("127.0.0.1:5900", "127.0.0.1:40003")],
    ));
    h.core.fleet_renewed();
    h.connect(4, "127.0.0.1:5900", "127.0.0.1:40004");
    h.ok(&grant_line(
        "again",
        "alice",
        "vm-1",
        r#","class":"secure""#,
        &[("127.0.0.1:5900", "127.0.0.1:40004")],
    ));
    assert!(!h.core.status().fleet.unwrap().cut_off);
}

#[test]
fn a_fleet_limited_grant_needs_its_places_and_frees_them_when_it_ends() {
    let mut h = harness_with(&format!(
        "{CONFIG}[classes.pool]\nttl = \"1h\"\nmax_per_target = 1\nlimit_scope = \"fleet\"\n[fleet]\nendpoints = [\"http://198.18.0.1:2379\"]\nnode = \"node-a\"\nprefix = \"/p\"\n"
    ));
    join_fleet(&mut h, "node-a");
    h.connect(1, A.0, A.1);
    h.connect(2, B.0, B.1);
    let line =
        |session: &str, flow| grant_line(session, "alice", "vm-1", r#","class":"pool""#, &[flow]);
    let asks = h.core.fleet_place_asks(
        &parse_request(line("s1", A).as_bytes()).unwrap().command,
        ROOT,
    );
    assert_eq!(asks.len(), 1);
    assert_eq!(asks[0].slot_key(0), "/p/places/pool/target/vm-1/0");
    let nobody = Caller {
        uid: 4242,
        gid: 4242,
        pid: 0,
    };
    let command = parse_request(line("s1", A).as_bytes()).unwrap().command;
    assert_eq!(
        h.core.fleet_place_asks(&command, nobody),
        [],
        "etcd is not asked for a caller who may not grant"
    );
    // Without its place (in a batch, say) it is refused, changing nothing.
    refused_changes_nothing(&mut h, ROOT, &line("s1", A), Code::BadValue);

    let place = |key: &str, revision| HeldPlace {
        key: key.into(),
        revision,
        value: "held".into(),
    };
    h.core
        .fleet_places_taken("s1", vec![place("/p/places/pool/target/vm-1/0", 7)]);
    h.ok(&line("s1", A));
    assert_eq!(h.core.fleet_places_unused("s1"), []);
    // The fleet counted the target: this node's own count does not refuse
    // a second session that holds a place of its own.
    h.core
        .fleet_places_taken("s2", vec![place("/p/places/pool/target/vm-1/1", 8)]);
    h.ok(&line("s2", B));

    // A new lease: each place is written again, if still its own.
    h.core.fleet_republish_all();
    let rewrites: Vec<(String, Option<i64>)> = h
        .core
        .fleet_outbox("/p")
        .into_iter()
        .filter(|p| p.value.is_some())
        .map(|p| (p.key, p.if_revision))
        .collect();
    assert_eq!(
        rewrites,
        [
            ("/p/places/pool/target/vm-1/0".to_string(), Some(7)),
            ("/p/places/pool/target/vm-1/1".to_string(), Some(8))
        ]
    );
    assert_eq!(
        h.core
            .fleet_place_rewritten("/p/places/pool/target/vm-1/1", Some(12)),
        []
    );
    // Taken by another session meanwhile: s1 ends.
    let kills = h
        .core
        .fleet_place_rewritten("/p/places/pool/target/vm-1/0", None);
    assert_eq!(kills.len(), 1);
    assert_eq!(
        (kills[0].owner.session.as_str(), kills[0].reason),
        ("s1", Reason::Evicted)
    );
    h.ok(r#"{"op":"revoke","session":"s2"}"#);
    let releases: Vec<(String, Option<i64>)> = h
        .core
        .fleet_outbox("/p")
        .into_iter()
        .map(|p| (p.key, p.if_revision))
        .collect();
    assert_eq!(
        releases,
        [
            ("/p/places/pool/target/vm-1/0".to_string(), Some(7)),
            ("/p/places/pool/target/vm-1/1".to_string(), Some(12))
        ],
        "each freed only if still as this node wrote it"
    );
}
