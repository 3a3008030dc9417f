//! reaper's kernel side.
//!
//! * `reaper_sockops` (sock_ops, attached to a cgroup v2) notices every TCP
//!   connection of the cgroup as it is established. Connections whose local or
//!   remote port is in the watch bitmap are recorded in `FLOWS`, keyed by
//!   socket cookie, and reported on `EVENTS`; for those only it turns on the
//!   state callback, so that the close is seen and the entry removed.
//!   Unwatched connections cost one array lookup and are never stored.
//!   A connection on a *fenced* port is tracked even if not watched, and a
//!   grant registered beforehand in `PENDING` tags it at once.
//! * `reaper_ingress` / `reaper_egress` (cgroup_skb) are the backstop: a packet
//!   of a tracked flow whose deadline has passed, or of a fenced flow still
//!   ungranted after the grace window, is dropped, whether or not the daemon
//!   is running. RSTs still pass, so that the socket destroy (or the peer)
//!   can end the connection cleanly. They run for every packet of the
//!   cgroup, so they mostly avoid the flow table: a per-CPU cache keeps, by
//!   socket cookie, when a flow's packets start being dropped, re-read from
//!   `FLOWS` only when the daemon has changed something (an epoch).
#![no_std]
#![no_main]

use core::{
    ffi::c_void,
    ptr::{null_mut, read_volatile},
};

use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_boot_ns,
        bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_skb, classifier, map, sock_ops},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockOpsContext, TcContext},
};
use aya_log_ebpf::warn;
use reaper_common::{
    counter, deadline_passed, drop_from, flow_flags, forwarded_key, setting, watch_slot, Flow,
    FlowEvent, FlowEventKind, FlowMark, FlowTuple, Forwarded, PendingGrant, PortSet, PortSide,
    SessionRecord, AF_INET, AF_INET6, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SESSIONS, EVENTS_BYTES,
    MAX_FORWARDED, MAX_PENDING, WATCH_WORDS,
};

#[map]
static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Owned by the daemon; declared here so that it is created, sized and pinned
/// with the rest of the state.
#[map]
static SESSIONS: HashMap<u64, SessionRecord> = HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

#[map]
static WATCH: Array<u64> = Array::with_max_entries(WATCH_WORDS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Grants registered before their connection exists.
#[map]
static PENDING: HashMap<FlowTuple, PendingGrant> = HashMap::with_max_entries(MAX_PENDING, 0);

/// Flows this host forwards (no local socket), keyed by `forwarded_key`.
#[map]
static FORWARDED: HashMap<FlowTuple, Forwarded> = HashMap::with_max_entries(MAX_FORWARDED, 0);

/// Deadlines of granted forwarded flows (daemon-written).
#[map]
static FORWARDED_GRANTS: HashMap<FlowTuple, PendingGrant> =
    HashMap::with_max_entries(MAX_FORWARDED, 0);

/// Per-socket [`FlowMark`]s of connections refused for a full table. A BTF map
/// (socket storage needs BTF for its key and value), declared through aya's
/// definition but used with the raw helper: aya's wrapper only takes
/// sock_addr contexts.
#[btf_map]
static MARKS: SkStorage<FlowMark> = SkStorage::new();

#[inline(always)]
fn marks() -> *mut c_void {
    (&raw const MARKS).cast_mut().cast()
}

/// Daemon-written settings (see `reaper_common::setting`).
#[map]
static SETTINGS: Array<u64> = Array::with_max_entries(setting::COUNT, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_RST: u8 = 0x04;

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn marked(set: PortSet, side: PortSide, port: u16) -> bool {
    let (word, bit) = watch_slot(set, side, port);
    match WATCH.get(word) {
        Some(bits) => *bits & bit != 0,
        None => false,
    }
}

/// Reports a flow on the ring buffer, writing straight into the reserved
/// record: a `FlowEvent` built on the stack would not fit next to a `Flow`
/// in the 512 bytes the verifier allows.
#[inline(always)]
fn emit(kind: FlowEventKind, cookie: u64, flow: &Flow) {
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            let event = entry.as_mut_ptr();
            // SAFETY: the reserved record is ours until submitted.
            unsafe {
                (*event).kind = kind as u32;
                (*event)._pad = 0;
                (*event).cookie = cookie;
                (*event).flow = *flow;
            }
            entry.submit(0);
        }
        None => count(counter::EVENTS_LOST),
    }
}

#[sock_ops]
pub fn reaper_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx, false),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx, true),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

fn on_established(ctx: &SockOpsContext, passive: bool) {
    let family = ctx.family() as u16;
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let local_port = ctx.local_port() as u16;
    // remote_port holds the big-endian port in its upper half.
    let remote_port = u32::from_be(ctx.remote_port()) as u16;
    let fenced = marked(PortSet::Fence, PortSide::Local, local_port)
        || marked(PortSet::Fence, PortSide::Remote, remote_port);
    if !fenced
        && !marked(PortSet::Watch, PortSide::Local, local_port)
        && !marked(PortSet::Watch, PortSide::Remote, remote_port)
    {
        return;
    }

    // Every context field is read once, unconditionally and with volatile
    // loads: reading them inside the branch lets the compiler select between
    // two context pointers, which the verifier refuses.
    let ops = ctx.ops;
    let (snd_isn1, rcv_isn1) = unsafe {
        (
            read_volatile(&(*ops).snd_nxt),
            read_volatile(&(*ops).rcv_nxt),
        )
    };
    let (v4, v6) = unsafe {
        (
            (
                read_volatile(&(*ops).local_ip4),
                read_volatile(&(*ops).remote_ip4),
            ),
            (
                read_volatile(&(*ops).local_ip6),
                read_volatile(&(*ops).remote_ip6),
            ),
        )
    };
    let (local_addr, remote_addr) = if family == AF_INET {
        ([v4.0, 0, 0, 0], [v4.1, 0, 0, 0])
    } else {
        v6
    };
    let ops = ops as *mut c_void;
    let cookie = unsafe { bpf_get_socket_cookie(ops) };
    let mut tuple = FlowTuple {
        family,
        local_port,
        remote_port,
        _pad: 0,
        local_addr,
        remote_addr,
    };
    let mut flags = 0;
    if passive {
        flags |= flow_flags::PASSIVE;
    }
    if fenced {
        flags |= flow_flags::FENCED;
    }
    let mut flow = Flow {
        tuple,
        netns_cookie: unsafe { bpf_get_netns_cookie(ops) },
        established_ns: unsafe { bpf_ktime_get_boot_ns() },
        deadline_ns: 0,
        session: 0,
        flags,
        snd_isn1,
        rcv_isn1,
        _pad: 0,
    };
    // A grant registered before the connection: exact tuple first, then the
    // tuple with the client's ephemeral port left open.
    let mut pending = take_pending(&tuple, flow.netns_cookie);
    if pending.is_none() {
        if passive {
            tuple.remote_port = 0;
        } else {
            tuple.local_port = 0;
        }
        pending = take_pending(&tuple, flow.netns_cookie);
    }
    if let Some(grant) = pending {
        flow.deadline_ns = grant.deadline_ns;
        flow.session = grant.session;
        count(counter::PENDING_MATCHED);
    }
    if FLOWS.insert(&cookie, &flow, 0).is_err() {
        count(counter::TABLE_FULL);
        // A fenced flow, or one already granted a deadline, must not run
        // unenforced: its mark drops every packet from now on and the daemon
        // is told to destroy it. Any other flow is left alone, untracked.
        if fenced || flow.session != 0 {
            mark_refused(ctx);
            emit(FlowEventKind::Refused, cookie, &flow);
        } else {
            warn!(
                ctx,
                "reaper: flow table full, connection not tracked (ports {} -> {})",
                local_port,
                remote_port
            );
        }
        return;
    }
    count(counter::TRACKED);
    // Only tracked sockets pay for state callbacks.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    emit(FlowEventKind::Established, cookie, &flow);
}

/// Gives a socket refused for a full table its mark, which the packet path
/// finds when the socket has no `FLOWS` entry. Only refused sockets pay
/// for socket storage (a few hundred bytes each), and only until the
/// daemon destroys them.
#[inline(always)]
fn mark_refused(ctx: &SockOpsContext) {
    let mut mark = FlowMark::fail_closed();
    // SAFETY: reading a context field (a nullable socket pointer).
    let sk = unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    let created = !sk.is_null() && {
        let value = (&mut mark as *mut FlowMark).cast::<c_void>();
        !unsafe {
            bpf_sk_storage_get(
                marks(),
                sk.cast(),
                value,
                BPF_SK_STORAGE_GET_F_CREATE.into(),
            )
        }
        .is_null()
    };
    if !created {
        count(counter::UNMARKED);
    }
}

/// Claims a pre-registered grant: only the connection whose delete succeeds
/// gets it, so one registration tags one connection.
#[inline(always)]
fn take_pending(key: &FlowTuple, netns_cookie: u64) -> Option<PendingGrant> {
    let grant = unsafe { PENDING.get(key) }.copied()?;
    if grant.netns_cookie != netns_cookie {
        return None;
    }
    PENDING.remove(key).ok()?;
    Some(grant)
}

fn on_close(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // Report straight from the map entry, then remove it.
    match unsafe { FLOWS.get(&cookie) } {
        Some(flow) => emit(FlowEventKind::Closed, cookie, flow),
        None => return,
    }
    let _ = FLOWS.remove(&cookie);
    count(counter::CLOSED);
}

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

/// tc (tcx) ingress on the interfaces a router forwards console flows
/// through: keeps, per watched forwarded flow, what an RST to each end needs
/// (MACs, interface, sequence and acknowledgement numbers), and drops every
/// packet of a flow past its deadline.
#[classifier]
pub fn reaper_forward(ctx: TcContext) -> i32 {
    match forward(&ctx) {
        Ok(verdict) => verdict,
        Err(_) => TC_NEXT,
    }
}

/// Let the packet go on (TCX_NEXT / TC_ACT_UNSPEC).
const TC_NEXT: i32 = -1;
const TC_SHOT: i32 = 2;
const ETH_HLEN: usize = 14;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

fn forward(ctx: &TcContext) -> Result<i32, i64> {
    let ethertype = u16::from_be(ctx.load::<u16>(12)?);
    let (family, src, dst, l4, ip_payload) = match ethertype {
        ETH_P_IP => {
            let version_ihl = ctx.load::<u8>(ETH_HLEN)?;
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
                return Ok(TC_NEXT);
            }
            let ihl = ((version_ihl & 0x0f) as usize) * 4;
            let total = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2)?) as u32;
            let src = [ctx.load::<u32>(ETH_HLEN + 12)?, 0, 0, 0];
            let dst = [ctx.load::<u32>(ETH_HLEN + 16)?, 0, 0, 0];
            (
                AF_INET,
                src,
                dst,
                ETH_HLEN + ihl,
                total.saturating_sub(ihl as u32),
            )
        }
        ETH_P_IPV6 => {
            if ctx.load::<u8>(ETH_HLEN + 6)? != IPPROTO_TCP {
                return Ok(TC_NEXT);
            }
            let payload = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4)?) as u32;
            let src: [u32; 4] = ctx.load(ETH_HLEN + 8)?;
            let dst: [u32; 4] = ctx.load(ETH_HLEN + 24)?;
            (AF_INET6, src, dst, ETH_HLEN + 40, payload)
        }
        _ => return Ok(TC_NEXT),
    };
    let sport = u16::from_be(ctx.load::<u16>(l4)?);
    let dport = u16::from_be(ctx.load::<u16>(l4 + 2)?);
    let watched = |port| {
        marked(PortSet::Watch, PortSide::Local, port)
            || marked(PortSet::Watch, PortSide::Remote, port)
    };
    if !watched(sport) && !watched(dport) {
        return Ok(TC_NEXT);
    }
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4)?);
    let ack = u32::from_be(ctx.load::<u32>(l4 + 8)?);
    let data_offset = ((ctx.load::<u8>(l4 + 12)? >> 4) as u32) * 4;
    let flags = ctx.load::<u8>(l4 + 13)?;
    let payload = ip_payload.saturating_sub(data_offset);
    let seg_end = seq
        .wrapping_add(payload)
        .wrapping_add((flags & TCP_SYN != 0) as u32)
        .wrapping_add((flags & TCP_FIN != 0) as u32);

    let (key, src_is_local) = forwarded_key(family, src, sport, dst, dport);
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let entry = match FORWARDED.get_ptr_mut(&key) {
        Some(entry) => entry,
        None => {
            let fresh = Forwarded {
                first_seen_ns: now,
                ..Default::default()
            };
            // Another CPU may have inserted it meanwhile: either way, use the map's.
            let _ = FORWARDED.insert(&key, &fresh, 1 /* BPF_NOEXIST */);
            match FORWARDED.get_ptr_mut(&key) {
                Some(entry) => entry,
                None => return Ok(TC_NEXT),
            }
        }
    };
    let deadline = match unsafe { FORWARDED_GRANTS.get(&key) } {
        Some(grant) => grant.deadline_ns,
        None => 0,
    };
    // SAFETY: a pointer into the map's value; concurrent writers only ever
    // store whole fields of the same flow.
    unsafe {
        if deadline_passed(deadline, now) {
            // Dropped packets must not move the sequence numbers: the RSTs
            // are built from what actually crossed.
            (*entry).dropped += 1;
            count(counter::DROPPED);
            return Ok(TC_SHOT);
        }
        let end = &mut (*entry).ends[if src_is_local { 0 } else { 1 }];
        end.mac = ctx.load::<[u8; 6]>(6)?;
        end.via_mac = ctx.load::<[u8; 6]>(0)?;
        end.ifindex = read_volatile(&(*ctx.skb.skb).ifindex);
        if end.seen == 0 || (seg_end.wrapping_sub(end.next_seq) as i32) > 0 {
            end.next_seq = seg_end;
        }
        if flags & TCP_ACK != 0 {
            end.ack = ack;
        }
        end.seen = end.seen.wrapping_add(1);
        (*entry).last_seen_ns = now;
    }
    Ok(TC_NEXT)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
