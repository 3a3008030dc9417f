//! The enforcer: kernel programs, their maps and links, and the kill path.
//!
//! All state that must survive the daemon lives in maps pinned under
//! `pin_path`, and the programs stay attached through pinned links. Starting
//! the enforcer therefore *adopts* what a previous daemon left: the maps are
//! reopened from their pins, the freshly loaded programs are attached, and
//! their links replace the old pins atomically (a rename), so enforcement
//! never has a gap.

pub mod diag;
pub mod features;
pub mod netns;
mod pins;
pub mod rst;
pub mod socket;
mod sys;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::tc::{self, NlOptions, TcAttachOptions};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, SockOps, TcAttachType,
};
use aya::{Ebpf, EbpfLoader};
use reaper_common::{
    counter, map_names, program_names, setting, watch_slot, Flow, FlowTuple, Forwarded,
    PendingGrant, PortSet, PortSide, SessionRecord, WATCH_WORDS,
};
use tracing::{info, warn};

use crate::config::{Config, ForwardAttach, Side, Watch};
use crate::error::{Error, Result};
pub use diag::{DestroyOutcome, DiagTarget, Reading};

/// How a local flow is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KillPath {
    /// netlink SOCK_DESTROY: the socket is aborted, the peer gets a RST.
    Destroy,
    /// Without SOCK_DESTROY (kernel built without it, or `socket_destroy =
    /// false`): a RST with the exact sequence number to each end, and the
    /// in-kernel drop.
    Rst,
    /// A flow this host forwards: a RST to each end out of the interface it
    /// lives behind, and the tc program drops the rest.
    Forward,
}
pub use pins::{ensure_bpffs, unload};

/// The compiled kernel programs, embedded at build time by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reaper"));

/// TCP_CLOSE as sock_diag reports states.
const TCP_CLOSE: u8 = 7;

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
    watch: Array<MapData, u64>,
    settings: Array<MapData, u64>,
    /// The last `setting::FLOWS_EPOCH` written: see [`Enforcer::bump_epoch`].
    epoch: u64,
    pending: HashMap<MapData, FlowTuple, PendingGrant>,
    forwarded: HashMap<MapData, FlowTuple, Forwarded>,
    forwarded_grants: HashMap<MapData, FlowTuple, PendingGrant>,
    /// AF_PACKET socket for RSTs to forwarded flows' ends (when forwarding).
    frames: Option<std::os::fd::OwnedFd>,
    /// The daemon's own namespace.
    own: netns::Netns,
    /// Other namespaces with tracked flows.
    namespaces: netns::Namespaces,
    /// How local flows die.
    pub kill_path: KillPath,
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
        ];
        for name in names {
            loader.map_pin_path(name, pin(name));
        }
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
            settings,
            pending,
            forwarded,
            forwarded_grants,
            frames,
            own,
            namespaces: netns::Namespaces::new(netns_cookie),
            kill_path,
            netns_cookie,
            cgroup,
            pin_path: config.pin_path.clone(),
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
            Ok(()) => self.bump_epoch().map(|()| true),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn remove_flow(&mut self, cookie: u64) {
        if self.flows.remove(&cookie).is_ok() {
            let _ = self.bump_epoch();
        }
    }

    /// Tells the packet path that `FLOWS` or the grace changed: it caches
    /// what it needs of a flow per CPU, and reads the flow again at its
    /// next packet when the epoch has moved. Called after the write it
    /// announces, so what was cached before the write is stale.
    fn bump_epoch(&mut self) -> Result<()> {
        self.epoch += 1;
        self.settings.set(setting::FLOWS_EPOCH, self.epoch, 0)?;
        Ok(())
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

    /// Destroys the sockets, each through the sock_diag socket of its own
    /// namespace; outcomes come back in order.
    pub fn destroy(&mut self, targets: &[DiagTarget]) -> Vec<DestroyOutcome> {
        self.per_namespace(
            targets,
            |ns, batch| ns.diag.destroy(batch),
            // A namespace that is gone took its sockets with it.
            DestroyOutcome::Gone,
            |e| DestroyOutcome::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    }

    /// Each socket's last data received/sent, from the kernel's tcp_info.
    pub fn activity(&mut self, targets: &[DiagTarget]) -> Vec<Reading> {
        self.per_namespace(
            targets,
            |ns, batch| {
                let found = ns.diag.activity(batch)?;
                Ok(found
                    .into_iter()
                    .map(|a| a.map_or(Reading::Gone, Reading::Seen))
                    .collect())
            },
            Reading::Gone,
            |_| Reading::Unknown,
        )
    }

    /// Runs `op` once per namespace over that namespace's targets, in
    /// batches, and puts the answers back in the targets' order.
    fn per_namespace<T: Clone>(
        &mut self,
        targets: &[DiagTarget],
        mut op: impl FnMut(&mut netns::Netns, &[DiagTarget]) -> std::io::Result<Vec<T>>,
        unreachable: T,
        failed: impl Fn(&std::io::Error) -> T,
    ) -> Vec<T> {
        let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, t) in targets.iter().enumerate() {
            groups.entry(t.netns_cookie).or_default().push(i);
        }
        let mut out: Vec<T> = vec![unreachable.clone(); targets.len()];
        for (cookie, indexes) in groups {
            let batch: Vec<DiagTarget> = indexes.iter().map(|&i| targets[i]).collect();
            let ns = if cookie == self.netns_cookie {
                Some(&mut self.own)
            } else {
                self.namespaces.get(cookie)
            };
            let Some(ns) = ns else {
                continue;
            };
            match op(ns, &batch) {
                Ok(answers) => {
                    for (i, a) in indexes.into_iter().zip(answers) {
                        out[i] = a;
                    }
                }
                Err(e) => {
                    warn!(netns = cookie, "sock_diag request failed: {e}");
                    for i in indexes {
                        out[i] = failed(&e);
                    }
                }
            }
        }
        out
    }

    /// Kills local flows without SOCK_DESTROY: reads each socket's counters,
    /// sends it (from its peer) and its peer (from it) a RST with the exact
    /// next sequence number, then checks the socket is gone. The in-kernel
    /// drop is already in force, so the flow is dead either way.
    pub fn reset(&mut self, targets: &[(DiagTarget, Flow)]) -> Vec<DestroyOutcome> {
        let sockets: Vec<DiagTarget> = targets.iter().map(|(t, _)| *t).collect();
        let before = self.activity(&sockets);
        let mut sent = vec![false; targets.len()];
        for (i, ((target, flow), reading)) in targets.iter().zip(&before).enumerate() {
            let Reading::Seen(now) = reading else {
                continue;
            };
            let (rcv_nxt, snd_nxt, snd_una) = rst::next_sequences(flow, &now.counters);
            let (local, remote) = socket::addrs_of(&target.tuple);
            let mut segments = vec![
                rst::Rst {
                    src: remote,
                    dst: local,
                    seq: rcv_nxt,
                },
                rst::Rst {
                    src: local,
                    dst: remote,
                    seq: snd_nxt,
                },
            ];
            if snd_una != snd_nxt {
                // Data in flight: the peer's RCV.NXT is one of the two.
                segments.push(rst::Rst {
                    src: local,
                    dst: remote,
                    seq: snd_una,
                });
            }
            let ns = if target.netns_cookie == self.netns_cookie {
                Some(&mut self.own)
            } else {
                self.namespaces.get(target.netns_cookie)
            };
            if let Some(ns) = ns {
                sent[i] = segments.iter().all(|s| match ns.inject.send(s) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(cookie = target.cookie, "injecting a RST: {e}");
                        false
                    }
                });
            }
        }
        // The RSTs are delivered by the stack shortly; give them a moment.
        let mut after = self.activity(&sockets);
        for _ in 0..20 {
            if after
                .iter()
                .all(|r| !matches!(r, Reading::Seen(a) if a.counters.state != TCP_CLOSE))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            after = self.activity(&sockets);
        }
        before
            .iter()
            .zip(after)
            .zip(sent)
            .map(|((b, a), sent)| match (b, a) {
                (Reading::Gone, _) => DestroyOutcome::Gone,
                (_, Reading::Gone) if sent => DestroyOutcome::Destroyed,
                (_, Reading::Seen(a)) if sent && a.counters.state == TCP_CLOSE => {
                    DestroyOutcome::Destroyed
                }
                _ => DestroyOutcome::Failed(libc::ETIMEDOUT),
            })
            .collect()
    }

    /// A forwarded flow's state, keyed by `forwarded_key`.
    pub fn forwarded(&self, key: &FlowTuple) -> Option<Forwarded> {
        self.forwarded.get(key, 0).ok()
    }

    /// Every forwarded flow the tc program has seen.
    pub fn forwarded_flows(&self) -> Vec<(FlowTuple, Forwarded)> {
        self.forwarded.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn forwarded_grant(&self, key: &FlowTuple) -> Option<PendingGrant> {
        self.forwarded_grants.get(key, 0).ok()
    }

    pub fn forwarded_grants(&self) -> Vec<(FlowTuple, PendingGrant)> {
        self.forwarded_grants
            .iter()
            .filter_map(|r| r.ok())
            .collect()
    }

    /// Sets a forwarded flow's deadline; `Ok(false)` when the table is full.
    pub fn put_forwarded_grant(&mut self, key: &FlowTuple, grant: &PendingGrant) -> Result<bool> {
        match self.forwarded_grants.insert(key, grant, 0) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::E2BIG) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Forgets a forwarded flow (its entry and any grant).
    pub fn remove_forwarded(&mut self, key: &FlowTuple) {
        let _ = self.forwarded.remove(key);
        let _ = self.forwarded_grants.remove(key);
    }

    /// Sends each end of a forwarded flow its RST(s), out of the interface
    /// the end lives behind, addressed to the MAC its packets came from.
    /// Returns how many were sent.
    pub fn reset_forwarded(&mut self, key: &FlowTuple, flow: &Forwarded) -> usize {
        let Some(frames) = &self.frames else {
            return 0;
        };
        let mut sent = 0;
        for (to, segment) in rst::forwarded_resets(key, flow) {
            let end = &flow.ends[to];
            let frame = rst::ethernet_frame(end.mac, end.via_mac, &segment);
            match send_frame(frames, end.ifindex, end.mac, &frame) {
                Ok(()) => sent += 1,
                Err(e) => warn!(
                    ifindex = end.ifindex,
                    "sending a RST to {}: {e}", segment.dst
                ),
            }
        }
        sent
    }

    /// Opens the namespace a request names; returns its cookie.
    pub fn resolve_netns(&mut self, path: &std::path::Path) -> std::result::Result<u64, String> {
        self.namespaces.resolve(path)
    }

    /// Lets go of a namespace whose last tracked flow closed.
    pub fn release_netns(&mut self, cookie: u64) {
        self.namespaces.release(cookie);
    }

    /// Other namespaces reached now.
    pub fn namespaces_open(&self) -> usize {
        self.namespaces.open_count()
    }

    /// Writes the watch and fence bitmaps and the fence grace. Used at start
    /// and on reload; the programs read them at the next connection.
    pub fn apply_ports(&mut self, config: &Config) -> Result<()> {
        let seen = watch_slot(PortSet::Seen, PortSide::Local, 0).0;
        for (i, word) in port_bitmap(&config.watch, &config.fence)
            .into_iter()
            .enumerate()
        {
            let i = i as u32;
            if i < seen {
                self.watch.set(i, word, 0)?;
                continue;
            }
            // Seen ports stay seen: a flow tracked on a port since dropped
            // from the config keeps its kernel backstop.
            let before = self.watch.get(&i, 0)?;
            if before | word != before {
                self.watch.set(i, before | word, 0)?;
            }
        }
        self.settings
            .set(setting::FENCE_GRACE_NS, config.fence_grace_ns, 0)?;
        // Also at start: marks cached by the programs of an earlier run
        // are re-read, and the epoch is never 0 while programs run.
        self.bump_epoch()
    }

    /// Registers a grant for a connection to come; `Ok(false)` when the
    /// table is full.
    pub fn put_pending(&mut self, key: &FlowTuple, grant: &PendingGrant) -> Result<bool> {
        match self.pending.insert(key, grant, 0) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::E2BIG) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn pending_grant(&self, key: &FlowTuple) -> Option<PendingGrant> {
        self.pending.get(key, 0).ok()
    }

    pub fn remove_pending(&mut self, key: &FlowTuple) {
        let _ = self.pending.remove(key);
    }

    /// Every registration not yet claimed by a connection.
    pub fn pending(&self) -> Vec<(FlowTuple, PendingGrant)> {
        self.pending.iter().filter_map(|r| r.ok()).collect()
    }

    /// Kernel counters, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let names = [
            (counter::TRACKED, "tracked"),
            (counter::CLOSED, "closed"),
            (counter::DROPPED, "dropped_packets"),
            (counter::TABLE_FULL, "table_full"),
            (counter::EVENTS_LOST, "events_lost"),
            (counter::PENDING_MATCHED, "pending_matched"),
            (counter::UNMARKED, "unmarked"),
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
    const PREFIX: &str = "link_forward_";
    let wanted: Vec<String> = config
        .forward_interfaces
        .iter()
        .map(|i| format!("{PREFIX}{}", i.replace('.', "_")))
        .collect();
    if let Ok(entries) = std::fs::read_dir(&config.pin_path) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && !wanted.contains(&name) {
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
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program_names::FORWARD)
        .ok_or_else(|| Error::Setup("program reaper_forward missing from the object".into()))?
        .try_into()?;
    prog.load()?;
    for (interface, pin_name) in config.forward_interfaces.iter().zip(&wanted) {
        let setup =
            |what: String| Error::Setup(format!("forward.interfaces: {interface:?}: {what}"));
        if config.forward_attach == ForwardAttach::Tcx
            || (config.forward_attach == ForwardAttach::Auto && have_tcx)
        {
            let tcx = TcAttachOptions::TcxOrder(LinkOrder::default());
            match prog.attach_with_options(interface, TcAttachType::Ingress, tcx) {
                Ok(id) => {
                    let link: FdLink = prog
                        .take_link(id)?
                        .try_into()
                        .map_err(|_| setup("a tcx attachment gave no link".into()))?;
                    pins::replace_link_pin(link, &pin(pin_name))?;
                    // A legacy filter left by an older setup would see everything twice.
                    let _ = tc::qdisc_detach_program(
                        interface,
                        TcAttachType::Ingress,
                        program_names::FORWARD,
                    );
                    info!(interface = %interface, "tracking forwarded flows (tcx)");
                    continue;
                }
                Err(e) if config.forward_attach == ForwardAttach::Auto => {
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
        let _ = std::fs::remove_file(pin(pin_name));
        info!(interface = %interface, "tracking forwarded flows (legacy tc)");
    }
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

fn send_frame(
    fd: &std::os::fd::OwnedFd,
    ifindex: u32,
    dst_mac: [u8; 6],
    frame: &[u8],
) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_ifindex = ifindex as i32;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&dst_mac);
    sys::send_to(fd.as_fd(), frame, &ll)
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
