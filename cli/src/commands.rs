//! One function per subcommand: load the config, open what is needed, call the library crates,
//! print for people (or JSON), and add context to errors.

use pitr_archive::now_us;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::layout::{WalCatalog, WalLayout, MARKER};
use pitr_archive::{KeyRing, LocalStore, PutOutcome, Repository, Store};
use pitr_pgwire::{format_lsn, ConnInfo};
use pitr_walstream::{StreamConfig, StreamStatus};
use tokio::sync::watch;

use crate::config::Config;

/// The configured storage backend: a local directory, or an S3 bucket for `url = "s3://…"`.
fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    Ok(match &config.repository.url {
        Some(url) => {
            let r = &config.repository;
            let opts = pitr_archive::s3::S3Options {
                endpoint: r.endpoint.clone(),
                region: r.region.clone(),
                allow_http: r.allow_http,
                force_path_style: r.force_path_style,
            };
            Arc::new(pitr_archive::s3::S3Store::new(url, &opts).context("[repository] url")?)
        }
        None => Arc::new(LocalStore::new(config.repository_path())),
    })
}

fn open_repository(config: &Config) -> Result<Repository> {
    let keys = KeyRing::load(&config.encryption.key_file).context("[encryption] key_file")?;
    Ok(Repository::new(open_store(config)?, keys).with_zstd_level(config.repository.zstd_level))
}

pub async fn init(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let key_file = &config.encryption.key_file;
    let store = open_store(&config)?;
    let keys = if key_file.exists() {
        let keys = KeyRing::load(key_file).context("[encryption] key_file")?;
        println!("using existing key file {} (active key {})", key_file.display(), keys.active().id);
        keys
    } else {
        // A new key cannot open an initialised repository: refuse before leaving a useless key file.
        if store.head(MARKER).await.context("[repository]")?.is_some() {
            bail!(
                "[encryption] key_file {} does not exist, but repository {} is already initialised with another key; \
                 set key_file to the key file it was initialised with",
                key_file.display(),
                store.location()
            );
        }
        let keys = KeyRing::create(key_file).context("[encryption] key_file: creating it")?;
        println!(
            "created key file {} (key {}, mode 0600): back it up apart from the repository; without it the archive cannot be read",
            key_file.display(),
            keys.active().id
        );
        keys
    };
    if config.repository.url.is_none() {
        LocalStore::new(config.repository_path()).create_root().context("[repository] path")?;
    }
    let repo = Repository::new(store, keys);
    match repo.init().await.context("initialising the repository")? {
        PutOutcome::Created => println!("initialised repository {}", repo.location()),
        PutOutcome::AlreadyExists => {
            println!("repository {} was already initialised; the key opens it", repo.location())
        }
    }
    Ok(())
}

pub async fn stream(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let pg = config.postgres()?;
    let conninfo: ConnInfo = pg.conninfo.parse().map_err(|e| anyhow!("[postgres] conninfo: {e}"))?;
    let repo = open_repository(&config)?;
    // A wrong key or a missing repository is reported before anything starts.
    repo.check().await?;
    let stream_config = StreamConfig {
        conninfo,
        slot: pg.slot(),
        create_slot: pg.create_slot,
        application_name: pg.application_name(),
        flush_interval: config.flush_interval(),
        status_interval: config.stream.status_interval.unwrap_or(Duration::from_secs(10)),
        max_pending_bytes: config.stream.max_pending_bytes.unwrap_or(256 << 20),
        startup_timeout: config.stream.startup_timeout.unwrap_or(Duration::from_secs(15)),
        system_id: pg.system_id,
        lease_holder: config.stream.lease_holder.clone().unwrap_or_else(|| format!("{}/{}", hostname(), pg.slot())),
        lease_ttl: config.stream.lease_ttl.unwrap_or(Duration::from_secs(60)),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (status_tx, status_rx) = watch::channel(StreamStatus::default());

    // Everything that can fail on bad configuration fails here, before streaming starts.
    let jobs = crate::sidecar::jobs(&config.schedule)?;
    let server = if config.metrics.listen.is_empty() {
        None
    } else {
        let handle = crate::sidecar::install_metrics()?;
        let listen = config.metrics.listen.parse().context("[metrics] listen")?;
        let rpo = config.targets.rpo_seconds;
        Some(crate::sidecar::serve(listen, handle, status_rx.clone(), rpo, shutdown_rx.clone()).await?)
    };
    tokio::spawn(crate::sidecar::feed_gauges(status_rx.clone()));
    let catalog_gauges =
        tokio::spawn(crate::sidecar::feed_catalog_gauges(repo.clone(), pg.system_id, Duration::from_secs(60)));
    let ctx = std::sync::Arc::new(crate::sidecar::SchedulerContext {
        repo: repo.clone(),
        backup: backup_options(&config, pg, stream_config.conninfo.clone()),
        system_id: pg.system_id,
        config_path: config_path.to_path_buf(),
    });
    let mut scheduled = Vec::new();
    for job in jobs {
        scheduled.push(tokio::spawn(crate::sidecar::run_job(job, ctx.clone(), shutdown_rx.clone())));
    }

    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: making received WAL durable first");
        let _ = shutdown_tx.send(true);
    });
    let status_file = config.status_file();
    let writer = tokio::spawn(write_status_file(status_file.clone(), status_rx));
    tracing::info!(repository = %repo.location(), slot = %stream_config.slot, server = %stream_config.conninfo.redacted(), "pitr stream starting");
    let result = pitr_walstream::run(repo, stream_config, status_tx, shutdown_rx).await;
    let _ = writer.await;
    catalog_gauges.abort();
    for job in scheduled {
        // A running backup is abandoned; its blocks stay unreferenced and no manifest is written.
        job.abort();
    }
    if let Some(server) = server {
        server.abort();
    }
    result.map_err(|e| anyhow!("{e}"))?;
    tracing::info!("pitr stream stopped cleanly");
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Keeps the status file current (atomically replaced) while the sender lives.
async fn write_status_file(path: std::path::PathBuf, mut rx: watch::Receiver<StreamStatus>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let done = tokio::select! {
            r = rx.changed() => r.is_err(),
            _ = tick.tick() => false,
        };
        let snapshot = rx.borrow().clone();
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

fn rfc3339_us(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

#[derive(serde::Serialize)]
struct StatusReport {
    repository: String,
    system_id: u64,
    timeline: Option<u32>,
    archived_lsn: Option<String>,
    newest_archived_commit: Option<String>,
    primary_lsn: Option<String>,
    primary_error: Option<String>,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
    sidecar: Option<SidecarReport>,
}

#[derive(serde::Serialize)]
struct SidecarReport {
    connected: bool,
    host: Option<String>,
    received_lsn: String,
    durable_lsn: String,
    lag_bytes: u64,
    lag_seconds: f64,
    objects_archived: u64,
    bytes_archived: u64,
    upload_errors: u64,
    last_error: Option<String>,
    updated: String,
}

pub async fn status(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open_repository(&config)?;
    repo.check().await?;
    let system_id = config.postgres.as_ref().and_then(|p| p.system_id);
    let cluster = repo.resolve_cluster(system_id).await?;
    let layout = WalLayout::new(&cluster);
    let catalog = WalCatalog::build(&repo, layout).await?;
    let timeline = catalog.latest_timeline();
    let archived = timeline.and_then(|t| catalog.end_lsn(t));
    let newest_commit = match timeline {
        Some(t) => pitr_restore::plan::newest_commit_us(&repo, &catalog, t).await?,
        None => None,
    };

    let (primary_lsn, primary_error) = match &config.postgres {
        Some(pg) => match primary_position(&pg.conninfo, &pg.application_name()).await {
            Ok(lsn) => (Some(lsn), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        None => (None, Some("no [postgres] section".into())),
    };

    let sidecar = std::fs::read(config.status_file())
        .ok()
        .and_then(|b| serde_json::from_slice::<StreamStatus>(&b).ok())
        .filter(|s| now_us() - s.updated_at_us < 60_000_000)
        .map(|s| SidecarReport {
            connected: s.connected,
            host: s.host,
            received_lsn: format_lsn(s.received_lsn),
            durable_lsn: format_lsn(s.durable_lsn),
            lag_bytes: s.lag_bytes,
            lag_seconds: s.lag_seconds,
            objects_archived: s.objects_archived,
            bytes_archived: s.bytes_archived,
            upload_errors: s.upload_errors,
            last_error: s.last_error,
            updated: rfc3339_us(s.updated_at_us),
        });

    let report = StatusReport {
        repository: repo.location(),
        system_id: cluster.system_id,
        timeline,
        archived_lsn: archived.map(format_lsn),
        newest_archived_commit: newest_commit.map(rfc3339_us),
        primary_lsn: primary_lsn.map(format_lsn),
        primary_error,
        lag_bytes: match (primary_lsn, archived) {
            (Some(p), Some(a)) => Some(p.saturating_sub(a)),
            _ => None,
        },
        lag_seconds: sidecar.as_ref().map(|s| s.lag_seconds),
        sidecar,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("repository:             {}", report.repository);
    println!("system identifier:      {}", report.system_id);
    println!("timeline:               {}", report.timeline.map(|t| t.to_string()).unwrap_or_else(|| "-".into()));
    println!("archived (durable) LSN: {}", or_dash(&report.archived_lsn));
    println!("newest archived commit: {}", or_dash(&report.newest_archived_commit));
    match (&report.primary_lsn, &report.primary_error) {
        (Some(lsn), _) => println!("primary LSN:            {lsn}"),
        (None, Some(e)) => println!("primary LSN:            unknown ({e})"),
        _ => {}
    }
    if let Some(b) = report.lag_bytes {
        println!("lag:                    {b} bytes");
    }
    match &report.sidecar {
        Some(s) => {
            println!(
                "sidecar:                {} {}, received {}, durable {}, lag {:.3} s, {} objects / {} bytes archived, {} upload errors (as of {})",
                if s.connected { "streaming from" } else { "disconnected from" },
                s.host.as_deref().unwrap_or("-"),
                s.received_lsn,
                s.durable_lsn,
                s.lag_seconds,
                s.objects_archived,
                s.bytes_archived,
                s.upload_errors,
                s.updated
            );
            if let Some(e) = &s.last_error {
                println!("sidecar last error:     {e}");
            }
        }
        None => println!(
            "sidecar:                not running here (no fresh status file at {})",
            config.status_file().display()
        ),
    }
    Ok(())
}

async fn primary_position(conninfo: &str, application_name: &str) -> Result<u64> {
    let info: ConnInfo = conninfo.parse().map_err(|e| anyhow!("[postgres] conninfo: {e}"))?;
    let opts =
        pitr_pgwire::ConnectOptions { replication: true, application_name: format!("{application_name}_status") };
    let mut conn = tokio::time::timeout(Duration::from_secs(10), pitr_pgwire::Connection::connect(&info, &opts))
        .await
        .map_err(|_| anyhow!("timed out connecting"))??;
    let ident = conn.identify_system().await?;
    conn.close().await;
    Ok(ident.xlog_pos)
}

/// Exit codes follow restore_command's contract: 0 fetched, 1 not in the archive (PostgreSQL
/// then ends recovery there), 126 anything else, which makes PostgreSQL stop recovery with an
/// error instead of silently treating a damaged or unreachable archive as its end.
pub async fn wal_fetch(config_path: &Path, file: &str, dest: &Path) -> Result<ExitCode> {
    const ARCHIVE_ERROR: u8 = 126;
    let result = async {
        let config = Config::load(config_path)?;
        let repo = open_repository(&config)?;
        repo.check().await?;
        let system_id = config.postgres.as_ref().and_then(|p| p.system_id);
        let cluster = repo.resolve_cluster(system_id).await?;
        Ok::<_, anyhow::Error>(pitr_restore::wal_fetch(&repo, &cluster, file, dest).await)
    }
    .await;
    match result {
        Ok(Ok(fetched)) => {
            tracing::debug!(file, ?fetched, "fetched");
            start_prefetch(config_path, file, dest);
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(pitr_restore::FetchError::NotFound { .. })) | Ok(Err(pitr_restore::FetchError::BadName { .. })) => {
            eprintln!("pitr wal-fetch: {file} is not in the archive");
            Ok(ExitCode::from(1))
        }
        Ok(Err(e)) => {
            eprintln!("pitr wal-fetch: error: {e}");
            Ok(ExitCode::from(ARCHIVE_ERROR))
        }
        Err(e) => {
            eprintln!("pitr wal-fetch: error: {e:#}");
            Ok(ExitCode::from(ARCHIVE_ERROR))
        }
    }
}

fn progress_bar(enabled: bool, what: &'static str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} [{{bar:40}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

fn backup_options(
    config: &Config,
    pg: &crate::config::PostgresConfig,
    conninfo: ConnInfo,
) -> pitr_basebackup::BackupOptions {
    pitr_basebackup::BackupOptions {
        conninfo,
        application_name: format!("{}_backup", pg.application_name()),
        block_size: config.backup.block_size.unwrap_or(1 << 20),
        parallel_uploads: config.backup.parallel(),
        wal_timeout: config.backup.wal_timeout.unwrap_or(Duration::from_secs(120)),
        fast_checkpoint: true,
    }
}

pub async fn backup(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let pg = config.postgres()?;
    let conninfo: ConnInfo = pg.conninfo.parse().map_err(|e| anyhow!("[postgres] conninfo: {e}"))?;
    let repo = open_repository(&config)?;
    let opts = backup_options(&config, pg, conninfo);
    let bar = progress_bar(!json, "backup");
    let on_progress = |p: pitr_basebackup::Progress| {
        if let Some(bar) = &bar {
            bar.set_length(p.estimate.max(p.received));
            bar.set_position(p.received);
        }
    };
    let result = pitr_basebackup::take_backup(&repo, &opts, &on_progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (_, summary) = result.context("backup failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "backup {} done: {} files, {} bytes read, {} bytes stored ({} new blocks, {} reused; ratio {:.1}), WAL {}..{} on timeline {}, {:.1} s",
            summary.id,
            summary.files,
            summary.bytes_read,
            summary.bytes_stored,
            summary.blocks_new,
            summary.blocks_reused,
            summary.dedup_ratio,
            summary.start_lsn,
            summary.stop_lsn,
            summary.timeline,
            summary.duration_seconds
        );
    }
    Ok(())
}

async fn load_catalog(config: &Config, repo: &Repository) -> Result<pitr_restore::Catalog> {
    repo.check().await?;
    let system_id = config.postgres.as_ref().and_then(|p| p.system_id);
    let cluster = repo.resolve_cluster(system_id).await?;
    Ok(pitr_restore::Catalog::load(repo, cluster).await?)
}

#[derive(serde::Serialize)]
struct ListedBackup {
    id: String,
    kind: String,
    timeline: u32,
    start_time: String,
    stop_time: String,
    start_lsn: String,
    stop_lsn: String,
    logical_bytes: u64,
    stored_bytes: u64,
}

#[derive(serde::Serialize)]
struct ListedWindow {
    timeline: u32,
    from: Option<String>,
    to: Option<String>,
    from_lsn: Option<String>,
    to_lsn: String,
}

pub async fn list(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open_repository(&config)?;
    let catalog = load_catalog(&config, &repo).await?;
    let fmt = pitr_restore::format_time;
    let backups: Vec<ListedBackup> = catalog
        .backups
        .iter()
        .map(|b| ListedBackup {
            id: b.id.clone(),
            kind: b.kind.clone(),
            timeline: b.timeline,
            start_time: fmt(b.start_time_us),
            stop_time: fmt(b.stop_time_us),
            start_lsn: format_lsn(b.start_lsn),
            stop_lsn: format_lsn(b.stop_lsn),
            logical_bytes: b.logical_bytes,
            stored_bytes: b.stored_bytes,
        })
        .collect();
    let windows: Vec<ListedWindow> = catalog
        .windows
        .iter()
        .map(|w| ListedWindow {
            timeline: w.timeline,
            from: w.start_us.map(fmt),
            to: w.end_us.map(fmt),
            from_lsn: w.start_lsn.map(format_lsn),
            to_lsn: format_lsn(w.end_lsn),
        })
        .collect();
    if json {
        let out = serde_json::json!({ "system_id": catalog.cluster.system_id, "backups": backups, "recoverable_windows": windows });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("cluster {} in {}", catalog.cluster.system_id, repo.location());
    if backups.is_empty() {
        println!("no backups yet (run `pitr backup`)");
    } else {
        println!(
            "{:<18} {:<5} {:>3}  {:<33} {:<23} {:>14} {:>14}",
            "backup", "type", "tli", "stop time", "start..stop LSN", "logical", "stored"
        );
        for b in &backups {
            println!(
                "{:<18} {:<5} {:>3}  {:<33} {:<23} {:>14} {:>14}",
                b.id,
                b.kind,
                b.timeline,
                b.stop_time,
                format!("{}..{}", b.start_lsn, b.stop_lsn),
                b.logical_bytes,
                b.stored_bytes
            );
        }
    }
    for w in &windows {
        println!(
            "timeline {}: restorable from {} to {} (WAL to {})",
            w.timeline,
            w.from.as_deref().unwrap_or("(no backup yet)"),
            w.to.as_deref().unwrap_or("(no archived commit)"),
            w.to_lsn
        );
    }
    Ok(())
}

pub struct RestoreArgs {
    pub to: String,
    pub target_dir: std::path::PathBuf,
    pub start: bool,
    pub port: u16,
    pub force: bool,
    pub json: bool,
    pub db_user: Option<String>,
    pub timeout: Duration,
}

fn shell_quote(p: &Path) -> String {
    format!(
        "\"{}\"",
        p.display().to_string().replace('\\', "\\\\").replace('"', "\\\"").replace('$', "\\$").replace('`', "\\`")
    )
}

/// `restore_command` for a restored server: this pitr binary, by absolute path, with this config.
fn restore_command(config_path: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("locating the pitr binary for restore_command")?;
    let config_abs =
        std::fs::canonicalize(config_path).with_context(|| format!("config file {}", config_path.display()))?;
    Ok(format!("{} --config {} wal-fetch \"%f\" \"%p\"", shell_quote(&exe), shell_quote(&config_abs)))
}

/// PostgreSQL's binaries for the archived cluster's major version.
fn pg_bin_dir(config: &Config, catalog: &pitr_restore::Catalog) -> Result<std::path::PathBuf> {
    let major = catalog.cluster.server_version_num / 10000;
    let bin_dir = config
        .postgres
        .as_ref()
        .and_then(|p| p.bin_dir.clone())
        .unwrap_or_else(|| std::path::PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    if !bin_dir.join("pg_ctl").exists() {
        return Err(anyhow!("no pg_ctl in {} for PostgreSQL {major}: set [postgres] bin_dir", bin_dir.display()));
    }
    Ok(bin_dir)
}

pub async fn restore(config_path: &Path, args: RestoreArgs) -> Result<()> {
    let config = Config::load(config_path)?;
    let target = pitr_restore::parse_target(&args.to)?;
    let repo = open_repository(&config)?;
    let catalog = load_catalog(&config, &repo).await?;
    let restore_command = restore_command(config_path)?;
    let start = if args.start {
        let bin_dir = pg_bin_dir(&config, &catalog)?;
        let db_user = args.db_user.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "postgres".into());
        Some(pitr_restore::StartOptions { bin_dir, port: args.port, db_user, timeout: args.timeout })
    } else {
        None
    };
    let opts = pitr_restore::RestoreOptions {
        target,
        target_dir: args.target_dir.clone(),
        force: args.force,
        restore_command,
        workers: config.backup.parallel(),
        start,
    };
    let bar = progress_bar(!args.json, "restore");
    let on_progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let result = pitr_restore::restore(&repo, &catalog, &opts, &on_progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("restored {} to {}", report.target, report.target_dir);
    println!(
        "  backup used:            {} (consistent at {}, LSN {})",
        report.backup_id, report.backup_stop_time, report.backup_stop_lsn
    );
    println!(
        "  files:                  {} ({} bytes), written in {:.1} s",
        report.files, report.bytes_restored, report.download_seconds
    );
    if let Some(c) = &report.newest_archived_commit {
        println!("  newest archived commit: {c}");
    }
    if report.started {
        println!(
            "  last replayed commit:   {}",
            report.last_replayed_commit_time.as_deref().unwrap_or("(none replayed)")
        );
        println!("  last replayed LSN:      {}", report.last_replayed_lsn.as_deref().unwrap_or("-"));
        if let Some(x) = report.last_replayed_xid {
            println!("  last replayed xid:      {x}");
        }
        match report.data_loss_window_seconds {
            Some(w) => println!("  data-loss window (RPO): {w:.6} s"),
            None => println!("  data-loss window (RPO): not measurable for this target kind"),
        }
        println!("  replay:                 {:.1} s", report.replay_seconds.unwrap_or(0.0));
        println!("  total (RTO):            {:.1} s", report.total_seconds);
        println!(
            "  the server is running on port {}; stop it with: {}",
            report.port.unwrap_or(0),
            report.stop_command.as_deref().unwrap_or("")
        );
    } else {
        println!("  recovery settings written to postgresql.auto.conf (recovery.signal present); start the server to replay to the target");
    }
    Ok(())
}

pub async fn verify(config_path: &Path, deep: bool, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let repo = open_repository(&config)?;
    let catalog = load_catalog(&config, &repo).await?;
    let report = pitr_restore::verify::verify(&repo, &catalog, deep, config.backup.parallel()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "verified {}: timelines {:?}, {} segments, {} backups, {} blocks{}",
            repo.location(),
            report.timelines,
            report.segments,
            report.backups,
            report.blocks,
            if deep { format!(", {} objects opened and authenticated", report.objects_opened) } else { String::new() }
        );
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
    pub keep: bool,
    pub db_user: Option<String>,
    pub test_type: String,
}

/// Reads a drill checks file; every bad key or value is named.
pub fn load_checks(path: Option<&Path>) -> Result<pitr_restore::drill::ChecksFile> {
    let Some(path) = path else { return Ok(Default::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("checks file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("checks file {}: {}", path.display(), e.to_string().trim_end()))
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
        restore_command: restore_command(config_path)?,
        workers: config.backup.parallel(),
        rto_target_seconds: config.targets.rto_seconds,
        rpo_target_seconds: config.targets.rpo_seconds,
        checks: Default::default(),
        keep: false,
        timeout: Duration::from_secs_f64(config.targets.rto_seconds * 2.0),
        test_type: "On demand".into(),
    })
}

pub async fn drill(config_path: &Path, args: DrillArgs) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let checks = load_checks(args.checks.as_deref())?;
    let target = if args.to.eq_ignore_ascii_case("random") {
        pitr_restore::drill::DrillTarget::Random
    } else {
        pitr_restore::drill::DrillTarget::At(pitr_restore::parse_target(&args.to)?)
    };
    let repo = open_repository(&config)?;
    let catalog = load_catalog(&config, &repo).await?;
    let mut opts = drill_options(&config, config_path, &catalog)?;
    opts.target = target;
    opts.checks = checks;
    opts.keep = args.keep;
    opts.test_type = args.test_type;
    if let Some(user) = args.db_user {
        opts.db_user = user;
    }
    let report = pitr_restore::drill::drill(&repo, &catalog, &opts).await?;
    if let Err(e) = pitr_restore::drill::store_result(&repo, catalog.cluster.system_id, &report).await {
        tracing::warn!(error = %e, "could not store the drill result in the repository");
    }
    let markdown = pitr_restore::drill::render_markdown(&report);
    if let Some(path) = &args.report {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        let json_path = path.with_extension("json");
        std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{markdown}");
    }
    Ok(if report.outcome == "PASS" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Starts `pitr wal-prefetch` detached (its own session, no stdio), so PostgreSQL's
/// restore_command returns at once while the next segments are spooled. Best effort: a failure
/// here only costs speed.
fn start_prefetch(config_path: &Path, file: &str, dest: &Path) {
    use std::os::unix::process::CommandExt;
    let count = Config::load(config_path).ok().and_then(|c| c.backup.prefetch_segments).unwrap_or(8);
    if count == 0 || file.ends_with(".history") {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let spool = pitr_restore::walfetch::spool_dir(dest);
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config")
        .arg(config_path)
        .args(["wal-prefetch", file])
        .arg(&spool)
        .arg(format!("--count={count}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    if let Err(e) = cmd.spawn() {
        tracing::debug!(error = %e, "could not start the prefetcher");
    }
}

pub async fn wal_prefetch(config_path: &Path, file: &str, spool: &Path, count: usize) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open_repository(&config)?;
    let system_id = config.postgres.as_ref().and_then(|p| p.system_id);
    let cluster = repo.resolve_cluster(system_id).await?;
    let names = pitr_restore::walfetch::next_segments(&cluster, file, count);
    pitr_restore::walfetch::prefetch(&repo, &cluster, &names, spool).await?;
    Ok(())
}
