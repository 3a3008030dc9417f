//! `cargo xtask vm-test`: the integration tests on Debian's own kernels,
//! each booted in qemu, beside this machine's kernel run directly.
//!
//! For each kernel the pieces are:
//! * the kernel package, fetched with `apt-get download` and cached under
//!   `target/vm/kernels/` (only the image and the few modules the tests
//!   need are unpacked);
//! * an initramfs written here (newc cpio, no tool needed) holding busybox,
//!   `ip` and its libraries, the `reaper` binaries, the test executables and
//!   the modules; its `/init` mounts what the tests expect, loads the
//!   modules, prints `reaper features` and runs `reaper-test-runner`;
//! * qemu, with KVM where it works and software emulation (tcg) where not
//!   (nested KVM fails on these machines), no network device, the serial
//!   console on a pipe that this module reads.
//!
//! The result is a table per kernel (tests passed / failed / skipped, BPF
//! features detected), printed and written to `target/vm/results.md`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cargo, output, root, sh, step, TestRun};

/// A Debian kernel package family: `linux-image-{prefix}N{suffix}`.
struct KernelFamily {
    label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

/// Debian 12's own kernel and the one it ships in backports/updates.
const KERNELS: &[KernelFamily] = &[
    KernelFamily {
        label: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    KernelFamily {
        label: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

/// Modules the tests need that Debian builds as modules: veth pairs for
/// other hosts, sock_diag for SOCK_DESTROY and activity, clsact and cls_bpf
/// for the legacy tc attachment.
const MODULES: &[&str] = &["veth", "inet_diag", "tcp_diag", "sch_ingress", "cls_bpf"];

/// Busybox applets the init script and the tests call.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "poweroff", "cat", "echo", "sysctl", "sleep", "uname", "ls",
    "date", "dmesg", "ln",
];

/// Tests that cannot run in the initramfs, and why.
const SKIPS: &[(&str, &str)] = &[
    (
        "fd_grant::",
        "needs python3 (a real proxy script), which the initramfs does not carry",
    ),
    (
        "policy::websockify",
        "needs python3 and websockify, which the initramfs does not carry",
    ),
];

/// Tests `--quick` leaves out: long under software emulation, and about
/// the daemon's logic rather than the kernel (they run on the host in CI).
const SLOW: &[(&str, &str)] = &[(
    "storm::",
    "left out by --quick: about 12 minutes under software emulation (the host runs it)",
)];

const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "xz-utils"];

/// One kernel's outcome, one row of the table.
pub struct Row {
    pub kernel: String,
    pub how: String,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// feature name → yes / no / unknown, from `reaper features`.
    pub features: BTreeMap<String, String>,
    pub seconds: u64,
    /// Failed tests, by name.
    pub failures: Vec<String>,
    /// Tests that passed only when run again (counted as passed).
    pub flaky: Vec<String>,
}

pub struct Options {
    /// Kernel labels to boot (`6.1`, `6.12`); all when empty.
    pub kernels: Vec<String>,
    /// Test-name prefixes (`FILE::TEST`) to run; all when empty.
    pub only: Vec<String>,
    /// Leave out the tests listed in `SLOW` (CI's subset).
    pub quick: bool,
}

pub fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut kernels = Vec::new();
    let mut quick = false;
    let mut only = Vec::new();
    let mut it = args.iter().filter(|a| *a != "--");
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" => {
                let k = it.next().ok_or("--kernel needs a version (6.1 or 6.12)")?;
                if !KERNELS.iter().any(|f| f.label == k) {
                    return Err(format!(
                        "--kernel {k:?}: not one of {:?}",
                        KERNELS.iter().map(|f| f.label).collect::<Vec<_>>()
                    ));
                }
                kernels.push(k.clone());
            }
            "--quick" => quick = true,
            "--only" => only.push(it.next().ok_or("--only needs a test-name prefix")?.clone()),
            other => {
                return Err(format!(
                    "unknown vm-test argument {other:?}; usage: cargo xtask vm-test [--kernel 6.1|6.12]... [--only FILE::TEST]... [--quick]"
                ))
            }
        }
    }
    Ok(Options {
        kernels,
        only,
        quick,
    })
}

fn vm_dir() -> PathBuf {
    root().join("target/vm")
}

/// The number in a package name of the family, if it is one.
fn package_number(family: &KernelFamily, name: &str) -> Option<u64> {
    name.strip_prefix(family.prefix)?
        .strip_suffix(family.suffix)?
        .parse()
        .ok()
}

/// A kernel unpacked under target/vm/kernels: the newest cached one of the
/// family, else the newest the archive has, downloaded now.
fn kernel(family: &KernelFamily) -> Result<PathBuf, String> {
    let cache = vm_dir().join("kernels");
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let newest = |names: Vec<String>| {
        names
            .into_iter()
            .filter_map(|n| package_number(family, &n).map(|v| (v, n)))
            .max()
            .map(|(_, n)| n)
    };
    let cached = std::fs::read_dir(&cache)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| e.path().join("ready").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Some(name) = newest(cached) {
        return Ok(cache.join(name));
    }
    let search = || {
        output("apt-cache", &["pkgnames", family.prefix])
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let package = match newest(search()) {
        Some(p) => p,
        None => {
            sh(Command::new("apt-get").arg("update"))?;
            newest(search()).ok_or_else(|| {
                format!(
                    "no {}N{} package in the apt sources",
                    family.prefix, family.suffix
                )
            })?
        }
    };
    let debs = vm_dir().join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
    let downloaded = || {
        std::fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
    };
    if downloaded().is_none() {
        step(&format!("downloading {package}"));
        sh(Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&debs))?;
    }
    let deb = downloaded().ok_or_else(|| format!("apt-get download left no {package}_*.deb"))?;
    // Only the image, its config and the modules the tests need: the whole
    // package unpacks to half a gigabyte.
    let dir = cache.join(&package);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut patterns = vec![
        "./boot/vmlinuz-*".to_string(),
        "./boot/config-*".to_string(),
    ];
    patterns.extend(MODULES.iter().map(|m| format!("*/{m}.ko*")));
    sh(Command::new("sh")
        .arg("-c")
        .arg(
            "dir=\"$1\"; shift; dpkg-deb --fsys-tarfile \"$0\" \\
             | tar -x -C \"$dir\" --wildcards --wildcards-match-slash \"$@\"",
        )
        .arg(&deb)
        .arg(&dir)
        .args(&patterns))?;
    std::fs::write(dir.join("ready"), "").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&deb);
    Ok(dir)
}

fn find_file(dir: &Path, pred: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(p) = find_file(&path, pred) {
                return Some(p);
            }
        } else if pred(&entry.file_name().to_string_lossy()) {
            return Some(path);
        }
    }
    None
}

/// A module's bytes, decompressed (Debian 6.12 ships .ko.xz; busybox's
/// insmod wants plain ELF).
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .args(["-dc"])
            .arg(path)
            .output()
            .map_err(|e| format!("xz: {e}"))?;
        if !out.status.success() {
            return Err(format!("xz -dc {} failed", path.display()));
        }
        Ok(out.stdout)
    } else {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The `depends=` field of a module's .modinfo section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &ko[at + key.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The kernel's modules in load order (dependencies first).
fn modules(kernel: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    fn add(
        kernel: &Path,
        name: &str,
        out: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), String> {
        if out.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 8 {
            return Err(format!("module dependencies of {name} go too deep"));
        }
        let file = find_file(kernel, &|f| {
            f == format!("{name}.ko") || f == format!("{name}.ko.xz")
        })
        .ok_or_else(|| {
            format!(
                "module {name} is not in {} (add it to MODULES in xtask/src/vm.rs)",
                kernel.display()
            )
        })?;
        let bytes = module_bytes(&file)?;
        for dep in module_depends(&bytes) {
            add(kernel, &dep, out, depth + 1)?;
        }
        out.push((name.to_string(), bytes));
        Ok(())
    }
    let mut out = Vec::new();
    for m in MODULES {
        add(kernel, m, &mut out, 0)?;
    }
    Ok(out)
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as its
/// initramfs.
struct Cpio {
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
fn stripped(path: &Path) -> Result<Vec<u8>, String> {
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
fn libraries(path: &Path) -> Vec<String> {
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
    fn gather(tests: &[(String, PathBuf)], bin_dir: &Path) -> Result<Payload, String> {
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
fn runner_args(opts: &Options) -> String {
    let mut args = String::new();
    for prefix in &opts.only {
        args.push_str(&format!(" --only '{prefix}'"));
    }
    for (prefix, reason) in SKIPS.iter().chain(if opts.quick { SLOW } else { &[] }) {
        args.push_str(&format!(" --skip '{prefix}={reason}'"));
    }
    let timeout = if opts.quick { 600 } else { 1800 };
    args.push_str(&format!(" --timeout {timeout} --retries 1"));
    args
}

/// Writes the init script: mount what the harness expects, load the
/// modules, report features, run the tests, power off.
fn init_script(modules: &[String], time_scale: u32, opts: &Options) -> String {
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

fn initramfs(
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

/// Whether qemu can use KVM here: a guest that gets as far as printing the
/// kernel's banner. (Nested KVM on these machines fails at the first
/// instruction.)
fn kvm_works(vmlinuz: &Path) -> bool {
    if std::fs::File::open("/dev/kvm").is_err() {
        return false;
    }
    let out = Command::new("timeout")
        .args(["30", "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host"])
        .args(["-m", "256", "-display", "none", "-nodefaults", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(vmlinuz)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/none"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Linux version"))
}

/// How much slower than the host a guest runs, for the tests' latency
/// bounds (see `reaper_tests::time_scale`).
const TCG_TIME_SCALE: u32 = 10;
const KVM_TIME_SCALE: u32 = 2;
/// A VM that runs longer than this is killed and its kernel marked failed.
const VM_TIMEOUT: Duration = Duration::from_secs(45 * 60);

fn boot(
    label: &str,
    kernel: &Path,
    payload: &Payload,
    kvm: bool,
    opts: &Options,
) -> Result<Row, String> {
    let vmlinuz = find_file(&kernel.join("boot"), &|f| f.starts_with("vmlinuz-"))
        .ok_or_else(|| format!("no vmlinuz in {}", kernel.display()))?;
    let scale = if kvm { KVM_TIME_SCALE } else { TCG_TIME_SCALE };
    let initrd = initramfs(kernel, payload, scale, opts)?;
    let how = if kvm { "qemu kvm" } else { "qemu tcg" };
    step(&format!(
        "booting {} ({how}); test results follow",
        kernel.file_name().unwrap().to_string_lossy()
    ));
    // A kernel that crashes while booting, before any test ran (TCG has
    // been seen to fault while the kernel patches its own code early in
    // boot), is booted once more; a crash once tests run is a failure.
    let (row, reached_init) = run_vm(label, &vmlinuz, &initrd, kvm, how)?;
    if reached_init {
        return Ok(row);
    }
    println!("[{label}] the kernel crashed before any test ran: booting it again");
    Ok(run_vm(label, &vmlinuz, &initrd, kvm, how)?.0)
}

/// One boot: runs qemu, relays and counts the runner's results. Returns the
/// row and whether the kernel got as far as running `/init`.
fn run_vm(
    label: &str,
    vmlinuz: &Path,
    initrd: &Path,
    kvm: bool,
    how: &str,
) -> Result<(Row, bool), String> {
    let mut qemu = Command::new("qemu-system-x86_64");
    if kvm {
        qemu.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        // One host thread per VM: the VMs run side by side, and
        // multi-threaded TCG has crashed guests here while they patched
        // their own code (static keys flip when BPF programs attach).
        qemu.args(["-accel", "tcg,thread=single", "-cpu", "max"]);
    }
    let mut child = qemu
        .args(["-smp", "2", "-m", "2048", "-display", "none", "-nodefaults"])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < VM_TIMEOUT {
            std::thread::sleep(Duration::from_secs(1));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let log_path = vm_dir().join(format!("console-{label}.log"));
    let mut log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut row = Row {
        kernel: label.to_string(),
        how: how.into(),
        passed: 0,
        failed: 0,
        skipped: 0,
        features: BTreeMap::new(),
        seconds: 0,
        failures: Vec::new(),
        flaky: Vec::new(),
    };
    let (mut in_features, mut in_output, mut done) = (false, false, false);
    let mut reached_init = false;
    // The console's last lines, shown if the VM stops early (a kernel
    // oops prints there).
    let mut last: std::collections::VecDeque<String> = Default::default();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut raw = Vec::new();
    while reader.read_until(b'\n', &mut raw).unwrap_or(0) > 0 {
        let _ = log.write_all(&raw);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let line = text.trim_end_matches(['\r', '\n']);
        raw.clear();
        if last.len() == 100 {
            last.pop_front();
        }
        last.push_back(line.to_string());
        if in_output {
            in_output = !line.starts_with("REAPER-OUTPUT-END");
            println!("  {line}");
            continue;
        }
        if let Some(k) = line.strip_prefix("REAPER-VM-KERNEL ") {
            reached_init = true;
            row.kernel = format!("{label} ({k})");
        } else if line == "REAPER-FEATURES-BEGIN" {
            in_features = true;
        } else if line == "REAPER-FEATURES-END" {
            in_features = false;
        } else if in_features {
            row.features.extend(feature_state(line));
            println!("  {line}");
        } else if line.starts_with("REAPER-OUTPUT-BEGIN") {
            in_output = true;
        } else if let Some(result) = line.strip_prefix("REAPER-RESULT ") {
            println!("[{label}] {result}");
            let mut words = result.split_whitespace();
            match (words.next(), words.next()) {
                (Some("PASS"), _) => row.passed += 1,
                (Some("FLAKY"), Some(name)) => {
                    row.passed += 1;
                    row.flaky.push(name.to_string());
                }
                (Some("SKIP"), _) => row.skipped += 1,
                (Some("FAIL"), Some(name)) => {
                    row.failed += 1;
                    row.failures.push(name.to_string());
                }
                _ => {}
            }
        } else if line.starts_with("REAPER-DONE") {
            done = true;
        } else if line.starts_with("REAPER-VM ") || line.contains("Kernel panic") {
            println!("[{label}] {line}");
        }
    }
    let _ = child.wait();
    let _ = watchdog.join();
    row.seconds = start.elapsed().as_secs();
    if !done {
        println!("[{label}] the VM stopped early; its console's last lines:");
        for line in &last {
            println!("[{label}]   {line}");
        }
        row.failed += 1;
        row.failures.push(format!(
            "(the VM stopped before the tests finished; see {})",
            log_path.display()
        ));
    }
    Ok((row, reached_init))
}

/// The executables of the integration tests, built now, by test-file name.
fn test_executables() -> Result<Vec<(String, PathBuf)>, String> {
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

/// Boots every chosen kernel and runs the tests in it, with the binaries
/// in target/debug (the caller built them). The VMs run side by side: much
/// of a test is waiting for a deadline, which overlaps well.
pub fn run(opts: &Options) -> Result<Vec<Row>, String> {
    crate::apt_install(VM_PACKAGES, "to boot test VMs")?;
    std::fs::create_dir_all(vm_dir()).map_err(|e| e.to_string())?;
    step("gathering the binaries and libraries for the initramfs");
    let payload = Payload::gather(&test_executables()?, &root().join("target/debug"))?;
    let mut chosen = Vec::new();
    for family in KERNELS {
        if opts.kernels.is_empty() || opts.kernels.iter().any(|k| k == family.label) {
            chosen.push((family.label, kernel(family)?));
        }
    }
    let Some((_, first)) = chosen.first() else {
        return Ok(Vec::new());
    };
    let vmlinuz = find_file(&first.join("boot"), &|f| f.starts_with("vmlinuz-"));
    let kvm = vmlinuz.is_some_and(|v| kvm_works(&v));
    if !kvm {
        step("KVM does not work here: using software emulation (tcg)");
    }
    let payload = &payload;
    std::thread::scope(|scope| {
        let runs: Vec<_> = chosen
            .iter()
            .map(|(label, dir)| scope.spawn(move || boot(label, dir, payload, kvm, opts)))
            .collect();
        runs.into_iter()
            .map(|r| r.join().map_err(|_| "a VM thread panicked".to_string())?)
            .collect()
    })
}

/// A `reaper features` table row as (feature, yes / no / unknown).
fn feature_state(line: &str) -> Option<(String, String)> {
    let mut words = line.split_whitespace();
    let (name, state) = (words.next()?, words.next()?);
    ["yes", "no", "unknown"]
        .contains(&state)
        .then(|| (name.to_string(), state.to_string()))
}

/// The host's own row: features from `reaper features`, counts from the
/// nextest run the caller made.
pub fn host_row(run: &TestRun) -> Row {
    let bin = root().join("target/debug/reaper");
    let text = output(&bin.to_string_lossy(), &["features"]);
    let features = text.lines().filter_map(feature_state).collect();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Row {
        kernel: format!("host ({})", release.trim()),
        how: "directly".into(),
        passed: run.passed,
        failed: run.failed,
        skipped: run.skipped,
        features,
        seconds: run.seconds,
        failures: Vec::new(),
        flaky: Vec::new(),
    }
}

/// The results table (Markdown), written to target/vm/results.md.
pub fn report(rows: &[Row]) -> String {
    let columns = [
        ("sock_ops", "sock_ops"),
        ("cgroup_skb", "cgroup_skb"),
        ("ring_buffer", "ring buffer"),
        ("tcx", "tcx"),
        ("sock_destroy", "SOCK_DESTROY"),
    ];
    let mut s = String::from("| kernel | run | passed | failed | skipped |");
    for (_, title) in columns {
        s.push_str(&format!(" {title} |"));
    }
    s.push_str(" other features | time |\n|---|---|---|---|---|");
    s.push_str(&"---|".repeat(columns.len() + 2));
    s.push('\n');
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |",
            r.kernel, r.how, r.passed, r.failed, r.skipped
        ));
        for (name, _) in columns {
            s.push_str(&format!(
                " {} |",
                r.features.get(name).map_or("?", String::as_str)
            ));
        }
        let others: Vec<String> = r
            .features
            .iter()
            .filter(|(n, _)| !columns.iter().any(|(c, _)| c == n))
            .map(|(n, v)| {
                if v == "yes" {
                    n.clone()
                } else {
                    format!("{n}: {v}")
                }
            })
            .collect();
        s.push_str(&format!(" {} | {} s |\n", others.join(", "), r.seconds));
    }
    for r in rows.iter().filter(|r| !r.failures.is_empty()) {
        s.push_str(&format!(
            "\nFailed on {}: {}\n",
            r.kernel,
            r.failures.join(", ")
        ));
    }
    for r in rows.iter().filter(|r| !r.flaky.is_empty()) {
        s.push_str(&format!(
            "\nPassed only on a second try on {}: {}\n",
            r.kernel,
            r.flaky.join(", ")
        ));
    }
    let path = vm_dir().join("results.md");
    let _ = std::fs::create_dir_all(vm_dir());
    let _ = std::fs::write(&path, &s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_numbers_pick_only_the_family() {
        let f = &KERNELS[1];
        assert_eq!(
            package_number(f, "linux-image-6.12.101+deb12-amd64"),
            Some(101)
        );
        assert_eq!(
            package_number(f, "linux-image-6.12.101+deb12-cloud-amd64"),
            None
        );
        assert_eq!(
            package_number(&KERNELS[0], "linux-image-6.1.0-50-amd64"),
            Some(50)
        );
        assert_eq!(
            package_number(&KERNELS[0], "linux-image-6.1.0-50-rt-amd64"),
            None
        );
    }

    #[test]
    fn feature_rows_are_read_and_other_lines_are_not() {
        let row = "tcx           no       attaching the forwarded-flow program";
        assert_eq!(feature_state(row), Some(("tcx".into(), "no".into())));
        assert_eq!(feature_state("feature       present  used for"), None);
        assert_eq!(feature_state("kernel 6.1.0-56-amd64"), None);
        assert_eq!(feature_state(""), None);
    }

    #[test]
    fn modinfo_depends_are_read() {
        let ko = b"\x7fELF...license=GPL\0depends=inet_diag,foo\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["inet_diag", "foo"]);
        assert!(module_depends(b"depends=\0").is_empty());
    }

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
