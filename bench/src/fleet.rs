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

/// etcd's floor: a put on the writer member, timed until a watch on the
/// other member sees it. One is taken before each revoke, by the client
/// that writes the revocations, so that the floor and reaper's figure
/// share the machine's moments (a burst of noise lands on both, not on one).
struct PutToWatch {
    stream: etcd_client::WatchStream,
    _watcher: Client,
}

impl PutToWatch {
    async fn new() -> PutToWatch {
        let mut watcher: Client = etcd::connect(&members(WATCHED)).await.unwrap();
        let stream = watcher
            .watch("/bench-floor/", Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        PutToWatch {
            stream,
            _watcher: watcher,
        }
    }

    /// One put by `writer` seen by the watch (ms).
    async fn once(&mut self, writer: &mut Client, round: usize) -> f64 {
        let key = format!("/bench-floor/{round}");
        let start = Instant::now();
        writer.put(key.as_bytes(), "x", None).await.unwrap();
        loop {
            let response = self.stream.message().await.unwrap().expect("watch open");
            if response.events().iter().any(|event| {
                event.event_type() == EventType::Put
                    && event.kv().is_some_and(|kv| kv.key() == key.as_bytes())
            }) {
                return start.elapsed().as_secs_f64() * 1e3;
            }
        }
    }
}

pub fn fleet(rows: &mut Vec<Row>, quick: bool) {
    let rounds = if quick { 30 } else { 200 };
    let mut fleet = Fleet::new("bench-fleet", 1, false);
    fleet.nodes[0].server(5900);
    fleet.start_all("[classes.one]\nttl = \"10m\"\nmax_per_target = 1\nlimit_scope = \"fleet\"\n");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut probe = runtime.block_on(PutToWatch::new());
    let mut floor = Vec::with_capacity(rounds);
    let mut writer = runtime.block_on(etcd::connect(&members(WRITER))).unwrap();
    let mut reaper = Vec::with_capacity(rounds);
    for i in 0..rounds {
        floor.push(runtime.block_on(probe.once(&mut writer, i)));
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
        pass: Verdict::from(within),
    });

    grant_latency(rows, &fleet, rounds);
}

/// What fleet mode adds to a grant: a fleet-limited grant (its place taken
/// by one etcd transaction) against a node-local grant on the same node,
/// the difference against one such transaction timed from here.
fn grant_latency(rows: &mut Vec<Row>, fleet: &Fleet, rounds: usize) {
    // `class` None: the node's default class, node-local.
    let timed = |session: String, target: String, class: Option<&str>| {
        let conn: Conn = fleet.connect(0, 5900);
        let mut grant = json!({"op": "grant", "session": session, "user": "g",
            "target": target, "ttl": "10m", "flows": [conn.spec()]});
        if let Some(class) = class {
            grant["class"] = class.into();
        }
        let start = Instant::now();
        fleet.nodes[0].ok(grant);
        (start.elapsed().as_secs_f64() * 1e3, conn)
    };
    let mut local = Vec::with_capacity(rounds);
    let mut placed = Vec::with_capacity(rounds);
    let mut held = Vec::with_capacity(2 * rounds);
    for i in 0..rounds {
        let (ms, conn) = timed(format!("g{i}"), format!("vm-g{i}"), None);
        local.push(ms);
        held.push(conn);
        let (ms, conn) = timed(format!("p{i}"), format!("vm-p{i}"), Some("one"));
        placed.push(ms);
        held.push(conn);
    }
    // The floor from where the node is: its namespace, its member.
    let endpoint = fleet.etcd.endpoints_from(fleet.nodes[0].n)[0].clone();
    let netns = format!("/run/netns/{}", fleet.nodes[0].netns);
    let txn = std::thread::spawn(move || {
        let ns = std::fs::File::open(netns).expect("open netns");
        // SAFETY: setns on this thread only, with a descriptor it owns.
        let entered =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut client = etcd::connect(&members(&endpoint)).await.unwrap();
            let lease = etcd::revocation_lease(&mut client, 600_000_000_000)
                .await
                .unwrap();
            let mut times = Vec::with_capacity(rounds);
            for i in 0..rounds {
                let start = Instant::now();
                etcd::take_place(
                    &mut client,
                    format!("/bench-floor/place/{i}/0"),
                    &format!("/bench-floor/place/{i}/"),
                    "x".into(),
                    lease,
                )
                .await
                .unwrap();
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
            times
        })
    })
    .join()
    .unwrap();
    for v in [&mut local, &mut placed] {
        v.sort_by(f64::total_cmp);
    }
    let mut txn = txn;
    txn.sort_by(f64::total_cmp);
    let (l50, p50, t50) = (
        percentile(&local, 0.5),
        percentile(&placed, 0.5),
        percentile(&txn, 0.5),
    );
    let (l99, p99, t99) = (
        percentile(&local, 0.99),
        percentile(&placed, 0.99),
        percentile(&txn, 0.99),
    );
    let added = p50 - l50;
    rows.push(Row {
        what: format!(
            "grant latency fleet mode adds p50 / p99 ({rounds} grants each): a fleet-wide one-per-target grant against a node-local grant on the same node"
        ),
        reaper: format!(
            "fleet-limited {p50:.2} / {p99:.2} ms, node-local {l50:.2} / {l99:.2} ms: +{added:.2} ms at p50"
        ),
        baseline: format!("one etcd create-if-absent transaction from the node's namespace to its member: {t50:.2} / {t99:.2} ms"),
        ratio: format!("adds {:.2} transactions at p50", added / t50),
        goal: "≤ 1 etcd round trip (grants of other classes add none)".into(),
        pass: Verdict::from(added <= 1.2 * t50),
    });
    drop(held);
}
