//! Where streaming resumes, decided from the names of the archive's WAL objects alone.
//!
//! A crash, an older version of pitr or a repository copied mid-write can leave any mix of
//! segment objects and chunks; resume must turn each into a state the pipeline moves on from:
//!
//! | the newest segment of the newest timeline holds | resume at | in memory | afterwards |
//! |---|---|---|---|
//! | a segment object (leftover chunks of it are deleted first) | its end | nothing | |
//! | chunks covering it from offset 0 to its end, no segment object | its end | nothing | compacted in the background |
//! | chunks from offset 0 to short of its end | the end of that run | the run | grows, compacted when full |
//! | overlapping chunks (a retry wrote 0-100, then 0-250) | the farthest end reached | the run, each byte read once | as above |
//! | chunks with a gap (0-100, 200-300) | the end before the gap (100) | the run before the gap | the primary sends the rest again; every chunk goes at compaction |
//! | chunks starting past offset 0 (an older version started mid-segment) | the end of their run | the run, from its first offset | cannot be compacted: stays as chunks (as it was) |
//!
//! Any older segment that chunks cover entirely without a segment object (the crash came
//! between its last chunk and its compaction, and streaming went on) is compacted in the
//! background as well. A newest timeline with only a history file and no WAL resumes on the
//! newest timeline that has WAL; the server's history then moves streaming on.
//!
//! Where the chunks themselves contradict each other (two chunks disagree about bytes they both
//! hold, or a chunk holds another length than its name says) reading the run back fails naming
//! the objects (`pitr_archive::chunk_run`): streaming on would only archive a guess.

use pitr_archive::chunk_run::{cover, ChunkRun};
use pitr_archive::{ObjectKind, ObjectMeta, SegmentEntry, WalCatalog, WalLayout, WalObject};

use super::buffer::SegmentBuffer;
use super::wal_meta;

/// Chunks of one segment to read back, and all the chunks the segment has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunPlan {
    pub timeline: u32,
    pub segno: u64,
    /// Chunks covering `[base, end)` without a gap, in order, each reaching past the one before
    /// (so that every byte is read once or, where chunks overlap, checked once).
    pub read: Vec<(u32, u32)>,
    /// Every chunk of the segment, the ones a wider chunk makes redundant and the ones past a
    /// gap included: a segment object makes them all redundant.
    pub all: Vec<(u32, u32)>,
}

impl RunPlan {
    /// The chunks that cover the segment from its first chunk on, as far as they reach without
    /// a gap (`None` if the segment has no chunks).
    fn of(timeline: u32, segno: u64, entry: &SegmentEntry) -> Option<RunPlan> {
        let base = entry.chunks.iter().map(|c| c.0).min()?;
        Some(RunPlan { timeline, segno, read: cover(&entry.chunks, base), all: entry.chunks.clone() })
    }

    pub fn base(&self) -> u32 {
        self.read.first().map_or(0, |c| c.0)
    }

    pub fn end(&self) -> u32 {
        self.read.last().map_or(0, |c| c.1)
    }

    /// Every chunk of the segment, as objects.
    pub fn all_objects(&self) -> Vec<WalObject> {
        let (timeline, segno) = (self.timeline, self.segno);
        self.all.iter().map(|&(from, to)| WalObject::Chunk { timeline, segno, from, to }).collect()
    }
}

/// What start-up does with the archive's WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResumePlan {
    /// (timeline, LSN) where streaming resumes; `None` when the archive holds no WAL.
    pub start: Option<(u32, u64)>,
    /// The newest segment when chunks hold it only in part: read back into memory so that it
    /// grows and is compacted when it completes.
    pub partial: Option<RunPlan>,
    /// Segments that chunks hold from offset 0 to the end, with no segment object.
    pub orphans: Vec<RunPlan>,
    /// Chunks a segment object made redundant (a crash between a compaction and its deletes):
    /// deleted before anything else.
    pub redundant: Vec<WalObject>,
}

impl ResumePlan {
    /// Decides, from object names alone, where to resume and what to read back, compact or
    /// delete.
    pub fn from_catalog(catalog: &WalCatalog) -> ResumePlan {
        let seg_size = catalog.layout.segment_size;
        let redundant = catalog.redundant_chunks();
        let orphans = catalog
            .segments
            .iter()
            .filter(|(_, entry)| !entry.whole)
            .filter_map(|(&(timeline, segno), entry)| RunPlan::of(timeline, segno, entry))
            .filter(|run| run.base() == 0 && u64::from(run.end()) == seg_size)
            .collect();
        // Segments of the newest timeline that has WAL; the newest of them decides.
        let newest = catalog.latest_timeline().and_then(|t| {
            catalog.segments.range((t, 0)..=(t, u64::MAX)).next_back().map(|(&(t, segno), e)| (t, segno, e))
        });
        let Some((timeline, segno, entry)) = newest else {
            return ResumePlan { start: None, partial: None, orphans, redundant };
        };
        let seg_start = catalog.layout.segment_start(segno);
        if entry.whole {
            return ResumePlan { start: Some((timeline, seg_start + seg_size)), partial: None, orphans, redundant };
        }
        let run = RunPlan::of(timeline, segno, entry);
        let end = run.as_ref().map_or(0, |r| r.end());
        let start = Some((timeline, seg_start + u64::from(end)));
        // A run reaching the segment's end needs nothing in memory: nothing more can come for it.
        // From offset 0 it is an orphan (compacted); from further on it stays as chunks.
        let partial = run.filter(|r| u64::from(r.end()) < seg_size);
        ResumePlan { start, partial, orphans, redundant }
    }
}

/// A run of chunks read back as a buffer that continues where it ends. Commit times come from
/// the chunks' headers, each chunk's first and last placed at the chunk's end: a later chunk's
/// range starts at or after that end and so leaves them out; a segment's range takes them in,
/// so its header gets the first and last commit of the whole segment.
pub(crate) fn resumed_buffer(layout: &WalLayout, plan: &RunPlan, run: ChunkRun) -> SegmentBuffer {
    let seg_lsn = layout.segment_start(plan.segno);
    let mut buf = SegmentBuffer::new(plan.timeline, plan.segno, run.base);
    buf.commits = run
        .chunks
        .iter()
        .flat_map(|c| {
            let end = seg_lsn + u64::from(c.to);
            [c.meta.first_commit_us, c.meta.last_commit_us].into_iter().flatten().map(move |t| (end, t))
        })
        .collect();
    buf.data = run.data.into();
    buf.chunks = plan.all.clone();
    buf
}

/// A segment left as chunks, made one segment object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Compaction {
    pub object: WalObject,
    pub meta: ObjectMeta,
    pub bytes: bytes::Bytes,
    /// Its chunks, to delete once the segment object is durable.
    pub obsolete: Vec<WalObject>,
}

/// The segment object for an orphan (`plan`, read back as `run`); an error text when the run
/// does not cover the segment.
pub(crate) fn compaction(layout: &WalLayout, plan: &RunPlan, run: ChunkRun) -> Result<Compaction, String> {
    let mut buf = resumed_buffer(layout, plan, run);
    if buf.base != 0 || buf.data.len() as u64 != layout.segment_size {
        return Err(format!(
            "chunks of segment {} on timeline {} do not cover it",
            layout.segment_file_name(plan.timeline, plan.segno),
            plan.timeline
        ));
    }
    let seg_lsn = layout.segment_start(plan.segno);
    let meta = wal_meta(ObjectKind::WalSegment, &buf, seg_lsn, seg_lsn + layout.segment_size);
    let object = WalObject::Segment { timeline: plan.timeline, segno: plan.segno };
    Ok(Compaction { object, meta, bytes: buf.data.share(), obsolete: plan.all_objects() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;
    const END: u32 = SEG as u32;

    fn layout() -> WalLayout {
        WalLayout { system_id: 7, segment_size: SEG }
    }

    fn catalog(objects: &[WalObject]) -> WalCatalog {
        let l = layout();
        let names: Vec<String> = objects.iter().map(|o| l.object_name(o)).collect();
        WalCatalog::from_names(l, names.iter().map(String::as_str))
    }

    fn chunk(timeline: u32, segno: u64, from: u32, to: u32) -> WalObject {
        WalObject::Chunk { timeline, segno, from, to }
    }

    fn plan(objects: &[WalObject]) -> ResumePlan {
        ResumePlan::from_catalog(&catalog(objects))
    }

    #[test]
    fn plans_every_state_the_archive_can_be_in() {
        // Empty archive.
        assert_eq!(plan(&[]), ResumePlan { start: None, partial: None, orphans: vec![], redundant: vec![] });

        // (6) A whole segment with leftover chunks: resume after it, nothing to read; the
        // leftovers go.
        let p = plan(&[WalObject::Segment { timeline: 1, segno: 3 }, chunk(1, 3, 0, 100)]);
        let redundant = vec![chunk(1, 3, 0, 100)];
        assert_eq!(p, ResumePlan { start: Some((1, 4 * SEG)), partial: None, orphans: vec![], redundant });

        // (1) Chunks covering the newest segment, no segment object: resume after it, compact it.
        let p = plan(&[chunk(1, 3, 0, 100), chunk(1, 3, 100, END)]);
        assert_eq!(p.start, Some((1, 4 * SEG)));
        assert_eq!(p.partial, None);
        assert_eq!(p.orphans.len(), 1);
        assert_eq!(p.orphans[0].read, vec![(0, 100), (100, END)]);
        assert_eq!(p.redundant, vec![]);

        // (2) The same plus chunks of the next segment: that one is read back.
        let p = plan(&[chunk(1, 3, 0, 100), chunk(1, 3, 100, END), chunk(1, 4, 0, 50)]);
        assert_eq!(p.start, Some((1, 4 * SEG + 50)));
        assert_eq!(p.partial.as_ref().map(|r| (r.segno, r.read.clone())), Some((4, vec![(0, 50)])));
        assert_eq!(p.orphans.iter().map(|r| r.segno).collect::<Vec<_>>(), vec![3]);

        // (3) Overlapping chunks: the wider one is read, both go at compaction.
        let p = plan(&[chunk(1, 3, 0, 100), chunk(1, 3, 0, 250)]);
        assert_eq!(p.start, Some((1, 3 * SEG + 250)));
        let run = p.partial.unwrap();
        assert_eq!(run.read, vec![(0, 250)]);
        assert_eq!(run.all, vec![(0, 100), (0, 250)]);
        let p = plan(&[chunk(1, 3, 0, 100), chunk(1, 3, 50, 300), chunk(1, 3, 100, 200)]);
        assert_eq!(p.partial.unwrap().read, vec![(0, 100), (50, 300)]);

        // (4) A gap: resume where the run from 0 ends; the chunk past the gap is kept for deletion.
        let p = plan(&[chunk(1, 3, 0, 100), chunk(1, 3, 200, 300)]);
        assert_eq!(p.start, Some((1, 3 * SEG + 100)));
        let run = p.partial.unwrap();
        assert_eq!((run.read.clone(), run.all.len()), (vec![(0, 100)], 2));

        // (5) Chunks not starting at offset 0: resume at their end; not compactable.
        let p = plan(&[WalObject::Segment { timeline: 1, segno: 2 }, chunk(1, 3, 100, 200)]);
        assert_eq!(p.start, Some((1, 3 * SEG + 200)));
        assert_eq!(p.partial.as_ref().map(|r| (r.base(), r.end())), Some((100, 200)));
        // ... reaching the segment's end: nothing more can come, nothing to read or compact.
        let p = plan(&[chunk(1, 3, 100, END)]);
        assert_eq!(p, ResumePlan { start: Some((1, 4 * SEG)), partial: None, orphans: vec![], redundant: vec![] });

        // (7) The newest timeline has only a history file: resume on the newest with WAL.
        let p = plan(&[WalObject::History { timeline: 2 }, chunk(1, 3, 0, 100)]);
        assert_eq!(p.start, Some((1, 3 * SEG + 100)));
        let p = plan(&[WalObject::History { timeline: 2 }]);
        assert_eq!(p.start, None);

        // An older segment, even on an older timeline, left as chunks is compacted too.
        let p = plan(&[
            chunk(1, 3, 0, END),
            WalObject::Segment { timeline: 1, segno: 4 },
            WalObject::History { timeline: 2 },
            chunk(2, 4, 0, 10),
        ]);
        assert_eq!(p.start, Some((2, 4 * SEG + 10)));
        assert_eq!(p.orphans.iter().map(|r| (r.timeline, r.segno)).collect::<Vec<_>>(), vec![(1, 3)]);
    }
}
