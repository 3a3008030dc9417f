//! The sock_diag netlink interface, for the two things reaper asks of it:
//!
//! * **destroy** (`SOCK_DESTROY`, what `ss -K` does): the kernel looks the
//!   socket up by its 4-tuple, checks the socket cookie we pass (so a socket
//!   that merely reuses the addresses is never touched), and calls
//!   `tcp_abort`: the local application gets `ECONNABORTED`, the peer a RST;
//! * **activity** (`SOCK_DIAG_BY_FAMILY` with `INET_DIAG_INFO`): the
//!   kernel's own per-socket times of the last data received and sent
//!   (`tcp_info`), so idle tracking costs nothing per packet.
//!
//! Requests for many sockets go out in as few `sendmsg` calls as possible,
//! one reply each. A netlink socket acts in the network namespace it was
//! created in, so one `SockDiag` serves the daemon's own namespace.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use reaper_common::FlowTuple;

use super::rst::Counters;
use super::sys::{send_to, set_option};
use crate::kernel::{DestroyOutcome, SocketRef};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
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
/// `struct inet_diag_msg`, before its attributes.
const DIAG_MSG_LEN: usize = 72;
const INET_DIAG_INFO: u16 = 2;
/// Offsets in `struct tcp_info` (append-only ABI).
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;
const TCPI_BYTES_SENT: usize = 200;
const TCPI_BYTES_RETRANS: usize = 208;
/// Requests per sendmsg. The kernel answers all of them before `sendmsg`
/// returns, and each ack occupies about 1 KiB of the receive buffer
/// (its skb, not its 36 bytes), so a batch's acks need ~512 KiB:
/// `RCVBUF` leaves room for four.
const BATCH: usize = 512;
/// Receive buffer asked for (SO_RCVBUFFORCE, as root). With the default
/// 208 KiB, a batch of 512 overflowed: the kernel destroyed every socket
/// but dropped half the acks (ENOBUFS).
const RCVBUF: i32 = 2 << 20;
/// Sends of the still-unanswered requests of a batch after an overflow,
/// before they are reported failed.
const ATTEMPTS: usize = 4;
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

/// What sock_diag tells about one socket: its state, how long ago it last
/// received and sent data (ms), and its byte counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub last_recv_ago_ms: u32,
    pub last_sent_ago_ms: u32,
    pub counters: Counters,
}

/// What sampling a socket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampled {
    Seen(Sample),
    /// No such socket (closed, or its namespace is gone).
    Gone,
    /// The request failed: no evidence either way.
    Unknown,
}

/// What a batch asks of each socket: message type, netlink flags and the
/// inet_diag extensions wanted.
#[derive(Clone, Copy)]
struct Ask {
    kind: u16,
    flags: u16,
    ext: u8,
}

const DESTROY: Ask = Ask {
    kind: SOCK_DESTROY,
    flags: NLM_F_REQUEST | NLM_F_ACK,
    ext: 0,
};

/// No NLM_F_ACK: a found socket answers with its info, a missing one with
/// an error, so there is exactly one reply either way.
const INFO: Ask = Ask {
    kind: SOCK_DIAG_BY_FAMILY,
    flags: NLM_F_REQUEST,
    ext: 1 << (INET_DIAG_INFO - 1),
};

/// One reply to one request.
enum Reply {
    /// NLMSG_ERROR: 0 for an ack, else an errno.
    Status(i32),
    /// A `SOCK_DIAG_BY_FAMILY` answer: the message after its netlink header.
    Info(Vec<u8>),
}

pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiag {
    pub fn open() -> io::Result<SockDiag> {
        // SAFETY: plain syscall; the descriptor is owned right below.
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
        set_option(fd.as_fd(), SOL_NETLINK, NETLINK_CAP_ACK, &1i32)?;
        // Room for a batch's replies; without CAP_NET_ADMIN, the plain
        // option (capped by rmem_max), and overflows are retried anyway.
        if set_option(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RCVBUF).is_err() {
            let _ = set_option(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &RCVBUF);
        }
        Ok(SockDiag { fd, seq: 1 })
    }

    /// The cookie of the network namespace this socket acts in.
    pub fn netns_cookie(&self) -> io::Result<u64> {
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SO_NETNS_COOKIE (71): supported on every socket since 5.14.
        // SAFETY: cookie is a valid out-buffer of len bytes.
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
    pub fn destroy(&mut self, targets: &[SocketRef]) -> io::Result<Vec<DestroyOutcome>> {
        let replies = self.exchange(targets, DESTROY)?;
        Ok(replies
            .into_iter()
            .map(|reply| match reply {
                Reply::Status(0) => DestroyOutcome::Destroyed,
                Reply::Status(libc::ENOENT | libc::ESTALE) => DestroyOutcome::Gone,
                Reply::Status(e) => DestroyOutcome::Failed(e),
                Reply::Info(_) => DestroyOutcome::Failed(libc::EPROTO),
            })
            .collect())
    }

    /// Whether this kernel destroys sockets on request: a destroy of a
    /// socket that cannot exist answers "no such socket" where the feature
    /// is built in (CONFIG_INET_DIAG_DESTROY), "not supported" where not.
    pub fn destroy_supported(&mut self) -> io::Result<bool> {
        let nothing = SocketRef {
            cookie: 0,
            tuple: FlowTuple {
                family: reaper_common::AF_INET,
                ..Default::default()
            },
            netns_cookie: 0,
        };
        match self.destroy(&[nothing])?[0] {
            DestroyOutcome::Failed(libc::EOPNOTSUPP) => Ok(false),
            _ => Ok(true),
        }
    }

    /// Reads each target's activity; `None` for a socket that is gone.
    pub fn activity(&mut self, targets: &[SocketRef]) -> io::Result<Vec<Option<Sample>>> {
        let replies = self.exchange(targets, INFO)?;
        Ok(replies
            .into_iter()
            .map(|reply| match reply {
                Reply::Info(msg) => parse_activity(&msg),
                Reply::Status(_) => None,
            })
            .collect())
    }

    /// Sends one request per target, in batches, and collects one reply per
    /// request, in order. A batch that fails as a whole (the socket itself
    /// erred) reports that errno for its targets; later batches still go.
    fn exchange(&mut self, targets: &[SocketRef], ask: Ask) -> io::Result<Vec<Reply>> {
        let mut replies = Vec::with_capacity(targets.len());
        // Read once a destroy, not once a batch.
        let backlog_max = (ask.kind == SOCK_DESTROY).then(backlog_max).flatten();
        for chunk in targets.chunks(BATCH) {
            if let Some(max) = backlog_max {
                wait_for_backlog_room(chunk.len(), max);
            }
            match self.exchange_batch(chunk, ask) {
                Ok(batch) => replies.extend(batch),
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    tracing::warn!("sock_diag batch of {} failed: {e}", chunk.len());
                    replies.extend(chunk.iter().map(|_| Reply::Status(errno)));
                }
            }
        }
        Ok(replies)
    }

    /// One batch. The kernel handles sock_diag requests synchronously, in
    /// `sendmsg`: once it returns, every reply is queued, or was dropped
    /// because the receive buffer overflowed. So the replies are drained
    /// without waiting, and the requests that got none are sent again (a
    /// second destroy of a socket the first one killed finds it gone).
    fn exchange_batch(&mut self, targets: &[SocketRef], ask: Ask) -> io::Result<Vec<Reply>> {
        let mut replies: Vec<Option<Reply>> = (0..targets.len()).map(|_| None).collect();
        let mut rbuf = vec![0u8; 64 * 1024];
        for _ in 0..ATTEMPTS {
            let unanswered: Vec<usize> = (0..targets.len())
                .filter(|i| replies[*i].is_none())
                .collect();
            if unanswered.is_empty() {
                break;
            }
            let first_seq = self.seq;
            self.seq = self.seq.wrapping_add(unanswered.len() as u32);
            let mut buf = Vec::with_capacity(unanswered.len() * MSG_LEN);
            for (k, i) in unanswered.iter().enumerate() {
                encode_request(
                    &mut buf,
                    ask,
                    first_seq.wrapping_add(k as u32),
                    &targets[*i],
                );
            }
            // SAFETY: a zeroed sockaddr_nl addresses the kernel.
            let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            addr.nl_family = libc::AF_NETLINK as u16;
            send_to(self.fd.as_fd(), &buf, &addr)?;
            loop {
                // SAFETY: rbuf is a live buffer of its length.
                let n = unsafe {
                    libc::recv(
                        self.fd.as_raw_fd(),
                        rbuf.as_mut_ptr().cast(),
                        rbuf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR | libc::ENOBUFS) => continue,
                        Some(libc::EAGAIN) => break,
                        _ => return Err(e),
                    }
                }
                for (seq, reply) in parse_replies(&rbuf[..n as usize]) {
                    let k = seq.wrapping_sub(first_seq) as usize;
                    if let Some(&i) = unanswered.get(k) {
                        replies[i].get_or_insert(reply);
                    }
                }
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.unwrap_or(Reply::Status(libc::ENOBUFS)))
            .collect())
    }
}

/// How long a destroy waits, at most, for room in its CPU's backlog
/// before each batch, in steps of `BACKLOG_STEP`.
const BACKLOG_WAIT: std::time::Duration = std::time::Duration::from_millis(20);
const BACKLOG_STEP: std::time::Duration = std::time::Duration::from_micros(200);

/// `netdev_max_backlog`: how many packets a CPU's input backlog holds.
fn backlog_max() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/core/netdev_max_backlog")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
}

/// Waits until this CPU's input backlog, which holds `max`, has room for
/// `rsts` more packets.
///
/// The RST a destroy sends to a peer on the same host goes through the
/// loopback into the destroying CPU's backlog (`netdev_max_backlog`, 1000
/// by default) and waits there for softirq work. Linux 6.1 leaves that
/// work to ksoftirqd once it is awake, and a destroying thread at the
/// real-time class keeps ksoftirqd off its CPU: the RSTs past the
/// backlog's room are dropped. Seen on 6.1 (qemu): 337 of 2000 clients
/// never got theirs, and `softnet_stat` counted 337 drops. Sleeping lets
/// ksoftirqd run. Where softirqs run inline (6.12 and later here) the
/// backlog is empty and this costs one read of `softnet_stat` a batch.
fn wait_for_backlog_room(rsts: usize, max: usize) {
    let waited = std::time::Instant::now();
    while backlog_len().is_some_and(|queued| queued + rsts > max) {
        if waited.elapsed() >= BACKLOG_WAIT {
            return;
        }
        std::thread::sleep(BACKLOG_STEP);
    }
}

/// Packets waiting in this CPU's backlog (`/proc/net/softnet_stat`: a row
/// per CPU, hex columns, the backlog's length 12th and the CPU's number
/// 13th), when the kernel says.
fn backlog_len() -> Option<usize> {
    // SAFETY: no arguments; returns the calling thread's CPU or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu).ok()?;
    let table = std::fs::read_to_string("/proc/net/softnet_stat").ok()?;
    backlog_of(&table, cpu)
}

/// The backlog length of CPU `cpu` in a `softnet_stat` table.
fn backlog_of(table: &str, cpu: usize) -> Option<usize> {
    table.lines().find_map(|row| {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let hex = |i: usize| cols.get(i).and_then(|c| usize::from_str_radix(c, 16).ok());
        (hex(12)? == cpu).then(|| hex(11)).flatten()
    })
}

/// Below this many sockets a destroy stays on the calling thread: starting
/// a thread costs about as much as a few dozen destroys.
const SPREAD_MIN: usize = 2 * BATCH;

/// Destroys `targets` on `first` and every `spare` socket at once, one
/// thread each, every thread taking the next batch of [`BATCH`] as it
/// finishes one (`take_batches`). The outcomes come back in the targets'
/// order; a batch whose socket failed as a whole reports that errno for
/// each of its targets.
pub fn destroy_spread(
    first: &mut SockDiag,
    spare: &mut [SockDiag],
    targets: &[SocketRef],
) -> Vec<DestroyOutcome> {
    let outcomes = |diag: &mut SockDiag, batch: &[SocketRef]| match diag.destroy(batch) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            tracing::warn!("sock_diag destroy of {} sockets failed: {e}", batch.len());
            vec![DestroyOutcome::Failed(errno); batch.len()]
        }
    };
    if spare.is_empty() || targets.len() < SPREAD_MIN {
        return outcomes(first, targets);
    }
    let lost = DestroyOutcome::Failed(libc::EIO);
    take_batches(first, spare, targets, BATCH, outcomes, lost)
}

/// Runs `work` over `items`, `batch` at a time, on the calling thread with
/// `first` and on one more thread for each of `helpers`: each takes the
/// next batch when it is done with its last. So a faster thread does more.
/// That matters here: the thread that calls it runs real-time during a
/// kill and the helpers do not, and measured at 100k on 2 cores, halves
/// fixed in advance took the calling thread 0.35-0.39 s and its helper
/// 0.66 s, which the kill waited for. The answers come back in the items'
/// order; a batch whose thread panicked answers `lost` for each item.
fn take_batches<W: Send, T: Sync, R: Clone + Send>(
    first: &mut W,
    helpers: &mut [W],
    items: &[T],
    batch: usize,
    work: impl Fn(&mut W, &[T]) -> Vec<R> + Sync,
    lost: R,
) -> Vec<R> {
    let batches: Vec<&[T]> = items.chunks(batch).collect();
    let next = AtomicUsize::new(0);
    // One thread's (batch number, answers), in the order it took them.
    let take = |worker: &mut W| {
        let mut done = Vec::new();
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(batch) = batches.get(k) else {
                return done;
            };
            done.push((k, work(worker, batch)));
        }
    };
    let mut by_batch: Vec<Option<Vec<R>>> = vec![None; batches.len()];
    std::thread::scope(|scope| {
        let helpers: Vec<_> = helpers
            .iter_mut()
            .map(|worker| scope.spawn(|| take(worker)))
            .collect();
        let mut done = take(first);
        for helper in helpers {
            // A helper that panicked leaves its batches unanswered.
            done.extend(helper.join().unwrap_or_default());
        }
        for (k, answers) in done {
            by_batch[k] = Some(answers);
        }
    });
    by_batch
        .into_iter()
        .zip(&batches)
        .flat_map(|(answers, batch)| answers.unwrap_or_else(|| vec![lost.clone(); batch.len()]))
        .collect()
}

/// Appends one request (nlmsghdr + inet_diag_req_v2) for one socket.
fn encode_request(buf: &mut Vec<u8>, ask: Ask, seq: u32, target: &SocketRef) {
    let t = &target.tuple;
    buf.extend_from_slice(&(MSG_LEN as u32).to_ne_bytes());
    buf.extend_from_slice(&ask.kind.to_ne_bytes());
    buf.extend_from_slice(&ask.flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
                                                // inet_diag_req_v2
    buf.push(t.family as u8);
    buf.push(libc::IPPROTO_TCP as u8);
    buf.push(ask.ext);
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

/// (sequence number, reply) of every message in a receive buffer.
fn parse_replies(mut data: &[u8]) -> Vec<(u32, Reply)> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
        if len < NLMSG_HDR || len > data.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= NLMSG_HDR + 4 {
            let error = i32::from_ne_bytes(data[16..20].try_into().unwrap());
            out.push((seq, Reply::Status(-error)));
        } else if kind == SOCK_DIAG_BY_FAMILY {
            out.push((seq, Reply::Info(data[NLMSG_HDR..len].to_vec())));
        }
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    out
}

/// The state and tcp_info of an `inet_diag_msg` and its attributes.
fn parse_activity(msg: &[u8]) -> Option<Sample> {
    let state = *msg.get(1)?;
    let mut attrs = msg.get(DIAG_MSG_LEN..)?;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_INFO {
            let info = &attrs[4..len];
            let word = |at: usize| {
                info.get(at..at + 4)
                    .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
            };
            // Older kernels report a shorter tcp_info: missing counters read as 0.
            let long = |at: usize| {
                info.get(at..at + 8)
                    .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap()))
            };
            return Some(Sample {
                last_sent_ago_ms: word(TCPI_LAST_DATA_SENT)?,
                last_recv_ago_ms: word(TCPI_LAST_DATA_RECV)?,
                counters: Counters {
                    state,
                    bytes_acked: long(TCPI_BYTES_ACKED),
                    bytes_received: long(TCPI_BYTES_RECEIVED),
                    bytes_sent: long(TCPI_BYTES_SENT),
                    bytes_retrans: long(TCPI_BYTES_RETRANS),
                },
            });
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpus_backlog_is_read_from_its_own_row() {
        // As 6.1 prints it: processed, dropped, squeezed, 6 unused,
        // received_rps, flow_limit, backlog length, CPU.
        let table = "000002e7 00000000 0000000a 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000010 00000000\n\
                     00001b09 00000151 0000003d 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 000003e8 00000001\n";
        assert_eq!(backlog_of(table, 0), Some(16));
        assert_eq!(backlog_of(table, 1), Some(1000));
        assert_eq!(backlog_of(table, 2), None, "no such CPU");
        assert_eq!(
            backlog_of("0 1 2\n", 0),
            None,
            "an older kernel's shorter rows"
        );
    }

    #[test]
    fn request_layout_matches_the_kernel_abi() {
        let target = SocketRef {
            cookie: 0x1122_3344_5566_7788,
            tuple: FlowTuple {
                family: reaper_common::AF_INET,
                local_port: 5900,
                remote_port: 40000,
                _pad: 0,
                local_addr: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
                remote_addr: [u32::from_ne_bytes([127, 0, 0, 2]), 0, 0, 0],
            },
            netns_cookie: 1,
        };
        let mut buf = Vec::new();
        encode_request(&mut buf, INFO, 9, &target);
        assert_eq!(buf.len(), MSG_LEN);
        assert_eq!(&buf[0..4], &(72u32).to_ne_bytes());
        assert_eq!(&buf[4..6], &20u16.to_ne_bytes(), "SOCK_DIAG_BY_FAMILY");
        assert_eq!(&buf[6..8], &1u16.to_ne_bytes(), "NLM_F_REQUEST, no ack");
        assert_eq!(&buf[8..12], &9u32.to_ne_bytes(), "seq");
        assert_eq!(buf[16], 2, "family");
        assert_eq!(buf[17], 6, "protocol");
        assert_eq!(buf[18], 2, "idiag_ext");
        assert_eq!(&buf[24..26], &5900u16.to_be_bytes(), "sport");
        assert_eq!(&buf[26..28], &40000u16.to_be_bytes(), "dport");
        assert_eq!(&buf[28..32], &[127, 0, 0, 1], "src");
        assert_eq!(&buf[44..48], &[127, 0, 0, 2], "dst");
        assert_eq!(&buf[64..68], &0x5566_7788u32.to_ne_bytes(), "cookie low");
        assert_eq!(&buf[68..72], &0x1122_3344u32.to_ne_bytes(), "cookie high");
        let mut destroy = Vec::new();
        encode_request(&mut destroy, DESTROY, 1, &target);
        assert_eq!(&destroy[4..6], &21u16.to_ne_bytes(), "SOCK_DESTROY");
        assert_eq!(
            &destroy[6..8],
            &5u16.to_ne_bytes(),
            "NLM_F_REQUEST | NLM_F_ACK"
        );
        assert_eq!(destroy[18], 0, "no extensions");
    }

    fn netlink(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn replies_carry_their_errno_or_activity() {
        let mut data = Vec::new();
        for (seq, err) in [(5u32, 0i32), (6, -libc::ENOENT)] {
            let mut payload = err.to_ne_bytes().to_vec();
            payload.extend_from_slice(&[0u8; 16]);
            data.extend(netlink(NLMSG_ERROR, seq, &payload));
        }
        let mut info = vec![0u8; 232];
        info[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8].copy_from_slice(&77u64.to_ne_bytes());
        info[TCPI_LAST_DATA_SENT..TCPI_LAST_DATA_SENT + 4].copy_from_slice(&1500u32.to_ne_bytes());
        info[TCPI_LAST_DATA_RECV..TCPI_LAST_DATA_RECV + 4].copy_from_slice(&250u32.to_ne_bytes());
        let mut msg = vec![0u8; DIAG_MSG_LEN];
        msg[1] = 1; // ESTABLISHED
        msg.extend_from_slice(&((4 + info.len()) as u16).to_ne_bytes());
        msg.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        msg.extend_from_slice(&info);
        data.extend(netlink(SOCK_DIAG_BY_FAMILY, 7, &msg));

        let replies = parse_replies(&data);
        assert_eq!(replies.len(), 3);
        assert!(matches!(replies[0], (5, Reply::Status(0))));
        assert!(matches!(replies[1], (6, Reply::Status(libc::ENOENT))));
        let (7, Reply::Info(body)) = &replies[2] else {
            panic!("third reply is not the diag message")
        };
        let expected = Sample {
            last_recv_ago_ms: 250,
            last_sent_ago_ms: 1500,
            counters: Counters {
                state: 1,
                bytes_received: 77,
                ..Default::default()
            },
        };
        assert_eq!(parse_activity(body), Some(expected));
        assert!(
            parse_replies(&data[..20]).is_empty(),
            "a truncated message is ignored"
        );
        assert_eq!(
            parse_activity(&msg[..DIAG_MSG_LEN]),
            None,
            "no attribute, no activity"
        );
    }

    /// A worker: its number, and the items it did.
    struct Worker {
        id: usize,
        did: Vec<u32>,
    }

    fn workers(n: usize) -> Vec<Worker> {
        (0..n)
            .map(|id| Worker {
                id,
                did: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn batches_go_to_whichever_thread_is_free_and_answers_keep_the_items_order() {
        let items: Vec<u32> = (0..1000).collect();
        let batches = items.len().div_ceil(64);
        let helper_batches = AtomicUsize::new(0);
        let mut all = workers(2);
        let (first, helpers) = all.split_at_mut(1);
        let answers = take_batches(
            &mut first[0],
            helpers,
            &items,
            64,
            |w: &mut Worker, batch: &[u32]| {
                if w.id == 0 {
                    // The calling thread is held at its first batch until
                    // the helper has done every other one.
                    while helper_batches.load(Ordering::Acquire) < batches - 1 {
                        std::thread::yield_now();
                    }
                } else {
                    helper_batches.fetch_add(1, Ordering::AcqRel);
                }
                w.did.extend_from_slice(batch);
                batch.iter().map(|i| (*i, w.id)).collect()
            },
            (u32::MAX, usize::MAX),
        );
        let order: Vec<u32> = answers.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, items, "one answer per item, in the items' order");
        assert_eq!(all[0].did.len(), 64, "the held thread did one batch");
        assert_eq!(
            all[1].did.len(),
            items.len() - 64,
            "the free one did the rest"
        );
        let by_first: Vec<u32> = answers
            .iter()
            .filter(|(_, id)| *id == 0)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(
            by_first, all[0].did,
            "each answer is from the thread that did the item"
        );
    }

    #[test]
    fn a_helper_that_panics_loses_only_its_batch() {
        let items: Vec<u32> = (0..10).collect();
        let helper_took = std::sync::atomic::AtomicBool::new(false);
        let mut all = workers(2);
        let (first, helpers) = all.split_at_mut(1);
        let answers = take_batches(
            &mut first[0],
            helpers,
            &items,
            2,
            |w: &mut Worker, batch: &[u32]| {
                if w.id == 1 {
                    helper_took.store(true, Ordering::Release);
                    panic!("helper fails on its first batch (expected by this test)");
                }
                while !helper_took.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                batch.to_vec()
            },
            u32::MAX,
        );
        assert_eq!(answers.len(), items.len());
        let lost: Vec<usize> = (0..items.len())
            .filter(|i| answers[*i] == u32::MAX)
            .collect();
        assert_eq!(lost.len(), 2, "one batch of two lost: {answers:?}");
        assert_eq!(lost[0] % 2, 0, "a whole batch");
        for (i, a) in answers.iter().enumerate() {
            assert!(*a == u32::MAX || *a == items[i], "item {i} answered {a}");
        }
    }
}
