//! `reaper-test-peer flood MODE ...`: a hostile local user, for the
//! `hostile` tests (run under the uid the test gives it):
//!
//! ```text
//! flood idle SOCKET N      hold N control connections open, send nothing
//! flood fds SOCKET N M     on N connections, send M messages of one byte and
//!                          16 descriptors each, never a newline
//! flood expect SOCKET N    on one connection, ask for N sessions that each
//!                          pre-register a connection (no socket needed)
//! flood flows PORT N       listen on 127.0.0.1:PORT and connect to it N times
//! ```
//!
//! Prints one `ready ...` line once done (idle, fds: the connections it got
//! and the descriptors the daemon took; expect: the grants it got and the
//! refusal codes it met; flows: the addresses of its last connection, from
//! the listener's side), then holds everything until stdin closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

pub fn main(args: &[String]) {
    raise_fd_limit();
    let arg = |i: usize| -> &str {
        args.get(i)
            .map_or_else(|| panic!("flood: missing argument {i}"), |s| s.as_str())
    };
    let number = |i: usize| -> usize {
        arg(i)
            .parse()
            .unwrap_or_else(|_| panic!("flood: {:?} is not a number", arg(i)))
    };
    let mut held_unix = Vec::new();
    let mut held_tcp = Vec::new();
    let ready = match arg(0) {
        "idle" => {
            held_unix = connect_many(arg(1), number(2));
            format!("ready {} 0", held_unix.len())
        }
        "fds" => {
            held_unix = connect_many(arg(1), number(2));
            let null = std::fs::File::open("/dev/null").unwrap();
            let fds = [null.as_raw_fd(); 16];
            let mut sent = 0;
            for s in &held_unix {
                for _ in 0..number(3) {
                    if send_with_fds(s, b" ", &fds).is_err() {
                        break;
                    }
                    sent += 16;
                }
            }
            format!("ready {} {sent}", held_unix.len())
        }
        "expect" => {
            let s = UnixStream::connect(arg(1)).expect("connect the control socket");
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let (mut granted, mut codes) = (0, std::collections::BTreeSet::new());
            for i in 0..number(2) {
                let request = serde_json::json!({
                    "op": "grant", "session": format!("flood-{}-{i}", std::process::id()),
                    "user": "u", "target": format!("t{i}"), "ttl": "1h",
                    "expect": [{"local": "127.0.0.1:0", "remote": format!("127.0.0.1:{}", 5901 + i % 98)}],
                });
                (&s).write_all(format!("{request}\n").as_bytes()).unwrap();
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
                if reply["ok"] == true {
                    granted += 1;
                } else {
                    codes.insert(reply["error"]["code"].as_str().unwrap_or("?").to_string());
                }
            }
            held_unix.push(s);
            format!(
                "ready {granted} {}",
                codes.into_iter().collect::<Vec<_>>().join(",")
            )
        }
        "flows" => {
            let listener = TcpListener::bind(("127.0.0.1", number(1) as u16)).unwrap();
            for _ in 0..number(2) {
                held_tcp.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
                held_tcp.push(listener.accept().unwrap().0);
            }
            let last = held_tcp.last().unwrap();
            format!(
                "ready {} {}",
                last.local_addr().unwrap(),
                last.peer_addr().unwrap()
            )
        }
        other => panic!("flood: unknown mode {other:?}"),
    };
    println!("{ready}");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop((held_unix, held_tcp));
}

/// Up to `n` connections to the control socket (fewer if one fails).
fn connect_many(path: &str, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map_while(|_| UnixStream::connect(path).ok())
        .collect()
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer, then in-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// One sendmsg of `bytes` with `fds`, waiting at most 0.2 s for room, like
/// a client with a send timeout (a daemon that stopped reading ends the
/// flood).
fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[i32]) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match crate::send_with_fds(sock, bytes, fds, libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other.map(|_| ()),
        }
    }
}
