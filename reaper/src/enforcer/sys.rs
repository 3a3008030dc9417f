//! The few raw socket calls the enforcer makes, with their unsafety in one
//! place.

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
