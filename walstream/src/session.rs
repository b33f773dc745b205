//! What lives across reconnects: the pipeline and its uploader, the writer lease, the record
//! decoder, completeness claims and marks — opened once, on the first connection (cluster
//! description, lease, resume from the archive), and what the receiver publishes from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pitr_archive::complete::CompleteMark;
use pitr_archive::lease::{Lease, LeaseError, LeaseGuard};
use pitr_archive::restore_points::{self, RestorePoint};
use pitr_archive::{now_us, ClusterInfo, Repository, WalLayout};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgformat::walreader::WalDecoder;
use pitr_pgwire::connection::Connection;
use pitr_pgwire::PgError;
use tokio::sync::watch;

use crate::api::{FlushInterval, StreamConfig, StreamError, StreamStatus};
use crate::indexer::Indexer;
use crate::marks::{write_marks, Tracker};
use crate::pipeline::{Switch, WalPipeline};
use crate::resume;
use crate::sync_standby;
use crate::uploader::{self, Shared};

/// State that lives across reconnects.
pub(crate) struct Session {
    pub layout: WalLayout,
    /// The position, the buffers and the durable end: shared with the uploader.
    pub pipeline: Arc<Shared>,
    pub uploader: tokio::task::JoinHandle<Result<(), StreamError>>,
    /// Changes after every put and when memory is freed; closes when the uploader ends.
    pub progress: watch::Receiver<u64>,
    /// Finds commit records (and their times) in the WAL received.
    pub decoder: WalDecoder,
    pub primary_lsn: u64,
    /// Set by the lease keeper if another writer took the cluster over.
    pub lease_lost: watch::Receiver<Option<String>>,
    /// What every write for the cluster passes first: the lease confirmed, not taken over.
    pub guard: LeaseGuard,
    /// Tells the lease keeper to release the lease and end.
    pub release_lease: watch::Sender<bool>,
    pub lease_keeper: tokio::task::JoinHandle<()>,
    /// Claims of completeness read off the stream, until durable.
    pub tracker: Tracker,
    /// The connected server's timeline: while we stream an older one (its history), the
    /// server's messages say nothing about what it has now, so nothing is claimed.
    pub server_timeline: u32,
    /// Hands durable claims to the mark writer (`None`: marks are off).
    pub marks: Option<watch::Sender<Option<CompleteMark>>>,
    /// The newest mark recorded.
    pub marks_recorded: watch::Receiver<Option<CompleteMark>>,
    /// Tasks that only save work (compacting segments left as chunks, writing marks): stopped
    /// with the session, whatever they were doing.
    pub background: Vec<tokio::task::JoinHandle<()>>,
    /// The change indexer (`None`: indexing is off).
    pub indexer: Option<Indexer>,
    /// Under `flush_interval = "auto"`: whether the primary waits for us, as last read.
    pub synchronous: watch::Receiver<Option<bool>>,
}

impl Session {
    pub fn stop_background(&self) {
        for task in &self.background {
            task.abort();
        }
        if let Some(indexer) = &self.indexer {
            indexer.stop();
        }
    }

    /// The timeline streamed.
    pub fn timeline(&self) -> u32 {
        self.pipeline.with(|p| p.timeline())
    }

    /// The position to report to the primary as written and flushed.
    pub fn reportable(&self) -> u64 {
        self.pipeline.with(|p| p.reportable())
    }

    /// After the pipeline moved to another timeline: the stream's claims and the record
    /// decoder's state belong to the old one.
    pub fn switched(&mut self, switch: Switch) {
        self.tracker.timeline_ended();
        self.pipeline.wake_uploader();
        tracing::info!(from = switch.from, to = switch.to, at = %format_lsn(switch.start), "following timeline switch");
        self.decoder.reset();
    }
}

/// Takes the cluster's writer lease, before anything is created on the server or written for the
/// cluster: a sidecar the lease refuses must leave no replication slot behind to hold WAL on the
/// primary.
pub(crate) async fn take_lease(repo: &Repository, cfg: &StreamConfig, system_id: u64) -> Result<Lease, StreamError> {
    Ok(Lease::acquire(repo, system_id, &cfg.lease_holder, cfg.lease_ttl).await?)
}

/// Reads the cluster's description, builds the WAL catalog and decides where streaming resumes,
/// holding `lease`.
pub(crate) async fn open_session(
    repo: &Repository,
    cfg: &StreamConfig,
    background_rt: &tokio::runtime::Handle,
    conn: &mut Connection,
    ident: &pitr_pgwire::SystemIdentity,
    slot_created_at: Option<u64>,
    lease: Lease,
) -> Result<Session, StreamError> {
    let settings = conn.server_settings().await?;
    let (segment_size, page_size) = (settings.wal_segment_size, settings.wal_page_size);
    let info = ClusterInfo {
        system_id: ident.system_id,
        wal_segment_size: segment_size,
        wal_page_size: page_size,
        server_version_num: settings.server_version_num,
    };
    let guard = lease.guard();
    let (lease_lost_tx, lease_lost) = watch::channel(None);
    let (release_lease, release_rx) = watch::channel(false);
    let lease_keeper = tokio::spawn(keep_lease(lease, cfg.lease_ttl, lease_lost_tx, release_rx));
    // The connection may have taken long: the lease is checked again before the first write.
    guard.fenced(repo.put_cluster_info(&info)).await??;
    let layout = WalLayout::new(&info);
    let (plan, partial, catalog) = resume::prepare(repo, &guard, layout).await?;

    let mut decoder = WalDecoder::new(segment_size, page_size);
    // Under `auto`, 0 until the watcher has read the primary's setting.
    let first_spacing = sync_standby::spacing(cfg.flush_interval, None);
    let pipeline = match plan.start {
        Some((timeline, end)) => {
            // Resume from the archive's end. A partial segment's chunks come back into memory so
            // that it can be compacted into a whole segment when it completes.
            if let Some(buf) = &partial {
                let start = layout.segment_start(buf.segno) + u64::from(buf.base);
                let mut found = Vec::new();
                decoder.feed_all(start, &buf.data, &mut Vec::new(), &mut found);
                reindex(repo, &guard, ident.system_id, &crate::receiver::restore_points(buf.timeline, &found)).await;
            }
            tracing::info!(timeline, end = %format_lsn(end), "resuming from the end of the archive");
            WalPipeline::resume(layout, first_spacing, timeline, end, partial)
        }
        None => {
            let slot_lsn = match conn.read_replication_slot(&cfg.slot).await {
                Ok(Some((kind, lsn))) if kind == "physical" => lsn.or(slot_created_at),
                Ok(Some((kind, _))) => {
                    return Err(StreamError::Fatal(format!(
                        "replication slot {:?} is a {kind} slot; pitr needs a physical one",
                        cfg.slot
                    )))
                }
                Ok(None) => None,
                // READ_REPLICATION_SLOT is PostgreSQL 15+; older servers start where the slot was
                // created, or from the current position.
                Err(PgError::Server { .. }) => slot_created_at.filter(|l| *l != 0),
                Err(e) => return Err(e.into()),
            };
            let from = slot_lsn.unwrap_or(ident.xlog_pos);
            let pipeline = WalPipeline::fresh(layout, first_spacing, ident.timeline, from);
            tracing::info!(timeline = ident.timeline, start = %format_lsn(pipeline.received()), "empty archive: starting at the segment the slot holds");
            pipeline
        }
    };
    let pipeline = Shared::new(pipeline);
    let (uploader, progress) = uploader::spawn(repo.clone(), guard.clone(), pipeline.clone(), background_rt.clone());
    let mut background = Vec::new();
    if !plan.orphans.is_empty() {
        tracing::info!(
            segments = plan.orphans.len(),
            "segments held entirely as chunks: compacting them in the background"
        );
        background.push(background_rt.spawn(resume::compact_orphans(
            repo.clone(),
            guard.clone(),
            layout,
            plan.orphans,
        )));
    }
    let (synchronous_tx, synchronous) = watch::channel(None);
    if let FlushInterval::Auto { .. } = cfg.flush_interval {
        let watcher = sync_standby::Watcher {
            conninfo: cfg.conninfo.clone(),
            application_name: cfg.conninfo.application_name_or(&cfg.application_name),
            flush_interval: cfg.flush_interval,
            pipeline: pipeline.clone(),
            synchronous: synchronous_tx,
        };
        background.push(background_rt.spawn(watcher.run()));
    }
    let (recorded_tx, marks_recorded) = watch::channel(None);
    let marks = if cfg.complete_interval.is_zero() {
        None
    } else {
        let (tx, rx) = watch::channel(None);
        let writer = write_marks(repo.clone(), guard.clone(), ident.system_id, cfg.complete_interval, rx, recorded_tx);
        background.push(tokio::spawn(writer));
        Some(tx)
    };
    let indexer = cfg.index.enabled.then(|| {
        let (repo, guard) = (repo.clone(), guard.clone());
        Indexer::spawn(
            background_rt,
            repo,
            guard,
            info.clone(),
            pipeline.clone(),
            progress.clone(),
            catalog,
            &cfg.index,
        )
    });
    Ok(Session {
        indexer,
        layout,
        pipeline,
        uploader,
        progress,
        decoder,
        primary_lsn: 0,
        lease_lost,
        guard,
        release_lease,
        lease_keeper,
        tracker: Tracker::default(),
        server_timeline: ident.timeline,
        marks,
        marks_recorded,
        background,
        synchronous,
    })
}

/// Puts (again) the index entries of the restore points in WAL the archive holds already (the
/// partial segment read back at start-up): they are normally there, put before that WAL; this
/// covers WAL archived by a pitr that did not index restore points. Found there already, an
/// entry costs a read; a failure only leaves that restore point out of the index.
async fn reindex(repo: &Repository, guard: &LeaseGuard, system_id: u64, points: &[RestorePoint]) {
    for point in points {
        match guard.fenced(restore_points::record(repo, system_id, point)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, restore_point = %point.name, "restore point not indexed"),
            Err(e) => tracing::warn!(error = %e, restore_point = %point.name, "restore point not indexed"),
        }
    }
}

/// The message `pitr status` shows while the lease is unconfirmed.
const LEASE_UNCONFIRMED: &str =
    "the writer lease could not be renewed: WAL puts are paused until it is (the primary keeps the WAL in the slot)";

/// Renews the writer lease every third of its lifetime (counted from the start of the put that
/// created its newest generation, which is where its validity starts), and at once when a put
/// finds it unconfirmed; reports a takeover; releases on request. A failed renewal (an error, or
/// longer than a third of the TTL) leaves the lease unconfirmed, which pauses every put, and is
/// retried sooner. Older generations are deleted beside the renewals, never holding one up.
pub(crate) async fn keep_lease(
    mut lease: Lease,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
    mut release: watch::Receiver<bool>,
) {
    let guard = lease.guard();
    let retry = (ttl / 10).max(Duration::from_millis(200));
    let mut failing = false;
    metrics::gauge!("pitr_lease_confirmed").set(1.0);
    loop {
        let due = if failing { Instant::now() + retry } else { lease.renewal_due() };
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            // After a failure, the retry spacing holds even when puts ask.
            _ = guard.renewal_requested(), if !failing => {}
            _ = release.changed() => {
                if let Err(e) = lease.release().await {
                    tracing::warn!(error = %e, "could not release the writer lease; it will expire");
                }
                return;
            }
        }
        match lease.renew_within(ttl / 3).await {
            Ok(()) => {
                if failing {
                    tracing::info!("writer lease renewed again; WAL puts resume");
                }
                failing = false;
                metrics::gauge!("pitr_lease_confirmed").set(1.0);
                tokio::spawn(tokio::time::timeout(ttl / 3, lease.tidy()));
            }
            Err(e @ LeaseError::Lost { .. }) => {
                tracing::error!(error = %e, "the writer lease was taken over; no more WAL is written");
                metrics::gauge!("pitr_lease_confirmed").set(0.0);
                let _ = lost.send(Some(e.to_string()));
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry,
                    "could not renew the writer lease: WAL puts are paused until a renewal succeeds");
                failing = true;
                metrics::gauge!("pitr_lease_confirmed").set(0.0);
            }
        }
    }
}

pub(crate) async fn uploader_failure(s: &mut Session) -> StreamError {
    match (&mut s.uploader).await {
        Ok(Err(e)) => e,
        Ok(Ok(())) => StreamError::Fatal("the uploader stopped unexpectedly".into()),
        Err(e) => StreamError::Fatal(format!("the uploader task failed: {e}")),
    }
}

/// Hands the newest claim the archive now holds to the mark writer (which writes it when its
/// interval allows; never waited for here).
pub(crate) fn offer_mark(s: &mut Session) {
    let durable = s.pipeline.with(|p| p.durable());
    if let Some(mark) = s.tracker.take_durable(durable) {
        if let Some(marks) = &s.marks {
            marks.send_replace(Some(mark));
        }
    }
}

pub(crate) fn publish(s: &Session, status: &watch::Sender<StreamStatus>, connected: bool) {
    let now = Instant::now();
    let (timeline, received, d, lag, stats, spacing) = s
        .pipeline
        .with(|p| (p.timeline(), p.received(), p.durable(), p.lag(now), p.stats().clone(), p.flush_interval()));
    let synchronous = *s.synchronous.borrow();
    let complete = *s.marks_recorded.borrow();
    status.send_modify(|st| {
        st.connected = connected;
        st.timeline = timeline;
        st.received_lsn = received;
        st.durable_lsn = d.lsn;
        st.primary_lsn = s.primary_lsn.max(received);
        st.lag_bytes = st.primary_lsn.saturating_sub(d.lsn);
        st.lag_seconds = lag.as_secs_f64();
        if d.last_commit_us.is_some() {
            st.last_commit_time_us = d.last_commit_us;
        }
        if let Some(mark) = complete {
            st.complete_up_to_us = Some(mark.server_time_us);
        }
        st.objects_archived = stats.objects;
        st.bytes_archived = stats.bytes;
        st.upload_errors = stats.errors;
        st.flush_interval_seconds = spacing.as_secs_f64();
        st.synchronous_standby = synchronous;
        if stats.last_error.is_some() {
            st.last_error = stats.last_error.clone();
        }
        if !s.guard.is_confirmed() {
            st.last_error = Some(LEASE_UNCONFIRMED.into());
        } else if st.last_error.as_deref() == Some(LEASE_UNCONFIRMED) {
            st.last_error = None;
        }
        st.updated_at_us = now_us();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_store::{delayed, Request};

    #[tokio::test]
    async fn renewals_counted_from_the_validitys_start_leave_no_gap_on_slow_storage() {
        let ttl = Duration::from_secs(2);
        let slow = ttl / 4;
        let dir = tempfile::tempdir().unwrap();
        // Renewals alternate: one whose put is slow (it ends late), then one whose listing is slow
        // (its put, where the validity starts, begins late). Each stays within a third of the TTL.
        let repo = delayed(dir.path(), [4; 32], move |request, name, lease_puts| {
            let lease = name.contains("/lease/");
            match request {
                Request::List if lease && lease_puts % 2 == 1 => slow,
                Request::Put if lease && lease_puts % 2 == 0 => slow,
                _ => Duration::ZERO,
            }
        });
        let lease = Lease::acquire(&repo, 3, "a", ttl).await.unwrap();
        let guard = lease.guard();
        let (lost_tx, _lost) = watch::channel(None);
        let (release_tx, release_rx) = watch::channel(false);
        let keeper = tokio::spawn(keep_lease(lease, ttl, lost_tx, release_rx));
        let started = Instant::now();
        let mut gaps = Vec::new();
        while started.elapsed() < ttl * 5 / 2 {
            if !guard.is_confirmed() {
                gaps.push(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        release_tx.send(true).unwrap();
        keeper.await.unwrap();
        assert!(gaps.is_empty(), "the lease was unconfirmed at {gaps:?}");
    }
}
