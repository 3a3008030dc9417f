//! Who owns a socket, and each owner's share of `FLOWS`.
//!
//! sock_ops mostly runs in softirq, where the current task is nobody in
//! particular: the owner has to be recorded when the socket is made. So
//! `reaper_sock_create` (cgroup/sock_create, process context) writes the
//! creating uid into the socket's `OWNERS` storage, which an accepted
//! socket inherits from its listener. sock_ops then charges each tracked
//! flow to that uid, and refuses to track past the share: an unprivileged
//! user's self-connections on a watched port fill its own share, never the
//! table the consoles need. Root's sockets, and sockets made before reaper
//! first ran (no storage), count against no share.

use aya_ebpf::bindings::{BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE};
use aya_ebpf::helpers::bpf_get_current_uid_gid;
use aya_ebpf::helpers::generated::bpf_sk_storage_get;
use aya_ebpf::macros::cgroup_sock;
use aya_ebpf::programs::SockContext;
use core::ffi::c_void;
use core::intrinsics::AtomicOrdering;
use core::ptr::read_volatile;
use reaper_common::{setting, AF_INET, AF_INET6, NO_OWNER};

use crate::maps::{owners, setting, OWNER_FLOWS};

const SOCK_STREAM: u32 = 1;

#[cgroup_sock(sock_create)]
pub fn reaper_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: context fields, read once each.
    let (family, kind) = unsafe {
        (
            read_volatile(&(*ctx.sock).family) as u16,
            read_volatile(&(*ctx.sock).type_),
        )
    };
    if (family == AF_INET || family == AF_INET6) && kind == SOCK_STREAM {
        let mut uid = bpf_get_current_uid_gid() as u32;
        // Root's sockets need no storage: no storage means no share.
        if uid != 0 {
            // SAFETY: the helper copies `uid` into the new storage.
            unsafe {
                bpf_sk_storage_get(
                    owners(),
                    ctx.sock.cast(),
                    (&mut uid as *mut u32).cast::<c_void>(),
                    BPF_SK_STORAGE_GET_F_CREATE.into(),
                )
            };
        }
    }
    // Never refuses a socket.
    1
}

/// The owner recorded for socket `sk` (a nullable context pointer).
#[inline(always)]
pub fn owner_of(sk: *mut c_void) -> u32 {
    if sk.is_null() {
        return NO_OWNER;
    }
    // SAFETY: looking up (never creating) the socket's storage.
    let found = unsafe { bpf_sk_storage_get(owners(), sk, core::ptr::null_mut(), 0) } as *const u32;
    if found.is_null() {
        NO_OWNER
    } else {
        // SAFETY: the storage holds a u32 for as long as the socket lives.
        unsafe { read_volatile(found) }
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
