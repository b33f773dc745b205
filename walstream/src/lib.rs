//! pitr-walstream: the WAL receiver.
//!
//! Owns the path from a primary's replication stream to durable archive objects: group-committed
//! chunks put as soon as the previous put finishes (spaced by `flush_interval`, under `auto` only
//! while the primary does not wait for us: `sync_standby.rs`), whole segments
//! compacted at each boundary, timeline switches followed, resume from the archive's end after any
//! restart. The flush position reported to the primary is always the end of the last durable
//! object, so the replication slot keeps on the primary whatever the archive does not yet hold.
//!
//! The state — position, segment buffers, the durable end, which put comes next, where to resume
//! and how timelines switch — is one sans-IO state machine (`pipeline/`: `WalPipeline`, unit
//! tested with an in-memory archive through every crash point). Around it, thin async edges: the
//! receiver (`receiver.rs`: connection, history files, status updates; `session.rs`: what lives
//! across reconnects, the lease among it), the uploader (`uploader.rs`: the puts; with the
//! receiver it shares only the pipeline, behind one mutex), and start-up I/O (`resume.rs`:
//! listing, reading a partial segment back, compacting segments left as chunks). While caught up
//! it records completeness marks (`marks.rs`: the moments the archive held everything the
//! primary had). Off the receive path, the change indexer (`indexer.rs`) decodes the received WAL
//! into the change index, one object per segment once it is durable; it and the segments'
//! compactions run on a background thread at a lower CPU priority (`background.rs`).
//!
//! It does not parse the protocol (pitr-pgwire) or PostgreSQL's formats (pitr-pgformat), and does
//! not know the object format (pitr-archive).

#![deny(missing_docs)]

mod api;
mod background;
mod indexer;
mod marks;
mod pipeline;
mod receiver;
mod resume;
mod session;
mod sync_standby;
#[cfg(test)]
mod test_store;
mod uploader;

pub use api::{FlushInterval, IndexOptions, StreamConfig, StreamError, StreamStatus};
pub use receiver::run;
pub use sync_standby::{names_standby, SyncNamesError};
