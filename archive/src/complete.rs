//! Completeness marks: moments at which the archive provably held everything the source had.
//!
//! ```text
//! pg/<system id>/complete/<timeline>.<lsn>.<server time µs>     (hex, fixed width: names sort by time)
//! ```
//! (built and parsed by [`names::pg::complete_mark`] and [`names::pg::parse_complete_mark`]).
//! A mark says: "when the primary's clock read `server_time_us`, its WAL on `timeline` ended at
//! `lsn`, and every byte before `lsn` was durable in the archive". The newest commit in the WAL
//! only says when the last transaction happened; a mark says how long after it nothing else did,
//! so a restore to a moment between the two is exact rather than refused. The sidecar writes a
//! mark while it is caught up, at most once per `complete_interval`, and prunes older ones.
//!
//! The name is bound into the object's authenticated encryption and the plaintext repeats the
//! fields, so a planted or renamed mark fails to open: a reader trusts only what it opened. A mark
//! whose LSN lies beyond the WAL the archive holds (WAL deleted since) proves nothing and is
//! ignored by readers.
//!
//! MongoDB's tailer writes the same kind of mark under `mongo/<name>/complete/` with its own
//! position format (see the `mongo` crate); [`record_named`] and [`newest_named`] are the shared
//! mechanics.

use crate::names;
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};

/// Marks kept per timeline (the newest ones): a reader that listed just before a prune still
/// finds the one it picked, or the next.
const KEEP: usize = 3;

/// A PostgreSQL completeness mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompleteMark {
    /// The timeline the primary was writing WAL on; marks are kept and looked up per timeline.
    pub timeline: u32,
    /// The primary's WAL end (its flush position) at `server_time_us`.
    pub lsn: u64,
    /// The primary's clock, µs since the Unix epoch.
    pub server_time_us: i64,
}

impl CompleteMark {
    /// The object name of this mark.
    pub fn name(&self, system_id: u64) -> String {
        names::pg::complete_mark(system_id, self.timeline, self.lsn, self.server_time_us)
    }

    /// Parses a mark's object name (the fields are checked again against the opened contents).
    pub fn parse_name(system_id: u64, name: &str) -> Option<CompleteMark> {
        let (timeline, lsn, server_time_us) = names::pg::parse_complete_mark(system_id, name)?;
        Some(CompleteMark { timeline, lsn, server_time_us })
    }

    fn to_text(self) -> String {
        format!("timeline={}\nlsn={}\nserver_time_us={}\n", self.timeline, self.lsn, self.server_time_us)
    }

    fn from_text(text: &str) -> Option<CompleteMark> {
        let mut timeline = None;
        let mut lsn = None;
        let mut time = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("timeline", v)) => timeline = v.parse().ok(),
                Some(("lsn", v)) => lsn = v.parse().ok(),
                Some(("server_time_us", v)) => time = v.parse().ok(),
                _ => return None,
            }
        }
        Some(CompleteMark { timeline: timeline?, lsn: lsn?, server_time_us: time? })
    }
}

/// Stores a mark named `name` holding `text`, then deletes all but the newest [`KEEP`] marks
/// under `prefix` (names under a prefix sort by time). The put is create-only like every put;
/// a failed prune leaves extra marks, which only cost a listing.
pub async fn record_named(repo: &Repository, prefix: &str, name: &str, text: String) -> Result<(), RepositoryError> {
    repo.put_sealed(name, text.into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await?;
    let names: Vec<String> = repo.list(prefix).await?.into_iter().map(|o| o.name).collect();
    if names.len() > KEEP {
        repo.delete_many(&names[..names.len() - KEEP]).await?;
    }
    Ok(())
}

/// The newest mark under `prefix` that opens and that `accept` takes (given its name and
/// plaintext), looking back over the few a prune keeps.
pub async fn newest_named<T>(
    repo: &Repository,
    prefix: &str,
    accept: impl Fn(&str, &str) -> Option<T>,
) -> Result<Option<T>, RepositoryError> {
    let names: Vec<String> = repo.list(prefix).await?.into_iter().map(|o| o.name).collect();
    for name in names.iter().rev().take(KEEP + 2) {
        match repo.get_opened(name).await {
            Ok((_, text)) => {
                if let Some(v) = accept(name, &String::from_utf8_lossy(&text)) {
                    return Ok(Some(v));
                }
                tracing::warn!(object = %name, "completeness mark does not match its name; ignored");
            }
            // Pruned since the listing: the next older one.
            Err(RepositoryError::Store(e)) if e.is_not_found() => continue,
            // A mark that fails authentication was not written by a holder of the key.
            Err(RepositoryError::Seal(e)) => {
                tracing::warn!(object = %name, error = %e, "completeness mark does not open; ignored");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Records a PostgreSQL mark (and prunes the timeline's older ones).
pub async fn record_pg(repo: &Repository, system_id: u64, mark: &CompleteMark) -> Result<(), RepositoryError> {
    let prefix = names::pg::complete_timeline_prefix(system_id, mark.timeline);
    record_named(repo, &prefix, &mark.name(system_id), mark.to_text()).await
}

/// The newest authentic PostgreSQL mark of `timeline`.
pub async fn newest_pg(
    repo: &Repository,
    system_id: u64,
    timeline: u32,
) -> Result<Option<CompleteMark>, RepositoryError> {
    newest_named(repo, &names::pg::complete_timeline_prefix(system_id, timeline), |name, text| {
        let from_name = CompleteMark::parse_name(system_id, name)?;
        (CompleteMark::from_text(text)? == from_name).then_some(from_name)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore, Store};
    use std::sync::Arc;

    #[test]
    fn names_round_trip_and_sort_by_time() {
        let a = CompleteMark { timeline: 2, lsn: 0x1_0000_0100, server_time_us: 1_795_615_380_000_000 };
        let b = CompleteMark { server_time_us: a.server_time_us + 1, lsn: a.lsn + 8, ..a };
        assert_eq!(CompleteMark::parse_name(7, &a.name(7)), Some(a));
        assert!(a.name(7) < b.name(7));
        assert_eq!(CompleteMark::from_text(&a.to_text()), Some(a));
        assert_eq!(CompleteMark::parse_name(7, "pg/7/complete/junk"), None);
        assert_eq!(CompleteMark::parse_name(8, &a.name(7)), None);
    }

    #[tokio::test]
    async fn newest_authentic_mark_wins_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [5; 32]));
        assert_eq!(newest_pg(&repo, 7, 1).await.unwrap(), None);
        let mut last = None;
        for i in 0..6 {
            let m = CompleteMark { timeline: 1, lsn: 0x100 * (i + 1), server_time_us: 1_000_000 * (i as i64 + 1) };
            record_pg(&repo, 7, &m).await.unwrap();
            last = Some(m);
        }
        assert_eq!(newest_pg(&repo, 7, 1).await.unwrap(), last);
        assert_eq!(repo.list(&names::pg::complete_prefix(7)).await.unwrap().len(), KEEP);
        assert_eq!(newest_pg(&repo, 7, 2).await.unwrap(), None);

        // A mark planted without the key, or an authentic one renamed to claim more, is ignored.
        let newest = last.unwrap();
        let later = CompleteMark { server_time_us: newest.server_time_us + 60_000_000, ..newest };
        let bytes = store.get(&newest.name(7)).await.unwrap();
        store.put_if_absent(&later.name(7), bytes).await.unwrap();
        assert_eq!(newest_pg(&repo, 7, 1).await.unwrap(), Some(newest));
    }
}
