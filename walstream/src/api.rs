//! What callers hand the receiver and get back: its configuration, its errors, and the status
//! snapshot it publishes.

use std::sync::Arc;
use std::time::Duration;

use pitr_archive::chunk_run::ChunkRunError;
use pitr_archive::lease::LeaseError;
use pitr_archive::RepositoryError;
use pitr_pgwire::{ConnInfo, PgError};
use tokio::sync::watch;

/// How `pitr stream` streams one PostgreSQL cluster's WAL.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Where the primary is (several hosts: the first that accepts a read-write session).
    pub conninfo: ConnInfo,
    /// The physical replication slot that keeps WAL on the primary until the archive holds it.
    pub slot: String,
    /// Create the slot if it does not exist.
    pub create_slot: bool,
    /// The `application_name` the primary sees (`synchronous_standby_names` matches it).
    pub application_name: String,
    /// Minimum spacing between chunk puts.
    pub flush_interval: FlushInterval,
    /// How often a status update goes to the primary even when nothing changed.
    pub status_interval: Duration,
    /// Received-but-not-durable bytes held in memory before reading from the primary pauses.
    pub max_pending_bytes: usize,
    /// How long the first connection may keep failing before pitr gives up.
    pub startup_timeout: Duration,
    /// Refuse a primary whose system identifier differs (when set).
    pub system_id: Option<u64>,
    /// Who holds the writer lease: stable across restarts of this sidecar (`<host>/<slot>`).
    pub lease_holder: String,
    /// How long the writer lease holds without renewal.
    pub lease_ttl: Duration,
    /// Completeness marks (moments at which the archive held everything the primary had) are
    /// written at most this often while caught up; zero writes none.
    pub complete_interval: Duration,
    /// The change index (`pitr find`): whether the sidecar writes it, and who hears of DDL.
    pub index: IndexOptions,
}

/// The minimum spacing between chunk puts (`[stream] flush_interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushInterval {
    /// Always this (0: put as soon as the previous put is done).
    Fixed(Duration),
    /// `when_async` while the primary's `synchronous_standby_names` does not name the sidecar
    /// (read every second over an ordinary connection), 0 while it does or cannot be read: a
    /// synchronous standby's commits never wait out a spacing (see `sync_standby.rs`).
    Auto {
        /// The spacing while the primary does not wait for us.
        when_async: Duration,
    },
}

/// The sidecar's change indexer (see `indexer.rs`).
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Write change index objects (default true).
    pub enabled: bool,
    /// Set to the commit LSN of the newest commit decoded that changed a system catalog (DDL):
    /// a hint, sent when decoded (possibly before that WAL is durable), for the catalog poller.
    pub ddl_commits: Option<Arc<watch::Sender<Option<u64>>>>,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions { enabled: true, ddl_commits: None }
    }
}

/// Why streaming stopped for good (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The repository failed in a way a retry does not mend (another writer's object, a wrong
    /// key, a damaged object).
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// The writer lease was lost to another writer (or refused at start): nothing more may be
    /// written for the cluster.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// PostgreSQL refused or failed in a way a reconnect does not mend.
    #[error("{0}")]
    Postgres(#[from] PgError),
    /// Anything else that ends streaming, said for people.
    #[error("{0}")]
    Fatal(String),
    /// A chunk in the archive holds another length than its name says.
    #[error("cannot resume from the archive: chunk {chunk} holds {bytes} bytes, but its name says {named}")]
    ChunkLength {
        /// The chunk's object name.
        chunk: String,
        /// How many bytes it holds.
        bytes: usize,
        /// How many its name says.
        named: usize,
    },
    /// Two chunks in the archive disagree about WAL they both hold.
    #[error(
        "cannot resume from the archive: chunk {chunk} disagrees with {earlier} about the WAL they both hold; \
         one of them is not this cluster's WAL (remove it to stream that range again, if the primary still has it)"
    )]
    ChunkMismatch {
        /// The chunk read last.
        chunk: String,
        /// The chunks read before it.
        earlier: String,
    },
}

impl From<ChunkRunError> for StreamError {
    fn from(e: ChunkRunError) -> StreamError {
        match e {
            ChunkRunError::Repository(e) => StreamError::Repository(e),
            ChunkRunError::Length { chunk, bytes, named } => StreamError::ChunkLength { chunk, bytes, named },
            ChunkRunError::Mismatch { chunk, earlier } => StreamError::ChunkMismatch { chunk, earlier },
            e @ ChunkRunError::NotContiguous { .. } => {
                StreamError::Fatal(format!("cannot resume from the archive: {e}"))
            }
        }
    }
}

/// A snapshot of the receiver's state, published for `pitr status` and metrics.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamStatus {
    /// A replication connection is up.
    pub connected: bool,
    /// The server streamed from (the last one connected to).
    pub host: Option<String>,
    /// The cluster's system identifier.
    pub system_id: Option<u64>,
    /// The timeline streamed.
    pub timeline: u32,
    /// Just past the last WAL received.
    pub received_lsn: u64,
    /// Just past the last WAL the archive holds.
    pub durable_lsn: u64,
    /// The primary's newest WAL position heard of.
    pub primary_lsn: u64,
    /// `primary_lsn - durable_lsn`.
    pub lag_bytes: u64,
    /// Age of the oldest WAL received but not yet durable; 0 when caught up.
    pub lag_seconds: f64,
    /// Time (µs since the Unix epoch) of the newest commit/abort made durable.
    pub last_commit_time_us: Option<i64>,
    /// The primary's clock (µs since the Unix epoch) at the newest completeness mark recorded:
    /// the archive held everything the primary had then.
    #[serde(default)]
    pub complete_up_to_us: Option<i64>,
    /// WAL objects put since start.
    pub objects_archived: u64,
    /// Plaintext bytes of those objects.
    pub bytes_archived: u64,
    /// Puts that failed (and were retried) since start.
    pub upload_errors: u64,
    /// The newest error, until the next success.
    pub last_error: Option<String>,
    /// The spacing between chunk puts in force (seconds).
    #[serde(default)]
    pub flush_interval_seconds: f64,
    /// Under `flush_interval = "auto"`: whether the primary's `synchronous_standby_names` names
    /// the sidecar (`None`: not read yet, unreadable, or a fixed `flush_interval`).
    #[serde(default)]
    pub synchronous_standby: Option<bool>,
    /// When this snapshot was taken (µs since the Unix epoch).
    pub updated_at_us: i64,
}
