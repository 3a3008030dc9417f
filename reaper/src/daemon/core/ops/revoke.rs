//! `revoke`: ends sessions now (by name, user, target or class), or kills
//! one flow named by its addresses. Every kill goes through the pipeline
//! and is answered with the same records the audit trail gets.
//!
//! Within the caller's scope only: a session by name must be the caller's
//! (else `permission_denied`); by user, target or class, only the caller's
//! sessions among those that match end; a flow must belong to one of the
//! caller's sessions, and a flow that no session holds needs an operator.

#![forbid(unsafe_code)]

use super::Caller;
use crate::daemon::core::index::Session;
use crate::daemon::core::kill::Victims;
use crate::daemon::core::model::{
    refuse, Cause, Change, ChangeKind, Code, Reason, Refused, Revoked,
};
use crate::daemon::core::Core;
use crate::kernel::Kernel;
use crate::protocol::{Op, RevokeSelector};

impl<K: Kernel> Core<K> {
    pub(super) fn revoke(
        &mut self,
        selector: RevokeSelector,
        caller: Caller,
    ) -> Result<Revoked, Refused> {
        let now = self.kernel.now().boot_ns;
        let access = &self.config.access;
        let mine = |s: &Session| super::may_touch(access, caller, s);
        let ids = match &selector {
            RevokeSelector::Session(name) => {
                let id = self.session_id(Op::Revoke, name)?;
                self.check_scope(Op::Revoke, caller, id)?;
                vec![id]
            }
            RevokeSelector::Class(class) => self.index.pick(|s| s.class() == class && mine(s)),
            RevokeSelector::User(user) => self.index.pick(|s| s.user() == user && mine(s)),
            RevokeSelector::Target(target) => self.index.pick(|s| s.target() == target && mine(s)),
            RevokeSelector::Flow {
                local,
                remote,
                netns,
            } => {
                let netns_cookie = self.netns_of(netns.as_ref(), caller)?;
                let cookies = self.lookup_addrs(*local, *remote, netns_cookie);
                let forwarded: Vec<_> = if cookies.is_empty() && netns.is_none() {
                    self.forwarded_key(*local, *remote).into_iter().collect()
                } else {
                    Vec::new()
                };
                if cookies.is_empty() && forwarded.is_empty() {
                    return refuse(
                        Code::NoSuchFlow,
                        format!("revoke: no tracked TCP flow {local} <-> {remote} in this network namespace"),
                    );
                }
                let holders = cookies
                    .iter()
                    .map(|c| self.index.flow(*c).map_or(0, |f| f.session))
                    .chain(
                        forwarded
                            .iter()
                            .map(|k| self.kernel.forwarded_grant(k).map_or(0, |g| g.session)),
                    );
                for session in holders.collect::<Vec<_>>() {
                    let allowed = if self.index.session(session).is_some() {
                        self.may_act_on(caller, session)
                    } else {
                        self.config.access.is_operator(caller.uid, caller.gid)
                    };
                    if !allowed {
                        return refuse(
                            Code::PermissionDenied,
                            format!(
                                "revoke: the flow {local} <-> {remote} is not in the scope of uid {}: it belongs to another uid's session, or to none (only root and [access] operators may revoke those)",
                                caller.uid
                            ),
                        );
                    }
                }
                let victims = Victims::Flows {
                    cookies: &cookies,
                    forwarded: &forwarded,
                    owner: None,
                };
                let kills = self.kill(victims, Cause::asked(Reason::Revoked, now, caller));
                return Ok(Revoked {
                    sessions: vec![],
                    kills,
                });
            }
        };
        let wall = self.kernel.now();
        let mut sessions = Vec::with_capacity(ids.len());
        for id in &ids {
            let snapshot = self.snapshot(*id, wall);
            self.audit.change(&Change {
                kind: ChangeKind::Revoked,
                by: caller,
                by_node: None,
                at_unix_ns: wall.unix_ns,
                session: &snapshot,
            });
            sessions.push(snapshot.name);
        }
        let kills = self.kill(
            Victims::Sessions(&ids),
            Cause::asked(Reason::Revoked, now, caller),
        );
        Ok(Revoked { sessions, kills })
    }
}
