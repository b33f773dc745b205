//! The sidecar's change indexer: decodes the WAL it receives into the change index
//! (`pitr_archive::change_index`), one object per segment, off the receive path.
//!
//! The receiver offers each XLogData's bytes (a `Bytes` clone, no copy) through a bounded channel
//! with `try_send`: when the indexer falls behind, input is dropped, never waited for. The indexer
//! then sees a gap (the next bytes do not continue what it decoded), leaves the segments the gap
//! touches unindexed (`pitr_index_segments_skipped_total`; `pitr find` decodes them from the WAL,
//! `verify --rebuild-index` writes them) and starts afresh after it, its entries flagged
//! `incomplete` until a RUNNING_XACTS record bounds what may have been missed.
//!
//! An index object is put only once its whole segment is durable in the archive (the pipeline's
//! durable end is past the segment's end), so it never claims WAL the archive does not hold.
//! After a restart (or at the first bytes on a timeline) it resumes from the newest index object
//! of the segment before, reading the WAL between that object's end and the stream's start back
//! from the archive; without one, the segment is decoded from its start if the archive holds it.
//!
//! Nothing it leaves out stays a hole for long: a segment skipped (dropped input, a failed or
//! fenced put, a full queue, decoding started inside it) is noted, and once its WAL is durable a
//! backfill task (its own task, at most one at a time, [`BACKFILL_DELAY`] after the skip) reads
//! it back from the archive and writes the missing objects as `verify --rebuild-index` does
//! (`change_index::rebuild` from the lowest skipped segment on). Under a long catch-up, when the
//! stream outruns the decoder, the backfill is what indexes most segments.
//!
//! A timeline switch within a session goes on decoding: the server streams the new timeline from
//! the start of the segment holding the switch point, and that segment's bytes up to the switch
//! point are the old timeline's, which the cursor has decoded already.
//!
//! Decoding is CPU work (a full 16 MiB segment at a time in the catch-up), so the indexer runs on
//! the stream's background thread, at a lower priority than the receiver (`background.rs`). It
//! takes what gathered in its queue in one go and then lets more gather ([`GATHER`]): under a
//! synchronous load a message is a commit or two, and being woken for each would cost a
//! wake-up on both threads. A message over [`INLINE_DECODE_MAX`] is decoded on that runtime's
//! blocking threads (`spawn_blocking`, the cursor moved in and back), so that the compactions
//! beside it are not held up; a small one on the task itself.
//!
//! It owns nothing the receiver needs: a failure here is logged and counted, never stops WAL.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use pitr_archive::change_index::{self, SegmentIndex};
use pitr_archive::lease::LeaseGuard;
use pitr_archive::{ClusterInfo, Repository, WalCatalog, WalLayout};
use pitr_pgformat::changes::{ChangeAccumulator, CommitEntry};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgformat::walreader::WalDecoder;
use tokio::sync::{mpsc, watch};

use crate::api::IndexOptions;
use crate::uploader::Shared;

/// XLogData messages queued for the indexer at most (a walsender message is at most 128 KiB:
/// about 32 MiB).
const QUEUE: usize = 256;
/// Segments decoded but not yet durable kept at most (each a few hundred KiB at most).
const READY_MAX: usize = 16;
/// At start-up, at most this many segments between the newest index object and the stream's
/// start are indexed from the archive; an older backlog is left to `verify --rebuild-index`.
const CATCH_UP_MAX: u64 = 64;
/// At start-up, a longer backlog is handed to the backfill for at most this many segments before
/// the stream's start (16 GiB of WAL at the default size); older ones to `verify --rebuild-index`.
const BACKFILL_MAX: u64 = 1024;
/// How long after a skip the backfill waits (more skips gather into one pass; the WAL of the
/// segments skipped becomes durable meanwhile).
const BACKFILL_DELAY: std::time::Duration = std::time::Duration::from_secs(30);
/// After a batch of fewer than a quarter of [`QUEUE`], how long the indexer lets messages gather
/// before it takes the next: it lags the stream by at most this much more, and is woken about
/// 1 / GATHER times a second instead of once per message.
const GATHER: std::time::Duration = std::time::Duration::from_millis(25);
/// Messages up to this size are decoded on the indexer's own task (at several hundred MB/s, a
/// few tens of microseconds); bigger ones (the catch-up's) on a blocking thread.
const INLINE_DECODE_MAX: usize = 16 << 10;

/// The backfill task, stopped with the indexer.
struct Backfill {
    task: tokio::task::JoinHandle<()>,
    /// The segments it was started for, owed again unless it succeeds.
    owed: (u64, u64),
    ok: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Backfill {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The receiver's end: offers bytes, never waits.
pub(crate) struct Indexer {
    tx: mpsc::Sender<(u32, u64, Bytes)>,
    task: tokio::task::JoinHandle<()>,
}

impl Indexer {
    /// Starts the indexer task for a session, on `background` (see `background.rs`).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        background: &tokio::runtime::Handle,
        repo: Repository,
        guard: LeaseGuard,
        info: ClusterInfo,
        pipeline: Arc<Shared>,
        progress: watch::Receiver<u64>,
        catalog: WalCatalog,
        options: &IndexOptions,
    ) -> Indexer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = IndexTask {
            repo,
            guard,
            layout: WalLayout::new(&info),
            info,
            pipeline,
            ddl: options.ddl_commits.clone(),
            cursor: None,
            ready: VecDeque::new(),
            started: false,
            backlog: None,
            backfill: None,
            catalog: Some(catalog),
        };
        Indexer { tx, task: background.spawn(task.run(rx, progress)) }
    }

    /// Offers WAL bytes starting at `lsn` on `timeline`; dropped if the indexer is behind.
    pub fn offer(&self, timeline: u32, lsn: u64, data: &Bytes) {
        if self.tx.try_send((timeline, lsn, data.clone())).is_err() {
            metrics::counter!("pitr_index_input_dropped_total").increment(1);
        }
    }

    /// Stops the task (at the end of the session).
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Decoding in progress on one timeline.
struct Cursor {
    timeline: u32,
    /// The segment being decoded.
    segno: u64,
    /// The next byte expected.
    next: u64,
    decoder: WalDecoder,
    acc: ChangeAccumulator,
    /// Events before this belong to the previous segment's object.
    from_lsn: u64,
    fresh: bool,
    entries: Vec<CommitEntry>,
}

struct IndexTask {
    repo: Repository,
    guard: LeaseGuard,
    layout: WalLayout,
    info: ClusterInfo,
    pipeline: Arc<Shared>,
    ddl: Option<Arc<watch::Sender<Option<u64>>>>,
    cursor: Option<Cursor>,
    /// Decoded segments waiting for their WAL to be durable.
    ready: VecDeque<SegmentIndex>,
    /// Whether the first bytes were seen (start-up catch-up is done once per session).
    started: bool,
    /// Segments skipped and not backfilled yet: the lowest and highest segment numbers, and when
    /// the first was skipped.
    backlog: Option<(u64, u64, tokio::time::Instant)>,
    /// The backfill pass under way.
    backfill: Option<Backfill>,
    /// The session's listing of the WAL archive (taken at its start, before the first byte it
    /// streams), for the first [`IndexTask::open`]: a reconnect lists the archive once, not twice.
    catalog: Option<WalCatalog>,
}

/// What decoding bytes on the blocking thread produced.
struct Decoded {
    cursor: Cursor,
    /// Segments finished, in order.
    finished: Vec<SegmentIndex>,
    /// The newest commit with DDL seen.
    ddl: Option<u64>,
}

/// Decodes bytes that continue the cursor, finishing segments at their ends. Pure CPU work, run
/// off the async runtime.
fn decode(mut c: Cursor, mut lsn: u64, mut data: &[u8], seg_size: u64) -> Decoded {
    let mut events = Vec::new();
    let mut finished = Vec::new();
    let mut ddl = None;
    while !data.is_empty() {
        let seg_end = (c.segno + 1) * seg_size;
        let n = usize::try_from(seg_end - lsn).unwrap_or(usize::MAX).min(data.len());
        let (piece, rest) = data.split_at(n);
        events.clear();
        c.decoder.feed_events(lsn, piece, &mut events);
        let before = c.entries.len();
        for ev in events.iter().filter(|e| e.lsn() >= c.from_lsn) {
            c.acc.push(ev, &mut c.entries);
        }
        if let Some(e) = c.entries[before..].iter().rev().find(|e| e.ddl) {
            ddl = Some(e.commit_lsn);
        }
        lsn += n as u64;
        c.next = lsn;
        data = rest;
        if lsn == seg_end {
            let to_lsn = c.decoder.record_boundary().unwrap_or(lsn).clamp(c.from_lsn, lsn);
            finished.push(SegmentIndex {
                timeline: c.timeline,
                segno: c.segno,
                from_lsn: c.from_lsn,
                to_lsn,
                fresh: c.fresh,
                entries: std::mem::take(&mut c.entries),
                carry: c.acc.state(),
            });
            c.segno += 1;
            c.from_lsn = to_lsn;
            c.fresh = false;
        }
    }
    Decoded { cursor: c, finished, ddl }
}

fn log_skipped(why: &str, timeline: u32, segno: u64, layout: &WalLayout) {
    metrics::counter!("pitr_index_segments_skipped_total").increment(1);
    tracing::warn!(segment = %layout.segment_file_name(timeline, segno), reason = why,
        "WAL segment left out of the change index for now (backfilled from the archive once durable; \
         pitr find decodes it from the WAL meanwhile)");
}

impl IndexTask {
    /// Notes a segment left out, for the backfill.
    fn skipped(&mut self, why: &str, timeline: u32, segno: u64) {
        log_skipped(why, timeline, segno, &self.layout);
        self.backlog = Some(match self.backlog {
            Some((lo, hi, at)) => (lo.min(segno), hi.max(segno), at),
            None => (segno, segno, tokio::time::Instant::now()),
        });
    }

    /// When the backlog's backfill may start (never while one runs or nothing is owed).
    fn backfill_due(&self) -> Option<tokio::time::Instant> {
        let (_, _, at) = self.backlog?;
        if self.backfill.as_ref().is_some_and(|b| !b.task.is_finished()) {
            // Looked at again when the next message or durable progress wakes the loop.
            return None;
        }
        Some(at + BACKFILL_DELAY)
    }

    /// A finished backfill pass that failed (storage outage): its segments are owed again.
    fn reap_backfill(&mut self) {
        let Some(b) = self.backfill.take_if(|b| b.task.is_finished()) else { return };
        if !b.ok.load(std::sync::atomic::Ordering::Acquire) {
            let (lo, hi) = b.owed;
            self.backlog = Some(match self.backlog {
                Some((l, h, at)) => (l.min(lo), h.max(hi), at),
                None => (lo, hi, tokio::time::Instant::now()),
            });
        }
    }

    /// Starts a backfill pass over the backlog once the archive durably holds all of its segments
    /// (until then, looks again after [`BACKFILL_DELAY`]; no I/O). The pass covers every complete
    /// segment from the lowest on; one that fails leaves the backlog owed ([`Self::reap_backfill`]).
    fn start_backfill(&mut self) {
        let Some((lo, hi, _)) = self.backlog else { return };
        let durable = self.pipeline.with(|p| p.durable());
        if durable.lsn < self.layout.segment_start(hi + 1) {
            self.backlog = Some((lo, hi, tokio::time::Instant::now()));
            return;
        }
        self.backlog = None;
        let (repo, info) = (self.repo.clone(), self.info.clone());
        let ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = ok.clone();
        let task = tokio::spawn(async move {
            match change_index::rebuild_range(&repo, &info, Some(lo), Some(hi), false).await {
                Ok(report) => {
                    done.store(true, std::sync::atomic::Ordering::Release);
                    metrics::counter!("pitr_index_segments_backfilled_total").increment(report.written);
                    tracing::info!(
                        from = lo,
                        written = report.written,
                        left = report.problems.len(),
                        "change index: backfilled skipped segments from the archive"
                    );
                    for p in report.problems.iter().take(5) {
                        tracing::debug!(problem = %p, "change index backfill");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "change index backfill failed; tried again later"),
            }
        });
        self.backfill = Some(Backfill { task, owed: (lo, hi), ok });
    }

    async fn run(mut self, mut rx: mpsc::Receiver<(u32, u64, Bytes)>, mut progress: watch::Receiver<u64>) {
        loop {
            self.reap_backfill();
            let due = self.backfill_due();
            tokio::select! {
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    self.start_backfill();
                }
                msg = rx.recv() => match msg {
                    Some((timeline, lsn, data)) => {
                        self.take(timeline, lsn, data).await;
                        let mut taken = 1;
                        while let Ok((timeline, lsn, data)) = rx.try_recv() {
                            self.take(timeline, lsn, data).await;
                            taken += 1;
                        }
                        self.flush().await;
                        if taken < QUEUE / 4 {
                            // Let messages gather: waiting in `recv` again at once, this thread
                            // would be woken (and the stream's thread would wake it) for each
                            // of them, a commit or two under a synchronous load.
                            tokio::time::sleep(GATHER).await;
                        }
                    }
                    None => return,
                },
                // Only while a decoded segment waits for its WAL to be durable: otherwise every
                // put would wake this task for nothing.
                changed = progress.changed(), if !self.ready.is_empty() => {
                    if changed.is_err() {
                        // The uploader ended; what is durable now stays so.
                        self.flush().await;
                        return;
                    }
                    self.flush().await;
                }
            }
        }
    }

    async fn take(&mut self, timeline: u32, lsn: u64, data: Bytes) {
        if let Some(c) = self.cursor.as_mut() {
            if c.timeline < timeline && self.layout.segno_of(lsn) == c.segno && lsn <= c.next {
                // A timeline switch in the session: the server streams the new timeline from the
                // start of the segment holding the switch point, whose bytes up to there are the
                // old timeline's (PostgreSQL copies them), decoded already; the walsender sent
                // the old timeline only up to the switch point, so the cursor is not past it.
                // The segment is indexed as the new timeline's.
                c.timeline = timeline;
            }
        }
        let continues = matches!(&self.cursor, Some(c) if c.timeline == timeline && c.next == lsn);
        if !continues {
            if let Some(c) = self.cursor.take() {
                if c.timeline == timeline && lsn < c.next {
                    // Bytes already decoded (a reconnect resends from the durable end).
                    let skip = usize::try_from(c.next - lsn).unwrap_or(usize::MAX);
                    self.cursor = Some(c);
                    if skip <= data.len() {
                        let next = lsn + skip as u64;
                        Box::pin(self.take(timeline, next, data.slice(skip..))).await;
                    }
                    return;
                }
                let why =
                    if c.timeline != timeline { "timeline switch" } else { "input dropped: the indexer fell behind" };
                // The segment `lsn` is in is reported when the fresh cursor finishes it.
                let last = if c.timeline == timeline { self.layout.segno_of(lsn) } else { c.segno + 1 };
                for segno in c.segno..last {
                    self.skipped(why, c.timeline, segno);
                }
                // Another timeline's transactions (past its switch point, with xids the new one
                // may reuse) must not be counted into this one's: start empty then.
                let acc = if c.timeline == timeline {
                    let mut acc = c.acc;
                    acc.lose_continuity();
                    acc
                } else {
                    ChangeAccumulator::new()
                };
                self.cursor = Some(self.fresh_cursor(timeline, lsn, acc));
            } else {
                self.cursor = Some(self.open(timeline, lsn).await);
            }
        }
        self.feed(lsn, data).await;
    }

    /// A cursor that starts decoding at `lsn` with nothing before it: its segment's object covers
    /// from `lsn` only and is written only if `lsn` is the segment's start.
    fn fresh_cursor(&self, timeline: u32, lsn: u64, acc: ChangeAccumulator) -> Cursor {
        Cursor {
            timeline,
            segno: self.layout.segno_of(lsn),
            next: lsn,
            decoder: WalDecoder::with_changes(self.info.wal_segment_size, self.info.wal_page_size),
            acc,
            from_lsn: lsn,
            fresh: true,
            entries: Vec::new(),
        }
    }

    /// The first bytes of a session on `timeline` start at `lsn`: resume after the newest index
    /// object, reading the WAL in between back from the archive.
    async fn open(&mut self, timeline: u32, lsn: u64) -> Cursor {
        let first = !std::mem::replace(&mut self.started, true);
        let segno = self.layout.segno_of(lsn);
        let seg_start = self.layout.segment_start(segno);
        let prior = if first {
            change_index::newest_at_or_before(&self.repo, &self.layout, timeline, segno.saturating_sub(1))
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot list the change index; indexing starts afresh");
                    None
                })
        } else {
            None
        };
        // Listed only if some WAL before `lsn` is to be read.
        let mut catalog = None;
        // Catch up whole segments between the newest object and the stream's segment; a longer
        // backlog (at most [`BACKFILL_MAX`] segments) is left to the backfill.
        if let Some(p) = prior.as_ref().filter(|p| segno.saturating_sub(p.segno) > CATCH_UP_MAX) {
            let lo = (p.segno + 1).max(segno.saturating_sub(BACKFILL_MAX));
            for s in lo..segno {
                self.skipped("indexing backlog at start-up", timeline, s);
            }
        }
        let mut prev = prior.filter(|p| segno - p.segno <= CATCH_UP_MAX);
        if prev.as_ref().is_some_and(|p| p.segno + 1 < segno) {
            catalog = self.listing().await;
        }
        if let Some(p) = prev.clone() {
            let mut p = p;
            for s in p.segno + 1..segno {
                let decoded = match &catalog {
                    Some(catalog) => {
                        let start = change_index::Start::after(&p);
                        change_index::decode_segment(&self.repo, &self.info, catalog, timeline, s, start).await
                    }
                    None => Ok(None),
                };
                match decoded {
                    Ok(Some((index, true))) => {
                        self.put(&index).await;
                        p = index;
                    }
                    _ => {
                        for s in s..segno {
                            self.skipped("not read back from the archive at start-up", timeline, s);
                        }
                        prev = None;
                        break;
                    }
                }
            }
            if prev.is_some() {
                prev = Some(p);
            }
        }
        // Then the part of the stream's segment the archive holds before `lsn`.
        let (from_lsn, acc, fresh) = match &prev {
            Some(p) if p.segno + 1 == segno => (p.to_lsn, ChangeAccumulator::from_state(p.carry.clone()), false),
            _ => (seg_start, ChangeAccumulator::new(), true),
        };
        let page = self.info.wal_page_size.max(1);
        let feed_from = from_lsn - from_lsn % page;
        let cursor = Cursor {
            timeline,
            segno,
            next: feed_from,
            decoder: WalDecoder::with_changes(self.info.wal_segment_size, self.info.wal_page_size),
            acc,
            from_lsn,
            fresh,
            entries: Vec::new(),
        };
        if feed_from < lsn && catalog.is_none() {
            catalog = self.listing().await;
        }
        // The session's listing serves its first start only (a later one lists afresh).
        self.catalog = None;
        let cursor = if feed_from < lsn {
            let read = match &catalog {
                Some(catalog) => change_index::read_wal(&self.repo, catalog, timeline, feed_from, lsn).await,
                None => Ok(None),
            };
            drop(catalog);
            match read {
                Ok(Some(bytes)) => {
                    self.cursor = Some(cursor);
                    self.feed(feed_from, Bytes::from(bytes)).await;
                    match self.cursor.take() {
                        Some(c) => c,
                        None => return self.fresh_cursor(timeline, lsn, ChangeAccumulator::new()),
                    }
                }
                Ok(None) | Err(_) => {
                    let mut acc = cursor.acc;
                    acc.lose_continuity();
                    return self.fresh_cursor(timeline, lsn, acc);
                }
            }
        } else {
            cursor
        };
        tracing::info!(timeline, from = %format_lsn(from_lsn), resumed = !fresh, "change index: decoding");
        cursor
    }

    /// The session's listing of the WAL archive, or a new one (`None` if the archive cannot be
    /// listed: indexing then starts afresh).
    async fn listing(&mut self) -> Option<WalCatalog> {
        if let Some(catalog) = self.catalog.take() {
            return Some(catalog);
        }
        match WalCatalog::build(&self.repo, self.layout).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the WAL archive; indexing starts afresh");
                None
            }
        }
    }

    /// Decodes bytes that continue the cursor (on a blocking thread), finishing segments at their
    /// ends.
    async fn feed(&mut self, lsn: u64, data: Bytes) {
        let Some(cursor) = self.cursor.take() else { return };
        let (timeline, segno) = (cursor.timeline, cursor.segno);
        let seg_size = self.info.wal_segment_size;
        let decoded = if data.len() <= INLINE_DECODE_MAX {
            // Tens of microseconds: less than the two thread wake-ups of a hand-off, which under
            // a synchronous-commit load (a small message per commit) cost the primary CPU.
            Ok(decode(cursor, lsn, &data, seg_size))
        } else {
            tokio::task::spawn_blocking(move || decode(cursor, lsn, &data, seg_size)).await
        };
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                // The cursor is lost with the thread: the next bytes start afresh (`open`).
                self.skipped(&format!("decoder stopped: {e}"), timeline, segno);
                return;
            }
        };
        self.cursor = Some(decoded.cursor);
        if let (Some(ddl), Some(at)) = (&self.ddl, decoded.ddl) {
            ddl.send_replace(Some(at));
        }
        for index in decoded.finished {
            // An object must cover from its segment's start (or a record begun before it).
            if index.from_lsn <= self.layout.segment_start(index.segno) || !index.fresh {
                if self.ready.len() >= READY_MAX {
                    if let Some(old) = self.ready.pop_front() {
                        self.skipped("its WAL did not become durable in time", old.timeline, old.segno);
                    }
                }
                self.ready.push_back(index);
            } else {
                self.skipped("decoding started inside it", index.timeline, index.segno);
            }
        }
    }

    /// Puts the decoded segments whose WAL is durable now.
    async fn flush(&mut self) {
        let durable = self.pipeline.with(|p| p.durable());
        while let Some(front) = self.ready.front() {
            let end = self.layout.segment_start(front.segno + 1);
            // The durable end moves in stream order: on a later timeline, it has passed every
            // byte received on an earlier one, so that segment (received whole) is durable.
            if durable.timeline < front.timeline || (durable.timeline == front.timeline && durable.lsn < end) {
                return;
            }
            if let Some(index) = self.ready.pop_front() {
                self.put(&index).await;
            }
        }
    }

    async fn put(&mut self, index: &SegmentIndex) {
        let name = index.object_name(&self.layout);
        match self.guard.fenced(self.repo.put_sealed(&name, index.encode(), index.meta())).await {
            Ok(Ok(_)) => {
                metrics::counter!("pitr_index_segments_written_total").increment(1);
                tracing::debug!(object = %name, commits = index.entries.len(), "change index written");
            }
            // Written already from another start (a backfill, `verify --rebuild-index`, a session
            // before this one): that object serves.
            Ok(Err(pitr_archive::RepositoryError::Conflict { .. })) => {
                tracing::debug!(object = %name, "change index object already there");
            }
            Ok(Err(e)) => {
                self.skipped(&format!("put failed: {e}"), index.timeline, index.segno);
            }
            Err(e) => self.skipped(&format!("lease: {e}"), index.timeline, index.segno),
        }
    }
}
