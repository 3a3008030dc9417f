//! The table of results: one row per kernel, with the BPF features each
//! one has, printed and written to `target/vm/results.md`.

use std::collections::BTreeMap;

use super::vm_dir;
use crate::{output, root, TestRun};

/// One kernel's outcome, one row of the table.
pub struct Row {
    pub kernel: String,
    pub how: String,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// feature name → yes / no / unknown, from `reaper features`.
    pub features: BTreeMap<String, String>,
    pub seconds: u64,
    /// Failed tests, by name.
    pub failures: Vec<String>,
    /// Tests that passed only when run again (counted as passed).
    pub flaky: Vec<String>,
}

/// A `reaper features` table row as (feature, yes / no / unknown).
pub(super) fn feature_state(line: &str) -> Option<(String, String)> {
    let mut words = line.split_whitespace();
    let (name, state) = (words.next()?, words.next()?);
    ["yes", "no", "unknown"]
        .contains(&state)
        .then(|| (name.to_string(), state.to_string()))
}

/// The host's own row: features from `reaper features`, counts from the
/// nextest run the caller made.
pub fn host_row(run: &TestRun) -> Row {
    let bin = root().join("target/debug/reaper");
    let text = output(&bin.to_string_lossy(), &["features"]);
    let features = text.lines().filter_map(feature_state).collect();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Row {
        kernel: format!("host ({})", release.trim()),
        how: "directly".into(),
        passed: run.passed,
        failed: run.failed,
        skipped: run.skipped,
        features,
        seconds: run.seconds,
        failures: Vec::new(),
        flaky: Vec::new(),
    }
}

/// The results table (Markdown), written to target/vm/results.md.
pub fn report(rows: &[Row]) -> String {
    let columns = [
        ("sock_ops", "sock_ops"),
        ("cgroup_skb", "cgroup_skb"),
        ("ring_buffer", "ring buffer"),
        ("tcx", "tcx"),
        ("sock_destroy", "SOCK_DESTROY"),
    ];
    let mut s = String::from("| kernel | run | passed | failed | skipped |");
    for (_, title) in columns {
        s.push_str(&format!(" {title} |"));
    }
    s.push_str(" other features | time |\n|---|---|---|---|---|");
    s.push_str(&"---|".repeat(columns.len() + 2));
    s.push('\n');
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |",
            r.kernel, r.how, r.passed, r.failed, r.skipped
        ));
        for (name, _) in columns {
            s.push_str(&format!(
                " {} |",
                r.features.get(name).map_or("?", String::as_str)
            ));
        }
        let others: Vec<String> = r
            .features
            .iter()
            .filter(|(n, _)| !columns.iter().any(|(c, _)| c == n))
            .map(|(n, v)| {
                if v == "yes" {
                    n.clone()
                } else {
                    format!("{n}: {v}")
                }
            })
            .collect();
        s.push_str(&format!(" {} | {} s |\n", others.join(", "), r.seconds));
    }
    for r in rows.iter().filter(|r| !r.failures.is_empty()) {
        s.push_str(&format!(
            "\nFailed on {}: {}\n",
            r.kernel,
            r.failures.join(", ")
        ));
    }
    for r in rows.iter().filter(|r| !r.flaky.is_empty()) {
        s.push_str(&format!(
            "\nPassed only on a second try on {}: {}\n",
            r.kernel,
            r.flaky.join(", ")
        ));
    }
    let path = vm_dir().join("results.md");
    let _ = std::fs::create_dir_all(vm_dir());
    let _ = std::fs::write(&path, &s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_rows_are_read_and_other_lines_are_not() {
        let row = "tcx           no       attaching the forwarded-flow program";
        assert_eq!(feature_state(row), Some(("tcx".into(), "no".into())));
        assert_eq!(feature_state("feature       present  used for"), None);
        assert_eq!(feature_state("kernel 6.1.0-56-amd64"), None);
        assert_eq!(feature_state(""), None);
    }
}
