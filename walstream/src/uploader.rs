//! The pipeline's one owner, and the uploader that makes its puts.
//!
//! [`Shared`] holds the [`WalPipeline`] behind one mutex, taken only to hand WAL in or a job out
//! and to record what happened — never across a put — so receiving never waits on storage (until
//! the memory bound is reached). The receiver appends and asks what to report; the uploader task
//! ([`spawn`]) asks for the next step, does the put, says how it went, and publishes the
//! pipeline's generation so the receiver reports, and reads on, as soon as a put lands.
//!
//! Every put and delete first passes the writer lease's guard ([`LeaseGuard::check`]). A put
//! that finds the lease unconfirmed (a renewal failed, or the monotonic clock says it may have
//! expired) waits a moment for it and otherwise fails without touching storage, like a failed
//! put: counted, logged, shown as the last error and retried with the usual backoff. A lease lost
//! to another writer stops the uploader.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pitr_archive::lease::{LeaseError, LeaseGuard};
use pitr_archive::restore_points::RestorePoint;
use pitr_archive::{ObjectMeta, PutOutcome, Repository, RepositoryError, WalObject};
use tokio::sync::{watch, Notify};

use crate::api::StreamError;
use crate::pipeline::{Step, WalPipeline};

/// The pipeline, shared by the receiver and the uploader.
#[derive(Debug)]
pub(crate) struct Shared {
    pipeline: Mutex<WalPipeline>,
    /// Wakes the uploader: new WAL, a timeline switch, a stop.
    work: Notify,
}

impl Shared {
    pub fn new(pipeline: WalPipeline) -> Arc<Shared> {
        Arc::new(Shared { pipeline: Mutex::new(pipeline), work: Notify::new() })
    }

    /// Runs `f` on the pipeline. Keep `f` short: the other side waits for it.
    pub fn with<R>(&self, f: impl FnOnce(&mut WalPipeline) -> R) -> R {
        // A panic while holding the lock would already have ended the process's useful life; the
        // data itself (byte buffers and offsets) stays consistent, so keep going with it.
        let mut pipeline = self.pipeline.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut pipeline)
    }

    /// Tells the uploader something changed (new WAL, a timeline switch, a stop).
    pub fn wake_uploader(&self) {
        self.work.notify_one();
    }

    /// Tells the uploader to finish once everything received is durable.
    pub fn stop(&self) {
        self.with(WalPipeline::stop);
        self.wake_uploader();
    }
}

/// Starts the uploader. It ends when the pipeline is stopped and everything received is durable,
/// or on a put that can never succeed (another writer's object under the same name, a lease
/// lost to another writer). The
/// receiver's end of the returned channel changes after every put and when memory is freed, and
/// closes when the uploader ends.
/// Compactions run on `background` (see `background.rs`); the chunk puts on this task.
pub(crate) fn spawn(
    repo: Repository,
    guard: LeaseGuard,
    shared: Arc<Shared>,
    background: tokio::runtime::Handle,
) -> (tokio::task::JoinHandle<Result<(), StreamError>>, watch::Receiver<u64>) {
    let (progress, progress_rx) = watch::channel(shared.with(|p| p.generation()));
    let uploader = Uploader { repo, guard, shared, progress, background };
    (tokio::spawn(uploader.run()), progress_rx)
}

struct Uploader {
    repo: Repository,
    guard: LeaseGuard,
    shared: Arc<Shared>,
    progress: watch::Sender<u64>,
    /// Where compactions run: off the stream's thread, at a lower priority.
    background: tokio::runtime::Handle,
}

/// Why a fenced put did not happen or failed.
#[derive(Debug)]
enum PutError {
    /// The lease's guard stopped it: lost to another writer, or released.
    Fenced(LeaseError),
    /// Storage failed (the guard's listing or the put itself).
    Repository(RepositoryError),
    /// The lease stayed unconfirmed for [`LEASE_WAIT`], or its validity ended while the put was
    /// under way (the put was cancelled): retried like a failed put.
    Unconfirmed(&'static str),
    /// The lease's check failed otherwise (its generations changed under it while it read
    /// them): nothing was put; retried like a failed put.
    Unchecked(LeaseError),
    /// The task making the put was stopped before it said how the put went (the background
    /// runtime ended): retried like a failed put.
    Interrupted(&'static str),
}

/// How long a put waits for an unconfirmed lease before it counts as failed (and is retried).
const LEASE_WAIT: Duration = Duration::from_secs(1);

const NOT_CONFIRMED: &str = "the writer lease is not confirmed (its renewal failed or is late): nothing was put";
const RAN_OUT: &str =
    "the writer lease ran out while the put was under way (its renewals failed or are late): the put was cancelled";

type PutResult = Result<PutOutcome, PutError>;

/// A put through the lease's guard, cancelled if the lease's validity ends before it finishes;
/// also when the put itself started (after any wait for the lease), for the upload latency.
async fn fenced_put(
    repo: &Repository,
    guard: &LeaseGuard,
    name: &str,
    bytes: bytes::Bytes,
    meta: ObjectMeta,
) -> (Instant, PutResult) {
    match tokio::time::timeout(LEASE_WAIT, guard.confirmed()).await {
        Err(_) => return (Instant::now(), Err(PutError::Unconfirmed(NOT_CONFIRMED))),
        Ok(Err(e)) => return (Instant::now(), Err(PutError::Fenced(e))),
        Ok(Ok(())) => {}
    }
    let put = async {
        let started = Instant::now();
        (started, repo.put_sealed(name, bytes, meta).await)
    };
    match guard.fenced(put).await {
        Ok((started, result)) => (started, result.map_err(PutError::Repository)),
        Err(LeaseError::Repository(e)) => (Instant::now(), Err(PutError::Repository(e))),
        Err(e @ (LeaseError::Lost { .. } | LeaseError::Released { .. })) => (Instant::now(), Err(PutError::Fenced(e))),
        Err(LeaseError::Expired { .. }) => (Instant::now(), Err(PutError::Unconfirmed(RAN_OUT))),
        Err(e) => (Instant::now(), Err(PutError::Unchecked(e))),
    }
}

/// Whether an index entry's failed put may succeed when retried: the storage or the keys were
/// out of reach, or no key can seal (the WAL put needs one too). Not: the name holds another
/// entry, or an object that does not open, is not an entry, or the storage refuses the name.
fn index_error_may_pass(e: &RepositoryError) -> bool {
    match e {
        RepositoryError::Store(e) => !e.is_denied(),
        RepositoryError::KeyAccess(_) | RepositoryError::SealingKey { .. } => true,
        _ => false,
    }
}

/// A compaction running beside the chunk puts: its put id, and its task, which says how the put
/// went.
struct Compaction {
    id: u64,
    task: tokio::task::JoinHandle<(Instant, PutResult)>,
}

const COMPACTION_CANCELLED: &str = "the compaction's task was stopped before its put finished";

/// Waits for the compaction under way, if any (never returns while there is none).
async fn compaction_finished(compaction: &mut Option<Compaction>) -> (u64, Instant, PutResult) {
    let Some(c) = compaction.as_mut() else { return std::future::pending().await };
    let joined = (&mut c.task).await;
    let id = c.id;
    *compaction = None;
    match joined {
        Ok((started, result)) => (id, started, result),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the background runtime stopped under it. Recorded as a failed put, so the
        // pipeline offers the compaction again rather than wait for it for ever.
        Err(_) => (id, Instant::now(), Err(PutError::Interrupted(COMPACTION_CANCELLED))),
    }
}

impl Uploader {
    async fn run(self) -> Result<(), StreamError> {
        let layout = self.shared.with(|p| p.layout());
        let mut compaction: Option<Compaction> = None;
        loop {
            if compaction.is_none() {
                if let Some(put) = self.shared.with(|p| p.next_compaction(Instant::now())) {
                    // On the background runtime: a 16 MiB seal is CPU the primary and the chunk
                    // puts need more, and nothing waits for it to be durable.
                    let (repo, guard, name) = (self.repo.clone(), self.guard.clone(), layout.object_name(&put.object));
                    let task = self
                        .background
                        .spawn(async move { fenced_put(&repo, &guard, &name, put.bytes, put.meta).await });
                    compaction = Some(Compaction { id: put.id, task });
                }
            }
            let step = self.shared.with(|p| p.next_step(Instant::now()));
            self.report();
            let put = match step {
                Step::Put(put) => put,
                Step::Finished => return Ok(()),
                Step::Wait(until) => {
                    let until = [until, self.shared.with(|p| p.compaction_wake_at())].into_iter().flatten().min();
                    let until = until.map_or(Instant::now() + Duration::from_secs(3600), |t| {
                        t.max(Instant::now() + Duration::from_millis(1))
                    });
                    tokio::select! {
                        _ = self.shared.work.notified() => {}
                        _ = tokio::time::sleep_until(until.into()) => {}
                        (id, started, result) = compaction_finished(&mut compaction) => {
                            self.record(id, "wal_segment", started, result)?;
                        }
                    }
                    continue;
                }
            };
            let name = layout.object_name(&put.object);
            let kind = match put.object {
                WalObject::Segment { .. } => "wal_segment",
                _ => "wal_chunk",
            };
            let id = put.id;
            // The index entries first: the WAL object is put only once its restore points are
            // indexed, so a crash between the two never leaves one out (streamed again, the
            // same entry is found already there).
            if let Err((started, failed)) = self.index_restore_points(layout.system_id, &put.restore_points).await {
                self.record(id, kind, started, Err(failed))?;
                self.report();
                continue;
            }
            let main = fenced_put(&self.repo, &self.guard, &name, put.bytes, put.meta);
            tokio::pin!(main);
            let (started, result) = loop {
                tokio::select! {
                    result = &mut main => break result,
                    (id, started, result) = compaction_finished(&mut compaction) => {
                        self.record(id, "wal_segment", started, result)?;
                        self.report();
                    }
                }
            };
            self.record(id, kind, started, result)?;
            self.report();
        }
    }

    /// Puts the index entries of `points` through the lease's guard, like WAL. A failure that
    /// may pass (storage, keys out of reach, the lease) fails the WAL put they precede, retried
    /// with it; one that retrying cannot mend (the name taken by another entry, or by an object
    /// that does not open) is logged and counted, and the WAL goes on without that entry: the
    /// index is not worth stopping the WAL for (the primary's pg_wal would fill).
    async fn index_restore_points(&self, system_id: u64, points: &[RestorePoint]) -> Result<(), (Instant, PutError)> {
        for point in points {
            let name = point.object_name(system_id);
            let (started, result) =
                fenced_put(&self.repo, &self.guard, &name, point.to_text().into(), point.meta()).await;
            match result {
                Ok(PutOutcome::Created) => {
                    metrics::counter!("pitr_restore_points_indexed_total").increment(1);
                    tracing::info!(restore_point = %point.name, lsn = %pitr_pgformat::lsn::format_lsn(point.lsn),
                        timeline = point.timeline, "restore point indexed");
                }
                Ok(PutOutcome::AlreadyExists) => {}
                Err(PutError::Repository(e)) if !index_error_may_pass(&e) => {
                    metrics::counter!("pitr_restore_point_index_errors_total").increment(1);
                    tracing::error!(error = %e, object = %name, restore_point = %point.name,
                        "restore point not indexed (its place in the index is taken); the WAL goes on without it, \
                         and `pitr restore --to name:` refuses until the object is looked at and removed");
                }
                Err(e) => return Err((started, e)),
            }
        }
        Ok(())
    }

    /// Tells the pipeline how put `id` (started at `started`) went; an error only for a put
    /// that can never succeed (or must never be made: the lease is lost).
    fn record(&self, id: u64, kind: &'static str, started: Instant, result: PutResult) -> Result<(), StreamError> {
        match result {
            Ok(_) => {
                metrics::histogram!("pitr_upload_duration_seconds").record(started.elapsed().as_secs_f64());
                match self.shared.with(|p| p.put_done(id, Instant::now())) {
                    Ok(done) => {
                        metrics::counter!("pitr_objects_archived_total").increment(1);
                        metrics::counter!("pitr_bytes_archived_total", "kind" => kind).increment(done.bytes);
                        if !done.obsolete.is_empty() {
                            self.delete_in_background(&done.obsolete);
                        }
                    }
                    // Only this task reports puts: a pipeline bug if it happens.
                    Err(e) => tracing::warn!(error = %e, "a put finished out of turn"),
                }
                Ok(())
            }
            Err(PutError::Fenced(e)) => Err(e.into()),
            Err(PutError::Repository(e @ RepositoryError::Conflict { .. })) => Err(e.into()),
            Err(PutError::Unconfirmed(why)) => self.retry_later(id, why.to_string()),
            Err(PutError::Unchecked(e)) => self.retry_later(id, e.to_string()),
            Err(PutError::Interrupted(why)) => self.retry_later(id, why.to_string()),
            Err(PutError::Repository(e)) => self.retry_later(id, e.to_string()),
        }
    }

    /// A put that failed but may succeed later: the pipeline retries it after its backoff.
    fn retry_later(&self, id: u64, why: String) -> Result<(), StreamError> {
        let retry_in = self.shared.with(|p| p.put_failed(id, why.clone(), Instant::now()));
        tracing::warn!(error = %why, retry_in = ?retry_in.unwrap_or_default(),
            "archive put failed; retrying (the primary keeps the WAL in the slot)");
        metrics::counter!("pitr_upload_errors_total").increment(1);
        Ok(())
    }

    /// The segment object now holds everything; its chunks are redundant. They go in the
    /// background so the next put does not wait; a failed delete leaves a redundant chunk that
    /// the next start-up removes.
    fn delete_in_background(&self, chunks: &[WalObject]) {
        let layout = self.shared.with(|p| p.layout());
        let names: Vec<String> = chunks.iter().map(|c| layout.object_name(c)).collect();
        let (repo, guard) = (self.repo.clone(), self.guard.clone());
        // On the stream's runtime, not the background one: a delete holds the chunk log's lock,
        // which the next append waits for.
        tokio::spawn(async move {
            // A delete is a write too: none after the lease is lost or ran out.
            match guard.fenced(repo.delete_many(&names)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, chunks = names.len(), "could not delete compacted chunks"),
                Err(e) => tracing::warn!(error = %e, chunks = names.len(), "compacted chunks left in place"),
            }
        });
    }

    fn report(&self) {
        let generation = self.shared.with(|p| p.generation());
        self.progress.send_if_modified(|g| std::mem::replace(g, generation) != generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::lease::Lease;
    use pitr_archive::names::pg;
    use pitr_archive::{KeyRing, LocalStore, ObjectKind, WalLayout};

    const SEG: u64 = 1 << 20;
    const SYSTEM_ID: u64 = 7;

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::new(Arc::new(LocalStore::new(dir)), KeyRing::from_key("k", [3; 32]))
    }

    /// A pipeline at the start of segment 1 holding 8 KiB of WAL, ready to put.
    fn pipeline_with_wal() -> Arc<Shared> {
        let layout = WalLayout { system_id: SYSTEM_ID, segment_size: SEG };
        let shared = Shared::new(WalPipeline::fresh(layout, Duration::ZERO, 1, SEG));
        shared.with(|p| p.append(SEG, &[7u8; 8192], &[], Instant::now())).unwrap();
        shared
    }

    async fn wal_objects(repo: &Repository) -> Vec<String> {
        let wal = format!("{}wal/", pg::lease_prefix(SYSTEM_ID).trim_end_matches("lease/"));
        repo.list(&wal).await.unwrap().into_iter().map(|o| o.name).collect()
    }

    #[tokio::test]
    async fn a_writer_paused_past_its_ttl_and_taken_over_puts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let ttl = Duration::from_millis(300);
        let a = Lease::acquire(&repo, SYSTEM_ID, "a", ttl).await.unwrap();
        let guard = a.guard();
        // A is "paused": no renewal while B waits out the TTL and takes over.
        tokio::time::sleep(ttl + Duration::from_millis(20)).await;
        let _b = Lease::acquire(&repo, SYSTEM_ID, "b", ttl).await.unwrap();
        // A resumes: its keeper, and WAL to put.
        let (lost_tx, mut lost) = watch::channel(None);
        let (_release, release_rx) = watch::channel(false);
        let keeper = tokio::spawn(crate::session::keep_lease(a, ttl, lost_tx, release_rx));
        let (task, _progress) = spawn(repo.clone(), guard, pipeline_with_wal(), tokio::runtime::Handle::current());
        let result = tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        assert!(
            matches!(result, Err(StreamError::Lease(LeaseError::Lost { ref holder, .. })) if holder == "b"),
            "{result:?}"
        );
        assert_eq!(wal_objects(&repo).await, Vec::<String>::new());
        lost.wait_for(Option::is_some).await.unwrap();
        keeper.await.unwrap();
    }

    #[tokio::test]
    async fn a_put_under_way_when_the_lease_runs_out_lands_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // WAL puts take 1.5 s to reach storage (a slow link, retries).
        let repo = crate::test_store::delayed(dir.path(), [3; 32], |request, name, _| {
            let wal = request == crate::test_store::Request::Put && name.contains("/wal/");
            if wal {
                Duration::from_millis(1500)
            } else {
                Duration::ZERO
            }
        });
        let ttl = Duration::from_millis(400);
        let a = Lease::acquire(&repo, SYSTEM_ID, "a", ttl).await.unwrap();
        // A cannot renew (no keeper: cut off from storage) while its first put is on its way.
        let (task, _progress) = spawn(repo.clone(), a.guard(), pipeline_with_wal(), tokio::runtime::Handle::current());
        tokio::time::sleep(ttl + Duration::from_millis(20)).await;
        let _b = Lease::acquire(&repo, SYSTEM_ID, "b", ttl).await.unwrap();
        // Well past when A's put would have landed.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(wal_objects(&repo).await, Vec::<String>::new());
        task.abort();
    }

    #[tokio::test]
    async fn a_newer_generation_in_storage_stops_the_next_put_even_within_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let a = Lease::acquire(&repo, SYSTEM_ID, "a", Duration::from_secs(60)).await.unwrap();
        // A writer that did not wait for the lease to expire (by hand, or an older pitr).
        let rival = format!("holder=rogue\npid=1\nexpires_us={}\n", pitr_archive::now_us() + 60_000_000);
        repo.put_sealed(&pg::lease(SYSTEM_ID, 99), rival.into_bytes(), ObjectMeta::plain(ObjectKind::Meta))
            .await
            .unwrap();
        let (task, _progress) = spawn(repo.clone(), a.guard(), pipeline_with_wal(), tokio::runtime::Handle::current());
        let result = tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        assert!(
            matches!(result, Err(StreamError::Lease(LeaseError::Lost { ref holder, .. })) if holder == "rogue"),
            "{result:?}"
        );
        assert_eq!(wal_objects(&repo).await, Vec::<String>::new());
    }

    /// A repository whose puts of objects with `part` in their name hang (an hour) while the
    /// returned flag is set: storage cut off for them.
    fn hanging_puts(
        dir: &std::path::Path,
        part: &'static str,
        hang_now: bool,
    ) -> (Repository, Arc<std::sync::atomic::AtomicBool>) {
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(hang_now));
        let repo = crate::test_store::delayed(dir, [3; 32], {
            let hang = hang.clone();
            move |request, name, _| {
                let held = request == crate::test_store::Request::Put && name.contains(part);
                if held && hang.load(std::sync::atomic::Ordering::SeqCst) {
                    Duration::from_secs(3600)
                } else {
                    Duration::ZERO
                }
            }
        });
        (repo, hang)
    }

    #[tokio::test]
    async fn a_failed_renewal_holds_puts_until_a_renewal_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        // Lease puts hang while `hang` is set (storage cut off).
        let (repo, hang) = hanging_puts(dir.path(), "/lease/", false);
        let mut a = Lease::acquire(&repo, SYSTEM_ID, "a", Duration::from_secs(60)).await.unwrap();
        hang.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(a.renew_within(Duration::from_millis(50)).await.is_err(), "a renewal that hangs fails");
        hang.store(false, std::sync::atomic::Ordering::SeqCst);
        let shared = pipeline_with_wal();
        let (_task, mut progress) = spawn(repo.clone(), a.guard(), shared.clone(), tokio::runtime::Handle::current());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(wal_objects(&repo).await, Vec::<String>::new(), "a put went out on an unconfirmed lease");
        assert!(!shared.with(|p| p.all_durable()));
        a.renew().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), progress.wait_for(|_| shared.with(|p| p.all_durable())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(wal_objects(&repo).await.len(), 1);
    }

    /// A restore point's index entry is put before the WAL object that holds it: with the WAL put
    /// hanging (storage slow, then the sidecar killed), the entry is there and the WAL not; the
    /// WAL streamed again after a restart puts the same entry again, which is no conflict.
    #[tokio::test]
    async fn a_restore_points_entry_goes_before_its_wal_and_again_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, hang) = hanging_puts(dir.path(), "/wal/", true);
        let point =
            RestorePoint { name: "before-cleanup".into(), timeline: 1, lsn: SEG + 40, end_lsn: SEG + 144, time_us: 5 };
        let with_point = || {
            let shared = pipeline_with_wal();
            shared.with(|p| p.note_restore_points(std::slice::from_ref(&point)));
            shared
        };
        let lease = Lease::acquire(&repo, SYSTEM_ID, "a", Duration::from_secs(60)).await.unwrap();
        let (task, _progress) = spawn(repo.clone(), lease.guard(), with_point(), tokio::runtime::Handle::current());
        let indexed = async {
            while pitr_archive::restore_points::load(&repo, SYSTEM_ID, false).await.points.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), indexed).await.expect("the entry is put");
        assert_eq!(wal_objects(&repo).await, Vec::<String>::new(), "the WAL put hangs");
        task.abort();

        hang.store(false, std::sync::atomic::Ordering::SeqCst);
        let shared = with_point();
        let (_task, mut progress) =
            spawn(repo.clone(), lease.guard(), shared.clone(), tokio::runtime::Handle::current());
        tokio::time::timeout(Duration::from_secs(10), progress.wait_for(|_| shared.with(|p| p.all_durable())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(wal_objects(&repo).await.len(), 1);
        assert_eq!(pitr_archive::restore_points::load(&repo, SYSTEM_ID, false).await.points, vec![point]);
        assert_eq!(shared.with(|p| p.stats().errors), 0, "the second put of the entry is no error");
    }

    /// An object that does not open at a restore point's place in the index (planted, damaged)
    /// does not hold up the WAL: the put goes on, counted as an index error, not as a failed put.
    #[tokio::test]
    async fn a_planted_object_at_a_restore_points_place_does_not_stop_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let point =
            RestorePoint { name: "before-cleanup".into(), timeline: 1, lsn: SEG + 40, end_lsn: SEG + 144, time_us: 5 };
        let planted = point.object_name(SYSTEM_ID);
        repo.store().put_if_absent(&planted, bytes::Bytes::from_static(b"PITRjunk")).await.unwrap();
        let shared = pipeline_with_wal();
        shared.with(|p| p.note_restore_points(std::slice::from_ref(&point)));
        let lease = Lease::acquire(&repo, SYSTEM_ID, "a", Duration::from_secs(60)).await.unwrap();
        let (_task, mut progress) =
            spawn(repo.clone(), lease.guard(), shared.clone(), tokio::runtime::Handle::current());
        tokio::time::timeout(Duration::from_secs(10), progress.wait_for(|_| shared.with(|p| p.all_durable())))
            .await
            .expect("the WAL is put despite the planted entry")
            .unwrap();
        assert_eq!(wal_objects(&repo).await.len(), 1);
        assert_eq!(shared.with(|p| p.stats().errors), 0, "not a failed put, retried forever");
        let index = pitr_archive::restore_points::load(&repo, SYSTEM_ID, false).await;
        assert_eq!((index.points.len(), index.problems.len()), (0, 1), "{index:?}");
        assert_eq!(index.problems[0].object, planted);
    }

    /// A compaction whose background runtime stopped under it is a failed put, retried with the
    /// usual backoff: the uploader neither hangs on it nor stops, the chunks that hold the
    /// segment stay, and no segment object is written.
    #[tokio::test]
    async fn a_compaction_cancelled_with_its_runtime_is_retried_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let lease = Lease::acquire(&repo, SYSTEM_ID, "a", Duration::from_secs(60)).await.unwrap();
        let stopped = crate::background::Background::start().unwrap();
        let dead = stopped.handle().clone();
        drop(stopped);
        let shared = pipeline_with_wal();
        let (task, mut progress) = spawn(repo.clone(), lease.guard(), shared.clone(), dead);
        tokio::time::timeout(Duration::from_secs(10), progress.wait_for(|_| shared.with(|p| p.all_durable())))
            .await
            .unwrap()
            .unwrap();
        // The first 8 KiB are a chunk; now the rest of segment 1 and a little of segment 2:
        // segment 1 is whole, held as chunks, to be compacted.
        shared.with(|p| p.append(SEG + 8192, &vec![7u8; SEG as usize - 8192 + 100], &[], Instant::now())).unwrap();
        shared.wake_uploader();
        // Two failures: the first and its retry.
        tokio::time::timeout(Duration::from_secs(20), progress.wait_for(|_| shared.with(|p| p.stats().errors >= 2)))
            .await
            .expect("the cancelled compaction was not retried")
            .unwrap();
        assert!(!task.is_finished(), "the uploader stopped");
        let stats = shared.with(|p| p.stats().clone());
        assert!(stats.last_error.as_deref().is_some_and(|e| e.contains("compaction's task was stopped")), "{stats:?}");
        assert!(shared.with(|p| p.all_durable()), "the chunks were put");
        let objects = wal_objects(&repo).await;
        assert!(!objects.is_empty() && objects.iter().all(|o| o.ends_with(".chunk")), "{objects:?}");
        task.abort();
    }
}
