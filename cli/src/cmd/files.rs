//! `--source files`: backup, restore and verify of `[[files]]` sets.
// SCAFFOLD(issue 18, H1): replaced by the file-set commands.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// `pitr restore --source files`.
pub struct RestoreArgs {
    pub set: String,
    pub to: String,
    pub target_dir: PathBuf,
    pub paths: Vec<String>,
    pub json: bool,
    pub from: Option<String>,
}

pub async fn backup(_config_path: &Path, _set: &str, _incremental: bool, _json: bool) -> Result<()> {
    anyhow::bail!("SCAFFOLD")
}

pub async fn restore(_config_path: &Path, _args: RestoreArgs) -> Result<()> {
    anyhow::bail!("SCAFFOLD")
}

pub async fn verify(_config_path: &Path, _set: Option<&str>, _live: bool, _json: bool) -> Result<std::process::ExitCode> {
    anyhow::bail!("SCAFFOLD")
}

/// What a scheduled backup of a set did (one line for the log via Display).
pub struct FilesBackupSummary;

impl std::fmt::Display for FilesBackupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SCAFFOLD")
    }
}

/// A backup of `set` for the sidecar's scheduler; sets the set's metrics.
#[allow(dead_code)]
pub async fn backup_set(_config: &crate::config::Config, _set: &str, _incremental: bool) -> Result<FilesBackupSummary> {
    anyhow::bail!("SCAFFOLD")
}
