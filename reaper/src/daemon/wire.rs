//! The control plane's adapter: the core's domain values and refusals as
//! the protocol's views. The only place that knows both sides; changing
//! the JSON shape changes this file and `protocol`, never the core.

#![forbid(unsafe_code)]

use super::core::model::{
    Code, FlowSnapshot, Granted, Kill, Listing, Outcome, Refused, Revoked, SessionSnapshot, Status,
};
use crate::protocol::{
    Answer, BatchItem, FlowView, GrantResult, KillView, ListResult, Refusal, RefusalCode,
    RevokeResult, SessionView, StatusResult, PROTOCOL_VERSION,
};
use crate::timefmt;
use crate::tuple;

/// An operation's result as the response's `result`.
pub fn result(outcome: Outcome) -> Answer {
    match outcome {
        Outcome::Granted(g) => Answer::Granted(grant_result(g)),
        Outcome::Revoked(r) => Answer::Revoked(revoke_result(r)),
        Outcome::Listed(l) => Answer::Listed(list_result(l)),
        Outcome::Status(s) => Answer::Status(status_result(s)),
        Outcome::Watching(_) => Answer::Watching { watching: true },
        Outcome::Batch(items) => Answer::Batch {
            results: items
                .into_iter()
                .map(|(_, outcome)| match outcome {
                    Ok(o) => BatchItem {
                        ok: true,
                        result: Some(result(o)),
                        error: None,
                    },
                    Err(r) => BatchItem {
                        ok: false,
                        result: None,
                        error: Some(refusal(r)),
                    },
                })
                .collect(),
        },
    }
}

pub fn refusal(refused: Refused) -> Refusal {
    let code = match refused.code {
        Code::BadValue => RefusalCode::BadValue,
        Code::DeadlineRefused => RefusalCode::DeadlineRefused,
        Code::NoSuchFlow => RefusalCode::NoSuchFlow,
        Code::NoSuchSession => RefusalCode::NoSuchSession,
        Code::FlowNotTracked => RefusalCode::FlowNotTracked,
        Code::SessionConflict => RefusalCode::SessionConflict,
        Code::FlowConflict => RefusalCode::FlowConflict,
        Code::LimitReached => RefusalCode::LimitReached,
        Code::PermissionDenied => RefusalCode::PermissionDenied,
        Code::BadFd => RefusalCode::BadFd,
        Code::TableFull => RefusalCode::TableFull,
        Code::QuotaExceeded => RefusalCode::QuotaExceeded,
        Code::Locked => RefusalCode::Locked,
        Code::Partitioned => RefusalCode::Partitioned,
        Code::FlowTableExhausted => RefusalCode::FlowTableExhausted,
        Code::Internal => RefusalCode::Internal,
    };
    Refusal::new(code, refused.message)
}

fn flow_view(f: &FlowSnapshot) -> FlowView {
    let (local, remote) = tuple::addrs_of(&f.tuple);
    FlowView {
        cookie: f.cookie,
        local: local.to_string(),
        remote: remote.to_string(),
        established: timefmt::format_rfc3339(f.established_unix_ns),
        path: f.path.name().to_string(),
    }
}

pub fn session_view(s: SessionSnapshot) -> SessionView {
    SessionView {
        flows: s.flows.iter().map(flow_view).collect(),
        session: s.name,
        user: s.user,
        target: s.target,
        class: s.class,
        deadline: timefmt::format_rfc3339(s.deadline_unix_ns),
        deadline_boot_ns: s.deadline_boot_ns,
        time_left_ms: (s.time_left_ns / timefmt::NS_PER_MS as i128) as i64,
        granted_at: timefmt::format_rfc3339(s.granted_unix_ns),
        granted_by_uid: s.granted_by_uid,
        idle_timeout_ms: (s.idle_timeout_ns != 0).then_some(s.idle_timeout_ns / timefmt::NS_PER_MS),
        idle_direction: s.idle_direction,
        expecting: s.expecting,
    }
}

pub fn kill_view(k: &Kill) -> KillView {
    let (local, remote) = tuple::addrs_of(&k.tuple);
    KillView {
        session: k.owner.session.clone(),
        cookie: k.cookie,
        local: local.to_string(),
        remote: remote.to_string(),
        path: k.path.name().to_string(),
        result: k.result.name().to_string(),
    }
}

fn grant_result(g: Granted) -> GrantResult {
    GrantResult {
        session: session_view(g.session),
        created: g.created,
    }
}

fn revoke_result(r: Revoked) -> RevokeResult {
    RevokeResult {
        sessions: r.sessions,
        kills: r.kills.iter().map(kill_view).collect(),
    }
}

fn list_result(l: Listing) -> ListResult {
    ListResult {
        now: timefmt::format_rfc3339(l.now_unix_ns),
        sessions: l.sessions.into_iter().map(session_view).collect(),
    }
}

fn status_result(s: Status) -> StatusResult {
    StatusResult {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        uptime_ms: s.uptime_ns / timefmt::NS_PER_MS,
        cgroup: s.cgroup,
        pin_path: s.pin_path,
        sessions: s.sessions,
        sessions_by_class: s.sessions_by_class,
        tracked_flows: s.tracked_flows,
        granted_flows: s.granted_flows,
        max_flows: s.max_flows,
        max_sessions: s.max_sessions,
        counters: s.counters,
        namespaces: s.namespaces,
        kill_path: s.kill_path.name().to_string(),
        watch: s.watch,
        fence: s.fence,
        classes: s.classes,
        config_loads: s.config_loads,
        last_reload_error: s.last_reload_error,
        fleet: s.fleet,
    }
}
