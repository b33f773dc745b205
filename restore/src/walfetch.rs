//! `wal-fetch`: PostgreSQL's restore_command. A segment from its whole-segment object, or
//! assembled from chunks for the newest, partial segment (zero-padded to full size, as PostgreSQL
//! expects), and timeline history files; the destination is written atomically.
//!
//! A segment the archive lacks is "the end of the archive" (exit 1 for PostgreSQL) only when
//! nothing says it existed; when the archive holds WAL after it on its timeline, or a later
//! timeline forked from after it, it is a hole ([`FetchError::Hole`]), and recovery must stop
//! with an error rather than end there and promote a cluster that silently lacks data. The same
//! holds for a segment held only in part (chunks never compacted) that is not the newest.
//!
//! `until`: a restore to a moment after the newest archived commit replays the archive as it was
//! when the restore was planned; WAL the sidecar archives meanwhile is not served.
//!
//! Prefetch: after serving segment N, the caller starts [`prefetch`] in the background, which
//! puts the next whole segments of the timeline into a spool directory beside the destination
//! (`pg_wal/pitr-prefetch/`); the next `wal-fetch` takes its file from there with a rename, so
//! replay does not wait on the repository. Only whole, authenticated segment objects are spooled,
//! never a partial segment that may still grow.

use std::io::Write;
use std::path::{Path, PathBuf};

use pitr_archive::chunk_run::{cover, ChunkRunError};
use pitr_archive::{ClusterInfo, HistoryProblem, Repository, RepositoryError, WalCatalog, WalLayout, WalObject};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgformat::timeline::{parse_history_file_name, HISTORY_SUFFIX};

use crate::continuity::Forks;

/// Why `wal-fetch` served nothing. Only [`FetchError::NotFound`] tells PostgreSQL "the end of
/// the archive"; every other error stops recovery.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The archive does not hold this file: PostgreSQL treats that as the end of the archive.
    #[error("{file} is not in the archive")]
    NotFound {
        /// The file PostgreSQL asked for.
        file: String,
    },
    /// The archive lacks this segment (or holds only its start) but holds WAL after it: serving
    /// nothing would make PostgreSQL end recovery early, so recovery must stop instead.
    #[error("{file} is missing from the archive, which holds WAL after it ({why}): stopping recovery rather than ending it early")]
    Hole {
        /// The file PostgreSQL asked for.
        file: String,
        /// What shows the WAL went on, and where a copy might be.
        why: String,
    },
    /// PostgreSQL asked for a name that is neither a segment nor a history file.
    #[error("{file} is not a WAL segment or history file name")]
    BadName {
        /// The name asked for.
        file: String,
    },
    /// Reading the repository failed, or an object there does not open or is not what its name
    /// says.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// Writing the destination (or the prefetch spool) failed.
    #[error("writing {path}: {cause}")]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The operating system's error.
        cause: std::io::Error,
    },
}

/// What was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// A whole segment.
    Segment,
    /// Assembled from chunks: only the first `bytes` are WAL, the rest zeros.
    PartialSegment {
        /// How many bytes from the segment's start are WAL.
        bytes: u64,
    },
    /// A timeline history file.
    History,
}

/// The prefetch spool's directory name, inside the destination's directory (`pg_wal`).
pub const SPOOL_DIR: &str = "pitr-prefetch";

/// The prefetch spool for a restore_command destination (`pg_wal/RECOVERYXLOG` → `pg_wal/pitr-prefetch`).
pub fn spool_dir(dest: &Path) -> PathBuf {
    dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join(SPOOL_DIR)
}

/// Moves `file` from the prefetch spool to `dest` if a prefetcher put it there; whether it did.
/// Spooled files were read from authenticated segment objects and stop before any `until`, so
/// serving one needs no repository at all: a restore_command that finds its segment spooled
/// costs one rename instead of opening the repository.
pub fn take_spooled(file: &str, dest: &Path) -> bool {
    if file.is_empty() || file.contains('/') || file.starts_with('.') {
        return false;
    }
    let spooled = spool_dir(dest).join(file);
    spooled.is_file() && std::fs::rename(&spooled, dest).is_ok() && sync_parent(dest).is_ok()
}

/// Drops from the prefetch spool of `dest` the segments a standby asking for `file` will not ask
/// for again: those below it, and those of other timelines (left from before a timeline switch).
/// A standby never ends its recovery, so nothing else would ever remove them (8 × 16 MB by
/// default in `pg_wal`). A segment asked for again after all (a restarted server replays from its
/// last restartpoint) is fetched from the repository. Best effort: a file that cannot be removed
/// is left.
pub fn drop_stale_spooled(file: &str, dest: &Path) {
    /// `(timeline, position)` of a segment file name: fixed-width upper-case hex, so the
    /// positions compare as text.
    fn parts(name: &str) -> Option<(&str, &str)> {
        let plain = name.len() == 24 && name.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
        plain.then(|| name.split_at(8))
    }
    let Some((timeline, position)) = parts(file) else { return };
    let Ok(entries) = std::fs::read_dir(spool_dir(dest)) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((t, p)) = name.to_str().and_then(parts) else { continue };
        if t != timeline || p < position {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Fsyncs the directory holding `path`, making a name just created or renamed there durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Fetches `file` (as PostgreSQL names it) into `dest`, from the prefetch spool if it is there.
/// With `until`, nothing at or past that LSN is served (the rest of its segment is zeros).
pub async fn wal_fetch(
    repo: &Repository,
    cluster: &ClusterInfo,
    file: &str,
    dest: &Path,
    until: Option<u64>,
) -> Result<Fetched, FetchError> {
    if take_spooled(file, dest) {
        return Ok(Fetched::Segment);
    }
    let layout = WalLayout::new(cluster);
    let segment = layout.parse_segment_file_name(file);
    if let (Some(until), Some((_, segno))) = (until, segment) {
        if layout.segment_start(segno) >= until {
            return Err(FetchError::NotFound { file: file.to_string() });
        }
    }
    let (mut fetched, mut data) = read_wal_file(repo, cluster, file).await?;
    if let (Some(until), Some((_, segno))) = (until, segment) {
        let keep = until - layout.segment_start(segno);
        if keep < data.len() as u64 {
            data[keep as usize..].fill(0);
            fetched = match fetched {
                Fetched::PartialSegment { bytes } => Fetched::PartialSegment { bytes: bytes.min(keep) },
                _ => Fetched::PartialSegment { bytes: keep },
            };
        }
    }
    write_atomically(dest, &data)?;
    Ok(fetched)
}

/// [`wal_fetch`] for a standby (`pitr wal-fetch --whole-segments`): only whole segments and
/// history files are served. A segment the archive holds only in part, the newest one the
/// sidecar is still writing, is "not there yet" ([`FetchError::NotFound`]), never served
/// zero-padded: a standby asks again (every `wal_retrieve_retry_interval`) and gets it whole
/// once the primary has finished it, and meanwhile streams it from the primary when it has
/// `primary_conninfo`. A hole is still an error, as for a restore.
pub async fn wal_fetch_whole(
    repo: &Repository,
    cluster: &ClusterInfo,
    file: &str,
    dest: &Path,
) -> Result<Fetched, FetchError> {
    if take_spooled(file, dest) {
        return Ok(Fetched::Segment);
    }
    match read_wal_file(repo, cluster, file).await? {
        (Fetched::PartialSegment { .. }, _) => Err(FetchError::NotFound { file: file.to_string() }),
        (fetched, data) => {
            write_atomically(dest, &data)?;
            Ok(fetched)
        }
    }
}

/// The segment file names after `file` on its timeline, up to `count` of them (none for history files).
pub fn next_segments(cluster: &ClusterInfo, file: &str, count: usize) -> Vec<String> {
    let layout = WalLayout::new(cluster);
    let Some((timeline, segno)) = layout.parse_segment_file_name(file) else { return Vec::new() };
    (1..=count as u64).map(|i| layout.segment_file_name(timeline, segno + i)).collect()
}

/// Creates the spool directory itself, 0700, never its parents: a prefetcher still running
/// after its restore's directory was removed (a stopped scratch restore) must not bring
/// `pg_wal` back and fill it with WAL.
fn create_spool(spool: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(spool) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Puts the whole segments in `names` into `spool`, stopping at the first one the archive does
/// not hold as a whole segment, or that reaches past `until`. A lock file per segment keeps
/// concurrent prefetchers apart.
pub async fn prefetch(
    repo: &Repository,
    cluster: &ClusterInfo,
    names: &[String],
    spool: &Path,
    until: Option<u64>,
) -> Result<usize, FetchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| FetchError::Io { path, cause }
    };
    create_spool(spool).map_err(io(spool))?;
    let layout = WalLayout::new(cluster);
    let mut fetched = 0;
    for name in names {
        let target = spool.join(name);
        if target.exists() {
            continue;
        }
        let lock = spool.join(format!(".{name}.lock"));
        if std::fs::OpenOptions::new().write(true).create_new(true).open(&lock).is_err() {
            continue; // another prefetcher has it
        }
        let result = async {
            let Some((timeline, segno)) = layout.parse_segment_file_name(name) else { return Ok(false) };
            if until.is_some_and(|u| layout.segment_start(segno + 1) > u) {
                return Ok(false);
            }
            let object = layout.object_name(&WalObject::Segment { timeline, segno });
            match get_or_not_found(repo, &object).await? {
                Some((_, data)) if data.len() as u64 == layout.segment_size => {
                    write_atomically(&target, &data)?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
        .await;
        let _ = std::fs::remove_file(&lock);
        match result {
            Ok(true) => fetched += 1,
            Ok(false) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(fetched)
}

/// The contents of `file` (a segment or history file name) from the archive.
pub async fn read_wal_file(
    repo: &Repository,
    cluster: &ClusterInfo,
    file: &str,
) -> Result<(Fetched, Vec<u8>), FetchError> {
    // A running sidecar may compact the chunks we are reading into a segment object and delete
    // them under us; then the segment object is there on the next attempt.
    let mut attempts = 0;
    loop {
        match read_once(repo, cluster, file).await {
            Err(FetchError::Repository(RepositoryError::Store(e))) if e.is_not_found() && attempts < 3 => attempts += 1,
            other => return other,
        }
    }
}

async fn read_once(repo: &Repository, cluster: &ClusterInfo, file: &str) -> Result<(Fetched, Vec<u8>), FetchError> {
    let layout = WalLayout::new(cluster);
    let not_found = || FetchError::NotFound { file: file.to_string() };
    if file.ends_with(HISTORY_SUFFIX) {
        let timeline = parse_history_file_name(file).ok_or_else(|| FetchError::BadName { file: file.to_string() })?;
        let name = layout.object_name(&WalObject::History { timeline });
        let (_, data) = get_or_not_found(repo, &name).await?.ok_or_else(not_found)?;
        return Ok((Fetched::History, data));
    }
    let (timeline, segno) =
        layout.parse_segment_file_name(file).ok_or_else(|| FetchError::BadName { file: file.to_string() })?;
    let seg_name = layout.object_name(&WalObject::Segment { timeline, segno });
    if let Some((_, data)) = get_or_not_found(repo, &seg_name).await? {
        if data.len() as u64 != layout.segment_size {
            return Err(RepositoryError::Invalid {
                name: seg_name,
                what: format!("holds {} bytes, not a whole segment", data.len()),
            }
            .into());
        }
        return Ok((Fetched::Segment, data));
    }
    // Held only as chunks: assemble the contiguous run from offset 0. That is the newest
    // segment, still being written, unless the archive says the segment went on.
    let prefix = layout.segment_objects_prefix(timeline, segno);
    let names: Vec<String> = repo.list(&prefix).await?.into_iter().map(|o| o.name).collect();
    let catalog = WalCatalog::from_names(layout, names.iter().map(String::as_str));
    let held = catalog.segments.get(&(timeline, segno)).map_or(0, |e| e.held_from_start(layout.segment_size));
    if held < layout.segment_size {
        check_not_a_hole(repo, layout, file, timeline, segno, held).await?;
    }
    let Some(entry) = catalog.segments.get(&(timeline, segno)).filter(|_| held > 0) else { return Err(not_found()) };
    let read = cover(&entry.chunks, 0);
    let run =
        repo.read_chunk_run(&layout, timeline, segno, &read).await.map_err(ChunkRunError::into_repository_error)?;
    let mut data = run.data;
    let wal_bytes = data.len() as u64;
    data.resize(layout.segment_size as usize, 0);
    let fetched =
        if wal_bytes == layout.segment_size { Fetched::Segment } else { Fetched::PartialSegment { bytes: wal_bytes } };
    Ok((fetched, data))
}

/// Fails with [`FetchError::Hole`] when the archive says segment `segno` of `timeline` went on
/// past the `held` bytes it has of it; names what says so and where a copy might be.
async fn check_not_a_hole(
    repo: &Repository,
    layout: WalLayout,
    file: &str,
    timeline: u32,
    segno: u64,
    held: u64,
) -> Result<(), FetchError> {
    let catalog = WalCatalog::build(repo, layout).await?;
    let mut histories = Vec::new();
    for (t, read) in catalog.read_histories(repo).await? {
        match read {
            Ok(entries) if t > timeline || (t == timeline && t > 1) => histories.push((t, entries)),
            Ok(_) | Err(HistoryProblem::Vanished) => {}
            // Its own history only says where this timeline began; a successor's says where
            // this timeline was left, which is what tells the end from a hole.
            Err(_) if t <= timeline => {}
            Err(problem) => {
                let name = layout.object_name(&WalObject::History { timeline: t });
                return Err(FetchError::Hole {
                    file: file.to_string(),
                    why: format!("history {name} does not parse ({problem}), so the end cannot be told from a hole"),
                });
            }
        }
    }
    let forks = Forks::from_histories(histories.iter().map(|(t, e)| (*t, e.as_slice())));
    let Some(needed) = forks.needed_end(&catalog, timeline, segno) else { return Ok(()) };
    let seg_start = layout.segment_start(segno);
    if seg_start + held >= needed {
        return Ok(());
    }
    let mut why = if held > 0 {
        format!("only its first {held} bytes are archived, but the archive shows WAL up to {}", format_lsn(needed))
    } else {
        format!("the archive shows WAL up to {} on timeline {timeline} or its successors", format_lsn(needed))
    };
    let seg_name = layout.object_name(&WalObject::Segment { timeline, segno });
    for other in repo.fallbacks() {
        match other.store.head(&seg_name).await {
            Ok(Some(_)) => why.push_str(&format!("; secondary {:?} holds {seg_name} but it could not be read", other.name)),
            Ok(None) => why.push_str(&format!("; secondary {:?} does not hold it either", other.name)),
            Err(e) => why.push_str(&format!(
                "; secondary {:?} could not be asked ({e}): it may hold the segment, retry recovery when it is reachable",
                other.name
            )),
        }
    }
    Err(FetchError::Hole { file: file.to_string(), why })
}

async fn get_or_not_found(
    repo: &Repository,
    name: &str,
) -> Result<Option<(pitr_archive::SealedHeader, Vec<u8>)>, FetchError> {
    match repo.get_opened(name).await {
        Ok(v) => Ok(Some(v)),
        Err(RepositoryError::Store(e)) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes next to `dest`, fsyncs, renames: PostgreSQL never sees a half-written file.
fn write_atomically(dest: &Path, data: &[u8]) -> Result<(), FetchError> {
    let io = |cause| FetchError::Io { path: dest.to_path_buf(), cause };
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "wal".into());
    // Unique per process: a prefetcher and wal-fetch may write the same name at once.
    let tmp = dest.with_file_name(format!(".{file_name}.pitr-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        sync_parent(dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta};
    use std::sync::Arc;

    #[test]
    fn the_spool_is_made_private_and_never_with_its_parents() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("removed-scratch").join("pg_wal").join(SPOOL_DIR);
        assert_eq!(create_spool(&gone).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        assert!(!dir.path().join("removed-scratch").exists());
        let spool = dir.path().join(SPOOL_DIR);
        create_spool(&spool).unwrap();
        assert_eq!(std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777, 0o700);
        create_spool(&spool).unwrap();
    }

    #[test]
    fn a_spooled_segment_is_served_without_the_repository_and_only_by_its_plain_name() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("pg_wal").join("RECOVERYXLOG");
        let spool = spool_dir(&dest);
        std::fs::create_dir_all(&spool).unwrap();
        let name = "000000010000000000000007";
        std::fs::write(spool.join(name), b"segment").unwrap();
        std::fs::write(dir.path().join("pg_wal").join("secret"), b"not WAL").unwrap();
        assert!(!take_spooled("../secret", &dest));
        assert!(!take_spooled(".lock", &dest));
        assert!(!take_spooled("000000010000000000000008", &dest));
        assert!(!dest.exists());
        assert!(take_spooled(name, &dest));
        assert_eq!(std::fs::read(&dest).unwrap(), b"segment");
        assert!(!spool.join(name).exists());
    }

    #[test]
    fn a_standby_drops_spooled_segments_below_the_one_asked_for_or_of_other_timelines() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("pg_wal").join("RECOVERYXLOG");
        let spool = spool_dir(&dest);
        std::fs::create_dir_all(&spool).unwrap();
        let names = [
            "000000010000000000000007",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000010000000100000001",
            "000000020000000100000002",
            ".000000010000000100000003.lock",
            "other",
        ];
        for name in names {
            std::fs::write(spool.join(name), b"x").unwrap();
        }
        drop_stale_spooled("RECOVERYHISTORY", &dest);
        drop_stale_spooled("00000001.history", &dest);
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), names.len(), "no segment asked for: nothing dropped");
        drop_stale_spooled("000000010000000100000000", &dest);
        let mut left: Vec<String> =
            std::fs::read_dir(&spool).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(
            left,
            [".000000010000000100000003.lock", "000000010000000100000000", "000000010000000100000001", "other"]
        );
    }

    /// A local repository with 1 MiB segments.
    fn scratch_repository() -> (tempfile::TempDir, Repository, ClusterInfo, WalLayout, ObjectMeta) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("repo"));
        store.create_root().unwrap();
        let repo = Repository::new(Arc::new(store), KeyRing::from_key("k", [3; 32]));
        let info =
            ClusterInfo { system_id: 1, wal_segment_size: 1 << 20, wal_page_size: 8192, server_version_num: 150000 };
        let layout = WalLayout::new(&info);
        (dir, repo, info, layout, ObjectMeta::plain(ObjectKind::WalChunk))
    }

    #[tokio::test]
    async fn segment_partial_and_history() {
        let (dir, repo, info, layout, meta) = scratch_repository();
        let whole: Vec<u8> = (0..1u32 << 20).map(|i| i as u8).collect();
        repo.put_sealed(
            &layout.object_name(&WalObject::Segment { timeline: 1, segno: 1 }),
            whole.clone(),
            meta.clone(),
        )
        .await
        .unwrap();
        for (from, to) in [(0u32, 100u32), (100, 250)] {
            let name = layout.object_name(&WalObject::Chunk { timeline: 1, segno: 2, from, to });
            repo.put_sealed(&name, whole[from as usize..to as usize].to_vec(), meta.clone()).await.unwrap();
        }
        repo.put_sealed(&layout.object_name(&WalObject::History { timeline: 2 }), b"1\t0/2000FA\tx\n".to_vec(), meta)
            .await
            .unwrap();

        let dest = dir.path().join("out");
        assert_eq!(wal_fetch(&repo, &info, "000000010000000000000001", &dest, None).await.unwrap(), Fetched::Segment);
        assert_eq!(std::fs::read(&dest).unwrap(), whole);
        assert_eq!(
            wal_fetch(&repo, &info, "000000010000000000000002", &dest, None).await.unwrap(),
            Fetched::PartialSegment { bytes: 250 }
        );
        let got = std::fs::read(&dest).unwrap();
        assert_eq!(got.len(), 1 << 20);
        assert_eq!(&got[..250], &whole[..250]);
        assert!(got[250..].iter().all(|b| *b == 0));
        assert_eq!(wal_fetch(&repo, &info, "00000002.history", &dest, None).await.unwrap(), Fetched::History);
        assert!(matches!(
            wal_fetch(&repo, &info, "000000010000000000000003", &dest, None).await,
            Err(FetchError::NotFound { .. })
        ));
        assert!(matches!(
            wal_fetch(&repo, &info, "00000003.history", &dest, None).await,
            Err(FetchError::NotFound { .. })
        ));
        assert!(matches!(wal_fetch(&repo, &info, "junk", &dest, None).await, Err(FetchError::BadName { .. })));

        // A standby gets whole segments and history files only: the partial one is not there
        // yet, and what it was given before stays as it was.
        let standby_dest = dir.path().join("standby");
        assert!(matches!(
            wal_fetch_whole(&repo, &info, "000000010000000000000002", &standby_dest).await,
            Err(FetchError::NotFound { .. })
        ));
        assert!(!standby_dest.exists());
        assert_eq!(
            wal_fetch_whole(&repo, &info, "000000010000000000000001", &standby_dest).await.unwrap(),
            Fetched::Segment
        );
        assert_eq!(std::fs::read(&standby_dest).unwrap(), whole);
        assert_eq!(wal_fetch_whole(&repo, &info, "00000002.history", &standby_dest).await.unwrap(), Fetched::History);

        // Prefetch spools only whole segments and stops at the partial one; wal-fetch takes the
        // spooled file.
        let names = next_segments(&info, "000000010000000000000000", 3);
        assert_eq!(names[0], "000000010000000000000001");
        let spool = spool_dir(&dest);
        assert_eq!(prefetch(&repo, &info, &names, &spool, None).await.unwrap(), 1);
        assert!(spool.join("000000010000000000000001").exists());
        assert!(!spool.join("000000010000000000000002").exists());
        assert_eq!(wal_fetch(&repo, &info, "000000010000000000000001", &dest, None).await.unwrap(), Fetched::Segment);
        assert_eq!(std::fs::read(&dest).unwrap(), whole);
        assert!(!spool.join("000000010000000000000001").exists());
        assert!(next_segments(&info, "00000002.history", 3).is_empty());
    }

    #[tokio::test]
    async fn holes_are_not_the_end_of_the_archive() {
        let (dir, repo, info, layout, meta) = scratch_repository();
        let whole: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for segno in [1u64, 3, 5] {
            repo.put_sealed(
                &layout.object_name(&WalObject::Segment { timeline: 1, segno }),
                whole.clone(),
                meta.clone(),
            )
            .await
            .unwrap();
        }
        // Segment 4: a chunk never compacted, though segment 5 follows.
        let chunk = layout.object_name(&WalObject::Chunk { timeline: 1, segno: 4, from: 0, to: 100 });
        repo.put_sealed(&chunk, whole[..100].to_vec(), meta.clone()).await.unwrap();
        // Segment 6: the newest, partial.
        let chunk = layout.object_name(&WalObject::Chunk { timeline: 1, segno: 6, from: 0, to: 300 });
        repo.put_sealed(&chunk, whole[..300].to_vec(), meta.clone()).await.unwrap();
        let dest = dir.path().join("out");

        let err = wal_fetch(&repo, &info, "000000010000000000000002", &dest, None).await.unwrap_err();
        assert!(matches!(&err, FetchError::Hole { file, .. } if file == "000000010000000000000002"), "{err}");
        let err = wal_fetch(&repo, &info, "000000010000000000000004", &dest, None).await.unwrap_err();
        assert!(err.to_string().contains("only its first 100 bytes"), "{err}");
        assert_eq!(
            wal_fetch(&repo, &info, "000000010000000000000006", &dest, None).await.unwrap(),
            Fetched::PartialSegment { bytes: 300 }
        );
        assert!(matches!(
            wal_fetch(&repo, &info, "000000010000000000000007", &dest, None).await,
            Err(FetchError::NotFound { .. })
        ));
        // Before timeline 2's fork in segment 7 nothing of timeline 2 existed; at segment 9,
        // past its end, nothing does yet. But timeline 1 must reach the fork: segment 7 is a hole.
        repo.put_sealed(
            &layout.object_name(&WalObject::History { timeline: 2 }),
            b"1\t0/7000A0\tx\n".to_vec(),
            meta.clone(),
        )
        .await
        .unwrap();
        repo.put_sealed(
            &layout.object_name(&WalObject::Segment { timeline: 2, segno: 7 }),
            whole.clone(),
            meta.clone(),
        )
        .await
        .unwrap();
        assert!(matches!(
            wal_fetch(&repo, &info, "000000020000000000000003", &dest, None).await,
            Err(FetchError::NotFound { .. })
        ));
        assert!(matches!(
            wal_fetch(&repo, &info, "000000020000000000000009", &dest, None).await,
            Err(FetchError::NotFound { .. })
        ));
        // Segment 6 of timeline 1 holds 300 bytes, but the fork says timeline 1 went on to 7.
        assert!(matches!(
            wal_fetch(&repo, &info, "000000010000000000000006", &dest, None).await,
            Err(FetchError::Hole { .. })
        ));
        assert!(matches!(
            wal_fetch(&repo, &info, "000000010000000000000007", &dest, None).await,
            Err(FetchError::Hole { .. })
        ));

        // `until`: nothing at or past it is served.
        let until = layout.segment_start(3) + 40;
        assert_eq!(
            wal_fetch(&repo, &info, "000000010000000000000003", &dest, Some(until)).await.unwrap(),
            Fetched::PartialSegment { bytes: 40 }
        );
        let got = std::fs::read(&dest).unwrap();
        assert_eq!(&got[..40], &whole[..40]);
        assert!(got[40..].iter().all(|b| *b == 0));
        assert!(matches!(
            wal_fetch(&repo, &info, "000000010000000000000005", &dest, Some(until)).await,
            Err(FetchError::NotFound { .. })
        ));
        let names = next_segments(&info, "000000010000000000000000", 3);
        assert_eq!(prefetch(&repo, &info, &names, &spool_dir(&dest), Some(until)).await.unwrap(), 1);
    }
}
