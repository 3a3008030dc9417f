//! The fleet: what nodes share through etcd. `record` is the key layout
//! and the records, pure; `etcd` is the one piece of code that speaks to
//! etcd, used by the daemon's fleet task (`daemon::fleet`) and by the CLI
//! (`reaper revoke --fleet`, `reaper unlock`). Nothing else here knows
//! etcd exists; the daemon core sees revocations as domain values.
//!
//! docs/fleet.md tells operators how to deploy it and what it guarantees.

pub mod etcd;
pub mod record;

/// This node's name in the fleet: the configured one, or the host name.
pub fn node_name(configured: Option<&str>) -> Result<String, String> {
    if let Some(node) = configured {
        return Ok(node.to_owned());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("cannot read the host name for fleet.node: {e}"))?;
    let host = host.trim();
    // A host name may be longer or freer than a node name: keep its first
    // label, which is what operators call the node anyway.
    let node = host.split('.').next().unwrap_or(host);
    record::check_node(node)
        .map_err(|e| format!("the host name does not make a node name ({e}): set fleet.node"))?;
    Ok(node.to_owned())
}
