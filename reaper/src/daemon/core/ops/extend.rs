//! `extend`: moves a session's deadline later (never earlier: revoke ends
//! a session now). The deadline obeys the same limits as a grant's: its
//! class's `max_ttl`, and for root only the global one.

#![forbid(unsafe_code)]

use tracing::info;

use super::Caller;
use crate::daemon::core::model::{refuse, Change, ChangeKind, Code, Granted, Refused};
use crate::daemon::core::Core;
use crate::kernel::Kernel;
use crate::policy;
use crate::protocol::{ExtendRequest, Op};
use crate::timefmt;

impl<K: Kernel> Core<K> {
    pub(super) fn extend(&mut self, e: ExtendRequest, caller: Caller) -> Result<Granted, Refused> {
        let now = self.kernel.now();
        let id = self.session_id(Op::Extend, &e.session)?;
        self.check_scope(Op::Extend, caller, id)?;
        let class = self
            .index
            .session(id)
            .expect("found by name")
            .class()
            .to_owned();
        let mut limits = self.limits();
        if caller.uid != 0 {
            // A class removed by a reload since leaves the global bound.
            if let Some(c) = self.config.class(Some(&class)) {
                limits.max_ttl_ns = limits.max_ttl_ns.min(c.max_ttl_ns);
            }
        }
        let deadline = policy::deadline_for(&e.expiry, now, limits).map_err(|err| {
            Refused::new(
                Code::DeadlineRefused,
                format!("extend: {err} (session of class {class:?})"),
            )
        })?;
        let current = self
            .index
            .session(id)
            .expect("found by name")
            .terms
            .deadline_ns;
        if deadline < current {
            return refuse(
                Code::DeadlineRefused,
                format!(
                    "extend: the new deadline {} is earlier than the current {}; extend never shortens (revoke ends a session now)",
                    timefmt::format_rfc3339(self.wall(deadline)),
                    timefmt::format_rfc3339(self.wall(current))
                ),
            );
        }
        self.set_deadline(id, deadline, e.expiry.wall_anchor())?;
        let granted = self.granted(id, now);
        self.audit.change(&Change {
            kind: ChangeKind::Extended,
            by: caller,
            by_node: None,
            at_unix_ns: now.unix_ns,
            session: &granted.session,
        });
        info!(session = %granted.session.name,
              deadline = %timefmt::format_rfc3339(granted.session.deadline_unix_ns), "extended");
        Ok(granted)
    }
}
