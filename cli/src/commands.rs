//! One function per subcommand: load the config, open what is needed, call the library crates,
//! print for people (or JSON), and add context to errors.

use pitr_archive::now_us;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::layout::{NamedStore, WalCatalog, WalLayout, MARKER};
use pitr_archive::replicate::ReplicatedStore;
use pitr_archive::{KeyRing, LocalStore, PutOutcome, Repository, Store};
use pitr_pgwire::{format_lsn, ConnInfo};
use pitr_walstream::{StreamConfig, StreamStatus};
use tokio::sync::watch;

use crate::config::{Config, PRIMARY_NAME};

/// The configured storage backend: a local directory, or an S3/GCS bucket for
/// `url = "s3://…"` / `"gs://…"`.
fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    Ok(match &config.repository.url {
        Some(url) => {
            let opts = config.repository.cloud_options()?;
            Arc::new(pitr_archive::cloud::CloudStore::open(url, &opts).context("[repository] url")?)
        }
        None => Arc::new(LocalStore::new(config.repository_path())),
    })
}

/// A `[[repository.secondary]]` entry's store.
fn open_secondary_store(s: &crate::config::SecondaryConfig) -> Result<Arc<dyn Store>> {
    Ok(match (&s.url, &s.path) {
        (Some(url), _) => Arc::new(
            pitr_archive::cloud::CloudStore::open(url, &s.cloud_options())
                .with_context(|| format!("[[repository.secondary]] {:?}", s.name))?,
        ),
        // `validate` guarantees a path or a url.
        (None, path) => Arc::new(LocalStore::new(path.clone().unwrap_or_default())),
    })
}

/// Every configured repository under its name, the primary first.
fn named_stores(config: &Config) -> Result<Vec<NamedStore>> {
    let mut all = vec![NamedStore { name: PRIMARY_NAME.into(), store: open_store(config)? }];
    for s in &config.repository.secondary {
        all.push(NamedStore { name: s.name.clone(), store: open_secondary_store(s)? });
    }
    Ok(all)
}

/// Copy workers started by this process, waited for before it exits ([`finish_copies`]).
static REPLICATORS: std::sync::Mutex<Vec<Arc<ReplicatedStore>>> = std::sync::Mutex::new(Vec::new());

/// The store writers use, and its copy workers when secondaries are configured.
type WriterStore = (Arc<dyn Store>, Option<Arc<ReplicatedStore>>);

/// The store writers use: the primary, copying every object to the secondaries (if any).
fn open_writer_store(config: &Config) -> Result<WriterStore> {
    let primary = open_store(config)?;
    if config.repository.secondary.is_empty() {
        return Ok((primary, None));
    }
    let mut secondaries = Vec::new();
    for s in &config.repository.secondary {
        secondaries.push(pitr_archive::replicate::Secondary {
            name: s.name.clone(),
            store: open_secondary_store(s)?,
            required: s.required,
            queue_bytes: s.queue_bytes(),
        });
    }
    let replicated = Arc::new(ReplicatedStore::new(primary, secondaries));
    REPLICATORS.lock().unwrap_or_else(|e| e.into_inner()).push(replicated.clone());
    Ok((replicated.clone(), Some(replicated)))
}

/// For commands that write: the primary, whose every put and delete is copied to the secondaries.
pub(crate) fn open_repository(config: &Config) -> Result<Repository> {
    let keys = KeyRing::load(&config.encryption.key_file).context("[encryption] key_file")?;
    let (store, _) = open_writer_store(config)?;
    Ok(Repository::new(store, keys).with_zstd_level(config.repository.zstd_level))
}

/// The position of `--from NAME` among the configured repositories (the primary without it).
fn repository_index(all: &[NamedStore], from: Option<&str>) -> Result<usize> {
    let Some(name) = from else { return Ok(0) };
    all.iter().position(|s| s.name == name).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        anyhow!("--from {name}: no repository of that name (configured: {})", names.join(", "))
    })
}

/// For commands that read: the repository `--from` names (default the primary), reading from the
/// others whatever it cannot supply.
pub(crate) fn open_reader(config: &Config, from: Option<&str>) -> Result<Repository> {
    let keys = KeyRing::load(&config.encryption.key_file).context("[encryption] key_file")?;
    let mut all = named_stores(config)?;
    let chosen = all.remove(repository_index(&all, from)?);
    Ok(Repository::new(chosen.store, keys)
        .with_zstd_level(config.repository.zstd_level)
        .with_fallbacks(chosen.name, all))
}

/// One repository and nothing else (for `verify`, which judges what that repository holds).
pub(crate) fn open_single(config: &Config, from: Option<&str>) -> Result<Repository> {
    let keys = KeyRing::load(&config.encryption.key_file).context("[encryption] key_file")?;
    let mut all = named_stores(config)?;
    let chosen = all.remove(repository_index(&all, from)?);
    Ok(Repository::new(chosen.store, keys)
        .with_zstd_level(config.repository.zstd_level)
        .with_fallbacks(chosen.name, Vec::new()))
}

/// Waits (at most `patience` without progress) for copies to secondaries this process queued,
/// and says which secondaries are left behind. The primary holds everything already; what is
/// left is copied by the sidecar's next back-fill or `pitr copy --to NAME`.
pub async fn finish_copies(patience: Duration) {
    let all: Vec<Arc<ReplicatedStore>> = std::mem::take(&mut *REPLICATORS.lock().unwrap_or_else(|e| e.into_inner()));
    for replicated in all {
        for s in replicated.drain(patience).await {
            eprintln!(
                "pitr: warning: secondary {} ({}) is behind by {} objects ({:?}{}); the sidecar's back-fill or `pitr copy --to {}` copies them",
                s.name,
                s.location,
                s.queued_objects,
                s.state,
                s.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default(),
                s.name
            );
        }
    }
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
    // A secondary is the same repository: its marker is a copy of the primary's.
    for s in &config.repository.secondary {
        let entry = || format!("[[repository.secondary]] {:?}", s.name);
        if let Some(path) = &s.path {
            LocalStore::new(path).create_root().with_context(entry)?;
        }
        let secondary = open_secondary_store(s)?;
        let copied =
            pitr_archive::replicate::bind(repo.store().as_ref(), secondary.as_ref()).await.with_context(entry)?;
        println!(
            "secondary {} ({}): {}",
            s.name,
            secondary.location(),
            if copied {
                "initialised; `pitr stream` back-fills it at start, or run `pitr copy --to NAME` now"
            } else {
                "already a copy of this repository"
            }
        );
    }
    Ok(())
}

pub async fn stream(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    if config.postgres.is_none() && config.mongo.is_some() {
        return crate::mongo::stream_only(&config, config_path, open_repository(&config)?).await;
    }
    let pg = config.postgres()?;
    let conninfo: ConnInfo = pg.conninfo.parse().map_err(|e| anyhow!("[postgres] conninfo: {e}"))?;
    let keys = KeyRing::load(&config.encryption.key_file).context("[encryption] key_file")?;
    let (store, replicated) = open_writer_store(&config)?;
    let repo = Repository::new(store, keys).with_zstd_level(config.repository.zstd_level);
    // A wrong key or a missing repository is reported before anything starts.
    repo.check().await?;
    if let Some(replicated) = &replicated {
        // Copies queued by a process that crashed are lost: the back-fill at start and every
        // `backfill_interval` makes them good.
        replicated.schedule_backfill();
        let (replicated, every) =
            (replicated.clone(), config.stream.backfill_interval.unwrap_or(Duration::from_secs(3600)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                replicated.schedule_backfill();
            }
        });
    }
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
        complete_interval: pg.complete_interval(),
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
    if let (Some(replicated), Some(_)) = (&replicated, &server) {
        tokio::spawn(crate::sidecar::feed_secondary_metrics(replicated.clone()));
    }
    let catalog_gauges =
        tokio::spawn(crate::sidecar::feed_catalog_gauges(repo.clone(), pg.system_id, Duration::from_secs(60)));
    let ctx = std::sync::Arc::new(crate::sidecar::SchedulerContext {
        repo: repo.clone(),
        backup: backup_options(&config, pg, stream_config.conninfo.clone(), false),
        system_id: pg.system_id,
        config_path: config_path.to_path_buf(),
    });
    let mut scheduled = crate::mongo::spawn_jobs(&config, config_path, repo.clone(), shutdown_rx.clone())?;
    for job in jobs {
        scheduled.push(tokio::spawn(crate::sidecar::run_job(job, ctx.clone(), shutdown_rx.clone())));
    }

    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: making received WAL durable first");
        let _ = shutdown_tx.send(true);
    });
    let status_file = config.status_file();
    let writer = tokio::spawn(write_status_file(status_file.clone(), status_rx, replicated.clone()));
    tracing::info!(repository = %repo.location(), slot = %stream_config.slot, server = %stream_config.conninfo.redacted(), "pitr stream starting");
    let mongo = crate::mongo::spawn_beside(&config, repo.clone(), shutdown_rx.clone());
    let result = pitr_walstream::run(repo, stream_config, status_tx, shutdown_rx).await;
    let _ = writer.await;
    if let Some(mongo) = mongo {
        // The tailer stops with the same signal; a WAL error ends it too (one sidecar, one exit).
        if result.is_err() {
            mongo.abort();
        }
        if let Ok(Err(e)) = mongo.await {
            tracing::error!(error = %format!("{e:#}"), "the MongoDB oplog tailer failed");
        }
    }
    catalog_gauges.abort();
    for job in scheduled {
        // A running backup is abandoned; its blocks stay unreferenced and no manifest is written.
        job.abort();
    }
    if let Some(server) = server {
        server.abort();
    }
    // Briefly: the back-fill at the next start copies whatever is still queued.
    finish_copies(Duration::from_secs(10)).await;
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

pub(crate) async fn wait_for_signal() {
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

/// The status file: the receiver's [`StreamStatus`], and each secondary's copy state.
#[derive(serde::Serialize, serde::Deserialize)]
struct StatusFile {
    #[serde(flatten)]
    stream: StreamStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    secondaries: Vec<pitr_archive::replicate::SecondaryStatus>,
}

/// Keeps the status file current (atomically replaced) while the sender lives.
async fn write_status_file(
    path: std::path::PathBuf,
    mut rx: watch::Receiver<StreamStatus>,
    replicated: Option<Arc<ReplicatedStore>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let done = tokio::select! {
            r = rx.changed() => r.is_err(),
            _ = tick.tick() => false,
        };
        let snapshot = StatusFile {
            stream: rx.borrow().clone(),
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

fn rfc3339_us(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

#[derive(serde::Serialize)]
struct StatusReport {
    repository: String,
    /// Why the repository could not be read (storage down, wrong key…); the rest is still shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    repository_error: Option<String>,
    system_id: Option<u64>,
    timeline: Option<u32>,
    archived_lsn: Option<String>,
    newest_archived_commit: Option<String>,
    primary_lsn: Option<String>,
    primary_error: Option<String>,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
    sidecar: Option<SidecarReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    secondaries: Vec<SecondaryReport>,
}

#[derive(serde::Serialize)]
struct SecondaryReport {
    name: String,
    location: String,
    required: bool,
    /// `same repository`, `not initialised`, `a different repository` or `unreachable: …`.
    check: String,
    /// The sidecar's copy state, when it runs here.
    copy: Option<pitr_archive::replicate::SecondaryStatus>,
}

/// Each secondary: whether it holds this repository (its marker), and the sidecar's copy state.
async fn secondary_reports(
    config: &Config,
    primary: &Repository,
    mut copy_states: Vec<pitr_archive::replicate::SecondaryStatus>,
) -> Result<Vec<SecondaryReport>> {
    let mut out = Vec::new();
    if config.repository.secondary.is_empty() {
        return Ok(out);
    }
    let marker = primary.store().get(MARKER).await.context("reading the primary's repository marker")?;
    for s in &config.repository.secondary {
        let store = open_secondary_store(s)?;
        let check = match tokio::time::timeout(Duration::from_secs(10), store.get(MARKER)).await {
            Ok(Ok(theirs)) if theirs == marker => "same repository".to_string(),
            Ok(Ok(_)) => "a different repository (its marker differs): nothing is copied to it".to_string(),
            Ok(Err(e)) if e.is_not_found() => "not initialised (run `pitr init`)".to_string(),
            Ok(Err(e)) => format!("unreachable: {e}"),
            Err(_) => "unreachable: no answer within 10 s".to_string(),
        };
        let copy = copy_states.iter().position(|c| c.name == s.name).map(|i| copy_states.swap_remove(i));
        out.push(SecondaryReport {
            name: s.name.clone(),
            location: store.location(),
            required: s.required,
            check,
            copy,
        });
    }
    Ok(out)
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
    /// The sidecar's newest completeness mark: the archive held all the primary's WAL then.
    complete_up_to: Option<String>,
    updated: String,
}

pub async fn status(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open_single(&config, None)?;
    // During a storage outage the sidecar's view and the primary's position still matter most:
    // they are shown, and the repository's error is the command's error at the end.
    let from_repository = async {
        repo.check().await?;
        let system_id = config.postgres.as_ref().and_then(|p| p.system_id);
        let cluster = repo.resolve_cluster(system_id).await?;
        let catalog = WalCatalog::build(&repo, WalLayout::new(&cluster)).await?;
        let timeline = catalog.latest_timeline();
        let archived = timeline.and_then(|t| catalog.end_lsn(t));
        let newest_commit = match timeline {
            Some(t) => pitr_restore::plan::newest_commit_us(&repo, &catalog, t).await?,
            None => None,
        };
        anyhow::Ok((cluster.system_id, timeline, archived, newest_commit))
    };
    let (mut repository_error, system_id, timeline, archived, newest_commit) = match from_repository.await {
        Ok((id, t, a, c)) => (None, Some(id), t, a, c),
        Err(e) => (Some(e), None, None, None, None),
    };

    let (primary_lsn, primary_error) = match &config.postgres {
        Some(pg) => match primary_position(&pg.conninfo, &pg.application_name()).await {
            Ok(lsn) => (Some(lsn), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        None => (None, Some("no [postgres] section".into())),
    };

    let status_file = std::fs::read(config.status_file())
        .ok()
        .and_then(|b| serde_json::from_slice::<StatusFile>(&b).ok())
        .filter(|s| now_us() - s.stream.updated_at_us < 60_000_000);
    let copy_states = status_file.as_ref().map(|f| f.secondaries.clone()).unwrap_or_default();
    let secondaries = match secondary_reports(&config, &repo, copy_states).await {
        Ok(s) => s,
        Err(e) => {
            repository_error.get_or_insert(e);
            Vec::new()
        }
    };
    let sidecar = status_file.map(|f| f.stream).map(|s| SidecarReport {
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
        complete_up_to: s.complete_up_to_us.map(rfc3339_us),
        updated: rfc3339_us(s.updated_at_us),
    });

    let report = StatusReport {
        repository: repo.location(),
        repository_error: repository_error.as_ref().map(|e| format!("{e:#}")),
        system_id,
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
        secondaries,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return repository_error.map_or(Ok(()), Err);
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("repository:             {}", report.repository);
    if let Some(e) = &report.repository_error {
        println!("repository error:       {e}");
    }
    println!("system identifier:      {}", report.system_id.map(|i| i.to_string()).unwrap_or_else(|| "-".into()));
    println!("timeline:               {}", report.timeline.map(|t| t.to_string()).unwrap_or_else(|| "-".into()));
    println!("archived (durable) LSN: {}", or_dash(&report.archived_lsn));
    println!("newest archived commit: {}", or_dash(&report.newest_archived_commit));
    if let Some(c) = report.sidecar.as_ref().and_then(|s| s.complete_up_to.as_ref()) {
        println!("known complete up to:   {c}");
    }
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
    for s in &report.secondaries {
        let required = if s.required { ", required" } else { "" };
        println!("secondary {} ({}{required}): {}", s.name, s.location, s.check);
        match &s.copy {
            Some(c) => {
                println!(
                    "  copy state: {}, {} objects / {} bytes queued, lag {:.1} s, {} copied, {} deleted, {} errors, {} dropped, {} back-fills{}",
                    serde_json::to_value(c.state)?.as_str().unwrap_or("-"),
                    c.queued_objects,
                    c.queued_bytes,
                    c.lag_seconds,
                    c.copied_objects,
                    c.deleted_objects,
                    c.errors,
                    c.dropped,
                    c.backfills,
                    c.last_backfill_us.map(|t| format!(" (last {})", rfc3339_us(t))).unwrap_or_default()
                );
                if let Some(e) = &c.last_error {
                    println!("  last error: {e}");
                }
            }
            None => println!("  copy state: unknown (the sidecar is not running here)"),
        }
    }
    repository_error.map_or(Ok(()), Err)
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

/// `pitr copy --to NAME`: copies to a secondary every object of the primary it lacks (raw sealed
/// bytes: no key needed). Idempotent; never deletes or overwrites anything on the secondary.
pub async fn copy(config_path: &Path, to: &str, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let Some(entry) = config.repository.secondary.iter().find(|s| s.name == to) else {
        let names: Vec<&str> = config.repository.secondary.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "--to {to}: no [[repository.secondary]] of that name (configured: {})",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        );
    };
    let primary = open_store(&config)?;
    let secondary = open_secondary_store(entry)?;
    let bar = progress_count_bar(!json, &format!("copy to {to}"));
    let on_progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let started = std::time::Instant::now();
    let result =
        pitr_archive::replicate::backfill(primary.as_ref(), secondary.as_ref(), config.backup.parallel(), &on_progress)
            .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = result.with_context(|| format!("copying {} to secondary {to}", primary.location()))?;
    let seconds = started.elapsed().as_secs_f64();
    for name in &summary.differing {
        eprintln!("pitr: warning: {name} differs in size between the primary and {to}; left as it is (`pitr verify --from {to} --deep` judges it)");
    }
    if json {
        let mut out = serde_json::to_value(&summary)?;
        out["name"] = to.into();
        out["seconds"] = seconds.into();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "copied {} objects ({} bytes) from {} to {to} ({}) in {seconds:.1} s: the primary holds {}, {to} held {} ({} missing{}{}){}",
        summary.copied_objects,
        summary.copied_bytes,
        summary.primary,
        summary.secondary,
        summary.primary_objects,
        summary.secondary_objects,
        summary.missing,
        if summary.vanished > 0 { format!(", {} deleted from the primary meanwhile", summary.vanished) } else { String::new() },
        if summary.extra > 0 { format!(", {} only on {to}, left alone", summary.extra) } else { String::new() },
        if summary.marker_copied { "; the repository marker was copied first" } else { "" }
    );
    Ok(())
}

/// Exit codes follow restore_command's contract: 0 fetched, 1 past the end of the archive
/// (PostgreSQL then ends recovery there), 126 anything else — a hole, a damaged object, an
/// unreachable repository, a bad configuration — which makes PostgreSQL stop recovery with an
/// error instead of silently treating it as the archive's end.
pub async fn wal_fetch(
    config_path: &Path,
    from: Option<&str>,
    file: &str,
    dest: &Path,
    until: Option<u64>,
) -> Result<ExitCode> {
    const ARCHIVE_ERROR: u8 = 126;
    let result = async {
        let config = Config::load(config_path)?;
        let repo = open_reader(&config, from)?;
        repo.check().await?;
        let system_id = config.postgres.as_ref().and_then(|p| p.system_id);
        let cluster = repo.resolve_cluster(system_id).await?;
        Ok::<_, anyhow::Error>(pitr_restore::wal_fetch(&repo, &cluster, file, dest, until).await)
    }
    .await;
    match result {
        Ok(Ok(fetched)) => {
            tracing::debug!(file, ?fetched, "fetched");
            start_prefetch(config_path, from, file, dest, until);
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

/// A progress bar counting objects, on a terminal only.
fn progress_count_bar(enabled: bool, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style =
        indicatif::ProgressStyle::with_template(&format!("{what} [{{bar:40}}] {{pos}}/{{len}} objects eta {{eta}}"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
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
    incremental: bool,
) -> pitr_basebackup::BackupOptions {
    pitr_basebackup::BackupOptions {
        conninfo,
        application_name: format!("{}_backup", pg.application_name()),
        block_size: config.backup.block_size.unwrap_or(1 << 20),
        parallel_uploads: config.backup.parallel(),
        wal_timeout: config.backup.wal_timeout.unwrap_or(Duration::from_secs(120)),
        fast_checkpoint: true,
        incremental,
    }
}

pub async fn backup(config_path: &Path, incremental: bool, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let pg = config.postgres()?;
    let conninfo: ConnInfo = pg.conninfo.parse().map_err(|e| anyhow!("[postgres] conninfo: {e}"))?;
    let repo = open_repository(&config)?;
    let opts = backup_options(&config, pg, conninfo, incremental);
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
        if let Some(reason) = &summary.fallback {
            println!("warning: incremental backup not possible: {reason}; took a full backup instead");
        }
        let kind = match &summary.parent {
            Some(parent) => format!("incremental backup (on {parent})"),
            None => "full backup".to_string(),
        };
        println!(
            "{kind} {} done: {} files, {} bytes read, {} bytes stored ({} new blocks, {} reused; ratio {:.1}), WAL {}..{} on timeline {}, {:.1} s",
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
    parent: Option<String>,
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
    newest_commit: Option<String>,
    /// Up to when the sidecar recorded the archive held everything the primary had.
    complete_up_to: Option<String>,
    /// The restorable ranges; gaps lie between them (retention, or lost WAL).
    ranges: Vec<ListedRange>,
}

#[derive(serde::Serialize)]
struct ListedRange {
    from: String,
    to: Option<String>,
    from_lsn: String,
    to_lsn: String,
}

pub async fn list(config_path: &Path, from: Option<&str>, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open_reader(&config, from)?;
    if config.postgres.is_none() && config.mongo.is_some() {
        return crate::mongo::list_only(&config, &repo, json).await;
    }
    let catalog = load_catalog(&config, &repo).await?;
    let fmt = pitr_restore::format_time;
    let backups: Vec<ListedBackup> = catalog
        .backups
        .iter()
        .map(|b| ListedBackup {
            id: b.id.clone(),
            kind: b.kind.clone(),
            parent: b.parent.clone(),
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
            newest_commit: w.newest_commit_us.map(fmt),
            complete_up_to: w.complete_up_to_us.map(fmt),
            ranges: w
                .ranges
                .iter()
                .map(|r| ListedRange {
                    from: fmt(r.start_us),
                    to: r.end_us.map(fmt),
                    from_lsn: format_lsn(r.start_lsn),
                    to_lsn: format_lsn(r.end_lsn),
                })
                .collect(),
        })
        .collect();
    let incrementals = incremental_mode(catalog.cluster.server_version_num);
    if json {
        let out = serde_json::json!({
            "system_id": catalog.cluster.system_id,
            "server_version_num": catalog.cluster.server_version_num,
            "incrementals": incrementals,
            "backups": backups,
            "recoverable_windows": windows,
            "mongo": crate::mongo::list_json(&config, &repo).await?,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("cluster {} in {}", catalog.cluster.system_id, repo.location());
    if backups.is_empty() {
        println!("no backups yet (run `pitr backup`)");
    } else {
        println!(
            "{:<18} {:<11} {:>3}  {:<33} {:<23} {:>14} {:>14}  parent",
            "backup", "type", "tli", "stop time", "start..stop LSN", "logical", "stored"
        );
        for b in &backups {
            println!(
                "{:<18} {:<11} {:>3}  {:<33} {:<23} {:>14} {:>14}  {}",
                b.id,
                b.kind,
                b.timeline,
                b.stop_time,
                format!("{}..{}", b.start_lsn, b.stop_lsn),
                b.logical_bytes,
                b.stored_bytes,
                b.parent.as_deref().unwrap_or("-")
            );
        }
    }
    println!("incremental backups: {}", incrementals["summary"].as_str().unwrap_or(""));
    for w in &windows {
        println!(
            "timeline {}: restorable from {} to {} (WAL to {})",
            w.timeline,
            w.from.as_deref().unwrap_or("(no backup yet)"),
            w.to.as_deref().unwrap_or("(no archived commit)"),
            w.to_lsn
        );
        if let Some(c) = &w.complete_up_to {
            println!(
                "  archive known complete up to {c} (newest archived commit {})",
                w.newest_commit.as_deref().unwrap_or("none")
            );
        }
        if w.ranges.len() > 1 {
            for (i, r) in w.ranges.iter().enumerate() {
                println!(
                    "  range {}: {} .. {} (LSN {}..{})",
                    i + 1,
                    r.from,
                    r.to.as_deref().unwrap_or("(no archived commit)"),
                    r.from_lsn,
                    r.to_lsn
                );
                if let Some(next) = w.ranges.get(i + 1) {
                    println!("  gap:     {} .. {} cannot be restored", r.to.as_deref().unwrap_or(&r.from), next.from);
                }
            }
        }
    }
    if let Some(m) = crate::mongo::list_json(&config, &repo).await? {
        crate::mongo::print_list(&m);
    }
    Ok(())
}

/// What `[schedule] incremental` does on this server version, for `list`.
fn incremental_mode(server_version_num: u32) -> serde_json::Value {
    let major = server_version_num / 10000;
    if major >= 17 {
        serde_json::json!({
            "mode": "block-incremental",
            "summary": format!(
                "PostgreSQL {major}: BASE_BACKUP INCREMENTAL against the newest backup (needs summarize_wal = on; \
                 a full backup is taken, with a warning, when it is off)"
            ),
        })
    } else {
        serde_json::json!({
            "mode": "wal",
            "summary": format!(
                "PostgreSQL {major} has none (17+): the archived WAL covers every change between full backups, \
                 and each full backup stores only the blocks that changed (deduplicated)"
            ),
        })
    }
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
    /// Restore from this backup rather than the newest one before the target.
    pub backup: Option<String>,
    /// Read from this repository (a secondary's name, or `primary`) first.
    pub from: Option<String>,
}

fn shell_quote(p: &Path) -> String {
    format!(
        "\"{}\"",
        p.display().to_string().replace('\\', "\\\\").replace('"', "\\\"").replace('$', "\\$").replace('`', "\\`")
    )
}

/// `restore_command` for a restored server: this pitr binary, by absolute path, with this config,
/// reading from the repository the restore read from.
fn restore_command(config_path: &Path, from: Option<&str>) -> Result<pitr_restore::WalFetchCommand> {
    let exe = std::env::current_exe().context("locating the pitr binary for restore_command")?;
    let config_abs =
        std::fs::canonicalize(config_path).with_context(|| format!("config file {}", config_path.display()))?;
    // Repository names are [A-Za-z0-9_-] (the config checks), so they need no quoting.
    Ok(pitr_restore::WalFetchCommand {
        program: format!("{} --config {}", shell_quote(&exe), shell_quote(&config_abs)),
        options: from.map(|f| vec!["--from".to_string(), f.to_string()]).unwrap_or_default(),
    })
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
    let repo = open_reader(&config, args.from.as_deref())?;
    let catalog = load_catalog(&config, &repo).await?;
    let restore_command = restore_command(config_path, args.from.as_deref())?;
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
        backup_id: args.backup.clone(),
        start,
        // `pitr expire` runs on the primary: that is where a restore from a secondary announces
        // itself (and if the primary cannot take it, the restore goes on with a warning).
        marker_repository: match args.from {
            Some(_) => Some(open_single(&config, None)?),
            None => None,
        },
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
        "  backup used:            {} ({}, consistent at {}, LSN {})",
        report.backup_id, report.backup_kind, report.backup_stop_time, report.backup_stop_lsn
    );
    if report.backup_chain.len() > 1 {
        println!("  combined chain:         {}", report.backup_chain.join(" -> "));
    }
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
        if let Some(b) = report.wal_replayed_bytes {
            println!("  WAL replayed:           {b} bytes from {}", report.backup_start_lsn);
        }
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

/// Checks one repository alone (the primary, or `--from NAME`): no fallback hides what it lacks.
pub async fn verify(config_path: &Path, from: Option<&str>, deep: bool, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let repo = open_single(&config, from)?;
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

/// Applies `[retention]` to the cluster's backups, WAL and blocks (`dry_run`: only says what
/// would go). Shared by `pitr expire` and the sidecar's scheduled job.
pub async fn run_expire(
    config: &Config,
    repo: &Repository,
    dry_run: bool,
) -> Result<pitr_archive::expire::ExpireReport> {
    repo.check().await?;
    let system_id = config.postgres.as_ref().and_then(|p| p.system_id);
    let cluster = repo.resolve_cluster(system_id).await?;
    let opts = pitr_archive::expire::ExpireOptions {
        policy: config.retention.policy(),
        now_us: now_us(),
        dry_run,
        stale_backup_after: config.retention.stale_backup_after,
        lock_ttl: config.retention.lock_ttl,
    };
    pitr_archive::expire::expire(repo, &cluster, &opts).await.with_context(|| format!("expire in {}", repo.location()))
}

pub async fn expire(config_path: &Path, dry_run: bool, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open_repository(&config)?;
    let report = run_expire(&config, &repo, dry_run).await?;
    // Retention that could not be extended fails the command, after the report: the deletes are
    // done, but those objects are protected for less long than their backups are kept.
    let retention_failed = || {
        anyhow!(
            "expire in {}: the Object Lock retention of {} objects could not be extended (listed above); the next run tries again",
            repo.location(),
            report.retention_failed.len()
        )
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return if report.retention_failed.is_empty() { Ok(()) } else { Err(retention_failed()) };
    }
    let r = &config.retention;
    let verb = if dry_run { "would remove" } else { "removed" };
    println!(
        "expire in {} at {}{}: daily {}, weekly {}, monthly {}, yearly {}, window {} (from {}; base backup {})",
        repo.location(),
        report.now,
        if dry_run { " (dry run: nothing is changed)" } else { "" },
        r.daily,
        r.weekly,
        r.monthly,
        r.yearly,
        humantime::format_duration(r.window),
        report.window_start,
        report.window_base.as_deref().unwrap_or("none")
    );
    println!("keeping {} backups:", report.kept.len());
    for b in &report.kept {
        let reasons: Vec<String> = b
            .reasons
            .iter()
            .map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default())
            .collect();
        println!("  {:<18} {:<11} {}", b.id, b.kind, reasons.join(", "));
    }
    for b in &report.removed_backups {
        println!("{verb} backup {} ({}, consistent at {})", b.id, b.kind, b.stop_time);
    }
    for w in &report.removed_wal {
        println!("{verb} WAL of timeline {}: {} .. {} ({} segments)", w.timeline, w.from, w.to, w.segments);
    }
    if let Some(why) = &report.wal_skipped {
        println!("WAL: {why}");
    }
    if let Some(why) = &report.blocks_skipped {
        println!("blocks: {why}");
    }
    for r in &report.running_restores {
        println!("running: {r}");
    }
    if report.blocks_left > 0 {
        println!(
            "blocks: the sweep reached its deadline; {} unreferenced blocks are left for the next run",
            report.blocks_left
        );
    }
    for x in &report.retained {
        println!("RETAINED {}: {}", x.object, x.why);
    }
    for x in &report.stale_removed {
        println!("{} stale marker {x}", if dry_run { "would remove" } else { "removed" });
    }
    if !report.retention_until.is_empty() {
        println!(
            "Object Lock retention to extend for {} backups kept longer than the window:",
            report.retention_until.len()
        );
        for t in &report.retention_until {
            println!("  {:<18} until {} ({} objects)", t.id, t.until, t.objects);
        }
        if dry_run {
            println!("retention: dry run, not read or extended");
        } else {
            println!(
                "retention: {} objects checked, {} extended{}",
                report.retention_checked,
                report.retention_extended,
                if report.retention_missing > 0 {
                    format!(", {} not found (run `pitr verify`)", report.retention_missing)
                } else {
                    String::new()
                }
            );
        }
    }
    for x in &report.retention_failed {
        println!("RETENTION NOT EXTENDED {}: {}", x.object, x.why);
    }
    println!(
        "{verb} {} backups, {} WAL objects, {} blocks ({} bytes){}",
        report.removed_backups.len(),
        report.removed_wal_objects,
        report.removed_blocks,
        report.removed_bytes,
        if report.retained.is_empty() {
            String::new()
        } else {
            format!("; {} objects retained by the storage", report.retained.len())
        }
    );
    if report.retention_failed.is_empty() {
        Ok(())
    } else {
        Err(retention_failed())
    }
}

pub struct DrillArgs {
    pub to: String,
    pub checks: Option<std::path::PathBuf>,
    pub report: Option<std::path::PathBuf>,
    pub json: bool,
    pub keep: bool,
    pub db_user: Option<String>,
    pub test_type: String,
    /// Read from this repository first (the result is stored through the primary).
    pub from: Option<String>,
}

/// Reads a drill checks file; every bad key or value is named.
pub fn load_checks(path: Option<&Path>) -> Result<pitr_restore::drill::ChecksFile> {
    let Some(path) = path else { return Ok(Default::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("checks file {}", path.display()))?;
    let checks: pitr_restore::drill::ChecksFile =
        toml::from_str(&text).map_err(|e| anyhow!("checks file {}: {}", path.display(), e.to_string().trim_end()))?;
    checks.validate().map_err(|e| anyhow!("checks file {}: {e}", path.display()))?;
    Ok(checks)
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

pub async fn drill(config_path: &Path, args: DrillArgs) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let checks = load_checks(args.checks.as_deref())?;
    let target = if args.to.eq_ignore_ascii_case("random") {
        pitr_restore::drill::DrillTarget::Random
    } else {
        pitr_restore::drill::DrillTarget::At(pitr_restore::parse_target(&args.to)?)
    };
    let repo = open_reader(&config, args.from.as_deref())?;
    let catalog = load_catalog(&config, &repo).await?;
    let mut opts = drill_options(&config, config_path, &catalog)?;
    opts.restore_command = restore_command(config_path, args.from.as_deref())?;
    if args.from.is_some() {
        // As for `pitr restore --from`: the marker goes where `pitr expire` runs.
        opts.marker_repository = Some(open_single(&config, None)?);
    }
    opts.target = target;
    opts.checks = checks;
    opts.keep = args.keep;
    opts.test_type = args.test_type;
    if let Some(user) = args.db_user {
        opts.db_user = user;
    }
    let report = pitr_restore::drill::drill(&repo, &catalog, &opts).await?;
    let stored = match open_repository(&config) {
        Ok(writer) => pitr_restore::drill::store_result(&writer, catalog.cluster.system_id, &report)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        tracing::warn!(error = %format!("{e:#}"), "could not store the drill result in the repository");
    }
    write_drill_report(&report, args.report.as_deref(), args.json)?;
    Ok(if report.outcome == "PASS" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Prints a drill's report (markdown, or JSON) and writes it to `path` (and `path.json`).
pub fn write_drill_report(report: &pitr_restore::drill::DrillReport, path: Option<&Path>, json: bool) -> Result<()> {
    let markdown = pitr_restore::drill::render_markdown(report);
    if let Some(path) = path {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        let json_path = path.with_extension("json");
        std::fs::write(&json_path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{markdown}");
    }
    Ok(())
}

/// Starts `pitr wal-prefetch` detached (its own session, no stdio), so PostgreSQL's
/// restore_command returns at once while the next segments are spooled. Best effort: a failure
/// here only costs speed.
fn start_prefetch(config_path: &Path, from: Option<&str>, file: &str, dest: &Path, until: Option<u64>) {
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
        .args(from.map(|f| format!("--from={f}")))
        .args(until.map(|u| format!("--until-lsn={}", format_lsn(u))))
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

pub async fn wal_prefetch(
    config_path: &Path,
    from: Option<&str>,
    file: &str,
    spool: &Path,
    count: usize,
    until: Option<u64>,
) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open_reader(&config, from)?;
    let system_id = config.postgres.as_ref().and_then(|p| p.system_id);
    let cluster = repo.resolve_cluster(system_id).await?;
    let names = pitr_restore::walfetch::next_segments(&cluster, file, count);
    pitr_restore::walfetch::prefetch(&repo, &cluster, &names, spool, until).await?;
    Ok(())
}
