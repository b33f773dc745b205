//! Files of deleted small objects, kept by the local backend for later puts to write into.
//!
//! A busy local repository used to create a file per WAL chunk (hundreds a second) and delete
//! each one once its segment was compacted; the sidecar now appends chunks to logs
//! ([`crate::chunk_log`]), so what is pooled here is mostly completeness marks and lease
//! generations, and WAL chunks that other processes put. Creating a file is the costly part of such a put: on ext4 the
//! inode allocator looks again at every inode freed in the last seconds, which was over half of
//! the sidecar's CPU time (and of a synchronous commit's wait) under pgbench, measured with
//! `perf`. So a deleted small object's file is moved here instead of unlinked, and a later put
//! overwrites it and links it under its new name, as PostgreSQL recycles WAL segment files.
//!
//! What keeps this safe:
//! - The directory is `<root>/.tmp.recycle/`; no object name may contain a `.tmp.` component and
//!   listings skip them, so a pooled file is never an object.
//! - Only files this process moved here are reused (each pool knows its own), and only after
//!   [`MIN_AGE`]: a reader that opened the object just before it was deleted reads its old bytes,
//!   as after an unlink. (A reader stalled longer gets an authentication error, never wrong
//!   data: objects are sealed with their own name.)
//! - A file is reused only while it has exactly one link. A crash between linking a reused file
//!   under its new name and removing its pool name leaves two links; such a file is only ever
//!   unlinked from the pool, never written again.
//! - Only the sidecar pools (a short-lived command would just leave its files behind); it
//!   unlinks its pool when it stops cleanly ([`RecyclePool::release`]), and files pooled longer
//!   than [`STALE_AFTER`] (a killed process's) are unlinked by the next one, every
//!   [`STALE_AFTER`].

use std::collections::VecDeque;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The pool's directory under the repository root.
pub(crate) const RECYCLE_DIR: &str = ".tmp.recycle";
/// Only objects up to this size are pooled: WAL chunks, not segments or blocks, so the pool never
/// holds more than [`CAPACITY`] × this of disk space.
const MAX_BYTES: u64 = 64 << 10;
/// At most this many files wait in the pool; more are unlinked as before.
const CAPACITY: usize = 4096;
/// How long a pooled file waits before it is written again.
pub(crate) const MIN_AGE: Duration = Duration::from_secs(2);
/// Pool files older than this (by ctime, which the move into the pool sets) belong to no one.
const STALE_AFTER: Duration = Duration::from_secs(600);

/// This process's pooled files, oldest first.
#[derive(Debug)]
pub(crate) struct RecyclePool {
    dir: PathBuf,
    min_age: Duration,
    files: Mutex<VecDeque<(PathBuf, Instant)>>,
    next: AtomicU64,
    /// When this process last unlinked stale pool files (`None`: not yet).
    swept: Mutex<Option<Instant>>,
    /// Released ([`RecyclePool::release`]): nothing more is pooled.
    released: std::sync::atomic::AtomicBool,
}

impl RecyclePool {
    /// The pool of the repository at `root`, reusing files after `min_age`.
    pub fn new(root: &Path, min_age: Duration) -> RecyclePool {
        RecyclePool {
            dir: root.join(RECYCLE_DIR),
            min_age,
            files: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
            swept: Mutex::new(None),
            released: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn files(&self) -> std::sync::MutexGuard<'_, VecDeque<(PathBuf, Instant)>> {
        // The queue holds only paths; a panic elsewhere cannot leave it inconsistent.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the object file at `path` into the pool instead of deleting it. `Ok(false)` when it
    /// is not worth keeping (too big, not a plain singly-linked file, pool full, or another
    /// filesystem): then the caller unlinks it. `NotFound` when there is no such file.
    pub fn take_in(&self, path: &Path) -> std::io::Result<bool> {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.file_type().is_file()
            || meta.nlink() != 1
            || meta.len() > MAX_BYTES
            || self.files().len() >= CAPACITY
            || self.released.load(Ordering::Relaxed)
        {
            return Ok(false);
        }
        let sweep_due = {
            let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
            let due = !matches!(*swept, Some(at) if at.elapsed() < STALE_AFTER);
            if due {
                *swept = Some(Instant::now());
            }
            due
        };
        if sweep_due {
            self.sweep_stale();
        }
        match std::fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => return Ok(false),
        }
        let name = format!("{}.{}", std::process::id(), self.next.fetch_add(1, Ordering::Relaxed));
        let pooled = self.dir.join(name);
        match std::fs::rename(path, &pooled) {
            Ok(()) => {
                self.files().push_back((pooled, Instant::now()));
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(e),
            // EXDEV (the object's directory is another mount) or anything else: just unlink.
            Err(_) => Ok(false),
        }
    }

    /// A pooled file old enough to be written again, opened for writing, and its pool path.
    pub fn take_out(&self) -> Option<(PathBuf, std::fs::File)> {
        loop {
            let (path, _) = {
                let mut files = self.files();
                match files.front() {
                    Some((_, pooled_at)) if pooled_at.elapsed() >= self.min_age => files.pop_front()?,
                    _ => return None,
                }
            };
            let opened = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(&path);
            let Ok(file) = opened else { continue };
            match file.metadata() {
                Ok(m) if m.file_type().is_file() && m.nlink() == 1 => return Some((path, file)),
                // Linked elsewhere too (or unreadable): drop the pool's name, never write it.
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// Unlinks every file waiting in the pool and pools nothing more: the process is stopping.
    pub fn release(&self) {
        self.released.store(true, Ordering::Relaxed);
        for (path, _) in self.files().drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Unlinks pool files no live process is waiting to reuse.
    fn sweep_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let now = std::time::SystemTime::now();
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let changed = std::time::UNIX_EPOCH + Duration::from_secs(meta.ctime().max(0) as u64);
            if now.duration_since(changed).is_ok_and(|age| age > STALE_AFTER) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

impl Drop for RecyclePool {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_file_is_reused_only_when_old_enough_and_singly_linked() {
        let dir = tempfile::tempdir().unwrap();
        let pool = RecyclePool::new(dir.path(), Duration::ZERO);
        let object = dir.path().join("a");
        std::fs::write(&object, b"old").unwrap();
        assert!(pool.take_in(&object).unwrap());
        assert!(!object.exists());
        let (path, _) = pool.take_out().unwrap();
        assert!(path.starts_with(dir.path().join(RECYCLE_DIR)));
        assert!(pool.take_out().is_none());

        // Two links (a crash between link and unlink): never handed out, its pool name dropped.
        std::fs::write(&object, b"x").unwrap();
        assert!(pool.take_in(&object).unwrap());
        let pooled = pool.files().front().unwrap().0.clone();
        std::fs::hard_link(&pooled, dir.path().join("live")).unwrap();
        assert!(pool.take_out().is_none());
        assert!(!pooled.exists());
        assert_eq!(std::fs::read(dir.path().join("live")).unwrap(), b"x");

        // Too young.
        let young = RecyclePool::new(dir.path(), Duration::from_secs(3600));
        std::fs::write(&object, b"y").unwrap();
        assert!(young.take_in(&object).unwrap());
        assert!(young.take_out().is_none());
    }

    #[test]
    fn big_linked_and_missing_files_are_not_pooled() {
        let dir = tempfile::tempdir().unwrap();
        let pool = RecyclePool::new(dir.path(), Duration::ZERO);
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; MAX_BYTES as usize + 1]).unwrap();
        assert!(!pool.take_in(&big).unwrap());
        let linked = dir.path().join("linked");
        std::fs::write(&linked, b"x").unwrap();
        std::fs::hard_link(&linked, dir.path().join("other")).unwrap();
        assert!(!pool.take_in(&linked).unwrap());
        assert_eq!(pool.take_in(&dir.path().join("missing")).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
}
