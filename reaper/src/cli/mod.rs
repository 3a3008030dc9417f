//! The `reaper` command line: the daemon, the client commands that talk to
//! its control socket, and `unload`.
//!
//! * this file — the clap definitions and the one-shot client commands;
//! * `watch`, `top` — the commands that follow the daemon live;
//! * `service` — what an operator's tooling calls: `check-config`,
//!   `completions`, the man pages; `pam` — sshd's pam_exec hook.
//!
//! Every command talks to the daemon through `crate::client`.

#![forbid(unsafe_code)]

mod fleet;
mod pam;
mod service;
mod top;
mod watch;

pub use pam::pam;
pub use service::{check_config, completions, manpages};
pub use top::top;
pub use watch::watch;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::client::Client;
use crate::config::{Config, DEFAULT_SOCKET};
use crate::error::{Error, Result};
use crate::policy::IdleDirection;
use crate::protocol::{
    DurationArg, ExtendArgs, FlowSpec, GrantArgs, GrantResult, ListArgs, ListResult, NetnsRef,
    RevokeArgs, RevokeResult, SessionView, StatusResult, TouchArgs, WireOp,
};
use crate::timefmt;

#[derive(Parser, Debug)]
#[command(
    name = "reaper",
    version,
    about = "Kernel-enforced deadlines for console connections"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: CliCommand,
}

#[derive(Subcommand, Debug)]
pub enum CliCommand {
    /// Run the daemon in the foreground.
    Daemon {
        /// Config file (TOML); without it, the defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Grant flows a deadline, as part of a session.
    Grant(GrantCmd),
    /// Move a session's deadline later.
    Extend(ExtendCmd),
    /// Report real user activity for a session (resets its idle timer).
    Touch(TouchCmd),
    /// End sessions (or one flow) now; with --fleet, on every node.
    Revoke(RevokeCmd),
    /// Lift a fleet-wide revocation of a user or target (its lock), so
    /// that nodes grant it again.
    Unlock(UnlockCmd),
    /// Show sessions, their flows and their time left.
    List(ListCmd),
    /// Show the daemon's state and kernel counters.
    Status(ClientOpts),
    /// Probe the kernel for the BPF features reaper uses, and say what it
    /// would fall back to (exit status 1 when it cannot run here).
    Features,
    /// Detach the kernel programs and remove all pinned state.
    Unload {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Follow the daemon's events live (grants, extends, revokes, kills,
    /// refusals, reloads) until interrupted.
    Watch(WatchCmd),
    /// A live view: sessions by time left, kills per second, table fill.
    Top(TopCmd),
    /// Load a config file exactly as the daemon would and print the
    /// effective configuration (exit status 1, naming the key, on an error).
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// For pam_exec in sshd's session stack: grants the SSH connection as
    /// the PAM user's session at open_session, revokes it at close_session.
    Pam(PamCmd),
    /// Write the man pages (reaper(8) and one per subcommand) into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

/// Where the packaged daemon reads its config.
pub const DEFAULT_CONFIG: &str = "/etc/reaper/reaper.toml";

#[derive(Args, Debug)]
pub struct WatchCmd {
    /// Only the events of this user's sessions.
    #[arg(long)]
    pub user: Option<String>,
    /// Only the events of this session.
    #[arg(long)]
    pub session: Option<String>,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Args, Debug)]
pub struct PamCmd {
    /// The policy class of SSH sessions (its ttl and idle timeout apply).
    #[arg(long, default_value = "ssh")]
    pub class: String,
    /// The sessions' target (default: this host's name).
    #[arg(long)]
    pub target: Option<String>,
    /// The daemon's control socket.
    #[arg(long, env = "REAPER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Args, Debug)]
pub struct TopCmd {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// The daemon's control socket.
    #[arg(long, env = "REAPER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Args, Debug)]
pub struct ClientOpts {
    /// The daemon's control socket.
    #[arg(long, env = "REAPER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the daemon's JSON response instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[group(id = "expiry", required = false, multiple = false)]
pub struct ExpiryOpts {
    /// How long from now, e.g. 300ms, 30s, 10m, 1h30m.
    #[arg(long, group = "expiry")]
    pub ttl: Option<String>,
    /// An RFC 3339 time, e.g. 2026-11-22T10:00:00Z.
    #[arg(long, group = "expiry")]
    pub expires_at: Option<String>,
}

#[derive(Args, Debug)]
#[group(id = "flows_or_expect", required = true, multiple = true, args = ["flows", "expect"])]
pub struct GrantCmd {
    #[arg(long)]
    pub session: String,
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub target: String,
    /// Policy class from the config (default: `default`).
    #[arg(long)]
    pub class: Option<String>,
    #[command(flatten)]
    pub expiry: ExpiryOpts,
    /// Kill the session after this long without activity, e.g. 15m.
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// What counts as activity: input (what the user sends) or any.
    #[arg(long, value_parser = ["input", "any"])]
    pub idle_direction: Option<String>,
    /// An established flow as LOCAL,REMOTE (e.g. 127.0.0.1:5900,127.0.0.1:40312); repeatable.
    #[arg(long = "flow", value_parser = parse_flow)]
    pub flows: Vec<(String, String)>,
    /// A connection to come, as LOCAL,REMOTE; a port of 0 matches any
    /// (e.g. 10.0.0.9:5900,10.0.0.5:0); repeatable.
    #[arg(long, value_parser = parse_flow)]
    pub expect: Vec<(String, String)>,
    /// The network namespace of the --flow/--expect addresses: a name under
    /// /run/netns, a path, or a pid (default: the daemon's).
    #[arg(long, value_parser = parse_netns)]
    pub netns: Option<NetnsRef>,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Args, Debug)]
pub struct ExtendCmd {
    #[arg(long)]
    pub session: String,
    #[command(flatten)]
    pub expiry: ExpiryOpts,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Args, Debug)]
pub struct TouchCmd {
    #[arg(long)]
    pub session: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Args, Debug)]
#[group(id = "selector", required = true, multiple = false)]
pub struct RevokeCmd {
    #[arg(long, group = "selector")]
    pub session: Option<String>,
    #[arg(long, group = "selector")]
    pub class: Option<String>,
    #[arg(long, group = "selector")]
    pub user: Option<String>,
    #[arg(long, group = "selector")]
    pub target: Option<String>,
    /// One flow as LOCAL,REMOTE.
    #[arg(long, group = "selector", value_parser = parse_flow)]
    pub flow: Option<(String, String)>,
    /// The network namespace of --flow (name, path or pid).
    #[arg(long, requires = "flow", value_parser = parse_netns)]
    pub netns: Option<NetnsRef>,
    /// Revoke on every node of the fleet: written to etcd (the config's
    /// [fleet]), where each node applies it; a user or target stays
    /// locked out until `reaper unlock` or max_ttl.
    #[arg(long, conflicts_with = "flow")]
    pub fleet: bool,
    /// The config whose [fleet] (and max_ttl) --fleet uses.
    #[arg(long, requires = "fleet", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("lock").required(true).multiple(false)))]
pub struct UnlockCmd {
    #[arg(long, group = "lock")]
    pub session: Option<String>,
    #[arg(long, group = "lock")]
    pub class: Option<String>,
    #[arg(long, group = "lock")]
    pub user: Option<String>,
    #[arg(long, group = "lock")]
    pub target: Option<String>,
    /// The config whose [fleet] to use.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(Args, Debug)]
pub struct ListCmd {
    #[arg(long)]
    pub session: Option<String>,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub target: Option<String>,
    /// List the fleet's sessions from etcd (the config's [fleet]): those
    /// whose flows span nodes and those holding a fleet-wide place, each
    /// with the node that granted it.
    #[arg(long)]
    pub fleet: bool,
    /// The config whose [fleet] --fleet uses.
    #[arg(long, requires = "fleet", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    #[command(flatten)]
    pub client: ClientOpts,
}

fn parse_flow(text: &str) -> std::result::Result<(String, String), String> {
    let (local, remote) = text.split_once(',').ok_or_else(|| {
        format!("{text:?} is not LOCAL,REMOTE (e.g. 127.0.0.1:5900,127.0.0.1:40312)")
    })?;
    for part in [local, remote] {
        part.parse::<std::net::SocketAddr>()
            .map_err(|_| format!("{part:?} is not an address like 127.0.0.1:5900 or [::1]:5900"))?;
    }
    Ok((local.to_owned(), remote.to_owned()))
}

fn duration_arg(ttl: Option<String>) -> Option<DurationArg> {
    ttl.map(DurationArg::Text)
}

fn parse_netns(text: &str) -> std::result::Result<NetnsRef, String> {
    Ok(match text.parse::<u32>() {
        Ok(pid) => NetnsRef::Pid(pid),
        Err(_) => NetnsRef::Text(text.to_owned()),
    })
}

fn flow_spec((local, remote): (String, String), netns: &Option<NetnsRef>) -> FlowSpec {
    FlowSpec {
        local: Some(local),
        remote: Some(remote),
        fd: None,
        netns: netns.clone(),
    }
}

/// Runs a client command; returns the process exit code.
pub fn run_client(command: CliCommand) -> Result<i32> {
    let (client, op) = match command {
        CliCommand::Grant(g) => (
            g.client,
            WireOp::Grant(GrantArgs {
                session: g.session,
                user: g.user,
                target: g.target,
                class: g.class,
                ttl: duration_arg(g.expiry.ttl),
                expires_at: g.expiry.expires_at,
                idle_timeout: duration_arg(g.idle_timeout),
                idle_direction: g.idle_direction.map(|d| {
                    if d == "any" {
                        IdleDirection::Any
                    } else {
                        IdleDirection::Input
                    }
                }),
                flows: g
                    .flows
                    .into_iter()
                    .map(|f| flow_spec(f, &g.netns))
                    .collect(),
                expect: g
                    .expect
                    .into_iter()
                    .map(|f| flow_spec(f, &g.netns))
                    .collect(),
            }),
        ),
        CliCommand::Extend(e) => (
            e.client,
            WireOp::Extend(ExtendArgs {
                session: e.session,
                ttl: duration_arg(e.expiry.ttl),
                expires_at: e.expiry.expires_at,
            }),
        ),
        CliCommand::Touch(t) => (t.client, WireOp::Touch(TouchArgs { session: t.session })),
        CliCommand::Revoke(r) if r.fleet => {
            let (selector, value) = fleet::selector_of(r.session, r.class, r.user, r.target)
                .expect("clap requires one selector, and --fleet excludes --flow");
            return fleet::revoke(&r.config, selector, &value);
        }
        CliCommand::List(l) if l.fleet => {
            return fleet::list(
                &l.config,
                l.session.as_deref(),
                l.user.as_deref(),
                l.target.as_deref(),
                l.client.json,
            );
        }
        CliCommand::Unlock(u) => {
            let (selector, value) = fleet::selector_of(u.session, u.class, u.user, u.target)
                .expect("clap requires one selector");
            return fleet::unlock(&u.config, selector, &value);
        }
        CliCommand::Revoke(r) => (
            r.client,
            WireOp::Revoke(RevokeArgs {
                session: r.session,
                class: r.class,
                user: r.user,
                target: r.target,
                flow: r.flow.map(|f| flow_spec(f, &r.netns)),
            }),
        ),
        CliCommand::List(l) => (
            l.client,
            WireOp::List(ListArgs {
                session: l.session,
                user: l.user,
                target: l.target,
            }),
        ),
        CliCommand::Status(c) => (c, WireOp::Status),
        other => unreachable!("not a one-shot client command: {other:?}"),
    };
    let response = Client::new(&client.socket, None).call(&op)?;
    if client.json {
        println!(
            "{}",
            serde_json::to_string(&response).expect("responses serialize")
        );
        return Ok(if response.ok { 0 } else { 1 });
    }
    if let Some(err) = response.error {
        eprintln!("reaper: {}: {}", err.code, err.message);
        return Ok(1);
    }
    let result = response.result.unwrap_or_default();
    let parse =
        |e: serde_json::Error| Error::Setup(format!("unexpected result from the daemon: {e}"));
    match op {
        WireOp::Grant(_) | WireOp::Extend(_) | WireOp::Touch(_) => {
            let r: GrantResult = serde_json::from_value(result).map_err(parse)?;
            print_sessions(&[r.session]);
        }
        WireOp::Revoke(_) => {
            let r: RevokeResult = serde_json::from_value(result).map_err(parse)?;
            println!(
                "ended {} session(s), killed {} flow(s)",
                r.sessions.len(),
                r.kills.len()
            );
            for k in r.kills {
                println!(
                    "  {} <-> {}  {}  {} ({})",
                    k.local, k.remote, k.session, k.result, k.path
                );
            }
        }
        WireOp::List(_) => {
            let r: ListResult = serde_json::from_value(result).map_err(parse)?;
            if r.sessions.is_empty() {
                println!("no sessions");
            } else {
                print_sessions(&r.sessions);
            }
        }
        WireOp::Watch(_) => unreachable!("`reaper watch` streams; it is not a one-shot call"),
        WireOp::Status => {
            let s: StatusResult = serde_json::from_value(result).map_err(parse)?;
            println!(
                "reaper {} (protocol v{}), pid {}, up {}",
                s.version,
                s.protocol,
                s.pid,
                timefmt::format_duration(s.uptime_ms * timefmt::NS_PER_MS)
            );
            println!("cgroup     {}", s.cgroup);
            println!("kill path  {} (local flows)", s.kill_path);
            println!("pins       {}", s.pin_path);
            println!("sessions   {} of {}", s.sessions, s.max_sessions);
            println!(
                "flows      {} tracked ({} granted) of {}",
                s.tracked_flows, s.granted_flows, s.max_flows
            );
            let watch: Vec<String> = s
                .watch
                .iter()
                .map(|w| format!("{}-{} ({:?})", w.first, w.last, w.side).to_lowercase())
                .collect();
            println!("watching   {}", watch.join(", "));
            if s.namespaces > 0 {
                println!(
                    "netns      reaching {} other network namespace(s)",
                    s.namespaces
                );
            }
            let fence: Vec<String> = s
                .fence
                .iter()
                .map(|w| format!("{}-{} ({:?})", w.first, w.last, w.side).to_lowercase())
                .collect();
            if !fence.is_empty() {
                println!("fenced     {}", fence.join(", "));
            }
            if !s.classes.is_empty() {
                println!("classes    {}", s.classes.join(", "));
            }
            println!("config     loaded {} time(s)", s.config_loads);
            if let Some(e) = s.last_reload_error {
                println!("           last reload refused: {e}");
            }
            if let Some(f) = s.fleet {
                let state = if f.connected {
                    "connected"
                } else {
                    "NOT connected"
                };
                let lag = f
                    .last_lag_ms
                    .map(|l| format!(", last lag {l:.1} ms"))
                    .unwrap_or_default();
                println!(
                    "fleet      node {}, {state} for {}, applied revision {}{lag}",
                    f.node,
                    timefmt::format_duration(f.state_for_ms * timefmt::NS_PER_MS),
                    f.applied_revision
                );
                if f.cut_off {
                    println!(
                        "           CUT OFF: no lease renewal for {} (fail-closed classes end and are refused)",
                        timefmt::format_duration(f.renewed_ms_ago * timefmt::NS_PER_MS)
                    );
                }
                if !f.nodes.is_empty() {
                    println!("           other nodes: {}", f.nodes.join(", "));
                }
                println!(
                    "           sessions: {} published for other nodes, {} mirrored from them{}",
                    f.published,
                    f.mirrors,
                    if f.mirrors_refused > 0 {
                        format!(", {} refused", f.mirrors_refused)
                    } else {
                        String::new()
                    }
                );
                if !f.locks.is_empty() {
                    println!("           locks: {}", f.locks.join(", "));
                }
                if f.bad_records > 0 {
                    println!("           {} bad record(s) refused", f.bad_records);
                }
                if let Some(e) = f.last_error {
                    println!("           last error: {e}");
                }
            }
            for (name, value) in s.counters {
                println!("kernel     {name} = {value}");
            }
        }
    }
    Ok(0)
}

/// The columns of a session table (`list`, `grant`, `top`).
const SESSION_HEADERS: [&str; 6] = ["SESSION", "USER", "TARGET", "CLASS", "TIME LEFT", "IDLE"];

/// A session table's cells, in [`SESSION_HEADERS`] order.
fn session_rows(sessions: &[SessionView]) -> Vec<Vec<String>> {
    sessions
        .iter()
        .map(|s| {
            let left = if s.time_left_ms >= 0 {
                timefmt::format_duration(s.time_left_ms as u64 * timefmt::NS_PER_MS)
            } else {
                "overdue".into()
            };
            let idle = match s.idle_timeout_ms {
                Some(ms) => format!(
                    "{} ({})",
                    timefmt::format_duration(ms * timefmt::NS_PER_MS),
                    if s.idle_direction == IdleDirection::Any {
                        "any"
                    } else {
                        "input"
                    }
                ),
                None => "-".into(),
            };
            vec![
                s.session.clone(),
                s.user.clone(),
                s.target.clone(),
                s.class.clone(),
                left,
                idle,
            ]
        })
        .collect()
}

/// Lines of a table whose columns line up on a terminal: widths are
/// display widths (a CJK name takes two columns per character, a combining
/// accent none), and control characters in a name are shown escaped so
/// that no name can move the cursor.
fn table(headers: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    use unicode_width::UnicodeWidthStr;
    let shown = |cell: &str| -> String {
        if cell.chars().any(char::is_control) {
            cell.escape_debug().to_string()
        } else {
            cell.to_owned()
        }
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| shown(c)).collect())
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].width())
                .chain([headers[i].width()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (cell, w) in cells.zip(&widths) {
            out += cell;
            out.extend(std::iter::repeat_n(' ', w - cell.width() + 2));
        }
        out.trim_end().to_owned()
    };
    let mut lines = vec![line(&mut headers.iter().copied())];
    for r in &rows {
        lines.push(line(&mut r.iter().map(String::as_str)));
    }
    lines
}

fn print_sessions(sessions: &[SessionView]) {
    print!("{}", format_sessions(sessions));
}

/// What `reaper list` prints: the table, each session's deadline and flows
/// under its row.
fn format_sessions(sessions: &[SessionView]) -> String {
    let lines = table(&SESSION_HEADERS, &session_rows(sessions));
    let mut out = format!("{}\n", lines[0]);
    for (row, s) in lines[1..].iter().zip(sessions) {
        out += &format!("{row}\n    deadline {}\n", s.deadline);
        for f in &s.flows {
            out += &format!("    {} <-> {}  ({})\n", f.local, f.remote, f.path);
        }
        if s.expecting > 0 {
            out += &format!("    expecting {} connection(s)\n", s.expecting);
        }
    }
    out
}

/// `reaper unload`.
pub fn unload(config: Option<PathBuf>) -> Result<i32> {
    let config = match config {
        Some(path) => Config::load(&path)?,
        None => Config::default(),
    };
    crate::enforcer::detach_forwarding(&config.forward_interfaces);
    if crate::enforcer::unload(&config.pin_path)? {
        println!(
            "removed {}: programs detached, grants and tracked flows dropped",
            config.pin_path.display()
        );
    } else {
        println!("nothing pinned at {}", config.pin_path.display());
    }
    Ok(0)
}

/// `reaper features`: the daemon's start-up probe, as a table.
pub fn features() -> Result<i32> {
    use crate::enforcer::features::{Features, Need};
    let features = Features::probe();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel {}", release.trim());
    println!(
        "{:<13} {:<8} {:<52} without it",
        "feature", "present", "used for"
    );
    for f in &features.0 {
        let without = match f.need {
            Need::Required { since } => format!("required (Linux {since}+)"),
            Need::Optional { fallback } => fallback.to_string(),
        };
        println!(
            "{:<13} {:<8} {:<52} {without}",
            f.name,
            f.state(),
            f.purpose
        );
        if let Some(e) = &f.probe_error {
            println!("{:<13} probe failed: {e}", "");
        }
    }
    let unknown: Vec<&str> = features
        .0
        .iter()
        .filter(|f| f.present.is_none())
        .map(|f| f.name)
        .collect();
    Ok(match features.blocker() {
        Some(blocker) => {
            println!("{blocker}");
            1
        }
        None if !unknown.is_empty() => {
            println!(
                "could not probe {} (the probes need CAP_BPF and CAP_NET_ADMIN, as the daemon does)",
                unknown.join(", ")
            );
            1
        }
        None => {
            println!("reaper can run on this kernel");
            0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn fleet_revoke_and_unlock_parse_and_refuse_what_they_must() {
        use clap::Parser;
        let parse = |args: &[&str]| super::Cli::try_parse_from([&["reaper"], args].concat());
        for ok in [
            &[
                "revoke", "--fleet", "--user", "alice", "--config", "/c.toml",
            ][..],
            &["revoke", "--fleet", "--class", "vnc"],
            &["revoke", "--user", "alice"],
            &["unlock", "--target", "vm-1", "--config", "/c.toml"],
        ] {
            assert!(parse(ok).is_ok(), "{ok:?}: {:?}", parse(ok).err());
        }
        for bad in [
            &["revoke", "--fleet", "--flow", "127.0.0.1:1,127.0.0.1:2"][..],
            &["revoke", "--fleet", "--user", "a", "--target", "b"],
            &["revoke", "--user", "a", "--config", "/c.toml"],
            &["unlock", "--config", "/c.toml"],
            &["unlock", "--user", "a", "--class", "b"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn columns_align_by_display_width() {
        let rows = vec![
            vec!["s1".to_owned(), "amélie".to_owned(), "x".to_owned()],
            vec!["s2".to_owned(), "山田".to_owned(), "y".to_owned()],
            vec!["s3".to_owned(), "bob".to_owned(), "z".to_owned()],
        ];
        let lines = table(&["SESSION", "USER", "T"], &rows);
        // The third column starts at the same terminal column everywhere.
        use unicode_width::UnicodeWidthStr;
        let starts: Vec<usize> = lines
            .iter()
            .map(|l| l[..l.rfind(' ').unwrap() + 1].width())
            .collect();
        assert!(starts.iter().all(|s| *s == starts[0]), "{lines:#?}");
    }

    /// The README shows `reaper list`: it must be what `list` prints.
    #[test]
    fn the_readme_sample_is_what_list_prints() {
        use crate::protocol::{FlowView, SessionView};
        let readme = include_str!("../../../README.md");
        let sample = readme
            .split("$ reaper list\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the README shows `$ reaper list`");
        let session =
            |name: &str, user: &str, left_ms: i64, idle: Option<u64>, port: u16, deadline: &str| {
                SessionView {
                    session: name.into(),
                    user: user.into(),
                    target: "vm-7".into(),
                    class: if idle.is_some() { "vnc" } else { "default" }.into(),
                    deadline: deadline.into(),
                    deadline_boot_ns: 0,
                    time_left_ms: left_ms,
                    granted_at: String::new(),
                    granted_by_uid: 0,
                    idle_timeout_ms: idle,
                    idle_direction: crate::policy::IdleDirection::Input,
                    flows: vec![FlowView {
                        cookie: 1,
                        local: "127.0.0.1:5900".into(),
                        remote: format!("127.0.0.1:{port}"),
                        established: String::new(),
                        path: "destroy".into(),
                    }],
                    expecting: 0,
                }
            };
        let printed = super::format_sessions(&[
            session(
                "tok-81f2",
                "alice",
                598_412,
                None,
                40312,
                "2026-11-22T11:12:31.004112Z",
            ),
            session(
                "tok-9c3e",
                "zoë",
                3_541_000,
                Some(900_000),
                40318,
                "2026-11-22T12:01:34.592112Z",
            ),
        ]);
        assert_eq!(printed, sample);
    }

    #[test]
    fn control_characters_in_names_are_escaped() {
        let rows = vec![vec!["evil\x1b[2J".to_owned()]];
        let lines = table(&["SESSION"], &rows);
        assert!(!lines[1].contains('\x1b'), "{:?}", lines[1]);
    }
}
