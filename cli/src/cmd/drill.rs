//! `pitr drill`: a restore drill of the PostgreSQL cluster (`--source mongo` is
//! [`super::mongo::drill`]), and the checks file both read.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};

use crate::config::Config;
use crate::{open, output, tasks};

/// `pitr drill` options for PostgreSQL.
pub struct DrillArgs {
    /// TIME, lsn:X/Y, latest, or random.
    pub to: String,
    /// A TOML checks file.
    pub checks: Option<std::path::PathBuf>,
    /// Where the markdown report goes (and the JSON beside it).
    pub report: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    pub json: bool,
    /// Keep the scratch directory for inspection.
    pub keep: bool,
    /// Database user for the checks (default $USER).
    pub db_user: Option<String>,
    /// The report's test type.
    pub test_type: String,
    /// Read from this repository first (the result is stored through the primary).
    pub from: Option<String>,
}

/// Reads a drill checks file; every bad key or value is named.
pub fn load_checks(path: Option<&Path>) -> Result<pitr_drill::ChecksFile> {
    let Some(path) = path else { return Ok(Default::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("checks file {}", path.display()))?;
    let checks: pitr_drill::ChecksFile =
        toml::from_str(&text).map_err(|e| anyhow!("checks file {}: {}", path.display(), e.to_string().trim_end()))?;
    checks.validate().map_err(|e| anyhow!("checks file {}: {e}", path.display()))?;
    Ok(checks)
}

/// `pitr drill`: restores into a scratch server, checks it, measures RTO and RPO, stores the
/// result in the repository and reports it. Exits non-zero unless the drill passed.
pub async fn run(config_path: &Path, args: DrillArgs) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let checks = load_checks(args.checks.as_deref())?;
    let target = if args.to.eq_ignore_ascii_case("random") {
        pitr_restore::drill::DrillTarget::Random
    } else {
        pitr_restore::drill::DrillTarget::At(pitr_restore::parse_target(&args.to)?)
    };
    let repo = open::reader(&config, args.from.as_deref())?;
    let catalog = open::checked_catalog(&config, &repo).await?;
    let mut opts = tasks::drill_options(&config, config_path, &catalog)?;
    opts.restore_command = tasks::restore_command(config_path, args.from.as_deref())?;
    if args.from.is_some() {
        // As for `pitr restore --from`: the marker goes where `pitr expire` runs.
        opts.marker_repository = Some(open::single(&config, None)?);
    }
    opts.target = target;
    opts.checks = checks;
    opts.keep = args.keep;
    opts.test_type = args.test_type;
    if let Some(user) = args.db_user {
        opts.db_user = user;
    }
    let report = pitr_restore::drill::drill(&repo, &catalog, &opts).await?;
    let stored = match open::writer(&config) {
        Ok(writer) => {
            let subject = pitr_drill::Subject::Postgres { system_id: catalog.cluster.system_id };
            pitr_drill::store_result(&writer, &subject, &report).await.map_err(anyhow::Error::from)
        }
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        tracing::warn!(error = %format!("{e:#}"), "could not store the drill result in the repository");
    }
    output::drill_report(&report, args.report.as_deref(), args.json)?;
    Ok(if report.outcome.is_pass() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
