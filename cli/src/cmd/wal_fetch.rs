//! `pitr wal-fetch`: PostgreSQL's restore_command, and `pitr wal-prefetch`, which it starts in
//! the background to spool the next segments.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use pitr_pgformat::lsn::format_lsn;

use crate::config::Config;
use crate::open;

/// What `wal-fetch` serves.
#[derive(Debug, Clone, Copy)]
pub enum Serve {
    /// Everything the archive holds, the newest partial segment zero-padded.
    All,
    /// Nothing at or past this LSN (a restore to a planned end).
    Until(u64),
    /// Whole segments only (a standby, which asks again for the rest).
    WholeSegments,
}

impl Serve {
    fn until(self) -> Option<u64> {
        match self {
            Serve::Until(lsn) => Some(lsn),
            Serve::All | Serve::WholeSegments => None,
        }
    }
}

/// Exit codes follow restore_command's contract: 0 fetched, 1 past the end of the archive
/// (PostgreSQL then ends recovery there), 126 anything else — a hole, a damaged object, an
/// unreachable repository, a bad configuration — which makes PostgreSQL stop recovery with an
/// error instead of silently treating it as the archive's end.
pub async fn run(config_path: &Path, from: Option<&str>, file: &str, dest: &Path, serve: Serve) -> Result<ExitCode> {
    const ARCHIVE_ERROR: u8 = 126;
    let until = serve.until();
    if pitr_restore::walfetch::take_spooled(file, dest) {
        tracing::debug!(file, "served from the prefetch spool");
        start_prefetch(config_path, from, file, dest, until);
        return Ok(ExitCode::SUCCESS);
    }
    let result = async {
        let config = Config::load(config_path)?;
        let repo = open::reader(&config, from)?;
        let cluster = open::checked_cluster(&config, &repo).await?;
        Ok::<_, anyhow::Error>(match serve {
            Serve::WholeSegments => pitr_restore::walfetch::wal_fetch_whole(&repo, &cluster, file, dest).await,
            Serve::All | Serve::Until(_) => pitr_restore::wal_fetch(&repo, &cluster, file, dest, until).await,
        })
    }
    .await;
    match result {
        Ok(Ok(fetched)) => {
            tracing::debug!(file, ?fetched, "fetched");
            start_prefetch(config_path, from, file, dest, until);
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(pitr_restore::FetchError::NotFound { .. })) | Ok(Err(pitr_restore::FetchError::BadName { .. })) => {
            match serve {
                Serve::WholeSegments => {
                    eprintln!("pitr wal-fetch: {file} is not in the archive as a whole segment yet")
                }
                Serve::All | Serve::Until(_) => eprintln!("pitr wal-fetch: {file} is not in the archive"),
            }
            Ok(ExitCode::from(1))
        }
        Ok(Err(e)) => {
            eprintln!("pitr wal-fetch: error: {e}");
            Ok(ExitCode::from(ARCHIVE_ERROR))
        }
        Err(e) => {
            eprintln!("pitr wal-fetch: error: {e:#}");
            Ok(ExitCode::from(ARCHIVE_ERROR))
        }
    }
}

/// Starts `pitr wal-prefetch` detached (its own session, no stdio), so PostgreSQL's
/// restore_command returns at once while the next segments are spooled. Best effort: a failure
/// here only costs speed.
fn start_prefetch(config_path: &Path, from: Option<&str>, file: &str, dest: &Path, until: Option<u64>) {
    use std::os::unix::process::CommandExt;
    let count = Config::load(config_path).ok().and_then(|c| c.backup.prefetch_segments).unwrap_or(8);
    if count == 0 || file.ends_with(".history") {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let spool = pitr_restore::walfetch::spool_dir(dest);
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config")
        .arg(config_path)
        .args(["wal-prefetch", file])
        .args(from.map(|f| format!("--from={f}")))
        .args(until.map(|u| format!("--until-lsn={}", format_lsn(u))))
        .arg(&spool)
        .arg(format!("--count={count}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    if let Err(e) = cmd.spawn() {
        tracing::debug!(error = %e, "could not start the prefetcher");
    }
}

/// `pitr wal-prefetch` (internal): spools the `count` segments after `file` for the next
/// `wal-fetch` calls.
pub async fn prefetch(
    config_path: &Path,
    from: Option<&str>,
    file: &str,
    spool: &Path,
    count: usize,
    until: Option<u64>,
) -> Result<()> {
    let config = Config::load(config_path)?;
    let repo = open::reader(&config, from)?;
    let cluster = open::cluster(&repo, config.system_id()).await?;
    let names = pitr_restore::walfetch::next_segments(&cluster, file, count);
    pitr_restore::walfetch::prefetch(&repo, &cluster, &names, spool, until).await?;
    Ok(())
}
