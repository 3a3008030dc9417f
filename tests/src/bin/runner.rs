//! `reaper-test-runner`: runs the integration tests where cargo and nextest
//! are not, inside the VMs of `cargo xtask vm-test`.
//!
//! It does what nextest does for these tests, in the least code: each test
//! in its own process (the harness enters a network namespace and a cgroup
//! per process), one after another, each under a time limit. It prints one
//! machine-readable line per test, which xtask reads off the serial console:
//!
//! ```text
//! REAPER-RESULT PASS deadline::granted_flow_is_reset_at_its_deadline 3.1s
//! REAPER-RESULT FLAKY restart::grants_survive_sigkill 20.4s
//! REAPER-RESULT SKIP fd_grant::... needs python3
//! REAPER-DONE passed=40 failed=0 skipped=3
//! ```
//!
//! With `--retries N` a failed test runs again, up to N more times: under
//! software emulation on a loaded machine a VM's timing is far less even
//! than the host's. A test that passes only on a retry is reported FLAKY
//! (with the failed try's output), never as a plain pass.
//!
//! Tests marked `#[ignore]` are the ones that may only run in a VM (they set
//! the system clock), so they run here too.
//!
//! Usage: `reaper-test-runner DIR [--only PREFIX]... [--skip PREFIX=REASON]...
//! [--timeout SECS] [--retries N]` where DIR holds the test executables, named after their
//! test file, and a test's name is `FILE::TEST`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Options {
    dir: PathBuf,
    /// Run only tests whose name starts with one of these (all if empty).
    only: Vec<String>,
    skips: Vec<(String, String)>,
    timeout: Duration,
    retries: u32,
}

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut skips = Vec::new();
    let mut only = Vec::new();
    let mut timeout = Duration::from_secs(600);
    let mut retries = 0;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--skip" => {
                let v = args.next().ok_or("--skip needs PREFIX=REASON")?;
                let (prefix, reason) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--skip {v:?}: expected PREFIX=REASON"))?;
                skips.push((prefix.to_string(), reason.to_string()));
            }
            "--retries" => {
                let v = args.next().ok_or("--retries needs N")?;
                retries = v
                    .parse()
                    .map_err(|_| format!("--retries {v:?}: not a number"))?;
            }
            "--only" => only.push(args.next().ok_or("--only needs a PREFIX")?),
            "--timeout" => {
                let v = args.next().ok_or("--timeout needs SECS")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("--timeout {v:?}: not a number of seconds"))?;
                timeout = Duration::from_secs(secs);
            }
            _ if dir.is_none() => dir = Some(PathBuf::from(arg)),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Options {
        dir: dir.ok_or(
            "usage: reaper-test-runner DIR [--only PREFIX]... [--skip PREFIX=REASON]... [--timeout SECS] [--retries N]",
        )?,
        only,
        skips,
        timeout,
        retries,
    })
}

/// The tests in one libtest executable, ignored ones included.
fn list(bin: &Path) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for extra in [None, Some("--ignored")] {
        let out = Command::new(bin)
            .args(["--list", "--format", "terse"])
            .args(extra)
            .output()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            if let Some(name) = line.strip_suffix(": test") {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
    }
    Ok(names)
}

/// Runs one test in its own process; returns whether it passed and what
/// it printed.
fn run_one(bin: &Path, test: &str, timeout: Duration) -> (bool, String) {
    let mut child = match Command::new(bin)
        .args(["--exact", test, "--include-ignored", "--test-threads=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot start {}: {e}", bin.display())),
    };
    // Read both pipes on threads so that a chatty test cannot block on a
    // full pipe while we wait for it.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let text = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    match status {
        Some(s) => (s.success(), text),
        None => (false, format!("{text}\nkilled after {timeout:?}")),
    }
}

/// A failed test's output, cut to what a console can take: the start
/// (the panic, then the daemon log) and the end.
fn excerpt(output: &str) -> String {
    const HEAD: usize = 4000;
    const TAIL: usize = 2000;
    let chars: Vec<char> = output.chars().collect();
    if chars.len() <= HEAD + TAIL {
        return output.to_string();
    }
    let head: String = chars[..HEAD].iter().collect();
    let tail: String = chars[chars.len() - TAIL..].iter().collect();
    format!(
        "{head}\n[... {} characters ...]\n{tail}",
        chars.len() - HEAD - TAIL
    )
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("reaper-test-runner: {e}");
            std::process::exit(2);
        }
    };
    let mut bins: Vec<PathBuf> = match std::fs::read_dir(&opts.dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) => {
            eprintln!("reaper-test-runner: {}: {e}", opts.dir.display());
            std::process::exit(2);
        }
    };
    bins.sort();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for bin in bins {
        let file = bin.file_name().unwrap().to_string_lossy().into_owned();
        let tests = match list(&bin) {
            Ok(t) => t,
            Err(e) => {
                println!("REAPER-RESULT FAIL {file}::(listing) 0s");
                println!("{e}");
                failed += 1;
                continue;
            }
        };
        for test in tests {
            let name = format!("{file}::{test}");
            if !opts.only.is_empty() && !opts.only.iter().any(|p| name.starts_with(p.as_str())) {
                continue;
            }
            if let Some((_, reason)) = opts.skips.iter().find(|(p, _)| name.starts_with(p)) {
                println!("REAPER-RESULT SKIP {name} {reason}");
                skipped += 1;
                continue;
            }
            let start = Instant::now();
            let mut tries = 0;
            let ok = loop {
                tries += 1;
                let (ok, output) = run_one(&bin, &test, opts.timeout);
                if ok || tries > opts.retries {
                    break ok;
                }
                // Every failure is shown, also one a retry makes good.
                println!(
                    "REAPER-OUTPUT-BEGIN {name}\n{}\nREAPER-OUTPUT-END",
                    excerpt(&output)
                );
            };
            let secs = start.elapsed().as_secs_f64();
            let verdict = match (ok, tries) {
                (true, 1) => "PASS",
                (true, _) => "FLAKY",
                (false, _) => "FAIL",
            };
            if ok {
                passed += 1;
            } else {
                failed += 1;
            }
            println!("REAPER-RESULT {verdict} {name} {secs:.1}s");
        }
    }
    println!("REAPER-DONE passed={passed} failed={failed} skipped={skipped}");
}
