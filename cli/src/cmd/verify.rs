//! `pitr verify`: check what one repository holds for the cluster (`--source mongo` is
//! [`super::mongo::verify`]).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
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
    // The journal: the repository holds what its signed history says it should.
    // (Unreadable: a finding, and the report above is still printed.)
    let journal = super::verify_journal::check_or_finding(&config, from, &repo, deep).await;
    report.notes.extend(journal.notes);
    if !journal.findings.is_empty() {
        report.findings.extend(journal.findings);
        report.findings.sort_by(|a, b| (a.kind, &a.object).cmp(&(b.kind, &b.object)));
        report.ok = false;
    }
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

/// `pitr verify --rebuild-index`: decode the archived WAL and write the change index objects that
/// are missing (never overwriting a valid one; `force` replaces ones that cannot be read).
/// Exit 1 when a complete segment was left unindexed.
pub async fn rebuild_index(
    config_path: &Path,
    from: Option<&str>,
    since: Option<&str>,
    force: bool,
    json: bool,
) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let repo = open::single(&config, from)?;
    repo.check().await?;
    let info = repo.resolve_cluster(config.postgres.as_ref().and_then(|p| p.system_id)).await?;
    let since_segno = match since {
        None => None,
        Some(text) => {
            let us = pitr_archive::time::parse_time(text)
                .ok_or_else(|| anyhow!("--since {text:?}: not a time (e.g. 2026-01-31 12:00:00+00)"))?;
            Some(first_segment_since(&repo, &info, us).await?)
        }
    };
    let report = pitr_archive::change_index::rebuild(&repo, &info, since_segno, force)
        .await
        .with_context(|| format!("rebuilding the change index in {}", repo.location()))?;
    if json {
        output::print_json(&report)?;
    } else {
        println!(
            "change index in {}: {} objects written, {} already there, {} replaced",
            repo.location(),
            report.written,
            report.present,
            report.replaced
        );
        for p in &report.problems {
            println!("problem: {p}");
        }
    }
    Ok(if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The lowest segment number that may hold commits at or after `since_us`: walking whole
/// segments newest first, until one whose last commit is older (segment headers carry their
/// commit times, so no WAL is read).
async fn first_segment_since(
    repo: &pitr_archive::Repository,
    info: &pitr_archive::ClusterInfo,
    since_us: i64,
) -> Result<u64> {
    let layout = pitr_archive::WalLayout::new(info);
    let catalog = pitr_archive::WalCatalog::build(repo, layout).await?;
    let mut first = 0;
    for (&(timeline, segno), entry) in catalog.segments.iter().rev() {
        if !entry.whole {
            continue;
        }
        let name = layout.object_name(&pitr_archive::WalObject::Segment { timeline, segno });
        let header = repo.read_header(&name).await?;
        if matches!(header.meta.last_commit_us, Some(t) if t < since_us) {
            first = segno + 1;
            break;
        }
    }
    Ok(first)
}
