//! Retention of file sets and the sweep of `files/blocks/`, run by `pitr expire` (after dump
//! retention, which removes dump manifests only).
//!
//! Under the expire lock ([`ExpireLock`], the one PostgreSQL's expire takes): per set, manifests
//! that stopped more than `keep_days` ago go, the newest always stays; then every block under
//! [`names::files::BLOCKS`] that no tree manifest and no dump manifest references is deleted.
//! The listings are strict: a manifest that cannot be read stops the sweep (its references are
//! unknown), naming it, and so does a name under `files/sets/` or `files/dumps/` that is no
//! manifest name (another version's manifest). A live backup marker (of a set, a dump or
//! PostgreSQL: blocks its manifest does not reference yet) skips the sweep, and so does a live
//! restore or drill without a plan or with a record that cannot be read (file-set and dump
//! restores announce themselves without one); a PostgreSQL restore or drill that recorded its
//! plan reads nothing under `files/` and does not. The next run sweeps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pitr_archive::expire::refused;
use pitr_archive::names;
use pitr_archive::running::{self, ExpireLock, ReaderNeeds, Untrusted};
use pitr_archive::time::format_rfc3339_seconds;
use pitr_archive::{Repository, RepositoryError};
use serde::Serialize;

use crate::{DumpManifest, FilesError, TreeManifest};

/// How long one set keeps its backups.
#[derive(Debug, Clone)]
pub struct SetRetention {
    /// `[[files]] name`.
    pub set: String,
    /// `[[files]] keep_days`.
    pub keep_days: u32,
}

/// How one run behaves.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The clock retention runs on (µs since the Unix epoch).
    pub now_us: i64,
    /// Report what would go; write and delete nothing (not even the lock).
    pub dry_run: bool,
    /// `[retention] stale_backup_after`: a marker not renewed for this long is a crashed run's.
    pub stale_backup_after: Duration,
    /// `[retention] lock_ttl`.
    pub lock_ttl: Duration,
}

/// A file-set backup removed (or, dry run, that would be).
#[derive(Debug, Clone, Serialize)]
pub struct RemovedTreeBackup {
    /// Its set.
    pub set: String,
    /// Its id.
    pub id: String,
    /// When it stopped (RFC 3339).
    pub stop_time: String,
}

/// An object the storage refused to delete.
#[derive(Debug, Clone, Serialize)]
pub struct RetainedObject {
    /// The object.
    pub object: String,
    /// The storage's answer.
    pub why: String,
}

/// What file-set retention and the block sweep did, in the style of PostgreSQL's expire report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FilesExpireReport {
    /// Nothing was written or deleted.
    pub dry_run: bool,
    /// Backups still listed per set after the run.
    pub kept: BTreeMap<String, usize>,
    /// Manifests removed.
    pub removed_backups: Vec<RemovedTreeBackup>,
    /// Unreferenced blocks deleted.
    pub removed_blocks: usize,
    /// Blocks still referenced by a kept tree or dump manifest.
    pub referenced_blocks: usize,
    /// Stored bytes of everything removed.
    pub removed_bytes: u64,
    /// Why the sweep did not run (a live run, a manifest that does not open); `None` when it ran.
    pub blocks_skipped: Option<String>,
    /// Unreferenced blocks left because the sweep reached its deadline.
    pub blocks_left: usize,
    /// Objects the storage refused to delete (Object Lock, permissions).
    pub retained: Vec<RetainedObject>,
    /// Live-looking markers that do not open: not obeyed.
    pub untrusted: Vec<Untrusted>,
}

/// Applies `sets`' retention, then sweeps unreferenced blocks (see the module doc).
pub async fn expire_files(
    repo: &Repository,
    sets: &[SetRetention],
    opts: &SweepOptions,
) -> Result<FilesExpireReport, FilesError> {
    if opts.dry_run {
        return run(repo, sets, opts, None).await;
    }
    let lock = ExpireLock::acquire(repo, opts.now_us, opts.lock_ttl)
        .await
        .map_err(|e| FilesError::Other(format!("file sets: {e}")))?;
    let result = run(repo, sets, opts, Some(lock.sweep_deadline())).await;
    lock.release().await;
    result
}

async fn run(
    repo: &Repository,
    sets: &[SetRetention],
    opts: &SweepOptions,
    deadline: Option<Instant>,
) -> Result<FilesExpireReport, FilesError> {
    let mut report = FilesExpireReport { dry_run: opts.dry_run, ..Default::default() };
    // Markers first: a run that announces itself after this sees our lock and waits.
    let objects = running::list(repo).await?;
    let mut live = Vec::new();
    for run in running::runs(&objects) {
        if !run.is_live(opts.now_us, opts.stale_backup_after) {
            continue;
        }
        let found = running::open_run(repo, &run, opts.now_us).await;
        report.untrusted.extend(found.untrusted.iter().cloned());
        if found.planted_only() || !found.run.is_live(opts.now_us, opts.stale_backup_after) {
            continue;
        }
        let what = format!("{} {}", found.run.kind, found.run.newest());
        if !found.run.kind.reads() {
            // A backup (of a set, a dump or PostgreSQL): blocks it wrote are not referenced yet.
            live.push(what);
            continue;
        }
        match running::needs_of(&found.trust) {
            // A PostgreSQL restore or drill that has chosen its backups: it reads none of files/.
            // File-set and dump restores announce themselves without a plan.
            ReaderNeeds::Planned(_) => {}
            ReaderNeeds::Unplanned => live.push(format!("{what}, which may read file blocks")),
            ReaderNeeds::Unreadable(e) => live.push(format!("{what}, whose record cannot be read ({e})")),
        }
    }

    // Retention: per configured set, what stopped before its cut, except the newest.
    let (all, damaged) = TreeManifest::list_sound(repo, None).await?;
    let mut removed: BTreeSet<(String, String)> = BTreeSet::new();
    for s in sets {
        let cut = opts.now_us.saturating_sub(i64::from(s.keep_days) * 86_400_000_000);
        let of_set: Vec<&TreeManifest> = all.iter().filter(|m| m.set == s.set).collect();
        let Some((_newest, older)) = of_set.split_last() else { continue };
        for m in older.iter().filter(|m| m.stop_time_us < cut) {
            let name = names::files::tree_manifest(&m.set, &m.id);
            if !opts.dry_run {
                match repo.delete(&name).await {
                    Ok(()) => {}
                    Err(RepositoryError::Store(e)) if refused(&e) => {
                        report.retained.push(RetainedObject { object: name, why: e.to_string() });
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            removed.insert((m.set.clone(), m.id.clone()));
            report.removed_backups.push(RemovedTreeBackup {
                set: m.set.clone(),
                id: m.id.clone(),
                stop_time: format_rfc3339_seconds(m.stop_time_us),
            });
        }
    }
    for m in all.iter().filter(|m| !removed.contains(&(m.set.clone(), m.id.clone()))) {
        *report.kept.entry(m.set.clone()).or_default() += 1;
    }

    // The sweep.
    if !live.is_empty() {
        report.blocks_skipped = Some(format!(
            "a run is in progress ({}): unreferenced file blocks are left for a later run",
            live.join("; ")
        ));
        return Ok(report);
    }
    // A name under files/sets/ or files/dumps/ this version does not read may be another
    // version's manifest: its blocks are unknown.
    let mut foreign = Vec::new();
    for (prefix, parses) in [
        (names::files::SETS, names::files::parse_tree_manifest as fn(&str) -> Option<(&str, &str)>),
        (names::files::DUMPS, names::files::parse_dump_manifest),
    ] {
        foreign.extend(repo.list(prefix).await?.into_iter().filter(|o| parses(&o.name).is_none()).map(|o| o.name));
    }
    if !foreign.is_empty() {
        report.blocks_skipped = Some(format!(
            "{} is not a manifest name this version of pitr reads (another version's, or not pitr's): its blocks are unknown, so none is swept; move it away if it is not pitr's",
            foreign.join(", ")
        ));
        return Ok(report);
    }
    if let Some((name, why)) = damaged.first() {
        report.blocks_skipped =
            Some(format!("file-set manifest {name} cannot be read ({why}): its blocks are unknown, so none is swept"));
        return Ok(report);
    }
    let dumps = match DumpManifest::list(repo, None).await {
        Ok(d) => d,
        Err(e) => {
            report.blocks_skipped =
                Some(format!("a dump manifest cannot be read ({e}): its blocks are unknown, so none is swept"));
            return Ok(report);
        }
    };
    let mut referenced: BTreeSet<&str> = BTreeSet::new();
    for m in all.iter().filter(|m| !removed.contains(&(m.set.clone(), m.id.clone()))) {
        for e in &m.entries {
            if let crate::tree::EntryKind::File { blocks, .. } = &e.kind {
                referenced.extend(blocks.iter().map(|b| b.id.as_str()));
            }
        }
    }
    for d in &dumps {
        referenced.extend(d.blocks.iter().map(|b| b.id.as_str()));
    }
    report.referenced_blocks = referenced.len();
    let listing = repo.list(names::files::BLOCKS).await?;
    let unreferenced: Vec<(String, u64)> = listing
        .into_iter()
        .filter(|o| names::files::parse_block(&o.name).is_some_and(|id| !referenced.contains(id)))
        .map(|o| (o.name, o.size))
        .collect();
    for (i, (name, size)) in unreferenced.iter().enumerate() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            report.blocks_left = unreferenced.len() - i;
            tracing::warn!(
                blocks_left = report.blocks_left,
                "the file-block sweep reached its deadline; the rest goes next run"
            );
            break;
        }
        if !opts.dry_run {
            match repo.delete(name).await {
                Ok(()) => {}
                Err(RepositoryError::Store(e)) if refused(&e) => {
                    report.retained.push(RetainedObject { object: name.clone(), why: e.to_string() });
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        report.removed_blocks += 1;
        report.removed_bytes += size;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{backup, Excludes, SetSpec};
    use crate::BlockStore;
    use pitr_archive::{KeyRing, LocalStore};
    use std::sync::Arc;

    #[tokio::test]
    async fn old_backups_go_the_newest_stays_and_only_unreferenced_blocks_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [5; 32]));
        repo.init().await.unwrap();
        let store = BlockStore::open(&repo).await.unwrap();
        let spec = SetSpec {
            name: "s".into(),
            root: tree.path().to_path_buf(),
            excludes: Excludes::default(),
            stale_backup_after: pitr_archive::running::MIN_STALE_BACKUP_AFTER,
        };
        std::fs::write(tree.path().join("gone"), b"only in the first backup").unwrap();
        std::fs::write(tree.path().join("kept"), b"in both").unwrap();
        let first = backup(&store, &spec, false, &|_| {}).await.unwrap();
        std::fs::remove_file(tree.path().join("gone")).unwrap();
        // Another id: backups of one second share it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = backup(&store, &spec, true, &|_| {}).await.unwrap();
        assert_ne!(first.id, second.id);
        let blocks = || async { repo.list(names::files::BLOCKS).await.unwrap().len() };
        assert_eq!(blocks().await, 2);

        let opts = |dry_run| SweepOptions {
            // Two days on: both backups are older than a 1-day keep.
            now_us: second.stop_time_us + 2 * 86_400_000_000,
            dry_run,
            stale_backup_after: Duration::from_secs(3600 * 24 * 365),
            lock_ttl: Duration::from_secs(60),
        };
        let sets = [SetRetention { set: "s".into(), keep_days: 1 }];
        let dry = expire_files(&repo, &sets, &opts(true)).await.unwrap();
        assert_eq!((dry.removed_backups.len(), dry.removed_blocks), (1, 1));
        assert_eq!(blocks().await, 2, "a dry run deletes nothing");

        let r = expire_files(&repo, &sets, &opts(false)).await.unwrap();
        assert_eq!(r.removed_backups.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), [first.id.as_str()]);
        assert_eq!((r.removed_blocks, r.referenced_blocks, r.blocks_skipped.as_deref()), (1, 1, None));
        assert_eq!(TreeManifest::list(&repo, Some("s")).await.unwrap().len(), 1);
        assert_eq!(blocks().await, 1);
    }

    #[tokio::test]
    async fn a_planned_postgres_reader_does_not_stop_the_sweep_a_file_reader_or_a_foreign_name_does() {
        use pitr_archive::running::{ReadPlan, RunKind, RunMarker};
        use pitr_archive::{ObjectKind, ObjectMeta};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [6; 32]));
        repo.init().await.unwrap();
        let store = BlockStore::open(&repo).await.unwrap();
        let mut w = store.writer();
        w.write(b"a block no manifest references").await.unwrap();
        w.finish().await.unwrap();
        let opts = || SweepOptions {
            now_us: pitr_archive::now_us(),
            dry_run: true,
            stale_backup_after: Duration::from_secs(3600),
            lock_ttl: Duration::from_secs(60),
        };

        // A PostgreSQL restore that recorded its plan reads nothing under files/.
        let pg = RunMarker::begin(&repo, RunKind::Restore).await.unwrap();
        pg.set_plan(ReadPlan { backups: vec!["20261206T010000Z".into()], timeline: 1, wal_from_lsn: 0x1000000 })
            .await
            .unwrap();
        let r = expire_files(&repo, &[], &opts()).await.unwrap();
        assert_eq!((r.blocks_skipped.as_deref(), r.removed_blocks), (None, 1), "{r:?}");

        // A file-set restore announces itself without a plan: it may read any block.
        let files = RunMarker::begin(&repo, RunKind::Restore).await.unwrap();
        let r = expire_files(&repo, &[], &opts()).await.unwrap();
        assert!(r.blocks_skipped.as_deref().is_some_and(|w| w.contains("may read file blocks")), "{r:?}");
        files.release().await;
        pg.release().await;

        // A name under files/sets/ that is no manifest name of this version.
        let odd = format!("{}up/20261206T010000Z.manifest.v2", names::files::SETS);
        repo.put_sealed(&odd, b"{}".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        let r = expire_files(&repo, &[], &opts()).await.unwrap();
        assert!(r.blocks_skipped.as_deref().is_some_and(|w| w.contains(&odd)), "{r:?}");
        assert_eq!(r.removed_blocks, 0);
    }
}
