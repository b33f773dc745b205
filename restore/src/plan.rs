//! What can be restored: the restorable ranges per timeline (gaps included), and the backup to
//! start from for a target, checked before anything is written.
//!
//! A moment is restorable when some backup that is consistent before it has every WAL segment
//! from its start up to that moment. Retention keeps old backups (weekly, monthly, yearly) with
//! only their own WAL, and a lost object leaves a hole, so what can be restored is a set of
//! ranges, not "oldest backup to newest WAL". Each range ends at the last commit before its
//! end; the newest one ends at the later of the newest archived commit and the newest
//! completeness mark (the moment up to which the archive is known to hold everything).

use std::collections::BTreeMap;

use pitr_archive::backup::{BackupManifest, DamagedManifest};
use pitr_archive::complete::{self, CompleteMark};
use pitr_archive::restore_points::{self, IndexProblem, RestorePoint};
use pitr_archive::{ClusterInfo, HistoryProblem, Repository, RepositoryError, WalCatalog, WalLayout, WalObject};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgformat::timeline::HistoryEntry;

use crate::continuity::{self, Hole, Reach, TimelinePath};
use crate::target::{format_time, RecoveryTarget, RestorePointName};
use crate::RestoreError;

/// One stretch of time (and WAL) that can be restored to exactly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Range {
    /// The earliest moment: the consistency point (stop time) of the oldest backup it starts
    /// from.
    pub start_us: i64,
    /// That backup's stop LSN: recovery is consistent from here.
    pub start_lsn: u64,
    /// The last moment known exactly: the last archived commit before `end_lsn`, or for the
    /// newest range a later completeness mark.
    pub end_us: Option<i64>,
    /// How far WAL is held without a break from the range's backups.
    pub end_lsn: u64,
}

/// The recoverable window of one timeline (as the newest one a restore follows).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    /// The timeline (the newest a restore within this window follows).
    pub timeline: u32,
    /// The first range's start: the consistency point of the oldest usable backup.
    pub start_us: Option<i64>,
    /// That backup's stop LSN.
    pub start_lsn: Option<u64>,
    /// The newest range's end: the later of the newest archived commit and the newest
    /// completeness mark.
    pub end_us: Option<i64>,
    /// The newest archived WAL on the timeline's path.
    pub end_lsn: u64,
    /// The newest commit archived on this timeline.
    pub newest_commit_us: Option<i64>,
    /// Up to when the sidecar recorded that the archive held everything the primary had.
    pub complete_up_to_us: Option<i64>,
    /// A completeness mark that vouches for WAL the archive no longer holds: its end was lost
    /// (a deleted or never-copied tail), which no listing alone could tell from the end.
    #[serde(skip)]
    pub lost_tail: Option<CompleteMark>,
    /// The restorable ranges, oldest first; more than one means gaps between them.
    pub ranges: Vec<Range>,
}

/// How far one backup can be recovered along the current timeline's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReach {
    /// How far its WAL is held without a break from its start LSN, and the hole that stops it.
    pub reach: Reach,
    /// The last moment known exactly from this backup (see [`Range::end_us`]).
    pub end_us: Option<i64>,
}

/// A restore point of the index ([`pitr_archive::restore_points`]), and whether a restore can
/// stop there now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IndexedRestorePoint {
    /// The restore point.
    #[serde(flatten)]
    pub point: RestorePoint,
    /// Why `--to name:` cannot stop there now (`None`: it can): its WAL is not (or no longer)
    /// all in the archive, it lies off the newest timeline's path, or no backup is consistent
    /// before it.
    pub unavailable: Option<String>,
}

/// A repository that could not be listed while looking for WAL the primary lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlisted {
    /// The fallback repository's configured name.
    pub name: String,
    /// Why listing it failed.
    pub error: String,
}

/// What the repository holds for one PostgreSQL cluster, and what it can restore: the basis of
/// every restore, drill and `pitr status` window.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// The cluster (system identifier, WAL segment size…).
    pub cluster: ClusterInfo,
    /// What this repository holds, plus what its fallbacks hold where it has holes.
    pub wal: WalCatalog,
    /// The cluster's backup manifests.
    pub backups: Vec<BackupManifest>,
    /// One window per timeline that has WAL, oldest timeline first.
    pub windows: Vec<Window>,
    /// The history of each timeline that has one, parsed.
    pub histories: BTreeMap<u32, Vec<HistoryEntry>>,
    /// Per backup id, how far it recovers on the newest timeline's path.
    pub reaches: BTreeMap<String, BackupReach>,
    /// WAL objects found only in a fallback repository: (object name, repository name).
    pub from_fallbacks: BTreeMap<String, String>,
    /// Fallback repositories that could not be listed.
    pub unlisted: Vec<Unlisted>,
    /// Manifest names whose objects do not open or are not manifests: left out of `backups`
    /// (logged here; `verify` reports them).
    pub damaged_manifests: Vec<DamagedManifest>,
    /// Every restore point the index holds, in WAL order (timeline, then LSN); empty until
    /// [`Catalog::load_restore_points`] reads the index.
    pub restore_points: Vec<IndexedRestorePoint>,
    /// Why the index of restore points may be incomplete (entries that could not be read, a
    /// failed listing): empty when it is complete. A restore to a name refuses while one of them
    /// could hide an earlier restore point of that name.
    pub restore_point_problems: Vec<IndexProblem>,
    /// Whether the index was read: it costs one GET per entry, and entries accumulate, so only
    /// the readers that need it (list, `--to name:`, mark) read it.
    restore_points_read: bool,
    /// Whether the fallbacks' WAL was listed: their index entries are then read too.
    fallbacks_listed: bool,
}

impl Catalog {
    /// Lists the cluster's WAL and backups (and, where this repository has holes or lost its
    /// tail, its fallbacks' WAL), reads histories and completeness marks, and works out every
    /// timeline's window.
    pub async fn load(repo: &Repository, cluster: ClusterInfo) -> Result<Catalog, RepositoryError> {
        let layout = WalLayout::new(&cluster);
        let mut names: Vec<String> = repo.list(&layout.prefix()).await?.into_iter().map(|o| o.name).collect();
        let mut wal = WalCatalog::from_names(layout, names.iter().map(String::as_str));
        let histories = load_histories(repo, &wal).await?;
        let (backups, damaged_manifests) = BackupManifest::list_sound(repo, cluster.system_id).await?;
        for d in &damaged_manifests {
            tracing::warn!(object = %d.name, why = %d.why, "leaving out a backup manifest that cannot be used");
        }

        // Holes the reads would fill from a secondary are not holes for a restore: take the
        // secondaries' listings into account, and remember which could not be asked.
        let mut from_fallbacks = BTreeMap::new();
        let mut unlisted = Vec::new();
        // The newest completeness mark of each timeline, read before anything else: a mark past
        // the WAL held says the end of the archive was lost.
        let mut marks = BTreeMap::new();
        for &timeline in wal.segments.keys().map(|(t, _)| t).collect::<std::collections::BTreeSet<_>>() {
            if let Some(m) = complete::newest_pg(repo, cluster.system_id, timeline).await? {
                marks.insert(timeline, m);
            }
        }
        let tail_lost = |wal: &WalCatalog| {
            marks.iter().any(|(&t, m)| {
                let path = TimelinePath::new(t, histories.get(&t).map(Vec::as_slice).unwrap_or(&[]));
                continuity::path_end(wal, &path).is_some_and(|end| m.lsn > end)
            })
        };
        let fallbacks_listed = !repo.fallbacks().is_empty() && (has_hole(&wal, &histories) || tail_lost(&wal));
        if fallbacks_listed {
            let own: std::collections::BTreeSet<String> = names.iter().cloned().collect();
            for other in repo.fallbacks() {
                match other.store.list(&layout.prefix()).await {
                    Ok(objects) => {
                        for o in objects {
                            if !own.contains(&o.name) && layout.parse_object_name(&o.name).is_some() {
                                from_fallbacks.entry(o.name.clone()).or_insert_with(|| other.name.clone());
                                names.push(o.name);
                            }
                        }
                    }
                    Err(e) => unlisted.push(Unlisted { name: other.name.clone(), error: e.to_string() }),
                }
            }
            names.sort();
            names.dedup();
            wal = WalCatalog::from_names(layout, names.iter().map(String::as_str));
        }

        let mut windows = Vec::new();
        let mut reaches = BTreeMap::new();
        let timelines: std::collections::BTreeSet<u32> = wal.segments.keys().map(|(t, _)| *t).collect();
        let newest = timelines.iter().max().copied();
        for &timeline in &timelines {
            let path = TimelinePath::new(timeline, histories.get(&timeline).map(Vec::as_slice).unwrap_or(&[]));
            let Some(end_lsn) = continuity::path_end(&wal, &path) else { continue };
            let newest_commit_us = newest_commit_us(repo, &wal, timeline).await?;
            let mark = marks.get(&timeline).copied();
            // A mark proves something only while the archive still holds the WAL it vouches for.
            let complete_up_to_us = mark.filter(|m| m.lsn <= end_lsn).map(|m: CompleteMark| m.server_time_us);
            let lost_tail = mark.filter(|m| m.lsn > end_lsn);
            let newest_end_us = newest_commit_us.max(complete_up_to_us);
            let mut per_backup = BTreeMap::new();
            let mut ranges: Vec<Range> = Vec::new();
            for b in backups.iter().filter(|b| path.contains(b.timeline, b.stop_lsn)) {
                let reach = continuity::reach(&wal, &path, b.start_lsn);
                let end_us = if reach.hole.is_none() {
                    newest_end_us
                } else {
                    last_commit_before(repo, &wal, &path, reach.end_lsn).await?
                };
                per_backup.insert(b.id.clone(), BackupReach { reach, end_us });
                if reach.end_lsn < b.stop_lsn {
                    continue; // its own WAL is not all there: it restores to nothing
                }
                let end_us = end_us.filter(|&e| e >= b.stop_time_us).or(Some(b.stop_time_us));
                ranges.push(Range { start_us: b.stop_time_us, start_lsn: b.stop_lsn, end_us, end_lsn: reach.end_lsn });
            }
            let ranges = merge(ranges);
            if Some(timeline) == newest {
                reaches = per_backup;
            }
            windows.push(Window {
                timeline,
                start_us: ranges.first().map(|r| r.start_us),
                start_lsn: ranges.first().map(|r| r.start_lsn),
                end_us: if ranges.is_empty() { newest_end_us } else { ranges.last().and_then(|r| r.end_us) },
                end_lsn,
                newest_commit_us,
                complete_up_to_us,
                lost_tail,
                ranges,
            });
        }
        Ok(Catalog {
            cluster,
            wal,
            backups,
            windows,
            histories,
            reaches,
            from_fallbacks,
            unlisted,
            damaged_manifests,
            restore_points: Vec::new(),
            restore_point_problems: Vec::new(),
            restore_points_read: false,
            fallbacks_listed,
        })
    }

    /// [`Catalog::load`] and, when `restore_points`, [`Catalog::load_restore_points`].
    pub async fn load_with(
        repo: &Repository,
        cluster: ClusterInfo,
        restore_points: bool,
    ) -> Result<Catalog, RepositoryError> {
        let mut catalog = Catalog::load(repo, cluster).await?;
        if restore_points {
            catalog.load_restore_points(repo).await;
        }
        Ok(catalog)
    }

    /// Whether [`Catalog::load_restore_points`] ran.
    pub fn restore_points_read(&self) -> bool {
        self.restore_points_read
    }

    /// Reads the index of restore points (one GET per entry) and judges each against this
    /// catalog. Never fails: what could not be read is in [`Catalog::restore_point_problems`].
    pub async fn load_restore_points(&mut self, repo: &Repository) {
        // A timeline's first segment repeats its parent's WAL up to the switch point, so a restore
        // point there is streamed (and indexed) once per timeline: one record (the same time to
        // the microsecond), listed once, under the timeline that wrote it (the lower: the index
        // is in timeline order). Two records that only share a place, on timelines that forked
        // before it, differ in time and stay two.
        let index = restore_points::load(repo, self.cluster.system_id, self.fallbacks_listed).await;
        let mut seen = std::collections::BTreeSet::new();
        self.restore_points = index
            .points
            .into_iter()
            .filter(|p| seen.insert((p.lsn, p.end_lsn, p.time_us, p.name.clone())))
            .map(|point| IndexedRestorePoint { point, unavailable: None })
            .collect();
        self.restore_point_problems = index.problems;
        self.restore_points_read = true;
        // Judged with every entry in place: one may be unreachable for an older one of its name.
        let unavailable: Vec<Option<String>> =
            self.restore_points.iter().map(|p| self.restore_point_unavailable(&p.point)).collect();
        for (p, why) in self.restore_points.iter_mut().zip(unavailable) {
            p.unavailable = why;
        }
    }

    /// The index problems that could hide an earlier restore point of a name a restore stops at.
    /// Recovery replays nothing before the start of the backup it starts from, so an entry whose
    /// name places it before every backup's start cannot (it stays listed); a failed listing, or
    /// an entry at or after some backup's start, can.
    fn blocking_index_problems(&self) -> Vec<&IndexProblem> {
        let system_id = self.cluster.system_id;
        self.restore_point_problems
            .iter()
            .filter(|p| match pitr_archive::names::pg::parse_restore_point(system_id, &p.object) {
                Some((_, lsn)) => self.backups.is_empty() || self.backups.iter().any(|b| b.start_lsn <= lsn),
                None => true,
            })
            .collect()
    }

    /// The newest timeline's path (the one restores follow), if the archive holds WAL.
    fn current_path(&self) -> Option<TimelinePath> {
        let w = self.current_window()?;
        Some(TimelinePath::new(w.timeline, self.histories.get(&w.timeline).map(Vec::as_slice).unwrap_or(&[])))
    }

    /// Why a restore cannot stop at `point` now, if it cannot.
    fn restore_point_unavailable(&self, point: &RestorePoint) -> Option<String> {
        let (Some(w), Some(path)) = (self.current_window(), self.current_path()) else {
            return Some("the archive holds no WAL".into());
        };
        if !on_path(&path, point) {
            return Some(format!(
                "timeline {} is not on the path of the newest timeline {}",
                point.timeline, w.timeline
            ));
        }
        if point.end_lsn > w.end_lsn {
            return Some(format!("its WAL (to {}) is not in the archive yet", format_lsn(point.end_lsn)));
        }
        if self.backup_for_point(point).is_none() {
            // What stops the newest backup says the most (an older one only replays more).
            let why = self.backups.iter().rev().find_map(|b| self.backup_reaches_point(b, point).err());
            return Some(why.unwrap_or_else(|| "there is no backup".into()));
        }
        None
    }

    /// The newest backup a restore to `point` can start from: consistent at or before the record,
    /// its WAL archived through the record's end, and no restore point of the same name between
    /// its start and the record (PostgreSQL stops at the first one it replays, from the backup's
    /// start on).
    fn backup_for_point(&self, point: &RestorePoint) -> Option<&BackupManifest> {
        self.backups.iter().rev().find(|b| self.backup_reaches_point(b, point).is_ok())
    }

    /// Whether recovery from `backup` stops at `point`; else why not.
    fn backup_reaches_point(&self, backup: &BackupManifest, point: &RestorePoint) -> Result<(), String> {
        let Some(r) = self.reaches.get(&backup.id) else {
            return Err(format!(
                "backup {} (timeline {}) is not on the newest timeline's path",
                backup.id, backup.timeline
            ));
        };
        if backup.stop_lsn > point.lsn {
            return Err(format!(
                "backup {} is consistent only at {}, after the restore point at {}",
                backup.id,
                format_lsn(backup.stop_lsn),
                format_lsn(point.lsn)
            ));
        }
        if r.reach.end_lsn < point.end_lsn {
            return Err(match r.reach.hole {
                Some(hole) => self.hole_message(backup, &hole, r),
                None => format!("the archive's WAL ends at {}", format_lsn(r.reach.end_lsn)),
            });
        }
        let path = self.current_path();
        let earlier = self.restore_points_named(&point.name).into_iter().find(|p| {
            p.point.lsn >= backup.start_lsn
                && p.point.lsn < point.lsn
                && path.as_ref().is_some_and(|path| on_path(path, &p.point))
        });
        if let Some(e) = earlier {
            return Err(format!(
                "recovery from backup {} would stop at the earlier restore point {:?} at {} first",
                backup.id,
                point.name,
                format_lsn(e.point.lsn)
            ));
        }
        Ok(())
    }

    /// Why `--to name:NAME` is refused while the index is incomplete, naming the entries.
    fn incomplete_index(&self, name: &str, problems: &[&IndexProblem]) -> String {
        const SHOWN: usize = 5;
        let mut shown: Vec<String> = problems.iter().take(SHOWN).map(ToString::to_string).collect();
        if problems.len() > SHOWN {
            shown.push(format!("and {} more (pitr list --json names them all)", problems.len() - SHOWN));
        }
        format!(
            "cannot restore to restore point {name:?}: the index of restore points is incomplete, and an entry \
             it lacks may be an earlier restore point of that name, where recovery would stop first: {}. \
             A failed listing passes when the storage answers again. pitr never writes an entry that does not \
             open, does not match its name or is over {} bytes: such an object is damaged or was put there by \
             someone else; look at it and delete it (the restore point it held, if any, is then no longer \
             indexed). Meanwhile --to lsn:X/Y with a restore point's LSN (pitr list) stops right after it",
            shown.join("; "),
            restore_points::ENTRY_MAX_BYTES
        )
    }

    fn restore_points_named(&self, name: &str) -> Vec<&IndexedRestorePoint> {
        self.restore_points.iter().filter(|p| p.point.name == name).collect()
    }

    /// The restore point `--to name:NAME` stops at: the newest with that name (PostgreSQL allows
    /// several). One a restore cannot stop at now is refused with the reason, never swapped for
    /// an older namesake; an unknown name is refused naming the known ones.
    pub fn restore_point(&self, name: &RestorePointName) -> Result<&IndexedRestorePoint, RestoreError> {
        let name = name.as_str();
        if !self.restore_points_read {
            return Err(RestoreError::OutsideWindow(format!(
                "cannot resolve restore point {name:?}: the index of restore points was not read \
                 (Catalog::load_restore_points)"
            )));
        }
        let blocking = self.blocking_index_problems();
        if !blocking.is_empty() {
            return Err(RestoreError::OutsideWindow(self.incomplete_index(name, &blocking)));
        }
        let named = self.restore_points_named(name);
        let Some(newest) = named.last() else {
            let mut known: Vec<String> = self.restore_points.iter().map(|p| format!("{:?}", p.point.name)).collect();
            known.sort();
            known.dedup();
            return Err(RestoreError::OutsideWindow(if known.is_empty() {
                format!("there is no restore point {name:?}: the archive holds none (create one with `pitr mark NAME`)")
            } else {
                format!("there is no restore point {name:?} (restore points: {})", known.join(", "))
            }));
        };
        let Some(why) = &newest.unavailable else { return Ok(newest) };
        let mut msg = format!(
            "restore point {name:?} at {} (timeline {}) cannot be restored to: {why}",
            format_lsn(newest.point.lsn),
            newest.point.timeline
        );
        if named.len() > 1 {
            let all: Vec<String> = named.iter().map(|p| format_lsn(p.point.lsn)).collect();
            msg.push_str(&format!(
                "; {} restore points have that name (at {}): --to lsn:X/Y stops after the one at X/Y",
                named.len(),
                all.join(", ")
            ));
        }
        Err(RestoreError::OutsideWindow(msg))
    }

    /// `target` as a report states it: a restore point with its LSN, time and timeline, the
    /// consistency point of `backup` for `immediate`, anything else as given.
    pub fn describe_target(&self, target: RecoveryTarget, backup: &BackupManifest) -> String {
        match target {
            RecoveryTarget::Name(n) => match self.restore_point(&n) {
                Ok(p) => format!(
                    "restore point {:?} at {} ({}, timeline {})",
                    p.point.name,
                    format_lsn(p.point.lsn),
                    format_time(p.point.time_us),
                    p.point.timeline
                ),
                Err(_) => target.to_string(),
            },
            RecoveryTarget::Immediate => format!(
                "immediate: the consistency point of backup {} at {} ({})",
                backup.id,
                format_lsn(backup.stop_lsn),
                format_time(backup.stop_time_us)
            ),
            other => other.to_string(),
        }
    }

    /// The newest timeline's window: where restores land (recovery_target_timeline = latest).
    pub fn current_window(&self) -> Option<&Window> {
        self.windows.last()
    }

    fn layout(&self) -> WalLayout {
        self.wal.layout
    }

    fn describe(&self) -> String {
        let Some(w) = self.current_window() else { return "the archive holds no WAL".into() };
        if w.ranges.is_empty() {
            return format!(
                "timeline {} has no restorable range (no backup whose WAL is all in the archive)",
                w.timeline
            );
        }
        let ranges: Vec<String> = w
            .ranges
            .iter()
            .map(|r| {
                format!(
                    "{} .. {}",
                    format_time(r.start_us),
                    r.end_us.map(format_time).unwrap_or_else(|| "(no archived commit)".into())
                )
            })
            .collect();
        let what = if ranges.len() == 1 { "recoverable window" } else { "restorable ranges (with gaps between)" };
        format!("{what} on timeline {}: {}", w.timeline, ranges.join(", "))
    }

    /// Why WAL from `backup` stops at `hole`, for an error: the missing object, the last moment
    /// it restores to exactly, and where a copy might be.
    fn hole_message(&self, backup: &BackupManifest, hole: &Hole, reach: &BackupReach) -> String {
        let layout = self.layout();
        let last_exact = match reach.end_us {
            Some(t) if t >= backup.stop_time_us => format_time(t),
            _ => format!("{} (the backup's own consistency point)", format_time(backup.stop_time_us)),
        };
        let mut msg = format!(
            "{} is missing from the archive, so WAL from backup {} stops at {}; the last moment it restores to \
             exactly is {last_exact}",
            hole.describe(layout),
            backup.id,
            format_lsn(reach.reach.end_lsn),
        );
        for u in &self.unlisted {
            msg.push_str(&format!(
                "; secondary repository {:?} could not be listed ({}): it may hold the segment, retry when it is \
                 reachable (reads fall back to it) or restore with --from {}",
                u.name, u.error, u.name
            ));
        }
        msg
    }

    /// The newest backup a restore to `target` can start from, having checked that every WAL
    /// segment from its start to the target (to the archive's end for `latest` and `xid:`) is
    /// in the archive; or why there is none.
    pub fn choose_backup(&self, target: RecoveryTarget) -> Result<&BackupManifest, RestoreError> {
        if self.backups.is_empty() {
            return Err(RestoreError::OutsideWindow(format!(
                "there is no base backup yet (run `pitr backup`); {}",
                self.describe()
            )));
        }
        let usable: Vec<(&BackupManifest, &BackupReach)> =
            self.backups.iter().filter_map(|b| self.reaches.get(&b.id).map(|r| (b, r))).collect();
        let reaches_end = |r: &BackupReach| r.reach.hole.is_none();
        let chosen = match target {
            RecoveryTarget::Latest | RecoveryTarget::Xid(_)
                if self.current_window().is_some_and(|w| w.lost_tail.is_some()) =>
            {
                return Err(self.lost_tail_error(target));
            }
            RecoveryTarget::Latest | RecoveryTarget::Xid(_) => {
                // Where a transaction committed is only known by reading WAL; the oldest backup
                // whose WAL runs to the end recovers any transaction committed after it.
                let complete: Vec<&BackupManifest> = usable
                    .iter()
                    .filter(|(b, r)| reaches_end(r) && r.reach.end_lsn >= b.stop_lsn)
                    .map(|(b, _)| *b)
                    .collect();
                let pick = if matches!(target, RecoveryTarget::Latest) { complete.last() } else { complete.first() };
                match pick {
                    Some(b) => Some(*b),
                    None => return Err(self.no_complete_chain(target, &usable)),
                }
            }
            RecoveryTarget::Time(t) => {
                let newest_end = self.current_window().and_then(|w| w.end_us);
                let fits = |(b, r): &&(&BackupManifest, &BackupReach)| {
                    b.stop_time_us <= t && r.reach.end_lsn >= b.stop_lsn && r.end_us.is_some_and(|e| t <= e)
                };
                match usable.iter().rev().find(fits) {
                    Some((b, _)) => Some(*b),
                    None => {
                        let why = if self.backups.iter().all(|b| b.stop_time_us > t) {
                            format!("{target} is before the oldest backup's consistency point")
                        } else if newest_end.is_some_and(|e| t > e) {
                            let w = self.current_window();
                            let commit = w.and_then(|w| w.newest_commit_us).map(format_time);
                            let complete = w.and_then(|w| w.complete_up_to_us).map(format_time);
                            format!(
                                "{target} is after the newest archived commit ({}) and after the moment the \
                                 archive is known complete up to ({})",
                                commit.as_deref().unwrap_or("none"),
                                complete.as_deref().unwrap_or("no completeness mark recorded")
                            )
                        } else {
                            self.gap_reason(&usable, |b, r| b.stop_time_us <= t && r.end_us.is_none_or(|e| e < t))
                                .unwrap_or_else(|| format!("{target} falls in a gap of the archive"))
                        };
                        return Err(RestoreError::OutsideWindow(format!("{why}; {}", self.describe())));
                    }
                }
            }
            RecoveryTarget::Name(name) => {
                let point = &self.restore_point(&name)?.point;
                match self.backup_for_point(point) {
                    Some(b) => Some(b),
                    None => {
                        let why: Vec<String> =
                            self.backups.iter().filter_map(|b| self.backup_reaches_point(b, point).err()).collect();
                        return Err(RestoreError::OutsideWindow(format!(
                            "no backup recovers to restore point {:?} at {}: {}",
                            point.name,
                            format_lsn(point.lsn),
                            why.join("; ")
                        )));
                    }
                }
            }
            RecoveryTarget::Immediate => match usable.iter().rev().find(|(b, r)| r.reach.end_lsn >= b.stop_lsn) {
                Some((b, _)) => Some(*b),
                None => return Err(self.no_complete_chain(target, &usable)),
            },
            RecoveryTarget::Lsn(l) => {
                let fits = |(b, r): &&(&BackupManifest, &BackupReach)| b.stop_lsn <= l && l <= r.reach.end_lsn;
                match usable.iter().rev().find(fits) {
                    Some((b, _)) => Some(*b),
                    None => {
                        let end = self.current_window().map(|w| w.end_lsn).unwrap_or(0);
                        let why = if self.backups.iter().all(|b| b.stop_lsn > l) {
                            format!("{target} is before the oldest backup's consistency point")
                        } else if l > end {
                            format!("{target} is past the end of the archived WAL at {}", format_lsn(end))
                        } else {
                            self.gap_reason(&usable, |b, r| b.stop_lsn <= l && r.reach.end_lsn < l)
                                .unwrap_or_else(|| format!("{target} falls in a gap of the archive"))
                        };
                        return Err(RestoreError::OutsideWindow(format!("{why}; {}", self.describe())));
                    }
                }
            }
        };
        chosen.ok_or_else(|| RestoreError::OutsideWindow(format!("{target}: no backup; {}", self.describe())))
    }

    /// The hole that keeps the newest backup matching `before_target` from reaching the target.
    fn gap_reason(
        &self,
        usable: &[(&BackupManifest, &BackupReach)],
        before_target: impl Fn(&BackupManifest, &BackupReach) -> bool,
    ) -> Option<String> {
        let (b, r) = usable.iter().rev().find(|(b, r)| before_target(b, r))?;
        let hole = r.reach.hole?;
        Some(self.hole_message(b, &hole, r))
    }

    fn lost_tail_error(&self, target: RecoveryTarget) -> RestoreError {
        let Some((w, mark)) = self.current_window().and_then(|w| w.lost_tail.map(|m| (w, m))) else {
            return RestoreError::OutsideWindow(format!("{target}: {}", self.describe()));
        };
        let mut msg = format!(
            "{target} cannot be restored exactly: the archive held WAL up to {} on timeline {} at {} \
             (completeness mark {}), but now ends at {}: WAL was lost from its end",
            format_lsn(mark.lsn),
            mark.timeline,
            format_time(mark.server_time_us),
            mark.name(self.cluster.system_id),
            format_lsn(w.end_lsn),
        );
        for u in &self.unlisted {
            msg.push_str(&format!(
                "; secondary repository {:?} could not be listed ({}): it may hold the rest, retry when it is reachable",
                u.name, u.error
            ));
        }
        RestoreError::OutsideWindow(format!(
            "{msg}; restore to a moment within the ranges instead; {}",
            self.describe()
        ))
    }

    fn no_complete_chain(&self, target: RecoveryTarget, usable: &[(&BackupManifest, &BackupReach)]) -> RestoreError {
        let newest = usable.last();
        let detail = match newest.and_then(|(b, r)| r.reach.hole.map(|h| (b, r, h))) {
            Some((b, r, hole)) => self.hole_message(b, &hole, r),
            None => "no backup lies on the newest timeline's path with all of its WAL archived".into(),
        };
        RestoreError::OutsideWindow(format!("{target} cannot be restored exactly: {detail}; {}", self.describe()))
    }

    /// A named backup for `target`, as `choose_backup` would check it: it must end before the
    /// target (restoring from an older backup than needed only replays more WAL), and its WAL
    /// must reach the target.
    pub fn named_backup(&self, id: &str, target: RecoveryTarget) -> Result<&BackupManifest, RestoreError> {
        let b = self.backups.iter().find(|b| b.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.backups.iter().map(|b| b.id.as_str()).collect();
            RestoreError::OutsideWindow(format!("there is no backup {id} (backups: {})", ids.join(", ")))
        })?;
        if let RecoveryTarget::Name(name) = target {
            let point = &self.restore_point(&name)?.point;
            return match self.backup_reaches_point(b, point) {
                Ok(()) => Ok(b),
                Err(why) => Err(RestoreError::OutsideWindow(format!(
                    "backup {id} cannot be recovered to restore point {:?} at {}: {why}",
                    point.name,
                    format_lsn(point.lsn)
                ))),
            };
        }
        let after = match target {
            RecoveryTarget::Time(t) => b.stop_time_us > t,
            RecoveryTarget::Lsn(l) => b.stop_lsn > l,
            RecoveryTarget::Latest | RecoveryTarget::Xid(_) | RecoveryTarget::Immediate | RecoveryTarget::Name(_) => {
                false
            }
        };
        if after {
            return Err(RestoreError::OutsideWindow(format!(
                "backup {id} ends at {} ({}), after the target {target}",
                format_time(b.stop_time_us),
                format_lsn(b.stop_lsn)
            )));
        }
        let Some(r) = self.reaches.get(id) else {
            return Err(RestoreError::OutsideWindow(format!(
                "backup {id} (timeline {}) is not on the newest timeline's path; {}",
                b.timeline,
                self.describe()
            )));
        };
        let short = match target {
            RecoveryTarget::Time(t) => r.end_us.is_none_or(|e| e < t),
            RecoveryTarget::Lsn(l) => r.reach.end_lsn < l,
            // An xid may lie anywhere the backup's WAL reaches: it is enough that recovery
            // stops with an error at the end if it is not there, as PostgreSQL does.
            RecoveryTarget::Xid(_) | RecoveryTarget::Immediate | RecoveryTarget::Name(_) => {
                r.reach.end_lsn < b.stop_lsn
            }
            RecoveryTarget::Latest => r.reach.hole.is_some(),
        };
        if short {
            let why = match r.reach.hole {
                Some(hole) => self.hole_message(b, &hole, r),
                None => format!("the archive's WAL ends at {}", format_lsn(r.reach.end_lsn)),
            };
            return Err(RestoreError::OutsideWindow(format!(
                "backup {id} cannot be recovered to {target}: {why}; {}",
                self.describe()
            )));
        }
        Ok(b)
    }

    /// Whether `target` lies at or after the newest archived commit and inside the window (up to
    /// the moment the archive is known complete): the state then is the state after the newest
    /// commit, and no later commit exists for PostgreSQL to stop at.
    pub fn past_newest_commit(&self, target: RecoveryTarget) -> bool {
        let Some(w) = self.current_window() else { return false };
        match target {
            RecoveryTarget::Time(t) => w.newest_commit_us.is_none_or(|c| t >= c) && w.end_us.is_some_and(|e| t <= e),
            _ => false,
        }
    }

    /// What recovery from `backup` is told: the recovery target PostgreSQL gets, and the LSN at
    /// which `wal-fetch` stops serving WAL (`None`: the archive's end).
    ///
    /// PostgreSQL stops at a time target only on seeing a later commit, and fails ("recovery
    /// ended before the configured recovery target was reached") when WAL ends first. So a
    /// target at or after the last commit that WAL holds becomes "replay to the end" with the
    /// end fixed: where a hole cuts the backup's WAL (so that neither replay nor read-ahead
    /// asks for the hole, which `wal-fetch` would refuse), or where the archive ended when the
    /// restore was planned (WAL archived since may hold later commits).
    pub fn replay_bounds(&self, backup: &BackupManifest, target: RecoveryTarget) -> ReplayBounds {
        let (recovery_target, until) = self.bounds(backup, target);
        ReplayBounds {
            recovery_target,
            until,
            to_planned_end: recovery_target == RecoveryTarget::Latest && self.past_newest_commit(target),
        }
    }

    fn bounds(&self, backup: &BackupManifest, target: RecoveryTarget) -> (RecoveryTarget, Option<u64>) {
        let reach = self.reaches.get(&backup.id);
        if let Some(r) = reach.filter(|r| r.reach.hole.is_some()) {
            let until = Some(r.reach.end_lsn);
            return match target {
                RecoveryTarget::Time(t) if r.end_us.is_none_or(|last| t >= last) => (RecoveryTarget::Latest, until),
                other => (other, until),
            };
        }
        if self.past_newest_commit(target) {
            if let Some(w) = self.current_window() {
                return (RecoveryTarget::Latest, Some(w.end_lsn));
            }
        }
        (target, None)
    }

    /// The backups a restore of `backup` reads, oldest (the full backup) first: an incremental
    /// needs its parent, and so on back to a full backup.
    pub fn chain<'a>(&'a self, backup: &'a BackupManifest) -> Result<Vec<&'a BackupManifest>, RestoreError> {
        let mut chain = vec![backup];
        while let Some(parent) = &chain[chain.len() - 1].parent {
            let child = &chain[chain.len() - 1].id;
            let p = self.backups.iter().find(|b| &b.id == parent).ok_or_else(|| {
                RestoreError::Other(format!(
                    "backup {child} is incremental on backup {parent}, which is not in the repository: \
                     restore from an older full backup (--backup ID) or a secondary repository"
                ))
            })?;
            if chain.len() > self.backups.len() {
                return Err(RestoreError::Other(format!("backup {child}: the parent chain loops")));
            }
            chain.push(p);
        }
        chain.reverse();
        Ok(chain)
    }
}

/// Whether the whole record of `point` lies on `path`: on an ancestor timeline, it must end at
/// or before the switch point (a record starting at the switch was written on the old timeline
/// after the fork, and is not replayed on this one).
fn on_path(path: &TimelinePath, point: &RestorePoint) -> bool {
    path.contains(point.timeline, point.end_lsn)
}

/// Overlapping or touching ranges as one (sorted by start).
fn merge(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort_by_key(|r| (r.start_lsn, r.start_us));
    let mut out: Vec<Range> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start_lsn <= last.end_lsn => {
                if r.end_lsn > last.end_lsn {
                    last.end_lsn = r.end_lsn;
                }
                last.end_us = last.end_us.max(r.end_us);
            }
            _ => out.push(r),
        }
    }
    out
}

/// Whether any timeline's WAL has a hole between its first and last segment: then a restore
/// should look at what the fallback repositories hold.
fn has_hole(wal: &WalCatalog, histories: &BTreeMap<u32, Vec<HistoryEntry>>) -> bool {
    let timelines: std::collections::BTreeSet<u32> = wal.segments.keys().map(|(t, _)| *t).collect();
    timelines.iter().any(|&t| {
        let path = TimelinePath::new(t, histories.get(&t).map(Vec::as_slice).unwrap_or(&[]));
        let Some(((_, first), _)) = wal.segments.range((t, 0)..=(t, u64::MAX)).next() else { return false };
        let start = path
            .timelines()
            .filter_map(|tl| wal.segments.range((tl, 0)..=(tl, u64::MAX)).next().map(|((_, s), _)| *s))
            .min()
            .unwrap_or(*first);
        continuity::reach(wal, &path, wal.layout.segment_start(start)).hole.is_some()
    })
}

/// What recovery from a backup is told ([`Catalog::replay_bounds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayBounds {
    /// The recovery target PostgreSQL gets.
    pub recovery_target: RecoveryTarget,
    /// The LSN at which `wal-fetch` stops serving WAL (`None`: the archive's end).
    pub until: Option<u64>,
    /// A time target at or past the newest archived commit, turned into "replay to the planned
    /// end": the restored state is the state after that commit.
    pub to_planned_end: bool,
}

/// The parsed history file of every timeline that has one. An unreadable or malformed history
/// is left out (recovery then cannot follow that timeline's ancestry, which `verify` reports).
async fn load_histories(
    repo: &Repository,
    wal: &WalCatalog,
) -> Result<BTreeMap<u32, Vec<HistoryEntry>>, RepositoryError> {
    let mut out = BTreeMap::new();
    for (timeline, read) in wal.read_histories(repo).await? {
        match read {
            Ok(entries) => {
                out.insert(timeline, entries);
            }
            Err(HistoryProblem::Vanished) => {}
            Err(problem) => {
                let name = wal.layout.object_name(&WalObject::History { timeline });
                tracing::warn!(object = %name, error = %problem, "timeline history cannot be used")
            }
        }
    }
    Ok(out)
}

/// The newest commit time recorded in the headers of the timeline's newest WAL objects. An idle
/// primary writes WAL without commits, so this looks back a bounded number of objects.
pub async fn newest_commit_us(
    repo: &Repository,
    wal: &WalCatalog,
    timeline: u32,
) -> Result<Option<i64>, RepositoryError> {
    let mut objects = Vec::new();
    for (&(tli, segno), entry) in wal.segments.range((timeline, 0)..=(timeline, u64::MAX)).rev() {
        push_objects(&mut objects, tli, segno, entry, u64::MAX, wal.layout);
        if objects.len() >= LOOK_BACK {
            break;
        }
    }
    newest_commit_in(repo, wal, &objects).await
}

/// The newest commit time in WAL objects that end at or before `lsn` along `path`.
async fn last_commit_before(
    repo: &Repository,
    wal: &WalCatalog,
    path: &TimelinePath,
    lsn: u64,
) -> Result<Option<i64>, RepositoryError> {
    let layout = wal.layout;
    let mut objects = Vec::new();
    let Some(newest) = lsn.checked_sub(1).map(|l| layout.segno_of(l)) else { return Ok(None) };
    for segno in (0..=newest).rev() {
        let timeline = path.timeline_of(layout, segno);
        let Some(entry) = wal.segments.get(&(timeline, segno)) else { break };
        push_objects(&mut objects, timeline, segno, entry, lsn, layout);
        if objects.len() >= LOOK_BACK {
            break;
        }
    }
    newest_commit_in(repo, wal, &objects).await
}

const LOOK_BACK: usize = 64;

/// The objects of one segment, newest first, that end at or before `lsn`.
fn push_objects(
    out: &mut Vec<WalObject>,
    timeline: u32,
    segno: u64,
    entry: &pitr_archive::SegmentEntry,
    lsn: u64,
    layout: WalLayout,
) {
    let start = layout.segment_start(segno);
    if entry.whole && start + layout.segment_size <= lsn {
        out.push(WalObject::Segment { timeline, segno });
        return;
    }
    for &(from, to) in entry.chunks.iter().rev() {
        if start + u64::from(to) <= lsn {
            out.push(WalObject::Chunk { timeline, segno, from, to });
        }
    }
}

async fn newest_commit_in(
    repo: &Repository,
    wal: &WalCatalog,
    objects: &[WalObject],
) -> Result<Option<i64>, RepositoryError> {
    for obj in objects.iter().take(LOOK_BACK) {
        let header = match repo.read_header(&wal.layout.object_name(obj)).await {
            Ok(h) => h,
            // A running sidecar compacted this chunk into its segment since the listing.
            Err(RepositoryError::Store(e)) if e.is_not_found() => match *obj {
                WalObject::Chunk { timeline, segno, .. } => {
                    let segment = wal.layout.object_name(&WalObject::Segment { timeline, segno });
                    match repo.read_header(&segment).await {
                        Ok(h) => h,
                        Err(RepositoryError::Store(e)) if e.is_not_found() => continue,
                        Err(e) => return Err(e),
                    }
                }
                _ => return Err(RepositoryError::Store(e)),
            },
            Err(e) => return Err(e),
        };
        if let Some(t) = header.meta.last_commit_us {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, end: u64) -> Range {
        Range { start_us: start as i64, start_lsn: start, end_us: Some(end as i64), end_lsn: end }
    }

    #[test]
    fn overlapping_ranges_merge_and_gaps_stay() {
        assert_eq!(merge(vec![range(5, 9), range(1, 3), range(2, 4)]), vec![range(1, 4), range(5, 9)]);
        assert_eq!(merge(vec![range(1, 5), range(5, 9)]), vec![range(1, 9)]);
        assert_eq!(merge(vec![]), vec![]);
    }

    /// A restore point is offered only once the archive holds its WAL (an entry is put before
    /// its WAL, so one can be there without it), and an unknown name is refused naming the known.
    #[tokio::test]
    async fn restore_points_beyond_the_archived_wal_are_not_offered() {
        use pitr_archive::seal::{ObjectKind, ObjectMeta};
        use pitr_archive::{KeyRing, LocalStore};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(std::sync::Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [9; 32]));
        let cluster =
            ClusterInfo { system_id: 7, wal_segment_size: 16 << 20, wal_page_size: 8192, server_version_num: 150000 };
        repo.put_cluster_info(&cluster).await.unwrap();
        let layout = WalLayout::new(&cluster);
        let seg = layout.segment_start(1);
        let chunk = WalObject::Chunk { timeline: 1, segno: 1, from: 0, to: 0x2000 };
        let meta = ObjectMeta {
            timeline: 1,
            start_lsn: seg,
            end_lsn: seg + 0x2000,
            ..ObjectMeta::plain(ObjectKind::WalChunk)
        };
        repo.put_sealed(&layout.object_name(&chunk), vec![0; 0x2000], meta).await.unwrap();
        let point =
            |name: &str, lsn: u64| RestorePoint { name: name.into(), timeline: 1, lsn, end_lsn: lsn + 104, time_us: 1 };
        let (held, ahead) = (point("held", seg + 0x100), point("ahead", seg + 0x2000));
        // The copy a timeline switch in that segment streams again on timeline 2 is the same record.
        let copy = RestorePoint { timeline: 2, ..held.clone() };
        for p in [&held, &ahead, &copy] {
            restore_points::record(&repo, 7, p).await.unwrap();
        }
        let catalog = Catalog::load_with(&repo, cluster.clone(), true).await.unwrap();
        let why: Vec<(&str, Option<&str>)> =
            catalog.restore_points.iter().map(|p| (p.point.name.as_str(), p.unavailable.as_deref())).collect();
        assert_eq!(why.len(), 2, "{why:?}");
        assert_eq!(catalog.restore_points[0].point, held);
        assert_eq!(why[0], ("held", Some("there is no backup")));
        assert!(why[1].0 == "ahead" && why[1].1.is_some_and(|w| w.contains("not in the archive yet")), "{why:?}");
        let name = |n: &str| RestorePointName::new(n).unwrap();
        let err = catalog.restore_point(&name("ahead")).unwrap_err().to_string();
        assert!(err.contains("not in the archive yet"), "{err}");
        let err = catalog.choose_backup(RecoveryTarget::Name(name("nope"))).unwrap_err().to_string();
        assert!(err.contains("no base backup") || err.contains("\"ahead\", \"held\""), "{err}");
        let err = catalog.restore_point(&name("nope")).unwrap_err().to_string();
        assert!(err.contains("no restore point \"nope\" (restore points: \"ahead\", \"held\")"), "{err}");

        // Two records that share a place and a name on timelines that forked before it are
        // two restore points (not the copy a switch streams again: that one has the same time).
        let forked = RestorePoint { timeline: 3, time_us: 2, ..held.clone() };
        restore_points::record(&repo, 7, &forked).await.unwrap();
        let catalog = Catalog::load_with(&repo, cluster.clone(), true).await.unwrap();
        let listed: Vec<(u32, i64)> =
            catalog.restore_points.iter().map(|p| (p.point.timeline, p.point.time_us)).collect();
        assert_eq!(listed, [(1, 1), (1, 1), (3, 2)], "held, ahead, and the forked namesake");

        // An entry that does not open does not stop the catalog (time and LSN restores, list,
        // drills), but a restore to any name is refused, naming the entry.
        let planted = pitr_archive::names::pg::restore_point(7, 1, seg + 0x80);
        repo.store().put_if_absent(&planted, b"PITRjunk".to_vec().into()).await.unwrap();
        let catalog = Catalog::load(&repo, cluster.clone()).await.unwrap();
        assert!(catalog.restore_points.is_empty() && catalog.restore_point_problems.is_empty(), "not read by load");
        let err = catalog.restore_point(&name("held")).unwrap_err().to_string();
        assert!(err.contains("index of restore points was not read"), "{err}");
        let catalog = Catalog::load_with(&repo, cluster.clone(), true).await.unwrap();
        assert_eq!(catalog.restore_points.len(), 3);
        assert_eq!(catalog.restore_point_problems.len(), 1, "{:?}", catalog.restore_point_problems);
        for n in ["held", "nope"] {
            let err = catalog.restore_point(&name(n)).unwrap_err().to_string();
            assert!(err.contains("index of restore points is incomplete") && err.contains(&planted), "{err}");
        }

        // With a backup starting after the damaged entry, recovery from it never replays that
        // place: the entry stays a problem (listed) but no longer blocks a restore to a name.
        // One at or after the backup's start still does.
        let backup: BackupManifest = serde_json::from_value(serde_json::json!({
            "id": "B", "kind": "full", "system_id": 7, "server_version_num": 150000, "timeline": 1,
            "start_lsn": seg + 0xc0, "stop_lsn": seg + 0xf0,
            "start_time_us": 0, "stop_time_us": 0,
            "block_size": 8192, "tablespaces": [], "entries": [], "files": [], "server_manifest": "{}",
            "logical_bytes": 0, "stored_bytes": 0
        }))
        .unwrap();
        backup.store(&repo).await.unwrap();
        let later = point("later", seg + 0x200);
        restore_points::record(&repo, 7, &later).await.unwrap();
        let catalog = Catalog::load_with(&repo, cluster.clone(), true).await.unwrap();
        assert_eq!(catalog.restore_point_problems.len(), 1, "still listed: {:?}", catalog.restore_point_problems);
        let found = catalog.restore_point(&name("later")).expect("the older damaged entry no longer blocks");
        assert_eq!(found.point, later);
        let after = pitr_archive::names::pg::restore_point(7, 1, seg + 0xd0);
        repo.store().put_if_absent(&after, b"PITRjunk".to_vec().into()).await.unwrap();
        let catalog = Catalog::load_with(&repo, cluster, true).await.unwrap();
        let err = catalog.restore_point(&name("later")).unwrap_err().to_string();
        assert!(err.contains("index of restore points is incomplete") && err.contains(&after), "{err}");
        assert!(!err.contains(&planted), "only the entry that can matter is named: {err}");
    }

    /// A restore point on an ancestor timeline is on the newest timeline's path only if its
    /// whole record ends at or before the switch point.
    #[test]
    fn a_restore_point_is_on_the_path_only_if_it_ends_by_the_switch() {
        let switch = 0x300_0100;
        let path = TimelinePath::new(2, &[HistoryEntry { timeline: 1, switch_lsn: switch }]);
        let point =
            |timeline: u32, lsn: u64| RestorePoint { name: "p".into(), timeline, lsn, end_lsn: lsn + 104, time_us: 1 };
        assert!(on_path(&path, &point(1, switch - 104)), "ends exactly at the switch");
        assert!(!on_path(&path, &point(1, switch - 96)), "crosses the switch");
        assert!(!on_path(&path, &point(1, switch)), "starts at the switch: written after the fork");
        assert!(on_path(&path, &point(2, switch)), "on the newest timeline");
        assert!(!on_path(&path, &point(3, 0x100)), "another timeline");
    }
}
