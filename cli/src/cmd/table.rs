//! `pitr restore --table`: one table as it was at a moment, into a running database under a new
//! name ([`pitr_restore::table`] does the work; this loads the config, checks the names and the
//! target first, handles Ctrl-C/SIGTERM and prints the report).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use pitr_archive::running::RunKind;
use pitr_restore::table::{self, LeftOut, ScratchCluster, ScratchOptions, TableName, TargetDatabase};

use crate::config::Config;
use crate::{open, output, tasks};

/// `pitr restore --to TIME --table SCHEMA.NAME --into CONNINFO [--as SCHEMA.NEW]`.
pub struct TableArgs {
    /// TIME, latest, lsn:X/Y or xid:N.
    pub to: String,
    /// `[DATABASE.]SCHEMA.NAME`.
    pub table: String,
    /// The database the table is created in (a libpq connection string).
    pub into: String,
    /// `[SCHEMA.]NEW`; default `<name>_at_<YYYYMMDDHHMMSS>` in the table's schema.
    pub as_name: Option<String>,
    /// Print the report as JSON.
    pub json: bool,
    /// Read from this repository (a secondary's name, or `primary`) first.
    pub from: Option<String>,
    /// The role the scratch server is used as (a superuser of the restored cluster); default
    /// `$USER`.
    pub db_user: Option<String>,
}

/// What `pitr restore --table` prints (`--json`).
#[derive(Debug, serde::Serialize)]
pub struct TableRestoreReport {
    /// The table asked for, as `SCHEMA.NAME`.
    pub table: TableName,
    /// The database it was in at the moment.
    pub database: String,
    /// The table created in the target.
    pub new_table: TableName,
    /// The target, without its password.
    pub into: String,
    /// The moment restored to.
    pub target: String,
    /// The base backup the scratch cluster was restored from.
    pub backup_id: String,
    /// The last commit replayed in the scratch cluster.
    pub last_replayed_commit_time: Option<String>,
    /// Rows copied.
    pub rows: u64,
    /// The table's columns at the moment.
    pub columns: Vec<String>,
    /// The copy's indexes.
    pub indexes: Vec<String>,
    /// The sequences the copy owns.
    pub sequences: Vec<String>,
    /// What the copy does not carry.
    pub left_out: Vec<LeftOut>,
    /// The table's OID at the moment.
    pub oid: u32,
    /// What the user should know (such as that the table of that name is another one now).
    pub warnings: Vec<String>,
    /// Restoring the scratch cluster to the moment.
    pub restore_seconds: f64,
    /// Preparing and copying the table.
    pub copy_seconds: f64,
    /// The whole run.
    pub total_seconds: f64,
}

/// `pitr restore --table`: checks, scratch restore, copy, clean-up, report.
pub async fn run(config_path: &Path, args: TableArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let config = Config::load(config_path)?;
    let target = pitr_restore::parse_target(&args.to)?;
    let table = table::parse_table(&args.table)?;
    let new_table = match &args.as_name {
        Some(name) => table::parse_new_name(name, &table.table.schema)?,
        None => table::default_new_name(&table.table, target),
    };
    let into = TargetDatabase::parse(&args.into)?;
    // Before anything is restored: a taken name or a missing schema is known at once.
    into.check_new_table(&new_table).await?;
    let repo = open::reader(&config, args.from.as_deref())?;
    let mut catalog = open::checked_catalog(&config, &repo).await?;
    if matches!(target, pitr_restore::RecoveryTarget::Name(_)) {
        catalog.load_restore_points(&repo).await;
    }
    let drill = tasks::drill_options(&config, config_path, &catalog)?;
    let opts = ScratchOptions {
        scratch_root: drill.scratch_root,
        bin_dir: drill.bin_dir,
        db_user: args.db_user.clone().unwrap_or(drill.db_user),
        restore_command: tasks::restore_command(config_path, args.from.as_deref())?,
        workers: drill.workers,
        timeout: drill.timeout,
        // As for `pitr restore --from`: the marker goes where `pitr expire` runs.
        marker_repository: match args.from {
            Some(_) => Some(open::single(&config, None)?),
            None => None,
        },
        run_kind: RunKind::Restore,
    };
    let work = async {
        let scratch = ScratchCluster::restore_at(&repo, &catalog, target, &opts)
            .await
            .with_context(|| format!("restoring the cluster to {target} into a scratch directory"))?;
        let restored = scratch.restore_report().clone();
        let copied = table::copy_table(&scratch, &table, &new_table, &into).await?;
        scratch.remove()?;
        Ok::<_, anyhow::Error>((restored, copied))
    };
    // Dropping `work` on a signal drops the scratch cluster (its server is stopped, its directory
    // removed) and kills pg_dump and pg_restore (the target's transaction is rolled back).
    let (restored, copied) = tokio::select! {
        result = work => result?,
        signal = wait_for_signal() => {
            let created = if into.table_created() {
                format!("{new_table} WAS created in {} (its rows were not counted yet): check it, or drop it before trying again", into.redacted())
            } else {
                format!("{new_table} was not created")
            };
            return Err(anyhow!(
                "stopped by {signal}: the scratch server was stopped and its directory removed; {created}"
            ))
        }
    };
    let report = TableRestoreReport {
        table: copied.table,
        database: copied.database,
        new_table: copied.new_table,
        into: into.redacted(),
        target: restored.target,
        backup_id: restored.backup_id,
        last_replayed_commit_time: restored.last_replayed_commit_time,
        rows: copied.rows,
        columns: copied.columns,
        indexes: copied.indexes,
        sequences: copied.sequences,
        left_out: copied.left_out,
        oid: copied.oid,
        warnings: copied.warnings,
        restore_seconds: restored.total_seconds,
        copy_seconds: copied.seconds,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        return output::print_json(&report);
    }
    println!(
        "restored table {} (database {}, OID {}) as it was at {}",
        report.table, report.database, report.oid, report.target
    );
    for w in &report.warnings {
        println!("  WARNING:              {w}");
    }
    println!("  created:              {} in {}", report.new_table, report.into);
    println!("  backup used:          {}", report.backup_id);
    println!("  last replayed commit: {}", report.last_replayed_commit_time.as_deref().unwrap_or("(none replayed)"));
    println!("  rows:                 {}", report.rows);
    println!("  columns ({}):          {}", report.columns.len(), report.columns.join(", "));
    if !report.indexes.is_empty() {
        println!("  indexes:              {}", report.indexes.join(", "));
    }
    if !report.sequences.is_empty() {
        println!("  sequences:            {}", report.sequences.join(", "));
    }
    if report.left_out.is_empty() {
        println!("  left out:             nothing");
    } else {
        println!("  left out:");
        for l in &report.left_out {
            let detail = if l.detail.is_empty() { String::new() } else { format!(" ({})", l.detail) };
            println!("    {} {}{detail}", l.kind, l.name);
        }
    }
    println!(
        "  time:                 {:.1} s (scratch restore {:.1} s, copy {:.1} s)",
        report.total_seconds, report.restore_seconds, report.copy_seconds
    );
    Ok(())
}

/// SIGTERM, SIGINT (Ctrl-C) or SIGHUP, by name.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup())) {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                // A closed terminal or session: stopped and cleaned up as on SIGTERM.
                _ = hup.recv() => "SIGHUP",
            }
        }
        // Without handlers the default actions stay: the run is not cut short here.
        _ => std::future::pending().await,
    }
}
