//! The etcd side of the fleet: connecting (TLS, keepalive, leader
//! required), publishing and lifting revocations, listing and watching
//! them. The one place that calls `etcd_client`; what it hands back is
//! `record` values and revisions.
//!
//! Why the connection options: a watch on a member cut off from its
//! cluster stays open and silent unless the member is asked to have a
//! leader (`require_leader`), and a dead TCP path is only noticed by
//! HTTP/2 pings (`keep_alive`); without both, a partition looks like a
//! quiet fleet.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, WatchOptions, WatchStream,
};

use super::record::{self, Revocation, Selector};
use crate::config::Fleet;

/// How often the connection is pinged, and how long a ping may go
/// unanswered before the connection counts as dead.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A single request (not a watch) that takes longer has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to one member of `fleet` that answers, trying them in turn
/// from the `first`-th (modulo their number): a dead member is passed
/// over, and a node that lost its member starts from the next one.
/// Returns the client and the index of the member it talks to.
pub async fn connect_one(fleet: &Fleet, first: usize) -> Result<(Client, usize), String> {
    let n = fleet.endpoints.len();
    let mut errors = Vec::new();
    for k in 0..n {
        let i = (first + k) % n;
        let endpoint = &fleet.endpoints[i];
        let attempt = async {
            let mut client = connect_to(fleet, std::slice::from_ref(endpoint)).await?;
            // Any request proves the member answers (and, with
            // require_leader, that it has a quorum).
            client
                .get("\0", None)
                .await
                .map_err(|e| describe("reach", &e))?;
            Ok::<_, String>(client)
        };
        match attempt.await {
            Ok(client) => return Ok((client, i)),
            Err(e) => errors.push(format!("{endpoint}: {e}")),
        }
    }
    Err(format!("no etcd member answers: {}", errors.join("; ")))
}

/// Connects to the members of `fleet` (any of them), reading its TLS
/// files.
pub async fn connect(fleet: &Fleet) -> Result<Client, String> {
    connect_one(fleet, 0).await.map(|(client, _)| client)
}

async fn connect_to(fleet: &Fleet, endpoints: &[String]) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_keep_alive(PING_EVERY, PING_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT);
    if fleet.endpoints.iter().any(|e| e.starts_with("https://")) {
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("fleet.{key} {}: {e}", path.display()))
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &fleet.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read("ca_file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&fleet.cert_file, &fleet.key_file) {
            tls = tls.identity(Identity::from_pem(
                read("cert_file", cert)?,
                read("key_file", key)?,
            ));
        }
        options = options.with_tls(tls);
    }
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| describe("connect", &e))
}

/// An etcd error as operators read it: what was being done, and the
/// cause as deep as it goes (a TLS refusal is several layers down).
pub fn describe(doing: &str, e: &etcd_client::Error) -> String {
    let mut text = format!("etcd {doing}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// Writes `revocation` under a lease of `lease_ns` (the longest a session
/// may live: past it, nothing the revocation could match is left).
/// Returns the revision it was written at.
pub async fn publish(
    client: &mut Client,
    prefix: &str,
    revocation: &Revocation,
    lease_ns: u64,
) -> Result<i64, String> {
    let lease = revocation_lease(client, lease_ns).await?;
    put_revocation(client, prefix, revocation, lease).await
}

/// A lease of `lease_ns` (at least 5 s) for a revocation.
pub async fn revocation_lease(client: &mut Client, lease_ns: u64) -> Result<i64, String> {
    let ttl = i64::try_from(lease_ns.div_ceil(1_000_000_000).max(5)).unwrap_or(i64::MAX);
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| describe("lease grant", &e))?;
    Ok(lease.id())
}

/// Writes `revocation` under `lease`; returns the revision.
pub async fn put_revocation(
    client: &mut Client,
    prefix: &str,
    revocation: &Revocation,
    lease: i64,
) -> Result<i64, String> {
    let key = record::revocation_key(prefix, revocation.selector, &revocation.value);
    let put = client
        .put(
            key,
            revocation.encode(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| describe("put", &e))?;
    Ok(put.header().map_or(0, |h| h.revision()))
}

/// Deletes the revocation of `value` by `selector`; says whether there
/// was one.
pub async fn lift(
    client: &mut Client,
    prefix: &str,
    selector: Selector,
    value: &str,
) -> Result<bool, String> {
    let key = record::revocation_key(prefix, selector, value);
    let deleted = client
        .delete(key, None::<DeleteOptions>)
        .await
        .map_err(|e| describe("delete", &e))?;
    Ok(deleted.deleted() > 0)
}

/// One stored revocation: the record (or why it was refused) and the
/// revision it was last written at.
pub type Stored = (Result<Revocation, record::BadRecord>, i64);

/// Every standing revocation, oldest write first, and the revision the
/// list was read at.
pub async fn list(client: &mut Client, prefix: &str) -> Result<(Vec<Stored>, i64), String> {
    let response = client
        .get(
            record::revocations_prefix(prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| describe("list revocations", &e))?;
    let at = response.header().map_or(0, |h| h.revision());
    let mut stored: Vec<Stored> = response
        .kvs()
        .iter()
        .map(|kv| {
            (
                Revocation::decode(prefix, kv.key(), kv.value()),
                kv.mod_revision(),
            )
        })
        .collect();
    stored.sort_by_key(|(_, revision)| *revision);
    Ok((stored, at))
}

/// What a watch delivered, in revision order.
#[derive(Debug)]
pub enum Change {
    /// A revocation was written (or rewritten).
    Put(Result<Revocation, record::BadRecord>, i64),
    /// A revocation was deleted (lifted, or its lease ran out).
    Deleted(Result<(Selector, String), record::BadRecord>, i64),
}

/// The watch of every revocation from `from` (inclusive).
pub async fn watch(client: &mut Client, prefix: &str, from: i64) -> Result<WatchStream, String> {
    client
        .watch(
            record::revocations_prefix(prefix),
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .map_err(|e| describe("watch revocations", &e))
}

/// What the next watch response says.
pub enum Watched {
    /// Changes in revision order, and the revision up to which the
    /// history is delivered (0: the answer does not say).
    Changes(Vec<Change>, i64),
    /// The history from the watch's start is compacted away: re-list.
    Compacted(i64),
    /// The watch ended (the member went away, or cancelled it).
    Ended(String),
}

/// Waits for the next watch response.
pub async fn next(stream: &mut WatchStream, prefix: &str) -> Watched {
    let response = match stream.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return Watched::Ended("etcd closed the watch".into()),
        Err(e) => return Watched::Ended(describe("watch", &e)),
    };
    if response.compact_revision() > 0 {
        return Watched::Compacted(response.compact_revision());
    }
    if response.canceled() {
        return Watched::Ended(format!(
            "etcd cancelled the watch: {}",
            response.cancel_reason()
        ));
    }
    if response.created() && response.events().is_empty() {
        // The watch's creation: its header revision is the store's now, not
        // how far the history it replays has been delivered (that comes
        // after), so it says nothing of what is applied.
        return Watched::Changes(Vec::new(), 0);
    }
    let revision = response.header().map_or(0, |h| h.revision());
    let changes = response
        .events()
        .iter()
        .filter_map(|event| {
            let kv = event.kv()?;
            Some(match event.event_type() {
                EventType::Put => Change::Put(
                    Revocation::decode(prefix, kv.key(), kv.value()),
                    kv.mod_revision(),
                ),
                EventType::Delete => Change::Deleted(
                    record::parse_revocation_key(prefix, kv.key()).map_err(|why| {
                        record::BadRecord {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                            why,
                        }
                    }),
                    kv.mod_revision(),
                ),
            })
        })
        .collect();
    Watched::Changes(changes, revision)
}

/// Puts this node's liveness record under a fresh lease of `ttl_ns`;
/// returns the lease and its keeper.
pub async fn join(
    client: &mut Client,
    prefix: &str,
    node: &str,
    ttl_ns: u64,
) -> Result<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream), String> {
    let ttl = i64::try_from(ttl_ns.div_ceil(1_000_000_000)).unwrap_or(i64::MAX);
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| describe("lease grant", &e))?;
    let value = format!(
        "{{\"node\":{},\"version\":{:?}}}",
        serde_json::Value::from(node),
        env!("CARGO_PKG_VERSION")
    );
    client
        .put(
            record::node_key(prefix, node),
            value,
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await
        .map_err(|e| describe("put the node record", &e))?;
    client
        .lease_keep_alive(lease.id())
        .await
        .map_err(|e| describe("lease keepalive", &e))
}
