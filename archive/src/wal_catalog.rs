//! The WAL catalog: what the archive holds of each segment of one cluster, built by listing (no
//! index that could disagree with the objects).

use std::collections::{BTreeMap, BTreeSet};

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
}
