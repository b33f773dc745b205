//! The change index (`pitr find`'s source) against real PostgreSQL 15 and 17: the sidecar decodes
//! a workload (inserts, a DELETE of N rows, an UPDATE, a TRUNCATE, a DROP TABLE, a CREATE TABLE,
//! a function with a committed and a rolled-back subtransaction) into index objects whose xids
//! are `txid_current()`'s, whose counts are the rows changed, whose dropped relfilenodes are
//! `pg_relation_filenode()`'s from before, whose DDL flags and commit LSNs are right. After a
//! kill -9 of the sidecar mid-stream and a restart, indexing resumes from the last object (the
//! new commits are complete, not flagged `incomplete`) and no index object names a segment the
//! archive does not hold whole. `verify --rebuild-index` after deleting the objects writes them
//! again with the same entries. PostgreSQL 15 also measures decoding throughput on pgbench WAL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use pitr_archive::change_index::{self, SegmentIndex};
use pitr_archive::{KeyRing, LocalStore, Repository, WalCatalog, WalLayout};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{PgCluster, PgOptions};

/// One transaction of the workload: its xid and the WAL insert position around it.
#[derive(Debug, Clone, Copy)]
struct Tx {
    xid: u32,
    before: u64,
    after: u64,
}

fn lsn(cluster: &PgCluster) -> Result<u64> {
    pitr_tests::parse_lsn(&cluster.psql("select pg_current_wal_insert_lsn()")?)
}

/// Runs `sql` (one statement whose first column is `txid_current()`), returning the transaction.
fn tx(cluster: &PgCluster, sql: &str) -> Result<(Tx, String)> {
    let before = lsn(cluster)?;
    let out = cluster.psql(sql)?;
    let after = lsn(cluster)?;
    let first = out.split('|').next().unwrap_or_default();
    let xid = first.parse::<u64>().with_context(|| format!("{sql}: {out}"))? as u32;
    Ok((Tx { xid, before, after }, out))
}

fn repo_of(env: &PitrEnv) -> Result<Repository> {
    Ok(Repository::new(Arc::new(LocalStore::new(&env.repo)), KeyRing::load(&env.key_file)?))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Every index object of timeline 1, read and checked against its name.
fn read_all(env: &PitrEnv) -> Result<BTreeMap<u64, SegmentIndex>> {
    let rt = runtime()?;
    rt.block_on(async {
        let repo = repo_of(env)?;
        let info = repo.resolve_cluster(None).await?;
        let layout = WalLayout::new(&info);
        let mut out = BTreeMap::new();
        for segno in change_index::list_indexed(&repo, &layout, 1).await?.into_keys() {
            let index = change_index::read_index(&repo, &layout, 1, segno)
                .await
                .map_err(|p| anyhow::anyhow!("{p}"))?
                .context("listed index object vanished")?;
            out.insert(segno, index);
        }
        Ok(out)
    })
}

fn run(major: u32) -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(major))?;
    cluster.psql(
        "create table keep_t (id int primary key, v text); create table victim (id int primary key, v text); \
         create table trunc_t (id int); create table drop_t (id int); create table sub_t (id int); \
         insert into victim select g, 'v' from generate_series(1, 1000) g; insert into trunc_t select generate_series(1, 100); \
         insert into drop_t select generate_series(1, 10)",
    )?;
    cluster.psql(
        "create function f_trunc() returns bigint language plpgsql as $$ begin truncate trunc_t; return txid_current(); end $$; \
         create function f_drop() returns bigint language plpgsql as $$ begin drop table drop_t; return txid_current(); end $$; \
         create function f_create() returns bigint language plpgsql as $$ begin create table made_t (id int); return txid_current(); end $$; \
         create function f_sub() returns bigint language plpgsql as $$ begin \
           insert into sub_t values (1); \
           begin insert into sub_t values (2), (3); exception when others then null; end; \
           begin insert into sub_t values (4); raise exception 'no'; exception when others then null; end; \
           return txid_current(); end $$",
    )?;
    let node = |t: &str| -> Result<u32> { Ok(cluster.psql(&format!("select pg_relation_filenode('{t}')"))?.parse()?) };
    let (victim, keep, trunc, drop, sub) =
        (node("victim")?, node("keep_t")?, node("trunc_t")?, node("drop_t")?, node("sub_t")?);
    let db: u32 = cluster.psql("select oid from pg_database where datname = current_database()")?.parse()?;

    let mut env = PitrEnv::new(&format!("pg{major}-change-index"), &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    // The stream started inside a segment (never indexed: not held from its start); the workload
    // goes into the next, after a checkpoint's RUNNING_XACTS bounds what decoding may have missed.
    cluster.psql("select pg_switch_wal()")?;
    cluster.psql("checkpoint")?;

    let (ins, _) = tx(&cluster, "with i as (insert into keep_t select g, 'k' from generate_series(1, 200) g returning 1) select txid_current(), count(*) from i")?;
    let (del, out) = tx(
        &cluster,
        "with d as (delete from victim where id <= 300 returning 1) select txid_current(), count(*) from d",
    )?;
    assert!(out.ends_with("|300"), "{out}");
    let (upd, out) = tx(
        &cluster,
        "with u as (update victim set v = 'u' where id > 900 returning 1) select txid_current(), count(*) from u",
    )?;
    assert!(out.ends_with("|100"), "{out}");
    let (truncated, _) = tx(&cluster, "select f_trunc()")?;
    let (dropped, _) = tx(&cluster, "select f_drop()")?;
    let (created, _) = tx(&cluster, "select f_create()")?;
    let (subx, _) = tx(&cluster, "select f_sub()")?;
    assert_eq!(cluster.psql("select count(*) from sub_t")?, "3");
    let end = lsn(&cluster)?;
    cluster.psql("select pg_switch_wal()")?;
    let seg = |l: u64| l / (16 << 20);
    pitr_tests::wait_until("the workload's segment to be indexed", Duration::from_secs(60), || {
        Ok(read_all(&env)?.contains_key(&seg(end)))
    })
    .with_context(|| env.stream_logs())?;

    let check = |all: &BTreeMap<u64, SegmentIndex>, t: &Tx, what: &str| -> Result<change_index::CommitEntry> {
        let found: Vec<_> = all.values().flat_map(|s| s.entries.iter()).filter(|e| e.xid == t.xid).cloned().collect();
        assert_eq!(found.len(), 1, "{what}: xid {} in {found:?}", t.xid);
        let e = found[0].clone();
        assert!(e.commit_lsn > t.before && e.end_lsn <= t.after, "{what}: commit {e:?} outside {t:?}");
        assert!(!e.incomplete, "{what}: {e:?}");
        Ok(e)
    };
    let counts = |e: &change_index::CommitEntry, rel: u32| {
        e.relations.iter().find(|r| r.rel.rel == rel && r.rel.db == db).map(|r| (r.inserted, r.updated, r.deleted))
    };
    let all = read_all(&env)?;
    let e = check(&all, &ins, "insert")?;
    assert_eq!(counts(&e, keep), Some((200, 0, 0)), "{e:?}");
    assert!(!e.ddl);
    let e = check(&all, &del, "delete")?;
    assert_eq!(counts(&e, victim), Some((0, 0, 300)), "{e:?}");
    let e = check(&all, &upd, "update")?;
    assert_eq!(counts(&e, victim), Some((0, 100, 0)), "{e:?}");
    let e = check(&all, &truncated, "truncate")?;
    assert!(e.dropped.iter().any(|d| d.rel == trunc && d.db == db), "{e:?}");
    assert!(e.ddl, "{e:?}");
    let e = check(&all, &dropped, "drop")?;
    assert!(e.dropped.iter().any(|d| d.rel == drop && d.db == db), "{e:?}");
    assert!(e.ddl, "{e:?}");
    let e = check(&all, &created, "create")?;
    assert!(e.ddl && e.dropped.is_empty(), "{e:?}");
    let e = check(&all, &subx, "subtransactions")?;
    assert_eq!(counts(&e, sub), Some((3, 0, 0)), "committed subxact folded in, rolled-back one not: {e:?}");

    // kill -9 mid-stream: a transaction streamed before, one while down; then resume.
    let (before_kill, _) = tx(&cluster, "with d as (delete from victim where id between 301 and 350 returning 1) select txid_current(), count(*) from d")?;
    std::thread::sleep(Duration::from_millis(300));
    stream.kill9();
    let (while_down, _) = tx(&cluster, "with d as (delete from victim where id between 351 and 370 returning 1) select txid_current(), count(*) from d")?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    let (after, _) = tx(&cluster, "with d as (delete from victim where id between 371 and 375 returning 1) select txid_current(), count(*) from d")?;
    let end2 = lsn(&cluster)?;
    cluster.psql("select pg_switch_wal()")?;
    pitr_tests::wait_until("the resumed segment to be indexed", Duration::from_secs(60), || {
        Ok(read_all(&env)?.contains_key(&seg(end2)))
    })
    .with_context(|| env.stream_logs())?;
    let all = read_all(&env)?;
    for (t, n, what) in [(before_kill, 50, "before kill"), (while_down, 20, "while down"), (after, 5, "after restart")]
    {
        let e = check(&all, &t, what)?;
        assert_eq!(counts(&e, victim), Some((0, 0, n)), "{what}: {e:?}");
    }
    // No index object claims WAL the archive does not hold whole.
    let rt = runtime()?;
    let holds: Vec<(u64, bool)> = rt.block_on(async {
        let repo = repo_of(&env)?;
        let info = repo.resolve_cluster(None).await?;
        let catalog = WalCatalog::build(&repo, WalLayout::new(&info)).await?;
        anyhow::Ok(
            all.keys()
                .map(|s| (*s, catalog.segments.get(&(1, *s)).is_some_and(|e| e.is_complete(info.wal_segment_size))))
                .collect(),
        )
    })?;
    assert!(holds.iter().all(|(_, whole)| *whole), "{holds:?}");
    env.stop_stream(&mut stream)?;

    // Lost index objects come back from the WAL with the same entries.
    let index_dir = std::fs::read_dir(env.repo.join("pg"))?.next().context("no cluster")??.path().join("index");
    std::fs::remove_dir_all(&index_dir)?;
    let out = env.run_ok(&["verify", "--rebuild-index"])?;
    assert!(out.contains(&format!("{} objects written", all.len())), "{out}");
    let rebuilt = read_all(&env)?;
    assert_eq!(rebuilt.keys().collect::<Vec<_>>(), all.keys().collect::<Vec<_>>());
    // The first indexed segment's object may differ in what the sidecar carried into it from the
    // segment it started in (rebuild starts afresh there): entries are compared, not flags.
    let plain = |s: &SegmentIndex| {
        s.entries
            .iter()
            .map(|e| (e.xid, e.commit_lsn, e.end_lsn, e.time_us, e.relations.clone(), e.dropped.clone(), e.ddl))
            .collect::<Vec<_>>()
    };
    for (segno, s) in &all {
        assert_eq!(plain(&rebuilt[segno]), plain(s), "segment {segno}");
        assert_eq!(rebuilt[segno].to_lsn, s.to_lsn, "segment {segno}");
    }
    for t in [ins, del, upd, truncated, dropped, created, subx, before_kill, while_down, after] {
        check(&rebuilt, &t, "rebuilt")?;
    }
    // A second run writes nothing and keeps what is there.
    let out = env.run_ok(&["verify", "--rebuild-index"])?;
    assert!(out.contains("0 objects written"), "{out}");
    let out = env.run_ok(&["verify", "--rebuild-index", "--since", "2000-01-01 00:00:00Z"])?;
    assert!(out.contains(&format!("0 objects written, {} already there", all.len())), "{out}");
    let out = env.run_ok(&["verify", "--rebuild-index", "--since", "2999-01-01 00:00:00Z"])?;
    assert!(out.contains("0 objects written, 0 already there"), "{out}");
    expect_bad_since(&env)?;

    // A planted object at an index name: readers refuse it and decode that segment from the WAL
    // (same entries); rebuild names it and keeps it, `--force` replaces it.
    let planted_seg = *all.keys().next().context("no index")?;
    let planted = std::fs::read_dir(&index_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(&format!("{planted_seg:016X}.idx")))
        .context("no object for the first segment")?;
    std::fs::write(&planted, pitr_tests::pseudo_random(5000, 7))?;
    let view = runtime()?.block_on(async {
        let repo = repo_of(&env)?;
        let info = repo.resolve_cluster(None).await?;
        anyhow::Ok(change_index::load_range(&repo, &info, 1, planted_seg, Some(planted_seg)).await?)
    })?;
    assert_eq!(view.problems.len(), 1, "{:?}", view.problems);
    assert!(!view.segments[0].indexed);
    assert_eq!(
        view.entries.iter().map(|e| (e.xid, e.commit_lsn)).collect::<Vec<_>>(),
        all[&planted_seg].entries.iter().map(|e| (e.xid, e.commit_lsn)).collect::<Vec<_>>()
    );
    let out = env.run(&["verify", "--rebuild-index"])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success() && text.contains("problem:") && text.contains("--force"), "{text}");
    let out = env.run_ok(&["verify", "--rebuild-index", "--force"])?;
    assert!(out.contains("1 replaced"), "{out}");
    assert_eq!(plain(&read_all(&env)?[&planted_seg]), plain(&all[&planted_seg]));
    Ok(())
}

#[test]
fn pg15_workload_is_indexed_resumed_after_kill_and_rebuilt() -> Result<()> {
    run(15)
}

#[test]
fn pg17_workload_is_indexed_resumed_after_kill_and_rebuilt() -> Result<()> {
    run(17)
}

/// A failed index put (the storage refuses it) is not a permanent hole: once the storage is back,
/// the sidecar's backfill reads the segment back from the archive and writes its object.
#[test]
fn pg15_failed_index_puts_are_backfilled() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql("create table t (id int)")?;
    let mut env = PitrEnv::new("pg15-index-backfill", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("select pg_switch_wal()")?;
    cluster.psql("checkpoint")?;
    let seg = |l: u64| l / (16 << 20);
    let (first, _) =
        tx(&cluster, "with i as (insert into t values (1) returning 1) select txid_current(), count(*) from i")?;
    cluster.psql("select pg_switch_wal()")?;
    pitr_tests::wait_until("the first segment to be indexed", Duration::from_secs(60), || {
        Ok(read_all(&env)?.contains_key(&seg(first.after)))
    })
    .with_context(|| env.stream_logs())?;

    // Index puts fail: a plain file where the index objects go (root ignores permissions).
    let index_dir = std::fs::read_dir(env.repo.join("pg"))?.next().context("no cluster")??.path().join("index");
    let saved = index_dir.with_extension("saved");
    std::fs::rename(&index_dir, &saved)?;
    std::fs::write(&index_dir, b"not a directory")?;
    let (during, _) =
        tx(&cluster, "with i as (insert into t values (2) returning 1) select txid_current(), count(*) from i")?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(during.after, "the outage's WAL to be archived")?;
    pitr_tests::wait_until("the failed index put", Duration::from_secs(60), || {
        Ok(env.stream_logs().contains("put failed"))
    })
    .with_context(|| env.stream_logs())?;
    std::fs::remove_file(&index_dir)?;
    std::fs::rename(&saved, &index_dir)?;

    pitr_tests::wait_until("the failed segment to be backfilled", Duration::from_secs(90), || {
        Ok(read_all(&env)?.contains_key(&seg(during.after)))
    })
    .with_context(|| env.stream_logs())?;
    let all = read_all(&env)?;
    let e = all[&seg(during.after)].entries.iter().find(|e| e.xid == during.xid).cloned();
    let e = e.with_context(|| format!("xid {} not in {:?}", during.xid, all[&seg(during.after)]))?;
    assert_eq!(e.relations.iter().map(|r| r.inserted).sum::<u64>(), 1, "{e:?}");
    assert!(!e.incomplete, "{e:?}");
    env.stop_stream(&mut stream)?;
    Ok(())
}

/// Decoding throughput on real pgbench WAL (run by hand: `--ignored`): streams ~100 MB of pgbench
/// WAL, reads the archived segments back, and times the change decoder on one core. Prints MB/s; this test binary's own crates are unoptimised, so
/// the WAL is also written to `PITR_WAL_SAMPLE_OUT` (if set) for the release-mode measurement in
/// pitr-pgformat (`walreader::tests::changes_mode::throughput_on_a_sample`).
#[test]
#[ignore]
fn decoding_throughput_on_pgbench_wal() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("pg15-change-index-throughput", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("select pg_switch_wal()")?;
    let start = lsn(&cluster)?;
    cluster.pgbench(&["-i", "-s", "4", "-q"])?;
    cluster.pgbench(&["-c", "4", "-t", "6000", "-n"])?;
    let end = lsn(&cluster)?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(end, "the pgbench WAL to be archived")?;
    env.stop_stream(&mut stream)?;
    let rt = runtime()?;
    let (info, segments) = rt.block_on(async {
        let repo = repo_of(&env)?;
        let info = repo.resolve_cluster(None).await?;
        let catalog = WalCatalog::build(&repo, WalLayout::new(&info)).await?;
        let first = start / info.wal_segment_size;
        let last = end / info.wal_segment_size;
        let from = first * info.wal_segment_size;
        let to = (last + 1) * info.wal_segment_size;
        let bytes = change_index::read_wal(&repo, &catalog, 1, from, to).await?.context("WAL not archived")?;
        anyhow::Ok((info, (from, bytes)))
    })?;
    let (from, bytes) = segments;
    if let Ok(path) = std::env::var("PITR_WAL_SAMPLE_OUT") {
        std::fs::write(&path, &bytes)?;
        std::fs::write(format!("{path}.lsn"), from.to_string())?;
    }
    let mb = bytes.len() as f64 / 1e6;
    let t = std::time::Instant::now();
    let index =
        change_index::decode_bytes(&info, 1, from / info.wal_segment_size, change_index::Start::Fresh, from, &bytes);
    let changes = t.elapsed().as_secs_f64();
    println!(
        "decoded {mb:.1} MB of pgbench WAL into {} commits: {:.1} MB/s on one core (unoptimised build)",
        index.entries.len(),
        mb / changes
    );
    assert!(index.entries.len() > 20_000, "{}", index.entries.len());
    Ok(())
}

fn expect_bad_since(env: &PitrEnv) -> Result<()> {
    let out = env.run(&["verify", "--rebuild-index", "--since", "yesterday"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--since"), "{err}");
    Ok(())
}
