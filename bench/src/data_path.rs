//! Benchmark: the data path, the per-packet cost of the cgroup_skb
//! programs against a no-op program, and throughput.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use reaper_tests::{Conn, Sandbox, CGROUP_ROOT};
use serde_json::json;

use crate::floor;
use crate::report::*;

/// Sends bytes from one socket to another on loopback for `secs`, in the
/// current namespace; `before_data` runs once the connection exists (to
/// grant it). Returns bytes per second received.
pub fn bulk(port: u16, secs: f64, before_data: &dyn Fn(&Conn)) -> f64 {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let start = Instant::now();
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        total as f64 / start.elapsed().as_secs_f64()
    });
    let mut flow = Conn::connect(&format!("127.0.0.1:{port}"));
    before_data(&flow);
    let chunk = vec![7u8; 256 * 1024];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        flow.stream.write_all(&chunk).unwrap();
    }
    flow.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let rate = reader.join().unwrap();
    drop(flow);
    rate
}

/// Total (run time, run count) of the cgroup_skb programs named `names`.
pub fn skb_program_stats(names: &[&str]) -> (u128, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| names.contains(&n)))
        .fold((0, 0), |(t, c), p| {
            (t + p.run_time().as_nanos(), c + p.run_count())
        })
}

pub fn bpf_stats(enabled: bool) {
    let v = if enabled {
        "kernel.bpf_stats_enabled=1"
    } else {
        "kernel.bpf_stats_enabled=0"
    };
    let _ = Command::new("sysctl").args(["-qw", v]).status();
}

/// Moves this process into `cgroup`. A socket belongs to the cgroup its
/// process was in when it was made, so this picks which programs see the
/// next flow without leaving the network namespace.
pub fn enter_cgroup(cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .unwrap_or_else(|e| panic!("enter {}: {e}", cgroup.display()));
}

/// Benchmark 3: throughput with reaper off, attached with nothing granted,
/// and with the measured flow granted; per-packet cost of the programs
/// against a no-op program's (the cost of `bpf_stats` accounting itself).
///
/// All in one namespace: "off" is the same loopback from a cgroup with no
/// programs (the root), the floor a sibling cgroup with the no-op program.
/// Throughput is measured with `bpf_stats` off (its clock reads would slow
/// every packet of the attached runs only), cost with it on; the variants
/// take turns within each run so that drift in the machine hits all alike.
pub fn data_path(rows: &mut Vec<Row>, quick: bool) {
    let (runs, secs) = if quick { (1, 0.5) } else { (7, 2.0) };
    let mut sb = Sandbox::new("bench-datapath");
    sb.write_config("max_ttl = \"1d\"\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
    sb.start_daemon();
    let home = sb.cgroup.clone();
    let root = Path::new(CGROUP_ROOT);
    let floor_cgroup = root.join(format!("{}-floor", sb.name));
    std::fs::create_dir_all(&floor_cgroup).unwrap();
    let noop = floor::attach(&floor_cgroup).expect("attach the no-op program");
    let grant = |f: &Conn| {
        sb.ok(
            json!({"op": "grant", "session": format!("bulk-{}", f.client.port()),
                     "user": "u", "target": "t", "ttl": "1h", "flows": [f.spec()]}),
        );
    };
    let gbps = |port: u16, before: &dyn Fn(&Conn)| bulk(port, secs, before) * 8.0 / 1e9;
    let (mut off, mut unwatched, mut granted) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        enter_cgroup(root);
        off.push(gbps(7000, &|_| {}));
        enter_cgroup(&home);
        unwatched.push(gbps(7000, &|_| {}));
        granted.push(gbps(5900, &grant));
    }
    let reaper = ["reaper_ingress", "reaper_egress"];
    let cost = |names: &[&str], port: u16, before: &dyn Fn(&Conn)| {
        let (t0, c0) = skb_program_stats(names);
        bulk(port, secs, before);
        let (t1, c1) = skb_program_stats(names);
        (t1 - t0) as f64 / (c1 - c0).max(1) as f64
    };
    let (mut floor_ns, mut unwatched_ns, mut granted_ns) = (Vec::new(), Vec::new(), Vec::new());
    bpf_stats(true);
    for _ in 0..runs {
        enter_cgroup(&floor_cgroup);
        floor_ns.push(cost(&[floor::NAME], 7000, &|_| {}));
        enter_cgroup(&home);
        unwatched_ns.push(cost(&reaper, 7000, &|_| {}));
        granted_ns.push(cost(&reaper, 5900, &grant));
    }
    bpf_stats(false);
    drop(noop);
    let _ = std::fs::remove_dir(&floor_cgroup);

    // Paired: each run's figure against the baseline of the same turn
    // (they alternate), so that drift on the machine cancels; the row
    // judges the median pair and states the spread of the pairs.
    let (off_runs, floor_runs) = (Runs(off.clone()), Runs(floor_ns.clone()));
    for (label, rate, ns) in [
        ("attached, flow not watched", unwatched, unwatched_ns),
        ("flow granted", granted, granted_ns),
    ] {
        let ratios = Runs(rate.iter().zip(&off).map(|(r, o)| r / o).collect());
        rows.push(Row {
            what: format!("loopback TCP throughput, {label} (bpf_stats off; paired runs)"),
            reaper: Runs(rate).show("Gbit/s", 2),
            baseline: format!("{} reaper off", off_runs.show("Gbit/s", 2)),
            ratio: format!("{} per pair", ratios.show("", 3)),
            goal: "≤ 2 % loss (pairs' quartiles on both sides: within noise)".into(),
            pass: Verdict::paired(&ratios, |r| 1.0 - r <= 0.02),
        });
        let above = Runs(ns.iter().zip(&floor_ns).map(|(n, f)| n - f).collect());
        rows.push(Row {
            what: format!("cgroup_skb run time per packet (bpf_stats), {label} (paired runs)"),
            reaper: Runs(ns).show("ns", 1),
            baseline: format!("no-op program {}", floor_runs.show("ns", 1)),
            ratio: format!("+{} over the no-op, per pair", above.show("ns", 1)),
            goal:
                "≤ 40 ns per packet over the no-op (pairs' quartiles on both sides: within noise)"
                    .into(),
            pass: Verdict::paired(&above, |ns| ns <= 40.0),
        });
    }
}

/// Benchmark 3b: what the owner shares cost per connection. Each watched
/// connection of an unprivileged uid is charged and uncharged to its
/// socket's owner in sock_ops (the owner read from the socket itself,
/// `sk_uid`; nothing runs at `socket()`); root's are not charged. Run time
/// per connection (bpf_stats, the program's total over `n` connections
/// opened and closed) for a uid-65534 client against a root one, on the
/// same watched port, taking turns.
pub fn connection_setup(rows: &mut Vec<Row>, quick: bool) {
    let (runs, n) = if quick { (3, 1000) } else { (7, 3000) };
    let mut sb = Sandbox::new("bench-connection-setup");
    sb.write_config("[[watch]]\nports = \"5900\"\n");
    sb.start_daemon();
    let listener = TcpListener::bind("127.0.0.1:5900").unwrap();
    // The server ends are held until their clients close.
    let acceptor = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            match s {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
            if held.len() >= n {
                held.clear();
            }
        }
    });
    // The kernel keeps 15 bytes of a program's name.
    let programs = |name: &str| {
        let (t, _) = skb_program_stats(&[&name[..name.len().min(15)]]);
        t
    };
    let per_connection = |uid: u32| {
        let before = programs("reaper_sockops");
        let held = std::thread::spawn(move || {
            if uid != 0 {
                // This thread only (the raw call; glibc's would change
                // every thread of the process).
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
                assert_eq!(rc, 0, "setresuid");
            }
            (0..n)
                .map(|_| std::net::TcpStream::connect("127.0.0.1:5900").unwrap())
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        let after = programs("reaper_sockops");
        // Closed outside the window: what is compared is the setup.
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
        (after - before) as f64 / n as f64
    };
    let (mut root, mut owned) = (Vec::new(), Vec::new());
    bpf_stats(true);
    for _ in 0..runs {
        root.push(per_connection(0));
        owned.push(per_connection(65534));
    }
    bpf_stats(false);
    drop(sb);
    // The acceptor ends with the namespace's loopback gone; not waited on.
    drop(acceptor);
    let (root_total, owned_total) = (Runs(root), Runs(owned));
    let above = owned_total.median() - root_total.median();
    rows.push(Row {
        what: "connection setup: sock_ops run time per watched connection (both ends tracked), client of uid 65534 (owner read from the socket and charged; no program runs at socket())".into(),
        reaper: owned_total.show("ns", 0),
        baseline: format!("root's client (no share) {}", root_total.show("ns", 0)),
        ratio: format!("{:+.0} ns ({:+.1} %)", above, 100.0 * above / root_total.median()),
        goal: "≤ 15 % over root's".into(),
        pass: Verdict::from(above <= 0.15 * root_total.median()),
    });
}
