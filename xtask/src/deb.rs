//! `cargo xtask deb`: the Debian package. The generated assets (man pages
//! from the clap definitions and from docs/configuration.md, shell
//! completions) are written to target/release/deb-assets, then cargo-deb (installed
//! under target/tools on first use) packs them with the release binary, the
//! unit and the default config as `reaper/Cargo.toml` lists them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, output, root, sh, step};

pub const CARGO_DEB_VERSION: &str = "3.8.0";

fn cargo_deb() -> PathBuf {
    root().join("target/tools/bin/cargo-deb")
}

/// Installs cargo-deb under target/tools (kept with the build cache).
pub fn install_cargo_deb() -> Result<(), String> {
    if output(cargo_deb().to_str().unwrap_or_default(), &["--version"]).contains(CARGO_DEB_VERSION)
    {
        return Ok(());
    }
    step(&format!(
        "installing cargo-deb {CARGO_DEB_VERSION} into target/tools (takes a few minutes)"
    ));
    sh(Command::new("cargo")
        .args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ])
        .arg("--root")
        .arg(root().join("target/tools")))
}

fn write(path: &Path, text: &[u8]) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))
}

/// Builds the package (the release build must exist); returns its path.
pub fn build_deb() -> Result<PathBuf, String> {
    install_cargo_deb()?;
    let reaper = root().join("target/release/reaper");
    let assets = root().join("target/release/deb-assets");
    let _ = std::fs::remove_dir_all(&assets);
    let (man8, man5, completions) = (
        assets.join("man8"),
        assets.join("man5"),
        assets.join("completions"),
    );
    for dir in [&man8, &man5, &completions] {
        mkdir(dir)?;
    }
    step("writing man pages and completions into target/release/deb-assets");
    sh(Command::new(&reaper).arg("manpages").arg(&man8))?;
    let version = env!("CARGO_PKG_VERSION");
    let config_doc = std::fs::read_to_string(root().join("docs/configuration.md"))
        .map_err(|e| format!("reading docs/configuration.md: {e}"))?;
    write(
        &man5.join("reaper.toml.5"),
        config_manpage(&config_doc, version).as_bytes(),
    )?;
    for (shell, file) in [
        ("bash", "reaper.bash"),
        ("zsh", "_reaper"),
        ("fish", "reaper.fish"),
    ] {
        let script = Command::new(&reaper)
            .args(["completions", shell])
            .output()
            .map_err(|e| format!("running reaper completions {shell}: {e}"))?;
        if !script.status.success() || script.stdout.is_empty() {
            return Err(format!("reaper completions {shell} failed"));
        }
        write(&completions.join(file), &script.stdout)?;
    }
    // Debian ships man pages compressed; -n keeps the package reproducible.
    for dir in [&man8, &man5] {
        sh(Command::new("sh")
            .arg("-c")
            .arg("gzip -9nf -- *")
            .current_dir(dir))?;
    }
    let out = root().join("target/debian");
    mkdir(&out)?;
    step("packing the .deb (cargo-deb)");
    sh(cargo()
        .env("PATH", path_with_tools())
        .args(["deb", "--package", "reaper", "--no-build", "--output"])
        .arg(&out))?;
    let arch = output("dpkg", &["--print-architecture"]);
    let deb = out.join(format!("reaper_{version}-1_{}.deb", arch.trim()));
    if deb.exists() {
        return Ok(deb);
    }
    let plain = out.join(format!("reaper_{version}_{}.deb", arch.trim()));
    if plain.exists() {
        Ok(plain)
    } else {
        Err(format!(
            "cargo-deb wrote no {} in {}",
            deb.display(),
            out.display()
        ))
    }
}

fn path_with_tools() -> String {
    format!(
        "{}:{}",
        root().join("target/tools/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A man page text: roff's special characters escaped.
fn roff(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('`', "");
    // A line may not start with a dot or a quote (a request to roff).
    text.lines()
        .map(|l| {
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// reaper.toml(5), from docs/configuration.md: its opening paragraph, the
/// key table (one entry per row), and every later paragraph and example.
fn config_manpage(doc: &str, version: &str) -> String {
    let mut page = format!(
        ".TH REAPER.TOML 5 \"\" \"reaper {version}\" \"File Formats\"\n.SH NAME\nreaper.toml \\- configuration of the reaper daemon\n.SH SYNOPSIS\n/etc/reaper/reaper.toml\n.SH DESCRIPTION\n"
    );
    let mut in_code = false;
    let mut keys_done = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            page += if in_code { ".PP\n.nf\n" } else { ".fi\n" };
            continue;
        }
        if in_code {
            page += &roff(line);
            page.push('\n');
            continue;
        }
        if let Some(title) = line.strip_prefix("## ") {
            page += &format!(".SH {}\n", roff(&title.to_uppercase()));
        } else if line.starts_with("# ") {
            continue;
        } else if line.starts_with("|---") || line.starts_with("| key ") {
            if !keys_done {
                page += ".SH KEYS\n";
                keys_done = true;
            }
        } else if let Some(row) = line.strip_prefix("| ") {
            let cells: Vec<&str> = row.trim_end_matches('|').split(" | ").collect();
            if let [key, default, meaning, ..] = cells[..] {
                page += &format!(
                    ".TP\n.B {}\n(default: {}) {}\n",
                    roff(key.trim()),
                    roff(default.trim()),
                    roff(meaning.trim())
                );
            }
        } else if line.trim().is_empty() {
            page += ".PP\n";
        } else {
            page += &roff(line);
            page.push('\n');
        }
    }
    page += ".SH SEE ALSO\nreaper(8), reaper-check-config(8)\n";
    page
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_rows_become_entries() {
        let doc = "# Configuration\n\nIntro `x`.\n\n| key | default | meaning |\n|---|---|---|\n| `socket` | `/run/r.sock` | the .socket |\n\n## More\n\n```toml\n.a = 1\n```\n";
        let page = super::config_manpage(doc, "0.1.0");
        assert!(
            page.contains(".TP\n.B socket\n(default: /run/r.sock) the .socket\n"),
            "{page}"
        );
        assert!(page.contains(".SH MORE\n"), "{page}");
        assert!(page.contains(".nf\n\\&.a = 1\n.fi\n"), "{page}");
    }
}
