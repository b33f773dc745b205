//! One function per subcommand: load the config, open what is needed, call the library crates,
//! print for people (or JSON), and add context to errors.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::layout::{WalCatalog, WalLayout, WalObject, MARKER};
use pitr_archive::{KeyRing, LocalStore, PutOutcome, Repository, Store};
use pitr_pgwire::{format_lsn, ConnInfo};
use pitr_walstream::{StreamConfig, StreamStatus};
use tokio::sync::watch;

use crate::config::Config;

fn open_repository(config: &Config) -> Result<Repository> {
    let keys = KeyRing::load(&config.encryption.key_file).context("[encryption] key_file")?;
    let store = LocalStore::new(config.repository_path());
    Ok(Repository::new(Arc::new(store), keys).with_zstd_level(config.repository.zstd_level))
}

pub async fn init(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let key_file = &config.encryption.key_file;
    let store = LocalStore::new(config.repository_path());
    let keys = if key_file.exists() {
        let keys = KeyRing::load(key_file).context("[encryption] key_file")?;
        println!("using existing key file {} (active key {})", key_file.display(), keys.active().id);
        keys
    } else {
        // A new key cannot open an initialised repository: refuse before leaving a useless key file.
        if store.head(MARKER).await.context("[repository] path")?.is_some() {
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
    store.create_root().context("[repository] path")?;
    let repo = Repository::new(Arc::new(store), keys);
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
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: making received WAL durable first");
        let _ = shutdown_tx.send(true);
    });
    let (status_tx, status_rx) = watch::channel(StreamStatus::default());
    let status_file = config.status_file();
    let writer = tokio::spawn(write_status_file(status_file.clone(), status_rx));
    tracing::info!(repository = %repo.location(), slot = %stream_config.slot, server = %stream_config.conninfo.redacted(), "pitr stream starting");
    let result = pitr_walstream::run(repo, stream_config, status_tx, shutdown_rx).await;
    let _ = writer.await;
    result.map_err(|e| anyhow!("{e}"))?;
    tracing::info!("pitr stream stopped cleanly");
    Ok(())
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

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
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
        Some(t) => newest_commit_us(&repo, &catalog, t).await?,
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
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v["updated_at_us"].as_i64().is_some_and(|t| now_us() - t < 60_000_000))
        .map(|v| {
            let lsn = |k: &str| format_lsn(v[k].as_u64().unwrap_or(0));
            SidecarReport {
                connected: v["connected"].as_bool().unwrap_or(false),
                host: v["host"].as_str().map(str::to_string),
                received_lsn: lsn("received_lsn"),
                durable_lsn: lsn("durable_lsn"),
                lag_bytes: v["lag_bytes"].as_u64().unwrap_or(0),
                lag_seconds: v["lag_seconds"].as_f64().unwrap_or(0.0),
                objects_archived: v["objects_archived"].as_u64().unwrap_or(0),
                bytes_archived: v["bytes_archived"].as_u64().unwrap_or(0),
                upload_errors: v["upload_errors"].as_u64().unwrap_or(0),
                last_error: v["last_error"].as_str().map(str::to_string),
                updated: rfc3339_us(v["updated_at_us"].as_i64().unwrap_or(0)),
            }
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

/// The newest commit time recorded in the headers of the timeline's newest objects.
async fn newest_commit_us(repo: &Repository, catalog: &WalCatalog, timeline: u32) -> Result<Option<i64>> {
    let mut objects = Vec::new();
    for (&(tli, segno), entry) in catalog.segments.range((timeline, 0)..=(timeline, u64::MAX)).rev() {
        if entry.whole {
            objects.push(WalObject::Segment { timeline: tli, segno });
        }
        for &(from, to) in entry.chunks.iter().rev() {
            objects.push(WalObject::Chunk { timeline: tli, segno, from, to });
        }
        if objects.len() > 64 {
            break;
        }
    }
    // An idle primary writes WAL without commits; look back a bounded number of objects.
    objects.sort_by_key(|o| {
        std::cmp::Reverse(match *o {
            WalObject::Segment { segno, .. } => (segno, u32::MAX),
            WalObject::Chunk { segno, to, .. } => (segno, to),
            WalObject::History { .. } => (0, 0),
        })
    });
    for obj in objects.iter().take(64) {
        let header = repo.read_header(&catalog.layout.object_name(obj)).await?;
        if let Some(t) = header.meta.last_commit_us {
            return Ok(Some(t));
        }
    }
    Ok(None)
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
