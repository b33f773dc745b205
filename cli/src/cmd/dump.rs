//! `pitr dump` and `--source dump`: logical dumps of `[[dumps]]` sets.
// SCAFFOLD(issue 18, H2): replaced by the dump commands.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// `pitr restore --source dump`.
pub struct RestoreArgs {
    pub set: String,
    pub to: String,
    pub into: Option<String>,
    pub output: Option<PathBuf>,
    pub json: bool,
    pub from: Option<String>,
}

pub async fn dump(_config_path: &Path, _set: &str, _json: bool) -> Result<()> {
    anyhow::bail!("SCAFFOLD")
}

pub async fn restore(_config_path: &Path, _args: RestoreArgs) -> Result<()> {
    anyhow::bail!("SCAFFOLD")
}

pub async fn verify(_config_path: &Path, _json: bool) -> Result<std::process::ExitCode> {
    anyhow::bail!("SCAFFOLD")
}

/// What a scheduled dump did (one line for the log via Display).
pub struct DumpSummary;

impl std::fmt::Display for DumpSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SCAFFOLD")
    }
}

/// A dump of `set` for the sidecar's scheduler; sets the set's metrics.
#[allow(dead_code)]
pub async fn dump_set(_config: &crate::config::Config, _set: &str) -> Result<DumpSummary> {
    anyhow::bail!("SCAFFOLD")
}
