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
    /// Where the backup was taken (primary or standby, and its address); null for backups
    /// recorded before pitr kept it.
    taken_from: Option<pitr_archive::backup::TakenFrom>,
    /// `pinned`, `pinned_until`, `note` (see `pitr pin`).
    #[serde(flatten)]
    pin: super::pin::ShownPin,
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
    repo.check().await?;
    let dumps = dump::list_json(&config, &repo).await?;
    let file_sets = super::files::list_json(&config, &repo).await?;
    if config.postgres.is_none() {
        // No cluster to list: the replica set (if any), file sets and dumps.
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
    // The marker was opened above.
    let mut catalog = open::catalog(&repo, config.system_id()).await?;
    catalog.load_restore_points(&repo).await;
    // Without the pins every backup is still listed, only not marked pinned: the error says so.
    let (pins, pins_error) = match pitr_archive::pins::PinSet::load(&repo, catalog.cluster.system_id).await {
        Ok(pins) => (pins, None),
        Err(e) => (
            pitr_archive::pins::PinSet::default(),
            Some(format!(
                "reading the pins in {}: {e} (backups are listed without their pins and notes)",
                repo.location()
            )),
        ),
    };
    let now = pitr_archive::now_us();
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
            taken_from: b.taken_from.clone(),
            pin: super::pin::ShownPin::of(pins.of(&b.id), now),
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
    let (predicted_rto, predicted_rto_note) = super::status::predicted_rto(&repo, &catalog).await;
    if json {
        let out = serde_json::json!({
            "system_id": catalog.cluster.system_id,
            "predicted_rto": predicted_rto,
            "predicted_rto_note": predicted_rto_note,
            "server_version_num": catalog.cluster.server_version_num,
            "incrementals": incrementals,
            "backups": backups,
            "recoverable_windows": windows,
            "restore_points": listed_restore_points(&catalog),
            "restore_point_index_problems": catalog.restore_point_problems,
            "pins_error": pins_error,
            "mongo": mongo::list_json(&config, &repo).await?,
            "dumps": dumps,
            "file_sets": file_sets,
        });
        output::print_json(&out)?;
        return Ok(());
    }
    println!("cluster {} in {}", catalog.cluster.system_id, repo.location());
    println!(
        "predicted RTO: {}",
        super::status::predicted_rto_line(
            predicted_rto.as_ref(),
            predicted_rto_note.as_deref(),
            config.targets.rto_seconds
        )
    );
    if backups.is_empty() {
        println!("no backups yet (run `pitr backup`)");
    } else {
        println!(
            "{:<18} {:<11} {:>3}  {:<33} {:<23} {:>14} {:>14}  {:<18} taken from",
            "backup", "type", "tli", "stop time", "start..stop LSN", "logical", "stored", "parent"
        );
        for b in &backups {
            println!(
                "{:<18} {:<11} {:>3}  {:<33} {:<23} {:>14} {:>14}  {:<18} {}",
                b.id,
                b.kind,
                b.timeline,
                b.stop_time,
                format!("{}..{}", b.start_lsn, b.stop_lsn),
                b.logical_bytes,
                b.stored_bytes,
                b.parent.as_deref().unwrap_or("-"),
                b.taken_from.as_ref().map_or_else(|| "-".to_string(), ToString::to_string)
            );
            let pin = b.pin.suffix();
            if !pin.is_empty() {
                println!("  {}", pin.trim_start());
            }
        }
    }
    if let Some(e) = &pins_error {
        println!("pins error: {e}");
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
    print_restore_points(&catalog);
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

/// A restore point as `list --json` shows it.
#[derive(serde::Serialize)]
struct ListedRestorePoint {
    name: String,
    time: String,
    lsn: String,
    end_lsn: String,
    timeline: u32,
    /// Whether `restore --to name:NAME` can stop here now.
    restorable: bool,
    /// Why not, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<String>,
}

fn listed_restore_points(catalog: &pitr_restore::Catalog) -> Vec<ListedRestorePoint> {
    catalog
        .restore_points
        .iter()
        .map(|p| ListedRestorePoint {
            name: p.point.name.clone(),
            time: pitr_restore::format_time(p.point.time_us),
            lsn: format_lsn(p.point.lsn),
            end_lsn: format_lsn(p.point.end_lsn),
            timeline: p.point.timeline,
            restorable: p.unavailable.is_none(),
            unavailable: p.unavailable.clone(),
        })
        .collect()
}

/// The restore points, oldest first. Several may share a name (PostgreSQL allows it): a restore
/// to that name targets the newest (and says why when it cannot reach it).
fn print_restore_points(catalog: &pitr_restore::Catalog) {
    let points = listed_restore_points(catalog);
    if !catalog.restore_point_problems.is_empty() {
        println!(
            "restore point index incomplete ({} problem(s)): restores to a name are refused until they are \
             looked at (pitr writes no entry that does not open or is over {} bytes; delete such objects)",
            catalog.restore_point_problems.len(),
            pitr_archive::restore_points::ENTRY_MAX_BYTES
        );
        for p in &catalog.restore_point_problems {
            println!("  {p}");
        }
    }
    if points.is_empty() {
        println!("restore points: none (create one with `pitr mark NAME`)");
        return;
    }
    println!("restore points (restore with --to name:NAME; of several with one name, the newest is the target):");
    println!("  {:<24} {:<33} {:<19} {:>3}", "name", "time", "LSN", "tli");
    for p in &points {
        println!(
            "  {:<24} {:<33} {:<19} {:>3}{}",
            format!("{:?}", p.name),
            p.time,
            p.lsn,
            p.timeline,
            p.unavailable.as_deref().map(|why| format!("  (not restorable: {why})")).unwrap_or_default()
        );
    }
}
