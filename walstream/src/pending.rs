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
    pub fn end_offset(&self) -> u32 {
        self.base + self.data.len() as u32
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

enum Job {
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
                if *stop.borrow() && lock(&self.pending).segments.iter().all(|s| s.durable == s.end_offset()) {
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

    /// Picks the next put: a closed segment first (compaction), else new bytes of the oldest
    /// segment once the flush interval has passed since the previous chunk put.
    fn next_job(&self, last_put: Option<Instant>) -> Option<Job> {
        let pending = lock(&self.pending);
        let seg = pending.segments.front()?;
        let seg_size = self.layout.segment_size;
        let seg_lsn = self.layout.segment_start(seg.segno);
        if seg.closed && seg.base == 0 && seg.data.len() as u64 == seg_size {
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
        if seg.durable == seg.end_offset() {
            return if seg.closed { Some(Job::Forget) } else { None };
        }
        // A closed segment's last chunk goes at once; otherwise respect the spacing.
        if !seg.closed {
            if let Some(t) = last_put {
                if t.elapsed() < self.flush_interval {
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

    #[test]
    fn commit_ranges_are_half_open_on_the_left() {
        let commits = [(10, 1), (20, 2), (30, 3)];
        assert_eq!(commit_range(&commits, 0, 10), (Some(1), Some(1)));
        assert_eq!(commit_range(&commits, 10, 30), (Some(2), Some(3)));
        assert_eq!(commit_range(&commits, 30, 40), (None, None));
    }
}
