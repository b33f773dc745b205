//! One WAL writer per cluster: a lease taken with conditional puts, renewed, released — and a
//! fence that every WAL put of the holder passes first.
//!
//! Object storage is the only shared state, and puts are create-only, so a lease is a sequence of
//! generations, `pg/<system id>/lease/<generation>`: the newest one is the lease. Taking or
//! renewing it means creating the next generation; two contenders cannot both create it.
//!
//! Who may take it:
//! - nobody holds it, or its holder released it (a clean stop): at once;
//! - the same holder restarting after a crash (same holder name, same host, and the process that
//!   wrote the newest generation is gone): at once;
//! - anyone else: only once the newest generation has expired by the contender's wall clock *and*
//!   the contender has watched it stay the newest for a full TTL (the longer of its own and the
//!   holder's) on its own monotonic clock. A live holder renews every third of its TTL, so it always
//!   creates a newer generation within that time: a contender whose wall clock runs ahead (or a
//!   holder whose clock runs behind) cannot take a live lease; it sees the renewal and refuses.
//!
//! How the holder keeps to it (the fence, [`LeaseGuard`]): the lease is *confirmed* from the start
//! of the put that created its newest generation until `ttl - ttl/4` later, measured with
//! [`Instant`] (which keeps running while the process is stopped). A renewal that fails for any
//! reason, or takes longer than a third of the TTL, makes it unconfirmed until a later renewal
//! succeeds. Before each WAL put the writer waits for the lease to be confirmed, then lists the
//! lease prefix (one LIST request) and stops with [`LeaseError::Lost`] if a generation newer than
//! its own exists, then checks the monotonic clock again. A contender's monotonic TTL starts no
//! earlier than the holder's newest generation was created, which is after the holder's validity
//! started; so every check the holder passes lies at least `ttl/4` before the earliest takeover.
//! What remains: a put whose request reaches storage more than `ttl/4` after its check passed (the
//! process paused between the check and the write, or the storage client retrying a slow put)
//! could land after a takeover. That is the price of storage without conditional writes on another
//! object; `ttl/4` is 15 s at the default TTL of 60 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::names::pg;
use crate::now_us;
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::PutOutcome;
use crate::time::format_rfc3339_seconds;

/// How many times a contender tries to create the next generation before giving up.
const ATTEMPTS: u32 = 5;

/// Why the writer lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Listing, reading or putting a lease generation failed (storage, or a generation that does
    /// not open).
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// Another holder's lease is live: refuse to write the cluster's WAL beside it.
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
    /// A newer generation than ours belongs to another holder (or another process of the same
    /// holder): it took over. Nothing more may be written for the cluster; the stream must stop.
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
    /// A renewal did not finish in time; WAL puts wait until a later one succeeds.
    #[error("renewing the lease of cluster {system_id} took longer than {after:?}")]
    Timeout {
        /// The cluster's PostgreSQL system identifier.
        system_id: u64,
        /// How long it was given.
        after: Duration,
    },
    /// The lease was given up (a clean stop): nothing more is written under it.
    #[error("the lease of cluster {system_id} was released; nothing more is written for it")]
    Released {
        /// The cluster's PostgreSQL system identifier.
        system_id: u64,
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
    /// By the writer's wall clock.
    expires_us: i64,
    /// The host that wrote it (empty in generations written before it was recorded).
    host: String,
    /// Random, one per process's lease: tells two processes of one holder name apart.
    incarnation: String,
    /// The writer's TTL (0 if not recorded): a contender watches at least this long.
    ttl_us: i64,
    /// Written by a clean stop: anyone may take the lease at once.
    released: bool,
}

impl LeaseRecord {
    fn to_text(&self) -> String {
        format!(
            "holder={}\npid={}\nexpires_us={}\nhost={}\nincarnation={}\nttl_us={}\nreleased={}\n",
            self.holder, self.pid, self.expires_us, self.host, self.incarnation, self.ttl_us, self.released
        )
    }

    fn parse(name: &str, text: &str) -> Result<LeaseRecord, LeaseError> {
        let bad = |what: &str| LeaseError::Malformed { name: name.to_string(), what: what.to_string() };
        let (mut holder, mut pid, mut expires_us) = (None, None, None);
        let mut record = LeaseRecord {
            holder: String::new(),
            pid: 0,
            expires_us: 0,
            host: String::new(),
            incarnation: String::new(),
            ttl_us: 0,
            released: false,
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("holder", v)) => holder = Some(v.to_string()),
                Some(("pid", v)) => pid = v.parse().ok(),
                Some(("expires_us", v)) => expires_us = v.parse().ok(),
                Some(("host", v)) => record.host = v.to_string(),
                Some(("incarnation", v)) => record.incarnation = v.to_string(),
                Some(("ttl_us", v)) => record.ttl_us = v.parse().unwrap_or(0),
                Some(("released", v)) => record.released = v == "true",
                _ => {}
            }
        }
        record.holder = holder.ok_or_else(|| bad("no holder"))?;
        record.pid = pid.ok_or_else(|| bad("no pid"))?;
        record.expires_us = expires_us.ok_or_else(|| bad("no expiry"))?;
        Ok(record)
    }
}

/// The newest generation's number, from a listing alone.
async fn newest_generation(repo: &Repository, system_id: u64) -> Result<Option<u64>, LeaseError> {
    Ok(repo.list(&pg::lease_prefix(system_id)).await?.iter().filter_map(|o| pg::parse_lease(system_id, &o.name)).max())
}

/// The newest generation and its record. The holder deletes older generations as it renews, so
/// the newest listed may be gone when read: then a newer one exists, and the listing is redone.
async fn newest(repo: &Repository, system_id: u64) -> Result<Option<(u64, LeaseRecord)>, LeaseError> {
    let mut attempt = 0;
    loop {
        let Some(generation) = newest_generation(repo, system_id).await? else { return Ok(None) };
        let name = pg::lease(system_id, generation);
        match repo.get_record(&name).await {
            Ok((_, text)) => {
                let record = LeaseRecord::parse(&name, &String::from_utf8_lossy(&text))?;
                return Ok(Some((generation, record)));
            }
            Err(RepositoryError::Store(e)) if e.is_not_found() && attempt < 5 => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether process `pid` may still run on this host. Without `/proc` nobody can tell: assume it
/// does (the safe answer: the restart then waits like any contender).
fn may_be_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        // Our own pid in an older generation: a previous process (a container restarted with the
        // same pid), as this process's own lease has its own incarnation.
        return false;
    }
    !std::path::Path::new("/proc/self").exists() || std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// What the fence knows, shared by the lease and its guards.
#[derive(Debug, Clone, Default)]
struct FenceState {
    /// The newest generation this process created.
    generation: u64,
    /// A generation this process is creating (its put may land before we hear of it).
    pending: u64,
    /// Until when the lease is confirmed, by the monotonic clock; `None`: not confirmed.
    valid_until: Option<Instant>,
    /// Set once another writer took over: the holder of the newer generation.
    lost: Option<String>,
    /// Set on a clean stop.
    released: bool,
}

#[derive(Debug)]
struct Fence {
    repo: Repository,
    system_id: u64,
    state: watch::Sender<FenceState>,
    /// Asks the lease keeper for a renewal now (a put found the lease unconfirmed).
    renew_now: Notify,
}

/// What every WAL put of the lease's holder passes first (see the module's documentation).
/// Cheap to clone; all clones and the [`Lease`] share one state.
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    fence: Arc<Fence>,
}

impl LeaseGuard {
    /// Whether the lease is confirmed now by this process's monotonic clock (and not lost).
    pub fn is_confirmed(&self) -> bool {
        let s = self.fence.state.borrow();
        s.lost.is_none() && !s.released && s.valid_until.is_some_and(|t| Instant::now() < t)
    }

    fn stopped(&self) -> Option<LeaseError> {
        let s = self.fence.state.borrow();
        let system_id = self.fence.system_id;
        if let Some(holder) = &s.lost {
            return Some(LeaseError::Lost { system_id, holder: holder.clone() });
        }
        s.released.then_some(LeaseError::Released { system_id })
    }

    /// Waits until the lease is confirmed by the monotonic clock; `Lost` or `Released` if it
    /// never will be again. An unconfirmed lease asks the keeper for a renewal at once.
    pub async fn confirmed(&self) -> Result<(), LeaseError> {
        let mut changes = self.fence.state.subscribe();
        loop {
            if let Some(e) = self.stopped() {
                return Err(e);
            }
            if self.is_confirmed() {
                return Ok(());
            }
            self.fence.renew_now.notify_one();
            // A renewal changes the state; the sender lives as long as `self`, so this only wakes
            // on a change (or a spurious wake-up, which the loop absorbs).
            let _ = changes.changed().await;
        }
    }

    /// The check before a WAL put: the lease is confirmed by the monotonic clock (waiting until
    /// it is), no newer generation than ours exists in storage (one LIST), and the lease is still
    /// confirmed after that listing. `Lost` if another writer took over; a storage error if the
    /// listing failed (the put is then retried like one that failed).
    pub async fn check(&self) -> Result<(), LeaseError> {
        loop {
            self.confirmed().await?;
            let newest = newest_generation(&self.fence.repo, self.fence.system_id).await?;
            let ours = {
                let s = self.fence.state.borrow();
                s.generation.max(s.pending)
            };
            if newest.is_some_and(|g| g > ours) {
                let holder = newest_holder(&self.fence.repo, self.fence.system_id).await;
                self.fence.state.send_modify(|s| s.lost = Some(holder.clone()));
                return Err(LeaseError::Lost { system_id: self.fence.system_id, holder });
            }
            if self.is_confirmed() {
                return Ok(());
            }
        }
    }

    /// The holder that took the lease over, if one did (`Lost` seen by a renewal or a check).
    pub fn lost_to(&self) -> Option<String> {
        self.fence.state.borrow().lost.clone()
    }

    /// Resolves when a put asked for a renewal now (the lease keeper waits on it).
    pub async fn renewal_requested(&self) {
        self.fence.renew_now.notified().await
    }
}

/// The holder of the newest generation, for messages ("" if it cannot be read).
async fn newest_holder(repo: &Repository, system_id: u64) -> String {
    newest(repo, system_id).await.ok().flatten().map(|(_, r)| r.holder).unwrap_or_default()
}

/// A lease this process holds.
#[derive(Debug)]
pub struct Lease {
    repo: Repository,
    system_id: u64,
    holder: String,
    host: String,
    incarnation: String,
    ttl: Duration,
    generation: u64,
    guard: LeaseGuard,
}

/// How much sooner than the TTL the holder stops trusting its lease (module documentation).
pub fn safety_margin(ttl: Duration) -> Duration {
    ttl / 4
}

impl Lease {
    /// Takes the lease for `holder` (a stable name such as `<host>/<slot>`), valid for `ttl`.
    /// A lease another holder let expire is taken only after watching it unchanged for a full
    /// TTL, so this may wait that long.
    pub async fn acquire(repo: &Repository, system_id: u64, holder: &str, ttl: Duration) -> Result<Lease, LeaseError> {
        Lease::acquire_by_clock(repo, system_id, holder, ttl, &now_us).await
    }

    /// [`Lease::acquire`] with `wall` as this process's wall clock (µs since the Unix epoch).
    async fn acquire_by_clock(
        repo: &Repository,
        system_id: u64,
        holder: &str,
        ttl: Duration,
        wall: &(dyn Fn() -> i64 + Sync),
    ) -> Result<Lease, LeaseError> {
        let (state, _) = watch::channel(FenceState::default());
        let fence = Arc::new(Fence { repo: repo.clone(), system_id, state, renew_now: Notify::new() });
        let mut lease = Lease {
            repo: repo.clone(),
            system_id,
            holder: holder.to_string(),
            host: crate::hostname(),
            incarnation: format!("{:016x}", rand::random::<u64>()),
            ttl,
            generation: 0,
            guard: LeaseGuard { fence },
        };
        // The expired generation being watched, and since when (monotonic).
        let mut watched: Option<(u64, Instant)> = None;
        for _ in 0..ATTEMPTS {
            let next = loop {
                let Some((generation, record)) = newest(repo, system_id).await? else { break 1 };
                if record.released || lease.is_own_restart(&record) {
                    break generation + 1;
                }
                let held = || LeaseError::Held {
                    system_id,
                    holder: record.holder.clone(),
                    pid: record.pid,
                    expires: format_rfc3339_seconds(record.expires_us),
                };
                if record.expires_us > wall() {
                    return Err(held());
                }
                // Expired by our wall clock, which may run ahead: the holder must also have
                // failed to renew for a whole TTL by our monotonic clock.
                let watch_for = ttl.max(Duration::from_micros(record.ttl_us.max(0) as u64));
                match watched {
                    Some((g, since)) if g == generation => {
                        if since.elapsed() >= watch_for {
                            break generation + 1;
                        }
                    }
                    // Renewed (or taken by someone else) while we watched: alive, whatever the
                    // clocks say.
                    Some(_) => return Err(held()),
                    None => {
                        tracing::info!(holder = %record.holder, pid = record.pid, watch_for = ?watch_for,
                            "the writer lease has expired by this host's clock; taking it over if it is not renewed meanwhile");
                        watched = Some((generation, Instant::now()));
                    }
                }
                tokio::time::sleep((watch_for / 8).clamp(Duration::from_millis(5), Duration::from_secs(1))).await;
            };
            if lease.put(next, false).await? {
                return Ok(lease);
            }
            // Someone created that generation first: look again.
        }
        Err(LeaseError::Contended { system_id, attempts: ATTEMPTS })
    }

    /// A generation written by an earlier process of this very holder on this host, one that is
    /// gone: a restart after a crash, which takes its lease back at once. A process of the same
    /// name still running (or on another host, when two hosts were given one `lease_holder`) is
    /// a contender like any other.
    fn is_own_restart(&self, record: &LeaseRecord) -> bool {
        record.holder == self.holder
            && record.incarnation != self.incarnation
            && (record.host.is_empty() || record.host == self.host)
            && !may_be_alive(record.pid)
    }

    /// The fence every WAL put of this holder passes first.
    pub fn guard(&self) -> LeaseGuard {
        self.guard.clone()
    }

    /// Creates `generation`; whether it did (false: someone else created it first).
    async fn put(&mut self, generation: u64, released: bool) -> Result<bool, LeaseError> {
        // The validity starts before the request: whatever a contender later sees was created
        // after this instant.
        let started = Instant::now();
        self.guard.fence.state.send_modify(|s| s.pending = generation);
        let ttl_us = self.ttl.as_micros() as i64;
        let record = LeaseRecord {
            holder: self.holder.clone(),
            pid: std::process::id(),
            expires_us: if released { now_us() - 1 } else { now_us() + ttl_us },
            host: self.host.clone(),
            incarnation: self.incarnation.clone(),
            ttl_us,
            released,
        };
        let name = pg::lease(self.system_id, generation);
        match self.repo.put_sealed(&name, record.to_text().into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await {
            Ok(PutOutcome::Created) => {}
            Ok(PutOutcome::AlreadyExists) | Err(RepositoryError::Conflict { .. }) => {
                let ours = self.generation;
                self.guard.fence.state.send_modify(|s| s.pending = ours);
                return Ok(false);
            }
            // The put may still have landed: `pending` stays, so our own generation is not
            // taken for a takeover.
            Err(e) => return Err(e.into()),
        }
        let previous = self.generation;
        self.generation = generation;
        let valid_until = (!released).then(|| started + self.ttl - safety_margin(self.ttl));
        self.guard.fence.state.send_modify(|s| {
            s.generation = generation;
            s.pending = generation;
            s.valid_until = valid_until;
        });
        // Older generations are history; removing them keeps listing cheap.
        for g in previous.max(generation.saturating_sub(8))..generation {
            let _ = self.repo.delete(&pg::lease(self.system_id, g)).await;
        }
        Ok(true)
    }

    /// Extends the lease; fails with `Lost` if another process holds a newer generation. Any
    /// failure leaves the lease unconfirmed (WAL puts wait) until a later renewal succeeds.
    ///
    /// A lease whose every generation is gone (deleted by hand, or a repository restored from a
    /// copy) is put again past ours: renewing must never succeed without a lease in the
    /// repository, or a second writer could take generation 1 and both would write.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let result = self.try_renew().await;
        self.settle(result)
    }

    /// [`Lease::renew`], given at most `limit`: a renewal that takes longer counts as failed.
    pub async fn renew_within(&mut self, limit: Duration) -> Result<(), LeaseError> {
        let result = match tokio::time::timeout(limit, self.try_renew()).await {
            Ok(result) => result,
            Err(_) => Err(LeaseError::Timeout { system_id: self.system_id, after: limit }),
        };
        self.settle(result)
    }

    async fn try_renew(&mut self) -> Result<(), LeaseError> {
        let current = newest(&self.repo, self.system_id).await?;
        if let Some((generation, record)) = &current {
            // A newer generation of our own incarnation is a renewal whose answer we missed.
            if *generation > self.generation && record.incarnation != self.incarnation {
                return Err(LeaseError::Lost { system_id: self.system_id, holder: record.holder.clone() });
            }
        }
        let next = current.map_or(0, |(g, _)| g).max(self.generation) + 1;
        if !self.put(next, false).await? {
            let holder = newest_holder(&self.repo, self.system_id).await;
            return Err(LeaseError::Lost { system_id: self.system_id, holder });
        }
        Ok(())
    }

    fn settle(&self, result: Result<(), LeaseError>) -> Result<(), LeaseError> {
        if let Err(e) = &result {
            let lost = match e {
                LeaseError::Lost { holder, .. } => Some(holder.clone()),
                _ => None,
            };
            self.guard.fence.state.send_modify(|s| {
                s.valid_until = None;
                if lost.is_some() {
                    s.lost = lost;
                }
            });
        }
        result
    }

    /// Gives the lease up (on a clean stop) so another writer need not wait for it to expire:
    /// a newer generation marked released. Does nothing if someone else holds it now. From here
    /// on the guard lets nothing through.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        self.guard.fence.state.send_modify(|s| {
            s.released = true;
            s.valid_until = None;
        });
        for _ in 0..3 {
            let Some((generation, record)) = newest(&self.repo, self.system_id).await? else { return Ok(()) };
            if record.incarnation != self.incarnation {
                return Ok(());
            }
            if self.put(generation + 1, true).await? {
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
        // A restart of the same holder (after a crash: the lease was never released; the same
        // pid here, as a restarted container has) takes it back at once.
        let a2 = Lease::acquire(&r, 1, "host-a/pitr_main", Duration::from_secs(60)).await.unwrap();
        // The earlier process of that holder, were it still alive, has lost: the holder name
        // alone does not let two processes write.
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "host-a/pitr_main"), "{err}");
        assert!(!a.guard().is_confirmed());
        assert!(matches!(a.guard().check().await, Err(LeaseError::Lost { .. })));
        a2.release().await.unwrap();
        Lease::acquire(&r, 1, "host-b/pitr_main", Duration::from_secs(60)).await.unwrap();
    }

    /// Plants generation `generation` as written by `pid` of `holder` on this host.
    async fn plant(r: &Repository, system_id: u64, generation: u64, holder: &str, pid: u32) {
        let record = LeaseRecord {
            holder: holder.into(),
            pid,
            expires_us: now_us() + 60_000_000,
            host: crate::hostname(),
            incarnation: "0123456789abcdef".into(),
            ttl_us: 60_000_000,
            released: false,
        };
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        r.put_sealed(&pg::lease(system_id, generation), record.to_text().into_bytes(), meta).await.unwrap();
    }

    #[tokio::test]
    async fn a_restart_takes_its_lease_back_at_once_only_if_the_old_process_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        // Killed and reaped (kill -9, then the restart): its pid no longer runs.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        plant(&r, 10, 1, "host-a/pitr_main", gone.id()).await;
        Lease::acquire(&r, 10, "host-a/pitr_main", Duration::from_secs(60)).await.unwrap();
        // Still running (paused, hung): a contender like any other, refused while the lease lasts.
        plant(&r, 11, 1, "host-a/pitr_main", 1).await;
        let err = Lease::acquire(&r, 11, "host-a/pitr_main", Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LeaseError::Held { pid: 1, .. }), "{err}");
    }

    #[tokio::test]
    async fn an_expired_lease_can_be_taken_and_the_loser_notices() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let mut a = Lease::acquire(&r, 2, "a", Duration::from_millis(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let b = Lease::acquire(&r, 2, "b", Duration::from_millis(50)).await.unwrap();
        assert!(b.guard().is_confirmed());
        b.guard().check().await.unwrap();
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "b"), "{err}");
    }

    #[tokio::test]
    async fn a_contender_whose_clock_runs_ahead_cannot_take_a_live_lease() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let ttl = Duration::from_millis(600);
        let mut a = Lease::acquire(&r, 4, "a", ttl).await.unwrap();
        // The holder renews every third of its TTL, as the lease keeper does.
        let keeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                a.renew().await.unwrap();
            }
        });
        // An hour ahead: by its wall clock the lease expired long ago.
        let ahead = || now_us() + 3_600_000_000;
        let started = Instant::now();
        let err = Lease::acquire_by_clock(&r, 4, "b", ttl, &ahead).await.unwrap_err();
        assert!(matches!(err, LeaseError::Held { ref holder, .. } if holder == "a"), "{err}");
        assert!(started.elapsed() < ttl, "it saw the renewal within a third of the TTL");
        keeper.abort();

        // The holder is gone (no renewals): the same contender takes it once a whole TTL has
        // passed on its own monotonic clock, and not sooner.
        let started = Instant::now();
        let b = Lease::acquire_by_clock(&r, 4, "b", ttl, &ahead).await.unwrap();
        assert!(started.elapsed() >= ttl, "taken after {:?}", started.elapsed());
        b.guard().check().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_renewal_stops_puts_until_a_later_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let mut a = Lease::acquire(&r, 5, "a", Duration::from_secs(60)).await.unwrap();
        let guard = a.guard();
        assert!(guard.is_confirmed());
        // A renewal that cannot finish in time (storage hanging) counts as failed.
        let err = a.renew_within(Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, LeaseError::Timeout { .. }), "{err}");
        assert!(!guard.is_confirmed());
        let waiting = tokio::spawn({
            let guard = guard.clone();
            async move { guard.check().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a put went through an unconfirmed lease");
        a.renew().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
        assert!(guard.is_confirmed());
    }

    #[tokio::test]
    async fn the_lease_expires_by_the_monotonic_clock_and_a_takeover_is_found_before_a_put() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let ttl = Duration::from_millis(400);
        let a = Lease::acquire(&r, 6, "a", ttl).await.unwrap();
        let guard = a.guard();
        assert!(guard.is_confirmed());
        // Not renewed (a stopped process): no longer confirmed once ttl - ttl/4 has passed.
        tokio::time::sleep(ttl - safety_margin(ttl) + Duration::from_millis(20)).await;
        assert!(!guard.is_confirmed());
        // Expired by the wall clock too, then watched for a TTL: taken.
        tokio::time::sleep(safety_margin(ttl)).await;
        let _b = Lease::acquire(&r, 6, "b", ttl).await.unwrap();
        // The guard itself (no renewal involved) finds the newer generation.
        guard.fence.state.send_modify(|s| s.valid_until = Some(Instant::now() + ttl));
        let err = guard.check().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "b"), "{err}");
        assert_eq!(guard.lost_to().as_deref(), Some("b"));
        assert!(!guard.is_confirmed());
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_at_once_and_lets_nothing_through() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let a = Lease::acquire(&r, 8, "a", Duration::from_secs(60)).await.unwrap();
        let guard = a.guard();
        a.release().await.unwrap();
        assert!(matches!(guard.check().await, Err(LeaseError::Released { .. })));
        let started = Instant::now();
        Lease::acquire(&r, 8, "b", Duration::from_secs(60)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
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
        // and the other writer learns it lost at its next renewal (or its next put's check).
        for o in r.list(&pg::lease_prefix(3)).await.unwrap() {
            r.delete(&o.name).await.unwrap();
        }
        let mut b = Lease::acquire(&r, 3, "b", Duration::from_secs(60)).await.unwrap();
        a.renew().await.unwrap();
        let err = b.guard().check().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "a"), "{err}");
        let err = b.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "a"), "{err}");
    }

    /// A store on which a rival process creates every lease generation a moment before us, and
    /// releases it at once (as a sidecar that starts and stops cleanly would).
    #[derive(Debug)]
    struct Raced {
        inner: Arc<LocalStore>,
        rival: Repository,
    }

    #[async_trait::async_trait]
    impl crate::Store for Raced {
        async fn put_if_absent(&self, name: &str, data: bytes::Bytes) -> Result<PutOutcome, crate::StoreError> {
            if pg::is_lease(name) {
                let record = "holder=rival\npid=1\nexpires_us=0\nreleased=true\n".to_string();
                let meta = ObjectMeta::plain(ObjectKind::Meta);
                self.rival.put_sealed(name, record.into_bytes(), meta).await.expect("the rival's put");
            }
            self.inner.put_if_absent(name, data).await
        }
        async fn get(&self, name: &str) -> Result<bytes::Bytes, crate::StoreError> {
            self.inner.get(name).await
        }
        async fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<bytes::Bytes, crate::StoreError> {
            self.inner.get_range(name, range).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<crate::ObjectInfo>, crate::StoreError> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, name: &str) -> Result<(), crate::StoreError> {
            self.inner.delete(name).await
        }
        async fn head(&self, name: &str) -> Result<Option<crate::ObjectInfo>, crate::StoreError> {
            self.inner.head(name).await
        }
        fn location(&self) -> String {
            self.inner.location()
        }
    }

    #[tokio::test]
    async fn contended_when_every_generation_is_taken_first() {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(LocalStore::new(dir.path()));
        let rival = Repository::new(inner.clone(), KeyRing::from_key("k", [5; 32]));
        let raced = Repository::new(Arc::new(Raced { inner, rival }), KeyRing::from_key("k", [5; 32]));
        let err = Lease::acquire(&raced, 9, "a", Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LeaseError::Contended { attempts: ATTEMPTS, .. }), "{err}");
        assert!(err.to_string().contains("more than one sidecar"), "{err}");
        // Each attempt went for the generation after the rival's newest.
        assert_eq!(newest_generation(&raced, 9).await.unwrap(), Some(u64::from(ATTEMPTS)));
    }

    #[test]
    fn records_of_older_versions_still_parse() {
        let r = LeaseRecord::parse("x", "holder=h/s\npid=7\nexpires_us=12\n").unwrap();
        assert_eq!((r.host.as_str(), r.incarnation.as_str(), r.ttl_us, r.released), ("", "", 0, false));
        let err = LeaseRecord::parse("x", "pid=7\nexpires_us=12\n").unwrap_err();
        assert!(err.to_string().contains("no holder"), "{err}");
    }
}
