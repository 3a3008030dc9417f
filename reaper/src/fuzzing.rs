//! What the fuzz targets (`fuzz/fuzz_targets/`) run, and what `cargo xtask
//! test` replays over the committed corpus (`fuzz/corpus/`), so that an
//! input that once broke a parser stays a test.
//!
//! Beyond "no panic", each checks what the daemon relies on: a refusal
//! names what is wrong (a non-empty message), and a config that loads holds
//! the bounds the daemon never re-checks (non-zero durations, port ranges in
//! order, classes within max_ttl, table and client limits in range).

#![forbid(unsafe_code)]

use crate::config::{Config, MAX_CLIENTS_LIMIT};
use crate::protocol::parse_request;

/// One control line, as the daemon gets it from a client.
pub fn protocol_line(data: &[u8]) {
    if let Err((_, refusal)) = parse_request(data) {
        assert!(
            !refusal.message.is_empty(),
            "a refusal without a message: {:?}",
            refusal.code
        );
    }
}

/// A config file's text.
pub fn config_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(c) => {
            assert!(c.max_ttl_ns > 0 && c.fence_grace_ns > 0, "zero duration");
            for w in c.watch.iter().chain(&c.fence) {
                assert!(0 < w.first && w.first <= w.last, "port range {w:?}");
            }
            for class in c.classes.values() {
                assert!(class.max_ttl_ns > 0 && class.max_ttl_ns <= c.max_ttl_ns);
                if let Some(ttl) = class.ttl_ns {
                    assert!(ttl > 0 && ttl <= class.max_ttl_ns, "class {}", class.name);
                }
                assert_ne!(class.idle_timeout_ns, Some(0), "class {}", class.name);
            }
            assert!(c.max_flows >= 1024 && c.max_sessions >= 16 && c.max_pending >= 16);
            assert!((1..=MAX_CLIENTS_LIMIT as usize).contains(&c.max_clients));
            assert!((1..=c.max_clients).contains(&c.max_clients_per_uid));
            assert!(c.max_flows_per_owner <= c.max_flows);
            assert!((-20..=19).contains(&c.nice));
            assert!(!c.client_timeout.is_zero());
            let a = &c.access;
            assert!(a.max_sessions_per_uid >= 1 && a.max_expecting_per_uid >= 1);
            for s in &a.scopes {
                assert!(
                    !(s.uids.is_empty() && s.gids.is_empty()),
                    "a scope for nobody"
                );
                for class in &s.classes {
                    assert!(
                        class == "default" || c.classes.contains_key(class),
                        "{class:?}"
                    );
                }
                for t in &s.targets {
                    assert!(
                        !t.is_empty() && !t.trim_end_matches('*').contains('*'),
                        "{t:?}"
                    );
                    assert!(t.matches('*').count() <= 1, "{t:?}");
                }
                for (first, last) in &s.ports {
                    assert!(0 < *first && first <= last, "scope ports {first}-{last}");
                }
                assert_ne!(s.max_sessions, Some(0));
                assert_ne!(s.max_expecting, Some(0));
            }
        }
        Err(e) => assert!(!e.to_string().is_empty(), "an error without a message"),
    }
}

/// A stream of messages as a client sends them to the control socket, each
/// with descriptors (SCM_RIGHTS), read by the daemon's connection code.
/// The input is split at 0xFF bytes into messages; each message's first
/// byte says how many descriptors come with it (its value mod 24: past 16
/// the kernel truncates the control data). The first byte of the input
/// says whether the caller may use descriptors, the second the daemon's
/// descriptor budget.
///
/// Beyond "no panic": a line never carries more than 16 descriptors, a
/// caller who may not use them gets none, and every descriptor the
/// connection held is given back to the budget when it ends.
pub fn descriptor_stream(data: &[u8]) {
    let [takes, budget, rest @ ..] = data else {
        return;
    };
    let messages: Vec<(usize, &[u8])> = rest
        .split(|b| *b == 0xFF)
        .filter_map(|m| m.split_first())
        .map(|(n, bytes)| (*n as usize % 24, bytes))
        .filter(|(n, bytes)| !bytes.is_empty() || *n == 0)
        .take(64)
        .collect();
    crate::daemon::connection::replay(takes % 2 == 0, *budget as usize, &messages);
}

#[cfg(test)]
mod tests {
    /// The committed fuzz corpus, replayed: every input that ever mattered
    /// to the fuzzer stays a regression test, without a fuzzer installed.
    fn replay(target: &str, run: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        let mut count = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} fails", path.display());
            count += 1;
        }
        assert!(count > 0, "no corpus in {}", dir.display());
    }

    #[test]
    fn protocol_corpus_replays() {
        replay("protocol", super::protocol_line);
    }

    #[test]
    fn descriptors_corpus_replays() {
        replay("descriptors", super::descriptor_stream);
    }

    #[test]
    fn config_corpus_replays() {
        replay("config", super::config_text);
    }
}
