//! Socket destroy through netlink `SOCK_DESTROY` (what `ss -K` does).
//!
//! The kernel looks the socket up by its 4-tuple, checks the socket cookie we
//! pass (so a socket that merely reuses the addresses is never touched), and
//! calls `tcp_abort`: the local application gets `ECONNABORTED`, the peer a
//! RST. Everything due at the same instant goes out in as few `sendmsg` calls
//! as possible: many requests per netlink message buffer, one ack each.
//!
//! A netlink socket acts in the network namespace it was created in, so one
//! `Destroyer` serves the daemon's own namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use reaper_common::FlowTuple;

const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: 8 bytes of header, then `inet_diag_sockid` (48).
const REQ_LEN: usize = 56;
const MSG_LEN: usize = NLMSG_HDR + REQ_LEN;
/// Requests per sendmsg: 512 × 72 B stays far below the socket buffers, and
/// their acks (36 B each) fit the default receive buffer.
const BATCH: usize = 512;
/// TCP states a console flow can be in while it still carries data; listeners,
/// TIME_WAIT and request sockets are never asked for.
const LIVE_STATES: u32 = (1 << 1) // ESTABLISHED
    | (1 << 2) // SYN_SENT
    | (1 << 3) // SYN_RECV
    | (1 << 4) // FIN_WAIT1
    | (1 << 5) // FIN_WAIT2
    | (1 << 8) // CLOSE_WAIT
    | (1 << 9) // LAST_ACK
    | (1 << 11); // CLOSING

/// One socket to destroy.
#[derive(Debug, Clone, Copy)]
pub struct DestroyTarget {
    pub cookie: u64,
    pub tuple: FlowTuple,
}

/// What the kernel said about one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestroyOutcome {
    /// Aborted: the peer got a RST.
    Destroyed,
    /// No such socket (it closed on its own), or the addresses now belong to
    /// another socket (cookie mismatch): nothing was touched.
    Gone,
    /// The kernel refused (errno); the in-kernel drop stays in force.
    Failed(i32),
}

pub struct Destroyer {
    fd: OwnedFd,
    seq: u32,
}

impl Destroyer {
    pub fn open() -> io::Result<Destroyer> {
        // SAFETY: plain syscalls on a descriptor we own.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Acks without the echoed request keep the replies small.
        setsockopt_int(&fd, SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        // A kernel that never answers must not hang the daemon.
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Destroyer { fd, seq: 1 })
    }

    /// The cookie of the network namespace this destroyer acts in.
    pub fn netns_cookie(&self) -> io::Result<u64> {
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SO_NETNS_COOKIE (71): supported on every socket since 5.14.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                71,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }

    /// Destroys every target; the outcomes come back in the same order.
    pub fn destroy(&mut self, targets: &[DestroyTarget]) -> io::Result<Vec<DestroyOutcome>> {
        let mut outcomes = Vec::with_capacity(targets.len());
        for chunk in targets.chunks(BATCH) {
            outcomes.extend(self.destroy_batch(chunk)?);
        }
        Ok(outcomes)
    }

    fn destroy_batch(&mut self, targets: &[DestroyTarget]) -> io::Result<Vec<DestroyOutcome>> {
        let first_seq = self.seq;
        self.seq = self.seq.wrapping_add(targets.len() as u32);
        let mut buf = Vec::with_capacity(targets.len() * MSG_LEN);
        for (i, target) in targets.iter().enumerate() {
            encode_request(&mut buf, first_seq.wrapping_add(i as u32), target);
        }
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }

        let mut outcomes: Vec<Option<DestroyOutcome>> = vec![None; targets.len()];
        let mut pending = targets.len();
        let mut rbuf = vec![0u8; 64 * 1024];
        while pending > 0 {
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), rbuf.as_mut_ptr().cast(), rbuf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for (seq, errno) in parse_acks(&rbuf[..n as usize]) {
                let index = seq.wrapping_sub(first_seq) as usize;
                if let Some(slot @ None) = outcomes.get_mut(index) {
                    *slot = Some(match errno {
                        0 => DestroyOutcome::Destroyed,
                        libc::ENOENT | libc::ESTALE => DestroyOutcome::Gone,
                        e => DestroyOutcome::Failed(e),
                    });
                    pending -= 1;
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every seq acked"))
            .collect())
    }
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Appends one `SOCK_DESTROY` request (nlmsghdr + inet_diag_req_v2).
fn encode_request(buf: &mut Vec<u8>, seq: u32, target: &DestroyTarget) {
    let t = &target.tuple;
    buf.extend_from_slice(&(MSG_LEN as u32).to_ne_bytes());
    buf.extend_from_slice(&SOCK_DESTROY.to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
                                                // inet_diag_req_v2
    buf.push(t.family as u8);
    buf.push(libc::IPPROTO_TCP as u8);
    buf.push(0); // idiag_ext
    buf.push(0); // pad
    buf.extend_from_slice(&LIVE_STATES.to_ne_bytes());
    // inet_diag_sockid: ports big-endian, addresses as the kernel gave them.
    buf.extend_from_slice(&t.local_port.to_be_bytes());
    buf.extend_from_slice(&t.remote_port.to_be_bytes());
    for word in t.local_addr.iter().chain(t.remote_addr.iter()) {
        buf.extend_from_slice(&word.to_ne_bytes());
    }
    buf.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if
    buf.extend_from_slice(&(target.cookie as u32).to_ne_bytes());
    buf.extend_from_slice(&((target.cookie >> 32) as u32).to_ne_bytes());
}

/// (sequence number, errno) of every `NLMSG_ERROR` ack in a receive buffer.
fn parse_acks(mut data: &[u8]) -> Vec<(u32, i32)> {
    let mut acks = Vec::new();
    while data.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
        if len < NLMSG_HDR || len > data.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= NLMSG_HDR + 4 {
            let error = i32::from_ne_bytes(data[16..20].try_into().unwrap());
            acks.push((seq, -error));
        }
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    acks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_the_kernel_abi() {
        let target = DestroyTarget {
            cookie: 0x1122_3344_5566_7788,
            tuple: FlowTuple {
                family: reaper_common::AF_INET,
                local_port: 5900,
                remote_port: 40000,
                _pad: 0,
                local_addr: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
                remote_addr: [u32::from_ne_bytes([127, 0, 0, 2]), 0, 0, 0],
            },
        };
        let mut buf = Vec::new();
        encode_request(&mut buf, 9, &target);
        assert_eq!(buf.len(), MSG_LEN);
        assert_eq!(&buf[0..4], &(72u32).to_ne_bytes());
        assert_eq!(&buf[4..6], &21u16.to_ne_bytes());
        assert_eq!(buf[16], 2, "family");
        assert_eq!(buf[17], 6, "protocol");
        assert_eq!(&buf[24..26], &5900u16.to_be_bytes(), "sport");
        assert_eq!(&buf[26..28], &40000u16.to_be_bytes(), "dport");
        assert_eq!(&buf[28..32], &[127, 0, 0, 1], "src");
        assert_eq!(&buf[44..48], &[127, 0, 0, 2], "dst");
        assert_eq!(&buf[64..68], &0x5566_7788u32.to_ne_bytes(), "cookie low");
        assert_eq!(&buf[68..72], &0x1122_3344u32.to_ne_bytes(), "cookie high");
    }

    #[test]
    fn acks_are_parsed_with_their_errno() {
        let mut data = Vec::new();
        for (seq, err) in [(5u32, 0i32), (6, -libc::ENOENT)] {
            data.extend_from_slice(&36u32.to_ne_bytes());
            data.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            data.extend_from_slice(&0u16.to_ne_bytes());
            data.extend_from_slice(&seq.to_ne_bytes());
            data.extend_from_slice(&0u32.to_ne_bytes());
            data.extend_from_slice(&err.to_ne_bytes());
            data.extend_from_slice(&[0u8; 16]);
        }
        assert_eq!(parse_acks(&data), vec![(5, 0), (6, libc::ENOENT)]);
        assert_eq!(
            parse_acks(&data[..20]),
            vec![],
            "a truncated message is ignored"
        );
    }
}
