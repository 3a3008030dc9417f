//! Many real flows for the mass-expiry and memory benchmarks: helper
//! processes (this binary, re-run) that hold the server and client ends.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use reaper_tests::Sandbox;

use crate::common::*;

/// Most flows one holder process keeps (two descriptors a flow are split
/// between a client holder and a server holder; the hard limit is 20000).
pub const FLOWS_PER_HOLDER: usize = 16_000;

/// `--hold-server PORT COUNT`: accepts connections on 127.0.0.1:PORT and
/// keeps them open, without reading, until killed; says "held" once it
/// has accepted COUNT. (A client can count a connection as established
/// while its last ACK was dropped at a full accept queue: the server end
/// exists only once it is accepted.)
pub fn hold_server(port: u16, count: usize) -> ! {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    // std listens with a backlog of 128: a burst of connects overflowed it,
    // and each dropped SYN cost its client a 1 s retransmit. Listening
    // again raises the backlog (to net.core.somaxconn at most).
    // SAFETY: listen(2) on a socket this process owns.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 65_535) };
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut held = Vec::new();
    loop {
        if let Ok((s, _)) = listener.accept() {
            held.push(s);
            if held.len() == count {
                println!("held");
                std::io::stdout().flush().unwrap();
            }
        }
    }
}

/// `--hold-clients PORT COUNT`: opens COUNT connections to 127.0.0.1:PORT,
/// prints their local ports on one line, then prints on a second line the
/// boot time at which each was seen to end (0: still open 60 s after the
/// first one ended). Nothing has to end before the benchmark gets to it,
/// however long the other helpers take to connect (up to 10 minutes).
pub fn hold_clients(port: u16, count: usize) -> ! {
    let streams: Vec<TcpStream> = (0..count)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let ports: Vec<String> = streams
        .iter()
        .map(|s| s.local_addr().unwrap().port().to_string())
        .collect();
    println!("{}", ports.join(" "));
    std::io::stdout().flush().unwrap();
    let ended =
        wait_all_ended_after_first(&streams, Duration::from_secs(600), Duration::from_secs(60));
    let ended: Vec<String> = ended.iter().map(|e| e.unwrap_or(0).to_string()).collect();
    println!("{}", ended.join(" "));
    std::process::exit(0)
}

/// `n` connections held by helper processes: (server port, client port)
/// of each, and the client holders' outputs to read end times from.
pub struct HeldFlows {
    pub flows: Vec<(u16, u16)>,
    holders: Vec<BufReader<std::process::ChildStdout>>,
}

/// A sandbox whose daemon watches the holders' ports (5900-5999) with
/// tables sized for `n` flows, and `n` held flows in it.
pub fn daemon_with_held_flows(name: &str, n: usize) -> (Sandbox, HeldFlows) {
    let mut sb = Sandbox::new(name);
    sb.write_config(&format!(
        "max_ttl = \"1d\"\nmax_flows = {}\nmax_sessions = {}\n[[watch]]\nports = \"5900-5999\"\nside = \"local\"\n",
        (n * 2).max(1024),
        (n * 2).max(1024)
    ));
    sb.start_daemon();
    let held = hold_flows(&mut sb, n);
    (sb, held)
}

pub fn hold_flows(sb: &mut Sandbox, n: usize) -> HeldFlows {
    let me = std::env::current_exe().unwrap();
    let procs = n.div_ceil(FLOWS_PER_HOLDER);
    let mut flows = Vec::with_capacity(n);
    let mut holders = Vec::new();
    for k in 0..procs {
        let port = 5900 + k as u16;
        let count = n / procs + usize::from(k < n % procs);
        let mut server = BufReader::new(sb.spawn(Command::new(&me).args([
            "--hold-server",
            &port.to_string(),
            &count.to_string(),
        ])));
        let mut ready = String::new();
        server.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready");
        let mut clients = BufReader::new(sb.spawn(Command::new(&me).args([
            "--hold-clients",
            &port.to_string(),
            &count.to_string(),
        ])));
        let mut line = String::new();
        clients.read_line(&mut line).unwrap();
        flows.extend(line.split_whitespace().map(|p| (port, p.parse().unwrap())));
        holders.push(clients);
        let mut held = String::new();
        server.read_line(&mut held).unwrap();
        assert_eq!(
            held.trim(),
            "held",
            "the server holder did not accept every connection"
        );
    }
    assert_eq!(flows.len(), n);
    HeldFlows { flows, holders }
}

impl HeldFlows {
    /// Boot time at which each client saw its connection end (None: it
    /// was still open when its holder gave up).
    pub fn ended(self) -> Vec<Option<u64>> {
        let mut all = Vec::with_capacity(self.flows.len());
        for mut h in self.holders {
            let mut line = String::new();
            h.read_line(&mut line).unwrap();
            all.extend(
                line.split_whitespace()
                    .map(|t| Some(t.parse::<u64>().unwrap()).filter(|t| *t != 0)),
            );
        }
        all
    }
}
