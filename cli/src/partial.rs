//! The weekly partial-restore drill (`pitr drill --partial`, and the sidecar's `partial_drill`
//! job on `[schedule] partial_drill`): the seed runbook's "single table restoration" and "random
//! file set restoration", run as one drill and reported in its Recovery Test Report.
//!
//! - With `[postgres]`: a random table at a random second of the recoverable window (or `--to`),
//!   restored as `pitr restore --table` restores one, into a fresh database on the scratch server
//!   itself, never a production database, and compared with the original read in the scratch
//!   server (row count and md5 fingerprint): [`pitr_restore::partial`].
//! - With `[[files]]`: a random set's newest backup; a random sample of its files
//!   ([`SAMPLE_FILES`]) restored into a temporary directory, each checked against the manifest
//!   (size, sha256), and compared with the live file where its size and mtime are the backup's
//!   (a difference there is silent corruption of one copy).
//!
//! MongoDB collections are not drilled here yet (the monthly MongoDB drill restores them all).
//! Each part that fails to run is a failed check, not an aborted drill, so the report always
//! says what the other part found.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::running::RunKind;
use pitr_archive::Repository;
use pitr_drill::{CheckResult, Drill, DrillReport, Measured, Objectives, Source};
use pitr_files::tree::{EntryKind, TreeEntry, TreeManifest};
use pitr_restore::drill::DrillTarget;
use pitr_restore::partial::TableDrill;
use pitr_restore::{Catalog, RecoveryTarget};
use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};

use crate::config::{Config, FilesConfig};
use crate::{open, output, tasks};

/// Files of a set's newest backup a partial drill restores and checks.
pub const SAMPLE_FILES: usize = 20;

/// How a partial drill runs.
pub struct PartialOptions {
    /// The moment of the table part: random, or chosen.
    pub target: DrillTarget,
    /// The report's "Test Type".
    pub test_type: String,
    /// The role the scratch server is used as (default `$USER`).
    pub db_user: Option<String>,
}

/// `pitr drill --partial`: runs the drill, prints (and with `report`, writes) the report; exits
/// non-zero unless it passed.
pub async fn run(config_path: &Path, opts: PartialOptions, report: Option<&Path>, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let result = drill(&config, config_path, &opts).await?;
    output::drill_report(&result, report, json)?;
    Ok(if result.outcome.is_pass() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The sidecar's scheduled partial drill: a random moment, the config read again.
pub async fn scheduled(config_path: &Path) -> Result<DrillReport> {
    let config = Config::load(config_path)?;
    let opts = PartialOptions { target: DrillTarget::Random, test_type: "Weekly (scheduled)".into(), db_user: None };
    drill(&config, config_path, &opts).await
}

/// Runs a partial drill of what `config` backs up.
pub async fn drill(config: &Config, config_path: &Path, opts: &PartialOptions) -> Result<DrillReport> {
    if config.postgres.is_none() && config.files.is_empty() {
        bail!(
            "nothing for a partial drill: it restores a table of [postgres] and files of a [[files]] set, and the config has neither"
        );
    }
    let mut steps = PartialDrill {
        config,
        config_path,
        opts,
        postgres: None,
        files_set: None,
        table_drawn: None,
        files_drawn: None,
    };
    let objectives = Objectives {
        test_type: &opts.test_type,
        rto_seconds: config.targets.rto_seconds,
        rpo_seconds: config.targets.rpo_seconds,
    };
    pitr_drill::run(&mut steps, &objectives).await
}

/// The moment of the table part (`None` without one); the file part always takes the newest
/// backup.
#[derive(Debug, Clone, Copy)]
struct PartialTarget {
    table_at: Option<RecoveryTarget>,
}

impl std::fmt::Display for PartialTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.table_at {
            Some(t) => write!(f, "{t}"),
            None => f.write_str("latest"),
        }
    }
}

/// What the parts restored (each `None` when the config has no such part).
#[derive(Debug, serde::Serialize)]
struct PartialRestored {
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<TableDrill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<FilesDrill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files_error: Option<String>,
}

/// What the file part did.
#[derive(Debug, serde::Serialize)]
struct FilesDrill {
    set: String,
    backup_id: String,
    backup_kind: String,
    /// Regular files in the backup (the draw's pool).
    files_in_backup: usize,
    /// Bytes written by the restore.
    restored_bytes: u64,
    restore_seconds: f64,
    sampled: Vec<SampledFile>,
}

/// One sampled file and how it came out.
#[derive(Debug, serde::Serialize)]
struct SampledFile {
    path: String,
    size: u64,
    /// What is wrong with the restored copy (`None`: size and sha256 are the manifest's).
    restored_problem: Option<String>,
    live: Live,
}

/// The live file against the backup.
#[derive(Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Live {
    /// Same size and mtime, same content.
    Equal,
    /// Same size and mtime, other content: silent corruption of one of the copies.
    Differs,
    /// Size or mtime changed since the backup (or it is no longer a regular file): not compared.
    Changed,
    /// Gone since the backup.
    Missing,
    /// Could not be read.
    Unreadable(String),
}

struct PartialDrill<'a> {
    config: &'a Config,
    config_path: &'a Path,
    opts: &'a PartialOptions,
    /// With `[postgres]`: the repository and catalog, or why they could not be read.
    postgres: Option<Result<(Repository, Catalog), String>>,
    files_set: Option<&'a FilesConfig>,
    /// For the scenario: what was drawn.
    table_drawn: Option<String>,
    files_drawn: Option<String>,
}

impl PartialDrill<'_> {
    async fn open_postgres(&self) -> Result<(Repository, Catalog)> {
        let repo = open::reader(self.config, None)?;
        let mut catalog = open::checked_catalog(self.config, &repo).await?;
        if matches!(self.opts.target, DrillTarget::At(RecoveryTarget::Name(_))) {
            catalog.load_restore_points(&repo).await;
        }
        Ok((repo, catalog))
    }

    async fn table_part(&self, repo: &Repository, catalog: &Catalog, at: RecoveryTarget) -> Result<TableDrill> {
        let opts = pitr_restore::table::ScratchOptions {
            scratch_root: std::env::temp_dir(),
            bin_dir: tasks::pg_bin_dir(self.config, catalog)?,
            db_user: self
                .opts
                .db_user
                .clone()
                .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "postgres".into())),
            restore_command: tasks::restore_command(self.config_path, None)?,
            workers: self.config.backup.parallel(),
            timeout: Duration::from_secs_f64(self.config.targets.rto_seconds * 2.0),
            marker_repository: None,
            run_kind: RunKind::Drill,
        };
        Ok(pitr_restore::partial::table_drill(repo, catalog, at, &opts).await?)
    }
}

impl Drill for PartialDrill<'_> {
    type Target = PartialTarget;
    type Restored = PartialRestored;
    type Error = anyhow::Error;
    const SOURCE: Source = Source::Partial;
    const BACKUP_WORD: &'static str = "base backups";

    async fn choose_target(&mut self) -> Result<PartialTarget> {
        let mut table_at = None;
        if self.config.postgres.is_some() {
            let opened = self.open_postgres().await.map_err(|e| format!("{e:#}"));
            // An unknown or unreachable restore point ends the drill before anything is written
            // (no running marker, no file part), as `pitr drill --to name:` does.
            if let (Ok((_, catalog)), DrillTarget::At(RecoveryTarget::Name(name))) = (&opened, self.opts.target) {
                catalog.restore_point(&name)?;
            }
            let opened = opened.and_then(|(repo, catalog)| {
                let at = pitr_restore::drill::choose_target(&catalog, self.opts.target).map_err(|e| e.to_string())?;
                table_at = Some(at);
                Ok((repo, catalog))
            });
            self.postgres = Some(opened);
        }
        self.files_set = self.config.files.choose(&mut rand::thread_rng());
        Ok(PartialTarget { table_at })
    }

    async fn restore(&mut self, target: PartialTarget) -> Result<PartialRestored, String> {
        let mut out = PartialRestored { table: None, table_error: None, files: None, files_error: None };
        match (&self.postgres, target.table_at) {
            (Some(Ok((repo, catalog))), Some(at)) => match self.table_part(repo, catalog, at).await {
                Ok(t) => {
                    self.table_drawn = t.table.as_ref().map(|t| format!("{}.{}", t.database, t.table));
                    out.table = Some(t);
                }
                Err(e) => out.table_error = Some(format!("{e:#}")),
            },
            (Some(Err(e)), _) => out.table_error = Some(e.clone()),
            _ => {}
        }
        if let Some(set) = self.files_set {
            self.files_drawn = Some(set.name.clone());
            match files_part(self.config, set).await {
                Ok(f) => out.files = Some(f),
                Err(e) => out.files_error = Some(format!("{e:#}")),
            }
        }
        Ok(out)
    }

    async fn verify(&mut self, _: PartialTarget, restored: &PartialRestored) -> Vec<CheckResult> {
        let mut checks = Vec::new();
        if let Some(e) = &restored.table_error {
            checks.push(CheckResult::new("table: restored at the moment", false, e.clone()));
        }
        if let Some(t) = &restored.table {
            checks.extend(table_checks(t));
        }
        if let Some(e) = &restored.files_error {
            let set = self.files_drawn.as_deref().unwrap_or("?");
            checks.push(CheckResult::new(format!("files: sample of set {set} restored"), false, e.clone()));
        }
        if let Some(f) = &restored.files {
            checks.extend(files_checks(f));
        }
        checks
    }

    fn scenario(&self, target: PartialTarget) -> String {
        let mut parts = Vec::new();
        if self.postgres.is_some() {
            let moment = match (target.table_at, self.opts.target) {
                (Some(t), DrillTarget::Random) => format!("{t} (a random second in the recoverable window)"),
                (Some(t), DrillTarget::At(_)) => format!("{t} (a chosen target)"),
                (None, _) => "no moment (the archive could not be read)".into(),
            };
            let table = self.table_drawn.as_deref().unwrap_or("a random table");
            parts.push(format!(
                "table {table} restored as it was at {moment} into a fresh database on a scratch server and compared with the original there"
            ));
        }
        if let Some(set) = &self.files_drawn {
            parts.push(format!(
                "{SAMPLE_FILES} random files of file set {set} restored from its newest backup into a temporary directory and checked against the manifest and the live files"
            ));
        }
        format!("Weekly partial restore: {}", parts.join("; "))
    }

    fn measure(&self, r: &PartialRestored) -> Measured {
        let table = r.table.as_ref();
        let seconds = table.map(|t| t.restore_seconds + t.copy_seconds.unwrap_or(0.0)).unwrap_or(0.0)
            + r.files.as_ref().map_or(0.0, |f| f.restore_seconds);
        Measured {
            rto_seconds: (table.is_some() || r.files.is_some()).then_some(seconds),
            rpo_seconds: table.and_then(|t| t.data_loss_window_seconds),
            replay_seconds: table.and_then(|t| t.replay_seconds),
        }
    }

    fn summary(&self, r: &PartialRestored) -> String {
        let mut lines = Vec::new();
        if let Some(t) = &r.table {
            match (&t.table, &t.original, &t.copy) {
                (Some(table), Some(orig), copy) => lines.push(format!(
                    "Table {}.{} restored from backup {} to {} ({:.1} s; last replayed commit {}), copied as {} into database {} on the scratch server ({:.1} s): {} rows, fingerprint {}; copy {}.",
                    table.database,
                    table.table,
                    t.backup_id,
                    t.target,
                    t.restore_seconds,
                    t.last_replayed_commit_time.as_deref().unwrap_or("-"),
                    t.copied_as.as_ref().map_or("-".to_string(), |n| n.to_string()),
                    t.drill_database.as_deref().unwrap_or("-"),
                    t.copy_seconds.unwrap_or(0.0),
                    orig.rows,
                    orig.md5,
                    copy.as_ref().map_or("not read".to_string(), |c| format!("{} rows, fingerprint {}", c.rows, c.md5)),
                )),
                _ => lines.push(format!(
                    "Cluster restored from backup {} to {} ({:.1} s): it had no ordinary table then.",
                    t.backup_id, t.target, t.restore_seconds
                )),
            }
        }
        if let Some(f) = &r.files {
            lines.push(format!(
                "{} of the {} files of backup {} ({}) of file set {} restored ({} bytes, {:.1} s).",
                f.sampled.len(),
                f.files_in_backup,
                f.backup_id,
                f.backup_kind,
                f.set,
                f.restored_bytes,
                f.restore_seconds
            ));
        }
        lines.join("\n")
    }
}

fn table_checks(t: &TableDrill) -> Vec<CheckResult> {
    let Some(table) = &t.table else {
        return vec![CheckResult::skipped(
            "table: a random table restored",
            format!("the cluster had no ordinary table at {}", t.target),
        )];
    };
    let name = format!("{}.{}", table.database, table.table);
    let mut out = vec![CheckResult::new(
        format!("table: {name} restored at the moment and copied"),
        t.copy.is_some(),
        format!(
            "scratch cluster from backup {} to {}; copy {} in database {}",
            t.backup_id,
            t.target,
            t.copied_as.as_ref().map_or("-".to_string(), |n| n.to_string()),
            t.drill_database.as_deref().unwrap_or("-")
        ),
    )];
    if let (Some(orig), Some(copy)) = (&t.original, &t.copy) {
        out.push(CheckResult::new(
            format!("table: {name} row count"),
            orig.rows == copy.rows,
            format!("original {} rows, copy {} rows", orig.rows, copy.rows),
        ));
        out.push(CheckResult::new(
            format!("table: {name} md5 fingerprint"),
            t.equal(),
            format!("original {}, copy {}", orig.md5, copy.md5),
        ));
    }
    out
}

fn files_checks(f: &FilesDrill) -> Vec<CheckResult> {
    let set = &f.set;
    if f.sampled.is_empty() {
        return vec![CheckResult::skipped(
            format!("files: sample of set {set} restored"),
            format!("backup {} holds no regular file", f.backup_id),
        )];
    }
    let bad: Vec<String> =
        f.sampled.iter().filter_map(|s| s.restored_problem.as_ref().map(|p| format!("{}: {p}", s.path))).collect();
    let mut out = vec![CheckResult::new(
        format!(
            "files: {} random files of set {set} restored and equal to the manifest (size, sha256)",
            f.sampled.len()
        ),
        bad.is_empty(),
        if bad.is_empty() { format!("backup {}, {} bytes", f.backup_id, f.restored_bytes) } else { bad.join("; ") },
    )];
    let count = |l: &dyn Fn(&Live) -> bool| f.sampled.iter().filter(|s| l(&s.live)).count();
    let equal = count(&|l| *l == Live::Equal);
    let changed = count(&|l| *l == Live::Changed);
    let missing = count(&|l| *l == Live::Missing);
    let problems: Vec<String> = f
        .sampled
        .iter()
        .filter_map(|s| match &s.live {
            Live::Differs => Some(format!(
                "{}: content differs from the backup although size and mtime are the same (silent corruption)",
                s.path
            )),
            Live::Unreadable(e) => Some(format!("{}: {e}", s.path)),
            _ => None,
        })
        .collect();
    let detail = format!(
        "{equal} equal; {changed} changed since the backup (size or mtime) and {missing} removed since, not compared"
    );
    let name = format!("files: unchanged live files of set {set} equal the backup");
    out.push(if !problems.is_empty() {
        CheckResult::new(name, false, format!("{}; {detail}", problems.join("; ")))
    } else if equal == 0 {
        CheckResult::skipped(name, detail)
    } else {
        CheckResult::new(name, true, detail)
    });
    out
}

/// `path` as a glob pattern matching itself alone (`?`, `*`, `[`, `]` in brackets).
fn literal_pattern(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '?' | '*' | '[' | ']' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    out
}

/// The file part: the set's newest backup, [`SAMPLE_FILES`] of its regular files restored into a
/// temporary directory (removed afterwards), then checked.
async fn files_part(config: &Config, set: &FilesConfig) -> Result<FilesDrill> {
    let repo = open::reader(config, None)?;
    repo.check().await?;
    let (backups, damaged) = TreeManifest::list_sound(&repo, Some(&set.name))
        .await
        .with_context(|| format!("listing the backups of file set {}", set.name))?;
    for (name, why) in &damaged {
        tracing::warn!(manifest = %name, "partial drill: a manifest of file set {} does not open: {why}", set.name);
    }
    let newest = backups.last().ok_or_else(|| {
        anyhow!(
            "file set {} has no backup in {} (run `pitr backup --source files --set {}`)",
            set.name,
            repo.location(),
            set.name
        )
    })?;
    let files: Vec<&TreeEntry> = newest.entries.iter().filter(|e| matches!(e.kind, EntryKind::File { .. })).collect();
    let sample: Vec<TreeEntry> =
        files.choose_multiple(&mut rand::thread_rng(), SAMPLE_FILES).map(|e| (*e).clone()).collect();
    let mut drill = FilesDrill {
        set: set.name.clone(),
        backup_id: newest.id.clone(),
        backup_kind: newest.kind.to_string(),
        files_in_backup: files.len(),
        restored_bytes: 0,
        restore_seconds: 0.0,
        sampled: Vec::new(),
    };
    if sample.is_empty() {
        return Ok(drill);
    }
    let scratch = tempfile::Builder::new()
        .prefix("pitr-partial-drill-")
        .tempdir()
        .context("partial drill: making a temporary directory")?;
    let target_dir = scratch.path().join(&set.name);
    let marker = pitr_restore::recover::announce(&repo, RunKind::Drill).await;
    let started = Instant::now();
    let restored = async {
        let store = pitr_files::BlockStore::open(&repo).await?.with_parallel(config.backup.parallel());
        let opts = pitr_files::tree::RestoreOptions {
            target_dir: target_dir.clone(),
            paths: sample.iter().map(|e| literal_pattern(&e.path)).collect(),
        };
        pitr_files::tree::restore(&store, newest, &opts).await
    }
    .await;
    if let Some(marker) = marker {
        marker.release().await;
    }
    let summary = restored.with_context(|| {
        format!("restoring {} files of backup {} of file set {}", sample.len(), newest.id, set.name)
    })?;
    drill.restore_seconds = started.elapsed().as_secs_f64();
    drill.restored_bytes = summary.bytes;
    // A single-file set's one entry is named after the file; a directory's entries are relative
    // to it.
    let single_file = newest.entry(".").is_none();
    let root = set.path.clone();
    drill.sampled = tokio::task::spawn_blocking(move || {
        sample
            .iter()
            .map(|e| {
                let live = if single_file { root.clone() } else { root.join(&e.path) };
                check_sampled(e, &target_dir.join(&e.path), &live)
            })
            .collect::<Vec<_>>()
    })
    .await
    .context("partial drill: checking the restored files")?;
    drop(scratch);
    Ok(drill)
}

/// SHA-256 of the file at `path`, lower-case hex.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Checks a restored file against its manifest entry, and the live file against both.
fn check_sampled(entry: &TreeEntry, restored: &PathBuf, live: &Path) -> SampledFile {
    let EntryKind::File { size, sha256, .. } = &entry.kind else {
        return SampledFile {
            path: entry.path.clone(),
            size: 0,
            restored_problem: Some("not a regular file in the manifest".into()),
            live: Live::Changed,
        };
    };
    let restored_problem = match std::fs::symlink_metadata(restored) {
        Err(e) => Some(format!("not restored ({}): {e}", restored.display())),
        Ok(m) if !m.is_file() => Some("restored, but not as a regular file".into()),
        Ok(m) if m.len() != *size => Some(format!("restored {} bytes, the manifest says {size}", m.len())),
        Ok(_) => match sha256_of(restored) {
            Err(e) => Some(format!("reading the restored copy: {e}")),
            Ok(sum) if sum != *sha256 => Some(format!("restored sha256 {sum}, the manifest says {sha256}")),
            Ok(_) => None,
        },
    };
    let live = match std::fs::symlink_metadata(live) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Live::Missing,
        Err(e) => Live::Unreadable(format!("{}: {e}", live.display())),
        Ok(m)
            if !m.is_file()
                || m.len() != *size
                || m.mtime() != entry.mtime
                || m.mtime_nsec() != i64::from(entry.mtime_nsec) =>
        {
            Live::Changed
        }
        Ok(_) => match sha256_of(live) {
            Err(e) => Live::Unreadable(format!("{}: {e}", live.display())),
            Ok(sum) if sum == *sha256 => Live::Equal,
            Ok(_) => Live::Differs,
        },
    };
    SampledFile { path: entry.path.clone(), size: *size, restored_problem, live }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_literal_pattern_matches_only_its_own_path() {
        assert_eq!(literal_pattern("a/b.txt"), "a/b.txt");
        assert_eq!(literal_pattern("x[1]*?.log"), "x[[]1[]][*][?].log");
    }

    fn entry(path: &str, content: &[u8], mtime: (i64, u32)) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            kind: EntryKind::File {
                size: content.len() as u64,
                sha256: hex::encode(Sha256::digest(content)),
                blocks: Vec::new(),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: mtime.0,
            mtime_nsec: mtime.1,
            ctime: 0,
            ctime_nsec: 0,
            inode: 0,
        }
    }

    fn mtime_of(p: &Path) -> (i64, u32) {
        let m = std::fs::metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec() as u32)
    }

    #[test]
    fn a_sampled_file_is_checked_against_the_manifest_and_the_unchanged_live_file() {
        let dir = tempfile::tempdir().unwrap();
        let (restored, live) = (dir.path().join("restored"), dir.path().join("live"));
        std::fs::write(&restored, b"hello").unwrap();
        std::fs::write(&live, b"hello").unwrap();
        let e = entry("f", b"hello", mtime_of(&live));
        let s = check_sampled(&e, &restored, &live);
        assert_eq!((s.restored_problem, s.live), (None, Live::Equal));

        // Same size and mtime, other bytes: silent corruption.
        let t = mtime_of(&live);
        std::fs::write(&live, b"jello").unwrap();
        let times = [
            libc::timespec { tv_sec: t.0, tv_nsec: i64::from(t.1) },
            libc::timespec { tv_sec: t.0, tv_nsec: i64::from(t.1) },
        ];
        let c = std::ffi::CString::new(live.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }, 0);
        assert_eq!(check_sampled(&e, &restored, &live).live, Live::Differs);

        // Changed size: not compared.
        std::fs::write(&live, b"hello, world").unwrap();
        assert_eq!(check_sampled(&e, &restored, &live).live, Live::Changed);
        std::fs::remove_file(&live).unwrap();
        assert_eq!(check_sampled(&e, &restored, &live).live, Live::Missing);

        // A restored copy that is not the manifest's content.
        std::fs::write(&restored, b"hellO").unwrap();
        let s = check_sampled(&e, &restored, &live);
        assert!(s.restored_problem.as_deref().is_some_and(|p| p.contains("sha256")), "{:?}", s.restored_problem);
    }

    #[test]
    fn live_differences_fail_the_drill_and_a_sample_without_comparisons_is_skipped() {
        let sampled = |live: Live| SampledFile { path: "p".into(), size: 1, restored_problem: None, live };
        let drill = |files: Vec<SampledFile>| FilesDrill {
            set: "uploads".into(),
            backup_id: "20261206T000000Z".into(),
            backup_kind: "full".into(),
            files_in_backup: 3,
            restored_bytes: 3,
            restore_seconds: 0.1,
            sampled: files,
        };
        let checks = files_checks(&drill(vec![sampled(Live::Equal), sampled(Live::Changed)]));
        assert!(checks.iter().all(|c| c.result == pitr_drill::CheckStatus::Pass), "{checks:?}");
        let checks = files_checks(&drill(vec![sampled(Live::Equal), sampled(Live::Differs)]));
        assert_eq!(checks[1].result, pitr_drill::CheckStatus::Fail, "{checks:?}");
        assert!(checks[1].detail.contains("silent corruption"), "{checks:?}");
        let checks = files_checks(&drill(vec![sampled(Live::Changed)]));
        assert_eq!(checks[1].result, pitr_drill::CheckStatus::Skipped, "{checks:?}");
    }
}
