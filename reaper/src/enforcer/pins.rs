//! bpffs handling: making sure it is mounted, swapping link pins atomically,
//! and removing everything on `reaper unload`.

use std::path::Path;

use aya::programs::links::FdLink;

use crate::error::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The filesystem magic number of the filesystem holding `path`.
fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: c is NUL-terminated, st a valid out-pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Makes sure the pin directory's parent is a bpf filesystem, mounting one
/// at `/sys/fs/bpf` if that is where it belongs and nothing is mounted there
/// (as on a machine without systemd's default mount).
pub fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    let parent = pin_path.parent().ok_or_else(|| {
        Error::Setup(format!(
            "pin_path {} has no parent directory",
            pin_path.display()
        ))
    })?;
    if fs_magic(parent) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        tracing::info!("mounting the bpf filesystem at /sys/fs/bpf");
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        return Err(Error::Setup(format!(
            "cannot mount the bpf filesystem at /sys/fs/bpf ({}); mount it with `mount -t bpf bpf /sys/fs/bpf`",
            std::io::Error::last_os_error()
        )));
    }
    Err(Error::Setup(format!(
        "pin_path {} is not inside a bpf filesystem; mount one (mount -t bpf bpf {}) or choose a pin_path under /sys/fs/bpf",
        pin_path.display(),
        parent.display()
    )))
}

/// The exclusive hold one daemon has on its `pin_path` for its whole life
/// (`flock` on the directory): two daemons on one set of pins would give
/// out the same session ids and delete each other's records.
pub struct PinLock {
    _dir: std::fs::File,
}

/// Takes the pin path's lock (making the directory, on bpffs, if needed);
/// refuses when another daemon holds it. Touches no map or program.
pub fn lock_pin_path(pin_path: &Path) -> Result<PinLock> {
    ensure_bpffs(pin_path)?;
    std::fs::create_dir_all(pin_path)
        .map_err(Error::io(format!("creating {}", pin_path.display())))?;
    let dir = std::fs::File::open(pin_path)
        .map_err(Error::io(format!("opening {}", pin_path.display())))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::Setup(format!(
                "pin_path {} is in use by another reaper daemon; each daemon needs a pin_path of its own (stop the other, or set another pin_path)",
                pin_path.display()
            )));
        }
        return Err(Error::io(format!("locking {}", pin_path.display()))(e));
    }
    Ok(PinLock { _dir: dir })
}

/// Pins `link` at `path`, replacing whatever link was pinned there before in
/// one rename: the old link is released (and detached) only once the new one
/// is attached and pinned, so enforcement has no gap.
pub fn replace_link_pin(link: FdLink, path: &Path) -> Result<()> {
    // bpffs refuses names with a dot, so no "link.new".
    let mut staging = path.as_os_str().to_owned();
    staging.push("_staging");
    let staging = std::path::PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let pinned = link.pin(&staging)?;
    std::fs::rename(&staging, path).map_err(Error::io(format!(
        "moving the link pin {} into place",
        path.display()
    )))?;
    drop(pinned);
    Ok(())
}

/// Removes every pin: detaches the programs and frees the maps. Grants and
/// tracked flows are gone afterwards; this is how reaper is uninstalled.
pub fn unload(pin_path: &Path) -> Result<bool> {
    if !pin_path.exists() {
        return Ok(false);
    }
    // Not from under a running daemon: it would go on with maps nobody
    // else can find, and a new daemon would start beside it.
    let _lock = lock_pin_path(pin_path)?;
    std::fs::remove_dir_all(pin_path)
        .map_err(Error::io(format!("removing {}", pin_path.display())))?;
    Ok(true)
}
