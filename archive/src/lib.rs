//! pitr-archive: everything about what pitr stores.
//!
//! Owns the sealed object format ([`seal`]: zstd + AES-256-GCM frames with the object's name bound
//! in, crc32 of the plaintext), the key ring ([`keys`]: envelope encryption with a key-encryption
//! key from a 0600 key file), the storage trait and its backends ([`store`]), and the repository
//! layout and the WAL catalog built by listing ([`layout`]).
//!
//! It does not speak to databases and does not decide *when* to write: callers hand it plaintext
//! and names. Nothing outside this crate knows the byte layout of an object.

pub mod backup;
pub mod keys;
pub mod layout;
pub mod lease;
pub mod s3;
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
