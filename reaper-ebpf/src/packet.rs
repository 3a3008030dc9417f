//! cgroup_skb ingress and egress: the in-kernel backstop that drops every
//! packet of an expired flow, daemon or no daemon.

use aya_ebpf::bindings::bpf_sock;
use aya_ebpf::helpers::generated::{
    bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_boot_ns, bpf_sk_storage_get,
};
use aya_ebpf::macros::{cgroup_skb, map};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::SkBuffContext;
use core::ffi::c_void;
use core::ptr::null_mut;
use reaper_common::{counter, drop_from, setting, FlowMark, PortSet, PortSide};

use crate::maps::{count, marked, marks, FLOWS, SETTINGS};

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_RST: u8 = 0x04;

#[cgroup_skb]
pub fn reaper_ingress(ctx: SkBuffContext) -> i32 {
    enforce(&ctx)
}

#[cgroup_skb]
pub fn reaper_egress(ctx: SkBuffContext) -> i32 {
    enforce(&ctx)
}

/// 1 lets the packet through, 0 drops it.
///
/// This runs for every packet of every socket in the cgroup, so the common
/// cases keep to inline reads and at most one helper call (each costs tens
/// of nanoseconds where returns are mitigated): a socket on no port ever
/// watched or fenced is let through after two array reads; a tracked one
/// is found in the per-CPU flow cache by its cookie, and a deadline far
/// ahead needs only the clock cache.
#[inline(always)]
fn enforce(ctx: &SkBuffContext) -> i32 {
    // SAFETY: reading a context field; the verifier types it as a nullable
    // socket pointer, and the helper accepts any socket the kernel gives.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: sock_common fields of a non-null socket pointer. The local
    // port is in host order, the remote one in network order.
    let (local_port, remote_port) =
        unsafe { ((*sk).src_port as u16, u16::from_be((*sk).dst_port)) };
    if !marked(PortSet::Seen, PortSide::Local, local_port)
        && !marked(PortSet::Seen, PortSide::Remote, remote_port)
    {
        return 1;
    }
    // The per-CPU caches below are shared by every run on this CPU, and a
    // run in process context can be interrupted by one in softirq (a packet
    // received, an ACK sent) halfway through reading or writing them. Only
    // the outermost run uses them; a nested one looks everything up.
    let Some(depth) = NESTING.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU; a nested run restores it before we resume.
    let outermost = unsafe {
        let outer = *depth == 0;
        *depth += 1;
        outer
    };
    let verdict = judge(ctx, sk, outermost);
    unsafe { *depth -= 1 };
    verdict
}

/// Per CPU: how many runs of the packet programs are in progress.
#[map]
static NESTING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The verdict for a packet of a socket on a seen port.
#[inline(always)]
fn judge(ctx: &SkBuffContext, sk: *mut bpf_sock, use_caches: bool) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let drop_from_ns = if use_caches {
        match cached_drop_from(sk, cookie) {
            Some(at) => at,
            None => return 1,
        }
    } else {
        look_up(sk, cookie)
    };
    if !reached(drop_from_ns, use_caches) || is_rst(ctx) {
        return 1;
    }
    count(counter::DROPPED);
    0
}

/// `look_up` through the per-CPU flow cache (outermost runs only).
#[inline(always)]
fn cached_drop_from(sk: *mut bpf_sock, cookie: u64) -> Option<u64> {
    let epoch = *SETTINGS.get(setting::FLOWS_EPOCH)?;
    let cached = FLOW_CACHE.get_ptr_mut(cookie as u32 & (FLOW_CACHE_SLOTS - 1))?;
    // SAFETY: per-CPU slot, and only the outermost run touches it.
    let cached = unsafe { &mut *cached };
    if cached.cookie != cookie || cached.epoch != epoch || epoch == 0 {
        // Read the epoch before the flow: a daemon write racing with this
        // leaves an entry that is stale at the next epoch, never one that
        // looks current.
        *cached = CachedFlow {
            cookie,
            epoch,
            drop_from_ns: look_up(sk, cookie),
        };
    }
    Some(cached.drop_from_ns)
}

/// Per CPU, a direct-mapped cache of what the packet path needs of a flow,
/// by socket cookie (cookies are never reused), valid for one
/// `setting::FLOWS_EPOCH`. Sparing the `FLOWS` lookup on every packet of a
/// tracked flow, it costs a fixed 24 KiB per CPU instead of per-flow
/// memory; flows whose cookies share a slot just look up more often.
#[repr(C)]
#[derive(Clone, Copy)]
struct CachedFlow {
    cookie: u64,
    epoch: u64,
    drop_from_ns: u64,
}

const FLOW_CACHE_SLOTS: u32 = 1024;

#[map]
static FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// When the packets of the socket start being dropped: from its `FLOWS`
/// entry, or at once if it was refused for a full table (its mark); never
/// for any other socket.
#[inline(never)]
fn look_up(sk: *mut bpf_sock, cookie: u64) -> u64 {
    if let Some(flow) = unsafe { FLOWS.get(&cookie) } {
        let grace = SETTINGS.get(setting::FENCE_GRACE_NS).copied().unwrap_or(0);
        return drop_from(flow, grace);
    }
    let mark = unsafe { bpf_sk_storage_get(marks(), sk.cast(), null_mut(), 0) }.cast::<FlowMark>();
    if mark.is_null() {
        u64::MAX
    } else {
        // SAFETY: a socket storage value stays valid for the program's run.
        unsafe { (*mark).drop_from_ns }
    }
}

/// Per-CPU: the last `CLOCK_BOOTTIME` reading and the jiffy it was taken in.
#[repr(C)]
#[derive(Clone, Copy)]
struct ClockCache {
    jiffies: u64,
    now_ns: u64,
}

/// How far the real time may be past a cached reading taken in the current
/// jiffy: one tick is at most 10 ms (HZ ≥ 100); ten times that covers a
/// tick that updates jiffies late.
const CLOCK_SLACK_NS: u64 = 100_000_000;

#[map]
static CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// Whether `CLOCK_BOOTTIME` has reached `at_ns`; the cache is for
/// outermost runs only (see `NESTING`). Reading the precise clock
/// costs tens of nanoseconds (more in a VM), as much as the rest of the
/// packet path; a reading cached in the current jiffy is behind the true
/// time by at most `CLOCK_SLACK_NS`, so an instant further ahead than that
/// is not yet reached without asking. Near and past the instant the precise
/// clock decides, so the drop is as exact as before.
#[inline(always)]
fn reached(at_ns: u64, use_cache: bool) -> bool {
    if at_ns == u64::MAX {
        return false;
    }
    if !use_cache {
        return unsafe { bpf_ktime_get_boot_ns() } >= at_ns;
    }
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_boot_ns() } >= at_ns;
    };
    // SAFETY: per-CPU slot, and only the outermost run touches it.
    let cache = unsafe { &mut *cache };
    if cache.jiffies == jiffies && at_ns > cache.now_ns.saturating_add(CLOCK_SLACK_NS) {
        return false;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    cache.jiffies = jiffies;
    cache.now_ns = now;
    now >= at_ns
}

/// Whether the packet is a TCP segment with RST set. Only asked for packets of
/// expired flows, so the parsing never runs on the hot path.
fn is_rst(ctx: &SkBuffContext) -> bool {
    let flags_at = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            let Ok(version_ihl) = ctx.load::<u8>(0) else {
                return false;
            };
            let Ok(proto) = ctx.load::<u8>(9) else {
                return false;
            };
            if proto != IPPROTO_TCP {
                return false;
            }
            ((version_ihl & 0x0f) as usize) * 4 + 13
        }
        ETH_P_IPV6 => {
            // Extension headers are not followed: such a packet is dropped.
            let Ok(next) = ctx.load::<u8>(6) else {
                return false;
            };
            if next != IPPROTO_TCP {
                return false;
            }
            40 + 13
        }
        _ => return false,
    };
    match ctx.load::<u8>(flags_at) {
        Ok(flags) => flags & TCP_FLAG_RST != 0,
        Err(_) => false,
    }
}
