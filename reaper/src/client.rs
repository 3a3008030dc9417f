//! The Rust client of the control protocol, which the `reaper` CLI uses for
//! every command: one connection, kept and reused, requests encoded by
//! `protocol::WireOp` and answers decoded into the protocol's result types.
//! With `protocol`, it is the one piece of code that speaks the protocol on
//! the client side (the daemon's side is `daemon::server` and `wire`).

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::protocol::{
    ExtendArgs, GrantArgs, GrantResult, ListArgs, ListResult, Refusal, Response, RevokeArgs,
    RevokeResult, StatusResult, TouchArgs, WireOp,
};

/// Why a call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon refused the request (its code and message).
    #[error("{0}")]
    Refused(Refusal),
    /// No daemon answers at the socket, or it went away.
    #[error("{0}")]
    Unavailable(String),
    /// The daemon's answer is not the protocol's.
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// For the CLI, whose commands end with the crate's error: the message is
/// what the user reads (`reaper: CODE: message` for a refusal).
impl From<ClientError> for crate::error::Error {
    fn from(e: ClientError) -> Self {
        crate::error::Error::Setup(e.to_string())
    }
}

/// A connection to one daemon's control socket.
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
    conn: Option<BufReader<UnixStream>>,
}

fn unavailable(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Unavailable(format!(
        "cannot reach the reaper daemon at {} ({e}); is `reaper daemon` running, and may you open its socket?",
        path.display()
    ))
}

impl Client {
    /// A client of the daemon at `path`; it connects on first use. Each
    /// exchange may take `timeout` (None: no limit).
    pub fn new(path: impl Into<PathBuf>, timeout: Option<Duration>) -> Client {
        Client {
            path: path.into(),
            timeout,
            conn: None,
        }
    }

    fn connect(&self) -> Result<UnixStream> {
        let stream = UnixStream::connect(&self.path).map_err(|e| unavailable(&self.path, e))?;
        stream
            .set_read_timeout(self.timeout)
            .and_then(|()| stream.set_write_timeout(self.timeout))
            .map_err(|e| unavailable(&self.path, e))?;
        Ok(stream)
    }

    /// Sends one request and reads its answer, whatever it says (the CLI's
    /// `--json` prints it as is).
    pub fn call(&mut self, op: &WireOp) -> Result<Response> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(self.connect()?));
        }
        let conn = self.conn.as_mut().expect("connected");
        let line = op.to_line(None) + "\n";
        // A daemon that refuses the connection (`busy`) writes its refusal
        // and closes: the write may then fail, but the refusal is there to
        // read.
        let sent = conn.get_mut().write_all(line.as_bytes());
        let mut reply = String::new();
        let read = conn.read_line(&mut reply);
        if reply.trim().is_empty() {
            self.conn = None;
            if let Err(e) = sent.and(read.map(|_| ())) {
                return Err(unavailable(&self.path, e));
            }
            return Err(ClientError::Unavailable(
                "the daemon closed the connection without answering".into(),
            ));
        }
        serde_json::from_str(&reply).map_err(|e| {
            self.conn = None;
            ClientError::Protocol(format!(
                "the daemon sent an unreadable response ({e}): {reply:?}"
            ))
        })
    }

    /// A call whose result is `T`, a refusal being an error.
    fn typed<T: DeserializeOwned>(&mut self, op: &WireOp) -> Result<T> {
        into_result(self.call(op)?)
    }

    pub fn grant(&mut self, args: GrantArgs) -> Result<GrantResult> {
        self.typed(&WireOp::Grant(args))
    }

    pub fn extend(&mut self, args: ExtendArgs) -> Result<GrantResult> {
        self.typed(&WireOp::Extend(args))
    }

    pub fn touch(&mut self, session: &str) -> Result<GrantResult> {
        self.typed(&WireOp::Touch(TouchArgs {
            session: session.to_owned(),
        }))
    }

    pub fn revoke(&mut self, args: RevokeArgs) -> Result<RevokeResult> {
        self.typed(&WireOp::Revoke(args))
    }

    pub fn list(&mut self, selector: ListArgs) -> Result<ListResult> {
        self.typed(&WireOp::List(selector))
    }

    pub fn status(&mut self) -> Result<StatusResult> {
        self.typed(&WireOp::Status)
    }

    /// Follows the daemon's events on a connection of their own: the
    /// iterator yields each event line as JSON until the daemon goes away.
    pub fn watch(&self, selector: ListArgs) -> Result<Events> {
        let mut stream = self.connect()?;
        // Events come when they come: no timeout while waiting for one.
        stream
            .set_read_timeout(None)
            .map_err(|e| unavailable(&self.path, e))?;
        let line = WireOp::Watch(selector).to_line(None) + "\n";
        stream
            .write_all(line.as_bytes())
            .map_err(|e| unavailable(&self.path, e))?;
        let mut reader = BufReader::new(stream);
        let mut reply = String::new();
        reader
            .read_line(&mut reply)
            .map_err(|e| unavailable(&self.path, e))?;
        let response: Response = serde_json::from_str(&reply).map_err(|e| {
            ClientError::Protocol(format!(
                "the daemon sent an unreadable response ({e}): {reply:?}"
            ))
        })?;
        into_result::<Value>(response)?;
        Ok(Events { reader })
    }
}

fn into_result<T: DeserializeOwned>(response: Response) -> Result<T> {
    if let Some(refusal) = response.error {
        return Err(ClientError::Refused(refusal));
    }
    serde_json::from_value(response.result.unwrap_or_default())
        .map_err(|e| ClientError::Protocol(format!("unexpected result from the daemon: {e}")))
}

/// The event stream of a `watch`: one JSON object per event; the raw line
/// is kept for printing as is.
pub struct Events {
    reader: BufReader<UnixStream>,
}

impl Iterator for Events {
    /// (the line, the event parsed; `Value::Null` if it did not parse).
    type Item = std::io::Result<(String, Value)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                let line = line.trim_end().to_owned();
                let event = serde_json::from_str(&line).unwrap_or(Value::Null);
                Some(Ok((line, event)))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A stand-in daemon answering each line with `answer(line)`.
    fn daemon(answer: fn(&str) -> String) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("reaper.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut out = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines().map_while(|l| l.ok()) {
                        let _ = out.write_all((answer(&line) + "\n").as_bytes());
                    }
                });
            }
        });
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let path = std::env::temp_dir().join(format!(
                    "reaper-client-test-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn one_connection_serves_every_call_and_refusals_are_errors() {
        let (_dir, path) = daemon(|line| {
            let req: Value = serde_json::from_str(line).unwrap();
            match req["op"].as_str() {
                Some("list") => r#"{"v":1,"ok":true,"result":{"now":"x","sessions":[]}}"#.into(),
                _ => r#"{"v":1,"ok":false,"error":{"code":"no_such_session","message":"touch: no session \"s\""}}"#.into(),
            }
        });
        let mut client = Client::new(&path, Some(Duration::from_secs(5)));
        for _ in 0..3 {
            assert!(client
                .list(ListArgs::default())
                .unwrap()
                .sessions
                .is_empty());
        }
        match client.touch("s") {
            Err(ClientError::Refused(r)) => assert_eq!(r.code.name(), "no_such_session"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_daemon_that_is_not_there_is_unavailable() {
        let dir = tempdir::Dir::new();
        let mut client = Client::new(dir.0.join("none.sock"), None);
        assert!(matches!(client.status(), Err(ClientError::Unavailable(_))));
    }
}
