//! The floor of the per-packet cost: a cgroup_skb program that does nothing
//! (`r0 = 1; exit`), attached like reaper's.
//!
//! `bpf_stats` charges every program run with two clock reads and a per-CPU
//! counter update, on top of the program itself. What that accounting costs
//! depends on the machine (its clocksource, whether it is a VM), so the data
//! path benchmark measures it in the same run, on the same traffic, by
//! attaching this program in place of reaper's. It is loaded with raw `bpf(2)`
//! calls rather than built into reaper's object, so that nothing the product
//! ships exists only for a benchmark.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The name the kernel shows for the program (`bpf_prog_info.name`).
pub const NAME: &str = "bench_noop";

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_CGROUP_INET_EGRESS: u32 = 1;

/// A no-op program attached to a cgroup's ingress and egress; detached when
/// dropped (its links are closed).
pub struct NoopAttached {
    _links: Vec<OwnedFd>,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed bpf_attr of the size passed, laid out as
    // the command expects.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful PROG_LOAD / LINK_CREATE returns a new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put(attr: &mut [u8; 128], offset: usize, bytes: &[u8]) {
    attr[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn load(expected_attach_type: u32) -> std::io::Result<OwnedFd> {
    // mov64 r0, 1 ; exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &BPF_PROG_TYPE_CGROUP_SKB.to_ne_bytes());
    put(&mut attr, 4, &2u32.to_ne_bytes());
    put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 48, NAME.as_bytes());
    put(&mut attr, 68, &expected_attach_type.to_ne_bytes());
    bpf(BPF_PROG_LOAD, &mut attr)
}

/// Attaches the no-op program to `cgroup` (ingress and egress).
pub fn attach(cgroup: &Path) -> std::io::Result<NoopAttached> {
    let dir = std::fs::File::open(cgroup)?;
    let mut links = Vec::new();
    for attach_type in [BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS] {
        let prog = load(attach_type)?;
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &(prog.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 4, &(dir.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &attach_type.to_ne_bytes());
        // The link holds the program; its own descriptor may close.
        links.push(bpf(BPF_LINK_CREATE, &mut attr)?);
    }
    Ok(NoopAttached { _links: links })
}
