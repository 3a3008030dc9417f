//! `watch`: which live events a caller may follow. The stream itself is
//! the control plane's (it outlives any one call into the core); what the
//! core decides is the filter, by the rule `list` keeps: a caller sees the
//! events of the sessions it created, root and the operators see all.

#![forbid(unsafe_code)]

use super::Caller;
use crate::daemon::core::model::WatchFilter;
use crate::daemon::core::Core;
use crate::kernel::Kernel;
use crate::protocol::ListArgs;

impl<K: Kernel> Core<K> {
    pub(super) fn watch(&self, selector: ListArgs, caller: Caller) -> WatchFilter {
        WatchFilter {
            everything: self.config.access.is_operator(caller.uid, caller.gid),
            uid: caller.uid,
            selector,
        }
    }
}
