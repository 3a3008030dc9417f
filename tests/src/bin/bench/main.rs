//! `reaper-bench [--quick] [--out DIR] [--only kill|mass|datapath|control|memory]`:
//! reaper's benchmarks, each against
//! a baseline measured in the same run, in the same kind of sandbox as the
//! integration tests (own netns and cgroup, the real daemon). Writes
//! `DIR/latest.md` (a table: what, reaper, baseline, ratio, goal, pass) and
//! SVG plots next to it, and prints the table. Run by `cargo xtask bench`.
//!
//! Every figure is a median over several runs with its min–max spread.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reaper_tests::{boot_ns, Flow, Sandbox, CGROUP_ROOT};

mod floor;
use serde_json::json;

struct Row {
    what: String,
    reaper: String,
    baseline: String,
    ratio: String,
    goal: String,
    pass: Option<bool>,
}

/// Median and spread of a set of runs.
struct Runs(Vec<f64>);

impl Runs {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
    fn show(&self, unit: &str, digits: usize) -> String {
        let (min, max) = self
            .0
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        // A unit-less figure (one of several sharing a unit) has no space
        // before its spread.
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        format!(
            "{:.*}{unit} (n={}, {:.*}–{:.*})",
            digits,
            self.median(),
            self.0.len(),
            digits,
            min,
            digits,
            max
        )
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sends bytes from one socket to another on loopback for `secs`, in the
/// current namespace; `before_data` runs once the connection exists (to
/// grant it). Returns bytes per second received.
fn bulk(port: u16, secs: f64, before_data: &dyn Fn(&Flow)) -> f64 {
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
    let mut flow = Flow::connect(&format!("127.0.0.1:{port}"));
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
fn skb_program_stats(names: &[&str]) -> (u128, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| names.contains(&n)))
        .fold((0, 0), |(t, c), p| {
            (t + p.run_time().as_nanos(), c + p.run_count())
        })
}

fn bpf_stats(enabled: bool) {
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
fn enter_cgroup(cgroup: &Path) {
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
fn data_path(rows: &mut Vec<Row>, quick: bool) {
    let (runs, secs) = if quick { (1, 0.5) } else { (7, 2.0) };
    let mut sb = Sandbox::new("bench-datapath");
    sb.write_config("max_ttl = \"1d\"\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
    sb.start_daemon();
    let home = sb.cgroup.clone();
    let root = Path::new(CGROUP_ROOT);
    let floor_cgroup = root.join(format!("{}-floor", sb.name));
    std::fs::create_dir_all(&floor_cgroup).unwrap();
    let noop = floor::attach(&floor_cgroup).expect("attach the no-op program");
    let grant = |f: &Flow| {
        sb.ok(
            json!({"op": "grant", "session": format!("bulk-{}", f.client.port()),
                     "user": "u", "target": "t", "ttl": "1h", "flows": [f.spec()]}),
        );
    };
    let gbps = |port: u16, before: &dyn Fn(&Flow)| bulk(port, secs, before) * 8.0 / 1e9;
    let (mut off, mut unwatched, mut granted) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        enter_cgroup(root);
        off.push(gbps(7000, &|_| {}));
        enter_cgroup(&home);
        unwatched.push(gbps(7000, &|_| {}));
        granted.push(gbps(5900, &grant));
    }
    let reaper = ["reaper_ingress", "reaper_egress"];
    let cost = |names: &[&str], port: u16, before: &dyn Fn(&Flow)| {
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

    let (off, floor_ns) = (Runs(off), Runs(floor_ns));
    for (label, rate, ns) in [
        (
            "attached, flow not watched",
            Runs(unwatched),
            Runs(unwatched_ns),
        ),
        ("flow granted", Runs(granted), Runs(granted_ns)),
    ] {
        let loss = 1.0 - rate.median() / off.median();
        rows.push(Row {
            what: format!("loopback TCP throughput, {label} (bpf_stats off)"),
            reaper: rate.show("Gbit/s", 2),
            baseline: format!("{} reaper off", off.show("Gbit/s", 2)),
            ratio: format!("{:.3}", rate.median() / off.median()),
            goal: "≤ 2 % loss".into(),
            pass: Some(loss <= 0.02),
        });
        let above = ns.median() - floor_ns.median();
        rows.push(Row {
            what: format!("cgroup_skb run time per packet (bpf_stats), {label}"),
            reaper: ns.show("ns", 1),
            baseline: format!("no-op program {}", floor_ns.show("ns", 1)),
            ratio: format!("+{above:.1} ns over the no-op"),
            goal: "≤ 40 ns per packet over the no-op".into(),
            pass: Some(above <= 40.0),
        });
    }
}

/// One control client doing `n` grants one after the other; returns each
/// grant's latency in µs.
fn grant_loop(socket: PathBuf, client: usize, n: usize) -> Vec<f64> {
    let stream = UnixStream::connect(&socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut latencies = Vec::with_capacity(n);
    let mut line = String::new();
    for i in 0..n {
        // A pre-registration needs no socket: a pure control-plane grant.
        let (a, b) = (client % 250 + 1, i / 60_000);
        let req = json!({"op": "grant", "session": format!("c{client}-{i}"), "user": format!("u{client}"),
                         "target": format!("t{i}"), "ttl": "1h",
                         "expect": [{"local": "127.0.0.1:5900", "remote": format!("127.{a}.{b}.1:{}", 1024 + i % 60_000)}]});
        let text = format!("{req}\n");
        let t0 = Instant::now();
        writer.write_all(text.as_bytes()).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        latencies.push(t0.elapsed().as_secs_f64() * 1e6);
        assert!(line.contains("\"ok\":true"), "grant refused: {line}");
    }
    latencies
}

/// The floor under any grant latency here: a line sent over a Unix
/// socket to a thread that echoes it back, one at a time (µs each).
fn unix_round_trips(n: usize) -> Vec<f64> {
    let (a, b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut reader = BufReader::new(b.try_clone().unwrap());
        let mut writer = b;
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            writer.write_all(line.as_bytes()).unwrap();
            line.clear();
        }
    });
    let mut reader = BufReader::new(a.try_clone().unwrap());
    let mut writer = a;
    let mut line = String::new();
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        writer.write_all(b"{\"op\":\"status\"}\n").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        latencies.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    drop(writer);
    drop(reader);
    echo.join().unwrap();
    latencies.sort_by(|a, b| a.total_cmp(b));
    latencies
}

/// One client sending all its grants ahead (pipelined, as request ids
/// allow) while reading the answers: grants per second.
fn pipelined_rate(total: usize) -> f64 {
    let mut sb = Sandbox::new("bench-cp-pipe");
    sb.write_config("max_ttl = \"1d\"\nmax_sessions = 131072\nmax_pending = 262144\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
    sb.start_daemon();
    let requests: Vec<String> = (0..total)
        .map(|i| {
            let req = json!({"op": "grant", "id": i, "session": format!("p{i}"), "user": "u", "target": format!("t{i}"), "ttl": "1h",
                             "expect": [{"local": "127.0.0.1:5900", "remote": format!("127.1.{}.1:{}", i / 60_000, 1024 + i % 60_000)}]});
            format!("{req}\n")
        })
        .collect();
    let start = Instant::now();
    let answers = pipelined(&sb.socket, requests);
    let rate = total as f64 / start.elapsed().as_secs_f64();
    assert!(
        answers.iter().all(|a| a.contains("\"ok\":true")),
        "a grant was refused"
    );
    rate
}

/// Benchmark 4: grants per second and latency with 1, 8 and 64 clients.
fn control_plane(rows: &mut Vec<Row>, quick: bool, plots: &mut Vec<(String, Vec<f64>)>) {
    let total = if quick { 2_000 } else { 64_000 };
    let repeats = if quick { 1 } else { 3 };
    let (mut floor50, mut floor99, mut piped) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let floor = unix_round_trips(total.min(20_000));
        floor50.push(percentile(&floor, 0.5));
        floor99.push(percentile(&floor, 0.99));
        piped.push(pipelined_rate(total));
    }
    let (floor50, floor99, piped) = (Runs(floor50), Runs(floor99), Runs(piped));
    rows.push(Row {
        what: "grants per second, 1 client pipelining (requests sent ahead)".into(),
        reaper: piped.show("/s", 0),
        baseline: "—".into(),
        ratio: "—".into(),
        goal: "≥ 100000/s".into(),
        pass: Some(piped.median() >= 100_000.0),
    });
    for clients in [1usize, 8, 64] {
        let mut rates = Vec::new();
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut last = Vec::new();
        for r in 0..repeats {
            let mut sb = Sandbox::new(&format!("bench-cp{clients}-{r}"));
            sb.write_config("max_ttl = \"1d\"\nmax_sessions = 131072\nmax_pending = 262144\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
            sb.start_daemon();
            let per = total / clients;
            let start = Instant::now();
            let threads: Vec<_> = (0..clients)
                .map(|c| {
                    let socket = sb.socket.clone();
                    std::thread::spawn(move || grant_loop(socket, c, per))
                })
                .collect();
            let mut all: Vec<f64> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            let elapsed = start.elapsed().as_secs_f64();
            all.sort_by(|a, b| a.total_cmp(b));
            rates.push((per * clients) as f64 / elapsed);
            p50.push(percentile(&all, 0.50));
            p99.push(percentile(&all, 0.99));
            last = all;
        }
        let (rates, p50, p99) = (Runs(rates), Runs(p50), Runs(p99));
        rows.push(Row {
            what: format!("grants per second, {clients} client(s)"),
            reaper: rates.show("/s", 0),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "≥ 100000/s".into(),
            pass: Some(rates.median() >= 100_000.0),
        });
        rows.push(Row {
            what: format!("grant latency p50 / p99, {clients} client(s)"),
            reaper: format!("{} / {}", p50.show("µs", 0), p99.show("µs", 0)),
            baseline: if clients == 1 {
                format!(
                    "bare Unix-socket round trip {} / {}",
                    floor50.show("µs", 0),
                    floor99.show("µs", 0)
                )
            } else {
                "—".into()
            },
            ratio: if clients == 1 {
                format!("p99 {:.1}× the floor", p99.median() / floor99.median())
            } else {
                "—".into()
            },
            goal: if clients == 1 {
                "p99 ≤ 100 µs".into()
            } else {
                "—".into()
            },
            pass: (clients == 1).then(|| p99.median() <= 100.0),
        });
        plots.push((format!("{clients} client(s)"), last));
    }
}

/// Waits until every stream has ended (EOF or reset) and returns, for each,
/// the boot time at which it was seen to end (None: still open at timeout).
fn wait_all_ended(streams: &[TcpStream], timeout: Duration) -> Vec<Option<u64>> {
    use std::os::fd::AsRawFd;
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    for (i, s) in streams.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR) as u32,
            u64: i as u64,
        };
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
    }
    let mut ended: Vec<Option<u64>> = vec![None; streams.len()];
    let mut left = streams.len();
    let end = Instant::now() + timeout;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = [0u8; 4096];
    while left > 0 && Instant::now() < end {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        let now = boot_ns();
        for ev in events.iter().take(n.max(0) as usize) {
            let i = ev.u64 as usize;
            if ended[i].is_some() {
                continue;
            }
            let fd = streams[i].as_raw_fd();
            let r =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if r <= 0 {
                ended[i] = Some(now);
                left -= 1;
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
            }
        }
    }
    unsafe { libc::close(ep) };
    ended
}

/// Each kill's lateness in ms, sorted (infinite: it never ended).
fn lateness_ms(deadlines: &[u64], ended: &[Option<u64>]) -> Vec<f64> {
    let mut late: Vec<f64> = deadlines
        .iter()
        .zip(ended)
        .map(|(d, e)| e.map_or(f64::INFINITY, |e| (e as f64 - *d as f64) / 1e6))
        .collect();
    late.sort_by(|a, b| a.total_cmp(b));
    late
}

/// The time to live of flow `i` of `n`: deadlines spread over 3 s from 1 s.
fn spread_ttl_ms(i: usize, n: usize) -> u64 {
    1_000 + (i as u64 * 3_000) / n as u64
}

/// Benchmark 1, reaper: `n` live granted flows, deadlines spread out.
fn kill_latency_reaper(n: usize) -> Vec<f64> {
    let mut sb = Sandbox::new(&format!("bench-kill-{n}"));
    sb.write_config(
        "max_ttl = \"1d\"\nmax_flows = 65536\n[[watch]]\nports = \"5900\"\nside = \"local\"\n",
    );
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let flows: Vec<Flow> = (0..n).map(|_| Flow::connect("127.0.0.1:5900")).collect();
    let stream = UnixStream::connect(&sb.socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut deadlines = Vec::with_capacity(n);
    let mut line = String::new();
    for (i, f) in flows.iter().enumerate() {
        let req = json!({"op": "grant", "session": format!("k{i}"), "user": "u", "target": format!("t{i}"),
                         "ttl": format!("{}ms", spread_ttl_ms(i, n)), "flows": [f.spec()]});
        writer.write_all(format!("{req}\n").as_bytes()).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        deadlines.push(
            v["result"]["session"]["deadline_boot_ns"]
                .as_u64()
                .expect("granted"),
        );
    }
    let streams: Vec<TcpStream> = flows.into_iter().map(|f| f.stream).collect();
    let ended = wait_all_ended(&streams, Duration::from_secs(30));
    lateness_ms(&deadlines, &ended)
}

/// Benchmark 1, baselines: the same flows through `bench/timer_proxy.py`.
fn kill_latency_proxy(n: usize, mode: &str) -> Vec<f64> {
    let mut sb = Sandbox::new(&format!("bench-{mode}-{n}"));
    sb.peer(&["127.0.0.1:5900"]);
    // One proxy process per 8000 flows: each holds two descriptors a flow.
    let procs = n.div_ceil(8_000);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/timer_proxy.py");
    for k in 0..procs {
        let port = (6000 + k).to_string();
        let mut out = BufReader::new(sb.spawn(Command::new("python3").arg(&script).args([
            "--mode",
            mode,
            &port,
            "127.0.0.1:5900",
        ])));
        let mut ready = String::new();
        out.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready");
    }
    let mut streams = Vec::with_capacity(n);
    let mut deadlines = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", 6000 + (i % procs) as u16)).unwrap();
        let ttl = spread_ttl_ms(i, n);
        s.write_all(format!("{ttl}\n").as_bytes()).unwrap();
        let mut ok = [0u8; 3];
        s.read_exact(&mut ok).unwrap();
        // The proxy set its deadline before answering: counting from the
        // answer flatters the baseline, never reaper.
        deadlines.push(boot_ns() + ttl * 1_000_000);
        streams.push(s);
    }
    let ended = wait_all_ended(&streams, Duration::from_secs(30));
    lateness_ms(&deadlines, &ended)
}

fn kill_latency(rows: &mut Vec<Row>, quick: bool, plots: &mut Vec<(String, Vec<f64>)>) {
    let (sizes, runs): (&[usize], usize) = if quick {
        (&[200], 1)
    } else {
        (&[1_000, 10_000], 3)
    };
    for &n in sizes {
        // Per run: each mechanism's sorted latencies. A p99 over one run
        // swings with what else the 2 cores did, so several runs are shown
        // as the median p99 with its spread.
        let mut all: [Vec<Vec<f64>>; 3] = Default::default();
        for _ in 0..runs {
            all[0].push(kill_latency_reaper(n));
            all[1].push(kill_latency_proxy(n, "timer"));
            all[2].push(kill_latency_proxy(n, "sweep"));
        }
        let at =
            |runs_: &[Vec<f64>], p: f64| Runs(runs_.iter().map(|v| percentile(v, p)).collect());
        let show = |runs_: &[Vec<f64>]| {
            format!(
                "{:.2} / {} / {:.2} ms",
                at(runs_, 0.5).median(),
                at(runs_, 0.99).show("", 2),
                at(runs_, 1.0).median()
            )
        };
        let [reaper, timer, sweep] = &all;
        let p99 = at(reaper, 0.99).median();
        rows.push(Row {
            what: format!(
                "kill latency p50 / p99 / max, {n} flows (n={runs} runs of {n} kills; medians, p99 spread)"
            ),
            reaper: show(reaper),
            baseline: format!("timer proxy {}; 1 s sweeper {}", show(timer), show(sweep)),
            ratio: format!(
                "p99 {:.1}× / {:.0}× better",
                at(timer, 0.99).median() / p99.max(1e-3),
                at(sweep, 0.99).median() / p99.max(1e-3)
            ),
            goal: "p99 ≤ 2 ms".into(),
            pass: Some(p99 <= 2.0),
        });
        let pooled = |runs_: &[Vec<f64>]| {
            let mut v: Vec<f64> = runs_.concat();
            v.sort_by(|a, b| a.total_cmp(b));
            v
        };
        plots.push((format!("reaper, {n} flows"), pooled(reaper)));
        plots.push((format!("timer proxy, {n} flows"), pooled(timer)));
        plots.push((format!("1 s sweeper, {n} flows"), pooled(sweep)));
    }
}

/// Most flows one holder process keeps (two descriptors a flow are split
/// between a client holder and a server holder; the hard limit is 20000).
const FLOWS_PER_HOLDER: usize = 16_000;

/// `--hold-server PORT`: accepts connections on 127.0.0.1:PORT and keeps
/// them open, without reading, until killed.
fn hold_server(port: u16) -> ! {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut held = Vec::new();
    loop {
        if let Ok((s, _)) = listener.accept() {
            held.push(s);
        }
    }
}

/// `--hold-clients PORT COUNT`: opens COUNT connections to 127.0.0.1:PORT,
/// prints their local ports on one line, then prints on a second line the
/// boot time at which each was seen to end (0: still open after 60 s).
fn hold_clients(port: u16, count: usize) -> ! {
    let streams: Vec<TcpStream> = (0..count)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let ports: Vec<String> = streams
        .iter()
        .map(|s| s.local_addr().unwrap().port().to_string())
        .collect();
    println!("{}", ports.join(" "));
    std::io::stdout().flush().unwrap();
    let ended = wait_all_ended(&streams, Duration::from_secs(60));
    let ended: Vec<String> = ended.iter().map(|e| e.unwrap_or(0).to_string()).collect();
    println!("{}", ended.join(" "));
    std::process::exit(0)
}

/// `n` connections held by helper processes: (server port, client port)
/// of each, and the client holders' outputs to read end times from.
struct HeldFlows {
    flows: Vec<(u16, u16)>,
    holders: Vec<BufReader<std::process::ChildStdout>>,
}

fn hold_flows(sb: &mut Sandbox, n: usize) -> HeldFlows {
    let me = std::env::current_exe().unwrap();
    let procs = n.div_ceil(FLOWS_PER_HOLDER);
    let mut flows = Vec::with_capacity(n);
    let mut holders = Vec::new();
    for k in 0..procs {
        let port = 5900 + k as u16;
        let count = n / procs + usize::from(k < n % procs);
        let mut server =
            BufReader::new(sb.spawn(Command::new(&me).args(["--hold-server", &port.to_string()])));
        let mut ready = String::new();
        server.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready");
        let mut clients = BufReader::new(sb.spawn(Command::new(&me).args([
            "--hold-clients",
            &port.to_string(),
            &count.to_string(),
        ])));
        let mut line = String::new();
        clients.read_line(&mut line).unwrap();
        flows.extend(line.split_whitespace().map(|p| (port, p.parse().unwrap())));
        holders.push(clients);
    }
    assert_eq!(flows.len(), n);
    HeldFlows { flows, holders }
}

impl HeldFlows {
    /// Boot time at which each client saw its connection end (None: it
    /// was still open when its holder gave up).
    fn ended(self) -> Vec<Option<u64>> {
        let mut all = Vec::with_capacity(self.flows.len());
        for mut h in self.holders {
            let mut line = String::new();
            h.read_line(&mut line).unwrap();
            all.extend(
                line.split_whitespace()
                    .map(|t| Some(t.parse::<u64>().unwrap()).filter(|t| *t != 0)),
            );
        }
        all
    }
}

/// Sends every request on one connection while a second thread reads the
/// answers (requests pipelined, as the protocol's ids allow). Returns the
/// answer lines unparsed: parsing them here would make the client, not the
/// daemon, the bottleneck being measured.
fn pipelined(socket: &std::path::Path, requests: Vec<String>) -> Vec<String> {
    let stream = UnixStream::connect(socket).unwrap();
    let mut writer = std::io::BufWriter::new(stream.try_clone().unwrap());
    let n = requests.len();
    let sender = std::thread::spawn(move || {
        for r in requests {
            writer.write_all(r.as_bytes()).unwrap();
        }
        writer.flush().unwrap();
    });
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let mut answers = Vec::with_capacity(n);
    for _ in 0..n {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        answers.push(line);
    }
    sender.join().unwrap();
    answers
}

/// An RFC 3339 UTC time `in_ns` from now (via date(1): no time crate).
fn rfc3339_in(in_ns: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let at = now + Duration::from_nanos(in_ns);
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}.{:09}", at.as_secs(), at.subsec_nanos()),
        ])
        .arg("+%Y-%m-%dT%H:%M:%S.%NZ")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Benchmark 2, reaper: `n` flows, one session each, one shared deadline.
/// Returns (each client's reset time minus the deadline in ms, daemon RSS
/// in KiB with all of them granted).
fn mass_expiry_reaper(n: usize) -> (Vec<f64>, u64) {
    let mut sb = Sandbox::new(&format!("bench-mass-{n}"));
    sb.write_config(&format!(
        "max_ttl = \"1d\"\nmax_flows = {}\nmax_sessions = {}\n[[watch]]\nports = \"5900-5999\"\nside = \"local\"\n",
        (n * 2).max(1024),
        (n * 2).max(1024)
    ));
    sb.start_daemon();
    let held = hold_flows(&mut sb, n);
    // Long enough to grant them all first (checked below).
    let expires_at = rfc3339_in(2_000_000_000 + n as u64 * 100_000);
    let requests = held
        .flows
        .iter()
        .enumerate()
        .map(|(i, (server, client))| {
            let req = json!({"op": "grant", "session": format!("m{i}"), "user": "u", "target": format!("t{i}"),
                             "expires_at": expires_at,
                             "flows": [{"local": format!("127.0.0.1:{server}"), "remote": format!("127.0.0.1:{client}")}]});
            format!("{req}\n")
        })
        .collect();
    let answers: Vec<serde_json::Value> = pipelined(&sb.socket, requests)
        .iter()
        .map(|a| serde_json::from_str(a).unwrap())
        .collect();
    // One expires_at for all; each conversion to the boot clock reads the
    // clocks anew, so deadlines may differ by nanoseconds: each flow is
    // measured against its own.
    let deadlines: Vec<u64> = answers
        .iter()
        .map(|a| {
            a["result"]["session"]["deadline_boot_ns"]
                .as_u64()
                .unwrap_or_else(|| panic!("grant refused: {a}"))
        })
        .collect();
    let first = *deadlines.iter().min().unwrap();
    assert!(*deadlines.iter().max().unwrap() - first < 1_000_000);
    assert!(boot_ns() < first, "granting took longer than the margin");
    let pid = sb.ok(json!({"op": "status"}))["pid"].as_u64().unwrap();
    let rss = rss_kib(pid);
    (lateness_ms(&deadlines, &held.ended()), rss)
}

/// Benchmark 2, baseline: the same flows killed by `ss -K` with a filter
/// selecting exactly them, timed from the moment ss is started.
fn mass_expiry_ss(n: usize) -> Vec<f64> {
    let mut sb = Sandbox::new(&format!("bench-ssk-{n}"));
    let held = hold_flows(&mut sb, n);
    let start = boot_ns();
    let status = Command::new("ss")
        .args([
            "-K",
            "-tn",
            "state",
            "established",
            "( sport >= :5900 and sport <= :5999 )",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    lateness_ms(&vec![start; n], &held.ended())
}

fn mass_expiry(rows: &mut Vec<Row>, quick: bool, plots: &mut Vec<(String, Vec<f64>)>) {
    let sizes: &[usize] = if quick { &[2_000] } else { &[10_000, 100_000] };
    let runs = if quick { 1 } else { 3 };
    for &n in sizes {
        let (mut reaper, mut ss, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        let (mut reaper_curve, mut ss_curve) = (Vec::new(), Vec::new());
        let mut ss_missed = Vec::new();
        for _ in 0..runs {
            let (late, kib) = mass_expiry_reaper(n);
            let open = late.iter().filter(|l| l.is_infinite()).count();
            assert_eq!(
                open, 0,
                "reaper left {open} of {n} flows open past their deadline"
            );
            reaper.push(*late.last().unwrap());
            rss.push(kib as f64 / 1024.0);
            reaper_curve = late;
            let mut base = mass_expiry_ss(n);
            // ss -K walks a socket dump while it destroys: sockets can be
            // skipped. Those are counted, and its time is that of the last
            // socket it did reset (which flatters it).
            let missed = base.iter().filter(|l| l.is_infinite()).count();
            ss_missed.push(missed);
            ss.push(
                base[..base.len() - missed]
                    .last()
                    .copied()
                    .unwrap_or(f64::NAN),
            );
            base.truncate(base.len() - missed);
            ss_curve = base;
        }
        let (reaper, ss, rss) = (Runs(reaper), Runs(ss), Runs(rss));
        let missed = if ss_missed.iter().all(|m| *m == 0) {
            String::new()
        } else {
            format!("; left open: {ss_missed:?} of {n}")
        };
        let speedup = ss.median() / reaper.median().max(1e-3);
        rows.push(Row {
            what: format!("mass expiry: {n} flows, one deadline, until every client saw its reset"),
            reaper: reaper.show("ms", 1),
            baseline: format!("`ss -K` {}{missed}", ss.show("ms", 1)),
            ratio: format!("{speedup:.1}× faster"),
            goal: if n >= 100_000 {
                "≤ 300 ms and ≥ 3× faster".into()
            } else {
                "≥ 3× faster".into()
            },
            pass: Some(speedup >= 3.0 && (n < 100_000 || reaper.median() <= 300.0)),
        });
        rows.push(Row {
            what: format!("daemon RSS with {n} granted flows (one session each, real sockets)"),
            reaper: rss.show("MiB", 1),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: if n >= 100_000 {
                "≤ 64 MiB".into()
            } else {
                "—".into()
            },
            pass: (n >= 100_000).then(|| rss.median() <= 64.0),
        });
        plots.push((format!("reaper, {n} flows"), reaper_curve));
        plots.push((format!("ss -K, {n} flows"), ss_curve));
    }
}

/// (memlock, max_entries) of the daemon's map with this key and value size,
/// from /proc/PID/fdinfo.
fn map_memlock(pid: u64, key_size: u64, value_size: u64) -> Option<(u64, u64)> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>().ok()))
                .flatten()
        };
        if field("key_size:") == Some(key_size) && field("value_size:") == Some(value_size) {
            return Some((field("memlock:")?, field("max_entries:")?));
        }
    }
    None
}

fn rss_kib(pid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Benchmark 5: kernel memory per tracked flow (the flow table's memlock
/// over its size: the table is preallocated) and the daemon's RSS after
/// 100k grants.
fn memory(rows: &mut Vec<Row>, quick: bool) {
    let grants = if quick { 10_000 } else { 100_000 };
    let mut sb = Sandbox::new("bench-mem");
    sb.write_config("max_ttl = \"1d\"\nmax_sessions = 131072\nmax_pending = 262144\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
    sb.start_daemon();
    let pid = sb.ok(json!({"op": "status"}))["pid"].as_u64().unwrap();
    let flow_size = std::mem::size_of::<reaper_common::Flow>() as u64;
    if let Some((memlock, entries)) = map_memlock(pid, 8, flow_size) {
        let per = memlock as f64 / entries as f64;
        rows.push(Row {
            what: format!("kernel memory per tracked flow (FLOWS memlock / {entries} entries)"),
            reaper: format!("{per:.0} B (n=1, exact)"),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "≤ 200 B".into(),
            pass: Some(per <= 200.0),
        });
    }
    let before = rss_kib(pid);
    let clients = 8;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let socket = sb.socket.clone();
            std::thread::spawn(move || grant_loop(socket, c, grants / clients))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = rss_kib(pid);
    rows.push(Row {
        what: format!("daemon RSS with {grants} granted sessions (each a pre-registration)"),
        reaper: format!(
            "{:.1} MiB (n=1; {:.1} MiB at start)",
            after as f64 / 1024.0,
            before as f64 / 1024.0
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        goal: "≤ 64 MiB".into(),
        pass: Some(after as f64 / 1024.0 <= 64.0),
    });
}

/// A CDF plot of latency series, as SVG.
fn cdf_svg(title: &str, unit: &str, series: &[(String, Vec<f64>)]) -> String {
    let (w, h, m) = (640.0, 400.0, 50.0);
    let max = series
        .iter()
        .filter_map(|(_, v)| v.last().copied())
        .fold(1.0f64, f64::max)
        .max(1.0);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{m}\" y=\"20\" font-size=\"14\">{title}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.0} {unit} (log scale from 1)</text><text x=\"10\" y=\"{m}\">100%</text>\n",
        h - m, w - m, h - m, h - m, w - m, h - m + 20.0
    );
    let x = |v: f64| m + (v.max(1.0).ln() / max.ln().max(1e-9)) * (w - 2.0 * m);
    for (i, (label, values)) in series.iter().enumerate() {
        let n = values.len().max(1) as f64;
        let step = (values.len() / 400).max(1);
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .step_by(step)
            .map(|(k, v)| {
                format!(
                    "{:.1},{:.1}",
                    x(*v),
                    (h - m) - (k as f64 + 1.0) / n * (h - 2.0 * m)
                )
            })
            .collect();
        let color = colors[i % colors.len()];
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{label}</text>\n",
            points.join(" "),
            w - m - 120.0,
            m + 20.0 + 16.0 * i as f64
        );
    }
    out + "</svg>\n"
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Helper processes of the mass-expiry benchmark (spawned by itself).
    match args.first().map(String::as_str) {
        Some("--hold-server") => hold_server(args[1].parse().unwrap()),
        Some("--hold-clients") => hold_clients(args[1].parse().unwrap(), args[2].parse().unwrap()),
        _ => {}
    }
    const USAGE: &str =
        "usage: reaper-bench [--quick] [--out DIR] [--only kill|mass|datapath|control|memory]";
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => i += 1,
            "--out" | "--only" if i + 1 < args.len() => i += 2,
            other => {
                eprintln!("reaper-bench: unexpected argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench/results"));
    std::fs::create_dir_all(&out).unwrap();
    // --only NAME runs one benchmark (for profiling), without writing results.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut rows = Vec::new();
    let mut latency_plots = Vec::new();
    let mut kill_plots = Vec::new();
    if wanted("kill") {
        eprintln!("reaper-bench: kill latency");
        kill_latency(&mut rows, quick, &mut kill_plots);
    }
    let mut mass_plots = Vec::new();
    if wanted("mass") {
        eprintln!("reaper-bench: mass expiry");
        mass_expiry(&mut rows, quick, &mut mass_plots);
    }
    if wanted("datapath") {
        eprintln!("reaper-bench: data path");
        data_path(&mut rows, quick);
    }
    if wanted("control") {
        eprintln!("reaper-bench: control plane");
        control_plane(&mut rows, quick, &mut latency_plots);
    }
    if wanted("memory") {
        eprintln!("reaper-bench: memory");
        memory(&mut rows, quick);
    }
    if only.is_some() {
        for r in &rows {
            println!("{} | {} | {}", r.what, r.reaper, r.baseline);
        }
        return;
    }

    std::fs::write(
        out.join("kill-latency.svg"),
        cdf_svg(
            "kill latency: deadline to client reset (CDF)",
            "ms",
            &kill_plots,
        ),
    )
    .unwrap();
    std::fs::write(
        out.join("mass-expiry.svg"),
        cdf_svg(
            "mass expiry: clients reset over time (from the deadline, or from starting ss -K)",
            "ms",
            &mass_plots,
        ),
    )
    .unwrap();
    std::fs::write(
        out.join("control-plane-latency.svg"),
        cdf_svg(
            "grant latency (CDF), by concurrent clients",
            "µs",
            &latency_plots,
        ),
    )
    .unwrap();
    let machine = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut md = format!(
        "# reaper benchmarks{}\n\nMachine: {machine}. Each figure: median (n = runs, min–max).\n\n\
         | what | reaper | baseline | ratio | goal | pass |\n|---|---|---|---|---|---|\n",
        if quick { " (--quick sizes)" } else { "" }
    );
    for r in &rows {
        let pass = match r.pass {
            Some(true) => "pass",
            Some(false) => "**FAIL**",
            None => "—",
        };
        md += &format!(
            "| {} | {} | {} | {} | {} | {pass} |\n",
            r.what, r.reaper, r.baseline, r.ratio, r.goal
        );
    }
    md +=
        "\nPlots: [kill latency](kill-latency.svg), [mass expiry](mass-expiry.svg), [grant latency](control-plane-latency.svg).\n";
    std::fs::write(out.join("latest.md"), &md).unwrap();
    println!("{md}");
}
