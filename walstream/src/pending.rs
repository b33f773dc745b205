//! WAL received but not yet compacted into a segment object, and the uploader that makes it durable.
//!
//! The receiver appends; the uploader takes what is new, seals it and puts it, one put at a time.
//! Both share `Pending` behind a mutex that is held only to copy bytes or update positions, never
//! across a put, so receiving never waits on storage (until the memory bound is reached).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pitr_archive::layout::{WalLayout, WalObject};
use pitr_archive::{ObjectKind, ObjectMeta, Repository, RepositoryError};
use tokio::sync::{watch, Notify};

/// One segment's worth of WAL in memory, from offset `base` (0 unless resumed from chunks that
/// did not start at the segment's beginning).
#[derive(Debug)]
pub(crate) struct SegmentBuffer {
    pub timeline: u32,
    pub segno: u64,
    pub base: u32,
    pub data: Vec<u8>,
    /// Offset within the segment up to which objects are durable.
    pub durable: u32,
    /// No more bytes will come for this segment (it is full, or its timeline ended).
    pub closed: bool,
    /// Chunk objects already stored for this segment, to delete after compaction.
    pub chunks: Vec<(u32, u32)>,
    /// (end LSN of a commit/abort record, its time in µs since the Unix epoch).
    pub commits: Vec<(u64, i64)>,
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
            data: Vec::new(),
            durable: base,
            closed: false,
            chunks: Vec::new(),
            commits: Vec::new(),
            oldest_undurable: None,
        }
    }

    pub fn end_offset(&self) -> u32 {
        self.base + self.data.len() as u32
    }

    pub fn is_durable(&self) -> bool {
        self.durable == self.end_offset()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub segments: VecDeque<SegmentBuffer>,
}

impl Pending {
    /// Bytes held in memory.
    pub fn held_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.data.len()).sum()
    }

    pub fn oldest_undurable(&self) -> Option<Instant> {
        self.segments.iter().filter_map(|s| s.oldest_undurable).min()
    }

    pub fn all_durable(&self) -> bool {
        self.segments.iter().all(SegmentBuffer::is_durable)
    }

    /// No more bytes come for any buffer held (the timeline ended, or streaming stops).
    pub fn close_all(&mut self) {
        for seg in self.segments.iter_mut() {
            seg.closed = true;
        }
    }

    /// Appends WAL received at `lsn` on `timeline`, splitting it at segment boundaries; returns
    /// the LSN just past it. `commits` are (end LSN, time in µs since the Unix epoch) of the
    /// commit/abort records that end within it.
    ///
    /// A buffer is closed as soon as nothing more can come into it: when it is full, and when
    /// bytes go into another buffer (a later segment's, another timeline's, or the same
    /// segment's after a jump). The uploader relies on that to move past it.
    pub fn append(
        &mut self,
        timeline: u32,
        mut lsn: u64,
        mut data: &[u8],
        commits: &[(u64, i64)],
        segment_size: u64,
        now: Instant,
    ) -> u64 {
        while !data.is_empty() {
            let segno = lsn / segment_size;
            let off = (lsn % segment_size) as u32;
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
        lsn
    }

    /// Picks the next put: a closed segment first (compaction), else new bytes of the oldest
    /// segment once `flush_interval` has passed since the previous chunk put (`last_put`).
    ///
    /// Only the front buffer is looked at, so everything behind it waits for it: it must never
    /// be left waiting for bytes that cannot come. Whatever its `closed` flag says, a buffer that
    /// is full or has another buffer behind it is treated as closed (a resumed segment, or one
    /// from an older version, would otherwise hold the flush position still forever).
    pub(crate) fn next_job(
        &self,
        layout: &WalLayout,
        flush_interval: Duration,
        last_put: Option<Instant>,
    ) -> Option<Job> {
        let seg = self.segments.front()?;
        let seg_size = layout.segment_size;
        let seg_lsn = layout.segment_start(seg.segno);
        let full = u64::from(seg.end_offset()) >= seg_size;
        let closed = seg.closed || full || self.segments.len() > 1;
        if closed && seg.base == 0 && full {
            // The segment object's header covers every commit in the segment.
            let commits = commit_range(&seg.commits, seg_lsn, seg_lsn + seg_size);
            return Some(Job::Segment {
                timeline: seg.timeline,
                segno: seg.segno,
                bytes: seg.data.clone(),
                commits,
                old_chunks: seg.chunks.clone(),
            });
        }
        if seg.is_durable() {
            // Closed and durable but not compactable (it ends early, or starts past offset 0):
            // its chunks stay as they are. Open and durable: wait for more bytes.
            return if closed { Some(Job::Forget) } else { None };
        }
        // A closed segment's last chunk goes at once; otherwise respect the spacing.
        if !closed {
            if let Some(t) = last_put {
                if t.elapsed() < flush_interval {
                    return None;
                }
            }
        }
        let from = seg.durable;
        let to = seg.end_offset();
        let bytes = seg.data[(from - seg.base) as usize..].to_vec();
        let commits = commit_range(&seg.commits, seg_lsn + u64::from(from), seg_lsn + u64::from(to));
        Some(Job::Chunk { timeline: seg.timeline, segno: seg.segno, from, to, bytes, commits })
    }
}

/// What a finished put made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durable {
    pub timeline: u32,
    pub lsn: u64,
    pub last_commit_us: Option<i64>,
}

/// Counters the uploader keeps for status and metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct UploadStats {
    pub objects: u64,
    pub bytes: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

pub(crate) struct Uploader {
    pub repo: Repository,
    pub layout: WalLayout,
    pub pending: Arc<Mutex<Pending>>,
    pub wake: Arc<Notify>,
    /// Wakes the receiver when memory is freed.
    pub freed: Arc<Notify>,
    pub durable: watch::Sender<Durable>,
    pub stats: Arc<Mutex<UploadStats>>,
    pub flush_interval: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Job {
    Chunk {
        timeline: u32,
        segno: u64,
        from: u32,
        to: u32,
        bytes: Vec<u8>,
        commits: (Option<i64>, Option<i64>),
    },
    Segment {
        timeline: u32,
        segno: u64,
        bytes: Vec<u8>,
        commits: (Option<i64>, Option<i64>),
        old_chunks: Vec<(u32, u32)>,
    },
    /// A closed, fully durable segment that cannot be compacted: just drop it from memory.
    Forget,
}

fn commit_range(commits: &[(u64, i64)], from_lsn: u64, to_lsn: u64) -> (Option<i64>, Option<i64>) {
    let mut it = commits.iter().filter(|(end, _)| *end > from_lsn && *end <= to_lsn).map(|(_, t)| *t);
    let first = it.next();
    let last = it.next_back().or(first);
    (first, last)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock would already have ended the process's useful life; the
    // data itself (byte buffers and offsets) stays consistent, so keep going with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Uploader {
    /// Runs until `stop` is set and everything pending is durable, or a fatal error.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), RepositoryError> {
        let mut last_put: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let job = self.next_job(last_put);
            let Some(job) = job else {
                if *stop.borrow() && lock(&self.pending).all_durable() {
                    return Ok(());
                }
                let wait = match last_put {
                    Some(t) if !self.flush_interval.is_zero() => (t + self.flush_interval)
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                    _ => Duration::from_secs(3600),
                };
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
                continue;
            };
            let is_chunk = matches!(job, Job::Chunk { .. });
            let started = Instant::now();
            match self.execute(job).await {
                Ok(()) => {
                    metrics::histogram!("pitr_upload_duration_seconds").record(started.elapsed().as_secs_f64());
                    backoff = Duration::from_millis(100);
                    if is_chunk {
                        last_put = Some(started);
                    }
                    self.freed.notify_waiters();
                }
                Err(e @ RepositoryError::Conflict { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "archive put failed; retrying (the primary keeps the WAL in the slot)");
                    metrics::counter!("pitr_upload_errors_total").increment(1);
                    {
                        let mut s = lock(&self.stats);
                        s.errors += 1;
                        s.last_error = Some(e.to_string());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    fn next_job(&self, last_put: Option<Instant>) -> Option<Job> {
        lock(&self.pending).next_job(&self.layout, self.flush_interval, last_put)
    }

    async fn execute(&self, job: Job) -> Result<(), RepositoryError> {
        match job {
            Job::Forget => {
                lock(&self.pending).segments.pop_front();
                Ok(())
            }
            Job::Chunk { timeline, segno, from, to, bytes, commits } => {
                let obj = WalObject::Chunk { timeline, segno, from, to };
                let seg_lsn = self.layout.segment_start(segno);
                let meta = ObjectMeta {
                    kind: ObjectKind::WalChunk,
                    timeline,
                    start_lsn: seg_lsn + u64::from(from),
                    end_lsn: seg_lsn + u64::from(to),
                    first_commit_us: commits.0,
                    last_commit_us: commits.1,
                };
                let len = bytes.len() as u64;
                self.repo.put_sealed(&self.layout.object_name(&obj), bytes, meta).await?;
                {
                    let mut pending = lock(&self.pending);
                    if let Some(seg) = pending.segments.front_mut() {
                        seg.durable = to;
                        seg.chunks.push((from, to));
                        seg.oldest_undurable =
                            if seg.durable == seg.end_offset() { None } else { Some(Instant::now()) };
                    }
                }
                self.count(len, "wal_chunk");
                self.publish(timeline, seg_lsn + u64::from(to), commits.1);
                Ok(())
            }
            Job::Segment { timeline, segno, bytes, commits, old_chunks } => {
                let obj = WalObject::Segment { timeline, segno };
                let seg_lsn = self.layout.segment_start(segno);
                let end = seg_lsn + self.layout.segment_size;
                let meta = ObjectMeta {
                    kind: ObjectKind::WalSegment,
                    timeline,
                    start_lsn: seg_lsn,
                    end_lsn: end,
                    first_commit_us: commits.0,
                    last_commit_us: commits.1,
                };
                let len = bytes.len() as u64;
                self.repo.put_sealed(&self.layout.object_name(&obj), bytes, meta).await?;
                lock(&self.pending).segments.pop_front();
                self.count(len, "wal_segment");
                self.publish(timeline, end, commits.1);
                // The segment object now holds everything; its chunks are redundant. They go in the
                // background so the next put does not wait; a failed delete leaves a redundant chunk
                // that the next start-up removes.
                let names: Vec<String> = old_chunks
                    .into_iter()
                    .map(|(from, to)| self.layout.object_name(&WalObject::Chunk { timeline, segno, from, to }))
                    .collect();
                if !names.is_empty() {
                    let repo = self.repo.clone();
                    tokio::spawn(async move {
                        if let Err(e) = repo.delete_many(&names).await {
                            tracing::warn!(error = %e, chunks = names.len(), "could not delete compacted chunks");
                        }
                    });
                }
                Ok(())
            }
        }
    }

    fn count(&self, bytes: u64, kind: &'static str) {
        metrics::counter!("pitr_objects_archived_total").increment(1);
        metrics::counter!("pitr_bytes_archived_total", "kind" => kind).increment(bytes);
        let mut s = lock(&self.stats);
        s.objects += 1;
        s.bytes += bytes;
        s.last_error = None;
    }

    fn publish(&self, timeline: u32, lsn: u64, last_commit_us: Option<i64>) {
        self.durable.send_modify(|d| {
            if (timeline, lsn) > (d.timeline, d.lsn) {
                d.timeline = timeline;
                d.lsn = lsn;
            }
            if last_commit_us.is_some() {
                d.last_commit_us = last_commit_us;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;
    const LAYOUT: WalLayout = WalLayout { system_id: 7, segment_size: SEG };
    const HOUR: Duration = Duration::from_secs(3600);

    /// A buffer of `segno` holding [base, end), durable up to `durable`.
    fn buffer(segno: u64, base: u32, end: u32, durable: u32, closed: bool) -> SegmentBuffer {
        let mut b = SegmentBuffer::new(1, segno, base);
        b.data = vec![7; (end - base) as usize];
        b.durable = durable;
        b.closed = closed;
        b
    }

    fn pending(buffers: Vec<SegmentBuffer>) -> Pending {
        Pending { segments: buffers.into() }
    }

    fn job(p: &Pending, last_put: Option<Instant>) -> Option<&'static str> {
        p.next_job(&LAYOUT, HOUR, last_put).map(|j| match j {
            Job::Chunk { .. } => "chunk",
            Job::Segment { .. } => "segment",
            Job::Forget => "forget",
        })
    }

    #[test]
    fn a_full_buffer_is_compacted_whatever_its_flag() {
        // Resumed from chunks covering the segment, by an older version that left it open.
        let full = SEG as u32;
        assert_eq!(job(&pending(vec![buffer(3, 0, full, full, false)]), None), Some("segment"));
        assert_eq!(job(&pending(vec![buffer(3, 0, full, 100, false)]), Some(Instant::now())), Some("segment"));
        // Full from past offset 0: its last chunk goes at once, then it is dropped.
        assert_eq!(job(&pending(vec![buffer(3, 100, full, 200, false)]), Some(Instant::now())), Some("chunk"));
        assert_eq!(job(&pending(vec![buffer(3, 100, full, full, false)]), None), Some("forget"));
    }

    #[test]
    fn a_durable_front_never_holds_up_a_later_segment() {
        // Open and durable, nothing behind: waiting for bytes is right.
        assert_eq!(job(&pending(vec![buffer(3, 0, 100, 100, false)]), None), None);
        // The same with a later segment's bytes behind it (even if nobody closed it).
        let p = pending(vec![buffer(3, 0, 100, 100, false), buffer(4, 0, 10, 0, false)]);
        assert_eq!(job(&p, None), Some("forget"));
        // Not yet durable: its last chunk goes at once, spacing or not.
        let p = pending(vec![buffer(3, 0, 100, 50, false), buffer(4, 0, 10, 0, false)]);
        assert_eq!(job(&p, Some(Instant::now())), Some("chunk"));
        // An open front respects the spacing.
        assert_eq!(job(&pending(vec![buffer(3, 0, 100, 50, false)]), Some(Instant::now())), None);
        assert_eq!(job(&pending(vec![buffer(3, 0, 100, 50, false)]), None), Some("chunk"));
    }

    #[test]
    fn append_closes_full_and_superseded_buffers() {
        let now = Instant::now();
        let mut p = pending(vec![buffer(3, 0, 100, 100, false)]);
        // Continues the resumed buffer.
        let end = p.append(1, 3 * SEG + 100, &[1; 50], &[], SEG, now);
        assert_eq!((end, p.segments.len(), p.segments[0].end_offset()), (3 * SEG + 150, 1, 150));
        // Fills it and runs into the next segment: the first is closed, the commit lands in the
        // segment holding its end.
        let rest = (SEG - 150) as usize;
        let end = p.append(1, 3 * SEG + 150, &vec![2; rest + 10], &[(4 * SEG, 5), (4 * SEG + 5, 6)], SEG, now);
        assert_eq!(end, 4 * SEG + 10);
        assert!(p.segments[0].closed && !p.segments[1].closed);
        assert_eq!(p.segments[0].commits, vec![(4 * SEG, 5)]);
        assert_eq!(p.segments[1].commits, vec![(4 * SEG + 5, 6)]);
        assert_eq!(job(&p, Some(Instant::now())), Some("segment"));
        // Bytes elsewhere (a jump, another timeline) close the open buffer too.
        let mut p = pending(vec![buffer(3, 0, 100, 100, false)]);
        p.append(1, 3 * SEG + 200, &[1; 10], &[], SEG, now);
        assert!(p.segments[0].closed);
        assert_eq!(job(&p, None), Some("forget"));
        p.segments.pop_front();
        p.append(2, 3 * SEG + 210, &[1; 10], &[], SEG, now);
        assert_eq!(p.segments.iter().map(|s| (s.timeline, s.closed)).collect::<Vec<_>>(), vec![(1, true), (2, false)]);
    }

    #[test]
    fn commit_ranges_are_half_open_on_the_left() {
        let commits = [(10, 1), (20, 2), (30, 3)];
        assert_eq!(commit_range(&commits, 0, 10), (Some(1), Some(1)));
        assert_eq!(commit_range(&commits, 10, 30), (Some(2), Some(3)));
        assert_eq!(commit_range(&commits, 30, 40), (None, None));
    }
}
