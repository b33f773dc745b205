//! The sidecar's job scheduler: `[schedule]` cron expressions (UTC) for full and incremental
//! backups, verification, drills and expire, and the MongoDB snapshot, verification and drill
//! jobs. Runs of one job never overlap; a missed full backup or snapshot runs once at start-up.
//! Every run is logged (job, event, result) and counted in `pitr_scheduled_runs_total`; the work
//! itself is the same as the commands' ([`crate::tasks`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use metrics::gauge;
use pitr_archive::backup::{BackupKind, BackupManifest};
use pitr_archive::Repository;
use tokio::sync::watch;

use crate::config::{parse_cron, Config, ScheduleSection};
use crate::sidecar::{record_backup_gauges, record_expire_metrics, record_snapshot_gauges};
use crate::{open, tasks};

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
    /// The age of the active repository key: exported as `pitr_key_age_seconds`, and a new key
    /// made once it is older than `after` (`[schedule] key_rotation`; `None`: never).
    KeyRotation {
        /// Rotate at this age.
        after: Option<Duration>,
    },
}

/// When a job runs.
pub enum When {
    /// On a cron schedule (UTC).
    Cron(Box<croner::Cron>),
    /// Every so often, starting at once (a check that is cheap and must not wait for a date).
    Every(Duration),
}

/// A PostgreSQL job and when it runs.
pub struct Job {
    /// Its name in logs and metrics (the `[schedule]` key).
    pub name: &'static str,
    /// When it runs.
    pub when: When,
    /// What it does.
    pub kind: JobKind,
}

/// How often the key age is looked at: once a minute, or twice per `key_rotation` when that is
/// shorter (tests), so that a key is never more than half a period past due.
pub fn key_check_interval(key_rotation: Option<Duration>) -> Duration {
    let minute = Duration::from_secs(60);
    key_rotation.map_or(minute, |every| (every / 2).min(minute))
}

/// What the PostgreSQL jobs work with.
pub struct SchedulerContext {
    /// The repository, written through the primary.
    pub repo: Repository,
    /// Base backup options (`incremental` is set per job).
    pub backup: pitr_basebackup::BackupOptions,
    /// The cluster `[postgres] system_id` pins.
    pub system_id: Option<u64>,
    /// Drills and verification read the config again, as `pitr drill` would.
    pub config_path: std::path::PathBuf,
    /// The stream's status: no job starts before the stream has connected once.
    pub stream_status: watch::Receiver<pitr_walstream::StreamStatus>,
}

fn next_after(cron: &croner::Cron, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&t, false).ok()
}

/// The newest backup's start, if the repository holds any (for catching up a missed run).
async fn last_backup_time(ctx: &SchedulerContext) -> Option<DateTime<Utc>> {
    let cluster = open::cluster(&ctx.repo, ctx.system_id).await.ok()?;
    let (backups, _damaged) = BackupManifest::list_sound(&ctx.repo, cluster.system_id).await.ok()?;
    // Incrementals do not stand in for a missed full backup.
    let newest = backups.iter().filter(|b| !b.is_incremental()).map(|b| b.start_time_us).max()?;
    DateTime::from_timestamp_micros(newest)
}

/// Whether the server can take incrementals, from the version the repository recorded for the
/// cluster (the stream records it before any job runs).
async fn incrementals_possible(ctx: &SchedulerContext) -> bool {
    match open::cluster(&ctx.repo, ctx.system_id).await {
        Ok(cluster) => pitr_basebackup::incremental::supported(cluster.server_version_num),
        // Let the backup itself say what is wrong.
        Err(_) => true,
    }
}

/// Runs `job` on its schedule until `shutdown` (see [`run_on_schedule`]); a full backup missed
/// while the sidecar was down runs once at start-up.
pub async fn run_job(job: Job, ctx: Arc<SchedulerContext>, shutdown: watch::Receiver<bool>) {
    if !stream_connected_once(ctx.stream_status.clone(), shutdown.clone()).await {
        return;
    }
    let catch_up = if job.kind == JobKind::FullBackup { Some(last_backup_time(&ctx).await) } else { None };
    let said_unavailable = AtomicBool::new(false);
    let (job, ctx, said) = (&job, &ctx, &said_unavailable);
    match &job.when {
        When::Cron(cron) => run_on_schedule(job.name, cron, catch_up, shutdown, || execute(job, ctx, said)).await,
        When::Every(every) => run_every(*every, shutdown, || execute(job, ctx, said)).await,
    }
}

/// Waits until the stream has connected once (true) or the sidecar stops first (false). A
/// sidecar whose server cannot be reached then writes nothing to the repository: no job's
/// marker, no catch-up backup that would only fail, and the cluster's server version is recorded
/// before [`incrementals_possible`] reads it.
async fn stream_connected_once(
    mut status: watch::Receiver<pitr_walstream::StreamStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    loop {
        if *shutdown.borrow() {
            return false;
        }
        if status.borrow_and_update().connected {
            return true;
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return false },
            _ = shutdown.changed() => {}
        }
    }
}

/// Runs `run` at once and then every `every` until `shutdown`; runs never overlap, and a run
/// that takes longer than `every` delays the next rather than bunching them.
async fn run_every<F, Fut>(every: Duration, mut shutdown: watch::Receiver<bool>, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        run().await;
    }
}

/// Seconds since `created_us` (µs since the epoch).
fn age_seconds(created_us: i64) -> f64 {
    (pitr_archive::now_us().saturating_sub(created_us)) as f64 / 1e6
}

/// One look at the active repository key: its age into `pitr_key_age_seconds`, and a new key,
/// made through the writer repository's store (so its record is copied to secondaries), when it
/// is older than `after`. Failures (a KMS outage, storage) are logged and counted; the next
/// check tries again.
async fn check_key_age(name: &'static str, repo: &Repository, after: Option<Duration>) {
    let (ring, store) = (repo.keys(), repo.store());
    let active = match ring.active_info(store.as_ref(), true).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(job = name, result = "failure", error = %e, "could not read the active repository key (the next check tries again)");
            count_key_rotation(name, false);
            return;
        }
    };
    let age = age_seconds(active.created_us);
    gauge!("pitr_key_age_seconds").set(age);
    let Some(after) = after else { return };
    if age < after.as_secs_f64() {
        return;
    }
    tracing::info!(job = name, event = "start", repository_key = %active.id, age_seconds = age.round(),
        "the active repository key is older than [schedule] key_rotation; making a new one");
    match ring.rotate(store.as_ref()).await {
        Ok(new) => {
            gauge!("pitr_key_age_seconds").set(age_seconds(new.created_us));
            tracing::info!(job = name, event = "end", result = "success", old_repository_key = %active.id,
                repository_key = %new.id, master_key = %new.master_key,
                "rotated the repository key: new objects are sealed with {}; older keys stay for the objects they sealed", new.id);
            count_key_rotation(name, true);
        }
        Err(e) => {
            tracing::error!(job = name, event = "end", result = "failure", repository_key = %active.id, error = %e,
                "could not rotate the repository key (the next check tries again)");
            count_key_rotation(name, false);
        }
    }
}

fn count_key_rotation(name: &'static str, ok: bool) {
    let result = if ok { "success" } else { "failure" };
    metrics::counter!("pitr_scheduled_runs_total", "job" => name, "result" => result).increment(1);
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
    let config = Config::load(&ctx.config_path)?;
    let catalog = open::catalog(&ctx.repo, ctx.system_id).await?;
    Ok(pitr_restore::verify::verify(&ctx.repo, &catalog, false, config.backup.parallel()).await?)
}

async fn run_expire(ctx: &SchedulerContext) -> Result<pitr_archive::expire::ExpireReport> {
    let config = Config::load(&ctx.config_path)?;
    tasks::expire(&config, &ctx.repo, false).await
}

async fn run_drill(ctx: &SchedulerContext) -> Result<pitr_drill::DrillReport> {
    let config = Config::load(&ctx.config_path)?;
    let catalog = open::catalog(&ctx.repo, ctx.system_id).await?;
    let mut opts = tasks::drill_options(&config, &ctx.config_path, &catalog)?;
    opts.test_type = "Monthly (scheduled)".into();
    let report = if config.drill.key_rotation {
        let report = crate::cmd::drill::key_rotation_drill(&ctx.config_path, &ctx.repo, opts, ctx.system_id).await?;
        if let Some(k) = &report.key_rotation {
            tracing::info!(job = "drill", new_repository_key = %k.new_repository_key, rewrapped_keys = k.rewrapped_keys,
                drill_master_key = %k.drill_master_key, restored_with_drill_key_alone = k.restored_with_drill_key_alone,
                wraps_removed = k.wraps_removed, "{} done", pitr_drill::KEY_ROTATION_SCENARIO);
        }
        report
    } else {
        pitr_restore::drill::drill(&ctx.repo, &catalog, &opts).await?
    };
    let subject = pitr_drill::Subject::Postgres { system_id: catalog.cluster.system_id };
    pitr_drill::store_result(&ctx.repo, &subject, &report).await?;
    Ok(report)
}

async fn execute(job: &Job, ctx: &SchedulerContext, said_unavailable: &AtomicBool) {
    match job.kind {
        JobKind::KeyRotation { after } => check_key_age(job.name, &ctx.repo, after).await,
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
            let report = run_drill(ctx).await;
            let result = report.as_ref().map_err(|e| format!("{e:#}"));
            pitr_drill::scheduled_drill_ended(job.name, pitr_drill::Source::Postgres, result);
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
            let kind = if incremental { BackupKind::Incremental } else { BackupKind::Full };
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
pub fn jobs(schedule: &ScheduleSection) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    let entries: [(&'static str, &String, JobKind); 5] = [
        ("full_backup", &schedule.full_backup, JobKind::FullBackup),
        ("incremental", &schedule.incremental, JobKind::IncrementalBackup),
        ("verify", &schedule.verify, JobKind::Verify),
        ("drill", &schedule.drill, JobKind::Drill),
        ("expire", &schedule.expire, JobKind::Expire),
    ];
    for (name, expr, kind) in entries {
        if let Some(cron) = parse_cron(name, expr)? {
            out.push(Job { name, when: When::Cron(Box::new(cron)), kind });
        }
    }
    // Even when rotation is off, the age is exported (the EncryptionKeyTooOld alert reads it).
    let after = schedule.key_rotation()?;
    out.push(Job {
        name: "key_rotation",
        when: When::Every(key_check_interval(after)),
        kind: JobKind::KeyRotation { after },
    });
    Ok(out)
}

/// A scheduled MongoDB job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MongoJob {
    Snapshot,
    Verify,
    Drill,
}

impl MongoJob {
    fn name(self) -> &'static str {
        match self {
            MongoJob::Snapshot => "mongo_snapshot",
            MongoJob::Verify => "mongo_verify",
            MongoJob::Drill => "mongo_drill",
        }
    }
}

/// The scheduled MongoDB jobs, as the PostgreSQL ones: snapshots on `[mongo] snapshot_schedule`
/// (default `[schedule] full_backup`; a missed one runs at start-up), verification on
/// `[schedule] verify`, and drills on `[schedule] drill` once `[mongo] drill_target_uri` is set.
/// Everything a bad expression can break fails here, before streaming starts.
pub fn spawn_mongo_jobs(
    config: &Config,
    config_path: &Path,
    repo: Repository,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let Some(m) = &config.mongo else { return Ok(Vec::new()) };
    let snapshot = m.snapshot_schedule.as_deref().unwrap_or(&config.schedule.full_backup);
    let mut jobs = vec![
        (MongoJob::Snapshot, parse_cron("[mongo] snapshot_schedule", snapshot)?),
        (MongoJob::Verify, parse_cron("[schedule] verify", &config.schedule.verify)?),
    ];
    if m.drill_target_uri.is_some() {
        jobs.push((MongoJob::Drill, parse_cron("[schedule] drill", &config.schedule.drill)?));
    }
    let mut handles = Vec::new();
    for (job, cron) in jobs {
        let Some(cron) = cron else { continue };
        let (repo, path, shutdown) = (repo.clone(), config_path.to_path_buf(), shutdown.clone());
        handles.push(tokio::spawn(async move {
            let catch_up = match job {
                MongoJob::Snapshot => Some(newest_snapshot_start(&path, &repo).await),
                _ => None,
            };
            let (repo, path) = (&repo, &path);
            run_on_schedule(job.name(), &cron, catch_up, shutdown, || run_mongo_job(job, path, repo)).await;
        }));
    }
    if config.postgres.is_none() {
        // Beside PostgreSQL, the PostgreSQL jobs ([`jobs`]) look after the key already.
        let after = config.schedule.key_rotation()?;
        let (repo, shutdown) = (repo.clone(), shutdown.clone());
        handles.push(tokio::spawn(async move {
            run_every(key_check_interval(after), shutdown, || check_key_age("key_rotation", &repo, after)).await;
        }));
    }
    handles.push(tokio::spawn(crate::sidecar::feed_mongo_catalog_gauges(
        config_path.to_path_buf(),
        repo.clone(),
        Duration::from_secs(60),
    )));
    Ok(handles)
}

async fn newest_snapshot_start(path: &Path, repo: &Repository) -> Option<chrono::DateTime<chrono::Utc>> {
    let config = Config::load(path).ok()?;
    let catalog = open::mongo_catalog(&config, repo).await.ok()?;
    catalog.snapshots.iter().map(|s| s.started_us).max().and_then(chrono::DateTime::from_timestamp_micros)
}

fn count_mongo_run(job: MongoJob, result: &'static str) {
    metrics::counter!("pitr_scheduled_runs_total", "job" => job.name(), "result" => result).increment(1);
}

async fn run_mongo_job(job: MongoJob, path: &Path, repo: &Repository) {
    let name = job.name();
    tracing::info!(job = name, event = "start", "scheduled MongoDB job starting");
    // The config is read again for each run, as `pitr backup`/`drill` would read it.
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(job = name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled MongoDB job failed");
            count_mongo_run(job, "failure");
            return;
        }
    };
    let labels = [("backup_type", "full".to_string()), ("source", "mongo".to_string())];
    match job {
        MongoJob::Snapshot => match tasks::mongo_snapshot(&config, repo).await {
            Ok((s, seconds)) => {
                metrics::gauge!("backup_success", &labels).set(1.0);
                record_snapshot_gauges(&s);
                tracing::info!(job = name, event = "end", result = "success", snapshot = %s.id, documents = s.documents,
                    stored_bytes = s.stored_bytes, seconds, "scheduled MongoDB snapshot done");
                count_mongo_run(job, "success");
            }
            Err(e) => {
                metrics::gauge!("backup_success", &labels).set(0.0);
                tracing::error!(job = name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled MongoDB snapshot failed");
                count_mongo_run(job, "failure");
            }
        },
        MongoJob::Verify => {
            let report = match open::mongo_catalog(&config, repo).await {
                Ok(catalog) => pitr_mongo::verify::verify(repo, &catalog, false).await.map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            match report {
                Ok(r) => {
                    for f in &r.findings {
                        tracing::error!(job = name, kind = f.kind, object = %f.object, "verify finding: {}", f.message);
                    }
                    metrics::gauge!("pitr_verify_findings", "source" => "mongo").set(r.findings.len() as f64);
                    tracing::info!(
                        job = name,
                        event = "end",
                        result = if r.ok { "success" } else { "failure" },
                        findings = r.findings.len(),
                        warnings = r.warnings.len(),
                        "scheduled MongoDB verification done"
                    );
                    count_mongo_run(job, if r.ok { "success" } else { "failure" });
                }
                Err(e) => {
                    tracing::error!(job = name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled MongoDB verification failed");
                    count_mongo_run(job, "failure");
                }
            }
        }
        MongoJob::Drill => {
            let report = tasks::mongo_drill(&config, repo, None, Default::default(), "Monthly (scheduled)").await;
            let result = report.as_ref().map_err(|e| format!("{e:#}"));
            pitr_drill::scheduled_drill_ended(name, pitr_drill::Source::Mongo, result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_age_is_checked_each_minute_or_twice_per_rotation_period() {
        assert_eq!(key_check_interval(None), Duration::from_secs(60));
        assert_eq!(key_check_interval(Some(Duration::from_secs(90 * 86400))), Duration::from_secs(60));
        assert_eq!(key_check_interval(Some(Duration::from_secs(5))), Duration::from_millis(2500));
        let c = crate::config::Config::parse(
            "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n[schedule]\nkey_rotation = \"off\"\n",
            &[],
        )
        .unwrap();
        let all = jobs(&c.schedule).unwrap();
        let key =
            all.iter().find(|j| j.name == "key_rotation").expect("the key age is checked even when rotation is off");
        assert_eq!(key.kind, JobKind::KeyRotation { after: None });
    }

    #[test]
    fn cron_with_and_without_seconds() {
        let c = parse_cron("x", "*/5 * * * * *").unwrap().unwrap();
        let t = DateTime::from_timestamp(1_795_615_380, 0).unwrap();
        assert_eq!(next_after(&c, t).unwrap().timestamp(), 1_795_615_385);
        let c = parse_cron("x", "0 2 * * *").unwrap().unwrap();
        assert_eq!(next_after(&c, t).unwrap().to_rfc3339(), "2026-11-26T02:00:00+00:00");
        assert!(parse_cron("x", "").unwrap().is_none());
    }
}
