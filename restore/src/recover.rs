//! A whole restore: plan, materialise, write the recovery settings, and with `start` run the
//! server to the target and measure what was achieved (RPO) and how long it took (RTO).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pitr_archive::layout::WalLayout;
use pitr_archive::Repository;
use pitr_pgwire::walreader::{pg_timestamp_to_unix_micros, WalDecoder};

use crate::materialize::{check_target, materialize, Staging};
use crate::plan::Catalog;
use crate::target::{format_time, RecoveryTarget};
use crate::walfetch::read_wal_file;
use crate::RestoreError;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub target: RecoveryTarget,
    pub target_dir: PathBuf,
    pub force: bool,
    /// The restore_command PostgreSQL will run (`%f`/`%p` placeholders included).
    pub restore_command: String,
    pub workers: usize,
    /// Restore from this backup instead of the newest one before the target.
    pub backup_id: Option<String>,
    /// Run the server to the target and report.
    pub start: Option<StartOptions>,
}

#[derive(Debug, Clone)]
pub struct StartOptions {
    pub bin_dir: PathBuf,
    pub port: u16,
    /// Database user for the report's queries over the Unix socket.
    pub db_user: String,
    pub timeout: Duration,
}

/// What a restore did and achieved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub target: String,
    pub target_dir: String,
    pub backup_id: String,
    /// `full` or `incremental`.
    pub backup_kind: String,
    /// The backups combined, oldest (the full backup) first.
    pub backup_chain: Vec<String>,
    /// Where replay starts: the backup's start (its checkpoint's redo point).
    pub backup_start_lsn: String,
    pub backup_stop_time: String,
    pub backup_stop_lsn: String,
    pub files: usize,
    pub bytes_restored: u64,
    pub recovery_settings: Vec<String>,
    pub newest_archived_commit: Option<String>,
    pub started: bool,
    pub port: Option<u16>,
    pub last_replayed_commit_time: Option<String>,
    pub last_replayed_lsn: Option<String>,
    pub last_replayed_xid: Option<u32>,
    /// WAL replayed: from the backup's start to the last replayed record.
    pub wal_replayed_bytes: Option<u64>,
    /// Target (or, for `latest`, the newest archived commit) minus the last replayed commit.
    pub data_loss_window_seconds: Option<f64>,
    pub download_seconds: f64,
    pub replay_seconds: Option<f64>,
    pub total_seconds: f64,
    pub stop_command: Option<String>,
}

fn absolute(p: &Path) -> Result<PathBuf, RestoreError> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|e| RestoreError::Io { path: p.to_path_buf(), cause: e })?;
    Ok(cwd.join(p))
}

fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn recovery_settings(target: RecoveryTarget, restore_command: &str) -> Vec<String> {
    let mut lines = vec![format!("restore_command = {}", conf_quote(restore_command))];
    match target {
        RecoveryTarget::Time(us) => lines.push(format!("recovery_target_time = {}", conf_quote(&format_time(us)))),
        RecoveryTarget::Lsn(l) => lines.push(format!("recovery_target_lsn = '{:X}/{:X}'", l >> 32, l & 0xFFFF_FFFF)),
        RecoveryTarget::Xid(x) => lines.push(format!("recovery_target_xid = '{x}'")),
        RecoveryTarget::Latest => {}
    }
    if target != RecoveryTarget::Latest {
        lines.push("recovery_target_action = 'promote'".into());
    }
    lines.push("recovery_target_timeline = 'latest'".into());
    lines
}

/// Restores per `opts`, calling `progress(done, total)` while files are written.
pub async fn restore(
    repo: &Repository,
    catalog: &Catalog,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    check_target(&opts.target_dir, opts.force)?;
    if opts.start.is_some() && unsafe { libc::geteuid() } == 0 {
        return Err(RestoreError::Other(
            "PostgreSQL refuses to run as root: run `pitr restore --start` as the database's OS user, \
             or restore without --start and start the server yourself"
                .into(),
        ));
    }
    let backup = match &opts.backup_id {
        Some(id) => catalog.named_backup(id, opts.target)?,
        None => catalog.choose_backup(opts.target)?,
    };
    let chain = catalog.chain(backup)?;
    let newest_commit = catalog.current_window().and_then(|w| w.end_us);
    tracing::info!(backup = %backup.id, chain = chain.len(), target = %opts.target, "restoring");

    let staging = Staging::create(&opts.target_dir)?;
    let final_dir = absolute(&opts.target_dir)?;
    let bytes_restored = materialize(repo, &chain, &staging.path, &final_dir, opts.workers, progress).await?;
    let settings = recovery_settings(opts.target, &opts.restore_command);
    let auto_conf = staging.path.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto_conf).unwrap_or_default();
    conf.push_str("\n# Added by pitr restore\n");
    for line in &settings {
        conf.push_str(line);
        conf.push('\n');
    }
    std::fs::write(&auto_conf, conf).map_err(|e| RestoreError::Io { path: auto_conf.clone(), cause: e })?;
    let signal = staging.path.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(|e| RestoreError::Io { path: signal.clone(), cause: e })?;
    staging.commit(&opts.target_dir, opts.force)?;
    let download_seconds = started.elapsed().as_secs_f64();

    let mut report = RestoreReport {
        target: opts.target.to_string(),
        target_dir: opts.target_dir.display().to_string(),
        backup_id: backup.id.clone(),
        backup_kind: backup.kind.clone(),
        backup_chain: chain.iter().map(|b| b.id.clone()).collect(),
        backup_start_lsn: pitr_pgwire::format_lsn(backup.start_lsn),
        backup_stop_time: format_time(backup.stop_time_us),
        backup_stop_lsn: pitr_pgwire::format_lsn(backup.stop_lsn),
        files: backup.files.len(),
        bytes_restored,
        recovery_settings: settings,
        newest_archived_commit: newest_commit.map(format_time),
        started: false,
        port: None,
        last_replayed_commit_time: None,
        last_replayed_lsn: None,
        last_replayed_xid: None,
        wal_replayed_bytes: None,
        data_loss_window_seconds: None,
        download_seconds,
        replay_seconds: None,
        total_seconds: download_seconds,
        stop_command: None,
    };
    let Some(start) = &opts.start else { return Ok(report) };

    let replay_started = Instant::now();
    let (commit_us, lsn) = run_to_target(&opts.target_dir, start).await?;
    // Segments prefetched beyond the target are of no use once the server has promoted.
    let _ = std::fs::remove_dir_all(opts.target_dir.join("pg_wal").join(crate::walfetch::SPOOL_DIR));
    report.started = true;
    report.port = Some(start.port);
    report.replay_seconds = Some(replay_started.elapsed().as_secs_f64());
    report.total_seconds = started.elapsed().as_secs_f64();
    // PostgreSQL knows the last commit it replayed; when recovery replayed none (a target just
    // after the backup), the newest commit in the restored data is the last one before the
    // replay position, which the archived WAL tells.
    let from_wal = last_commit_before(repo, catalog, lsn).await;
    let commit_us = commit_us.or(from_wal.map(|(_, t)| t));
    report.last_replayed_commit_time = commit_us.map(format_time);
    report.last_replayed_lsn = Some(pitr_pgwire::format_lsn(lsn));
    report.wal_replayed_bytes = Some(lsn.saturating_sub(backup.start_lsn));
    report.last_replayed_xid = from_wal.map(|(xid, _)| xid);
    let reference = match opts.target {
        RecoveryTarget::Time(t) => Some(t),
        RecoveryTarget::Latest => newest_commit,
        _ => None,
    };
    if let (Some(reference), Some(commit)) = (reference, commit_us) {
        report.data_loss_window_seconds = Some((reference - commit).max(0) as f64 / 1e6);
    }
    report.stop_command =
        Some(format!("{} -D {} stop", start.bin_dir.join("pg_ctl").display(), opts.target_dir.display()));
    Ok(report)
}

/// Starts the server on the restored directory and waits until recovery has ended (the server
/// promoted). Returns the last replayed commit time and replay LSN.
async fn run_to_target(dir: &Path, start: &StartOptions) -> Result<(Option<i64>, u64), RestoreError> {
    let dir = std::fs::canonicalize(dir).map_err(|e| RestoreError::Io { path: dir.to_path_buf(), cause: e })?;
    let log = dir.join("pitr-restore-server.log");
    let socket_dir = dir.display().to_string();
    let options = format!("-p {} -c listen_addresses=localhost -c unix_socket_directories='{socket_dir}'", start.port);
    let out = Command::new(start.bin_dir.join("pg_ctl"))
        .arg("-D")
        .arg(&dir)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(&options)
        .arg("start")
        .output()
        .map_err(|e| RestoreError::Server(format!("running {}: {e}", start.bin_dir.join("pg_ctl").display())))?;
    if !out.status.success() {
        return Err(RestoreError::Server(format!(
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            log_tail(&log)
        )));
    }
    let conninfo =
        format!("host={socket_dir} port={} user={} dbname=postgres connect_timeout=5", start.port, start.db_user);
    let deadline = Instant::now() + start.timeout;
    let mut last_error = String::new();
    loop {
        if Instant::now() > deadline {
            return Err(RestoreError::Server(format!(
                "recovery did not finish within {:?} (last: {last_error}); the server is still running\n{}",
                start.timeout,
                log_tail(&log)
            )));
        }
        if !dir.join("postmaster.pid").exists() {
            return Err(RestoreError::Server(format!("the server stopped during recovery:\n{}", log_tail(&log))));
        }
        match query_state(&conninfo).await {
            Ok(Some(state)) => return Ok(state),
            Ok(None) => {}
            Err(e) => last_error = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `Some((last commit µs, replay LSN))` once the server has left recovery.
async fn query_state(conninfo: &str) -> Result<Option<(Option<i64>, u64)>, String> {
    let (client, connection) =
        tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    let task = tokio::spawn(connection);
    let row = client
        .query_one(
            "select pg_is_in_recovery(), \
             (extract(epoch from pg_last_xact_replay_timestamp()) * 1000000)::int8, \
             coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    drop(client);
    task.abort();
    let in_recovery: bool = row.get(0);
    if in_recovery {
        return Ok(None);
    }
    let commit: Option<i64> = row.get(1);
    let lsn: String = row.get(2);
    Ok(Some((commit, pitr_pgwire::parse_lsn(&lsn).unwrap_or(0))))
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("server log {} (last lines):\n{}", log.display(), lines[lines.len().saturating_sub(15)..].join("\n"))
}

/// The last commit/abort that ends at or before `lsn`, read from the archived WAL: (xid, time in
/// µs since the Unix epoch). Looks back a few segments when the newest holds none (an idle
/// primary, or a target just after a backup).
async fn last_commit_before(repo: &Repository, catalog: &Catalog, lsn: u64) -> Option<(u32, i64)> {
    let layout = WalLayout::new(&catalog.cluster);
    let newest = layout.segno_of(lsn.checked_sub(1)?);
    for segno in (newest.saturating_sub(4)..=newest).rev() {
        // The replayed WAL is on the newest timeline holding that segment.
        let Some(timeline) = catalog.wal.segments.keys().filter(|(_, s)| *s == segno).map(|(t, _)| *t).max() else {
            continue;
        };
        let file = layout.segment_file_name(timeline, segno);
        let Ok((_, data)) = read_wal_file(repo, &catalog.cluster, &file).await else { continue };
        let mut decoder = WalDecoder::new(catalog.cluster.wal_segment_size, catalog.cluster.wal_page_size);
        let mut records = Vec::new();
        decoder.feed(layout.segment_start(segno), &data, &mut records);
        if let Some(last) = records.iter().rev().find(|r| r.end_lsn <= lsn.next_multiple_of(8)) {
            return Some((last.xid, pg_timestamp_to_unix_micros(last.timestamp)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_settings_quote_and_use_numeric_offsets() {
        let s = recovery_settings(
            RecoveryTarget::Time(1_795_615_380_000_000),
            "\"/opt/it's/pitr\" wal-fetch \"%f\" \"%p\"",
        );
        assert_eq!(s[0], "restore_command = '\"/opt/it''s/pitr\" wal-fetch \"%f\" \"%p\"'");
        assert_eq!(s[1], "recovery_target_time = '2026-11-25 14:03:00.000000+00'");
        assert_eq!(s[2], "recovery_target_action = 'promote'");
        let latest = recovery_settings(RecoveryTarget::Latest, "x");
        assert_eq!(latest, vec!["restore_command = 'x'", "recovery_target_timeline = 'latest'"]);
    }
}
