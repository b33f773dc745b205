//! pitr-restore: reading the archive back.
//!
//! Owns restore planning ([`plan`]: the recoverable window, the backup to start from and its
//! chain), writing a backup into a directory ([`materialize`]), combining incremental chains
//! into full files ([`combine`]), recovery settings, running the server to the
//! target and measuring what was achieved ([`recover`]), and `wal-fetch` ([`walfetch`]), which
//! PostgreSQL calls as its restore_command. It never writes to the archive.

pub mod combine;
pub mod drill;
pub mod materialize;
pub mod plan;
pub mod recover;
pub mod target;
pub mod verify;
pub mod walfetch;

use std::path::PathBuf;

use pitr_archive::RepositoryError;

pub use plan::{Catalog, Window};
pub use recover::{restore, RestoreOptions, RestoreReport, StartOptions};
pub use target::{format_time, parse_target, RecoveryTarget};
pub use walfetch::{wal_fetch, FetchError, Fetched};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("cannot restore: {0}")]
    OutsideWindow(String),
    #[error("target directory {0} is not empty (pass --force to replace its contents)")]
    TargetNotEmpty(PathBuf),
    #[error("cannot restore {file}: {cause}")]
    Block { file: String, cause: Box<RepositoryError> },
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("PostgreSQL: {0}")]
    Server(String),
    #[error("{0}")]
    Other(String),
}
