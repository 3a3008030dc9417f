//! Connections the test process makes, and what the tests check about
//! them: alive both ways, reset, the socket table.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{boot_ns, bound};

/// A client connection made by the test process, with the server's view
/// of its addresses (what a proxy on the server side would register).
pub struct Conn {
    pub stream: TcpStream,
    /// The server's address (the watched port).
    pub server: SocketAddr,
    /// The client's address.
    pub client: SocketAddr,
}

impl Conn {
    pub fn connect(server: &str) -> Conn {
        let stream = TcpStream::connect(server).unwrap_or_else(|e| panic!("connect {server}: {e}"));
        stream.set_nodelay(true).unwrap();
        Conn {
            server: stream.peer_addr().unwrap(),
            client: stream.local_addr().unwrap(),
            stream,
        }
    }

    /// Connects from inside the named namespace `host` (a thread enters it
    /// to make the socket; the socket stays there).
    pub fn connect_from(host: &str, server: &str) -> Conn {
        let (host, server) = (host.to_string(), server.to_string());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/run/netns/{host}")).expect("open netns");
            use std::os::fd::AsRawFd;
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            Conn::connect(&server)
        })
        .join()
        .expect("connect thread")
    }

    /// The flow as the protocol names it, from the server socket's side.
    pub fn spec(&self) -> Value {
        json!({"local": self.server.to_string(), "remote": self.client.to_string()})
    }

    /// Sends bytes and reads the echo back: proves the flow alive both ways.
    /// A streaming peer's screen updates (`#` bytes) may come first or in
    /// between, depending on how fast the machine is: they are skipped.
    pub fn echo(&mut self) -> std::io::Result<()> {
        self.stream
            .set_read_timeout(Some(bound(Duration::from_secs(5))))?;
        self.stream.write_all(b"ping")?;
        let mut echoed: Vec<u8> = Vec::new();
        while echoed.len() < 4 {
            let mut buf = [0u8; 64];
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            echoed.extend(buf[..n].iter().filter(|b| **b != b'#'));
        }
        assert_eq!(echoed, b"ping");
        Ok(())
    }

    /// Blocks until the connection fails; returns the error and the boot
    /// time at which it was seen.
    pub fn wait_reset(&mut self, timeout: Duration) -> (std::io::Error, u64) {
        self.ends_within(timeout)
            .unwrap_or_else(|| panic!("connection {} still alive after {timeout:?}", self.client))
    }

    /// [`Conn::wait_reset`], but `None` when the connection is still alive
    /// after `timeout` (scaled): for a test that reports every survivor.
    pub fn ends_within(&mut self, timeout: Duration) -> Option<(std::io::Error, u64)> {
        self.stream.set_read_timeout(Some(bound(timeout))).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Some((
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                        boot_ns(),
                    ))
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) => return Some((e, boot_ns())),
            }
        }
    }
}

/// Asserts that an error is a connection reset (what a RST gives a client).
pub fn assert_reset(e: &std::io::Error) {
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ECONNRESET),
        "expected ECONNRESET, got {e:?}"
    );
}

/// Connects to `server` from a port bound first, so that the client's
/// address is known even when the connection is reset before `connect`
/// returns (a refusal can be that quick on a slow machine): the client
/// address, and the stream or `connect`'s error.
pub fn connect_bound(server: SocketAddrV4) -> (SocketAddr, std::io::Result<TcpStream>) {
    let (stream, client) = bind_client(*server.ip());
    (client, connect_from_bound(stream, server))
}

/// A TCP socket bound to an ephemeral port of `ip`, not yet connected:
/// its address can be granted before the connection exists.
pub fn bind_client(ip: Ipv4Addr) -> (TcpStream, SocketAddr) {
    use std::os::fd::FromRawFd;
    let local = sockaddr_in(SocketAddrV4::new(ip, 0));
    // SAFETY: a fresh descriptor, owned by the TcpStream right away; the
    // address is a live sockaddr_in of the length passed.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let rc = libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            SOCKADDR_IN_LEN,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        stream
    };
    let client = stream.local_addr().expect("bound address");
    (stream, client)
}

/// Connects a socket from [`bind_client`] to `server`.
pub fn connect_from_bound(stream: TcpStream, server: SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let remote = sockaddr_in(server);
    // SAFETY: a live socket, and a live sockaddr_in of the length passed.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            SOCKADDR_IN_LEN,
        )
    };
    if rc == 0 {
        Ok(stream)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

const SOCKADDR_IN_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Counts this network namespace's TCP sockets in `state` (hex, as in
/// /proc/net/tcp: 06 is TIME_WAIT, 0A is LISTEN).
pub fn count_tcp_state(state: &str) -> usize {
    // thread-self: the test thread's namespace, not the main thread's.
    ["tcp", "tcp6"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(3) == Some(state))
                .count()
        })
        .sum()
}

/// Waits until something in this namespace listens on TCP `port`, without
/// connecting to it (a one-shot server must keep its one connection).
pub fn wait_listening(port: u16, timeout: Duration) -> bool {
    let end = Instant::now() + bound(timeout);
    let hex = format!(":{port:04X} ");
    while Instant::now() < end {
        let listening = ["tcp", "tcp6"].iter().any(|f| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.get(3) == Some(&"0A")
                        && cols.get(1).is_some_and(|a| format!("{a} ").ends_with(&hex))
                })
        });
        if listening {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
