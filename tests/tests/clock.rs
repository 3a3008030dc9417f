//! Wall-clock steps: someone sets the clock.
//!
//! Deadlines given as a `ttl` live on the boot clock and do not move; a
//! deadline given as `expires_at` is a wall time (a token's expiry), so it
//! follows the wall clock: set forward past it, the session ends now; set
//! back, it lies further away (within max_ttl).
//!
//! Setting the clock touches the whole machine, so this runs only inside
//! the VMs of `cargo xtask vm-test` (its runner includes ignored tests);
//! on the host nextest lists it as skipped.

use reaper_tests::{assert_reset, boot_ns, bound, bound_ms, Conn, Sandbox, SECOND};
use serde_json::{json, Value};

const NS: i128 = 1_000_000_000;

fn wall_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as i128 * NS + ts.tv_nsec as i128
}

/// Steps the wall clock by `delta_ns`.
fn step_clock(delta_ns: i128) {
    let to = wall_ns() + delta_ns;
    let ts = libc::timespec {
        tv_sec: (to / NS) as libc::time_t,
        tv_nsec: (to % NS) as libc::c_long,
    };
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    assert_eq!(rc, 0, "clock_settime: {}", std::io::Error::last_os_error());
}

/// Puts the wall clock back where it would be had nobody touched it, also
/// when the test fails.
struct ClockGuard {
    offset_ns: i128,
}

impl ClockGuard {
    fn step(&mut self, delta_ns: i128) {
        step_clock(delta_ns);
        self.offset_ns += delta_ns;
    }
}

impl Drop for ClockGuard {
    fn drop(&mut self) {
        step_clock(-self.offset_ns);
    }
}

/// RFC 3339 in UTC, whole seconds (days to civil date: Hinnant's
/// algorithm). Written here rather than borrowed from reaper's policy
/// module, whose parser is under test: an independent reading of the date.
fn rfc3339(unix_ns: i128) -> String {
    let secs = (unix_ns / NS) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn deadline_of(sb: &Sandbox, session: &str) -> Option<u64> {
    let listed = sb.ok(json!({"op": "list", "session": session}));
    listed["sessions"]
        .as_array()
        .unwrap()
        .first()
        .map(|s: &Value| s["deadline_boot_ns"].as_u64().unwrap())
}

#[test]
#[ignore = "sets the system clock: runs only inside `cargo xtask vm-test`"]
fn ttl_deadlines_ignore_clock_steps_and_expires_at_follows_them() {
    let mut sb = Sandbox::new("clock");
    sb.write_config("max_ttl = \"1d\"\n[[watch]]\nports = \"5900\"\nside = \"local\"\n");
    sb.start_daemon();
    sb.peer(&["127.0.0.1:5900"]);
    let mut by_ttl = Conn::connect("127.0.0.1:5900");
    let mut by_wall = Conn::connect("127.0.0.1:5900");
    let mut by_wall_later = Conn::connect("127.0.0.1:5900");

    let ttl = sb.grant("by-ttl", "u", "t", "6s", &by_ttl);
    let ttl_deadline = ttl["session"]["deadline_boot_ns"].as_u64().unwrap();
    let grant_at = |sb: &Sandbox, name: &str, flow: &Conn, secs: i128| {
        sb.ok(
            json!({"op": "grant", "session": name, "user": "u", "target": "t",
                     "expires_at": rfc3339(wall_ns() + secs * NS), "flows": [flow.spec()]}),
        )
    };
    grant_at(&sb, "by-wall", &by_wall, 600);
    let later = grant_at(&sb, "by-wall-later", &by_wall_later, 1800);
    let later_deadline = later["session"]["deadline_boot_ns"].as_u64().unwrap();

    let mut clock = ClockGuard { offset_ns: 0 };
    // Twenty minutes forward: by-wall's 10 minutes are over; by-wall-later
    // has 10 of its 30 left.
    clock.step(1200 * NS);
    let stepped_at = boot_ns();
    let (err, seen_at) = by_wall.wait_reset(bound(2 * SECOND));
    assert_reset(&err);
    let late_ms = (seen_at.saturating_sub(stepped_at)) as f64 / 1e6;
    println!("expires_at flow reset {late_ms:.1} ms after the clock was set forward");
    assert!(
        late_ms < bound_ms(500.0),
        "reset {late_ms} ms after the step"
    );
    // by-wall-later is now 10 minutes away on the boot clock, not 30.
    let moved = deadline_of(&sb, "by-wall-later").expect("by-wall-later still lives");
    let expected = later_deadline - 1200 * NS as u64;
    assert!(
        moved.abs_diff(expected) < 2_000_000_000,
        "by-wall-later's deadline {moved} should be near {expected}"
    );
    // The ttl session did not move.
    assert_eq!(deadline_of(&sb, "by-ttl"), Some(ttl_deadline));
    by_ttl
        .echo()
        .expect("the ttl flow lives on after the step forward");
    by_wall_later.echo().expect("by-wall-later lives on");

    // Two hours back: by-wall-later is 2 h 10 min away (under max_ttl 1d).
    clock.step(-7200 * NS);
    let end = std::time::Instant::now() + 5 * SECOND;
    let moved_back = loop {
        let d = deadline_of(&sb, "by-wall-later").unwrap();
        if d > moved + 3600 * NS as u64 || std::time::Instant::now() > end {
            break d;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let expected = moved + 7200 * NS as u64;
    assert!(
        moved_back.abs_diff(expected) < 2_000_000_000,
        "by-wall-later's deadline {moved_back} should be near {expected}"
    );
    assert_eq!(deadline_of(&sb, "by-ttl"), Some(ttl_deadline));

    // The ttl session still dies at its boot-clock deadline.
    let (err, seen_at) = by_ttl.wait_reset(10 * SECOND);
    assert_reset(&err);
    assert!(
        seen_at >= ttl_deadline,
        "ttl flow reset before its deadline"
    );
    assert!((seen_at - ttl_deadline) as f64 / 1e6 < bound_ms(50.0));
    by_wall_later
        .echo()
        .expect("by-wall-later lives on after the clock went back");

    let events = sb.wait_audit(2, 5 * SECOND);
    let ended: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["session"].as_str().unwrap(),
                e["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(ended, [("by-wall", "expired"), ("by-ttl", "expired")]);
}
