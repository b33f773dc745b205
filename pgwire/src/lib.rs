//! pitr-pgwire: the PostgreSQL side of pitr.
//!
//! Owns the replication-protocol client (startup, authentication, TLS, replication commands,
//! the CopyBoth WAL stream, UPLOAD_MANIFEST), the reader of PostgreSQL 17's incremental files
//! ([`incremental`]) and the WAL reader that finds commit/abort records and their times.
//! Message encoding and decoding are pure functions over bytes ([`messages`], [`walreader`],
//! [`conninfo`]); the socket lives only in [`connection`]. It knows nothing of archives or storage.

pub mod connection;
pub mod conninfo;
pub mod incremental;
pub mod messages;
mod pgpass;
pub mod timeline;
mod tls;
pub mod walreader;

use std::time::Duration;

pub use connection::{ConnectOptions, Connection, QueryResult, ServerSettings, StreamEvent, SystemIdentity};
pub use conninfo::ConnInfo;
pub use messages::{format_lsn, parse_lsn, ReplicationMessage, ServerError};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{host}: {cause}")]
    Io { host: String, cause: std::io::Error },
    #[error("{host}: the server closed the connection")]
    Closed { host: String },
    #[error("{host}: connection timed out after {after:?}")]
    Timeout { host: String, after: Duration },
    #[error("{host}: TLS: {message}")]
    Tls { host: String, message: String },
    #[error("{host}: authentication failed: {message}")]
    Auth { host: String, message: String },
    #[error("{host}: {error}")]
    Server { host: String, error: Box<ServerError> },
    #[error("{host}: session is {}, but target_session_attrs wants {wanted}", if *read_only { "read-only" } else { "read-write" })]
    SessionAttrs { host: String, wanted: String, read_only: bool },
    #[error("could not connect: {attempts}")]
    Connect { attempts: String },
    #[error("protocol error: {0}")]
    Protocol(String),
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
