//! Reading what a passed socket descriptor is: its cookie and its addresses.
//! A proxy that hands us its socket (SCM_RIGHTS) needs to know nothing about
//! 4-tuples; the kernel tells us exactly which socket it is.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

use reaper_common::{FlowTuple, AF_INET, AF_INET6};

/// A TCP socket as seen through a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketInfo {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

fn getsockopt_raw<T: Copy + Default>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: value is a valid out-buffer of len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn sockaddr(fd: BorrowedFd<'_>, peer: bool) -> io::Result<SocketAddr> {
    // SAFETY: storage is large enough for any address; len tells the kernel so.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let ptr = (&mut storage as *mut libc::sockaddr_storage).cast();
    let rc = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), ptr, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), ptr, &mut len)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel filled a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { *(ptr as *const libc::sockaddr_in) };
            Ok(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel filled a sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { *(ptr as *const libc::sockaddr_in6) };
            Ok(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            ))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("address family {other} is not IPv4 or IPv6"),
        )),
    }
}

/// Inspects a descriptor; refuses anything but a connected TCP socket.
pub fn inspect(fd: BorrowedFd<'_>) -> Result<SocketInfo, String> {
    let sock_type: i32 = getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(|e| format!("not a socket ({e})"))?;
    let protocol: i32 = getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
        .map_err(|e| format!("cannot read its protocol ({e})"))?;
    if sock_type != libc::SOCK_STREAM || protocol != libc::IPPROTO_TCP {
        return Err("not a TCP socket".into());
    }
    let cookie: u64 = getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
        .map_err(|e| format!("cannot read its cookie ({e})"))?;
    let local = sockaddr(fd, false).map_err(|e| format!("cannot read its address ({e})"))?;
    let remote = sockaddr(fd, true).map_err(|e| format!("not connected ({e})"))?;
    Ok(SocketInfo {
        cookie,
        local,
        remote,
    })
}

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
