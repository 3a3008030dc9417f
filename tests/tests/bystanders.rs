//! Nothing else is ever touched: a thousand other connections in the same namespace —
//! watched but ungranted, unwatched, a listener, TIME_WAIT entries — survive
//! every kind of kill.

use std::time::Duration;

use reaper_tests::{assert_reset, count_tcp_state, Conn, Sandbox, SECOND};
use serde_json::json;

#[test]
fn bystanders_survive_every_kill() {
    let mut sb = Sandbox::new("bystanders");
    sb.start_daemon();
    let peer = sb.peer(&["127.0.0.1:5900", "127.0.0.1:5901", "127.0.0.1:7000"]);

    // 10 TIME_WAIT entries: the client closes first, so its end waits.
    // Loopback connects may otherwise take over a TIME_WAIT entry's port
    // once it is a second old (tcp_tw_reuse = 2), which a slow machine
    // reaches; this namespace is the test's own.
    let status = std::process::Command::new("sysctl")
        .args(["-qw", "net.ipv4.tcp_tw_reuse=0"])
        .status();
    assert!(status.is_ok_and(|s| s.success()), "sysctl tcp_tw_reuse");
    let mut ends = Vec::new();
    for port in [5900, 5901] {
        for _ in 0..5 {
            let f = Conn::connect(&format!("127.0.0.1:{port}"));
            let client = f.client;
            f.stream.shutdown(std::net::Shutdown::Both).unwrap();
            drop(f);
            let end = sb
                .peer_mut(peer)
                .wait_end(client, 5 * SECOND)
                .expect("peer saw the close");
            ends.push(format!("{client} {end}"));
        }
    }
    // Let the last FIN/ACK exchanges land before counting.
    let deadline = std::time::Instant::now() + 5 * SECOND;
    while count_tcp_state("06") < 10 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // What is checked is that kills leave the TIME_WAIT entries there
    // alone, however many there are: on the emulated 6.1 kernel one of the
    // ten is now and then gone before it is counted (not for a kill: none
    // has happened yet), so fewer than ten is reported, not failed.
    let time_wait_before = count_tcp_state("06");
    let table = || std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
    assert!(
        time_wait_before >= 1,
        "expected 10 TIME_WAIT sockets, saw none (the peer saw {ends:?}):\n{}",
        table()
    );
    if time_wait_before < 10 {
        eprintln!(
            "note: {time_wait_before} of 10 TIME_WAIT sockets (the peer saw {ends:?}):\n{}",
            table()
        );
    }

    // 990 open bystanders: watched port without grant (same port as the
    // victims, and another), and an unwatched port.
    let mut bystanders: Vec<Conn> = Vec::new();
    for (port, n) in [(5900, 300), (5901, 200), (7000, 490)] {
        for _ in 0..n {
            bystanders.push(Conn::connect(&format!("127.0.0.1:{port}")));
        }
    }
    for b in &mut bystanders {
        b.echo().unwrap();
    }

    // Three victims, three ways to die.
    let mut expiring = Conn::connect("127.0.0.1:5900");
    let mut by_session = Conn::connect("127.0.0.1:5900");
    let mut by_flow = Conn::connect("127.0.0.1:5900");
    sb.grant("v-expire", "mallory", "vm-1", "300ms", &expiring);
    sb.grant("v-session", "mallory", "vm-2", "60s", &by_session);
    sb.grant("v-flow", "mallory", "vm-3", "60s", &by_flow);
    sb.ok(json!({"op": "revoke", "session": "v-session"}));
    sb.ok(json!({"op": "revoke", "flow": by_flow.spec()}));
    for victim in [&mut expiring, &mut by_session, &mut by_flow] {
        let (err, _) = victim.wait_reset(5 * SECOND);
        assert_reset(&err);
    }
    assert_eq!(sb.wait_audit(3, 5 * SECOND).len(), 3);

    for b in &mut bystanders {
        b.echo()
            .unwrap_or_else(|e| panic!("bystander {} was touched: {e}", b.client));
    }
    let ended: Vec<String> = std::iter::from_fn(|| {
        sb.peer_mut(peer)
            .try_expect(|l| l.starts_with("end "), Duration::from_millis(50))
    })
    .collect();
    let victims = [expiring.client, by_session.client, by_flow.client];
    for line in &ended {
        assert!(
            victims
                .iter()
                .any(|v| line.starts_with(&format!("end {v} "))),
            "a bystander ended: {line}"
        );
    }
    assert!(
        count_tcp_state("06") >= time_wait_before,
        "TIME_WAIT entries were destroyed"
    );
    // The listener on the victims' port still accepts.
    let mut fresh = Conn::connect("127.0.0.1:5900");
    fresh.echo().unwrap();
    assert_eq!(sb.audit().len(), 3, "only the three victims were killed");
    println!(
        "{} bystanders and {time_wait_before} TIME_WAIT entries untouched",
        bystanders.len()
    );
}
