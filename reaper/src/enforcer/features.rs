//! What the running kernel offers reaper, probed once at start.
//!
//! Operators run reaper on whatever kernel their nodes have, so the daemon
//! asks the kernel instead of trusting a version number (distributions
//! backport BPF features): each probe loads a trivial program, creates a
//! one-entry map or makes one harmless request. A missing *required* feature
//! stops the daemon with one error naming every such feature and the Linux
//! release that added it; a missing *optional* one is replaced by a fallback,
//! which the daemon names once when it starts.
//!
//! Why the ring buffer has no perf-buffer fallback: the kernel programs read
//! `CLOCK_BOOTTIME` (`bpf_ktime_get_boot_ns`), which arrived in the same
//! release as the ring buffer (5.8). A kernel without the ring buffer lacks
//! the boot clock too, and a deadline on a clock that stops in suspend is
//! not a deadline; so a perf-buffer path could never be the one missing
//! piece, and is not carried.

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};

use super::diag::SockDiag;
use crate::error::chain;

/// Whether reaper can work without a feature, and what it does instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Without it reaper cannot enforce anything; `since` is the Linux
    /// release that added it.
    Required { since: &'static str },
    /// Without it reaper uses `fallback`.
    Optional { fallback: &'static str },
}

/// One probed feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    /// Short name, as `reaper features` prints it.
    pub name: &'static str,
    /// What reaper uses it for.
    pub purpose: &'static str,
    pub need: Need,
    /// `None` when the probe itself failed (`probe_error` says how): the
    /// daemon then goes ahead as if present, and the real use reports the
    /// error.
    pub present: Option<bool>,
    pub probe_error: Option<String>,
}

impl Feature {
    pub fn missing(&self) -> bool {
        self.present == Some(false)
    }

    pub fn state(&self) -> &'static str {
        match self.present {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        }
    }
}

/// Names under which the rest of the daemon looks features up.
pub mod name {
    pub const SOCK_OPS: &str = "sock_ops";
    pub const CGROUP_SKB: &str = "cgroup_skb";
    pub const RING_BUFFER: &str = "ring_buffer";
    pub const BOOT_CLOCK: &str = "boot_clock";
    pub const JIFFIES: &str = "jiffies";
    pub const SK_STORAGE: &str = "sk_storage";
    pub const TCX: &str = "tcx";
    pub const SOCK_DESTROY: &str = "sock_destroy";
}

/// Every feature reaper looks for, in the order they are reported.
#[derive(Debug, Clone)]
pub struct Features(pub Vec<Feature>);

impl Features {
    /// Asks the kernel. Needs CAP_BPF and CAP_NET_ADMIN, like the daemon.
    pub fn probe() -> Features {
        let known = |r: Result<bool, String>| match r {
            Ok(b) => (Some(b), None),
            Err(e) => (None, Some(e)),
        };
        let program = |t| known(is_program_supported(t).map_err(|e| chain(&e)));
        let helper = |t, h| known(is_helper_supported(t, h).map_err(|e| chain(&e)));
        let map = |t| known(is_map_supported(t).map_err(|e| chain(&e)));
        let feature = |name, purpose, need, (present, probe_error)| Feature {
            name,
            purpose,
            need,
            present,
            probe_error,
        };
        let required = |since| Need::Required { since };
        Features(vec![
            feature(
                name::SOCK_OPS,
                "tags console flows as they connect and accept",
                required("4.13"),
                program(ProgramType::SockOps),
            ),
            feature(
                name::CGROUP_SKB,
                "the in-kernel drop that backs every kill",
                required("4.10"),
                program(ProgramType::CgroupSkb),
            ),
            feature(
                name::RING_BUFFER,
                "flow events from the kernel to the daemon",
                required("5.8"),
                map(MapType::RingBuf),
            ),
            feature(
                name::BOOT_CLOCK,
                "deadlines on CLOCK_BOOTTIME in the kernel programs",
                required("5.8"),
                helper(
                    ProgramType::CgroupSkb,
                    BpfHelper::BPF_FUNC_ktime_get_boot_ns,
                ),
            ),
            feature(
                name::JIFFIES,
                "the packet path's cheap clock",
                required("5.5"),
                helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_jiffies64),
            ),
            feature(
                name::SK_STORAGE,
                "fail-closed marks when the flow table is full",
                required("5.2"),
                map(MapType::SkStorage),
            ),
            feature(
                name::TCX,
                "attaching the forwarded-flow program",
                Need::Optional {
                    fallback: "a legacy tc (clsact) filter",
                },
                tcx_supported(),
            ),
            feature(
                name::SOCK_DESTROY,
                "killing local sockets (CONFIG_INET_DIAG_DESTROY)",
                Need::Optional {
                    fallback: "RST to each end with exact sequence numbers, plus the drop",
                },
                known(
                    SockDiag::open()
                        .and_then(|mut d| d.destroy_supported())
                        .map_err(|e| e.to_string()),
                ),
            ),
        ])
    }

    pub fn get(&self, name: &str) -> Option<&Feature> {
        self.0.iter().find(|f| f.name == name)
    }

    /// Whether the feature is there (or could not be probed, in which case
    /// the daemon tries it and reports what the real use says).
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_none_or(|f| !f.missing())
    }

    /// The required features this kernel lacks, as one sentence; `None`
    /// when reaper can run.
    pub fn blocker(&self) -> Option<String> {
        let missing: Vec<String> = self
            .0
            .iter()
            .filter(|f| f.missing())
            .filter_map(|f| match f.need {
                Need::Required { since } => {
                    Some(format!("{} (Linux {since}+: {})", f.name, f.purpose))
                }
                Need::Optional { .. } => None,
            })
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "this kernel lacks BPF features reaper cannot work without: {}",
                missing.join("; ")
            )
        })
    }
}

/// tcx (6.6+): a `BPF_PROG_QUERY` for tcx ingress on the loopback device
/// (ifindex 1 in every namespace) succeeds where tcx exists; older kernels
/// refuse the attach type with EINVAL.
fn tcx_supported() -> (Option<bool>, Option<String>) {
    /// `union bpf_attr` as `BPF_PROG_QUERY` reads it.
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    let mut query = Query {
        target_ifindex: 1,
        attach_type: BPF_TCX_INGRESS,
        ..Default::default()
    };
    // SAFETY: the query part of bpf_attr, zero-padded; with no id buffers
    // the kernel only writes `count` and `revision`.
    let Err(e) = (unsafe { super::sys::bpf(BPF_PROG_QUERY, &mut query) }) else {
        return (Some(true), None);
    };
    match e.raw_os_error() {
        Some(libc::EINVAL) => (Some(false), None),
        _ => (None, Some(format!("BPF_PROG_QUERY: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(name: &'static str, need: Need, present: Option<bool>) -> Feature {
        Feature {
            name,
            purpose: "p",
            need,
            present,
            probe_error: None,
        }
    }

    #[test]
    fn only_missing_required_features_block() {
        let required = Need::Required { since: "5.8" };
        let optional = Need::Optional { fallback: "f" };
        let fine = Features(vec![
            feature("a", required, Some(true)),
            feature("b", optional, Some(false)),
            feature("c", required, None),
        ]);
        assert_eq!(fine.blocker(), None);
        assert!(!fine.has("b") && fine.has("c") && fine.has("unknown-name"));
        let blocked = Features(vec![
            feature("ring_buffer", required, Some(false)),
            feature("b", optional, Some(false)),
        ]);
        let text = blocked.blocker().unwrap();
        assert!(text.contains("ring_buffer (Linux 5.8+"), "{text}");
        assert!(!text.contains("b ("), "{text}");
    }
}
