//! tc ingress on forwarding interfaces: what an exact RST to each end of a
//! forwarded flow needs, and the drop past its deadline.

use aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns;
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use core::ptr::read_volatile;
use reaper_common::{
    counter, deadline_passed, forwarded_key, Forwarded, PortSet, PortSide, AF_INET, AF_INET6,
};

use crate::maps::{count, marked, FORWARDED, FORWARDED_GRANTS};
use crate::packet::{ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP};

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
