//! File-tree backups (`[[files]]` sets) and logical dumps (`[[dumps]]` sets).
//!
//! Owns: cutting byte streams into content-defined blocks stored once in the repository's shared
//! `files/blocks/` store ([`blocks`]), the manifests that say what a file-tree backup or a dump is
//! made of, and reading them back.
//!
//! Does not own: the sealed object format, keys and storage (`pitr-archive`), running `pg_dump`
//! or `pg_restore` against a server, schedules and retention policy (the `pitr` binary).

pub mod blocks;
pub mod dump;
mod error;

pub use blocks::{BlockRef, BlockStore, BlockWriter, StoredStream};
pub use dump::DumpManifest;
pub use error::FilesError;
