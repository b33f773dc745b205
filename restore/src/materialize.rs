//! Writing a backup's files into a directory: blocks fetched and written in parallel (bounded),
//! an incremental backup's files combined with its ancestors' on the way ([`crate::combine`]),
//! into a staging directory that becomes the target only when complete. `global/pg_control` is
//! written last, so even a staging directory left by a crash never looks like a valid cluster.
//!
//! Tablespaces come back inside the target directory, under `pitr_tablespaces/<oid>`, with
//! `pg_tblspc/<oid>` a symlink to it: the restore never writes outside its target (the original
//! locations may belong to the running primary), and PostgreSQL 15+ refuses plain directories
//! in pg_tblspc.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::collections::BTreeMap;

use pitr_archive::backup::{block_name, BackupEntryKind, BackupFile, BackupManifest};
use pitr_archive::Repository;
use pitr_pgwire::incremental::{
    combined_backup_label, full_path_of, incremental_path_of, parse_header, IncrementalHeader,
};
use tokio::task::JoinSet;

use crate::combine::{block_map, pieces, runs, Source};
use crate::RestoreError;

const PG_CONTROL: &str = "global/pg_control";

fn io(path: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |e| RestoreError::Io { path: path.to_path_buf(), cause: e }
}

/// Checks the target directory: it may be missing or empty; anything else needs `force`.
pub fn check_target(target: &Path, force: bool) -> Result<(), RestoreError> {
    match std::fs::read_dir(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RestoreError::Io { path: target.to_path_buf(), cause: e }),
        Ok(mut entries) => {
            if entries.next().is_none() || force {
                Ok(())
            } else {
                Err(RestoreError::TargetNotEmpty(target.to_path_buf()))
            }
        }
    }
}

/// A directory beside the target that is removed on drop unless kept.
pub struct Staging {
    pub path: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl Staging {
    pub fn create(target: &Path) -> Result<Staging, RestoreError> {
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "restore".into());
        let path = parent.join(format!(".{name}.pitr-partial-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
        std::fs::create_dir(&path).map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(io(&path))?;
        Ok(Staging { path, keep: false })
    }

    /// Moves the staging directory into place as `target` (replacing an empty or, with `force`,
    /// a non-empty one).
    pub fn commit(mut self, target: &Path, force: bool) -> Result<(), RestoreError> {
        check_target(target, force)?;
        if target.exists() {
            std::fs::remove_dir_all(target).map_err(io(target))?;
        }
        std::fs::rename(&self.path, target).map_err(io(target))?;
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent).and_then(|f| f.sync_all()).map_err(io(parent))?;
        }
        self.keep = true;
        Ok(())
    }
}

pub const TABLESPACE_DIR: &str = "pitr_tablespaces";

/// Where a backup path goes in the restored directory.
fn local_path(path: &str) -> String {
    match path.strip_prefix("pg_tblspc/") {
        Some(rest) if rest.contains('/') => format!("{TABLESPACE_DIR}/{rest}"),
        _ => path.to_string(),
    }
}

/// Where a stored block's bytes go: `(output file, byte range of the block, offset in the file)`;
/// the range is `None` for the whole block.
type PieceWrite = (Arc<PathBuf>, Option<(u64, u64)>, u64);

/// One stored block to fetch, and where its bytes go.
struct BlockJob {
    block_id: String,
    writes: Vec<PieceWrite>,
}

/// An output file and the jobs that fill it.
struct PlannedFile {
    path: String,
    size: u64,
    jobs: Vec<BlockJob>,
}

/// Writes the backup `chain` (oldest first; the last is the one restored, the others its
/// ancestors when it is incremental) under `dir`, which will be renamed to `final_dir`.
/// `progress(done, total)` is called as bytes land. Returns the bytes of the files written.
pub async fn materialize(
    repo: &Repository,
    chain: &[&BackupManifest],
    dir: &Path,
    final_dir: &Path,
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<u64, RestoreError> {
    let backup = *chain.last().ok_or_else(|| RestoreError::Other("no backup to restore".into()))?;
    // Directories and links first, so files have somewhere to go.
    for entry in &backup.entries {
        let path = dir.join(local_path(&entry.path));
        match &entry.kind {
            BackupEntryKind::Directory => {
                std::fs::create_dir_all(&path).map_err(io(&path))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(entry.mode & 0o7777))
                    .map_err(io(&path))?;
            }
            BackupEntryKind::Symlink { .. } if entry.path.starts_with("pg_tblspc/") => {
                let oid = &entry.path["pg_tblspc/".len()..];
                let home = dir.join(TABLESPACE_DIR).join(oid);
                std::fs::create_dir_all(&home).map_err(io(&home))?;
                std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).map_err(io(&home))?;
                let link_target = final_dir.join(TABLESPACE_DIR).join(oid);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io(parent))?;
                }
                std::os::unix::fs::symlink(&link_target, &path).map_err(io(&path))?;
            }
            BackupEntryKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &path).map_err(io(&path))?;
            }
        }
    }
    let planned = plan_files(repo, chain, dir, workers).await?;
    let total: u64 = planned.iter().map(|f| f.size).sum();
    let done = Arc::new(AtomicU64::new(0));
    let mut rounds: [Vec<BlockJob>; 2] = [Vec::new(), Vec::new()];
    for file in &planned {
        let path = dir.join(local_path(&file.path));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let f = std::fs::File::create(&path).map_err(io(&path))?;
        // Blocks no backup supplies stay zero, as pg_combinebackup writes them.
        f.set_len(file.size).map_err(io(&path))?;
    }
    for file in planned {
        rounds[(file.path == PG_CONTROL) as usize].extend(file.jobs);
    }
    // Two rounds: everything but pg_control, then pg_control.
    for round in rounds {
        let queue = Arc::new(tokio::sync::Mutex::new(round.into_iter()));
        let mut set = JoinSet::new();
        for _ in 0..workers.max(1) {
            let (queue, repo, done) = (queue.clone(), repo.clone(), done.clone());
            let system_id = backup.system_id;
            set.spawn(async move {
                loop {
                    let job = queue.lock().await.next();
                    let Some(job) = job else { return Ok::<(), RestoreError>(()) };
                    let file = job.writes.first().map(|w| w.0.display().to_string()).unwrap_or_default();
                    let name = block_name(system_id, &job.block_id);
                    let (_, data) = repo
                        .get_opened(&name)
                        .await
                        .map_err(|e| RestoreError::Block { file: file.clone(), cause: Box::new(e) })?;
                    let written = tokio::task::spawn_blocking(move || write_pieces(&data, &job.writes))
                        .await
                        .map_err(|e| RestoreError::Other(format!("write task: {e}")))??;
                    done.fetch_add(written, Ordering::Relaxed);
                }
            });
        }
        let mut first_error = None;
        loop {
            let joined = tokio::select! {
                j = set.join_next() => j,
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    progress(done.load(Ordering::Relaxed), total);
                    continue;
                }
            };
            let Some(r) = joined else { break };
            let r = r.map_err(|e| RestoreError::Other(format!("restore task: {e}"))).and_then(|r| r);
            if let Err(e) = r {
                if first_error.is_none() {
                    first_error = Some(e);
                    set.abort_all();
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
    }
    progress(done.load(Ordering::Relaxed), total);
    if chain.len() > 1 {
        // PostgreSQL refuses to start from the label of an uncombined incremental.
        let label = dir.join("backup_label");
        let text = std::fs::read_to_string(&label).map_err(io(&label))?;
        std::fs::write(&label, combined_backup_label(&text)).map_err(io(&label))?;
    }
    // Modes and durability: fsync every file, then every directory.
    let dir_owned = dir.to_path_buf();
    let files: Vec<(PathBuf, u32)> =
        output_files(backup).map(|(path, f)| (dir.join(local_path(&path)), f.mode)).collect();
    tokio::task::spawn_blocking(move || -> Result<(), RestoreError> {
        for (path, mode) in &files {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(io(path))?;
            std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))?;
        }
        sync_dirs(&dir_owned)
    })
    .await
    .map_err(|e| RestoreError::Other(format!("sync task: {e}")))??;
    // The server's manifest describes this very directory only for a full backup; an
    // incremental's lists INCREMENTAL.* files that the combined directory does not have.
    if chain.len() == 1 {
        std::fs::write(dir.join("backup_manifest"), &backup.server_manifest).map_err(io(dir))?;
    }
    Ok(total)
}

/// The files a restore of `backup` writes: its own, with incremental files under their real names.
fn output_files(backup: &BackupManifest) -> impl Iterator<Item = (String, &BackupFile)> {
    backup.files.iter().map(|f| (full_path_of(&f.path).unwrap_or_else(|| f.path.clone()), f))
}

fn write_pieces(data: &[u8], writes: &[PieceWrite]) -> Result<u64, RestoreError> {
    let mut written = 0;
    for (path, range, at) in writes {
        let bytes = match *range {
            None => data,
            Some((from, len)) => data.get(from as usize..(from + len) as usize).ok_or_else(|| {
                RestoreError::Other(format!(
                    "{}: a stored block is {} bytes, shorter than its manifest says",
                    path.display(),
                    data.len()
                ))
            })?,
        };
        let f = std::fs::OpenOptions::new().write(true).open(path.as_path()).map_err(io(path))?;
        f.write_all_at(bytes, *at).map_err(io(path))?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

/// The jobs for every file: whole stored blocks for files a backup holds in full, and for
/// incremental files the pieces of the chain's blocks that [`crate::combine`] picks.
async fn plan_files(
    repo: &Repository,
    chain: &[&BackupManifest],
    dir: &Path,
    workers: usize,
) -> Result<Vec<PlannedFile>, RestoreError> {
    let backup = *chain.last().ok_or_else(|| RestoreError::Other("no backup to restore".into()))?;
    let mut planned = Vec::new();
    let mut incremental = Vec::new();
    for (path, file) in output_files(backup) {
        let out = Arc::new(dir.join(local_path(&path)));
        if path == file.path {
            let jobs = file
                .blocks
                .iter()
                .enumerate()
                .map(|(i, id)| BlockJob {
                    block_id: id.clone(),
                    writes: vec![(out.clone(), None, i as u64 * backup.block_size)],
                })
                .collect();
            planned.push(PlannedFile { path, size: file.size, jobs });
        } else if chain.len() < 2 {
            return Err(RestoreError::Other(format!(
                "backup {} holds the incremental file {} but has no parent backup",
                backup.id, file.path
            )));
        } else {
            incremental.push((path, out));
        }
    }
    // Incremental files need their headers (and their ancestors'), read from the archive:
    // planned in parallel, bounded like the block fetches.
    let chain: Arc<Vec<BackupManifest>> = Arc::new(chain.iter().map(|b| (*b).clone()).collect());
    let queue = Arc::new(tokio::sync::Mutex::new(incremental.into_iter()));
    let mut set = JoinSet::new();
    for _ in 0..workers.max(1) {
        let (queue, repo, chain) = (queue.clone(), repo.clone(), chain.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let next = queue.lock().await.next();
                let Some((path, target)) = next else { return Ok::<_, RestoreError>(out) };
                out.push(plan_combined(&repo, &chain, path, target).await?);
            }
        });
    }
    while let Some(r) = set.join_next().await {
        match r.map_err(|e| RestoreError::Other(format!("planning task: {e}"))).and_then(|r| r) {
            Ok(files) => planned.extend(files),
            Err(e) => {
                set.abort_all();
                return Err(e);
            }
        }
    }
    Ok(planned)
}

/// Plans one file whose newest version is incremental: walks back the chain to its first full
/// copy, reading the headers of the incremental versions on the way.
async fn plan_combined(
    repo: &Repository,
    chain: &[BackupManifest],
    path: String,
    target: Arc<PathBuf>,
) -> Result<PlannedFile, RestoreError> {
    let incremental_name = incremental_path_of(&path);
    let mut sources = Vec::new();
    let mut files: Vec<(&BackupManifest, &BackupFile)> = Vec::new();
    for backup in chain.iter().rev() {
        let full = backup.files.iter().find(|f| f.path == path);
        let incr = || backup.files.iter().find(|f| f.path == incremental_name);
        match (full, sources.is_empty()) {
            (Some(f), false) => {
                sources.push(Source::Full { size: f.size });
                files.push((backup, f));
                break;
            }
            _ => {
                let f = incr().ok_or_else(|| {
                    RestoreError::Other(format!(
                        "cannot combine {path}: backup {} of the chain has neither {path} nor {incremental_name}",
                        backup.id
                    ))
                })?;
                sources.push(Source::Incremental(read_incremental_header(repo, backup, f).await?));
                files.push((backup, f));
            }
        }
    }
    let page_size = chain.last().map(|b| b.page_size).unwrap_or(8192);
    let map = block_map(&sources, page_size)
        .map_err(|_| RestoreError::Other(format!("cannot combine {path}: no backup of the chain holds it in full")))?;
    let size = map.len() as u64 * page_size as u64;
    let mut by_block: BTreeMap<(usize, usize), BlockJob> = BTreeMap::new();
    let block_sizes: Vec<u64> = files.iter().map(|(b, _)| b.block_size).collect();
    for p in pieces(&runs(&map, page_size), &block_sizes) {
        let (backup, file) = files[p.source];
        let block_id = file.blocks.get(p.block).ok_or_else(|| {
            RestoreError::Other(format!(
                "cannot combine {path}: {} of backup {} has no stored block {}",
                file.path, backup.id, p.block
            ))
        })?;
        by_block
            .entry((p.source, p.block))
            .or_insert_with(|| BlockJob { block_id: block_id.clone(), writes: Vec::new() })
            .writes
            .push((target.clone(), Some((p.offset, p.len)), p.dst_offset));
    }
    Ok(PlannedFile { path, size, jobs: by_block.into_values().collect() })
}

/// The header of an incremental file, from its first stored block(s).
async fn read_incremental_header(
    repo: &Repository,
    backup: &BackupManifest,
    file: &BackupFile,
) -> Result<IncrementalHeader, RestoreError> {
    let bad = |what: String| RestoreError::Other(format!("{} in backup {}: {what}", file.path, backup.id));
    let mut bytes = Vec::new();
    for id in &file.blocks {
        let (_, data) = repo
            .get_opened(&block_name(backup.system_id, id))
            .await
            .map_err(|e| RestoreError::Block { file: file.path.clone(), cause: Box::new(e) })?;
        bytes.extend_from_slice(&data);
        if let Some(h) = parse_header(&bytes, backup.page_size).map_err(|e| bad(e.to_string()))? {
            if h.expected_file_size(backup.page_size) != file.size {
                return Err(bad(format!(
                    "its header describes {} bytes, the backup holds {}",
                    h.expected_file_size(backup.page_size),
                    file.size
                )));
            }
            return Ok(h);
        }
    }
    Err(bad("shorter than its incremental header".into()))
}

fn sync_dirs(dir: &Path) -> Result<(), RestoreError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        // file_type() does not follow symlinks, so tablespace links are not walked twice.
        if entry.file_type().map_err(io(dir))?.is_dir() {
            sync_dirs(&entry.path())?;
        }
    }
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tablespace_paths_move_inside_the_target() {
        assert_eq!(local_path("base/1/1259"), "base/1/1259");
        assert_eq!(
            local_path("pg_tblspc/16384/PG_15_202209061/5/16385"),
            "pitr_tablespaces/16384/PG_15_202209061/5/16385"
        );
        assert_eq!(local_path("pg_tblspc/16384"), "pg_tblspc/16384");
    }
}
