//! What the running sidecar shows: the Prometheus `/metrics` and `/healthz` server, every metric
//! pitr exports (described here, set here or by the scheduler through the `record_*` functions),
//! the gauges fed from the receiver's status and the repository's catalogs, and the status file
//! `pitr status` reads.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pitr_archive::backup::BackupManifest;
use pitr_archive::replicate::ReplicatedStore;
use pitr_archive::Repository;
use pitr_walstream::StreamStatus;
use tokio::sync::watch;

use crate::config::Config;
use crate::open;

/// Installs the global metrics recorder and describes every metric pitr exports.
pub fn install_metrics() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("pitr_upload_duration_seconds".into()),
            &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_gauge!("backup_success", "1 if the last scheduled backup of this type succeeded, 0 if it failed");
    describe_gauge!("backup_size_bytes", Unit::Bytes, "Logical size (bytes read from the server) of the newest backup");
    describe_gauge!(
        "pitr_last_backup_timestamp_seconds",
        Unit::Seconds,
        "Unix time the newest successful backup completed"
    );
    describe_gauge!(
        "pitr_wal_received_lsn_bytes",
        Unit::Bytes,
        "End of the WAL received from the primary (LSN as a byte position)"
    );
    describe_gauge!(
        "pitr_wal_archived_lsn_bytes",
        Unit::Bytes,
        "End of the WAL durable in the archive (LSN as a byte position)"
    );
    describe_gauge!(
        "pitr_primary_lsn_bytes",
        Unit::Bytes,
        "The primary's current WAL end as last reported to the sidecar"
    );
    describe_gauge!("pitr_archive_lag_bytes", Unit::Bytes, "Primary WAL end minus the archive's durable end");
    describe_gauge!(
        "pitr_archive_lag_seconds",
        Unit::Seconds,
        "Age of the oldest WAL received but not yet durable (0 when caught up)"
    );
    describe_gauge!("pitr_stream_connected", "1 while the replication connection is up");
    describe_gauge!(
        "pitr_wal_flush_interval_seconds",
        Unit::Seconds,
        "Spacing between WAL chunk puts in force (flush_interval; under auto, 0 while the primary waits for the sidecar)"
    );
    describe_gauge!(
        "pitr_wal_synchronous_standby",
        "1 while the primary's synchronous_standby_names names the sidecar, 0 while it does not (flush_interval = auto only)"
    );
    describe_counter!("pitr_objects_archived_total", "WAL objects made durable");
    describe_counter!("pitr_bytes_archived_total", Unit::Bytes, "Plaintext bytes of WAL objects made durable, by kind");
    describe_counter!("pitr_upload_errors_total", "Failed archive puts (each retried)");
    describe_counter!("pitr_index_segments_written_total", "Change index objects (pg/<id>/index/) the sidecar wrote");
    describe_counter!(
        "pitr_index_segments_skipped_total",
        "WAL segments left out of the change index for now (the backfill, pitr find and verify --rebuild-index cover them)"
    );
    describe_counter!(
        "pitr_index_input_dropped_total",
        "XLogData messages the receiver could not queue for the change indexer (it was behind)"
    );
    describe_counter!(
        "pitr_restore_points_indexed_total",
        "Restore points the sidecar indexed (pg/<id>/restore-points/)"
    );
    describe_counter!("pitr_restore_point_index_errors_total", "Restore point index entries that could not be written");
    describe_counter!(
        "pitr_index_segments_backfilled_total",
        "Change index objects the sidecar's backfill wrote from the archived WAL for skipped segments"
    );
    describe_counter!(
        "pitr_upload_throttled_seconds_total",
        Unit::Seconds,
        "Time backup uploads waited for [repository] max_upload_rate, by object kind (block, manifest)"
    );
    describe_counter!(
        "pitr_download_throttled_seconds_total",
        Unit::Seconds,
        "Time restore downloads waited for [repository] max_download_rate, by object kind (block, manifest)"
    );
    describe_counter!(
        "pitr_upload_over_limit_bytes_total",
        Unit::Bytes,
        "WAL or oplog bytes uploaded beyond [repository] max_upload_rate: never slowed, so the limit did not hold"
    );
    describe_counter!(
        "pitr_download_over_limit_bytes_total",
        Unit::Bytes,
        "WAL or oplog bytes downloaded beyond [repository] max_download_rate: never slowed, so the limit did not hold"
    );
    describe_gauge!(
        "pitr_lease_confirmed",
        "1 while the writer lease is renewed on time, 0 while renewals fail (WAL puts paused) or after it was lost"
    );
    describe_histogram!("pitr_upload_duration_seconds", Unit::Seconds, "Time to seal and durably put one WAL object");
    describe_gauge!(
        "pitr_archive_complete_time_seconds",
        Unit::Seconds,
        "The primary's clock (Unix time) at the newest completeness mark: the archive held all its WAL then"
    );
    describe_counter!(
        "pitr_complete_mark_errors_total",
        "Completeness marks that could not be written (each superseded)"
    );
    describe_gauge!(
        "pitr_recoverable_window_start_timestamp_seconds",
        Unit::Seconds,
        "Oldest moment a restore can reach (newest timeline)"
    );
    describe_gauge!(
        "pitr_recoverable_window_end_timestamp_seconds",
        Unit::Seconds,
        "Newest archived commit (newest timeline)"
    );
    describe_counter!(
        "pitr_scheduled_runs_total",
        "Scheduled job runs by job and result (success, failure, skipped, unavailable)"
    );
    describe_gauge!("pitr_drill_success", "1 if the last restore drill passed (exported once a drill has run)");
    describe_gauge!("pitr_drill_rto_seconds", Unit::Seconds, "Recovery time measured by the last drill");
    describe_gauge!("pitr_drill_rpo_seconds", Unit::Seconds, "Data-loss window measured by the last drill");
    describe_gauge!("pitr_rto_target_seconds", Unit::Seconds, "The RTO target, [targets] rto_seconds");
    describe_gauge!(
        "pitr_predicted_rto_seconds",
        Unit::Seconds,
        "Predicted time to restore the newest backup chain and all archived WAL, from the timings of recent drills and restores (absent before the first drill)"
    );
    describe_gauge!(
        "pitr_predicted_rto_timestamp_seconds",
        Unit::Seconds,
        "When pitr_predicted_rto_seconds was last computed (Unix time): an old value means it is stale"
    );
    describe_gauge!("pitr_verify_findings", "Findings of the last scheduled verification (0 = archive whole)");
    describe_counter!(
        "pitr_expire_removed_objects_total",
        "Objects scheduled expire removed, by kind (backup, wal, block)"
    );
    describe_counter!("pitr_expire_removed_bytes_total", Unit::Bytes, "Stored bytes scheduled expire removed");
    describe_counter!(
        "pitr_expire_retained_objects_total",
        "Deletes the storage refused (Object Lock): objects expire reported as retained"
    );
    describe_gauge!("pitr_expire_kept_backups", "Backups the last scheduled expire kept");
    describe_gauge!(
        "pitr_expire_block_sweep_skipped",
        "1 if the last scheduled expire left unreferenced blocks (a backup was running, or the sweep hit its deadline)"
    );
    describe_gauge!(
        "pitr_secondary_queue_objects",
        "Puts and deletes queued (or in progress) for a secondary repository"
    );
    describe_gauge!("pitr_secondary_queue_bytes", Unit::Bytes, "Bytes of copies queued for a secondary repository");
    describe_gauge!(
        "pitr_secondary_lag_seconds",
        Unit::Seconds,
        "Age of the oldest put or delete not yet done on a secondary (0 when caught up)"
    );
    describe_gauge!(
        "pitr_secondary_up",
        "1 unless the last attempt on a secondary failed or it holds another repository"
    );
    describe_counter!("pitr_secondary_copied_objects_total", "Objects copied to a secondary (queue and back-fill)");
    describe_counter!("pitr_secondary_copied_bytes_total", Unit::Bytes, "Bytes copied to a secondary");
    describe_counter!("pitr_secondary_copy_errors_total", "Failed attempts on a secondary (each retried)");
    describe_counter!(
        "pitr_secondary_dropped_total",
        "Puts and deletes dropped because a secondary's queue was full (a back-fill copies the puts)"
    );
    describe_counter!("pitr_secondary_backfills_total", "Back-fills (listing comparisons) completed for a secondary");
    describe_gauge!(
        "pitr_key_age_seconds",
        Unit::Seconds,
        "Age of the active repository key (the one sealing new objects); [schedule] key_rotation replaces it"
    );
    describe_counter!(
        "pitr_key_access_errors_total",
        "Failures to reach or use a key source or the key records, by operation (each failed put is retried)"
    );
    describe_gauge!(
        "pitr_files_changed_during_backup",
        "Files of a file set that kept changing while its last backup read them"
    );
    describe_gauge!(
        "pitr_files_verify_mismatches",
        "From the last verification of a file set: files differing from the newest backup with size and mtime unchanged, plus set objects missing or not opening"
    );
    describe_gauge!(
        "pitr_files_missing_objects",
        "Blocks referenced by kept manifests of a file set or dump that the repository lacks"
    );
    describe_gauge!(
        "pitr_backup_expected_interval_seconds",
        Unit::Seconds,
        "Longest gap the schedule of a file set's or dump's backups leaves between two runs (BackupOverdue alerts at twice it)"
    );
    describe_gauge!("pitr_up", "1 while pitr stream runs");
    gauge!("pitr_up").set(1.0);
    Ok(handle)
}

/// Whether the sidecar is healthy: streaming, and the archive lag under the RPO target.
fn health(status: &StreamStatus, rpo_seconds: f64) -> (bool, String) {
    if !status.connected {
        let why = status.last_error.as_deref().unwrap_or("not connected yet");
        return (false, format!("not streaming: {why}\n"));
    }
    if status.lag_seconds > rpo_seconds {
        return (false, format!("archive lag {:.1} s exceeds the RPO target {rpo_seconds} s\n", status.lag_seconds));
    }
    (true, format!("ok: streaming, archive lag {:.3} s\n", status.lag_seconds))
}

/// Binds now (so a bad address fails at start-up), serves until `shutdown`. `status`: the
/// stream /healthz judges; `None` for a sidecar of file sets and dumps alone, healthy while it
/// runs (its jobs' results are metrics).
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    status: Option<watch::Receiver<StreamStatus>>,
    rpo_seconds: f64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("[metrics] listen = {listen}"))?;
    tracing::info!(%listen, "serving /metrics and /healthz");
    Ok(tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let (handle, status) = (handle.clone(), status.clone());
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = match req.uri().path() {
                    "/metrics" => Response::builder()
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(handle.render()))),
                    "/healthz" => {
                        let (ok, text) = match &status {
                            Some(status) => health(&status.borrow(), rpo_seconds),
                            None => {
                                (true, "ok: no database stream in this sidecar (file sets and dumps only)\n".into())
                            }
                        };
                        Response::builder()
                            .status(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE })
                            .body(Full::new(Bytes::from(text)))
                    }
                    _ => Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::from("not found\n"))),
                };
                async move { Ok::<_, Infallible>(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))) }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    }))
}

/// Mirrors the receiver's status into gauges.
pub async fn feed_gauges(mut status: watch::Receiver<StreamStatus>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let closed = tokio::select! {
            r = status.changed() => r.is_err(),
            _ = tick.tick() => false,
        };
        let s = status.borrow().clone();
        gauge!("pitr_wal_received_lsn_bytes").set(s.received_lsn as f64);
        gauge!("pitr_wal_archived_lsn_bytes").set(s.durable_lsn as f64);
        gauge!("pitr_primary_lsn_bytes").set(s.primary_lsn as f64);
        gauge!("pitr_archive_lag_bytes").set(s.lag_bytes as f64);
        gauge!("pitr_archive_lag_seconds").set(s.lag_seconds);
        gauge!("pitr_stream_connected").set(if s.connected { 1.0 } else { 0.0 });
        gauge!("pitr_wal_flush_interval_seconds").set(s.flush_interval_seconds);
        if let Some(named) = s.synchronous_standby {
            gauge!("pitr_wal_synchronous_standby").set(if named { 1.0 } else { 0.0 });
        }
        if closed {
            return;
        }
    }
}

/// Mirrors each secondary's copy state into metrics, labelled `secondary`.
pub async fn feed_secondary_metrics(replicated: Arc<ReplicatedStore>) {
    use pitr_archive::replicate::CopyState;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for s in replicated.status() {
            let label = [("secondary", s.name.clone())];
            gauge!("pitr_secondary_queue_objects", &label).set(s.queued_objects as f64);
            gauge!("pitr_secondary_queue_bytes", &label).set(s.queued_bytes as f64);
            gauge!("pitr_secondary_lag_seconds", &label).set(s.lag_seconds);
            let up = !matches!(s.state, CopyState::Retrying | CopyState::Refused);
            gauge!("pitr_secondary_up", &label).set(if up { 1.0 } else { 0.0 });
            metrics::counter!("pitr_secondary_copied_objects_total", &label).absolute(s.copied_objects);
            metrics::counter!("pitr_secondary_copied_bytes_total", &label).absolute(s.copied_bytes);
            metrics::counter!("pitr_secondary_copy_errors_total", &label).absolute(s.errors);
            metrics::counter!("pitr_secondary_dropped_total", &label).absolute(s.dropped);
            metrics::counter!("pitr_secondary_backfills_total", &label).absolute(s.backfills);
        }
    }
}

/// Refreshes the gauges derived from the repository (recoverable window, newest backup) every
/// `every`; backups taken by hand in another process show up here too.
pub async fn feed_catalog_gauges(repo: Repository, system_id: Option<u64>, every: Duration) {
    loop {
        if let Err(e) = catalog_gauges_once(&repo, system_id).await {
            tracing::debug!(error = %format!("{e:#}"), "catalog gauges not refreshed");
        }
        tokio::time::sleep(every).await;
    }
}

async fn catalog_gauges_once(repo: &Repository, system_id: Option<u64>) -> Result<()> {
    let catalog = open::catalog(repo, system_id).await?;
    if let Some(w) = catalog.current_window() {
        if let Some(start) = w.start_us {
            gauge!("pitr_recoverable_window_start_timestamp_seconds").set(start as f64 / 1e6);
        }
        if let Some(end) = w.end_us {
            gauge!("pitr_recoverable_window_end_timestamp_seconds").set(end as f64 / 1e6);
        }
    }
    if let Some(b) = catalog.backups.last() {
        record_backup_gauges(b);
    }
    // Drills run by hand (`pitr drill`) store their result in the repository too.
    let subject = pitr_drill::Subject::Postgres { system_id: catalog.cluster.system_id };
    pitr_drill::record_latest(repo, &subject).await?;
    record_predicted_rto(repo, &catalog).await?;
    Ok(())
}

/// Recomputes `pitr_predicted_rto_seconds` from the repository: every minute with the other
/// catalog gauges, and after each scheduled backup and drill. No drill yet: no value.
pub async fn record_predicted_rto(repo: &Repository, catalog: &pitr_restore::Catalog) -> Result<()> {
    let prediction = crate::tasks::predicted_rto(repo, catalog).await?;
    pitr_drill::rto::record_gauge(prediction.prediction());
    Ok(())
}

/// [`record_predicted_rto`] with the catalog loaded here (after a scheduled job); a failure is
/// logged, the gauge keeps its value until the next minute's attempt.
pub async fn refresh_predicted_rto(repo: &Repository, system_id: Option<u64>) {
    let result = async {
        let catalog = open::catalog(repo, system_id).await?;
        record_predicted_rto(repo, &catalog).await
    };
    if let Err(e) = result.await {
        tracing::debug!(error = %format!("{e:#}"), "predicted RTO not refreshed");
    }
}

/// The newest PostgreSQL backup's time and size.
pub fn record_backup_gauges(b: &BackupManifest) {
    let labels = [("backup_type", b.kind.to_string()), ("source", "postgres".to_string())];
    gauge!("pitr_last_backup_timestamp_seconds", &labels).set(b.stop_time_us as f64 / 1e6);
    gauge!("backup_size_bytes", &labels).set(b.logical_bytes as f64);
}

/// The newest MongoDB snapshot's time and size.
pub fn record_snapshot_gauges(s: &pitr_mongo::SnapshotManifest) {
    let labels = [("backup_type", "full".to_string()), ("source", "mongo".to_string())];
    metrics::gauge!("pitr_last_backup_timestamp_seconds", &labels).set(s.finished_us as f64 / 1e6);
    metrics::gauge!("backup_size_bytes", &labels).set(s.logical_bytes as f64);
}

/// What a scheduled expire removed and kept.
pub fn record_expire_metrics(r: &pitr_archive::expire::ExpireReport) {
    let removed = [("backup", r.removed_backups.len()), ("wal", r.removed_wal_objects), ("block", r.removed_blocks)];
    for (kind, n) in removed {
        metrics::counter!("pitr_expire_removed_objects_total", "kind" => kind).increment(n as u64);
    }
    metrics::counter!("pitr_expire_removed_bytes_total").increment(r.removed_bytes);
    metrics::counter!("pitr_expire_retained_objects_total").increment(r.retained.len() as u64);
    gauge!("pitr_expire_kept_backups").set(r.kept.len() as f64);
    gauge!("pitr_expire_block_sweep_skipped").set(if r.blocks_skipped.is_some() || r.blocks_left > 0 {
        1.0
    } else {
        0.0
    });
}

/// Refreshes the MongoDB gauges from the repository every `every`: the newest snapshot's age
/// and the newest drill's result (so that they survive a restart and include `pitr backup` and
/// `pitr drill` run by hand). The config is read again each time, as the jobs read it.
pub async fn feed_mongo_catalog_gauges(config_path: PathBuf, repo: Repository, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = mongo_catalog_gauges_once(&config_path, &repo).await {
            tracing::debug!(error = %format!("{e:#}"), "MongoDB catalog gauges not updated");
        }
    }
}

async fn mongo_catalog_gauges_once(path: &std::path::Path, repo: &Repository) -> Result<()> {
    let config = Config::load(path)?;
    let catalog = open::mongo_catalog(&config, repo).await?;
    if let Some(s) = catalog.snapshots.iter().max_by_key(|s| s.finished_us) {
        record_snapshot_gauges(s);
    }
    let subject = pitr_drill::Subject::Mongo { name: catalog.layout.name.clone() };
    pitr_drill::record_latest(repo, &subject).await?;
    Ok(())
}

/// The status file: the receiver's [`StreamStatus`], and each secondary's copy state.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StatusFile {
    /// What the WAL receiver last reported.
    #[serde(flatten)]
    pub stream: StreamStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// Each secondary's copy state.
    pub secondaries: Vec<pitr_archive::replicate::SecondaryStatus>,
}

/// The status file is rewritten at most this often. The receiver's status changes after every
/// put (hundreds a second on a busy local repository), and each replacement creates and deletes
/// an inode, which on some filesystems costs more CPU than the put itself.
const STATUS_FILE_SPACING: Duration = Duration::from_millis(200);

/// Keeps the status file current (atomically replaced, at most every [`STATUS_FILE_SPACING`])
/// while the sender lives, and writes the last status when it goes.
pub async fn write_status_file(
    path: PathBuf,
    mut rx: watch::Receiver<StreamStatus>,
    replicated: Option<Arc<ReplicatedStore>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut next_write = tokio::time::Instant::now();
    loop {
        let done = tokio::select! {
            r = rx.changed() => r.is_err(),
            _ = tick.tick() => false,
        };
        // Changes that arrive meanwhile are folded into this write (the snapshot is taken after).
        tokio::time::sleep_until(next_write).await;
        next_write = tokio::time::Instant::now() + STATUS_FILE_SPACING;
        let snapshot = StatusFile {
            stream: rx.borrow_and_update().clone(),
            secondaries: replicated.as_ref().map(|r| r.status()).unwrap_or_default(),
        };
        if let Ok(text) = serde_json::to_vec_pretty(&snapshot) {
            let tmp = path.with_extension("json.tmp");
            if std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
                tracing::debug!(path = %path.display(), "cannot write the status file");
            }
        }
        if done {
            return;
        }
    }
}

/// Where the sidecar keeps the journal's high-water mark (seq and hash of its newest batch):
/// beside the status file, `<status file stem>.journal-hwm.json`.
pub fn journal_high_water_file(status_file: &std::path::Path) -> PathBuf {
    let stem = status_file.file_stem().and_then(|s| s.to_str()).unwrap_or("pitr");
    let stem = stem.strip_suffix(".status").unwrap_or(stem);
    status_file.with_file_name(format!("{stem}.journal-hwm.json"))
}

/// The least time between two journal batches that carry only a moved `wal_through` (no put or
/// delete): an idle cluster's WAL still advances (checkpoints, `archive_timeout`), and a batch
/// every interval for that alone is 8,640 objects a day that say little.
pub const WAL_ONLY_BATCH_EVERY: Duration = Duration::from_secs(300);

/// The sidecar's journal writer: every `interval`, one batch of what the repository noted (WAL
/// segments, manifests, slices…) and how far the WAL is durably archived (`wal_through`, which
/// covers the chunks of the current segment: journaling adds no put per chunk). A last batch when
/// the status sender goes (a clean stop). A batch with only a moved `wal_through` is written at
/// most every [`WAL_ONLY_BATCH_EVERY`]. A failed batch is retried at the next tick (what it held
/// stays pending).
pub async fn journal_batches(
    repo: Repository,
    mut status: Option<watch::Receiver<StreamStatus>>,
    interval: Duration,
    high_water: PathBuf,
) {
    let Some(journal) = repo.journal().cloned() else { return };
    // The mark of the previous run: a first batch at or below it means the repository's journal
    // lost batches this host wrote (a rollback); the new batches fork from it, verify names it.
    let mut previous = match pitr_archive::journal::HighWater::read(&high_water) {
        Ok(mark) => mark,
        Err(e) => {
            tracing::warn!(path = %high_water.display(), error = %e, "the journal's high-water mark is unreadable");
            None
        }
    };
    journal.set_high_water_file(high_water.clone());
    let mut last_batch: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = match status.as_mut() {
            Some(rx) => tokio::select! {
                _ = tick.tick() => false,
                r = rx.changed() => {
                    if r.is_ok() {
                        continue;
                    }
                    true
                }
            },
            None => {
                tick.tick().await;
                false
            }
        };
        if let Some(rx) = status.as_ref() {
            let s = rx.borrow().clone();
            if let (Some(system_id), true) = (s.system_id, s.durable_lsn > 0) {
                journal.set_wal_through(system_id, s.timeline, s.durable_lsn);
            }
        }
        // A batch that would only move `wal_through` waits for WAL_ONLY_BATCH_EVERY (an idle
        // cluster still advances its LSN): batches with entries keep the interval.
        if !last && !journal.has_entries() && last_batch.is_some_and(|t| t.elapsed() < WAL_ONLY_BATCH_EVERY) {
            continue;
        }
        match journal.flush(&repo).await {
            Ok(Some(seq)) => {
                last_batch = Some(tokio::time::Instant::now());
                tracing::debug!(seq, "journal batch written");
                // (A mark of another key or repository, re-initialised, witnesses nothing here:
                // the recorder replaced it with this batch's.)
                let this = pitr_archive::journal::HighWater::read(&high_water).ok().flatten();
                let same = |m: &pitr_archive::journal::HighWater| {
                    this.as_ref()
                        .is_none_or(|t| m.same_journal(&t.key_id, Some(t.origin.as_str()).filter(|o| !o.is_empty())))
                };
                if let Some(mark) = previous.take().filter(|m| seq <= m.seq && same(m)) {
                    tracing::error!(
                        seq, high_water = mark.seq, path = %high_water.display(), repository = %repo.location(),
                        "the repository's journal is behind this sidecar's high-water mark: it was rolled back or its newest objects deleted (run `pitr verify`)"
                    );
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, repository = %repo.location(), "cannot write the journal batch; retrying at the next interval")
            }
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_that_only_move_wal_through_are_spaced_out() {
        use pitr_archive::journal::{JournalSigner, Recorder};
        use pitr_archive::{KeyRing, LocalStore, Store};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store, KeyRing::from_key("a", [1; 32]))
            .with_journal(Arc::new(Recorder::new(JournalSigner::from_seed([3; 32]), "test")));
        let journal = repo.journal().unwrap().clone();
        let batches = || async { repo.list(pitr_archive::names::journal::PREFIX).await.unwrap().len() };
        let wait_for = |n: usize| async move {
            for _ in 0..500 {
                if batches().await >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("no journal batch {n}");
        };
        journal.set_wal_through(7, 1, 1);
        let task =
            tokio::spawn(journal_batches(repo.clone(), None, Duration::from_millis(5), dir.path().join("hwm.json")));
        // The first batch goes at once, even with only a WAL position.
        wait_for(1).await;
        // More WAL only, over many intervals: no batch for it before WAL_ONLY_BATCH_EVERY.
        for lsn in 2..40 {
            journal.set_wal_through(7, 1, lsn);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(batches().await, 1);
        // A put keeps the interval (and takes the moved WAL position along).
        journal.note_put("pg/7/backups/20261121T000000Z.manifest", 1, "00".into());
        wait_for(2).await;
        task.abort();
    }

    #[test]
    fn health_needs_a_connection_and_lag_under_target() {
        let mut s = StreamStatus { connected: true, lag_seconds: 1.0, ..Default::default() };
        assert!(health(&s, 300.0).0);
        s.lag_seconds = 301.0;
        assert!(!health(&s, 300.0).0);
        s.connected = false;
        s.last_error = Some("refused".into());
        let (ok, text) = health(&s, 300.0);
        assert!(!ok && text.contains("refused"));
    }
}
