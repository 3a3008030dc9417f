//! The control protocol: line-delimited JSON over a Unix stream socket.
//!
//! One request per line, one response line per request, in order. Every
//! request is an object with `"op"`, optionally `"v"` (the protocol
//! version, which is 1) and `"id"` (any JSON value, echoed back so that a
//! client may pipeline). A `batch` request carries many grants, extends,
//! touches and revokes in one line and is answered in one line.
//! The daemon and the CLI both use the types here, so they cannot drift.
//!
//! Parsing is strict: unknown fields, wrong types, missing fields and
//! conflicting options are refused with a [`Refusal`] that names the field.
//! Semantic checks that need state or a clock (is the flow there, is the
//! deadline allowed) happen in the daemon and use the same refusal type.
//!
//! * `wire` — requests as they travel (what the CLI writes);
//! * `request` — requests once validated (what the daemon acts on), and
//!   the parser from one to the other;
//! * `grant_path` — the same parser's one-pass road for grants, which
//!   leaves everything else (and every refusal) to `request`;
//! * `response` — response lines and the views they carry;
//! * `refusal` — why a request was refused, with its stable code.

#![forbid(unsafe_code)]

mod grant_path;
mod refusal;
mod request;
mod response;
mod wire;

pub use refusal::{Refusal, RefusalCode};
pub use request::{
    parse_request, Command, ExtendRequest, FlowRef, GrantRequest, Op, Request, RevokeSelector,
    MAX_BATCH,
};
pub use response::{
    Answer, BatchItem, FleetStatus, FlowView, GrantResult, KillView, ListResult, Response,
    RevokeResult, SessionView, StatusResult,
};
pub use wire::{
    DurationArg, ExtendArgs, FlowSpec, GrantArgs, ListArgs, NetnsRef, RevokeArgs, TouchArgs, WireOp,
};

pub const PROTOCOL_VERSION: u64 = 1;
/// Longest request line; a longer one is refused and the connection closed.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most socket descriptors one request may carry with SCM_RIGHTS.
pub const MAX_FDS_PER_REQUEST: usize = 16;
