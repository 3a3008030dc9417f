//! The fleet task: keeps this node in the fleet, every revocation written
//! anywhere applied here, the sessions granted here that land on other
//! nodes published for them, and the ones that land here mirrored. It lists the standing revocations, then
//! watches from the revision after (or from where it left off before a
//! restart), hands each change to the core in revision order, and keeps
//! the last applied revision in `fleet.state_file`. When etcd goes away it
//! reconnects and catches up from that revision; when the history it
//! needs is compacted away it lists again.
//!
//! It runs at the thread's ordinary priority: what it does is decided by
//! whoever can write to etcd, like a caller's requests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use tracing::{info, warn};

use super::core::HeldPlace;
use super::places::Link;
use super::shared::{lock, Shared};
use crate::config::Fleet;
use crate::daemon::core::fleet::Applying;
use crate::fleet::etcd::{self, Change, Watched};
use crate::fleet::place;
use crate::fleet::record::{BadRecord, Revocation};
use crate::fleet::session::{self, FleetSession, NodeRecord};

const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Short enough that a healed partition is caught up within a second.
const LAST_RETRY: Duration = Duration::from_millis(500);

/// Follows the fleet for good (a daemon task).
pub(super) async fn run(state: Shared, fleet: Fleet, node: String, link: Link) {
    let mut resume = read_state(&fleet.state_file);
    let wake = Arc::new(Notify::new());
    lock(&state).fleet_joined(
        &node,
        &fleet.endpoints,
        resume.unwrap_or(0),
        fleet.grace_ns,
        wake.clone(),
    );
    let me = NodeRecord::new(&node, crate::fleet::node_addresses(&fleet.addresses));
    info!(
        node = %node,
        addresses = ?me.addresses,
        endpoints = ?fleet.endpoints,
        resume_from = resume.unwrap_or(0),
        "joining the fleet"
    );
    let mut retry = FIRST_RETRY;
    let mut member = 0;
    loop {
        let started = tokio::time::Instant::now();
        let why = follow(&state, &fleet, &me, &wake, &link, &mut resume, &mut member).await;
        link.set(None);
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
    me: &NodeRecord,
    wake: &Notify,
    link: &Link,
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
    let mut joined = match etcd::join(&mut client, prefix, me, fleet.node_lease_ns).await {
        Ok(j) => j,
        Err(e) => return e,
    };
    lock(state).fleet_renewed();
    link.set(Some((client.clone(), joined.lease)));
    let (stored, listed_at) = match etcd::list(&mut client, prefix).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let standing = good_records(state, stored);
    lock(state).fleet_listed(&standing, listed_at);
    // Where the other nodes are, then what lands here.
    let nodes_prefix = session::nodes_prefix(prefix);
    let (kvs, nodes_at) = match etcd::list_under(&mut client, &nodes_prefix).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let nodes = decoded(state, kvs, |k, v| NodeRecord::decode(prefix, k, v));
    lock(state).fleet_nodes_listed(nodes);
    let landing = session::landing_prefix(prefix, &me.node);
    let (kvs, landing_at) = match etcd::list_under(&mut client, &landing).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let mirrors = decoded(state, kvs, |k, v| {
        FleetSession::decode(prefix, &me.node, k, v)
    });
    lock(state).fleet_mirrors_listed(mirrors);
    // The places this node holds (a restarted daemon knows them only from
    // etcd), then, under the new lease, everything it owns written again.
    let (kvs, _) = match etcd::list_under(&mut client, &place::places_prefix(prefix)).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let mine = kvs
        .into_iter()
        .filter_map(|(key, value, revision)| {
            let holder = place::Holder::decode(&key, &value).ok()?;
            (holder.node == me.node).then(|| {
                let place = HeldPlace {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    revision,
                    value: String::from_utf8_lossy(&value).into_owned(),
                };
                (holder.session, place)
            })
        })
        .collect();
    {
        let mut core = lock(state);
        core.fleet_places_listed(mine);
        core.fleet_republish_all();
    }
    // Revocations the node missed while it was away (since the last
    // revision it applied), then everything new.
    let from = match *resume {
        Some(applied) if applied < listed_at => applied + 1,
        _ => listed_at + 1,
    };
    let mut watch = match etcd::watch(&mut client, prefix, from).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    let mut nodes_watch = match etcd::watch_under(&mut client, &nodes_prefix, nodes_at + 1).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    let mut landing_watch = match etcd::watch_under(&mut client, &landing, landing_at + 1).await {
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
    // Renewals often enough that a cut-off is seen within a second of the
    // grace (and well within the lease).
    let every = (fleet.node_lease_ns / 3)
        .min(fleet.grace_ns / 4)
        .clamp(100_000_000, 1_000_000_000);
    let mut ping = tokio::time::interval(Duration::from_nanos(every));
    if let Err(e) = flush(state, &mut client, prefix, joined.lease).await {
        return e;
    }
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
            watched = etcd::next_events(&mut nodes_watch) => match watched {
                Watched::Changes(events, _) => apply_nodes(state, prefix, events),
                // Nodes and sessions are state: a list brings them back.
                Watched::Compacted(at) => return format!("the node records are compacted up to revision {at}; re-listing"),
                Watched::Ended(why) => return why,
            },
            watched = etcd::next_events(&mut landing_watch) => match watched {
                Watched::Changes(events, _) => apply_landing(state, prefix, &me.node, events),
                Watched::Compacted(at) => return format!("the session records are compacted up to revision {at}; re-listing"),
                Watched::Ended(why) => return why,
            },
            _ = wake.notified() => {
                if let Err(e) = flush(state, &mut client, prefix, joined.lease).await {
                    return e;
                }
            }
            renewal = joined.renewals.message() => match renewal {
                Ok(Some(r)) if r.ttl() > 0 => lock(state).fleet_renewed(),
                Ok(Some(_)) => return "the node lease expired".into(),
                Ok(None) => return "etcd closed the lease keepalive".into(),
                Err(e) => return etcd::describe("lease keepalive", &e),
            },
            _ = ping.tick() => {
                if let Err(e) = joined.keeper.keep_alive().await {
                    return etcd::describe("lease keepalive", &e);
                }
                if let Err(e) = watch.request_progress().await {
                    return etcd::describe("watch progress", &e);
                }
            }
        }
    }
}

/// Hands node records written or gone to the core.
fn apply_nodes(state: &Shared, prefix: &str, events: Vec<etcd::Event>) {
    let mut core = lock(state);
    for e in events {
        let read = NodeRecord::parse_key(prefix, &e.key).and_then(|node| {
            let record = e.value.map(|v| NodeRecord::decode(prefix, &e.key, &v));
            record.transpose().map(|record| (node, record))
        });
        match read {
            Ok((node, record)) => core.fleet_node(&node, record),
            Err(bad) => core.fleet_bad_record(&bad),
        }
    }
}

/// Hands the session records landing on `me`, written or gone, to the
/// core.
fn apply_landing(state: &Shared, prefix: &str, me: &str, events: Vec<etcd::Event>) {
    let mut core = lock(state);
    for e in events {
        match (e.value, FleetSession::parse_key(prefix, me, &e.key)) {
            (Some(v), Ok(_)) => match FleetSession::decode(prefix, me, &e.key, &v) {
                Ok(r) => core.fleet_mirror_put(r),
                Err(bad) => core.fleet_bad_record(&bad),
            },
            (None, Ok((origin, session))) => {
                core.fleet_mirror_gone(&origin, &session);
            }
            (_, Err(bad)) => core.fleet_bad_record(&bad),
        }
    }
}

/// Writes what the core's outbox holds: the records of sessions granted
/// here, under the node lease. A write that fails is the connection's
/// failure: the next connection writes everything again.
async fn flush(
    state: &Shared,
    client: &mut etcd_client::Client,
    prefix: &str,
    lease: i64,
) -> Result<(), String> {
    let writes = lock(state).fleet_outbox(prefix);
    for w in writes {
        match w.value {
            Some(value) => etcd::put_leased(client, w.key, value, lease)
                .await
                .map(drop)?,
            None => etcd::delete(client, w.key).await?,
        }
    }
    Ok(())
}

/// The records of a list that read; those that did not are counted.
fn decoded<T>(
    state: &Shared,
    kvs: Vec<etcd::Kv>,
    decode: impl Fn(&[u8], &[u8]) -> Result<T, BadRecord>,
) -> Vec<T> {
    let mut core = lock(state);
    kvs.into_iter()
        .filter_map(|(key, value, _)| match decode(&key, &value) {
            Ok(r) => Some(r),
            Err(bad) => {
                core.fleet_bad_record(&bad);
                None
            }
        })
        .collect()
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
