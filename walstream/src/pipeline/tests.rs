//! Unit tests of the pipeline: every transition, and resume from every state a crash can leave
//! the archive in, against an in-memory archive (no tokio, no store: milliseconds).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pitr_archive::chunk_run::{ChunkRead, ChunkRun, ChunkRunError, RunAssembler};
use pitr_archive::{ObjectKind, ObjectMeta, WalCatalog, WalLayout, WalObject};
use pitr_pgformat::timeline::HistoryEntry;

use super::*;
use pitr_archive::restore_points::RestorePoint;

/// Small segments: every test crosses several boundaries in a few KiB.
const SEG: u64 = 4096;
const END: u32 = SEG as u32;
const HOUR: Duration = Duration::from_secs(3600);
const MS: Duration = Duration::from_millis(1);

fn layout() -> WalLayout {
    WalLayout { system_id: 7, segment_size: SEG }
}

/// Where timeline 2 forks from timeline 1 in the tests that switch.
const FORK: u64 = 3 * SEG + 250;

/// The primary's WAL: a byte for each LSN; timeline 2 has its own bytes after the fork.
fn byte(timeline: u32, lsn: u64) -> u8 {
    let own = if timeline >= 2 && lsn >= FORK { 97 } else { 0 };
    ((lsn.wrapping_mul(31) + own) % 251) as u8
}

fn wal(timeline: u32, from: u64, to: u64) -> Vec<u8> {
    (from..to).map(|lsn| byte(timeline, lsn)).collect()
}

fn chunk(timeline: u32, segno: u64, from: u32, to: u32) -> WalObject {
    WalObject::Chunk { timeline, segno, from, to }
}

fn segment(timeline: u32, segno: u64) -> WalObject {
    WalObject::Segment { timeline, segno }
}

/// A pipeline on timeline 1 holding `buffers` (segno, base, end, closed) of the test WAL,
/// durable up to `durable` (an LSN), last chunk put at `last_put`, spacing `flush_interval`.
fn with_buffers(
    buffers: &[(u64, u32, u32, bool)],
    durable: u64,
    flush_interval: Duration,
    last_put: Option<Instant>,
) -> WalPipeline {
    let l = layout();
    let mut p = WalPipeline::resume(l, flush_interval, 1, durable, None);
    for &(segno, base, end, closed) in buffers {
        let start = l.segment_start(segno);
        let mut b = SegmentBuffer::new(1, segno, base);
        b.data = wal(1, start + u64::from(base), start + u64::from(end)).into();
        b.closed = closed;
        p.segments.push_back(b);
    }
    if let Some(b) = p.segments.back() {
        p.received = l.segment_start(b.segno) + u64::from(b.end_offset());
    }
    p.last_chunk_put = last_put;
    p
}

/// The kind of the next put, if any (and takes nothing: the put is reported failed at once,
/// with the backoff cleared, so the state is as before).
fn peek(p: &mut WalPipeline, now: Instant) -> Option<&'static str> {
    let Step::Put(put) = p.next_step(now) else { return None };
    p.put_failed(put.id, String::new(), now).unwrap();
    p.retry = Retry::default();
    p.stats = UploadStats::default();
    Some(match put.object {
        WalObject::Chunk { .. } => "chunk",
        WalObject::Segment { .. } => "segment",
        WalObject::History { .. } => "history",
    })
}

fn take_put(p: &mut WalPipeline, now: Instant) -> Put {
    match p.next_step(now) {
        Step::Put(put) => put,
        other => panic!("expected a put, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Append

#[test]
fn appends_within_and_across_segment_boundaries() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), HOUR, 1, 3 * SEG + 123);
    assert_eq!((p.timeline(), p.received(), p.reportable()), (1, 3 * SEG, 3 * SEG), "starts at the segment's start");
    assert_eq!(p.append(3 * SEG, &wal(1, 3 * SEG, 3 * SEG + 100), &[], t), Ok(3 * SEG + 100));
    assert_eq!(p.append(3 * SEG + 100, &wal(1, 3 * SEG + 100, 3 * SEG + 200), &[], t), Ok(3 * SEG + 200));
    assert_eq!(p.segments.len(), 1, "within a segment: one buffer");
    assert_eq!(p.held_bytes(), 200);
    // One message spanning two boundaries: three buffers, the full ones closed; each commit
    // goes to the segment holding the record's last byte.
    let commits = [(4 * SEG, 5), (4 * SEG + 1, 6), (5 * SEG + 10, 7)];
    let end = p.append(3 * SEG + 200, &wal(1, 3 * SEG + 200, 5 * SEG + 10), &commits, t).unwrap();
    assert_eq!((end, p.received()), (5 * SEG + 10, 5 * SEG + 10));
    let shape: Vec<_> = p.segments.iter().map(|s| (s.segno, s.base, s.end_offset(), s.closed)).collect();
    assert_eq!(shape, vec![(3, 0, END, true), (4, 0, END, true), (5, 0, 10, false)]);
    let commits: Vec<_> = p.segments.iter().map(|s| s.commits.clone()).collect();
    assert_eq!(commits, vec![vec![(4 * SEG, 5)], vec![(4 * SEG + 1, 6)], vec![(5 * SEG + 10, 7)]]);
    assert_eq!(p.segments[0].data, wal(1, 3 * SEG, 4 * SEG));
    // Exactly at a boundary: the next byte opens the next segment's buffer.
    let mut p = WalPipeline::fresh(layout(), HOUR, 1, 0);
    p.append(0, &wal(1, 0, SEG), &[], t).unwrap();
    assert!(p.segments[0].closed);
    p.append(SEG, &wal(1, SEG, SEG + 1), &[], t).unwrap();
    assert_eq!(p.segments.iter().map(|s| (s.segno, s.closed)).collect::<Vec<_>>(), vec![(0, true), (1, false)]);
}

#[test]
fn append_refuses_wal_that_does_not_continue() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), HOUR, 1, 0);
    p.append(0, &wal(1, 0, 100), &[], t).unwrap();
    let err = p.append(200, &wal(1, 200, 210), &[], t).unwrap_err();
    assert_eq!(err, PipelineError::Misplaced { expected: 100, got: 200 });
    assert_eq!(err.to_string(), "server sent WAL at 0/C8 but 0/64 was expected");
    assert_eq!((p.received(), p.held_bytes(), p.segments.len()), (100, 100, 1), "nothing taken");
    assert!(p.append(50, &wal(1, 50, 60), &[], t).is_err(), "nor WAL already received");
}

#[test]
fn append_closes_full_and_superseded_buffers() {
    let now = Instant::now();
    // Resumed with a partial segment: appending continues it.
    let mut p = with_buffers(&[(3, 0, 100, false)], 3 * SEG + 100, HOUR, None);
    let end = p.append(3 * SEG + 100, &wal(1, 3 * SEG + 100, 3 * SEG + 150), &[], now).unwrap();
    assert_eq!((end, p.segments.len(), p.segments[0].end_offset()), (3 * SEG + 150, 1, 150));
    // Fills it and runs into the next segment: the first is closed, the commit lands in the
    // segment holding its end.
    let end =
        p.append(3 * SEG + 150, &wal(1, 3 * SEG + 150, 4 * SEG + 10), &[(4 * SEG, 5), (4 * SEG + 5, 6)], now).unwrap();
    assert_eq!(end, 4 * SEG + 10);
    assert!(p.segments[0].closed && !p.segments[1].closed);
    assert_eq!(p.segments[0].commits, vec![(4 * SEG, 5)]);
    assert_eq!(p.segments[1].commits, vec![(4 * SEG + 5, 6)]);
    assert_eq!(peek(&mut p, now), Some("segment"));
    // Bytes of another timeline close the open buffer too.
    let mut p = with_buffers(&[(3, 0, 100, false)], 3 * SEG + 100, HOUR, None);
    let start = p.switch_timeline(2, 3 * SEG + 50);
    p.append(start, &wal(2, start, start + 10), &[], now).unwrap();
    let shape: Vec<_> = p.segments.iter().map(|s| (s.timeline, s.closed)).collect();
    assert_eq!(shape, vec![(1, true), (2, false)]);
    // The durable, closed, uncompactable buffer is dropped, and the next one's bytes go.
    assert_eq!(peek(&mut p, now), Some("chunk"));
    assert_eq!(p.segments.iter().map(|s| s.timeline).collect::<Vec<_>>(), vec![2]);
}

// ---------------------------------------------------------------------------------------------
// Next job

#[test]
fn a_full_buffer_is_compacted_whatever_its_flag() {
    let now = Instant::now();
    // Resumed from chunks covering the segment, by an older version that left it open.
    let mut p = with_buffers(&[(3, 0, END, false)], 4 * SEG, HOUR, None);
    assert_eq!(peek(&mut p, now), Some("segment"));
    let mut p = with_buffers(&[(3, 0, END, false)], 3 * SEG + 100, HOUR, Some(now));
    assert_eq!(peek(&mut p, now), Some("segment"), "at once, spacing or not");
    // Full from past offset 0: its last chunk goes at once, then it is dropped.
    let mut p = with_buffers(&[(3, 100, END, false)], 3 * SEG + 200, HOUR, Some(now));
    assert_eq!(peek(&mut p, now), Some("chunk"));
    let mut p = with_buffers(&[(3, 100, END, false)], 4 * SEG, HOUR, None);
    assert_eq!(p.next_step(now), Step::Wait(None));
    assert!(p.segments.is_empty());
}

#[test]
fn a_durable_front_never_holds_up_a_later_segment() {
    let now = Instant::now();
    // Open and durable, nothing behind: waiting for bytes is right.
    let mut p = with_buffers(&[(3, 0, 100, false)], 3 * SEG + 100, HOUR, None);
    assert_eq!(peek(&mut p, now), None);
    assert_eq!(p.segments.len(), 1);
    // The same with a later segment's bytes behind it (even if nobody closed it): dropped, and
    // the later segment's bytes go.
    let mut p = with_buffers(&[(3, 0, 100, false), (4, 0, 10, false)], 3 * SEG + 100, HOUR, None);
    let put = take_put(&mut p, now);
    assert_eq!(put.object, chunk(1, 4, 0, 10));
    // Not yet durable: its last chunk goes at once, spacing or not.
    let mut p = with_buffers(&[(3, 0, 100, false), (4, 0, 10, false)], 3 * SEG + 50, HOUR, Some(now));
    assert_eq!(take_put(&mut p, now).object, chunk(1, 3, 50, 100));
    // An open front respects the spacing.
    let mut p = with_buffers(&[(3, 0, 100, false)], 3 * SEG + 50, HOUR, Some(now));
    assert_eq!(peek(&mut p, now), None);
    let mut p = with_buffers(&[(3, 0, 100, false)], 3 * SEG + 50, HOUR, None);
    assert_eq!(peek(&mut p, now), Some("chunk"));
}

#[test]
fn group_commit_puts_when_wal_is_there_and_the_previous_put_is_done_spaced_by_the_interval() {
    let t0 = Instant::now();
    let second = Duration::from_secs(1);
    let mut p = WalPipeline::fresh(layout(), second, 1, 0);
    // Idle: no WAL, no put, nothing to wake for.
    assert_eq!(p.next_step(t0), Step::Wait(None));
    // The first WAL goes at once.
    p.append(0, &wal(1, 0, 100), &[(60, 11)], t0).unwrap();
    let first = take_put(&mut p, t0);
    assert_eq!(first.object, chunk(1, 0, 0, 100));
    assert_eq!(first.bytes, wal(1, 0, 100));
    assert_eq!(
        first.meta,
        ObjectMeta {
            kind: ObjectKind::WalChunk,
            timeline: 1,
            start_lsn: 0,
            end_lsn: 100,
            first_commit_us: Some(11),
            last_commit_us: Some(11)
        }
    );
    // While it is under way, nothing else goes, whatever comes.
    p.append(100, &wal(1, 100, 300), &[], t0 + 10 * MS).unwrap();
    assert_eq!(p.next_step(t0 + 2 * second), Step::Wait(None));
    p.put_done(first.id, t0 + 300 * MS).unwrap();
    // New WAL is there, the put is done, but the spacing counts from the previous put's start.
    assert_eq!(p.next_step(t0 + 500 * MS), Step::Wait(Some(t0 + second)));
    let next = take_put(&mut p, t0 + second);
    assert_eq!(next.object, chunk(1, 0, 100, 300), "everything that came meanwhile, in one chunk");
    p.put_done(next.id, t0 + second + MS).unwrap();
    // Caught up: no timer to wake for.
    assert_eq!(p.next_step(t0 + 3 * second), Step::Wait(None));
    // A segment boundary: the closed segment's tail goes at once, as a chunk...
    p.append(300, &wal(1, 300, SEG + 5), &[], t0 + second + 2 * MS).unwrap();
    assert_eq!(p.next_compaction(t0 + second + 2 * MS), None, "not durable yet: nothing to compact");
    let tail = take_put(&mut p, t0 + second + 3 * MS);
    assert_eq!(tail.object, chunk(1, 0, 300, END));
    p.put_done(tail.id, t0 + second + 4 * MS).unwrap();
    assert_eq!(p.reportable(), SEG);
    // ...and the segment, durable through its chunks, is compacted beside the next puts.
    let seg = p.next_compaction(t0 + second + 4 * MS).unwrap();
    assert_eq!(seg.object, segment(1, 0));
    assert_eq!(seg.bytes, wal(1, 0, SEG));
    assert_eq!(seg.meta.first_commit_us, Some(11), "a segment's header covers every commit in it");
    assert_eq!(p.next_compaction(t0 + second + 4 * MS), None, "one compaction at a time");
    // The next segment's first bytes wait for the spacing from the tail chunk, not for it.
    assert_eq!(p.next_step(t0 + second + 5 * MS), Step::Wait(Some(t0 + 2 * second + 3 * MS)));
    let beside = take_put(&mut p, t0 + 2 * second + 3 * MS);
    assert_eq!(beside.object, chunk(1, 1, 0, 5));
    p.put_done(seg.id, t0 + 2 * second + 4 * MS).unwrap();
    p.put_done(beside.id, t0 + 2 * second + 5 * MS).unwrap();
    assert_eq!(p.reportable(), SEG + 5);
    // With no spacing, every put goes as soon as the previous one is done.
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.append(0, &wal(1, 0, 10), &[], t0).unwrap();
    let a = take_put(&mut p, t0);
    p.append(10, &wal(1, 10, 20), &[], t0).unwrap();
    p.put_done(a.id, t0).unwrap();
    assert_eq!(take_put(&mut p, t0).object, chunk(1, 0, 10, 20));
}

#[test]
fn a_whole_segment_is_shared_with_its_puts_not_copied() {
    let t0 = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.note_server_end(3 * SEG);
    p.append(0, &wal(1, 0, SEG), &[], t0).unwrap();
    let put = take_put(&mut p, t0);
    assert_eq!((put.object, &put.bytes), (segment(1, 0), &wal(1, 0, SEG).into()));
    let at = put.bytes.as_ptr();
    p.put_failed(put.id, "down".into(), t0).unwrap();
    let retry = take_put(&mut p, t0 + HOUR);
    assert_eq!(retry.bytes.as_ptr(), at, "the retry puts the same bytes, not a copy");

    // The buffer freed while a put still holds its bytes leaves them as they were.
    p.put_done(retry.id, t0 + HOUR).unwrap();
    p.append(SEG, &wal(1, SEG, 2 * SEG), &[], t0 + HOUR).unwrap();
    assert_eq!((put.bytes, retry.bytes), (wal(1, 0, SEG).into(), wal(1, 0, SEG).into()));
    assert_eq!(take_put(&mut p, t0 + HOUR).bytes, wal(1, SEG, 2 * SEG));
}

#[test]
fn catching_up_a_segment_is_sealed_once() {
    let t0 = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    // The server already has WAL past this segment: its first bytes wait for the rest of it.
    p.note_server_end(3 * SEG);
    p.append(0, &wal(1, 0, 100), &[], t0).unwrap();
    assert_eq!(p.next_step(t0), Step::Wait(Some(t0 + CATCH_UP_HOLD)));
    assert_eq!(p.reportable(), 0, "held WAL is not durable and not reported");
    p.append(100, &wal(1, 100, SEG + 10), &[], t0 + MS).unwrap();
    let seg = take_put(&mut p, t0 + 2 * MS);
    assert_eq!((seg.object, seg.bytes), (segment(1, 0), wal(1, 0, SEG).into()), "one object, sealed once");
    let done = p.put_done(seg.id, t0 + 3 * MS).unwrap();
    assert!(done.obsolete.is_empty(), "no chunks to delete: none were put");
    assert_eq!(p.reportable(), SEG);

    // The rest does not come (a stalled connection): the chunk goes after the hold.
    assert_eq!(p.next_step(t0 + 4 * MS), Step::Wait(Some(t0 + MS + CATCH_UP_HOLD)));
    assert_eq!(take_put(&mut p, t0 + MS + CATCH_UP_HOLD).object, chunk(1, 1, 0, 10));

    // The server's WAL ends inside the front segment (caught up): chunks go at once.
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.note_server_end(SEG - 1);
    p.append(0, &wal(1, 0, 100), &[], t0).unwrap();
    assert_eq!(take_put(&mut p, t0).object, chunk(1, 0, 0, 100));

    // A stop puts what is held at once.
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.note_server_end(3 * SEG);
    p.append(0, &wal(1, 0, 100), &[], t0).unwrap();
    p.stop();
    assert_eq!(take_put(&mut p, t0).object, chunk(1, 0, 0, 100));

    // A timeline switch forgets the old server end.
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.note_server_end(3 * SEG);
    p.switch_timeline(2, 10);
    p.append(0, &wal(2, 0, 100), &[], t0).unwrap();
    assert_eq!(take_put(&mut p, t0).object, WalObject::Chunk { timeline: 2, segno: 0, from: 0, to: 100 });
}

// ---------------------------------------------------------------------------------------------
// Put done, put failed

#[test]
fn a_done_for_another_put_changes_nothing() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.append(0, &wal(1, 0, 100), &[], t).unwrap();
    let put = take_put(&mut p, t);
    assert_eq!(p.put_done(put.id + 1, t), Err(PipelineError::NotInFlight { id: put.id + 1 }));
    assert_eq!(p.put_failed(put.id + 7, "x".into(), t), Err(PipelineError::NotInFlight { id: put.id + 7 }));
    assert_eq!((p.durable().lsn, p.reportable(), p.stats().errors), (0, 0, 0));
    p.put_done(put.id, t).unwrap();
    assert_eq!(p.reportable(), 100);
    // Reported twice: the second changes nothing.
    let generation = p.generation();
    assert_eq!(p.put_done(put.id, t), Err(PipelineError::NotInFlight { id: put.id }));
    assert_eq!((p.reportable(), p.stats().objects, p.generation()), (100, 1, generation));
    // A failure reported for a put already done changes nothing either.
    p.append(100, &wal(1, 100, 200), &[], t).unwrap();
    let next = take_put(&mut p, t);
    assert!(p.put_failed(put.id, "late".into(), t).is_err());
    p.put_done(next.id, t).unwrap();
    assert_eq!((p.reportable(), p.stats().errors), (200, 0));
}

#[test]
fn failed_puts_are_retried_after_a_growing_backoff_with_what_came_meanwhile() {
    let t0 = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.append(0, &wal(1, 0, 100), &[], t0).unwrap();
    let put = take_put(&mut p, t0);
    assert_eq!(p.put_failed(put.id, "storage down".into(), t0), Ok(100 * MS));
    assert_eq!((p.stats().errors, p.stats().last_error.as_deref()), (1, Some("storage down")));
    assert_eq!(p.reportable(), 0, "nothing durable");
    // Not before the backoff, even with new WAL.
    p.append(100, &wal(1, 100, 150), &[], t0 + MS).unwrap();
    assert_eq!(p.next_step(t0 + 50 * MS), Step::Wait(Some(t0 + 100 * MS)));
    let again = take_put(&mut p, t0 + 100 * MS);
    assert_eq!((again.object, again.bytes.clone()), (chunk(1, 0, 0, 150), wal(1, 0, 150).into()));
    // The delay doubles, up to 30 s.
    let mut now = t0 + 100 * MS;
    let mut delays = Vec::new();
    let mut id = again.id;
    for _ in 0..10 {
        let delay = p.put_failed(id, "still down".into(), now).unwrap();
        delays.push(delay.as_millis());
        now += delay;
        id = take_put(&mut p, now).id;
    }
    assert_eq!(delays, vec![200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
    // Success resets it and clears the error.
    p.put_done(id, now).unwrap();
    assert_eq!((p.reportable(), p.stats().last_error.clone(), p.stats().errors), (150, None, 11));
    p.append(150, &wal(1, 150, 160), &[], now).unwrap();
    let put = take_put(&mut p, now);
    assert_eq!(p.put_failed(put.id, "again".into(), now), Ok(100 * MS));
    // A stop retries at once.
    p.stop();
    assert!(matches!(p.next_step(now), Step::Put(_)));
}

#[test]
fn the_flush_position_is_never_ahead_of_durability() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 2 * SEG);
    assert_eq!(p.reportable(), 2 * SEG, "where streaming starts: everything before is the slot's");
    p.append(2 * SEG, &wal(1, 2 * SEG, 2 * SEG + 500), &[], t).unwrap();
    assert_eq!(p.reportable(), 2 * SEG, "received is not durable");
    let put = take_put(&mut p, t);
    p.append(2 * SEG + 500, &wal(1, 2 * SEG + 500, 3 * SEG + 10), &[], t).unwrap();
    assert_eq!(p.reportable(), 2 * SEG, "under way is not durable");
    p.put_failed(put.id, "down".into(), t).unwrap();
    assert_eq!(p.reportable(), 2 * SEG, "failed is not durable");
    let put = take_put(&mut p, t + HOUR);
    assert_eq!(put.object, segment(1, 2), "the full segment goes whole");
    p.put_done(put.id, t + HOUR).unwrap();
    assert_eq!(p.reportable(), 3 * SEG);
    assert_eq!(p.durable(), Durable { timeline: 1, lsn: 3 * SEG, last_commit_us: None });
    let put = take_put(&mut p, t + HOUR);
    p.put_done(put.id, t + HOUR).unwrap();
    assert_eq!(p.reportable(), 3 * SEG + 10);
}

#[test]
fn compaction_puts_the_segment_then_hands_out_its_chunks_for_deletion() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    let mut chunks = Vec::new();
    let mut lsn = 0;
    for (to, commit) in [(1000u64, Some(1)), (2500, None), (4000, Some(3))] {
        let commits: Vec<_> = commit.map(|c| (to - 1, c)).into_iter().collect();
        p.append(lsn, &wal(1, lsn, to), &commits, t).unwrap();
        let put = take_put(&mut p, t);
        let done = p.put_done(put.id, t).unwrap();
        assert!(done.obsolete.is_empty(), "a chunk makes nothing redundant");
        chunks.push(put.object);
        lsn = to;
    }
    assert_eq!(p.durable().last_commit_us, Some(3));
    p.append(lsn, &wal(1, lsn, SEG + 20), &[], t).unwrap();
    let tail = take_put(&mut p, t);
    assert_eq!(tail.object, chunk(1, 0, 4000, END));
    p.put_done(tail.id, t).unwrap();
    chunks.push(tail.object);
    let seg = p.next_compaction(t).unwrap();
    assert_eq!((seg.object, seg.bytes.len() as u64), (segment(1, 0), SEG));
    assert_eq!((seg.meta.first_commit_us, seg.meta.last_commit_us), (Some(1), Some(3)));
    // Failed: the chunks stay, and the segment is made again after a backoff, which the
    // uploader is told to wait for.
    let delay = p.put_failed(seg.id, "down".into(), t).unwrap();
    assert_eq!(p.next_compaction(t), None);
    let next_chunk = take_put(&mut p, t);
    assert_eq!(next_chunk.object, chunk(1, 1, 0, 20), "chunk puts go on meanwhile");
    p.put_done(next_chunk.id, t).unwrap();
    assert_eq!(p.next_step(t), Step::Wait(Some(t + delay)));
    let seg = p.next_compaction(t + delay).unwrap();
    assert_eq!(seg.object, segment(1, 0));
    // Durable: only now are the chunks redundant.
    let done = p.put_done(seg.id, t + HOUR).unwrap();
    assert_eq!(done.obsolete, chunks);
    assert_eq!((done.bytes, p.reportable(), p.held_bytes()), (SEG, SEG + 20, 20));
    assert_eq!(p.stats().objects, 6);
    // A stop waits for a compaction waiting to go.
    p.append(SEG + 20, &wal(1, SEG + 20, 2 * SEG), &[], t).unwrap();
    let tail = take_put(&mut p, t);
    p.put_done(tail.id, t).unwrap();
    p.stop();
    let seg = p.next_compaction(t).unwrap();
    assert_eq!(p.next_step(t), Step::Wait(None));
    p.put_done(seg.id, t).unwrap();
    assert_eq!(p.next_step(t), Step::Finished);
}

#[test]
fn a_stop_retries_a_failed_compaction_at_once() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.append(0, &wal(1, 0, 100), &[], t).unwrap();
    let first = take_put(&mut p, t);
    p.put_done(first.id, t).unwrap();
    p.append(100, &wal(1, 100, SEG), &[], t).unwrap();
    let tail = take_put(&mut p, t);
    p.put_done(tail.id, t).unwrap();
    let seg = p.next_compaction(t).unwrap();
    p.put_failed(seg.id, "down".into(), t).unwrap();
    assert_eq!(p.next_compaction(t), None, "waits for its backoff");
    p.stop();
    let seg = p.next_compaction(t).expect("a stop does not wait out the backoff");
    p.put_done(seg.id, t).unwrap();
    assert_eq!(p.next_step(t), Step::Finished);
}

#[test]
fn a_put_landed_but_reported_failed_leaves_a_chunk_the_next_start_removes() {
    let t = Instant::now();
    let mut archive = Archive::default();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    p.append(0, &wal(1, 0, 100), &[], t).unwrap();
    let put = take_put(&mut p, t);
    archive.put(put.object, put.meta.clone(), put.bytes.to_vec());
    p.put_failed(put.id, "timed out".into(), t).unwrap();
    p.append(100, &wal(1, 100, SEG), &[], t).unwrap();
    let retry = take_put(&mut p, t + HOUR);
    assert_eq!(retry.object, segment(1, 0));
    archive.put(retry.object, retry.meta.clone(), retry.bytes.to_vec());
    let done = p.put_done(retry.id, t + HOUR).unwrap();
    assert_eq!(done.obsolete, vec![], "the pipeline never heard of the chunk");
    let plan = ResumePlan::from_catalog(&archive.catalog());
    assert_eq!(plan.redundant, vec![chunk(1, 0, 0, 100)]);
    assert_eq!(plan.start, Some((1, SEG)));
}

// ---------------------------------------------------------------------------------------------
// Stop, memory, lag

#[test]
fn a_stop_finishes_once_everything_received_is_durable() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), HOUR, 1, 0);
    p.stop();
    assert_eq!(p.next_step(t), Step::Finished, "nothing received");
    let mut p = WalPipeline::fresh(layout(), HOUR, 1, 0);
    p.append(0, &wal(1, 0, 100), &[], t).unwrap();
    let put = take_put(&mut p, t);
    p.put_done(put.id, t).unwrap();
    p.append(100, &wal(1, 100, 200), &[], t).unwrap();
    p.stop();
    assert_eq!(p.next_step(t), Step::Wait(Some(t + HOUR)), "the spacing still holds");
    let put = take_put(&mut p, t + HOUR);
    assert_eq!(p.next_step(t + HOUR), Step::Wait(None), "not while a put is under way");
    p.put_done(put.id, t + HOUR).unwrap();
    assert_eq!(p.next_step(t + HOUR), Step::Finished);
    // A full segment held as durable chunks is compacted before the end.
    let mut p = with_buffers(&[(3, 0, END, true)], 4 * SEG, HOUR, None);
    p.stop();
    let put = take_put(&mut p, t);
    assert_eq!(put.object, segment(1, 3));
    p.put_done(put.id, t).unwrap();
    assert_eq!(p.next_step(t), Step::Finished);
}

#[test]
fn held_bytes_and_lag_follow_durability() {
    let t0 = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 0);
    assert_eq!((p.held_bytes(), p.lag(t0)), (0, Duration::ZERO));
    p.append(0, &wal(1, 0, 100), &[], t0).unwrap();
    assert_eq!((p.held_bytes(), p.lag(t0 + 5 * MS)), (100, 5 * MS));
    let put = take_put(&mut p, t0 + 5 * MS);
    p.append(100, &wal(1, 100, 150), &[], t0 + 6 * MS).unwrap();
    p.put_done(put.id, t0 + 8 * MS).unwrap();
    // Bytes that came during the put have waited since about its end.
    assert_eq!(p.lag(t0 + 10 * MS), 2 * MS);
    let put = take_put(&mut p, t0 + 10 * MS);
    let generation = p.generation();
    p.put_done(put.id, t0 + 11 * MS).unwrap();
    assert!(p.generation() > generation);
    assert_eq!((p.held_bytes(), p.lag(t0 + HOUR)), (150, Duration::ZERO));
    // Memory goes when the segment object is durable.
    p.append(150, &wal(1, 150, SEG), &[], t0).unwrap();
    let put = take_put(&mut p, t0 + 12 * MS);
    p.put_done(put.id, t0 + 13 * MS).unwrap();
    let seg = p.next_compaction(t0 + 13 * MS).unwrap();
    assert_eq!(p.held_bytes() as u64, SEG, "a segment being compacted is still held");
    let generation = p.generation();
    p.put_done(seg.id, t0 + 14 * MS).unwrap();
    assert_eq!(p.held_bytes(), 0);
    assert!(p.generation() > generation, "freed memory lets the receiver read on");
}

// ---------------------------------------------------------------------------------------------
// Timelines

#[test]
fn a_timeline_switch_mid_segment() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), HOUR, 1, 3 * SEG);
    p.append(3 * SEG, &wal(1, 3 * SEG, 3 * SEG + 200), &[], t).unwrap();
    let put = take_put(&mut p, t);
    p.put_done(put.id, t).unwrap();
    // The old primary ran on past the fork before it ended.
    p.append(3 * SEG + 200, &wal(1, 3 * SEG + 200, 3 * SEG + 300), &[], t).unwrap();
    let start = p.switch_timeline(2, FORK);
    assert_eq!((start, p.timeline(), p.received()), (3 * SEG, 2, 3 * SEG), "from the segment's start");
    assert_eq!(p.reportable(), 0, "timeline 1's tail is not durable yet: keep the slot");
    // The new timeline's WAL comes, but timeline 1's tail goes first, at once (it is closed).
    p.append(3 * SEG, &wal(2, 3 * SEG, 3 * SEG + 400), &[], t).unwrap();
    let tail = take_put(&mut p, t + MS);
    assert_eq!((tail.object, tail.bytes.clone()), (chunk(1, 3, 200, 300), wal(1, 3 * SEG + 200, 3 * SEG + 300).into()));
    p.put_done(tail.id, t + MS).unwrap();
    assert_eq!(p.durable().timeline, 1);
    assert_eq!(p.reportable(), 3 * SEG, "everything before timeline 2's start is archived");
    // Timeline 1's segment 3 is not full: it stays as chunks. Timeline 2's bytes go next (the
    // spacing counts from timeline 1's last chunk).
    let put = take_put(&mut p, t + HOUR + MS);
    assert_eq!((put.object, put.bytes.clone()), (chunk(2, 3, 0, 400), wal(2, 3 * SEG, 3 * SEG + 400).into()));
    p.put_done(put.id, t + HOUR + MS).unwrap();
    assert_eq!(p.reportable(), 3 * SEG + 400);
    assert_eq!(p.segments.iter().map(|s| s.timeline).collect::<Vec<_>>(), vec![2]);

    // Switching with nothing pending on the old timeline: its start is reportable at once.
    let mut p = WalPipeline::fresh(layout(), HOUR, 1, 3 * SEG);
    p.append(3 * SEG, &wal(1, 3 * SEG, 3 * SEG + 300), &[], t).unwrap();
    let put = take_put(&mut p, t);
    p.put_done(put.id, t).unwrap();
    p.switch_timeline(2, FORK);
    assert_eq!(p.reportable(), 3 * SEG);
    // A full old-timeline segment is compacted before the new timeline's bytes.
    let mut p = with_buffers(&[(3, 0, END, false)], 3 * SEG + 100, HOUR, Some(t));
    p.switch_timeline(2, 4 * SEG);
    p.append(4 * SEG, &wal(2, 4 * SEG, 4 * SEG + 10), &[], t).unwrap();
    assert_eq!(take_put(&mut p, t).object, segment(1, 3));
}

fn history(entries: &[(u32, u64)]) -> Vec<HistoryEntry> {
    entries.iter().map(|&(timeline, switch_lsn)| HistoryEntry { timeline, switch_lsn }).collect()
}

#[test]
fn following_a_servers_history() {
    let t = Instant::now();
    let hist = history(&[(1, FORK), (2, 6 * SEG + 10)]);
    // Behind the fork: stream timeline 1 to its end first (the server moves us on there).
    let mut p = WalPipeline::fresh(layout(), HOUR, 1, 3 * SEG);
    p.append(3 * SEG, &wal(1, 3 * SEG, 3 * SEG + 100), &[], t).unwrap();
    assert_eq!(p.follow_history(&hist, 3), Ok(vec![]));
    assert_eq!((p.timeline(), p.received()), (1, 3 * SEG + 100));
    // At or past the fork: onto timeline 2 at once, from the fork's segment; timeline 2's own
    // switch to 3 is still ahead.
    p.append(3 * SEG + 100, &wal(1, 3 * SEG + 100, FORK), &[], t).unwrap();
    assert_eq!(p.follow_history(&hist, 3), Ok(vec![Switch { from: 1, to: 2, start: 3 * SEG }]));
    assert_eq!((p.timeline(), p.received()), (2, 3 * SEG));
    // The archive's timeline is not an ancestor of the server's.
    let mut p = WalPipeline::fresh(layout(), HOUR, 4, 3 * SEG);
    assert_eq!(p.follow_history(&hist, 5), Err(PipelineError::NotDescendant { timeline: 4, server: 5 }));
    // Already on the server's timeline: nothing to do.
    let mut p = WalPipeline::fresh(layout(), HOUR, 3, 3 * SEG);
    assert_eq!(p.follow_history(&hist, 3), Ok(vec![]));
}

// ---------------------------------------------------------------------------------------------
// Resume, against an in-memory archive

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Archive {
    objects: BTreeMap<WalObject, (ObjectMeta, Vec<u8>)>,
}

impl Archive {
    /// Put-if-absent, as the repository does: the same plaintext again is fine, other plaintext
    /// under the same name is another writer's (a test failure here).
    fn put(&mut self, object: WalObject, meta: ObjectMeta, bytes: Vec<u8>) {
        if let Some((_, existing)) = self.objects.get(&object) {
            assert!(*existing == bytes, "conflict: {object:?} exists with other bytes");
            return;
        }
        self.objects.insert(object, (meta, bytes));
    }

    fn catalog(&self) -> WalCatalog {
        let l = layout();
        let names: Vec<String> = self.objects.keys().map(|o| l.object_name(o)).collect();
        WalCatalog::from_names(l, names.iter().map(String::as_str))
    }

    /// What `Repository::read_chunk_run` does, from memory.
    fn read_run(&self, plan: &RunPlan) -> Result<ChunkRun, ChunkRunError> {
        let l = layout();
        let mut run = RunAssembler::new(plan.base());
        let mut chunks = Vec::new();
        for &(from, to) in &plan.read {
            let object = chunk(plan.timeline, plan.segno, from, to);
            let (meta, bytes) = &self.objects[&object];
            run.push(&l.object_name(&object), from, to, bytes)?;
            chunks.push(ChunkRead { from, to, meta: meta.clone() });
        }
        let base = run.base();
        Ok(ChunkRun { base, data: run.into_bytes(), chunks })
    }

    /// How far the archive holds `timeline`'s WAL without a gap from `from` on.
    fn held_end(&self, timeline: u32, from: u64) -> u64 {
        let mut lsn = from;
        loop {
            let segno = lsn / SEG;
            if self.objects.contains_key(&segment(timeline, segno)) {
                lsn = (segno + 1) * SEG;
                continue;
            }
            let chunks: Vec<(u32, u32)> = self
                .objects
                .keys()
                .filter_map(|o| match *o {
                    WalObject::Chunk { timeline: t, segno: s, from, to } if (t, s) == (timeline, segno) => {
                        Some((from, to))
                    }
                    _ => None,
                })
                .collect();
            let mut end = (lsn % SEG) as u32;
            while let Some(c) = chunks.iter().filter(|c| c.0 <= end && c.1 > end).max_by_key(|c| c.1) {
                end = c.1;
            }
            if end < END {
                return segno * SEG + u64::from(end);
            }
            lsn = (segno + 1) * SEG;
        }
    }

    /// Every object holds the primary's WAL for what its name says.
    fn assert_exact(&self) {
        for (object, (meta, bytes)) in &self.objects {
            let (timeline, start, end) = match *object {
                WalObject::Chunk { timeline, segno, from, to } => {
                    (timeline, segno * SEG + u64::from(from), segno * SEG + u64::from(to))
                }
                WalObject::Segment { timeline, segno } => (timeline, segno * SEG, (segno + 1) * SEG),
                WalObject::History { .. } => continue,
            };
            assert!(*bytes == wal(timeline, start, end), "{object:?} holds other bytes");
            assert_eq!((meta.timeline, meta.start_lsn, meta.end_lsn), (timeline, start, end), "{object:?}");
        }
    }
}

/// A sidecar against the in-memory archive: the pipeline, with the uploader's and the
/// receiver's I/O done in memory, keeping the archive as a crash would leave it at every step.
struct Sim {
    archive: Archive,
    pipeline: WalPipeline,
    now: Instant,
    /// Archive states at every I/O boundary (before and after each put and each delete).
    crash_points: Vec<Archive>,
    /// Every `fail_every`th put attempt fails (without landing).
    fail_every: Option<usize>,
    attempts: usize,
    /// Where the reported position started on each timeline: at start-up the archive's end, at
    /// a switch the new timeline's start (the durability check looks from there on).
    starts: BTreeMap<u32, u64>,
}

impl Sim {
    fn new(archive: Archive, pipeline: WalPipeline) -> Sim {
        let starts = BTreeMap::from([(pipeline.timeline(), pipeline.reportable())]);
        Sim { archive, pipeline, now: Instant::now(), crash_points: Vec::new(), fail_every: None, attempts: 0, starts }
    }

    /// Start-up as `resume.rs` and the receiver do it, against `archive` (streaming on
    /// `server_timeline`, whose history is `hist`).
    fn start(mut archive: Archive, server_timeline: u32, hist: &[HistoryEntry]) -> Result<Sim, ChunkRunError> {
        let l = layout();
        let plan = ResumePlan::from_catalog(&archive.catalog());
        for o in &plan.redundant {
            archive.objects.remove(o);
        }
        let partial = match &plan.partial {
            Some(run) => Some(resumed_buffer(&l, run, archive.read_run(run)?)),
            None => None,
        };
        for run in &plan.orphans {
            let c = compaction(&l, run, archive.read_run(run)?).expect("an orphan covers its segment");
            archive.put(c.object, c.meta, c.bytes.to_vec());
            for o in &c.obsolete {
                archive.objects.remove(o);
            }
        }
        let mut pipeline = match plan.start {
            Some((timeline, end)) => WalPipeline::resume(l, Duration::ZERO, timeline, end, partial),
            None => WalPipeline::fresh(l, Duration::ZERO, 1, 0),
        };
        let mut starts = BTreeMap::from([(pipeline.timeline(), pipeline.reportable())]);
        if server_timeline > pipeline.timeline() {
            archive.put(WalObject::History { timeline: 2 }, ObjectMeta::plain(ObjectKind::TimelineHistory), vec![]);
            for switch in pipeline.follow_history(hist, server_timeline).expect("descends") {
                starts.insert(switch.to, switch.start);
            }
        }
        let mut sim = Sim::new(archive, pipeline);
        sim.starts = starts;
        Ok(sim)
    }

    fn crash_point(&mut self) {
        self.crash_points.push(self.archive.clone());
    }

    /// The uploader, until it waits for WAL (or finishes).
    /// Compactions go in between the chunk puts here; the uploader runs them beside.
    fn upload(&mut self) {
        loop {
            let put = match self.pipeline.next_compaction(self.now) {
                Some(compaction) => compaction,
                None => match self.pipeline.next_step(self.now) {
                    Step::Put(put) => put,
                    Step::Wait(Some(t)) => {
                        self.now = self.now.max(t);
                        continue;
                    }
                    Step::Wait(None) | Step::Finished => return,
                },
            };
            self.attempts += 1;
            self.crash_point();
            if self.fail_every.is_some_and(|n| self.attempts.is_multiple_of(n)) {
                self.pipeline.put_failed(put.id, "injected".into(), self.now).unwrap();
                continue;
            }
            self.archive.put(put.object, put.meta, put.bytes.to_vec());
            // Landed, not yet known to the pipeline.
            self.crash_point();
            let done = self.pipeline.put_done(put.id, self.now).unwrap();
            self.check_reportable();
            for o in done.obsolete {
                self.archive.objects.remove(&o);
                self.crash_point();
            }
        }
    }

    /// The receiver: the primary's WAL on the pipeline's timeline up to `until`, in pieces of
    /// `piece` bytes, each followed by the uploader's work.
    fn stream_to(&mut self, until: u64, piece: u64) {
        while self.pipeline.received() < until {
            let to = (self.pipeline.received() + piece).min(until);
            self.receive(to);
            self.upload();
        }
    }

    /// The receiver alone: the primary's WAL up to `until` in one message, nothing put.
    fn receive(&mut self, until: u64) {
        let (timeline, from) = (self.pipeline.timeline(), self.pipeline.received());
        // A commit ends in every message, a few bytes before its end.
        let commits = [(until - 3, (until * 10) as i64)];
        self.pipeline.append(from, &wal(timeline, from, until), &commits, self.now).unwrap();
        self.check_reportable();
        self.now += MS;
    }

    fn switch_to_timeline_2(&mut self) {
        let start = self.pipeline.switch_timeline(2, FORK);
        self.starts.insert(2, start);
        self.archive.put(WalObject::History { timeline: 2 }, ObjectMeta::plain(ObjectKind::TimelineHistory), vec![]);
        self.crash_point();
    }

    fn stop(&mut self) {
        self.pipeline.stop();
        self.upload();
        assert_eq!(self.pipeline.next_step(self.now), Step::Finished);
    }

    /// Whatever the pipeline reports, the archive holds.
    fn check_reportable(&self) {
        let r = self.pipeline.reportable();
        if r == 0 {
            return;
        }
        let mut timeline = self.pipeline.timeline();
        let mut start = self.starts[&timeline];
        if r <= start {
            // Nothing of this timeline is claimed: what is, is its ancestor's.
            let Some(&ancestor_start) = self.starts.get(&(timeline - 1)) else { return };
            (timeline, start) = (timeline - 1, ancestor_start);
            if r <= start {
                return;
            }
        }
        let held = self.archive.held_end(timeline, start);
        assert!(r <= held, "reported {r:#X} on timeline {timeline}, but the archive holds only up to {held:#X}");
    }
}

/// After a restart from any crash point and streaming to the end: every byte exactly once in
/// place, complete segments compacted, no chunk left beside a segment object.
fn assert_final(archive: &Archive, ends: &[(u32, u64, u64)]) {
    archive.assert_exact();
    for &(timeline, from, end) in ends {
        assert_eq!(archive.held_end(timeline, from), end, "timeline {timeline} is not held to its end");
        for segno in from / SEG..end / SEG {
            assert!(archive.objects.contains_key(&segment(timeline, segno)), "segment {segno} not compacted");
        }
    }
    let catalog = archive.catalog();
    assert_eq!(catalog.redundant_chunks(), vec![], "chunks beside segment objects");
}

#[test]
fn resumes_from_every_state_a_crash_leaves_while_streaming() {
    // One run from an empty archive through three and a half segments, every fifth put
    // failing once; a crash could come at any I/O boundary of it.
    let mut sim = Sim::new(Archive::default(), WalPipeline::fresh(layout(), Duration::ZERO, 1, 0));
    sim.fail_every = Some(5);
    sim.crash_point();
    sim.stream_to(3 * SEG + 500, 700);
    sim.stop();
    let end = 4 * SEG + 77;
    assert!(sim.crash_points.len() > 40, "{} crash points", sim.crash_points.len());
    for (i, archive) in sim.crash_points.iter().enumerate() {
        let mut resumed = Sim::start(archive.clone(), 1, &[]).unwrap_or_else(|e| panic!("crash point {i}: {e}"));
        resumed.check_reportable();
        resumed.stream_to(end, 300);
        resumed.stop();
        assert_eq!(resumed.pipeline.reportable(), end, "crash point {i}");
        assert_final(&resumed.archive, &[(1, 0, end)]);
    }
}

#[test]
fn resumes_from_every_state_a_crash_leaves_around_a_timeline_switch() {
    let hist = history(&[(1, FORK)]);
    let mut sim = Sim::new(Archive::default(), WalPipeline::fresh(layout(), Duration::ZERO, 1, 2 * SEG));
    sim.crash_point();
    sim.stream_to(3 * SEG - 100, 400);
    // The old primary's last WAL, 50 bytes past the fork, is not put yet when its timeline ends.
    sim.receive(FORK + 50);
    sim.switch_to_timeline_2();
    sim.stream_to(5 * SEG + 10, 600);
    sim.stop();
    assert_final(&sim.archive, &[(1, 2 * SEG, FORK + 50), (2, 3 * SEG, 5 * SEG + 10)]);
    let end = 5 * SEG + 500;
    for (i, archive) in sim.crash_points.iter().enumerate() {
        let mut resumed = Sim::start(archive.clone(), 2, &hist).unwrap_or_else(|e| panic!("crash point {i}: {e}"));
        if resumed.pipeline.timeline() == 1 {
            // Crashed before the fork: timeline 1 is streamed to its end, then switched.
            resumed.stream_to(FORK + 50, 400);
            resumed.switch_to_timeline_2();
        }
        resumed.check_reportable();
        resumed.stream_to(end, 300);
        resumed.stop();
        assert_eq!(resumed.pipeline.reportable(), end, "crash point {i}");
        // Timeline 1 ends where the old primary ended, or, crashed before its tail was durable,
        // where its archived WAL passed the fork (the tail beyond it is not needed).
        let tl1_end = resumed.archive.held_end(1, 2 * SEG);
        assert!((FORK..=FORK + 50).contains(&tl1_end), "crash point {i}: timeline 1 ends at {tl1_end:#X}");
        assert_final(&resumed.archive, &[(1, 2 * SEG, tl1_end), (2, 3 * SEG, end)]);
        assert!(resumed.archive.objects.contains_key(&WalObject::History { timeline: 2 }), "crash point {i}");
    }
}

/// Plants `objects` holding the test WAL of timeline 1 (a history file for a History).
fn plant(objects: &[WalObject]) -> Archive {
    let mut archive = Archive::default();
    for &o in objects {
        let (start, end, kind) = match o {
            WalObject::Chunk { segno, from, to, .. } => {
                (segno * SEG + u64::from(from), segno * SEG + u64::from(to), ObjectKind::WalChunk)
            }
            WalObject::Segment { segno, .. } => (segno * SEG, (segno + 1) * SEG, ObjectKind::WalSegment),
            WalObject::History { .. } => (0, 0, ObjectKind::TimelineHistory),
        };
        let meta = ObjectMeta {
            kind,
            timeline: 1,
            start_lsn: start,
            end_lsn: end,
            first_commit_us: None,
            last_commit_us: None,
        };
        archive.put(o, meta, wal(1, start, end));
    }
    archive
}

#[test]
fn resumes_from_each_planted_state_and_moves_on() {
    let s3 = 3 * SEG;
    // (state, objects, where streaming resumes, segments that end up whole, from where the
    // archive then holds the WAL without a gap)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<WalObject>, u64, Vec<u64>, u64)> = vec![
        ("nothing", vec![], 0, vec![0, 1, 2, 3, 4, 5], 0),
        ("chunks only, from 0", vec![chunk(1, 3, 0, 100), chunk(1, 3, 100, 300)], s3 + 300, vec![3, 4, 5], s3),
        (
            "chunks cover the newest segment",
            vec![chunk(1, 3, 0, 100), chunk(1, 3, 100, END)],
            4 * SEG,
            vec![3, 4, 5],
            s3,
        ),
        ("... and the next one begins", vec![chunk(1, 3, 0, END), chunk(1, 4, 0, 50)], 4 * SEG + 50, vec![3, 4, 5], s3),
        ("overlapping chunks", vec![chunk(1, 3, 0, 100), chunk(1, 3, 0, 250)], s3 + 250, vec![3, 4, 5], s3),
        ("a gap", vec![chunk(1, 3, 0, 100), chunk(1, 3, 200, 300)], s3 + 100, vec![3, 4, 5], s3),
        ("segment + leftover chunks", vec![segment(1, 3), chunk(1, 3, 0, 100)], 4 * SEG, vec![3, 4, 5], s3),
        ("history absent", vec![segment(1, 2), chunk(1, 3, 0, 100)], s3 + 100, vec![2, 3, 4, 5], 2 * SEG),
        ("history present", vec![chunk(1, 3, 0, 100), WalObject::History { timeline: 2 }], s3 + 100, vec![3, 4, 5], s3),
        ("chunk run not from offset 0", vec![segment(1, 2), chunk(1, 3, 100, 200)], s3 + 200, vec![2, 4, 5], s3 + 100),
        ("... reaching the segment's end", vec![chunk(1, 3, 100, END)], 4 * SEG, vec![4, 5], s3 + 100),
    ];
    let end = 6 * SEG + 10;
    for (what, objects, resume_at, whole, held_from) in cases {
        let mut sim = Sim::start(plant(&objects), 1, &[]).unwrap();
        assert_eq!(sim.pipeline.received(), resume_at, "{what}");
        assert_eq!(sim.pipeline.reportable(), resume_at, "{what}: the archive's end, no further");
        sim.stream_to(end, 1000);
        sim.stop();
        sim.archive.assert_exact();
        for segno in 0..6 {
            let is_whole = sim.archive.objects.contains_key(&segment(1, segno));
            assert_eq!(is_whole, whole.contains(&segno), "{what}: segment {segno}");
        }
        assert_eq!(sim.archive.held_end(1, held_from), end, "{what}");
        assert_eq!(sim.archive.catalog().redundant_chunks(), vec![], "{what}");
    }
}

#[test]
fn contradicting_chunks_stop_resume_naming_them() {
    let l = layout();
    let mut archive = plant(&[chunk(1, 3, 0, 100)]);
    let mut other = wal(1, 3 * SEG + 50, 3 * SEG + 300);
    other[10] ^= 1;
    archive.put(chunk(1, 3, 50, 300), ObjectMeta::plain(ObjectKind::WalChunk), other);
    let Err(err) = Sim::start(archive, 1, &[]) else { panic!("resumed over contradicting chunks") };
    let text = err.to_string();
    assert!(matches!(err, ChunkRunError::Mismatch { .. }), "{text}");
    assert!(text.contains(&l.object_name(&chunk(1, 3, 0, 100))), "{text}");
    assert!(text.contains(&l.object_name(&chunk(1, 3, 50, 300))), "{text}");
    // A chunk shorter than its name says.
    let mut archive = Archive::default();
    archive.put(chunk(1, 3, 0, 100), ObjectMeta::plain(ObjectKind::WalChunk), wal(1, 3 * SEG, 3 * SEG + 90));
    let Err(err) = Sim::start(archive, 1, &[]) else { panic!("resumed over a short chunk") };
    assert!(matches!(err, ChunkRunError::Length { bytes: 90, named: 100, .. }), "{err}");
}

#[test]
fn resume_reads_commit_times_back_from_chunk_headers() {
    let l = layout();
    let mut archive = Archive::default();
    for (from, to, first, last) in
        [(0u32, 100u32, Some(1), Some(2)), (100, 200, None, None), (200, 300, Some(3), Some(3))]
    {
        let meta = ObjectMeta {
            kind: ObjectKind::WalChunk,
            timeline: 1,
            start_lsn: u64::from(from),
            end_lsn: u64::from(to),
            first_commit_us: first,
            last_commit_us: last,
        };
        archive.put(chunk(1, 0, from, to), meta, wal(1, u64::from(from), u64::from(to)));
    }
    let plan = ResumePlan::from_catalog(&archive.catalog());
    let run = plan.partial.clone().unwrap();
    let buf = resumed_buffer(&l, &run, archive.read_run(&run).unwrap());
    assert_eq!((buf.base, buf.end_offset(), buf.chunks.clone()), (0, 300, vec![(0, 100), (100, 200), (200, 300)]));
    assert_eq!(buf.commits, vec![(100, 1), (100, 2), (300, 3), (300, 3)]);
    let mut p = WalPipeline::resume(l, Duration::ZERO, 1, 300, Some(buf));
    let t = Instant::now();
    assert_eq!(p.next_step(t), Step::Wait(None), "durable as read back: nothing to put");
    p.append(300, &wal(1, 300, SEG), &[(SEG - 1, 9)], t).unwrap();
    let tail = take_put(&mut p, t);
    p.put_done(tail.id, t).unwrap();
    let seg = p.next_compaction(t).unwrap();
    assert_eq!((seg.object, seg.meta.first_commit_us, seg.meta.last_commit_us), (segment(1, 0), Some(1), Some(9)));
    let done = p.put_done(seg.id, t).unwrap();
    assert_eq!(
        done.obsolete,
        vec![chunk(1, 0, 0, 100), chunk(1, 0, 100, 200), chunk(1, 0, 200, 300), chunk(1, 0, 300, END)]
    );
    // A partial buffer that does not end where the archive does is not taken.
    let run_buf = resumed_buffer(&l, &run, archive.read_run(&run).unwrap());
    let p = WalPipeline::resume(l, Duration::ZERO, 1, 500, Some(run_buf));
    assert_eq!((p.segments.len(), p.received()), (0, 500));
}

// ---------------------------------------------------------------------------------------------
// Restore points

fn point(name: &str, lsn: u64, end_lsn: u64) -> RestorePoint {
    RestorePoint { name: name.into(), timeline: 1, lsn, end_lsn, time_us: 1 }
}

/// Each restore point travels with the put that holds its record's last byte (its aligned end,
/// as for commits): with the first chunk that reaches it, or with the whole segment put while
/// catching up; never with a compaction, which follows chunks that carried it already.
#[test]
fn restore_points_travel_with_the_put_that_holds_their_end() {
    let t = Instant::now();
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 3 * SEG);
    p.append(3 * SEG, &wal(1, 3 * SEG, 3 * SEG + 100), &[], t).unwrap();
    // Its end (aligned) lies 4 bytes past what was received: the padding comes with the next WAL.
    let a = point("a", 3 * SEG, 3 * SEG + 104);
    p.note_restore_points(std::slice::from_ref(&a));
    let first = take_put(&mut p, t);
    assert_eq!(first.restore_points, vec![], "the record's end is not in this chunk yet");
    p.put_done(first.id, t).unwrap();
    p.append(3 * SEG + 100, &wal(1, 3 * SEG + 100, 4 * SEG), &[], t).unwrap();
    let second = take_put(&mut p, t);
    assert_eq!(second.object, chunk(1, 3, 100, END));
    assert_eq!(second.restore_points, vec![a]);
    p.put_done(second.id, t).unwrap();
    let compaction = p.next_compaction(t).expect("the full segment is compacted");
    assert_eq!(compaction.restore_points, vec![], "a compaction's restore points are indexed already");

    // Catching up: a segment that arrived whole carries all of its restore points.
    let mut p = WalPipeline::fresh(layout(), Duration::ZERO, 1, 5 * SEG);
    let (b, c) = (point("b", 5 * SEG + 40, 5 * SEG + 144), point("c", 5 * SEG + 200, 5 * SEG + 304));
    p.append(5 * SEG, &wal(1, 5 * SEG, 6 * SEG + 10), &[], t).unwrap();
    p.note_restore_points(&[b.clone(), c.clone(), point("next", 6 * SEG, 6 * SEG + 8)]);
    let whole = take_put(&mut p, t);
    assert_eq!(whole.object, segment(1, 5));
    assert_eq!(whole.restore_points, vec![b, c]);
    p.put_done(whole.id, t).unwrap();
    let tail = take_put(&mut p, t);
    assert_eq!(tail.restore_points.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["next"]);
}
