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
    /// `[schedule] incremental = "auto"`: a backup whenever the predicted RTO reaches `[targets]
    /// rto_auto_fraction` of the RTO target and the newest backup is older than `min_spacing`.
    AutoBackup {
        /// The least time between the newest backup's start and an automatic one.
        min_spacing: Duration,
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

/// Why scheduled incrementals do nothing, if they do: backups come from a standby (`[backup]
/// conninfo`, where pitr takes no incrementals), or the server is older than 17, from the
/// version the repository recorded for the cluster (the stream records it before any job runs).
async fn incrementals_unavailable(ctx: &SchedulerContext) -> Option<&'static str> {
    if ctx.backup.primary.is_some() {
        return Some(
            "scheduled incremental backups do nothing while backups come from a standby ([backup] conninfo): \
             pitr takes only full backups there, and the archived WAL covers every change between them",
        );
    }
    match open::cluster(&ctx.repo, ctx.system_id).await {
        Ok(cluster) if !pitr_basebackup::incremental::supported(cluster.server_version_num) => Some(
            "scheduled incremental backups do nothing on PostgreSQL before 17: the archived WAL covers every change between full backups",
        ),
        Ok(_) => None,
        // Let the backup itself say what is wrong.
        Err(_) => None,
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
/// before [`incrementals_unavailable`] reads it.
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

/// Runs `run` on `cron` (UTC) until `shutdown`; see [`run_on_occurrences`].
pub async fn run_on_schedule<F, Fut>(
    name: &'static str,
    cron: &croner::Cron,
    catch_up: Option<Option<DateTime<Utc>>>,
    shutdown: watch::Receiver<bool>,
    run: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    run_on_occurrences(name, &|t| next_after(cron, t), catch_up, shutdown, run).await
}

/// Runs `run` at the occurrences `next` gives (the first one strictly after a moment) until
/// `shutdown`. Runs never overlap (each is awaited); occurrences that pass during a run are
/// counted as skipped. `catch_up`: `Some(last)` makes a run missed since `last` (or any run, if
/// there was none) happen once at start-up.
pub async fn run_on_occurrences<F, Fut>(
    name: &'static str,
    next_after: &(dyn Fn(DateTime<Utc>) -> Option<DateTime<Utc>> + Send + Sync),
    catch_up: Option<Option<DateTime<Utc>>>,
    mut shutdown: watch::Receiver<bool>,
    mut run: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if let Some(last) = catch_up {
        let due = match last {
            Some(last) => next_after(last).is_some_and(|t| t <= Utc::now()),
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
        let Some(next) = next_after(Utc::now()) else {
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
        while let Some(n) = next_after(t) {
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
    let mut report = pitr_restore::verify::verify(&ctx.repo, &catalog, false, config.backup.parallel()).await?;
    // The journal, as `pitr verify` checks it: its findings fail the run and count in the gauge.
    let journal = crate::cmd::verify_journal::check_or_finding(&config, None, &ctx.repo, false).await;
    report.notes.extend(journal.notes);
    if !journal.findings.is_empty() {
        report.findings.extend(journal.findings);
        report.findings.sort_by(|a, b| (a.kind, &a.object).cmp(&(b.kind, &b.object)));
        report.ok = false;
    }
    Ok(report)
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
            crate::sidecar::refresh_predicted_rto(&ctx.repo, ctx.system_id).await;
        }
        JobKind::FullBackup | JobKind::IncrementalBackup => {
            let incremental = job.kind == JobKind::IncrementalBackup;
            if incremental {
                if let Some(why) = incrementals_unavailable(ctx).await {
                    if !said_unavailable.swap(true, Ordering::Relaxed) {
                        tracing::info!(job = job.name, event = "unavailable", "{why}");
                    }
                    metrics::counter!("pitr_scheduled_runs_total", "job" => job.name, "result" => "unavailable")
                        .increment(1);
                    return;
                }
            }
            take_scheduled_backup(job.name, ctx, incremental).await;
        }
        JobKind::AutoBackup { min_spacing } => auto_backup(job.name, ctx, min_spacing, said_unavailable).await,
    }
}

/// A scheduled backup, logged and counted as job `name`; the predicted RTO is refreshed after it.
async fn take_scheduled_backup(name: &'static str, ctx: &SchedulerContext, incremental: bool) {
    let kind = if incremental { BackupKind::Incremental } else { BackupKind::Full };
    tracing::info!(job = name, event = "start", "scheduled {kind} backup starting");
    let labels = [("backup_type", kind.to_string()), ("source", "postgres".to_string())];
    let opts = pitr_basebackup::BackupOptions { incremental, ..ctx.backup.clone() };
    // Before the backup: a failed one is not retried automatically until the spacing has passed.
    LAST_BACKUP_ATTEMPT_US.fetch_max(pitr_archive::now_us(), Ordering::Relaxed);
    let taken = {
        // Counted down however the backup ends (also when its future is dropped).
        struct Running;
        impl Drop for Running {
            fn drop(&mut self) {
                BACKUPS_RUNNING.fetch_sub(1, Ordering::Relaxed);
            }
        }
        BACKUPS_RUNNING.fetch_add(1, Ordering::Relaxed);
        let _running = Running;
        pitr_basebackup::take_backup(&ctx.repo, &opts, &|_| {}).await
    };
    match taken {
        Ok((manifest, summary)) => {
            tracing::info!(job = name, event = "end", result = "success", backup = %summary.id,
                kind = %summary.kind, parent = ?summary.parent, taken_from = %summary.taken_from, fallback = ?summary.fallback,
                bytes_read = summary.bytes_read, bytes_stored = summary.bytes_stored, "scheduled {kind} backup done");
            gauge!("backup_success", &labels).set(1.0);
            record_backup_gauges(&manifest);
            metrics::counter!("pitr_scheduled_runs_total", "job" => name, "result" => "success").increment(1);
        }
        Err(e) => {
            tracing::error!(job = name, event = "end", result = "failure", error = %e, "scheduled {kind} backup failed");
            gauge!("backup_success", &labels).set(0.0);
            metrics::counter!("pitr_scheduled_runs_total", "job" => name, "result" => "failure").increment(1);
        }
    }
    crate::sidecar::refresh_predicted_rto(&ctx.repo, ctx.system_id).await;
}

/// An automatic backup chain longer than this (the full backup and its incrementals) is ended by
/// a full backup: every restore reads the whole chain, and each link is one more thing to lose.
pub const AUTO_MAX_CHAIN: usize = 8;

/// What `[schedule] incremental = "auto"` decides at one check.
#[derive(Debug, Clone, PartialEq)]
pub enum AutoDecision {
    /// No prediction yet (no drill or timed restore): nothing to judge by.
    NoPrediction,
    /// The prediction is under the threshold.
    Below,
    /// Over the threshold, but the newest backup (or the last automatic attempt) is too recent.
    TooSoon,
    /// Over the threshold, but a backup would not bring it under: writing the data directory (and
    /// starting the server) alone takes `.0` seconds. Backups every spacing would change nothing.
    Useless(f64),
    /// Take a backup: incremental (`true`) or full, and why.
    Take(bool, String),
}

/// The pure decision of the automatic schedule: `predicted` (seconds now, and seconds just after
/// a new backup: the same restore without the WAL replay a backup saves) against `fraction` ×
/// `rto_seconds`; `newest_age` of the newest backup or of the last automatic attempt, whichever is
/// younger, against `min_spacing` (so a backup that fails is not retried back to back);
/// `chain` the newest backup's chain length (0: no full backup); `incrementals` whether the
/// server takes them.
pub fn auto_decision(
    predicted: Option<(f64, f64)>,
    rto_seconds: f64,
    fraction: f64,
    newest_age: Option<Duration>,
    min_spacing: Duration,
    chain: usize,
    incrementals: bool,
) -> AutoDecision {
    let Some((predicted, after_backup)) = predicted.filter(|p| p.0.is_finite() && p.1.is_finite()) else {
        return AutoDecision::NoPrediction;
    };
    let threshold = fraction * rto_seconds;
    if predicted < threshold {
        return AutoDecision::Below;
    }
    // Without a full backup, one is taken whatever it saves: every restore needs one.
    if chain > 0 && after_backup >= threshold {
        return AutoDecision::Useless(after_backup);
    }
    if newest_age.is_some_and(|age| age < min_spacing) {
        return AutoDecision::TooSoon;
    }
    let why = format!("predicted RTO {predicted:.1} s >= {fraction} x the RTO target {rto_seconds} s");
    if chain == 0 {
        AutoDecision::Take(false, format!("{why}; no full backup yet"))
    } else if !incrementals {
        AutoDecision::Take(false, why)
    } else if chain >= AUTO_MAX_CHAIN {
        AutoDecision::Take(false, format!("{why}; the chain has {chain} backups (at most {AUTO_MAX_CHAIN})"))
    } else {
        AutoDecision::Take(true, why)
    }
}

/// When the sidecar last started a scheduled backup, automatic or by cron (µs; 0: never). With
/// the newest stored backup, it spaces automatic backups: a failed one leaves no backup behind,
/// and without it the next check (a minute later) would try again.
static LAST_BACKUP_ATTEMPT_US: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Scheduled backups under way in this sidecar: no automatic one starts beside them (a full
/// backup by cron can outlast the spacing; an incremental then would be on the older chain).
static BACKUPS_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The age the spacing is judged by at `now` (µs): of the newest backup's start or of the last
/// scheduled attempt (`0`: none), whichever is younger, and zero while a scheduled backup is
/// `running`; `None` when there was none.
pub fn spacing_age(
    newest_backup_start_us: Option<i64>,
    last_attempt_us: i64,
    running: bool,
    now: i64,
) -> Option<Duration> {
    if running {
        return Some(Duration::ZERO);
    }
    let since = newest_backup_start_us.max(Some(last_attempt_us)).filter(|&us| us > 0)?;
    Some(Duration::from_micros(now.saturating_sub(since).max(0) as u64))
}

/// One check of `[schedule] incremental = "auto"`: a backup when [`auto_decision`] says so.
async fn auto_backup(name: &'static str, ctx: &SchedulerContext, min_spacing: Duration, said: &AtomicBool) {
    // The warning that backups cannot help is said once until the decision changes.
    static SAID_USELESS: AtomicBool = AtomicBool::new(false);
    let said_useless = &SAID_USELESS;
    let incrementals = match incrementals_unavailable(ctx).await {
        None => true,
        Some(why) => {
            if !said.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    job = name,
                    event = "unavailable",
                    "{why}; incremental = \"auto\" takes full backups instead"
                );
            }
            false
        }
    };
    let result = async {
        let config = Config::load(&ctx.config_path)?;
        // The check reads the target afresh; the alert compares against this gauge, so both
        // follow an edited rto_seconds together.
        gauge!("pitr_rto_target_seconds").set(config.targets.rto_seconds);
        let catalog = open::catalog(&ctx.repo, ctx.system_id).await?;
        let prediction = tasks::predicted_rto(&ctx.repo, &catalog).await?;
        pitr_drill::rto::record_gauge(prediction.prediction());
        let prediction = prediction.prediction().cloned();
        let now = pitr_archive::now_us();
        let newest = catalog.backups.iter().max_by_key(|b| b.start_time_us);
        let newest_age = spacing_age(
            newest.map(|b| b.start_time_us),
            LAST_BACKUP_ATTEMPT_US.load(Ordering::Relaxed),
            BACKUPS_RUNNING.load(Ordering::Relaxed) > 0,
            now,
        );
        let chain = newest.and_then(|b| catalog.chain(b).ok()).map_or(0, |c| c.len());
        Ok::<_, anyhow::Error>(auto_decision(
            prediction.map(|p| (p.seconds, p.download_seconds + p.model.replay.seconds(0.0))),
            config.targets.rto_seconds,
            config.targets.rto_auto_fraction,
            newest_age,
            min_spacing,
            chain,
            incrementals,
        ))
    };
    match result.await {
        Ok(AutoDecision::Take(incremental, why)) => {
            tracing::info!(job = name, event = "decision", incremental, "automatic backup: {why}");
            take_scheduled_backup(name, ctx, incremental).await;
        }
        Ok(AutoDecision::Useless(after)) => {
            if !said_useless.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    job = name,
                    event = "decision",
                    "no automatic backup: the predicted RTO is over the \
                    threshold, but even just after a backup a restore would take {after:.1} s (writing the data \
                    directory and starting the server): more backups cannot bring it under"
                );
            }
        }
        Ok(d) => {
            said_useless.store(false, Ordering::Relaxed);
            tracing::debug!(job = name, decision = ?d, "no automatic backup")
        }
        Err(e) => tracing::warn!(job = name, error = %format!("{e:#}"), "automatic backup check failed"),
    }
}

/// The jobs from `[schedule]` (empty expressions are off).
pub fn jobs(schedule: &ScheduleSection) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    let empty = String::new();
    let entries: [(&'static str, &String, JobKind); 5] = [
        ("full_backup", &schedule.full_backup, JobKind::FullBackup),
        (
            "incremental",
            if schedule.incremental_auto() { &empty } else { &schedule.incremental },
            JobKind::IncrementalBackup,
        ),
        ("verify", &schedule.verify, JobKind::Verify),
        ("drill", &schedule.drill, JobKind::Drill),
        ("expire", &schedule.expire, JobKind::Expire),
    ];
    for (name, expr, kind) in entries {
        if let Some(cron) = parse_cron(name, expr)? {
            out.push(Job { name, when: When::Cron(Box::new(cron)), kind });
        }
    }
    if schedule.incremental_auto() {
        // Checked every minute, or more often when the spacing is shorter (tests).
        let min_spacing = schedule.auto_min_spacing;
        let every = min_spacing.min(Duration::from_secs(60)).max(Duration::from_secs(1));
        out.push(Job { name: "incremental", when: When::Every(every), kind: JobKind::AutoBackup { min_spacing } });
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
        handles.push(spawn_key_age_job(config, repo.clone(), shutdown.clone())?);
    }
    handles.push(tokio::spawn(crate::sidecar::feed_mongo_catalog_gauges(
        config_path.to_path_buf(),
        repo.clone(),
        Duration::from_secs(60),
    )));
    Ok(handles)
}

/// The key age check and rotation (`[schedule] key_rotation`) of a sidecar without `[postgres]`
/// (whose jobs include it otherwise).
pub fn spawn_key_age_job(
    config: &Config,
    repo: Repository,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let after = config.schedule.key_rotation()?;
    Ok(tokio::spawn(async move {
        run_every(key_check_interval(after), shutdown, || check_key_age("key_rotation", &repo, after)).await;
    }))
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
            let mut report = match open::mongo_catalog(&config, repo).await {
                Ok(catalog) => pitr_mongo::verify::verify(repo, &catalog, false).await.map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            // The journal, when no PostgreSQL verification checks it already (one repository,
            // one journal: checked once).
            if let (Ok(r), None) = (report.as_mut(), config.postgres.as_ref()) {
                let journal = crate::cmd::verify_journal::check_or_finding(&config, None, repo, false).await;
                for n in journal.notes {
                    tracing::info!(job = name, "journal: {n}");
                }
                for f in journal.findings {
                    r.findings.push(pitr_mongo::verify::MongoFinding {
                        kind: f.kind,
                        object: f.object,
                        message: f.message,
                    });
                    r.ok = false;
                }
            }
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

/// What a scheduled job of a `[[files]]` or `[[dumps]]` set does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetJobKind {
    /// `pitr backup --source files --set NAME` (`[[files]] full`).
    FilesFull,
    /// `pitr backup --source files --set NAME --incremental` (`[[files]] incremental`).
    FilesIncremental,
    /// `pitr dump --set NAME` (`[[dumps]] schedule`, in the set's `time_zone`).
    Dump,
}

impl SetJobKind {
    /// The job's name in logs and in `pitr_scheduled_runs_total{job}` (the set is the `set` label).
    pub fn name(self) -> &'static str {
        match self {
            SetJobKind::FilesFull => "files_full",
            SetJobKind::FilesIncremental => "files_incremental",
            SetJobKind::Dump => "dump",
        }
    }

    /// The `source` label of the set's backup metrics.
    pub fn source(self) -> &'static str {
        match self {
            SetJobKind::FilesFull | SetJobKind::FilesIncremental => "files",
            SetJobKind::Dump => "dump",
        }
    }

    /// The `backup_type` label of the set's backup metrics.
    pub fn backup_type(self) -> &'static str {
        match self {
            SetJobKind::FilesFull | SetJobKind::Dump => "full",
            SetJobKind::FilesIncremental => "incremental",
        }
    }

    /// Full backups and dumps missed while the sidecar was down run once at start-up, as the
    /// database's full backup does; a missed incremental is not worth one (the next comes soon,
    /// and the full catch-up covers the changes).
    fn catches_up(self) -> bool {
        self != SetJobKind::FilesIncremental
    }
}

/// The first occurrence of a schedule strictly after a moment (`None`: no more).
pub type NextRun = Arc<dyn Fn(DateTime<Utc>) -> Option<DateTime<Utc>> + Send + Sync>;

/// One scheduled job of a set.
pub struct SetJob {
    /// What it does.
    pub kind: SetJobKind,
    /// The `[[files]]` or `[[dumps]]` name.
    pub set: String,
    /// When it runs.
    pub next: NextRun,
}

/// A cron expression evaluated in UTC, as a [`NextRun`].
pub fn utc_cron(cron: croner::Cron) -> NextRun {
    Arc::new(move |t| next_after(&cron, t))
}

/// The longest gap between two consecutive runs of `next` over the year after `from` (or its
/// first 1000 runs): what `pitr_backup_expected_interval_seconds` exports. `None` for a schedule
/// with fewer than two runs ahead.
pub fn longest_gap(
    next: &(dyn Fn(DateTime<Utc>) -> Option<DateTime<Utc>> + Send + Sync),
    from: DateTime<Utc>,
) -> Option<Duration> {
    let horizon = from + chrono::Duration::days(366);
    let mut previous = next(from)?;
    let mut longest: Option<Duration> = None;
    for _ in 0..1000 {
        let Some(t) = next(previous) else { break };
        let gap = (t - previous).to_std().unwrap_or(Duration::ZERO);
        longest = Some(longest.map_or(gap, |l| l.max(gap)));
        if t > horizon {
            break;
        }
        previous = t;
    }
    longest
}

/// The jobs of the `[[files]]` and `[[dumps]]` sets (empty schedules are off).
pub fn set_jobs(config: &Config) -> Result<Vec<SetJob>> {
    let mut out = Vec::new();
    for f in &config.files {
        for (kind, incremental) in [(SetJobKind::FilesFull, false), (SetJobKind::FilesIncremental, true)] {
            if let Some(cron) = f.cron(incremental)? {
                out.push(SetJob { kind, set: f.name.clone(), next: utc_cron(cron) });
            }
        }
    }
    for d in &config.dumps {
        if d.schedule.trim().is_empty() {
            continue;
        }
        let dump = crate::config::DumpConfig {
            name: d.name.clone(),
            conninfo: String::new(),
            schedule: d.schedule.clone(),
            time_zone: d.time_zone.clone(),
            keep_days: d.keep_days,
        };
        out.push(SetJob {
            kind: SetJobKind::Dump,
            set: d.name.clone(),
            next: Arc::new(move |t| dump.next_run_after(t)),
        });
    }
    Ok(out)
}

/// Spawns the jobs of the `[[files]]` and `[[dumps]]` sets. They need no database connection, so
/// they start at once, beside PostgreSQL, MongoDB or alone. Runs of one set never overlap (a full
/// and an incremental of the same set take turns), runs of different sets may. Each job exports
/// `pitr_backup_expected_interval_seconds{source,set,backup_type}` for the BackupOverdue alert.
pub fn spawn_set_jobs(
    jobs: Vec<SetJob>,
    config_path: &Path,
    repo: Repository,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut locks: std::collections::BTreeMap<(&'static str, String), Arc<tokio::sync::Mutex<()>>> = Default::default();
    let mut handles = Vec::new();
    for job in jobs {
        let lock = locks.entry((job.kind.source(), job.set.clone())).or_default().clone();
        let labels = [
            ("source", job.kind.source().to_string()),
            ("set", job.set.clone()),
            ("backup_type", job.kind.backup_type().to_string()),
        ];
        if let Some(gap) = longest_gap(job.next.as_ref(), Utc::now()) {
            gauge!("pitr_backup_expected_interval_seconds", &labels).set(gap.as_secs_f64());
        }
        let (repo, path, shutdown) = (repo.clone(), config_path.to_path_buf(), shutdown.clone());
        handles.push(tokio::spawn(async move {
            let newest = newest_set_backup(&repo, job.kind, &job.set).await;
            let catch_up = job.kind.catches_up().then(|| newest.map(|(start, _)| start));
            let (set, path, lock) = (job.set.as_str(), path.as_path(), lock.as_ref());
            run_on_occurrences(job.kind.name(), job.next.as_ref(), catch_up, shutdown, || {
                run_set_job(job.kind, set, path, lock)
            })
            .await;
        }));
    }
    handles
}

/// The newest backup of `set` of the job's kind, as (start, stop), and its completion time
/// exported as `pitr_last_backup_timestamp_seconds` (so that BackupOverdue sees the set after a
/// restart of the sidecar, before its next run). `None` when there is none or the repository
/// cannot say: the catch-up then runs (a backup is never skipped for want of an answer).
async fn newest_set_backup(repo: &Repository, kind: SetJobKind, set: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let found = match kind {
        SetJobKind::Dump => newest_dump(repo, set).await,
        SetJobKind::FilesFull => newest_tree(repo, set, pitr_files::tree::TreeKind::Full).await,
        SetJobKind::FilesIncremental => newest_tree(repo, set, pitr_files::tree::TreeKind::Incremental).await,
    };
    let (start_us, stop_us) = match found {
        Ok(Some(times)) => times,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(job = kind.name(), set, error = %e, "could not find the set's newest backup in the repository");
            return None;
        }
    };
    let labels = [
        ("backup_type", kind.backup_type().to_string()),
        ("source", kind.source().to_string()),
        ("set", set.to_string()),
    ];
    gauge!("pitr_last_backup_timestamp_seconds", &labels).set(stop_us as f64 / 1e6);
    Some((DateTime::from_timestamp_micros(start_us)?, DateTime::from_timestamp_micros(stop_us)?))
}

/// Manifest ids of `prefix`, newest first (ids are start times, `YYYYMMDDTHHMMSSZ`, so they sort
/// by time).
async fn ids_newest_first(
    repo: &Repository,
    prefix: &str,
    parse: fn(&str) -> Option<(&str, &str)>,
) -> Result<Vec<String>, pitr_archive::RepositoryError> {
    let mut ids: Vec<String> =
        repo.list(prefix).await?.iter().filter_map(|o| parse(&o.name).map(|(_, id)| id.to_string())).collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    Ok(ids)
}

/// (start, stop) in µs of the newest dump of `set` that opens.
async fn newest_dump(repo: &Repository, set: &str) -> Result<Option<(i64, i64)>, pitr_files::FilesError> {
    let names = pitr_archive::names::files::dumps_prefix(set);
    for id in ids_newest_first(repo, &names, pitr_archive::names::files::parse_dump_manifest).await? {
        match pitr_files::DumpManifest::load(repo, set, &id).await {
            Ok(m) => return Ok(Some((m.start_time_us, m.stop_time_us))),
            // A damaged or planted manifest is no dump; verify reports it.
            Err(pitr_files::FilesError::Repository(e)) if e.is_bad_object() => continue,
            Err(pitr_files::FilesError::Repository(pitr_archive::RepositoryError::Store(e))) if e.is_not_found() => {
                continue
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Manifests [`newest_tree`] opens at most: a week of hourly incrementals and then some. Past it
/// the set counts as having no backup of that kind, so a full catch-up runs (never one skipped).
const NEWEST_TREE_SCAN: usize = 200;

/// (start, stop) in µs of the newest backup of file set `set` of `kind` that opens. Manifests are
/// opened newest first until one of that kind turns up (a day of hourly incrementals before a
/// full), not all of them: each lists the whole tree.
async fn newest_tree(
    repo: &Repository,
    set: &str,
    kind: pitr_files::tree::TreeKind,
) -> Result<Option<(i64, i64)>, pitr_files::FilesError> {
    let names = pitr_archive::names::files::sets_prefix(set);
    let ids = ids_newest_first(repo, &names, pitr_archive::names::files::parse_tree_manifest).await?;
    for id in ids.iter().take(NEWEST_TREE_SCAN) {
        match pitr_files::tree::TreeManifest::load(repo, set, id).await {
            Ok(m) if m.kind == kind => return Ok(Some((m.start_time_us, m.stop_time_us))),
            Ok(_) => continue,
            Err(pitr_files::FilesError::Repository(e)) if e.is_bad_object() => continue,
            Err(pitr_files::FilesError::Repository(pitr_archive::RepositoryError::Store(e))) if e.is_not_found() => {
                continue
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// One run of a set's job: the config read again (as the command would read it), the backup or
/// dump (which sets the set's `backup_success`, size and time), logged and counted.
async fn run_set_job(kind: SetJobKind, set: &str, config_path: &Path, lock: &tokio::sync::Mutex<()>) {
    let _turn = lock.lock().await;
    let name = kind.name();
    tracing::info!(job = name, set, event = "start", "scheduled {} of set {set} starting", describe_set_job(kind));
    let result = async {
        let config = Config::load(config_path)?;
        match kind {
            SetJobKind::FilesFull | SetJobKind::FilesIncremental => {
                let incremental = kind == SetJobKind::FilesIncremental;
                crate::cmd::files::backup_set(&config, set, incremental).await.map(|s| s.to_string())
            }
            SetJobKind::Dump => crate::cmd::dump::dump_set(&config, set).await.map(|s| s.to_string()),
        }
    }
    .await;
    let ok = match result {
        Ok(summary) => {
            tracing::info!(
                job = name,
                set,
                event = "end",
                result = "success",
                "scheduled {} of set {set} done: {summary}",
                describe_set_job(kind)
            );
            true
        }
        Err(e) => {
            // backup_set and dump_set set it too; not when the config could not be read.
            let labels = [
                ("backup_type", kind.backup_type().to_string()),
                ("source", kind.source().to_string()),
                ("set", set.to_string()),
            ];
            gauge!("backup_success", &labels).set(0.0);
            tracing::error!(job = name, set, event = "end", result = "failure", error = %format!("{e:#}"),
                "scheduled {} of set {set} failed", describe_set_job(kind));
            false
        }
    };
    let result = if ok { "success" } else { "failure" };
    metrics::counter!("pitr_scheduled_runs_total", "job" => name, "set" => set.to_string(), "result" => result)
        .increment(1);
}

/// The sidecar's other jobs around file sets and dumps: their verification on `[schedule] verify`
/// (job `files_verify`: every `[[files]]` set checked against the live tree, as
/// `pitr verify --source files --live`, and every dump's blocks, as `pitr verify --source dump`;
/// sets `pitr_files_verify_mismatches` and `pitr_files_missing_objects`), and the weekly
/// partial-restore drill on `[schedule] partial_drill` (job `partial_drill`, with `[postgres]` or
/// `[[files]]`; exported as `pitr_drill_*{drill="partial"}`). Neither needs a database
/// connection.
pub fn spawn_files_jobs(
    config: &Config,
    config_path: &Path,
    repo: Repository,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut handles = Vec::new();
    if !(config.files.is_empty() && config.dumps.is_empty()) {
        if let Some(cron) = parse_cron("verify", &config.schedule.verify)? {
            let (path, repo, shutdown) = (config_path.to_path_buf(), repo.clone(), shutdown.clone());
            handles.push(tokio::spawn(async move {
                let (path, repo) = (&path, &repo);
                run_on_schedule("files_verify", &cron, None, shutdown, || run_files_verify(path, repo)).await;
            }));
        }
        if let Some(cron) = parse_cron("expire", &config.schedule.expire)? {
            let (path, repo, shutdown) = (config_path.to_path_buf(), repo.clone(), shutdown.clone());
            handles.push(tokio::spawn(async move {
                let (path, repo) = (&path, &repo);
                run_on_schedule("files_expire", &cron, None, shutdown, || run_files_expire(path, repo)).await;
            }));
        }
    }
    if config.postgres.is_some() || !config.files.is_empty() {
        if let Some(cron) = parse_cron("partial_drill", &config.schedule.partial_drill)? {
            let path = config_path.to_path_buf();
            handles.push(tokio::spawn(async move {
                let path = &path;
                run_on_schedule("partial_drill", &cron, None, shutdown, || async move {
                    tracing::info!(job = "partial_drill", event = "start", "scheduled partial-restore drill starting");
                    let report = crate::partial::scheduled(path).await;
                    let result = report.as_ref().map_err(|e| format!("{e:#}"));
                    pitr_drill::scheduled_drill_ended("partial_drill", pitr_drill::Source::Partial, result);
                })
                .await;
            }));
        }
    }
    Ok(handles)
}

/// One `files_expire` run on `[schedule] expire`, as `pitr expire` does for sets: dumps past
/// their `keep_days`, then file-set retention and the sweep of blocks nothing references; logged
/// and counted. It takes the expire lock itself, so it never sweeps beside PostgreSQL's expire:
/// whichever comes second finds the lock held, fails, and runs again at the next tick.
async fn run_files_expire(config_path: &Path, repo: &Repository) {
    const NAME: &str = "files_expire";
    tracing::info!(job = NAME, event = "start", "scheduled expire of file sets and dumps starting");
    let result = async {
        let config = Config::load(config_path)?;
        use anyhow::Context as _;
        // The file sets' part runs even when the dumps' failed.
        let dumps = crate::cmd::dump::expire_sets(&config, repo, false).await.context("dumps");
        let files = crate::cmd::files::expire(&config, repo, false).await.context("file sets");
        if let (Err(d), Err(_)) = (&dumps, &files) {
            tracing::error!(job = NAME, error = %format!("{d:#}"), "scheduled expire of dumps failed");
        }
        let files = files?;
        anyhow::Ok((dumps?, files))
    }
    .await;
    let ok = match result {
        Ok((dumps, files)) => {
            for x in &dumps.retained {
                tracing::warn!(job = NAME, object = %x.object, "retained: {}", x.why);
            }
            for x in &files.retained {
                tracing::warn!(job = NAME, object = %x.object, "retained: {}", x.why);
            }
            if let Some(why) = &files.blocks_skipped {
                tracing::info!(job = NAME, "block sweep skipped: {why}");
            }
            let removed =
                [("backup", files.removed_backups.len() + dumps.removed.len()), ("block", files.removed_blocks)];
            for (kind, n) in removed {
                metrics::counter!("pitr_expire_removed_objects_total", "kind" => kind).increment(n as u64);
            }
            metrics::counter!("pitr_expire_removed_bytes_total").increment(files.removed_bytes);
            tracing::info!(
                job = NAME,
                event = "end",
                result = "success",
                removed_dumps = dumps.removed.len(),
                removed_backups = files.removed_backups.len(),
                removed_blocks = files.removed_blocks,
                removed_bytes = files.removed_bytes,
                "scheduled expire of file sets and dumps done"
            );
            true
        }
        Err(e) => {
            tracing::error!(job = NAME, event = "end", result = "failure", error = %format!("{e:#}"),
                "scheduled expire of file sets and dumps failed");
            false
        }
    };
    metrics::counter!("pitr_scheduled_runs_total", "job" => NAME, "result" => if ok { "success" } else { "failure" })
        .increment(1);
}

/// One `files_verify` run: file sets, then dumps; logged and counted.
async fn run_files_verify(config_path: &Path, repo: &Repository) {
    const NAME: &str = "files_verify";
    tracing::info!(job = NAME, event = "start", "scheduled verification of file sets and dumps starting");
    let result = async {
        let config = Config::load(config_path)?;
        let mut findings = 0usize;
        if !config.files.is_empty() {
            findings += verify_file_sets(config_path).await?;
        }
        if !config.dumps.is_empty() {
            let r = pitr_files::dump::verify(repo, None).await?;
            for (set, missing) in &r.missing_blocks {
                gauge!("pitr_files_missing_objects", "source" => "dump", "set" => set.clone()).set(*missing as f64);
            }
            for f in &r.findings {
                tracing::error!(job = NAME, set = f.set.as_deref().unwrap_or("-"), object = %f.object, "dump verify finding: {}", f.message);
            }
            findings += r.findings.len();
        }
        anyhow::Ok(findings)
    }
    .await;
    let ok = match result {
        Ok(findings) => {
            tracing::info!(
                job = NAME,
                event = "end",
                result = if findings == 0 { "success" } else { "failure" },
                findings,
                "scheduled verification of file sets and dumps done"
            );
            findings == 0
        }
        Err(e) => {
            tracing::error!(job = NAME, event = "end", result = "failure", error = %format!("{e:#}"),
                "scheduled verification of file sets and dumps failed");
            false
        }
    };
    metrics::counter!("pitr_scheduled_runs_total", "job" => NAME, "result" => if ok { "success" } else { "failure" })
        .increment(1);
}

/// Runs `pitr verify --source files --live --json` (this binary, this config) and exports its
/// per-set results as `pitr_files_verify_mismatches{set}` and
/// `pitr_files_missing_objects{source="files",set}`; returns the findings: repository findings
/// and files corrupt in the live tree. A child process, because the command is what prints the
/// report: its JSON is the contract, and the sidecar's output stays its log.
async fn verify_file_sets(config_path: &Path) -> Result<usize> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("locating the pitr binary for the file sets' verification")?;
    let out = tokio::process::Command::new(&exe)
        .arg("--config")
        .arg(config_path)
        .args(["verify", "--source", "files", "--live", "--json"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {} verify --source files --live", exe.display()))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "pitr verify --source files --live ({}) printed no report ({e}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let mut corrupt = 0usize;
    for s in report["sets"].as_array().into_iter().flatten() {
        let Some(set) = s["set"].as_str() else { continue };
        let mismatches = s["mismatches"].as_u64().unwrap_or(0);
        let missing = s["missing_blocks"].as_u64().unwrap_or(0);
        gauge!("pitr_files_verify_mismatches", "set" => set.to_string()).set(mismatches as f64);
        gauge!("pitr_files_missing_objects", "source" => "files", "set" => set.to_string()).set(missing as f64);
        let live = &s["live"];
        let count = |k: &str| live[k].as_array().map_or(0, Vec::len);
        for c in live["corrupt"].as_array().into_iter().flatten() {
            tracing::error!(
                job = "files_verify",
                set,
                path = c["path"].as_str().unwrap_or("?"),
                "content differs from the newest backup although size and mtime are the same: {}",
                c["what"].as_str().unwrap_or("")
            );
        }
        corrupt += count("corrupt");
        tracing::info!(
            job = "files_verify",
            set,
            backup = live["backup"].as_str().unwrap_or("-"),
            mismatches,
            missing_blocks = missing,
            added = count("added"),
            removed = count("removed"),
            modified = count("modified"),
            metadata = count("metadata"),
            corrupt = count("corrupt"),
            "file set verified against the live tree"
        );
    }
    let findings = report["findings"].as_array().map_or(0, Vec::len);
    for f in report["findings"].as_array().into_iter().flatten() {
        tracing::error!(
            job = "files_verify",
            set = f["set"].as_str().unwrap_or("-"),
            kind = f["kind"].as_str().unwrap_or("-"),
            object = f["object"].as_str().unwrap_or("-"),
            "file set verify finding: {}",
            f["message"].as_str().unwrap_or("")
        );
    }
    Ok(findings + corrupt)
}

fn describe_set_job(kind: SetJobKind) -> &'static str {
    match kind {
        SetJobKind::FilesFull => "full backup",
        SetJobKind::FilesIncremental => "incremental backup",
        SetJobKind::Dump => "dump",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_backups_follow_the_prediction_the_spacing_and_the_chain() {
        let min = Duration::from_secs(600);
        let old = Some(Duration::from_secs(3600));
        // Just after a backup, the restore would take 100 s: a backup helps.
        let d = |p: Option<f64>, age: Option<Duration>, chain: usize, inc: bool| {
            auto_decision(p.map(|p| (p, 100.0)), 1000.0, 0.8, age, min, chain, inc)
        };
        assert_eq!(d(None, old, 1, true), AutoDecision::NoPrediction);
        assert_eq!(d(Some(f64::NAN), old, 1, true), AutoDecision::NoPrediction);
        assert_eq!(d(Some(799.0), old, 1, true), AutoDecision::Below);
        assert_eq!(d(Some(800.0), Some(Duration::from_secs(60)), 1, true), AutoDecision::TooSoon);
        assert!(matches!(d(Some(800.0), old, 1, true), AutoDecision::Take(true, _)));
        // No full backup, no incrementals (standby, before 17), or a long chain: a full one.
        assert!(matches!(d(Some(800.0), None, 0, true), AutoDecision::Take(false, w) if w.contains("no full")));
        assert!(matches!(d(Some(800.0), old, 1, false), AutoDecision::Take(false, _)));
        assert!(
            matches!(d(Some(800.0), old, AUTO_MAX_CHAIN, true), AutoDecision::Take(false, w) if w.contains("chain"))
        );
    }

    #[test]
    fn auto_takes_no_backup_that_cannot_help() {
        let (min, old) = (Duration::from_secs(600), Some(Duration::from_secs(3600)));
        // The data directory alone takes 850 s to write: over 800 s whatever the WAL.
        assert_eq!(auto_decision(Some((900.0, 850.0)), 1000.0, 0.8, old, min, 1, true), AutoDecision::Useless(850.0));
        // Without a full backup one is taken all the same.
        assert!(matches!(
            auto_decision(Some((900.0, 850.0)), 1000.0, 0.8, None, min, 0, true),
            AutoDecision::Take(false, _)
        ));
        assert!(matches!(
            auto_decision(Some((900.0, f64::NAN)), 1000.0, 0.8, old, min, 1, true),
            AutoDecision::NoPrediction
        ));
    }

    #[test]
    fn auto_spacing_counts_from_a_failed_attempt_too() {
        let s = 1_000_000;
        // A backup an hour ago, an attempt (that failed: no backup) a minute ago.
        assert_eq!(spacing_age(Some(0), 3540 * s, false, 3600 * s), Some(Duration::from_secs(60)));
        assert_eq!(spacing_age(Some(3000 * s), 0, false, 3600 * s), Some(Duration::from_secs(600)));
        assert_eq!(spacing_age(None, 3540 * s, false, 3600 * s), Some(Duration::from_secs(60)));
        assert_eq!(spacing_age(None, 0, false, 3600 * s), None);
        // A scheduled backup under way (a long full one by cron): none beside it.
        assert_eq!(spacing_age(Some(0), 0, true, 3600 * s), Some(Duration::ZERO));
    }

    #[test]
    fn auto_replaces_the_incremental_cron_with_a_check() {
        let schedule = ScheduleSection {
            incremental: "auto".into(),
            auto_min_spacing: Duration::from_secs(5),
            ..Default::default()
        };
        let jobs = jobs(&schedule).unwrap();
        let auto: Vec<&Job> = jobs.iter().filter(|j| j.name == "incremental").collect();
        assert_eq!(auto.len(), 1);
        assert!(matches!(auto[0].kind, JobKind::AutoBackup { min_spacing } if min_spacing == Duration::from_secs(5)));
        assert!(matches!(auto[0].when, When::Every(e) if e == Duration::from_secs(5)));
    }

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
    fn the_expected_interval_is_the_longest_gap_of_a_schedule() {
        let t = DateTime::from_timestamp(1_795_615_380, 0).unwrap();
        let gap = |expr: &str| longest_gap(utc_cron(parse_cron("x", expr).unwrap().unwrap()).as_ref(), t);
        assert_eq!(gap("*/3 * * * * *"), Some(Duration::from_secs(3)));
        assert_eq!(gap("0 0 * * * *"), Some(Duration::from_secs(3600)));
        assert_eq!(gap("0 0 2 * * *"), Some(Duration::from_secs(86_400)));
        // Sundays only; the 1st of each month: the longest month.
        assert_eq!(gap("0 6 * * 0"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(gap("0 4 1 * *"), Some(Duration::from_secs(31 * 86_400)));
        // Two runs an hour apart each day: the night between them counts.
        assert_eq!(gap("0 1,2 * * *"), Some(Duration::from_secs(23 * 3600)));
    }

    #[test]
    fn file_sets_and_dumps_get_their_jobs_and_zones() {
        let c = crate::config::Config::parse(
            "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n\
             [[files]]\nname = \"uploads\"\npath = \"/srv/uploads\"\n\
             [[files]]\nname = \"config\"\npath = \"/etc/app\"\nfull = \"0 3 * * *\"\nincremental = \"\"\n\
             [[dumps]]\nname = \"devdb\"\nconninfo = \"host=/tmp dbname=dev\"\ntime_zone = \"+02:00\"\n\
             [[dumps]]\nname = \"off\"\nconninfo = \"host=/tmp dbname=dev\"\nschedule = \"\"\n",
            &[],
        )
        .unwrap();
        let jobs = set_jobs(&c).unwrap();
        let kinds: Vec<(SetJobKind, &str)> = jobs.iter().map(|j| (j.kind, j.set.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (SetJobKind::FilesFull, "uploads"),
                (SetJobKind::FilesIncremental, "uploads"),
                (SetJobKind::FilesFull, "config"),
                (SetJobKind::Dump, "devdb"),
            ]
        );
        // The dump runs daily at 01:00 in +02:00, i.e. 23:00 UTC.
        let t = DateTime::from_timestamp(1_795_615_380, 0).unwrap();
        let next = (jobs[3].next)(t).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-11-25T23:00:00+00:00");
        assert_eq!(longest_gap(jobs[3].next.as_ref(), t), Some(Duration::from_secs(86_400)));
        assert_eq!((jobs[0].next)(t).unwrap().to_rfc3339(), "2026-11-26T02:00:00+00:00", "the default full: 02:00 UTC");
        let labels: Vec<(&str, &str, &str)> =
            jobs.iter().map(|j| (j.kind.name(), j.kind.source(), j.kind.backup_type())).collect();
        assert_eq!(labels[1], ("files_incremental", "files", "incremental"));
        assert_eq!(labels[3], ("dump", "dump", "full"));
        assert!(SetJobKind::FilesFull.catches_up() && SetJobKind::Dump.catches_up());
        assert!(!SetJobKind::FilesIncremental.catches_up());
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
