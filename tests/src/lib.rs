//! Harness for reaper's integration tests.
//!
//! Every test builds a [`Sandbox`]: its own network namespace (entered by the
//! test's thread with `unshare`, so it vanishes with the test process), its
//! own cgroup v2 (the test process moves into it, so every socket the test or
//! its children create is in it), its own bpffs pin directory, control socket
//! and audit file, and the real `reaper` binary attached to that cgroup only.
//! The sandbox is made of guards (`guards`: [`Netns`], [`Cgroup`], [`Pins`],
//! [`ScratchDir`], [`Hosts`]; `daemon`: [`Daemon`], [`Control`]; [`Peer`]),
//! each of which undoes what it made when dropped — also when the test
//! panics. See tests/README.md for how to write a test.
//!
//! Tests run as root (CAP_BPF, CAP_NET_ADMIN); cargo-nextest runs each in its
//! own process, which is what makes the per-thread namespace and the
//! per-process cgroup sound.

mod conn;
mod daemon;
pub mod fleet;
pub mod flood;
mod guards;
mod peer;
mod sandbox;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use conn::{
    assert_reset, bind_client, connect_bound, connect_from_bound, count_tcp_state, wait_listening,
    Conn,
};
pub use daemon::{read_to_eof, refused_start, send_with_fds, Control, Daemon};
pub use guards::{Cgroup, Children, Hosts, Netns, Pins, ScratchDir};
pub use peer::Peer;
pub use sandbox::Sandbox;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
pub const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of everything a test creates, so that `cargo xtask test` can sweep
/// up what a killed test run left behind.
pub const PREFIX: &str = "reaper-test-";

/// Nanoseconds on CLOCK_BOOTTIME, the clock reaper's deadlines live on.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Blocks until the boot clock reaches `ns`: waiting for a known deadline,
/// not for a guess.
pub fn sleep_until_boot(ns: u64) {
    let now = boot_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}

/// Whether the running kernel is at least `major.minor` (by its release
/// string, independent of reaper's own feature probe).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// The `reaper` binary under test.
pub fn reaper_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REAPER_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/reaper");
    assert!(
        p.exists(),
        "no reaper binary at {} (run `cargo xtask test`)",
        p.display()
    );
    p
}

/// `reaper-test-peer` (also the hostile tests' flood, `flood.rs`).
pub fn peer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REAPER_TEST_PEER") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/reaper-test-peer")
}

pub(crate) fn check(status: std::io::Result<std::process::ExitStatus>, what: &str) {
    match status {
        Ok(s) if s.success() => {}
        other => panic!("{what} failed: {other:?}"),
    }
}

/// Where the tests' Python packages (websockify, installed by `cargo
/// xtask setup` under target/pydeps) and reaper's own client
/// (clients/python) are: a `PYTHONPATH`.
pub fn python_path() -> std::ffi::OsString {
    let deps = std::env::var_os("REAPER_PYDEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pydeps"));
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    std::env::join_paths([client, deps]).expect("paths without ':'")
}

/// `python3` with [`python_path`].
pub fn python() -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", python_path())
        .env("PYTHONUNBUFFERED", "1");
    cmd
}

/// A script under tests/scripts.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

pub const SECOND: Duration = Duration::from_secs(1);

/// How much slower than this machine the tests are running: 1 here, more
/// under `cargo xtask vm-test` when qemu emulates the CPU in software
/// (`REAPER_TEST_TIME_SCALE`). Latency bounds (how late a kill may be, how
/// long an answer may take) and every wait of this harness are multiplied
/// by it; deadlines and the order of events are not, so a test still fails
/// where reaper is wrong rather than slow.
pub fn time_scale() -> f64 {
    std::env::var("REAPER_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v >= 1.0)
        .unwrap_or(1.0)
}

/// A latency bound in milliseconds, scaled by [`time_scale`].
pub fn bound_ms(ms: f64) -> f64 {
    ms * time_scale()
}

/// A latency bound, scaled by [`time_scale`].
pub fn bound(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}
