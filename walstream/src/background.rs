//! Where the stream's work off the data-loss path runs: the change indexer and the compaction of
//! whole segments, on a thread of its own at a lower CPU priority.
//!
//! Neither decides what is durable: a chunk is durable before its segment is compacted, and the
//! index only describes WAL the archive holds. Both compete for the cores with the primary and
//! with the stream's own thread, whose every wake-up is on a commit's path. So they run on a
//! single-threaded runtime whose thread (and blocking threads, and the threads a seal spreads
//! over, which inherit it) has a nice value [`NICE`] above the sidecar's: the scheduler lets the
//! stream and the database go first, and the background work takes the cores they leave.
//!
//! Not here: the deletes of compacted chunks, which hold the chunk log's lock that the next
//! append waits for (at a lower priority, a preempted delete would hold up the stream).

use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::api::StreamError;

/// How much lower the background work's priority is than the sidecar's (nice is per thread on
/// Linux; 10 gives it about a tenth of a core's share against a busy thread of the default).
pub(crate) const NICE: i32 = 10;

/// The background thread and its runtime; stopped when dropped (tasks still running are
/// dropped: a compaction is redone from its chunks, an index object by the backfill).
pub(crate) struct Background {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl Background {
    /// Starts the thread.
    pub fn start() -> Result<Background, StreamError> {
        // The value to set, not an increment: a blocking thread started from the background
        // thread inherits its value already.
        let nice = (current_nice() + NICE).min(19);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("pitr-wal-bg")
            .on_thread_start(move || set_nice(nice))
            .build()
            .map_err(|e| StreamError::Fatal(format!("cannot start the WAL stream's background runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("pitr-wal-bg".into())
            .spawn(move || {
                set_nice(nice);
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // A seal under way on a blocking thread finishes there; nobody waits for it.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(|e| StreamError::Fatal(format!("cannot start the WAL stream's background thread: {e}")))?;
        Ok(Background { handle, stop: Some(stop) })
    }

    /// Where to spawn background work.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The calling thread's nice value (on Linux, nice is per thread: `who` 0 is the calling thread).
fn current_nice() -> i32 {
    // SAFETY: reads the calling thread's priority; no memory is passed. -1 is also a valid
    // value, and an error (none is possible for the calling thread) would read as -1 too.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Sets the calling thread's nice value to `nice` (never below what it is: only a lower
/// priority is asked for, which needs no privilege). A refusal (a seccomp profile) leaves it as
/// it was: the work is the same, only its priority.
fn set_nice(nice: i32) {
    if current_nice() >= nice {
        return;
    }
    // SAFETY: changes the calling thread's scheduling priority; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the background thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_work_and_its_blocking_threads_run_at_a_lower_priority() {
        let ours = current_nice();
        let bg = Background::start().unwrap();
        let (on_thread, on_blocking) = bg
            .handle()
            .spawn(async {
                let blocking = tokio::task::spawn_blocking(current_nice).await.unwrap();
                (current_nice(), blocking)
            })
            .await
            .unwrap();
        let want = (ours + NICE).min(19);
        assert_eq!((on_thread, on_blocking), (want, want));
        assert_eq!(current_nice(), ours, "the caller's priority is unchanged");
        drop(bg);
    }

    #[tokio::test]
    async fn work_spawned_after_a_stop_is_dropped_not_hung() {
        let bg = Background::start().unwrap();
        let handle = bg.handle().clone();
        drop(bg);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let joined = tokio::time::timeout(Duration::from_secs(5), handle.spawn(async { 1 })).await;
        assert!(matches!(joined, Ok(Err(ref e)) if e.is_cancelled()), "{joined:?}");
    }
}
