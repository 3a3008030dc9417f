//! Benchmark: the fleet. How long a revocation written to one etcd member
//! takes to reset a granted flow on a node that talks to another member,
//! against etcd's own floor measured on the same cluster in the same run:
//! a put on that member seen by a watch on the other.

use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};
use reaper::config::Fleet as FleetConfig;
use reaper::fleet::etcd;
use reaper::fleet::record::{Revocation, Selector};
use reaper_tests::fleet::Fleet;
use reaper_tests::{boot_ns, Conn};
use serde_json::json;

use crate::report::*;

/// The member the benchmark writes to, and the one node A watches through
/// (its first endpoint), as the hub reaches them.
const WRITER: &str = "http://127.0.0.1:2381";
const WATCHED: &str = "http://127.0.0.1:2379";

fn members(endpoint: &str) -> FleetConfig {
    FleetConfig {
        endpoints: vec![endpoint.to_owned()],
        ca_file: None,
        cert_file: None,
        key_file: None,
        node: Some("bench".into()),
        prefix: "/reaper-test".into(),
        node_lease_ns: 10_000_000_000,
        grace_ns: 5_000_000_000,
        addresses: Vec::new(),
        state_file: "/nonexistent".into(),
    }
}

/// etcd's floor: `rounds` puts on the writer, each timed until a watch on
/// the other member sees it (ms).
async fn put_to_watch(rounds: usize) -> Vec<f64> {
    let mut writer = etcd::connect(&members(WRITER)).await.unwrap();
    let mut watcher: Client = etcd::connect(&members(WATCHED)).await.unwrap();
    let mut stream = watcher
        .watch("/bench-floor/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut times = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let key = format!("/bench-floor/{i}");
        let start = Instant::now();
        writer.put(key.as_bytes(), "x", None).await.unwrap();
        'seen: loop {
            let response = stream.message().await.unwrap().expect("watch open");
            for event in response.events() {
                if event.event_type() == EventType::Put
                    && event.kv().is_some_and(|kv| kv.key() == key.as_bytes())
                {
                    break 'seen;
                }
            }
        }
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times
}

pub fn fleet(rows: &mut Vec<Row>, quick: bool) {
    let rounds = if quick { 30 } else { 200 };
    let mut fleet = Fleet::new("bench-fleet", 1, false);
    fleet.nodes[0].server(5900);
    fleet.start_all("");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut floor = runtime.block_on(put_to_watch(rounds));

    let mut writer = runtime.block_on(etcd::connect(&members(WRITER))).unwrap();
    let mut reaper = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let user = format!("f{i}");
        let mut conn: Conn = fleet.connect(0, 5900);
        fleet.nodes[0].ok(
            json!({"op": "grant", "session": format!("s{i}"), "user": user,
            "target": "vm", "ttl": "10m", "flows": [conn.spec()]}),
        );
        let lease = runtime
            .block_on(etcd::revocation_lease(&mut writer, 600_000_000_000))
            .unwrap();
        // The reset is timed by a thread already reading the flow.
        let waiter = std::thread::spawn(move || conn.wait_reset(Duration::from_secs(10)).1);
        std::thread::sleep(Duration::from_millis(2));
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        let revocation = Revocation::new(Selector::User, &user, "bench", 0, at);
        let start = boot_ns();
        runtime
            .block_on(etcd::put_revocation(
                &mut writer,
                "/reaper-test",
                &revocation,
                lease,
            ))
            .unwrap();
        let reset = waiter.join().unwrap();
        reaper.push(reset.saturating_sub(start) as f64 / 1e6);
    }
    floor.sort_by(f64::total_cmp);
    reaper.sort_by(f64::total_cmp);
    let (f50, f99) = (percentile(&floor, 0.5), percentile(&floor, 0.99));
    let (r50, r99) = (percentile(&reaper, 0.5), percentile(&reaper, 0.99));
    let within = r50 <= 2.0 * f50 && r99 <= 2.0 * f99;
    rows.push(Row {
        what: format!(
            "fleet revoke propagation p50 / p99 / max ({rounds} revokes): put on one etcd member to the flow's reset on a node watching another"
        ),
        reaper: format!("{r50:.2} / {r99:.2} / {:.2} ms", reaper[rounds - 1]),
        baseline: format!(
            "etcd put→watch across the same members: {f50:.2} / {f99:.2} / {:.2} ms",
            floor[rounds - 1]
        ),
        ratio: format!("p50 {:.1}×, p99 {:.1}× the floor", r50 / f50, r99 / f99),
        goal: "≤ 2× put→watch".into(),
        pass: Some(within),
    });
}
