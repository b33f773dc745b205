//! pitr-pgwire: the PostgreSQL side of pitr.
//!
//! Owns the replication-protocol client (startup, authentication, TLS, replication commands,
//! the CopyBoth WAL stream, the BASE_BACKUP stream, UPLOAD_MANIFEST), connection strings, and the
//! probe of a server's WAL end for `pitr status` ([`position`]). Message encoding and decoding
//! are pure functions over bytes ([`messages`], [`conninfo`], and the authentication state
//! machine in `auth`); the socket lives only in [`connection`].
//!
//! The server is not trusted with pitr's memory or credentials: no message longer than a bound
//! is read (64 kB until the server has authenticated us, then
//! [`ConnInfo::max_message_size`](conninfo::ConnInfo::max_message_size)), no result set grows
//! past that bound, and what authentication pitr agrees to is set out in `auth`. It knows nothing of archives or storage, and not PostgreSQL's file and record
//! formats either (LSN text, timeline history, WAL records, incremental files): those are
//! pitr-pgformat, which this crate uses and which does not need a socket.

#![deny(missing_docs)]

mod auth;
pub mod connection;
pub mod conninfo;
pub mod messages;
mod pgpass;
pub mod position;
mod tls;

use std::time::Duration;

pub use connection::{ConnectOptions, Connection, QueryResult, ServerSettings, StreamEvent, SystemIdentity};
pub use conninfo::ConnInfo;
pub use messages::{ReplicationMessage, ServerError};

/// What went wrong talking to a server. `host` is the server as the connection string named it.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Reading or writing the socket failed.
    #[error("{host}: {cause}")]
    Io {
        /// The server.
        host: String,
        /// The socket error.
        cause: std::io::Error,
    },
    /// The server closed the connection.
    #[error("{host}: the server closed the connection")]
    Closed {
        /// The server.
        host: String,
    },
    /// Connecting or a reply took longer than allowed.
    #[error("{host}: connection timed out after {after:?}")]
    Timeout {
        /// The server.
        host: String,
        /// The time allowed.
        after: Duration,
    },
    /// The TLS handshake or configuration failed.
    #[error("{host}: TLS: {message}")]
    Tls {
        /// The server.
        host: String,
        /// Why.
        message: String,
    },
    /// The server refused the credentials, or asked for a method pitr does not speak.
    #[error("{host}: authentication failed: {message}")]
    Auth {
        /// The server.
        host: String,
        /// Why.
        message: String,
    },
    /// The server answered with an ErrorResponse.
    #[error("{host}: {error}")]
    Server {
        /// The server.
        host: String,
        /// The error as the server sent it.
        error: Box<ServerError>,
    },
    /// The session is not what `target_session_attrs` asks for.
    #[error("{host}: session is {}, but target_session_attrs wants {wanted}", if *read_only { "read-only" } else { "read-write" })]
    SessionAttrs {
        /// The server.
        host: String,
        /// The `target_session_attrs` value.
        wanted: String,
        /// Whether the session is read-only.
        read_only: bool,
    },
    /// No host of the connection string could be connected to.
    #[error("could not connect: {attempts}")]
    Connect {
        /// Each host tried and why it failed.
        attempts: String,
    },
    /// The server sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server announced a message longer than pitr accepts at this point; the connection is
    /// dropped without reading or reserving it.
    #[error(
        "{host}: the server announced a message of {length} bytes, type {message_type}, above the limit of {limit} bytes {}; connection dropped",
        if *authenticated { "(raise [postgres] max_message_size if the server is genuine)" } else { "before authentication completes" }
    )]
    MessageTooLarge {
        /// The server (empty when it comes from [`messages::parse_backend`], which has no socket).
        host: String,
        /// The message type, by name and type byte.
        message_type: String,
        /// The length the server announced.
        length: u64,
        /// The bound it exceeds.
        limit: usize,
        /// Whether the server had authenticated us (the configurable bound applies) or not
        /// (the fixed startup bound).
        authenticated: bool,
    },
    /// The rows of one result set add up to more than `max_message_size`.
    #[error("{host}: the result of {command} exceeds {limit} bytes (max_message_size); connection dropped")]
    ResultTooLarge {
        /// The server.
        host: String,
        /// The command whose result it is.
        command: String,
        /// The bound it exceeds.
        limit: usize,
    },
    /// A replication slot name PostgreSQL would refuse.
    #[error("invalid replication slot name {0:?}: use 1-63 characters of [a-z0-9_]")]
    InvalidSlotName(String),
}

impl PgError {
    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Server { error, .. } => Some(&error.code),
            _ => None,
        }
    }
}
