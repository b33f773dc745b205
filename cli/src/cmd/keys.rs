//! `pitr keys list | rotate | rewrap | retire | journal-init`: the operator's side of the key hierarchy (master
//! keys in their sources, repository keys wrapped by them in `keys/wraps/`). These commands write
//! only key records and the key file, never objects, so they run beside a running sidecar, which
//! picks the change up within `[encryption] key_cache_ttl`.

use std::path::Path;

use anyhow::{Context, Result};
use pitr_archive::keys::admin::{self, KeyListing};
use pitr_archive::keys::master;
use pitr_archive::keys::MasterSource;
use pitr_archive::Repository;

use crate::config::Config;
use crate::{open, output};

/// The primary (writes and deletes copied to the secondaries), after checking it is a pitr
/// repository: key records written into an uninitialised location would only mislead.
async fn writer(config: &Config) -> Result<Repository> {
    let repo = open::writer(config)?;
    repo.check().await.with_context(|| format!("repository {}", repo.location()))?;
    Ok(repo)
}

/// `pitr keys list`: every master key and repository key, and (unless `no_count`) how many
/// objects need each, from a scan of every object's first bytes.
pub async fn list(config_path: &Path, json: bool, no_count: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open::single(&config, None)?;
    repo.check().await.with_context(|| format!("repository {}", repo.location()))?;
    let listing = admin::list(repo.keys(), repo.store().as_ref(), !no_count)
        .await
        .with_context(|| format!("listing the keys of {}", repo.location()))?;
    if json {
        return output::print_json(&listing);
    }
    print_listing(&repo, &listing);
    Ok(())
}

fn count(n: Option<u64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "-".into())
}

fn print_listing(repo: &Repository, listing: &KeyListing) {
    println!("keys of {}", repo.location());
    println!("master keys:");
    println!(
        "  {:<20} {:<14} {:<20} {:<6} {:<20} {:<24} OBJECTS NEEDING IT",
        "ID", "SOURCE", "CREATED", "ACTIVE", "RETIRED", "WRAPS"
    );
    for k in &listing.master_keys {
        println!(
            "  {:<20} {:<14} {:<20} {:<6} {:<20} {:<24} {}",
            k.id,
            k.source,
            k.created.as_deref().unwrap_or("-"),
            if k.active { "yes" } else { "no" },
            k.retired.as_deref().unwrap_or("-"),
            if k.wraps.is_empty() { "-".to_string() } else { k.wraps.join(",") },
            count(k.objects_needing_it)
        );
    }
    for k in &listing.master_keys {
        println!("  {}: {}", k.id, k.location);
    }
    println!("repository keys:");
    println!("  {:<12} {:<20} {:<6} {:<32} OBJECTS", "ID", "CREATED", "ACTIVE", "WRAPPED BY");
    for k in &listing.repository_keys {
        println!(
            "  {:<12} {:<20} {:<6} {:<32} {}",
            k.id,
            k.created.as_deref().unwrap_or("-"),
            if k.active { "yes" } else { "no" },
            k.wrapped_by.join(","),
            count(k.objects)
        );
    }
    for (id, n) in &listing.objects_with_unknown_keys {
        println!(
            "WARNING: {n} objects name key {id}, which is neither a repository key nor a configured master key: \
             run `pitr verify --deep` to see which"
        );
    }
}

/// What `keys rotate` did, for `--json`.
#[derive(Debug, serde::Serialize)]
struct RotateReport {
    /// The master key appended to the key file, if one was.
    new_master_key: Option<String>,
    /// The master key wrapping the new repository key.
    master_key: String,
    /// Where that master key lives.
    master_source: String,
    /// The new repository key, which seals new objects from now on.
    repository_key: String,
    /// When it was made (RFC 3339).
    created: String,
    /// What the operator still has to do.
    next_steps: Vec<String>,
}

/// `pitr keys rotate`: a new master key in the key file (when the active one lives there), then a
/// new repository key wrapped by the active master key.
pub async fn rotate(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = writer(&config).await?;
    let ring = repo.keys();
    let active = ring.masters().active().clone();
    let mut new_master_key = None;
    let mut next_steps = Vec::new();
    match (&active.source, &config.encryption.active_key) {
        (MasterSource::KeyFile(path), None) => {
            let key = master::append_to_key_file(path)
                .with_context(|| format!("adding a new master key to key file {}", path.display()))?;
            ring.invalidate();
            // The sources as the ring reads them next, before a repository key is made under them.
            let now_active = config.encryption.key_sources().load().context("[encryption]")?.active().id.clone();
            anyhow::ensure!(
                now_active == key.id,
                "added master key {} to key file {}, but the active master key is {now_active}: \
                 check [encryption] (another source takes precedence over key_file)",
                key.id,
                path.display()
            );
            next_steps.push(format!(
                "copy key file {} (with the new master key {}) to where you escrow it",
                path.display(),
                key.id
            ));
            new_master_key = Some(key.id);
        }
        (MasterSource::KeyFile(_), Some(pinned)) => next_steps.push(format!(
            "[encryption] active_key pins master key {pinned}: to rotate the master key, add a key to a source \
             and set active_key to it, then run `pitr keys rewrap` and `pitr keys retire {pinned}`"
        )),
        (MasterSource::Kms { key_id, .. }, _) => next_steps.push(format!(
            "master key {} is KMS key {key_id}: KMS rotates its backing key itself (enable automatic rotation)",
            active.id
        )),
        (source, _) => next_steps.push(format!(
            "master key {} lives in {source}: rotate it there (add a new key line, which becomes active as the \
             last one, or set active_key), then run `pitr keys rewrap` and `pitr keys retire {}`",
            active.id, active.id
        )),
    }
    let rotated = ring.rotate(repo.store().as_ref()).await.context("making a new repository key")?;
    let master_source =
        ring.masters().get(&rotated.master_key).map(|k| k.source.to_string()).unwrap_or_else(|| "?".into());
    if new_master_key.is_some() {
        next_steps.push(format!(
            "run `pitr keys rewrap` to move the repository keys onto master key {}, then `pitr keys retire` \
             the old master key",
            rotated.master_key
        ));
    }
    next_steps
        .push("a running sidecar seals with the new repository key within [encryption] key_cache_ttl".to_string());
    let report = RotateReport {
        new_master_key,
        master_key: rotated.master_key.clone(),
        master_source,
        repository_key: rotated.id.clone(),
        created: pitr_archive::time::format_rfc3339_seconds(rotated.created_us),
        next_steps,
    };
    if json {
        return output::print_json(&report);
    }
    if let Some(id) = &report.new_master_key {
        println!("added master key {id} to the key file; it is now the active master key");
    }
    println!(
        "made repository key {} wrapped by master key {} ({}); it seals new objects from now on",
        report.repository_key, report.master_key, report.master_source
    );
    for step in &report.next_steps {
        println!("next: {step}");
    }
    Ok(())
}

/// `pitr keys rewrap [--from KEYID]`: every repository key wrapped by KEYID (default: by any
/// master key but the active one) wrapped by the active master key instead.
pub async fn rewrap(config_path: &Path, from: Option<&str>, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = writer(&config).await?;
    let report = admin::rewrap(repo.keys(), repo.store().as_ref(), from).await.with_context(|| {
        format!(
            "rewrapping repository keys{} in {}",
            from.map(|f| format!(" from {f}")).unwrap_or_default(),
            repo.location()
        )
    })?;
    if json {
        return output::print_json(&report);
    }
    for id in &report.adopted {
        println!("adopted master key {id} as repository key {id} (objects written before repository keys name it)");
    }
    println!(
        "rewrapped {} repository keys onto master key {}{}; removed {} old wrap records",
        report.rewrapped.len(),
        report.to,
        if report.rewrapped.is_empty() { String::new() } else { format!(" ({})", report.rewrapped.join(", ")) },
        report.removed.len()
    );
    match from {
        Some(f) => println!("next: `pitr keys retire {f}` once `pitr keys list` shows nothing needing it"),
        None => {
            println!("next: `pitr keys retire KEYID` for each old master key `pitr keys list` shows needing nothing")
        }
    }
    Ok(())
}

/// `pitr keys retire KEYID`: refused while anything needs the key; then recorded retired and
/// removed from the key file.
pub async fn retire(config_path: &Path, id: &str, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = writer(&config).await?;
    let report = admin::retire(repo.keys(), repo.store().as_ref(), id)
        .await
        .with_context(|| format!("retiring key {id} of {}", repo.location()))?;
    if json {
        return output::print_json(&report);
    }
    println!(
        "retired master key {}{}: it is never used again, and objects naming it are reported by `pitr verify`",
        report.id,
        report.source.as_deref().map(|s| format!(" ({s})")).unwrap_or_default()
    );
    if report.removed_from_key_file {
        println!("removed its line from the key file");
    }
    for step in &report.next_steps {
        println!("next: {step}");
    }
    Ok(())
}

/// `pitr keys journal-init`: creates `[journal] signing_key_file` if missing (0600, fsynced) and
/// prints the public key to set as `[journal] public_key` where verify runs.
pub fn journal_init(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let section = config.journal.as_ref().context("pitr keys journal-init: the config has no [journal] section")?;
    let path = section.signing_key_file.as_ref().context("[journal] signing_key_file is not set")?;
    let (signer, created) = ensure_journal_key(path)?;
    let public = pitr_archive::journal::public_key_text(&signer.verifying_key());
    if json {
        output::print_json(&serde_json::json!({
            "signing_key_file": path, "created": created, "key_id": signer.key_id(), "public_key": public,
        }))?;
    } else {
        println!(
            "{} journal signing key {} (key id {})\npublic_key = \"{public}\"\nset it as [journal] public_key on the hosts that verify; keep the key file off the repository's storage",
            if created { "created" } else { "existing" },
            path.display(),
            signer.key_id()
        );
    }
    Ok(())
}

/// The journal signing key at `path`, created if missing; whether it was created.
pub fn ensure_journal_key(path: &Path) -> Result<(pitr_archive::journal::JournalSigner, bool)> {
    use pitr_archive::journal::JournalSigner;
    if path.exists() {
        return Ok((JournalSigner::load(path).context("[journal] signing_key_file")?, false));
    }
    Ok((JournalSigner::create_file(path).context("[journal] signing_key_file: creating it")?, true))
}
