//! Helpers several benchmarks share: pipelined requests, waiting for
//! clients to see their connection end, and lateness.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use reaper_tests::boot_ns;

/// Sends every request on one connection while a second thread reads the
/// answers (requests pipelined, as the protocol's ids allow). Returns the
/// answer lines unparsed: parsing them here would make the client, not the
/// daemon, the bottleneck being measured.
pub fn pipelined(socket: &std::path::Path, requests: Vec<String>) -> Vec<String> {
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
pub fn rfc3339_in(in_ns: u64) -> String {
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

/// Runs `meanwhile` while another thread waits until every stream has
/// ended (EOF or reset), and returns `meanwhile`'s result and, for each
/// stream, the boot time at which it was seen to end (None: still open at
/// timeout). For flows that may end while the benchmark is still granting
/// (or setting up) others, whose end must be timed when it comes, not when
/// the benchmark is done. The watcher borrows the streams (no clones: at
/// 10k flows the descriptors are near the process's limit) and never reads
/// them: `meanwhile` still reads answers on them.
pub fn observe_ends<S: std::os::fd::AsFd + Sync, R: Send>(
    streams: &[S],
    timeout: Duration,
    meanwhile: impl FnOnce() -> R + Send,
) -> (R, Vec<Option<u64>>) {
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| wait_ended(streams, timeout, None, Reading::Never));
        let result = meanwhile();
        (result, watcher.join().unwrap())
    })
}

/// Like `observe_ends`, on the calling thread and reading, for streams
/// held long before anything ends (a helper holding its share while the
/// others connect): waits up to `cap` for the first end, then up to
/// `after_first` more for the rest.
pub fn wait_all_ended_after_first(
    streams: &[TcpStream],
    cap: Duration,
    after_first: Duration,
) -> Vec<Option<u64>> {
    wait_ended(streams, cap, Some(after_first), Reading::Drain)
}

/// How `wait_ended` tells an end from data.
#[derive(Clone, Copy, PartialEq)]
enum Reading {
    /// Reads (and discards) whatever arrives; an end is a read of 0 or an error.
    Drain,
    /// Never reads: an end is the peer's FIN (EPOLLRDHUP) or a reset
    /// (EPOLLERR/EPOLLHUP), for streams someone else reads.
    Never,
}

fn wait_ended<S: std::os::fd::AsFd>(
    streams: &[S],
    timeout: Duration,
    after_first: Option<Duration>,
    reading: Reading,
) -> Vec<Option<u64>> {
    use std::os::fd::AsRawFd;
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    let interest = match reading {
        Reading::Drain => libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR,
        Reading::Never => libc::EPOLLRDHUP | libc::EPOLLERR,
    };
    for (i, s) in streams.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: interest as u32,
            u64: i as u64,
        };
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_fd().as_raw_fd(), &mut ev) };
    }
    let mut ended: Vec<Option<u64>> = vec![None; streams.len()];
    let mut left = streams.len();
    let mut end = Instant::now() + timeout;
    let mut first_seen = false;
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
            let fd = streams[i].as_fd().as_raw_fd();
            let is_end = match reading {
                Reading::Never => true,
                Reading::Drain => {
                    let r = unsafe {
                        libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                    };
                    r <= 0
                }
            };
            if is_end {
                ended[i] = Some(now);
                left -= 1;
                if let (false, Some(more)) = (first_seen, after_first) {
                    first_seen = true;
                    end = Instant::now() + more;
                }
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
            }
        }
    }
    unsafe { libc::close(ep) };
    ended
}

/// Each kill's lateness in ms, sorted (infinite: it never ended).
pub fn lateness_ms(deadlines: &[u64], ended: &[Option<u64>]) -> Vec<f64> {
    let mut late: Vec<f64> = deadlines
        .iter()
        .zip(ended)
        .map(|(d, e)| e.map_or(f64::INFINITY, |e| (e as f64 - *d as f64) / 1e6))
        .collect();
    late.sort_by(|a, b| a.total_cmp(b));
    late
}
