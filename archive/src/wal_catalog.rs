//! The WAL catalog: what the archive holds of each segment of one cluster, built by listing (no
//! index that could disagree with the objects).

use std::collections::{BTreeMap, BTreeSet};

use pitr_pgformat::timeline::{parse_history, HistoryEntry};

use crate::repository::{Repository, RepositoryError};
use crate::wal::{WalLayout, WalObject};

/// What the archive holds of one segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentEntry {
    /// A whole-segment object exists.
    pub whole: bool,
    /// Byte ranges within the segment held as chunks, sorted.
    pub chunks: Vec<(u32, u32)>,
}

impl SegmentEntry {
    /// How many bytes from the segment's start the archive holds: the whole segment if there is
    /// a segment object, else the contiguous run of chunks from offset 0 (0 when the chunks do
    /// not start at the segment's beginning).
    pub fn held_from_start(&self, segment_size: u64) -> u64 {
        if self.whole {
            return segment_size;
        }
        match self.contiguous_chunk_end() {
            Some((0, end)) => u64::from(end),
            _ => 0,
        }
    }

    /// Whether every byte of the segment is held (a segment object, or chunks covering it).
    pub fn is_complete(&self, segment_size: u64) -> bool {
        self.held_from_start(segment_size) >= segment_size
    }

    /// End offset of the contiguous run of chunks starting at the first chunk.
    pub fn contiguous_chunk_end(&self) -> Option<(u32, u32)> {
        let first = self.chunks.first()?;
        let mut end = first.1;
        for &(from, to) in &self.chunks[1..] {
            if from > end {
                break;
            }
            end = end.max(to);
        }
        Some((first.0, end))
    }
}

/// What WAL the archive holds of one cluster, from one listing.
#[derive(Debug, Clone)]
pub struct WalCatalog {
    /// The cluster's WAL layout.
    pub layout: WalLayout,
    /// By (timeline, segment number).
    pub segments: BTreeMap<(u32, u64), SegmentEntry>,
    /// Timelines with a history file.
    pub histories: BTreeSet<u32>,
}

impl WalCatalog {
    /// Lists the cluster's WAL in `repo` (this repository only, not its fallbacks).
    pub async fn build(repo: &Repository, layout: WalLayout) -> Result<WalCatalog, RepositoryError> {
        let objects = repo.list(&layout.prefix()).await?;
        Ok(Self::from_names(layout, objects.iter().map(|o| o.name.as_str())))
    }

    /// The catalog of the WAL objects among `names`; other names are ignored.
    pub fn from_names<'a>(layout: WalLayout, names: impl Iterator<Item = &'a str>) -> WalCatalog {
        let mut segments: BTreeMap<(u32, u64), SegmentEntry> = BTreeMap::new();
        let mut histories = BTreeSet::new();
        for name in names {
            match layout.parse_object_name(name) {
                Some(WalObject::Segment { timeline, segno }) => {
                    segments.entry((timeline, segno)).or_default().whole = true
                }
                Some(WalObject::Chunk { timeline, segno, from, to }) => {
                    segments.entry((timeline, segno)).or_default().chunks.push((from, to))
                }
                Some(WalObject::History { timeline }) => {
                    histories.insert(timeline);
                }
                None => {}
            }
        }
        for entry in segments.values_mut() {
            entry.chunks.sort_unstable();
        }
        WalCatalog { layout, segments, histories }
    }

    /// The newest timeline with WAL.
    pub fn latest_timeline(&self) -> Option<u32> {
        self.segments.keys().map(|(t, _)| *t).max()
    }

    /// The LSN just past the newest WAL held for `timeline`, following its last segment.
    pub fn end_lsn(&self, timeline: u32) -> Option<u64> {
        let ((_, segno), entry) = self.segments.range((timeline, 0)..=(timeline, u64::MAX)).next_back()?;
        let start = self.layout.segment_start(*segno);
        if entry.whole {
            return Some(start + self.layout.segment_size);
        }
        entry.contiguous_chunk_end().map(|(_, end)| start + u64::from(end))
    }

    /// Chunk objects that a whole segment object has made redundant (left by a crash between the
    /// compaction put and the chunk deletes).
    pub fn redundant_chunks(&self) -> Vec<WalObject> {
        let mut out = Vec::new();
        for (&(timeline, segno), entry) in &self.segments {
            if entry.whole {
                for &(from, to) in &entry.chunks {
                    out.push(WalObject::Chunk { timeline, segno, from, to });
                }
            }
        }
        out
    }
}

/// Why a listed timeline history could not be used. Each reader decides what that means for it:
/// planning leaves the timeline out, `verify` reports it, `wal-fetch` refuses to call a missing
/// segment the end, `expire` keeps all WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryProblem {
    /// Listed, then gone when read (deleted in between).
    Vanished,
    /// The object does not open (wrong key, damaged, planted).
    Unopenable(String),
    /// It opened but is not a PostgreSQL history file.
    Malformed(String),
}

impl std::fmt::Display for HistoryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HistoryProblem::Vanished => f.write_str("it was deleted while being read"),
            HistoryProblem::Unopenable(e) | HistoryProblem::Malformed(e) => f.write_str(e),
        }
    }
}

/// Each listed timeline history, parsed (or why not), by timeline.
pub type Histories = BTreeMap<u32, Result<Vec<HistoryEntry>, HistoryProblem>>;

impl WalCatalog {
    /// Reads and parses the history file of every timeline in [`WalCatalog::histories`] (with the
    /// repository's fallbacks). Only a storage failure other than "not found" is an error: the
    /// caller cannot tell what the history says, so it must not decide anything from it.
    pub async fn read_histories(&self, repo: &Repository) -> Result<Histories, RepositoryError> {
        let mut out = BTreeMap::new();
        for &timeline in &self.histories {
            let name = self.layout.object_name(&WalObject::History { timeline });
            let read = match repo.get_record(&name).await {
                Ok((_, text)) => {
                    parse_history(&String::from_utf8_lossy(&text)).map_err(|e| HistoryProblem::Malformed(e.to_string()))
                }
                Err(RepositoryError::Store(e)) if e.is_not_found() => Err(HistoryProblem::Vanished),
                Err(e @ RepositoryError::Seal(_)) => Err(HistoryProblem::Unopenable(e.to_string())),
                Err(e @ RepositoryError::Store(crate::store::StoreError::TooLarge { .. })) => {
                    Err(HistoryProblem::Unopenable(e.to_string()))
                }
                Err(e) => return Err(e),
            };
            out.insert(timeline, read);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> WalLayout {
        WalLayout { system_id: 7, segment_size: 16 << 20 }
    }

    #[test]
    fn catalog_end_follows_chunks_and_segments() {
        let l = layout();
        let names = [
            l.object_name(&WalObject::Segment { timeline: 1, segno: 1 }),
            l.object_name(&WalObject::Chunk { timeline: 1, segno: 2, from: 0, to: 0x100 }),
            l.object_name(&WalObject::Chunk { timeline: 1, segno: 2, from: 0x100, to: 0x300 }),
            l.object_name(&WalObject::Chunk { timeline: 1, segno: 2, from: 0x500, to: 0x600 }),
            l.object_name(&WalObject::Segment { timeline: 2, segno: 5 }),
            l.object_name(&WalObject::Chunk { timeline: 2, segno: 5, from: 0, to: 0x10 }),
        ];
        let cat = WalCatalog::from_names(l, names.iter().map(|s| s.as_str()));
        assert_eq!(cat.end_lsn(1), Some(2 * (16 << 20) + 0x300));
        assert_eq!(cat.end_lsn(2), Some(6 * (16 << 20)));
        assert_eq!(cat.latest_timeline(), Some(2));
        assert_eq!(cat.redundant_chunks(), vec![WalObject::Chunk { timeline: 2, segno: 5, from: 0, to: 0x10 }]);
        assert_eq!(cat.end_lsn(3), None);
    }

    #[tokio::test]
    async fn histories_read_once_with_each_problem_named() {
        use std::sync::Arc;

        use crate::seal::{ObjectKind, ObjectMeta};
        use crate::store::{LocalStore, Store};
        use crate::KeyRing;

        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("a", [1; 32]));
        let l = layout();
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        let name = |timeline| l.object_name(&WalObject::History { timeline });
        repo.put_sealed(&name(2), b"1\t0/5000000\tno recovery target specified\n".to_vec(), meta.clone())
            .await
            .unwrap();
        repo.put_sealed(&name(3), b"1 0/5\n2\n".to_vec(), meta.clone()).await.unwrap();
        store.put_if_absent(&name(4), bytes::Bytes::from_static(b"planted, not sealed")).await.unwrap();
        let listed = [name(2), name(3), name(4), name(5)];
        let catalog = WalCatalog::from_names(l, listed.iter().map(|s| s.as_str()));

        let read = catalog.read_histories(&repo).await.unwrap();
        assert_eq!(read[&2].as_ref().unwrap()[0].timeline, 1);
        assert_eq!(read[&2].as_ref().unwrap()[0].switch_lsn, 0x5000000);
        assert!(matches!(&read[&3], Err(HistoryProblem::Malformed(e)) if e.contains("line 2")), "{:?}", read[&3]);
        assert!(matches!(&read[&4], Err(HistoryProblem::Unopenable(_))), "{:?}", read[&4]);
        assert_eq!(read[&5], Err(HistoryProblem::Vanished));
    }
}
