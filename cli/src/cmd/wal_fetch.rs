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

impl Serve {
    /// The exit code of a fetch that failed (not "not found"). A restore ends recovery where
    /// restore_command exits 1, so anything else — a hole, a damaged object, an unreachable
    /// repository, a bad configuration — exits 126, which makes PostgreSQL stop recovery with an
    /// error instead of silently taking it for the archive's end. A standby never ends recovery
    /// on 1: it asks again a few seconds later, while 126 stops it (FATAL), so a short outage of
    /// the repository would take the standby down. It gets 1, the error on stderr (in the
    /// server's log).
    fn failure_exit(self) -> u8 {
        match self {
            Serve::WholeSegments => 1,
            Serve::All | Serve::Until(_) => 126,
        }
    }
}

/// Exit codes follow restore_command's contract: 0 fetched, 1 past the end of the archive (or
/// not there yet, for a standby), otherwise [`Serve::failure_exit`].
pub async fn run(config_path: &Path, from: Option<&str>, file: &str, dest: &Path, serve: Serve) -> Result<ExitCode> {
    let until = serve.until();
    if let Serve::WholeSegments = serve {
        pitr_restore::walfetch::drop_stale_spooled(file, dest);
    }
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
            Ok(ExitCode::from(serve.failure_exit()))
        }
        Err(e) => {
            eprintln!("pitr wal-fetch: error: {e:#}");
            Ok(ExitCode::from(serve.failure_exit()))
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

#[cfg(test)]
mod tests {
    use super::Serve;

    #[test]
    fn a_failed_fetch_stops_a_restore_but_a_standby_asks_again() {
        assert_eq!(Serve::All.failure_exit(), 126);
        assert_eq!(Serve::Until(0x1_0000_0000).failure_exit(), 126);
        assert_eq!(Serve::WholeSegments.failure_exit(), 1);
    }
}
