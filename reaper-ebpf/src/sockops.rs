//! sock_ops: notices connections as they are established and closed, and
//! records the watched and fenced ones in `FLOWS`.

use aya_ebpf::bindings::{
    BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    BPF_TCP_CLOSE,
};
use aya_ebpf::helpers::generated::{
    bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_sk_storage_get,
};
use aya_ebpf::macros::sock_ops;
use aya_ebpf::programs::SockOpsContext;
use aya_log_ebpf::warn;
use core::ffi::c_void;
use core::ptr::read_volatile;
use reaper_common::{
    counter, flow_flags, Flow, FlowEvent, FlowEventKind, FlowMark, FlowTuple, PendingGrant,
    PortSet, PortSide, AF_INET, AF_INET6,
};

use crate::maps::{count, marked, marks, EVENTS, FLOWS, PENDING};
use crate::owner::{charge, owner_of, uncharge};

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
    // SAFETY: reading a context field (a nullable socket pointer).
    let sk = unsafe { read_volatile(&(*ops).__bindgen_anon_2.sk) };
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
        owner_uid: owner_of(sk.cast()),
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
    let refused = if !charge(flow.owner_uid) {
        count(counter::SHARE_EXCEEDED);
        true
    } else if FLOWS.insert(&cookie, &flow, 0).is_err() {
        uncharge(flow.owner_uid);
        count(counter::TABLE_FULL);
        true
    } else {
        false
    };
    if refused {
        // A fenced flow, or one already granted a deadline, must not run
        // unenforced: its mark drops every packet from now on and the daemon
        // is told to destroy it. Any other flow is left alone, untracked.
        if fenced || flow.session != 0 {
            mark_refused(ctx);
            emit(FlowEventKind::Refused, cookie, &flow);
        } else {
            warn!(
                ctx,
                "reaper: flow table full or owner {} at its share, connection not tracked (ports {} -> {})",
                flow.owner_uid,
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
    let owner = match unsafe { FLOWS.get(&cookie) } {
        Some(flow) => {
            emit(FlowEventKind::Closed, cookie, flow);
            flow.owner_uid
        }
        None => return,
    };
    // Only the close that removed the entry gives its charge back.
    if FLOWS.remove(&cookie).is_ok() {
        uncharge(owner);
    }
    count(counter::CLOSED);
}
