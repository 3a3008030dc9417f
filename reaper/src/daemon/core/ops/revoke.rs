//! `revoke`: ends sessions now (by name, user, target or class), or kills
//! one flow named by its addresses. Every kill goes through the pipeline
//! and is answered with the same records the audit trail gets.

#![forbid(unsafe_code)]

use crate::daemon::core::kill::Victims;
use crate::daemon::core::model::{refuse, Code, Reason, Refused, Revoked};
use crate::daemon::core::Core;
use crate::kernel::Kernel;
use crate::protocol::{Op, RevokeSelector};

impl<K: Kernel> Core<K> {
    pub(super) fn revoke(&mut self, selector: RevokeSelector) -> Result<Revoked, Refused> {
        let now = self.kernel.now().boot_ns;
        let ids = match &selector {
            RevokeSelector::Session(name) => vec![self.session_id(Op::Revoke, name)?],
            RevokeSelector::Class(class) => self.index.pick(|s| s.class() == class),
            RevokeSelector::User(user) => self.index.pick(|s| s.user() == user),
            RevokeSelector::Target(target) => self.index.pick(|s| s.target() == target),
            RevokeSelector::Flow {
                local,
                remote,
                netns,
            } => {
                let netns_cookie = self.netns_of(netns.as_ref())?;
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
                let victims = Victims::Flows {
                    cookies: &cookies,
                    forwarded: &forwarded,
                    owner: None,
                };
                let kills = self.kill(victims, Reason::Revoked, Some(now));
                return Ok(Revoked {
                    sessions: vec![],
                    kills,
                });
            }
        };
        let sessions = ids
            .iter()
            .filter_map(|id| self.index.session(*id).map(|s| s.name().to_owned()))
            .collect();
        let kills = self.kill(Victims::Sessions(&ids), Reason::Revoked, Some(now));
        Ok(Revoked { sessions, kills })
    }
}
