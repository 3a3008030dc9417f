//! `extend`: moves a session's deadline later (never earlier: revoke ends
//! a session now). The deadline obeys the same limits as a grant's.

#![forbid(unsafe_code)]

use tracing::info;

use crate::daemon::core::model::{refuse, Code, Granted, Refused};
use crate::daemon::core::Core;
use crate::kernel::Kernel;
use crate::policy;
use crate::protocol::{ExtendRequest, Op};
use crate::timefmt;

impl<K: Kernel> Core<K> {
    pub(super) fn extend(&mut self, e: ExtendRequest) -> Result<Granted, Refused> {
        let now = self.kernel.now();
        let id = self.session_id(Op::Extend, &e.session)?;
        let deadline = policy::deadline_for(&e.expiry, now, self.limits())
            .map_err(|err| Refused::new(Code::DeadlineRefused, format!("extend: {err}")))?;
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
        info!(session = %granted.session.name,
              deadline = %timefmt::format_rfc3339(granted.session.deadline_unix_ns), "extended");
        Ok(granted)
    }
}
