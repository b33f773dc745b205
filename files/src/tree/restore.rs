//! Restoring a backup (or the paths of it that `--path` patterns select) into an empty directory.
//!
//! The manifest is checked whole before anything is written: every path must be relative and
//! plain ([`super::safe_path`]) and every parent a directory of the same manifest, so no path
//! leaves the target or passes through a restored symlink (symlinks are created last).
//!
//! Someone else who can write into the target must not be able to redirect the writes (of root,
//! say) elsewhere: nothing is written by path. The target is opened once; every directory, file
//! and symlink is built in a private staging directory inside it (0o700, a random name that is
//! no manifest path, removed at the end) and moved to its name through handles of directories
//! this restore created, checked by device and inode, never following a symlink and never
//! replacing anything. Files are checked against their SHA-256 and synced first; directories get
//! their owners, modes and mtimes last, deepest first, each through one handle. Hard links of the
//! backed-up tree come back as separate files (a backup records paths, not links between them).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glob::Pattern;
use pitr_archive::time::format_rfc3339_micros;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;
use tokio::task::JoinSet;

use super::walk::{read_names, MATCH};
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
    let (created, root) = prepare_target(target)?;
    let root = Arc::new(root);
    let result = write_all(store, manifest, &selected, target, root.clone(), opts.paths.is_empty()).await;
    if result.is_err() {
        // Directories already given their backed-up modes (0o000, 0o500…) cannot be entered to
        // remove what is in them: u+rwx again first.
        let root_for_unlock = root.clone();
        let unlocked = tokio::task::spawn_blocking(move || unlock(&root_for_unlock))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = unlocked {
            tracing::warn!(target = %target.display(), error = %e, "could not make the failed restore's directories writable again");
        }
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

/// Creates the target or checks that it is an empty directory, and opens it (never through a
/// symlink); the topmost directory it created (the target or one above it), if any.
fn prepare_target(target: &Path) -> Result<(Option<PathBuf>, File), FilesError> {
    let not_empty = || {
        FilesError::Other(format!(
            "target directory {} is not empty: restore into a new or empty directory",
            target.display()
        ))
    };
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(target)
            .map_err(|e| FilesError::io(target, e))
    };
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            let root = open()?;
            let names = root.try_clone().and_then(|d| read_names(d.into())).map_err(|e| FilesError::io(target, e))?;
            if !names.is_empty() {
                return Err(not_empty());
            }
            Ok((None, root))
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
            let root = open()?;
            let names = root.try_clone().and_then(|d| read_names(d.into())).map_err(|e| FilesError::io(target, e))?;
            if !names.is_empty() {
                return Err(not_empty());
            }
            Ok((Some(top), root))
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

/// The target as this restore writes it: every name is created in a private staging directory
/// and moved into place through directory handles, never by a path that a symlink or a swapped
/// directory could redirect, and never replacing anything.
struct Tree {
    /// The target directory.
    root: File,
    /// A directory of ours (0o700) inside the target: what is built before it gets its name.
    staging: File,
    staging_name: String,
    /// (device, inode) of every directory created, by path ("." the target): each handle opened
    /// later is checked against it, so a directory swapped for another is noticed.
    dirs: HashMap<String, (u64, u64)>,
}

impl Tree {
    /// Opens directory `rel` component by component from the target, without following a
    /// symlink, each one the directory this restore created there.
    fn open_dir(&self, rel: &str) -> std::io::Result<File> {
        let mut dir = self.root.try_clone()?;
        if rel == "." {
            return Ok(dir);
        }
        for (i, component) in rel.split('/').enumerate() {
            let upto = rel.split('/').take(i + 1).collect::<Vec<_>>().join("/");
            dir = openat_dir(&dir, component, libc::O_RDONLY)?;
            let m = dir.metadata()?;
            if self.dirs.get(&upto) != Some(&(m.dev(), m.ino())) {
                return Err(std::io::Error::other(format!(
                    "directory {upto} is not the one this restore created (replaced during the restore)"
                )));
            }
        }
        Ok(dir)
    }

    /// Moves `tmp` of the staging directory to `rel` (its parent created by this restore).
    fn place(&self, tmp: &str, rel: &str, is_dir: bool) -> std::io::Result<()> {
        let (parent, name) = rel.rsplit_once('/').unwrap_or((".", rel));
        let parent = self.open_dir(parent)?;
        place(&self.staging, tmp, &parent, name, is_dir)
    }
}

async fn write_all(
    store: &BlockStore,
    manifest: &TreeManifest,
    selected: &[&TreeEntry],
    target: &Path,
    root: Arc<File>,
    whole: bool,
) -> Result<RestoreSummary, FilesError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owners = unsafe { libc::geteuid() } == 0;
    let mut summary = RestoreSummary { owners_restored: owners, ..Default::default() };
    let io = |rel: &str, err: std::io::Error| FilesError::io(target.join(rel), err);

    // The staging directory: a name of no manifest path.
    let staging_name = loop {
        let n = format!(".pitr-restore-{:016x}", RandomState::new().build_hasher().finish());
        if manifest.entry(&n).is_none() {
            break n;
        }
    };
    mkdirat(&root, &staging_name, 0o700).map_err(|e| io(&staging_name, e))?;
    let staging = openat_dir(&root, &staging_name, libc::O_RDONLY).map_err(|e| io(&staging_name, e))?;
    let root_meta = root.metadata().map_err(|e| io(".", e))?;
    let mut tree = Tree {
        root: root.try_clone().map_err(|e| io(".", e))?,
        staging,
        staging_name,
        dirs: HashMap::from([(".".to_string(), (root_meta.dev(), root_meta.ino()))]),
    };

    // Directories (parents sort before their contents), writable by us until the end.
    let dirs: Vec<TreeEntry> =
        selected.iter().filter(|e| e.kind == EntryKind::Dir && e.path != ".").map(|e| (*e).clone()).collect();
    let (tree_back, made) = tokio::task::spawn_blocking(move || {
        let mut made = 0u64;
        for (i, e) in dirs.iter().enumerate() {
            let tmp = format!("d{i}");
            let built = (|| {
                mkdirat(&tree.staging, &tmp, 0o700)?;
                let m = openat_dir(&tree.staging, &tmp, libc::O_RDONLY)?.metadata()?;
                tree.place(&tmp, &e.path, true)?;
                Ok::<_, std::io::Error>((m.dev(), m.ino()))
            })();
            match built {
                Ok(id) => {
                    tree.dirs.insert(e.path.clone(), id);
                    made += 1;
                }
                Err(err) => return (tree, Err((e.path.clone(), err))),
            }
        }
        (tree, Ok(made))
    })
    .await
    .map_err(|e| FilesError::Other(format!("a restore task failed: {e}")))?;
    summary.dirs = made.map_err(|(rel, err)| io(&rel, err))?;
    let tree = Arc::new(tree_back);

    // Files. On the first failure the others are told to stop and are waited for, so that
    // nothing writes while the failed restore is cleaned up.
    let cancel = Arc::new(AtomicBool::new(false));
    let mut tasks: JoinSet<Result<u64, FilesError>> = JoinSet::new();
    let mut files = selected.iter().filter(|e| matches!(e.kind, EntryKind::File { .. })).enumerate();
    let mut failed: Option<FilesError> = None;
    loop {
        while failed.is_none() && tasks.len() < FILES_IN_FLIGHT {
            let Some((i, e)) = files.next() else { break };
            let (store, entry, tree, cancel) = (store.clone(), (*e).clone(), tree.clone(), cancel.clone());
            let target = target.to_path_buf();
            tasks.spawn(
                async move { write_file(&store, &tree, &entry, format!("f{i}"), &target, owners, cancel).await },
            );
        }
        let Some(done) = tasks.join_next().await else { break };
        match done.map_err(|e| FilesError::Other(format!("a restore task failed: {e}"))).and_then(|r| r) {
            Ok(bytes) => {
                summary.bytes += bytes;
                summary.files += 1;
            }
            Err(e) => {
                cancel.store(true, Ordering::Relaxed);
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }

    // Symlinks, after every file and directory: nothing is written through one. Then the
    // directories' metadata, deepest first (creating their contents changed their mtimes),
    // each through one handle opened while it was still ours to enter.
    let links: Vec<TreeEntry> =
        selected.iter().filter(|e| matches!(e.kind, EntryKind::Symlink { .. })).map(|e| (*e).clone()).collect();
    let dirs: Vec<TreeEntry> = selected
        .iter()
        .rev()
        .filter(|e| e.kind == EntryKind::Dir && (whole || e.path != "."))
        .map(|e| (*e).clone())
        .collect();
    let tree2 = tree.clone();
    let finished = tokio::task::spawn_blocking(move || -> Result<u64, (String, std::io::Error)> {
        let tree = tree2;
        for (i, e) in links.iter().enumerate() {
            let EntryKind::Symlink { target: link } = &e.kind else { continue };
            let tmp = format!("l{i}");
            (|| {
                symlinkat(link, &tree.staging, &tmp)?;
                set_owner_and_mtime_at(&tree.staging, &tmp, e, owners)?;
                tree.place(&tmp, &e.path, false)
            })()
            .map_err(|err| (e.path.clone(), err))?;
        }
        unlinkat(&tree.root, &tree.staging_name, libc::AT_REMOVEDIR).map_err(|err| (tree.staging_name.clone(), err))?;
        for e in &dirs {
            (|| {
                let d = tree.open_dir(&e.path)?;
                if owners {
                    std::os::unix::fs::fchown(&d, Some(e.uid), Some(e.gid))?;
                }
                // After chown, which clears setuid and setgid.
                d.set_permissions(std::fs::Permissions::from_mode(e.mode))?;
                d.set_times(std::fs::FileTimes::new().set_modified(system_time(e.mtime, e.mtime_nsec)))?;
                d.sync_all()
            })()
            .map_err(|err| (e.path.clone(), err))?;
        }
        if !whole {
            tree.root.sync_all().map_err(|err| (".".to_string(), err))?;
        }
        Ok(links.len() as u64)
    })
    .await
    .map_err(|e| FilesError::Other(format!("a restore task failed: {e}")))?;
    summary.symlinks = finished.map_err(|(rel, err)| io(&rel, err))?;
    Ok(summary)
}

/// Writes one file in the staging directory, checks it, then moves it to its name.
async fn write_file(
    store: &BlockStore,
    tree: &Arc<Tree>,
    e: &TreeEntry,
    tmp: String,
    target: &Path,
    owners: bool,
    cancel: Arc<AtomicBool>,
) -> Result<u64, FilesError> {
    let EntryKind::File { size, sha256, blocks } = &e.kind else { return Ok(0) };
    let path = target.join(&e.path);
    let file = create_at(&tree.staging, &tmp).map_err(|err| FilesError::io(&path, err))?;
    let mut out =
        Hashing { inner: tokio::fs::File::from_std(file), sha: Sha256::new(), len: 0, cancel: cancel.clone() };
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
    let (tree, e) = (tree.clone(), e.clone());
    tokio::task::spawn_blocking(move || {
        if cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("the restore failed elsewhere"));
        }
        if owners {
            std::os::unix::fs::fchown(&file, Some(e.uid), Some(e.gid))?;
        }
        // After chown, which clears setuid and setgid.
        file.set_permissions(std::fs::Permissions::from_mode(e.mode))?;
        file.set_times(std::fs::FileTimes::new().set_modified(system_time(e.mtime, e.mtime_nsec)))?;
        file.sync_all()?;
        tree.place(&tmp, &e.path, false)
    })
    .await
    .map_err(|err| FilesError::Other(format!("{}: {err}", path.display())))?
    .map_err(|err| FilesError::io(&path, err))?;
    Ok(*size)
}

fn system_time(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(u64::from(nsec))
    }
}

fn c_name(name: &str) -> std::io::Result<CString> {
    CString::new(name).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a name with a NUL byte"))
}

fn fd_result(fd: libc::c_int) -> std::io::Result<File> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the call just opened, owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn rc_result(rc: libc::c_int) -> std::io::Result<()> {
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Directory `name` in `dir`, never through a symlink; `how` is O_RDONLY or O_PATH.
fn openat_dir(dir: &File, name: &str, how: libc::c_int) -> std::io::Result<File> {
    let c = c_name(name)?;
    // SAFETY: an open directory descriptor and a NUL-terminated name.
    fd_result(unsafe {
        libc::openat(dir.as_raw_fd(), c.as_ptr(), how | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    })
}

/// A new file `name` in `dir`, 0o600, failing where the name exists.
fn create_at(dir: &File, name: &str) -> std::io::Result<File> {
    let c = c_name(name)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: an open directory descriptor and a NUL-terminated name.
    fd_result(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, 0o600 as libc::c_uint) })
}

fn mkdirat(dir: &File, name: &str, mode: libc::mode_t) -> std::io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: an open directory descriptor and a NUL-terminated name.
    rc_result(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) })
}

fn symlinkat(link: &str, dir: &File, name: &str) -> std::io::Result<()> {
    let (l, c) = (c_name(link)?, c_name(name)?);
    // SAFETY: NUL-terminated strings and an open directory descriptor.
    rc_result(unsafe { libc::symlinkat(l.as_ptr(), dir.as_raw_fd(), c.as_ptr()) })
}

fn unlinkat(dir: &File, name: &str, flags: libc::c_int) -> std::io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: an open directory descriptor and a NUL-terminated name.
    rc_result(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) })
}

/// Moves `from/tmp` to `to/name` without replacing anything there: a hard link (a file or a
/// symlink) or a rename that refuses an existing name (a directory, or a filesystem without
/// hard links).
fn place(from: &File, tmp: &str, to: &File, name: &str, is_dir: bool) -> std::io::Result<()> {
    let (t, n) = (c_name(tmp)?, c_name(name)?);
    if !is_dir {
        // SAFETY: open directory descriptors and NUL-terminated names; flags 0 links a symlink
        // itself, never what it points to.
        let rc = unsafe { libc::linkat(from.as_raw_fd(), t.as_ptr(), to.as_raw_fd(), n.as_ptr(), 0) };
        if rc == 0 {
            return unlinkat(from, tmp, 0);
        }
        let err = std::io::Error::last_os_error();
        if ![Some(libc::EPERM), Some(libc::EOPNOTSUPP)].contains(&err.raw_os_error()) {
            return Err(err);
        }
    }
    // SAFETY: as above.
    let rc =
        unsafe { libc::renameat2(from.as_raw_fd(), t.as_ptr(), to.as_raw_fd(), n.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if ![Some(libc::EINVAL), Some(libc::ENOSYS)].contains(&err.raw_os_error()) {
        return Err(err);
    }
    // No RENAME_NOREPLACE on this filesystem: the name is new in a directory this restore
    // created (or found empty), and the manifest names it once.
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: as above; `st` is written by the call.
    if unsafe { libc::fstatat(to.as_raw_fd(), n.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) } == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
    }
    // SAFETY: as above.
    rc_result(unsafe { libc::renameat(from.as_raw_fd(), t.as_ptr(), to.as_raw_fd(), n.as_ptr()) })
}

/// fchownat (when `owners`) and the mtime of `name` in `dir` itself, never following a symlink.
fn set_owner_and_mtime_at(dir: &File, name: &str, e: &TreeEntry, owners: bool) -> std::io::Result<()> {
    let c = c_name(name)?;
    if owners {
        // SAFETY: an open directory descriptor and a NUL-terminated name.
        rc_result(unsafe { libc::fchownat(dir.as_raw_fd(), c.as_ptr(), e.uid, e.gid, libc::AT_SYMLINK_NOFOLLOW) })?;
    }
    let times = [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        libc::timespec { tv_sec: e.mtime as libc::time_t, tv_nsec: i64::from(e.mtime_nsec) as libc::c_long },
    ];
    // SAFETY: as above, and two valid timespecs, as utimensat asks.
    rc_result(unsafe { libc::utimensat(dir.as_raw_fd(), c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// Gives every directory below `dir` u+rwx again (a failed restore may have given some their
/// backed-up modes), each found through a handle, never through a symlink.
fn unlock(dir: &File) -> std::io::Result<()> {
    for name in read_names(dir.try_clone()?.into())? {
        let Some(name) = name.to_str() else { continue };
        let handle = match openat_dir(dir, name, libc::O_PATH) {
            Ok(h) => h,
            Err(e) if [Some(libc::ENOTDIR), Some(libc::ELOOP)].contains(&e.raw_os_error()) => continue,
            Err(e) => return Err(e),
        };
        let mode = handle.metadata()?.mode();
        if mode & 0o700 != 0o700 {
            // chmod through the handle: /proc's link is the very directory opened.
            let by_handle = format!("/proc/self/fd/{}", handle.as_raw_fd());
            std::fs::set_permissions(by_handle, std::fs::Permissions::from_mode((mode & 0o7777) | 0o700))?;
        }
        unlock(&openat_dir(dir, name, libc::O_RDONLY)?)?;
    }
    Ok(())
}

/// An AsyncWrite that hashes what it passes on.
struct Hashing {
    inner: tokio::fs::File,
    sha: Sha256,
    len: u64,
    /// Set when the restore failed elsewhere: the write fails, so the task ends soon.
    cancel: Arc<AtomicBool>,
}

impl AsyncWrite for Hashing {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.cancel.load(Ordering::Relaxed) {
            return Poll::Ready(Err(std::io::Error::other("the restore failed elsewhere")));
        }
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
        let spec = SetSpec {
            name: "s".into(),
            root: tree.path().to_path_buf(),
            excludes: Excludes::default(),
            stale_backup_after: pitr_archive::running::MIN_STALE_BACKUP_AFTER,
        };
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

    fn tree_in(target: &Path) -> Tree {
        let open = |p: &Path| std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(p).unwrap();
        let root = open(target);
        mkdirat(&root, ".staging", 0o700).unwrap();
        let staging = openat_dir(&root, ".staging", libc::O_RDONLY).unwrap();
        let m = root.metadata().unwrap();
        Tree { root, staging, staging_name: ".staging".into(), dirs: HashMap::from([(".".into(), (m.dev(), m.ino()))]) }
    }

    #[test]
    fn a_restored_directory_swapped_for_a_symlink_or_another_directory_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let (target, elsewhere) = (dir.path().join("target"), dir.path().join("elsewhere"));
        std::fs::create_dir(&target).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        let mut tree = tree_in(&target);
        mkdirat(&tree.staging, "d0", 0o700).unwrap();
        let m = openat_dir(&tree.staging, "d0", libc::O_RDONLY).unwrap().metadata().unwrap();
        tree.place("d0", "a", true).unwrap();
        tree.dirs.insert("a".into(), (m.dev(), m.ino()));
        create_at(&tree.staging, "f0").unwrap();
        tree.place("f0", "a/one", false).unwrap();
        assert!(target.join("a/one").is_file());
        assert!(std::fs::read_dir(target.join(".staging")).unwrap().next().is_none(), "placed, not copied");

        // Someone who can write into the target swaps `a` for a symlink to elsewhere.
        std::fs::rename(target.join("a"), dir.path().join("a-moved")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, target.join("a")).unwrap();
        create_at(&tree.staging, "f1").unwrap();
        let err = tree.place("f1", "a/two", false).unwrap_err();
        assert!([Some(libc::ENOTDIR), Some(libc::ELOOP)].contains(&err.raw_os_error()), "{err}");
        // Or for a directory of their own.
        std::fs::remove_file(target.join("a")).unwrap();
        std::fs::create_dir(target.join("a")).unwrap();
        let err = tree.place("f1", "a/two", false).unwrap_err();
        assert!(err.to_string().contains("not the one this restore created"), "{err}");
        assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none(), "nothing written elsewhere");
        assert!(std::fs::read_dir(target.join("a")).unwrap().next().is_none());

        // A name that exists is never replaced.
        std::fs::write(target.join("taken"), b"theirs").unwrap();
        assert_eq!(tree.place("f1", "taken", false).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(target.join("taken")).unwrap(), b"theirs");
    }

    #[test]
    fn directories_that_cannot_be_entered_are_made_so_again_for_the_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::create_dir(dir.path().join("c")).unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("link")).unwrap();
        let root_mode = std::fs::symlink_metadata("/").unwrap().mode();
        std::fs::set_permissions(dir.path().join("a/b"), std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o100)).unwrap();
        std::fs::set_permissions(dir.path().join("c"), std::fs::Permissions::from_mode(0o300)).unwrap();
        unlock(&File::open(dir.path()).unwrap()).unwrap();
        let mode = |p: &str| std::fs::symlink_metadata(dir.path().join(p)).unwrap().mode() & 0o7777;
        assert_eq!((mode("a"), mode("a/b"), mode("c")), (0o700, 0o700, 0o700));
        assert_eq!(std::fs::symlink_metadata("/").unwrap().mode(), root_mode, "a symlink is not followed");
        std::fs::remove_dir_all(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn directories_without_owner_access_restore_and_no_staging_name_is_left() {
        use crate::tree::{backup, Excludes, SetSpec};
        use pitr_archive::{KeyRing, LocalStore, Repository};

        let (dir, tree, out) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [4; 32]));
        repo.init().await.unwrap();
        let store = BlockStore::open(&repo).await.unwrap();
        for (d, mode) in [("none", 0o000), ("wx", 0o300), ("x", 0o100)] {
            std::fs::create_dir(tree.path().join(d)).unwrap();
            std::fs::write(tree.path().join(d).join("f"), d).unwrap();
            std::fs::set_permissions(tree.path().join(d), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let spec = SetSpec {
            name: "s".into(),
            root: tree.path().to_path_buf(),
            excludes: Excludes::default(),
            stale_backup_after: pitr_archive::running::MIN_STALE_BACKUP_AFTER,
        };
        let m = backup(&store, &spec, false, &|_| {}).await.unwrap();
        let target = out.path().join("t");
        let done = restore(&store, &m, &RestoreOptions { target_dir: target.clone(), paths: vec![] }).await.unwrap();
        assert_eq!((done.files, done.dirs), (3, 3));
        let mode = |p: &str| std::fs::symlink_metadata(target.join(p)).unwrap().mode() & 0o7777;
        assert_eq!((mode("none"), mode("wx"), mode("x")), (0o000, 0o300, 0o100));
        let mut names: Vec<String> =
            std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["none", "wx", "x"], "the staging directory is gone");
        for d in ["none", "wx", "x"] {
            std::fs::set_permissions(target.join(d), std::fs::Permissions::from_mode(0o700)).unwrap();
            std::fs::set_permissions(tree.path().join(d), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        assert_eq!(std::fs::read_to_string(target.join("wx/f")).unwrap(), "wx");
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
