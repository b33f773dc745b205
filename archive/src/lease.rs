//! One WAL writer per cluster: a lease taken with conditional puts, renewed, released — and a
//! fence that every write of the holder passes.
//!
//! Object storage is the only shared state, and puts are create-only, so a lease is a sequence of
//! generations, `pg/<system id>/lease/<generation>`: the newest one that opens (authenticates
//! and parses) is the lease. Taking or renewing it means creating the next free generation; two
//! contenders cannot both create it. An object under a lease name that does not open (planted,
//! or sealed with another key) is skipped with a warning naming it: it is nobody's lease, and it
//! must not stop a writer nor a start.
//!
//! Who may take it:
//! - nobody holds it, or its holder released it (a clean stop): at once;
//! - the same holder restarting after a crash (same holder name, same host, same boot of the same
//!   kernel, same PID namespace, and the process that wrote the newest generation is provably
//!   gone): at once;
//! - anyone else: only once the newest generation has expired by the contender's wall clock *and*
//!   the contender has watched it stay the newest for a full TTL (the longer of its own and the
//!   holder's) on its own monotonic clock. A live holder renews every third of its TTL, so it always
//!   creates a newer generation within that time: a contender whose wall clock runs ahead (or a
//!   holder whose clock runs behind) cannot take a live lease; it sees the renewal and refuses. A
//!   generation whose expiry lies further ahead than its own TTL allows (the holder's clock runs
//!   ahead, or it is dead with such a clock) is judged by the monotonic watch alone.
//!
//! How the holder keeps to it (the fence, [`LeaseGuard`]): the lease is *confirmed* from the start
//! of the put that created its newest generation until `ttl - ttl/4` later, measured on
//! `CLOCK_BOOTTIME` ([`BootTime`]: it keeps running while the process is stopped, and, unlike
//! [`Instant`], while the host or VM is suspended). A renewal that fails for any
//! reason, or takes longer than a third of the TTL, makes it unconfirmed until a later renewal
//! succeeds. Before each write the holder waits for the lease to be confirmed, then lists the
//! lease prefix (one LIST request) and stops with [`LeaseError::Lost`] if a newer generation than
//! its own opens, then checks the monotonic clock again; and the write itself runs only until the
//! validity of the newest generation created ends ([`LeaseGuard::fenced`]): past it the write's
//! future is dropped, which cancels its requests, its retries and a multipart upload's
//! completion. A contender's monotonic TTL starts no earlier than the holder's newest generation
//! was created, which is after the holder's validity started; so every request of the holder is
//! sent at least `ttl/4` before the earliest takeover. What remains: a request already sent when
//! the validity ends may still be carried out by the storage server afterwards (its body was on
//! the wire); `ttl/4` (15 s at the default TTL of 60 s) is the margin for it to land first.

use std::collections::BTreeSet;
use std::future::Future;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::names::pg;
use crate::now_us;
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::{PutOutcome, StoreError};
use crate::time::format_rfc3339_seconds;

/// How many times a contender tries to create the next generation before giving up.
const ATTEMPTS: u32 = 5;

/// Older generations a renewal deletes at most (the rest go with the next renewals).
const TIDY_MAX: usize = 32;

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
    /// A renewal (or the release) did not finish in time; WAL puts wait until a later renewal
    /// succeeds.
    #[error("renewing the lease of cluster {system_id} took longer than {after:?}")]
    Timeout {
        /// The cluster's PostgreSQL system identifier.
        system_id: u64,
        /// How long it was given.
        after: Duration,
    },
    /// A write was still under way when the lease's validity ended (renewals failing or late):
    /// it was cancelled, and may be made again once the lease is confirmed.
    #[error(
        "the writer lease of cluster {system_id} ran out while a write was under way (its renewals failed or are \
         late): the write was cancelled"
    )]
    Expired {
        /// The cluster's PostgreSQL system identifier.
        system_id: u64,
    },
    /// The lease was given up (a clean stop): nothing more is written under it.
    #[error("the lease of cluster {system_id} was released; nothing more is written for it")]
    Released {
        /// The cluster's PostgreSQL system identifier.
        system_id: u64,
    },
    /// A lease generation opened but lacks a field (`holder`, `pid`, `expires_us`), or no
    /// generation number is left above the newest.
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
    /// The writer's kernel boot (`/proc/sys/kernel/random/boot_id`; empty if unknown): a pid
    /// means something only within one boot.
    boot_id: String,
    /// The writer's PID namespace (`/proc/self/ns/pid`; empty if unknown): a pid means something
    /// only within one namespace (in containers pitr is often PID 1 in each).
    pid_ns: String,
}

impl LeaseRecord {
    fn to_text(&self) -> String {
        format!(
            "holder={}\npid={}\nexpires_us={}\nhost={}\nincarnation={}\nttl_us={}\nreleased={}\nboot_id={}\npid_ns={}\n",
            self.holder,
            self.pid,
            self.expires_us,
            self.host,
            self.incarnation,
            self.ttl_us,
            self.released,
            self.boot_id,
            self.pid_ns
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
            boot_id: String::new(),
            pid_ns: String::new(),
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
                Some(("boot_id", v)) => record.boot_id = v.to_string(),
                Some(("pid_ns", v)) => record.pid_ns = v.to_string(),
                _ => {}
            }
        }
        record.holder = holder.ok_or_else(|| bad("no holder"))?;
        record.pid = pid.ok_or_else(|| bad("no pid"))?;
        record.expires_us = expires_us.ok_or_else(|| bad("no expiry"))?;
        Ok(record)
    }
}

/// Whether a read of a lease generation failed because the object itself is not a lease (it does
/// not authenticate, is not a record, or is too big to be one), as opposed to storage failing.
fn does_not_open(e: &LeaseError) -> bool {
    match e {
        LeaseError::Malformed { .. } => true,
        LeaseError::Repository(e) => e.is_untrusted_object(),
        _ => false,
    }
}

/// Generations already reported as not opening, so that each is warned about once per process.
fn warn_once_does_not_open(name: &str, error: &LeaseError) {
    static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = WARNED.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
    if first {
        tracing::warn!(object = %name, error = %error,
            "a writer lease generation does not open (planted, or sealed with another key): it is nobody's lease and is skipped; delete it");
    }
}

/// Reads generation `generation`: `Ok(None)` if it does not open (warned about), or is gone.
async fn open_generation(repo: &Repository, system_id: u64, generation: u64) -> Result<Opened, LeaseError> {
    let name = pg::lease(system_id, generation);
    let read = match repo.get_record(&name).await {
        Ok((_, text)) => LeaseRecord::parse(&name, &String::from_utf8_lossy(&text)),
        Err(RepositoryError::Store(e)) if e.is_not_found() => return Ok(Opened::Gone),
        Err(e) => Err(e.into()),
    };
    match read {
        Ok(record) => Ok(Opened::Record(record)),
        Err(e) if does_not_open(&e) => {
            warn_once_does_not_open(&name, &e);
            Ok(Opened::Junk)
        }
        Err(e) => Err(e),
    }
}

enum Opened {
    Record(LeaseRecord),
    /// The name holds something that is not a lease.
    Junk,
    /// Deleted since it was listed (its holder renewed in between).
    Gone,
}

/// The generations listed, by number.
async fn listed_generations(repo: &Repository, system_id: u64) -> Result<BTreeSet<u64>, LeaseError> {
    // One level, names only: the guard lists before every WAL put, and a local store reads one
    // directory in place (no hand-off to another thread on a synchronous commit's path).
    Ok(repo
        .list_children(&pg::lease_prefix(system_id))
        .await?
        .iter()
        .filter_map(|name| pg::parse_lease(system_id, name))
        .collect())
}

/// Every listed lease generation that is nobody's lease (does not open, or is not a lease
/// record), with why, for `verify`: the sidecar skips them, but someone could write to the bucket.
pub async fn untrusted_generations(repo: &Repository, system_id: u64) -> Result<Vec<(String, String)>, LeaseError> {
    let mut out = Vec::new();
    for generation in listed_generations(repo, system_id).await? {
        let name = pg::lease(system_id, generation);
        let read = match repo.get_record(&name).await {
            Ok((_, text)) => LeaseRecord::parse(&name, &String::from_utf8_lossy(&text)).map(|_| ()),
            // Renewed and tidied away since the listing.
            Err(RepositoryError::Store(e)) if e.is_not_found() => continue,
            Err(e) => Err(e.into()),
        };
        match read {
            Ok(()) => {}
            Err(e) if does_not_open(&e) => out.push((name, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What one look at the lease prefix found.
#[derive(Debug, Default)]
struct Generations {
    /// The newest generation that opens, and its record.
    current: Option<(u64, LeaseRecord)>,
    /// Every generation name listed, whether it opens or not.
    listed: BTreeSet<u64>,
}

impl Generations {
    /// The first generation number above both the current one and `ours` that no object holds
    /// (names that do not open are skipped, not overwritten: puts are create-only).
    fn next_after(&self, system_id: u64, ours: u64) -> Result<u64, LeaseError> {
        let mut next = self.current.as_ref().map_or(0, |(g, _)| *g).max(ours);
        loop {
            next = next.checked_add(1).ok_or_else(|| LeaseError::Malformed {
                name: pg::lease_prefix(system_id),
                what: "no generation number is left above the newest".into(),
            })?;
            if !self.listed.contains(&next) {
                return Ok(next);
            }
        }
    }
}

/// The newest generation that opens and its record, with every name listed. The holder deletes
/// older generations as it renews, so the newest listed may be gone when read: then a newer one
/// exists, and the listing is redone.
async fn newest(repo: &Repository, system_id: u64) -> Result<Generations, LeaseError> {
    let mut attempt = 0;
    'listing: loop {
        let listed = listed_generations(repo, system_id).await?;
        for &generation in listed.iter().rev() {
            match open_generation(repo, system_id, generation).await? {
                Opened::Record(record) => return Ok(Generations { current: Some((generation, record)), listed }),
                Opened::Junk => continue,
                Opened::Gone if attempt < 5 => {
                    attempt += 1;
                    continue 'listing;
                }
                Opened::Gone => {
                    let name = pg::lease(system_id, generation);
                    return Err(RepositoryError::Store(StoreError::NotFound { name, location: repo.location() }).into());
                }
            }
        }
        return Ok(Generations { current: None, listed });
    }
}

/// This kernel's boot id ("" if unknown).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// This process's PID namespace, as `/proc/self/ns/pid` names it ("" if unknown).
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Whether process `pid` of our own PID namespace may still run. Without `/proc` nobody can
/// tell: assume it does (the safe answer: the restart then waits like any contender).
fn may_be_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        // Our own pid in our own namespace: this process has it, so the one that wrote it is gone
        // (this process's own lease has its own incarnation).
        return false;
    }
    !std::path::Path::new("/proc/self").exists() || std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A reading of the clock the holder measures its validity on: `CLOCK_BOOTTIME`, which, unlike
/// [`Instant`] (`CLOCK_MONOTONIC`), keeps running while the host or VM is suspended — a holder
/// suspended past its TTL must not trust its lease for the suspended time on waking. (Elsewhere
/// than Linux: the monotonic clock.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootTime(Duration);

impl BootTime {
    /// Now.
    pub fn now() -> BootTime {
        #[cfg(target_os = "linux")]
        const CLOCK: libc::clockid_t = libc::CLOCK_BOOTTIME;
        #[cfg(not(target_os = "linux"))]
        const CLOCK: libc::clockid_t = libc::CLOCK_MONOTONIC;
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec that clock_gettime only writes into.
        let rc = unsafe { libc::clock_gettime(CLOCK, &mut ts) };
        if rc != 0 {
            // Never on Linux since 2.6.39; the process's own monotonic clock is the next best.
            static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            return BootTime(START.get_or_init(Instant::now).elapsed());
        }
        BootTime(Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32))
    }

    /// How long from now until this moment (zero once it has passed).
    fn left(self) -> Duration {
        self.0.saturating_sub(BootTime::now().0)
    }
}

impl std::ops::Add<Duration> for BootTime {
    type Output = BootTime;
    fn add(self, d: Duration) -> BootTime {
        BootTime(self.0.saturating_add(d))
    }
}

/// What the fence knows, shared by the lease and its guards.
#[derive(Debug, Clone, Default)]
struct FenceState {
    /// The newest generation this process created.
    generation: u64,
    /// A generation this process is creating (its put may land before we hear of it).
    pending: u64,
    /// Until when the lease is confirmed, by the monotonic clock; `None`: not confirmed (a
    /// renewal failed).
    valid_until: Option<BootTime>,
    /// Until when writes already under way may run: the end of the validity of the newest
    /// generation created, which a failed renewal does not shorten (it only stops new writes).
    writes_until: Option<BootTime>,
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
    /// The lease's incarnation: which generations are this process's own.
    incarnation: String,
    /// Asks the lease keeper for a renewal now (a put found the lease unconfirmed).
    renew_now: Notify,
}

/// What every write of the lease's holder passes (see the module's documentation).
/// Cheap to clone; all clones and the [`Lease`] share one state.
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    fence: Arc<Fence>,
}

impl LeaseGuard {
    /// Whether the lease is confirmed now by this process's monotonic clock (and not lost).
    pub fn is_confirmed(&self) -> bool {
        let s = self.fence.state.borrow();
        s.lost.is_none() && !s.released && s.valid_until.is_some_and(|t| BootTime::now() < t)
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

    /// The check before a write: the lease is confirmed by the monotonic clock (waiting until
    /// it is), no newer generation than ours that opens exists in storage (one LIST; a newer name
    /// is opened before it counts; one this process may be creating counts as ours only if its
    /// record says so), and the lease is still confirmed after that. `Lost` if
    /// another writer took over; a storage error if the listing failed (the put is then retried
    /// like one that failed).
    pub async fn check(&self) -> Result<(), LeaseError> {
        let system_id = self.fence.system_id;
        let mut gone = 0;
        loop {
            self.confirmed().await?;
            let listed = listed_generations(&self.fence.repo, system_id).await?;
            let (ours, pending) = {
                let s = self.fence.state.borrow();
                (s.generation, s.pending)
            };
            let mut relist = false;
            for &generation in listed.range((Bound::Excluded(ours), Bound::Unbounded)).rev() {
                match open_generation(&self.fence.repo, system_id, generation).await? {
                    Opened::Record(record) => {
                        // A renewal of ours that landed (perhaps with its answer lost).
                        if generation <= pending && record.incarnation == self.fence.incarnation {
                            continue;
                        }
                        let holder = record.holder;
                        self.fence.state.send_modify(|s| s.lost = Some(holder.clone()));
                        return Err(LeaseError::Lost { system_id, holder });
                    }
                    Opened::Junk => {}
                    // Only a holder deletes generations, and only older ones than its own: a
                    // newer one exists. Look again.
                    Opened::Gone => {
                        relist = true;
                        break;
                    }
                }
            }
            if relist {
                gone += 1;
                if gone > 5 {
                    let name = pg::lease_prefix(system_id);
                    let what = "newer generations keep disappearing while being read".to_string();
                    return Err(LeaseError::Malformed { name, what });
                }
                continue;
            }
            if self.is_confirmed() {
                return Ok(());
            }
        }
    }

    /// Makes `write` (a put or delete for the cluster) under the lease: [`LeaseGuard::check`]
    /// first, then `write` runs only while the validity of the newest generation this process
    /// created lasts (a renewal meanwhile extends it). Past it, or once the lease is lost or
    /// released, the write's future is dropped, which cancels its requests and retries, and this
    /// returns [`LeaseError::Expired`] (or the loss). Time spent waiting for a request slot counts
    /// too: the deadline comes from the lease, not from when the check ran.
    pub async fn fenced<T>(&self, write: impl Future<Output = T>) -> Result<T, LeaseError> {
        self.check().await?;
        tokio::select! {
            biased;
            stop = self.writes_end() => Err(stop),
            done = write => Ok(done),
        }
    }

    /// Resolves when writes under way must stop: the validity ran out by the monotonic clock
    /// without a renewal extending it, or the lease was lost or released.
    async fn writes_end(&self) -> LeaseError {
        let mut changes = self.fence.state.subscribe();
        loop {
            if let Some(e) = self.stopped() {
                return e;
            }
            let until = changes.borrow_and_update().writes_until;
            let Some(left) = until.map(BootTime::left).filter(|left| !left.is_zero()) else {
                return LeaseError::Expired { system_id: self.fence.system_id };
            };
            tokio::select! {
                // Tokio's timers run on the monotonic clock, which stops during a suspend: a
                // second at most, so that a write is cut within a second of waking.
                _ = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                // The sender lives as long as `self`: this only fails never.
                _ = changes.changed() => {}
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
    newest(repo, system_id).await.ok().and_then(|g| g.current).map(|(_, r)| r.holder).unwrap_or_default()
}

/// A lease this process holds.
#[derive(Debug)]
pub struct Lease {
    repo: Repository,
    system_id: u64,
    holder: String,
    host: String,
    boot_id: String,
    pid_ns: String,
    incarnation: String,
    ttl: Duration,
    generation: u64,
    /// When the put that created `generation` started: validity and renewals count from there.
    created_at: Instant,
    /// Older generations seen in the last listing, to delete ([`Lease::tidy`]).
    stale: Vec<u64>,
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
        let incarnation = format!("{:016x}", rand::random::<u64>());
        let fence = Arc::new(Fence {
            repo: repo.clone(),
            system_id,
            state,
            incarnation: incarnation.clone(),
            renew_now: Notify::new(),
        });
        let mut lease = Lease {
            repo: repo.clone(),
            system_id,
            holder: holder.to_string(),
            host: crate::hostname(),
            boot_id: boot_id(),
            pid_ns: pid_namespace(),
            incarnation,
            ttl,
            generation: 0,
            created_at: Instant::now(),
            stale: Vec::new(),
            guard: LeaseGuard { fence },
        };
        // The expired generation being watched, and since when (monotonic).
        let mut watched: Option<(u64, Instant)> = None;
        for _ in 0..ATTEMPTS {
            let (next, listed) = loop {
                let found = newest(repo, system_id).await?;
                let Some((generation, record)) = &found.current else {
                    break (found.next_after(system_id, 0)?, found.listed);
                };
                let generation = *generation;
                if record.released || lease.is_own_restart(record) {
                    break (found.next_after(system_id, 0)?, found.listed);
                }
                let held = || LeaseError::Held {
                    system_id,
                    holder: record.holder.clone(),
                    pid: record.pid,
                    expires: format_rfc3339_seconds(record.expires_us),
                };
                let watch_for = ttl.max(Duration::from_micros(record.ttl_us.max(0) as u64));
                // A live holder's expiry lies at most its TTL ahead (by its clock): one further
                // ahead says its clock runs fast, alive or dead, and only the watch can tell.
                let ahead_us = record.expires_us.saturating_sub(wall());
                let believable = ahead_us <= 2 * watch_for.as_micros().min(i64::MAX as u128) as i64;
                if ahead_us > 0 && believable {
                    return Err(held());
                }
                // Expired by our wall clock (which may run ahead), or an expiry not to be
                // believed: the holder must also have failed to renew for a whole TTL by our
                // monotonic clock.
                match watched {
                    Some((g, since)) if g == generation => {
                        if since.elapsed() >= watch_for {
                            break (found.next_after(system_id, 0)?, found.listed);
                        }
                    }
                    // Renewed (or taken by someone else) while we watched: alive, whatever the
                    // clocks say.
                    Some(_) => return Err(held()),
                    None => {
                        tracing::info!(holder = %record.holder, pid = record.pid, watch_for = ?watch_for,
                            "the writer lease has expired by this host's clock (or its expiry is implausibly far ahead); \
                             taking it over if it is not renewed meanwhile");
                        watched = Some((generation, Instant::now()));
                    }
                }
                tokio::time::sleep((watch_for / 8).clamp(Duration::from_millis(5), Duration::from_secs(1))).await;
            };
            if lease.put(next, false, &listed).await? {
                return Ok(lease);
            }
            // Someone created that generation first: look again.
        }
        Err(LeaseError::Contended { system_id, attempts: ATTEMPTS })
    }

    /// A generation written by an earlier process of this very holder on this host, one that is
    /// provably gone: a restart after a crash, which takes its lease back at once. A pid says
    /// which process wrote it only within one boot and one PID namespace (in containers pitr is
    /// PID 1 in each), so both must match ours. A process of the same name still running, on
    /// another host or in another namespace (two pods of one StatefulSet name in two clusters
    /// sharing a bucket) is a contender like any other.
    fn is_own_restart(&self, record: &LeaseRecord) -> bool {
        record.holder == self.holder
            && record.incarnation != self.incarnation
            && record.host == self.host
            && !self.boot_id.is_empty()
            && record.boot_id == self.boot_id
            && !self.pid_ns.is_empty()
            && record.pid_ns == self.pid_ns
            && !may_be_alive(record.pid)
    }

    /// The fence every write of this holder passes first.
    pub fn guard(&self) -> LeaseGuard {
        self.guard.clone()
    }

    /// When the next renewal is due: a third of the TTL after the put that created the newest
    /// generation started (validity counts from there, not from when the renewal ended).
    pub fn renewal_due(&self) -> Instant {
        self.created_at + self.ttl / 3
    }

    /// Creates `generation`; whether it did (false: someone else created it first). `listed`:
    /// the generations the listing before it showed (the older ones are deleted later).
    async fn put(&mut self, generation: u64, released: bool, listed: &BTreeSet<u64>) -> Result<bool, LeaseError> {
        // The validity starts before the request: whatever a contender later sees was created
        // after this instant.
        let (started, started_boot) = (Instant::now(), BootTime::now());
        self.guard.fence.state.send_modify(|s| s.pending = generation);
        let ttl_us = self.ttl.as_micros().min(i64::MAX as u128) as i64;
        let record = LeaseRecord {
            holder: self.holder.clone(),
            pid: std::process::id(),
            expires_us: if released { now_us() - 1 } else { now_us().saturating_add(ttl_us) },
            host: self.host.clone(),
            incarnation: self.incarnation.clone(),
            ttl_us,
            released,
            boot_id: self.boot_id.clone(),
            pid_ns: self.pid_ns.clone(),
        };
        let name = pg::lease(self.system_id, generation);
        let taken =
            match self.repo.put_sealed(&name, record.to_text().into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await
            {
                Ok(PutOutcome::Created) => false,
                Ok(PutOutcome::AlreadyExists) | Err(RepositoryError::Conflict { .. }) => true,
                // Created meanwhile by something that is not a lease: taken all the same.
                Err(e) if e.is_bad_object() => {
                    warn_once_does_not_open(&name, &e.into());
                    true
                }
                Err(RepositoryError::Store(StoreError::TooLarge { .. })) => true,
                // The put may still have landed: `pending` stays, so our own generation is not
                // taken for a takeover.
                Err(e) => return Err(e.into()),
            };
        if taken {
            let ours = self.generation;
            self.guard.fence.state.send_modify(|s| s.pending = ours);
            return Ok(false);
        }
        self.generation = generation;
        self.created_at = started;
        let valid_until = (!released).then(|| started_boot + (self.ttl - safety_margin(self.ttl)));
        self.guard.fence.state.send_modify(|s| {
            s.generation = generation;
            s.pending = generation;
            s.valid_until = valid_until;
            s.writes_until = valid_until;
        });
        // Older generations are history; removing them keeps listing cheap. Everything listed
        // below ours, so that a delete that failed is tried again with the next renewal.
        self.stale = listed.range(..generation).copied().collect();
        Ok(true)
    }

    /// Deletes generations older than ours that the last listing showed (at most a few dozen at
    /// a time); failures are left for the next renewal's listing to find again. Owns what it
    /// needs, so that the lease keeper can run it beside the next renewal.
    pub fn tidy(&mut self) -> impl Future<Output = ()> + Send + 'static {
        let stale: Vec<String> = self.stale.drain(..).take(TIDY_MAX).map(|g| pg::lease(self.system_id, g)).collect();
        let repo = self.repo.clone();
        async move {
            if stale.is_empty() {
                return;
            }
            if let Err(e) = repo.delete_many(&stale).await {
                tracing::debug!(error = %e, "could not delete older writer lease generations; the next renewal tries again");
            }
        }
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
        let found = newest(&self.repo, self.system_id).await?;
        if let Some((generation, record)) = &found.current {
            // A newer generation of our own incarnation is a renewal whose answer we missed.
            if *generation > self.generation && record.incarnation != self.incarnation {
                return Err(LeaseError::Lost { system_id: self.system_id, holder: record.holder.clone() });
            }
        }
        let next = found.next_after(self.system_id, self.generation)?;
        if !self.put(next, false, &found.listed).await? {
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
    /// on the guard lets nothing through. Given at most a third of the TTL (storage may be
    /// unreachable; the lease then expires as after a crash): a stop never hangs on it.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        self.guard.fence.state.send_modify(|s| {
            s.released = true;
            s.valid_until = None;
            s.writes_until = None;
        });
        let limit = self.ttl / 3;
        let system_id = self.system_id;
        match tokio::time::timeout(limit, self.try_release()).await {
            Ok(result) => result,
            Err(_) => Err(LeaseError::Timeout { system_id, after: limit }),
        }
    }

    async fn try_release(&mut self) -> Result<(), LeaseError> {
        for _ in 0..3 {
            let found = newest(&self.repo, self.system_id).await?;
            let Some((_, record)) = &found.current else { return Ok(()) };
            if record.incarnation != self.incarnation {
                return Ok(());
            }
            let next = found.next_after(self.system_id, self.generation)?;
            if self.put(next, true, &found.listed).await? {
                self.tidy().await;
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
        let record = record_of(holder, pid);
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
        // b watches the expired lease for its own TTL before taking it, then holds it for that
        // TTL: 2 s leaves the checks below room on a loaded machine (50 ms once lapsed in CI-like load).
        let b = Lease::acquire(&r, 2, "b", Duration::from_secs(2)).await.unwrap();
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
        let (store, r) = faulty(dir.path(), Faulty::default());
        let mut a = Lease::acquire(&r, 5, "a", Duration::from_secs(60)).await.unwrap();
        let guard = a.guard();
        assert!(guard.is_confirmed());
        // A renewal that cannot finish in time (storage hanging) counts as failed.
        store.hang_lease_puts.store(true, std::sync::atomic::Ordering::SeqCst);
        let err = a.renew_within(Duration::from_millis(50)).await.unwrap_err();
        store.hang_lease_puts.store(false, std::sync::atomic::Ordering::SeqCst);
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
        guard.fence.state.send_modify(|s| s.valid_until = Some(BootTime::now() + ttl));
        let err = guard.check().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "b"), "{err}");
        assert_eq!(guard.lost_to().as_deref(), Some("b"));
        assert!(!guard.is_confirmed());
    }

    #[tokio::test]
    async fn a_generation_we_may_be_creating_counts_as_ours_only_if_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let mut a = Lease::acquire(&r, 23, "a", Duration::from_secs(60)).await.unwrap();
        // Our renewal landed but its answer was lost: still ours.
        a.renew().await.unwrap();
        let guard = a.guard();
        guard.fence.state.send_modify(|s| s.generation = 1);
        guard.check().await.unwrap();
        // A renewal whose put failed, and another writer created that very generation since.
        guard.fence.state.send_modify(|s| s.pending = 3);
        plant(&r, 23, 3, "b", 1).await;
        let err = guard.check().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref holder, .. } if holder == "b"), "{err}");
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
        let (generation, record) = newest(&r, 3).await.unwrap().current.expect("the renewal put a lease back");
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
        assert_eq!(listed_generations(&raced, 9).await.unwrap().last().copied(), Some(u64::from(ATTEMPTS)));
    }

    /// A local store with faults switched on by the test: puts of WAL (not lease) objects that
    /// take a while, lease puts that hang, deletes that fail.
    #[derive(Debug, Default)]
    struct Faulty {
        inner: Option<Arc<LocalStore>>,
        slow_wal_puts: Duration,
        hang_lease_puts: std::sync::atomic::AtomicBool,
        fail_deletes: std::sync::atomic::AtomicBool,
    }

    impl Faulty {
        fn inner(&self) -> &LocalStore {
            self.inner.as_deref().expect("a store")
        }
    }

    #[async_trait::async_trait]
    impl crate::Store for Faulty {
        async fn put_if_absent(&self, name: &str, data: bytes::Bytes) -> Result<PutOutcome, crate::StoreError> {
            use std::sync::atomic::Ordering::SeqCst;
            if pg::is_lease(name) && self.hang_lease_puts.load(SeqCst) {
                std::future::pending::<()>().await;
            }
            if !pg::is_lease(name) {
                tokio::time::sleep(self.slow_wal_puts).await;
            }
            self.inner().put_if_absent(name, data).await
        }
        async fn get(&self, name: &str) -> Result<bytes::Bytes, crate::StoreError> {
            self.inner().get(name).await
        }
        async fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<bytes::Bytes, crate::StoreError> {
            self.inner().get_range(name, range).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<crate::ObjectInfo>, crate::StoreError> {
            self.inner().list(prefix).await
        }
        async fn delete(&self, name: &str) -> Result<(), crate::StoreError> {
            if self.fail_deletes.load(std::sync::atomic::Ordering::SeqCst) {
                let message = "injected failure".to_string();
                return Err(crate::StoreError::Backend {
                    op: "delete",
                    name: name.into(),
                    location: "faulty".into(),
                    message,
                });
            }
            self.inner().delete(name).await
        }
        async fn head(&self, name: &str) -> Result<Option<crate::ObjectInfo>, crate::StoreError> {
            self.inner().head(name).await
        }
        fn location(&self) -> String {
            self.inner().location()
        }
    }

    fn faulty(dir: &std::path::Path, faults: Faulty) -> (Arc<Faulty>, Repository) {
        let store = Arc::new(Faulty { inner: Some(Arc::new(LocalStore::new(dir))), ..faults });
        (store.clone(), Repository::new(store, KeyRing::from_key("k", [5; 32])))
    }

    #[tokio::test]
    async fn a_junk_lease_object_neither_stops_the_holder_nor_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        // Nothing but junk: nobody holds the lease.
        r.store().put_if_absent(&pg::lease(12, 5), bytes::Bytes::from_static(b"junk")).await.unwrap();
        let mut a = Lease::acquire(&r, 12, "a", Duration::from_secs(60)).await.unwrap();
        // Junk far ahead, and right at the next generation: neither is a takeover, and the
        // renewal goes past both.
        r.store().put_if_absent(&pg::lease(12, u64::MAX), bytes::Bytes::from_static(b"junk")).await.unwrap();
        let next = a.generation + 1;
        r.store().put_if_absent(&pg::lease(12, next), bytes::Bytes::from_static(b"junk")).await.unwrap();
        a.guard().check().await.unwrap();
        a.renew().await.unwrap();
        assert_eq!(a.generation, next + 1);
        a.guard().check().await.unwrap();
        let found = newest(&r, 12).await.unwrap();
        assert_eq!(found.current.map(|(g, rec)| (g, rec.holder)), Some((next + 1, "a".to_string())));
        // Another holder is refused (the lease is live), and takes it once released.
        let err = Lease::acquire(&r, 12, "b", Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LeaseError::Held { ref holder, .. } if holder == "a"), "{err}");
        a.release().await.unwrap();
        Lease::acquire(&r, 12, "b", Duration::from_secs(60)).await.unwrap();
        // No number left above the newest: an error, not an overflow.
        let full = Generations {
            current: Some((u64::MAX, newest(&r, 12).await.unwrap().current.unwrap().1)),
            listed: BTreeSet::new(),
        };
        assert!(matches!(full.next_after(12, 0), Err(LeaseError::Malformed { .. })));
    }

    #[tokio::test]
    async fn a_write_under_way_when_the_validity_ends_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let (_, r) = faulty(dir.path(), Faulty { slow_wal_puts: Duration::from_millis(1500), ..Faulty::default() });
        let ttl = Duration::from_millis(400);
        let a = Lease::acquire(&r, 13, "a", ttl).await.unwrap();
        let name = "pg/13/wal/00000001000000000000000A";
        let put = r.put_sealed(name, b"wal".to_vec(), ObjectMeta::plain(ObjectKind::Meta));
        let started = Instant::now();
        let err = a.guard().fenced(put).await.unwrap_err();
        assert!(matches!(err, LeaseError::Expired { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(1000), "cut at the validity's end: {:?}", started.elapsed());
        // Long after the put would have finished: nothing landed.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(r.store().head(name).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_renewal_lets_a_write_under_way_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (_, r) = faulty(dir.path(), Faulty { slow_wal_puts: Duration::from_millis(600), ..Faulty::default() });
        let ttl = Duration::from_millis(600);
        let mut a = Lease::acquire(&r, 14, "a", ttl).await.unwrap();
        let guard = a.guard();
        let renewing = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(ttl / 4).await;
                a.renew().await.unwrap();
            }
        });
        let name = "pg/14/wal/00000001000000000000000A";
        let put = r.put_sealed(name, b"wal".to_vec(), ObjectMeta::plain(ObjectKind::Meta));
        guard.fenced(put).await.unwrap().unwrap();
        assert!(r.store().head(name).await.unwrap().is_some());
        renewing.await.unwrap();
    }

    /// A record of `holder` on this host, written by `pid` in this boot and PID namespace.
    fn record_of(holder: &str, pid: u32) -> LeaseRecord {
        LeaseRecord {
            holder: holder.into(),
            pid,
            expires_us: now_us() + 60_000_000,
            host: crate::hostname(),
            incarnation: "0123456789abcdef".into(),
            ttl_us: 60_000_000,
            released: false,
            boot_id: boot_id(),
            pid_ns: pid_namespace(),
        }
    }

    async fn plant_record(r: &Repository, system_id: u64, record: &LeaseRecord) {
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        r.put_sealed(&pg::lease(system_id, 1), record.to_text().into_bytes(), meta).await.unwrap();
    }

    #[tokio::test]
    async fn our_pid_in_another_pid_namespace_or_boot_is_not_a_restart() {
        if boot_id().is_empty() || pid_namespace().is_empty() {
            // Without /proc nothing is ever taken for a restart (the safe side): nothing to show.
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let ours = std::process::id();
        // Two containers, each with pitr as the same pid, one hostname: the other one is alive.
        let other_ns = LeaseRecord { pid_ns: "pid:[1]".into(), ..record_of("h/s", ours) };
        plant_record(&r, 15, &other_ns).await;
        let err = Lease::acquire(&r, 15, "h/s", Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        let other_boot =
            LeaseRecord { boot_id: "00000000-0000-0000-0000-000000000000".into(), ..record_of("h/s", ours) };
        plant_record(&r, 16, &other_boot).await;
        let err = Lease::acquire(&r, 16, "h/s", Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        // Recorded before boot and namespace were: waits like any contender.
        let older = LeaseRecord { boot_id: String::new(), pid_ns: String::new(), ..record_of("h/s", ours) };
        plant_record(&r, 17, &older).await;
        assert!(Lease::acquire(&r, 17, "h/s", Duration::from_secs(60)).await.is_err());
        // The same boot and namespace, our pid: the process that wrote it is gone.
        plant_record(&r, 18, &record_of("h/s", ours)).await;
        Lease::acquire(&r, 18, "h/s", Duration::from_secs(60)).await.unwrap();
    }

    #[tokio::test]
    async fn a_dead_holder_whose_clock_ran_ahead_is_taken_after_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let ttl = Duration::from_millis(300);
        // Its expiry lies an hour ahead, ten thousand TTLs: its clock ran fast.
        let record = LeaseRecord {
            expires_us: now_us() + 3_600_000_000,
            ttl_us: ttl.as_micros() as i64,
            host: "elsewhere".into(),
            ..record_of("other", 1)
        };
        plant_record(&r, 19, &record).await;
        let started = Instant::now();
        let b = Lease::acquire(&r, 19, "b", ttl).await.unwrap();
        assert!(started.elapsed() >= ttl, "taken after {:?}", started.elapsed());
        b.guard().check().await.unwrap();
        // A believable expiry still refuses at once.
        plant_record(&r, 20, &LeaseRecord { ttl_us: 60_000_000, host: "elsewhere".into(), ..record_of("other", 1) })
            .await;
        let started = Instant::now();
        assert!(Lease::acquire(&r, 20, "b", ttl).await.is_err());
        assert!(started.elapsed() < ttl);
    }

    #[tokio::test]
    async fn a_release_on_unreachable_storage_gives_up_after_a_third_of_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let (store, r) = faulty(dir.path(), Faulty::default());
        let ttl = Duration::from_millis(600);
        let a = Lease::acquire(&r, 21, "a", ttl).await.unwrap();
        store.hang_lease_puts.store(true, std::sync::atomic::Ordering::SeqCst);
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(5), a.release()).await.expect("release hung").unwrap_err();
        assert!(matches!(err, LeaseError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < ttl, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn older_generations_whose_delete_failed_are_deleted_later() {
        let dir = tempfile::tempdir().unwrap();
        let (store, r) = faulty(dir.path(), Faulty::default());
        let mut a = Lease::acquire(&r, 22, "a", Duration::from_secs(60)).await.unwrap();
        store.fail_deletes.store(true, std::sync::atomic::Ordering::SeqCst);
        for _ in 0..3 {
            a.renew().await.unwrap();
            a.tidy().await;
        }
        assert_eq!(listed_generations(&r, 22).await.unwrap().len(), 4);
        store.fail_deletes.store(false, std::sync::atomic::Ordering::SeqCst);
        a.renew().await.unwrap();
        a.tidy().await;
        assert_eq!(listed_generations(&r, 22).await.unwrap(), BTreeSet::from([5]));
    }

    #[test]
    fn records_of_older_versions_still_parse() {
        let r = LeaseRecord::parse("x", "holder=h/s\npid=7\nexpires_us=12\n").unwrap();
        assert_eq!((r.host.as_str(), r.incarnation.as_str(), r.ttl_us, r.released), ("", "", 0, false));
        let err = LeaseRecord::parse("x", "pid=7\nexpires_us=12\n").unwrap_err();
        assert!(err.to_string().contains("no holder"), "{err}");
    }
}
