//! Object storage: one small trait, and the local-filesystem backend (S3 and GCS are in
//! [`crate::cloud`]).
//!
//! Object names are `/`-separated relative paths of `[A-Za-z0-9._-]` components. Backends never
//! expose a half-written object: the local backend writes a temporary file, fsyncs it, links it to
//! its final name (which fails if the name exists: put-if-absent) and fsyncs the directory.

use std::fmt::Debug;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use rand::RngCore;

use crate::chunk_log::{self, Logs, LOG_DIR};
use crate::dir_listings::{keepable, DirListings, DirStamp};
use crate::recycle::RecyclePool;

/// Why a [`Store`] operation failed. Every variant names the object and the store's location, so
/// a message says which object of which repository.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (from `get` and `get_range`; `head` answers `None` instead, and
    /// deleting a missing object is not an error).
    #[error("object {name} not found in {location}")]
    NotFound {
        /// The object name asked for.
        name: String,
        /// The store's [`Store::location`].
        location: String,
    },
    /// The name breaks the naming rules of [`validate_name`]; nothing was sent to the storage.
    #[error("invalid object name {name:?}: {why}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// A filesystem call of the local backend failed. A full filesystem (`ENOSPC`, `EDQUOT`)
    /// says so first, naming the repository: that is what the operator has to fix.
    #[error("{}", describe_io(op, name, location, cause))]
    Io {
        /// The operation, for the message (`put`, `list`, `delete`…).
        op: &'static str,
        /// The object (or list prefix) it was about.
        name: String,
        /// The store's [`Store::location`].
        location: String,
        /// The underlying I/O error.
        cause: std::io::Error,
    },
    /// Any other failure: a cloud request that failed after its retries, a store that cannot
    /// be opened (bad URL, missing repository directory).
    #[error("{op} {name} in {location}: {message}")]
    Backend {
        /// The operation, for the message (`open`, `put`, `get range`…).
        op: &'static str,
        /// The object (or list prefix) it was about; empty when opening the store.
        name: String,
        /// The store's [`Store::location`] (the URL when opening failed).
        location: String,
        /// The backend's own description of the failure.
        message: String,
    },
    /// The object is larger than the caller is prepared to read ([`Store::get_limited`]): a
    /// small record that is not small was planted or damaged. Nothing of it was read.
    #[error("object {name} in {location} is {size} bytes, more than the {limit} bytes such an object may have; refusing to read it")]
    TooLarge {
        /// The object.
        name: String,
        /// The store's [`Store::location`].
        location: String,
        /// Its stored size.
        size: u64,
        /// The most the caller reads.
        limit: u64,
    },
    /// The object storage ignores `If-None-Match: *` (found by
    /// [`Store::check_conditional_create`]): it let a second create of one name replace the
    /// first, so nothing pitr relies on create-only puts for would hold.
    #[error(
        "{location} ignores `If-None-Match: *`: a second conditional create of the probe object {probe} replaced it \
         instead of failing with 412 Precondition Failed. pitr needs conditional creates: every put is put-if-absent \
         so that no archived object is ever replaced, the writer lease that keeps two sidecars from interleaving one \
         cluster's WAL is taken with one, and conflicting writers are detected by them. Use an S3-compatible server \
         (or proxy) that honours If-None-Match, or a local repository"
    )]
    IgnoresConditionalCreate {
        /// The store's [`Store::location`].
        location: String,
        /// The probe object's name.
        probe: String,
    },
    /// The storage refused the operation (S3 `AccessDenied`: an Object Lock retention that has
    /// not passed, a legal hold, or a bucket policy without that permission). Not transient:
    /// retrying does not help, and for a delete the object stays where it is.
    #[error("{op} {name} in {location} refused by the storage (object lock or permissions): {message}")]
    Denied {
        /// The operation that was refused (`delete`, `extend retention of`…).
        op: &'static str,
        /// The object it was about.
        name: String,
        /// The store's [`Store::location`].
        location: String,
        /// The storage's own description of the refusal.
        message: String,
    },
}

fn describe_io(op: &str, name: &str, location: &str, cause: &std::io::Error) -> String {
    if is_out_of_space(cause) {
        format!("repository {location}: no space left on device ({op} {name}); nothing half-written was kept: free space there")
    } else {
        format!("{op} {name} in {location}: {cause}")
    }
}

/// Whether `e` says the filesystem (or the user's quota on it) is full.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl StoreError {
    /// The object does not exist ([`StoreError::NotFound`]).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// The storage refused the operation ([`StoreError::Denied`]).
    pub fn is_denied(&self) -> bool {
        matches!(self, StoreError::Denied { .. })
    }
}

/// One object as a listing or [`Store::head`] reports it, without its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's full name (relative to the repository, not to the listed prefix).
    pub name: String,
    /// Its stored size in bytes (sealed, i.e. compressed and encrypted, for pitr's objects).
    pub size: u64,
}

/// What [`Store::put_if_absent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was stored and is durable (also: a cloud put whose response was lost and whose
    /// name now holds exactly these bytes, i.e. our own earlier attempt).
    Created,
    /// An object of that name was already there; nothing was written.
    AlreadyExists,
}

/// A flat namespace of create-only objects: the storage a repository lives in (a local
/// directory, an S3 or GCS bucket under a prefix). Puts never overwrite, never expose a
/// half-written object and return only once durable; listings are sorted and strongly consistent
/// with puts and deletes that returned before them. Names are checked by [`validate_name`].
#[async_trait]
pub trait Store: Send + Sync + Debug {
    /// Stores `data` under `name` unless an object of that name exists. Returns only once the
    /// object is durable.
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError>;
    /// The whole object; [`StoreError::NotFound`] if there is none.
    async fn get(&self, name: &str) -> Result<Bytes, StoreError>;
    /// The whole object if it is at most `limit` bytes; a bigger one is [`StoreError::TooLarge`]
    /// without its contents being read (so a planted huge object cannot fill memory). The
    /// default asks for the size first; backends override it to learn the size from the read.
    async fn get_limited(&self, name: &str, limit: u64) -> Result<Bytes, StoreError> {
        match self.head(name).await? {
            None => Err(StoreError::NotFound { name: name.to_string(), location: self.location() }),
            Some(info) if info.size > limit => {
                Err(StoreError::TooLarge { name: name.to_string(), location: self.location(), size: info.size, limit })
            }
            Some(_) => {
                let bytes = self.get_range(name, 0..limit.saturating_add(1)).await?;
                // It may have been replaced by a bigger one in between (not by pitr: puts never replace).
                if bytes.len() as u64 > limit {
                    return Err(StoreError::TooLarge {
                        name: name.to_string(),
                        location: self.location(),
                        size: bytes.len() as u64,
                        limit,
                    });
                }
                Ok(bytes)
            }
        }
    }
    /// Bytes `range` of the object; a range past the end is cut at the end.
    async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError>;
    /// Every object whose name starts with `prefix`, sorted by name.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    /// The names one level below `dir` (empty, or a prefix ending in `/`), sorted: each object
    /// directly in it, and each deeper level once as its first component followed by `/` (as an
    /// S3 listing with a delimiter gives them). Finding the clusters of a repository this way
    /// reads a handful of names instead of every block. The default lists everything below and
    /// folds it; backends override it to read one level only.
    async fn list_children(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        for object in self.list(dir).await? {
            let rest = &object.name[dir.len().min(object.name.len())..];
            let child = match rest.find('/') {
                Some(i) => format!("{dir}{}", &rest[..=i]),
                None => object.name.clone(),
            };
            if out.last() != Some(&child) {
                out.push(child);
            }
        }
        Ok(out)
    }
    /// Checks that the storage really refuses a create of a name that exists (S3's
    /// `If-None-Match: *`), which put-if-absent, the writer lease and conflict detection rest on:
    /// creates a probe object under a random name, creates it again, and deletes it. An endpoint
    /// that lets the second create through is [`StoreError::IgnoresConditionalCreate`]. One
    /// probe costs three requests; `pitr init` and `pitr stream` run it at start. Nothing to
    /// check by default (a local directory links the name, which never replaces).
    async fn check_conditional_create(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Deletes `name`; deleting a missing object is not an error.
    async fn delete(&self, name: &str) -> Result<(), StoreError>;
    /// Gives back what the store keeps for reuse (the local backend's pool of deleted small
    /// objects' files, see [`LocalStore::recycling`]), when its process stops cleanly; later
    /// deletes unlink. Nothing by default.
    fn release(&self) {}
    /// Deletes several objects (backends may batch them).
    async fn delete_many(&self, names: &[String]) -> Result<(), StoreError> {
        for name in names {
            self.delete(name).await?;
        }
        Ok(())
    }
    /// The object's size without its contents, or `None` if it does not exist (a backup uses
    /// this to reuse an existing block without reading it).
    async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError>;
    /// Where this store is, for messages (never contains credentials).
    fn location(&self) -> String;
    /// Whether objects here carry a storage-enforced retention that
    /// [`Store::extend_retention`] can move (S3 Object Lock). `pitr expire` plans extensions
    /// only then.
    fn has_retention(&self) -> bool {
        false
    }
    /// Makes the storage keep `name` (refuse deleting or overwriting its version) until at least
    /// `until_us` (µs since the Unix epoch, rounded up to a second). Only ever extends: an object
    /// already retained that long is left alone. Returns whether the retention was moved;
    /// `Ok(false)` also where the store has no such retention (a local directory, GCS, S3
    /// without Object Lock). A missing object is [`StoreError::NotFound`].
    async fn extend_retention(&self, name: &str, until_us: i64) -> Result<bool, StoreError> {
        let _ = (name, until_us);
        Ok(false)
    }
}

/// Checks an object name against the rules every backend relies on: `/`-separated components of
/// `[A-Za-z0-9._-]`, none empty, none `.` or `..`, none starting with `.tmp.` (reserved for the
/// local backend's temporary files, which listings never show) and none `.log` (its chunk logs,
/// see [`crate::chunk_log`]). Otherwise
/// [`StoreError::InvalidName`].
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let bad = |why| Err(StoreError::InvalidName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("empty");
    }
    for part in name.split('/') {
        if part.is_empty() {
            return bad("empty path component");
        }
        if part == "." || part == ".." || part.starts_with(".tmp.") || part == LOG_DIR {
            return bad("reserved path component");
        }
        if !part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
            return bad("only [A-Za-z0-9._-] and / are allowed");
        }
    }
    Ok(())
}

/// The default backend: a directory on a local (or mounted) filesystem.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// Files of deleted small objects for later puts to reuse (see [`crate::recycle`]); only in
    /// the long-running sidecar ([`LocalStore::recycling`]).
    recycled: Option<Arc<RecyclePool>>,
    /// WAL chunks held in log files (see [`crate::chunk_log`]): read by every store, appended to
    /// only by an appending one ([`LocalStore::appending`]).
    logs: Arc<Logs>,
    appending: bool,
    /// One-level listings kept while their directory is unchanged (see [`crate::dir_listings`]).
    listings: Arc<DirListings>,
}

impl LocalStore {
    /// A store on the directory `root`. Nothing is touched yet; puts and listings fail while the
    /// directory does not exist (see [`LocalStore::create_root`]).
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore {
            root: root.into(),
            recycled: None,
            logs: Arc::default(),
            appending: false,
            listings: Arc::default(),
        }
    }

    /// This store, putting WAL chunks as records appended to one log per segment (one fdatasync
    /// each, as pg_receivewal writes) instead of a file each (see [`crate::chunk_log`]). For the
    /// sidecar, whose chunk puts are on the path of every synchronous commit.
    pub fn appending(self) -> LocalStore {
        LocalStore { appending: true, ..self }
    }

    /// Where `name`'s record would be if it is a WAL chunk: its log directory and segment.
    fn log_place<'n>(&self, name: &'n str) -> Option<(PathBuf, &'n str)> {
        let (dir, segment) = chunk_log::group_of(name)?;
        Some((self.root.join(dir).join(LOG_DIR), segment))
    }

    fn log_error(&self, op: &'static str, name: &str, e: chunk_log::LogError) -> StoreError {
        match e {
            chunk_log::LogError::Io(cause) => self.io(op, name, cause),
            other => StoreError::Backend {
                op,
                name: name.to_string(),
                location: self.location(),
                message: other.to_string(),
            },
        }
    }

    /// The log and record holding `name`, if it is a WAL chunk held in a log.
    fn log_entry(&self, op: &'static str, name: &str) -> Result<Option<(PathBuf, chunk_log::Entry)>, StoreError> {
        let Some((log_dir, segment)) = self.log_place(name) else { return Ok(None) };
        self.logs.find(&log_dir, segment, name).map_err(|e| self.log_error(op, name, e))
    }

    /// Bytes `range` of `name`'s record in a log (blocking); `NotFound` if no log holds it.
    fn get_logged(&self, op: &'static str, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        // Twice: a delete in another process may rewrite the log between finding the record and
        // reading it (the record is then in the new log).
        for attempt in 0..2 {
            let Some((path, entry)) = self.log_entry(op, name)? else { break };
            match Logs::read_data(&path, &entry, range.clone()) {
                Ok(data) => return Ok(Bytes::from(data)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt == 0 => continue,
                Err(e) => return Err(self.io(op, name, e)),
            }
        }
        Err(StoreError::NotFound { name: name.to_string(), location: self.location() })
    }

    /// As [`LocalStore::get_logged`], off the async runtime; with `limit`, a bigger record is
    /// [`StoreError::TooLarge`] without being read.
    async fn get_logged_async(
        &self,
        op: &'static str,
        name: &str,
        range: Range<u64>,
        limit: Option<u64>,
    ) -> Result<Bytes, StoreError> {
        let this = self.clone();
        let owned = name.to_string();
        run_blocking(move || {
            if let Some(limit) = limit {
                if let Some((_, entry)) = this.log_entry(op, &owned)? {
                    if entry.len > limit {
                        let (location, size) = (this.location(), entry.len);
                        return Err(StoreError::TooLarge { name: owned, location, size, limit });
                    }
                }
            }
            this.get_logged(op, &owned, range)
        })
        .await
    }

    /// The records of the chunk logs of the directory `rel` (relative to the root) whose names
    /// start with `prefix`, as objects; nothing for a directory that has no logs.
    fn logged_objects(&self, rel: &str, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        if chunk_log::wal_dir_system_id(rel).is_none() {
            return Ok(Vec::new());
        }
        // The part of the prefix that names files in `rel` (none when it stops above it).
        let file_prefix = prefix.strip_prefix(rel).and_then(|p| p.strip_prefix('/')).unwrap_or("");
        let log_dir = self.root.join(rel).join(LOG_DIR);
        let entries = self.logs.entries(&log_dir, file_prefix).map_err(|e| self.log_error("list", rel, e))?;
        Ok(entries
            .into_iter()
            .filter(|e| e.name.strip_prefix(rel).and_then(|f| f.strip_prefix('/')).is_some_and(|f| !f.contains('/')))
            .filter(|e| e.name.starts_with(prefix))
            .map(|e| ObjectInfo { name: e.name, size: e.len })
            .collect())
    }

    /// This store, keeping the files of deleted small objects for later puts to write into
    /// instead of creating new ones (see [`crate::recycle`]). For a process that puts and deletes
    /// many small objects for a long time (the sidecar's WAL chunks); a short-lived command would
    /// only leave its pooled files behind for a later process to sweep.
    pub fn recycling(self) -> LocalStore {
        self.with_recycle_age(crate::recycle::MIN_AGE)
    }

    fn with_recycle_age(self, min_age: std::time::Duration) -> LocalStore {
        let recycled = Some(Arc::new(RecyclePool::new(&self.root, min_age)));
        LocalStore { recycled, ..self }
    }

    /// Removes the object file at `path`: into the recycle pool if there is one and the file is
    /// worth keeping, else unlinked. A missing file is `NotFound`.
    fn discard(&self, path: &Path) -> std::io::Result<()> {
        if let Some(pool) = &self.recycled {
            if pool.take_in(path)? {
                return Ok(());
            }
        }
        std::fs::remove_file(path)
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the repository directory (for `pitr init`). Other operations never create it, so
    /// an unmounted volume is an error rather than a fresh, empty repository on the wrong disk.
    pub fn create_root(&self) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.root).map_err(|e| self.io("create", ".", e))?;
        // The new directory's entry must survive a crash before the marker is put into it.
        let parent = self.root.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        sync_dir(&self.root).and_then(|()| sync_dir(parent)).map_err(|e| self.io("create", ".", e))
    }

    fn root_missing(&self) -> StoreError {
        StoreError::Backend {
            op: "open",
            name: ".".into(),
            location: self.location(),
            message: "the repository directory does not exist (run `pitr init`, or is the volume mounted?)".into(),
        }
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        validate_name(name)?;
        Ok(self.root.join(name))
    }

    fn io(&self, op: &'static str, name: &str, cause: std::io::Error) -> StoreError {
        if cause.kind() == std::io::ErrorKind::NotFound && (op == "get" || op == "get range") {
            return StoreError::NotFound { name: name.to_string(), location: self.location() };
        }
        StoreError::Io { op, name: name.to_string(), location: self.location(), cause }
    }

    fn put_blocking(&self, name: &str, data: &[u8]) -> Result<PutOutcome, StoreError> {
        let path = self.path_of(name)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        // Whether the name is a file already. It may come from a put that crashed (or failed)
        // after linking it and before its directory was fsynced: the entry is made durable before
        // anyone relies on it.
        let file_exists = || -> std::io::Result<bool> {
            if !path.exists() {
                return Ok(false);
            }
            sync_dirs_up_to(&self.root, &dir)?;
            Ok(true)
        };
        let log_place = self.log_place(name);
        if let (true, Some((log_dir, segment))) = (self.appending, &log_place) {
            // For an appending store, once per segment: the log it appends to (open, its link
            // count checked after each append) stands for the directories above it.
            if !self.logs.has_writer(log_dir, segment) {
                if !self.root.is_dir() {
                    return Err(self.root_missing());
                }
                let io = |e| self.io("create directory for", name, e);
                create_dir_all_synced(&self.root, log_dir).map_err(io)?;
                // `.log` may come from a process that died before its parent's fsync,
                // which `create_dir_all_synced` would not redo.
                sync_dirs_up_to(&self.root, log_dir).map_err(io)?;
            }
            // A file of the name is looked for only when the log directory's change count says
            // that another store may have put one (a lookup that fails costs more than the rest
            // of the put's checks together).
            return match self.logs.append(log_dir, segment, name, data, file_exists) {
                Ok(true) => Ok(PutOutcome::Created),
                Ok(false) => Ok(PutOutcome::AlreadyExists),
                Err(e) => Err(self.log_error("put", name, e)),
            };
        }
        if !self.root.is_dir() {
            return Err(self.root_missing());
        }
        // A chunk as a file of its own is a change to its segment's log directory, counted under
        // its lock (held until this put returns), so that appenders look for the file.
        let _counted = match &log_place {
            Some((log_dir, _)) => self.logs.lock_for_file_put(log_dir).map_err(|e| self.log_error("put", name, e))?,
            None => None,
        };
        if file_exists().map_err(|e| self.io("put", name, e))? {
            return Ok(PutOutcome::AlreadyExists);
        }
        // A chunk a sidecar appended is there as much as a file would be.
        if log_place.is_some() && self.log_entry("put", name)?.is_some() {
            return Ok(PutOutcome::AlreadyExists);
        }
        create_dir_all_synced(&self.root, &dir).map_err(|e| self.io("create directory for", name, e))?;
        // A deleted object's file when one is waiting (no inode to allocate), else a new file.
        if let Some((pooled, f)) = self.recycled.as_ref().and_then(|pool| pool.take_out()) {
            match write_and_link(f, &pooled, true, data, &path, &dir) {
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {} // the object's directory is another mount
                result => return result.map_err(|e| self.io("put", name, e)),
            }
        }
        let mut suffix = [0u8; 6];
        rand::rngs::OsRng.fill_bytes(&mut suffix);
        let tmp = dir.join(format!(".tmp.{file_name}.{}", hex::encode(suffix)));
        let f =
            std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| self.io("put", name, e))?;
        write_and_link(f, &tmp, false, data, &path, &dir).map_err(|e| self.io("put", name, e))
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        // Walk only the deepest directory the prefix names, not the whole repository.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() { self.root.clone() } else { self.root.join(dir_part) };
        if !self.root.is_dir() {
            return Err(self.root_missing());
        }
        let mut out = Vec::new();
        let mut stack = vec![(start, dir_part.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            out.extend(self.logged_objects(&rel, prefix)?);
            for (entry, fname, ft) in self.entries(&dir, prefix)? {
                let name = if rel.is_empty() { fname } else { format!("{rel}/{fname}") };
                if ft.is_dir() {
                    if name.starts_with(prefix) || prefix.starts_with(&format!("{name}/")) {
                        stack.push((entry.path(), name));
                    }
                } else if ft.is_file() && name.starts_with(prefix) {
                    match entry.metadata() {
                        Ok(m) => out.push(ObjectInfo { name, size: m.len() }),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(self.io("list", prefix, e)),
                    }
                }
            }
        }
        // A name held both as a file and in a log (or in two logs) is one object; the file is
        // what `get` reads, and sorts after the records added first for its directory.
        out.sort_by(|a, b| a.name.cmp(&b.name));
        let mut deduped: Vec<ObjectInfo> = Vec::with_capacity(out.len());
        for object in out {
            match deduped.last_mut() {
                Some(last) if last.name == object.name => *last = object,
                _ => deduped.push(object),
            }
        }
        Ok(deduped)
    }

    fn list_children_blocking(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        if !dir.is_empty() {
            validate_name(dir.trim_end_matches('/'))?;
        }
        let path = self.root.join(dir);
        let (read_at, read) = (std::time::SystemTime::now(), std::time::Instant::now());
        let before = DirStamp::of(&path);
        if let Some(names) = before.as_ref().and_then(|stamp| self.listings.get(&path, stamp)) {
            return Ok(names);
        }
        let mut out = Vec::new();
        for (_, fname, ft) in self.entries(&path, dir)? {
            if ft.is_dir() {
                out.push(format!("{dir}{fname}/"));
            } else if ft.is_file() {
                out.push(format!("{dir}{fname}"));
            }
        }
        out.extend(self.logged_objects(dir.trim_end_matches('/'), dir)?.into_iter().map(|o| o.name));
        // Only a listing that found nothing asks whether the repository is there at all (a
        // missing root is an error, not an empty repository): the lease guard lists before
        // every WAL put.
        if out.is_empty() && !self.root.is_dir() {
            return Err(self.root_missing());
        }
        out.sort();
        out.dedup();
        if let (Some(before), Some(after)) = (before, DirStamp::of(&path)) {
            let holds_logs = std::fs::symlink_metadata(path.join(LOG_DIR)).is_ok();
            if keepable(&before, &after, read_at, holds_logs) {
                self.listings.keep(&path, before, &out, read);
            }
        }
        Ok(out)
    }

    /// The entries of `dir` (for `listing`, named in errors) with their names and types: none
    /// for a missing directory, and neither the backend's own `.tmp.` files nor entries deleted
    /// while we read (compacted chunks), which are simply not listed.
    fn entries(
        &self,
        dir: &Path,
        listing: &str,
    ) -> Result<Vec<(std::fs::DirEntry, String, std::fs::FileType)>, StoreError> {
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if gone(&e) => return Ok(Vec::new()),
            Err(e) => return Err(self.io("list", listing, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(self.io("list", listing, e)),
            };
            let fname = entry.file_name().to_string_lossy().into_owned();
            // The backend's own: temporary files, and chunk logs (read as their records).
            if fname.starts_with(".tmp.") || fname == LOG_DIR {
                continue;
            }
            match entry.file_type() {
                Ok(ft) => out.push((entry, fname, ft)),
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(self.io("list", listing, e)),
            }
        }
        Ok(out)
    }
}

/// Writes `data` into `f` (the file at `tmp`; `reused` if it held an older object), makes it
/// durable, links it as `path` unless that exists (an atomic put-if-absent: rename would replace)
/// and fsyncs `dir`. `tmp` is gone afterwards, whatever happened.
fn write_and_link(
    mut f: std::fs::File,
    tmp: &Path,
    reused: bool,
    data: &[u8],
    path: &Path,
    dir: &Path,
) -> std::io::Result<PutOutcome> {
    let result = (|| {
        write_paced(&mut f, data)?;
        if reused {
            f.set_len(data.len() as u64)?;
        }
        f.sync_all()?;
        let outcome = match std::fs::hard_link(tmp, path) {
            Ok(()) => PutOutcome::Created,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => PutOutcome::AlreadyExists,
            Err(e) => return Err(e),
        };
        std::fs::remove_file(tmp)?;
        sync_dir(dir)?;
        Ok(outcome)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Objects from this size on (a WAL segment, 16 MiB before compression) are written to the disk
/// as they are written ([`write_paced`]); smaller ones (base-backup blocks, chunks) at once by
/// their fsync.
const PACE_FROM: usize = 2 << 20;
/// How much of a paced object's bytes may be on the way to the disk at once.
const PACE_STEP: usize = 256 << 10;

/// Writes `data` to `f` from its current position (0: a new or recycled file), pushing each
/// [`PACE_STEP`] to the disk as it goes and waiting for the one before it, as PostgreSQL's
/// checkpointer does (`checkpoint_flush_after`). Written whole and left to the fsync, a
/// segment's megabytes reach the device in one burst that every WAL chunk's fdatasync on the
/// same disk then waits behind: measured in the benchmark, the stream's slowest `flush_lag`
/// samples came just after segment boundaries. Paced, a chunk's write waits behind a step at
/// most. `sync_file_range` only starts and waits for writeback: durability is still the
/// caller's fsync (which also reports any write error), so its own errors are ignored.
fn write_paced(f: &mut std::fs::File, data: &[u8]) -> std::io::Result<()> {
    if data.len() < PACE_FROM {
        return f.write_all(data);
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*f);
    let mut at: usize = 0;
    for step in data.chunks(PACE_STEP) {
        f.write_all(step)?;
        // SAFETY: sync_file_range on a descriptor `f` owns, over bytes just written; no memory
        // is passed.
        unsafe {
            libc::sync_file_range(fd, at as i64, step.len() as i64, libc::SYNC_FILE_RANGE_WRITE);
            if at >= PACE_STEP {
                libc::sync_file_range(
                    fd,
                    (at - PACE_STEP) as i64,
                    PACE_STEP as i64,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
        }
        at += step.len();
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Fsyncs `dir` and each of its parents up to and including `root`, so that every entry on the
/// way to an object is durable (a directory made by a process that crashed before fsyncing its
/// parent is still found by later puts, which then skip making it).
fn sync_dirs_up_to(root: &Path, dir: &Path) -> std::io::Result<()> {
    let mut at = Some(dir);
    while let Some(d) = at {
        sync_dir(d)?;
        if d == root || !d.starts_with(root) {
            break;
        }
        at = d.parent();
    }
    Ok(())
}

/// Creates `dir` and any missing parents below `root`, fsyncing each parent so the new
/// directory entries survive a crash.
fn create_dir_all_synced(root: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if parent != root && parent.starts_with(root) {
            create_dir_all_synced(root, parent)?;
        }
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(dir.parent().unwrap_or(root))
}

#[async_trait]
impl Store for LocalStore {
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let this = self.clone();
        let name = name.to_string();
        if data.len() <= IN_PLACE_PUT_MAX {
            run_blocking_in_place(move || this.put_blocking(&name, &data)).await
        } else {
            run_blocking(move || this.put_blocking(&name, &data)).await
        }
    }

    async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        let path = self.path_of(name)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Bytes::from(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.log_place(name).is_some() => {
                self.get_logged_async("get", name, 0..u64::MAX, None).await
            }
            Err(e) => Err(self.io("get", name, e)),
        }
    }

    async fn get_limited(&self, name: &str, limit: u64) -> Result<Bytes, StoreError> {
        use tokio::io::AsyncReadExt;
        let path = self.path_of(name)?;
        let io = |e| self.io("get", name, e);
        let f = match tokio::fs::File::open(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.log_place(name).is_some() => {
                return self.get_logged_async("get", name, 0..u64::MAX, Some(limit)).await;
            }
            f => f.map_err(io)?,
        };
        let size = f.metadata().await.map_err(io)?.len();
        if size > limit {
            return Err(StoreError::TooLarge { name: name.to_string(), location: self.location(), size, limit });
        }
        let mut buf = Vec::with_capacity(size as usize);
        // Bounded even if the file grows while we read (a hand edit; pitr never rewrites).
        f.take(limit.saturating_add(1)).read_to_end(&mut buf).await.map_err(io)?;
        if buf.len() as u64 > limit {
            let size = buf.len() as u64;
            return Err(StoreError::TooLarge { name: name.to_string(), location: self.location(), size, limit });
        }
        Ok(Bytes::from(buf))
    }

    async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path_of(name)?;
        let io = |e| self.io("get range", name, e);
        let mut f = match tokio::fs::File::open(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.log_place(name).is_some() => {
                return self.get_logged_async("get range", name, range, None).await;
            }
            f => f.map_err(io)?,
        };
        f.seek(std::io::SeekFrom::Start(range.start)).await.map_err(io)?;
        let mut buf = Vec::new();
        f.take(range.end.saturating_sub(range.start)).read_to_end(&mut buf).await.map_err(io)?;
        Ok(Bytes::from(buf))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let this = self.clone();
        let prefix = prefix.to_string();
        run_blocking(move || this.list_blocking(&prefix)).await
    }

    async fn list_children(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let this = self.clone();
        let dir = dir.to_string();
        // One directory read, like a small put: the writer lease's guard lists its generations
        // this way before every WAL put, on the stream's own thread.
        run_blocking_in_place(move || this.list_children_blocking(&dir)).await
    }

    fn release(&self) {
        if let Some(pool) = &self.recycled {
            pool.release();
        }
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.delete_many(&[name.to_string()]).await
    }

    async fn delete_many(&self, names: &[String]) -> Result<(), StoreError> {
        // One directory fsync per directory, not per file: compaction removes hundreds of chunks.
        let this = self.clone();
        let names = names.to_vec();
        run_blocking(move || {
            let mut dirs = std::collections::BTreeSet::new();
            let mut logged: std::collections::BTreeMap<PathBuf, Vec<(&str, &str)>> = Default::default();
            for name in &names {
                let path = this.path_of(name)?;
                if let Some((log_dir, segment)) = this.log_place(name) {
                    logged.entry(log_dir).or_default().push((segment, name.as_str()));
                }
                match this.discard(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(this.io("delete", name, e)),
                }
                dirs.insert(path.parent().unwrap_or(&this.root).to_path_buf());
            }
            for dir in dirs {
                sync_dir(&dir).map_err(|e| this.io("delete", &dir.display().to_string(), e))?;
            }
            for (log_dir, names) in logged {
                let first = names.first().map_or("", |(_, n)| *n).to_string();
                this.logs.delete(&log_dir, &names).map_err(|e| this.log_error("delete", &first, e))?;
            }
            Ok(())
        })
        .await
    }

    async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let path = self.path_of(name)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo { name: name.to_string(), size: m.len() })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.log_place(name).is_some() => {
                let this = self.clone();
                let owned = name.to_string();
                let found = run_blocking(move || this.log_entry("head", &owned)).await?;
                Ok(found.map(|(_, entry)| ObjectInfo { name: name.to_string(), size: entry.len }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("head", name, e)),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// Puts up to this size (WAL chunks) run in place; bigger ones (blocks, segments) on the blocking
/// pool, where several from one task (a secondary's copy batch) still go at once.
const IN_PLACE_PUT_MAX: usize = 64 << 10;

/// As [`run_blocking`], but on this very thread where the runtime allows it (tokio moves the
/// thread's other tasks elsewhere meanwhile). A WAL put is on the path of every synchronous
/// commit: handing it to the blocking pool and back costs two thread wake-ups, which on a busy
/// machine are a good part of the commit's wait.
///
/// On a single-threaded runtime (the sidecar's WAL stream has one, on its own thread) the put
/// simply runs: that thread's other tasks wait for it, as pg_receivewal's loop waits for its
/// fsync, and no other thread is woken.
async fn run_blocking_in_place<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => f(),
        _ => run_blocking(f).await,
    }
}

async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with only the required methods, so that the trait's default `list_children` runs.
    #[derive(Debug)]
    struct Folding(LocalStore);

    #[async_trait]
    impl Store for Folding {
        async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
            self.0.put_if_absent(name, data).await
        }
        async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
            self.0.get(name).await
        }
        async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
            self.0.get_range(name, range).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
            self.0.list(prefix).await
        }
        async fn delete(&self, name: &str) -> Result<(), StoreError> {
            self.0.delete(name).await
        }
        async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
            self.0.head(name).await
        }
        fn location(&self) -> String {
            self.0.location()
        }
    }

    #[tokio::test]
    async fn a_deleted_small_object_s_file_is_written_again_by_a_later_put() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path()).with_recycle_age(std::time::Duration::ZERO);
        s.put_if_absent("wal/a.chunk", Bytes::from_static(b"the first object, longer")).await.unwrap();
        let inode = std::fs::metadata(dir.path().join("wal/a.chunk")).unwrap().ino();
        s.delete_many(&["wal/a.chunk".to_string()]).await.unwrap();
        assert!(s.head("wal/a.chunk").await.unwrap().is_none());
        assert!(s.list("").await.unwrap().is_empty(), "the pool is not listed");
        assert_eq!(s.put_if_absent("wal/b.chunk", Bytes::from_static(b"second")).await.unwrap(), PutOutcome::Created);
        assert_eq!(&s.get("wal/b.chunk").await.unwrap()[..], b"second");
        let meta = std::fs::metadata(dir.path().join("wal/b.chunk")).unwrap();
        assert_eq!((meta.ino(), meta.nlink()), (inode, 1), "the same file, under its new name only");
        assert_eq!(std::fs::read_dir(dir.path().join(crate::recycle::RECYCLE_DIR)).unwrap().count(), 0);
        // Put-if-absent still holds for a reused file, and the refused file is not left around.
        s.delete("wal/b.chunk").await.unwrap();
        s.put_if_absent("wal/c.chunk", Bytes::from_static(b"c")).await.unwrap();
        s.delete("wal/c.chunk").await.unwrap();
        s.put_if_absent("wal/d.chunk", Bytes::from_static(b"d")).await.unwrap();
        assert_eq!(
            s.put_if_absent("wal/d.chunk", Bytes::from_static(b"other")).await.unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(&s.get("wal/d.chunk").await.unwrap()[..], b"d");
        let names: Vec<_> = s.list("").await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(names, vec!["wal/d.chunk"]);
        // Released at a clean stop: what waits in the pool is unlinked, later deletes unlink.
        s.delete("wal/d.chunk").await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(crate::recycle::RECYCLE_DIR)).unwrap().count(), 1);
        s.release();
        assert_eq!(std::fs::read_dir(dir.path().join(crate::recycle::RECYCLE_DIR)).unwrap().count(), 0);
        s.put_if_absent("wal/f.chunk", Bytes::from_static(b"f")).await.unwrap();
        s.delete("wal/f.chunk").await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(crate::recycle::RECYCLE_DIR)).unwrap().count(), 0);
        drop(s);

        // Without recycling (every command but the sidecar) a delete unlinks.
        let plain = LocalStore::new(dir.path());
        plain.put_if_absent("wal/e.chunk", Bytes::from_static(b"e")).await.unwrap();
        plain.delete("wal/e.chunk").await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(crate::recycle::RECYCLE_DIR)).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn list_children_reads_one_level() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::new(dir.path());
        for name in ["pg/1/cluster", "pg/1/blocks/ab/abcd", "pg/1-x", "pg/22/wal/a.seg", "pg/top", "mongo/rs/x"] {
            local.put_if_absent(name, Bytes::from_static(b"x")).await.unwrap();
        }
        let want = vec!["pg/1-x", "pg/1/", "pg/22/", "pg/top"];
        assert_eq!(local.list_children("pg/").await.unwrap(), want);
        assert_eq!(Folding(local.clone()).list_children("pg/").await.unwrap(), want);
        assert_eq!(local.list_children("").await.unwrap(), vec!["mongo/", "pg/"]);
        assert_eq!(Folding(local.clone()).list_children("").await.unwrap(), vec!["mongo/", "pg/"]);
        assert!(local.list_children("none/").await.unwrap().is_empty());
        assert!(local.list_children("../").await.is_err());
    }

    /// A one-level listing is kept while its directory is unchanged (the lease guard lists before
    /// every WAL put), and every change after it is seen at once: an object put, a file
    /// planted or removed by hand, the directory replaced. Nothing is kept for a directory
    /// holding chunk logs, nor for one changed within the last second.
    #[tokio::test]
    async fn a_kept_listing_never_hides_a_change_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::new(dir.path()).appending();
        let lease = dir.path().join("pg/7/lease");
        let kept = |path: &Path| DirStamp::of(path).and_then(|s| local.listings.get(path, &s)).is_some();
        local.put_if_absent("pg/7/lease/0000000000000001", Bytes::from_static(b"1")).await.unwrap();
        let chunk = "pg/7/wal/000000010000000000000001.00000000-00000010.chunk";
        local.put_if_absent(chunk, Bytes::from_static(b"c")).await.unwrap();
        assert_eq!(local.list_children("pg/7/lease/").await.unwrap(), ["pg/7/lease/0000000000000001"]);
        assert!(!kept(&lease), "changed within the last second");

        tokio::time::sleep(crate::dir_listings::SETTLE + std::time::Duration::from_millis(100)).await;
        assert_eq!(local.list_children("pg/7/lease/").await.unwrap(), ["pg/7/lease/0000000000000001"]);
        assert!(kept(&lease));
        assert_eq!(local.list_children("pg/7/wal/").await.unwrap(), [chunk]);
        assert!(!kept(&dir.path().join("pg/7/wal")), "chunk logs change without their directory");

        local.put_if_absent("pg/7/lease/0000000000000002", Bytes::from_static(b"2")).await.unwrap();
        let both = ["pg/7/lease/0000000000000001", "pg/7/lease/0000000000000002"];
        assert_eq!(local.list_children("pg/7/lease/").await.unwrap(), both);

        tokio::time::sleep(crate::dir_listings::SETTLE + std::time::Duration::from_millis(100)).await;
        assert_eq!(local.list_children("pg/7/lease/").await.unwrap(), both);
        assert!(kept(&lease));
        std::fs::remove_file(lease.join("0000000000000001")).unwrap();
        assert_eq!(local.list_children("pg/7/lease/").await.unwrap(), ["pg/7/lease/0000000000000002"]);

        tokio::time::sleep(crate::dir_listings::SETTLE + std::time::Duration::from_millis(100)).await;
        assert_eq!(local.list_children("pg/7/lease/").await.unwrap(), ["pg/7/lease/0000000000000002"]);
        assert!(kept(&lease));
        std::fs::write(lease.join("0000000000000009"), b"planted").unwrap();
        assert_eq!(local.list_children("pg/7/lease/").await.unwrap().len(), 2, "a file planted by hand");

        tokio::time::sleep(crate::dir_listings::SETTLE + std::time::Duration::from_millis(100)).await;
        local.list_children("pg/7/lease/").await.unwrap();
        assert!(kept(&lease));
        let aside = dir.path().join("pg/7/lease-old");
        std::fs::rename(&lease, &aside).unwrap();
        std::fs::create_dir(&lease).unwrap();
        std::fs::rename(aside.join("0000000000000002"), lease.join("0000000000000002")).unwrap();
        assert_eq!(local.list_children("pg/7/lease/").await.unwrap(), ["pg/7/lease/0000000000000002"], "replaced");
    }

    /// The sidecar checks the directories above its log once per segment; a log directory or a
    /// whole repository removed under an open log fails the next put (never a put into an
    /// unlinked file), and the retry either lands in a new log or names the missing repository.
    #[tokio::test]
    async fn a_log_directory_or_repository_removed_under_the_writer_fails_its_next_put() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir(&root).unwrap();
        let sidecar = LocalStore::new(&root).appending();
        let chunk = |from: u32| format!("pg/7/wal/000000010000000000000001.{from:08X}-{:08X}.chunk", from + 16);
        sidecar.put_if_absent(&chunk(0), Bytes::from_static(b"a")).await.unwrap();

        std::fs::remove_dir_all(root.join("pg/7/wal").join(LOG_DIR)).unwrap();
        let err = sidecar.put_if_absent(&chunk(16), Bytes::from_static(b"b")).await.unwrap_err();
        assert!(err.to_string().contains("was removed while"), "{err}");
        assert_eq!(sidecar.put_if_absent(&chunk(16), Bytes::from_static(b"b")).await.unwrap(), PutOutcome::Created);
        assert_eq!(LocalStore::new(&root).get(&chunk(16)).await.unwrap(), Bytes::from_static(b"b"));

        std::fs::remove_dir_all(&root).unwrap();
        assert!(sidecar.put_if_absent(&chunk(32), Bytes::from_static(b"c")).await.is_err());
        let err = sidecar.put_if_absent(&chunk(32), Bytes::from_static(b"c")).await.unwrap_err();
        assert!(err.to_string().contains("repository directory does not exist"), "{err}");
        let err = sidecar.list_children("pg/7/lease/").await.unwrap_err();
        assert!(err.to_string().contains("repository directory does not exist"), "{err}");
        assert!(!root.exists(), "a put or listing made the missing repository again");
    }

    /// Put-if-absent holds the other way too: a chunk that a store which does not append put as
    /// a file of its own, while the sidecar appends to its segment's log, is there for the
    /// sidecar's put of that name (which appends nothing). A file there before the sidecar's
    /// first append, under a name it puts later, stays what readers see.
    #[tokio::test]
    async fn a_chunk_another_store_put_as_a_file_is_there_for_the_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir(&root).unwrap();
        let sidecar = LocalStore::new(&root).appending();
        let other = LocalStore::new(&root);
        let chunk = |from: u32| format!("pg/7/wal/000000010000000000000001.{from:08X}-{:08X}.chunk", from + 16);
        // There before the sidecar's first append to the segment, under a name it puts later:
        // the one case it does not see (archive-format.md).
        assert_eq!(other.put_if_absent(&chunk(48), Bytes::from_static(b"early")).await.unwrap(), PutOutcome::Created);
        assert_eq!(sidecar.put_if_absent(&chunk(0), Bytes::from_static(b"a")).await.unwrap(), PutOutcome::Created);
        assert_eq!(other.put_if_absent(&chunk(16), Bytes::from_static(b"file")).await.unwrap(), PutOutcome::Created);
        assert!(root.join(chunk(16)).is_file());
        assert_eq!(
            sidecar.put_if_absent(&chunk(16), Bytes::from_static(b"record")).await.unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(sidecar.put_if_absent(&chunk(32), Bytes::from_static(b"c")).await.unwrap(), PutOutcome::Created);
        assert_eq!(other.get(&chunk(16)).await.unwrap(), Bytes::from_static(b"file"));
        std::fs::remove_file(root.join(chunk(16))).unwrap();
        assert!(other.get(&chunk(16)).await.unwrap_err().is_not_found(), "no record of it was appended");

        assert_eq!(sidecar.put_if_absent(&chunk(48), Bytes::from_static(b"late")).await.unwrap(), PutOutcome::Created);
        assert_eq!(other.get(&chunk(48)).await.unwrap(), Bytes::from_static(b"early"), "reads take the file");
        let listed = other.list("pg/7/wal/").await.unwrap();
        assert_eq!(listed.iter().filter(|o| o.name == chunk(48)).count(), 1, "one object: {listed:?}");
    }

    /// A chunk put as a file waits for the log directory's lock at most `LOCK_WAIT`, as an append
    /// does: held by another process, the put fails naming the directory, leaves no file, and
    /// its retry lands once the lock is free.
    #[tokio::test]
    async fn a_chunk_file_put_under_another_process_s_lock_fails_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir(&root).unwrap();
        let chunk = |from: u32| format!("pg/7/wal/000000010000000000000001.{from:08X}-{:08X}.chunk", from + 16);
        LocalStore::new(&root).appending().put_if_absent(&chunk(0), Bytes::from_static(b"a")).await.unwrap();
        let log_dir = root.join("pg/7/wal").join(LOG_DIR);
        // Another process: an open file description of its own, so the flock conflicts.
        let held = std::fs::File::open(log_dir.join(".lock")).unwrap();
        // SAFETY: flock on a descriptor `held` owns; no memory is passed.
        assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) }, 0);

        let other = LocalStore::new(&root);
        let err = other.put_if_absent(&chunk(16), Bytes::from_static(b"file")).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("stayed locked") && msg.contains(&log_dir.display().to_string()), "{msg}");
        assert!(!root.join(chunk(16)).exists(), "a file was written without the lock");
        let leftovers: Vec<_> = std::fs::read_dir(root.join("pg/7/wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        drop(held);
        assert_eq!(other.put_if_absent(&chunk(16), Bytes::from_static(b"file")).await.unwrap(), PutOutcome::Created);
        assert_eq!(other.get(&chunk(16)).await.unwrap(), Bytes::from_static(b"file"));
    }

    /// WAL chunks an appending store (the sidecar's) puts into logs are objects like files to
    /// every store: listed, read, headed, refused a second put, deleted; other objects stay files.
    #[tokio::test]
    async fn chunks_appended_to_logs_are_objects_to_every_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("r")).unwrap();
        let root = dir.path().join("r");
        let sidecar = LocalStore::new(&root).appending();
        let reader = LocalStore::new(&root);
        let chunk =
            |seg: u32, from: u32| format!("pg/7/wal/00000001000000000000000{seg}.{from:08X}-{:08X}.chunk", from + 16);
        for seg in 1..=2 {
            for from in [0u32, 16, 32] {
                let data = Bytes::from(format!("{seg}:{from}").repeat(3));
                assert_eq!(sidecar.put_if_absent(&chunk(seg, from), data).await.unwrap(), PutOutcome::Created);
            }
        }
        let segment = "pg/7/wal/000000010000000000000001.seg";
        sidecar.put_if_absent(segment, Bytes::from_static(b"whole")).await.unwrap();
        assert!(root.join(segment).is_file(), "not a chunk: a file of its own");
        assert!(!root.join(chunk(1, 0)).exists(), "a chunk: no file of its own");

        let listed: Vec<String> = reader.list("pg/7/wal/").await.unwrap().into_iter().map(|o| o.name).collect();
        let mut want: Vec<String> = (1..=2).flat_map(|s| [0, 16, 32].map(|f| chunk(s, f))).collect();
        want.push(segment.to_string());
        want.sort();
        assert_eq!(listed, want);
        let of_one: Vec<String> =
            reader.list("pg/7/wal/000000010000000000000002.").await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(of_one, [0, 16, 32].map(|f| chunk(2, f)));
        assert_eq!(reader.list("pg/").await.unwrap().len(), 7, "found from a prefix above too");
        assert!(reader.list_children("pg/7/wal/").await.unwrap().contains(&chunk(2, 16)));
        assert_eq!(reader.get(&chunk(2, 16)).await.unwrap(), Bytes::from("2:162:162:16"));
        assert_eq!(reader.get_range(&chunk(2, 16), 2..4).await.unwrap(), Bytes::from("16"));
        assert_eq!(reader.head(&chunk(1, 32)).await.unwrap().map(|o| o.size), Some(12));
        assert_eq!(reader.get_limited(&chunk(1, 32), 12).await.unwrap().len(), 12);
        assert!(matches!(reader.get_limited(&chunk(1, 32), 11).await, Err(StoreError::TooLarge { size: 12, .. })));
        assert!(reader.get(&chunk(3, 0)).await.unwrap_err().is_not_found());
        assert_eq!(reader.head(&chunk(3, 0)).await.unwrap(), None);
        // Put-if-absent holds across the two kinds of store and across processes.
        for store in [&reader, &sidecar, &LocalStore::new(&root).appending()] {
            assert_eq!(
                store.put_if_absent(&chunk(1, 16), Bytes::from_static(b"other")).await.unwrap(),
                PutOutcome::AlreadyExists
            );
        }
        assert!(!root.join(chunk(1, 16)).exists());

        // A deleted chunk is gone for everyone; the rest of its log stays.
        reader.delete(&chunk(1, 16)).await.unwrap();
        assert!(sidecar.get(&chunk(1, 16)).await.unwrap_err().is_not_found());
        assert_eq!(sidecar.get(&chunk(1, 32)).await.unwrap(), Bytes::from("1:321:321:32"));
        // Another store rewrote the sidecar's log: its next put goes to a new log, never into
        // the unlinked file.
        sidecar.put_if_absent(&chunk(1, 48), Bytes::from_static(b"after")).await.unwrap();
        assert_eq!(reader.get(&chunk(1, 48)).await.unwrap(), Bytes::from_static(b"after"));
        reader.delete_many(&[chunk(1, 0), chunk(1, 32), chunk(1, 48), chunk(2, 0)]).await.unwrap();
        let listed: Vec<String> = reader.list("pg/7/wal/").await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(listed, vec![segment.to_string(), chunk(2, 16), chunk(2, 32)]);
        let logs = std::fs::read_dir(root.join("pg/7/wal").join(LOG_DIR))
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(logs, 1, "segment 1's log went with its last chunk");

        // A chunk planted as a plain file (an older pitr, by hand) is one object with the record.
        std::fs::write(root.join(chunk(2, 16)), b"file").unwrap();
        let listed = reader.list("pg/7/wal/000000010000000000000002.").await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(reader.get(&chunk(2, 16)).await.unwrap(), Bytes::from_static(b"file"));
        reader.delete(&chunk(2, 16)).await.unwrap();
        assert!(reader.get(&chunk(2, 16)).await.unwrap_err().is_not_found(), "both gone");
        assert!(validate_name("pg/7/wal/.log/x").is_err(), "the log directory is not a name");
    }

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        assert_eq!(s.put_if_absent("a/b/c.seg", Bytes::from_static(b"one")).await.unwrap(), PutOutcome::Created);
        assert_eq!(s.put_if_absent("a/b/c.seg", Bytes::from_static(b"two")).await.unwrap(), PutOutcome::AlreadyExists);
        assert_eq!(&s.get("a/b/c.seg").await.unwrap()[..], b"one");
        assert_eq!(&s.get_range("a/b/c.seg", 1..10).await.unwrap()[..], b"ne");
        s.put_if_absent("a/d", Bytes::from_static(b"x")).await.unwrap();
        s.put_if_absent("z", Bytes::from_static(b"x")).await.unwrap();
        let names: Vec<_> = s.list("a/").await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(names, vec!["a/b/c.seg", "a/d"]);
        let names: Vec<_> = s.list("a/b/c").await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(names, vec!["a/b/c.seg"]);
        assert_eq!(s.list("").await.unwrap().len(), 3);
        assert_eq!(s.head("a/d").await.unwrap().unwrap().size, 1);
        s.delete("a/d").await.unwrap();
        s.delete("a/d").await.unwrap();
        s.put_if_absent("a/e", Bytes::from_static(b"x")).await.unwrap();
        s.delete_many(&["a/e".to_string(), "a/missing".to_string()]).await.unwrap();
        assert!(s.head("a/e").await.unwrap().is_none());
        assert!(s.head("a/d").await.unwrap().is_none());
        assert!(s.get("a/d").await.unwrap_err().is_not_found());
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("a/b")).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[tokio::test]
    async fn a_limited_get_refuses_a_bigger_object_unread() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::new(dir.path());
        local.put_if_absent("small", Bytes::from_static(b"12345")).await.unwrap();
        local.put_if_absent("big", Bytes::from(vec![1u8; 4096])).await.unwrap();
        for store in [&local as &dyn Store, &Folding(local.clone())] {
            assert_eq!(&store.get_limited("small", 5).await.unwrap()[..], b"12345");
            let err = store.get_limited("big", 1000).await.unwrap_err();
            assert!(matches!(err, StoreError::TooLarge { size: 4096, limit: 1000, .. }), "{err}");
            assert!(err.to_string().contains("big") && err.to_string().contains("4096"), "{err}");
            assert!(store.get_limited("missing", 10).await.unwrap_err().is_not_found());
        }
    }

    #[test]
    fn a_full_disk_is_named_with_the_repository() {
        let full = StoreError::Io {
            op: "put",
            name: "pg/1/wal/x.chunk".into(),
            location: "/repo".into(),
            cause: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let text = full.to_string();
        assert!(text.starts_with("repository /repo: no space left on device (put pg/1/wal/x.chunk)"), "{text}");
        let other = StoreError::Io {
            op: "put",
            name: "x".into(),
            location: "/repo".into(),
            cause: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(other.to_string().starts_with("put x in /repo: "), "{other}");
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", "/a", "a//b", "../x", "a/./b", "a b", "a/.tmp.x"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        validate_name("pg/7123/wal/000000010000000000000001.seg").unwrap();
    }

    #[tokio::test]
    async fn unwritable_root_is_an_error_naming_the_object() {
        let dir = tempfile::tempdir().unwrap();
        // "x" is a file, so the directory for "x/y" cannot be made (we run as root: modes don't stop us).
        std::fs::write(dir.path().join("x"), b"").unwrap();
        let s = LocalStore::new(dir.path());
        let err = s.put_if_absent("x/y", Bytes::from_static(b"1")).await.unwrap_err();
        assert!(err.to_string().contains("x/y"), "{err}");
        let missing = LocalStore::new(dir.path().join("not-mounted"));
        let err = missing.put_if_absent("a", Bytes::from_static(b"1")).await.unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!dir.path().join("not-mounted").exists());
    }

    /// Objects on both sides of the pacing's threshold, and one ending inside a step, come back
    /// byte for byte, also through a recycled file (longer before, cut to the new length).
    #[tokio::test]
    async fn paced_writes_put_every_byte() {
        use std::io::{Read, Seek};
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let sizes = [PACE_FROM - 1, PACE_FROM, PACE_FROM + PACE_STEP / 2 + 7, 3 * PACE_FROM + 1];
        for (i, size) in sizes.into_iter().enumerate() {
            let data: Vec<u8> = (0..size).map(|b| (b % 251) as u8 ^ i as u8).collect();
            let name = format!("paced/{i}");
            assert_eq!(store.put_if_absent(&name, Bytes::from(data.clone())).await.unwrap(), PutOutcome::Created);
            assert!(store.get(&name).await.unwrap() == data, "object of {size} bytes differs");
        }
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![9u8; 4 * PACE_FROM]).unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        let data = vec![1u8; PACE_FROM + 3];
        write_paced(&mut f, &data).unwrap();
        f.set_len(data.len() as u64).unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert!(back == data);
    }
}
