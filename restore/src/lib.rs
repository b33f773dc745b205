//! pitr-restore: reading a PostgreSQL archive back.
//!
//! Owns restore planning ([`plan`]: the restorable ranges per timeline, the backup to start
//! from and its chain), WAL continuity along a timeline path ([`continuity`]: a hole is named
//! before anything is written), recovery targets as the command line gives them ([`target`]),
//! writing a backup into a directory ([`materialize`]), combining incremental chains into full
//! files ([`combine`]), the rule for which PostgreSQL binaries run a restored cluster
//! ([`pg_bin`]: those of the major version the archive recorded), recovery settings, running
//! the server to the target and measuring what was achieved ([`recover`]), `wal-fetch`
//! ([`walfetch`]), which PostgreSQL calls as its restore_command, the archive check of
//! `pitr verify` ([`verify`]), PostgreSQL's steps of a restore drill ([`drill`]: a scratch
//! server, its checks), and one table copied from a scratch server at a moment into a running
//! database ([`table`]), which the weekly partial-restore drill uses to restore a random table and
//! prove the copy equal ([`partial`]).
//!
//! It does not own the drill's skeleton, judgement and report (`pitr_drill`, whose skeleton
//! runs [`drill`]'s steps), object names (`pitr_archive::names`), the formatting and parsing of
//! times (`pitr_archive::time`, re-exported by [`target`]), nor the WAL, timeline-history and
//! incremental-file formats it decodes (`pitr_pgformat`). It never speaks the replication
//! protocol: the servers it talks to are the one it restored (over `tokio_postgres`) and the
//! database a table is copied into ([`table`]: SQL over `pitr_pgwire`'s client, for its TLS).
//!
//! It writes nothing to the archive but the running marker a restore or drill holds so that
//! `pitr expire` keeps what it reads ([`recover`], [`pitr_archive::running`]); where the
//! repository refuses that write (read-only credentials, a bucket policy), the restore warns and
//! goes on without it.

#![deny(missing_docs)]

pub mod combine;
/// Moved to `pitr-archive` (base backups check their own WAL with it too); re-exported here for
/// restore's callers.
pub use pitr_archive::continuity;
pub mod delta;
pub mod drill;
pub mod find;
pub mod materialize;
pub mod partial;
pub mod pg_bin;
pub mod plan;
pub mod recover;
pub mod table;
pub mod target;
pub mod verify;
pub mod walfetch;

use std::path::PathBuf;

use pitr_archive::RepositoryError;

pub use materialize::{MappedTablespace, MappedTablespaces};
pub use plan::{Catalog, Window};
pub use recover::{restore, RestoreOptions, RestoreReport, StandbyOptions, StartOptions, WalFetchCommand};
pub use target::{format_time, parse_target, RecoveryTarget};
pub use walfetch::{wal_fetch, FetchError, Fetched};

/// Why a PostgreSQL restore, drill or archive check failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A repository operation failed.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// The target is not restorable: no backup and unbroken WAL reach it. The text names the
    /// target and the restorable ranges.
    #[error("cannot restore: {0}")]
    OutsideWindow(String),
    /// The target directory holds files and `--force` was not given.
    #[error("target directory {0} is not empty (pass --force to replace its contents)")]
    TargetNotEmpty(PathBuf),
    /// `--force` never replaces the directory of a running server.
    #[error(
        "target directory {dir} is in use: its postmaster.pid names pid {pid}, which is running (or, where \
         that pid is not visible from here, still has processes attached to its shared memory); stop that \
         server first (--force replaces only a directory no running server uses). If no server runs on that \
         directory any more (on any host or container sharing it), the file is stale: remove its \
         postmaster.pid and run again"
    )]
    TargetInUse {
        /// The target directory.
        dir: PathBuf,
        /// The pid its `postmaster.pid` names.
        pid: i32,
    },
    /// The target's `postmaster.pid` cannot be read as a pid: a server may be starting there.
    #[error(
        "target directory {dir}: cannot tell whether a server is using it ({what}); if no PostgreSQL server runs \
         there, remove {dir}/postmaster.pid"
    )]
    PidFileUnclear {
        /// The target directory.
        dir: PathBuf,
        /// What is wrong with the pid file.
        what: String,
    },
    /// A manifest path a restore must not write (a damaged or tampered manifest): checked for
    /// the whole backup before anything is written.
    #[error("refusing to restore backup {backup}: its manifest entry {path:?} {reason}; nothing was restored")]
    UnsafePath {
        /// The backup whose manifest it is.
        backup: String,
        /// The path as the manifest gives it.
        path: String,
        /// Why it may not be written.
        reason: materialize::Unconfined,
    },
    /// A block of a file could not be fetched or opened.
    #[error("cannot restore {file}: {cause}")]
    Block {
        /// The file (its path in the backup) the block belongs to.
        file: String,
        /// The repository's error.
        cause: Box<RepositoryError>,
    },
    /// The restore target's file system is full. The partial restore is removed (it was
    /// written beside the target and only renamed into place once complete).
    #[error(
        "no space left on device writing {path}: the restore target's file system is full; the partial restore \
         is removed and the target left as it was: free space there or choose another --target-dir"
    )]
    NoSpace {
        /// The file (or directory) being written.
        path: PathBuf,
    },
    /// A local file system operation failed.
    #[error("{path}: {cause}")]
    Io {
        /// The path operated on.
        path: PathBuf,
        /// The operating system's error.
        cause: std::io::Error,
    },
    /// Running the restored server failed: `pg_ctl` could not run, the server did not start, or
    /// it stopped during recovery (the text carries the end of its log).
    #[error("PostgreSQL: {0}")]
    Server(String),
    /// `--tablespace-map` names an OID the backup has no tablespace of.
    #[error("backup {backup} has no tablespace with OID {oid} (its tablespaces: {known}); nothing was restored")]
    UnknownTablespace {
        /// The OID asked for.
        oid: u32,
        /// The backup restored.
        backup: String,
        /// The backup's tablespace OIDs, with their locations on the server.
        known: String,
    },
    /// A `--tablespace-map` directory that may not be restored into.
    #[error("tablespace directory {dir}: {why}; nothing was restored")]
    TablespaceDir {
        /// The directory as given.
        dir: PathBuf,
        /// Why not.
        why: String,
    },
    /// A standby follows the archive with no end: a recovery target makes no sense for it.
    #[error(
        "a standby (--standby) replays the archive to its end and keeps following it: it takes no recovery \
         target ({0}); leave --to out or give --to latest"
    )]
    StandbyTarget(String),
    /// A value that postgresql.auto.conf cannot hold (checked before anything is written).
    #[error("cannot write {setting} into postgresql.auto.conf: its value {why}, which PostgreSQL refuses; nothing was restored")]
    SettingValue {
        /// The setting.
        setting: &'static str,
        /// What in its value is refused.
        why: String,
    },
    /// The target directory could not be put in place after mapped tablespace directories
    /// already were.
    #[error(
        "{cause}; the tablespace directories {replaced} were already restored, the target directory was not: \
         restore again (with --force) once the cause is fixed"
    )]
    TargetAfterTablespaces {
        /// Why the target could not be put in place.
        cause: Box<RestoreError>,
        /// The `--tablespace-map` directories already holding the restored tablespaces.
        replaced: String,
    },
    /// `--delta` may not change this directory (checked before anything in it changes).
    #[error("cannot restore --delta into {dir}: {why}; nothing was changed")]
    DeltaRefused {
        /// The target directory.
        dir: PathBuf,
        /// Why not.
        why: String,
    },
    /// A delta restore stopped after it began changing the directory.
    #[error(
        "{cause}; the delta restore into {dir} is incomplete: PostgreSQL will not start there (its \
         global/pg_control comes back last), and running the same pitr restore --delta again completes it"
    )]
    DeltaIncomplete {
        /// The target directory.
        dir: PathBuf,
        /// Why it stopped.
        cause: Box<RestoreError>,
    },
    /// A restore to a name stopped elsewhere than the indexed restore point: at an earlier one of
    /// the name the index lacks (the restored server was stopped).
    #[error(transparent)]
    MissedRestorePoint(Box<recover::MissedRestorePoint>),
    /// Anything else: an inconsistent backup or chain, a failed worker task.
    #[error("{0}")]
    Other(String),
}
