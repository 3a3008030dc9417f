//! The integrations of docs/integrations.md against the real software:
//! websockify from PyPI run through `python3 -m reaper_client.websockify`
//! (the Python client package, clients/python), as an operator would.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::ChildStdout;

use reaper_tests::{boot_ns, bound_ms, python, wait_listening, Sandbox, SECOND};
use serde_json::{json, Value};

const CONSOLE: &str = "198.18.0.2:5900";

/// A websocket client (tests/scripts/ws_client.py) through the proxy with
/// `token`; returns its output once the round trip worked.
fn ws_client(sb: &mut Sandbox, token: &str) -> BufReader<ChildStdout> {
    let mut out = BufReader::new(
        sb.spawn(
            python()
                .arg(reaper_tests::script("ws_client.py"))
                .arg(format!("ws://127.0.0.1:6080/?token={token}")),
        ),
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "echo ping",
        "round trip through websockify ({token})"
    );
    out
}

/// `python3 -m reaper_client.websockify` on 127.0.0.1:6080 with a token
/// file, as docs/integrations.md runs it; `reaper` are its `--reaper-*`
/// flags.
fn start_websockify(sb: &mut Sandbox, tokens: &std::path::Path, reaper: &[&str]) {
    let socket = sb.socket.display().to_string();
    let tokens = tokens.display().to_string();
    let mut command = python();
    command
        .args(["-m", "reaper_client.websockify", "--reaper-socket", &socket])
        .args(reaper)
        .args([
            "--",
            "--token-plugin",
            "TokenFile",
            "--token-source",
            &tokens,
        ])
        .arg("127.0.0.1:6080");
    sb.spawn(&mut command);
    assert!(
        wait_listening(6080, 20 * SECOND),
        "websockify did not start"
    );
}

/// The session `name` as listed, once both its sockets are in.
fn session(sb: &Sandbox, name: &str) -> Value {
    let listed = sb.ok(json!({"op": "list", "session": name}));
    let s = listed["sessions"][0].clone();
    assert_eq!(s["flows"].as_array().map(Vec::len), Some(2), "{listed}");
    s
}

/// The proxy's upstream address: what the console sees as its client.
fn upstream_of(session: &Value) -> SocketAddr {
    let flows = session["flows"].as_array().unwrap();
    let upstream = flows
        .iter()
        .find(|f| f["remote"] == CONSOLE)
        .unwrap_or_else(|| panic!("no flow to the console: {session}"));
    upstream["local"].as_str().unwrap().parse().unwrap()
}

fn ended(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

#[test]
fn websockify_consoles_end_at_the_token_expiry_unless_extended() {
    let mut sb = Sandbox::new("integrations-websockify");
    sb.write_config(
        "[[watch]]\nports = \"6080\"\nside = \"local\"\n[[watch]]\nports = \"5900\"\nside = \"remote\"\n",
    );
    sb.start_daemon();
    let host = sb.other_host();
    let console = sb.peer_on(&host, &[CONSOLE]);
    let tokens = sb.dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("tok-a: {CONSOLE}\ntok-b: {CONSOLE}\ntok-c: {CONSOLE}\n"),
    )
    .unwrap();
    // Every token expires at one wall-clock instant, as Nova's do: late
    // enough for websockify to start and the consoles to connect. Python
    // starting websockify beside the rest of the suite took 5.5 s once,
    // so the window is wide; the assertion below says if it was not.
    let expiry_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + reaper_tests::bound(15 * SECOND).as_secs_f64();
    let socket = sb.socket.display().to_string();
    let expires = format!("@{expiry_unix}");
    start_websockify(
        &mut sb,
        &tokens,
        &["--reaper-user", "erin", "--reaper-expires-at", &expires],
    );

    let mut a = ws_client(&mut sb, "tok-a");
    let mut b = ws_client(&mut sb, "tok-b");
    let mut c = ws_client(&mut sb, "tok-c");
    let sa = session(&sb, "tok-a");
    assert_eq!(
        (sa["user"].as_str(), sa["target"].as_str()),
        (Some("erin"), Some(CONSOLE))
    );
    let deadline = sa["deadline_boot_ns"].as_u64().unwrap();
    let (up_a, up_b, up_c) = (
        upstream_of(&sa),
        upstream_of(&session(&sb, "tok-b")),
        upstream_of(&session(&sb, "tok-c")),
    );

    // The portal refreshes the tokens of b and c: extended through the
    // client package, over one connection.
    let extended = python()
        .args([
            "-c",
            "import sys; from reaper_client import Client\n\
             with Client(sys.argv[1]) as c:\n    for s in ('tok-b', 'tok-c'): c.extend(s, ttl='1h')",
            &socket,
        ])
        .output()
        .unwrap();
    assert!(
        extended.status.success(),
        "{}",
        String::from_utf8_lossy(&extended.stderr)
    );
    assert!(
        boot_ns() < deadline,
        "the setup took past the token's expiry"
    );

    // At the expiry tok-a's console ends at both ends; tok-b's lives on.
    let how = ended(&mut a);
    let closed_at = boot_ns();
    assert!(how.starts_with("closed "), "{how}");
    let late_ms = (closed_at as f64 - deadline as f64) / 1e6;
    println!("websockify: tok-a's websocket {how} {late_ms:.1} ms after the token expired");
    assert!(closed_at >= deadline && late_ms < bound_ms(200.0));
    let end = sb.peer_mut(console).wait_end(up_a, 5 * SECOND);
    assert_eq!(end.as_deref(), Some("reset"), "the console's end of tok-a");
    assert_eq!(
        sb.peer_mut(console).wait_end(up_b, SECOND / 2),
        None,
        "tok-b lives"
    );
    let listed = sb.ok(json!({"op": "list", "session": "tok-b"}));
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 1, "{listed}");

    // `revoke --target`: every connection to the instance ends.
    let revoked = sb.cli(&["revoke", "--target", CONSOLE]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    for (name, out, up) in [("tok-b", &mut b, up_b), ("tok-c", &mut c, up_c)] {
        let how = ended(out);
        assert!(how.starts_with("closed "), "{name}: {how}");
        let end = sb.peer_mut(console).wait_end(up, 5 * SECOND);
        assert_eq!(end.as_deref(), Some("reset"), "the console's end of {name}");
    }
    let reasons: Vec<(String, String)> = sb
        .wait_audit(6, 5 * SECOND)
        .iter()
        .map(|e| {
            (
                e["session"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (name, reason) in [
        ("tok-a", "expired"),
        ("tok-b", "revoked"),
        ("tok-c", "revoked"),
    ] {
        assert_eq!(
            reasons
                .iter()
                .filter(|(s, r)| s == name && r == reason)
                .count(),
            2,
            "{name} {reason}: {reasons:?}"
        );
    }
}

/// A grant the daemon refuses ends the proxied connection before any byte
/// is relayed: the integration fails closed.
#[test]
fn websockify_fails_closed_when_the_grant_is_refused() {
    let mut sb = Sandbox::new("integrations-websockify-refused");
    // 6080 is not watched: the client's socket is not tracked, the grant
    // is refused flow_not_tracked.
    sb.write_config("[[watch]]\nports = \"5900\"\nside = \"remote\"\n");
    sb.start_daemon();
    let host = sb.other_host();
    sb.peer_on(&host, &[CONSOLE]);
    let tokens = sb.dir.join("tokens");
    std::fs::write(&tokens, format!("tok-x: {CONSOLE}\n")).unwrap();
    start_websockify(&mut sb, &tokens, &["--reaper-ttl", "1h"]);
    let mut out = BufReader::new(
        sb.spawn(
            python()
                .arg(reaper_tests::script("ws_client.py"))
                .arg("ws://127.0.0.1:6080/?token=tok-x"),
        ),
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        !line.starts_with("echo"),
        "relayed although refused: {line:?}"
    );
    let listed = sb.ok(json!({"op": "list"}));
    assert_eq!(listed["sessions"], json!([]), "{listed}");
}

/// Debian's real sshd on 127.0.0.1:22 of the sandbox's namespace, with a
/// PAM stack that has the documented `reaper pam` line, and two users
/// (alice, bob) known to it only: passwd and the PAM file are bind-mounted
/// in a mount namespace of sshd's own, so the machine's are never touched.
/// Returns the client key.
fn start_sshd(sb: &mut Sandbox, classes: &str) -> std::path::PathBuf {
    use std::process::Command;
    sb.write_config(&format!(
        "[[watch]]\nports = \"22\"\nside = \"local\"\n{classes}"
    ));
    sb.start_daemon();
    let dir = sb.dir.join("ssh");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("id");
    for (path, kind) in [(dir.join("host"), "ed25519"), (key.clone(), "ed25519")] {
        let made = Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-t", kind, "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success(), "ssh-keygen");
    }
    std::fs::copy(key.with_extension("pub"), dir.join("authorized_keys")).unwrap();
    let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    for (user, uid) in [("alice", 61001), ("bob", 61002)] {
        passwd += &format!("{user}:x:{uid}:{uid}::{}:/bin/sh\n", dir.display());
    }
    std::fs::write(dir.join("passwd"), passwd).unwrap();
    // The line an operator adds to /etc/pam.d/sshd, in a stack of its own
    // (pubkey logins need no PAM auth here).
    let pam_line = format!(
        "session required pam_exec.so quiet {} pam --class ssh --socket {}",
        reaper_tests::reaper_bin().display(),
        sb.socket.display()
    );
    std::fs::write(
        dir.join("pam"),
        format!("auth required pam_permit.so\naccount required pam_permit.so\n{pam_line}\nsession required pam_permit.so\npassword required pam_deny.so\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1:22\nHostKey {d}/host\nPidFile none\nUsePAM yes\nKbdInteractiveAuthentication no\n\
             PasswordAuthentication no\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUseDNS no\nLogLevel ERROR\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let d = dir.display();
    let script = format!(
        "mount --bind {d}/pam /etc/pam.d/sshd && mount --bind {d}/passwd /etc/passwd && exec /usr/sbin/sshd -D -e -f {d}/sshd_config"
    );
    sb.spawn(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert!(wait_listening(22, 10 * SECOND), "sshd did not start");
    key
}

/// `ssh user@127.0.0.1 COMMAND`, batch mode; stdin piped when `typing`.
fn ssh(key: &std::path::Path, user: &str, command: &str, typing: bool) -> std::process::Child {
    use std::process::{Command, Stdio};
    let mut c = Command::new("ssh");
    c.args(["-F", "/dev/null", "-i"])
        .arg(key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .stdout(Stdio::null());
    if typing {
        c.stdin(Stdio::piped());
    } else {
        c.arg("-n");
    }
    c.arg(format!("{user}@127.0.0.1")).arg(command);
    c.spawn().expect("ssh")
}

/// The sessions of `user` once `n` of them are granted.
fn ssh_sessions(sb: &Sandbox, user: &str, n: usize) -> Vec<Value> {
    let end = std::time::Instant::now() + reaper_tests::bound(10 * SECOND);
    loop {
        let listed = sb.ok(json!({"op": "list", "user": user}));
        let sessions = listed["sessions"].as_array().unwrap().clone();
        if sessions.len() >= n {
            return sessions;
        }
        assert!(
            std::time::Instant::now() < end,
            "{user}: {n} ssh sessions never granted: {listed}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut std::process::Child, timeout: std::time::Duration) -> Option<i32> {
    let end = std::time::Instant::now() + reaper_tests::bound(timeout);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        if std::time::Instant::now() > end {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn ssh_sessions_end_at_the_class_deadline_and_on_idle() {
    let mut sb = Sandbox::new("integrations-ssh-deadline");
    let key = start_sshd(
        &mut sb,
        "[classes.ssh]\nttl = \"3s\"\nidle_timeout = \"1s\"\nidle_direction = \"input\"\n",
    );
    let mut typist = ssh(&key, "alice", "cat >/dev/null", true);
    let mut idle = ssh(&key, "alice", "sleep 60", false);
    let sessions = ssh_sessions(&sb, "alice", 2);
    assert!(
        sessions.iter().all(|s| s["class"] == "ssh"
            && s["session"]
                .as_str()
                .unwrap()
                .starts_with("ssh:alice@127.0.0.1:")),
        "{sessions:?}"
    );
    let granted = boot_ns();
    let deadline = sessions[0]["deadline_boot_ns"]
        .as_u64()
        .unwrap()
        .min(sessions[1]["deadline_boot_ns"].as_u64().unwrap());

    // The typist types a key every 300 ms; the other does nothing.
    let mut keys = typist.stdin.take().unwrap();
    let typing = std::thread::spawn(move || {
        use std::io::Write;
        while keys.write_all(b"x").and_then(|()| keys.flush()).is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    });
    let idle_code = wait_exit(&mut idle, 5 * SECOND);
    let idle_after_ms = (boot_ns() - granted) as f64 / 1e6;
    assert_eq!(idle_code, Some(255), "the idle ssh is cut (exit 255)");
    println!(
        "ssh: the idle session was cut {idle_after_ms:.0} ms after its grant (idle_timeout 1s)"
    );
    assert!(
        typist.try_wait().unwrap().is_none(),
        "the typing session lives on"
    );

    let typist_code = wait_exit(&mut typist, 10 * SECOND);
    let late_ms = (boot_ns() as f64 - deadline as f64) / 1e6;
    assert_eq!(
        typist_code,
        Some(255),
        "the typing session is cut at the class deadline"
    );
    println!("ssh: the typing session's ssh exited 255, {late_ms:.1} ms after the class deadline (ttl 3s)");
    assert!(late_ms >= 0.0 && late_ms < bound_ms(500.0), "{late_ms} ms");
    typing.join().unwrap();
    let reasons: Vec<String> = sb
        .wait_audit(2, 5 * SECOND)
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        reasons.contains(&"idle".to_owned()) && reasons.contains(&"expired".to_owned()),
        "{reasons:?}"
    );
}

#[test]
fn revoke_user_cuts_every_ssh_session_of_that_user_only() {
    let mut sb = Sandbox::new("integrations-ssh-revoke");
    let key = start_sshd(&mut sb, "[classes.ssh]\nttl = \"1h\"\n");
    let mut alice = [
        ssh(&key, "alice", "sleep 60", false),
        ssh(&key, "alice", "sleep 60", false),
    ];
    let mut bob = ssh(&key, "bob", "sleep 60", false);
    ssh_sessions(&sb, "alice", 2);
    ssh_sessions(&sb, "bob", 1);
    let asked = std::time::Instant::now();
    let revoked = sb.cli(&["revoke", "--user", "alice"]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    for a in &mut alice {
        assert_eq!(wait_exit(a, 5 * SECOND), Some(255), "alice's ssh is cut");
    }
    println!(
        "ssh: both of alice's sessions ended {:.1} ms after `revoke --user alice`",
        asked.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(wait_exit(&mut bob, SECOND / 2), None, "bob's session lives");
    let listed = sb.ok(json!({"op": "list", "user": "bob"}));
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 1, "{listed}");
    let _ = bob.kill();
    let _ = bob.wait();
    // The closing session of a revoked one finds nothing to revoke: no
    // error (the daemon log says no more than that).
}

/// JupyterHub 6.1 (PyPI) with configurable-http-proxy 5.3 (npm), on
/// loopback: the hub setting (`reaper_client.jupyterhub.revoke_on_logout`)
/// and the single-user extension (`reaper_client.jupyter_server`) of
/// docs/integrations.md. Two users with a terminal each; alice logs out.
#[test]
fn jupyterhub_logout_closes_the_users_terminal_and_nothing_else() {
    use std::process::Command;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join("target/jupyter");
    let chp = root.join("target/npm/node_modules/.bin/configurable-http-proxy");
    assert!(
        venv.join("bin/jupyterhub").exists() && chp.exists(),
        "JupyterHub (target/jupyter) or configurable-http-proxy (target/npm) missing: `cargo xtask setup` installs them"
    );
    let clients = root.join("clients/python").canonicalize().unwrap();

    let mut sb = Sandbox::new("integrations-jupyterhub");
    // The single-user servers listen on 9001 and 9002.
    sb.write_config(
        "[[watch]]\nports = \"9001-9002\"\nside = \"local\"\n[classes.notebook]\nttl = \"1h\"\n",
    );
    sb.start_daemon();
    let dir = sb.dir.join("hub");
    std::fs::create_dir_all(&dir).unwrap();
    let token = format!("reaper-test-{}", std::process::id());
    let config = format!(
        r#"
import sys
sys.path.insert(0, {clients:?})
from reaper_client import Client
from reaper_client import jupyterhub as reaper_hub
reaper_hub.revoke_on_logout(Client({socket:?}))

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = 8000
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = 8081
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.JupyterHub.db_url = "sqlite:///{dir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{dir}/cookie_secret"
c.ConfigurableHTTPProxy.command = [{chp:?}]
c.ConfigurableHTTPProxy.pid_file = "{dir}/proxy.pid"
c.Spawner.cmd = [{singleuser:?}]
c.Spawner.args = [
    "--allow-root",
    '--ServerApp.jpserver_extensions={{"reaper_client.jupyter_server": True}}',
    "--HubOAuth.cache_max_age=0",
]
c.Spawner.environment = {{"REAPER_SOCKET": {socket:?}, "PYTHONPATH": {clients:?}}}
c.Spawner.http_timeout = 120
c.Spawner.start_timeout = 120
c.SimpleLocalProcessSpawner.home_dir_template = "{dir}/{{username}}"
ports = {{"alice": 9001, "bob": 9002}}
def place(spawner):
    spawner.port = ports[spawner.user.name]
c.Spawner.pre_spawn_hook = place
c.JupyterHub.services = [{{"name": "test", "api_token": {token:?}}}]
c.JupyterHub.load_roles = [{{"name": "test", "services": ["test"],
    "scopes": ["admin:users", "admin:servers", "access:servers"]}}]
"#,
        socket = sb.socket.display().to_string(),
        dir = dir.display(),
        chp = chp.display().to_string(),
        singleuser = venv.join("bin/jupyterhub-singleuser").display().to_string(),
        clients = clients.display().to_string(),
    );
    std::fs::write(dir.join("jupyterhub_config.py"), config).unwrap();
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let _hub = sb.spawn(
        Command::new(venv.join("bin/jupyterhub"))
            .args(["-f", "jupyterhub_config.py"])
            .current_dir(&dir)
            .env("PATH", path),
    );
    assert!(wait_listening(8000, 60 * SECOND), "the hub did not start");

    let go = dir.join("go");
    let mut driver = BufReader::new(
        sb.spawn(
            python()
                .arg(reaper_tests::script("jupyter_logout.py"))
                .arg(&token)
                .arg(&go),
        ),
    );
    let mut line = String::new();
    driver.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), r#"{"ready": true}"#, "the browsers' terminals");
    // Each terminal websocket is its user's session on the server's port.
    for user in ["alice", "bob"] {
        let listed = sb.ok(json!({"op": "list", "user": user}));
        let sessions = listed["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 1, "{listed}");
        assert!(
            sessions[0]["session"]
                .as_str()
                .unwrap()
                .starts_with(&format!("jupyter:{user}/default:terminal:")),
            "{listed}"
        );
    }
    std::fs::write(&go, "").unwrap();
    line.clear();
    driver.read_line(&mut line).unwrap();
    let outcome: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    println!("jupyterhub: {outcome}");
    let closed_ms = outcome["closed_ms"]
        .as_f64()
        .expect("alice's websocket closed");
    println!(
        "jupyterhub: alice's terminal websocket closed {closed_ms:.1} ms after her logout request"
    );
    assert!(closed_ms < bound_ms(100.0), "{closed_ms} ms");
    assert_eq!(outcome["bob_echoes"], true, "bob's terminal is untouched");
    assert_eq!(
        outcome["alice_server_ready"], true,
        "alice's server keeps running"
    );
    assert!(
        outcome["reconnect"]
            .as_str()
            .unwrap()
            .starts_with("refused"),
        "{outcome}"
    );
    let kills = sb.audit();
    assert!(
        kills
            .iter()
            .any(|k| k["user"] == "alice" && k["reason"] == "revoked"),
        "{kills:?}"
    );
    assert!(kills.iter().all(|k| k["user"] != "bob"), "{kills:?}");
}
