//! pitr-archive: everything about what pitr stores.
//!
//! Owns the sealed object format ([`seal`]: zstd + AES-256-GCM frames with the object's name bound
//! in, crc32 of the plaintext), the keys ([`keys`]: per-object data keys wrapped by repository keys,
//! wrapped in turn by master keys from a key file, a variable, a command or AWS KMS), the storage trait and its backends ([`store`]: local filesystem;
//! [`cloud`]: S3 and GCS on `object_store`, whose clients [`cloud::s3`] and [`cloud::gcs`] build),
//! and copying every object to secondary repositories ([`replicate`]: ordered queues, back-fill by
//! listing).
//!
//! Every object name — build and parse, for PostgreSQL (`pg/<system id>/…`), MongoDB
//! (`mongo/<name>/…`) and the repository-wide objects — is in [`names`]; a new kind of object
//! starts there. The rest reads and writes through [`Repository`] ([`repository`]: the marker,
//! sealing on put, authenticating on get, reads falling back to secondaries, the
//! [`ClusterInfo`] record). One cluster's WAL: which object holds which bytes and the segment
//! arithmetic ([`wal`]), what the archive holds of each segment, built by listing
//! ([`wal_catalog`]), whether it is held without a hole along a timeline path ([`continuity`]), and
//! a segment's chunks read back as one run ([`chunk_run`]). Base backups'
//! blocks and manifests ([`backup`]), the WAL writer's lease ([`lease`]), completeness marks
//! ([`complete`]: up to when the archive held everything the source had), the index of restore
//! points ([`restore_points`]), the change index of commits per WAL segment ([`change_index`]). Retention: the policy,
//! pure ([`retention`]: which backups, WAL and blocks stay), applying it ([`expire`]) and keeping
//! it from deleting under a running backup, restore or drill ([`running`]: markers and a lock);
//! pins and notes that keep chosen backups from it ([`pins`]). The signed history of every
//! manifest, segment and slice stored or deleted, which `verify` proves the repository against
//! ([`journal`]).
//! Times as pitr prints them are [`time`]'s.
//!
//! It does not speak to databases and does not decide *when* to write: callers hand it plaintext
//! and names. Nothing outside this crate knows the byte layout of an object; PostgreSQL's own file
//! formats (segment and history file names, LSNs) are `pitr-pgformat`'s.

#![deny(missing_docs)]

pub mod backup;
pub mod catalog;
pub mod change_index;
mod chunk_log;
pub mod chunk_run;
pub mod cloud;
pub mod complete;
pub mod continuity;
mod dir_listings;
pub mod expire;
pub mod journal;
pub mod keys;
pub mod lease;
pub mod names;
pub mod pins;
mod recycle;
pub mod replicate;
pub mod repository;
pub mod restore_points;
pub mod retention;
pub mod running;
pub mod seal;
pub mod store;
pub mod throttle;
pub mod time;
pub mod wal;
pub mod wal_catalog;

pub use keys::{KeyError, KeyRing, KeySet, KeySources};
pub use repository::{ClusterInfo, NamedStore, Repository, RepositoryError};
pub use seal::{ObjectKind, ObjectMeta, SealError, SealedHeader};
pub use store::{LocalStore, ObjectInfo, PutOutcome, Store, StoreError};
pub use wal::{WalLayout, WalObject};
pub use wal_catalog::{Histories, HistoryProblem, SegmentEntry, WalCatalog};

/// Now, in µs since the Unix epoch: how pitr stamps objects, leases, backups and reports.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// This machine's host name, as running markers and the writer lease's default holder name it
/// (`localhost` when the system says nothing).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
