//! Loading the kernel programs, attaching them to the cgroup (and the
//! forwarding interfaces), and pinning maps and links so that they outlive
//! the daemon.

use std::fs::File;
use std::path::PathBuf;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::tc::{self, NlOptions, TcAttachOptions};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, SockOps, TcAttachType,
};
use aya::{Ebpf, EbpfLoader};
use reaper_common::{
    map_names, program_names, setting, watch_slot, Flow, FlowTuple, PendingGrant, PortSet,
    PortSide, SessionRecord, WATCH_WORDS,
};
use tracing::{info, warn};

use super::{ensure_bpffs, features, netns, pins, Enforcer, KernelLog, Started};
use crate::clock::DeadlineTimer;
use crate::config::{Config, ForwardAttach, Side, Watch};
use crate::error::{Error, Result};
use crate::kernel::{Kernel, KillPath};

/// The compiled kernel programs, embedded at build time by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reaper"));

/// Name of a pinned link under `pin_path`.
const LINK_PINS: [(&str, &str); 3] = [
    (program_names::SOCKOPS, "link_sockops"),
    (program_names::INGRESS, "link_ingress"),
    (program_names::EGRESS, "link_egress"),
];

impl Enforcer {
    /// Loads, attaches and pins everything, adopting pinned state if present.
    pub fn start(config: &Config) -> Result<Started> {
        let features = features::Features::probe();
        if let Some(blocker) = features.blocker() {
            return Err(Error::Kernel(blocker));
        }
        report_features(&features, config);
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
        let sk_uid_offset = sk_uid_offset();
        let mut loader = EbpfLoader::new();
        let names = [
            map_names::FLOWS,
            map_names::SESSIONS,
            map_names::WATCH,
            map_names::EVENTS,
            map_names::COUNTERS,
            map_names::PENDING,
            map_names::SETTINGS,
            map_names::FORWARDED,
            map_names::FORWARDED_GRANTS,
            map_names::MARKS,
            map_names::OWNER_FLOWS,
        ];
        for name in names {
            loader.map_pin_path(name, pin(name));
        }
        loader.override_global("SK_UID_OFFSET", &sk_uid_offset, true);
        loader
            .map_max_entries(map_names::FLOWS, config.max_flows)
            .map_max_entries(map_names::SESSIONS, config.max_sessions)
            .map_max_entries(map_names::PENDING, config.max_pending);
        let mut ebpf = loader.load(OBJECT)?;
        check_pinned_geometry(&ebpf, config)?;

        // The maps leave the object now (the programs were relocated against
        // their descriptors at load) so that the daemon owns them.
        let take = |ebpf: &mut Ebpf, name: &str| -> Result<Map> {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Setup(format!("map {name} missing from the object")))
        };
        let flows = HashMap::try_from(take(&mut ebpf, map_names::FLOWS)?)?;
        let sessions = HashMap::try_from(take(&mut ebpf, map_names::SESSIONS)?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, map_names::COUNTERS)?)?;
        let events = RingBuf::try_from(take(&mut ebpf, map_names::EVENTS)?)?;
        let watch = Array::try_from(take(&mut ebpf, map_names::WATCH)?)?;
        let settings = Array::try_from(take(&mut ebpf, map_names::SETTINGS)?)?;
        let pending = HashMap::try_from(take(&mut ebpf, map_names::PENDING)?)?;
        let forwarded = HashMap::try_from(take(&mut ebpf, map_names::FORWARDED)?)?;
        let forwarded_grants = HashMap::try_from(take(&mut ebpf, map_names::FORWARDED_GRANTS)?)?;
        let owner_flows = HashMap::try_from(take(&mut ebpf, map_names::OWNER_FLOWS)?)?;
        let frames = if config.forward_interfaces.is_empty() {
            None
        } else {
            Some(packet_socket().map_err(Error::io(
                "opening the AF_PACKET socket for forwarded flows",
            ))?)
        };
        let own =
            netns::Netns::open().map_err(Error::io("opening the sock_diag and raw sockets"))?;
        let netns_cookie = own
            .diag
            .netns_cookie()
            .map_err(Error::io("reading the network namespace cookie"))?;
        let kill_path = if config.socket_destroy && features.has(features::name::SOCK_DESTROY) {
            KillPath::Destroy
        } else {
            KillPath::Rst
        };
        let mut enforcer = Enforcer {
            _ebpf: ebpf,
            flows,
            sessions,
            counters,
            watch,
            epoch: settings.get(&setting::FLOWS_EPOCH, 0).unwrap_or(0),
            timer: DeadlineTimer::new().map_err(Error::io("creating the deadline timer"))?,
            events,
            flows_dirty: false,
            settings,
            pending,
            forwarded,
            forwarded_grants,
            owner_flows,
            frames,
            own,
            namespaces: netns::Namespaces::new(netns_cookie),
            kill_path,
            netns_cookie,
            cgroup,
            pin_path: config.pin_path.clone(),
            has_tcx: features.has(features::name::TCX),
        };
        // Ports and settings are in place before the programs run.
        enforcer.apply_ports(config)?;
        let ebpf = &mut enforcer._ebpf;

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
        remove_retired_pins(&config.pin_path);

        attach_forwarding(ebpf, config, features.has(features::name::TCX), &pin)?;

        let kernel_log = match aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!("kernel-side logging unavailable: {e}");
                None
            }
        };
        info!(
            cgroup = %enforcer.cgroup.display(),
            pin_path = %config.pin_path.display(),
            adopted = adopting,
            "kernel programs attached"
        );
        Ok(Started {
            enforcer,
            kernel_log,
        })
    }
}

/// Pins an earlier reaper made that this one no longer uses: its
/// cgroup/sock_create program (owners are read from the socket now,
/// `sk_uid`) and the socket storage it wrote. Removing the link's pin
/// detaches the program; the storage goes with the last socket holding it.
const RETIRED_PINS: [&str; 2] = ["link_sock_create", "OWNERS"];

fn remove_retired_pins(pin_path: &std::path::Path) {
    for name in RETIRED_PINS {
        let path = pin_path.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => info!(pin = %path.display(), "removed a pin an earlier reaper left"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(pin = %path.display(), "could not remove a retired pin: {e}"),
        }
    }
}

/// Where the running kernel keeps a socket's owner (`struct sock`'s
/// `sk_uid`), for `owner_of` in the kernel programs; 0 when its BTF does
/// not say, and then no flow is charged to an owner's share.
fn sk_uid_offset() -> u32 {
    match super::btf::member_offset_in(std::path::Path::new(super::btf::VMLINUX), "sock", "sk_uid")
    {
        Ok(offset) => offset,
        Err(e) => {
            warn!(
                "socket owners are unknown ({e}): max_flows_per_owner is not enforced, \
                 only max_flows"
            );
            0
        }
    }
}

/// Refuses pinned maps written by an incompatible reaper: reusing them would
/// make the kernel and the daemon read each other's bytes wrongly.
fn check_pinned_geometry(ebpf: &Ebpf, config: &Config) -> Result<()> {
    use std::mem::size_of;
    struct Expect {
        name: &'static str,
        key: usize,
        value: usize,
        entries: Option<u32>,
        /// Whether another size is an error (arrays indexed by layout) or
        /// only a warning (tables whose size the config chose).
        strict: bool,
    }
    let expected = [
        Expect {
            name: map_names::FLOWS,
            key: 8,
            value: size_of::<Flow>(),
            entries: Some(config.max_flows),
            strict: false,
        },
        Expect {
            name: map_names::SESSIONS,
            key: 8,
            value: size_of::<SessionRecord>(),
            entries: Some(config.max_sessions),
            strict: false,
        },
        Expect {
            name: map_names::PENDING,
            key: size_of::<FlowTuple>(),
            value: size_of::<PendingGrant>(),
            entries: Some(config.max_pending),
            strict: false,
        },
        Expect {
            name: map_names::OWNER_FLOWS,
            key: 4,
            value: 8,
            entries: Some(reaper_common::MAX_OWNERS),
            strict: true,
        },
        Expect {
            name: map_names::WATCH,
            key: 4,
            value: 8,
            entries: Some(WATCH_WORDS),
            strict: true,
        },
        Expect {
            name: map_names::SETTINGS,
            key: 4,
            value: 8,
            entries: Some(setting::COUNT),
            strict: true,
        },
    ];
    let incompatible = |name: &str, what: String| {
        Error::Setup(format!(
            "the pinned map {} {what}: it was left by an incompatible reaper; \
             run `reaper unload` to remove the old state",
            config.pin_path.join(name).display()
        ))
    };
    for e in expected {
        let Some(map) = ebpf.map(e.name) else {
            continue;
        };
        let data: &MapData = match map {
            Map::HashMap(d) | Map::Array(d) => d,
            _ => continue,
        };
        let info = data.info()?;
        if info.key_size() as usize != e.key || info.value_size() as usize != e.value {
            return Err(incompatible(
                e.name,
                format!(
                    "has key/value sizes {}/{} where {}/{} are needed",
                    info.key_size(),
                    info.value_size(),
                    e.key,
                    e.value
                ),
            ));
        }
        match e.entries {
            Some(want) if info.max_entries() != want && e.strict => {
                return Err(incompatible(
                    e.name,
                    format!("has {} entries where {want} are needed", info.max_entries()),
                ));
            }
            Some(want) if info.max_entries() != want => warn!(
                map = e.name,
                pinned = info.max_entries(),
                configured = want,
                "the pinned map keeps its size; `reaper unload` and restart to resize it"
            ),
            _ => {}
        }
    }
    Ok(())
}

/// The `WATCH` array for the watched and fenced port ranges (fenced ports
/// are marked in both bitmaps: a fence implies tracking).
pub fn port_bitmap(watch: &[Watch], fence: &[Watch]) -> Vec<u64> {
    let mut words = vec![0u64; WATCH_WORDS as usize];
    let mut mark = |set: PortSet, w: &Watch| {
        let sides: &[PortSide] = match w.side {
            Side::Local => &[PortSide::Local],
            Side::Remote => &[PortSide::Remote],
            Side::Any => &[PortSide::Local, PortSide::Remote],
        };
        for &side in sides {
            for port in w.first..=w.last {
                let (word, bit) = watch_slot(set, side, port);
                words[word as usize] |= bit;
            }
        }
    };
    for w in watch {
        mark(PortSet::Watch, w);
        mark(PortSet::Seen, w);
    }
    for w in fence {
        mark(PortSet::Fence, w);
        mark(PortSet::Seen, w);
    }
    words
}

/// Says once what the kernel offers: one line with every feature, and for
/// each missing one the daemon would have used, what it does instead.
fn report_features(features: &features::Features, config: &Config) {
    let summary: Vec<String> = features
        .0
        .iter()
        .map(|f| format!("{} {}", f.name, f.state()))
        .collect();
    info!(features = %summary.join(", "), "kernel probed");
    for f in &features.0 {
        if let Some(e) = &f.probe_error {
            warn!(
                feature = f.name,
                "could not probe ({e}); assuming it is there"
            );
        }
        let features::Need::Optional { fallback } = f.need else {
            continue;
        };
        let wanted = match f.name {
            features::name::TCX => {
                !config.forward_interfaces.is_empty() && config.forward_attach != ForwardAttach::Tc
            }
            features::name::SOCK_DESTROY => config.socket_destroy,
            _ => true,
        };
        if f.missing() && wanted {
            warn!(
                "{} is not available on this kernel: {} uses {fallback} instead",
                f.name, f.purpose
            );
        }
    }
    if !config.socket_destroy {
        info!("socket_destroy = false: local flows are killed with RST + drop");
    }
}

/// Attaches the forwarding program (tcx ingress) to every configured
/// interface and pins the links; removes link pins of interfaces no longer
/// configured.
fn attach_forwarding(
    ebpf: &mut Ebpf,
    config: &Config,
    have_tcx: bool,
    pin: &dyn Fn(&str) -> PathBuf,
) -> Result<()> {
    let wanted: Vec<String> = config
        .forward_interfaces
        .iter()
        .map(|i| forward_pin_name(i))
        .collect();
    if let Ok(entries) = std::fs::read_dir(&config.pin_path) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(FORWARD_PIN_PREFIX) && !wanted.contains(&name) {
                info!(pin = %name, "interface no longer forwarded: detaching");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if config.forward_interfaces.is_empty() {
        return Ok(());
    }
    if config.forward_attach == ForwardAttach::Tcx && !have_tcx {
        return Err(Error::Setup(
            "forward.attach = \"tcx\" but this kernel has no tcx (Linux 6.6+); \
             use \"auto\" or \"tc\""
                .into(),
        ));
    }
    let prog = forward_program(ebpf)?;
    prog.load()?;
    for (interface, pin_name) in config.forward_interfaces.iter().zip(&wanted) {
        attach_interface(
            prog,
            config.forward_attach,
            have_tcx,
            interface,
            &pin(pin_name),
        )?;
    }
    Ok(())
}

/// The link pin of an interface's forwarding attachment.
pub(super) fn forward_pin_name(interface: &str) -> String {
    format!("{FORWARD_PIN_PREFIX}{}", interface.replace('.', "_"))
}

const FORWARD_PIN_PREFIX: &str = "link_forward_";

pub(super) fn forward_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    Ok(ebpf
        .program_mut(program_names::FORWARD)
        .ok_or_else(|| Error::Setup("program reaper_forward missing from the object".into()))?
        .try_into()?)
}

/// Attaches the (loaded) forwarding program to `interface`'s ingress: a
/// tcx link pinned at `pin` where the kernel and `attach` allow, else a
/// legacy tc filter.
pub(super) fn attach_interface(
    prog: &mut SchedClassifier,
    attach: ForwardAttach,
    have_tcx: bool,
    interface: &str,
    pin: &std::path::Path,
) -> Result<()> {
    let setup = |what: String| Error::Setup(format!("forward.interfaces: {interface:?}: {what}"));
    if attach == ForwardAttach::Tcx || (attach == ForwardAttach::Auto && have_tcx) {
        let tcx = TcAttachOptions::TcxOrder(LinkOrder::default());
        match prog.attach_with_options(interface, TcAttachType::Ingress, tcx) {
            Ok(id) => {
                let link: FdLink = prog
                    .take_link(id)?
                    .try_into()
                    .map_err(|_| setup("a tcx attachment gave no link".into()))?;
                pins::replace_link_pin(link, pin)?;
                // A legacy filter left by an older setup would see everything twice.
                let _ = tc::qdisc_detach_program(
                    interface,
                    TcAttachType::Ingress,
                    program_names::FORWARD,
                );
                info!(interface = %interface, "tracking forwarded flows (tcx)");
                return Ok(());
            }
            Err(e) if attach == ForwardAttach::Auto => {
                warn!(interface = %interface, "tcx attach failed ({e}): using a legacy tc filter");
            }
            Err(e) => return Err(setup(format!("tcx attach failed: {e}"))),
        }
    }
    // Legacy tc: a clsact filter, which outlives this process like a
    // pinned link does. A restart replaces the previous daemon's filter
    // (by name), which leaves a gap of a few milliseconds.
    let _ = tc::qdisc_add_clsact(interface);
    let _ = tc::qdisc_detach_program(interface, TcAttachType::Ingress, program_names::FORWARD);
    let options = TcAttachOptions::Netlink(NlOptions::default());
    let id = prog
        .attach_with_options(interface, TcAttachType::Ingress, options)
        .map_err(|e| setup(format!("tc attach failed: {e}")))?;
    std::mem::forget(prog.take_link(id)?);
    let _ = std::fs::remove_file(pin);
    info!(interface = %interface, "tracking forwarded flows (legacy tc)");
    Ok(())
}

/// Detaches legacy tc filters from the forwarding interfaces (tcx links go
/// with their pins).
pub fn detach_forwarding(interfaces: &[String]) {
    for interface in interfaces {
        let _ = tc::qdisc_detach_program(interface, TcAttachType::Ingress, program_names::FORWARD);
    }
}

fn packet_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // Protocol 0: this socket only sends.
    // SAFETY: plain syscall; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
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
    fn bitmaps_mark_exactly_the_watched_and_fenced_ports() {
        let watch = [
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
        ];
        let fence = [Watch {
            first: 6000,
            last: 6000,
            side: Side::Local,
        }];
        let bits = port_bitmap(&watch, &fence);
        let set = |kind, side, port| {
            let (w, b) = watch_slot(kind, side, port);
            bits[w as usize] & b != 0
        };
        use PortSet::{Fence, Watch as W};
        assert!(set(W, PortSide::Local, 5900) && set(W, PortSide::Local, 5901));
        assert!(!set(W, PortSide::Local, 5902) && !set(W, PortSide::Remote, 5900));
        assert!(set(W, PortSide::Local, 22) && set(W, PortSide::Remote, 22));
        assert!(set(Fence, PortSide::Local, 6000) && !set(W, PortSide::Local, 6000));
        assert!(!set(Fence, PortSide::Local, 5900));
        use PortSet::Seen;
        assert!(set(Seen, PortSide::Local, 5900) && set(Seen, PortSide::Local, 6000));
        assert!(set(Seen, PortSide::Remote, 22) && !set(Seen, PortSide::Remote, 5900));
        let total: u32 = bits.iter().map(|w| w.count_ones()).sum();
        assert_eq!(total, 10, "each port once in its set and once in seen");
    }
}
