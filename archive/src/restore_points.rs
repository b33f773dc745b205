//! The index of restore points: one small sealed object per `XLOG_RESTORE_POINT` record the
//! sidecar archived, whoever created it (`pitr mark`, or `pg_create_restore_point` from psql).
//!
//! ```text
//! pg/<system id>/restore-points/<timeline>.<record lsn>     (hex, fixed width)
//! ```
//! (built and parsed by [`names::pg::restore_point`] and [`names::pg::parse_restore_point`]).
//! The sidecar puts an entry before the WAL object holding the record's last byte, create-only
//! and with a plaintext that depends on the record alone: a crash between the two puts leaves an
//! entry whose WAL is not archived yet, and streaming that WAL again puts the same entry again,
//! which the repository takes as already there. An entry therefore says only "this record is at
//! this place in the cluster's WAL"; whether its WAL is in the archive (and a restore can reach
//! it) is for the reader to check against the WAL catalog. Listing the restore points reads
//! these entries, never the WAL.
//!
//! The name is bound into the object's authenticated encryption and the plaintext repeats the
//! timeline and LSN, so a planted or renamed entry does not open or does not match. Such an
//! entry, one too large to be pitr's (not downloaded) and one that cannot be read now are
//! reported by [`load`] as problems, never as a failure: `pitr list` names them, restores to a
//! time or LSN ignore them, and a restore to a name refuses while any is there (it could be an
//! earlier restore point of that name, where recovery would stop first). Names of restore points are kept as hex in the plaintext: PostgreSQL
//! takes any bytes but NUL (line breaks included).

use crate::names;
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::ObjectInfo;

/// One restore point of a PostgreSQL cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestorePoint {
    /// The restore point's name (`rp_name`), as the server wrote it.
    pub name: String,
    /// The timeline whose WAL holds the record.
    pub timeline: u32,
    /// Where the record starts.
    pub lsn: u64,
    /// Just past the record (MAXALIGNed): what `pg_create_restore_point` returned, and how far
    /// the archive must hold WAL for a restore to stop there.
    pub end_lsn: u64,
    /// `rp_time`, µs since the Unix epoch (the primary's clock).
    pub time_us: i64,
}

impl RestorePoint {
    /// The object name of this restore point's index entry.
    pub fn object_name(&self, system_id: u64) -> String {
        names::pg::restore_point(system_id, self.timeline, self.lsn)
    }

    /// The entry's plaintext: the same restore point always gives the same bytes (a second put
    /// of it is then taken as already there).
    pub fn to_text(&self) -> Vec<u8> {
        format!(
            "timeline={}\nlsn={}\nend_lsn={}\ntime_us={}\nname={}\n",
            self.timeline,
            self.lsn,
            self.end_lsn,
            self.time_us,
            hex::encode(self.name.as_bytes())
        )
        .into_bytes()
    }

    /// The metadata its sealed header carries.
    pub fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            timeline: self.timeline,
            start_lsn: self.lsn,
            end_lsn: self.end_lsn,
            ..ObjectMeta::plain(ObjectKind::Meta)
        }
    }

    fn from_text(text: &str) -> Option<RestorePoint> {
        let (mut timeline, mut lsn, mut end_lsn, mut time_us, mut name) = (None, None, None, None, None);
        for line in text.lines() {
            match line.split_once('=') {
                Some(("timeline", v)) => timeline = v.parse().ok(),
                Some(("lsn", v)) => lsn = v.parse().ok(),
                Some(("end_lsn", v)) => end_lsn = v.parse().ok(),
                Some(("time_us", v)) => time_us = v.parse().ok(),
                Some(("name", v)) => name = hex::decode(v).ok().and_then(|b| String::from_utf8(b).ok()),
                _ => return None,
            }
        }
        let point = RestorePoint { name: name?, timeline: timeline?, lsn: lsn?, end_lsn: end_lsn?, time_us: time_us? };
        (point.end_lsn > point.lsn).then_some(point)
    }
}

/// Puts `point`'s index entry (create-only; an identical entry already there is success).
pub async fn record(repo: &Repository, system_id: u64, point: &RestorePoint) -> Result<(), RepositoryError> {
    repo.put_sealed(&point.object_name(system_id), point.to_text(), point.meta()).await?;
    Ok(())
}

/// The largest stored size an index entry can have: pitr's are a few hundred bytes (a name of at
/// most 63 bytes, sealed). One listed larger is not pitr's and is never downloaded.
pub const ENTRY_MAX_BYTES: u64 = 4096;

/// Entries read at once while loading the index.
const READ_CONCURRENCY: usize = 16;

/// How far before its end a restore point's record can start: 98 bytes of record (more with a
/// top-level xid or replication origin), MAXALIGNed, plus a long page header where it crosses
/// into a segment. Generous: only entries named in this range are read.
const RECORD_SPAN_MAX: u64 = 512;

/// An index entry that could not be taken into account, or the listing of the index failing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{object}: {why}")]
pub struct IndexProblem {
    /// The entry's object name (the index's prefix when listing it failed).
    pub object: String,
    /// What is wrong.
    pub why: String,
}

/// The index as read: the restore points that could be read, and why it may lack others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestorePointIndex {
    /// Every authentic restore point read, in WAL order (timeline, then LSN).
    pub points: Vec<RestorePoint>,
    /// Entries that are there but could not be read or are not what their name says, and a
    /// failed listing: the index may lack restore points (one may be an earlier one of a name).
    pub problems: Vec<IndexProblem>,
}

/// Reads the whole index. Never fails: a listing that fails, and entries that do not open, are
/// too large, do not match their name or cannot be read now, are [`RestorePointIndex::problems`]
/// (readers that must know every restore point, such as a restore to a name, refuse then; the
/// others carry on). Objects under the prefix whose names pitr never writes are ignored.
///
/// With `fallbacks` (the WAL catalog reads the secondaries' WAL too, where this repository has
/// holes or lost its tail), entries only a secondary holds are taken as well: the sidecar put them
/// with the WAL that may now be read from there. Each is read through the repository's fallback
/// reads, and a secondary that cannot be listed is a problem like a failed listing here.
pub async fn load(repo: &Repository, system_id: u64, fallbacks: bool) -> RestorePointIndex {
    let prefix = names::pg::restore_points_prefix(system_id);
    let mut listed = match repo.list(&prefix).await {
        Ok(listed) => listed,
        Err(e) => {
            return RestorePointIndex {
                points: Vec::new(),
                problems: vec![IndexProblem { object: prefix, why: format!("the index could not be listed: {e}") }],
            }
        }
    };
    let mut unlisted = Vec::new();
    if fallbacks {
        let mut seen: std::collections::BTreeSet<String> = listed.iter().map(|o| o.name.clone()).collect();
        for other in repo.fallbacks() {
            match other.store.list(&prefix).await {
                Ok(objects) => listed.extend(objects.into_iter().filter(|o| seen.insert(o.name.clone()))),
                Err(e) => unlisted.push(IndexProblem {
                    object: prefix.clone(),
                    why: format!("secondary repository {:?} could not be listed: {e}", other.name),
                }),
            }
        }
    }
    let mut index = read_entries(repo, system_id, listed).await;
    index.problems.extend(unlisted);
    index
}

/// The restore points whose record ends at `end_lsn` (on any timeline), reading only the entries
/// whose names place their start just before it, and the problems met among those. A failed
/// listing is the error (worth retrying).
pub async fn ending_at(repo: &Repository, system_id: u64, end_lsn: u64) -> Result<RestorePointIndex, RepositoryError> {
    let listed = repo.list(&names::pg::restore_points_prefix(system_id)).await?;
    let near = listed
        .into_iter()
        .filter(|o| {
            names::pg::parse_restore_point(system_id, &o.name)
                .is_some_and(|(_, lsn)| lsn < end_lsn && lsn + RECORD_SPAN_MAX >= end_lsn)
        })
        .collect();
    let mut index = read_entries(repo, system_id, near).await;
    index.points.retain(|p| p.end_lsn == end_lsn);
    Ok(index)
}

/// The index entries among `listed` that no restore can use or be stopped by any more, read from
/// their names alone: the record lies wholly in WAL of its timeline below that timeline's
/// retention floor (`floors`: timeline to first kept segment), and outside every kept backup's
/// `start..=stop` LSNs (a pinned backup older than the floor keeps that WAL, and a restore point
/// there would stop recovery from it before it is consistent). Its WAL is gone, so it cannot be
/// restored to, and recovery from any kept backup starts after it.
pub fn expired_entries<'a>(
    system_id: u64,
    listed: impl IntoIterator<Item = &'a str>,
    layout: crate::wal::WalLayout,
    floors: &std::collections::BTreeMap<u32, u64>,
    kept_backups: &[(u64, u64)],
) -> Vec<String> {
    listed
        .into_iter()
        .filter(|name| {
            let Some((timeline, lsn)) = names::pg::parse_restore_point(system_id, name) else { return false };
            let below_floor =
                floors.get(&timeline).is_some_and(|&floor| layout.segno_of(lsn + RECORD_SPAN_MAX) < floor);
            let in_a_backup = kept_backups.iter().any(|&(start, stop)| lsn + RECORD_SPAN_MAX >= start && lsn <= stop);
            below_floor && !in_a_backup
        })
        .map(str::to_string)
        .collect()
}

async fn read_entries(repo: &Repository, system_id: u64, listed: Vec<ObjectInfo>) -> RestorePointIndex {
    use futures_util::StreamExt;
    let read: Vec<Result<Option<RestorePoint>, IndexProblem>> = futures_util::stream::iter(listed)
        .map(|object| async move { read_entry(repo, system_id, &object).await })
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;
    let mut index = RestorePointIndex::default();
    for entry in read {
        match entry {
            Ok(Some(point)) => index.points.push(point),
            Ok(None) => {}
            Err(problem) => {
                tracing::warn!(object = %problem.object, why = %problem.why, "restore point index entry left out");
                index.problems.push(problem);
            }
        }
    }
    index.points.sort_by_key(|p| (p.timeline, p.lsn));
    index.problems.sort_by(|a, b| a.object.cmp(&b.object));
    index
}

/// One listed object of the index: its restore point, `None` when it is not an entry (a name
/// pitr never writes) or is gone, or why it cannot be taken into account.
async fn read_entry(
    repo: &Repository,
    system_id: u64,
    object: &ObjectInfo,
) -> Result<Option<RestorePoint>, IndexProblem> {
    let problem = |why: String| IndexProblem { object: object.name.clone(), why };
    let Some((timeline, lsn)) = names::pg::parse_restore_point(system_id, &object.name) else {
        tracing::warn!(object = %object.name, "not a restore point entry pitr writes; ignored");
        return Ok(None);
    };
    if object.size > ENTRY_MAX_BYTES {
        return Err(problem(format!(
            "{} bytes stored, more than any entry pitr writes (at most {ENTRY_MAX_BYTES}): not read",
            object.size
        )));
    }
    match repo.get_record(&object.name).await {
        Ok((_, text)) => RestorePoint::from_text(&String::from_utf8_lossy(&text))
            .filter(|p| p.timeline == timeline && p.lsn == lsn)
            .map(Some)
            .ok_or_else(|| problem("opens, but does not hold the restore point its name places there".into())),
        Err(RepositoryError::Store(e)) if e.is_not_found() => Ok(None),
        // Only a holder of the key writes an entry that opens: damaged, or planted.
        Err(e @ RepositoryError::Seal(_)) => Err(problem(format!("does not open ({e})"))),
        Err(e) => Err(problem(format!("could not be read ({e})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore, Store};
    use std::sync::Arc;

    fn point(name: &str, lsn: u64) -> RestorePoint {
        RestorePoint { name: name.into(), timeline: 1, lsn, end_lsn: lsn + 104, time_us: 1_795_615_380_000_000 }
    }

    #[tokio::test]
    async fn entries_round_trip_twice_put_is_fine_and_planted_ones_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [5; 32]));
        assert_eq!(load(&repo, 7, false).await, RestorePointIndex::default());
        let (a, b) = (point("before-cleanup", 0x3000_0028), point("it's a\nline break", 0x3000_0100));
        record(&repo, 7, &b).await.unwrap();
        record(&repo, 7, &a).await.unwrap();
        // Streamed again after a crash: the same entry, taken as already there.
        record(&repo, 7, &a).await.unwrap();
        assert_eq!(
            load(&repo, 7, false).await,
            RestorePointIndex { points: vec![a.clone(), b.clone()], problems: vec![] }
        );
        // Another record at the same place is not this one: refused, not overwritten.
        let other = RestorePoint { name: "other".into(), ..a.clone() };
        assert!(matches!(record(&repo, 7, &other).await, Err(RepositoryError::Conflict { .. })));
        let sealed = store.get(&a.object_name(7)).await.unwrap();
        assert!(sealed.len() as u64 * 4 < ENTRY_MAX_BYTES, "entries are far below the size limit: {}", sealed.len());

        // An authentic entry copied under another name (claiming another LSN), bytes planted
        // without the key and an object too large to be an entry: reported, the rest still read.
        let (copied, junk, huge) = (
            names::pg::restore_point(7, 1, 0x4000_0000),
            names::pg::restore_point(7, 1, 0x5000_0000),
            names::pg::restore_point(7, 1, 0x6000_0000),
        );
        store.put_if_absent(&copied, sealed).await.unwrap();
        store.put_if_absent(&junk, bytes::Bytes::from_static(b"PITRjunk")).await.unwrap();
        store.put_if_absent(&huge, bytes::Bytes::from(vec![0; ENTRY_MAX_BYTES as usize + 1])).await.unwrap();
        // Not a name pitr writes: not an entry at all.
        store.put_if_absent("pg/7/restore-points/junk", bytes::Bytes::from_static(b"x")).await.unwrap();
        let index = load(&repo, 7, false).await;
        assert_eq!(index.points, vec![a.clone(), b.clone()]);
        let problems: Vec<(&str, &str)> = index.problems.iter().map(|p| (p.object.as_str(), p.why.as_str())).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(problems[0].0, copied);
        assert!(problems[0].1.contains("does not open"), "the name is bound into the seal: {problems:?}");
        assert_eq!(problems[1].0, junk);
        assert!(problems[1].1.contains("does not open"), "{problems:?}");
        assert_eq!(problems[2].0, huge);
        assert!(problems[2].1.contains("more than any entry pitr writes"), "{problems:?}");

        // Looking near one restore point's end reads only the entries named there.
        let near = ending_at(&repo, 7, a.end_lsn).await.unwrap();
        assert_eq!(near, RestorePointIndex { points: vec![a.clone()], problems: vec![] });
        assert_eq!(ending_at(&repo, 7, a.end_lsn + 8).await.unwrap().points, vec![]);
        let near_junk = ending_at(&repo, 7, 0x5000_0000 + 104).await.unwrap();
        assert_eq!((near_junk.points.len(), near_junk.problems.len()), (0, 1));
    }

    #[tokio::test]
    async fn fallbacks_entries_are_taken_only_when_asked_and_once() {
        let (primary_dir, secondary_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let keys = KeyRing::from_key("k", [5; 32]);
        let primary = Repository::new(Arc::new(LocalStore::new(primary_dir.path())), keys.clone());
        let secondary_store: Arc<dyn Store> = Arc::new(LocalStore::new(secondary_dir.path()));
        let secondary = Repository::new(secondary_store.clone(), keys.clone());
        let (both, only_there) = (point("both", 0x3000_0028), point("only-there", 0x3000_0100));
        record(&primary, 7, &both).await.unwrap();
        record(&secondary, 7, &both).await.unwrap();
        record(&secondary, 7, &only_there).await.unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(primary_dir.path())), keys.clone()).with_fallbacks(
            "primary",
            vec![crate::repository::NamedStore { name: "dr".into(), store: secondary_store }],
        );
        assert_eq!(load(&repo, 7, false).await.points, vec![both.clone()], "the secondary is not asked");
        assert_eq!(
            load(&repo, 7, true).await,
            RestorePointIndex { points: vec![both.clone(), only_there], problems: vec![] }
        );

        // A secondary that cannot be listed leaves the index possibly incomplete: a problem.
        let gone: Arc<dyn Store> = Arc::new(LocalStore::new(secondary_dir.path().join("gone")));
        let repo = Repository::new(Arc::new(LocalStore::new(primary_dir.path())), keys)
            .with_fallbacks("primary", vec![crate::repository::NamedStore { name: "dr".into(), store: gone }]);
        let index = load(&repo, 7, true).await;
        assert_eq!(index.points, vec![both]);
        assert_eq!(index.problems.len(), 1, "{:?}", index.problems);
        assert!(
            index.problems[0].why.contains("secondary repository \"dr\" could not be listed"),
            "{:?}",
            index.problems
        );
    }
}
