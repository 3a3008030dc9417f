//! The fleet task: keeps this node in the fleet and every revocation
//! written anywhere applied here. It lists the standing revocations, then
//! watches from the revision after (or from where it left off before a
//! restart), hands each change to the core in revision order, and keeps
//! the last applied revision in `fleet.state_file`. When etcd goes away it
//! reconnects and catches up from that revision; when the history it
//! needs is compacted away it lists again.
//!
//! It runs at the thread's ordinary priority: what it does is decided by
//! whoever can write to etcd, like a caller's requests.

use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

use super::shared::{lock, Shared};
use crate::config::Fleet;
use crate::daemon::core::fleet::Applying;
use crate::fleet::etcd::{self, Change, Watched};
use crate::fleet::record::Revocation;

const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Short enough that a healed partition is caught up within a second.
const LAST_RETRY: Duration = Duration::from_millis(500);

/// Follows the fleet for good (a daemon task).
pub(super) async fn run(state: Shared, fleet: Fleet, node: String) {
    let mut resume = read_state(&fleet.state_file);
    lock(&state).fleet_joined(&node, &fleet.endpoints, resume.unwrap_or(0));
    info!(
        node = %node,
        endpoints = ?fleet.endpoints,
        resume_from = resume.unwrap_or(0),
        "joining the fleet"
    );
    let mut retry = FIRST_RETRY;
    let mut member = 0;
    loop {
        let started = tokio::time::Instant::now();
        let why = follow(&state, &fleet, &node, &mut resume, &mut member).await;
        lock(&state).fleet_connection(false, Some(why.clone()));
        warn!("fleet: {why}; reconnecting in {} ms", retry.as_millis());
        if started.elapsed() > Duration::from_secs(10) {
            retry = FIRST_RETRY;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(LAST_RETRY);
        // The member it talked to failed it: the next one first.
        member += 1;
    }
}

/// One connection's life: join, list, watch until something fails; the
/// error says what.
async fn follow(
    state: &Shared,
    fleet: &Fleet,
    node: &str,
    resume: &mut Option<i64>,
    member: &mut usize,
) -> String {
    let prefix = fleet.prefix.as_str();
    let mut client = match etcd::connect_one(fleet, *member).await {
        Ok((c, answered)) => {
            *member = answered;
            c
        }
        Err(e) => return e,
    };
    let (mut keeper, mut renewals) =
        match etcd::join(&mut client, prefix, node, fleet.node_lease_ns).await {
            Ok(k) => k,
            Err(e) => return e,
        };
    let (stored, listed_at) = match etcd::list(&mut client, prefix).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let standing = good_records(state, stored);
    lock(state).fleet_listed(&standing, listed_at);
    // Changes the node missed while it was away (since the last revision
    // it applied), then everything new.
    let from = match *resume {
        Some(applied) if applied < listed_at => applied + 1,
        _ => listed_at + 1,
    };
    let mut watch = match etcd::watch(&mut client, prefix, from).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    // The answer to a progress request comes after every event before it:
    // it says the history up to its revision is delivered.
    if let Err(e) = watch.request_progress().await {
        return etcd::describe("watch progress", &e);
    }
    lock(state).fleet_connection(true, None);
    info!(
        member = %fleet.endpoints[*member],
        listed_at,
        from,
        standing = standing.len(),
        "fleet connected"
    );
    let mut applied = resume.unwrap_or(0).max(from - 1);
    // What the state file holds; written at the first answer, so that
    // even a node that never sees a revocation keeps where it started.
    let mut kept = None;
    let mut ping = tokio::time::interval(Duration::from_nanos(fleet.node_lease_ns / 3));
    loop {
        tokio::select! {
            watched = etcd::next(&mut watch, prefix) => match watched {
                Watched::Changes(changes, revision) => {
                    let last = changes.last().map(change_revision);
                    apply(state, changes, listed_at);
                    // Events in order: the last one's revision is applied
                    // with all before it; an empty answer (progress) says
                    // everything up to its header revision is.
                    applied = applied.max(last.unwrap_or(revision));
                    if kept != Some(applied) {
                        *resume = Some(applied);
                        write_state(&fleet.state_file, applied);
                        kept = Some(applied);
                    }
                }
                Watched::Compacted(at) => {
                    // The history from `from` is gone: list again.
                    *resume = None;
                    return format!("the revocation history is compacted up to revision {at}; re-listing");
                }
                Watched::Ended(why) => return why,
            },
            renewal = renewals.message() => match renewal {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(Some(_)) => return "the node lease expired".into(),
                Ok(None) => return "etcd closed the lease keepalive".into(),
                Err(e) => return etcd::describe("lease keepalive", &e),
            },
            _ = ping.tick() => {
                if let Err(e) = keeper.keep_alive().await {
                    return etcd::describe("lease keepalive", &e);
                }
                if let Err(e) = watch.request_progress().await {
                    return etcd::describe("watch progress", &e);
                }
            }
        }
    }
}

fn change_revision(change: &Change) -> i64 {
    match change {
        Change::Put(_, revision) | Change::Deleted(_, revision) => *revision,
    }
}

/// Hands a watch answer's changes to the core, in order. Those at or
/// before the list are history the list already accounts for.
fn apply(state: &Shared, changes: Vec<Change>, listed_at: i64) {
    let mut core = lock(state);
    for change in changes {
        let applying = |revision: i64| {
            if revision <= listed_at {
                Applying::Replayed
            } else {
                Applying::Now
            }
        };
        match change {
            Change::Put(Ok(r), revision) => {
                core.fleet_revoked(&r, revision, applying(revision));
            }
            Change::Deleted(Ok((selector, value)), revision) => {
                core.fleet_lifted(selector, &value, revision, applying(revision));
            }
            Change::Put(Err(bad), _) | Change::Deleted(Err(bad), _) => core.fleet_bad_record(&bad),
        }
    }
}

fn good_records(state: &Shared, stored: Vec<etcd::Stored>) -> Vec<(Revocation, i64)> {
    let mut good = Vec::with_capacity(stored.len());
    let mut core = lock(state);
    for (record, revision) in stored {
        match record {
            Ok(r) => good.push((r, revision)),
            Err(bad) => core.fleet_bad_record(&bad),
        }
    }
    good
}

/// The revision kept in the state file; `None` when there is none (first
/// start) or it does not read (then the node lists, and says so).
fn read_state(path: &Path) -> Option<i64> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!("fleet state {}: {e}; listing from scratch", path.display());
            return None;
        }
    };
    match text
        .trim()
        .strip_prefix("applied_revision ")
        .map(str::parse::<i64>)
    {
        Some(Ok(r)) if r >= 0 => Some(r),
        _ => {
            warn!(
                "fleet state {}: not \"applied_revision N\"; listing from scratch",
                path.display()
            );
            None
        }
    }
}

/// Keeps `revision` in the state file: written beside it and renamed over
/// it, so a crash leaves the old revision or the new, never half.
fn write_state(path: &Path, revision: i64) {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&tmp, format!("applied_revision {revision}\n"))?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        warn!(
            "fleet state {}: {e}; a restart will replay from an older revision",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_reads_back_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("reaper-fleet-state-{}", std::process::id()));
        let path = dir.join("fleet.state");
        assert_eq!(read_state(&path), None);
        write_state(&path, 42);
        assert_eq!(read_state(&path), Some(42));
        std::fs::write(&path, "applied_revision -3\n").unwrap();
        assert_eq!(read_state(&path), None);
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(read_state(&path), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
