//! `reaper pam`: sshd's session stack calls it through pam_exec, at
//! open_session and at close_session. It grants the SSH connection (from
//! `SSH_CONNECTION`, which sshd puts in the PAM environment) as a session
//! of the PAM user with a configured class (an absolute limit, an idle
//! limit), and revokes it when the session closes.
//!
//! ```text
//! # /etc/pam.d/sshd
//! session required pam_exec.so quiet /usr/sbin/reaper pam --class ssh
//! ```
//!
//! With `required`, a grant the daemon refuses fails the session open, and
//! sshd ends the connection: the login fails closed.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use super::PamCmd;
use crate::client::{Client, ClientError};
use crate::error::{Error, Result};
use crate::protocol::{FlowSpec, GrantArgs, RevokeArgs};

/// The two ends of an SSH connection, from `SSH_CONNECTION`
/// ("CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT").
pub fn parse_ssh_connection(text: &str) -> std::result::Result<(SocketAddr, SocketAddr), String> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [client_ip, client_port, server_ip, server_port] = parts[..] else {
        return Err(format!(
            "SSH_CONNECTION {text:?} is not \"CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT\""
        ));
    };
    let addr = |ip: &str, port: &str| -> std::result::Result<SocketAddr, String> {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("SSH_CONNECTION: {ip:?} is not an IP address"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("SSH_CONNECTION: {port:?} is not a port"))?;
        Ok(SocketAddr::new(ip, port))
    };
    Ok((addr(client_ip, client_port)?, addr(server_ip, server_port)?))
}

/// The session's name: one per SSH connection.
pub fn session_name(user: &str, client: SocketAddr) -> String {
    format!("ssh:{user}@{client}")
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| {
        Error::Setup(format!(
            "{name} is not set: run `reaper pam` from pam_exec in sshd's session stack"
        ))
    })
}

pub fn pam(cmd: PamCmd) -> Result<i32> {
    let kind = env("PAM_TYPE")?;
    let user = env("PAM_USER")?;
    let (client, server) = parse_ssh_connection(&env("SSH_CONNECTION")?).map_err(Error::Setup)?;
    let session = session_name(&user, client);
    let mut reaper = Client::new(&cmd.socket, Some(std::time::Duration::from_secs(5)));
    let outcome = match kind.as_str() {
        "open_session" => reaper
            .grant(GrantArgs {
                session: session.clone(),
                user: user.clone(),
                target: cmd.target.clone().unwrap_or_else(host_name),
                class: Some(cmd.class.clone()),
                flows: vec![FlowSpec {
                    local: Some(server.to_string()),
                    remote: Some(client.to_string()),
                    fd: None,
                    netns: None,
                }],
                ..GrantArgs::default()
            })
            .map(|_| ()),
        "close_session" => match reaper.revoke(RevokeArgs {
            session: Some(session.clone()),
            ..RevokeArgs::default()
        }) {
            // Already over: its deadline or a revoke ended it first.
            Err(ClientError::Refused(r)) if r.code.name() == "no_such_session" => Ok(()),
            other => other.map(|_| ()),
        },
        // pam_exec also runs for auth, account and password when the stack
        // says so; only sessions concern reaper.
        _ => return Ok(0),
    };
    match outcome {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("reaper pam: {kind} {session}: {e}");
            Ok(1)
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sshd".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_connection_gives_both_ends() {
        let (client, server) = parse_ssh_connection("198.18.0.2 40312 198.18.0.1 22").unwrap();
        assert_eq!(client.to_string(), "198.18.0.2:40312");
        assert_eq!(server.to_string(), "198.18.0.1:22");
        let (client, _) = parse_ssh_connection("2001:db8::2 5000 2001:db8::1 22").unwrap();
        assert_eq!(client.to_string(), "[2001:db8::2]:5000");
        assert_eq!(
            session_name("alice", client),
            "ssh:alice@[2001:db8::2]:5000"
        );
    }

    #[test]
    fn a_malformed_ssh_connection_is_named() {
        for bad in [
            "",
            "1.2.3.4 22",
            "x 1 1.2.3.4 22",
            "1.2.3.4 99999 1.2.3.4 22",
        ] {
            let e = parse_ssh_connection(bad).unwrap_err();
            assert!(e.contains("SSH_CONNECTION"), "{e}");
        }
    }
}
