//! `pitr status`: received, durable and primary LSN, lag, the newest archived commit, the
//! sidecar's live view (its status file) and each secondary's state.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use pitr_archive::names::MARKER;
use pitr_archive::repository::RECORD_READ_MAX;
use pitr_archive::time::format_rfc3339_micros;
use pitr_archive::{Repository, WalCatalog, WalLayout};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgwire::ConnInfo;

use crate::config::Config;
use crate::{open, output, sidecar};

#[derive(serde::Serialize)]
struct StatusReport {
    repository: String,
    /// Why the repository could not be read (storage down, wrong key…); the rest is still shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    repository_error: Option<String>,
    system_id: Option<u64>,
    timeline: Option<u32>,
    archived_lsn: Option<String>,
    newest_archived_commit: Option<String>,
    primary_lsn: Option<String>,
    primary_error: Option<String>,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
    sidecar: Option<SidecarReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    secondaries: Vec<SecondaryReport>,
    /// Backups pinned now (`pitr pin`), oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pinned_backups: Vec<PinnedBackup>,
    /// Why the pins could not be read (`pinned_backups` is then empty, the rest stands).
    #[serde(skip_serializing_if = "Option::is_none")]
    pins_error: Option<String>,
    /// The predicted RTO and its inputs (`pitr_drill::rto`); `null` with `predicted_rto_note`
    /// saying why (no drill yet, or it could not be computed).
    predicted_rto: Option<pitr_drill::rto::Prediction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    predicted_rto_note: Option<String>,
    /// `[targets] rto_seconds`, for comparison.
    rto_target_seconds: f64,
}

/// The predicted RTO of a restore now, or why there is none: an aside of `status` and `list`,
/// never their error.
pub async fn predicted_rto(
    repo: &Repository,
    catalog: &pitr_restore::Catalog,
) -> (Option<pitr_drill::rto::Prediction>, Option<String>) {
    use crate::tasks::RtoPrediction;
    match crate::tasks::predicted_rto(repo, catalog).await {
        Ok(RtoPrediction::Predicted(p)) => (Some(p), None),
        Ok(RtoPrediction::NoDrill) => (None, Some("no drill yet".into())),
        Ok(RtoPrediction::NotRestorable(why)) => (None, Some(format!("nothing to predict: {why}"))),
        Err(e) => (None, Some(format!("cannot be computed: {e:#}"))),
    }
}

/// One line on the predicted RTO against the target.
pub fn predicted_rto_line(p: Option<&pitr_drill::rto::Prediction>, note: Option<&str>, target: f64) -> String {
    match p {
        Some(p) => format!(
            "{:.1} s (target {target:.0} s{}): backup {} ({} in chain, {} bytes) + {} bytes of WAL, learnt from {} drill(s)/restore(s)",
            p.seconds,
            if p.seconds > target { ", OVER" } else { "" },
            p.backup_id,
            p.chain_length,
            p.chain_bytes,
            p.wal_bytes,
            p.model.samples
        ),
        None => note.unwrap_or("no drill yet").to_string(),
    }
}

#[derive(serde::Serialize)]
struct PinnedBackup {
    id: String,
    #[serde(flatten)]
    pin: super::pin::ShownPin,
}

/// The backups of `system_id` pinned now (records of backups no longer listed left out).
async fn pinned_backups(repo: &Repository, system_id: u64) -> Result<Vec<PinnedBackup>> {
    let pins = pitr_archive::pins::PinSet::load(repo, system_id).await?;
    let now = pitr_archive::now_us();
    let listed = repo.list(&pitr_archive::names::pg::backups_prefix(system_id)).await?;
    Ok(pins
        .active(now)
        .into_keys()
        .filter(|id| listed.iter().any(|o| o.name == pitr_archive::names::pg::backup_manifest(system_id, id)))
        .map(|id| PinnedBackup { pin: super::pin::ShownPin::of(pins.of(&id), now), id })
        .collect())
}

#[derive(serde::Serialize)]
struct SecondaryReport {
    name: String,
    location: String,
    required: bool,
    /// `same repository`, `not initialised`, `a different repository` or `unreachable: …`.
    check: String,
    /// The sidecar's copy state, when it runs here.
    copy: Option<pitr_archive::replicate::SecondaryStatus>,
}

/// Each secondary: whether it holds this repository (its marker), and the sidecar's copy state.
async fn secondary_reports(
    config: &Config,
    primary: &Repository,
    mut copy_states: Vec<pitr_archive::replicate::SecondaryStatus>,
) -> Result<Vec<SecondaryReport>> {
    let mut out = Vec::new();
    if config.repository.secondary.is_empty() {
        return Ok(out);
    }
    let marker = primary
        .store()
        .get_limited(MARKER, RECORD_READ_MAX)
        .await
        .context("reading the primary's repository marker")?;
    for s in &config.repository.secondary {
        let store = open::secondary_store(s)?;
        let check =
            match tokio::time::timeout(Duration::from_secs(10), store.get_limited(MARKER, RECORD_READ_MAX)).await {
                Ok(Ok(theirs)) if theirs == marker => "same repository".to_string(),
                Ok(Ok(_)) => "a different repository (its marker differs): nothing is copied to it".to_string(),
                Ok(Err(e)) if e.is_not_found() => "not initialised (run `pitr init`)".to_string(),
                Ok(Err(e)) => format!("unreachable: {e}"),
                Err(_) => "unreachable: no answer within 10 s".to_string(),
            };
        let copy = copy_states.iter().position(|c| c.name == s.name).map(|i| copy_states.swap_remove(i));
        out.push(SecondaryReport {
            name: s.name.clone(),
            location: store.location(),
            required: s.required,
            check,
            copy,
        });
    }
    Ok(out)
}

#[derive(serde::Serialize)]
struct SidecarReport {
    connected: bool,
    host: Option<String>,
    received_lsn: String,
    durable_lsn: String,
    lag_bytes: u64,
    lag_seconds: f64,
    objects_archived: u64,
    bytes_archived: u64,
    upload_errors: u64,
    last_error: Option<String>,
    /// The sidecar's newest completeness mark: the archive held all the primary's WAL then.
    complete_up_to: Option<String>,
    /// The spacing between WAL chunk puts in force (`[stream] flush_interval`).
    flush_interval_seconds: f64,
    /// Under `flush_interval = "auto"`: whether the primary's `synchronous_standby_names` names
    /// the sidecar (`null`: not read, or a fixed `flush_interval`).
    synchronous_standby: Option<bool>,
    updated: String,
}

/// How the sidecar puts WAL, for people: the spacing and why.
fn put_spacing(s: &SidecarReport) -> String {
    let secs = s.flush_interval_seconds;
    let spacing = if secs <= 0.0 {
        "back to back".to_string()
    } else if secs < 1.0 {
        format!("{} ms apart", (secs * 1000.0 * 10.0).round() / 10.0)
    } else {
        format!("{secs} s apart")
    };
    let why = match s.synchronous_standby {
        Some(true) => "synchronous_standby_names names this sidecar: the primary's commits wait for the archive",
        Some(false) => "synchronous_standby_names does not name this sidecar",
        None if secs <= 0.0 => "flush_interval, or synchronous_standby_names not read",
        None => "flush_interval",
    };
    format!("{spacing} ({why})")
}

/// `pitr status`: the archive's end, the primary's position, the sidecar's view and each
/// secondary. A repository that cannot be read is reported with the rest, then is the error.
pub async fn run(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open::single(&config, None)?;
    // During a storage outage the sidecar's view and the primary's position still matter most:
    // they are shown, and the repository's error is the command's error at the end.
    let from_repository = async {
        let cluster = open::checked_cluster(&config, &repo).await?;
        let catalog = WalCatalog::build(&repo, WalLayout::new(&cluster)).await?;
        let timeline = catalog.latest_timeline();
        let archived = timeline.and_then(|t| catalog.end_lsn(t));
        let newest_commit = match timeline {
            Some(t) => pitr_restore::plan::newest_commit_us(&repo, &catalog, t).await?,
            None => None,
        };
        // Pins are an aside here: a failure to read them is shown, not the command's error.
        let pinned = pinned_backups(&repo, cluster.system_id).await.map_err(|e| format!("{e:#}"));
        // The predicted RTO is an aside too.
        let rto = match pitr_restore::Catalog::load(&repo, cluster.clone()).await {
            Ok(full) => predicted_rto(&repo, &full).await,
            Err(e) => (None, Some(format!("cannot be computed: {e}"))),
        };
        anyhow::Ok((cluster.system_id, timeline, archived, newest_commit, pinned, rto))
    };
    let (mut repository_error, system_id, timeline, archived, newest_commit, pinned_backups, rto) =
        match from_repository.await {
            Ok((id, t, a, c, p, r)) => (None, Some(id), t, a, c, p, r),
            Err(e) => (Some(e), None, None, None, None, Ok(Vec::new()), (None, Some("repository not read".into()))),
        };
    let (pinned_backups, pins_error) = match pinned_backups {
        Ok(p) => (p, None),
        Err(e) => (Vec::new(), Some(format!("reading the pins: {e}"))),
    };

    let (primary_lsn, primary_error) = match &config.postgres {
        Some(pg) => match primary_position(pg).await {
            Ok(lsn) => (Some(lsn), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        None => (None, Some("no [postgres] section".into())),
    };

    let status_file = std::fs::read(config.status_file())
        .ok()
        .and_then(|b| serde_json::from_slice::<sidecar::StatusFile>(&b).ok())
        .filter(|s| pitr_archive::now_us() - s.stream.updated_at_us < 60_000_000);
    let copy_states = status_file.as_ref().map(|f| f.secondaries.clone()).unwrap_or_default();
    let secondaries = match secondary_reports(&config, &repo, copy_states).await {
        Ok(s) => s,
        Err(e) => {
            repository_error.get_or_insert(e);
            Vec::new()
        }
    };
    let sidecar = status_file.map(|f| f.stream).map(|s| SidecarReport {
        connected: s.connected,
        host: s.host,
        received_lsn: format_lsn(s.received_lsn),
        durable_lsn: format_lsn(s.durable_lsn),
        lag_bytes: s.lag_bytes,
        lag_seconds: s.lag_seconds,
        objects_archived: s.objects_archived,
        bytes_archived: s.bytes_archived,
        upload_errors: s.upload_errors,
        last_error: s.last_error,
        complete_up_to: s.complete_up_to_us.map(format_rfc3339_micros),
        flush_interval_seconds: s.flush_interval_seconds,
        synchronous_standby: s.synchronous_standby,
        updated: format_rfc3339_micros(s.updated_at_us),
    });

    let report = StatusReport {
        repository: repo.location(),
        repository_error: repository_error.as_ref().map(|e| format!("{e:#}")),
        system_id,
        timeline,
        archived_lsn: archived.map(format_lsn),
        newest_archived_commit: newest_commit.map(format_rfc3339_micros),
        primary_lsn: primary_lsn.map(format_lsn),
        primary_error,
        lag_bytes: match (primary_lsn, archived) {
            (Some(p), Some(a)) => Some(p.saturating_sub(a)),
            _ => None,
        },
        lag_seconds: sidecar.as_ref().map(|s| s.lag_seconds),
        sidecar,
        secondaries,
        pinned_backups,
        pins_error,
        predicted_rto: rto.0,
        predicted_rto_note: rto.1,
        rto_target_seconds: config.targets.rto_seconds,
    };
    if json {
        output::print_json(&report)?;
        return repository_error.map_or(Ok(()), Err);
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("repository:             {}", report.repository);
    if let Some(e) = &report.repository_error {
        println!("repository error:       {e}");
    }
    println!("system identifier:      {}", report.system_id.map(|i| i.to_string()).unwrap_or_else(|| "-".into()));
    println!("timeline:               {}", report.timeline.map(|t| t.to_string()).unwrap_or_else(|| "-".into()));
    println!("archived (durable) LSN: {}", or_dash(&report.archived_lsn));
    println!("newest archived commit: {}", or_dash(&report.newest_archived_commit));
    if let Some(c) = report.sidecar.as_ref().and_then(|s| s.complete_up_to.as_ref()) {
        println!("known complete up to:   {c}");
    }
    match (&report.primary_lsn, &report.primary_error) {
        (Some(lsn), _) => println!("primary LSN:            {lsn}"),
        (None, Some(e)) => println!("primary LSN:            unknown ({e})"),
        _ => {}
    }
    if let Some(b) = report.lag_bytes {
        println!("lag:                    {b} bytes");
    }
    println!(
        "predicted RTO:          {}",
        predicted_rto_line(
            report.predicted_rto.as_ref(),
            report.predicted_rto_note.as_deref(),
            report.rto_target_seconds
        )
    );
    match &report.sidecar {
        Some(s) => {
            println!(
                "sidecar:                {} {}, received {}, durable {}, lag {:.3} s, {} objects / {} bytes archived, {} upload errors (as of {})",
                if s.connected { "streaming from" } else { "disconnected from" },
                s.host.as_deref().unwrap_or("-"),
                s.received_lsn,
                s.durable_lsn,
                s.lag_seconds,
                s.objects_archived,
                s.bytes_archived,
                s.upload_errors,
                s.updated
            );
            println!("sidecar WAL puts:       {}", put_spacing(s));
            if let Some(e) = &s.last_error {
                println!("sidecar last error:     {e}");
            }
        }
        None => println!(
            "sidecar:                not running here (no fresh status file at {})",
            config.status_file().display()
        ),
    }
    for s in &report.secondaries {
        let required = if s.required { ", required" } else { "" };
        println!("secondary {} ({}{required}): {}", s.name, s.location, s.check);
        match &s.copy {
            Some(c) => {
                println!(
                    "  copy state: {}, {} objects / {} bytes queued, lag {:.1} s, {} copied, {} deleted, {} errors, {} dropped, {} back-fills{}",
                    serde_json::to_value(c.state)?.as_str().unwrap_or("-"),
                    c.queued_objects,
                    c.queued_bytes,
                    c.lag_seconds,
                    c.copied_objects,
                    c.deleted_objects,
                    c.errors,
                    c.dropped,
                    c.backfills,
                    c.last_backfill_us.map(|t| format!(" (last {})", format_rfc3339_micros(t))).unwrap_or_default()
                );
                if let Some(e) = &c.last_error {
                    println!("  last error: {e}");
                }
            }
            None => println!("  copy state: unknown (the sidecar is not running here)"),
        }
    }
    for p in &report.pinned_backups {
        println!("pinned backup:          {}{}", p.id, p.pin.suffix());
    }
    if let Some(e) = &report.pins_error {
        println!("pins error:             {e}");
    }
    repository_error.map_or(Ok(()), Err)
}

/// The primary's current WAL end, asked on a replication connection of our own.
async fn primary_position(pg: &crate::config::PostgresConfig) -> Result<u64> {
    let info: ConnInfo = pg.connection_info()?;
    let name = format!("{}_status", pg.application_name());
    Ok(pitr_pgwire::position::server_wal_end(&info, &name, Duration::from_secs(10)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(flush_interval_seconds: f64, synchronous_standby: Option<bool>) -> SidecarReport {
        SidecarReport {
            connected: true,
            host: None,
            received_lsn: String::new(),
            durable_lsn: String::new(),
            lag_bytes: 0,
            lag_seconds: 0.0,
            objects_archived: 0,
            bytes_archived: 0,
            upload_errors: 0,
            last_error: None,
            complete_up_to: None,
            flush_interval_seconds,
            synchronous_standby,
            updated: String::new(),
        }
    }

    #[test]
    fn put_spacing_says_how_far_apart_and_why() {
        assert_eq!(
            put_spacing(&report(0.002, Some(false))),
            "2 ms apart (synchronous_standby_names does not name this sidecar)"
        );
        assert!(put_spacing(&report(0.0, Some(true))).starts_with("back to back (synchronous_standby_names names"));
        assert_eq!(
            put_spacing(&report(0.0, None)),
            "back to back (flush_interval, or synchronous_standby_names not read)"
        );
        assert_eq!(put_spacing(&report(1.0, None)), "1 s apart (flush_interval)");
        assert_eq!(put_spacing(&report(0.0025, None)), "2.5 ms apart (flush_interval)");
    }
}
