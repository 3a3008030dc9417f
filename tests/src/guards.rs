//! Guards for what a test makes outside its own process memory: each one
//! undoes, when dropped (also when the test panics), exactly what its
//! constructor did. A `Sandbox` is these put together; a test that needs
//! less (or more) can compose them itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::{check, BPFFS, CGROUP_ROOT};

/// The test thread's own network namespace (`unshare`), with loopback up.
/// It vanishes with the test process: nothing to undo.
pub struct Netns(());

impl Netns {
    pub fn enter() -> Netns {
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
        Netns(())
    }
}

/// A cgroup v2 the test process has moved into, so that every socket the
/// test or its children create is in it. Dropped: the process moves back
/// to the root, whatever is left in the cgroup is killed (grandchildren the
/// test never saw: a hub's proxy, the servers it spawned), and the cgroup
/// is removed.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn enter(name: &str) -> Cgroup {
        let path = Path::new(CGROUP_ROOT).join(name);
        std::fs::create_dir_all(&path).expect("create test cgroup");
        std::fs::write(path.join("cgroup.procs"), std::process::id().to_string())
            .expect("move the test into its cgroup");
        Cgroup { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            Path::new(CGROUP_ROOT).join("cgroup.procs"),
            std::process::id().to_string(),
        );
        kill_and_remove(&self.path);
    }
}

/// Kills whatever is left in the cgroup at `path` and removes it.
pub fn kill_and_remove(path: &Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    // Killed processes leave the cgroup once they are reaped (orphans by
    // whoever adopted them): wait for it to be empty, at most 5 s.
    for _ in 0..1000 {
        let events = std::fs::read_to_string(path.join("cgroup.events")).unwrap_or_default();
        if !events.lines().any(|l| l == "populated 1") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = std::fs::remove_dir(path);
}

/// A pin directory under bpffs (mounted if it is not), for a daemon's
/// `pin_path`. Dropped: removed with everything pinned in it.
pub struct Pins {
    pub path: PathBuf,
}

impl Pins {
    pub fn new(name: &str) -> Pins {
        ensure_bpffs();
        Pins {
            path: Path::new(BPFFS).join(name),
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A fresh directory for a test's socket, config, audit file and logs.
pub struct ScratchDir {
    pub path: PathBuf,
}

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        ScratchDir { path }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Named network namespaces (other hosts) a test made. Dropped: deleted.
#[derive(Default)]
pub struct Hosts {
    names: Vec<String>,
}

impl Hosts {
    /// Makes the namespace `name` (`ip netns add`) and keeps it.
    pub fn add(&mut self, name: &str) {
        check(
            Command::new("ip").args(["netns", "add", name]).status(),
            "ip netns add",
        );
        self.names.push(name.to_string());
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for host in self.names.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &host]).status();
        }
    }
}

/// Processes a test started. Dropped: killed and reaped.
#[derive(Default)]
pub struct Children(Vec<Child>);

impl Children {
    pub fn push(&mut self, child: Child) {
        self.0.push(child);
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for mut c in self.0.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
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
