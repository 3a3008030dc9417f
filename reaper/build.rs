//! Builds the kernel programs (`reaper-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker, and leaves the object in `OUT_DIR`, where
//! `src/enforcer/load.rs` embeds it. `cargo xtask setup` installs what this
//! needs on a fresh machine.
use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("reaper/ lives in the workspace")
        .join("reaper-ebpf");
    let root_dir = root.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [Package {
            name: "reaper-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
