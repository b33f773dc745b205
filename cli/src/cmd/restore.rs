//! `pitr restore`: restore the PostgreSQL cluster to a moment (`--source mongo` is
//! [`super::mongo::restore`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use crate::config::Config;
use crate::{open, output, tasks};

/// `pitr restore` options for PostgreSQL.
pub struct RestoreArgs {
    /// TIME, latest, lsn:X/Y or xid:N.
    pub to: String,
    /// The data directory to restore into.
    pub target_dir: std::path::PathBuf,
    /// Run the server to the target and report the achieved RPO and RTO.
    pub start: bool,
    /// The port of the started server.
    pub port: u16,
    /// Replace a non-empty target directory.
    pub force: bool,
    /// Print the report as JSON.
    pub json: bool,
    /// Database user for the report's queries (default $USER).
    pub db_user: Option<String>,
    /// How long `start` waits for recovery to finish.
    pub timeout: Duration,
    /// Restore from this backup rather than the newest one before the target.
    pub backup: Option<String>,
    /// Read from this repository (a secondary's name, or `primary`) first.
    pub from: Option<String>,
    /// Build a standby that keeps following the archive (and the primary) instead.
    pub standby: Option<pitr_restore::StandbyOptions>,
    /// `OID=DIR` pairs as given (`--tablespace-map`).
    pub tablespace_map: Vec<String>,
    /// Write only what differs from the backup into the existing data directory.
    pub delta: bool,
    /// Stop just before the target (`--exclusive`).
    pub exclusive: bool,
}

/// `--tablespace-map OID=DIR` pairs by OID. A name is refused: backups record each
/// tablespace's OID and server location (BASE_BACKUP's list), not its name.
fn parse_tablespace_map(pairs: &[String]) -> Result<BTreeMap<u32, PathBuf>> {
    let mut map = BTreeMap::new();
    for pair in pairs {
        let (oid, dir) = pair
            .split_once('=')
            .filter(|(o, d)| !o.is_empty() && !d.is_empty())
            .ok_or_else(|| anyhow!("--tablespace-map {pair:?}: expected OID=DIR"))?;
        let oid: u32 = oid.parse().map_err(|_| {
            anyhow!(
                "--tablespace-map {pair:?}: {oid:?} is not a tablespace OID; backups record tablespaces by OID and \
                 server location, not by name (`select oid, spcname from pg_tablespace` on the primary tells the OID)"
            )
        })?;
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            bail!("--tablespace-map {pair:?}: the directory must be an absolute path");
        }
        if map.insert(oid, dir).is_some() {
            bail!("--tablespace-map: tablespace {oid} is mapped twice");
        }
    }
    Ok(map)
}

/// `pitr restore`: a data directory at the target, and with `--start` a server replayed to it
/// with the achieved RPO and RTO.
pub async fn run(config_path: &Path, args: RestoreArgs) -> Result<()> {
    let config = Config::load(config_path)?;
    let mut target = pitr_restore::parse_target(&args.to)?;
    let mut exclusive = false;
    if args.exclusive {
        (target, exclusive) = pitr_restore::target::exclusive(target)?;
    }
    let tablespace_map = parse_tablespace_map(&args.tablespace_map)?;
    if args.standby.is_some() && target != pitr_restore::RecoveryTarget::Latest {
        // Before the repository is opened: nothing is read or written.
        return Err(pitr_restore::RestoreError::StandbyTarget(target.to_string()).into());
    }
    let repo = open::reader(&config, args.from.as_deref())?;
    let mut catalog = open::checked_catalog(&config, &repo).await?;
    if matches!(target, pitr_restore::RecoveryTarget::Name(_)) {
        catalog.load_restore_points(&repo).await;
    }
    let restore_command = tasks::restore_command(config_path, args.from.as_deref())?;
    let start = if args.start {
        let bin_dir = tasks::pg_bin_dir(&config, &catalog)?;
        let db_user = args.db_user.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "postgres".into());
        Some(pitr_restore::StartOptions { bin_dir, port: args.port, db_user, timeout: args.timeout })
    } else {
        None
    };
    let opts = pitr_restore::RestoreOptions {
        target,
        target_dir: args.target_dir.clone(),
        force: args.force,
        restore_command,
        workers: config.backup.parallel(),
        backup_id: args.backup.clone(),
        start,
        // `pitr expire` runs on the primary: that is where a restore from a secondary announces
        // itself (and if the primary cannot take it, the restore goes on with a warning).
        marker_repository: match args.from {
            Some(_) => Some(open::single(&config, None)?),
            None => None,
        },
        standby: args.standby.clone(),
        tablespace_map,
        delta: args.delta,
        exclusive,
    };
    let bar = output::progress_bar(!args.json, "restore");
    let on_progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let started_us = pitr_archive::now_us();
    let result = pitr_restore::restore(&repo, &catalog, &opts, &on_progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = result?;
    store_restore_timing(&config, catalog.cluster.system_id, started_us, &report).await;
    if args.json {
        output::print_json(&report)?;
        return Ok(());
    }
    if report.standby {
        println!("standby of the archive in {} (follows it, never reaches a target)", report.target_dir);
    } else {
        println!("restored {} to {}", report.target, report.target_dir);
    }
    println!(
        "  backup used:            {} ({}, consistent at {}, LSN {})",
        report.backup_id, report.backup_kind, report.backup_stop_time, report.backup_stop_lsn
    );
    for (oid, dir) in &report.mapped_tablespaces {
        println!("  tablespace {oid:<11} {dir}");
    }
    if report.backup_chain.len() > 1 {
        println!("  combined chain:         {}", report.backup_chain.join(" -> "));
    }
    match &report.delta {
        Some(d) => {
            println!(
                "  delta, written:         {} files, {} bytes written in {:.1} s{}",
                d.files_written,
                d.bytes_written,
                report.download_seconds,
                if d.resumed { " (completing an interrupted delta restore)" } else { "" }
            );
            println!("  delta, unchanged:       {} files, {} bytes skipped", d.files_unchanged, d.bytes_unchanged);
            println!("  delta, fetched:         {} bytes", d.bytes_fetched);
            println!("  delta, removed:         {} entries the backup does not have", d.removed);
            if d.without_block_hashes {
                println!(
                    "  (the repository has no dedup key: no block could be judged by hash, so every block was \
                     fetched, and written only where it differed)"
                );
            }
        }
        None => {
            println!(
                "  files:                  {} ({} bytes), written in {:.1} s",
                report.files, report.bytes_restored, report.download_seconds
            );
            if args.delta {
                println!("  (--delta: the target directory was missing or empty, so everything was written)");
            }
        }
    }
    if let Some(landing) = &report.landing {
        println!("  restore point:          {}", landing.detail);
    }
    if let Some(c) = &report.newest_archived_commit {
        println!("  newest archived commit: {c}");
    }
    if report.started && report.standby {
        println!(
            "  consistent at:          LSN {}, last replayed commit {}",
            report.last_replayed_lsn.as_deref().unwrap_or("-"),
            report.last_replayed_commit_time.as_deref().unwrap_or("(none replayed)")
        );
        println!("  time to consistent:     {:.1} s", report.replay_seconds.unwrap_or(0.0));
        println!(
            "  the standby is running on port {} (read-only, in recovery; promote it with pg_ctl promote or \
             select pg_promote()); stop it with: {}",
            report.port.unwrap_or(0),
            report.stop_command.as_deref().unwrap_or("")
        );
    } else if report.started {
        println!(
            "  last replayed commit:   {}",
            report.last_replayed_commit_time.as_deref().unwrap_or("(none replayed)")
        );
        println!("  last replayed LSN:      {}", report.last_replayed_lsn.as_deref().unwrap_or("-"));
        if let Some(b) = report.wal_replayed_bytes {
            println!("  WAL replayed:           {b} bytes from {}", report.backup_start_lsn);
        }
        if let Some(x) = report.last_replayed_xid {
            println!("  last replayed xid:      {x}");
        }
        match report.data_loss_window_seconds {
            Some(w) => println!("  data-loss window (RPO): {w:.6} s"),
            None => println!("  data-loss window (RPO): not measurable for this target kind"),
        }
        println!("  replay:                 {:.1} s", report.replay_seconds.unwrap_or(0.0));
        println!("  total (RTO):            {:.1} s", report.total_seconds);
        println!(
            "  the server is running on port {}; stop it with: {}",
            report.port.unwrap_or(0),
            report.stop_command.as_deref().unwrap_or("")
        );
    } else if report.standby {
        println!("  standby settings written to postgresql.auto.conf (standby.signal present); start the server to follow the archive");
    } else {
        println!("  recovery settings written to postgresql.auto.conf (recovery.signal present); start the server to replay to the target");
    }
    Ok(())
}

/// Stores the timings of a restore run to its target (`--start`) in the primary repository,
/// where the predicted RTO learns from them with the drills' (`pitr_drill::rto`). The restore
/// has succeeded: a timing that cannot be stored (read-only credentials, storage down) is a
/// warning, not the command's failure.
async fn store_restore_timing(config: &Config, system_id: u64, started_us: i64, report: &pitr_restore::RestoreReport) {
    if !report.started || report.standby || report.delta.is_some() {
        return;
    }
    let stored = async {
        let repo = open::single(config, None)?;
        let value = serde_json::to_value(report)?;
        anyhow::Ok(pitr_drill::rto::store_restore_timing(&repo, system_id, started_us, value).await?)
    };
    // Bounded: after a restore from a secondary the primary may be the storage that is down, and
    // the restored server must not wait on its retries.
    match tokio::time::timeout(std::time::Duration::from_secs(30), stored).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("warning: this restore's timings were not stored for the predicted RTO: {e:#}"),
        Err(_) => eprintln!(
            "warning: this restore's timings were not stored for the predicted RTO: the primary repository did \
             not answer within 30 s"
        ),
    }
}
