//! The pipeline's one owner, and the uploader that makes its puts.
//!
//! [`Shared`] holds the [`WalPipeline`] behind one mutex, taken only to hand WAL in or a job out
//! and to record what happened — never across a put — so receiving never waits on storage (until
//! the memory bound is reached). The receiver appends and asks what to report; the uploader task
//! ([`spawn`]) asks for the next step, does the put, says how it went, and publishes the
//! pipeline's generation so the receiver reports, and reads on, as soon as a put lands.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pitr_archive::{PutOutcome, Repository, RepositoryError, WalObject};
use tokio::sync::{watch, Notify};

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
/// or on a put that can never succeed (another writer's object under the same name). The
/// receiver's end of the returned channel changes after every put and when memory is freed, and
/// closes when the uploader ends.
pub(crate) fn spawn(
    repo: Repository,
    shared: Arc<Shared>,
) -> (tokio::task::JoinHandle<Result<(), RepositoryError>>, watch::Receiver<u64>) {
    let (progress, progress_rx) = watch::channel(shared.with(|p| p.generation()));
    let uploader = Uploader { repo, shared, progress };
    (tokio::spawn(uploader.run()), progress_rx)
}

struct Uploader {
    repo: Repository,
    shared: Arc<Shared>,
    progress: watch::Sender<u64>,
}

/// A compaction running beside the chunk puts: its put id and how its put went.
type Compaction = tokio::task::JoinHandle<(u64, Instant, Result<PutOutcome, RepositoryError>)>;

/// Waits for the compaction under way, if any (never returns while there is none).
async fn compaction_finished(task: &mut Option<Compaction>) -> (u64, Instant, Result<PutOutcome, RepositoryError>) {
    let Some(handle) = task.as_mut() else { return std::future::pending().await };
    let joined = handle.await;
    *task = None;
    match joined {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled only by a runtime shutting down, which polls nothing after.
        Err(_) => std::future::pending().await,
    }
}

impl Uploader {
    async fn run(self) -> Result<(), RepositoryError> {
        let layout = self.shared.with(|p| p.layout());
        let mut compaction: Option<Compaction> = None;
        loop {
            if compaction.is_none() {
                if let Some(put) = self.shared.with(|p| p.next_compaction(Instant::now())) {
                    // Its own task: a local put runs in place and would hold up the chunk puts.
                    let (repo, name) = (self.repo.clone(), layout.object_name(&put.object));
                    compaction = Some(tokio::spawn(async move {
                        let started = Instant::now();
                        (put.id, started, repo.put_sealed(&name, put.bytes, put.meta).await)
                    }));
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
            let (id, started) = (put.id, Instant::now());
            let main = self.repo.put_sealed(&name, put.bytes, put.meta);
            tokio::pin!(main);
            let result = loop {
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

    /// Tells the pipeline how put `id` (started at `started`) went; an error only for a put
    /// that can never succeed.
    fn record(
        &self,
        id: u64,
        kind: &'static str,
        started: Instant,
        result: Result<PutOutcome, RepositoryError>,
    ) -> Result<(), RepositoryError> {
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
            Err(e @ RepositoryError::Conflict { .. }) => Err(e),
            Err(e) => {
                let retry_in = self.shared.with(|p| p.put_failed(id, e.to_string(), Instant::now()));
                tracing::warn!(error = %e, retry_in = ?retry_in.unwrap_or_default(),
                    "archive put failed; retrying (the primary keeps the WAL in the slot)");
                metrics::counter!("pitr_upload_errors_total").increment(1);
                Ok(())
            }
        }
    }

    /// The segment object now holds everything; its chunks are redundant. They go in the
    /// background so the next put does not wait; a failed delete leaves a redundant chunk that
    /// the next start-up removes.
    fn delete_in_background(&self, chunks: &[WalObject]) {
        let layout = self.shared.with(|p| p.layout());
        let names: Vec<String> = chunks.iter().map(|c| layout.object_name(c)).collect();
        let repo = self.repo.clone();
        tokio::spawn(async move {
            if let Err(e) = repo.delete_many(&names).await {
                tracing::warn!(error = %e, chunks = names.len(), "could not delete compacted chunks");
            }
        });
    }

    fn report(&self) {
        let generation = self.shared.with(|p| p.generation());
        self.progress.send_if_modified(|g| std::mem::replace(g, generation) != generation);
    }
}
