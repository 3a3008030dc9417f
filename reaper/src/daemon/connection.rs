//! One control connection: reads request lines (with any socket descriptors
//! passed alongside them) and writes response lines.
//!
//! Descriptors arrive through SCM_RIGHTS attached to the bytes of the
//! `sendmsg` that carried them. We remember the stream offset at which each
//! batch arrived, so a request line gets exactly the descriptors that came
//! with its own bytes, even when a client pipelines several requests.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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
    /// Stream offset of `buf[0]`.
    offset: usize,
    /// (stream offset of the bytes they came with, descriptor)
    fds: VecDeque<(usize, OwnedFd)>,
    /// Responses not yet written: a client that pipelines gets them in as
    /// few writes as it sent requests in.
    out: Vec<u8>,
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
}

impl Connection {
    pub fn new(stream: UnixStream, timeout: Duration) -> Connection {
        Connection {
            stream,
            timeout,
            partial_since: None,
            buf: Vec::with_capacity(4096),
            offset: 0,
            fds: VecDeque::new(),
            out: Vec::new(),
        }
    }

    /// Whether a whole request line is already buffered (the client
    /// pipelines): answers can wait for it and go out together.
    pub fn has_line(&self) -> bool {
        self.buf.contains(&b'\n')
    }

    pub async fn next(&mut self) -> io::Result<Incoming> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
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
                    if at >= self.offset {
                        fds.push(fd);
                    }
                }
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                // What follows the line (pipelined) starts a new one now.
                self.partial_since = None;
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.offset = end;
                return Ok(Incoming::Line { line, fds });
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Ok(Incoming::TooLong);
            }
            let read = if self.buf.is_empty() {
                self.partial_since = None;
                self.read_more().await?
            } else {
                let since = *self.partial_since.get_or_insert_with(Instant::now);
                match tokio::time::timeout_at(since + self.timeout, self.read_more()).await {
                    Ok(read) => read?,
                    Err(_) => return Ok(Incoming::Stalled),
                }
            };
            if read == 0 {
                return Ok(Incoming::Closed {
                    partial: !self.buf.is_empty(),
                });
            }
        }
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            self.stream.readable().await?;
            let raw = self.stream.as_raw_fd();
            match self
                .stream
                .try_io(Interest::READABLE, || recv_with_fds(raw, &mut chunk))
            {
                Ok((n, fds)) => {
                    let at = self.offset + self.buf.len();
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.fds.extend(fds.into_iter().map(|fd| (at, fd)));
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
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

/// `recvmsg` that also collects SCM_RIGHTS descriptors (close-on-exec).
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
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
    msg.msg_controllen = std::mem::size_of_val(&control);
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
    Ok((n as usize, fds))
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
        let mut conn = Connection::new(server, Duration::from_secs(5));
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
}
