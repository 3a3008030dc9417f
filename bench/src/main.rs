//! `reaper-bench [--quick] [--out DIR] [--only kill|mass|datapath|control|memory|fleet]`:
//! reaper's benchmarks, each against
//! a baseline measured in the same run, in the same kind of sandbox as the
//! integration tests (own netns and cgroup, the real daemon). Writes
//! `DIR/latest.md` (a table: what, reaper, baseline, ratio, goal, pass) and
//! SVG plots next to it, and prints the table. Run by `cargo xtask bench`.
//!
//! Every figure is a median over several runs with its min–max spread.
//!
//! One file per benchmark: `kill_latency`, `mass_expiry`, `data_path`,
//! `control_plane`, `memory`; `floor` is the no-op program the data path is
//! measured against, `held` the helper processes that hold many flows.

mod common;
mod control_plane;
mod data_path;
mod destroy_floor;
mod fleet;
mod floor;
mod grant_floor;
mod held;
mod kill_latency;
mod mass_expiry;
mod memory;
mod report;

use std::path::PathBuf;

use control_plane::control_plane;
use data_path::{connection_setup, data_path};
use held::{hold_clients, hold_server};
use kill_latency::kill_latency;
use mass_expiry::mass_expiry;
use memory::memory;
use report::cdf_svg;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Helper processes of the mass-expiry benchmark (spawned by itself).
    match args.first().map(String::as_str) {
        Some("--hold-server") => hold_server(args[1].parse().unwrap(), args[2].parse().unwrap()),
        Some("--hold-clients") => hold_clients(args[1].parse().unwrap(), args[2].parse().unwrap()),
        _ => {}
    }
    const USAGE: &str =
        "usage: reaper-bench [--quick] [--out DIR] [--only kill|mass|datapath|control|memory] [--size N]";
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => i += 1,
            "--out" | "--only" | "--size" if i + 1 < args.len() => i += 2,
            other => {
                eprintln!("reaper-bench: unexpected argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    // Measure the daemon as it ships: at its default log level (info). The
    // tests' harness runs it at debug, which formats a line per grant and
    // per kill, a seventh of a grant's cost. Set before any thread starts.
    if std::env::var_os("REAPER_TEST_LOG").is_none() {
        std::env::set_var("REAPER_TEST_LOG", "info");
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench/results"));
    std::fs::create_dir_all(&out).unwrap();
    // --only NAME runs one benchmark (for profiling), without writing results.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    // --size N: one run of N flows of the mass-expiry or the at-scale kill
    // latency benchmark (with --only, for profiling).
    let size: Option<usize> = args
        .iter()
        .position(|a| a == "--size")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--size takes a number of flows"));
    if size.is_some() && only.is_none() {
        eprintln!("reaper-bench: --size needs --only (it is for profiling)\n{USAGE}");
        std::process::exit(2);
    }
    let mut rows = Vec::new();
    let mut latency_plots = Vec::new();
    let mut kill_plots = Vec::new();
    if wanted("kill") {
        eprintln!("reaper-bench: kill latency");
        kill_latency(&mut rows, quick, size, &mut kill_plots);
    }
    let mut mass_plots = Vec::new();
    if wanted("mass") {
        eprintln!("reaper-bench: mass expiry");
        mass_expiry(&mut rows, quick, size, &mut mass_plots);
    }
    if wanted("datapath") {
        eprintln!("reaper-bench: data path");
        data_path(&mut rows, quick);
        connection_setup(&mut rows, quick);
    }
    if wanted("control") {
        eprintln!("reaper-bench: control plane");
        control_plane(&mut rows, quick, &mut latency_plots);
    }
    if wanted("memory") {
        eprintln!("reaper-bench: memory");
        memory(&mut rows, quick);
    }
    if wanted("fleet") {
        eprintln!("reaper-bench: fleet");
        fleet::fleet(&mut rows, quick);
    }
    if only.is_some() {
        for r in &rows {
            println!("{} | {} | {}", r.what, r.reaper, r.baseline);
        }
        return;
    }

    std::fs::write(
        out.join("kill-latency.svg"),
        cdf_svg(
            "kill latency: deadline to client reset (CDF)",
            "ms",
            &kill_plots,
        ),
    )
    .unwrap();
    std::fs::write(
        out.join("mass-expiry.svg"),
        cdf_svg(
            "mass expiry: clients reset over time (from the deadline, or from starting ss -K)",
            "ms",
            &mass_plots,
        ),
    )
    .unwrap();
    std::fs::write(
        out.join("control-plane-latency.svg"),
        cdf_svg(
            "grant latency (CDF), by concurrent clients",
            "µs",
            &latency_plots,
        ),
    )
    .unwrap();
    let machine = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut md = format!(
        "# reaper benchmarks{}\n\nMachine: {machine}. Each figure: median (n = runs, min–max).\n\n\
         | what | reaper | baseline | ratio | goal | pass |\n|---|---|---|---|---|---|\n",
        if quick { " (--quick sizes)" } else { "" }
    );
    for r in &rows {
        let pass = r.pass.cell();
        md += &format!(
            "| {} | {} | {} | {} | {} | {pass} |\n",
            r.what, r.reaper, r.baseline, r.ratio, r.goal
        );
    }
    md +=
        "\nPlots: [kill latency](kill-latency.svg), [mass expiry](mass-expiry.svg), [grant latency](control-plane-latency.svg).\n";
    std::fs::write(out.join("latest.md"), &md).unwrap();
    println!("{md}");
}
