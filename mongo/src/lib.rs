//! pitr-mongo: everything pitr does with MongoDB.
//!
//! Owns the oplog tailer ([`tailer`]: a tailable-await cursor on `local.oplog.rs` from the
//! archive's last `ts`, entries stored unchanged as raw BSON in sealed slices, holes recorded as
//! gaps when the oplog rolled past the archive), snapshots ([`snapshot`]: every non-system
//! collection's documents as raw BSON in deduplicated blocks, index definitions and options, the
//! oplog `ts` before and after, a manifest written last), restore ([`restore`]: newest snapshot
//! before the target, then the oplog up to the target; [`collection`]: one collection to a
//! moment, under a new name), the translation of oplog entries into ordinary writes ([`apply`],
//! pure), the object names in terms of [`Ts`] and the catalog built by listing them ([`layout`]),
//! oplog timestamps ([`ts`]), the archive check ([`verify`]) and MongoDB's steps of a restore
//! drill ([`drill`]).
//!
//! It does not own the object names themselves (`pitr_archive::names::mongo`), the formatting
//! and parsing of wall-clock times (`pitr_archive::time`), nor the drill's skeleton, judgement
//! and report (`pitr_drill`, whose skeleton runs [`drill`]'s steps). It reads and writes the
//! repository only through `pitr_archive::Repository`; the object format stays in pitr-archive.
//! Tested against SecantusDB (a MongoDB-compatible server), not mongod.

#![deny(missing_docs)]

pub mod apply;
pub mod collection;
pub mod drill;
pub mod find;
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
    /// The server stopped answering: no reply within the read timeout.
    #[error("MongoDB at {uri}: no answer to {what} within {} s (the server or the network stopped answering)", .after.as_secs_f64())]
    Timeout {
        /// The URI, password redacted.
        uri: String,
        /// What pitr was waiting for, e.g. "the oplog cursor's getMore".
        what: String,
        /// How long it waited.
        after: Duration,
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
    /// The snapshot met a collection it cannot restore exactly (a mongod time-series collection,
    /// stored JavaScript, a type it does not know): refused, rather than a snapshot without it.
    #[error("cannot snapshot {ns} on {uri}: {what}; pitr refuses the snapshot rather than take one that would quietly leave it out")]
    Unsupported {
        /// The server's URI, password redacted.
        uri: String,
        /// The collection, `db.name`.
        ns: String,
        /// What it is and why it cannot be restored.
        what: String,
    },
    /// `restore --drop` (or a drill) was pointed at the backed-up server itself.
    #[error("restore target {uri} is the backed-up server: {why}; --drop would drop its databases. Restore into another server")]
    TargetIsSource {
        /// The target's URI, password redacted.
        uri: String,
        /// Which identity matched.
        why: String,
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

/// The URI with every credential replaced by `***`, for messages and logs: the password of the
/// user information (`user:pass@`) and the values of query options that carry secrets
/// (`password=`, `tlsCertificateKeyFilePassword=`, anything named like a password, secret or
/// token, and the token-like parts of `authMechanismProperties`). It errs on the side of hiding:
/// a password with an unescaped `?` in it (which the driver refuses anyway) is still hidden.
pub fn redact(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://").map(|s| s + 3) else { return uri.to_string() };
    let (scheme, rest) = uri.split_at(scheme_end);
    let query_at = rest.find('?');
    let before_query = &rest[..query_at.unwrap_or(rest.len())];
    // Where the user information ends: the last `@` before the options, or, when the options'
    // first `@` comes before their first `=`, that one (the `?` was inside the password).
    let userinfo_end = before_query.rfind('@').or_else(|| {
        let q = query_at?;
        let query = &rest[q + 1..];
        let at = query.find('@')?;
        (query.find('=').is_none_or(|eq| at < eq)).then_some(q + 1 + at)
    });
    let (mut out, after_userinfo) = match userinfo_end {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            let shown = if rest[..at].contains(':') { format!("{user}:***") } else { user.to_string() };
            (format!("{scheme}{shown}"), &rest[at..])
        }
        None => (scheme.to_string(), rest),
    };
    match after_userinfo.find('?') {
        Some(q) => {
            out.push_str(&after_userinfo[..=q]);
            out.push_str(&redact_options(&after_userinfo[q + 1..]));
        }
        None => out.push_str(after_userinfo),
    }
    out
}

/// Whether a URI option's (or an `authMechanismProperties` entry's) name says it holds a secret.
fn names_a_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token"].iter().any(|s| k.contains(s))
}

/// `a=1&password=x;b=2` with the secrets' values replaced, separators kept.
fn redact_options(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    let mut pos = 0;
    for part in query.split(['&', ';']) {
        if pos > 0 {
            // The separator that preceded this part, as written.
            out.push(char::from(query.as_bytes()[pos - 1]));
        }
        pos += part.len() + 1;
        match part.split_once('=') {
            Some((key, _)) if names_a_secret(key) => {
                out.push_str(key);
                out.push_str("=***");
            }
            Some((key, value)) if key.eq_ignore_ascii_case("authMechanismProperties") => {
                out.push_str(key);
                out.push('=');
                let props: Vec<String> = value
                    .split(',')
                    .map(|p| match p.split_once(':') {
                        Some((k, _)) if names_a_secret(k) => format!("{k}:***"),
                        _ => p.to_string(),
                    })
                    .collect();
                out.push_str(&props.join(","));
            }
            _ => out.push_str(part),
        }
    }
    out
}

/// The largest wire message pitr lets a server send (48 MiB): the driver allocates a reply's
/// whole length at once, up to what the server advertises, so [`connect`] refuses a server that
/// advertises more.
pub const MAX_MESSAGE_BYTES: i64 = 48 << 20;

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
    // The driver sizes its read buffer for each reply by the reply's length header, which it
    // accepts up to what the server advertised here: a server advertising 2 GiB could make
    // every reply cost that much. mongod advertises 48 000 000.
    let max_message = match hello.get("maxMessageSizeBytes") {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(n)) => *n as i64,
        _ => 0,
    };
    if max_message > MAX_MESSAGE_BYTES {
        return Err(MongoError::Corrupt {
            object: format!("hello of {shown}"),
            what: format!(
                "the server advertises maxMessageSizeBytes = {max_message}, more than the {MAX_MESSAGE_BYTES} pitr \
                 accepts (mongod advertises 48000000)"
            ),
        });
    }
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

    /// The server's [`ServerIdentity`]. The replica set id is read where the server offers it
    /// and the user may read it; without it the process id still tells one server from another.
    pub async fn identity(&self) -> Result<ServerIdentity, MongoError> {
        let admin = self.client.database("admin");
        let hello = admin.run_command(doc! { "hello": 1 }).await.map_err(self.server_err("hello"))?;
        let process_id = hello.get_document("topologyVersion").ok().and_then(|t| t.get_object_id("processId").ok());
        let from_config =
            |d: &Document| d.get_document("settings").ok().and_then(|s| s.get_object_id("replicaSetId").ok());
        let mut replica_set_id = match admin.run_command(doc! { "replSetGetConfig": 1 }).await {
            Ok(reply) => reply.get_document("config").ok().and_then(from_config),
            Err(_) => None,
        };
        if replica_set_id.is_none() {
            let replset = self.client.database("local").collection::<Document>("system.replset");
            if let Ok(Some(d)) = replset.find_one(doc! {}).await {
                replica_set_id = from_config(&d);
            }
        }
        Ok(ServerIdentity { set_name: self.set_name.clone(), replica_set_id, process_id })
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

/// Who a server is, as far as it says: compared to tell whether two URIs reach the same server
/// or replica set, whatever host names or addresses they use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerIdentity {
    /// `hello.setName`.
    pub set_name: Option<String>,
    /// The replica set's id, made when the set was initiated and shared by every member:
    /// `replSetGetConfig`'s `config.settings.replicaSetId`, else that of the
    /// `local.system.replset` document. mongod has it; SecantusDB has neither source.
    pub replica_set_id: Option<bson::oid::ObjectId>,
    /// `hello.topologyVersion.processId`: made anew each time a server process starts, so two
    /// connections that report the same one reach the same process. mongod (4.4+) and
    /// SecantusDB both report it, standalone or not.
    pub process_id: Option<bson::oid::ObjectId>,
}

impl ServerIdentity {
    /// Why `self` and `other` are the same server or replica set, if they are.
    pub fn same_as(&self, other: &ServerIdentity) -> Option<String> {
        if let (Some(a), Some(b)) = (self.replica_set_id, other.replica_set_id) {
            if a == b {
                return Some(format!(
                    "both are members of replica set {:?} (replicaSetId {a})",
                    self.set_name.as_deref().unwrap_or("?")
                ));
            }
        }
        if let (Some(a), Some(b)) = (self.process_id, other.process_id) {
            if a == b {
                return Some(format!("both addresses reach one server process (hello.topologyVersion.processId {a})"));
            }
        }
        None
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
    use super::{redact, ServerIdentity};
    use bson::oid::ObjectId;

    #[test]
    fn the_same_server_is_told_by_identity_not_by_name() {
        let (p1, p2, set) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        let secantus =
            |p| ServerIdentity { set_name: Some("secantus".into()), replica_set_id: None, process_id: Some(p) };
        // Two SecantusDB servers share the set name "secantus": not the same.
        assert_eq!(secantus(p1).same_as(&secantus(p2)), None);
        assert!(secantus(p1).same_as(&secantus(p1)).is_some_and(|w| w.contains("processId")));
        // Two members of one mongod replica set: different processes, one replica set id.
        let member =
            |p| ServerIdentity { set_name: Some("rs0".into()), replica_set_id: Some(set), process_id: Some(p) };
        assert!(member(p1).same_as(&member(p2)).is_some_and(|w| w.contains("replicaSetId")));
        let other = ServerIdentity { replica_set_id: Some(ObjectId::new()), ..member(p2) };
        assert_eq!(member(p1).same_as(&other), None);
        // Nothing known: nothing matched.
        assert_eq!(ServerIdentity::default().same_as(&ServerIdentity::default()), None);
    }

    #[test]
    fn passwords_do_not_reach_messages() {
        assert_eq!(redact("mongodb://u:secret@h:1/?replicaSet=rs"), "mongodb://u:***@h:1/?replicaSet=rs");
        assert_eq!(redact("mongodb://h:1"), "mongodb://h:1");
        assert_eq!(redact("mongodb://u@h:1/"), "mongodb://u@h:1/");
        assert_eq!(redact("mongodb://u:p@ss@h1:1,h2:2/db"), "mongodb://u:***@h1:1,h2:2/db");
    }

    #[test]
    fn secrets_in_options_do_not_reach_messages() {
        let cases = [
            (
                "mongodb://h/?authMechanism=PLAIN&password=hunter2&replicaSet=rs",
                "mongodb://h/?authMechanism=PLAIN&password=***&replicaSet=rs",
            ),
            (
                "mongodb://u:pw@h/?tls=true;tlsCertificateKeyFilePassword=hunter2",
                "mongodb://u:***@h/?tls=true;tlsCertificateKeyFilePassword=***",
            ),
            ("mongodb://h/?sslPEMKeyPassword=hunter2", "mongodb://h/?sslPEMKeyPassword=***"),
            (
                "mongodb://h/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:hunter2,SERVICE_NAME:x",
                "mongodb://h/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:***,SERVICE_NAME:x",
            ),
            // An `@` in an option value is not user information.
            ("mongodb://h/?appName=a@b&password=hunter2", "mongodb://h/?appName=a@b&password=***"),
            // A `?` left unescaped in the password still hides it.
            ("mongodb://u:hun?ter2@h/?replicaSet=rs", "mongodb://u:***@h/?replicaSet=rs"),
        ];
        for (uri, want) in cases {
            let got = redact(uri);
            assert_eq!(got, want, "{uri}");
            assert!(!got.contains("hunter2") && !got.contains("ter2"), "{got}");
        }
    }
}
