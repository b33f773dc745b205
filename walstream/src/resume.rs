//! Where streaming resumes, from whatever the archive's WAL holds at start-up.
//!
//! A crash, an older version of pitr or a repository copied mid-write can leave any mix of
//! segment objects and chunks; resume must turn each into a state the uploader moves on from:
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
//! hold, or a chunk holds another length than its name says) resume fails naming the objects:
//! streaming on would only archive a guess.

use pitr_archive::layout::{SegmentEntry, WalCatalog, WalLayout, WalObject};
use pitr_archive::{ObjectKind, ObjectMeta, Repository};

use crate::pending::SegmentBuffer;
use crate::receiver::StreamError;

/// Chunks of one segment to read back, and all the chunks the segment has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkRun {
    pub timeline: u32,
    pub segno: u64,
    /// Chunks covering `[base, end)` without a gap, in order, each reaching past the one before
    /// (so that every byte is read once or, where chunks overlap, checked once).
    pub read: Vec<(u32, u32)>,
    /// Every chunk of the segment, the ones a wider chunk makes redundant and the ones past a
    /// gap included: a segment object makes them all redundant.
    pub all: Vec<(u32, u32)>,
}

impl ChunkRun {
    /// Picks the chunks that cover the segment from its first chunk on, as far as they reach
    /// without a gap (`None` if the segment has no chunks).
    fn of(timeline: u32, segno: u64, entry: &SegmentEntry) -> Option<ChunkRun> {
        let base = entry.chunks.iter().map(|c| c.0).min()?;
        let mut read = Vec::new();
        let mut end = base;
        // Each step takes, of the chunks starting at or before the end so far, the one that
        // reaches farthest; none reaching past it is a gap or the end.
        while let Some(&next) = entry.chunks.iter().filter(|c| c.0 <= end && c.1 > end).max_by_key(|c| c.1) {
            read.push(next);
            end = next.1;
        }
        Some(ChunkRun { timeline, segno, read, all: entry.chunks.clone() })
    }

    pub fn base(&self) -> u32 {
        self.read.first().map_or(0, |c| c.0)
    }

    pub fn end(&self) -> u32 {
        self.read.last().map_or(0, |c| c.1)
    }
}

/// What start-up does with the archive's WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResumePlan {
    /// (timeline, LSN) where streaming resumes; `None` when the archive holds no WAL.
    pub start: Option<(u32, u64)>,
    /// The newest segment when chunks hold it only in part: read back into memory so that it
    /// grows and is compacted when it completes.
    pub partial: Option<ChunkRun>,
    /// Segments that chunks hold from offset 0 to the end, with no segment object.
    pub orphans: Vec<ChunkRun>,
}

/// Decides, from object names alone, where to resume and what to read back or compact.
pub(crate) fn plan(catalog: &WalCatalog) -> ResumePlan {
    let seg_size = catalog.layout.segment_size;
    let runs: Vec<(bool, ChunkRun)> = catalog
        .segments
        .iter()
        .filter_map(|(&(timeline, segno), entry)| Some((entry.whole, ChunkRun::of(timeline, segno, entry)?)))
        .collect();
    let orphans = runs
        .iter()
        .filter(|(whole, run)| !whole && run.base() == 0 && u64::from(run.end()) == seg_size)
        .map(|(_, run)| run.clone())
        .collect();
    // Segments of the newest timeline that has WAL; the newest of them decides.
    let newest = catalog
        .latest_timeline()
        .and_then(|t| catalog.segments.range((t, 0)..=(t, u64::MAX)).next_back().map(|(&(t, segno), e)| (t, segno, e)));
    let Some((timeline, segno, entry)) = newest else {
        return ResumePlan { start: None, partial: None, orphans };
    };
    let seg_start = catalog.layout.segment_start(segno);
    if entry.whole {
        return ResumePlan { start: Some((timeline, seg_start + seg_size)), partial: None, orphans };
    }
    let run = ChunkRun::of(timeline, segno, entry);
    let end = run.as_ref().map_or(0, |r| r.end());
    let start = Some((timeline, seg_start + u64::from(end)));
    // A run reaching the segment's end needs nothing in memory: nothing more can come for it.
    // From offset 0 it is an orphan (compacted); from further on it stays as chunks.
    let partial = run.filter(|r| u64::from(r.end()) < seg_size);
    ResumePlan { start, partial, orphans }
}

/// A run of chunks read back: its first offset, its bytes, and commit times from the chunks'
/// headers.
struct Loaded {
    base: u32,
    data: Vec<u8>,
    /// (LSN, time µs): each chunk's first and last commit time, placed at the chunk's end. A
    /// later chunk's range starts at or after that end and so leaves them out; a segment's
    /// range takes them in, so its header gets the first and last commit of the whole segment.
    commits: Vec<(u64, i64)>,
}

async fn load(repo: &Repository, layout: WalLayout, run: &ChunkRun) -> Result<Loaded, StreamError> {
    let seg_lsn = layout.segment_start(run.segno);
    let base = run.base();
    let mut data = Vec::with_capacity((run.end() - base) as usize);
    let mut commits = Vec::new();
    let mut read_so_far = Vec::new();
    for &(from, to) in &run.read {
        let name = layout.object_name(&WalObject::Chunk { timeline: run.timeline, segno: run.segno, from, to });
        let (header, bytes) = repo.get_opened(&name).await?;
        if bytes.len() != (to - from) as usize {
            return Err(StreamError::ChunkLength { chunk: name, bytes: bytes.len(), named: (to - from) as usize });
        }
        // The plan only picks a chunk that starts within what is read so far.
        let have = base as usize + data.len();
        let overlap = have.saturating_sub(from as usize).min(bytes.len());
        let held = data.get(from.saturating_sub(base) as usize..).unwrap_or_default();
        if held != &bytes[..overlap] {
            return Err(StreamError::ChunkMismatch { chunk: name, earlier: read_so_far.join(", ") });
        }
        data.extend_from_slice(&bytes[overlap..]);
        for time in [header.meta.first_commit_us, header.meta.last_commit_us].into_iter().flatten() {
            commits.push((seg_lsn + u64::from(to), time));
        }
        read_so_far.push(name);
    }
    Ok(Loaded { base, data, commits })
}

/// Lists the archive's WAL, deletes chunks a segment object made redundant (a crash between a
/// compaction and its deletes), plans the resume and reads the partial segment back.
pub(crate) async fn prepare(
    repo: &Repository,
    layout: WalLayout,
) -> Result<(ResumePlan, Option<SegmentBuffer>), StreamError> {
    let catalog = WalCatalog::build(repo, layout).await?;
    let redundant: Vec<String> = catalog.redundant_chunks().iter().map(|o| layout.object_name(o)).collect();
    repo.delete_many(&redundant).await?;
    let plan = plan(&catalog);
    let partial = match &plan.partial {
        Some(run) => Some(load_partial(repo, layout, run).await?),
        None => None,
    };
    Ok((plan, partial))
}

/// Reads the newest, partial segment back into a buffer that continues where it ends.
pub(crate) async fn load_partial(
    repo: &Repository,
    layout: WalLayout,
    run: &ChunkRun,
) -> Result<SegmentBuffer, StreamError> {
    let loaded = load(repo, layout, run).await?;
    let mut buf = SegmentBuffer::new(run.timeline, run.segno, loaded.base);
    buf.data = loaded.data;
    buf.durable = buf.end_offset();
    buf.chunks = run.all.clone();
    buf.commits = loaded.commits;
    Ok(buf)
}

/// Compacts segments that chunks hold entirely into segment objects, one at a time (one
/// segment in memory), and deletes their chunks. They are archived already: this only saves
/// objects and requests later, so a failure is a warning and the next start-up tries again.
pub(crate) async fn compact_orphans(repo: Repository, layout: WalLayout, orphans: Vec<ChunkRun>) {
    for run in orphans {
        let name = layout.object_name(&WalObject::Segment { timeline: run.timeline, segno: run.segno });
        match compact(&repo, layout, &run).await {
            Ok(()) => tracing::info!(segment = %name, chunks = run.all.len(), "compacted a segment left as chunks"),
            Err(e) => tracing::warn!(segment = %name, error = %e,
                "could not compact a segment left as chunks; its chunks stay and the next start tries again"),
        }
    }
}

async fn compact(repo: &Repository, layout: WalLayout, run: &ChunkRun) -> Result<(), StreamError> {
    let loaded = load(repo, layout, run).await?;
    if loaded.base != 0 || loaded.data.len() as u64 != layout.segment_size {
        return Err(StreamError::Fatal(format!(
            "chunks of segment {} on timeline {} do not cover it",
            layout.segment_file_name(run.timeline, run.segno),
            run.timeline
        )));
    }
    let seg_lsn = layout.segment_start(run.segno);
    let meta = ObjectMeta {
        kind: ObjectKind::WalSegment,
        timeline: run.timeline,
        start_lsn: seg_lsn,
        end_lsn: seg_lsn + layout.segment_size,
        first_commit_us: loaded.commits.first().map(|c| c.1),
        last_commit_us: loaded.commits.last().map(|c| c.1),
    };
    let name = layout.object_name(&WalObject::Segment { timeline: run.timeline, segno: run.segno });
    repo.put_sealed(&name, loaded.data, meta).await?;
    let chunks: Vec<String> = run
        .all
        .iter()
        .map(|&(from, to)| layout.object_name(&WalObject::Chunk { timeline: run.timeline, segno: run.segno, from, to }))
        .collect();
    repo.delete_many(&chunks).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pending::{Durable, Pending, UploadStats, Uploader};
    use pitr_archive::{KeyRing, LocalStore};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use tokio::sync::{watch, Notify};

    const SEG: u64 = 1 << 20;

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

    const END: u32 = SEG as u32;

    #[test]
    fn plans_every_state_the_archive_can_be_in() {
        // Empty archive.
        assert_eq!(plan(&catalog(&[])), ResumePlan { start: None, partial: None, orphans: vec![] });

        // (6) A whole segment with leftover chunks: resume after it, nothing to read.
        let p = plan(&catalog(&[WalObject::Segment { timeline: 1, segno: 3 }, chunk(1, 3, 0, 100)]));
        assert_eq!(p, ResumePlan { start: Some((1, 4 * SEG)), partial: None, orphans: vec![] });

        // (1) Chunks covering the newest segment, no segment object: resume after it, compact it.
        let p = plan(&catalog(&[chunk(1, 3, 0, 100), chunk(1, 3, 100, END)]));
        assert_eq!(p.start, Some((1, 4 * SEG)));
        assert_eq!(p.partial, None);
        assert_eq!(p.orphans.len(), 1);
        assert_eq!(p.orphans[0].read, vec![(0, 100), (100, END)]);

        // (2) The same plus chunks of the next segment: that one is read back.
        let p = plan(&catalog(&[chunk(1, 3, 0, 100), chunk(1, 3, 100, END), chunk(1, 4, 0, 50)]));
        assert_eq!(p.start, Some((1, 4 * SEG + 50)));
        assert_eq!(p.partial.as_ref().map(|r| (r.segno, r.read.clone())), Some((4, vec![(0, 50)])));
        assert_eq!(p.orphans.iter().map(|r| r.segno).collect::<Vec<_>>(), vec![3]);

        // (3) Overlapping chunks: the wider one is read, both go at compaction.
        let p = plan(&catalog(&[chunk(1, 3, 0, 100), chunk(1, 3, 0, 250)]));
        assert_eq!(p.start, Some((1, 3 * SEG + 250)));
        let run = p.partial.unwrap();
        assert_eq!(run.read, vec![(0, 250)]);
        assert_eq!(run.all, vec![(0, 100), (0, 250)]);
        let p = plan(&catalog(&[chunk(1, 3, 0, 100), chunk(1, 3, 50, 300), chunk(1, 3, 100, 200)]));
        assert_eq!(p.partial.unwrap().read, vec![(0, 100), (50, 300)]);

        // (4) A gap: resume where the run from 0 ends; the chunk past the gap is kept for deletion.
        let p = plan(&catalog(&[chunk(1, 3, 0, 100), chunk(1, 3, 200, 300)]));
        assert_eq!(p.start, Some((1, 3 * SEG + 100)));
        let run = p.partial.unwrap();
        assert_eq!((run.read.clone(), run.all.len()), (vec![(0, 100)], 2));

        // (5) Chunks not starting at offset 0: resume at their end; not compactable.
        let p = plan(&catalog(&[WalObject::Segment { timeline: 1, segno: 2 }, chunk(1, 3, 100, 200)]));
        assert_eq!(p.start, Some((1, 3 * SEG + 200)));
        assert_eq!(p.partial.as_ref().map(|r| (r.base(), r.end())), Some((100, 200)));
        // ... reaching the segment's end: nothing more can come, nothing to read or compact.
        let p = plan(&catalog(&[chunk(1, 3, 100, END)]));
        assert_eq!(p, ResumePlan { start: Some((1, 4 * SEG)), partial: None, orphans: vec![] });

        // (7) The newest timeline has only a history file: resume on the newest with WAL.
        let p = plan(&catalog(&[WalObject::History { timeline: 2 }, chunk(1, 3, 0, 100)]));
        assert_eq!(p.start, Some((1, 3 * SEG + 100)));
        let p = plan(&catalog(&[WalObject::History { timeline: 2 }]));
        assert_eq!(p.start, None);

        // An older segment, even on an older timeline, left as chunks is compacted too.
        let p = plan(&catalog(&[
            chunk(1, 3, 0, END),
            WalObject::Segment { timeline: 1, segno: 4 },
            WalObject::History { timeline: 2 },
            chunk(2, 4, 0, 10),
        ]));
        assert_eq!(p.start, Some((2, 4 * SEG + 10)));
        assert_eq!(p.orphans.iter().map(|r| (r.timeline, r.segno)).collect::<Vec<_>>(), vec![(1, 3)]);
    }

    /// The test cluster's WAL: a byte for each LSN.
    fn wal(from: u64, to: u64) -> Vec<u8> {
        (from..to).map(|lsn| (lsn.wrapping_mul(31) % 251) as u8).collect()
    }

    async fn put(repo: &Repository, obj: WalObject, bytes: Vec<u8>) {
        let l = layout();
        let (timeline, start, end, kind) = match obj {
            WalObject::Chunk { timeline, segno, from, to } => {
                let s = l.segment_start(segno);
                (timeline, s + u64::from(from), s + u64::from(to), ObjectKind::WalChunk)
            }
            WalObject::Segment { timeline, segno } => {
                (timeline, l.segment_start(segno), l.segment_start(segno + 1), ObjectKind::WalSegment)
            }
            WalObject::History { timeline } => (timeline, 0, 0, ObjectKind::TimelineHistory),
        };
        let meta =
            ObjectMeta { kind, timeline, start_lsn: start, end_lsn: end, first_commit_us: None, last_commit_us: None };
        repo.put_sealed(&l.object_name(&obj), bytes, meta).await.unwrap();
    }

    /// Plants `objects` holding the test WAL (timeline 1).
    async fn plant(objects: &[WalObject]) -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [9; 32]));
        let l = layout();
        for &obj in objects {
            let bytes = match obj {
                WalObject::Chunk { segno, from, to, .. } => {
                    wal(l.segment_start(segno) + u64::from(from), l.segment_start(segno) + u64::from(to))
                }
                WalObject::Segment { segno, .. } => wal(l.segment_start(segno), l.segment_start(segno + 1)),
                WalObject::History { .. } => b"1\t0/3000000\tno recovery target specified\n".to_vec(),
            };
            put(&repo, obj, bytes).await;
        }
        (dir, repo)
    }

    /// Resumes as the receiver does, streams the test WAL from there to `until` through a real
    /// uploader, stops, and returns the resume point.
    async fn resume_and_stream(repo: &Repository, until: u64) -> u64 {
        let l = layout();
        let (plan, partial) = prepare(repo, l).await.unwrap();
        let (timeline, start) = plan.start.unwrap();
        compact_orphans(repo.clone(), l, plan.orphans).await;
        let pending = Arc::new(Mutex::new(Pending { segments: partial.into_iter().collect() }));
        let (durable_tx, mut durable) = watch::channel(Durable { timeline, lsn: start, last_commit_us: None });
        let wake = Arc::new(Notify::new());
        let uploader = Uploader {
            repo: repo.clone(),
            layout: l,
            pending: pending.clone(),
            wake: wake.clone(),
            freed: Arc::new(Notify::new()),
            durable: durable_tx,
            stats: Arc::new(Mutex::new(UploadStats::default())),
            flush_interval: Duration::ZERO,
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(uploader.run(stop_rx));
        // In pieces, as the primary sends it.
        let mut lsn = start;
        while lsn < until {
            let to = (lsn + 100_000).min(until);
            lsn = crate::pending::lock(&pending).append(timeline, lsn, &wal(lsn, to), &[], SEG, Instant::now());
            wake.notify_one();
        }
        // The archive's end moves past the planted state within seconds.
        tokio::time::timeout(Duration::from_secs(20), durable.wait_for(|d| d.lsn >= until))
            .await
            .expect("the uploader stalled")
            .unwrap();
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap().unwrap();
        start
    }

    /// Waits (the uploader deletes compacted chunks in the background) until the archive holds
    /// segments `whole` as segment objects and no chunk of them, each byte equal to the test
    /// WAL; returns the catalog.
    async fn assert_whole(repo: &Repository, whole: std::ops::RangeInclusive<u64>) -> WalCatalog {
        let l = layout();
        let deadline = Instant::now() + Duration::from_secs(20);
        let catalog = loop {
            let catalog = WalCatalog::build(repo, l).await.unwrap();
            let done = whole
                .clone()
                .all(|segno| catalog.segments.get(&(1, segno)).is_some_and(|e| e.whole && e.chunks.is_empty()));
            if done {
                break catalog;
            }
            assert!(Instant::now() < deadline, "segments {whole:?} not compacted: {:?}", catalog.segments);
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for segno in whole {
            let name = l.object_name(&WalObject::Segment { timeline: 1, segno });
            let (_, bytes) = repo.get_opened(&name).await.unwrap();
            assert!(bytes == wal(l.segment_start(segno), l.segment_start(segno + 1)), "{name} differs");
        }
        catalog
    }

    #[tokio::test]
    async fn every_planted_state_resumes_and_moves_on() {
        let s3 = 3 * SEG;
        let cases: Vec<(&str, Vec<WalObject>, u64)> = vec![
            ("(1) chunks cover the newest segment", vec![chunk(1, 3, 0, 100), chunk(1, 3, 100, END)], 4 * SEG),
            ("(2) ... and the next one begins", vec![chunk(1, 3, 0, END), chunk(1, 4, 0, 50)], 4 * SEG + 50),
            ("(3) overlapping chunks", vec![chunk(1, 3, 0, 100), chunk(1, 3, 0, 250)], s3 + 250),
            ("(4) a gap", vec![chunk(1, 3, 0, 100), chunk(1, 3, 200, 300)], s3 + 100),
            (
                "(6) a whole segment and leftover chunks",
                vec![WalObject::Segment { timeline: 1, segno: 3 }, chunk(1, 3, 0, 100)],
                4 * SEG,
            ),
            (
                "(7) a newer timeline's history only",
                vec![chunk(1, 3, 0, 100), WalObject::History { timeline: 2 }],
                s3 + 100,
            ),
        ];
        for (what, objects, want_start) in cases {
            let (_dir, repo) = plant(&objects).await;
            let start = resume_and_stream(&repo, 6 * SEG + 10).await;
            assert_eq!(start, want_start, "{what}");
            let catalog = assert_whole(&repo, 3..=5).await;
            assert_eq!(catalog.end_lsn(1), Some(6 * SEG + 10), "{what}");
        }
    }

    #[tokio::test]
    async fn chunks_from_past_offset_0_stay_chunks_and_streaming_goes_on() {
        // (5) An older version started this segment mid-way.
        let (_dir, repo) = plant(&[WalObject::Segment { timeline: 1, segno: 2 }, chunk(1, 3, 100, 200)]).await;
        assert_eq!(resume_and_stream(&repo, 5 * SEG).await, 3 * SEG + 200);
        let catalog = assert_whole(&repo, 4..=4).await;
        let held = catalog.segments.get(&(1, 3)).unwrap();
        assert!(!held.whole);
        assert_eq!(held.contiguous_chunk_end(), Some((100, END)));
        // ... and likewise when they reach the segment's end: nothing to wait for.
        let (_dir, repo) = plant(&[chunk(1, 3, 100, END)]).await;
        assert_eq!(resume_and_stream(&repo, 5 * SEG).await, 4 * SEG);
        assert_whole(&repo, 4..=4).await;
    }

    #[tokio::test]
    async fn contradicting_chunks_fail_naming_them() {
        let l = layout();
        let (_dir, repo) = plant(&[chunk(1, 3, 0, 100)]).await;
        // Overlaps the first with other bytes.
        let mut other = wal(3 * SEG + 50, 3 * SEG + 300);
        other[10] ^= 1;
        put(&repo, chunk(1, 3, 50, 300), other).await;
        let err = prepare(&repo, l).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StreamError::ChunkMismatch { .. }), "{text}");
        assert!(text.contains(&l.object_name(&chunk(1, 3, 0, 100))), "{text}");
        assert!(text.contains(&l.object_name(&chunk(1, 3, 50, 300))), "{text}");

        // A chunk shorter than its name says.
        let (_dir, repo) = plant(&[]).await;
        put(&repo, chunk(1, 3, 0, 100), wal(3 * SEG, 3 * SEG + 90)).await;
        let err = prepare(&repo, l).await.unwrap_err();
        assert!(matches!(err, StreamError::ChunkLength { bytes: 90, named: 100, .. }), "{err}");
    }
}
