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
//!
//! Each tracked flow is charged to its socket's owner uid (`sk_uid`), so
//! that each owner holds at most its share of `FLOWS`.
//!
//! One file per program family, as they are attached: `sockops`,
//! `packet` (cgroup_skb), `forward` (tc); `owner` holds the owners and
//! their shares, and `maps` the maps they share.

#![no_std]
#![no_main]
// The atomic add of `owner::atomic_add` (the BPF target has no CAS).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod forward;
mod maps;
mod owner;
mod packet;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
