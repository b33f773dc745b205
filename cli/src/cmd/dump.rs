//! `pitr dump` and `--source dump`: logical dumps of `[[dumps]]` sets, taken with the server's
//! own `pg_dump` and stored as blocks of the repository's shared files block store
//! ([`pitr_files::dump`]); restored into a database with `pg_restore` or written to a file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::running::RunKind;
use pitr_archive::time::format_rfc3339_seconds;
use pitr_archive::Repository;
use pitr_files::dump::{self, TakenDump};
use pitr_files::pgdump::PgTools;
use pitr_files::DumpManifest;
use pitr_pgwire::ConnInfo;

use crate::config::Config;
use crate::{open, output};

/// `pitr restore --source dump`.
pub struct RestoreArgs {
    /// The `[[dumps]]` set.
    pub set: String,
    /// TIME or `latest`.
    pub to: String,
    /// The database to load the dump into.
    pub into: Option<String>,
    /// The file to write the dump to.
    pub output: Option<PathBuf>,
    /// Print JSON.
    pub json: bool,
    /// Read from this repository first.
    pub from: Option<String>,
}

/// Where `pg_dump` and `pg_restore` come from: `[postgres] bin_dir` if set, else `PATH`.
fn tools(config: &Config) -> PgTools {
    PgTools::new(config.postgres.as_ref().and_then(|p| p.bin_dir.as_deref()))
}

/// What a dump did (one line for the log via Display).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DumpSummary {
    /// The set.
    pub set: String,
    /// The dump's id.
    pub id: String,
    /// The database dumped.
    pub database: String,
    /// The server's `server_version_num`.
    pub server_version_num: u32,
    /// When `pg_dump` started (RFC 3339).
    pub start_time: String,
    /// Bytes of the dump (what `pg_restore` reads).
    pub bytes: u64,
    /// SHA-256 of the dump.
    pub sha256: String,
    /// Blocks this dump put.
    pub new_blocks: u64,
    /// Blocks the repository already held.
    pub reused_blocks: u64,
    /// Bytes the new blocks take in the repository.
    pub stored_bytes: u64,
    /// How long it took.
    pub seconds: f64,
}

impl std::fmt::Display for DumpSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dump {} of set {} (database {}): {} bytes, {} new blocks ({} bytes stored), {} reused, {:.1} s",
            self.id,
            self.set,
            self.database,
            self.bytes,
            self.new_blocks,
            self.stored_bytes,
            self.reused_blocks,
            self.seconds
        )
    }
}

/// `pitr dump --set NAME`.
pub async fn dump(config_path: &Path, set: &str, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let summary = dump_set(&config, set).await?;
    if json {
        output::print_json(&summary)?;
    } else {
        println!("{summary}");
    }
    Ok(())
}

/// A dump of `set` (for `pitr dump` and the sidecar's scheduler); sets the set's metrics:
/// `backup_success` 1 or 0, and on success the time and size of its newest dump.
pub async fn dump_set(config: &Config, set: &str) -> Result<DumpSummary> {
    let cfg = config.dump_set(set)?;
    let labels = [("backup_type", "full".to_string()), ("source", "dump".to_string()), ("set", set.to_string())];
    let result = take(config, cfg).await.with_context(|| format!("dump of set {set} failed"));
    metrics::gauge!("backup_success", &labels).set(if result.is_ok() { 1.0 } else { 0.0 });
    let (taken, seconds) = result?;
    let m = &taken.manifest;
    metrics::gauge!("pitr_last_backup_timestamp_seconds", &labels).set(m.stop_time_us as f64 / 1e6);
    metrics::gauge!("backup_size_bytes", &labels).set(m.len as f64);
    Ok(DumpSummary {
        set: m.set.clone(),
        id: m.id.clone(),
        database: m.database.clone(),
        server_version_num: m.server_version_num,
        start_time: format_rfc3339_seconds(m.start_time_us),
        bytes: m.len,
        sha256: m.sha256.clone(),
        new_blocks: taken.new_blocks,
        reused_blocks: taken.reused_blocks,
        stored_bytes: m.stored_bytes,
        seconds,
    })
}

async fn take(config: &Config, cfg: &crate::config::DumpConfig) -> Result<(TakenDump, f64)> {
    let info = cfg.connection_info()?;
    let repo = open::writer(config)?;
    repo.check().await?;
    let t0 = Instant::now();
    let stale_after = config.retention.stale_backup_after;
    let taken = dump::take(&repo, &cfg.name, &tools(config), &info, stale_after).await?;
    Ok((taken, t0.elapsed().as_secs_f64()))
}

/// `--to` of a dump restore: `latest` (`None`) or a time.
fn parse_to(to: &str) -> Result<Option<i64>> {
    if to.eq_ignore_ascii_case("latest") {
        return Ok(None);
    }
    pitr_archive::time::parse_time(to).map(Some).ok_or_else(|| {
        anyhow!("--to {to:?}: expected a time (RFC 3339, or \"YYYY-MM-DD HH:MM:SS[.ffffff][+TZ]\") or latest")
    })
}

/// `--into`: a conninfo naming its database and carrying no password (the process list shows
/// pitr's command line to every user of the host).
fn parse_into(into: &str) -> Result<ConnInfo> {
    let info: ConnInfo = into.parse().map_err(|e| anyhow!("--into: {e}"))?;
    if info.password.is_some() {
        bail!(
            "--into {}: carries a password, which any user of this host can read in the process list; \
             put it in ~/.pgpass, $PGPASSFILE or $PGPASSWORD instead",
            info.redacted()
        );
    }
    if info.dbname.is_none() {
        bail!("--into {}: names no database: add dbname=... (the database must exist)", info.redacted());
    }
    Ok(info)
}

#[derive(serde::Serialize)]
struct RestoredDump {
    set: String,
    id: String,
    database: String,
    start_time: String,
    bytes: u64,
    sha256: String,
    /// The conninfo restored into (without a password), or the file written.
    into: Option<String>,
    output: Option<PathBuf>,
    seconds: f64,
}

/// `pitr restore --source dump --set NAME --to TIME|latest (--into CONNINFO | --output FILE)`.
pub async fn restore(config_path: &Path, args: RestoreArgs) -> Result<()> {
    let config = Config::load(config_path)?;
    let cfg = config.dump_set(&args.set)?;
    let target_us = parse_to(&args.to)?;
    let dest = match (&args.into, &args.output) {
        (Some(_), Some(_)) => bail!("--into and --output: give one (load into a database, or write a file)"),
        (None, None) => bail!(
            "restore --source dump needs --into CONNINFO (an existing database to load the dump into) \
             or --output FILE (a new file for pg_restore)"
        ),
        (Some(into), None) => Dest::Into(Box::new(parse_into(into)?)),
        (None, Some(path)) => {
            if path.symlink_metadata().is_ok() {
                bail!("--output {}: exists already; pitr does not overwrite it", path.display());
            }
            Dest::Output(path.clone())
        }
    };
    let repo = open::reader(&config, args.from.as_deref())?;
    repo.check().await?;
    // Announced before the dumps are listed, so that no `pitr expire` after this removes the
    // dump chosen or its blocks. On the primary, where expire runs (also with `--from`); a
    // primary that cannot take the marker does not stop the restore (a warning says what that
    // risks), as for PostgreSQL's restores.
    let marker = match open::single(&config, None) {
        Ok(primary) => pitr_restore::recover::announce(&primary, RunKind::Restore).await,
        Err(e) => {
            tracing::warn!(
                error = %format!("{e:#}"),
                "no running marker: a `pitr expire` meanwhile could remove the dump this restore reads"
            );
            None
        }
    };
    let t0 = Instant::now();
    let result = restore_chosen(&config, &repo, &cfg.name, target_us, dest).await;
    if let Some(marker) = marker {
        marker.release().await;
    }
    let (m, into, output) = result?;
    let r = RestoredDump {
        set: m.set.clone(),
        id: m.id.clone(),
        database: m.database.clone(),
        start_time: format_rfc3339_seconds(m.start_time_us),
        bytes: m.len,
        sha256: m.sha256.clone(),
        into,
        output,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if args.json {
        return output::print_json(&r);
    }
    let whither = match (&r.into, &r.output) {
        (Some(into), _) => format!("loaded into {into}"),
        (_, Some(path)) => format!("written to {} (sha256 {})", path.display(), r.sha256),
        _ => String::new(),
    };
    println!(
        "dump {} of set {} (database {}, started {}, {} bytes) {whither} in {:.1} s",
        r.id, r.set, r.database, r.start_time, r.bytes, r.seconds
    );
    Ok(())
}

/// Where a dump restore goes.
enum Dest {
    Into(Box<ConnInfo>),
    Output(PathBuf),
}

/// Chooses the dump of `set` for `target_us` and restores it to `dest` (under the caller's
/// marker): the dump, and where it went (the conninfo without a password, or the file).
async fn restore_chosen(
    config: &Config,
    repo: &Repository,
    set: &str,
    target_us: Option<i64>,
    dest: Dest,
) -> Result<(DumpManifest, Option<String>, Option<PathBuf>)> {
    let m = chosen(repo, set, target_us).await?;
    let (into, output) = match dest {
        Dest::Into(info) => {
            dump::restore_into(repo, &m, &tools(config), &info)
                .await
                .with_context(|| format!("restoring dump {} of set {} into {}", m.id, m.set, info.redacted()))?;
            (Some(info.redacted()), None)
        }
        Dest::Output(path) => {
            dump::write_file(repo, &m, &path)
                .await
                .with_context(|| format!("writing dump {} of set {} to {}", m.id, m.set, path.display()))?;
            (None, Some(path))
        }
    };
    Ok((m, into, output))
}

/// The dump of `set` a restore to `target_us` uses; manifests that do not open are passed over
/// with a warning.
async fn chosen(repo: &Repository, set: &str, target_us: Option<i64>) -> Result<DumpManifest> {
    let (dumps, damaged) = DumpManifest::list_sound(repo, Some(set))
        .await
        .with_context(|| format!("listing the dumps of set {set} in {}", repo.location()))?;
    for (name, why) in &damaged {
        tracing::warn!(object = %name, "passing over a dump manifest that does not open: {why}");
    }
    Ok(dump::choose(&dumps, set, target_us)?)
}

/// `pitr verify --source dump`: every dump of every set opens and has all its blocks; exit 1
/// on findings. Sets `pitr_files_missing_objects{source="dump", set}`.
pub async fn verify(config_path: &Path, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let repo = open::single(&config, None)?;
    repo.check().await?;
    let report = dump::verify(&repo, None).await.with_context(|| format!("verifying dumps in {}", repo.location()))?;
    for (set, missing) in &report.missing_blocks {
        metrics::gauge!("pitr_files_missing_objects", "source" => "dump", "set" => set.clone()).set(*missing as f64);
    }
    if json {
        output::print_json(&report)?;
    } else {
        println!("verified {} dumps in {}: {} blocks referenced", report.dumps, repo.location(), report.blocks);
        for f in &report.findings {
            println!("FINDING {}: {}", f.object, f.message);
        }
        println!("{}", if report.findings.is_empty() { "OK: no findings" } else { "FAILED" });
    }
    Ok(if report.findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The dumps part of `pitr list`, as JSON: every set configured or found in the repository,
/// with its dumps oldest first; `None` when there is none of either.
pub async fn list_json(config: &Config, repo: &Repository) -> Result<Option<serde_json::Value>> {
    let (dumps, damaged) = DumpManifest::list_sound(repo, None)
        .await
        .with_context(|| format!("listing the dumps in {}", repo.location()))?;
    let mut sets: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
        config.dumps.iter().map(|d| (d.name.clone(), Vec::new())).collect();
    for m in &dumps {
        sets.entry(m.set.clone()).or_default().push(serde_json::json!({
            "id": m.id, "database": m.database, "server_version_num": m.server_version_num,
            "start_time": format_rfc3339_seconds(m.start_time_us), "stop_time": format_rfc3339_seconds(m.stop_time_us),
            "bytes": m.len, "stored_bytes": m.stored_bytes, "sha256": m.sha256,
        }));
    }
    if sets.is_empty() && damaged.is_empty() {
        return Ok(None);
    }
    let sets: Vec<serde_json::Value> = sets
        .into_iter()
        .map(|(set, dumps)| {
            let cfg = config.dumps.iter().find(|d| d.name == set);
            serde_json::json!({
                "set": set,
                "configured": cfg.is_some(),
                "schedule": cfg.map(|c| c.schedule.clone()),
                "time_zone": cfg.map(|c| c.time_zone.clone()),
                "keep_days": cfg.map(|c| c.keep_days),
                "dumps": dumps,
            })
        })
        .collect();
    let damaged: Vec<_> = damaged.iter().map(|(o, why)| serde_json::json!({ "object": o, "why": why })).collect();
    Ok(Some(serde_json::json!({ "sets": sets, "damaged": damaged })))
}

/// Prints the dumps part of `pitr list` from [`list_json`]'s value.
pub fn print_list(v: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    println!("dumps:");
    for set in v["sets"].as_array().cloned().unwrap_or_default() {
        let how = if set["configured"].as_bool() == Some(true) {
            format!(
                "schedule {:?} ({}), kept {} days",
                s(&set["schedule"]),
                s(&set["time_zone"]),
                set["keep_days"].as_u64().unwrap_or_default()
            )
        } else {
            "not in the config".to_string()
        };
        println!("  set {} ({how})", s(&set["set"]));
        let dumps = set["dumps"].as_array().cloned().unwrap_or_default();
        if dumps.is_empty() {
            println!("    no dumps yet (run `pitr dump --set {}`)", s(&set["set"]));
        }
        for d in dumps {
            println!(
                "    {}  database {}  started {}  {} bytes ({} stored)",
                s(&d["id"]),
                s(&d["database"]),
                s(&d["start_time"]),
                d["bytes"],
                d["stored_bytes"]
            );
        }
    }
    for d in v["damaged"].as_array().cloned().unwrap_or_default() {
        println!("  DAMAGED {}: {}", s(&d["object"]), s(&d["why"]));
    }
}

/// What `expire` did to the dump sets.
#[derive(Debug, Default, serde::Serialize)]
pub struct DumpExpiry {
    /// Dumps removed (or, in a dry run, that would be).
    pub removed: Vec<ExpiredDump>,
    /// Dumps past their set's `keep_days` that the storage refused to delete (Object Lock,
    /// permissions): kept; the next run tries again.
    pub retained: Vec<RetainedDump>,
}

/// A dump the storage refused to delete.
#[derive(Debug, serde::Serialize)]
pub struct RetainedDump {
    /// The set.
    pub set: String,
    /// The dump's id.
    pub id: String,
    /// Its manifest, the object refused.
    pub object: String,
    /// The storage's answer.
    pub why: String,
}

/// One dump past its set's `keep_days`.
#[derive(Debug, serde::Serialize)]
pub struct ExpiredDump {
    /// The set.
    pub set: String,
    /// The dump's id.
    pub id: String,
    /// When it started (RFC 3339).
    pub start_time: String,
}

impl DumpExpiry {
    /// One line per dump.
    pub fn print(&self, dry_run: bool) {
        let verb = if dry_run { "would remove" } else { "removed" };
        for d in &self.removed {
            println!("{verb} dump {} of set {} (started {})", d.id, d.set, d.start_time);
        }
        for d in &self.retained {
            println!("RETAINED dump {} of set {} ({}): {}", d.id, d.set, d.object, d.why);
        }
    }
}

/// Applies every `[[dumps]]` set's `keep_days` (the newest dump of a set always stays). Run
/// before the files block sweep, which then removes the blocks only those dumps used.
pub async fn expire_sets(config: &Config, repo: &Repository, dry_run: bool) -> Result<DumpExpiry> {
    let now = pitr_archive::now_us();
    let mut out = DumpExpiry::default();
    for cfg in &config.dumps {
        let removed = dump::expire(repo, &cfg.name, cfg.keep_days, now, dry_run)
            .await
            .with_context(|| format!("expiring dumps of set {} in {}", cfg.name, repo.location()))?;
        out.removed.extend(removed.removed.into_iter().map(|m| ExpiredDump {
            start_time: format_rfc3339_seconds(m.start_time_us),
            set: m.set,
            id: m.id,
        }));
        out.retained.extend(removed.retained.into_iter().map(|(m, why)| RetainedDump {
            object: pitr_archive::names::files::dump_manifest(&m.set, &m.id),
            set: m.set,
            id: m.id,
            why,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn into_must_name_a_database_and_carry_no_password() {
        let err = parse_into("host=db dbname=copy password=hunter2").unwrap_err().to_string();
        assert!(err.contains("carries a password") && !err.contains("hunter2"), "{err}");
        assert!(parse_into("host=db user=u").unwrap_err().to_string().contains("names no database"));
        assert_eq!(parse_into("host=db dbname=copy").unwrap().dbname.as_deref(), Some("copy"));
    }

    #[test]
    fn to_is_latest_or_a_time() {
        assert_eq!(parse_to("latest").unwrap(), None);
        assert_eq!(parse_to("1970-01-01 00:00:01+00").unwrap(), Some(1_000_000));
        assert!(parse_to("yesterday").unwrap_err().to_string().contains("--to \"yesterday\""));
    }
}
