//! `pitr verify`: check what one repository holds for the cluster (`--source mongo` is
//! [`super::mongo::verify`]).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Result};
use pitr_pgwire::{ConnInfo, ConnectOptions, Connection};
use pitr_restore::verify::SlotWitness;

use crate::config::{Config, PostgresConfig};
use crate::{open, output};

/// How long verify waits for the server before it checks the archive without it.
const SERVER_TIMEOUT: Duration = Duration::from_secs(10);

/// What pitr's slot on the `[postgres]` server says was archived, on a short replication
/// connection of its own (READ_REPLICATION_SLOT, PostgreSQL 15+; it holds nothing on the server).
async fn slot_witness(pg: &PostgresConfig) -> Result<SlotWitness> {
    let info: ConnInfo = pg.conninfo.parse().map_err(|e| anyhow!("[postgres] conninfo: {e}"))?;
    let slot = pg.slot();
    let opts = ConnectOptions { replication: true, application_name: format!("{}_verify", pg.application_name()) };
    let ask = async {
        let mut conn = Connection::connect(&info, &opts).await?;
        let ident = conn.identify_system().await?;
        let read = conn.read_replication_slot(&slot).await;
        conn.close().await;
        anyhow::Ok((ident, read?))
    };
    let (ident, read) = tokio::time::timeout(SERVER_TIMEOUT, ask)
        .await
        .map_err(|_| anyhow!("no answer within {SERVER_TIMEOUT:?}"))??;
    match read {
        Some((kind, Some(lsn))) if kind == "physical" => {
            Ok(SlotWitness { system_id: ident.system_id, timeline: ident.timeline, slot, flushed_lsn: lsn })
        }
        Some((kind, _)) if kind != "physical" => Err(anyhow!("slot {slot} is a {kind} slot, not pitr's physical one")),
        Some(_) => Err(anyhow!("slot {slot} has no restart LSN (it has not reserved WAL)")),
        None => Err(anyhow!("the server has no slot {slot}")),
    }
}

/// Checks one repository alone (the primary, or `--from NAME`): no fallback hides what it lacks.
pub async fn run(config_path: &Path, from: Option<&str>, deep: bool, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let repo = open::single(&config, from)?;
    // The slot is read before the archive is listed: WAL archived in between can only move the
    // archive's end past what the slot says, never make a healthy archive look rolled back.
    let (witness, skipped) = match &config.postgres {
        // A secondary that is not `required` may lag behind what the slot acknowledged without
        // having lost anything: the server witnesses the primary repository only.
        Some(_) if from.is_some() => {
            (None, Some("server slot check skipped: it applies to the primary repository only".to_string()))
        }
        Some(pg) => match slot_witness(pg).await {
            Ok(w) => (Some(w), None),
            Err(e) => (None, Some(format!("server slot check skipped: {e:#}"))),
        },
        None => (None, Some("server slot check skipped: the config has no [postgres] section".to_string())),
    };
    let catalog = open::checked_catalog(&config, &repo).await?;
    let mut report =
        pitr_restore::verify::verify_with(&repo, &catalog, deep, config.backup.parallel(), witness.as_ref()).await?;
    report.notes.extend(skipped);
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
        for n in &report.notes {
            println!("note: {n}");
        }
        for f in &report.findings {
            println!("FINDING {}: {}: {}", f.kind, f.object, f.message);
        }
        println!("{}", if report.ok { "OK: no findings" } else { "FAILED" });
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
