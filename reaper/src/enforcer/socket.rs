//! Reading what a passed socket descriptor is: its cookie and its addresses.
//! A proxy that hands us its socket (SCM_RIGHTS) needs to know nothing about
//! 4-tuples; the kernel tells us exactly which socket it is.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

pub use crate::kernel::SocketInfo;

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
