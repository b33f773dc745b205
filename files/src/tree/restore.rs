//! Restoring a backup (or the paths of it that `--path` patterns select) into an empty directory.
//!
//! The manifest is checked whole before anything is written: every path must be relative and
//! plain ([`super::safe_path`]) and every parent a directory of the same manifest, so no path
//! leaves the target or passes through a restored symlink (symlinks are created last). Files are
//! written under a temporary name, checked against their SHA-256, synced, and linked to their
//! name without replacing anything; directories get their modes and mtimes last, deepest first.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glob::Pattern;
use pitr_archive::time::format_rfc3339_micros;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;
use tokio::task::JoinSet;

use super::walk::MATCH;
use super::{safe_path, EntryKind, TreeEntry, TreeManifest};
use crate::{BlockStore, FilesError};

const FILES_IN_FLIGHT: usize = 8;

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Must not exist, or be an empty directory.
    pub target_dir: PathBuf,
    /// Glob patterns on paths relative to the set's root; a pattern matching a directory
    /// selects everything under it. Empty: the whole backup.
    pub paths: Vec<String>,
}

/// What a restore wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreSummary {
    /// Regular files written.
    pub files: u64,
    /// Directories created (the target not counted).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Owners (uid, gid) were restored: only when running as root.
    pub owners_restored: bool,
}

/// The backup `--to` picks: the newest of `backups` (one set's, oldest first) that stopped at or
/// before `to` (`None`: the newest). TIME before the first one is an error naming it.
pub fn select_time<'a>(
    set: &str,
    backups: &'a [TreeManifest],
    to: Option<i64>,
) -> Result<&'a TreeManifest, FilesError> {
    let Some(oldest) = backups.first() else {
        return Err(FilesError::Other(format!(
            "file set {set} has no backups in the repository (run `pitr backup --source files --set {set}`)"
        )));
    };
    match to {
        None => Ok(backups.last().unwrap_or(oldest)),
        Some(t) => backups.iter().rev().find(|m| m.stop_time_us <= t).ok_or_else(|| {
            FilesError::Other(format!(
                "no backup of file set {set} had finished by {}: the oldest, {}, finished at {}",
                format_rfc3339_micros(t),
                oldest.id,
                format_rfc3339_micros(oldest.stop_time_us)
            ))
        }),
    }
}

/// Checks `manifest` and `opts`, then restores into `opts.target_dir`. On failure, what this
/// restore created is removed again (the target directory too, if it created it).
pub async fn restore(
    store: &BlockStore,
    manifest: &TreeManifest,
    opts: &RestoreOptions,
) -> Result<RestoreSummary, FilesError> {
    check_manifest(manifest)?;
    let selected = select(manifest, &opts.paths)?;
    let target = &opts.target_dir;
    let created = prepare_target(target)?;
    let result = write_all(store, &selected, target, opts.paths.is_empty()).await;
    if result.is_err() {
        let cleaned = match &created {
            Some(top) => std::fs::remove_dir_all(top),
            None => empty_dir(target),
        };
        if let Err(e) = cleaned {
            tracing::warn!(target = %target.display(), error = %e, "could not remove what the failed restore wrote");
        }
    }
    result
}

/// Every path plain and relative, every parent a directory of the manifest.
fn check_manifest(m: &TreeManifest) -> Result<(), FilesError> {
    let refuse = |path: &str, why: &str| {
        FilesError::Other(format!(
            "backup {} of file set {}: entry {path:?} {why}; refusing to restore from this manifest",
            m.id, m.set
        ))
    };
    for e in &m.entries {
        if !safe_path(&e.path) {
            return Err(refuse(&e.path, "is not a plain relative path (absolute, empty or `.`/`..` components)"));
        }
        if e.path == "." && e.kind != EntryKind::Dir {
            return Err(refuse(&e.path, "is the root but not a directory"));
        }
        if let Some((parent, _)) = e.path.rsplit_once('/') {
            match m.entry(parent) {
                Some(p) if p.kind == EntryKind::Dir => {}
                Some(p) => return Err(refuse(&e.path, &format!("lies under a {}, not a directory", p.kind_word()))),
                None => return Err(refuse(&e.path, "has no parent directory in the manifest")),
            }
        }
    }
    Ok(())
}

/// The entries `patterns` select, with their parent directories (all of them when empty).
fn select<'a>(m: &'a TreeManifest, patterns: &[String]) -> Result<Vec<&'a TreeEntry>, FilesError> {
    if patterns.is_empty() {
        return Ok(m.entries.iter().collect());
    }
    let mut compiled = Vec::new();
    for p in patterns {
        let trimmed = p.trim_end_matches('/');
        if trimmed.starts_with('/') || trimmed.split('/').any(|c| c == "..") {
            return Err(FilesError::Other(format!(
                "--path {p:?}: patterns are relative to the set's root and stay inside it (no leading `/`, no `..`)"
            )));
        }
        let pattern = Pattern::new(trimmed).map_err(|e| FilesError::Other(format!("--path {p:?}: {}", e.msg)))?;
        compiled.push((p, pattern));
    }
    let mut chosen: BTreeSet<&str> = BTreeSet::new();
    for (p, pattern) in &compiled {
        let mut matched = false;
        for e in m.entries.iter().filter(|e| e.path != ".") {
            // The entry itself, or a directory above it.
            let hit = std::iter::once(e.path.as_str())
                .chain(e.path.match_indices('/').map(|(i, _)| &e.path[..i]))
                .any(|candidate| pattern.matches_with(candidate, MATCH));
            if hit {
                matched = true;
                chosen.insert(&e.path);
                chosen.extend(e.path.match_indices('/').map(|(i, _)| &e.path[..i]));
            }
        }
        if !matched {
            return Err(FilesError::Other(format!(
                "--path {p:?} matches nothing in backup {} of file set {} (paths are relative to its root {})",
                m.id, m.set, m.root
            )));
        }
    }
    Ok(m.entries.iter().filter(|e| chosen.contains(e.path.as_str())).collect())
}

/// Creates the target or checks that it is an empty directory; the topmost directory it created
/// (the target or one above it), if any.
fn prepare_target(target: &Path) -> Result<Option<PathBuf>, FilesError> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            let mut listing = std::fs::read_dir(target).map_err(|e| FilesError::io(target, e))?;
            if listing.next().is_some() {
                return Err(FilesError::Other(format!(
                    "target directory {} is not empty: restore into a new or empty directory",
                    target.display()
                )));
            }
            Ok(None)
        }
        Ok(_) => Err(FilesError::Other(format!("target {} exists and is not a directory", target.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut top = target;
            while let Some(parent) = top.parent().filter(|p| !p.as_os_str().is_empty()) {
                match std::fs::symlink_metadata(parent) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => top = parent,
                    _ => break,
                }
            }
            let top = top.to_path_buf();
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(target)
                .map_err(|e| FilesError::io(target, e))?;
            Ok(Some(top))
        }
        Err(e) => Err(FilesError::io(target, e)),
    }
}

fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

async fn write_all(
    store: &BlockStore,
    selected: &[&TreeEntry],
    target: &Path,
    whole: bool,
) -> Result<RestoreSummary, FilesError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owners = unsafe { libc::geteuid() } == 0;
    let mut summary = RestoreSummary { owners_restored: owners, ..Default::default() };
    let at = |e: &TreeEntry| if e.path == "." { target.to_path_buf() } else { target.join(&e.path) };

    // Directories (parents sort before their contents), writable by us until the end.
    for e in selected.iter().filter(|e| e.kind == EntryKind::Dir && e.path != ".") {
        let path = at(e);
        std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(|err| FilesError::io(&path, err))?;
        summary.dirs += 1;
    }
    // Files.
    let mut tasks: JoinSet<Result<u64, FilesError>> = JoinSet::new();
    let mut files = selected.iter().filter(|e| matches!(e.kind, EntryKind::File { .. }));
    loop {
        while tasks.len() < FILES_IN_FLIGHT {
            let Some(e) = files.next() else { break };
            let (store, entry, path) = (store.clone(), (*e).clone(), at(e));
            tasks.spawn(async move { write_file(&store, &entry, &path, owners).await });
        }
        let Some(done) = tasks.join_next().await else { break };
        summary.bytes += done.map_err(|e| FilesError::Other(format!("a restore task failed: {e}")))??;
        summary.files += 1;
    }
    // Symlinks, after every file and directory: nothing is written through one.
    for e in selected {
        if let EntryKind::Symlink { target: link } = &e.kind {
            let path = at(e);
            std::os::unix::fs::symlink(link, &path).map_err(|err| FilesError::io(&path, err))?;
            set_owner_and_mtime(&path, e, owners)?;
            summary.symlinks += 1;
        }
    }
    // Directories' metadata, deepest first (creating their contents changed their mtimes).
    for e in selected.iter().rev().filter(|e| e.kind == EntryKind::Dir && (whole || e.path != ".")) {
        let path = at(e);
        if owners {
            std::os::unix::fs::lchown(&path, Some(e.uid), Some(e.gid)).map_err(|err| FilesError::io(&path, err))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(e.mode))
            .map_err(|err| FilesError::io(&path, err))?;
        set_owner_and_mtime(&path, e, false)?;
        std::fs::File::open(&path).and_then(|d| d.sync_all()).map_err(|err| FilesError::io(&path, err))?;
    }
    if !whole {
        std::fs::File::open(target).and_then(|d| d.sync_all()).map_err(|err| FilesError::io(target, err))?;
    }
    Ok(summary)
}

/// Writes one file under a temporary name, checks it, then links it to its name.
async fn write_file(store: &BlockStore, e: &TreeEntry, path: &Path, owners: bool) -> Result<u64, FilesError> {
    let EntryKind::File { size, sha256, blocks } = &e.kind else { return Ok(0) };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.pitr-restore"));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|err| FilesError::io(&tmp, err))?;
    let mut out = Hashing { inner: tokio::fs::File::from_std(file), sha: Sha256::new(), len: 0 };
    let result = async {
        store.read_to(blocks, &mut out).await.map_err(|err| FilesError::Other(format!("{}: {err}", path.display())))?;
        let got = hex::encode(out.sha.clone().finalize());
        if out.len != *size || &got != sha256 {
            return Err(FilesError::Other(format!(
                "{}: restored content ({} bytes, sha256 {got}) is not the backup's ({size} bytes, sha256 {sha256})",
                path.display(),
                out.len
            )));
        }
        let file = out.inner.into_std().await;
        if owners {
            std::os::unix::fs::fchown(&file, Some(e.uid), Some(e.gid)).map_err(|err| FilesError::io(&tmp, err))?;
        }
        // After chown, which clears setuid and setgid.
        file.set_permissions(std::fs::Permissions::from_mode(e.mode)).map_err(|err| FilesError::io(&tmp, err))?;
        file.set_times(std::fs::FileTimes::new().set_modified(system_time(e.mtime, e.mtime_nsec)))
            .map_err(|err| FilesError::io(&tmp, err))?;
        file.sync_all().map_err(|err| FilesError::io(&tmp, err))?;
        // A link fails where the name exists: nothing is replaced, no symlink followed. Where
        // the filesystem has no hard links, a rename: the name is new in a directory this
        // restore created (or found empty), and the manifest names it once.
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(err) if [Some(libc::EPERM), Some(libc::EOPNOTSUPP)].contains(&err.raw_os_error()) => {
                if std::fs::symlink_metadata(path).is_ok() {
                    return Err(FilesError::io(path, std::io::Error::from(std::io::ErrorKind::AlreadyExists)));
                }
                std::fs::rename(&tmp, path).map_err(|err| FilesError::io(path, err))?;
            }
            Err(err) => return Err(FilesError::io(path, err)),
        }
        Ok(*size)
    }
    .await;
    // After a rename there is no temporary name left to remove.
    let removed = match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    let size = result?;
    removed.map_err(|err| FilesError::io(&tmp, err))?;
    Ok(size)
}

fn system_time(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(u64::from(nsec))
    }
}

/// lchown (when `owners`) and the mtime, on the path itself, never following a symlink.
fn set_owner_and_mtime(path: &Path, e: &TreeEntry, owners: bool) -> Result<(), FilesError> {
    if owners {
        std::os::unix::fs::lchown(path, Some(e.uid), Some(e.gid)).map_err(|err| FilesError::io(path, err))?;
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| FilesError::Other(format!("{}: path holds a NUL byte", path.display())))?;
    let times = [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        libc::timespec { tv_sec: e.mtime as libc::time_t, tv_nsec: i64::from(e.mtime_nsec) as libc::c_long },
    ];
    // SAFETY: `c` is a NUL-terminated path and `times` two valid timespecs, as utimensat asks.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if rc != 0 {
        return Err(FilesError::io(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// An AsyncWrite that hashes what it passes on.
struct Hashing {
    inner: tokio::fs::File,
    sha: Sha256,
    len: u64,
}

impl AsyncWrite for Hashing {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.sha.update(&buf[..n]);
                this.len += n as u64;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::tests::manifest;
    use crate::tree::TreeKind;

    fn with(paths: &[(&str, EntryKind)]) -> TreeManifest {
        let mut m = manifest("s", "20261206T010000Z", 1);
        m.kind = TreeKind::Full;
        for (p, k) in paths {
            let mut e = m.entries[0].clone();
            e.path = p.to_string();
            e.kind = k.clone();
            m.entries.push(e);
        }
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        m
    }

    fn file() -> EntryKind {
        EntryKind::File { size: 0, sha256: hex::encode(Sha256::digest(b"")), blocks: vec![] }
    }

    #[test]
    fn manifests_that_would_write_outside_the_target_are_refused() {
        for bad in [
            with(&[("../escape", file())]),
            with(&[("/etc/passwd", file())]),
            with(&[("a/../../x", file())]),
            with(&[("link", EntryKind::Symlink { target: "/etc".into() }), ("link/passwd", file())]),
            with(&[("nodir/file", file())]),
        ] {
            let err = check_manifest(&bad).unwrap_err().to_string();
            assert!(err.contains("refusing to restore"), "{err}");
        }
        check_manifest(&with(&[("a", EntryKind::Dir), ("a/b", file())])).unwrap();
    }

    #[test]
    fn paths_select_files_and_directories_with_their_parents() {
        let m = with(&[
            ("a", EntryKind::Dir),
            ("a/b", EntryKind::Dir),
            ("a/b/c.txt", file()),
            ("a/d.txt", file()),
            ("e.log", file()),
        ]);
        let got = |p: &[&str]| -> Vec<String> {
            let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
            select(&m, &p).unwrap().iter().map(|e| e.path.clone()).collect()
        };
        assert_eq!(got(&["a/b"]), ["a", "a/b", "a/b/c.txt"]);
        assert_eq!(got(&["*.log"]), ["e.log"]);
        assert_eq!(got(&["a/*.txt", "e.log"]), ["a", "a/d.txt", "e.log"]);
        for bad in ["nothing*", "../a", "/a"] {
            assert!(select(&m, &[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_failed_restore_removes_what_it_wrote() {
        use crate::tree::{backup, Excludes, SetSpec};
        use pitr_archive::{names, KeyRing, LocalStore, Repository};
        use std::sync::Arc;

        let (dir, tree, out) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [2; 32]));
        repo.init().await.unwrap();
        let store = BlockStore::open(&repo).await.unwrap();
        std::fs::create_dir(tree.path().join("a")).unwrap();
        for i in 0..20 {
            std::fs::write(tree.path().join(format!("a/f{i:02}")), format!("file {i}")).unwrap();
        }
        let spec = SetSpec { name: "s".into(), root: tree.path().to_path_buf(), excludes: Excludes::default() };
        let m = backup(&store, &spec, false, &|_| {}).await.unwrap();
        let EntryKind::File { blocks, .. } = &m.entry("a/f19").unwrap().kind else { panic!("a/f19 is a file") };
        repo.delete(&names::files::block(&blocks[0].id)).await.unwrap();

        let created = out.path().join("new/deeper");
        let opts = RestoreOptions { target_dir: created.clone(), paths: vec![] };
        restore(&store, &m, &opts).await.unwrap_err();
        assert!(!out.path().join("new").exists(), "the directories this restore created are removed");

        let existing = out.path().join("empty");
        std::fs::create_dir(&existing).unwrap();
        let opts = RestoreOptions { target_dir: existing.clone(), paths: vec![] };
        restore(&store, &m, &opts).await.unwrap_err();
        assert!(std::fs::read_dir(&existing).unwrap().next().is_none(), "an existing target is left empty");

        let opts = RestoreOptions { target_dir: existing.clone(), paths: vec!["a/f0*".into()] };
        let done = restore(&store, &m, &opts).await.unwrap();
        assert_eq!((done.files, done.dirs), (10, 1));
        assert_eq!(std::fs::read_to_string(existing.join("a/f03")).unwrap(), "file 3");
        assert_eq!(std::fs::read_dir(existing.join("a")).unwrap().count(), 10, "no temporary file is left");
    }

    #[test]
    fn time_selection() {
        let ms = vec![manifest("s", "20261206T010000Z", 10), manifest("s", "20261206T020000Z", 20)];
        assert_eq!(select_time("s", &ms, None).unwrap().stop_time_us, 20);
        assert_eq!(select_time("s", &ms, Some(19)).unwrap().stop_time_us, 10);
        assert_eq!(select_time("s", &ms, Some(20)).unwrap().stop_time_us, 20);
        let err = select_time("s", &ms, Some(9)).unwrap_err().to_string();
        assert!(err.contains("the oldest, 20261206T010000Z"), "{err}");
        assert!(select_time("s", &[], None).unwrap_err().to_string().contains("has no backups"));
    }
}
