//! `pitr expire`: the retention policy ([`crate::retention`]) applied to a repository, in an
//! order that leaves it consistent wherever it stops (a `kill -9` between any two deletes):
//! 1. manifests, each incremental before its parent: a backup still listed has everything it
//!    had, and its chain;
//! 2. WAL no kept backup and no second of the window needs, after recording the floor that tells
//!    `pitr verify` which holes retention made;
//! 3. blocks no remaining manifest references, under the expire lock and only if no backup is
//!    running (see [`crate::running`]), stopping at the lock's sweep deadline.
//!
//! Pinned backups ([`crate::pins`], read after the lock is put and after the manifests are
//! listed) are kept with their chains and their start..stop WAL (reason `pinned`); the pin
//! records of a backup this run removes are deleted after its manifest. Records of a backup that
//! never got a manifest (`pitr backup --keep-forever` writes its record first, and may fail after)
//! are deleted with the block sweep, under the same condition (no backup running), once older than
//! `stale_backup_after`.
//!
//! Running restores and drills keep what they read (see [`crate::running`]): the backups of
//! their plans are not removed, nor the WAL from where their replay starts; one that has not
//! chosen its backup yet (or whose marker cannot be read) keeps every backup and all WAL. Markers
//! not renewed for `stale_backup_after` are a crashed run's: they keep nothing and are removed.
//! Live-looking markers and locks, and retention floors, are obeyed only once they open and agree
//! with their names ([`running::check`], [`read_floors`]); the others are reported as
//! [`ExpireReport::untrusted`] and left in place. A run's liveness goes by its own generations
//! only: one that does not open neither keeps a crashed run alive nor hides a live one. An
//! object under the name of a floor this run writes is not pitr's floor: it is deleted and the
//! floor put in its place, rather than ending the run before any WAL goes.
//!
//! A delete the storage refuses (S3 Object Lock: [`StoreError::Denied`], or a permission error)
//! does not stop the run: the object is reported as retained, and a backup whose manifest stays
//! keeps its WAL and blocks. Other errors end the run, leaving what is done done.
//!
//! Then, where the store has a retention to extend (S3 Object Lock, [`Store::has_retention`]) and
//! not in a dry run: every object a backup kept by a GFS rule needs (its manifest, its blocks, the
//! WAL from its start to its stop segment and its timeline's history) has its retention extended
//! to the latest date the policy may keep that backup ([`retention::keep_until`]; for an object
//! several backups need, the latest of their dates). A pinned backup's objects, and its pin record
//! in force, are retained until its pin's date or now + [`ExpireOptions::keep_forever_lock`],
//! whichever comes first (moved on by every run, so the lock never lapses while runs come more
//! often than that, and an `--until` far ahead is not locked in before an unpin could undo it);
//! the repository marker, the dedup key and the cluster record until the latest date of all.
//! This runs after the expire lock is released:
//! it deletes nothing, so backups need not wait for it.
//!
//! [`Store::has_retention`]: crate::store::Store::has_retention

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pitr_pgformat::lsn::format_lsn;
use serde::Serialize;

use crate::backup::{BackupKind, BackupManifest};
use crate::catalog;
use crate::names::pg;
use crate::pins::{Pin, PinSet};
use crate::repository::{ClusterInfo, Repository, RepositoryError};
use crate::restore_points;
use crate::retention::{self, BackupPoint, Policy, Reason, Timelines, WalPlan};
use crate::running::{self, Activity, ExpireLock, LockError, ReaderNeeds, Run, Trust, Untrusted};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::StoreError;
use crate::time::format_rfc3339_auto;
use crate::wal::{WalLayout, WalObject};
use crate::wal_catalog::WalCatalog;

/// How one `pitr expire` run behaves.
#[derive(Debug, Clone)]
pub struct ExpireOptions {
    /// Which backups to keep (GFS rules and the PITR window).
    pub policy: Policy,
    /// The clock the policy runs on (µs since the Unix epoch); the real one except in tests.
    pub now_us: i64,
    /// Report what would go, write and delete nothing (not even the lock).
    pub dry_run: bool,
    /// A running marker (backup, restore, drill) not renewed for this long is a crashed run's:
    /// it protects nothing and is removed. Keep it well above [`running::RENEW_EVERY`] (the
    /// config's lower bound is 1 minute).
    pub stale_backup_after: Duration,
    /// Lifetime of the expire lock; blocks are deleted only during its first half.
    pub lock_ttl: Duration,
    /// With S3 Object Lock: how far past now each run extends the retention of what a pinned
    /// backup needs (`object_lock_days`; an `--until` pin ending sooner, to its date); unused
    /// without a retention to extend.
    pub keep_forever_lock: Duration,
}

/// Why an expire run stopped. What it deleted before the error stays deleted; the repository is
/// consistent at every such point.
#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    /// Listing, reading, putting a floor or deleting failed (other than a refused delete, which is
    /// reported as [`Retained`] instead).
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// The expire lock could not be taken (another expire is running, or the put failed).
    #[error(transparent)]
    Lock(#[from] LockError),
}

impl From<StoreError> for ExpireError {
    fn from(e: StoreError) -> Self {
        ExpireError::Repository(e.into())
    }
}

/// A backup that stays, with why.
#[derive(Debug, Clone, Serialize)]
pub struct KeptBackup {
    /// The backup id.
    pub id: String,
    /// Full or incremental.
    pub kind: BackupKind,
    /// Every rule that keeps it (empty for one kept only because its manifest delete was refused
    /// or an incremental on it could not be removed; see [`ExpireReport::retained`]).
    pub reasons: Vec<Reason>,
    /// Its pin in force, `forever` or `until <time>` ([`crate::pins::Pin::describe`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Its note, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A backup whose manifest was deleted (dry run: would be).
#[derive(Debug, Clone, Serialize)]
pub struct RemovedBackup {
    /// The backup id.
    pub id: String,
    /// Full or incremental.
    pub kind: BackupKind,
    /// Its stop time (consistency point), as the report prints times.
    pub stop_time: String,
}

/// A run of consecutive WAL segments of one timeline whose objects were all deleted (dry run:
/// would be).
#[derive(Debug, Clone, Serialize)]
pub struct WalRange {
    /// The timeline.
    pub timeline: u32,
    /// The first segment's file name (PostgreSQL's 24 hex digits).
    pub from: String,
    /// The last segment's file name, inclusive.
    pub to: String,
    /// How many segments `from..=to` is.
    pub segments: usize,
}

/// An object the storage refused to delete (or, in `retention_failed`, whose retention could
/// not be extended).
#[derive(Debug, Clone, Serialize)]
pub struct Retained {
    /// The object name.
    pub object: String,
    /// The storage's refusal or the error, or why a manifest was kept for its incremental.
    pub why: String,
}

/// A kept backup whose objects the storage must keep until `until` (S3 Object Lock).
#[derive(Debug, Clone, Serialize)]
pub struct RetentionTarget {
    /// The backup id.
    pub id: String,
    /// The latest date the policy may keep it ([`retention::keep_until`]), as the report prints
    /// times.
    pub until: String,
    /// Objects it needs (some shared with other backups).
    pub objects: usize,
}

/// Retention extensions in flight at once; the store's own request bound
/// (`[repository] max_concurrency`) applies below this.
const RETENTION_CONCURRENCY: usize = 32;

/// What an expire run kept, removed and left, as `pitr expire` prints it (and `--json`
/// serialises it). Times are RFC 3339 UTC strings.
#[derive(Debug, Clone, Serialize)]
pub struct ExpireReport {
    /// Nothing was written or deleted; the removals are what a real run would do.
    pub dry_run: bool,
    /// The clock the policy ran on.
    pub now: String,
    /// The window's cut: now − window, moved back to the oldest running backup's start.
    pub window_start: String,
    /// Id of the window base (the newest backup on the newest timeline's path consistent at or
    /// before the cut); `None` when no backup can start a restore on that timeline.
    pub window_base: Option<String>,
    /// The newest timeline seen in the WAL, the history files or the manifests: the window is
    /// placed for restores on it.
    pub latest_timeline: u32,
    /// Every backup still listed after the run, with its reasons.
    pub kept: Vec<KeptBackup>,
    /// Backups whose manifests were removed.
    pub removed_backups: Vec<RemovedBackup>,
    /// Removed WAL, as runs of consecutive segments (only segments all of whose objects went).
    pub removed_wal: Vec<WalRange>,
    /// WAL objects (segment objects and chunks) deleted.
    pub removed_wal_objects: usize,
    /// Unreferenced blocks deleted.
    pub removed_blocks: usize,
    /// Index entries of restore points deleted: their WAL is below the retention floor and in no
    /// kept backup's start..stop, so no restore can reach them or be stopped by them.
    pub removed_restore_points: usize,
    /// Stored bytes of everything removed (or, dry run, that would be).
    pub removed_bytes: u64,
    /// Objects the storage refused to delete (Object Lock, permissions), and manifests kept
    /// because an incremental on them was refused.
    pub retained: Vec<Retained>,
    /// Why no WAL was considered for deletion (a timeline without a readable history, a reader
    /// without a plan…); `None` when the WAL plan ran.
    pub wal_skipped: Option<String>,
    /// Why the block sweep did not run (a live backup, the deadline); `None` when it ran.
    pub blocks_skipped: Option<String>,
    /// Unreferenced blocks left for the next run because the sweep reached its deadline.
    pub blocks_left: usize,
    /// The run reached its deadline (half of the lock's lifetime) and stopped; the rest goes
    /// next run.
    pub stopped_at_deadline: bool,
    /// Live running-backup markers seen.
    pub running_backups: Vec<String>,
    /// Live restore and drill markers seen, each with what it keeps.
    pub running_restores: Vec<String>,
    /// Markers and locks of crashed runs, removed (dry run: found).
    pub stale_removed: Vec<String>,
    /// Backups that never got a manifest whose pin records were removed (dry run: would be):
    /// a `pitr backup --keep-forever` or `--note` that failed after recording its pin.
    pub orphan_pins_removed: Vec<String>,
    /// Live-looking markers and locks, and retention floors, that are not pitr's (they do not
    /// open with the repository's keys, or disagree with their names): not obeyed and left in
    /// place for inspection, except a floor under the name of one this run writes, which is
    /// replaced.
    pub untrusted: Vec<Untrusted>,
    /// With S3 Object Lock: the backups kept by a GFS rule or a pin, each with the date its objects are to
    /// be retained until (see [`retention::keep_until`]). Empty where the store has no retention.
    pub retention_until: Vec<RetentionTarget>,
    /// Distinct objects of those backups whose retention was read (not in a dry run), and of
    /// those, how many had it extended (the rest reached their date already).
    pub retention_checked: usize,
    /// See `retention_checked`.
    pub retention_extended: usize,
    /// Objects of those backups that were not there (`pitr verify` reports what that breaks).
    pub retention_missing: usize,
    /// Objects whose retention could not be extended, each with the error.
    pub retention_failed: Vec<Retained>,
}

/// The LSN catalog snapshots are pruned to ([`catalog::prune`]): the start of the oldest
/// segment still listed after this run's removals, on any timeline (LSNs grow across
/// timelines, and a segment whose delete failed still counts as kept). `None` when no WAL is
/// kept: then nothing says which names are needed, and none is removed.
fn catalog_floor_lsn(wal: &WalCatalog, removed: &[(u32, u64)]) -> Option<u64> {
    let removed: BTreeSet<&(u32, u64)> = removed.iter().collect();
    wal.segments
        .keys()
        .filter(|k| !removed.contains(k))
        .map(|&(_, segno)| segno.saturating_mul(wal.layout.segment_size))
        .min()
}

/// Whether a failed delete was the storage refusing it, rather than a failure.
pub fn refused(e: &StoreError) -> bool {
    e.is_denied() || matches!(e, StoreError::Io { cause, .. } if cause.kind() == std::io::ErrorKind::PermissionDenied)
}

/// A span in µs, saturating.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Times in the expire report: as many fraction digits as the moment has.
fn fmt(us: i64) -> String {
    format_rfc3339_auto(us)
}

/// The retention floor of each timeline, from floors that open and whose record names the
/// timeline and segment of their object name; and the floors that do not. Per timeline the
/// highest floor is read first and the first sound one decides, so a lower floor (an older
/// expire's, which decides nothing) is not read. A floor that is not sound is not obeyed: it
/// would otherwise tell `pitr verify` that the WAL below it was removed on purpose.
pub async fn read_floors(
    repo: &Repository,
    system_id: u64,
) -> Result<(BTreeMap<u32, u64>, Vec<Untrusted>), RepositoryError> {
    let mut by_timeline: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    for o in repo.list(&pg::floors_prefix(system_id)).await? {
        if let Some((t, segno)) = pg::parse_floor(system_id, &o.name) {
            by_timeline.entry(t).or_default().push((segno, o.name));
        }
    }
    let mut floors = BTreeMap::new();
    let mut untrusted = Vec::new();
    for (t, mut named) in by_timeline {
        named.sort();
        for (segno, name) in named.into_iter().rev() {
            let why = match repo.get_record(&name).await {
                Ok((_, text)) => match retention::floor_record_disagrees(t, segno, &String::from_utf8_lossy(&text)) {
                    None => {
                        floors.insert(t, segno);
                        break;
                    }
                    Some(why) => why,
                },
                Err(RepositoryError::Store(e)) if e.is_not_found() => continue,
                Err(e) if e.is_bad_object() => {
                    format!("does not open with this repository's keys ({e})")
                }
                Err(e) => return Err(e),
            };
            untrusted.push(Untrusted { object: name, why });
        }
    }
    Ok((floors, untrusted))
}

/// How often [`put_floor`] clears the floor's name and puts again before giving up.
const FLOOR_TRIES: usize = 3;

/// Ends the `why` of a floor name's object that this expire deleted to write its own floor there
/// (so nothing is left for the operator to delete).
pub const FLOOR_REPLACED: &str = "deleted by this expire, which wrote the floor in its place";

/// Records the floor of `timeline` at `segno`; `false` when it could not be (its WAL must then
/// stay). Floors have predictable names, and one is written only above the highest sound floor,
/// so an object already under the name is not a floor this repository's expire wrote (a sound
/// one there, written at another time, is accepted): it was planted, damaged, or sealed with
/// another key. It is deleted and the floor put in its place, since leaving it would end this
/// expire, and every later one, before any WAL is removed or any block swept. A delete the
/// storage refuses (Object Lock) leaves the name taken: `false`. Other storage errors end the run.
/// What was deleted is named in `untrusted`.
async fn put_floor(
    repo: &Repository,
    system_id: u64,
    timeline: u32,
    segno: u64,
    now: i64,
    untrusted: &mut Vec<Untrusted>,
) -> Result<bool, RepositoryError> {
    let name = pg::floor(system_id, timeline, segno);
    for _ in 0..FLOOR_TRIES {
        let text = retention::floor_record(timeline, segno, now);
        let meta = ObjectMeta { timeline, ..ObjectMeta::plain(ObjectKind::Meta) };
        let taken = match repo.put_sealed(&name, text.into_bytes(), meta).await {
            Ok(_) => return Ok(true),
            Err(e @ RepositoryError::Conflict { .. }) => e,
            Err(e) if e.is_bad_object() => e,
            Err(e) => return Err(e),
        };
        let why = match repo.get_record_here(&name).await {
            Ok((_, text)) => {
                match retention::floor_record_disagrees(timeline, segno, &String::from_utf8_lossy(&text)) {
                    None => return Ok(true),
                    Some(why) => why,
                }
            }
            Err(RepositoryError::Store(e)) if e.is_not_found() => continue,
            Err(e) if e.is_bad_object() => {
                format!("does not open with this repository's keys ({e})")
            }
            Err(e) => return Err(e),
        };
        tracing::warn!(floor = %name, error = %taken, "the retention floor's name holds an object that is not pitr's floor ({why}); deleting it and writing the floor");
        match repo.delete(&name).await {
            Ok(()) => match untrusted.iter_mut().find(|u| u.object == name) {
                Some(u) if !u.why.ends_with(FLOOR_REPLACED) => u.why = format!("{}; {FLOOR_REPLACED}", u.why),
                Some(_) => {}
                None => untrusted.push(Untrusted { object: name.clone(), why: format!("{why}; {FLOOR_REPLACED}") }),
            },
            Err(RepositoryError::Store(e)) if refused(&e) => {
                tracing::warn!(floor = %name, error = %e, "cannot clear the retention floor's name; the WAL of timeline {timeline} is kept");
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    tracing::warn!(floor = %name, "the retention floor's name was taken again after each clearing; the WAL of timeline {timeline} is kept");
    Ok(false)
}

/// Applies `opts.policy` to the cluster's backups, WAL and blocks.
pub async fn expire(
    repo: &Repository,
    cluster: &ClusterInfo,
    opts: &ExpireOptions,
) -> Result<ExpireReport, ExpireError> {
    if opts.dry_run {
        return run(repo, cluster, opts, None).await.map(|(report, _)| report);
    }
    let lock = ExpireLock::acquire(repo, opts.now_us, opts.lock_ttl).await?;
    let result = run(repo, cluster, opts, Some(&lock)).await;
    lock.release().await;
    let (mut report, retain) = result?;
    extend_retention(repo, retain, &mut report).await;
    Ok(report)
}

/// What each kept backup needs retained, and until when: `(targets for the report, object →
/// latest date)`. Dates already past are left out (nothing to extend). `pin_records`: the pin
/// record in force of each pinned backup, retained with it (an unpin writes a new record, so this
/// one's lock undoes nothing; without it a pin could be deleted under the lock of its backup).
/// What every restore reads besides (the repository marker, the dedup key, the cluster record)
/// gets the latest date of all.
fn retention_plan(
    system_id: u64,
    wal: &WalCatalog,
    survivors: &[&BackupManifest],
    until: &BTreeMap<String, i64>,
    pin_records: &BTreeMap<String, String>,
    now_us: i64,
) -> (Vec<RetentionTarget>, BTreeMap<String, i64>) {
    let layout = wal.layout;
    let mut targets = Vec::new();
    let mut objects: BTreeMap<String, i64> = BTreeMap::new();
    for m in survivors {
        let Some(&date) = until.get(&m.id) else { continue };
        if date <= now_us {
            continue;
        }
        let mut names = vec![pg::backup_manifest(system_id, &m.id)];
        names.extend(pin_records.get(&m.id).cloned());
        names.extend(m.files.iter().flat_map(|f| f.blocks.iter()).map(|b| pg::block(system_id, b)));
        // What restoring it to its consistency point reads: the WAL from its start to its stop
        // segment. A whole segment's chunks are not retained (compaction deletes them, and
        // locked versions of deleted objects cost storage until their date); a segment still in
        // chunks has them retained instead.
        for segno in layout.segno_of(m.start_lsn)..=layout.segno_of(m.stop_lsn) {
            let Some(entry) = wal.segments.get(&(m.timeline, segno)) else { continue };
            if entry.whole {
                names.push(layout.object_name(&WalObject::Segment { timeline: m.timeline, segno }));
            } else {
                for &(from, to) in &entry.chunks {
                    names.push(layout.object_name(&WalObject::Chunk { timeline: m.timeline, segno, from, to }));
                }
            }
        }
        if wal.histories.contains(&m.timeline) {
            names.push(layout.object_name(&WalObject::History { timeline: m.timeline }));
        }
        names.sort();
        names.dedup();
        targets.push(RetentionTarget { id: m.id.clone(), until: fmt(date), objects: names.len() });
        for name in names {
            let e = objects.entry(name).or_insert(date);
            *e = (*e).max(date);
        }
    }
    if let Some(latest) = objects.values().max().copied() {
        for name in [crate::names::MARKER.to_string(), crate::names::DEDUP_KEY.to_string(), pg::cluster_info(system_id)]
        {
            objects.insert(name, latest);
        }
    }
    (targets, objects)
}

/// The pin records of backups with no manifest, by backup id: written by a `pitr backup` before
/// the manifest it then did not store. Call only while no backup is running (a running one may
/// be about to store its manifest); a record written after `cutoff_us` stays as well, for a
/// backup that paused between its record and its manifest. Records of such a backup that do
/// not open tell no age and stay (they are reported as untrusted).
async fn orphan_pins(
    repo: &Repository,
    system_id: u64,
    pins: &PinSet,
    listed_manifests: &BTreeMap<String, u64>,
    cutoff_us: i64,
) -> Result<BTreeMap<String, Vec<String>>, RepositoryError> {
    let mut out = BTreeMap::new();
    for (id, names) in &pins.names {
        let manifest = pg::backup_manifest(system_id, id);
        if listed_manifests.contains_key(&manifest) {
            continue;
        }
        let Some(record) = pins.current.get(id) else { continue };
        if record.written_us >= cutoff_us {
            continue;
        }
        // Listed before the pins were read: looked at again.
        if repo.store().head(&manifest).await?.is_some() {
            continue;
        }
        out.insert(id.clone(), names.clone());
    }
    Ok(out)
}

/// Extends the retention of each planned object, a bounded number at a time, into `report`.
///
/// A failure is reported, naming the object, and the rest go on: the deletes are done by now and
/// do not depend on it, the object keeps the retention it has (at least its write-time
/// `object_lock_days`), and the next run tries again. `pitr expire` exits non-zero when any
/// failed, so that it is seen.
async fn extend_retention(repo: &Repository, plan: BTreeMap<String, i64>, report: &mut ExpireReport) {
    if plan.is_empty() {
        return;
    }
    let store = repo.store().clone();
    let mut results = futures_util::stream::iter(plan.into_iter().map(|(name, until)| {
        let store = store.clone();
        async move {
            let result = store.extend_retention(&name, until).await;
            (name, result)
        }
    }))
    .buffer_unordered(RETENTION_CONCURRENCY);
    while let Some((name, result)) = results.next().await {
        match result {
            Ok(extended) => {
                report.retention_checked += 1;
                report.retention_extended += usize::from(extended);
            }
            Err(e) if e.is_not_found() => report.retention_missing += 1,
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "could not extend the object's retention");
                report.retention_failed.push(Retained { object: name, why: e.to_string() });
            }
        }
    }
    report.retention_failed.sort_by(|a, b| a.object.cmp(&b.object));
}

/// Deletes `names` (in order for `batch` 1), collecting refusals; stops at `deadline`.
/// Returns how many went, and their stored bytes.
async fn delete_all(
    repo: &Repository,
    names: &[String],
    sizes: &BTreeMap<String, u64>,
    batch: usize,
    deadline: Option<Instant>,
    retained: &mut Vec<Retained>,
) -> Result<(Vec<String>, u64), RepositoryError> {
    let mut gone = Vec::new();
    let mut bytes = 0;
    for chunk in names.chunks(batch.max(1)) {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let ok = match repo.delete_many(chunk).await {
            Ok(()) => chunk.to_vec(),
            // Find out which: one at a time.
            Err(_) => {
                let mut ok = Vec::new();
                for name in chunk {
                    match repo.delete(name).await {
                        Ok(()) => ok.push(name.clone()),
                        Err(RepositoryError::Store(e)) if refused(&e) => {
                            retained.push(Retained { object: name.clone(), why: e.to_string() })
                        }
                        Err(e) => return Err(e),
                    }
                }
                ok
            }
        };
        bytes += ok.iter().map(|n| sizes.get(n).copied().unwrap_or(0)).sum::<u64>();
        gone.extend(ok);
    }
    Ok((gone, bytes))
}

async fn run(
    repo: &Repository,
    cluster: &ClusterInfo,
    opts: &ExpireOptions,
    lock: Option<&ExpireLock>,
) -> Result<(ExpireReport, BTreeMap<String, i64>), ExpireError> {
    let system_id = cluster.system_id;
    let now = opts.now_us;
    let layout = WalLayout::new(cluster);

    // Markers first: a run that announced itself after this has seen our lock and waits.
    let objects = running::list(repo).await?;
    let mut live_backups: Vec<Run> = Vec::new();
    let mut live_readers: Vec<(Run, ReaderNeeds)> = Vec::new();
    let mut stale = Vec::new();
    // Markers and locks that claim to be live but are not pitr's: not obeyed (a planted one
    // would otherwise stop the block sweep, or keep every backup and all WAL, for as long as
    // its name says), not deleted either (evidence: `pitr verify` names them).
    let mut untrusted = Vec::new();
    for run in running::runs(&objects) {
        if !run.is_live(now, opts.stale_backup_after) {
            stale.extend(run.generations);
            continue;
        }
        // Live by its names; but only its own generations count (a planted one, under a crashed
        // run's kind, start and id, keeps nothing alive).
        let found = running::open_run(repo, &run, now).await;
        untrusted.extend(found.untrusted.iter().cloned());
        if found.planted_only() {
            continue;
        }
        let own = found.run;
        if !own.is_live(now, opts.stale_backup_after) {
            stale.extend(own.generations);
        } else if own.kind.reads() {
            live_readers.push((own, running::needs_of(&found.trust)));
        } else {
            live_backups.push(own);
        }
    }
    for o in &objects {
        if let Activity::Expire { expires_us, .. } = o.activity {
            let ours = lock.is_some_and(|l| l.name() == o.name);
            if expires_us <= now && !ours {
                stale.push(o.name.clone());
            } else if !ours {
                if let Trust::Untrusted(u) = running::check(repo, o, now).await {
                    untrusted.push(u);
                }
            }
        }
    }
    let running_since = live_backups.iter().map(|r| r.started_us).min();
    let mut running_backups = Vec::new();
    for r in &live_backups {
        let holder = running::describe(repo, r.newest()).await;
        running_backups.push(format!(
            "{} (since {}, renewed {}, {holder})",
            r.newest(),
            fmt(r.started_us),
            fmt(r.renewed_us)
        ));
    }
    // What running restores and drills read.
    let mut reader_backups: BTreeSet<String> = BTreeSet::new();
    let mut reader_wal: Vec<(u32, u64)> = Vec::new();
    let mut keep_all: Option<String> = None;
    let mut running_restores = Vec::new();
    for (run, needs) in &live_readers {
        let what = match needs {
            ReaderNeeds::Planned(p) => {
                reader_backups.extend(p.backups.iter().cloned());
                reader_wal.push((p.timeline, layout.segno_of(p.wal_from_lsn)));
                format!(
                    "keeps backups {} and the WAL of timeline {} from {} on",
                    p.backups.join(", "),
                    p.timeline,
                    format_lsn(p.wal_from_lsn)
                )
            }
            ReaderNeeds::Unplanned => {
                keep_all
                    .get_or_insert_with(|| format!("a {} has not chosen its backup yet ({})", run.kind, run.newest()));
                "has not chosen its backup yet: every backup and all WAL are kept".to_string()
            }
            ReaderNeeds::Unreadable(e) => {
                keep_all.get_or_insert_with(|| format!("the marker of a running {} cannot be read ({e})", run.kind));
                format!("its marker cannot be read ({e}): every backup and all WAL are kept")
            }
        };
        let holder = running::describe(repo, run.newest()).await;
        running_restores.push(format!(
            "{} {} (since {}, renewed {}, {holder}): {what}",
            run.kind,
            run.newest(),
            fmt(run.started_us),
            fmt(run.renewed_us)
        ));
    }

    let manifests = BackupManifest::list(repo, system_id).await?;
    let manifest_sizes: BTreeMap<String, u64> =
        repo.list(&pg::backups_prefix(system_id)).await?.into_iter().map(|o| (o.name, o.size)).collect();
    let wal_listing = repo.list(&layout.prefix()).await?;
    let wal = WalCatalog::from_names(layout, wal_listing.iter().map(|o| o.name.as_str()));
    let wal_sizes: BTreeMap<String, u64> = wal_listing.into_iter().map(|o| (o.name, o.size)).collect();
    let mut timelines = Timelines::default();
    for (t, read) in wal.read_histories(repo).await? {
        match read {
            Ok(entries) => timelines.add_entries(t, entries),
            Err(problem) => timelines.add_unreadable(t, problem.to_string()),
        }
    }
    let (floors, untrusted_floors) = read_floors(repo, system_id).await?;
    untrusted.extend(untrusted_floors);
    let pins = PinSet::load(repo, system_id).await?;
    untrusted.extend(pins.untrusted.iter().cloned());
    let pins_now = pins.active(now);

    let latest = wal
        .segments
        .keys()
        .map(|(t, _)| *t)
        .chain(wal.histories.iter().copied())
        .chain(manifests.iter().map(|m| m.timeline))
        .max()
        .unwrap_or(1);
    let points: Vec<BackupPoint> = manifests.iter().map(BackupPoint::from).collect();
    let mut selection = retention::select(&points, &opts.policy, now, &timelines, latest, running_since);
    // What a running restore or drill reads stays; and with it its blocks and its start..stop WAL.
    let mut expired = std::mem::take(&mut selection.expired);
    expired.retain(|id| {
        let read = keep_all.is_some() || reader_backups.contains(id);
        if read {
            selection.kept.entry(id.clone()).or_default().insert(Reason::Restore);
        }
        !read
    });
    selection.expired = expired;
    retention::keep_pinned(&mut selection, &points, &pins_now.keys().cloned().collect());
    let by_id: BTreeMap<&str, &BackupManifest> = manifests.iter().map(|m| (m.id.as_str(), m)).collect();

    let mut retained = Vec::new();
    let mut removed_bytes = 0;
    // A backup waits for our lock only until it expires: past the deadline nothing more goes
    // (what is left goes next run; every phase stops in a consistent place).
    let deadline = lock.map(|l| l.sweep_deadline());
    let past_deadline = || deadline.is_some_and(|d| Instant::now() >= d);
    let mut stopped_at_deadline = false;

    // 1. Manifests, children first. A refused one pins its chain.
    let mut pinned: BTreeSet<String> = BTreeSet::new();
    let mut removed_backups = Vec::new();
    // One journal batch announces every manifest delete below, not one batch each.
    if !opts.dry_run {
        let names: Vec<String> = selection.expired.iter().map(|id| pg::backup_manifest(system_id, id)).collect();
        repo.announce_deletes(&names).await?;
    }
    for id in &selection.expired {
        if past_deadline() {
            stopped_at_deadline = true;
            break;
        }
        if pinned.contains(id) {
            retained.push(Retained {
                object: pg::backup_manifest(system_id, id),
                why: "kept: an incremental built on it could not be removed".into(),
            });
            continue;
        }
        let name = pg::backup_manifest(system_id, id);
        let outcome = if opts.dry_run { Ok(()) } else { repo.delete(&name).await };
        match outcome {
            Ok(()) => {
                removed_bytes += manifest_sizes.get(&name).copied().unwrap_or(0);
                let m = by_id[id.as_str()];
                removed_backups.push(RemovedBackup { id: id.clone(), kind: m.kind, stop_time: fmt(m.stop_time_us) });
            }
            Err(RepositoryError::Store(e)) if refused(&e) => {
                retained.push(Retained { object: name, why: e.to_string() });
                let mut at = by_id.get(id.as_str()).and_then(|m| m.parent.clone());
                while let Some(p) = at {
                    if !pinned.insert(p.clone()) {
                        break;
                    }
                    at = by_id.get(p.as_str()).and_then(|m| m.parent.clone());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let removed_ids: BTreeSet<&str> = removed_backups.iter().map(|b| b.id.as_str()).collect();
    // Their pins keep nothing now; a crash before this leaves records of no backup (ignored).
    let pin_records: Vec<String> = removed_ids.iter().filter_map(|id| pins.names.get(*id)).flatten().cloned().collect();
    if !opts.dry_run && !pin_records.is_empty() {
        delete_all(repo, &pin_records, &BTreeMap::new(), 64, None, &mut retained).await?;
    }
    let survivors: Vec<&BackupManifest> = manifests.iter().filter(|m| !removed_ids.contains(m.id.as_str())).collect();
    let survivor_points: Vec<&BackupPoint> = points.iter().filter(|p| !removed_ids.contains(p.id.as_str())).collect();

    // 2. WAL: floors first, then the segments.
    let base = selection.window_base.as_deref().and_then(|id| points.iter().find(|p| p.id == id));
    let mut wal_plan = retention::plan_wal(&wal, &survivor_points, base, &timelines, &floors);
    match &keep_all {
        Some(why) if wal_plan.skipped.is_none() => {
            wal_plan = WalPlan { skipped: Some(format!("{why}: all WAL is kept")), ..WalPlan::default() };
        }
        Some(_) => {}
        None => retention::keep_wal_from(&mut wal_plan, &timelines, &reader_wal),
    }
    let mut wal_names = retention::wal_objects(&wal, &wal_plan.delete);
    let mut removed_wal_objects = wal_names.len();
    let mut removed_segments = wal_plan.delete.clone();
    // The floors once this phase is done (what a dry run would record): they decide which
    // restore point entries go.
    let mut floors_now = floors.clone();
    if opts.dry_run {
        removed_bytes += wal_names.iter().map(|n| wal_sizes.get(n).copied().unwrap_or(0)).sum::<u64>();
        if !wal_names.is_empty() {
            floors_now.extend(wal_plan.floors.iter().map(|(&t, &s)| (t, s)));
        }
    } else if !wal_names.is_empty() && past_deadline() {
        stopped_at_deadline = true;
        removed_wal_objects = 0;
        removed_segments.clear();
    } else if !wal_names.is_empty() {
        let mut unrecorded = BTreeSet::new();
        for (&t, &segno) in &wal_plan.floors {
            if put_floor(repo, system_id, t, segno, now, &mut untrusted).await? {
                floors_now.insert(t, segno);
            } else {
                unrecorded.insert(t);
            }
        }
        // Without its floor a timeline's holes would look like losses to `pitr verify`: its WAL
        // stays for a later run.
        if !unrecorded.is_empty() {
            removed_segments.retain(|(t, _)| !unrecorded.contains(t));
            wal_names = retention::wal_objects(&wal, &removed_segments);
        }
        let (gone, bytes) = delete_all(repo, &wal_names, &wal_sizes, 256, deadline, &mut retained).await?;
        removed_bytes += bytes;
        removed_wal_objects = gone.len();
        let refused_wal = retained.iter().filter(|r| wal_sizes.contains_key(&r.object)).count();
        stopped_at_deadline |= gone.len() + refused_wal < wal_names.len();
        let gone: BTreeSet<&String> = gone.iter().collect();
        removed_segments.retain(|&(t, s)| {
            let objects = retention::wal_objects(&wal, &[(t, s)]);
            objects.iter().all(|o| gone.contains(o))
        });
    }

    // 2b. Index entries of restore points whose WAL retention removed (see
    // [`restore_points::expired_entries`]): entries accumulate with every restore point, and
    // readers of the index read each. Not done after the deadline (the next run does it). The
    // index is an aside: a listing that fails is logged and the run goes on.
    let mut removed_restore_points = 0;
    if !stopped_at_deadline {
        match repo.list(&pg::restore_points_prefix(system_id)).await {
            Ok(listed) => {
                let sizes: BTreeMap<String, u64> = listed.iter().map(|o| (o.name.clone(), o.size)).collect();
                let kept: Vec<(u64, u64)> = survivors.iter().map(|m| (m.start_lsn, m.stop_lsn)).collect();
                let expired = restore_points::expired_entries(
                    system_id,
                    listed.iter().map(|o| o.name.as_str()),
                    layout,
                    &floors_now,
                    &kept,
                );
                if opts.dry_run {
                    removed_restore_points = expired.len();
                    removed_bytes += expired.iter().map(|n| sizes.get(n).copied().unwrap_or(0)).sum::<u64>();
                } else if !expired.is_empty() {
                    let (gone, bytes) = delete_all(repo, &expired, &sizes, 256, deadline, &mut retained).await?;
                    removed_restore_points = gone.len();
                    removed_bytes += bytes;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list the index of restore points: left for a later run"),
        }
    }

    // 2c. Change index objects (`pitr find`) of segments below the floors: the same rule as
    // their WAL. An aside like 2b: a failure is logged and left for a later run.
    if !stopped_at_deadline && !opts.dry_run {
        match repo.list(&pg::change_index_prefix(system_id)).await {
            Ok(listed) => {
                let below: Vec<String> = listed
                    .into_iter()
                    .filter(|o| {
                        pg::parse_change_index(system_id, &o.name)
                            .and_then(|f| layout.parse_segment_file_name(f))
                            .is_some_and(|(t, segno)| floors_now.get(&t).is_some_and(|&floor| segno < floor))
                    })
                    .map(|o| o.name)
                    .collect();
                if !below.is_empty() {
                    let (gone, _) = delete_all(repo, &below, &BTreeMap::new(), 256, deadline, &mut retained).await?;
                    tracing::info!(removed = gone.len(), "change index objects of expired WAL removed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list the change index: left for a later run"),
        }
    }

    // 2d. Catalog snapshots (`pitr find`'s names) no kept WAL needs: all but the newest at or
    // before the start of the oldest segment kept, on any timeline. The same kind of aside.
    if !stopped_at_deadline && !opts.dry_run {
        if let Some(floor_lsn) = catalog_floor_lsn(&wal, &removed_segments) {
            match catalog::prune(repo, system_id, floor_lsn).await {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(removed = gone.len(), "catalog snapshots older than the WAL kept removed")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not prune catalog snapshots: left for a later run"),
            }
        }
    }

    // 3. Blocks.
    let mut blocks_skipped = None;
    let mut removed_blocks = 0;
    let mut blocks_left = 0;
    if stopped_at_deadline {
        blocks_skipped = Some("expire reached its deadline before the block sweep".into());
    } else if !live_backups.is_empty() {
        blocks_skipped = Some(format!(
            "a backup is running ({}): unreferenced blocks are left for a later run",
            running_backups.join("; ")
        ));
    }
    let mut orphan_pins_removed = Vec::new();
    if blocks_skipped.is_none() {
        let cutoff = now.saturating_sub(micros(opts.stale_backup_after));
        let orphans = orphan_pins(repo, system_id, &pins, &manifest_sizes, cutoff).await?;
        if !orphans.is_empty() && !opts.dry_run {
            let names: Vec<String> = orphans.values().flatten().cloned().collect();
            let (gone, _) = delete_all(repo, &names, &BTreeMap::new(), 64, deadline, &mut retained).await?;
            orphan_pins_removed =
                orphans.into_iter().filter(|(_, n)| n.iter().all(|n| gone.contains(n))).map(|(id, _)| id).collect();
        } else {
            orphan_pins_removed = orphans.into_keys().collect();
        }
    }
    if blocks_skipped.is_none() {
        let listing = repo.list(&pg::blocks_prefix(system_id)).await?;
        let sizes: BTreeMap<String, u64> = listing.iter().map(|o| (o.name.clone(), o.size)).collect();
        let unreferenced =
            retention::unreferenced_blocks(system_id, listing.iter().map(|o| o.name.as_str()), &survivors);
        if opts.dry_run {
            removed_blocks = unreferenced.len();
            removed_bytes += unreferenced.iter().map(|n| sizes.get(n).copied().unwrap_or(0)).sum::<u64>();
        } else {
            let (gone, bytes) = delete_all(repo, &unreferenced, &sizes, 256, deadline, &mut retained).await?;
            removed_blocks = gone.len();
            removed_bytes += bytes;
            let refused_blocks = retained.iter().filter(|r| sizes.contains_key(&r.object)).count();
            blocks_left = unreferenced.len() - gone.len() - refused_blocks;
            stopped_at_deadline |= blocks_left > 0;
        }
    }

    if stopped_at_deadline {
        tracing::warn!(
            blocks_left,
            "expire reached its deadline (half of [retention] lock_ttl) and stopped; the rest goes next run"
        );
    }
    if !opts.dry_run && !stale.is_empty() {
        delete_all(repo, &stale, &BTreeMap::new(), 64, None, &mut retained).await?;
    }

    let (retention_until, retain) = if repo.store().has_retention() {
        let mut until = retention::keep_until(&points, &opts.policy, now);
        // Rolling, for an `--until` pin too: a date years ahead locked in at once could not be
        // undone by `pitr unpin`; each run moves the lock on, up to the pin's date.
        let horizon = now.saturating_add(micros(opts.keep_forever_lock));
        let dates: BTreeMap<String, i64> = pins_now
            .iter()
            .map(|(id, pin)| (id.clone(), if let Pin::Until(d) = pin { (*d).min(horizon) } else { horizon }))
            .collect();
        for (id, date) in retention::pin_dates(&points, &dates) {
            let e = until.entry(id).or_insert(date);
            *e = (*e).max(date);
        }
        let records: BTreeMap<String, String> =
            pins_now.keys().filter_map(|id| Some((id.clone(), pg::pin(system_id, id, pins.of(id)?.seq)))).collect();
        retention_plan(system_id, &wal, &survivors, &until, &records, now)
    } else {
        (Vec::new(), BTreeMap::new())
    };

    let kept = points
        .iter()
        .filter(|p| !removed_ids.contains(p.id.as_str()))
        .map(|p| KeptBackup {
            id: p.id.clone(),
            kind: by_id[p.id.as_str()].kind,
            reasons: selection.kept.get(&p.id).map(|r| r.iter().copied().collect()).unwrap_or_default(),
            pinned: pins_now.get(&p.id).map(|pin| pin.describe()),
            note: pins.of(&p.id).and_then(|r| r.note.clone()),
        })
        .collect();
    let report = ExpireReport {
        dry_run: opts.dry_run,
        now: fmt(now),
        window_start: fmt(selection.window_start_us),
        window_base: selection.window_base.clone(),
        latest_timeline: latest,
        kept,
        removed_backups,
        removed_wal: retention::segment_ranges(layout, &removed_segments)
            .into_iter()
            .map(|(timeline, from, to, segments)| WalRange { timeline, from, to, segments })
            .collect(),
        removed_wal_objects,
        removed_blocks,
        removed_restore_points,
        removed_bytes,
        retained,
        wal_skipped: wal_plan.skipped,
        blocks_skipped,
        blocks_left,
        stopped_at_deadline,
        running_backups,
        running_restores,
        stale_removed: stale,
        orphan_pins_removed,
        untrusted,
        retention_until,
        retention_checked: 0,
        retention_extended: 0,
        retention_missing: 0,
        retention_failed: Vec::new(),
    };
    Ok((report, retain))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::Store;
    use crate::{KeyRing, LocalStore};

    #[tokio::test]
    async fn only_floors_that_open_and_agree_with_their_names_count() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let put = |name: String, text: String| {
            let repo = repo.clone();
            async move {
                repo.put_sealed(&name, text.into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
            }
        };
        // Timeline 1: a real floor at 12 and an older one at 5; planted above them: an empty
        // object, one sealed with another key, and one sealed with the key whose record names
        // another segment.
        put(pg::floor(7, 1, 12), retention::floor_record(1, 12, 0)).await;
        put(pg::floor(7, 1, 5), retention::floor_record(1, 5, 0)).await;
        let empty = pg::floor(7, 1, u64::MAX);
        LocalStore::new(dir.path()).put_if_absent(&empty, bytes::Bytes::new()).await.unwrap();
        let foreign = pg::floor(7, 1, 40);
        let other = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k2", [4; 32]));
        other
            .put_sealed(&foreign, retention::floor_record(1, 40, 0).into_bytes(), ObjectMeta::plain(ObjectKind::Meta))
            .await
            .unwrap();
        let liar = pg::floor(7, 1, 30);
        put(liar.clone(), retention::floor_record(1, 12, 0)).await;
        // Timeline 2: only a planted one; timeline 3: a real one alone.
        let lone = pg::floor(7, 2, 9);
        LocalStore::new(dir.path()).put_if_absent(&lone, bytes::Bytes::from_static(b"junk")).await.unwrap();
        put(pg::floor(7, 3, u64::MAX), retention::floor_record(3, u64::MAX, 0)).await;

        let (floors, untrusted) = read_floors(&repo, 7).await.unwrap();
        assert_eq!(floors, BTreeMap::from([(1, 12), (3, u64::MAX)]));
        let named: Vec<&str> = untrusted.iter().map(|u| u.object.as_str()).collect();
        assert_eq!(named, vec![empty.as_str(), foreign.as_str(), liar.as_str(), lone.as_str()]);
        assert!(untrusted[0].why.contains("does not open"), "{}", untrusted[0]);
        assert!(untrusted[1].why.contains("does not open"), "{}", untrusted[1]);
        assert_eq!(untrusted[2].why, "its record says segno=12, its name segno=30");
        // A lower floor is not read once a higher sound one decided.
        assert!(!named.contains(&pg::floor(7, 1, 5).as_str()));
    }

    fn cluster() -> ClusterInfo {
        ClusterInfo { system_id: 7, wal_segment_size: 16 << 20, wal_page_size: 8192, server_version_num: 150000 }
    }

    fn options(now_us: i64) -> ExpireOptions {
        ExpireOptions {
            policy: Policy::default(),
            now_us,
            dry_run: false,
            stale_backup_after: Duration::from_secs(60),
            lock_ttl: Duration::from_secs(600),
            keep_forever_lock: Duration::from_secs(86_400),
        }
    }

    /// Seals a marker generation's record under its name, as a run does.
    async fn put_generation(repo: &Repository, kind: &str, started_us: i64, renewed_us: i64, id: &str) -> String {
        let name = crate::names::run_marker(kind, started_us, renewed_us, id);
        let text = format!("host=h\npid=1\nkind={kind}\nstarted_us={started_us}\nrenewed_us={renewed_us}\nid={id}\n");
        repo.put_sealed(&name, text.into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        name
    }

    #[tokio::test]
    async fn a_planted_generation_does_not_keep_a_crashed_backup_running() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let now = crate::now_us();
        // A backup killed ten minutes ago, and a generation of it planted "renewed" in a year.
        let started = now - 20 * 60_000_000;
        let genuine = put_generation(&repo, "backup", started, now - 10 * 60_000_000, "crashed").await;
        let planted = crate::names::run_marker("backup", started, now + 366 * 86_400_000_000, "crashed");
        LocalStore::new(dir.path()).put_if_absent(&planted, bytes::Bytes::from_static(b"junk")).await.unwrap();

        let report = expire(&repo, &cluster(), &options(now)).await.unwrap();
        assert!(report.running_backups.is_empty(), "{:?}", report.running_backups);
        assert_eq!(report.blocks_skipped, None);
        assert_eq!(report.stale_removed, vec![genuine.clone()]);
        assert_eq!(report.untrusted.iter().map(|u| u.object.as_str()).collect::<Vec<_>>(), vec![planted.as_str()]);
        let left: Vec<String> = repo.list("running/").await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(left, vec![planted], "the crashed run's generation goes, the planted one stays for inspection");
    }

    #[tokio::test]
    async fn a_live_restore_with_an_unreadable_generation_is_obeyed_beside_a_planted_one() {
        use crate::running::tests::{Fault, Faulty};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Faulty::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [3; 32]));
        let now = crate::now_us();
        let live = put_generation(&repo, "restore", now, now, "reading").await;
        let junk = crate::names::run_marker("restore", now, now + 1, "reading");
        store.inner.put_if_absent(&junk, bytes::Bytes::from_static(b"junk")).await.unwrap();
        store.fail(&live, Fault::Unavailable);

        let report = expire(&repo, &cluster(), &options(now)).await.unwrap();
        assert_eq!(report.running_restores.len(), 1, "the restore was not obeyed: {report:?}");
        assert!(report.running_restores[0].contains("cannot be read"), "{:?}", report.running_restores);
        assert_eq!(report.untrusted.iter().map(|u| u.object.as_str()).collect::<Vec<_>>(), vec![junk.as_str()]);
        assert!(report.stale_removed.is_empty());
    }

    #[tokio::test]
    async fn a_floor_name_taken_by_another_object_is_cleared_and_the_floor_put() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let raw = LocalStore::new(dir.path());
        let other = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k2", [4; 32]));
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        // Empty, sealed with another key, sealed with the key but naming another segment.
        let empty = pg::floor(7, 1, u64::MAX);
        raw.put_if_absent(&empty, bytes::Bytes::new()).await.unwrap();
        let foreign = pg::floor(7, 2, 40);
        other.put_sealed(&foreign, retention::floor_record(2, 40, 0).into_bytes(), meta.clone()).await.unwrap();
        let liar = pg::floor(7, 3, 30);
        repo.put_sealed(&liar, retention::floor_record(3, 12, 0).into_bytes(), meta.clone()).await.unwrap();
        assert_eq!(read_floors(&repo, 7).await.unwrap().1.len(), 3);
        let mut replaced = Vec::new();
        for (t, segno) in [(1, u64::MAX), (2, 40), (3, 30)] {
            assert!(put_floor(&repo, 7, t, segno, 5, &mut replaced).await.unwrap(), "timeline {t}");
        }
        let named: Vec<&str> = replaced.iter().map(|u| u.object.as_str()).collect();
        assert_eq!(named, vec![empty.as_str(), foreign.as_str(), liar.as_str()]);
        assert!(replaced.iter().all(|u| u.why.contains("wrote the floor in its place")), "{replaced:?}");
        let (floors, untrusted) = read_floors(&repo, 7).await.unwrap();
        assert_eq!(floors, BTreeMap::from([(1, u64::MAX), (2, 40), (3, 30)]));
        assert!(untrusted.is_empty(), "{untrusted:?}");
        // A sound floor of this repository written at another time is left as it is.
        let before = raw.get(&liar).await.unwrap();
        assert!(put_floor(&repo, 7, 3, 30, 99, &mut replaced).await.unwrap());
        assert_eq!(raw.get(&liar).await.unwrap(), before);
        assert_eq!(replaced.len(), 3);
    }

    /// Catalog snapshots are pruned to the oldest segment kept on any timeline; with no WAL
    /// kept, to nothing.
    #[test]
    fn catalog_snapshots_are_pruned_to_the_oldest_segment_kept() {
        let layout = WalLayout::new(&cluster());
        let names: Vec<String> = [(1, 10u64), (1, 11), (1, 12), (2, 11), (2, 12)]
            .into_iter()
            .map(|(t, s)| layout.object_name(&WalObject::Segment { timeline: t, segno: s }))
            .collect();
        let wal = WalCatalog::from_names(layout, names.iter().map(String::as_str));
        let size = layout.segment_size;
        assert_eq!(catalog_floor_lsn(&wal, &[]), Some(10 * size));
        assert_eq!(catalog_floor_lsn(&wal, &[(1, 10)]), Some(11 * size));
        // Timeline 2 still holds 11 after timeline 1's went.
        assert_eq!(catalog_floor_lsn(&wal, &[(1, 10), (1, 11)]), Some(11 * size));
        assert_eq!(catalog_floor_lsn(&wal, &[(1, 10), (1, 11), (2, 11)]), Some(12 * size));
        let empty = WalCatalog::from_names(layout, std::iter::empty());
        assert_eq!(catalog_floor_lsn(&empty, &[]), None);
    }

    /// 2026-01-05, the first day of [`three_daily_backups`].
    const DAY0: i64 = 1_767_571_200_000_000;

    /// Backups A, B, C on days 0, 1, 2 from [`DAY0`], each within its own segment 10, 11, 12
    /// (stopping `stop_offset` bytes into it); WAL segments 10..=13.
    async fn three_daily_backups(repo: &Repository, raw: &LocalStore, stop_offset: u64) {
        let layout = WalLayout::new(&cluster());
        for (i, id) in ["A", "B", "C"].into_iter().enumerate() {
            let seg = 10 + i as u64;
            let start = DAY0 + i as i64 * DAY_US;
            let m: BackupManifest = serde_json::from_value(serde_json::json!({
                "id": id, "kind": "full", "system_id": 7, "server_version_num": 150000, "timeline": 1,
                "start_lsn": seg << 24, "stop_lsn": (seg << 24) + stop_offset,
                "start_time_us": start, "stop_time_us": start + 60_000_000,
                "block_size": 8192, "tablespaces": [], "entries": [], "files": [], "server_manifest": "{}",
                "logical_bytes": 0, "stored_bytes": 0
            }))
            .unwrap();
            m.store(repo).await.unwrap();
        }
        for segno in 10..=13 {
            let name = layout.object_name(&WalObject::Segment { timeline: 1, segno });
            raw.put_if_absent(&name, bytes::Bytes::from_static(b"wal")).await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pinned_backup_stays_with_its_wal_until_unpinned_and_its_records_go_with_it() {
        use crate::pins::{self, Change, Pin};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let raw = LocalStore::new(dir.path());
        const DAY: i64 = DAY_US;
        let day0 = DAY0;
        let layout = WalLayout::new(&cluster());
        three_daily_backups(&repo, &raw, 100).await;
        let now = day0 + 3 * DAY;
        let forever = Change::Pin { pin: Pin::Forever, note: Some("before the upgrade".into()) };
        pins::change(&repo, 7, "A", forever, now).await.unwrap();
        let opts = ExpireOptions {
            policy: Policy { daily: 1, weekly: 0, monthly: 0, yearly: 0, window_us: 0 },
            ..options(now)
        };

        let dry = expire(&repo, &cluster(), &ExpireOptions { dry_run: true, ..opts.clone() }).await.unwrap();
        let a = dry.kept.iter().find(|k| k.id == "A").expect("A kept");
        assert_eq!(a.reasons, vec![Reason::Pinned]);
        assert_eq!((a.pinned.as_deref(), a.note.as_deref()), (Some("forever"), Some("before the upgrade")));

        let report = expire(&repo, &cluster(), &opts).await.unwrap();
        assert_eq!(report.removed_backups.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), vec!["B"]);
        let wal_left: Vec<u64> = repo
            .list(&layout.prefix())
            .await
            .unwrap()
            .iter()
            .filter_map(|o| match layout.parse_object_name(&o.name) {
                Some(WalObject::Segment { segno, .. }) => Some(segno),
                _ => None,
            })
            .collect();
        assert_eq!(wal_left, vec![10, 12, 13], "A's segment stays, B's goes");

        // Unpinned: an ordinary backup again, and its records go with it.
        pins::change(&repo, 7, "A", Change::Unpin, now).await.unwrap();
        let report = expire(&repo, &cluster(), &opts).await.unwrap();
        assert_eq!(report.removed_backups.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), vec!["A"]);
        assert!(repo.list(&pg::pins_prefix(7)).await.unwrap().is_empty());
        assert!(pins::PinSet::load(&repo, 7).await.unwrap().current.is_empty());
    }

    const DAY_US: i64 = 86_400_000_000;

    #[tokio::test(flavor = "multi_thread")]
    async fn pin_records_of_backups_that_never_got_a_manifest_go_once_old_and_no_backup_runs() {
        use crate::pins::{self, Change, Pin};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let now = 1_767_571_200_000_000;
        let forever = || Change::Pin { pin: Pin::Forever, note: None };
        // X: recorded two minutes ago by a backup that failed before its manifest; Y: a second
        // ago, by a backup that may be about to store its manifest; A: a backup with its record.
        pins::record_for_new_backup(&repo, 7, "X", forever(), now - 120_000_000).await.unwrap();
        pins::record_for_new_backup(&repo, 7, "Y", forever(), now - 1_000_000).await.unwrap();
        pins::record_for_new_backup(&repo, 7, "A", forever(), now - 120_000_000).await.unwrap();
        let m: BackupManifest = serde_json::from_value(serde_json::json!({
            "id": "A", "kind": "full", "system_id": 7, "server_version_num": 150000, "timeline": 1,
            "start_lsn": 10u64 << 24, "stop_lsn": (10u64 << 24) + 100,
            "start_time_us": now - DAY_US, "stop_time_us": now - DAY_US + 60_000_000,
            "block_size": 8192, "tablespaces": [], "entries": [], "files": [], "server_manifest": "{}",
            "logical_bytes": 0, "stored_bytes": 0
        }))
        .unwrap();
        m.store(&repo).await.unwrap();
        let records =
            || async { repo.list(&pg::pins_prefix(7)).await.unwrap().into_iter().map(|o| o.name).collect::<Vec<_>>() };
        let all = vec![pg::pin(7, "A", 0), pg::pin(7, "X", 0), pg::pin(7, "Y", 0)];

        // A backup is running: it may be about to store X's manifest.
        let marker = put_generation(&repo, "backup", now - 5_000_000, now - 1_000_000, "r1").await;
        let report = expire(&repo, &cluster(), &options(now)).await.unwrap();
        assert!(report.orphan_pins_removed.is_empty(), "{report:?}");
        assert_eq!(records().await, all);
        repo.delete(&marker).await.unwrap();

        let dry = expire(&repo, &cluster(), &ExpireOptions { dry_run: true, ..options(now) }).await.unwrap();
        assert_eq!(dry.orphan_pins_removed, vec!["X".to_string()]);
        assert_eq!(records().await, all);
        let report = expire(&repo, &cluster(), &options(now)).await.unwrap();
        assert_eq!(report.orphan_pins_removed, vec!["X".to_string()]);
        assert_eq!(records().await, vec![pg::pin(7, "A", 0), pg::pin(7, "Y", 0)]);
        assert!(report.kept.iter().any(|k| k.id == "A" && k.pinned.as_deref() == Some("forever")), "{report:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn restore_point_entries_go_once_their_wal_is_below_the_floor_and_in_no_kept_backup() {
        use crate::pins::{self, Change, Pin};
        use crate::restore_points::{self, RestorePoint};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let raw = LocalStore::new(dir.path());
        three_daily_backups(&repo, &raw, 0x100).await;
        let now = DAY0 + 3 * DAY_US;
        pins::change(&repo, 7, "A", Change::Pin { pin: Pin::Forever, note: None }, now).await.unwrap();
        let point = |name: &str, lsn: u64| RestorePoint {
            name: name.into(),
            timeline: 1,
            lsn,
            end_lsn: lsn + 104,
            time_us: DAY0,
        };
        // Inside pinned A's start..stop (its WAL stays); after A (segment 10, below the floor C
        // sets); in B's segment (B goes); after C (above the floor).
        let in_a = point("in-a", (10 << 24) + 0x80);
        let after_a = point("after-a", (10 << 24) + 0x10000);
        let in_b = point("in-b", (11 << 24) + 0x80);
        let after_c = point("after-c", (12 << 24) + 0x10000);
        for p in [&in_a, &after_a, &in_b, &after_c] {
            restore_points::record(&repo, 7, p).await.unwrap();
        }
        let entries = || async {
            repo.list(&pg::restore_points_prefix(7)).await.unwrap().into_iter().map(|o| o.name).collect::<Vec<_>>()
        };
        let opts = ExpireOptions {
            policy: Policy { daily: 1, weekly: 0, monthly: 0, yearly: 0, window_us: 0 },
            ..options(now)
        };

        let dry = expire(&repo, &cluster(), &ExpireOptions { dry_run: true, ..opts.clone() }).await.unwrap();
        assert_eq!(dry.removed_restore_points, 2, "{dry:?}");
        assert_eq!(entries().await.len(), 4, "a dry run deletes nothing");
        let report = expire(&repo, &cluster(), &opts).await.unwrap();
        assert_eq!(report.removed_backups.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), vec!["B"]);
        assert_eq!(report.removed_restore_points, 2, "{report:?}");
        assert_eq!(entries().await, vec![in_a.object_name(7), after_c.object_name(7)]);
        // Nothing more goes on the next run.
        assert_eq!(expire(&repo, &cluster(), &opts).await.unwrap().removed_restore_points, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn change_index_objects_and_catalog_snapshots_go_with_their_wal() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let raw = LocalStore::new(dir.path());
        three_daily_backups(&repo, &raw, 0x100).await;
        let layout = WalLayout::new(&cluster());
        for segno in 10..=13 {
            let name = crate::change_index::object_for_segment(&layout, 1, segno);
            raw.put_if_absent(&name, bytes::Bytes::from_static(b"idx")).await.unwrap();
            let snapshot = catalog::CatalogSnapshot::new(1, layout.segment_start(segno) + 0x10, 1, Vec::new());
            assert!(catalog::record(&repo, 7, &snapshot, None).await.unwrap());
        }
        let snapshots =
            || async { catalog::load(&repo, 7).await.snapshots.iter().map(|s| s.lsn).collect::<Vec<u64>>() };
        let all = snapshots().await;
        let segnos = |prefix: String, index: bool| {
            let repo = &repo;
            async move {
                let mut out: Vec<u64> = repo
                    .list(&prefix)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter_map(|o| {
                        let file = if index {
                            pg::parse_change_index(7, &o.name)?.to_string()
                        } else {
                            o.name.rsplit('/').next()?.strip_suffix(".seg")?.to_string()
                        };
                        layout.parse_segment_file_name(&file).map(|(_, s)| s)
                    })
                    .collect();
                out.sort_unstable();
                out
            }
        };
        let opts = ExpireOptions {
            policy: Policy { daily: 1, weekly: 0, monthly: 0, yearly: 0, window_us: 0 },
            ..options(DAY0 + 3 * DAY_US)
        };
        expire(&repo, &cluster(), &ExpireOptions { dry_run: true, ..opts.clone() }).await.unwrap();
        assert_eq!(segnos(pg::change_index_prefix(7), true).await, vec![10, 11, 12, 13], "a dry run deletes nothing");
        assert_eq!(snapshots().await, all, "a dry run deletes no snapshot");
        expire(&repo, &cluster(), &opts).await.unwrap();
        let wal = segnos(layout.prefix(), false).await;
        assert!(wal.len() < 4, "the test expects WAL to go: {wal:?}");
        assert_eq!(segnos(pg::change_index_prefix(7), true).await, wal);
        // The snapshot naming the oldest WAL kept (taken in the segment before it) stays, with
        // all after it; the older ones go.
        let kept: Vec<u64> = (wal[0] - 1..=13).map(|segno| layout.segment_start(segno) + 0x10).collect();
        assert_eq!(snapshots().await, kept);
    }
}
