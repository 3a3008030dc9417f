//! The fleet harness: a real 3-member etcd cluster and nodes, each a
//! network namespace with its own cgroup, pins, socket and real daemon.
//!
//! The test's own namespace is the hub: the etcd members run in it (each
//! its own ports and data directory), and node `n` (1, 2, 3: "a", "b",
//! "c") is linked to it by a veth, the hub 198.18.n.1/24 and the node
//! 198.18.n.2/24 with the hub as its default route. A node's daemon reaches
//! the members at 198.18.n.1; clients in the hub reach a node's servers at
//! 198.18.n.2. Dropped (also on a panic), everything is undone: daemons,
//! servers and members killed, namespaces deleted, cgroups, pins and
//! directories removed.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::{Control, Daemon};
use crate::guards::{Cgroup, Hosts, Netns, Pins, ScratchDir};
use crate::{bound, check, peer_bin, reaper_bin, Peer, PREFIX};

/// Client port of member `i` (its peer port is the next one).
fn client_port(i: usize) -> u16 {
    2379 + 2 * i as u16
}

/// Certificates the test makes for a TLS cluster: a CA, the members'
/// server certificate, a client certificate the CA signed, and one it did
/// not.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

impl Certs {
    /// Makes them in `dir` with openssl: the server certificate names
    /// 127.0.0.1 and every hub address.
    pub fn make(dir: &Path) -> Certs {
        let p = |n: &str| dir.join(n);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
        let key = |name: &str| {
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &s(&p(name)),
            ]);
        };
        key("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &s(&p("ca.key")),
            "-subj",
            "/CN=reaper-test-ca",
            "-days",
            "2",
            "-out",
            &s(&p("ca.pem")),
        ]);
        key("rogue-ca.key");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &s(&p("rogue-ca.key")),
            "-subj",
            "/CN=rogue-ca",
            "-days",
            "2",
            "-out",
            &s(&p("rogue-ca.pem")),
        ]);
        let sign = |name: &str, cn: &str, ca: &str, ext: &str| {
            key(&format!("{name}.key"));
            openssl(&[
                "req",
                "-new",
                "-key",
                &s(&p(&format!("{name}.key"))),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &s(&p(&format!("{name}.csr"))),
            ]);
            std::fs::write(p(&format!("{name}.ext")), ext).unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                &s(&p(&format!("{name}.csr"))),
                "-CA",
                &s(&p(&format!("{ca}.pem"))),
                "-CAkey",
                &s(&p(&format!("{ca}.key"))),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &s(&p(&format!("{name}.ext"))),
                "-out",
                &s(&p(&format!("{name}.pem"))),
            ]);
        };
        sign(
            "server",
            "etcd",
            "ca",
            "subjectAltName=IP:127.0.0.1,IP:198.18.1.1,IP:198.18.2.1,IP:198.18.3.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        sign(
            "client",
            "reaper-node",
            "ca",
            "extendedKeyUsage=clientAuth\n",
        );
        sign(
            "rogue",
            "reaper-node",
            "rogue-ca",
            "extendedKeyUsage=clientAuth\n",
        );
        Certs {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            rogue_cert: p("rogue.pem"),
            rogue_key: p("rogue.key"),
        }
    }
}

/// One etcd member process.
struct Member {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Member {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new("etcd")
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("run etcd (Debian's etcd-server; cargo xtask setup installs it)"),
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A 3-member etcd cluster in the hub namespace.
pub struct Etcd {
    members: Vec<Member>,
    tls: bool,
    dir: PathBuf,
    certs: Option<Certs>,
}

impl Etcd {
    /// Starts the members (over TLS with client-certificate auth when
    /// `certs` is given) and waits until the cluster answers.
    pub fn start(dir: &Path, certs: Option<Certs>) -> Etcd {
        let tls = certs.is_some();
        let scheme = if tls { "https" } else { "http" };
        let cluster: Vec<String> = (0..3)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", client_port(i) + 1))
            .collect();
        let mut members = Vec::new();
        for i in 0..3 {
            let mut args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", dir.join(format!("etcd-m{i}")).display()),
                format!("--listen-client-urls={scheme}://0.0.0.0:{}", client_port(i)),
                format!(
                    "--advertise-client-urls={scheme}://127.0.0.1:{}",
                    client_port(i)
                ),
                format!("--listen-peer-urls=http://127.0.0.1:{}", client_port(i) + 1),
                format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                    client_port(i) + 1
                ),
                format!("--initial-cluster={}", cluster.join(",")),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=reaper-test".into(),
                "--logger=zap".into(),
                "--log-level=warn".into(),
            ];
            if let Some(c) = &certs {
                args.extend([
                    format!("--cert-file={}", c.server_cert.display()),
                    format!("--key-file={}", c.server_key.display()),
                    format!("--trusted-ca-file={}", c.ca.display()),
                    "--client-cert-auth".into(),
                ]);
            }
            let mut member = Member {
                child: None,
                args,
                log: dir.join(format!("etcd-m{i}.log")),
            };
            member.spawn();
            members.push(member);
        }
        let etcd = Etcd {
            members,
            tls,
            dir: dir.to_path_buf(),
            certs,
        };
        let end = Instant::now() + bound(Duration::from_secs(30));
        while !etcd
            .ctl(&["endpoint", "health", "--cluster"])
            .status
            .success()
        {
            assert!(
                Instant::now() < end,
                "etcd never became healthy:\n{}",
                etcd.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    pub fn certs(&self) -> Option<&Certs> {
        self.certs.as_ref()
    }

    /// The members' client URLs as node `n` reaches them.
    pub fn endpoints_from(&self, n: usize) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        (0..3)
            .map(|i| format!("{scheme}://198.18.{n}.1:{}", client_port(i)))
            .collect()
    }

    /// Runs etcdctl against the running members (in the hub).
    pub fn ctl(&self, args: &[&str]) -> Output {
        let scheme = if self.tls { "https" } else { "http" };
        let endpoints: Vec<String> = (0..3)
            .filter(|i| self.members[*i].child.is_some())
            .map(|i| format!("{scheme}://127.0.0.1:{}", client_port(i)))
            .collect();
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s");
        if let Some(c) = &self.certs {
            cmd.arg(format!("--cacert={}", c.ca.display()))
                .arg(format!("--cert={}", c.client_cert.display()))
                .arg(format!("--key={}", c.client_key.display()));
        }
        cmd.args(args)
            .output()
            .expect("run etcdctl (Debian's etcd-client)")
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill_member(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on its data directory.
    pub fn restart_member(&mut self, i: usize) {
        let member = &mut self.members[i];
        member.args.retain(|a| a != "--initial-cluster-state=new");
        member.args.push("--initial-cluster-state=existing".into());
        member.spawn();
    }

    /// Writes one more revision (outside every node's keys) and compacts
    /// the history up to it, so that no revision before it can be watched
    /// from; returns it.
    pub fn compact(&self) -> i64 {
        let out = self.ctl(&["put", "/compaction-marker", "x"]);
        assert!(
            out.status.success(),
            "put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self.ctl(&["endpoint", "status", "--write-out=json"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("etcdctl status JSON");
        let revision = v[0]["Status"]["header"]["revision"].as_i64().unwrap();
        let out = self.ctl(&["compact", &revision.to_string(), "--physical"]);
        assert!(
            out.status.success(),
            "compact: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        revision
    }

    pub fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                let text = std::fs::read_to_string(self.dir.join(format!("etcd-m{i}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                format!(
                    "--- etcd m{i} ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

/// One node: a namespace, a cgroup, pins, a socket, a real daemon, and
/// the servers the test started in it.
pub struct Node {
    pub name: String,
    /// 1, 2, 3: its addresses are 198.18.n.2 (the hub's 198.18.n.1).
    pub n: usize,
    pub netns: String,
    pub cgroup: PathBuf,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub state_file: PathBuf,
    pub audit: PathBuf,
    control: Control,
    daemon: Option<Daemon>,
    peers: Vec<Peer>,
    pins: Pins,
}

impl Node {
    /// A command that runs its program in the node's network namespace,
    /// and only that: `ip netns exec` would also mount a sysfs of its own,
    /// hiding the cgroup and bpffs mounts the daemon needs.
    pub fn in_netns(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--");
        cmd
    }

    /// This node's address (what hub clients connect to).
    pub fn addr(&self) -> String {
        format!("198.18.{}.2", self.n)
    }

    /// Writes the node's config: its own paths, the fleet, and `extra`.
    pub fn write_config(
        &self,
        endpoints: &[String],
        tls: Option<(&Path, &Path, &Path)>,
        extra: &str,
    ) {
        let mut fleet = format!(
            "[fleet]\nendpoints = {endpoints:?}\nnode = {:?}\nprefix = \"/reaper-test\"\nnode_lease = \"4s\"\nstate_file = {:?}\n",
            self.name, self.state_file
        );
        if let Some((ca, cert, key)) = tls {
            fleet.push_str(&format!(
                "ca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = {key:?}\n"
            ));
        }
        let text = format!(
            "socket = {:?}\npin_path = {:?}\ncgroup = {:?}\naudit_file = {:?}\nmax_ttl = \"1h\"\n{extra}\n[[watch]]\nports = \"5900-5999\"\nside = \"local\"\n{fleet}",
            self.socket, self.pins.path, self.cgroup, self.audit
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts the daemon inside the node's namespace.
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        let mut cmd = self.in_netns();
        cmd.arg(reaper_bin());
        self.daemon = Some(Daemon::start_as(
            cmd,
            &self.config,
            &self.socket,
            &self.dir.join("daemon.log"),
        ));
    }

    /// Kills the daemon with `signal` and waits for it.
    pub fn stop_daemon(&mut self, signal: i32) {
        self.daemon.take().expect("daemon running").stop(signal);
    }

    pub fn ok(&self, req: Value) -> Value {
        self.control.ok(req)
    }

    pub fn request(&self, req: Value) -> Value {
        self.control.request(req)
    }

    /// The daemon's `status` fleet part.
    pub fn fleet_status(&self) -> Value {
        self.ok(serde_json::json!({"op": "status"}))["fleet"].clone()
    }

    /// Waits until the node is connected to etcd.
    pub fn wait_connected(&self, timeout: Duration) {
        self.wait_fleet(timeout, "connected", |s| s["connected"] == true);
    }

    /// Waits until the node has applied `revision`.
    pub fn wait_applied(&self, revision: i64, timeout: Duration) {
        self.wait_fleet(timeout, &format!("applied revision {revision}"), |s| {
            s["applied_revision"].as_i64().unwrap_or(0) >= revision
        });
    }

    /// Waits until the node's fleet status satisfies `done`; the panic
    /// names `what` it waited for, with the last status and the log.
    fn wait_fleet(&self, timeout: Duration, what: &str, done: impl Fn(&Value) -> bool) {
        let end = Instant::now() + bound(timeout);
        loop {
            let status = self.fleet_status();
            if done(&status) {
                return;
            }
            assert!(
                Instant::now() < end,
                "node {} never {what}: {status}\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts a server in the node's namespace and cgroup on `port` of
    /// every address.
    pub fn server(&mut self, port: u16) -> usize {
        self.spawn(
            &[peer_bin().as_os_str(), format!("0.0.0.0:{port}").as_ref()],
            1,
        )
    }

    /// Starts `program_and_args` in the node's namespace and cgroup; its
    /// stdout lines are read as a peer's (`listeners` "ready" lines are
    /// waited for). Returns its index for [`Node::peer_mut`].
    pub fn spawn(&mut self, program_and_args: &[&std::ffi::OsStr], listeners: usize) -> usize {
        let procs = self.cgroup.join("cgroup.procs");
        let mut cmd = self.in_netns();
        cmd.args(program_and_args);
        // SAFETY: only a write(2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
        self.peers.push(Peer::spawn_cmd(cmd, listeners));
        self.peers.len() - 1
    }

    pub fn peer_mut(&mut self, i: usize) -> &mut Peer {
        &mut self.peers[i]
    }

    /// Waits until the node knows where `other`'s addresses are.
    pub fn wait_knows(&self, other: &str, timeout: Duration) {
        self.wait_fleet(timeout, &format!("learnt of {other}"), |s| {
            s["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n == other))
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The audit trail's lines.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Runs the CLI with this node's config, in the node's namespace (the
    /// members are at the node's hub address), as an operator on that node
    /// would.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.in_netns()
            .arg(reaper_bin())
            .args(args)
            .args(["--config", self.config.to_str().unwrap()])
            .output()
            .expect("run reaper")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.daemon = None;
        self.peers.clear();
        crate::guards::kill_and_remove(&self.cgroup);
    }
}

/// The hub and its nodes. Fields drop in order: nodes (daemons first),
/// then etcd, then the namespaces, the hub's cgroup and directory.
pub struct Fleet {
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
    pub dir: PathBuf,
    _hosts: Hosts,
    _cgroup: Cgroup,
    _scratch: ScratchDir,
    _netns: Netns,
}

impl Fleet {
    /// Enters a fresh hub namespace and cgroup, starts etcd (over TLS when
    /// `tls`) and makes `nodes` nodes, their daemons not yet started.
    pub fn new(name: &str, nodes: usize, tls: bool) -> Fleet {
        assert_eq!(unsafe { libc::geteuid() }, 0, "integration tests need root");
        let unique = format!("{PREFIX}{}-{name}", std::process::id());
        let netns = Netns::enter();
        // The hub routes between the nodes (a proxy on one reaches a
        // console on another).
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding in the hub");
        let cgroup = Cgroup::enter(&unique);
        let scratch = ScratchDir::new(&unique);
        let dir = scratch.path.clone();
        let certs = tls.then(|| Certs::make(&dir));
        let mut hosts = Hosts::default();
        let mut made = Vec::new();
        for n in 1..=nodes {
            let letter = (b'a' + n as u8 - 1) as char;
            let netns_name = format!("{unique}-{letter}");
            hosts.add(&netns_name);
            link(n, &netns_name);
            let node_dir = dir.join(format!("node-{letter}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let node_cgroup = cgroup.path.join(format!("node-{letter}"));
            std::fs::create_dir_all(&node_cgroup).unwrap();
            let socket = node_dir.join("reaper.sock");
            made.push(Node {
                name: format!("node-{letter}"),
                n,
                netns: netns_name,
                cgroup: node_cgroup,
                config: node_dir.join("reaper.toml"),
                state_file: node_dir.join("fleet.state"),
                audit: node_dir.join("audit.jsonl"),
                control: Control {
                    socket: socket.clone(),
                },
                socket,
                dir: node_dir,
                daemon: None,
                peers: Vec::new(),
                pins: Pins::new(&format!("{unique}-{letter}")),
            });
        }
        let etcd = Etcd::start(&dir, certs);
        Fleet {
            nodes: made,
            etcd,
            dir,
            _hosts: hosts,
            _cgroup: cgroup,
            _scratch: scratch,
            _netns: netns,
        }
    }

    /// Writes every node's config (plain fleet, `extra` added) and starts
    /// its daemon; waits until each is connected.
    pub fn start_all(&mut self, extra: &str) {
        let tls = self
            .etcd
            .certs()
            .map(|c| (c.ca.clone(), c.client_cert.clone(), c.client_key.clone()));
        for i in 0..self.nodes.len() {
            let endpoints = self.etcd.endpoints_from(self.nodes[i].n);
            let tls = tls
                .as_ref()
                .map(|(a, b, c)| (a.as_path(), b.as_path(), c.as_path()));
            self.nodes[i].write_config(&endpoints, tls, extra);
            self.nodes[i].start_daemon();
        }
        for node in &self.nodes {
            node.wait_connected(Duration::from_secs(20));
        }
    }

    /// A connection from the hub to `port` on node `i`'s address.
    pub fn connect(&self, i: usize, port: u16) -> crate::Conn {
        crate::Conn::connect(&format!("{}:{port}", self.nodes[i].addr()))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!("--- daemon log ({}) ---\n{}", node.name, node.log());
            }
            eprintln!("{}", self.etcd.logs());
        }
    }
}

/// The veth between the hub and node `n`'s namespace (see the module).
fn link(n: usize, netns: &str) {
    let ip = |args: &[&str]| {
        check(
            Command::new("ip").args(args).status(),
            &format!("ip {args:?}"),
        )
    };
    let hub = format!("fleet{n}");
    ip(&[
        "link", "add", &hub, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ]);
    ip(&["addr", "add", &format!("198.18.{n}.1/24"), "dev", &hub]);
    ip(&["link", "set", &hub, "up"]);
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("198.18.{n}.2/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", netns, "link", "set", "eth0", "up"]);
    ip(&["-n", netns, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        netns,
        "route",
        "add",
        "default",
        "via",
        &format!("198.18.{n}.1"),
    ]);
}

/// Reads what is left on a stream until it ends: whether it ended by a
/// reset or an EOF within `timeout` (false: still open).
pub fn ended_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    stream.set_read_timeout(Some(bound(timeout))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}
