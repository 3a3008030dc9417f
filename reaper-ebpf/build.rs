//! Rebuild the kernel programs when the `bpf-linker` binary changes: the
//! linker is an undeclared dependency of every BPF object it produces.
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup` to install it"
        ),
    }
}
