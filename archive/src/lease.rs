//! One WAL writer per cluster: a lease taken with conditional puts, renewed, and released.
//!
//! Object storage is the only shared state, and puts are create-only, so a lease is a sequence of
//! generations, `pg/<system id>/lease/<generation>`: the newest one is the lease. Taking or
//! renewing it means creating the next generation; two contenders cannot both create it. A holder
//! that restarts after a crash (same holder name) takes its own lease back at once; anyone else
//! waits for it to expire.

use crate::names::pg;
use crate::now_us;
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::PutOutcome;
use crate::time::format_rfc3339_seconds;

/// Why the writer lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Listing, reading or putting a lease generation failed (storage, or a generation that does
    /// not open).
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// Another holder's lease has not expired: refuse to write the cluster's WAL beside it.
    #[error(
        "the WAL of cluster {system_id} is being written by {holder} (pid {pid}), whose lease expires at {expires}; \
             refusing to write beside it (a different host/slot; stop it, or wait for the lease to expire)"
    )]
    Held {
        /// The cluster's PostgreSQL system identifier.
        system_id: u64,
        /// The current holder's name (`<host>/<slot>` by default).
        holder: String,
        /// The holder's process id, as its newest generation records it.
        pid: u32,
        /// When its lease expires (RFC 3339, seconds), by the holder's clock.
        expires: String,
    },
    /// While renewing: a newer generation than ours belongs to another holder (it took over after
    /// our lease expired), or the generation we tried to put was taken. The stream must stop.
    #[error("lost the lease of cluster {system_id} to {holder}: another pitr took over this cluster's WAL; stopping")]
    Lost {
        /// The cluster's PostgreSQL system identifier.
        system_id: u64,
        /// The holder of the newest generation (empty if it could not be read).
        holder: String,
    },
    /// Other writers took every generation this process tried first, several times over.
    #[error(
        "could not take the lease of cluster {system_id}: other pitr processes took each generation first \
         ({attempts} attempts); is more than one sidecar starting for this cluster?"
    )]
    Contended {
        /// The cluster's PostgreSQL system identifier.
        system_id: u64,
        /// How many generations were tried.
        attempts: u32,
    },
    /// A lease generation opened but lacks a field (`holder`, `pid`, `expires_us`).
    #[error("lease object {name}: {what}")]
    Malformed {
        /// The lease generation's object name (or the lease prefix).
        name: String,
        /// What is missing or wrong.
        what: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaseRecord {
    holder: String,
    pid: u32,
    expires_us: i64,
}

impl LeaseRecord {
    fn to_text(&self) -> String {
        format!("holder={}\npid={}\nexpires_us={}\n", self.holder, self.pid, self.expires_us)
    }

    fn parse(name: &str, text: &str) -> Result<LeaseRecord, LeaseError> {
        let bad = |what: &str| LeaseError::Malformed { name: name.to_string(), what: what.to_string() };
        let mut holder = None;
        let mut pid = None;
        let mut expires_us = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("holder", v)) => holder = Some(v.to_string()),
                Some(("pid", v)) => pid = v.parse().ok(),
                Some(("expires_us", v)) => expires_us = v.parse().ok(),
                _ => {}
            }
        }
        Ok(LeaseRecord {
            holder: holder.ok_or_else(|| bad("no holder"))?,
            pid: pid.ok_or_else(|| bad("no pid"))?,
            expires_us: expires_us.ok_or_else(|| bad("no expiry"))?,
        })
    }
}

/// A lease this process holds.
#[derive(Debug)]
pub struct Lease {
    repo: Repository,
    system_id: u64,
    holder: String,
    ttl_us: i64,
    generation: u64,
}

/// The newest generation and its record. The holder deletes older generations as it renews, so
/// the newest listed may be gone when read: then a newer one exists, and the listing is redone.
async fn newest(repo: &Repository, system_id: u64) -> Result<Option<(u64, LeaseRecord)>, LeaseError> {
    let mut attempt = 0;
    loop {
        let listed = repo
            .list(&pg::lease_prefix(system_id))
            .await?
            .iter()
            .filter_map(|o| pg::parse_lease(system_id, &o.name))
            .max();
        let Some(generation) = listed else { return Ok(None) };
        let name = pg::lease(system_id, generation);
        match repo.get_opened(&name).await {
            Ok((_, text)) => {
                let record = LeaseRecord::parse(&name, &String::from_utf8_lossy(&text))?;
                return Ok(Some((generation, record)));
            }
            Err(RepositoryError::Store(e)) if e.is_not_found() && attempt < 5 => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

impl Lease {
    /// Takes the lease for `holder` (a stable name such as `<host>/<slot>`), valid for `ttl`.
    pub async fn acquire(
        repo: &Repository,
        system_id: u64,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Lease, LeaseError> {
        let mut lease = Lease {
            repo: repo.clone(),
            system_id,
            holder: holder.to_string(),
            ttl_us: ttl.as_micros() as i64,
            generation: 0,
        };
        for _ in 0..5 {
            let current = newest(repo, system_id).await?;
            if let Some((_, record)) = &current {
                if record.holder != holder && record.expires_us > now_us() {
                    return Err(LeaseError::Held {
                        system_id,
                        holder: record.holder.clone(),
                        pid: record.pid,
                        expires: format_rfc3339_seconds(record.expires_us),
                    });
                }
            }
            let next = current.map(|(g, _)| g + 1).unwrap_or(1);
            if lease.put(next).await? {
                return Ok(lease);
            }
            // Someone created that generation first: look again.
        }
        Err(LeaseError::Contended { system_id, attempts: 5 })
    }

    async fn put(&mut self, generation: u64) -> Result<bool, LeaseError> {
        let record =
            LeaseRecord { holder: self.holder.clone(), pid: std::process::id(), expires_us: now_us() + self.ttl_us };
        let name = pg::lease(self.system_id, generation);
        match self.repo.put_sealed(&name, record.to_text().into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await {
            Ok(PutOutcome::Created) => {}
            Ok(PutOutcome::AlreadyExists) | Err(RepositoryError::Conflict { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let previous = self.generation;
        self.generation = generation;
        // Older generations are history; removing them keeps listing cheap.
        for g in previous.max(generation.saturating_sub(8))..generation {
            let _ = self.repo.delete(&pg::lease(self.system_id, g)).await;
        }
        Ok(true)
    }

    /// Extends the lease; fails with `Lost` if someone else holds a newer generation.
    ///
    /// A lease whose every generation is gone (deleted by hand, or a repository restored from a
    /// copy) is put again past ours: renewing must never succeed without a lease in the
    /// repository, or a second writer could take generation 1 and both would write.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let current = newest(&self.repo, self.system_id).await?;
        if let Some((generation, record)) = &current {
            if *generation > self.generation && record.holder != self.holder {
                return Err(LeaseError::Lost { system_id: self.system_id, holder: record.holder.clone() });
            }
        }
        let next = current.map_or(0, |(g, _)| g).max(self.generation) + 1;
        if !self.put(next).await? {
            let holder = newest(&self.repo, self.system_id).await?.map(|(_, r)| r.holder).unwrap_or_default();
            return Err(LeaseError::Lost { system_id: self.system_id, holder });
        }
        Ok(())
    }

    /// Gives the lease up (on a clean stop) so another writer need not wait for it to expire:
    /// a newer generation that has already expired. Does nothing if someone else holds it now.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        for _ in 0..3 {
            let Some((generation, record)) = newest(&self.repo, self.system_id).await? else { return Ok(()) };
            if record.holder != self.holder {
                return Ok(());
            }
            self.ttl_us = -1;
            if self.put(generation + 1).await? {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore};
    use std::sync::Arc;
    use std::time::Duration;

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::new(Arc::new(LocalStore::new(dir)), KeyRing::from_key("k", [5; 32]))
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_own_lease_back_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let mut a = Lease::acquire(&r, 1, "host-a/pitr_main", Duration::from_secs(60)).await.unwrap();
        let err = Lease::acquire(&r, 1, "host-b/pitr_main", Duration::from_secs(60)).await.unwrap_err();
        assert!(err.to_string().contains("host-a/pitr_main"), "{err}");
        a.renew().await.unwrap();
        // A restart of the same holder (after a crash: the lease was never released) takes it back.
        let a2 = Lease::acquire(&r, 1, "host-a/pitr_main", Duration::from_secs(60)).await.unwrap();
        // Two live incarnations of one holder cannot both stream: the replication slot admits one
        // walsender. The lease only keeps *different* holders apart.
        a.renew().await.unwrap();
        a2.release().await.unwrap();
        Lease::acquire(&r, 1, "host-b/pitr_main", Duration::from_secs(60)).await.unwrap();
    }

    #[tokio::test]
    async fn an_expired_lease_can_be_taken_and_the_loser_notices() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let mut a = Lease::acquire(&r, 2, "a", Duration::from_millis(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _b = Lease::acquire(&r, 2, "b", Duration::from_secs(60)).await.unwrap();
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "b"), "{err}");
    }

    #[tokio::test]
    async fn a_renewal_puts_back_a_lease_deleted_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let mut a = Lease::acquire(&r, 3, "a", Duration::from_secs(60)).await.unwrap();
        a.renew().await.unwrap();
        for o in r.list(&pg::lease_prefix(3)).await.unwrap() {
            r.delete(&o.name).await.unwrap();
        }
        a.renew().await.unwrap();
        let (generation, record) = newest(&r, 3).await.unwrap().expect("the renewal put a lease back");
        assert_eq!((generation, record.holder.as_str()), (3, "a"));
        let err = Lease::acquire(&r, 3, "b", Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LeaseError::Held { ref holder, .. } if holder == "a"), "{err}");

        // Gone again, and another writer took generation 1 meanwhile: the newest generation wins,
        // and the other writer learns it lost at its next renewal.
        for o in r.list(&pg::lease_prefix(3)).await.unwrap() {
            r.delete(&o.name).await.unwrap();
        }
        let mut b = Lease::acquire(&r, 3, "b", Duration::from_secs(60)).await.unwrap();
        a.renew().await.unwrap();
        let err = b.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "a"), "{err}");
    }
}
