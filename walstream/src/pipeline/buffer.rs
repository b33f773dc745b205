//! One segment's worth of WAL received and not yet in a segment object.

use std::time::Instant;

use bytes::Bytes;
use pitr_archive::restore_points::RestorePoint;

/// A segment buffer's bytes: a vector while WAL arrives, then, once the whole segment is put as
/// one object, shared with that put. A retry and the compaction of a segment hand the same bytes
/// on instead of copying 16 MiB each time.
#[derive(Debug, Clone, Default)]
pub(crate) struct SegmentBytes {
    /// The bytes while they grow; empty once shared.
    growing: Vec<u8>,
    /// The bytes once shared.
    shared: Option<Bytes>,
}

impl SegmentBytes {
    pub fn as_slice(&self) -> &[u8] {
        self.shared.as_deref().unwrap_or(&self.growing)
    }

    /// The vector to append to. Bytes already shared are copied back first (a closed buffer
    /// takes no more bytes, so the pipeline never does this).
    fn growing(&mut self) -> &mut Vec<u8> {
        if let Some(shared) = self.shared.take() {
            self.growing = shared.to_vec();
        }
        &mut self.growing
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.growing().extend_from_slice(data);
    }

    pub fn reserve(&mut self, additional: usize) {
        self.growing().reserve(additional);
    }

    /// All the bytes, shared: the first call turns the vector into [`Bytes`] without a copy.
    pub fn share(&mut self) -> Bytes {
        self.shared.get_or_insert_with(|| Bytes::from(std::mem::take(&mut self.growing))).clone()
    }
}

impl From<Vec<u8>> for SegmentBytes {
    fn from(growing: Vec<u8>) -> Self {
        SegmentBytes { growing, shared: None }
    }
}

impl std::ops::Deref for SegmentBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for SegmentBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for SegmentBytes {}

impl PartialEq<Vec<u8>> for SegmentBytes {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

/// WAL of one segment in memory, from offset `base` (0 unless resumed from chunks that did not
/// start at the segment's beginning). How much of it is durable is not kept here: only the
/// front buffer is ever put, and the pipeline's durable position says how far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentBuffer {
    pub timeline: u32,
    pub segno: u64,
    pub base: u32,
    pub data: SegmentBytes,
    /// No more bytes will come for this segment (it is full, or its timeline ended).
    pub closed: bool,
    /// Chunk objects stored for this segment, to delete once a segment object holds it.
    pub chunks: Vec<(u32, u32)>,
    /// (end LSN of a commit/abort record, its time in µs since the Unix epoch).
    pub commits: Vec<(u64, i64)>,
    /// Restore points whose record ends in this segment: their index entries go before the
    /// object that holds their last byte.
    pub restore_points: Vec<RestorePoint>,
    /// When the oldest byte not yet durable arrived.
    pub oldest_undurable: Option<Instant>,
}

impl SegmentBuffer {
    /// An empty buffer for bytes of `segno` from offset `base` on.
    pub fn new(timeline: u32, segno: u64, base: u32) -> SegmentBuffer {
        SegmentBuffer {
            timeline,
            segno,
            base,
            data: SegmentBytes::default(),
            closed: false,
            chunks: Vec::new(),
            commits: Vec::new(),
            restore_points: Vec::new(),
            oldest_undurable: None,
        }
    }

    /// Offset within the segment just past the last byte held.
    pub fn end_offset(&self) -> u32 {
        self.base + self.data.len() as u32
    }

    /// Its chunk objects, which a segment object makes redundant.
    pub fn chunk_objects(&self) -> Vec<pitr_archive::WalObject> {
        let (timeline, segno) = (self.timeline, self.segno);
        self.chunks.iter().map(|&(from, to)| pitr_archive::WalObject::Chunk { timeline, segno, from, to }).collect()
    }
}

/// First and last commit time among `commits` whose record ends in `(from_lsn, to_lsn]`: the
/// range an object holding `[from_lsn, to_lsn)` puts in its header (a record belongs to the
/// object holding its last byte).
pub(crate) fn commit_range(commits: &[(u64, i64)], from_lsn: u64, to_lsn: u64) -> (Option<i64>, Option<i64>) {
    let mut it = commits.iter().filter(|(end, _)| *end > from_lsn && *end <= to_lsn).map(|(_, t)| *t);
    let first = it.next();
    let last = it.next_back().or(first);
    (first, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_ranges_are_half_open_on_the_left() {
        let commits = [(10, 1), (20, 2), (30, 3)];
        assert_eq!(commit_range(&commits, 0, 10), (Some(1), Some(1)));
        assert_eq!(commit_range(&commits, 10, 30), (Some(2), Some(3)));
        assert_eq!(commit_range(&commits, 30, 40), (None, None));
    }
}
