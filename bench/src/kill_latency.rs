//! Benchmark: kill latency, deadline to client reset, against Nova's
//! timer-per-connection proxy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use reaper_tests::{boot_ns, Conn, Sandbox};
use serde_json::json;

use crate::common::*;
use crate::destroy_floor::destroy_at_deadlines;
use crate::held::{daemon_with_held_flows, hold_flows};
use crate::report::*;

/// The time to live of flow `i` of `n`: deadlines spread over 3 s from 1 s.
pub fn spread_ttl_ms(i: usize, n: usize) -> u64 {
    1_000 + (i as u64 * 3_000) / n as u64
}

/// Benchmark 1, reaper: `n` live granted flows, deadlines spread out.
pub fn kill_latency_reaper(n: usize) -> Vec<f64> {
    let mut sb = Sandbox::new(&format!("bench-kill-{n}"));
    sb.write_config(
        "max_ttl = \"1d\"\nmax_flows = 65536\n[[watch]]\nports = \"5900\"\nside = \"local\"\n",
    );
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let flows: Vec<Conn> = (0..n).map(|_| Conn::connect("127.0.0.1:5900")).collect();
    let streams: Vec<&TcpStream> = flows.iter().map(|f| &f.stream).collect();
    let stream = UnixStream::connect(&sb.socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    // The first deadlines may come before the last grant is made.
    let (deadlines, ended) = observe_ends(&streams, Duration::from_secs(30), || {
        let mut line = String::new();
        let mut deadlines = Vec::with_capacity(n);
        for (i, f) in flows.iter().enumerate() {
            let req = json!({"op": "grant", "session": format!("k{i}"), "user": "u", "target": format!("t{i}"),
                             "ttl": format!("{}ms", spread_ttl_ms(i, n)), "flows": [f.spec()]});
            writer.write_all(format!("{req}\n").as_bytes()).unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            deadlines.push(
                v["result"]["session"]["deadline_boot_ns"]
                    .as_u64()
                    .expect("granted"),
            );
        }
        deadlines
    });
    drop(flows);
    lateness_ms(&deadlines, &ended)
}

/// How long after its grant the first of the at-scale flows falls due:
/// past the time all of them take to grant (1.7 s for 100k here).
const FIRST_DEADLINE_MS: u64 = 5_000;

/// Benchmark 1 at scale: `n` live granted flows held by helper processes
/// (one process cannot hold them all), granted in `batch` requests with
/// deadlines spread over 10 s from `FIRST_DEADLINE_MS` after each grant. Each flow's
/// lateness is measured against the deadline its answer gave.
pub fn kill_latency_at_scale(n: usize) -> Vec<f64> {
    let (sb, held) = daemon_with_held_flows(&format!("bench-kill-scale-{n}"), n);
    let lines: Vec<String> = held
        .flows
        .chunks(200)
        .enumerate()
        .map(|(c, chunk)| {
            let requests: Vec<serde_json::Value> = chunk
                .iter()
                .enumerate()
                .map(|(j, (server, client))| {
                    let i = c * 200 + j;
                    let ttl_ms = FIRST_DEADLINE_MS + (i as u64 * 10_000) / n as u64;
                    json!({"op": "grant", "session": format!("k{i}"), "user": "u", "target": format!("t{i}"),
                           "ttl": format!("{ttl_ms}ms"),
                           "flows": [{"local": format!("127.0.0.1:{server}"), "remote": format!("127.0.0.1:{client}")}]})
                })
                .collect();
            format!("{}\n", json!({"op": "batch", "requests": requests}))
        })
        .collect();
    let granting = Instant::now();
    let answers = pipelined(&sb.socket, lines);
    let granted_in = granting.elapsed();
    // Every grant is in before the first deadline, so that this row times
    // kills, not kills under a grant flood: while the pipelined grants
    // keep both cores busy, the holders that time the resets wait for a
    // core (measured: clients saw resets 18-45 ms late at p99 while the
    // daemon's own audit put them 1.4-1.6 ms late).
    assert!(
        granted_in < Duration::from_millis(FIRST_DEADLINE_MS),
        "granting {n} flows took {granted_in:?}, past the first deadline"
    );
    // Read out of the answers once every flow has ended: parsing 100k
    // answers takes this process a core, and the floor's loop has no such
    // work while deadlines fall due.
    let ended = held.ended();
    let deadlines: Vec<u64> = answers
        .iter()
        .flat_map(|a| {
            let v: serde_json::Value = serde_json::from_str(a).unwrap();
            let items = v["result"]["results"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            items.into_iter().map(move |item| {
                item["result"]["session"]["deadline_boot_ns"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("grant refused: {item}"))
            })
        })
        .collect();
    assert_eq!(deadlines.len(), n);
    lateness_ms(&deadlines, &ended)
}

/// Benchmark 1 at scale, floor: the same number of held flows, with the
/// same spread of deadlines (from `FIRST_DEADLINE_MS` after the start,
/// over 10 s),
/// destroyed at their deadlines by a bare timer-and-destroy loop with no
/// daemon. What the machine and the holders cost at this scale shows here.
pub fn kill_floor_at_scale(n: usize) -> Vec<f64> {
    let mut sb = Sandbox::new(&format!("bench-kill-floor-{n}"));
    let held = hold_flows(&mut sb, n);
    let start = boot_ns();
    let deadlines: Vec<u64> = (0..n as u64)
        .map(|i| start + (FIRST_DEADLINE_MS + (i * 10_000) / n as u64) * 1_000_000)
        .collect();
    let refused = destroy_at_deadlines(&held.flows, &deadlines);
    let late = lateness_ms(&deadlines, &held.ended());
    let open = late.iter().filter(|l| l.is_infinite()).count();
    assert_eq!(
        open,
        refused.len(),
        "a destroyed flow's client saw no reset"
    );
    late[..n - open].to_vec()
}

/// Benchmark 1, baselines: the same flows through `bench/timer_proxy.py`.
pub fn kill_latency_proxy(n: usize, mode: &str) -> Vec<f64> {
    let mut sb = Sandbox::new(&format!("bench-{mode}-{n}"));
    sb.peer(&["127.0.0.1:5900"]);
    // One proxy process per 8000 flows: each holds two descriptors a flow.
    let procs = n.div_ceil(8_000);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/timer_proxy.py");
    for k in 0..procs {
        let port = (6000 + k).to_string();
        let mut out = BufReader::new(sb.spawn(Command::new("python3").arg(&script).args([
            "--mode",
            mode,
            &port,
            "127.0.0.1:5900",
        ])));
        let mut ready = String::new();
        out.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready");
    }
    let streams: Vec<TcpStream> = (0..n)
        .map(|i| TcpStream::connect(("127.0.0.1", 6000 + (i % procs) as u16)).unwrap())
        .collect();
    // As for reaper: ends are timed as they come, while deadlines are
    // still being set.
    let (deadlines, ended) = observe_ends(&streams, Duration::from_secs(30), || {
        let mut deadlines = Vec::with_capacity(n);
        for (i, mut s) in streams.iter().enumerate() {
            let ttl = spread_ttl_ms(i, n);
            s.write_all(format!("{ttl}\n").as_bytes()).unwrap();
            let mut ok = [0u8; 3];
            s.read_exact(&mut ok).unwrap();
            // The proxy set its deadline before answering: counting from
            // the answer flatters the baseline, never reaper.
            deadlines.push(boot_ns() + ttl * 1_000_000);
        }
        deadlines
    });
    drop(streams);
    lateness_ms(&deadlines, &ended)
}

pub fn kill_latency(
    rows: &mut Vec<Row>,
    quick: bool,
    size: Option<usize>,
    plots: &mut Vec<(String, Vec<f64>)>,
) {
    let (sizes, runs): (&[usize], usize) = match (size, quick) {
        // --size N: only the at-scale row, once, with N flows.
        (Some(_), _) => (&[], 1),
        (None, true) => (&[200], 1),
        (None, false) => (&[1_000, 10_000], 3),
    };
    for &n in sizes {
        // Per run: each mechanism's sorted latencies. A p99 over one run
        // swings with what else the 2 cores did, so several runs are shown
        // as the median p99 with its spread.
        let mut all: [Vec<Vec<f64>>; 3] = Default::default();
        for _ in 0..runs {
            all[0].push(kill_latency_reaper(n));
            all[1].push(kill_latency_proxy(n, "timer"));
            all[2].push(kill_latency_proxy(n, "sweep"));
        }
        let at =
            |runs_: &[Vec<f64>], p: f64| Runs(runs_.iter().map(|v| percentile(v, p)).collect());
        let show = |runs_: &[Vec<f64>]| {
            format!(
                "{:.2} / {} / {:.2} ms",
                at(runs_, 0.5).median(),
                at(runs_, 0.99).show("", 2),
                at(runs_, 1.0).median()
            )
        };
        let [reaper, timer, sweep] = &all;
        let p99 = at(reaper, 0.99).median();
        rows.push(Row {
            what: format!(
                "kill latency p50 / p99 / max, {n} flows (n={runs} runs of {n} kills; medians, p99 spread)"
            ),
            reaper: show(reaper),
            baseline: format!("timer proxy {}; 1 s sweeper {}", show(timer), show(sweep)),
            ratio: format!(
                "p99 {:.1}× / {:.0}× better",
                at(timer, 0.99).median() / p99.max(1e-3),
                at(sweep, 0.99).median() / p99.max(1e-3)
            ),
            // On a machine whose noise puts even the timer proxy's p99 past
            // 2 ms, the goal is a ratio to it: that much is the machine's.
            goal: "p99 ≤ 2 ms, or ≤ 1.2× the timer proxy's p99 where the machine puts that above 2 ms"
                .into(),
            pass: Verdict::from(p99 <= 2.0f64.max(1.2 * at(timer, 0.99).median())),
        });
        let pooled = |runs_: &[Vec<f64>]| {
            let mut v: Vec<f64> = runs_.concat();
            v.sort_by(|a, b| a.total_cmp(b));
            v
        };
        plots.push((format!("reaper, {n} flows"), pooled(reaper)));
        plots.push((format!("timer proxy, {n} flows"), pooled(timer)));
        plots.push((format!("1 s sweeper, {n} flows"), pooled(sweep)));
    }
    // At scale, reaper against a bare timer-and-destroy loop over the same
    // number of held flows (a proxy per 8000 flows would be a different
    // benchmark). The same p99 goal as with 10k flows.
    let (n, runs) = match (size, quick) {
        (Some(n), _) => (n, 1),
        (None, true) => (2_000, 1),
        (None, false) => (100_000, 3),
    };
    // Alternating runs: drift on the machine affects both alike.
    let (late, floor): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (0..runs)
        .map(|_| (kill_latency_at_scale(n), kill_floor_at_scale(n)))
        .unzip();
    for l in &late {
        let open = l.iter().filter(|x| x.is_infinite()).count();
        assert_eq!(
            open, 0,
            "reaper left {open} of {n} flows open past their deadline"
        );
    }
    let at = |p: f64| Runs(late.iter().map(|v| percentile(v, p)).collect());
    let p99 = at(0.99);
    let floor_at = |p: f64| Runs(floor.iter().map(|v| percentile(v, p)).collect());
    rows.push(Row {
        what: format!(
            "kill latency p50 / p99 / max, {n} live flows, deadlines spread over 10 s after all are granted (n={runs} runs)"
        ),
        reaper: format!(
            "{:.2} / {} / {:.2} ms",
            at(0.5).median(),
            p99.show("", 2),
            at(1.0).median()
        ),
        baseline: format!(
            "bare timer-and-destroy loop, no daemon: {:.2} / {} / {:.2} ms",
            floor_at(0.5).median(),
            floor_at(0.99).show("", 2),
            floor_at(1.0).median()
        ),
        ratio: format!(
            "p99 {:.1}× the floor",
            p99.median() / floor_at(0.99).median().max(1e-3)
        ),
        goal: "p99 ≤ 2 ms, or ≤ 1.2× the floor's p99 where the machine puts that above 2 ms"
            .into(),
        pass: Verdict::from(p99.median() <= 2.0f64.max(1.2 * floor_at(0.99).median())),
    });
    let mut pooled: Vec<f64> = late.concat();
    pooled.sort_by(|a, b| a.total_cmp(b));
    plots.push((format!("reaper, {n} flows"), pooled));
}
