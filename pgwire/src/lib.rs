//! pitr-pgwire: the PostgreSQL side of pitr.
//!
//! Owns the replication-protocol client (startup, authentication, TLS, replication commands,
//! the CopyBoth WAL stream) and the WAL reader that finds commit/abort records and their times.
//! Message encoding and decoding are pure functions over bytes; the socket lives only in
//! [`connection`]. It knows nothing of archives or storage.

pub mod conninfo;
pub mod walreader;
