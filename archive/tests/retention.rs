//! Retention over a simulated clock, in a real `LocalStore` repository: 400 days of daily full
//! backups, incrementals on some days, missed days, blocks shared between backups, a failover to
//! timeline 2; `expire` every day. After each run, checked against a model written separately
//! from `retention.rs` (bucket keys from chrono's date formatting):
//! - the manifests left are exactly the GFS picks, the window base and what stopped after it, and
//!   their ancestors;
//! - every second of the window is restorable: the backup a restore to it would use (the newest
//!   one that stopped by then) has its chain and all WAL from its start to now;
//! - no block a surviving manifest references is gone, and every other block is;
//! - the WAL left is exactly what those backups and the window need, and every removed segment is
//!   below its timeline's recorded floor (what `pitr verify` relies on).
//!
//! Also: expire stopped after every possible number of deletes (a fault-injecting store wrapping
//! the real one) leaves a consistent repository, and a rerun finishes the job.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pitr_archive::backup::BackupManifest;
use pitr_archive::expire::{expire, ExpireOptions, ExpireReport};
use pitr_archive::names::pg;
use pitr_archive::retention::{floors_from_names, Policy, Reason};
use pitr_archive::running::{marker_name, RunKind};
use pitr_archive::seal::{ObjectKind, ObjectMeta};
use pitr_archive::{
    ClusterInfo, KeyRing, LocalStore, ObjectInfo, PutOutcome, Repository, Store, StoreError, WalLayout, WalObject,
};
use pitr_pgformat::timeline::HistoryEntry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SYS: u64 = 7;
const SEG: u64 = 16 << 20;
const DAY: i64 = 86_400_000_000;
const HOUR: i64 = 3_600_000_000;
// 2025-03-01 00:00:00 UTC.
const T0: i64 = 1_740_787_200_000_000;

fn cluster() -> ClusterInfo {
    ClusterInfo { system_id: SYS, wal_segment_size: SEG, wal_page_size: 8192, server_version_num: 170000 }
}

fn layout() -> WalLayout {
    WalLayout::new(&cluster())
}

#[derive(Debug, Clone)]
struct Made {
    id: String,
    parent: Option<String>,
    timeline: u32,
    start_lsn: u64,
    stop_lsn: u64,
    start_us: i64,
    stop_us: i64,
    blocks: Vec<String>,
}

/// The simulated cluster: its WAL position, timeline, data blocks, and what was written.
struct Sim {
    repo: Repository,
    rng: StdRng,
    lsn: u64,
    timeline: u32,
    /// Where timeline 2 began (the failover), once it has happened.
    switch: Option<u64>,
    /// The blocks of the current data (a full backup references all of them).
    data: Vec<String>,
    next_block: u64,
    made: Vec<Made>,
    /// Segments written, (timeline, segno).
    segments: BTreeSet<(u32, u64)>,
}

impl Sim {
    async fn new(dir: &std::path::Path, seed: u64) -> Sim {
        let repo = Repository::new(Arc::new(LocalStore::new(dir)), KeyRing::from_key("k", [9; 32]));
        repo.init().await.unwrap();
        repo.put_cluster_info(&cluster()).await.unwrap();
        let mut sim = Sim {
            repo,
            rng: StdRng::seed_from_u64(seed),
            lsn: 3 * SEG + 40,
            timeline: 1,
            switch: None,
            data: Vec::new(),
            next_block: 0,
            made: Vec::new(),
            segments: BTreeSet::new(),
        };
        for _ in 0..6 {
            let b = sim.new_block().await;
            sim.data.push(b);
        }
        sim
    }

    async fn new_block(&mut self) -> String {
        self.next_block += 1;
        let id = format!("{:02x}{:062x}", self.next_block % 256, self.next_block);
        self.repo.store().put_if_absent(&pg::block(SYS, &id), Bytes::from_static(b"block")).await.unwrap();
        id
    }

    /// WAL advances to `lsn`: every segment it passes is archived.
    async fn advance(&mut self, to: u64) {
        let l = layout();
        for segno in l.segno_of(self.lsn)..l.segno_of(to) {
            self.put_segment(self.timeline, segno).await;
        }
        self.lsn = to;
    }

    async fn put_segment(&mut self, timeline: u32, segno: u64) {
        let name = layout().object_name(&WalObject::Segment { timeline, segno });
        self.repo.store().put_if_absent(&name, Bytes::from_static(b"wal")).await.unwrap();
        self.segments.insert((timeline, segno));
    }

    /// A failover: timeline 2 begins at the current LSN; the old primary wrote one more segment
    /// on timeline 1 that nobody follows.
    async fn failover(&mut self) {
        let l = layout();
        let switch = self.lsn;
        let name = l.object_name(&WalObject::History { timeline: 2 });
        let text = HistoryEntry { timeline: 1, switch_lsn: switch }.line("failover");
        self.repo.put_sealed(&name, text.into_bytes(), ObjectMeta::plain(ObjectKind::TimelineHistory)).await.unwrap();
        self.put_segment(1, l.segno_of(switch)).await;
        self.put_segment(1, l.segno_of(switch) + 1).await;
        self.timeline = 2;
        self.switch = Some(switch);
    }

    async fn backup(&mut self, start_us: i64, incremental: bool) {
        let parent = if incremental {
            self.made.iter().filter(|m| m.timeline == self.timeline).max_by_key(|m| m.stop_lsn).map(|m| m.id.clone())
        } else {
            None
        };
        let incremental = parent.is_some();
        // Some data changes before every backup.
        let changes = self.rng.gen_range(1..=2);
        let mut changed = Vec::new();
        for _ in 0..changes {
            let i = self.rng.gen_range(0..self.data.len());
            let b = self.new_block().await;
            self.data[i] = b.clone();
            changed.push(b);
        }
        let blocks = if incremental { changed } else { self.data.clone() };
        // As take_backup does: a block not in the repository (swept since it was written) is
        // stored again.
        for b in &blocks {
            self.repo.store().put_if_absent(&pg::block(SYS, b), Bytes::from_static(b"block")).await.unwrap();
        }
        let jump = self.rng.gen_range(SEG / 4..2 * SEG);
        self.advance(self.lsn + jump).await;
        let start_lsn = self.lsn;
        let stop_lsn = start_lsn + self.rng.gen_range(1000..SEG);
        self.advance(stop_lsn).await;
        // The stop segment is archived before the manifest is written (take_backup waits for it).
        let l = layout();
        self.put_segment(self.timeline, l.segno_of(stop_lsn)).await;
        let stop_us = start_us + self.rng.gen_range(60_000_000..1_800_000_000);
        let id = chrono::DateTime::from_timestamp_micros(start_us).unwrap().format("%Y%m%dT%H%M%SZ").to_string();
        let manifest: BackupManifest = serde_json::from_value(serde_json::json!({
            "id": id,
            "kind": if incremental { "incremental" } else { "full" },
            "parent": parent,
            "system_id": SYS,
            "server_version_num": 170000,
            "timeline": self.timeline,
            "start_lsn": start_lsn,
            "stop_lsn": stop_lsn,
            "start_time_us": start_us,
            "stop_time_us": stop_us,
            "block_size": 1 << 20,
            "tablespaces": [],
            "entries": [],
            "files": [{ "path": "base/1/1", "size": 1, "mode": 384, "mtime": 0, "checksum": null, "blocks": blocks }],
            "server_manifest": "",
            "logical_bytes": 1,
            "stored_bytes": 1,
        }))
        .unwrap();
        assert_eq!(manifest.store(&self.repo).await.unwrap(), PutOutcome::Created);
        self.made.push(Made {
            id,
            parent: manifest.parent.clone(),
            timeline: self.timeline,
            start_lsn,
            stop_lsn,
            start_us,
            stop_us,
            blocks: manifest.files[0].blocks.clone(),
        });
    }

    /// One simulated day: maybe missed entirely, else a full at 02:00 (sometimes missed) and up
    /// to three incrementals.
    async fn day(&mut self, day: i64) {
        let midnight = T0 + day * DAY;
        if day == 200 {
            self.failover().await;
        }
        if self.rng.gen_bool(0.1) {
            let jump = self.rng.gen_range(0..2 * SEG);
            self.advance(self.lsn + jump).await;
            return;
        }
        if self.rng.gen_bool(0.85) || self.made.is_empty() {
            self.backup(midnight + 2 * HOUR, false).await;
        }
        let incrementals = if self.rng.gen_bool(0.4) { self.rng.gen_range(1..=3) } else { 0 };
        for i in 0..incrementals {
            self.backup(midnight + (6 + 5 * i) * HOUR, true).await;
        }
        let jump = self.rng.gen_range(0..SEG);
        self.advance(self.lsn + jump).await;
    }

    fn world(&self) -> World {
        World { made: self.made.clone(), segments: self.segments.clone(), switch: self.switch }
    }
}

/// What was made, to check a repository against.
struct World {
    made: Vec<Made>,
    segments: BTreeSet<(u32, u64)>,
    switch: Option<u64>,
}

impl World {
    /// The segments a restore from `b` reads, to the end of the archive: along timeline 2's
    /// history, the switch segment and later from timeline 2.
    fn recovery_segments(&self, b: &Made) -> Vec<(u32, u64)> {
        let l = layout();
        // The archive's end: the newest segment of the newest timeline.
        let latest = if self.switch.is_some() { 2 } else { 1 };
        let end = self.segments.iter().filter(|(t, _)| *t == latest).map(|(_, s)| *s).max().unwrap_or(0);
        let first = l.segno_of(b.start_lsn);
        match self.switch {
            Some(switch) if b.timeline == 1 => {
                let s = l.segno_of(switch);
                (first..s).map(|x| (1, x)).chain((s..=end).map(|x| (2, x))).collect()
            }
            _ => (first..=end).map(|x| (b.timeline, x)).collect(),
        }
    }
}

/// A scratch directory, on tmpfs where there is one: the store fsyncs every put and delete, and
/// thousands of those on a disk would dominate the run time.
fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn opts(policy: Policy, now_us: i64) -> ExpireOptions {
    ExpireOptions {
        policy,
        now_us,
        dry_run: false,
        stale_backup_after: Duration::from_secs(86_400),
        lock_ttl: Duration::from_secs(3600),
        keep_forever_lock: Duration::from_secs(86_400),
    }
}

/// The model: which backups should survive at `now`, computed from everything ever made.
fn expected(made: &[Made], policy: &Policy, now: i64) -> (BTreeSet<String>, Option<Made>) {
    let mut keep = BTreeSet::new();
    let formats =
        [("%Y-%m-%d", policy.daily), ("%G-W%V", policy.weekly), ("%Y-%m", policy.monthly), ("%Y", policy.yearly)];
    for (format, count) in formats {
        let mut newest: BTreeMap<String, &Made> = BTreeMap::new();
        for m in made {
            let key = chrono::DateTime::from_timestamp_micros(m.start_us).unwrap().format(format).to_string();
            let e = newest.entry(key).or_insert(m);
            if m.start_us > e.start_us {
                *e = m;
            }
        }
        // Keys of these formats sort in time order.
        for m in newest.values().rev().take(count as usize) {
            keep.insert(m.id.clone());
        }
    }
    let cut = now - policy.window_us;
    let base = made
        .iter()
        .filter(|m| m.stop_us <= cut)
        .max_by_key(|m| m.stop_us)
        .or_else(|| made.iter().min_by_key(|m| m.stop_us))
        .cloned();
    if let Some(base) = &base {
        keep.insert(base.id.clone());
        keep.extend(made.iter().filter(|m| m.stop_us > base.stop_us).map(|m| m.id.clone()));
    }
    let by_id: BTreeMap<&str, &Made> = made.iter().map(|m| (m.id.as_str(), m)).collect();
    for id in keep.clone() {
        let mut at = by_id[id.as_str()].parent.clone();
        while let Some(p) = at {
            keep.insert(p.clone());
            at = by_id[p.as_str()].parent.clone();
        }
    }
    (keep, base)
}

async fn names(repo: &Repository, prefix: &str) -> BTreeSet<String> {
    repo.list(prefix).await.unwrap().into_iter().map(|o| o.name).collect()
}

/// What must hold of any repository expire has touched (finished or not): every backup listed
/// has its chain, blocks and start..stop WAL; WAL is contiguous from each timeline's floor on;
/// and every second from `cut` to now is restorable.
async fn check_consistent(repo: &Repository, sim: &World, cut: i64, context: &str) {
    let l = layout();
    let listed = names(repo, &format!("pg/{SYS}/backups/")).await;
    let blocks = names(repo, &format!("pg/{SYS}/blocks/")).await;
    let wal = names(repo, &l.prefix()).await;
    let has = |t: u32, s: u64| wal.contains(&l.object_name(&WalObject::Segment { timeline: t, segno: s }));
    let floors = floors_from_names(SYS, names(repo, &pg::floors_prefix(SYS)).await.iter().map(|s| s.as_str()));
    let survivors: Vec<&Made> = sim.made.iter().filter(|m| listed.contains(&pg::backup_manifest(SYS, &m.id))).collect();
    let by_id: BTreeMap<&str, &Made> = survivors.iter().map(|m| (m.id.as_str(), *m)).collect();
    for m in &survivors {
        if let Some(p) = &m.parent {
            assert!(by_id.contains_key(p.as_str()), "{context}: {} is listed without its parent {p}", m.id);
        }
        for b in &m.blocks {
            assert!(blocks.contains(&pg::block(SYS, b)), "{context}: block {b} of surviving {} is gone", m.id);
        }
        for s in l.segno_of(m.start_lsn)..=l.segno_of(m.stop_lsn) {
            assert!(has(m.timeline, s), "{context}: WAL {}/{s} of surviving {} is gone", m.timeline, m.id);
        }
    }
    assert!(wal.contains(&l.object_name(&WalObject::History { timeline: 2 })) || sim.switch.is_none());
    for &(t, s) in &sim.segments {
        if !has(t, s) {
            assert!(
                floors.get(&t).is_some_and(|&f| s < f),
                "{context}: segment {t}/{s} removed above its floor {floors:?}"
            );
        }
    }
    // Restore to t uses the newest backup stopped by t; that changes only at stop times, so
    // checking the cut and each later stop covers every second of the window.
    let Some(first_stop) = sim.made.iter().map(|m| m.stop_us).min() else { return };
    let mut moments: Vec<i64> = vec![cut.max(first_stop)];
    moments.extend(survivors.iter().map(|m| m.stop_us).filter(|&s| s > cut));
    for t in moments {
        let Some(b) = survivors.iter().filter(|m| m.stop_us <= t).max_by_key(|m| m.stop_us) else {
            panic!("{context}: nothing to restore {t} from");
        };
        let mut at = Some(b.id.clone());
        while let Some(id) = at {
            let m = by_id.get(id.as_str()).unwrap_or_else(|| panic!("{context}: chain of {} broken at {id}", b.id));
            at = m.parent.clone();
        }
        for (tl, s) in sim.recovery_segments(b) {
            assert!(has(tl, s), "{context}: restoring to {t} from {} needs {tl}/{s}, which is gone", b.id);
        }
    }
}

async fn simulate(seed: u64, policy: Policy, days: i64) -> usize {
    let dir = scratch();
    let mut sim = Sim::new(dir.path(), seed).await;
    let l = layout();
    let mut removed_total = 0;
    for day in 0..days {
        sim.day(day).await;
        let now = T0 + day * DAY + 23 * HOUR;
        let report = expire(&sim.repo, &cluster(), &opts(policy, now)).await.unwrap();
        assert!(report.retained.is_empty() && report.blocks_skipped.is_none(), "{report:?}");
        removed_total += report.removed_backups.len();
        let context = format!("seed {seed}, day {day}");

        let (want, base) = expected(&sim.made, &policy, now);
        let listed: BTreeSet<String> = names(&sim.repo, &format!("pg/{SYS}/backups/"))
            .await
            .iter()
            .map(|n| n.trim_start_matches(&format!("pg/{SYS}/backups/")).trim_end_matches(".manifest").to_string())
            .collect();
        assert_eq!(listed, want, "{context}: survivors differ from the model");
        assert_eq!(report.window_base, base.as_ref().map(|b| b.id.clone()), "{context}");
        check_consistent(&sim.repo, &sim.world(), now - policy.window_us, &context).await;

        // Exactly the referenced blocks are left.
        let survivors: Vec<&Made> = sim.made.iter().filter(|m| want.contains(&m.id)).collect();
        let referenced: BTreeSet<String> =
            survivors.iter().flat_map(|m| m.blocks.iter()).map(|b| pg::block(SYS, b)).collect();
        assert_eq!(names(&sim.repo, &format!("pg/{SYS}/blocks/")).await, referenced, "{context}: blocks");

        // Exactly the WAL the survivors and the window need is left (all of it, before the first
        // backup).
        let Some(base) = base else {
            assert_eq!(report.removed_wal_objects, 0, "{context}");
            continue;
        };
        let mut need = BTreeSet::new();
        for m in &survivors {
            for s in l.segno_of(m.start_lsn)..=l.segno_of(m.stop_lsn) {
                need.insert((m.timeline, s));
            }
        }
        for &(t, s) in &sim.segments {
            let descends = t == base.timeline || (t == 2 && base.timeline == 1);
            if descends && s >= l.segno_of(base.start_lsn) {
                need.insert((t, s));
            }
        }
        let left: BTreeSet<(u32, u64)> = sim
            .segments
            .iter()
            .copied()
            .filter(|&(t, s)| {
                let name = l.object_name(&WalObject::Segment { timeline: t, segno: s });
                std::path::Path::new(dir.path()).join(name).exists()
            })
            .collect();
        let need: BTreeSet<(u32, u64)> = need.intersection(&sim.segments).copied().collect();
        assert_eq!(left, need, "{context}: WAL left differs from what is needed");
    }
    removed_total
}

#[tokio::test]
async fn four_hundred_days_default_policy() {
    let removed = simulate(1, Policy::default(), 400).await;
    // Past the first month the dailies roll off; past a year the monthlies do.
    assert!(removed > 200, "only {removed} backups expired");
}

#[tokio::test]
async fn four_hundred_days_short_policy_several_seeds() {
    let policy = Policy { daily: 5, weekly: 3, monthly: 2, yearly: 1, window_us: 2 * DAY + 5 * HOUR };
    for seed in [2, 3, 4] {
        simulate(seed, policy, 400).await;
    }
}

/// Fault injection over the real store: every delete after the first `allowed` fails (as if
/// the process died there). Named as what it is: a wrapper that stops, not a fake store.
#[derive(Debug)]
struct StopAfterDeletes {
    inner: LocalStore,
    allowed: usize,
    done: AtomicUsize,
}

impl StopAfterDeletes {
    fn step(&self, name: &str) -> Result<(), StoreError> {
        if self.done.fetch_add(1, Ordering::SeqCst) >= self.allowed {
            return Err(StoreError::Backend {
                op: "delete",
                name: name.into(),
                location: self.inner.location(),
                message: "stopped here by the test".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Store for StopAfterDeletes {
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.inner.put_if_absent(name, data).await
    }
    async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        self.inner.get(name).await
    }
    async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.inner.get_range(name, range).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.step(name)?;
        self.inner.delete(name).await
    }
    async fn delete_many(&self, names: &[String]) -> Result<(), StoreError> {
        for name in names {
            self.delete(name).await?;
        }
        Ok(())
    }
    async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.inner.head(name).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The objects under `dir`: every file but the local backend's own (`.tmp.` temporaries and the
/// recycle pool of deleted small objects' files), which are never objects.
fn tree(dir: &std::path::Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp.")) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn stopped_after_any_delete_the_repository_is_consistent_and_a_rerun_finishes() {
    // 90 days with a failover at day 200 not reached: one timeline; and a second scenario with it.
    for (seed, days) in [(11u64, 90i64), (12, 215)] {
        let template = scratch();
        let mut sim = Sim::new(template.path(), seed).await;
        for day in 0..days {
            sim.day(day).await;
        }
        let now = T0 + days * DAY;
        let policy = Policy { daily: 4, weekly: 2, monthly: 1, yearly: 1, window_us: 3 * DAY };
        let cut = now - policy.window_us;
        let world = sim.world();

        let full = scratch();
        copy_dir(template.path(), full.path());
        let counting = Arc::new(StopAfterDeletes {
            inner: LocalStore::new(full.path()),
            allowed: usize::MAX,
            done: AtomicUsize::new(0),
        });
        let repo = Repository::new(counting.clone(), KeyRing::from_key("k", [9; 32]));
        let finished: ExpireReport = expire(&repo, &cluster(), &opts(policy, now)).await.unwrap();
        let total = counting.done.load(Ordering::SeqCst);
        assert!(finished.removed_backups.len() > 10 && finished.removed_blocks > 10, "{finished:?}");
        let final_tree = tree(full.path());

        // Every stopping point among the manifest deletes and around the switch to WAL, then a
        // spread over the WAL and block deletes (each point copies the repository and runs
        // expire twice).
        // The last delete is the lock's release, whose failure is only logged.
        let data_deletes = total - 1;
        let manifests = finished.removed_backups.len();
        let mut points: Vec<usize> = (0..(manifests + 3).min(data_deletes)).collect();
        points.extend((manifests + 3..data_deletes).step_by(11));
        points.push(data_deletes - 1);
        for allowed in points {
            let dir = scratch();
            copy_dir(template.path(), dir.path());
            let stopping =
                Arc::new(StopAfterDeletes { inner: LocalStore::new(dir.path()), allowed, done: AtomicUsize::new(0) });
            let stopped_repo = Repository::new(stopping, KeyRing::from_key("k", [9; 32]));
            let err = expire(&stopped_repo, &cluster(), &opts(policy, now)).await.unwrap_err();
            assert!(err.to_string().contains("stopped here by the test"), "{err}");
            let context = format!("seed {seed}, stopped after {allowed} of {total} deletes");
            let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [9; 32]));
            check_consistent(&repo, &world, cut, &context).await;
            // The stopped run could not remove its lock either (as after a kill -9), and a lock
            // keeps other runs out until it expires (`lock_ttl`); the rerun stands for the run
            // after that.
            let leftover: Vec<String> = names(&repo, "running/").await.into_iter().collect();
            assert!(leftover.len() <= 1, "{context}: {leftover:?}");
            repo.delete_many(&leftover).await.unwrap();
            expire(&repo, &cluster(), &opts(policy, now)).await.unwrap();
            assert_eq!(
                tree(dir.path()),
                final_tree,
                "{context}: the rerun did not end where an uninterrupted run does"
            );
        }
    }
}

/// Puts one generation of a run's marker as a running pitr would (the record format of
/// `pitr_archive::running`), renewed at `renewed_us`.
async fn put_marker(repo: &Repository, kind: RunKind, started_us: i64, renewed_us: i64, id: &str, plan: Option<&Made>) {
    let mut text = format!("host=test\npid=1\nkind={}\n", kind.word());
    if let Some(m) = plan {
        text.push_str(&format!("backups={}\ntimeline={}\nwal_from={:016X}\n", m.id, m.timeline, m.start_lsn));
    }
    let name = marker_name(kind, started_us, renewed_us, id);
    repo.put_sealed(&name, text.into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
}

#[tokio::test]
async fn running_restores_keep_what_they_read_until_their_markers_go_stale() {
    let dir = scratch();
    let mut sim = Sim::new(dir.path(), 21).await;
    for day in 0..40 {
        sim.day(day).await;
    }
    let now = T0 + 39 * DAY + 23 * HOUR;
    let policy = Policy { daily: 3, weekly: 0, monthly: 0, yearly: 0, window_us: DAY };
    let stale = Duration::from_secs(600);
    let stale_us = 600_000_000;
    let (want, _) = expected(&sim.made, &policy, now);
    // The oldest backup, a full one, which the policy expires: a restore from it is running,
    // started long before `now − stale_backup_after` and renewed since.
    let read = sim.made[0].clone();
    assert!(read.parent.is_none() && !want.contains(&read.id));
    put_marker(&sim.repo, RunKind::Restore, now - 10 * stale_us, now - 5_000_000, "aaaa", Some(&read)).await;
    // A drill killed before it chose its backup: its marker was last renewed too long ago.
    put_marker(&sim.repo, RunKind::Drill, now - 3 * stale_us, now - stale_us, "bbbb", None).await;
    let opts = ExpireOptions { stale_backup_after: stale, ..opts(policy, now) };
    let report = expire(&sim.repo, &cluster(), &opts).await.unwrap();

    let manifests = names(&sim.repo, &format!("pg/{SYS}/backups/")).await;
    assert!(manifests.contains(&pg::backup_manifest(SYS, &read.id)), "{report:?}");
    let kept = report.kept.iter().find(|k| k.id == read.id).expect("kept");
    assert!(kept.reasons.contains(&Reason::Restore), "{kept:?}");
    assert!(!report.removed_backups.is_empty(), "the other expired backups still go: {report:?}");
    assert_eq!(report.running_restores.len(), 1, "{report:?}");
    assert!(report.running_restores[0].contains(&read.id), "{report:?}");
    assert_eq!(report.stale_removed, vec![marker_name(RunKind::Drill, now - 3 * stale_us, now - stale_us, "bbbb")]);
    // Its blocks, and every segment from where its replay starts to the end of the archive.
    let blocks = names(&sim.repo, &format!("pg/{SYS}/blocks/")).await;
    assert!(read.blocks.iter().all(|b| blocks.contains(&pg::block(SYS, b))));
    let world = sim.world();
    let l = layout();
    for (t, s) in world.recovery_segments(&read) {
        let name = l.object_name(&WalObject::Segment { timeline: t, segno: s });
        assert!(!world.segments.contains(&(t, s)) || dir.path().join(&name).exists(), "{name} went: {report:?}");
    }
    check_consistent(&sim.repo, &world, now - policy.window_us, "beside a restore").await;

    // A restore that has not chosen its backup yet: nothing at all goes.
    let before = names(&sim.repo, "pg/").await;
    put_marker(&sim.repo, RunKind::Restore, now - 1_000_000, now - 1_000_000, "cccc", None).await;
    let report = expire(&sim.repo, &cluster(), &opts).await.unwrap();
    assert!(report.removed_backups.is_empty() && report.removed_wal_objects == 0, "{report:?}");
    assert!(report.wal_skipped.as_deref().is_some_and(|w| w.contains("not chosen")), "{report:?}");
    assert_eq!(names(&sim.repo, "pg/").await, before, "{report:?}");

    // Killed (no more renewals): once stale they keep nothing and are removed.
    let later = now + 2 * stale_us;
    let opts = ExpireOptions { now_us: later, ..opts };
    let report = expire(&sim.repo, &cluster(), &opts).await.unwrap();
    assert_eq!(report.stale_removed.len(), 2, "{report:?}");
    assert!(report.running_restores.is_empty(), "{report:?}");
    assert!(report.removed_backups.iter().any(|b| b.id == read.id), "{report:?}");
    assert!(names(&sim.repo, "running/").await.is_empty());
    check_consistent(&sim.repo, &sim.world(), later - policy.window_us, "after the restore").await;
}
