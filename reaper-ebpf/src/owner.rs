//! Who owns a socket, and each owner's share of `FLOWS`.
//!
//! sock_ops mostly runs in softirq, where the current task is nobody in
//! particular, so the owner is not asked of the task: it is the socket's
//! own `sk_uid`, which the kernel sets when the socket is made (the
//! creator's fsuid; an accepted socket gets its listener's) and only a
//! holder of CAP_CHOWN can change (fchown on the socket). Nothing runs at
//! `socket()` for it. sock_ops charges each tracked flow to that uid and
//! refuses to track past the share: an unprivileged user's
//! self-connections on a watched port fill its own share, never the table
//! the consoles need. Root's sockets count against no share.

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::generated::bpf_skc_to_tcp_sock;
use core::ffi::c_void;
use core::intrinsics::AtomicOrdering;
use core::ptr::read_volatile;
use reaper_common::{setting, NO_OWNER};

use crate::maps::{setting, OWNER_FLOWS};

/// Where `sk_uid` is in `struct sock` on the running kernel, in bytes,
/// from its BTF: set by the daemon at load (0: unknown, and no socket has
/// an owner). Read-only data, so the verifier knows the value and checks
/// the load below against the kernel's own layout of the socket.
#[unsafe(no_mangle)]
static SK_UID_OFFSET: u32 = 0;

/// The owner of socket `sk` (a nullable context pointer).
#[inline(always)]
pub fn owner_of(sk: *mut c_void) -> u32 {
    // SAFETY: a read of read-only data.
    let offset = unsafe { read_volatile(&SK_UID_OFFSET) } as usize;
    if sk.is_null() || offset == 0 {
        return NO_OWNER;
    }
    // SAFETY: the helper checks the socket and returns a kernel pointer
    // (or null) whose loads the verifier checks against BTF.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk) };
    if tcp.is_null() {
        return NO_OWNER;
    }
    // SAFETY: `struct sock` begins every TCP socket, and the verifier
    // allows the load only where the kernel's BTF puts a 4-byte field.
    let uid = unsafe { read_volatile(tcp.cast::<u8>().add(offset).cast::<u32>()) };
    if uid == 0 {
        NO_OWNER
    } else {
        uid
    }
}

/// Charges one tracked flow to `owner`: false when its share is full. The
/// count is read, then added to atomically: CPUs racing at the edge may
/// pass the share by one each, never more.
#[inline(always)]
pub fn charge(owner: u32) -> bool {
    if owner == NO_OWNER {
        return true;
    }
    let share = setting(setting::FLOWS_PER_OWNER);
    let held = match OWNER_FLOWS.get_ptr_mut(&owner) {
        Some(p) => p,
        None => {
            let _ = OWNER_FLOWS.insert(&owner, &0, BPF_NOEXIST.into());
            match OWNER_FLOWS.get_ptr_mut(&owner) {
                Some(p) => p,
                // More owners than the map holds: track, uncounted.
                None => return true,
            }
        }
    };
    // SAFETY: a live map value, shared with other CPUs through atomics.
    if share != 0 && unsafe { read_volatile(held) } >= share {
        return false;
    }
    unsafe { atomic_add(held, 1) };
    true
}

/// Gives back what `charge` took for a flow of `owner`.
#[inline(always)]
pub fn uncharge(owner: u32) {
    if owner == NO_OWNER {
        return;
    }
    if let Some(p) = OWNER_FLOWS.get_ptr_mut(&owner) {
        // SAFETY: as in `charge`. Adding u64::MAX subtracts one.
        unsafe { atomic_add(p, u64::MAX) };
    }
}

/// `lock *(u64 *)p += v`: the BPF target has atomic adds but no
/// compare-and-swap, so core's atomic types offer only loads and stores
/// there; the intrinsic reaches LLVM's atomic add directly. Its result is
/// unused, which keeps it an XADD that every kernel reaper supports.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}
