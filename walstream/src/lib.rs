//! pitr-walstream: the WAL receiver.
//!
//! Owns the path from a primary's replication stream to durable archive objects: group-committed
//! chunks put as soon as the previous put finishes (spaced by `flush_interval`), whole segments
//! compacted at each boundary, timeline switches followed, resume from the archive's end after any
//! restart. The flush position reported to the primary is always the end of the last durable
//! object, so the replication slot keeps on the primary whatever the archive does not yet hold.
//!
//! Start-up resumes from any state the archive's WAL can be in (`resume.rs`: segments left as
//! chunks, overlapping chunks, gaps); while caught up it records completeness marks (`marks.rs`:
//! the moments the archive held everything the primary had).
//!
//! It does not parse the protocol (pitr-pgwire) or know the object format (pitr-archive).

mod marks;
mod pending;
mod receiver;
mod resume;

pub use receiver::{run, StreamConfig, StreamError, StreamStatus};
