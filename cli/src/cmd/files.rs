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
