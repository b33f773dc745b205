//! Writing a backup's files into a directory: blocks fetched and written in parallel (bounded),
//! an incremental backup's files combined with its ancestors' on the way ([`crate::combine`]),
//! into a staging directory that becomes the target only when complete. `global/pg_control` is
//! written last, so even a staging directory left by a crash never looks like a valid cluster.
//!
//! Tablespaces come back inside the target directory, under `pitr_tablespaces/<oid>`, with
//! `pg_tblspc/<oid>` a symlink to it: the restore never writes outside its target (the original
//! locations may belong to the running primary), and PostgreSQL 15+ refuses plain directories
//! in pg_tblspc. A tablespace the operator maps (`--tablespace-map OID=DIR`,
//! [`MappedTablespaces`]) goes to DIR instead, written the same way into a staging directory
//! beside DIR and renamed into place; its link points at DIR. Its paths are judged by the same
//! rules, relative to DIR: a manifest can no more leave a mapped directory than the target.
//!
//! A manifest is not trusted to stay inside the target: it came from a server and sits in a
//! repository someone else may write to. Before anything is written every path is checked
//! ([`confined_path`]: plain relative components only, nothing at or under a link this restore
//! creates), the only links recreated are `pg_tblspc/<oid>` (pointing inside the target), and
//! modes lose setuid/setgid/sticky. Writing itself never follows a link either: directories are
//! created component by component refusing links, files are opened with `O_NOFOLLOW`, so even a
//! link swapped in by a racing process is not written through.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pitr_archive::backup::{BackupEntryKind, BackupFile, BackupManifest};
use pitr_archive::names::pg;
use pitr_archive::Repository;
use pitr_pgformat::incremental::{
    combined_backup_label, full_path_of, incremental_path_of, parse_header, IncrementalHeader,
};
use tokio::task::JoinSet;

use crate::combine::{block_map, pieces, runs, Source};
use crate::RestoreError;

pub(crate) const PG_CONTROL: &str = "global/pg_control";

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |e| match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => RestoreError::NoSpace { path: path.to_path_buf() },
        _ => RestoreError::Io { path: path.to_path_buf(), cause: e },
    }
}

/// A target that holds something: never a running server's, and replaced only with `--force`.
fn non_empty_target(target: &Path, force: bool) -> Result<(), RestoreError> {
    if let Some(pid) = live_postmaster(target)? {
        return Err(RestoreError::TargetInUse { dir: target.to_path_buf(), pid });
    }
    if force {
        Ok(())
    } else {
        Err(RestoreError::TargetNotEmpty(target.to_path_buf()))
    }
}

/// Checks the target directory: it may be missing or empty; anything else needs `force`, and
/// even `force` never replaces the directory of a running server.
pub fn check_target(target: &Path, force: bool) -> Result<(), RestoreError> {
    match std::fs::read_dir(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RestoreError::Io { path: target.to_path_buf(), cause: e }),
        Ok(mut entries) => {
            if entries.next().is_none() {
                return Ok(());
            }
            non_empty_target(target, force)
        }
    }
}

/// The pid of the server that wrote `dir/postmaster.pid`, if it is still running.
///
/// A pid file whose pid no longer runs is stale, left by a crashed server (or a machine that
/// went down): PostgreSQL itself starts over such a file, and so may a restore. Running means
/// `kill(pid, 0)` finds the process, also when it belongs to another user (`EPERM`). A
/// stale pid since reused by an unrelated process counts as running (the message says to
/// remove the file). A server whose pid is invisible from here (another PID namespace: a sidecar container of the database's pod) is found, as
/// PostgreSQL finds it, by the shared memory segment the file names still having processes
/// attached (seen where the IPC namespace is shared, as between the containers of one pod).
pub fn live_postmaster(dir: &Path) -> Result<Option<i32>, RestoreError> {
    let pid_file = dir.join("postmaster.pid");
    let text = match std::fs::read(&pid_file) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RestoreError::Io { path: pid_file, cause: e }),
    };
    let first = text.lines().next().unwrap_or("").trim();
    // A standalone backend (postgres --single) writes its pid negated.
    let pid = first.parse::<i64>().ok().map(i64::unsigned_abs).and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 0);
    // A server writes the file in steps; an empty or garbled first line may be one starting
    // now, so it is not taken as stale. (pid 0 or -1 would also make kill() signal a group.)
    let Some(pid) = pid else {
        return Err(RestoreError::PidFileUnclear {
            dir: dir.to_path_buf(),
            what: format!("the first line of postmaster.pid is {first:?}, not a process id"),
        });
    };
    // SAFETY: signal 0 only checks that the process exists; pid is positive, so this never
    // addresses a process group.
    let exists =
        unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if exists && !is_zombie(pid) {
        return Ok(Some(pid));
    }
    // A server in another PID namespace (a sidecar container in the database's pod) is invisible
    // to kill(); PostgreSQL's own test (PGSharedMemoryIsInUse) asks whether any process is still
    // attached to the shared memory segment the file names, and pod containers share IPC.
    let in_use = shm_of(&text).map(|(key, id)| shared_memory_attached(key, id, dir)).transpose()?.unwrap_or(false);
    Ok(in_use.then_some(pid))
}

/// The System V shared memory key and id `postmaster.pid` records: its 7th line is `key id`
/// (the server writes it once the segment exists; before that the line is missing).
pub(crate) fn shm_of(pid_file: &str) -> Option<(i64, i32)> {
    let line = pid_file.lines().nth(6)?;
    let mut words = line.split_whitespace();
    let (key, id) = (words.next()?, words.next()?);
    Some((key.parse::<i64>().ok()?, id.parse::<i32>().ok().filter(|&id| id >= 0)?))
}

/// Whether a process is attached to shared memory segment `id` of key `key`, as PostgreSQL
/// judges it: a segment that is gone (EINVAL, or EIDRM on Linux), that has another key (after
/// a reboot the id can be another server's segment) or that the server of `dir` cannot own
/// (unreadable to us, or owned by another user than the directory's) is not the server's.
/// Any other failure to tell counts as attached.
fn shared_memory_attached(key: i64, id: i32, dir: &Path) -> Result<bool, RestoreError> {
    // SAFETY: shmid_ds is plain data; IPC_STAT only fills it.
    let mut stat: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT reads the segment's status into `stat`, which lives for the call.
    if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut stat) } != 0 {
        return Ok(!matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EINVAL) | Some(libc::EIDRM) | Some(libc::EACCES)
        ));
    }
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(dir).map_err(io(dir))?.uid();
    // The server writes the key unsigned; key_t is signed.
    let same_key = i64::from(stat.shm_perm.__key) == key || i64::from(stat.shm_perm.__key as u32) == key;
    Ok(same_key && stat.shm_perm.uid == owner && stat.shm_nattch > 0)
}

/// A killed server whose parent has not reaped it yet (in a container whose init does not
/// reap, for instance) still answers `kill(pid, 0)`, but runs no more. Linux's /proc tells;
/// where it cannot be read the process counts as running.
fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) state …`: comm may hold spaces and parentheses, the state follows the last `)`.
    stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).is_some_and(|s| s == "Z" || s == "X")
}

/// Why a path of a backup manifest may not be written by a restore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unconfined {
    /// Names nothing once `.` and empty components are dropped.
    #[error("is empty")]
    Empty,
    /// Starts with `/`.
    #[error("is an absolute path")]
    Absolute,
    /// Has a `..` component, or one holding a NUL byte (the component).
    #[error("has a {0:?} component (a restore writes only plain names below the target)")]
    Component(String),
    /// Is, or lies under, a tablespace link the restore creates (that link's path).
    #[error("lies at or under {0}, a symbolic link this restore creates (writing there would follow it)")]
    ThroughLink(String),
    /// A symbolic link other than `pg_tblspc/<oid>` (its target).
    #[error("is a symbolic link to {0:?}: a restore recreates only the tablespace links pg_tblspc/<oid>")]
    UnexpectedLink(String),
}

/// `path` (as the restore writes it, relative to the restore directory) if it stays below that
/// directory and neither is nor lies under one of `links`, the symbolic links the restore
/// creates; normalised. Looks at no file system: it judges the manifest alone, before anything
/// is written. `..` and a leading `/` are refused; `.` and empty components name the same place
/// and are dropped (PostgreSQL itself sends `./pg_wal/archive_status`).
pub fn confined_path(path: &str, links: &BTreeSet<PathBuf>) -> Result<PathBuf, Unconfined> {
    if path.starts_with('/') {
        return Err(Unconfined::Absolute);
    }
    let mut out = PathBuf::new();
    for c in plain_components(path) {
        if c == ".." || c.contains('\0') {
            return Err(Unconfined::Component(c.to_string()));
        }
        out.push(c);
        if links.contains(&out) {
            return Err(Unconfined::ThroughLink(out.display().to_string()));
        }
    }
    if out.as_os_str().is_empty() {
        return Err(Unconfined::Empty);
    }
    Ok(out)
}

/// The components of a `/`-separated manifest path that name something: not `.`, not empty.
pub(crate) fn plain_components(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".")
}

/// The OID of a tablespace link `pg_tblspc/<oid>`: the only symbolic links PostgreSQL's
/// BASE_BACKUP sends, and the only ones a restore recreates.
fn tablespace_link_oid(path: &str) -> Option<&str> {
    let oid = path.strip_prefix("pg_tblspc/")?;
    (!oid.is_empty() && oid.len() <= 10 && oid.bytes().all(|b| b.is_ascii_digit())).then_some(oid)
}

/// What a restore of `backup` creates, every path checked before anything is written.
pub(crate) struct CheckedLayout {
    /// Directories in manifest order: the manifest's path, and the mode.
    pub(crate) dirs: Vec<(String, u32)>,
    /// Tablespace links: `pg_tblspc/<oid>` and the OID.
    pub(crate) links: Vec<(PathBuf, String)>,
}

/// Checks every path a restore of `backup` would write: entries, and files under both their
/// stored and their restored names (tablespace files move under `pitr_tablespaces/`,
/// incremental files lose their `INCREMENTAL.` prefix).
pub(crate) fn check_layout(backup: &BackupManifest) -> Result<CheckedLayout, RestoreError> {
    let refuse =
        |path: &str, reason| RestoreError::UnsafePath { backup: backup.id.clone(), path: path.to_string(), reason };
    let none = BTreeSet::new();
    let mut links = Vec::new();
    for e in &backup.entries {
        if let BackupEntryKind::Symlink { target } = &e.kind {
            confined_path(&e.path, &none).map_err(|r| refuse(&e.path, r))?;
            // The link's own target is ignored (it names the server's tablespace location);
            // anything else with a link could point anywhere.
            let oid = tablespace_link_oid(&e.path)
                .ok_or_else(|| refuse(&e.path, Unconfined::UnexpectedLink(target.clone())))?;
            links.push((PathBuf::from(&e.path), oid.to_string()));
        }
    }
    let link_set: BTreeSet<PathBuf> = links.iter().map(|(p, _)| p.clone()).collect();
    let written = |path: &str| -> Result<PathBuf, RestoreError> {
        confined_path(path, &none).map_err(|r| refuse(path, r))?;
        confined_path(&local_path(path), &link_set).map_err(|r| refuse(path, r))
    };
    let mut dirs = Vec::new();
    for e in &backup.entries {
        if e.kind == BackupEntryKind::Directory {
            written(&e.path)?;
            dirs.push((e.path.clone(), e.mode));
        }
    }
    for (path, file) in output_files(backup) {
        written(&file.path)?;
        written(&path)?;
    }
    Ok(CheckedLayout { dirs, links })
}

/// Modes as restored: permission bits only. setuid, setgid and sticky bits have no business in
/// a data directory (PostgreSQL's files are 0600/0640, its directories 0700/0750) and would be
/// a gift to whoever crafted them.
fn restored_mode(mode: u32) -> u32 {
    mode & 0o777
}

fn not_followed(path: &Path) -> RestoreError {
    RestoreError::Io {
        path: path.to_path_buf(),
        cause: std::io::Error::other("exists and is not a directory (a restore never writes through a symbolic link)"),
    }
}

/// Creates `rel` and its parents under `root` without following any symbolic link: each
/// existing component must be a real directory (`symlink_metadata` does not follow). Returns
/// the full path.
pub(crate) fn create_dir_confined(root: &Path, rel: &Path) -> Result<PathBuf, RestoreError> {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => return Err(not_followed(&at)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RestoreError::Io { path: at, cause: e }),
        }
        match std::fs::create_dir(&at) {
            Ok(()) => {}
            // Created meanwhile: fine if it is a directory, and mkdir never follows a link.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !std::fs::symlink_metadata(&at).map(|m| m.is_dir()).unwrap_or(false) {
                    return Err(not_followed(&at));
                }
            }
            Err(e) => return Err(io(&at)(e)),
        }
    }
    Ok(at)
}

/// Sets a directory's mode through a handle opened without following a link.
pub(crate) fn chmod_dir(path: &Path, mode: u32) -> Result<(), RestoreError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path))?;
    f.set_permissions(std::fs::Permissions::from_mode(restored_mode(mode))).map_err(io(path))
}

/// Opens an existing file for writing, refusing a symbolic link in its place.
fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Writes `bytes` to `path` (created 0600 or truncated), refusing a symbolic link in its place:
/// for the files a restore adds beside the backup's (backup_label, recovery settings…). Durable
/// when it returns: the file and its directory are fsynced, since these are written after the
/// restored files' own fsync and a server started on a directory that lost `recovery.signal` or
/// its recovery target in a crash would not recover to the target.
pub fn write_file_nofollow(path: &Path, bytes: &[u8]) -> Result<(), RestoreError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Reads `path` as text, refusing a symbolic link in its place; `None` if it does not exist.
pub fn read_file_nofollow(path: &Path) -> Result<Option<String>, RestoreError> {
    use std::io::Read;
    let mut f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RestoreError::Io { path: path.to_path_buf(), cause: e }),
    };
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io(path))?;
    Ok(Some(text))
}

/// A directory the restore writes into before it is put in place; removed on drop unless kept.
pub struct Staging {
    /// `.<target name>.pitr-partial-<pid>` beside the target, or `.pitr-partial-<pid>` inside
    /// an existing directory (see [`Staging::create_in_place`]).
    pub path: PathBuf,
    /// Staged inside the directory it is committed to.
    inside: bool,
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
    /// Creates an empty staging directory (mode 0700) beside `target`, replacing one a previous
    /// run of this pid left.
    pub fn create(target: &Path) -> Result<Staging, RestoreError> {
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "restore".into());
        Self::create_at(parent.join(format!(".{name}.pitr-partial-{}", std::process::id())), false)
    }

    /// A staging directory for `dir` that leaves `dir` itself in place when it exists: inside
    /// it, its entries moved into `dir` at commit. A mapped tablespace directory is often a
    /// mount point (the tablespace's own disk): staged beside it, the data would be written to
    /// the parent's file system and the mount point could not be replaced. A symbolic link in
    /// `dir`'s place is refused (staging through it and replacing it would restore the data
    /// beside the link, the link gone). When `dir` does not exist, as [`Staging::create`].
    pub fn create_in_place(dir: &Path) -> Result<Staging, RestoreError> {
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(dir),
            Err(e) => Err(RestoreError::Io { path: dir.to_path_buf(), cause: e }),
            Ok(meta) if meta.is_dir() => Self::create_at(dir.join(Self::inside_name()), true),
            Ok(_) => Err(RestoreError::Io {
                path: dir.to_path_buf(),
                cause: std::io::Error::other("is not a directory (a symbolic link or a file is not restored into)"),
            }),
        }
    }

    fn inside_name() -> String {
        format!(".pitr-partial-{}", std::process::id())
    }

    fn create_at(path: PathBuf, inside: bool) -> Result<Staging, RestoreError> {
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
        std::fs::create_dir(&path).map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(io(&path))?;
        Ok(Staging { path, inside, keep: false })
    }

    /// Whether the staging directory may be put in place as `target`: missing or empty (this
    /// staging directory aside), or non-empty with `force`, and never a running server's.
    pub fn check(&self, target: &Path, force: bool) -> Result<(), RestoreError> {
        if !self.inside {
            return check_target(target, force);
        }
        if !std::fs::symlink_metadata(target).map_err(io(target))?.is_dir() {
            return Err(RestoreError::Io {
                path: target.to_path_buf(),
                cause: std::io::Error::other(
                    "is no longer a directory (a symbolic link or a file is not restored into)",
                ),
            });
        }
        if self.others(target)?.is_empty() {
            return Ok(());
        }
        non_empty_target(target, force)
    }

    /// The entries of `dir` other than this staging directory.
    fn others(&self, dir: &Path) -> Result<Vec<PathBuf>, RestoreError> {
        let own = self.path.file_name();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            if Some(entry.file_name().as_os_str()) != own {
                out.push(entry.path());
            }
        }
        Ok(out)
    }

    /// Puts the staging directory in place as `target` (replacing an empty or, with `force`, a
    /// non-empty one), after [`Staging::check`]. Staged beside: renamed to `target`. Staged
    /// inside: `target`'s other entries removed (with `force`), then each staged entry renamed
    /// into `target`, which itself stays (a mount point, its owner and mode).
    pub fn commit(mut self, target: &Path, force: bool) -> Result<(), RestoreError> {
        self.check(target, force)?;
        if self.inside {
            for old in self.others(target)? {
                let is_dir = std::fs::symlink_metadata(&old).map_err(io(&old))?.is_dir();
                if is_dir {
                    std::fs::remove_dir_all(&old).map_err(io(&old))?;
                } else {
                    std::fs::remove_file(&old).map_err(io(&old))?;
                }
            }
            for entry in std::fs::read_dir(&self.path).map_err(io(&self.path))? {
                let entry = entry.map_err(io(&self.path))?;
                let to = target.join(entry.file_name());
                std::fs::rename(entry.path(), &to).map_err(io(&to))?;
            }
            std::fs::remove_dir(&self.path).map_err(io(&self.path))?;
            std::fs::File::open(target).and_then(|f| f.sync_all()).map_err(io(target))?;
            self.keep = true;
            return Ok(());
        }
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

/// The directory inside the restored data directory that holds tablespaces, one `<oid>`
/// directory each, `pg_tblspc/<oid>` linking to it.
pub const TABLESPACE_DIR: &str = "pitr_tablespaces";

/// Tablespaces restored outside the target (`--tablespace-map`), by OID: where their files are
/// written (a staging directory beside or inside the mapped directory, see
/// [`Staging::create_in_place`]), and the mapped directory itself, which `pg_tblspc/<oid>`
/// links to once the staged files are moved there.
#[derive(Debug, Clone, Default)]
pub struct MappedTablespaces(pub BTreeMap<u32, MappedTablespace>);

/// One tablespace of [`MappedTablespaces`].
#[derive(Debug, Clone)]
pub struct MappedTablespace {
    /// Where its files are written now.
    pub write_dir: PathBuf,
    /// Where they end up, and what `pg_tblspc/<oid>` links to.
    pub final_dir: PathBuf,
}

impl MappedTablespaces {
    /// The tablespace mapped for `oid` as a manifest spells it (`16384`, never `016384`: the
    /// text must be the OID's own, so that no other spelling lands in a mapped directory).
    pub(crate) fn get(&self, oid: &str) -> Option<&MappedTablespace> {
        let parsed = oid.parse::<u32>().ok().filter(|o| o.to_string() == oid)?;
        self.0.get(&parsed)
    }
}

/// Where a restore writes: the staging directory of the target, and the mapped tablespaces.
pub(crate) struct Placement<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) mapped: &'a MappedTablespaces,
}

impl Placement<'_> {
    /// The root a manifest path is written under, and the path below it: a mapped
    /// tablespace's directory for what lies under its `pg_tblspc/<oid>/`, otherwise the target
    /// (with [`local_path`]'s renaming). Only for paths [`check_layout`] accepted.
    pub(crate) fn locate(&self, path: &str) -> (&Path, PathBuf) {
        let components: Vec<&str> = plain_components(path).collect();
        if let [first, oid, rest @ ..] = components.as_slice() {
            if let (true, false, Some(m)) = (*first == "pg_tblspc", rest.is_empty(), self.mapped.get(oid)) {
                return (&m.write_dir, rest.iter().collect());
            }
        }
        (self.dir, PathBuf::from(local_path(path)))
    }

    /// The file system path a manifest path is written to.
    pub(crate) fn path(&self, path: &str) -> PathBuf {
        let (root, rel) = self.locate(path);
        root.join(rel)
    }

    /// Creates the directory a manifest path names, and its parents, without following links.
    pub(crate) fn create_dir(&self, path: &str) -> Result<PathBuf, RestoreError> {
        let (root, rel) = self.locate(path);
        create_dir_confined(root, &rel)
    }

    /// Creates the parent directory of a manifest path's file.
    pub(crate) fn create_parent(&self, path: &str) -> Result<(), RestoreError> {
        let (root, rel) = self.locate(path);
        if let Some(parent) = rel.parent() {
            create_dir_confined(root, parent)?;
        }
        Ok(())
    }
}

/// Fails unless every OID of `oids` is a tablespace of `backup` (it has the link
/// `pg_tblspc/<oid>`); the error lists the backup's tablespaces. Checked before anything is
/// written.
pub fn check_mapped_oids(backup: &BackupManifest, oids: impl IntoIterator<Item = u32>) -> Result<(), RestoreError> {
    let linked: BTreeSet<u32> = backup
        .entries
        .iter()
        .filter(|e| matches!(e.kind, BackupEntryKind::Symlink { .. }))
        .filter_map(|e| tablespace_link_oid(&e.path))
        .filter_map(|oid| oid.parse::<u32>().ok().filter(|o| o.to_string() == oid))
        .collect();
    for oid in oids {
        if !linked.contains(&oid) {
            let known: Vec<String> = linked
                .iter()
                .map(|t| match backup.tablespaces.iter().find(|ts| ts.oid == *t) {
                    Some(ts) => format!("{t} (was at {})", ts.location),
                    None => t.to_string(),
                })
                .collect();
            return Err(RestoreError::UnknownTablespace {
                oid,
                backup: backup.id.clone(),
                known: if known.is_empty() { "none".into() } else { known.join(", ") },
            });
        }
    }
    Ok(())
}

/// Where a backup path goes in the restored directory (normalised as [`confined_path`] does, so
/// that what is checked is what is written).
pub(crate) fn local_path(path: &str) -> String {
    let path = plain_components(path).collect::<Vec<_>>().join("/");
    match path.strip_prefix("pg_tblspc/") {
        Some(rest) if rest.contains('/') => format!("{TABLESPACE_DIR}/{rest}"),
        _ => path,
    }
}

/// Where a stored block's bytes go: `(output file, byte range of the block, offset in the file)`;
/// the range is `None` for the whole block.
pub(crate) type PieceWrite = (Arc<PathBuf>, Option<(u64, u64)>, u64);

/// One stored block to fetch, and where its bytes go.
pub(crate) struct BlockJob {
    pub(crate) block_id: String,
    /// The stored block's length as its manifest implies (every block `block_size` bytes but
    /// a file's last).
    pub(crate) stored_len: u64,
    pub(crate) writes: Vec<PieceWrite>,
    /// Read what each piece replaces first and leave equal bytes unwritten (a delta restore's
    /// pieces it could not judge by hash).
    pub(crate) compare_first: bool,
}

/// An output file and the jobs that fill it.
pub(crate) struct PlannedFile {
    pub(crate) path: String,
    pub(crate) size: u64,
    pub(crate) jobs: Vec<BlockJob>,
}

/// Writes the backup `chain` (oldest first; the last is the one restored, the others its
/// ancestors when it is incremental) under `dir`, which will be renamed to `final_dir`, and the
/// `mapped` tablespaces into their own directories. `progress(done, total)` is called as bytes
/// land. Returns the bytes of the files written.
pub async fn materialize(
    repo: &Repository,
    chain: &[&BackupManifest],
    dir: &Path,
    final_dir: &Path,
    mapped: &MappedTablespaces,
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<u64, RestoreError> {
    let backup = *chain.last().ok_or_else(|| RestoreError::Other("no backup to restore".into()))?;
    // Every path is judged before the first write: a refused backup leaves nothing behind.
    check_mapped_oids(backup, mapped.0.keys().copied())?;
    let layout = check_layout(backup)?;
    chain.iter().try_for_each(|b| check_block_counts(b))?;
    let place = Placement { dir, mapped };
    // Directories and links first, so files have somewhere to go.
    for (path, mode) in &layout.dirs {
        let created = place.create_dir(path)?;
        chmod_dir(&created, *mode)?;
    }
    for (rel, oid) in &layout.links {
        let mapped = mapped.get(oid);
        // The link points where the tablespace will be once the staging directories are
        // renamed, never at the server's tablespace location the manifest records.
        let link_target = match mapped {
            Some(m) => {
                chmod_dir(&m.write_dir, 0o700)?;
                m.final_dir.clone()
            }
            None => {
                let home = create_dir_confined(dir, &Path::new(TABLESPACE_DIR).join(oid))?;
                chmod_dir(&home, 0o700)?;
                final_dir.join(TABLESPACE_DIR).join(oid)
            }
        };
        if let Some(parent) = rel.parent() {
            create_dir_confined(dir, parent)?;
        }
        let path = dir.join(rel);
        // symlink() fails on an existing path rather than following it.
        std::os::unix::fs::symlink(&link_target, &path).map_err(io(&path))?;
    }
    let planned = plan_files(repo, chain, &place, workers).await?;
    let total: u64 = planned.iter().map(|f| f.size).sum();
    let done = Arc::new(AtomicU64::new(0));
    let mut rounds: [Vec<BlockJob>; 2] = [Vec::new(), Vec::new()];
    for file in &planned {
        place.create_parent(&file.path)?;
        let path = place.path(&file.path);
        // O_EXCL (create_new) never follows a link, and a path listed twice is an error rather
        // than a silent overwrite.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io(&path))?;
        // Blocks no backup supplies stay zero, as pg_combinebackup writes them.
        f.set_len(file.size).map_err(io(&path))?;
    }
    for file in planned {
        rounds[(file.path == PG_CONTROL) as usize].extend(file.jobs);
    }
    // Two rounds: everything but pg_control, then pg_control.
    for round in rounds {
        run_jobs(repo, backup.system_id, round, workers, &done, total, progress, None).await?;
    }
    progress(done.load(Ordering::Relaxed), total);
    if chain.len() > 1 {
        // PostgreSQL refuses to start from the label of an uncombined incremental.
        let label = dir.join("backup_label");
        let text = read_file_nofollow(&label)?.ok_or_else(|| {
            RestoreError::Other(format!("backup {} has no backup_label to rewrite for the combined chain", backup.id))
        })?;
        write_file_nofollow(&label, combined_backup_label(&text).as_bytes())?;
    }
    // Modes and durability: fsync every file, then every directory.
    let mut dirs_to_sync = vec![dir.to_path_buf()];
    dirs_to_sync.extend(mapped.0.values().map(|m| m.write_dir.clone()));
    let files: Vec<(PathBuf, u32)> = output_files(backup).map(|(path, f)| (place.path(&path), f.mode)).collect();
    sync_all(files, dirs_to_sync, workers).await?;
    // The server's manifest describes this very directory only for a full backup; an
    // incremental's lists INCREMENTAL.* files that the combined directory does not have.
    if chain.len() == 1 {
        write_file_nofollow(&dir.join("backup_manifest"), backup.server_manifest.as_bytes())?;
    }
    Ok(total)
}

/// Bytes written and bytes found equal (not written), by output file.
pub(crate) type Tally = Arc<std::sync::Mutex<BTreeMap<Arc<PathBuf>, (u64, u64)>>>;

/// Fetches the stored block of every job and writes its pieces, `workers` at once, adding the
/// bytes handled to `done` and calling `progress(done, total)` as they land; `tally`, where
/// given, gets what each file had written and found equal. The first error stops the others.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_jobs(
    repo: &Repository,
    system_id: u64,
    jobs: Vec<BlockJob>,
    workers: usize,
    done: &Arc<AtomicU64>,
    total: u64,
    progress: &(dyn Fn(u64, u64) + Sync),
    tally: Option<&Tally>,
) -> Result<(), RestoreError> {
    let queue = Arc::new(tokio::sync::Mutex::new(jobs.into_iter()));
    let mut set = JoinSet::new();
    for _ in 0..workers.max(1) {
        let (queue, repo, done, tally) = (queue.clone(), repo.clone(), done.clone(), tally.cloned());
        set.spawn(async move {
            loop {
                let job = queue.lock().await.next();
                let Some(job) = job else { return Ok::<(), RestoreError>(()) };
                let file = job.writes.first().map(|w| w.0.display().to_string()).unwrap_or_default();
                let name = pg::block(system_id, &job.block_id);
                let (_, data) = repo
                    .get_opened(&name)
                    .await
                    .map_err(|e| RestoreError::Block { file: file.clone(), cause: Box::new(e) })?;
                let handled = tokio::task::spawn_blocking(move || write_pieces(&data, &job.writes, job.compare_first))
                    .await
                    .map_err(|e| RestoreError::Other(format!("write task: {e}")))??;
                done.fetch_add(handled.iter().map(|(_, w, e)| w + e).sum(), Ordering::Relaxed);
                if let Some(tally) = &tally {
                    let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
                    for (path, written, equal) in handled {
                        let t = tally.entry(path).or_default();
                        t.0 += written;
                        t.1 += equal;
                    }
                }
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
    first_error.map_or(Ok(()), Err)
}

/// The files a restore of `backup` writes: its own, with incremental files under their real names.
pub(crate) fn output_files(backup: &BackupManifest) -> impl Iterator<Item = (String, &BackupFile)> {
    backup.files.iter().map(|f| (full_path_of(&f.path).unwrap_or_else(|| f.path.clone()), f))
}

/// Writes a fetched block's pieces; with `compare_first`, a piece whose place already holds the
/// same bytes is left unwritten. Returns the bytes written and the bytes found equal, by file.
fn write_pieces(
    data: &[u8],
    writes: &[PieceWrite],
    compare_first: bool,
) -> Result<Vec<(Arc<PathBuf>, u64, u64)>, RestoreError> {
    let mut out = Vec::with_capacity(writes.len());
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
        if compare_first {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path.as_path())
                .map_err(io(path))?;
            let mut there = vec![0u8; bytes.len()];
            // Shorter than the piece's end (cannot be after set_len, but a file is the world's):
            // then it differs.
            if f.read_exact_at(&mut there, *at).is_ok() && there == bytes {
                out.push((path.clone(), 0, bytes.len() as u64));
                continue;
            }
            f.write_all_at(bytes, *at).map_err(io(path))?;
        } else {
            let f = open_nofollow(path).map_err(io(path))?;
            f.write_all_at(bytes, *at).map_err(io(path))?;
        }
        out.push((path.clone(), bytes.len() as u64, 0));
    }
    Ok(out)
}

/// The length of stored block `index` of `file`, cut into `block_size` blocks.
pub(crate) fn stored_len(file: &BackupFile, block_size: u64, index: usize) -> u64 {
    block_size.min(file.size.saturating_sub(index as u64 * block_size))
}

/// Refuses a manifest whose files' block lists do not cover their sizes exactly (every block
/// `block_size` bytes but the last): what a restore writes is judged by them.
pub(crate) fn check_block_counts(backup: &BackupManifest) -> Result<(), RestoreError> {
    for f in &backup.files {
        let needed = if f.size == 0 {
            0
        } else if backup.block_size == 0 {
            u64::MAX
        } else {
            f.size.div_ceil(backup.block_size)
        };
        if f.blocks.len() as u64 != needed {
            return Err(RestoreError::Other(format!(
                "backup {}: {} is {} bytes, which takes {} blocks of {} bytes, but its manifest lists {}; nothing \
                 was written",
                backup.id,
                f.path,
                f.size,
                if needed == u64::MAX { "some".to_string() } else { needed.to_string() },
                backup.block_size,
                f.blocks.len()
            )));
        }
    }
    Ok(())
}

/// The jobs for every file: whole stored blocks for files a backup holds in full, and for
/// incremental files the pieces of the chain's blocks that [`crate::combine`] picks.
async fn plan_files(
    repo: &Repository,
    chain: &[&BackupManifest],
    place: &Placement<'_>,
    workers: usize,
) -> Result<Vec<PlannedFile>, RestoreError> {
    let backup = *chain.last().ok_or_else(|| RestoreError::Other("no backup to restore".into()))?;
    let mut planned = Vec::new();
    let mut incremental = Vec::new();
    for (path, file) in output_files(backup) {
        let out = Arc::new(place.path(&path));
        if path == file.path {
            let jobs = file
                .blocks
                .iter()
                .enumerate()
                .map(|(i, id)| BlockJob {
                    block_id: id.clone(),
                    stored_len: stored_len(file, backup.block_size, i),
                    writes: vec![(out.clone(), None, i as u64 * backup.block_size)],
                    compare_first: false,
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
    planned.extend(plan_combined_all(repo, chain, incremental, workers).await?);
    Ok(planned)
}

/// Plans every file whose newest version is incremental ([`plan_combined`]): `(output path,
/// where it is written)` each.
pub(crate) async fn plan_combined_all(
    repo: &Repository,
    chain: &[&BackupManifest],
    incremental: Vec<(String, Arc<PathBuf>)>,
    workers: usize,
) -> Result<Vec<PlannedFile>, RestoreError> {
    let mut planned = Vec::new();
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
pub(crate) async fn plan_combined(
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
            .or_insert_with(|| BlockJob {
                block_id: block_id.clone(),
                stored_len: stored_len(file, backup.block_size, p.block),
                writes: Vec::new(),
                compare_first: false,
            })
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
            .get_opened(&pg::block(backup.system_id, id))
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

/// Sets each file's mode and fsyncs it, through one handle opened without following a link.
/// Sets each file's mode and fsyncs it ([`sync_files`]), then fsyncs every directory under each
/// of `dirs` ([`sync_dirs`]). The files go on up to 16 threads: each fsync waits for its file's
/// writeback, and the device takes several at once far faster than one after the other.
pub(crate) async fn sync_all(
    files: Vec<(PathBuf, u32)>,
    dirs: impl IntoIterator<Item = PathBuf> + Send + 'static,
    workers: usize,
) -> Result<(), RestoreError> {
    let sync_workers = workers.clamp(1, 16);
    tokio::task::spawn_blocking(move || -> Result<(), RestoreError> {
        let per_worker = files.len().div_ceil(sync_workers).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = files.chunks(per_worker).map(|part| scope.spawn(move || sync_files(part))).collect();
            handles.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| Err(RestoreError::Other("an fsync thread panicked".into())))
            })
        })?;
        dirs.into_iter().try_for_each(|d| sync_dirs(&d))
    })
    .await
    .map_err(|e| RestoreError::Other(format!("sync task: {e}")))?
}

pub(crate) fn sync_files(files: &[(PathBuf, u32)]) -> Result<(), RestoreError> {
    for (path, mode) in files {
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io(path))?;
        f.set_permissions(std::fs::Permissions::from_mode(restored_mode(*mode))).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
    }
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
    use pitr_archive::backup::{block_hasher, BackupEntry};
    use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn tablespace_paths_move_inside_the_target() {
        assert_eq!(local_path("base/1/1259"), "base/1/1259");
        assert_eq!(
            local_path("pg_tblspc/16384/PG_15_202209061/5/16385"),
            "pitr_tablespaces/16384/PG_15_202209061/5/16385"
        );
        assert_eq!(local_path("pg_tblspc/16384"), "pg_tblspc/16384");
    }

    #[test]
    fn confined_paths_are_plain_relative_names_off_the_links() {
        let none = BTreeSet::new();
        assert_eq!(confined_path("base/1/1259", &none), Ok(PathBuf::from("base/1/1259")));
        assert_eq!(confined_path("PG_VERSION", &none), Ok(PathBuf::from("PG_VERSION")));
        // A name that merely contains dots is a plain name.
        assert_eq!(confined_path("a..b/.hidden", &none), Ok(PathBuf::from("a..b/.hidden")));
        // PostgreSQL sends `./pg_wal/archive_status`: `.` and empty components name the same place.
        assert_eq!(confined_path("./pg_wal/archive_status", &none), Ok(PathBuf::from("pg_wal/archive_status")));
        assert_eq!(confined_path("base//1/./", &none), Ok(PathBuf::from("base/1")));
        assert_eq!(local_path("./pg_tblspc/16384/PG_15/1"), "pitr_tablespaces/16384/PG_15/1");
        for empty in ["", ".", "./", ".//."] {
            assert_eq!(confined_path(empty, &none), Err(Unconfined::Empty), "{empty:?}");
        }
        assert_eq!(confined_path("/etc/passwd", &none), Err(Unconfined::Absolute));
        assert_eq!(confined_path("//etc", &none), Err(Unconfined::Absolute));
        for (bad, component) in
            [("../x", ".."), ("base/../../x", ".."), ("base/..", ".."), ("./../x", ".."), ("ba\0se", "ba\0se")]
        {
            assert_eq!(confined_path(bad, &none), Err(Unconfined::Component(component.into())), "{bad:?}");
        }
        let links: BTreeSet<PathBuf> = [PathBuf::from("pg_tblspc/16384")].into();
        assert_eq!(confined_path("pg_tblspc/16384", &links), Err(Unconfined::ThroughLink("pg_tblspc/16384".into())));
        assert_eq!(
            confined_path("pg_tblspc/16384/PG_15/1/2", &links),
            Err(Unconfined::ThroughLink("pg_tblspc/16384".into()))
        );
        assert_eq!(confined_path("./pg_tblspc//16384", &links), Err(Unconfined::ThroughLink("pg_tblspc/16384".into())));
        assert_eq!(confined_path("pg_tblspc/163840", &links), Ok(PathBuf::from("pg_tblspc/163840")));
        assert_eq!(confined_path("pg_tblspc", &links), Ok(PathBuf::from("pg_tblspc")));
        assert_eq!(tablespace_link_oid("pg_tblspc/16384"), Some("16384"));
        for bad in ["pg_tblspc/", "pg_tblspc/abc", "pg_tblspc/1/2", "pg_tblspc/12345678901", "base/16384"] {
            assert_eq!(tablespace_link_oid(bad), None, "{bad}");
        }
        assert_eq!(restored_mode(0o106755), 0o755);
        assert_eq!(restored_mode(0o43777), 0o777);
    }

    #[test]
    fn an_unreaped_child_is_not_running() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Exited but not waited for: a zombie, until wait() below.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !is_zombie(pid) {
            assert!(std::time::Instant::now() < deadline, "pid {pid} never became a zombie");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("postmaster.pid"), format!("{pid}\n")).unwrap();
        assert_eq!(live_postmaster(tmp.path()).unwrap(), None);
        child.wait().unwrap();
        assert!(!is_zombie(std::process::id() as i32));
    }

    /// A pid that ran and is gone: a child that has exited and been reaped.
    fn dead_pid() -> i32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        pid
    }

    /// An existing directory (a mount point, say) is staged into and kept: the staged entries
    /// move into it, the directory itself is never removed or replaced; with --force its old
    /// entries go, without it a non-empty one is refused. A link in its place is not staged into.
    #[test]
    fn an_existing_directory_is_staged_into_and_kept() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ts");
        std::fs::create_dir(&dir).unwrap();
        let inode = std::fs::metadata(&dir).unwrap().ino();
        let staging = Staging::create_in_place(&dir).unwrap();
        assert_eq!(staging.path.parent(), Some(dir.as_path()), "staged inside the directory");
        std::fs::create_dir(staging.path.join("PG_15_202209061")).unwrap();
        std::fs::write(staging.path.join("PG_15_202209061/1"), b"x").unwrap();
        staging.check(&dir, false).unwrap();
        staging.commit(&dir, false).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().ino(), inode, "the directory itself was replaced");
        assert_eq!(std::fs::read(dir.join("PG_15_202209061/1")).unwrap(), b"x");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["PG_15_202209061"], "no staging left");

        // Not empty: refused without --force (and the staged files go), replaced with it.
        let staging = Staging::create_in_place(&dir).unwrap();
        std::fs::create_dir(staging.path.join("PG_15_new")).unwrap();
        assert!(matches!(staging.check(&dir, false), Err(RestoreError::TargetNotEmpty(_))));
        staging.commit(&dir, true).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["PG_15_new"]);
        assert_eq!(std::fs::metadata(&dir).unwrap().ino(), inode);

        // A missing directory is staged beside it; a link in its place is refused.
        let missing = tmp.path().join("new");
        let staging = Staging::create_in_place(&missing).unwrap();
        assert_eq!(staging.path.parent(), Some(tmp.path()));
        drop(staging);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(Staging::create_in_place(&link).is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "nothing written through the link");
    }

    #[test]
    fn the_shared_memory_id_is_read_from_the_seventh_line_of_postmaster_pid() {
        let written = "4242\n/srv/data\n1700000000\n5432\n/tmp\n*\n  5432001     32769\nready   \n";
        assert_eq!(shm_of(written), Some((5432001, 32769)));
        // A server still starting has not written the line yet; a garbled one names nothing.
        for unclear in [
            "4242\n/srv/data\n1700000000\n5432\n",
            "1\n2\n3\n4\n5\n6\n  5432001\n",
            "1\n2\n3\n4\n5\n6\n7 x\n",
            "1\n2\n3\n4\n5\n6\nx 7\n",
        ] {
            assert_eq!(shm_of(unclear), None, "{unclear:?}");
        }
        assert_eq!(shm_of("1\n2\n3\n4\n5\n6\n0 -1\n"), None);
    }

    /// A server whose pid this process cannot see (another PID namespace) is running while a
    /// process is attached to the shared memory segment its postmaster.pid names.
    #[test]
    fn a_server_whose_pid_is_invisible_is_found_by_its_attached_shared_memory() {
        struct Segment(i32);
        impl Drop for Segment {
            fn drop(&mut self) {
                // SAFETY: removes the segment this test created.
                unsafe { libc::shmctl(self.0, libc::IPC_RMID, std::ptr::null_mut()) };
            }
        }
        // A key of our own (as a server's is), unlikely to be taken: tried until one is free.
        let (key, id) = (0..64)
            .map(|i| 0x5174_0000 + (std::process::id() as i32 & 0xffff) * 64 + i)
            .find_map(|key| {
                // SAFETY: creates a fresh segment (IPC_EXCL), removed by the guard.
                let id = unsafe { libc::shmget(key, 4096, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
                (id >= 0).then_some((key, id))
            })
            .expect("shmget: no free key");
        let segment = Segment(id);
        // SAFETY: attaches the segment just created; detached below.
        let at = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        assert_ne!(at as isize, -1, "shmat: {}", std::io::Error::last_os_error());

        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let invisible = dead_pid();
        let pid_file =
            |key: i64| format!("{invisible}\n{}\n1700000000\n5432\n/tmp\n*\n{key:>9} {id:>10}\nready\n", dir.display());
        std::fs::write(dir.join("postmaster.pid"), pid_file(key.into())).unwrap();
        assert_eq!(live_postmaster(dir).unwrap(), Some(invisible));
        let err = check_target(dir, true).unwrap_err();
        assert!(matches!(err, RestoreError::TargetInUse { .. }), "{err}");
        assert!(err.to_string().contains("remove its postmaster.pid"), "says how to go on if it is stale: {err}");
        // After a reboot the id can name another cluster's segment: a key that differs is not
        // this server's, however many processes are attached.
        std::fs::write(dir.join("postmaster.pid"), pid_file(i64::from(key) + 1)).unwrap();
        assert_eq!(live_postmaster(dir).unwrap(), None, "another key: the pid file is stale");
        std::fs::write(dir.join("postmaster.pid"), pid_file(key.into())).unwrap();

        // SAFETY: detaches what shmat attached above.
        assert_eq!(unsafe { libc::shmdt(at) }, 0);
        assert_eq!(live_postmaster(dir).unwrap(), None, "no process is attached: the pid file is stale");
        drop(segment);
        // The segment is gone: stale as well.
        assert_eq!(live_postmaster(dir).unwrap(), None);
    }

    #[test]
    fn force_refuses_a_directory_with_a_running_postmaster_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("PG_VERSION"), "15\n").unwrap();
        assert_eq!(live_postmaster(&dir).unwrap(), None);
        assert!(matches!(check_target(&dir, false), Err(RestoreError::TargetNotEmpty(_))));
        check_target(&dir, true).unwrap();

        // This very process stands in for a running server: its pid, as a postmaster writes
        // it (pid, data directory, start time, port… one per line).
        let me = std::process::id() as i32;
        let pid_file = dir.join("postmaster.pid");
        std::fs::write(&pid_file, format!("{me}\n{}\n1700000000\n5432\n", dir.display())).unwrap();
        assert_eq!(live_postmaster(&dir).unwrap(), Some(me));
        for force in [true, false] {
            let err = check_target(&dir, force).unwrap_err();
            assert!(matches!(err, RestoreError::TargetInUse { pid, .. } if pid == me), "{err}");
            let text = err.to_string();
            assert!(text.contains(&me.to_string()) && text.contains(&dir.display().to_string()), "{text}");
        }
        // A standalone backend writes its pid negated.
        std::fs::write(&pid_file, format!("-{me}\n")).unwrap();
        assert_eq!(live_postmaster(&dir).unwrap(), Some(me));

        // A crashed server's pid file names a pid that no longer runs: stale, replaced.
        let gone = dead_pid();
        std::fs::write(&pid_file, format!("{gone}\n{}\n", dir.display())).unwrap();
        assert_eq!(live_postmaster(&dir).unwrap(), None);
        check_target(&dir, true).unwrap();

        // Neither a pid nor a stale one: nothing is assumed (and kill(0) would be a group).
        for garbage in ["", "\n", "0\n", "postgres\n", "99999999999\n"] {
            std::fs::write(&pid_file, garbage).unwrap();
            let err = check_target(&dir, true).unwrap_err();
            assert!(matches!(err, RestoreError::PidFileUnclear { .. }), "{garbage:?}: {err}");
        }
    }

    /// path → (kind, mode, content or link target).
    type Tree = BTreeMap<PathBuf, (char, u32, Vec<u8>)>;

    /// Everything under `dir`, links not followed.
    fn snapshot(dir: &Path) -> Tree {
        fn walk(root: &Path, dir: &Path, out: &mut Tree) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for e in entries {
                let path = e.unwrap().path();
                let m = std::fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                if m.is_symlink() {
                    let target = std::fs::read_link(&path).unwrap();
                    out.insert(rel, ('l', m.mode(), target.into_os_string().into_encoded_bytes()));
                } else if m.is_dir() {
                    out.insert(rel, ('d', m.mode(), Vec::new()));
                    walk(root, &path, out);
                } else {
                    out.insert(rel, ('f', m.mode(), std::fs::read(&path).unwrap()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    /// A real local repository holding the blocks of two small files, an outside directory with
    /// sentinels that no restore may touch, and an empty directory to restore into.
    struct Fixture {
        tmp: tempfile::TempDir,
        repo: Repository,
        /// Block ids of the two files' contents.
        blocks: [Vec<String>; 2],
    }

    const CONTENT: [&[u8]; 2] = [b"relation bytes", b"tablespace relation bytes"];

    impl Fixture {
        async fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let store = LocalStore::new(tmp.path().join("repo"));
            store.create_root().unwrap();
            let repo = Repository::new(Arc::new(store), KeyRing::from_key("k", [5; 32]));
            let hasher = block_hasher(&repo).await.unwrap();
            let mut blocks: [Vec<String>; 2] = Default::default();
            for (i, content) in CONTENT.iter().enumerate() {
                let id = hasher.block_id(content);
                repo.put_sealed(&pg::block(1, &id), content.to_vec(), ObjectMeta::plain(ObjectKind::BackupBlock))
                    .await
                    .unwrap();
                blocks[i] = vec![id];
            }
            let outside = tmp.path().join("outside");
            std::fs::create_dir_all(outside.join("sub")).unwrap();
            std::fs::write(outside.join("keep"), b"sentinel").unwrap();
            std::fs::write(outside.join("sub/keep"), b"sentinel too").unwrap();
            std::fs::create_dir(tmp.path().join("restores")).unwrap();
            Fixture { tmp, repo, blocks }
        }

        fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }

        fn target(&self) -> PathBuf {
            self.tmp.path().join("restores/data")
        }

        fn file(&self, path: &str, which: usize, mode: u32) -> BackupFile {
            BackupFile {
                path: path.into(),
                size: CONTENT[which].len() as u64,
                mode,
                mtime: 0,
                checksum: None,
                blocks: self.blocks[which].clone(),
            }
        }

        /// A crafted manifest, sealed into the repository as `pitr backup` stores one.
        async fn backup(&self, id: &str, entries: Vec<BackupEntry>, files: Vec<BackupFile>) -> BackupManifest {
            let m = BackupManifest {
                id: id.into(),
                kind: pitr_archive::backup::BackupKind::Full,
                parent: None,
                system_id: 1,
                server_version_num: 150000,
                timeline: 1,
                start_lsn: 0x100_0000,
                stop_lsn: 0x200_0000,
                start_time_us: 0,
                stop_time_us: 1,
                block_size: 8192,
                page_size: 8192,
                tablespaces: Vec::new(),
                entries,
                files,
                server_manifest: "{}".into(),
                logical_bytes: 0,
                stored_bytes: 0,
                taken_from: None,
            };
            m.store(&self.repo).await.unwrap();
            m
        }

        /// Restores `backup` into the target as `pitr restore` does: staging beside the target,
        /// materialised, renamed into place.
        async fn restore(&self, backup: &BackupManifest) -> Result<(), RestoreError> {
            let target = self.target();
            check_target(&target, false)?;
            let staging = Staging::create(&target)?;
            materialize(&self.repo, &[backup], &staging.path, &target, &MappedTablespaces::default(), 2, &|_, _| {})
                .await?;
            staging.commit(&target, false)
        }

        /// [`Fixture::restore`] with tablespace `oid` mapped to `mapped` (staged as
        /// `pitr restore --tablespace-map` does: beside it, or inside it when it exists).
        async fn restore_mapped(&self, backup: &BackupManifest, oid: u32, mapped: &Path) -> Result<(), RestoreError> {
            let target = self.target();
            let ts_staging = Staging::create_in_place(mapped)?;
            let map = MappedTablespaces(
                [(oid, MappedTablespace { write_dir: ts_staging.path.clone(), final_dir: mapped.to_path_buf() })]
                    .into(),
            );
            let staging = Staging::create(&target)?;
            materialize(&self.repo, &[backup], &staging.path, &target, &map, 2, &|_, _| {}).await?;
            ts_staging.commit(mapped, false)?;
            staging.commit(&target, false)
        }

        /// The state a restore must not change: outside, the repository, and the directory the
        /// target is in (no target, no staging directory left behind after a refusal).
        fn state(&self) -> [Tree; 3] {
            [
                snapshot(&self.outside()),
                snapshot(&self.tmp.path().join("repo")),
                snapshot(&self.tmp.path().join("restores")),
            ]
        }
    }

    fn dir(path: &str, mode: u32) -> BackupEntry {
        BackupEntry { path: path.into(), mode, kind: BackupEntryKind::Directory }
    }

    fn link(path: &str, target: &Path) -> BackupEntry {
        BackupEntry {
            path: path.into(),
            mode: 0o777,
            kind: BackupEntryKind::Symlink { target: target.display().to_string() },
        }
    }

    #[tokio::test]
    async fn crafted_manifests_are_refused_before_anything_is_written() {
        let fx = Fixture::new().await;
        let outside = fx.outside();
        let escape = format!("../../{}", outside.strip_prefix(fx.tmp.path()).unwrap().display());
        let absolute = outside.join("planted").display().to_string();
        // (backup id, entries, files, the path refused (empty: the last one listed), why)
        type Case<'a> = (&'a str, Vec<BackupEntry>, Vec<BackupFile>, &'a str, Unconfined);
        let cases: Vec<Case> = vec![
            // A link to a directory outside, then a file written "through" it.
            (
                "20260101T000001Z",
                vec![dir("base", 0o700), link("pg_log", &outside), dir("pg_log/sub", 0o700)],
                vec![fx.file("base/1", 0, 0o600), fx.file("pg_log/planted", 0, 0o600)],
                "pg_log",
                Unconfined::UnexpectedLink(outside.display().to_string()),
            ),
            // The same through a tablespace link's name: the link is recreated pointing
            // inside, but a file at the link itself would be written through it.
            (
                "20260101T000002Z",
                vec![dir("pg_tblspc", 0o700), link("pg_tblspc/16384", &outside)],
                vec![fx.file("pg_tblspc/16384", 0, 0o600)],
                "pg_tblspc/16384",
                Unconfined::ThroughLink("pg_tblspc/16384".into()),
            ),
            (
                "20260101T000003Z",
                vec![link("pg_tblspc/16384", &outside), dir("pg_tblspc/16384", 0o700)],
                vec![],
                "pg_tblspc/16384",
                Unconfined::ThroughLink("pg_tblspc/16384".into()),
            ),
            // `..` up and out of the target, in a file, a directory and a link's name.
            (
                "20260101T000004Z",
                vec![dir("base", 0o700)],
                vec![fx.file(&format!("base/{escape}/planted"), 0, 0o600)],
                "",
                Unconfined::Component("..".into()),
            ),
            ("20260101T000005Z", vec![dir(&escape, 0o700)], vec![], "", Unconfined::Component("..".into())),
            (
                "20260101T000006Z",
                vec![link(&format!("pg_tblspc/{escape}"), &outside)],
                vec![],
                "",
                Unconfined::Component("..".into()),
            ),
            // `..` hidden behind the tablespace prefix (which the restore rewrites).
            (
                "20260101T000007Z",
                vec![],
                vec![fx.file(&format!("pg_tblspc/{escape}/planted"), 1, 0o600)],
                "",
                Unconfined::Component("..".into()),
            ),
            // Absolute paths.
            ("20260101T000008Z", vec![], vec![fx.file(&absolute, 0, 0o600)], "", Unconfined::Absolute),
            ("20260101T000009Z", vec![dir(&absolute, 0o700)], vec![], "", Unconfined::Absolute),
        ];
        // Every crafted manifest is stored first: from then on, the repository must not change.
        let mut backups = Vec::new();
        for (id, entries, files, bad_path, reason) in cases {
            let bad_path = if bad_path.is_empty() {
                entries.iter().map(|e| e.path.clone()).chain(files.iter().map(|f| f.path.clone())).last().unwrap()
            } else {
                bad_path.to_string()
            };
            backups.push((fx.backup(id, entries, files).await, bad_path, reason));
        }
        let before = fx.state();
        for (backup, bad_path, reason) in backups {
            let id = backup.id.as_str();
            let err = fx.restore(&backup).await.unwrap_err();
            match &err {
                RestoreError::UnsafePath { backup, path, reason: r } => {
                    assert_eq!((backup.as_str(), path.as_str(), r), (id, bad_path.as_str(), &reason), "{err}")
                }
                other => panic!("{id}: expected a refusal, got {other}"),
            }
            let text = err.to_string();
            assert!(text.contains(id) && text.contains(&bad_path), "{text}");
            assert!(fx.state() == before, "{id} changed something outside, in the repository or beside the target");
        }

        // Block lists that do not cover their files: a short list would leave zeros in place of
        // the file's end, a long one write past it.
        for (id, size) in [("20260101T000010Z", CONTENT[0].len() as u64 + 8192), ("20260101T000011Z", 0)] {
            let mut file = fx.file("base/1", 0, 0o600);
            file.size = size;
            let backup = fx.backup(id, vec![dir("base", 0o700)], vec![file]).await;
            let before = fx.state();
            let err = fx.restore(&backup).await.unwrap_err();
            assert!(err.to_string().contains("its manifest lists 1") && err.to_string().contains(id), "{err}");
            assert!(fx.state() == before, "{id} changed something outside, in the repository or beside the target");
        }
    }

    #[tokio::test]
    async fn a_mapped_tablespace_goes_to_its_directory_and_no_manifest_leaves_it() {
        let fx = Fixture::new().await;
        let outside = fx.outside();
        let mapped = fx.tmp.path().join("restores/ts");
        let entries = || {
            vec![
                dir("base", 0o700),
                dir("pg_tblspc", 0o700),
                link("pg_tblspc/16384", &outside),
                dir("pg_tblspc/16384/PG_15_202209061", 0o700),
                dir("pg_tblspc/16384/PG_15_202209061/5", 0o700),
            ]
        };
        let backup = fx
            .backup(
                "20260101T000020Z",
                entries(),
                vec![fx.file("base/1259", 0, 0o600), fx.file("pg_tblspc/16384/PG_15_202209061/5/16385", 1, 0o600)],
            )
            .await;
        let escape = format!("pg_tblspc/16384/../../{}", outside.strip_prefix(fx.tmp.path()).unwrap().display());
        let planted =
            fx.backup("20260101T000021Z", entries(), vec![fx.file(&format!("{escape}/planted"), 1, 0o600)]).await;
        let respelled = fx
            .backup("20260101T000022Z", entries(), vec![fx.file("pg_tblspc/016384/PG_15_202209061/x", 1, 0o600)])
            .await;
        let before = fx.state();

        // An OID the backup has no tablespace of: refused before anything is written.
        let err = fx.restore_mapped(&backup, 16385, &mapped).await.unwrap_err();
        assert!(matches!(&err, RestoreError::UnknownTablespace { oid: 16385, known, .. } if known == "16384"), "{err}");
        // (restore_mapped stages the mapped directory before materialize refuses; the staging
        // directory is gone again, and pitr restore checks the OID before staging anything.)
        assert!(fx.state() == before, "a refused map left something behind");

        // `..` behind the tablespace prefix, and another spelling of the OID: refused, or kept
        // inside the target; never written into the mapped directory or outside.
        let err = fx.restore_mapped(&planted, 16384, &mapped).await.unwrap_err();
        assert!(matches!(err, RestoreError::UnsafePath { reason: Unconfined::Component(_), .. }), "{err}");
        assert!(fx.state() == before, "a planted manifest escaped through the map");
        fx.restore_mapped(&respelled, 16384, &mapped).await.unwrap();
        assert_eq!(std::fs::read(fx.target().join("pitr_tablespaces/016384/PG_15_202209061/x")).unwrap(), CONTENT[1]);
        assert!(!mapped.join("x").exists() && !mapped.join("PG_15_202209061/x").exists());
        std::fs::remove_dir_all(fx.target()).unwrap();
        std::fs::remove_dir_all(&mapped).unwrap();

        fx.restore_mapped(&backup, 16384, &mapped).await.unwrap();
        let target = fx.target();
        assert_eq!(std::fs::read_link(target.join("pg_tblspc/16384")).unwrap(), mapped);
        assert_eq!(std::fs::read(mapped.join("PG_15_202209061/5/16385")).unwrap(), CONTENT[1]);
        assert_eq!(std::fs::read(target.join("pg_tblspc/16384/PG_15_202209061/5/16385")).unwrap(), CONTENT[1]);
        assert!(!target.join(TABLESPACE_DIR).exists(), "a mapped tablespace was also written inside the target");
        assert_eq!(std::fs::metadata(&mapped).unwrap().mode() & 0o777, 0o700);
        assert_eq!(snapshot(&outside), before[0], "the restore changed the tablespace's original location");
    }

    #[tokio::test]
    async fn tablespace_links_and_modes_are_confined() {
        let fx = Fixture::new().await;
        let outside = fx.outside();
        let backup = fx
            .backup(
                "20260101T000010Z",
                vec![
                    // setgid + sticky on a directory, setuid + setgid on a file.
                    dir("base", 0o3777),
                    dir("pg_tblspc", 0o700),
                    // As PostgreSQL names it.
                    dir("./pg_wal/archive_status", 0o700),
                    // The server's tablespace location is outside: the link must not go there.
                    link("pg_tblspc/16384", &outside),
                    dir("pg_tblspc/16384/PG_15_202209061", 0o700),
                    dir("pg_tblspc/16384/PG_15_202209061/5", 0o700),
                ],
                vec![
                    fx.file("base/1259", 0, 0o6755),
                    fx.file("pg_tblspc/16384/PG_15_202209061/5/16385", 1, 0o4600),
                    // The link's own name for the location: a manifest may list a file inside
                    // the tablespace under the server's absolute location no other way.
                    fx.file("pg_tblspc/16384/PG_15_202209061/keep", 0, 0o600),
                ],
            )
            .await;
        let outside_before = snapshot(&outside);
        fx.restore(&backup).await.unwrap();
        assert_eq!(snapshot(&outside), outside_before, "the restore changed the tablespace's original location");
        let target = fx.target();
        let link_path = target.join("pg_tblspc/16384");
        assert!(std::fs::symlink_metadata(&link_path).unwrap().is_symlink());
        assert_eq!(std::fs::read_link(&link_path).unwrap(), target.join("pitr_tablespaces/16384"));
        let ts_file = target.join("pitr_tablespaces/16384/PG_15_202209061/5/16385");
        assert_eq!(std::fs::read(&ts_file).unwrap(), CONTENT[1]);
        assert_eq!(std::fs::read(link_path.join("PG_15_202209061/5/16385")).unwrap(), CONTENT[1]);
        assert_eq!(std::fs::read(target.join("base/1259")).unwrap(), CONTENT[0]);
        assert!(std::fs::symlink_metadata(target.join("pg_wal/archive_status")).unwrap().is_dir());
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&target.join("base/1259")), 0o755);
        assert_eq!(mode(&ts_file), 0o600);
        assert_eq!(mode(&target.join("base")), 0o777);
        // Every non-link under the target is a real file or directory inside it.
        for (path, (kind, mode, _)) in snapshot(&target) {
            assert!(mode & 0o7000 == 0, "{} has mode {mode:o}", path.display());
            if kind == 'l' {
                assert_eq!(path, Path::new("pg_tblspc/16384"));
            }
        }
    }

    #[test]
    fn writes_never_follow_a_link_in_their_way() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("file"), b"sentinel").unwrap();
        // Links swapped in by someone racing the restore.
        std::os::unix::fs::symlink(&outside, root.join("dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("file"), root.join("file")).unwrap();
        let before = snapshot(&outside);
        assert!(create_dir_confined(&root, Path::new("dir/sub")).is_err());
        assert!(chmod_dir(&root.join("dir"), 0o777).is_err());
        assert!(write_file_nofollow(&root.join("file"), b"planted").is_err());
        assert!(open_nofollow(&root.join("file")).is_err());
        assert!(read_file_nofollow(&root.join("file")).is_err());
        assert_eq!(snapshot(&outside), before);
        assert_eq!(create_dir_confined(&root, Path::new("a/b")).unwrap(), root.join("a/b"));
        assert!(root.join("a/b").is_dir());
    }
}
