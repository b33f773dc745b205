//! pitr-restore: reading the archive back.
//!
//! Owns restore planning ([`plan`]: the recoverable window, the backup to start from and its
//! chain), writing a backup into a directory ([`materialize`]), combining incremental chains
//! into full files ([`combine`]), recovery settings, running the server to the
//! target and measuring what was achieved ([`recover`]), and `wal-fetch` ([`walfetch`]), which
//! PostgreSQL calls as its restore_command. It writes nothing to the archive but the running
//! marker a restore or drill holds so that `pitr expire` keeps what it reads
//! ([`recover`], [`pitr_archive::running`]); where the repository refuses that write (read-only
//! credentials, a bucket policy), the restore warns and goes on without it.

pub mod combine;
pub mod continuity;
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
pub use recover::{restore, RestoreOptions, RestoreReport, StartOptions, WalFetchCommand};
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
    /// `--force` never replaces the directory of a running server.
    #[error(
        "target directory {dir} is in use: its postmaster.pid names pid {pid}, which is running; stop that \
         server first (--force replaces only a directory no running server uses)"
    )]
    TargetInUse { dir: PathBuf, pid: i32 },
    #[error(
        "target directory {dir}: cannot tell whether a server is using it ({what}); if no PostgreSQL server runs \
         there, remove {dir}/postmaster.pid"
    )]
    PidFileUnclear { dir: PathBuf, what: String },
    /// A manifest path a restore must not write (a damaged or tampered manifest): checked for
    /// the whole backup before anything is written.
    #[error("refusing to restore backup {backup}: its manifest entry {path:?} {reason}; nothing was restored")]
    UnsafePath { backup: String, path: String, reason: materialize::Unconfined },
    #[error("cannot restore {file}: {cause}")]
    Block { file: String, cause: Box<RepositoryError> },
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("PostgreSQL: {0}")]
    Server(String),
    #[error("{0}")]
    Other(String),
}
