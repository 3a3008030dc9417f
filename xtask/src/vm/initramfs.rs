//! The initramfs each VM boots: a newc cpio written here (no tool needed)
//! with busybox, `ip` and its libraries, the `reaper` binaries, the test
//! executables and the modules, and an `/init` that runs the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::process::Stdio;

use super::kernels::modules;
use super::{vm_dir, Options};
use crate::{cargo, output};

/// Busybox applets the init script and the tests call.
pub(super) const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "poweroff", "cat", "echo", "sysctl", "sleep", "uname", "ls",
    "date", "dmesg", "ln",
];

/// Tests that cannot run in the initramfs, and why.
pub(super) const SKIPS: &[(&str, &str)] = &[
    (
        "fd_grant::",
        "needs python3 (a real proxy script), which the initramfs does not carry",
    ),
    (
        "policy::websockify",
        "needs python3 and websockify, which the initramfs does not carry",
    ),
    (
        "integrations::",
        "needs python3 and websockify, which the initramfs does not carry",
    ),
    (
        "package::",
        "needs dpkg, systemd-analyze and setpriv over the machine root (the host runs it)",
    ),
    (
        "service::metrics",
        "needs promtool, which the initramfs does not carry",
    ),
    (
        "service::top",
        "needs tmux, which the initramfs does not carry",
    ),
    (
        "fleet::",
        "needs etcd, etcdctl, openssl, nft and nsenter, which the initramfs does not carry (the host runs it)",
    ),
];

/// Tests `--quick` leaves out: long under software emulation, and about
/// the daemon's logic rather than the kernel (they run on the host in CI).
pub(super) const SLOW: &[(&str, &str)] = &[(
    "storm::",
    "left out by --quick: about 12 minutes under software emulation (the host runs it)",
)];

/// A newc ("070701") cpio archive, the format the kernel unpacks as its
/// initramfs.
pub(super) struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            data: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, body: &[u8], executable: bool) {
        self.entry(name, if executable { 0o100755 } else { 0o100644 }, body);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }

    /// Adds every missing parent directory of `path`.
    fn parents(&mut self, path: &str, made: &mut Vec<String>) {
        let mut at = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            at = if at.is_empty() {
                part.to_string()
            } else {
                format!("{at}/{part}")
            };
            if !made.contains(&at) {
                self.dir(&at);
                made.push(at.clone());
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

/// A binary as it goes into the initramfs: without debug info (the debug
/// test binaries are several times larger with it).
pub(super) fn stripped(path: &Path) -> Result<Vec<u8>, String> {
    let tmp = vm_dir().join("stripped.tmp");
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    let bytes = std::fs::read(if ok { tmp.as_path() } else { path })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&tmp);
    Ok(bytes)
}

/// The shared libraries a dynamic executable loads, with the loader.
pub(super) fn libraries(path: &Path) -> Vec<String> {
    output("ldd", &[&path.to_string_lossy()])
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string)
        .collect()
}

/// What every VM gets besides its kernel's modules, read (and stripped)
/// once and shared: `(path in the initramfs, bytes)` of busybox, `ip`, the
/// reaper binaries, the test executables (by test-file name) and every
/// shared library they load.
pub struct Payload {
    files: Vec<(String, Vec<u8>)>,
}

impl Payload {
    pub(super) fn gather(tests: &[(String, PathBuf)], bin_dir: &Path) -> Result<Payload, String> {
        let ip = ["/usr/bin/ip", "/bin/ip", "/sbin/ip"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or("no ip binary (iproute2)")?;
        let mut executables: Vec<(String, PathBuf)> = vec![
            ("bin/busybox".into(), "/bin/busybox".into()),
            ("bin/ip".into(), ip.to_path_buf()),
        ];
        for b in ["reaper", "reaper-test-peer", "reaper-test-runner"] {
            executables.push((format!("reaper/{b}"), bin_dir.join(b)));
        }
        for (name, path) in tests {
            executables.push((format!("reaper/tests/{name}"), path.clone()));
        }
        let mut files = Vec::new();
        let mut libs: Vec<String> = Vec::new();
        for (name, path) in &executables {
            files.push((name.clone(), stripped(path)?));
            for lib in libraries(path) {
                if !libs.contains(&lib) {
                    libs.push(lib);
                }
            }
        }
        for lib in libs {
            let bytes = std::fs::read(&lib).map_err(|e| format!("{lib}: {e}"))?;
            files.push((lib.trim_start_matches('/').to_string(), bytes));
        }
        Ok(Payload { files })
    }
}

/// The runner's arguments (shell-quoted): which tests, which are skipped
/// and why, and how long one may take (the storm runs for minutes under
/// emulation).
pub(super) fn runner_args(opts: &Options) -> String {
    let mut args = String::new();
    for prefix in &opts.only {
        args.push_str(&format!(" --only '{prefix}'"));
    }
    for (prefix, reason) in SKIPS.iter().chain(if opts.quick { SLOW } else { &[] }) {
        // Single-quoted for the init script: a quote inside would end it.
        assert!(!reason.contains('\''), "skip reason {reason:?} has a quote");
        args.push_str(&format!(" --skip '{prefix}={reason}'"));
    }
    let timeout = if opts.quick { 600 } else { 1800 };
    args.push_str(&format!(" --timeout {timeout} --retries 1"));
    args
}

/// Writes the init script: mount what the harness expects, load the
/// modules, report features, run the tests, power off.
pub(super) fn init_script(modules: &[String], time_scale: u32, opts: &Options) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tmpfs run /run\n\
         mount -t tmpfs cgroup /sys/fs/cgroup\n\
         mkdir -p /sys/fs/cgroup/unified\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified\n\
         mount -t bpf bpf /sys/fs/bpf\n",
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /modules/{m}.ko || echo \"REAPER-VM insmod {m} failed\"\n"
        ));
    }
    s.push_str(&format!(
        "ip link set lo up\n\
         echo \"REAPER-VM-KERNEL $(uname -r)\"\n\
         echo REAPER-FEATURES-BEGIN\n\
         /reaper/reaper features\n\
         echo REAPER-FEATURES-END\n\
         export REAPER_BIN=/reaper/reaper REAPER_TEST_PEER=/reaper/reaper-test-peer\n\
         export REAPER_TEST_TIME_SCALE={time_scale} RUST_BACKTRACE=0\n\
         /reaper/reaper-test-runner /reaper/tests{}\n\
         poweroff -f\n",
        runner_args(opts)
    ));
    s
}

pub(super) fn initramfs(
    kernel: &Path,
    payload: &Payload,
    time_scale: u32,
    opts: &Options,
) -> Result<PathBuf, String> {
    let mut cpio = Cpio::new();
    let mut made: Vec<String> = Vec::new();
    for d in ["proc", "sys", "dev", "tmp", "run", "var", "modules"] {
        cpio.dir(d);
        made.push(d.to_string());
    }
    // iproute2 keeps `ip netns` names under /var/run/netns.
    cpio.symlink("var/run", "/run");
    for (name, bytes) in &payload.files {
        cpio.parents(name, &mut made);
        cpio.file(name, bytes, true);
    }
    for a in APPLETS {
        cpio.symlink(&format!("bin/{a}"), "busybox");
    }
    let modules = modules(kernel)?;
    for (name, bytes) in &modules {
        cpio.file(&format!("modules/{name}.ko"), bytes, false);
    }
    let names: Vec<String> = modules.into_iter().map(|(n, _)| n).collect();
    cpio.file(
        "init",
        init_script(&names, time_scale, opts).as_bytes(),
        true,
    );

    let path = vm_dir().join(format!(
        "initramfs-{}.cpio",
        kernel.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&path, cpio.finish()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// The executables of the integration tests, built now, by test-file name.
pub(super) fn test_executables() -> Result<Vec<(String, PathBuf)>, String> {
    let out = cargo()
        .args([
            "test",
            "--package",
            "reaper-tests",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo test --no-run: {e}"))?;
    if !out.status.success() {
        return Err("building the integration tests failed".into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tests = Vec::new();
    for line in text.lines() {
        // One compiler-artifact message per target; the test files are
        // the `"kind":["test"]` ones.
        if !line.contains("\"kind\":[\"test\"]") {
            continue;
        }
        let Some(at) = line.find("\"executable\":\"") else {
            continue;
        };
        let rest = &line[at + "\"executable\":\"".len()..];
        let path = PathBuf::from(&rest[..rest.find('"').unwrap_or(rest.len())]);
        let name = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .rsplit_once('-')
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        tests.push((name, path));
    }
    tests.sort();
    if tests.is_empty() {
        return Err("cargo listed no integration test executables".into());
    }
    Ok(tests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::new();
        c.file("init", b"#!/bin/sh\n", true);
        c.symlink("bin/sh", "busybox");
        let data = c.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 4, 0);
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
