//! Walking a set's tree: what a backup reads and `verify --live` compares, by the same rules.

use std::ffi::{CStr, CString, OsString};
use std::fs::{File, Metadata};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
    /// (device, inode) of the directory the walk found it in; `None` for the root.
    pub dir: Option<(u64, u64)>,
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
        found.push(Found { rel: name.to_string(), abs: root.to_path_buf(), meta, dir: None });
        return Ok((found, skipped));
    }
    if !meta.is_dir() {
        return Err(FilesError::Other(format!("{}: not a directory or a regular file", configured.display())));
    }
    let dev = meta.dev();
    let id = (meta.dev(), meta.ino());
    found.push(Found { rel: ".".into(), abs: root.to_path_buf(), meta, dir: None });
    descend(root, id, "", dev, excludes, &mut found, &mut skipped)?;
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((found, skipped))
}

fn descend(
    dir: &Path,
    listed: (u64, u64),
    prefix: &str,
    dev: u64,
    excludes: &Excludes,
    found: &mut Vec<Found>,
    skipped: &mut Vec<Skipped>,
) -> Result<(), FilesError> {
    let rel_dir = || prefix.trim_end_matches('/').to_string();
    let names = match list_dir(dir, listed) {
        Ok(Some(names)) => names,
        Ok(None) => {
            skipped.push(Skipped { path: rel_dir(), why: "replaced during the backup".into() });
            return Ok(());
        }
        // Removed since its parent was listed: like a vanished file, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skipped.push(Skipped { path: rel_dir(), why: "vanished during the backup".into() });
            return Ok(());
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) => {
            skipped.push(Skipped { path: rel_dir(), why: "replaced by a symlink during the backup".into() });
            return Ok(());
        }
        Err(e) => return Err(FilesError::io(dir, e)),
    };
    for file_name in names {
        let abs = dir.join(&file_name);
        let Some(name) = file_name.to_str().map(str::to_string) else {
            let lossy = format!("{prefix}{}", file_name.to_string_lossy());
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
            let id = (meta.dev(), meta.ino());
            found.push(Found { rel, abs: abs.clone(), meta, dir: Some(listed) });
            descend(&abs, id, &sub, dev, excludes, found, skipped)?;
        } else if ft.is_file() || ft.is_symlink() {
            found.push(Found { rel, abs, meta, dir: Some(listed) });
        } else {
            skipped
                .push(Skipped { path: rel, why: "not a file, directory or symlink (socket, FIFO or device)".into() });
        }
    }
    Ok(())
}

/// The names in directory `dir`, read through a handle opened without following a symlink;
/// `None` when what opened is not the directory `listed` (device, inode) that was stat'ed: it was
/// replaced since, and following it could read outside the tree.
fn list_dir(dir: &Path, listed: (u64, u64)) -> std::io::Result<Option<Vec<OsString>>> {
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)?;
    let m = handle.metadata()?;
    if (m.dev(), m.ino()) != listed {
        return Ok(None);
    }
    read_names(handle.into()).map(Some)
}

/// Opens the regular file `f` for reading through the directory the walk found it in, never
/// following a symlink (and, O_NONBLOCK, never hanging on a FIFO swapped in: the caller checks
/// that what opened is a regular file); `None` when that directory is not the one walked any
/// more (replaced).
pub(crate) fn open_in_tree(f: &Found) -> std::io::Result<Option<File>> {
    let plain = |path: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    };
    let (Some(listed), Some(parent), Some(name)) = (f.dir, f.abs.parent(), f.abs.file_name()) else {
        // The root itself (a single-file set): as configured.
        return plain(&f.abs).map(Some);
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(parent)?;
    let m = dir.metadata()?;
    if (m.dev(), m.ino()) != listed {
        return Ok(None);
    }
    let name = CString::new(name.as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `dir` is an open directory and `name` NUL-terminated.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
}

/// Every name in the open directory `fd` but `.` and `..`.
pub(crate) fn read_names(fd: OwnedFd) -> std::io::Result<Vec<OsString>> {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` is an open directory descriptor we own; fdopendir takes it over on success.
    let dir = unsafe { libc::fdopendir(raw) };
    if dir.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        return Err(e);
    }
    // A duplicate descriptor shares its position with the original: start from the top.
    // SAFETY: `dir` is an open DIR*.
    unsafe { libc::rewinddir(dir) };
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; readdir reports errors only through it.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dir` is an open DIR* that only this loop uses.
        let ent = unsafe { libc::readdir(dir) };
        if ent.is_null() {
            let e = std::io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) { Ok(()) } else { Err(e) };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    };
    // SAFETY: `dir` came from fdopendir and is closed once, here.
    unsafe { libc::closedir(dir) };
    result.map(|()| names)
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
    fn a_directory_swapped_for_a_symlink_or_another_directory_after_the_walk_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/secret"), b"in the tree").unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"not the tree's").unwrap();
        let (found, _) = walk(&root, &Excludes::default()).unwrap();
        let sub = found.iter().find(|f| f.rel == "sub").unwrap();
        let secret = found.iter().find(|f| f.rel == "sub/secret").unwrap();
        let sub_id = (sub.meta.dev(), sub.meta.ino());
        assert!(open_in_tree(secret).unwrap().is_some());

        // Swapped for a symlink out of the tree: neither listed nor read through.
        std::fs::rename(root.join("sub"), dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("sub")).unwrap();
        // O_NOFOLLOW with O_DIRECTORY: ENOTDIR or ELOOP, by kernel.
        let refused = [Some(libc::ENOTDIR), Some(libc::ELOOP)];
        assert!(refused.contains(&list_dir(&root.join("sub"), sub_id).unwrap_err().raw_os_error()));
        assert!(refused.contains(&open_in_tree(secret).unwrap_err().raw_os_error()));

        // Swapped for another directory: not the one walked.
        std::fs::remove_file(root.join("sub")).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/secret"), b"planted").unwrap();
        assert!(list_dir(&root.join("sub"), sub_id).unwrap().is_none());
        assert!(open_in_tree(secret).unwrap().is_none());
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
