//! `status`: what the daemon is doing, for operators.

#![forbid(unsafe_code)]

use crate::daemon::core::model::Status;
use crate::daemon::core::Core;
use crate::kernel::Kernel;

impl<K: Kernel> Core<K> {
    pub fn status(&self) -> Status {
        Status {
            uptime_ns: self.kernel.now().boot_ns - self.started_boot_ns,
            cgroup: self.kernel.cgroup().display().to_string(),
            pin_path: self.kernel.pin_path().display().to_string(),
            sessions: self.index.session_count(),
            sessions_by_class: self.index.sessions().fold(
                std::collections::BTreeMap::new(),
                |mut by, (_, s)| {
                    *by.entry(s.class().to_owned()).or_default() += 1;
                    by
                },
            ),
            tracked_flows: self.index.flow_count(),
            granted_flows: self.index.granted_flow_count(),
            max_flows: self.config.max_flows,
            max_sessions: self.config.max_sessions,
            counters: self.kernel.counters(),
            namespaces: self.kernel.namespaces_open(),
            kill_path: self.kernel.kill_path(),
            watch: self.config.watch.clone(),
            fence: self.config.fence.clone(),
            classes: self.config.classes.keys().cloned().collect(),
            config_loads: self.config_loads,
            last_reload_error: self.last_reload_error.clone(),
            fleet: self.fleet_status().map(Box::new),
        }
    }
}
