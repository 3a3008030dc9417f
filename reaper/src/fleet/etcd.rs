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
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
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
    put_leased(client, key, revocation.encode(), lease).await
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

/// One stored key: its key, value and the revision it was last written at.
pub type Kv = (Vec<u8>, Vec<u8>, i64);

/// Every key under `under`, oldest write first, and the revision the list
/// was read at.
pub async fn list_under(client: &mut Client, under: &str) -> Result<(Vec<Kv>, i64), String> {
    let response = client
        .get(under, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| describe(&format!("list {under}"), &e))?;
    let at = response.header().map_or(0, |h| h.revision());
    let mut kvs: Vec<Kv> = response
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()))
        .collect();
    kvs.sort_by_key(|(_, _, revision)| *revision);
    Ok((kvs, at))
}

/// Every standing revocation, oldest write first, and the revision the
/// list was read at.
pub async fn list(client: &mut Client, prefix: &str) -> Result<(Vec<Stored>, i64), String> {
    let (kvs, at) = list_under(client, &record::revocations_prefix(prefix)).await?;
    let stored = kvs
        .into_iter()
        .map(|(key, value, revision)| (Revocation::decode(prefix, &key, &value), revision))
        .collect();
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

/// The watch of every key under `under` from revision `from` (inclusive).
pub async fn watch_under(
    client: &mut Client,
    under: &str,
    from: i64,
) -> Result<WatchStream, String> {
    client
        .watch(
            under,
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .map_err(|e| describe(&format!("watch {under}"), &e))
}

/// The watch of every revocation from `from` (inclusive).
pub async fn watch(client: &mut Client, prefix: &str, from: i64) -> Result<WatchStream, String> {
    watch_under(client, &record::revocations_prefix(prefix), from).await
}

/// What the next watch response says.
pub enum Watched<T> {
    /// Changes in revision order, and the revision up to which the
    /// history is delivered (0: the answer does not say).
    Changes(Vec<T>, i64),
    /// The history from the watch's start is compacted away: re-list.
    Compacted(i64),
    /// The watch ended (the member went away, or cancelled it).
    Ended(String),
}

/// One event of a watch: a key written (`Some` value) or deleted, at a
/// revision.
#[derive(Debug)]
pub struct Event {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub revision: i64,
}

/// Waits for the next watch response, its events as they came.
pub async fn next_events(stream: &mut WatchStream) -> Watched<Event> {
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
    let events = response
        .events()
        .iter()
        .filter_map(|event| {
            let kv = event.kv()?;
            Some(Event {
                key: kv.key().to_vec(),
                value: (event.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                revision: kv.mod_revision(),
            })
        })
        .collect();
    Watched::Changes(events, revision)
}

/// Waits for the next revocation watch response.
pub async fn next(stream: &mut WatchStream, prefix: &str) -> Watched<Change> {
    match next_events(stream).await {
        Watched::Changes(events, revision) => Watched::Changes(
            events
                .into_iter()
                .map(|e| match e.value {
                    Some(value) => {
                        Change::Put(Revocation::decode(prefix, &e.key, &value), e.revision)
                    }
                    None => Change::Deleted(
                        record::parse_revocation_key(prefix, &e.key).map_err(|why| {
                            record::BadRecord {
                                key: String::from_utf8_lossy(&e.key).into_owned(),
                                why,
                            }
                        }),
                        e.revision,
                    ),
                })
                .collect(),
            revision,
        ),
        Watched::Compacted(at) => Watched::Compacted(at),
        Watched::Ended(why) => Watched::Ended(why),
    }
}

/// Writes `value` at `key` under `lease`.
pub async fn put_leased(
    client: &mut Client,
    key: String,
    value: String,
    lease: i64,
) -> Result<i64, String> {
    let put = client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(|e| describe("put", &e))?;
    Ok(put.header().map_or(0, |h| h.revision()))
}

/// Deletes `key` (nothing there is no error).
pub async fn delete(client: &mut Client, key: String) -> Result<(), String> {
    client
        .delete(key, None::<DeleteOptions>)
        .await
        .map_err(|e| describe("delete", &e))?;
    Ok(())
}

/// How taking a place went.
pub enum Taken {
    /// The place is this node's, written at this revision.
    Won(i64),
    /// Someone holds it: every key under the limit, as they are now.
    Held(Vec<Kv>),
}

/// Takes `key` if nobody holds it (one transaction: create-if-absent,
/// else read everything under `under`), under `lease`.
pub async fn take_place(
    client: &mut Client,
    key: String,
    under: &str,
    value: String,
    lease: i64,
) -> Result<Taken, String> {
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(under, Some(GetOptions::new().with_prefix()))]);
    let response = client
        .txn(txn)
        .await
        .map_err(|e| describe("take a place", &e))?;
    let revision = response.header().map_or(0, |h| h.revision());
    if response.succeeded() {
        return Ok(Taken::Won(revision));
    }
    let mut kvs = Vec::new();
    for op in response.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            kvs.extend(
                get.kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision())),
            );
        }
    }
    Ok(Taken::Held(kvs))
}

/// Writes `value` at `key` if it is still as it was at `if_revision` (a
/// place taken over from its holder, or rewritten under a new lease);
/// returns the new revision, or `None` when someone changed it since.
pub async fn replace_place(
    client: &mut Client,
    key: String,
    if_revision: i64,
    value: String,
    lease: i64,
) -> Result<Option<i64>, String> {
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            if_revision,
        )])
        .and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let response = client
        .txn(txn)
        .await
        .map_err(|e| describe("replace a place", &e))?;
    Ok(response
        .succeeded()
        .then(|| response.header().map_or(0, |h| h.revision())))
}

/// Frees `key` if it is still the place written at `if_revision` (not
/// taken over by another session since).
pub async fn release_place(
    client: &mut Client,
    key: String,
    if_revision: i64,
) -> Result<(), String> {
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            if_revision,
        )])
        .and_then([TxnOp::delete(key, None)]);
    client
        .txn(txn)
        .await
        .map_err(|e| describe("release a place", &e))?;
    Ok(())
}

/// This node in the fleet: its lease (what its records live under) and
/// the keeper that renews it.
pub struct Joined {
    pub lease: i64,
    pub keeper: etcd_client::LeaseKeeper,
    pub renewals: etcd_client::LeaseKeepAliveStream,
}

/// Puts this node's record under a fresh lease of `ttl_ns`.
pub async fn join(
    client: &mut Client,
    prefix: &str,
    node: &super::session::NodeRecord,
    ttl_ns: u64,
) -> Result<Joined, String> {
    let ttl = i64::try_from(ttl_ns.div_ceil(1_000_000_000)).unwrap_or(i64::MAX);
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| describe("lease grant", &e))?;
    client
        .put(
            record::node_key(prefix, &node.node),
            node.encode(),
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await
        .map_err(|e| describe("put the node record", &e))?;
    let (keeper, renewals) = client
        .lease_keep_alive(lease.id())
        .await
        .map_err(|e| describe("lease keepalive", &e))?;
    Ok(Joined {
        lease: lease.id(),
        keeper,
        renewals,
    })
}
