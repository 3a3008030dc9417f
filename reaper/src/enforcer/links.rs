//! Interfaces that come and go: a NETLINK_ROUTE socket subscribed to link
//! events (RTMGRP_LINK), read with netlink-packet-route. Neutron, OVS and
//! libvirt delete and re-create the interfaces `[forward] interfaces`
//! names; the daemon re-attaches the forwarding program to each new one
//! (`Enforcer::attach_interface`) as soon as it appears.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::RouteNetlinkMessage;

/// What happened to a named interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// It exists (new, or changed) with this index.
    Present { name: String, index: u32 },
    /// It was deleted.
    Gone { name: String, index: u32 },
}

/// The subscribed socket (non-blocking).
pub struct LinkWatch {
    fd: OwnedFd,
}

impl AsFd for LinkWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl LinkWatch {
    pub fn open() -> io::Result<LinkWatch> {
        // SAFETY: plain syscalls; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_nl is valid; we set family and groups.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinkWatch { fd })
    }

    /// Every change read so far. An overrun (the kernel dropped events
    /// because the socket's buffer was full) is an `ENOBUFS` error: the
    /// caller then checks each interface itself.
    pub fn read(&self) -> io::Result<Vec<LinkChange>> {
        let mut changes = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(changes);
                }
                return Err(e);
            }
            changes.extend(parse(&buf[..n as usize]));
        }
    }
}

/// The link changes in one datagram (several netlink messages).
pub fn parse(mut data: &[u8]) -> Vec<LinkChange> {
    let mut changes = Vec::new();
    while data.len() >= 16 {
        let length = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if length < 16 || length > data.len() {
            break;
        }
        if let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..length]) {
            let (link, gone) = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => (l, false),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => (l, true),
                _ => {
                    data = &data[(length + 3) & !3..];
                    continue;
                }
            };
            let index = link.header.index;
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name {
                changes.push(if gone {
                    LinkChange::Gone { name, index }
                } else {
                    LinkChange::Present { name, index }
                });
            }
        }
        data = &data[((length + 3) & !3).min(data.len())..];
    }
    changes
}

/// The index of the interface called `name` now (None: there is none).
pub fn index_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::link::{LinkAttribute, LinkMessage};
    use netlink_packet_route::RouteNetlinkMessage;

    use super::*;

    fn message(index: u32, name: &str, gone: bool) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::IfName(name.into()));
        let inner = if gone {
            RouteNetlinkMessage::DelLink(link)
        } else {
            RouteNetlinkMessage::NewLink(link)
        };
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(inner));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    #[test]
    fn one_datagram_carries_several_changes() {
        let mut data = message(7, "ra", true);
        data.extend(message(9, "ra", false));
        assert_eq!(
            parse(&data),
            vec![
                LinkChange::Gone {
                    name: "ra".into(),
                    index: 7
                },
                LinkChange::Present {
                    name: "ra".into(),
                    index: 9
                },
            ]
        );
    }

    #[test]
    fn truncated_input_is_ignored() {
        let data = message(7, "ra", false);
        assert_eq!(parse(&data[..data.len() - 3]), vec![]);
        assert_eq!(parse(&[0xff; 40]), vec![]);
    }
}
