//! A whole restore: plan, materialise, write the recovery settings, and with `start` run the
//! server to the target and measure what was achieved (RPO) and how long it took (RTO).
//!
//! A restore holds a running marker for its whole length (see [`pitr_archive::running`]): put
//! before it looks at the catalog, renewed while it runs, given the restore's plan (backup chain,
//! timeline, where replay starts) once it has chosen its backup, and released at the end —
//! after `--start` recovery has replayed the WAL through `wal-fetch`, and on failures too. While
//! it is live `pitr expire` removes nothing the restore reads. Without `--start` the marker ends
//! with the restore: WAL that a server started later fetches is kept by retention alone (the
//! window, or the backup's own start..stop).
//!
//! The marker is the only thing a restore writes. Where the repository refuses it (read-only
//! credentials, a bucket policy) or cannot take it, the restore warns and goes on without one.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pitr_archive::backup::BackupKind;
use pitr_archive::names::pg;
use pitr_archive::restore_points::RestorePoint;
use pitr_archive::running::{ReadPlan, RunKind, RunMarker};
use pitr_archive::{Repository, RepositoryError, WalLayout};
use pitr_pgformat::lsn::{format_lsn, parse_lsn};
use pitr_pgformat::walreader::{pg_timestamp_to_unix_micros, WalDecoder};

use crate::materialize::{
    check_mapped_oids, check_target, materialize, read_file_nofollow, write_file_nofollow, MappedTablespace,
    MappedTablespaces, Staging,
};
use crate::plan::{Catalog, ReplayBounds};
use crate::target::{format_time, RecoveryTarget};
use crate::walfetch::read_wal_file;
use crate::RestoreError;

/// What [`restore`] restores, where, and whether it runs the server to the target.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Where recovery stops.
    pub target: RecoveryTarget,
    /// The data directory to create (missing or empty, unless `force`).
    pub target_dir: PathBuf,
    /// Replace a non-empty `target_dir` (never one a running server uses).
    pub force: bool,
    /// How PostgreSQL will run `pitr wal-fetch` (its restore_command).
    pub restore_command: WalFetchCommand,
    /// Block fetches and writes run at once.
    pub workers: usize,
    /// Restore from this backup instead of the newest one before the target.
    pub backup_id: Option<String>,
    /// Run the server to the target and report.
    pub start: Option<StartOptions>,
    /// Where the running marker goes: the repository `pitr expire` runs on (the primary), when
    /// the restore reads another one first (`--from`). `None`: the repository restored from.
    pub marker_repository: Option<Repository>,
    /// Build a standby that keeps following the archive (and the primary) instead of a cluster
    /// restored to a moment: `target` must be [`RecoveryTarget::Latest`].
    pub standby: Option<StandbyOptions>,
    /// Tablespaces restored to a directory of their own instead of inside the target, by OID
    /// (`--tablespace-map OID=DIR`): absolute, missing or empty (unless `force`), none inside
    /// another or the target.
    pub tablespace_map: BTreeMap<u32, PathBuf>,
    /// Restore into the existing data directory `target_dir` of the same cluster, writing only
    /// what differs from the backup ([`crate::delta`]); a missing or empty one gets a plain
    /// restore. `force` is not needed, and mapped tablespace directories are compared in place.
    pub delta: bool,
    /// Stop just before `target` (an xid or LSN): `recovery_target_inclusive = off`
    /// ([`crate::target::exclusive`] turns an exclusive time into an inclusive one).
    pub exclusive: bool,
}

/// A standby from the archive (`pitr restore --standby`): `standby.signal` instead of
/// `recovery.signal`, no recovery target, and a restore_command that serves whole segments only
/// and never stops at the archive's end as it was planned, so that the server keeps asking for
/// the next segment as the sidecar archives it.
#[derive(Debug, Clone, Default)]
pub struct StandbyOptions {
    /// Where the standby also streams from (a libpq conninfo): WAL reaches it as the primary
    /// writes it rather than a segment at a time.
    pub primary_conninfo: Option<String>,
}

/// How a restored server runs `pitr wal-fetch` as its restore_command: the binary with its
/// global options (quoted for the shell PostgreSQL runs it with) and wal-fetch's own options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalFetchCommand {
    /// e.g. `"/usr/bin/pitr" --config "/etc/pitr/pitr.toml"`.
    pub program: String,
    /// e.g. `--from dr` (names that need no quoting).
    pub options: Vec<String>,
}

impl WalFetchCommand {
    /// The restore_command line; with `until`, wal-fetch serves no WAL at or past that LSN.
    pub fn render(&self, until: Option<u64>) -> String {
        self.render_with(until.map(|u| format!("--until-lsn {}", format_lsn(u))))
    }

    /// The restore_command line of a standby: whole segments only, and no end.
    pub fn render_for_standby(&self) -> String {
        self.render_with(Some("--whole-segments".into()))
    }

    fn render_with(&self, extra: Option<String>) -> String {
        let mut s = format!("{} wal-fetch", self.program);
        for o in self.options.iter().chain(&extra) {
            s.push(' ');
            s.push_str(o);
        }
        s.push_str(" \"%f\" \"%p\"");
        s
    }
}

/// How `--start` runs the restored server through recovery.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The directory holding `pg_ctl` of the cluster's major version ([`crate::pg_bin`]).
    pub bin_dir: PathBuf,
    /// The port the restored server listens on (localhost and a socket in the data directory).
    pub port: u16,
    /// Database user for the report's queries over the Unix socket.
    pub db_user: String,
    /// How long recovery may take before the restore gives up (the server is left running).
    pub timeout: Duration,
}

/// What a restore did and achieved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// The target as asked for ([`RecoveryTarget`]'s display form).
    pub target: String,
    /// The data directory restored into.
    pub target_dir: String,
    /// The backup restored (the newest of its chain).
    pub backup_id: String,
    /// Full, or incremental (restored with its chain).
    pub backup_kind: BackupKind,
    /// The backups combined, oldest (the full backup) first.
    pub backup_chain: Vec<String>,
    /// Where replay starts: the backup's start (its checkpoint's redo point).
    pub backup_start_lsn: String,
    /// The backup's consistency point: the earliest moment it restores to.
    pub backup_stop_time: String,
    /// The LSN replay must pass before the restored cluster is consistent.
    pub backup_stop_lsn: String,
    /// Files in the backup's manifest.
    pub files: usize,
    /// Bytes written into the data directory.
    pub bytes_restored: u64,
    /// The lines added to `postgresql.auto.conf` (restore_command, recovery_target_*).
    pub recovery_settings: Vec<String>,
    /// Tablespaces restored outside the target (`--tablespace-map`): OID and directory.
    pub mapped_tablespaces: BTreeMap<u32, String>,
    /// With `--delta` into a directory that held the cluster: what was found unchanged, written
    /// and removed (`bytes_restored` is then the bytes fetched and written). `None` for a
    /// plain restore, also a `--delta` one into a missing or empty directory.
    pub delta: Option<crate::delta::DeltaReport>,
    /// The newest commit on the current timeline in the archive, when the restore began.
    pub newest_archived_commit: Option<String>,
    /// A standby (`--standby`): it never reaches a target, so with `--start` the report tells
    /// where replay was once it was consistent, and the data-loss window, last replayed xid and
    /// the WAL-replayed count stay empty.
    pub standby: bool,
    /// Whether the server was run to the target (`--start`), or for a standby until it was
    /// consistent and took read-only connections; the fields below are filled only then.
    pub started: bool,
    /// The port the restored server listens on.
    pub port: Option<u16>,
    /// The time of the last commit replayed: what the restore achieved.
    pub last_replayed_commit_time: Option<String>,
    /// Where replay ended.
    pub last_replayed_lsn: Option<String>,
    /// The xid of the last commit or abort before that LSN, read from the archived WAL.
    pub last_replayed_xid: Option<u32>,
    /// WAL replayed: from the backup's start to the last replayed record.
    pub wal_replayed_bytes: Option<u64>,
    /// Target (or, for `latest`, the newest archived commit) minus the last replayed commit.
    pub data_loss_window_seconds: Option<f64>,
    /// Planning and writing the data directory.
    pub download_seconds: f64,
    /// Starting the server and replaying WAL to the target.
    pub replay_seconds: Option<f64>,
    /// The whole restore (RTO as measured here).
    pub total_seconds: f64,
    /// The `pg_ctl … stop` line that stops the restored server.
    pub stop_command: Option<String>,
    /// With `--to name:`, whether recovery was seen to stop at the indexed restore point: the
    /// index can lack an earlier one of the name (see [`Landing`]). `None` for other targets.
    pub landing: Option<Landing>,
}

/// Whether a restore to a name stopped where the index says. PostgreSQL stops at the first
/// restore point of that name it replays; one the index lacks (WAL archived before pitr indexed
/// restore points, an entry lost or unreadable) would stop it earlier. With `--start` the new
/// timeline's history file says where recovery stopped, and a restore elsewhere fails; without
/// it, nothing has been replayed yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Landing {
    /// Seen to stop at the indexed restore point's end.
    pub verified: bool,
    /// What was checked, or how to check it.
    pub detail: String,
}

fn absolute(p: &Path) -> Result<PathBuf, RestoreError> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|e| RestoreError::Io { path: p.to_path_buf(), cause: e })?;
    Ok(cwd.join(p))
}

/// `value` as a quoted string of postgresql.auto.conf, escaped as `ALTER SYSTEM` writes it:
/// the server's configuration lexer reads `\` as an escape inside quotes, so both `'` and `\`
/// are doubled (else `\'` escapes the quote meant to end the string, and `\s` loses its `\`).
/// A line break, carriage return or NUL cannot be written at all: PostgreSQL refuses them, and
/// a line break would start a setting of its own. `setting` names the setting in the error.
fn conf_quote(setting: &'static str, value: &str) -> Result<String, RestoreError> {
    let refused = [('\n', "a line break (\\n)"), ('\r', "a carriage return (\\r)"), ('\0', "a NUL character")];
    if let Some((_, what)) = refused.iter().find(|(c, _)| value.contains(*c)) {
        return Err(RestoreError::SettingValue { setting, why: format!("holds {what}") });
    }
    Ok(format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''")))
}

fn recovery_settings(
    target: RecoveryTarget,
    exclusive: bool,
    restore_command: &str,
) -> Result<Vec<String>, RestoreError> {
    let mut lines = vec![format!("restore_command = {}", conf_quote("restore_command", restore_command)?)];
    match target {
        RecoveryTarget::Time(us) => {
            lines.push(format!("recovery_target_time = {}", conf_quote("recovery_target_time", &format_time(us))?))
        }
        RecoveryTarget::Lsn(l) => lines.push(format!("recovery_target_lsn = '{}'", format_lsn(l))),
        RecoveryTarget::Xid(x) => lines.push(format!("recovery_target_xid = '{x}'")),
        RecoveryTarget::Name(n) => {
            lines.push(format!("recovery_target_name = {}", conf_quote("recovery_target_name", n.as_str())?))
        }
        RecoveryTarget::Immediate => lines.push("recovery_target = 'immediate'".into()),
        RecoveryTarget::Latest => {}
    }
    if exclusive && matches!(target, RecoveryTarget::Xid(_) | RecoveryTarget::Lsn(_)) {
        lines.push("recovery_target_inclusive = off".into());
    }
    if target != RecoveryTarget::Latest {
        lines.push("recovery_target_action = 'promote'".into());
    }
    lines.push("recovery_target_timeline = 'latest'".into());
    Ok(lines)
}

/// The settings of a standby: no recovery target (it never ends recovery by itself), the latest
/// timeline (it follows a promotion the archive records), and the primary when given. The
/// backup's own postgresql.auto.conf may name a primary and a slot (a backup of a server that
/// was a standby once): both are always overridden (later lines win), so that a standby meant
/// to follow the archive alone never streams from that old host or asks for its slot.
fn standby_settings(restore_command: &str, standby: &StandbyOptions) -> Result<Vec<String>, RestoreError> {
    let conninfo = match &standby.primary_conninfo {
        Some(conninfo) => conf_quote("primary_conninfo", conninfo)?,
        None => "''".to_string(),
    };
    Ok(vec![
        format!("restore_command = {}", conf_quote("restore_command", restore_command)?),
        "recovery_target_timeline = 'latest'".to_string(),
        format!("primary_conninfo = {conninfo}"),
        "primary_slot_name = ''".to_string(),
    ])
}

/// `settings` as the report shows them: a primary_conninfo is never printed, only that it is
/// set (it may hold a password, as `password=` or inside a URI; the file itself has it,
/// readable by the server's user alone).
fn reported_settings(settings: &[String]) -> Vec<String> {
    settings
        .iter()
        .map(|line| match line.strip_prefix("primary_conninfo = ") {
            Some(value) if value != "''" => "primary_conninfo = (set; see postgresql.auto.conf)".to_string(),
            _ => line.clone(),
        })
        .collect()
}

/// Puts the running marker of a restore or drill and waits out a running `pitr expire` (see
/// [`pitr_archive::running`]). A repository that refuses the write (read-only credentials, a
/// bucket policy) or fails it does not stop a restore: it goes on without a marker, with a
/// warning that an expire meanwhile could remove what it reads.
pub async fn announce(repo: &Repository, kind: RunKind) -> Option<RunMarker> {
    match RunMarker::begin(repo, kind).await {
        Ok(marker) => Some(marker),
        Err(e) => {
            let refused = matches!(&e, RepositoryError::Store(s) if pitr_archive::expire::refused(s));
            let why = if refused { "the repository refuses writes" } else { "the marker could not be written" };
            tracing::warn!(
                repository = %repo.location(),
                error = %e,
                "{why}: the {kind} goes on without a running marker, so a `pitr expire` meanwhile could remove \
                 backups or WAL it reads"
            );
            None
        }
    }
}

/// The catalog as it stands now that the marker is up. It was read before: a `pitr expire` that
/// ran in between may have removed a backup it lists, or WAL a restore to `target` replays. From
/// the marker on nothing the restore reads goes (every later expire sees it, and an earlier one
/// still running was waited for), so the catalog is read again only where that may have
/// happened: a listed backup's manifest is gone, or a retention floor (expire records one before
/// it removes WAL) lies above the segment the replay starts from. The latter holds for every
/// restore from a backup older than the window's base: those read the catalog twice.
pub(crate) async fn current_catalog<'a>(
    repo: &Repository,
    catalog: &'a Catalog,
    target: RecoveryTarget,
    backup_id: Option<&str>,
) -> Result<Cow<'a, Catalog>, RestoreError> {
    let system_id = catalog.cluster.system_id;
    let listed: BTreeSet<String> =
        repo.list(&pg::backups_prefix(system_id)).await?.into_iter().map(|o| o.name).collect();
    let mut changed = catalog
        .backups
        .iter()
        .find(|b| !listed.contains(&pg::backup_manifest(system_id, &b.id)))
        .map(|b| format!("backup {} was removed", b.id));
    if changed.is_none() {
        let chosen = match backup_id {
            Some(id) => catalog.named_backup(id, target),
            None => catalog.choose_backup(target),
        };
        // No backup fits: the caller reports that, from a catalog that still lists every backup.
        if let Ok(b) = chosen {
            let names = repo.list(&pg::floors_prefix(system_id)).await?;
            let floors = pitr_archive::retention::floors_from_names(system_id, names.iter().map(|o| o.name.as_str()));
            let from = WalLayout::new(&catalog.cluster).segno_of(b.start_lsn);
            changed = floors
                .iter()
                .find(|(&t, &floor)| t >= b.timeline && floor > from)
                .map(|(t, _)| format!("WAL of timeline {t} before the retention floor may be gone"));
        }
    }
    match changed {
        None => Ok(Cow::Borrowed(catalog)),
        Some(why) => {
            tracing::info!(why = %why, "the repository may have changed since it was read; reading it again");
            Ok(Cow::Owned(Catalog::load_with(repo, catalog.cluster.clone(), catalog.restore_points_read()).await?))
        }
    }
}

/// What every restore checks before it touches the repository.
pub(crate) fn preflight(opts: &RestoreOptions) -> Result<(), RestoreError> {
    if opts.standby.is_some() && opts.target != RecoveryTarget::Latest {
        return Err(RestoreError::StandbyTarget(opts.target.to_string()));
    }
    if let Some(conninfo) = opts.standby.as_ref().and_then(|s| s.primary_conninfo.as_deref()) {
        conf_quote("primary_conninfo", conninfo)?;
    }
    let delta = opts.delta && crate::delta::applies(&opts.target_dir)?;
    if delta {
        crate::delta::check(&opts.target_dir, None, None)?;
    } else {
        check_target(&opts.target_dir, opts.force)?;
    }
    check_tablespace_dirs(&opts.tablespace_map, &opts.target_dir, opts.force, delta)?;
    if opts.start.is_some() && unsafe { libc::geteuid() } == 0 {
        return Err(RestoreError::Other(
            "PostgreSQL refuses to run as root: run `pitr restore --start` as the database's OS user, \
             or restore without --start and start the server yourself"
                .into(),
        ));
    }
    Ok(())
}

/// `path` with symbolic links resolved as far as it exists; the rest appended as given. `..` is
/// refused (it would make a later comparison of paths meaningless).
fn resolve(path: &Path) -> Result<PathBuf, String> {
    if path.components().any(|c| c == std::path::Component::ParentDir) {
        return Err("has a \"..\" component".into());
    }
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(mut out) => {
                out.extend(rest.iter().rev());
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(name) = existing.file_name().map(|n| n.to_os_string()) else {
                    return Err(format!("cannot be resolved ({e})"));
                };
                rest.push(name);
                existing.pop();
            }
            Err(e) => return Err(format!("cannot be resolved: {} ({e})", existing.display())),
        }
    }
}

/// Checks the `--tablespace-map` directories before anything is written: absolute, not a
/// symbolic link, missing or empty (unless `force`; never a running server's), none at, inside
/// or around another one or the target (the parent's links resolved, so that two spellings of
/// one place are one place). For a `delta` restore, which compares a mapped directory in place,
/// one that holds something is also accepted where the target's own `pg_tblspc/<oid>` link
/// already leads to it (the tablespace's location as the cluster knows it).
pub(crate) fn check_tablespace_dirs(
    map: &BTreeMap<u32, PathBuf>,
    target: &Path,
    force: bool,
    delta: bool,
) -> Result<(), RestoreError> {
    if map.is_empty() {
        return Ok(());
    }
    let target_abs = absolute(target)?;
    let target_resolved = resolve(&target_abs).map_err(|why| RestoreError::TablespaceDir {
        dir: target.to_path_buf(),
        why: format!("the target directory {why}"),
    })?;
    let mut seen: Vec<(u32, PathBuf)> = Vec::new();
    for (oid, dir) in map {
        let bad = |why: String| RestoreError::TablespaceDir { dir: dir.clone(), why };
        if !dir.is_absolute() {
            return Err(bad("is not an absolute path".into()));
        }
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            let to = std::fs::read_link(dir).map(|t| format!(" (to {})", t.display())).unwrap_or_default();
            return Err(bad(format!(
                "is a symbolic link{to}: give the directory it leads to instead (the restore writes into it \
                 and leaves the link as it is)"
            )));
        }
        // The restore acts on the directory itself (never on what a link there leads to), so
        // only its parent is resolved and its own name appended.
        let resolved = match (dir.parent(), dir.file_name()) {
            (Some(parent), Some(name)) => resolve(parent).map_err(bad)?.join(name),
            _ => resolve(dir).map_err(bad)?,
        };
        if resolved.starts_with(&target_resolved) || target_resolved.starts_with(&resolved) {
            return Err(bad(format!("is, holds or lies inside the target directory {}", target.display())));
        }
        if let Some((other, _)) = seen.iter().find(|(_, o)| resolved.starts_with(o) || o.starts_with(&resolved)) {
            return Err(bad(format!("is, holds or lies inside the directory of tablespace {other}")));
        }
        match check_target(dir, force) {
            Ok(()) => {}
            Err(RestoreError::TargetNotEmpty(_)) if delta && link_leads_to(target, *oid, dir) => {}
            Err(RestoreError::TargetNotEmpty(_)) if delta => {
                return Err(bad(format!(
                    "is not empty and the target's pg_tblspc/{oid} does not lead to it (pass --force to compare \
                     and replace the backup's PG_<version> directory in it; nothing beside that is touched)"
                )))
            }
            Err(RestoreError::TargetNotEmpty(_)) => {
                return Err(bad("is not empty (pass --force to replace its contents)".into()))
            }
            Err(e) => return Err(e),
        }
        seen.push((*oid, resolved));
    }
    Ok(())
}

/// Whether `target/pg_tblspc/<oid>` is a link leading to `dir` (as written, or to the same
/// directory once both are resolved).
fn link_leads_to(target: &Path, oid: u32, dir: &Path) -> bool {
    let Ok(to) = std::fs::read_link(target.join("pg_tblspc").join(oid.to_string())) else { return false };
    if to == dir {
        return true;
    }
    let to = if to.is_absolute() { to } else { target.join("pg_tblspc").join(to) };
    matches!((std::fs::canonicalize(&to), std::fs::canonicalize(dir)), (Ok(a), Ok(b)) if a == b)
}

/// Puts the staged tablespaces and target in place. Every place is checked before the first is
/// replaced, so that a refusal (a server started meanwhile on one of them) leaves all as they
/// were. The tablespaces first: the target, which makes a cluster that starts, comes last; if it
/// still fails, the error names the tablespace directories already replaced.
fn commit_all(
    tablespaces: Vec<(Staging, &PathBuf)>,
    target_staging: Staging,
    target: &Path,
    force: bool,
) -> Result<(), RestoreError> {
    for (staging, dir) in &tablespaces {
        staging.check(dir, force)?;
    }
    target_staging.check(target, force)?;
    let mut replaced: Vec<&PathBuf> = Vec::new();
    let after_replaced = |cause: RestoreError, replaced: &[&PathBuf]| {
        if replaced.is_empty() {
            return cause;
        }
        let replaced = replaced.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
        RestoreError::TargetAfterTablespaces { cause: Box::new(cause), replaced }
    };
    for (staging, dir) in tablespaces {
        staging.commit(dir, force).map_err(|e| after_replaced(e, &replaced))?;
        replaced.push(dir);
    }
    target_staging.commit(target, force).map_err(|e| after_replaced(e, &replaced))
}

/// Restores per `opts`, calling `progress(done, total)` while files are written, under a running
/// marker (module documentation).
pub async fn restore(
    repo: &Repository,
    catalog: &Catalog,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    preflight(opts)?;
    // A restore point is resolved before the marker: an unknown name writes nothing at all.
    if let RecoveryTarget::Name(name) = opts.target {
        catalog.restore_point(&name)?;
    }
    // Another cluster's directory is refused before the marker too (and the major version once
    // the backup is chosen).
    if opts.delta && crate::delta::applies(&opts.target_dir)? {
        crate::delta::check(&opts.target_dir, Some(catalog.cluster.system_id), None)?;
    }
    // An unknown tablespace OID is refused before the marker too (and again once the catalog is
    // read under it).
    if !opts.tablespace_map.is_empty() {
        let backup = match &opts.backup_id {
            Some(id) => catalog.named_backup(id, opts.target),
            None => catalog.choose_backup(opts.target),
        };
        if let Ok(backup) = backup {
            check_mapped_oids(backup, opts.tablespace_map.keys().copied())?;
        }
    }
    let marker = announce(opts.marker_repository.as_ref().unwrap_or(repo), RunKind::Restore).await;
    let result = async {
        let catalog = match &marker {
            Some(_) => current_catalog(repo, catalog, opts.target, opts.backup_id.as_deref()).await?,
            None => Cow::Borrowed(catalog),
        };
        restore_marked(repo, &catalog, opts, progress, marker.as_ref(), started).await
    }
    .await;
    if let Some(marker) = marker {
        marker.release().await;
    }
    result
}

/// The restore itself, under `marker` (given the plan once the backup is chosen), from a
/// `catalog` read after the marker was up. `started` is when the restore began (for RTO).
pub(crate) async fn restore_marked(
    repo: &Repository,
    catalog: &Catalog,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
    marker: Option<&RunMarker>,
    started: Instant,
) -> Result<RestoreReport, RestoreError> {
    restore_marked_as(repo, catalog, opts, progress, marker, started, &ServerLaunch::default()).await
}

/// How `--start` runs the restored server besides its port and socket directory.
#[derive(Debug, Clone)]
pub(crate) struct ServerLaunch {
    /// `listen_addresses`: `localhost` for an operator's restore; empty (the Unix socket alone)
    /// for a scratch server nobody else is to reach.
    pub listen_addresses: String,
    /// More `-c name=value` settings, each already quoted for the shell pg_ctl runs.
    pub settings: Vec<String>,
    /// A scratch server (a drill's, a table restore's): an empty `postgresql.conf` and
    /// `pg_ident.conf` are written where the restored directory lacks them (Debian keeps them
    /// in /etc), so that the server starts.
    pub scratch: bool,
}

impl Default for ServerLaunch {
    fn default() -> Self {
        ServerLaunch { listen_addresses: "localhost".into(), settings: Vec::new(), scratch: false }
    }
}

/// What a scratch server is started with whatever the restored cluster configured: it must not
/// reach out of the host or act on its own. Without them, `shared_preload_libraries` loads
/// pg_cron (which connects to localhost:5432, production on the same host, and runs its jobs),
/// enabled subscriptions start apply workers against the real publisher once promoted (taking
/// or advancing its slots, applying rows from after the moment into the copy),
/// `recovery_end_command` runs the cluster's own script, a synchronous standby list makes every
/// commit of the scratch session wait forever, and SSL or log settings naming files elsewhere
/// stop the start. `max_worker_processes` and `max_prepared_transactions` are left as the cluster
/// had them: a hot standby refuses to replay with less than the primary had.
pub(crate) const SCRATCH_SETTINGS: &[&str] = &[
    "max_logical_replication_workers=0",
    "shared_preload_libraries=''",
    "session_preload_libraries=''",
    "local_preload_libraries=''",
    "external_pid_file=''",
    "ssl=off",
    "logging_collector=off",
    "archive_mode=off",
    "recovery_end_command=''",
    "archive_cleanup_command=''",
    "primary_conninfo=''",
    "synchronous_standby_names=''",
    "default_transaction_read_only=off",
    "unix_socket_permissions=0700",
];

impl ServerLaunch {
    /// A scratch server listening on `listen_addresses` ("" for its Unix socket alone), with
    /// [`SCRATCH_SETTINGS`] and `extra`.
    pub(crate) fn scratch(listen_addresses: &str, extra: Vec<String>) -> ServerLaunch {
        let mut settings: Vec<String> = SCRATCH_SETTINGS.iter().map(|s| s.to_string()).collect();
        settings.extend(extra);
        ServerLaunch { listen_addresses: listen_addresses.into(), settings, scratch: true }
    }
}

/// Writes an empty `postgresql.conf` and `pg_ident.conf` into the restored data directory `dir`
/// where it has none (a Debian-style cluster keeps them in /etc): PostgreSQL does not start
/// without `postgresql.conf`. What is there (a file, a link) is left alone.
pub(crate) fn write_missing_config(dir: &Path) -> Result<(), RestoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    for name in ["postgresql.conf", "pg_ident.conf"] {
        let path = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(_) => {
                tracing::info!(file = %path.display(), "the restored directory had none: an empty one was written")
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(RestoreError::Io { path, cause: e }),
        }
    }
    Ok(())
}

/// [`restore_marked`], starting the server as `launch` says.
pub(crate) async fn restore_marked_as(
    repo: &Repository,
    catalog: &Catalog,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
    marker: Option<&RunMarker>,
    started: Instant,
    launch: &ServerLaunch,
) -> Result<RestoreReport, RestoreError> {
    let backup = match &opts.backup_id {
        Some(id) => catalog.named_backup(id, opts.target)?,
        None => catalog.choose_backup(opts.target)?,
    };
    let chain = catalog.chain(backup)?;
    if let Some(marker) = marker {
        let plan = ReadPlan {
            backups: chain.iter().map(|b| b.id.clone()).collect(),
            timeline: backup.timeline,
            wal_from_lsn: backup.start_lsn,
        };
        // Not fatal: the marker stays without a plan, and expire then keeps everything.
        if let Err(e) = marker.set_plan(plan).await {
            tracing::warn!(error = %e, "could not record this restore's plan in its running marker; \
                until it is, `pitr expire` keeps every backup and all WAL");
        }
    }
    let newest_commit = catalog.current_window().and_then(|w| w.newest_commit_us);
    let ReplayBounds { recovery_target, until, to_planned_end } = catalog.replay_bounds(backup, opts.target);
    // The restore point a name resolves to, for checking where recovery stops.
    let named = match (opts.target, recovery_target) {
        (RecoveryTarget::Name(name), RecoveryTarget::Name(_)) if opts.standby.is_none() => {
            Some(catalog.restore_point(&name)?.point.clone())
        }
        _ => None,
    };
    tracing::info!(backup = %backup.id, chain = chain.len(), target = %opts.target, "restoring");

    // An unknown OID or a value the settings cannot hold is refused before the first directory
    // is created.
    check_mapped_oids(backup, opts.tablespace_map.keys().copied())?;
    let settings = match &opts.standby {
        Some(standby) => standby_settings(&opts.restore_command.render_for_standby(), standby)?,
        None => recovery_settings(recovery_target, opts.exclusive, &opts.restore_command.render(until))?,
    };
    let signal = if opts.standby.is_some() { "standby.signal" } else { "recovery.signal" };
    // The same recovery settings and signal file for a plain and a delta restore.
    let write_recovery_files = |dir: &Path| -> Result<(), RestoreError> {
        let auto_conf = dir.join("postgresql.auto.conf");
        // Neither read nor written through a link: the restore's own files stay inside the target.
        let mut conf = read_file_nofollow(&auto_conf)?.unwrap_or_default();
        conf.push_str("\n# Added by pitr restore\n");
        for line in &settings {
            conf.push_str(line);
            conf.push('\n');
        }
        write_file_nofollow(&auto_conf, conf.as_bytes())?;
        write_file_nofollow(&dir.join(signal), b"")
    };
    let delta = if opts.delta && crate::delta::applies(&opts.target_dir)? {
        crate::delta::check(&opts.target_dir, Some(backup.system_id), Some(backup.server_version_num))?;
        let final_dir = absolute(&opts.target_dir)?;
        let report = crate::delta::apply(
            repo,
            &chain,
            &opts.target_dir,
            &final_dir,
            &opts.tablespace_map,
            opts.workers,
            progress,
            &write_recovery_files,
        )
        .await?;
        Some(report)
    } else {
        None
    };
    let bytes_restored = match &delta {
        Some(d) => d.bytes_written,
        None => {
            let mut mapped = MappedTablespaces::default();
            let mut mapped_staging = Vec::new();
            for (oid, dir) in &opts.tablespace_map {
                let staging = Staging::create_in_place(dir)?;
                mapped.0.insert(*oid, MappedTablespace { write_dir: staging.path.clone(), final_dir: dir.clone() });
                mapped_staging.push((staging, dir));
            }
            let staging = Staging::create(&opts.target_dir)?;
            let final_dir = absolute(&opts.target_dir)?;
            let bytes_restored =
                materialize(repo, &chain, &staging.path, &final_dir, &mapped, opts.workers, progress).await?;
            write_recovery_files(&staging.path)?;
            commit_all(mapped_staging, staging, &opts.target_dir, opts.force)?;
            bytes_restored
        }
    };
    let download_seconds = started.elapsed().as_secs_f64();

    let mut report = RestoreReport {
        target: catalog.describe_target(opts.target, backup),
        target_dir: opts.target_dir.display().to_string(),
        backup_id: backup.id.clone(),
        backup_kind: backup.kind,
        backup_chain: chain.iter().map(|b| b.id.clone()).collect(),
        backup_start_lsn: format_lsn(backup.start_lsn),
        backup_stop_time: format_time(backup.stop_time_us),
        backup_stop_lsn: format_lsn(backup.stop_lsn),
        files: backup.files.len(),
        bytes_restored,
        recovery_settings: reported_settings(&settings),
        mapped_tablespaces: opts.tablespace_map.iter().map(|(oid, d)| (*oid, d.display().to_string())).collect(),
        delta,
        newest_archived_commit: newest_commit.map(format_time),
        standby: opts.standby.is_some(),
        started: false,
        port: None,
        last_replayed_commit_time: None,
        last_replayed_lsn: None,
        last_replayed_xid: None,
        wal_replayed_bytes: None,
        data_loss_window_seconds: None,
        download_seconds,
        replay_seconds: None,
        total_seconds: download_seconds,
        stop_command: None,
        landing: None,
    };
    let Some(start) = &opts.start else {
        report.landing = named.map(|p| Landing {
            verified: false,
            detail: format!(
                "not verified (no --start): PostgreSQL stops at the first restore point {:?} it replays; once the \
                 server has promoted, the last line of the newest pg_wal/*.history must name {} as the switch \
                 point (the end of the indexed one), else an earlier one of the name stopped it",
                p.name,
                format_lsn(p.end_lsn)
            ),
        });
        return Ok(report);
    };

    let replay_started = Instant::now();
    if report.standby {
        let (commit_us, lsn) = run_until(&opts.target_dir, start, launch, Until::Consistent).await?;
        report.started = true;
        report.port = Some(start.port);
        report.replay_seconds = Some(replay_started.elapsed().as_secs_f64());
        report.total_seconds = started.elapsed().as_secs_f64();
        report.last_replayed_commit_time = commit_us.map(format_time);
        report.last_replayed_lsn = Some(format_lsn(lsn));
        report.stop_command =
            Some(format!("{} -D {} stop", start.bin_dir.join("pg_ctl").display(), opts.target_dir.display()));
        return Ok(report);
    }
    let (commit_us, lsn) = run_until(&opts.target_dir, start, launch, Until::Promoted).await?;
    // Segments prefetched beyond the target are of no use once the server has promoted.
    let _ = std::fs::remove_dir_all(opts.target_dir.join("pg_wal").join(crate::walfetch::SPOOL_DIR));
    if let Some(point) = &named {
        match check_landing(&opts.target_dir, point, lsn) {
            Ok(detail) => report.landing = Some(Landing { verified: true, detail }),
            Err(e) => {
                stop_restored_server(&start.bin_dir, &opts.target_dir);
                return Err(e);
            }
        }
    }
    report.started = true;
    report.port = Some(start.port);
    report.replay_seconds = Some(replay_started.elapsed().as_secs_f64());
    report.total_seconds = started.elapsed().as_secs_f64();
    // PostgreSQL knows the last commit it replayed; when recovery replayed none (a target just
    // after the backup), the newest commit in the restored data is the last one before the
    // replay position, which the archived WAL tells.
    let from_wal = last_commit_before(repo, catalog, lsn).await;
    let commit_us = commit_us.or(from_wal.map(|(_, t)| t));
    report.last_replayed_commit_time = commit_us.map(format_time);
    report.last_replayed_lsn = Some(format_lsn(lsn));
    report.wal_replayed_bytes = Some(lsn.saturating_sub(backup.start_lsn));
    report.last_replayed_xid = from_wal.map(|(xid, _)| xid);
    // The data-loss window: from the last replayed commit to the moment restored to. Past the
    // newest commit, the archive is known complete up to the target, so the state there is the
    // state after the newest commit.
    let reference = match opts.target {
        RecoveryTarget::Time(_) if to_planned_end => newest_commit,
        RecoveryTarget::Time(t) => Some(t),
        RecoveryTarget::Latest => newest_commit,
        _ => None,
    };
    if let (Some(reference), Some(commit)) = (reference, commit_us) {
        report.data_loss_window_seconds = Some((reference - commit).max(0) as f64 / 1e6);
    }
    report.stop_command =
        Some(format!("{} -D {} stop", start.bin_dir.join("pg_ctl").display(), opts.target_dir.display()));
    Ok(report)
}

/// Where recovery of the promoted server in `dir` stopped, against the indexed restore `point`:
/// the switch point of the newest timeline's history file (PostgreSQL writes it at promotion:
/// the end of the last record replayed, with the reason), or else the replay LSN `replayed`.
/// The text of what was checked, or the error naming both LSNs.
fn check_landing(dir: &Path, point: &RestorePoint, replayed: u64) -> Result<String, RestoreError> {
    let (landed, seen) = match newest_history(&dir.join("pg_wal")) {
        Some((file, switch_lsn, line)) => (switch_lsn, format!("{file}: {line:?}")),
        None => (replayed, format!("the replay LSN {}", format_lsn(replayed))),
    };
    if landed == point.end_lsn {
        return Ok(format!(
            "verified: recovery stopped at {}, the end of restore point {:?} at {} ({seen})",
            format_lsn(landed),
            point.name,
            format_lsn(point.lsn)
        ));
    }
    Err(RestoreError::MissedRestorePoint(Box::new(MissedRestorePoint {
        name: point.name.clone(),
        expected: format_lsn(point.end_lsn),
        landed: format_lsn(landed),
        seen,
        dir: dir.to_path_buf(),
        lsn_target: format!("lsn:{}", format_lsn(point.lsn)),
    })))
}

/// Recovery to a name stopped elsewhere than the indexed restore point: at an earlier one of the
/// name the index lacks ([`RestoreError::MissedRestorePoint`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "recovery stopped at {landed} ({seen}), not at the end of restore point {name:?} ({expected}): an earlier \
     restore point of that name, which the index of restore points lacks (WAL archived before pitr indexed them, \
     an entry lost or unreadable), stopped it first. The directory {dir} holds the state at that earlier one, not \
     the one asked for: the restored server was stopped, do not use it. Restore again with --to {lsn_target}, \
     which stops right after the indexed one",
    dir = dir.display()
)]
pub struct MissedRestorePoint {
    /// The restore point's name.
    pub name: String,
    /// Where the indexed restore point ends (what recovery should have stopped at).
    pub expected: String,
    /// Where recovery stopped.
    pub landed: String,
    /// What said so (the history file's line, or the replay LSN).
    pub seen: String,
    /// The target directory.
    pub dir: PathBuf,
    /// The `--to` that reaches the indexed restore point regardless.
    pub lsn_target: String,
}

/// The newest timeline history file in `pg_wal` (the one promotion wrote): its name, the switch
/// point of its last line, and that line.
fn newest_history(pg_wal: &Path) -> Option<(String, u64, String)> {
    let newest = std::fs::read_dir(pg_wal)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| Some((pitr_pgformat::timeline::parse_history_file_name(&name)?, name)))
        .max()?;
    let text = std::fs::read_to_string(pg_wal.join(&newest.1)).ok()?;
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty() && !l.starts_with('#'))?.to_string();
    let switch_lsn = pitr_pgformat::timeline::parse_history(&text).ok()?.last()?.switch_lsn;
    Some((newest.1, switch_lsn, line))
}

/// Stops a restored server that must not be used (`pg_ctl stop -m fast`); a failure leaves it
/// to the operator, whom the error tells.
fn stop_restored_server(bin_dir: &Path, dir: &Path) {
    let stopped = Command::new(bin_dir.join("pg_ctl")).arg("-D").arg(dir).args(["-m", "fast", "-w", "stop"]).output();
    if !stopped.is_ok_and(|o| o.status.success()) {
        tracing::warn!(dir = %dir.display(), "could not stop the restored server");
    }
}

/// What [`run_until`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// Recovery ended and the server promoted.
    Promoted,
    /// A standby accepts read-only connections.
    Consistent,
}

/// Starts the server on the restored directory and waits for `until`: recovery ended and the
/// server promoted, or (a standby) consistent, taking read-only connections (hot_standby) while
/// it stays in recovery. Returns the last replayed commit time and replay LSN at that moment.
async fn run_until(
    dir: &Path,
    start: &StartOptions,
    launch: &ServerLaunch,
    until: Until,
) -> Result<(Option<i64>, u64), RestoreError> {
    let dir = std::fs::canonicalize(dir).map_err(|e| RestoreError::Io { path: dir.to_path_buf(), cause: e })?;
    let log = dir.join("pitr-restore-server.log");
    if launch.scratch {
        write_missing_config(&dir)?;
    }
    let socket_dir = dir.display().to_string();
    let mut options = format!(
        "-p {} -c listen_addresses='{}' -c unix_socket_directories='{socket_dir}'",
        start.port, launch.listen_addresses
    );
    for setting in &launch.settings {
        options.push_str(" -c ");
        options.push_str(setting);
    }
    let out = Command::new(start.bin_dir.join("pg_ctl"))
        .arg("-D")
        .arg(&dir)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(&options)
        .arg("start")
        .output()
        .map_err(|e| RestoreError::Server(format!("running {}: {e}", start.bin_dir.join("pg_ctl").display())))?;
    if !out.status.success() {
        return Err(RestoreError::Server(format!(
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            log_tail(&log)
        )));
    }
    let conninfo =
        format!("host={socket_dir} port={} user={} dbname=postgres connect_timeout=5", start.port, start.db_user);
    let deadline = Instant::now() + start.timeout;
    let mut last_error = String::new();
    loop {
        if Instant::now() > deadline {
            let what = match until {
                Until::Promoted => "recovery did not finish",
                Until::Consistent => "the standby did not become consistent",
            };
            return Err(RestoreError::Server(format!(
                "{what} within {:?} (last: {last_error}); the server is still running\n{}",
                start.timeout,
                log_tail(&log)
            )));
        }
        if !dir.join("postmaster.pid").exists() {
            return Err(RestoreError::Server(format!("the server stopped during recovery:\n{}", log_tail(&log))));
        }
        match query_state(&conninfo, until).await {
            Ok(Some(state)) => return Ok(state),
            Ok(None) => {}
            Err(StateError::Refused(e)) => {
                return Err(RestoreError::Server(format!(
                    "the restored server refused role {:?} ({e}); the role must exist (and log in over the \
                     local socket) in the cluster as it was at the moment restored to: choose another with \
                     --db-user (if the server in {dir} is still running, stop it with pg_ctl -D {dir} stop)",
                    start.db_user,
                    dir = dir.display()
                )))
            }
            Err(StateError::NotYet(e)) => last_error = e,
            Err(StateError::LeftRecovery) => {
                return Err(RestoreError::Server(format!(
                    "the standby in {} is out of recovery: it was promoted (pg_promote, pg_ctl promote) before \
                     it was reported consistent; it is running as a primary now",
                    dir.display()
                )))
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Why the restored server could not be asked how far it is.
enum StateError {
    /// Not yet (starting up, not accepting connections): asked again.
    NotYet(String),
    /// The role does not exist or may not log in: asking again changes nothing.
    Refused(String),
    /// A standby is out of recovery: something promoted it before it was reported consistent.
    LeftRecovery,
}

/// Whether `e` says the role itself was refused (SQLSTATE class 28: it does not exist, or
/// authentication failed), not that the server is not ready yet.
fn role_refused(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("28"))
}

/// The server's own words where it sent an error (tokio_postgres shows only "db error").
pub(crate) fn server_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// `Some((last commit µs, replay LSN))` once the server has left recovery, or for
/// [`Until::Consistent`] once it answers at all while still in recovery.
async fn query_state(conninfo: &str, until: Until) -> Result<Option<(Option<i64>, u64)>, StateError> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await.map_err(|e| {
        if role_refused(&e) {
            StateError::Refused(server_message(&e))
        } else {
            StateError::NotYet(server_message(&e))
        }
    })?;
    let task = tokio::spawn(connection);
    let row = client
        .query_one(
            "select pg_is_in_recovery(), \
             (extract(epoch from pg_last_xact_replay_timestamp()) * 1000000)::int8, \
             coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text",
            &[],
        )
        .await
        .map_err(|e| StateError::NotYet(e.to_string()))?;
    drop(client);
    task.abort();
    let in_recovery: bool = row.get(0);
    match until {
        Until::Promoted if in_recovery => return Ok(None),
        Until::Consistent if !in_recovery => return Err(StateError::LeftRecovery),
        Until::Promoted | Until::Consistent => {}
    }
    let commit: Option<i64> = row.get(1);
    let lsn: String = row.get(2);
    Ok(Some((commit, parse_lsn(&lsn).unwrap_or(0))))
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("server log {} (last lines):\n{}", log.display(), lines[lines.len().saturating_sub(15)..].join("\n"))
}

/// The last commit/abort that ends at or before `lsn`, read from the archived WAL: (xid, time in
/// µs since the Unix epoch). Looks back a few segments when the newest holds none (an idle
/// primary, or a target just after a backup).
async fn last_commit_before(repo: &Repository, catalog: &Catalog, lsn: u64) -> Option<(u32, i64)> {
    let layout = WalLayout::new(&catalog.cluster);
    let newest = layout.segno_of(lsn.checked_sub(1)?);
    for segno in (newest.saturating_sub(4)..=newest).rev() {
        // The replayed WAL is on the newest timeline holding that segment.
        let Some(timeline) = catalog.wal.segments.keys().filter(|(_, s)| *s == segno).map(|(t, _)| *t).max() else {
            continue;
        };
        let file = layout.segment_file_name(timeline, segno);
        let Ok((_, data)) = read_wal_file(repo, &catalog.cluster, &file).await else { continue };
        let mut decoder = WalDecoder::new(catalog.cluster.wal_segment_size, catalog.cluster.wal_page_size);
        let mut records = Vec::new();
        decoder.feed(layout.segment_start(segno), &data, &mut records);
        if let Some(last) = records.iter().rev().find(|r| r.end_lsn <= lsn.next_multiple_of(8)) {
            return Some((last.xid, pg_timestamp_to_unix_micros(last.timestamp)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_without_its_config_files_gets_empty_ones_and_others_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        write_missing_config(dir.path()).unwrap();
        for name in ["postgresql.conf", "pg_ident.conf"] {
            assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), b"", "{name}");
        }
        let kept = tempfile::tempdir().unwrap();
        std::fs::write(kept.path().join("postgresql.conf"), "port = 5999\n").unwrap();
        std::os::unix::fs::symlink("/nonexistent/pg_ident.conf", kept.path().join("pg_ident.conf")).unwrap();
        write_missing_config(kept.path()).unwrap();
        assert_eq!(std::fs::read_to_string(kept.path().join("postgresql.conf")).unwrap(), "port = 5999\n");
        assert!(std::fs::symlink_metadata(kept.path().join("pg_ident.conf")).unwrap().file_type().is_symlink());
        assert!(write_missing_config(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_scratch_server_loads_nothing_and_reaches_nowhere() {
        let launch = ServerLaunch::scratch("", vec!["hba_file='/x'".into()]);
        assert!(launch.scratch && launch.listen_addresses.is_empty());
        for s in ["max_logical_replication_workers=0", "shared_preload_libraries=''", "ssl=off", "archive_mode=off"] {
            assert!(launch.settings.iter().any(|l| l == s), "{s}");
        }
        assert_eq!(launch.settings.last().map(String::as_str), Some("hba_file='/x'"));
        assert!(!ServerLaunch::default().scratch);
    }

    #[test]
    fn tablespace_directories_are_absolute_apart_and_empty_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let target = root.join("data");
        let check = |pairs: &[(u32, PathBuf)], force: bool| {
            check_tablespace_dirs(&pairs.iter().cloned().collect(), &target, force, false)
        };
        let refused = |pairs: &[(u32, PathBuf)], force: bool, why: &str| match check(pairs, force) {
            Err(RestoreError::TablespaceDir { why: w, .. }) => assert!(w.contains(why), "{w}"),
            other => panic!("{pairs:?}: expected a refusal ({why}), got {other:?}"),
        };
        check(&[(1, root.join("ts1")), (2, root.join("ts2"))], false).unwrap();
        refused(&[(1, PathBuf::from("ts1"))], false, "absolute");
        refused(&[(1, root.join("a/../ts1"))], false, "\"..\"");
        refused(&[(1, target.join("ts1"))], false, "target");
        refused(&[(1, target.clone())], false, "target");
        refused(&[(1, root.clone())], false, "target");
        refused(&[(1, root.join("ts1")), (2, root.join("ts1/sub"))], false, "tablespace 1");
        // Another spelling of the same place (a link) is the same place.
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("alias")).unwrap();
        refused(&[(1, root.join("real/ts")), (2, root.join("alias/ts"))], false, "tablespace 1");
        std::fs::create_dir(root.join("full")).unwrap();
        std::fs::write(root.join("full/PG_VERSION"), b"15").unwrap();
        refused(&[(1, root.join("full"))], false, "not empty");
        check(&[(1, root.join("full"))], true).unwrap();
        // A link in DIR's place is refused, also with --force (naming where it leads), and a
        // link inside the target is not taken for the place it leads to.
        std::os::unix::fs::symlink(root.join("real"), root.join("ts-link")).unwrap();
        refused(&[(1, root.join("ts-link"))], false, "symbolic link (to ");
        refused(&[(1, root.join("ts-link"))], true, "symbolic link");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(root.join("real"), target.join("ts")).unwrap();
        refused(&[(1, target.join("ts"))], true, "symbolic link");
        refused(&[(1, root.join("alias/ts-in-real")), (2, root.join("real"))], false, "tablespace");
    }

    /// A delta restore compares a mapped directory in place, so one holding something is taken
    /// without --force only where the target's own tablespace link already leads to it: a typo
    /// (`16384=/srv`) or another cluster's location is refused.
    #[test]
    fn a_delta_restore_takes_a_filled_mapped_directory_only_where_the_target_leads_to_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let target = root.join("data");
        std::fs::create_dir_all(target.join("pg_tblspc")).unwrap();
        let location = root.join("location");
        std::fs::create_dir_all(location.join("PG_15_202209061/5")).unwrap();
        std::fs::write(location.join("PG_15_202209061/5/16385"), b"rel").unwrap();
        let map: BTreeMap<u32, PathBuf> = [(16384, location.clone())].into();
        let refused = |map: &BTreeMap<u32, PathBuf>, force: bool, delta: bool, why: &str| match check_tablespace_dirs(
            map, &target, force, delta,
        ) {
            Err(RestoreError::TablespaceDir { why: w, .. }) => assert!(w.contains(why), "{w}"),
            other => panic!("expected a refusal ({why}), got {other:?}"),
        };
        refused(&map, false, true, "pg_tblspc/16384 does not lead to it");
        // Another tablespace's link does not count.
        std::os::unix::fs::symlink(&location, target.join("pg_tblspc/16385")).unwrap();
        refused(&map, false, true, "does not lead to it");
        std::os::unix::fs::symlink(&location, target.join("pg_tblspc/16384")).unwrap();
        check_tablespace_dirs(&map, &target, false, true).unwrap();
        // A plain restore replaces the directory's contents: still only with --force.
        refused(&map, false, false, "pass --force to replace its contents");
        // Another spelling of the same place is the same place.
        std::fs::remove_file(target.join("pg_tblspc/16384")).unwrap();
        std::os::unix::fs::symlink("../../location", target.join("pg_tblspc/16384")).unwrap();
        check_tablespace_dirs(&map, &target, false, true).unwrap();
        // With --force any directory is taken (the delta restore then touches only its own
        // PG_<version> directory there).
        std::fs::remove_file(target.join("pg_tblspc/16384")).unwrap();
        check_tablespace_dirs(&map, &target, true, true).unwrap();
        // Missing or empty needs nothing.
        let fresh: BTreeMap<u32, PathBuf> = [(16384, root.join("fresh"))].into();
        check_tablespace_dirs(&fresh, &target, false, true).unwrap();
    }

    /// A target in use (its postmaster.pid names a running process: this one) is refused before
    /// any mapped directory is touched, also with --force; the staged files are gone.
    #[test]
    fn a_target_in_use_is_refused_before_a_mapped_directory_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let (target, ts) = (tmp.path().join("data"), tmp.path().join("ts"));
        for dir in [&target, &ts] {
            std::fs::create_dir(dir).unwrap();
        }
        std::fs::write(target.join("postmaster.pid"), format!("{}\n", std::process::id())).unwrap();
        std::fs::write(ts.join("PG_15_old"), b"old").unwrap();
        let ts_staging = Staging::create_in_place(&ts).unwrap();
        std::fs::write(ts_staging.path.join("PG_15_new"), b"new").unwrap();
        let target_staging = Staging::create(&target).unwrap();
        let err = commit_all(vec![(ts_staging, &ts)], target_staging, &target, true).unwrap_err();
        assert!(matches!(err, RestoreError::TargetInUse { .. }), "{err}");
        let names: Vec<_> = std::fs::read_dir(&ts).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["PG_15_old"], "the mapped directory was changed");
        let mut beside: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        beside.sort();
        assert_eq!(beside, ["data", "ts"], "a staging directory was left");
    }

    #[test]
    fn recovery_settings_quote_and_use_numeric_offsets() {
        let s = recovery_settings(
            RecoveryTarget::Time(1_795_615_380_000_000),
            false,
            "\"/opt/it's/pitr\" wal-fetch \"%f\" \"%p\"",
        )
        .unwrap();
        assert_eq!(s[0], "restore_command = '\"/opt/it''s/pitr\" wal-fetch \"%f\" \"%p\"'");
        assert_eq!(s[1], "recovery_target_time = '2026-11-25 14:03:00.000000+00'");
        assert_eq!(s[2], "recovery_target_action = 'promote'");
        let standby = StandbyOptions { primary_conninfo: Some("host=db1 user=rep password=it's".into()) };
        let lines = standby_settings("x", &standby).unwrap();
        assert_eq!(
            lines,
            vec![
                "restore_command = 'x'",
                "recovery_target_timeline = 'latest'",
                "primary_conninfo = 'host=db1 user=rep password=it''s'",
                "primary_slot_name = ''",
            ]
        );
        let shown = reported_settings(&lines);
        assert_eq!(shown[2], "primary_conninfo = (set; see postgresql.auto.conf)");
        // A password in URI form is not printed either.
        let uri = StandbyOptions { primary_conninfo: Some("postgresql://rep:secret@db1/postgres".into()) };
        let shown = reported_settings(&standby_settings("x", &uri).unwrap());
        assert!(!shown.iter().any(|l| l.contains("secret")), "{shown:?}");
        // Without a primary: the backup's own primary and slot (if it has any) are overridden.
        let alone = standby_settings("x", &StandbyOptions::default()).unwrap();
        assert_eq!(alone[2..], ["primary_conninfo = ''", "primary_slot_name = ''"]);
        assert_eq!(reported_settings(&alone)[2], "primary_conninfo = ''");
        let wal_fetch = WalFetchCommand { program: "pitr".into(), options: vec!["--from".into(), "dr".into()] };
        assert_eq!(wal_fetch.render_for_standby(), "pitr wal-fetch --from dr --whole-segments \"%f\" \"%p\"");
        assert_eq!(wal_fetch.render(Some(0x1_0000_0000)), "pitr wal-fetch --from dr --until-lsn 1/0 \"%f\" \"%p\"");
        let latest = recovery_settings(RecoveryTarget::Latest, false, "x").unwrap();
        assert_eq!(latest, vec!["restore_command = 'x'", "recovery_target_timeline = 'latest'"]);
        // --exclusive: stop just before the transaction's commit.
        let before = recovery_settings(RecoveryTarget::Xid(731), true, "x").unwrap();
        assert_eq!(before[1..3], ["recovery_target_xid = '731'", "recovery_target_inclusive = off"]);
    }

    /// As `ALTER SYSTEM` writes them: `'` and `\` doubled, so that PostgreSQL's lexer reads the
    /// value back as given; a line break (which would start a setting of its own), a carriage
    /// return or a NUL is refused.
    #[test]
    fn settings_are_escaped_as_alter_system_does_and_line_breaks_refused() {
        assert_eq!(conf_quote("primary_conninfo", r"password='it\'s'").unwrap(), r"'password=''it\\''s'''");
        assert_eq!(conf_quote("primary_conninfo", r"x\' ").unwrap(), r"'x\\'' '");
        assert_eq!(conf_quote("primary_conninfo", r"pa\\ss").unwrap(), r"'pa\\\\ss'");
        assert_eq!(conf_quote("restore_command", r"C:\pitr").unwrap(), r"'C:\\pitr'");
        for (value, what) in [
            ("x\\'\nshared_preload_libraries = 'evil'\n#", "line break"),
            ("host=db1\r", "carriage return"),
            ("host=db1\0", "NUL"),
        ] {
            let text = conf_quote("primary_conninfo", value).unwrap_err().to_string();
            assert!(text.contains("primary_conninfo") && text.contains(what), "{text}");
        }
        let newline = StandbyOptions { primary_conninfo: Some("host=db1\nport=1".into()) };
        assert!(matches!(standby_settings("x", &newline), Err(RestoreError::SettingValue { .. })));
        assert!(matches!(
            recovery_settings(RecoveryTarget::Latest, false, "a\nb"),
            Err(RestoreError::SettingValue { .. })
        ));
    }
}
