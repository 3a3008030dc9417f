//! `reaper-test-peer LISTEN_ADDR...`: the server side of the integration
//! tests, as a process of its own. It listens on every address, accepts
//! everything, echoes what it reads, and reports each event on stdout:
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

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

fn main() {
    let listeners: Vec<TcpListener> = std::env::args()
        .skip(1)
        .map(|a| {
            let l = TcpListener::bind(&a).unwrap_or_else(|e| panic!("bind {a}: {e}"));
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    let mut out = std::io::stdout();
    for l in &listeners {
        writeln!(out, "ready {}", l.local_addr().unwrap()).unwrap();
    }
    out.flush().unwrap();
    // fd -> (stream, peer address as seen at accept time)
    let mut conns: HashMap<i32, (TcpStream, String)> = HashMap::new();
    let stdin_fd = 0;
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(stdin_fd)
            .chain(listeners.iter().map(|l| l.as_raw_fd()))
            .chain(conns.keys().copied())
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        for p in fds.iter().filter(|p| p.revents != 0) {
            if p.fd == stdin_fd {
                let mut b = [0u8; 64];
                if unsafe { libc::read(0, b.as_mut_ptr().cast(), 64) } <= 0 {
                    return;
                }
            } else if let Some(l) = listeners.iter().find(|l| l.as_raw_fd() == p.fd) {
                while let Ok((s, peer)) = l.accept() {
                    s.set_nonblocking(true).unwrap();
                    writeln!(out, "accept {} {peer}", s.local_addr().unwrap()).unwrap();
                    conns.insert(s.as_raw_fd(), (s, peer.to_string()));
                }
            } else {
                let (s, peer) = conns.get_mut(&p.fd).expect("polled connection");
                let peer = peer.clone();
                let mut buf = [0u8; 4096];
                let end = match s.read(&mut buf) {
                    Ok(0) => Some("eof".to_string()),
                    Ok(n) => {
                        writeln!(out, "data {peer} {n}").unwrap();
                        let _ = s.write_all(&buf[..n]);
                        None
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                    Err(e) => Some(match e.raw_os_error() {
                        Some(libc::ECONNRESET) => "reset".into(),
                        Some(libc::ECONNABORTED) => "aborted".into(),
                        _ => format!("error:{e}"),
                    }),
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
