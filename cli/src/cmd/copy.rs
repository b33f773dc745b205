//! `pitr copy --to NAME`: bring a secondary up to date with the primary.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::{open, output};

/// `pitr copy --to NAME`: copies to a secondary every object of the primary it lacks (raw sealed
/// bytes: no key needed). Idempotent; never deletes or overwrites anything on the secondary.
pub async fn run(config_path: &Path, to: &str, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let Some(entry) = config.repository.secondary.iter().find(|s| s.name == to) else {
        let names: Vec<&str> = config.repository.secondary.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "--to {to}: no [[repository.secondary]] of that name (configured: {})",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        );
    };
    let primary = open::store(&config)?;
    let secondary = open::secondary_store(entry)?;
    let bar = output::progress_count_bar(!json, &format!("copy to {to}"));
    let on_progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let started = std::time::Instant::now();
    let result =
        pitr_archive::replicate::backfill(primary.as_ref(), secondary.as_ref(), config.backup.parallel(), &on_progress)
            .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = result.with_context(|| format!("copying {} to secondary {to}", primary.location()))?;
    let seconds = started.elapsed().as_secs_f64();
    for name in &summary.differing {
        eprintln!("pitr: warning: {name} differs in size between the primary and {to}; left as it is (`pitr verify --from {to} --deep` judges it)");
    }
    if json {
        let mut out = serde_json::to_value(&summary)?;
        out["name"] = to.into();
        out["seconds"] = seconds.into();
        output::print_json(&out)?;
        return Ok(());
    }
    println!(
        "copied {} objects ({} bytes) from {} to {to} ({}) in {seconds:.1} s: the primary holds {}, {to} held {} ({} missing{}{}){}",
        summary.copied_objects,
        summary.copied_bytes,
        summary.primary,
        summary.secondary,
        summary.primary_objects,
        summary.secondary_objects,
        summary.missing,
        if summary.vanished > 0 { format!(", {} deleted from the primary meanwhile", summary.vanished) } else { String::new() },
        if summary.extra > 0 { format!(", {} only on {to}, left alone", summary.extra) } else { String::new() },
        if summary.marker_copied { "; the repository marker was copied first" } else { "" }
    );
    Ok(())
}
