//! Keys, in three levels, so that a key can be rotated and retired although objects are immutable.
//!
//! - **Master keys** (key-encryption keys) come from key sources ([`master`]: a 0600 key file, an
//!   environment variable, a command such as a secret manager's CLI, or an AWS KMS key) and are
//!   never stored in the repository.
//! - **Repository keys** are random keys stored in the repository only wrapped by master keys,
//!   one small record per pair under `keys/wraps/` ([`record`]). Rewrapping rewrites those
//!   records, never the objects.
//! - **Data keys**, one per object, are wrapped by a repository key and kept in the object's
//!   header ([`set`], used by [`crate::seal`]).
//!
//! [`KeyRing`] ties them together: it finds the repository key that seals new objects and the one
//! an object names, unwraps them with a master key and keeps them for a bounded time ([`ring`]).
//! It does not read or write objects other than the key records; the operator's `keys` commands
//! (`list`, `rotate`, `rewrap`, `retire`) are [`admin`]'s.

pub mod admin;
pub mod kms;
pub mod master;
pub mod record;
pub mod ring;
pub mod set;

pub use master::{KeySources, MasterKey, MasterKeys, MasterSource};
pub use ring::KeyRing;
pub use set::{DataKey, KeySet, WrappingKey, WRAPPED_KEY_LEN};

use std::path::PathBuf;

/// Why a key could not be read, created, found or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or writing the key file failed (also: the path is a directory).
    #[error("key file {path}: {cause}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying I/O error.
        cause: std::io::Error,
    },
    /// The key file's mode gives group or others some access: it is refused rather than used,
    /// since whoever reads it can open every object of the repository.
    #[error("key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits (`& 0o777`).
        mode: u32,
    },
    /// A line that is neither blank, a `#` comment nor a valid key line, or a key id used twice.
    #[error("{origin}, line {line}: {what}")]
    Malformed {
        /// Where the text came from (`key file /etc/pitr/key`, `key_env PITR_KEY`, …).
        origin: String,
        /// The offending line, counted from 1.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
    /// A key source holds no key line at all (only blanks and comments).
    #[error("{origin} holds no key")]
    Empty {
        /// The source.
        origin: String,
    },
    /// A new key file was to be created where a file exists; an existing key file is never
    /// overwritten.
    #[error("key file {path} already exists")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The object's header names a key that pitr cannot find: not a repository key with a wrap
    /// under a configured master key, nor a configured master key (objects written before
    /// repository keys existed name their master key directly).
    #[error("object {object} is sealed with key {key_id:?}, which {searched}: wrong keys for this repository, or a master key missing from the configured sources?")]
    UnknownKey {
        /// The object being opened.
        object: String,
        /// The key id its header names.
        key_id: String,
        /// What was searched, for the message.
        searched: String,
    },
    /// A wrap failed to authenticate: the key under that id is a different key, or the object
    /// (or key record) was modified or renamed (its name is bound into the wrap).
    #[error("{what} does not unwrap with key {key_id:?} from {origin}: wrong key, or it was tampered with")]
    Unwrap {
        /// What was being unwrapped (`data key of object …`, `repository key r… in keys/wraps/…`).
        what: String,
        /// The key id used.
        key_id: String,
        /// Where that key came from.
        origin: String,
    },
    /// The object names a master key that `pitr keys retire` retired: nothing legitimate is
    /// sealed with it any more, so the object was planted with a leaked key, or missed by rewrap.
    #[error("object {object} is sealed with key {key_id:?}, which was retired at {retired_at} (keys/retired/{key_id}): planted with the old key, or an object rewrap missed")]
    Retired {
        /// The object being opened.
        object: String,
        /// The retired key's id.
        key_id: String,
        /// When it was retired (RFC 3339).
        retired_at: String,
    },
    /// A key source or a key record could not be reached or read (a command failed, KMS did not
    /// answer or refused, the storage failed): transient as far as the objects are concerned.
    #[error("{source_name}: {operation} failed: {cause}")]
    Access {
        /// The key source or record (`key_command /usr/bin/vault`, `KMS key alias/pitr at …`).
        source_name: String,
        /// What was being done (`decrypt`, `generate`, `run`, `read`, …).
        operation: &'static str,
        /// Why it failed.
        cause: String,
    },
    /// A record under `keys/` that is not a valid record of its kind.
    #[error("key record {name}: {what}")]
    BadRecord {
        /// The record's name.
        name: String,
        /// What is wrong with it.
        what: String,
    },
    /// A configuration or an operation that cannot be done as asked (no source configured,
    /// `active_key` naming no key, retiring a key that is still needed…).
    #[error("{0}")]
    Refused(String),
}

impl KeyError {
    /// Whether this is a failure to reach a key source or the key records (retry later), rather
    /// than an object or key that is wrong.
    pub fn is_access(&self) -> bool {
        matches!(self, KeyError::Access { .. })
    }

    /// An [`KeyError::Access`], counted in `pitr_key_access_errors_total{operation=label}`
    /// (`generate`, `encrypt`, `decrypt` for KMS; `key-command`, `key-env`; `key-records` for
    /// the records under `keys/`).
    pub(crate) fn access(
        label: &'static str,
        source_name: impl Into<String>,
        operation: &'static str,
        cause: impl ToString,
    ) -> KeyError {
        metrics::counter!("pitr_key_access_errors_total", "operation" => label).increment(1);
        KeyError::Access { source_name: source_name.into(), operation, cause: cause.to_string() }
    }
}
