//! One-level listings of local directories, kept while the directory is unchanged.
//!
//! The writer lease's guard lists its generations before every WAL put (archive-format.md,
//! "the writer lease"): on a local repository that is an open, a directory read and a close on
//! the path of every synchronous commit, for a directory that changes once per renewal.
//!
//! A directory's change time (ctime) moves whenever an entry is added to it, removed from it or
//! renamed in it, and nothing can set it back. So a listing read when the directory's stamp
//! (device, inode, ctime, mtime) was S is still the listing while the directory's stamp is S,
//! provided that no later change can be given S's ctime. A change's ctime is the kernel's clock
//! at the change, which before Linux 6.13's multigrain timestamps advances in ticks of a few
//! milliseconds: a change in the tick that set S could leave S as it was. Hence:
//! - a listing is kept only if S's ctime was at least [`SETTLE`] in the past when S was read
//!   (every later change falls in a later tick), and S was the same after the read (nothing
//!   changed during it);
//! - a directory holding chunk logs (`.log`) is never kept: their records come and go without
//!   touching the directory;
//! - a kept listing is read again after [`MAX_AGE`] whatever its stamp says, so a wall clock
//!   stepped back by more than [`SETTLE`] (which could give a change an old ctime) or a
//!   filesystem whose times come from another machine's clock hides a change for at most that
//!   long — far less than any lease's validity.
//!
//! The pure rule ([`keepable`]) is separate from the file system calls, so it is unit-tested.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How long before a listing is read its directory must have last changed for it to be kept.
pub const SETTLE: Duration = Duration::from_secs(1);

/// How long a kept listing is trusted at most.
pub const MAX_AGE: Duration = Duration::from_secs(1);

/// Directories whose listings are kept at most: a long `verify` lists many more, once each.
const MAX_KEPT: usize = 64;

/// What says whether a directory changed: where it is and its change and modification times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirStamp {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl DirStamp {
    /// The stamp of `dir`; None if it cannot be read (then nothing is kept for it).
    pub fn of(dir: &Path) -> Option<DirStamp> {
        let m = std::fs::metadata(dir).ok()?;
        Some(DirStamp {
            dev: m.dev(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }

    fn ctime(&self) -> Option<SystemTime> {
        let (secs, nanos) = self.ctime;
        let since_epoch = Duration::new(u64::try_from(secs).ok()?, u32::try_from(nanos).ok()?);
        SystemTime::UNIX_EPOCH.checked_add(since_epoch)
    }
}

/// Whether a listing read between two stamps, `before` (read at wall time `read_at`) and
/// `after`, may be kept: nothing changed during the read, and the last change was at least
/// [`SETTLE`] before it.
pub fn keepable(before: &DirStamp, after: &DirStamp, read_at: SystemTime, holds_logs: bool) -> bool {
    if holds_logs || before != after {
        return false;
    }
    before.ctime().and_then(|c| c.checked_add(SETTLE)).is_some_and(|settled| settled <= read_at)
}

#[derive(Debug)]
struct Kept {
    stamp: DirStamp,
    names: Vec<String>,
    read: Instant,
}

/// The listings kept, by directory.
#[derive(Debug, Default)]
pub struct DirListings {
    kept: Mutex<HashMap<PathBuf, Kept>>,
}

impl DirListings {
    /// The listing of `dir` kept for `stamp` (its stamp now), if one is and is young enough.
    pub fn get(&self, dir: &Path, stamp: &DirStamp) -> Option<Vec<String>> {
        let kept = self.kept.lock().ok()?;
        let k = kept.get(dir)?;
        (k.stamp == *stamp && k.read.elapsed() < MAX_AGE).then(|| k.names.clone())
    }

    /// Keeps `names`, read from `dir` at `read` (monotonic) with `stamp`.
    pub fn keep(&self, dir: &Path, stamp: DirStamp, names: &[String], read: Instant) {
        let Ok(mut kept) = self.kept.lock() else { return };
        if kept.len() >= MAX_KEPT && !kept.contains_key(dir) {
            kept.retain(|_, k| k.read.elapsed() < MAX_AGE);
            if kept.len() >= MAX_KEPT {
                return;
            }
        }
        kept.insert(dir.to_path_buf(), Kept { stamp, names: names.to_vec(), read });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ctime_secs: i64) -> DirStamp {
        DirStamp { dev: 1, ino: 2, ctime: (ctime_secs, 500), mtime: (ctime_secs, 500) }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_listing_is_kept_only_when_its_directory_settled_before_the_read_and_did_not_change_during_it() {
        let s = stamp(1000);
        assert!(keepable(&s, &s, at(1002), false));
        assert!(!keepable(&s, &s, at(1001), false), "500 ns short of the settling time");
        assert!(!keepable(&s, &s, at(1000), false), "changed in the read's own second");
        assert!(!keepable(&s, &s, at(999), false), "a change time ahead of the clock");
        assert!(!keepable(&s, &stamp(1003), at(1002), false), "changed during the read");
        let mut moved = s;
        moved.ino = 3;
        assert!(!keepable(&s, &moved, at(1002), false), "replaced during the read");
        assert!(!keepable(&s, &s, at(1002), true), "chunk logs change without the directory");
        assert!(!keepable(&stamp(-5), &stamp(-5), at(1002), false), "a change time before 1970");
    }

    #[test]
    fn a_kept_listing_answers_only_for_its_own_stamp_and_only_while_young() {
        let listings = DirListings::default();
        let dir = Path::new("/r/pg/1/lease");
        let names = vec!["pg/1/lease/0000000000000001".to_string()];
        listings.keep(dir, stamp(1000), &names, Instant::now());
        assert_eq!(listings.get(dir, &stamp(1000)), Some(names.clone()));
        assert_eq!(listings.get(dir, &stamp(1001)), None, "the directory changed");
        assert_eq!(listings.get(Path::new("/r/pg/1"), &stamp(1000)), None, "another directory");

        let Some(old) = Instant::now().checked_sub(MAX_AGE) else { return };
        listings.keep(dir, stamp(1000), &names, old);
        assert_eq!(listings.get(dir, &stamp(1000)), None, "read too long ago");
    }

    #[test]
    fn at_most_a_bounded_number_of_directories_is_kept() {
        let listings = DirListings::default();
        for i in 0..2 * MAX_KEPT {
            listings.keep(&PathBuf::from(format!("/r/{i}")), stamp(1000), &[], Instant::now());
        }
        assert_eq!(listings.kept.lock().unwrap().len(), MAX_KEPT);
    }
}
