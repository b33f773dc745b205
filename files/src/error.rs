use std::path::PathBuf;

use pitr_archive::RepositoryError;

/// What went wrong in a file-tree backup, a dump or reading one back.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Reading or writing the repository failed (its key, a block, a manifest).
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// A local file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A block read back is not what its manifest says: the repository is damaged.
    #[error("block {id}: {what}")]
    BadBlock {
        /// The block id.
        id: String,
        /// What is wrong with it.
        what: String,
    },
    /// `pg_dump` or `pg_restore` could not be run or failed; `what` ends with the end of its stderr.
    #[error("{program}: {what}")]
    Program {
        /// The program.
        program: String,
        /// What happened.
        what: String,
    },
    /// Connecting to a database or a query failed (`server`: the conninfo without its password).
    #[error("database {server}: {cause}")]
    Database {
        /// The conninfo, redacted.
        server: String,
        /// Why (in the message itself, not a `source`: said once).
        cause: pitr_pgwire::PgError,
    },
    /// The run's marker went unrenewed so long that an expire may have swept blocks it reuses:
    /// its manifest was not stored.
    #[error(transparent)]
    MarkerStale(#[from] pitr_archive::running::MarkerStale),
    /// Anything else, said in full.
    #[error("{0}")]
    Other(String),
}

impl FilesError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> FilesError {
        FilesError::Io { path: path.into(), source }
    }
}
