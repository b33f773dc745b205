//! The repository: a store plus the keys to open it, the one way the rest of pitr reads and writes
//! objects, and the record of each PostgreSQL cluster it holds ([`ClusterInfo`]).
//!
//! Object storage is the only shared state, so everything is derived from names (built in
//! [`crate::names`]); nothing is kept in an index that could disagree with the objects.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use crate::keys::{KeyError, KeyRing};
use crate::names::{self, MARKER};
use crate::seal::{self, ObjectKind, ObjectMeta, SealError, SealedHeader};
use crate::store::{ObjectInfo, PutOutcome, Store, StoreError};

/// The repository format this pitr writes, and the newest it reads. A change that an older pitr
/// would misread — objects it would not see, so that its restore ends early without saying so —
/// raises it, and from then on older pitr refuse the repository instead. (pitr before this check
/// read any marker: chunk logs came without a raise, see docs/archive-format.md.)
pub const REPOSITORY_FORMAT: u32 = 1;
const MARKER_PREFIX: &str = "pitr repository format ";

fn marker_text() -> String {
    format!("{MARKER_PREFIX}{REPOSITORY_FORMAT}\n")
}

/// The format a marker's plaintext names, if it is a marker's text.
fn marker_format(plaintext: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(plaintext).ok()?;
    let digits = text.strip_prefix(MARKER_PREFIX)?.strip_suffix('\n')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// The storage failed (or the object is not there: [`StoreError::is_not_found`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object does not open: wrong key, tampered, swapped or truncated.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The keys could not be reached (a key source or KMS failed, the key records could not be
    /// read): nothing is wrong with the object; retry later.
    #[error(transparent)]
    KeyAccess(KeyError),
    /// No key to seal a new object with (no usable repository key under the active master key):
    /// a problem of the keys, not of any object under the name.
    #[error("cannot seal {name}: {cause}")]
    SealingKey {
        /// The object that was to be written.
        name: String,
        /// Why there is no key.
        cause: KeyError,
    },
    /// No repository marker: `pitr init` was never run here.
    #[error("{location} is not a pitr repository (no {MARKER} object); run `pitr init` first")]
    NotInitialised {
        /// The store's location.
        location: String,
    },
    /// The marker names a format newer than this pitr reads.
    #[error(
        "{location} is a pitr repository of format {format}, newer than this pitr reads (up to {supported}): \
         use a newer pitr (this one would not see everything the repository holds)"
    )]
    NewerFormat {
        /// The store's location.
        location: String,
        /// The format its marker names.
        format: u32,
        /// The newest this pitr reads ([`REPOSITORY_FORMAT`]).
        supported: u32,
    },
    /// A create-only put found different contents under the name.
    #[error(
        "object {name} in {location} already exists with different contents: is another pitr writing the same cluster?"
    )]
    Conflict {
        /// The object.
        name: String,
        /// The store's location.
        location: String,
    },
    /// The object opened but its contents are not what its kind holds.
    #[error("object {name}: {what}")]
    Invalid {
        /// The object.
        name: String,
        /// What is wrong with it.
        what: String,
    },
    /// No cluster was named and the repository holds several.
    #[error("repository {location} holds several PostgreSQL clusters ({ids}); set `system_id` in [postgres]")]
    AmbiguousCluster {
        /// The store's location.
        location: String,
        /// Their system ids, comma-separated.
        ids: String,
    },
    /// No cluster was named and the repository holds none.
    #[error("repository {location} holds no PostgreSQL cluster yet (nothing was streamed)")]
    NoCluster {
        /// The store's location.
        location: String,
    },
}

impl RepositoryError {
    /// Whether this is about the object itself (it does not open, or opens to something that is
    /// not what its kind holds), as opposed to the storage failing: what readers of objects that
    /// decide something (floors, markers, locks, lease generations, manifests) must not obey.
    pub fn is_bad_object(&self) -> bool {
        matches!(self, RepositoryError::Seal(_) | RepositoryError::Invalid { .. })
    }

    /// [`Self::is_bad_object`], or too big to be read as the record it should be
    /// ([`StoreError::TooLarge`]): an object a reader cannot trust, whatever storage is doing.
    pub fn is_untrusted_object(&self) -> bool {
        self.is_bad_object() || matches!(self, RepositoryError::Store(StoreError::TooLarge { .. }))
    }
}

/// What the repository records about one PostgreSQL cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    /// The system identifier (`IDENTIFY_SYSTEM`), which names the cluster in the repository.
    pub system_id: u64,
    /// WAL segment size in bytes (a power of two, at least 1 MiB).
    pub wal_segment_size: u64,
    /// WAL page size in bytes.
    pub wal_page_size: u64,
    /// The server version when the cluster was first recorded (`server_version_num`).
    pub server_version_num: u32,
}

impl ClusterInfo {
    fn to_text(&self) -> String {
        format!(
            "system_id={}\nwal_segment_size={}\nwal_page_size={}\nserver_version_num={}\n",
            self.system_id, self.wal_segment_size, self.wal_page_size, self.server_version_num
        )
    }

    fn from_text(name: &str, text: &str) -> Result<ClusterInfo, RepositoryError> {
        let invalid = |what: String| RepositoryError::Invalid { name: name.to_string(), what };
        let mut fields = BTreeMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=').ok_or_else(|| invalid(format!("bad line {line:?}")))?;
            let v: u64 = v.parse().map_err(|_| invalid(format!("bad value for {k}")))?;
            fields.insert(k.to_string(), v);
        }
        let get = |k: &str| fields.get(k).copied().ok_or_else(|| invalid(format!("missing {k}")));
        let info = ClusterInfo {
            system_id: get("system_id")?,
            wal_segment_size: get("wal_segment_size")?,
            wal_page_size: get("wal_page_size")?,
            server_version_num: get("server_version_num")? as u32,
        };
        if !info.wal_segment_size.is_power_of_two() || info.wal_segment_size < (1 << 20) {
            return Err(invalid(format!("wal_segment_size {} is not a power of two >= 1 MiB", info.wal_segment_size)));
        }
        Ok(info)
    }
}

/// The zstd level of WAL objects unless configured: level 1 compresses WAL about as well as 3
/// (WAL pages are mostly zeros and repeated tuples) for a fraction of the CPU, which a catch-up of
/// a large backlog is bound by.
pub const DEFAULT_WAL_ZSTD_LEVEL: i32 = 1;

/// The zstd level of WAL chunks, whatever the WAL level: a chunk lives only until its segment
/// is complete and compacted into one object (sealed at the WAL level), so what its compression
/// saves is a few hundred bytes of a write that is fdatasynced anyway, while its CPU is paid on
/// every synchronous commit's path. On pgbench's WAL in 3.5 KiB chunks, level -1 takes about
/// half of level 1's time (5.1 against 9.1 µs a chunk) for 24 % of the size instead of 21 %.
pub const WAL_CHUNK_ZSTD_LEVEL: i32 = -1;

/// A store plus the keys to open it: the one way the rest of pitr reads and writes objects.
///
/// Reads can fall back to other repositories holding copies of the same objects (secondaries):
/// an object that is missing or unreadable here — not found, a storage error, or failing
/// authentication — is read from the first of them that can supply it, with a warning naming the
/// object and both repositories. Listings and writes use this repository alone.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Arc<dyn Store>,
    keys: KeyRing,
    zstd_level: i32,
    /// The level for WAL chunks and segments: WAL is sealed as fast as it arrives, so its level
    /// trades size for the stream's CPU and catch-up speed.
    wal_zstd_level: i32,
    /// What messages call this repository (`primary`, or a secondary's name).
    name: String,
    fallbacks: Arc<Vec<NamedStore>>,
    /// Notes every put and delete of a journaled name (see [`crate::journal`]), when configured.
    journal: Option<Arc<crate::journal::Recorder>>,
}

/// A repository's store under its configured name.
#[derive(Debug, Clone)]
pub struct NamedStore {
    /// What messages call it (`primary`, or a secondary's name).
    pub name: String,
    /// The store.
    pub store: Arc<dyn Store>,
}

#[derive(Debug, Clone, Copy)]
enum Read {
    /// The whole object, if its stored size is at most this many bytes.
    Whole(u64),
    Header,
}

/// The most a whole read takes from the storage unless the caller asks for less: more than the
/// largest object pitr writes (a WAL segment of PostgreSQL's 1 GiB maximum, sealed:
/// incompressible data grows by a little zstd framing and 20 bytes a frame). A planted bigger
/// object is refused by its size, before any of it is read.
pub const OBJECT_READ_MAX: u64 = (1 << 30) + (1 << 30) / 64 + (1 << 20);
// It holds a sealed 1 GiB WAL segment of incompressible data: 1024 frames, each a few hundred
// bytes of zstd framing, length and tag over its MiB, and the header.
const _: () = assert!(OBJECT_READ_MAX >= (1 << 30) + 1024 * 1024 + seal::HEADER_PREFIX_LEN);

/// The most a whole read of a small record ([`Repository::get_record`]) takes: the marker, a
/// cluster record, the dedup key, a timeline history. Each is a few hundred bytes; the bound
/// leaves room for long histories.
pub const RECORD_READ_MAX: u64 = 16 << 20;

/// The most a sealed object holding `plaintext_len` bytes can take, whatever it compresses to.
fn sealed_len_bound(plaintext_len: usize) -> u64 {
    let p = plaintext_len as u64;
    p + p / 64 + seal::HEADER_PREFIX_LEN + (1 << 20)
}

/// A read object: its header, and its plaintext for a whole read (empty for a header read).
struct Opened {
    header: SealedHeader,
    plaintext: Vec<u8>,
}

async fn read_from(store: &Arc<dyn Store>, keys: &KeyRing, name: &str, what: Read) -> Result<Opened, RepositoryError> {
    match what {
        Read::Whole(limit) => {
            let bytes = store.get_limited(name, limit).await?;
            let set = opening_set(store, keys, name, &bytes).await?;
            let name = name.to_string();
            let (header, plaintext) = tokio::task::spawn_blocking(move || seal::open(&name, &bytes, &set))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
            Ok(Opened { header, plaintext })
        }
        Read::Header => {
            let bytes = store.get_range(name, 0..seal::HEADER_PREFIX_LEN).await?;
            let set = opening_set(store, keys, name, &bytes).await?;
            Ok(Opened { header: seal::open_header(name, &bytes, &set)?, plaintext: Vec::new() })
        }
    }
}

/// The key that opens `name`, whose first bytes are `bytes`: a key source that cannot be reached
/// is [`RepositoryError::KeyAccess`]; a key that is unknown, retired or does not unwrap makes the
/// object one that does not open ([`RepositoryError::Seal`]).
async fn opening_set(
    store: &Arc<dyn Store>,
    keys: &KeyRing,
    name: &str,
    bytes: &[u8],
) -> Result<crate::keys::KeySet, RepositoryError> {
    let key_id = seal::peek_key_id(name, bytes)?;
    keys.opening_set(store.as_ref(), name, &key_id).await.map_err(key_error)
}

fn key_error(e: KeyError) -> RepositoryError {
    if e.is_access() {
        RepositoryError::KeyAccess(e)
    } else {
        RepositoryError::Seal(SealError::Key(e))
    }
}

fn is_not_found(e: &RepositoryError) -> bool {
    matches!(e, RepositoryError::Store(s) if s.is_not_found())
}

/// The error to report when no repository could supply an object: a damaged object says more
/// than "not found", and "not found" (the object is in none of them that answered) more than an
/// unreachable repository.
fn most_telling(errors: Vec<RepositoryError>) -> RepositoryError {
    let position = errors
        .iter()
        .position(|e| matches!(e, RepositoryError::Seal(_)))
        .or_else(|| errors.iter().position(is_not_found))
        .unwrap_or(0);
    errors
        .into_iter()
        .nth(position)
        .unwrap_or(RepositoryError::Invalid { name: String::new(), what: "no repository to read from".into() })
}

/// Objects up to this size are sealed on the calling task rather than on the blocking pool.
const SEAL_INLINE_MAX: usize = 128 << 10;

impl Repository {
    /// The repository in `store`, opened with `keys`, named `primary`, without fallbacks.
    pub fn new(store: Arc<dyn Store>, keys: KeyRing) -> Repository {
        Repository {
            store,
            keys,
            zstd_level: 3,
            wal_zstd_level: DEFAULT_WAL_ZSTD_LEVEL,
            name: "primary".into(),
            fallbacks: Arc::new(Vec::new()),
            journal: None,
        }
    }

    /// Notes every put and delete of a journaled name into `recorder`: puts once stored, deletes
    /// as a written batch before the object goes (see [`crate::journal`]).
    pub fn with_journal(mut self, recorder: Arc<crate::journal::Recorder>) -> Repository {
        self.journal = Some(recorder);
        self
    }

    /// The journal recorder this repository notes into, if any.
    pub fn journal(&self) -> Option<&Arc<crate::journal::Recorder>> {
        self.journal.as_ref()
    }

    /// Before deleting `names`: journals the journaled ones as deleted, in a written batch, so
    /// the chain never claims an object the repository no longer holds.
    async fn journal_deletes(&self, names: &[String]) -> Result<(), RepositoryError> {
        let Some(journal) = &self.journal else { return Ok(()) };
        // Not again what a written batch already says is deleted (a retry one at a time).
        let journaled: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| crate::journal::is_journaled(n) && !journal.delete_written(n))
            .collect();
        if journaled.is_empty() {
            return Ok(());
        }
        journal.note_deletes(journaled.iter().copied());
        if let Err(e) = journal.flush(self).await {
            // The delete does not happen: a later batch must not call these objects deleted.
            journal.forget_deletes(&journaled);
            return Err(e);
        }
        Ok(())
    }

    /// Journals `names` as deleted in one written batch ahead of deleting them one at a time
    /// (expire's manifests, children first): each later [`Repository::delete`] of one of them
    /// then writes no batch of its own. A name not deleted after all (refused, a stop) stays
    /// present while the journal says deleted: `pitr verify` notes it, the next expire retries.
    pub async fn announce_deletes(&self, names: &[String]) -> Result<(), RepositoryError> {
        self.journal_deletes(names).await
    }

    /// Names this repository `name` and reads from `fallbacks`, in order, what it cannot supply.
    pub fn with_fallbacks(mut self, name: impl Into<String>, fallbacks: Vec<NamedStore>) -> Repository {
        self.name = name.into();
        self.fallbacks = Arc::new(fallbacks);
        self
    }

    async fn read(&self, name: &str, what: Read) -> Result<Opened, RepositoryError> {
        let first = match read_from(&self.store, &self.keys, name, what).await {
            Ok(opened) => return Ok(opened),
            Err(e) if self.fallbacks.is_empty() => return Err(e),
            Err(e) => e,
        };
        if !is_not_found(&first) {
            tracing::warn!(object = name, repository = %self.name, location = %self.location(), error = %first,
                "object unreadable; trying the other repositories");
        }
        let mut errors = vec![first];
        for other in self.fallbacks.iter() {
            match read_from(&other.store, &self.keys, name, what).await {
                Ok(opened) => {
                    tracing::warn!(object = name, repository = %other.name, location = %other.store.location(),
                        instead_of = %self.name, why = %errors[0], "object read from another repository");
                    return Ok(opened);
                }
                Err(e) => {
                    if !is_not_found(&e) {
                        tracing::warn!(object = name, repository = %other.name, location = %other.store.location(),
                            error = %e, "object unreadable in this repository too");
                    }
                    errors.push(e);
                }
            }
        }
        Err(most_telling(errors))
    }

    /// The repositories reads fall back to, in order (secondaries holding copies).
    pub fn fallbacks(&self) -> &[NamedStore] {
        &self.fallbacks
    }

    /// What messages call this repository (`primary`, or a secondary's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compresses what it seals at zstd `level` (3 by default).
    pub fn with_zstd_level(mut self, level: i32) -> Repository {
        self.zstd_level = level;
        self
    }

    /// Seals new WAL segments at zstd `level` (default [`DEFAULT_WAL_ZSTD_LEVEL`]); chunks at
    /// [`WAL_CHUNK_ZSTD_LEVEL`] unless `level` is lower.
    pub fn with_wal_zstd_level(mut self, level: i32) -> Repository {
        self.wal_zstd_level = level;
        self
    }

    /// The store this repository reads and writes.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The key ring this repository seals and opens with.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// Where the store is, for messages.
    pub fn location(&self) -> String {
        self.store.location()
    }

    /// Writes the marker if missing; if present, proves the key opens it (and that this pitr
    /// reads its format).
    pub async fn init(&self) -> Result<PutOutcome, RepositoryError> {
        match self.put_sealed(MARKER, marker_text().into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await {
            // Another format's marker: a newer one is refused as such.
            Err(conflict @ RepositoryError::Conflict { .. }) => {
                self.check().await?;
                Err(conflict)
            }
            outcome => outcome,
        }
    }

    /// Fails unless this is an initialised repository that the key ring opens, of a format this
    /// pitr reads.
    pub async fn check(&self) -> Result<(), RepositoryError> {
        let plaintext = match self.get_record(MARKER).await {
            Ok((_, plaintext)) => plaintext,
            Err(RepositoryError::Store(e)) if e.is_not_found() => {
                return Err(RepositoryError::NotInitialised { location: self.location() })
            }
            Err(e) => return Err(e),
        };
        match marker_format(&plaintext) {
            Some(format) if format <= REPOSITORY_FORMAT => Ok(()),
            Some(format) => {
                Err(RepositoryError::NewerFormat { location: self.location(), format, supported: REPOSITORY_FORMAT })
            }
            None => Err(RepositoryError::Invalid {
                name: MARKER.to_string(),
                what: format!(
                    "in {}: not a repository marker (it opens with this key but does not read \"{MARKER_PREFIX}<number>\")",
                    self.location()
                ),
            }),
        }
    }

    /// Seals and stores `plaintext` as `name`. If the name exists already (a retry after a crash),
    /// the existing object must hold the same plaintext; anything else is a conflict.
    ///
    /// `plaintext` is anything that becomes [`Bytes`] without a copy (a `Vec<u8>`, or `Bytes`
    /// shared with its caller, as a 16 MiB WAL segment that a retry may put again is).
    pub async fn put_sealed(
        &self,
        name: &str,
        plaintext: impl Into<Bytes>,
        meta: ObjectMeta,
    ) -> Result<PutOutcome, RepositoryError> {
        Ok(self.put_sealed_sized(name, plaintext, meta).await?.0)
    }

    /// As [`Repository::put_sealed`], also returning the size of the sealed object written (0 if
    /// it existed already).
    pub async fn put_sealed_sized(
        &self,
        name: &str,
        plaintext: impl Into<Bytes>,
        meta: ObjectMeta,
    ) -> Result<(PutOutcome, u64), RepositoryError> {
        let plaintext: Bytes = plaintext.into();
        let keys = self.keys.sealing_set(self.store.as_ref()).await.map_err(|e| match e {
            e if e.is_access() => RepositoryError::KeyAccess(e),
            cause => RepositoryError::SealingKey { name: name.to_string(), cause },
        })?;
        let level = match meta.kind {
            ObjectKind::WalChunk => WAL_CHUNK_ZSTD_LEVEL.min(self.wal_zstd_level),
            ObjectKind::WalSegment => self.wal_zstd_level,
            _ => self.zstd_level,
        };
        // The journal notes the hash of the stored bytes, computed where the sealing is (a 16 MiB
        // segment's hash is tens of ms: never on the async task).
        let journal = self.journal.as_ref().filter(|_| crate::journal::is_journaled(name));
        let hash = journal.is_some();
        let (sealed, plaintext, digest) = if plaintext.len() <= SEAL_INLINE_MAX {
            // Tens of microseconds: less than handing it to another thread and back, which a
            // small WAL chunk on the path of a synchronous commit would wait for.
            let sealed = seal::seal(name, &plaintext, &meta, &keys, level);
            let digest = hash.then(|| crate::journal::stored_digest(&sealed));
            (sealed, plaintext, digest)
        } else {
            let owned_name = name.to_string();
            tokio::task::spawn_blocking(move || {
                let sealed = seal::seal(&owned_name, &plaintext, &meta, &keys, level);
                let digest = hash.then(|| crate::journal::stored_digest(&sealed));
                (sealed, plaintext, digest)
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        };
        let sealed_len = sealed.len() as u64;
        match self.store.put_if_absent(name, Bytes::from(sealed)).await? {
            PutOutcome::Created => {
                if let (Some(journal), Some(digest)) = (journal, digest) {
                    journal.note_put(name, sealed_len, digest);
                }
                Ok((PutOutcome::Created, sealed_len))
            }
            PutOutcome::AlreadyExists => {
                // An object too big to hold our plaintext is someone else's: not read.
                let existing = match self.read(name, Read::Whole(sealed_len_bound(plaintext.len()))).await {
                    Ok(opened) => opened.plaintext,
                    Err(RepositoryError::Store(StoreError::TooLarge { .. })) => {
                        return Err(RepositoryError::Conflict { name: name.to_string(), location: self.location() })
                    }
                    Err(e) => return Err(e),
                };
                if existing[..] == plaintext[..] {
                    Ok((PutOutcome::AlreadyExists, 0))
                } else {
                    Err(RepositoryError::Conflict { name: name.to_string(), location: self.location() })
                }
            }
        }
    }

    /// Fetches, authenticates and decrypts `name` (from a fallback if this repository cannot).
    /// Objects over [`OBJECT_READ_MAX`] stored bytes are refused unread.
    pub async fn get_opened(&self, name: &str) -> Result<(SealedHeader, Vec<u8>), RepositoryError> {
        let opened = self.read(name, Read::Whole(OBJECT_READ_MAX)).await?;
        Ok((opened.header, opened.plaintext))
    }

    /// [`Repository::get_opened`] for a small record (marker, cluster record, dedup key, timeline
    /// history, lease generation, running marker, expire lock, retention floor): one over [`RECORD_READ_MAX`] stored bytes is [`StoreError::TooLarge`], unread.
    pub async fn get_record(&self, name: &str) -> Result<(SealedHeader, Vec<u8>), RepositoryError> {
        let opened = self.read(name, Read::Whole(RECORD_READ_MAX)).await?;
        Ok((opened.header, opened.plaintext))
    }

    /// [`Repository::get_record`] from this repository alone, never a fallback: for objects no
    /// secondary holds (running markers and expire locks are not copied), where a fallback's
    /// "not found" would turn this repository's transient error into "deleted", and for judging
    /// the object under a name in this repository (not a copy of it elsewhere).
    pub async fn get_record_here(&self, name: &str) -> Result<(SealedHeader, Vec<u8>), RepositoryError> {
        let opened = read_from(&self.store, &self.keys, name, Read::Whole(RECORD_READ_MAX)).await?;
        Ok((opened.header, opened.plaintext))
    }

    /// Reads and authenticates only the header of `name` (from a fallback if this repository cannot).
    pub async fn read_header(&self, name: &str) -> Result<SealedHeader, RepositoryError> {
        Ok(self.read(name, Read::Header).await?.header)
    }

    /// Deletes `name` (in this repository only).
    pub async fn delete(&self, name: &str) -> Result<(), RepositoryError> {
        self.journal_deletes(&[name.to_string()]).await?;
        Ok(self.store.delete(name).await?)
    }

    /// Deletes `names` (in this repository only).
    pub async fn delete_many(&self, names: &[String]) -> Result<(), RepositoryError> {
        self.journal_deletes(names).await?;
        Ok(self.store.delete_many(names).await?)
    }

    /// The objects whose names start with `prefix`, sorted by name (this repository only).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, RepositoryError> {
        Ok(self.store.list(prefix).await?)
    }

    /// The names one level below `dir` (a prefix ending in `/`): see [`Store::list_children`].
    pub async fn list_children(&self, dir: &str) -> Result<Vec<String>, RepositoryError> {
        Ok(self.store.list_children(dir).await?)
    }

    /// System ids of the PostgreSQL clusters in this repository.
    pub async fn clusters(&self) -> Result<Vec<u64>, RepositoryError> {
        // One level, then one head per cluster: listing the whole prefix would read every block.
        let mut ids = BTreeSet::new();
        for child in self.store.list_children(names::pg::ROOT).await? {
            let record = format!("{child}cluster");
            let Some(id) = names::pg::parse_cluster_info(&record) else { continue };
            if names::pg::cluster_info(id) == record && self.store.head(&record).await?.is_some() {
                ids.insert(id);
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// The cluster to work on: `wanted` if given, else the only one in the repository.
    pub async fn resolve_cluster(&self, wanted: Option<u64>) -> Result<ClusterInfo, RepositoryError> {
        let id = match wanted {
            Some(id) => id,
            None => {
                let ids = self.clusters().await?;
                match ids.as_slice() {
                    [] => return Err(RepositoryError::NoCluster { location: self.location() }),
                    [one] => *one,
                    many => {
                        let ids = many.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
                        return Err(RepositoryError::AmbiguousCluster { location: self.location(), ids });
                    }
                }
            }
        };
        self.cluster_info(id).await
    }

    /// The record of cluster `system_id`.
    pub async fn cluster_info(&self, system_id: u64) -> Result<ClusterInfo, RepositoryError> {
        let name = names::pg::cluster_info(system_id);
        let (_, text) = self.get_record(&name).await?;
        let text = String::from_utf8(text)
            .map_err(|_| RepositoryError::Invalid { name: name.clone(), what: "not UTF-8".into() })?;
        ClusterInfo::from_text(&name, &text)
    }

    /// Records a cluster; an existing record must agree (same segment size etc.).
    pub async fn put_cluster_info(&self, info: &ClusterInfo) -> Result<(), RepositoryError> {
        let name = names::pg::cluster_info(info.system_id);
        match self.put_sealed(&name, info.to_text().into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await {
            Ok(_) => Ok(()),
            Err(RepositoryError::Conflict { .. }) => {
                let existing = self.cluster_info(info.system_id).await?;
                if existing.wal_segment_size == info.wal_segment_size && existing.wal_page_size == info.wal_page_size {
                    // Only the server version differs (minor upgrade): keep the first record.
                    Ok(())
                } else {
                    Err(RepositoryError::Invalid {
                        name,
                        what: format!("recorded as {existing:?}, but the server now reports {info:?}"),
                    })
                }
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[tokio::test]
    async fn a_marker_of_a_newer_format_or_of_another_text_is_refused() {
        // The bytes every pitr so far wrote (a secondary's marker must equal its primary's).
        assert_eq!(marker_text(), "pitr repository format 1\n");
        let cases = [
            ("pitr repository format 2\n", Some(2)),
            ("pitr repository format 10\n", Some(10)),
            ("pitr repository format \n", None),
            ("pitr repository format +1\n", None),
            ("pitr repository format 1", None),
            ("pitr repository format 99999999999\n", None),
            ("a repository", None),
        ];
        for (text, newer) in cases {
            let dir = tempfile::tempdir().unwrap();
            let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("a", [1; 32]));
            repo.put_sealed(MARKER, text.as_bytes().to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
            for err in [repo.check().await.unwrap_err(), repo.init().await.unwrap_err()] {
                match (newer, &err) {
                    (Some(want), RepositoryError::NewerFormat { location, format, supported: 1 }) => {
                        assert_eq!((location.as_str(), *format), (dir.path().to_str().unwrap(), want));
                        assert!(err.to_string().contains("use a newer pitr"), "{err}");
                    }
                    (None, RepositoryError::Invalid { name, what }) if name == MARKER => {
                        assert!(what.contains(dir.path().to_str().unwrap()), "{err}");
                    }
                    _ => panic!("{text:?}: {err}"),
                }
            }
        }
        // An older format (none exists yet) is read.
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("a", [1; 32]));
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        repo.put_sealed(MARKER, b"pitr repository format 0\n".to_vec(), meta).await.unwrap();
        repo.check().await.unwrap();
    }

    #[tokio::test]
    async fn wal_chunks_are_sealed_at_the_chunk_level_and_segments_at_the_wal_level() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("a", [1; 32]))
            .with_wal_zstd_level(19);
        // Text-like tuples: level -1 leaves literals uncompressed (no Huffman), so it comes out
        // clearly bigger than any positive level.
        let plaintext: Vec<u8> = (0..400u32)
            .flat_map(|i| {
                format!("tuple {i} balance {} filler {:x}\n", i * 7919 % 1000, i.wrapping_mul(2654435761)).into_bytes()
            })
            .collect();
        let segment_file = "000000010000000000000001";
        let mut sizes = Vec::new();
        for (kind, name) in [
            (ObjectKind::WalChunk, crate::names::pg::wal_chunk(7, segment_file, 0, 100)),
            (ObjectKind::WalSegment, crate::names::pg::wal_segment(7, segment_file)),
        ] {
            let meta = ObjectMeta { timeline: 1, end_lsn: 100, ..ObjectMeta::plain(kind) };
            let (outcome, len) = repo.put_sealed_sized(&name, plaintext.clone(), meta).await.unwrap();
            assert_eq!(outcome, PutOutcome::Created, "{kind:?}");
            assert_eq!(repo.get_opened(&name).await.unwrap().1, plaintext);
            sizes.push(len);
        }
        // The header is the same size in both; only the frames differ.
        assert!(sizes[0] > sizes[1] + 1000, "chunk {} bytes, segment {} bytes", sizes[0], sizes[1]);
    }

    #[tokio::test]
    async fn repository_marker_conflicts_and_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("a", [1; 32]));
        assert!(matches!(repo.check().await, Err(RepositoryError::NotInitialised { .. })));
        assert_eq!(repo.init().await.unwrap(), PutOutcome::Created);
        assert_eq!(repo.init().await.unwrap(), PutOutcome::AlreadyExists);
        repo.check().await.unwrap();
        let wrong = Repository::new(store.clone(), KeyRing::from_key("a", [2; 32]));
        let err = wrong.check().await.unwrap_err();
        assert!(err.to_string().contains("wrong key"), "{err}");

        let meta = ObjectMeta::plain(ObjectKind::Meta);
        repo.put_sealed("x", b"one".to_vec(), meta.clone()).await.unwrap();
        assert_eq!(repo.put_sealed("x", b"one".to_vec(), meta.clone()).await.unwrap(), PutOutcome::AlreadyExists);
        assert!(matches!(repo.put_sealed("x", b"two".to_vec(), meta).await, Err(RepositoryError::Conflict { .. })));

        let info =
            ClusterInfo { system_id: 9, wal_segment_size: 16 << 20, wal_page_size: 8192, server_version_num: 150000 };
        repo.put_cluster_info(&info).await.unwrap();
        assert_eq!(repo.resolve_cluster(None).await.unwrap(), info);
        let other = ClusterInfo { system_id: 9, wal_segment_size: 64 << 20, ..info.clone() };
        assert!(repo.put_cluster_info(&other).await.is_err());
    }

    #[tokio::test]
    async fn planted_big_objects_are_refused_by_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("a", [1; 32]));
        repo.init().await.unwrap();
        let huge = Bytes::from(vec![0u8; RECORD_READ_MAX as usize + 1]);
        // A record name holding more than any record: refused by its size, not read and opened.
        let record = names::pg::cluster_info(7);
        store.put_if_absent(&record, huge.clone()).await.unwrap();
        let err = repo.cluster_info(7).await.unwrap_err();
        assert!(matches!(&err, RepositoryError::Store(StoreError::TooLarge { .. })), "{err}");
        assert!(err.to_string().contains(&record), "{err}");
        // A create-only put onto a name that holds something far bigger than our object: a
        // conflict, decided without reading it.
        store.put_if_absent("wal/x", huge).await.unwrap();
        let put = repo.put_sealed("wal/x", b"small".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await;
        assert!(matches!(put, Err(RepositoryError::Conflict { .. })), "{put:?}");
    }

    #[tokio::test]
    async fn reads_fall_back_to_other_repositories() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let primary: Arc<dyn Store> = Arc::new(LocalStore::new(a.path()));
        let secondary: Arc<dyn Store> = Arc::new(LocalStore::new(b.path()));
        let keys = KeyRing::from_key("a", [1; 32]);
        let writer = Repository::new(primary.clone(), keys.clone());
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        for name in ["gone", "flipped", "both-bad", "only-here"] {
            writer.put_sealed(name, name.as_bytes().to_vec(), meta.clone()).await.unwrap();
            // A secondary holds the primary's bytes, as copies do.
            secondary.put_if_absent(name, primary.get(name).await.unwrap()).await.unwrap();
        }
        primary.delete("gone").await.unwrap();
        secondary.delete("only-here").await.unwrap();
        let flip = |dir: &std::path::Path, name: &str| {
            let path = dir.join(name);
            let mut bytes = std::fs::read(&path).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(&path, bytes).unwrap();
        };
        flip(a.path(), "flipped");
        flip(a.path(), "both-bad");
        std::fs::remove_file(b.path().join("both-bad")).unwrap();

        let alone = Repository::new(primary.clone(), keys.clone());
        assert!(alone.get_opened("gone").await.unwrap_err().to_string().contains("not found"));
        assert!(matches!(alone.get_opened("flipped").await, Err(RepositoryError::Seal(_))));

        let repo = Repository::new(primary.clone(), keys.clone())
            .with_fallbacks("primary", vec![NamedStore { name: "dr".into(), store: secondary.clone() }]);
        for name in ["gone", "flipped", "only-here"] {
            assert_eq!(repo.get_opened(name).await.unwrap().1, name.as_bytes(), "{name}");
            assert_eq!(repo.read_header(name).await.unwrap().meta.kind, ObjectKind::Meta, "{name}");
        }
        // Damaged here and missing there: the damage is what is reported, not "not found".
        assert!(matches!(repo.get_opened("both-bad").await, Err(RepositoryError::Seal(_))));
        let err = repo.get_opened("nowhere").await.unwrap_err();
        assert!(matches!(&err, RepositoryError::Store(e) if e.is_not_found()), "{err}");
        // An unreachable fallback does not turn "not in the archive" into an error.
        let unmounted: Arc<dyn Store> = Arc::new(LocalStore::new(b.path().join("unmounted")));
        let repo = Repository::new(primary.clone(), keys.clone())
            .with_fallbacks("primary", vec![NamedStore { name: "dr".into(), store: unmounted }]);
        let err = repo.get_opened("nowhere").await.unwrap_err();
        assert!(matches!(&err, RepositoryError::Store(e) if e.is_not_found()), "{err}");
        // Listings are the chosen repository's own.
        let from_secondary = Repository::new(secondary.clone(), keys)
            .with_fallbacks("dr", vec![NamedStore { name: "primary".into(), store: primary.clone() }]);
        let listed: Vec<String> = from_secondary.list("").await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(listed, vec!["flipped", "gone"]);
        assert_eq!(from_secondary.get_opened("only-here").await.unwrap().1, b"only-here");
    }
}
