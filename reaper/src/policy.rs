//! Pure policy: how long things last, when they end, who may ask. (How
//! times and durations are written and read is `timefmt`.)
//!
//! Nothing in here does I/O or reads a clock; callers pass "now" in. That keeps
//! every rule unit-testable without root, and keeps the daemon's notion of time
//! in one place (`clock.rs`).

#![forbid(unsafe_code)]

use std::fmt;

use crate::timefmt::{format_duration, format_rfc3339, NS_PER_MS};

/// Why a policy rule refused something. The text is shown to whoever asked,
/// so it names the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(msg.into()))
}

impl From<crate::timefmt::TextError> for PolicyError {
    fn from(e: crate::timefmt::TextError) -> PolicyError {
        PolicyError(e.0)
    }
}

/// A moment on both clocks the daemon cares about: `CLOCK_BOOTTIME` (what the
/// kernel enforces against; it never jumps) and Unix time (what people and
/// tokens speak).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub boot_ns: u64,
    pub unix_ns: i128,
}

/// How a request says when access ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Expiry {
    /// Relative to the moment the daemon handles the request.
    Ttl(u64),
    /// An absolute wall-clock time (Unix nanoseconds), converted to the boot
    /// clock once, when the request is handled.
    At(i128),
}

impl Expiry {
    /// The wall-clock instant an expiry names (Unix ns), or 0 for a ttl:
    /// what a session keeps so that its deadline can follow the wall clock.
    pub fn wall_anchor(&self) -> u64 {
        match *self {
            Expiry::Ttl(_) => 0,
            Expiry::At(unix_ns) => unix_ns.clamp(1, u64::MAX as i128) as u64,
        }
    }
}

/// Where a deadline set by `expires_at` lies on the boot clock, given what
/// the wall clock says now. Someone set the clock: the session still ends
/// when the wall clock reads its `expires_at` (a token's expiry is a wall
/// time), but never further away than `max_ttl`, and a time already passed
/// means now.
pub fn follow_wall_clock(expires_unix_ns: u64, now: Now, limits: DeadlineLimits) -> u64 {
    let left = expires_unix_ns as i128 - now.unix_ns;
    if left <= 0 {
        now.boot_ns
    } else {
        now.boot_ns + left.min(limits.max_ttl_ns as i128) as u64
    }
}

/// Limits applied to every deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineLimits {
    /// No deadline may lie further than this in the future.
    pub max_ttl_ns: u64,
}

/// Turns an expiry into a boot-clock deadline, refusing ones that are already
/// over or absurdly far away.
pub fn deadline_for(expiry: &Expiry, now: Now, limits: DeadlineLimits) -> Result<u64, PolicyError> {
    let ttl_ns: i128 = match *expiry {
        Expiry::Ttl(ns) => ns as i128,
        Expiry::At(unix_ns) => unix_ns - now.unix_ns,
    };
    if ttl_ns <= 0 {
        return match expiry {
            Expiry::Ttl(_) => err("ttl must be greater than zero"),
            Expiry::At(at) => err(format!(
                "expires_at {} is not in the future (now is {})",
                format_rfc3339(*at),
                format_rfc3339(now.unix_ns)
            )),
        };
    }
    if ttl_ns > limits.max_ttl_ns as i128 {
        return err(format!(
            "deadline {} from now is beyond max_ttl {}",
            format_duration(ttl_ns.min(u64::MAX as i128) as u64),
            format_duration(limits.max_ttl_ns)
        ));
    }
    Ok(now.boot_ns + ttl_ns as u64)
}

/// What counts as activity for an idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleDirection {
    /// Only what the user sends: keystrokes and pointer moves, not screen
    /// updates. The strict choice.
    Input,
    /// Data in either direction.
    Any,
}

impl IdleDirection {
    pub fn as_u32(self) -> u32 {
        match self {
            IdleDirection::Input => 0,
            IdleDirection::Any => 1,
        }
    }

    pub fn from_u32(v: u32) -> IdleDirection {
        if v == 1 {
            IdleDirection::Any
        } else {
            IdleDirection::Input
        }
    }
}

/// What happens to a grant that would exceed a session limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnLimit {
    /// The new grant is refused and its flows killed.
    RejectNew,
    /// The oldest sessions in the way are killed (reason `evicted`).
    EvictOldest,
}

/// What a node cut off from the fleet for `fleet.grace` does with a
/// class's sessions (docs/fleet.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnPartition {
    /// Keeps enforcing what it knows: deadlines hold, revocations issued
    /// meanwhile are applied after healing.
    #[default]
    BestEffort,
    /// Kills the class's sessions and refuses new ones until it is back:
    /// a node that cannot hear revocations grants nothing of the class.
    FailClosed,
}

impl OnPartition {
    pub fn name(self) -> &'static str {
        match self {
            OnPartition::BestEffort => "best-effort",
            OnPartition::FailClosed => "fail-closed",
        }
    }
}

/// A policy class: defaults and bounds for the grants that name it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Class {
    pub name: String,
    /// Used when a grant gives neither ttl nor expires_at.
    pub ttl_ns: Option<u64>,
    pub max_ttl_ns: u64,
    /// Default idle timeout, and the longest a non-root grant may ask for.
    pub idle_timeout_ns: Option<u64>,
    pub idle_direction: IdleDirection,
    /// 0 = unlimited.
    pub max_per_target: u32,
    pub max_per_user: u32,
    pub on_limit: OnLimit,
    pub on_partition: OnPartition,
    /// `max_per_target` and `max_per_user` count the sessions of every
    /// node (`limit_scope = "fleet"`), not only this one's.
    pub fleet_limits: bool,
}

impl Class {
    /// The class used by grants that name none, when the config defines no
    /// `default` class: bounded only by the global max_ttl.
    pub fn fallback(max_ttl_ns: u64) -> Class {
        Class {
            name: "default".into(),
            ttl_ns: None,
            max_ttl_ns,
            idle_timeout_ns: None,
            idle_direction: IdleDirection::Input,
            max_per_target: 0,
            max_per_user: 0,
            on_limit: OnLimit::RejectNew,
            on_partition: OnPartition::BestEffort,
            fleet_limits: false,
        }
    }
}

/// What a grant asked for, before its class is applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Asked {
    pub expiry: Option<Expiry>,
    pub idle_timeout_ns: Option<u64>,
    pub idle_direction: Option<IdleDirection>,
}

/// The terms a session gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub deadline_ns: u64,
    /// See [`Expiry::wall_anchor`].
    pub expires_unix_ns: u64,
    /// 0 = no idle timeout.
    pub idle_timeout_ns: u64,
    pub idle_direction: IdleDirection,
}

/// Applies a class to what a grant asked. A grant may only tighten the
/// class's bounds (shorter deadline, shorter idle timeout, stricter
/// direction) unless `privileged` (root); nobody passes the global max_ttl.
pub fn terms_for(
    class: &Class,
    asked: &Asked,
    now: Now,
    global: DeadlineLimits,
    privileged: bool,
) -> Result<Terms, PolicyError> {
    let expiry = match (&asked.expiry, class.ttl_ns) {
        (Some(e), _) => e.clone(),
        (None, Some(ttl)) => Expiry::Ttl(ttl),
        (None, None) => {
            return err(format!(
                "class {:?} has no default ttl, so the grant needs ttl or expires_at",
                class.name
            ))
        }
    };
    let bound = if privileged {
        global.max_ttl_ns
    } else {
        class.max_ttl_ns.min(global.max_ttl_ns)
    };
    let deadline_ns =
        deadline_for(&expiry, now, DeadlineLimits { max_ttl_ns: bound }).map_err(|e| {
            if privileged || bound == global.max_ttl_ns {
                e
            } else {
                PolicyError(format!("{e} (class {:?})", class.name))
            }
        })?;
    let idle_timeout_ns = match (asked.idle_timeout_ns, class.idle_timeout_ns) {
        (Some(0), _) => return err("idle_timeout must be greater than zero"),
        (Some(asked), Some(limit)) if asked > limit && !privileged => {
            return err(format!(
                "idle_timeout {} is longer than class {:?} allows ({})",
                format_duration(asked),
                class.name,
                format_duration(limit)
            ))
        }
        (Some(asked), _) => asked,
        (None, Some(limit)) => limit,
        (None, None) => 0,
    };
    let idle_direction = match asked.idle_direction {
        Some(IdleDirection::Any) if class.idle_direction == IdleDirection::Input && !privileged => {
            return err(format!(
                "idle_direction \"any\" is looser than class {:?} allows (\"input\")",
                class.name
            ))
        }
        Some(d) => d,
        None => class.idle_direction,
    };
    Ok(Terms {
        deadline_ns,
        expires_unix_ns: expiry.wall_anchor(),
        idle_timeout_ns,
        idle_direction,
    })
}

/// A live session, as the limit rules see it (borrowed from the daemon's
/// state: admission allocates nothing per live session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder<'a> {
    pub id: u64,
    pub user: &'a str,
    pub target: &'a str,
    pub granted_unix_ns: i128,
}

/// The global cap on live sessions (censhare's maxSessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalLimit {
    /// 0 = only the session table's size.
    pub max_sessions: u32,
    pub on_limit: OnLimit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Refused; the message names who holds the place and since when.
    Reject(String),
    /// Admitted once these sessions are killed.
    Evict(Vec<u64>),
}

impl Class {
    /// Whether any limit applies to grants of this class.
    pub fn is_limited(&self, global: GlobalLimit) -> bool {
        self.max_per_target != 0 || self.max_per_user != 0 || global.max_sessions != 0
    }
}

/// Decides whether a new session for `user` on `target` fits the limits.
/// Sessions are counted, not flows. `live` is every live session.
pub fn admit(
    live: &[Holder<'_>],
    user: &str,
    target: &str,
    class: &Class,
    global: GlobalLimit,
) -> Admission {
    /// The sessions one limit counts.
    enum Scope {
        Target,
        User,
        Host,
    }
    let covers = |scope: &Scope, h: &Holder<'_>| match scope {
        Scope::Target => h.target == target,
        Scope::User => h.user == user,
        Scope::Host => true,
    };
    let limits = [
        (
            Scope::Target,
            class.max_per_target,
            class.on_limit,
            format!("target {target:?}"),
        ),
        (
            Scope::User,
            class.max_per_user,
            class.on_limit,
            format!("user {user:?}"),
        ),
        (
            Scope::Host,
            global.max_sessions,
            global.on_limit,
            "this host".to_string(),
        ),
    ];
    let mut evict: Vec<u64> = Vec::new();
    for (scope, max, on_limit, what) in limits {
        if max == 0 {
            continue;
        }
        let mut holders: Vec<&Holder<'_>> = live
            .iter()
            .filter(|h| covers(&scope, h) && !evict.contains(&h.id))
            .collect();
        if holders.len() < max as usize {
            continue;
        }
        holders.sort_by_key(|h| (h.granted_unix_ns, h.id));
        match on_limit {
            OnLimit::RejectNew => {
                let names: Vec<String> = holders
                    .iter()
                    .map(|h| {
                        format!(
                            "user {:?} (on {:?} since {})",
                            h.user,
                            h.target,
                            format_rfc3339(h.granted_unix_ns)
                        )
                    })
                    .collect();
                return Admission::Reject(format!(
                    "{what} already has {} of its {max} allowed session(s), held by {}",
                    holders.len(),
                    names.join(", ")
                ));
            }
            OnLimit::EvictOldest => {
                let excess = holders.len() + 1 - max as usize;
                evict.extend(holders.iter().take(excess).map(|h| h.id));
            }
        }
    }
    if evict.is_empty() {
        Admission::Admit
    } else {
        Admission::Evict(evict)
    }
}

/// One socket's activity, as the kernel reports it (tcp_info).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketActivity {
    /// Accepted (faces the client): received data is input. Otherwise it
    /// connected out (faces the console): sent data is input.
    pub passive: bool,
    pub last_recv_ago_ms: u32,
    pub last_sent_ago_ms: u32,
}

/// tcp_info reports "ms ago" from jiffies, so the true moment of the last
/// data can be up to one jiffy later than the reported one. Activity is
/// credited one jiffy at the slowest tick (HZ=100) later, so that an idle
/// kill can come a few milliseconds late but never early.
pub const JIFFY_SLACK_MS: u32 = 10;

/// When a session was last active: the latest of its sockets' activity in
/// `direction`, a proxy's `touch`, and the grant itself.
pub fn last_activity(
    now_ns: u64,
    direction: IdleDirection,
    sockets: &[SocketActivity],
    floor_ns: u64,
) -> u64 {
    let at = |ago_ms: u32| {
        let ago_ms = ago_ms.saturating_sub(JIFFY_SLACK_MS);
        now_ns.saturating_sub(ago_ms as u64 * NS_PER_MS)
    };
    sockets
        .iter()
        .map(|s| match (direction, s.passive) {
            (IdleDirection::Input, true) => at(s.last_recv_ago_ms),
            (IdleDirection::Input, false) => at(s.last_sent_ago_ms),
            (IdleDirection::Any, _) => at(s.last_recv_ago_ms.min(s.last_sent_ago_ms)),
        })
        .fold(floor_ns, u64::max)
}

/// Who may change grants: root always, then the configured uids and gids
/// and the callers a scope names. A session belongs to the uid that created
/// it: only that uid, root, and callers whose scope is every session
/// (operators) may join, extend, touch or revoke it, see it in `list`, or
/// revoke a flow that no session holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// Callers whose scope is every session (an operator group that may
    /// `revoke --user` everywhere).
    pub operator_uids: Vec<u32>,
    pub operator_gids: Vec<u32>,
    /// Narrower or wider rights for the callers each names.
    pub scopes: Vec<Scope>,
    /// Live sessions one uid may have created (root: no quota), unless a
    /// scope of its says otherwise.
    pub max_sessions_per_uid: u32,
    /// Pre-registered connections (`expect` items) waiting in one uid's
    /// sessions, likewise.
    pub max_expecting_per_uid: u32,
}

/// What the callers a `[[access.scope]]` names may do. An empty list means
/// "any". A caller named by several scopes may do what any one of them
/// allows (the largest quota applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// Classes its grants may name (the default class is `""`).
    pub classes: Vec<String>,
    /// Targets its grants may name: exact, or a prefix ending in `*`.
    pub targets: Vec<String>,
    /// Inclusive port ranges: every flow it grants has a port in one.
    pub ports: Vec<(u16, u16)>,
    /// May act on every session, as an operator.
    pub all_sessions: bool,
    pub max_sessions: Option<u32>,
    pub max_expecting: Option<u32>,
}

impl Scope {
    fn names(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }

    /// Whether a grant of `class` on `target` for flows with `ports` (each
    /// flow's two ports) is in this scope.
    pub fn permits(&self, class: &str, target: &str, ports: &[[u16; 2]]) -> bool {
        let class_ok = self.classes.is_empty() || self.classes.iter().any(|c| c == class);
        let target_ok = self.targets.is_empty()
            || self.targets.iter().any(|t| match t.strip_suffix('*') {
                Some(prefix) => target.starts_with(prefix),
                None => t == target,
            });
        let in_range = |p: u16| self.ports.iter().any(|(a, b)| (*a..=*b).contains(&p));
        let ports_ok =
            self.ports.is_empty() || ports.iter().all(|f| f.iter().any(|p| in_range(*p)));
        class_ok && target_ok && ports_ok
    }
}

/// Which quota a caller is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub sessions: u32,
    pub expecting: u32,
}

impl Access {
    fn scopes_of(&self, uid: u32, gid: u32) -> impl Iterator<Item = &Scope> {
        self.scopes.iter().filter(move |s| s.names(uid, gid))
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
            || self.is_operator(uid, gid)
            || self.scopes_of(uid, gid).next().is_some()
    }

    /// Whether the caller's scope is every session.
    pub fn is_operator(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || self.operator_uids.contains(&uid)
            || self.operator_gids.contains(&gid)
            || self.scopes_of(uid, gid).any(|s| s.all_sessions)
    }

    /// Whether the caller may act on a session `owner` (a uid) created.
    pub fn may_touch(&self, uid: u32, gid: u32, owner: u32) -> bool {
        uid == owner || self.is_operator(uid, gid)
    }

    /// Whether the caller may grant `class` on `target` for flows with
    /// `ports`. A caller no scope names is not restricted (root never is).
    pub fn may_grant(
        &self,
        uid: u32,
        gid: u32,
        class: &str,
        target: &str,
        ports: &[[u16; 2]],
    ) -> bool {
        if uid == 0 {
            return true;
        }
        let mut named = self.scopes_of(uid, gid).peekable();
        named.peek().is_none() || named.any(|s| s.permits(class, target, ports))
    }

    /// The caller's quota; `None` for root.
    pub fn quota(&self, uid: u32, gid: u32) -> Option<Quota> {
        if uid == 0 {
            return None;
        }
        let mut quota = Quota {
            sessions: self.max_sessions_per_uid,
            expecting: self.max_expecting_per_uid,
        };
        let mut scoped = Quota {
            sessions: 0,
            expecting: 0,
        };
        let mut any = (false, false);
        for s in self.scopes_of(uid, gid) {
            if let Some(n) = s.max_sessions {
                scoped.sessions = scoped.sessions.max(n);
                any.0 = true;
            }
            if let Some(n) = s.max_expecting {
                scoped.expecting = scoped.expecting.max(n);
                any.1 = true;
            }
        }
        if any.0 {
            quota.sessions = scoped.sessions;
        }
        if any.1 {
            quota.expecting = scoped.expecting;
        }
        Some(quota)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timefmt::NS_PER_SEC;

    const LIMITS: DeadlineLimits = DeadlineLimits {
        max_ttl_ns: 3600 * NS_PER_SEC,
    };
    const NOW: Now = Now {
        boot_ns: 1_000 * NS_PER_SEC,
        unix_ns: 1_795_341_600 * NS_PER_SEC as i128,
    };

    #[test]
    fn deadlines_from_ttl_and_wall_time() {
        assert_eq!(
            deadline_for(&Expiry::Ttl(300 * NS_PER_MS), NOW, LIMITS).unwrap(),
            NOW.boot_ns + 300 * NS_PER_MS
        );
        let at = NOW.unix_ns + 60 * NS_PER_SEC as i128;
        assert_eq!(
            deadline_for(&Expiry::At(at), NOW, LIMITS).unwrap(),
            NOW.boot_ns + 60 * NS_PER_SEC
        );
    }

    #[test]
    fn deadlines_refuse_past_zero_and_absurd() {
        assert!(deadline_for(&Expiry::Ttl(0), NOW, LIMITS)
            .unwrap_err()
            .0
            .contains("greater than zero"));
        let past = Expiry::At(NOW.unix_ns - 1);
        assert!(deadline_for(&past, NOW, LIMITS)
            .unwrap_err()
            .0
            .contains("not in the future"));
        let far = Expiry::Ttl(3601 * NS_PER_SEC);
        assert!(deadline_for(&far, NOW, LIMITS)
            .unwrap_err()
            .0
            .contains("max_ttl 1h"));
    }

    #[test]
    fn expires_at_deadlines_follow_the_wall_clock_and_ttls_do_not() {
        assert_eq!(Expiry::Ttl(5 * NS_PER_SEC).wall_anchor(), 0);
        let at = NOW.unix_ns + 600 * NS_PER_SEC as i128;
        let anchor = Expiry::At(at).wall_anchor();
        assert_eq!(anchor as i128, at);
        // The clock as it was: the deadline deadline_for gave.
        assert_eq!(
            follow_wall_clock(anchor, NOW, LIMITS),
            deadline_for(&Expiry::At(at), NOW, LIMITS).unwrap()
        );
        // Set 5 minutes forward: the deadline is 5 minutes nearer.
        let forward = Now {
            unix_ns: NOW.unix_ns + 300 * NS_PER_SEC as i128,
            ..NOW
        };
        assert_eq!(
            follow_wall_clock(anchor, forward, LIMITS),
            NOW.boot_ns + 300 * NS_PER_SEC
        );
        // Set past the expiry: now.
        let past = Now {
            unix_ns: at + 1,
            ..NOW
        };
        assert_eq!(follow_wall_clock(anchor, past, LIMITS), NOW.boot_ns);
        // Set a day back: later, but never beyond max_ttl from now.
        let back = Now {
            unix_ns: NOW.unix_ns - 86_400 * NS_PER_SEC as i128,
            ..NOW
        };
        assert_eq!(
            follow_wall_clock(anchor, back, LIMITS),
            NOW.boot_ns + LIMITS.max_ttl_ns
        );
    }

    fn class() -> Class {
        Class {
            name: "vm-console".into(),
            ttl_ns: Some(600 * NS_PER_SEC),
            max_ttl_ns: 3600 * NS_PER_SEC,
            idle_timeout_ns: Some(900 * NS_PER_SEC),
            idle_direction: IdleDirection::Input,
            max_per_target: 1,
            max_per_user: 0,
            on_limit: OnLimit::RejectNew,
            on_partition: OnPartition::BestEffort,
            fleet_limits: false,
        }
    }

    const GLOBAL: DeadlineLimits = DeadlineLimits {
        max_ttl_ns: 86_400 * NS_PER_SEC,
    };

    #[test]
    fn class_defaults_fill_what_the_grant_leaves_out() {
        let t = terms_for(&class(), &Asked::default(), NOW, GLOBAL, false).unwrap();
        assert_eq!(t.deadline_ns, NOW.boot_ns + 600 * NS_PER_SEC);
        assert_eq!(t.idle_timeout_ns, 900 * NS_PER_SEC);
        assert_eq!(t.idle_direction, IdleDirection::Input);
        let none = terms_for(
            &Class::fallback(GLOBAL.max_ttl_ns),
            &Asked::default(),
            NOW,
            GLOBAL,
            false,
        );
        assert!(none.unwrap_err().0.contains("needs ttl or expires_at"));
    }

    #[test]
    fn grants_may_only_tighten_unless_root() {
        let c = class();
        let longer = Asked {
            expiry: Some(Expiry::Ttl(7200 * NS_PER_SEC)),
            ..Default::default()
        };
        assert!(terms_for(&c, &longer, NOW, GLOBAL, false)
            .unwrap_err()
            .0
            .contains("class \"vm-console\""));
        assert!(
            terms_for(&c, &longer, NOW, GLOBAL, true).is_ok(),
            "root may loosen"
        );
        let lazy = Asked {
            idle_timeout_ns: Some(3600 * NS_PER_SEC),
            ..Default::default()
        };
        assert!(terms_for(&c, &lazy, NOW, GLOBAL, false)
            .unwrap_err()
            .0
            .contains("idle_timeout"));
        let loose = Asked {
            idle_direction: Some(IdleDirection::Any),
            ..Default::default()
        };
        assert!(terms_for(&c, &loose, NOW, GLOBAL, false)
            .unwrap_err()
            .0
            .contains("looser"));
        let tight = Asked {
            expiry: Some(Expiry::Ttl(60 * NS_PER_SEC)),
            idle_timeout_ns: Some(30 * NS_PER_SEC),
            idle_direction: Some(IdleDirection::Input),
        };
        let t = terms_for(&c, &tight, NOW, GLOBAL, false).unwrap();
        assert_eq!(
            (t.deadline_ns - NOW.boot_ns, t.idle_timeout_ns),
            (60 * NS_PER_SEC, 30 * NS_PER_SEC)
        );
        let beyond = Asked {
            expiry: Some(Expiry::Ttl(2 * 86_400 * NS_PER_SEC)),
            ..Default::default()
        };
        assert!(
            terms_for(&c, &beyond, NOW, GLOBAL, true).is_err(),
            "not even root passes max_ttl"
        );
    }

    fn holder<'a>(id: u64, user: &'a str, target: &'a str, at: i128) -> Holder<'a> {
        Holder {
            id,
            user,
            target,
            granted_unix_ns: at,
        }
    }

    const NO_GLOBAL: GlobalLimit = GlobalLimit {
        max_sessions: 0,
        on_limit: OnLimit::RejectNew,
    };

    #[test]
    fn one_per_target_rejects_naming_the_holder() {
        let live = [holder(1, "alice", "vm-1", 0), holder(2, "carol", "vm-2", 0)];
        match admit(&live, "bob", "vm-1", &class(), NO_GLOBAL) {
            Admission::Reject(why) => {
                assert!(
                    why.contains("alice") && why.contains("1970-01-01T00:00:00"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            admit(&live, "bob", "vm-3", &class(), NO_GLOBAL),
            Admission::Admit
        );
    }

    #[test]
    fn evict_oldest_picks_the_oldest_in_scope() {
        let mut c = class();
        c.on_limit = OnLimit::EvictOldest;
        c.max_per_target = 2;
        let live = [
            holder(1, "alice", "vm-1", 20),
            holder(2, "bob", "vm-1", 10),
            holder(3, "carol", "vm-2", 0),
        ];
        assert_eq!(
            admit(&live, "dave", "vm-1", &c, NO_GLOBAL),
            Admission::Evict(vec![2])
        );
        let global = GlobalLimit {
            max_sessions: 3,
            on_limit: OnLimit::EvictOldest,
        };
        c.max_per_target = 0;
        assert_eq!(
            admit(&live, "dave", "vm-9", &c, global),
            Admission::Evict(vec![3])
        );
        c.max_per_user = 1;
        let live = [holder(1, "alice", "vm-1", 0), holder(2, "alice", "vm-2", 5)];
        assert_eq!(
            admit(&live, "alice", "vm-3", &c, NO_GLOBAL),
            Admission::Evict(vec![1, 2])
        );
    }

    #[test]
    fn idle_activity_follows_direction_and_socket_role() {
        let now = 100 * NS_PER_SEC;
        let slack = JIFFY_SLACK_MS as u64 * NS_PER_MS;
        // The client-facing socket received nothing for 40 s but sent a
        // second ago (screen updates); the upstream socket forwarded input
        // 10 s ago.
        let client = SocketActivity {
            passive: true,
            last_recv_ago_ms: 40_000,
            last_sent_ago_ms: 1_000,
        };
        let upstream = SocketActivity {
            passive: false,
            last_recv_ago_ms: 1_000,
            last_sent_ago_ms: 10_000,
        };
        let input = IdleDirection::Input;
        assert_eq!(
            last_activity(now, input, &[client], 0),
            60 * NS_PER_SEC + slack
        );
        assert_eq!(
            last_activity(now, input, &[client, upstream], 0),
            90 * NS_PER_SEC + slack
        );
        assert_eq!(
            last_activity(now, IdleDirection::Any, &[client], 0),
            99 * NS_PER_SEC + slack
        );
        assert_eq!(
            last_activity(now, input, &[client], 95 * NS_PER_SEC),
            95 * NS_PER_SEC
        );
    }

    #[test]
    fn idle_activity_is_never_placed_earlier_than_it_may_have_been() {
        // Reported 5 ms ago (less than a jiffy): counts as now.
        let s = SocketActivity {
            passive: true,
            last_recv_ago_ms: 5,
            last_sent_ago_ms: 5,
        };
        assert_eq!(
            last_activity(NS_PER_SEC, IdleDirection::Input, &[s], 0),
            NS_PER_SEC
        );
    }

    #[test]
    fn sessions_belong_to_their_creator_and_operators_see_all() {
        let a = Access {
            uids: vec![1000, 1001],
            operator_gids: vec![50],
            ..Access::default()
        };
        assert!(a.may_touch(1000, 1000, 1000));
        assert!(!a.may_touch(1001, 1001, 1000), "another proxy");
        assert!(a.may_touch(0, 0, 1000), "root");
        assert!(a.may_touch(2000, 50, 1000), "an operator by group");
        assert!(a.allows(2000, 50), "operators may change grants");
    }

    #[test]
    fn scopes_narrow_grants_widen_reach_and_set_quotas() {
        let a = Access {
            uids: vec![1000],
            max_sessions_per_uid: 100,
            max_expecting_per_uid: 10,
            scopes: vec![
                Scope {
                    uids: vec![2000],
                    classes: vec!["vnc".into()],
                    targets: vec!["vm-*".into(), "host-1".into()],
                    ports: vec![(5900, 5999)],
                    max_sessions: Some(5),
                    ..Scope::default()
                },
                Scope {
                    gids: vec![60],
                    all_sessions: true,
                    ..Scope::default()
                },
            ],
            ..Access::default()
        };
        let vnc = [[5901, 40000]];
        assert!(a.allows(2000, 2000), "a scope admits its callers");
        assert!(a.may_grant(2000, 2000, "vnc", "vm-7", &vnc));
        assert!(a.may_grant(2000, 2000, "vnc", "host-1", &vnc));
        assert!(
            !a.may_grant(2000, 2000, "vnc", "host-12", &vnc),
            "exact target"
        );
        assert!(!a.may_grant(2000, 2000, "ssh", "vm-7", &vnc), "class");
        assert!(
            !a.may_grant(2000, 2000, "vnc", "vm-7", &[[22, 40000]]),
            "port"
        );
        assert!(
            !a.may_grant(2000, 2000, "vnc", "vm-7", &[[5901, 1], [22, 2]]),
            "every flow"
        );
        assert!(
            a.may_grant(1000, 1000, "ssh", "anything", &[[22, 1]]),
            "unscoped caller"
        );
        assert!(a.may_grant(0, 0, "ssh", "x", &[[22, 1]]), "root");
        assert!(!a.may_touch(2000, 2000, 1000));
        assert!(a.may_touch(3000, 60, 1000), "a scope with all_sessions");
        assert!(a.is_operator(3000, 60));
        assert_eq!(
            a.quota(2000, 2000),
            Some(Quota {
                sessions: 5,
                expecting: 10
            })
        );
        assert_eq!(
            a.quota(1000, 1000),
            Some(Quota {
                sessions: 100,
                expecting: 10
            })
        );
        assert_eq!(a.quota(0, 0), None);
    }

    #[test]
    fn access_root_uids_gids() {
        let a = Access {
            uids: vec![1000],
            gids: vec![50],
            ..Access::default()
        };
        assert!(a.allows(0, 0));
        assert!(a.allows(1000, 1000));
        assert!(a.allows(1234, 50));
        assert!(!a.allows(1234, 1234));
        assert!(!Access::default().allows(65534, 65534));
    }
}
