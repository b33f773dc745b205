//! The `[mongo]` section and the commands' MongoDB paths: `stream` (the oplog tailer, beside or
//! instead of the WAL receiver), `backup --source mongo`, `restore --source mongo`, and the mongo
//! window in `list`. The work is done by pitr-mongo; this file wires it to the config and prints.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::Repository;
use pitr_mongo::restore::{MongoRestoreReport, MongoTarget, RestoreOptions};
use pitr_mongo::tailer::{MongoStatus, TailerConfig};
use pitr_mongo::ts::format_us;
use pitr_mongo::MongoCatalog;
use serde::Deserialize;
use tokio::sync::watch;

use crate::config::Config;

/// `[mongo]`: a MongoDB replica set backed up beside (or instead of) PostgreSQL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoConfig {
    /// `mongodb://host:port/?replicaSet=NAME` (user and password in the URI if needed).
    pub uri: String,
    /// Objects go under `mongo/<name>/`; default the replica set's name.
    pub name: Option<String>,
    /// Longest time oplog entries wait before they are sealed into a slice (default 1 s).
    #[serde(default, with = "humantime_serde")]
    pub flush_interval: Option<Duration>,
    /// A slice is sealed sooner once this many bytes of entries are pending (default 16 MiB).
    pub max_slice_bytes: Option<usize>,
    /// How long to wait for the server when connecting (default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// A scratch server `pitr drill --source mongo` restores into. The drill drops every database
    /// on it first: never a server holding data you want.
    pub drill_target_uri: Option<String>,
    /// Cron for scheduled snapshots (default `[schedule] full_backup`; empty: off).
    pub snapshot_schedule: Option<String>,
    /// How often, while caught up, the tailer records that the archive holds every oplog entry
    /// the server has (a completeness mark; default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub complete_interval: Option<Duration>,
}

impl MongoConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.uri.starts_with("mongodb://") || self.uri.starts_with("mongodb+srv://")) {
            bail!("[mongo] uri: expected mongodb://host:port/?replicaSet=NAME");
        }
        if self.uri.starts_with("mongodb+srv://") {
            bail!("[mongo] uri: mongodb+srv:// needs DNS SRV lookups, which this build leaves out; list the hosts instead");
        }
        if let Some(n) = &self.name {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                bail!("[mongo] name = {n:?}: use letters, digits, `_` and `-`");
            }
        }
        if self.max_slice_bytes == Some(0) {
            bail!("[mongo] max_slice_bytes must be greater than 0");
        }
        if self.connect_timeout.is_some_and(|d| d.is_zero()) {
            bail!("[mongo] connect_timeout must be greater than 0");
        }
        if self.complete_interval.is_some_and(|d| d < Duration::from_millis(100)) {
            bail!("[mongo] complete_interval must be at least 100ms");
        }
        if let Some(u) = &self.drill_target_uri {
            if !u.starts_with("mongodb://") {
                bail!("[mongo] drill_target_uri: expected mongodb://host:port/");
            }
        }
        if let Some(cron) = &self.snapshot_schedule {
            crate::config::parse_cron("[mongo] snapshot_schedule", cron)?;
        }
        Ok(())
    }

    fn connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(Duration::from_secs(10))
    }

    fn tailer(&self) -> TailerConfig {
        TailerConfig {
            uri: self.uri.clone(),
            name: self.name.clone(),
            flush_interval: self.flush_interval.unwrap_or(Duration::from_secs(1)),
            max_slice_bytes: self.max_slice_bytes.unwrap_or(16 << 20),
            connect_timeout: self.connect_timeout(),
            batch_size: 1000,
            complete_interval: self.complete_interval.unwrap_or(Duration::from_secs(10)),
        }
    }
}

fn mongo(config: &Config) -> Result<&MongoConfig> {
    config
        .mongo
        .as_ref()
        .ok_or_else(|| anyhow!("the config has no [mongo] section (uri = \"mongodb://…/?replicaSet=…\")"))
}

/// Starts the oplog tailer beside the WAL receiver; the task ends when `shutdown` turns true.
pub fn spawn_beside(
    config: &Config,
    repo: Repository,
    shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<Result<()>>> {
    let m = config.mongo.as_ref()?;
    let (status_tx, _status_rx) = watch::channel(MongoStatus::default());
    let cfg = m.tailer();
    Some(tokio::spawn(async move {
        pitr_mongo::tailer::run(repo, cfg, status_tx, shutdown).await.context("[mongo] oplog tailer")
    }))
}

/// `pitr stream` with `[mongo]` and no `[postgres]`: the oplog tailer, /metrics and /healthz.
pub async fn stream_only(config: &Config, config_path: &std::path::Path, repo: Repository) -> Result<()> {
    let m = mongo(config)?;
    repo.check().await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (status_tx, mut status_rx) = watch::channel(MongoStatus::default());
    // /healthz judges a StreamStatus: fed from the tailer's, a recorded gap counting as unhealthy.
    let (health_tx, health_rx) = watch::channel(pitr_walstream::StreamStatus::default());
    let server = if config.metrics.listen.is_empty() {
        None
    } else {
        let handle = crate::sidecar::install_metrics()?;
        let listen = config.metrics.listen.parse().context("[metrics] listen")?;
        Some(crate::sidecar::serve(listen, handle, health_rx, config.targets.rpo_seconds, shutdown_rx.clone()).await?)
    };
    let jobs = spawn_jobs(config, config_path, repo.clone(), shutdown_rx.clone())?;
    tokio::spawn(async move {
        while status_rx.changed().await.is_ok() {
            let s = status_rx.borrow().clone();
            health_tx.send_modify(|h| {
                h.connected = s.connected && s.gaps_found == 0;
                h.lag_seconds = s.lag_seconds;
                h.last_error = if s.gaps_found > 0 {
                    Some(format!(
                        "{} oplog gap(s) recorded: the oplog rolled past the archive (see `pitr list`)",
                        s.gaps_found
                    ))
                } else if !s.connected {
                    Some("not connected to the MongoDB replica set".into())
                } else {
                    None
                };
                h.last_commit_time_us = s.archived_time_us;
                h.objects_archived = s.slices_archived;
            });
        }
    });
    tokio::spawn(async move {
        crate::commands::wait_for_signal().await;
        tracing::info!("stopping: sealing received oplog entries first");
        let _ = shutdown_tx.send(true);
    });
    tracing::info!(repository = %repo.location(), server = %pitr_mongo::redact(&m.uri), "pitr stream (MongoDB) starting");
    let result = pitr_mongo::tailer::run(repo, m.tailer(), status_tx, shutdown_rx).await;
    for job in jobs {
        // A running snapshot is abandoned; its blocks stay unreferenced and no manifest is written.
        job.abort();
    }
    if let Some(server) = server {
        server.abort();
    }
    crate::commands::finish_copies(Duration::from_secs(10)).await;
    result.map_err(|e| anyhow!("{e}"))?;
    tracing::info!("pitr stream stopped cleanly");
    Ok(())
}

pub async fn backup(config: &Config, repo: Repository, json: bool) -> Result<()> {
    let (manifest, seconds) = take_snapshot(config, &repo).await?;
    print_snapshot(&manifest, seconds, json)
}

/// Takes a snapshot and returns it with its duration (for `backup` and the scheduler).
pub async fn take_snapshot(config: &Config, repo: &Repository) -> Result<(pitr_mongo::SnapshotManifest, f64)> {
    let m = mongo(config)?;
    let opts = pitr_mongo::snapshot::SnapshotOptions {
        uri: m.uri.clone(),
        name: m.name.clone(),
        block_size: config.backup.block_size.unwrap_or(1 << 20),
        connect_timeout: m.connect_timeout(),
    };
    let started = std::time::Instant::now();
    let manifest = pitr_mongo::snapshot::snapshot(repo, &opts).await?;
    Ok((manifest, started.elapsed().as_secs_f64()))
}

fn print_snapshot(m: &pitr_mongo::SnapshotManifest, seconds: f64, json: bool) -> Result<()> {
    if json {
        let out = serde_json::json!({
            "id": m.id, "name": m.name, "source": "mongo",
            "ts_before": m.ts_before.to_string(), "ts_after": m.ts_after.to_string(),
            "consistent_time": format_us(m.time_after_us),
            "collections": m.collections.len(), "documents": m.documents,
            "logical_bytes": m.logical_bytes, "stored_bytes": m.stored_bytes, "seconds": seconds,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("mongo snapshot {} of {}", m.id, m.name);
    println!(
        "  collections: {}, documents: {}, {} bytes ({} newly stored)",
        m.collections.len(),
        m.documents,
        m.logical_bytes,
        m.stored_bytes
    );
    println!("  oplog: {} .. {}; consistent at {} once replayed", m.ts_before, m.ts_after, format_us(m.time_after_us));
    println!("  took {seconds:.1} s");
    Ok(())
}

/// `--to` for MongoDB: TIME, `ts:SECONDS:INC` or `latest`.
pub fn parse_target(s: &str) -> Result<MongoTarget> {
    MongoTarget::parse(s).map_err(|e| anyhow!("--to {e}"))
}

pub async fn restore(
    config: &Config,
    repo: Repository,
    to: &str,
    target_uri: &str,
    drop: bool,
    json: bool,
) -> Result<()> {
    let target = parse_target(to)?;
    repo.check().await?;
    let layout = pitr_mongo::resolve_name(&repo, config.mongo.as_ref().and_then(|m| m.name.as_deref())).await?;
    let catalog = MongoCatalog::load(&repo, layout).await?;
    let connect_timeout = config.mongo.as_ref().map(|m| m.connect_timeout()).unwrap_or(Duration::from_secs(10));
    let opts = RestoreOptions { target, target_uri: target_uri.to_string(), drop, connect_timeout };
    let report = pitr_mongo::restore::restore(&repo, &catalog, &opts).await?;
    print_report(&report, json)
}

fn print_report(r: &MongoRestoreReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!("restored {} (mongo) to {} into {}", r.name, r.target, r.target_uri);
    println!(
        "  snapshot used:          {} (oplog {} .. {}, consistent at {})",
        r.snapshot_id, r.snapshot_ts_before, r.snapshot_ts_after, r.snapshot_consistent_time
    );
    println!(
        "  loaded:                 {} collections, {} documents ({} bytes), {} indexes, in {:.1} s",
        r.collections, r.documents, r.bytes_restored, r.indexes_built, r.load_seconds
    );
    if let Some(t) = &r.newest_archived_ts {
        println!("  newest archived entry:  {} ({})", t, r.newest_archived_time.as_deref().unwrap_or("-"));
    }
    println!("  oplog applied:          {} entries ({} transactions)", r.entries_applied, r.transactions_applied);
    println!(
        "  last applied entry:     {} ({})",
        r.last_applied_ts.as_deref().unwrap_or("(none after the snapshot)"),
        r.last_applied_time.as_deref().unwrap_or("-")
    );
    println!("  data-loss window (RPO): {:.6} s", r.data_loss_window_seconds);
    println!("  replay:                 {:.1} s", r.replay_seconds);
    println!("  total (RTO):            {:.1} s", r.total_seconds);
    Ok(())
}

/// The mongo part of `pitr list`, as JSON; `None` when there is nothing to show.
pub async fn list_json(config: &Config, repo: &Repository) -> Result<Option<serde_json::Value>> {
    let configured = config.mongo.as_ref().and_then(|m| m.name.as_deref());
    if config.mongo.is_none() && pitr_mongo::layout::names(repo).await?.is_empty() {
        return Ok(None);
    }
    let layout = match pitr_mongo::resolve_name(repo, configured).await {
        Ok(l) => l,
        Err(pitr_mongo::MongoError::Nothing { .. }) => {
            return Ok(Some(serde_json::json!({ "snapshots": [], "recoverable_windows": [], "gaps": [] })))
        }
        Err(e) => return Err(e.into()),
    };
    let c = MongoCatalog::load(repo, layout).await?;
    let snapshots: Vec<_> = c
        .snapshots
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id, "ts_before": s.ts_before.to_string(), "ts_after": s.ts_after.to_string(),
                "consistent_time": format_us(s.time_after_us), "collections": s.collections.len(),
                "documents": s.documents, "logical_bytes": s.logical_bytes, "stored_bytes": s.stored_bytes,
            })
        })
        .collect();
    let windows: Vec<_> = c
        .windows()
        .iter()
        .map(|w| {
            serde_json::json!({
                "snapshot": w.snapshot, "from": format_us(w.from_us), "from_ts": w.from_ts.to_string(),
                "to": w.to_us.map(format_us), "to_ts": w.to_ts.to_string(),
            })
        })
        .collect();
    let gaps: Vec<_> =
        c.gaps.iter().map(|(a, b)| serde_json::json!({ "after": a.to_string(), "before": b.to_string() })).collect();
    Ok(Some(serde_json::json!({
        "name": c.layout.name,
        "archived_to": c.last_archived().map(|(t, _)| t.to_string()),
        "complete_up_to": c.complete_up_to_us.map(format_us),
        "slices": c.runs.iter().map(|r| r.slices.len()).sum::<usize>(),
        "snapshots": snapshots, "recoverable_windows": windows, "gaps": gaps,
    })))
}

pub fn print_list(v: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    println!("mongo {} (oplog archived to {}, {} slices)", s(&v["name"]), s(&v["archived_to"]), v["slices"]);
    let snaps = v["snapshots"].as_array().cloned().unwrap_or_default();
    if snaps.is_empty() {
        println!("no mongo snapshots yet (run `pitr backup --source mongo`)");
    }
    for b in snaps {
        println!(
            "  snapshot {}  consistent at {} ({})  {} collections, {} documents",
            s(&b["id"]),
            s(&b["consistent_time"]),
            s(&b["ts_after"]),
            b["collections"],
            b["documents"]
        );
    }
    for w in v["recoverable_windows"].as_array().cloned().unwrap_or_default() {
        println!("  restorable from {} ({}) to {} ({})", s(&w["from"]), s(&w["from_ts"]), s(&w["to"]), s(&w["to_ts"]));
    }
    for g in v["gaps"].as_array().cloned().unwrap_or_default() {
        println!(
            "  GAP: oplog entries between {} and {} were lost (the oplog rolled over while pitr was away)",
            s(&g["after"]),
            s(&g["before"])
        );
    }
}

/// `pitr list` for a config with `[mongo]` and no `[postgres]`.
pub async fn list_only(config: &Config, repo: &Repository, json: bool) -> Result<()> {
    repo.check().await?;
    let v = list_json(config, repo).await?.unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "mongo": v }))?);
    } else {
        print_list(&v);
    }
    Ok(())
}

/// The catalog of the replica set `[mongo] name` (or the one the repository holds).
async fn load_catalog(config: &Config, repo: &Repository) -> Result<MongoCatalog> {
    let layout = pitr_mongo::resolve_name(repo, config.mongo.as_ref().and_then(|m| m.name.as_deref())).await?;
    Ok(MongoCatalog::load(repo, layout).await?)
}

/// `pitr verify --source mongo`: one repository alone, as for PostgreSQL.
pub async fn verify(config_path: &std::path::Path, from: Option<&str>, deep: bool, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let repo = crate::commands::open_single(&config, from)?;
    repo.check().await?;
    let catalog = load_catalog(&config, &repo).await?;
    let report = pitr_mongo::verify::verify(&repo, &catalog, deep).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "verified mongo {} in {}: {} slices in {} run(s), {} snapshots, {} blocks ({} unreferenced){}",
            report.name,
            repo.location(),
            report.slices,
            report.runs,
            report.snapshots,
            report.blocks,
            report.unreferenced_blocks,
            if deep {
                format!(", {} objects opened, {} oplog entries checked", report.objects_opened, report.entries_checked)
            } else {
                String::new()
            }
        );
        for w in &report.warnings {
            println!("WARNING {}: {}: {}", w.kind, w.object, w.message);
        }
        for f in &report.findings {
            println!("FINDING {}: {}: {}", f.kind, f.object, f.message);
        }
        println!("{}", if report.ok { "OK: no findings" } else { "FAILED" });
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub struct DrillArgs {
    pub to: String,
    pub checks: Option<std::path::PathBuf>,
    pub report: Option<std::path::PathBuf>,
    pub json: bool,
    pub test_type: String,
    pub from: Option<String>,
}

/// Runs a MongoDB drill and stores its result beside the replica set's objects.
pub async fn run_drill(
    config: &Config,
    repo: &Repository,
    target: Option<MongoTarget>,
    checks: pitr_restore::drill::ChecksFile,
    test_type: &str,
) -> Result<pitr_restore::drill::DrillReport> {
    let m = mongo(config)?;
    let drill_uri = m.drill_target_uri.clone().ok_or_else(|| {
        anyhow!("a MongoDB drill needs a scratch server: set [mongo] drill_target_uri = \"mongodb://host:port/\" (its databases are dropped)")
    })?;
    repo.check().await?;
    let catalog = load_catalog(config, repo).await?;
    let opts = pitr_mongo::drill::MongoDrillOptions {
        target,
        source_uri: m.uri.clone(),
        drill_uri,
        connect_timeout: m.connect_timeout(),
        checks,
        rto_target_seconds: config.targets.rto_seconds,
        rpo_target_seconds: config.targets.rpo_seconds,
        test_type: test_type.to_string(),
    };
    let report = pitr_mongo::drill::drill(repo, &catalog, &opts).await?;
    // Stored through the primary (and so copied to secondaries), as PostgreSQL drills are.
    let stored = match crate::commands::open_repository(config) {
        Ok(writer) => pitr_restore::drill::store_result_under(&writer, &catalog.layout.prefix(), &report)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        tracing::warn!(error = %format!("{e:#}"), "could not store the drill result in the repository");
    }
    Ok(report)
}

pub async fn drill(config_path: &std::path::Path, args: DrillArgs) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let checks = crate::commands::load_checks(args.checks.as_deref())?;
    let target = if args.to.eq_ignore_ascii_case("random") { None } else { Some(parse_target(&args.to)?) };
    let repo = crate::commands::open_reader(&config, args.from.as_deref())?;
    let report = run_drill(&config, &repo, target, checks, &args.test_type).await?;
    crate::commands::write_drill_report(&report, args.report.as_deref(), args.json)?;
    Ok(if report.outcome == "PASS" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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
pub fn spawn_jobs(
    config: &Config,
    config_path: &std::path::Path,
    repo: Repository,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let Some(m) = &config.mongo else { return Ok(Vec::new()) };
    let snapshot = m.snapshot_schedule.as_deref().unwrap_or(&config.schedule.full_backup);
    let mut jobs = vec![
        (MongoJob::Snapshot, crate::config::parse_cron("[mongo] snapshot_schedule", snapshot)?),
        (MongoJob::Verify, crate::config::parse_cron("[schedule] verify", &config.schedule.verify)?),
    ];
    if m.drill_target_uri.is_some() {
        jobs.push((MongoJob::Drill, crate::config::parse_cron("[schedule] drill", &config.schedule.drill)?));
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
            crate::sidecar::run_on_schedule(job.name(), &cron, catch_up, shutdown, || run_job(job, path, repo)).await;
        }));
    }
    let (repo, path) = (repo.clone(), config_path.to_path_buf());
    handles.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = feed_gauges(&path, &repo).await {
                tracing::debug!(error = %format!("{e:#}"), "MongoDB catalog gauges not updated");
            }
        }
    }));
    Ok(handles)
}

async fn newest_snapshot_start(path: &std::path::Path, repo: &Repository) -> Option<chrono::DateTime<chrono::Utc>> {
    let config = Config::load(path).ok()?;
    let catalog = load_catalog(&config, repo).await.ok()?;
    catalog.snapshots.iter().map(|s| s.started_us).max().and_then(chrono::DateTime::from_timestamp_micros)
}

fn record_snapshot_gauges(s: &pitr_mongo::SnapshotManifest) {
    let labels = [("backup_type", "full".to_string()), ("source", "mongo".to_string())];
    metrics::gauge!("pitr_last_backup_timestamp_seconds", &labels).set(s.finished_us as f64 / 1e6);
    metrics::gauge!("backup_size_bytes", &labels).set(s.logical_bytes as f64);
}

fn record_drill_gauges(outcome: &str, rto: Option<f64>, rpo: Option<f64>) {
    crate::sidecar::record_drill_gauges(&[("source", "mongo".to_string())], outcome, rto, rpo);
}

/// The newest snapshot's age and the newest drill's result, from the repository (so that they
/// survive a restart and include `pitr backup`/`pitr drill` run by hand).
async fn feed_gauges(path: &std::path::Path, repo: &Repository) -> Result<()> {
    let config = Config::load(path)?;
    let catalog = load_catalog(&config, repo).await?;
    if let Some(s) = catalog.snapshots.iter().max_by_key(|s| s.finished_us) {
        record_snapshot_gauges(s);
    }
    if let Some(d) = pitr_restore::drill::latest_result_under(repo, &catalog.layout.prefix()).await? {
        let outcome = d["outcome"].as_str().unwrap_or("FAIL").to_string();
        record_drill_gauges(&outcome, d["rto_achieved_seconds"].as_f64(), d["rpo_achieved_seconds"].as_f64());
    }
    Ok(())
}

fn count_run(job: MongoJob, result: &'static str) {
    metrics::counter!("pitr_scheduled_runs_total", "job" => job.name(), "result" => result).increment(1);
}

async fn run_job(job: MongoJob, path: &std::path::Path, repo: &Repository) {
    let name = job.name();
    tracing::info!(job = name, event = "start", "scheduled MongoDB job starting");
    // The config is read again for each run, as `pitr backup`/`drill` would read it.
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(job = name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled MongoDB job failed");
            count_run(job, "failure");
            return;
        }
    };
    let labels = [("backup_type", "full".to_string()), ("source", "mongo".to_string())];
    match job {
        MongoJob::Snapshot => match take_snapshot(&config, repo).await {
            Ok((s, seconds)) => {
                metrics::gauge!("backup_success", &labels).set(1.0);
                record_snapshot_gauges(&s);
                tracing::info!(job = name, event = "end", result = "success", snapshot = %s.id, documents = s.documents,
                    stored_bytes = s.stored_bytes, seconds, "scheduled MongoDB snapshot done");
                count_run(job, "success");
            }
            Err(e) => {
                metrics::gauge!("backup_success", &labels).set(0.0);
                tracing::error!(job = name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled MongoDB snapshot failed");
                count_run(job, "failure");
            }
        },
        MongoJob::Verify => {
            let report = match load_catalog(&config, repo).await {
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
                    count_run(job, if r.ok { "success" } else { "failure" });
                }
                Err(e) => {
                    tracing::error!(job = name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled MongoDB verification failed");
                    count_run(job, "failure");
                }
            }
        }
        MongoJob::Drill => match run_drill(&config, repo, None, Default::default(), "Monthly (scheduled)").await {
            Ok(r) => {
                record_drill_gauges(&r.outcome, r.rto_achieved_seconds, r.rpo_achieved_seconds);
                tracing::info!(job = name, event = "end", result = %r.outcome, rto = ?r.rto_achieved_seconds,
                    rpo = ?r.rpo_achieved_seconds, issues = ?r.issues, "scheduled MongoDB drill done");
                count_run(job, if r.outcome == "PASS" { "success" } else { "failure" });
            }
            Err(e) => {
                record_drill_gauges("FAIL", None, None);
                tracing::error!(job = name, event = "end", result = "failure", error = %format!("{e:#}"), "scheduled MongoDB drill failed");
                count_run(job, "failure");
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n";

    #[test]
    fn mongo_section_defaults_and_errors() {
        let c = Config::parse(&format!("{BASE}[mongo]\nuri = \"mongodb://h:1/?replicaSet=rs0\"\n"), &[]).unwrap();
        let t = c.mongo.as_ref().unwrap().tailer();
        assert_eq!(
            (t.flush_interval, t.max_slice_bytes, t.connect_timeout),
            (Duration::from_secs(1), 16 << 20, Duration::from_secs(10))
        );
        let env = [("PITR_MONGO_FLUSH_INTERVAL".to_string(), "250ms".to_string())];
        let c = Config::parse(&format!("{BASE}[mongo]\nuri = \"mongodb://h:1/\"\n"), &env).unwrap();
        assert_eq!(c.mongo.unwrap().tailer().flush_interval, Duration::from_millis(250));
        for (extra, needle) in [
            ("uri = \"http://h\"", "[mongo] uri"),
            ("uri = \"mongodb+srv://h\"", "mongodb+srv"),
            ("uri = \"mongodb://h\"\nname = \"a b\"", "[mongo] name"),
            ("uri = \"mongodb://h\"\nflush_intervall = \"1s\"", "flush_intervall"),
        ] {
            let err = format!("{:#}", Config::parse(&format!("{BASE}[mongo]\n{extra}\n"), &[]).unwrap_err());
            assert!(err.contains(needle), "expected {needle:?} in {err}");
        }
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target("latest").unwrap(), MongoTarget::Latest);
        assert_eq!(parse_target("ts:10:2").unwrap(), MongoTarget::Ts(pitr_mongo::Ts { secs: 10, inc: 2 }));
        assert!(parse_target("ts:10").unwrap_err().to_string().contains("ts:SECONDS:INC"));
        assert!(matches!(parse_target("2026-12-01T22:05:30.5Z").unwrap(), MongoTarget::Time(_)));
        assert!(parse_target("lsn:0/1").unwrap_err().to_string().contains("for MongoDB"));
    }
}
