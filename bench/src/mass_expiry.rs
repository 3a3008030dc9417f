//! Benchmark: mass expiry, many flows sharing a deadline, against
//! `ss -K`.

use std::process::Command;

use reaper_tests::{boot_ns, Sandbox};
use serde_json::json;

use crate::common::*;
use crate::destroy_floor::destroy_floor;
use crate::held::{daemon_with_held_flows, hold_flows};
use crate::memory::rss_kib;
use crate::report::*;

/// The 100k goal, 600 ms, is physically out of reach where the
/// bare loop itself takes longer (its 2-thread floor measured 437-645 ms
/// on machines of this kind): there the goal is the 1.2× ratio alone, with
/// the floor figure beside it, as the issue allows.
const MASS_GOAL_MS: f64 = 600.0;

/// Benchmark 2, reaper: `n` flows, one session each, one shared deadline.
/// Returns (each client's reset time minus the deadline in ms, daemon RSS
/// in KiB with all of them granted). A run whose granting outlasted the
/// margin (the VM stalled: once here 100k grants took 13 s, not 1-2 s)
/// measured nothing and is made again, twice at most.
pub fn mass_expiry_reaper(n: usize) -> (Vec<f64>, u64) {
    for attempt in 1..=3 {
        match mass_expiry_reaper_once(n) {
            Ok(result) => return result,
            Err(why) if attempt < 3 => eprintln!("reaper-bench: mass expiry of {n}: {why}; again"),
            Err(why) => panic!("mass expiry of {n}: {why}, three times"),
        }
    }
    unreachable!()
}

fn mass_expiry_reaper_once(n: usize) -> Result<(Vec<f64>, u64), String> {
    let (sb, held) = daemon_with_held_flows(&format!("bench-mass-{n}"), n);
    // Long enough to grant them all first (checked below).
    let expires_at = rfc3339_in(2_000_000_000 + n as u64 * 100_000);
    let requests = held
        .flows
        .iter()
        .enumerate()
        .map(|(i, (server, client))| {
            let req = json!({"op": "grant", "session": format!("m{i}"), "user": "u", "target": format!("t{i}"),
                             "expires_at": expires_at,
                             "flows": [{"local": format!("127.0.0.1:{server}"), "remote": format!("127.0.0.1:{client}")}]});
            format!("{req}\n")
        })
        .collect();
    let answers: Vec<serde_json::Value> = pipelined(&sb.socket, requests)
        .iter()
        .map(|a| serde_json::from_str(a).unwrap())
        .collect();
    if let Some(late) = answers
        .iter()
        .find(|a| a["error"]["code"] == "deadline_refused")
    {
        return Err(format!("granting took longer than the margin ({late})"));
    }
    // One expires_at for all; each conversion to the boot clock reads the
    // clocks anew, so deadlines may differ by nanoseconds: each flow is
    // measured against its own.
    let deadlines: Vec<u64> = answers
        .iter()
        .map(|a| {
            a["result"]["session"]["deadline_boot_ns"]
                .as_u64()
                .unwrap_or_else(|| panic!("grant refused: {a}"))
        })
        .collect();
    let first = *deadlines.iter().min().unwrap();
    assert!(*deadlines.iter().max().unwrap() - first < 1_000_000);
    if boot_ns() >= first {
        return Err("granting took longer than the margin".into());
    }
    let pid = sb.ok(json!({"op": "status"}))["pid"].as_u64().unwrap();
    let rss = rss_kib(pid);
    Ok((lateness_ms(&deadlines, &held.ended()), rss))
}

/// Benchmark 2, floor: the same flows destroyed by a bare batched
/// SOCK_DESTROY loop on `threads` threads, timed from its first request.
/// Returns the lateness of each flow the loop did reset, and the errnos of
/// those the kernel refused to destroy. (About one run in three at 100k,
/// one socket is refused; reaper, which checks that no flow stays open,
/// has not shown it.)
pub fn mass_expiry_floor(n: usize, threads: usize) -> (Vec<f64>, Vec<i32>) {
    let mut sb = Sandbox::new(&format!("bench-floor-{n}-{threads}"));
    let held = hold_flows(&mut sb, n);
    let (start, destroyed, refused) = destroy_floor(&held.flows, threads);
    assert_eq!(
        destroyed + refused.len(),
        n,
        "the floor loop lost an answer"
    );
    let mut late = lateness_ms(&vec![start; n], &held.ended());
    let open = late.iter().filter(|l| l.is_infinite()).count();
    assert_eq!(
        open,
        refused.len(),
        "a destroyed flow's client saw no reset"
    );
    late.truncate(n - open);
    (late, refused)
}

/// Benchmark 2, the floor with reaper's kernel side: the bare loop on
/// flows reaper tracks, its programs attached (each close runs its sock_ops
/// program: the flow's entry removed, an event on the ring buffer) and its
/// daemon stopped for the loop. Between this and the bare floor is what
/// reaper's kernel programs cost a mass expiry; between this and reaper,
/// what its daemon costs.
pub fn mass_expiry_floor_tracked(n: usize, threads: usize) -> Vec<f64> {
    let (sb, held) = daemon_with_held_flows(&format!("bench-floor-tracked-{n}-{threads}"), n);
    sb.signal_daemon(libc::SIGSTOP);
    let (start, _, refused) = destroy_floor(&held.flows, threads);
    let mut late = lateness_ms(&vec![start; n], &held.ended());
    sb.signal_daemon(libc::SIGCONT);
    late.truncate(n - refused.len());
    late
}

/// Benchmark 2, baseline: the same flows killed by `ss -K` with a filter
/// selecting exactly them, timed from the moment ss is started.
pub fn mass_expiry_ss(n: usize) -> Vec<f64> {
    let mut sb = Sandbox::new(&format!("bench-ssk-{n}"));
    let held = hold_flows(&mut sb, n);
    let start = boot_ns();
    let status = Command::new("ss")
        .args([
            "-K",
            "-tn",
            "state",
            "established",
            "( sport >= :5900 and sport <= :5999 )",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    lateness_ms(&vec![start; n], &held.ended())
}

pub fn mass_expiry(
    rows: &mut Vec<Row>,
    quick: bool,
    size: Option<usize>,
    plots: &mut Vec<(String, Vec<f64>)>,
) {
    let sizes: &[usize] = match (&size, quick) {
        (Some(n), _) => std::slice::from_ref(n),
        (None, true) => &[2_000],
        (None, false) => &[10_000, 100_000],
    };
    let runs = if quick || size.is_some() { 1 } else { 3 };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for &n in sizes {
        let (mut reaper, mut ss, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        let (mut floor1, mut floor_cores) = (Vec::new(), Vec::new());
        let mut floor_tracked = Vec::new();
        let (mut reaper_curve, mut ss_curve, mut floor_curve) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut ss_missed = Vec::new();
        let mut floor_refused: Vec<i32> = Vec::new();
        // Alternating runs: drift on the machine affects all alike.
        for _ in 0..runs {
            let (late, kib) = mass_expiry_reaper(n);
            let open = late.iter().filter(|l| l.is_infinite()).count();
            assert_eq!(
                open, 0,
                "reaper left {open} of {n} flows open past their deadline"
            );
            reaper.push(*late.last().unwrap());
            rss.push(kib as f64 / 1024.0);
            reaper_curve = late;
            for (threads, into) in [(1, &mut floor1), (cores, &mut floor_cores)] {
                let (late, refused) = mass_expiry_floor(n, threads);
                floor_refused.extend(refused);
                into.push(*late.last().unwrap());
                if threads == cores {
                    floor_curve = late;
                }
            }
            floor_tracked.push(*mass_expiry_floor_tracked(n, cores).last().unwrap());
            let mut base = mass_expiry_ss(n);
            // ss -K walks a socket dump while it destroys: sockets can be
            // skipped. Those are counted, and its time is that of the last
            // socket it did reset (which flatters it).
            let missed = base.iter().filter(|l| l.is_infinite()).count();
            ss_missed.push(missed);
            ss.push(
                base[..base.len() - missed]
                    .last()
                    .copied()
                    .unwrap_or(f64::NAN),
            );
            base.truncate(base.len() - missed);
            ss_curve = base;
        }
        let (reaper, ss, rss) = (Runs(reaper), Runs(ss), Runs(rss));
        let (floor1, floor_cores) = (Runs(floor1), Runs(floor_cores));
        let floor_tracked = Runs(floor_tracked);
        let missed = if ss_missed.iter().all(|m| *m == 0) {
            String::new()
        } else {
            format!("; left open: {ss_missed:?} of {n}")
        };
        let speedup = ss.median() / reaper.median().max(1e-3);
        let floor = floor1.median().min(floor_cores.median());
        let over_floor = reaper.median() / floor.max(1e-3);
        rows.push(Row {
            what: format!("mass expiry: {n} flows, one deadline, until every client saw its reset"),
            reaper: reaper.show("ms", 1),
            baseline: format!(
                "bare SOCK_DESTROY loop: 1 thread {}, {cores} threads {}; the same {cores} threads on flows reaper's programs track (daemon stopped) {}{}",
                floor1.show("ms", 1),
                floor_cores.show("ms", 1),
                floor_tracked.show("ms", 1),
                if floor_refused.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (the kernel refused {} destroy(s) over the runs, errnos {floor_refused:?}: timed without them)",
                        floor_refused.len()
                    )
                }
            ),
            ratio: format!("{over_floor:.2}× the better floor"),
            goal: if n >= 100_000 && floor > MASS_GOAL_MS {
                format!(
                    "≤ 1.2× the floor ({:.0} ms; 600 ms is out of reach: the floor took {floor:.0})",
                    floor * 1.2
                )
            } else if n >= 100_000 {
                "≤ 1.2× the floor and ≤ 600 ms".into()
            } else {
                "≤ 1.2× the floor".into()
            },
            pass: Verdict::from(
                over_floor <= 1.2
                    && (n < 100_000 || floor > MASS_GOAL_MS || reaper.median() <= MASS_GOAL_MS),
            ),
        });
        rows.push(Row {
            what: format!("mass expiry: {n} flows, against `ss -K`"),
            reaper: reaper.show("ms", 1),
            baseline: format!("`ss -K` {}{missed}", ss.show("ms", 1)),
            ratio: format!("{speedup:.1}× faster"),
            goal: "≥ 3× faster".into(),
            pass: Verdict::from(speedup >= 3.0),
        });
        rows.push(Row {
            what: format!("daemon RSS with {n} granted flows (one session each, real sockets)"),
            reaper: rss.show("MiB", 1),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: if n >= 100_000 {
                "≤ 48 MiB".into()
            } else {
                "—".into()
            },
            pass: Verdict::from_goal((n >= 100_000).then(|| rss.median() <= 48.0)),
        });
        plots.push((format!("reaper, {n} flows"), reaper_curve));
        plots.push((
            format!("bare destroy loop, {cores} threads, {n} flows"),
            floor_curve,
        ));
        plots.push((format!("ss -K, {n} flows"), ss_curve));
    }
}
