//! `pitr expire`: remove expired backups, the WAL no kept backup or the window needs, and
//! unreferenced blocks.

use std::path::Path;

use anyhow::{anyhow, Result};

use crate::config::Config;
use crate::{open, output, tasks};

/// `pitr expire`: applies `[retention]` and prints what went and what stays.
pub async fn run(config_path: &Path, dry_run: bool, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open::writer(&config)?;
    // Before any part: a wrong key or a repository of a newer format must stop it before its
    // expire lock is put.
    repo.check().await?;
    // Every part runs whatever another's outcome: a dump or file-set problem (a manifest that
    // does not open, the storage failing) must not keep PostgreSQL's backups and WAL from
    // expiring. Each part's error is said after the report, and fails the command.
    // Dumps past their set's keep_days go first: the block sweep after sees their blocks unreferenced.
    let dumps = super::dump::expire_sets(&config, &repo, dry_run).await;
    // File-set retention and the sweep of blocks no file set or dump references.
    let file_sets = super::files::expire(&config, &repo, dry_run).await;
    let mut failed: Vec<(&str, anyhow::Error)> = Vec::new();
    // A part that failed shows as null in --json.
    let dumps = dumps.map_or_else(
        |e| {
            failed.push(("dumps", e));
            None
        },
        Some,
    );
    let file_sets = file_sets.map_or_else(
        |e| {
            failed.push(("file sets", e));
            None
        },
        Some,
    );
    if config.postgres.is_none() && config.mongo.is_none() {
        // Only file sets and dumps: there is no cluster to expire.
        print_sets(dumps.as_ref(), file_sets.as_ref(), dry_run, json)?;
        return parts_failed(&repo, failed);
    }
    let report = match tasks::expire(&config, &repo, dry_run).await {
        Ok(r) => r,
        Err(e) => {
            // What the other parts did is still said.
            print_sets(dumps.as_ref(), file_sets.as_ref(), dry_run, json)?;
            failed.push(("PostgreSQL", e));
            return parts_failed(&repo, failed);
        }
    };
    // Retention that could not be extended fails the command, after the report: the deletes are
    // done, but those objects are protected for less long than their backups are kept.
    let retention_failed = || {
        anyhow!(
            "expire in {}: the Object Lock retention of {} objects could not be extended (listed above); the next run tries again",
            repo.location(),
            report.retention_failed.len()
        )
    };
    if json {
        let mut out = serde_json::to_value(&report)?;
        if let Some(o) = out.as_object_mut() {
            o.insert("dumps".into(), serde_json::to_value(&dumps)?);
            o.insert("file_sets".into(), serde_json::to_value(&file_sets)?);
        }
        output::print_json(&out)?;
        if !report.retention_failed.is_empty() {
            failed.push(("PostgreSQL", retention_failed()));
        }
        return parts_failed(&repo, failed);
    }
    let r = &config.retention;
    let verb = if dry_run { "would remove" } else { "removed" };
    println!(
        "expire in {} at {}{}: daily {}, weekly {}, monthly {}, yearly {}, window {} (from {}; base backup {})",
        repo.location(),
        report.now,
        if dry_run { " (dry run: nothing is changed)" } else { "" },
        r.daily,
        r.weekly,
        r.monthly,
        r.yearly,
        humantime::format_duration(r.window),
        report.window_start,
        report.window_base.as_deref().unwrap_or("none")
    );
    println!("keeping {} backups:", report.kept.len());
    for b in &report.kept {
        let reasons: Vec<String> = b
            .reasons
            .iter()
            .map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default())
            .collect();
        let pin = b.pinned.as_ref().map(|p| format!(" ({p})")).unwrap_or_default();
        let note = b.note.as_ref().map(|n| format!("; note: {n}")).unwrap_or_default();
        println!("  {:<18} {:<11} {}{pin}{note}", b.id, b.kind, reasons.join(", "));
    }
    for b in &report.removed_backups {
        println!("{verb} backup {} ({}, consistent at {})", b.id, b.kind, b.stop_time);
    }
    for w in &report.removed_wal {
        println!("{verb} WAL of timeline {}: {} .. {} ({} segments)", w.timeline, w.from, w.to, w.segments);
    }
    if let Some(why) = &report.wal_skipped {
        println!("WAL: {why}");
    }
    if let Some(why) = &report.blocks_skipped {
        println!("blocks: {why}");
    }
    for r in &report.running_restores {
        println!("running: {r}");
    }
    if report.blocks_left > 0 {
        println!(
            "blocks: the sweep reached its deadline; {} unreferenced blocks are left for the next run",
            report.blocks_left
        );
    }
    for x in &report.retained {
        println!("RETAINED {}: {}", x.object, x.why);
    }
    for x in &report.untrusted {
        // A floor name this run cleared for its own floor is gone already; anything else stays
        // for the operator to look at.
        let hint = if x.why.ends_with(pitr_archive::expire::FLOOR_REPLACED) {
            ""
        } else {
            " (not pitr's: inspect it, then delete it by hand)"
        };
        println!("NOT OBEYED {}: {}{hint}", x.object, x.why);
    }
    for x in &report.stale_removed {
        println!("{} stale marker {x}", if dry_run { "would remove" } else { "removed" });
    }
    for id in &report.orphan_pins_removed {
        println!(
            "{} the pin records of backup {id}, which has no manifest (a `pitr backup` that failed after recording its pin)",
            if dry_run { "would remove" } else { "removed" }
        );
    }
    if !report.retention_until.is_empty() {
        println!(
            "Object Lock retention to extend for {} backups kept longer than the window:",
            report.retention_until.len()
        );
        for t in &report.retention_until {
            println!("  {:<18} until {} ({} objects)", t.id, t.until, t.objects);
        }
        if dry_run {
            println!("retention: dry run, not read or extended");
        } else {
            println!(
                "retention: {} objects checked, {} extended{}",
                report.retention_checked,
                report.retention_extended,
                if report.retention_missing > 0 {
                    format!(", {} not found (run `pitr verify`)", report.retention_missing)
                } else {
                    String::new()
                }
            );
        }
    }
    for x in &report.retention_failed {
        println!("RETENTION NOT EXTENDED {}: {}", x.object, x.why);
    }
    print_sets(dumps.as_ref(), file_sets.as_ref(), dry_run, false)?;
    if report.removed_restore_points > 0 {
        println!(
            "{verb} {} restore point index entries (their WAL is below the retention floor)",
            report.removed_restore_points
        );
    }
    println!(
        "{verb} {} backups, {} WAL objects, {} blocks ({} bytes){}",
        report.removed_backups.len(),
        report.removed_wal_objects,
        report.removed_blocks,
        report.removed_bytes,
        if report.retained.is_empty() {
            String::new()
        } else {
            format!("; {} objects retained by the storage", report.retained.len())
        }
    );
    if !report.retention_failed.is_empty() {
        failed.push(("PostgreSQL", retention_failed()));
    }
    parts_failed(&repo, failed)
}

/// What the dumps' and the file sets' parts did (`None`: the part failed).
fn print_sets(
    dumps: Option<&super::dump::DumpExpiry>,
    file_sets: Option<&pitr_files::FilesExpireReport>,
    dry_run: bool,
    json: bool,
) -> Result<()> {
    if json {
        return output::print_json(&serde_json::json!({ "dumps": dumps, "file_sets": file_sets }));
    }
    if let Some(d) = dumps {
        d.print(dry_run);
    }
    if let Some(f) = file_sets {
        super::files::print_expire(f);
    }
    Ok(())
}

/// The command's outcome once every part has run: an error naming each part that failed, with
/// its error.
fn parts_failed(repo: &pitr_archive::Repository, failed: Vec<(&str, anyhow::Error)>) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    let parts: Vec<&str> = failed.iter().map(|(p, _)| *p).collect();
    let errors: Vec<String> = failed.iter().map(|(p, e)| format!("{p}: {e:#}")).collect();
    Err(anyhow!(
        "expire in {} failed in {} ({}); every other part was run",
        repo.location(),
        parts.join(", "),
        errors.join("; ")
    ))
}
