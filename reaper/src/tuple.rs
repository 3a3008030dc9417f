//! Flow tuples and socket addresses, both ways: the form the kernel
//! programs record a connection under (`FlowTuple`), and the addresses
//! people and requests name it by. Pure functions: no kernel calls.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reaper_common::{FlowTuple, AF_INET, AF_INET6};

fn words(ip: IpAddr) -> (u16, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (AF_INET6, [w(0), w(4), w(8), w(12)])
        }
    }
}

/// The tuple the kernel would record for a socket with these addresses.
pub fn tuple_of(local: SocketAddr, remote: SocketAddr) -> FlowTuple {
    let (family, local_addr) = words(local.ip());
    let (_, remote_addr) = words(remote.ip());
    FlowTuple {
        family,
        local_port: local.port(),
        remote_port: remote.port(),
        _pad: 0,
        local_addr,
        remote_addr,
    }
}

/// Every tuple a connection named by `local`/`remote` may be recorded under:
/// as given, seen from the other end, and for IPv4 also as the v4-mapped
/// IPv6 addresses a dual-stack socket reports.
pub fn candidate_tuples(local: SocketAddr, remote: SocketAddr) -> Vec<FlowTuple> {
    // As given and reversed first, then the mapped forms of both.
    let (there, back) = (recorded_forms(local, remote), recorded_forms(remote, local));
    let mut out = Vec::with_capacity(there.len() * 2);
    for (a, b) in there.into_iter().zip(back) {
        out.push(a);
        out.push(b);
    }
    out
}

/// The tuples one socket with these addresses may be recorded under: as
/// given, and for IPv4 also as the v4-mapped IPv6 addresses a dual-stack
/// socket reports.
pub fn recorded_forms(local: SocketAddr, remote: SocketAddr) -> Vec<FlowTuple> {
    let mut out = vec![tuple_of(local, remote)];
    if let (IpAddr::V4(l), IpAddr::V4(r)) = (local.ip(), remote.ip()) {
        let l6 = SocketAddr::new(IpAddr::V6(l.to_ipv6_mapped()), local.port());
        let r6 = SocketAddr::new(IpAddr::V6(r.to_ipv6_mapped()), remote.port());
        out.push(tuple_of(l6, r6));
    }
    out
}

fn addr_of(family: u16, words: &[u32; 4], port: u16) -> SocketAddr {
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(o);
        // Show a dual-stack socket's IPv4 peer as people know it.
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    };
    SocketAddr::new(ip, port)
}

/// `(local, remote)` addresses of a recorded tuple.
pub fn addrs_of(t: &FlowTuple) -> (SocketAddr, SocketAddr) {
    (
        addr_of(t.family, &t.local_addr, t.local_port),
        addr_of(t.family, &t.remote_addr, t.remote_port),
    )
}

/// The key the tc program records a forwarded flow under (the same from
/// either end's point of view).
pub fn forwarded_key_of(local: SocketAddr, remote: SocketAddr) -> FlowTuple {
    let t = tuple_of(local, remote);
    reaper_common::forwarded_key(
        t.family,
        t.local_addr,
        t.local_port,
        t.remote_addr,
        t.remote_port,
    )
    .0
}

/// `"local <-> remote"`, as logs and refusals show a flow.
pub fn describe(t: &FlowTuple) -> String {
    let (l, r) = addrs_of(t);
    format!("{l} <-> {r}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_round_trip_through_addresses() {
        for (l, r) in [
            ("127.0.0.1:5900", "127.0.0.2:40000"),
            ("[::1]:5900", "[fd00::2]:40000"),
        ] {
            let (l, r): (SocketAddr, SocketAddr) = (l.parse().unwrap(), r.parse().unwrap());
            assert_eq!(addrs_of(&tuple_of(l, r)), (l, r));
        }
    }

    #[test]
    fn ipv4_candidates_include_reverse_and_mapped_forms() {
        let l: SocketAddr = "10.0.0.1:5900".parse().unwrap();
        let r: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let c = candidate_tuples(l, r);
        assert_eq!(c.len(), 4);
        assert_eq!(c[1], c[0].reversed());
        assert_eq!(c[2].family, AF_INET6);
        assert_eq!(addrs_of(&c[2]), (l, r), "mapped addresses display as IPv4");
        assert_eq!(
            candidate_tuples("[::1]:1".parse().unwrap(), "[::1]:2".parse().unwrap()).len(),
            2
        );
    }
}
