//! The sandbox every integration test builds: its own network namespace,
//! cgroup, pin directory, control socket and audit file, the real daemon,
//! and the peers and hosts the test asks for. It is the guards of `guards`
//! and `daemon` put together; dropped (also on a panic), each undoes its
//! part, the daemon first and the files last.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::{Control, Daemon};
use crate::guards::{Cgroup, Children, Hosts, Netns, Pins, ScratchDir};
use crate::{bound, check, peer_bin, reaper_bin, Conn, Peer, PREFIX};

pub struct Sandbox {
    pub name: String,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub audit_path: PathBuf,
    control: Control,
    // Dropped in this order: processes first, then what they used.
    daemon: Option<Daemon>,
    peers: Vec<Peer>,
    children: Children,
    hosts: Hosts,
    _cgroup: Cgroup,
    _pins: Pins,
    _scratch: ScratchDir,
    _netns: Netns,
}

impl Sandbox {
    /// Enters a fresh network namespace and cgroup. `name` must be unique
    /// among tests (the test's own name is).
    pub fn new(name: &str) -> Sandbox {
        assert_eq!(unsafe { libc::geteuid() }, 0, "integration tests need root");
        let unique = format!("{PREFIX}{}-{name}", std::process::id());
        raise_fd_limit();
        let netns = Netns::enter();
        let cgroup = Cgroup::enter(&unique);
        let pins = Pins::new(&unique);
        let scratch = ScratchDir::new(&unique);
        let dir = scratch.path.clone();
        let sandbox = Sandbox {
            name: unique,
            cgroup: cgroup.path.clone(),
            pin_path: pins.path.clone(),
            socket: dir.join("reaper.sock"),
            config_path: dir.join("reaper.toml"),
            audit_path: dir.join("audit.jsonl"),
            control: Control {
                socket: dir.join("reaper.sock"),
            },
            dir,
            daemon: None,
            peers: Vec::new(),
            children: Children::default(),
            hosts: Hosts::default(),
            _cgroup: cgroup,
            _pins: pins,
            _scratch: scratch,
            _netns: netns,
        };
        sandbox.write_config("[[watch]]\nports = \"5900-5999\"\nside = \"local\"\n");
        sandbox
    }

    /// Puts the control socket at `path` (for the next `write_config`).
    pub fn move_socket(&mut self, path: PathBuf) {
        self.control.socket = path.clone();
        self.socket = path;
    }

    /// Writes the config: the sandbox's own paths plus `extra` TOML.
    pub fn write_config(&self, extra: &str) {
        let text = format!(
            "socket = {:?}\npin_path = {:?}\ncgroup = {:?}\naudit_file = {:?}\n{extra}",
            self.socket, self.pin_path, self.cgroup, self.audit_path
        );
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Starts `reaper daemon` and waits until its control socket answers.
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        let log = self.dir.join("daemon.log");
        self.daemon = Some(Daemon::start(&self.config_path, &self.socket, &log));
    }

    /// Starts the daemon as `command` (see [`Daemon::start_as`]).
    pub fn start_daemon_as(&mut self, command: Command) {
        assert!(self.daemon.is_none(), "daemon already running");
        let log = self.dir.join("daemon.log");
        self.daemon = Some(Daemon::start_as(
            command,
            &self.config_path,
            &self.socket,
            &log,
        ));
    }

    /// Stops the daemon with `signal` and waits for it to exit.
    pub fn stop_daemon(&mut self, signal: i32) {
        self.daemon.take().expect("daemon running").stop(signal);
    }

    /// Sends `signal` to the daemon (SIGSTOP and SIGCONT, to take it out
    /// of a measurement and back).
    pub fn signal_daemon(&self, signal: i32) {
        self.daemon.as_ref().expect("daemon running").signal(signal);
    }

    /// Sends SIGHUP (reload the config) to the daemon.
    pub fn hangup(&self) {
        self.daemon
            .as_ref()
            .expect("daemon running")
            .signal(libc::SIGHUP);
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A request with descriptors (see [`Control::request_with_fds`]).
    pub fn request_with_fds(&self, req: Value, fds: &[std::os::fd::RawFd]) -> Value {
        self.control.request_with_fds(req, fds)
    }

    /// One raw protocol exchange (see [`Control::raw`]).
    pub fn raw(&self, line: &str) -> Value {
        self.control.raw(line)
    }

    pub fn request(&self, req: Value) -> Value {
        self.control.request(req)
    }

    /// A request that must succeed; returns its result.
    pub fn ok(&self, req: Value) -> Value {
        self.control.ok(req)
    }

    /// Grants one flow (named by the server's view of it) for `ttl`.
    pub fn grant(&self, session: &str, user: &str, target: &str, ttl: &str, flow: &Conn) -> Value {
        self.ok(
            json!({"op": "grant", "session": session, "user": user, "target": target,
                       "ttl": ttl, "flows": [flow.spec()]}),
        )
    }

    /// Runs the `reaper` CLI against this sandbox's daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(reaper_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run reaper CLI")
    }

    /// Runs the `reaper` CLI as another user (gid = uid), the way an
    /// unprivileged proxy would call the daemon.
    pub fn cli_as(&self, uid: u32, args: &[&str]) -> Output {
        use std::os::unix::process::CommandExt;
        Command::new(reaper_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .uid(uid)
            .gid(uid)
            .output()
            .expect("run reaper CLI")
    }

    /// The kill events written so far. A line the daemon is still writing
    /// (no newline yet) is not an event yet.
    pub fn audit(&self) -> Vec<Value> {
        self.audit_trail()
            .into_iter()
            .filter(|e| e["event"] == "kill")
            .collect()
    }

    /// Every audit event written so far: kills, grants, extends, revokes.
    pub fn audit_trail(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// Waits until the audit file holds at least `n` kill events (for
    /// `timeout` scaled by [`time_scale`], like every wait here).
    pub fn wait_audit(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let end = Instant::now() + bound(timeout);
        loop {
            let events = self.audit();
            if events.len() >= n || Instant::now() > end {
                return events;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a peer (server) process listening on `addrs`.
    pub fn peer(&mut self, addrs: &[&str]) -> usize {
        let peer = Peer::spawn(addrs);
        self.peers.push(peer);
        self.peers.len() - 1
    }

    /// Whether bytes written on `stream` (a client socket at `client`) reach
    /// peer `index` within a second: the check that a dropped flow carries
    /// nothing.
    pub fn delivers(&mut self, index: usize, stream: &mut TcpStream, client: SocketAddr) -> bool {
        self.peer_mut(index).drain();
        if stream.write_all(b"ping").is_err() {
            return false;
        }
        let from = format!("data {client} ");
        self.peer_mut(index)
            .try_expect(|l| l.starts_with(&from), Duration::from_secs(1))
            .is_some()
    }

    pub fn peer_mut(&mut self, index: usize) -> &mut Peer {
        &mut self.peers[index]
    }

    /// Makes another host: a named network namespace joined to the test's
    /// namespace by a veth pair, the test side 198.18.0.1/24 and the host
    /// 198.18.0.2/24 (the benchmarking range: only ever these two hosts).
    /// Returns the namespace's name; it is deleted with the sandbox.
    pub fn other_host(&mut self) -> String {
        let name = format!("{}-b", self.name);
        self.hosts.add(&name);
        let ip = |args: &[&str]| {
            check(
                Command::new("ip").args(args).status(),
                &format!("ip {args:?}"),
            )
        };
        ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &name,
        ]);
        ip(&["addr", "add", "198.18.0.1/24", "dev", "veth0"]);
        ip(&["link", "set", "veth0", "up"]);
        ip(&["-n", &name, "addr", "add", "198.18.0.2/24", "dev", "veth1"]);
        ip(&["-n", &name, "link", "set", "veth1", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Makes the test's namespace a router R between two hosts: A on link
    /// `ra` (198.18.1.0/24, 2001:db8:1::/64) and B on link `rb`
    /// (198.18.2.0/24, 2001:db8:2::/64), R being .1/::1 on each and the
    /// hosts .2/::2 with R as their default route. Returns (A, B).
    pub fn router(&mut self) -> (String, String) {
        let mut hosts = Vec::new();
        for (side, n) in [("a", 1), ("b", 2)] {
            let host = format!("{}-{side}", self.name);
            self.hosts.add(&host);
            Sandbox::link_host(side, n, &host);
            hosts.push(host);
        }
        for knob in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            check(Command::new("sysctl").args(["-qw", knob]).status(), knob);
        }
        (hosts.remove(0), hosts.remove(0))
    }

    /// The link `r{side}` from this namespace to `host`'s eth0, and the
    /// host's addresses and default route through it (see `router`).
    fn link_host(side: &str, n: u32, host: &str) {
        let ip = |args: &[&str]| {
            check(
                Command::new("ip").args(args).status(),
                &format!("ip {args:?}"),
            )
        };
        let link = format!("r{side}");
        let (v4r, v4h) = (format!("198.18.{n}.1/24"), format!("198.18.{n}.2/24"));
        let (v6r, v6h) = (format!("2001:db8:{n}::1/64"), format!("2001:db8:{n}::2/64"));
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", host,
        ]);
        ip(&["addr", "add", &v4r, "dev", &link]);
        ip(&["-6", "addr", "add", &v6r, "dev", &link, "nodad"]);
        ip(&["link", "set", &link, "up"]);
        ip(&["-n", host, "addr", "add", &v4h, "dev", "eth0"]);
        ip(&[
            "-n", host, "-6", "addr", "add", &v6h, "dev", "eth0", "nodad",
        ]);
        ip(&["-n", host, "link", "set", "eth0", "up"]);
        ip(&["-n", host, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            host,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{n}.1"),
        ]);
        ip(&[
            "-n",
            host,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("2001:db8:{n}::1"),
        ]);
    }

    /// Deletes the router's link to host `side` ("a" or "b") and makes it
    /// again, as Neutron or libvirt re-create an interface: a new index,
    /// the same name and addresses.
    pub fn recreate_link(&mut self, side: &str) {
        let n = if side == "a" { 1 } else { 2 };
        let link = format!("r{side}");
        check(
            Command::new("ip").args(["link", "del", &link]).status(),
            &format!("ip link del {link}"),
        );
        Sandbox::link_host(side, n, &format!("{}-{side}", self.name));
    }

    /// Starts a peer (server) process inside the named namespace `host`.
    pub fn peer_on(&mut self, host: &str, addrs: &[&str]) -> usize {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", host])
            .arg(peer_bin())
            .args(addrs);
        self.peers.push(Peer::spawn_cmd(cmd, addrs.len()));
        self.peers.len() - 1
    }

    /// Starts `cmd` (stdout piped) and makes the sandbox responsible for
    /// killing it; returns its stdout.
    pub fn spawn(&mut self, cmd: &mut Command) -> std::process::ChildStdout {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let out = child.stdout.take().unwrap();
        self.children.push(child);
        out
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- daemon log ({}) ---\n{}", self.name, self.daemon_log());
        }
    }
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}
