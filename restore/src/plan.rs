//! What can be restored: the recoverable window per timeline, and the backup to start from for
//! a target.

use pitr_archive::backup::BackupManifest;
use pitr_archive::layout::{WalCatalog, WalLayout, WalObject};
use pitr_archive::{ClusterInfo, Repository, RepositoryError};

use crate::target::{format_time, RecoveryTarget};
use crate::RestoreError;

/// The recoverable window of one timeline: from the consistency point of the oldest backup
/// on it (or an ancestor) to the newest archived commit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub timeline: u32,
    pub start_us: Option<i64>,
    pub start_lsn: Option<u64>,
    pub end_us: Option<i64>,
    pub end_lsn: u64,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    pub cluster: ClusterInfo,
    pub wal: WalCatalog,
    pub backups: Vec<BackupManifest>,
    pub windows: Vec<Window>,
}

impl Catalog {
    pub async fn load(repo: &Repository, cluster: ClusterInfo) -> Result<Catalog, RepositoryError> {
        let layout = WalLayout::new(&cluster);
        let wal = WalCatalog::build(repo, layout).await?;
        let backups = BackupManifest::list(repo, cluster.system_id).await?;
        let mut windows = Vec::new();
        let timelines: std::collections::BTreeSet<u32> = wal.segments.keys().map(|(t, _)| *t).collect();
        for timeline in timelines {
            let Some(end_lsn) = wal.end_lsn(timeline) else { continue };
            let oldest = backups.iter().filter(|b| b.timeline <= timeline).min_by_key(|b| b.stop_lsn);
            windows.push(Window {
                timeline,
                start_us: oldest.map(|b| b.stop_time_us),
                start_lsn: oldest.map(|b| b.stop_lsn),
                end_us: newest_commit_us(repo, &wal, timeline).await?,
                end_lsn,
            });
        }
        Ok(Catalog { cluster, wal, backups, windows })
    }

    /// The newest timeline's window: where restores land (recovery_target_timeline = latest).
    pub fn current_window(&self) -> Option<&Window> {
        self.windows.last()
    }

    /// The newest backup a restore to `target` can start from, or why there is none.
    pub fn choose_backup(&self, target: RecoveryTarget) -> Result<&BackupManifest, RestoreError> {
        let window = self.current_window();
        let describe = || match window {
            Some(w) => format!(
                "recoverable window on timeline {}: {} .. {}",
                w.timeline,
                w.start_us.map(format_time).unwrap_or_else(|| "(no backup)".into()),
                w.end_us.map(format_time).unwrap_or_else(|| "(no archived commit)".into())
            ),
            None => "the archive holds no WAL".into(),
        };
        if self.backups.is_empty() {
            return Err(RestoreError::OutsideWindow(format!(
                "there is no base backup yet (run `pitr backup`); {}",
                describe()
            )));
        }
        let chosen = match target {
            RecoveryTarget::Latest => self.backups.last(),
            RecoveryTarget::Time(t) => {
                if let Some(end) = window.and_then(|w| w.end_us) {
                    if t > end {
                        return Err(RestoreError::OutsideWindow(format!(
                            "{} is after the newest archived commit; {}",
                            format_time(t),
                            describe()
                        )));
                    }
                }
                self.backups.iter().rev().find(|b| b.stop_time_us <= t)
            }
            RecoveryTarget::Lsn(l) => {
                if let Some(w) = window.filter(|w| l > w.end_lsn) {
                    return Err(RestoreError::OutsideWindow(format!(
                        "{target} is past the end of the archived WAL at {}; {}",
                        pitr_pgwire::format_lsn(w.end_lsn),
                        describe()
                    )));
                }
                self.backups.iter().rev().find(|b| b.stop_lsn <= l)
            }
            // Where a transaction committed is only known by reading WAL; the oldest backup is
            // always a valid start for any transaction committed after it.
            RecoveryTarget::Xid(_) => self.backups.first(),
        };
        chosen
            .ok_or_else(|| RestoreError::OutsideWindow(format!("{target} is before the oldest backup; {}", describe())))
    }
}

impl Catalog {
    /// A named backup for `target`, as `choose_backup` would check it: it must end before the
    /// target (restoring from an older backup than needed only replays more WAL).
    pub fn named_backup(&self, id: &str, target: RecoveryTarget) -> Result<&BackupManifest, RestoreError> {
        let b = self.backups.iter().find(|b| b.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.backups.iter().map(|b| b.id.as_str()).collect();
            RestoreError::OutsideWindow(format!("there is no backup {id} (backups: {})", ids.join(", ")))
        })?;
        let after = match target {
            RecoveryTarget::Time(t) => b.stop_time_us > t,
            RecoveryTarget::Lsn(l) => b.stop_lsn > l,
            RecoveryTarget::Latest | RecoveryTarget::Xid(_) => false,
        };
        if after {
            return Err(RestoreError::OutsideWindow(format!(
                "backup {id} ends at {} ({}), after the target {target}",
                format_time(b.stop_time_us),
                pitr_pgwire::format_lsn(b.stop_lsn)
            )));
        }
        self.choose_backup(target)?;
        Ok(b)
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

/// The newest commit time recorded in the headers of the timeline's newest WAL objects. An idle
/// primary writes WAL without commits, so this looks back a bounded number of objects.
pub async fn newest_commit_us(
    repo: &Repository,
    wal: &WalCatalog,
    timeline: u32,
) -> Result<Option<i64>, RepositoryError> {
    const LOOK_BACK: usize = 64;
    let mut objects = Vec::new();
    for (&(tli, segno), entry) in wal.segments.range((timeline, 0)..=(timeline, u64::MAX)).rev() {
        if entry.whole {
            objects.push(WalObject::Segment { timeline: tli, segno });
        } else {
            for &(from, to) in entry.chunks.iter().rev() {
                objects.push(WalObject::Chunk { timeline: tli, segno, from, to });
            }
        }
        if objects.len() >= LOOK_BACK {
            break;
        }
    }
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
