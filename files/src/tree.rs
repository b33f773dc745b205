//! File-tree backups (`[[files]]` sets): what a backup of a directory is made of, and taking,
//! restoring and checking one.
//!
//! ```text
//! files/sets/<set>/<backup id>.manifest    sealed JSON: a TreeManifest (written last)
//! files/blocks/<hh>/<hash>                 file content, shared with every set and dump
//! ```
//! Every manifest lists the whole tree (an incremental differs from a full only in how it was
//! taken: unchanged files were not read again), so a restore reads one manifest. A backup without
//! a manifest does not exist: its blocks are unreferenced and the next sweep removes them.
//!
//! Paths in a manifest are relative to the set's root, `/`-separated, in UTF-8. A name that is
//! not UTF-8 cannot be written that way: such a file (or directory, with everything under it) is
//! left out and listed in [`TreeManifest::skipped`], as are sockets, FIFOs, devices and mount
//! points below the root (a backup stays on the root's filesystem, like `rsync -x`).

mod backup;
mod live;
mod restore;
mod walk;

use pitr_archive::names;
use pitr_archive::{ObjectKind, ObjectMeta, PutOutcome, Repository, RepositoryError};
use serde::{Deserialize, Serialize};

use crate::manifests::{self, SetManifest};
use crate::{BlockRef, FilesError};

pub use backup::{backup, BackupProgress, SetSpec};
pub use live::{compare_live, LiveDifference, LiveReport};
pub use restore::{restore, select_time, RestoreOptions, RestoreSummary};
pub use walk::Excludes;

/// How a backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TreeKind {
    /// Every file was read.
    Full,
    /// Files whose size, mtime, ctime and inode equal the parent's entry were not read: their
    /// blocks and checksum are the parent's.
    Incremental,
}

impl TreeKind {
    /// `full` or `incremental`, as manifests, listings and metrics labels say it.
    pub fn word(self) -> &'static str {
        match self {
            TreeKind::Full => "full",
            TreeKind::Incremental => "incremental",
        }
    }
}

impl std::fmt::Display for TreeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

/// What a path is, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file: its content is these blocks' plaintexts, concatenated.
    File {
        /// Bytes.
        size: u64,
        /// SHA-256 of the content, lower-case hex (what `sha256sum` prints).
        sha256: String,
        /// The content's blocks, in order.
        blocks: Vec<BlockRef>,
    },
    /// A directory (its contents are entries of their own).
    Dir,
    /// A symbolic link, never followed.
    Symlink {
        /// What it points to, as `readlink` says.
        target: String,
    },
}

/// One path of a backed-up tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Relative to the set's root, `/`-separated; `.` is the root directory itself.
    pub path: String,
    /// File, directory or symlink.
    #[serde(flatten)]
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last modification, seconds since the Unix epoch.
    pub mtime: i64,
    /// Nanoseconds of `mtime`.
    pub mtime_nsec: u32,
    /// Last status change, seconds (an incremental compares it to see whether a file changed).
    pub ctime: i64,
    /// Nanoseconds of `ctime`.
    pub ctime_nsec: u32,
    /// Inode number (an incremental compares it: a file replaced by a rename gets another).
    pub inode: u64,
}

impl TreeEntry {
    /// The file's size; 0 for directories and symlinks.
    pub fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File { size, .. } => *size,
            _ => 0,
        }
    }

    /// `file`, `dir` or `symlink`.
    pub fn kind_word(&self) -> &'static str {
        match self.kind {
            EntryKind::File { .. } => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink { .. } => "symlink",
        }
    }
}

/// A path the backup left out, with why (not UTF-8, a socket, another filesystem, vanished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The path relative to the root (lossily decoded where it is not UTF-8).
    pub path: String,
    /// Why it is not in the backup.
    pub why: String,
}

/// What a file-tree backup is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeManifest {
    /// The file set (`[[files]] name`).
    pub set: String,
    /// The backup id: its start in UTC, `YYYYMMDDTHHMMSSZ`.
    pub id: String,
    /// Full or incremental.
    pub kind: TreeKind,
    /// The backup an incremental compared against (informational: this manifest is complete).
    pub parent: Option<String>,
    /// The set's root as it was configured when the backup ran.
    pub root: String,
    /// µs since the Unix epoch: when the walk began.
    pub start_time_us: i64,
    /// µs since the Unix epoch: when the last block was durable. A restore `--to TIME` picks the
    /// newest backup that stopped at or before TIME.
    pub stop_time_us: i64,
    /// Every path backed up, sorted by path.
    pub entries: Vec<TreeEntry>,
    /// Files that kept changing while the backup read them (3 reads): their content is the last
    /// read's, which may be torn.
    pub changed: Vec<String>,
    /// Paths left out, with why.
    pub skipped: Vec<Skipped>,
    /// Regular files in `entries`.
    pub files: u64,
    /// Directories in `entries` (the root included).
    pub dirs: u64,
    /// Symlinks in `entries`.
    pub symlinks: u64,
    /// Bytes of every file's content.
    pub logical_bytes: u64,
    /// Bytes read from the tree (an incremental reads only changed files; rereads count).
    pub bytes_read: u64,
    /// Blocks this backup put.
    pub new_blocks: u64,
    /// Blocks it found stored already (or reused from the parent without reading).
    pub reused_blocks: u64,
    /// Bytes this backup's new blocks take in the repository (sealed), the manifest not included.
    pub stored_bytes: u64,
}

impl TreeManifest {
    /// The entry at `path`.
    pub fn entry(&self, path: &str) -> Option<&TreeEntry> {
        self.entries.binary_search_by(|e| e.path.as_str().cmp(path)).ok().map(|i| &self.entries[i])
    }

    /// Seals and puts the manifest (create-only). Call it last, once every block is durable.
    pub async fn store(&self, repo: &Repository) -> Result<PutOutcome, FilesError> {
        let name = names::files::tree_manifest(&self.set, &self.id);
        let json = serde_json::to_vec(self)
            .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: format!("serialising: {e}") })?;
        Ok(repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await?)
    }

    /// Opens and parses the manifest of backup `id` of `set`; one whose fields disagree with its
    /// name, or whose entries are not sorted and unique, is [`RepositoryError::Invalid`].
    pub async fn load(repo: &Repository, set: &str, id: &str) -> Result<TreeManifest, FilesError> {
        let name = names::files::tree_manifest(set, id);
        let (_, json) = repo.get_opened(&name).await?;
        let m: TreeManifest = serde_json::from_slice(&json)
            .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: format!("file-set manifest: {e}") })?;
        if m.set != set || m.id != id {
            let what = format!("it says it is backup {} of set {}", m.id, m.set);
            return Err(RepositoryError::Invalid { name, what }.into());
        }
        if let Some(w) = m.entries.windows(2).find(|w| w[0].path >= w[1].path) {
            let what = format!("entries are not sorted and unique at {:?}", w[1].path);
            return Err(RepositoryError::Invalid { name, what }.into());
        }
        Ok(m)
    }

    /// Every backup of `set` (or of every set, with `None`), oldest first. Strict: a manifest that
    /// cannot be read is an error, for the block sweep, which must know every reference.
    pub async fn list(repo: &Repository, set: Option<&str>) -> Result<Vec<TreeManifest>, FilesError> {
        manifests::list_strict(repo, set).await
    }

    /// Every backup of `set` (or of every set) that opens, oldest first, and the manifest names
    /// that do not, with why: for listings, restores and verify, which a planted or damaged
    /// manifest must not stop. Storage errors stay errors.
    pub async fn list_sound(
        repo: &Repository,
        set: Option<&str>,
    ) -> Result<(Vec<TreeManifest>, Vec<(String, String)>), FilesError> {
        manifests::list_sound(repo, set).await
    }

    /// The set names that have at least one manifest name under `files/sets/`.
    pub async fn set_names(repo: &Repository) -> Result<Vec<String>, FilesError> {
        let mut sets: Vec<String> = repo
            .list(names::files::SETS)
            .await?
            .iter()
            .filter_map(|o| names::files::parse_tree_manifest(&o.name).map(|(set, _)| set.to_string()))
            .collect();
        sets.dedup();
        sets.sort();
        sets.dedup();
        Ok(sets)
    }
}

impl SetManifest for TreeManifest {
    type Order = (String, i64, String);

    fn prefix(set: Option<&str>) -> String {
        set.map_or_else(|| names::files::SETS.to_string(), names::files::sets_prefix)
    }

    fn parse_name(name: &str) -> Option<(&str, &str)> {
        names::files::parse_tree_manifest(name)
    }

    async fn load(repo: &Repository, set: &str, id: &str) -> Result<Self, FilesError> {
        TreeManifest::load(repo, set, id).await
    }

    fn order(&self) -> Self::Order {
        (self.set.clone(), self.stop_time_us, self.id.clone())
    }
}

/// Whether `path` is a manifest path a restore may write: `.`, or `/`-separated components none
/// of which is empty, `.` or `..`, with no NUL. A path that fails lets a planted manifest write
/// outside the target directory.
pub fn safe_path(path: &str) -> bool {
    path == "." || (!path.contains('\0') && path.split('/').all(|c| !c.is_empty() && c != "." && c != ".."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::{KeyRing, LocalStore};
    use std::sync::Arc;

    pub(crate) fn manifest(set: &str, id: &str, stop: i64) -> TreeManifest {
        TreeManifest {
            set: set.into(),
            id: id.into(),
            kind: TreeKind::Full,
            parent: None,
            root: "/data".into(),
            start_time_us: stop - 1,
            stop_time_us: stop,
            entries: vec![TreeEntry {
                path: ".".into(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 1,
                mtime_nsec: 0,
                ctime: 1,
                ctime_nsec: 0,
                inode: 1,
            }],
            changed: vec![],
            skipped: vec![],
            files: 0,
            dirs: 1,
            symlinks: 0,
            logical_bytes: 0,
            bytes_read: 0,
            new_blocks: 0,
            reused_blocks: 0,
            stored_bytes: 0,
        }
    }

    #[test]
    fn safe_paths() {
        for ok in [".", "a", "a/b.txt", "..a/b..", "a/.hidden"] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a/", "./a", "a\0b", ".."] {
            assert!(!safe_path(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn manifests_list_by_set_and_time_and_a_misnamed_one_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [1; 32]));
        manifest("up", "20261206T020000Z", 20).store(&repo).await.unwrap();
        manifest("up", "20261206T010000Z", 10).store(&repo).await.unwrap();
        manifest("cfg", "20261206T010000Z", 5).store(&repo).await.unwrap();
        let up = TreeManifest::list(&repo, Some("up")).await.unwrap();
        assert_eq!(up.iter().map(|m| m.stop_time_us).collect::<Vec<_>>(), [10, 20]);
        assert_eq!(TreeManifest::list(&repo, None).await.unwrap().len(), 3);
        assert_eq!(TreeManifest::set_names(&repo).await.unwrap(), ["cfg", "up"]);
        assert_eq!(
            manifest("up", "20261206T020000Z", 20).store(&repo).await.unwrap(),
            PutOutcome::AlreadyExists,
            "manifests are create-only"
        );

        let moved = manifest("up", "20261206T010000Z", 99);
        let name = names::files::tree_manifest("up", "20261207T010000Z");
        repo.put_sealed(&name, serde_json::to_vec(&moved).unwrap(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        assert!(TreeManifest::list(&repo, Some("up")).await.is_err());
        let (sound, damaged) = TreeManifest::list_sound(&repo, Some("up")).await.unwrap();
        assert_eq!(sound.len(), 2);
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert!(damaged[0].1.contains("it says it is backup"), "{damaged:?}");
    }
}
