//! The daemon as an operator runs it: `/metrics` (checked by Prometheus'
//! own `promtool`), `/healthz` and `/readyz`; the live event stream behind
//! `reaper watch`; `reaper top` on a real terminal (tmux); the audit file
//! reopened on SIGHUP, as logrotate needs; JSON and journal logs; and
//! `check-config`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reaper_tests::{bound, reaper_bin, Conn, Sandbox, SECOND};
use serde_json::Value;

const METRICS: &str = "127.0.0.1:9464";

/// One HTTP GET on the sandbox's loopback: (status code, body).
fn get(path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(METRICS).expect("metrics endpoint");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

/// The value of one sample line (`name{labels} value`) of a page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + bound(timeout);
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The sandbox's config with metrics on, and `top_level` keys.
fn with_metrics(sb: &Sandbox, top_level: &str) {
    sb.write_config(&format!(
        "{top_level}[[watch]]\nports = \"5900-5999\"\nside = \"local\"\n[metrics]\nlisten = \"{METRICS}\"\n"
    ));
}

#[test]
fn metrics_pass_promtool_and_count_the_kills() {
    let mut sb = Sandbox::new("service-metrics");
    with_metrics(&sb, "");
    sb.start_daemon();
    assert_eq!(get("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get("/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(get("/nothing").0, 404);

    let (_, before) = get("/metrics");
    let expired = "reaper_kills_total{reason=\"expired\",path=\"destroy\"}";
    assert_eq!(sample(&before, expired), None, "{before}");

    sb.peer(&["127.0.0.1:5900"]);
    let mut flows = [
        Conn::connect("127.0.0.1:5900"),
        Conn::connect("127.0.0.1:5900"),
    ];
    for (i, flow) in flows.iter().enumerate() {
        sb.grant(&format!("m{i}"), "alice", "vm-1", "200ms", flow);
    }
    let refused = sb.request(serde_json::json!({"op": "extend", "session": "nobody", "ttl": "1s"}));
    assert_eq!(refused["error"]["code"], "no_such_session", "{refused}");
    for flow in &mut flows {
        flow.wait_reset(5 * SECOND);
    }
    sb.wait_audit(2, 5 * SECOND);

    let (code, page) = get("/metrics");
    assert_eq!(code, 200);
    assert_eq!(sample(&page, expired), Some(2.0), "{page}");
    assert_eq!(
        sample(&page, "reaper_kill_lateness_seconds_count"),
        Some(2.0)
    );
    assert_eq!(
        sample(&page, "reaper_requests_total{op=\"grant\",code=\"ok\"}"),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "reaper_requests_total{op=\"extend\",code=\"no_such_session\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(sample(&page, "reaper_flows_capacity"), Some(131072.0));
    assert!(sample(&page, "reaper_kernel_tracked_total").unwrap() >= 2.0);
    assert_eq!(
        sample(&page, "reaper_build_info{version=\"0.1.0\"}"),
        Some(1.0)
    );

    // Prometheus' own linter: no error, no warning.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{page}"
    );
    println!(
        "promtool check metrics: clean, {} lines",
        page.lines().count()
    );

    // A refused reload makes the daemon not ready, and says why.
    std::fs::write(&sb.config_path, "max_flows = 1\n").unwrap();
    sb.hangup();
    wait_for("readyz to turn", 5 * SECOND, || get("/readyz").0 == 503);
    let (_, why) = get("/readyz");
    assert!(why.contains("max_flows"), "{why}");
    let (_, page) = get("/metrics");
    assert_eq!(
        sample(&page, "reaper_config_reloads_total{result=\"refused\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "reaper_config_last_reload_successful"),
        Some(0.0)
    );
}

/// Lines a child prints, as they come.
fn lines_of(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn next_event(rx: &mpsc::Receiver<String>, what: &str) -> Value {
    let line = rx
        .recv_timeout(bound(5 * SECOND))
        .unwrap_or_else(|_| panic!("no event from reaper watch (waiting for {what})"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn watchers() -> f64 {
    sample(&get("/metrics").1, "reaper_watchers").unwrap_or(0.0)
}

#[test]
fn watch_streams_grants_kills_and_refusals_filtered_by_user() {
    let mut sb = Sandbox::new("service-watch");
    with_metrics(&sb, "");
    sb.start_daemon();
    let socket = sb.socket.display().to_string();
    let everything =
        sb.spawn(Command::new(reaper_bin()).args(["watch", "--json", "--socket", &socket]));
    let bobs = sb.spawn(
        Command::new(reaper_bin()).args(["watch", "--json", "--user", "bob", "--socket", &socket]),
    );
    let (everything, bobs) = (lines_of(everything), lines_of(bobs));
    wait_for("both watchers", 5 * SECOND, || watchers() == 2.0);

    sb.peer(&["127.0.0.1:5900"]);
    let mut alice = Conn::connect("127.0.0.1:5900");
    let bob = Conn::connect("127.0.0.1:5900");
    let granted = sb.grant("w-alice", "alice", "vm-1", "300ms", &alice);
    let deadline = granted["session"]["deadline_boot_ns"].as_u64().unwrap();
    sb.grant("w-bob", "bob", "vm-2", "1h", &bob);

    let e = next_event(&everything, "alice's grant");
    assert_eq!(
        (e["event"].as_str(), e["session"].as_str()),
        (Some("grant"), Some("w-alice"))
    );
    assert_eq!(e["schema"], 1);
    let e = next_event(&everything, "bob's grant");
    assert_eq!(e["session"], "w-bob");
    let (_, reset_at) = alice.wait_reset(5 * SECOND);
    let e = next_event(&everything, "alice's kill");
    assert_eq!(
        (e["event"].as_str(), e["reason"].as_str()),
        (Some("kill"), Some("expired"))
    );
    assert_eq!(e["session"], "w-alice");
    println!(
        "watch: kill event after the deadline, late_us = {}, client reset {:.3} ms after it",
        e["late_us"],
        (reset_at - deadline) as f64 / 1e6
    );

    // Bob's watcher saw bob's grant first: alice's events, earlier, were
    // not his.
    let e = next_event(&bobs, "bob's grant");
    assert_eq!(e["session"], "w-bob", "{e}");

    let refused = sb.request(serde_json::json!({"op": "touch", "session": "gone"}));
    assert_eq!(refused["error"]["code"], "no_such_session");
    let e = next_event(&everything, "the refusal");
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("refusal"), Some("no_such_session"))
    );
}

#[test]
fn a_watcher_that_stops_reading_is_dropped_and_the_daemon_goes_on() {
    let mut sb = Sandbox::new("service-slow-watch");
    with_metrics(&sb, "client_timeout = \"1s\"\n");
    sb.start_daemon();
    // A watcher that never reads: its socket buffer fills, then the
    // daemon's queue for it; it must be dropped, and grants stay fast.
    let mut stalled = std::os::unix::net::UnixStream::connect(&sb.socket).unwrap();
    stalled.write_all(b"{\"op\":\"watch\"}\n").unwrap();
    wait_for("the watcher", 5 * SECOND, || watchers() == 1.0);
    let mut slowest = Duration::ZERO;
    let mut rounds = 0;
    let started = Instant::now();
    while watchers() == 1.0 {
        assert!(
            started.elapsed() < bound(60 * SECOND),
            "the stalled watcher was never dropped"
        );
        for _ in 0..200 {
            let t = Instant::now();
            let r = sb.request(serde_json::json!({"op": "touch", "session": "none"}));
            assert_eq!(r["error"]["code"], "no_such_session");
            slowest = slowest.max(t.elapsed());
        }
        rounds += 1;
    }
    let (_, page) = get("/metrics");
    assert_eq!(
        sample(&page, "reaper_watchers_dropped_total"),
        Some(1.0),
        "{page}"
    );
    println!(
        "stalled watcher dropped after {} refusals; slowest answer meanwhile {:?}",
        rounds * 200,
        slowest
    );
    assert!(slowest < bound(Duration::from_millis(500)), "{slowest:?}");
}

/// tmux on its own server socket, killed when dropped.
struct Tmux(String);

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.0]);
        c
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

#[test]
fn top_shows_the_sessions_on_a_terminal() {
    let mut sb = Sandbox::new("service-top");
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let flow = Conn::connect("127.0.0.1:5900");
    sb.grant("top-session-1", "alice", "vm-top", "1h", &flow);
    let tmux = Tmux(sb.name.clone());
    let top = format!(
        "{} top --interval 0.2 --socket {}",
        reaper_bin().display(),
        sb.socket.display()
    );
    let started = tmux
        .cmd()
        .args([
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "40",
            &top,
        ])
        .status()
        .unwrap();
    assert!(started.success(), "tmux new-session");
    let mut screen = String::new();
    wait_for("top to draw the session", 10 * SECOND, || {
        screen = tmux.screen();
        screen.contains("top-session-1")
    });
    println!("{screen}");
    assert!(screen.contains("sessions 1 of 65536"), "{screen}");
    assert!(
        screen.contains("alice") && screen.contains("vm-top"),
        "{screen}"
    );
    // It redraws in place: a second session appears on the same screen.
    let second = Conn::connect("127.0.0.1:5900");
    sb.grant("top-session-2", "bob", "vm-top", "30m", &second);
    wait_for("top to redraw", 10 * SECOND, || {
        screen = tmux.screen();
        screen.contains("top-session-2")
    });
    assert_eq!(screen.matches("reaper 0.1.0").count(), 1, "{screen}");
    // Sorted by time left: bob's 30 minutes before alice's hour.
    let (bob, alice) = (
        screen.find("top-session-2").unwrap(),
        screen.find("top-session-1").unwrap(),
    );
    assert!(bob < alice, "{screen}");
}

#[test]
fn the_audit_file_is_reopened_on_sighup() {
    let mut sb = Sandbox::new("service-logrotate");
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let first = Conn::connect("127.0.0.1:5900");
    sb.grant("before", "alice", "vm-1", "1h", &first);
    // What logrotate does without copytruncate: move, then SIGHUP.
    let rotated = sb.dir.join("audit.jsonl.1");
    std::fs::rename(&sb.audit_path, &rotated).unwrap();
    sb.hangup();
    wait_for("the audit file to be reopened", 5 * SECOND, || {
        sb.audit_path.exists()
    });
    let second = Conn::connect("127.0.0.1:5900");
    sb.grant("after", "alice", "vm-1", "1h", &second);
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        old.contains("\"before\"") && !old.contains("\"after\""),
        "{old}"
    );
    let trail = sb.audit_trail();
    assert_eq!(trail.len(), 1, "{trail:?}");
    assert_eq!(
        (trail[0]["session"].as_str(), trail[0]["schema"].as_u64()),
        (Some("after"), Some(1))
    );
}

#[test]
fn json_logs_and_journal_priorities() {
    let mut sb = Sandbox::new("service-logs");
    sb.write_config("log_format = \"json\"\n");
    sb.start_daemon();
    // The socket answers a moment before the daemon logs that it is ready.
    wait_for("the ready line", 10 * SECOND, || {
        sb.daemon_log().contains("reaper daemon ready")
    });
    sb.stop_daemon(libc::SIGTERM);
    let log = sb.daemon_log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "reaper daemon ready"),
        "{log}"
    );

    // Under systemd (JOURNAL_STREAM names stderr), text lines carry the
    // syslog priority the journal files them under.
    use std::os::unix::fs::MetadataExt;
    let mut sb = Sandbox::new("service-journal");
    let log = sb.dir.join("daemon.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let mut daemon = Command::new(reaper_bin());
    daemon.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    sb.start_daemon_as(daemon);
    wait_for("the ready line", 10 * SECOND, || {
        sb.daemon_log().contains("reaper daemon ready")
    });
    sb.stop_daemon(libc::SIGTERM);
    let text = sb.daemon_log();
    assert!(
        text.lines()
            .any(|l| l.starts_with("<6>") && l.contains("reaper daemon ready")),
        "{text}"
    );
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
}

#[test]
fn check_config_prints_the_effective_config_or_names_the_key() {
    let sb = Sandbox::new("service-check-config");
    let good = Command::new(reaper_bin())
        .args(["check-config", "--config"])
        .arg(&sb.config_path)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("socket = {:?}", sb.socket.display().to_string())),
        "{printed}"
    );
    assert!(printed.contains("max_flows = 131072"), "{printed}");
    // What it prints is a config that loads to the same.
    let again = sb.dir.join("effective.toml");
    std::fs::write(&again, printed.as_bytes()).unwrap();
    let reprinted = Command::new(reaper_bin())
        .args(["check-config", "--config"])
        .arg(&again)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&reprinted.stdout), printed);

    std::fs::write(&sb.config_path, "[classes.vnc]\nttl = \"forever\"\n").unwrap();
    let bad = Command::new(reaper_bin())
        .args(["check-config", "--config"])
        .arg(&sb.config_path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1));
    assert!(said.contains("classes.vnc.ttl"), "{said}");
    assert!(bad.stdout.is_empty());
}
