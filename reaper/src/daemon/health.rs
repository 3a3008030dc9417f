//! The HTTP endpoint of `[metrics] listen`: `/metrics` (Prometheus text
//! format), `/healthz` (the process answers) and `/readyz` (programs
//! attached, control socket listening, last reload accepted). It speaks
//! just enough HTTP/1.1 for a scraper and a probe: one GET per
//! connection, a bounded request, a bounded number of connections at once;
//! it is off unless configured.

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

use super::shared::{lock, Shared, Telemetry};

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 8;
/// Longest request head read.
const MAX_REQUEST_BYTES: usize = 8192;
/// How long a client has to send its request and take the answer.
const TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn serve(listener: TcpListener, state: Shared, telemetry: Telemetry) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (state, telemetry) = (state.clone(), telemetry.clone());
        tokio::spawn(async move {
            if tokio::time::timeout(TIMEOUT, answer(stream, &state, &telemetry))
                .await
                .is_err()
            {
                debug!("metrics client too slow; closed");
            }
            drop(slot);
        });
    }
}

async fn answer(mut stream: TcpStream, state: &Shared, telemetry: &Telemetry) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST_BYTES {
            let _ = respond(&mut stream, 431, "text/plain", "request too large\n", false).await;
            return;
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(&mut stream, 405, "text/plain", "only GET and HEAD\n", false).await;
        return;
    }
    let path = target.split('?').next().unwrap_or("");
    let (code, kind, body) = match path {
        "/metrics" => {
            let status = lock(state).status();
            (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                telemetry.metrics.render(&status),
            )
        }
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let reload_error = lock(state).status().last_reload_error;
            match (telemetry.ready.load(Ordering::Relaxed), reload_error) {
                (false, _) => (503, "text/plain", "not ready: starting\n".to_owned()),
                (true, Some(e)) => (
                    503,
                    "text/plain",
                    format!("not ready: the last config reload was refused: {e}\n"),
                ),
                (true, None) => (200, "text/plain", "ready\n".to_owned()),
            }
        }
        _ => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let _ = respond(&mut stream, code, kind, &body, head_only).await;
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    kind: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}
