//! The core as the daemon's tasks share it: behind one mutex, held only for
//! short synchronous sections (never across an await).

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex, MutexGuard};

use super::core::Core;
use crate::enforcer::Enforcer;

pub(super) type Shared = Arc<Mutex<Core<Enforcer>>>;

pub(super) fn lock(state: &Shared) -> MutexGuard<'_, Core<Enforcer>> {
    // A panic inside a handler must not take the whole control plane down.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
