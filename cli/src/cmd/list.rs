//! `pitr list`: backups and the recoverable window per timeline.

use std::path::Path;

use anyhow::Result;
use pitr_pgformat::lsn::format_lsn;

use super::{dump, mongo};
use crate::config::Config;
use crate::{open, output};

#[derive(serde::Serialize)]
struct ListedBackup {
    id: String,
    kind: pitr_archive::backup::BackupKind,
    parent: Option<String>,
    timeline: u32,
    start_time: String,
    stop_time: String,
    start_lsn: String,
    stop_lsn: String,
    logical_bytes: u64,
    stored_bytes: u64,
}

#[derive(serde::Serialize)]
struct ListedWindow {
    timeline: u32,
    from: Option<String>,
    to: Option<String>,
    from_lsn: Option<String>,
    to_lsn: String,
    newest_commit: Option<String>,
    /// Up to when the sidecar recorded the archive held everything the primary had.
    complete_up_to: Option<String>,
    /// The restorable ranges; gaps lie between them (retention, or lost WAL).
    ranges: Vec<ListedRange>,
}

#[derive(serde::Serialize)]
struct ListedRange {
    from: String,
    to: Option<String>,
    from_lsn: String,
    to_lsn: String,
}

/// `pitr list`: backups and recoverable windows of the cluster (and of the MongoDB replica set).
pub async fn run(config_path: &Path, from: Option<&str>, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open::reader(&config, from)?;
    let dumps = dump::list_json(&config, &repo).await?;
    let file_sets = super::files::list_json(&config, &repo).await?;
    if config.postgres.is_none() {
        // No cluster to list: the replica set (if any), file sets and dumps.
        repo.check().await?;
        let replica_set = match config.mongo {
            Some(_) => Some(mongo::list_json(&config, &repo).await?.unwrap_or_default()),
            None => None,
        };
        if json {
            let mut out = serde_json::json!({ "dumps": dumps, "file_sets": file_sets });
            if let Some(v) = replica_set {
                out["mongo"] = v;
            }
            output::print_json(&out)?;
        } else {
            if let Some(v) = &replica_set {
                mongo::print_list(v);
            }
            if let Some(d) = &dumps {
                dump::print_list(d);
            }
            if let Some(f) = &file_sets {
                super::files::print_list(f);
            }
        }
        return Ok(());
    }
    let catalog = open::checked_catalog(&config, &repo).await?;
    let fmt = pitr_restore::format_time;
    let backups: Vec<ListedBackup> = catalog
        .backups
        .iter()
        .map(|b| ListedBackup {
            id: b.id.clone(),
            kind: b.kind,
            parent: b.parent.clone(),
            timeline: b.timeline,
            start_time: fmt(b.start_time_us),
            stop_time: fmt(b.stop_time_us),
            start_lsn: format_lsn(b.start_lsn),
            stop_lsn: format_lsn(b.stop_lsn),
            logical_bytes: b.logical_bytes,
            stored_bytes: b.stored_bytes,
        })
        .collect();
    let windows: Vec<ListedWindow> = catalog
        .windows
        .iter()
        .map(|w| ListedWindow {
            timeline: w.timeline,
            from: w.start_us.map(fmt),
            to: w.end_us.map(fmt),
            from_lsn: w.start_lsn.map(format_lsn),
            to_lsn: format_lsn(w.end_lsn),
            newest_commit: w.newest_commit_us.map(fmt),
            complete_up_to: w.complete_up_to_us.map(fmt),
            ranges: w
                .ranges
                .iter()
                .map(|r| ListedRange {
                    from: fmt(r.start_us),
                    to: r.end_us.map(fmt),
                    from_lsn: format_lsn(r.start_lsn),
                    to_lsn: format_lsn(r.end_lsn),
                })
                .collect(),
        })
        .collect();
    let incrementals = pitr_basebackup::incremental::incrementals(catalog.cluster.server_version_num);
    if json {
        let out = serde_json::json!({
            "system_id": catalog.cluster.system_id,
            "server_version_num": catalog.cluster.server_version_num,
            "incrementals": incrementals,
            "backups": backups,
            "recoverable_windows": windows,
            "mongo": mongo::list_json(&config, &repo).await?,
            "dumps": dumps,
            "file_sets": file_sets,
        });
        output::print_json(&out)?;
        return Ok(());
    }
    println!("cluster {} in {}", catalog.cluster.system_id, repo.location());
    if backups.is_empty() {
        println!("no backups yet (run `pitr backup`)");
    } else {
        println!(
            "{:<18} {:<11} {:>3}  {:<33} {:<23} {:>14} {:>14}  parent",
            "backup", "type", "tli", "stop time", "start..stop LSN", "logical", "stored"
        );
        for b in &backups {
            println!(
                "{:<18} {:<11} {:>3}  {:<33} {:<23} {:>14} {:>14}  {}",
                b.id,
                b.kind,
                b.timeline,
                b.stop_time,
                format!("{}..{}", b.start_lsn, b.stop_lsn),
                b.logical_bytes,
                b.stored_bytes,
                b.parent.as_deref().unwrap_or("-")
            );
        }
    }
    println!("incremental backups: {}", incrementals.summary);
    for w in &windows {
        println!(
            "timeline {}: restorable from {} to {} (WAL to {})",
            w.timeline,
            w.from.as_deref().unwrap_or("(no backup yet)"),
            w.to.as_deref().unwrap_or("(no archived commit)"),
            w.to_lsn
        );
        if let Some(c) = &w.complete_up_to {
            println!(
                "  archive known complete up to {c} (newest archived commit {})",
                w.newest_commit.as_deref().unwrap_or("none")
            );
        }
        if w.ranges.len() > 1 {
            for (i, r) in w.ranges.iter().enumerate() {
                println!(
                    "  range {}: {} .. {} (LSN {}..{})",
                    i + 1,
                    r.from,
                    r.to.as_deref().unwrap_or("(no archived commit)"),
                    r.from_lsn,
                    r.to_lsn
                );
                if let Some(next) = w.ranges.get(i + 1) {
                    println!("  gap:     {} .. {} cannot be restored", r.to.as_deref().unwrap_or(&r.from), next.from);
                }
            }
        }
    }
    if let Some(m) = mongo::list_json(&config, &repo).await? {
        mongo::print_list(&m);
    }
    if let Some(d) = &dumps {
        dump::print_list(d);
    }
    if let Some(f) = &file_sets {
        super::files::print_list(f);
    }
    Ok(())
}
