//! `pitr stream`: the sidecar. The WAL receiver (pitr-walstream) and, with `[mongo]`, the oplog
//! tailer beside it (or alone, without `[postgres]`); around them the scheduled jobs
//! ([`crate::schedule`]), the metrics server and the status file ([`crate::sidecar`]), and the
//! copies to secondaries kept up by back-fills. One signal stops everything, received data made
//! durable first.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pitr_archive::Repository;
use pitr_mongo::tailer::{MongoStatus, TailerConfig};
use pitr_pgwire::ConnInfo;
use pitr_walstream::{StreamConfig, StreamStatus};
use tokio::sync::watch;

use crate::config::{Config, MongoConfig};
use crate::{open, schedule, sidecar, tasks};

/// `pitr stream`: the sidecar. Streams WAL (and the oplog, with `[mongo]`) into the repository,
/// runs the scheduled jobs and serves /metrics until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    open::check_conditional_create(&config).await?;
    if config.postgres.is_none() && config.mongo.is_some() {
        return mongo_only(&config, config_path, open::writer(&config)?).await;
    }
    if config.postgres.is_none() {
        return sets_only(&config, config_path, open::writer(&config)?).await;
    }
    let pg = config.postgres()?;
    let conninfo: ConnInfo = pg.connection_info()?;
    let (repo, replicated) = open::writer_with_copies(&config)?;
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
        lease_holder: config
            .stream
            .lease_holder
            .clone()
            .unwrap_or_else(|| format!("{}/{}", pitr_archive::hostname(), pg.slot())),
        lease_ttl: config.stream.lease_ttl.unwrap_or(Duration::from_secs(60)),
        complete_interval: pg.complete_interval(),
        index: Default::default(),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (status_tx, status_rx) = watch::channel(StreamStatus::default());
    // Catalog snapshots for `pitr find`: at start, every `[find] catalog_interval`, and soon
    // after the change index decodes a DDL commit.
    let (ddl_tx, ddl_rx) = watch::channel(None::<u64>);
    let mut stream_config = stream_config;
    stream_config.index.ddl_commits = Some(std::sync::Arc::new(ddl_tx));
    let poller = crate::catalog_poll::Poller {
        repo: repo.clone(),
        system_id: pg.system_id,
        conninfo: stream_config.conninfo.clone(),
        application_name: format!("{}_catalog", pg.application_name()),
        interval: config.find.catalog_interval,
        timeout: crate::catalog_poll::SNAPSHOT_TIMEOUT,
        // Snapshots only while this sidecar is the writer (the stream holds the lease); the
        // poller ends with the stream (the status sender goes with `run`).
        writer: Some(status_rx.clone()),
    };
    let catalog_poller = tokio::spawn(poller.run(Some(ddl_rx), shutdown_rx.clone()));

    // Everything that can fail on bad configuration fails here, before streaming starts.
    let jobs = schedule::jobs(&config.schedule)?;
    let set_jobs = schedule::set_jobs(&config)?;
    let server = if config.metrics.listen.is_empty() {
        None
    } else {
        let handle = sidecar::install_metrics()?;
        // PitrPredictedRtoAboveTarget compares the prediction with it.
        metrics::gauge!("pitr_rto_target_seconds").set(config.targets.rto_seconds);
        let listen = config.metrics.listen.parse().context("[metrics] listen")?;
        let rpo = config.targets.rpo_seconds;
        Some(sidecar::serve(listen, handle, Some(status_rx.clone()), rpo, shutdown_rx.clone()).await?)
    };
    tokio::spawn(sidecar::feed_gauges(status_rx.clone()));
    if let (Some(replicated), Some(_)) = (&replicated, &server) {
        tokio::spawn(sidecar::feed_secondary_metrics(replicated.clone()));
    }
    let catalog_gauges =
        tokio::spawn(sidecar::feed_catalog_gauges(repo.clone(), pg.system_id, Duration::from_secs(60)));
    let ctx = std::sync::Arc::new(schedule::SchedulerContext {
        repo: repo.clone(),
        backup: tasks::backup_options(&config, pg, stream_config.conninfo.clone(), false)?,
        system_id: pg.system_id,
        config_path: config_path.to_path_buf(),
        stream_status: status_rx.clone(),
    });
    let mut scheduled = schedule::spawn_mongo_jobs(&config, config_path, repo.clone(), shutdown_rx.clone())?;
    // File sets and dumps need no database connection: they do not wait for the stream's.
    scheduled.extend(schedule::spawn_set_jobs(set_jobs, config_path, repo.clone(), shutdown_rx.clone()));
    scheduled.extend(schedule::spawn_files_jobs(&config, config_path, repo.clone(), shutdown_rx.clone())?);
    for job in jobs {
        scheduled.push(tokio::spawn(schedule::run_job(job, ctx.clone(), shutdown_rx.clone())));
    }

    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: making received WAL durable first");
        let _ = shutdown_tx.send(true);
    });
    let status_file = config.status_file();
    // The journal's batches: their own task, off the receive path.
    let journal = config.journal.as_ref().map(|j| {
        let hwm = sidecar::journal_high_water_file(&status_file);
        tokio::spawn(sidecar::journal_batches(repo.clone(), Some(status_rx.clone()), j.interval, hwm))
    });
    let writer = tokio::spawn(sidecar::write_status_file(status_file.clone(), status_rx, replicated.clone()));
    tracing::info!(repository = %repo.location(), slot = %stream_config.slot, server = %stream_config.conninfo.redacted(), "pitr stream starting");
    let mongo = spawn_tailer_beside(&config, repo.clone(), shutdown_rx.clone());
    let store = repo.store().clone();
    let result = run_on_own_thread(repo, stream_config, status_tx, shutdown_rx).await;
    // The stream ended (stopped, or fenced by another writer): no catalog snapshot after it.
    catalog_poller.abort();
    let _ = writer.await;
    if let Some(mut journal) = journal {
        // Its last batch, with the WAL made durable at the stop; bounded, as storage may be down.
        let limit = open::LAST_JOURNAL_BATCH_TIMEOUT;
        if tokio::time::timeout(limit, &mut journal).await.is_err() {
            journal.abort();
            tracing::error!(
                seconds = limit.as_secs(),
                repository = %store.location(),
                "the last journal batch did not complete: the objects and WAL since the previous batch stay unjournaled (`pitr verify` counts them)"
            );
        }
    }
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
    let outcome = wind_down(scheduled, server, result).await;
    // The local repository's pool of deleted chunks' files (`.tmp.recycle/`) goes with us.
    store.release();
    outcome
}

/// Runs the WAL stream on a thread of its own, with a single-threaded runtime, as
/// pg_receivewal runs its loop: receiving, sealing a chunk, the local put and the status reply
/// all happen on that one thread, so a synchronous commit's round trip crosses no thread (every
/// hand-off between the receiver, the uploader and a worker was a futex wake-up and a context
/// switch, on a machine whose cores the primary needs). Big work (a segment's compaction, a
/// catch-up's decoding) still goes to that runtime's blocking pool; the sidecar's other tasks
/// (metrics, schedules, secondaries) stay on the main runtime.
async fn run_on_own_thread(
    repo: Repository,
    config: StreamConfig,
    status: watch::Sender<StreamStatus>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), pitr_walstream::StreamError> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("pitr-wal".into()).spawn(move || {
        let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => {
                let result = runtime.block_on(pitr_walstream::run(repo, config, status, shutdown));
                // Tasks the stream left (a background delete of compacted chunks, which the next
                // start redoes) get a moment, not forever.
                runtime.shutdown_timeout(Duration::from_secs(5));
                result
            }
            Err(e) => Err(pitr_walstream::StreamError::Fatal(format!("cannot start the WAL stream's runtime: {e}"))),
        };
        let _ = done_tx.send(result);
    });
    if let Err(e) = spawned {
        return Err(pitr_walstream::StreamError::Fatal(format!("cannot start the WAL stream's thread: {e}")));
    }
    done_rx.await.unwrap_or_else(|_| {
        Err(pitr_walstream::StreamError::Fatal("the WAL stream's thread ended without a result".into()))
    })
}

/// The end of `pitr stream` once the stream itself has stopped: a scheduled job still running is
/// abandoned (a backup's or snapshot's blocks stay unreferenced and no manifest is written), the
/// metrics server stops, copies to secondaries get a moment (the back-fill at the next start
/// copies whatever is still queued), and the stream's own error, if any, is the exit.
async fn wind_down<E: std::fmt::Display>(
    jobs: Vec<tokio::task::JoinHandle<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    result: Result<(), E>,
) -> Result<()> {
    for job in jobs {
        job.abort();
    }
    if let Some(server) = server {
        server.abort();
    }
    open::finish_copies(Duration::from_secs(10)).await;
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

/// `pitr stream` with `[mongo]` and no `[postgres]`: the oplog tailer, /metrics and /healthz.
async fn mongo_only(config: &Config, config_path: &Path, repo: Repository) -> Result<()> {
    let m = config.mongo()?;
    repo.check().await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (status_tx, mut status_rx) = watch::channel(MongoStatus::default());
    // /healthz judges a StreamStatus: fed from the tailer's, a recorded gap counting as unhealthy.
    let (health_tx, health_rx) = watch::channel(pitr_walstream::StreamStatus::default());
    let server = if config.metrics.listen.is_empty() {
        None
    } else {
        let handle = sidecar::install_metrics()?;
        let listen = config.metrics.listen.parse().context("[metrics] listen")?;
        Some(sidecar::serve(listen, handle, Some(health_rx), config.targets.rpo_seconds, shutdown_rx.clone()).await?)
    };
    let set_jobs = schedule::set_jobs(config)?;
    let mut jobs = schedule::spawn_mongo_jobs(config, config_path, repo.clone(), shutdown_rx.clone())?;
    jobs.extend(schedule::spawn_set_jobs(set_jobs, config_path, repo.clone(), shutdown_rx.clone()));
    jobs.extend(schedule::spawn_files_jobs(config, config_path, repo.clone(), shutdown_rx.clone())?);
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
        wait_for_signal().await;
        tracing::info!("stopping: sealing received oplog entries first");
        let _ = shutdown_tx.send(true);
    });
    // The journal's batches every interval (what is left at exit, main writes).
    if let Some(j) = config.journal.as_ref() {
        let hwm = sidecar::journal_high_water_file(&config.status_file());
        tokio::spawn(sidecar::journal_batches(repo.clone(), None, j.interval, hwm));
    }
    tracing::info!(repository = %repo.location(), server = %pitr_mongo::redact(&m.uri), "pitr stream (MongoDB) starting");
    let result = pitr_mongo::tailer::run(repo, tailer_config(m), status_tx, shutdown_rx).await;
    wind_down(jobs, server, result).await
}

/// `pitr stream` with neither `[postgres]` nor `[mongo]`: the jobs of the `[[files]]` and
/// `[[dumps]]` sets, the key age check and /metrics until SIGTERM or SIGINT. /healthz answers 200
/// while it runs (there is no stream to judge; the jobs' results are metrics).
async fn sets_only(config: &Config, config_path: &Path, repo: Repository) -> Result<()> {
    if config.files.is_empty() && config.dumps.is_empty() {
        anyhow::bail!(
            "nothing to stream or schedule: the config has no [postgres], [mongo], [[files]] or [[dumps]] section"
        );
    }
    let set_jobs = schedule::set_jobs(config)?;
    repo.check().await?;
    // The journal's batches every interval (what is left at exit, main writes).
    if let Some(j) = config.journal.as_ref() {
        let hwm = sidecar::journal_high_water_file(&config.status_file());
        tokio::spawn(sidecar::journal_batches(repo.clone(), None, j.interval, hwm));
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = if config.metrics.listen.is_empty() {
        None
    } else {
        let handle = sidecar::install_metrics()?;
        let listen = config.metrics.listen.parse().context("[metrics] listen")?;
        Some(sidecar::serve(listen, handle, None, config.targets.rpo_seconds, shutdown_rx.clone()).await?)
    };
    let mut jobs = schedule::spawn_set_jobs(set_jobs, config_path, repo.clone(), shutdown_rx.clone());
    jobs.extend(schedule::spawn_files_jobs(config, config_path, repo.clone(), shutdown_rx.clone())?);
    jobs.push(schedule::spawn_key_age_job(config, repo.clone(), shutdown_rx.clone())?);
    tracing::info!(repository = %repo.location(), file_sets = config.files.len(), dump_sets = config.dumps.len(),
        "pitr stream (file sets and dumps) starting");
    wait_for_signal().await;
    tracing::info!("stopping");
    let _ = shutdown_tx.send(true);
    wind_down(jobs, server, Ok::<(), String>(())).await
}

/// Starts the oplog tailer beside the WAL receiver; the task ends when `shutdown` turns true.
fn spawn_tailer_beside(
    config: &Config,
    repo: Repository,
    shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<Result<()>>> {
    let m = config.mongo.as_ref()?;
    let (status_tx, _status_rx) = watch::channel(MongoStatus::default());
    let cfg = tailer_config(m);
    Some(tokio::spawn(async move {
        pitr_mongo::tailer::run(repo, cfg, status_tx, shutdown).await.context("[mongo] oplog tailer")
    }))
}

/// The oplog tailer's settings from `[mongo]`, defaults filled in.
fn tailer_config(m: &MongoConfig) -> TailerConfig {
    TailerConfig {
        uri: m.uri.clone(),
        name: m.name.clone(),
        flush_interval: m.flush_interval.unwrap_or(Duration::from_secs(1)),
        max_slice_bytes: m.max_slice_bytes.unwrap_or(16 << 20),
        connect_timeout: m.connect_timeout(),
        batch_size: m.batch_size(),
        read_timeout: m.read_timeout(),
        complete_interval: m.complete_interval.unwrap_or(Duration::from_secs(10)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n";

    #[test]
    fn tailer_defaults_and_overrides() {
        let c = Config::parse(&format!("{BASE}[mongo]\nuri = \"mongodb://h:1/?replicaSet=rs0\"\n"), &[]).unwrap();
        let t = tailer_config(c.mongo.as_ref().unwrap());
        assert_eq!(
            (t.flush_interval, t.max_slice_bytes, t.connect_timeout),
            (Duration::from_secs(1), 16 << 20, Duration::from_secs(10))
        );
        let env = [("PITR_MONGO_FLUSH_INTERVAL".to_string(), "250ms".to_string())];
        let c = Config::parse(&format!("{BASE}[mongo]\nuri = \"mongodb://h:1/\"\n"), &env).unwrap();
        assert_eq!(tailer_config(&c.mongo.unwrap()).flush_interval, Duration::from_millis(250));
    }
}
