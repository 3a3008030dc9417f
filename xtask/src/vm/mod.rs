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
//!
//! * `kernels` — which kernels, fetched and unpacked;
//! * `initramfs` — what each VM boots;
//! * `qemu` — booting it and reading the results;
//! * `report` — the table.

mod initramfs;
mod kernels;
mod qemu;
mod report;

use std::path::PathBuf;

use crate::{root, step};
use initramfs::{test_executables, Payload};
use kernels::{find_file, kernel, KERNELS};
use qemu::{boot, kvm_works};
pub use report::{host_row, report, Row};

pub(super) const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "xz-utils"];

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

pub(super) fn vm_dir() -> PathBuf {
    root().join("target/vm")
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
