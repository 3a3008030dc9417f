//! The enforcer: kernel programs, their maps and links, and the kill path.
//!
//! All state that must survive the daemon lives in maps pinned under
//! `pin_path`, and the programs stay attached through pinned links. Starting
//! the enforcer therefore *adopts* what a previous daemon left: the maps are
//! reopened from their pins, the freshly loaded programs are attached, and
//! their links replace the old pins atomically (a rename), so enforcement
//! never has a gap.

pub mod destroy;
mod pins;
pub mod socket;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps};
use aya::{Ebpf, EbpfLoader};
use reaper_common::{
    counter, map_names, program_names, watch_slot, Flow, PortSide, SessionRecord, WATCH_WORDS,
};
use tracing::{info, warn};

use crate::config::{Config, Side, Watch};
use crate::error::{Error, Result};
pub use destroy::{DestroyOutcome, DestroyTarget, Destroyer};
pub use pins::{ensure_bpffs, unload};

/// The compiled kernel programs, embedded at build time by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reaper"));

/// Name of a pinned link under `pin_path`.
const LINK_PINS: [(&str, &str); 3] = [
    (program_names::SOCKOPS, "link_sockops"),
    (program_names::INGRESS, "link_ingress"),
    (program_names::EGRESS, "link_egress"),
];

pub struct Enforcer {
    /// Keeps the programs (and the log ring buffer) alive.
    _ebpf: Ebpf,
    flows: HashMap<MapData, u64, Flow>,
    sessions: HashMap<MapData, u64, SessionRecord>,
    counters: PerCpuArray<MapData, u64>,
    destroyer: Destroyer,
    /// The namespace the daemon (and its destroyer) lives in.
    pub netns_cookie: u64,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
}

/// What `Enforcer::start` hands over besides the enforcer itself.
pub struct Started {
    pub enforcer: Enforcer,
    pub events: RingBuf<MapData>,
    pub kernel_log: Option<aya_log::EbpfLogger<KernelLog>>,
}

/// Forwards aya-log records from the kernel programs to `tracing`.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        match record.level() {
            log::Level::Error => tracing::error!(target: "reaper::kernel", "{}", record.args()),
            log::Level::Warn => tracing::warn!(target: "reaper::kernel", "{}", record.args()),
            _ => tracing::info!(target: "reaper::kernel", "{}", record.args()),
        }
    }
    fn flush(&self) {}
}

impl Enforcer {
    /// Loads, attaches and pins everything, adopting pinned state if present.
    pub fn start(config: &Config) -> Result<Started> {
        ensure_bpffs(&config.pin_path)?;
        std::fs::create_dir_all(&config.pin_path)
            .map_err(Error::io(format!("creating {}", config.pin_path.display())))?;
        let cgroup = match &config.cgroup {
            Some(path) => path.clone(),
            None => cgroup2_root()?,
        };
        let cgroup_dir = File::open(&cgroup)
            .map_err(Error::io(format!("opening cgroup {}", cgroup.display())))?;

        let adopting = config.pin_path.join(map_names::FLOWS).exists();
        let pin = |name: &str| config.pin_path.join(name);
        let mut loader = EbpfLoader::new();
        let names = [
            map_names::FLOWS,
            map_names::SESSIONS,
            map_names::WATCH,
            map_names::EVENTS,
            map_names::COUNTERS,
        ];
        for name in names {
            loader.map_pin_path(name, pin(name));
        }
        loader
            .map_max_entries(map_names::FLOWS, config.max_flows)
            .map_max_entries(map_names::SESSIONS, config.max_sessions);
        let mut ebpf = loader.load(OBJECT)?;
        check_pinned_geometry(&ebpf, config)?;

        write_watch(&mut ebpf, &config.watch)?;

        for (program, link) in LINK_PINS {
            let prog = ebpf.program_mut(program).ok_or_else(|| {
                Error::Setup(format!("program {program} missing from the object"))
            })?;
            let fd_link: aya::programs::links::FdLink = if program == program_names::SOCKOPS {
                let p: &mut SockOps = prog.try_into()?;
                p.load()?;
                let id = p.attach(&cgroup_dir, CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into()?
            } else {
                let p: &mut CgroupSkb = prog.try_into()?;
                p.load()?;
                let kind = if program == program_names::INGRESS {
                    CgroupSkbAttachType::Ingress
                } else {
                    CgroupSkbAttachType::Egress
                };
                let id = p.attach(&cgroup_dir, kind, CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into()?
            };
            pins::replace_link_pin(fd_link, &pin(link))?;
        }

        let kernel_log = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!("kernel-side logging unavailable: {e}");
                None
            }
        };
        let take = |ebpf: &mut Ebpf, name: &str| -> Result<Map> {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Setup(format!("map {name} missing from the object")))
        };
        let flows = HashMap::try_from(take(&mut ebpf, map_names::FLOWS)?)?;
        let sessions = HashMap::try_from(take(&mut ebpf, map_names::SESSIONS)?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, map_names::COUNTERS)?)?;
        let events = RingBuf::try_from(take(&mut ebpf, map_names::EVENTS)?)?;

        let destroyer =
            Destroyer::open().map_err(Error::io("opening the sock_diag netlink socket"))?;
        let netns_cookie = destroyer
            .netns_cookie()
            .map_err(Error::io("reading the network namespace cookie"))?;
        info!(
            cgroup = %cgroup.display(),
            pin_path = %config.pin_path.display(),
            adopted = adopting,
            "kernel programs attached"
        );
        Ok(Started {
            enforcer: Enforcer {
                _ebpf: ebpf,
                flows,
                sessions,
                counters,
                destroyer,
                netns_cookie,
                cgroup,
                pin_path: config.pin_path.clone(),
            },
            events,
            kernel_log,
        })
    }

    /// Every tracked flow, as the kernel has it now.
    pub fn flows(&self) -> Vec<(u64, Flow)> {
        self.flows.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn flow(&self, cookie: u64) -> Option<Flow> {
        self.flows.get(&cookie, 0).ok()
    }

    /// Rewrites an existing flow entry; `Ok(false)` if the flow has closed in
    /// the meantime (its entry is never re-created).
    pub fn update_flow(&mut self, cookie: u64, flow: &Flow) -> Result<bool> {
        match self.flows.insert(cookie, flow, 2 /* BPF_EXIST */) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn remove_flow(&mut self, cookie: u64) {
        let _ = self.flows.remove(&cookie);
    }

    pub fn sessions(&self) -> Vec<(u64, SessionRecord)> {
        self.sessions.iter().filter_map(|r| r.ok()).collect()
    }

    /// Writes a session record; `Ok(false)` when the table is full.
    pub fn put_session(&mut self, id: u64, record: &SessionRecord) -> Result<bool> {
        match self.sessions.insert(id, record, 0) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::E2BIG) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn remove_session(&mut self, id: u64) {
        let _ = self.sessions.remove(&id);
    }

    pub fn destroy(&mut self, targets: &[DestroyTarget]) -> std::io::Result<Vec<DestroyOutcome>> {
        self.destroyer.destroy(targets)
    }

    /// Kernel counters, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let names = [
            (counter::TRACKED, "tracked"),
            (counter::CLOSED, "closed"),
            (counter::DROPPED, "dropped_packets"),
            (counter::TABLE_FULL, "table_full"),
            (counter::EVENTS_LOST, "events_lost"),
        ];
        names
            .iter()
            .map(|(index, name)| {
                let sum = self
                    .counters
                    .get(index, 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (name.to_string(), sum)
            })
            .collect()
    }
}

fn is_errno(e: &MapError, errno: i32) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

/// Refuses pinned maps written by an incompatible reaper: reusing them would
/// make the kernel and the daemon read each other's bytes wrongly.
fn check_pinned_geometry(ebpf: &Ebpf, config: &Config) -> Result<()> {
    use std::mem::size_of;
    let expected = [
        (
            map_names::FLOWS,
            8,
            size_of::<Flow>(),
            Some(config.max_flows),
        ),
        (
            map_names::SESSIONS,
            8,
            size_of::<SessionRecord>(),
            Some(config.max_sessions),
        ),
        (map_names::WATCH, 4, 8, None),
    ];
    for (name, key, value, entries) in expected {
        let Some(map) = ebpf.map(name) else { continue };
        let data: &MapData = match map {
            Map::HashMap(d) | Map::Array(d) => d,
            _ => continue,
        };
        let info = data.info()?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            return Err(Error::Setup(format!(
                "the pinned map {} has key/value sizes {}/{} but this reaper needs {key}/{value}: \
                 it was left by an incompatible version; run `reaper unload` to remove the old state",
                config.pin_path.join(name).display(),
                info.key_size(),
                info.value_size()
            )));
        }
        if let Some(want) = entries {
            if info.max_entries() != want {
                warn!(
                    map = name,
                    pinned = info.max_entries(),
                    configured = want,
                    "the pinned map keeps its size; `reaper unload` and restart to resize it"
                );
            }
        }
    }
    Ok(())
}

/// The watch bitmap for a set of port ranges.
pub fn watch_bitmap(watch: &[Watch]) -> Vec<u64> {
    let mut words = vec![0u64; WATCH_WORDS as usize];
    for w in watch {
        let sides: &[PortSide] = match w.side {
            Side::Local => &[PortSide::Local],
            Side::Remote => &[PortSide::Remote],
            Side::Any => &[PortSide::Local, PortSide::Remote],
        };
        for &side in sides {
            for port in w.first..=w.last {
                let (word, bit) = watch_slot(side, port);
                words[word as usize] |= bit;
            }
        }
    }
    words
}

fn write_watch(ebpf: &mut Ebpf, watch: &[Watch]) -> Result<()> {
    let map = ebpf
        .map_mut(map_names::WATCH)
        .ok_or_else(|| Error::Setup("map WATCH missing from the object".into()))?;
    let mut array: Array<&mut MapData, u64> = Array::try_from(map)?;
    for (i, word) in watch_bitmap(watch).into_iter().enumerate() {
        array.set(i as u32, word, 0)?;
    }
    Ok(())
}

/// The cgroup v2 mount point, from the mount table.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(Error::io("reading /proc/self/mounts"))?;
    mounts
        .lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| {
            Error::Setup("no cgroup2 filesystem is mounted; reaper attaches to a cgroup v2".into())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_marks_exactly_the_watched_ports() {
        let bits = watch_bitmap(&[
            Watch {
                first: 5900,
                last: 5901,
                side: Side::Local,
            },
            Watch {
                first: 22,
                last: 22,
                side: Side::Any,
            },
        ]);
        let set = |side, port| {
            let (w, b) = watch_slot(side, port);
            bits[w as usize] & b != 0
        };
        assert!(set(PortSide::Local, 5900) && set(PortSide::Local, 5901));
        assert!(!set(PortSide::Local, 5902) && !set(PortSide::Remote, 5900));
        assert!(set(PortSide::Local, 22) && set(PortSide::Remote, 22));
        let total: u32 = bits.iter().map(|w| w.count_ones()).sum();
        assert_eq!(total, 4);
    }
}
