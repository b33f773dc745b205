//! Resume from every state the archive's WAL can be left in (a crash, an older version, a copied
//! repository), against a real PostgreSQL: each state is planted with the archive's own API
//! while the sidecar is stopped, the sidecar is started again, and the archive's end must move
//! past the planted segment; the WAL it holds must equal the server's own files and a restore
//! through all of it must equal the primary. Also the completeness marks the sidecar records
//! while caught up.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pitr_archive::complete::{newest_pg, CompleteMark};
use pitr_archive::names::pg;
use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta, Repository, WalCatalog, WalLayout, WalObject};
use pitr_tests::pitr::{PitrEnv, WAL_SEGMENT_SIZE as SEG};
use pitr_tests::{wait_until, PgCluster, PgOptions};

fn start_cluster() -> Result<PgCluster> {
    let mut opts = PgOptions::new(15);
    opts.extra_conf.push("max_wal_size = '1GB'".into());
    PgCluster::start(opts)
}

/// The test repository opened with its key, as the sidecar opens it.
/// A segment's chunk ranges, their bytes as one run from offset 0, and the last chunk's header.
type ChunkRun = (Vec<(u32, u32)>, Vec<u8>, ObjectMeta);

struct Archive {
    repo: Repository,
    layout: WalLayout,
    rt: tokio::runtime::Runtime,
}

impl Archive {
    fn open(env: &PitrEnv) -> Result<Archive> {
        let rt = tokio::runtime::Runtime::new()?;
        let repo = Repository::new(Arc::new(LocalStore::new(&env.repo)), KeyRing::load(&env.key_file)?);
        let cluster = rt.block_on(repo.resolve_cluster(None))?;
        Ok(Archive { repo, layout: WalLayout::new(&cluster), rt })
    }

    fn catalog(&self) -> Result<WalCatalog> {
        Ok(self.rt.block_on(WalCatalog::build(&self.repo, self.layout))?)
    }

    fn name(&self, obj: WalObject) -> String {
        self.layout.object_name(&obj)
    }

    fn read(&self, obj: WalObject) -> Result<(ObjectMeta, Vec<u8>)> {
        let (header, bytes) = self.rt.block_on(self.repo.get_opened(&self.name(obj)))?;
        Ok((header.meta, bytes))
    }

    /// Puts `bytes` as `obj`, with the commit times of `like` (the object they came from).
    fn put(&self, obj: WalObject, bytes: Vec<u8>, like: &ObjectMeta) -> Result<()> {
        let (timeline, start, end, kind) = match obj {
            WalObject::Chunk { timeline, segno, from, to } => {
                let s = self.layout.segment_start(segno);
                (timeline, s + u64::from(from), s + u64::from(to), ObjectKind::WalChunk)
            }
            WalObject::Segment { timeline, segno } => {
                let s = self.layout.segment_start(segno);
                (timeline, s, s + SEG, ObjectKind::WalSegment)
            }
            WalObject::History { timeline } => (timeline, 0, 0, ObjectKind::TimelineHistory),
        };
        let meta = ObjectMeta { kind, timeline, start_lsn: start, end_lsn: end, ..like.clone() };
        self.rt.block_on(self.repo.put_sealed(&self.name(obj), bytes, meta))?;
        Ok(())
    }

    fn delete(&self, obj: WalObject) -> Result<()> {
        Ok(self.rt.block_on(self.repo.delete(&self.name(obj)))?)
    }

    /// The chunks of `segno` (timeline 1), and their bytes as one run from offset 0.
    fn chunk_run(&self, segno: u64) -> Result<ChunkRun> {
        let catalog = self.catalog()?;
        let entry = catalog.segments.get(&(1, segno)).context("segment not in the archive")?;
        let mut data = Vec::new();
        let mut meta = ObjectMeta::plain(ObjectKind::WalChunk);
        for &(from, to) in &entry.chunks {
            ensure!(from as usize == data.len(), "chunks of {segno} not contiguous: {:?}", entry.chunks);
            let (m, bytes) = self.read(WalObject::Chunk { timeline: 1, segno, from, to })?;
            meta.first_commit_us = meta.first_commit_us.or(m.first_commit_us);
            meta.last_commit_us = m.last_commit_us.or(meta.last_commit_us);
            data.extend_from_slice(&bytes);
        }
        Ok((entry.chunks.clone(), data, meta))
    }
}

fn chunk(segno: u64, from: usize, to: usize) -> WalObject {
    WalObject::Chunk { timeline: 1, segno, from: from as u32, to: to as u32 }
}

/// Inserts `n` rows in one transaction.
fn write_rows(cluster: &PgCluster, n: u32) -> Result<()> {
    cluster.psql(&format!("insert into t(v) select md5(random()::text) from generate_series(1, {n})"))?;
    Ok(())
}

/// Completes the current segment (after writing into it, so the switch is not a no-op).
fn switch_wal(cluster: &PgCluster) -> Result<()> {
    write_rows(cluster, 10)?;
    cluster.psql("select pg_switch_wal()")?;
    Ok(())
}

/// The states of the issue; each is planted on the newest complete segment `s` (a segment
/// object) and the partial segment after it (chunks from offset 0).
#[derive(Debug, Clone, Copy)]
enum State {
    /// (1) Chunks cover `s` entirely, no segment object, nothing after it.
    ChunksCoverNewest,
    /// (2) The same, and chunks of the next segment.
    ChunksCoverAndNextBegins,
    /// (3) Overlapping chunks in the newest segment (a retry after a crash: 0-a and 0-b).
    Overlapping,
    /// (4) A run with a gap in the newest segment (0-a, b-c).
    Gap,
    /// (6) A whole segment and leftover chunks of it.
    WholeAndLeftoverChunks,
    /// (7) The newest timeline has only a history file and no WAL.
    HistoryOnly,
    /// (5) The newest segment's chunks do not start at offset 0 (leaves a hole: planted last).
    NotFromZero,
}

/// Plants `state`; returns what must hold after the restart: (segment, whole?) pairs.
fn plant(a: &Archive, state: State) -> Result<Vec<(u64, bool)>> {
    let catalog = a.catalog()?;
    let (&(tli, partial), newest) = catalog.segments.iter().next_back().context("empty archive")?;
    ensure!(tli == 1 && !newest.whole, "expected a partial newest segment, found {:?}", catalog.segments);
    let s = partial - 1;
    ensure!(catalog.segments.get(&(1, s)).is_some_and(|e| e.whole), "segment {s} is not whole");
    let seg = WalObject::Segment { timeline: 1, segno: s };
    // 8-byte aligned cut points inside a run of `len` bytes.
    let cut = |len: usize, num: usize, den: usize| (len * num / den) & !7;
    match state {
        State::ChunksCoverNewest | State::ChunksCoverAndNextBegins => {
            let (meta, bytes) = a.read(seg)?;
            let mid = cut(bytes.len(), 1, 3);
            a.put(chunk(s, 0, mid), bytes[..mid].to_vec(), &meta)?;
            a.put(chunk(s, mid, bytes.len()), bytes[mid..].to_vec(), &meta)?;
            a.delete(seg)?;
            if matches!(state, State::ChunksCoverNewest) {
                for &(from, to) in &catalog.segments[&(1, partial)].chunks {
                    a.delete(chunk(partial, from as usize, to as usize))?;
                }
            }
            Ok(vec![(s, true), (partial, true)])
        }
        State::Overlapping | State::Gap | State::NotFromZero => {
            let (chunks, bytes, meta) = a.chunk_run(partial)?;
            ensure!(bytes.len() >= 4096, "too little WAL in segment {partial} to cut: {}", bytes.len());
            for (from, to) in chunks {
                a.delete(chunk(partial, from as usize, to as usize))?;
            }
            let (x, y) = (cut(bytes.len(), 1, 3), cut(bytes.len(), 2, 3));
            let pieces = match state {
                State::Overlapping => vec![(0, y), (0, bytes.len())],
                State::Gap => vec![(0, x), (y, bytes.len())],
                _ => vec![(x, bytes.len())],
            };
            for (from, to) in pieces {
                a.put(chunk(partial, from, to), bytes[from..to].to_vec(), &meta)?;
            }
            // A segment held from past offset 0 cannot become a segment object.
            Ok(vec![(s, true), (partial, !matches!(state, State::NotFromZero))])
        }
        State::WholeAndLeftoverChunks => {
            let (meta, bytes) = a.read(seg)?;
            let mid = cut(bytes.len(), 1, 2);
            a.put(chunk(s, 0, mid), bytes[..mid].to_vec(), &meta)?;
            a.put(chunk(s, mid, mid + 8192), bytes[mid..mid + 8192].to_vec(), &meta)?;
            Ok(vec![(s, true), (partial, true)])
        }
        State::HistoryOnly => {
            let history = b"1\t1/0\tno recovery target specified\n".to_vec();
            a.put(WalObject::History { timeline: 2 }, history, &ObjectMeta::plain(ObjectKind::TimelineHistory))?;
            Ok(vec![(s, true), (partial, true)])
        }
    }
}

/// Every whole segment in the archive from `first` on equals the server's own pg_wal file
/// (kept there by the `pin` slot), fetched with `pitr wal-fetch`; returns how many.
fn compare_with_pg_wal(env: &PitrEnv, cluster: &PgCluster, a: &Archive, first: u64) -> Result<usize> {
    let mut compared = 0;
    for (&(tli, segno), entry) in a.catalog()?.segments.iter() {
        if segno < first || !entry.whole {
            continue;
        }
        let name = a.layout.segment_file_name(tli, segno);
        let expected = std::fs::read(cluster.wal_dir().join(&name)).with_context(|| format!("server's {name}"))?;
        let got = env.wal_fetch(&name)?;
        if expected != got {
            let first_diff = expected.iter().zip(&got).position(|(x, y)| x != y);
            bail!("segment {name} differs from the server's pg_wal file (first difference at byte {first_diff:?})");
        }
        compared += 1;
    }
    Ok(compared)
}

/// Waits (30 s at most) until each of `segnos` (timeline 1) is a whole segment object with no
/// chunks left beside it: compaction runs in the background, at a lower priority than the
/// stream, so a slow machine sees it late.
fn wait_compacted(a: &Archive, env: &PitrEnv, what: &str, segnos: &[u64]) -> Result<()> {
    wait_until(&format!("{what} to be compacted"), Duration::from_secs(30), || {
        let catalog = a.catalog()?;
        Ok(segnos
            .iter()
            .all(|segno| catalog.segments.get(&(1, *segno)).is_some_and(|e| e.whole && e.chunks.is_empty())))
    })
    .with_context(|| format!("{:?}\n{}", a.catalog().map(|c| c.segments), env.stream_logs()))
}

fn table_state(psql: impl Fn(&str) -> Result<String>) -> Result<String> {
    psql("select count(*) || ' ' || md5(string_agg(id || ':' || v, ',' order by id)) from t")
}

#[test]
fn pg15_resumes_from_every_state_the_archive_can_be_in() -> Result<()> {
    let cluster = start_cluster()?;
    // Keeps every segment in pg_wal so the server's own files can serve as the reference.
    cluster.psql("select pg_create_physical_replication_slot('pin', true)")?;
    let mut env = PitrEnv::new("resume-states", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    cluster.psql("create table t(id bigserial primary key, v text)")?;
    write_rows(&cluster, 1000)?;
    env.wait_archived(cluster.current_lsn()?, "the first WAL")?;
    let a = Archive::open(&env)?;
    let first = a.catalog()?.segments.keys().next().context("no WAL archived")?.1;
    let mut hole = None;

    let states = [
        State::ChunksCoverNewest,
        State::ChunksCoverAndNextBegins,
        State::Overlapping,
        State::Gap,
        State::WholeAndLeftoverChunks,
        State::HistoryOnly,
        State::NotFromZero,
    ];
    for state in states {
        // A complete segment and a partial one after it, all archived.
        switch_wal(&cluster)?;
        write_rows(&cluster, 2000)?;
        env.wait_archived(cluster.current_lsn()?, &format!("the archive to catch up before {state:?}"))?;
        env.stop_stream(&mut stream)?;
        let expect = plant(&a, state).with_context(|| format!("planting {state:?}"))?;
        if matches!(state, State::NotFromZero) {
            hole = expect.iter().find(|e| !e.1).map(|e| e.0);
        }

        stream = env.spawn_stream()?;
        write_rows(&cluster, 500)?;
        switch_wal(&cluster)?;
        // The archive's end moves past the planted segments: the segment just switched (after
        // them) is held whole, within seconds.
        let end = cluster.current_lsn()?;
        wait_until(&format!("the archive to move past {state:?}"), Duration::from_secs(30), || {
            Ok(env.archived_end(SEG)? >= end - end % SEG)
        })
        .with_context(|| env.stream_logs())?;
        // Segments left as chunks are compacted; leftover chunks go.
        let whole: Vec<u64> = expect.iter().filter(|e| e.1).map(|e| e.0).collect();
        wait_compacted(&a, &env, &format!("{state:?}"), &whole)?;
        if matches!(state, State::HistoryOnly) {
            // Streaming went on on timeline 1, as the server is; the planted history is not
            // this cluster's and would mislead the restore below.
            ensure!(a.catalog()?.segments.keys().all(|k| k.0 == 1), "WAL on another timeline");
            a.delete(WalObject::History { timeline: 2 })?;
        }
        if matches!(state, State::NotFromZero) {
            continue;
        }
        // Every segment archived so far, through the planted ones, is the server's own.
        let compared = compare_with_pg_wal(&env, &cluster, &a, first)?;
        ensure!(compared >= 2, "only {compared} segments compared");
    }
    let logs = env.stream_logs();
    ensure!(logs.contains("compacted a segment left as chunks"), "no background compaction logged:\n{logs}");

    // (5) left a hole, the only one besides the newest segment (still being written); the WAL
    // after it is exact too.
    let hole = hole.context("no hole planted")?;
    write_rows(&cluster, 500)?;
    switch_wal(&cluster)?;
    let end = cluster.current_lsn()?;
    env.wait_archived(end - end % SEG, "a whole segment after the hole")?;
    // Held in chunks is not yet whole: what compare_with_pg_wal looks at.
    let after_hole: Vec<u64> = ((hole + 1)..(end / SEG)).collect();
    wait_compacted(&a, &env, "the segments after the hole", &after_hole)?;
    let catalog = a.catalog()?;
    let newest = catalog.segments.keys().next_back().context("empty archive")?.1;
    let partial: Vec<u64> = catalog.segments.iter().filter(|(_, e)| !e.whole).map(|(k, _)| k.1).collect();
    ensure!(partial.iter().all(|&s| s == hole || s == newest), "segments not whole: {partial:?}, hole {hole}");
    ensure!(compare_with_pg_wal(&env, &cluster, &a, hole + 1)? >= 1, "nothing after the hole compared");
    Ok(())
}

#[test]
fn pg15_restore_through_planted_states_is_exact() -> Result<()> {
    let cluster = start_cluster()?;
    let mut env = PitrEnv::new("resume-restore", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    cluster.psql("create table t(id bigserial primary key, v text)")?;
    write_rows(&cluster, 1000)?;
    env.wait_archived(cluster.current_lsn()?, "the first WAL")?;
    env.run_ok(&["backup"])?;
    let a = Archive::open(&env)?;
    for state in [State::ChunksCoverNewest, State::ChunksCoverAndNextBegins, State::Overlapping, State::Gap] {
        switch_wal(&cluster)?;
        write_rows(&cluster, 2000)?;
        env.wait_archived(cluster.current_lsn()?, &format!("the archive to catch up before {state:?}"))?;
        env.stop_stream(&mut stream)?;
        plant(&a, state).with_context(|| format!("planting {state:?}"))?;
        stream = env.spawn_stream()?;
        write_rows(&cluster, 500)?;
    }
    switch_wal(&cluster)?;
    write_rows(&cluster, 100)?;
    let expected = table_state(|sql| cluster.psql(sql))?;
    env.wait_archived(cluster.current_lsn()?, "the last rows")?;
    env.share_with_pg_user()?;
    let (restored, _) = env.restore_started("latest", cluster.bin_dir(), &[])?;
    ensure!(table_state(|sql| restored.psql(sql))? == expected, "the restored table differs from the primary's");
    drop(stream);
    Ok(())
}

/// The status file's view of the sidecar.
fn status_json(env: &PitrEnv) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(&env.status_file)?)?)
}

#[test]
fn pg15_marks_the_moments_the_archive_was_complete() -> Result<()> {
    let cluster = start_cluster()?;
    let mut env = PitrEnv::new("complete-marks", &cluster, "")?;
    env.edit_config("[metrics]", "complete_interval = \"1s\"\n[metrics]")?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    cluster.psql("create table t(id bigserial primary key, v text)")?;
    env.wait_streaming(&cluster)?;
    let a = Archive::open(&env)?;
    let system_id = a.layout.system_id;

    // Under load marks keep coming (from the WAL's own messages) ...
    let load = std::thread::spawn({
        let port = cluster.port;
        move || -> Result<()> {
            for _ in 0..30 {
                let out = std::process::Command::new(pitr_tests::client_bin("psql"))
                    .args(["-X", "-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                    .args(["-c", "insert into t(v) select md5(random()::text) from generate_series(1, 500)"])
                    .output()?;
                ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
    });
    let before = pitr_archive::now_us();
    wait_until("a mark during the load", Duration::from_secs(30), || {
        Ok(a.rt.block_on(newest_pg(&a.repo, system_id, 1))?.is_some_and(|m| m.server_time_us > before))
    })
    .with_context(|| env.stream_logs())?;
    load.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;

    // ... and once the primary is idle they pass its last commit: the archive holds all of it,
    // later, with only keepalives coming.
    write_rows(&cluster, 10)?;
    let committed_us: i64 = cluster.psql("select (extract(epoch from clock_timestamp()) * 1e6)::bigint")?.parse()?;
    let wal_end = cluster.current_lsn()?;
    let mut mark: Option<CompleteMark> = None;
    wait_until("a mark more than 1 s after the last commit", Duration::from_secs(30), || {
        mark = a.rt.block_on(newest_pg(&a.repo, system_id, 1))?;
        Ok(mark.is_some_and(|m| m.server_time_us > committed_us + 1_000_000))
    })
    .with_context(|| env.stream_logs())?;
    let mark = mark.context("no mark")?;
    ensure!(mark.lsn >= wal_end, "mark {mark:?} ends before the last commit's WAL ({wal_end:X})");
    ensure!(env.archived_end(SEG)? >= mark.lsn, "the mark claims WAL the archive does not hold: {mark:?}");
    // Old marks are pruned: a few objects, not one per second.
    let names = a.rt.block_on(a.repo.list(&pg::complete_prefix(system_id)))?;
    ensure!((1..=5).contains(&names.len()), "{} mark objects", names.len());

    // Shown in the status file and the metrics.
    wait_until("the status file to show the mark", Duration::from_secs(10), || {
        Ok(status_json(&env)?["complete_up_to_us"].as_i64().is_some_and(|t| t > committed_us))
    })?;
    let (_, metrics) = env.http_get("/metrics")?;
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pitr_archive_complete_time_seconds "))
        .context("no pitr_archive_complete_time_seconds")?;
    ensure!(gauge.trim().parse::<f64>()? * 1e6 > committed_us as f64, "gauge {gauge}");
    Ok(())
}
