//! The journal: a signed, hash-chained history of the archive, so that a repository that lost its
//! newest objects (a deleted segment, a rolled-back manifest, a bucket restored from an old
//! snapshot) is told apart from one that never had them.
//!
//! Owns the batch format (`journal/<seq>`, sealed, create-only), its canonical body, signing and
//! checking with an Ed25519 key the storage credentials cannot forge, loading and judging a chain
//! from one store, replaying it into the set of objects it says are live, and the [`Recorder`]
//! that [`Repository`] notes every put and delete of a journaled name into, so writers cannot
//! forget to. It does not decide *when* to write a batch (the sidecar's interval, a command's
//! exit: callers call [`Recorder::flush`]) and does not compare a chain with what a repository
//! holds (that is `pitr verify`'s, which knows the clusters).
//!
//! Trust: a batch counts only if it opens with the repository's keys, parses, sits under the name
//! of its own seq, names the configured key and carries that key's signature over its canonical
//! body. The public key is configuration, never read from the repository. Anything else under
//! `journal/` is reported by name and never chained onto; a writer that finds the newest batches
//! untrusted chains past them onto the newest trusted one and says so in the batch it signs
//! (`prev_seq`), so the chain stays one line and the skip is on the record.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
/// The journal's public key type (Ed25519), re-exported for the configuration.
pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::KeyRing;
use crate::names;
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::Store;

/// The batch format this code writes and reads.
pub const BATCH_VERSION: u32 = 1;

/// The most entries one batch holds; more are written as several batches.
pub const MAX_ENTRIES_PER_BATCH: usize = 20_000;

/// The most stored bytes a batch may take (a full batch is a few MB of JSON): a bigger object
/// under `journal/` is refused unread.
pub const BATCH_READ_MAX: u64 = crate::repository::RECORD_READ_MAX;

/// Why journal keys or batches could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The signing key file could not be read or written.
    #[error("journal signing key file {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        cause: std::io::Error,
    },
    /// The signing key file is readable by others.
    #[error("journal signing key file {path} has mode {mode:o}: it must be readable by its owner only (chmod 600)")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The signing key file exists already (a new one would not verify the old batches).
    #[error("journal signing key file {path} exists already")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A key that does not parse.
    #[error("{what}: {why}")]
    BadKey {
        /// Which key (the file, or the setting).
        what: String,
        /// What is wrong.
        why: String,
    },
}

/// Whether a put or a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The object was stored with these bytes.
    Put,
    /// The object is deleted (journaled before the delete).
    Delete,
}

/// One journaled change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Put or delete.
    pub op: Op,
    /// The object's name.
    pub name: String,
    /// Stored (sealed) bytes; 0 for a delete.
    pub len: u64,
    /// SHA-256 of the stored (sealed) bytes, hex; empty for a delete.
    pub sha256: String,
}

/// How far one cluster's WAL was durably archived when the batch was signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalThrough {
    /// The cluster's system identifier.
    pub cluster: u64,
    /// The timeline.
    pub tli: u32,
    /// Just past the last WAL byte the archive held.
    pub lsn: u64,
}

/// What a batch says, signed as its canonical JSON ([`Body::canonical`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// [`BATCH_VERSION`].
    pub version: u32,
    /// Its place in the chain; the object is `journal/<seq>`.
    pub seq: u64,
    /// The batch it follows: `seq - 1`, or lower when the writer chained past untrusted batches
    /// (every seq in between is one it refused); `None` for the first batch.
    pub prev_seq: Option<u64>,
    /// SHA-256 of the previous batch's canonical body, hex (64 zeros for the first batch).
    pub prev_hash: String,
    /// When it was signed, µs since the Unix epoch.
    pub time_us: i64,
    /// Who wrote it: host and process kind.
    pub writer: String,
    /// The changes, in the order they happened.
    pub entries: Vec<Entry>,
    /// The WAL durably archived, per cluster (the sidecar's; empty from other writers).
    pub wal_through: Vec<WalThrough>,
    /// The signing key's id ([`key_id`]).
    pub key_id: String,
}

impl Body {
    /// The bytes signed and hashed: serde_json of the struct (fields in declaration order, no
    /// whitespace), recomputed from the parsed body on reading, so only the content counts.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// SHA-256 of [`Body::canonical`].
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.canonical()).into()
    }
}

/// A batch as stored (the plaintext of `journal/<seq>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    body: Body,
    /// Ed25519 signature over the canonical body, hex.
    signature: String,
}

/// The id of a public key: the first 8 bytes of SHA-256 of it, hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// A public key in the form `[journal] public_key` takes (base64 of its 32 bytes).
pub fn public_key_text(key: &VerifyingKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
}

/// Parses `[journal] public_key`.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, JournalError> {
    let bad = |why: String| JournalError::BadKey { what: "[journal] public_key".into(), why };
    let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).map_err(|e| bad(e.to_string()))?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad("not 32 bytes".into()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
}

/// The journal's signing key (loaded from its file).
#[derive(Clone)]
pub struct JournalSigner {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for JournalSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalSigner").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

const KEY_FILE_HEADER: &str =
    "# pitr journal signing key (Ed25519 seed, base64). Keep it off the repository's storage.\n";

impl JournalSigner {
    /// The signer of a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> JournalSigner {
        let key = SigningKey::from_bytes(&seed);
        let key_id = key_id(&key.verifying_key());
        JournalSigner { key, key_id }
    }

    /// Loads the key file (mode 0600 or stricter).
    pub fn load(path: &Path) -> Result<JournalSigner, JournalError> {
        let io = |cause| JournalError::Io { path: path.to_path_buf(), cause };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(JournalError::TooOpen { path: path.to_path_buf(), mode });
        }
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let bad = |why: &str| JournalError::BadKey {
            what: format!("journal signing key file {}", path.display()),
            why: why.into(),
        };
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| bad("no key line"))?;
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD.decode(line).map_err(|_| bad("the key line is not base64"))?,
        );
        let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| bad("the key is not 32 bytes"))?;
        Ok(JournalSigner::from_seed(seed))
    }

    /// Creates a new key file (0600, fsynced with its directory); refuses an existing one.
    pub fn create_file(path: &Path) -> Result<JournalSigner, JournalError> {
        use rand::RngCore;
        let io = |cause| JournalError::Io { path: path.to_path_buf(), cause };
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut *seed);
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    JournalError::Exists { path: path.to_path_buf() }
                } else {
                    io(e)
                }
            })?;
        let mut text = zeroize::Zeroizing::new(String::from(KEY_FILE_HEADER));
        text.push_str(&base64::engine::general_purpose::STANDARD.encode(*seed));
        text.push('\n');
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(JournalSigner::from_seed(*seed))
    }

    /// The public key that verifies its batches.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Its key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The stored plaintext of a batch with `body`.
    fn sign(&self, body: &Body) -> Vec<u8> {
        let signature = self.key.sign(&body.canonical());
        let stored = Stored { body: body.clone(), signature: hex::encode(signature.to_bytes()) };
        serde_json::to_vec(&stored).unwrap_or_default()
    }
}

/// A batch that checked out: its body and the hash of its canonical body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedBatch {
    /// What it says.
    pub body: Body,
    /// SHA-256 of its canonical body.
    pub hash: [u8; 32],
}

/// Checks the plaintext of the object `name` as a batch signed by `key`. Pure.
pub fn check_batch(name: &str, plaintext: &[u8], key: &VerifyingKey) -> Result<TrustedBatch, String> {
    let seq = names::journal::parse_batch(name).ok_or_else(|| "not a journal batch name".to_string())?;
    let stored: Stored = serde_json::from_slice(plaintext).map_err(|e| format!("not a journal batch: {e}"))?;
    let body = stored.body;
    if body.version != BATCH_VERSION {
        return Err(format!("batch version {} (this pitr reads {BATCH_VERSION})", body.version));
    }
    if body.seq != seq {
        return Err(format!("the batch says seq {} but is stored as seq {seq}: copied or moved", body.seq));
    }
    if body.key_id != key_id(key) {
        return Err(format!("signed by key {}, not the configured journal key {}", body.key_id, key_id(key)));
    }
    let sig: [u8; 64] = hex::decode(&stored.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "the signature is not 64 bytes of hex".to_string())?;
    key.verify(&body.canonical(), &Signature::from_bytes(&sig))
        .map_err(|_| "the signature does not verify: not written with the journal key".to_string())?;
    match body.prev_seq {
        Some(p) if p >= seq => return Err(format!("prev_seq {p} is not below its seq {seq}")),
        None if body.prev_hash != ZERO_HASH => return Err("the first batch names a previous hash".into()),
        _ => {}
    }
    let hash = body.hash();
    Ok(TrustedBatch { body, hash })
}

const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Reads and checks batch `name` from `repo` alone (never a fallback).
async fn read_batch(repo: &Repository, name: &str, key: &VerifyingKey) -> Result<TrustedBatch, BatchTrouble> {
    match repo.get_record_here(name).await {
        Ok((_, plaintext)) => check_batch(name, &plaintext, key).map_err(BatchTrouble::Untrusted),
        Err(e) if e.is_untrusted_object() => Err(BatchTrouble::Untrusted(e.to_string())),
        Err(e) => Err(BatchTrouble::Read(e)),
    }
}

enum BatchTrouble {
    /// The object is there but not a batch to trust: why.
    Untrusted(String),
    /// The storage failed.
    Read(RepositoryError),
}

/// A problem with one object under `journal/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainProblem {
    /// The object.
    pub name: String,
    /// What is wrong with it.
    pub what: String,
}

/// One store's journal, judged: the longest line of trusted, linked batches from seq 0.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    /// The chain, in seq order.
    pub batches: Vec<TrustedBatch>,
    /// Objects under `journal/` not on the chain, each with why (untrusted, not linking, a fork).
    pub problems: Vec<ChainProblem>,
    /// Seqs a writer chained past (refused batches it signed as skipped).
    pub skipped: Vec<u64>,
}

impl Chain {
    /// The newest batch's seq.
    pub fn head_seq(&self) -> Option<u64> {
        self.batches.last().map(|b| b.body.seq)
    }

    /// The batch at `seq`, if on the chain.
    pub fn at(&self, seq: u64) -> Option<&TrustedBatch> {
        self.batches.binary_search_by_key(&seq, |b| b.body.seq).ok().map(|i| &self.batches[i])
    }

    /// Replays the chain: what it says is live, deleted, and the newest `wal_through` per cluster.
    pub fn replay(&self) -> Replayed {
        let mut r = Replayed::default();
        for b in &self.batches {
            for e in &b.body.entries {
                match e.op {
                    Op::Put => {
                        r.deleted.remove(&e.name);
                        r.live.insert(e.name.clone(), (e.len, e.sha256.clone()));
                    }
                    Op::Delete => {
                        r.live.remove(&e.name);
                        r.deleted.insert(e.name.clone());
                    }
                }
            }
            for w in &b.body.wal_through {
                r.wal_through.insert(w.cluster, *w);
            }
        }
        r
    }

    /// Whether a batch of the chain chained past `seq` (named an older batch as its previous):
    /// the writer found `seq` untrusted, or nothing links there.
    pub fn passes_over(&self, seq: u64) -> bool {
        let i = self.batches.partition_point(|b| b.body.seq <= seq);
        match self.batches.get(i) {
            Some(b) => i > 0 && self.batches[i - 1].body.seq < seq && b.body.prev_seq.is_some_and(|p| p < seq),
            None => false,
        }
    }

    /// Whether `name` appears on the chain at all.
    pub fn mentions(&self) -> BTreeSet<String> {
        self.batches.iter().flat_map(|b| b.body.entries.iter().map(|e| e.name.clone())).collect()
    }
}

/// What a chain says the repository holds.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    /// Live objects: name → (stored length, sha256 hex).
    pub live: BTreeMap<String, (u64, String)>,
    /// Objects the chain says were deleted (and not put again).
    pub deleted: BTreeSet<String>,
    /// The newest `wal_through` of each cluster.
    pub wal_through: BTreeMap<u64, WalThrough>,
}

/// Loads the journal of `store` (opened with `keys`) and judges it against `key`. Storage
/// failures are errors; anything wrong with an object is a [`ChainProblem`].
pub async fn load_chain(store: Arc<dyn Store>, keys: KeyRing, key: &VerifyingKey) -> Result<Chain, RepositoryError> {
    let repo = Repository::new(store, keys);
    let mut chain = Chain::default();
    let mut seqs = BTreeMap::new();
    for o in repo.list(names::journal::PREFIX).await? {
        match names::journal::parse_batch(&o.name) {
            Some(seq) if names::journal::batch(seq) == o.name => {
                seqs.insert(seq, o.name);
            }
            _ => chain.problems.push(ChainProblem { name: o.name, what: "not a journal batch name (planted?)".into() }),
        }
    }
    let mut trusted = BTreeMap::new();
    let mut refused = BTreeSet::new();
    // Read 16 at a time: a long journal is many small objects, each a round trip.
    // (Owned values in each read: a future borrowing from the closure's argument is not `Send`
    // for every lifetime, and the sidecar's scheduled verification spawns this.)
    let read: Vec<(u64, String, Result<TrustedBatch, BatchTrouble>)> = stream::iter(seqs.clone())
        .map(|(seq, name)| {
            let (repo, key) = (repo.clone(), *key);
            async move {
                let outcome = read_batch(&repo, &name, &key).await;
                (seq, name, outcome)
            }
        })
        .buffered(16)
        .collect()
        .await;
    for (seq, name, outcome) in read {
        match outcome {
            Ok(b) => {
                trusted.insert(seq, b);
            }
            Err(BatchTrouble::Untrusted(what)) => {
                refused.insert(seq);
                chain.problems.push(ChainProblem { name, what: format!("refused: {what}") });
            }
            Err(BatchTrouble::Read(e)) => return Err(e),
        }
    }
    // The line from seq 0: each next batch must name the head as its previous one. Seqs it
    // skipped must be refused ones here (a writer only chains past a batch it could not trust).
    let mut head: Option<(u64, [u8; 32])> = None;
    for (seq, b) in trusted {
        let links = match (head, b.body.prev_seq) {
            (None, None) => seq == 0,
            (Some((hseq, hhash)), Some(p)) => p == hseq && b.body.prev_hash == hex::encode(hhash),
            _ => false,
        };
        if links {
            let from = head.map(|(h, _)| h + 1).unwrap_or(0);
            // Only the refused objects in between (a range can be huge: a planted seq).
            chain.skipped.extend(refused.range(from..seq).copied());
            // A seq chained past that holds nothing now: a writer only chains past an object it
            // found there and could not trust, so it was removed since, and whatever it was (a
            // replaced batch of ours) cannot be checked. Honest operation never leaves one.
            let mut at = from;
            for s in seqs.range(from..seq).map(|(s, _)| *s).chain(std::iter::once(seq)) {
                if s > at {
                    let which = if s - at == 1 { format!("seq {at}") } else { format!("seqs {at} to {}", s - 1) };
                    chain.problems.push(ChainProblem {
                        name: names::journal::batch(at),
                        what: format!(
                            "absent, but batch {seq} chained past {which} as untrusted: removed from the journal since; what it held cannot be checked"
                        ),
                    });
                }
                at = s.saturating_add(1);
            }
            head = Some((seq, b.hash));
            chain.batches.push(b);
        } else {
            let what = match (head, b.body.prev_seq) {
                (Some((hseq, _)), Some(p)) if p == hseq => {
                    format!("signed, but its previous hash does not match batch {hseq}: a fork of the journal")
                }
                (Some((hseq, _)), Some(p)) if p < hseq => {
                    format!("signed, but follows batch {p} while the chain goes on to {hseq}: a fork of the journal")
                }
                (_, p) => format!(
                    "signed, but does not link to the chain (it follows {}; the chain ends at {})",
                    p.map(|p| p.to_string()).unwrap_or_else(|| "nothing".into()),
                    head.map(|(h, _)| h.to_string()).unwrap_or_else(|| "nothing".into())
                ),
            };
            chain.problems.push(ChainProblem { name: names::journal::batch(seq), what });
        }
    }
    chain.problems.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(chain)
}

/// Whether a put or delete of `name` is journaled: manifests, whole WAL segments and history
/// files, oplog slices and gaps, pins and restore-point entries. Blocks are covered by their
/// manifests, WAL chunks by `wal_through`; coordination objects (leases, running markers) and
/// the journal itself are not.
pub fn is_journaled(name: &str) -> bool {
    if let Some(rest) = name.strip_prefix(names::pg::ROOT) {
        let Some((id, _)) = rest.split_once('/') else { return false };
        let Ok(id) = id.parse::<u64>() else { return false };
        return matches!(
            names::pg::parse_wal(id, name),
            Some(names::pg::WalName::Segment { .. }) | Some(names::pg::WalName::History { .. })
        ) || names::pg::parse_backup_manifest(id, name).is_some()
            || names::pg::parse_pin(id, name).is_some()
            || names::pg::parse_restore_point(id, name).is_some();
    }
    if let Some(source) = names::mongo::parse_source(name) {
        return names::mongo::parse_slice(source, name).is_some()
            || names::mongo::parse_gap(source, name).is_some()
            || names::mongo::is_snapshot_manifest(source, name);
    }
    names::files::parse_tree_manifest(name).is_some() || names::files::parse_dump_manifest(name).is_some()
}

/// The digest an entry records of an object's stored (sealed) bytes: SHA-256, hex.
pub fn stored_digest(sealed: &[u8]) -> String {
    hex::encode(Sha256::digest(sealed))
}

/// What a recorder has noted and not yet written.
#[derive(Debug, Default)]
struct Pending {
    entries: Vec<Entry>,
    wal_through: BTreeMap<u64, WalThrough>,
    /// `wal_through` changed since the last batch.
    wal_moved: bool,
}

/// The chain's head as a writer knows it, and the next seq to try.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// The newest trusted batch (seq, hash), `None` on an empty journal.
    trusted: Option<(u64, [u8; 32])>,
    next_seq: u64,
}

/// Notes every journaled put and delete of the [`Repository`] it is attached to and writes them
/// as signed batches on [`Recorder::flush`].
#[derive(Debug)]
pub struct Recorder {
    signer: JournalSigner,
    writer: String,
    pending: Mutex<Pending>,
    /// Serialises this process's batches; caches the head so a flush costs one put, not a listing.
    head: tokio::sync::Mutex<Option<Head>>,
    /// Where the sidecar keeps its high-water mark (seq and hash of its last batch).
    high_water: Mutex<Option<PathBuf>>,
    /// The hash of batch 0 of the journal written to (hex), read once for the high-water mark.
    origin: Mutex<Option<String>>,
    /// The deletes of the newest written batch that had any (not put since): a delete retried
    /// one object at a time after a failed `delete_many` needs no batch of its own.
    written_deletes: Mutex<BTreeSet<String>>,
}

/// A local high-water mark: the newest batch a writer here wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighWater {
    /// Its seq.
    pub seq: u64,
    /// SHA-256 of its canonical body, hex.
    pub hash: String,
    /// The id of the key that signed it ([`key_id`]); empty in a mark that does not say.
    #[serde(default)]
    pub key_id: String,
    /// SHA-256 of batch 0's body, hex: which journal (repository) it was written to; empty when
    /// unknown. A re-initialised or new repository at the same status path starts another one.
    #[serde(default)]
    pub origin: String,
}

impl HighWater {
    /// Whether the mark is of the journal signed by `key_id` whose batch 0 hashes to `origin`
    /// (hex; `None`: that journal has no trusted batch 0, which cannot tell). A mark of another
    /// key or another repository says nothing about this one: it is ignored, not a rollback.
    pub fn same_journal(&self, key_id: &str, origin: Option<&str>) -> bool {
        (self.key_id.is_empty() || self.key_id == key_id)
            && (self.origin.is_empty() || origin.is_none_or(|o| o == self.origin))
    }

    /// Reads a high-water mark file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> std::io::Result<Option<HighWater>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(self).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

impl Recorder {
    /// A recorder signing with `signer`; `writer` says who writes (e.g. `host/stream`).
    pub fn new(signer: JournalSigner, writer: impl Into<String>) -> Recorder {
        Recorder {
            signer,
            writer: writer.into(),
            pending: Mutex::new(Pending::default()),
            head: tokio::sync::Mutex::new(None),
            high_water: Mutex::new(None),
            origin: Mutex::new(None),
            written_deletes: Mutex::new(BTreeSet::new()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the seq and hash of each batch written in `path` (the sidecar's high-water mark).
    pub fn set_high_water_file(&self, path: PathBuf) {
        *self.high_water.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    /// Notes that `name` was stored as `len` bytes hashing to `digest` ([`stored_digest`]);
    /// called by [`Repository`] once the put returned.
    pub fn note_put(&self, name: &str, len: u64, digest: String) {
        self.written_deletes.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        self.pending().entries.push(Entry { op: Op::Put, name: name.to_string(), len, sha256: digest });
    }

    /// Notes that `names` are about to be deleted (called by [`Repository`] before the delete).
    pub fn note_deletes<'a>(&self, names: impl Iterator<Item = &'a str>) {
        let mut p = self.pending();
        for name in names {
            p.entries.push(Entry { op: Op::Delete, name: name.to_string(), len: 0, sha256: String::new() });
        }
    }

    /// Whether a written batch of this recorder already says `name` is deleted (and no put of it
    /// was noted since).
    pub fn delete_written(&self, name: &str) -> bool {
        self.written_deletes.lock().unwrap_or_else(|e| e.into_inner()).contains(name)
    }

    /// Takes back the pending deletes of `names` (their delete is not going ahead: its batch
    /// could not be written), so a later batch does not call objects still present deleted.
    pub fn forget_deletes(&self, names: &[&str]) {
        let names: BTreeSet<&str> = names.iter().copied().collect();
        self.pending().entries.retain(|e| e.op != Op::Delete || !names.contains(e.name.as_str()));
    }

    /// Records how far cluster `cluster`'s WAL is durably archived, for the next batch.
    pub fn set_wal_through(&self, cluster: u64, tli: u32, lsn: u64) {
        let w = WalThrough { cluster, tli, lsn };
        let mut p = self.pending();
        if p.wal_through.get(&cluster) != Some(&w) {
            p.wal_through.insert(cluster, w);
            p.wal_moved = true;
        }
    }

    /// Whether puts or deletes are waiting (not only a moved `wal_through`).
    pub fn has_entries(&self) -> bool {
        !self.pending().entries.is_empty()
    }

    /// Whether there is anything to write.
    pub fn has_pending(&self) -> bool {
        let p = self.pending();
        !p.entries.is_empty() || p.wal_moved
    }

    /// Writes what was noted as batches at the head of `repo`'s journal; returns the seq of the
    /// last batch written (`None` if there was nothing to write). A storage failure leaves what
    /// was noted pending for the next flush.
    pub async fn flush(&self, repo: &Repository) -> Result<Option<u64>, RepositoryError> {
        let mut head_guard = self.head.lock().await;
        let mut last = None;
        loop {
            let (entries, wal_through) = {
                let mut p = self.pending();
                if p.entries.is_empty() && !p.wal_moved {
                    return Ok(last);
                }
                let n = p.entries.len().min(MAX_ENTRIES_PER_BATCH);
                let entries: Vec<Entry> = p.entries.drain(..n).collect();
                p.wal_moved = false;
                (entries, p.wal_through.values().copied().collect::<Vec<_>>())
            };
            match self.write_one(repo, &mut head_guard, entries.clone(), wal_through).await {
                Ok(seq) => {
                    last = Some(seq);
                    let deletes: BTreeSet<String> =
                        entries.into_iter().filter(|e| e.op == Op::Delete).map(|e| e.name).collect();
                    if !deletes.is_empty() {
                        *self.written_deletes.lock().unwrap_or_else(|e| e.into_inner()) = deletes;
                    }
                }
                Err(e) => {
                    let mut p = self.pending();
                    let rest = std::mem::take(&mut p.entries);
                    p.entries = entries;
                    p.entries.extend(rest);
                    p.wal_moved = true;
                    return Err(e);
                }
            }
        }
    }

    async fn write_one(
        &self,
        repo: &Repository,
        head: &mut Option<Head>,
        entries: Vec<Entry>,
        wal_through: Vec<WalThrough>,
    ) -> Result<u64, RepositoryError> {
        let key = self.signer.verifying_key();
        let mut taken = 0u32;
        loop {
            let h = match *head {
                Some(h) => h,
                None => {
                    let found = find_head(repo, &key).await?;
                    *head = Some(found);
                    found
                }
            };
            let body = Body {
                version: BATCH_VERSION,
                seq: h.next_seq,
                prev_seq: h.trusted.map(|(s, _)| s),
                prev_hash: h.trusted.map(|(_, hash)| hex::encode(hash)).unwrap_or_else(|| ZERO_HASH.into()),
                time_us: crate::now_us(),
                writer: self.writer.clone(),
                entries: entries.clone(),
                wal_through: wal_through.clone(),
                key_id: self.signer.key_id.clone(),
            };
            let name = names::journal::batch(body.seq);
            match repo.put_sealed(&name, self.signer.sign(&body), ObjectMeta::plain(ObjectKind::Meta)).await {
                Ok(_) => {
                    let hash = body.hash();
                    *head = Some(Head { trusted: Some((body.seq, hash)), next_seq: body.seq.saturating_add(1) });
                    let path = self.high_water.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(path) = path {
                        let origin = if body.seq == 0 {
                            let o = hex::encode(hash);
                            *self.origin.lock().unwrap_or_else(|e| e.into_inner()) = Some(o.clone());
                            Some(o)
                        } else {
                            self.origin(repo, &key).await
                        };
                        let mark = HighWater {
                            seq: body.seq,
                            hash: hex::encode(hash),
                            key_id: self.signer.key_id.clone(),
                            origin: origin.clone().unwrap_or_default(),
                        };
                        // Never lowered: a mark at or above this seq witnesses batches the
                        // repository lost (a rollback); writing over it would erase the evidence
                        // `pitr verify` names. Remove the file once that is dealt with. A mark of
                        // another key or repository (re-initialised) is replaced.
                        let witness = HighWater::read(&path).map(|m| {
                            m.filter(|m| m.seq >= body.seq && m.same_journal(&mark.key_id, origin.as_deref()))
                        });
                        if let Ok(Some(old)) = witness {
                            tracing::error!(path = %path.display(), seq = body.seq, high_water = old.seq, "the repository's journal is behind this host's high-water mark: it was rolled back or lost its newest batches; the mark is kept for `pitr verify`");
                        } else if let Err(e) = mark.write(&path) {
                            tracing::warn!(path = %path.display(), error = %e, "cannot write the journal's high-water mark");
                        }
                    }
                    return Ok(body.seq);
                }
                // Another writer took the seq: chain onto its batch if it is a trusted successor
                // of our head, else past it (said in our batch's prev_seq, and logged).
                // (A name holding something that does not open is taken just the same.)
                Err(e) if matches!(e, RepositoryError::Conflict { .. }) || e.is_untrusted_object() => {
                    if h.next_seq == u64::MAX {
                        return Err(e);
                    }
                    // A writer paused while others went on (a sidecar stopped for a day is 8,640
                    // batches behind) probes for the head again rather than stepping through them.
                    taken += 1;
                    if taken.is_multiple_of(WALK_BEFORE_PROBING) {
                        *head = None;
                        continue;
                    }
                    match read_batch(repo, &name, &key).await {
                        Ok(b)
                            if b.body.prev_seq == h.trusted.map(|(s, _)| s)
                                && b.body.prev_hash
                                    == h.trusted.map(|(_, x)| hex::encode(x)).unwrap_or_else(|| ZERO_HASH.into()) =>
                        {
                            *head = Some(Head {
                                trusted: Some((b.body.seq, b.hash)),
                                next_seq: b.body.seq.saturating_add(1),
                            });
                        }
                        Ok(_) => {
                            tracing::error!(batch = %name, "journal batch is signed but does not follow the head this writer knows: a fork; chaining past it (`pitr verify` names it)");
                            *head = Some(Head { next_seq: h.next_seq.saturating_add(1), ..h });
                        }
                        Err(BatchTrouble::Untrusted(why)) => {
                            tracing::error!(batch = %name, why = %why, "journal batch is not trusted; chaining past it (`pitr verify` names it)");
                            *head = Some(Head { next_seq: h.next_seq.saturating_add(1), ..h });
                        }
                        Err(BatchTrouble::Read(e)) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Recorder {
    /// The hash of batch 0 of `repo`'s journal (hex), read once; `None` when it does not read
    /// as a trusted batch (the mark then says no origin).
    async fn origin(&self, repo: &Repository, key: &VerifyingKey) -> Option<String> {
        if let Some(o) = self.origin.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(o);
        }
        let b = read_batch(repo, &names::journal::batch(0), key).await.ok()?;
        let o = hex::encode(b.hash);
        *self.origin.lock().unwrap_or_else(|e| e.into_inner()) = Some(o.clone());
        Some(o)
    }
}

/// How many taken seqs a writer steps over one by one before it looks for the head afresh.
const WALK_BEFORE_PROBING: u32 = 8;

/// The newest trusted batch of `repo`'s journal and the seq to write next.
///
/// Without listing `journal/` (8,640 batches a day at the default interval, and never
/// compacted): batches are written at consecutive seqs, so the seq just below the first absent
/// one is found by probing names with `head` (doubling, then halving: about 2·log₂ n requests).
/// A planted object far above the head is never reached that way, and one that is reached (or a
/// deleted batch the probe lands on) only sends the writer to the listing below, which is
/// correct for any layout, just not cheap.
async fn find_head(repo: &Repository, key: &VerifyingKey) -> Result<Head, RepositoryError> {
    let store = repo.store();
    let exists =
        |seq: u64| async move { Ok::<_, RepositoryError>(store.head(&names::journal::batch(seq)).await?.is_some()) };
    if !exists(0).await? {
        // An empty journal (the listing is then empty too), or one whose first batch is gone.
        return find_head_by_listing(repo, key).await;
    }
    // `lo` is present, `hi` absent.
    let (mut lo, mut step) = (0u64, 1u64);
    let mut hi = loop {
        let Some(probe) = lo.checked_add(step) else { return find_head_by_listing(repo, key).await };
        if exists(probe).await? {
            lo = probe;
            step = step.saturating_mul(2);
        } else {
            break probe;
        }
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if exists(mid).await? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let name = names::journal::batch(lo);
    match read_batch(repo, &name, key).await {
        Ok(b) => Ok(Head { trusted: Some((lo, b.hash)), next_seq: hi }),
        Err(BatchTrouble::Untrusted(why)) => {
            tracing::error!(batch = %name, why = %why, "journal batch is not trusted; looking for the newest trusted one in the listing (`pitr verify` names it)");
            find_head_by_listing(repo, key).await
        }
        Err(BatchTrouble::Read(e)) => Err(e),
    }
}

/// [`find_head`] from a listing of `journal/`: the newest trusted batch, and the first free seq
/// above it. Untrusted objects right above it are logged (the writer chains past them); ones
/// further up (a planted huge seq) are not jumped to.
async fn find_head_by_listing(repo: &Repository, key: &VerifyingKey) -> Result<Head, RepositoryError> {
    let seqs: BTreeSet<u64> = repo
        .list(names::journal::PREFIX)
        .await?
        .iter()
        .filter_map(|o| names::journal::parse_batch(&o.name).filter(|s| names::journal::batch(*s) == o.name))
        .collect();
    let mut trusted = None;
    for seq in seqs.iter().rev() {
        let name = names::journal::batch(*seq);
        match read_batch(repo, &name, key).await {
            Ok(b) => {
                trusted = Some((*seq, b.hash));
                break;
            }
            Err(BatchTrouble::Untrusted(why)) => {
                tracing::error!(batch = %name, why = %why, "journal batch is not trusted (`pitr verify` names it)");
            }
            Err(BatchTrouble::Read(e)) => return Err(e),
        }
    }
    let mut next_seq = trusted.map(|(s, _): (u64, _)| s.saturating_add(1)).unwrap_or(0);
    while seqs.contains(&next_seq) && next_seq < u64::MAX {
        next_seq += 1;
    }
    Ok(Head { trusted, next_seq })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;
    use bytes::Bytes;

    fn repo_with(dir: &Path, signer: &JournalSigner) -> Repository {
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir));
        Repository::new(store, KeyRing::from_key("a", [1; 32]))
            .with_journal(Arc::new(Recorder::new(signer.clone(), "test")))
    }

    async fn chain(dir: &Path, key: &VerifyingKey) -> Chain {
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir));
        load_chain(store, KeyRing::from_key("a", [1; 32]), key).await.unwrap()
    }

    const SEG: &str = "pg/7/wal/000000010000000000000001.seg";
    const SEG2: &str = "pg/7/wal/000000010000000000000002.seg";

    #[test]
    fn names_and_what_is_journaled() {
        assert_eq!(names::journal::batch(3), "journal/00000000000000000003");
        assert_eq!(names::journal::parse_batch("journal/00000000000000000003"), Some(3));
        assert_eq!(names::journal::parse_batch("journal/3"), None);
        assert_eq!(names::journal::parse_batch("journal/0000000000000000000x"), None);
        assert!(is_journaled(SEG));
        assert!(!is_journaled("pg/7/wal/000000010000000000000001.00000000-00001000.chunk"));
        assert!(is_journaled("pg/7/backups/20260101T000000Z.manifest"));
        assert!(!is_journaled("pg/7/blocks/aa/aabb"));
        assert!(is_journaled(&names::pg::pin(7, "20260101T000000Z", 3)));
        assert!(is_journaled(&names::pg::restore_point(7, 1, 0x1000)));
        assert!(is_journaled(&names::pg::wal_history(7, 2)));
        let ts = |s: u32| (s, 1);
        assert!(is_journaled(&names::mongo::slice("rs0", ts(1), ts(2))));
        assert!(is_journaled(&names::mongo::snapshot_manifest("rs0", "20260101T000000Z")));
        assert!(is_journaled(&names::files::tree_manifest("etc", "20260101T000000Z")));
        assert!(is_journaled(&names::files::dump_manifest("db", "20260101T000000Z")));
        assert!(!is_journaled(&names::pg::complete_mark(7, 1, 0x1000, 5)));
        assert!(!is_journaled(&names::pg::lease(7, 1)));
        assert!(!is_journaled("journal/00000000000000000000"));
        assert!(!is_journaled("running/backup.0000000000000001.0000000000000001.x"));
    }

    #[tokio::test]
    async fn puts_and_deletes_chain_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let repo = repo_with(dir.path(), &signer);
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        repo.put_sealed(SEG, b"one".to_vec(), meta.clone()).await.unwrap();
        repo.put_sealed("pg/7/blocks/aa/aabb", b"block".to_vec(), meta.clone()).await.unwrap();
        repo.journal().unwrap().set_wal_through(7, 1, 0x100_0000);
        assert_eq!(repo.journal().unwrap().flush(&repo).await.unwrap(), Some(0));
        assert_eq!(repo.journal().unwrap().flush(&repo).await.unwrap(), None, "nothing new: no batch");
        repo.put_sealed(SEG2, b"two".to_vec(), meta.clone()).await.unwrap();
        // A delete of a journaled name writes its batch before the object goes.
        repo.delete(SEG).await.unwrap();
        let key = signer.verifying_key();
        let c = chain(dir.path(), &key).await;
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.head_seq(), Some(1));
        let r = c.replay();
        assert_eq!(r.live.keys().collect::<Vec<_>>(), vec![SEG2]);
        assert!(r.deleted.contains(SEG));
        assert_eq!(r.wal_through[&7].lsn, 0x100_0000);
        let stored = repo.store().get(SEG2).await.unwrap();
        assert_eq!(r.live[SEG2], (stored.len() as u64, hex::encode(Sha256::digest(&stored))));
    }

    #[tokio::test]
    async fn a_stop_between_the_journaled_delete_and_the_delete_leaves_a_deleted_object_present() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let repo = repo_with(dir.path(), &signer);
        repo.put_sealed(SEG, b"one".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        // What `Repository::delete` does first; the process stops before the delete.
        let journal = repo.journal().unwrap();
        journal.note_deletes([SEG].into_iter());
        journal.flush(&repo).await.unwrap();
        let r = chain(dir.path(), &signer.verifying_key()).await.replay();
        assert!(r.deleted.contains(SEG) && !r.live.contains_key(SEG));
        assert!(repo.store().head(SEG).await.unwrap().is_some());
        // The next delete (expire's) journals it again and removes it.
        repo.delete(SEG).await.unwrap();
        assert!(repo.store().head(SEG).await.unwrap().is_none());
        // A put noted but never flushed (a crash before the batch): the object is unjournaled.
        let crashed = repo_with(dir.path(), &signer);
        crashed.put_sealed(SEG2, b"two".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        drop(crashed);
        let c = chain(dir.path(), &signer.verifying_key()).await;
        assert!(!c.mentions().contains(SEG2));
    }

    #[tokio::test]
    async fn racing_writers_both_land_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let a = repo_with(dir.path(), &signer);
        let b = repo_with(dir.path(), &signer);
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        // Both learn the (empty) head, then race for the same seqs.
        a.journal().unwrap().set_wal_through(7, 1, 1);
        a.journal().unwrap().flush(&a).await.unwrap();
        b.journal().unwrap().set_wal_through(7, 1, 2);
        b.journal().unwrap().flush(&b).await.unwrap();
        let mut tasks = Vec::new();
        for (i, r) in [a, b].into_iter().enumerate() {
            let meta = meta.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..10 {
                    let name = format!("pg/7/backups/{i}-{n}.manifest");
                    r.put_sealed(&name, name.clone().into_bytes(), meta.clone()).await.unwrap();
                    r.journal().unwrap().flush(&r).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let c = chain(dir.path(), &signer.verifying_key()).await;
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.batches.len(), 22);
        assert_eq!(c.replay().live.len(), 20);
    }

    #[tokio::test]
    async fn planted_batches_are_refused_and_writers_chain_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let other = JournalSigner::from_seed([6; 32]);
        let repo = repo_with(dir.path(), &signer);
        let key = signer.verifying_key();
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        repo.put_sealed(SEG, b"one".to_vec(), meta.clone()).await.unwrap();
        repo.journal().unwrap().flush(&repo).await.unwrap();
        let raw = repo.store().clone();
        // Garbage, an oversized object, a batch signed by another key, a valid batch copied to
        // another seq, a name that is not canonical.
        raw.put_if_absent(&names::journal::batch(1), Bytes::from_static(b"junk")).await.unwrap();
        let forged = Repository::new(raw.clone(), KeyRing::from_key("a", [1; 32]))
            .with_journal(Arc::new(Recorder::new(other.clone(), "forger")));
        forged.put_sealed(SEG2, b"x".to_vec(), meta.clone()).await.unwrap();
        let forged_body = Body {
            version: 1,
            seq: 2,
            prev_seq: Some(0),
            prev_hash: ZERO_HASH.into(),
            time_us: 0,
            writer: "x".into(),
            entries: vec![],
            wal_through: vec![],
            key_id: other.key_id().into(),
        };
        forged.put_sealed(&names::journal::batch(2), other.sign(&forged_body), meta.clone()).await.unwrap();
        // Sealed under its new name (the seal binds the name: a byte copy does not even open).
        let copy = repo.get_record(&names::journal::batch(0)).await.unwrap().1;
        repo.put_sealed(&names::journal::batch(3), copy, meta.clone()).await.unwrap();
        raw.put_if_absent(&names::journal::batch(4), Bytes::from(vec![0u8; BATCH_READ_MAX as usize + 1]))
            .await
            .unwrap();
        raw.put_if_absent("journal/5", Bytes::from_static(b"junk")).await.unwrap();
        let c = chain(dir.path(), &key).await;
        assert_eq!(c.head_seq(), Some(0));
        let named: Vec<&str> = c.problems.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            named,
            vec![
                "journal/00000000000000000001",
                "journal/00000000000000000002",
                "journal/00000000000000000003",
                "journal/00000000000000000004",
                "journal/5"
            ],
            "{:?}",
            c.problems
        );
        assert!(c.problems[1].what.contains("not the configured journal key"), "{:?}", c.problems[1]);
        assert!(c.problems[2].what.contains("copied or moved"), "{:?}", c.problems[2]);
        // A fresh writer is not stopped: it chains onto batch 0, past the refused ones.
        let fresh = repo_with(dir.path(), &signer);
        fresh.put_sealed("pg/7/wal/000000010000000000000003.seg", b"three".to_vec(), meta.clone()).await.unwrap();
        assert_eq!(fresh.journal().unwrap().flush(&fresh).await.unwrap(), Some(5));
        let c = chain(dir.path(), &key).await;
        assert_eq!(c.head_seq(), Some(5));
        assert_eq!(c.skipped, vec![1, 2, 3, 4]);
        assert_eq!(c.batches[1].body.prev_seq, Some(0));
        // Garbage planted at the seq a running writer (its head cached) takes next: it goes on
        // past it.
        raw.put_if_absent(&names::journal::batch(6), Bytes::from_static(b"PITRjunk")).await.unwrap();
        fresh.put_sealed("pg/7/wal/000000010000000000000004.seg", b"four".to_vec(), meta.clone()).await.unwrap();
        assert_eq!(fresh.journal().unwrap().flush(&fresh).await.unwrap(), Some(7));
        let c = chain(dir.path(), &key).await;
        assert_eq!((c.head_seq(), c.skipped.clone()), (Some(7), vec![1, 2, 3, 4, 6]));
        raw.delete(&names::journal::batch(7)).await.unwrap();
        raw.delete(&names::journal::batch(6)).await.unwrap();
        // A fork signed with the key (a writer that did not see batch 5) is named.
        let fork =
            Body { seq: 6, prev_seq: Some(0), prev_hash: hex::encode(c.batches[0].hash), ..c.batches[1].body.clone() };
        repo.put_sealed(&names::journal::batch(6), signer.sign(&fork), meta).await.unwrap();
        let c = chain(dir.path(), &key).await;
        assert_eq!(c.head_seq(), Some(5));
        assert!(c.problems.iter().any(|p| p.name.ends_with("06") && p.what.contains("fork")), "{:?}", c.problems);
    }

    /// A local store that counts listings of `journal/` and can fail puts there.
    #[derive(Debug)]
    struct Watched {
        inner: LocalStore,
        journal_lists: std::sync::atomic::AtomicUsize,
        journal_gets: std::sync::atomic::AtomicUsize,
        fail_journal_puts: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for Watched {
        async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<crate::PutOutcome, crate::StoreError> {
            if name.starts_with(names::journal::PREFIX)
                && self.fail_journal_puts.load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(crate::StoreError::Backend {
                    op: "put",
                    name: name.into(),
                    location: self.location(),
                    message: "outage".into(),
                });
            }
            self.inner.put_if_absent(name, data).await
        }
        async fn get(&self, name: &str) -> Result<Bytes, crate::StoreError> {
            if name.starts_with(names::journal::PREFIX) {
                self.journal_gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            self.inner.get(name).await
        }
        async fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<Bytes, crate::StoreError> {
            if name.starts_with(names::journal::PREFIX) {
                self.journal_gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            self.inner.get_range(name, range).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<crate::ObjectInfo>, crate::StoreError> {
            if prefix.starts_with(names::journal::PREFIX) {
                self.journal_lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            self.inner.list(prefix).await
        }
        async fn delete(&self, name: &str) -> Result<(), crate::StoreError> {
            self.inner.delete(name).await
        }
        async fn head(&self, name: &str) -> Result<Option<crate::ObjectInfo>, crate::StoreError> {
            self.inner.head(name).await
        }
        fn location(&self) -> String {
            self.inner.location()
        }
    }

    fn watched(dir: &Path, signer: &JournalSigner) -> (Arc<Watched>, Repository) {
        let store = Arc::new(Watched {
            inner: LocalStore::new(dir),
            journal_lists: Default::default(),
            journal_gets: Default::default(),
            fail_journal_puts: Default::default(),
        });
        let repo = Repository::new(store.clone(), KeyRing::from_key("a", [1; 32]))
            .with_journal(Arc::new(Recorder::new(signer.clone(), "test")));
        (store, repo)
    }

    #[tokio::test]
    async fn a_fresh_writer_finds_the_head_without_listing_and_is_not_sent_far_by_planted_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let key = signer.verifying_key();
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        let (_, first) = watched(dir.path(), &signer);
        for n in 0..37u32 {
            first.journal().unwrap().set_wal_through(7, 1, u64::from(n) + 1);
            first.journal().unwrap().flush(&first).await.unwrap();
        }
        // Planted garbage far above the head, and at the highest seq there is.
        let raw = first.store().clone();
        raw.put_if_absent(&names::journal::batch(1_000_000_000_000_000), Bytes::from_static(b"junk")).await.unwrap();
        raw.put_if_absent(&names::journal::batch(u64::MAX), Bytes::from_static(b"junk")).await.unwrap();
        let (store, fresh) = watched(dir.path(), &signer);
        fresh.put_sealed(SEG, b"one".to_vec(), meta.clone()).await.unwrap();
        assert_eq!(fresh.journal().unwrap().flush(&fresh).await.unwrap(), Some(37));
        assert_eq!(store.journal_lists.load(std::sync::atomic::Ordering::SeqCst), 0, "the head is probed, not listed");
        // Garbage the probe lands on (seq 63 is probed): the writer falls back to the listing and
        // still chains onto the newest trusted batch at the next free seq.
        raw.put_if_absent(&names::journal::batch(63), Bytes::from_static(b"junk")).await.unwrap();
        let (store, third) = watched(dir.path(), &signer);
        third.put_sealed(SEG2, b"two".to_vec(), meta.clone()).await.unwrap();
        assert_eq!(third.journal().unwrap().flush(&third).await.unwrap(), Some(38));
        assert_eq!(store.journal_lists.load(std::sync::atomic::Ordering::SeqCst), 1);
        let c = chain(dir.path(), &key).await;
        assert_eq!(c.head_seq(), Some(38));
        assert_eq!(c.batches.len(), 39);
        assert!(c.skipped.is_empty(), "{:?}", c.skipped);
        let named: Vec<&str> = c.problems.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            named,
            vec!["journal/00000000000000000063", "journal/00001000000000000000", "journal/18446744073709551615"]
        );
        assert_eq!(c.replay().live.keys().collect::<Vec<_>>(), vec![SEG, SEG2]);
    }

    #[tokio::test]
    async fn a_delete_whose_batch_fails_is_not_journaled_later() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let (store, repo) = watched(dir.path(), &signer);
        repo.put_sealed(SEG, b"one".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        repo.journal().unwrap().flush(&repo).await.unwrap();
        store.fail_journal_puts.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(repo.delete(SEG).await.is_err(), "no batch, no delete");
        assert!(repo.store().head(SEG).await.unwrap().is_some());
        // The outage ends; the next batch (the sidecar's, or a command's at exit) must still say
        // SEG is live: it is, and verify has to keep requiring it.
        store.fail_journal_puts.store(false, std::sync::atomic::Ordering::SeqCst);
        repo.journal().unwrap().set_wal_through(7, 1, 1);
        repo.journal().unwrap().flush(&repo).await.unwrap();
        let r = chain(dir.path(), &signer.verifying_key()).await.replay();
        assert!(r.live.contains_key(SEG) && !r.deleted.contains(SEG), "{r:?}");
    }

    #[tokio::test]
    async fn a_batch_replaced_then_removed_after_a_writer_chained_past_it_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let key = signer.verifying_key();
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        let repo = repo_with(dir.path(), &signer);
        repo.put_sealed(SEG, b"one".to_vec(), meta.clone()).await.unwrap();
        repo.journal().unwrap().flush(&repo).await.unwrap();
        repo.put_sealed(SEG2, b"two".to_vec(), meta.clone()).await.unwrap();
        repo.journal().unwrap().flush(&repo).await.unwrap();
        // A secondary got both batches.
        let raw = repo.store().clone();
        let secondary = LocalStore::new(copy.path());
        for seq in [0, 1] {
            let name = names::journal::batch(seq);
            secondary.put_if_absent(&name, raw.get(&name).await.unwrap()).await.unwrap();
        }
        // Someone with the storage credentials swaps batch 1 (SEG2's put) for garbage and
        // deletes SEG2; a fresh writer chains past the garbage; then the garbage goes too.
        raw.delete(&names::journal::batch(1)).await.unwrap();
        raw.put_if_absent(&names::journal::batch(1), Bytes::from_static(b"junk")).await.unwrap();
        raw.delete(SEG2).await.unwrap();
        let fresh = repo_with(dir.path(), &signer);
        fresh.journal().unwrap().set_wal_through(7, 1, 1);
        assert_eq!(fresh.journal().unwrap().flush(&fresh).await.unwrap(), Some(2));
        raw.delete(&names::journal::batch(1)).await.unwrap();
        let c = chain(dir.path(), &key).await;
        assert_eq!(c.head_seq(), Some(2));
        assert!(!c.replay().live.contains_key(SEG2), "the chain alone no longer knows SEG2");
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        assert_eq!(c.problems[0].name, names::journal::batch(1));
        assert!(c.problems[0].what.contains("chained past seq 1"), "{:?}", c.problems[0]);
        // The secondary's signed batch 1 is what the primary's chain passed over.
        let other = chain(copy.path(), &key).await;
        assert!(other.at(1).is_some());
        assert!(c.passes_over(1) && !c.passes_over(0) && !c.passes_over(2) && !c.passes_over(3));
        assert!(!other.passes_over(1));
    }

    #[tokio::test]
    async fn deletes_retried_one_at_a_time_write_no_batch_each() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let repo = repo_with(dir.path(), &signer);
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        let names: Vec<String> = (1..=5).map(|i| format!("pg/7/wal/00000001000000000000000{i}.seg")).collect();
        for n in &names {
            repo.put_sealed(n, n.clone().into_bytes(), meta.clone()).await.unwrap();
        }
        repo.journal().unwrap().flush(&repo).await.unwrap();
        // Expire's delete_many journals the chunk in one batch; after a failed delete_many it
        // retries one object at a time: those need no batch each.
        repo.delete_many(&names).await.unwrap();
        for n in &names {
            repo.delete(n).await.unwrap();
        }
        let c = chain(dir.path(), &signer.verifying_key()).await;
        assert_eq!(c.batches.len(), 2);
        // A put since makes the next delete journal again.
        repo.put_sealed(&names[0], b"again".to_vec(), meta).await.unwrap();
        repo.delete(&names[0]).await.unwrap();
        let c = chain(dir.path(), &signer.verifying_key()).await;
        assert_eq!(c.batches.len(), 3);
        assert!(c.replay().live.is_empty());
    }

    #[tokio::test]
    async fn deletes_announced_together_write_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([8; 32]);
        let repo = repo_with(dir.path(), &signer);
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        let names: Vec<String> = (1..=4).map(|i| format!("pg/7/backups/2026112{i}T000000Z.manifest")).collect();
        for n in &names {
            repo.put_sealed(n, n.clone().into_bytes(), meta.clone()).await.unwrap();
        }
        repo.journal().unwrap().flush(&repo).await.unwrap();
        // Expire's manifests, children first, one at a time: announced in one batch.
        repo.announce_deletes(&names).await.unwrap();
        for n in names.iter().rev() {
            repo.delete(n).await.unwrap();
        }
        let c = chain(dir.path(), &signer.verifying_key()).await;
        assert_eq!(c.batches.len(), 2);
        assert!(c.replay().live.is_empty());
    }

    #[tokio::test]
    async fn a_paused_writer_finds_the_head_again_instead_of_walking_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let signer = JournalSigner::from_seed([5; 32]);
        let (paused_store, paused) = watched(dir.path(), &signer);
        paused.journal().unwrap().set_wal_through(7, 1, 1);
        paused.journal().unwrap().flush(&paused).await.unwrap();
        let other = repo_with(dir.path(), &signer);
        for n in 0..100u64 {
            other.journal().unwrap().set_wal_through(7, 1, n + 2);
            other.journal().unwrap().flush(&other).await.unwrap();
        }
        paused_store.journal_gets.store(0, std::sync::atomic::Ordering::SeqCst);
        paused_store.journal_lists.store(0, std::sync::atomic::Ordering::SeqCst);
        paused.put_sealed(SEG, b"one".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        assert_eq!(paused.journal().unwrap().flush(&paused).await.unwrap(), Some(101));
        assert_eq!(paused_store.journal_lists.load(std::sync::atomic::Ordering::SeqCst), 0);
        let gets = paused_store.journal_gets.load(std::sync::atomic::Ordering::SeqCst);
        assert!(gets < 20, "{gets} batches read to find the head");
        let c = chain(dir.path(), &signer.verifying_key()).await;
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!((c.batches.len(), c.replay().live.len()), (102, 1));
    }

    #[tokio::test]
    async fn the_high_water_mark_is_never_lowered_by_a_rolled_back_journal() {
        let dir = tempfile::tempdir().unwrap();
        let local = tempfile::tempdir().unwrap();
        let hwm = local.path().join("status.journal-hwm.json");
        let signer = JournalSigner::from_seed([5; 32]);
        let repo = repo_with(dir.path(), &signer);
        repo.journal().unwrap().set_high_water_file(hwm.clone());
        for n in 0..3u64 {
            repo.journal().unwrap().set_wal_through(7, 1, n + 1);
            repo.journal().unwrap().flush(&repo).await.unwrap();
        }
        assert_eq!(HighWater::read(&hwm).unwrap().unwrap().seq, 2);
        // The bucket goes back to an old snapshot; the sidecar starts again and writes on.
        for seq in [1, 2] {
            repo.store().delete(&names::journal::batch(seq)).await.unwrap();
        }
        let restarted = repo_with(dir.path(), &signer);
        restarted.journal().unwrap().set_high_water_file(hwm.clone());
        restarted.journal().unwrap().set_wal_through(7, 1, 9);
        assert_eq!(restarted.journal().unwrap().flush(&restarted).await.unwrap(), Some(1));
        let mark = HighWater::read(&hwm).unwrap().unwrap();
        assert_eq!(mark.seq, 2, "the witness of the lost batches is kept");
        let c = chain(dir.path(), &signer.verifying_key()).await;
        assert!(c.at(2).is_none());
    }

    #[tokio::test]
    async fn a_high_water_mark_of_another_repository_or_key_is_replaced_not_kept() {
        let local = tempfile::tempdir().unwrap();
        let hwm = local.path().join("status.journal-hwm.json");
        let signer = JournalSigner::from_seed([6; 32]);
        let old = tempfile::tempdir().unwrap();
        let repo = repo_with(old.path(), &signer);
        repo.journal().unwrap().set_high_water_file(hwm.clone());
        for n in 0..3u64 {
            repo.journal().unwrap().set_wal_through(7, 1, n + 1);
            repo.journal().unwrap().flush(&repo).await.unwrap();
        }
        let mark = HighWater::read(&hwm).unwrap().unwrap();
        let origin = hex::encode(chain(old.path(), &signer.verifying_key()).await.at(0).unwrap().hash);
        assert_eq!((mark.seq, mark.key_id.as_str(), mark.origin.as_str()), (2, signer.key_id(), origin.as_str()));
        assert!(mark.same_journal(signer.key_id(), Some(&origin)));
        // Re-initialised: a new repository at the same status path. Its batch 0 replaces the mark.
        let new = tempfile::tempdir().unwrap();
        let fresh = repo_with(new.path(), &signer);
        fresh.journal().unwrap().set_high_water_file(hwm.clone());
        fresh.journal().unwrap().set_wal_through(7, 1, 9);
        assert_eq!(fresh.journal().unwrap().flush(&fresh).await.unwrap(), Some(0));
        let replaced = HighWater::read(&hwm).unwrap().unwrap();
        assert_eq!(replaced.seq, 0);
        assert!(!mark.same_journal(signer.key_id(), Some(&replaced.origin)));
        // A new signing key on the old repository: the old key's mark is replaced too.
        let other = JournalSigner::from_seed([7; 32]);
        std::fs::write(&hwm, serde_json::to_vec(&mark).unwrap()).unwrap();
        let rekeyed = repo_with(old.path(), &other);
        rekeyed.journal().unwrap().set_high_water_file(hwm.clone());
        rekeyed.journal().unwrap().set_wal_through(7, 1, 10);
        rekeyed.journal().unwrap().flush(&rekeyed).await.unwrap();
        let after = HighWater::read(&hwm).unwrap().unwrap();
        assert_eq!(after.key_id, other.key_id());
        assert!(!mark.same_journal(other.key_id(), None));
        // A mark that says neither (written before they were kept) still counts.
        let bare: HighWater = serde_json::from_str(r#"{"seq":2,"hash":"00"}"#).unwrap();
        assert!(bare.same_journal(other.key_id(), Some(&origin)));
    }

    #[test]
    fn key_file_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.key");
        let made = JournalSigner::create_file(&path).unwrap();
        assert!(matches!(JournalSigner::create_file(&path), Err(JournalError::Exists { .. })));
        let loaded = JournalSigner::load(&path).unwrap();
        assert_eq!(made.verifying_key(), loaded.verifying_key());
        let text = public_key_text(&loaded.verifying_key());
        assert_eq!(parse_public_key(&text).unwrap(), made.verifying_key());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(JournalSigner::load(&path), Err(JournalError::TooOpen { .. })));
    }
}
