//! WAL chunks of the local backend, appended to one log file per segment instead of a file each.
//!
//! A synchronous commit waits for the sidecar's put of the chunk that holds it. As a file of its
//! own, that put is a new inode, a temporary name, an fsync of the file (which on ext4 also writes
//! the new inode and its directory), a link, an unlink and an fsync of the directory: five or six
//! synchronous block writes and two cache flushes, each a wake-up (and, in a VM, an exit) — most
//! of the sidecar's CPU and of the commit's wait under pgbench, measured with `perf`.
//! pg_receivewal writes into one file per segment and fdatasyncs it. So does this: the sidecar's
//! store ([`crate::LocalStore::appending`]) appends each chunk as a record to
//! `<dir>/.log/<segment>.<writer>` and fdatasyncs it; the object exists once that returns.
//!
//! To everything above the [`crate::Store`] trait nothing changes: a record is an object of its
//! name, listed, read, headed and deleted like a file (every `LocalStore` reads logs, only the
//! sidecar's appends). The record holds the sealed object's bytes, whose authentication is what
//! readers trust; the record's CRC only tells a torn append from a whole one.
//!
//! A record is `PITRCLG1`, the name's length (u16 LE), the data's length (u32 LE), a CRC-32 of
//! those two lengths, the name and the data (u32 LE), then the name (the full object name) and
//! the data. Rules that keep it safe:
//! - One writer per file: `<writer>` is random per store, so two processes (a sidecar paused past
//!   its lease and the one that took over) never write into one file.
//! - Appends and deletes of a directory hold an exclusive `flock` on `.log/.lock` (across
//!   processes; waited for at most [`LOCK_WAIT`], then the put or delete fails and is retried):
//!   the put-if-absent check, the write, its fdatasync and the link check happen as one, and a
//!   delete reads, rewrites and unlinks as one. Readers take no lock. The lock file also counts
//!   the directory's changes ([`LOCK_FILE`]), so an appender looks at the other logs only when
//!   someone else changed something.
//! - A writer never appends after a failed write: the file is cut back and left, and the next put
//!   opens a new one. So only a file's last record can be torn (by a crash before its fdatasync
//!   returned, i.e. before anyone was told it exists), and a reader takes a last record that does
//!   not check, or zeros, as the end. A record that does not check with a record header after it
//!   (also a header zeroed by a lost write) is damage: listing that segment fails, naming the
//!   file and the offset; moving the log out of `.log/` by hand turns it into a visible hole.
//! - A reader makes records it reads for the first time durable (fdatasync) before using them:
//!   a writer killed between its write and its fdatasync leaves a whole record in the page cache
//!   only, which a new sidecar must not resume after (and report flushed) while a power loss
//!   could still take it away.
//! - Before it writes, a writer whose log a delete removed (the count moved, the log is not
//!   listed) opens a new one; after its fdatasync it checks, under the lock, that the file still
//!   has a link: a log removed by hand makes the put fail (and be retried into a new log).
//! - A delete that leaves some of a log's records copies them to `.tmp.<segment>.<id>`, fsyncs
//!   it, renames it to a log and fsyncs the directory before it unlinks the old log (a crash
//!   leaves a temporary file the next delete removes, never a torn log); a delete of all of them
//!   unlinks it.
//!
//! What it does not cover: a last record damaged after it was acknowledged reads as never
//! written (as a torn end of PostgreSQL's own WAL would); the journal (`[journal]`) names an
//! object that went missing that way. The lock is `flock`: on a network filesystem that does
//! not honour it, two processes appending to one repository are kept apart by the writer lease
//! alone.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::names::pg::{self, WalName};

/// The directory, beside the objects of a WAL directory, that holds its logs.
pub(crate) const LOG_DIR: &str = ".log";
const MAGIC: [u8; 8] = *b"PITRCLG1";
const HEADER: usize = 8 + 2 + 4 + 4;
/// Object names are short; anything longer is not a record.
const MAX_NAME: usize = 1024;
/// A chunk is at most a segment (1 GiB at PostgreSQL's largest) plus its seal.
const MAX_DATA: u64 = (1 << 30) + (1 << 20);

/// The log a name's record goes to: the WAL chunk's directory (`pg/<id>/wal`) and segment file,
/// or `None` for every other object (which stays a file of its own).
pub(crate) fn group_of(name: &str) -> Option<(&str, &str)> {
    let (dir, _) = name.rsplit_once('/')?;
    let system_id = wal_dir_system_id(dir)?;
    match pg::parse_wal(system_id, name)? {
        WalName::Chunk { segment_file, .. } => Some((dir, segment_file)),
        _ => None,
    }
}

/// The cluster whose WAL directory `dir` (`pg/<id>/wal`, relative to the root) is: the only
/// directories that may hold chunk logs.
pub(crate) fn wal_dir_system_id(dir: &str) -> Option<u64> {
    let mut parts = dir.split('/');
    let (Some("pg"), Some(id), Some("wal"), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    id.parse().ok()
}

/// One record as bytes, ready to append.
pub(crate) fn encode(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + name.len() + data.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let crc = record_crc(&out[8..14], name.as_bytes(), data);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(data);
    out
}

fn record_crc(lengths: &[u8], name: &[u8], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(lengths);
    h.update(name);
    h.update(data);
    h.finalize()
}

/// A record found in a log: its object name and where its data is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub data_at: u64,
    pub len: u64,
}

/// What a log holds, as far as it was read.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scanned {
    pub entries: Vec<Entry>,
    /// The entries' names, for put-if-absent (a segment's log holds a thousand chunks or more).
    pub names: HashSet<String>,
    /// The offset after the last whole record: where a reader looks next.
    pub end: u64,
    /// The offset of a record that does not check although a record header follows it.
    pub damaged_at: Option<u64>,
    /// The records end in bytes that are neither a record nor zeros (a torn last append).
    pub torn: bool,
}

/// The record at the start of `bytes`: its name, its data's range within `bytes` and its length;
/// `None` if there is no whole, checking record there.
fn parse_one(bytes: &[u8]) -> Option<(&str, std::ops::Range<usize>, usize)> {
    if bytes.len() < HEADER || bytes[..8] != MAGIC {
        return None;
    }
    let name_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let data_len = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
    let crc = u32::from_le_bytes([bytes[14], bytes[15], bytes[16], bytes[17]]);
    if name_len == 0 || name_len > MAX_NAME || u64::from(data_len) > MAX_DATA {
        return None;
    }
    let total = HEADER + name_len + data_len as usize;
    if bytes.len() < total {
        return None;
    }
    let name = &bytes[HEADER..HEADER + name_len];
    let data = HEADER + name_len..total;
    if record_crc(&bytes[8..14], name, &bytes[data.clone()]) != crc {
        return None;
    }
    let name = std::str::from_utf8(name).ok()?;
    crate::store::validate_name(name).ok()?;
    Some((name, data, total))
}

/// Reads the records of `bytes`, which start at offset `base` of their file.
pub(crate) fn scan(bytes: &[u8], base: u64) -> Scanned {
    let mut out = Scanned { end: base, ..Scanned::default() };
    let mut at = 0usize;
    while at < bytes.len() {
        match parse_one(&bytes[at..]) {
            Some((name, data, total)) => {
                out.names.insert(name.to_string());
                out.entries.push(Entry {
                    name: name.to_string(),
                    data_at: base + (at + data.start) as u64,
                    len: data.len() as u64,
                });
                at += total;
                out.end = base + at as u64;
            }
            None => {
                // The zeros a writer fills ahead with, or a torn last append: the end, unless a
                // record header follows (damage, also when it zeroed a header). Sealed bytes
                // are random to anyone without the key, so the magic with plausible lengths in
                // them is no worry; checking headers only keeps this linear in the file's size.
                if header_follows(&bytes[at + 1..]) {
                    out.damaged_at = Some(base + at as u64);
                } else {
                    out.torn = !bytes[at..].iter().take(MAGIC.len()).all(|&b| b == 0);
                }
                break;
            }
        }
    }
    out
}

/// Whether a record header (the magic, plausible lengths) starts anywhere in `bytes`.
fn header_follows(bytes: &[u8]) -> bool {
    (0..bytes.len().saturating_sub(HEADER - 1)).any(|i| {
        let h = &bytes[i..i + HEADER];
        let name_len = usize::from(u16::from_le_bytes([h[8], h[9]]));
        let data_len = u64::from(u32::from_le_bytes([h[10], h[11], h[12], h[13]]));
        h[..8] == MAGIC && (1..=MAX_NAME).contains(&name_len) && data_len <= MAX_DATA
    })
}

/// Why a log could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LogError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "chunk log {path} is damaged at offset {offset}: a record there does not check and whole records follow it"
    )]
    Damaged { path: String, offset: u64 },
    #[error("chunk log {path} was removed while a chunk was appended to it; the put is retried into a new log")]
    Removed { path: String },
    #[error(
        "chunk log directory {path} stayed locked by another process for {seconds} s; the put or delete is retried"
    )]
    Busy { path: String, seconds: u64 },
}

/// How long an append or delete waits for another process's lock on a log directory before it
/// fails (and is retried): never for ever, so a paused process cannot hang the sidecar.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The lock file of a log directory: its `flock` keeps appends and deletes of the directory apart
/// across processes, and its content counts the directory's changes (u64 LE, not made durable).
/// Every change — a log created, a record appended, a log rewritten or removed, a chunk put as a
/// file of its own beside the logs by a store that does not append — bumps the count first,
/// under the lock; so an appender that finds the count where its own last change left it knows
/// that nobody changed anything since and skips listing and re-reading the logs and looking for
/// a file of the name it puts (a directory read and several system calls per put otherwise; the
/// lookup of a name that is not there alone cost 3.6 % of the sidecar's stream thread). It still
/// looks at its first append to a segment, so what it cannot see is a file that was there before
/// (put by hand, by an older pitr, or counted before it looked) under a name it puts later: the
/// name is then a file and a record, one object whose reads take the file, which put-if-absent
/// leaves as it was. A crash after a bump and before the change only costs the others one full
/// look; after a machine crash the count may go back, but every process starts with nothing
/// cached then.
const LOCK_FILE: &str = ".lock";

/// An exclusive `flock` on a log directory's lock file, across processes: appends (the
/// put-if-absent check, the write, its fdatasync and the link check) and deletes (read, rewrite,
/// unlink) of one directory never interleave. Released when dropped.
pub(crate) struct DirLock {
    file: std::sync::Arc<File>,
}

/// Opens a log directory's lock file: read-write (created if missing, writable by whoever may
/// write the directory, as the umask allows), or read-only where this user may not write it (a
/// `.lock` another user made): `flock` works either way, and such a process cannot count its
/// changes, so it never skips a look ([`DirLock::bump`] says so) and others' counts may miss its
/// appends: a warning says so.
fn open_lock_file(log_dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = log_dir.join(LOCK_FILE);
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("lock file {}: {e}", path.display()));
    match std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o666).open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            std::fs::OpenOptions::new().read(true).open(&path).map_err(named)
        }
        other => other.map_err(named),
    }
}

impl DirLock {
    /// Locks `log_dir` through its lock file, kept open in `held` between calls (opened, or
    /// opened again when it has no link: the directory was removed and perhaps made anew, and
    /// a lock on the old file keeps nobody out). `Ok((lock, reopened))`.
    fn take(log_dir: &Path, held: &mut Option<std::sync::Arc<File>>) -> Result<(DirLock, bool), LogError> {
        let mut reopened = false;
        loop {
            let file = match held.take() {
                Some(file) => file,
                None => {
                    reopened = true;
                    std::sync::Arc::new(open_lock_file(log_dir)?)
                }
            };
            let lock = DirLock::flock(log_dir, file)?;
            if link_count(&lock.file)? > 0 {
                *held = Some(lock.file.clone());
                return Ok((lock, reopened));
            }
        }
    }

    fn flock(log_dir: &Path, file: std::sync::Arc<File>) -> Result<DirLock, LogError> {
        let started = std::time::Instant::now();
        loop {
            // SAFETY: flock on a descriptor `file` owns; no memory is passed.
            let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&*file), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(DirLock { file });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) && e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
            if started.elapsed() >= LOCK_WAIT {
                return Err(LogError::Busy { path: log_dir.display().to_string(), seconds: LOCK_WAIT.as_secs() });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The directory's change count now.
    fn count(&self) -> std::io::Result<u64> {
        let mut bytes = [0u8; 8];
        let n = self.file.read_at(&mut bytes, 0)?;
        Ok(if n == 8 { u64::from_le_bytes(bytes) } else { 0 })
    }

    /// Counts a change about to be made (before it is: see [`LOCK_FILE`]); the count after it,
    /// or `None` where this process cannot write the lock file (then it never skips a look).
    fn bump(&self, count: u64) -> std::io::Result<Option<u64>> {
        let next = count.wrapping_add(1);
        match self.file.write_all_at(&next.to_le_bytes(), 0) {
            Ok(()) => Ok(Some(next)),
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: unlocks a descriptor `self.file` owns; closing it would too, but the file stays
        // open for the next append.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&*self.file), libc::LOCK_UN) };
    }
}

/// Says once per process that a log directory's change count cannot be written here.
fn warn_uncounted(log_dir: &Path) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            lock = %log_dir.join(LOCK_FILE).display(),
            "cannot write the chunk log lock file (another user made it): appends here re-read the logs every time, \
             and other writers may not see them at once; give this user write access to it"
        );
    }
}

/// A log this store appends to.
#[derive(Debug)]
struct Writer {
    file: File,
    path: PathBuf,
    offset: u64,
    /// The file is zero-filled up to here: appends below it change no metadata.
    filled: u64,
}

/// How far ahead of the records a log is zero-filled. An append that changes the file's size
/// makes its fdatasync write the inode too (and on ext4, for blocks first written, the block
/// bitmap); one filled ahead writes only the record, as PostgreSQL and pg_receivewal fill WAL
/// segments with zeros before they use them. A reader stops at the zeros.
///
/// The append that fills waits for the zeros to reach the disk: the step is that put's extra
/// latency, paid once per step of records. Measured on this project's test machine (ext4, 1.6 kB
/// appends, each fdatasynced): 1 MiB steps gave a mean of 0.10–0.13 ms per append but
/// 1.3–1.8 ms for the filling one, which landed in the stream's `flush_lag` p99; 64 KiB steps
/// the same mean and at most 0.4 ms.
const FILL_AHEAD: u64 = 64 << 10;
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl Writer {
    /// Zero-fills the file ahead of `end` when the records reach its filled part (made durable
    /// with the record that needed it).
    fn fill_to(&mut self, end: u64) -> std::io::Result<()> {
        if end <= self.filled {
            return Ok(());
        }
        let target = end + FILL_AHEAD;
        let mut at = self.filled.max(self.offset);
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        self.filled = target;
        Ok(())
    }
}

/// The logs of one store: parsed contents (appended to, so read on from where they ended) and,
/// for an appending store, the files it writes.
#[derive(Debug, Default)]
pub(crate) struct Logs {
    state: Mutex<State>,
}

/// A log as last read: its size and modification time then, and what it held.
#[derive(Debug, Default)]
struct Cached {
    size: u64,
    modified: Option<std::time::SystemTime>,
    scanned: Scanned,
}

#[derive(Debug, Default)]
struct State {
    /// By log path.
    parsed: HashMap<PathBuf, Cached>,
    /// By (log directory, segment): the file this store appends to.
    writers: HashMap<(PathBuf, String), Writer>,
    /// By log directory, for appends.
    dirs: HashMap<PathBuf, LogDir>,
}

/// What an appending store keeps of a log directory between appends.
#[derive(Debug, Default)]
struct LogDir {
    /// Its lock file, open.
    lock: Option<std::sync::Arc<File>>,
    /// The change count after this store's last change, while `logs` is exactly what is there.
    seen: Option<u64>,
    /// Its logs (every segment's), sorted, as of `seen`.
    logs: Vec<PathBuf>,
    /// The segments whose logs were all read since the count was `seen`: only their parsed
    /// contents are known to be what is there.
    looked: HashSet<String>,
}

/// How many names the open `file` has (0: its log was removed). Asks for the link count alone:
/// a stat that reads the file's times (as `File::metadata` does) marks them as seen, and the
/// kernel (multigrain timestamps, Linux 6.13+) then gives the next append a fresh fine-grained
/// change time, which makes its fdatasync write the inode too: measured here, a put's fdatasync
/// took about a third longer with a full stat after each append than with this one.
fn link_count(file: &File) -> std::io::Result<u64> {
    // SAFETY: statx on a descriptor `file` owns, with an empty path and AT_EMPTY_PATH, into a
    // zeroed struct on our stack that the kernel fills; no other memory is passed.
    let mut out: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            std::os::fd::AsRawFd::as_raw_fd(file),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_NLINK,
            &mut out,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Only a seccomp profile that refuses statx (older container runtimes) gets the full
        // stat below; any other failure is the answer.
        if !matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) {
            return Err(e);
        }
    } else if out.stx_mask & libc::STATX_NLINK != 0 {
        return Ok(u64::from(out.stx_nlink));
    }
    // Refused, or a filesystem that cannot say: the full stat.
    Ok(file.metadata()?.nlink())
}

/// Whether the log at `path` is one of `segment`'s (`<segment>.<writer>`).
fn of_segment(path: &Path, segment: &str) -> bool {
    path.file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix(segment))
        .is_some_and(|rest| rest.starts_with('.'))
}

/// The logs in `log_dir` of `segment` (all segments when `None`), sorted by file name.
fn log_files(log_dir: &Path, segment: Option<&str>) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(log_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && segment.is_none_or(|s| of_segment(&path, s)) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

impl Logs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Only caches and open files; a panic elsewhere leaves them usable (a writer whose append
        // failed is dropped before anything else happens).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the cached reading of the log at `path` up to date, reading only what was appended
    /// since it was last read; what it holds (`None`: the log is gone). Records read for the
    /// first time are made durable first: a writer killed between its write and its fdatasync
    /// leaves a whole record only in the page cache, which nobody may build on (resume after
    /// it, report it flushed) until it is on disk.
    fn refresh<'s>(state: &'s mut State, path: &Path) -> Result<Option<&'s Scanned>, LogError> {
        match Logs::read_new(state, path) {
            // What was read before the damage still counts; anything else may have left the
            // cached reading half done: read it afresh next time.
            Err(e @ LogError::Io(_)) => {
                state.parsed.remove(path);
                Err(e)
            }
            Err(e) => Err(e),
            Ok(found) => Ok(found.then(|| state.parsed.get(path).map(|c| &c.scanned)).flatten()),
        }
    }

    /// [`Logs::refresh`]'s reading; whether the log is there.
    fn read_new(state: &mut State, path: &Path) -> Result<bool, LogError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                state.parsed.remove(path);
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata()?;
        let (size, modified) = (meta.len(), meta.modified().ok());
        let reusable = state.parsed.get(path).is_some_and(|c| c.scanned.damaged_at.is_none() && c.scanned.end <= size);
        if !reusable {
            state.parsed.remove(path);
        }
        let cached = state.parsed.entry(path.to_path_buf()).or_default();
        let unchanged = cached.size == size && cached.modified == modified;
        // The size says nothing of appends into the zero-filled part: look at where the records
        // ended — zeros there (or nothing) mean nothing was appended since; a torn end read
        // before is read again only once the file changed.
        let fresh = cached.scanned.end == 0 && cached.size == 0;
        let appended = fresh
            || (!(cached.scanned.torn && unchanged) && size >= cached.scanned.end + MAGIC.len() as u64 && {
                let mut probe = [0u8; MAGIC.len()];
                file.read_exact_at(&mut probe, cached.scanned.end)?;
                probe != [0u8; MAGIC.len()]
            });
        if appended {
            let from = cached.scanned.end;
            let len = usize::try_from(size - from)
                .map_err(|_| std::io::Error::other(format!("chunk log {} is too big to read", path.display())))?;
            let mut bytes = vec![0u8; len];
            file.read_exact_at(&mut bytes, from)?;
            let more = scan(&bytes, from);
            if !more.entries.is_empty() {
                file.sync_data()?;
            }
            let scanned = &mut cached.scanned;
            scanned.entries.extend(more.entries);
            scanned.names.extend(more.names);
            scanned.end = more.end;
            scanned.damaged_at = more.damaged_at;
            scanned.torn = more.torn;
            (cached.size, cached.modified) = (size, modified);
        }
        if let Some(offset) = cached.scanned.damaged_at {
            return Err(LogError::Damaged { path: path.display().to_string(), offset });
        }
        Ok(true)
    }

    /// Where the record of `name` (in segment `segment`'s logs under `log_dir`) is: its log and
    /// entry. A damaged log is an error only if the name is not found before the damage.
    pub fn find(&self, log_dir: &Path, segment: &str, name: &str) -> Result<Option<(PathBuf, Entry)>, LogError> {
        let mut state = self.state();
        let mut damage = None;
        for path in log_files(log_dir, Some(segment))? {
            if let Err(e) = Logs::refresh(&mut state, &path) {
                match e {
                    // What was read before the damage still counts.
                    LogError::Damaged { .. } => {
                        damage.get_or_insert(e);
                    }
                    e => return Err(e),
                }
            }
            let held = state
                .parsed
                .get(&path)
                .filter(|c| c.scanned.names.contains(name))
                .and_then(|c| c.scanned.entries.iter().rev().find(|e| e.name == name));
            if let Some(entry) = held {
                return Ok(Some((path, entry.clone())));
            }
        }
        match damage {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Every record in the logs under `log_dir` that may be named `file_prefix`… (a log of a
    /// segment holds names starting with the segment), by name (the first log holding a name
    /// wins). Only those logs are read: damage in one segment's log fails listings of that
    /// segment, not of every other.
    pub fn entries(&self, log_dir: &Path, file_prefix: &str) -> Result<Vec<Entry>, LogError> {
        let mut state = self.state();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let may_hold = |path: &Path| {
            let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let segment = file.split('.').next().unwrap_or_default();
            segment.starts_with(file_prefix) || file_prefix.starts_with(segment)
        };
        for path in log_files(log_dir, None)?.into_iter().filter(|p| may_hold(p)) {
            for entry in Logs::refresh(&mut state, &path)?.map(|s| s.entries.as_slice()).unwrap_or_default() {
                if seen.insert(entry.name.clone()) {
                    out.push(entry.clone());
                }
            }
        }
        Ok(out)
    }

    /// Appends `name`'s record (`data`) to this store's log of `segment` under `log_dir`, making
    /// it durable. `Ok(false)` if a log there holds the name already, or `file_exists` (whether
    /// the name is a file of its own) says yes (nothing written). `file_exists` is asked under
    /// the lock, and only when the directory's change count moved since this store last looked
    /// at the segment: a store that puts a chunk as a file counts it
    /// ([`Logs::lock_for_file_put`]).
    pub fn append(
        &self,
        log_dir: &Path,
        segment: &str,
        name: &str,
        data: &[u8],
        file_exists: impl FnOnce() -> std::io::Result<bool>,
    ) -> Result<bool, LogError> {
        let mut state = self.state();
        let key = (log_dir.to_path_buf(), segment.to_string());
        let mut dir = state.dirs.remove(log_dir).unwrap_or_default();
        let result = Logs::append_locked(&mut state, &mut dir, &key, name, data, file_exists);
        if result.is_err() {
            // Whatever failed, the next append looks at everything again.
            dir.seen = None;
        }
        state.dirs.insert(key.0.clone(), dir);
        result
    }

    fn append_locked(
        state: &mut State,
        dir: &mut LogDir,
        key: &(PathBuf, String),
        name: &str,
        data: &[u8],
        file_exists: impl FnOnce() -> std::io::Result<bool>,
    ) -> Result<bool, LogError> {
        let (log_dir, segment) = (key.0.as_path(), key.1.as_str());
        let (lock, reopened) = match DirLock::take(log_dir, &mut dir.lock) {
            Ok(taken) => taken,
            // The directory went (and our log with it): the retry starts a new log, creating
            // the directories again, as the store does before a segment's first append.
            Err(LogError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                let path = state
                    .writers
                    .remove(key)
                    .map_or_else(|| log_dir.display().to_string(), |w| w.path.display().to_string());
                return Err(LogError::Removed { path });
            }
            Err(e) => return Err(e),
        };
        let count = lock.count()?;
        if reopened && state.writers.contains_key(key) {
            // A new lock file: the directory was removed (and perhaps made anew) under our log.
            // The retry goes the whole way, making and syncing the directories again.
            let path = state.writers.remove(key).map(|w| w.path.display().to_string()).unwrap_or_default();
            return Err(LogError::Removed { path });
        }
        if reopened || dir.seen != Some(count) {
            // Someone else changed the directory (or this store has not looked yet).
            dir.seen = None;
            dir.logs = log_files(log_dir, None)?;
            dir.looked.clear();
        }
        // Nobody changed the directory since this store last looked at the segment: no file of
        // the name came either.
        let files_unchanged = dir.looked.contains(segment);
        let own = state.writers.get(key).map(|w| w.path.clone());
        let unread = |state: &State, p: &PathBuf| own.as_ref() != Some(p) && !state.parsed.contains_key(p);
        let segment_logs: Vec<&PathBuf> = dir.logs.iter().filter(|p| of_segment(p, segment)).collect();
        if !dir.looked.contains(segment) || segment_logs.iter().any(|p| unread(state, p)) {
            // Read what is new in this segment's logs (this store's own holds what it appended,
            // kept in the cache as it goes).
            for path in segment_logs.iter().filter(|p| own.as_ref() != Some(**p)) {
                Logs::refresh(state, path)?;
            }
            if own.as_ref().is_some_and(|own| !segment_logs.contains(&own)) {
                // A delete rewrote or removed it: never append to a file nobody can find.
                if let Some(gone) = state.writers.remove(key) {
                    state.parsed.remove(&gone.path);
                }
            }
            dir.looked.insert(segment.to_string());
        }
        let held = segment_logs.iter().any(|p| state.parsed.get(*p).is_some_and(|c| c.scanned.names.contains(name)))
            || (!files_unchanged && file_exists()?);
        if held {
            dir.seen = Some(count);
            return Ok(false);
        }
        // One count for everything this lock hold changes (a new log and its first record):
        // nobody sees the directory in between. Where this process cannot write the count, it
        // never trusts it.
        let counted = lock.bump(count)?;
        if counted.is_none() {
            warn_uncounted(log_dir);
        }
        if !state.writers.contains_key(key) {
            let writer = Logs::open_writer(log_dir, segment)?;
            let at = dir.logs.binary_search(&writer.path).unwrap_or_else(|i| i);
            dir.logs.insert(at, writer.path.clone());
            state.writers.insert(key.clone(), writer);
        }
        let record = encode(name, data);
        let Some(writer) = state.writers.get_mut(key) else { return Err(std::io::Error::other("no writer").into()) };
        let end = writer.offset + record.len() as u64;
        let written = writer
            .fill_to(end)
            .and_then(|()| writer.file.write_all_at(&record, writer.offset))
            .and_then(|()| writer.file.sync_data())
            .and_then(|()| link_count(&writer.file));
        match written {
            Ok(links) if links > 0 => {
                let entry = Entry {
                    name: name.to_string(),
                    data_at: writer.offset + (HEADER + name.len()) as u64,
                    len: data.len() as u64,
                };
                writer.offset += record.len() as u64;
                let (path, end) = (writer.path.clone(), writer.offset);
                let cached = state.parsed.entry(path).or_default();
                cached.scanned.names.insert(entry.name.clone());
                cached.scanned.entries.push(entry);
                cached.scanned.end = end;
                dir.seen = counted;
                Ok(true)
            }
            Ok(_) => {
                // Removed by hand (a pitr delete would have shown in the count).
                let path = writer.path.display().to_string();
                state.writers.remove(key);
                Err(LogError::Removed { path })
            }
            Err(e) => {
                // Never append after a failed write: what it left may be part of a record. Cut
                // it off if we can (it would read as a torn end anyway).
                let _ = writer.file.set_len(writer.offset);
                if writer.offset == 0 {
                    // Nothing in it: not a log for readers to open on every listing.
                    let _ = std::fs::remove_file(&writer.path);
                }
                state.writers.remove(key);
                Err(e.into())
            }
        }
    }

    /// Counts a put of a chunk as a file of its own (by a store that does not append) as a
    /// change of `log_dir`, the log directory beside it, under its lock, held until the returned
    /// lock drops: appenders look for such a file only when the count moved. `None` where there
    /// is no log directory (nobody appends there yet, and an appender's first append to a
    /// segment always looks).
    pub fn lock_for_file_put(&self, log_dir: &Path) -> Result<Option<DirLock>, LogError> {
        let lock = match DirLock::take(log_dir, &mut None) {
            Err(LogError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            taken => taken?.0,
        };
        if lock.bump(lock.count()?)?.is_none() {
            warn_uncounted(log_dir);
        }
        Ok(Some(lock))
    }

    /// Whether this store appends to a log of `segment` under `log_dir` already.
    pub fn has_writer(&self, log_dir: &Path, segment: &str) -> bool {
        self.state().writers.contains_key(&(log_dir.to_path_buf(), segment.to_string()))
    }

    /// A new log of `segment` in `log_dir` (which exists) with a name no other writer has.
    fn open_writer(log_dir: &Path, segment: &str) -> std::io::Result<Writer> {
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        let path = log_dir.join(format!("{segment}.{}", hex::encode(id)));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        // The new file's name must survive a crash before anything in it is acknowledged.
        crate::store::sync_dir(log_dir)?;
        Ok(Writer { file, path, offset: 0, filled: 0 })
    }

    /// Deletes the records of `names` (each `(segment, name)`) under `log_dir`: a log left with
    /// none is unlinked, one left with some is written anew without them first. Names in no log
    /// are no error.
    pub fn delete(&self, log_dir: &Path, names: &[(&str, &str)]) -> Result<(), LogError> {
        let mut state = self.state();
        let mut dir = state.dirs.remove(log_dir).unwrap_or_default();
        let taken = DirLock::take(log_dir, &mut dir.lock);
        state.dirs.insert(log_dir.to_path_buf(), dir);
        let lock = match taken {
            Ok((lock, _)) => lock,
            Err(LogError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // Counted before anything changes (whether or not something will): appenders look
        // again.
        lock.bump(lock.count()?)?;
        // A rewrite's temporary file is only ever there while its deleter holds the lock: one
        // found now is from a delete that crashed.
        for entry in std::fs::read_dir(log_dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp.") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut by_segment: HashMap<&str, HashSet<&str>> = HashMap::new();
        for (segment, name) in names {
            by_segment.entry(segment).or_default().insert(name);
        }
        let mut changed = false;
        for (segment, gone) in by_segment {
            for path in log_files(log_dir, Some(segment))? {
                let Some(scanned) = Logs::refresh(&mut state, &path)?.cloned() else { continue };
                let own = state.writers.values().any(|w| w.path == path);
                // A log with no record (its writer died before its first append landed) goes
                // with its segment's deletes.
                let empty = scanned.entries.is_empty() && !own;
                if !empty && !scanned.entries.iter().any(|e| gone.contains(e.name.as_str())) {
                    continue;
                }
                let keep: Vec<&Entry> = scanned.entries.iter().filter(|e| !gone.contains(e.name.as_str())).collect();
                if !keep.is_empty() {
                    Logs::rewrite(&path, log_dir, segment, &keep)?;
                }
                // This store's own appends go to a new log from now on.
                state.writers.retain(|_, w| w.path != path);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                state.parsed.remove(&path);
                changed = true;
            }
        }
        if changed {
            crate::store::sync_dir(log_dir)?;
        }
        Ok(())
    }

    /// Writes `keep` (records of the log at `from`) into a new log of `segment`, durably.
    /// Under a temporary name first, renamed once whole and durable: a crash during the copy
    /// leaves a `.tmp.` file (never read, removed by the next delete), not a log whose middle
    /// may be torn.
    fn rewrite(from: &Path, log_dir: &Path, segment: &str, keep: &[&Entry]) -> Result<(), LogError> {
        let source = File::open(from)?;
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        let id = hex::encode(id);
        let tmp = log_dir.join(format!(".tmp.{segment}.{id}"));
        let copied = (|| -> std::io::Result<()> {
            let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            let mut offset = 0u64;
            for entry in keep {
                let len = usize::try_from(entry.len).map_err(|_| std::io::Error::other("record too big"))?;
                let mut data = vec![0u8; len];
                source.read_exact_at(&mut data, entry.data_at)?;
                let record = encode(&entry.name, &data);
                file.write_all_at(&record, offset)?;
                offset += record.len() as u64;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, log_dir.join(format!("{segment}.{id}")))?;
            // The new log's name durable before the old one's unlink can be.
            crate::store::sync_dir(log_dir)
        })();
        if copied.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(copied?)
    }

    /// Reads `range` of the data of `entry` in the log at `path`.
    pub fn read_data(path: &Path, entry: &Entry, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
        let start = range.start.min(entry.len);
        let end = range.end.min(entry.len).max(start);
        let mut out = vec![0u8; usize::try_from(end - start).map_err(|_| std::io::Error::other("range too big"))?];
        File::open(path)?.read_exact_at(&mut out, entry.data_at + start)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For appends where no file of the name can exist.
    fn no_file() -> std::io::Result<bool> {
        Ok(false)
    }

    const CHUNK: &str = "pg/7/wal/000000010000000000000003.00000000-00002000.chunk";

    #[test]
    fn only_wal_chunks_have_a_log() {
        assert_eq!(group_of(CHUNK), Some(("pg/7/wal", "000000010000000000000003")));
        for other in [
            "pg/7/wal/000000010000000000000003.seg",
            "pg/7/wal/00000002.history",
            "pg/7/blocks/ab/abcdef",
            "pg/x/wal/000000010000000000000003.00000000-00002000.chunk",
            "pg/7/wal/sub/000000010000000000000003.00000000-00002000.chunk",
            "000000010000000000000003.00000000-00002000.chunk",
        ] {
            assert_eq!(group_of(other), None, "{other}");
        }
    }

    #[test]
    fn records_read_back_and_a_torn_end_is_not_a_record() {
        let mut log = encode("pg/7/wal/a", b"first");
        log.extend(encode("pg/7/wal/b", b"second"));
        let whole = log.len() as u64;
        let s = scan(&log, 0);
        assert_eq!(s.entries.len(), 2);
        assert_eq!((s.end, s.damaged_at), (whole, None));
        let b = &s.entries[1];
        assert_eq!(&log[b.data_at as usize..(b.data_at + b.len) as usize], b"second");
        // Every cut of a third append reads as the two before it.
        let third = encode("pg/7/wal/c", b"third!");
        for cut in 0..third.len() {
            let mut torn = log.clone();
            torn.extend_from_slice(&third[..cut]);
            let s = scan(&torn, 0);
            assert_eq!((s.entries.len(), s.end, s.damaged_at), (2, whole, None), "cut at {cut}");
        }
        // Read on from an offset: the same records, at the same places.
        let first_len = encode("pg/7/wal/a", b"first").len();
        let s = scan(&log[first_len..], first_len as u64);
        assert_eq!(s.entries[0].data_at, b.data_at);
    }

    #[test]
    fn a_bad_record_with_whole_records_after_it_is_damage() {
        let mut log = encode("pg/7/wal/a", b"first");
        let at = log.len();
        log.extend(encode("pg/7/wal/b", b"second"));
        log.extend(encode("pg/7/wal/c", b"third"));
        for flip in at..at + HEADER + 10 {
            let mut bad = log.clone();
            bad[flip] ^= 0x40;
            let s = scan(&bad, 0);
            assert_eq!(s.damaged_at, Some(at as u64), "flip at {flip}");
            assert_eq!(s.entries.len(), 1);
        }
        // A header zeroed (a lost write) hides nothing either: the records after it are seen.
        let mut zeroed = log.clone();
        zeroed[at..at + HEADER].fill(0);
        assert_eq!(scan(&zeroed, 0).damaged_at, Some(at as u64));
        // Zeros after the records (a preallocated or extended file) are an end, not damage.
        let mut padded = log.clone();
        padded.extend(std::iter::repeat_n(0u8, 4096));
        assert_eq!(scan(&padded, 0).damaged_at, None);
    }

    #[test]
    fn random_bytes_never_panic_and_never_make_records() {
        let mut x = 0x9e3779b97f4a7c15u64;
        for round in 0..200 {
            let mut bytes = Vec::new();
            for _ in 0..(round * 7) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            if round % 3 == 0 {
                bytes.splice(0..0, MAGIC);
            }
            assert!(scan(&bytes, 0).entries.is_empty());
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, Logs) {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("pg/7/wal").join(LOG_DIR);
        std::fs::create_dir_all(&log_dir).unwrap();
        (dir, log_dir, Logs::default())
    }

    /// An appender asks whether the name is a file of its own only when the directory changed
    /// since it last looked at the segment: at its first append there, and after another
    /// store's counted file put (a file found: nothing appended); never between its own appends.
    #[test]
    fn an_appender_looks_for_a_file_of_the_name_only_when_the_count_moved() {
        let (dir, log_dir, logs) = setup();
        let asked = std::cell::Cell::new(0);
        let ask = |answer: bool| {
            let asked = &asked;
            move || {
                asked.set(asked.get() + 1);
                Ok(answer)
            }
        };
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", ask(false)).unwrap());
        assert_eq!(asked.get(), 1, "the first append to the segment looks");
        for i in 2..5 {
            assert!(logs.append(&log_dir, "seg1", &format!("pg/7/wal/x{i}"), b"more", ask(false)).unwrap());
        }
        assert_eq!(asked.get(), 1, "its own appends change nothing it does not know");
        assert!(logs.append(&log_dir, "seg2", "pg/7/wal/y1", b"other", ask(false)).unwrap());
        assert_eq!(asked.get(), 2, "another segment's first append looks");

        let lock = Logs::default().lock_for_file_put(&log_dir).unwrap().expect("a log directory is there");
        drop(lock);
        assert!(!logs.append(&log_dir, "seg1", "pg/7/wal/x5", b"five", ask(true)).unwrap(), "a file holds the name");
        assert_eq!(asked.get(), 3, "a counted file put makes it look");
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x6", b"six", ask(false)).unwrap());
        assert_eq!(asked.get(), 3, "nothing changed since");
        assert!(!logs.entries(&log_dir, "").unwrap().iter().any(|e| e.name == "pg/7/wal/x5"), "x5 was not appended");

        let no_logs = dir.path().join("pg/8/wal").join(LOG_DIR);
        assert!(Logs::default().lock_for_file_put(&no_logs).unwrap().is_none(), "no log directory, no lock");
        assert!(!no_logs.exists(), "nothing made");
    }

    #[test]
    fn appends_are_found_once_and_a_second_writer_sees_them() {
        let (_dir, log_dir, logs) = setup();
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap());
        assert!(!logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap(), "put-if-absent");
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x2", b"two", no_file).unwrap());
        // Another process (a fresh `Logs`) sees both and does not append a name already there.
        let other = Logs::default();
        let (path, entry) = other.find(&log_dir, "seg1", "pg/7/wal/x2").unwrap().unwrap();
        assert_eq!(Logs::read_data(&path, &entry, 0..u64::MAX).unwrap(), b"two");
        assert_eq!(Logs::read_data(&path, &entry, 1..2).unwrap(), b"w");
        assert!(!other.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap());
        assert!(other.append(&log_dir, "seg1", "pg/7/wal/x3", b"three", no_file).unwrap());
        // An append into the zero-filled part (the file's size unchanged) is seen by a reader
        // that read the log before it.
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        let before = size(&path);
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x4", b"four", no_file).unwrap());
        assert_eq!(size(&path), before, "appended within the fill");
        let (_, entry) = other.find(&log_dir, "seg1", "pg/7/wal/x4").unwrap().expect("seen by the earlier reader");
        assert_eq!(Logs::read_data(&path, &entry, 0..9).unwrap(), b"four");
        assert_eq!(log_files(&log_dir, Some("seg1")).unwrap().len(), 2, "one file per writer");
        let names: Vec<String> = logs.entries(&log_dir, "").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names.len(), 4);
        assert!(logs.find(&log_dir, "seg2", "pg/7/wal/x1").unwrap().is_none(), "by segment");
    }

    #[test]
    fn deletes_rewrite_or_unlink_and_the_writer_moves_on() {
        let (_dir, log_dir, logs) = setup();
        for i in 0..4 {
            logs.append(&log_dir, "seg1", &format!("pg/7/wal/x{i}"), format!("data{i}").as_bytes(), no_file).unwrap();
        }
        logs.delete(&log_dir, &[("seg1", "pg/7/wal/x1"), ("seg1", "pg/7/wal/nothing")]).unwrap();
        let names: Vec<String> = Logs::default().entries(&log_dir, "").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["pg/7/wal/x0", "pg/7/wal/x2", "pg/7/wal/x3"]);
        // The writer's file was replaced: the next append goes to a new file and is found.
        logs.append(&log_dir, "seg1", "pg/7/wal/x4", b"data4", no_file).unwrap();
        let (path, entry) = Logs::default().find(&log_dir, "seg1", "pg/7/wal/x2").unwrap().unwrap();
        assert_eq!(Logs::read_data(&path, &entry, 0..99).unwrap(), b"data2");
        let all: Vec<(&str, String)> = (0..5).map(|i| ("seg1", format!("pg/7/wal/x{i}"))).collect();
        let all: Vec<(&str, &str)> = all.iter().map(|(s, n)| (*s, n.as_str())).collect();
        logs.delete(&log_dir, &all).unwrap();
        assert!(log_files(&log_dir, None).unwrap().is_empty());
    }

    #[test]
    fn a_log_removed_under_a_writer_fails_its_next_put_and_the_retry_lands() {
        let (_dir, log_dir, logs) = setup();
        logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap();
        let first = logs.find(&log_dir, "seg1", "pg/7/wal/x1").unwrap().unwrap().0;
        // Another process deletes everything in it: its count tells the writer before it
        // writes, and the next append goes to a new log.
        Logs::default().delete(&log_dir, &[("seg1", "pg/7/wal/x1")]).unwrap();
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x2", b"two", no_file).unwrap());
        let second = Logs::default().find(&log_dir, "seg1", "pg/7/wal/x2").unwrap().unwrap().0;
        assert_ne!(first, second);
        // Removed by hand (no count moves): the put that wrote into the unlinked file fails,
        // and its retry lands.
        std::fs::remove_file(&second).unwrap();
        assert!(matches!(
            logs.append(&log_dir, "seg1", "pg/7/wal/x3", b"three", no_file),
            Err(LogError::Removed { .. })
        ));
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x3", b"three", no_file).unwrap());
        assert!(Logs::default().find(&log_dir, "seg1", "pg/7/wal/x3").unwrap().is_some());
    }

    /// The count says nothing changed since this store's last append, but that append looked at
    /// another segment's logs only: a name another writer appended to this segment meanwhile is
    /// still refused.
    #[test]
    fn a_look_at_one_segment_does_not_vouch_for_another() {
        let (_dir, log_dir, logs) = setup();
        let other = Logs::default();
        assert!(logs.append(&log_dir, "seg2", "pg/7/wal/seg2-a", b"a", no_file).unwrap());
        assert!(other.append(&log_dir, "seg2", "pg/7/wal/seg2-x", b"x", no_file).unwrap());
        // Reads the other writer's log as it is now.
        assert!(logs.append(&log_dir, "seg2", "pg/7/wal/seg2-b", b"b", no_file).unwrap());
        assert!(other.append(&log_dir, "seg2", "pg/7/wal/seg2-y", b"y", no_file).unwrap());
        // The count moved: this look reads seg1's logs, and leaves the count where it is now.
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/seg1-a", b"a", no_file).unwrap());
        assert!(!logs.append(&log_dir, "seg2", "pg/7/wal/seg2-y", b"mine", no_file).unwrap());
    }

    /// The directory removed and made anew under an open log: the next append fails (its retry,
    /// through the store, makes and syncs the directories again) and the one after lands.
    #[test]
    fn a_log_directory_made_anew_under_a_writer_fails_its_next_append() {
        let (_dir, log_dir, logs) = setup();
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap());
        std::fs::remove_dir_all(&log_dir).unwrap();
        std::fs::create_dir(&log_dir).unwrap();
        assert!(matches!(logs.append(&log_dir, "seg1", "pg/7/wal/x2", b"two", no_file), Err(LogError::Removed { .. })));
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x2", b"two", no_file).unwrap());
        assert!(Logs::default().find(&log_dir, "seg1", "pg/7/wal/x2").unwrap().is_some());
    }

    /// A directory planted where the lock file goes fails every append with an error naming it,
    /// and nothing is written.
    #[test]
    fn a_lock_file_that_cannot_be_opened_fails_appends_naming_it() {
        let (_dir, log_dir, logs) = setup();
        std::fs::create_dir_all(log_dir.join(LOCK_FILE)).unwrap();
        let err = logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap_err().to_string();
        assert!(err.contains("lock file") && err.contains(LOCK_FILE), "{err}");
        assert!(log_files(&log_dir, None).unwrap().is_empty(), "a log was made");
        assert!(Logs::default().find(&log_dir, "seg1", "pg/7/wal/x1").unwrap().is_none());
    }

    /// A lock file this process may only read (another user's) still locks; its count is never
    /// written, and the appender says it cannot count rather than fail.
    #[test]
    fn a_lock_file_open_only_for_reading_locks_but_does_not_count() {
        let (_dir, log_dir, logs) = setup();
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap());
        let read_only = std::sync::Arc::new(File::open(log_dir.join(LOCK_FILE)).unwrap());
        let lock = DirLock::flock(&log_dir, read_only).unwrap();
        let count = lock.count().unwrap();
        assert_eq!(lock.bump(count).unwrap(), None);
        assert_eq!(lock.count().unwrap(), count);
    }

    /// An appender that finds the directory's count where its own last change left it reads
    /// nothing again; any other process's change (a new log, an append, a delete) moves the
    /// count, and put-if-absent sees it.
    #[test]
    fn the_change_count_lets_an_appender_skip_its_look_only_while_nobody_else_changed_anything() {
        let (_dir, log_dir, logs) = setup();
        let other = Logs::default();
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap());
        let count = |l: &Logs| l.state().dirs.get(&log_dir).and_then(|d| d.seen);
        let after_first = count(&logs).expect("an append leaves the count it saw");
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x2", b"two", no_file).unwrap());
        assert_eq!(count(&logs), Some(after_first + 1), "one bump per append, no look needed");
        // Another writer's new log and record, then the same name from us: refused.
        assert!(other.append(&log_dir, "seg1", "pg/7/wal/x3", b"three", no_file).unwrap());
        assert!(!logs.append(&log_dir, "seg1", "pg/7/wal/x3", b"mine", no_file).unwrap());
        // Another append into that writer's existing log (no new file): seen too.
        assert!(other.append(&log_dir, "seg1", "pg/7/wal/x4", b"four", no_file).unwrap());
        assert!(!logs.append(&log_dir, "seg1", "pg/7/wal/x4", b"mine", no_file).unwrap());
        // The lock file is no log.
        assert!(log_dir.join(LOCK_FILE).is_file());
        assert_eq!(other.entries(&log_dir, "").unwrap().len(), 4);
    }

    #[test]
    fn a_damaged_log_fails_listing_but_not_names_before_the_damage() {
        let (_dir, log_dir, logs) = setup();
        for i in 0..3 {
            logs.append(&log_dir, "seg1", &format!("pg/7/wal/x{i}"), b"data", no_file).unwrap();
        }
        let path = log_files(&log_dir, None).unwrap().remove(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = encode("pg/7/wal/x0", b"data").len();
        bytes[second + HEADER + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let fresh = Logs::default();
        let err = fresh.entries(&log_dir, "").unwrap_err().to_string();
        assert!(err.contains("damaged at offset") && err.contains(&path.display().to_string()), "{err}");
        assert!(fresh.find(&log_dir, "seg1", "pg/7/wal/x0").unwrap().is_some());
        assert!(fresh.find(&log_dir, "seg1", "pg/7/wal/x2").is_err());
    }

    /// Two processes (two `Logs`) appending and deleting in one segment's log at once: every
    /// name is created once, and no acknowledged record that was not deleted is lost.
    #[test]
    fn appends_and_deletes_of_two_processes_do_not_interleave() {
        let (_dir, log_dir, a) = setup();
        let b = Logs::default();
        let names: Vec<String> = (0..300).map(|i| format!("pg/7/wal/n{i:04}")).collect();
        let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
        let racing = |logs: std::sync::Arc<Logs>, names: Vec<String>| {
            let log_dir = log_dir.clone();
            std::thread::spawn(move || {
                let mut created = Vec::new();
                for (i, name) in names.iter().enumerate() {
                    match logs.append(&log_dir, "seg1", name, name.as_bytes(), no_file) {
                        Ok(true) => created.push(name.clone()),
                        Ok(false) => {}
                        Err(LogError::Removed { .. }) => {
                            if logs.append(&log_dir, "seg1", name, name.as_bytes(), no_file).unwrap() {
                                created.push(name.clone());
                            }
                        }
                        Err(e) => panic!("{e}"),
                    }
                    // Every tenth put, delete a name put earlier: a rewrite under the other's feet.
                    if i % 10 == 9 {
                        logs.delete(&log_dir, &[("seg1", names[i - 9].as_str())]).unwrap();
                    }
                }
                created
            })
        };
        let ta = racing(a.clone(), names.clone());
        let tb = racing(b.clone(), names.clone());
        let (ca, cb) = (ta.join().unwrap(), tb.join().unwrap());
        // A deleted name may be put again (and created again); every other name once.
        let deleted: HashSet<&str> = (0..300).filter(|i| i % 10 == 0).map(|i| names[i].as_str()).collect();
        let mut all: Vec<&String> = ca.iter().chain(cb.iter()).filter(|n| !deleted.contains(n.as_str())).collect();
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len(), "a name created twice");
        assert_eq!(all.len(), 270);
        let held: HashSet<String> =
            Logs::default().entries(&log_dir, "").unwrap().into_iter().map(|e| e.name).collect();
        for name in all.iter().filter(|n| !deleted.contains(n.as_str())) {
            assert!(held.contains(*name), "{name} was acknowledged and is gone");
        }
    }

    /// A process that holds the directory's lock (paused) makes appends fail after a bound,
    /// never hang; a rewrite's leftover temporary file is never read and goes with a delete.
    #[test]
    fn a_held_lock_fails_appends_in_bounded_time_and_leftovers_are_swept() {
        let (_dir, log_dir, logs) = setup();
        logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one", no_file).unwrap();
        let (held, _) = DirLock::take(&log_dir, &mut None).unwrap();
        let started = std::time::Instant::now();
        // Another process: a fresh open file description, so the flock conflicts.
        let err = Logs::default().append(&log_dir, "seg1", "pg/7/wal/x2", b"two", no_file).unwrap_err();
        assert!(matches!(err, LogError::Busy { .. }), "{err}");
        assert!(started.elapsed() < LOCK_WAIT * 3);
        drop(held);
        let tmp = log_dir.join(".tmp.seg1.0123");
        std::fs::write(&tmp, encode("pg/7/wal/x9", b"nine")).unwrap();
        assert!(logs.find(&log_dir, "seg1", "pg/7/wal/x9").unwrap().is_none());
        logs.delete(&log_dir, &[("seg1", "pg/7/wal/x1")]).unwrap();
        assert!(!tmp.exists());
    }
}
