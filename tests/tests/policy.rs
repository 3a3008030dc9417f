//! Policy in force: directional idle timeouts, `touch`, session limits, fences and
//! pre-registration, a real third-party proxy (websockify), and SIGHUP reload.

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use reaper_tests::{
    assert_reset, boot_ns, bound_ms, python, script, sleep_until_boot, wait_listening, Conn,
    Sandbox, SECOND,
};
use serde_json::{json, Value};

const MS: u64 = 1_000_000;

/// A sandbox whose peer streams "screen updates" on 5900 and echoes.
fn streaming_sandbox(name: &str) -> Sandbox {
    let mut sb = Sandbox::new(name);
    sb.start_daemon();
    sb.peer(&["stream:127.0.0.1:5900"]);
    sb
}

/// Grants `flow` with an idle timeout; returns the boot time of the grant.
fn grant_idle(sb: &Sandbox, flow: &Conn, session: &str, idle: &str, direction: &str) -> u64 {
    let r = sb.ok(
        json!({"op": "grant", "session": session, "user": "alice", "target": "vm-1",
                         "ttl": "60s", "idle_timeout": idle, "idle_direction": direction,
                         "flows": [flow.spec()]}),
    );
    assert_eq!(r["session"]["idle_timeout_ms"], 800, "{r}");
    r["session"]["deadline_boot_ns"].as_u64().unwrap() - 60_000 * MS
}

fn listed(sb: &Sandbox, session: &str) -> bool {
    let l = sb.ok(json!({"op": "list", "session": session}));
    !l["sessions"].as_array().unwrap().is_empty()
}

/// Test 1a: under `input`, a server streaming to an idle client does not keep
/// the flow alive; it dies within 1 s of its idle deadline.
#[test]
fn idle_input_ignores_the_servers_stream() {
    let sb = streaming_sandbox("idle-input");
    let mut flow = Conn::connect("127.0.0.1:5900");
    flow.echo().unwrap();
    let granted = grant_idle(&sb, &flow, "idle", "800ms", "input");
    let idle_deadline = granted + 800 * MS;
    // wait_reset reads (and discards) the stream while waiting.
    let (err, seen_at) = flow.wait_reset(10 * SECOND);
    assert_reset(&err);
    assert!(seen_at >= idle_deadline, "killed before its idle deadline");
    let late_ms = (seen_at - idle_deadline) as f64 / 1e6;
    println!(
        "idle flow reset {late_ms:.1} ms after its idle deadline (server streaming throughout)"
    );
    assert!(late_ms < bound_ms(1000.0));
    let events = sb.wait_audit(1, 5 * SECOND);
    assert_eq!(events[0]["reason"], "idle");
    println!(
        "audit: idle kill {} us after the idle deadline",
        events[0]["late_us"]
    );
}

/// Keeps a session alive with `activity` every `every` for 2.5 s (three
/// idle timeouts of 800 ms), checks it is still there, then expects the kill
/// one idle timeout after the last activity.
fn alive_while_active_then_idle(
    sb: &Sandbox,
    flow: &mut Conn,
    session: &str,
    every: Duration,
    mut activity: impl FnMut(&mut Conn),
) {
    let granted = grant_idle(sb, flow, session, "800ms", "input");
    let mut last = granted;
    while boot_ns() < granted + 2_500 * MS {
        // Taken before: the daemon and the kernel see the activity after it.
        last = boot_ns();
        activity(flow);
        std::thread::sleep(every);
    }
    assert!(
        listed(sb, session),
        "activity kept the session alive past 3 idle timeouts"
    );
    let (err, seen_at) = flow.wait_reset(10 * SECOND);
    assert_reset(&err);
    let since_last = (seen_at - last) as f64 / 1e6;
    println!("{session}: killed {since_last:.0} ms after the last activity (idle timeout 800 ms)");
    assert!((800.0..1800.0).contains(&since_last));
}

/// Test 1b: under `input`, the client's keystrokes keep the flow alive; once
/// they stop, the flow dies an idle timeout later.
#[test]
fn idle_input_counts_the_clients_keystrokes() {
    let sb = streaming_sandbox("idle-keys");
    let mut flow = Conn::connect("127.0.0.1:5900");
    flow.echo().unwrap();
    alive_while_active_then_idle(&sb, &mut flow, "typing", Duration::from_millis(200), |f| {
        f.stream.write_all(b"k").unwrap()
    });
}

/// Test 1c: under `any`, the server's stream counts as activity.
#[test]
fn idle_any_counts_the_servers_stream() {
    let sb = streaming_sandbox("idle-any");
    let mut flow = Conn::connect("127.0.0.1:5900");
    flow.echo().unwrap();
    let granted = grant_idle(&sb, &flow, "watching", "800ms", "any");
    sleep_until_boot(granted + 2_500 * MS);
    assert!(
        listed(&sb, "watching"),
        "the stream keeps an `any` session alive"
    );
    assert!(sb.audit().is_empty());
    sb.ok(json!({"op": "revoke", "session": "watching"}));
    let (err, _) = flow.wait_reset(5 * SECOND);
    assert_reset(&err);
}

/// Test 2: `touch` keeps a flow alive past its kernel-observed idle deadline.
#[test]
fn touch_keeps_an_idle_flow_alive() {
    let mut sb = Sandbox::new("touch");
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let mut flow = Conn::connect("127.0.0.1:5900");
    let touch = |_: &mut Conn| {
        sb.ok(json!({"op": "touch", "session": "vnc"}));
    };
    alive_while_active_then_idle(&sb, &mut flow, "vnc", Duration::from_millis(300), touch);
    let out = sb.cli(&["touch", "--session", "vnc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_session"));
}

/// Test 3: one session per target. `reject-new` refuses the second user,
/// naming the first, and kills the new flow; `evict-oldest` kills the first.
#[test]
fn session_limits_reject_or_evict() {
    let mut sb = Sandbox::new("limits");
    sb.write_config(
        r#"
[[watch]]
ports = "5900"
side = "local"
[classes.exclusive]
max_per_target = 1
on_limit = "reject-new"
[classes.takeover]
max_per_target = 1
on_limit = "evict-oldest"
"#,
    );
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let grant = |class: &str, session: &str, user: &str, target: &str, flow: &Conn| {
        sb.request(
            json!({"op": "grant", "class": class, "session": session, "user": user,
                          "target": target, "ttl": "60s", "flows": [flow.spec()]}),
        )
    };

    let mut first = Conn::connect("127.0.0.1:5900");
    let mut second = Conn::connect("127.0.0.1:5900");
    assert_eq!(
        grant("exclusive", "a1", "alice", "vm-1", &first)["ok"],
        true
    );
    let r = grant("exclusive", "b1", "bob", "vm-1", &second);
    assert_eq!(r["error"]["code"], "limit_reached", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"alice\"") && msg.contains("since 20"),
        "{msg}"
    );
    let (err, _) = second.wait_reset(2 * SECOND);
    assert_reset(&err);
    first.echo().expect("the holder keeps the console");

    let mut old = Conn::connect("127.0.0.1:5900");
    let mut new = Conn::connect("127.0.0.1:5900");
    assert_eq!(grant("takeover", "c1", "carol", "vm-2", &old)["ok"], true);
    assert_eq!(grant("takeover", "d1", "dave", "vm-2", &new)["ok"], true);
    let (err, _) = old.wait_reset(2 * SECOND);
    assert_reset(&err);
    new.echo().expect("the newcomer keeps the console");

    let events = sb.wait_audit(2, 5 * SECOND);
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["rejected", "evicted"]);
    assert_eq!(events[1]["session"], "c1");
    let sessions: Vec<String> = sb.ok(json!({"op": "list"}))["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sessions.len(), 2);
    assert!(sessions.contains(&"a1".into()) && sessions.contains(&"d1".into()));
}

/// Test 4: on a fenced port an unregistered connection dies after the grace
/// window; a pre-registered one lives; a registration inside the window
/// saves it.
#[test]
fn fenced_port_kills_what_was_not_granted() {
    let mut sb = Sandbox::new("fence");
    sb.write_config("fence_grace = \"600ms\"\n[[fence]]\nports = \"5910\"\nside = \"local\"\n");
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5910"]);

    // Registered before it exists: any client port, to the console port.
    let r = sb.ok(json!({"op": "grant", "session": "pre", "user": "alice", "target": "vm-1",
                         "ttl": "60s", "expect": [{"local": "127.0.0.1:5910", "remote": "127.0.0.1:0"}]}));
    assert_eq!(r["session"]["expecting"], 1);

    let opened = boot_ns();
    let mut pre = Conn::connect("127.0.0.1:5910");
    let mut rogue = Conn::connect("127.0.0.1:5910");
    let mut late = Conn::connect("127.0.0.1:5910");
    std::thread::sleep(Duration::from_millis(100));
    sb.ok(
        json!({"op": "grant", "session": "late", "user": "bob", "target": "vm-2",
                 "ttl": "60s", "flows": [late.spec()]}),
    );

    let (err, seen_at) = rogue.wait_reset(5 * SECOND);
    assert_reset(&err);
    let lived_ms = (seen_at - opened) as f64 / 1e6;
    println!("unregistered connection lived {lived_ms:.0} ms (grace 600 ms)");
    assert!((600.0..1600.0).contains(&lived_ms));
    let events = sb.wait_audit(1, 5 * SECOND);
    assert_eq!(events[0]["reason"], "unauthorized");
    assert_eq!(events[0]["remote"], rogue.client.to_string());

    sleep_until_boot(opened + 1_000 * MS);
    pre.echo().expect("the pre-registered connection lives");
    late.echo()
        .expect("a registration inside the window saves the connection");
    let listed = sb.ok(json!({"op": "list", "session": "pre"}));
    assert_eq!(listed["sessions"][0]["expecting"], 0);
    assert_eq!(
        listed["sessions"][0]["flows"][0]["remote"],
        pre.client.to_string()
    );
    assert_eq!(sb.audit().len(), 1, "only the unregistered connection died");
}

/// Test 5: websockify (from PyPI) proxies a websocket client to a TCP console
/// server on another host (netns). The client package's wrapper
/// (`python3 -m reaper_client.websockify`) registers websockify's two
/// sockets; at the deadline the websocket client sees its connection
/// closed and the console server sees a reset.
#[test]
fn websockify_connection_ends_at_its_deadline() {
    let mut sb = Sandbox::new("websockify");
    // websockify's client-facing port, and the console port it connects to.
    sb.write_config("[[watch]]\nports = \"6080\"\nside = \"local\"\n[[watch]]\nports = \"5900\"\nside = \"remote\"\n");
    sb.start_daemon();
    let host = sb.other_host();
    let console = sb.peer_on(&host, &["198.18.0.2:5900"]);

    let socket = sb.socket.clone();
    let _proxy_out = sb.spawn(
        python()
            .args(["-m", "reaper_client.websockify", "--reaper-socket"])
            .arg(&socket)
            .args(["--reaper-user", "erin", "--reaper-ttl", "1.5", "--"])
            .args(["--run-once", "127.0.0.1:6080", "198.18.0.2:5900"]),
    );
    assert!(
        wait_listening(6080, 20 * SECOND),
        "websockify did not start"
    );

    let mut client = BufReader::new(
        sb.spawn(
            python()
                .arg(script("ws_client.py"))
                .arg("ws://127.0.0.1:6080/"),
        ),
    );
    let mut line = String::new();
    client.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "echo ping",
        "the websocket round trip through websockify"
    );
    // Without a token, the wrapper names the session by the client's port.
    let listed = sb.ok(json!({"op": "list", "user": "erin"}));
    let session = &listed["sessions"][0];
    let name = session["session"].as_str().unwrap().to_owned();
    assert!(name.starts_with("ws-"), "{listed}");
    assert_eq!(session["target"], "198.18.0.2:5900");
    assert_eq!(session["flows"].as_array().unwrap().len(), 2, "{listed}");
    let deadline = session["deadline_boot_ns"].as_u64().unwrap();

    line.clear();
    client.read_line(&mut line).unwrap();
    let closed_at = boot_ns();
    assert!(
        line.starts_with("closed "),
        "websocket client saw: {line:?}"
    );
    println!(
        "websocket client: {} {:.1} ms after the deadline",
        line.trim(),
        (closed_at as f64 - deadline as f64) / 1e6
    );
    assert!(closed_at >= deadline);
    let end = sb
        .peer_mut(console)
        .expect(|l| l.starts_with("end "), 5 * SECOND);
    assert!(end.ends_with(" reset"), "the console server saw: {end}");
    let events = sb.wait_audit(2, 5 * SECOND);
    assert!(
        events
            .iter()
            .all(|e| e["session"] == name.as_str() && e["reason"] == "expired"),
        "{events:?}"
    );
}

fn status(sb: &Sandbox) -> Value {
    sb.ok(json!({"op": "status"}))
}

fn wait_for_loads(sb: &Sandbox, pred: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + 5 * SECOND;
    loop {
        let s = status(sb);
        if pred(&s) || Instant::now() > end {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Test 6: SIGHUP reloads a changed class without dropping live grants; an
/// invalid file is refused with an error and the old config stays in force.
/// Grants come from an unprivileged proxy uid: root may exceed class bounds.
#[test]
fn sighup_reload_keeps_grants_and_refuses_bad_files() {
    const PROXY_UID: u32 = 65534;
    let mut sb = Sandbox::new("reload");
    let with_class = |max_ttl: &str| {
        format!(
            "socket_mode = \"0666\"\n[access]\nuids = [{PROXY_UID}]\n[[watch]]\nports = \"5900\"\nside = \"local\"\n[classes.vm]\nmax_ttl = \"{max_ttl}\"\n"
        )
    };
    sb.write_config(&with_class("1h"));
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let mut live = Conn::connect("127.0.0.1:5900");
    let other = Conn::connect("127.0.0.1:5900");
    let grant = |session: &str, ttl: &str, flow: &Conn| -> Value {
        let flow_arg = format!("{},{}", flow.server, flow.client);
        let out = sb.cli_as(
            PROXY_UID,
            &[
                "grant",
                "--json",
                "--class",
                "vm",
                "--session",
                session,
                "--user",
                "alice",
                "--target",
                session,
                "--ttl",
                ttl,
                "--flow",
                &flow_arg,
            ],
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{out:?}: {e}"))
    };
    let before = grant("live", "30m", &live);
    assert_eq!(before["ok"], true, "{before}");
    let deadline = before["result"]["session"]["deadline_boot_ns"].clone();

    // Tighter class: the live grant keeps its terms, new grants get the new ones.
    sb.write_config(&with_class("5s"));
    sb.hangup();
    let s = wait_for_loads(&sb, |s| s["config_loads"] == 2);
    assert_eq!(s["config_loads"], 2, "{s}");
    let refused = grant("other", "30m", &other);
    assert_eq!(refused["error"]["code"], "deadline_refused", "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("class \"vm\""));
    let listed = sb.ok(json!({"op": "list", "session": "live"}));
    assert_eq!(listed["sessions"][0]["deadline_boot_ns"], deadline);

    // A broken file: refused as a whole, the 5 s class stays.
    std::fs::write(&sb.config_path, "[classes.vm\nmax_ttl = ").unwrap();
    sb.hangup();
    let s = wait_for_loads(&sb, |s| s["last_reload_error"].is_string());
    let why = s["last_reload_error"]
        .as_str()
        .expect("the refusal is reported");
    println!("reload refused: {why}");
    assert!(why.contains("reaper.toml"), "{why}");
    assert_eq!(s["config_loads"], 2);
    assert_eq!(
        grant("other", "30m", &other)["error"]["code"],
        "deadline_refused"
    );
    assert_eq!(grant("other", "4s", &other)["ok"], true);
    assert!(sb.daemon_log().contains("config reload refused"));
    live.echo().unwrap();
    let after = sb.ok(json!({"op": "list", "session": "live"}));
    assert_eq!(after["sessions"][0]["deadline_boot_ns"], deadline);
}
