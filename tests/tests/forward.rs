//! Forwarded flows: flows that only pass through this host. A client
//! in netns A talks to a server in netns B through the router R (the test's
//! namespace) where the daemon runs and watches R's interfaces. There is no
//! local socket to destroy: at the deadline both ends get a RST with the
//! exact sequence number, and R drops whatever else the flow sends.

use std::time::Duration;

use reaper_tests::{assert_reset, bound_ms, kernel_at_least, Conn, Sandbox, SECOND};
use serde_json::json;

fn forwarded_flows_die_at_their_deadline(name: &str, server: &str, attach: &str) {
    let mut sb = Sandbox::new(name);
    sb.write_config(&format!(
        "[forward]\ninterfaces = [\"ra\", \"rb\"]\nattach = \"{attach}\"\n[[watch]]\nports = \"5900\"\nside = \"any\"\n"
    ));
    let (a, b) = sb.router();
    sb.start_daemon();
    // tcx came with Linux 6.6; before it "auto" falls back to tc and says so
    // once (the VM matrix boots 6.1).
    let tcx = attach == "auto" && kernel_at_least(6, 6);
    let how = if tcx { "(tcx)" } else { "(legacy tc)" };
    let log = sb.daemon_log();
    assert!(log.contains(how), "attached {how}? {log}");
    let fallback = "tcx is not available on this kernel";
    let expected = usize::from(attach == "auto" && !tcx);
    assert_eq!(log.matches(fallback).count(), expected, "{log}");
    let peer = sb.peer_on(&b, &[server]);

    let mut active = Conn::connect_from(&a, server);
    let mut idle = Conn::connect_from(&a, server);
    let mut other = Conn::connect_from(&a, server);
    for f in [&mut active, &mut idle, &mut other] {
        f.echo().unwrap();
    }
    let granted = sb.ok(
        json!({"op": "grant", "session": "fwd", "user": "alice", "target": "vm-1",
                               "ttl": "800ms", "flows": [active.spec(), idle.spec()]}),
    );
    let flows = granted["session"]["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 2, "{granted}");
    assert!(
        flows.iter().all(|f| f["path"] == "forward"),
        "no local socket: {granted}"
    );
    sb.ok(
        json!({"op": "grant", "session": "keep", "user": "bob", "target": "vm-2",
                 "ttl": "60s", "flows": [other.spec()]}),
    );
    let deadline = granted["session"]["deadline_boot_ns"].as_u64().unwrap();

    // The active flow keeps talking up to the deadline; the idle one does not.
    let talker = std::thread::spawn(move || {
        use std::io::Write;
        while reaper_tests::boot_ns() < deadline - 100_000_000 {
            if active.stream.write_all(b"k").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        active
    });
    let mut active = talker.join().unwrap();

    for f in [&mut active, &mut idle] {
        let (err, seen_at) = f.wait_reset(5 * SECOND);
        assert_reset(&err);
        let late_ms = (seen_at as f64 - deadline as f64) / 1e6;
        println!(
            "{}: client in A reset {late_ms:.3} ms after the deadline",
            f.client
        );
        assert!(seen_at >= deadline && late_ms < bound_ms(50.0));
        let end = sb.peer_mut(peer).wait_end(f.client, 5 * SECOND);
        assert_eq!(end.as_deref(), Some("reset"), "the server in B saw a reset");
    }
    let events = sb.wait_audit(2, 5 * SECOND);
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(e["path"], "forward", "{e}");
        assert_eq!(
            e["acknowledged"], true,
            "no packet of the flow reached R after the RSTs: {e}"
        );
        assert_eq!(e["reason"], "expired");
    }
    other
        .echo()
        .expect("the unexpired flow through R is untouched");
    assert!(sb
        .peer_mut(peer)
        .try_expect(|l| l.starts_with("end "), Duration::from_millis(200))
        .is_none());
}

/// Test 1: IPv4, an active and an idle flow, and a bystander flow.
#[test]
fn forwarded_ipv4_flows_die_at_their_deadline() {
    forwarded_flows_die_at_their_deadline("fwd-v4", "198.18.2.2:5900", "auto");
}

/// Test 3: the same over IPv6.
#[test]
fn forwarded_ipv6_flows_die_at_their_deadline() {
    forwarded_flows_die_at_their_deadline("fwd-v6", "[2001:db8:2::2]:5900", "auto");
}

/// The same through a legacy tc (clsact) filter, as on kernels before tcx.
#[test]
fn forwarded_flows_die_through_a_legacy_tc_filter() {
    forwarded_flows_die_at_their_deadline("fwd-tc", "198.18.2.2:5900", "tc");
}

/// An interface the daemon forwards through is deleted and re-created (as
/// Neutron, OVS and libvirt do): the daemon re-attaches to the new one by
/// itself, and a flow re-established through it is killed at its deadline.
#[test]
fn a_recreated_interface_is_tracked_again() {
    let mut sb = Sandbox::new("forward-recreated");
    sb.write_config(
        "[forward]\ninterfaces = [\"ra\", \"rb\"]\n[[watch]]\nports = \"5900\"\nside = \"any\"\n",
    );
    let (a, b) = sb.router();
    sb.start_daemon();
    let server = "198.18.2.2:5900";
    sb.peer_on(&b, &[server]);
    let mut before = Conn::connect_from(&a, server);
    before.echo().unwrap();

    let recreated = std::time::Instant::now();
    sb.recreate_link("a");
    let reattached = "forwarding interface re-created: program re-attached";
    let end = recreated + std::time::Duration::from_millis(bound_ms(1000.0) as u64);
    while !sb.daemon_log().contains(reattached) {
        assert!(
            std::time::Instant::now() < end,
            "not re-attached within a second:\n{}",
            sb.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "re-attached {:.1} ms after the interface was re-created",
        recreated.elapsed().as_secs_f64() * 1e3
    );

    // The client re-establishes its connection through the new interface.
    let mut again = Conn::connect_from(&a, server);
    again.echo().unwrap();
    let granted = sb.ok(
        json!({"op": "grant", "session": "back", "user": "alice", "target": "vm-1",
               "ttl": "500ms", "flows": [again.spec()]}),
    );
    assert_eq!(
        granted["session"]["flows"][0]["path"], "forward",
        "{granted}"
    );
    let deadline = granted["session"]["deadline_boot_ns"].as_u64().unwrap();
    let (err, seen_at) = again.wait_reset(5 * SECOND);
    assert_reset(&err);
    let late_ms = (seen_at as f64 - deadline as f64) / 1e6;
    println!("re-established flow reset {late_ms:.3} ms after its deadline");
    assert!(seen_at >= deadline && late_ms < bound_ms(50.0));
    drop(before);
}
