//! Fleet-wide limits at the control plane: a grant of a class whose
//! limits count every node's sessions first takes its places in etcd (one
//! create-if-absent transaction each, `fleet::place`), then runs in the
//! core like any grant; the places it did not keep (refused) are freed.
//! The core frees the places of a session when it ends (its outbox).
//!
//! Who may: the caller's grant rights are the core's to check, after the
//! places; a caller who may not grant holds a place for one round trip.
//! A reject-new limit refuses naming the holders and their nodes; an
//! evict-oldest limit takes the oldest holder's place in one transaction
//! and revokes that session fleet-wide (its node ends it).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::core::model::Code;
use super::core::{Caller, HeldPlace, Outcome, Refused};
use super::shared::{lock, Shared};
use crate::fleet::etcd::{self, Taken};
use crate::fleet::place::{self, Ask, Holder, Next};
use crate::fleet::record::{Revocation, Selector};
use crate::protocol::Command;

/// The fleet connection the control plane takes places through: set by
/// the fleet task while it is connected, with the node lease the places
/// live under.
#[derive(Clone, Default)]
pub(super) struct Link {
    connected: Arc<Mutex<Option<(etcd_client::Client, i64)>>>,
    /// This node, the key prefix and the lease of an eviction's
    /// revocation (the longest a session lives).
    pub node: String,
    pub prefix: String,
    pub revocation_lease_ns: u64,
}

impl Link {
    pub fn new(node: &str, prefix: &str, revocation_lease_ns: u64) -> Link {
        Link {
            connected: Arc::default(),
            node: node.to_owned(),
            prefix: prefix.to_owned(),
            revocation_lease_ns,
        }
    }

    pub fn set(&self, connected: Option<(etcd_client::Client, i64)>) {
        *self.connected.lock().unwrap_or_else(|p| p.into_inner()) = connected;
    }

    fn get(&self) -> Option<(etcd_client::Client, i64)> {
        self.connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Runs a grant that needs the places `asks` (`fleet_place_asks`).
pub(super) async fn grant_with_places(
    state: &Shared,
    link: &Link,
    command: Command,
    caller: Caller,
    fds: &[OwnedFd],
    asks: Vec<Ask>,
) -> Result<Outcome, Refused> {
    let Command::Grant(g) = &command else {
        return lock(state).handle(command, caller, fds);
    };
    let session = g.session.clone();
    if lock(state).fleet_cut_off() {
        // What etcd says of the places cannot be trusted to be current.
        return Err(Refused::new(
            Code::Partitioned,
            "grant: this class's limits are fleet-wide and this node is cut off from the fleet (no lease renewal within fleet.grace); grant again once it is back",
        ));
    }
    let held = take(link, &session, asks, caller.uid).await?;
    lock(state).fleet_places_taken(&session, held);
    let outcome = {
        let mut core = lock(state);
        let outcome = core.handle(command, caller, fds);
        // Made now, not after the release's round trip to etcd.
        core.settle_requests();
        outcome
    };
    let unused = lock(state).fleet_places_unused(&session);
    if !unused.is_empty() {
        release(link, unused).await;
    }
    outcome
}

/// Takes one place per ask for `session`, or none.
async fn take(
    link: &Link,
    session: &str,
    asks: Vec<Ask>,
    uid: u32,
) -> Result<Vec<HeldPlace>, Refused> {
    let Some((mut client, lease)) = link.get() else {
        return Err(Refused::new(
            Code::Partitioned,
            "grant: this class's limits are fleet-wide and this node is not connected to the fleet now; grant again once it is",
        ));
    };
    let now = crate::clock::unix_ns() as i64;
    let value = Holder::new(session, &link.node, now).encode();
    let mut held = Vec::new();
    let mut evicted: Vec<Holder> = Vec::new();
    for ask in asks {
        let mut slot = 0;
        // Each failed attempt learns the places as they are; a race lost
        // to another node costs one more round trip.
        let mut attempts = ask.max + 2;
        let outcome = loop {
            attempts -= 1;
            let key = ask.slot_key(slot);
            match etcd::take_place(&mut client, key.clone(), &ask.under, value.clone(), lease).await
            {
                Ok(Taken::Won(revision)) => {
                    break Ok(HeldPlace {
                        key,
                        revision,
                        value: value.clone(),
                    })
                }
                Ok(Taken::Held(kvs)) => match place::next(&ask, &place::occupied(&ask, &kvs)) {
                    Next::Take(free) => slot = free,
                    Next::Evict(oldest) => {
                        let key = ask.slot_key(oldest.slot);
                        match etcd::replace_place(
                            &mut client,
                            key.clone(),
                            oldest.mod_revision,
                            value.clone(),
                            lease,
                        )
                        .await
                        {
                            Ok(Some(revision)) => {
                                evicted.push(oldest.holder);
                                break Ok(HeldPlace {
                                    key,
                                    revision,
                                    value: value.clone(),
                                });
                            }
                            Ok(None) => {}
                            Err(e) => {
                                break Err(Refused::new(Code::Partitioned, format!("grant: {e}")))
                            }
                        }
                    }
                    Next::Full(why) => {
                        break Err(Refused::new(
                            Code::LimitReached,
                            format!("grant refused: {why}"),
                        ))
                    }
                },
                Err(e) => break Err(Refused::new(Code::Partitioned, format!("grant: {e}"))),
            }
            if attempts == 0 {
                break Err(Refused::new(
                    Code::LimitReached,
                    format!(
                        "grant refused: {} changed hands too often to take a place; try again",
                        ask.what
                    ),
                ));
            }
        };
        match outcome {
            Ok(place) => held.push(place),
            Err(refusal) => {
                release(link, held).await;
                return Err(refusal);
            }
        }
    }
    for victim in evicted {
        // The place is ours already; the victim's node ends it.
        let revocation = Revocation::new(Selector::Session, &victim.session, &link.node, uid, now);
        info!(evicted = %victim.session, on_node = %victim.node, for_session = session,
              "fleet-wide evict-oldest: revoking the oldest holder");
        if let Err(e) = etcd::publish(
            &mut client,
            &link.prefix,
            &revocation,
            link.revocation_lease_ns,
        )
        .await
        {
            warn!(evicted = %victim.session, "fleet-wide eviction: {e}; its place is taken, but its node was not told");
        }
    }
    Ok(held)
}

/// Frees places (a refused grant's); a failure leaves them to the node
/// lease.
async fn release(link: &Link, places: Vec<HeldPlace>) {
    let Some((mut client, _)) = link.get() else {
        return;
    };
    for p in places {
        if let Err(e) = etcd::release_place(&mut client, p.key.clone(), p.revision).await {
            warn!(place = %p.key, "freeing a place: {e}; it frees with the node lease");
        }
    }
}
