//! The few raw socket and `bpf(2)` calls the enforcer makes, with their
//! unsafety in one place.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `sendto(2)` of `data` to the address `addr` (a `sockaddr_*` struct).
pub fn send_to<A>(fd: BorrowedFd<'_>, data: &[u8], addr: &A) -> io::Result<()> {
    // SAFETY: data and addr are live for the call; the length is addr's size.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            0,
            (addr as *const A).cast(),
            std::mem::size_of::<A>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `setsockopt(2)` with a value of type `T`.
pub fn set_option<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: value points at a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf(2)` command `cmd` with `attr`, the part of `union bpf_attr` that
/// command reads (the kernel zero-checks the rest up to the size passed).
///
/// # Safety
/// `attr` must be laid out as the kernel's `bpf_attr` for `cmd`, and every
/// pointer in it must be valid for what the kernel reads or writes there.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: attr is live and of the size passed; the rest is the
    // caller's promise.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            std::mem::size_of::<A>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (kernel 5.6+).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The batch part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `values[i]` under `keys[i]`, each created or replaced, in one
/// `bpf(2)` call. Returns how many were written before an error (the
/// kernel stops at the first it cannot write, `E2BIG` for a full table)
/// and that error, if any.
pub fn update_batch<K, V>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, Option<io::Error>) {
    assert_eq!(keys.len(), values.len(), "a value for each key");
    // SAFETY: keys and values point at `keys.len()` keys and values of the
    // map's sizes (the caller's K and V), which the kernel only reads.
    unsafe { map_batch(BPF_MAP_UPDATE_BATCH, map, keys, values.as_ptr() as u64) }
}

/// Deletes `keys` from the map in one `bpf(2)` call. Returns how many were
/// processed before an error (the kernel stops at the first key it cannot
/// delete, `ENOENT` for one that is not there) and that error, if any.
pub fn delete_batch<K>(map: BorrowedFd<'_>, keys: &[K]) -> (usize, Option<io::Error>) {
    // SAFETY: keys point at `keys.len()` keys of the map's key size (the
    // caller's K), which the kernel only reads; a delete reads no values.
    unsafe { map_batch(BPF_MAP_DELETE_BATCH, map, keys, 0) }
}

/// One batched map command over `keys` (and `values`, for an update).
///
/// # Safety
/// `keys` must be keys of the map's key size, and `values` 0 or the address
/// of as many values of its value size.
unsafe fn map_batch<K>(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[K],
    values: u64,
) -> (usize, Option<io::Error>) {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: attr is the batch part of bpf_attr; its pointers are the
    // caller's promise; the kernel writes back `count`, in attr.
    match unsafe { bpf(cmd, &mut attr) } {
        Ok(()) => (keys.len(), None),
        Err(e) => ((attr.count as usize).min(keys.len()), Some(e)),
    }
}
