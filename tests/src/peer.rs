//! A server process (`reaper-test-peer`) the tests connect to, and the
//! events it reports on its stdout.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use crate::{bound, peer_bin};

/// A server process (`reaper-test-peer`) and the events it reports.
pub struct Peer {
    child: Child,
    _stdin: ChildStdin,
    lines: Receiver<String>,
    seen: VecDeque<String>,
}

impl Peer {
    pub(crate) fn spawn(addrs: &[&str]) -> Peer {
        let mut cmd = Command::new(peer_bin());
        cmd.args(addrs);
        Peer::spawn_cmd(cmd, addrs.len())
    }

    pub(crate) fn spawn_cmd(mut cmd: Command, listeners: usize) -> Peer {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn reaper-test-peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut peer = Peer {
            child,
            _stdin: stdin,
            lines: rx,
            seen: VecDeque::new(),
        };
        for _ in 0..listeners {
            peer.expect(|l| l.starts_with("ready "), Duration::from_secs(10));
        }
        peer
    }

    /// Waits for a reported line matching `pred` and returns it; lines that
    /// do not match are kept for later calls.
    pub fn expect(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.try_expect(pred, bound(timeout))
            .unwrap_or_else(|| panic!("peer never reported the expected line; saw {:?}", self.seen))
    }

    /// Like [`Peer::expect`], but `None` when no such line comes within
    /// `timeout`. Not scaled: a test that expects nothing (a negative
    /// check) must not spend longer than it says, or a deadline it counts
    /// on may pass meanwhile.
    pub fn try_expect(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        if let Some(i) = self.seen.iter().position(|l| pred(l)) {
            return self.seen.remove(i);
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Some(line),
                Ok(line) => self.seen.push_back(line),
                Err(_) => return None,
            }
        }
    }

    /// The peer process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Forgets everything reported so far (and not yet matched).
    pub fn drain(&mut self) {
        self.seen.clear();
        while self.lines.try_recv().is_ok() {}
    }

    /// How the server side of the connection from `client` ended, if it has.
    pub fn wait_end(&mut self, client: SocketAddr, timeout: Duration) -> Option<String> {
        let prefix = format!("end {client} ");
        self.try_expect(|l| l.starts_with(&prefix), bound(timeout))
            .map(|l| l[prefix.len()..].to_string())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
