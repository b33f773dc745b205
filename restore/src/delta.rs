//! `pitr restore --delta`: a restore into an existing data directory of the same cluster that
//! fetches and writes only what differs from the backup (the way a failed primary comes back
//! as a replica in minutes rather than hours).
//!
//! What differs is judged from the directory's content, never its mtimes: each file is read in
//! the backup's blocks and every block hashed with the repository's keyed block hash, which is
//! how the backup named it ([`pitr_archive::backup::BlockHasher`]); a block whose hash matches is
//! left as it is, any other is fetched and written in place, and the file cut to its size. A file
//! the backup combines from an incremental chain is compared piece by piece: a piece that is a
//! whole stored block (most of what the chain's full backup supplies) by its hash, others by
//! their bytes once fetched, written only where they differ. A file with other hard links
//! (`pg_upgrade --link`) is copied and the copy put in its place before anything is written to
//! it. What the backup does not have is removed — including WAL in pg_wal, replication slots,
//! server logs in the data directory and the other directories PostgreSQL leaves out of a base
//! backup — except `postmaster.pid` and `postmaster.opts`, which the server itself rewrites; in
//! a mapped tablespace directory only the backup's own `PG_<version>_<catalog version>`
//! directory is compared, what lies beside it stays. The result is the directory a plain
//! restore would write: the same files, tablespace links, recovery settings, signal file and
//! backup_label.
//!
//! Refused before anything in the directory changes (judged again under the restore's lock and
//! right before the first change): a directory that is not a PostgreSQL data directory, one of
//! another cluster (the system identifier in its `global/pg_control`), of another major version
//! (its `PG_VERSION`), one a running server uses (its pid, or processes still attached to its
//! shared memory), one whose pg_wal is a symbolic link (a WAL directory elsewhere: a restore
//! writes nowhere outside its target) or whose `global` or marker is not what PostgreSQL or
//! pitr put there.
//!
//! Crash safety: before the first change the restore writes [`IN_PROGRESS`] (naming the
//! cluster) and removes `global/pg_control`, and it writes pg_control back last (staged and
//! renamed), after every file, the recovery settings and the signal file are durable. A
//! directory left by a kill at any step has no pg_control, so PostgreSQL refuses to start
//! there; the same command run again recognises its own interrupted work by the marker, and
//! completes it (every block is compared again, so a torn write is found and rewritten).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pitr_archive::backup::{existing_block_hasher, BackupFile, BackupManifest, BlockHasher};
use pitr_archive::Repository;

use crate::materialize::{
    check_block_counts, check_layout, check_mapped_oids, chmod_dir, create_dir_confined, io, live_postmaster,
    output_files, plan_combined_all, read_file_nofollow, run_jobs, stored_len, sync_all, sync_files,
    write_file_nofollow, BlockJob, MappedTablespace, MappedTablespaces, Placement, PlannedFile, Tally, PG_CONTROL,
    TABLESPACE_DIR,
};
use crate::RestoreError;

/// The marker a delta restore writes into the data directory before it changes anything, and
/// removes once pg_control is back: its first line names the cluster (`system_identifier = N`).
pub const IN_PROGRESS: &str = "pitr-delta-in-progress";

/// Top-level entries of the data directory a delta restore leaves alone although no backup has
/// them: the server's own files (it rewrites them when it starts) and the marker.
const KEPT: &[&str] = &["postmaster.pid", "postmaster.opts", IN_PROGRESS];

/// Where pg_control is written before it is renamed into place.
const PG_CONTROL_STAGED: &str = "global/pg_control.pitr-delta";

/// What a delta restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeltaReport {
    /// Files of the backup found as the backup has them: read and compared, not written.
    pub files_unchanged: u64,
    /// Bytes found as the backup has them (in unchanged files and in the unchanged parts of
    /// changed ones): not written, and, where judged by hash, not fetched either.
    pub bytes_unchanged: u64,
    /// Files written in whole or in part (created, changed blocks, cut to size, or parted from
    /// their hard links).
    pub files_written: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes fetched from the repository: those written, and those compared with what the
    /// directory held before writing (pieces of incremental backups, which have no hash of
    /// their own, and every block where the repository has no dedup key).
    pub bytes_fetched: u64,
    /// Each file written (its path in the backup) and the bytes written to it.
    pub written: BTreeMap<String, u64>,
    /// Files, directories and links the backup does not have, removed (every entry counted
    /// once, a directory with what it held).
    pub removed: u64,
    /// Whether the directory held an interrupted delta restore, which this one completed.
    pub resumed: bool,
    /// The repository has no dedup key (its blocks were named by one this repository lacks, a
    /// copy of another, say): no block could be judged by hash, so every block was fetched and
    /// written only where it differed.
    pub without_block_hashes: bool,
}

fn refused(dir: &Path, why: impl Into<String>) -> RestoreError {
    RestoreError::DeltaRefused { dir: dir.to_path_buf(), why: why.into() }
}

/// Whether a delta restore into `dir` compares against what is there: it exists and holds
/// something. A missing or empty directory has nothing to compare: it gets a plain restore.
pub fn applies(dir: &Path) -> Result<bool, RestoreError> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(RestoreError::Io { path: dir.to_path_buf(), cause: e }),
        Ok(mut entries) => Ok(entries.next().is_some()),
    }
}

/// The first `n` bytes of `path` (fewer if it is shorter), refusing a link in its place;
/// `None` if it does not exist.
fn read_prefix(path: &Path, n: usize) -> Result<Option<Vec<u8>>, RestoreError> {
    use std::io::Read;
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RestoreError::Io { path: path.to_path_buf(), cause: e }),
    };
    let mut out = Vec::with_capacity(n);
    f.take(n as u64).read_to_end(&mut out).map_err(io(path))?;
    Ok(Some(out))
}

/// The major version as `PG_VERSION` spells it for `server_version_num` (`15`, or `9.6`).
fn major_of(server_version_num: u32) -> String {
    if server_version_num >= 100000 {
        (server_version_num / 10000).to_string()
    } else {
        format!("{}.{}", server_version_num / 10000, server_version_num / 100 % 100)
    }
}

/// The system identifier `dir` belongs to: from `global/pg_control` (its first field, in the
/// server's byte order), or, when an interrupted delta restore removed that, from its marker.
fn system_identifier(dir: &Path) -> Result<u64, RestoreError> {
    if let Some(bytes) = read_prefix(&dir.join(PG_CONTROL), 8)? {
        let first: [u8; 8] =
            bytes.try_into().map_err(|_| refused(dir, "its global/pg_control is shorter than a control file"))?;
        return Ok(u64::from_ne_bytes(first));
    }
    let marker = read_file_nofollow(&dir.join(IN_PROGRESS))?.ok_or_else(|| {
        refused(dir, "it has no global/pg_control (and no interrupted delta restore): not a PostgreSQL data directory")
    })?;
    marker
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("system_identifier = "))
        .and_then(|id| id.trim().parse().ok())
        .ok_or_else(|| {
            refused(
                dir,
                format!(
                    "its {IN_PROGRESS} does not name a cluster (first line {:?})",
                    marker.lines().next().unwrap_or("")
                ),
            )
        })
}

/// What a file system entry is, in words.
fn kind_of(m: &std::fs::Metadata) -> &'static str {
    if m.is_symlink() {
        "symbolic link"
    } else if m.is_dir() {
        "directory"
    } else if m.is_file() {
        "file"
    } else {
        "special file"
    }
}

/// Checks that a delta restore may change `dir`: not used by a running server, a PostgreSQL
/// data directory (PG_VERSION and pg_control, or the marker of an interrupted delta restore),
/// its global a directory and its marker, if any, a file (neither a link), its pg_wal not a
/// link, and, where given, of cluster `system_id` and the major version of
/// `server_version_num`. Reads only.
pub fn check(dir: &Path, system_id: Option<u64>, server_version_num: Option<u32>) -> Result<(), RestoreError> {
    // The directory as the operator named it: a link there (a data directory on another disk)
    // is followed; nothing below it is.
    if !std::fs::metadata(dir).map_err(io(dir))?.is_dir() {
        return Err(refused(dir, "it is not a directory"));
    }
    if let Some(pid) = live_postmaster(dir)? {
        return Err(RestoreError::TargetInUse { dir: dir.to_path_buf(), pid });
    }
    // The marker is written and pg_control removed before anything is cleaned: neither may act
    // through a link planted there.
    let global = dir.join("global");
    match std::fs::symlink_metadata(&global) {
        Ok(m) if !m.is_dir() => {
            return Err(refused(dir, format!("its global is not a directory (a {}): PostgreSQL's is", kind_of(&m))))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RestoreError::Io { path: global, cause: e }),
    }
    let marker = dir.join(IN_PROGRESS);
    match std::fs::symlink_metadata(&marker) {
        Ok(m) if !m.is_file() => {
            return Err(refused(
                dir,
                format!(
                    "its {IN_PROGRESS} is a {}, not the file a delta restore writes: remove it if no pitr restore \
                     put it there",
                    kind_of(&m)
                ),
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RestoreError::Io { path: marker, cause: e }),
    }
    let version = read_file_nofollow(&dir.join("PG_VERSION"))?
        .ok_or_else(|| refused(dir, "it has no PG_VERSION: not a PostgreSQL data directory"))?;
    let version = version.trim();
    let found = system_identifier(dir)?;
    if let Some(expected) = system_id.filter(|&s| s != found) {
        return Err(refused(
            dir,
            format!(
                "it belongs to another cluster: its system identifier is {found}, the backup's {expected} (restore \
                 into an empty directory instead)"
            ),
        ));
    }
    if let Some(expected) = server_version_num.map(major_of).filter(|v| v != version) {
        return Err(refused(
            dir,
            format!("it holds PostgreSQL {version} (PG_VERSION), the backup PostgreSQL {expected}"),
        ));
    }
    let wal = dir.join("pg_wal");
    if std::fs::symlink_metadata(&wal).is_ok_and(|m| m.file_type().is_symlink()) {
        let to = std::fs::read_link(&wal).map(|t| t.display().to_string()).unwrap_or_default();
        return Err(refused(
            dir,
            format!(
                "its pg_wal is a symbolic link (to {to}): a delta restore writes nothing outside its target; restore \
                 into an empty directory, or make pg_wal a directory"
            ),
        ));
    }
    Ok(())
}

/// What the restored directory holds at a path below one of its roots (the target, or a
/// mapped tablespace directory).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Dir,
    File,
    /// A tablespace link, and where it must point.
    Link(PathBuf),
}

/// Expected paths per root directory.
type Layout = BTreeMap<PathBuf, BTreeMap<PathBuf, Expect>>;

fn expect(layout: &mut Layout, root: &Path, rel: &Path, what: Expect) {
    let paths = layout.entry(root.to_path_buf()).or_default();
    for parent in rel.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
        paths.insert(parent.to_path_buf(), Expect::Dir);
    }
    paths.insert(rel.to_path_buf(), what);
}

fn remove_any(path: &Path, is_dir: bool) -> Result<(), RestoreError> {
    if is_dir {
        // remove_dir_all removes a link inside rather than what it points to.
        std::fs::remove_dir_all(path).map_err(io(path))
    } else {
        std::fs::remove_file(path).map_err(io(path))
    }
}

/// Removes below `root/rel` everything `expected` does not list as it is (a directory where a
/// file belongs goes too, and a link pointing elsewhere); top-level entries for which `keep`
/// says so are left alone. Links are never followed. Counts what it removed.
fn clean(
    root: &Path,
    rel: &Path,
    expected: &BTreeMap<PathBuf, Expect>,
    keep: &dyn Fn(&OsStr) -> bool,
    removed: &mut u64,
) -> Result<(), RestoreError> {
    let dir = root.join(rel);
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let entry = entry.map_err(io(&dir))?;
        let name = entry.file_name();
        if rel.as_os_str().is_empty() && keep(&name) {
            continue;
        }
        let child = rel.join(&name);
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        match expected.get(&child) {
            Some(Expect::Dir) if kind.is_dir() => clean(root, &child, expected, keep, removed)?,
            Some(Expect::File) if kind.is_file() => {}
            Some(Expect::Link(to)) if kind.is_symlink() && std::fs::read_link(&path).ok().as_ref() == Some(to) => {}
            _ => {
                remove_any(&path, kind.is_dir())?;
                *removed += 1;
            }
        }
    }
    Ok(())
}

/// What comparing one file found, before the blocks that differ are fetched.
struct Compared {
    /// The stored blocks to fetch, and where their bytes go.
    jobs: Vec<BlockJob>,
    /// Bytes found as the backup has them.
    unchanged: u64,
    /// Zeros written where a combined file has blocks no backup supplies.
    zeros_written: u64,
    /// Created, replaced, cut or extended, or parted from its hard links.
    touched: bool,
}

/// Opens the regular file at `path` for comparing and writing in place, never through a link:
/// anything else there is replaced by an empty file. A file with other hard links (a cluster
/// upgraded with `pg_upgrade --link` shares them with the old one) is first copied and the
/// copy renamed over it, so that no write reaches the other names. Says whether it created or
/// replaced the file.
fn open_in_place(path: &Path) -> Result<(std::fs::File, bool), RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let open = || {
        std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io(path))
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && m.nlink() > 1 => {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(".pitr-delta-copy");
            let copy = path.with_file_name(name);
            match std::fs::symlink_metadata(&copy) {
                Ok(m) => remove_any(&copy, m.is_dir())?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(RestoreError::Io { path: copy, cause: e }),
            }
            let to = create_sized(&copy, 0)?;
            let mut from =
                std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io(path))?;
            std::io::copy(&mut from, &mut &to).map_err(io(&copy))?;
            std::fs::rename(&copy, path).map_err(io(path))?;
            Ok((open()?, true))
        }
        Ok(m) if m.is_file() => Ok((open()?, false)),
        Ok(m) => {
            remove_any(path, m.is_dir())?;
            Ok((create_sized(path, 0)?, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((create_sized(path, 0)?, true)),
        Err(e) => Err(RestoreError::Io { path: path.to_path_buf(), cause: e }),
    }
}

/// Whether bytes `at..at + len` of `f` are there and hash to `block_id`.
fn block_matches(
    f: &std::fs::File,
    path: &Path,
    at: u64,
    len: u64,
    block_id: &str,
    hasher: &BlockHasher,
    buf: &mut Vec<u8>,
) -> Result<bool, RestoreError> {
    buf.resize(len as usize, 0);
    match f.read_exact_at(buf, at) {
        Ok(()) => Ok(hasher.block_id(buf) == block_id),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(RestoreError::Io { path: path.to_path_buf(), cause: e }),
    }
}

/// Compares a file the backup holds whole with what `path` holds, block by block, by hash; cuts
/// or extends it to the backup's size. Without `hasher` every block is fetched, and written only
/// where its bytes differ.
fn compare_whole(
    path: &Arc<PathBuf>,
    file: &BackupFile,
    block_size: u64,
    hasher: Option<&BlockHasher>,
) -> Result<Compared, RestoreError> {
    let (f, mut touched) = open_in_place(path)?;
    let len = f.metadata().map_err(io(path))?.len();
    let mut buf = Vec::new();
    let (mut jobs, mut unchanged) = (Vec::new(), 0);
    for (i, id) in file.blocks.iter().enumerate() {
        let at = i as u64 * block_size;
        let want = stored_len(file, block_size, i);
        if let Some(h) = hasher {
            if at + want <= len && block_matches(&f, path, at, want, id, h, &mut buf)? {
                unchanged += want;
                continue;
            }
        }
        jobs.push(BlockJob {
            block_id: id.clone(),
            stored_len: want,
            writes: vec![(path.clone(), None, at)],
            compare_first: hasher.is_none(),
        });
    }
    if len != file.size {
        f.set_len(file.size).map_err(io(path))?;
        touched = true;
    }
    Ok(Compared { jobs, unchanged, zeros_written: 0, touched })
}

/// Compares a file combined from an incremental chain with what `path` holds: a piece that is a
/// whole stored block (most of what comes from the chain's full backup) is judged by hash and
/// left alone when equal; other pieces are fetched and written only where their bytes differ;
/// the blocks no backup supplies are made zero where they are not.
fn compare_combined(
    path: &Arc<PathBuf>,
    planned: PlannedFile,
    hasher: Option<&BlockHasher>,
) -> Result<Compared, RestoreError> {
    let (f, mut touched) = open_in_place(path)?;
    if f.metadata().map_err(io(path))?.len() != planned.size {
        f.set_len(planned.size).map_err(io(path))?;
        touched = true;
    }
    let mut buf = Vec::new();
    let mut covered = Vec::new();
    let (mut jobs, mut unchanged) = (Vec::new(), 0);
    for mut job in planned.jobs {
        covered.extend(job.writes.iter().map(|(_, range, at)| (*at, range.map_or(job.stored_len, |r| r.1))));
        let whole = match job.writes.as_slice() {
            [(_, None, at)] => Some(*at),
            [(_, Some((0, len)), at)] if *len == job.stored_len => Some(*at),
            _ => None,
        };
        match (hasher, whole) {
            (Some(h), Some(at)) => {
                if block_matches(&f, path, at, job.stored_len, &job.block_id, h, &mut buf)? {
                    unchanged += job.stored_len;
                    continue;
                }
            }
            _ => job.compare_first = true,
        }
        jobs.push(job);
    }
    covered.sort_unstable();
    let (mut at, mut zeros_written) = (0, 0);
    for (from, len) in covered.into_iter().chain([(planned.size, 0)]) {
        if from > at {
            let (same, written) = make_zero(&f, path, at, from - at)?;
            unchanged += same;
            zeros_written += written;
        }
        at = at.max(from + len);
    }
    touched |= zeros_written > 0;
    Ok(Compared { jobs, unchanged, zeros_written, touched })
}

/// Makes bytes `at..at + len` of `f` zero where they are not: returns the bytes found zero and
/// the bytes written.
fn make_zero(f: &std::fs::File, path: &Path, mut at: u64, len: u64) -> Result<(u64, u64), RestoreError> {
    let end = at + len;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let (mut same, mut written) = (0, 0);
    while at < end {
        let piece = &mut buf[..(end - at).min(1 << 20) as usize];
        f.read_exact_at(piece, at).map_err(io(path))?;
        let n = piece.len() as u64;
        if piece.iter().all(|&b| b == 0) {
            same += n;
        } else {
            piece.fill(0);
            f.write_all_at(piece, at).map_err(io(path))?;
            written += n;
        }
        at += n;
    }
    Ok((same, written))
}

/// Creates `path` (0600, never through a link) `size` bytes long, open for reading and writing.
fn create_sized(path: &Path, size: u64) -> Result<std::fs::File, RestoreError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path))?;
    f.set_len(size).map_err(io(path))?;
    Ok(f)
}

/// Creates `dir` and its missing parents, each made durable in its parent.
fn create_root(dir: &Path) -> Result<(), RestoreError> {
    let mut missing = Vec::new();
    for at in dir.ancestors() {
        match std::fs::symlink_metadata(at) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(at),
            Err(e) => return Err(RestoreError::Io { path: at.to_path_buf(), cause: e }),
        }
    }
    for at in missing.into_iter().rev() {
        std::fs::create_dir(at).map_err(io(at))?;
        if let Some(parent) = at.parent() {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// An exclusive lock on `dir` for as long as the returned handle lives: a second delta restore
/// into the same directory is refused instead of racing this one.
fn lock(dir: &Path) -> Result<std::fs::File, RestoreError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).map_err(io(dir))?;
    // SAFETY: flock on a descriptor this function owns; released when it is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(refused(dir, "another pitr restore --delta is writing it now"));
        }
        return Err(RestoreError::Io { path: dir.to_path_buf(), cause: e });
    }
    Ok(f)
}

fn fsync_dir(dir: &Path) -> Result<(), RestoreError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// How the caller finishes the directory before pg_control comes back: the recovery settings
/// and signal file, written as a plain restore writes them.
pub(crate) type Finish<'a> = &'a (dyn Fn(&Path) -> Result<(), RestoreError> + Sync);

/// Brings `target` (checked with [`check`]) to the backup `chain` (oldest first, the last the
/// one restored) as a plain restore would write it, fetching only blocks that differ;
/// `final_dir` is `target` made absolute (tablespace links point there), `tablespace_map` the
/// `--tablespace-map` directories, compared and written in place (only inside the backup's own
/// `PG_<version>_<catalog version>` directory there). `finish` writes the recovery settings;
/// pg_control comes back after it. Any error after the first change leaves the directory
/// without pg_control and says that the same command completes it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn apply(
    repo: &Repository,
    chain: &[&BackupManifest],
    target: &Path,
    final_dir: &Path,
    tablespace_map: &BTreeMap<u32, PathBuf>,
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
    finish: Finish<'_>,
) -> Result<DeltaReport, RestoreError> {
    let backup = *chain.last().ok_or_else(|| RestoreError::Other("no backup to restore".into()))?;
    let _lock = lock(target)?;
    // Judged again under the lock: a server may have started, or the directory changed hands,
    // since the caller's check.
    check(target, Some(backup.system_id), Some(backup.server_version_num))?;
    // Each comparing thread holds a block in memory: a manifest's word is not taken for how big.
    for b in chain {
        if b.block_size == 0 || b.block_size > 64 << 20 {
            return Err(RestoreError::Other(format!(
                "backup {} records a block size of {} bytes, outside 1 B..64 MiB; nothing was changed",
                b.id, b.block_size
            )));
        }
        check_block_counts(b)?;
    }
    // Everything that can be judged or read without changing the directory comes first.
    check_mapped_oids(backup, tablespace_map.keys().copied())?;
    let layout = check_layout(backup)?;
    // Read only: a restore never creates the key (on a repository without one, no block has a
    // hash to compare with, and every block is fetched).
    let hasher = existing_block_hasher(repo).await?.map(Arc::new);
    let mapped = MappedTablespaces(
        tablespace_map
            .iter()
            .map(|(oid, dir)| (*oid, MappedTablespace { write_dir: dir.clone(), final_dir: dir.clone() }))
            .collect(),
    );
    let place = Placement { dir: target, mapped: &mapped };
    let incremental: Vec<(String, Arc<PathBuf>)> = output_files(backup)
        .filter(|(path, file)| *path != file.path)
        .map(|(path, _)| {
            let out = if path == PG_CONTROL { target.join(PG_CONTROL_STAGED) } else { place.path(&path) };
            (path, Arc::new(out))
        })
        .collect();
    let combined = plan_combined_all(repo, chain, incremental, workers).await?;
    let resumed = std::fs::symlink_metadata(target.join(IN_PROGRESS)).is_ok();
    // Planning read the repository for a while: judged once more right before the first change.
    check(target, Some(backup.system_id), Some(backup.server_version_num))?;
    // A mapped directory is cleaned from the directory itself, never through a link in its
    // place (the caller refuses one too).
    for dir in tablespace_map.values() {
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(RestoreError::TablespaceDir {
                dir: dir.clone(),
                why: "is a symbolic link: give the directory it leads to instead".into(),
            });
        }
    }
    let incomplete = |cause: RestoreError| {
        // NoSpace's own words promise a target left as it was, which is not so here.
        let cause = match cause {
            RestoreError::NoSpace { path } => {
                RestoreError::Io { path, cause: std::io::Error::from_raw_os_error(libc::ENOSPC) }
            }
            other => other,
        };
        RestoreError::DeltaIncomplete { dir: target.to_path_buf(), cause: Box::new(cause) }
    };
    let marker = format!("system_identifier = {}\nbackup = {}\n", backup.system_id, backup.id);
    // A marker that could not be written changed nothing, unless an interrupted restore left
    // the directory incomplete already.
    if let Err(e) = write_file_nofollow(&target.join(IN_PROGRESS), marker.as_bytes()) {
        if resumed {
            return Err(incomplete(e));
        }
        // Best effort: a marker cut short by a full disk would otherwise be the one change.
        let _ = std::fs::remove_file(target.join(IN_PROGRESS));
        return Err(e);
    }

    let result = async {
        let control = target.join(PG_CONTROL);
        match std::fs::remove_file(&control) {
            Ok(()) => fsync_dir(&target.join("global"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RestoreError::Io { path: control, cause: e }),
        }
        let mut report = DeltaReport { resumed, without_block_hashes: hasher.is_none(), ..DeltaReport::default() };
        place_layout(backup, chain.len(), &layout, &place, target, final_dir, &mut report)?;
        fetch_files(repo, chain, &place, target, combined, hasher, workers, progress, &mut report).await?;
        finish(target)?;
        let staged = target.join(PG_CONTROL_STAGED);
        let mode = backup.files.iter().find(|f| f.path == PG_CONTROL).map_or(0o600, |f| f.mode);
        sync_files(&[(staged.clone(), mode)])?;
        std::fs::rename(&staged, &control).map_err(io(&control))?;
        fsync_dir(&target.join("global"))?;
        std::fs::remove_file(target.join(IN_PROGRESS)).map_err(io(&target.join(IN_PROGRESS)))?;
        fsync_dir(target)?;
        Ok(report)
    }
    .await;
    result.map_err(incomplete)
}

/// Removes what the backup does not have and creates its directories and tablespace links.
/// In a mapped tablespace directory only the backup's own entries (its `PG_<version>_<catalog
/// version>` directory) are compared: anything beside them (another cluster's or version's
/// directory, `lost+found`) stays.
fn place_layout(
    backup: &BackupManifest,
    chain_len: usize,
    layout: &crate::materialize::CheckedLayout,
    place: &Placement<'_>,
    target: &Path,
    final_dir: &Path,
    report: &mut DeltaReport,
) -> Result<(), RestoreError> {
    let mut expected = Layout::new();
    expected.insert(target.to_path_buf(), BTreeMap::new());
    for m in place.mapped.0.values() {
        expected.insert(m.write_dir.clone(), BTreeMap::new());
    }
    for (path, _) in &layout.dirs {
        let (root, rel) = place.locate(path);
        expect(&mut expected, root, &rel, Expect::Dir);
    }
    for (path, _) in output_files(backup) {
        let (root, rel) = place.locate(&path);
        expect(&mut expected, root, &rel, Expect::File);
    }
    if chain_len == 1 {
        // Written again below; as a plain restore writes it for a full backup.
        expect(&mut expected, target, Path::new("backup_manifest"), Expect::File);
    }
    let mut links = Vec::new();
    for (rel, oid) in &layout.links {
        let link_target = match place.mapped.get(oid) {
            Some(m) => m.final_dir.clone(),
            None => {
                expect(&mut expected, target, &Path::new(TABLESPACE_DIR).join(oid), Expect::Dir);
                final_dir.join(TABLESPACE_DIR).join(oid)
            }
        };
        expect(&mut expected, target, rel, Expect::Link(link_target.clone()));
        links.push((rel, oid, link_target));
    }
    // The target first: a tablespace link pointing elsewhere goes before anything is written
    // into a mapped directory, and the new link is durable before that, so that a rerun after
    // a crash finds the directory it wrote to pointed at (and accepts it without --force).
    let empty = BTreeMap::new();
    let in_target = expected.get(target).unwrap_or(&empty);
    clean(target, Path::new(""), in_target, &|name| KEPT.iter().any(|k| name == *k), &mut report.removed)?;
    for (rel, oid, link_target) in links {
        if let Some(parent) = rel.parent() {
            create_dir_confined(target, parent)?;
        }
        let home = match place.mapped.get(oid) {
            Some(m) => m.write_dir.clone(),
            None => create_dir_confined(target, &Path::new(TABLESPACE_DIR).join(oid))?,
        };
        let path = target.join(rel);
        if std::fs::read_link(&path).ok() != Some(link_target.clone()) {
            std::os::unix::fs::symlink(&link_target, &path).map_err(io(&path))?;
            fsync_dir(path.parent().unwrap_or(target))?;
        }
        if place.mapped.get(oid).is_some() {
            create_root(&home)?;
            let paths = expected.get(&home).unwrap_or(&empty);
            let own: BTreeSet<&OsStr> =
                paths.keys().filter(|p| p.components().count() == 1).map(|p| p.as_os_str()).collect();
            clean(&home, Path::new(""), paths, &|name| !own.contains(name), &mut report.removed)?;
        }
        chmod_dir(&home, 0o700)?;
    }
    for (path, mode) in &layout.dirs {
        let created = place.create_dir(path)?;
        chmod_dir(&created, *mode)?;
    }
    Ok(())
}

/// What to compare: a file the backup holds whole, or one combined from its chain.
enum Work {
    Whole(Arc<PathBuf>, BackupFile),
    Combined(Arc<PathBuf>, PlannedFile),
}

/// Compares every file of the backup with what `target` holds and writes what differs;
/// pg_control goes to [`PG_CONTROL_STAGED`], whole. Files and directories are fsynced.
#[allow(clippy::too_many_arguments)]
async fn fetch_files(
    repo: &Repository,
    chain: &[&BackupManifest],
    place: &Placement<'_>,
    target: &Path,
    combined: Vec<PlannedFile>,
    hasher: Option<Arc<BlockHasher>>,
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
    report: &mut DeltaReport,
) -> Result<(), RestoreError> {
    let backup = *chain.last().ok_or_else(|| RestoreError::Other("no backup to restore".into()))?;
    let staged_control = target.join(PG_CONTROL_STAGED);
    // Never compared: pg_control was removed, and comes back whole and last.
    match std::fs::remove_file(&staged_control) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RestoreError::Io { path: staged_control, cause: e }),
    }
    let mut names: BTreeMap<Arc<PathBuf>, String> = BTreeMap::new();
    let mut work = Vec::new();
    let mut synced = Vec::new();
    for (path, file) in output_files(backup) {
        let out = if path == PG_CONTROL {
            Arc::new(staged_control.clone())
        } else {
            place.create_parent(&path)?;
            let out = place.path(&path);
            synced.push((out.clone(), file.mode));
            Arc::new(out)
        };
        names.insert(out.clone(), path.clone());
        if path == file.path {
            work.push(Work::Whole(out, file.clone()));
        }
    }
    for planned in combined {
        let out = if planned.path == PG_CONTROL { staged_control.clone() } else { place.path(&planned.path) };
        work.push(Work::Combined(Arc::new(out), planned));
    }
    // Compared on several threads: reading and hashing a data directory is most of the work
    // where little changed.
    let block_size = backup.block_size;
    let per_worker = work.len().div_ceil(workers.max(1)).max(1);
    let mut parts: Vec<Vec<Work>> = Vec::new();
    for w in work {
        match parts.last_mut() {
            Some(p) if p.len() < per_worker => p.push(w),
            _ => parts.push(vec![w]),
        }
    }
    let mut set = tokio::task::JoinSet::new();
    for part in parts {
        let hasher = hasher.clone();
        set.spawn_blocking(move || -> Result<Vec<(Arc<PathBuf>, Compared)>, RestoreError> {
            part.into_iter()
                .map(|w| match w {
                    Work::Whole(out, file) => {
                        let compared = compare_whole(&out, &file, block_size, hasher.as_deref())?;
                        Ok((out, compared))
                    }
                    Work::Combined(out, planned) => {
                        let compared = compare_combined(&out, planned, hasher.as_deref())?;
                        Ok((out, compared))
                    }
                })
                .collect()
        });
    }
    let mut jobs = Vec::new();
    let mut files: BTreeMap<Arc<PathBuf>, (bool, u64)> = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        let compared = match r.map_err(|e| RestoreError::Other(format!("compare task: {e}"))).and_then(|r| r) {
            Ok(c) => c,
            Err(e) => {
                set.abort_all();
                return Err(e);
            }
        };
        for (out, c) in compared {
            report.bytes_unchanged += c.unchanged;
            files.insert(out, (c.touched, c.zeros_written));
            jobs.extend(c.jobs);
        }
    }
    let total = jobs.iter().flat_map(|j| j.writes.iter().map(|(_, r, _)| r.map_or(j.stored_len, |r| r.1))).sum();
    let done = Arc::new(AtomicU64::new(0));
    let tally: Tally = Default::default();
    run_jobs(repo, backup.system_id, jobs, workers, &done, total, progress, Some(&tally)).await?;
    progress(done.load(Ordering::Relaxed), total);
    report.bytes_fetched = done.load(Ordering::Relaxed);
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    for (out, (touched, zeros)) in files {
        let (written, equal) = tally.get(&out).copied().unwrap_or_default();
        report.bytes_unchanged += equal;
        report.bytes_written += written + zeros;
        if touched || written + zeros > 0 {
            report.files_written += 1;
            let name = names.get(&out).cloned().unwrap_or_else(|| out.display().to_string());
            report.written.insert(name, written + zeros);
        } else {
            report.files_unchanged += 1;
        }
    }
    if chain.len() > 1 {
        let label = target.join("backup_label");
        let text = read_file_nofollow(&label)?.ok_or_else(|| {
            RestoreError::Other(format!("backup {} has no backup_label to rewrite for the combined chain", backup.id))
        })?;
        write_file_nofollow(&label, pitr_pgformat::incremental::combined_backup_label(&text).as_bytes())?;
    } else {
        write_file_nofollow(&target.join("backup_manifest"), backup.server_manifest.as_bytes())?;
    }
    let mut dirs: BTreeSet<PathBuf> = [target.to_path_buf()].into();
    dirs.extend(place.mapped.0.values().map(|m| m.write_dir.clone()));
    sync_all(synced, dirs, workers).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::backup::block_hasher;
    use pitr_archive::names::pg;
    use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta, Store};
    use std::os::unix::fs::PermissionsExt;

    const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;
    const BLOCK: u64 = 4;

    /// A data directory as far as [`check`] looks: PG_VERSION and a pg_control naming `system_id`.
    fn data_dir(dir: &Path, system_id: u64, version: &str) {
        std::fs::create_dir_all(dir.join("global")).unwrap();
        std::fs::write(dir.join("PG_VERSION"), format!("{version}\n")).unwrap();
        let mut control = system_id.to_ne_bytes().to_vec();
        control.extend_from_slice(&[0u8; 24]);
        std::fs::write(dir.join(PG_CONTROL), control).unwrap();
    }

    /// path → (is a link, content or link target), links not followed.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, (bool, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(at) = stack.pop() {
            for e in std::fs::read_dir(&at).unwrap() {
                let path = e.unwrap().path();
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                let m = std::fs::symlink_metadata(&path).unwrap();
                if m.is_symlink() {
                    out.insert(rel, (true, std::fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes()));
                } else if m.is_dir() {
                    out.insert(rel, (false, b"<dir>".to_vec()));
                    stack.push(path);
                } else {
                    out.insert(rel, (false, std::fs::read(&path).unwrap()));
                }
            }
        }
        out
    }

    #[test]
    fn refusals_name_the_reason_and_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let refused_for = |dir: &Path, system_id: Option<u64>, version: Option<u32>, why: &str| {
            let before = tree(dir);
            match check(dir, system_id, version) {
                Err(e @ RestoreError::DeltaRefused { .. }) => {
                    assert!(e.to_string().contains(why), "{e}");
                    assert!(e.to_string().contains("nothing was changed"), "{e}");
                }
                other => panic!("expected a refusal ({why}), got {other:?}"),
            }
            assert_eq!(tree(dir), before, "a refused check changed the directory");
        };
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), b"not a cluster").unwrap();
        refused_for(&dir, Some(SYSTEM_ID), Some(150004), "no PG_VERSION");
        std::fs::write(dir.join("PG_VERSION"), b"15\n").unwrap();
        refused_for(&dir, Some(SYSTEM_ID), Some(150004), "no global/pg_control");
        data_dir(&dir, SYSTEM_ID + 1, "15");
        refused_for(
            &dir,
            Some(SYSTEM_ID),
            Some(150004),
            &format!("another cluster: its system identifier is {}", SYSTEM_ID + 1),
        );
        data_dir(&dir, SYSTEM_ID, "15");
        refused_for(&dir, Some(SYSTEM_ID), Some(160002), "holds PostgreSQL 15 (PG_VERSION), the backup PostgreSQL 16");
        check(&dir, Some(SYSTEM_ID), Some(150004)).unwrap();
        assert_eq!(major_of(90624), "9.6");
        std::fs::write(dir.join(PG_CONTROL), b"short").unwrap();
        refused_for(&dir, Some(SYSTEM_ID), None, "shorter than a control file");

        // An interrupted delta restore: no pg_control, its marker names the cluster.
        std::fs::remove_file(dir.join(PG_CONTROL)).unwrap();
        std::fs::write(dir.join(IN_PROGRESS), format!("system_identifier = {SYSTEM_ID}\nbackup = x\n")).unwrap();
        check(&dir, Some(SYSTEM_ID), Some(150004)).unwrap();
        refused_for(&dir, Some(SYSTEM_ID + 1), None, "another cluster");
        std::fs::write(dir.join(IN_PROGRESS), b"planted\n").unwrap();
        refused_for(&dir, Some(SYSTEM_ID), None, "does not name a cluster");
        data_dir(&dir, SYSTEM_ID, "15");

        // A global that is a link: pg_control would be removed, and the staged one written,
        // through it.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::rename(dir.join("global"), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("global")).unwrap();
        refused_for(&dir, Some(SYSTEM_ID), None, "its global is not a directory (a symbolic link)");
        std::fs::remove_file(dir.join("global")).unwrap();
        std::fs::rename(&elsewhere, dir.join("global")).unwrap();
        // A marker that is not the file a delta restore writes (planted, or a directory) is
        // named, not taken for an interrupted restore.
        std::fs::remove_file(dir.join(IN_PROGRESS)).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), dir.join(IN_PROGRESS)).unwrap();
        refused_for(&dir, Some(SYSTEM_ID), None, "its pitr-delta-in-progress is a symbolic link, not the file");
        std::fs::remove_file(dir.join(IN_PROGRESS)).unwrap();
        std::fs::create_dir(dir.join(IN_PROGRESS)).unwrap();
        refused_for(&dir, Some(SYSTEM_ID), None, "is a directory, not the file");
        std::fs::remove_dir(dir.join(IN_PROGRESS)).unwrap();
        check(&dir, Some(SYSTEM_ID), Some(150004)).unwrap();

        // A WAL directory elsewhere is not written through.
        let wal = tmp.path().join("wal");
        std::fs::create_dir(&wal).unwrap();
        std::os::unix::fs::symlink(&wal, dir.join("pg_wal")).unwrap();
        refused_for(&dir, Some(SYSTEM_ID), None, "pg_wal is a symbolic link");
        std::fs::remove_file(dir.join("pg_wal")).unwrap();

        // A running server: this process stands in for it.
        std::fs::write(dir.join("postmaster.pid"), format!("{}\n", std::process::id())).unwrap();
        let before = tree(&dir);
        assert!(matches!(check(&dir, Some(SYSTEM_ID), None), Err(RestoreError::TargetInUse { .. })));
        assert_eq!(tree(&dir), before);

        assert!(!applies(&tmp.path().join("missing")).unwrap());
        std::fs::create_dir(tmp.path().join("empty")).unwrap();
        assert!(!applies(&tmp.path().join("empty")).unwrap());
        assert!(applies(&dir).unwrap());
    }

    /// A local repository holding the blocks of a small backup, and the manifest.
    async fn backup_of(tmp: &Path, files: &[(&str, &[u8])], dirs: &[&str]) -> (Repository, BackupManifest) {
        let store = LocalStore::new(tmp.join("repo"));
        store.create_root().unwrap();
        let repo = Repository::new(Arc::new(store), KeyRing::from_key("k", [3; 32]));
        let hasher = block_hasher(&repo).await.unwrap();
        let mut listed = Vec::new();
        for (path, content) in files {
            let mut blocks = Vec::new();
            for piece in content.chunks(BLOCK as usize) {
                let id = hasher.block_id(piece);
                let name = pg::block(SYSTEM_ID, &id);
                let meta = ObjectMeta::plain(ObjectKind::BackupBlock);
                match repo.put_sealed(&name, piece.to_vec(), meta).await {
                    Ok(_) | Err(pitr_archive::RepositoryError::Conflict { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                blocks.push(id);
            }
            listed.push(serde_json::json!({
                "path": path, "size": content.len(), "mode": 0o600, "mtime": 0, "checksum": null, "blocks": blocks
            }));
        }
        let entries: Vec<_> =
            dirs.iter().map(|d| serde_json::json!({"path": d, "mode": 0o700, "kind": "Directory"})).collect();
        // Through JSON, as manifests are read: fields added later keep their defaults.
        let manifest: BackupManifest = serde_json::from_value(serde_json::json!({
            "id": "20261206T000000Z", "kind": "full", "system_id": SYSTEM_ID, "server_version_num": 150004,
            "timeline": 1, "start_lsn": 1, "stop_lsn": 2, "start_time_us": 0, "stop_time_us": 1,
            "block_size": BLOCK, "tablespaces": [], "entries": entries, "files": listed,
            "server_manifest": "{\"PostgreSQL-Backup-Manifest-Version\": 1}", "logical_bytes": 0, "stored_bytes": 0
        }))
        .unwrap();
        (repo, manifest)
    }

    async fn run(repo: &Repository, backup: &BackupManifest, dir: &Path) -> Result<DeltaReport, RestoreError> {
        run_mapped(repo, backup, dir, &BTreeMap::new()).await
    }

    async fn run_mapped(
        repo: &Repository,
        backup: &BackupManifest,
        dir: &Path,
        map: &BTreeMap<u32, PathBuf>,
    ) -> Result<DeltaReport, RestoreError> {
        check(dir, Some(backup.system_id), Some(backup.server_version_num))?;
        let finish = |d: &Path| -> Result<(), RestoreError> {
            let conf = read_file_nofollow(&d.join("postgresql.auto.conf"))?.unwrap_or_default();
            write_file_nofollow(&d.join("postgresql.auto.conf"), format!("{conf}restore_command = 'x'\n").as_bytes())?;
            write_file_nofollow(&d.join("recovery.signal"), b"")
        };
        apply(repo, &[backup], dir, dir, map, 2, &|_, _| {}, &finish).await
    }

    #[tokio::test]
    async fn only_what_differs_is_written_and_what_the_backup_lacks_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let control = {
            let mut c = SYSTEM_ID.to_ne_bytes().to_vec();
            c.extend_from_slice(b"restored");
            c
        };
        let files: &[(&str, &[u8])] = &[
            ("PG_VERSION", b"15\n"),
            ("global/pg_control", &control),
            ("base/1/same", b"aaaabbbbcccc"),
            ("base/1/changed", b"aaaabbbbcccc"),
            ("base/1/shorter", b"aaaabb"),
            ("base/1/linked", b"link"),
            ("postgresql.auto.conf", b"# backup's\n"),
            ("backup_label", b"label of the backup\n"),
        ];
        let (repo, backup) =
            backup_of(tmp.path(), files, &["base", "base/1", "global", "pg_wal", "pg_wal/archive_status"]).await;
        let dir = tmp.path().join("data");
        data_dir(&dir, SYSTEM_ID, "15");
        std::fs::create_dir_all(dir.join("base/1")).unwrap();
        std::fs::create_dir_all(dir.join("base/2/sub")).unwrap();
        std::fs::create_dir_all(dir.join("pg_wal/archive_status")).unwrap();
        std::fs::write(dir.join("base/1/same"), b"aaaabbbbcccc").unwrap();
        std::fs::write(dir.join("base/1/changed"), b"aaaaXbbbcccc").unwrap();
        std::fs::write(dir.join("base/1/shorter"), b"aaaabbbbcccc").unwrap();
        std::fs::write(dir.join("base/2/sub/gone"), b"x").unwrap();
        std::fs::write(dir.join("pg_wal/000000010000000000000009"), b"old wal").unwrap();
        std::fs::write(dir.join("pg_wal/archive_status/000000010000000000000009.ready"), b"").unwrap();
        std::fs::write(dir.join("postgresql.auto.conf"), b"# backup's\nrestore_command = 'old'\n").unwrap();
        std::fs::write(dir.join("standby.signal"), b"").unwrap();
        std::fs::write(dir.join("postmaster.opts"), b"/usr/bin/postgres\n").unwrap();
        // A link where a file belongs: replaced, what it points to left alone.
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"sentinel").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("base/1/linked")).unwrap();

        let report = run(&repo, &backup, &dir).await.unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"sentinel");
        let mut expected: BTreeMap<PathBuf, (bool, Vec<u8>)> = files
            .iter()
            .map(|(p, c)| (PathBuf::from(p), (false, c.to_vec())))
            .chain(
                ["base", "base/1", "global", "pg_wal", "pg_wal/archive_status"]
                    .map(|d| (PathBuf::from(d), (false, b"<dir>".to_vec()))),
            )
            .collect();
        expected.insert("postgresql.auto.conf".into(), (false, b"# backup's\nrestore_command = 'x'\n".to_vec()));
        expected.insert("recovery.signal".into(), (false, Vec::new()));
        expected.insert("postmaster.opts".into(), (false, b"/usr/bin/postgres\n".to_vec()));
        expected.insert("backup_manifest".into(), (false, backup.server_manifest.clone().into_bytes()));
        assert_eq!(tree(&dir), expected);
        assert_eq!(std::fs::metadata(dir.join("base/1/changed")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            report,
            DeltaReport {
                // PG_VERSION and same whole; 2 of 3 blocks of changed, what shorter keeps, the
                // backup's part of postgresql.auto.conf.
                files_unchanged: 2,
                bytes_unchanged: 3 + 12 + 8 + 6 + 11,
                // changed, shorter (cut), linked, pg_control, postgresql.auto.conf (cut), backup_label
                files_written: 6,
                bytes_written: 4 + 4 + control.len() as u64 + 20,
                bytes_fetched: 4 + 4 + control.len() as u64 + 20,
                written: [
                    ("base/1/changed", 4),
                    ("base/1/shorter", 0),
                    ("base/1/linked", 4),
                    ("global/pg_control", control.len() as u64),
                    ("postgresql.auto.conf", 0),
                    ("backup_label", 20),
                ]
                .map(|(p, n)| (p.to_string(), n))
                .into(),
                without_block_hashes: false,
                // base/2, the WAL segment and its status, standby.signal, the link
                removed: 5,
                resumed: false,
            }
        );

        // Again: only pg_control is fetched; the settings' file is cut back to the backup's
        // before they are added again, and recovery.signal goes before it is written again.
        let again = run(&repo, &backup, &dir).await.unwrap();
        assert_eq!((again.files_written, again.removed), (2, 1), "{again:?}");
        assert_eq!(again.bytes_written, control.len() as u64);
        assert_eq!(tree(&dir), expected);
    }

    /// A restore that stops half-way (here: a block the repository lost) leaves no pg_control,
    /// so the server will not start, and says so; the same restore run again completes it.
    #[tokio::test]
    async fn an_interrupted_delta_restore_leaves_no_pg_control_and_a_rerun_completes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let control = SYSTEM_ID.to_ne_bytes().repeat(2);
        let files: &[(&str, &[u8])] =
            &[("PG_VERSION", b"15\n"), ("global/pg_control", &control), ("base/big", b"0123456789abcdef")];
        let (repo, backup) = backup_of(tmp.path(), files, &["base", "global"]).await;
        let dir = tmp.path().join("data");
        data_dir(&dir, SYSTEM_ID, "15");
        std::fs::create_dir(dir.join("base")).unwrap();
        std::fs::write(dir.join("base/big"), b"0123XXXX89abYYYY").unwrap();
        // The last block of base/big, which differs, is gone from the repository for a while.
        let lost = pg::block(SYSTEM_ID, &backup.files[2].blocks[3]);
        let store = LocalStore::new(tmp.path().join("repo"));
        let sealed = store.get(&lost).await.unwrap();
        store.delete(&lost).await.unwrap();

        let err = run(&repo, &backup, &dir).await.unwrap_err();
        assert!(matches!(err, RestoreError::DeltaIncomplete { .. }), "{err}");
        assert!(err.to_string().contains("again completes it"), "{err}");
        assert!(!dir.join(PG_CONTROL).exists(), "pg_control is back before the restore completed");
        assert!(dir.join(IN_PROGRESS).exists());

        store.put_if_absent(&lost, sealed).await.unwrap();
        let report = run(&repo, &backup, &dir).await.unwrap();
        assert!(report.resumed);
        assert_eq!(std::fs::read(dir.join("base/big")).unwrap(), b"0123456789abcdef");
        assert_eq!(std::fs::read(dir.join(PG_CONTROL)).unwrap(), control);
        assert!(!dir.join(IN_PROGRESS).exists() && !dir.join(PG_CONTROL_STAGED).exists());
    }

    /// A tablespace whose link points at the server's location comes back inside the target as
    /// a plain restore puts it, the old location untouched; mapped onto that location, its
    /// files are compared there in place and what the backup lacks there goes.
    #[tokio::test]
    async fn tablespaces_land_where_a_plain_restore_puts_them_and_a_mapped_one_is_compared_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let control = SYSTEM_ID.to_ne_bytes().repeat(2);
        let files: &[(&str, &[u8])] = &[
            ("PG_VERSION", b"15\n"),
            ("global/pg_control", &control),
            ("pg_tblspc/16384/PG_15_1/5/rel", b"tablespace"),
        ];
        let (repo, mut backup) = backup_of(
            tmp.path(),
            files,
            &["global", "pg_tblspc", "pg_tblspc/16384/PG_15_1", "pg_tblspc/16384/PG_15_1/5"],
        )
        .await;
        let location = tmp.path().join("location");
        backup.entries.push(pitr_archive::backup::BackupEntry {
            path: "pg_tblspc/16384".into(),
            mode: 0o777,
            kind: pitr_archive::backup::BackupEntryKind::Symlink { target: location.display().to_string() },
        });
        // The server's own layout: the link points at the location, which holds the files.
        let dir = tmp.path().join("data");
        data_dir(&dir, SYSTEM_ID, "15");
        std::fs::create_dir_all(dir.join("pg_tblspc")).unwrap();
        std::fs::create_dir_all(location.join("PG_15_1/5")).unwrap();
        std::fs::write(location.join("PG_15_1/5/rel"), b"tablespace").unwrap();
        std::fs::write(location.join("PG_15_1/5/extra"), b"newer table").unwrap();
        std::os::unix::fs::symlink(&location, dir.join("pg_tblspc/16384")).unwrap();
        let at_location = tree(&location);

        run(&repo, &backup, &dir).await.unwrap();
        assert_eq!(tree(&location), at_location, "the restore changed the tablespace's location");
        assert_eq!(std::fs::read_link(dir.join("pg_tblspc/16384")).unwrap(), dir.join("pitr_tablespaces/16384"));
        assert_eq!(std::fs::read(dir.join("pitr_tablespaces/16384/PG_15_1/5/rel")).unwrap(), b"tablespace");

        // Beside the backup's own PG_15_1: another version's directory (pg_upgrade leaves the
        // old one), a file system's lost+found, a stray file. None of them is the restore's.
        std::fs::create_dir_all(location.join("PG_16_2/5")).unwrap();
        std::fs::write(location.join("PG_16_2/5/rel"), b"another cluster").unwrap();
        std::fs::create_dir(location.join("lost+found")).unwrap();
        std::fs::write(location.join("notes"), b"mine").unwrap();
        let map: BTreeMap<u32, PathBuf> = [(16384, location.clone())].into();
        let report = run_mapped(&repo, &backup, &dir, &map).await.unwrap();
        assert_eq!(std::fs::read(location.join("PG_16_2/5/rel")).unwrap(), b"another cluster");
        assert!(location.join("lost+found").is_dir());
        assert_eq!(std::fs::read(location.join("notes")).unwrap(), b"mine");
        assert_eq!(std::fs::read_link(dir.join("pg_tblspc/16384")).unwrap(), location);
        assert_eq!(std::fs::read(location.join("PG_15_1/5/rel")).unwrap(), b"tablespace");
        assert!(!location.join("PG_15_1/5/extra").exists());
        assert!(!dir.join("pitr_tablespaces").exists());
        // rel was compared in place: only pg_control was fetched.
        assert_eq!(report.bytes_written, control.len() as u64, "{report:?}");
        // The link, pitr_tablespaces, extra, and recovery.signal and postgresql.auto.conf
        // (this backup has none) before they are written again.
        assert_eq!(report.removed, 5, "{report:?}");
    }

    /// A file with other hard links (`pg_upgrade --link` shares relation files between the old
    /// cluster and the new) is parted from them before it is written: the other name keeps its
    /// content, also for a file found unchanged.
    #[tokio::test]
    async fn files_with_other_hard_links_are_parted_from_them_before_any_write() {
        let tmp = tempfile::tempdir().unwrap();
        let control = SYSTEM_ID.to_ne_bytes().repeat(2);
        let files: &[(&str, &[u8])] = &[
            ("PG_VERSION", b"15\n"),
            ("global/pg_control", &control),
            ("base/changed", b"aaaabbbbcccc"),
            ("base/same", b"ddddeeee"),
        ];
        let (repo, backup) = backup_of(tmp.path(), files, &["base", "global"]).await;
        let dir = tmp.path().join("data");
        data_dir(&dir, SYSTEM_ID, "15");
        std::fs::create_dir(dir.join("base")).unwrap();
        let old = tmp.path().join("old-cluster");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("changed"), b"aaaaXXXXcccc").unwrap();
        std::fs::write(old.join("same"), b"ddddeeee").unwrap();
        std::fs::hard_link(old.join("changed"), dir.join("base/changed")).unwrap();
        std::fs::hard_link(old.join("same"), dir.join("base/same")).unwrap();

        let report = run(&repo, &backup, &dir).await.unwrap();
        assert_eq!(std::fs::read(old.join("changed")).unwrap(), b"aaaaXXXXcccc", "written through a hard link");
        assert_eq!(std::fs::read(dir.join("base/changed")).unwrap(), b"aaaabbbbcccc");
        assert_eq!(std::fs::read(dir.join("base/same")).unwrap(), b"ddddeeee");
        use std::os::unix::fs::MetadataExt;
        for name in ["changed", "same"] {
            assert_eq!(std::fs::metadata(dir.join("base").join(name)).unwrap().nlink(), 1, "{name}");
            assert_eq!(std::fs::metadata(old.join(name)).unwrap().nlink(), 1, "{name}");
        }
        // Only the differing block of changed was fetched; same was copied, not fetched.
        assert_eq!(report.written.get("base/changed"), Some(&4), "{report:?}");
        assert_eq!(report.written.get("base/same"), Some(&0), "{report:?}");
        assert_eq!(report.bytes_fetched, 4 + control.len() as u64, "{report:?}");
    }

    /// Block lists that do not cover their files' sizes are refused before anything changes.
    #[tokio::test]
    async fn a_manifest_whose_blocks_do_not_cover_a_file_is_refused_before_any_change() {
        let tmp = tempfile::tempdir().unwrap();
        let control = SYSTEM_ID.to_ne_bytes().repeat(2);
        let files: &[(&str, &[u8])] =
            &[("PG_VERSION", b"15\n"), ("global/pg_control", &control), ("base/rel", b"aaaabbbbcccc")];
        let dir = tmp.path().join("data");
        data_dir(&dir, SYSTEM_ID, "15");
        std::fs::write(dir.join("stray"), b"the backup lacks me").unwrap();
        let (repo, backup) = backup_of(tmp.path(), files, &["base", "global"]).await;
        for (blocks, size) in [(2, 12), (4, 12), (3, 13), (3, 8)] {
            let mut bad = backup.clone();
            bad.files[2].blocks.truncate(blocks);
            while bad.files[2].blocks.len() < blocks {
                let first = bad.files[2].blocks[0].clone();
                bad.files[2].blocks.push(first);
            }
            bad.files[2].size = size;
            let before = tree(&dir);
            let err = run(&repo, &bad, &dir).await.unwrap_err();
            assert!(matches!(err, RestoreError::Other(_)), "{err}");
            assert!(err.to_string().contains("base/rel") && err.to_string().contains("its manifest lists"), "{err}");
            assert_eq!(tree(&dir), before, "{blocks} blocks for {size} bytes: the directory changed");
        }
        run(&repo, &backup, &dir).await.unwrap();
    }

    /// A repository without a dedup key (a copy lacking it): a delta restore does not create
    /// one, fetches every block and writes only what differs, and says so.
    #[tokio::test]
    async fn without_a_dedup_key_every_block_is_fetched_none_created_and_equal_bytes_left_unwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let control = SYSTEM_ID.to_ne_bytes().repeat(2);
        let files: &[(&str, &[u8])] =
            &[("PG_VERSION", b"15\n"), ("global/pg_control", &control), ("base/rel", b"aaaabbbbcccc")];
        let (repo, backup) = backup_of(tmp.path(), files, &["base", "global"]).await;
        let store = LocalStore::new(tmp.path().join("repo"));
        store.delete(pitr_archive::names::DEDUP_KEY).await.unwrap();
        let dir = tmp.path().join("data");
        data_dir(&dir, SYSTEM_ID, "15");
        std::fs::create_dir(dir.join("base")).unwrap();
        std::fs::write(dir.join("base/rel"), b"aaaaXXXXcccc").unwrap();

        let report = run(&repo, &backup, &dir).await.unwrap();
        assert!(report.without_block_hashes, "{report:?}");
        assert!(store.get(pitr_archive::names::DEDUP_KEY).await.is_err(), "a restore created the dedup key");
        assert_eq!(std::fs::read(dir.join("base/rel")).unwrap(), b"aaaabbbbcccc");
        assert_eq!(report.bytes_fetched, 3 + 12 + control.len() as u64, "{report:?}");
        assert_eq!(report.written.get("base/rel"), Some(&4), "{report:?}");
        assert_eq!(report.files_unchanged, 1, "PG_VERSION: {report:?}");
    }

    /// Stores `files` (path, content) in `repo`'s blocks of `block_size` bytes and returns a
    /// manifest naming them: a full backup, or an incremental one of `parent`.
    async fn stored_backup(
        repo: &Repository,
        id: &str,
        parent: Option<&str>,
        block_size: usize,
        files: &[(&str, Vec<u8>)],
    ) -> BackupManifest {
        let hasher = block_hasher(repo).await.unwrap();
        let mut listed = Vec::new();
        for (path, content) in files {
            let mut blocks = Vec::new();
            for piece in content.chunks(block_size) {
                let id = hasher.block_id(piece);
                let meta = ObjectMeta::plain(ObjectKind::BackupBlock);
                match repo.put_sealed(&pg::block(SYSTEM_ID, &id), piece.to_vec(), meta).await {
                    Ok(_) | Err(pitr_archive::RepositoryError::Conflict { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                blocks.push(id);
            }
            listed.push(serde_json::json!({
                "path": path, "size": content.len(), "mode": 0o600, "mtime": 0, "checksum": null, "blocks": blocks
            }));
        }
        serde_json::from_value(serde_json::json!({
            "id": id, "kind": if parent.is_some() { "incremental" } else { "full" }, "parent": parent,
            "system_id": SYSTEM_ID, "server_version_num": 170000, "timeline": 1, "start_lsn": 1, "stop_lsn": 2,
            "start_time_us": 0, "stop_time_us": 1, "block_size": block_size, "tablespaces": [],
            "entries": [{"path": "base", "mode": 0o700, "kind": "Directory"},
                        {"path": "global", "mode": 0o700, "kind": "Directory"}],
            "files": listed, "server_manifest": "{}", "logical_bytes": 0, "stored_bytes": 0
        }))
        .unwrap()
    }

    /// A relation file combined from an incremental chain (PostgreSQL 17): the pieces that are
    /// whole stored blocks of the full backup are judged by hash and not fetched when equal; a
    /// piece of the incremental is fetched and written only where it differs; a block no backup
    /// supplies is made zero. The result is the combined file.
    #[tokio::test]
    async fn a_combined_file_is_compared_piece_by_piece_and_written_only_where_it_differs() {
        const PAGE: usize = 8192;
        let page = |b: u8| vec![b; PAGE];
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("repo"));
        store.create_root().unwrap();
        let repo = Repository::new(Arc::new(store), KeyRing::from_key("k", [4; 32]));
        let control = SYSTEM_ID.to_ne_bytes().repeat(2);
        // The full backup: four pages, one stored block each.
        let full_rel = [page(0xa0), page(0xa1), page(0xa2), page(0xa3)].concat();
        let full = stored_backup(
            &repo,
            "F",
            None,
            PAGE,
            &[
                ("PG_VERSION", b"17\n".to_vec()),
                ("global/pg_control", control.clone()),
                ("base/rel", full_rel),
                ("backup_label", b"START WAL LOCATION: 0/1\n".to_vec()),
            ],
        )
        .await;
        // The incremental: page 1 changed, five pages long (page 4 never written: zeros), in
        // stored blocks of two pages, so page 1 is half of a stored block.
        let incremental_rel = pitr_pgformat::incremental::build_incremental_file(&[(1, page(0xb1))], 5, PAGE as u32);
        let incr = stored_backup(
            &repo,
            "I",
            Some("F"),
            2 * PAGE,
            &[
                ("PG_VERSION", b"17\n".to_vec()),
                ("global/pg_control", control.clone()),
                ("base/INCREMENTAL.rel", incremental_rel),
                ("backup_label", b"START WAL LOCATION: 0/1\nINCREMENTAL FROM LSN: 0/1\n".to_vec()),
            ],
        )
        .await;
        let combined = [page(0xa0), page(0xb1), page(0xa2), page(0xa3), page(0)].concat();

        let dir = tmp.path().join("data");
        data_dir(&dir, SYSTEM_ID, "17");
        std::fs::create_dir(dir.join("base")).unwrap();
        // Page 1 already the incremental's, page 2 changed since, page 4 not zero, a page more.
        let there = [page(0xa0), page(0xb1), page(0xee), page(0xa3), page(0xff), page(0xa5)].concat();
        std::fs::write(dir.join("base/rel"), &there).unwrap();
        std::fs::write(dir.join("backup_label"), b"START WAL LOCATION: 0/1\n").unwrap();

        check(&dir, Some(SYSTEM_ID), Some(170000)).unwrap();
        let finish = |d: &Path| write_file_nofollow(&d.join("recovery.signal"), b"");
        let report = apply(&repo, &[&full, &incr], &dir, &dir, &BTreeMap::new(), 2, &|_, _| {}, &finish).await.unwrap();
        assert!(std::fs::read(dir.join("base/rel")).unwrap() == combined, "not the combined file");
        assert_eq!(std::fs::read_to_string(dir.join("backup_label")).unwrap(), "START WAL LOCATION: 0/1\n");
        assert!(!dir.join("backup_manifest").exists(), "a combined directory got the incremental's manifest");
        // Page 2 fetched and written, page 4 zeroed; page 1 fetched and found equal; pages 0
        // and 3 neither fetched nor written. (The incremental's backup_label is fetched whole
        // each time: the directory holds it rewritten for the combined chain.)
        let label = incr.files[3].size;
        assert_eq!(report.written.get("base/rel"), Some(&(2 * PAGE as u64)), "{report:?}");
        assert_eq!(report.bytes_fetched, 2 * PAGE as u64 + control.len() as u64 + label, "{report:?}");
        assert_eq!(report.bytes_unchanged, 3 + 3 * PAGE as u64, "{report:?}");

        // Again: nothing of the relation is written.
        let again = apply(&repo, &[&full, &incr], &dir, &dir, &BTreeMap::new(), 2, &|_, _| {}, &finish).await.unwrap();
        assert_eq!(again.written.get("base/rel"), None, "{again:?}");
        assert_eq!(again.bytes_fetched, PAGE as u64 + control.len() as u64 + label, "{again:?}");
        assert!(std::fs::read(dir.join("base/rel")).unwrap() == combined);
    }

    #[test]
    fn a_second_delta_restore_into_the_same_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let held = lock(tmp.path()).unwrap();
        let err = lock(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("another pitr restore --delta"), "{err}");
        drop(held);
        lock(tmp.path()).unwrap();
    }
}
