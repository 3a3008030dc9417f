//! The daemon's Prometheus metrics: counters the daemon bumps as it works
//! (kills, requests, reloads, watchers), and the page `/metrics` serves,
//! which adds what the core and the kernel hold at the moment of the
//! scrape (sessions by class, tracked flows, kernel counters).
//!
//! Names follow Prometheus' conventions (`reaper_` prefix, base units,
//! `_total` on counters). No label carries a user, session or target: those
//! are unbounded, and often secrets; the audit trail has them.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use super::core::model::{Kill, Status};

/// Upper bounds of the kill-lateness histogram's buckets, in seconds:
/// from well under the 2 ms a kill is held to, up to a second.
const LATENESS_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Debug, Default)]
struct Counters {
    /// (reason, path) → kills.
    kills: BTreeMap<(&'static str, &'static str), u64>,
    /// Kills per bucket (not cumulative; the page sums them), then above
    /// the last.
    lateness: [u64; LATENESS_BUCKETS.len() + 1],
    lateness_sum_ns: u128,
    /// (op, "ok" or the refusal code) → requests.
    requests: BTreeMap<(&'static str, &'static str), u64>,
    reloads_ok: u64,
    reloads_refused: u64,
    last_reload_ok: bool,
    last_reload_success_unix_s: f64,
    control_clients: u64,
    watchers: u64,
    watchers_dropped: u64,
    interfaces_attached: u64,
}

/// What the daemon counts; shared by its tasks (one lock, held for a few
/// additions at a time).
#[derive(Debug)]
pub struct Metrics {
    counters: Mutex<Counters>,
    started_unix_s: f64,
}

fn unix_now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let now = unix_now_s();
        Metrics {
            counters: Mutex::new(Counters {
                last_reload_ok: true,
                last_reload_success_unix_s: now,
                ..Counters::default()
            }),
            started_unix_s: now,
        }
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kill, once complete (a forwarded flow's once its RSTs are checked
    /// is not counted twice: only the first record of a flow is a kill).
    pub fn kill(&self, kill: &Kill) {
        if kill.acknowledged.is_some() {
            // The second record of a forwarded kill: its RST check.
            return;
        }
        let mut c = self.counters();
        *c.kills
            .entry((kill.reason.name(), kill.path.name()))
            .or_default() += 1;
        let late_s = kill.late_ns as f64 / 1e9;
        let bucket = LATENESS_BUCKETS
            .iter()
            .position(|le| late_s <= *le)
            .unwrap_or(LATENESS_BUCKETS.len());
        c.lateness[bucket] += 1;
        c.lateness_sum_ns += u128::from(kill.late_ns);
    }

    /// A request answered: `code` is `ok` or the refusal's code.
    pub fn request(&self, op: &'static str, code: &'static str) {
        *self.counters().requests.entry((op, code)).or_default() += 1;
    }

    pub fn reload(&self, ok: bool) {
        let mut c = self.counters();
        c.last_reload_ok = ok;
        if ok {
            c.reloads_ok += 1;
            c.last_reload_success_unix_s = unix_now_s();
        } else {
            c.reloads_refused += 1;
        }
    }

    pub fn client_connected(&self, up: bool) {
        let mut c = self.counters();
        if up {
            c.control_clients += 1;
        } else {
            c.control_clients = c.control_clients.saturating_sub(1);
        }
    }

    pub fn watcher(&self, up: bool) {
        let mut c = self.counters();
        if up {
            c.watchers += 1;
        } else {
            c.watchers = c.watchers.saturating_sub(1);
        }
    }

    pub fn watcher_dropped(&self) {
        self.counters().watchers_dropped += 1;
    }

    /// The forwarding program attached to an interface that came back.
    pub fn interface_attached(&self) {
        self.counters().interfaces_attached += 1;
    }

    /// The `/metrics` page, with `status` as the core stands now.
    pub fn render(&self, status: &Status) -> String {
        let c = self.counters();
        let mut page = Page::default();
        page.family("reaper_build_info", "gauge", "The running build.");
        page.sample(
            "reaper_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        page.family(
            "reaper_start_time_seconds",
            "gauge",
            "When the daemon started, in Unix time.",
        );
        page.sample("reaper_start_time_seconds", &[], self.started_unix_s);

        page.family(
            "reaper_kills_total",
            "counter",
            "Flows killed, by why and by how (destroy, rst, forward).",
        );
        for ((reason, path), n) in &c.kills {
            page.sample(
                "reaper_kills_total",
                &[("reason", reason), ("path", path)],
                *n as f64,
            );
        }
        page.family(
            "reaper_kill_lateness_seconds",
            "histogram",
            "How long after it was due each kill completed.",
        );
        let mut cumulative = 0;
        for (i, le) in LATENESS_BUCKETS.iter().enumerate() {
            cumulative += c.lateness[i];
            page.sample(
                "reaper_kill_lateness_seconds_bucket",
                &[("le", &le.to_string())],
                cumulative as f64,
            );
        }
        cumulative += c.lateness[LATENESS_BUCKETS.len()];
        page.sample(
            "reaper_kill_lateness_seconds_bucket",
            &[("le", "+Inf")],
            cumulative as f64,
        );
        page.sample(
            "reaper_kill_lateness_seconds_sum",
            &[],
            c.lateness_sum_ns as f64 / 1e9,
        );
        page.sample("reaper_kill_lateness_seconds_count", &[], cumulative as f64);

        page.family(
            "reaper_requests_total",
            "counter",
            "Control requests answered, by operation and by outcome (ok or the refusal code).",
        );
        for ((op, code), n) in &c.requests {
            page.sample(
                "reaper_requests_total",
                &[("op", op), ("code", code)],
                *n as f64,
            );
        }

        page.family("reaper_sessions", "gauge", "Live sessions, by class.");
        for (class, n) in &status.sessions_by_class {
            page.sample("reaper_sessions", &[("class", class)], *n as f64);
        }
        page.family(
            "reaper_sessions_capacity",
            "gauge",
            "Size of the session table (max_sessions).",
        );
        page.sample(
            "reaper_sessions_capacity",
            &[],
            f64::from(status.max_sessions),
        );
        page.family(
            "reaper_flows_tracked",
            "gauge",
            "Flows the kernel tracks now (granted or not).",
        );
        page.sample("reaper_flows_tracked", &[], status.tracked_flows as f64);
        page.family(
            "reaper_flows_granted",
            "gauge",
            "Tracked flows that have a deadline.",
        );
        page.sample("reaper_flows_granted", &[], status.granted_flows as f64);
        page.family(
            "reaper_flows_capacity",
            "gauge",
            "Size of the kernel flow table (max_flows).",
        );
        page.sample("reaper_flows_capacity", &[], f64::from(status.max_flows));

        for (name, value) in &status.counters {
            let metric = format!("reaper_kernel_{name}_total");
            page.family(&metric, "counter", kernel_help(name));
            page.sample(&metric, &[], *value as f64);
        }

        page.family(
            "reaper_control_clients",
            "gauge",
            "Control connections open now.",
        );
        page.sample("reaper_control_clients", &[], c.control_clients as f64);
        page.family(
            "reaper_watchers",
            "gauge",
            "Clients following the live event stream now.",
        );
        page.sample("reaper_watchers", &[], c.watchers as f64);
        page.family(
            "reaper_watchers_dropped_total",
            "counter",
            "Watchers dropped for reading too slowly.",
        );
        page.sample(
            "reaper_watchers_dropped_total",
            &[],
            c.watchers_dropped as f64,
        );
        page.family(
            "reaper_interface_attachments_total",
            "counter",
            "Forwarding programs attached to an interface that was re-created.",
        );
        page.sample(
            "reaper_interface_attachments_total",
            &[],
            c.interfaces_attached as f64,
        );

        page.family(
            "reaper_config_reloads_total",
            "counter",
            "Config reloads (SIGHUP), by result.",
        );
        page.sample(
            "reaper_config_reloads_total",
            &[("result", "ok")],
            c.reloads_ok as f64,
        );
        page.sample(
            "reaper_config_reloads_total",
            &[("result", "refused")],
            c.reloads_refused as f64,
        );
        page.family(
            "reaper_config_last_reload_successful",
            "gauge",
            "Whether the last config load succeeded (1) or was refused (0).",
        );
        page.sample(
            "reaper_config_last_reload_successful",
            &[],
            if c.last_reload_ok { 1.0 } else { 0.0 },
        );
        page.family(
            "reaper_config_last_reload_success_timestamp_seconds",
            "gauge",
            "When the config in force was loaded, in Unix time.",
        );
        page.sample(
            "reaper_config_last_reload_success_timestamp_seconds",
            &[],
            c.last_reload_success_unix_s,
        );
        page.0
    }
}

fn kernel_help(counter: &str) -> &'static str {
    match counter {
        "tracked" => "Watched flows the kernel started tracking.",
        "closed" => "Tracked flows whose socket closed.",
        "dropped_packets" => "Packets the kernel dropped because their flow's deadline had passed.",
        "table_full" => "Watched flows left untracked because the flow table was full.",
        "events_lost" => "Flow events that did not fit in the ring buffer.",
        "pending_matched" => "Connections tagged at establishment from a pre-registration.",
        "unmarked" => "Refused connections the kernel could not mark (the daemon destroys them).",
        "share_exceeded" => {
            "Watched flows left untracked because their owner held its whole share."
        }
        _ => "A kernel counter.",
    }
}

/// The text exposition format, version 0.0.4.
#[derive(Default)]
struct Page(String);

impl Page {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn lateness_lands_in_cumulative_buckets() {
        let m = Metrics::new();
        let mut c = m.counters();
        c.lateness[0] = 2;
        c.lateness[LATENESS_BUCKETS.len()] = 1;
        drop(c);
        let status = Status {
            uptime_ns: 0,
            cgroup: String::new(),
            pin_path: String::new(),
            sessions: 0,
            sessions_by_class: BTreeMap::from([("vnc".into(), 3)]),
            tracked_flows: 0,
            granted_flows: 0,
            max_flows: 1024,
            max_sessions: 16,
            counters: BTreeMap::new(),
            namespaces: 0,
            kill_path: crate::kernel::KillPath::Destroy,
            watch: Vec::new(),
            fence: Vec::new(),
            classes: Vec::new(),
            config_loads: 1,
            last_reload_error: None,
            fleet: None,
        };
        let page = m.render(&status);
        assert!(page.contains("reaper_kill_lateness_seconds_bucket{le=\"0.0001\"} 2\n"));
        assert!(page.contains("reaper_kill_lateness_seconds_bucket{le=\"1\"} 2\n"));
        assert!(page.contains("reaper_kill_lateness_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(page.contains("reaper_kill_lateness_seconds_count 3\n"));
        assert!(page.contains("reaper_sessions{class=\"vnc\"} 3\n"));
    }
}
