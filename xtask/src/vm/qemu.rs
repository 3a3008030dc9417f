//! Booting a kernel in qemu (KVM where it works, tcg where not) and reading
//! the test runner's results off its serial console.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use super::initramfs::{initramfs, Payload};
use super::kernels::find_file;
use super::report::{feature_state, Row};
use super::{vm_dir, Options};
use crate::step;

/// Whether qemu can use KVM here: a guest that gets as far as printing the
/// kernel's banner. (Nested KVM on these machines fails at the first
/// instruction.)
pub(super) fn kvm_works(vmlinuz: &Path) -> bool {
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
pub(super) const TCG_TIME_SCALE: u32 = 10;
pub(super) const KVM_TIME_SCALE: u32 = 2;
/// A VM that runs longer than this is killed and its kernel marked failed.
pub(super) const VM_TIMEOUT: Duration = Duration::from_secs(45 * 60);

pub(super) fn boot(
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
pub(super) fn run_vm(
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
