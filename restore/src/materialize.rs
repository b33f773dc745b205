//! Writing a backup's files into a directory: blocks fetched and written in parallel (bounded),
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

use pitr_archive::backup::{block_name, BackupEntryKind, BackupManifest};
use pitr_archive::Repository;
use tokio::task::JoinSet;

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

/// Writes every file of `backup` under `dir`. `progress(done, total)` is called as bytes land.
pub const TABLESPACE_DIR: &str = "pitr_tablespaces";

/// Where a backup path goes in the restored directory.
fn local_path(path: &str) -> String {
    match path.strip_prefix("pg_tblspc/") {
        Some(rest) if rest.contains('/') => format!("{TABLESPACE_DIR}/{rest}"),
        _ => path.to_string(),
    }
}

/// Writes every file of `backup` under `dir`, which will be renamed to `final_dir`.
/// `progress(done, total)` is called as bytes land.
pub async fn materialize(
    repo: &Repository,
    backup: &BackupManifest,
    dir: &Path,
    final_dir: &Path,
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(), RestoreError> {
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
    let total: u64 = backup.files.iter().map(|f| f.size).sum();
    let done = Arc::new(AtomicU64::new(0));
    let mut jobs = Vec::new();
    for file in &backup.files {
        let path = dir.join(local_path(&file.path));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let f = std::fs::File::create(&path).map_err(io(&path))?;
        f.set_len(file.size).map_err(io(&path))?;
        let last = file.path == PG_CONTROL;
        for (i, id) in file.blocks.iter().enumerate() {
            jobs.push((path.clone(), i as u64 * backup.block_size, id.clone(), last));
        }
    }
    // Two rounds: everything but pg_control, then pg_control.
    for round in [false, true] {
        let round_jobs: Vec<_> = jobs.iter().filter(|j| j.3 == round).cloned().collect();
        let queue = Arc::new(tokio::sync::Mutex::new(round_jobs.into_iter()));
        let mut set = JoinSet::new();
        for _ in 0..workers.max(1) {
            let (queue, repo, done) = (queue.clone(), repo.clone(), done.clone());
            let system_id = backup.system_id;
            set.spawn(async move {
                loop {
                    let job = queue.lock().await.next();
                    let Some((path, offset, id, _)) = job else { return Ok::<(), RestoreError>(()) };
                    let name = block_name(system_id, &id);
                    let (_, data) = repo
                        .get_opened(&name)
                        .await
                        .map_err(|e| RestoreError::Block { file: path.display().to_string(), cause: Box::new(e) })?;
                    let len = data.len() as u64;
                    let p = path.clone();
                    tokio::task::spawn_blocking(move || {
                        let f = std::fs::OpenOptions::new().write(true).open(&p)?;
                        f.write_all_at(&data, offset)
                    })
                    .await
                    .map_err(|e| RestoreError::Other(format!("write task: {e}")))?
                    .map_err(io(&path))?;
                    done.fetch_add(len, Ordering::Relaxed);
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
    // Modes and durability: fsync every file, then every directory.
    let dir_owned = dir.to_path_buf();
    let files: Vec<(PathBuf, u32)> = backup.files.iter().map(|f| (dir.join(local_path(&f.path)), f.mode)).collect();
    tokio::task::spawn_blocking(move || -> Result<(), RestoreError> {
        for (path, mode) in &files {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(io(path))?;
            std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))?;
        }
        sync_dirs(&dir_owned)
    })
    .await
    .map_err(|e| RestoreError::Other(format!("sync task: {e}")))??;
    std::fs::write(dir.join("backup_manifest"), &backup.server_manifest).map_err(io(dir))?;
    Ok(())
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
