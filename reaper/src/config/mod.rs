//! The daemon's configuration file (TOML). Every key is optional; a missing
//! file section means the default. Unknown keys are errors, so a typo never
//! silently leaves a console unprotected.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::{Access, Class, GlobalLimit, IdleDirection, OnLimit, Scope};
use crate::timefmt;

mod effective;
pub use effective::effective;

pub const DEFAULT_SOCKET: &str = "/run/reaper/reaper.sock";
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/reaper";
pub const DEFAULT_MAX_TTL: &str = "7d";
pub const DEFAULT_FENCE_GRACE: &str = "2s";
pub const DEFAULT_CLIENT_TIMEOUT: &str = "10s";
pub const DEFAULT_MAX_CLIENTS: u32 = 4096;
/// The daemon's default nice value: ahead of ordinary work (0), so that a
/// busy machine, or a user flooding it, does not make kills late.
pub const DEFAULT_NICE: i32 = -10;
/// The SCHED_FIFO priority the daemon waits for deadlines and kills at
/// (`crate::priority`): low among real-time threads, above every ordinary
/// one.
pub const DEFAULT_REALTIME_PRIORITY: u8 = 10;
/// Each control connection holds a descriptor; the daemon raises its soft
/// limit to the hard one, commonly 20000 or more where it runs.
pub const MAX_CLIENTS_LIMIT: u32 = 16_384;

/// Which end of a connection a watched port range is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The socket's own port (a server listening on a console port).
    Local,
    /// The peer's port (a proxy connecting out to a console port).
    Remote,
    /// Either.
    Any,
}

/// A range of ports whose connections the kernel tracks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Watch {
    pub first: u16,
    pub last: u16,
    pub side: Side,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<u32>,
    /// A group that may have write access to the socket's directory (which
    /// must otherwise be writable by root only).
    pub socket_dir_group: Option<u32>,
    pub pin_path: PathBuf,
    /// `None`: the cgroup2 mount root, found at start.
    pub cgroup: Option<PathBuf>,
    pub audit_file: Option<PathBuf>,
    pub max_flows: u32,
    /// Most tracked flows the sockets of one uid other than root may hold
    /// in the kernel table; 0 = no share.
    pub max_flows_per_owner: u32,
    pub max_sessions: u32,
    /// Size of the pre-registration table (`expect`).
    pub max_pending: u32,
    pub max_ttl_ns: u64,
    pub access: Access,
    pub watch: Vec<Watch>,
    /// Ports where an ungranted flow dies after `fence_grace_ns`.
    pub fence: Vec<Watch>,
    pub fence_grace_ns: u64,
    pub limits: GlobalLimit,
    /// Policy classes by name.
    pub classes: BTreeMap<String, Class>,
    /// Kill local flows with SOCK_DESTROY where the kernel has it; false
    /// forces RST + drop.
    pub socket_destroy: bool,
    /// Interfaces whose forwarded console flows are tracked (a router or
    /// gateway in front of the consoles).
    pub forward_interfaces: Vec<String>,
    /// How the forwarding program is attached to them.
    pub forward_attach: ForwardAttach,
    /// Most control connections served at once.
    pub max_clients: usize,
    /// Most control connections one uid other than root may hold.
    pub max_clients_per_uid: usize,
    /// The daemon's nice value: kills must not wait behind other work.
    pub nice: i32,
    /// SCHED_FIFO priority for the deadlines' wake-up and kills (1-99); 0
    /// keeps the daemon ordinary.
    pub realtime_priority: u8,
    /// How long a client may take to finish a request line it started, or
    /// to take a response.
    pub client_timeout: std::time::Duration,
    /// The operational log's format (the audit trail is always JSON).
    pub log_format: LogFormat,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The fleet this node belongs to (`[fleet]`); `None`: alone.
    pub fleet: Option<Fleet>,
}

/// `[fleet]`: the etcd cluster the nodes share, and this node's name in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// The CA that signed the members' certificates (https endpoints).
    pub ca_file: Option<PathBuf>,
    /// This node's client certificate and key, for members that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// `None`: the host name, read when the fleet is joined.
    pub node: Option<String>,
    /// Where every key lives, normalised (`/reaper`).
    pub prefix: String,
    /// The node's liveness lease: a node etcd has not heard from for this
    /// long is gone.
    pub node_lease_ns: u64,
    /// How long the node may go without renewing its lease (without a
    /// quorum) before it counts as cut off: `fail-closed` classes' sessions
    /// die then. Shorter than the lease, so that a cut-off node has killed
    /// them before etcd lets the rest of the fleet forget it.
    pub grace_ns: u64,
    /// Where connections to this node arrive; empty: its interfaces'.
    pub addresses: Vec<std::net::IpAddr>,
    /// Where the last applied revision is kept across restarts.
    pub state_file: PathBuf,
}

pub const DEFAULT_FLEET_PREFIX: &str = "/reaper";
pub const DEFAULT_NODE_LEASE: &str = "15s";
pub const DEFAULT_FLEET_GRACE: &str = "10s";
pub const DEFAULT_FLEET_STATE_FILE: &str = "/var/lib/reaper/fleet.state";

/// The operational log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (for a log shipper).
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// How the forwarding program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardAttach {
    /// tcx where the kernel has it (6.6+), legacy tc otherwise.
    #[default]
    Auto,
    /// tcx links only (pinned; a restart swaps them with no gap).
    Tcx,
    /// A legacy tc (clsact) filter, replaced by name at each start.
    Tc,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<GroupRef>,
    socket_dir_group: Option<GroupRef>,
    pin_path: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    audit_file: Option<PathBuf>,
    max_flows: Option<u32>,
    max_flows_per_owner: Option<u32>,
    max_sessions: Option<u32>,
    max_pending: Option<u32>,
    max_ttl: Option<String>,
    access: Option<RawAccess>,
    watch: Option<Vec<RawWatch>>,
    fence: Option<Vec<RawWatch>>,
    fence_grace: Option<String>,
    limits: Option<RawLimits>,
    classes: Option<BTreeMap<String, RawClass>>,
    socket_destroy: Option<bool>,
    forward: Option<RawForward>,
    max_clients: Option<u32>,
    max_clients_per_uid: Option<u32>,
    nice: Option<i32>,
    realtime_priority: Option<u8>,
    client_timeout: Option<String>,
    log_format: Option<LogFormat>,
    metrics: Option<RawMetrics>,
    fleet: Option<RawFleet>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    #[serde(default)]
    endpoints: Vec<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    node: Option<String>,
    prefix: Option<String>,
    node_lease: Option<String>,
    grace: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    attach: ForwardAttach,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_sessions: Option<u32>,
    on_limit: Option<OnLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    ttl: Option<String>,
    max_ttl: Option<String>,
    idle_timeout: Option<String>,
    idle_direction: Option<IdleDirection>,
    max_per_target: Option<u32>,
    max_per_user: Option<u32>,
    on_limit: Option<OnLimit>,
    on_partition: Option<crate::policy::OnPartition>,
    limit_scope: Option<LimitScope>,
}

/// Where a class's limits count sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LimitScope {
    Node,
    Fleet,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum GroupRef {
    Gid(u32),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    operator_uids: Vec<u32>,
    #[serde(default)]
    operator_gids: Vec<u32>,
    max_sessions_per_uid: Option<u32>,
    max_expecting_per_uid: Option<u32>,
    #[serde(default, rename = "scope")]
    scopes: Vec<RawScope>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    classes: Vec<String>,
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    ports: Vec<PortsSpec>,
    #[serde(default)]
    all_sessions: bool,
    max_sessions: Option<u32>,
    max_expecting: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    ports: PortsSpec,
    #[serde(default = "default_side")]
    side: Side,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortsSpec {
    One(u16),
    Text(String),
}

fn default_side() -> Side {
    Side::Any
}

/// The ports watched when the config says nothing: VNC and SPICE consoles
/// (5900-5999) from either end, and Nova's console proxies (noVNC 6080,
/// SPICE HTML5 6082, serial 6083) on the proxy host.
pub fn default_watch() -> Vec<Watch> {
    vec![
        Watch {
            first: 5900,
            last: 5999,
            side: Side::Any,
        },
        Watch {
            first: 6080,
            last: 6080,
            side: Side::Local,
        },
        Watch {
            first: 6082,
            last: 6083,
            side: Side::Local,
        },
    ]
}

/// A TOML error as reaper reports it: what is wrong and where (line and
/// column), never the text of the line. A daemon pointed at a file that is
/// not its config (`/etc/shadow`) must not quote it into a log or `status`.
fn toml_error(e: toml::de::Error, text: &str) -> String {
    let message = e.message().trim().to_owned();
    match e.span() {
        Some(span) if span.start <= text.len() && text.is_char_boundary(span.start) => {
            let before = &text[..span.start];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before.len() - line_start + 1;
            // The key the error is about, when the line is `key = ...` with
            // a bare key (a name, not content); never the value.
            let text_line = text[line_start..].lines().next().unwrap_or("");
            let key = text_line
                .split_once('=')
                .map(|(k, _)| k.trim())
                .filter(|k| {
                    !k.is_empty()
                        && k.len() <= 64
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                });
            match key {
                Some(key) => format!("{key}: {message} (line {line}, column {column})"),
                None => format!("{message} (line {line}, column {column})"),
            }
        }
        _ => message,
    }
}

/// Why a config was refused. The message names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read, or its text or a value in it is refused.
    #[error("{}{message}", path.as_ref().map(|p| format!("config {}: ", p.display())).unwrap_or_default())]
    Invalid {
        path: Option<PathBuf>,
        message: String,
    },
    /// A valid config that the kernel maps did not take (on reload).
    #[error("writing the new ports to the kernel: {0}")]
    Apply(String),
}

impl Default for Config {
    fn default() -> Self {
        Config::from_toml("").expect("the empty config is valid")
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            path: Some(path.to_owned()),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: Some(path.to_owned()),
            message,
        })
    }

    /// Parses and validates config text; the error names the offending key.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text).map_err(|message| ConfigError::Invalid {
            path: None,
            message,
        })
    }

    fn parse(text: &str) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(e, text))?;
        let socket_mode = match raw.socket_mode.as_deref() {
            None => 0o660,
            Some(text) => parse_mode(text).map_err(|e| format!("socket_mode: {e}"))?,
        };
        let socket_group = group_of(raw.socket_group, "socket_group")?;
        let socket_dir_group = group_of(raw.socket_dir_group, "socket_dir_group")?;
        let max_flows = raw.max_flows.unwrap_or(reaper_common::DEFAULT_MAX_FLOWS);
        if !(1024..=4_194_304).contains(&max_flows) {
            return Err(format!("max_flows: {max_flows} is outside 1024..=4194304"));
        }
        let max_sessions = raw
            .max_sessions
            .unwrap_or(reaper_common::DEFAULT_MAX_SESSIONS);
        if !(16..=4_194_304).contains(&max_sessions) {
            return Err(format!(
                "max_sessions: {max_sessions} is outside 16..=4194304"
            ));
        }
        let max_pending = raw.max_pending.unwrap_or(reaper_common::MAX_PENDING);
        if !(16..=4_194_304).contains(&max_pending) {
            return Err(format!(
                "max_pending: {max_pending} is outside 16..=4194304"
            ));
        }
        let max_ttl_ns = timefmt::parse_duration(raw.max_ttl.as_deref().unwrap_or(DEFAULT_MAX_TTL))
            .map_err(|e| format!("max_ttl: {e}"))?;
        if max_ttl_ns == 0 {
            return Err("max_ttl: must be greater than zero".into());
        }
        let watch = match raw.watch {
            None => default_watch(),
            Some(list) => port_ranges("watch", list)?,
        };
        let fence = port_ranges("fence", raw.fence.unwrap_or_default())?;
        let fence_grace_ns =
            timefmt::parse_duration(raw.fence_grace.as_deref().unwrap_or(DEFAULT_FENCE_GRACE))
                .map_err(|e| format!("fence_grace: {e}"))?;
        if fence_grace_ns == 0 {
            return Err("fence_grace: must be greater than zero".into());
        }
        let raw_limits = raw.limits.unwrap_or_default();
        let limits = GlobalLimit {
            max_sessions: raw_limits.max_sessions.unwrap_or(0),
            on_limit: raw_limits.on_limit.unwrap_or(OnLimit::RejectNew),
        };
        let classes = raw
            .classes
            .unwrap_or_default()
            .into_iter()
            .map(|(name, c)| class_of(name, c, max_ttl_ns))
            .map(|c| c.map(|c| (c.name.clone(), c)))
            .collect::<Result<BTreeMap<_, _>, String>>()?;
        let forward = raw.forward.unwrap_or_default();
        let (forward_interfaces, forward_attach) = (forward.interfaces, forward.attach);
        for (i, name) in forward_interfaces.iter().enumerate() {
            if name.is_empty()
                || name.len() > 15
                || name.contains('/')
                || name.chars().any(char::is_whitespace)
            {
                return Err(format!(
                    "forward.interfaces[{i}]: {name:?} is not an interface name"
                ));
            }
        }
        let max_clients = raw.max_clients.unwrap_or(DEFAULT_MAX_CLIENTS);
        if !(1..=MAX_CLIENTS_LIMIT).contains(&max_clients) {
            return Err(format!(
                "max_clients: {max_clients} is outside 1..={MAX_CLIENTS_LIMIT}"
            ));
        }
        let client_timeout_ns = timefmt::parse_duration(
            raw.client_timeout
                .as_deref()
                .unwrap_or(DEFAULT_CLIENT_TIMEOUT),
        )
        .map_err(|e| format!("client_timeout: {e}"))?;
        if !(timefmt::NS_PER_MS * 100..=3_600 * 1_000 * timefmt::NS_PER_MS)
            .contains(&client_timeout_ns)
        {
            return Err("client_timeout: must be between 100ms and 1h".into());
        }
        let max_clients_per_uid = raw.max_clients_per_uid.unwrap_or((max_clients / 16).max(1));
        if !(1..=max_clients).contains(&max_clients_per_uid) {
            return Err(format!(
                "max_clients_per_uid: {max_clients_per_uid} is outside 1..={max_clients} (max_clients)"
            ));
        }
        let max_flows_per_owner = raw.max_flows_per_owner.unwrap_or(max_flows / 8);
        if max_flows_per_owner > max_flows {
            return Err(format!(
                "max_flows_per_owner: {max_flows_per_owner} is more than max_flows ({max_flows})"
            ));
        }
        let nice = raw.nice.unwrap_or(DEFAULT_NICE);
        if !(-20..=19).contains(&nice) {
            return Err(format!("nice: {nice} is outside -20..=19"));
        }
        let realtime_priority = raw.realtime_priority.unwrap_or(DEFAULT_REALTIME_PRIORITY);
        if realtime_priority > 99 {
            return Err(format!(
                "realtime_priority: {realtime_priority} is outside 0..=99 (0 is off)"
            ));
        }
        let access = access_of(
            raw.access.unwrap_or_default(),
            &classes,
            max_sessions,
            max_pending,
        )?;
        let metrics_listen = match raw.metrics.and_then(|m| m.listen) {
            None => None,
            Some(text) if text.is_empty() => None,
            Some(text) => Some(text.parse::<std::net::SocketAddr>().map_err(|_| {
                format!(
                    "metrics.listen: {text:?} is not an address and port like \"127.0.0.1:9464\""
                )
            })?),
        };
        let fleet = raw.fleet.map(fleet_of).transpose()?;
        if fleet.is_none() {
            if let Some(c) = classes.values().find(|c| c.fleet_limits) {
                return Err(format!(
                    "classes.{}.limit_scope: \"fleet\" needs a [fleet] section (the limits are counted in etcd)",
                    c.name
                ));
            }
        }
        let non_empty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        Ok(Config {
            socket: non_empty(raw.socket).unwrap_or_else(|| DEFAULT_SOCKET.into()),
            socket_mode,
            socket_group,
            socket_dir_group,
            pin_path: non_empty(raw.pin_path).unwrap_or_else(|| DEFAULT_PIN_PATH.into()),
            cgroup: non_empty(raw.cgroup),
            audit_file: non_empty(raw.audit_file),
            max_flows,
            max_flows_per_owner,
            max_sessions,
            max_pending,
            max_ttl_ns,
            access,
            watch,
            fence,
            fence_grace_ns,
            limits,
            classes,
            socket_destroy: raw.socket_destroy.unwrap_or(true),
            forward_interfaces,
            forward_attach,
            max_clients: max_clients as usize,
            max_clients_per_uid: max_clients_per_uid as usize,
            nice,
            realtime_priority,
            client_timeout: std::time::Duration::from_nanos(client_timeout_ns),
            log_format: raw.log_format.unwrap_or_default(),
            metrics_listen,
            fleet,
        })
    }

    /// The class a grant gets: the named one, or `default` (configured, or
    /// one bounded only by max_ttl).
    pub fn class(&self, name: Option<&str>) -> Option<Class> {
        match name {
            Some(name) => self.classes.get(name).cloned(),
            None => Some(
                self.classes
                    .get("default")
                    .cloned()
                    .unwrap_or_else(|| Class::fallback(self.max_ttl_ns)),
            ),
        }
    }

    /// Whether the class a grant names (`None`: the default) counts its
    /// limits fleet-wide; without cloning it, as a grant asks this.
    pub fn class_has_fleet_limits(&self, name: Option<&str>) -> bool {
        self.classes
            .get(name.unwrap_or("default"))
            .is_some_and(|c| c.fleet_limits)
    }

    /// Whether a connection with these ports is watched or fenced (from its
    /// socket's side: `local` is the socket's own port).
    pub fn watches(&self, local_port: u16, remote_port: u16) -> bool {
        self.watch.iter().chain(&self.fence).any(|w| {
            let has = |p: u16| (w.first..=w.last).contains(&p);
            match w.side {
                Side::Local => has(local_port),
                Side::Remote => has(remote_port),
                Side::Any => has(local_port) || has(remote_port),
            }
        })
    }

    /// Takes the restart-only keys from the running config, so that a
    /// reloaded config describes what is actually in force.
    pub fn keep_restart_only(&mut self, running: &Config) {
        self.socket = running.socket.clone();
        self.socket_mode = running.socket_mode;
        self.socket_group = running.socket_group;
        self.socket_dir_group = running.socket_dir_group;
        self.pin_path = running.pin_path.clone();
        self.cgroup = running.cgroup.clone();
        self.audit_file = running.audit_file.clone();
        self.max_flows = running.max_flows;
        self.max_sessions = running.max_sessions;
        self.max_pending = running.max_pending;
        self.socket_destroy = running.socket_destroy;
        self.forward_interfaces = running.forward_interfaces.clone();
        self.forward_attach = running.forward_attach;
        self.max_clients = running.max_clients;
        self.max_clients_per_uid = running.max_clients_per_uid;
        self.nice = running.nice;
        self.realtime_priority = running.realtime_priority;
        self.client_timeout = running.client_timeout;
        self.log_format = running.log_format;
        self.metrics_listen = running.metrics_listen;
        self.fleet = running.fleet.clone();
    }

    /// Keys that differ from `new` but only take effect at a restart (the
    /// socket, the maps and the attachment are set up once).
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut check = |changed: bool, key| {
            if changed {
                keys.push(key)
            }
        };
        check(self.socket != new.socket, "socket");
        check(self.socket_mode != new.socket_mode, "socket_mode");
        check(self.socket_group != new.socket_group, "socket_group");
        check(
            self.socket_dir_group != new.socket_dir_group,
            "socket_dir_group",
        );
        check(self.pin_path != new.pin_path, "pin_path");
        check(self.cgroup != new.cgroup, "cgroup");
        check(self.audit_file != new.audit_file, "audit_file");
        check(self.max_flows != new.max_flows, "max_flows");
        check(self.max_sessions != new.max_sessions, "max_sessions");
        check(self.max_pending != new.max_pending, "max_pending");
        check(self.socket_destroy != new.socket_destroy, "socket_destroy");
        check(
            self.forward_interfaces != new.forward_interfaces,
            "forward.interfaces",
        );
        check(self.forward_attach != new.forward_attach, "forward.attach");
        check(self.max_clients != new.max_clients, "max_clients");
        check(
            self.max_clients_per_uid != new.max_clients_per_uid,
            "max_clients_per_uid",
        );
        check(self.nice != new.nice, "nice");
        check(self.client_timeout != new.client_timeout, "client_timeout");
        check(self.log_format != new.log_format, "log_format");
        check(self.metrics_listen != new.metrics_listen, "metrics.listen");
        check(self.fleet != new.fleet, "fleet");
        keys
    }
}

/// `[access]`, checked: every scope names someone, its classes exist, its
/// target patterns have `*` at the end only, its ports parse.
fn access_of(
    raw: RawAccess,
    classes: &BTreeMap<String, Class>,
    max_sessions: u32,
    max_pending: u32,
) -> Result<Access, String> {
    let quota = |key: &str, v: Option<u32>, default: u32| match v {
        None => Ok(default),
        Some(0) => Err(format!("{key}: must be at least 1")),
        Some(n) => Ok(n),
    };
    let scopes = raw
        .scopes
        .into_iter()
        .enumerate()
        .map(|(i, s)| scope_of(&format!("access.scope[{i}]"), s, classes))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Access {
        uids: raw.uids,
        gids: raw.gids,
        operator_uids: raw.operator_uids,
        operator_gids: raw.operator_gids,
        scopes,
        // A quarter of each table by default: one proxy, or one rogue
        // caller, cannot fill it for the rest.
        max_sessions_per_uid: quota(
            "access.max_sessions_per_uid",
            raw.max_sessions_per_uid,
            (max_sessions / 4).max(1),
        )?,
        max_expecting_per_uid: quota(
            "access.max_expecting_per_uid",
            raw.max_expecting_per_uid,
            (max_pending / 8).max(1),
        )?,
    })
}

fn scope_of(key: &str, raw: RawScope, classes: &BTreeMap<String, Class>) -> Result<Scope, String> {
    if raw.uids.is_empty() && raw.gids.is_empty() {
        return Err(format!("{key}: names no uids and no gids"));
    }
    for class in &raw.classes {
        if class != "default" && !classes.contains_key(class) {
            return Err(format!("{key}.classes: no class {class:?} is configured"));
        }
    }
    for target in &raw.targets {
        let stem = target.strip_suffix('*').unwrap_or(target);
        if stem.contains('*') {
            return Err(format!(
                "{key}.targets: {target:?}: `*` may only end a pattern (a prefix)"
            ));
        }
        if target.is_empty() {
            return Err(format!("{key}.targets: an empty target matches nothing"));
        }
    }
    let ports = raw
        .ports
        .into_iter()
        .map(|p| {
            let text = match p {
                PortsSpec::One(p) => p.to_string(),
                PortsSpec::Text(t) => t,
            };
            parse_port_range(&text).map_err(|e| format!("{key}.ports: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let quota = |field: &str, v: Option<u32>| match v {
        Some(0) => Err(format!("{key}.{field}: must be at least 1")),
        v => Ok(v),
    };
    Ok(Scope {
        max_sessions: quota("max_sessions", raw.max_sessions)?,
        max_expecting: quota("max_expecting", raw.max_expecting)?,
        uids: raw.uids,
        gids: raw.gids,
        classes: raw.classes,
        targets: raw.targets,
        ports,
        all_sessions: raw.all_sessions,
    })
}

fn port_ranges(key: &str, list: Vec<RawWatch>) -> Result<Vec<Watch>, String> {
    list.into_iter()
        .enumerate()
        .map(|(i, w)| {
            // A number goes through the same rules as text (found by
            // fuzzing: `ports = 0` was taken while `ports = "0"` was not).
            let text = match w.ports {
                PortsSpec::One(p) => p.to_string(),
                PortsSpec::Text(t) => t,
            };
            let (first, last) =
                parse_port_range(&text).map_err(|e| format!("{key}[{i}].ports: {e}"))?;
            Ok(Watch {
                first,
                last,
                side: w.side,
            })
        })
        .collect()
}

/// `[fleet]`, checked: what a node needs to join, or an error naming the key.
fn fleet_of(raw: RawFleet) -> Result<Fleet, String> {
    if raw.endpoints.is_empty() {
        return Err("fleet.endpoints: name at least one etcd member (\"http://host:2379\")".into());
    }
    let mut tls = false;
    for (i, e) in raw.endpoints.iter().enumerate() {
        let rest = if let Some(rest) = e.strip_prefix("https://") {
            tls = true;
            rest
        } else if let Some(rest) = e.strip_prefix("http://") {
            rest
        } else {
            return Err(format!(
                "fleet.endpoints[{i}]: {e:?} must start with http:// or https://"
            ));
        };
        let port_ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || rest.contains('/') {
            return Err(format!(
                "fleet.endpoints[{i}]: {e:?} is not scheme://host:port"
            ));
        }
    }
    if tls && raw.endpoints.iter().any(|e| e.starts_with("http://")) {
        return Err("fleet.endpoints: mixes http:// and https:// members".into());
    }
    let path = |key: &str, p: Option<PathBuf>| -> Result<Option<PathBuf>, String> {
        match p.filter(|p| !p.as_os_str().is_empty()) {
            Some(p) if !p.is_absolute() => Err(format!(
                "fleet.{key}: {} is not an absolute path",
                p.display()
            )),
            p => Ok(p),
        }
    };
    let ca_file = path("ca_file", raw.ca_file)?;
    let cert_file = path("cert_file", raw.cert_file)?;
    let key_file = path("key_file", raw.key_file)?;
    if cert_file.is_some() != key_file.is_some() {
        return Err("fleet.cert_file and fleet.key_file go together: set both or neither".into());
    }
    if !tls && (ca_file.is_some() || cert_file.is_some()) {
        return Err("fleet.ca_file, cert_file and key_file need https:// endpoints".into());
    }
    let node = raw.node.filter(|n| !n.is_empty());
    if let Some(node) = &node {
        crate::fleet::record::check_node(node).map_err(|e| format!("fleet.node: {e}"))?;
    }
    let prefix = crate::fleet::record::normalise_prefix(
        raw.prefix.as_deref().unwrap_or(DEFAULT_FLEET_PREFIX),
    )
    .map_err(|e| format!("fleet.prefix: {e}"))?;
    let node_lease_ns =
        timefmt::parse_duration(raw.node_lease.as_deref().unwrap_or(DEFAULT_NODE_LEASE))
            .map_err(|e| format!("fleet.node_lease: {e}"))?;
    if !(2 * timefmt::NS_PER_SEC..=3_600 * timefmt::NS_PER_SEC).contains(&node_lease_ns) {
        return Err("fleet.node_lease: must be between 2s and 1h".into());
    }
    // Unset: 10s, or half the lease when that is shorter.
    let grace_ns = match raw.grace.as_deref() {
        Some(text) => timefmt::parse_duration(text).map_err(|e| format!("fleet.grace: {e}"))?,
        None => {
            (node_lease_ns / 2).min(timefmt::parse_duration(DEFAULT_FLEET_GRACE).expect("valid"))
        }
    };
    // The kill takes milliseconds; a second keeps it clear of the lease.
    if grace_ns == 0 || grace_ns + timefmt::NS_PER_SEC > node_lease_ns {
        return Err(format!(
            "fleet.grace: must be above zero and at least 1s shorter than fleet.node_lease ({}), so that a cut-off node kills its fail-closed sessions before the fleet forgets it",
            timefmt::format_duration(node_lease_ns)
        ));
    }
    let mut addresses = Vec::with_capacity(raw.addresses.len());
    for (i, a) in raw.addresses.iter().enumerate() {
        addresses.push(
            a.parse()
                .map_err(|_| format!("fleet.addresses[{i}]: {a:?} is not an IP address"))?,
        );
    }
    let state_file =
        path("state_file", raw.state_file)?.unwrap_or_else(|| DEFAULT_FLEET_STATE_FILE.into());
    Ok(Fleet {
        endpoints: raw.endpoints,
        ca_file,
        cert_file,
        key_file,
        node,
        prefix,
        node_lease_ns,
        grace_ns,
        addresses,
        state_file,
    })
}

fn class_of(name: String, raw: RawClass, global_max_ttl_ns: u64) -> Result<Class, String> {
    let key = format!("classes.{name}");
    if name.is_empty()
        || name.len() > reaper_common::CLASS_NAME_MAX
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "{key}: a class name is 1-{} letters, digits, '-', '_' or '.'",
            reaper_common::CLASS_NAME_MAX
        ));
    }
    let duration = |field: &str, v: Option<String>| -> Result<Option<u64>, String> {
        match v {
            None => Ok(None),
            Some(text) => match timefmt::parse_duration(&text) {
                Ok(0) => Err(format!("{key}.{field}: must be greater than zero")),
                Ok(ns) => Ok(Some(ns)),
                Err(e) => Err(format!("{key}.{field}: {e}")),
            },
        }
    };
    let ttl_ns = duration("ttl", raw.ttl)?;
    let max_ttl_ns = duration("max_ttl", raw.max_ttl)?.unwrap_or(global_max_ttl_ns);
    if max_ttl_ns > global_max_ttl_ns {
        return Err(format!(
            "{key}.max_ttl: {} is beyond the global max_ttl {}",
            timefmt::format_duration(max_ttl_ns),
            timefmt::format_duration(global_max_ttl_ns)
        ));
    }
    if let Some(ttl) = ttl_ns {
        if ttl > max_ttl_ns {
            return Err(format!(
                "{key}.ttl: {} is longer than the class's max_ttl {}",
                timefmt::format_duration(ttl),
                timefmt::format_duration(max_ttl_ns)
            ));
        }
    }
    Ok(Class {
        name,
        ttl_ns,
        max_ttl_ns,
        idle_timeout_ns: duration("idle_timeout", raw.idle_timeout)?,
        idle_direction: raw.idle_direction.unwrap_or(IdleDirection::Input),
        max_per_target: raw.max_per_target.unwrap_or(0),
        max_per_user: raw.max_per_user.unwrap_or(0),
        on_limit: raw.on_limit.unwrap_or(OnLimit::RejectNew),
        on_partition: raw.on_partition.unwrap_or_default(),
        fleet_limits: raw.limit_scope == Some(LimitScope::Fleet),
    })
}

/// `"5900-5999"` or `"6080"`.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let port = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
            Ok(p) => Ok(p),
        }
    };
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!("range {text:?} is backwards"));
    }
    Ok((first, last))
}

fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not an octal permission mode like \"0660\""
        )),
    }
}

/// A group given by name or gid (empty: none).
fn group_of(group: Option<GroupRef>, key: &str) -> Result<Option<u32>, String> {
    match group {
        None => Ok(None),
        Some(GroupRef::Gid(gid)) => Ok(Some(gid)),
        Some(GroupRef::Name(name)) if name.is_empty() => Ok(None),
        Some(GroupRef::Name(name)) => lookup_group(&name)
            .map(Some)
            .ok_or_else(|| format!("{key}: no group named {name:?}")),
    }
}

fn lookup_group(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_where_and_never_quote_the_file() {
        // Before, the parse error quoted the offending line: pointed at
        // /etc/shadow, a reload error showed its first line in `status`.
        let secret = "root:$y$j9T$SECRETHASH:19000:0:99999:7:::\n";
        let e = Config::from_toml(secret).unwrap_err().to_string();
        assert!(!e.contains("SECRETHASH") && !e.contains("root:"), "{e}");
        assert!(e.contains("line 1"), "{e}");
        let e = Config::from_toml("max_flows = 2048\nmax_ttl = \"7d\"\nsocket = [\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn empty_config_is_the_default() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.watch, default_watch());
        assert_eq!(c.max_ttl_ns, 7 * 86_400 * timefmt::NS_PER_SEC);
        assert!(c.cgroup.is_none() && c.audit_file.is_none());
    }

    #[test]
    fn full_config_parses() {
        let c = Config::from_toml(
            r#"
            socket = "/tmp/r.sock"
            socket_mode = "0600"
            socket_group = 0
            pin_path = "/sys/fs/bpf/r"
            cgroup = "/sys/fs/cgroup/unified/consoles"
            audit_file = "/var/log/reaper.jsonl"
            max_flows = 2048
            max_sessions = 1024
            max_ttl = "12h"
            [access]
            uids = [1000]
            gids = [27]
            [[watch]]
            ports = "5900-5910"
            side = "local"
            [[watch]]
            ports = 6080
            "#,
        )
        .unwrap();
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.socket_group, Some(0));
        assert_eq!(c.max_flows, 2048);
        assert_eq!(c.access.uids, vec![1000]);
        assert_eq!(
            c.watch,
            vec![
                Watch {
                    first: 5900,
                    last: 5910,
                    side: Side::Local
                },
                Watch {
                    first: 6080,
                    last: 6080,
                    side: Side::Any
                },
            ]
        );
    }

    #[test]
    fn bad_configs_name_the_key() {
        for (text, needle) in [
            ("sockett = \"/x\"", "sockett"),
            ("max_flows = 10", "max_flows"),
            ("max_pending = 1", "max_pending"),
            ("max_ttl = \"forever\"", "max_ttl"),
            ("max_ttl = \"0s\"", "max_ttl"),
            ("socket_mode = \"999\"", "socket_mode"),
            ("[[watch]]\nports = \"6000-5000\"", "watch[0].ports"),
            ("[[watch]]\nports = \"0\"", "watch[0].ports"),
            ("[[watch]]\nports = 0", "watch[0].ports"),
            ("[[fence]]\nports = 0", "fence[0].ports"),
            ("[[watch]]\nports = \"5900\"\nside = \"up\"", "side"),
            ("[access]\nuids = [\"bob\"]", "uids"),
            ("socket_group = \"no-such-group-here\"", "socket_group"),
            ("max_clients = 0", "max_clients"),
            ("max_clients = 100000", "max_clients"),
            (
                "max_clients = 10\nmax_clients_per_uid = 11",
                "max_clients_per_uid",
            ),
            ("client_timeout = \"1ms\"", "client_timeout"),
            ("client_timeout = \"soon\"", "client_timeout"),
            ("nice = -21", "nice"),
            (
                "socket_dir_group = \"no-such-group-here\"",
                "socket_dir_group",
            ),
            (
                "[access]\nmax_sessions_per_uid = 0",
                "access.max_sessions_per_uid",
            ),
            (
                "[[access.scope]]\nclasses = []",
                "access.scope[0]: names no uids",
            ),
            (
                "[[access.scope]]\nuids = [1]\nclasses = [\"vnc\"]",
                "access.scope[0].classes",
            ),
            (
                "[[access.scope]]\nuids = [1]\ntargets = [\"a*b\"]",
                "access.scope[0].targets",
            ),
            (
                "[[access.scope]]\nuids = [1]\ntargets = [\"\"]",
                "access.scope[0].targets",
            ),
            (
                "[[access.scope]]\nuids = [1]\nports = [\"6000-5000\"]",
                "access.scope[0].ports",
            ),
            (
                "[[access.scope]]\nuids = [1]\nmax_sessions = 0",
                "access.scope[0].max_sessions",
            ),
            (
                "[[access.scope]]\nuids = [1]\nrevoke_all = true",
                "revoke_all",
            ),
            ("[fleet]", "fleet.endpoints"),
            ("[fleet]\nendpoints = [\"etcd:2379\"]", "fleet.endpoints[0]"),
            (
                "[fleet]\nendpoints = [\"http://etcd\"]",
                "fleet.endpoints[0]",
            ),
            (
                "[fleet]\nendpoints = [\"http://a:1\", \"https://b:1\"]",
                "fleet.endpoints: mixes",
            ),
            (
                "[fleet]\nendpoints = [\"https://a:1\"]\ncert_file = \"/c.pem\"",
                "fleet.cert_file and fleet.key_file",
            ),
            (
                "[fleet]\nendpoints = [\"http://a:1\"]\nca_file = \"/ca.pem\"",
                "need https://",
            ),
            (
                "[fleet]\nendpoints = [\"https://a:1\"]\nca_file = \"ca.pem\"",
                "fleet.ca_file",
            ),
            (
                "[fleet]\nendpoints = [\"http://a:1\"]\nnode = \"a b\"",
                "fleet.node",
            ),
            (
                "[fleet]\nendpoints = [\"http://a:1\"]\nprefix = \"x\"",
                "fleet.prefix",
            ),
            (
                "[fleet]\nendpoints = [\"http://a:1\"]\nnode_lease = \"1s\"",
                "fleet.node_lease",
            ),
            (
                "[fleet]\nendpoints = [\"http://a:1\"]\ngrace = \"15s\"",
                "fleet.grace",
            ),
            (
                "[fleet]\nendpoints = [\"http://a:1\"]\naddresses = [\"nowhere\"]",
                "fleet.addresses[0]",
            ),
            (
                "[fleet]\nendpoints = [\"http://a:1\"]\npartition = \"x\"",
                "partition",
            ),
            ("[classes.x]\non_partition = \"panic\"", "on_partition"),
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.to_string().contains(needle), "{text:?} -> {e}");
        }
    }

    #[test]
    fn classes_fences_and_limits_parse() {
        let c = Config::from_toml(
            r#"
            fence_grace = "500ms"
            [[fence]]
            ports = "5900-5999"
            side = "local"
            [limits]
            max_sessions = 100
            on_limit = "evict-oldest"
            [classes.vm-console]
            ttl = "10m"
            max_ttl = "1h"
            idle_timeout = "15m"
            idle_direction = "any"
            max_per_target = 1
            on_limit = "reject-new"
            [classes.notebook]
            max_per_user = 3
            "#,
        )
        .unwrap();
        assert_eq!(c.fence_grace_ns, 500 * timefmt::NS_PER_MS);
        assert_eq!(c.fence.len(), 1);
        assert_eq!(c.limits.max_sessions, 100);
        assert_eq!(c.limits.on_limit, OnLimit::EvictOldest);
        let vm = c.class(Some("vm-console")).unwrap();
        assert_eq!(vm.ttl_ns, Some(600 * timefmt::NS_PER_SEC));
        assert_eq!(vm.idle_direction, IdleDirection::Any);
        assert_eq!(vm.max_per_target, 1);
        let nb = c.class(Some("notebook")).unwrap();
        assert_eq!(
            nb.max_ttl_ns, c.max_ttl_ns,
            "a class inherits the global max_ttl"
        );
        assert!(c.class(Some("nope")).is_none());
        assert_eq!(c.class(None).unwrap().name, "default");
    }

    #[test]
    fn bad_classes_name_the_key() {
        for (text, needle) in [
            (
                "[classes.x]\nttl = \"2h\"\nmax_ttl = \"1h\"",
                "classes.x.ttl",
            ),
            (
                "max_ttl = \"1h\"\n[classes.x]\nmax_ttl = \"2h\"",
                "classes.x.max_ttl",
            ),
            (
                "[classes.x]\nidle_timeout = \"0s\"",
                "classes.x.idle_timeout",
            ),
            (
                "[classes.x]\nidle_direction = \"sideways\"",
                "idle_direction",
            ),
            ("[classes.x]\non_limit = \"panic\"", "on_limit"),
            ("[classes.x]\nmax_per_host = 1", "max_per_host"),
            ("[classes.\"a b\"]", "classes.a b"),
            ("fence_grace = \"0s\"", "fence_grace"),
            ("[[fence]]\nports = \"x\"", "fence[0].ports"),
            ("[forward]\ninterfaces = [\"a b\"]", "forward.interfaces[0]"),
            ("[forward]\nattach = \"xdp\"", "attach"),
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.to_string().contains(needle), "{text:?} -> {e}");
        }
    }

    #[test]
    fn restart_only_keys_are_named() {
        let a = Config::default();
        let mut b = a.clone();
        b.max_ttl_ns = 1;
        assert!(a.restart_only_changes(&b).is_empty());
        b.pin_path = "/sys/fs/bpf/other".into();
        b.max_flows = 2048;
        assert_eq!(a.restart_only_changes(&b), vec!["pin_path", "max_flows"]);
    }

    #[test]
    fn port_range_syntax() {
        assert_eq!(parse_port_range("5900-5999").unwrap(), (5900, 5999));
        assert_eq!(parse_port_range("6080").unwrap(), (6080, 6080));
        assert!(parse_port_range("70000").is_err());
        assert!(parse_port_range("a-b").is_err());
    }
}
