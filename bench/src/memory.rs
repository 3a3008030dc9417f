//! Benchmark: memory, the daemon's RSS and the kernel maps per flow.

use reaper_tests::Sandbox;
use serde_json::json;

use crate::control_plane::grant_loop;
use crate::report::*;

/// (memlock, max_entries) of the daemon's map with this key and value size,
/// from /proc/PID/fdinfo.
pub fn map_memlock(pid: u64, key_size: u64, value_size: u64) -> Option<(u64, u64)> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>().ok()))
                .flatten()
        };
        if field("key_size:") == Some(key_size) && field("value_size:") == Some(value_size) {
            return Some((field("memlock:")?, field("max_entries:")?));
        }
    }
    None
}

pub fn rss_kib(pid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Benchmark 5: kernel memory per tracked flow (the flow table's memlock
/// over its size: the table is preallocated) and the daemon's RSS after
/// 100k grants.
pub fn memory(rows: &mut Vec<Row>, quick: bool) {
    let grants = if quick { 10_000 } else { 100_000 };
    let mut sb = Sandbox::new("bench-mem");
    sb.write_config("max_ttl = \"1d\"\nmax_sessions = 131072\nmax_pending = 262144\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
    sb.start_daemon();
    let pid = sb.ok(json!({"op": "status"}))["pid"].as_u64().unwrap();
    let flow_size = std::mem::size_of::<reaper_common::Flow>() as u64;
    if let Some((memlock, entries)) = map_memlock(pid, 8, flow_size) {
        let per = memlock as f64 / entries as f64;
        rows.push(Row {
            what: format!("kernel memory per tracked flow (FLOWS memlock / {entries} entries)"),
            reaper: format!("{per:.0} B (n=1, exact)"),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "≤ 200 B".into(),
            pass: Verdict::from(per <= 200.0),
        });
    }
    let before = rss_kib(pid);
    let clients = 8;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let socket = sb.socket.clone();
            std::thread::spawn(move || grant_loop(socket, c, grants / clients))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = rss_kib(pid);
    rows.push(Row {
        what: format!("daemon RSS with {grants} granted sessions (each a pre-registration)"),
        reaper: format!(
            "{:.1} MiB (n=1; {:.1} MiB at start)",
            after as f64 / 1024.0,
            before as f64 / 1024.0
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        goal: "≤ 64 MiB".into(),
        pass: Verdict::from(after as f64 / 1024.0 <= 64.0),
    });
}
