//! `pitr restore --table`: one table as it was at a moment, into a running database.
// SCAFFOLD(issue 18, H3): replaced by the table restore.

use std::path::Path;

use anyhow::Result;

/// `pitr restore --to TIME --table SCHEMA.NAME --into CONNINFO [--as SCHEMA.NEW]`.
pub struct TableArgs {
    pub to: String,
    pub table: String,
    pub into: String,
    pub as_name: Option<String>,
    pub json: bool,
    pub from: Option<String>,
}

pub async fn run(_config_path: &Path, _args: TableArgs) -> Result<()> {
    anyhow::bail!("SCAFFOLD")
}
