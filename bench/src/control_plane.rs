//! Benchmark: the control plane, grant latency against the bare Unix
//! socket round trip, and pipelined grant rates.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use reaper_tests::Sandbox;
use serde_json::json;

use crate::common::*;
use crate::report::*;

/// One control client doing `n` grants one after the other; returns each
/// grant's latency in µs.
pub fn grant_loop(socket: PathBuf, client: usize, n: usize) -> Vec<f64> {
    let stream = UnixStream::connect(&socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut latencies = Vec::with_capacity(n);
    let mut line = String::new();
    for i in 0..n {
        // A pre-registration needs no socket: a pure control-plane grant.
        let (a, b) = (client % 250 + 1, i / 60_000);
        let req = json!({"op": "grant", "session": format!("c{client}-{i}"), "user": format!("u{client}"),
                         "target": format!("t{i}"), "ttl": "1h",
                         "expect": [{"local": "127.0.0.1:5900", "remote": format!("127.{a}.{b}.1:{}", 1024 + i % 60_000)}]});
        let text = format!("{req}\n");
        let t0 = Instant::now();
        writer.write_all(text.as_bytes()).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        latencies.push(t0.elapsed().as_secs_f64() * 1e6);
        assert!(line.contains("\"ok\":true"), "grant refused: {line}");
    }
    latencies
}

/// The floor under any grant latency here: a line sent over a Unix
/// socket to a thread that echoes it back, one at a time (µs each).
pub fn unix_round_trips(n: usize) -> Vec<f64> {
    let (a, b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut reader = BufReader::new(b.try_clone().unwrap());
        let mut writer = b;
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            writer.write_all(line.as_bytes()).unwrap();
            line.clear();
        }
    });
    let mut reader = BufReader::new(a.try_clone().unwrap());
    let mut writer = a;
    let mut line = String::new();
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        writer.write_all(b"{\"op\":\"status\"}\n").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        latencies.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    drop(writer);
    drop(reader);
    echo.join().unwrap();
    latencies.sort_by(|a, b| a.total_cmp(b));
    latencies
}

/// `clients` clients each sending their share of `total` grants ahead
/// (pipelined, as request ids allow) while reading the answers, one grant
/// per line (`batch` = 1) or `batch` grants per `batch` request: grants
/// per second, from the first line sent to the last answer read.
pub fn pipelined_rate(total: usize, clients: usize, batch: usize) -> f64 {
    let mut sb = Sandbox::new(&format!("bench-cp-pipe{clients}x{batch}"));
    sb.write_config("max_ttl = \"1d\"\nmax_sessions = 131072\nmax_pending = 262144\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
    sb.start_daemon();
    let grant = |i: usize| {
        json!({"op": "grant", "session": format!("p{i}"), "user": "u", "target": format!("t{i}"), "ttl": "1h",
               "expect": [{"local": "127.0.0.1:5900", "remote": format!("127.1.{}.1:{}", i / 60_000, 1024 + i % 60_000)}]})
    };
    let per = total / clients;
    // Every line is made before the clock starts.
    let shares: Vec<Vec<String>> = (0..clients)
        .map(|c| {
            let first = c * per;
            (first..first + per)
                .step_by(batch)
                .map(|start| {
                    let req = if batch == 1 {
                        let mut g = grant(start);
                        g["id"] = start.into();
                        g
                    } else {
                        let end = (start + batch).min(first + per);
                        json!({"op": "batch", "id": start, "requests": (start..end).map(grant).collect::<Vec<_>>()})
                    };
                    format!("{req}\n")
                })
                .collect()
        })
        .collect();
    let start = Instant::now();
    let threads: Vec<_> = shares
        .into_iter()
        .map(|lines| {
            let socket = sb.socket.clone();
            std::thread::spawn(move || pipelined(&socket, lines))
        })
        .collect();
    let answers: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let rate = (per * clients) as f64 / start.elapsed().as_secs_f64();
    let granted: usize = answers
        .iter()
        .map(|a| {
            let v: serde_json::Value = serde_json::from_str(a).expect("an answer is JSON");
            assert_eq!(v["ok"], true, "refused: {a}");
            match v["result"]["results"].as_array() {
                Some(items) => items.iter().filter(|i| i["ok"] == true).count(),
                None => 1,
            }
        })
        .sum();
    assert_eq!(granted, per * clients, "a grant was refused");
    rate
}

/// Grants per `batch` request in the batched rows: as many as fit a line
/// comfortably (a grant is about 200 bytes; a line at most 64 KiB).
const BATCH: usize = 200;

/// Benchmark 4: grants per second and latency with 1, 8 and 64 clients.
pub fn control_plane(rows: &mut Vec<Row>, quick: bool, plots: &mut Vec<(String, Vec<f64>)>) {
    let total = if quick { 2_000 } else { 64_000 };
    let repeats = if quick { 1 } else { 3 };
    let (mut floor50, mut floor99) = (Vec::new(), Vec::new());
    // (clients, grants per line): one grant a line, then `batch` requests.
    let shapes = [(1, 1), (1, BATCH), (8, 1), (8, BATCH)];
    let mut piped: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
    for _ in 0..repeats {
        let floor = unix_round_trips(total.min(20_000));
        floor50.push(percentile(&floor, 0.5));
        floor99.push(percentile(&floor, 0.99));
        for (runs, (clients, batch)) in piped.iter_mut().zip(shapes) {
            runs.push(pipelined_rate(total, clients, batch));
        }
    }
    let (floor50, floor99) = (Runs(floor50), Runs(floor99));
    for (runs, (clients, batch)) in piped.into_iter().zip(shapes) {
        let runs = Runs(runs);
        let shape = if batch == 1 {
            "one grant a line".to_string()
        } else {
            format!("{batch} grants a line (`batch`)")
        };
        rows.push(Row {
            what: format!("grants per second, {clients} client(s) pipelining, {shape}"),
            reaper: runs.show("/s", 0),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "≥ 100000/s".into(),
            pass: Some(runs.median() >= 100_000.0),
        });
    }
    for clients in [1usize, 8, 64] {
        let mut rates = Vec::new();
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut last = Vec::new();
        for r in 0..repeats {
            let mut sb = Sandbox::new(&format!("bench-cp{clients}-{r}"));
            sb.write_config("max_ttl = \"1d\"\nmax_sessions = 131072\nmax_pending = 262144\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
            sb.start_daemon();
            let per = total / clients;
            let start = Instant::now();
            let threads: Vec<_> = (0..clients)
                .map(|c| {
                    let socket = sb.socket.clone();
                    std::thread::spawn(move || grant_loop(socket, c, per))
                })
                .collect();
            let mut all: Vec<f64> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            let elapsed = start.elapsed().as_secs_f64();
            all.sort_by(|a, b| a.total_cmp(b));
            rates.push((per * clients) as f64 / elapsed);
            p50.push(percentile(&all, 0.50));
            p99.push(percentile(&all, 0.99));
            last = all;
        }
        let (rates, p50, p99) = (Runs(rates), Runs(p50), Runs(p99));
        rows.push(Row {
            what: format!("grants per second, {clients} client(s)"),
            reaper: rates.show("/s", 0),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "≥ 100000/s".into(),
            pass: Some(rates.median() >= 100_000.0),
        });
        rows.push(Row {
            what: format!("grant latency p50 / p99, {clients} client(s)"),
            reaper: format!("{} / {}", p50.show("µs", 0), p99.show("µs", 0)),
            baseline: if clients == 1 {
                format!(
                    "bare Unix-socket round trip {} / {}",
                    floor50.show("µs", 0),
                    floor99.show("µs", 0)
                )
            } else {
                "—".into()
            },
            ratio: if clients == 1 {
                format!(
                    "p50 {:.1}×, p99 {:.1}× the floor",
                    p50.median() / floor50.median(),
                    p99.median() / floor99.median()
                )
            } else {
                "—".into()
            },
            goal: if clients == 1 {
                "p50 ≤ 2× the floor, p99 ≤ 100 µs".into()
            } else {
                "—".into()
            },
            pass: (clients == 1)
                .then(|| p50.median() <= 2.0 * floor50.median() && p99.median() <= 100.0),
        });
        plots.push((format!("{clients} client(s)"), last));
    }
}
