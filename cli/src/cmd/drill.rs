//! `pitr drill`: a restore drill of the PostgreSQL cluster (`--source mongo` is
//! [`super::mongo::drill`]), the key rotation and re-encryption drill around it
//! ([`key_rotation_drill`]), and the checks file both read.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::keys::{admin, record, MasterKey, MasterKeys};
use pitr_archive::{KeyRing, Repository};
use rand::RngCore;

use crate::config::Config;
use crate::{open, output, tasks};

/// `pitr drill` options for PostgreSQL.
pub struct DrillArgs {
    /// TIME, lsn:X/Y, xid:N, name:NAME, immediate, latest, or random.
    pub to: String,
    /// A TOML checks file.
    pub checks: Option<std::path::PathBuf>,
    /// Where the markdown report goes (and the JSON beside it).
    pub report: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    pub json: bool,
    /// Keep the scratch directory for inspection.
    pub keep: bool,
    /// Database user for the checks (default $USER).
    pub db_user: Option<String>,
    /// The report's test type.
    pub test_type: String,
    /// Read from this repository first (the result is stored through the primary).
    pub from: Option<String>,
    /// A key rotation and re-encryption drill ([`key_rotation_drill`]).
    pub key_rotation: bool,
}

/// Reads a drill checks file; every bad key or value is named.
pub fn load_checks(path: Option<&Path>) -> Result<pitr_drill::ChecksFile> {
    let Some(path) = path else { return Ok(Default::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("checks file {}", path.display()))?;
    let checks: pitr_drill::ChecksFile =
        toml::from_str(&text).map_err(|e| anyhow!("checks file {}: {}", path.display(), e.to_string().trim_end()))?;
    checks.validate().map_err(|e| anyhow!("checks file {}: {e}", path.display()))?;
    Ok(checks)
}

/// `pitr drill`: restores into a scratch server, checks it, measures RTO and RPO, stores the
/// result in the repository and reports it. Exits non-zero unless the drill passed.
pub async fn run(config_path: &Path, args: DrillArgs) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    if args.key_rotation && args.from.is_some() {
        bail!("--key-rotation rotates and rewraps keys in the primary repository and restores from it; it cannot be combined with --from");
    }
    let checks = load_checks(args.checks.as_deref())?;
    let target = if args.to.eq_ignore_ascii_case("random") {
        pitr_restore::drill::DrillTarget::Random
    } else {
        pitr_restore::drill::DrillTarget::At(pitr_restore::parse_target(&args.to)?)
    };
    let to_name = matches!(target, pitr_restore::drill::DrillTarget::At(pitr_restore::RecoveryTarget::Name(_)));
    let repo = open::reader(&config, args.from.as_deref())?;
    let mut catalog = open::checked_catalog(&config, &repo).await?;
    if to_name {
        catalog.load_restore_points(&repo).await;
    }
    let mut opts = tasks::drill_options(&config, config_path, &catalog)?;
    opts.restore_command = tasks::restore_command(config_path, args.from.as_deref())?;
    if args.from.is_some() {
        // As for `pitr restore --from`: the marker goes where `pitr expire` runs.
        opts.marker_repository = Some(open::single(&config, None)?);
    }
    opts.target = target;
    opts.checks = checks;
    opts.keep = args.keep;
    opts.test_type = args.test_type;
    if let Some(user) = args.db_user {
        opts.db_user = user;
    }
    let report = if args.key_rotation {
        key_rotation_drill(config_path, &open::writer(&config)?, opts, config.system_id()).await?
    } else {
        pitr_restore::drill::drill(&repo, &catalog, &opts).await?
    };
    let stored = match open::writer(&config) {
        Ok(writer) => {
            let subject = pitr_drill::Subject::Postgres { system_id: catalog.cluster.system_id };
            pitr_drill::store_result(&writer, &subject, &report).await.map_err(anyhow::Error::from)
        }
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        tracing::warn!(error = %format!("{e:#}"), "could not store the drill result in the repository");
    }
    output::drill_report(&report, args.report.as_deref(), args.json)?;
    Ok(if report.outcome.is_pass() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Whether `id` has the form of a drill-only master key's id, `drill-<16 hex digits>`.
fn is_drill_key_id(id: &str) -> bool {
    id.strip_prefix("drill-").is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The key rotation and re-encryption drill: the monthly proof that keys can be rotated and the
/// archive re-protected and still restored.
///
/// 1. Rotates: a new repository key through `writer` (so its record is copied to secondaries),
///    as `[schedule] key_rotation` would.
/// 2. Makes a master key for this drill alone, held in memory (`drill-<hex>`), and wraps every
///    repository key under it (`keys/wraps/<rk>/drill-<hex>`), as `pitr keys rewrap` would.
/// 3. Runs the drill's restore with a key ring holding only that master key, so it proves that the
///    archive restores with the rewrapped keys alone. The restored server's `pitr wal-fetch` runs
///    in another process: it gets a copy of the config whose `[encryption]` is only a key file
///    holding the drill key (0600, in a private temporary directory removed afterwards).
/// 4. Deletes the drill's wraps, also when the restore failed. Without them the drill key opens
///    nothing, and it is forgotten with the process.
///
/// The running marker and the stored result go through `writer`, with the configured keys.
pub async fn key_rotation_drill(
    config_path: &Path,
    writer: &Repository,
    mut opts: pitr_restore::drill::DrillOptions,
    system_id: Option<u64>,
) -> Result<pitr_drill::DrillReport> {
    let (ring, store) = (writer.keys(), writer.store());
    // Wraps an earlier drill left (killed before its clean-up) go first: with the drill key file
    // a killed drill may have left in its temporary directory, they would open the repository.
    for (rk, wrapped_by) in
        ring.list_wraps(store.as_ref()).await.context("key rotation drill: listing the repository keys")?
    {
        // Never a configured key's wrap, nor a key's only wrap: a drill's wraps are extra ones
        // under a key no source holds.
        let masters = ring.masters();
        let stale: Vec<&String> =
            wrapped_by.iter().filter(|m| is_drill_key_id(m) && masters.get(m).is_none()).collect();
        if stale.len() == wrapped_by.len() {
            continue;
        }
        for mk in stale {
            let name = record::wrap_name(&rk, mk);
            match store.delete(&name).await {
                Ok(()) => tracing::warn!(record = %name, "key rotation drill: removed a wrap an earlier drill left"),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    return Err(anyhow::anyhow!("key rotation drill: removing {name}, left by an earlier drill: {e}"))
                }
            }
        }
    }
    let rotated = ring
        .rotate(store.as_ref())
        .await
        .with_context(|| format!("key rotation drill: making a new repository key in {}", writer.location()))?;
    tracing::info!(repository_key = %rotated.id, master_key = %rotated.master_key, "key rotation drill: rotated the repository key");

    let mut material = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut material);
    let mut id_bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id_bytes);
    let drill_id = format!("drill-{}", hex::encode(id_bytes));
    let drill_master = MasterKey::in_memory(&drill_id, material);
    let scratch = tempfile::Builder::new()
        .prefix("pitr-key-drill-")
        .tempdir()
        .context("key rotation drill: making a private temporary directory")?;
    let key_file = scratch.path().join("drill.key");
    let drill_config = scratch.path().join("pitr.toml");
    write_key_file(&key_file, &drill_id, &material)?;
    write_drill_config(config_path, &key_file, &drill_config)?;

    let mut info = pitr_drill::KeyRotationDrill {
        new_repository_key: rotated.id.clone(),
        drill_master_key: drill_id.clone(),
        ..Default::default()
    };
    let mut attempted: Vec<String> = Vec::new();
    let outcome = async {
        let wraps = ring.list_wraps(store.as_ref()).await.context("key rotation drill: listing the repository keys")?;
        for (rk, wrapped_by) in &wraps {
            attempted.push(rk.clone());
            match admin::add_wrap(ring, store.as_ref(), rk, wrapped_by, &drill_master).await {
                Ok(()) => info.rewrapped_keys += 1,
                Err(e) => info.problems.push(format!("repository key {rk} could not be wrapped under {drill_id}: {e}")),
            }
        }
        tracing::info!(master_key = %drill_id, rewrapped = info.rewrapped_keys, "key rotation drill: repository keys wrapped under the drill-only master key; restoring with it alone");
        let drill_ring = KeyRing::with_masters(MasterKeys::single(drill_master.clone()), Duration::from_secs(300));
        let repo = Repository::new(store.clone(), drill_ring);
        repo.check().await.context("key rotation drill: opening the repository with the drill-only master key")?;
        let mut catalog = open::catalog(&repo, system_id).await?;
        if matches!(opts.target, pitr_restore::drill::DrillTarget::At(pitr_restore::RecoveryTarget::Name(_))) {
            catalog.load_restore_points(&repo).await;
        }
        opts.restore_command = tasks::restore_command(&drill_config, None)?;
        opts.marker_repository = Some(writer.clone());
        Ok::<_, anyhow::Error>(pitr_restore::drill::drill(&repo, &catalog, &opts).await?)
    }
    .await;

    // The wraps go whatever happened: a failed restore must not leave them.
    for rk in &attempted {
        let name = record::wrap_name(rk, &drill_id);
        match store.delete(&name).await {
            Ok(()) => info.wraps_removed += 1,
            Err(e) if e.is_not_found() => {}
            Err(e) => info.problems.push(format!("drill wrap {name} could not be deleted (the drill key is forgotten, so it opens nothing; delete it by hand): {e}")),
        }
    }
    drop(scratch);
    for p in &info.problems {
        tracing::warn!(master_key = %drill_id, "key rotation drill: {p}");
    }
    let mut report = outcome.with_context(|| {
        format!(
            "key rotation drill (new repository key {}; {} repository keys were wrapped under {drill_id}, {} of those wraps removed)",
            info.new_repository_key, info.rewrapped_keys, info.wraps_removed
        )
    })?;
    info.restored_with_drill_key_alone = report.restore.is_some();
    report.scenario = format!("{}: {}", pitr_drill::KEY_ROTATION_SCENARIO, report.scenario);
    report.issues.extend(info.problems.iter().map(|p| format!("key rotation drill: {p}")));
    report.key_rotation = Some(info);
    Ok(report)
}

/// The drill key in the key file format, readable by this user alone.
fn write_key_file(path: &Path, id: &str, material: &[u8; 32]) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("key rotation drill: creating {}", path.display()))?;
    file.write_all(format!("pitr-key-v1 {id} {}\n", hex::encode(material)).as_bytes())
        .with_context(|| format!("key rotation drill: writing {}", path.display()))
}

/// A copy of the config at `config_path` whose only key source is `key_file`.
fn write_drill_config(config_path: &Path, key_file: &Path, out: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(config_path).with_context(|| format!("config file {}", config_path.display()))?;
    let mut table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| anyhow!("config file {}: {}", config_path.display(), e.message()))?;
    let mut encryption = toml::Table::new();
    encryption.insert("key_file".into(), toml::Value::String(key_file.display().to_string()));
    table.insert("encryption".into(), toml::Value::Table(encryption));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("key rotation drill: creating {}", out.display()))?;
    file.write_all(table.to_string().as_bytes())
        .with_context(|| format!("key rotation drill: writing {}", out.display()))?;
    Config::load(out).context("key rotation drill: the drill's copy of the config")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_drill_shaped_ids_count_as_drill_keys() {
        assert!(is_drill_key_id("drill-0123456789abcdef"));
        for id in ["drill-prod", "drill-0123456789abcdeg", "k0123", "drill-0123456789abcdef0"] {
            assert!(!is_drill_key_id(id), "{id}");
        }
    }

    #[test]
    fn the_drill_config_has_the_drill_key_as_its_only_key_source() {
        let dir = tempfile::tempdir().unwrap();
        let original = dir.path().join("pitr.toml");
        std::fs::write(
            &original,
            "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\nkms_key_id = \"alias/pitr\"\nkey_cache_ttl = \"2s\"\n\
             [postgres]\nconninfo = \"host=/tmp\"\n[targets]\nrto_seconds = 60.0\n",
        )
        .unwrap();
        let key_file = dir.path().join("drill.key");
        write_key_file(&key_file, "drill-00", &[7; 32]).unwrap();
        let copy = dir.path().join("drill.toml");
        write_drill_config(&original, &key_file, &copy).unwrap();
        let c = Config::load(&copy).unwrap();
        assert_eq!(c.encryption.key_file.as_deref(), Some(key_file.as_path()));
        assert!(c.encryption.kms_key_id.is_none() && c.encryption.key_cache_ttl.is_none());
        assert_eq!((c.targets.rto_seconds, c.repository_path()), (60.0, Path::new("/r")));
        let keys = pitr_archive::KeySources::key_file(&key_file).load().unwrap();
        assert_eq!(keys.all().len(), 1);
        assert_eq!(keys.active().id, "drill-00");
        use std::os::unix::fs::PermissionsExt;
        for f in [&key_file, &copy] {
            assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600);
        }
        // Never over an existing file.
        assert!(write_key_file(&key_file, "drill-00", &[7; 32]).is_err());
    }
}
