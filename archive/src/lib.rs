//! pitr-archive: everything about what pitr stores.
//!
//! Owns the sealed object format ([`seal`]: zstd + AES-256-GCM frames with the object's name bound
//! in, crc32 of the plaintext), the key ring ([`keys`]: envelope encryption with a key-encryption
//! key from a 0600 key file), the storage trait and its backends ([`store`]: local filesystem;
//! [`cloud`]: S3 and GCS on `object_store`, whose clients [`cloud::s3`] and [`cloud::gcs`] build), the
//! repository layout and the WAL catalog built by listing ([`layout`]; its reads fall back to
//! secondary repositories), and copying every object to those secondaries ([`replicate`]: ordered
//! queues, back-fill by listing). Retention is here too:
//! the policy, pure ([`retention`]: which backups, WAL and blocks stay), applying it ([`expire`])
//! and keeping it from deleting blocks under a running backup ([`running`]: markers and a lock).
//! Completeness marks ([`complete`]) record up to when the archive held everything the source had.
//!
//! It does not speak to databases and does not decide *when* to write: callers hand it plaintext
//! and names. Nothing outside this crate knows the byte layout of an object.

pub mod backup;
pub mod cloud;
pub mod complete;
pub mod expire;
pub mod keys;
pub mod layout;
pub mod lease;
pub mod replicate;
pub mod retention;
pub mod running;
pub mod seal;
pub mod store;

pub use keys::{KeyError, KeyRing};
pub use layout::{ClusterInfo, Repository, RepositoryError, WalCatalog, WalObject};
pub use seal::{ObjectKind, ObjectMeta, SealError, SealedHeader};
pub use store::{LocalStore, ObjectInfo, PutOutcome, Store, StoreError};

/// Now, in µs since the Unix epoch: how pitr stamps objects, leases, backups and reports.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
