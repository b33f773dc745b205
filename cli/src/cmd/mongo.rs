//! The `--source mongo` side of the commands: `backup` (a snapshot), `restore`, the mongo part
//! of `list`, `verify` and `drill`. The work is pitr-mongo's; this wires it to the config and
//! prints. (`stream`'s oplog tailer is in [`super::stream`], the scheduled MongoDB jobs in
//! [`crate::schedule`].)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::time::format_rfc3339_micros;
use pitr_archive::Repository;
use pitr_mongo::restore::{MongoRestoreReport, MongoTarget, RestoreOptions};
use pitr_mongo::MongoCatalog;

use crate::config::Config;
use crate::{open, output, tasks};

/// `pitr backup --source mongo`: a snapshot of the replica set.
pub async fn backup(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open::writer(&config)?;
    let (manifest, seconds) = tasks::mongo_snapshot(&config, &repo).await?;
    print_snapshot(&manifest, seconds, json)
}

fn print_snapshot(m: &pitr_mongo::SnapshotManifest, seconds: f64, json: bool) -> Result<()> {
    if json {
        let out = serde_json::json!({
            "id": m.id, "name": m.name, "source": "mongo",
            "ts_before": m.ts_before.to_string(), "ts_after": m.ts_after.to_string(),
            "consistent_time": format_rfc3339_micros(m.time_after_us),
            "collections": m.collections.len(), "documents": m.documents,
            "logical_bytes": m.logical_bytes, "stored_bytes": m.stored_bytes, "seconds": seconds,
        });
        output::print_json(&out)?;
        return Ok(());
    }
    println!("mongo snapshot {} of {}", m.id, m.name);
    println!(
        "  collections: {}, documents: {}, {} bytes ({} newly stored)",
        m.collections.len(),
        m.documents,
        m.logical_bytes,
        m.stored_bytes
    );
    println!(
        "  oplog: {} .. {}; consistent at {} once replayed",
        m.ts_before,
        m.ts_after,
        format_rfc3339_micros(m.time_after_us)
    );
    println!("  took {seconds:.1} s");
    Ok(())
}

/// `--to` for MongoDB: TIME, `ts:SECONDS:INC` or `latest`.
pub fn parse_target(s: &str) -> Result<MongoTarget> {
    MongoTarget::parse(s).map_err(|e| anyhow!("--to {e}"))
}

/// Where `restore --source mongo` was told to restore into on its command line.
pub struct TargetArg {
    /// `--target-uri`.
    pub uri: Option<String>,
    /// `--target-uri-file`.
    pub file: Option<PathBuf>,
}

/// Whether a MongoDB URI carries a password: in its user information or in an option.
fn carries_password(uri: &str) -> bool {
    pitr_mongo::redact(uri) != uri
}

/// The first line of a URI file that is neither blank nor a `#` comment.
fn read_uri_file(path: &Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{what} {}: cannot read it", path.display()))?;
    let uri = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
    let uri = uri.with_context(|| format!("{what} {}: holds no URI", path.display()))?;
    if !uri.starts_with("mongodb://") {
        bail!("{what} {}: expected mongodb://host:port/ on its first line", path.display());
    }
    if carries_password(uri) {
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(file = %path.display(), mode = format!("{mode:o}"),
                    "the MongoDB target's URI file holds a password and is readable by group or others; chmod 600 it");
            }
        }
    }
    Ok(uri.to_string())
}

/// The URI to restore into: `--target-uri-file`, else `--target-uri` (refused when it carries a
/// password, which every user of the host can read in the process list), else `[mongo]
/// target_uri` (or `$PITR_MONGO_TARGET_URI`) or `target_uri_file`.
fn target_uri(config: &Config, arg: TargetArg) -> Result<String> {
    if let Some(file) = &arg.file {
        return read_uri_file(file, "--target-uri-file");
    }
    if let Some(uri) = arg.uri {
        if carries_password(&uri) {
            bail!(
                "--target-uri {} carries a password, which any user of this host can read in the process list; \
                 give the URI in [mongo] target_uri, in $PITR_MONGO_TARGET_URI, or in a file named by \
                 --target-uri-file (or [mongo] target_uri_file)",
                pitr_mongo::redact(&uri)
            );
        }
        return Ok(uri);
    }
    let m = config.mongo.as_ref();
    if let Some(uri) = m.and_then(|m| m.target_uri.clone()) {
        return Ok(uri);
    }
    if let Some(file) = m.and_then(|m| m.target_uri_file.as_deref()) {
        return read_uri_file(file, "[mongo] target_uri_file");
    }
    bail!(
        "restore --source mongo needs a server to restore into: --target-uri-file FILE, [mongo] target_uri (or \
         $PITR_MONGO_TARGET_URI), [mongo] target_uri_file, or --target-uri mongodb://host:port/ (without a password)"
    )
}

/// `pitr restore --source mongo`: the replica set at the target, loaded into the target server.
pub async fn restore(
    config_path: &Path,
    from: Option<&str>,
    to: &str,
    target_arg: TargetArg,
    drop: bool,
    json: bool,
) -> Result<()> {
    let config = Config::load(config_path)?;
    let target_uri = target_uri(&config, target_arg)?;
    let repo = open::reader(&config, from)?;
    let target = parse_target(to)?;
    repo.check().await?;
    let catalog = open::mongo_catalog(&config, &repo).await?;
    let connect_timeout = config.mongo.as_ref().map(|m| m.connect_timeout()).unwrap_or(Duration::from_secs(10));
    let source_uri = config.mongo.as_ref().map(|m| m.uri.clone());
    let opts = RestoreOptions { target, target_uri, drop, connect_timeout, source_uri };
    let report = pitr_mongo::restore::restore(&repo, &catalog, &opts).await?;
    print_report(&report, json)
}

fn print_report(r: &MongoRestoreReport, json: bool) -> Result<()> {
    if json {
        output::print_json(r)?;
        return Ok(());
    }
    println!("restored {} (mongo) to {} into {}", r.name, r.target, r.target_uri);
    println!(
        "  snapshot used:          {} (oplog {} .. {}, consistent at {})",
        r.snapshot_id, r.snapshot_ts_before, r.snapshot_ts_after, r.snapshot_consistent_time
    );
    println!(
        "  loaded:                 {} collections, {} documents ({} bytes), {} indexes, in {:.1} s",
        r.collections, r.documents, r.bytes_restored, r.indexes_built, r.load_seconds
    );
    if !r.not_restored.is_empty() {
        println!("  NOT restored:           {} (types restore cannot load)", r.not_restored.join(", "));
    }
    if let Some(t) = &r.newest_archived_ts {
        println!("  newest archived entry:  {} ({})", t, r.newest_archived_time.as_deref().unwrap_or("-"));
    }
    println!("  oplog applied:          {} entries ({} transactions)", r.entries_applied, r.transactions_applied);
    println!(
        "  last applied entry:     {} ({})",
        r.last_applied_ts.as_deref().unwrap_or("(none after the snapshot)"),
        r.last_applied_time.as_deref().unwrap_or("-")
    );
    println!("  data-loss window (RPO): {:.6} s", r.data_loss_window_seconds);
    println!("  replay:                 {:.1} s", r.replay_seconds);
    println!("  total (RTO):            {:.1} s", r.total_seconds);
    Ok(())
}

/// The mongo part of `pitr list`, as JSON; `None` when there is nothing to show.
pub async fn list_json(config: &Config, repo: &Repository) -> Result<Option<serde_json::Value>> {
    let configured = config.mongo.as_ref().and_then(|m| m.name.as_deref());
    if config.mongo.is_none() && pitr_mongo::layout::names(repo).await?.is_empty() {
        return Ok(None);
    }
    let layout = match pitr_mongo::resolve_name(repo, configured).await {
        Ok(l) => l,
        Err(pitr_mongo::MongoError::Nothing { .. }) => {
            return Ok(Some(serde_json::json!({ "snapshots": [], "recoverable_windows": [], "gaps": [] })))
        }
        Err(e) => return Err(e.into()),
    };
    let c = MongoCatalog::load(repo, layout).await?;
    let snapshots: Vec<_> = c
        .snapshots
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id, "ts_before": s.ts_before.to_string(), "ts_after": s.ts_after.to_string(),
                "consistent_time": format_rfc3339_micros(s.time_after_us), "collections": s.collections.len(),
                "documents": s.documents, "logical_bytes": s.logical_bytes, "stored_bytes": s.stored_bytes,
            })
        })
        .collect();
    let windows: Vec<_> = c
        .windows()
        .iter()
        .map(|w| {
            serde_json::json!({
                "snapshot": w.snapshot, "from": format_rfc3339_micros(w.from_us), "from_ts": w.from_ts.to_string(),
                "to": w.to_us.map(format_rfc3339_micros), "to_ts": w.to_ts.to_string(),
            })
        })
        .collect();
    let gaps: Vec<_> =
        c.gaps.iter().map(|(a, b)| serde_json::json!({ "after": a.to_string(), "before": b.to_string() })).collect();
    Ok(Some(serde_json::json!({
        "name": c.layout.name,
        "archived_to": c.last_archived().map(|(t, _)| t.to_string()),
        "complete_up_to": c.complete_up_to_us.map(format_rfc3339_micros),
        "slices": c.runs.iter().map(|r| r.slices.len()).sum::<usize>(),
        "snapshots": snapshots, "recoverable_windows": windows, "gaps": gaps,
    })))
}

/// Prints the mongo part of `pitr list` from [`list_json`]'s value.
pub fn print_list(v: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    println!("mongo {} (oplog archived to {}, {} slices)", s(&v["name"]), s(&v["archived_to"]), v["slices"]);
    let snaps = v["snapshots"].as_array().cloned().unwrap_or_default();
    if snaps.is_empty() {
        println!("no mongo snapshots yet (run `pitr backup --source mongo`)");
    }
    for b in snaps {
        println!(
            "  snapshot {}  consistent at {} ({})  {} collections, {} documents",
            s(&b["id"]),
            s(&b["consistent_time"]),
            s(&b["ts_after"]),
            b["collections"],
            b["documents"]
        );
    }
    for w in v["recoverable_windows"].as_array().cloned().unwrap_or_default() {
        println!("  restorable from {} ({}) to {} ({})", s(&w["from"]), s(&w["from_ts"]), s(&w["to"]), s(&w["to_ts"]));
    }
    for g in v["gaps"].as_array().cloned().unwrap_or_default() {
        println!(
            "  GAP: oplog entries between {} and {} were lost (the oplog rolled over while pitr was away)",
            s(&g["after"]),
            s(&g["before"])
        );
    }
}

/// `pitr verify --source mongo`: one repository alone, as for PostgreSQL.
pub async fn verify(config_path: &Path, from: Option<&str>, deep: bool, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let repo = open::single(&config, from)?;
    repo.check().await?;
    let catalog = open::mongo_catalog(&config, &repo).await?;
    let report = pitr_mongo::verify::verify(&repo, &catalog, deep).await?;
    if json {
        output::print_json(&report)?;
    } else {
        println!(
            "verified mongo {} in {}: {} slices in {} run(s), {} snapshots, {} blocks ({} unreferenced){}",
            report.name,
            repo.location(),
            report.slices,
            report.runs,
            report.snapshots,
            report.blocks,
            report.unreferenced_blocks,
            if deep {
                format!(", {} objects opened, {} oplog entries checked", report.objects_opened, report.entries_checked)
            } else {
                String::new()
            }
        );
        for w in &report.warnings {
            println!("WARNING {}: {}: {}", w.kind, w.object, w.message);
        }
        for f in &report.findings {
            println!("FINDING {}: {}: {}", f.kind, f.object, f.message);
        }
        println!("{}", if report.ok { "OK: no findings" } else { "FAILED" });
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `pitr drill --source mongo` options.
pub struct DrillArgs {
    /// TIME, ts:SECONDS:INC, latest, or random.
    pub to: String,
    /// A TOML checks file.
    pub checks: Option<std::path::PathBuf>,
    /// Where the markdown report goes (and the JSON beside it).
    pub report: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    pub json: bool,
    /// The report's test type.
    pub test_type: String,
    /// Read from this repository first (the result is stored through the primary).
    pub from: Option<String>,
}

/// `pitr drill --source mongo`: a drill into `[mongo] drill_target_uri`.
pub async fn drill(config_path: &Path, args: DrillArgs) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let checks = super::drill::load_checks(args.checks.as_deref())?;
    let target = if args.to.eq_ignore_ascii_case("random") { None } else { Some(parse_target(&args.to)?) };
    let repo = open::reader(&config, args.from.as_deref())?;
    let report = tasks::mongo_drill(&config, &repo, target, checks, &args.test_type).await?;
    output::drill_report(&report, args.report.as_deref(), args.json)?;
    Ok(if report.outcome.is_pass() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `pitr restore --source mongo --ns DB.COLL [--as DB.NEWCOLL]` options.
pub struct CollectionArgs {
    /// TIME, ts:SECONDS:INC or latest.
    pub to: String,
    /// `--ns DB.COLL`: the collection restored.
    pub ns: String,
    /// `--as DB.NEWCOLL`: the collection written (default `<coll>_at_<YYYYMMDDHHMMSS>`).
    pub as_name: Option<String>,
    /// The server written to.
    pub target: TargetArg,
    /// `--drop`: refused, a collection restore never drops anything.
    pub drop: bool,
    /// Print the report as JSON.
    pub json: bool,
    /// Read from this repository first.
    pub from: Option<String>,
}

/// `pitr restore --source mongo --ns DB.COLL`: one collection as it was at `--to`, written to a
/// new collection on a running server.
pub async fn restore_collection(config_path: &Path, args: CollectionArgs) -> Result<()> {
    use pitr_mongo::collection::{parse_ns, CollectionRestoreOptions};
    if args.drop {
        bail!(
            "--drop drops the target's databases for a whole restore; a collection restore (--ns) never drops or \
             overwrites anything: it writes a new collection (--as DB.NEWCOLL) and refuses one that exists"
        );
    }
    let ns = parse_ns("--ns", &args.ns)?;
    let restore_as = args.as_name.as_deref().map(|a| parse_ns("--as", a)).transpose()?;
    let target = parse_target(&args.to)?;
    let config = Config::load(config_path)?;
    let target_uri = target_uri(&config, args.target)?;
    let repo = open::reader(&config, args.from.as_deref())?;
    repo.check().await?;
    let catalog = open::mongo_catalog(&config, &repo).await?;
    let connect_timeout = config.mongo.as_ref().map(|m| m.connect_timeout()).unwrap_or(Duration::from_secs(10));
    let opts = CollectionRestoreOptions { target, ns, restore_as, target_uri, connect_timeout };
    let r = pitr_mongo::collection::restore_collection(&repo, &catalog, &opts).await?;
    if args.json {
        output::print_json(&r)?;
        return Ok(());
    }
    println!(
        "restored {} (mongo {}) as it was at {} into {} on {}",
        r.ns, r.name, r.target, r.restored_as, r.target_uri
    );
    println!(
        "  snapshot used:       {} ({} documents of {} in it, {} indexes built)",
        r.snapshot_id, r.snapshot_documents, r.ns, r.indexes_built
    );
    println!("  oplog applied:       {} entries ({} transactions)", r.entries_applied, r.transactions_applied);
    println!(
        "  last applied entry:  {} ({})",
        r.last_applied_ts.as_deref().unwrap_or("(none after the snapshot)"),
        r.last_applied_time.as_deref().unwrap_or("-")
    );
    println!("  documents:           {}", r.documents);
    println!("  took {:.1} s", r.seconds);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("latest").unwrap(), MongoTarget::Latest);
        assert_eq!(parse_target("ts:10:2").unwrap(), MongoTarget::Ts(pitr_mongo::Ts { secs: 10, inc: 2 }));
        assert!(parse_target("ts:10").unwrap_err().to_string().contains("ts:SECONDS:INC"));
        assert!(matches!(parse_target("2026-12-01T22:05:30.5Z").unwrap(), MongoTarget::Time(_)));
        assert!(parse_target("lsn:0/1").unwrap_err().to_string().contains("for MongoDB"));
    }

    #[test]
    fn restore_targets_with_passwords_stay_off_the_command_line() {
        const BASE: &str =
            "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n[mongo]\nuri = \"mongodb://h\"\n";
        let config = |extra: &str| Config::parse(&format!("{BASE}{extra}\n"), &[]).unwrap();
        let arg = |uri: Option<&str>, file: Option<&Path>| TargetArg {
            uri: uri.map(String::from),
            file: file.map(Path::to_path_buf),
        };
        let plain = config("");
        assert_eq!(target_uri(&plain, arg(Some("mongodb://t:1/"), None)).unwrap(), "mongodb://t:1/");
        for secret in ["mongodb://u:hunter2@t:1/", "mongodb://t:1/?tlsCertificateKeyFilePassword=hunter2"] {
            let err = target_uri(&plain, arg(Some(secret), None)).unwrap_err().to_string();
            assert!(err.contains("process list") && err.contains("--target-uri-file"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = target_uri(&plain, arg(None, None)).unwrap_err().to_string();
        assert!(err.contains("PITR_MONGO_TARGET_URI"), "{err}");
        // From the config (or its environment override), and from files.
        let with = config("target_uri = \"mongodb://u:pw@t:2/\"");
        assert_eq!(target_uri(&with, arg(None, None)).unwrap(), "mongodb://u:pw@t:2/");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("target");
        std::fs::write(&file, "# the scratch server\n\n  mongodb://u:pw@t:3/  \n").unwrap();
        assert_eq!(target_uri(&plain, arg(None, Some(&file))).unwrap(), "mongodb://u:pw@t:3/");
        let from_config = config(&format!("target_uri_file = {:?}", file.display().to_string()));
        assert_eq!(target_uri(&from_config, arg(None, None)).unwrap(), "mongodb://u:pw@t:3/");
        std::fs::write(&file, "t:3\n").unwrap();
        let err = target_uri(&plain, arg(None, Some(&file))).unwrap_err().to_string();
        assert!(err.contains("expected mongodb://"), "{err}");
    }
}
