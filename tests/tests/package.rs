//! The Debian package (`cargo xtask deb`, which `cargo xtask test` builds
//! first and names in REAPER_DEB): installed with the real `dpkg -i` into
//! a throwaway root, an overlay over this machine's own `/` whose writes
//! land in the test's scratch directory (the host's files and dpkg
//! database are never touched); its files, conffiles and maintainer
//! scripts checked; its unit verified by `systemd-analyze`; and the
//! installed daemon run under the unit's capability set, telling a notify
//! socket READY=1, RELOADING=1 then READY=1, WATCHDOG=1 and STOPPING=1.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reaper_tests::{bound, Sandbox, SECOND};

fn deb() -> PathBuf {
    let path = std::env::var_os("REAPER_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian/reaper_0.1.0_amd64.deb")
        });
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask test` builds it (or run `cargo xtask deb`)",
        path.display()
    );
    path
}

/// A throwaway root: `upper` holds what was written to it.
struct Root {
    dir: PathBuf,
    upper: PathBuf,
}

impl Root {
    fn new(dir: &Path) -> Root {
        let root = Root {
            dir: dir.to_owned(),
            upper: dir.join("upper"),
        };
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        root
    }

    /// Runs `script` (sh) with the overlay mounted at $ROOT, in a mount
    /// namespace of its own: the mount goes away with it.
    fn run(&self, script: &str) -> Output {
        let d = self.dir.display();
        let setup = format!(
            "set -e; ROOT={d}/merged; mount -t overlay overlay -o lowerdir=/,upperdir={d}/upper,workdir={d}/work $ROOT; \
             mount --bind /dev $ROOT/dev; mount --bind /proc $ROOT/proc; {script}"
        );
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &setup])
            .output()
            .expect("unshare")
    }

    fn file(&self, path: &str) -> PathBuf {
        self.upper.join(path.trim_start_matches('/'))
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn install(root: &Root) {
    let out = root.run(&format!("dpkg --root=$ROOT -i {}", deb().display()));
    assert!(out.status.success(), "dpkg -i: {}", text(&out));
}

#[test]
fn the_package_installs_its_files_conffiles_and_scripts() {
    let sb = Sandbox::new("package-install");
    let root = Root::new(&sb.dir);
    install(&root);

    let listed = root.run("dpkg --root=$ROOT -L reaper");
    let files = String::from_utf8_lossy(&listed.stdout);
    for path in [
        "/usr/sbin/reaper",
        "/lib/systemd/system/reaper.service",
        "/etc/reaper/reaper.toml",
        "/etc/logrotate.d/reaper",
        "/usr/share/man/man8/reaper.8.gz",
        "/usr/share/man/man8/reaper-grant.8.gz",
        "/usr/share/man/man5/reaper.toml.5.gz",
        "/usr/share/bash-completion/completions/reaper",
        "/usr/share/zsh/vendor-completions/_reaper",
        "/usr/share/fish/vendor_completions.d/reaper.fish",
        "/usr/share/doc/reaper/copyright",
        "/usr/lib/python3/dist-packages/reaper_client/__init__.py",
        "/usr/lib/python3/dist-packages/reaper_client/websockify.py",
    ] {
        let found = files
            .lines()
            .any(|l| l == path || (path.starts_with("/lib/") && l == format!("/usr{path}")));
        assert!(found, "{path} not in the package:\n{files}");
    }
    let unit_path = if files
        .lines()
        .any(|l| l == "/usr/lib/systemd/system/reaper.service")
    {
        "/usr/lib/systemd/system/reaper.service"
    } else {
        "/lib/systemd/system/reaper.service"
    };
    assert!(root.file("/usr/sbin/reaper").exists());

    let conffiles = root.run("dpkg-query --root=$ROOT -W -f='${Conffiles}' reaper");
    let conffiles = String::from_utf8_lossy(&conffiles.stdout);
    for conf in ["/etc/reaper/reaper.toml", "/etc/logrotate.d/reaper"] {
        assert!(
            conffiles.contains(conf),
            "{conf} is not a conffile: {conffiles}"
        );
    }
    for script in ["postinst", "prerm", "postrm"] {
        let path = root.file(&format!("/var/lib/dpkg/info/reaper.{script}"));
        let body = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{script}: {e}"));
        assert!(body.starts_with("#!/bin/sh"), "{script}: {body}");
        assert!(
            !body.contains("#DEBHELPER#"),
            "{script} kept its placeholder"
        );
    }
    let prerm = std::fs::read_to_string(root.file("/var/lib/dpkg/info/reaper.prerm")).unwrap();
    assert!(prerm.contains("reaper unload"), "{prerm}");

    // The installed binary checks the installed config.
    let checked = Command::new(root.file("/usr/sbin/reaper"))
        .args(["check-config", "--config"])
        .arg(root.file("/etc/reaper/reaper.toml"))
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", text(&checked));
    assert!(String::from_utf8_lossy(&checked.stdout)
        .contains("audit_file = \"/var/log/reaper/audit.jsonl\""));

    // The Python client imports from the installed root.
    let imported = root.run("chroot $ROOT /usr/bin/python3 -c 'import reaper_client, reaper_client.websockify; print(reaper_client.DEFAULT_SOCKET)'");
    assert!(
        text(&imported).contains("/run/reaper/reaper.sock"),
        "python3 -c 'import reaper_client': {}",
        text(&imported)
    );

    // The unit: systemd-analyze exits 0 even on unknown keys, so any word
    // on stderr is a failure.
    let verify = root.run(&format!(
        "systemd-analyze verify --root=$ROOT --man=no {unit_path} 2>&1 >/dev/null"
    ));
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );
    let security = root.run(&format!(
        "systemd-analyze security --root=$ROOT --offline=yes --no-pager {unit_path}"
    ));
    let report = text(&security);
    let score = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level: {report}"));
    println!(
        "systemd-analyze security: {}",
        score.trim_start_matches(['→', ' '])
    );

    // Removal runs prerm (which unloads: nothing is pinned in this root),
    // keeps the conffiles; purge removes them.
    let removed = root.run("dpkg --root=$ROOT -r reaper");
    assert!(removed.status.success(), "dpkg -r: {}", text(&removed));
    assert!(
        text(&removed).contains("nothing pinned at /sys/fs/bpf/reaper"),
        "{}",
        text(&removed)
    );
    let purged =
        root.run("dpkg --root=$ROOT --purge reaper && test ! -e $ROOT/etc/reaper/reaper.toml");
    assert!(purged.status.success(), "dpkg --purge: {}", text(&purged));
}

/// The unit's capability bounding set, as setpriv spells it.
fn unit_capabilities(unit: &str) -> String {
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds its capabilities");
    let caps: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!("-all,{}", caps.join(","))
}

fn expect_state(notify: &UnixDatagram, state: &str) -> String {
    let mut buf = [0u8; 4096];
    let end = std::time::Instant::now() + bound(20 * SECOND);
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "no {state} from the daemon");
        notify.set_read_timeout(Some(left)).unwrap();
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {state}: {e}"));
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.lines().any(|l| l == state) {
            return message;
        }
    }
}

#[test]
fn the_installed_daemon_speaks_systemds_notify_protocol() {
    let mut sb = Sandbox::new("package-notify");
    let root = Root::new(&sb.dir.join("root"));
    install(&root);
    let unit = std::fs::read_to_string(root.file("/usr/lib/systemd/system/reaper.service"))
        .or_else(|_| std::fs::read_to_string(root.file("/lib/systemd/system/reaper.service")))
        .unwrap();
    assert!(unit.contains("Type=notify"), "{unit}");

    let path = sb.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&path).unwrap();
    // The installed binary, under the unit's capability bounding set and
    // no_new_privs, as systemd would start it (with the sandbox's paths);
    // systemd names the watched pid, which exec keeps.
    let mut daemon = Command::new("sh");
    daemon
        .arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec setpriv --bounding-set={} --no-new-privs {} \"$@\"",
            unit_capabilities(&unit),
            root.file("/usr/sbin/reaper").display()
        ))
        .arg("sh")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000");
    sb.start_daemon_as(daemon);
    expect_state(&notify, "READY=1");
    expect_state(&notify, "WATCHDOG=1");
    // The daemon works under those capabilities: a grant goes through.
    sb.peer(&["127.0.0.1:5900"]);
    let flow = reaper_tests::Conn::connect("127.0.0.1:5900");
    sb.grant("pkg", "alice", "vm-1", "1h", &flow);

    sb.hangup();
    let reloading = expect_state(&notify, "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    expect_state(&notify, "READY=1");
    sb.stop_daemon(libc::SIGTERM);
    expect_state(&notify, "STOPPING=1");
}
