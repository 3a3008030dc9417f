//! Debian's kernel packages: which ones, fetching them once into
//! `target/vm/kernels/`, and the modules the tests need from them.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::vm_dir;
use crate::{output, sh, step};

/// A Debian kernel package family: `linux-image-{prefix}N{suffix}`.
pub(super) struct KernelFamily {
    pub(super) label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

/// Debian 12's own kernel and the one it ships in backports/updates.
pub(super) const KERNELS: &[KernelFamily] = &[
    KernelFamily {
        label: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    KernelFamily {
        label: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

/// Modules the tests need that Debian builds as modules: veth pairs for
/// other hosts, sock_diag for SOCK_DESTROY and activity, clsact and cls_bpf
/// for the legacy tc attachment.
pub(super) const MODULES: &[&str] = &["veth", "inet_diag", "tcp_diag", "sch_ingress", "cls_bpf"];

/// The number in a package name of the family, if it is one.
pub(super) fn package_number(family: &KernelFamily, name: &str) -> Option<u64> {
    name.strip_prefix(family.prefix)?
        .strip_suffix(family.suffix)?
        .parse()
        .ok()
}

/// A kernel unpacked under target/vm/kernels: the newest cached one of the
/// family, else the newest the archive has, downloaded now.
pub(super) fn kernel(family: &KernelFamily) -> Result<PathBuf, String> {
    let cache = vm_dir().join("kernels");
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let newest = |names: Vec<String>| {
        names
            .into_iter()
            .filter_map(|n| package_number(family, &n).map(|v| (v, n)))
            .max()
            .map(|(_, n)| n)
    };
    let cached = std::fs::read_dir(&cache)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| e.path().join("ready").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Some(name) = newest(cached) {
        return Ok(cache.join(name));
    }
    let search = || {
        output("apt-cache", &["pkgnames", family.prefix])
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let package = match newest(search()) {
        Some(p) => p,
        None => {
            sh(Command::new("apt-get").arg("update"))?;
            newest(search()).ok_or_else(|| {
                format!(
                    "no {}N{} package in the apt sources",
                    family.prefix, family.suffix
                )
            })?
        }
    };
    let debs = vm_dir().join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
    let downloaded = || {
        std::fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
    };
    if downloaded().is_none() {
        step(&format!("downloading {package}"));
        sh(Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&debs))?;
    }
    let deb = downloaded().ok_or_else(|| format!("apt-get download left no {package}_*.deb"))?;
    // Only the image, its config and the modules the tests need: the whole
    // package unpacks to half a gigabyte.
    let dir = cache.join(&package);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut patterns = vec![
        "./boot/vmlinuz-*".to_string(),
        "./boot/config-*".to_string(),
    ];
    patterns.extend(MODULES.iter().map(|m| format!("*/{m}.ko*")));
    sh(Command::new("sh")
        .arg("-c")
        .arg(
            "dir=\"$1\"; shift; dpkg-deb --fsys-tarfile \"$0\" \\
             | tar -x -C \"$dir\" --wildcards --wildcards-match-slash \"$@\"",
        )
        .arg(&deb)
        .arg(&dir)
        .args(&patterns))?;
    std::fs::write(dir.join("ready"), "").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&deb);
    Ok(dir)
}

pub(super) fn find_file(dir: &Path, pred: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(p) = find_file(&path, pred) {
                return Some(p);
            }
        } else if pred(&entry.file_name().to_string_lossy()) {
            return Some(path);
        }
    }
    None
}

/// A module's bytes, decompressed (Debian 6.12 ships .ko.xz; busybox's
/// insmod wants plain ELF).
pub(super) fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .args(["-dc"])
            .arg(path)
            .output()
            .map_err(|e| format!("xz: {e}"))?;
        if !out.status.success() {
            return Err(format!("xz -dc {} failed", path.display()));
        }
        Ok(out.stdout)
    } else {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The `depends=` field of a module's .modinfo section.
pub(super) fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &ko[at + key.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The kernel's modules in load order (dependencies first).
pub(super) fn modules(kernel: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    fn add(
        kernel: &Path,
        name: &str,
        out: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), String> {
        if out.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 8 {
            return Err(format!("module dependencies of {name} go too deep"));
        }
        let file = find_file(kernel, &|f| {
            f == format!("{name}.ko") || f == format!("{name}.ko.xz")
        })
        .ok_or_else(|| {
            format!(
                "module {name} is not in {} (add it to MODULES in xtask/src/vm.rs)",
                kernel.display()
            )
        })?;
        let bytes = module_bytes(&file)?;
        for dep in module_depends(&bytes) {
            add(kernel, &dep, out, depth + 1)?;
        }
        out.push((name.to_string(), bytes));
        Ok(())
    }
    let mut out = Vec::new();
    for m in MODULES {
        add(kernel, m, &mut out, 0)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_numbers_pick_only_the_family() {
        let f = &KERNELS[1];
        assert_eq!(
            package_number(f, "linux-image-6.12.101+deb12-amd64"),
            Some(101)
        );
        assert_eq!(
            package_number(f, "linux-image-6.12.101+deb12-cloud-amd64"),
            None
        );
        assert_eq!(
            package_number(&KERNELS[0], "linux-image-6.1.0-50-amd64"),
            Some(50)
        );
        assert_eq!(
            package_number(&KERNELS[0], "linux-image-6.1.0-50-rt-amd64"),
            None
        );
    }

    #[test]
    fn modinfo_depends_are_read() {
        let ko = b"\x7fELF...license=GPL\0depends=inet_diag,foo\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["inet_diag", "foo"]);
        assert!(module_depends(b"depends=\0").is_empty());
    }
}
