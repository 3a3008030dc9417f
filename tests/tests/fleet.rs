//! The fleet: revocations written on one node (or by `reaper revoke
//! --fleet` anywhere) reach every node through a real 3-member etcd
//! cluster; nodes are network namespaces with their own cgroup, pins,
//! socket and real daemon (`reaper_tests::fleet`).

use std::time::Duration;

use reaper_tests::fleet::{ended_within, Fleet};
use reaper_tests::{bound, Conn};
use serde_json::{json, Value};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Grants `conn` (a hub client of node `i`'s port 5900) as session
/// `session` of `user` on node `i`.
fn grant(fleet: &Fleet, i: usize, session: &str, user: &str, conn: &Conn) -> Value {
    fleet.nodes[i].ok(json!({"op": "grant", "session": session, "user": user,
        "target": format!("vm-{session}"), "ttl": "10m", "flows": [conn.spec()]}))
}

fn revoke_fleet(fleet: &Fleet, from: usize, selector: &str, value: &str) -> i64 {
    let out = fleet.nodes[from].cli(&["revoke", "--fleet", &format!("--{selector}"), value]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "revoke --fleet: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "revoked user "x" fleet-wide at revision N: ..."
    said.split("at revision ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no revision in {said:?}"))
}

fn unix_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

#[test]
fn a_user_revoked_on_one_node_ends_on_every_node_and_nothing_else() {
    let mut fleet = Fleet::new("fleet-revoke-user", 3, false);
    for i in [A, B] {
        fleet.nodes[i].server(5900);
    }
    fleet.start_all("");
    let mut alice_a = fleet.connect(A, 5900);
    let mut alice_b = fleet.connect(B, 5900);
    let mut bob_a = fleet.connect(A, 5900);
    let mut bob_b = fleet.connect(B, 5900);
    grant(&fleet, A, "alice-a", "alice", &alice_a);
    grant(&fleet, B, "alice-b", "alice", &alice_b);
    grant(&fleet, A, "bob-a", "bob", &bob_a);
    grant(&fleet, B, "bob-b", "bob", &bob_b);

    let revision = revoke_fleet(&fleet, C, "user", "alice");
    for (conn, node) in [(&mut alice_a, "A"), (&mut alice_b, "B")] {
        assert!(
            ended_within(&mut conn.stream, Duration::from_secs(5)),
            "alice's flow on {node} outlived the fleet revocation"
        );
    }
    for i in [A, B] {
        fleet.nodes[i].wait_applied(revision, Duration::from_secs(5));
    }
    bob_a.echo().expect("bob's flow on A lives");
    bob_b.echo().expect("bob's flow on B lives");

    // The audit trail names the node that asked (its writer thread may
    // be a moment behind the kill).
    let has_kill = |trail: &[Value]| {
        trail
            .iter()
            .any(|e| e["event"] == "kill" && e["session"] == "alice-a")
    };
    let end = std::time::Instant::now() + bound(Duration::from_secs(5));
    while !has_kill(&fleet.nodes[A].audit()) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let trail = fleet.nodes[A].audit();
    let revoke = trail
        .iter()
        .find(|e| e["event"] == "revoke" && e["session"] == "alice-a")
        .expect("a revoke event on A");
    assert_eq!(revoke["by_node"], "node-c");
    let kill = trail
        .iter()
        .find(|e| e["event"] == "kill" && e["session"] == "alice-a")
        .expect("a kill event on A");
    assert_eq!(kill["reason"], "revoked");
    assert_eq!(kill["by_node"], "node-c");

    // A lock: no node grants alice now, and says who locked her.
    let again = fleet.connect(B, 5900);
    let refused = fleet.nodes[B].request(json!({"op": "grant", "session": "alice-2",
        "user": "alice", "target": "vm-9", "ttl": "10m", "flows": [again.spec()]}));
    assert_eq!(refused["error"]["code"], "locked", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("node-c"), "{message}");
    let status = fleet.nodes[B].fleet_status();
    assert_eq!(status["locks"], json!(["user=alice"]), "{status}");

    // Lifted: grants of alice stand again.
    let out = fleet.nodes[C].cli(&["unlock", "--user", "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let end = std::time::Instant::now() + bound(Duration::from_secs(5));
    loop {
        let r = fleet.nodes[B].request(json!({"op": "grant", "session": "alice-2",
            "user": "alice", "target": "vm-9", "ttl": "10m", "flows": [again.spec()]}));
        if r["ok"] == true {
            break;
        }
        assert!(std::time::Instant::now() < end, "alice still locked: {r}");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Propagation: 100 revokes, each of a user with a flow on A and on B,
    // from the instant the revocation was asked on C to both resets.
    let mut lateness_ms = Vec::new();
    for round in 0..100 {
        let user = format!("u{round}");
        let mut on_a = fleet.connect(A, 5900);
        let mut on_b = fleet.connect(B, 5900);
        grant(&fleet, A, &format!("{user}-a"), &user, &on_a);
        grant(&fleet, B, &format!("{user}-b"), &user, &on_b);
        let revision = revoke_fleet(&fleet, C, "user", &user);
        let mut ended_at = Vec::new();
        for conn in [&mut on_a, &mut on_b] {
            assert!(ended_within(&mut conn.stream, Duration::from_secs(5)));
            ended_at.push(unix_ns());
        }
        // When it was asked: the record's own time, as etcd holds it.
        let record = fleet.etcd.ctl(&[
            "get",
            &format!("/reaper-test/revocations/user/{user}"),
            "--print-value-only",
        ]);
        let record: Value = serde_json::from_slice(&record.stdout).expect("the record");
        let asked = record["at_unix_ns"].as_i64().unwrap() as i128;
        let last = ended_at.into_iter().max().unwrap();
        lateness_ms.push((last - asked) as f64 / 1e6);
        assert!(revision > 0);
    }
    lateness_ms.sort_by(f64::total_cmp);
    let p50 = lateness_ms[49];
    let p99 = lateness_ms[98];
    let max = lateness_ms[99];
    println!(
        "revoke --user propagation, asked on C to both resets on A and B (100 revokes): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
    );
    assert!(
        max < reaper_tests::bound_ms(1000.0),
        "a revocation took {max:.1} ms to end its flows"
    );
}

#[test]
fn a_restarted_node_applies_what_was_revoked_meanwhile_and_relists_after_compaction() {
    let mut fleet = Fleet::new("fleet-restart", 3, false);
    fleet.nodes[A].server(5900);
    fleet.start_all("");
    let mut conns: Vec<Conn> = (0..5).map(|_| fleet.connect(A, 5900)).collect();
    for (i, c) in conns.iter().enumerate() {
        grant(&fleet, A, &format!("s{i}"), &format!("r{i}"), c);
    }

    fleet.nodes[A].stop_daemon(libc::SIGKILL);
    revoke_fleet(&fleet, C, "user", "r0");
    revoke_fleet(&fleet, B, "session", "s1");
    // Revoked and lifted again while A was down: A must still end it.
    revoke_fleet(&fleet, C, "user", "r2");
    let out = fleet.nodes[C].cli(&["unlock", "--user", "r2"]);
    assert!(out.status.success());
    fleet.nodes[A].start_daemon();
    fleet.nodes[A].wait_connected(Duration::from_secs(20));
    for (i, conn) in conns.iter_mut().take(3).enumerate() {
        assert!(
            ended_within(&mut conn.stream, Duration::from_secs(5)),
            "s{i}, revoked while its node was down, outlived the restart"
        );
    }
    conns[3].echo().expect("s3 was never revoked");
    // In the order they were asked (the audit writer is a thread of its
    // own: the lines follow the kills by a moment).
    let revokes = || -> Vec<String> {
        fleet.nodes[A]
            .audit()
            .iter()
            .filter(|e| e["event"] == "revoke")
            .map(|e| e["session"].as_str().unwrap().to_owned())
            .collect()
    };
    let end = std::time::Instant::now() + bound(Duration::from_secs(5));
    while revokes().len() < 3 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(revokes(), ["s0", "s1", "s2"]);
    // r2 is unlocked: its lock is not standing.
    assert_eq!(fleet.nodes[A].fleet_status()["locks"], json!(["user=r0"]));

    // Down again; a revocation, then the history compacted past it: the
    // node cannot replay, so it lists, and still ends s3.
    fleet.nodes[A].stop_daemon(libc::SIGKILL);
    revoke_fleet(&fleet, C, "user", "r3");
    fleet.etcd.compact();
    fleet.nodes[A].start_daemon();
    fleet.nodes[A].wait_connected(Duration::from_secs(20));
    assert!(
        ended_within(&mut conns[3].stream, Duration::from_secs(5)),
        "s3 outlived a restart across a compaction"
    );
    conns[4].echo().expect("s4 was never revoked");
    // The watch from where it left off is refused (compacted): it lists
    // again, says so, and is connected after.
    let end = std::time::Instant::now() + bound(Duration::from_secs(10));
    while !fleet.nodes[A].log().contains("compacted") {
        assert!(
            std::time::Instant::now() < end,
            "the node never said it re-listed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    fleet.nodes[A].wait_connected(Duration::from_secs(10));
    let status = fleet.nodes[A].fleet_status();
    assert!(status["relists"].as_u64().unwrap() >= 2, "{status}");
    assert_eq!(status["locks"], json!(["user=r0", "user=r3"]), "{status}");
}

#[test]
fn revocations_go_on_through_the_other_members_when_one_dies() {
    let mut fleet = Fleet::new("fleet-member-dies", 3, false);
    for i in [A, B] {
        fleet.nodes[i].server(5900);
    }
    fleet.start_all(FLEET_LIMITS);
    fleet.etcd.kill_member(0);
    let mut a = fleet.connect(A, 5900);
    let mut b = fleet.connect(B, 5900);
    // Grants go on: node-local ones need no etcd at all.
    grant(&fleet, A, "x-a", "x", &a);
    grant(&fleet, B, "x-b", "x", &b);
    // A fleet-limited grant needs a member: the node moves to another
    // (within a few seconds: the dead member's pings time out) and the
    // place is taken there; a proxy retries on `partitioned`.
    let limited = fleet.connect(A, 5900);
    let end = std::time::Instant::now() + bound(Duration::from_secs(15));
    loop {
        let answer = fleet.nodes[A].request(json!({"op": "grant", "session": "x-limited",
            "user": "x", "target": "vm-limited", "class": "one", "flows": [limited.spec()]}));
        if answer["ok"] == true {
            break;
        }
        assert_eq!(answer["error"]["code"], "partitioned", "{answer}");
        assert!(
            std::time::Instant::now() < end,
            "no member took the place: {answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    revoke_fleet(&fleet, C, "user", "x");
    for (conn, node) in [(&mut a, "A"), (&mut b, "B")] {
        assert!(
            ended_within(&mut conn.stream, Duration::from_secs(10)),
            "a revocation issued with a member down never reached {node}"
        );
    }
    fleet.etcd.restart_member(0);
}

/// A class whose sessions die on a node cut off from the fleet.
const FAIL_CLOSED: &str = "[classes.secure]\nttl = \"10m\"\non_partition = \"fail-closed\"\n";

#[test]
fn a_partition_ends_fail_closed_sessions_at_the_grace_and_revocations_apply_after_it_heals() {
    let mut fleet = Fleet::new("fleet-partition", 3, false);
    fleet.nodes[B].server(5900);
    // node_lease 4 s, so fleet.grace is 2 s.
    fleet.start_all(&format!("{FAIL_CLOSED}{FLEET_LIMITS}"));
    let mut conn = fleet.connect(B, 5900);
    grant(&fleet, B, "p-b", "p", &conn);
    let mut secure = fleet.connect(B, 5900);
    fleet.nodes[B].ok(
        json!({"op": "grant", "session": "s-b", "user": "s", "target": "vm-s",
        "class": "secure", "flows": [secure.spec()]}),
    );
    // Cut B off from etcd (not from its clients: only the members' ports).
    let netns = fleet.nodes[B].netns.clone();
    let nft = |rules: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(rules.as_bytes())?;
                child.wait()
            })
            .expect("run nft");
        assert!(out.success(), "nft {rules}");
    };
    nft("table inet cut {\n chain out {\n  type filter hook output priority 0;\n  tcp dport 2379-2384 drop\n }\n}\n");
    let cut_at = reaper_tests::boot_ns();

    // fail-closed: the secure session dies at the grace (2 s) +- 1 s; the
    // best-effort one lives on.
    let (_, secure_end) = secure.wait_reset(Duration::from_secs(6));
    let after_ms = (secure_end - cut_at) as f64 / 1e6;
    println!(
        "partition: the fail-closed session died {after_ms:.0} ms after the cut (grace 2000 ms)"
    );
    assert!((1000.0..=3000.0).contains(&after_ms), "{after_ms} ms");
    conn.echo()
        .expect("the best-effort session lives through the partition");
    let status = fleet.nodes[B].fleet_status();
    assert_eq!(status["cut_off"], true, "{status}");
    let mut another = fleet.connect(B, 5900);
    let refused = fleet.nodes[B].request(json!({"op": "grant", "session": "s-b2", "user": "s",
        "target": "vm-s", "class": "secure", "flows": [another.spec()]}));
    assert_eq!(refused["error"]["code"], "partitioned", "{refused}");
    grant(&fleet, B, "p-b2", "q", &another);
    // best-effort: what needs a fleet-wide place is refused meanwhile.
    let limited = fleet.connect(B, 5900);
    let refused = fleet.nodes[B].request(json!({"op": "grant", "session": "l-b", "user": "l",
        "target": "vm-l", "class": "one", "flows": [limited.spec()]}));
    assert_eq!(refused["error"]["code"], "partitioned", "{refused}");
    let kill = wait_kill(&fleet.nodes[B], "s-b");
    assert_eq!(kill["reason"], "partitioned", "{kill}");

    let end = std::time::Instant::now() + bound(Duration::from_secs(15));
    while fleet.nodes[B].fleet_status()["connected"] == true {
        assert!(
            std::time::Instant::now() < end,
            "B never noticed the partition"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    revoke_fleet(&fleet, A, "user", "p");
    assert!(
        !ended_within(&mut conn.stream, Duration::from_millis(500)),
        "B cannot have heard of the revocation while cut off"
    );
    nft("delete table inet cut\n");
    let healed = std::time::Instant::now();
    assert!(
        ended_within(&mut conn.stream, Duration::from_secs(1)),
        "a revocation issued during the partition was not applied within 1 s of healing"
    );
    println!(
        "partition: the revocation was applied {:.0} ms after the partition healed",
        healed.elapsed().as_secs_f64() * 1e3
    );
    another.echo().expect("q's session was not revoked");
    let end = std::time::Instant::now() + bound(Duration::from_secs(5));
    while fleet.nodes[B].fleet_status()["cut_off"] == true {
        assert!(std::time::Instant::now() < end, "B never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tls_nodes_need_a_certificate_the_cluster_trusts() {
    let mut fleet = Fleet::new("fleet-tls", 2, true);
    fleet.nodes[A].server(5900);
    let certs = fleet.etcd.certs().unwrap();
    let (ca, cert, key) = (
        certs.ca.clone(),
        certs.client_cert.clone(),
        certs.client_key.clone(),
    );
    let (rogue_cert, rogue_key) = (certs.rogue_cert.clone(), certs.rogue_key.clone());
    let endpoints = fleet.etcd.endpoints_from(1);
    fleet.nodes[A].write_config(&endpoints, Some((&ca, &cert, &key)), "");
    fleet.nodes[A].start_daemon();
    fleet.nodes[A].wait_connected(Duration::from_secs(20));
    let endpoints = fleet.etcd.endpoints_from(2);
    fleet.nodes[B].write_config(&endpoints, Some((&ca, &rogue_cert, &rogue_key)), "");
    fleet.nodes[B].start_daemon();

    // The node with a certificate the CA did not sign is refused, and
    // says so in its status and its log.
    let end = std::time::Instant::now() + bound(Duration::from_secs(20));
    let error = loop {
        let status = fleet.nodes[B].fleet_status();
        assert_ne!(status["connected"], true, "a rogue certificate was let in");
        if let Some(e) = status["last_error"].as_str() {
            break e.to_owned();
        }
        assert!(
            std::time::Instant::now() < end,
            "no error reported: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("the rogue node says: {error}");
    assert!(error.contains("etcd"), "{error}");
    assert!(fleet.nodes[B].log().contains(&error[..20.min(error.len())]));

    // The trusted node works over TLS.
    let mut conn = fleet.connect(A, 5900);
    grant(&fleet, A, "t-a", "t", &conn);
    let out = fleet.nodes[B].cli(&["revoke", "--fleet", "--user", "t"]);
    assert!(
        !out.status.success(),
        "the rogue certificate wrote a revocation"
    );
    revoke_fleet(&fleet, A, "user", "t");
    assert!(ended_within(&mut conn.stream, Duration::from_secs(5)));
}

/// What both nodes of the console test watch: the proxy's client port and
/// its upstream to consoles (node A), the fenced console port (node B).
const CONSOLE_CONFIG: &str = "fence_grace = \"1s\"\n[[watch]]\nports = \"6080\"\nside = \"local\"\n[[watch]]\nports = \"5900\"\nside = \"remote\"\n[[fence]]\nports = \"5900\"\n";

#[test]
fn a_console_session_across_nodes_lives_through_the_fence_and_ends_everywhere_at_its_deadline() {
    let mut fleet = Fleet::new("fleet-console", 2, false);
    let console = fleet.nodes[B].server(5900);
    fleet.start_all(CONSOLE_CONFIG);
    fleet.nodes[A].wait_knows("node-b", Duration::from_secs(10));
    // The console proxy on A: accepts the browser, connects to B's
    // console, grants both its sockets on A only.
    let script = reaper_tests::script("fd_proxy.py");
    let socket = fleet.nodes[A].socket.clone();
    let upstream_to = format!("{}:5900", fleet.nodes[B].addr());
    let mut pythonpath = std::ffi::OsString::from("PYTHONPATH=");
    pythonpath.push(reaper_tests::python_path());
    let proxy = fleet.nodes[A].spawn(
        &[
            "env".as_ref(),
            pythonpath.as_os_str(),
            "python3".as_ref(),
            script.as_os_str(),
            socket.as_os_str(),
            "0.0.0.0:6080".as_ref(),
            upstream_to.as_ref(),
            "4".as_ref(),
            "console-1".as_ref(),
        ],
        0,
    );
    fleet.nodes[A]
        .peer_mut(proxy)
        .expect(|l| l == "listening", Duration::from_secs(20));
    let mut browser = fleet.connect(A, 6080);
    let upstream: std::net::SocketAddr = fleet.nodes[A]
        .peer_mut(proxy)
        .expect(|l| l.starts_with("upstream "), Duration::from_secs(10))["upstream ".len()..]
        .parse()
        .unwrap();
    let granted: Value = serde_json::from_str(
        &fleet.nodes[A]
            .peer_mut(proxy)
            .expect(|l| l.starts_with('{'), Duration::from_secs(10)),
    )
    .unwrap();
    assert_eq!(granted["session"]["session"], "console-1", "{granted}");
    let granted_at = std::time::Instant::now();
    let deadline = granted["session"]["deadline_boot_ns"].as_u64().unwrap();

    // B mirrors it: the upstream connection is granted there too.
    let mirror = loop {
        let listed = fleet.nodes[B].ok(json!({"op": "list", "session": "console-1"}));
        if let Some(s) = listed["sessions"].as_array().and_then(|s| s.first()) {
            break s.clone();
        }
        assert!(
            granted_at.elapsed() < bound(Duration::from_secs(1)),
            "B never mirrored the session: {}\n{}",
            fleet.nodes[B].fleet_status(),
            fleet.nodes[B].log()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    println!(
        "fleet console: mirrored on B {:.1} ms after the grant on A",
        granted_at.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        mirror["flows"][0]["remote"],
        upstream.to_string(),
        "{mirror}"
    );
    // The same wall-clock instant, on B's boot clock: as near as the two
    // daemons' readings of the wall clock (here one machine).
    let skew_us = (mirror["deadline_boot_ns"].as_u64().unwrap() as f64 - deadline as f64) / 1e3;
    println!("fleet console: B's deadline is {skew_us:.0} us from A's");
    assert!(skew_us.abs() < 1000.0, "{mirror}");

    // `reaper list --fleet`, from any node: the session, its node, where
    // it lands.
    let listed = fleet.nodes[B].cli(&["list", "--fleet", "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        (
            &listed[0]["session"],
            &listed[0]["node"],
            &listed[0]["lands_on"]
        ),
        (&json!("console-1"), &json!("node-a"), &json!(["node-b"])),
        "{listed}"
    );

    // A connection around the proxy gets no such grant: B's fence kills it.
    let around_at = reaper_tests::boot_ns();
    let mut around = fleet.connect(B, 5900);
    let (_, around_end) = around.wait_reset(Duration::from_secs(5));
    println!(
        "fleet console: a connection around the proxy died {:.0} ms after connecting (fence_grace 1 s)",
        (around_end - around_at) as f64 / 1e6
    );
    // Past the fence's grace, the proxied console still works.
    browser
        .echo()
        .expect("the console answers through the proxy past B's fence grace");
    assert_eq!(
        fleet.nodes[B]
            .peer_mut(console)
            .wait_end(upstream, Duration::from_millis(50)),
        None,
        "the upstream connection survived B's fence"
    );

    // At the deadline every end sees it.
    let (_, browser_end) = browser.wait_reset(Duration::from_secs(10));
    let console_end = fleet.nodes[B]
        .peer_mut(console)
        .wait_end(upstream, Duration::from_secs(5));
    let console_seen = reaper_tests::boot_ns();
    // Destroyed by B's own daemon ("aborted"), or reset by A's RST
    // first: either way it ended.
    assert!(
        matches!(console_end.as_deref(), Some("aborted" | "reset")),
        "B's console end: {console_end:?}"
    );
    let ends: Value = serde_json::from_str(
        &fleet.nodes[A]
            .peer_mut(proxy)
            .expect(|l| l.starts_with('{'), Duration::from_secs(5)),
    )
    .unwrap();
    assert_eq!(
        ends.as_object().map(|o| o.len()),
        Some(2),
        "the proxy's sockets: {ends}"
    );
    let late_ms = |at: u64| (at as f64 - deadline as f64) / 1e6;
    let b_kill = wait_kill(&fleet.nodes[B], "console-1");
    // The proxy's two sockets, killed on A.
    let a_kill = wait_kill(&fleet.nodes[A], "console-1");
    println!(
        "fleet console: A killed the proxy's sockets {:.1} ms late ({})",
        a_kill["late_us"].as_f64().unwrap() / 1e3,
        a_kill["reason"]
    );
    assert_eq!(a_kill["reason"], "expired", "{a_kill}");
    println!(
        "fleet console: at the deadline, browser reset {:.1} ms late, B's console saw its reset by {:.1} ms, B killed it {:.1} ms late ({}), proxy saw {ends}",
        late_ms(browser_end),
        late_ms(console_seen),
        b_kill["late_us"].as_f64().unwrap() / 1e3,
        b_kill["reason"]
    );
    assert!(browser_end >= deadline && late_ms(browser_end) < reaper_tests::bound_ms(200.0));
    assert_eq!(
        b_kill["reason"], "expired",
        "B ends it at its own deadline: {b_kill}"
    );
    assert!(
        b_kill["late_us"].as_f64().unwrap() / 1e3 < reaper_tests::bound_ms(200.0),
        "{b_kill}"
    );
    assert_eq!(b_kill["by_node"], Value::Null);
}

/// The audit trail's kill event of `session` on `node`, once written.
fn wait_kill(node: &reaper_tests::fleet::Node, session: &str) -> Value {
    let end = std::time::Instant::now() + bound(Duration::from_secs(2));
    loop {
        let found = node
            .audit()
            .into_iter()
            .find(|e| e["event"] == "kill" && e["session"] == session);
        if let Some(kill) = found {
            return kill;
        }
        assert!(
            std::time::Instant::now() < end,
            "no kill of {session} on {}: {:?}",
            node.name,
            node.audit()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One session per target across the fleet: reject-new, and evict-oldest.
const FLEET_LIMITS: &str = "[classes.one]\nttl = \"10m\"\nmax_per_target = 1\nlimit_scope = \"fleet\"\n[classes.newest]\nttl = \"10m\"\nmax_per_target = 1\non_limit = \"evict-oldest\"\nlimit_scope = \"fleet\"\n";

/// Sends `line` to `socket` when `start` lets it go; the answer and how
/// long it took (ms).
fn answer_at(socket: &std::path::Path, line: String, start: &std::sync::Barrier) -> (Value, f64) {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    start.wait();
    let asked = std::time::Instant::now();
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut reply)
        .unwrap();
    (
        serde_json::from_str(&reply).unwrap(),
        asked.elapsed().as_secs_f64() * 1e3,
    )
}

#[test]
fn two_nodes_racing_for_the_last_fleet_wide_place_never_both_win() {
    let mut fleet = Fleet::new("fleet-limits", 2, false);
    for i in [A, B] {
        fleet.nodes[i].server(5900);
    }
    fleet.start_all(FLEET_LIMITS);
    let names = ["a", "b"];
    let mut wins = [0; 2];
    let mut winner_ms = Vec::new();
    for round in 0..200 {
        let conns = [fleet.connect(A, 5900), fleet.connect(B, 5900)];
        let start = std::sync::Barrier::new(2);
        let answers: Vec<(Value, f64)> = std::thread::scope(|s| {
            let asks: Vec<_> = [A, B]
                .into_iter()
                .map(|i| {
                    let line = json!({"op": "grant", "session": format!("r{round}-{}", names[i]),
                        "user": "u", "target": format!("vm-{round}"), "class": "one",
                        "flows": [conns[i].spec()]})
                    .to_string();
                    let (socket, start) = (fleet.nodes[i].socket.clone(), &start);
                    s.spawn(move || answer_at(&socket, line, start))
                })
                .collect();
            asks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<usize> = (0..2).filter(|i| answers[*i].0["ok"] == true).collect();
        assert_eq!(won.len(), 1, "round {round}: exactly one wins: {answers:?}");
        let (w, l) = (won[0], 1 - won[0]);
        let refusal = &answers[l].0["error"];
        assert_eq!(refusal["code"], "limit_reached", "round {round}: {refusal}");
        let message = refusal["message"].as_str().unwrap();
        assert!(
            message.contains(&format!(
                "session \"r{round}-{}\" on node node-{}",
                names[w], names[w]
            )),
            "round {round}: the refusal names the holder and its node: {message}"
        );
        wins[w] += 1;
        winner_ms.push(answers[w].1);
    }
    let listed = fleet.nodes[A].cli(&["list", "--fleet", "--json", "--target", "vm-7"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(
        listed[0]["places"],
        json!(["target \"vm-7\" (class one)"]),
        "{listed}"
    );
    winner_ms.sort_by(f64::total_cmp);
    println!(
        "fleet limits: 200 rounds, node-a won {}, node-b won {}; the winner's grant took p50 {:.2} ms, p99 {:.2} ms",
        wins[0],
        wins[1],
        winner_ms[100],
        winner_ms[197]
    );

    // A place survives its holder's daemon being killed and restarted:
    // past the old lease, the place is still held (under the new one).
    let held = fleet.connect(A, 5900);
    fleet.nodes[A].ok(
        json!({"op": "grant", "session": "kept", "user": "u", "target": "vm-kept",
        "class": "one", "flows": [held.spec()]}),
    );
    fleet.nodes[A].stop_daemon(libc::SIGKILL);
    fleet.nodes[A].start_daemon();
    fleet.nodes[A].wait_connected(Duration::from_secs(20));
    // node_lease is 4 s: the lease the place was written under is gone.
    std::thread::sleep(Duration::from_secs(5));
    let rival = fleet.connect(B, 5900);
    let refused = fleet.nodes[B].request(json!({"op": "grant", "session": "rival", "user": "u",
        "target": "vm-kept", "class": "one", "flows": [rival.spec()]}));
    assert_eq!(refused["error"]["code"], "limit_reached", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("session \"kept\" on node node-a"),
        "{refused}"
    );

    // evict-oldest: the newer grant, on the other node, takes the place;
    // the older session ends on its node.
    let mut older = fleet.connect(A, 5900);
    fleet.nodes[A].ok(
        json!({"op": "grant", "session": "old", "user": "u", "target": "vm-x",
        "class": "newest", "flows": [older.spec()]}),
    );
    let newer = fleet.connect(B, 5900);
    fleet.nodes[B].ok(
        json!({"op": "grant", "session": "new", "user": "u", "target": "vm-x",
        "class": "newest", "flows": [newer.spec()]}),
    );
    assert!(
        ended_within(&mut older.stream, Duration::from_secs(1)),
        "the oldest holder on node-a was not evicted"
    );
    let kill = wait_kill(&fleet.nodes[A], "old");
    assert_eq!(kill["by_node"], "node-b", "{kill}");
}
