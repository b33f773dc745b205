//! Walking a set's tree: what a backup reads and `verify --live` compares, by the same rules.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use glob::{MatchOptions, Pattern};

use super::{EntryKind, Skipped, TreeEntry};
use crate::FilesError;

/// A set's `exclude` patterns. A pattern without `/` matches a name at any depth (`*.tmp`); one
/// with `/` matches the whole relative path (`cache/**`: everything under `cache`, whose
/// directory itself stays, empty). `*` does not cross `/`; `**` does.
#[derive(Debug, Clone, Default)]
pub struct Excludes {
    names: Vec<Pattern>,
    paths: Vec<Pattern>,
}

pub(crate) const MATCH: MatchOptions =
    MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: false };

impl Excludes {
    /// Compiles `patterns`; a bad one is an error naming it.
    pub fn new(patterns: &[String]) -> Result<Excludes, FilesError> {
        let mut out = Excludes::default();
        for p in patterns {
            let compiled =
                Pattern::new(p).map_err(|e| FilesError::Other(format!("exclude pattern {p:?}: {}", e.msg)))?;
            if p.contains('/') {
                out.paths.push(compiled);
            } else {
                out.names.push(compiled);
            }
        }
        Ok(out)
    }

    /// Whether the relative path `rel` is excluded.
    pub fn excludes(&self, rel: &str) -> bool {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        self.names.iter().any(|p| p.matches_with(name, MATCH)) || self.paths.iter().any(|p| p.matches_with(rel, MATCH))
    }
}

/// One path found by [`walk`].
#[derive(Debug)]
pub(crate) struct Found {
    pub rel: String,
    pub abs: PathBuf,
    pub meta: Metadata,
}

/// The root and everything below it that a backup takes, sorted by path (directories before
/// their contents), and what it leaves out. A single-file root is the entry named after it.
/// The configured root may itself be a symlink (`/app/storage -> /mnt/data`): it is followed,
/// nothing below it is.
pub(crate) fn walk(configured: &Path, excludes: &Excludes) -> Result<(Vec<Found>, Vec<Skipped>), FilesError> {
    let resolved = std::fs::canonicalize(configured).map_err(|e| FilesError::io(configured, e))?;
    let root = resolved.as_path();
    let meta = std::fs::symlink_metadata(root).map_err(|e| FilesError::io(root, e))?;
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    if meta.is_file() {
        // Named as configured, not as the link's target.
        let name = configured
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| FilesError::Other(format!("{}: the file's name is not UTF-8", configured.display())))?;
        found.push(Found { rel: name.to_string(), abs: root.to_path_buf(), meta });
        return Ok((found, skipped));
    }
    if !meta.is_dir() {
        return Err(FilesError::Other(format!("{}: not a directory or a regular file", configured.display())));
    }
    let dev = meta.dev();
    found.push(Found { rel: ".".into(), abs: root.to_path_buf(), meta });
    descend(root, "", dev, excludes, &mut found, &mut skipped)?;
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((found, skipped))
}

fn descend(
    dir: &Path,
    prefix: &str,
    dev: u64,
    excludes: &Excludes,
    found: &mut Vec<Found>,
    skipped: &mut Vec<Skipped>,
) -> Result<(), FilesError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Removed since its parent was listed: like a vanished file, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skipped.push(Skipped {
                path: prefix.trim_end_matches('/').to_string(),
                why: "vanished during the backup".into(),
            });
            return Ok(());
        }
        Err(e) => return Err(FilesError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| FilesError::io(dir, e))?;
        let abs = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            let lossy = format!("{prefix}{}", entry.file_name().to_string_lossy());
            skipped.push(Skipped { path: lossy, why: "the name is not UTF-8".into() });
            continue;
        };
        let rel = format!("{prefix}{name}");
        if excludes.excludes(&rel) {
            continue;
        }
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                skipped.push(Skipped { path: rel, why: "vanished during the backup".into() });
                continue;
            }
            Err(e) => return Err(FilesError::io(&abs, e)),
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            if meta.dev() != dev {
                skipped.push(Skipped { path: rel, why: "a mount point: another filesystem".into() });
                continue;
            }
            let sub = format!("{rel}/");
            found.push(Found { rel, abs: abs.clone(), meta });
            descend(&abs, &sub, dev, excludes, found, skipped)?;
        } else if ft.is_file() || ft.is_symlink() {
            found.push(Found { rel, abs, meta });
        } else {
            skipped
                .push(Skipped { path: rel, why: "not a file, directory or symlink (socket, FIFO or device)".into() });
        }
    }
    Ok(())
}

/// The manifest entry of a found path, with `kind` for its content.
pub(crate) fn entry_of(found: &Found, kind: EntryKind) -> TreeEntry {
    let m = &found.meta;
    TreeEntry {
        path: found.rel.clone(),
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec() as u32,
        inode: m.ino(),
    }
}

/// A symlink's target as a manifest keeps it; `None` when it is not UTF-8.
pub(crate) fn link_target(abs: &Path) -> Result<Option<String>, std::io::Error> {
    Ok(std::fs::read_link(abs)?.into_os_string().into_string().ok())
}

/// What tells whether a file changed: size, mtime and ctime.
pub(crate) fn stamp(m: &Metadata) -> (u64, i64, i64, i64, i64) {
    (m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlinked_root_is_followed_and_a_single_file_is_named_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/secret-123"), b"x").unwrap();
        std::os::unix::fs::symlink("data", dir.path().join("storage")).unwrap();
        std::os::unix::fs::symlink("data/secret-123", dir.path().join(".env")).unwrap();
        let (found, _) = walk(&dir.path().join("storage"), &Excludes::default()).unwrap();
        assert_eq!(found.iter().map(|f| f.rel.as_str()).collect::<Vec<_>>(), [".", "secret-123"]);
        let (found, _) = walk(&dir.path().join(".env"), &Excludes::default()).unwrap();
        assert_eq!(found.iter().map(|f| f.rel.as_str()).collect::<Vec<_>>(), [".env"]);
        assert!(walk(&dir.path().join("missing"), &Excludes::default()).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn names_that_are_not_utf8_and_special_files_are_skipped_and_listed() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
        std::fs::create_dir(&odd).unwrap();
        std::fs::write(odd.join("inside"), b"x").unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("pipe").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::write(dir.path().join("plain"), b"x").unwrap();
        let (found, skipped) = walk(dir.path(), &Excludes::default()).unwrap();
        assert_eq!(found.iter().map(|f| f.rel.as_str()).collect::<Vec<_>>(), [".", "plain"]);
        let mut skipped: Vec<(String, String)> = skipped.into_iter().map(|s| (s.path, s.why)).collect();
        skipped.sort();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].0.starts_with("caf") && skipped[0].1.contains("not UTF-8"), "{skipped:?}");
        assert!(skipped[1].0 == "pipe" && skipped[1].1.contains("FIFO"), "{skipped:?}");
    }

    #[test]
    fn name_patterns_match_at_any_depth_and_path_patterns_the_whole_path() {
        let x = Excludes::new(&["*.tmp".into(), "cache/**".into()]).unwrap();
        assert!(x.excludes("a.tmp"));
        assert!(x.excludes("deep/down/b.tmp"));
        assert!(!x.excludes("a.tmp.keep"));
        assert!(x.excludes("cache/x"));
        assert!(x.excludes("cache/y/z"));
        assert!(!x.excludes("cache"), "the directory itself stays");
        assert!(!x.excludes("other/cache/x"));
        assert!(Excludes::new(&["[".into()]).is_err());
    }
}
