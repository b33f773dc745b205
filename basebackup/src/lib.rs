//! pitr-basebackup: full and incremental base backups of PostgreSQL into the repository.
//!
//! Owns running BASE_BACKUP (through pitr-pgwire), reading its tar streams ([`tar`]), cutting
//! files into blocks stored once under their keyed hash (in parallel, bounded), checking every
//! file against the checksums in the server's backup manifest, waiting until the archive holds
//! the WAL that makes the backup consistent, and writing the backup manifest last.
//!
//! A backup may be taken from a streaming standby while the archive streams from the primary:
//! [`check_standby`] first makes sure the standby is of the primary's cluster and timeline, and
//! the archive must then hold the WAL from the backup's start (the standby's restartpoint, which
//! can be older than the archive or fall in a gap of it) to its stop without a hole, by the rule a
//! restore applies ([`pitr_archive::continuity::reach`]): checked as BASE_BACKUP reports its
//! start, before any file is stored, and again over start..stop before the manifest is written.
//!
//! Also owns which servers can take incremental backups ([`incremental`]: PostgreSQL 17+, the
//! one place that rule lives). Incrementals upload the parent's server manifest first and store
//! the server's `INCREMENTAL.*` files as they come; when the server cannot take one, a full
//! backup is taken and the reason reported.
//!
//! It does not restore or combine an incremental chain (pitr-restore), stream or archive WAL
//! (pitr-walstream), or decide object names, encryption and storage (pitr-archive).

#![deny(missing_docs)]

pub mod incremental;
pub mod tar;

use pitr_archive::now_us;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pitr_archive::backup::{
    block_hasher, BackupEntry, BackupEntryKind, BackupFile, BackupKind, BackupManifest, BlockHasher, ServerRole,
    Tablespace, TakenFrom,
};
use pitr_archive::continuity::{self, Reach, TimelinePath};
use pitr_archive::names::pg;
use pitr_archive::{
    ClusterInfo, ObjectKind, ObjectMeta, PutOutcome, Repository, RepositoryError, WalCatalog, WalLayout, WalObject,
};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgwire::messages::{BackupEvent, BaseBackupDecoder};
use pitr_pgwire::{ConnInfo, ConnectOptions, Connection, PgError};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::tar::{TarError, TarEvent, TarKind, TarReader};

/// Why a base backup failed. Whatever the cause, no backup manifest was written for it, so the
/// repository does not list the backup; blocks it uploaded before failing are in no manifest.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Connecting to the server or the replication protocol failed, or the server reported an
    /// error (e.g. refusing BASE_BACKUP).
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// Reading or writing the repository failed: its key, the cluster info, a block upload or
    /// the manifest.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// A tar archive from the server was malformed or truncated, or held a member name or type
    /// the [`tar`] reader refuses.
    #[error("backup stream: {0}")]
    Tar(#[from] TarError),
    /// What arrived does not match the server's backup manifest (a file missing, extra, of
    /// another size or CRC-32C), or the server sent no manifest.
    #[error("backup check failed: {0}")]
    Verify(String),
    /// A member a restore must not recreate: an unsafe path, a symbolic link other than a
    /// tablespace link `pg_tblspc/<oid>` of the main archive, or anything at or under such a link.
    #[error("the server sent {path:?}, refused: {what}; the backup was not recorded")]
    Refused {
        /// The member's path in the data directory (a tablespace's under `pg_tblspc/<oid>/`).
        path: String,
        /// Why it was refused.
        what: String,
    },
    /// The server to back up from ([`BackupOptions::primary`] set) is unreachable, or is not a
    /// standby of the primary's cluster on the primary's timeline, or an incremental backup was
    /// asked of it. Checked before anything is written to the repository.
    #[error("the standby {host}: {what}; {}", .refusal.outcome())]
    Standby {
        /// The standby's `host:port` (every host of its conninfo when it could not be reached).
        host: String,
        /// Which of the refusals it is.
        refusal: StandbyRefusal,
        /// What is wrong, and what to do about it.
        what: String,
    },
    /// The backup as taken could never be restored, so it was not recorded: the archive lacks WAL
    /// between its start and stop positions (a hole, or WAL from before the archive began), or
    /// the server switched timeline during it. Found as BASE_BACKUP reported its start (the
    /// transfer is then stopped before any file is stored) or after the transfer.
    #[error("{0}; the backup was not recorded")]
    Unrestorable(String),
    /// The backup's running marker went unrenewed so long that an expire may have swept blocks
    /// it reuses: its manifest was not stored.
    #[error(transparent)]
    MarkerStale(#[from] pitr_archive::running::MarkerStale),
    /// The pin or note asked for ([`BackupOptions::pin`]) could not be recorded: its manifest was
    /// not stored either, so that no backup is kept unpinned against the asking.
    #[error("the pin or note of the new backup was not recorded: {0}; the backup was not recorded")]
    Pin(#[from] pitr_archive::pins::PinError),
    /// Anything else, said in full: no start or end position in the stream, the WAL up to the
    /// stop LSN not archived within [`BackupOptions::wal_timeout`], a backup of the same id
    /// already in the repository, a failed upload task.
    #[error("{0}")]
    Other(String),
}

/// Why a server given as the standby to back up from was refused ([`BackupError::Standby`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyRefusal {
    /// No connection could be opened to it.
    Unreachable,
    /// It is not in recovery: a primary.
    NotInRecovery,
    /// Its system identifier is not the primary's.
    OtherCluster,
    /// It is on another timeline than the primary.
    OtherTimeline,
    /// The primary, which the standby is checked against, could not be reached or asked.
    PrimaryUnreachable,
    /// The server connected to for the backup is not the one checked.
    Changed,
    /// An incremental backup was asked of it.
    Incremental,
}

impl StandbyRefusal {
    /// What the refusal left in the repository, for its message. Every refusal but
    /// [`StandbyRefusal::Changed`] comes before the backup's running marker is written.
    pub fn outcome(self) -> &'static str {
        match self {
            StandbyRefusal::Changed => {
                "no backup was taken; nothing but pitr's running marker was written to the repository, and it \
                 is removed as the backup ends"
            }
            _ => "no backup was taken and nothing was written to the repository",
        }
    }
}

/// How long connecting to a server may take when its conninfo sets no `connect_timeout` (or
/// `connect_timeout=0`): a server that takes the TCP connection but never answers must not hold
/// `pitr backup`, or the scheduled job, forever.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connected server may take to answer [`check_standby`]'s commands.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// `info`, with [`DEFAULT_CONNECT_TIMEOUT`] unless it sets a timeout.
fn with_connect_timeout(info: &ConnInfo) -> ConnInfo {
    let mut info = info.clone();
    info.connect_timeout.get_or_insert(DEFAULT_CONNECT_TIMEOUT);
    info
}

/// The longest [`check_standby`] waits for one server: connecting to each of its hosts in turn,
/// then the answers.
fn check_deadline(info: &ConnInfo) -> Duration {
    let per_host = info.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    per_host.saturating_mul(info.hosts.len().max(1) as u32).saturating_add(ANSWER_TIMEOUT)
}

/// How to take a base backup: which server, and how to cut, upload and wait.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The server to take the backup from (a replication connection is opened to it).
    pub conninfo: ConnInfo,
    /// When `conninfo` is a standby's (`[backup] conninfo`): the primary the archive streams
    /// from. The standby must then be in recovery, with the primary's system identifier and
    /// timeline ([`check_standby`]); `None` when `conninfo` is the primary's.
    pub primary: Option<ConnInfo>,
    /// `application_name` of the replication connection, as `pg_stat_replication` and
    /// `pg_stat_activity` show it.
    pub application_name: String,
    /// Cut files into blocks of this many bytes (the unit of deduplication).
    pub block_size: usize,
    /// Concurrent block uploads.
    pub parallel_uploads: usize,
    /// How long to wait for the sidecar to archive the WAL up to the backup's stop LSN.
    pub wal_timeout: Duration,
    /// Ask for an immediate checkpoint to start the backup (`CHECKPOINT 'fast'`, `FAST` before
    /// PostgreSQL 15) instead of a spread one, which paces its writes over up to
    /// `checkpoint_timeout × checkpoint_completion_target`.
    pub fast_checkpoint: bool,
    /// Take `BASE_BACKUP ( INCREMENTAL )` against the newest backup of the timeline where the
    /// server allows it (PostgreSQL 17+, `summarize_wal = on`); otherwise a full backup, with
    /// the reason in [`BackupSummary::fallback`].
    pub incremental: bool,
    /// `[retention] stale_backup_after`: a backup whose running marker went unrenewed for about
    /// this long stores no manifest (see [`pitr_archive::running::RunMarker::check_fresh`]).
    pub stale_backup_after: Duration,
    /// The server sends the backup at most this many KiB per second (BASE_BACKUP's `MAX_RATE`,
    /// 32 to 1048576, which PostgreSQL calls kB); `None` for as fast as it can.
    pub max_rate_kib: Option<u32>,
    /// A pin or note for the new backup (`pitr backup --keep-forever --note`): recorded just
    /// before its manifest ([`pitr_archive::pins::record_for_new_backup`]), so that the backup is
    /// stored with it or not at all.
    pub pin: Option<pitr_archive::pins::Change>,
}

/// Progress for a terminal: bytes received of the server's estimate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Bytes of tar archives received so far (the server's manifest not counted).
    pub received: u64,
    /// The server's estimate of the total (PROGRESS, summed over tablespaces, sent in kB); 0
    /// until it arrives. Only an estimate: `received` may end above or below it.
    pub estimate: u64,
}

/// What a finished backup did, for people and logs (serialised as JSON by the command line).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    /// The backup's id: its start time in UTC, `YYYYMMDDTHHMMSSZ`; its manifest is stored under it.
    pub id: String,
    /// Full, or incremental on `parent`.
    pub kind: BackupKind,
    /// The backup an incremental was taken against.
    pub parent: Option<String>,
    /// Why an incremental was asked for and a full backup taken instead.
    pub fallback: Option<String>,
    /// Where the backup starts, `X/Y`: the redo point of its checkpoint, from which WAL is
    /// replayed to restore it.
    pub start_lsn: String,
    /// Where the backup ends, `X/Y`: a restore is consistent only once WAL is replayed up to here.
    pub stop_lsn: String,
    /// The timeline the server was on when the backup started.
    pub timeline: u32,
    /// The server the backup was taken from: the primary or a standby, and its address.
    pub taken_from: TakenFrom,
    /// Regular files recorded (tablespaces' and `INCREMENTAL.*` files included).
    pub files: usize,
    /// Bytes of tar archives received from the server (headers and padding included).
    pub bytes_read: u64,
    /// Bytes this backup added to the repository: its new blocks and its manifest, as stored
    /// (compressed and sealed).
    pub bytes_stored: u64,
    /// Blocks uploaded because the repository did not hold them yet.
    pub blocks_new: u64,
    /// Blocks the repository already held (from earlier backups or earlier in this one), not
    /// uploaded again.
    pub blocks_reused: u64,
    /// `bytes_read / bytes_stored` (0 if nothing was stored): how much deduplication and
    /// compression saved.
    pub dedup_ratio: f64,
    /// Wall-clock time from the start to the manifest being written.
    pub duration_seconds: f64,
    /// The pin record written with it ([`BackupOptions::pin`]); the command line shows it.
    #[serde(skip)]
    pub pin: Option<pitr_archive::pins::PinRecord>,
}

/// A backup id that sorts by time: `YYYYMMDDTHHMMSSZ`.
fn backup_id(us: i64) -> String {
    pitr_archive::time::format_compact(us)
}

#[derive(Default)]
struct Counters {
    stored: AtomicU64,
    new_blocks: AtomicU64,
    reused: AtomicU64,
}

/// The file being received: its metadata, running CRC-32C and the block being filled.
struct OpenFile {
    file: BackupFile,
    crc: u32,
    block: Vec<u8>,
}

/// Takes a base backup into `repo`: an incremental one if [`BackupOptions::incremental`] asks for
/// it and the server can take it, else a full one. Returns the manifest written to the repository
/// and a summary. `progress` is called as bytes arrive.
pub async fn take_backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<(BackupManifest, BackupSummary), BackupError> {
    let started = Instant::now();
    // The key must open the repository before anything else happens.
    repo.check().await?;
    // A standby that is the wrong server is refused before the running marker is written.
    let standby = match &opts.primary {
        Some(primary) => {
            if opts.incremental {
                return Err(BackupError::Standby {
                    host: hosts(&opts.conninfo),
                    refusal: StandbyRefusal::Incremental,
                    what: "incremental backups are not taken from a standby (PostgreSQL needs WAL summaries \
                           on the standby itself, and pitr does not take them there yet): take a full backup, \
                           or an incremental from the primary"
                        .into(),
                });
            }
            Some(check_standby(&opts.conninfo, primary, &opts.application_name).await?)
        }
        None => None,
    };
    // Announced before any block is written or reused, so that `pitr expire` does not sweep
    // blocks under this backup; renewed in the background for as long as the backup runs,
    // however long that is. Released once the manifest is durable, and on failures too (a
    // marker left behind would hold the block sweep off until it is stale).
    let running = pitr_archive::running::RunMarker::begin(repo, pitr_archive::running::RunKind::Backup).await?;
    let result = backup_marked(repo, opts, standby.as_ref(), progress, started, &running).await;
    running.release().await;
    result
}

/// The backup itself, under its running marker; `standby` is what [`check_standby`] found when
/// the backup is taken from one.
async fn backup_marked(
    repo: &Repository,
    opts: &BackupOptions,
    standby: Option<&StandbyIdentity>,
    progress: &(dyn Fn(Progress) + Sync),
    started: Instant,
    running: &pitr_archive::running::RunMarker,
) -> Result<(BackupManifest, BackupSummary), BackupError> {
    let mut start_time_us = now_us();
    let conninfo = with_connect_timeout(&opts.conninfo);
    let connect = ConnectOptions { replication: true, application_name: opts.application_name.clone() };
    let mut conn = Connection::connect(&conninfo, &connect).await?;
    let ident = conn.identify_system().await?;
    let taken_from = match standby {
        // The conninfo may name several hosts, or a name whose address changed since the check:
        // the server connected to now must be the one checked, still in recovery.
        Some(checked) => {
            let now = Identity::of(&mut conn, ident.system_id, ident.timeline).await?;
            if !now.in_recovery || now.system_id != checked.system_id || now.timeline != checked.timeline {
                return Err(BackupError::Standby {
                    host: conn.host().to_string(),
                    refusal: StandbyRefusal::Changed,
                    what: format!(
                        "is not the standby checked a moment ago ({}, system identifier {}, timeline {}): now \
                         system identifier {}, timeline {}, {}",
                        checked.host,
                        checked.system_id,
                        checked.timeline,
                        now.system_id,
                        now.timeline,
                        if now.in_recovery { "in recovery" } else { "not in recovery" }
                    ),
                });
            }
            TakenFrom { role: ServerRole::Standby, host: conn.host().to_string() }
        }
        None => TakenFrom { role: ServerRole::Primary, host: conn.host().to_string() },
    };
    // Backup ids are whole seconds: a backup started in the same second as the previous one
    // (two `pitr backup` in a row on a small cluster) waits for the next second instead of
    // colliding with its manifest.
    let id_taken = |us: i64| {
        let name = pg::backup_manifest(ident.system_id, &backup_id(us));
        async move { repo.store().head(&name).await.map(|o| o.is_some()) }
    };
    if id_taken(start_time_us).await.map_err(pitr_archive::RepositoryError::from)? {
        let into_second = start_time_us.rem_euclid(1_000_000) as u64;
        tokio::time::sleep(std::time::Duration::from_micros(1_000_000 - into_second)).await;
        start_time_us = now_us();
    }
    let settings = conn.server_settings().await?;
    let cluster = ClusterInfo {
        system_id: ident.system_id,
        wal_segment_size: settings.wal_segment_size,
        wal_page_size: settings.wal_page_size,
        server_version_num: settings.server_version_num,
    };
    repo.put_cluster_info(&cluster).await?;
    let hasher = block_hasher(repo).await?;
    let page_size = if settings.server_version_num >= 170000 { page_size(&mut conn).await? } else { 8192 };

    let (mut parent, mut fallback) = (None, None);
    if opts.incremental {
        match incremental_parent(&mut conn, repo, &cluster, ident.timeline).await? {
            Ok(p) => parent = Some(p),
            Err(reason) => fallback = Some(reason),
        }
    }
    let command = |incremental: bool| {
        let checkpoint = if opts.fast_checkpoint { "fast" } else { "spread" };
        let incremental = if incremental { ", INCREMENTAL" } else { "" };
        if settings.server_version_num >= 150000 {
            let max_rate = opts.max_rate_kib.map(|r| format!(", MAX_RATE {r}")).unwrap_or_default();
            format!(
                "BASE_BACKUP (LABEL 'pitr', PROGRESS, CHECKPOINT '{checkpoint}', WAIT false, MANIFEST 'yes', \
                 MANIFEST_CHECKSUMS 'CRC32C'{incremental}{max_rate})"
            )
        } else {
            let fast = if opts.fast_checkpoint { " FAST" } else { "" };
            let max_rate = opts.max_rate_kib.map(|r| format!(" MAX_RATE {r}")).unwrap_or_default();
            format!(
                "BASE_BACKUP LABEL 'pitr' PROGRESS{fast} NOWAIT{max_rate} MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
            )
        }
    };
    let mut decoder = BaseBackupDecoder::new(settings.server_version_num);
    // The server refuses an incremental before sending anything when its WAL summaries do not
    // reach back to the parent (summarize_wal was turned on after it, or the summaries were
    // removed): then a full backup is taken instead, on a fresh connection.
    let mut first_events = Vec::new();
    if let Some(p) = &parent {
        let tried: Result<Vec<BackupEvent>, PgError> = async {
            conn.upload_manifest(p.server_manifest.as_bytes()).await?;
            conn.start_base_backup(&command(true)).await?;
            conn.next_backup_event(&mut decoder).await
        }
        .await;
        match tried {
            Ok(events) => first_events = events,
            Err(e @ PgError::Server { .. }) => {
                fallback = Some(format!("the server refused an incremental backup against {}: {e}", p.id));
                parent = None;
                conn.close().await;
                conn = Connection::connect(&conninfo, &connect).await?;
                decoder = BaseBackupDecoder::new(settings.server_version_num);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(reason) = &fallback {
        tracing::warn!("{reason}; taking a full backup instead");
    }
    if parent.is_none() {
        conn.start_base_backup(&command(false)).await?;
    }

    // Block uploads run beside receiving, bounded by the channel and the worker count.
    let (tx, rx) = mpsc::channel::<(String, Vec<u8>)>(opts.parallel_uploads * 2);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let counters = Arc::new(Counters::default());
    let mut workers = JoinSet::new();
    for _ in 0..opts.parallel_uploads.max(1) {
        let (repo, rx, counters) = (repo.clone(), rx.clone(), counters.clone());
        let system_id = cluster.system_id;
        workers.spawn(async move {
            loop {
                let job = rx.lock().await.recv().await;
                let Some((id, data)) = job else { return Ok::<(), RepositoryError>(()) };
                let name = pg::block(system_id, &id);
                if repo.store().head(&name).await?.is_some() {
                    counters.reused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let (outcome, size) =
                    repo.put_sealed_sized(&name, data, ObjectMeta::plain(ObjectKind::BackupBlock)).await?;
                if outcome == PutOutcome::Created {
                    counters.new_blocks.fetch_add(1, Ordering::Relaxed);
                    counters.stored.fetch_add(size, Ordering::Relaxed);
                } else {
                    counters.reused.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    // Only the workers hold the receiving end: once they have all stopped (a failed put, a full
    // repository), sending fails at once instead of waiting forever for room in the channel.
    drop(rx);
    let mut receiver = Receiver::new(hasher.clone(), opts.block_size, tx);
    let mut start = None;
    let mut end = None;
    let mut estimate = 0;
    let result: Result<(), BackupError> = async {
        loop {
            let events = if first_events.is_empty() {
                conn.next_backup_event(&mut decoder).await?
            } else {
                std::mem::take(&mut first_events)
            };
            if events.is_empty() {
                break;
            }
            for event in events {
                match event {
                    BackupEvent::Start { lsn, timeline } => {
                        start = Some((lsn, timeline));
                        // Sent before any archive: a backup that could never be restored is
                        // stopped before its files are read and stored.
                        check_start(repo, &cluster, &taken_from, standby, lsn, timeline).await?;
                    }
                    BackupEvent::Estimate(e) => estimate = e,
                    BackupEvent::End { lsn, timeline } => end = Some((lsn, timeline)),
                    other => receiver.on_event(other).await?,
                }
                progress(Progress { received: receiver.bytes, estimate });
            }
        }
        receiver.finish_archive()?;
        Ok(())
    }
    .await;
    let Receiver { tx, files, entries, tablespaces, manifest, bytes, .. } = receiver;
    drop(tx);
    // Whatever happened, wait for the uploads so no put is left running.
    let mut upload_error = None;
    while let Some(r) = workers.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => upload_error = upload_error.or(Some(BackupError::Repository(e))),
            Err(e) => upload_error = upload_error.or(Some(BackupError::Other(format!("upload task: {e}")))),
        }
    }
    // An upload's failure first: it is why receiving stopped ("block uploads stopped").
    if let Some(e) = upload_error {
        return Err(e);
    }
    result?;
    conn.close().await;
    let (start_lsn, timeline) = start.ok_or_else(|| BackupError::Other("BASE_BACKUP sent no start position".into()))?;
    let (stop_lsn, stop_timeline) = end.ok_or_else(|| BackupError::Other("BASE_BACKUP sent no end position".into()))?;
    // PostgreSQL ends a standby's backup with an error if it is promoted meanwhile, but not if it
    // follows its upstream onto a new timeline: the backup then stops on that one.
    if let Some(why) = timeline_refusal(&taken_from, standby.map(|s| s.timeline), timeline, Some(stop_timeline)) {
        return Err(BackupError::Unrestorable(why));
    }
    let server_manifest = manifest.ok_or_else(|| BackupError::Verify("the server sent no backup manifest".into()))?;
    let mut files = files;
    verify_against_server_manifest(&server_manifest, &mut files)?;
    let stop_time_us = now_us();

    wait_for_wal(repo, &cluster, &taken_from, timeline, start_lsn, stop_lsn, opts.wal_timeout).await?;

    let stored = counters.stored.load(Ordering::Relaxed);
    let manifest = BackupManifest {
        id: backup_id(start_time_us),
        kind: if parent.is_some() { BackupKind::Incremental } else { BackupKind::Full },
        parent: parent.as_ref().map(|p| p.id.clone()),
        system_id: cluster.system_id,
        server_version_num: settings.server_version_num,
        timeline,
        start_lsn,
        stop_lsn,
        start_time_us,
        stop_time_us,
        block_size: opts.block_size as u64,
        page_size,
        tablespaces,
        entries,
        files,
        server_manifest: String::from_utf8_lossy(&server_manifest).into_owned(),
        logical_bytes: bytes,
        stored_bytes: stored,
        taken_from: Some(taken_from.clone()),
    };
    let pin;
    let (outcome, manifest_size) = {
        let name = pg::backup_manifest(manifest.system_id, &manifest.id);
        let json =
            serde_json::to_vec(&manifest).map_err(|e| BackupError::Other(format!("serialising the manifest: {e}")))?;
        let meta = ObjectMeta { timeline, start_lsn, end_lsn: stop_lsn, ..ObjectMeta::plain(ObjectKind::Meta) };
        pin = match opts.pin.clone() {
            Some(change) => {
                pitr_archive::pins::record_for_new_backup(repo, manifest.system_id, &manifest.id, change, now_us())
                    .await?
            }
            None => None,
        };
        running.check_fresh(opts.stale_backup_after)?;
        repo.put_sealed_sized(&name, json, meta).await?
    };
    if outcome != PutOutcome::Created {
        return Err(BackupError::Other(format!("a backup named {} exists already", manifest.id)));
    }
    let stored_total = stored + manifest_size;
    let summary = BackupSummary {
        id: manifest.id.clone(),
        kind: manifest.kind,
        parent: manifest.parent.clone(),
        fallback,
        start_lsn: format_lsn(start_lsn),
        stop_lsn: format_lsn(stop_lsn),
        timeline,
        taken_from,
        files: manifest.files.len(),
        bytes_read: bytes,
        bytes_stored: stored_total,
        blocks_new: counters.new_blocks.load(Ordering::Relaxed),
        blocks_reused: counters.reused.load(Ordering::Relaxed),
        dedup_ratio: if stored_total == 0 { 0.0 } else { bytes as f64 / stored_total as f64 },
        duration_seconds: started.elapsed().as_secs_f64(),
        pin,
    };
    Ok((manifest, summary))
}

/// A server [`check_standby`] found to be a standby of the primary's cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyIdentity {
    /// The standby's `host:port` (or socket directory), as connected.
    pub host: String,
    /// The cluster's system identifier, the same on the standby and the primary.
    pub system_id: u64,
    /// The timeline both are on.
    pub timeline: u32,
}

/// What IDENTIFY_SYSTEM and the startup parameters say of a server.
struct Identity {
    system_id: u64,
    timeline: u32,
    in_recovery: bool,
}

impl Identity {
    async fn of(conn: &mut Connection, system_id: u64, timeline: u32) -> Result<Identity, PgError> {
        // PostgreSQL 14+ reports `in_hot_standby` at startup. Older servers do not: their
        // `transaction_read_only` is on in recovery (and on a primary only where
        // default_transaction_read_only is set for the role, which then looks like a standby).
        let in_recovery = match conn.parameter("in_hot_standby") {
            Some(v) => v == "on",
            None => conn.show("transaction_read_only").await? == "on",
        };
        Ok(Identity { system_id, timeline, in_recovery })
    }
}

/// Every host of a conninfo as `host:port`, for messages about a server not reached.
fn hosts(info: &ConnInfo) -> String {
    use pitr_pgwire::conninfo::Host;
    let each = info.hosts.iter().map(|h| match h {
        Host::Tcp { host, port } => format!("{host}:{port}"),
        Host::Unix { dir, port } => format!("{}:{port}", dir.display()),
    });
    each.collect::<Vec<_>>().join(",")
}

/// Checks that `standby` is a standby (in recovery) of the cluster `primary` serves, on the
/// primary's timeline: then its backup is one of the cluster the archive streams from the
/// primary, and its WAL is the primary's. A primary given as the standby is refused too:
/// backing up the primary is what leaving the standby out does, and a standby promoted by a
/// failover should not silently carry the backup load it was meant to take off the primary.
/// Opens one replication connection to each and closes both; writes nothing. A conninfo without
/// `connect_timeout` gets [`DEFAULT_CONNECT_TIMEOUT`], and each server must answer within
/// [`check_deadline`], so a server that never answers is an unreachable one.
pub async fn check_standby(
    standby: &ConnInfo,
    primary: &ConnInfo,
    application_name: &str,
) -> Result<StandbyIdentity, BackupError> {
    let (standby, primary) = (with_connect_timeout(standby), with_connect_timeout(primary));
    let connect = ConnectOptions { replication: true, application_name: application_name.to_string() };
    let unreachable = |host: String, what: String| BackupError::Standby {
        host,
        refusal: StandbyRefusal::Unreachable,
        what: format!("unreachable: {what}"),
    };
    let deadline = check_deadline(&standby);
    let asked = tokio::time::timeout(deadline, async {
        let mut conn =
            Connection::connect(&standby, &connect).await.map_err(|e| unreachable(hosts(&standby), e.to_string()))?;
        let host = conn.host().to_string();
        let checked = async {
            let ident = conn.identify_system().await?;
            Identity::of(&mut conn, ident.system_id, ident.timeline).await
        }
        .await;
        conn.close().await;
        checked.map(|found| (host.clone(), found)).map_err(|e| unreachable(host, e.to_string()))
    })
    .await;
    let (host, found) =
        asked.map_err(|_| unreachable(hosts(&standby), format!("no answer within {}s", deadline.as_secs())))??;
    if !found.in_recovery {
        return Err(BackupError::Standby {
            host,
            refusal: StandbyRefusal::NotInRecovery,
            what: "is not in recovery, so it is not a standby: name a streaming standby of the primary, \
                   or leave the standby out to back up the primary itself"
                .into(),
        });
    }
    // The standby's answers mean nothing without the primary's: a primary that cannot be asked
    // refuses the backup as an unreachable standby does.
    let primary_failed = |what: String| BackupError::Standby {
        host: host.clone(),
        refusal: StandbyRefusal::PrimaryUnreachable,
        what: format!("could not be checked against the primary {}: {what}", hosts(&primary)),
    };
    let deadline = check_deadline(&primary);
    let asked = tokio::time::timeout(deadline, async {
        let mut conn = Connection::connect(&primary, &connect).await?;
        let primary_host = conn.host().to_string();
        let ident = conn.identify_system().await;
        conn.close().await;
        ident.map(|ident| (primary_host, ident))
    })
    .await;
    let (primary_host, ident) = asked
        .map_err(|_| primary_failed(format!("no answer within {}s", deadline.as_secs())))?
        .map_err(|e| primary_failed(e.to_string()))?;
    if found.system_id != ident.system_id {
        return Err(BackupError::Standby {
            host,
            refusal: StandbyRefusal::OtherCluster,
            what: format!(
                "belongs to another cluster: its system identifier is {}, the primary {primary_host}'s is {}",
                found.system_id, ident.system_id
            ),
        });
    }
    if found.timeline != ident.timeline {
        return Err(BackupError::Standby {
            host,
            refusal: StandbyRefusal::OtherTimeline,
            what: format!(
                "is on timeline {}, the primary {primary_host} on timeline {}: a backup is taken from a standby \
                 only once it follows the primary's timeline (recovery_target_timeline = 'latest')",
                found.timeline, ident.timeline
            ),
        });
    }
    Ok(StandbyIdentity { host, system_id: found.system_id, timeline: found.timeline })
}

/// The relation block size (BLCKSZ): the unit of incremental files.
async fn page_size(conn: &mut Connection) -> Result<u32, BackupError> {
    let v = conn.show("block_size").await?;
    v.parse().map_err(|_| BackupError::Other(format!("cannot read block_size {v:?}")))
}

/// The backup an incremental is taken against: the newest one of this cluster on the server's
/// timeline, if the server can take incrementals. `Ok(Err(reason))` says why a full backup it is.
async fn incremental_parent(
    conn: &mut Connection,
    repo: &Repository,
    cluster: &ClusterInfo,
    timeline: u32,
) -> Result<Result<BackupManifest, String>, BackupError> {
    let version = cluster.server_version_num;
    if let Some(reason) = incremental::unsupported_reason(version) {
        return Ok(Err(reason));
    }
    let summarize = conn.show("summarize_wal").await?;
    if summarize != "on" {
        return Ok(Err(format!(
            "summarize_wal is {summarize} on the server, and incremental backups need it on \
             (ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf())"
        )));
    }
    let (backups, damaged) = BackupManifest::list_sound(repo, cluster.system_id).await?;
    for d in &damaged {
        tracing::warn!(object = %d.name, why = %d.why, "not a parent for the incremental: the manifest cannot be used");
    }
    let parent = backups
        .into_iter()
        .filter(|b| b.timeline == timeline && b.server_version_num / 10000 == version / 10000)
        .max_by_key(|b| b.stop_lsn);
    Ok(parent
        .ok_or_else(|| format!("there is no earlier backup on timeline {timeline} to take an incremental against")))
}

struct Receiver {
    hasher: BlockHasher,
    block_size: usize,
    tx: mpsc::Sender<(String, Vec<u8>)>,
    /// Path prefix of the current archive (`pg_tblspc/<oid>/` for tablespaces).
    prefix: String,
    /// The current tar archive; `None` while receiving the manifest.
    tar: Option<TarReader>,
    open: Option<OpenFile>,
    files: Vec<BackupFile>,
    entries: Vec<BackupEntry>,
    tablespaces: Vec<Tablespace>,
    manifest: Option<Vec<u8>>,
    bytes: u64,
    /// Tar members received in all archives, which bound the manifest's size.
    members: u64,
    /// Paths of the main archive: its links, and everything else, for [`check_member`].
    main_links: BTreeSet<String>,
    main_paths: BTreeSet<String>,
}

impl Receiver {
    fn new(hasher: BlockHasher, block_size: usize, tx: mpsc::Sender<(String, Vec<u8>)>) -> Receiver {
        Receiver {
            hasher,
            block_size,
            tx,
            prefix: String::new(),
            tar: None,
            open: None,
            files: Vec::new(),
            entries: Vec::new(),
            tablespaces: Vec::new(),
            manifest: None,
            bytes: 0,
            members: 0,
            main_links: BTreeSet::new(),
            main_paths: BTreeSet::new(),
        }
    }
}

/// Whether `path` is a tablespace link's, `pg_tblspc/<oid>`.
fn tablespace_link(path: &str) -> bool {
    path.strip_prefix("pg_tblspc/")
        .is_some_and(|oid| !oid.is_empty() && oid.len() <= 10 && oid.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a member of the main archive (`main`) or of a tablespace archive, with its full path,
/// against what PostgreSQL sends, so that nothing a restore would refuse reaches a manifest.
/// basebackup.c sends symbolic links only for `pg_tblspc/<oid>` in the main archive (any other
/// link is skipped as a "special file"; a symlinked pg_wal goes as a directory), so any other
/// link is a hostile or broken server. Nothing may lie at or under such a link either: a
/// restore would write through it (tablespace contents come in their own archive).
/// `links`/`paths` are the main archive's so far; updated.
fn check_member(
    main: bool,
    path: &str,
    kind: &TarKind,
    links: &mut BTreeSet<String>,
    paths: &mut BTreeSet<String>,
) -> Result<(), BackupError> {
    let refuse = |what: String| BackupError::Refused { path: path.to_string(), what };
    // The tar reader checked the member name; the archive prefix is ours. Checked again whole.
    if let Some(why) = crate::tar::unsafe_member_path(path) {
        return Err(refuse(format!("it has {why}")));
    }
    if let TarKind::Symlink { target } = kind {
        if !main || !tablespace_link(path) {
            return Err(refuse(format!(
                "a symbolic link (to {target:?}) other than a tablespace link pg_tblspc/<oid> in the main archive"
            )));
        }
        if paths.iter().any(|p| p == path || p.starts_with(&format!("{path}/"))) {
            return Err(refuse("a symbolic link over a path the archive already holds".into()));
        }
        links.insert(path.to_string());
    } else if main {
        let mut at = String::new();
        for c in path.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(c);
            if links.contains(&at) {
                return Err(refuse(format!("it lies at or under the tablespace link {at}")));
            }
        }
        paths.insert(path.to_string());
    }
    Ok(())
}

impl Receiver {
    async fn on_event(&mut self, event: BackupEvent) -> Result<(), BackupError> {
        match event {
            BackupEvent::Archive { tablespace } => {
                self.finish_archive()?;
                self.prefix = match &tablespace {
                    Some((oid, location)) => {
                        self.tablespaces.push(Tablespace { oid: *oid, location: location.clone() });
                        format!("pg_tblspc/{oid}/")
                    }
                    None => String::new(),
                };
                self.tar = Some(TarReader::new());
            }
            BackupEvent::Manifest => {
                self.finish_archive()?;
                self.manifest = Some(Vec::new());
            }
            BackupEvent::Data(data) => {
                if let Some(m) = self.manifest.as_mut() {
                    let limit = manifest_limit(self.members);
                    if (m.len() + data.len()) as u64 > limit {
                        return Err(BackupError::Verify(format!(
                            "the server's backup manifest is longer than {limit} bytes ({MANIFEST_BASE} plus \
                             {MANIFEST_PER_MEMBER} for each of the {} archive members received); refused \
                             before reading it",
                            self.members
                        )));
                    }
                    m.extend_from_slice(&data);
                    return Ok(());
                }
                self.bytes += data.len() as u64;
                let mut tar =
                    self.tar.take().ok_or_else(|| BackupError::Other("backup data before any archive".into()))?;
                let mut full_blocks = Vec::new();
                let result = tar.feed::<BackupError>(&data, |ev| self.on_tar(ev, &mut full_blocks));
                self.tar = Some(tar);
                result?;
                for block in full_blocks {
                    self.tx.send(block).await.map_err(|_| BackupError::Other("block uploads stopped".into()))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn finish_archive(&mut self) -> Result<(), BackupError> {
        if let Some(tar) = self.tar.take() {
            tar.finish()?;
        }
        Ok(())
    }

    fn on_tar(&mut self, event: TarEvent<'_>, full_blocks: &mut Vec<(String, Vec<u8>)>) -> Result<(), BackupError> {
        match event {
            TarEvent::Entry(h) => {
                self.members += 1;
                let path = format!("{}{}", self.prefix, h.path);
                check_member(self.prefix.is_empty(), &path, &h.kind, &mut self.main_links, &mut self.main_paths)?;
                match h.kind {
                    TarKind::File => {
                        self.open = Some(OpenFile {
                            file: BackupFile {
                                path,
                                size: h.size,
                                mode: h.mode,
                                mtime: h.mtime,
                                checksum: None,
                                blocks: Vec::new(),
                            },
                            crc: 0,
                            block: Vec::new(),
                        });
                    }
                    TarKind::Directory => {
                        self.entries.push(BackupEntry { path, mode: h.mode, kind: BackupEntryKind::Directory })
                    }
                    TarKind::Symlink { target } => {
                        self.entries.push(BackupEntry { path, mode: h.mode, kind: BackupEntryKind::Symlink { target } })
                    }
                }
            }
            TarEvent::Data(mut d) => {
                let f = self.open.as_mut().ok_or_else(|| BackupError::Other("tar data outside a file".into()))?;
                f.crc = crc32c::crc32c_append(f.crc, d);
                while !d.is_empty() {
                    let n = (self.block_size - f.block.len()).min(d.len());
                    f.block.extend_from_slice(&d[..n]);
                    d = &d[n..];
                    if f.block.len() == self.block_size {
                        let block = std::mem::take(&mut f.block);
                        let id = self.hasher.block_id(&block);
                        f.file.blocks.push(id.clone());
                        full_blocks.push((id, block));
                    }
                }
            }
            TarEvent::EntryEnd => {
                if let Some(mut f) = self.open.take() {
                    if !f.block.is_empty() {
                        let block = std::mem::take(&mut f.block);
                        let id = self.hasher.block_id(&block);
                        f.file.blocks.push(id.clone());
                        full_blocks.push((id, block));
                    }
                    f.file.checksum = Some(hex_le(f.crc));
                    self.files.push(f.file);
                }
            }
        }
        Ok(())
    }
}

/// The fixed part of [`manifest_limit`]: the manifest's header, WAL ranges (one line per
/// timeline the backup spans) and checksum, with a wide margin.
const MANIFEST_BASE: u64 = 1 << 20;
/// The part per tar member of [`manifest_limit`]. A manifest line lists one file: its path (at
/// most MAXPGPATH, 1024 bytes; doubled if hex-encoded or JSON-escaped), size, time and
/// checksum, some 150 bytes besides the path. Directories and links count too, to spare.
const MANIFEST_PER_MEMBER: u64 = 4096;

/// The most a server's backup manifest may hold after `members` tar members: it lists the
/// files that came, so it cannot legitimately be longer, and holding it whole (to parse and
/// keep it) must not be up to the server.
fn manifest_limit(members: u64) -> u64 {
    MANIFEST_BASE.saturating_add(members.saturating_mul(MANIFEST_PER_MEMBER))
}

/// PostgreSQL writes a CRC-32C into its manifest as the hex of its in-memory (little-endian) bytes.
fn hex_le(crc: u32) -> String {
    crc.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file the server lists must have arrived with the size and CRC-32C it lists, and
/// nothing else may have arrived (except what the server never lists: backup_label etc. are listed).
fn verify_against_server_manifest(manifest: &[u8], files: &mut [BackupFile]) -> Result<(), BackupError> {
    let json: serde_json::Value = serde_json::from_slice(manifest)
        .map_err(|e| BackupError::Verify(format!("server backup manifest is not JSON: {e}")))?;
    let listed = json["Files"].as_array().ok_or_else(|| BackupError::Verify("server manifest has no Files".into()))?;
    let mut expected = BTreeMap::new();
    for f in listed {
        let path = match (f["Path"].as_str(), f["Encoded-Path"].as_str()) {
            (Some(p), _) => p.to_string(),
            (None, Some(hex)) => String::from_utf8_lossy(&decode_hex(hex)).into_owned(),
            _ => return Err(BackupError::Verify("server manifest entry without a path".into())),
        };
        let size = f["Size"].as_u64().unwrap_or(u64::MAX);
        let checksum = f["Checksum"].as_str().map(str::to_ascii_lowercase);
        expected.insert(path, (size, checksum));
    }
    for file in files.iter() {
        let Some((size, checksum)) = expected.remove(&file.path) else {
            return Err(BackupError::Verify(format!("{} arrived but is not in the server's manifest", file.path)));
        };
        if size != file.size {
            return Err(BackupError::Verify(format!(
                "{}: {} bytes arrived, the server's manifest says {size}",
                file.path, file.size
            )));
        }
        if let Some(want) = checksum {
            if file.checksum.as_deref() != Some(want.as_str()) {
                return Err(BackupError::Verify(format!(
                    "{}: CRC-32C {} does not match the server's manifest ({want})",
                    file.path,
                    file.checksum.as_deref().unwrap_or("-")
                )));
            }
        }
    }
    if let Some(missing) = expected.keys().next() {
        return Err(BackupError::Verify(format!("{missing} is in the server's manifest but did not arrive")));
    }
    Ok(())
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

/// Why a backup whose BASE_BACKUP reported these timelines cannot be recorded, if it cannot.
/// `checked`: the timeline [`check_standby`] found the standby and the primary on (`None` for a
/// backup from the primary); `stop`: `None` while the backup runs.
fn timeline_refusal(from: &TakenFrom, checked: Option<u32>, start: u32, stop: Option<u32>) -> Option<String> {
    if let Some(checked) = checked.filter(|&c| c != start) {
        return Some(format!(
            "the {from} started the backup on timeline {start}, but it and the primary were on timeline {checked} \
             when checked; take the backup again"
        ));
    }
    match stop {
        Some(stop) if stop != start => Some(format!(
            "the {from} switched timeline during the backup (start on {start}, stop on {stop}); take the backup again"
        )),
        _ => None,
    }
}

/// How the WAL a backup needs stands in one listing of the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalVerdict {
    /// Held without a hole from the start position up to the position asked for.
    Reached,
    /// Held without a hole from the start position to the archive's end, which is short of the
    /// position asked for: the sidecar has not archived it yet.
    Behind,
    /// Recovery from the start position would stop at a segment the archive lacks (or holds
    /// only part of) while it holds WAL after it. The sidecar puts WAL oldest first, so the
    /// missing WAL never comes: WAL from before the archive began, or a gap in it.
    Hole(Reach),
}

/// The rule a restore applies to a backup ([`continuity::reach`]): recovery from `start_lsn`
/// along `path` must be able to replay up to `to_lsn`.
fn wal_verdict(catalog: &WalCatalog, path: &TimelinePath, start_lsn: u64, to_lsn: u64) -> WalVerdict {
    let reach = continuity::reach(catalog, path, start_lsn);
    if reach.end_lsn >= to_lsn {
        WalVerdict::Reached
    } else if reach.hole.is_some() {
        WalVerdict::Hole(reach)
    } else {
        WalVerdict::Behind
    }
}

/// Says which WAL a backup from `from` lacks in the archive at `location`, and what to do.
fn hole_message(location: &str, layout: WalLayout, from: &TakenFrom, reach: &Reach, start_lsn: u64) -> String {
    let missing = match &reach.hole {
        Some(hole) => hole.describe(layout),
        None => format!("the WAL after {}", format_lsn(reach.end_lsn)),
    };
    let advice = match from.role {
        ServerRole::Standby => {
            "A standby starts a backup at its latest restartpoint, which can predate the archive or fall in a gap \
             of it: run CHECKPOINT on the primary, let the standby replay it, and back up again"
        }
        ServerRole::Primary => {
            "That WAL was lost before it was archived (`pitr verify` names the archive's holes); take the backup again"
        }
    };
    format!(
        "the archive in {location} lacks {missing}, which the backup from the {from} needs to be restored from its \
         start position {}: it could never be restored. {advice}",
        format_lsn(start_lsn)
    )
}

/// The timelines a restore follows to `timeline`: from its history file if the archive lists
/// one, read as a restore reads it (an unusable history is left out, with a warning).
async fn timeline_path(repo: &Repository, catalog: &WalCatalog, timeline: u32) -> Result<TimelinePath, BackupError> {
    let only = WalCatalog {
        layout: catalog.layout,
        segments: BTreeMap::new(),
        histories: catalog.histories.range(timeline..=timeline).copied().collect(),
    };
    let history = match only.read_histories(repo).await?.remove(&timeline) {
        Some(Ok(entries)) => entries,
        Some(Err(problem)) => {
            let name = catalog.layout.object_name(&WalObject::History { timeline });
            tracing::warn!(object = %name, error = %problem, "timeline history cannot be used");
            Vec::new()
        }
        None => Vec::new(),
    };
    Ok(TimelinePath::new(timeline, &history))
}

/// What is checked as BASE_BACKUP reports its start, before any file arrives: the timeline (a
/// standby's must still be the one checked), and that the archive holds the WAL from the start
/// position without a hole as far as it goes (the rest, up to the stop, after the transfer).
async fn check_start(
    repo: &Repository,
    cluster: &ClusterInfo,
    from: &TakenFrom,
    standby: Option<&StandbyIdentity>,
    start_lsn: u64,
    timeline: u32,
) -> Result<(), BackupError> {
    const STOPPED: &str = "found as the backup started: the transfer was stopped before any file was stored";
    if let Some(why) = timeline_refusal(from, standby.map(|s| s.timeline), timeline, None) {
        return Err(BackupError::Unrestorable(format!("{why} ({STOPPED})")));
    }
    let layout = WalLayout::new(cluster);
    let catalog = WalCatalog::build(repo, layout).await?;
    let path = timeline_path(repo, &catalog, timeline).await?;
    match wal_verdict(&catalog, &path, start_lsn, u64::MAX) {
        WalVerdict::Hole(reach) => Err(BackupError::Unrestorable(format!(
            "{} ({STOPPED})",
            hole_message(&repo.location(), layout, from, &reach, start_lsn)
        ))),
        WalVerdict::Reached | WalVerdict::Behind => Ok(()),
    }
}

/// A backup is only usable with the WAL from its start to its stop LSN; the sidecar archives it.
/// Waits until the archive holds it without a hole (up to `timeout`), and refuses at once when a
/// hole shows that it never will.
async fn wait_for_wal(
    repo: &Repository,
    cluster: &ClusterInfo,
    from: &TakenFrom,
    timeline: u32,
    start_lsn: u64,
    stop_lsn: u64,
    timeout: Duration,
) -> Result<(), BackupError> {
    let layout = WalLayout::new(cluster);
    let deadline = Instant::now() + timeout;
    // The path, and whether the timeline's history was listed when it was read: read again only
    // when that changes (a promotion's history can land after its first WAL).
    let mut path: Option<(bool, TimelinePath)> = None;
    loop {
        let catalog = WalCatalog::build(repo, layout).await?;
        let listed = catalog.histories.contains(&timeline);
        let current = match path.take() {
            Some((had, p)) if had == listed => p,
            _ => timeline_path(repo, &catalog, timeline).await?,
        };
        let verdict = wal_verdict(&catalog, &current, start_lsn, stop_lsn);
        path = Some((listed, current));
        match verdict {
            WalVerdict::Reached => return Ok(()),
            WalVerdict::Hole(reach) => {
                return Err(BackupError::Unrestorable(hole_message(&repo.location(), layout, from, &reach, start_lsn)))
            }
            WalVerdict::Behind => {}
        }
        if Instant::now() >= deadline {
            return Err(BackupError::Other(format!(
                "the archive in {} does not hold the WAL up to the backup's stop position {} on timeline {timeline} after {timeout:?}: \
                 is `pitr stream` running for this cluster? The backup was not recorded.",
                repo.location(),
                format_lsn(stop_lsn)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_crc_matches_postgres_byte_order() {
        assert_eq!(backup_id(0), "19700101T000000Z");
        assert_eq!(backup_id(1_795_617_780_000_000), "20261125T144300Z");
        // CRC-32C of "123456789" is 0xE3069283; PostgreSQL prints its little-endian bytes.
        assert_eq!(hex_le(crc32c::crc32c(b"123456789")), "839206e3");
    }

    const SEG: u64 = 16 << 20;

    fn wal_catalog(objects: &[WalObject]) -> WalCatalog {
        let layout = WalLayout { system_id: 7, segment_size: SEG };
        let names: Vec<String> = objects.iter().map(|o| layout.object_name(o)).collect();
        WalCatalog::from_names(layout, names.iter().map(String::as_str))
    }

    fn seg(timeline: u32, segno: u64) -> WalObject {
        WalObject::Segment { timeline, segno }
    }

    fn chunk(timeline: u32, segno: u64, from: u32, to: u32) -> WalObject {
        WalObject::Chunk { timeline, segno, from, to }
    }

    fn hole_at(verdict: WalVerdict) -> Option<(u32, u64)> {
        match verdict {
            WalVerdict::Hole(Reach { hole: Some(h), .. }) => Some((h.timeline, h.segno)),
            _ => None,
        }
    }

    #[test]
    fn a_backup_needs_its_wal_without_a_hole_from_its_start_to_its_stop() {
        let tl1 = TimelinePath::new(1, &[]);
        // Retention kept only an old backup's segments 1-2, and streaming went on from 4: a
        // restartpoint in 2 falls before the hole, one in 4 after it.
        let wal = wal_catalog(&[seg(1, 1), seg(1, 2), seg(1, 4), chunk(1, 5, 0, 0x1000)]);
        let verdict = wal_verdict(&wal, &tl1, 2 * SEG + 0x28, 5 * SEG + 0x800);
        assert_eq!(hole_at(verdict), Some((1, 3)), "{verdict:?}");
        assert_eq!(wal_verdict(&wal, &tl1, 4 * SEG + 0x28, 5 * SEG + 0x800), WalVerdict::Reached);
        // Past what is streamed so far: not yet, rather than never.
        assert_eq!(wal_verdict(&wal, &tl1, 4 * SEG + 0x28, 5 * SEG + 0x2000), WalVerdict::Behind);
        // A restartpoint older than the archive: its segment is missing, later ones are held.
        assert_eq!(hole_at(wal_verdict(&wal, &tl1, 0x28, 2 * SEG)), Some((1, 0)));
        // A segment held only as chunks from past its start is of no use to recovery, though it
        // holds the start position itself.
        let wal = wal_catalog(&[chunk(1, 3, 0x100, 0x200), seg(1, 4)]);
        assert_eq!(hole_at(wal_verdict(&wal, &tl1, 3 * SEG + 0x180, 4 * SEG + 0x10)), Some((1, 3)));
        // An empty archive (the sidecar not started yet) is behind, not holed.
        assert_eq!(wal_verdict(&wal_catalog(&[]), &tl1, SEG, 2 * SEG), WalVerdict::Behind);
        // The position asked for as the backup starts is "as far as the archive goes": only a
        // hole refuses it then.
        let wal = wal_catalog(&[seg(1, 1), chunk(1, 2, 0, 0x100)]);
        assert_eq!(wal_verdict(&wal, &tl1, SEG + 0x28, u64::MAX), WalVerdict::Behind);
    }

    #[test]
    fn a_backup_after_a_promotion_follows_the_timeline_history() {
        use pitr_pgformat::timeline::HistoryEntry;
        // Timeline 2 forks from 1 in the middle of segment 3; a backup on 2 starts in 4.
        let tl2 = TimelinePath::new(2, &[HistoryEntry { timeline: 1, switch_lsn: 3 * SEG + 500 }]);
        let wal = wal_catalog(&[seg(1, 2), chunk(1, 3, 0, 4000), seg(2, 3), seg(2, 4), chunk(2, 5, 0, 0x100)]);
        assert_eq!(wal_verdict(&wal, &tl2, 4 * SEG + 0x28, 5 * SEG + 0x80), WalVerdict::Reached);
        // One that starts before the fork reads timeline 1 up to it, and 2 from its segment on.
        assert_eq!(wal_verdict(&wal, &tl2, 2 * SEG + 0x28, 5 * SEG + 0x80), WalVerdict::Reached);
        // Timeline 2's copy of the fork segment missing is a hole, though timeline 1 has it.
        let wal = wal_catalog(&[seg(1, 2), seg(1, 3), seg(2, 4)]);
        assert_eq!(hole_at(wal_verdict(&wal, &tl2, 2 * SEG + 0x28, 4 * SEG + 0x80)), Some((2, 3)));
    }

    #[test]
    fn the_refusal_names_the_missing_segment_and_what_to_do() {
        let layout = WalLayout { system_id: 7, segment_size: SEG };
        let wal = wal_catalog(&[seg(1, 4)]);
        let WalVerdict::Hole(reach) = wal_verdict(&wal, &TimelinePath::new(1, &[]), 3 * SEG + 0x28, 4 * SEG) else {
            panic!("no hole")
        };
        let standby = TakenFrom { role: ServerRole::Standby, host: "db2:5432".into() };
        let text = hole_message("/srv/repo", layout, &standby, &reach, 3 * SEG + 0x28);
        for want in
            ["/srv/repo", "000000010000000000000003", "standby db2:5432", "0/3000028", "CHECKPOINT on the primary"]
        {
            assert!(text.contains(want), "{text:?} lacks {want:?}");
        }
        let primary = TakenFrom { role: ServerRole::Primary, host: "db1:5432".into() };
        let text = hole_message("/srv/repo", layout, &primary, &reach, 3 * SEG + 0x28);
        assert!(text.contains("pitr verify") && !text.contains("restartpoint"), "{text}");
    }

    #[test]
    fn a_timeline_switch_during_the_backup_is_refused() {
        let from = TakenFrom { role: ServerRole::Standby, host: "db2:5432".into() };
        assert_eq!(timeline_refusal(&from, Some(1), 1, None), None);
        assert_eq!(timeline_refusal(&from, Some(1), 1, Some(1)), None);
        assert_eq!(
            timeline_refusal(&from, Some(1), 1, Some(2)).as_deref(),
            Some(
                "the standby db2:5432 switched timeline during the backup (start on 1, stop on 2); take the backup \
                 again"
            )
        );
        // Replay reached a new timeline between the check and the backup's start.
        let why = timeline_refusal(&from, Some(1), 2, None).unwrap_or_default();
        assert!(why.contains("started the backup on timeline 2") && why.contains("timeline 1 when checked"), "{why}");
        // From the primary nothing was checked; a switch would still be refused.
        let primary = TakenFrom { role: ServerRole::Primary, host: "db1:5432".into() };
        assert_eq!(timeline_refusal(&primary, None, 3, Some(3)), None);
        assert!(timeline_refusal(&primary, None, 3, Some(4)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_that_never_answers_is_unreachable_after_the_default_connect_timeout() {
        // The kernel completes the TCP handshake for a listener that never accepts: a server
        // that takes the connection and then says nothing.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let standby: ConnInfo = format!("host=127.0.0.1 port={port} user=postgres sslmode=disable").parse().unwrap();
        assert_eq!(standby.connect_timeout, None);
        let primary: ConnInfo = "host=127.0.0.1 port=1 user=postgres".parse().unwrap();
        // The paused clock jumps to each timer as the test waits: no real time passes. Without a
        // default this would wait the whole hour.
        let checked = tokio::time::timeout(Duration::from_secs(3600), check_standby(&standby, &primary, "pitr_test"))
            .await
            .expect("check_standby waited an hour for a server that never answers");
        let err = checked.unwrap_err();
        assert!(matches!(err, BackupError::Standby { refusal: StandbyRefusal::Unreachable, .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")) && text.contains("timed out after 30s"), "{text}");
        assert!(text.contains("nothing was written to the repository"), "{text}");
        drop(silent);
    }

    #[test]
    fn manifest_mismatches_are_named() {
        let manifest =
            br#"{"Files": [{"Path": "a", "Size": 3, "Checksum-Algorithm": "CRC32C", "Checksum": "00000000"}]}"#;
        let mut files = vec![BackupFile {
            path: "a".into(),
            size: 3,
            mode: 0o600,
            mtime: 0,
            checksum: Some("11111111".into()),
            blocks: vec![],
        }];
        let err = verify_against_server_manifest(manifest, &mut files).unwrap_err().to_string();
        assert!(err.contains("a: CRC-32C"), "{err}");
        files[0].checksum = Some("00000000".into());
        verify_against_server_manifest(manifest, &mut files).unwrap();
        let err = verify_against_server_manifest(manifest, &mut []).unwrap_err().to_string();
        assert!(err.contains("did not arrive"), "{err}");
    }

    /// A ustar header as a server would send it.
    fn header(path: &str, kind: u8, size: u64, link: &str) -> Vec<u8> {
        crate::tar::ustar_header(path, kind, size, link, 0o700)
    }

    /// A file member with its content, padded.
    fn file(path: &str, content: &[u8]) -> Vec<u8> {
        let mut t = header(path, b'0', content.len() as u64, "");
        t.extend_from_slice(content);
        t.resize(t.len().next_multiple_of(512), 0);
        t
    }

    /// A receiver with 8 KiB blocks whose hasher comes from a throwaway repository (removed at
    /// once: only its dedup key is needed), and the far end of its block channel.
    async fn test_receiver() -> (Receiver, mpsc::Receiver<(String, Vec<u8>)>) {
        let dir = std::env::temp_dir().join(format!("pitr-basebackup-test-{}-{}", std::process::id(), now_us()));
        let store = pitr_archive::LocalStore::new(&dir);
        store.create_root().unwrap();
        let repo = Repository::new(Arc::new(store), pitr_archive::KeyRing::from_key("k", [2; 32]));
        let hasher = block_hasher(&repo).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, rx) = mpsc::channel(1024);
        (Receiver::new(hasher, 8192, tx), rx)
    }

    /// Feeds archives (`None`: the main one; `Some(oid)`: a tablespace's) through the receiver
    /// as BASE_BACKUP's events, in awkward chunks; the entries and files it would record.
    async fn receive(archives: Vec<(Option<u32>, Vec<u8>)>) -> Result<(Vec<BackupEntry>, Vec<String>), BackupError> {
        let (mut r, _rx) = test_receiver().await;
        for (oid, mut bytes) in archives {
            bytes.extend([0; 1024]);
            r.on_event(BackupEvent::Archive { tablespace: oid.map(|o| (o, format!("/srv/ts{o}"))) }).await?;
            for chunk in bytes.chunks(300) {
                r.on_event(BackupEvent::Data(bytes::Bytes::copy_from_slice(chunk))).await?;
            }
        }
        r.finish_archive()?;
        Ok((r.entries, r.files.into_iter().map(|f| f.path).collect()))
    }

    #[tokio::test]
    async fn manifest_is_bounded_by_what_arrived() {
        let (mut r, _rx) = test_receiver().await;
        let mut main = header("base/", b'5', 0, "");
        main.extend(file("base/1259", b"relation"));
        main.extend([0; 1024]);
        r.on_event(BackupEvent::Archive { tablespace: None }).await.unwrap();
        r.on_event(BackupEvent::Data(bytes::Bytes::from(main))).await.unwrap();
        assert_eq!(r.members, 2);
        r.on_event(BackupEvent::Manifest).await.unwrap();
        // Exactly up to the bound is taken; a server streaming on past it is refused, however
        // it chunks the data.
        let limit = manifest_limit(2) as usize;
        let chunk = bytes::Bytes::from(vec![b' '; 64 << 10]);
        let mut sent = 0;
        while sent + chunk.len() <= limit {
            r.on_event(BackupEvent::Data(chunk.clone())).await.unwrap();
            sent += chunk.len();
        }
        r.on_event(BackupEvent::Data(bytes::Bytes::from(vec![b' '; limit - sent]))).await.unwrap();
        let err = r.on_event(BackupEvent::Data(bytes::Bytes::from_static(b"}"))).await.unwrap_err().to_string();
        assert!(err.contains("manifest is longer than") && err.contains(&limit.to_string()), "{err}");
        assert!(err.contains("2 archive members"), "{err}");
        assert_eq!(r.manifest.as_ref().map(Vec::len), Some(limit));
        assert_eq!(manifest_limit(u64::MAX), u64::MAX);
    }

    #[tokio::test]
    async fn hostile_archives_never_reach_a_manifest() {
        // What PostgreSQL sends for a cluster with a tablespace: accepted.
        let mut main = header("base/", b'5', 0, "");
        main.extend(file("base/1259", b"relation"));
        main.extend(header("pg_tblspc/", b'5', 0, ""));
        main.extend(header("pg_tblspc/16384", b'2', 0, "/srv/ts16384"));
        let mut ts = header("PG_15_202209061/", b'5', 0, "");
        ts.extend(file("PG_15_202209061/5/16385", b"tablespace relation"));
        let (entries, files) = receive(vec![(None, main.clone()), (Some(16384), ts.clone())]).await.unwrap();
        assert_eq!(files, vec!["base/1259", "pg_tblspc/16384/PG_15_202209061/5/16385"]);
        assert!(entries.iter().any(
            |e| e.path == "pg_tblspc/16384" && e.kind == BackupEntryKind::Symlink { target: "/srv/ts16384".into() }
        ));

        let refused = |archives: Vec<(Option<u32>, Vec<u8>)>, want: &'static [&'static str]| async move {
            let err = receive(archives).await.unwrap_err().to_string();
            for w in want {
                assert!(err.contains(w), "{err:?} lacks {w:?}");
            }
        };
        // Links anywhere but pg_tblspc/<oid> of the main archive, whatever they point at.
        refused(vec![(None, header("pg_log", b'2', 0, "/var/log"))], &["\"pg_log\"", "/var/log", "symbolic link"])
            .await;
        refused(vec![(None, header("base/1/x", b'2', 0, "../../../etc"))], &["base/1/x", "symbolic link"]).await;
        refused(vec![(None, header("pg_tblspc/ts", b'2', 0, "/srv"))], &["pg_tblspc/ts", "symbolic link"]).await;
        refused(
            vec![(None, main.clone()), (Some(16384), header("PG_15/evil", b'2', 0, "/etc"))],
            &["pg_tblspc/16384/PG_15/evil", "symbolic link"],
        )
        .await;
        // Something at or under a tablespace link in the main archive, in either order.
        let mut t = header("pg_tblspc/16384", b'2', 0, "/srv/ts");
        t.extend(file("pg_tblspc/16384/planted", b"x"));
        refused(vec![(None, t)], &["pg_tblspc/16384/planted", "tablespace link pg_tblspc/16384"]).await;
        let mut t = header("pg_tblspc/16384/", b'5', 0, "");
        t.extend(header("pg_tblspc/16384", b'2', 0, "/srv/ts"));
        refused(vec![(None, t)], &["pg_tblspc/16384", "already holds"]).await;
        // `..` and absolute names, and link types PostgreSQL never sends (the tar reader).
        refused(vec![(None, file("../../etc/cron.d/pitr", b"x"))], &["unsafe member name", "`..`"]).await;
        refused(vec![(Some(16384), file("/etc/passwd", b"x"))], &["unsafe member name", "absolute"]).await;
        refused(vec![(None, header("base/1/1259", b'1', 0, "/etc/shadow"))], &["hard link", "base/1/1259"]).await;
        refused(vec![(None, header("base/fifo", b'6', 0, ""))], &["FIFO"]).await;
    }
}
