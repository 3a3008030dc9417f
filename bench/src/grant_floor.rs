//! The floor under a grant's CPU cost in the daemon: the kernel writes one
//! pre-registering grant makes, and nothing else. A session record goes
//! into a hash map of `SessionRecord`s (one `bpf(2)` call), and the
//! connection's two recorded forms into a hash map of `PendingGrant`s (one
//! batched call), each map sized as the daemon sizes them in the bench.
//! They are made with raw `bpf(2)` calls in this process, so the figure
//! holds no daemon code at all.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use reaper_common::{FlowTuple, PendingGrant, SessionRecord};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_TYPE_HASH: u32 = 1;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a bpf_attr of the size passed, laid out as the
    // command expects; the pointers in it are live for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn put(attr: &mut [u8; 128], offset: usize, bytes: &[u8]) {
    attr[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn hash_map(key_size: usize, value_size: usize, max_entries: u32) -> OwnedFd {
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &BPF_MAP_TYPE_HASH.to_ne_bytes());
    put(&mut attr, 4, &(key_size as u32).to_ne_bytes());
    put(&mut attr, 8, &(value_size as u32).to_ne_bytes());
    put(&mut attr, 12, &max_entries.to_ne_bytes());
    let fd = bpf(BPF_MAP_CREATE, &mut attr).expect("create a hash map");
    // SAFETY: a successful MAP_CREATE returns a new descriptor.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The two recorded forms of the expected connection of grant `i`.
fn keys_of(i: u64) -> [FlowTuple; 2] {
    [
        FlowTuple {
            family: 2,
            local_port: 5900,
            remote_port: (i % 60_000) as u16,
            remote_addr: [i as u32, 0, 0, 0],
            ..FlowTuple::default()
        },
        FlowTuple {
            family: 10,
            local_port: 5900,
            remote_port: (i % 60_000) as u16,
            remote_addr: [0, 0, 0xffff_0000, i as u32],
            ..FlowTuple::default()
        },
    ]
}

/// One `BPF_MAP_UPDATE_BATCH` of `count` keys and values into `map`.
fn update_batch(map: &OwnedFd, keys: *const u8, values: *const u8, count: usize) {
    let mut attr = [0u8; 128];
    put(&mut attr, 16, &(keys as u64).to_ne_bytes());
    put(&mut attr, 24, &(values as u64).to_ne_bytes());
    put(&mut attr, 32, &(count as u32).to_ne_bytes());
    put(&mut attr, 36, &(map.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr).expect("a batched update");
}

/// CPU µs per grant that `n` grants' kernel writes take, alone.
pub fn kernel_writes_per_grant(n: usize) -> f64 {
    let sessions = hash_map(8, size_of::<SessionRecord>(), 131_072);
    let pending = hash_map(size_of::<FlowTuple>(), size_of::<PendingGrant>(), 262_144);
    let record = SessionRecord::default();
    let grant = PendingGrant::default();
    let values = [grant; 2];
    let start = thread_cpu_ns();
    for i in 0..n as u64 {
        let id = i + 1;
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &(sessions.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &(&id as *const u64 as u64).to_ne_bytes());
        put(
            &mut attr,
            16,
            &(&record as *const SessionRecord as u64).to_ne_bytes(),
        );
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).expect("put a session record");
        let keys = keys_of(i);
        update_batch(&pending, keys.as_ptr().cast(), values.as_ptr().cast(), 2);
    }
    (thread_cpu_ns() - start) as f64 / 1e3 / n as f64
}

/// The same writes for `n` grants, made `per` grants at a time: one
/// batched call for their session records and one for their keys. What the
/// daemon's kernel writes would cost if the grants of a `batch` request
/// shared their calls (it makes them grant by grant, so that each grant's
/// writes are in before the next grant is judged).
pub fn kernel_writes_per_grant_batched(n: usize, per: usize) -> f64 {
    let sessions = hash_map(8, size_of::<SessionRecord>(), 131_072);
    let pending = hash_map(size_of::<FlowTuple>(), size_of::<PendingGrant>(), 262_144);
    let records = vec![SessionRecord::default(); per];
    let grants = vec![PendingGrant::default(); 2 * per];
    let (mut ids, mut keys) = (Vec::with_capacity(per), Vec::with_capacity(2 * per));
    let start = thread_cpu_ns();
    for first in (0..n as u64).step_by(per) {
        ids.clear();
        keys.clear();
        for i in first..(first + per as u64).min(n as u64) {
            ids.push(i + 1);
            keys.extend(keys_of(i));
        }
        update_batch(
            &sessions,
            ids.as_ptr().cast(),
            records.as_ptr().cast(),
            ids.len(),
        );
        update_batch(
            &pending,
            keys.as_ptr().cast(),
            grants.as_ptr().cast(),
            keys.len(),
        );
    }
    (thread_cpu_ns() - start) as f64 / 1e3 / n as f64
}
