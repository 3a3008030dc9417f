//! The floor under a mass expiry: the same sockets destroyed by a bare
//! batched SOCK_DESTROY loop, no daemon, on one thread or on one thread
//! per core. Whatever reaper does per killed flow beyond the destroy itself
//! shows as its distance from this.
//!
//! Written here from the netlink ABI rather than with reaper's own sock_diag
//! code, so that the floor does not inherit that code's costs. The requests
//! are encoded before the clock starts; each thread has its own netlink
//! socket (a socket acts in the namespace it was made in: the threads are
//! spawned inside the benchmark's sandbox).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use reaper_tests::boot_ns;

const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
/// nlmsghdr (16) + inet_diag_req_v2 (56).
const MSG_LEN: usize = 72;
/// Requests per sendmsg, as reaper sends them.
const BATCH: usize = 512;
const ESTABLISHED: u32 = 1 << 1;

fn netlink_socket() -> OwnedFd {
    // SAFETY: plain syscalls; the descriptor is owned at once.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        assert!(
            fd >= 0,
            "netlink socket: {}",
            std::io::Error::last_os_error()
        );
        let one: i32 = 1;
        let rcvbuf: i32 = 2 << 20;
        let opt = |level, name, v: &i32| {
            libc::setsockopt(fd, level, name, (v as *const i32).cast(), 4);
        };
        opt(SOL_NETLINK, NETLINK_CAP_ACK, &one);
        opt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf);
        OwnedFd::from_raw_fd(fd)
    }
}

/// One SOCK_DESTROY request for the loopback socket 127.0.0.1:`local` ↔
/// 127.0.0.1:`remote`, any cookie.
fn encode(buf: &mut Vec<u8>, seq: u32, local: u16, remote: u16) {
    let loopback = u32::from_ne_bytes([127, 0, 0, 1]);
    buf.extend_from_slice(&(MSG_LEN as u32).to_ne_bytes());
    buf.extend_from_slice(&SOCK_DESTROY.to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    buf.extend_from_slice(&ESTABLISHED.to_ne_bytes());
    buf.extend_from_slice(&local.to_be_bytes());
    buf.extend_from_slice(&remote.to_be_bytes());
    for word in [loopback, 0, 0, 0, loopback, 0, 0, 0] {
        buf.extend_from_slice(&word.to_ne_bytes());
    }
    buf.extend_from_slice(&0u32.to_ne_bytes()); // interface
    buf.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
}

/// Destroys each batch and waits for its acks; returns how many acked 0,
/// and the errno of each that did not.
fn destroy_all(fd: &OwnedFd, batches: &[Vec<u8>]) -> (usize, Vec<i32>) {
    let mut destroyed = 0;
    let mut refused = Vec::new();
    let mut rbuf = vec![0u8; 256 * 1024];
    for batch in batches {
        let mut expected = batch.len() / MSG_LEN;
        // SAFETY: a zeroed sockaddr_nl addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buffers live for the calls.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                batch.as_ptr().cast(),
                batch.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        assert_eq!(sent as usize, batch.len(), "sendto");
        // The kernel answered every request inside sendto: drain.
        while expected > 0 {
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    rbuf.as_mut_ptr().cast(),
                    rbuf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            let mut data = &rbuf[..n as usize];
            while data.len() >= 20 {
                let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
                let error = i32::from_ne_bytes(data[16..20].try_into().unwrap());
                match error {
                    0 => destroyed += 1,
                    e => refused.push(-e),
                }
                expected -= 1;
                data = &data[len.max(20).min(data.len())..];
            }
        }
    }
    (destroyed, refused)
}

/// Destroys the server ends of `flows` ((server port, client port), all on
/// loopback) with `threads` threads, each its own share. Returns the boot
/// time at which the first request was sent, how many were destroyed, and
/// the errnos of those the kernel refused.
pub fn destroy_floor(flows: &[(u16, u16)], threads: usize) -> (u64, usize, Vec<i32>) {
    let share = flows.len().div_ceil(threads);
    let work: Vec<(OwnedFd, Vec<Vec<u8>>)> = flows
        .chunks(share)
        .map(|mine| {
            let batches = mine
                .chunks(BATCH)
                .map(|chunk| {
                    let mut buf = Vec::with_capacity(chunk.len() * MSG_LEN);
                    for (seq, (server, client)) in chunk.iter().enumerate() {
                        encode(&mut buf, seq as u32, *server, *client);
                    }
                    buf
                })
                .collect();
            (netlink_socket(), batches)
        })
        .collect();
    let start = boot_ns();
    let (destroyed, refused) = std::thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .map(|(fd, batches)| s.spawn(move || destroy_all(fd, batches)))
            .collect();
        handles
            .into_iter()
            .fold((0, Vec::new()), |(n, mut errs), h| {
                let (d, e) = h.join().unwrap();
                errs.extend(e);
                (n + d, errs)
            })
    });
    (start, destroyed, refused)
}

/// The floor under kill latency at scale: the server end of each of
/// `flows` destroyed at its own deadline (`deadlines`, boot times, in the
/// flows' order) by a bare loop, no daemon: sleep until the next deadline,
/// then one batch of requests for every flow due by then. Returns the
/// errnos of the destroys the kernel refused.
pub fn destroy_at_deadlines(flows: &[(u16, u16)], deadlines: &[u64]) -> Vec<i32> {
    let fd = netlink_socket();
    let mut order: Vec<usize> = (0..flows.len()).collect();
    order.sort_by_key(|&i| deadlines[i]);
    let mut refused = Vec::new();
    let mut next = 0;
    let mut buf = Vec::with_capacity(BATCH * MSG_LEN);
    while next < order.len() {
        let at = deadlines[order[next]];
        let ts = libc::timespec {
            tv_sec: (at / 1_000_000_000) as libc::time_t,
            tv_nsec: (at % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: ts lives for the call; no remainder is asked for.
        unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_BOOTTIME,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        let now = boot_ns();
        buf.clear();
        let mut seq = 0;
        while next < order.len() && deadlines[order[next]] <= now && seq < BATCH as u32 {
            let (server, client) = flows[order[next]];
            encode(&mut buf, seq, server, client);
            seq += 1;
            next += 1;
        }
        refused.extend(destroy_all(&fd, std::slice::from_ref(&buf)).1);
    }
    refused
}
