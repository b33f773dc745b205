//! Retention: which backups, WAL and blocks `pitr expire` keeps. Pure: no I/O, and `now` is a
//! parameter, so the policy can be run over a simulated clock (see `tests/retention.rs`).
//!
//! # Backups: grandfather-father-son plus a PITR window
//! Buckets are UTC calendar days, ISO-8601 weeks (Monday first, ISO week-numbering year),
//! calendar months and calendar years of a backup's *start* time (the time in its id).
//! - `daily = N` keeps the newest backup of each of the N most recent days that have a backup;
//!   likewise `weekly`, `monthly`, `yearly` (restic's `--keep-daily` … semantics). Days without a
//!   backup are not counted, so a stopped backup schedule never makes retention eat the last
//!   backups. A backup can be kept by several rules.
//! - The window: let cut = now − `window`. The *window base* is the newest backup whose stop time
//!   (its consistency point) is at or before cut, among the backups a restore on the newest
//!   timeline can start from (on that timeline, or on an ancestor before the switch point). It and
//!   every backup that stopped after it are kept, so every second from cut to now stays
//!   restorable. If no backup stopped by cut, the oldest such backup is the base (the window is not
//!   covered yet, and nothing after it goes). A running backup moves cut back to its start (an
//!   incremental may be taken against any backup that was newest while it ran).
//! - A kept backup keeps its whole ancestor chain (incremental → … → full).
//! - A backup a running restore or drill reads is kept (reason `restore`; see [`crate::running`]).
//! - A pinned backup is kept (reason `pinned`, [`keep_pinned`]; pins are read from the
//!   repository by [`crate::pins`]), with its chain; its start..stop WAL stays as for every kept
//!   backup. A pin whose `--until` has passed keeps nothing: the backup is judged by the rules
//!   above like any other.
//!
//! # WAL, per timeline
//! A segment stays if it lies in a kept backup's start..stop on that backup's timeline, or it is at
//! or after the window base's start segment on the base's timeline or on a timeline descending
//! from it (by the history files). Everything else may go; history files never do. A timeline
//! (after the first) without a history file, or with an unreadable one, keeps all WAL. A running
//! restore or drill keeps the WAL from where its replay starts on, on its backup's timeline and
//! the timelines descending from it ([`keep_wal_from`]).
//!
//! Where WAL goes, a *floor* records it first: `pg/<id>/retention/<timeline>-<segno>.floor` says
//! that below segment `segno` the timeline holds only what retention kept, so `pitr verify` expects
//! continuity only from the floor on (and each backup's own start..stop everywhere).
//!
//! # Blocks
//! A block stays if a kept manifest lists it.
//!
//! # How long a kept backup may stay ([`keep_until`])
//! For S3 Object Lock, `pitr expire` extends the retention of what a backup kept by a GFS rule
//! needs (manifest, blocks, WAL from its start to its stop) to the latest time the rules keep it,
//! *if from now on every day (week, month, year) gets a backup*: a backup in the k-th newest
//! bucket of a rule keeping N goes once N − k + 1 newer buckets have backups, so at the latest at
//! the start of the bucket N − k + 1 after the current one (for a regular schedule: the start of
//! the N-th bucket after its own). That is an upper bound only for such a schedule: where buckets
//! stay empty the backup is kept longer, and a later run, counting fewer newer buckets, computes a
//! later date and extends again. The window rules give no date (write-time `object_lock_days`
//! covers them); an ancestor gets the latest date of what is built on it. A pinned backup's
//! objects are retained until its pin's date ([`pin_dates`]); a keep-forever pin gives no date, so
//! `pitr expire` uses now + `object_lock_days` on every run.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Days, Months, NaiveDate};
use pitr_pgformat::timeline::{parse_history, HistoryEntry};
use serde::Serialize;

use crate::backup::BackupManifest;
use crate::names;
use crate::wal::{WalLayout, WalObject};
use crate::wal_catalog::WalCatalog;

/// The seed runbook's retention: daily 30, weekly 12, monthly 12, yearly 7, and 7 days of
/// restore-to-any-second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Keep the newest backup of each of this many most recent UTC days that have a backup
    /// (0: no daily rule).
    pub daily: u32,
    /// Likewise for ISO-8601 weeks (Monday first).
    pub weekly: u32,
    /// Likewise for calendar months.
    pub monthly: u32,
    /// Likewise for calendar years.
    pub yearly: u32,
    /// Length of the PITR window in µs: every second from now − window to now stays restorable
    /// (the window base, every backup stopped after it, and the WAL from the base's start on).
    pub window_us: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { daily: 30, weekly: 12, monthly: 12, yearly: 7, window_us: 7 * 86_400 * 1_000_000 }
    }
}

/// Why a backup is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The newest backup of one of the `daily` most recent days with a backup.
    Daily,
    /// The newest backup of one of the `weekly` most recent ISO weeks with a backup.
    Weekly,
    /// The newest backup of one of the `monthly` most recent months with a backup.
    Monthly,
    /// The newest backup of one of the `yearly` most recent years with a backup.
    Yearly,
    /// The newest backup consistent at or before the window's start.
    WindowBase,
    /// Stopped after the window base.
    Window,
    /// A kept incremental is built on it.
    Ancestor,
    /// A running restore or drill reads it (see [`crate::running`]).
    Restore,
    /// Pinned (`pitr pin`, `pitr backup --keep-forever`), forever or until a date not yet passed.
    Pinned,
}

/// What retention needs of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPoint {
    /// The backup id (`YYYYMMDDTHHMMSSZ` of its start), as in its manifest's name.
    pub id: String,
    /// For an incremental, the id of the backup it was taken against; `None` for a full backup.
    pub parent: Option<String>,
    /// The timeline the backup was taken on.
    pub timeline: u32,
    /// Where its WAL starts: replay begins here, and its start segment bounds what it keeps.
    pub start_lsn: u64,
    /// Where its WAL must reach for it to be consistent; with `start_lsn` the segments it keeps.
    pub stop_lsn: u64,
    /// Start time, µs since the Unix epoch: chooses the GFS buckets (day, week…) it falls in.
    pub start_time_us: i64,
    /// Stop time, µs since the Unix epoch: its consistency point, which places it against the
    /// window's cut.
    pub stop_time_us: i64,
}

impl From<&BackupManifest> for BackupPoint {
    fn from(m: &BackupManifest) -> Self {
        BackupPoint {
            id: m.id.clone(),
            parent: m.parent.clone(),
            timeline: m.timeline,
            start_lsn: m.start_lsn,
            stop_lsn: m.stop_lsn,
            start_time_us: m.start_time_us,
            stop_time_us: m.stop_time_us,
        }
    }
}

/// Each timeline's ancestors, from its history file, oldest first. Timeline 1 has none; a later
/// timeline whose history is missing is unknown.
#[derive(Debug, Clone, Default)]
pub struct Timelines {
    histories: BTreeMap<u32, Vec<HistoryEntry>>,
    /// Timelines whose history file exists but cannot be parsed.
    unreadable: BTreeMap<u32, String>,
}

impl Timelines {
    /// Adds the history file of `timeline` (PostgreSQL's `<parent>\t<X/Y>\t<reason>` lines).
    pub fn add_history(&mut self, timeline: u32, text: &str) {
        match parse_history(text) {
            Ok(entries) => {
                self.histories.insert(timeline, entries);
            }
            Err(e) => {
                self.unreadable.insert(timeline, e.to_string());
            }
        }
    }

    /// Adds the parsed history of `timeline`.
    pub fn add_entries(&mut self, timeline: u32, entries: Vec<HistoryEntry>) {
        self.histories.insert(timeline, entries);
    }

    /// Records that the history file of `timeline` exists but cannot be read.
    pub fn add_unreadable(&mut self, timeline: u32, why: String) {
        self.unreadable.insert(timeline, why);
    }

    fn ancestors(&self, timeline: u32) -> Option<&[HistoryEntry]> {
        if timeline <= 1 {
            return Some(&[]);
        }
        self.histories.get(&timeline).map(|v| v.as_slice())
    }

    /// Whether a restore on `latest` can start from `b`: `Some(false)` if certainly not, `None`
    /// if `latest`'s history is unknown.
    fn on_path(&self, latest: u32, b: &BackupPoint) -> Option<bool> {
        if b.timeline == latest {
            return Some(true);
        }
        let ancestors = self.ancestors(latest)?;
        Some(ancestors.iter().any(|a| a.timeline == b.timeline && b.stop_lsn <= a.switch_lsn))
    }

    /// Whether `timeline` is `of` or descends from it; unknown histories count as descending
    /// (so their WAL is kept).
    fn descends(&self, timeline: u32, of: u32) -> bool {
        match self.ancestors(timeline) {
            None => true,
            Some(a) => timeline == of || a.iter().any(|e| e.timeline == of),
        }
    }

    /// Why WAL cannot be expired safely, if it cannot: a timeline after the first with WAL but
    /// no readable history.
    fn incomplete(&self, timelines: impl Iterator<Item = u32>) -> Option<String> {
        for t in timelines {
            if let Some(e) = self.unreadable.get(&t) {
                return Some(format!("the history file of timeline {t} cannot be read ({e})"));
            }
            if self.ancestors(t).is_none() {
                return Some(format!("timeline {t} has WAL but no history file"));
            }
        }
        None
    }
}

/// Which backups stay and which go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Kept backups by id, with every reason.
    pub kept: BTreeMap<String, BTreeSet<Reason>>,
    /// Backups to remove, each before its ancestors (children first), so that a chain is never
    /// left with a hole if the removal stops half-way.
    pub expired: Vec<String>,
    /// The window base, if there is one (see the module documentation).
    pub window_base: Option<String>,
    /// now − window (or a running backup's start, if earlier), µs since the Unix epoch.
    pub window_start_us: i64,
    /// The timeline restores land on.
    pub latest_timeline: u32,
}

/// Bucket keys of a start time (UTC).
fn buckets(us: i64) -> [(i32, u32, u32); 4] {
    let t = DateTime::from_timestamp_micros(us).unwrap_or_default().date_naive();
    let w = t.iso_week();
    [(t.year(), t.month(), t.day()), (w.year(), w.week(), 0), (t.year(), t.month(), 0), (t.year(), 0, 0)]
}

fn by_start(backups: &[BackupPoint]) -> Vec<&BackupPoint> {
    let mut order: Vec<&BackupPoint> = backups.iter().collect();
    order.sort_by(|a, b| (a.start_time_us, &a.id).cmp(&(b.start_time_us, &b.id)));
    order
}

/// A backup a GFS rule keeps: the newest of the `rank`-th newest bucket (from 1) with a backup.
struct Pick<'a> {
    backup: &'a BackupPoint,
    /// 0 daily, 1 weekly, 2 monthly, 3 yearly (the index into [`buckets`]).
    rule: usize,
    reason: Reason,
    count: u32,
    rank: u32,
}

/// What each GFS rule keeps, `order` sorted by start time.
fn gfs_picks<'a>(order: &[&'a BackupPoint], policy: &Policy) -> Vec<Pick<'a>> {
    let rules = [(policy.daily, Reason::Daily), (policy.weekly, Reason::Weekly), (policy.monthly, Reason::Monthly)];
    let rules = rules.into_iter().chain([(policy.yearly, Reason::Yearly)]);
    let mut picks = Vec::new();
    for (rule, (count, reason)) in rules.enumerate() {
        let mut last = None;
        let mut taken = 0;
        for b in order.iter().rev() {
            if taken == count {
                break;
            }
            let key = buckets(b.start_time_us)[rule];
            if last != Some(key) {
                // The first seen of a bucket, going newest first, is its newest backup.
                last = Some(key);
                taken += 1;
                picks.push(Pick { backup: b, rule, reason, count, rank: taken });
            }
        }
    }
    picks
}

/// The start (00:00 UTC, µs) of the bucket of rule `rule` that is `ahead` buckets after the one
/// holding `us`; `None` past chrono's range.
fn bucket_start_after(rule: usize, us: i64, ahead: u32) -> Option<i64> {
    let d = DateTime::from_timestamp_micros(us)?.date_naive();
    let start = match rule {
        0 => d.checked_add_days(Days::new(u64::from(ahead)))?,
        1 => {
            let monday = d.checked_sub_days(Days::new(u64::from(d.weekday().num_days_from_monday())))?;
            monday.checked_add_days(Days::new(7 * u64::from(ahead)))?
        }
        2 => d.with_day(1)?.checked_add_months(Months::new(ahead))?,
        _ => NaiveDate::from_ymd_opt(d.year(), 1, 1)?.checked_add_months(Months::new(ahead.checked_mul(12)?))?,
    };
    Some(start.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros())
}

/// Until when the policy may keep each backup a GFS rule keeps at `now_us` (µs since the Unix
/// epoch): see "How long a kept backup may stay" in the module documentation. Backups kept only
/// by the window are absent; an ancestor has at least the date of each backup built on it. A
/// date past chrono's range is `i64::MAX`.
pub fn keep_until(backups: &[BackupPoint], policy: &Policy, now_us: i64) -> BTreeMap<String, i64> {
    let order = by_start(backups);
    let mut until: BTreeMap<String, i64> = BTreeMap::new();
    for pick in gfs_picks(&order, policy) {
        // Counted from the current bucket, or the backup's own if it is later (a clock behind).
        let from = now_us.max(pick.backup.start_time_us);
        let date = bucket_start_after(pick.rule, from, pick.count - pick.rank + 1).unwrap_or(i64::MAX);
        let e = until.entry(pick.backup.id.clone()).or_insert(date);
        *e = (*e).max(date);
    }
    let by_id: BTreeMap<&str, &BackupPoint> = backups.iter().map(|b| (b.id.as_str(), b)).collect();
    let dated: Vec<(String, i64)> = until.iter().map(|(id, d)| (id.clone(), *d)).collect();
    for (id, date) in dated {
        let mut at = by_id.get(id.as_str()).and_then(|b| b.parent.as_deref());
        let mut steps = 0;
        while let Some(parent) = at {
            if !by_id.contains_key(parent) || steps > backups.len() {
                break;
            }
            let e = until.entry(parent.to_string()).or_insert(date);
            *e = (*e).max(date);
            at = by_id.get(parent).and_then(|b| b.parent.as_deref());
            steps += 1;
        }
    }
    until
}

/// The GFS selection and the window (see the module documentation). `latest_timeline` is the
/// newest timeline in the archive; `running_since` the start of the oldest running backup.
pub fn select(
    backups: &[BackupPoint],
    policy: &Policy,
    now_us: i64,
    timelines: &Timelines,
    latest_timeline: u32,
    running_since: Option<i64>,
) -> Selection {
    let order = by_start(backups);
    let mut kept: BTreeMap<String, BTreeSet<Reason>> = BTreeMap::new();
    for pick in gfs_picks(&order, policy) {
        kept.entry(pick.backup.id.clone()).or_default().insert(pick.reason);
    }

    let mut window_start_us = now_us.saturating_sub(policy.window_us);
    if let Some(r) = running_since {
        window_start_us = window_start_us.min(r);
    }
    let candidates: Vec<&BackupPoint> =
        order.iter().copied().filter(|b| timelines.on_path(latest_timeline, b) == Some(true)).collect();
    let by_stop = |a: &&BackupPoint, b: &&BackupPoint| (a.stop_time_us, &a.id).cmp(&(b.stop_time_us, &b.id));
    let base = candidates
        .iter()
        .copied()
        .filter(|b| b.stop_time_us <= window_start_us)
        .max_by(by_stop)
        .or_else(|| candidates.iter().copied().min_by(by_stop));
    match base {
        Some(base) => {
            kept.entry(base.id.clone()).or_default().insert(Reason::WindowBase);
            for b in &order {
                if (b.stop_time_us, &b.id) > (base.stop_time_us, &base.id) {
                    kept.entry(b.id.clone()).or_default().insert(Reason::Window);
                }
            }
        }
        // Nothing a restore on the newest timeline can start from: the window cannot be placed,
        // so nothing goes.
        None => {
            for b in &order {
                kept.entry(b.id.clone()).or_default().insert(Reason::Window);
            }
        }
    }

    let by_id: BTreeMap<&str, &BackupPoint> = backups.iter().map(|b| (b.id.as_str(), b)).collect();
    let roots: Vec<String> = kept.keys().cloned().collect();
    for id in roots {
        let mut at = by_id.get(id.as_str()).and_then(|b| b.parent.as_deref());
        let mut steps = 0;
        while let Some(parent) = at {
            if !by_id.contains_key(parent) || steps > backups.len() {
                break;
            }
            kept.entry(parent.to_string()).or_default().insert(Reason::Ancestor);
            at = by_id.get(parent).and_then(|b| b.parent.as_deref());
            steps += 1;
        }
    }

    let depth = |b: &BackupPoint| {
        let mut d = 0;
        let mut at = b.parent.as_deref();
        while let Some(p) = at {
            d += 1;
            if d > backups.len() {
                break;
            }
            at = by_id.get(p).and_then(|b| b.parent.as_deref());
        }
        d
    };
    let mut expired: Vec<&BackupPoint> = order.iter().copied().filter(|b| !kept.contains_key(&b.id)).collect();
    expired.sort_by(|a, b| (depth(b), b.start_time_us, &b.id).cmp(&(depth(a), a.start_time_us, &a.id)));
    Selection {
        kept,
        expired: expired.into_iter().map(|b| b.id.clone()).collect(),
        window_base: base.map(|b| b.id.clone()),
        window_start_us,
        latest_timeline,
    }
}

/// Keeps the backups in `pinned` (ids of backups pinned now) that exist among `backups`, each
/// with reason [`Reason::Pinned`] and its chain with [`Reason::Ancestor`], and takes them out of
/// `selection.expired`. An id without a backup is ignored (its manifest is gone).
pub fn keep_pinned(selection: &mut Selection, backups: &[BackupPoint], pinned: &BTreeSet<String>) {
    let by_id: BTreeMap<&str, &BackupPoint> = backups.iter().map(|b| (b.id.as_str(), b)).collect();
    for id in pinned {
        let Some(b) = by_id.get(id.as_str()) else { continue };
        selection.kept.entry(b.id.clone()).or_default().insert(Reason::Pinned);
        let mut at = b.parent.as_deref();
        let mut steps = 0;
        while let Some(parent) = at {
            if !by_id.contains_key(parent) || steps > backups.len() {
                break;
            }
            selection.kept.entry(parent.to_string()).or_default().insert(Reason::Ancestor);
            at = by_id.get(parent).and_then(|b| b.parent.as_deref());
            steps += 1;
        }
    }
    let kept = &selection.kept;
    selection.expired.retain(|id| !kept.contains_key(id));
}

/// Until when Object Lock must retain what each pinned backup needs: `dates` gives each pinned
/// backup's date (µs), and every ancestor in `backups` gets the latest date of what is built on
/// it.
pub fn pin_dates(backups: &[BackupPoint], dates: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    let by_id: BTreeMap<&str, &BackupPoint> = backups.iter().map(|b| (b.id.as_str(), b)).collect();
    let mut out: BTreeMap<String, i64> = BTreeMap::new();
    for (id, &date) in dates {
        let mut at = by_id.get(id.as_str()).map(|b| b.id.as_str());
        let mut steps = 0;
        while let Some(this) = at {
            if steps > backups.len() {
                break;
            }
            let e = out.entry(this.to_string()).or_insert(date);
            *e = (*e).max(date);
            at = by_id.get(this).and_then(|b| b.parent.as_deref()).filter(|p| by_id.contains_key(p));
            steps += 1;
        }
    }
    out
}

/// Which WAL segments go, and the floors to record before they do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalPlan {
    /// (timeline, segment number), ascending.
    pub delete: Vec<(u32, u64)>,
    /// Floors to write first: timeline → segment number (`u64::MAX`: the whole timeline is
    /// retention's). Only floors above what is recorded already.
    pub floors: BTreeMap<u32, u64>,
    /// Why no WAL goes, when none may.
    pub skipped: Option<String>,
}

/// The WAL plan for the backups that stay (`kept`, which holds `base`).
pub fn plan_wal(
    wal: &WalCatalog,
    kept: &[&BackupPoint],
    base: Option<&BackupPoint>,
    timelines: &Timelines,
    recorded_floors: &BTreeMap<u32, u64>,
) -> WalPlan {
    let skip = |why: String| WalPlan { skipped: Some(why), ..Default::default() };
    let Some(base) = base else {
        return skip("there is no backup to keep WAL for: all WAL is kept".into());
    };
    let with_wal: BTreeSet<u32> = wal.segments.keys().map(|(t, _)| *t).collect();
    if let Some(why) = timelines.incomplete(with_wal.iter().copied()) {
        return skip(format!("{why}: all WAL is kept"));
    }
    let layout = wal.layout;
    let base_seg = layout.segno_of(base.start_lsn);
    let mut plan = WalPlan::default();
    for &t in &with_wal {
        let window_from = timelines.descends(t, base.timeline).then_some(base_seg);
        let ranges: Vec<(u64, u64)> = kept
            .iter()
            .filter(|b| b.timeline == t)
            .map(|b| (layout.segno_of(b.start_lsn), layout.segno_of(b.stop_lsn)))
            .collect();
        let mut deleted_any = false;
        for (&(_, segno), _) in wal.segments.range((t, 0)..=(t, u64::MAX)) {
            let keep = window_from.is_some_and(|from| segno >= from)
                || ranges.iter().any(|&(from, to)| (from..=to).contains(&segno));
            if !keep {
                plan.delete.push((t, segno));
                deleted_any = true;
            }
        }
        let floor = window_from.unwrap_or(u64::MAX);
        if deleted_any && recorded_floors.get(&t).is_none_or(|&f| f < floor) {
            plan.floors.insert(t, floor);
        }
    }
    plan
}

/// Takes out of `plan` the WAL that running restores and drills read: each `(timeline, segno)`
/// keeps that segment and every later one, on `timeline` and on every timeline descending from it
/// (see [`crate::running`]). A floor is written only for a timeline that still loses segments.
pub fn keep_wal_from(plan: &mut WalPlan, timelines: &Timelines, from: &[(u32, u64)]) {
    if from.is_empty() {
        return;
    }
    plan.delete.retain(|&(t, segno)| !from.iter().any(|&(ft, fs)| segno >= fs && timelines.descends(t, ft)));
    let losing: BTreeSet<u32> = plan.delete.iter().map(|(t, _)| *t).collect();
    plan.floors.retain(|t, _| losing.contains(t));
}

/// The objects holding the segments of `plan`: whole segments and any chunks.
pub fn wal_objects(wal: &WalCatalog, delete: &[(u32, u64)]) -> Vec<String> {
    let mut out = Vec::new();
    for &(timeline, segno) in delete {
        let Some(entry) = wal.segments.get(&(timeline, segno)) else { continue };
        if entry.whole {
            out.push(wal.layout.object_name(&WalObject::Segment { timeline, segno }));
        }
        for &(from, to) in &entry.chunks {
            out.push(wal.layout.object_name(&WalObject::Chunk { timeline, segno, from, to }));
        }
    }
    out
}

/// Blocks under `pg/<id>/blocks/` (names as listed) that no manifest in `kept` references.
pub fn unreferenced_blocks<'a>(
    system_id: u64,
    present: impl IntoIterator<Item = &'a str>,
    kept: &[&BackupManifest],
) -> Vec<String> {
    let referenced: BTreeSet<String> = kept
        .iter()
        .flat_map(|m| m.files.iter().flat_map(|f| f.blocks.iter()))
        .map(|id| names::pg::block(system_id, id))
        .collect();
    present.into_iter().filter(|n| !referenced.contains(*n)).map(str::to_string).collect()
}

/// The recorded floor of each timeline (the highest, if several), from object names (floors are
/// named by [`names::pg::floor`], listed under [`names::pg::floors_prefix`]).
pub fn floors_from_names<'a>(system_id: u64, objects: impl IntoIterator<Item = &'a str>) -> BTreeMap<u32, u64> {
    let mut out: BTreeMap<u32, u64> = BTreeMap::new();
    for name in objects {
        let Some((t, s)) = names::pg::parse_floor(system_id, name) else { continue };
        let e = out.entry(t).or_insert(s);
        *e = (*e).max(s);
    }
    out
}

/// The record of the floor of `timeline` at `segno`, as `pitr expire` seals it.
pub fn floor_record(timeline: u32, segno: u64, written_us: i64) -> String {
    format!("timeline={timeline}\nsegno={segno}\nwritten_us={written_us}\n")
}

/// Where a floor's record disagrees with its name's timeline and segment; `None` when it names
/// both as its name does (every pitr has written both fields).
pub fn floor_record_disagrees(timeline: u32, segno: u64, text: &str) -> Option<String> {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')));
    for (key, want) in [("timeline", timeline.to_string()), ("segno", segno.to_string())] {
        match field(key) {
            Some(found) if found == want => {}
            Some(found) => return Some(format!("its record says {key}={found}, its name {key}={want}")),
            None => return Some(format!("its record has no {key}=")),
        }
    }
    None
}

/// Whether segment `segno` of `timeline` may be missing because retention removed it.
pub fn below_floor(floors: &BTreeMap<u32, u64>, timeline: u32, segno: u64) -> bool {
    floors.get(&timeline).is_some_and(|&f| segno < f)
}

/// Segment names, for reports: consecutive segments of one timeline as one range.
pub fn segment_ranges(layout: WalLayout, segments: &[(u32, u64)]) -> Vec<(u32, String, String, usize)> {
    let mut out: Vec<(u32, u64, u64, usize)> = Vec::new();
    for &(t, s) in segments {
        match out.last_mut() {
            Some((lt, _, last, n)) if *lt == t && *last + 1 == s => {
                *last = s;
                *n += 1;
            }
            _ => out.push((t, s, s, 1)),
        }
    }
    out.into_iter().map(|(t, a, b, n)| (t, layout.segment_file_name(t, a), layout.segment_file_name(t, b), n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;
    // 2026-01-05 00:00:00 UTC, a Monday.
    const MONDAY: i64 = 1_767_571_200_000_000;

    fn point(id: &str, day: i64, parent: Option<&str>) -> BackupPoint {
        let start = MONDAY + day * DAY + 7_200_000_000;
        BackupPoint {
            id: id.into(),
            parent: parent.map(str::to_string),
            timeline: 1,
            start_lsn: (day as u64 + 10) << 24,
            stop_lsn: ((day as u64 + 10) << 24) + 100,
            start_time_us: start,
            stop_time_us: start + 60_000_000,
        }
    }

    fn reasons(s: &Selection, id: &str) -> Vec<Reason> {
        s.kept.get(id).map(|r| r.iter().copied().collect()).unwrap_or_default()
    }

    #[test]
    fn newest_of_each_bucket_skipping_empty_days() {
        // Days 0, 1, 3 (a gap on day 2), two backups on day 3.
        let b = vec![point("a", 0, None), point("b", 1, None), point("c", 3, None), point("d", 3, None)];
        let policy = Policy { daily: 2, weekly: 0, monthly: 0, yearly: 0, window_us: 0 };
        let now = MONDAY + 4 * DAY;
        let s = select(&b, &policy, now, &Timelines::default(), 1, None);
        // d: newest of day 3 (and the window base: window 0); b: newest of day 1 (day 2 has none).
        assert_eq!(reasons(&s, "d"), vec![Reason::Daily, Reason::WindowBase]);
        assert_eq!(reasons(&s, "b"), vec![Reason::Daily]);
        assert_eq!(s.expired, vec!["c".to_string(), "a".to_string()]);
        // ISO week: days 0..=6 are one week; day 7 the next.
        let b = vec![point("w1", 5, None), point("w1b", 6, None), point("w2", 7, None)];
        let policy = Policy { daily: 0, weekly: 5, monthly: 0, yearly: 0, window_us: 0 };
        let s = select(&b, &policy, MONDAY + 8 * DAY, &Timelines::default(), 1, None);
        assert_eq!(reasons(&s, "w1b"), vec![Reason::Weekly]);
        assert_eq!(s.expired, vec!["w1".to_string()]);
    }

    #[test]
    fn window_keeps_the_base_and_after_and_chains_are_whole() {
        let b = vec![
            point("f0", 0, None),
            point("f1", 1, None),
            point("i1", 2, Some("f1")),
            point("i2", 3, Some("i1")),
            point("f4", 4, None),
        ];
        let policy = Policy { daily: 0, weekly: 0, monthly: 0, yearly: 0, window_us: 2 * DAY };
        // cut = day 5 − 2 days = day 3 00:00: the newest stopped by then is i1 (day 2).
        let s = select(&b, &policy, MONDAY + 5 * DAY, &Timelines::default(), 1, None);
        assert_eq!(s.window_base.as_deref(), Some("i1"));
        assert_eq!(reasons(&s, "i1"), vec![Reason::WindowBase, Reason::Ancestor]);
        assert_eq!(reasons(&s, "i2"), vec![Reason::Window]);
        assert_eq!(reasons(&s, "f1"), vec![Reason::Ancestor]);
        assert_eq!(s.expired, vec!["f0".to_string()]);
        // A running backup that started on day 1 moves the cut back to then: f0 is the base.
        let s = select(&b, &policy, MONDAY + 5 * DAY, &Timelines::default(), 1, Some(MONDAY + DAY));
        assert_eq!(s.window_base.as_deref(), Some("f0"));
        assert!(s.expired.is_empty());
        // Before any backup has stopped by the cut, the oldest is the base and nothing goes.
        let s = select(&b, &policy, MONDAY, &Timelines::default(), 1, None);
        assert_eq!(s.window_base.as_deref(), Some("f0"));
        assert!(s.expired.is_empty());
        // Children go before their parents.
        let policy = Policy { window_us: 0, ..policy };
        let b =
            vec![point("f0", 0, None), point("i0", 0, Some("f0")), point("j0", 0, Some("i0")), point("f9", 9, None)];
        let s = select(&b, &policy, MONDAY + 10 * DAY, &Timelines::default(), 1, None);
        assert_eq!(s.expired, vec!["j0".to_string(), "i0".to_string(), "f0".to_string()]);
    }

    #[test]
    fn the_window_base_is_on_the_newest_timelines_history() {
        let mut t = Timelines::default();
        // Timeline 2 left timeline 1 at 0/B000000 (day 1's segment).
        t.add_history(2, "1\t0/B000000\tno recovery target specified\n");
        let mut on2 = point("on2", 3, None);
        on2.timeline = 2;
        // A backup on timeline 1 after the switch (the old primary kept running): not a start
        // for timeline 2.
        let mut stray = point("stray", 2, None);
        stray.timeline = 1;
        let b = vec![point("a", 0, None), stray, on2];
        let policy = Policy { daily: 0, weekly: 0, monthly: 0, yearly: 0, window_us: DAY };
        let s = select(&b, &policy, MONDAY + 3 * DAY + 7_200_000_000, &t, 2, None);
        assert_eq!(s.window_base.as_deref(), Some("a"));
        // The stray one stopped after the base: kept by the window all the same.
        assert!(s.kept.contains_key("stray"));
    }

    /// Segments 8..20 of timeline 1 and 14..22 of timeline 2, which forked at 0/E000000.
    fn two_timelines() -> (WalCatalog, Timelines) {
        let layout = WalLayout { system_id: 7, segment_size: 16 << 20 };
        let names: Vec<String> = (8..20u64)
            .map(|s| layout.object_name(&WalObject::Segment { timeline: 1, segno: s }))
            .chain((14..22u64).map(|s| layout.object_name(&WalObject::Segment { timeline: 2, segno: s })))
            .chain([layout.object_name(&WalObject::History { timeline: 2 })])
            .collect();
        let wal = WalCatalog::from_names(layout, names.iter().map(|s| s.as_str()));
        let mut t = Timelines::default();
        t.add_history(2, "1\t0/E000000\tx\n");
        (wal, t)
    }

    #[test]
    fn wal_keeps_backup_ranges_and_the_window_and_writes_floors() {
        let (wal, t) = two_timelines();
        let old = point("old", 0, None); // segments 10..=10
        let base = point("base", 2, None); // segment 12 on timeline 1
        let plan = plan_wal(&wal, &[&old, &base], Some(&base), &t, &BTreeMap::new());
        let want: Vec<(u32, u64)> = vec![(1, 8), (1, 9), (1, 11)];
        assert_eq!(plan.delete, want);
        assert_eq!(plan.floors, BTreeMap::from([(1, 12)]));
        // Base on timeline 2: timeline 1 is no longer the window's, only the old range stays.
        let mut base2 = point("base2", 6, None);
        base2.timeline = 2;
        let plan = plan_wal(&wal, &[&old, &base2], Some(&base2), &t, &BTreeMap::new());
        assert!(plan.delete.contains(&(1, 19)) && !plan.delete.contains(&(1, 10)));
        assert_eq!(plan.delete.iter().filter(|(t, _)| *t == 2).count(), 2, "{:?}", plan.delete);
        assert_eq!(plan.floors, BTreeMap::from([(1, u64::MAX), (2, 16)]));
        // Recorded floors are not written again.
        let plan = plan_wal(&wal, &[&old, &base2], Some(&base2), &t, &BTreeMap::from([(1, u64::MAX), (2, 16)]));
        assert!(plan.floors.is_empty() && !plan.delete.is_empty());
        // Without timeline 2's history nothing goes.
        let plan = plan_wal(&wal, &[&old, &base2], Some(&base2), &Timelines::default(), &BTreeMap::new());
        assert!(plan.delete.is_empty() && plan.skipped.unwrap().contains("timeline 2"));
    }

    #[test]
    fn an_unparseable_history_keeps_all_wal() {
        let (wal, _) = two_timelines();
        let mut t = Timelines::default();
        t.add_history(2, "1 0/5\n2\n");
        let mut base2 = point("base2", 6, None);
        base2.timeline = 2;
        let plan = plan_wal(&wal, &[&base2], Some(&base2), &t, &BTreeMap::new());
        assert!(plan.delete.is_empty());
        assert_eq!(
            plan.skipped.as_deref(),
            Some(
                "the history file of timeline 2 cannot be read (line 2: expected `<timeline> <X/Y> <reason>`): \
                 all WAL is kept"
            )
        );
    }

    #[test]
    fn running_readers_keep_their_wal_on_descending_timelines() {
        let (wal, t) = two_timelines();
        let old = point("old", 0, None);
        let mut base2 = point("base2", 6, None);
        base2.timeline = 2;
        let full = plan_wal(&wal, &[&old, &base2], Some(&base2), &t, &BTreeMap::new());
        assert!(full.delete.contains(&(1, 9)) && full.delete.contains(&(1, 11)) && full.delete.contains(&(2, 14)));

        // Nothing running: nothing changes.
        let mut plan = full.clone();
        keep_wal_from(&mut plan, &t, &[]);
        assert_eq!(plan, full);
        // A restore replaying from segment 11 of timeline 1 keeps 11.. there and on timeline 2,
        // which descends from 1; 8 and 9 still go, with timeline 1's floor.
        let mut plan = full.clone();
        keep_wal_from(&mut plan, &t, &[(1, 11)]);
        assert_eq!(plan.delete, vec![(1, 8), (1, 9)]);
        assert_eq!(plan.floors, BTreeMap::from([(1, u64::MAX)]));
        // One from timeline 2 does not keep timeline 1 (not a descendant).
        let mut plan = full.clone();
        keep_wal_from(&mut plan, &t, &[(2, 15)]);
        assert!(plan.delete.contains(&(1, 11)) && plan.delete.contains(&(2, 14)) && !plan.delete.contains(&(2, 15)));
        // Everything kept: no floor is written.
        let mut plan = full.clone();
        keep_wal_from(&mut plan, &t, &[(1, 0)]);
        assert!(plan.delete.is_empty() && plan.floors.is_empty());
    }

    #[test]
    fn keep_until_is_the_last_bucket_a_rule_can_keep_a_backup_in() {
        let utc = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap().and_hms_opt(0, 0, 0).unwrap().and_utc();
        let us = |y, m, d| utc(y, m, d).timestamp_micros();
        let only = |daily, weekly, monthly, yearly| Policy { daily, weekly, monthly, yearly, window_us: 0 };
        // A regular daily schedule: the backup of day D is kept by `daily = 3` until day D + 3.
        let b: Vec<BackupPoint> = (0..10).map(|d| point(&format!("d{d}"), d, None)).collect();
        let until = keep_until(&b, &only(3, 0, 0, 0), MONDAY + 9 * DAY + DAY / 2);
        let want: BTreeMap<String, i64> =
            [("d7", MONDAY + 10 * DAY), ("d8", MONDAY + 11 * DAY), ("d9", MONDAY + 12 * DAY)]
                .into_iter()
                .map(|(id, d)| (id.to_string(), d))
                .collect();
        assert_eq!(until, want);
        // Days without a backup: day 0 is still the third newest day with one on day 9, so it
        // stays until day 10 at least (not day 0 + 3), and a later run would move that on.
        let b = vec![point("a", 0, None), point("b", 5, None), point("c", 9, None)];
        let until = keep_until(&b, &only(3, 0, 0, 0), MONDAY + 9 * DAY + DAY / 2);
        assert_eq!(until["a"], MONDAY + 10 * DAY);
        assert_eq!(until["b"], MONDAY + 11 * DAY);
        // Weeks (ISO, from Monday), months and years, each from the start of its bucket; a
        // backup kept by several rules gets the latest.
        let wed = vec![point("w", 2, None)]; // Wednesday 2026-01-07
        let now = MONDAY + 2 * DAY + DAY / 2;
        assert_eq!(keep_until(&wed, &only(0, 12, 0, 0), now)["w"], us(2026, 3, 30));
        assert_eq!(keep_until(&wed, &only(0, 0, 12, 0), now)["w"], us(2027, 1, 1));
        assert_eq!(keep_until(&wed, &only(0, 0, 0, 7), now)["w"], us(2033, 1, 1));
        assert_eq!(keep_until(&wed, &Policy::default(), now)["w"], us(2033, 1, 1));
        // The backup's bucket is behind the current one: counted from now (rank 1 of `monthly =
        // 2` in January, looked at in March: kept until May).
        assert_eq!(keep_until(&wed, &only(0, 0, 2, 0), us(2026, 3, 10))["w"], us(2026, 5, 1));
        // Ancestors take the date of what is built on them; the window gives none.
        let b = vec![point("f", 0, None), point("i", 1, Some("f")), point("old", -40, None)];
        let policy = Policy { window_us: 60 * DAY, ..only(0, 0, 0, 1) };
        let s = select(&b, &policy, MONDAY + 2 * DAY, &Timelines::default(), 1, None);
        assert!(s.kept.contains_key("old"), "{s:?}");
        let until = keep_until(&b, &policy, MONDAY + 2 * DAY);
        assert_eq!(until.get("i"), Some(&us(2027, 1, 1)));
        assert_eq!(until.get("f"), Some(&us(2027, 1, 1)));
        // "old" (2025) is the newest of its year, but `yearly = 1` keeps only 2026's.
        assert_eq!(until.get("old"), None);
        // A count too large for the calendar: no finite date.
        assert_eq!(keep_until(&wed, &only(0, 0, 0, u32::MAX), now)["w"], i64::MAX);
    }

    #[test]
    fn pins_keep_their_backup_and_chain_until_their_date() {
        // Keep the last backup only; f0 ← i0 ← j0 is an old chain, f9 the newest.
        let b =
            vec![point("f0", 0, None), point("i0", 1, Some("f0")), point("j0", 2, Some("i0")), point("f9", 9, None)];
        let policy = Policy { daily: 1, weekly: 0, monthly: 0, yearly: 0, window_us: 0 };
        let now = MONDAY + 10 * DAY;
        let unpinned = select(&b, &policy, now, &Timelines::default(), 1, None);
        assert_eq!(unpinned.expired, vec!["j0".to_string(), "i0".to_string(), "f0".to_string()]);

        // j0 pinned: kept with its whole chain, and nothing else changes.
        let mut s = unpinned.clone();
        keep_pinned(&mut s, &b, &BTreeSet::from(["j0".to_string()]));
        assert_eq!(reasons(&s, "j0"), vec![Reason::Pinned]);
        assert_eq!(reasons(&s, "i0"), vec![Reason::Ancestor]);
        assert_eq!(reasons(&s, "f0"), vec![Reason::Ancestor]);
        assert_eq!(reasons(&s, "f9"), vec![Reason::Daily, Reason::WindowBase]);
        assert!(s.expired.is_empty(), "{s:?}");
        // Its WAL: kept backups' start..stop ranges stay (segments 10..=12 here).
        let layout = WalLayout { system_id: 7, segment_size: 16 << 20 };
        let names: Vec<String> =
            (8..20u64).map(|s| layout.object_name(&WalObject::Segment { timeline: 1, segno: s })).collect();
        let wal = WalCatalog::from_names(layout, names.iter().map(|s| s.as_str()));
        let kept: Vec<&BackupPoint> = b.iter().filter(|p| s.kept.contains_key(&p.id)).collect();
        let plan = plan_wal(&wal, &kept, b.iter().find(|p| p.id == "f9"), &Timelines::default(), &BTreeMap::new());
        assert_eq!(plan.delete, vec![(1, 8), (1, 9), (1, 13), (1, 14), (1, 15), (1, 16), (1, 17), (1, 18)]);

        // A pin of the middle keeps its ancestors only; the child goes (children first).
        let mut s = unpinned.clone();
        keep_pinned(&mut s, &b, &BTreeSet::from(["i0".to_string(), "gone".to_string()]));
        assert_eq!(s.expired, vec!["j0".to_string()]);
        assert!(!s.kept.contains_key("gone"));

        // A pin until a date: pinned before it, an ordinary backup from it on (the caller passes
        // the pins in force at its clock; crate::pins::PinRecord::active is that rule).
        let until = now + DAY;
        for (clock, pinned) in [(now, true), (until - 1, true), (until, false), (until + DAY, false)] {
            let pins = crate::pins::PinRecord {
                backup: "f0".into(),
                seq: 0,
                pin: Some(crate::pins::Pin::Until(until)),
                note: None,
                written_us: now,
                host: "h".into(),
            };
            let active: BTreeSet<String> = pins.active(clock).map(|_| "f0".to_string()).into_iter().collect();
            let mut s = select(&b, &policy, clock, &Timelines::default(), 1, None);
            keep_pinned(&mut s, &b, &active);
            assert_eq!(s.kept.contains_key("f0"), pinned, "at {clock}");
            assert_eq!(s.expired.contains(&"f0".to_string()), !pinned, "at {clock}");
        }

        // Object Lock dates: the pin's, passed on to ancestors (the latest wins).
        let dates = pin_dates(&b, &BTreeMap::from([("j0".to_string(), 50), ("i0".to_string(), 70)]));
        assert_eq!(dates, BTreeMap::from([("f0".into(), 70), ("i0".into(), 70), ("j0".into(), 50)]));
        assert!(pin_dates(&b, &BTreeMap::from([("gone".to_string(), 5)])).is_empty());
    }

    #[test]
    fn floor_names_round_trip_and_the_highest_wins() {
        let floor = |t, s| names::pg::floor(7, t, s);
        let objects = [floor(1, 12), floor(1, 30), floor(2, u64::MAX), "pg/7/retention/x".into()];
        let floors = floors_from_names(7, objects.iter().map(|s| s.as_str()));
        assert_eq!(floors, BTreeMap::from([(1, 30), (2, u64::MAX)]));
        assert!(below_floor(&floors, 1, 29) && !below_floor(&floors, 1, 30) && !below_floor(&floors, 3, 0));
    }

    #[test]
    fn a_floor_record_must_name_its_timeline_and_segment() {
        assert_eq!(floor_record_disagrees(2, 0x1F, &floor_record(2, 0x1F, 5)), None);
        assert_eq!(
            floor_record_disagrees(2, u64::MAX, &floor_record(2, 0x1F, 5)).as_deref(),
            Some(format!("its record says segno=31, its name segno={}", u64::MAX).as_str())
        );
        assert!(floor_record_disagrees(3, 0x1F, &floor_record(2, 0x1F, 5)).unwrap().contains("timeline"));
        assert_eq!(floor_record_disagrees(2, 0x1F, "").as_deref(), Some("its record has no timeline="));
    }
}
