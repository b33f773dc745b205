//! Running backups, restores and drills, and `pitr expire`, kept from deleting under each other.
//!
//! ```text
//! running/<kind>.<started µs>.<renewed µs>.<id>        a run in progress: kind backup, restore or drill
//!                                                     (sealed: host, pid, kind; a reader's plan)
//! running/expire.<started µs>.<expires µs>.<random>    the expire lock (sealed: host, pid, kind,
//!                                                     started_us, expires_us)
//! ```
//! A marker's record also repeats its name's kind, start, renewal and id.
//! Times are µs since the Unix epoch as 16 hex digits (so names sort by time); `<id>` is random.
//!
//! # Announce, then look
//! A backup writes blocks, and reuses blocks it finds with `head()`, before its manifest makes
//! them referenced; a restore reads a backup's blocks and replays WAL for as long as recovery
//! runs. A sweep in between could delete what they count on. So each side announces itself
//! before it looks at the other, Dekker-style:
//! - a run puts its marker, then lists the locks; while a live expire lock exists it waits (until
//!   the lock is released or expires), so a backup never reuses or writes a block during a sweep,
//!   and a restore reads the catalog only after the expire is done;
//! - expire puts its lock, then lists the markers, and keeps what the live ones need (below).
//!
//! Storage is strongly consistent (S3, the local store), and each side's put is durable before it
//! lists, so at least one of the two sees the other.
//!
//! # Renewal, on create-only storage
//! Liveness comes from the names: a lock is live until the expiry it names; a marker while its
//! renewal time is less than `[retention] stale_backup_after` ago (by the clock of the host
//! running expire). A run killed with `kill -9` stops renewing, and its marker goes stale that
//! long after its last renewal; expire then deletes it.
//!
//! # Names are not trusted alone
//! Anyone who can write to the bucket can put an object under any name, but only a key holder can
//! seal one, and the seal binds the name. So before a live-looking lock makes anyone wait, or a
//! live-looking marker holds expire off, it is read ([`check`], [`open_run`]): it is obeyed only if
//! it opens (from the primary repository alone: no secondary holds `running/`) and its record
//! repeats its name's fields ([`record_disagrees`]). Otherwise a lock expiring in a year would
//! stop every backup, and a marker "renewed" in the future would stop the block sweep for as
//! long. Not obeying a lock that does not open is safe: it is not an expire's, so no sweep runs
//! under it. One that opens is obeyed whatever times it names: a genuine run or expire on a host
//! whose clock is far ahead must not be ignored, since that direction deletes what it uses
//! (`pitr verify` warns of times more than [`MAX_CLOCK_SKEW`] ahead or a lock longer than
//! [`MAX_LOCK_TTL`], see [`implausible`]). A storage error while reading says nothing about the
//! writer: the object is then obeyed by its name, as before; so is one a read finds missing while
//! a listing still shows it.
//!
//! A generation that does not open is no part of its run: the run's liveness comes from its own
//! generations (those that open or could not be read), so one planted under a crashed run's kind,
//! start and id keeps nothing alive, and one planted beside a generation that could not be read
//! does not hide a live run.
//!
//! The store has no overwrite (only put-if-absent and delete), so a marker is renewed by putting a
//! new *generation* — the same kind, start and id with a later renewal time — every
//! [`RENEW_EVERY`], and only once that put is durable deleting the generation *before* the
//! previous one: a run holds its two newest generations. Hence:
//! - at every instant at least one generation exists (none is deleted before its successor's
//!   successor is durable), and a crash anywhere leaves at most three, which go stale as above;
//! - a listing that overlaps a renewal still sees a generation that existed throughout it (the
//!   previous one, deleted only at the next renewal): this holds even where a listing is no
//!   snapshot (a directory read may miss entries created or removed while it runs), as long as
//!   one listing takes less than [`RENEW_EVERY`];
//! - renewing every 15 s against a `stale_backup_after` of at least 1 minute (the config's lower
//!   bound) leaves 45 s for a slow put and for clock skew between hosts.
//!
//! Expire treats the generations of one run (same kind, start and id) as one marker, live by the
//! newest of its own (above). A marker of an older pitr, `running/backup.<started µs>.<random>`,
//! counts as renewed at its start.
//!
//! # What a live marker keeps
//! - A backup: expire skips the block sweep, and the window's cut moves back to the backup's start
//!   (an incremental may be taken against any backup that was newest while it ran).
//! - A restore or drill (a *reader*): once it has chosen its backup, it renews at once with its
//!   [`ReadPlan`] in the record: the backup chain it reads and the timeline and LSN its WAL replay
//!   starts from. Expire keeps those backups (reason `restore`), hence their blocks, and the WAL
//!   from that segment on, on that timeline and every timeline descending from it. Before it has
//!   a plan (its first generation is put before it reads the catalog), or when its record cannot
//!   be read, expire removes no backup and no WAL at all.
//!
//! Expire stops sweeping at half its lock's lifetime, counted from before its lock's put (so a
//! slow put does not move the deadline), which tolerates that much clock skew for the runs
//! waiting on the lock. Backups and pins wait for the whole lifetime; restores and drills until
//! the sweep deadline plus a minute.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::names::{self, RunningName};
use crate::now_us;
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::PutOutcome;
use crate::time::format_rfc3339_seconds;

/// How often a run's marker is renewed (a new generation put, the one before the previous
/// deleted). Well below the 1-minute lower bound of `[retention] stale_backup_after`.
pub const RENEW_EVERY: Duration = Duration::from_secs(15);

/// After a failed renewal, the next try comes this much sooner than [`RENEW_EVERY`].
const RETRY_RENEWAL: Duration = Duration::from_secs(3);

/// The least `[retention] stale_backup_after` may be (the config refuses less). A run that does
/// not know the configured value checks its marker against this ([`RunMarker::check_fresh`]):
/// never laxer than the configured value, at worst stricter.
pub const MIN_STALE_BACKUP_AFTER: Duration = Duration::from_secs(60);

/// How much sooner than `[retention] stale_backup_after` a backup counts its marker as possibly
/// stale ([`RunMarker::check_fresh`]): room for the clock skew between hosts and for the put of
/// the manifest that follows the check.
pub const FRESH_MARGIN: Duration = Duration::from_secs(15);

/// A backup whose marker went unrenewed long enough that an expire may have taken it for a
/// crashed run's and swept blocks the backup reuses ([`RunMarker::check_fresh`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the running marker could not be renewed for {} s (an expire takes a marker not renewed for {} s for a \
     crashed run's); an expire may have removed blocks this backup reuses; nothing was stored, run it again",
    unrenewed.as_secs(),
    stale_after.as_secs()
)]
pub struct MarkerStale {
    /// The longest span without a durable renewal during the run.
    pub unrenewed: Duration,
    /// `[retention] stale_backup_after` it was checked against.
    pub stale_after: Duration,
}

/// What a marker announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RunKind {
    /// A base backup: it writes and reuses blocks before its manifest references them, so expire
    /// skips the block sweep and moves the window's cut back to its start.
    Backup,
    /// A restore: expire keeps the backups and WAL its plan reads.
    Restore,
    /// A restore drill: kept from expire like a restore.
    Drill,
}

impl RunKind {
    /// The kind as it appears in marker names and records: `backup`, `restore` or `drill`.
    pub fn word(self) -> &'static str {
        match self {
            RunKind::Backup => "backup",
            RunKind::Restore => "restore",
            RunKind::Drill => "drill",
        }
    }

    fn from_word(word: &str) -> Option<RunKind> {
        match word {
            "backup" => Some(RunKind::Backup),
            "restore" => Some(RunKind::Restore),
            "drill" => Some(RunKind::Drill),
            _ => None,
        }
    }

    /// Restores and drills read backups and WAL (and write nothing but their marker).
    pub fn reads(self) -> bool {
        self != RunKind::Backup
    }
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

/// What an object under `running/` announces, read from its name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activity {
    /// One generation of a run's marker.
    Run {
        /// Backup, restore or drill.
        kind: RunKind,
        /// When the run began, µs since the Unix epoch (the same in every generation).
        started_us: i64,
        /// When this generation was put, µs since the Unix epoch: liveness is judged by the
        /// newest generation's renewal time.
        renewed_us: i64,
        /// The run's random id, which tells apart runs started in the same microsecond.
        id: String,
    },
    /// An expire lock.
    Expire {
        /// When the expire took the lock, µs since the Unix epoch.
        started_us: i64,
        /// When the lock stops being live, µs since the Unix epoch; expire deletes only until
        /// halfway between the two.
        expires_us: i64,
    },
}

/// One object under `running/` and what its name announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningObject {
    /// The object name.
    pub name: String,
    /// What the name says.
    pub activity: Activity,
}

/// The name of one generation of a run's marker ([`names::run_marker`]).
pub fn marker_name(kind: RunKind, started_us: i64, renewed_us: i64, id: &str) -> String {
    names::run_marker(kind.word(), started_us, renewed_us, id)
}

/// What a marker's or lock's name announces ([`names::parse_running`]); `None` for other names
/// and for a run of a kind this pitr does not know.
pub fn parse_name(name: &str) -> Option<Activity> {
    match names::parse_running(name)? {
        RunningName::Expire { started_us, expires_us } => Some(Activity::Expire { started_us, expires_us }),
        RunningName::Run { kind, started_us, renewed_us, id } => {
            Some(Activity::Run { kind: RunKind::from_word(kind)?, started_us, renewed_us, id: id.to_string() })
        }
    }
}

/// Every marker generation and lock in the repository.
pub async fn list(repo: &Repository) -> Result<Vec<RunningObject>, RepositoryError> {
    Ok(repo
        .list(names::RUNNING)
        .await?
        .into_iter()
        .filter_map(|o| parse_name(&o.name).map(|activity| RunningObject { name: o.name, activity }))
        .collect())
}

/// One announced run: the generations of its marker found by one listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Backup, restore or drill.
    pub kind: RunKind,
    /// When the run began, µs since the Unix epoch (a backup's moves the window's cut back).
    pub started_us: i64,
    /// The newest generation's renewal time.
    pub renewed_us: i64,
    /// The run's random id.
    pub id: String,
    /// Generation names, oldest first.
    pub generations: Vec<String>,
    /// Each generation's renewal time, in the order of `generations`.
    pub renewals: Vec<i64>,
}

impl Run {
    /// Live while renewed less than `stale_after` before `now_us`.
    pub fn is_live(&self, now_us: i64, stale_after: Duration) -> bool {
        let stale_us = i64::try_from(stale_after.as_micros()).unwrap_or(i64::MAX);
        now_us.saturating_sub(self.renewed_us) < stale_us
    }

    /// The newest generation's name.
    pub fn newest(&self) -> &str {
        self.generations.last().map(String::as_str).unwrap_or("")
    }
}

/// The runs among `objects`, their generations grouped, oldest start first.
pub fn runs(objects: &[RunningObject]) -> Vec<Run> {
    let mut by_run: BTreeMap<(i64, RunKind, String), Vec<(i64, String)>> = BTreeMap::new();
    for o in objects {
        if let Activity::Run { kind, started_us, renewed_us, id } = &o.activity {
            by_run.entry((*started_us, *kind, id.clone())).or_default().push((*renewed_us, o.name.clone()));
        }
    }
    by_run
        .into_iter()
        .map(|((started_us, kind, id), mut generations)| {
            generations.sort();
            let renewed_us = generations.last().map(|g| g.0).unwrap_or(started_us);
            let renewals = generations.iter().map(|g| g.0).collect();
            Run {
                kind,
                started_us,
                renewed_us,
                id,
                generations: generations.into_iter().map(|g| g.1).collect(),
                renewals,
            }
        })
        .collect()
}

/// Who wrote `name` (`host …, pid …`), for messages; best effort.
pub async fn describe(repo: &Repository, name: &str) -> String {
    match repo.get_record_here(name).await {
        Ok((_, text)) => String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.starts_with("host=") || l.starts_with("pid="))
            .collect::<Vec<_>>()
            .join(", "),
        Err(_) => "holder unknown".into(),
    }
}

/// What a restore or drill reads, recorded in its marker once it has chosen its backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    /// The backup chain, oldest (the full backup) first.
    pub backups: Vec<String>,
    /// The timeline of the backup its replay starts from.
    pub timeline: u32,
    /// Where WAL replay starts (the newest backup's start LSN).
    pub wal_from_lsn: u64,
}

/// What a reader's marker says it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderNeeds {
    /// It has chosen its backup: keep the plan's backups and its WAL from `wal_from_lsn` on.
    Planned(ReadPlan),
    /// It has not chosen its backup yet: anything may be needed.
    Unplanned,
    /// No generation could be read (the error): anything may be needed.
    Unreadable(String),
}

fn record_text(kind: RunKind, started_us: i64, renewed_us: i64, id: &str, plan: Option<&ReadPlan>) -> String {
    let mut text = format!(
        "host={}\npid={}\nkind={}\nstarted_us={started_us}\nrenewed_us={renewed_us}\nid={id}\n",
        crate::hostname(),
        std::process::id(),
        kind.word()
    );
    if let Some(p) = plan {
        text.push_str(&format!(
            "backups={}\ntimeline={}\nwal_from={:016X}\n",
            p.backups.join(","),
            p.timeline,
            p.wal_from_lsn
        ));
    }
    text
}

/// The plan in a marker's record: `Ok(None)` for a record without one, `Err` for a malformed one.
pub fn parse_plan(text: &str) -> Result<Option<ReadPlan>, String> {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')));
    let Some(backups) = field("backups") else { return Ok(None) };
    let backups: Vec<String> = backups.split(',').filter(|b| !b.is_empty()).map(str::to_string).collect();
    if backups.is_empty() {
        return Err("backups= names no backup".into());
    }
    let timeline = field("timeline")
        .and_then(|t| t.parse::<u32>().ok())
        .ok_or_else(|| "no valid timeline= beside backups=".to_string())?;
    let wal_from_lsn = field("wal_from")
        .and_then(|l| u64::from_str_radix(l, 16).ok())
        .ok_or_else(|| "no valid wal_from= beside backups=".to_string())?;
    Ok(Some(ReadPlan { backups, timeline, wal_from_lsn }))
}

/// What the reader `run` needs, from its newest sound generation ([`open_run`] now).
pub async fn reader_needs(repo: &Repository, run: &Run) -> ReaderNeeds {
    needs_of(&open_run(repo, run, now_us()).await.trust)
}

/// What a reader needs, from what [`open_run`] found: a run whose record could not be read (gone,
/// a storage error, or untrusted) may need anything. An untrusted run is not obeyed at all by
/// expire, which does not ask this.
pub fn needs_of(found: &Trust) -> ReaderNeeds {
    match found {
        Trust::Sound { name, text } => match parse_plan(text) {
            Ok(Some(plan)) => ReaderNeeds::Planned(plan),
            Ok(None) => ReaderNeeds::Unplanned,
            Err(e) => ReaderNeeds::Unreadable(format!("{name}: {e}")),
        },
        Trust::Gone => ReaderNeeds::Unreadable("every generation is gone since the listing".into()),
        Trust::Unknown(e) => ReaderNeeds::Unreadable(e.clone()),
        Trust::Untrusted(u) => ReaderNeeds::Unreadable(u.to_string()),
    }
}

/// How far ahead of this host's clock the times in a marker's or lock's name may be before
/// `pitr verify` warns of them: clock skew between the hosts of a fleet, with a wide margin. A
/// time further ahead says the writer's clock is badly wrong; such an object, if it opens, is
/// still obeyed (ignoring a genuine run would delete what it uses), and holds expire (or
/// backups) off for as long as it is ahead.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(600);

/// The longest expire lock pitr takes (`[retention] lock_ttl` is bounded by it): `pitr verify`
/// warns of a lock naming a longer lifetime (one of an older pitr, or planted).
pub const MAX_LOCK_TTL: Duration = Duration::from_secs(86_400);

/// A whole number of hours, minutes or seconds, for messages.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s >= 3600 && s.is_multiple_of(3600) => format!("{} h", s / 3600),
        _ if s >= 60 && s.is_multiple_of(60) => format!("{} min", s / 60),
        _ => format!("{s} s"),
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Why the times a name announces are implausible at `now_us` (see [`MAX_CLOCK_SKEW`] and
/// [`MAX_LOCK_TTL`]); `None` when they are plausible. Said of an object that does not open (with
/// why it is not obeyed) and, by `pitr verify`, as a warning of one that does.
pub fn implausible(activity: &Activity, now_us: i64) -> Option<String> {
    let ahead = |us: i64| us.saturating_sub(now_us) > micros(MAX_CLOCK_SKEW);
    let skew = span(MAX_CLOCK_SKEW);
    match *activity {
        Activity::Run { started_us, renewed_us, .. } => {
            if renewed_us < started_us {
                Some("its name says it was renewed before it started".into())
            } else if ahead(renewed_us) {
                Some(format!(
                    "its name says it was renewed at {}, more than {skew} ahead of this host's clock",
                    format_rfc3339_seconds(renewed_us)
                ))
            } else {
                None
            }
        }
        Activity::Expire { started_us, expires_us } => {
            if expires_us <= started_us {
                Some("its name says it expires before it was taken".into())
            } else if expires_us.saturating_sub(started_us) > micros(MAX_LOCK_TTL) {
                Some(format!(
                    "its name says it lasts until {}, longer than the {} an expire lock may last",
                    format_rfc3339_seconds(expires_us),
                    span(MAX_LOCK_TTL)
                ))
            } else if ahead(started_us) {
                Some(format!(
                    "its name says it was taken at {}, more than {skew} ahead of this host's clock",
                    format_rfc3339_seconds(started_us)
                ))
            } else {
                None
            }
        }
    }
}

/// Where a sealed record disagrees with the name it is stored under; `None` when it agrees.
/// Fields a record of an older pitr lacks (before the name's times were written into it) are not
/// compared: the name is bound into the seal, so an object that opens was put under that name
/// by a holder of the key.
pub fn record_disagrees(activity: &Activity, text: &str) -> Option<String> {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')));
    let mut want: Vec<(&str, String)> = Vec::new();
    match activity {
        Activity::Run { kind, started_us, renewed_us, id } => {
            want.push(("kind", kind.word().to_string()));
            want.push(("started_us", started_us.to_string()));
            want.push(("renewed_us", renewed_us.to_string()));
            want.push(("id", id.clone()));
        }
        Activity::Expire { started_us, expires_us } => {
            want.push(("kind", "expire".to_string()));
            want.push(("started_us", started_us.to_string()));
            want.push(("expires_us", expires_us.to_string()));
        }
    }
    want.into_iter().find_map(|(key, value)| match field(key) {
        Some(found) if found != value => Some(format!("its record says {key}={found}, its name {key}={value}")),
        _ => None,
    })
}

/// What reading a marker or lock found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// It opened (authenticated under its name) and its record agrees with its name: it is
    /// obeyed, whatever times it names. `text` is its record.
    Sound {
        /// The object read (for a run, the newest generation that could be).
        name: String,
        /// Its record.
        text: String,
    },
    /// Deleted between listing and reading (a renewal or a release): a run or expire that has
    /// just ended. Only when a listing after the read no longer shows it either.
    Gone,
    /// It could not be read (a storage error, or a read that found nothing while a listing still
    /// shows it): obeyed by its name, as before records were read, since a failing read says
    /// nothing about who wrote it.
    Unknown(String),
    /// Not obeyed: it does not open with the repository's keys (planted, damaged, or sealed with
    /// a key this pitr lacks), or its record disagrees with its name.
    Untrusted(Untrusted),
}

/// A marker, lock or retention floor that is not obeyed, with why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Untrusted {
    /// The object name.
    pub object: String,
    /// Why it is not obeyed.
    pub why: String,
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.why)
    }
}

impl Trust {
    /// Whether the object is to be obeyed: sound, or unreadable for a reason that says nothing
    /// about forgery.
    pub fn obeyed(&self) -> bool {
        matches!(self, Trust::Sound { .. } | Trust::Unknown(_))
    }
}

/// Reads `object` (from this repository alone: no secondary holds `running/`) and judges it
/// (see [`Trust`]). An object that opens under its name and agrees with it is obeyed whatever
/// times it names: a genuine writer whose clock runs far ahead must not be ignored, since that
/// direction deletes what it uses (`pitr verify` warns of such times, see [`implausible`]).
/// `now_us` only words the reason an untrusted object gives.
pub async fn check(repo: &Repository, object: &RunningObject, now_us: i64) -> Trust {
    let name = &object.name;
    let untrusted = |why: String| Trust::Untrusted(Untrusted { object: name.clone(), why });
    match repo.get_record_here(name).await {
        Ok((_, text)) => {
            let text = String::from_utf8_lossy(&text).into_owned();
            match record_disagrees(&object.activity, &text) {
                Some(why) => untrusted(why),
                None => Trust::Sound { name: name.clone(), text },
            }
        }
        Err(RepositoryError::Store(e)) if e.is_not_found() => still_listed(repo, name).await,
        Err(e) if e.is_bad_object() => {
            let mut why = format!("does not open with this repository's keys ({e})");
            if let Some(times) = implausible(&object.activity, now_us) {
                why.push_str("; ");
                why.push_str(&times);
            }
            untrusted(why)
        }
        Err(e) => Trust::Unknown(format!("{name}: {e}")),
    }
}

/// After a read found `name` missing: [`Trust::Gone`] unless a listing still shows it, which
/// makes the miss a storage fault ([`Trust::Unknown`], obeyed), not a deletion.
async fn still_listed(repo: &Repository, name: &str) -> Trust {
    match repo.list(name).await {
        Ok(listed) if listed.iter().any(|o| o.name == name) => {
            Trust::Unknown(format!("{name}: listed, but reading it found nothing"))
        }
        Ok(_) => Trust::Gone,
        Err(e) => Trust::Unknown(format!("{name}: not found, and listing it again failed: {e}")),
    }
}

/// What reading a run's generations found ([`open_run`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedRun {
    /// The run made of its own generations only (the untrusted ones left out), its renewal time
    /// that of the newest generation that opened or could not be read (where every one is gone,
    /// the newest name's): its liveness goes by that alone.
    pub run: Run,
    /// The run's verdict: its newest sound generation; else a storage error reading one
    /// ([`Trust::Unknown`], obeyed); else, if any generation does not open or disagrees with its
    /// name, [`Trust::Untrusted`] (the run has no generation of its own); else [`Trust::Gone`].
    pub trust: Trust,
    /// Generations that are not obeyed, newest first.
    pub untrusted: Vec<Untrusted>,
}

impl OpenedRun {
    /// Whether no generation but untrusted ones claims the run: it is not obeyed.
    pub fn planted_only(&self) -> bool {
        matches!(self.trust, Trust::Untrusted(_))
    }
}

/// Reads the run's generations, newest first, until one is sound (an older one is read when a
/// renewal deleted the newer between listing and reading), and judges the run ([`OpenedRun`]).
/// A generation that does not open is no part of the run, so a planted one, whatever it
/// names, neither keeps a crashed run alive nor hides one whose generation could not be read.
pub async fn open_run(repo: &Repository, run: &Run, now_us: i64) -> OpenedRun {
    let mut trust = Trust::Gone;
    let mut untrusted = Vec::new();
    // The renewal time of the newest generation that opened or could not be read.
    let mut renewed_us = None;
    for (renewed, name) in run.renewals.iter().zip(&run.generations).rev() {
        let object = RunningObject {
            name: name.clone(),
            activity: Activity::Run {
                kind: run.kind,
                started_us: run.started_us,
                renewed_us: *renewed,
                id: run.id.clone(),
            },
        };
        match check(repo, &object, now_us).await {
            sound @ Trust::Sound { .. } => {
                renewed_us.get_or_insert(*renewed);
                trust = sound;
                break;
            }
            Trust::Gone => {}
            unknown @ Trust::Unknown(_) => {
                renewed_us.get_or_insert(*renewed);
                if !matches!(trust, Trust::Unknown(_)) {
                    trust = unknown;
                }
            }
            Trust::Untrusted(u) => {
                if matches!(trust, Trust::Gone) {
                    trust = Trust::Untrusted(u.clone());
                }
                untrusted.push(u);
            }
        }
    }
    let mut own = run.clone();
    let left_out: std::collections::HashSet<&str> = untrusted.iter().map(|u| u.object.as_str()).collect();
    let (generations, renewals): (Vec<String>, Vec<i64>) = run
        .generations
        .iter()
        .zip(&run.renewals)
        .filter(|(name, _)| !left_out.contains(name.as_str()))
        .map(|(name, renewed)| (name.clone(), *renewed))
        .unzip();
    own.renewed_us = renewed_us.or_else(|| renewals.last().copied()).unwrap_or(run.started_us);
    own.generations = generations;
    own.renewals = renewals;
    OpenedRun { run: own, trust, untrusted }
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

async fn put_record(repo: &Repository, name: &str, text: String) -> Result<(), RepositoryError> {
    match repo.put_sealed(name, text.into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await? {
        PutOutcome::Created => Ok(()),
        PutOutcome::AlreadyExists => {
            Err(RepositoryError::Invalid { name: name.into(), what: "exists already (a random name repeated)".into() })
        }
    }
}

#[derive(Debug)]
struct Shared {
    repo: Repository,
    kind: RunKind,
    started_us: i64,
    id: String,
    /// Held across each put and delete, so that renewals, a new plan and the release never
    /// interleave (a generation put after the release would be left behind).
    state: tokio::sync::Mutex<State>,
    /// When the marker was last renewed durably, and the longest span without, so far.
    freshness: std::sync::Mutex<Freshness>,
}

/// Spans without a durable renewal. A span runs from the moment a generation's put was begun
/// (about the renewal time its name gives, which expire judges by) to the moment the next put
/// was durable.
#[derive(Debug, Clone, Copy)]
struct Freshness {
    /// When the put of the newest durable generation was begun.
    named: Instant,
    /// The longest closed span so far.
    longest: Duration,
}

impl Freshness {
    fn renewed(&mut self, begun: Instant) {
        self.longest = self.longest.max(self.named.elapsed());
        self.named = begun;
    }

    fn longest_now(&self) -> Duration {
        self.longest.max(self.named.elapsed())
    }
}

#[derive(Debug, Default)]
struct State {
    /// (renewal time, name), oldest first: normally the two newest, more while deletes fail.
    generations: VecDeque<(i64, String)>,
    plan: Option<ReadPlan>,
    released: bool,
}

impl Shared {
    /// Puts the next generation, then deletes all but the two newest.
    async fn renew(&self) -> Result<(), RepositoryError> {
        let mut state = self.state.lock().await;
        if state.released {
            return Ok(());
        }
        let last = state.generations.back().map(|g| g.0).unwrap_or(self.started_us);
        // Strictly later, even if the clock stepped back: names must not repeat.
        let renewed = now_us().max(last.saturating_add(1));
        let name = marker_name(self.kind, self.started_us, renewed, &self.id);
        let text = record_text(self.kind, self.started_us, renewed, &self.id, state.plan.as_ref());
        let begun = Instant::now();
        put_record(&self.repo, &name, text).await?;
        if let Ok(mut f) = self.freshness.lock() {
            f.renewed(begun);
        }
        state.generations.push_back((renewed, name));
        while state.generations.len() > 2 {
            let Some((_, oldest)) = state.generations.front().cloned() else { break };
            match self.repo.delete(&oldest).await {
                Ok(()) => {
                    state.generations.pop_front();
                }
                // Harmless: it is older than the two kept, and the next renewal (or the release)
                // tries again; if all fail it goes stale.
                Err(e) => {
                    tracing::warn!(marker = %oldest, error = %e, "could not remove an old generation of the running marker");
                    break;
                }
            }
        }
        Ok(())
    }

    /// Removes every generation and stops renewals. Failures are logged: the marker then only
    /// holds expire off until it is stale.
    async fn release(&self) {
        let mut state = self.state.lock().await;
        state.released = true;
        let names: Vec<String> = state.generations.iter().map(|g| g.1.clone()).collect();
        // Newest first: were it interrupted, what is left is the oldest, the first to go stale.
        for name in names.iter().rev() {
            if let Err(e) = self.repo.delete(name).await {
                tracing::warn!(marker = %name, error = %e, "could not remove the running marker (it goes stale on its own)");
            }
        }
        state.generations.clear();
    }
}

async fn renew_loop(shared: Arc<Shared>, every: Duration) {
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        if shared.state.lock().await.released {
            return;
        }
        wait = match shared.renew().await {
            Ok(()) => every,
            Err(e) => {
                tracing::warn!(
                    kind = %shared.kind, error = %e,
                    "could not renew the running marker; retrying (the previous one stays live until it is stale)"
                );
                RETRY_RENEWAL.min(every)
            }
        };
    }
}

/// Announces a running backup, restore or drill for as long as it lives, renewing itself in the
/// background. Release it when done; dropped unreleased (an error exit), it is removed in the
/// background.
#[derive(Debug)]
pub struct RunMarker {
    shared: Arc<Shared>,
    renewer: Option<tokio::task::JoinHandle<()>>,
    released: bool,
}

impl RunMarker {
    /// Puts the marker, starts renewing it every [`RENEW_EVERY`], then waits while a
    /// `pitr expire` holds a live lock.
    pub async fn begin(repo: &Repository, kind: RunKind) -> Result<RunMarker, RepositoryError> {
        RunMarker::begin_renewing_every(repo, kind, RENEW_EVERY).await
    }

    /// As [`RunMarker::begin`], renewing every `every` (tests renew faster).
    pub async fn begin_renewing_every(
        repo: &Repository,
        kind: RunKind,
        every: Duration,
    ) -> Result<RunMarker, RepositoryError> {
        let begun = Instant::now();
        let started_us = now_us();
        let id = random_suffix();
        let name = marker_name(kind, started_us, started_us, &id);
        put_record(repo, &name, record_text(kind, started_us, started_us, &id, None)).await?;
        let state = State { generations: VecDeque::from([(started_us, name)]), ..State::default() };
        let shared = Arc::new(Shared {
            repo: repo.clone(),
            kind,
            started_us,
            id,
            state: tokio::sync::Mutex::new(state),
            freshness: std::sync::Mutex::new(Freshness { named: begun, longest: Duration::ZERO }),
        });
        // Renewing already while waiting: the wait may outlast `stale_backup_after`.
        let renewer = tokio::spawn(renew_loop(shared.clone(), every));
        let marker = RunMarker { shared, renewer: Some(renewer), released: false };
        marker.wait_for_expire().await?;
        Ok(marker)
    }

    async fn wait_for_expire(&self) -> Result<(), RepositoryError> {
        let what = match self.shared.kind {
            RunKind::Backup => "pitr expire is sweeping blocks; the backup waits until it is done",
            RunKind::Restore => "pitr expire is running; the restore waits until it is done before it reads",
            RunKind::Drill => "pitr expire is running; the drill waits until it is done before it reads",
        };
        wait_for_expire(&self.shared.repo, !matches!(self.shared.kind, RunKind::Backup), what).await.map(|_| ())
    }

    /// What this marker announces.
    pub fn kind(&self) -> RunKind {
        self.shared.kind
    }

    /// The run's random id, part of every generation's name.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// When the run began (its first generation), µs since the Unix epoch.
    pub fn started_us(&self) -> i64 {
        self.shared.started_us
    }

    /// The generations held now, oldest first.
    pub async fn names(&self) -> Vec<String> {
        self.shared.state.lock().await.generations.iter().map(|g| g.1.clone()).collect()
    }

    /// Records what this restore or drill reads, by renewing at once with the plan in the record.
    /// On an error the marker stays as it was (without a plan expire removes no backup and no
    /// WAL), and renewals carry the plan from then on.
    pub async fn set_plan(&self, plan: ReadPlan) -> Result<(), RepositoryError> {
        self.shared.state.lock().await.plan = Some(plan);
        self.shared.renew().await
    }

    /// The longest span so far, the current one included, in which the marker had no durable
    /// renewal: an expire judges a marker by its newest generation, so throughout such a span it
    /// saw the marker as that old.
    pub fn longest_unrenewed(&self) -> Duration {
        self.shared.freshness.lock().map(|f| f.longest_now()).unwrap_or(Duration::MAX)
    }

    /// For a backup, just before it stores its manifest: an error if the marker ever went
    /// unrenewed (renewals failing, the process stalled) for `stale_after` (`[retention]
    /// stale_backup_after`) less [`FRESH_MARGIN`]. An expire meanwhile may then have taken the
    /// run for a crashed one and swept blocks it reuses, and a manifest naming them must not be
    /// stored.
    pub fn check_fresh(&self, stale_after: Duration) -> Result<(), MarkerStale> {
        let unrenewed = self.longest_unrenewed();
        if unrenewed >= stale_after.saturating_sub(FRESH_MARGIN) {
            return Err(MarkerStale { unrenewed, stale_after });
        }
        Ok(())
    }

    /// Renews now (tests; the background task renews on its own).
    pub async fn renew_now(&self) -> Result<(), RepositoryError> {
        self.shared.renew().await
    }

    /// Stops renewing and removes every generation. A failure only delays expire until the
    /// marker is stale; it is logged, not returned.
    pub async fn release(mut self) {
        self.released = true;
        self.shared.release().await;
        // No renewal can be in a put now (the release holds the state lock while it deletes, and
        // a renewal after it sees `released`), so stopping the task loses nothing.
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

impl Drop for RunMarker {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // The renewer is not aborted here: it might be in the middle of a put, whose generation
        // would then be left behind. The release below waits for it, and it stops by itself.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            handle.spawn(async move { shared.release().await });
        }
    }
}

/// How [`wait_for_expire`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpireWait {
    /// No live expire lock, or every one waited for went away (released).
    Clear,
    /// The wait ran out on time: these locks, waited for, were still there when their time was up
    /// (their expire crashed, stalled, or runs on a clock behind this host's). Said in the log.
    TimedOut(Vec<String>),
}

/// Waits while a `pitr expire` holds a live lock that opens (see "Announce, then look"); call it
/// after putting what expire must see. `reader`: wait only until the lock's sweep deadline plus a
/// minute (expire deletes nothing later), as restores and drills do; otherwise for the lock's
/// whole lifetime, as a backup and a pin do. `what` is said once, when the wait begins.
pub async fn wait_for_expire(repo: &Repository, reader: bool, what: &str) -> Result<ExpireWait, RepositoryError> {
    let mut said = false;
    let mut checked: std::collections::HashMap<String, Trust> = std::collections::HashMap::new();
    let mut waited: BTreeSet<String> = BTreeSet::new();
    loop {
        let now = now_us();
        // Expire deletes nothing past its sweep deadline (half its lock's lifetime). A reader
        // waits only until then, plus a minute for clock skew: a lock left by a crashed
        // expire must not hold a restore during an incident for the lock's whole lifetime.
        // A backup waits for the whole lifetime, as before, since it also writes blocks.
        let waits_until = |started_us: i64, expires_us: i64| {
            if reader {
                (started_us + (expires_us - started_us) / 2 + 60_000_000).min(expires_us)
            } else {
                expires_us
            }
        };
        let mut live = None;
        let listed = list(repo).await?;
        for o in &listed {
            let Activity::Expire { started_us, expires_us } = o.activity else { continue };
            if waits_until(started_us, expires_us) <= now {
                continue;
            }
            // A lock that is not a pitr expire's (it does not open, or disagrees with its
            // name) protects no sweep: waiting for it would let anyone who can write to the
            // bucket stop every backup. It is reported, once per lock, and `pitr verify`
            // names it. Only lasting verdicts are remembered: a storage error, or a miss
            // while the lock is still listed, is asked again at the next listing.
            let trust = match checked.get(&o.name) {
                Some(t) => t.clone(),
                None => {
                    let t = check(repo, o, now).await;
                    if let Trust::Untrusted(u) = &t {
                        tracing::warn!(lock = %o.name, "not waiting for an expire lock that is not pitr's: {}", u.why);
                    }
                    if matches!(t, Trust::Sound { .. } | Trust::Untrusted(_)) {
                        checked.insert(o.name.clone(), t.clone());
                    }
                    t
                }
            };
            if trust.obeyed() {
                live = Some(o);
                break;
            }
        }
        let Some(lock) = live else {
            let timed_out: Vec<String> =
                listed.iter().filter(|o| waited.contains(&o.name)).map(|o| o.name.clone()).collect();
            if timed_out.is_empty() {
                return Ok(ExpireWait::Clear);
            }
            tracing::warn!(
                locks = %timed_out.join(", "),
                "stopped waiting for pitr expire: its lock was not released by the end of its {} (the expire crashed, \
                 stalled, or runs on a clock behind this host's); going on",
                if reader { "sweep deadline plus a minute" } else { "lifetime" }
            );
            return Ok(ExpireWait::TimedOut(timed_out));
        };
        waited.insert(lock.name.clone());
        if !said {
            let Activity::Expire { expires_us, .. } = lock.activity else { return Ok(ExpireWait::Clear) };
            let holder = describe(repo, &lock.name).await;
            tracing::info!(
                lock = %lock.name,
                holder = %holder,
                until = %format_rfc3339_seconds(expires_us),
                "{what} (a lock left by a crashed expire may be deleted by hand once its holder is gone)"
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Why the expire lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Putting the lock or listing `running/` failed.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// The lock's lifetime is zero or longer than [`MAX_LOCK_TTL`] (which backups would not obey).
    #[error("an expire lock lifetime of {ttl} is not allowed: it must be more than 0 and at most {max}")]
    Ttl {
        /// The lifetime asked for.
        ttl: String,
        /// The longest allowed.
        max: String,
    },
    /// Another live expire lock exists; ours was deleted again and this expire does not start.
    #[error("another pitr expire is running on this repository ({holder}; its lock {name} expires at {expires}); not starting a second")]
    Busy {
        /// The other lock's object name.
        name: String,
        /// Who holds it (`host=…, pid=…` from its record, or `holder unknown`).
        holder: String,
        /// When it expires (RFC 3339, seconds).
        expires: String,
    },
}

/// The expire lock, held while expire may delete.
#[derive(Debug)]
pub struct ExpireLock {
    repo: Repository,
    name: String,
    taken: Instant,
    ttl: Duration,
}

impl ExpireLock {
    /// Puts the lock (valid for `ttl` from `now_us`), then refuses if another expire holds a
    /// live one: of two racing, at least one sees the other and backs off. A lock that is not
    /// another pitr expire's ([`check`]: it does not open or disagrees with its name) is not obeyed.
    pub async fn acquire(repo: &Repository, now_us: i64, ttl: Duration) -> Result<ExpireLock, LockError> {
        if ttl > MAX_LOCK_TTL || ttl.is_zero() {
            return Err(LockError::Ttl { ttl: span(ttl), max: span(MAX_LOCK_TTL) });
        }
        // The sweep deadline counts from before the put: a put that took minutes (retries) must not
        // move the deadline past what waiters compute from the name. This narrows the same gap
        // for restores and drills, which wait only until the named start + ttl/2 + a minute.
        let taken = Instant::now();
        let expires = now_us.saturating_add(micros(ttl));
        let name = names::expire_lock(now_us, expires, &random_suffix());
        let text = format!(
            "host={}\npid={}\nkind=expire\nstarted_us={now_us}\nexpires_us={expires}\n",
            crate::hostname(),
            std::process::id()
        );
        put_record(repo, &name, text).await?;
        let lock = ExpireLock { repo: repo.clone(), name, taken, ttl };
        let mut other = None;
        for o in list(repo).await? {
            let Activity::Expire { expires_us, .. } = o.activity else { continue };
            if o.name == lock.name || expires_us <= now_us {
                continue;
            }
            match check(repo, &o, now_us).await {
                Trust::Untrusted(u) => {
                    tracing::warn!(lock = %o.name, "ignoring an expire lock that is not pitr's: {}", u.why);
                }
                Trust::Gone => {}
                Trust::Sound { .. } | Trust::Unknown(_) => {
                    other = Some((o.name, expires_us));
                    break;
                }
            }
        }
        if let Some((other, expires_us)) = other {
            let holder = describe(repo, &other).await;
            lock.release().await;
            return Err(LockError::Busy { name: other, holder, expires: format_rfc3339_seconds(expires_us) });
        }
        Ok(lock)
    }

    /// The lock's object name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes may happen until then: half the lock's lifetime, the rest is margin for the
    /// clocks of the hosts running backups and restores.
    pub fn sweep_deadline(&self) -> Instant {
        self.taken + self.ttl / 2
    }

    /// Deletes the lock, so backups, restores and drills waiting on it go on at once. A failure is
    /// logged, not returned: the lock then holds backups off until it expires (restores and drills
    /// until its sweep deadline plus a minute).
    pub async fn release(self) {
        if let Err(e) = self.repo.delete(&self.name).await {
            tracing::warn!(lock = %self.name, error = %e, "could not remove the expire lock (it expires on its own)");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{ObjectInfo, Store, StoreError};
    use crate::{KeyRing, LocalStore};
    use bytes::Bytes;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// How [`Faulty`] fails a read.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Fault {
        /// A storage error (a 503 after retries).
        Unavailable,
        /// "Not found", while listings still show the object.
        Missing,
    }

    /// A local store whose reads of chosen names fail; everything else as the local store.
    #[derive(Debug)]
    pub(crate) struct Faulty {
        pub(crate) inner: LocalStore,
        failing: std::sync::Mutex<BTreeMap<String, Fault>>,
        /// Puts fail (a 503 after retries) while set.
        failing_puts: AtomicBool,
        /// Puts of names under this prefix take a second and a half (retries of a slow store).
        slow_puts: std::sync::Mutex<Option<String>>,
    }

    impl Faulty {
        pub(crate) fn new(dir: &std::path::Path) -> Faulty {
            Faulty {
                inner: LocalStore::new(dir),
                failing: Default::default(),
                failing_puts: AtomicBool::new(false),
                slow_puts: Default::default(),
            }
        }

        pub(crate) fn slow_puts_under(&self, prefix: &str) {
            *self.slow_puts.lock().unwrap() = Some(prefix.to_string());
        }

        pub(crate) fn fail_puts(&self, fail: bool) {
            self.failing_puts.store(fail, Ordering::SeqCst);
        }

        pub(crate) fn fail(&self, name: &str, fault: Fault) {
            self.failing.lock().unwrap().insert(name.to_string(), fault);
        }

        fn read(&self, name: &str) -> Result<(), StoreError> {
            match self.failing.lock().unwrap().get(name) {
                None => Ok(()),
                Some(Fault::Unavailable) => Err(StoreError::Backend {
                    op: "get",
                    name: name.into(),
                    location: self.inner.location(),
                    message: "503 Slow Down".into(),
                }),
                Some(Fault::Missing) => {
                    Err(StoreError::NotFound { name: name.into(), location: self.inner.location() })
                }
            }
        }
    }

    #[async_trait::async_trait]
    impl Store for Faulty {
        async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
            if self.failing_puts.load(Ordering::SeqCst) {
                return Err(StoreError::Backend {
                    op: "put",
                    name: name.into(),
                    location: self.inner.location(),
                    message: "503 Slow Down".into(),
                });
            }
            let slow = self.slow_puts.lock().unwrap().as_ref().is_some_and(|p| name.starts_with(p.as_str()));
            if slow {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            self.inner.put_if_absent(name, data).await
        }
        async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
            self.read(name)?;
            self.inner.get(name).await
        }
        async fn get_limited(&self, name: &str, limit: u64) -> Result<Bytes, StoreError> {
            self.read(name)?;
            self.inner.get_limited(name, limit).await
        }
        async fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<Bytes, StoreError> {
            self.read(name)?;
            self.inner.get_range(name, range).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, name: &str) -> Result<(), StoreError> {
            self.inner.delete(name).await
        }
        async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
            self.inner.head(name).await
        }
        fn location(&self) -> String {
            self.inner.location()
        }
    }

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::new(Arc::new(LocalStore::new(dir)), KeyRing::from_key("k", [3; 32]))
    }

    #[tokio::test]
    async fn the_sweep_deadline_counts_from_before_the_lock_was_put() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Faulty::new(dir.path()));
        let r = Repository::new(store.clone(), KeyRing::from_key("k", [3; 32]));
        // The put takes 1.5 s of a 2 s lifetime: counted from after it, deletes would go on
        // until 2.5 s after the start the lock's name gives, past what waiters compute from it.
        store.slow_puts_under("running/expire.");
        let lock = ExpireLock::acquire(&r, now_us(), Duration::from_secs(2)).await.unwrap();
        assert!(lock.sweep_deadline() <= Instant::now(), "the deadline moved with the slow put");
        lock.release().await;
    }

    fn run_names(objects: &[RunningObject]) -> Vec<&str> {
        objects.iter().filter(|o| matches!(o.activity, Activity::Run { .. })).map(|o| o.name.as_str()).collect()
    }

    #[tokio::test]
    async fn a_backup_waits_for_a_live_lock_and_one_expire_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let lock = ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await.unwrap();
        let err = ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LockError::Busy { .. }), "{err}");
        // The refused one took its own lock back.
        assert_eq!(list(&r).await.unwrap().len(), 1);

        let r2 = r.clone();
        let waiting = tokio::spawn(async move { RunMarker::begin(&r2, RunKind::Backup).await.unwrap() });
        // The marker is there while the backup waits.
        while run_names(&list(&r).await.unwrap()).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!waiting.is_finished());
        lock.release().await;
        let marker = waiting.await.unwrap();
        let names = marker.names().await;
        assert!(matches!(parse_name(&names[0]), Some(Activity::Run { kind: RunKind::Backup, .. })));
        marker.release().await;
        assert!(list(&r).await.unwrap().is_empty());

        // An expired lock (a crashed expire) neither blocks runs nor another expire.
        let old = ExpireLock::acquire(&r, now_us() - 120_000_000, Duration::from_secs(60)).await.unwrap();
        RunMarker::begin(&r, RunKind::Restore).await.unwrap().release().await;
        ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await.unwrap().release().await;
        old.release().await;
    }

    #[test]
    fn names_parse() {
        let name = marker_name(RunKind::Restore, 255, 256, "ab12");
        assert_eq!(name, "running/restore.00000000000000FF.0000000000000100.ab12");
        assert_eq!(
            parse_name(&name),
            Some(Activity::Run { kind: RunKind::Restore, started_us: 255, renewed_us: 256, id: "ab12".into() })
        );
        assert_eq!(
            parse_name("running/drill.0000000000000001.0000000000000002.x"),
            Some(Activity::Run { kind: RunKind::Drill, started_us: 1, renewed_us: 2, id: "x".into() })
        );
        // An older pitr's backup marker: renewed at its start.
        assert_eq!(
            parse_name("running/backup.00000000000000FF.abc"),
            Some(Activity::Run { kind: RunKind::Backup, started_us: 255, renewed_us: 255, id: "abc".into() })
        );
        assert_eq!(
            parse_name("running/expire.0000000000000001.0000000000000002.x"),
            Some(Activity::Expire { started_us: 1, expires_us: 2 })
        );
        for bad in [
            "running/other",
            "pg/1/running/backup.1.x",
            "running/restore.1.x",
            "running/copy.1.2.x",
            "running/restore.1.2.",
            "running/restore.1.zz.x",
            "running/restore.1.2.x.y",
            "running/.tmp.restore.1.2.x",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
        // Hex of fixed width: names sort by start, then renewal.
        let a = marker_name(RunKind::Backup, 0x10, 0xFF, "z");
        let b = marker_name(RunKind::Backup, 0x10, 0x100, "a");
        assert!(a < b);
    }

    #[test]
    fn liveness_goes_by_the_newest_generation() {
        let obj = |name: String| RunningObject { activity: parse_name(&name).unwrap(), name };
        let minute = Duration::from_secs(60);
        let objects = vec![
            obj(marker_name(RunKind::Backup, 1_000, 1_000, "a")),
            obj(marker_name(RunKind::Backup, 1_000, 50_000_000, "a")),
            obj(marker_name(RunKind::Backup, 1_000, 90_000_000, "a")),
            obj(marker_name(RunKind::Restore, 2_000, 2_000, "b")),
            // Same start, another run.
            obj(marker_name(RunKind::Backup, 1_000, 1_000, "c")),
            obj("running/expire.0000000000000001.0000000000000002.x".into()),
        ];
        let runs = runs(&objects);
        assert_eq!(runs.len(), 3, "{runs:?}");
        let a = runs.iter().find(|r| r.id == "a").unwrap();
        assert_eq!(a.generations.len(), 3);
        assert_eq!(a.renewed_us, 90_000_000);
        assert_eq!(a.newest(), marker_name(RunKind::Backup, 1_000, 90_000_000, "a"));
        // Started long before `now − stale`, renewed within it: live.
        let now = 140_000_000;
        assert!(now - a.started_us > 60_000_000);
        assert!(a.is_live(now, minute));
        // Exactly `stale_after` after the last renewal it is stale.
        assert!(!a.is_live(150_000_000, minute));
        assert!(a.is_live(149_999_999, minute));
        let b = runs.iter().find(|r| r.id == "b").unwrap();
        assert_eq!((b.kind, b.renewed_us), (RunKind::Restore, 2_000));
        assert!(!b.is_live(now, minute));
        assert!(b.is_live(2_000 + 59_000_000, minute));
        // A clock behind the writer's: still live.
        assert!(b.is_live(0, minute));
    }

    #[test]
    fn plans_round_trip_and_bad_ones_are_errors() {
        let plan = ReadPlan {
            backups: vec!["20260101T000000Z".into(), "20260102T000000Z".into()],
            timeline: 2,
            wal_from_lsn: 0x1_2000_0028,
        };
        let text = record_text(RunKind::Restore, 1, 2, "ab", Some(&plan));
        assert!(text.contains("kind=restore\n"), "{text}");
        assert_eq!(parse_plan(&text), Ok(Some(plan)));
        assert_eq!(parse_plan(&record_text(RunKind::Drill, 1, 1, "ab", None)), Ok(None));
        assert!(parse_plan("backups=\ntimeline=1\nwal_from=00\n").is_err());
        assert!(parse_plan("backups=a\nwal_from=00\n").is_err());
        assert!(parse_plan("backups=a\ntimeline=1\nwal_from=xyz\n").is_err());
    }

    #[test]
    fn records_must_agree_with_their_names_and_times_be_plausible() {
        let run = Activity::Run { kind: RunKind::Backup, started_us: 10, renewed_us: 20, id: "ab".into() };
        assert_eq!(record_disagrees(&run, &record_text(RunKind::Backup, 10, 20, "ab", None)), None);
        // A record of an older pitr, without the name's times: compared where it has fields.
        assert_eq!(record_disagrees(&run, "host=h\npid=1\nkind=backup\n"), None);
        assert_eq!(record_disagrees(&run, "host=h\npid=1\n"), None);
        let why = record_disagrees(&run, &record_text(RunKind::Restore, 10, 20, "ab", None)).unwrap();
        assert_eq!(why, "its record says kind=restore, its name kind=backup");
        assert!(record_disagrees(&run, &record_text(RunKind::Backup, 10, 21, "ab", None))
            .unwrap()
            .contains("renewed_us"));
        assert!(record_disagrees(&run, &record_text(RunKind::Backup, 10, 20, "cd", None)).unwrap().contains("id="));
        let lock = Activity::Expire { started_us: 10, expires_us: 30 };
        assert_eq!(record_disagrees(&lock, "host=h\npid=1\nkind=expire\nstarted_us=10\nexpires_us=30\n"), None);
        assert!(record_disagrees(&lock, "kind=expire\nstarted_us=10\nexpires_us=31\n").is_some());
        assert!(record_disagrees(&lock, &record_text(RunKind::Backup, 10, 30, "ab", None)).is_some());

        let now = 1_800_000_000_000_000;
        let skew = micros(MAX_CLOCK_SKEW);
        let run_at =
            |renewed_us| Activity::Run { kind: RunKind::Backup, started_us: now - 5, renewed_us, id: "a".into() };
        assert_eq!(implausible(&run_at(now + skew), now), None);
        assert!(implausible(&run_at(now + skew + 1), now).unwrap().contains("ahead of this host's clock"));
        assert!(implausible(&run_at(i64::MAX), now).is_some());
        assert!(implausible(&run_at(now - 6), now).unwrap().contains("before it started"));
        let lock_at =
            |started_us: i64, ttl: i64| Activity::Expire { started_us, expires_us: started_us.saturating_add(ttl) };
        assert_eq!(implausible(&lock_at(now, micros(MAX_LOCK_TTL)), now), None);
        assert!(implausible(&lock_at(now, micros(MAX_LOCK_TTL) + 1), now).unwrap().contains("longer than the 24 h"));
        assert!(implausible(&lock_at(now, i64::MAX), now).is_some());
        assert!(implausible(&lock_at(now + skew + 1, 60_000_000), now).unwrap().contains("ahead"));
        assert!(implausible(&lock_at(now, 0), now).unwrap().contains("expires before"));
    }

    /// Puts raw bytes (not sealed by this repository's key) under `name`, as someone with write
    /// access to the bucket but not the key can.
    async fn plant(dir: &std::path::Path, name: &str, bytes: &[u8]) {
        use crate::store::Store;
        LocalStore::new(dir).put_if_absent(name, bytes::Bytes::copy_from_slice(bytes)).await.unwrap();
    }

    #[tokio::test]
    async fn planted_and_foreign_objects_are_untrusted_and_do_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let now = now_us();
        // A far-future lock that does not open (empty), and one sealed with another key.
        let planted = names::expire_lock(now, now + 3_600_000_000, "p1");
        plant(dir.path(), &planted, b"").await;
        let other_key = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k2", [9; 32]));
        let foreign = names::expire_lock(now, now + 3_600_000_000, "p2");
        other_key.put_sealed(&foreign, b"host=x\npid=1\n".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        // A lock sealed with the right key whose record disagrees with its name.
        let liar = names::expire_lock(now, now + 3_600_000_000, "p3");
        put_record(&r, &liar, format!("kind=expire\nstarted_us={now}\nexpires_us={}\n", now + 1)).await.unwrap();
        for name in [&planted, &foreign, &liar] {
            let o = RunningObject { activity: parse_name(name).unwrap(), name: name.clone() };
            assert!(matches!(check(&r, &o, now).await, Trust::Untrusted(ref u) if &u.object == name), "{name}");
        }
        // None of them blocks a backup or another expire.
        let marker = tokio::time::timeout(Duration::from_secs(10), RunMarker::begin(&r, RunKind::Backup))
            .await
            .expect("the backup waited for a lock that is not pitr's")
            .unwrap();
        let found = runs(&list(&r).await.unwrap());
        assert!(matches!(open_run(&r, &found[0], now_us()).await.trust, Trust::Sound { .. }));
        marker.release().await;
        let lock = ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await.unwrap();
        // A real lock is sound, and still makes a second expire back off.
        let o = RunningObject { activity: parse_name(lock.name()).unwrap(), name: lock.name().into() };
        assert!(matches!(check(&r, &o, now_us()).await, Trust::Sound { .. }));
        assert!(matches!(
            ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await,
            Err(LockError::Busy { .. })
        ));
        lock.release().await;
        assert!(matches!(
            ExpireLock::acquire(&r, now_us(), MAX_LOCK_TTL + Duration::from_secs(1)).await,
            Err(LockError::Ttl { .. })
        ));

        // A marker that does not open is untrusted; one whose generations are all gone is gone.
        let fake = marker_name(RunKind::Backup, now, now + 86_400_000_000, "f");
        plant(dir.path(), &fake, b"junk").await;
        let fake_run = runs(&list(&r).await.unwrap()).into_iter().find(|x| x.id == "f").unwrap();
        let Trust::Untrusted(u) = open_run(&r, &fake_run, now).await.trust else { panic!("obeyed a planted marker") };
        assert!(u.why.contains("does not open") && u.why.contains("ahead of this host's clock"), "{u}");
        let near = marker_name(RunKind::Backup, now, now, "g");
        plant(dir.path(), &near, b"junk").await;
        let near_run = runs(&list(&r).await.unwrap()).into_iter().find(|x| x.id == "g").unwrap();
        let Trust::Untrusted(u) = open_run(&r, &near_run, now).await.trust else { panic!("obeyed a planted marker") };
        assert!(u.why.contains("does not open"), "{u}");
        let gone = Run {
            kind: RunKind::Drill,
            started_us: now,
            renewed_us: now,
            id: "z".into(),
            generations: vec![marker_name(RunKind::Drill, now, now, "z")],
            renewals: vec![now],
        };
        assert_eq!(open_run(&r, &gone, now).await.trust, Trust::Gone);
    }

    #[tokio::test]
    async fn renewal_keeps_two_generations_never_none_and_release_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let marker = RunMarker::begin_renewing_every(&r, RunKind::Restore, Duration::from_millis(20)).await.unwrap();
        // A reader listing all the while never finds the run without a generation.
        let stop = Arc::new(AtomicBool::new(false));
        let (r2, stop2) = (r.clone(), stop.clone());
        let watcher = tokio::spawn(async move {
            let mut listings = 0;
            while !stop2.load(Ordering::SeqCst) {
                let found = run_names(&list(&r2).await.unwrap()).len();
                assert!((1..=3).contains(&found), "{found} generations listed");
                listings += 1;
                tokio::task::yield_now().await;
            }
            listings
        });
        let first = marker.names().await;
        // Wait for several renewals (by what is in the repository, not by time).
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 6 {
            for n in run_names(&list(&r).await.unwrap()) {
                seen.insert(n.to_string());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let runs_now = runs(&list(&r).await.unwrap());
        assert_eq!(runs_now.len(), 1);
        assert!(runs_now[0].renewed_us > marker.started_us());
        assert!(!runs_now[0].generations.contains(&first[0]), "the first generation is still there");
        assert!(matches!(reader_needs(&r, &runs_now[0]).await, ReaderNeeds::Unplanned));

        let plan = ReadPlan { backups: vec!["20260101T000000Z".into()], timeline: 1, wal_from_lsn: 0x0300_0028 };
        marker.set_plan(plan.clone()).await.unwrap();
        let runs_now = runs(&list(&r).await.unwrap());
        assert_eq!(reader_needs(&r, &runs_now[0]).await, ReaderNeeds::Planned(plan.clone()));
        marker.renew_now().await.unwrap();
        let runs_now = runs(&list(&r).await.unwrap());
        assert_eq!(reader_needs(&r, &runs_now[0]).await, ReaderNeeds::Planned(plan));

        stop.store(true, Ordering::SeqCst);
        assert!(watcher.await.unwrap() > 0);
        marker.release().await;
        assert!(list(&r).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_backup_whose_marker_went_unrenewed_near_stale_backup_after_is_refused_even_after_it_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Faulty::new(dir.path()));
        let r = Repository::new(store.clone(), KeyRing::from_key("k", [3; 32]));
        let every = Duration::from_millis(20);
        let marker = RunMarker::begin_renewing_every(&r, RunKind::Backup, every).await.unwrap();
        // Against a stale_backup_after of FRESH_MARGIN + 1 s: refused once renewals fail for 1 s.
        let stale_after = FRESH_MARGIN + Duration::from_secs(1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(marker.longest_unrenewed() < Duration::from_millis(500), "{:?}", marker.longest_unrenewed());
        marker.check_fresh(stale_after).unwrap();

        store.fail_puts(true);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let err = marker.check_fresh(stale_after).unwrap_err();
        assert!(err.unrenewed >= Duration::from_secs(1), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("could not be renewed for ") && text.contains("nothing was stored"), "{text}");

        // Renewals work again, yet the gap is remembered: an expire may have swept meanwhile.
        store.fail_puts(false);
        let renewed_before = marker.names().await;
        while marker.names().await == renewed_before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(marker.check_fresh(stale_after).is_err(), "a past gap was forgotten once renewals recovered");
        // A longer stale_backup_after tolerates it.
        marker.check_fresh(FRESH_MARGIN + Duration::from_secs(60)).unwrap();
        marker.release().await;
    }

    #[tokio::test]
    async fn a_dropped_marker_is_removed_and_an_unreadable_one_needs_everything() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let marker = RunMarker::begin(&r, RunKind::Drill).await.unwrap();
        drop(marker);
        let mut waited = 0;
        while !list(&r).await.unwrap().is_empty() {
            assert!(waited < 1000, "the dropped marker was not removed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        // A generation deleted between listing and reading, and no other: anything may be needed.
        let gone = Run {
            kind: RunKind::Restore,
            started_us: 1,
            renewed_us: 1,
            id: "x".into(),
            generations: vec![marker_name(RunKind::Restore, 1, 1, "x")],
            renewals: vec![1],
        };
        assert!(matches!(reader_needs(&r, &gone).await, ReaderNeeds::Unreadable(_)));
    }

    fn object(name: &str) -> RunningObject {
        RunningObject { activity: parse_name(name).unwrap(), name: name.into() }
    }

    #[tokio::test]
    async fn genuine_markers_and_locks_are_obeyed_whatever_times_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let now = now_us();
        let hour = 3_600_000_000;
        // A backup on a host whose clock is an hour ahead: its marker opens, so it is obeyed.
        let ahead = marker_name(RunKind::Backup, now + hour, now + hour, "fast");
        put_record(&r, &ahead, record_text(RunKind::Backup, now + hour, now + hour, "fast", None)).await.unwrap();
        assert!(implausible(&object(&ahead).activity, now).is_some());
        assert!(matches!(check(&r, &object(&ahead), now).await, Trust::Sound { .. }));
        let found = open_run(&r, &runs(&list(&r).await.unwrap())[0], now).await;
        assert!(matches!(found.trust, Trust::Sound { .. }) && found.untrusted.is_empty(), "{found:?}");
        assert!(found.run.is_live(now, Duration::from_secs(60)));

        // An expire lock from such a host, lasting two days (an older pitr's lock_ttl): backups
        // wait for it, and a second expire backs off.
        let (started, expires) = (now + hour, now + 48 * hour);
        let lock = names::expire_lock(started, expires, "fast");
        put_record(&r, &lock, format!("host=h\npid=1\nkind=expire\nstarted_us={started}\nexpires_us={expires}\n"))
            .await
            .unwrap();
        assert!(implausible(&object(&lock).activity, now).is_some());
        assert!(matches!(check(&r, &object(&lock), now).await, Trust::Sound { .. }));
        assert!(matches!(
            ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await,
            Err(LockError::Busy { .. })
        ));
        let r2 = r.clone();
        let backup = tokio::spawn(async move { RunMarker::begin(&r2, RunKind::Backup).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!backup.is_finished(), "the backup did not wait for a genuine lock from a fast host");
        r.delete(&lock).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), backup).await.unwrap().unwrap().release().await;
    }

    #[tokio::test]
    async fn a_planted_generation_neither_keeps_a_crashed_run_alive_nor_hides_an_unreadable_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Faulty::new(dir.path()));
        let r = Repository::new(store.clone(), KeyRing::from_key("k", [3; 32]));
        let now = now_us();
        let minute = Duration::from_secs(60);
        let year = 366 * 86_400_000_000;
        // A backup killed ten minutes ago, and a generation planted under its kind, start and id
        // "renewed" a year from now.
        let started = now - 20 * 60_000_000;
        let renewed = now - 10 * 60_000_000;
        let genuine = marker_name(RunKind::Backup, started, renewed, "crashed");
        put_record(&r, &genuine, record_text(RunKind::Backup, started, renewed, "crashed", None)).await.unwrap();
        let planted = marker_name(RunKind::Backup, started, now + year, "crashed");
        plant(dir.path(), &planted, b"junk").await;
        let run = runs(&list(&r).await.unwrap()).remove(0);
        assert!(run.is_live(now, minute), "live by its names");
        let found = open_run(&r, &run, now).await;
        assert!(matches!(found.trust, Trust::Sound { .. }), "{found:?}");
        assert_eq!(found.run.renewed_us, renewed);
        assert_eq!(found.run.generations, vec![genuine.clone()]);
        assert!(!found.run.is_live(now, minute), "a planted generation kept a crashed run alive");
        assert_eq!(found.untrusted.iter().map(|u| u.object.as_str()).collect::<Vec<_>>(), vec![planted.as_str()]);

        // A live restore whose generation cannot be read just now, beside a planted one of the
        // same run: obeyed by its name, not dropped as planted.
        let live = marker_name(RunKind::Restore, now, now, "reading");
        put_record(&r, &live, record_text(RunKind::Restore, now, now, "reading", None)).await.unwrap();
        let junk = marker_name(RunKind::Restore, now, now + 1, "reading");
        plant(dir.path(), &junk, b"junk").await;
        store.fail(&live, Fault::Unavailable);
        let run = runs(&list(&r).await.unwrap()).into_iter().find(|x| x.id == "reading").unwrap();
        let found = open_run(&r, &run, now).await;
        assert!(matches!(found.trust, Trust::Unknown(_)), "{found:?}");
        assert!(!found.planted_only());
        assert_eq!((found.run.renewed_us, found.run.generations.clone()), (now, vec![live.clone()]));
        assert!(found.run.is_live(now, minute));
        assert!(matches!(needs_of(&found.trust), ReaderNeeds::Unreadable(_)));
        assert_eq!(found.untrusted.len(), 1);
    }

    #[tokio::test]
    async fn locks_are_read_from_the_primary_and_a_listed_one_is_not_taken_for_deleted() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let primary = Arc::new(Faulty::new(a.path()));
        let keys = KeyRing::from_key("k", [3; 32]);
        // A secondary, which never holds running/ objects.
        let secondary: Arc<dyn Store> = Arc::new(LocalStore::new(b.path()));
        let r = Repository::new(primary.clone(), keys)
            .with_fallbacks("primary", vec![crate::repository::NamedStore { name: "dr".into(), store: secondary }]);
        let lock = ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await.unwrap();
        let o = object(lock.name());
        assert!(matches!(check(&r, &o, now_us()).await, Trust::Sound { .. }));
        // The primary fails to answer; the secondary's "not found" must not make it deleted.
        primary.fail(lock.name(), Fault::Unavailable);
        assert!(matches!(check(&r, &o, now_us()).await, Trust::Unknown(_)), "{:?}", check(&r, &o, now_us()).await);
        // The primary says "not found" while still listing it: not deleted either.
        primary.fail(lock.name(), Fault::Missing);
        assert!(matches!(check(&r, &o, now_us()).await, Trust::Unknown(_)));
        // A backup waits for it all the while.
        let r2 = r.clone();
        let backup = tokio::spawn(async move { RunMarker::begin(&r2, RunKind::Backup).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!backup.is_finished(), "the backup took an unreadable lock for deleted");
        let name = lock.name().to_string();
        lock.release().await;
        assert_eq!(check(&r, &object(&name), now_us()).await, Trust::Gone);
        tokio::time::timeout(Duration::from_secs(10), backup).await.unwrap().unwrap().release().await;
    }
}
