//! File-tree backups (`[[files]]` sets) and logical dumps (`[[dumps]]` sets).
//!
//! Owns: cutting byte streams into content-defined blocks stored once in the repository's shared
//! `files/blocks/` store ([`blocks`]), the manifests that say what a file-tree backup or a dump is
//! made of, and reading them back; running the server's own `pg_dump` and `pg_restore` for dumps
//! ([`pgdump`], the process edge).
//!
//! Does not own: the sealed object format, keys and storage (`pitr-archive`), schedules and
//! retention policy (the `pitr` binary).

pub mod blocks;
pub mod dump;
mod error;
mod manifests;
pub mod pgdump;
pub mod sweep;
pub mod tree;

pub use blocks::{BlockRef, BlockStore, BlockWriter, StoredStream};
pub use dump::DumpManifest;
pub use error::FilesError;
pub use sweep::{expire_files, FilesExpireReport, SetRetention, SweepOptions};
pub use tree::{TreeKind, TreeManifest};
