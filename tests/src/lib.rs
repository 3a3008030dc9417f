//! Harness for reaper's integration tests.
//!
//! Every test builds a [`Sandbox`]: its own network namespace (entered by the
//! test's thread with `unshare`, so it vanishes with the test process), its
//! own cgroup v2 (the test process moves into it, so every socket the test or
//! its children create is in it), its own bpffs pin directory, control socket
//! and audit file, and the real `reaper` binary attached to that cgroup only.
//! Dropping the sandbox — also when the test panics — stops every process it
//! started and removes the cgroup, the pins and the files.
//!
//! Tests run as root (CAP_BPF, CAP_NET_ADMIN); cargo-nextest runs each in its
//! own process, which is what makes the per-thread namespace and the
//! per-process cgroup sound.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
pub const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of everything a test creates, so that `cargo xtask test` can sweep
/// up what a killed test run left behind.
pub const PREFIX: &str = "reaper-test-";

/// Nanoseconds on CLOCK_BOOTTIME, the clock reaper's deadlines live on.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Blocks until the boot clock reaches `ns`: waiting for a known deadline,
/// not for a guess.
pub fn sleep_until_boot(ns: u64) {
    let now = boot_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}

/// Whether the running kernel is at least `major.minor` (by its release
/// string, independent of reaper's own feature probe).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// The `reaper` binary under test.
pub fn reaper_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REAPER_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/reaper");
    assert!(
        p.exists(),
        "no reaper binary at {} (run `cargo xtask test`)",
        p.display()
    );
    p
}

fn peer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REAPER_TEST_PEER") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/reaper-test-peer")
}

fn check(status: std::io::Result<std::process::ExitStatus>, what: &str) {
    match status {
        Ok(s) if s.success() => {}
        other => panic!("{what} failed: {other:?}"),
    }
}

pub struct Sandbox {
    pub name: String,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub audit_path: PathBuf,
    daemon: Option<Child>,
    peers: Vec<Peer>,
    /// Other processes a test started; killed with the sandbox.
    children: Vec<Child>,
    /// Named network namespaces (other hosts) the test made.
    hosts: Vec<String>,
}

impl Sandbox {
    /// Enters a fresh network namespace and cgroup. `name` must be unique
    /// among tests (the test's own name is).
    pub fn new(name: &str) -> Sandbox {
        assert_eq!(unsafe { libc::geteuid() }, 0, "integration tests need root");
        let unique = format!("{PREFIX}{}-{name}", std::process::id());
        raise_fd_limit();
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET)"
        );
        check(
            Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status(),
            "ip link set lo up",
        );
        ensure_bpffs();
        let cgroup = Path::new(CGROUP_ROOT).join(&unique);
        std::fs::create_dir_all(&cgroup).expect("create test cgroup");
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .expect("move the test into its cgroup");
        let dir = std::env::temp_dir().join(&unique);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sandbox = Sandbox {
            name: unique.clone(),
            pin_path: Path::new(BPFFS).join(&unique),
            socket: dir.join("reaper.sock"),
            config_path: dir.join("reaper.toml"),
            audit_path: dir.join("audit.jsonl"),
            cgroup,
            dir,
            daemon: None,
            peers: Vec::new(),
            children: Vec::new(),
            hosts: Vec::new(),
        };
        sandbox.write_config("[[watch]]\nports = \"5900-5999\"\nside = \"local\"\n");
        sandbox
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(reaper_bin())
            .args(["daemon", "--config"])
            .arg(&self.config_path)
            .env("REAPER_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn reaper daemon");
        self.daemon = Some(child);
        let deadline = Instant::now() + bound(Duration::from_secs(20));
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("reaper daemon exited with {status}:\n{}", self.daemon_log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with `signal` and waits for it to exit.
    pub fn stop_daemon(&mut self, signal: i32) {
        let mut child = self.daemon.take().expect("daemon running");
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap();
    }

    /// Sends SIGHUP (reload the config) to the daemon.
    pub fn hangup(&self) {
        let pid = self.daemon.as_ref().expect("daemon running").id();
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// One raw protocol exchange: sends `line` (newline added), returns the
    /// parsed response.
    pub fn raw(&self, line: &str) -> Value {
        let mut s = UnixStream::connect(&self.socket).expect("connect control socket");
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad response {reply:?}: {e}"))
    }

    pub fn request(&self, req: Value) -> Value {
        self.raw(&req.to_string())
    }

    /// A request that must succeed; returns its result.
    pub fn ok(&self, req: Value) -> Value {
        let r = self.request(req.clone());
        assert_eq!(r["ok"], true, "{req} was refused: {r}");
        r["result"].clone()
    }

    /// Grants one flow (named by the server's view of it) for `ttl`.
    pub fn grant(&self, session: &str, user: &str, target: &str, ttl: &str, flow: &Flow) -> Value {
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

    /// Audit events written so far. A line the daemon is still writing
    /// (no newline yet) is not an event yet.
    pub fn audit(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// Waits until the audit file holds at least `n` events (for
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
        check(
            Command::new("ip").args(["netns", "add", &name]).status(),
            "ip netns add",
        );
        self.hosts.push(name.clone());
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
        let ip = |args: &[&str]| {
            check(
                Command::new("ip").args(args).status(),
                &format!("ip {args:?}"),
            )
        };
        let mut hosts = Vec::new();
        for (side, n) in [("a", 1), ("b", 2)] {
            let host = format!("{}-{side}", self.name);
            check(
                Command::new("ip").args(["netns", "add", &host]).status(),
                "ip netns add",
            );
            self.hosts.push(host.clone());
            let link = format!("r{side}");
            let (v4r, v4h) = (format!("198.18.{n}.1/24"), format!("198.18.{n}.2/24"));
            let (v6r, v6h) = (format!("2001:db8:{n}::1/64"), format!("2001:db8:{n}::2/64"));
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &host,
            ]);
            ip(&["addr", "add", &v4r, "dev", &link]);
            ip(&["-6", "addr", "add", &v6r, "dev", &link, "nodad"]);
            ip(&["link", "set", &link, "up"]);
            ip(&["-n", &host, "addr", "add", &v4h, "dev", "eth0"]);
            ip(&[
                "-n", &host, "-6", "addr", "add", &v6h, "dev", "eth0", "nodad",
            ]);
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
            ip(&["-n", &host, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &host,
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{n}.1"),
            ]);
            ip(&[
                "-n",
                &host,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("2001:db8:{n}::1"),
            ]);
            hosts.push(host);
        }
        for knob in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            check(Command::new("sysctl").args(["-qw", knob]).status(), knob);
        }
        (hosts.remove(0), hosts.remove(0))
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
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        self.peers.clear();
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for host in self.hosts.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &host]).status();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ({}) ---\n{}", self.name, self.daemon_log());
        }
        // Leave the cgroup so it can be removed; the netns goes with the process.
        let _ = std::fs::write(
            Path::new(CGROUP_ROOT).join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.pin_path);
        let _ = std::fs::remove_dir_all(&self.dir);
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

fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf "))
    {
        let _ = Command::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS])
            .status();
    }
}

/// A server process (`reaper-test-peer`) and the events it reports.
pub struct Peer {
    child: Child,
    _stdin: ChildStdin,
    lines: Receiver<String>,
    seen: VecDeque<String>,
}

impl Peer {
    fn spawn(addrs: &[&str]) -> Peer {
        let mut cmd = Command::new(peer_bin());
        cmd.args(addrs);
        Peer::spawn_cmd(cmd, addrs.len())
    }

    fn spawn_cmd(mut cmd: Command, listeners: usize) -> Peer {
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

/// A client connection made by the test process, with the server's view
/// of its addresses (what a proxy on the server side would register).
pub struct Flow {
    pub stream: TcpStream,
    /// The server's address (the watched port).
    pub server: SocketAddr,
    /// The client's address.
    pub client: SocketAddr,
}

impl Flow {
    pub fn connect(server: &str) -> Flow {
        let stream = TcpStream::connect(server).unwrap_or_else(|e| panic!("connect {server}: {e}"));
        stream.set_nodelay(true).unwrap();
        Flow {
            server: stream.peer_addr().unwrap(),
            client: stream.local_addr().unwrap(),
            stream,
        }
    }

    /// Connects from inside the named namespace `host` (a thread enters it
    /// to make the socket; the socket stays there).
    pub fn connect_from(host: &str, server: &str) -> Flow {
        let (host, server) = (host.to_string(), server.to_string());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/run/netns/{host}")).expect("open netns");
            use std::os::fd::AsRawFd;
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            Flow::connect(&server)
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
        self.stream.set_read_timeout(Some(bound(timeout))).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return (
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                        boot_ns(),
                    )
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    panic!("flow {} still alive after {timeout:?}", self.client)
                }
                Err(e) => return (e, boot_ns()),
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
pub fn connect_bound(server: std::net::SocketAddrV4) -> (SocketAddr, std::io::Result<TcpStream>) {
    use std::os::fd::FromRawFd;
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh descriptor, owned by the TcpStream right away; the
    // addresses are live sockaddr_in of the length passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(std::net::SocketAddrV4::new(*server.ip(), 0));
        let rc = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let client = stream.local_addr().expect("bound address");
        let remote = sockaddr(server);
        let rc = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        if rc == 0 {
            (client, Ok(stream))
        } else {
            (client, Err(std::io::Error::last_os_error()))
        }
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

/// `python3` with the test's Python packages (websockify, installed by
/// `cargo xtask setup` under target/pydeps) on its path.
pub fn python() -> Command {
    let deps = std::env::var_os("REAPER_PYDEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pydeps"));
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", deps).env("PYTHONUNBUFFERED", "1");
    cmd
}

/// A script under tests/scripts.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

pub const SECOND: Duration = Duration::from_secs(1);

/// How much slower than this machine the tests are running: 1 here, more
/// under `cargo xtask vm-test` when qemu emulates the CPU in software
/// (`REAPER_TEST_TIME_SCALE`). Latency bounds (how late a kill may be, how
/// long an answer may take) and every wait of this harness are multiplied
/// by it; deadlines and the order of events are not, so a test still fails
/// where reaper is wrong rather than slow.
pub fn time_scale() -> f64 {
    std::env::var("REAPER_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v >= 1.0)
        .unwrap_or(1.0)
}

/// A latency bound in milliseconds, scaled by [`time_scale`].
pub fn bound_ms(ms: f64) -> f64 {
    ms * time_scale()
}

/// A latency bound, scaled by [`time_scale`].
pub fn bound(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}
