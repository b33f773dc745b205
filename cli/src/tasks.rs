//! The work a command and the sidecar's scheduled jobs both do, built from the config: backup
//! and drill options, `restore_command`, applying `[retention]`, a MongoDB snapshot and drill.
//! The commands print; the scheduler logs and counts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pitr_archive::Repository;
use pitr_pgwire::ConnInfo;

use crate::config::{Config, PostgresConfig};
use crate::open;

/// `BASE_BACKUP` options from `[backup]` for the `[postgres]` cluster whose primary is at
/// `primary`: taken from `[backup] conninfo`'s standby when one is configured, else from the primary.
pub fn backup_options(
    config: &Config,
    pg: &PostgresConfig,
    primary: ConnInfo,
    incremental: bool,
) -> Result<pitr_basebackup::BackupOptions> {
    let (conninfo, primary) = match config.backup.standby_connection_info(pg)? {
        Some(standby) => (standby, Some(primary)),
        None => (primary, None),
    };
    Ok(pitr_basebackup::BackupOptions {
        conninfo,
        primary,
        application_name: format!("{}_backup", pg.application_name()),
        block_size: config.backup.block_size.unwrap_or(1 << 20),
        parallel_uploads: config.backup.parallel(),
        wal_timeout: config.backup.wal_timeout.unwrap_or(Duration::from_secs(120)),
        fast_checkpoint: true,
        incremental,
        stale_backup_after: config.retention.stale_backup_after,
        max_rate_kib: config.backup.max_rate_kib()?,
        pin: None,
    })
}

fn shell_quote(p: &Path) -> String {
    format!(
        "\"{}\"",
        p.display().to_string().replace('\\', "\\\\").replace('"', "\\\"").replace('$', "\\$").replace('`', "\\`")
    )
}

/// `restore_command` for a restored server: this pitr binary, by absolute path, with this config,
/// reading from the repository the restore read from.
pub fn restore_command(config_path: &Path, from: Option<&str>) -> Result<pitr_restore::WalFetchCommand> {
    let exe = std::env::current_exe().context("locating the pitr binary for restore_command")?;
    let config_abs =
        std::fs::canonicalize(config_path).with_context(|| format!("config file {}", config_path.display()))?;
    // Repository names are [A-Za-z0-9_-] (the config checks), so they need no quoting.
    Ok(pitr_restore::WalFetchCommand {
        program: format!("{} --config {}", shell_quote(&exe), shell_quote(&config_abs)),
        options: from.map(|f| vec!["--from".to_string(), f.to_string()]).unwrap_or_default(),
    })
}

/// PostgreSQL's binaries for the archived cluster's major version (`[postgres] bin_dir`, or
/// where the packages put them).
pub fn pg_bin_dir(config: &Config, catalog: &pitr_restore::Catalog) -> Result<PathBuf> {
    let configured = config.postgres.as_ref().and_then(|p| p.bin_dir.as_deref());
    pitr_restore::pg_bin::bin_dir(configured, catalog.cluster.server_version_num)
        .map_err(|e| anyhow!("{e}: set [postgres] bin_dir"))
}

/// Drill options from the config: a random target, no extra checks, scratch space in $TMPDIR.
pub fn drill_options(
    config: &Config,
    config_path: &Path,
    catalog: &pitr_restore::Catalog,
) -> Result<pitr_restore::drill::DrillOptions> {
    Ok(pitr_restore::drill::DrillOptions {
        target: pitr_restore::drill::DrillTarget::Random,
        scratch_root: std::env::temp_dir(),
        bin_dir: pg_bin_dir(config, catalog)?,
        db_user: std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
        restore_command: restore_command(config_path, None)?,
        workers: config.backup.parallel(),
        rto_target_seconds: config.targets.rto_seconds,
        rpo_target_seconds: config.targets.rpo_seconds,
        checks: Default::default(),
        keep: false,
        timeout: Duration::from_secs_f64(config.targets.rto_seconds * 2.0),
        test_type: "On demand".into(),
        marker_repository: None,
    })
}

/// Applies `[retention]` to the cluster's backups, WAL and blocks (`dry_run`: only says what
/// would go). Shared by `pitr expire` and the sidecar's scheduled job.
pub async fn expire(config: &Config, repo: &Repository, dry_run: bool) -> Result<pitr_archive::expire::ExpireReport> {
    let cluster = open::checked_cluster(config, repo).await?;
    let opts = pitr_archive::expire::ExpireOptions {
        policy: config.retention.policy(),
        now_us: pitr_archive::now_us(),
        dry_run,
        stale_backup_after: config.retention.stale_backup_after,
        lock_ttl: config.retention.lock_ttl,
        // Keep-forever backups stay under lock for as long as a new object would be.
        keep_forever_lock: Duration::from_secs(u64::from(config.repository.object_lock_days.unwrap_or(1)) * 86_400),
    };
    pitr_archive::expire::expire(repo, &cluster, &opts).await.with_context(|| format!("expire in {}", repo.location()))
}

/// Takes a MongoDB snapshot and returns it with its duration (for `backup` and the scheduler).
pub async fn mongo_snapshot(config: &Config, repo: &Repository) -> Result<(pitr_mongo::SnapshotManifest, f64)> {
    let m = config.mongo()?;
    let opts = pitr_mongo::snapshot::SnapshotOptions {
        uri: m.uri.clone(),
        name: m.name.clone(),
        block_size: config.backup.block_size.unwrap_or(1 << 20),
        connect_timeout: m.connect_timeout(),
        batch_size: m.batch_size(),
    };
    let started = std::time::Instant::now();
    let manifest = pitr_mongo::snapshot::snapshot(repo, &opts).await?;
    Ok((manifest, started.elapsed().as_secs_f64()))
}

/// Runs a MongoDB drill and stores its result beside the replica set's objects.
pub async fn mongo_drill(
    config: &Config,
    repo: &Repository,
    target: Option<pitr_mongo::restore::MongoTarget>,
    checks: pitr_drill::ChecksFile,
    test_type: &str,
) -> Result<pitr_drill::DrillReport> {
    let m = config.mongo()?;
    let drill_uri = m.drill_target_uri.clone().ok_or_else(|| {
        anyhow!("a MongoDB drill needs a scratch server: set [mongo] drill_target_uri = \"mongodb://host:port/\" (its databases are dropped)")
    })?;
    repo.check().await?;
    let catalog = open::mongo_catalog(config, repo).await?;
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
    let subject = pitr_drill::Subject::Mongo { name: catalog.layout.name.clone() };
    let stored = match open::writer(config) {
        Ok(writer) => pitr_drill::store_result(&writer, &subject, &report).await.map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        tracing::warn!(error = %format!("{e:#}"), "could not store the drill result in the repository");
    }
    Ok(report)
}

/// The predicted RTO of a restore now (`pitr_drill::rto`): the chain a restore to `latest` would
/// use, and the WAL from its start to the newest archived LSN on the current timeline, fed to
/// the model the newest drills and restores run by hand taught. `Err` only when the repository
/// cannot be listed.
pub async fn predicted_rto(repo: &Repository, catalog: &pitr_restore::Catalog) -> Result<RtoPrediction> {
    let subject = pitr_drill::Subject::Postgres { system_id: catalog.cluster.system_id };
    let samples = pitr_drill::rto::load_samples(repo, &subject).await?;
    let Some(model) = pitr_drill::rto::fit(&samples) else { return Ok(RtoPrediction::NoDrill) };
    Ok(predict_with(&model, catalog))
}

/// What [`predicted_rto`] found.
#[derive(Debug)]
pub enum RtoPrediction {
    /// No drill (nor restore run by hand) has timed a restore yet.
    NoDrill,
    /// Nothing can be restored to `latest` now: why.
    NotRestorable(String),
    /// The prediction.
    Predicted(pitr_drill::rto::Prediction),
}

impl RtoPrediction {
    /// The prediction, if there is one.
    pub fn prediction(&self) -> Option<&pitr_drill::rto::Prediction> {
        match self {
            RtoPrediction::Predicted(p) => Some(p),
            _ => None,
        }
    }
}

/// [`predicted_rto`] with a model already fitted.
pub fn predict_with(model: &pitr_drill::rto::Model, catalog: &pitr_restore::Catalog) -> RtoPrediction {
    let chosen = catalog.choose_backup(pitr_restore::RecoveryTarget::Latest).and_then(|b| Ok((b, catalog.chain(b)?)));
    let (backup, chain) = match chosen {
        Ok(c) => c,
        Err(e) => return RtoPrediction::NotRestorable(e.to_string()),
    };
    let end_lsn = catalog.current_window().map_or(backup.stop_lsn, |w| w.end_lsn.max(backup.stop_lsn));
    match model.predict_chain(&chain, end_lsn) {
        Some(p) => RtoPrediction::Predicted(p),
        None => RtoPrediction::NotRestorable("the model gives no finite time".into()),
    }
}
