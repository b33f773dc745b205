//! Running backups and `pitr expire`, kept from deleting blocks under each other.
//!
//! ```text
//! running/backup.<started µs>.<random>                 a backup in progress (sealed: host, pid)
//! running/expire.<started µs>.<expires µs>.<random>    the expire lock (sealed: host, pid)
//! ```
//! A backup writes blocks, and reuses blocks it finds with `head()`, before its manifest makes
//! them referenced; a block sweep in between could delete a block the backup counts on. So each
//! side announces itself before it looks at the other, Dekker-style:
//! - a backup puts its marker, then lists the locks; while a live expire lock exists it waits
//!   (until the lock is released or expires), so it never reuses or writes a block during a sweep;
//! - expire puts its lock, then lists the markers; a live marker means a backup is running, and
//!   expire skips the block sweep.
//!
//! Storage is strongly consistent (S3, the local store), and each side's put is durable before it
//! lists, so at least one of the two sees the other. Times are in the names, so liveness needs no
//! reading: a lock is live until the expiry it names, a marker until `[retention]
//! stale_backup_after` past its start (a backup killed with `kill -9` leaves one behind). Expire
//! stops sweeping at half its lock's lifetime, which tolerates that much clock skew.

use std::time::{Duration, Instant};

use rand::RngCore;

use crate::layout::{Repository, RepositoryError};
use crate::now_us;
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::PutOutcome;

pub const PREFIX: &str = "running/";

/// Whether `name` is a marker or lock: coordination on one repository, not data.
pub fn is_running_object(name: &str) -> bool {
    name.starts_with(PREFIX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Backup { started_us: i64 },
    Expire { started_us: i64, expires_us: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningObject {
    pub name: String,
    pub activity: Activity,
}

pub fn parse_name(name: &str) -> Option<Activity> {
    let rest = name.strip_prefix(PREFIX)?;
    let parts: Vec<&str> = rest.split('.').collect();
    let us = |s: &str| u64::from_str_radix(s, 16).ok().and_then(|v| i64::try_from(v).ok());
    match parts.as_slice() {
        ["backup", started, _] => Some(Activity::Backup { started_us: us(started)? }),
        ["expire", started, expires, _] => {
            Some(Activity::Expire { started_us: us(started)?, expires_us: us(expires)? })
        }
        _ => None,
    }
}

/// Every marker and lock in the repository.
pub async fn list(repo: &Repository) -> Result<Vec<RunningObject>, RepositoryError> {
    Ok(repo
        .list(PREFIX)
        .await?
        .into_iter()
        .filter_map(|o| parse_name(&o.name).map(|activity| RunningObject { name: o.name, activity }))
        .collect())
}

/// Who wrote `name` (`host …, pid …`), for messages; best effort.
pub async fn describe(repo: &Repository, name: &str) -> String {
    match repo.get_opened(name).await {
        Ok((_, text)) => String::from_utf8_lossy(&text).lines().collect::<Vec<_>>().join(", "),
        Err(_) => "holder unknown".into(),
    }
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

async fn put_record(repo: &Repository, name: &str) -> Result<(), RepositoryError> {
    let text = format!("host={}\npid={}\n", hostname(), std::process::id());
    match repo.put_sealed(name, text.into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await? {
        PutOutcome::Created => Ok(()),
        PutOutcome::AlreadyExists => {
            Err(RepositoryError::Invalid { name: name.into(), what: "exists already (a random name repeated)".into() })
        }
    }
}

pub fn format_us(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| us.to_string())
}

/// Announces a running backup for as long as it lives. Release it once the manifest is durable;
/// dropped unreleased (an error exit), it is removed in the background.
#[derive(Debug)]
pub struct BackupMarker {
    repo: Repository,
    name: String,
    released: bool,
}

impl BackupMarker {
    /// Puts the marker, then waits while a `pitr expire` is sweeping blocks.
    pub async fn begin(repo: &Repository) -> Result<BackupMarker, RepositoryError> {
        let name = format!("{PREFIX}backup.{:016X}.{}", now_us(), random_suffix());
        put_record(repo, &name).await?;
        let marker = BackupMarker { repo: repo.clone(), name, released: false };
        let mut said = false;
        loop {
            let now = now_us();
            let live = list(repo)
                .await?
                .into_iter()
                .find(|o| matches!(o.activity, Activity::Expire { expires_us, .. } if expires_us > now));
            let Some(lock) = live else { break };
            if !said {
                let Activity::Expire { expires_us, .. } = lock.activity else { break };
                let holder = describe(repo, &lock.name).await;
                tracing::info!(
                    lock = %lock.name,
                    holder = %holder,
                    until = %format_us(expires_us),
                    "pitr expire is sweeping blocks; the backup waits until it is done"
                );
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(marker)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Removes the marker (after the manifest is durable). A failure only delays the next sweep
    /// until the marker is stale; it is logged, not returned.
    pub async fn release(mut self) {
        self.released = true;
        if let Err(e) = self.repo.delete(&self.name).await {
            tracing::warn!(marker = %self.name, error = %e, "could not remove the running-backup marker");
        }
    }
}

impl Drop for BackupMarker {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (repo, name) = (self.repo.clone(), self.name.clone());
            handle.spawn(async move {
                let _ = repo.delete(&name).await;
            });
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("another pitr expire is running on this repository ({holder}; its lock {name} expires at {expires}); not starting a second")]
    Busy { name: String, holder: String, expires: String },
}

/// The expire lock, held while expire may delete blocks.
#[derive(Debug)]
pub struct ExpireLock {
    repo: Repository,
    name: String,
    taken: Instant,
    ttl: Duration,
}

impl ExpireLock {
    /// Puts the lock (valid for `ttl` from `now_us`), then refuses if another expire holds a
    /// live one: of two racing, at least one sees the other and backs off.
    pub async fn acquire(repo: &Repository, now_us: i64, ttl: Duration) -> Result<ExpireLock, LockError> {
        let expires = now_us.saturating_add(ttl.as_micros() as i64);
        let name = format!("{PREFIX}expire.{now_us:016X}.{expires:016X}.{}", random_suffix());
        put_record(repo, &name).await?;
        let lock = ExpireLock { repo: repo.clone(), name, taken: Instant::now(), ttl };
        let other = list(repo).await?.into_iter().find(|o| {
            o.name != lock.name && matches!(o.activity, Activity::Expire { expires_us, .. } if expires_us > now_us)
        });
        if let Some(other) = other {
            let holder = describe(repo, &other.name).await;
            let expires = match other.activity {
                Activity::Expire { expires_us, .. } => format_us(expires_us),
                Activity::Backup { .. } => String::new(),
            };
            lock.release().await;
            return Err(LockError::Busy { name: other.name, holder, expires });
        }
        Ok(lock)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Blocks may be deleted until then: half the lock's lifetime, the rest is margin for the
    /// clocks of the hosts running backups.
    pub fn sweep_deadline(&self) -> Instant {
        self.taken + self.ttl / 2
    }

    pub async fn release(self) {
        if let Err(e) = self.repo.delete(&self.name).await {
            tracing::warn!(lock = %self.name, error = %e, "could not remove the expire lock (it expires on its own)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore};
    use std::sync::Arc;

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::new(Arc::new(LocalStore::new(dir)), KeyRing::from_key("k", [3; 32]))
    }

    #[tokio::test]
    async fn a_backup_waits_for_a_live_lock_and_one_expire_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let lock = ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await.unwrap();
        let err = ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LockError::Busy { .. }), "{err}");
        // The refused one took its own lock back.
        assert_eq!(list(&r).await.unwrap().len(), 1);

        let r2 = r.clone();
        let waiting = tokio::spawn(async move { BackupMarker::begin(&r2).await.unwrap() });
        // The marker is there while the backup waits.
        while !list(&r).await.unwrap().iter().any(|o| matches!(o.activity, Activity::Backup { .. })) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!waiting.is_finished());
        lock.release().await;
        let marker = waiting.await.unwrap();
        assert!(parse_name(marker.name()).is_some());
        marker.release().await;
        assert!(list(&r).await.unwrap().is_empty());

        // An expired lock (a crashed expire) neither blocks backups nor another expire.
        let old = ExpireLock::acquire(&r, now_us() - 120_000_000, Duration::from_secs(60)).await.unwrap();
        BackupMarker::begin(&r).await.unwrap().release().await;
        ExpireLock::acquire(&r, now_us(), Duration::from_secs(60)).await.unwrap().release().await;
        old.release().await;
    }

    #[test]
    fn names_parse() {
        assert_eq!(parse_name("running/backup.00000000000000FF.abc"), Some(Activity::Backup { started_us: 255 }));
        assert_eq!(
            parse_name("running/expire.0000000000000001.0000000000000002.x"),
            Some(Activity::Expire { started_us: 1, expires_us: 2 })
        );
        assert_eq!(parse_name("running/other"), None);
        assert_eq!(parse_name("pg/1/running/backup.1.x"), None);
    }
}
