//! `--source files`: backup, restore and verify of `[[files]]` sets ([`pitr_files::tree`]), and
//! their share of `pitr list` and `pitr expire`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use pitr_archive::running::RunKind;
use pitr_archive::time::{format_rfc3339_micros, parse_time};
use pitr_archive::{names, Repository};
use pitr_files::tree::{self, BackupProgress, Excludes, RestoreOptions, SetSpec, Skipped, TreeManifest};
use pitr_files::{BlockRef, BlockStore};
use serde::Serialize;

use crate::config::{Config, FilesConfig};
use crate::{open, output};

/// `pitr restore --source files`.
pub struct RestoreArgs {
    /// The `[[files]]` set.
    pub set: String,
    /// TIME or `latest`.
    pub to: String,
    /// Must not exist, or be empty.
    pub target_dir: PathBuf,
    /// `--path` patterns (empty: everything).
    pub paths: Vec<String>,
    /// Print JSON.
    pub json: bool,
    /// Read from this repository first.
    pub from: Option<String>,
}

fn spec_of(config: &Config, f: &FilesConfig) -> Result<SetSpec> {
    let excludes = Excludes::new(&f.exclude).map_err(|e| anyhow!("[[files]] {:?}: {e}", f.name))?;
    let stale_backup_after = config.retention.stale_backup_after;
    Ok(SetSpec { name: f.name.clone(), root: f.path.clone(), excludes, stale_backup_after })
}

/// What a backup of a set did (one line for the log via Display, or `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct FilesBackupSummary {
    /// The set.
    pub set: String,
    /// The backup's id.
    pub id: String,
    /// `full` or `incremental` (an incremental without an earlier backup is a full).
    pub kind: String,
    /// The backup an incremental compared against.
    pub parent: Option<String>,
    /// When it finished (RFC 3339): `--to` this time or later restores it.
    pub stop_time: String,
    /// Regular files in the backup.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Bytes of all files' content.
    pub logical_bytes: u64,
    /// Bytes read from the tree.
    pub bytes_read: u64,
    /// Blocks put.
    pub new_blocks: u64,
    /// Blocks found stored already (or reused from the parent unread).
    pub reused_blocks: u64,
    /// Bytes the new blocks take in the repository.
    pub stored_bytes: u64,
    /// Files that kept changing while they were read (kept as last read).
    pub changed: Vec<String>,
    /// Paths left out, with why.
    pub skipped: Vec<Skipped>,
    /// Seconds the backup took.
    pub duration_seconds: f64,
    /// `stop_time` in µs, for the metrics.
    #[serde(skip)]
    pub stop_time_us: i64,
}

impl FilesBackupSummary {
    fn of(m: &TreeManifest, seconds: f64) -> FilesBackupSummary {
        FilesBackupSummary {
            set: m.set.clone(),
            id: m.id.clone(),
            kind: m.kind.to_string(),
            parent: m.parent.clone(),
            stop_time: format_rfc3339_micros(m.stop_time_us),
            files: m.files,
            dirs: m.dirs,
            symlinks: m.symlinks,
            logical_bytes: m.logical_bytes,
            bytes_read: m.bytes_read,
            new_blocks: m.new_blocks,
            reused_blocks: m.reused_blocks,
            stored_bytes: m.stored_bytes,
            changed: m.changed.clone(),
            skipped: m.skipped.clone(),
            duration_seconds: seconds,
            stop_time_us: m.stop_time_us,
        }
    }
}

impl std::fmt::Display for FilesBackupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} backup {} of set {}: {} files, {} dirs, {} symlinks, {} bytes, {} bytes read, {} bytes stored ({} new blocks, {} reused), {} changed during the backup, {} skipped, {:.1} s",
            self.kind,
            self.id,
            self.set,
            self.files,
            self.dirs,
            self.symlinks,
            self.logical_bytes,
            self.bytes_read,
            self.stored_bytes,
            self.new_blocks,
            self.reused_blocks,
            self.changed.len(),
            self.skipped.len(),
            self.duration_seconds
        )
    }
}

/// Backs up `set` and sets its metrics (success or failure).
async fn backup_with_metrics(
    config: &Config,
    set: &str,
    incremental: bool,
    progress: &(dyn Fn(BackupProgress) + Sync),
) -> Result<FilesBackupSummary> {
    let f = config.files_set(set)?;
    let labels = [
        ("backup_type", if incremental { "incremental" } else { "full" }.to_string()),
        ("source", "files".to_string()),
        ("set", set.to_string()),
    ];
    let result = async {
        let spec = spec_of(config, f)?;
        let repo = open::writer(config)?;
        repo.check().await?;
        let store = BlockStore::open(&repo).await?;
        let started = Instant::now();
        let m = tree::backup(&store, &spec, incremental, progress)
            .await
            .with_context(|| format!("backup of file set {set} ({})", f.path.display()))?;
        anyhow::Ok(FilesBackupSummary::of(&m, started.elapsed().as_secs_f64()))
    }
    .await;
    match &result {
        Ok(s) => {
            metrics::gauge!("backup_success", &labels).set(1.0);
            metrics::gauge!("pitr_last_backup_timestamp_seconds", &labels).set(s.stop_time_us as f64 / 1e6);
            metrics::gauge!("backup_size_bytes", &labels).set(s.logical_bytes as f64);
            metrics::gauge!("pitr_files_changed_during_backup", "set" => set.to_string()).set(s.changed.len() as f64);
        }
        Err(_) => metrics::gauge!("backup_success", &labels).set(0.0),
    }
    result
}

/// `pitr backup --source files --set NAME`.
pub async fn backup(config_path: &Path, set: &str, incremental: bool, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let bar = output::progress_bar(!json, "backup");
    let on_progress = |p: BackupProgress| {
        if let Some(bar) = &bar {
            bar.set_length(p.total_bytes);
            bar.set_position(p.bytes);
        }
    };
    let result = backup_with_metrics(&config, set, incremental, &on_progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = result?;
    if json {
        output::print_json(&summary)?;
        return Ok(());
    }
    if incremental && summary.parent.is_none() {
        println!("note: set {set} had no backup to compare against: took a full backup");
    }
    println!("{summary}");
    for c in &summary.changed {
        println!("CHANGED DURING BACKUP {c}: it kept changing while it was read; its last read is kept");
    }
    for s in &summary.skipped {
        println!("SKIPPED {}: {}", s.path, s.why);
    }
    Ok(())
}

/// A backup of `set` for the sidecar's scheduler; sets the set's metrics.
pub async fn backup_set(config: &Config, set: &str, incremental: bool) -> Result<FilesBackupSummary> {
    backup_with_metrics(config, set, incremental, &|_| {}).await
}

/// `pitr restore --source files`.
pub async fn restore(config_path: &Path, args: RestoreArgs) -> Result<()> {
    let config = Config::load(config_path)?;
    config.files_set(&args.set)?;
    let to = match args.to.trim() {
        "latest" => None,
        t => Some(parse_time(t).ok_or_else(|| {
            anyhow!("--to {t:?}: not a time (use RFC 3339 such as 2026-11-25T14:03:00Z, or `latest`)")
        })?),
    };
    let repo = open::reader(&config, args.from.as_deref())?;
    repo.check().await?;
    // Announced before the backups are listed, so a `pitr expire` after this sweeps none of the
    // blocks this restore reads.
    let marker = match open::single(&config, None) {
        Ok(primary) => pitr_restore::recover::announce(&primary, RunKind::Restore).await,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no running marker: a `pitr expire` meanwhile could remove blocks this restore reads");
            None
        }
    };
    let result = restore_from(&repo, &args, to).await;
    if let Some(marker) = marker {
        marker.release().await;
    }
    let (m, summary) = result?;
    if args.json {
        output::print_json(&serde_json::json!({
            "set": m.set,
            "backup": m.id,
            "kind": m.kind,
            "stop_time": format_rfc3339_micros(m.stop_time_us),
            "target_dir": args.target_dir,
            "paths": args.paths,
            "files": summary.files,
            "dirs": summary.dirs,
            "symlinks": summary.symlinks,
            "bytes": summary.bytes,
            "owners_restored": summary.owners_restored,
        }))?;
        return Ok(());
    }
    println!(
        "restored backup {} of file set {} ({}, finished {}) into {}: {} files, {} dirs, {} symlinks, {} bytes",
        m.id,
        m.set,
        m.kind,
        format_rfc3339_micros(m.stop_time_us),
        args.target_dir.display(),
        summary.files,
        summary.dirs,
        summary.symlinks,
        summary.bytes
    );
    if !summary.owners_restored {
        println!("note: owners (uid/gid) were not restored: that needs root; modes, mtimes and symlinks were");
    }
    Ok(())
}

async fn restore_from(
    repo: &Repository,
    args: &RestoreArgs,
    to: Option<i64>,
) -> Result<(TreeManifest, tree::RestoreSummary)> {
    let (backups, damaged) = TreeManifest::list_sound(repo, Some(&args.set)).await?;
    for (name, why) in &damaged {
        tracing::warn!(manifest = %name, "a file-set manifest that does not open is left out: {why}");
    }
    let m = tree::select_time(&args.set, &backups, to)?.clone();
    let store = BlockStore::open(repo).await?;
    let opts = RestoreOptions { target_dir: args.target_dir.clone(), paths: args.paths.clone() };
    let summary = tree::restore(&store, &m, &opts).await.context("restore")?;
    Ok((m, summary))
}

/// A problem `pitr verify --source files` found in the repository.
#[derive(Debug, Clone, Serialize)]
struct Finding {
    set: String,
    kind: &'static str,
    object: String,
    message: String,
}

#[derive(Debug, Clone, Serialize)]
struct SetVerify {
    set: String,
    backups: usize,
    blocks: usize,
    missing_blocks: usize,
    live: Option<tree::LiveReport>,
    /// Corrupt files (from --live) plus objects missing or not opening.
    mismatches: usize,
}

/// `pitr verify --source files [--set NAME] [--live] [--deep]`: every manifest opens and every
/// block it references exists (`--deep`: opens, and is the content its name says); `--live` also compares the newest backup with the live tree. Exit 1 on a
/// repository finding or a corrupt file (content changed under the same size and mtime); other
/// differences from the live tree are listed but are a living tree's, not failures.
pub async fn verify(config_path: &Path, set: Option<&str>, live: bool, deep: bool, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let sets: Vec<&FilesConfig> = match set {
        Some(s) => vec![config.files_set(s)?],
        None if config.files.is_empty() => {
            anyhow::bail!("the config has no [[files]] sets to verify")
        }
        None => config.files.iter().collect(),
    };
    let repo = open::single(&config, None)?;
    let mut findings = Vec::new();
    let mut results = Vec::new();
    for f in sets {
        let (backups, damaged) = TreeManifest::list_sound(&repo, Some(&f.name)).await?;
        let mut found: Vec<Finding> = damaged
            .into_iter()
            .map(|(object, message)| Finding { set: f.name.clone(), kind: "manifest", object, message })
            .collect();
        let blocks: BTreeMap<&str, &BlockRef> = backups
            .iter()
            .flat_map(|m| m.entries.iter())
            .filter_map(|e| match &e.kind {
                tree::EntryKind::File { blocks, .. } => Some(blocks.iter().map(|b| (b.id.as_str(), b))),
                _ => None,
            })
            .flatten()
            .collect();
        let users = |id: &str| -> String {
            backups
                .iter()
                .filter(|m| {
                    m.entries.iter().any(|e| {
                        matches!(&e.kind, tree::EntryKind::File { blocks, .. } if blocks.iter().any(|b| b.id == id))
                    })
                })
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let store = if deep { Some(BlockStore::open(&repo).await?) } else { None };
        let mut missing = 0;
        for (id, block) in &blocks {
            let name = names::files::block(id);
            let problem = match &store {
                // --deep: every block opens, and is the content its name says (junk stored under
                // a block's name is found).
                Some(store) => match store.read_block(block).await {
                    Ok(_) => None,
                    Err(pitr_files::FilesError::Repository(pitr_archive::RepositoryError::Store(e)))
                        if e.is_not_found() =>
                    {
                        Some(("missing block", String::new()))
                    }
                    Err(e) => Some(("damaged block", format!("{e}; "))),
                },
                None => match repo.store().head(&name).await.with_context(|| format!("checking {name}"))? {
                    Some(_) => None,
                    None => Some(("missing block", String::new())),
                },
            };
            if let Some((kind, why)) = problem {
                missing += 1;
                found.push(Finding {
                    set: f.name.clone(),
                    kind,
                    object: name,
                    message: format!("{why}referenced by backup(s) {}", users(id)),
                });
            }
        }
        metrics::gauge!("pitr_files_missing_objects", "source" => "files", "set" => f.name.clone()).set(missing as f64);
        let live_report = match (live, backups.last()) {
            (true, Some(newest)) => Some(tree::compare_live(&spec_of(&config, f)?, newest).await?),
            (true, None) => {
                found.push(Finding {
                    set: f.name.clone(),
                    kind: "no backup",
                    object: names::files::sets_prefix(&f.name),
                    message: "the set has no backup to compare the live tree with".into(),
                });
                None
            }
            (false, _) => None,
        };
        let mismatches = found.len() + live_report.as_ref().map_or(0, |r| r.corrupt.len());
        if live {
            metrics::gauge!("pitr_files_verify_mismatches", "set" => f.name.clone()).set(mismatches as f64);
        }
        results.push(SetVerify {
            set: f.name.clone(),
            backups: backups.len(),
            blocks: blocks.len(),
            missing_blocks: missing,
            live: live_report,
            mismatches,
        });
        findings.extend(found);
    }
    let ok = findings.is_empty() && results.iter().all(|r| r.live.as_ref().is_none_or(|l| l.corrupt.is_empty()));
    if json {
        output::print_json(&serde_json::json!({ "ok": ok, "sets": results, "findings": findings }))?;
    } else {
        for r in &results {
            println!(
                "file set {}: {} backups, {} blocks referenced, {} missing or damaged",
                r.set, r.backups, r.blocks, r.missing_blocks
            );
            if let Some(l) = &r.live {
                println!(
                    "  live tree vs backup {}: {} paths checked, {} added, {} removed, {} modified, {} metadata only, {} corrupt",
                    l.backup,
                    l.checked,
                    l.added.len(),
                    l.removed.len(),
                    l.modified.len(),
                    l.metadata.len(),
                    l.corrupt.len()
                );
                for p in &l.added {
                    println!("  ADDED {p}");
                }
                for p in &l.removed {
                    println!("  REMOVED {p}");
                }
                for d in &l.modified {
                    println!("  MODIFIED {}: {}", d.path, d.what);
                }
                for d in &l.metadata {
                    println!("  METADATA {}: {}", d.path, d.what);
                }
                for d in &l.corrupt {
                    println!("  CORRUPT {}: {}", d.path, d.what);
                }
            }
        }
        for f in &findings {
            println!("FINDING {}: {}: {}: {}", f.set, f.kind, f.object, f.message);
        }
        println!("{}", if ok { "OK: no findings" } else { "FAILED" });
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One backup as `pitr list` shows it.
#[derive(Debug, Clone, Serialize)]
struct ListedTree {
    id: String,
    kind: String,
    stop_time: String,
    files: u64,
    logical_bytes: u64,
    stored_bytes: u64,
    changed_during_backup: usize,
}

/// The "file sets" part of `pitr list`: every set configured or found in the repository with its
/// backups, oldest first; `None` when there is neither.
pub async fn list_json(config: &Config, repo: &Repository) -> Result<Option<serde_json::Value>> {
    let mut sets: BTreeSet<String> = config.files.iter().map(|f| f.name.clone()).collect();
    sets.extend(TreeManifest::set_names(repo).await?);
    if sets.is_empty() {
        return Ok(None);
    }
    let mut out = serde_json::Map::new();
    for set in sets {
        let (backups, damaged) = TreeManifest::list_sound(repo, Some(&set)).await?;
        let listed: Vec<ListedTree> = backups
            .iter()
            .map(|m| ListedTree {
                id: m.id.clone(),
                kind: m.kind.to_string(),
                stop_time: format_rfc3339_micros(m.stop_time_us),
                files: m.files,
                logical_bytes: m.logical_bytes,
                stored_bytes: m.stored_bytes,
                changed_during_backup: m.changed.len(),
            })
            .collect();
        let path = config.files.iter().find(|f| f.name == set).map(|f| f.path.display().to_string());
        let unreadable: Vec<String> = damaged.into_iter().map(|(name, why)| format!("{name}: {why}")).collect();
        out.insert(set, serde_json::json!({ "path": path, "backups": listed, "unreadable": unreadable }));
    }
    Ok(Some(serde_json::Value::Object(out)))
}

/// Prints [`list_json`]'s value as text.
pub fn print_list(sets: &serde_json::Value) {
    let Some(sets) = sets.as_object() else { return };
    println!("file sets:");
    for (name, s) in sets {
        let path = s["path"].as_str().unwrap_or("(not in the config)");
        println!("  {name} ({path})");
        let backups = s["backups"].as_array().map(Vec::as_slice).unwrap_or_default();
        if backups.is_empty() {
            println!("    no backups yet (run `pitr backup --source files --set {name}`)");
        } else {
            println!(
                "    {:<18} {:<11} {:<27} {:>8} {:>14} {:>14} {:>8}",
                "backup", "type", "finished", "files", "logical", "stored", "changed"
            );
        }
        for b in backups {
            println!(
                "    {:<18} {:<11} {:<27} {:>8} {:>14} {:>14} {:>8}",
                b["id"].as_str().unwrap_or(""),
                b["kind"].as_str().unwrap_or(""),
                b["stop_time"].as_str().unwrap_or(""),
                b["files"].as_u64().unwrap_or(0),
                b["logical_bytes"].as_u64().unwrap_or(0),
                b["stored_bytes"].as_u64().unwrap_or(0),
                b["changed_during_backup"].as_u64().unwrap_or(0)
            );
        }
        for u in s["unreadable"].as_array().map(Vec::as_slice).unwrap_or_default() {
            println!("    UNREADABLE {}", u.as_str().unwrap_or(""));
        }
    }
}

/// The file sets' share of `pitr expire`: `keep_days` per configured set, then the sweep of
/// unreferenced blocks of `files/blocks/` (after dump retention).
pub async fn expire(config: &Config, repo: &Repository, dry_run: bool) -> Result<pitr_files::FilesExpireReport> {
    let sets: Vec<pitr_files::SetRetention> =
        config.files.iter().map(|f| pitr_files::SetRetention { set: f.name.clone(), keep_days: f.keep_days }).collect();
    let opts = pitr_files::SweepOptions {
        now_us: pitr_archive::now_us(),
        dry_run,
        stale_backup_after: config.retention.stale_backup_after,
        lock_ttl: config.retention.lock_ttl,
    };
    let report = pitr_files::expire_files(repo, &sets, &opts)
        .await
        .with_context(|| format!("file sets: expire in {}", repo.location()))?;
    if !dry_run {
        // Alertable: a sweep skipped run after run leaves unreferenced blocks growing.
        metrics::gauge!("pitr_files_sweep_skipped").set(if report.blocks_skipped.is_some() { 1.0 } else { 0.0 });
    }
    Ok(report)
}

/// Prints the file sets' expire report as text.
pub fn print_expire(r: &pitr_files::FilesExpireReport) {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for b in &r.removed_backups {
        println!("{verb} file-set backup {} of set {} (finished {})", b.id, b.set, b.stop_time);
    }
    for (set, n) in &r.kept {
        println!("file set {set}: keeping {n} backups");
    }
    if let Some(why) = &r.blocks_skipped {
        println!("file blocks: {why}");
    }
    for x in &r.retained {
        println!("RETAINED {}: {}", x.object, x.why);
    }
    for x in &r.untrusted {
        println!("NOT OBEYED {}: {} (not pitr's: inspect it, then delete it by hand)", x.object, x.why);
    }
    println!(
        "file sets: {verb} {} backups, {} unreferenced blocks ({} bytes); {} blocks referenced{}",
        r.removed_backups.len(),
        r.removed_blocks,
        r.removed_bytes,
        r.referenced_blocks,
        if r.blocks_left > 0 { format!("; {} left for the next run (deadline)", r.blocks_left) } else { String::new() }
    );
}
