//! One control connection: reads request lines (with any socket descriptors
//! passed alongside them) and writes response lines.
//!
//! Descriptors arrive through SCM_RIGHTS attached to the bytes of the
//! `sendmsg` that carried them. We remember the stream offset at which each
//! batch arrived, so a request line gets exactly the descriptors that came
//! with its own bytes, even when a client pipelines several requests.
//!
//! Descriptors cost the daemon what it has least of, so they are bounded
//! before any request is read: a caller who may not change grants (and so
//! can use none) has its descriptors closed as they arrive; a line may
//! gather at most `MAX_FDS_PER_REQUEST`; all connections together hold at
//! most the `FdBudget`; truncated control data (MSG_CTRUNC: descriptors the
//! kernel dropped) is an error. Each of these closes the connection.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::protocol::{MAX_FDS_PER_REQUEST, MAX_LINE_BYTES};

/// A connection costs the daemon a task, a descriptor and at most one line
/// of buffer each way, whatever the client does: a client may stay idle
/// between requests for as long as it likes (proxies keep one connection
/// open), but a started request line must be finished, and a response
/// taken, within `timeout`, or the connection is closed. A client that
/// trickles a byte at a time is timed from its line's first byte.
pub struct Connection {
    stream: UnixStream,
    timeout: Duration,
    /// When the unfinished line at the end of `buf` began.
    partial_since: Option<Instant>,
    buf: Vec<u8>,
    /// Where the bytes not yet handed out start in `buf`: a line taken
    /// moves this, not the bytes after it (moving the rest of a 16 KiB read
    /// per pipelined line cost more than parsing the line). The bytes
    /// before it go at the next read.
    start: usize,
    /// Stream offset of `buf[start]`.
    offset: usize,
    /// (stream offset of the bytes they came with, descriptor)
    fds: VecDeque<(usize, OwnedFd)>,
    /// Responses not yet written: a client that pipelines gets them in as
    /// few writes as it sent requests in.
    out: Vec<u8>,
    /// Whether the caller may use descriptors at all (may change grants).
    takes_fds: bool,
    budget: Arc<FdBudget>,
    /// Why the descriptors that came last were refused.
    refused: Option<FdRefusal>,
}

/// Passed descriptors held by all connections together, against a bound.
pub struct FdBudget {
    held: AtomicUsize,
    max: usize,
}

impl FdBudget {
    pub fn new(max: usize) -> FdBudget {
        FdBudget {
            held: AtomicUsize::new(0),
            max,
        }
    }

    fn take(&self, n: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + n <= self.max).then_some(held + n)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Why descriptors that came with a request were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdRefusal {
    /// More than `MAX_FDS_PER_REQUEST` came with one line.
    TooMany,
    /// The kernel truncated the control data (some were dropped).
    Truncated,
    /// The daemon holds as many passed descriptors as it may.
    DaemonFull,
}

impl FdRefusal {
    pub fn message(self) -> String {
        match self {
            FdRefusal::TooMany => format!(
                "more than {MAX_FDS_PER_REQUEST} descriptors came with one request line"
            ),
            FdRefusal::Truncated => format!(
                "the control data of a message was truncated (more than {MAX_FDS_PER_REQUEST} descriptors in one sendmsg); some were lost"
            ),
            FdRefusal::DaemonFull => {
                "the daemon holds as many passed descriptors as it may; try again later".into()
            }
        }
    }
}

/// What reading the next request produced.
pub enum Incoming {
    Line {
        line: Vec<u8>,
        fds: Vec<OwnedFd>,
    },
    /// The client closed the connection (possibly mid-line).
    Closed {
        partial: bool,
    },
    /// The line grew past `MAX_LINE_BYTES`.
    TooLong,
    /// The client stopped in the middle of a line.
    Stalled,
    /// Descriptors that came were refused (and closed).
    Fds(FdRefusal),
}

impl Connection {
    /// A connection whose caller may (`takes_fds`) or may not pass
    /// descriptors, those it holds counted against `budget`.
    pub fn new(
        stream: UnixStream,
        timeout: Duration,
        takes_fds: bool,
        budget: Arc<FdBudget>,
    ) -> Connection {
        Connection {
            stream,
            timeout,
            partial_since: None,
            buf: Vec::with_capacity(4096),
            start: 0,
            offset: 0,
            fds: VecDeque::new(),
            out: Vec::new(),
            takes_fds,
            budget,
            refused: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether a whole request line is already buffered (the client
    /// pipelines): answers can wait for it and go out together.
    pub fn has_line(&self) -> bool {
        self.unread().contains(&b'\n')
    }

    /// What was read and not yet handed out.
    fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub async fn next(&mut self) -> io::Result<Incoming> {
        loop {
            if let Some(pos) = self.unread().iter().position(|b| *b == b'\n') {
                // Exactly MAX_LINE_BYTES, whatever the read sizes were.
                if pos > MAX_LINE_BYTES {
                    return Ok(Incoming::TooLong);
                }
                let end = self.offset + pos + 1;
                let mut fds = Vec::new();
                while let Some((at, _)) = self.fds.front() {
                    if *at >= end {
                        break;
                    }
                    let (at, fd) = self.fds.pop_front().expect("front exists");
                    self.budget.give_back(1);
                    if at >= self.offset {
                        fds.push(fd);
                    }
                }
                let mut line = self.unread()[..pos].to_vec();
                self.start += pos + 1;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                // What follows the line (pipelined) starts a new one now.
                self.partial_since = None;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.offset = end;
                return Ok(Incoming::Line { line, fds });
            }
            if self.unread().len() > MAX_LINE_BYTES {
                return Ok(Incoming::TooLong);
            }
            let read = if self.unread().is_empty() {
                self.partial_since = None;
                self.read_more().await?
            } else {
                let since = *self.partial_since.get_or_insert_with(Instant::now);
                match tokio::time::timeout_at(since + self.timeout, self.read_more()).await {
                    Ok(read) => read?,
                    Err(_) => return Ok(Incoming::Stalled),
                }
            };
            if let Some(why) = self.refused.take() {
                return Ok(Incoming::Fds(why));
            }
            if read == 0 {
                return Ok(Incoming::Closed {
                    partial: !self.unread().is_empty(),
                });
            }
        }
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        // The lines handed out go now, in one move.
        self.buf.drain(..self.start);
        self.start = 0;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            self.stream.readable().await?;
            let raw = self.stream.as_raw_fd();
            match self
                .stream
                .try_io(Interest::READABLE, || recv_with_fds(raw, &mut chunk))
            {
                Ok((n, fds, truncated)) => {
                    let at = self.offset + self.buf.len();
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.keep_fds(at, fds, truncated);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps descriptors that came at stream offset `at`, or closes them
    /// at once (dropping them) and notes why.
    fn keep_fds(&mut self, at: usize, fds: Vec<OwnedFd>, truncated: bool) {
        if truncated {
            self.refused = Some(FdRefusal::Truncated);
            return;
        }
        if fds.is_empty() || !self.takes_fds {
            return;
        }
        // Everything held is for the line still unfinished: a finished one
        // is handed out before more is read.
        if self.fds.len() + fds.len() > MAX_FDS_PER_REQUEST {
            self.refused = Some(FdRefusal::TooMany);
            return;
        }
        if !self.budget.take(fds.len()) {
            self.refused = Some(FdRefusal::DaemonFull);
            return;
        }
        self.fds.extend(fds.into_iter().map(|fd| (at, fd)));
    }

    /// Queues a response line; `flush` writes what is queued.
    pub fn queue(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
    }

    /// Writes the queued responses; a client that does not take them
    /// within the timeout is an error (the caller closes the connection).
    pub async fn flush(&mut self) -> io::Result<()> {
        let result =
            match tokio::time::timeout(self.timeout, self.stream.write_all(&self.out)).await {
                Ok(written) => written,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no response for the whole client_timeout",
                )),
            };
        self.out.clear();
        result
    }

    pub async fn send(&mut self, line: &str) -> io::Result<()> {
        self.queue(line);
        self.flush().await
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.budget.give_back(self.fds.len());
    }
}

/// `recvmsg` that also collects SCM_RIGHTS descriptors (close-on-exec),
/// and says whether the control data was truncated.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    const SPACE: usize = MAX_FDS_PER_REQUEST * std::mem::size_of::<RawFd>();
    // Room for one SCM_RIGHTS header plus MAX_FDS_PER_REQUEST descriptors.
    let mut control = [0u64; (SPACE + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr points at live buffers for the duration of the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // Exactly one request's worth: more is truncated (MSG_CTRUNC), which
    // the caller treats as an error.
    // SAFETY: CMSG_SPACE is arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(SPACE as u32) } as usize;
    debug_assert!(msg.msg_controllen <= std::mem::size_of_val(&control));
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with its macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, fds, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// `sendmsg` of `bytes` with `fds` (SCM_RIGHTS): a client's side, for
/// `replay` and the tests.
fn send_with_fds(
    sock: &std::os::unix::net::UnixStream,
    bytes: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let size = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = if fds.is_empty() {
        0
    } else {
        unsafe { libc::CMSG_SPACE(size) as usize }
    };
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr points at live buffers for the call; the cmsg macros
    // walk the control buffer sized for it.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Feeds `messages` (how many descriptors, the bytes) through a socket
/// pair into a connection and reads it to its end, checking what the
/// daemon relies on: no line carries more than `MAX_FDS_PER_REQUEST`
/// descriptors, a caller who may not use them gets none, and the budget
/// gets back every descriptor the connection held. For the fuzz target
/// (`fuzzing::descriptor_stream`).
pub(crate) fn replay(takes_fds: bool, budget: usize, messages: &[(usize, &[u8])]) {
    let (client, server) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    server.set_nonblocking(true).expect("non-blocking");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    for (n, bytes) in messages {
        // A full buffer ends the stream early, as a client's would.
        if send_with_fds(&client, bytes, &vec![null.as_raw_fd(); *n]).is_err() {
            break;
        }
    }
    drop(client);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let budget = Arc::new(FdBudget::new(budget));
        let stream = UnixStream::from_std(server).expect("tokio stream");
        let mut conn = Connection::new(stream, Duration::from_secs(5), takes_fds, budget.clone());
        while let Ok(Incoming::Line { fds, .. }) = conn.next().await {
            assert!(
                fds.len() <= MAX_FDS_PER_REQUEST,
                "{} descriptors",
                fds.len()
            );
            assert!(
                takes_fds || fds.is_empty(),
                "descriptors for a caller who cannot use them"
            );
        }
        drop(conn);
        assert_eq!(
            budget.held.load(Ordering::Relaxed),
            0,
            "descriptors not given back"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn first(bytes: Vec<u8>) -> Incoming {
        let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut client = client;
            let _ = client.write_all(&bytes);
        });
        server.set_nonblocking(true).unwrap();
        let server = UnixStream::from_std(server).unwrap();
        let budget = Arc::new(FdBudget::new(64));
        let mut conn = Connection::new(server, Duration::from_secs(5), true, budget);
        let incoming = conn.next().await.unwrap();
        drop(conn);
        writer.join().unwrap();
        incoming
    }

    #[tokio::test]
    async fn the_line_limit_is_exact() {
        // Before, a line that ended in the read that crossed the limit was
        // answered: up to about 80 KiB got through.
        let mut at_limit = vec![b'x'; MAX_LINE_BYTES];
        at_limit.push(b'\n');
        assert!(matches!(first(at_limit).await, Incoming::Line { .. }));
        let mut over = vec![b'x'; MAX_LINE_BYTES + 1];
        over.push(b'\n');
        assert!(matches!(first(over).await, Incoming::TooLong));
        let mut far_over = vec![b'x'; MAX_LINE_BYTES + 10_000];
        far_over.push(b'\n');
        assert!(matches!(first(far_over).await, Incoming::TooLong));
    }

    fn send_with_fds(sock: &std::os::unix::net::UnixStream, bytes: &[u8], n: usize) {
        super::send_with_fds(sock, bytes, &vec![0; n]).expect("sendmsg");
    }

    /// A connection over a socket pair, and the client's end.
    fn pair(
        takes_fds: bool,
        budget: usize,
    ) -> (Connection, std::os::unix::net::UnixStream, Arc<FdBudget>) {
        let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let budget = Arc::new(FdBudget::new(budget));
        let conn = Connection::new(
            UnixStream::from_std(server).unwrap(),
            Duration::from_secs(5),
            takes_fds,
            budget.clone(),
        );
        (conn, client, budget)
    }

    fn held(budget: &FdBudget) -> usize {
        budget.held.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_line_gets_the_descriptors_that_came_with_it_up_to_the_limit() {
        let (mut conn, client, budget) = pair(true, 64);
        send_with_fds(&client, b"{\"a\":", 8);
        send_with_fds(&client, b"1}\n", 8);
        let Incoming::Line { fds, .. } = conn.next().await.unwrap() else {
            panic!("a line")
        };
        assert_eq!(fds.len(), 16, "two batches of 8 make one request's 16");
        assert_eq!(held(&budget), 0, "handed out, no longer the connection's");
        drop(fds);
        // Before, batches kept coming until the daemon ran out of files.
        send_with_fds(&client, b"{", 16);
        send_with_fds(&client, b"\"", 1);
        assert!(matches!(
            conn.next().await.unwrap(),
            Incoming::Fds(FdRefusal::TooMany)
        ));
        drop(conn);
        assert_eq!(held(&budget), 0);
    }

    #[tokio::test]
    async fn truncated_control_data_is_an_error() {
        let (mut conn, client, budget) = pair(true, 64);
        send_with_fds(&client, b"{}\n", MAX_FDS_PER_REQUEST + 4);
        assert!(matches!(
            conn.next().await.unwrap(),
            Incoming::Fds(FdRefusal::Truncated)
        ));
        assert_eq!(held(&budget), 0);
    }

    #[tokio::test]
    async fn a_caller_who_cannot_grant_keeps_no_descriptor() {
        let (mut conn, client, budget) = pair(false, 64);
        send_with_fds(&client, b"{\"op\":", 16);
        // Held until the line ended, before: now closed as they come.
        assert_eq!(held(&budget), 0);
        send_with_fds(&client, b"1}\n", 16);
        let Incoming::Line { fds, .. } = conn.next().await.unwrap() else {
            panic!("a line")
        };
        assert!(fds.is_empty());
    }

    #[tokio::test]
    async fn descriptors_past_the_daemons_budget_are_refused() {
        let (mut a, client_a, budget) = pair(true, 20);
        let (client_b, server_b) = std::os::unix::net::UnixStream::pair().unwrap();
        server_b.set_nonblocking(true).unwrap();
        let mut b = Connection::new(
            UnixStream::from_std(server_b).unwrap(),
            Duration::from_secs(5),
            true,
            budget.clone(),
        );
        send_with_fds(&client_a, b"{", 16);
        send_with_fds(&client_b, b"{", 8);
        // a holds 16 of 20 while its line is unfinished...
        let _ = tokio::time::timeout(Duration::from_millis(50), a.next()).await;
        assert_eq!(held(&budget), 16);
        // ...so b's 8 do not fit.
        assert!(matches!(
            b.next().await.unwrap(),
            Incoming::Fds(FdRefusal::DaemonFull)
        ));
        drop(a);
        assert_eq!(held(&budget), 0);
    }
}
