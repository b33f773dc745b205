//! What `pitr stream` runs beside the WAL receiver: the Prometheus metrics and /healthz server,
//! gauges fed from the receiver's status and the repository's catalog, and the job scheduler.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pitr_archive::backup::BackupManifest;
use pitr_archive::Repository;
use pitr_walstream::StreamStatus;
use tokio::sync::watch;

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
    describe_counter!("pitr_objects_archived_total", "WAL objects made durable");
    describe_counter!("pitr_bytes_archived_total", Unit::Bytes, "Plaintext bytes of WAL objects made durable, by kind");
    describe_counter!("pitr_upload_errors_total", "Failed archive puts (each retried)");
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

/// Binds now (so a bad address fails at start-up), serves until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    status: watch::Receiver<StreamStatus>,
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
                        let (ok, text) = health(&status.borrow(), rpo_seconds);
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
        if closed {
            return;
        }
    }
}

/// Mirrors each secondary's copy state into metrics, labelled `secondary`.
pub async fn feed_secondary_metrics(replicated: Arc<pitr_archive::replicate::ReplicatedStore>) {
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
    let cluster = repo.resolve_cluster(system_id).await?;
    let catalog = pitr_restore::Catalog::load(repo, cluster).await?;
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
    if let Some(d) = pitr_restore::drill::latest_result(repo, catalog.cluster.system_id).await? {
        record_drill_gauges(
            &[],
            d["outcome"].as_str().unwrap_or("FAIL"),
            d["rto_achieved_seconds"].as_f64(),
            d["rpo_achieved_seconds"].as_f64(),
        );
    }
    Ok(())
}

fn record_backup_gauges(b: &BackupManifest) {
    let labels = [("backup_type", b.kind.clone()), ("source", "postgres".to_string())];
    gauge!("pitr_last_backup_timestamp_seconds", &labels).set(b.stop_time_us as f64 / 1e6);
    gauge!("backup_size_bytes", &labels).set(b.logical_bytes as f64);
}

/// A job the scheduler can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    FullBackup,
    /// PostgreSQL 17+: BASE_BACKUP INCREMENTAL; older servers have none (the WAL covers them).
    IncrementalBackup,
    Verify,
    Drill,
    /// `pitr expire` with `[retention]`.
    Expire,
}

pub struct Job {
    pub name: &'static str,
    pub cron: croner::Cron,
    pub kind: JobKind,
}

pub struct SchedulerContext {
    pub repo: Repository,
    pub backup: pitr_basebackup::BackupOptions,
    pub system_id: Option<u64>,
    /// Drills and verification read the config again, as `pitr drill` would.
    pub config_path: std::path::PathBuf,
}

fn next_after(cron: &croner::Cron, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&t, false).ok()
}

/// The newest backup's start, if the repository holds any (for catching up a missed run).
async fn last_backup_time(ctx: &SchedulerContext) -> Option<DateTime<Utc>> {
    let cluster = ctx.repo.resolve_cluster(ctx.system_id).await.ok()?;
    let backups = BackupManifest::list(&ctx.repo, cluster.system_id).await.ok()?;
    // Incrementals do not stand in for a missed full backup.
    let newest = backups.iter().filter(|b| !b.is_incremental()).map(|b| b.start_time_us).max()?;
    DateTime::from_timestamp_micros(newest)
}

/// Whether the server can take incrementals, from the version the repository recorded for the
/// cluster (the stream records it before any job runs).
async fn incrementals_possible(ctx: &SchedulerContext) -> bool {
    match ctx.repo.resolve_cluster(ctx.system_id).await {
        Ok(cluster) => cluster.server_version_num >= 170000,
        // Let the backup itself say what is wrong.
        Err(_) => true,
    }
}

/// Runs `job` on its schedule until `shutdown` (see [`run_on_schedule`]); a full backup missed
/// while the sidecar was down runs once at start-up.
pub async fn run_job(job: Job, ctx: Arc<SchedulerContext>, shutdown: watch::Receiver<bool>) {
    let catch_up = if job.kind == JobKind::FullBackup { Some(last_backup_time(&ctx).await) } else { None };
    let said_unavailable = AtomicBool::new(false);
    let (job, ctx, said) = (&job, &ctx, &said_unavailable);
    run_on_schedule(job.name, &job.cron, catch_up, shutdown, || execute(job, ctx, said)).await;
}

/// Runs `run` on `cron` until `shutdown`. Runs never overlap (each is awaited); ticks that pass
/// during a run are counted as skipped. `catch_up`: `Some(last)` makes a run missed since `last`
/// (or any run, if there was none) happen once at start-up.
pub async fn run_on_schedule<F, Fut>(
    name: &'static str,
    cron: &croner::Cron,
    catch_up: Option<Option<DateTime<Utc>>>,
    mut shutdown: watch::Receiver<bool>,
    mut run: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if let Some(last) = catch_up {
        let due = match last {
            Some(last) => next_after(cron, last).is_some_and(|t| t <= Utc::now()),
            None => true,
        };
        if due {
            tracing::info!(
                job = name,
                event = "catch-up",
                "a scheduled run was missed (or there is none yet); running it now"
            );
            run().await;
        }
    }
    loop {
        let Some(next) = next_after(cron, Utc::now()) else {
            tracing::warn!(job = name, "the schedule has no next occurrence; job stopped");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        let started = Utc::now();
        run().await;
        let mut skipped = 0u64;
        let mut t = started;
        while let Some(n) = next_after(cron, t) {
            if n > Utc::now() {
                break;
            }
            skipped += 1;
            t = n;
        }
        if skipped > 0 {
            tracing::warn!(job = name, event = "skipped", skipped, "runs skipped: the previous run was still going");
            metrics::counter!("pitr_scheduled_runs_total", "job" => name, "result" => "skipped").increment(skipped);
        }
    }
}

fn count_run(job: &Job, ok: bool) {
    let result = if ok { "success" } else { "failure" };
    metrics::counter!("pitr_scheduled_runs_total", "job" => job.name, "result" => result).increment(1);
}

async fn run_verify(ctx: &SchedulerContext) -> Result<pitr_restore::verify::VerifyReport> {
    let config = crate::config::Config::load(&ctx.config_path)?;
    let cluster = ctx.repo.resolve_cluster(ctx.system_id).await?;
    let catalog = pitr_restore::Catalog::load(&ctx.repo, cluster).await?;
    Ok(pitr_restore::verify::verify(&ctx.repo, &catalog, false, config.backup.parallel()).await?)
}

async fn run_expire(ctx: &SchedulerContext) -> Result<pitr_archive::expire::ExpireReport> {
    let config = crate::config::Config::load(&ctx.config_path)?;
    crate::commands::run_expire(&config, &ctx.repo, false).await
}

fn record_expire_metrics(r: &pitr_archive::expire::ExpireReport) {
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

async fn run_drill(ctx: &SchedulerContext) -> Result<pitr_restore::drill::DrillReport> {
    let config = crate::config::Config::load(&ctx.config_path)?;
    let cluster = ctx.repo.resolve_cluster(ctx.system_id).await?;
    let catalog = pitr_restore::Catalog::load(&ctx.repo, cluster).await?;
    let mut opts = crate::commands::drill_options(&config, &ctx.config_path, &catalog)?;
    opts.test_type = "Monthly (scheduled)".into();
    let report = pitr_restore::drill::drill(&ctx.repo, &catalog, &opts).await?;
    pitr_restore::drill::store_result(&ctx.repo, catalog.cluster.system_id, &report).await?;
    Ok(report)
}

/// The newest drill's result; `labels` is empty for PostgreSQL, `source="mongo"` for MongoDB.
pub(crate) fn record_drill_gauges(
    labels: &[(&'static str, String)],
    outcome: &str,
    rto: Option<f64>,
    rpo: Option<f64>,
) {
    gauge!("pitr_drill_success", labels).set(if outcome == "PASS" { 1.0 } else { 0.0 });
    if let Some(rto) = rto {
        gauge!("pitr_drill_rto_seconds", labels).set(rto);
    }
    if let Some(rpo) = rpo {
        gauge!("pitr_drill_rpo_seconds", labels).set(rpo);
    }
}

async fn execute(job: &Job, ctx: &SchedulerContext, said_unavailable: &AtomicBool) {
    match job.kind {
        JobKind::Verify => {
            tracing::info!(job = job.name, event = "start", "scheduled verification starting");
            match run_verify(ctx).await {
                Ok(r) => {
                    for f in &r.findings {
                        tracing::error!(job = job.name, kind = f.kind, object = %f.object, "verify finding: {}", f.message);
                    }
                    gauge!("pitr_verify_findings").set(r.findings.len() as f64);
                    tracing::info!(
                        job = job.name,
                        event = "end",
                        result = if r.ok { "success" } else { "failure" },
                        findings = r.findings.len(),
                        "scheduled verification done"
                    );
                    count_run(job, r.ok);
                }
                Err(e) => {
                    tracing::error!(job = job.name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled verification failed");
                    count_run(job, false);
                }
            }
        }
        JobKind::Expire => {
            tracing::info!(job = job.name, event = "start", "scheduled expire starting");
            match run_expire(ctx).await {
                Ok(r) => {
                    record_expire_metrics(&r);
                    for x in &r.retained {
                        tracing::warn!(job = job.name, object = %x.object, "retained: {}", x.why);
                    }
                    if let Some(why) = &r.blocks_skipped {
                        tracing::info!(job = job.name, "block sweep skipped: {why}");
                    }
                    for x in &r.retention_failed {
                        tracing::warn!(job = job.name, object = %x.object, "retention not extended: {}", x.why);
                    }
                    // As `pitr expire` exits non-zero: the deletes are done, but objects are
                    // protected for less long than their backups are kept.
                    let ok = r.retention_failed.is_empty();
                    tracing::info!(
                        job = job.name,
                        event = "end",
                        result = if ok { "success" } else { "failure" },
                        removed_backups = r.removed_backups.len(),
                        removed_wal_objects = r.removed_wal_objects,
                        removed_blocks = r.removed_blocks,
                        removed_bytes = r.removed_bytes,
                        retained = r.retained.len(),
                        kept_backups = r.kept.len(),
                        retention_extended = r.retention_extended,
                        retention_failed = r.retention_failed.len(),
                        "scheduled expire done"
                    );
                    count_run(job, ok);
                }
                Err(e) => {
                    tracing::error!(job = job.name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled expire failed");
                    count_run(job, false);
                }
            }
        }
        JobKind::Drill => {
            tracing::info!(job = job.name, event = "start", "scheduled restore drill starting");
            match run_drill(ctx).await {
                Ok(r) => {
                    record_drill_gauges(&[], &r.outcome, r.rto_achieved_seconds, r.rpo_achieved_seconds);
                    tracing::info!(job = job.name, event = "end", result = %r.outcome, rto = ?r.rto_achieved_seconds, rpo = ?r.rpo_achieved_seconds, issues = ?r.issues, "scheduled drill done");
                    count_run(job, r.outcome == "PASS");
                }
                Err(e) => {
                    record_drill_gauges(&[], "FAIL", None, None);
                    tracing::error!(job = job.name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled drill failed");
                    count_run(job, false);
                }
            }
        }
        JobKind::IncrementalBackup if !incrementals_possible(ctx).await => {
            if !said_unavailable.swap(true, Ordering::Relaxed) {
                tracing::info!(job = job.name, event = "unavailable",
                    "scheduled incremental backups do nothing on PostgreSQL before 17: the archived WAL covers every change between full backups");
            }
            metrics::counter!("pitr_scheduled_runs_total", "job" => job.name, "result" => "unavailable").increment(1);
        }
        JobKind::FullBackup | JobKind::IncrementalBackup => {
            let incremental = job.kind == JobKind::IncrementalBackup;
            let kind = if incremental { "incremental" } else { "full" };
            tracing::info!(job = job.name, event = "start", "scheduled {kind} backup starting");
            let labels = [("backup_type", kind.to_string()), ("source", "postgres".to_string())];
            let opts = pitr_basebackup::BackupOptions { incremental, ..ctx.backup.clone() };
            match pitr_basebackup::take_backup(&ctx.repo, &opts, &|_| {}).await {
                Ok((manifest, summary)) => {
                    tracing::info!(job = job.name, event = "end", result = "success", backup = %summary.id,
                        kind = %summary.kind, parent = ?summary.parent, fallback = ?summary.fallback,
                        bytes_read = summary.bytes_read, bytes_stored = summary.bytes_stored, "scheduled {kind} backup done");
                    gauge!("backup_success", &labels).set(1.0);
                    record_backup_gauges(&manifest);
                    metrics::counter!("pitr_scheduled_runs_total", "job" => job.name, "result" => "success")
                        .increment(1);
                }
                Err(e) => {
                    tracing::error!(job = job.name, event = "end", result = "failure", error = %e, "scheduled {kind} backup failed");
                    gauge!("backup_success", &labels).set(0.0);
                    metrics::counter!("pitr_scheduled_runs_total", "job" => job.name, "result" => "failure")
                        .increment(1);
                }
            }
        }
    }
}

/// The jobs from `[schedule]` (empty expressions are off).
pub fn jobs(schedule: &crate::config::ScheduleSection) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    let entries: [(&'static str, &String, JobKind); 5] = [
        ("full_backup", &schedule.full_backup, JobKind::FullBackup),
        ("incremental", &schedule.incremental, JobKind::IncrementalBackup),
        ("verify", &schedule.verify, JobKind::Verify),
        ("drill", &schedule.drill, JobKind::Drill),
        ("expire", &schedule.expire, JobKind::Expire),
    ];
    for (name, expr, kind) in entries {
        if let Some(cron) = crate::config::parse_cron(name, expr)? {
            out.push(Job { name, cron, kind });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn cron_with_and_without_seconds() {
        let c = crate::config::parse_cron("x", "*/5 * * * * *").unwrap().unwrap();
        let t = DateTime::from_timestamp(1_795_615_380, 0).unwrap();
        assert_eq!(next_after(&c, t).unwrap().timestamp(), 1_795_615_385);
        let c = crate::config::parse_cron("x", "0 2 * * *").unwrap().unwrap();
        assert_eq!(next_after(&c, t).unwrap().to_rfc3339(), "2026-11-26T02:00:00+00:00");
        assert!(crate::config::parse_cron("x", "").unwrap().is_none());
    }
}
