//! The effective configuration as TOML: every key with the value in force,
//! defaults filled in, as `reaper check-config` prints it (like `sshd -T`).
//! The text loads back to the same `Config`, which the tests hold it to.

use std::fmt::Write;

use super::{Config, Side, Watch};
use crate::policy::{IdleDirection, OnLimit};
use crate::timefmt::format_duration;

/// A TOML basic string (JSON's escapes are TOML's).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn quoted_list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let items: Vec<String> = items.into_iter().map(|s| quoted(s)).collect();
    format!("[{}]", items.join(", "))
}

fn numbers(items: &[u32]) -> String {
    let items: Vec<String> = items.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn ports(first: u16, last: u16) -> String {
    if first == last {
        quoted(&first.to_string())
    } else {
        quoted(&format!("{first}-{last}"))
    }
}

fn side(s: Side) -> &'static str {
    match s {
        Side::Local => "local",
        Side::Remote => "remote",
        Side::Any => "any",
    }
}

fn on_limit(o: OnLimit) -> &'static str {
    match o {
        OnLimit::RejectNew => "reject-new",
        OnLimit::EvictOldest => "evict-oldest",
    }
}

fn idle_direction(d: IdleDirection) -> &'static str {
    match d {
        IdleDirection::Input => "input",
        IdleDirection::Any => "any",
    }
}

fn path(p: Option<&std::path::Path>) -> String {
    quoted(&p.map(|p| p.display().to_string()).unwrap_or_default())
}

fn gid(g: Option<u32>) -> String {
    g.map_or_else(|| quoted(""), |g| g.to_string())
}

fn port_tables(out: &mut String, table: &str, list: &[Watch]) {
    for w in list {
        let _ = writeln!(
            out,
            "\n[[{table}]]\nports = {}\nside = {:?}",
            ports(w.first, w.last),
            side(w.side)
        );
    }
}

/// Every key of `config` with its value; an empty string stands for
/// "none" where the key takes one (no group, no audit file, the cgroup2
/// root, metrics off).
pub fn effective(config: &Config) -> String {
    let c = config;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "socket = {}", path(Some(&c.socket)));
    let _ = writeln!(w, "socket_mode = \"{:04o}\"", c.socket_mode);
    let _ = writeln!(w, "socket_group = {}", gid(c.socket_group));
    let _ = writeln!(w, "socket_dir_group = {}", gid(c.socket_dir_group));
    let _ = writeln!(w, "pin_path = {}", path(Some(&c.pin_path)));
    let _ = writeln!(w, "cgroup = {}", path(c.cgroup.as_deref()));
    let _ = writeln!(w, "audit_file = {}", path(c.audit_file.as_deref()));
    let _ = writeln!(w, "max_flows = {}", c.max_flows);
    let _ = writeln!(w, "max_flows_per_owner = {}", c.max_flows_per_owner);
    let _ = writeln!(w, "max_sessions = {}", c.max_sessions);
    let _ = writeln!(w, "max_pending = {}", c.max_pending);
    let _ = writeln!(w, "max_ttl = {}", quoted(&format_duration(c.max_ttl_ns)));
    let _ = writeln!(
        w,
        "fence_grace = {}",
        quoted(&format_duration(c.fence_grace_ns))
    );
    let _ = writeln!(w, "socket_destroy = {}", c.socket_destroy);
    let _ = writeln!(w, "max_clients = {}", c.max_clients);
    let _ = writeln!(w, "max_clients_per_uid = {}", c.max_clients_per_uid);
    let _ = writeln!(w, "nice = {}", c.nice);
    let _ = writeln!(w, "realtime_priority = {}", c.realtime_priority);
    let _ = writeln!(
        w,
        "client_timeout = {}",
        quoted(&format_duration(c.client_timeout.as_nanos() as u64))
    );
    let _ = writeln!(w, "log_format = {}", quoted(c.log_format.name()));
    if c.watch.is_empty() {
        // Said outright: no `[[watch]]` would mean the default ports.
        let _ = writeln!(w, "watch = []");
    }

    let a = &c.access;
    let _ = writeln!(w, "\n[access]");
    let _ = writeln!(w, "uids = {}", numbers(&a.uids));
    let _ = writeln!(w, "gids = {}", numbers(&a.gids));
    let _ = writeln!(w, "operator_uids = {}", numbers(&a.operator_uids));
    let _ = writeln!(w, "operator_gids = {}", numbers(&a.operator_gids));
    let _ = writeln!(w, "max_sessions_per_uid = {}", a.max_sessions_per_uid);
    let _ = writeln!(w, "max_expecting_per_uid = {}", a.max_expecting_per_uid);
    for s in &a.scopes {
        let _ = writeln!(w, "\n[[access.scope]]");
        let _ = writeln!(w, "uids = {}", numbers(&s.uids));
        let _ = writeln!(w, "gids = {}", numbers(&s.gids));
        let _ = writeln!(w, "classes = {}", quoted_list(&s.classes));
        let _ = writeln!(w, "targets = {}", quoted_list(&s.targets));
        let ranges: Vec<String> = s.ports.iter().map(|(f, l)| ports(*f, *l)).collect();
        let _ = writeln!(w, "ports = [{}]", ranges.join(", "));
        let _ = writeln!(w, "all_sessions = {}", s.all_sessions);
        if let Some(n) = s.max_sessions {
            let _ = writeln!(w, "max_sessions = {n}");
        }
        if let Some(n) = s.max_expecting {
            let _ = writeln!(w, "max_expecting = {n}");
        }
    }

    let _ = writeln!(w, "\n[limits]");
    let _ = writeln!(w, "max_sessions = {}", c.limits.max_sessions);
    let _ = writeln!(w, "on_limit = {:?}", on_limit(c.limits.on_limit));

    let _ = writeln!(w, "\n[forward]");
    let _ = writeln!(w, "interfaces = {}", quoted_list(&c.forward_interfaces));
    let attach = match c.forward_attach {
        super::ForwardAttach::Auto => "auto",
        super::ForwardAttach::Tcx => "tcx",
        super::ForwardAttach::Tc => "tc",
    };
    let _ = writeln!(w, "attach = {attach:?}");

    let _ = writeln!(w, "\n[metrics]");
    let listen = c.metrics_listen.map(|a| a.to_string()).unwrap_or_default();
    let _ = writeln!(w, "listen = {}", quoted(&listen));

    if let Some(f) = &c.fleet {
        let _ = writeln!(w, "\n[fleet]");
        let _ = writeln!(w, "endpoints = {}", quoted_list(&f.endpoints));
        let path = |p: &Option<std::path::PathBuf>| {
            quoted(
                &p.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
        };
        let _ = writeln!(w, "ca_file = {}", path(&f.ca_file));
        let _ = writeln!(w, "cert_file = {}", path(&f.cert_file));
        let _ = writeln!(w, "key_file = {}", path(&f.key_file));
        let _ = writeln!(w, "node = {}", quoted(f.node.as_deref().unwrap_or("")));
        let _ = writeln!(w, "prefix = {}", quoted(&f.prefix));
        let _ = writeln!(
            w,
            "node_lease = {}",
            quoted(&format_duration(f.node_lease_ns))
        );
        let _ = writeln!(w, "grace = {}", quoted(&format_duration(f.grace_ns)));
        let addresses: Vec<String> = f.addresses.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(w, "addresses = {}", quoted_list(&addresses));
        let _ = writeln!(w, "state_file = {}", path(&Some(f.state_file.clone())));
    }

    for class in c.classes.values() {
        let _ = writeln!(w, "\n[classes.{}]", class.name);
        if let Some(ttl) = class.ttl_ns {
            let _ = writeln!(w, "ttl = {}", quoted(&format_duration(ttl)));
        }
        let _ = writeln!(
            w,
            "max_ttl = {}",
            quoted(&format_duration(class.max_ttl_ns))
        );
        if let Some(idle) = class.idle_timeout_ns {
            let _ = writeln!(w, "idle_timeout = {}", quoted(&format_duration(idle)));
        }
        let _ = writeln!(
            w,
            "idle_direction = {:?}",
            idle_direction(class.idle_direction)
        );
        let _ = writeln!(w, "max_per_target = {}", class.max_per_target);
        let _ = writeln!(w, "max_per_user = {}", class.max_per_user);
        let _ = writeln!(w, "on_limit = {:?}", on_limit(class.on_limit));
        let _ = writeln!(w, "on_partition = {:?}", class.on_partition.name());
        let scope = if class.fleet_limits { "fleet" } else { "node" };
        let _ = writeln!(w, "limit_scope = {scope:?}");
    }

    // Arrays of tables last: a plain key after a table would land in it.
    port_tables(w, "watch", &c.watch);
    port_tables(w, "fence", &c.fence);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) {
        let config = Config::from_toml(text).unwrap();
        let printed = effective(&config);
        let again = Config::from_toml(&printed)
            .unwrap_or_else(|e| panic!("effective config does not load: {e}\n{printed}"));
        assert_eq!(again, config, "{printed}");
    }

    #[test]
    fn a_fleet_prints_and_loads_back() {
        round_trip(
            "[fleet]\nendpoints = [\"https://198.18.0.1:2379\", \"https://198.18.0.2:2379\"]\nca_file = \"/etc/reaper/ca.pem\"\ncert_file = \"/etc/reaper/node.pem\"\nkey_file = \"/etc/reaper/node.key\"\nnode = \"compute-1\"\nprefix = \"/cloud/reaper/\"\n",
        );
        round_trip("[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\n");
    }

    #[test]
    fn the_defaults_print_and_load_back() {
        round_trip("");
    }

    #[test]
    fn every_section_prints_and_loads_back() {
        round_trip(
            r#"
socket = "/run/x/r.sock"
socket_mode = "0600"
socket_group = 0
audit_file = "/var/log/reaper/audit.jsonl"
max_ttl = "1d"
fence_grace = "1.500s"
log_format = "json"
fence = [{ ports = "5900-5901", side = "local" }]
watch = [{ ports = 6080, side = "remote" }]
[access]
uids = [1000]
gids = [27]
operator_uids = [1001]
max_sessions_per_uid = 9
[[access.scope]]
uids = [1000]
classes = ["vnc", "default"]
targets = ["vm-*"]
ports = ["5900-5999", 6080]
max_sessions = 4
[limits]
max_sessions = 100
on_limit = "evict-oldest"
[forward]
interfaces = ["veth0"]
attach = "tc"
[metrics]
listen = "[::1]:9464"
[classes.vnc]
ttl = "1h"
max_ttl = "8h"
idle_timeout = "15m"
idle_direction = "any"
max_per_target = 1
on_limit = "evict-oldest"
"#,
        );
    }

    #[test]
    fn an_empty_watch_list_stays_empty() {
        round_trip("watch = []\n");
    }
}

/// The packaged `/etc/reaper/reaper.toml` must show every key at its
/// default (commented out), so that an operator reads what is in force.
#[cfg(test)]
mod packaged {
    use std::collections::BTreeSet;

    use super::*;

    const PACKAGED: &str = include_str!("../../../packaging/reaper.toml");

    /// The file with every `#key = value` line (not prose `# ...`, not the
    /// indented examples `#   ...`) uncommented.
    fn uncommented() -> String {
        PACKAGED
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.starts_with([' ', '#']) && !rest.is_empty() => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// (table, key) of every assignment in TOML text.
    fn keys(text: &str) -> BTreeSet<(String, String)> {
        let mut table = String::new();
        let mut out = BTreeSet::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                table = line.trim_matches(['[', ']']).to_owned();
            } else if let Some((key, _)) = line.split_once(" = ") {
                if !line.starts_with('#') {
                    out.insert((table.clone(), key.to_owned()));
                }
            }
        }
        out
    }

    #[test]
    fn every_key_is_shown_at_its_default() {
        let loaded = Config::from_toml(&uncommented()).unwrap();
        let expected = Config {
            audit_file: Some("/var/log/reaper/audit.jsonl".into()),
            ..Config::default()
        };
        assert_eq!(loaded, expected);
        let missing: Vec<_> = keys(&effective(&Config::default()))
            .difference(&keys(&uncommented()))
            .cloned()
            .collect();
        assert!(
            missing.is_empty(),
            "not in packaging/reaper.toml: {missing:?}"
        );
    }

    #[test]
    fn the_packaged_file_loads_as_shipped() {
        let shipped = Config::from_toml(PACKAGED).unwrap();
        assert_eq!(
            shipped.audit_file.as_deref(),
            Some(std::path::Path::new("/var/log/reaper/audit.jsonl"))
        );
    }
}
