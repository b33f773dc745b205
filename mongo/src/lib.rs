//! pitr-mongo: everything pitr does with MongoDB.
//!
//! Owns the oplog tailer ([`tailer`]: a tailable-await cursor on `local.oplog.rs` from the
//! archive's last `ts`, entries stored unchanged as raw BSON in sealed slices, holes recorded as
//! gaps when the oplog rolled past the archive), snapshots ([`snapshot`]: every non-system
//! collection's documents as raw BSON in deduplicated blocks, index definitions and options, the
//! oplog `ts` before and after, a manifest written last), restore ([`restore`]: newest snapshot
//! before the target, then the oplog up to the target), the translation of oplog entries into
//! ordinary writes ([`apply`], pure), the object names in terms of [`Ts`] and the catalog built
//! by listing them ([`layout`]), oplog timestamps ([`ts`]), the archive check ([`verify`]) and
//! MongoDB's steps of a restore drill ([`drill`]).
//!
//! It does not own the object names themselves (`pitr_archive::names::mongo`), the formatting
//! and parsing of wall-clock times (`pitr_archive::time`), nor the drill's skeleton, judgement
//! and report (`pitr_drill`, whose skeleton runs [`drill`]'s steps). It reads and writes the
//! repository only through `pitr_archive::Repository`; the object format stays in pitr-archive.
//! Tested against SecantusDB (a MongoDB-compatible server), not mongod.

#![deny(missing_docs)]

pub mod apply;
pub mod drill;
pub mod layout;
pub mod restore;
pub mod snapshot;
pub mod tailer;
pub mod ts;
pub mod verify;

use std::time::Duration;

use bson::{doc, Bson, Document};
use mongodb::options::ClientOptions;
use mongodb::Client;
use pitr_archive::RepositoryError;

pub use layout::{MongoCatalog, MongoLayout, SnapshotManifest};
pub use ts::Ts;

/// Why a MongoDB operation of pitr failed. URIs in it are always redacted ([`redact`]).
#[derive(Debug, thiserror::Error)]
pub enum MongoError {
    /// The connection string does not parse.
    #[error("MongoDB URI {uri}: {why}")]
    BadUri {
        /// The URI, password redacted.
        uri: String,
        /// The driver's reason.
        why: String,
    },
    /// The server could not be reached, or did not answer `hello`, within the timeout.
    #[error("cannot reach MongoDB at {uri}: {source}")]
    Connect {
        /// The URI, password redacted.
        uri: String,
        /// The driver's error.
        source: Box<mongodb::error::Error>,
    },
    /// The server is standalone: it has no oplog to tail or replay from.
    #[error("MongoDB at {uri} is not a replica-set member (`hello` names no set), so it has no oplog; pitr needs a replica set (a one-member set is enough: start the server with --replSet and run rs.initiate())")]
    NotReplicaSet {
        /// The URI, password redacted.
        uri: String,
    },
    /// A command on a connected server failed.
    #[error("MongoDB at {uri}: {what}: {source}")]
    Server {
        /// The URI, password redacted.
        uri: String,
        /// What pitr was doing, e.g. "reading local.oplog.rs".
        what: String,
        /// The driver's error.
        source: Box<mongodb::error::Error>,
    },
    /// Reading or writing the repository failed.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// An oplog entry could not be turned into a write ([`apply::translate`]).
    #[error(transparent)]
    Translate(#[from] apply::TranslateError),
    /// An object read back (a slice, a snapshot manifest or block), or an answer of the server,
    /// is not what pitr wrote or expects.
    #[error("object {object}: {what}")]
    Corrupt {
        /// The object's name (or what was being read).
        object: String,
        /// What is wrong with it.
        what: String,
    },
    /// A restore would write into a server that already holds user data, and `--drop` was not
    /// given.
    #[error("restore target {uri} is not empty (it holds {namespaces}); pass --drop to drop its databases first")]
    TargetNotEmpty {
        /// The target server's URI, password redacted.
        uri: String,
        /// The namespaces found there, comma-separated (possibly shortened).
        namespaces: String,
    },
    /// No snapshot and unbroken run of oplog slices reach the requested target.
    #[error("target {target} is outside the recoverable MongoDB window ({windows})")]
    OutsideWindow {
        /// The requested target, as given.
        target: String,
        /// The windows the archive can restore to, described for the message.
        windows: String,
    },
    /// `name` is not configured and the repository holds MongoDB objects under more than one.
    #[error("repository holds MongoDB data of several names ({names}); set `name` in [mongo]")]
    AmbiguousName {
        /// The names found, comma-separated.
        names: String,
    },
    /// The repository holds no MongoDB objects (of the name asked for) at all.
    #[error("the repository holds no MongoDB data{which} yet (run `pitr stream` and `pitr backup --source mongo`)")]
    Nothing {
        /// Inserted after "MongoDB data" to say which data is missing, with its leading space
        /// (empty: none at all).
        which: String,
    },
}

/// The URI with any password replaced, for messages.
pub fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let userinfo = &uri[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &uri[..s + 3], &uri[at..])
        }
        _ => uri.to_string(),
    }
}

/// A connected client and what `hello` said.
pub struct Connected {
    /// The driver's client, already past server selection.
    pub client: Client,
    /// The URI with the password redacted ([`redact`]), for messages.
    pub uri: String,
    /// The replica set's name from `hello` (`setName`); `None` for a standalone server.
    pub set_name: Option<String>,
}

/// Connects and runs `hello`, so that an unreachable server fails here within `timeout`.
pub async fn connect(uri: &str, timeout: Duration) -> Result<Connected, MongoError> {
    let shown = redact(uri);
    let mut opts = ClientOptions::parse(uri)
        .await
        .map_err(|e| MongoError::BadUri { uri: shown.clone(), why: e.kind.to_string() })?;
    opts.server_selection_timeout.get_or_insert(timeout);
    opts.connect_timeout.get_or_insert(timeout);
    opts.app_name.get_or_insert_with(|| "pitr".into());
    let client =
        Client::with_options(opts).map_err(|e| MongoError::Connect { uri: shown.clone(), source: Box::new(e) })?;
    let hello = client
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .map_err(|e| MongoError::Connect { uri: shown.clone(), source: Box::new(e) })?;
    let set_name = hello.get_str("setName").ok().map(str::to_string);
    Ok(Connected { client, uri: shown, set_name })
}

impl Connected {
    /// Fails unless the server is a replica-set member (it has an oplog).
    pub fn require_replica_set(&self) -> Result<&str, MongoError> {
        self.set_name.as_deref().ok_or_else(|| MongoError::NotReplicaSet { uri: self.uri.clone() })
    }

    /// Wraps a driver error of a command on this server as [`MongoError::Server`], `what` saying
    /// what pitr was doing; for `map_err`.
    pub fn server_err(&self, what: impl Into<String>) -> impl FnOnce(mongodb::error::Error) -> MongoError + '_ {
        let what = what.into();
        move |source| MongoError::Server { uri: self.uri.clone(), what, source: Box::new(source) }
    }

    /// The server's clock (`hello`'s `localTime`), or this host's where the server does not
    /// report it: completeness marks are compared with oplog wall times, which are the server's.
    pub async fn server_time_us(&self) -> Result<i64, MongoError> {
        let hello = self
            .client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(self.server_err("reading the server's clock (hello)"))?;
        Ok(match hello.get_datetime("localTime") {
            Ok(t) => t.timestamp_millis() * 1000,
            Err(_) => pitr_archive::now_us(),
        })
    }

    /// The oldest (`newest = false`) or newest entry of the oplog: its `ts` and wall time (µs
    /// since the epoch, where the entry has one); `None` when the oplog is empty.
    pub async fn oplog_edge(&self, newest: bool) -> Result<Option<(Ts, Option<i64>)>, MongoError> {
        let oplog = self.client.database("local").collection::<Document>("oplog.rs");
        let found = oplog
            .find_one(doc! {})
            .sort(doc! { "$natural": if newest { -1 } else { 1 } })
            .projection(doc! { "ts": 1, "wall": 1 })
            .await
            .map_err(self.server_err("reading local.oplog.rs"))?;
        Ok(found.and_then(|d| match d.get("ts") {
            Some(Bson::Timestamp(t)) => {
                Some((Ts::from_bson(*t), d.get_datetime("wall").ok().map(|w| w.timestamp_millis() * 1000)))
            }
            _ => None,
        }))
    }
}

/// Which name the repository keeps this replica set's objects under: `configured`, else the one
/// name there is.
pub async fn resolve_name(
    repo: &pitr_archive::Repository,
    configured: Option<&str>,
) -> Result<MongoLayout, MongoError> {
    if let Some(n) = configured {
        return Ok(MongoLayout::new(n));
    }
    let names = layout::names(repo).await?;
    match names.as_slice() {
        [one] => Ok(MongoLayout::new(one)),
        [] => Err(MongoError::Nothing { which: String::new() }),
        many => Err(MongoError::AmbiguousName { names: many.join(", ") }),
    }
}

/// Server error codes restore tolerates when replaying over a snapshot that already reflects an
/// operation.
pub(crate) fn code_of(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_do_not_reach_messages() {
        assert_eq!(super::redact("mongodb://u:secret@h:1/?replicaSet=rs"), "mongodb://u:***@h:1/?replicaSet=rs");
        assert_eq!(super::redact("mongodb://h:1"), "mongodb://h:1");
    }
}
