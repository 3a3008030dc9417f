//! Types shared by reaper's kernel programs and its daemon.
//!
//! Everything here is a map key, a map value or a ring-buffer record, so every
//! struct is `#[repr(C)]`, has explicit padding and only contains integers: the
//! kernel side and the user side must agree on the layout byte for byte, and
//! the pinned maps outlive any one daemon binary.
//!
//! The crate is `no_std` so that `reaper-ebpf` can use it; the `user` feature
//! adds the `aya::Pod` impls the daemon needs.
#![no_std]

/// `AF_INET`, as the kernel reports a socket's family.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// Default size of the flow table (`FLOWS`). The daemon overrides it from its
/// config (`max_flows`) when it creates the map.
pub const DEFAULT_MAX_FLOWS: u32 = 131_072;
/// Default size of the session table (`SESSIONS`), overridden by `max_sessions`.
pub const DEFAULT_MAX_SESSIONS: u32 = 65_536;
/// Size of the flow-event ring buffer in bytes (a power of two, page aligned).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Size of the pre-registration table (`PENDING`).
pub const MAX_PENDING: u32 = 16_384;
/// Size of the forwarded-flow table (`FORWARDED`).
pub const MAX_FORWARDED: u32 = 65_536;

/// Names of the maps, as the daemon finds them in the object and pins them.
pub mod map_names {
    pub const FLOWS: &str = "FLOWS";
    pub const SESSIONS: &str = "SESSIONS";
    pub const WATCH: &str = "WATCH";
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const PENDING: &str = "PENDING";
    pub const SETTINGS: &str = "SETTINGS";
    pub const FORWARDED: &str = "FORWARDED";
    pub const FORWARDED_GRANTS: &str = "FORWARDED_GRANTS";
    pub const MARKS: &str = "MARKS";
    pub const OWNER_FLOWS: &str = "OWNER_FLOWS";
}

/// Names of the programs in the object.
pub mod program_names {
    pub const SOCKOPS: &str = "reaper_sockops";
    pub const INGRESS: &str = "reaper_ingress";
    pub const EGRESS: &str = "reaper_egress";
    pub const FORWARD: &str = "reaper_forward";
}

/// A TCP connection as one of its sockets sees it.
///
/// Addresses are kept exactly as the kernel hands them over (network byte
/// order in memory, IPv4 in the first word), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FlowTuple {
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
}

impl FlowTuple {
    /// The same connection as the socket at the other end sees it.
    pub fn reversed(&self) -> FlowTuple {
        FlowTuple {
            family: self.family,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
        }
    }
}

/// A tracked flow: the value of `FLOWS`, keyed by socket cookie.
///
/// The kernel writes it when a watched connection is established and deletes
/// it when the socket closes. The daemon only ever rewrites `deadline_ns` and
/// `session` of an existing entry (with `BPF_EXIST`), so it can never bring a
/// closed flow back to life.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub tuple: FlowTuple,
    /// Cookie of the network namespace the socket lives in.
    pub netns_cookie: u64,
    /// When the connection was established, in `CLOCK_BOOTTIME` nanoseconds.
    pub established_ns: u64,
    /// When the flow must be dead, in `CLOCK_BOOTTIME` nanoseconds; 0 = no grant.
    pub deadline_ns: u64,
    /// The session the flow was granted to; 0 = none.
    pub session: u64,
    /// [`flow_flags`] bits.
    pub flags: u32,
    /// SND.NXT and RCV.NXT when the connection was established (each
    /// initial sequence number + 1). With tcp_info's byte counters they give
    /// the exact sequence numbers an injected RST needs, at kill time, with
    /// no per-packet tracking.
    pub snd_isn1: u32,
    pub rcv_isn1: u32,
    /// The socket's owner (`sk_uid`: the uid that made it, or for an
    /// accepted one its listener's), whose share of `FLOWS` it counts
    /// against; [`NO_OWNER`] for root.
    pub owner_uid: u32,
}

/// `Flow::owner_uid` of a socket whose flows count against no share.
pub const NO_OWNER: u32 = u32::MAX;

/// Distinct socket owners whose tracked flows are counted (`OWNER_FLOWS`).
pub const MAX_OWNERS: u32 = 16_384;

/// What a socket refused for a full flow table carries in its own storage
/// (`MARKS`, a socket-local storage map): it has no `FLOWS` entry, and the
/// packet path must still drop its packets. Only refused sockets get one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowMark {
    /// See [`drop_from`].
    pub drop_from_ns: u64,
}

impl FlowMark {
    /// The mark of a socket that needed tracking and found `FLOWS` full:
    /// every packet dropped from now on (but RSTs).
    pub const fn fail_closed() -> FlowMark {
        FlowMark { drop_from_ns: 0 }
    }
}

/// From when (`CLOCK_BOOTTIME` ns) the kernel drops a tracked flow's packets:
/// its deadline if granted; if ungranted on a fenced port, the end of its
/// grace window; otherwise never (`u64::MAX`).
#[inline(always)]
pub fn drop_from(flow: &Flow, fence_grace_ns: u64) -> u64 {
    if flow.deadline_ns != 0 {
        flow.deadline_ns
    } else if flow.flags & flow_flags::FENCED != 0 {
        flow.established_ns.saturating_add(fence_grace_ns)
    } else {
        u64::MAX
    }
}

/// Bits of [`Flow::flags`].
pub mod flow_flags {
    /// The socket was accepted (passive open): it faces the client, so the
    /// data it *receives* is the user's input. Otherwise it connected out
    /// (a proxy's upstream socket) and the data it *sends* is the input.
    pub const PASSIVE: u32 = 1;
    /// The flow is on a fenced port: without a grant it dies after the
    /// grace window.
    pub const FENCED: u32 = 2;
}

/// A grant waiting for its connection: the value of `PENDING`, keyed by the
/// tuple the socket will have, or by that tuple with its ephemeral port
/// (the client's) set to 0 to match any.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingGrant {
    pub deadline_ns: u64,
    pub session: u64,
    /// Only a connection in this network namespace claims the grant.
    pub netns_cookie: u64,
}

/// Indexes into the `SETTINGS` array (u64 values written by the daemon).
pub mod setting {
    /// How long a fenced flow may live without a grant, in nanoseconds.
    pub const FENCE_GRACE_NS: u32 = 0;
    /// Bumped by the daemon after every change to a `FLOWS` entry or to the
    /// grace: what the packet path cached of a flow at another epoch is
    /// stale. Never 0 once the daemon has started.
    pub const FLOWS_EPOCH: u32 = 1;
    /// Most tracked flows the sockets of one owner uid (other than root)
    /// may hold in `FLOWS`; 0 = no share.
    pub const FLOWS_PER_OWNER: u32 = 2;
    pub const COUNT: u32 = 4;
}

/// The key of a forwarded flow: the tuple with its endpoints in a fixed
/// order (the lower address, then port, as `local`), so that both
/// directions of a connection find the same entry. Returns the key and
/// whether (`src_addr`, `src_port`) became its `local` end.
#[inline(always)]
pub fn forwarded_key(
    family: u16,
    src_addr: [u32; 4],
    src_port: u16,
    dst_addr: [u32; 4],
    dst_port: u16,
) -> (FlowTuple, bool) {
    let mut src_first = src_port < dst_port;
    let mut i = 0;
    while i < 4 {
        if src_addr[i] != dst_addr[i] {
            src_first = src_addr[i] < dst_addr[i];
            break;
        }
        i += 1;
    }
    let (local, remote) = if src_first {
        ((src_addr, src_port), (dst_addr, dst_port))
    } else {
        ((dst_addr, dst_port), (src_addr, src_port))
    };
    let key = FlowTuple {
        family,
        local_port: local.1,
        remote_port: remote.1,
        _pad: 0,
        local_addr: local.0,
        remote_addr: remote.0,
    };
    (key, src_first)
}

/// One end of a forwarded flow, as the router sees it: what an RST to that
/// end needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ForwardedEnd {
    /// Source MAC of this end's packets (the end, or its last hop).
    pub mac: [u8; 6],
    /// Their destination MAC: this host's, on the link toward this end.
    pub via_mac: [u8; 6],
    /// The interface this end's packets come in on (and RSTs go out on).
    pub ifindex: u32,
    /// This end's SND.NXT: the highest sequence number it has sent, + 1.
    pub next_seq: u32,
    /// The last acknowledgement number this end sent.
    pub ack: u32,
    /// Packets seen from this end.
    pub seen: u32,
}

/// A forwarded flow: the value of `FORWARDED`, keyed by [`forwarded_key`].
/// Only the tc program writes it (the daemon only deletes stale entries):
/// grants live in `FORWARDED_GRANTS` (a [`PendingGrant`] per key), so a
/// daemon write can never put back an older sequence number.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Forwarded {
    /// `[local end, remote end]` of the key.
    pub ends: [ForwardedEnd; 2],
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Packets dropped since the deadline.
    pub dropped: u64,
    pub _pad: u64,
}

/// What happened to a flow, as reported on the `EVENTS` ring buffer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEventKind {
    Established = 1,
    Closed = 2,
    /// A fenced (or pre-granted) connection found `FLOWS` full: it is not
    /// tracked, the kernel drops its packets, and the daemon must destroy it.
    Refused = 3,
}

/// One ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowEvent {
    /// A [`FlowEventKind`] as `u32` (an enum with unknown values must never be
    /// materialised from kernel bytes).
    pub kind: u32,
    pub _pad: u32,
    pub cookie: u64,
    pub flow: Flow,
}

/// Length-prefixed fixed-size text, for names stored in kernel maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label<const N: usize> {
    pub len: u16,
    pub bytes: [u8; N],
}

impl<const N: usize> Default for Label<N> {
    fn default() -> Self {
        Label {
            len: 0,
            bytes: [0; N],
        }
    }
}

impl<const N: usize> Label<N> {
    /// The longest text a label holds, in bytes.
    pub const CAPACITY: usize = N;

    /// Builds a label; `None` when `text` is longer than `N` bytes.
    pub fn new(text: &str) -> Option<Self> {
        let src = text.as_bytes();
        if src.len() > N {
            return None;
        }
        let mut label = Self::default();
        label.bytes[..src.len()].copy_from_slice(src);
        label.len = src.len() as u16;
        Some(label)
    }

    /// The text, or `None` if the stored bytes are not valid (a corrupt or
    /// foreign map entry).
    pub fn as_str(&self) -> Option<&str> {
        let len = self.len as usize;
        if len > N {
            return None;
        }
        core::str::from_utf8(&self.bytes[..len]).ok()
    }
}

/// Longest session id, user and target names, in bytes.
pub const SESSION_NAME_MAX: usize = 128;
pub const USER_NAME_MAX: usize = 64;
pub const TARGET_NAME_MAX: usize = 128;
pub const CLASS_NAME_MAX: usize = 62;

/// A granted session: the value of `SESSIONS`, keyed by the daemon's session
/// number. Only user space reads and writes it; it lives in a pinned map so
/// that a restarted daemon finds every grant it had acknowledged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SessionRecord {
    /// Deadline in `CLOCK_BOOTTIME` nanoseconds.
    pub deadline_ns: u64,
    /// When the session was first granted, in `CLOCK_BOOTTIME` nanoseconds.
    pub granted_ns: u64,
    /// The same instant in Unix-epoch nanoseconds, for humans and audit.
    pub granted_unix_ns: u64,
    /// Who granted it (SO_PEERCRED of the control client).
    pub granted_by_uid: u32,
    /// 0: input counts as activity; 1: any data does.
    pub idle_direction: u32,
    /// Idle timeout in nanoseconds; 0 = none.
    pub idle_timeout_ns: u64,
    /// Last activity a proxy reported with `touch`, boot-clock nanoseconds.
    pub touched_ns: u64,
    /// When the deadline came from an `expires_at`: that wall-clock instant
    /// (Unix nanoseconds), so the deadline moves when someone sets the
    /// clock. 0 when it came from a ttl (boot clock only).
    pub expires_unix_ns: u64,
    pub name: Label<SESSION_NAME_MAX>,
    pub user: Label<USER_NAME_MAX>,
    pub target: Label<TARGET_NAME_MAX>,
    pub class: Label<CLASS_NAME_MAX>,
    /// `session_flags`.
    pub flags: u8,
    pub _pad2: u8,
}

/// `SessionRecord::flags`.
pub mod session_flags {
    /// A fleet mirror: another node granted this session and this node
    /// enforces the flows of it that land here (docs/fleet.md). Kept in
    /// the record so that a restarted daemon still knows it is one.
    pub const MIRROR: u8 = 1;
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Watched flows inserted into `FLOWS`.
    pub const TRACKED: u32 = 0;
    /// Tracked flows whose socket closed.
    pub const CLOSED: u32 = 1;
    /// Packets dropped because their flow's deadline had passed.
    pub const DROPPED: u32 = 2;
    /// Watched flows that could not be tracked because `FLOWS` was full.
    pub const TABLE_FULL: u32 = 3;
    /// Events that did not fit in the ring buffer.
    pub const EVENTS_LOST: u32 = 4;
    /// Connections tagged at establishment from a pre-registered grant.
    pub const PENDING_MATCHED: u32 = 5;
    /// Refused connections that got no [`FlowMark`](super::FlowMark) (socket
    /// storage could not be allocated): the kernel does not drop their
    /// packets; the daemon still destroys them.
    pub const UNMARKED: u32 = 6;
    /// Watched flows not tracked because their owner held its whole share
    /// of `FLOWS` (`max_flows_per_owner`).
    pub const SHARE_EXCEEDED: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
}

/// Which end of a connection a watched port range applies to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortSide {
    Local = 0,
    Remote = 1,
}

/// What a port bitmap in `WATCH` marks.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortSet {
    /// Connections are tracked.
    Watch = 0,
    /// Connections are tracked and must be granted within the grace window.
    Fence = 1,
    /// Every port watched or fenced since the maps were made (the daemon
    /// only ever adds to it, across reloads and restarts), so a superset of
    /// the ports of every live tracked flow. The packet path asks it first:
    /// a packet of any other socket is let through after two array reads,
    /// before the per-socket lookup, which costs a helper call.
    Seen = 2,
}

/// `WATCH` holds six bitmaps of all 65536 ports (watch/fence/seen × local/
/// remote) as u64 words: one array lookup per bitmap decides about a new
/// connection or a packet, whatever the number of configured ranges.
pub const WATCH_WORDS_PER_SIDE: u32 = 65_536 / 64;
pub const WATCH_WORDS: u32 = 6 * WATCH_WORDS_PER_SIDE;

/// Where `port` on `side` lives in bitmap `set`: (word index, bit mask).
#[inline(always)]
pub fn watch_slot(set: PortSet, side: PortSide, port: u16) -> (u32, u64) {
    let bitmap = set as u32 * 2 + side as u32;
    let word = bitmap * WATCH_WORDS_PER_SIDE + (port as u32 >> 6);
    (word, 1u64 << (port & 63))
}

/// The one deadline rule shared by the kernel's backstop and the daemon: a
/// flow with a deadline is dead from that nanosecond on.
#[inline(always)]
pub fn deadline_passed(deadline_ns: u64, now_ns: u64) -> bool {
    deadline_ns != 0 && now_ns >= deadline_ns
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made only of integers and integer
    // arrays with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowTuple {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::SessionRecord {}
    unsafe impl aya::Pod for super::PendingGrant {}
    unsafe impl aya::Pod for super::Forwarded {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<FlowTuple>(), 40);
        assert_eq!(size_of::<Flow>(), 88);
        assert_eq!(size_of::<FlowEvent>(), 104);
        assert_eq!(size_of::<PendingGrant>(), 24);
        assert_eq!(
            size_of::<SessionRecord>(),
            56 + (2 + SESSION_NAME_MAX)
                + (2 + USER_NAME_MAX)
                + (2 + TARGET_NAME_MAX)
                + (2 + CLASS_NAME_MAX)
                + 2
        );
    }

    #[test]
    fn watch_slots_split_sets_sides_and_words() {
        use PortSet::*;
        use PortSide::*;
        assert_eq!(watch_slot(Watch, Local, 0), (0, 1));
        assert_eq!(watch_slot(Watch, Local, 63), (0, 1 << 63));
        assert_eq!(watch_slot(Watch, Local, 5900), (92, 1 << 12));
        assert_eq!(watch_slot(Watch, Remote, 0), (WATCH_WORDS_PER_SIDE, 1));
        assert_eq!(watch_slot(Fence, Local, 0), (2 * WATCH_WORDS_PER_SIDE, 1));
        assert_eq!(
            watch_slot(Fence, Remote, 65535),
            (4 * WATCH_WORDS_PER_SIDE - 1, 1 << 63)
        );
        assert_eq!(watch_slot(Seen, Remote, 65535), (WATCH_WORDS - 1, 1 << 63));
    }

    #[test]
    fn forwarded_keys_are_the_same_both_ways() {
        use core::mem::size_of;
        let a = [1, 0, 0, 0];
        let b = [2, 0, 0, 0];
        let (k1, a_first) = forwarded_key(AF_INET, a, 40000, b, 5900);
        let (k2, b_first) = forwarded_key(AF_INET, b, 5900, a, 40000);
        assert_eq!(k1, k2);
        assert!(a_first && !b_first);
        assert_eq!((k1.local_addr, k1.local_port), (a, 40000));
        // Same address: the port decides.
        let (k3, low_first) = forwarded_key(AF_INET, a, 1, a, 2);
        assert!(low_first && k3.local_port == 1);
        assert_eq!(size_of::<ForwardedEnd>(), 28);
        assert_eq!(size_of::<Forwarded>(), 88);
    }

    #[test]
    fn drop_from_follows_deadline_then_fence() {
        let mut flow = Flow {
            established_ns: 1_000,
            ..Flow::default()
        };
        assert_eq!(
            drop_from(&flow, 500),
            u64::MAX,
            "unfenced, ungranted: never"
        );
        flow.flags = flow_flags::FENCED;
        assert_eq!(drop_from(&flow, 500), 1_500, "fenced: end of grace");
        assert_eq!(drop_from(&flow, u64::MAX), u64::MAX, "grace saturates");
        flow.deadline_ns = 9_000;
        assert_eq!(drop_from(&flow, 500), 9_000, "a grant replaces the fence");
        flow.flags = 0;
        assert_eq!(drop_from(&flow, 500), 9_000);
    }

    #[test]
    fn deadline_rule() {
        assert!(!deadline_passed(0, u64::MAX), "0 means no deadline");
        assert!(!deadline_passed(100, 99));
        assert!(deadline_passed(100, 100));
        assert!(deadline_passed(100, 101));
    }

    #[test]
    fn labels_round_trip_and_refuse_overflow() {
        let l = Label::<8>::new("vnc-1").unwrap();
        assert_eq!(l.as_str(), Some("vnc-1"));
        assert!(Label::<4>::new("toolong").is_none());
        let corrupt = Label::<4> {
            len: 9,
            bytes: [b'a'; 4],
        };
        assert_eq!(corrupt.as_str(), None);
    }

    #[test]
    fn reversed_tuple_swaps_ends() {
        let t = FlowTuple {
            family: AF_INET,
            local_port: 5900,
            remote_port: 40000,
            _pad: 0,
            local_addr: [1, 0, 0, 0],
            remote_addr: [2, 0, 0, 0],
        };
        let r = t.reversed();
        assert_eq!((r.local_port, r.remote_port), (40000, 5900));
        assert_eq!(r.local_addr, [2, 0, 0, 0]);
        assert_eq!(r.reversed(), t);
    }
}
