//! `reaper revoke --fleet` and `reaper unlock`: written to etcd directly,
//! from any host with the config's `[fleet]` and its client certificate;
//! no daemon is asked. Every node's daemon applies what is written.
//!
//! Who may: whoever can read the client key the config names and is let
//! in by etcd (its client-certificate auth and roles). The node name and
//! uid recorded are this host's and this process's, for the audit trail.

use std::path::Path;

use crate::config::{Config, Fleet};
use crate::error::{Error, Result};
use crate::fleet::record::{Revocation, Selector};
use crate::fleet::{etcd, node_name, record};

/// The selector and value of the one flag given (clap makes it one).
pub fn selector_of(
    session: Option<String>,
    class: Option<String>,
    user: Option<String>,
    target: Option<String>,
) -> Option<(Selector, String)> {
    [
        (Selector::Session, session),
        (Selector::Class, class),
        (Selector::User, user),
        (Selector::Target, target),
    ]
    .into_iter()
    .find_map(|(s, v)| v.map(|v| (s, v)))
}

fn fleet_of(config_path: &Path) -> Result<(Config, Fleet)> {
    let config = Config::load(config_path)?;
    let fleet = config.fleet.clone().ok_or_else(|| {
        Error::Setup(format!(
            "{} has no [fleet]: --fleet needs the etcd endpoints",
            config_path.display()
        ))
    })?;
    Ok((config, fleet))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the etcd client"))
}

/// Writes the revocation; prints its revision.
pub fn revoke(config_path: &Path, selector: Selector, value: &str) -> Result<i32> {
    record::check_value(selector, value).map_err(Error::Setup)?;
    let (config, fleet) = fleet_of(config_path)?;
    let node = node_name(fleet.node.as_deref()).map_err(Error::Setup)?;
    // The uid this process runs as (the owner of its /proc entry).
    let uid = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata("/proc/self").map_err(Error::io("reading /proc/self"))?,
    );
    let revision = runtime()?.block_on(async {
        let mut client = etcd::connect(&fleet).await?;
        // Asked now, once connected: sessions granted until this instant
        // end, and the nodes' lag is measured from it.
        let at = i64::try_from(crate::clock::unix_ns()).unwrap_or(i64::MAX);
        let revocation = Revocation::new(selector, value, &node, uid, at);
        etcd::publish(&mut client, &fleet.prefix, &revocation, config.max_ttl_ns).await
    });
    let revision = revision.map_err(Error::Setup)?;
    let what = if selector.locks() {
        "every node ends its sessions and refuses new grants until `reaper unlock`"
    } else {
        "every node ends its sessions granted before now"
    };
    println!(
        "revoked {} {value:?} fleet-wide at revision {revision}: {what}",
        selector.name()
    );
    Ok(0)
}

/// Deletes the revocation; exit status 1 when there was none.
pub fn unlock(config_path: &Path, selector: Selector, value: &str) -> Result<i32> {
    record::check_value(selector, value).map_err(Error::Setup)?;
    let (_, fleet) = fleet_of(config_path)?;
    let lifted = runtime()?
        .block_on(async {
            let mut client = etcd::connect(&fleet).await?;
            etcd::lift(&mut client, &fleet.prefix, selector, value).await
        })
        .map_err(Error::Setup)?;
    if lifted {
        println!(
            "lifted the fleet-wide revocation of {} {value:?}",
            selector.name()
        );
        Ok(0)
    } else {
        eprintln!(
            "reaper: no fleet-wide revocation of {} {value:?} stands",
            selector.name()
        );
        Ok(1)
    }
}
