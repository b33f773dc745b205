//! The WAL pipeline's state, sans I/O: WAL in at LSNs, objects to put out, and the one answer to
//! "what may the primary be told is flushed".
//!
//! [`WalPipeline`] owns the whole position: the timeline streamed and where streaming on it began,
//! the end of what was received, the segment buffers not yet in a segment object, the put under
//! way, and the durable end — the one place that says how much of the received WAL the archive
//! holds. Nothing is read from a clock (every method that needs the time takes it), nothing is
//! put or fetched: the edges (`uploader.rs`, `receiver.rs`, `resume.rs`) do the I/O and tell the
//! pipeline what happened.
//!
//! The rules it keeps:
//! - Group commit: a chunk is put as soon as new WAL is there and the previous put is done, but
//!   never sooner than `flush_interval` after the previous chunk put began — except a segment's
//!   last chunk, which goes at once when the segment is closed (full, or its timeline ended).
//! - Catching up, a segment is sealed once: while the server already has WAL past the end of the
//!   front segment ([`WalPipeline::note_server_end`]), its chunk waits (at most
//!   [`CATCH_UP_HOLD`]) for the rest of the segment to arrive, and the whole segment goes as one
//!   object instead of chunks now and the same bytes again at compaction.
//! - One put at a time, the oldest segment first; a full segment held from offset 0 becomes one
//!   segment object (compaction), and only once that is durable are its chunks handed out for
//!   deletion. A full segment already durable through its chunks is compacted beside the chunk
//!   puts ([`WalPipeline::next_compaction`], one at a time): sealing and writing 16 MiB takes
//!   tens of milliseconds, which the next segment's commits would otherwise wait for. A segment
//!   that arrived whole (catching up) is put as one object in the chunk puts' turn, as before.
//! - Only what is durable is reported: [`WalPipeline::reportable`] never exceeds the end of the
//!   last durable object on the streamed timeline.
//! - A failed put is retried after a backoff (100 ms doubling to 30 s); a done or failure for a
//!   put that is not the one under way changes nothing.

mod buffer;
mod resume;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pitr_archive::restore_points::RestorePoint;
use pitr_archive::{ObjectKind, ObjectMeta, WalLayout, WalObject};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgformat::timeline::{switch_point, HistoryEntry};

use buffer::commit_range;
pub(crate) use buffer::SegmentBuffer;
pub(crate) use resume::{compaction, resumed_buffer, ResumePlan, RunPlan};

/// The first retry delay after a failed put; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The longest a chunk waits for the rest of its segment when the server already has it: the
/// rest normally arrives within milliseconds; a stalled connection must not hold WAL back longer.
pub(crate) const CATCH_UP_HOLD: Duration = Duration::from_millis(250);

/// Segments larger than this are put in chunks even while catching up: holding a whole one in
/// memory before its first put would fill the memory bound.
const CATCH_UP_HOLD_MAX_SEGMENT: u64 = 64 << 20;

/// What the archive durably holds: all WAL up to `lsn` on `timeline` (before the point where
/// streaming on `timeline` began, on its ancestors).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Durable {
    pub timeline: u32,
    pub lsn: u64,
    /// Time (µs since the Unix epoch) of the newest commit/abort made durable.
    pub last_commit_us: Option<i64>,
}

/// Counters of puts, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UploadStats {
    pub objects: u64,
    pub bytes: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// An object to put: a chunk or a segment, its header and its plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Put {
    /// Names this put in [`WalPipeline::put_done`] and [`WalPipeline::put_failed`].
    pub id: u64,
    pub object: WalObject,
    pub meta: ObjectMeta,
    /// Shared with the segment buffer for a whole segment (a retry or compaction puts the same
    /// bytes again), a copy for a chunk.
    pub bytes: Bytes,
    /// Index entries of the restore points whose record ends in this object: put before it, so
    /// that WAL in the archive never holds a restore point the index lacks (a compaction's are
    /// already there: empty).
    pub restore_points: Vec<RestorePoint>,
}

/// What the uploader does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Put(Put),
    /// Nothing to put now: wait for new WAL (or a stop), or until this moment (the flush
    /// spacing or a retry), whichever comes first.
    Wait(Option<Instant>),
    /// Stopping, and everything received is durable.
    Finished,
}

/// A finished put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Done {
    pub object: WalObject,
    /// Plaintext bytes put.
    pub bytes: u64,
    /// Chunks a segment object made redundant: delete them (a failed delete only leaves a
    /// redundant chunk that the next start-up removes).
    pub obsolete: Vec<WalObject>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PipelineError {
    /// WAL that does not continue what was received.
    #[error("server sent WAL at {} but {} was expected", format_lsn(*.got), format_lsn(*.expected))]
    Misplaced { expected: u64, got: u64 },
    /// A put finished that is not the one under way (a late or repeated report).
    #[error("put {id} is not the put under way")]
    NotInFlight { id: u64 },
    /// The server's history does not lead from the streamed timeline to its own.
    #[error("timeline {timeline} of the archive is not in the history of timeline {server}")]
    NotDescendant { timeline: u32, server: u32 },
}

/// A timeline switch made while following a server's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Switch {
    pub from: u32,
    pub to: u32,
    /// Where streaming on `to` starts: the beginning of the segment holding the switch point.
    pub start: u64,
}

/// A put slot's retry state after failures: no put before `at`; the delay doubles from
/// [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], and a success starts over (`Retry::default()`).
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Option<Instant>,
    backoff: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry { at: None, backoff: FIRST_BACKOFF }
    }
}

impl Retry {
    /// Whether a put must still wait at `now`.
    fn waiting(&self, now: Instant) -> bool {
        self.at.is_some_and(|t| now < t)
    }

    /// A put failed at `now`: the delay before the next, which the one after will double.
    fn failed(&mut self, now: Instant) -> Duration {
        let delay = self.backoff;
        self.at = Some(now + delay);
        self.backoff = (delay * 2).min(MAX_BACKOFF);
        delay
    }
}

/// The put under way.
#[derive(Debug, Clone)]
struct InFlight {
    id: u64,
    object: WalObject,
    bytes: u64,
    /// When it was handed out: the flush spacing counts from a chunk put's start.
    started: Instant,
    last_commit_us: Option<i64>,
}

/// The receiver's and the uploader's shared state: see the module documentation.
#[derive(Debug)]
pub(crate) struct WalPipeline {
    layout: WalLayout,
    flush_interval: Duration,
    /// The timeline streamed.
    timeline: u32,
    /// Where streaming on `timeline` began: everything before it is durable (or was, on an
    /// ancestor).
    timeline_start: u64,
    /// Just past the last byte received.
    received: u64,
    /// Where the server's WAL ended when it last said (XLogData's `wal_end`): a hint that more is
    /// coming, never a position reported or relied on for durability.
    server_end: u64,
    /// The durable end. Only the front buffer is ever put in chunks (compactions only rewrite
    /// segments already durable), so this is also how far the front buffer is durable (when it
    /// is on this timeline and the end falls inside it).
    durable: Durable,
    /// Oldest first.
    segments: VecDeque<SegmentBuffer>,
    in_flight: Option<InFlight>,
    /// Full segments durable through their chunks, waiting for their segment object (oldest
    /// first); they leave `segments` when they are handed over.
    compacting: VecDeque<SegmentBuffer>,
    /// The compaction under way, beside `in_flight`.
    compaction: Option<InFlight>,
    /// After a failed compaction.
    compaction_retry: Retry,
    next_id: u64,
    /// When the last chunk put that succeeded began.
    last_chunk_put: Option<Instant>,
    /// After a failed put.
    retry: Retry,
    stopping: bool,
    stats: UploadStats,
    /// Grows whenever the durable end moves, memory is freed or a put fails: the receiver's
    /// cue to report and to read on.
    generation: u64,
}

impl WalPipeline {
    /// Streaming from an empty archive: on `timeline` from the start of the segment holding
    /// `lsn` (segment objects start at a segment's beginning).
    pub fn fresh(layout: WalLayout, flush_interval: Duration, timeline: u32, lsn: u64) -> WalPipeline {
        let start = lsn - lsn % layout.segment_size;
        WalPipeline::resume(layout, flush_interval, timeline, start, None)
    }

    /// Streaming on from the archive's end, `end` on `timeline`; `partial` is the newest segment
    /// read back from its chunks (it ends at `end`), so that it grows and is compacted when full.
    pub fn resume(
        layout: WalLayout,
        flush_interval: Duration,
        timeline: u32,
        end: u64,
        partial: Option<SegmentBuffer>,
    ) -> WalPipeline {
        let segments: VecDeque<SegmentBuffer> = partial
            .filter(|b| b.timeline == timeline && layout.segment_start(b.segno) + u64::from(b.end_offset()) == end)
            .into_iter()
            .collect();
        WalPipeline {
            layout,
            flush_interval,
            timeline,
            timeline_start: end,
            received: end,
            server_end: 0,
            durable: Durable { timeline, lsn: end, last_commit_us: None },
            segments,
            in_flight: None,
            compacting: VecDeque::new(),
            compaction: None,
            compaction_retry: Retry::default(),
            next_id: 1,
            last_chunk_put: None,
            retry: Retry::default(),
            stopping: false,
            stats: UploadStats::default(),
            generation: 0,
        }
    }

    /// The cluster's WAL naming and segment size.
    pub fn layout(&self) -> WalLayout {
        self.layout
    }

    /// The timeline streamed.
    pub fn timeline(&self) -> u32 {
        self.timeline
    }

    /// Just past the last byte received: where the next WAL must start.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// What the archive durably holds.
    pub fn durable(&self) -> Durable {
        self.durable
    }

    /// Counters of puts since start.
    pub fn stats(&self) -> &UploadStats {
        &self.stats
    }

    /// Grows whenever the durable end moves, memory is freed or a put fails.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes received and held in memory.
    pub fn held_bytes(&self) -> usize {
        self.segments.iter().chain(&self.compacting).map(|s| s.data.len()).sum()
    }

    /// How long the oldest WAL received but not durable has waited (zero when caught up).
    pub fn lag(&self, now: Instant) -> Duration {
        self.segments
            .iter()
            .filter_map(|s| s.oldest_undurable)
            .min()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Everything received is durable (a full segment may still wait for compaction).
    pub fn all_durable(&self) -> bool {
        self.segments.iter().enumerate().all(|(i, s)| self.is_durable(i, s))
    }

    /// The position to report to the primary as written and flushed: the durable end on the
    /// streamed timeline, never anything the archive does not hold.
    pub fn reportable(&self) -> u64 {
        if self.durable.timeline == self.timeline {
            return self.durable.lsn;
        }
        // Nothing of this timeline is durable yet. While an older timeline's WAL is still being
        // put, 0 (InvalidXLogRecPtr) keeps the slot where it is; after that, everything before
        // this timeline's start is in the archive.
        let older_pending =
            self.segments.iter().enumerate().any(|(i, s)| s.timeline != self.timeline && !self.is_durable(i, s));
        if older_pending {
            0
        } else {
            self.timeline_start
        }
    }

    /// Appends WAL received at `lsn` (which must be where the last WAL ended) with its commits
    /// (end LSN, time µs since the Unix epoch, of the commit/abort records ending in it),
    /// splitting it at segment boundaries; returns the LSN just past it.
    ///
    /// A buffer is closed as soon as nothing more can come into it: when it is full, and when
    /// bytes go into another buffer. The uploader relies on that to move past it.
    pub fn append(
        &mut self,
        lsn: u64,
        data: &[u8],
        commits: &[(u64, i64)],
        now: Instant,
    ) -> Result<u64, PipelineError> {
        if lsn != self.received {
            return Err(PipelineError::Misplaced { expected: self.received, got: lsn });
        }
        let segment_size = self.layout.segment_size;
        let (mut lsn, mut data) = (lsn, data);
        while !data.is_empty() {
            let segno = lsn / segment_size;
            let off = (lsn % segment_size) as u32;
            let timeline = self.timeline;
            let reuse = self
                .segments
                .back()
                .is_some_and(|b| b.timeline == timeline && b.segno == segno && !b.closed && b.end_offset() == off);
            if !reuse {
                self.close_all();
                let mut buf = SegmentBuffer::new(timeline, segno, off);
                buf.data.reserve(segment_size as usize - off as usize);
                self.segments.push_back(buf);
            }
            let Some(buf) = self.segments.back_mut() else { break };
            let n = data.len().min((segment_size - u64::from(off)) as usize);
            buf.data.extend_from_slice(&data[..n]);
            buf.oldest_undurable.get_or_insert(now);
            // A record belongs to the segment holding its last byte.
            buf.commits
                .extend(commits.iter().filter(|(end, _)| end.saturating_sub(1) / segment_size == segno).copied());
            if u64::from(off) + n as u64 == segment_size {
                buf.closed = true;
            }
            lsn += n as u64;
            data = &data[n..];
        }
        self.received = lsn;
        Ok(lsn)
    }

    /// Restore points found in WAL just appended (their records end in it): each is kept with the
    /// segment buffer holding its last byte, to be indexed before the object that holds it. One
    /// whose buffer is gone (it cannot be: a record ends in WAL just received) is dropped.
    pub fn note_restore_points(&mut self, points: &[RestorePoint]) {
        let segment_size = self.layout.segment_size;
        for point in points {
            let segno = point.end_lsn.saturating_sub(1) / segment_size;
            let timeline = self.timeline;
            match self.segments.iter_mut().rev().find(|b| b.timeline == timeline && b.segno == segno) {
                Some(buf) => buf.restore_points.push(point.clone()),
                None => tracing::warn!(lsn = %format_lsn(point.lsn), "restore point outside the WAL held; not indexed"),
            }
        }
    }

    /// The server's WAL ends at `lsn` on the streamed timeline (XLogData's `wal_end`). Only
    /// decides whether a chunk waits for the rest of its segment.
    pub fn note_server_end(&mut self, lsn: u64) {
        self.server_end = self.server_end.max(lsn);
    }

    /// The timeline ended at `switch_lsn` and streaming goes on on `timeline`: from the start of
    /// the segment holding the switch point, as the server's new timeline has its own copy of
    /// that segment. Returns where streaming starts.
    pub fn switch_timeline(&mut self, timeline: u32, switch_lsn: u64) -> u64 {
        let start = switch_lsn - switch_lsn % self.layout.segment_size;
        self.close_all();
        self.timeline = timeline;
        self.timeline_start = start;
        self.received = start;
        self.server_end = 0;
        start
    }

    /// The server is on `server_timeline`, whose history is `history`: moves onto the timeline
    /// that holds the stream's position. A timeline whose switch point lies ahead of what was
    /// received is streamed to its end first (the server moves us on there), so the switches
    /// stop at it; one the received WAL reaches or passes (the old primary ran ahead of the
    /// promoted standby) is left at once, its tail staying archived on the old timeline.
    pub fn follow_history(
        &mut self,
        history: &[HistoryEntry],
        server_timeline: u32,
    ) -> Result<Vec<Switch>, PipelineError> {
        let mut switches = Vec::new();
        while self.timeline < server_timeline {
            let Some((switch_lsn, next)) = switch_point(history, self.timeline, server_timeline) else {
                return Err(PipelineError::NotDescendant { timeline: self.timeline, server: server_timeline });
            };
            if self.received < switch_lsn {
                break;
            }
            let from = self.timeline;
            let start = self.switch_timeline(next, switch_lsn);
            switches.push(Switch { from, to: next, start });
        }
        Ok(switches)
    }

    /// Stop taking WAL: the uploader finishes once everything received is durable and compacted.
    /// A put or compaction waiting for its backoff goes at once.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.retry.at = None;
        self.compaction_retry.at = None;
    }

    /// What the uploader does next, at `now`.
    pub fn next_step(&mut self, now: Instant) -> Step {
        if let Some(put) = self.next_put(now) {
            return Step::Put(put);
        }
        // A stop also waits for the compactions, as a clean stop leaves no segment in chunks.
        let compacted = self.compaction.is_none() && self.compacting.is_empty();
        if self.stopping && self.in_flight.is_none() && compacted && self.all_durable() {
            return Step::Finished;
        }
        Step::Wait([self.wake_at(), self.compaction_wake_at()].into_iter().flatten().min())
    }

    /// The compaction to start beside the chunk puts, if one may: the oldest full segment durable
    /// through its chunks, as one segment object. None while one is under way and while a failed
    /// one waits for its retry. Its outcome goes to [`WalPipeline::put_done`] or
    /// [`WalPipeline::put_failed`] like any put.
    pub fn next_compaction(&mut self, now: Instant) -> Option<Put> {
        while self.hand_over_compactable() {}
        if self.compaction.is_some() || self.compaction_retry.waiting(now) {
            return None;
        }
        let layout = self.layout;
        let seg = self.compacting.front_mut()?;
        let seg_lsn = layout.segment_start(seg.segno);
        let object = WalObject::Segment { timeline: seg.timeline, segno: seg.segno };
        let meta = wal_meta(ObjectKind::WalSegment, seg, seg_lsn, seg_lsn + layout.segment_size);
        let bytes = seg.data.share();
        let id = self.next_id;
        self.next_id += 1;
        self.compaction =
            Some(InFlight { id, object, bytes: bytes.len() as u64, started: now, last_commit_us: meta.last_commit_us });
        Some(Put { id, object, meta, bytes, restore_points: Vec::new() })
    }

    /// Moves the front buffer to the compaction queue if it is a full segment from offset 0,
    /// closed and durable through its chunks; whether it did.
    fn hand_over_compactable(&mut self) -> bool {
        let Some(seg) = self.segments.front() else { return false };
        let full = seg.base == 0 && u64::from(seg.end_offset()) == self.layout.segment_size;
        if !(full && self.front_closed() && !seg.chunks.is_empty() && self.is_durable(0, seg)) {
            return false;
        }
        if let Some(seg) = self.segments.pop_front() {
            self.compacting.push_back(seg);
        }
        true
    }

    /// When a compaction may start that cannot now (a failure's backoff), if one waits.
    pub fn compaction_wake_at(&self) -> Option<Instant> {
        (self.compaction.is_none() && !self.compacting.is_empty()).then_some(self.compaction_retry.at).flatten()
    }

    /// The put under way (or the compaction, when `id` names it) succeeded: the durable end moves
    /// past it. A segment's chunks come back in [`Done::obsolete`] for deletion.
    pub fn put_done(&mut self, id: u64, now: Instant) -> Result<Done, PipelineError> {
        if let Some(done) = self.compaction.take_if(|c| c.id == id) {
            let obsolete = self.compacting.pop_front().map(|seg| seg.chunk_objects()).unwrap_or_default();
            self.compaction_retry = Retry::default();
            self.stats.objects += 1;
            self.stats.bytes += done.bytes;
            // Its memory is free: the receiver may read on.
            self.generation += 1;
            return Ok(Done { object: done.object, bytes: done.bytes, obsolete });
        }
        let put = self.take_in_flight(id)?;
        let mut obsolete = Vec::new();
        match put.object {
            WalObject::Chunk { timeline, segno, from, to } => {
                let lsn = self.layout.segment_start(segno) + u64::from(to);
                self.advance(timeline, lsn, put.last_commit_us);
                let durable_end = self.front_durable_offset();
                if let Some(seg) = self.segments.front_mut().filter(|s| s.timeline == timeline && s.segno == segno) {
                    seg.chunks.push((from, to));
                    // Bytes that came during the put have waited since about now.
                    seg.oldest_undurable = (durable_end != Some(seg.end_offset())).then_some(now);
                }
                self.last_chunk_put = Some(put.started);
            }
            WalObject::Segment { timeline, segno } => {
                if let Some(seg) = self.segments.pop_front() {
                    obsolete = seg.chunk_objects();
                }
                let end = self.layout.segment_start(segno + 1);
                self.advance(timeline, end, put.last_commit_us);
            }
            WalObject::History { .. } => {}
        }
        self.retry = Retry::default();
        self.stats.objects += 1;
        self.stats.bytes += put.bytes;
        self.stats.last_error = None;
        self.generation += 1;
        Ok(Done { object: put.object, bytes: put.bytes, obsolete })
    }

    /// The put under way failed with `error`: it is made again (with whatever WAL came
    /// meanwhile) after the returned delay.
    pub fn put_failed(&mut self, id: u64, error: String, now: Instant) -> Result<Duration, PipelineError> {
        let retry = if self.compaction.take_if(|c| c.id == id).is_some() {
            &mut self.compaction_retry
        } else {
            self.take_in_flight(id)?;
            &mut self.retry
        };
        let delay = retry.failed(now);
        self.stats.errors += 1;
        self.stats.last_error = Some(error);
        self.generation += 1;
        Ok(delay)
    }

    fn take_in_flight(&mut self, id: u64) -> Result<InFlight, PipelineError> {
        self.in_flight.take_if(|p| p.id == id).ok_or(PipelineError::NotInFlight { id })
    }

    fn advance(&mut self, timeline: u32, lsn: u64, last_commit_us: Option<i64>) {
        let d = &mut self.durable;
        if (timeline, lsn) > (d.timeline, d.lsn) {
            d.timeline = timeline;
            d.lsn = lsn;
        }
        if last_commit_us.is_some() {
            d.last_commit_us = last_commit_us;
        }
    }

    /// No more bytes come for any buffer held.
    fn close_all(&mut self) {
        for seg in self.segments.iter_mut() {
            seg.closed = true;
        }
    }

    /// How far buffer `seg` (at `index` in the queue) is durable, as an offset in its segment.
    fn durable_offset(&self, index: usize, seg: &SegmentBuffer) -> u32 {
        let start = self.layout.segment_start(seg.segno);
        let (from, to) = (start + u64::from(seg.base), start + u64::from(seg.end_offset()));
        let d = self.durable;
        if index == 0 && d.timeline == seg.timeline && (from..=to).contains(&d.lsn) {
            (d.lsn - start) as u32
        } else {
            seg.base
        }
    }

    fn front_durable_offset(&self) -> Option<u32> {
        self.segments.front().map(|s| self.durable_offset(0, s))
    }

    fn is_durable(&self, index: usize, seg: &SegmentBuffer) -> bool {
        self.durable_offset(index, seg) == seg.end_offset()
    }

    /// The spacing between chunk puts in force.
    pub fn flush_interval(&self) -> Duration {
        self.flush_interval
    }

    /// Changes the spacing from the next put on; whether it changed (the uploader, perhaps
    /// waiting out the old spacing, needs waking then).
    pub fn set_flush_interval(&mut self, spacing: Duration) -> bool {
        std::mem::replace(&mut self.flush_interval, spacing) != spacing
    }

    /// Whether the front buffer takes no more bytes. Whatever its `closed` flag says, a buffer
    /// that is full or has another buffer behind it is closed: it must never be left waiting
    /// for bytes that cannot come (a resumed segment would otherwise hold the durable end still).
    fn front_closed(&self) -> bool {
        self.segments.front().is_some_and(|seg| {
            seg.closed || u64::from(seg.end_offset()) >= self.layout.segment_size || self.segments.len() > 1
        })
    }

    /// The next put, if one may go now: a full segment from offset 0 first (compaction), else
    /// the front buffer's bytes not yet durable, spaced by `flush_interval` unless it is closed.
    /// Closed, durable buffers that cannot be compacted (they end early, or start past offset 0)
    /// are dropped on the way: their chunks stay as they are.
    fn next_put(&mut self, now: Instant) -> Option<Put> {
        if self.in_flight.is_some() {
            return None;
        }
        if self.retry.waiting(now) {
            return None;
        }
        self.retry.at = None;
        let (object, meta, bytes, restore_points) = loop {
            // Durable through its chunks: compacted beside the next segment's puts.
            if self.hand_over_compactable() {
                continue;
            }
            let seg = self.segments.front()?;
            let closed = self.front_closed();
            let seg_lsn = self.layout.segment_start(seg.segno);
            let seg_end = seg_lsn + self.layout.segment_size;
            let full = seg.base == 0 && u64::from(seg.end_offset()) == self.layout.segment_size;
            if closed && full && seg.chunks.is_empty() {
                // Arrived whole (catching up): sealed once, as the segment object. Its header
                // covers every commit in the segment. (Partly in chunks, its tail goes as one
                // more chunk below, at once as it is closed, and the segment is compacted beside.)
                let object = WalObject::Segment { timeline: seg.timeline, segno: seg.segno };
                let points = restore_points_in(seg, seg_lsn, seg_end);
                let meta = wal_meta(ObjectKind::WalSegment, seg, seg_lsn, seg_end);
                let seg = self.segments.front_mut()?;
                break (object, meta, seg.data.share(), points);
            }
            let from = self.durable_offset(0, seg);
            let to = seg.end_offset();
            if from == to {
                if !closed {
                    return None; // waits for more bytes
                }
                self.segments.pop_front();
                self.generation += 1;
                continue;
            }
            if !closed && self.last_chunk_put.is_some_and(|t| now.saturating_duration_since(t) < self.flush_interval) {
                return None;
            }
            if !closed && self.hold_until(seg).is_some_and(|t| now < t) {
                return None;
            }
            let object = WalObject::Chunk { timeline: seg.timeline, segno: seg.segno, from, to };
            let (start, end) = (seg_lsn + u64::from(from), seg_lsn + u64::from(to));
            break (
                object,
                wal_meta(ObjectKind::WalChunk, seg, start, end),
                Bytes::copy_from_slice(&seg.data[(from - seg.base) as usize..]),
                restore_points_in(seg, start, end),
            );
        };
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight =
            Some(InFlight { id, object, bytes: bytes.len() as u64, started: now, last_commit_us: meta.last_commit_us });
        Some(Put { id, object, meta, bytes, restore_points })
    }

    /// When a put may go that cannot go now: after a failure's backoff, or when the flush
    /// spacing allows the front buffer's new bytes. `None`: only new WAL or a stop changes that.
    fn wake_at(&self) -> Option<Instant> {
        if self.in_flight.is_some() {
            return None;
        }
        if self.retry.at.is_some() {
            return self.retry.at;
        }
        let seg = self.segments.front()?;
        let waiting = !self.front_closed() && !self.is_durable(0, seg);
        if !waiting {
            return None;
        }
        let spacing = self.last_chunk_put.map(|t| t + self.flush_interval);
        match (spacing, self.hold_until(seg)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Until when the front buffer `seg`'s chunk waits for the rest of its segment: while the
    /// server has WAL past the segment's end (catching up), not stopping, and for at most
    /// [`CATCH_UP_HOLD`] after its oldest byte not yet durable arrived.
    fn hold_until(&self, seg: &SegmentBuffer) -> Option<Instant> {
        let seg_end = self.layout.segment_start(seg.segno + 1);
        let catching_up = seg.timeline == self.timeline && self.server_end >= seg_end;
        if self.stopping || !catching_up || self.layout.segment_size > CATCH_UP_HOLD_MAX_SEGMENT {
            return None;
        }
        seg.oldest_undurable.map(|t| t + CATCH_UP_HOLD)
    }
}

/// The restore points of `seg` an object holding `[start, end)` of its WAL carries: those whose
/// record ends in `(start, end]`, as for commits.
fn restore_points_in(seg: &SegmentBuffer, start: u64, end: u64) -> Vec<RestorePoint> {
    seg.restore_points.iter().filter(|p| p.end_lsn > start && p.end_lsn <= end).cloned().collect()
}

/// The header of an object holding `[start, end)` of `seg`'s WAL.
fn wal_meta(kind: ObjectKind, seg: &SegmentBuffer, start: u64, end: u64) -> ObjectMeta {
    let (first_commit_us, last_commit_us) = commit_range(&seg.commits, start, end);
    ObjectMeta { kind, timeline: seg.timeline, start_lsn: start, end_lsn: end, first_commit_us, last_commit_us }
}
