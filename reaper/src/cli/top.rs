//! `reaper top`: a live view of the daemon, redrawn in place every
//! interval: the sessions by time left, kills per second (counted off the
//! event stream), and how full the tables are.

#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{session_rows, table, TopCmd};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::protocol::{ListArgs, ListResult, StatusResult};
use crate::timefmt;

/// Session rows shown at most (the rest are counted).
const MAX_ROWS: usize = 40;

pub fn top(cmd: TopCmd) -> Result<i32> {
    if !(0.1..=3600.0).contains(&cmd.interval) {
        return Err(Error::Setup(format!(
            "--interval: {} is outside 0.1..=3600 seconds",
            cmd.interval
        )));
    }
    let kills = Arc::new(AtomicU64::new(0));
    let mut client = Client::new(&cmd.socket, Some(Duration::from_secs(10)));
    let events = client.watch(ListArgs::default())?;
    let counted = kills.clone();
    std::thread::spawn(move || {
        for (_, event) in events.map_while(|e| e.ok()) {
            if event["event"] == "kill" {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let interval = Duration::from_secs_f64(cmd.interval);
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        std::thread::sleep(interval);
        let status: StatusResult = client.status()?;
        let list: ListResult = client.list(ListArgs::default())?;
        let total = kills.load(Ordering::Relaxed);
        let rate = (total - seen) as f64 / since.elapsed().as_secs_f64();
        (seen, since) = (total, Instant::now());
        let screen = render(&status, &list, rate, total);
        let mut out = std::io::stdout().lock();
        // Home, draw, clear what an earlier, longer screen left below.
        if write!(out, "\x1b[H{screen}\x1b[J")
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(0);
        }
    }
}

fn percent(used: usize, of: u32) -> f64 {
    if of == 0 {
        0.0
    } else {
        used as f64 * 100.0 / f64::from(of)
    }
}

/// One screen; each line ends by clearing the rest of the terminal line.
fn render(status: &StatusResult, list: &ListResult, kill_rate: f64, kills: u64) -> String {
    let mut lines = vec![
        format!(
            "reaper {}  pid {}  up {}",
            status.version,
            status.pid,
            timefmt::format_duration(status.uptime_ms * timefmt::NS_PER_MS)
        ),
        format!(
            "sessions {} of {} ({:.1}%)   flows {} tracked, {} granted, of {} ({:.1}%)",
            status.sessions,
            status.max_sessions,
            percent(status.sessions, status.max_sessions),
            status.tracked_flows,
            status.granted_flows,
            status.max_flows,
            percent(status.tracked_flows, status.max_flows)
        ),
        format!(
            "kills {kill_rate:.1}/s ({kills} since top started)   dropped packets {}   table full {}",
            status.counters.get("dropped_packets").unwrap_or(&0),
            status.counters.get("table_full").unwrap_or(&0)
        ),
        String::new(),
    ];
    let shown = &list.sessions[..list.sessions.len().min(MAX_ROWS)];
    lines.extend(table(&super::SESSION_HEADERS, &session_rows(shown)));
    if list.sessions.len() > shown.len() {
        lines.push(format!(
            "... and {} more",
            list.sessions.len() - shown.len()
        ));
    }
    lines.into_iter().map(|l| format!("{l}\x1b[K\n")).collect()
}
