//! The maps the programs share with each other and with the daemon (the
//! daemon opens them by name from their pins; `reaper_common::map_names`).

use aya_ebpf::btf_maps::SkStorage;
use aya_ebpf::macros::{btf_map, map};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use core::ffi::c_void;
use reaper_common::{
    counter, setting, watch_slot, Flow, FlowMark, FlowTuple, Forwarded, PendingGrant, PortSet,
    PortSide, SessionRecord, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SESSIONS, EVENTS_BYTES, MAX_FORWARDED,
    MAX_OWNERS, MAX_PENDING, WATCH_WORDS,
};

#[map]
pub static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Owned by the daemon; declared here so that it is created, sized and pinned
/// with the rest of the state.
#[map]
pub static SESSIONS: HashMap<u64, SessionRecord> =
    HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

#[map]
pub static WATCH: Array<u64> = Array::with_max_entries(WATCH_WORDS, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Grants registered before their connection exists.
#[map]
pub static PENDING: HashMap<FlowTuple, PendingGrant> = HashMap::with_max_entries(MAX_PENDING, 0);

/// Flows this host forwards (no local socket), keyed by `forwarded_key`.
#[map]
pub static FORWARDED: HashMap<FlowTuple, Forwarded> = HashMap::with_max_entries(MAX_FORWARDED, 0);

/// Deadlines of granted forwarded flows (daemon-written).
#[map]
pub static FORWARDED_GRANTS: HashMap<FlowTuple, PendingGrant> =
    HashMap::with_max_entries(MAX_FORWARDED, 0);

/// Per-socket [`FlowMark`]s of connections refused for a full table. A BTF map
/// (socket storage needs BTF for its key and value), declared through aya's
/// definition but used with the raw helper: aya's wrapper only takes
/// sock_addr contexts.
#[btf_map]
pub static MARKS: SkStorage<FlowMark> = SkStorage::new();

#[inline(always)]
pub fn marks() -> *mut c_void {
    (&raw const MARKS).cast_mut().cast()
}

/// Tracked flows per owner uid (`Flow::owner_uid`), against the share in
/// `SETTINGS[FLOWS_PER_OWNER]`.
#[map]
pub static OWNER_FLOWS: HashMap<u32, u64> = HashMap::with_max_entries(MAX_OWNERS, 0);

/// Daemon-written settings (see `reaper_common::setting`).
#[map]
pub static SETTINGS: Array<u64> = Array::with_max_entries(setting::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *slot += 1 };
    }
}

/// A daemon-written setting (0 if unset).
#[inline(always)]
pub fn setting(index: u32) -> u64 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

/// Whether `port` is in the port set `set` on `side` (the `WATCH` bitmap).
#[inline(always)]
pub fn marked(set: PortSet, side: PortSide, port: u16) -> bool {
    let (word, bit) = watch_slot(set, side, port);
    match WATCH.get(word) {
        Some(bits) => *bits & bit != 0,
        None => false,
    }
}
