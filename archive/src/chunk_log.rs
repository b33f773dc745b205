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
//! - A writer never appends after a failed write: the file is left and the next put opens a new
//!   one. So only a file's last record can be torn (by a crash before its fdatasync returned, i.e.
//!   before anyone was told it exists), and a reader takes a last record that does not check as
//!   never written. A record that does not check with a whole record after it is damage: listing
//!   the directory fails, naming the file and the offset.
//! - After its fdatasync the writer checks the file still has a link: a delete that removed the
//!   log meanwhile makes the put fail (and be retried into a new file), never succeed unseen.
//! - A delete that leaves some of a log's records writes them to a new log first and then unlinks
//!   the old one; a delete of all of them unlinks it.
//!
//! What it does not cover: a last record damaged after it was acknowledged reads as never
//! written (as a torn end of PostgreSQL's own WAL would); the journal (`[journal]`) names an
//! object that went missing that way.

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
    let mut parts = dir.split('/');
    let (Some("pg"), Some(id), Some("wal"), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let system_id: u64 = id.parse().ok()?;
    match pg::parse_wal(system_id, name)? {
        WalName::Chunk { segment_file, .. } => Some((dir, segment_file)),
        _ => None,
    }
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
    /// The offset of a record that does not check although a whole record follows it.
    pub damaged_at: Option<u64>,
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
            None if bytes[at..].iter().take(MAGIC.len()).all(|&b| b == 0) => {
                // The zeros a writer fills ahead with (or a file's end): nothing more yet.
                break;
            }
            None => {
                // A torn last append, or damage if any whole record follows.
                let rest = &bytes[at + 1..];
                let follows = (0..rest.len().saturating_sub(MAGIC.len() - 1))
                    .filter(|&i| rest[i..i + MAGIC.len()] == MAGIC)
                    .any(|i| parse_one(&rest[i..]).is_some());
                if follows {
                    out.damaged_at = Some(base + at as u64);
                }
                break;
            }
        }
    }
    out
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
const FILL_AHEAD: u64 = 1 << 20;
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

#[derive(Debug, Default)]
struct State {
    /// By log path: the file's size when read, and what it held.
    parsed: HashMap<PathBuf, (u64, Scanned)>,
    /// By (log directory, segment): the file this store appends to.
    writers: HashMap<(PathBuf, String), Writer>,
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
        let name = entry.file_name().to_string_lossy().into_owned();
        let of_segment = match segment {
            Some(s) => name.strip_prefix(s).is_some_and(|rest| rest.starts_with('.')),
            None => true,
        };
        if of_segment && !name.starts_with(".tmp.") {
            out.push(entry.path());
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
    /// since it was last read; what it holds (`None`: the log is gone).
    fn refresh<'s>(state: &'s mut State, path: &Path) -> Result<Option<&'s Scanned>, LogError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                state.parsed.remove(path);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let size = file.metadata()?.len();
        let reusable = state.parsed.get(path).is_some_and(|(_, s)| s.damaged_at.is_none() && s.end <= size);
        if !reusable {
            state.parsed.remove(path);
        }
        let (was, scanned) = state.parsed.entry(path.to_path_buf()).or_default();
        // The size says nothing of appends into the zero-filled part: look at where the records
        // ended — zeros there (or nothing) mean nothing was appended since.
        let mut probe = [0u8; MAGIC.len()];
        let fresh = scanned.end == 0 && *was == 0;
        let appended = fresh
            || (size >= scanned.end + MAGIC.len() as u64
                && file.read_exact_at(&mut probe, scanned.end).is_ok()
                && probe != [0u8; MAGIC.len()]);
        if appended {
            let from = scanned.end;
            let mut bytes = vec![0u8; usize::try_from(size - from).map_err(|_| std::io::Error::other("log too big"))?];
            file.read_exact_at(&mut bytes, from)?;
            let more = scan(&bytes, from);
            scanned.entries.extend(more.entries);
            scanned.names.extend(more.names);
            scanned.end = more.end;
            scanned.damaged_at = more.damaged_at;
            *was = size;
        }
        if let Some(offset) = scanned.damaged_at {
            return Err(LogError::Damaged { path: path.display().to_string(), offset });
        }
        Ok(Some(scanned))
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
                .filter(|(_, s)| s.names.contains(name))
                .and_then(|(_, s)| s.entries.iter().rev().find(|e| e.name == name));
            if let Some(entry) = held {
                return Ok(Some((path, entry.clone())));
            }
        }
        match damage {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Every record in the logs under `log_dir`, by name (the first log holding a name wins).
    pub fn entries(&self, log_dir: &Path) -> Result<Vec<Entry>, LogError> {
        let mut state = self.state();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for path in log_files(log_dir, None)? {
            for entry in Logs::refresh(&mut state, &path)?.map(|s| s.entries.as_slice()).unwrap_or_default() {
                if seen.insert(entry.name.clone()) {
                    out.push(entry.clone());
                }
            }
        }
        Ok(out)
    }

    /// Appends `name`'s record (`data`) to this store's log of `segment` under `log_dir`, making
    /// it durable. `Ok(false)` if a log there holds the name already (nothing written).
    pub fn append(&self, log_dir: &Path, segment: &str, name: &str, data: &[u8]) -> Result<bool, LogError> {
        let mut state = self.state();
        let key = (log_dir.to_path_buf(), segment.to_string());
        let own = state.writers.get(&key).map(|w| w.path.clone());
        for path in log_files(log_dir, Some(segment))? {
            // This store's own log holds what it appended (kept in the cache as it goes): not
            // read back on every put.
            let scanned = match state.parsed.get(&path) {
                Some((_, s)) if own.as_ref() == Some(&path) => Some(s),
                _ => Logs::refresh(&mut state, &path)?,
            };
            if scanned.is_some_and(|s| s.names.contains(name)) {
                return Ok(false);
            }
        }
        if !state.writers.contains_key(&key) {
            let writer = Logs::open_writer(log_dir, segment)?;
            state.writers.insert(key.clone(), writer);
        }
        let record = encode(name, data);
        let Some(writer) = state.writers.get_mut(&key) else { return Err(std::io::Error::other("no writer").into()) };
        let end = writer.offset + record.len() as u64;
        let written = writer
            .fill_to(end)
            .and_then(|()| writer.file.write_all_at(&record, writer.offset))
            .and_then(|()| writer.file.sync_data())
            .and_then(|()| writer.file.metadata());
        match written {
            Ok(meta) if meta.nlink() > 0 => {
                let entry = Entry {
                    name: name.to_string(),
                    data_at: writer.offset + (HEADER + name.len()) as u64,
                    len: data.len() as u64,
                };
                writer.offset += record.len() as u64;
                let (path, end) = (writer.path.clone(), writer.offset);
                let (size, scanned) = state.parsed.entry(path).or_default();
                scanned.names.insert(entry.name.clone());
                scanned.entries.push(entry);
                scanned.end = end;
                *size = end;
                Ok(true)
            }
            Ok(_) => {
                let path = writer.path.display().to_string();
                state.writers.remove(&key);
                Err(LogError::Removed { path })
            }
            Err(e) => {
                // Never append after a failed write: what it left may be part of a record. Cut
                // it off if we can (it would read as a torn end anyway).
                let _ = writer.file.set_len(writer.offset);
                state.writers.remove(&key);
                Err(e.into())
            }
        }
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
        let mut by_segment: HashMap<&str, HashSet<&str>> = HashMap::new();
        for (segment, name) in names {
            by_segment.entry(segment).or_default().insert(name);
        }
        let mut changed = false;
        for (segment, gone) in by_segment {
            for path in log_files(log_dir, Some(segment))? {
                let Some(scanned) = Logs::refresh(&mut state, &path)?.cloned() else { continue };
                if !scanned.entries.iter().any(|e| gone.contains(e.name.as_str())) {
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
    fn rewrite(from: &Path, log_dir: &Path, segment: &str, keep: &[&Entry]) -> Result<(), LogError> {
        let source = File::open(from)?;
        let mut writer = Logs::open_writer(log_dir, segment)?;
        for entry in keep {
            let mut data = vec![0u8; usize::try_from(entry.len).map_err(|_| std::io::Error::other("record too big"))?];
            source.read_exact_at(&mut data, entry.data_at)?;
            let record = encode(&entry.name, &data);
            writer.file.write_all_at(&record, writer.offset)?;
            writer.offset += record.len() as u64;
        }
        writer.file.sync_all()?;
        Ok(())
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

    #[test]
    fn appends_are_found_once_and_a_second_writer_sees_them() {
        let (_dir, log_dir, logs) = setup();
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one").unwrap());
        assert!(!logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one").unwrap(), "put-if-absent");
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x2", b"two").unwrap());
        // Another process (a fresh `Logs`) sees both and does not append a name already there.
        let other = Logs::default();
        let (path, entry) = other.find(&log_dir, "seg1", "pg/7/wal/x2").unwrap().unwrap();
        assert_eq!(Logs::read_data(&path, &entry, 0..u64::MAX).unwrap(), b"two");
        assert_eq!(Logs::read_data(&path, &entry, 1..2).unwrap(), b"w");
        assert!(!other.append(&log_dir, "seg1", "pg/7/wal/x1", b"one").unwrap());
        assert!(other.append(&log_dir, "seg1", "pg/7/wal/x3", b"three").unwrap());
        // An append into the zero-filled part (the file's size unchanged) is seen by a reader
        // that read the log before it.
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        let before = size(&path);
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x4", b"four").unwrap());
        assert_eq!(size(&path), before, "appended within the fill");
        let (_, entry) = other.find(&log_dir, "seg1", "pg/7/wal/x4").unwrap().expect("seen by the earlier reader");
        assert_eq!(Logs::read_data(&path, &entry, 0..9).unwrap(), b"four");
        assert_eq!(log_files(&log_dir, Some("seg1")).unwrap().len(), 2, "one file per writer");
        let names: Vec<String> = logs.entries(&log_dir).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names.len(), 4);
        assert!(logs.find(&log_dir, "seg2", "pg/7/wal/x1").unwrap().is_none(), "by segment");
    }

    #[test]
    fn deletes_rewrite_or_unlink_and_the_writer_moves_on() {
        let (_dir, log_dir, logs) = setup();
        for i in 0..4 {
            logs.append(&log_dir, "seg1", &format!("pg/7/wal/x{i}"), format!("data{i}").as_bytes()).unwrap();
        }
        logs.delete(&log_dir, &[("seg1", "pg/7/wal/x1"), ("seg1", "pg/7/wal/nothing")]).unwrap();
        let names: Vec<String> = Logs::default().entries(&log_dir).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["pg/7/wal/x0", "pg/7/wal/x2", "pg/7/wal/x3"]);
        // The writer's file was replaced: the next append goes to a new file and is found.
        logs.append(&log_dir, "seg1", "pg/7/wal/x4", b"data4").unwrap();
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
        logs.append(&log_dir, "seg1", "pg/7/wal/x1", b"one").unwrap();
        // Another process deletes everything in it.
        Logs::default().delete(&log_dir, &[("seg1", "pg/7/wal/x1")]).unwrap();
        assert!(matches!(logs.append(&log_dir, "seg1", "pg/7/wal/x2", b"two"), Err(LogError::Removed { .. })));
        assert!(logs.append(&log_dir, "seg1", "pg/7/wal/x2", b"two").unwrap());
        assert!(Logs::default().find(&log_dir, "seg1", "pg/7/wal/x2").unwrap().is_some());
    }

    #[test]
    fn a_damaged_log_fails_listing_but_not_names_before_the_damage() {
        let (_dir, log_dir, logs) = setup();
        for i in 0..3 {
            logs.append(&log_dir, "seg1", &format!("pg/7/wal/x{i}"), b"data").unwrap();
        }
        let path = log_files(&log_dir, None).unwrap().remove(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = encode("pg/7/wal/x0", b"data").len();
        bytes[second + HEADER + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let fresh = Logs::default();
        let err = fresh.entries(&log_dir).unwrap_err().to_string();
        assert!(err.contains("damaged at offset") && err.contains(&path.display().to_string()), "{err}");
        assert!(fresh.find(&log_dir, "seg1", "pg/7/wal/x0").unwrap().is_some());
        assert!(fresh.find(&log_dir, "seg1", "pg/7/wal/x2").is_err());
    }
}
