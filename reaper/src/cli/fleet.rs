//! `reaper revoke --fleet` and `reaper unlock`: written to etcd directly,
//! from any host with the config's `[fleet]` and its client certificate;
//! no daemon is asked. Every node's daemon applies what is written.
//! `reaper list --fleet` reads the fleet's sessions from etcd the same way.
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

/// One fleet session as `list --fleet` shows it.
#[derive(Debug, Default, serde::Serialize)]
struct FleetRow {
    session: String,
    node: String,
    user: String,
    target: String,
    class: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_unix_ns: Option<i64>,
    /// Nodes its flows land on.
    lands_on: Vec<String>,
    /// Fleet-wide limits it holds a place in: `target "vm-1" (class one)`.
    places: Vec<String>,
}

/// Prints the fleet's sessions: those whose flows span nodes and those
/// holding a fleet-wide place, each with the node that granted it.
pub fn list(
    config_path: &Path,
    session: Option<&str>,
    user: Option<&str>,
    target: Option<&str>,
    json: bool,
) -> Result<i32> {
    use crate::fleet::{place, session as fleet_session};
    let (_, fleet) = fleet_of(config_path)?;
    let prefix = fleet.prefix.clone();
    let (sessions, places, nodes) = runtime()?
        .block_on(async {
            let mut client = etcd::connect(&fleet).await?;
            let sessions =
                etcd::list_under(&mut client, &fleet_session::sessions_prefix(&prefix)).await?;
            let places = etcd::list_under(&mut client, &place::places_prefix(&prefix)).await?;
            let nodes =
                etcd::list_under(&mut client, &fleet_session::nodes_prefix(&prefix)).await?;
            Ok::<_, String>((sessions.0, places.0, nodes.0))
        })
        .map_err(Error::Setup)?;
    let mut rows: std::collections::BTreeMap<(String, String), FleetRow> = Default::default();
    for (key, value, _) in &sessions {
        let Some(landing) = fleet_session::FleetSession::landing_of(&prefix, key) else {
            continue;
        };
        let Ok(r) = fleet_session::FleetSession::decode(&prefix, &landing, key, value) else {
            continue;
        };
        let row = rows
            .entry((r.origin.clone(), r.session.clone()))
            .or_default();
        *row = FleetRow {
            session: r.session,
            node: r.origin,
            user: r.user,
            target: r.target,
            class: r.class,
            expires_unix_ns: Some(r.expires_unix_ns),
            lands_on: std::mem::take(&mut row.lands_on),
            places: std::mem::take(&mut row.places),
        };
        row.lands_on.push(landing);
    }
    for (key, value, _) in &places {
        let (Some((class, kind, what)), Ok(holder)) = (
            place::parse_key(&prefix, key),
            place::Holder::decode(key, value),
        ) else {
            continue;
        };
        let row = rows
            .entry((holder.node.clone(), holder.session.clone()))
            .or_insert_with(|| FleetRow {
                session: holder.session.clone(),
                node: holder.node.clone(),
                class: class.clone(),
                ..FleetRow::default()
            });
        if kind == "target" && row.target.is_empty() {
            row.target = what.clone();
        }
        if kind == "user" && row.user.is_empty() {
            row.user = what.clone();
        }
        row.places.push(format!("{kind} {what:?} (class {class})"));
    }
    let shown: Vec<FleetRow> = rows
        .into_values()
        .filter(|r| session.is_none_or(|s| r.session == s))
        .filter(|r| user.is_none_or(|u| r.user == u))
        .filter(|r| target.is_none_or(|t| r.target == t))
        .collect();
    if json {
        println!("{}", serde_json::to_string(&shown).expect("rows serialize"));
        return Ok(0);
    }
    let node_names: Vec<String> = nodes
        .iter()
        .filter_map(|(k, _, _)| fleet_session::NodeRecord::parse_key(&prefix, k).ok())
        .collect();
    println!(
        "nodes in the fleet: {}",
        if node_names.is_empty() {
            "none".into()
        } else {
            node_names.join(", ")
        }
    );
    if shown.is_empty() {
        println!("no fleet sessions (sessions whose flows stay on one node are listed by `reaper list` there)");
        return Ok(0);
    }
    let now = crate::clock::unix_ns();
    let cells: Vec<Vec<String>> = shown
        .iter()
        .map(|r| {
            let left = r.expires_unix_ns.map_or("-".into(), |e| {
                crate::timefmt::format_duration((i128::from(e) - now).max(0) as u64)
            });
            let mut fleet = Vec::new();
            if !r.lands_on.is_empty() {
                fleet.push(format!("lands on {}", r.lands_on.join(", ")));
            }
            if !r.places.is_empty() {
                fleet.push(format!("holds {}", r.places.join(", ")));
            }
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            vec![
                r.session.clone(),
                r.node.clone(),
                or_dash(&r.user),
                or_dash(&r.target),
                or_dash(&r.class),
                left,
                fleet.join("; "),
            ]
        })
        .collect();
    for line in super::table(
        &[
            "SESSION",
            "NODE",
            "USER",
            "TARGET",
            "CLASS",
            "TIME LEFT",
            "FLEET",
        ],
        &cells,
    ) {
        println!("{line}");
    }
    Ok(0)
}
