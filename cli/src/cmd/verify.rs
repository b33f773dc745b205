//! `pitr verify`: check what one repository holds for the cluster (`--source mongo` is
//! [`super::mongo::verify`]).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::config::Config;
use crate::{open, output};

/// Checks one repository alone (the primary, or `--from NAME`): no fallback hides what it lacks.
pub async fn run(config_path: &Path, from: Option<&str>, deep: bool, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let repo = open::single(&config, from)?;
    let catalog = open::checked_catalog(&config, &repo).await?;
    let report = pitr_restore::verify::verify(&repo, &catalog, deep, config.backup.parallel()).await?;
    if json {
        output::print_json(&report)?;
    } else {
        println!(
            "verified {}: timelines {:?}, {} segments, {} backups, {} blocks{}",
            repo.location(),
            report.timelines,
            report.segments,
            report.backups,
            report.blocks,
            if deep { format!(", {} objects opened and authenticated", report.objects_opened) } else { String::new() }
        );
        for f in &report.findings {
            println!("FINDING {}: {}: {}", f.kind, f.object, f.message);
        }
        println!("{}", if report.ok { "OK: no findings" } else { "FAILED" });
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
