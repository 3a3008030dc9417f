//! `list`: the sessions, in deadline order, optionally filtered by name,
//! user or target: the caller's own (all of them for root and the
//! operators), since names often carry token ids and users.

#![forbid(unsafe_code)]

use super::Caller;
use crate::daemon::core::model::Listing;
use crate::daemon::core::Core;
use crate::kernel::Kernel;
use crate::protocol::ListArgs;

impl<K: Kernel> Core<K> {
    pub(super) fn list(&self, filter: &ListArgs, caller: Caller) -> Listing {
        let now = self.kernel.now();
        let keep = |id: u64| {
            let Some(s) = self.index.session(id) else {
                return false;
            };
            super::may_touch(&self.config.access, caller, s)
                && filter.session.as_ref().is_none_or(|v| s.name() == v)
                && filter.user.as_ref().is_none_or(|v| s.user() == v)
                && filter.target.as_ref().is_none_or(|v| s.target() == v)
        };
        Listing {
            now_unix_ns: now.unix_ns,
            sessions: self
                .schedule
                .deadlines()
                .filter(|id| keep(*id))
                .map(|id| self.snapshot(id, now))
                .collect(),
        }
    }
}
