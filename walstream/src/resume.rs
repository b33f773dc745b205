//! Start-up against the archive: list its WAL, delete chunks a segment object made redundant,
//! read the newest partial segment back, and compact segments left as chunks in the background.
//! What each state the archive can be in calls for is decided, from names alone, by
//! [`ResumePlan`] (see `pipeline/resume.rs` for the table of states); this is its I/O.

use pitr_archive::chunk_run::{ChunkRun, ChunkRunError};
use pitr_archive::lease::LeaseGuard;
use pitr_archive::{Repository, WalCatalog, WalLayout, WalObject};

use crate::api::StreamError;
use crate::pipeline::{compaction, resumed_buffer, ResumePlan, RunPlan, SegmentBuffer};

/// Lists the archive's WAL, deletes chunks a segment object made redundant (a crash between a
/// compaction and its deletes), plans the resume and reads the partial segment back. Returns the
/// listing too: the change indexer reads the WAL before the resume point through it (chunks
/// deleted here are those a segment object holds, which the listing has as well).
pub(crate) async fn prepare(
    repo: &Repository,
    guard: &LeaseGuard,
    layout: WalLayout,
) -> Result<(ResumePlan, Option<SegmentBuffer>, WalCatalog), StreamError> {
    let catalog = WalCatalog::build(repo, layout).await?;
    let plan = ResumePlan::from_catalog(&catalog);
    let redundant: Vec<String> = plan.redundant.iter().map(|o| layout.object_name(o)).collect();
    if !redundant.is_empty() {
        guard.fenced(repo.delete_many(&redundant)).await??;
    }
    let partial = match &plan.partial {
        Some(run) => Some(resumed_buffer(&layout, run, read_run(repo, layout, run).await?)),
        None => None,
    };
    Ok((plan, partial, catalog))
}

async fn read_run(repo: &Repository, layout: WalLayout, run: &RunPlan) -> Result<ChunkRun, ChunkRunError> {
    repo.read_chunk_run(&layout, run.timeline, run.segno, &run.read).await
}

/// Compacts segments that chunks hold entirely into segment objects, one at a time (one
/// segment in memory), and deletes their chunks. They are archived already: this only saves
/// objects and requests later, so a failure is a warning and the next start-up tries again.
pub(crate) async fn compact_orphans(repo: Repository, guard: LeaseGuard, layout: WalLayout, orphans: Vec<RunPlan>) {
    for run in orphans {
        let name = layout.object_name(&WalObject::Segment { timeline: run.timeline, segno: run.segno });
        match compact(&repo, &guard, layout, &run).await {
            Ok(()) => tracing::info!(segment = %name, chunks = run.all.len(), "compacted a segment left as chunks"),
            Err(e) => tracing::warn!(segment = %name, error = %e,
                "could not compact a segment left as chunks; its chunks stay and the next start tries again"),
        }
    }
}

async fn compact(repo: &Repository, guard: &LeaseGuard, layout: WalLayout, run: &RunPlan) -> Result<(), StreamError> {
    let segment = compaction(&layout, run, read_run(repo, layout, run).await?).map_err(StreamError::Fatal)?;
    guard.fenced(repo.put_sealed(&layout.object_name(&segment.object), segment.bytes, segment.meta)).await??;
    let chunks: Vec<String> = segment.obsolete.iter().map(|o| layout.object_name(o)).collect();
    guard.fenced(repo.delete_many(&chunks)).await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::WalPipeline;
    use crate::uploader::{self, Shared};
    use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const SEG: u64 = 1 << 20;

    fn layout() -> WalLayout {
        WalLayout { system_id: 7, segment_size: SEG }
    }

    fn chunk(timeline: u32, segno: u64, from: u32, to: u32) -> WalObject {
        WalObject::Chunk { timeline, segno, from, to }
    }

    const END: u32 = SEG as u32;

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

    /// The guard of a freshly taken writer lease (valid for a minute: no renewals needed).
    async fn guard(repo: &Repository) -> LeaseGuard {
        let lease = pitr_archive::lease::Lease::acquire(repo, layout().system_id, "test", Duration::from_secs(60));
        lease.await.unwrap().guard()
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
        // Every write passes the writer lease's guard, as in the sidecar.
        let lease =
            pitr_archive::lease::Lease::acquire(repo, l.system_id, "test", Duration::from_secs(60)).await.unwrap();
        let (plan, partial, _) = prepare(repo, &lease.guard(), l).await.unwrap();
        let (timeline, start) = plan.start.unwrap();
        compact_orphans(repo.clone(), lease.guard(), l, plan.orphans).await;
        let shared = Shared::new(WalPipeline::resume(l, Duration::ZERO, timeline, start, partial));
        let (task, mut progress) =
            uploader::spawn(repo.clone(), lease.guard(), shared.clone(), tokio::runtime::Handle::current());
        // In pieces, as the primary sends it.
        let mut lsn = start;
        while lsn < until {
            let to = (lsn + 100_000).min(until);
            lsn = shared.with(|p| p.append(lsn, &wal(lsn, to), &[], Instant::now())).unwrap();
            shared.wake_uploader();
        }
        // The archive's end moves past the planted state within seconds.
        tokio::time::timeout(Duration::from_secs(20), progress.wait_for(|_| shared.with(|p| p.durable().lsn >= until)))
            .await
            .expect("the uploader stalled")
            .unwrap();
        shared.stop();
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
        let err = prepare(&repo, &guard(&repo).await, l).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StreamError::ChunkMismatch { .. }), "{text}");
        assert!(text.contains(&l.object_name(&chunk(1, 3, 0, 100))), "{text}");
        assert!(text.contains(&l.object_name(&chunk(1, 3, 50, 300))), "{text}");

        // A chunk shorter than its name says.
        let (_dir, repo) = plant(&[]).await;
        put(&repo, chunk(1, 3, 0, 100), wal(3 * SEG, 3 * SEG + 90)).await;
        let err = prepare(&repo, &guard(&repo).await, l).await.unwrap_err();
        assert!(matches!(err, StreamError::ChunkLength { bytes: 90, named: 100, .. }), "{err}");
    }
}
