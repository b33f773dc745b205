//! Taking a backup of a set: walk, read each file through a block writer, write the manifest last.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pitr_archive::running::{RunKind, RunMarker};
use pitr_archive::time::format_compact;
use pitr_archive::{now_us, PutOutcome, RepositoryError};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::walk::{self, entry_of, link_target, open_in_tree, stamp, Excludes, Found};
use super::{EntryKind, Skipped, TreeEntry, TreeKind, TreeManifest};
use crate::{BlockStore, FilesError};

/// Files read at the same time (each with its own block puts in flight): small files cost a
/// put each, so several at once keep the storage busy.
const FILES_IN_FLIGHT: usize = 8;

/// Reads of a file that keeps changing before it is kept as it was last read.
const READS: usize = 3;

/// A `[[files]]` set as a backup needs it.
#[derive(Debug, Clone)]
pub struct SetSpec {
    /// `[[files]] name`.
    pub name: String,
    /// `[[files]] path`: a directory or a single file, absolute.
    pub root: PathBuf,
    /// `[[files]] exclude`.
    pub excludes: Excludes,
    /// `[retention] stale_backup_after`: a backup whose running marker went unrenewed nearly
    /// that long stores no manifest (an expire may have swept blocks it reuses).
    pub stale_backup_after: std::time::Duration,
}

/// How far a backup is, for a progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackupProgress {
    /// Paths done.
    pub done: u64,
    /// Paths found by the walk.
    pub total: u64,
    /// Bytes of content done (read, or reused from the parent).
    pub bytes: u64,
    /// Bytes of content the walk found.
    pub total_bytes: u64,
}

/// Backs up `set` into `store` and returns its manifest, stored. `incremental`: files whose size,
/// mtime, ctime and inode equal those in the set's newest backup are not read (without a
/// previous backup this is a full). The run announces itself with a backup marker first, so
/// expire sweeps no block meanwhile (and none of the parent's blocks this backup reuses).
pub async fn backup(
    store: &BlockStore,
    set: &SetSpec,
    incremental: bool,
    progress: &(dyn Fn(BackupProgress) + Sync),
) -> Result<TreeManifest, FilesError> {
    let marker = RunMarker::begin(store.repo(), RunKind::Backup).await?;
    let result = run(store, set, incremental, progress, &marker).await;
    marker.release().await;
    result
}

enum Outcome {
    Entry { entry: TreeEntry, bytes_read: u64, new_blocks: u64, reused_blocks: u64, stored_bytes: u64, changed: bool },
    Skipped(Skipped),
}

async fn run(
    store: &BlockStore,
    set: &SetSpec,
    incremental: bool,
    progress: &(dyn Fn(BackupProgress) + Sync),
    marker: &RunMarker,
) -> Result<TreeManifest, FilesError> {
    let start = now_us();
    let parent = if incremental {
        let (sound, _) = TreeManifest::list_sound(store.repo(), Some(&set.name)).await?;
        sound.into_iter().last()
    } else {
        None
    };
    let root = set.root.clone();
    let excludes = set.excludes.clone();
    let (found, mut skipped) = tokio::task::spawn_blocking(move || walk::walk(&root, &excludes))
        .await
        .map_err(|e| FilesError::Other(format!("walking {}: {e}", set.root.display())))??;

    let mut p = BackupProgress {
        total: found.len() as u64,
        total_bytes: found.iter().filter(|f| f.meta.is_file()).map(|f| f.meta.size()).sum(),
        ..Default::default()
    };
    let mut entries: BTreeMap<String, TreeEntry> = BTreeMap::new();
    let mut changed = Vec::new();
    let (mut bytes_read, mut new_blocks, mut reused_blocks, mut stored_bytes) = (0, 0, 0, 0);
    let mut tasks: JoinSet<Result<Outcome, FilesError>> = JoinSet::new();
    let mut pending = found.into_iter();
    loop {
        while tasks.len() < FILES_IN_FLIGHT {
            let Some(f) = pending.next() else { break };
            let reuse = parent
                .as_ref()
                // A backup of another root (the set's path was changed) says nothing about these files.
                .filter(|m| m.root == set.root.display().to_string())
                .and_then(|m| m.entry(&f.rel))
                .and_then(|e| reusable(e, &f));
            let store = store.clone();
            tasks.spawn(async move { one(&store, f, reuse).await });
        }
        let Some(done) = tasks.join_next().await else { break };
        let outcome = done.map_err(|e| FilesError::Other(format!("a file task failed: {e}")))??;
        p.done += 1;
        match outcome {
            Outcome::Entry { entry, bytes_read: r, new_blocks: n, reused_blocks: u, stored_bytes: s, changed: c } => {
                p.bytes += entry.size();
                bytes_read += r;
                new_blocks += n;
                reused_blocks += u;
                stored_bytes += s;
                if c {
                    tracing::warn!(set = %set.name, path = %entry.path, "the file kept changing while it was read ({READS} reads): its last read is kept and may be torn");
                    changed.push(entry.path.clone());
                }
                entries.insert(entry.path.clone(), entry);
            }
            Outcome::Skipped(s) => skipped.push(s),
        }
        progress(p);
    }
    for s in &skipped {
        tracing::warn!(set = %set.name, path = %s.path, "left out of the backup: {}", s.why);
    }
    changed.sort();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let entries: Vec<TreeEntry> = entries.into_values().collect();
    let count = |k: fn(&EntryKind) -> bool| entries.iter().filter(|e| k(&e.kind)).count() as u64;
    let mut manifest = TreeManifest {
        set: set.name.clone(),
        id: format_compact(start),
        kind: if parent.is_some() { TreeKind::Incremental } else { TreeKind::Full },
        parent: parent.map(|m| m.id),
        root: set.root.display().to_string(),
        start_time_us: start,
        stop_time_us: now_us(),
        files: count(|k| matches!(k, EntryKind::File { .. })),
        dirs: count(|k| matches!(k, EntryKind::Dir)),
        symlinks: count(|k| matches!(k, EntryKind::Symlink { .. })),
        logical_bytes: entries.iter().map(TreeEntry::size).sum(),
        entries,
        changed,
        skipped,
        bytes_read,
        new_blocks,
        reused_blocks,
        stored_bytes,
    };
    // Two backups of a set started in the same second: the later one takes the next free second.
    for _ in 0..10 {
        // Not the configured stale_backup_after (unknown here) but its floor: never laxer.
        marker.check_fresh(set.stale_backup_after)?;
        match manifest.store(store.repo()).await {
            Ok(PutOutcome::Created) => return Ok(manifest),
            // Taken: the same name with other contents (a put that found an identical object
            // would be this one's own retry).
            Ok(PutOutcome::AlreadyExists) | Err(FilesError::Repository(RepositoryError::Conflict { .. })) => {}
            Err(e) => return Err(e),
        }
        let now = now_us();
        let next_second = 1_000_000 - now.rem_euclid(1_000_000);
        tokio::time::sleep(Duration::from_micros(next_second as u64)).await;
        manifest.id = format_compact(now_us());
    }
    Err(FilesError::Other(format!(
        "backup of set {}: every id up to {} is taken by another backup of the set",
        set.name, manifest.id
    )))
}

/// The parent's content for `found`, if the file is unchanged by every sign the filesystem keeps.
fn reusable(parent: &TreeEntry, found: &Found) -> Option<EntryKind> {
    let m = &found.meta;
    let same = m.is_file()
        && matches!(parent.kind, EntryKind::File { size, .. } if size == m.size())
        && parent.mtime == m.mtime()
        && i64::from(parent.mtime_nsec) == m.mtime_nsec()
        && parent.ctime == m.ctime()
        && i64::from(parent.ctime_nsec) == m.ctime_nsec()
        && parent.inode == m.ino();
    same.then(|| parent.kind.clone())
}

async fn one(store: &BlockStore, f: Found, reuse: Option<EntryKind>) -> Result<Outcome, FilesError> {
    let vanished =
        |rel: &str| Ok(Outcome::Skipped(Skipped { path: rel.to_string(), why: "vanished during the backup".into() }));
    let ft = f.meta.file_type();
    if ft.is_dir() {
        return Ok(entry(entry_of(&f, EntryKind::Dir)));
    }
    if ft.is_symlink() {
        return match link_target(&f.abs) {
            Ok(Some(target)) => Ok(entry(entry_of(&f, EntryKind::Symlink { target }))),
            Ok(None) => Ok(Outcome::Skipped(Skipped { path: f.rel, why: "the symlink's target is not UTF-8".into() })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vanished(&f.rel),
            Err(e) => Err(FilesError::io(&f.abs, e)),
        };
    }
    if let Some(kind) = reuse {
        let reused = match &kind {
            EntryKind::File { blocks, .. } => blocks.len() as u64,
            _ => 0,
        };
        let mut out = entry(entry_of(&f, kind));
        if let Outcome::Entry { reused_blocks, .. } = &mut out {
            *reused_blocks = reused;
        }
        return Ok(out);
    }
    let mut bytes_read = 0;
    let (mut new_blocks, mut reused_blocks, mut stored_bytes) = (0, 0, 0);
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Through its directory as walked, without following a symlink: a file or a directory
        // above it replaced by a symlink since the walk is not followed out of the tree.
        let file = match open_in_tree(&f) {
            Ok(Some(file)) => file,
            Ok(None) => {
                return Ok(Outcome::Skipped(Skipped {
                    path: f.rel,
                    why: "its directory was replaced during the backup".into(),
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return vanished(&f.rel),
            // The file (ELOOP) or a directory above it (ENOTDIR) is a symlink now.
            Err(e) if [Some(libc::ELOOP), Some(libc::ENOTDIR)].contains(&e.raw_os_error()) => {
                return Ok(Outcome::Skipped(Skipped {
                    path: f.rel,
                    why: "replaced by a symlink during the backup".into(),
                }))
            }
            Err(e) => return Err(FilesError::io(&f.abs, e)),
        };
        let mut file = tokio::fs::File::from_std(file);
        let before = file.metadata().await.map_err(|e| FilesError::io(&f.abs, e))?;
        if !before.is_file() {
            return Ok(Outcome::Skipped(Skipped { path: f.rel, why: "no longer a regular file".into() }));
        }
        let mut writer = store.writer();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).await.map_err(|e| FilesError::io(&f.abs, e))?;
            if n == 0 {
                break;
            }
            bytes_read += n as u64;
            writer.write(&buf[..n]).await?;
        }
        let stored = writer.finish().await?;
        new_blocks += stored.new_blocks;
        reused_blocks += stored.reused_blocks;
        stored_bytes += stored.stored_bytes;
        let after = file.metadata().await.map_err(|e| FilesError::io(&f.abs, e))?;
        let read_end = SystemTime::now();
        let steady = stamp(&before) == stamp(&after) && stored.len == after.size();
        if steady || attempt == READS {
            let racy = racily_clean(&after, read_end);
            let found = Found { rel: f.rel.clone(), abs: f.abs.clone(), meta: after, dir: f.dir };
            let mut e =
                entry_of(&found, EntryKind::File { size: stored.len, sha256: stored.sha256, blocks: stored.blocks });
            if !steady || racy {
                // The stamps are from after the last read, the content may be older (or, racily
                // clean, a rewrite within the same timestamp tick left them unchanged): with no
                // ctime to match, the next incremental reads the file again.
                e.ctime = 0;
                e.ctime_nsec = 0;
            }
            return Ok(Outcome::Entry {
                entry: e,
                bytes_read,
                new_blocks,
                reused_blocks,
                stored_bytes,
                changed: !steady,
            });
        }
        tracing::debug!(path = %f.abs.display(), attempt, "the file changed while it was read; reading it again");
    }
}

/// How close to the end of a read a file's mtime or ctime may be before the read cannot be
/// trusted to have seen its final content: a same-size rewrite within one timestamp tick (coarse
/// on some filesystems, and the file's clock may lag the wall clock) changes no stamp. Git's
/// "racily clean" rule.
const RACY: Duration = Duration::from_secs(2);

/// Whether `m`'s mtime or ctime lies within [`RACY`] of `read_end` (or after it).
fn racily_clean(m: &std::fs::Metadata, read_end: SystemTime) -> bool {
    let Some(limit) = read_end.checked_sub(RACY) else { return true };
    let limit = match limit.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
        Err(_) => return true,
    };
    (m.mtime(), m.mtime_nsec()) >= limit || (m.ctime(), m.ctime_nsec()) >= limit
}

fn entry(entry: TreeEntry) -> Outcome {
    Outcome::Entry { entry, bytes_read: 0, new_blocks: 0, reused_blocks: 0, stored_bytes: 0, changed: false }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::{KeyRing, LocalStore, Repository};
    use std::sync::Arc;

    async fn store() -> (tempfile::TempDir, BlockStore) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        repo.init().await.unwrap();
        let store = BlockStore::open(&repo).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_file_written_just_before_its_read_is_read_again_by_the_next_incremental() {
        let (_repo, store) = store().await;
        let tree = tempfile::tempdir().unwrap();
        std::fs::write(tree.path().join("settled"), b"written long before the backup").unwrap();
        tokio::time::sleep(RACY + Duration::from_millis(200)).await;
        std::fs::write(tree.path().join("fresh"), b"written just before the backup").unwrap();
        let spec = SetSpec {
            name: "s".into(),
            root: tree.path().to_path_buf(),
            excludes: Excludes::default(),
            stale_backup_after: pitr_archive::running::MIN_STALE_BACKUP_AFTER,
        };
        let first = backup(&store, &spec, false, &|_| {}).await.unwrap();
        // A same-size rewrite within the stamps' tick could have torn this read unnoticed.
        assert_eq!(first.entry("fresh").unwrap().ctime, 0, "{first:?}");
        assert_ne!(first.entry("settled").unwrap().ctime, 0, "{first:?}");
        assert!(first.changed.is_empty(), "racily clean is not `changed`: {first:?}");

        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = backup(&store, &spec, true, &|_| {}).await.unwrap();
        assert_eq!(second.kind, TreeKind::Incremental);
        assert_eq!(second.bytes_read, b"written just before the backup".len() as u64, "only `fresh` is read again");
    }

    #[tokio::test]
    async fn a_backup_of_another_root_is_not_reused() {
        let (_repo, store) = store().await;
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(a.path().join("f"), b"in a").unwrap();
        tokio::time::sleep(RACY + Duration::from_millis(200)).await;
        let spec = |root: &std::path::Path| SetSpec {
            name: "s".into(),
            root: root.to_path_buf(),
            excludes: Excludes::default(),
            stale_backup_after: pitr_archive::running::MIN_STALE_BACKUP_AFTER,
        };
        let first = backup(&store, &spec(a.path()), false, &|_| {}).await.unwrap();
        // The set now points at b; the parent's entry for `f` has the stamps of b's `f`.
        std::fs::write(b.path().join("f"), b"in b").unwrap();
        let m = std::fs::symlink_metadata(b.path().join("f")).unwrap();
        let mut parent = first.clone();
        let e = parent.entries.iter_mut().find(|e| e.path == "f").unwrap();
        (e.mtime, e.mtime_nsec, e.ctime, e.ctime_nsec, e.inode) =
            (m.mtime(), m.mtime_nsec() as u32, m.ctime(), m.ctime_nsec() as u32, m.ino());
        let found = Found { rel: "f".into(), abs: b.path().join("f"), meta: m, dir: None };
        assert!(reusable(parent.entry("f").unwrap(), &found).is_some(), "same stamps: reusable by themselves");
        parent.id = "20000101T000000Z".into();
        parent.stop_time_us = first.stop_time_us + 1;
        parent.store(store.repo()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = backup(&store, &spec(b.path()), true, &|_| {}).await.unwrap();
        assert_eq!(second.parent.as_deref(), Some("20000101T000000Z"));
        assert_eq!(second.bytes_read, 4, "b's file was read, not taken from a backup of a");
        let EntryKind::File { sha256, .. } = &second.entry("f").unwrap().kind else { panic!("f is a file") };
        assert_eq!(sha256, &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"in b")));
    }
}
