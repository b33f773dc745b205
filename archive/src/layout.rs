//! The repository: where each kind of object lives, and catalogs built by listing.
//!
//! ```text
//! pitr-repository                               marker, sealed: proves the key opens this repository
//! pg/<system id>/cluster                        ClusterInfo (segment size, page size, version)
//! pg/<system id>/wal/<segment>.seg              a whole WAL segment (<segment> as PostgreSQL names it)
//! pg/<system id>/wal/<segment>.<from>-<to>.chunk  bytes [from, to) of a segment still being written
//! pg/<system id>/wal/<timeline>.history         a timeline history file
//! ```
//! Object storage is the only shared state, so everything here is derived from names; nothing is
//! kept in an index that could disagree with the objects.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use crate::keys::KeyRing;
use crate::seal::{self, ObjectKind, ObjectMeta, SealError, SealedHeader};
use crate::store::{ObjectInfo, PutOutcome, Store, StoreError};

pub const MARKER: &str = "pitr-repository";
const MARKER_TEXT: &str = "pitr repository format 1\n";

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("{location} is not a pitr repository (no {MARKER} object); run `pitr init` first")]
    NotInitialised { location: String },
    #[error(
        "object {name} in {location} already exists with different contents: is another pitr writing the same cluster?"
    )]
    Conflict { name: String, location: String },
    #[error("object {name}: {what}")]
    Invalid { name: String, what: String },
    #[error("repository {location} holds several PostgreSQL clusters ({ids}); set `system_id` in [postgres]")]
    AmbiguousCluster { location: String, ids: String },
    #[error("repository {location} holds no PostgreSQL cluster yet (nothing was streamed)")]
    NoCluster { location: String },
}

/// What the repository records about one PostgreSQL cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    pub system_id: u64,
    pub wal_segment_size: u64,
    pub wal_page_size: u64,
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
    /// What messages call this repository (`primary`, or a secondary's name).
    name: String,
    fallbacks: Arc<Vec<NamedStore>>,
}

/// A repository's store under its configured name.
#[derive(Debug, Clone)]
pub struct NamedStore {
    pub name: String,
    pub store: Arc<dyn Store>,
}

#[derive(Debug, Clone, Copy)]
enum Read {
    Whole,
    Header,
}

/// A read object: its header, and its plaintext for a whole read (empty for a header read).
struct Opened {
    header: SealedHeader,
    plaintext: Vec<u8>,
}

async fn read_from(store: &Arc<dyn Store>, keys: &KeyRing, name: &str, what: Read) -> Result<Opened, RepositoryError> {
    match what {
        Read::Whole => {
            let bytes = store.get(name).await?;
            let keys = keys.clone();
            let name = name.to_string();
            let (header, plaintext) = tokio::task::spawn_blocking(move || seal::open(&name, &bytes, &keys))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
            Ok(Opened { header, plaintext })
        }
        Read::Header => {
            let bytes = store.get_range(name, 0..seal::HEADER_PREFIX_LEN).await?;
            Ok(Opened { header: seal::open_header(name, &bytes, keys)?, plaintext: Vec::new() })
        }
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

impl Repository {
    pub fn new(store: Arc<dyn Store>, keys: KeyRing) -> Repository {
        Repository { store, keys, zstd_level: 3, name: "primary".into(), fallbacks: Arc::new(Vec::new()) }
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

    pub fn with_zstd_level(mut self, level: i32) -> Repository {
        self.zstd_level = level;
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn location(&self) -> String {
        self.store.location()
    }

    /// Writes the marker if missing; if present, proves the key opens it.
    pub async fn init(&self) -> Result<PutOutcome, RepositoryError> {
        let outcome =
            self.put_sealed(MARKER, MARKER_TEXT.as_bytes().to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await?;
        Ok(outcome)
    }

    /// Fails unless this is an initialised repository that the key ring opens.
    pub async fn check(&self) -> Result<(), RepositoryError> {
        match self.get_opened(MARKER).await {
            Ok(_) => Ok(()),
            Err(RepositoryError::Store(e)) if e.is_not_found() => {
                Err(RepositoryError::NotInitialised { location: self.location() })
            }
            Err(e) => Err(e),
        }
    }

    /// Seals and stores `plaintext` as `name`. If the name exists already (a retry after a crash),
    /// the existing object must hold the same plaintext; anything else is a conflict.
    pub async fn put_sealed(
        &self,
        name: &str,
        plaintext: Vec<u8>,
        meta: ObjectMeta,
    ) -> Result<PutOutcome, RepositoryError> {
        Ok(self.put_sealed_sized(name, plaintext, meta).await?.0)
    }

    /// As [`Repository::put_sealed`], also returning the size of the sealed object written (0 if
    /// it existed already).
    pub async fn put_sealed_sized(
        &self,
        name: &str,
        plaintext: Vec<u8>,
        meta: ObjectMeta,
    ) -> Result<(PutOutcome, u64), RepositoryError> {
        let keys = self.keys.clone();
        let level = self.zstd_level;
        let owned_name = name.to_string();
        let (sealed, plaintext) = tokio::task::spawn_blocking(move || {
            let sealed = seal::seal(&owned_name, &plaintext, &meta, &keys, level);
            (sealed, plaintext)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let sealed_len = sealed.len() as u64;
        match self.store.put_if_absent(name, Bytes::from(sealed)).await? {
            PutOutcome::Created => Ok((PutOutcome::Created, sealed_len)),
            PutOutcome::AlreadyExists => {
                let (_, existing) = self.get_opened(name).await?;
                if existing == plaintext {
                    Ok((PutOutcome::AlreadyExists, 0))
                } else {
                    Err(RepositoryError::Conflict { name: name.to_string(), location: self.location() })
                }
            }
        }
    }

    /// Fetches, authenticates and decrypts `name` (from a fallback if this repository cannot).
    pub async fn get_opened(&self, name: &str) -> Result<(SealedHeader, Vec<u8>), RepositoryError> {
        let opened = self.read(name, Read::Whole).await?;
        Ok((opened.header, opened.plaintext))
    }

    /// Reads and authenticates only the header of `name` (from a fallback if this repository cannot).
    pub async fn read_header(&self, name: &str) -> Result<SealedHeader, RepositoryError> {
        Ok(self.read(name, Read::Header).await?.header)
    }

    pub async fn delete(&self, name: &str) -> Result<(), RepositoryError> {
        Ok(self.store.delete(name).await?)
    }

    pub async fn delete_many(&self, names: &[String]) -> Result<(), RepositoryError> {
        Ok(self.store.delete_many(names).await?)
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, RepositoryError> {
        Ok(self.store.list(prefix).await?)
    }

    /// System ids of the PostgreSQL clusters in this repository.
    pub async fn clusters(&self) -> Result<Vec<u64>, RepositoryError> {
        let mut ids = BTreeSet::new();
        for obj in self.store.list("pg/").await? {
            let mut parts = obj.name.split('/');
            if let (Some("pg"), Some(id), Some("cluster")) = (parts.next(), parts.next(), parts.next()) {
                if let Ok(id) = id.parse::<u64>() {
                    ids.insert(id);
                }
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

    pub async fn cluster_info(&self, system_id: u64) -> Result<ClusterInfo, RepositoryError> {
        let name = format!("pg/{system_id}/cluster");
        let (_, text) = self.get_opened(&name).await?;
        let text = String::from_utf8(text)
            .map_err(|_| RepositoryError::Invalid { name: name.clone(), what: "not UTF-8".into() })?;
        ClusterInfo::from_text(&name, &text)
    }

    /// Records a cluster; an existing record must agree (same segment size etc.).
    pub async fn put_cluster_info(&self, info: &ClusterInfo) -> Result<(), RepositoryError> {
        let name = format!("pg/{}/cluster", info.system_id);
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

/// Names and catalog of one cluster's WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalLayout {
    pub system_id: u64,
    pub segment_size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WalObject {
    Chunk { timeline: u32, segno: u64, from: u32, to: u32 },
    Segment { timeline: u32, segno: u64 },
    History { timeline: u32 },
}

impl WalLayout {
    pub fn new(info: &ClusterInfo) -> WalLayout {
        WalLayout { system_id: info.system_id, segment_size: info.wal_segment_size }
    }

    pub fn prefix(&self) -> String {
        format!("pg/{}/wal/", self.system_id)
    }

    fn segments_per_xlog_id(&self) -> u64 {
        0x1_0000_0000 / self.segment_size
    }

    /// PostgreSQL's file name for a segment: timeline, then the segment number in two halves.
    pub fn segment_file_name(&self, timeline: u32, segno: u64) -> String {
        let per = self.segments_per_xlog_id();
        format!("{timeline:08X}{:08X}{:08X}", segno / per, segno % per)
    }

    pub fn parse_segment_file_name(&self, name: &str) -> Option<(u32, u64)> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        if seg >= self.segments_per_xlog_id() {
            return None;
        }
        Some((tli, log * self.segments_per_xlog_id() + seg))
    }

    pub fn segno_of(&self, lsn: u64) -> u64 {
        lsn / self.segment_size
    }

    pub fn segment_start(&self, segno: u64) -> u64 {
        segno * self.segment_size
    }

    pub fn object_name(&self, obj: &WalObject) -> String {
        match *obj {
            WalObject::Segment { timeline, segno } => {
                format!("{}{}.seg", self.prefix(), self.segment_file_name(timeline, segno))
            }
            WalObject::Chunk { timeline, segno, from, to } => {
                format!("{}{}.{from:08X}-{to:08X}.chunk", self.prefix(), self.segment_file_name(timeline, segno))
            }
            WalObject::History { timeline } => format!("{}{timeline:08X}.history", self.prefix()),
        }
    }

    pub fn parse_object_name(&self, name: &str) -> Option<WalObject> {
        let rest = name.strip_prefix(&self.prefix())?;
        if let Some(seg) = rest.strip_suffix(".seg") {
            let (timeline, segno) = self.parse_segment_file_name(seg)?;
            return Some(WalObject::Segment { timeline, segno });
        }
        if let Some(chunk) = rest.strip_suffix(".chunk") {
            let (seg, range) = chunk.split_once('.')?;
            let (timeline, segno) = self.parse_segment_file_name(seg)?;
            let (from, to) = range.split_once('-')?;
            if from.len() != 8 || to.len() != 8 {
                return None;
            }
            let from = u32::from_str_radix(from, 16).ok()?;
            let to = u32::from_str_radix(to, 16).ok()?;
            if from >= to || u64::from(to) > self.segment_size {
                return None;
            }
            return Some(WalObject::Chunk { timeline, segno, from, to });
        }
        if let Some(tli) = rest.strip_suffix(".history") {
            if tli.len() != 8 {
                return None;
            }
            return Some(WalObject::History { timeline: u32::from_str_radix(tli, 16).ok()? });
        }
        None
    }
}

/// What the archive holds of one segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentEntry {
    pub whole: bool,
    /// Byte ranges within the segment held as chunks, sorted.
    pub chunks: Vec<(u32, u32)>,
}

impl SegmentEntry {
    /// How many bytes from the segment's start the archive holds: the whole segment if there is
    /// a segment object, else the contiguous run of chunks from offset 0 (0 when the chunks do
    /// not start at the segment's beginning).
    pub fn held_from_start(&self, segment_size: u64) -> u64 {
        if self.whole {
            return segment_size;
        }
        match self.contiguous_chunk_end() {
            Some((0, end)) => u64::from(end),
            _ => 0,
        }
    }

    /// Whether every byte of the segment is held (a segment object, or chunks covering it).
    pub fn is_complete(&self, segment_size: u64) -> bool {
        self.held_from_start(segment_size) >= segment_size
    }

    /// End offset of the contiguous run of chunks starting at the first chunk.
    pub fn contiguous_chunk_end(&self) -> Option<(u32, u32)> {
        let first = self.chunks.first()?;
        let mut end = first.1;
        for &(from, to) in &self.chunks[1..] {
            if from > end {
                break;
            }
            end = end.max(to);
        }
        Some((first.0, end))
    }
}

#[derive(Debug, Clone)]
pub struct WalCatalog {
    pub layout: WalLayout,
    pub segments: BTreeMap<(u32, u64), SegmentEntry>,
    pub histories: BTreeSet<u32>,
}

impl WalCatalog {
    pub async fn build(repo: &Repository, layout: WalLayout) -> Result<WalCatalog, RepositoryError> {
        let objects = repo.list(&layout.prefix()).await?;
        Ok(Self::from_names(layout, objects.iter().map(|o| o.name.as_str())))
    }

    pub fn from_names<'a>(layout: WalLayout, names: impl Iterator<Item = &'a str>) -> WalCatalog {
        let mut segments: BTreeMap<(u32, u64), SegmentEntry> = BTreeMap::new();
        let mut histories = BTreeSet::new();
        for name in names {
            match layout.parse_object_name(name) {
                Some(WalObject::Segment { timeline, segno }) => {
                    segments.entry((timeline, segno)).or_default().whole = true
                }
                Some(WalObject::Chunk { timeline, segno, from, to }) => {
                    segments.entry((timeline, segno)).or_default().chunks.push((from, to))
                }
                Some(WalObject::History { timeline }) => {
                    histories.insert(timeline);
                }
                None => {}
            }
        }
        for entry in segments.values_mut() {
            entry.chunks.sort_unstable();
        }
        WalCatalog { layout, segments, histories }
    }

    pub fn latest_timeline(&self) -> Option<u32> {
        self.segments.keys().map(|(t, _)| *t).max()
    }

    /// The LSN just past the newest WAL held for `timeline`, following its last segment.
    pub fn end_lsn(&self, timeline: u32) -> Option<u64> {
        let ((_, segno), entry) = self.segments.range((timeline, 0)..=(timeline, u64::MAX)).next_back()?;
        let start = self.layout.segment_start(*segno);
        if entry.whole {
            return Some(start + self.layout.segment_size);
        }
        entry.contiguous_chunk_end().map(|(_, end)| start + u64::from(end))
    }

    /// Chunk objects that a whole segment object has made redundant (left by a crash between the
    /// compaction put and the chunk deletes).
    pub fn redundant_chunks(&self) -> Vec<WalObject> {
        let mut out = Vec::new();
        for (&(timeline, segno), entry) in &self.segments {
            if entry.whole {
                for &(from, to) in &entry.chunks {
                    out.push(WalObject::Chunk { timeline, segno, from, to });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn layout() -> WalLayout {
        WalLayout { system_id: 7, segment_size: 16 << 20 }
    }

    #[test]
    fn segment_names_match_postgres() {
        let l = layout();
        assert_eq!(l.segment_file_name(1, 0x1_0000_0000 / (16 << 20) + 0x2A), "00000001000000010000002A");
        assert_eq!(l.parse_segment_file_name("00000001000000010000002A"), Some((1, 256 + 0x2A)));
        assert_eq!(l.parse_segment_file_name("000000010000000100000100"), None);
        for obj in [
            WalObject::Segment { timeline: 2, segno: 77 },
            WalObject::Chunk { timeline: 1, segno: 3, from: 0, to: 0x2000 },
            WalObject::History { timeline: 3 },
        ] {
            assert_eq!(l.parse_object_name(&l.object_name(&obj)), Some(obj));
        }
        assert_eq!(l.parse_object_name("pg/7/wal/junk"), None);
        assert_eq!(l.parse_object_name("pg/7/wal/000000010000000000000003.00002000-00001000.chunk"), None);
    }

    #[test]
    fn catalog_end_follows_chunks_and_segments() {
        let l = layout();
        let names = [
            l.object_name(&WalObject::Segment { timeline: 1, segno: 1 }),
            l.object_name(&WalObject::Chunk { timeline: 1, segno: 2, from: 0, to: 0x100 }),
            l.object_name(&WalObject::Chunk { timeline: 1, segno: 2, from: 0x100, to: 0x300 }),
            l.object_name(&WalObject::Chunk { timeline: 1, segno: 2, from: 0x500, to: 0x600 }),
            l.object_name(&WalObject::Segment { timeline: 2, segno: 5 }),
            l.object_name(&WalObject::Chunk { timeline: 2, segno: 5, from: 0, to: 0x10 }),
        ];
        let cat = WalCatalog::from_names(l, names.iter().map(|s| s.as_str()));
        assert_eq!(cat.end_lsn(1), Some(2 * (16 << 20) + 0x300));
        assert_eq!(cat.end_lsn(2), Some(6 * (16 << 20)));
        assert_eq!(cat.latest_timeline(), Some(2));
        assert_eq!(cat.redundant_chunks(), vec![WalObject::Chunk { timeline: 2, segno: 5, from: 0, to: 0x10 }]);
        assert_eq!(cat.end_lsn(3), None);
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
