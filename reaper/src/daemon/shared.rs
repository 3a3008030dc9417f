//! What the daemon's tasks share: the core behind one mutex, held only for
//! short synchronous sections (never across an await), and the telemetry
//! (metrics, the live event stream, readiness), which needs no core lock.

#![forbid(unsafe_code)]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use super::audit::AuditProgress;
use super::core::Core;
use super::events::EventBus;
use super::metrics::Metrics;
use crate::enforcer::Enforcer;

pub(super) type Shared = Arc<Mutex<Core<Enforcer>>>;

pub(super) fn lock(state: &Shared) -> MutexGuard<'_, Core<Enforcer>> {
    // A panic inside a handler must not take the whole control plane down.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone, Default)]
pub(super) struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub events: EventBus,
    /// How far the audit writer has got (answers wait for their lines).
    pub audit: Arc<AuditProgress>,
    /// Programs attached and control socket listening.
    pub ready: Arc<AtomicBool>,
}
