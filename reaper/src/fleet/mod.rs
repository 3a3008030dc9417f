//! The fleet: what nodes share through etcd. `record` (revocations) and
//! `session` (sessions, nodes) are the key layout and the records, pure; `etcd` is the one piece of code that speaks to
//! etcd, used by the daemon's fleet task (`daemon::fleet`) and by the CLI
//! (`reaper revoke --fleet`, `reaper unlock`). Nothing else here knows
//! etcd exists; the daemon core sees revocations as domain values.
//!
//! docs/fleet.md tells operators how to deploy it and what it guarantees.

pub mod etcd;
pub mod place;
pub mod record;
pub mod session;

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

/// Where connections to this node arrive: the configured addresses, or
/// every address of the daemon's network namespace but loopback and
/// link-local ones.
pub fn node_addresses(configured: &[std::net::IpAddr]) -> Vec<std::net::IpAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let mut found = interface_addresses();
    found.retain(|a| match a {
        std::net::IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        std::net::IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    });
    found.sort();
    found.dedup();
    found.truncate(session::MAX_ADDRESSES);
    found
}

/// Every address of every interface (getifaddrs(3)); none when it fails.
#[allow(unsafe_code)]
fn interface_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; every
    // pointer read is checked for null and read as the family says.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut at = head;
        while !at.is_null() {
            let addr = (*at).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(std::net::IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            at = (*at).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}
