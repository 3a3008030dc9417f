//! `reaper-test-peer [stream:]LISTEN_ADDR...`: the server side of the
//! integration tests, as a process of its own. It listens on every address,
//! accepts everything, echoes what it reads, and reports each event on
//! stdout. On a `stream:` address it also sends 64 bytes every 50 ms to each
//! connection, like a console server sending screen updates:
//!
//! ```text
//! ready 127.0.0.1:5900
//! accept 127.0.0.1:5900 127.0.0.1:40312
//! data 127.0.0.1:40312 5
//! end 127.0.0.1:40312 reset
//! ```
//!
//! A single poll loop serves thousands of connections. It exits when its
//! stdin closes, so it never outlives the test that started it.
//!
//! `reaper-test-peer flood ...` is a hostile local user instead (`flood.rs`):
//! one binary, so that the VMs carry it too.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(50);

/// An accepted connection: its stream, the peer's address as seen at
/// accept time, and whether it gets the screen-update stream.
struct Conn {
    stream: TcpStream,
    peer: String,
    streaming: bool,
    /// The error a write met first. The kernel reports a reset once, to
    /// whichever call comes first: when that is a screen-update write, the
    /// next read only sees EOF, and this keeps what really happened.
    write_error: Option<std::io::Error>,
}

impl Conn {
    fn write(&mut self, data: &[u8]) {
        if let Err(e) = self.stream.write_all(data) {
            if e.kind() != ErrorKind::WouldBlock && self.write_error.is_none() {
                self.write_error = Some(e);
            }
        }
    }
}

/// How a connection ended, as reported on stdout.
fn ending(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::ECONNABORTED) => "aborted".into(),
        _ => format!("error:{e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("flood") {
        return reaper_tests::flood::main(&args[1..]);
    }
    // (listener, stream mode)
    let listeners: Vec<(TcpListener, bool)> = std::env::args()
        .skip(1)
        .map(|a| {
            let (addr, streaming) = match a.strip_prefix("stream:") {
                Some(addr) => (addr.to_string(), true),
                None => (a.clone(), false),
            };
            let l = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).unwrap();
            (l, streaming)
        })
        .collect();
    let mut out = std::io::stdout();
    for (l, _) in &listeners {
        writeln!(out, "ready {}", l.local_addr().unwrap()).unwrap();
    }
    out.flush().unwrap();
    let mut conns: HashMap<i32, Conn> = HashMap::new();
    let stdin_fd = 0;
    let mut next_tick = Instant::now() + TICK;
    loop {
        if Instant::now() >= next_tick {
            next_tick += TICK;
            for c in conns.values_mut().filter(|c| c.streaming) {
                c.write(&[b'#'; 64]);
            }
        }
        let mut fds: Vec<libc::pollfd> = std::iter::once(stdin_fd)
            .chain(listeners.iter().map(|(l, _)| l.as_raw_fd()))
            .chain(conns.keys().copied())
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait_ms = next_tick
            .saturating_duration_since(Instant::now())
            .as_millis() as i32;
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            continue;
        }
        for p in fds.iter().filter(|p| p.revents != 0) {
            if p.fd == stdin_fd {
                let mut b = [0u8; 64];
                if unsafe { libc::read(0, b.as_mut_ptr().cast(), 64) } <= 0 {
                    return;
                }
            } else if let Some((l, streaming)) =
                listeners.iter().find(|(l, _)| l.as_raw_fd() == p.fd)
            {
                while let Ok((s, peer)) = l.accept() {
                    s.set_nonblocking(true).unwrap();
                    writeln!(out, "accept {} {peer}", s.local_addr().unwrap()).unwrap();
                    let conn = Conn {
                        peer: peer.to_string(),
                        streaming: *streaming,
                        stream: s,
                        write_error: None,
                    };
                    conns.insert(conn.stream.as_raw_fd(), conn);
                }
            } else {
                let conn = conns.get_mut(&p.fd).expect("polled connection");
                let peer = conn.peer.clone();
                let mut buf = [0u8; 4096];
                let end = match conn.stream.read(&mut buf) {
                    Ok(0) => Some(conn.write_error.as_ref().map_or("eof".into(), ending)),
                    Ok(n) => {
                        writeln!(out, "data {peer} {n}").unwrap();
                        conn.write(&buf[..n]);
                        None
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                    Err(e) => Some(ending(&e)),
                };
                if let Some(how) = end {
                    writeln!(out, "end {peer} {how}").unwrap();
                    conns.remove(&p.fd);
                }
            }
        }
        out.flush().unwrap();
    }
}
