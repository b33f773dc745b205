//! Logical dumps (`[[dumps]]` sets) in the repository: the byte stream `pg_dump` wrote, as blocks
//! of the shared store, and the manifest that lists them.
//!
//! ```text
//! files/dumps/<set>/<dump id>.manifest    sealed JSON: a DumpManifest (written last)
//! files/blocks/<hh>/<hash>                the dump's content, shared with file sets
//! ```
//! A dump without a manifest does not exist: its blocks are unreferenced and the next sweep
//! removes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pitr_archive::expire::refused;
use pitr_archive::running::{MarkerStale, RunKind, RunMarker};
use pitr_archive::time::{format_compact, format_rfc3339_seconds};
use pitr_archive::{names, now_us};
use pitr_archive::{ObjectKind, ObjectMeta, PutOutcome, Repository, RepositoryError};
use pitr_pgwire::ConnInfo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use crate::manifests::{self, SetManifest};
use crate::pgdump::{self, PgTools};
use crate::{BlockRef, BlockStore, FilesError};

/// What a logical dump is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpManifest {
    /// The dump set (`[[dumps]] name`).
    pub set: String,
    /// The dump id: its start in UTC, `YYYYMMDDTHHMMSSZ`.
    pub id: String,
    /// The database dumped (as the server named it).
    pub database: String,
    /// The server's `server_version_num`.
    pub server_version_num: u32,
    /// What `pg_dump --version` printed.
    pub pg_dump_version: String,
    /// `custom`: `pg_restore` reads it.
    pub format: String,
    /// µs since the Unix epoch: when `pg_dump` was started. Its snapshot is taken just after,
    /// so the dump shows the database as of (about) this moment.
    pub start_time_us: i64,
    /// µs since the Unix epoch: when the last block was durable.
    pub stop_time_us: i64,
    /// The dump's bytes are these blocks' plaintexts, concatenated.
    pub blocks: Vec<BlockRef>,
    /// Bytes of the dump.
    pub len: u64,
    /// SHA-256 of the dump, lower-case hex.
    pub sha256: String,
    /// Bytes this dump's new blocks added to the repository (sealed: compressed, encrypted).
    pub stored_bytes: u64,
}

impl DumpManifest {
    /// Seals and puts the manifest (create-only). Call it last, once every block is durable.
    pub async fn store(&self, repo: &Repository) -> Result<PutOutcome, FilesError> {
        let name = names::files::dump_manifest(&self.set, &self.id);
        let json = serde_json::to_vec(self)
            .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: format!("serialising: {e}") })?;
        Ok(repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await?)
    }

    /// Opens and parses the manifest of dump `id` of `set`; one whose fields disagree with its
    /// name is [`RepositoryError::Invalid`] (a bad object).
    pub async fn load(repo: &Repository, set: &str, id: &str) -> Result<DumpManifest, FilesError> {
        let name = names::files::dump_manifest(set, id);
        let (_, json) = repo.get_opened(&name).await?;
        let m: DumpManifest = serde_json::from_slice(&json)
            .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: format!("dump manifest: {e}") })?;
        if m.set != set || m.id != id {
            let what = format!("it says it is dump {} of set {}", m.id, m.set);
            return Err(RepositoryError::Invalid { name, what }.into());
        }
        Ok(m)
    }

    /// Every dump of `set` (or of every set, with `None`), oldest first. Strict: a manifest that
    /// cannot be read is an error, for expire's block sweep, which must know every reference.
    pub async fn list(repo: &Repository, set: Option<&str>) -> Result<Vec<DumpManifest>, FilesError> {
        manifests::list_strict(repo, set).await
    }

    /// Every dump of `set` (or of every set) that opens, oldest first, and the manifest names
    /// that do not, with why: for listings and restores, which a planted or damaged manifest
    /// must not stop. Storage errors stay errors.
    pub async fn list_sound(
        repo: &Repository,
        set: Option<&str>,
    ) -> Result<(Vec<DumpManifest>, Vec<(String, String)>), FilesError> {
        manifests::list_sound(repo, set).await
    }
}

impl SetManifest for DumpManifest {
    type Order = (i64, String, String);

    fn prefix(set: Option<&str>) -> String {
        set.map_or_else(|| names::files::DUMPS.to_string(), names::files::dumps_prefix)
    }

    fn parse_name(name: &str) -> Option<(&str, &str)> {
        names::files::parse_dump_manifest(name)
    }

    async fn load(repo: &Repository, set: &str, id: &str) -> Result<Self, FilesError> {
        DumpManifest::load(repo, set, id).await
    }

    fn order(&self) -> Self::Order {
        (self.start_time_us, self.set.clone(), self.id.clone())
    }
}

/// A dump just taken: its manifest and how much of it the repository already held.
#[derive(Debug, Clone)]
pub struct TakenDump {
    /// What was stored.
    pub manifest: DumpManifest,
    /// Blocks put by this dump.
    pub new_blocks: u64,
    /// Blocks the repository already held.
    pub reused_blocks: u64,
}

/// How many later seconds a dump id is tried in when its own is taken (by a dump of the same set
/// that started in the same second).
const ID_TRIES: i64 = 60;

/// Takes a dump of `set` from the database `info` leads to with `tools`' `pg_dump`, stores its
/// blocks and then its manifest. Announced by a backup marker while blocks are written, so that
/// no block sweep removes a block it reuses; `stale_backup_after` is `[retention]
/// stale_backup_after`: a dump whose marker went unrenewed for about that long stores no
/// manifest ([`FilesError::MarkerStale`], see [`RunMarker::check_fresh`]). Nothing but
/// unreferenced blocks is left when it fails; the blocks go with the next sweep.
pub async fn take(
    repo: &Repository,
    set: &str,
    tools: &PgTools,
    info: &ConnInfo,
    stale_backup_after: Duration,
) -> Result<TakenDump, FilesError> {
    if !names::files::valid_set_name(set) {
        return Err(FilesError::Other(format!("{set:?} is not a dump set name (1-64 of a-z 0-9 _ -)")));
    }
    let pg_dump_version = tools.version("pg_dump").await?;
    let server = pgdump::server_identity(info).await?;
    let marker = RunMarker::begin(repo, RunKind::Backup).await?;
    let result = async {
        let store = BlockStore::open(repo).await?;
        let run = pgdump::pg_dump(tools, info, &store).await?;
        store_manifest(repo, set, run, pg_dump_version, server, &|| marker.check_fresh(stale_backup_after)).await
    }
    .await;
    marker.release().await;
    result
}

/// Stores the manifest of the dump `run` took, under the first free id from its start on;
/// `fresh` is asked before each put whether the blocks can still be counted on.
async fn store_manifest(
    repo: &Repository,
    set: &str,
    run: pgdump::DumpRun,
    pg_dump_version: String,
    server: pgdump::ServerIdentity,
    fresh: &(dyn Fn() -> Result<(), MarkerStale> + Sync),
) -> Result<TakenDump, FilesError> {
    let mut manifest = DumpManifest {
        set: set.to_string(),
        id: String::new(),
        database: server.database,
        server_version_num: server.server_version_num,
        pg_dump_version,
        format: "custom".into(),
        start_time_us: run.start_time_us,
        stop_time_us: run.stop_time_us,
        blocks: run.stream.blocks,
        len: run.stream.len,
        sha256: run.stream.sha256,
        stored_bytes: run.stream.stored_bytes,
    };
    let first = run.start_time_us.div_euclid(1_000_000);
    for second in first..first + ID_TRIES {
        // An id never names a second still to come.
        while now_us().div_euclid(1_000_000) < second {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        manifest.id = format_compact(second * 1_000_000);
        fresh()?;
        match manifest.store(repo).await {
            Ok(_) => {
                return Ok(TakenDump {
                    manifest,
                    new_blocks: run.stream.new_blocks,
                    reused_blocks: run.stream.reused_blocks,
                })
            }
            Err(FilesError::Repository(RepositoryError::Conflict { .. })) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(FilesError::Other(format!(
        "dump set {set}: every id from {} on for {ID_TRIES} s is taken by another dump",
        format_compact(first * 1_000_000)
    )))
}

/// The dump a restore to `target_us` uses (`None`: the newest): the newest of `dumps` (oldest
/// first, as [`DumpManifest::list`] gives them) that started at or before it.
pub fn choose(dumps: &[DumpManifest], set: &str, target_us: Option<i64>) -> Result<DumpManifest, FilesError> {
    let (Some(oldest), Some(newest)) = (dumps.first(), dumps.last()) else {
        return Err(FilesError::Other(format!("dump set {set} has no dumps (take one with `pitr dump --set {set}`)")));
    };
    let Some(target) = target_us else { return Ok(newest.clone()) };
    dumps.iter().rev().find(|d| d.start_time_us <= target).cloned().ok_or_else(|| {
        FilesError::Other(format!(
            "no dump of set {set} started at or before {}: the oldest is {}, started at {}",
            format_rfc3339_seconds(target),
            oldest.id,
            format_rfc3339_seconds(oldest.start_time_us)
        ))
    })
}

/// Loads dump `m` into the database `info` leads to with `tools`' `pg_restore` (see
/// [`pgdump::pg_restore`]: all or nothing). The caller announces the restore (a restore
/// [`RunMarker`] on the primary repository) before it lists the dumps and chooses `m`, so that no
/// expire removes `m` or its blocks after the choice.
pub async fn restore_into(
    repo: &Repository,
    m: &DumpManifest,
    tools: &PgTools,
    info: &ConnInfo,
) -> Result<u64, FilesError> {
    tools.program("pg_restore")?;
    let store = BlockStore::open(repo).await?;
    pgdump::pg_restore(tools, info, &store, &m.blocks).await
}

/// Writes dump `m` to the new file `path` (a file `pg_restore` reads): refused if `path` exists;
/// written to a temporary file beside it (mode 0600), checked against the manifest's SHA-256,
/// synced and renamed into place without replacing anything, then the directory is synced. A
/// failure leaves no file behind. Returns the bytes written. The caller announces the restore
/// before choosing `m`, as for [`restore_into`].
pub async fn write_file(repo: &Repository, m: &DumpManifest, path: &Path) -> Result<u64, FilesError> {
    if path.symlink_metadata().is_ok() {
        return Err(FilesError::Other(format!("{} exists already; pitr does not overwrite it", path.display())));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| FilesError::Other(format!("{} names no file", path.display())))?;
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name.to_string_lossy()))
        .suffix(".part")
        .tempfile_in(&dir)
        .map_err(|e| FilesError::io(&dir, e))?;
    let (file, temp_path) = temp.into_parts();
    let written = async {
        let store = BlockStore::open(repo).await?;
        let mut out = Hashing { inner: tokio::fs::File::from_std(file), sha: Sha256::new() };
        let n = store.read_to(&m.blocks, &mut out).await?;
        let sha = hex::encode(out.sha.finalize_reset());
        if n != m.len || sha != m.sha256 {
            return Err(FilesError::Other(format!(
                "dump {} of set {}: the blocks make {n} bytes with SHA-256 {sha}, the manifest says {} bytes with {}",
                m.id, m.set, m.len, m.sha256
            )));
        }
        out.inner.sync_all().await.map_err(|e| FilesError::io(&*temp_path, e))?;
        Ok(n)
    }
    .await;
    let n = written?;
    temp_path.persist_noclobber(path).map_err(|e| FilesError::io(path, e.error))?;
    let synced = std::fs::File::open(&dir).and_then(|d| d.sync_all());
    synced.map_err(|e| FilesError::io(&dir, e))?;
    Ok(n)
}

/// A writer that hashes what its inner writer accepted.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Hashing<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.sha.update(&buf[..*n]);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DumpFinding {
    /// The dump set, when the object names one.
    pub set: Option<String>,
    /// The object (a manifest or a block).
    pub object: String,
    /// What is wrong.
    pub message: String,
}

/// What `verify` checked and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DumpVerifyReport {
    /// Dumps whose manifest opened.
    pub dumps: usize,
    /// Distinct blocks those dumps reference (each checked to exist).
    pub blocks: usize,
    /// Referenced blocks the repository lacks, per set (every set seen, 0 included).
    pub missing_blocks: BTreeMap<String, u64>,
    /// Everything wrong; empty when all is well.
    pub findings: Vec<DumpFinding>,
}

/// Checks every dump (of `set`, or of every set): its manifest opens and agrees with itself, and
/// every block it references exists.
pub async fn verify(repo: &Repository, set: Option<&str>) -> Result<DumpVerifyReport, FilesError> {
    let (dumps, damaged) = DumpManifest::list_sound(repo, set).await?;
    let mut report = DumpVerifyReport { dumps: dumps.len(), ..Default::default() };
    for (object, message) in damaged {
        let set = names::files::parse_dump_manifest(&object).map(|(s, _)| s.to_string());
        report.findings.push(DumpFinding { set, object, message });
    }
    let mut checked: BTreeMap<String, bool> = BTreeMap::new();
    for m in &dumps {
        let missing = report.missing_blocks.entry(m.set.clone()).or_default();
        let name = names::files::dump_manifest(&m.set, &m.id);
        let sum: u64 = m.blocks.iter().map(|b| b.len).sum();
        if sum != m.len {
            let message = format!("its blocks add up to {sum} bytes, it says the dump is {} bytes", m.len);
            report.findings.push(DumpFinding { set: Some(m.set.clone()), object: name.clone(), message });
        }
        let mut reported = BTreeSet::new();
        for b in &m.blocks {
            let exists = match checked.get(&b.id) {
                Some(e) => *e,
                None => {
                    let e =
                        repo.store().head(&names::files::block(&b.id)).await.map_err(RepositoryError::from)?.is_some();
                    checked.insert(b.id.clone(), e);
                    e
                }
            };
            if !exists && reported.insert(b.id.clone()) {
                *missing += 1;
                report.findings.push(DumpFinding {
                    set: Some(m.set.clone()),
                    object: names::files::block(&b.id),
                    message: format!("missing: dump {} of set {} needs it", m.id, m.set),
                });
            }
        }
    }
    report.blocks = checked.len();
    Ok(report)
}

/// What [`expire`] did to one set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpExpiry {
    /// Dumps removed (or, in a dry run, that would be), oldest first.
    pub removed: Vec<DumpManifest>,
    /// Dumps past `keep_days` whose manifest the storage refused to delete (S3 Object Lock
    /// retention longer than `keep_days`, a policy that denies deletes): kept, with the
    /// storage's answer. The next run tries again.
    pub retained: Vec<(DumpManifest, String)>,
}

/// Removes the dumps of `set` that started more than `keep_days` days before `now_us`, always
/// keeping the newest (`dry_run`: only says which). Only manifests go; their blocks are left to
/// the block sweep, which runs after and sees them unreferenced. A manifest that does not open is
/// left alone (`pitr verify --source dump` names it), and so is one the storage refuses to delete
/// (reported in [`DumpExpiry::retained`], not an error: the rest of expire must still run).
pub async fn expire(
    repo: &Repository,
    set: &str,
    keep_days: u32,
    now_us: i64,
    dry_run: bool,
) -> Result<DumpExpiry, FilesError> {
    let (dumps, _) = DumpManifest::list_sound(repo, Some(set)).await?;
    let cutoff = now_us.saturating_sub(i64::from(keep_days) * 86_400 * 1_000_000);
    let mut out = DumpExpiry::default();
    let Some((_newest, older)) = dumps.split_last() else { return Ok(out) };
    for d in older.iter().filter(|d| d.start_time_us < cutoff) {
        if !dry_run {
            match repo.delete(&names::files::dump_manifest(&d.set, &d.id)).await {
                Ok(()) => {}
                Err(RepositoryError::Store(e)) if refused(&e) => {
                    out.retained.push((d.clone(), e.to_string()));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        out.removed.push(d.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::{KeyRing, LocalStore, Store};
    use std::sync::Arc;

    fn dump(set: &str, id: &str, start: i64) -> DumpManifest {
        DumpManifest {
            set: set.into(),
            id: id.into(),
            database: "dev".into(),
            server_version_num: 150000,
            pg_dump_version: "pg_dump (PostgreSQL) 15.14".into(),
            format: "custom".into(),
            start_time_us: start,
            stop_time_us: start + 1,
            blocks: vec![BlockRef { id: "ab".repeat(32), len: 3 }],
            len: 3,
            sha256: String::new(),
            stored_bytes: 0,
        }
    }

    #[tokio::test]
    async fn dumps_list_in_time_order_and_a_planted_or_misnamed_manifest_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [1; 32]));
        dump("dev", "20261206T010000Z", 2).store(&repo).await.unwrap();
        dump("dev", "20261205T010000Z", 1).store(&repo).await.unwrap();
        dump("other", "20261205T010000Z", 3).store(&repo).await.unwrap();
        let all = DumpManifest::list(&repo, None).await.unwrap();
        assert_eq!(all.iter().map(|d| d.start_time_us).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(DumpManifest::list(&repo, Some("dev")).await.unwrap().len(), 2);

        // Not sealed by pitr, and a sealed manifest stored under another dump's name.
        store
            .put_if_absent(&names::files::dump_manifest("dev", "20261207T010000Z"), bytes::Bytes::from_static(b"junk"))
            .await
            .unwrap();
        let moved = dump("dev", "20261206T010000Z", 9);
        let json = serde_json::to_vec(&moved).unwrap();
        let name = names::files::dump_manifest("dev", "20261208T010000Z");
        repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();

        assert!(DumpManifest::list(&repo, Some("dev")).await.is_err());
        let (sound, damaged) = DumpManifest::list_sound(&repo, Some("dev")).await.unwrap();
        assert_eq!(sound.len(), 2);
        assert_eq!(damaged.len(), 2, "{damaged:?}");
    }

    async fn stored_dump(repo: &Repository, set: &str, id: &str, start: i64, content: &[u8]) -> DumpManifest {
        let store = BlockStore::open(repo).await.unwrap();
        let mut w = store.writer();
        w.write(content).await.unwrap();
        let s = w.finish().await.unwrap();
        let m = DumpManifest { blocks: s.blocks, len: s.len, sha256: s.sha256, ..dump(set, id, start) };
        m.store(repo).await.unwrap();
        m
    }

    #[test]
    fn a_restore_takes_the_newest_dump_started_at_or_before_its_time() {
        let dumps = [dump("dev", "20261205T010000Z", 100), dump("dev", "20261206T010000Z", 200)];
        assert_eq!(choose(&dumps, "dev", None).unwrap().id, "20261206T010000Z");
        assert_eq!(choose(&dumps, "dev", Some(199)).unwrap().id, "20261205T010000Z");
        assert_eq!(choose(&dumps, "dev", Some(200)).unwrap().id, "20261206T010000Z");
        let err = choose(&dumps, "dev", Some(99)).unwrap_err().to_string();
        assert!(
            err.contains("no dump of set dev started at or before") && err.contains("oldest is 20261205T010000Z"),
            "{err}"
        );
        let err = choose(&[], "dev", None).unwrap_err().to_string();
        assert!(err.contains("has no dumps") && err.contains("pitr dump --set dev"), "{err}");
    }

    #[tokio::test]
    async fn expire_removes_old_manifests_but_never_the_newest_and_verify_finds_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [1; 32]));
        repo.init().await.unwrap();
        let day = 86_400_000_000i64;
        let now = 100 * day;
        let old = stored_dump(&repo, "dev", "20261201T010000Z", now - 9 * day, b"nine days old").await;
        stored_dump(&repo, "dev", "20261205T010000Z", now - 5 * day, b"five days old").await;
        stored_dump(&repo, "lone", "20261101T010000Z", now - 40 * day, b"the only one").await;

        let would = expire(&repo, "dev", 7, now, true).await.unwrap();
        assert_eq!(would.removed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["20261201T010000Z"]);
        assert_eq!(DumpManifest::list(&repo, Some("dev")).await.unwrap().len(), 2, "a dry run removed something");
        assert_eq!(expire(&repo, "dev", 7, now, false).await.unwrap(), would);
        let left: Vec<String> = DumpManifest::list(&repo, None).await.unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(left, ["20261101T010000Z", "20261205T010000Z"]);
        // The newest stays however old it is.
        assert_eq!(expire(&repo, "lone", 7, now, false).await.unwrap(), DumpExpiry::default());

        let clean = verify(&repo, None).await.unwrap();
        assert!(clean.findings.is_empty(), "{:?}", clean.findings);
        assert_eq!((clean.dumps, clean.blocks), (2, 2));
        // The removed dump's block is unreferenced now, not missing; a kept dump's block is.
        let kept = DumpManifest::load(&repo, "dev", "20261205T010000Z").await.unwrap();
        store.delete(&names::files::block(&kept.blocks[0].id)).await.unwrap();
        assert_ne!(old.blocks[0].id, kept.blocks[0].id);
        let found = verify(&repo, None).await.unwrap();
        assert_eq!(found.findings.len(), 1, "{:?}", found.findings);
        assert!(found.findings[0].message.contains("missing: dump 20261205T010000Z of set dev"));
        assert_eq!(found.missing_blocks.get("dev"), Some(&1));
        assert_eq!(found.missing_blocks.get("lone"), Some(&0));
    }

    /// A local store that refuses to delete dump manifests, as S3 does under an Object Lock
    /// default retention longer than `keep_days`.
    #[derive(Debug)]
    struct Locked(LocalStore);

    #[async_trait::async_trait]
    impl Store for Locked {
        async fn put_if_absent(&self, name: &str, data: bytes::Bytes) -> Result<PutOutcome, pitr_archive::StoreError> {
            self.0.put_if_absent(name, data).await
        }
        async fn get(&self, name: &str) -> Result<bytes::Bytes, pitr_archive::StoreError> {
            self.0.get(name).await
        }
        async fn get_range(
            &self,
            name: &str,
            range: std::ops::Range<u64>,
        ) -> Result<bytes::Bytes, pitr_archive::StoreError> {
            self.0.get_range(name, range).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<pitr_archive::ObjectInfo>, pitr_archive::StoreError> {
            self.0.list(prefix).await
        }
        async fn delete(&self, name: &str) -> Result<(), pitr_archive::StoreError> {
            if name.contains("20261201") {
                return Err(pitr_archive::StoreError::Denied {
                    op: "delete",
                    name: name.into(),
                    location: self.0.location(),
                    message: "AccessDenied: object is WORM protected".into(),
                });
            }
            self.0.delete(name).await
        }
        async fn head(&self, name: &str) -> Result<Option<pitr_archive::ObjectInfo>, pitr_archive::StoreError> {
            self.0.head(name).await
        }
        fn location(&self) -> String {
            self.0.location()
        }
    }

    #[tokio::test]
    async fn a_dump_the_storage_refuses_to_delete_is_retained_and_the_others_still_go() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(Locked(LocalStore::new(dir.path()))), KeyRing::from_key("k", [1; 32]));
        repo.init().await.unwrap();
        let day = 86_400_000_000i64;
        let now = 100 * day;
        stored_dump(&repo, "dev", "20261130T010000Z", now - 10 * day, b"ten days old").await;
        stored_dump(&repo, "dev", "20261201T010000Z", now - 9 * day, b"nine days old, locked").await;
        stored_dump(&repo, "dev", "20261202T010000Z", now - 8 * day, b"eight days old").await;
        stored_dump(&repo, "dev", "20261205T010000Z", now - 5 * day, b"five days old").await;

        let done = expire(&repo, "dev", 7, now, false).await.unwrap();
        let ids = |ds: &[DumpManifest]| ds.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&done.removed), ["20261130T010000Z", "20261202T010000Z"]);
        assert_eq!(done.retained.len(), 1, "{:?}", done.retained);
        assert_eq!(done.retained[0].0.id, "20261201T010000Z");
        assert!(done.retained[0].1.contains("WORM"), "{}", done.retained[0].1);
        let left = ids(&DumpManifest::list(&repo, Some("dev")).await.unwrap());
        assert_eq!(left, ["20261201T010000Z", "20261205T010000Z"]);
    }

    #[tokio::test]
    async fn a_dump_whose_marker_went_stale_stores_no_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [1; 32]));
        repo.init().await.unwrap();
        let store = BlockStore::open(&repo).await.unwrap();
        let mut w = store.writer();
        w.write(b"a dump").await.unwrap();
        let run =
            pgdump::DumpRun { stream: w.finish().await.unwrap(), start_time_us: now_us(), stop_time_us: now_us() };
        let server = || pgdump::ServerIdentity { database: "dev".into(), server_version_num: 150000 };
        let stale =
            || Err(MarkerStale { unrenewed: Duration::from_secs(3590), stale_after: Duration::from_secs(3600) });
        let err = store_manifest(&repo, "dev", run.clone(), "pg_dump 15".into(), server(), &stale).await.unwrap_err();
        assert!(matches!(err, FilesError::MarkerStale(_)), "{err}");
        assert!(err.to_string().contains("nothing was stored, run it again"), "{err}");
        assert!(DumpManifest::list(&repo, None).await.unwrap().is_empty(), "a manifest was stored");
        let taken = store_manifest(&repo, "dev", run, "pg_dump 15".into(), server(), &|| Ok(())).await.unwrap();
        assert_eq!(DumpManifest::list(&repo, None).await.unwrap(), [taken.manifest]);
    }

    #[tokio::test]
    async fn output_files_are_new_complete_and_checked_and_nothing_is_left_when_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [1; 32]));
        repo.init().await.unwrap();
        let content: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let m = stored_dump(&repo, "dev", "20261205T010000Z", 1, &content).await;
        let path = out.path().join("dev.dump");
        assert_eq!(write_file(&repo, &m, &path).await.unwrap(), content.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), content);

        let err = write_file(&repo, &m, &path).await.unwrap_err().to_string();
        assert!(err.contains("exists already"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), content);

        let lying = DumpManifest { sha256: "00".repeat(32), ..m.clone() };
        let other = out.path().join("other.dump");
        let err = write_file(&repo, &lying, &other).await.unwrap_err().to_string();
        assert!(err.contains("the manifest says"), "{err}");
        let names: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["dev.dump"], "a failed write left something behind");
    }
}
