//! `verify --live`: the newest backup of a set against the tree as it is now.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::walk::{self, entry_of, link_target, open_in_tree, stamp, Found};
use super::{EntryKind, SetSpec, TreeEntry, TreeManifest};
use crate::FilesError;

/// One path that differs, with how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveDifference {
    /// Relative to the set's root.
    pub path: String,
    /// What differs, in words.
    pub what: String,
}

/// Every difference between a backup and the live tree; each path is in one list at most.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LiveReport {
    /// The set.
    pub set: String,
    /// The backup compared against.
    pub backup: String,
    /// Paths compared (live tree).
    pub checked: u64,
    /// In the tree, not in the backup.
    pub added: Vec<String>,
    /// In the backup, not in the tree.
    pub removed: Vec<String>,
    /// Content (or kind, or symlink target) differs.
    pub modified: Vec<LiveDifference>,
    /// Same content; mode, owner or mtime differ.
    pub metadata: Vec<LiveDifference>,
    /// Content differs although size, mtime and ctime are the backup's (and the file was
    /// settled when it was backed up): silent corruption. A rewrite that kept the mtime moves
    /// the ctime and is `modified`.
    pub corrupt: Vec<LiveDifference>,
}

impl LiveReport {
    /// Whether the tree is exactly the backup.
    pub fn is_clean(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.modified.is_empty()
            && self.metadata.is_empty()
            && self.corrupt.is_empty()
    }
}

/// Compares `backup` with `set`'s live tree, walked by the backup's rules (excludes, one
/// filesystem). Reads every file whose size matches, to compare checksums.
pub async fn compare_live(set: &SetSpec, backup: &TreeManifest) -> Result<LiveReport, FilesError> {
    let (set, backup) = (set.clone(), backup.clone());
    tokio::task::spawn_blocking(move || compare(&set, &backup))
        .await
        .map_err(|e| FilesError::Other(format!("comparing the live tree: {e}")))?
}

fn compare(set: &SetSpec, backup: &TreeManifest) -> Result<LiveReport, FilesError> {
    let (found, _) = walk::walk(&set.root, &set.excludes)?;
    let mut report = LiveReport { set: set.name.clone(), backup: backup.id.clone(), ..Default::default() };
    let mut old: BTreeMap<&str, &TreeEntry> = backup.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    for f in &found {
        report.checked += 1;
        let Some(was) = old.remove(f.rel.as_str()) else {
            report.added.push(f.rel.clone());
            continue;
        };
        let diff = |what: String| LiveDifference { path: f.rel.clone(), what };
        match (&was.kind, f.meta.file_type()) {
            (EntryKind::File { size, sha256, .. }, ft) if ft.is_file() => {
                if f.meta.size() != *size {
                    report.modified.push(diff(format!("size {} → {}", size, f.meta.size())));
                    continue;
                }
                let (now, opened) = match sha256_of(f)? {
                    Hashed::Vanished => {
                        report.removed.push(f.rel.clone());
                        continue;
                    }
                    Hashed::Moving => {
                        report.modified.push(diff("it changed while it was read".into()));
                        continue;
                    }
                    Hashed::Steady { sha256, meta } => (sha256, meta),
                };
                if &now != sha256 {
                    let stamps =
                        |m: &std::fs::Metadata| (m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec());
                    let recorded = (*size, was.mtime, i64::from(was.mtime_nsec), was.ctime, i64::from(was.ctime_nsec));
                    if backup.changed.contains(&f.rel) {
                        // Its backed-up content is a read of a moving file, not a settled one.
                        report.modified.push(diff("content differs (it kept changing during the backup)".into()));
                    } else if was.ctime != 0 && stamps(&opened) == recorded {
                        // Size, mtime and ctime as backed up: nothing wrote it through the
                        // filesystem since, yet its content moved.
                        report.corrupt.push(diff(format!(
                            "content differs (sha256 {now}, backup {sha256}) with the same size, mtime and ctime"
                        )));
                    } else if was.ctime == 0 && (opened.mtime(), opened.mtime_nsec()) == (recorded.1, recorded.2) {
                        report.modified.push(diff(
                            "content differs with the same size and mtime; the backup read it just after it was written (no ctime recorded), so no verdict of corruption"
                                .into(),
                        ));
                    } else if (opened.size(), opened.mtime(), opened.mtime_nsec())
                        == (recorded.0, recorded.1, recorded.2)
                    {
                        report.modified.push(diff(
                            "content differs with the same size and mtime, but it was written since the backup (ctime moved: a writer that keeps the mtime, such as rsync -t or cp -p)"
                                .into(),
                        ));
                    } else {
                        report.modified.push(diff("content differs".into()));
                    }
                    continue;
                }
                if let Some(what) = metadata_differs(was, f, true) {
                    report.metadata.push(diff(what));
                }
            }
            (EntryKind::Dir, ft) if ft.is_dir() => {
                // A directory's mtime moves with every file added or removed in it: those are
                // listed themselves.
                if let Some(what) = metadata_differs(was, f, false) {
                    report.metadata.push(diff(what));
                }
            }
            (EntryKind::Symlink { target }, ft) if ft.is_symlink() => {
                match link_target(&f.abs) {
                    Ok(Some(now)) if &now == target => {
                        // A symlink's mode means nothing on Linux.
                        let mut was = was.clone();
                        was.mode = f.meta.mode() & 0o7777;
                        if let Some(what) = metadata_differs(&was, f, true) {
                            report.metadata.push(diff(what));
                        }
                    }
                    Ok(now) => report.modified.push(diff(format!(
                        "symlink target {target:?} → {:?}",
                        now.unwrap_or_else(|| "(not UTF-8)".into())
                    ))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.removed.push(f.rel.clone()),
                    Err(e) => return Err(FilesError::io(&f.abs, e)),
                }
            }
            (_, ft) => {
                let now = if ft.is_dir() {
                    "dir"
                } else if ft.is_symlink() {
                    "symlink"
                } else {
                    "file"
                };
                report.modified.push(diff(format!("was a {}, now a {now}", was.kind_word())));
            }
        }
    }
    report.removed.extend(old.into_keys().map(str::to_string));
    report.removed.sort();
    Ok(report)
}

fn metadata_differs(was: &TreeEntry, f: &Found, with_mtime: bool) -> Option<String> {
    let now = entry_of(f, EntryKind::Dir);
    let mut what = Vec::new();
    if now.mode != was.mode {
        what.push(format!("mode {:04o} → {:04o}", was.mode, now.mode));
    }
    if (now.uid, now.gid) != (was.uid, was.gid) {
        what.push(format!("owner {}:{} → {}:{}", was.uid, was.gid, now.uid, now.gid));
    }
    if with_mtime && (now.mtime, now.mtime_nsec) != (was.mtime, was.mtime_nsec) {
        what.push(format!("mtime {}.{:09} → {}.{:09}", was.mtime, was.mtime_nsec, now.mtime, now.mtime_nsec));
    }
    (!what.is_empty()).then(|| what.join(", "))
}

/// A file's content as `verify --live` read it.
enum Hashed {
    /// Gone since the walk.
    Vanished,
    /// Its size, mtime or ctime moved while it was read: no verdict on its content.
    Moving,
    /// Read whole with its stamps unchanged across the read, which `meta` holds.
    Steady { sha256: String, meta: std::fs::Metadata },
}

/// The file's SHA-256, read through its directory as walked, never following a symlink.
fn sha256_of(f: &Found) -> Result<Hashed, FilesError> {
    let path: &Path = &f.abs;
    let mut file = match open_in_tree(f) {
        Ok(Some(file)) => file,
        Ok(None) => return Ok(Hashed::Moving),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Hashed::Vanished),
        // Replaced by a symlink since the walk.
        Err(e) if [Some(libc::ELOOP), Some(libc::ENOTDIR)].contains(&e.raw_os_error()) => return Ok(Hashed::Moving),
        Err(e) => return Err(FilesError::io(path, e)),
    };
    let before = file.metadata().map_err(|e| FilesError::io(path, e))?;
    if !before.is_file() {
        return Ok(Hashed::Moving);
    }
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| FilesError::io(path, e))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    let after = file.metadata().map_err(|e| FilesError::io(path, e))?;
    if stamp(&before) != stamp(&after) {
        return Ok(Hashed::Moving);
    }
    Ok(Hashed::Steady { sha256: hex::encode(sha.finalize()), meta: after })
}
