//! Secondary repositories: every object stored in the primary is then copied, as the same sealed
//! bytes, to each secondary.
//!
//! A sealed object authenticates itself and binds its own name, so a copy needs no key: it is the
//! primary's object byte for byte. [`ReplicatedStore`] is a [`Store`] over the primary that, once
//! the primary has done a put or a delete, queues it for every secondary. Each secondary has one
//! FIFO queue worked by one task, so a delete reaches a secondary only after every put queued
//! before it (a compacted segment is there before its chunks go): a secondary never has a gap.
//! Puts between two deletes run several at a time. Failed copies are retried with backoff until
//! they succeed.
//!
//! The queue is bounded. A secondary that is not `required` never holds up the primary: when its
//! queue is full it drops what comes next and, once what it holds is done, back-fills by comparing
//! listings (which also makes good a queue lost in a crash; the sidecar back-fills at start and
//! periodically). Back-filling only ever copies: an object missing from the primary is exactly
//! what a secondary is there for, so listings never cause deletes. A `required` secondary makes a
//! put return only once it holds the object too, and a full queue waits instead of dropping.
//!
//! The writer lease (`pg/<id>/lease/`) and the running-backup markers and expire lock
//! (`running/`) are coordination on the primary only and are never copied.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{oneshot, Notify};

use crate::names::{self, MARKER};
use crate::now_us;
use crate::repository::{OBJECT_READ_MAX, RECORD_READ_MAX};
use crate::store::{ObjectInfo, PutOutcome, Store, StoreError};

/// Copies a secondary runs at once (queued puts between deletes, and back-fill copies).
pub const COPY_PARALLEL: usize = 8;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why binding a secondary or back-filling it failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Listing, reading or putting in either store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The primary has no repository marker, so there is nothing to bind a secondary to.
    #[error("{primary} is not a pitr repository (no {MARKER} object); run `pitr init` first")]
    PrimaryNotInitialised {
        /// The primary's location.
        primary: String,
    },
    /// The secondary's repository marker is not a byte-for-byte copy of the primary's: it is
    /// another repository, and nothing is copied into it.
    #[error(
        "{secondary} holds a different pitr repository than {primary} (their {MARKER} objects differ: \
         initialised on its own, or another repository's storage); refusing to copy into it"
    )]
    Foreign {
        /// The primary's location.
        primary: String,
        /// The secondary's location.
        secondary: String,
    },
}

/// One configured secondary.
#[derive(Debug, Clone)]
pub struct Secondary {
    /// Its name in the configuration, for status, metrics and messages.
    pub name: String,
    /// Where its copies go.
    pub store: Arc<dyn Store>,
    /// Puts return only once this secondary holds the object too.
    pub required: bool,
    /// Bytes of pending copies the queue holds before it drops (or, if `required`, waits).
    pub queue_bytes: u64,
}

/// What a secondary is doing, for `pitr status` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Checking that the secondary is a copy of this repository (or making it one).
    #[default]
    Starting,
    /// Nothing queued or in flight: the secondary holds everything the primary did, as far as
    /// this process knows.
    CaughtUp,
    /// Working through queued puts and deletes.
    Copying,
    /// The last attempt failed; retrying with backoff.
    Retrying,
    /// Comparing listings and copying what the secondary misses.
    Backfilling,
    /// The queue was full: new work is dropped until a back-fill has run.
    Overflowed,
    /// The secondary holds another repository: nothing is copied to it.
    Refused,
}

/// One secondary's copy queue and counters since the process started (`pitr status`, metrics).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecondaryStatus {
    /// Its configured name.
    pub name: String,
    /// Its store's location.
    pub location: String,
    /// Whether puts wait for it ([`Secondary::required`]).
    pub required: bool,
    /// What it is doing now.
    pub state: CopyState,
    /// Puts and deletes waiting or in progress.
    pub queued_objects: u64,
    /// Bytes of those (what the queue bound [`Secondary::queue_bytes`] counts).
    pub queued_bytes: u64,
    /// Age of the oldest queued put or delete (0 when caught up).
    pub lag_seconds: f64,
    /// Objects copied to it, by the queue and by back-fills.
    pub copied_objects: u64,
    /// Bytes of those.
    pub copied_bytes: u64,
    /// Objects deleted from it, following deletes in the primary (compaction, expire).
    pub deleted_objects: u64,
    /// Failed attempts (each retried).
    pub errors: u64,
    /// Puts and deletes dropped because the queue was full (a back-fill makes the puts good).
    pub dropped: u64,
    /// Back-fills completed.
    pub backfills: u64,
    /// When the last back-fill finished (µs since the Unix epoch).
    pub last_backfill_us: Option<i64>,
    /// The most recent error, or why the secondary is refused; kept after later successes.
    pub last_error: Option<String>,
}

/// What one back-fill found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackfillSummary {
    /// The primary's location.
    pub primary: String,
    /// The secondary's location.
    pub secondary: String,
    /// The repository marker had to be copied first (a fresh secondary).
    pub marker_copied: bool,
    /// Objects the primary listed (only replicated ones: no lease, no `running/`).
    pub primary_objects: u64,
    /// Objects the secondary listed, counted the same way.
    pub secondary_objects: u64,
    /// Objects the secondary lacked.
    pub missing: u64,
    /// Of those, how many were copied (the rest vanished from the primary meanwhile).
    pub copied_objects: u64,
    /// Bytes copied.
    pub copied_bytes: u64,
    /// Listed in the primary but deleted from it before they could be copied.
    pub vanished: u64,
    /// Objects only the secondary has (left alone: they may be what the primary lost).
    pub extra: u64,
    /// Names both hold with different sizes (left alone; `verify --from` judges them).
    pub differing: Vec<String>,
}

/// Whether copies of `name` go to secondaries.
pub fn is_replicated(name: &str) -> bool {
    !names::pg::is_lease(name) && !names::is_running(name)
}

/// Makes sure `secondary` is a copy of `primary`'s repository: copies the marker to a fresh one,
/// refuses one holding another repository. Returns whether the marker was copied.
pub async fn bind(primary: &dyn Store, secondary: &dyn Store) -> Result<bool, CopyError> {
    let marker = match primary.get_limited(MARKER, RECORD_READ_MAX).await {
        Ok(m) => m,
        Err(e) if e.is_not_found() => return Err(CopyError::PrimaryNotInitialised { primary: primary.location() }),
        Err(e) => return Err(e.into()),
    };
    let foreign = || CopyError::Foreign { primary: primary.location(), secondary: secondary.location() };
    match secondary.get_limited(MARKER, RECORD_READ_MAX).await {
        Ok(theirs) if theirs == marker => return Ok(false),
        Ok(_) => return Err(foreign()),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    // The key records first: a secondary whose marker is there must open without the primary.
    for record in primary.list(crate::keys::record::KEYS).await? {
        let bytes = match primary.get_limited(&record.name, crate::keys::record::RECORD_MAX).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        secondary.put_if_absent(&record.name, bytes).await?;
    }
    match secondary.put_if_absent(MARKER, marker.clone()).await? {
        PutOutcome::Created => Ok(true),
        PutOutcome::AlreadyExists if secondary.get_limited(MARKER, RECORD_READ_MAX).await? == marker => Ok(false),
        PutOutcome::AlreadyExists => Err(foreign()),
    }
}

/// Copies to `secondary` every object of `primary` it lacks (by name), `parallel` at a time,
/// calling `progress(done, missing)`. Idempotent; never deletes and never overwrites.
pub async fn backfill(
    primary: &dyn Store,
    secondary: &dyn Store,
    parallel: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<BackfillSummary, CopyError> {
    let marker_copied = bind(primary, secondary).await?;
    // The secondary is listed first: anything put after that listing is not in it, so it is
    // either in the primary's listing (copied here) or queued for the secondary anyway.
    let theirs: BTreeMap<String, u64> =
        secondary.list("").await?.into_iter().filter(|o| is_replicated(&o.name)).map(|o| (o.name, o.size)).collect();
    let ours: Vec<ObjectInfo> = primary.list("").await?.into_iter().filter(|o| is_replicated(&o.name)).collect();
    let mut summary = BackfillSummary {
        primary: primary.location(),
        secondary: secondary.location(),
        marker_copied,
        primary_objects: ours.len() as u64,
        secondary_objects: theirs.len() as u64,
        ..Default::default()
    };
    let mut missing = Vec::new();
    for o in &ours {
        match theirs.get(&o.name) {
            None => missing.push(o.name.clone()),
            Some(&size) if size != o.size => summary.differing.push(o.name.clone()),
            Some(_) => {}
        }
    }
    let ours_names: std::collections::BTreeSet<&str> = ours.iter().map(|o| o.name.as_str()).collect();
    summary.extra = theirs.keys().filter(|n| !ours_names.contains(n.as_str())).count() as u64;
    summary.missing = missing.len() as u64;
    progress(0, summary.missing);
    let mut copies = futures_util::stream::iter(missing.into_iter().map(|name| async move {
        let data = match primary.get_limited(&name, OBJECT_READ_MAX).await {
            Ok(d) => d,
            // Deleted since the listing (compacted chunks, expired backups): nothing to copy.
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = data.len() as u64;
        secondary.put_if_absent(&name, data).await?;
        Ok(Some(len))
    }))
    .buffer_unordered(parallel.max(1));
    let mut done = 0;
    while let Some(copied) = copies.next().await {
        match copied? {
            Some(len) => {
                summary.copied_objects += 1;
                summary.copied_bytes += len;
            }
            None => summary.vanished += 1,
        }
        done += 1;
        progress(done, summary.missing);
    }
    Ok(summary)
}

enum Op {
    /// `data` is `None` when the primary already held the object: its bytes are read back, so
    /// that what the secondary gets is what the primary has.
    Put {
        name: String,
        data: Option<Bytes>,
    },
    Delete {
        names: Vec<String>,
    },
    Backfill,
}

struct Queued {
    op: Op,
    bytes: u64,
    since: Instant,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Queued>,
    queued_bytes: u64,
    in_flight: u64,
    in_flight_bytes: u64,
    in_flight_since: Option<Instant>,
    bound: bool,
    refused: Option<String>,
    failing: bool,
    backfilling: bool,
    overflowed: bool,
    backfill_queued: bool,
    status: SecondaryStatus,
    last_progress: Option<Instant>,
}

impl Inner {
    fn idle(&self) -> bool {
        self.refused.is_some()
            || (self.bound && self.queue.is_empty() && self.in_flight == 0 && !self.backfilling && !self.overflowed)
    }
}

/// The queue and worker of one secondary.
struct Copier {
    name: String,
    required: bool,
    queue_bytes: u64,
    primary: Arc<dyn Store>,
    secondary: Arc<dyn Store>,
    inner: Mutex<Inner>,
    /// Wakes the worker: new work.
    wake: Notify,
    /// Wakes waiters: work finished, space freed.
    changed: Notify,
}

impl std::fmt::Debug for Copier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copier").field("name", &self.name).field("secondary", &self.secondary.location()).finish()
    }
}

fn backoff_after(current: Duration) -> Duration {
    use rand::Rng;
    let next = (current * 2).min(BACKOFF_MAX);
    // Jitter, so that secondaries failing together do not retry in lockstep.
    next.mul_f64(rand::thread_rng().gen_range(0.75..1.25)).min(BACKOFF_MAX)
}

impl Copier {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only counters and queued work live here, consistent at every unlock.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> SecondaryStatus {
        let inner = self.lock();
        let mut s = inner.status.clone();
        s.queued_objects =
            inner.queue.iter().filter(|q| !matches!(q.op, Op::Backfill)).count() as u64 + inner.in_flight;
        s.queued_bytes = inner.queued_bytes + inner.in_flight_bytes;
        let oldest = inner
            .in_flight_since
            .or_else(|| inner.queue.iter().find(|q| !matches!(q.op, Op::Backfill)).map(|q| q.since));
        s.lag_seconds = oldest.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        s.state = if inner.refused.is_some() {
            CopyState::Refused
        } else if !inner.bound && !inner.failing {
            CopyState::Starting
        } else if inner.failing {
            CopyState::Retrying
        } else if inner.backfilling {
            CopyState::Backfilling
        } else if inner.overflowed {
            CopyState::Overflowed
        } else if s.queued_objects > 0 {
            CopyState::Copying
        } else {
            CopyState::CaughtUp
        };
        s
    }

    /// Queues `op`. A required secondary waits for room and returns a receiver for completion;
    /// any other drops the op when the queue is full (and back-fills later).
    async fn enqueue(&self, op: Op, bytes: u64, wait_done: bool) -> Option<oneshot::Receiver<Result<(), String>>> {
        loop {
            let room = self.changed.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut inner = self.lock();
                if let Some(why) = &inner.refused {
                    if wait_done {
                        let (tx, rx) = oneshot::channel();
                        let _ = tx.send(Err(why.clone()));
                        return Some(rx);
                    }
                    inner.status.dropped += 1;
                    return None;
                }
                let pending = inner.queued_bytes + inner.in_flight_bytes;
                let full = pending > 0 && pending + bytes > self.queue_bytes;
                if !self.required && (inner.overflowed || full) {
                    if !inner.overflowed {
                        tracing::warn!(secondary = %self.name, location = %self.secondary.location(), queued_bytes = pending,
                            "copy queue full: new work is dropped until it drains, then a back-fill copies what was missed");
                        inner.overflowed = true;
                    }
                    inner.status.dropped += 1;
                    return None;
                }
                if !full {
                    let (done, rx) = if wait_done {
                        let (tx, rx) = oneshot::channel();
                        (Some(tx), Some(rx))
                    } else {
                        (None, None)
                    };
                    inner.queued_bytes += bytes;
                    inner.queue.push_back(Queued { op, bytes, since: Instant::now(), done });
                    drop(inner);
                    self.wake.notify_one();
                    return rx;
                }
            }
            // A required secondary with a full queue: wait for room.
            room.await;
        }
    }

    fn schedule_backfill(&self) {
        let mut inner = self.lock();
        if inner.backfill_queued || inner.refused.is_some() {
            return;
        }
        inner.backfill_queued = true;
        inner.queue.push_back(Queued { op: Op::Backfill, bytes: 0, since: Instant::now(), done: None });
        drop(inner);
        self.wake.notify_one();
    }

    fn note_error(&self, what: &str, e: &dyn std::fmt::Display, retry_in: Duration) {
        tracing::warn!(secondary = %self.name, location = %self.secondary.location(), error = %e, ?retry_in,
            "copy to secondary failed ({what}); retrying");
        let mut inner = self.lock();
        inner.failing = true;
        inner.status.errors += 1;
        inner.status.last_error = Some(format!("{what}: {e}"));
    }

    fn note_success(&self) {
        let mut inner = self.lock();
        inner.failing = false;
        inner.last_progress = Some(Instant::now());
    }

    fn refuse(&self, why: String) {
        tracing::error!(secondary = %self.name, "{why}");
        let mut inner = self.lock();
        inner.refused = Some(why.clone());
        inner.failing = false;
        inner.status.last_error = Some(why.clone());
        let dropped: Vec<Queued> = inner.queue.drain(..).collect();
        inner.queued_bytes = 0;
        inner.status.dropped += dropped.len() as u64;
        drop(inner);
        for q in dropped {
            if let Some(tx) = q.done {
                let _ = tx.send(Err(why.clone()));
            }
        }
        self.changed.notify_waiters();
    }

    /// Binds the secondary (retrying while it is unreachable). False if it is refused.
    async fn bind_until_done(&self) -> bool {
        let mut backoff = BACKOFF_START;
        loop {
            match bind(self.primary.as_ref(), self.secondary.as_ref()).await {
                Ok(copied) => {
                    if copied {
                        tracing::info!(secondary = %self.name, location = %self.secondary.location(), "repository marker copied to a fresh secondary");
                    }
                    self.note_success();
                    self.lock().bound = true;
                    self.changed.notify_waiters();
                    return true;
                }
                Err(e @ CopyError::Foreign { .. }) => {
                    self.refuse(e.to_string());
                    return false;
                }
                Err(e) => {
                    self.note_error("checking the repository marker", &e, backoff);
                    self.changed.notify_waiters();
                    tokio::time::sleep(backoff).await;
                    backoff = backoff_after(backoff);
                }
            }
        }
    }

    /// The next work: consecutive puts (up to [`COPY_PARALLEL`]), or one delete or back-fill.
    async fn next_batch(&self) -> Vec<Queued> {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut inner = self.lock();
                let mut batch = Vec::new();
                while let Some(front) = inner.queue.front() {
                    let is_put = matches!(front.op, Op::Put { .. });
                    if !batch.is_empty() && (!is_put || batch.len() >= COPY_PARALLEL) {
                        break;
                    }
                    let Some(q) = inner.queue.pop_front() else { break };
                    inner.queued_bytes -= q.bytes;
                    if !is_put {
                        batch.push(q);
                        break;
                    }
                    batch.push(q);
                }
                if batch.is_empty() && inner.overflowed {
                    // Everything queued before the overflow is done; what was dropped since is
                    // in the primary's listing, which this back-fill takes after the flag is
                    // cleared (work arriving from now on is queued behind it).
                    inner.overflowed = false;
                    batch.push(Queued { op: Op::Backfill, bytes: 0, since: Instant::now(), done: None });
                }
                if !batch.is_empty() {
                    inner.in_flight = batch.iter().filter(|q| !matches!(q.op, Op::Backfill)).count() as u64;
                    inner.in_flight_bytes = batch.iter().map(|q| q.bytes).sum();
                    inner.in_flight_since =
                        batch.iter().filter(|q| !matches!(q.op, Op::Backfill)).map(|q| q.since).min();
                    if matches!(batch[0].op, Op::Backfill) {
                        inner.backfilling = true;
                        inner.backfill_queued = false;
                    }
                    return batch;
                }
            }
            woken.await;
        }
    }

    async fn put_with_retry(&self, name: &str, data: Option<Bytes>) {
        let mut backoff = BACKOFF_START;
        loop {
            let attempt = async {
                let data = match &data {
                    Some(d) => d.clone(),
                    None => match self.primary.get_limited(name, OBJECT_READ_MAX).await {
                        Ok(d) => d,
                        Err(e) if e.is_not_found() => return Ok(0),
                        Err(e) => return Err(e),
                    },
                };
                let len = data.len() as u64;
                self.secondary.put_if_absent(name, data).await?;
                Ok(len)
            };
            match attempt.await {
                Ok(len) => {
                    self.note_success();
                    let mut inner = self.lock();
                    inner.status.copied_objects += 1;
                    inner.status.copied_bytes += len;
                    return;
                }
                Err(e) => {
                    self.note_error("put", &e, backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = backoff_after(backoff);
                }
            }
        }
    }

    async fn delete_with_retry(&self, names: &[String]) {
        let mut backoff = BACKOFF_START;
        loop {
            match self.secondary.delete_many(names).await {
                Ok(()) => {
                    self.note_success();
                    self.lock().status.deleted_objects += names.len() as u64;
                    return;
                }
                // Object Lock (or a policy) keeps it: retrying cannot help, and an object left
                // behind on a secondary leaves no gap.
                Err(e) if e.is_denied() => {
                    tracing::warn!(secondary = %self.name, error = %e, "the secondary refused a delete; the objects stay there");
                    self.note_success();
                    return;
                }
                Err(e) => {
                    self.note_error("delete", &e, backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = backoff_after(backoff);
                }
            }
        }
    }

    /// False if the secondary turned out to hold another repository.
    async fn backfill_with_retry(&self) -> bool {
        let mut backoff = BACKOFF_START;
        loop {
            let started = Instant::now();
            match backfill(self.primary.as_ref(), self.secondary.as_ref(), COPY_PARALLEL, &|_, _| {}).await {
                Ok(s) => {
                    tracing::info!(secondary = %self.name, location = %self.secondary.location(),
                        missing = s.missing, copied = s.copied_objects, bytes = s.copied_bytes, extra = s.extra,
                        seconds = started.elapsed().as_secs_f64(), "back-fill done");
                    for name in &s.differing {
                        tracing::warn!(secondary = %self.name, object = %name, "the secondary's copy differs in size from the primary's object");
                    }
                    self.note_success();
                    let mut inner = self.lock();
                    inner.status.backfills += 1;
                    inner.status.copied_objects += s.copied_objects;
                    inner.status.copied_bytes += s.copied_bytes;
                    inner.status.last_backfill_us = Some(now_us());
                    return true;
                }
                Err(e @ CopyError::Foreign { .. }) => {
                    self.refuse(e.to_string());
                    return false;
                }
                Err(e) => {
                    self.note_error("back-fill", &e, backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = backoff_after(backoff);
                }
            }
        }
    }

    async fn run(self: Arc<Self>) {
        if !self.bind_until_done().await {
            return;
        }
        loop {
            let batch = self.next_batch().await;
            let mut refused = false;
            match &batch[0].op {
                Op::Put { .. } => {
                    futures_util::future::join_all(batch.iter().map(|q| match &q.op {
                        Op::Put { name, data } => self.put_with_retry(name, data.clone()),
                        _ => unreachable!("a put batch holds only puts"),
                    }))
                    .await;
                }
                Op::Delete { names } => self.delete_with_retry(names).await,
                Op::Backfill => refused = !self.backfill_with_retry().await,
            }
            {
                let mut inner = self.lock();
                inner.in_flight = 0;
                inner.in_flight_bytes = 0;
                inner.in_flight_since = None;
                inner.backfilling = false;
                inner.last_progress = Some(Instant::now());
            }
            for q in batch {
                if let Some(tx) = q.done {
                    let _ = tx.send(Ok(()));
                }
            }
            self.changed.notify_waiters();
            if refused {
                return;
            }
        }
    }
}

/// A [`Store`] over the primary that copies every put and delete to the secondaries.
#[derive(Debug)]
pub struct ReplicatedStore {
    primary: Arc<dyn Store>,
    copiers: Vec<Arc<Copier>>,
}

impl ReplicatedStore {
    /// Starts one copy worker per secondary (on the current tokio runtime). Each first checks
    /// that its secondary is a copy of this repository (copying the marker to a fresh one).
    pub fn new(primary: Arc<dyn Store>, secondaries: Vec<Secondary>) -> ReplicatedStore {
        let copiers: Vec<Arc<Copier>> = secondaries
            .into_iter()
            .map(|s| {
                Arc::new(Copier {
                    name: s.name.clone(),
                    required: s.required,
                    queue_bytes: s.queue_bytes.max(1),
                    primary: primary.clone(),
                    inner: Mutex::new(Inner {
                        status: SecondaryStatus {
                            name: s.name,
                            location: s.store.location(),
                            required: s.required,
                            ..Default::default()
                        },
                        ..Default::default()
                    }),
                    secondary: s.store,
                    wake: Notify::new(),
                    changed: Notify::new(),
                })
            })
            .collect();
        for c in &copiers {
            tokio::spawn(c.clone().run());
        }
        ReplicatedStore { primary, copiers }
    }

    /// The primary store underneath; puts and deletes made on it directly are not copied.
    pub fn primary(&self) -> &Arc<dyn Store> {
        &self.primary
    }

    /// Queues a back-fill on every secondary (behind the work already queued) unless one is
    /// queued already.
    pub fn schedule_backfill(&self) {
        for c in &self.copiers {
            c.schedule_backfill();
        }
    }

    /// Every secondary's status, in configuration order.
    pub fn status(&self) -> Vec<SecondaryStatus> {
        self.copiers.iter().map(|c| c.status()).collect()
    }

    /// Waits until every secondary has done its queued work, or until `patience` passes without
    /// any of them finishing anything; returns the statuses of those left behind.
    pub async fn drain(&self, patience: Duration) -> Vec<SecondaryStatus> {
        let started = Instant::now();
        loop {
            let mut waits = Vec::new();
            for c in &self.copiers {
                let changed = c.changed.notified();
                waits.push(Box::pin(changed));
            }
            for w in &mut waits {
                w.as_mut().enable();
            }
            let behind: Vec<&Arc<Copier>> = self.copiers.iter().filter(|c| !c.lock().idle()).collect();
            if behind.is_empty() {
                return Vec::new();
            }
            let last =
                behind.iter().filter_map(|c| c.lock().last_progress).max().map(|t| t.max(started)).unwrap_or(started);
            let Some(left) = patience.checked_sub(last.elapsed()) else {
                return behind.iter().map(|c| c.status()).collect();
            };
            let _ = tokio::time::timeout(left, futures_util::future::select_all(waits)).await;
        }
    }

    async fn copy(&self, name: &str, data: Option<Bytes>) -> Result<(), StoreError> {
        let bytes = data.as_ref().map(|d| d.len() as u64).unwrap_or(0);
        let mut waits = Vec::new();
        for c in &self.copiers {
            let op = Op::Put { name: name.to_string(), data: data.clone() };
            if let Some(rx) = c.enqueue(op, bytes, c.required).await {
                waits.push((c, rx));
            }
        }
        for (c, rx) in waits {
            let failed = |message: String| StoreError::Backend {
                op: "copy",
                name: name.to_string(),
                location: format!("secondary {} ({})", c.name, c.secondary.location()),
                message,
            };
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(failed(why)),
                Err(_) => return Err(failed("the copy worker stopped".into())),
            }
        }
        Ok(())
    }

    async fn queue_delete(&self, names: Vec<String>) {
        let names: Vec<String> = names.into_iter().filter(|n| is_replicated(n)).collect();
        if names.is_empty() {
            return;
        }
        for c in &self.copiers {
            c.enqueue(Op::Delete { names: names.clone() }, 0, false).await;
        }
    }
}

#[async_trait]
impl Store for ReplicatedStore {
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let outcome = self.primary.put_if_absent(name, data.clone()).await?;
        if is_replicated(name) {
            let data = match outcome {
                PutOutcome::Created => Some(data),
                PutOutcome::AlreadyExists => None,
            };
            self.copy(name, data).await?;
        }
        Ok(outcome)
    }

    async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        self.primary.get(name).await
    }

    async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.primary.get_range(name, range).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.primary.list(prefix).await
    }

    async fn list_children(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        self.primary.list_children(dir).await
    }

    fn release(&self) {
        self.primary.release();
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.primary.delete(name).await?;
        self.queue_delete(vec![name.to_string()]).await;
        Ok(())
    }

    async fn delete_many(&self, names: &[String]) -> Result<(), StoreError> {
        self.primary.delete_many(names).await?;
        self.queue_delete(names.to_vec()).await;
        Ok(())
    }

    async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.primary.head(name).await
    }

    fn location(&self) -> String {
        self.primary.location()
    }

    // The primary's only: secondaries are opened without Object Lock (their client settings
    // take the defaults), so they have no retention to extend.
    fn has_retention(&self) -> bool {
        self.primary.has_retention()
    }

    async fn extend_retention(&self, name: &str, until_us: i64) -> Result<bool, StoreError> {
        self.primary.extend_retention(name, until_us).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    /// A real local store that can be switched "down" (every call fails, as an unreachable
    /// server's would) and that checks, at every chunk delete, that the chunk's whole segment is
    /// already there: a delete overtaking the put it depends on would leave a gap.
    #[derive(Debug)]
    struct Switchable {
        inner: LocalStore,
        down: std::sync::atomic::AtomicBool,
        gaps: Mutex<Vec<String>>,
    }

    impl Switchable {
        fn new(root: &std::path::Path) -> Arc<Switchable> {
            Arc::new(Switchable { inner: LocalStore::new(root), down: false.into(), gaps: Mutex::new(Vec::new()) })
        }
        fn set_down(&self, down: bool) {
            self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        }
        fn check(&self, op: &'static str, name: &str) -> Result<(), StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Backend {
                    op,
                    name: name.into(),
                    location: self.location(),
                    message: "connection refused".into(),
                });
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Store for Switchable {
        async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
            self.check("put", name)?;
            self.inner.put_if_absent(name, data).await
        }
        async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
            self.check("get", name)?;
            self.inner.get(name).await
        }
        async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
            self.check("get range", name)?;
            self.inner.get_range(name, range).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
            self.check("list", prefix)?;
            self.inner.list(prefix).await
        }
        async fn delete(&self, name: &str) -> Result<(), StoreError> {
            self.delete_many(&[name.to_string()]).await
        }
        async fn delete_many(&self, names: &[String]) -> Result<(), StoreError> {
            for name in names {
                self.check("delete", name)?;
                if let Some((segment, _)) = name.strip_suffix(".chunk").and_then(|n| n.rsplit_once('.')) {
                    if self.inner.head(&format!("{segment}.seg")).await?.is_none() {
                        self.gaps.lock().unwrap().push(name.clone());
                    }
                }
            }
            self.inner.delete_many(names).await
        }
        async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
            self.check("head", name)?;
            self.inner.head(name).await
        }
        fn location(&self) -> String {
            format!("switchable {}", self.inner.location())
        }
    }

    struct Setup {
        _dirs: (tempfile::TempDir, tempfile::TempDir),
        primary: Arc<LocalStore>,
        secondary: Arc<Switchable>,
    }

    async fn setup() -> Setup {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let primary = Arc::new(LocalStore::new(a.path()));
        primary.put_if_absent(MARKER, Bytes::from_static(b"marker")).await.unwrap();
        let secondary = Switchable::new(b.path());
        Setup { _dirs: (a, b), primary, secondary }
    }

    fn replicated(s: &Setup, required: bool, queue_bytes: u64) -> ReplicatedStore {
        let secondary = Secondary { name: "dr".into(), store: s.secondary.clone(), required, queue_bytes };
        ReplicatedStore::new(s.primary.clone(), vec![secondary])
    }

    /// Hang guard only: every wait in these tests ends on an event, never on elapsed time.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f).await.expect("hung")
    }

    async fn names(store: &dyn Store) -> Vec<String> {
        store.list("").await.unwrap().into_iter().map(|o| o.name).collect()
    }

    const WAL: &str = "pg/1/wal/000000010000000000000001";

    /// What the WAL uploader does per segment: chunks, then the whole segment, then the chunks go.
    async fn segment_cycle(store: &ReplicatedStore, wal: &str) {
        let chunks: Vec<String> = (0..4).map(|i| format!("{wal}.{:08X}-{:08X}.chunk", i * 16, i * 16 + 16)).collect();
        for c in &chunks {
            store.put_if_absent(c, Bytes::from(vec![1u8; 16])).await.unwrap();
        }
        store.put_if_absent(&format!("{wal}.seg"), Bytes::from(vec![2u8; 64])).await.unwrap();
        store.delete_many(&chunks).await.unwrap();
    }

    #[tokio::test]
    async fn deletes_never_overtake_the_puts_before_them() {
        let s = setup().await;
        s.secondary.set_down(true);
        let store = replicated(&s, false, 1 << 20);
        for seg in 1..=5 {
            segment_cycle(&store, &format!("pg/1/wal/00000001000000000000000{seg}")).await;
        }
        // The primary was never held up by the unreachable secondary.
        assert_eq!(names(s.primary.as_ref()).await.len(), 6);
        let st = &store.status()[0];
        assert_eq!(st.state, CopyState::Retrying, "{st:?}");
        assert!(st.queued_objects >= 10, "{st:?}");
        s.secondary.set_down(false);
        assert!(within(store.drain(Duration::from_secs(30))).await.is_empty());
        assert_eq!(names(s.secondary.as_ref()).await, names(s.primary.as_ref()).await);
        assert!(s.secondary.gaps.lock().unwrap().is_empty(), "{:?}", s.secondary.gaps.lock().unwrap());
        let st = &store.status()[0];
        assert_eq!((st.state, st.queued_objects, st.dropped), (CopyState::CaughtUp, 0, 0), "{st:?}");
        assert!(st.errors > 0 && st.deleted_objects == 20 && st.copied_objects == 25, "{st:?}");
    }

    #[tokio::test]
    async fn a_full_queue_drops_then_backfills_without_a_gap() {
        let s = setup().await;
        s.secondary.set_down(true);
        // Room for about one chunk: nearly everything is dropped.
        let store = replicated(&s, false, 20);
        for seg in 1..=3 {
            segment_cycle(&store, &format!("pg/1/wal/00000001000000000000000{seg}")).await;
        }
        let st = &store.status()[0];
        assert!(st.dropped > 0, "{st:?}");
        s.secondary.set_down(false);
        assert!(within(store.drain(Duration::from_secs(30))).await.is_empty());
        let on_secondary = names(s.secondary.as_ref()).await;
        for seg in 1..=3 {
            let name = format!("pg/1/wal/00000001000000000000000{seg}.seg");
            assert!(on_secondary.contains(&name), "{name} missing: {on_secondary:?}");
        }
        assert!(s.secondary.gaps.lock().unwrap().is_empty(), "{:?}", s.secondary.gaps.lock().unwrap());
        let st = &store.status()[0];
        assert!(st.backfills >= 1 && st.state == CopyState::CaughtUp, "{st:?}");
    }

    #[tokio::test]
    async fn a_required_secondary_holds_the_put_until_it_has_the_object() {
        let s = setup().await;
        let store = Arc::new(replicated(&s, true, 1 << 20));
        within(store.drain(Duration::from_secs(30))).await;
        s.secondary.set_down(true);
        let put = {
            let store = store.clone();
            tokio::spawn(async move { store.put_if_absent(&format!("{WAL}.seg"), Bytes::from_static(b"seg")).await })
        };
        // Several retries pass, and the put is still waiting.
        let retried = async {
            while store.status()[0].errors < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        within(retried).await;
        assert!(!put.is_finished());
        assert!(s.primary.head(&format!("{WAL}.seg")).await.unwrap().is_some());
        s.secondary.set_down(false);
        assert_eq!(within(put).await.unwrap().unwrap(), PutOutcome::Created);
        // Returned only once the secondary held it.
        assert!(s.secondary.inner.head(&format!("{WAL}.seg")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn leases_stay_on_the_primary_and_a_retried_put_copies_the_primarys_bytes() {
        let s = setup().await;
        let store = replicated(&s, false, 1 << 20);
        store.put_if_absent("pg/1/lease/0000000000000001", Bytes::from_static(b"l")).await.unwrap();
        store.put_if_absent("running/backup.1.ab", Bytes::from_static(b"m")).await.unwrap();
        s.primary.put_if_absent("pg/1/cluster", Bytes::from_static(b"first")).await.unwrap();
        // A retry after a crash: the primary already has the name; what it holds is copied.
        assert_eq!(
            store.put_if_absent("pg/1/cluster", Bytes::from_static(b"second")).await.unwrap(),
            PutOutcome::AlreadyExists
        );
        within(store.drain(Duration::from_secs(30))).await;
        assert_eq!(names(s.secondary.as_ref()).await, vec!["pg/1/cluster".to_string(), MARKER.to_string()]);
        assert_eq!(&s.secondary.get("pg/1/cluster").await.unwrap()[..], b"first");
    }

    #[tokio::test]
    async fn backfill_copies_what_is_missing_never_deletes_and_refuses_another_repository() {
        let s = setup().await;
        for i in 0..5 {
            s.primary.put_if_absent(&format!("pg/1/blocks/aa/{i}"), Bytes::from(vec![i; 100])).await.unwrap();
        }
        s.primary.put_if_absent("pg/1/lease/0000000000000001", Bytes::from_static(b"l")).await.unwrap();
        // Something the primary lost: back-filling must not take it from the secondary too.
        s.secondary.inner.create_root().unwrap();
        s.secondary.inner.put_if_absent("pg/1/blocks/bb/lost", Bytes::from_static(b"x")).await.unwrap();
        let seen = Mutex::new(Vec::new());
        let first = backfill(s.primary.as_ref(), s.secondary.as_ref(), 2, &|d, t| seen.lock().unwrap().push((d, t)))
            .await
            .unwrap();
        assert!(first.marker_copied);
        assert_eq!((first.missing, first.copied_objects, first.copied_bytes, first.extra), (5, 5, 500, 1));
        assert_eq!(seen.lock().unwrap().last(), Some(&(5, 5)));
        let again = backfill(s.primary.as_ref(), s.secondary.as_ref(), 2, &|_, _| {}).await.unwrap();
        assert_eq!((again.marker_copied, again.missing, again.copied_objects), (false, 0, 0));
        assert!(s.secondary.inner.head("pg/1/blocks/bb/lost").await.unwrap().is_some());
        assert!(s.secondary.inner.head("pg/1/lease/0000000000000001").await.unwrap().is_none());

        let other = tempfile::tempdir().unwrap();
        let foreign = LocalStore::new(other.path());
        foreign.put_if_absent(MARKER, Bytes::from_static(b"another repository")).await.unwrap();
        let err = backfill(s.primary.as_ref(), &foreign, 2, &|_, _| {}).await.unwrap_err();
        assert!(matches!(err, CopyError::Foreign { .. }), "{err}");
        let store = ReplicatedStore::new(
            s.primary.clone(),
            vec![Secondary { name: "x".into(), store: Arc::new(foreign.clone()), required: true, queue_bytes: 100 }],
        );
        let err = within(store.put_if_absent("pg/1/y", Bytes::from_static(b"y"))).await.unwrap_err();
        assert!(err.to_string().contains("different pitr repository"), "{err}");
        assert_eq!(store.status()[0].state, CopyState::Refused);
        assert!(foreign.head("pg/1/y").await.unwrap().is_none());
    }
}
