//! `pitr backup`: a PostgreSQL base backup (`--source mongo` is [`super::mongo::backup`]).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use pitr_pgwire::ConnInfo;

use crate::config::Config;
use crate::{open, output, tasks};

/// `pitr backup`: a base backup of the `[postgres]` cluster (incremental where the server can),
/// taken from `from_standby` (`--from-standby`), else from `[backup] conninfo`'s standby, else
/// from the primary. `pin` (`--keep-forever`, `--note`) is recorded just before the manifest, so
/// that the backup is stored with it or not at all.
pub async fn run(
    config_path: &Path,
    incremental: bool,
    from_standby: Option<&str>,
    pin: Option<pitr_archive::pins::Change>,
    json: bool,
) -> Result<()> {
    let mut config = Config::load(config_path)?;
    if let Some(standby) = from_standby {
        // Checked here so that the message names the flag, not the config key it stands in for.
        standby.parse::<ConnInfo>().map_err(|e| anyhow!("--from-standby: {e}"))?;
        config.backup.conninfo = Some(standby.to_string());
    }
    let pg = config.postgres()?;
    let conninfo: ConnInfo = pg.connection_info()?;
    let repo = open::writer(&config)?;
    let opts = pitr_basebackup::BackupOptions { pin, ..tasks::backup_options(&config, pg, conninfo, incremental)? };
    let bar = output::progress_bar(!json, "backup");
    let on_progress = |p: pitr_basebackup::Progress| {
        if let Some(bar) = &bar {
            bar.set_length(p.estimate.max(p.received));
            bar.set_position(p.received);
        }
    };
    let result = pitr_basebackup::take_backup(&repo, &opts, &on_progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (_, summary) = result.context("backup failed")?;
    let pinned = summary.pin.as_ref().map(|r| super::pin::ShownPin::of(Some(r), pitr_archive::now_us()));
    let throttled = open::upload_throttled();
    if json {
        let mut report = serde_json::to_value(&summary)?;
        if let (Some(t), Some(fields)) = (throttled, report.as_object_mut()) {
            fields.insert("upload_throttled_seconds".into(), t.as_secs_f64().into());
        }
        if let (Some(p), Some(fields)) = (&pinned, report.as_object_mut()) {
            fields.insert("pin".into(), serde_json::to_value(p)?);
        }
        output::print_json(&report)?;
    } else {
        if let Some(reason) = &summary.fallback {
            println!("warning: incremental backup not possible: {reason}; took a full backup instead");
        }
        let kind = match &summary.parent {
            Some(parent) => format!("incremental backup (on {parent})"),
            None => "full backup".to_string(),
        };
        println!(
            "{kind} {} done (from the {}): {} files, {} bytes read, {} bytes stored ({} new blocks, {} reused; ratio {:.1}), WAL {}..{} on timeline {}, {:.1} s",
            summary.id,
            summary.taken_from,
            summary.files,
            summary.bytes_read,
            summary.bytes_stored,
            summary.blocks_new,
            summary.blocks_reused,
            summary.dedup_ratio,
            summary.start_lsn,
            summary.stop_lsn,
            summary.timeline,
            summary.duration_seconds
        );
        if let Some(p) = &pinned {
            println!("backup {}:{}", summary.id, p.suffix());
        }
        if let Some(t) = throttled {
            println!(
                "uploads waited {:.1} s for [repository] max_upload_rate (summed over parallel uploads)",
                t.as_secs_f64()
            );
        }
    }
    Ok(())
}
