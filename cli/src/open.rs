//! From the config to what a command works on: the storage backends, the repository (key ring,
//! zstd level, reads falling back to secondaries, writes copied to them), the cluster in it and
//! its catalog. Every command opens through here, so "which repository, which cluster" has one
//! answer.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pitr_archive::replicate::ReplicatedStore;
use pitr_archive::throttle::{Limits, ThrottledStore};
use pitr_archive::{ClusterInfo, KeyError, KeyRing, LocalStore, NamedStore, Repository, Store};

use crate::config::{Config, SecondaryConfig, PRIMARY_NAME};

/// The configured storage backend: a local directory, or an S3/GCS bucket or Azure container
/// for `url = "s3://…"` / `"gs://…"` / `"az://…"`.
pub fn store(config: &Config) -> Result<Arc<dyn Store>> {
    store_recycling(config, false)
}

/// [`store`]; a local one keeps deleted small objects' files for reuse when `recycle` (the
/// sidecar only: see `LocalStore::recycling`).
fn store_recycling(config: &Config, recycle: bool) -> Result<Arc<dyn Store>> {
    limited(config, unlimited_store(config, recycle)?, 1)
}

/// The primary backend without the bandwidth limits.
fn unlimited_store(config: &Config, recycle: bool) -> Result<Arc<dyn Store>> {
    Ok(match &config.repository.url {
        Some(url) => {
            let opts = config.repository.cloud_options()?;
            Arc::new(pitr_archive::cloud::CloudStore::open(url, &opts).context("[repository] url")?)
        }
        None if recycle => Arc::new(LocalStore::new(config.repository_path()).recycling().appending()),
        None => Arc::new(LocalStore::new(config.repository_path())),
    })
}

/// The process's bandwidth limits, one pair of buckets for every store it opens, so that a
/// restore reading from the primary and falling back to secondaries keeps `max_download_rate`
/// across them (a writer's copies to secondaries are charged above the replication instead).
static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Time this process's uploads waited for `[repository] max_upload_rate`, summed over
/// concurrent uploads; `None` without that limit (or before a store was opened).
pub fn upload_throttled() -> Option<Duration> {
    LIMITS.get()?.upload.as_ref().map(|b| b.waited())
}

/// `store` under `[repository] max_upload_rate` / `max_download_rate`, when set, each put charged
/// `copies` times (the repositories it reaches). Only backup and restore blocks wait; manifests,
/// WAL and oplog objects and the small records never do (see `pitr_archive::throttle`).
fn limited(config: &Config, store: Arc<dyn Store>, copies: u64) -> Result<Arc<dyn Store>> {
    let (upload, download) = (config.repository.max_upload_rate()?, config.repository.max_download_rate()?);
    let limits = LIMITS.get_or_init(|| {
        if upload.is_some() || download.is_some() {
            tracing::info!(
                max_upload_rate = upload,
                max_download_rate = download,
                "backup and restore transfers limited (bytes per second; WAL is not slowed)"
            );
        }
        Limits::new(upload, download)
    });
    Ok(if limits.any() { Arc::new(ThrottledStore::new(store, limits.clone()).with_copies(copies)) } else { store })
}

/// A `[[repository.secondary]]` entry's store. An object-storage secondary takes its own
/// endpoint, region and style, and the client defaults otherwise.
pub fn secondary_store(s: &SecondaryConfig) -> Result<Arc<dyn Store>> {
    Ok(match (&s.url, &s.path) {
        (Some(url), _) => {
            let opts = pitr_archive::cloud::CloudOptions {
                endpoint: s.endpoint.clone(),
                region: s.region.clone(),
                allow_http: s.allow_http,
                force_path_style: s.force_path_style,
                ..Default::default()
            };
            Arc::new(
                pitr_archive::cloud::CloudStore::open(url, &opts)
                    .with_context(|| format!("[[repository.secondary]] {:?}", s.name))?,
            )
        }
        // `validate` guarantees a path or a url.
        (None, path) => Arc::new(LocalStore::new(path.clone().unwrap_or_default())),
    })
}

/// Every configured repository under its name, the primary first.
pub fn named_stores(config: &Config) -> Result<Vec<NamedStore>> {
    let mut all = vec![NamedStore { name: PRIMARY_NAME.into(), store: store(config)? }];
    for s in &config.repository.secondary {
        all.push(NamedStore { name: s.name.clone(), store: limited(config, secondary_store(s)?, 1)? });
    }
    Ok(all)
}

/// Start-up check of `pitr init` and `pitr stream`: every configured object storage (the primary
/// and each secondary) really refuses to create a name that exists, which put-if-absent, the
/// writer lease and conflict detection rest on. One probe object each, deleted straight after;
/// local directories need none.
pub async fn check_conditional_create(config: &Config) -> Result<()> {
    for named in named_stores(config)? {
        named
            .store
            .check_conditional_create()
            .await
            .with_context(|| format!("repository {:?} ({}) cannot be used", named.name, named.store.location()))?;
    }
    Ok(())
}

/// Copy workers started by this process, waited for before it exits ([`finish_copies`]).
static REPLICATORS: Mutex<Vec<Arc<ReplicatedStore>>> = Mutex::new(Vec::new());

/// The key ring of the configured key sources.
pub fn key_ring(config: &Config) -> Result<KeyRing> {
    KeyRing::open(config.encryption.key_sources()).map_err(|e| {
        // Name the setting to fix: the key file's own errors carry its path, not the setting.
        let setting = match &e {
            KeyError::Io { .. } | KeyError::TooOpen { .. } => "[encryption] key_file",
            _ => "[encryption]",
        };
        anyhow::Error::new(e).context(setting)
    })
}

/// For the sidecar: the primary, whose every put and delete is copied to the secondaries, and
/// the copy workers when there are secondaries (the sidecar watches and back-fills them). A local
/// primary recycles the files of deleted WAL chunks.
pub fn writer_with_copies(config: &Config) -> Result<(Repository, Option<Arc<ReplicatedStore>>)> {
    writer_recycling(config, true)
}

fn writer_recycling(config: &Config, recycle: bool) -> Result<(Repository, Option<Arc<ReplicatedStore>>)> {
    let keys = key_ring(config)?;
    let (store, copies): (Arc<dyn Store>, _) = if config.repository.secondary.is_empty() {
        (store_recycling(config, recycle)?, None)
    } else {
        // The limits go above the replication, never inside it: the copier to a secondary works
        // one queue in order, so a block copy sleeping there would hold up the WAL and the
        // completeness marks queued behind it (and, with a `required` secondary, the WAL put
        // itself). Above it, the backup task sleeps before its put, charged for every copy.
        let mut secondaries = Vec::new();
        for s in &config.repository.secondary {
            secondaries.push(pitr_archive::replicate::Secondary {
                name: s.name.clone(),
                store: secondary_store(s)?,
                required: s.required,
                queue_bytes: s.queue_bytes(),
            });
        }
        let repositories = 1 + secondaries.len() as u64;
        let replicated = Arc::new(ReplicatedStore::new(unlimited_store(config, recycle)?, secondaries));
        REPLICATORS.lock().unwrap_or_else(|e| e.into_inner()).push(replicated.clone());
        (limited(config, replicated.clone(), repositories)?, Some(replicated))
    };
    let repo = journaled(config, opened(config, store, keys), if recycle { "stream" } else { "command" })?;
    Ok((repo, copies))
}

/// The journal recorders of this process, one per repository location, each with the repository
/// it was first opened for (which [`flush_journals`] writes its last batch through). Every writer
/// the process opens on a location notes into that location's recorder: in the sidecar, the
/// scheduled jobs' writers (file sets, dumps, a MongoDB drill's result) are journaled by the
/// sidecar's own batches every interval, and a job leaves nothing behind when it ends (a
/// recorder per writer, kept until exit, grew with every job). One per location, so a config
/// edited to another repository while the sidecar runs never journals into the old one.
static JOURNALS: Mutex<Vec<Repository>> = Mutex::new(Vec::new());

/// How long the last journal batch at exit may take (storage down): past it the process exits
/// and what it held stays unjournaled (`pitr verify` counts it), as [`finish_copies`] gives up
/// on copies.
pub const LAST_JOURNAL_BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// `repo` noting its journaled puts and deletes into the process's recorder for its location,
/// signing with `[journal] signing_key_file`, when configured (a host without the key writes no
/// journal).
fn journaled(config: &Config, repo: Repository, kind: &str) -> Result<Repository> {
    let Some(signer) = config.journal.as_ref().map(|j| j.signer()).transpose()?.flatten() else { return Ok(repo) };
    let mut all = JOURNALS.lock().unwrap_or_else(|e| e.into_inner());
    let location = repo.location();
    if let Some(recorder) = all.iter().find(|r| r.location() == location).and_then(|r| r.journal()) {
        return Ok(repo.with_journal(recorder.clone()));
    }
    let writer = format!("{}/{kind}/{}", pitr_archive::hostname(), std::process::id());
    let repo = repo.with_journal(Arc::new(pitr_archive::journal::Recorder::new(signer, writer)));
    all.push(repo.clone());
    Ok(repo)
}

/// Writes what this process's writers noted and has not journaled yet: called before the process
/// exits, so a command's last objects are on the journal when it ends. Bounded by
/// [`LAST_JOURNAL_BATCH_TIMEOUT`] in all.
pub async fn flush_journals() -> Result<()> {
    let all: Vec<Repository> = JOURNALS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let unjournaled =
        "they are stored; the next journal writer does not journal them: `pitr verify` counts them as unjournaled";
    let flush_all = async {
        for repo in &all {
            if let Some(journal) = repo.journal() {
                journal.flush(repo).await.with_context(|| {
                    format!(
                        "writing the journal batch of this command's objects to {} ({unjournaled})",
                        repo.location()
                    )
                })?;
            }
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(LAST_JOURNAL_BATCH_TIMEOUT, flush_all).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!(
            "the journal batch of this command's objects did not complete in {}s ({unjournaled})",
            LAST_JOURNAL_BATCH_TIMEOUT.as_secs()
        )),
    }
}

/// `store` opened with `keys`, writing at the configured compression levels.
fn opened(config: &Config, store: Arc<dyn Store>, keys: KeyRing) -> Repository {
    Repository::new(store, keys)
        .with_zstd_level(config.repository.zstd_level)
        .with_wal_zstd_level(config.repository.wal_zstd_level)
}

/// The repository `--from` names (default the primary), opened, with its name and the others.
fn chosen(config: &Config, from: Option<&str>) -> Result<(Repository, String, Vec<NamedStore>)> {
    let keys = key_ring(config)?;
    let mut all = named_stores(config)?;
    let chosen = all.remove(repository_index(&all, from)?);
    Ok((opened(config, chosen.store, keys), chosen.name, all))
}

/// For commands that write: the primary, whose every put and delete is copied to the secondaries.
pub fn writer(config: &Config) -> Result<Repository> {
    Ok(writer_recycling(config, false)?.0)
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
pub fn reader(config: &Config, from: Option<&str>) -> Result<Repository> {
    let (repo, name, others) = chosen(config, from)?;
    Ok(repo.with_fallbacks(name, others))
}

/// One repository and nothing else (for `verify`, which judges what that repository holds).
pub fn single(config: &Config, from: Option<&str>) -> Result<Repository> {
    let (repo, name, _) = chosen(config, from)?;
    Ok(repo.with_fallbacks(name, Vec::new()))
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

/// The PostgreSQL cluster a command works on: the one `system_id` pins (see
/// [`Config::system_id`]), else the repository's only one.
pub async fn cluster(repo: &Repository, system_id: Option<u64>) -> Result<ClusterInfo> {
    Ok(repo.resolve_cluster(system_id).await?)
}

/// [`cluster`], after checking that the key opens the repository (so a wrong key or a missing
/// repository is the error, not an empty cluster list).
pub async fn checked_cluster(config: &Config, repo: &Repository) -> Result<ClusterInfo> {
    repo.check().await?;
    cluster(repo, config.system_id()).await
}

/// The catalog (backups, WAL, recoverable windows) of the cluster `system_id` picks.
pub async fn catalog(repo: &Repository, system_id: Option<u64>) -> Result<pitr_restore::Catalog> {
    let cluster = cluster(repo, system_id).await?;
    Ok(pitr_restore::Catalog::load(repo, cluster).await?)
}

/// [`catalog`] of the config's cluster, after checking that the key opens the repository.
pub async fn checked_catalog(config: &Config, repo: &Repository) -> Result<pitr_restore::Catalog> {
    repo.check().await?;
    catalog(repo, config.system_id()).await
}

/// The catalog of the replica set `[mongo] name` (or the one the repository holds).
pub async fn mongo_catalog(config: &Config, repo: &Repository) -> Result<pitr_mongo::MongoCatalog> {
    let layout = pitr_mongo::resolve_name(repo, config.mongo.as_ref().and_then(|m| m.name.as_deref())).await?;
    Ok(pitr_mongo::MongoCatalog::load(repo, layout).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_of_one_repository_share_one_recorder_and_register_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("journal.key");
        pitr_archive::journal::JournalSigner::create_file(&key).unwrap();
        let text = format!(
            "[repository]\npath = {:?}\n[encryption]\nkey_file = \"/k\"\n[journal]\nsigning_key_file = {:?}\n",
            dir.path().join("repo").display().to_string(),
            key.display().to_string()
        );
        let config = Config::parse(&text, &[]).unwrap();
        let open = || {
            let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path().join("repo")));
            journaled(&config, Repository::new(store, KeyRing::from_key("a", [1; 32])), "command").unwrap()
        };
        // A scheduled job each: the sidecar runs them for months.
        let (first, second, third) = (open(), open(), open());
        assert!(Arc::ptr_eq(first.journal().unwrap(), second.journal().unwrap()));
        assert!(Arc::ptr_eq(first.journal().unwrap(), third.journal().unwrap()));
        let location = first.location();
        let registered =
            JOURNALS.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|r| r.location() == location).count();
        assert_eq!(registered, 1);
    }
}
